//! Kernel memory, physical memory and the system audit given bad input through the public API
//! (issue 10, items 4, 6, 7 and 12): every case must be a clear error that changes nothing, in
//! the dev and the release profile, and each is followed by the full audit of every layer
//! (`System::audit`, with its frame accounting), so that nothing may leak or be corrupted.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use vmsys::arch::FormatId;
use vmsys::kmem::{KmemConfig, KmemError};
use vmsys::phys::{PhysError, ReservError};
use vmsys::platform::Platform;
use vmsys::vmem::{Policy, VmemError, ADDR_MAX, ADDR_MIN};
use vmsys::{PhysAddr, PmapConfig};
use vmsys_sim::system::System;
use vmsys_sim::{DetectorMode, MachineConfig};

const PAGE: u64 = 4096;

/// A booted system and the frames the test holds outside it (for the audit's accounting).
struct KEnv {
    s: System,
    borrowed: AtomicU64,
}

impl std::ops::Deref for KEnv {
    type Target = System;
    fn deref(&self) -> &System {
        &self.s
    }
}

/// 256 MiB, direct map (where the format has one) over the first 128 MiB only, as
/// `tests/kmem.rs` boots it.
fn kenv(f: FormatId) -> KEnv {
    let mcfg = MachineConfig::new(f)
        .cpus(2)
        .mem(256 << 20)
        .direct_map_limit(128 << 20)
        .detector(DetectorMode::Every);
    KEnv {
        s: System::boot(mcfg, PmapConfig::default(), KmemConfig::default()).expect("boot"),
        borrowed: AtomicU64::new(0),
    }
}

impl KEnv {
    /// Every audit of every layer, with the frame accounting: each frame the buddy has out is
    /// held by the pmap, live kmem memory, a reservation, or the test.
    fn audit(&self, what: &str) {
        let a = self.s.audit(self.borrowed.load(SeqCst));
        assert!(
            a.violations.is_empty(),
            "{what}: audit: {:#?}",
            a.violations
        );
    }

    /// `n` physically contiguous frames for the test's own use, above the direct map if `high`.
    fn frames(&self, n: u64, high: bool) -> PhysAddr {
        let low = if high { 128 << 20 } else { 0 };
        let pa = self
            .buddy
            .alloc_contig(0, n, PhysAddr::new(low), PhysAddr::new(u64::MAX), PAGE, 0)
            .expect("memory");
        self.borrowed.fetch_add(n, SeqCst);
        pa
    }

    fn give_back(&self, pa: PhysAddr, n: u64) {
        self.buddy.free_contig(pa, n).unwrap();
        self.borrowed.fetch_sub(n, SeqCst);
    }
}

/// Item 4: `kernel_arena().xalloc` with an alignment that no address of the kernel's KVA can
/// meet (2^42 and up on amd64, 2^63 on arm64, ...) made the KVA grower's `next_multiple_of`
/// overflow: a panic in dev; in release the import returned VA 0 or 2^63 as kernel VA and
/// moved the grower's frontier into the user half for good. Every such import must fail with
/// the frontier unchanged, and kernel memory must keep working after them.
fn huge_alignment_import_never_leaves_the_kernel_half(f: FormatId) {
    let e = kenv(f);
    let (start, limit) = e.kmem.kva_span();
    let (start, limit) = (start.as_u64(), limit.as_u64());
    let arena = e.kmem.kernel_arena().clone();
    let sp = e.kmem.superpage();
    e.m.run_on(0, |_| {
        let mut refused = 0;
        for k in 12..64u32 {
            let align = 1u64 << k;
            let frontier = e.kmem.kva_frontier().as_u64();
            // The first address at or above the frontier with that alignment, in u128: when
            // it (plus the import's superpage) does not fit below the limit, nothing does.
            let first = (frontier as u128).div_ceil(align as u128) * align as u128;
            if first + sp as u128 <= limit as u128 {
                continue;
            }
            let r = arena.xalloc(PAGE, align, 0, 0, ADDR_MIN, ADDR_MAX, Policy::InstantFit);
            assert!(
                matches!(r, Err(VmemError::ImportFailed { .. })),
                "{f:?}: alignment 2^{k}: {r:#x?} (KVA [{start:#x}, {limit:#x}))"
            );
            assert_eq!(
                e.kmem.kva_frontier().as_u64(),
                frontier,
                "{f:?}: a refused import of alignment 2^{k} moved the frontier"
            );
            refused += 1;
        }
        assert!(refused > 0, "{f:?}: no alignment was too large to test");
        // Still kernel memory: an import, and a superpage that promotes.
        let va = e.kmem.kmem_malloc(2 * sp, 0, true).unwrap();
        assert!((start..limit).contains(&va.as_u64()), "{f:?}: {va}");
        e.audit("with a live allocation after the refused imports");
        e.kmem.kmem_free(va, 2 * sp).unwrap();
        let frontier = e.kmem.kva_frontier().as_u64();
        assert!(
            frontier > start && frontier <= limit,
            "{f:?}: {frontier:#x}"
        );
    });
    e.audit("after the refused imports");
}

