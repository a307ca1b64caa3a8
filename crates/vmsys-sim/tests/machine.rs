//! The foundation suite: walker, TLB, walk caches, IPIs and the stale-translation detector, one
//! generic test function per behaviour, run for every format (amd64, LA57, arm64, i386, PAE).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys::arch::{Entry, FormatId, Prot, PteFlags};
use vmsys::platform::{
    AccessKind, CpuSet, FaultReason, FaultResolution, IpiMessage, Platform, PlatformError,
    RootLoad, TagSel, TlbInval,
};
use vmsys::{PhysAddr, VirtAddr};
use vmsys_sim::testkit::Kit;
use vmsys_sim::{DetectorMode, MachineConfig, ViolationKind};

/// Every leaf size of the format maps, reads and writes the right frame; user pages are usable
/// from user mode, supervisor pages are not.
fn maps_every_leaf_size(f: FormatId) {
    let m = machine(f, 1);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let sizes: Vec<u64> = kit.fmt.leaf_sizes().collect();
    assert!(sizes.len() >= 2, "{f}: every format has a superpage size");
    let mut cases = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let va = kva(&kit, size, 1 + i as u64);
        let pa = frame(size, 1);
        let root = roots.for_va(&kit, va);
        kit.map(root, va, pa, size, RW, af()).unwrap();
        cases.push((va, pa, size));
    }
    let uv = uva(&kit, 4096, 3);
    let upa = frame(4096, 7);
    kit.map(roots.user, uv, upa, 4096, URW, af()).unwrap();
    m.run_on(0, |c| {
        activate(&m, roots, 0);
        for &(va, pa, size) in &cases {
            for off in [0, 8, size / 2, size - 8] {
                c.write_u64(va + off, va ^ off).unwrap();
                assert_eq!(
                    m.mem().load_u64(pa + off),
                    va ^ off,
                    "{f}: size {size:#x} off {off:#x}"
                );
                assert_eq!(c.read_u64(va + off).unwrap(), va ^ off);
            }
        }
        c.set_user(true);
        c.write_u64(uv + 16, 42).unwrap();
        assert_eq!(m.mem().load_u64(upa + 16), 42);
        let e = c.read_u64(cases[0].0).unwrap_err();
        assert_eq!(
            e.reason,
            FaultReason::Protection {
                level: kit.level_for(sizes[0]).unwrap() as u8
            }
        );
        assert!(e.user);
        c.set_user(false);
    });
    assert_eq!(m.detector().violation_count(), 0);
    assert!(m.audit().is_empty());
}

/// Faults carry the address, the access and the reason.
fn faults_are_reported(f: FormatId) {
    let m = machine(f, 1);
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    m.set_fault_handler(Arc::new(move |_| {
        s2.fetch_add(1, Ordering::SeqCst);
        FaultResolution::Deliver
    }));
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let ro = kva(&kit, 4096, 1);
    kit.map(roots.kernel, ro, frame(4096, 1), 4096, Prot::empty(), af())
        .unwrap();
    let leaf_level = kit.level_for(4096).unwrap() as u8;
    m.run_on(0, |c| {
        activate(&m, roots, 0);
        assert_eq!(c.read_u64(ro).unwrap(), 0);
        let e = c.write_u64(ro, 1).unwrap_err();
        assert_eq!(
            (e.va, e.access, e.user),
            (VirtAddr::new(ro), AccessKind::Write, false)
        );
        assert_eq!(e.reason, FaultReason::Protection { level: leaf_level });
        // Unmapped: the next 4 KiB page has a table but no entry; far away, no table at all.
        let e = c.read_u64(ro + 4096).unwrap_err();
        assert_eq!(e.reason, FaultReason::NotPresent { level: leaf_level });
        let far = kva(&kit, 1 << 22, 40);
        assert!(matches!(
            c.read_u64(far).unwrap_err().reason,
            FaultReason::NotPresent { .. }
        ));
        let noncanonical = match f {
            FormatId::Amd64 => 0x0000_8000_0000_0000,
            FormatId::Amd64La57 => 0x0100_0000_0000_0000,
            FormatId::Arm64 => 0x0001_0000_0000_0000,
            FormatId::I386 | FormatId::I386Pae => 1 << 32,
        };
        assert_eq!(
            c.read_u64(noncanonical).unwrap_err().reason,
            FaultReason::NonCanonical
        );
        if f != FormatId::I386 {
            // Execute-disable: kernel data mapped without EXEC cannot be fetched.
            assert!(matches!(
                c.fetch_u64(ro).unwrap_err().reason,
                FaultReason::Protection { .. }
            ));
        } else {
            assert!(
                c.fetch_u64(ro).is_ok(),
                "i386 2-level has no execute-disable"
            );
        }
    });
    let expected = if f == FormatId::I386 { 4 } else { 5 };
    assert_eq!(
        seen.load(Ordering::SeqCst),
        expected,
        "the kernel's fault handler saw every fault"
    );
    assert_eq!(m.counters().faults, seen.load(Ordering::SeqCst));
}

