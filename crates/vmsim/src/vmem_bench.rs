//! The vmem benchmark: what an alloc+free pair costs in vmsys's vmem, side by side with the
//! crates.io `vmem` crate (1.0, instant fit) doing the same.
//!
//! Rows: a pair on an empty arena; a pair through a quantum cache (checked frees, and
//! Bonwick's unchecked ones; the peer has no quantum caches, so its column repeats its plain
//! pair); and a pair under churn (free a random live segment of 1-8 pages, allocate a new one)
//! at 10^2, 10^4 and 10^6 live segments. The peer's churn is linear in the live count, so its
//! 10^6 row is skipped. Each figure is the median of 5 timed samples after a warm-up sample.
//!
//! Wall-clock numbers live here only; the tests check that rows are produced, never their
//! values (constant time is shown by counting work in vmsys's own tests).

use std::alloc::{alloc, dealloc, Layout};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys::vmem::{Arena, ArenaConfig, Policy};

const PAGE: u64 = 4096;
const SPAN: (u64, u64) = (1 << 32, 1 << 44);
/// Target: a pair on an empty arena, ns.
pub const TARGET_PAIR_NS: f64 = 50.0;
/// Target: a pair through a quantum cache, ns.
pub const TARGET_QCACHE_NS: f64 = 20.0;
/// Target: churn cost at 10^6 live over 10^2 live.
pub const TARGET_GROWTH: f64 = 1.5;

/// One row of the table.
#[derive(Clone, Debug)]
pub struct VmemRow {
    pub name: String,
    pub ours_ns: f64,
    pub peer: &'static str,
    pub peer_ns: Option<f64>,
}

const PEER: &str = "vmem 1.0 (crates.io)";

/// The peer allocates its boundary tags through this trait; the heap, one tag at a time.
struct HeapTags;

// SAFETY: `allocate` returns fresh heap memory of `Bt`'s size and alignment (or `None`), and
// `deallocate` frees exactly such a block with the same layout, as the trait requires.
unsafe impl vmem::Allocator for HeapTags {
    fn allocate(&self) -> Option<NonNull<vmem::Bt>> {
        // SAFETY: `Bt` is not zero-sized, so the layout is valid for `alloc`.
        NonNull::new(unsafe { alloc(Layout::new::<vmem::Bt>()) }.cast())
    }

    unsafe fn deallocate(&self, ptr: NonNull<vmem::Bt>) {
        // SAFETY: the caller passes a block from `allocate`, allocated with this layout.
        unsafe { dealloc(ptr.as_ptr().cast(), Layout::new::<vmem::Bt>()) }
    }
}

type Peer = vmem::Arena<'static, 'static, HeapTags, std::sync::Mutex<()>>;

fn peer_arena() -> Peer {
    let p = Peer::create("peer", PAGE as usize, None, HeapTags).expect("peer arena");
    p.add_span(SPAN.0 as usize, SPAN.1 as usize)
        .expect("peer span");
    p
}

fn our_arena() -> Arena {
    Arena::create("bench", SPAN.0, SPAN.1, PAGE).expect("arena")
}

