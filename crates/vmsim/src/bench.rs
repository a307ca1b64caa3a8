//! `vmsim bench`: what a simulated memory access costs (`--what access`), and what the pmap
//! costs per page-table entry ([`crate::pmap_bench`], `--what pmap`); both by default; then
//! this host's own page fault and fork for reference ([`crate::host_bench`]). `--json` prints
//! every measurement as a [`Row`].
//!
//! The number that matters is an 8-byte load that hits the TLB, since that is nearly every
//! access a workload makes: it is measured on one CPU over 16 pages touched round-robin after
//! a warm-up, with the detector off, sampled and checking every access. A raw `AtomicU64` load
//! loop is the floor (simulated memory is atomic words, so no simulated load can beat it). A TLB
//! miss and walk is measured too, for information, over more pages than the TLB holds.

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmsys::platform::{Platform, RootLoad};
use vmsys::PhysAddr;
use vmsys_arch::{FormatId, Prot, PteFlags};
use vmsys_sim::testkit::Kit;
use vmsys_sim::{Cpu, DetectorMode, Machine, MachineConfig};

use crate::cli::BenchArgs;
use crate::error::CliError;
use crate::host_bench;
use crate::pmap_bench::{self, PmapParams};
use crate::report::{detector_name, print_pmap_bench};

/// The goal for a TLB hit with the detector off or sampled.
pub const TARGET_NS: f64 = 10.0;
/// The detector modes measured, one row each.
pub const MODES: [DetectorMode; 3] = [
    DetectorMode::Off,
    DetectorMode::Sampled(64),
    DetectorMode::Every,
];

const PAGE: u64 = 4096;
/// Pages of the TLB-hit loop (well under the TLB's 4 KiB capacity of 256 entries).
pub const HIT_PAGES: usize = 16;
/// Pages of the TLB-miss loop: 16 times the TLB, so that round-robin always misses.
pub const MISS_PAGES: usize = 4096;
const MEM: u64 = 64 << 20;
const POOL: (u64, u64) = (1 << 20, 2 << 20);
const HIT_FRAMES: u64 = 4 << 20;
const MISS_FRAMES: u64 = 8 << 20;
/// The miss pages lie this far above the hit pages in the kernel half.
const MISS_VA_OFFSET: u64 = 16 << 20;

/// One measured row.
#[derive(Clone, Copy, Debug)]
pub struct BenchRow {
    pub format: FormatId,
    pub detector: DetectorMode,
    pub hit_ns: f64,
    pub miss_ns: f64,
    /// The fraction of the miss loop's accesses that did miss (should be ~100%).
    pub miss_rate: f64,
}

impl BenchRow {
    /// Whether the target applies to this row and is met (`None` when it does not apply).
    pub fn target_met(&self) -> Option<bool> {
        (self.detector != DetectorMode::Every).then_some(self.hit_ns <= TARGET_NS)
    }
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e9 / n.max(1) as f64
}

/// The floor: a raw atomic load loop over 16 words a page apart.
pub fn floor_ns(iters: u64) -> f64 {
    let stride = (PAGE / 8) as usize;
    let words: Vec<AtomicU64> = (0..HIT_PAGES * stride)
        .map(|i| AtomicU64::new(i as u64))
        .collect();
    let start = Instant::now();
    let mut acc = 0u64;
    for i in 0..iters {
        // Acquire, as the simulator's memory loads are.
        acc = acc.wrapping_add(words[(i as usize % HIT_PAGES) * stride].load(Ordering::Acquire));
    }
    black_box(acc);
    ns_per(start.elapsed(), iters)
}

/// The benchmark's mappings.
struct Tables {
    hits: Vec<u64>,
    misses: Vec<u64>,
    load: RootLoad,
    /// arm64: the TTBR1 root (the pages are in the kernel half).
    kernel_root: Option<u64>,
}

