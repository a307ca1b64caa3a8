//! vmem under arbitrary operations: a child arena with quantum caches on two CPUs, importing
//! from a parent arena, driven by alloc / xalloc / free / bad frees / span adds / reaps whose
//! sizes, alignments, phases, bounds and addresses are drawn raw. Oracle after every step: both
//! arenas' audits; a successful allocation lies in an owned span, overlaps nothing live and
//! honours every constraint it was asked for; a failed operation and a rejected free change
//! nothing the caller can see (live bytes and segments); once everything is freed and the
//! caches drained, the child holds no import and the parent nothing in use (VMEM-1..12).

use std::collections::BTreeMap;
use std::sync::Arc;

use vmsys::vmem::{Arena, ArenaConfig, Policy};

use crate::input::Input;

const Q: u64 = 0x10;
const SPAN_BASE: u64 = 0x10_0000;
const SPAN_SIZE: u64 = 0x4000;
const PARENT_BASE: u64 = 0x1000_0000;
const PARENT_SIZE: u64 = 0x10_0000;
const NCPU: u64 = 2;
const MAX_STEPS: usize = 512;

fn policy(i: &mut Input) -> Policy {
    match i.below(3) {
        0 => Policy::InstantFit,
        1 => Policy::BestFit,
        _ => Policy::NextFit,
    }
}

struct World {
    parent: Arc<Arena>,
    child: Arena,
    /// What the caller holds: start -> rounded size.
    live: BTreeMap<u64, u64>,
    /// Spans added by hand: start -> size.
    added: BTreeMap<u64, u64>,
}

impl World {
    fn new() -> Self {
        let parent = Arc::new(
            Arena::new(ArenaConfig::new("fuzz-parent", Q).span(PARENT_BASE, PARENT_SIZE))
                .expect("a valid parent configuration"),
        );
        let child = Arena::new(
            ArenaConfig::new("fuzz-child", Q)
                .span(SPAN_BASE, SPAN_SIZE)
                .qcache(4 * Q, NCPU as usize)
                .source(parent.clone(), 0x400),
        )
        .expect("a valid child configuration");
        World {
            parent,
            child,
            live: BTreeMap::new(),
            added: BTreeMap::new(),
        }
    }

    fn audit(&self, step: usize, what: &str) {
        if let Err(e) = self.child.audit() {
            panic!("step {step} ({what}): child arena audit: {e}");
        }
        if let Err(e) = self.parent.audit() {
            panic!("step {step} ({what}): parent arena audit: {e}");
        }
        let live_bytes: u64 = self.live.values().sum();
        let in_use = self.child.stats().in_use;
        assert_eq!(
            in_use, live_bytes,
            "step {step} ({what}): in-use bytes {in_use:#x} but the caller holds {live_bytes:#x}"
        );
    }

    /// Where a segment may lie: the initial span, an added span, or an import.
    fn owned(&self, a: u64, size: u64) -> bool {
        let Some(end) = a.checked_add(size) else {
            return false;
        };
        let inside = |b: u64, s: u64| a >= b && end <= b + s;
        inside(SPAN_BASE, SPAN_SIZE)
            || inside(PARENT_BASE, PARENT_SIZE)
            || self.added.iter().any(|(&b, &s)| inside(b, s))
    }

    fn took(&mut self, step: usize, a: u64, size: u64, what: &str) {
        assert!(
            self.owned(a, size),
            "step {step} ({what}): [{a:#x}, +{size:#x}) lies outside every span"
        );
        let end = a + size;
        if let Some((&b, &s)) = self.live.range(..end).next_back() {
            assert!(
                b + s <= a,
                "step {step} ({what}): [{a:#x}, +{size:#x}) overlaps live [{b:#x}, +{s:#x})"
            );
        }
        self.live.insert(a, size);
    }
}

fn round(size: u64) -> Option<u64> {
    size.checked_add(Q - 1).map(|s| s & !(Q - 1))
}

