//! The pmap on the simulated machine: one suite, instantiated for every format.
//!
//! Every test ends with an audit of the pmap layer's invariants (PT-*, PV-*, SP-*, KPT-*) and of
//! every CPU's TLB and walk caches against the tables (the simulator's detector, checking every
//! access, is on throughout).

mod common;

use common::*;
use vmsys::arch::{FormatId, Prot};
use vmsys::pmap::KptSync;
use vmsys::{EnterFlags, PhysAddr, PmapConfig, PmapError, VirtAddr};

const PAGE: u64 = 4096;
const RO: Prot = Prot::empty();

fn va(v: u64) -> VirtAddr {
    VirtAddr::new(v)
}
fn pa(p: u64) -> PhysAddr {
    PhysAddr::new(p)
}

/// The superpage size used for promotion (2 MiB, or 4 MiB on i386).
fn sp(e: &Env) -> u64 {
    e.sys.page_sizes().nth(1).unwrap()
}

fn enter_access_remove(f: FormatId) {
    let e = env(f, 2);
    let p = e.sys.create().unwrap();
    let v = e.uva(PAGE, 3);
    let fr = frame(PAGE, 7);
    e.m.run_on(0, |cpu| {
        e.sys.activate(&p).unwrap();
        e.sys
            .enter(
                &p,
                va(v),
                pa(fr),
                Prot::WRITE,
                EnterFlags::MANAGED | EnterFlags::DIRTY,
                0,
            )
            .unwrap();
        assert_eq!(e.sys.extract(&p, va(v + 8)), Some(pa(fr + 8)));
        cpu.set_user(true);
        cpu.write_u64(v + 16, 0xfeed).unwrap();
        assert_eq!(cpu.read_u64(v + 16).unwrap(), 0xfeed);
        assert!(e.sys.is_modified(pa(fr)));
        e.audit();
        e.sys.remove(&p, va(v), va(v + PAGE)).unwrap();
        assert_eq!(e.sys.extract(&p, va(v)), None);
        assert!(
            cpu.read_u64(v).is_err(),
            "no stale translation after remove"
        );
        assert!(
            e.sys.page_modified_flag(pa(fr)),
            "dirty state harvested on remove"
        );
        cpu.set_user(false);
        let k = e.sys.kernel_pmap().clone();
        e.sys.activate(&k).unwrap();
    });
    let before = e.frames_in_use();
    e.audit();
    e.m.run_on(0, |_| e.sys.destroy(p)).unwrap();
    assert!(e.frames_in_use() < before, "destroy frees the root");
    e.audit();
}

fn bad_input_is_an_error(f: FormatId) {
    let e = env(f, 1);
    let p = e.sys.create().unwrap();
    let v = e.uva(PAGE, 1);
    e.m.run_on(0, |_| {
        let s = &e.sys;
        assert!(matches!(
            s.enter(
                &p,
                va(v + 1),
                pa(frame(PAGE, 0)),
                RO,
                EnterFlags::empty(),
                0
            ),
            Err(PmapError::Addr(_))
        ));
        assert!(matches!(
            s.enter(
                &p,
                va(v),
                pa(frame(PAGE, 0) + 8),
                RO,
                EnterFlags::empty(),
                0
            ),
            Err(PmapError::Addr(_))
        ));
        assert_eq!(
            s.enter(&p, va(v), pa(frame(PAGE, 0)), RO, EnterFlags::empty(), 7),
            Err(PmapError::BadPageSize(7))
        );
        let kva = s.kva_range().0;
        assert_eq!(
            s.enter(&p, kva, pa(frame(PAGE, 0)), RO, EnterFlags::empty(), 0),
            Err(PmapError::WrongHalf(kva))
        );
        let k = s.kernel_pmap().clone();
        assert_eq!(
            s.enter(&k, va(v), pa(frame(PAGE, 0)), RO, EnterFlags::empty(), 0),
            Err(PmapError::WrongHalf(va(v)))
        );
        // A managed mapping of a frame the machine does not have.
        assert_eq!(
            s.enter(&p, va(v), pa(2 << 30), RO, EnterFlags::MANAGED, 0),
            Err(PmapError::NotManageable)
        );
        // A kernel address with no page table yet.
        let beyond = s.kernel_end().as_u64() + (64 << 20);
        assert_eq!(
            s.kenter(va(beyond), pa(frame(PAGE, 0)), vmsys::pmap::WB),
            Err(PmapError::NoPageTable(va(beyond)))
        );
        s.enter(&p, va(v), pa(frame(PAGE, 0)), RO, EnterFlags::empty(), 0)
            .unwrap();
        assert_eq!(
            s.enter(&p, va(v), pa(frame(PAGE, 1)), RO, EnterFlags::NOREPLACE, 0),
            Err(PmapError::ExistingMapping(va(v)))
        );
        assert_eq!(
            s.unwire(&p, va(v), va(v + PAGE)),
            Err(PmapError::NotWired(va(v)))
        );
        assert_eq!(s.destroy(p.clone()), Err(PmapError::Busy));
        s.remove(&p, va(v), va(v + PAGE)).unwrap();
    });
    e.audit();
}