/// Map the hit and miss pages in the kernel half.
fn build(m: &Machine) -> Result<Tables, CliError> {
    let format = m.config().format;
    let fmt = format.format();
    let mut kit = Kit::new(m, POOL.0, POOL.1);
    let err = |doing: &'static str| move |e| CliError::kit(format, doing, e);
    let user_root = kit.new_root().map_err(err("allocating the root"))?;
    let kernel_root = if fmt.layout(Default::default()).separate_roots {
        Some(kit.new_root().map_err(err("allocating the kernel root"))?)
    } else {
        None
    };
    let root = kernel_root.unwrap_or(user_root);
    let mut map = |offset: u64, frames: u64, n: usize| -> Result<Vec<u64>, CliError> {
        (0..n as u64)
            .map(|i| {
                let va = kit.test_va(false, offset + i * PAGE);
                kit.map(
                    root,
                    va,
                    frames + i * PAGE,
                    PAGE,
                    Prot::WRITE,
                    PteFlags::GLOBAL,
                )
                .map(|_| va)
                .map_err(err("mapping a page"))
            })
            .collect()
    };
    let hits = map(0, HIT_FRAMES, HIT_PAGES)?;
    let misses = map(MISS_VA_OFFSET, MISS_FRAMES, MISS_PAGES)?;
    let load = RootLoad {
        root: PhysAddr::new(user_root),
        tag: 0,
        flush: true,
    };
    Ok(Tables {
        hits,
        misses,
        load,
        kernel_root,
    })
}

/// Time `iters` loads cycling over `vas` (after one warm-up pass); the loads' sum is returned
/// through `black_box` so the loop cannot be dropped. Faults are counted, never expected.
fn time_loads(c: &Cpu<'_>, vas: &[u64], iters: u64) -> (Duration, u64) {
    let mut faults = 0u64;
    for &va in vas {
        faults += c.read_u64(va).is_err() as u64;
    }
    let start = Instant::now();
    let mut acc = 0u64;
    // A wrapping index, not `i % len`: a division would cost as much as the access itself.
    let mut next = 0;
    for _ in 0..iters {
        match c.read_u64(vas[next]) {
            Ok(v) => acc = acc.wrapping_add(v),
            Err(_) => faults += 1,
        }
        next += 1;
        if next == vas.len() {
            next = 0;
        }
    }
    let elapsed = start.elapsed();
    black_box(acc);
    (elapsed, faults)
}

/// Measure one format in every detector mode.
pub fn bench_format(format: FormatId, iters: u64) -> Result<Vec<BenchRow>, CliError> {
    let m = Machine::new(
        MachineConfig::new(format)
            .cpus(1)
            .mem(MEM)
            .detector(DetectorMode::Off),
    )
    .map_err(|err| CliError::Config { format, err })?;
    let Tables {
        hits,
        misses,
        load,
        kernel_root,
    } = build(&m)?;
    let miss_iters = (iters / 20).max(1);
    m.run_on(0, |c| {
        m.load_root(load);
        if let Some(k) = kernel_root {
            m.load_kernel_root(PhysAddr::new(k))
                .map_err(|e| CliError::setup(format, format!("loading the kernel root: {e}")))?;
        }
        let mut rows = Vec::new();
        for mode in MODES {
            m.detector().set_mode(mode);
            let (hit, f1) = time_loads(c, &hits, iters);
            let before = m.cpu_counters(0);
            let (miss, f2) = time_loads(c, &misses, miss_iters);
            let after = m.cpu_counters(0);
            if f1 + f2 > 0 {
                return Err(CliError::setup(
                    format,
                    format!("{} loads faulted in the benchmark", f1 + f2),
                ));
            }
            let missed = after.tlb_misses - before.tlb_misses;
            rows.push(BenchRow {
                format,
                detector: mode,
                hit_ns: ns_per(hit, iters),
                miss_ns: ns_per(miss, miss_iters),
                miss_rate: missed as f64 / (miss_iters + misses.len() as u64) as f64,
            });
        }
        Ok(rows)
    })
}

/// One row of `vmsim bench --json`: our time, a peer's time for the same work, and
/// `ratio = ours_ns / peer_ns` (below 1: we are faster; absent without a peer).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub ours_ns: f64,
    pub peer: &'static str,
    pub peer_ns: Option<f64>,
    pub ratio: Option<f64>,
}

