//! vmem against a model: random sequences of alloc / xalloc (every constraint) / free / bad
//! frees / span adds / imports / quantum-cache traffic on several CPUs / reaps, checked after
//! every step against a `BTreeMap` of allocated ranges and by `Arena::audit`; then everything
//! freed, and the arena must be back to its spans, with every import released and the caches
//! empty. Plus: constant work per alloc+free under churn from 10^2 to 10^6 live segments, and
//! exhaustion / failing sources.
//!
//! Cases: `PROPTEST_CASES` (default 32). A failure prints the minimal failing op sequence and
//! proptest's seed (persisted under `proptest-regressions/`), which reproduce it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys::vmem::{
    Arena, ArenaConfig, Policy, VmemError, VmemSource, VmemStats, ADDR_MAX, ADDR_MIN,
};

const Q: u64 = 0x100;
const INIT_BASE: u64 = 0x1000_0000;
const INIT_SIZE: u64 = 256 * Q;
const PARENT_BASE: u64 = 0x1_0000_0000;
const PARENT_SIZE: u64 = 1 << 32;
const ADD_BASE: u64 = 0x4000_0000;
const ADD_STRIDE: u64 = 0x10_0000;
const NCPU: usize = 3;
const QCACHE_MAX: u64 = 4 * Q;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        q: u64,
        policy: Policy,
        cpu: usize,
    },
    XAlloc {
        q: u64,
        align_shift: u32,
        phase_q: u64,
        nocross_shift: Option<u32>,
        range: u8,
        off: u64,
        policy: Policy,
    },
    Free {
        idx: usize,
        cpu: usize,
    },
    BadFree {
        kind: u8,
        idx: usize,
        cpu: usize,
    },
    Add {
        slot: u64,
        q: u64,
    },
    AddOverlap {
        idx: usize,
    },
    Reap,
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::InstantFit),
        Just(Policy::BestFit),
        Just(Policy::NextFit)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..=24u64, policy(), 0..NCPU).prop_map(|(q, policy, cpu)| Op::Alloc { q, policy, cpu }),
        3 => (1..=8u64, 0..=4u32, 0..16u64, proptest::option::of(0..=2u32), 0..3u8, 0..4096u64, policy())
            .prop_map(|(q, align_shift, phase_q, nocross_shift, range, off, policy)| Op::XAlloc {
                q, align_shift, phase_q, nocross_shift, range, off, policy
            }),
        6 => (any::<usize>(), 0..NCPU).prop_map(|(idx, cpu)| Op::Free { idx, cpu }),
        2 => (0..5u8, any::<usize>(), 0..NCPU).prop_map(|(kind, idx, cpu)| Op::BadFree { kind, idx, cpu }),
        1 => (0..8u64, 1..64u64).prop_map(|(slot, q)| Op::Add { slot, q }),
        1 => any::<usize>().prop_map(|idx| Op::AddOverlap { idx }),
        1 => Just(Op::Reap),
    ]
}

struct Model {
    live: BTreeMap<u64, u64>,
    freed: Vec<(u64, u64)>,
    /// Spans added (not imported): start -> size.
    spans: BTreeMap<u64, u64>,
}

impl Model {
    fn overlaps(&self, a: u64, s: u64) -> bool {
        self.live
            .range(..a + s)
            .next_back()
            .is_some_and(|(&b, &bs)| b + bs > a)
    }

    fn in_some_span(&self, a: u64, s: u64) -> bool {
        let in_added = self
            .spans
            .range(..=a)
            .next_back()
            .is_some_and(|(&b, &bs)| a + s <= b + bs);
        in_added || (a >= PARENT_BASE && a + s <= PARENT_BASE + PARENT_SIZE)
    }

    fn nth(&self, idx: usize) -> Option<(u64, u64)> {
        if self.live.is_empty() {
            return None;
        }
        self.live
            .iter()
            .nth(idx % self.live.len())
            .map(|(&a, &s)| (a, s))
    }
}

fn no_work(mut s: VmemStats) -> VmemStats {
    s.work = 0;
    s
}