fn range_map_unmap_no_leak(f: FormatId) {
    let e = env(f, 2);
    let p = e.sys.create().unwrap();
    let base_frames = e.frames_in_use();
    // Not superpage-aligned in VA, so that no promotion happens: 3 tables' worth.
    let v = e.uva(sp(&e), 1) + 5 * PAGE;
    let n = 3 * 512;
    e.m.run_on(0, |cpu| {
        e.sys.activate(&p).unwrap();
        e.sys
            .enter_range(
                &p,
                va(v),
                pa(frame(PAGE, 0)),
                n * PAGE,
                Prot::WRITE,
                EnterFlags::MANAGED,
            )
            .unwrap();
        assert_eq!(p.resident_count(), n);
        let r = e.audit();
        assert_eq!(r.pv_entries, n);
        cpu.set_user(true);
        for i in [0, 1, 511, 512, n - 1] {
            cpu.write_u64(v + i * PAGE, i).unwrap();
            assert_eq!(
                e.sys.extract(&p, va(v + i * PAGE)),
                Some(pa(frame(PAGE, i)))
            );
        }
        // Overlapping range: refused, and nothing of it stays.
        assert!(matches!(
            e.sys.enter_range(
                &p,
                va(v - 4 * PAGE),
                pa(frame(PAGE, 9000)),
                8 * PAGE,
                RO,
                EnterFlags::empty()
            ),
            Err(PmapError::ExistingMapping(_))
        ));
        assert_eq!(e.sys.extract(&p, va(v - 4 * PAGE)), None);
        e.sys.remove(&p, va(v), va(v + n * PAGE)).unwrap();
        for i in [0, 511, n - 1] {
            assert!(cpu.read_u64(v + i * PAGE).is_err());
        }
        cpu.set_user(false);
    });
    let r = e.audit();
    assert_eq!(
        r.user_ptps, 0,
        "PT-2: every user page-table page freed at zero"
    );
    assert_eq!(
        e.frames_in_use(),
        base_frames,
        "no page-table page or PV chunk leaked"
    );
    assert_eq!(e.sys.pv_in_use(), 0);
}

fn promotion_and_demotion(f: FormatId) {
    let e = env(f, 2);
    let p = e.sys.create().unwrap();
    let s = sp(&e);
    let v = e.uva(s, 2);
    let fr = frame(s, 1);
    let n = s / PAGE;
    let base_frames = e.frames_in_use();
    e.m.run_on(0, |cpu| {
        e.sys.activate(&p).unwrap();
        cpu.set_user(true);
        // Fill the table page by page (as faults would), the last entry completes it.
        for i in 0..n {
            let fl = if i % 3 == 0 {
                EnterFlags::MANAGED | EnterFlags::DIRTY
            } else {
                EnterFlags::MANAGED
            };
            e.sys
                .enter(&p, va(v + i * PAGE), pa(fr + i * PAGE), Prot::WRITE, fl, 0)
                .unwrap();
            if i == 5 {
                cpu.read_u64(v + 5 * PAGE).unwrap();
            }
        }
        // Clean writable entries were write-protected, so the attributes differ: no promotion.
        assert_eq!(e.sys.stats().promotions, 0);
        // Make every page dirty-writable by entering the clean ones again as written.
        for i in (0..n).filter(|i| i % 3 != 0) {
            e.sys
                .enter(
                    &p,
                    va(v + i * PAGE),
                    pa(fr + i * PAGE),
                    Prot::WRITE,
                    EnterFlags::MANAGED | EnterFlags::DIRTY,
                    0,
                )
                .unwrap();
        }
        assert_eq!(
            e.sys.stats().promotions,
            1,
            "a full table of contiguous, identical entries promotes"
        );
        let m = e.sys.mapping(&p, va(v + 3 * PAGE)).unwrap();
        assert_eq!(m.size, s);
        assert_eq!(m.pa, pa(fr + 3 * PAGE));
        assert_eq!(
            e.sys.pv_entries(pa(fr)).len(),
            1,
            "one PV entry for the superpage: {:?}",
            e.sys.pv_entries(pa(fr))
        );
        cpu.write_u64(v + 7 * PAGE, 77).unwrap();
        let r = e.audit();
        assert_eq!(r.superpages, 1);
        // Demote by removing one page: the rest stays mapped (demote-after-remove, seed 002).
        e.sys
            .remove(&p, va(v + 4 * PAGE), va(v + 5 * PAGE))
            .unwrap();
        assert_eq!(e.sys.stats().demotions, 1);
        assert!(cpu.read_u64(v + 4 * PAGE).is_err());
        assert_eq!(cpu.read_u64(v + 7 * PAGE).unwrap(), 77);
        assert_eq!(e.sys.extract(&p, va(v + 6 * PAGE)), Some(pa(fr + 6 * PAGE)));
        assert_eq!(p.resident_count(), n - 1);
        e.audit();
        // Refill the hole: promotes again, reusing nothing stale.
        e.sys
            .enter(
                &p,
                va(v + 4 * PAGE),
                pa(fr + 4 * PAGE),
                Prot::WRITE,
                EnterFlags::MANAGED | EnterFlags::DIRTY,
                0,
            )
            .unwrap();
        assert_eq!(e.sys.stats().promotions, 2);
        e.audit();
        // Protect half read-only: demotes and restricts.
        e.sys.protect(&p, va(v), va(v + s / 2), RO).unwrap();
        assert!(cpu.write_u64(v, 1).is_err());
        cpu.write_u64(v + s / 2, 1).unwrap();
        e.audit();
        e.sys.remove(&p, va(v), va(v + s)).unwrap();
        cpu.set_user(false);
    });
    e.audit();
    assert_eq!(e.frames_in_use(), base_frames);
}

