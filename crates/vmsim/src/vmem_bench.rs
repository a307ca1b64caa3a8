//! The vmem benchmark: what an alloc+free pair costs in vmsys's vmem, side by side with the
//! crates.io `vmem` crate (1.0, instant fit) doing the same.
//!
//! Rows: a pair on an empty arena; a pair through a quantum cache (checked frees, and
//! Bonwick's unchecked ones; the peer has no quantum caches, so its column repeats its plain
//! pair); then churn at 10^2, 10^4 and 10^6 live segments of 1-8 pages, measured two ways:
//! (a) an alloc+free pair of a random size with N others live (the classic "cost at N live",
//! what the peer's own figures mean), and (b) freeing a random live segment and allocating a
//! replacement (every operation lands on a cold tag and hash slot: at 10^6 live this is bound
//! by cache and TLB misses, not by the algorithm's work, which stays flat). Sizes and victims
//! are generated before the timed loops. The peer's churn is linear in the live count, so its
//! 10^6 rows are skipped. Each figure is the median of 5 timed samples after a warm-up sample.
//!
//! Wall-clock numbers live here only; the tests check that rows are produced, never their
//! values (constant time is shown by counting work in vmsys's own tests).

use crate::timing::ns_per_iter;
use std::alloc::{alloc, dealloc, Layout};
use std::hint::black_box;
use std::ptr::NonNull;

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

/// Pre-generated churn inputs, so that the timed loops do no RNG work: victim indices into
/// the live vector and sizes in pages (1-8), cycled through with a mask.
struct Script {
    victims: Vec<u32>,
    pages: Vec<u8>,
}

const SCRIPT_LEN: usize = 1 << 16;

impl Script {
    fn new(live: usize, seed: u64) -> Script {
        let mut rng = SmallRng::seed_from_u64(seed);
        Script {
            victims: (0..SCRIPT_LEN)
                .map(|_| rng.gen_range(0..live as u32))
                .collect(),
            pages: (0..SCRIPT_LEN).map(|_| rng.gen_range(1..=8u8)).collect(),
        }
    }

    #[inline]
    fn at(&self, k: usize) -> (usize, u64) {
        let k = k & (SCRIPT_LEN - 1);
        (self.victims[k] as usize, self.pages[k] as u64 * PAGE)
    }
}

/// The two churn measures at `live` live segments (the arena is first fragmented by `live`
/// random-victim replacements, untimed): (a) an alloc+free pair of a random size with the
/// `live` others standing, the classic "cost with N live"; (b) free a random live segment and
/// allocate a replacement, which at 10^6 live touches tags and hash slots spread over tens of
/// megabytes and is bound by cache and TLB misses.
fn ours_churn(live: usize, iters: u64, samples: usize) -> (f64, f64) {
    let a = our_arena();
    let sc = Script::new(live, live as u64);
    let mut segs: Vec<(u64, u64)> = (0..live)
        .map(|k| {
            let s = sc.at(k).1;
            (a.alloc(s, Policy::InstantFit).unwrap(), s)
        })
        .collect();
    let mut k = 0usize;
    let replace = |k: usize, segs: &mut Vec<(u64, u64)>| {
        let (i, s) = sc.at(k);
        let (x, xs) = segs[i];
        a.free(x, xs).unwrap();
        segs[i] = (a.alloc(s, Policy::InstantFit).unwrap(), s);
    };
    for _ in 0..live {
        replace(k, &mut segs);
        k += 1;
    }
    let pair = ns_per_iter(iters, samples, |n| {
        for j in 0..n as usize {
            let s = sc.at(j).1;
            let x = a.alloc(s, Policy::InstantFit).unwrap();
            a.free(black_box(x), s).unwrap();
        }
    });
    let churn = ns_per_iter(iters, samples, |n| {
        for _ in 0..n {
            replace(k, &mut segs);
            k += 1;
        }
    });
    (pair, churn)
}