impl Row {
    pub fn new(
        name: impl Into<String>,
        ours_ns: f64,
        peer: &'static str,
        peer_ns: Option<f64>,
    ) -> Self {
        Row {
            name: name.into(),
            ours_ns,
            peer,
            peer_ns,
            ratio: peer_ns.filter(|&p| p > 0.0).map(|p| ours_ns / p),
        }
    }
}

/// The kernel-memory benchmarks: vmem rows, kmem rows (no peer), and their text.
fn kmem_section(text: &mut Vec<u8>, rows: &mut Vec<Row>) -> Result<(), CliError> {
    let vmem = crate::vmem_bench::measure(false);
    writeln!(
        text,
        "vmem: ours against vmem 1.0 (crates.io), measured in the same run"
    )?;
    text.extend_from_slice(crate::vmem_bench::table(&vmem).as_bytes());
    let find = |p: &str| {
        vmem.iter()
            .find(|r| r.name.starts_with(p))
            .map(|r| r.ours_ns)
    };
    let pair = find("alloc+free, empty arena");
    let cached = vmem
        .iter()
        .find(|r| r.name.contains("quantum cache") && r.name.contains("checked"))
        .map(|r| r.ours_ns);
    let churn: Vec<f64> = vmem
        .iter()
        .filter(|r| r.name.starts_with("(a)"))
        .map(|r| r.ours_ns)
        .collect();
    writeln!(text, "targets")?;
    if let Some(p) = pair {
        writeln!(
            text,
            "  alloc+free pair <= 50 ns{:>40.1} ns  {}",
            p,
            met(p <= 50.0)
        )?;
    }
    if let Some(c) = cached {
        writeln!(
            text,
            "  through a quantum cache <= 20 ns{:>32.1} ns  {}",
            c,
            met(c <= 20.0)
        )?;
    }
    if let (Some(first), Some(last)) = (churn.first(), churn.last()) {
        let g = last / first;
        writeln!(
            text,
            "  pair cost from 10^2 to 10^6 live grows <= 1.5x{:>18.2}x     {}",
            g,
            met(g <= 1.5)
        )?;
    }
    rows.extend(vmem_rows_from(vmem));
    let k = crate::kmem_bench::measure(false).map_err(|e| CliError::setup(FormatId::Amd64, e))?;
    writeln!(text)?;
    writeln!(
        text,
        "kernel memory (kmem over reservations and the pmap; no peer)"
    )?;
    for r in &k.rows {
        writeln!(text, "  {:<90}{:>10.1} ns", r.name, r.ours_ns)?;
        rows.push(Row::new(r.name.clone(), r.ours_ns, "", None));
    }
    for &(f, promoted, allocs) in &k.promotion {
        writeln!(
            text,
            "  {}: superpage kmem_malloc promoted {promoted} of {allocs} ({:.0}%)",
            f.name(),
            100.0 * promoted as f64 / allocs.max(1) as f64
        )?;
    }
    Ok(())
}

