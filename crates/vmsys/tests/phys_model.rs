//! The physical-memory layer against a model: the buddy allocator and the reservation system,
//! random operations in random order on several domains and objects, audited after every step;
//! and the named scenarios (reservation contiguity, breaking under pressure, contiguous
//! allocation constraints, bad frees, fault injection, domain fallback, concurrency).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use vmsys::frames::{FrameError, FrameSource};
use vmsys::page::{ObjectId, PageArray};
use vmsys::phys::{BuddyAllocator, DomainPolicy, PhysError, ReservError, ReservSystem, MAX_ORDER};
use vmsys::platform::PhysSegment;
use vmsys::{PhysAddr, PAGE_SIZE};

const MB: u64 = 1 << 20;

fn system(segs: &[PhysSegment], order: usize) -> ReservSystem {
    let pages = Arc::new(PageArray::new(segs));
    ReservSystem::new(Arc::new(BuddyAllocator::new(pages)), order)
}

fn pa(x: u64) -> PhysAddr {
    PhysAddr::new(x)
}

/// Everything the allocators own, as seen from outside.
fn snapshot(r: &ReservSystem) -> (Vec<(PhysAddr, u8)>, u64, vmsys::phys::ReservStats) {
    (
        r.buddy().free_blocks(),
        r.buddy().allocated_pages(),
        r.stats(),
    )
}

// -------------------------------------------------------------------------------------------
// Named scenarios.

/// RSV-1: a reservation filled in random order is one physically contiguous, aligned run, so
/// the pmap may promote it; the superpage index is set on its first frame once full.
#[test]
fn reservation_filled_in_random_order_is_contiguous_and_aligned() {
    for order in [9usize, 10] {
        let r = system(&[PhysSegment::new(0x1000, 24 * MB, 0)], order);
        let n = 1u64 << order;
        let obj = ObjectId(9);
        let first = 3 * n;
        let mut idx: Vec<u64> = (0..n).collect();
        idx.shuffle(&mut SmallRng::seed_from_u64(order as u64));
        let mut got = BTreeMap::new();
        for (k, &i) in idx.iter().enumerate() {
            let p = r.alloc_page(obj, first + i, 0).unwrap();
            got.insert(i, p);
            assert_eq!(r.is_fully_populated(p), k + 1 == n as usize);
        }
        let base = got[&0];
        assert!(
            base.is_aligned(n * PAGE_SIZE),
            "{base} not aligned for order {order}"
        );
        for (&i, &p) in &got {
            assert_eq!(p, base + i * PAGE_SIZE);
            assert_eq!(r.buddy().pages().meta(p).owner(), Some((obj, first + i)));
        }
        let info = r.reservation_of(base).unwrap();
        assert_eq!(
            (info.base, info.popcnt as u64, info.first_pindex),
            (base, n, first)
        );
        assert_eq!(r.buddy().pages().meta(base).psind(), 1);
        assert_eq!(r.stats().full, 1);
        assert!(r.lru(0).is_empty(), "a full reservation is on no LRU queue");
        r.audit().unwrap();
        // Emptied in random order: partial again, then its block returns whole.
        idx.shuffle(&mut SmallRng::seed_from_u64(99));
        for &i in &idx {
            r.free_page(got[&i]).unwrap();
            r.audit().unwrap();
        }
        assert_eq!(r.stats().active, 0);
        assert_eq!(r.buddy().free_blocks(), r.buddy().initial_blocks());
    }
}