/// Median over samples of the ns per iteration of `f(iters)`.
fn time(iters: u64, samples: usize, mut f: impl FnMut(u64)) -> f64 {
    f(iters); // warm-up
    let mut v: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            f(iters);
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ours_pair(a: &Arena, cpu: usize, size: u64, iters: u64) {
    for _ in 0..iters {
        let x = a.alloc_on(cpu, size, Policy::InstantFit).unwrap();
        a.free_on(cpu, black_box(x), size).unwrap();
    }
}

fn peer_pair(p: &Peer, iters: u64) {
    for _ in 0..iters {
        let x = p
            .alloc(PAGE as usize, vmem::AllocPolicy::InstantFit)
            .unwrap();
        p.free(black_box(x)).unwrap();
    }
}

/// Churn with our arena: `live` segments, then timed pairs.
fn ours_churn(live: usize, iters: u64, samples: usize) -> f64 {
    let a = our_arena();
    let mut rng = SmallRng::seed_from_u64(live as u64);
    let mut segs: Vec<(u64, u64)> = (0..live)
        .map(|_| {
            let s = rng.gen_range(1..=8u64) * PAGE;
            (a.alloc(s, Policy::InstantFit).unwrap(), s)
        })
        .collect();
    time(iters, samples, |n| {
        for _ in 0..n {
            let i = rng.gen_range(0..segs.len());
            let (x, s) = segs[i];
            a.free(x, s).unwrap();
            let s = rng.gen_range(1..=8u64) * PAGE;
            segs[i] = (a.alloc(s, Policy::InstantFit).unwrap(), s);
        }
    })
}

fn peer_churn(live: usize, iters: u64, samples: usize) -> f64 {
    let p = peer_arena();
    let mut rng = SmallRng::seed_from_u64(live as u64);
    let mut segs: Vec<usize> = (0..live)
        .map(|_| {
            let s = rng.gen_range(1..=8usize) * PAGE as usize;
            p.alloc(s, vmem::AllocPolicy::InstantFit).unwrap()
        })
        .collect();
    time(iters, samples, |n| {
        for _ in 0..n {
            let i = rng.gen_range(0..segs.len());
            p.free(segs[i]).unwrap();
            let s = rng.gen_range(1..=8usize) * PAGE as usize;
            segs[i] = p.alloc(s, vmem::AllocPolicy::InstantFit).unwrap();
        }
    })
}

/// Measure every row; `quick` for tests (few iterations, numbers meaningless).
pub fn measure(quick: bool) -> Vec<VmemRow> {
    let (iters, samples) = if quick { (2_000, 3) } else { (1_000_000, 5) };
    let mut rows = Vec::new();
    let peer = peer_arena();
    let peer_plain = time(iters / 10, samples, |n| peer_pair(&peer, n));

    let a = our_arena();
    rows.push(VmemRow {
        name: "alloc+free, empty arena (instant fit)".into(),
        ours_ns: time(iters, samples, |n| ours_pair(&a, 0, PAGE, n)),
        peer: PEER,
        peer_ns: Some(peer_plain),
    });

    for (trust, name) in [
        (false, "alloc+free through a quantum cache (checked frees)"),
        (
            true,
            "alloc+free through a quantum cache (unchecked, Bonwick's)",
        ),
    ] {
        let mut cfg = ArenaConfig::new("bench-q", PAGE)
            .span(SPAN.0, SPAN.1)
            .qcache(8 * PAGE, 1);
        cfg.verify_qcache_frees = !trust;
        let a = Arena::new(cfg).expect("arena");
        rows.push(VmemRow {
            name: format!("{name}; peer: no cache, plain pair"),
            ours_ns: time(iters, samples, |n| ours_pair(&a, 0, 2 * PAGE, n)),
            peer: PEER,
            peer_ns: Some(peer_plain),
        });
    }

    for live in [100usize, 10_000, 1_000_000] {
        let ours = ours_churn(live, iters / 4, samples);
        let peer_ns = (live <= 10_000).then(|| {
            let n = if quick {
                20
            } else {
                (2_000_000 / live as u64).clamp(100, 20_000)
            };
            peer_churn(live, n, samples)
        });
        let note = if peer_ns.is_none() {
            " (peer skipped: linear in live segments)"
        } else {
            ""
        };
        rows.push(VmemRow {
            name: format!("alloc+free under churn, {live} live{note}"),
            ours_ns: ours,
            peer: PEER,
            peer_ns,
        });
    }
    rows
}

/// The table as text.
pub fn table(rows: &[VmemRow]) -> String {
    let mut s = format!(
        "{:<80} {:>10} {:>12}  peer\n",
        "vmem operation", "vmsys ns", "peer ns"
    );
    for r in rows {
        let peer = r.peer_ns.map_or("-".to_string(), |p| format!("{p:.1}"));
        s += &format!(
            "{:<80} {:>10.1} {:>12}  {}\n",
            r.name, r.ours_ns, peer, r.peer
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_produces_finite_rows() {
        let rows = measure(true);
        assert_eq!(rows.len(), 6);
        for r in &rows {
            assert!(r.ours_ns.is_finite() && r.ours_ns > 0.0, "{r:?}");
            assert!(r.peer_ns.is_none_or(|p| p.is_finite() && p > 0.0), "{r:?}");
        }
        assert!(rows[5].peer_ns.is_none());
    }

    #[test]
    #[ignore = "wall-clock benchmark: run with --release -- --ignored --nocapture"]
    fn print_vmem_bench() {
        let rows = measure(false);
        println!("{}", table(&rows));
        let growth = rows[5].ours_ns / rows[3].ours_ns;
        println!(
            "targets: pair <= {TARGET_PAIR_NS} ns, qcache <= {TARGET_QCACHE_NS} ns, \
             growth 10^2 -> 10^6 <= {TARGET_GROWTH}x (measured {growth:.2}x)"
        );
    }
}
