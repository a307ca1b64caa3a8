//! What the commands print. Kept apart from the running so that the numbers a run produces
//! ([`RunReport`]) can be checked by tests and printed in more ways (the JSON is its serde
//! form).

use std::io::{self, Write};
use std::time::Duration;

use vmsys_sim::DetectorMode;

use crate::ops::{Group, OpKind};
use crate::pmap_bench::{PmapBench, FORMAT, RANGE_PAGES};
use crate::run::RunReport;
use crate::units::format_size;

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

fn row(out: &mut dyn Write, label: &str, value: std::fmt::Arguments<'_>) -> io::Result<()> {
    writeln!(out, "  {label:<24}{value}")
}

/// The report of `vmsim run`.
pub fn print_run(out: &mut dyn Write, r: &RunReport) -> io::Result<()> {
    writeln!(
        out,
        "vmsim run: {} | {} CPUs | {} | {} ops | seed {} | detector {} | audit every {}{}",
        r.arch,
        r.cpus,
        format_size(r.mem),
        r.ops,
        r.seed,
        r.detector,
        if r.audit_every == 0 {
            "(end only)".to_string()
        } else {
            format!("{} ops", r.audit_every)
        },
        if r.omit_shootdown {
            " | PLANTED BUG: shootdowns omitted"
        } else {
            ""
        }
    )?;
    if cfg!(debug_assertions) {
        writeln!(
            out,
            "(debug build: use --release for meaningful throughput)"
        )?;
    }
    writeln!(out)?;
    writeln!(out, "operations")?;
    for g in [
        Group::Space,
        Group::Access,
        Group::User,
        Group::Kernel,
        Group::Kmem,
    ] {
        let kinds: Vec<String> = OpKind::ALL
            .iter()
            .filter(|k| k.group() == g)
            .map(|k| {
                format!(
                    "{} {}",
                    k.name(),
                    r.ops_by_kind.get(k.name()).copied().unwrap_or(0)
                )
            })
            .collect();
        let label = match g {
            Group::Space => "address spaces",
            Group::Access => "accesses",
            Group::User => "user mappings",
            Group::Kernel => "kernel mappings",
            Group::Kmem => "kernel memory",
        };
        row(out, label, format_args!("{}", kinds.join(", ")))?;
    }
    let p = &r.pmap;
    writeln!(out, "pmap")?;
    row(
        out,
        "promotions / demotions",
        format_args!(
            "{} / {} (failed promotion checks {}, failed demotions {})",
            p.promotions, p.demotions, p.promotion_failures, p.demotion_failures
        ),
    )?;
    row(
        out,
        "page-table pages",
        format_args!(
            "{} in use at the end ({} user, {} kernel); {} allocated, {} freed during the run",
            p.ptp_pages, p.user_ptps, p.kernel_ptps, p.ptps_allocated, p.ptps_freed
        ),
    )?;
    row(
        out,
        "PV entries",
        format_args!(
            "{} in use at the end ({} superpages mapped)",
            p.pv_entries, p.superpages
        ),
    )?;
    row(
        out,
        "KVA in use",
        format_args!(
            "{} grown by growkernel, {} kernel pages mapped; {} address spaces at the end",
            format_size(p.kva_grown),
            p.kernel_pages_mapped,
            p.address_spaces_at_end
        ),
    )?;
    let k = &r.kmem;
    writeln!(out, "kernel memory")?;
    row(
        out,
        "allocations",
        format_args!(
            "{} kmem_malloc, {} kmem_free, {} refused (memory or KVA short)",
            k.mallocs, k.frees, k.malloc_failures
        ),
    )?;
    row(
        out,
        "KVA per arena",
        format_args!(
            "kernel arena {} imported: kmem {}, kva_alloc {}, transient {} in use at the end",
            format_size(k.kernel_arena_bytes),
            format_size(k.kmem_bytes),
            format_size(k.kva_alloc_bytes),
            format_size(k.transient_bytes)
        ),
    )?;
    row(
        out,
        "transient maps",
        format_args!(
            "{} direct-map, {} pinned (local invalidation), {} can-fault (qenter); {} bounce copies",
            k.transient_direct, k.transient_local, k.transient_global, k.bounce_copies
        ),
    )?;
    let t = &r.tlb;
    writeln!(out, "TLB")?;
    row(
        out,
        "invalidations",
        format_args!(
            "{} local, {} broadcast (applied remotely {}); pmap shootdowns {}",
            t.local_invalidations, t.broadcast_invalidations, t.remote_invalidations, p.shootdowns
        ),
    )?;
    row(
        out,
        "IPIs sent / handled",
        format_args!("{} / {}", t.ipis, t.ipis_handled),
    )?;
    row(
        out,
        "hit rate",
        format_args!(
            "{:.2}% ({} hits, {} misses, {} walks, {} faults)",
            100.0 * t.hit_rate,
            t.hits,
            t.misses,
            t.walks,
            t.faults
        ),
    )?;
    let c = &r.checks;
    let a = &r.audit;
    writeln!(out, "checks")?;
    row(
        out,
        "values checked",
        format_args!(
            "{} by owners, {} by visitors ({} visitor reads raced a change and were not judged), {} soft write faults, {} pages of unaccessed superpages destroyed by demotion",
            c.owner_accesses, c.visitor_reads, c.visitor_reads_discarded, c.soft_faults, c.destroyed_superpage_pages
        ),
    )?;
    row(
        out,
        "audits",
        format_args!(
            "{} (pmap invariants + every CPU's TLB), detector checks {}",
            a.checks, t.detector_checks
        ),
    )?;
    row(
        out,
        "violations",
        format_args!(
            "{} (pmap audit {}, machine audit {}, detector {}, workload {})",
            a.violations,
            a.pmap_violations,
            a.machine_violations,
            a.detector_violations,
            a.workload_errors
        ),
    )?;
    for pr in &r.problems {
        writeln!(out, "    {pr}")?;
    }
    row(
        out,
        "throughput",
        format_args!(
            "{}ops/s ({} ops in {:.3} s)",
            si(r.ops_per_s),
            r.ops,
            r.elapsed_s
        ),
    )?;
    if r.failed {
        writeln!(out, "result: FAILED")
    } else {
        writeln!(out, "result: OK, no violations")
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
