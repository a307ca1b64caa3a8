//! Bad input to the pmap's kernel-entry operations (`kenter`, `kremove`, `qenter`, `qremove`
//! and the local forms) and to the quick maps, through the public API as an outside user of
//! the library would give it (issue 10, items 2, 3, 5, 6, 8 and their siblings). Each refusal
//! must be an error in every build that changes nothing: after each case the full audit runs
//! (pmap, machine TLBs and walk caches, the detector; `System::audit` where kmem is booted) and
//! the neighbouring frames, another CPU's quick-mapped page and the mappings around the range
//! are checked to be as they were.

mod common;

use common::*;
use vmsys::arch::{FormatId, Prot};
use vmsys::kmem::{KmemConfig, KmemError};
use vmsys::platform::Platform;
use vmsys::{AddrError, EnterFlags, FrameSource, PhysAddr, PmapConfig, PmapError, VirtAddr};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

const PAGE: u64 = 4096;

fn va(v: u64) -> VirtAddr {
    VirtAddr::new(v)
}
fn pa(p: u64) -> PhysAddr {
    PhysAddr::new(p)
}

fn misaligned(addr: u64) -> PmapError {
    PmapError::Addr(AddrError::Misaligned { addr, align: PAGE })
}

/// Fill frame `f` with words that name it (`tag ^ index`).
fn fill(m: &vmsys_sim::Machine, f: u64, tag: u64) {
    for i in 0..PAGE / 8 {
        m.mem().store_u64(f + i * 8, tag ^ i);
    }
}

/// The words of frame `f`.
fn words(m: &vmsys_sim::Machine, f: u64) -> Vec<u64> {
    (0..PAGE / 8).map(|i| m.mem().load_u64(f + i * 8)).collect()
}

/// Every layer booted (`System`): 256 MiB, the direct map (where the format has one) over the
/// first 128 MiB, two CPUs; and the frames the test took from the buddy.
struct SEnv {
    s: System,
    borrowed: u64,
}

fn senv(f: FormatId) -> SEnv {
    let mcfg = MachineConfig::new(f)
        .cpus(2)
        .mem(256 << 20)
        .direct_map_limit(128 << 20)
        .detector(DetectorMode::Every);
    SEnv {
        s: System::boot(mcfg, PmapConfig::default(), KmemConfig::default()).expect("boot"),
        borrowed: 0,
    }
}

impl SEnv {
    /// Two adjacent frames from the buddy (the first page-aligned), where `ok(first)`. The
    /// second is the neighbour that a spill would reach.
    fn pair_where(&mut self, ok: impl Fn(u64) -> bool) -> (u64, u64) {
        let mut skipped = Vec::new();
        let mut prev: Option<PhysAddr> = None;
        let got = loop {
            let p = FrameSource::alloc(&*self.s.buddy).expect("memory");
            if let Some(q) = prev {
                let (lo, hi) = (p.min(q).as_u64(), p.max(q).as_u64());
                if hi == lo + PAGE && ok(lo) {
                    break (lo, hi);
                }
                skipped.push(q);
            }
            prev = Some(p);
        };
        for s in skipped {
            FrameSource::free(&*self.s.buddy, s).unwrap();
        }
        self.borrowed += 2;
        got
    }
    fn audit(&self) {
        let a = self.s.audit(self.borrowed);
        assert!(a.violations.is_empty(), "audit: {:#?}", a.violations);
    }
}

/// The machine's audit (every CPU's TLB and walk caches against the tables) and the
/// detector's findings: what can be checked while a quick mapping is held (the pmap audit
/// counts a held slot's entry as a resident kernel page, so it runs after the release).
fn machine_audit(m: &vmsys_sim::Machine) {
    let v = m.audit();
    assert!(v.is_empty(), "stale translations: {v:#?}");
    let live = m.detector().violations();
    assert!(live.is_empty(), "detector violations: {live:#?}");
}

fn has_dmap(f: FormatId) -> bool {
    !matches!(f, FormatId::I386 | FormatId::I386Pae)
}