fn vmem_rows_from(v: Vec<crate::vmem_bench::VmemRow>) -> Vec<Row> {
    v.into_iter()
        .map(|r| Row::new(r.name, r.ours_ns, r.peer, r.peer_ns))
        .collect()
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The flush-ceiling crossover, as text (no peer rows: both columns are ours).
fn flush_section(text: &mut Vec<u8>, rows: &mut Vec<Row>) -> Result<(), CliError> {
    let b = crate::flush_bench::measure(false).map_err(|e| CliError::setup(FormatId::Amd64, e))?;
    writeln!(
        text,
        "flush ceiling: CPU 0 unmaps N pages that CPU 1 has in its TLB (with 512 more), then CPU 1 touches them again; amd64, IPIs"
    )?;
    writeln!(
        text,
        "  {:>6} {:>14} {:>14}",
        "pages", "ranged ns", "full ns"
    )?;
    for r in &b.rows {
        writeln!(
            text,
            "  {:>6} {:>14.0} {:>14.0}",
            r.pages, r.ranged_ns, r.full_ns
        )?;
        rows.push(Row::new(
            format!(
                "unmap {} pages + remote refill, ranged invalidation",
                r.pages
            ),
            r.ranged_ns,
            "the same with a full flush",
            Some(r.full_ns),
        ));
    }
    writeln!(
        text,
        "  crossover on this simulator: {} (the pmap's default ceiling is {} pages; Linux uses 33)",
        b.crossover.map_or_else(
            || "none (ranged always cheaper)".into(),
            |n| format!("{n} pages")
        ),
        b.default_ceiling
    )?;
    Ok(())
}

/// `vmsim bench`: the benchmarks `--what` selects, one after the other, then this host's
/// reference rows (unless `--no-host`). Timing never fails the command (missed targets are
/// printed, not errors). With `--json`, one list of [`Row`]s instead.
pub fn bench(args: &BenchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut rows = Vec::new();
    let mut text = Vec::new();
    if args.what.access() {
        rows.extend(access_bench(args, &mut text)?);
    }
    if args.what.pmap() {
        if args.what.access() {
            writeln!(text)?;
        }
        let b = pmap_bench::measure(PmapParams::from_args(args))?;
        print_pmap_bench(&mut text, &b)?;
        let [map, unmap, translate] = b.rows();
        rows.push(Row::new(
            "pmap map 4 KiB (range of 512)",
            map.vmsys,
            "x86_64 crate map_to",
            Some(map.x86_64),
        ));
        if let Some(pp) = map.vmsys_per_page {
            rows.push(Row::new(
                "pmap map 4 KiB (enter, one page)",
                pp,
                "x86_64 crate map_to",
                Some(map.x86_64),
            ));
        }
        rows.push(Row::new(
            "pmap unmap 4 KiB (range of 512)",
            unmap.vmsys,
            "x86_64 crate unmap",
            Some(unmap.x86_64),
        ));
        if let Some(pp) = unmap.vmsys_per_page {
            rows.push(Row::new(
                "pmap unmap 4 KiB (remove, one page)",
                pp,
                "x86_64 crate unmap",
                Some(unmap.x86_64),
            ));
        }
        rows.push(Row::new(
            "pmap extract",
            translate.vmsys,
            "x86_64 crate translate_addr",
            Some(translate.x86_64),
        ));
    }
    if args.what.kmem() {
        writeln!(text)?;
        kmem_section(&mut text, &mut rows)?;
    }
    if args.what.flush() {
        writeln!(text)?;
        flush_section(&mut text, &mut rows)?;
    }
    if !args.no_host {
        let h = host_bench::measure(false)?;
        let host = [
            Row::new(
                "anonymous 4 KiB page fault (pmap enter+remove)",
                h.enter_remove_ns,
                "this host's Linux: mmap, touch, munmap per page",
                h.fault_ns,
            ),
            Row::new(
                format!(
                    "fork with {} MiB touched (pmap create+copy+remove+destroy)",
                    host_bench::FORK_MIB
                ),
                h.copy_ns,
                "this host's Linux: fork, child _exit, waitpid",
                h.fork_ns,
            ),
        ];
        writeln!(text)?;
        writeln!(text, "reference: this host's own kernel (the pmap does only the page-table share of this work)")?;
        print_rows(&mut text, &host)?;
        rows.extend(host);
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &rows).map_err(std::io::Error::other)?;
        writeln!(out)?;
    } else {
        out.write_all(&text)?;
    }
    Ok(())
}

fn print_rows(out: &mut dyn Write, rows: &[Row]) -> std::io::Result<()> {
    for r in rows {
        writeln!(
            out,
            "  {:<62}{:>12.1} ns   {:<48}{:>12}  {}",
            r.name,
            r.ours_ns,
            r.peer,
            r.peer_ns
                .map_or_else(|| "-".into(), |p| format!("{p:.1} ns")),
            r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.3}x"))
        )?;
    }
    Ok(())
}

