//! The buddy allocator under arbitrary operations: block allocations of any order (valid or
//! not) in either of two domains, frees of live blocks, bad frees (raw addresses, wrong orders,
//! interiors, doubles), splits, contiguous runs with raw bounds, alignments and boundaries, and
//! frees of runs. Oracle after every step: the allocator's audit (PHYS-2, PHYS-3); every
//! allocation lies in a segment, is aligned as asked and overlaps nothing live; the allocated
//! count equals the model's; a refused operation changes nothing. At the end everything is
//! freed and the free lists must be exactly the initial seeding (PHYS-3: nothing leaks).

use std::collections::BTreeMap;
use std::sync::Arc;

use vmsys::page::PageArray;
use vmsys::phys::{BuddyAllocator, MAX_ORDER};
use vmsys::platform::PhysSegment;
use vmsys::{PhysAddr, PAGE_SIZE};

use crate::input::Input;

const MAX_STEPS: usize = 512;

/// Two domains; the first segment starts off a large alignment so that its seeding is not one
/// block, the second is small.
fn segments() -> [PhysSegment; 2] {
    [
        PhysSegment::new(0x3000, 0x3000 + 6 * 1024 * 1024, 0),
        PhysSegment::new(0x4000_0000, 0x4000_0000 + 1024 * 1024, 1),
    ]
}

struct World {
    b: BuddyAllocator,
    /// Live units: start -> order (runs and split blocks are order-0 frames).
    live: BTreeMap<u64, u32>,
}

impl World {
    fn held(&self) -> u64 {
        self.live.values().map(|&o| 1u64 << o).sum()
    }

    fn audit(&self, step: usize, what: &str) {
        if let Err(e) = self.b.audit() {
            panic!("step {step} ({what}): buddy audit: {e}");
        }
        assert_eq!(
            self.b.allocated_pages(),
            self.held(),
            "step {step} ({what}): allocated pages disagree with the model"
        );
    }

    fn took(&mut self, step: usize, pa: u64, order: u32, what: &str) {
        let len = PAGE_SIZE << order;
        assert!(
            segments()
                .iter()
                .any(|s| pa >= s.start.as_u64() && pa + len <= s.end.as_u64()),
            "step {step} ({what}): [{pa:#x}, +{len:#x}) outside every segment"
        );
        if let Some((&b, &o)) = self.live.range(..pa + len).next_back() {
            assert!(
                b + (PAGE_SIZE << o) <= pa,
                "step {step} ({what}): [{pa:#x}, +{len:#x}) overlaps live block {b:#x} order {o}"
            );
        }
        self.live.insert(pa, order);
    }

    /// A live order-0 run of up to `n` frames starting at the `k`-th live unit, if it is one.
    fn run_at(&self, k: usize, n: u64) -> Option<(u64, u64)> {
        let (&start, &o) = self.live.iter().nth(k)?;
        if o != 0 {
            return None;
        }
        let mut len = 0;
        while len < n && self.live.get(&(start + len * PAGE_SIZE)) == Some(&0) {
            len += 1;
        }
        Some((start, len))
    }
}