/// Items 2 and 8 at the kmem helpers: `zero_page`, `copy_page` and the bounce copies of a
/// misaligned frame address are refused before anything is mapped, so nothing reaches the
/// next frame; inside and outside the direct map.
fn misaligned_zero_page_never_touches_the_next_frame(f: FormatId) {
    let mut e = senv(f);
    let low = e.pair_where(|p| p + 2 * PAGE <= 128 << 20);
    let high = e.pair_where(|p| p >= 128 << 20);
    let dst = e.pair_where(|p| p >= 128 << 20);
    for (frame, next) in [low, high] {
        let m = &e.s.m;
        fill(m, frame, 0xf1);
        fill(m, next, 0xe2);
        fill(m, dst.0, 0xd3);
        fill(m, dst.1, 0xc4);
        let before: Vec<_> = [frame, next, dst.0, dst.1]
            .iter()
            .map(|&x| words(m, x))
            .collect();
        let k = &e.s.kmem;
        m.run_on(0, |_| {
            for off in [8, 16, PAGE - 8] {
                assert_eq!(
                    k.zero_page(pa(frame + off)),
                    Err(KmemError::Pmap(misaligned(frame + off)))
                );
                assert_eq!(
                    k.copy_page(pa(frame + off), pa(dst.0)),
                    Err(KmemError::Pmap(misaligned(frame + off)))
                );
                assert_eq!(
                    k.copy_page(pa(dst.0), pa(frame + off)),
                    Err(KmemError::Pmap(misaligned(frame + off)))
                );
            }
            // The frame's in-page offset is refused, not added to the offset argument.
            assert_eq!(
                k.bounce_to_phys(pa(frame + 4000), 0, &[0x5a; 200]),
                Err(KmemError::Pmap(misaligned(frame + 4000)))
            );
            let mut buf = [0u8; 200];
            assert_eq!(
                k.bounce_from_phys(pa(frame + 4000), 0, &mut buf),
                Err(KmemError::Pmap(misaligned(frame + 4000)))
            );
        });
        let after: Vec<_> = [frame, next, dst.0, dst.1]
            .iter()
            .map(|&x| words(m, x))
            .collect();
        assert_eq!(before, after, "a refused helper changed a frame");
        e.audit();
        // The slots were never taken: the aligned forms work at once, on the same CPU.
        m.run_on(0, |_| {
            k.bounce_to_phys(pa(frame), PAGE - 200, &[0x5a; 200])
                .unwrap();
            k.copy_page(pa(frame), pa(dst.0)).unwrap();
            k.zero_page(pa(frame)).unwrap();
        });
        assert_eq!(words(m, next), before[1], "the neighbour is untouched");
        assert_eq!(words(m, dst.1), before[3], "the neighbour is untouched");
        assert!(words(m, frame).iter().all(|&w| w == 0));
        assert_eq!(m.mem().load_u64(dst.0 + PAGE - 8), 0x5a5a_5a5a_5a5a_5a5a);
        e.audit();
    }
}

