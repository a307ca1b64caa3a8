//! `vmsim layout`: the kernel address-space layout of a format, as the pmap computes it on a
//! machine of the given size, and what each kernel page-table synchronisation strategy costs.
//!
//! The layout comes from a real bootstrap (`PmapSystem::bootstrap` on a simulated machine):
//! `kva_range`, `direct_map`, the quick-map slots above the KVA. The kernel arenas and the
//! transient (I/O) arena are the kernel-memory layer's and are shown as rows still to be filled.
//!
//! Synchronisation costs: the pmap reports its *active* strategy's cost (`kpt_sync_cost`), and
//! this command measures one growkernel of a fresh root entry with [`PMAPS`] user pmaps alive.
//! The other strategies are not implemented by the pmap for the format, so their costs are
//! computed here from the format's geometry: preallocating the top level costs one table per
//! root entry that the kernel's ranges cover; propagation costs one store per live pmap per new
//! root entry; a shared root (a separate kernel root register, arm64 TTBR1) costs nothing per
//! pmap and is only possible where the hardware has one.

use std::io::Write;

use serde::Serialize;
use vmsys::kmem::KmemConfig;
use vmsys::pmap::KptSync;
use vmsys::{PmapConfig, VirtAddr};
use vmsys_arch::{Halves, Split32};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

use crate::cli::LayoutArgs;
use crate::error::CliError;
use crate::units::format_size;

const PAGE: u64 = 4096;
/// User pmaps alive when the growkernel is measured.
pub const PMAPS: u64 = 3;

/// One range of the kernel's address space.
#[derive(Clone, Debug, Serialize)]
pub struct Region {
    pub name: &'static str,
    /// `None`: not present in this format, or not computed yet.
    pub start: Option<u64>,
    pub end: Option<u64>,
    pub note: String,
}

/// One synchronisation strategy's cost.
#[derive(Clone, Debug, Serialize)]
pub struct SyncRow {
    pub strategy: &'static str,
    /// The pmap's strategy for this format.
    pub active: bool,
    /// Whether the format can use it at all.
    pub possible: bool,
    /// Kernel tables allocated at bootstrap so that roots never change.
    pub preallocated_tables: u64,
    pub preallocated_bytes: u64,
    /// Root entries copied into each new pmap.
    pub entries_copied_per_pmap: u64,
    /// Stores into other pmaps per growkernel that adds a root entry, with `pmaps` alive.
    pub stores_per_growkernel: u64,
    /// "measured" (the pmap's numbers and a real growkernel) or "computed" (from geometry).
    pub source: &'static str,
}

/// The whole layout.
#[derive(Clone, Debug, Serialize)]
pub struct LayoutReport {
    pub arch: &'static str,
    pub split: Option<&'static str>,
    pub mem: u64,
    pub cpus: u32,
    pub levels: usize,
    pub root_entry_span: u64,
    pub growkernel_chunk: u64,
    pub regions: Vec<Region>,
    pub quick_slots_per_cpu: u64,
    /// Extra tables each user pmap owns because of the format (PAE page directories).
    pub fixed_tables_per_pmap: u64,
    /// User pmaps alive in the growkernel measurement.
    pub pmaps: u64,
    /// Kernel page-table pages one growkernel of a chunk allocated (measured).
    pub kernel_ptps_per_growkernel: u64,
    pub sync: Vec<SyncRow>,
}

fn split_name(s: Split32) -> &'static str {
    match s {
        Split32::G3G1 => "3g1g",
        Split32::G2G2 => "2g2g",
        Split32::G1G3 => "1g3g",
    }
}

