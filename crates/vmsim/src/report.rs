//! What the commands print. Kept apart from the running so that the numbers a run produces
//! (`FormatReport`) can be checked by tests and printed in more ways later.

use std::io::{self, Write};
use std::time::Duration;

use vmsys_arch::FormatId;
use vmsys_sim::{CounterSnapshot, DetectorMode};

use crate::cli::RunArgs;
use crate::pmap_bench::{PmapBench, FORMAT, RANGE_PAGES};
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

/// `a / b` as a ratio column: `7.6x`, `-` without a value.
fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// The pmap benchmark: the header, the comparison table with ratios, notes and the targets.
pub fn print_pmap_bench(out: &mut dyn Write, b: &PmapBench) -> io::Result<()> {
    let p = &b.params;
    writeln!(
        out,
        "vmsim bench pmap: {} on one CPU, detector off; {} ranges x {RANGE_PAGES} pages x {} rounds = {} entries per sample and operation; median of {} samples after a warm-up",
        FORMAT.name(),
        p.ranges,
        p.rounds,
        p.entries_per_sample(),
        p.samples
    )?;
    if cfg!(debug_assertions) {
        writeln!(
            out,
            "(debug build: these timings are meaningless, use --release)"
        )?;
    }
    writeln!(
        out,
        "4 KiB entries: PmapConfig::default() (promotion on), data frames start 4 KiB past a 2 MiB boundary so a full table is never promoted ({} promotions, {} failed promotion checks)",
        b.promotions, b.promotion_failures
    )?;
    writeln!(
        out,
        "the user pmap is active on no CPU: no TLB invalidation on either side (the x86_64 crate's flushes are ignored: INVLPG is privileged)"
    )?;
    writeln!(
        out,
        "x86_64 crate 0.15: MappedPageTable over the same simulated memory (frame -> PhysMem::host_page_ptr), tables from a bump range ({} frames)",
        b.x86_tables
    )?;
    writeln!(
        out,
        "floor: raw AtomicU64 store, {RANGE_PAGES} words per table: {:.2} ns/entry",
        b.floor_store.median()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12}{:>10}{:>12}{:>10}{:>16}{:>18}",
        "ns/entry", "vmsys", "vmsys/page", "x86_64", "x86_64 / vmsys", "x86_64 / per-page"
    )?;
    for r in b.rows() {
        writeln!(
            out,
            "{:<12}{:>10.2}{:>12}{:>10.2}{:>16}{:>18}",
            r.op,
            r.vmsys,
            r.vmsys_per_page
                .map_or_else(|| "-".into(), |v| format!("{v:.2}")),
            r.x86_64,
            ratio(Some(r.ratio())),
            ratio(r.ratio_per_page())
        )?;
    }
    writeln!(
        out,
        "  map:       vmsys enter_range of 512 pages | vmsys enter, one page | x86_64 map_to, one page"
    )?;
    writeln!(
        out,
        "  unmap:     vmsys remove of the 512-page range | vmsys remove, one page | x86_64 unmap, one page"
    )?;
    writeln!(
        out,
        "  translate: vmsys extract | - | x86_64 translate_addr; round-robin over 512 mapped pages (ns/call)"
    )?;
    writeln!(
        out,
        "  vmsys page-table pages allocated per 512-page map: {:.2} (vmsys frees a table when its last entry goes; the x86_64 crate never frees one)",
        b.ptps_per_range
    )?;
    let spread =
        |name: &str, t: &crate::pmap_bench::Timing| format!("{name} {:.2}-{:.2}", t.min(), t.max());
    writeln!(
        out,
        "  spread (min-max ns): {}; {}; {}",
        spread("range map", &b.range_map),
        spread("range unmap", &b.range_unmap),
        spread("extract", &b.extract)
    )?;
    writeln!(out)?;
    writeln!(out, "targets (ratios are x86_64 time / vmsys range time):")?;
    for t in b.targets() {
        writeln!(
            out,
            "  {:<58}{:>10}  {}",
            t.what,
            t.value,
            if t.met { "met" } else { "MISSED" }
        )?;
    }
    Ok(())
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