/// Item 2 outside the direct map: CPU 0's second slot is followed by CPU 1's first. CPU 1 holds
/// a quick mapping while CPU 0 copies to a misaligned destination: refused, so CPU 1's page
/// and its translation are untouched and no TLB entry for CPU 1's slot appears on CPU 0.
fn quick_map_spill_never_reaches_another_cpus_slot(f: FormatId) {
    let mut e = senv(f);
    let (held, held_next) = e.pair_where(|p| p >= 128 << 20);
    let (src, _) = e.pair_where(|p| p >= 128 << 20);
    let (dst, dst_next) = e.pair_where(|p| p >= 128 << 20);
    let m = e.s.m.clone();
    let (pm, k) = (e.s.pmap.clone(), e.s.kmem.clone());
    fill(&m, held, 0x11);
    fill(&m, held_next, 0x22);
    fill(&m, src, 0x33);
    fill(&m, dst, 0x44);
    fill(&m, dst_next, 0x55);
    let want_held = words(&m, held);
    let hva = m.run_on(1, |c| {
        let v = pm.quick_enter_page(pa(held)).unwrap();
        assert_eq!(c.read_u64(v.as_u64()), Ok(want_held[0]));
        v
    });
    m.run_on(0, |_| {
        for off in [8, 16, PAGE - 8] {
            assert_eq!(
                k.copy_page(pa(src), pa(dst + off)),
                Err(KmemError::Pmap(misaligned(dst + off)))
            );
            assert_eq!(
                pm.quick_enter_pair(pa(src), pa(dst + off)),
                Err(misaligned(dst + off))
            );
            assert_eq!(
                pm.quick_enter_page(pa(dst + off)),
                Err(misaligned(dst + off))
            );
        }
    });
    assert_eq!(words(&m, held), want_held, "cpu 1's quick-mapped page");
    assert_eq!(m.mem().load_u64(held_next), 0x22);
    assert_eq!(m.mem().load_u64(dst), 0x44);
    assert_eq!(m.mem().load_u64(dst_next), 0x55);
    m.run_on(1, |c| {
        for i in [0, PAGE / 8 - 1] {
            assert_eq!(c.read_u64(hva.as_u64() + i * 8), Ok(want_held[i as usize]));
        }
    });
    // With the quick mapping still held on cpu 1.
    machine_audit(&m);
    m.run_on(0, |_| k.copy_page(pa(src), pa(dst)).unwrap());
    assert_eq!(words(&m, dst), words(&m, src));
    assert_eq!(words(&m, held), want_held);
    m.run_on(1, |c| {
        assert_eq!(c.read_u64(hva.as_u64()), Ok(want_held[0]));
        pm.quick_remove_page(hva).unwrap();
    });
    e.audit();
}

/// Item 8: a frame the machine does not have is refused before its slot is taken, on every
/// path (inside the direct map's range where the format has one); the next quick map on that
/// CPU works.
fn zero_page_of_a_missing_frame_is_refused_and_leaves_the_slot_free(f: FormatId) {
    let mut e = senv(f);
    let (ok, _) = e.pair_where(|p| p >= 128 << 20);
    let end = e.s.m.mem().size();
    let (pm, k) = (e.s.pmap.clone(), e.s.kmem.clone());
    e.s.m.run_on(1, |c| {
        for missing in [end, end + 64 * PAGE, 1 << 40] {
            let missing = pa(missing);
            assert_eq!(
                k.zero_page(missing),
                Err(KmemError::Pmap(PmapError::NoSuchFrame(missing)))
            );
            assert_eq!(
                k.copy_page(pa(ok), missing),
                Err(KmemError::Pmap(PmapError::NoSuchFrame(missing)))
            );
            assert_eq!(
                k.bounce_to_phys(missing, 0, &[1; 8]),
                Err(KmemError::Pmap(PmapError::NoSuchFrame(missing)))
            );
            assert_eq!(
                pm.quick_enter_page(missing),
                Err(PmapError::NoSuchFrame(missing))
            );
            assert!(matches!(
                pm.quick_page(missing),
                Err(PmapError::NoSuchFrame(_))
            ));
        }
        // The slot is free: a real frame maps at once.
        k.zero_page(pa(ok)).unwrap();
        let v = pm.quick_enter_page(pa(ok)).unwrap();
        assert_eq!(c.read_u64(v.as_u64() + 8), Ok(0));
        pm.quick_remove_page(v).unwrap();
    });
    e.audit();
    // A direct map over all of memory: the frame just past its end is refused too.
    if has_dmap(f) {
        let e2 = env_on(
            machine_config(f, 1)
                .mem(256 << 20)
                .direct_map_limit(256 << 20),
            PmapConfig::default(),
        );
        e2.m.run_on(0, |_| {
            let missing = pa(256 << 20);
            assert_eq!(
                e2.sys.quick_enter_page(missing),
                Err(PmapError::NoSuchFrame(missing))
            );
            assert_eq!(
                e2.sys.quick_enter_pair(pa(frame(PAGE, 0)), missing),
                Err(PmapError::NoSuchFrame(missing))
            );
            let v = e2.sys.quick_enter_page(pa(frame(PAGE, 0))).unwrap();
            e2.sys.quick_remove_page(v).unwrap();
        });
        e2.audit();
    }
}

