//! Build the freestanding vmsys kernel in `kernel/` and boot it under QEMU (q35, TCG, several
//! CPUs), collecting what it reports over the serial port.
//!
//! The kernel prints one line per test (`TEST <name> ... ok` or `TEST <name> ... FAIL: why`)
//! and a last line `SUITE <passed> passed <failed> failed`, then exits QEMU through the
//! isa-debug-exit device: status 33 for success, 35 for a failure. A triple fault with
//! `-no-reboot` makes QEMU exit with 0, and a hang is cut off by the timeout; both are reported
//! as such, never as a pass.

pub mod ad;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The QEMU binary the runner uses.
pub const QEMU: &str = "qemu-system-x86_64";

/// How to install QEMU where it is missing.
pub const INSTALL_HINT: &str =
    "install it with `apt-get install -y qemu-system-x86` (Debian/Ubuntu; `sudo` if not root), `dnf install qemu-system-x86` (Fedora) or `brew install qemu` (macOS)";

/// Why a build or a boot did not give a report.
#[derive(Debug)]
pub enum RunError {
    /// `qemu-system-x86_64` is not on `PATH`.
    QemuMissing,
    /// Building the kernel failed (cargo's output follows).
    Build(String),
    /// A process could not be started or waited for.
    Io(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::QemuMissing => write!(f, "{QEMU} not found on PATH: {INSTALL_HINT}"),
            RunError::Build(out) => write!(f, "building the kernel failed:\n{out}"),
            RunError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// How the boot ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The kernel wrote the success code to isa-debug-exit (QEMU status 33).
    Success,
    /// The kernel wrote the failure code (QEMU status 35).
    Failure,
    /// QEMU exited with 0: with `-no-reboot`, a triple fault (or a reset).
    TripleFault,
    /// The timeout expired; QEMU was killed.
    Hang,
    /// Any other status (QEMU itself failed: bad options, no such machine...).
    Other(Option<i32>),
}

/// One test's line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestLine {
    pub name: String,
    /// `None`: passed; `Some(why)`: failed.
    pub failure: Option<String>,
}

/// What a boot produced.
#[derive(Clone, Debug)]
pub struct Report {
    pub ending: Ending,
    /// Everything the kernel wrote to the serial port (and QEMU to stderr, after it).
    pub serial: String,
    pub tests: Vec<TestLine>,
    /// The kernel's `AD <i> <seen>` lines (the A/D sequence on QEMU's MMU), in order.
    pub ad_lines: Vec<String>,
    /// The kernel's `SUITE <passed> passed <failed> failed` line, if it got there.
    pub summary: Option<(u32, u32)>,
    /// Wall time from starting QEMU to its exit.
    pub wall: Duration,
}

impl Report {
    /// The tests that failed.
    pub fn failures(&self) -> impl Iterator<Item = &TestLine> {
        self.tests.iter().filter(|t| t.failure.is_some())
    }

    /// Whether the boot is a clean pass: success exit, a summary with no failures and as many
    /// test lines as it counts, and no failing line.
    pub fn passed(&self) -> bool {
        self.ending == Ending::Success
            && self.failures().next().is_none()
            && self.summary == Some((self.tests.len() as u32, 0))
    }
}

/// Parse the kernel's serial output.
pub fn parse(serial: &str) -> (Vec<TestLine>, Option<(u32, u32)>) {
    let mut tests = Vec::new();
    let mut summary = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("TEST ") {
            let Some((name, result)) = rest.split_once(" ... ") else {
                continue;
            };
            let failure = if result == "ok" {
                None
            } else {
                Some(result.strip_prefix("FAIL: ").unwrap_or(result).to_string())
            };
            tests.push(TestLine {
                name: name.to_string(),
                failure,
            });
        } else if let Some(rest) = line.strip_prefix("SUITE ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [p, "passed", f, "failed"] = w[..] {
                if let (Ok(p), Ok(f)) = (p.parse(), f.parse()) {
                    summary = Some((p, f));
                }
            }
        }
    }
    (tests, summary)
}

/// The `AD` lines of the serial output, without the prefix and index.
pub fn ad_lines(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("AD "))
        .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
        .collect()
}

/// The directory of the kernel crate.
pub fn kernel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel")
}

/// Where the kernel is built: its own directory under the workspace's target directory (or
/// `CARGO_TARGET_DIR`), so that it never shares flags or a lock with host builds.
pub fn kernel_target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    base.join("vmsys-qemu-kernel")
}