/// Item 7: `map_io_transient` of a frame near 2^64 computed `pa + PAGE_SIZE <= size`
/// unchecked: a panic in dev; in release the test passed and the mapping returned a VA just
/// below the direct map. A frame the machine does not have, or a misaligned one, is refused
/// before anything is mapped (also when it comes after good pages in the list).
fn transient_map_of_a_frame_near_2_64_is_refused(f: FormatId) {
    let e = kenv(f);
    let low = e.frames(1, false);
    e.m.run_on(0, |_| {
        let before = e.kmem.stats();
        let arena_before = e.kmem.transient_arena().stats().in_use;
        for bad in [
            u64::MAX - (PAGE - 1),
            u64::MAX - (2 * PAGE - 1),
            1 << 63,
            256 << 20,
            low.as_u64() + 8,
        ] {
            let bad = PhysAddr::new(bad);
            for can_fault in [false, true] {
                for pages in [vec![bad], vec![low, bad]] {
                    let r = e.kmem.map_io_transient(&pages, can_fault);
                    assert!(
                        matches!(r, Err(KmemError::NotAFrame(p)) if p == bad),
                        "{f:?}: map_io_transient({pages:?}): {r:?}"
                    );
                }
            }
        }
        assert_eq!(
            e.kmem.stats(),
            before,
            "{f:?}: a refused mapping changes nothing"
        );
        assert_eq!(e.kmem.transient_arena().stats().in_use, arena_before);
        // Good frames still map.
        let m = e.kmem.map_io_transient(&[low], false).unwrap();
        e.audit("with a live transient mapping");
        e.kmem.unmap_io_transient(m).unwrap();
    });
    e.audit("after refused transient mappings");
    e.give_back(low, 1);
    e.audit("after the test's frames went back");
}

/// Item 7: a bounce copy with an offset near `u64::MAX` checked `off + len <= PAGE_SIZE`
/// unchecked: a panic in dev; in release the sum wrapped, the check passed and the copy wrote
/// into (or read from) the previous frame. Frames on both sides of the target must be
/// untouched, and the target too.
fn bounce_with_an_offset_near_2_64_is_refused(f: FormatId) {
    let e = kenv(f);
    for high in [false, true] {
        let run = e.frames(3, high);
        let target = run + PAGE;
        for i in 0..3 {
            e.m.phys_write(run + i * PAGE, &[0x11 * (i as u8 + 1); PAGE as usize]);
        }
        e.m.run_on(0, |_| {
            let copies = e.kmem.stats().bounce_copies;
            for (off, len) in [
                (u64::MAX - 7, 16usize),
                (u64::MAX, 1),
                (u64::MAX - PAGE + 1, PAGE as usize),
                (PAGE - 4, 8),
                (PAGE, 1),
            ] {
                let r = e.kmem.bounce_to_phys(target, off, &vec![0xee; len]);
                assert_eq!(
                    r,
                    Err(KmemError::OutsidePage {
                        off,
                        len: len as u64
                    }),
                    "{f:?}"
                );
                let mut buf = vec![0u8; len];
                let r = e.kmem.bounce_from_phys(target, off, &mut buf);
                assert_eq!(
                    r,
                    Err(KmemError::OutsidePage {
                        off,
                        len: len as u64
                    }),
                    "{f:?}"
                );
                assert!(buf.iter().all(|&b| b == 0), "{f:?}: nothing was read");
            }
            assert_eq!(e.kmem.stats().bounce_copies, copies);
            // In range, at the very end of the page: fine.
            e.kmem.bounce_to_phys(target, PAGE - 8, &[0x77; 8]).unwrap();
        });
        for i in 0..3 {
            let mut b = vec![0u8; PAGE as usize];
            e.m.phys_read(run + i * PAGE, &mut b);
            let want = 0x11 * (i as u8 + 1);
            let end = if i == 1 {
                PAGE as usize - 8
            } else {
                PAGE as usize
            };
            assert!(
                b[..end].iter().all(|&x| x == want),
                "{f:?}: frame {i} of the run was written"
            );
        }
        e.audit("after refused bounce copies");
        e.give_back(run, 3);
    }
    e.audit("after the test's frames went back");
}