/// Item 6 (quick maps): nesting on one CPU is an error in every build, through every entry
/// point, on the direct map and off it; the held mapping stays intact and in its slot; a
/// removal of anything but the live mapping of this CPU is refused.
fn nested_quick_map_is_refused_in_every_build(f: FormatId) {
    let e = env(f, 2);
    let low = frame(PAGE, 5); // inside the direct map (if any)
    let high = 700 << 20; // outside it
    let other = high + 4 * PAGE;
    fill(&e.m, low, 0x10);
    fill(&e.m, high, 0x20);
    fill(&e.m, other, 0x30);
    for held in [low, high] {
        let want = words(&e.m, held);
        let v = e.m.run_on(1, |c| {
            let v = e.sys.quick_enter_page(pa(held)).unwrap();
            let busy = PmapError::QuickMapBusy { cpu: 1, slot: 0 };
            for nested in [low, high, other] {
                assert_eq!(e.sys.quick_enter_page(pa(nested)).unwrap_err(), busy);
                assert_eq!(
                    e.sys.quick_enter_pair(pa(other), pa(nested)).unwrap_err(),
                    busy
                );
                assert_eq!(e.sys.quick_page(pa(nested)).unwrap_err(), busy);
                assert_eq!(e.sys.quick_pair(pa(nested), pa(other)).unwrap_err(), busy);
            }
            assert_eq!(c.read_u64(v.as_u64()), Ok(want[0]));
            assert_eq!(c.read_u64(v.as_u64() + PAGE - 8), Ok(want[want.len() - 1]));
            // Not this CPU's mapping, not the address handed out, not the pair's.
            assert_eq!(
                e.sys.quick_remove_page(va(v.as_u64() + 8)),
                Err(PmapError::QuickMapNotHeld(va(v.as_u64() + 8)))
            );
            assert!(e.sys.quick_remove_pair(v, v).is_err());
            assert_eq!(c.read_u64(v.as_u64()), Ok(want[0]));
            v
        });
        // On another CPU the address is nobody's: refused, cpu 1's mapping untouched.
        e.m.run_on(0, |_| {
            assert_eq!(
                e.sys.quick_remove_page(v),
                Err(PmapError::QuickMapNotHeld(v))
            );
            let w = e.sys.quick_enter_page(pa(other)).unwrap();
            e.sys.quick_remove_page(w).unwrap();
        });
        machine_audit(&e.m);
        e.m.run_on(1, |c| {
            assert_eq!(c.read_u64(v.as_u64()), Ok(want[0]));
            e.sys.quick_remove_page(v).unwrap();
            assert_eq!(
                e.sys.quick_remove_page(v),
                Err(PmapError::QuickMapNotHeld(v)),
                "a second removal"
            );
            // A pair held: both slots busy.
            let (s, d) = e.sys.quick_enter_pair(pa(high), pa(other)).unwrap();
            assert!(matches!(
                e.sys.quick_enter_page(pa(low)),
                Err(PmapError::QuickMapBusy { cpu: 1, slot: 0 })
            ));
            assert_eq!(c.read_u64(d.as_u64()), Ok(0x30));
            e.sys.quick_remove_pair(s, d).unwrap();
        });
        assert_eq!(words(&e.m, held), want);
        e.audit();
    }
}

/// The quick-map guard releases its slot on every path, when the code using the mapping fails
/// (here: panics) too; a guarded slot cannot be released by address under its guard.
fn quick_page_guard_releases_the_slot_when_its_user_fails(f: FormatId) {
    let e = env(f, 1);
    let high = 700 << 20;
    e.m.run_on(0, |c| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let q = e.sys.quick_page(pa(high)).unwrap();
            c.write_u64(q.va().as_u64(), 0x77).unwrap();
            assert_eq!(
                e.sys.quick_remove_page(q.va()),
                Err(PmapError::QuickMapNotHeld(q.va()))
            );
            panic!("the user of the mapping fails");
        }));
        assert!(r.is_err());
        let v = e.sys.quick_enter_page(pa(high)).unwrap();
        assert_eq!(c.read_u64(v.as_u64()), Ok(0x77));
        e.sys.quick_remove_page(v).unwrap();
        let (s, d) = e.sys.quick_pair(pa(high), pa(high + PAGE)).unwrap();
        c.write_u64(d.va().as_u64(), 0x78).unwrap();
        drop((s, d));
        let v = e.sys.quick_enter_page(pa(high + PAGE)).unwrap();
        assert_eq!(c.read_u64(v.as_u64()), Ok(0x78));
        e.sys.quick_remove_page(v).unwrap();
    });
    e.audit();
}