/// RSV-4: with no free block and no free frame, the least recently changed partial reservation
/// is broken: its unpopulated frames return to the buddy allocator and serve the allocation;
/// its populated frames stay allocated as ordinary frames.
#[test]
fn partial_reservation_is_broken_under_memory_pressure() {
    let r = system(&[PhysSegment::new(0, 6 * MB, 0)], 9);
    let (a, b, c) = (ObjectId(1), ObjectId(2), ObjectId(3));
    let pb = r.alloc_page(b, 0, 0).unwrap(); // oldest
    let pa0 = r.alloc_page(a, 0, 0).unwrap();
    let pa1 = r.alloc_page(a, 1, 0).unwrap();
    let z = r.buddy().alloc(0, 9).unwrap();
    assert_eq!(r.buddy().total_free_pages(), 0);
    assert_eq!(
        r.lru(0),
        vec![
            r.reservation_of(pb).unwrap().base,
            r.reservation_of(pa0).unwrap().base
        ]
    );
    // Memory is exhausted: C's page comes from B's broken reservation.
    let pc = r.alloc_page(c, 0, 0).unwrap();
    let s = r.stats();
    assert_eq!(
        (s.broken, s.active, s.partial, s.fallback_pages),
        (1, 1, 1, 1)
    );
    assert!(r.reservation_of(pb).is_none());
    assert!(
        r.reservation_of(pa0).is_some(),
        "only the LRU head is broken"
    );
    assert_eq!(pc.as_u64() & !(2 * MB - 1), pb.as_u64() & !(2 * MB - 1));
    assert_eq!(
        r.buddy().total_free_pages(),
        510,
        "511 frames returned, one used"
    );
    assert_eq!(
        r.buddy().pages().meta(pb).owner(),
        Some((b, 0)),
        "populated frame kept"
    );
    assert_eq!(r.buddy().pages().meta(pc).owner(), Some((c, 0)));
    r.audit().unwrap();
    // The broken reservation's frames are ordinary now: freed one by one, they coalesce.
    for p in [pb, pc, pa0, pa1] {
        r.free_page(p).unwrap();
        r.audit().unwrap();
    }
    r.buddy().free(z, 9).unwrap();
    assert_eq!(r.buddy().free_blocks(), r.buddy().initial_blocks());
    // Nothing left to break and nothing free: an error, not a panic.
    let big: Vec<_> = (0..3).map(|_| r.buddy().alloc(0, 9).unwrap()).collect();
    assert_eq!(r.alloc_page(c, 0, 0), Err(ReservError::NoMemory));
    for p in big {
        r.buddy().free(p, 9).unwrap();
    }
    r.audit().unwrap();
}

/// PHYS-6: contiguous runs honour range, alignment and boundary, may span several free blocks,
/// and impossible requests fail without changing anything.
#[test]
fn alloc_contig_honours_alignment_and_boundary() {
    let r = system(
        &[
            PhysSegment::new(0x3000, 8 * MB, 0),
            PhysSegment::new(16 * MB, 20 * MB, 1),
        ],
        9,
    );
    let b = r.buddy();
    let mut runs = Vec::new();
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..200 {
        let n = rng.gen_range(1..=64u64);
        let align = PAGE_SIZE << rng.gen_range(0..8);
        let boundary = if rng.gen_bool(0.5) {
            0
        } else {
            (n * PAGE_SIZE).next_power_of_two() << rng.gen_range(0..3)
        };
        let low = rng.gen_range(0..4 * MB) & !(PAGE_SIZE - 1);
        let high = low + rng.gen_range(1..24 * MB);
        if let Some(p) = b.alloc_contig(0, n, pa(low), pa(high), align, boundary) {
            let (s, e) = (p.as_u64(), p.as_u64() + n * PAGE_SIZE);
            assert!(
                s >= low && e <= high,
                "{p}+{n} outside [{low:#x}, {high:#x})"
            );
            assert!(p.is_aligned(align), "{p} not aligned to {align:#x}");
            if let (Some(a), Some(z)) = (s.checked_div(boundary), (e - 1).checked_div(boundary)) {
                assert_eq!(a, z, "{p}+{n} crosses {boundary:#x}");
            }
            runs.push((p, n));
        }
        b.audit().unwrap();
    }
    assert!(runs.len() > 50, "many requests can be met: {}", runs.len());
    // The first run of a fresh allocator starts at the odd segment start, across blocks of
    // orders 0, 2, 3, ...
    let f = system(&[PhysSegment::new(0x3000, 8 * MB, 0)], 9);
    let p = f
        .buddy()
        .alloc_contig(0, 13, pa(0), pa(u64::MAX), PAGE_SIZE, 0)
        .unwrap();
    assert_eq!(p, pa(0x3000));
    // Boundary: 8 frames not crossing 32 KiB, at or above 0x6000; 0x3000..0x10000 is taken.
    let q = f
        .buddy()
        .alloc_contig(0, 8, pa(0x6000), pa(u64::MAX), PAGE_SIZE, 0x8000)
        .unwrap();
    assert_eq!(q, pa(0x10000));
    // Impossible: larger than the boundary, or than the range, or bad alignment.
    let before = snapshot(&f);
    let fb = f.buddy();
    assert_eq!(
        fb.alloc_contig(0, 9, pa(0), pa(u64::MAX), PAGE_SIZE, 0x8000),
        None
    );
    assert_eq!(
        fb.alloc_contig(0, 4, pa(0x100000), pa(0x103000), PAGE_SIZE, 0),
        None
    );
    assert_eq!(
        fb.alloc_contig(0, 4, pa(0), pa(u64::MAX), 3 * PAGE_SIZE, 0),
        None
    );
    assert_eq!(
        fb.alloc_contig(0, 0, pa(0), pa(u64::MAX), PAGE_SIZE, 0),
        None
    );
    assert_eq!(snapshot(&f), before);
    fb.free_contig(p, 13).unwrap();
    fb.free_contig(q, 8).unwrap();
    assert_eq!(fb.free_blocks(), fb.initial_blocks());
    for (p, n) in runs {
        b.free_contig(p, n).unwrap();
    }
    b.audit().unwrap();
    assert_eq!(b.free_blocks(), b.initial_blocks());
}

