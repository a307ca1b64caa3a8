//! Boots the vmsys kernel under QEMU (q35, TCG, 4 CPUs) and checks its conformance suite on the
//! emulated MMU: every test line must pass, the kernel must exit with the success code, and a
//! triple fault or a hang fails the test. Then the same kernel with the pmap's shootdown IPIs
//! dropped must fail its cross-CPU tests: the check catches a stale TLB on the real MMU model.
//!
//! Without QEMU the tests say so loudly and return, unless `CI` or `VMSYS_REQUIRE_QEMU` is set
//! (as `.ci/run` does), where a missing QEMU fails them.

use std::time::Duration;

use vmsys_qemu::{
    boot, build_kernel, qemu_available, BootOptions, Ending, Report, INSTALL_HINT, QEMU,
};

fn qemu_or_skip() -> bool {
    if qemu_available() {
        return true;
    }
    let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0");
    if set("CI") || set("VMSYS_REQUIRE_QEMU") {
        panic!("{QEMU} is required here (CI or VMSYS_REQUIRE_QEMU is set) but not found: {INSTALL_HINT}");
    }
    eprintln!(
        "\n********\n* SKIPPED: {QEMU} not found, the bare-metal vmsys suite did not run.\n* {INSTALL_HINT}.\n* (CI sets VMSYS_REQUIRE_QEMU=1, where this fails instead.)\n********\n"
    );
    false
}

fn run(cmdline: &str) -> Report {
    let kernel = build_kernel().unwrap_or_else(|e| panic!("{e}"));
    let opts = BootOptions {
        cmdline: cmdline.into(),
        timeout: Duration::from_secs(300),
        ..BootOptions::default()
    };
    let r = boot(&kernel, &opts).unwrap_or_else(|e| panic!("{e}"));
    println!("{}", r.serial);
    println!("[{:?} after {:.2} s wall]", r.ending, r.wall.as_secs_f64());
    r
}

#[test]
fn pmap_conformance_suite_passes_on_qemus_mmu_with_four_cpus() {
    if !qemu_or_skip() {
        return;
    }
    let r = run("");
    match r.ending {
        Ending::TripleFault => panic!("the kernel triple-faulted (QEMU exited 0 under -no-reboot)"),
        Ending::Hang => panic!("the kernel hung: no exit within the timeout"),
        _ => {}
    }
    let failed: Vec<_> = r.failures().collect();
    assert!(failed.is_empty(), "failing tests under QEMU: {failed:#?}");
    assert_eq!(
        r.ending,
        Ending::Success,
        "the kernel did not exit with success"
    );
    assert!(
        r.passed(),
        "summary {:?} does not match the {} test lines",
        r.summary,
        r.tests.len()
    );
    assert!(
        r.tests.iter().any(|t| t.name.starts_with("cross_cpu")),
        "the cross-CPU tests did not run"
    );
}

#[test]
fn dropping_the_shootdown_ipis_makes_the_cross_cpu_tests_fail_on_qemu() {
    if !qemu_or_skip() {
        return;
    }
    let r = run("omit-shootdown");
    assert!(
        !matches!(r.ending, Ending::TripleFault | Ending::Hang),
        "the kernel must report, not crash: {:?}",
        r.ending
    );
    assert_eq!(
        r.ending,
        Ending::Failure,
        "stale translations went unnoticed"
    );
    let failed: Vec<_> = r.failures().map(|t| t.name.as_str()).collect();
    assert!(
        !failed.is_empty() && failed.iter().all(|n| n.starts_with("cross_cpu")),
        "only (and some) cross-CPU tests must fail without shootdowns, failed: {failed:?}"
    );
}