/// A kernel window of `n` pages, kenter'd to `n` frames tagged in word 0; returns its base.
fn window(e: &Env, n: u64, tag: u64) -> (u64, Vec<u64>) {
    let v = e.grow(16 * PAGE).next_multiple_of(PAGE);
    let frames: Vec<u64> = (0..n).map(|i| frame(PAGE, 40 + i)).collect();
    e.m.run_on(0, |_| {
        for (i, &fr) in frames.iter().enumerate() {
            e.m.mem().store_u64(fr, tag + i as u64);
            e.sys
                .kenter(va(v + i as u64 * PAGE), pa(fr), vmsys::pmap::WB)
                .unwrap();
        }
    });
    (v, frames)
}

/// Every page of the window still maps its frame (read from both CPUs, so that a missing
/// shootdown would also show).
fn window_intact(e: &Env, v: u64, frames: &[u64], tag: u64) {
    for cpu in 0..e.m.cpu_count() {
        e.m.run_on(cpu, |c| {
            for i in 0..frames.len() as u64 {
                assert_eq!(
                    c.read_u64(v + i * PAGE),
                    Ok(tag + i),
                    "page {i} on cpu {cpu}"
                );
            }
        });
    }
}

/// Item 3: a count whose byte length overflows (and, in release, wrapped to one page and
/// cleared pages far past the range) is refused before anything is touched; so is a range that
/// wraps the address space or reaches past the kernel's page tables (earlier pages used to be
/// cleared before the hole was met).
fn qremove_with_a_huge_count_is_refused_and_touches_nothing(f: FormatId) {
    let e = env(f, 2);
    let (v, frames) = window(&e, 8, 0x900);
    window_intact(&e, v, &frames, 0x900);
    let overflow = Err(PmapError::Addr(AddrError::Overflow));
    e.m.run_on(0, |_| {
        // (2^52 + 1) pages are 2^64 + 4096 bytes: one page after wrapping.
        for count in [
            (1usize << 52) + 1,
            (1usize << 52) + 8,
            usize::MAX,
            usize::MAX / 2,
        ] {
            assert_eq!(e.sys.qremove(va(v), count), overflow, "{count:#x}");
            assert_eq!(e.sys.qremove_local(va(v), count), overflow, "{count:#x}");
        }
        // No overflow of the length, but of `va + len`.
        let wraps = ((u64::MAX - v) / PAGE + 2) as usize;
        assert!(e.sys.qremove(va(v), wraps).is_err());
        assert!(e.sys.qremove_local(va(v), wraps).is_err());
        // Past the kernel's page tables.
        let end = e.sys.kernel_end().as_u64();
        let to_end = ((end - v) / PAGE + 1) as usize;
        assert_eq!(
            e.sys.qremove(va(v), to_end),
            Err(PmapError::NoPageTable(va(end)))
        );
        assert_eq!(
            e.sys.qenter(va(v), &vec![pa(frames[0]); to_end]),
            Err(PmapError::NoPageTable(va(end)))
        );
    });
    window_intact(&e, v, &frames, 0x900);
    e.audit();
    e.m.run_on(0, |_| e.sys.qremove(va(v), frames.len()).unwrap());
    e.audit();
}

