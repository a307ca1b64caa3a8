//! MMU-4: the simulator's MMU walkers are the oracle the pmap is checked against, so they must
//! share no code with what they check. This test reads the walker sources and fails if any of
//! them names `vmsys_arch` (the formats' encoders) or any part of vmsys other than the
//! vocabulary of faults in `vmsys::platform` (`AccessKind`, `FaultReason`).

use std::fs;
use std::path::Path;

/// The only paths into vmsys a walker may name: the words a fault is reported in.
const ALLOWED_VMSYS: &[&str] = &["vmsys::platform::{AccessKind, FaultReason}"];

fn walker_sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/walker");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).expect("src/walker exists") {
        let p = e.expect("readable directory entry").path();
        if p.extension().is_some_and(|x| x == "rs") {
            let text = fs::read_to_string(&p).expect("readable source");
            out.push((p.display().to_string(), text));
        }
    }
    assert!(
        out.len() >= 3,
        "expected the walker's mod, x86 and arm64 sources, found {out:?}"
    );
    out
}

/// Code lines only: comments may name anything.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.starts_with("//"))
}

/// Every line of `text` that breaks MMU-4.
fn violations(path: &str, text: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for (n, line) in code_lines(text) {
        if line.contains("vmsys_arch") {
            bad.push(format!("{path}:{n}: names vmsys_arch: {line}"));
        }
        let mut rest = line;
        while let Some(i) = rest.find("vmsys::") {
            let tail = &rest[i..];
            if !ALLOWED_VMSYS.iter().any(|a| tail.starts_with(a)) {
                bad.push(format!(
                    "{path}:{n}: names vmsys beyond its fault vocabulary: {line}"
                ));
            }
            rest = &tail["vmsys::".len()..];
        }
    }
    bad
}

#[test]
fn walkers_use_nothing_of_vmsys_arch_nor_vmsys_page_tables() {
    let bad: Vec<String> = walker_sources()
        .iter()
        .flat_map(|(path, text)| violations(path, text))
        .collect();
    assert!(
        bad.is_empty(),
        "MMU-4 (the walker is an independent oracle) broken:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_a_forbidden_import() {
    // The scanner itself must be able to fail: both lines naming page-table code are caught,
    // the fault vocabulary and comments are not.
    let sample = "use vmsys_arch::Format;\nuse vmsys::pmap::Geometry;\n\
                  use vmsys::platform::{AccessKind, FaultReason};\n// vmsys_arch in a comment\n";
    let bad = violations("sample", sample);
    assert_eq!(bad.len(), 2, "{bad:?}");
}