/// Run one input. Panics (with the step) on any broken invariant.
pub fn run(data: &[u8]) {
    let segs = segments();
    let pages = Arc::new(PageArray::new(&segs));
    let mut w = World {
        b: BuddyAllocator::new(pages),
        live: BTreeMap::new(),
    };
    let initial = w.b.initial_blocks();
    let mut i = Input::new(data);
    let mut step = 0;
    while !i.is_empty() && step < MAX_STEPS {
        step += 1;
        match i.below(7) {
            0 | 1 => {
                let dom = i.below(3) as usize; // 2 is no domain at all
                let order = if i.one_in(8) {
                    i.u8() as usize
                } else {
                    i.below(6) as usize
                };
                let before = w.b.allocated_pages();
                match w.b.alloc(dom.min(1), order) {
                    Some(pa) => {
                        assert!(order <= MAX_ORDER, "step {step}: order {order} allocated");
                        assert!(
                            pa.is_aligned(PAGE_SIZE << order),
                            "step {step}: order-{order} block at {pa:?} is not naturally aligned"
                        );
                        w.took(step, pa.as_u64(), order as u32, "alloc");
                    }
                    None => assert_eq!(
                        w.b.allocated_pages(),
                        before,
                        "step {step}: failed alloc changed counts"
                    ),
                }
                w.audit(step, "alloc");
            }
            2 => {
                if w.live.is_empty() {
                    continue;
                }
                let k = i.below(w.live.len() as u64) as usize;
                let (&pa, &o) = w.live.iter().nth(k).expect("k < len");
                if let Err(e) = w.b.free(PhysAddr::new(pa), o as usize) {
                    panic!("step {step}: free of live block {pa:#x} order {o} refused: {e}");
                }
                w.live.remove(&pa);
                w.audit(step, "free");
            }
            3 => {
                // A bad free: raw, wrong order, interior frame, or one page past a live block.
                let (pa, order) = match (i.u8() % 4, w.live.iter().next()) {
                    (0, Some((&a, &o))) => (a, o as usize + 1 + i.below(3) as usize),
                    (1, Some((&a, &o))) if o > 0 => (a + PAGE_SIZE, 0),
                    (2, Some((&a, &o))) => (a + (PAGE_SIZE << o), o as usize),
                    _ => (i.u64(), i.u8() as usize),
                };
                if w.live.get(&pa) == Some(&(order as u32)) {
                    continue;
                }
                let before = w.b.free_blocks();
                if w.b.free(PhysAddr::new(pa), order).is_ok() {
                    panic!("step {step}: bad free of {pa:#x} order {order} accepted");
                }
                assert_eq!(
                    w.b.free_blocks(),
                    before,
                    "step {step}: a refused free changed the free lists"
                );
                w.audit(step, "bad free");
            }
            4 => {
                // Split a live block into frames.
                if w.live.is_empty() {
                    continue;
                }
                let k = i.below(w.live.len() as u64) as usize;
                let (&pa, &o) = w.live.iter().nth(k).expect("k < len");
                let wrong = i.one_in(4);
                let order = if wrong { o as usize + 1 } else { o as usize };
                match w.b.split(PhysAddr::new(pa), order) {
                    Ok(()) => {
                        assert!(!wrong, "step {step}: split with the wrong order accepted");
                        w.live.remove(&pa);
                        for f in 0..(1u64 << o) {
                            w.live.insert(pa + f * PAGE_SIZE, 0);
                        }
                    }
                    Err(e) => assert!(
                        wrong,
                        "step {step}: split of live {pa:#x} order {o} refused: {e}"
                    ),
                }
                w.audit(step, "split");
            }
            5 => {
                let npages = i.size(40);
                let (low, high) = match i.u8() % 3 {
                    0 => (0, u64::MAX),
                    1 => (i.below(8 << 20), i.below(16 << 20)),
                    _ => (i.u64(), i.u64()),
                };
                let alignment = match i.u8() % 3 {
                    0 => 0,
                    1 => PAGE_SIZE << i.below(10),
                    _ => i.u64(),
                };
                let boundary = match i.u8() % 3 {
                    0 => 0,
                    1 => PAGE_SIZE << i.below(12),
                    _ => i.u64(),
                };
                let dom = i.below(2) as usize;
                let before = w.b.allocated_pages();
                match w.b.alloc_contig(
                    dom,
                    npages,
                    PhysAddr::new(low),
                    PhysAddr::new(high),
                    alignment,
                    boundary,
                ) {
                    Some(pa) => {
                        let pa = pa.as_u64();
                        let len = npages * PAGE_SIZE;
                        assert!(
                            pa >= low && pa + len <= high,
                            "step {step}: run {pa:#x}+{len:#x} outside [{low:#x}, {high:#x})"
                        );
                        assert_eq!(
                            pa % alignment.max(PAGE_SIZE),
                            0,
                            "step {step}: run {pa:#x} not aligned to {alignment:#x}"
                        );
                        // No boundary (0): both sides are None.
                        assert_eq!(
                            pa.checked_div(boundary),
                            (pa + len - 1).checked_div(boundary),
                            "step {step}: run crosses {boundary:#x}"
                        );
                        for f in 0..npages {
                            w.took(step, pa + f * PAGE_SIZE, 0, "alloc_contig");
                        }
                    }
                    None => assert_eq!(
                        w.b.allocated_pages(),
                        before,
                        "step {step}: failed alloc_contig changed counts"
                    ),
                }
                w.audit(step, "alloc_contig");
            }
            _ => {
                // Free a run: a live one (whole or in part), or raw values that must be refused
                // unless they happen to name live frames.
                let k = i.below(w.live.len().max(1) as u64) as usize;
                let want = 1 + i.below(8);
                let raw = i.one_in(4);
                let (pa, n, live) = match (raw, w.run_at(k, want)) {
                    (false, Some((pa, n))) => (pa, n, true),
                    _ => (i.u64() & !(PAGE_SIZE - 1), i.size(8), false),
                };
                let all_live = live
                    || (n > 0
                        && n < 1 << 20
                        && (0..n).all(|f| {
                            pa.checked_add(f * PAGE_SIZE)
                                .is_some_and(|p| w.live.get(&p) == Some(&0))
                        }));
                let before = w.b.free_blocks();
                match w.b.free_contig(PhysAddr::new(pa), n) {
                    Ok(()) if all_live => {
                        for f in 0..n {
                            w.live.remove(&(pa + f * PAGE_SIZE));
                        }
                    }
                    Ok(()) => assert!(
                        n == 0 && w.b.free_blocks() == before,
                        "step {step}: free_contig({pa:#x}, {n}) of frames not held accepted"
                    ),
                    Err(e) => {
                        assert!(
                            !all_live,
                            "step {step}: free_contig of live run {pa:#x}+{n} refused: {e}"
                        );
                        assert_eq!(
                            w.b.free_blocks(),
                            before,
                            "step {step}: a refused free_contig changed the lists"
                        );
                    }
                }
                w.audit(step, "free_contig");
            }
        }
    }
    for (pa, o) in std::mem::take(&mut w.live) {
        if let Err(e) = w.b.free(PhysAddr::new(pa), o as usize) {
            panic!("teardown: free of live {pa:#x} order {o} refused: {e}");
        }
    }
    w.audit(step, "teardown");
    assert_eq!(
        w.b.free_blocks(),
        initial,
        "teardown: the free lists are not the initial seeding"
    );
}