fn check(parent: &Arena, child: &Arena, m: &Model) -> Result<(), TestCaseError> {
    if let Err(e) = child.audit() {
        return Err(TestCaseError::fail(format!("child audit: {e}")));
    }
    if let Err(e) = parent.audit() {
        return Err(TestCaseError::fail(format!("parent audit: {e}")));
    }
    let s = child.stats();
    prop_assert_eq!(s.in_use, m.live.values().sum::<u64>());
    prop_assert_eq!(s.live, m.live.len() as u64);
    prop_assert_eq!(s.total, s.in_use + s.cached + s.free);
    prop_assert_eq!(parent.stats().in_use, s.imported);
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let parent = Arc::new(Arena::create("parent", PARENT_BASE, PARENT_SIZE, Q).unwrap());
    let child = Arena::new(
        ArenaConfig::new("child", Q)
            .span(INIT_BASE, INIT_SIZE)
            .qcache(QCACHE_MAX, NCPU)
            .source(parent.clone(), 16 * Q),
    )
    .unwrap();
    let mut m = Model {
        live: BTreeMap::new(),
        freed: Vec::new(),
        spans: BTreeMap::new(),
    };
    m.spans.insert(INIT_BASE, INIT_SIZE);
    for op in ops {
        match op {
            Op::Alloc { q, policy, cpu } => {
                let size = q * Q;
                let a = match child.alloc_on(cpu, size, policy) {
                    Ok(a) => a,
                    Err(e) => return Err(TestCaseError::fail(format!("alloc {size:#x}: {e}"))),
                };
                prop_assert_eq!(a % Q, 0);
                prop_assert!(!m.overlaps(a, size), "{:#x}+{:#x} overlaps", a, size);
                prop_assert!(m.in_some_span(a, size));
                m.live.insert(a, size);
            }
            Op::XAlloc {
                q,
                align_shift,
                phase_q,
                nocross_shift,
                range,
                off,
                policy,
            } => {
                let size = q * Q;
                let align = Q << align_shift;
                let phase = (phase_q * Q) % align;
                let nocross = nocross_shift.map_or(0, |n| size.next_power_of_two().max(align) << n);
                let (min, max) = match range {
                    0 => (ADDR_MIN, ADDR_MAX),
                    1 => (INIT_BASE + off % 128 * Q, INIT_BASE + INIT_SIZE - 1),
                    _ => {
                        let lo = PARENT_BASE + off * 16 * Q;
                        (lo, lo + 64 * Q - 1)
                    }
                };
                match child.xalloc(size, align, phase, nocross, min, max, policy) {
                    Ok(a) => {
                        prop_assert_eq!(a % align, phase);
                        if let Some(nc) = std::num::NonZeroU64::new(nocross) {
                            prop_assert_eq!(a / nc, (a + size - 1) / nc);
                        }
                        prop_assert!(a >= min && a + size - 1 <= max);
                        prop_assert!(!m.overlaps(a, size));
                        prop_assert!(m.in_some_span(a, size));
                        m.live.insert(a, size);
                    }
                    Err(VmemError::Exhausted { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("xalloc: {e}"))),
                }
            }
            Op::Free { idx, cpu } => {
                if let Some((a, s)) = m.nth(idx) {
                    prop_assert_eq!(child.free_on(cpu, a, s), Ok(()));
                    m.live.remove(&a);
                    m.freed.push((a, s));
                }
            }
            Op::BadFree { kind, idx, cpu } => {
                let before = (no_work(child.stats()), no_work(parent.stats()));
                let bad = match kind {
                    // Double free (unless the address was allocated again since).
                    0 => m.freed.get(idx % m.freed.len().max(1)).copied(),
                    // Wrong sizes.
                    1 => m.nth(idx).map(|(a, s)| (a, s + Q)),
                    2 => m.nth(idx).filter(|&(_, s)| s > Q).map(|(a, s)| (a, s - Q)),
                    // Part of a segment.
                    3 => m.nth(idx).filter(|&(_, s)| s > Q).map(|(a, _)| (a + Q, Q)),
                    // Never allocated (outside the spans, or free space of the initial span).
                    _ => Some((INIT_BASE + INIT_SIZE + (idx as u64 % 1000) * Q, Q)),
                };
                if let Some((a, s)) = bad {
                    if m.live.get(&a) == Some(&s) {
                        continue;
                    }
                    let r = child.free_on(cpu, a, s);
                    prop_assert!(r.is_err(), "bad free {:#x}+{:#x} accepted", a, s);
                    let msg = r.unwrap_err().to_string();
                    prop_assert!(!msg.is_empty());
                    prop_assert_eq!(before, (no_work(child.stats()), no_work(parent.stats())));
                }
            }
            Op::Add { slot, q } => {
                let base = ADD_BASE + slot * ADD_STRIDE;
                let r = child.add(base, q * Q);
                match m.spans.entry(base) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        prop_assert!(matches!(r, Err(VmemError::SpanOverlap { .. })), "{:?}", r);
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        prop_assert_eq!(r, Ok(()));
                        v.insert(q * Q);
                    }
                }
            }
            Op::AddOverlap { idx } => {
                let (&b, &s) = m.spans.iter().nth(idx % m.spans.len()).unwrap();
                let before = no_work(child.stats());
                let r = child.add(b + s - Q, 2 * Q);
                prop_assert!(matches!(r, Err(VmemError::SpanOverlap { .. })), "{:?}", r);
                prop_assert_eq!(before, no_work(child.stats()));
            }
            Op::Reap => {
                child.reap();
                prop_assert_eq!(child.stats().cached, 0);
            }
        }
        check(&parent, &child, &m)?;
    }
    // Free everything: the arena must be back to exactly its spans, one free segment each.
    for (a, s) in std::mem::take(&mut m.live) {
        prop_assert_eq!(child.free_on(0, a, s), Ok(()));
    }
    child.drain();
    check(&parent, &child, &m)?;
    let s = child.stats();
    let added: u64 = m.spans.values().sum();
    prop_assert_eq!((s.in_use, s.cached, s.imported, s.live), (0, 0, 0, 0));
    prop_assert_eq!((s.total, s.free), (added, added));
    prop_assert_eq!(s.imports, s.releases);
    prop_assert_eq!(parent.stats().in_use, 0);
    prop_assert_eq!(parent.stats().free, PARENT_SIZE);
    for (&b, &sz) in &m.spans {
        let a = child.xalloc(sz, 0, 0, 0, b, b + sz - 1, Policy::InstantFit);
        prop_assert_eq!(a, Ok(b), "span {:#x} not coalesced", b);
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arena_matches_model(ops in proptest::collection::vec(op(), 1..300)) {
        run(ops)?;
    }
}