/// Compute the layout (no output).
pub fn compute(args: &LayoutArgs) -> Result<LayoutReport, CliError> {
    let format = args.arch;
    let fmt = format.format();
    let is32 = matches!(fmt.halves, Halves::Split32);
    if args.split.is_some() && !is32 {
        return Err(CliError::setup(
            format,
            "--split applies to the 32-bit formats (i386, i386-pae) only",
        ));
    }
    let split = args.split.map(|s| s.split()).unwrap_or_default();
    let cfg = PmapConfig {
        split,
        ..PmapConfig::default()
    };
    // The whole system, so that the kernel arenas are the real ones.
    let system = System::boot(
        MachineConfig::new(format)
            .cpus(args.cpus)
            .mem(args.mem)
            .detector(DetectorMode::Off),
        cfg,
        KmemConfig::default(),
    )
    .map_err(|e| CliError::setup(format, format!("boot: {e}")))?;
    let m = system.m.clone();
    let sys = system.pmap.clone();
    let kmem = system.kmem.clone();
    let sp = kmem.superpage();
    let ndomains = system.buddy.domain_count();
    let span = kmem.kva_span();
    let arena_span = (span.0.as_u64(), span.1.as_u64());
    let g = sys.geometry();
    let layout = fmt.layout(split);
    let (kva_start, quick_base) = sys.kva_range();
    let (kva_start, quick_base) = (kva_start.as_u64(), quick_base.as_u64());
    let grown_at_boot = sys.kernel_end().as_u64() - kva_start;
    let quick_end = quick_base + 2 * args.cpus as u64 * PAGE;
    let dmap = sys.direct_map();
    let cost0 = sys.kpt_sync_cost();
    let root_span = g.levels[0].span;
    let chunk = g.levels[g.last() - 1].span;

    // A growkernel into a fresh root entry, with PMAPS user pmaps alive.
    let (ptps, stores) = m.run_on(0, |_| -> Result<(u64, u64), CliError> {
        let pmaps: Vec<_> = (0..PMAPS)
            .map(|_| sys.create())
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::setup(format, format!("create: {e}")))?;
        let before = sys.kpt_sync_cost();
        let end = sys.kernel_end().as_u64();
        // The first chunk of the next root entry (or the first one if the KVA starts on one);
        // one chunk if the KVA has no further root entry (LA57: one entry spans 256 TiB).
        let limit = quick_base & !(chunk - 1);
        let target = if end.is_multiple_of(root_span) {
            end + chunk
        } else {
            end.checked_next_multiple_of(root_span)
                .and_then(|t| t.checked_add(chunk))
                .filter(|&t| t <= limit)
                .unwrap_or(end + chunk)
        };
        let grown = target.min(limit);
        let r = sys.growkernel(VirtAddr::new(grown));
        let after = sys.kpt_sync_cost();
        for p in pmaps {
            sys.destroy(p)
                .map_err(|e| CliError::setup(format, format!("destroy: {e}")))?;
        }
        r.map_err(|e| CliError::setup(format, format!("growkernel: {e}")))?;
        let chunks = (grown - end).div_ceil(chunk).max(1);
        Ok((
            (after.kernel_ptps - before.kernel_ptps) / chunks,
            after.propagated_stores - before.propagated_stores,
        ))
    })?;

    // Where the first allocation of each kind lands (then given back), after the growkernel
    // measurement so that it does not move the kernel's end under it.
    let (probe_kmem, probe_io, probe_kva) = m
        .run_on(0, |_| -> Result<(u64, u64, u64), String> {
            let e = |e: vmsys::kmem::KmemError| e.to_string();
            let a = kmem.kmem_malloc(PAGE, 0, false).map_err(e)?;
            // Straight from the transient arena: on formats with a direct map covering all of
            // memory, map_io_transient itself would not need KVA.
            let ta = kmem.transient_arena();
            let io = ta
                .alloc(PAGE, vmsys::vmem::Policy::InstantFit)
                .map_err(|e| e.to_string())?;
            ta.free(io, PAGE).map_err(|e| e.to_string())?;
            let k = kmem.kva_alloc(PAGE).map_err(e)?;
            kmem.kva_free(k, PAGE).map_err(e)?;
            kmem.kmem_free(a, PAGE).map_err(e)?;
            Ok((a.as_u64() & !(sp - 1), io, k.as_u64()))
        })
        .map_err(|e| CliError::setup(format, e))?;

    // Root entries the kernel's ranges cover (what preallocating the top level costs).
    let roots_over = |lo: u64, hi: u64| -> Vec<usize> {
        if hi <= lo {
            return Vec::new();
        }
        (g.index(lo, 0)..=g.index(hi - 1, 0)).collect()
    };
    let mut covered = roots_over(kva_start, quick_end);
    if let Some((b, s)) = dmap {
        covered.extend(roots_over(b.as_u64(), b.as_u64() + s));
    }
    covered.sort_unstable();
    covered.dedup();
    let prealloc = covered.len() as u64;
    let top = layout.kernel_top.len() as u64;
    let sync = [
        KptSync::SharedRoot,
        KptSync::PreallocTop,
        KptSync::Propagate,
    ]
    .into_iter()
    .map(|s| {
        let active = s == cost0.strategy;
        let (possible, pre, copied, per_grow) = match s {
            KptSync::SharedRoot => (layout.separate_roots, 0, 0, 0),
            // The root's kernel entries then never change.
            KptSync::PreallocTop => (true, prealloc, top, 0),
            KptSync::Propagate => (!layout.separate_roots, 0, top, PMAPS),
        };
        let (pre, copied, per_grow) = if active {
            (
                cost0.preallocated_tables,
                cost0.entries_copied_per_pmap,
                stores,
            )
        } else {
            (pre, copied, per_grow)
        };
        SyncRow {
            strategy: match s {
                KptSync::SharedRoot => "shared root",
                KptSync::PreallocTop => "preallocated top level",
                KptSync::Propagate => "propagated",
            },
            active,
            possible,
            preallocated_tables: pre,
            preallocated_bytes: pre * PAGE,
            entries_copied_per_pmap: copied,
            stores_per_growkernel: per_grow,
            source: if active { "measured" } else { "computed" },
        }
    })
    .collect();

    let regions = vec![
        Region {
            name: "user half",
            start: Some(*layout.user.start()),
            end: Some(layout.user.end().wrapping_add(1)),
            note: if layout.separate_roots {
                "TTBR0".into()
            } else {
                "root entries below the kernel's".into()
            },
        },
        Region {
            name: "kernel half",
            start: Some(*layout.kernel.start()),
            end: Some(layout.kernel.end().wrapping_add(1)),
            note: format!(
                "root entries {}..{}{}",
                layout.kernel_top.start,
                layout.kernel_top.end,
                if layout.separate_roots {
                    " of TTBR1's root"
                } else {
                    ""
                }
            ),
        },
        match dmap {
            Some((b, s)) => Region {
                name: "direct map",
                start: Some(b.as_u64()),
                end: Some(b.as_u64() + s),
                note: format!("all {} of physical memory, largest leaves", format_size(s)),
            },
            None => Region {
                name: "direct map",
                start: None,
                end: None,
                note: "none: no room in a 32-bit address space (quick maps use the slots)".into(),
            },
        },
        Region {
            name: "KVA (growkernel)",
            start: Some(kva_start),
            end: Some(quick_base),
            note: format!(
                "{} grown at bootstrap; grows by {} (one last-level table)",
                format_size(grown_at_boot),
                format_size(chunk)
            ),
        },
        Region {
            name: "  kernel arena",
            start: Some(arena_span.0),
            end: Some(arena_span.1),
            note: format!(
                "vmem; imports {} at a time, growing the kernel first; never releases",
                format_size(sp)
            ),
        },
        Region {
            name: "    domain arenas (kmem)",
            start: Some(probe_kmem),
            end: Some(probe_kmem + sp),
            note: format!(
                "{} domain(s); each imports whole {}-aligned superpages (first import shown): kmem_malloc, promotable",
                ndomains,
                format_size(sp)
            ),
        },
        Region {
            name: "    transient arena (I/O)",
            start: Some(probe_io & !(sp - 1)),
            end: Some((probe_io & !(sp - 1)) + sp),
            note: "whole superpages too (first import shown): map_io_transient, never promoted".into(),
        },
        Region {
            name: "    kva_alloc",
            start: Some(probe_kva),
            end: Some(probe_kva + PAGE),
            note: "pages straight from the kernel arena, outside both (first one shown)".into(),
        },
        Region {
            name: "quick-map slots",
            start: Some(quick_base),
            end: Some(quick_end),
            note: format!("2 per CPU x {} CPUs, page tables preallocated", args.cpus),
        },
    ];
    Ok(LayoutReport {
        arch: format.name(),
        split: is32.then(|| split_name(split)),
        mem: m.mem().size(),
        cpus: args.cpus,
        levels: g.nlevels,
        root_entry_span: root_span,
        growkernel_chunk: chunk,
        regions,
        quick_slots_per_cpu: 2,
        fixed_tables_per_pmap: cost0.fixed_tables_per_pmap,
        pmaps: PMAPS,
        kernel_ptps_per_growkernel: ptps,
        sync,
    })
}