/// The MMU sets accessed on a walk and dirty on a write, atomically, as the hardware does.
fn accessed_and_dirty(f: FormatId) {
    let m = machine(f, 1);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let va = kva(&kit, 4096, 5);
    let slot = kit
        .map(
            roots.kernel,
            va,
            frame(4096, 2),
            4096,
            RW,
            PteFlags::empty(),
        )
        .unwrap();
    let level = kit.level_for(4096).unwrap();
    let flags = |kit: &Kit<'_>| match kit.fmt.decode(kit.load(slot), level) {
        Entry::Leaf { flags, .. } => flags,
        other => panic!("{f}: not a leaf: {other:?}"),
    };
    assert!(!flags(&kit).intersects(PteFlags::ACCESSED | PteFlags::DIRTY));
    m.run_on(0, |c| {
        activate(&m, roots, 0);
        c.read_u64(va).unwrap();
        assert!(
            flags(&kit).contains(PteFlags::ACCESSED),
            "{f}: read sets accessed"
        );
        assert!(
            !flags(&kit).contains(PteFlags::DIRTY),
            "{f}: read leaves dirty clear"
        );
        // The TLB entry is clean: the write goes back to the tables to set dirty.
        c.write_u64(va, 1).unwrap();
        assert!(
            flags(&kit).contains(PteFlags::DIRTY),
            "{f}: write sets dirty"
        );
    });
    assert!(m.counters().ad_updates >= 2);
    assert_eq!(m.detector().violation_count(), 0);
}

/// Hits, misses, walks and walk-cache hits are counted, per CPU.
fn tlb_and_walk_cache_counters(f: FormatId) {
    let m = machine(f, 2);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let va = kva(&kit, 4096, 0);
    kit.map_range(roots.kernel, va, frame(4096, 0), 8, RW, af())
        .unwrap();
    m.run_on(1, |c| {
        activate(&m, roots, 0);
        c.read_u64(va).unwrap();
        c.read_u64(va + 8).unwrap();
        c.read_u64(va + 4096).unwrap();
    });
    let s = m.cpu_counters(1);
    assert_eq!((s.tlb_misses, s.tlb_hits, s.walks), (2, 1, 2), "{f}: {s:?}");
    assert_eq!(
        s.walk_cache_hits, 1,
        "{f}: the second page's walk starts from the walk cache"
    );
    assert_eq!(m.cpu_counters(0).walks, 0);
}

/// The hazard: a PTE changes and another CPU's TLB keeps the old frame. Without the shootdown the
/// detector catches it every time (when the update closes, and again at the use); with it, never.
fn missed_invalidation_is_detected(f: FormatId) {
    for round in 0..20 {
        for correct in [false, true] {
            let m = machine(f, 2);
            let mut kit = Kit::new(&m, POOL.0, POOL.1);
            let roots = Roots::new(&mut kit);
            let va = kva(&kit, 4096, 9);
            let (a, b) = (frame(4096, 1), frame(4096, 2));
            m.mem().store_u64(a, 0xaaaa);
            m.mem().store_u64(b, 0xbbbb);
            let slot = kit.map(roots.kernel, va, a, 4096, RW, af()).unwrap();
            activate_all(&m, roots);
            m.run_on(1, |c| assert_eq!(c.read_u64(va).unwrap(), 0xaaaa));
            m.run_on(0, |_| {
                m.pt_update_begin(VirtAddr::new(va), VirtAddr::new(va + 4096));
                // Break-before-make (required on arm64, harmless elsewhere): invalid first.
                kit.store(slot, 0);
                local_invalidate(&m, va);
                if correct {
                    shootdown(&m, va);
                }
                kit.store(slot, kit.leaf(b, 4096, RW, af()).unwrap());
                m.pt_update_end();
            });
            let got = m.run_on(1, |c| c.read_u64(va).unwrap());
            let v = m.detector().violations();
            if correct {
                assert_eq!(got, 0xbbbb);
                assert!(v.is_empty(), "{f} round {round}: false positive {v:?}");
                assert!(m.audit().is_empty());
            } else {
                assert_eq!(got, 0xaaaa, "{f}: the stale entry is still used");
                // Found twice: when the update closed (DET-7), and at the use (DET-1).
                assert_eq!(v.len(), 2, "{f} round {round}: {v:?}");
                for x in &v {
                    assert_eq!(x.cpu, 1);
                    assert!(matches!(x.kind, ViolationKind::StaleTlb { .. }), "{x:?}");
                }
                assert!(!m.audit().is_empty(), "{f}: the audit finds it too");
            }
        }
    }
}