/// Run one input. Panics (with the step) on any broken invariant.
pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let mut w = World::new();
    let mut step = 0;
    while !i.is_empty() && step < MAX_STEPS {
        step += 1;
        match i.below(7) {
            0 | 1 => {
                let size = i.size(16 * Q);
                let cpu = i.below(NCPU + 1) as usize; // one past the end is a bad CPU
                let p = policy(&mut i);
                let before = w.child.stats().in_use;
                match w.child.alloc_on(cpu, size, p) {
                    Ok(a) => {
                        let r = round(size).expect("a successful size rounds");
                        assert!(
                            size != 0 && cpu < NCPU as usize,
                            "step {step}: alloc({size:#x}) on cpu {cpu} succeeded"
                        );
                        assert_eq!(a % Q, 0, "step {step}: unaligned {a:#x}");
                        w.took(step, a, r, "alloc");
                    }
                    Err(_) => assert_eq!(
                        w.child.stats().in_use,
                        before,
                        "step {step}: failed alloc changed the arena"
                    ),
                }
                w.audit(step, "alloc");
            }
            2 => {
                let size = i.size(16 * Q);
                let align = match i.u8() % 4 {
                    0 => 0,
                    1 => Q << i.below(8),
                    2 => 1 << i.below(64),
                    _ => i.u64(),
                };
                let phase = if i.one_in(2) {
                    0
                } else {
                    i.size(align.max(Q)) & !(Q - 1)
                };
                let nocross = match i.u8() % 3 {
                    0 => 0,
                    1 => 0x100 << i.below(8),
                    _ => i.u64(),
                };
                let (min, max) = match i.u8() % 3 {
                    0 => (vmsys::vmem::ADDR_MIN, vmsys::vmem::ADDR_MAX),
                    1 => (
                        SPAN_BASE + i.below(SPAN_SIZE),
                        SPAN_BASE + i.below(2 * SPAN_SIZE),
                    ),
                    _ => (i.u64(), i.u64()),
                };
                let p = policy(&mut i);
                let before = w.child.stats().in_use;
                match w.child.xalloc(size, align, phase, nocross, min, max, p) {
                    Ok(a) => {
                        let r = round(size).expect("a successful size rounds");
                        let al = if align == 0 { Q } else { align };
                        assert_eq!(
                            a % al,
                            phase,
                            "step {step}: xalloc {a:#x} not at phase {phase:#x} of {al:#x}"
                        );
                        // No nocross (0): both sides are None.
                        assert_eq!(
                            a.checked_div(nocross),
                            (a + r - 1).checked_div(nocross),
                            "step {step}: {a:#x}+{r:#x} crosses {nocross:#x}"
                        );
                        assert!(
                            a >= min && a + r - 1 <= max,
                            "step {step}: {a:#x}+{r:#x} outside [{min:#x}, {max:#x}]"
                        );
                        w.took(step, a, r, "xalloc");
                    }
                    Err(_) => assert_eq!(
                        w.child.stats().in_use,
                        before,
                        "step {step}: failed xalloc changed the arena"
                    ),
                }
                w.audit(step, "xalloc");
            }
            3 => {
                // Free something held, on either CPU (the cache takes cross-CPU frees).
                if w.live.is_empty() {
                    continue;
                }
                let k = i.below(w.live.len() as u64) as usize;
                let (&a, &s) = w.live.iter().nth(k).expect("k < len");
                let cpu = i.below(NCPU) as usize;
                if let Err(e) = w.child.free_on(cpu, a, s) {
                    panic!("step {step}: free of live [{a:#x}, +{s:#x}) refused: {e}");
                }
                w.live.remove(&a);
                w.audit(step, "free");
            }
            4 => {
                // A bad free: an address and size the caller does not hold (raw, or a live
                // segment's neighbour, interior or wrong size). It must be refused.
                let (a, s) = match (i.u8() % 4, w.live.iter().next()) {
                    (0, Some((&a, &s))) => (a + Q, s),
                    (1, Some((&a, &s))) => (a, s + Q),
                    (2, Some((&a, &s))) if s > Q => (a, s - Q),
                    _ => (i.u64(), i.size(16 * Q)),
                };
                let held = w.live.get(&a).is_some_and(|&ls| round(s) == Some(ls));
                if held {
                    continue;
                }
                let before = w.child.stats();
                let cpu = i.below(NCPU) as usize;
                if w.child.free_on(cpu, a, s).is_ok() {
                    panic!("step {step}: bad free of [{a:#x}, +{s:#x}) accepted");
                }
                assert_eq!(
                    w.child.stats().in_use,
                    before.in_use,
                    "step {step}: a refused free changed the arena"
                );
                w.audit(step, "bad free");
            }
            5 => {
                let base = if i.one_in(2) {
                    0x20_0000 + (i.below(64) << 14)
                } else {
                    i.u64()
                };
                let size = i.size(0x4000);
                let ok_before = w.child.stats().total;
                match w.child.add(base, size) {
                    Ok(()) => {
                        let overlaps = |b: u64, s: u64| base < b + s && b < base + size;
                        assert!(
                            !overlaps(SPAN_BASE, SPAN_SIZE)
                                && !w.added.iter().any(|(&b, &s)| overlaps(b, s)),
                            "step {step}: add of overlapping span [{base:#x}, +{size:#x}) accepted"
                        );
                        w.added.insert(base, size);
                    }
                    Err(_) => assert_eq!(
                        w.child.stats().total,
                        ok_before,
                        "step {step}: failed add changed the arena"
                    ),
                }
                w.audit(step, "add");
            }
            _ => {
                w.child.reap();
                w.audit(step, "reap");
            }
        }
    }
    // Everything back: the child returns every import once its caches drain.
    for (a, s) in std::mem::take(&mut w.live) {
        if let Err(e) = w.child.free(a, s) {
            panic!("teardown: free of live [{a:#x}, +{s:#x}) refused: {e}");
        }
    }
    w.child.drain();
    w.audit(step, "teardown");
    let s = w.child.stats();
    assert_eq!(
        (s.in_use, s.cached, s.imported),
        (0, 0, 0),
        "teardown: the child still holds {s:?}"
    );
    assert_eq!(
        w.parent.stats().in_use,
        0,
        "teardown: an import leaked to the parent"
    );
}