/// The access benchmark: a row per format and detector mode.
pub fn access_bench(args: &BenchArgs, out: &mut dyn Write) -> Result<Vec<Row>, CliError> {
    let mut rows = Vec::new();
    let iters = args.iters;
    writeln!(
        out,
        "vmsim bench: 8-byte loads on one CPU; {iters} TLB hits over {HIT_PAGES} pages and {} TLB misses over {MISS_PAGES} pages per row",
        (iters / 20).max(1)
    )?;
    if cfg!(debug_assertions) {
        writeln!(
            out,
            "(debug build: these timings are meaningless, use --release)"
        )?;
    }
    let floor = floor_ns(iters);
    writeln!(
        out,
        "floor: raw AtomicU64 load, {HIT_PAGES} words round-robin: {floor:.2} ns/load"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12}{:<20}{:>10}{:>10}{:>14}{:>15}{:>11}",
        "format", "detector", "hit ns", "x floor", "hit <= 10 ns", "miss+walk ns", "miss rate"
    )?;
    let mut missed = Vec::new();
    for &format in &args.arch.0 {
        for r in bench_format(format, iters)? {
            let target = match r.target_met() {
                Some(true) => "met",
                Some(false) => {
                    missed.push(format!("{} {}", r.format, detector_name(r.detector)));
                    "MISSED"
                }
                None => "-",
            };
            rows.push(Row::new(
                format!(
                    "TLB hit {} detector {}",
                    r.format,
                    detector_name(r.detector)
                ),
                r.hit_ns,
                "raw AtomicU64 load",
                Some(floor),
            ));
            rows.push(Row::new(
                format!(
                    "TLB miss+walk {} detector {}",
                    r.format,
                    detector_name(r.detector)
                ),
                r.miss_ns,
                "none",
                None,
            ));
            writeln!(
                out,
                "{:<12}{:<20}{:>10.2}{:>10.1}{:>14}{:>15.1}{:>10.1}%",
                r.format.name(),
                detector_name(r.detector),
                r.hit_ns,
                r.hit_ns / floor.max(f64::MIN_POSITIVE),
                target,
                r.miss_ns,
                100.0 * r.miss_rate
            )?;
        }
    }
    writeln!(out)?;
    if missed.is_empty() {
        writeln!(
            out,
            "target (TLB hit <= {TARGET_NS} ns with the detector off or sampled): met"
        )?;
    } else {
        writeln!(
            out,
            "target (TLB hit <= {TARGET_NS} ns with the detector off or sampled): missed for {}",
            missed.join("; ")
        )?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format's benchmark builds, runs without faults, and its loops do what they claim:
    /// the hit loop hits, the miss loop misses.
    #[test]
    fn bench_runs_for_every_format() {
        for format in FormatId::ALL {
            let rows = bench_format(format, 20_000).expect("bench");
            assert_eq!(rows.len(), MODES.len());
            for r in rows {
                assert!(r.hit_ns > 0.0 && r.miss_ns > 0.0, "{r:?}");
                assert!(
                    r.miss_rate > 0.9,
                    "{format}: the miss loop hit the TLB: {r:?}"
                );
            }
        }
    }

    #[test]
    fn json_rows_have_the_keys() {
        let args = BenchArgs {
            what: crate::cli::BenchWhat::Access,
            arch: crate::cli::Formats(vec![FormatId::I386]),
            iters: 2000,
            json: true,
            no_host: true,
            ..BenchArgs::default()
        };
        let mut out = Vec::new();
        bench(&args, &mut out).expect("bench");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        let rows = v.as_array().expect("a list");
        assert_eq!(rows.len(), 2 * MODES.len());
        for r in rows {
            for k in ["name", "ours_ns", "peer", "peer_ns", "ratio"] {
                assert!(r.get(k).is_some(), "{k} missing in {r}");
            }
        }
        assert_eq!(Row::new("x", 2.0, "p", Some(4.0)).ratio, Some(0.5));
        assert_eq!(Row::new("x", 2.0, "p", None).ratio, None);
    }
}