/// Item 5 and siblings: a kernel-entry operation on the direct map, the quick-map slots, the
/// user half, a non-canonical address or the kernel half outside `kva_range()` is refused in
/// every build; the direct map keeps its leaf (no demotion), its page keeps its translation,
/// another CPU's quick mapping stays.
fn kernel_entry_outside_the_kernel_range_is_refused_in_every_build(f: FormatId) {
    let e = env(f, 2);
    let k = e.sys.kernel_pmap().clone();
    let data = frame(PAGE, 7);
    let other = frame(PAGE, 8);
    e.m.mem().store_u64(data, 0xd7);
    e.m.mem().store_u64(other, 0xd8);
    let wb = vmsys::pmap::WB;
    // Every kernel-entry operation on one page at `v`: each must give `want`.
    let all = |v: u64, want: &dyn Fn(PmapError) -> bool| {
        let r = [
            e.sys.kenter(va(v), pa(other), wb),
            e.sys.kremove(va(v)),
            e.sys.qenter(va(v), &[pa(other)]),
            e.sys.qremove(va(v), 1),
            e.sys.qenter_local(va(v), &[pa(other)]),
            e.sys.qremove_local(va(v), 1),
        ];
        for (i, r) in r.iter().enumerate() {
            assert!(
                matches!(r, Err(x) if want(*x)),
                "operation {i} at {v:#x}: {r:?}"
            );
        }
    };
    // Another CPU's quick mapping, in its slot above the kernel range.
    let high = 700 << 20;
    e.m.mem().store_u64(high, 0x4141);
    let slot = e.m.run_on(1, |_| e.sys.quick_enter_page(pa(high)).unwrap());
    let before = e.sys.stats();
    e.m.run_on(0, |c| {
        if let Some((base, _)) = e.sys.direct_map() {
            let dv = base.as_u64() + data;
            let m = e
                .sys
                .mapping(&k, va(dv))
                .expect("the direct map covers the frame");
            all(dv, &|x| x == PmapError::DirectMap(va(dv)));
            all(base.as_u64(), &|x| x == PmapError::DirectMap(base));
            // A range that starts below the direct map and reaches into it.
            if base.as_u64() > k_start(&e) {
                assert!(e.sys.qremove(va(base.as_u64() - PAGE), 2).is_err());
            }
            assert_eq!(e.sys.mapping(&k, va(dv)), Some(m), "the leaf is unchanged");
            assert_eq!(c.read_u64(dv), Ok(0xd7));
        }
        // The quick-map slots (another CPU's in use).
        all(slot.as_u64(), &|x| x == PmapError::OutsideKva(slot));
        let (_, quick_base) = e.sys.kva_range();
        all(quick_base.as_u64(), &|x| {
            x == PmapError::OutsideKva(quick_base)
        });
        // The user half.
        let u = e.uva(PAGE, 1);
        all(u, &|x| x == PmapError::WrongHalf(va(u)));
        // Below the kernel's dynamic range: on amd64/LA57 still the kernel half (between the
        // direct map and KVA); elsewhere the other half.
        let below = k_start(&e) - PAGE;
        if matches!(f, FormatId::Amd64 | FormatId::Amd64La57) {
            all(below, &|x| x == PmapError::OutsideKva(va(below)));
        } else {
            all(below, &|x| {
                matches!(x, PmapError::WrongHalf(_) | PmapError::Addr(_))
            });
        }
        // Non-canonical (the 64-bit formats).
        if matches!(f, FormatId::Amd64 | FormatId::Amd64La57 | FormatId::Arm64) {
            let nc = 0x0100_0000_0000_0000u64;
            all(nc, &|x| {
                matches!(x, PmapError::Addr(AddrError::OutOfRange { .. }))
            });
        }
    });
    let after = e.sys.stats();
    assert_eq!(after.demotions, before.demotions, "no demotion");
    e.m.run_on(1, |c| {
        assert_eq!(c.read_u64(slot.as_u64()), Ok(0x4141), "cpu 1's quick map");
        e.sys.quick_remove_page(slot).unwrap();
    });
    assert_eq!(e.m.mem().load_u64(other), 0xd8);
    e.audit();
}

fn k_start(e: &Env) -> u64 {
    e.sys.kva_range().0.as_u64()
}

