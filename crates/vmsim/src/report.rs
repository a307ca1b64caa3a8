//! What the commands print. Kept apart from the running so that the numbers a run produces
//! (`FormatReport`) can be checked by tests and printed in more ways later.

use std::io::{self, Write};
use std::time::Duration;

use vmsys_arch::FormatId;
use vmsys_sim::{CounterSnapshot, DetectorMode};

use crate::cli::RunArgs;
use crate::units::format_size;
use crate::workload::{CpuStats, Shape};

/// Everything `run` learned about one format.
#[derive(Clone, Debug)]
pub struct FormatReport {
    pub format: FormatId,
    pub cpus: u32,
    pub mem: u64,
    pub detector: DetectorMode,
    pub ops_per_cpu: u64,
    pub shape: Shape,
    /// Machine counters over the run (summed over CPUs).
    pub counters: CounterSnapshot,
    /// What the CPUs did and saw during the run.
    pub stats: CpuStats,
    /// The check after the run that every page reads its current frame.
    pub final_check: CpuStats,
    pub checks: u64,
    pub excused: u64,
    pub audit_violations: u64,
    /// Every violation, the audit's included.
    pub violation_count: u64,
    /// The first few violations, described.
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl FormatReport {
    /// Accesses the workload made during the run.
    pub fn accesses(&self) -> u64 {
        self.stats.reads + self.stats.writes
    }

    /// Wrong values read and faults a correct system cannot take, during and after the run.
    pub fn errors(&self) -> u64 {
        self.stats.content_errors
            + self.stats.unexpected_faults
            + self.final_check.content_errors
            + self.final_check.unexpected_faults
    }

    pub fn failed(&self) -> bool {
        self.violation_count > 0 || self.errors() > 0
    }

    pub fn throughput(&self) -> f64 {
        per_second(self.accesses(), self.elapsed)
    }
}

/// `n` events in `d`, per second (0 for an empty interval).
pub fn per_second(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// `part` as a percentage of `whole` (0 when there is no whole).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// A rate with an SI prefix: `12.3 M`.
pub fn si(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.2} k", x / 1e3),
        x => format!("{x:.0} "),
    }
}

pub fn detector_name(d: DetectorMode) -> String {
    match d {
        DetectorMode::Every => "every access".into(),
        DetectorMode::Sampled(n) => format!("sampled (1 in {n})"),
        DetectorMode::Off => "off".into(),
    }
}

pub fn print_run_header(out: &mut dyn Write, a: &RunArgs) -> io::Result<()> {
    let names: Vec<&str> = a.arch.0.iter().map(|f| f.name()).collect();
    writeln!(
        out,
        "vmsim run: {} | {} CPUs, {} each | {} accesses per CPU | CPU 0 remaps every {} | detector {} | seed {}",
        names.join(", "),
        a.cpus,
        format_size(a.mem),
        a.ops,
        a.remap_every,
        detector_name(a.detector_mode()),
        a.seed
    )?;
    if cfg!(debug_assertions) {
        writeln!(
            out,
            "(debug build: use --release for meaningful throughput)"
        )?;
    }
    Ok(())
}

fn row(out: &mut dyn Write, label: &str, value: std::fmt::Arguments<'_>) -> io::Result<()> {
    writeln!(out, "  {label:<22}{value}")
}

