//! Unit tests of the arena as a whole (the pieces have their own beside them).

use super::*;
use alloc::vec;
use core::sync::atomic::{AtomicU64, Ordering};

const Q: u64 = 0x1000;
const IF: Policy = Policy::InstantFit;

fn arena(base: u64, size: u64) -> Arena {
    Arena::create("test", base, size, Q).unwrap()
}

fn audit(a: &Arena) {
    if let Err(e) = a.audit() {
        panic!("audit: {e}");
    }
}

#[test]
fn arena_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Arena>();
}

#[test]
fn bad_configurations_are_errors() {
    assert_eq!(
        Arena::create("x", 0, 0, 3).unwrap_err(),
        VmemError::BadQuantum(3)
    );
    let e = Arena::new(ArenaConfig::new("x", Q).qcache(Q + 1, 1)).unwrap_err();
    assert!(matches!(e, VmemError::BadQcacheMax { .. }));
    let e = Arena::new(ArenaConfig::new("x", Q).qcache(Q * 65, 1)).unwrap_err();
    assert!(matches!(e, VmemError::BadQcacheMax { .. }));
    let e = Arena::new(ArenaConfig::new("x", Q).qcache(Q, 0)).unwrap_err();
    assert_eq!(e, VmemError::NoCpus);
    let parent: Arc<dyn VmemSource> = Arc::new(arena(0, 1 << 30));
    let e = Arena::new(ArenaConfig::new("x", Q).source(parent, Q + 8)).unwrap_err();
    assert!(matches!(e, VmemError::BadImportQuantum { .. }));
    assert!(matches!(
        Arena::create("x", 1, Q, Q).unwrap_err(),
        VmemError::Unaligned { .. }
    ));
    assert!(alloc::format!("{e}").contains("import quantum"));
}

#[test]
fn spans_are_checked_and_never_overlap() {
    let a = arena(0x10_0000, 0x10_0000);
    assert_eq!(
        a.add(0x18_0000, Q),
        Err(VmemError::SpanOverlap {
            base: 0x18_0000,
            size: Q
        })
    );
    assert_eq!(
        a.add(0x0f_f000, 2 * Q),
        Err(VmemError::SpanOverlap {
            base: 0x0f_f000,
            size: 2 * Q
        })
    );
    assert_eq!(a.add(0x30_0000, 0), Err(VmemError::ZeroSize));
    assert!(matches!(
        a.add(0x30_0001, Q),
        Err(VmemError::Unaligned { .. })
    ));
    assert!(matches!(
        a.add(u64::MAX - Q + 1, Q),
        Err(VmemError::SpanWraps { .. })
    ));
    // Adjacent spans are fine, and added out of order they are kept sorted.
    a.add(0x20_0000, Q).unwrap();
    a.add(0x0f_f000, Q).unwrap();
    a.add(0, Q).unwrap();
    audit(&a);
    assert_eq!(a.stats().total, 0x10_0000 + 3 * Q);
}

#[test]
fn alloc_rounds_to_the_quantum_and_exhausts_with_an_error() {
    let a = arena(0x1000_0000, 4 * Q);
    let x = a.alloc(1, IF).unwrap();
    assert_eq!(a.free(x, 1), Ok(()));
    let x = a.alloc(3 * Q + 1, IF).unwrap();
    assert_eq!(a.alloc(1, IF), Err(VmemError::Exhausted { size: Q }));
    assert_eq!(a.alloc(0, IF), Err(VmemError::ZeroSize));
    assert!(matches!(
        a.alloc(u64::MAX, IF),
        Err(VmemError::SizeOverflow { .. })
    ));
    assert_eq!(a.stats().in_use, 4 * Q);
    a.free(x, 4 * Q).unwrap();
    audit(&a);
    let empty = Arena::create("empty", 0, 0, Q).unwrap();
    assert_eq!(
        empty.alloc(Q, Policy::BestFit),
        Err(VmemError::Exhausted { size: Q })
    );
    assert_eq!(
        empty.alloc(Q, Policy::NextFit),
        Err(VmemError::Exhausted { size: Q })
    );
}

/// Free segments of 1, 3 and 8 quanta (separated by allocated ones) and a large tail.
fn holes() -> (Arena, [u64; 3]) {
    let a = arena(0, 64 * Q);
    let mut segs = vec![];
    for n in [1, 1, 3, 1, 8, 1] {
        segs.push(a.alloc(n * Q, IF).unwrap());
    }
    for &i in &[0usize, 2, 4] {
        let n = [1, 1, 3, 1, 8, 1][i];
        a.free(segs[i], n * Q).unwrap();
    }
    audit(&a);
    (a, [segs[0], segs[2], segs[4]])
}