/// A freed page-table page still cached in another CPU's walk cache. x86: the changer forgot
/// the IPI (INVLPG on the other CPU would have dropped the walk cache); arm64: it broadcast a
/// leaf-only TLBI (VALE1IS), which leaves the walk caches alone.
fn missed_walk_cache_invalidation_is_detected(f: FormatId) {
    for correct in [false, true] {
        let m = machine(f, 2);
        let mut kit = Kit::new(&m, POOL.0, POOL.1);
        let roots = Roots::new(&mut kit);
        let leaf = kit.level_for(4096).unwrap();
        let region = 1u64 << kit.fmt.levels[leaf - 1].shift;
        let va1 = kva(&kit, region, 2);
        let va2 = va1 + 4096;
        let (a, c2) = (frame(4096, 1), frame(4096, 3));
        m.mem().store_u64(a, 0xaaaa);
        m.mem().store_u64(c2, 0xcccc);
        kit.map(roots.kernel, va1, a, 4096, RW, af()).unwrap();
        let parent = kit.find_slot(roots.kernel, va1, leaf - 1).unwrap();
        let old_table = kit.fmt.pa(kit.load(parent), leaf - 1).unwrap();
        activate_all(&m, roots);
        m.run_on(1, |c| assert_eq!(c.read_u64(va1).unwrap(), 0xaaaa));
        m.run_on(0, |_| {
            m.pt_update_begin(VirtAddr::new(va1), VirtAddr::new(va1 + region));
            // Unmap the whole table and free it, then install a fresh table mapping va2.
            kit.store(parent, 0);
            let inv = TlbInval::Page {
                va: VirtAddr::new(va1),
                tag: TagSel::Current,
                leaf_only: !correct,
            };
            if m.format() == FormatId::Arm64 {
                m.tlb_invalidate_broadcast(inv).unwrap();
            } else {
                m.tlb_invalidate_local(inv);
                if correct {
                    shootdown(&m, va1);
                }
            }
            m.phys_zero(PhysAddr::new(old_table), 4096); // the freed table is reused
            let t2 = kit.alloc_page().unwrap();
            kit.store(
                kit.slot(t2, leaf, va2),
                kit.leaf(c2, 4096, RW, af()).unwrap(),
            );
            kit.store(parent, kit.fmt.make_table(t2, leaf - 1).unwrap());
            m.pt_update_end();
        });
        let r = m.run_on(1, |c| c.read_u64(va2));
        let v = m.detector().violations();
        if correct {
            assert_eq!(r.unwrap(), 0xcccc);
            assert!(v.is_empty(), "{f}: {v:?}");
            assert!(m.audit().is_empty());
        } else {
            // The walk went through the stale cached table (now zeroed) and faulted.
            assert!(r.is_err(), "{f}: {r:?}");
            assert!(
                v.iter()
                    .any(|x| matches!(x.kind, ViolationKind::StaleWalkCache { .. }) && x.cpu == 1),
                "{f}: {v:?}"
            );
        }
    }
}

/// PAE latches the four PDPTEs on a CR3 write: changing one in memory without a reload leaves the
/// CPU on the old page directory.
#[test]
fn pae_missed_cr3_reload_is_detected() {
    for reload in [false, true] {
        let m = machine(FormatId::I386Pae, 1);
        let mut kit = Kit::new(&m, POOL.0, POOL.1);
        let roots = Roots::new(&mut kit);
        let va = uva(&kit, 4096, 0); // 0x4000_0000: PDPTE 1
        assert_eq!(va >> 30, 1);
        kit.map(roots.user, va, frame(4096, 1), 4096, URW, af())
            .unwrap();
        m.mem().store_u64(frame(4096, 2), 0x2222);
        m.run_on(0, |c| {
            activate(&m, roots, 0);
            assert_eq!(c.read_u64(va).unwrap(), 0);
            m.pt_update_begin(VirtAddr::new(1 << 30), VirtAddr::new(2 << 30));
            // A new page directory for the second gigabyte.
            let pd = kit.alloc_page().unwrap();
            let pt = kit.alloc_page().unwrap();
            kit.store(kit.slot(pd, 1, va), kit.fmt.make_table(pt, 1).unwrap());
            kit.store(
                kit.slot(pt, 2, va),
                kit.leaf(frame(4096, 2), 4096, URW, af()).unwrap(),
            );
            kit.store(
                kit.slot(roots.user, 0, va),
                kit.fmt.make_table(pd, 0).unwrap(),
            );
            if reload {
                m.load_root(RootLoad {
                    root: PhysAddr::new(roots.user),
                    tag: 0,
                    flush: true,
                });
            }
            m.pt_update_end();
            let got = c.read_u64(va + 4096 * 3);
            if reload {
                assert!(got.is_err(), "the new directory maps only the first page");
                assert_eq!(c.read_u64(va).unwrap(), 0x2222);
            }
        });
        let v = m.detector().violations();
        if reload {
            assert!(v.is_empty(), "{v:?}");
            assert!(m.audit().is_empty());
        } else {
            assert!(
                v.iter()
                    .any(|x| matches!(x.kind, ViolationKind::StalePdpte { index: 1, .. })),
                "{v:?}"
            );
        }
    }
}

