//! `vmsim bench`: kernel memory. kmem_malloc + kmem_free of a superpage (with the rate at which
//! it ends as one superpage mapping) and of small sizes, a transient I/O map + unmap of a page
//! outside the direct map (pinned and can-fault), and a bounce copy, on a booted system
//! (`vmsys_sim::system::System`), amd64 and i386 (which has no direct map).

use vmsys::arch::FormatId;
use vmsys::kmem::KmemConfig;
use vmsys::{FrameSource, PmapConfig};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

use crate::timing::ns_per_iter;

/// One measurement (no peer: nothing else implements this layer on the same machine).
#[derive(Clone, Debug)]
pub struct KmemRow {
    pub name: String,
    pub ours_ns: f64,
}

/// The rows, and for each format the share of superpage allocations that ended promoted.
#[derive(Clone, Debug, Default)]
pub struct KmemBench {
    pub rows: Vec<KmemRow>,
    /// (format, promoted, allocations)
    pub promotion: Vec<(FormatId, u64, u64)>,
}

/// Time `iters` calls of `f` (given the call's index), `samples` times; the median ns per call.
fn time(iters: u64, samples: usize, mut f: impl FnMut(u64)) -> f64 {
    ns_per_iter(iters, samples, |n| (0..n).for_each(&mut f))
}

/// Run the benchmark (`quick`: a few iterations, for tests).
pub fn measure(quick: bool) -> Result<KmemBench, String> {
    let (iters, samples) = if quick { (4, 1) } else { (200, 5) };
    let mut out = KmemBench::default();
    for f in [FormatId::Amd64, FormatId::I386] {
        let s = System::boot(
            MachineConfig::new(f)
                .cpus(1)
                .mem(512 << 20)
                .direct_map_limit(256 << 20)
                .detector(DetectorMode::Off),
            PmapConfig::default(),
            KmemConfig::default(),
        )
        .map_err(|e| e.to_string())?;
        let name = f.name();
        let sp = s.kmem.superpage();
        // A frame outside the direct map, for the transient rows.
        let high = loop {
            let pa = FrameSource::alloc(&*s.buddy).ok_or("out of memory")?;
            if pa.as_u64() >= 256 << 20 {
                break pa;
            }
        };
        s.m.run_on(0, |_| -> Result<(), String> {
            let k = &s.kmem;
            let kpm = s.pmap.kernel_pmap();
            let (mut promoted, mut allocs) = (0, 0);
            let ns = time(iters / 4 + 1, samples, |_| {
                let va = k.kmem_malloc(sp, 0, false).expect("kmem_malloc");
                allocs += 1;
                if s.pmap.mapping(kpm, va).is_some_and(|m| m.size == sp) {
                    promoted += 1;
                }
                k.kmem_free(va, sp).expect("kmem_free");
            });
            out.rows.push(KmemRow {
                name: format!(
                    "{name}: kmem_malloc+kmem_free of {} MiB, per 4 KiB page",
                    sp >> 20
                ),
                ours_ns: ns / (sp / 4096) as f64,
            });
            out.promotion.push((f, promoted, allocs));
            for pages in [1u64, 4, 16] {
                let ns = time(iters * 4, samples, |_| {
                    let va = k.kmem_malloc(pages * 4096, 0, false).expect("kmem_malloc");
                    k.kmem_free(va, pages * 4096).expect("kmem_free");
                });
                out.rows.push(KmemRow {
                    name: format!("{name}: kmem_malloc+kmem_free of {pages} page(s)"),
                    ours_ns: ns,
                });
            }
            for can_fault in [false, true] {
                let ns = time(iters * 4, samples, |_| {
                    let m = k.map_io_transient(&[high], can_fault).expect("map");
                    k.unmap_io_transient(m).map_err(|(e, _)| e).expect("unmap");
                });
                out.rows.push(KmemRow {
                    name: format!(
                        "{name}: map_io_transient+unmap, page outside the direct map, {}",
                        if can_fault {
                            "can_fault (qenter)"
                        } else {
                            "pinned (local)"
                        }
                    ),
                    ours_ns: ns,
                });
            }
            let data = [0x5au8; 512];
            let ns = time(iters * 4, samples, |i| {
                k.bounce_to_phys(high, (i % 8) * 512, &data)
                    .expect("bounce");
            });
            out.rows.push(KmemRow {
                name: format!("{name}: bounce copy of 512 bytes to a page outside the direct map"),
                ours_ns: ns,
            });
            Ok(())
        })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_produces_rows_and_promotes() {
        let b = measure(true).unwrap();
        assert!(b
            .rows
            .iter()
            .all(|r| r.ours_ns.is_finite() && r.ours_ns > 0.0));
        for &(f, promoted, allocs) in &b.promotion {
            assert!(allocs > 0);
            assert_eq!(
                promoted, allocs,
                "{f:?}: every superpage allocation promotes"
            );
        }
    }
}
