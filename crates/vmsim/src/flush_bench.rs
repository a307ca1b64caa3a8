//! `vmsim bench`: where a ranged TLB invalidation should become a full one (the pmap's
//! `flush_ceiling`). For each count N, CPU 0 unmaps N pages of an address space that CPU 1 has
//! loaded with a working set of 512 pages in its TLB; the time counted is the unmap with its
//! shootdown plus CPU 1 touching its working set again (what a full flush costs it: refills).
//! Two identical systems differ only in the ceiling: one always invalidates page by page, the
//! other always flushes the whole address space. The crossover is the smallest N from which the
//! full flush is no slower at every larger N. On this simulator a walk is cheap relative to real
//! hardware, so the crossover says where *the simulator* breaks even; Linux uses 33 (perf.md).

use std::time::Instant;

use vmsys::arch::{FormatId, Prot};
use vmsys::kmem::KmemConfig;
use vmsys::{EnterFlags, FrameSource, PhysAddr, PmapConfig, VirtAddr};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

use crate::timing::median;

const WS: u64 = 512;
const PAGE: u64 = 4096;

/// One count: ns per round with ranged and with full invalidation.
#[derive(Clone, Copy, Debug)]
pub struct FlushRow {
    pub pages: u64,
    pub ranged_ns: f64,
    pub full_ns: f64,
}

/// The table and the crossover: the smallest count from which a full flush is never slower
/// (None if ranged was faster at the largest count).
#[derive(Clone, Debug)]
pub struct FlushBench {
    pub rows: Vec<FlushRow>,
    pub crossover: Option<u64>,
    pub default_ceiling: u64,
}

fn boot(ceiling: u64) -> Result<System, String> {
    System::boot(
        MachineConfig::new(FormatId::Amd64)
            .cpus(2)
            .mem(256 << 20)
            .detector(DetectorMode::Off),
        PmapConfig {
            flush_ceiling: ceiling,
            ..PmapConfig::default()
        },
        KmemConfig::default(),
    )
    .map_err(|e| e.to_string())
}

/// ns per round of: unmap `n` of the working set's pages from CPU 0, CPU 1 re-reads its
/// working set; then (untimed) the pages are mapped again.
fn rounds(s: &System, n: u64, reps: u32) -> Result<f64, String> {
    let pm = s.pmap.create().map_err(|e| e.to_string())?;
    let base = 0x10_0000_0000u64;
    let frames: Vec<PhysAddr> = (0..WS)
        .map(|_| FrameSource::alloc(&*s.buddy).ok_or("out of memory"))
        .collect::<Result<_, _>>()?;
    let map = |from: u64, to: u64| {
        for i in from..to {
            s.pmap
                .enter(
                    &pm,
                    VirtAddr::new(base + i * PAGE),
                    frames[i as usize],
                    Prot::USER,
                    EnterFlags::NO_PROMOTE,
                    0,
                )
                .expect("enter");
        }
    };
    s.m.run_on(0, |_| {
        s.pmap.activate(&pm).unwrap();
        map(0, WS);
    });
    let touch = || {
        s.m.run_on(1, |c| {
            c.set_user(true);
            for i in 0..WS {
                let _ = c.read_u64(base + i * PAGE);
            }
            c.set_user(false);
        })
    };
    s.m.run_on(1, |_| s.pmap.activate(&pm).unwrap());
    touch();
    let mut total = 0.0;
    for _ in 0..reps {
        let t = Instant::now();
        s.m.run_on(0, |_| {
            s.pmap
                .remove(&pm, VirtAddr::new(base), VirtAddr::new(base + n * PAGE))
                .expect("remove")
        });
        touch();
        total += t.elapsed().as_nanos() as f64;
        s.m.run_on(0, |_| map(0, n));
        touch();
    }
    s.m.run_on(0, |_| {
        s.pmap
            .remove(&pm, VirtAddr::new(base), VirtAddr::new(base + WS * PAGE))
            .expect("remove");
    });
    for c in 0..2 {
        s.m.run_on(c, |_| s.pmap.activate(s.pmap.kernel_pmap()).unwrap());
    }
    s.m.run_on(0, |_| s.pmap.destroy(pm))
        .map_err(|e| e.to_string())?;
    for f in frames {
        FrameSource::free(&*s.buddy, f).map_err(|e| e.to_string())?;
    }
    Ok(total / reps as f64)
}

/// Run it (`quick`: fewer counts and repetitions, for tests).
pub fn measure(quick: bool) -> Result<FlushBench, String> {
    let ranged = boot(u64::MAX)?;
    let full = boot(0)?;
    let counts: &[u64] = if quick {
        &[1, 64]
    } else {
        &[1, 4, 16, 32, 64, 128, 512]
    };
    let reps = if quick { 2 } else { 8 };
    let mut rows = Vec::new();
    for &n in counts {
        // Interleave the two, so that machine noise hits both alike.
        let mut r = Vec::new();
        let mut f = Vec::new();
        for _ in 0..if quick { 1 } else { 3 } {
            r.push(rounds(&ranged, n, reps)?);
            f.push(rounds(&full, n, reps)?);
        }
        rows.push(FlushRow {
            pages: n,
            ranged_ns: median(&r),
            full_ns: median(&f),
        });
    }
    // The smallest count from which the full flush stays no slower at every larger count (a
    // single noisy small count does not decide it).
    let crossover = rows
        .iter()
        .rev()
        .take_while(|r| r.full_ns <= r.ranged_ns)
        .last()
        .map(|r| r.pages);
    Ok(FlushBench {
        rows,
        crossover,
        default_ceiling: PmapConfig::default().flush_ceiling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test --release -p vmsim --lib flush_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn print_flush_bench() {
        let b = measure(false).unwrap();
        for r in &b.rows {
            println!(
                "{:4} pages: ranged {:9.0} ns  full {:9.0} ns",
                r.pages, r.ranged_ns, r.full_ns
            );
        }
        println!(
            "crossover: {:?} (default ceiling {})",
            b.crossover, b.default_ceiling
        );
    }

    #[test]
    fn quick_run_measures_both_ways() {
        let b = measure(true).unwrap();
        assert_eq!(b.rows.len(), 2);
        assert!(b
            .rows
            .iter()
            .all(|r| r.ranged_ns.is_finite() && r.full_ns.is_finite()));
    }
}