/// arm64: replacing a table descriptor by a block without break-before-make is caught at the
/// store; with break-before-make it is not. A block filled while a stale 4 KiB entry survives
/// (the TLBI forgotten) is a TLB conflict.
#[test]
fn arm64_break_before_make_violation_is_detected() {
    let f = FormatId::Arm64;
    for bbm in [false, true] {
        let m = machine(f, 2);
        let mut kit = Kit::new(&m, POOL.0, POOL.1);
        let roots = Roots::new(&mut kit);
        let va = kva(&kit, 2 << 20, 3);
        kit.map_range(roots.kernel, va, frame(2 << 20, 1), 4, RW, af())
            .unwrap();
        activate_all(&m, roots);
        m.run_on(1, |c| c.read_u64(va).unwrap());
        let l2 = kit.find_slot(roots.kernel, va, 2).unwrap();
        let block = kit.leaf(frame(2 << 20, 3), 2 << 20, RW, af()).unwrap();
        m.run_on(0, |_| {
            m.pt_update_begin(VirtAddr::new(va), VirtAddr::new(va + (2 << 20)));
            if bbm {
                kit.store(l2, 0);
                shootdown(&m, va);
                kit.store(l2, block);
            } else {
                kit.store(l2, block);
                // The bug compounded: the TLBI names the wrong page, so CPU 1's walk cache for
                // the region goes but its 4 KiB entry for `va` stays.
                let wrong = TlbInval::Page {
                    va: VirtAddr::new(va + 8192),
                    tag: TagSel::Any,
                    leaf_only: false,
                };
                m.tlb_invalidate_broadcast(wrong).unwrap();
            }
            m.pt_update_end();
        });
        let v = m.detector().violations();
        if bbm {
            assert!(v.is_empty(), "{v:?}");
            assert_eq!(m.run_on(1, |c| c.read_u64(va).unwrap()), 0);
            assert!(m.audit().is_empty());
        } else {
            assert!(
                v.iter()
                    .any(|x| matches!(x.kind, ViolationKind::BreakBeforeMake { .. })),
                "{v:?}"
            );
            // CPU 1 still holds the 4 KiB entry; a neighbouring access fills the block: conflict.
            m.detector().clear();
            m.run_on(1, |c| c.read_u64(va + 8192).unwrap());
            let v = m.detector().violations();
            assert!(
                v.iter()
                    .any(|x| matches!(x.kind, ViolationKind::TlbConflict { .. })),
                "{v:?}"
            );
        }
    }
}

/// Global entries survive an address-space switch, non-global ones do not; PCID/ASID-tagged
/// entries survive a no-flush switch and come back into use.
fn tags_and_global_entries(f: FormatId) {
    let m = machine(f, 1);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let a = Roots::new(&mut kit);
    let mut b = Roots::new(&mut kit);
    if f != FormatId::Arm64 {
        b.kernel = b.user;
    } else {
        b.kernel = a.kernel; // one kernel half for every address space (TTBR1)
    }
    let kv = kva(&kit, 4096, 1);
    let uv = uva(&kit, 4096, 1);
    kit.map(
        a.kernel,
        kv,
        frame(4096, 1),
        4096,
        RW,
        af() | PteFlags::GLOBAL,
    )
    .unwrap();
    if f != FormatId::Arm64 {
        kit.map(
            b.kernel,
            kv,
            frame(4096, 1),
            4096,
            RW,
            af() | PteFlags::GLOBAL,
        )
        .unwrap();
    }
    kit.map(a.user, uv, frame(4096, 2), 4096, URW, af())
        .unwrap();
    kit.map(b.user, uv, frame(4096, 3), 4096, URW, af())
        .unwrap();
    let tagged = !matches!(f, FormatId::I386 | FormatId::I386Pae);
    m.run_on(0, |c| {
        activate(&m, a, 1);
        c.read_u64(kv).unwrap();
        c.read_u64(uv).unwrap();
        let before = m.cpu_counters(0);
        m.load_root(RootLoad {
            root: PhysAddr::new(b.user),
            tag: 2,
            flush: tagged,
        });
        c.read_u64(kv).unwrap(); // global: still a hit
        c.read_u64(uv).unwrap(); // b's page: a miss
        let mid = m.cpu_counters(0);
        assert_eq!(
            mid.tlb_hits - before.tlb_hits,
            1,
            "{f}: the global entry survives"
        );
        assert_eq!(mid.tlb_misses - before.tlb_misses, 1, "{f}");
        m.load_root(RootLoad {
            root: PhysAddr::new(a.user),
            tag: 1,
            flush: false,
        });
        c.read_u64(uv).unwrap();
        let after = m.cpu_counters(0);
        if tagged {
            assert_eq!(
                after.tlb_hits - mid.tlb_hits,
                1,
                "{f}: tag 1's entry is still there"
            );
        } else {
            assert_eq!(
                after.tlb_misses - mid.tlb_misses,
                1,
                "{f}: a CR3 write always flushes"
            );
        }
    });
    assert_eq!(m.detector().violation_count(), 0);
    assert!(m.audit().is_empty());
}