/// Item 5's sibling in the kernel range: a kernel superpage (`enter` with a superpage size) is
/// never demoted or written through by kenter/kremove/qenter/qremove: refused, unchanged.
fn kenter_over_a_superpage_is_refused_and_keeps_it(f: FormatId) {
    let e = env(f, 2);
    let k = e.sys.kernel_pmap().clone();
    let s = e.sys.page_sizes().nth(1).unwrap();
    let v = (e.grow(3 * s) + PAGE).next_multiple_of(s);
    let big = frame(s, 2);
    e.m.run_on(0, |c| {
        e.sys
            .enter(&k, va(v), pa(big), Prot::WRITE, EnterFlags::WIRED, 1)
            .unwrap();
        c.write_u64(v + 3 * PAGE, 0x5e).unwrap();
    });
    let before = e.sys.stats();
    let m = e.sys.mapping(&k, va(v + 3 * PAGE)).unwrap();
    assert_eq!(m.size, s);
    e.m.run_on(0, |c| {
        let at = v + 3 * PAGE;
        let sp = Err(PmapError::ExistingSuperpage(va(at)));
        let wb = vmsys::pmap::WB;
        assert_eq!(e.sys.kenter(va(at), pa(frame(PAGE, 1)), wb), sp);
        assert_eq!(e.sys.kremove(va(at)), sp);
        assert_eq!(e.sys.qenter(va(at), &[pa(frame(PAGE, 1))]), sp);
        assert_eq!(e.sys.qenter_local(va(at), &[pa(frame(PAGE, 1))]), sp);
        assert_eq!(e.sys.qremove(va(at), 1), sp);
        assert_eq!(e.sys.qremove_local(va(at), 1), sp);
        // A range that begins below the superpage: refused at its first page inside, and
        // the 4 KiB page before it (kenter'd) is left as it was.
        e.sys.kenter(va(v - PAGE), pa(frame(PAGE, 1)), wb).unwrap();
        assert_eq!(
            e.sys.qremove(va(v - PAGE), 2),
            Err(PmapError::ExistingSuperpage(va(v)))
        );
        assert!(c.read_u64(v - PAGE).is_ok());
        assert_eq!(c.read_u64(at), Ok(0x5e));
        e.sys.kremove(va(v - PAGE)).unwrap();
    });
    assert_eq!(e.sys.mapping(&k, va(v + 3 * PAGE)), Some(m));
    assert_eq!(e.sys.stats().demotions, before.demotions, "no demotion");
    e.audit();
    e.m.run_on(0, |_| e.sys.remove(&k, va(v), va(v + s)).unwrap());
    e.audit();
}

/// Item 6 (pmap): kenter/qenter over a managed kernel mapping, and kremove/qremove of one,
/// would strand its PV entry (release builds did): refused, mapping and PV entry unchanged,
/// and a range with a kenter'd page before the managed one is not half-done.
fn kenter_over_a_managed_kernel_mapping_keeps_its_pv_entry(f: FormatId) {
    let e = env(f, 2);
    let k = e.sys.kernel_pmap().clone();
    let v = e.grow(16 * PAGE).next_multiple_of(PAGE) + PAGE;
    let managed = frame(PAGE, 20);
    let plain = frame(PAGE, 21);
    let wb = vmsys::pmap::WB;
    e.m.mem().store_u64(managed, 0xaa);
    e.m.mem().store_u64(plain, 0xbb);
    e.m.run_on(0, |_| {
        e.sys
            .enter(&k, va(v), pa(managed), Prot::WRITE, EnterFlags::MANAGED, 0)
            .unwrap();
        e.sys.kenter(va(v - PAGE), pa(plain), wb).unwrap();
    });
    let pv = e.sys.pv_in_use();
    assert_eq!(e.sys.page_mapping_count(pa(managed)), 1);
    e.m.run_on(0, |_| {
        let mm = Err(PmapError::ManagedMapping(va(v)));
        assert_eq!(e.sys.kenter(va(v), pa(plain), wb), mm);
        assert_eq!(e.sys.kremove(va(v)), mm);
        assert_eq!(e.sys.qenter(va(v), &[pa(plain)]), mm);
        assert_eq!(e.sys.qenter_local(va(v), &[pa(plain)]), mm);
        assert_eq!(e.sys.qremove(va(v), 1), mm);
        assert_eq!(e.sys.qremove_local(va(v), 1), mm);
        assert_eq!(e.sys.qremove(va(v - PAGE), 2), mm);
        assert_eq!(e.sys.qenter(va(v - PAGE), &[pa(managed), pa(plain)]), mm);
    });
    assert_eq!(e.sys.pv_in_use(), pv);
    assert_eq!(e.sys.page_mapping_count(pa(managed)), 1);
    assert_eq!(e.sys.extract(&k, va(v)), Some(pa(managed)));
    for cpu in 0..2 {
        e.m.run_on(cpu, |c| {
            assert_eq!(c.read_u64(v), Ok(0xaa));
            assert_eq!(
                c.read_u64(v - PAGE),
                Ok(0xbb),
                "the kenter'd page before it"
            );
        });
    }
    e.audit();
    e.m.run_on(0, |_| {
        e.sys.remove(&k, va(v), va(v + PAGE)).unwrap();
        e.sys.kremove(va(v - PAGE)).unwrap();
    });
    assert_eq!(e.sys.page_mapping_count(pa(managed)), 0);
    e.audit();
}