fn no_promotion_of_mixed_frames(f: FormatId) {
    let e = env(f, 1);
    let p = e.sys.create().unwrap();
    let s = sp(&e);
    let v = e.uva(s, 2);
    let fr = frame(s, 1);
    e.m.run_on(0, |_| {
        let n = s / PAGE;
        for i in 0..n {
            // One frame out of place.
            let f = if i == 100 {
                fr + s + PAGE
            } else {
                fr + i * PAGE
            };
            e.sys
                .enter(
                    &p,
                    va(v + i * PAGE),
                    pa(f),
                    Prot::WRITE,
                    EnterFlags::DIRTY,
                    0,
                )
                .unwrap();
        }
        assert_eq!(e.sys.stats().promotions, 0);
        assert!(e.sys.stats().promotion_failures >= 1);
        e.sys.remove(&p, va(v), va(v + s)).unwrap();
    });
    e.audit();
}

fn superpages_by_size(f: FormatId) {
    let e = env(f, 2);
    let p = e.sys.create().unwrap();
    let sizes: Vec<u64> = e.sys.page_sizes().collect();
    let base_frames = e.frames_in_use();
    e.m.run_on(0, |cpu| {
        e.sys.activate(&p).unwrap();
        cpu.set_user(true);
        for (psind, &size) in sizes.iter().enumerate().skip(1) {
            let v = e.uva(size, 1);
            let fr = 0; // aligned to every size; unmanaged
            e.sys
                .enter(&p, va(v), pa(fr), Prot::WRITE, EnterFlags::WIRED, psind)
                .unwrap();
            assert_eq!(e.sys.mapping(&p, va(v + size - 8)).unwrap().size, size);
            cpu.read_u64(v + size - 8).unwrap();
            assert_eq!(
                e.sys
                    .enter(&p, va(v), pa(fr), RO, EnterFlags::NOREPLACE, psind),
                Err(PmapError::ExistingSuperpage(va(v))),
                "no-replace over a superpage reports the superpage"
            );
            assert_eq!(p.wired_count(), size / PAGE);
            // Unwire a middle page: demotes (kept whole on failure), only that page unwired.
            e.sys
                .unwire(&p, va(v + size / 2), va(v + size / 2 + PAGE))
                .unwrap();
            assert_eq!(p.wired_count(), size / PAGE - 1);
            e.audit();
            e.sys.remove(&p, va(v), va(v + size)).unwrap();
            assert!(cpu.read_u64(v).is_err());
            // A 4 KiB mapping in the region blocks a no-replace superpage.
            e.sys
                .enter(&p, va(v + PAGE), pa(PAGE), RO, EnterFlags::empty(), 0)
                .unwrap();
            assert_eq!(
                e.sys
                    .enter(&p, va(v), pa(fr), RO, EnterFlags::NOREPLACE, psind),
                Err(PmapError::ExistingMapping(va(v)))
            );
            // Without no-replace it replaces the small mapping.
            e.sys
                .enter(&p, va(v), pa(fr), RO, EnterFlags::empty(), psind)
                .unwrap();
            assert_eq!(e.sys.extract(&p, va(v + PAGE)), Some(pa(fr + PAGE)));
            e.sys.remove(&p, va(v), va(v + size)).unwrap();
            e.audit();
        }
        cpu.set_user(false);
    });
    e.audit();
    assert_eq!(e.frames_in_use(), base_frames);
}