/// x86 has no broadcast invalidation and no TTBR1; arm64 has both.
fn platform_capabilities(f: FormatId) {
    let m = machine(f, 2);
    m.run_on(0, |_| {
        let inv = TlbInval::All;
        let r = m.tlb_invalidate_broadcast(inv);
        let k = m.load_kernel_root(PhysAddr::new(0x1000));
        if f == FormatId::Arm64 {
            assert_eq!((r, k), (Ok(()), Ok(())));
        } else {
            assert_eq!(
                (r, k),
                (
                    Err(PlatformError::Unsupported),
                    Err(PlatformError::Unsupported)
                )
            );
        }
        let bad = CpuSet::single(7);
        assert_eq!(
            m.send_ipi(
                &bad,
                IpiMessage {
                    vector: 1,
                    args: [0; 4]
                },
                true
            ),
            Err(PlatformError::BadCpu(7))
        );
    });
    assert_eq!(
        m.send_ipi(
            &CpuSet::single(0),
            IpiMessage {
                vector: 1,
                args: [0; 4]
            },
            false
        ),
        Err(PlatformError::NotOnCpu)
    );
}

/// Eight CPUs on two host cores shoot each other down at once, over and over: no deadlock, every
/// IPI handled exactly once.
fn mutual_shootdowns_do_not_deadlock(f: FormatId) {
    let m = machine(f, 8);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let va = kva(&kit, 4096, 0);
    kit.map_range(roots.kernel, va, frame(4096, 0), 16, RW, af())
        .unwrap();
    activate_all(&m, roots);
    let handled = Arc::new(AtomicU64::new(0));
    let h2 = handled.clone();
    m.set_ipi_handler(
        0x42,
        Arc::new(move |_| {
            h2.fetch_add(1, Ordering::Relaxed);
        }),
    );
    let barrier = Barrier::new(8);
    m.run_on_all(|c| {
        barrier.wait();
        let mut all = CpuSet::first_n(8);
        all.remove(c.id());
        for i in 0..100u64 {
            m.send_ipi(
                &all,
                IpiMessage {
                    vector: 0x42,
                    args: [i, 0, 0, 0],
                },
                true,
            )
            .unwrap();
            c.read_u64(va + (i % 16) * 4096).unwrap();
        }
    });
    let s = m.counters();
    assert_eq!(s.ipis_sent, 8 * 7 * 100);
    assert_eq!(s.ipis_handled, s.ipis_sent);
    assert_eq!(handled.load(Ordering::Relaxed), s.ipis_sent);
    // Two CPUs in lock-step, each waiting for the other.
    let m2 = machine(f, 2);
    // A host barrier is not an interrupt point: a CPU blocked in it could never take the other's
    // IPI. Spin instead, taking interrupts, as a kernel's rendezvous does.
    let arrived = AtomicU64::new(0);
    m2.run_on_all(|c| {
        let other = CpuSet::single(1 - c.id());
        for round in 0..500u64 {
            arrived.fetch_add(1, Ordering::SeqCst);
            while arrived.load(Ordering::SeqCst) < 2 * (round + 1) {
                c.take_interrupts();
                std::thread::yield_now();
            }
            m2.send_ipi(
                &other,
                IpiMessage {
                    vector: SHOOTDOWN_VECTOR,
                    args: [0; 4],
                },
                true,
            )
            .unwrap();
        }
    });
    assert_eq!(m2.counters().ipis_handled, 1000);
}