fn peer_churn(live: usize, iters: u64, samples: usize) -> (f64, f64) {
    let p = peer_arena();
    let sc = Script::new(live, live as u64);
    let mut segs: Vec<usize> = (0..live)
        .map(|k| {
            p.alloc(sc.at(k).1 as usize, vmem::AllocPolicy::InstantFit)
                .unwrap()
        })
        .collect();
    let mut k = 0usize;
    let replace = |k: usize, segs: &mut Vec<usize>| {
        let (i, s) = sc.at(k);
        p.free(segs[i]).unwrap();
        segs[i] = p.alloc(s as usize, vmem::AllocPolicy::InstantFit).unwrap();
    };
    for _ in 0..live {
        replace(k, &mut segs);
        k += 1;
    }
    let pair = ns_per_iter(iters, samples, |n| {
        for j in 0..n as usize {
            let s = sc.at(j).1 as usize;
            let x = p.alloc(s, vmem::AllocPolicy::InstantFit).unwrap();
            p.free(black_box(x)).unwrap();
        }
    });
    let churn = ns_per_iter(iters, samples, |n| {
        for _ in 0..n {
            replace(k, &mut segs);
            k += 1;
        }
    });
    (pair, churn)
}

/// Measure every row; `quick` for tests (few iterations, numbers meaningless).
pub fn measure(quick: bool) -> Vec<VmemRow> {
    let (iters, samples) = if quick { (2_000, 3) } else { (1_000_000, 5) };
    let mut rows = Vec::new();
    let peer = peer_arena();
    let peer_plain = ns_per_iter(iters / 10, samples, |n| peer_pair(&peer, n));

    let a = our_arena();
    rows.push(VmemRow {
        name: "alloc+free, empty arena (instant fit)".into(),
        ours_ns: ns_per_iter(iters, samples, |n| ours_pair(&a, 0, PAGE, n)),
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
            ours_ns: ns_per_iter(iters, samples, |n| ours_pair(&a, 0, 2 * PAGE, n)),
            peer: PEER,
            peer_ns: Some(peer_plain),
        });
    }

    let mut pairs = Vec::new();
    let mut churns = Vec::new();
    for live in [100usize, 10_000, 1_000_000] {
        let (pair, churn) = ours_churn(live, iters / 4, samples);
        let peer = (live <= 10_000).then(|| {
            let n = if quick {
                20
            } else {
                (2_000_000 / live as u64).clamp(100, 20_000)
            };
            peer_churn(live, n, samples)
        });
        let note = if peer.is_none() {
            " (peer skipped: linear in live segments)"
        } else {
            ""
        };
        pairs.push(VmemRow {
            name: format!("(a) alloc+free pair, {live} others live{note}"),
            ours_ns: pair,
            peer: PEER,
            peer_ns: peer.map(|p| p.0),
        });
        churns.push(VmemRow {
            name: format!("(b) free random victim + alloc, {live} live{note}"),
            ours_ns: churn,
            peer: PEER,
            peer_ns: peer.map(|p| p.1),
        });
    }
    rows.extend(pairs);
    rows.extend(churns);
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
        assert_eq!(rows.len(), 9);
        for r in &rows {
            assert!(r.ours_ns.is_finite() && r.ours_ns > 0.0, "{r:?}");
            assert!(r.peer_ns.is_none_or(|p| p.is_finite() && p > 0.0), "{r:?}");
        }
        assert!(rows[5].peer_ns.is_none() && rows[8].peer_ns.is_none());
    }

    #[test]
    #[ignore = "wall-clock benchmark: run with --release -- --ignored --nocapture"]
    fn print_vmem_bench() {
        let rows = measure(false);
        println!("{}", table(&rows));
        let growth_a = rows[5].ours_ns / rows[3].ours_ns;
        let growth_b = rows[8].ours_ns / rows[6].ours_ns;
        println!(
            "targets: pair <= {TARGET_PAIR_NS} ns, qcache <= {TARGET_QCACHE_NS} ns, \
             growth 10^2 -> 10^6 <= {TARGET_GROWTH}x; measured growth: \
             (a) pair with N live {growth_a:.2}x, (b) random-victim churn {growth_b:.2}x"
        );
    }
}