/// Build the kernel (release profile) and return the path of its ELF.
///
/// Cargo runs in the kernel's directory, so that its `.cargo/config.toml` (target, rustflags)
/// applies; flags from the caller's environment are removed, as they are meant for host code.
pub fn build_kernel() -> Result<PathBuf, RunError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let dir = kernel_dir();
    let target = kernel_target_dir();
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RunError::Io(format!("running cargo: {e}")))?;
    if !out.status.success() {
        return Err(RunError::Build(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(target.join("x86_64-unknown-linux-gnu/release/vmsys-qemu-kernel"))
}

/// Whether QEMU is on `PATH`.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// How to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    pub cpus: u32,
    pub mem_mib: u32,
    /// The kernel command line (PVH start info): words the kernel understands, e.g.
    /// `omit-shootdown`.
    pub cmdline: String,
    pub timeout: Duration,
    /// Copy the serial output to this process's stdout as it arrives.
    pub echo: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            cpus: 4,
            mem_mib: 256,
            cmdline: String::new(),
            timeout: Duration::from_secs(120),
            echo: false,
        }
    }
}

/// The QEMU command line for `kernel`.
pub fn qemu_command(kernel: &Path, opts: &BootOptions) -> Command {
    let mut c = Command::new(QEMU);
    c.args([
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-accel",
        "tcg,thread=multi",
    ])
    .args(["-smp", &opts.cpus.to_string()])
    .args(["-m", &format!("{}M", opts.mem_mib)])
    .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-kernel")
    .arg(kernel);
    if !opts.cmdline.is_empty() {
        c.args(["-append", &opts.cmdline]);
    }
    c
}

/// Boot `kernel` and collect its report.
pub fn boot(kernel: &Path, opts: &BootOptions) -> Result<Report, RunError> {
    if !qemu_available() {
        return Err(RunError::QemuMissing);
    }
    let start = Instant::now();
    let mut child = qemu_command(kernel, opts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunError::Io(format!("starting {QEMU}: {e}")))?;
    let serial = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let echo = opts.echo;
    let sink = serial.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if echo {
                use std::io::Write;
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&buf[..n]);
                let _ = o.flush();
            }
            sink.lock()
                .expect("reader lock")
                .extend_from_slice(&buf[..n]);
        }
    });
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() >= opts.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(RunError::Io(format!("waiting for {QEMU}: {e}"))),
        }
    };
    let wall = start.elapsed();
    let _ = reader.join();
    let qemu_err = err_reader.join().unwrap_or_default();
    let mut serial = String::from_utf8_lossy(&serial.lock().expect("reader lock")).into_owned();
    if !qemu_err.is_empty() {
        serial.push_str("\n[qemu stderr]\n");
        serial.push_str(&qemu_err);
    }
    let ending = match status.map(|s| s.code()) {
        None => Ending::Hang,
        Some(Some(33)) => Ending::Success,
        Some(Some(35)) => Ending::Failure,
        Some(Some(0)) => Ending::TripleFault,
        Some(c) => Ending::Other(c),
    };
    let (tests, summary) = parse(&serial);
    let ad_lines = ad_lines(&serial);
    Ok(Report {
        ending,
        serial,
        tests,
        ad_lines,
        summary,
        wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_results_and_the_summary() {
        let s = "boot\r\nTEST a ... ok\r\nTEST b c ... FAIL: stale frame 0x1000\nSUITE 1 passed 1 failed\n";
        let (t, sum) = parse(s);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].failure, None);
        assert_eq!(t[1].name, "b c");
        assert_eq!(t[1].failure.as_deref(), Some("stale frame 0x1000"));
        assert_eq!(sum, Some((1, 1)));
    }

    #[test]
    fn a_report_without_its_summary_or_with_a_failure_is_not_a_pass() {
        let mk = |serial: &str, ending| {
            let (tests, summary) = parse(serial);
            Report {
                ending,
                serial: serial.into(),
                tests,
                ad_lines: Vec::new(),
                summary,
                wall: Duration::ZERO,
            }
        };
        assert!(mk("TEST a ... ok\nSUITE 1 passed 0 failed\n", Ending::Success).passed());
        assert!(!mk("TEST a ... ok\n", Ending::Success).passed());
        assert!(!mk(
            "TEST a ... ok\nSUITE 1 passed 0 failed\n",
            Ending::TripleFault
        )
        .passed());
        assert!(!mk(
            "TEST a ... ok\nTEST b ... ok\nSUITE 1 passed 0 failed\n",
            Ending::Success
        )
        .passed());
        assert!(!mk(
            "TEST a ... FAIL: x\nSUITE 1 passed 0 failed\n",
            Ending::Success
        )
        .passed());
    }
}