/// Seeded stress: every CPU reads and writes a region while CPU 0 remaps its pages to other
/// frames with correct shootdowns. Every read sees a frame the page may map; no violations.
fn concurrent_remaps_are_coherent(f: FormatId) {
    let seed = seed(0x5eed ^ f as u64);
    let cpus = 8;
    let m = machine(f, cpus);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    const PAGES: u64 = 32;
    let va = kva(&kit, 4096, 0);
    // Page i maps frame i or frame PAGES + i; each frame's first word names it.
    for fr in 0..2 * PAGES {
        m.mem().store_u64(frame(4096, fr), fr);
    }
    let slots: Vec<u64> = (0..PAGES)
        .map(|i| {
            kit.map(roots.kernel, va + i * 4096, frame(4096, i), 4096, RW, af())
                .unwrap()
        })
        .collect();
    activate_all(&m, roots);
    // During a break-before-make window the page is briefly unmapped: the fault handler waits
    // (taking interrupts, as a kernel spinning on the pmap lock would) and retries.
    let weak = Arc::downgrade(&m);
    let (slots2, entry_bytes) = (slots.clone(), kit.fmt.entry_bytes());
    m.set_fault_handler(Arc::new(move |fault| {
        let m = weak.upgrade().unwrap();
        let p = ((fault.va.as_u64() - va) / 4096) as usize;
        assert!(
            p < slots2.len() && matches!(fault.reason, FaultReason::NotPresent { .. }),
            "{fault}"
        );
        let slot = PhysAddr::new(slots2[p]);
        let valid = |m: &vmsys_sim::Machine| {
            if entry_bytes == 4 {
                m.pt_load32(slot) != 0
            } else {
                m.pt_load64(slot) != 0
            }
        };
        while !valid(&m) {
            m.interrupt_point();
            std::thread::yield_now();
        }
        FaultResolution::Retry
    }));
    let kit = std::sync::Mutex::new(kit);
    m.run_on_all(|c| {
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(c.id() as u64));
        let mut flipped = [false; PAGES as usize];
        for op in 0..3000u64 {
            let p = rng.gen_range(0..PAGES);
            if c.id() == 0 && op % 10 == 0 {
                let k = kit.lock().unwrap();
                flipped[p as usize] ^= true;
                let to = if flipped[p as usize] { PAGES + p } else { p };
                let pva = va + p * 4096;
                m.pt_update_begin(VirtAddr::new(pva), VirtAddr::new(pva + 4096));
                k.store(slots[p as usize], 0);
                shootdown(&m, pva);
                k.store(
                    slots[p as usize],
                    k.leaf(frame(4096, to), 4096, RW, af()).unwrap(),
                );
                m.pt_update_end();
            } else {
                let got = c.read_u64(va + p * 4096).unwrap();
                assert!(
                    got == p || got == PAGES + p,
                    "seed {seed}: page {p} read frame {got}"
                );
                c.write_u64(va + p * 4096 + 8 + 8 * c.id() as u64, op)
                    .unwrap();
            }
        }
    });
    let v = m.detector().violations();
    assert!(v.is_empty(), "seed {seed}: {v:?}");
    assert!(m.audit().is_empty(), "seed {seed}");
    assert!(m.counters().remote_invalidations + m.counters().ipis_handled > 0);
}

/// The detector modes: off sees nothing on access (the audit still does); sampled sees it within
/// its period; every sees it at once.
fn detector_modes(f: FormatId) {
    for mode in [
        DetectorMode::Off,
        DetectorMode::Sampled(8),
        DetectorMode::Every,
    ] {
        let m = machine_with(MachineConfig::new(f).cpus(2).mem(mem_for(f)).detector(mode));
        let mut kit = Kit::new(&m, POOL.0, POOL.1);
        let roots = Roots::new(&mut kit);
        let va = kva(&kit, 4096, 1);
        let slot = kit
            .map(roots.kernel, va, frame(4096, 1), 4096, RW, af())
            .unwrap();
        activate_all(&m, roots);
        m.run_on(1, |c| c.read_u64(va).unwrap());
        m.run_on(0, |_| {
            kit.store(slot, 0);
            kit.store(slot, kit.leaf(frame(4096, 2), 4096, RW, af()).unwrap());
        });
        let first = m.run_on(1, |c| {
            (1..=16).find(|_| {
                c.read_u64(va).unwrap();
                m.detector().violation_count() > 0
            })
        });
        match mode {
            DetectorMode::Off => assert_eq!(first, None, "{f}"),
            DetectorMode::Sampled(n) => assert!(first.is_some_and(|k| k <= n), "{f}: {first:?}"),
            DetectorMode::Every => assert_eq!(first, Some(1), "{f}"),
        }
        assert_eq!(
            m.audit().len(),
            1,
            "{f} {mode:?}: the audit finds it in every mode"
        );
    }
}

/// Simulated RAM far beyond what the test touches (64 GiB on a host with less) costs nothing
/// until written.
#[test]
fn large_machine_reserves_memory_lazily() {
    let m = machine_with(MachineConfig::new(FormatId::Amd64).cpus(2).mem(64 << 30));
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let va = kva(&kit, 4096, 0);
    kit.map(roots.kernel, va, 60 << 30, 4096, RW, af()).unwrap();
    m.run_on(0, |c| {
        activate(&m, roots, 0);
        c.write_u64(va, 7).unwrap();
        assert_eq!(c.read_u64(va).unwrap(), 7);
    });
    assert!(
        m.mem().chunks_touched() <= 24,
        "{}",
        m.mem().chunks_touched()
    );
}