/// Mean work per alloc+free pair under random churn with `live` live segments.
fn churn_work(live: usize, seed: u64) -> f64 {
    let a = Arena::create("churn", 0, 1 << 48, 0x1000).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut segs: Vec<(u64, u64)> = Vec::with_capacity(live + 1);
    let alloc = |a: &Arena, rng: &mut SmallRng| {
        let s = rng.gen_range(1..=8u64) * 0x1000;
        (a.alloc(s, Policy::InstantFit).unwrap(), s)
    };
    for _ in 0..live {
        segs.push(alloc(&a, &mut rng));
    }
    let pairs = 20_000;
    let mut w = 0.0;
    // A first round to reach the churn's steady state, then the measured one.
    for _ in 0..2 {
        let w0 = a.work();
        for _ in 0..pairs {
            let i = rng.gen_range(0..segs.len());
            let (x, s) = segs.swap_remove(i);
            a.free(x, s).unwrap();
            segs.push(alloc(&a, &mut rng));
        }
        w = (a.work() - w0) as f64 / pairs as f64;
    }
    w
}

#[test]
fn alloc_free_work_is_constant_in_the_live_count() {
    let seed = std::env::var("VMEM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let works: Vec<(usize, f64)> = [100, 1_000, 10_000, 100_000, 1_000_000]
        .iter()
        .map(|&n| (n, churn_work(n, seed)))
        .collect();
    println!("VMEM_SEED={seed}: work per pair {works:?}");
    let base = works[0].1;
    for &(n, w) in &works {
        assert!(
            w <= 1.5 * base + 4.0,
            "VMEM_SEED={seed}: {w} steps per pair at {n} live vs {base} at 100"
        );
    }
}

/// A source that fails after `ok` imports, and counts what is out.
struct Flaky {
    next: AtomicU64,
    ok: AtomicU64,
    out: AtomicU64,
}

impl VmemSource for Flaky {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError> {
        if self.ok.load(Ordering::Relaxed) == 0 {
            return Err(VmemError::ImportFailed { size });
        }
        self.ok.fetch_sub(1, Ordering::Relaxed);
        let b = self
            .next
            .fetch_add(size + align, Ordering::Relaxed)
            .div_ceil(align)
            * align;
        self.out.fetch_add(size, Ordering::Relaxed);
        Ok(b)
    }

    fn release(&self, _base: u64, size: u64) {
        self.out.fetch_sub(size, Ordering::Relaxed);
    }
}

#[test]
fn exhaustion_and_failing_imports_are_errors_and_leak_nothing() {
    let src = Arc::new(Flaky {
        next: AtomicU64::new(1 << 40),
        ok: AtomicU64::new(3),
        out: AtomicU64::new(0),
    });
    let a = Arena::new(
        ArenaConfig::new("flaky", Q)
            .qcache(2 * Q, 2)
            .source(src.clone(), 8 * Q),
    )
    .unwrap();
    let mut xs = Vec::new();
    let err = loop {
        match a.alloc_on(xs.len() % 2, 2 * Q, Policy::InstantFit) {
            Ok(x) => xs.push(x),
            Err(e) => break e,
        }
        assert!(xs.len() <= 12);
    };
    assert_eq!(err, VmemError::ImportFailed { size: 8 * Q });
    assert_eq!(xs.len(), 12, "three imports of 8 quanta, 2 quanta each");
    a.audit().unwrap();
    let before = a.stats();
    assert!(a.alloc(Q, Policy::BestFit).is_err());
    assert_eq!(a.stats().imported, before.imported);
    for (k, x) in xs.into_iter().enumerate() {
        a.free_on(k % 2, x, 2 * Q).unwrap();
    }
    assert_eq!(
        src.out.load(Ordering::Relaxed),
        24 * Q,
        "cached segments keep their spans"
    );
    a.drain();
    a.audit().unwrap();
    assert_eq!(src.out.load(Ordering::Relaxed), 0);
    // A plain arena runs out with an error too.
    let b = Arena::create("small", 0, 4 * Q, Q).unwrap();
    assert!(b.alloc(4 * Q, Policy::NextFit).is_ok());
    assert_eq!(
        b.alloc(Q, Policy::InstantFit),
        Err(VmemError::Exhausted { size: Q })
    );
}
