//! Kernel memory on the simulated machine: kmem_malloc promoted to superpages, transient I/O
//! mappings (direct map, pinned-local, can-fault), bounce copies, bad frees, allocation
//! failure by fault injection, the seed 000 hazard reproduced with the unified layout and
//! shown impossible with ours under churn on several CPUs.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use vmsys::arch::FormatId;
use vmsys::kmem::{KmemConfig, KmemError, KvaLayout};
use vmsys::platform::Platform;
use vmsys::{FrameSource, PhysAddr, PmapConfig, VirtAddr};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

const PAGE: u64 = 4096;

/// A machine with every layer (`System`), and the frames the test took for its own use.
struct KEnv {
    s: System,
    /// Frames the test took from the buddy for its own use.
    borrowed: std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for KEnv {
    type Target = System;
    fn deref(&self) -> &System {
        &self.s
    }
}

/// 256 MiB, direct map (where the format has one) over the first 128 MiB only.
fn kenv(f: FormatId, cpus: u32, cfg: KmemConfig) -> KEnv {
    kenv_on(
        MachineConfig::new(f)
            .cpus(cpus)
            .mem(256 << 20)
            .direct_map_limit(128 << 20)
            .detector(DetectorMode::Every),
        cfg,
    )
}

fn kenv_on(mcfg: MachineConfig, cfg: KmemConfig) -> KEnv {
    KEnv {
        s: System::boot(mcfg, PmapConfig::default(), cfg).expect("boot"),
        borrowed: Default::default(),
    }
}

impl KEnv {
    fn sp(&self) -> u64 {
        self.kmem.superpage()
    }
    /// Every audit of every layer, including that each allocated frame is held by the pmap, by
    /// live kmem memory or by the test (no leak).
    fn audit(&self) {
        let a = self
            .s
            .audit(self.borrowed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(a.violations.is_empty(), "audit: {:#?}", a.violations);
    }
    /// A frame outside the direct map (taking frames until one is).
    fn high_frame(&self) -> PhysAddr {
        self.frame_where(|pa| pa >= 128 << 20)
    }

    /// A frame inside the direct map.
    fn low_frame(&self) -> PhysAddr {
        self.frame_where(|pa| pa < 128 << 20)
    }

    /// The first frame the buddy hands out that satisfies `ok`; the others go back.
    fn frame_where(&self, ok: impl Fn(u64) -> bool) -> PhysAddr {
        let mut skipped = Vec::new();
        let pa = loop {
            let pa = FrameSource::alloc(&*self.buddy).expect("memory");
            if ok(pa.as_u64()) {
                break pa;
            }
            skipped.push(pa);
        };
        for s in skipped {
            FrameSource::free(&*self.buddy, s).unwrap();
        }
        self.borrowed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        pa
    }
}

/// KVA-5: kmem_malloc of a superpage ends as one superpage mapping (reservation + promotion),
/// reads back what was written, and frees everything.
fn kmem_superpage_is_promoted(f: FormatId) {
    let e = kenv(f, 2, KmemConfig::default());
    let sp = e.sp();
    e.m.run_on(0, |_| {
        let va = e.kmem.kmem_malloc(sp, 0, true).unwrap();
        assert_eq!(va.as_u64() % sp, 0);
        let m = e.pmap.mapping(e.pmap.kernel_pmap(), va).unwrap();
        assert_eq!(m.size, sp, "a full reservation is promoted");
        let data: Vec<u8> = (0..64).collect();
        e.m.kernel_write(VirtAddr::new(va.as_u64() + sp - 64), &data)
            .unwrap();
        let mut back = [0u8; 64];
        e.m.kernel_read(VirtAddr::new(va.as_u64() + sp - 64), &mut back)
            .unwrap();
        assert_eq!(back[..], data[..]);
        let mut z = [1u8; 16];
        e.m.kernel_read(VirtAddr::new(va.as_u64() + 4096), &mut z)
            .unwrap();
        assert_eq!(z, [0; 16], "zeroed");
        e.audit();
        e.kmem.kmem_free(va, sp).unwrap();
        assert!(e.pmap.extract(e.pmap.kernel_pmap(), va).is_none());
    });
    e.audit();
    assert_eq!(
        e.reserv.stats().active,
        0,
        "the reservation went back whole"
    );
}

/// Small allocations of many sizes through the quantum caches and the arena; bad frees are
/// errors that change nothing.
fn kmem_sizes_and_bad_frees(f: FormatId) {
    let e = kenv(f, 2, KmemConfig::default());
    e.m.run_on(1, |c| {
        let mut live = Vec::new();
        for (i, size) in [1, 4096, 4097, 3 * 4096, 8 * 4096, 9 * 4096, 100_000]
            .into_iter()
            .enumerate()
        {
            let va = e.kmem.kmem_malloc(size, 0, true).unwrap();
            c.write_u64(va.as_u64(), i as u64).unwrap();
            live.push((va, size));
        }
        for (i, &(va, _)) in live.iter().enumerate() {
            assert_eq!(c.read_u64(va.as_u64()), Ok(i as u64));
        }
        // With the small allocations live (their reservations partially populated).
        e.audit();
        let (va, size) = live[3];
        let before = e.kmem.stats();
        assert!(matches!(
            e.kmem.kmem_free(va, size + 4096),
            Err(KmemError::BadFree { .. })
        ));
        assert!(matches!(
            e.kmem.kmem_free(VirtAddr::new(va.as_u64() + 4096), 4096),
            Err(KmemError::BadFree { .. })
        ));
        assert_eq!(e.kmem.stats(), before, "a bad free changes nothing");
        e.audit();
        assert!(matches!(
            e.kmem.kmem_malloc(0, 0, false),
            Err(KmemError::BadSize(0))
        ));
        assert!(matches!(
            e.kmem.kmem_malloc(4096, 7, false),
            Err(KmemError::BadDomain(7))
        ));
        for (va, size) in live {
            e.kmem.kmem_free(va, size).unwrap();
        }
        assert!(matches!(
            e.kmem.kmem_free(va, size),
            Err(KmemError::BadFree { .. })
        ));
        let kva = e.kmem.kva_alloc(3 * 4096).unwrap();
        assert!(e.kmem.kva_free(kva, 4096).is_err());
        e.kmem.kva_free(kva, 3 * 4096).unwrap();
        assert!(e.kmem.kva_free(kva, 3 * 4096).is_err(), "double free");
    });
    e.audit();
}

/// Allocation failure everywhere: pages (reservations), page-table pages and KVA. Each is a
/// clear error, nothing leaks, the audit is clean.
fn kmem_allocation_failure(f: FormatId) {
    let e = kenv(f, 1, KmemConfig::default());
    let sp = e.sp();
    e.m.run_on(0, |_| {
        // Pages: fail the 5th page of a superpage allocation.
        e.reserv.inject_failures(4, Some(1));
        assert_eq!(e.kmem.kmem_malloc(sp, 0, false), Err(KmemError::NoMemory));
        e.reserv.clear_failures();
        e.audit();
        // KVA: kernel_arena cannot import.
        e.kmem.inject_kva_failures(0, None);
        let r = e.kmem.kmem_malloc(64 * sp, 0, false);
        assert!(matches!(r, Err(KmemError::NoKva(_))), "{r:?}");
        e.kmem.clear_kva_failures();
        e.audit();
        // Page-table pages: growkernel cannot allocate while kernel_arena imports.
        e.buddy.inject_failures(0, None);
        let r = e.kmem.kmem_malloc(64 * sp, 0, false);
        e.buddy.clear_failures();
        assert!(r.is_err(), "{r:?}");
        e.audit();
        // And after all that, memory still works.
        let va = e.kmem.kmem_malloc(2 * sp, 0, true).unwrap();
        e.kmem.kmem_free(va, 2 * sp).unwrap();
    });
    e.audit();
}

/// Transient I/O mappings: through the direct map where the page is inside it; otherwise
/// pinned with local invalidation only (and the entry cleared on unmap), or with can_fault a
/// qenter whose removal is shot down everywhere. A pinned mapping cannot be unmapped on
/// another CPU.
fn transient_io_mappings(f: FormatId) {
    let e = kenv(f, 2, KmemConfig::default());
    let low = e.low_frame();
    let high = e.high_frame();
    e.m.run_on(0, |c| {
        e.kmem
            .bounce_to_phys(high, 8, &0xfeed_u64.to_le_bytes())
            .unwrap();
        e.kmem
            .bounce_to_phys(low, 8, &0xbeef_u64.to_le_bytes())
            .unwrap();
        let mut b = [0u8; 8];
        e.m.phys_read(PhysAddr::new(high.as_u64() + 8), &mut b);
        assert_eq!(
            u64::from_le_bytes(b),
            0xfeed,
            "bounce copy reached the frame"
        );
        e.kmem.bounce_from_phys(low, 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xbeef);

        if e.pmap.direct_map().is_some() {
            let m = e.kmem.map_io_transient(&[low], false).unwrap();
            assert!(m.is_direct());
            e.kmem.unmap_io_transient(m).unwrap();
        }
        // Pinned: no IPI, no broadcast, entry cleared after.
        let ipis = e.m.counters().ipis_sent;
        let shoot = e.pmap.stats().shootdowns;
        let m = e.kmem.map_io_transient(&[high, low], false).unwrap();
        assert!(!m.is_direct());
        assert_eq!(c.read_u64(m.vas[0].as_u64() + 8), Ok(0xfeed));
        assert_eq!(c.read_u64(m.vas[1].as_u64() + 8), Ok(0xbeef));
        let va = m.vas[0];
        e.audit();
        e.kmem.unmap_io_transient(m).unwrap();
        assert_eq!(e.m.counters().ipis_sent, ipis, "pinned: no IPI");
        assert_eq!(e.pmap.stats().shootdowns, shoot, "pinned: no shootdown");
        assert!(
            e.pmap.extract(e.pmap.kernel_pmap(), va).is_none(),
            "entry cleared"
        );
        assert!(c.read_u64(va.as_u64()).is_err());
        // can_fault: qenter, shot down on removal.
        let m = e.kmem.map_io_transient(&[high], true).unwrap();
        assert_eq!(c.read_u64(m.vas[0].as_u64() + 8), Ok(0xfeed));
        e.kmem.unmap_io_transient(m).unwrap();
        assert!(
            e.pmap.stats().shootdowns > shoot,
            "can_fault: shot down everywhere"
        );
    });
    // Pinned to CPU 0: CPU 1 may not unmap it.
    let m =
        e.m.run_on(0, |_| e.kmem.map_io_transient(&[high], false).unwrap());
    let m = e.m.run_on(1, |_| match e.kmem.unmap_io_transient(m) {
        Err((
            KmemError::WrongCpu {
                mapped_on: 0,
                unmapped_on: 1,
            },
            m,
        )) => m,
        r => panic!("{r:?}"),
    });
    e.m.run_on(0, |_| e.kmem.unmap_io_transient(m).unwrap());
    e.audit();
}

/// Guard pages around transient mappings stay unmapped (the audit checks them).
fn transient_guard_pages(f: FormatId) {
    let e = kenv(
        f,
        1,
        KmemConfig {
            transient_guards: true,
            ..KmemConfig::default()
        },
    );
    let high = e.high_frame();
    e.m.run_on(0, |c| {
        let m = e.kmem.map_io_transient(&[high], false).unwrap();
        let va = m.vas[0].as_u64();
        assert!(c.read_u64(va).is_ok());
        assert!(c.read_u64(va - PAGE).is_err(), "leading guard");
        assert!(c.read_u64(va + PAGE).is_err(), "trailing guard");
        e.audit();
        e.kmem.unmap_io_transient(m).unwrap();
    });
    e.audit();
}

/// Seed 000, reproduced: with every kind of KVA straight from kernel_arena, a transient
/// mapping lands in the superpage region of kmem memory; when the rest of that region fills
/// with its reservation's frames, the pmap promotes the region and swallows the transient
/// entry. i386 has no no-promote bit, so the layout is the only defence: the audit catches
/// the hazard (KVA-1, KVA-3). The transient page here is the frame the reservation would
/// have put there, the case in which attributes and frames line up.
#[test]
fn seed000_unified_layout_lets_promotion_swallow_a_transient_entry() {
    let (e, swallowed) = seed000_scenario(KvaLayout::Unified);
    assert!(swallowed, "the unified layout lets the promotion happen");
    let errs = e.kmem.audit().unwrap_err();
    assert!(
        errs.iter().any(|s| s.starts_with("KVA-1")) && errs.iter().any(|s| s.starts_with("KVA-3")),
        "{errs:#?}"
    );
}

/// Seed 000 with our layout: the same steps cannot put the transient mapping in kmem's
/// superpage region.
#[test]
fn seed000_segregated_layout_keeps_transient_entries_out_of_superpages() {
    let (e, swallowed) = seed000_scenario(KvaLayout::Segregated);
    assert!(!swallowed);
    e.audit();
}

/// Returns whether the transient page ended up inside a superpage mapping.
fn seed000_scenario(layout: KvaLayout) -> (KEnv, bool) {
    let e = kenv(
        FormatId::I386,
        1,
        KmemConfig {
            layout,
            ..KmemConfig::default()
        },
    );
    let sp = e.sp();
    let swallowed = e.m.run_on(0, |_| {
        let a = e.kmem.kmem_malloc(sp - 2 * PAGE, 0, false).unwrap();
        assert_eq!(a.as_u64() % sp, 0);
        let base = e
            .pmap
            .extract(e.pmap.kernel_pmap(), a)
            .expect("mapped")
            .as_u64();
        // The free frame of the reservation's second-to-last slot, borrowed for the I/O.
        let borrowed = PhysAddr::new(base + sp - 2 * PAGE);
        let t = e.kmem.map_io_transient(&[borrowed], true).unwrap();
        let b = e.kmem.kmem_malloc(PAGE, 0, false).unwrap();
        let m = e.pmap.mapping(e.pmap.kernel_pmap(), t.vas[0]).unwrap();
        let swallowed = m.size > PAGE;
        if !swallowed {
            e.kmem.unmap_io_transient(t).unwrap();
            e.kmem.kmem_free(b, PAGE).unwrap();
            e.kmem.kmem_free(a, sp - 2 * PAGE).unwrap();
        } else {
            // qremove would now meet a superpage (refused, ExistingSuperpage): leave it mapped.
            std::mem::forget(t);
        }
        swallowed
    });
    (e, swallowed)
}

/// Randomized churn on several CPUs: kmem allocations of many sizes (superpage-sized ones
/// promote), transient mappings of both kinds, quick-mapped bounce copies, kva_alloc + qenter;
/// the layout keeps the seed 000 hazard impossible and every audit is clean.
fn churn(f: FormatId) {
    let seed = seed(0xc4a2);
    let e = kenv(f, 3, KmemConfig::default());
    let sp = e.sp();
    let highs: Vec<PhysAddr> = (0..3).map(|_| e.high_frame()).collect();
    let rounds = 120;
    std::thread::scope(|s| {
        for cpu in 0..3u32 {
            let (e, highs) = (&e, &highs);
            s.spawn(move || {
                e.m.run_on(cpu, |c| {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed + cpu as u64);
                    let mut live: Vec<(VirtAddr, u64, u64)> = Vec::new();
                    for step in 0..rounds {
                        match rng.gen_range(0..10) {
                            0..=3 => {
                                let size = match rng.gen_range(0..4) {
                                    0 => sp,
                                    1 => rng.gen_range(1..=8) * PAGE,
                                    _ => rng.gen_range(1..64) * PAGE + rng.gen_range(0..PAGE),
                                };
                                let va = e.kmem.kmem_malloc(size, 0, false).unwrap();
                                let tag = (cpu as u64) << 32 | step;
                                c.write_u64(va.as_u64(), tag).unwrap();
                                live.push((va, size, tag));
                            }
                            4..=5 if !live.is_empty() => {
                                let i = rng.gen_range(0..live.len());
                                let (va, size, tag) = live.swap_remove(i);
                                assert_eq!(c.read_u64(va.as_u64()), Ok(tag), "seed {seed}");
                                e.kmem.kmem_free(va, size).unwrap();
                            }
                            6..=7 => {
                                let pa = highs[cpu as usize];
                                let m = e.kmem.map_io_transient(&[pa], rng.gen_bool(0.5)).unwrap();
                                c.write_u64(m.vas[0].as_u64() + 16, step).unwrap();
                                e.kmem.unmap_io_transient(m).unwrap();
                                let mut b = [0u8; 8];
                                e.kmem.bounce_from_phys(pa, 16, &mut b).unwrap();
                                assert_eq!(u64::from_le_bytes(b), step, "seed {seed}");
                            }
                            8 => {
                                let n = rng.gen_range(1..4);
                                let va = e.kmem.kva_alloc(n * PAGE).unwrap();
                                let frames = vec![highs[cpu as usize]; n as usize];
                                e.pmap.qenter(va, &frames).unwrap();
                                assert!(c.read_u64(va.as_u64()).is_ok());
                                e.pmap.qremove(va, n as usize).unwrap();
                                e.kmem.kva_free(va, n * PAGE).unwrap();
                            }
                            _ => {
                                let va = e.pmap.quick_enter_page(highs[cpu as usize]).unwrap();
                                c.write_u64(va.as_u64() + 24, step).unwrap();
                                e.pmap.quick_remove_page(va).unwrap();
                            }
                        }
                    }
                    for (va, size, tag) in live {
                        assert_eq!(c.read_u64(va.as_u64()), Ok(tag), "seed {seed}");
                        e.kmem.kmem_free(va, size).unwrap();
                    }
                })
            });
        }
    });
    assert!(
        e.pmap.stats().promotions > 0,
        "seed {seed}: superpage-sized allocations promote"
    );
    e.audit();
}

/// Pages are zeroed and copied through the direct map where it covers them and through the
/// quick-map slots where it does not (and on i386, which has none).
fn zero_and_copy_pages(f: FormatId) {
    let e = kenv(f, 1, KmemConfig::default());
    let low = e.low_frame();
    let high = e.high_frame();
    e.m.run_on(0, |_| {
        for (src, dst) in [(low, high), (high, low)] {
            e.m.phys_write(src, &[0x5a; 4096]);
            e.m.phys_write(dst, &[0xa5; 4096]);
            e.kmem.copy_page(src, dst).unwrap();
            let mut b = vec![0u8; 4096];
            e.m.phys_read(dst, &mut b);
            assert!(b.iter().all(|&x| x == 0x5a), "copied {src} -> {dst}");
            e.kmem.zero_page(dst).unwrap();
            e.m.phys_read(dst, &mut b);
            assert!(b.iter().all(|&x| x == 0), "zeroed {dst}");
        }
    });
    e.audit();
}

/// Two NUMA domains: each domain's arena backs its allocations with its own domain's pages.
#[test]
fn kmem_domains_get_their_own_pages() {
    let e = kenv_on(
        MachineConfig::new(FormatId::Amd64)
            .cpus(2)
            .mem(256 << 20)
            .domains(2)
            .detector(DetectorMode::Every),
        KmemConfig::default(),
    );
    let sp = e.sp();
    e.m.run_on(1, |_| {
        for d in 0..2 {
            let va = e.kmem.kmem_malloc(sp + 3 * PAGE, d, false).unwrap();
            for i in [0, sp / PAGE, sp / PAGE + 2] {
                let pa = e
                    .pmap
                    .extract(e.pmap.kernel_pmap(), VirtAddr::new(va.as_u64() + i * PAGE))
                    .unwrap();
                assert_eq!(e.pmap.pages().meta(pa).domain() as usize, d);
            }
            // Live, the tail's reservation partially populated.
            e.audit();
            e.kmem.kmem_free(va, sp + 3 * PAGE).unwrap();
        }
        assert!(matches!(
            e.kmem.kmem_malloc(PAGE, 2, false),
            Err(KmemError::BadDomain(2))
        ));
    });
    e.audit();
}

for_each_format! {
    zero_copy_pages_ => crate::zero_and_copy_pages;
    kmem_superpage_promoted_ => crate::kmem_superpage_is_promoted;
    kmem_sizes_bad_frees_ => crate::kmem_sizes_and_bad_frees;
    kmem_allocation_failure_ => crate::kmem_allocation_failure;
    transient_io_ => crate::transient_io_mappings;
    transient_guards_ => crate::transient_guard_pages;
    kmem_churn_ => crate::churn;
}