/// PHYS-4: double frees and frees with the wrong order are errors and change nothing, in the
/// buddy allocator, its frame-source face and the reservation system.
#[test]
fn double_free_and_wrong_order_free_are_errors_and_change_nothing() {
    let r = system(&[PhysSegment::new(0, 8 * MB, 0)], 9);
    let b = r.buddy();
    let x = b.alloc(0, 3).unwrap();
    let y = b.alloc(0, 0).unwrap();
    let p = r.alloc_page(ObjectId(5), 17, 0).unwrap();
    let c = b
        .alloc_contig(0, 5, pa(0), pa(u64::MAX), PAGE_SIZE, 0)
        .unwrap();
    b.free(y, 0).unwrap();
    let before = snapshot(&r);
    let cases: Vec<(Result<(), PhysError>, PhysError)> = vec![
        (b.free(y, 0), PhysError::DoubleFree(y)),
        (
            b.free(x, 2),
            PhysError::WrongOrder {
                pa: x,
                allocated: 3,
                freed: 2,
            },
        ),
        (
            b.free(x, 4),
            PhysError::WrongOrder {
                pa: x,
                allocated: 3,
                freed: 4,
            },
        ),
        (
            b.free(x + 2 * PAGE_SIZE, 0),
            PhysError::InsideBlock {
                pa: x + 2 * PAGE_SIZE,
                head: x,
                order: 3,
            },
        ),
        (b.free(pa(9 * MB), 0), PhysError::NotOurs(pa(9 * MB))),
        (b.free(x + 1, 3), PhysError::NotOurs(x + 1)),
        (
            b.free(x, MAX_ORDER + 1),
            PhysError::BadOrder(MAX_ORDER as u8 + 1),
        ),
        // A contiguous run with one frame already free: the whole call refused.
        (
            b.free_contig(c, 6),
            PhysError::DoubleFree(c + 5 * PAGE_SIZE),
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, Err(want));
    }
    assert_eq!(FrameSource::free(&**b, y), Err(FrameError::DoubleFree(y)));
    assert_eq!(FrameSource::free(&**b, x), Err(FrameError::NotOurs(x)));
    // The reserved frame: freeing it through the buddy is refused (it lies inside the
    // reservation's block); its unpopulated neighbour is not allocated.
    assert!(matches!(b.free(p, 0), Err(PhysError::InsideBlock { .. })));
    assert_eq!(
        r.free_page(p + PAGE_SIZE),
        Err(ReservError::Phys(PhysError::DoubleFree(p + PAGE_SIZE)))
    );
    assert_eq!(snapshot(&r), before);
    r.audit().unwrap();
    r.free_page(p).unwrap();
    assert_eq!(
        r.free_page(p),
        Err(ReservError::Phys(PhysError::DoubleFree(p)))
    );
    b.free(x, 3).unwrap();
    b.free_contig(c, 5).unwrap();
    r.audit().unwrap();
    assert_eq!(b.free_blocks(), b.initial_blocks());
}