/// Seed 002 (D22763): kernel page-table pages are never freed and their counts never change;
/// a kernel superpage over an all-zero table with no-replace succeeds, over a non-zero one
/// fails, over an existing superpage reports it.
fn seed002_kernel_superpage_noreplace(f: FormatId) {
    let e = env(f, 2);
    let s = sp(&e);
    let k = e.sys.kernel_pmap().clone();
    let start = e.grow(4 * s);
    let v = start.next_multiple_of(s);
    let psind = 1;
    let before = e.frames_in_use();
    e.m.run_on(0, |cpu| {
        e.sys
            .enter(
                &k,
                va(v),
                pa(frame(s, 0)),
                Prot::WRITE,
                EnterFlags::WIRED,
                psind,
            )
            .unwrap();
        assert_eq!(
            e.frames_in_use(),
            before,
            "the zero table is kept, nothing allocated"
        );
        cpu.write_u64(v + 8, 5).unwrap();
        assert_eq!(
            e.sys.enter(
                &k,
                va(v),
                pa(frame(s, 1)),
                Prot::WRITE,
                EnterFlags::NOREPLACE,
                psind
            ),
            Err(PmapError::ExistingSuperpage(va(v)))
        );
        let w = v + s;
        e.sys
            .kenter(va(w + 3 * PAGE), pa(frame(PAGE, 3)), vmsys::pmap::WB)
            .unwrap();
        assert_eq!(
            e.sys.enter(
                &k,
                va(w),
                pa(frame(s, 1)),
                Prot::WRITE,
                EnterFlags::NOREPLACE,
                psind
            ),
            Err(PmapError::ExistingMapping(va(w)))
        );
        e.sys.kremove(va(w + 3 * PAGE)).unwrap();
        let r = e.audit();
        assert!(r.kernel_ptps > 0 && r.saved_ptps == 1);
        // Remove the superpage: the saved table comes back zero-filled, nothing freed.
        e.sys.remove(&k, va(v), va(v + s)).unwrap();
        assert!(cpu.read_u64(v + 8).is_err());
        assert_eq!(
            e.frames_in_use(),
            before,
            "kernel page-table pages are never freed"
        );
        // And 4 KiB kernel mappings work there again.
        e.sys
            .kenter(va(v), pa(frame(PAGE, 1)), vmsys::pmap::WB)
            .unwrap();
        cpu.write_u64(v, 1).unwrap();
        e.sys.kremove(va(v)).unwrap();
        // Demotion of a kernel superpage never allocates (the table is saved).
        e.sys
            .enter(
                &k,
                va(v),
                pa(frame(s, 0)),
                Prot::WRITE,
                EnterFlags::NOREPLACE,
                psind,
            )
            .unwrap();
        e.frames.inject_failures(0, None);
        e.sys.remove(&k, va(v + PAGE), va(v + 2 * PAGE)).unwrap();
        e.frames.clear_failures();
        assert_eq!(e.sys.stats().demotions, 1);
        assert!(cpu.read_u64(v + PAGE).is_err());
        cpu.read_u64(v + 2 * PAGE).unwrap();
        e.sys.remove(&k, va(v), va(v + s)).unwrap();
    });
    let r = e.audit();
    assert_eq!(r.saved_ptps, 0);
    assert_eq!(e.frames_in_use(), before);
}

/// Seed 002: a PV allocation failure inside `copy` frees the page-table page just allocated
/// for the copy (FreeBSD's `pmap_abort_ptp` in `pmap_copy`).
fn seed002_copy_pv_failure_frees_fresh_ptp(f: FormatId) {
    let e = env(f, 1);
    let s = sp(&e);
    let src = e.sys.create().unwrap();
    let dst = e.sys.create().unwrap();
    let v = e.uva(s, 3);
    e.m.run_on(0, |_| {
        e.sys
            .enter(&src, va(v), pa(frame(s, 2)), RO, EnterFlags::MANAGED, 1)
            .unwrap();
        e.sys
            .enter(
                &src,
                va(v + s),
                pa(frame(PAGE, 5)),
                RO,
                EnterFlags::MANAGED,
                0,
            )
            .unwrap();
        let before = e.frames_in_use();
        e.sys.inject_pv_failures(0, Some(1));
        let copied = e.sys.copy(&dst, &src, va(v), 2 * s).unwrap();
        assert_eq!(copied, 0, "the first PV allocation failed: copy stops");
        assert_eq!(
            e.frames_in_use(),
            before,
            "the fresh page-table pages were freed"
        );
        assert_eq!(dst.resident_count(), 0);
        e.audit();
        // Without failures it copies both.
        let copied = e.sys.copy(&dst, &src, va(v), 2 * s).unwrap();
        assert_eq!(copied, s / PAGE + 1);
        assert_eq!(e.sys.extract(&dst, va(v + 9)), Some(pa(frame(s, 2) + 9)));
        e.audit();
        e.sys.remove_all(pa(frame(s, 2) + 3 * PAGE));
        e.sys.remove_all(pa(frame(PAGE, 5)));
        // The child's superpage was never accessed (copies are clean and unaccessed), so its
        // demotion destroys it rather than allocate (FreeBSD's rule); the parent's demotes.
        assert_eq!(src.resident_count(), s / PAGE - 1);
        assert_eq!(dst.resident_count(), 0);
    });
    e.audit();
}