/// arm64 with a software-managed access flag: AF = 0 raises an Access Flag fault, the kernel's
/// handler sets AF and the access is retried.
#[test]
fn arm64_software_access_flag_fault() {
    let m = machine_with(
        MachineConfig::new(FormatId::Arm64)
            .cpus(1)
            .mem(1 << 30)
            .arm64_software_af(),
    );
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let va = kva(&kit, 4096, 2);
    let slot = kit
        .map(
            roots.kernel,
            va,
            frame(4096, 1),
            4096,
            RW,
            PteFlags::empty(),
        )
        .unwrap();
    let m2 = Arc::downgrade(&m);
    let hits = Arc::new(AtomicU64::new(0));
    let h2 = hits.clone();
    m.set_fault_handler(Arc::new(move |fault| {
        h2.fetch_add(1, Ordering::SeqCst);
        let m = m2.upgrade().unwrap();
        assert!(
            matches!(fault.reason, FaultReason::AccessFlag { level: 3 }),
            "{fault}"
        );
        let raw = m.pt_load64(PhysAddr::new(slot));
        m.pt_store64(PhysAddr::new(slot), raw | (1 << 10));
        FaultResolution::Retry
    }));
    m.run_on(0, |c| {
        activate(&m, roots, 0);
        assert_eq!(c.read_u64(va).unwrap(), 0);
    });
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(m.detector().violation_count(), 0);
}

/// The planted bug whose stale entry is never used: CPU 1 caches a translation, CPU 0 remaps
/// the page without a shootdown, and CPU 1 then drops the entry by itself (a full flush, as a
/// CR3 reload does). No access ever meets the stale entry and no later audit can see it; the
/// check made when the update bracket closes finds it every time, and never on the correct
/// variant.
fn unused_stale_entry_is_caught_when_the_update_closes(f: FormatId) {
    for round in 0..20 {
        for correct in [false, true] {
            let m = machine(f, 2);
            let mut kit = Kit::new(&m, POOL.0, POOL.1);
            let roots = Roots::new(&mut kit);
            let va = kva(&kit, 4096, 9);
            let (a, b) = (frame(4096, 1), frame(4096, 2));
            let slot = kit.map(roots.kernel, va, a, 4096, RW, af()).unwrap();
            activate_all(&m, roots);
            m.run_on(1, |c| c.read_u64(va).unwrap());
            m.run_on(0, |_| {
                m.pt_update_begin(VirtAddr::new(va), VirtAddr::new(va + 4096));
                kit.store(slot, 0);
                local_invalidate(&m, va);
                if correct {
                    shootdown(&m, va);
                }
                kit.store(slot, kit.leaf(b, 4096, RW, af()).unwrap());
                m.pt_update_end();
            });
            let v = m.detector().violations();
            if correct {
                assert!(v.is_empty(), "{f} round {round}: false positive {v:?}");
            } else {
                assert_eq!(v.len(), 1, "{f} round {round}: {v:?}");
                assert_eq!(v[0].cpu, 1);
                assert!(
                    matches!(v[0].kind, ViolationKind::StaleTlb { .. }),
                    "{:?}",
                    v[0]
                );
            }
            // CPU 1 flushes everything before it could use the entry: the audit has nothing
            // left to find, so only the check at the close could have caught the bug.
            m.run_on(1, |_| m.tlb_invalidate_local(TlbInval::All));
            assert!(m.audit().is_empty(), "{f} round {round}");
            assert_eq!(m.run_on(1, |c| c.read_u64(va).unwrap()), 0);
            assert_eq!(m.detector().violation_count(), u64::from(!correct));
        }
    }
}

/// `MachineConfig::omit_shootdown` plants the missing-shootdown bug in the machine: IPIs of
/// the named vector are dropped (reported as sent, their handler never runs), other vectors are
/// delivered, and a broadcast TLBI stays on the issuing CPU.
fn omit_shootdown_drops_only_the_shootdown(f: FormatId) {
    const OTHER: u8 = 0x40;
    let m = machine_with(
        MachineConfig::new(f)
            .cpus(2)
            .mem(mem_for(f))
            .omit_shootdown(SHOOTDOWN_VECTOR),
    );
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let other = Arc::new(AtomicU64::new(0));
    let o2 = other.clone();
    m.set_ipi_handler(
        OTHER,
        Arc::new(move |_| {
            o2.fetch_add(1, Ordering::SeqCst);
        }),
    );
    let va = kva(&kit, 4096, 3);
    kit.map(roots.kernel, va, frame(4096, 1), 4096, RW, af())
        .unwrap();
    activate_all(&m, roots);
    m.run_on(1, |c| c.read_u64(va).unwrap());
    m.run_on(0, |_| {
        shootdown(&m, va);
        let to_1 = CpuSet::single(1);
        m.send_ipi(
            &to_1,
            IpiMessage {
                vector: OTHER,
                args: [0; 4],
            },
            true,
        )
        .unwrap();
    });
    assert_eq!(other.load(Ordering::SeqCst), 1, "{f}: other vectors go");
    let c = m.counters();
    assert_eq!(c.ipis_handled, 1, "{f}: the shootdown IPI was dropped");
    assert_eq!(c.remote_invalidations, 0, "{f}: the broadcast stayed local");
    let (tlb1, _) = m.run_on(1, |c| c.cache_sizes());
    assert_eq!(tlb1, 1, "{f}: CPU 1 still holds the entry");
}