/// PHYS-7: injected failures make every allocation path fail cleanly, and nothing leaks.
#[test]
fn fault_injection_returns_none_and_leaks_nothing() {
    let r = system(
        &[
            PhysSegment::new(0, 8 * MB, 0),
            PhysSegment::new(8 * MB, 12 * MB, 1),
        ],
        9,
    );
    let b = r.buddy();
    let before = snapshot(&r);
    b.inject_failures(2, Some(3));
    let ok1 = b.alloc(0, 0).unwrap();
    let ok2 = FrameSource::alloc(&**b).unwrap();
    assert_eq!(b.alloc(1, 4), None);
    assert_eq!(FrameSource::alloc(&**b), None);
    assert_eq!(
        b.alloc_contig(0, 3, pa(0), pa(u64::MAX), PAGE_SIZE, 0),
        None
    );
    let ok3 = b.alloc(0, 2).unwrap(); // the injection is over
    b.inject_failures(0, None);
    for _ in 0..10 {
        assert_eq!(b.alloc(0, 0), None);
    }
    b.clear_failures();
    b.free(ok1, 0).unwrap();
    FrameSource::free(&**b, ok2).unwrap();
    b.free(ok3, 2).unwrap();
    assert_eq!(snapshot(&r), before);
    // The reservation system.
    let o = ObjectId(1);
    r.inject_failures(1, Some(1));
    let p0 = r.alloc_page(o, 0, 0).unwrap();
    assert_eq!(r.alloc_page(o, 1, 0), Err(ReservError::NoMemory));
    let p1 = r.alloc_page(o, 1, 0).unwrap();
    r.inject_failures(0, None);
    assert_eq!(r.alloc_page(o, 2, 0), Err(ReservError::NoMemory));
    assert_eq!(
        r.reservation_of(p0).unwrap().popcnt,
        2,
        "a failure populates nothing"
    );
    r.clear_failures();
    r.audit().unwrap();
    r.free_page(p0).unwrap();
    r.free_page(p1).unwrap();
    r.audit().unwrap();
    assert_eq!(snapshot(&r).0, before.0);
    assert_eq!(b.allocated_pages(), 0);
}

/// PHYS-5: an empty domain falls back to the others under the Prefer policy, and fails under
/// Strict; reservations and frame-source frames follow the same policy.
#[test]
fn multi_domain_fallback() {
    let r = system(
        &[
            PhysSegment::new(0, 4 * MB, 0),
            PhysSegment::new(4 * MB, 12 * MB, 1),
            PhysSegment::new(12 * MB, 14 * MB, 2),
        ],
        9,
    );
    let b = r.buddy();
    let dom = |p: PhysAddr| b.pages().meta(p).domain();
    let mut held: Vec<(PhysAddr, usize)> = Vec::new();
    // Exhaust domain 0.
    for _ in 0..2 {
        held.push((b.alloc(0, 9).unwrap(), 9));
    }
    assert_eq!(b.free_pages(0), 0);
    // Prefer: domain 1 next.
    let p = b.alloc(0, 9).unwrap();
    assert_eq!(dom(p), 1);
    held.push((p, 9));
    let p = r.alloc_page(ObjectId(1), 0, 0).unwrap();
    assert_eq!(dom(p), 1);
    assert_eq!(r.reservation_of(p).unwrap().domain, 1);
    // Strict: nothing.
    b.set_policy(DomainPolicy::Strict);
    assert_eq!(b.alloc(0, 0), None);
    assert_eq!(
        b.alloc_contig(0, 1, pa(0), pa(u64::MAX), PAGE_SIZE, 0),
        None
    );
    assert_eq!(r.alloc_page(ObjectId(2), 0, 0), Err(ReservError::NoMemory));
    let q = b.alloc(2, 0).unwrap();
    assert_eq!(dom(q), 2);
    held.push((q, 0));
    // Frame source: preferred domain under Strict fails, round-robin still finds memory.
    b.set_frame_domain(Some(0));
    assert_eq!(FrameSource::alloc(&**b), None);
    b.set_frame_domain(None);
    let doms: BTreeSet<u8> = (0..4)
        .map(|_| {
            let f = FrameSource::alloc(&**b).unwrap();
            held.push((f, 0));
            dom(f)
        })
        .collect();
    assert_eq!(doms, BTreeSet::from([1, 2]));
    b.set_policy(DomainPolicy::Prefer);
    // Free everything: complete coalescing.
    r.free_page(p).unwrap();
    for (p, o) in held {
        b.free(p, o).unwrap();
    }
    r.audit().unwrap();
    assert_eq!(b.free_blocks(), b.initial_blocks());
    for d in 0..3 {
        assert_eq!(b.free_pages(d), b.total_pages(d));
    }
}

