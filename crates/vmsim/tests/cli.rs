//! The binary's exit statuses and error lines.

use std::process::Command;

fn vmsim(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vmsim"))
        .args(args)
        .output()
        .expect("run vmsim");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_options_are_one_line_errors() {
    for args in [
        &["--frobnicate"][..],
        &["run", "--cpus", "zero"],
        &["run", "--arch", "vax"],
        &["layout", "--split", "5g"],
        &["layout", "--arch", "amd64", "--split", "2g2g"],
        &["run", "--mem", "16M"],
        &["bench", "--what", "nothing"],
    ] {
        let (code, out, err) = vmsim(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("vmsim: error: "), "{args:?}: {err}");
    }
}

#[test]
fn help_explains_every_command() {
    for cmd in ["run", "layout", "bench"] {
        let (code, out, _) = vmsim(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Usage:") && out.contains("--json"),
            "{cmd}: {out}"
        );
    }
}

#[test]
fn clean_run_exits_0_and_planted_bug_exits_1() {
    let small = [
        "--cpus",
        "3",
        "--mem",
        "128M",
        "--ops",
        "20000",
        "--audit-every",
        "5000",
        "--detector",
        "every",
    ];
    let (code, out, err) = vmsim(&[&["run", "--arch", "i386"][..], &small].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("result: OK"), "{out}");
    let (code, out, _) = vmsim(&[&["run", "--omit-shootdown", "--json"][..], &small].concat());
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(v["audit"]["violations"].as_u64().unwrap() > 0);
}

#[test]
fn layout_prints_json() {
    let (code, out, err) = vmsim(&["layout", "--arch", "i386", "--split", "1g3g", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["arch"], "i386");
    assert!(v["sync"].as_array().unwrap().len() == 3);
}