/// Item 7: `kmem_free(va, u64::MAX)` and `kva_free(va, u64::MAX - 10)` rounded the size up to
/// a page with `next_multiple_of`, which overflows: a panic in dev, a wrapped length in
/// release. Every size that cannot be a live allocation's is `BadSize`, with the allocations
/// still live and audited as such.
fn huge_sizes_to_kmem_and_kva_frees_are_errors_that_change_nothing(f: FormatId) {
    let e = kenv(f);
    e.m.run_on(1, |c| {
        let va = e.kmem.kmem_malloc(3 * PAGE, 0, true).unwrap();
        c.write_u64(va.as_u64(), 0x5eed).unwrap();
        let kva = e.kmem.kva_alloc(2 * PAGE).unwrap();
        let before = e.kmem.stats();
        for size in [u64::MAX, u64::MAX - 10, u64::MAX - PAGE + 2, 1 << 63] {
            assert_eq!(
                e.kmem.kmem_free(va, size),
                Err(KmemError::BadSize(size)),
                "{f:?}"
            );
            assert_eq!(
                e.kmem.kva_free(kva, size),
                Err(KmemError::BadSize(size)),
                "{f:?}"
            );
            assert_eq!(
                e.kmem.kmem_malloc(size, 0, false),
                Err(KmemError::BadSize(size))
            );
            assert_eq!(e.kmem.kva_alloc(size), Err(KmemError::BadSize(size)));
        }
        assert_eq!(
            e.kmem.stats(),
            before,
            "{f:?}: refused frees change nothing"
        );
        assert_eq!(c.read_u64(va.as_u64()), Ok(0x5eed));
        e.audit("with the allocations still live");
        e.kmem.kmem_free(va, 3 * PAGE).unwrap();
        e.kmem.kva_free(kva, 2 * PAGE).unwrap();
    });
    e.audit("after the real frees");
}

/// Item 12: `System::audit` reported a leak whenever a small `kmem_malloc` was live: its
/// reservation holds the rest of its frames from the buddy without handing them out, and the
/// accounting did not count them. Audited here with small allocations live, of several sizes
/// and in several reservations, as they are freed one by one.
fn audit_with_live_small_allocations_counts_no_leak(f: FormatId) {
    let e = kenv(f);
    let sp = e.kmem.superpage();
    e.m.run_on(0, |_| {
        let mut live = Vec::new();
        for size in [1, PAGE, 3 * PAGE + 1, 100_000, sp + 5 * PAGE] {
            live.push((e.kmem.kmem_malloc(size, 0, false).unwrap(), size));
            e.audit(&format!("{f:?}: {} small allocations live", live.len()));
        }
        assert!(
            e.reserv.unpopulated_frames() > 0,
            "{f:?}: the case needs a partially populated reservation"
        );
        while let Some((va, size)) = live.pop() {
            e.kmem.kmem_free(va, size).unwrap();
            e.audit(&format!("{f:?}: {} small allocations live", live.len()));
        }
    });
    assert_eq!(e.reserv.unpopulated_frames(), 0);
}