#[test]
fn instant_fit_takes_a_list_whose_every_segment_fits() {
    let (a, [_, three, eight]) = holes();
    // 3 quanta is not a power of two: list [4, 8) quanta is empty, so list [8, 16) — the
    // 8-quantum hole — not the exact-fit 3-quantum hole.
    assert_eq!(a.alloc(3 * Q, IF).unwrap(), eight);
    // 2 quanta is a power of two: list [2, 4) holds the 3-quantum hole, all of which fit.
    assert_eq!(a.alloc(2 * Q, IF).unwrap(), three);
    audit(&a);
}

#[test]
fn instant_fit_falls_back_to_searching_the_exact_list() {
    let a = arena(0, 8 * Q);
    let x = a.alloc(3 * Q, IF).unwrap();
    let _y = a.alloc(5 * Q, IF).unwrap();
    a.free(x, 3 * Q).unwrap();
    // Only a 3-quantum hole: no list guarantees 3 quanta, the exact list has one that fits.
    assert_eq!(a.alloc(3 * Q, IF).unwrap(), x);
}

#[test]
fn best_fit_takes_the_smallest_that_fits() {
    let (a, [one, three, _]) = holes();
    assert_eq!(a.alloc(3 * Q, Policy::BestFit).unwrap(), three);
    assert_eq!(a.alloc(Q, Policy::BestFit).unwrap(), one);
    audit(&a);
}

#[test]
fn next_fit_cycles_through_the_address_space() {
    let a = arena(0, 4 * Q);
    let nf = Policy::NextFit;
    let mut seen = vec![];
    for _ in 0..8 {
        let x = a.alloc(Q, nf).unwrap();
        seen.push(x);
        a.free(x, Q).unwrap();
        audit(&a);
    }
    assert_eq!(seen, [0, Q, 2 * Q, 3 * Q, 0, Q, 2 * Q, 3 * Q]);
    // The rotor survives its segment being merged away.
    let x = a.alloc(Q, nf).unwrap();
    let y = a.alloc(Q, nf).unwrap();
    a.free(x, Q).unwrap();
    a.free(y, Q).unwrap();
    assert_eq!(a.alloc(Q, nf).unwrap(), 2 * Q);
}

#[test]
fn xalloc_honours_constraints_and_rejects_bad_arguments() {
    let a = arena(0x10_0000, 0x100_0000);
    let x = a
        .xalloc(Q, 0x10_0000, 0x3000, 0, ADDR_MIN, ADDR_MAX, IF)
        .unwrap();
    assert_eq!(x % 0x10_0000, 0x3000);
    let y = a
        .xalloc(0x8000, 0, 0, 0x10000, 0x10_9000, ADDR_MAX, IF)
        .unwrap();
    assert_eq!(y, 0x11_0000, "would cross 0x110000 at 0x109000");
    let z = a
        .xalloc(Q, 0, 0, 0, 0x50_0000, 0x50_0fff, Policy::BestFit)
        .unwrap();
    assert_eq!(z, 0x50_0000);
    let n = a
        .xalloc(Q, 0x2000, 0, 0, 0x60_0000, ADDR_MAX, Policy::NextFit)
        .unwrap();
    assert!(n >= 0x60_0000 && n.is_multiple_of(0x2000));
    assert_eq!(
        a.xalloc(2 * Q, 0, 0, 0, 0x50_1000, 0x50_1fff, IF),
        Err(VmemError::Exhausted { size: 2 * Q })
    );
    assert!(matches!(
        a.xalloc(Q, 3 * Q, 0, 0, 0, ADDR_MAX, IF),
        Err(VmemError::BadAlign { .. })
    ));
    assert!(matches!(
        a.xalloc(Q, Q / 2, 0, 0, 0, ADDR_MAX, IF),
        Err(VmemError::BadAlign { .. })
    ));
    assert!(matches!(
        a.xalloc(Q, 2 * Q, 2 * Q, 0, 0, ADDR_MAX, IF),
        Err(VmemError::BadPhase { .. })
    ));
    assert!(matches!(
        a.xalloc(Q, 2 * Q, 8, 0, 0, ADDR_MAX, IF),
        Err(VmemError::BadPhase { .. })
    ));
    assert!(matches!(
        a.xalloc(4 * Q, 0, 0, 2 * Q, 0, ADDR_MAX, IF),
        Err(VmemError::BadNocross { .. })
    ));
    assert!(matches!(
        a.xalloc(Q, 0, 0, 3 * Q, 0, ADDR_MAX, IF),
        Err(VmemError::BadNocross { .. })
    ));
    assert!(matches!(
        a.xalloc(Q, 0, 0, 0, 2 * Q, Q, IF),
        Err(VmemError::BadRange { .. })
    ));
    for (p, s) in [(x, Q), (y, 0x8000), (z, Q), (n, Q)] {
        a.free(p, s).unwrap();
    }
    audit(&a);
    assert_eq!(a.stats().free, 0x100_0000);
}