fn hex(x: Option<u64>, is32: bool) -> String {
    match x {
        None => "-".into(),
        Some(v) if is32 => format!("{v:#010x}"),
        Some(v) => format!("{v:#018x}"),
    }
}

/// `vmsim layout`: print the layout (or JSON).
pub fn layout(args: &LayoutArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let r = compute(args)?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &r).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    let is32 = r.split.is_some();
    writeln!(
        out,
        "vmsim layout: {}{} | {} levels | {} CPUs | {} of memory",
        r.arch,
        r.split.map(|s| format!(" split {s}")).unwrap_or_default(),
        r.levels,
        r.cpus,
        format_size(r.mem)
    )?;
    writeln!(out)?;
    let w = if is32 { 10 } else { 18 };
    writeln!(
        out,
        "{:<26}{:>w$}  {:>w$}  {:>10}  note",
        "range", "start", "end", "size"
    )?;
    for g in &r.regions {
        // The 64-bit kernel half ends at 2^64, which a u64 shows as 0.
        let end = match g.end {
            Some(0) if g.start.is_some_and(|s| s > 0) => "2^64".to_string(),
            e => hex(e, is32),
        };
        let size = match (g.start, g.end) {
            (Some(a), Some(b)) => human(b.wrapping_sub(a)),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<26}{:>w$}  {:>w$}  {:>10}  {}",
            g.name,
            hex(g.start, is32),
            end,
            size,
            g.note
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "kernel page-table sync (a root entry spans {}; growkernel adds {}; {} kernel table(s) per growkernel; {} user pmaps alive when measured{})",
        human(r.root_entry_span),
        human(r.growkernel_chunk),
        r.kernel_ptps_per_growkernel,
        r.pmaps,
        if r.fixed_tables_per_pmap > 0 {
            format!("; each pmap also owns {} page directories (PAE PDPTEs are latched)", r.fixed_tables_per_pmap)
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "{:<24}{:>8}{:>10}{:>14}{:>12}{:>16}{:>20}  source",
        "strategy", "active", "possible", "prealloc", "bytes", "copied/pmap", "stores/growkernel"
    )?;
    for s in &r.sync {
        writeln!(
            out,
            "{:<24}{:>8}{:>10}{:>14}{:>12}{:>16}{:>20}  {}",
            s.strategy,
            if s.active { "yes" } else { "" },
            if s.possible { "yes" } else { "no" },
            s.preallocated_tables,
            human(s.preallocated_bytes),
            s.entries_copied_per_pmap,
            s.stores_per_growkernel,
            s.source
        )?;
    }
    writeln!(
        out,
        "(measured: the pmap's kpt_sync_cost and a growkernel into a new root entry; computed: from the format's geometry, for strategies the pmap does not use on this format)"
    )?;
    Ok(())
}