/// PHYS-8: several threads allocating and freeing at once (blocks, frames, contiguous runs,
/// reservation pages) leave a consistent allocator that coalesces completely.
#[test]
fn concurrent_alloc_free_then_audit() {
    let r = Arc::new(system(
        &[
            PhysSegment::new(0, 16 * MB, 0),
            PhysSegment::new(16 * MB, 32 * MB, 1),
        ],
        9,
    ));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                let b = r.buddy();
                let mut rng = SmallRng::seed_from_u64(t);
                let mut blocks: Vec<(PhysAddr, usize)> = Vec::new();
                let mut runs: Vec<(PhysAddr, u64)> = Vec::new();
                let mut pages: Vec<PhysAddr> = Vec::new();
                for _ in 0..3000 {
                    match rng.gen_range(0..8) {
                        0 | 1 => {
                            let o = rng.gen_range(0..6);
                            if let Some(p) = b.alloc(rng.gen_range(0..2), o) {
                                blocks.push((p, o));
                            }
                        }
                        2 => {
                            if let Some(p) = FrameSource::alloc(&**b) {
                                blocks.push((p, 0));
                            }
                        }
                        3 => {
                            let n = rng.gen_range(1..20);
                            if let Some(p) =
                                b.alloc_contig(0, n, pa(0), pa(u64::MAX), PAGE_SIZE, 32 * PAGE_SIZE)
                            {
                                runs.push((p, n));
                            }
                        }
                        4 | 5 => {
                            let obj = ObjectId(t * 100 + rng.gen_range(0..4));
                            let pi = rng.gen_range(0..2048);
                            match r.alloc_page(obj, pi, rng.gen_range(0..2)) {
                                Ok(p) => pages.push(p),
                                Err(ReservError::AlreadyPopulated { .. }) => {}
                                Err(ReservError::NoMemory) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        _ => {
                            if !blocks.is_empty() {
                                let (p, o) = blocks.swap_remove(rng.gen_range(0..blocks.len()));
                                b.free(p, o).unwrap();
                            }
                            if !runs.is_empty() && rng.gen_bool(0.3) {
                                let (p, n) = runs.swap_remove(rng.gen_range(0..runs.len()));
                                b.free_contig(p, n).unwrap();
                            }
                            if !pages.is_empty() {
                                let p = pages.swap_remove(rng.gen_range(0..pages.len()));
                                r.free_page(p).unwrap();
                            }
                        }
                    }
                }
                (blocks, runs, pages)
            })
        })
        .collect();
    let held: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    r.audit().unwrap();
    for (blocks, runs, pages) in held {
        for (p, o) in blocks {
            r.buddy().free(p, o).unwrap();
        }
        for (p, n) in runs {
            r.buddy().free_contig(p, n).unwrap();
        }
        for p in pages {
            r.free_page(p).unwrap();
        }
    }
    r.audit().unwrap();
    assert_eq!(r.stats().active, 0);
    assert_eq!(r.buddy().allocated_pages(), 0);
    assert_eq!(r.buddy().free_blocks(), r.buddy().initial_blocks());
}

// -------------------------------------------------------------------------------------------
// The model.

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        domain: usize,
        order: usize,
    },
    Free {
        pick: usize,
    },
    FreeWrongOrder {
        pick: usize,
        delta: usize,
    },
    FreeFree {
        frame: u64,
    },
    Contig {
        domain: usize,
        n: u64,
        low: u64,
        span: u64,
        align: u32,
        boundary: u32,
    },
    ResAlloc {
        obj: u64,
        pindex: u64,
        domain: usize,
    },
    ResFree {
        pick: usize,
    },
    ResRange {
        obj: u64,
        range: u64,
        step: u64,
        domain: usize,
    },
    Break {
        pick: usize,
    },
    ObjectGone {
        obj: u64,
    },
    Policy {
        strict: bool,
    },
    Inject,
    Fill {
        domain: usize,
        order: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..7usize).prop_map(|(domain, order)| Op::Alloc { domain, order }),
        4 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 1..4usize).prop_map(|(pick, delta)| Op::FreeWrongOrder { pick, delta }),
        1 => (0..1024u64).prop_map(|frame| Op::FreeFree { frame }),
        2 => (0..3usize, 1..40u64, 0..600u64, 1..700u64, 0..7u32, 0..4u32).prop_map(
            |(domain, n, low, span, align, boundary)| Op::Contig { domain, n, low, span, align, boundary }
        ),
        6 => (0..4u64, 0..32u64, 0..3usize).prop_map(|(obj, pindex, domain)| Op::ResAlloc { obj, pindex, domain }),
        4 => any::<usize>().prop_map(|pick| Op::ResFree { pick }),
        1 => (0..4u64, 0..4u64, 0..8u64, 0..2usize).prop_map(|(obj, range, step, domain)| Op::ResRange { obj, range, step, domain }),
        1 => any::<usize>().prop_map(|pick| Op::Break { pick }),
        1 => (0..4u64).prop_map(|obj| Op::ObjectGone { obj }),
        1 => any::<bool>().prop_map(|strict| Op::Policy { strict }),
        1 => Just(Op::Inject),
        1 => (0..2usize, 0..4usize).prop_map(|(domain, order)| Op::Fill { domain, order }),
    ]
}