/// Fault injection: a page-table page or PV entry that cannot be allocated is a
/// `ResourceShortage`, and nothing leaks.
fn enter_resource_shortage(f: FormatId) {
    let e = env(f, 1);
    let p = e.sys.create().unwrap();
    let v = match f {
        FormatId::I386 | FormatId::I386Pae => e.uva(4 << 20, 20),
        _ => e.uva(1 << 30, 5),
    } + 3 * PAGE;
    let before = e.frames_in_use();
    e.m.run_on(0, |_| {
        for after in 0..4 {
            e.frames.inject_failures(after, Some(1));
            let r = e.sys.enter(
                &p,
                va(v),
                pa(frame(PAGE, 1)),
                RO,
                EnterFlags::MANAGED | EnterFlags::NOSLEEP,
                0,
            );
            e.frames.clear_failures();
            match r {
                Err(PmapError::ResourceShortage) => {
                    assert_eq!(
                        e.frames_in_use(),
                        before,
                        "after {after}: partial tables freed"
                    );
                    e.audit();
                }
                Ok(()) => {
                    e.sys.remove(&p, va(v), va(v + PAGE)).unwrap();
                }
                Err(x) => panic!("{x}"),
            }
        }
        e.sys.inject_pv_failures(0, Some(1));
        assert_eq!(
            e.sys
                .enter(&p, va(v), pa(frame(PAGE, 1)), RO, EnterFlags::MANAGED, 0),
            Err(PmapError::ResourceShortage)
        );
        assert_eq!(
            e.frames_in_use(),
            before,
            "abort_ptp freed the tables of the failed insertion"
        );
        assert_eq!(
            e.sys.enter_quick(&p, va(v), pa(frame(PAGE, 1)), RO, true),
            Ok(true)
        );
        assert_eq!(
            e.sys.enter_quick(&p, va(v), pa(frame(PAGE, 2)), RO, true),
            Ok(false)
        );
        e.sys.remove(&p, va(v), va(v + PAGE)).unwrap();
    });
    e.audit();
    assert_eq!(e.frames_in_use(), before);
}

/// PV-driven operations across pmaps.
fn reverse_map_operations(f: FormatId) {
    let e = env(f, 3);
    let pmaps: Vec<_> = (0..3).map(|_| e.sys.create().unwrap()).collect();
    let fr = frame(PAGE, 11);
    let v = e.uva(PAGE, 8);
    e.m.run_on(0, |_| {
        for (i, p) in pmaps.iter().enumerate() {
            e.sys
                .enter(
                    p,
                    va(v + i as u64 * PAGE),
                    pa(fr),
                    Prot::WRITE,
                    EnterFlags::MANAGED,
                    0,
                )
                .unwrap();
        }
    });
    // Each pmap active on its own CPU; each writes the page.
    for (c, p) in pmaps.iter().enumerate() {
        e.m.run_on(c as u32, |cpu| {
            e.sys.activate(p).unwrap();
            cpu.set_user(true);
            cpu.write_u64(v + c as u64 * PAGE, c as u64).unwrap();
            cpu.set_user(false);
        });
    }
    e.m.run_on(0, |_| {
        assert!(e.sys.is_modified(pa(fr)));
        assert_eq!(e.sys.page_mapping_count(pa(fr)), 3);
        assert!(e.sys.page_exists_quick(&pmaps[2], pa(fr)));
        assert!(e.sys.ts_referenced(pa(fr)) >= 3);
        assert_eq!(e.sys.ts_referenced(pa(fr)), 0, "accessed bits were cleared");
        e.sys.clear_modify(pa(fr));
        assert!(!e.sys.is_modified(pa(fr)));
        e.sys.remove_write(pa(fr));
    });
    for (c, _) in pmaps.iter().enumerate() {
        e.m.run_on(c as u32, |cpu| {
            cpu.set_user(true);
            assert!(
                cpu.write_u64(v + c as u64 * PAGE, 1).is_err(),
                "remove_write reached cpu {c}"
            );
            cpu.read_u64(v + c as u64 * PAGE).unwrap();
            cpu.set_user(false);
        });
    }
    e.audit();
    e.m.run_on(0, |_| e.sys.remove_all(pa(fr)));
    for (c, p) in pmaps.iter().enumerate() {
        e.m.run_on(c as u32, |cpu| {
            cpu.set_user(true);
            assert!(
                cpu.read_u64(v + c as u64 * PAGE).is_err(),
                "remove_all reached cpu {c}"
            );
            cpu.set_user(false);
            assert_eq!(p.resident_count(), 0);
        });
    }
    assert_eq!(e.sys.page_mapping_count(pa(fr)), 0);
    e.audit();
}

