//! Build the vmsys kernel and boot it in QEMU interactively: the serial report goes to stdout.
//!
//! `cargo run -p vmsys-qemu -- [--cpus N] [--mem MIB] [--timeout SECS] [--omit-shootdown]`
//! Exit status: 0 when the suite passed, 1 when it failed (or the kernel triple-faulted or
//! hung), 2 on a usage error or when QEMU or the build is missing.

use std::process::ExitCode;
use std::time::Duration;

use vmsys_qemu::{boot, build_kernel, BootOptions, Ending};

const USAGE: &str = "usage: vmsys-qemu [--cpus N] [--mem MIB] [--timeout SECS] [--omit-shootdown]";

fn parse_args() -> Result<BootOptions, String> {
    let mut o = BootOptions {
        echo: true,
        ..BootOptions::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            let v = args.next().ok_or(format!("{what} needs a value"))?;
            v.parse().map_err(|_| format!("{what}: not a number: {v}"))
        };
        match a.as_str() {
            "--cpus" => o.cpus = num("--cpus")?.clamp(1, 8) as u32,
            "--mem" => o.mem_mib = num("--mem")? as u32,
            "--timeout" => o.timeout = Duration::from_secs(num("--timeout")?),
            "--omit-shootdown" => o.cmdline.push_str("omit-shootdown "),
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let kernel = match build_kernel() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match boot(&kernel, &opts) {
        Ok(r) => {
            eprintln!(
                "[vmsys-qemu] {:?} after {:.2} s; {} tests, {} failed",
                r.ending,
                r.wall.as_secs_f64(),
                r.tests.len(),
                r.failures().count()
            );
            if r.passed() {
                ExitCode::SUCCESS
            } else {
                if r.ending == Ending::Hang {
                    eprintln!("[vmsys-qemu] no exit within {:?}", opts.timeout);
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