/// What the model knows is allocated.
#[derive(Default)]
struct Model {
    /// Buddy blocks: address -> order.
    blocks: BTreeMap<u64, usize>,
    /// Contiguous runs: address -> frames.
    runs: BTreeMap<u64, u64>,
    /// Reservation-system pages: (object, pindex) -> address.
    res: BTreeMap<(u64, u64), u64>,
    /// Every frame the model holds (for overlap checks).
    frames: BTreeSet<u64>,
}

impl Model {
    fn take(&mut self, p: u64, n: u64) {
        for i in 0..n {
            assert!(
                self.frames.insert(p + i * PAGE_SIZE),
                "frame {:#x} handed out twice",
                p + i * PAGE_SIZE
            );
        }
    }
    fn give(&mut self, p: u64, n: u64) {
        for i in 0..n {
            assert!(self.frames.remove(&(p + i * PAGE_SIZE)));
        }
    }
}

/// Free frames as the allocator reports them, for the contiguous-run oracle.
fn free_frames(b: &BuddyAllocator) -> BTreeSet<u64> {
    b.free_blocks()
        .into_iter()
        .flat_map(|(p, o)| (0..1u64 << o).map(move |i| p.as_u64() + i * PAGE_SIZE))
        .collect()
}

const SEGS: [(u64, u64, u8); 3] = [
    (0x0, 0x60000, 0),       // 384 frames
    (0x103000, 0x180000, 1), // 509 frames, odd start
    (0x180000, 0x1c0000, 0), // 64 frames, adjacent to domain 1's segment
];

/// One reservation-system allocation, checked against the model.
fn res_alloc(
    r: &ReservSystem,
    m: &mut Model,
    obj: u64,
    pindex: u64,
    domain: usize,
) -> Result<(), TestCaseError> {
    let b = r.buddy();
    let n = r.npages();
    if m.res.contains_key(&(obj, pindex)) {
        // Populated in its reservation: refused; an ordinary page: the caller's bug,
        // not exercised.
        let p = m.res[&(obj, pindex)];
        if r.reservation_of(pa(p)).is_some() {
            prop_assert_eq!(
                r.alloc_page(ObjectId(obj), pindex, domain),
                Err(ReservError::AlreadyPopulated {
                    object: ObjectId(obj),
                    pindex,
                    pa: pa(p)
                })
            );
        }
        return Ok(());
    }
    let existing = r.reservation_for(ObjectId(obj), pindex);
    match r.alloc_page(ObjectId(obj), pindex, domain) {
        Ok(p) => {
            if let Some(info) = existing {
                prop_assert_eq!(p, info.base + (pindex - info.first_pindex) * PAGE_SIZE);
            }
            if let Some(info) = r.reservation_of(p) {
                prop_assert_eq!(info.object, ObjectId(obj));
                prop_assert_eq!(info.first_pindex, pindex & !(n - 1));
                prop_assert_eq!(p, info.base + (pindex % n) * PAGE_SIZE);
            }
            prop_assert_eq!(b.pages().meta(p).owner(), Some((ObjectId(obj), pindex)));
            m.take(p.as_u64(), 1);
            m.res.insert((obj, pindex), p.as_u64());
        }
        Err(ReservError::NoMemory) => {
            prop_assert!(existing.is_none());
            let doms: Vec<usize> = match b.policy() {
                DomainPolicy::Strict if domain >= 2 => vec![],
                DomainPolicy::Strict => vec![domain],
                DomainPolicy::Prefer => vec![0, 1],
            };
            for d in doms {
                prop_assert_eq!(b.free_pages(d), 0);
                prop_assert!(
                    r.lru(d).is_empty(),
                    "NoMemory with partial reservations left"
                );
            }
        }
        Err(e) => prop_assert!(false, "unexpected {e}"),
    }
    Ok(())
}