/// Sibling: `qenter_local` invalidates nothing, so replacing a valid entry (which another CPU
/// may cache) would leave that CPU translating the old frame: refused, the old mapping
/// intact everywhere.
fn qenter_local_over_a_valid_entry_is_refused(f: FormatId) {
    let e = env(f, 2);
    let (v, frames) = window(&e, 2, 0x700);
    window_intact(&e, v, &frames, 0x700); // both CPUs now cache the entries
    let fresh = frame(PAGE, 60);
    e.m.mem().store_u64(fresh, 0x7ff);
    e.m.run_on(0, |_| {
        assert_eq!(
            e.sys.qenter_local(va(v), &[pa(fresh), pa(fresh)]),
            Err(PmapError::ExistingMapping(va(v)))
        );
    });
    window_intact(&e, v, &frames, 0x700);
    e.audit();
    e.m.run_on(0, |c| {
        e.sys.qremove(va(v), 2).unwrap();
        // Invalid entries: allowed; entering the identical entry again changes nothing.
        e.sys.qenter_local(va(v), &[pa(fresh)]).unwrap();
        e.sys.qenter_local(va(v), &[pa(fresh)]).unwrap();
        assert_eq!(c.read_u64(v), Ok(0x7ff));
        e.sys.qremove_local(va(v), 1).unwrap();
    });
    e.audit();
}

for_each_format! {
    misaligned_zero_page_never_touches_the_next_frame => crate::misaligned_zero_page_never_touches_the_next_frame;
    quick_map_spill_never_reaches_another_cpus_slot => crate::quick_map_spill_never_reaches_another_cpus_slot;
    zero_page_of_a_missing_frame_is_refused_and_leaves_the_slot_free => crate::zero_page_of_a_missing_frame_is_refused_and_leaves_the_slot_free;
    nested_quick_map_is_refused_in_every_build => crate::nested_quick_map_is_refused_in_every_build;
    quick_page_guard_releases_the_slot_when_its_user_fails => crate::quick_page_guard_releases_the_slot_when_its_user_fails;
    qremove_with_a_huge_count_is_refused_and_touches_nothing => crate::qremove_with_a_huge_count_is_refused_and_touches_nothing;
    kernel_entry_outside_the_kernel_range_is_refused_in_every_build => crate::kernel_entry_outside_the_kernel_range_is_refused_in_every_build;
    kenter_over_a_superpage_is_refused_and_keeps_it => crate::kenter_over_a_superpage_is_refused_and_keeps_it;
    kenter_over_a_managed_kernel_mapping_keeps_its_pv_entry => crate::kenter_over_a_managed_kernel_mapping_keeps_its_pv_entry;
    qenter_local_over_a_valid_entry_is_refused => crate::qenter_local_over_a_valid_entry_is_refused;
}