/// Item 6: a page of a live `kmem_malloc` allocation is wired. Freeing it behind kmem's back
/// through the reservation system (or the buddy) was refused only by a debug assertion;
/// release builds put the live page on the free lists. It is an error in every build and
/// changes nothing; so is a free of a live user page-table page (the pmap's root of a user
/// address space) or of a kernel page-table page.
fn free_of_a_live_wired_or_page_table_frame_is_refused(f: FormatId) {
    let e = kenv(f);
    e.m.run_on(0, |c| {
        let va = e.kmem.kmem_malloc(2 * PAGE, 0, false).unwrap();
        c.write_u64(va.as_u64(), 0xfeed).unwrap();
        let pa = e.pmap.extract(e.pmap.kernel_pmap(), va).unwrap();
        let before = (e.buddy.allocated_pages(), e.reserv.stats());
        assert_eq!(
            e.reserv.free_page(pa),
            Err(ReservError::Phys(PhysError::Wired { pa, count: 1 })),
            "{f:?}"
        );
        let r = e.buddy.free(pa, 0);
        assert!(
            matches!(
                r,
                Err(PhysError::InsideBlock { .. } | PhysError::WrongOrder { .. })
            ),
            "{f:?}: a reserved frame is part of its reservation's block: {r:?}"
        );
        assert_eq!((e.buddy.allocated_pages(), e.reserv.stats()), before);
        assert_eq!(c.read_u64(va.as_u64()), Ok(0xfeed));
        e.audit("after the refused free of a live kmem page");
        e.kmem.kmem_free(va, 2 * PAGE).unwrap();

        let p = e.pmap.create().unwrap();
        let out = e.buddy.allocated_pages();
        // Find the root among the frames the pmap holds: the one flagged as a user table.
        let root = e
            .pmap
            .pages()
            .iter()
            .find(|(_, m)| m.flags() & vmsys::page::page_flags::PTP != 0)
            .map(|(pa, _)| pa)
            .expect("a user pmap has a root table");
        let r = e.buddy.free(root, 0);
        assert!(
            matches!(r, Err(PhysError::PmapPage { pa, .. }) if pa == root),
            "{f:?}: {r:?}"
        );
        assert_eq!(e.buddy.allocated_pages(), out);
        e.audit("after the refused free of a live page-table page");
        e.pmap.destroy(p).unwrap();

        // A kernel page-table page (fixed, never freed: PT-3) is refused too.
        let ktable = e
            .pmap
            .pages()
            .iter()
            .find(|(_, m)| m.flags() & vmsys::page::page_flags::KERNEL_PTP != 0)
            .map(|(pa, _)| pa)
            .expect("the kernel has page-table pages");
        let out = e.buddy.allocated_pages();
        let r = e.buddy.free(ktable, 0);
        assert!(
            matches!(r, Err(PhysError::PmapPage { pa, .. }) if pa == ktable),
            "{f:?}: {r:?}"
        );
        assert_eq!(e.buddy.allocated_pages(), out);
        e.audit("after the refused free of a live kernel page-table page");
    });
    e.audit("after the pmap went");
}

for_each_format! {
    huge_alignment_import_never_leaves_the_kernel_half_ => crate::huge_alignment_import_never_leaves_the_kernel_half;
    transient_map_of_a_frame_near_2_64_is_refused_ => crate::transient_map_of_a_frame_near_2_64_is_refused;
    bounce_with_an_offset_near_2_64_is_refused_ => crate::bounce_with_an_offset_near_2_64_is_refused;
    huge_sizes_to_kmem_and_kva_frees_are_errors_that_change_nothing_ => crate::huge_sizes_to_kmem_and_kva_frees_are_errors_that_change_nothing;
    audit_with_live_small_allocations_counts_no_leak_ => crate::audit_with_live_small_allocations_counts_no_leak;
    free_of_a_live_wired_or_page_table_frame_is_refused_ => crate::free_of_a_live_wired_or_page_table_frame_is_refused;
}