/// The pmap on a machine with the planted bug: CPU 1 runs the address space and reads a page,
/// CPU 0 unmaps it. `remove` returns with CPU 1 still holding the page, and the violation is
/// already recorded then (before CPU 1 runs again); on a correct machine, never.
fn pmap_remove_without_shootdown_is_caught_at_its_return(f: FormatId) {
    for round in 0..20 {
        for omit in [true, false] {
            let mut mcfg = machine_config(f, 2);
            if omit {
                mcfg = mcfg.omit_shootdown(vmsys::PmapConfig::default().shootdown_vector);
            }
            let e = env_on(mcfg, vmsys::PmapConfig::default());
            let p = e.sys.create().unwrap();
            let v = e.uva(4096, 3);
            e.m.run_on(0, |_| {
                e.sys.activate(&p).unwrap();
                e.sys
                    .enter(
                        &p,
                        VirtAddr::new(v),
                        PhysAddr::new(frame(4096, 5)),
                        Prot::WRITE,
                        vmsys::EnterFlags::empty(),
                        0,
                    )
                    .unwrap();
            });
            e.m.run_on(1, |c| {
                e.sys.activate(&p).unwrap();
                c.set_user(true);
                c.read_u64(v).unwrap();
            });
            e.m.run_on(0, |_| {
                e.sys
                    .remove(&p, VirtAddr::new(v), VirtAddr::new(v + 4096))
                    .unwrap()
            });
            let found = e.m.detector().violations();
            if omit {
                assert!(
                    found.iter().any(|x| x.cpu == 1 && x.va == v),
                    "{f} round {round}: {found:?}"
                );
            } else {
                assert!(found.is_empty(), "{f} round {round}: {found:?}");
                assert!(e.m.audit().is_empty());
            }
        }
    }
}

for_each_format! {
    leaf_sizes => super::maps_every_leaf_size;
    faults => super::faults_are_reported;
    ad_bits => super::accessed_and_dirty;
    counters => super::tlb_and_walk_cache_counters;
    missed_invalidation => super::missed_invalidation_is_detected;
    missed_walk_cache_invalidation => super::missed_walk_cache_invalidation_is_detected;
    tags_and_global => super::tags_and_global_entries;
    capabilities => super::platform_capabilities;
    mutual_shootdowns => super::mutual_shootdowns_do_not_deadlock;
    concurrent_remaps => super::concurrent_remaps_are_coherent;
    detector_modes_ => super::detector_modes;
    unused_stale_entry_caught_at_close => super::unused_stale_entry_is_caught_when_the_update_closes;
    omit_shootdown_setting => super::omit_shootdown_drops_only_the_shootdown;
    pmap_remove_without_shootdown => super::pmap_remove_without_shootdown_is_caught_at_its_return;
}

/// A handler that itself sends a waiting IPI back to the sender, while the target is idle (so
/// the sender's thread runs the handler on the target's behalf, its own CPU buried under it):
/// the sender's CPU still takes the IPI, as real hardware spinning with interrupts on would.
#[test]
fn handler_that_interrupts_back_does_not_deadlock() {
    let m = machine(FormatId::Amd64, 2);
    let weak = Arc::downgrade(&m);
    let back = Arc::new(AtomicU64::new(0));
    let b2 = back.clone();
    m.set_ipi_handler(
        0x50,
        Arc::new(move |_| {
            let m = weak.upgrade().unwrap();
            let me = m.current_cpu();
            m.send_ipi(
                &CpuSet::single(1 - me),
                IpiMessage {
                    vector: 0x51,
                    args: [0; 4],
                },
                true,
            )
            .unwrap();
        }),
    );
    m.set_ipi_handler(
        0x51,
        Arc::new(move |_| {
            b2.fetch_add(1, Ordering::SeqCst);
        }),
    );
    m.run_on(0, |_| {
        m.send_ipi(
            &CpuSet::single(1),
            IpiMessage {
                vector: 0x50,
                args: [0; 4],
            },
            true,
        )
        .unwrap();
    });
    assert_eq!(back.load(Ordering::SeqCst), 1);
}

/// A handler that panics on the target fails the sender's wait instead of hanging it, and
/// leaves both CPUs usable.
#[test]
fn panicking_handler_fails_the_sender_instead_of_hanging() {
    let m = machine(FormatId::Amd64, 2);
    m.set_ipi_handler(0x60, Arc::new(|_| panic!("handler bug")));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.run_on(0, |_| {
            m.send_ipi(
                &CpuSet::single(1),
                IpiMessage {
                    vector: 0x60,
                    args: [0; 4],
                },
                true,
            )
        })
    }));
    assert!(r.is_err(), "the sender must fail");
    assert_eq!(m.current(), None, "the thread's CPU stack was unwound");
    // Both CPUs can be run again.
    m.run_on(1, |_| ());
    m.run_on(0, |_| ());
}