#[test]
fn frees_coalesce_within_spans_but_never_across() {
    let a = arena(0, 4 * Q);
    a.add(4 * Q, 4 * Q).unwrap();
    let xs: Vec<u64> = (0..8).map(|_| a.alloc(Q, IF).unwrap()).collect();
    for &x in xs.iter().rev().step_by(2).chain(xs.iter().step_by(2)) {
        a.free(x, Q).unwrap();
        audit(&a);
    }
    // Two spans, one free segment each: an 8-quantum request cannot be served.
    assert!(a.alloc(8 * Q, IF).is_err());
    assert_eq!(a.alloc(4 * Q, IF).map(|x| x % (4 * Q)), Ok(0));
}

#[test]
fn bad_frees_are_rejected_and_change_nothing() {
    let a = arena(0, 16 * Q);
    let x = a.alloc(2 * Q, IF).unwrap();
    let y = a.alloc(2 * Q, IF).unwrap();
    let before = a.stats();
    assert_eq!(
        a.free(x, Q),
        Err(VmemError::WrongSize {
            addr: x,
            size: Q,
            actual: 2 * Q
        })
    );
    assert_eq!(
        a.free(x + Q, Q),
        Err(VmemError::NotAllocated { addr: x + Q })
    );
    assert_eq!(
        a.free(10 * Q, Q),
        Err(VmemError::NotAllocated { addr: 10 * Q })
    );
    assert_eq!(
        a.free(100 * Q, Q),
        Err(VmemError::NotAllocated { addr: 100 * Q })
    );
    assert_eq!(a.free(x, 0), Err(VmemError::ZeroSize));
    a.free(y, 2 * Q).unwrap();
    assert_eq!(a.free(y, 2 * Q), Err(VmemError::NotAllocated { addr: y }));
    let e = a.free(x, Q).unwrap_err();
    assert!(alloc::format!("{e}").contains("bad free"));
    let after = a.stats();
    assert_eq!(
        (after.in_use, after.live),
        (before.in_use - 2 * Q, before.live - 1)
    );
    audit(&a);
}

/// A source over a counter that can be told to fail, recording balance.
struct TestSource {
    next: AtomicU64,
    fail: AtomicU64,
    out: AtomicU64,
    imports: AtomicU64,
    releases: AtomicU64,
}

impl TestSource {
    fn new() -> Arc<TestSource> {
        Arc::new(TestSource {
            next: AtomicU64::new(0x1_0000_0000),
            fail: AtomicU64::new(0),
            out: AtomicU64::new(0),
            imports: AtomicU64::new(0),
            releases: AtomicU64::new(0),
        })
    }
}

impl VmemSource for TestSource {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError> {
        if self.fail.load(Ordering::Relaxed) != 0 {
            return Err(VmemError::ImportFailed { size });
        }
        let base = self
            .next
            .fetch_add(size + align + 0x10_0000, Ordering::Relaxed);
        let base = base.div_ceil(align) * align;
        self.out.fetch_add(size, Ordering::Relaxed);
        self.imports.fetch_add(1, Ordering::Relaxed);
        Ok(base)
    }