/// A size for people, rounded: `1 GiB`, `2 MiB`, `512 GiB`, `16 EiB`-ish for the huge ones.
fn human(b: u64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, "EiB"),
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    if b == 0 {
        return "0".into();
    }
    for (shift, name) in UNITS {
        if b >= 1u64 << shift {
            let v = b as f64 / (1u64 << shift) as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.1} {name}")
            };
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::SplitArg;
    use vmsys_arch::FormatId;

    #[test]
    fn every_format_has_a_layout() {
        for f in FormatId::ALL {
            let args = LayoutArgs {
                arch: f,
                mem: 256 << 20,
                ..LayoutArgs::default()
            };
            let r = compute(&args).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(r.sync.iter().filter(|s| s.active).count(), 1, "{f}");
            let active = r.sync.iter().find(|s| s.active).unwrap();
            let want = match f {
                FormatId::Arm64 => "shared root",
                FormatId::I386 => "propagated",
                _ => "preallocated top level",
            };
            assert_eq!(active.strategy, want, "{f}");
            if f == FormatId::I386 {
                assert_eq!(active.stores_per_growkernel, PMAPS, "one store per pmap");
            }
            let dmap = r.regions.iter().find(|g| g.name == "direct map").unwrap();
            assert_eq!(
                dmap.start.is_some(),
                !matches!(f, FormatId::I386 | FormatId::I386Pae)
            );
            let mut out = Vec::new();
            layout(&args, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("quick-map slots") && text.contains("kernel arena"),
                "{text}"
            );
        }
    }

    #[test]
    fn split_moves_the_kernel() {
        for (s, base) in [
            (SplitArg::G3G1, 0xC000_0000u64),
            (SplitArg::G2G2, 0x8000_0000),
            (SplitArg::G1G3, 0x4000_0000),
        ] {
            let args = LayoutArgs {
                arch: FormatId::I386Pae,
                split: Some(s),
                ..LayoutArgs::default()
            };
            let r = compute(&args).unwrap();
            assert_eq!(r.regions[1].start, Some(base));
            let mut out = Vec::new();
            layout(&LayoutArgs { json: true, ..args }, &mut out).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["split"], split_name(s.split()));
        }
    }

    #[test]
    fn split_on_64_bit_is_an_error() {
        let args = LayoutArgs {
            arch: FormatId::Amd64,
            split: Some(SplitArg::G2G2),
            ..LayoutArgs::default()
        };
        let e = compute(&args).unwrap_err();
        assert!(e.to_string().contains("32-bit"), "{e}");
    }
}