/// Seed 000: a qenter'd entry inside a region that would promote. Where the format has a
/// no-promote bit, promotion refuses the region; where it has none (i386, PAE), promotion
/// happens and qremove is refused (`ExistingSuperpage`, in every build), rather than demoting
/// or writing through the superpage.
fn seed000_qenter_in_promotable_region(f: FormatId) {
    let e = env(f, 2);
    let s = sp(&e);
    let k = e.sys.kernel_pmap().clone();
    let start = e.grow(3 * s);
    let v = start.next_multiple_of(s);
    let fr = frame(s, 3);
    let n = s / PAGE;
    let q = 17;
    let has_bit = f.format().software.no_promote_bit.is_some();
    let result = e.m.run_on(0, |cpu| {
        e.sys
            .qenter(va(v + q * PAGE), &[pa(fr + q * PAGE)])
            .unwrap();
        for i in (0..n).filter(|&i| i != q) {
            e.sys
                .enter(
                    &k,
                    va(v + i * PAGE),
                    pa(fr + i * PAGE),
                    Prot::WRITE,
                    EnterFlags::DIRTY,
                    0,
                )
                .unwrap();
        }
        cpu.write_u64(v + q * PAGE, 9).unwrap();
        let promoted = e.sys.stats().promotions;
        if has_bit {
            assert_eq!(promoted, 0, "the no-promote bit refuses promotion");
        } else {
            assert_eq!(promoted, 1, "without a no-promote bit the region promotes");
        }
        e.sys.qremove(va(v + q * PAGE), 1)
    });
    if has_bit {
        result.unwrap();
        e.m.run_on(0, |cpu| {
            assert!(
                cpu.read_u64(v + q * PAGE).is_err(),
                "qremove unmapped the page"
            );
        });
    } else {
        // Refused in every build: the superpage is neither demoted nor written through.
        assert_eq!(result, Err(PmapError::ExistingSuperpage(va(v + q * PAGE))));
        e.m.run_on(0, |cpu| assert_eq!(cpu.read_u64(v + q * PAGE), Ok(9)));
        assert_eq!(e.sys.stats().demotions, 0);
    }
    e.m.run_on(0, |_| e.sys.remove(&k, va(v), va(v + s)).unwrap());
    e.audit();
}

/// Seed 001: quick mappings pass through the direct map where there is one, use the CPU's slot
/// otherwise, and do not nest: in every build, a nested quick map is an error that leaves the
/// held mapping intact.
fn seed001_quick_mappings(f: FormatId) {
    let e = env(f, 2);
    let low = frame(PAGE, 1); // inside the direct map (if any)
    let high = 700 << 20; // above the direct-map limit
    e.m.run_on(1, |cpu| {
        e.m.mem().store_u64(low, 0x1111);
        e.m.mem().store_u64(high, 0x2222);
        e.m.mem().store_u64(high + PAGE, 0x3333);
        let a = e.sys.quick_enter_page(pa(low)).unwrap();
        if let Some((base, _)) = e.sys.direct_map() {
            assert_eq!(a.as_u64(), base.as_u64() + low, "direct-map pass-through");
        }
        assert_eq!(cpu.read_u64(a.as_u64()).unwrap(), 0x1111);
        e.sys.quick_remove_page(a).unwrap();
        let b = e.sys.quick_enter_page(pa(high)).unwrap();
        assert_eq!(cpu.read_u64(b.as_u64()).unwrap(), 0x2222);
        assert!(matches!(
            e.sys.quick_enter_page(pa(high + PAGE)),
            Err(PmapError::QuickMapBusy { cpu: 1, slot: 0 })
        ));
        assert_eq!(
            cpu.read_u64(b.as_u64()).unwrap(),
            0x2222,
            "the refused nested map left the held one as it was"
        );
        e.sys.quick_remove_page(b).unwrap();
        assert!(
            cpu.read_u64(b.as_u64()).is_err(),
            "slot unmapped and invalidated locally"
        );
        // Two slots for a copy.
        let (s, d) = e.sys.quick_enter_pair(pa(high), pa(high + PAGE)).unwrap();
        let x = cpu.read_u64(s.as_u64()).unwrap();
        cpu.write_u64(d.as_u64(), x).unwrap();
        e.sys.quick_remove_pair(s, d).unwrap();
    });
    e.m.run_on(1, |_| {
        let c = e.sys.quick_enter_page(pa(high)).unwrap();
        e.sys.quick_remove_page(c).unwrap();
    });
    assert_eq!(e.m.mem().load_u64(high + PAGE), 0x2222);
    e.audit();
}