    fn release(&self, _base: u64, size: u64) {
        self.out.fetch_sub(size, Ordering::Relaxed);
        self.releases.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn imports_are_rounded_released_when_free_and_balanced() {
    let src = TestSource::new();
    let a = Arena::new(ArenaConfig::new("child", Q).source(src.clone(), 16 * Q)).unwrap();
    let x = a.alloc(Q, IF).unwrap();
    assert_eq!(src.out.load(Ordering::Relaxed), 16 * Q);
    let y = a.alloc(Q, IF).unwrap();
    assert_eq!(
        src.imports.load(Ordering::Relaxed),
        1,
        "served from the first import"
    );
    let big = a
        .xalloc(20 * Q, 0x10_0000, 0, 0, ADDR_MIN, ADDR_MAX, IF)
        .unwrap();
    assert_eq!(big % 0x10_0000, 0);
    assert_eq!(a.stats().imported, 16 * Q + 32 * Q);
    audit(&a);
    a.free(big, 20 * Q).unwrap();
    assert_eq!(src.releases.load(Ordering::Relaxed), 1);
    a.free(x, Q).unwrap();
    a.free(y, Q).unwrap();
    assert_eq!(src.out.load(Ordering::Relaxed), 0);
    let s = a.stats();
    assert_eq!((s.total, s.imported, s.imports, s.releases), (0, 0, 2, 2));
    audit(&a);
    // A constraint the fresh span cannot meet: the span goes straight back.
    let e = a.xalloc(Q, 0, 0, 0, 0, 0x1000_0000, IF);
    assert_eq!(e, Err(VmemError::Exhausted { size: Q }));
    assert_eq!(src.out.load(Ordering::Relaxed), 0);
    audit(&a);
}

#[test]
fn a_failing_source_is_an_error_and_leaks_nothing() {
    let src = TestSource::new();
    src.fail.store(1, Ordering::Relaxed);
    let a = Arena::new(ArenaConfig::new("child", Q).source(src.clone(), 0)).unwrap();
    assert_eq!(a.alloc(Q, IF), Err(VmemError::ImportFailed { size: Q }));
    assert_eq!(
        a.stats(),
        VmemStats {
            work: a.stats().work,
            ..VmemStats::default()
        }
    );
    audit(&a);
}

#[test]
fn an_arena_that_keeps_imports_never_releases() {
    let src = TestSource::new();
    let a = Arena::new(
        ArenaConfig::new("kva", Q)
            .source(src.clone(), 512 * Q)
            .keep_imports(),
    )
    .unwrap();
    let x = a.alloc(Q, IF).unwrap();
    a.free(x, Q).unwrap();
    assert_eq!(src.out.load(Ordering::Relaxed), 512 * Q);
    assert_eq!(a.stats().free, 512 * Q);
    audit(&a);
    drop(a);
    assert_eq!(
        src.out.load(Ordering::Relaxed),
        0,
        "destroying the arena releases its spans"
    );
}

#[test]
fn arenas_stack_on_arenas() {
    let parent = Arc::new(arena(0x4000_0000, 0x1000_0000));
    let child = Arena::new(ArenaConfig::new("child", Q).source(parent.clone(), 64 * Q)).unwrap();
    let xs: Vec<u64> = (0..100).map(|_| child.alloc(3 * Q, IF).unwrap()).collect();
    assert_eq!(parent.stats().in_use, child.stats().imported);
    for x in xs {
        child.free(x, 3 * Q).unwrap();
    }
    assert_eq!(parent.stats().in_use, 0);
    audit(&parent);
    audit(&child);
}

fn qarena(trust: bool) -> Arena {
    let mut cfg = ArenaConfig::new("q", Q).span(0, 1024 * Q).qcache(4 * Q, 2);
    cfg.verify_qcache_frees = !trust;
    Arena::new(cfg).unwrap()
}

#[test]
fn quantum_caches_serve_small_sizes_per_cpu() {
    let a = qarena(false);
    let x = a.alloc_on(1, 2 * Q, IF).unwrap();
    a.free_on(1, x, 2 * Q).unwrap();
    let s = a.stats();
    assert_eq!((s.cached, s.in_use, s.live), (2 * Q, 0, 0));
    // Same CPU: served from its magazine, without the arena's free lists.
    assert_eq!(a.alloc_on(1, 2 * Q, IF).unwrap(), x);
    a.free_on(0, x, 2 * Q).unwrap();
    assert_eq!(a.alloc_on(0, 2 * Q, IF).unwrap(), x);
    assert_eq!(
        a.alloc_on(2, Q, IF),
        Err(VmemError::BadCpu { cpu: 2, ncpu: 2 })
    );
    audit(&a);
    a.free_on(0, x, 2 * Q).unwrap();
    assert_eq!(a.reap(), 1);
    let s = a.stats();
    assert_eq!((s.cached, s.free), (0, 1024 * Q));
    audit(&a);
}

#[test]
fn quantum_cache_double_frees_are_rejected() {
    let a = qarena(false);
    let x = a.alloc_on(0, Q, IF).unwrap();
    a.free_on(0, x, Q).unwrap();
    assert_eq!(a.free_on(1, x, Q), Err(VmemError::AlreadyFree { addr: x }));
    assert_eq!(
        a.free_on(0, x + Q, Q),
        Err(VmemError::NotAllocated { addr: x + Q })
    );
    let y = a.alloc(3 * Q, IF).unwrap();
    assert_eq!(
        a.free(y, 2 * Q),
        Err(VmemError::WrongSize {
            addr: y,
            size: 2 * Q,
            actual: 3 * Q
        })
    );
    audit(&a);
    a.free(y, 3 * Q).unwrap();
    a.drain();
    assert_eq!(a.stats().free, 1024 * Q);
}

#[test]
fn trusted_quantum_caches_work_and_drain() {
    let a = qarena(true);
    let xs: Vec<u64> = (0..100)
        .map(|k| a.alloc_on(k % 2, Q, IF).unwrap())
        .collect();
    for (k, &x) in xs.iter().enumerate() {
        a.free_on(k % 2, x, Q).unwrap();
    }
    assert_eq!(a.stats().cached, 100 * Q);
    audit(&a);
    assert_eq!(a.drain(), 100);
    assert_eq!(a.stats().free, 1024 * Q);
    audit(&a);
}

#[test]
fn exhaustion_reaps_the_quantum_caches() {
    let a = Arena::new(ArenaConfig::new("q", Q).span(0, 8 * Q).qcache(Q, 1)).unwrap();
    let xs: Vec<u64> = (0..8).map(|_| a.alloc(Q, IF).unwrap()).collect();
    for x in xs {
        a.free(x, Q).unwrap();
    }
    assert_eq!(a.stats().free, 0);
    // All 8 quanta sit in the cache; a 2-quantum request reaps them.
    let y = a.alloc(2 * Q, IF).unwrap();
    assert_eq!(a.stats().cached, 0);
    a.free(y, 2 * Q).unwrap();
    audit(&a);
}

#[test]
fn free_is_constant_work_with_many_live_segments() {
    let a = arena(0, 1 << 40);
    let xs: Vec<u64> = (0..20_000).map(|_| a.alloc(Q, IF).unwrap()).collect();
    audit(&a);
    let w0 = a.work();
    for &x in xs.iter().step_by(2) {
        a.free(x, Q).unwrap();
    }
    let per_free = (a.work() - w0) as f64 / 10_000.0;
    assert!(per_free < 8.0, "{per_free} steps per free");
    audit(&a);
}

#[test]
fn checked_cache_frees_without_the_arena_lock_still_reject_bad_frees() {
    let a = qarena(false);
    // Warm the cache with more than an outstanding set's worth of segments.
    let n = 2 * qcache::OUT_MAX;
    let xs: Vec<u64> = (0..n).map(|_| a.alloc_on(0, Q, IF).unwrap()).collect();
    for &x in &xs {
        a.free_on(0, x, Q).unwrap();
    }
    // Out through the cache: the oldest are evicted from CPU 0's set back to the arena.
    let ys: Vec<u64> = (0..n).map(|_| a.alloc_on(0, Q, IF).unwrap()).collect();
    audit(&a);
    // A fast-path free, then its double free on either CPU.
    a.free_on(0, ys[n - 1], Q).unwrap();
    assert_eq!(
        a.free_on(0, ys[n - 1], Q),
        Err(VmemError::AlreadyFree { addr: ys[n - 1] })
    );
    assert_eq!(
        a.free_on(1, ys[n - 1], Q),
        Err(VmemError::AlreadyFree { addr: ys[n - 1] })
    );
    // Wrong size and interior frees of outstanding segments.
    assert!(matches!(
        a.free_on(0, ys[n - 2], 2 * Q),
        Err(VmemError::WrongSize { .. })
    ));
    assert!(a.free_on(0, ys[n - 2] + 1, Q).is_err());
    // Freed on another CPU (claimed from CPU 0's set), past the cache (xfree), and evicted.
    a.free_on(1, ys[n - 2], Q).unwrap();
    assert_eq!(
        a.free_on(1, ys[n - 2], Q),
        Err(VmemError::AlreadyFree { addr: ys[n - 2] })
    );
    a.xfree(ys[n - 3], Q).unwrap();
    assert_eq!(
        a.xfree(ys[n - 3], Q),
        Err(VmemError::NotAllocated { addr: ys[n - 3] })
    );
    a.free_on(0, ys[0], Q).unwrap();
    assert_eq!(
        a.free_on(0, ys[0], Q),
        Err(VmemError::AlreadyFree { addr: ys[0] })
    );
    audit(&a);
    for &y in &ys[1..n - 3] {
        a.free_on(1, y, Q).unwrap();
    }
    audit(&a);
    a.drain();
    assert_eq!(a.stats().free, 1024 * Q);
    audit(&a);
}