fn run(ops: Vec<Op>, rorder: usize) -> Result<(), TestCaseError> {
    let segs: Vec<_> = SEGS
        .iter()
        .map(|&(s, e, d)| PhysSegment::new(s, e, d))
        .collect();
    let r = system(&segs, rorder);
    let b = Arc::clone(r.buddy());
    let n = 1u64 << rorder;
    let mut m = Model::default();
    let allowed = |b: &BuddyAllocator, d: usize| -> Vec<usize> {
        match b.policy() {
            DomainPolicy::Strict => vec![d],
            DomainPolicy::Prefer => (0..2).map(|i| (d + i) % 2).collect(),
        }
    };
    for op in ops {
        match op {
            Op::Alloc { domain, order } => {
                let counts: Vec<_> = (0..2).map(|d| b.free_counts(d)).collect();
                let can = |d: usize| d < 2 && counts[d][order..].iter().any(|&c| c > 0);
                match b.alloc(domain, order) {
                    Some(p) => {
                        prop_assert!(p.is_aligned(PAGE_SIZE << order));
                        let d = b.pages().meta(p).domain() as usize;
                        let want = allowed(&b, domain).into_iter().find(|&d| can(d));
                        prop_assert_eq!(Some(d), want, "block from the wrong domain");
                        m.take(p.as_u64(), 1 << order);
                        m.blocks.insert(p.as_u64(), order);
                    }
                    None => prop_assert!(
                        allowed(&b, domain).into_iter().all(|d| !can(d)),
                        "order {} refused though free",
                        order
                    ),
                }
            }
            Op::Free { pick } => {
                if let Some((&p, &o)) = m.blocks.iter().nth(pick % m.blocks.len().max(1)) {
                    b.free(pa(p), o).unwrap();
                    m.blocks.remove(&p);
                    m.give(p, 1 << o);
                } else if let Some((&p, &k)) = m.runs.iter().nth(pick % m.runs.len().max(1)) {
                    b.free_contig(pa(p), k).unwrap();
                    m.runs.remove(&p);
                    m.give(p, k);
                }
            }
            Op::FreeWrongOrder { pick, delta } => {
                if let Some((&p, &o)) = m.blocks.iter().nth(pick % m.blocks.len().max(1)) {
                    let before = b.free_blocks();
                    let wrong = (o + delta) % (MAX_ORDER + 1);
                    prop_assert_eq!(
                        b.free(pa(p), wrong),
                        Err(PhysError::WrongOrder {
                            pa: pa(p),
                            allocated: o as u8,
                            freed: wrong as u8
                        })
                    );
                    prop_assert_eq!(b.free_blocks(), before);
                }
            }
            Op::FreeFree { frame } => {
                // A frame the allocator says is free: freeing it is a double free.
                let free = free_frames(&b);
                if let Some(&f) = free.iter().nth(frame as usize % free.len().max(1)) {
                    let before = b.free_blocks();
                    prop_assert_eq!(b.free(pa(f), 0), Err(PhysError::DoubleFree(pa(f))));
                    prop_assert_eq!(b.free_blocks(), before);
                }
            }
            Op::Contig {
                domain,
                n: k,
                low,
                span,
                align,
                boundary,
            } => {
                let low = low * PAGE_SIZE;
                let high = low + span * PAGE_SIZE;
                let align = PAGE_SIZE << align;
                let boundary = if boundary == 0 {
                    0
                } else {
                    (k * PAGE_SIZE).next_power_of_two() << (boundary - 1)
                };
                // Oracle: the lowest fitting start in the first allowed domain that has one.
                let free = free_frames(&b);
                let fits = |s: u64, d: usize| {
                    s.is_multiple_of(align)
                        && s >= low
                        && s + k * PAGE_SIZE <= high
                        && (boundary == 0 || s / boundary == (s + k * PAGE_SIZE - 1) / boundary)
                        && segs.iter().any(|g| {
                            g.domain as usize == d
                                && g.start.as_u64() <= s
                                && s + k * PAGE_SIZE <= g.end.as_u64()
                        })
                        && (0..k).all(|i| free.contains(&(s + i * PAGE_SIZE)))
                };
                let want = if domain < 2 {
                    allowed(&b, domain)
                        .into_iter()
                        .find_map(|d| free.iter().copied().find(|&s| fits(s, d)))
                } else {
                    // Domain 2 has no memory: Strict fails, Prefer starts at 2 % 2 = 0.
                    match b.policy() {
                        DomainPolicy::Strict => None,
                        DomainPolicy::Prefer => [0, 1]
                            .into_iter()
                            .find_map(|d| free.iter().copied().find(|&s| fits(s, d))),
                    }
                };
                let got = b.alloc_contig(domain, k, pa(low), pa(high), align, boundary);
                prop_assert_eq!(got.map(|p| p.as_u64()), want);
                if let Some(p) = got {
                    m.take(p.as_u64(), k);
                    m.runs.insert(p.as_u64(), k);
                }
            }
            Op::ResAlloc {
                obj,
                pindex,
                domain,
            } => res_alloc(&r, &mut m, obj, pindex, domain)?,
            Op::ResRange {
                obj,
                range,
                step,
                domain,
            } => {
                // Every page of one reservation range, in a scrambled order.
                let first = range * n;
                let step = (2 * step + 1) % n.max(2);
                for i in 0..n {
                    res_alloc(&r, &mut m, obj, first + (i * step + range) % n, domain)?;
                }
                let pages: Vec<u64> = (first..first + n)
                    .filter_map(|p| m.res.get(&(obj, p)).copied())
                    .collect();
                if let Some(info) = r.reservation_for(ObjectId(obj), first) {
                    if pages.len() as u64 == n && info.popcnt as u64 == n {
                        prop_assert!(r.is_fully_populated(pa(pages[0])));
                        prop_assert!(info.base.is_aligned(n * PAGE_SIZE));
                        for (i, &p) in pages.iter().enumerate() {
                            prop_assert_eq!(pa(p), info.base + i as u64 * PAGE_SIZE);
                        }
                        prop_assert_eq!(b.pages().meta(info.base).psind(), 1);
                    }
                }
            }
            Op::ResFree { pick } => {
                if let Some((&k, &p)) = m.res.iter().nth(pick % m.res.len().max(1)) {
                    r.free_page(pa(p)).unwrap();
                    m.res.remove(&k);
                    m.give(p, 1);
                    prop_assert_eq!(
                        r.free_page(pa(p)),
                        Err(ReservError::Phys(PhysError::DoubleFree(pa(p))))
                    );
                }
            }
            Op::Break { pick } => {
                if let Some((_, &p)) = m.res.iter().nth(pick % m.res.len().max(1)) {
                    let had = r.reservation_of(pa(p)).is_some();
                    prop_assert_eq!(r.break_reservation(pa(p)), had);
                    prop_assert!(r.reservation_of(pa(p)).is_none());
                }
            }
            Op::ObjectGone { obj } => {
                r.object_gone(ObjectId(obj));
                for (&(o, _), &p) in &m.res {
                    if o == obj {
                        prop_assert!(r.reservation_of(pa(p)).is_none());
                    }
                }
                // The object's pages are still the caller's: freed with the object.
                let gone: Vec<_> = m
                    .res
                    .range((obj, 0)..=(obj, u64::MAX))
                    .map(|(&k, &p)| (k, p))
                    .collect();
                for (k, p) in gone {
                    r.free_page(pa(p)).unwrap();
                    m.res.remove(&k);
                    m.give(p, 1);
                }
            }
            Op::Fill { domain, order } => {
                // Memory pressure: take blocks until the domain (or all, under Prefer) is dry.
                for _ in 0..64 {
                    match b.alloc(domain, order) {
                        Some(p) => {
                            m.take(p.as_u64(), 1 << order);
                            m.blocks.insert(p.as_u64(), order);
                        }
                        None => break,
                    }
                }
            }
            Op::Policy { strict } => b.set_policy(if strict {
                DomainPolicy::Strict
            } else {
                DomainPolicy::Prefer
            }),
            Op::Inject => {
                let before = snapshot(&r);
                b.inject_failures(0, Some(1));
                prop_assert_eq!(b.alloc(0, 0), None);
                r.inject_failures(0, Some(1));
                prop_assert_eq!(r.alloc_page(ObjectId(0), 0, 0), Err(ReservError::NoMemory));
                prop_assert_eq!(snapshot(&r), before);
            }
        }
        if let Err(e) = r.audit() {
            return Err(TestCaseError::fail(e));
        }
        // Frames the allocator holds = the model's + the unpopulated frames of reservations.
        let mut bases = BTreeMap::new();
        for &p in m.res.values() {
            if let Some(info) = r.reservation_of(pa(p)) {
                bases.insert(info.base, info.popcnt as u64);
            }
        }
        prop_assert_eq!(r.stats().active, bases.len() as u64);
        let reserved_idle: u64 = bases.values().map(|&c| n - c).sum();
        prop_assert_eq!(b.allocated_pages(), m.frames.len() as u64 + reserved_idle);
    }
    // Free everything: the lists hold exactly the original memory as maximal blocks.
    for (&p, &o) in &m.blocks {
        b.free(pa(p), o).unwrap();
    }
    for (&p, &k) in &m.runs {
        b.free_contig(pa(p), k).unwrap();
    }
    for &p in m.res.values() {
        r.free_page(pa(p)).unwrap();
    }
    if let Err(e) = r.audit() {
        return Err(TestCaseError::fail(e));
    }
    prop_assert_eq!(r.stats().active, 0);
    prop_assert_eq!(b.allocated_pages(), 0);
    prop_assert_eq!(b.free_blocks(), b.initial_blocks());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// PHYS-1..8, RSV-1..6 against the model.
    #[test]
    fn phys_against_model(ops in proptest::collection::vec(op(), 1..120), rorder in prop_oneof![Just(2usize), Just(4), Just(6)]) {
        run(ops, rorder)?;
    }
}