/// Seed 004: after growkernel, a kernel access works from every existing and every new address
/// space; the strategy is the format's.
fn seed004_kernel_sync(f: FormatId) {
    let e = env(f, 3);
    let old: Vec<_> = (0..2).map(|_| e.sys.create().unwrap()).collect();
    let expect = match f {
        FormatId::Arm64 => KptSync::SharedRoot,
        FormatId::I386 => KptSync::Propagate,
        _ => KptSync::PreallocTop,
    };
    assert_eq!(e.sys.kpt_sync_cost().strategy, expect);
    // Grow well past the first table so that new upper-level entries appear.
    let big = 64 * sp(&e);
    let start = e.grow(big);
    let v = start + big - PAGE;
    e.m.run_on(0, |_| {
        e.sys
            .kenter(va(v), pa(frame(PAGE, 42)), vmsys::pmap::WB)
            .unwrap()
    });
    e.m.mem().store_u64(frame(PAGE, 42), 4242);
    let new = e.sys.create().unwrap();
    let all = [old[0].clone(), old[1].clone(), new.clone()];
    for (c, p) in all.iter().enumerate() {
        e.m.run_on(c as u32, |cpu| {
            e.sys.activate(p).unwrap();
            assert_eq!(
                cpu.read_u64(v).unwrap(),
                4242,
                "kernel VA from address space {c}"
            );
        });
    }
    let cost = e.sys.kpt_sync_cost();
    eprintln!("{f}: {cost:?}");
    if expect == KptSync::Propagate {
        assert!(cost.propagated_stores > 0);
    }
    e.audit();
    e.m.run_on(0, |_| e.sys.kremove(va(v)).unwrap());
    for (c, _) in all.iter().enumerate() {
        e.m.run_on(c as u32, |cpu| assert!(cpu.read_u64(v).is_err()));
    }
    e.audit();
}

/// Shootdown reaches exactly the CPUs that need it; the detector (checking every access) and
/// the audit find no stale translation.
fn shootdown_is_precise(f: FormatId) {
    let e = env(f, 4);
    let p = e.sys.create().unwrap();
    let q = e.sys.create().unwrap();
    let v = e.uva(PAGE, 40);
    e.m.run_on(0, |_| {
        e.sys
            .enter_range(
                &p,
                va(v),
                pa(frame(PAGE, 0)),
                8 * PAGE,
                Prot::WRITE,
                EnterFlags::MANAGED,
            )
            .unwrap();
    });
    for c in 0..3 {
        e.m.run_on(c, |cpu| {
            e.sys.activate(&p).unwrap();
            cpu.set_user(true);
            for i in 0..8 {
                cpu.read_u64(v + i * PAGE).unwrap();
            }
            cpu.set_user(false);
        });
    }
    // CPU 2 switches to another address space: it keeps p's entries under p's tag.
    e.m.run_on(2, |_| e.sys.activate(&q).unwrap());
    let before = e.m.counters();
    e.m.run_on(0, |_| e.sys.remove(&p, va(v), va(v + 2 * PAGE)).unwrap());
    let after = e.m.counters();
    if !f.format().tlb.broadcast_invalidate {
        assert_eq!(
            after.ipis_sent - before.ipis_sent,
            1,
            "only cpu 1 (active elsewhere) is interrupted"
        );
    }
    for c in [0, 1] {
        e.m.run_on(c, |cpu| {
            cpu.set_user(true);
            assert!(cpu.read_u64(v).is_err());
            cpu.read_u64(v + 2 * PAGE).unwrap();
            cpu.set_user(false);
        });
    }
    // CPU 2 comes back to p: it must not see the removed pages.
    e.m.run_on(2, |cpu| {
        e.sys.activate(&p).unwrap();
        cpu.set_user(true);
        assert!(
            cpu.read_u64(v + PAGE).is_err(),
            "stale entry flushed on return"
        );
        cpu.read_u64(v + 3 * PAGE).unwrap();
        cpu.set_user(false);
    });
    e.audit();
}