pub fn print_format(out: &mut dyn Write, r: &FormatReport) -> io::Result<()> {
    let c = &r.counters;
    let s = &r.stats;
    writeln!(out)?;
    writeln!(
        out,
        "== {} == {} CPUs, {}, detector {}",
        r.format,
        r.cpus,
        format_size(r.mem),
        detector_name(r.detector)
    )?;
    let sp = match r.shape.superpage {
        Some((size, 1)) => format!(", one {} superpage (fixed)", format_size(size)),
        Some((size, n)) => format!(", one {} superpage ({n} frames)", format_size(size)),
        None => ", no superpage (memory too small)".into(),
    };
    row(
        out,
        "tables",
        format_args!(
            "{} kernel (global) + {} user 4 KiB pages{sp}",
            r.shape.kernel_pages, r.shape.user_pages
        ),
    )?;
    row(
        out,
        "accesses",
        format_args!("{} ({} reads, {} writes)", r.accesses(), s.reads, s.writes),
    )?;
    let lookups = c.tlb_hits + c.tlb_misses;
    row(
        out,
        "TLB hits / misses",
        format_args!(
            "{} / {} ({:.2}% hits)",
            c.tlb_hits,
            c.tlb_misses,
            percent(c.tlb_hits, lookups)
        ),
    )?;
    row(
        out,
        "walks",
        format_args!("{} (walk-cache hits {})", c.walks, c.walk_cache_hits),
    )?;
    row(out, "A/D updates", format_args!("{}", c.ad_updates))?;
    row(
        out,
        "faults",
        format_args!(
            "{} (inside a break-before-make: {}, unexpected: {})",
            c.faults, s.transient_faults, s.unexpected_faults
        ),
    )?;
    row(
        out,
        "local invalidations",
        format_args!("{}", c.local_invalidations),
    )?;
    row(
        out,
        "broadcast invals",
        format_args!(
            "{} (applied by other CPUs: {})",
            c.broadcast_invalidations, c.remote_invalidations
        ),
    )?;
    row(
        out,
        "IPIs sent / handled",
        format_args!("{} / {}", c.ipis_sent, c.ipis_handled),
    )?;
    row(out, "remaps", format_args!("{}", s.remaps))?;
    row(
        out,
        "detector checks",
        format_args!(
            "{} (stale inside an open update, excused: {})",
            r.checks, r.excused
        ),
    )?;
    row(
        out,
        "wrong values read",
        format_args!(
            "{} during the run, {} in the final check",
            s.content_errors, r.final_check.content_errors
        ),
    )?;
    row(
        out,
        "violations",
        format_args!(
            "{} ({} found by the audit after the run)",
            r.violation_count, r.audit_violations
        ),
    )?;
    for v in &r.violations {
        writeln!(out, "    {v}")?;
    }
    if r.violation_count > r.violations.len() as u64 {
        writeln!(
            out,
            "    ... and {} more",
            r.violation_count - r.violations.len() as u64
        )?;
    }
    for e in s.errors.iter().chain(&r.final_check.errors) {
        writeln!(out, "    {e}")?;
    }
    row(
        out,
        "throughput",
        format_args!("{}accesses/s", si(r.throughput())),
    )?;
    row(
        out,
        "elapsed",
        format_args!("{:.3} s", r.elapsed.as_secs_f64()),
    )?;
    Ok(())
}

pub fn print_summary(out: &mut dyn Write, reports: &[FormatReport]) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:<12}{:>5}{:>11}{:>9}{:>8}{:>11}{:>8}{:>13}{:>10}",
        "format",
        "CPUs",
        "accesses",
        "TLB hit",
        "remaps",
        "violations",
        "errors",
        "accesses/s",
        "elapsed"
    )?;
    for r in reports {
        let c = &r.counters;
        writeln!(
            out,
            "{:<12}{:>5}{:>11}{:>8.2}%{:>8}{:>11}{:>8}{:>13}{:>8.3} s",
            r.format.name(),
            r.cpus,
            r.accesses(),
            percent(c.tlb_hits, c.tlb_hits + c.tlb_misses),
            r.stats.remaps,
            r.violation_count,
            r.errors(),
            si(r.throughput()),
            r.elapsed.as_secs_f64()
        )?;
    }
    let bad: Vec<&str> = reports
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.format.name())
        .collect();
    if bad.is_empty() {
        writeln!(out, "result: OK, no violations")
    } else {
        writeln!(out, "result: FAILED ({})", bad.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(percent(1, 4), 25.0);
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(si(12_345_678.0), "12.35 M");
        assert_eq!(si(999.0), "999 ");
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_eq!(
            detector_name(DetectorMode::Sampled(64)),
            "sampled (1 in 64)"
        );
    }
}
