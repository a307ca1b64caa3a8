//! `vmsim run`: for each format, boot a machine, build the workload's tables, run every CPU at
//! once while CPU 0 remaps pages, verify, audit, and report.

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use vmsys_arch::FormatId;
use vmsys_sim::{Machine, MachineConfig};

use crate::cli::RunArgs;
use crate::error::CliError;
use crate::report::{self, FormatReport};
use crate::workload::{mix, CpuStats, LoopParams, Workload};

/// How many violations a report spells out (all are counted).
pub const SHOWN_VIOLATIONS: usize = 10;

/// The outcome of `vmsim run`.
#[derive(Debug)]
pub struct RunSummary {
    pub reports: Vec<FormatReport>,
}

impl RunSummary {
    /// Whether any format saw a violation, a wrong value or an impossible fault.
    pub fn failed(&self) -> bool {
        self.reports.iter().any(FormatReport::failed)
    }
}

/// The machine configuration `args` ask for.
pub fn machine_config(format: FormatId, args: &RunArgs) -> MachineConfig {
    MachineConfig::new(format)
        .cpus(args.cpus)
        .mem(args.mem)
        .detector(args.detector_mode())
}

/// Run every selected format, printing each report as it completes and a summary at the end.
pub fn run(args: &RunArgs, out: &mut dyn Write) -> Result<RunSummary, CliError> {
    // Build every machine before running any, so that a configuration one format cannot have
    // (8G on i386, say) is reported at once, not after the other formats have run. Machines
    // commit host memory only when written, so holding them all costs little.
    let machines = args
        .arch
        .0
        .iter()
        .map(|&format| {
            Machine::new(machine_config(format, args))
                .map_err(|err| CliError::Config { format, err })
        })
        .collect::<Result<Vec<_>, _>>()?;
    report::print_run_header(out, args)?;
    let mut reports = Vec::new();
    for m in machines {
        let r = run_format(&m, args)?;
        report::print_format(out, &r)?;
        reports.push(r);
        // Dropping the machine here releases its memory before the next format starts.
    }
    report::print_summary(out, &reports)?;
    Ok(RunSummary { reports })
}

/// Run the workload on one machine.
pub fn run_format(m: &Arc<Machine>, args: &RunArgs) -> Result<FormatReport, CliError> {
    let format = m.config().format;
    let wl = Workload::build(m)?;
    wl.install(m)?;
    let params = LoopParams {
        ops: args.ops,
        remap_every: args.remap_every,
        seed: mix(args.seed, format as u64 + 1),
        omit_shootdown: args.omit_shootdown,
    };

    let barrier = Barrier::new(m.config().cpus as usize);
    let start = Instant::now();
    let per_cpu = m.run_on_all(|c| wl.cpu_loop(c, &params, &barrier));
    let elapsed = start.elapsed();
    // Counters of the run itself, before the final check adds its own accesses.
    let counters = m.counters();

    let mut stats = CpuStats::default();
    for s in &per_cpu {
        stats.merge(s);
    }
    let check = wl.final_check(m);
    let audit = m.audit();
    let det = m.detector();
    Ok(FormatReport {
        format,
        cpus: args.cpus,
        mem: m.mem().size(),
        detector: m.config().detector,
        ops_per_cpu: args.ops,
        shape: wl.shape(),
        counters,
        stats,
        final_check: check,
        checks: det.check_count(),
        excused: det.excused_count(),
        audit_violations: audit.len() as u64,
        violation_count: det.violation_count(),
        violations: det
            .violations()
            .iter()
            .take(SHOWN_VIOLATIONS)
            .map(ToString::to_string)
            .collect(),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{DetectorArg, Formats};

    /// End to end: every format, several CPUs, the detector on every access, many remaps; a
    /// correct workload must see no violation, no wrong value and no impossible fault.
    #[test]
    fn every_format_runs_clean() {
        let args = RunArgs {
            arch: Formats::default(),
            cpus: 3,
            mem: 64 << 20,
            ops: 3000,
            seed: 42,
            detector: DetectorArg::Every,
            sample_period: 64,
            remap_every: 8,
            omit_shootdown: false,
        };
        let mut out = Vec::new();
        let summary = run(&args, &mut out).expect("run");
        let text = String::from_utf8_lossy(&out);
        assert_eq!(summary.reports.len(), FormatId::ALL.len());
        for r in &summary.reports {
            assert!(!r.failed(), "{} failed:\n{text}", r.format);
            assert_eq!(r.stats.reads + r.stats.writes, 3 * 3000, "{}", r.format);
            assert!(r.stats.remaps > 0, "{}: nothing was remapped", r.format);
            assert!(r.checks > 0, "{}: the detector checked nothing", r.format);
            assert!(
                r.shape.superpage.is_some(),
                "{}: no superpage in 64 MiB",
                r.format
            );
        }
        assert!(!summary.failed());
    }

    /// The checks must catch a kernel that forgets the other CPUs, on every format.
    #[test]
    fn omitted_shootdown_is_caught() {
        let args = RunArgs {
            cpus: 3,
            mem: 16 << 20,
            ops: 3000,
            remap_every: 8,
            omit_shootdown: true,
            ..RunArgs::default()
        };
        let mut out = Vec::new();
        let summary = run(&args, &mut out).expect("run");
        for r in &summary.reports {
            assert!(
                r.violation_count > 0,
                "{}: no violation for a missing shootdown",
                r.format
            );
            assert!(r.failed());
        }
        assert!(summary.failed());
    }

    #[test]
    fn bad_machine_config_is_an_error_before_running() {
        let args = RunArgs {
            arch: Formats(vec![FormatId::Amd64, FormatId::I386]),
            mem: 8 << 30,
            ops: 10,
            ..RunArgs::default()
        };
        let mut out = Vec::new();
        let e = run(&args, &mut out).expect_err("8 GiB does not fit i386");
        assert!(
            matches!(
                e,
                CliError::Config {
                    format: FormatId::I386,
                    ..
                }
            ),
            "{e}"
        );
        assert!(out.is_empty(), "nothing should have run");
    }
}