/// Tags are recycled by generation when they run out.
fn tag_recycling(f: FormatId) {
    let cfg = PmapConfig {
        max_tags: Some(3),
        ..PmapConfig::default()
    };
    let e = env_with(f, 2, cfg);
    let v = e.uva(PAGE, 2);
    let pmaps: Vec<_> = (0..6).map(|_| e.sys.create().unwrap()).collect();
    e.m.run_on(0, |_| {
        for (i, p) in pmaps.iter().enumerate() {
            e.sys
                .enter(
                    p,
                    va(v),
                    pa(frame(PAGE, i as u64)),
                    RO,
                    EnterFlags::empty(),
                    0,
                )
                .unwrap();
        }
    });
    for round in 0..3 {
        for (i, p) in pmaps.iter().enumerate() {
            let c = ((i + round) % 2) as u32;
            e.m.run_on(c, |cpu| {
                e.sys.activate(p).unwrap();
                e.m.mem().store_u64(frame(PAGE, i as u64), i as u64 + 100);
                cpu.set_user(true);
                assert_eq!(
                    cpu.read_u64(v).unwrap(),
                    i as u64 + 100,
                    "round {round} pmap {i} on cpu {c}"
                );
                cpu.set_user(false);
            });
        }
    }
    let tagged = f.format().tlb.tag != vmsys::arch::TlbTag::None;
    if tagged {
        assert!(
            e.sys.stats().tag_rollovers > 0,
            "3 tags for 6 pmaps roll over"
        );
    }
    e.audit();
}

/// arm64 without hardware access-flag management: an entry whose AF `ts_referenced` cleared
/// faults on the next access; the pmap's fault handler sets AF and the access is retried. Without
/// the handler the fault reaches the caller.
#[test]
fn arm64_software_access_flag_is_set_by_the_pmap_fault_handler() {
    let e = env_on(
        machine_config(FormatId::Arm64, 1).arm64_software_af(),
        PmapConfig::default(),
    );
    let p = e.sys.create().unwrap();
    let v = e.uva(PAGE, 1);
    let f = frame(PAGE, 3);
    e.m.run_on(0, |c| {
        e.sys.activate(&p).unwrap();
        e.sys
            .enter(&p, va(v), pa(f), Prot::USER, EnterFlags::MANAGED, 0)
            .unwrap();
        c.set_user(true);
        assert!(c.read_u64(v).is_ok(), "a fresh entry has AF set");
        assert_eq!(e.sys.ts_referenced(pa(f)), 1);
        let err = c.read_u64(v).unwrap_err();
        assert!(
            matches!(err.reason, vmsys::platform::FaultReason::AccessFlag { .. }),
            "{err}"
        );
        e.sys.install_fault_handler();
        assert!(c.read_u64(v).is_ok(), "the pmap sets AF and retries");
        c.set_user(false);
        assert_eq!(e.sys.stats().access_flag_faults, 1);
        assert_eq!(
            e.sys.ts_referenced(pa(f)),
            1,
            "the retried access referenced it"
        );
        // A real violation is still delivered: a user write to a read-only page.
        c.set_user(true);
        assert!(c.write_u64(v, 1).is_err());
        c.set_user(false);
        e.sys.remove(&p, va(v), va(v + PAGE)).unwrap();
    });
    e.audit();
}

for_each_format! {
    enter_access_remove_ => crate::enter_access_remove;
    bad_input_ => crate::bad_input_is_an_error;
    range_map_unmap_ => crate::range_map_unmap_no_leak;
    promotion_demotion_ => crate::promotion_and_demotion;
    no_promotion_mixed_ => crate::no_promotion_of_mixed_frames;
    superpages_by_size_ => crate::superpages_by_size;
    seed002_kernel_superpage_ => crate::seed002_kernel_superpage_noreplace;
    seed002_copy_pv_failure_ => crate::seed002_copy_pv_failure_frees_fresh_ptp;
    resource_shortage_ => crate::enter_resource_shortage;
    reverse_map_ => crate::reverse_map_operations;
    seed000_qenter_promotion_ => crate::seed000_qenter_in_promotable_region;
    seed001_quick_ => crate::seed001_quick_mappings;
    seed004_kernel_sync_ => crate::seed004_kernel_sync;
    shootdown_precise_ => crate::shootdown_is_precise;
    tag_recycling_ => crate::tag_recycling;
}
