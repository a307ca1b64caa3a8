//! Superpage promotion and demotion.
//!
//! Promotion (FreeBSD `pmap_promote_pde`, with D41944's rules): a last-level table whose
//! entries map one aligned, physically contiguous superpage-sized run with identical
//! attributes becomes one superpage leaf. Accessed bits are not required; a clean writable
//! entry is write-protected first (so that a later write is seen); the superpage is accessed
//! only if every entry was. An entry with the no-promote marker refuses promotion. The table is
//! kept ("saved") for the demotion that may follow.
//!
//! Demotion turns a superpage leaf back into a table of smaller leaves, reusing the saved table
//! or allocating one. A user demotion that cannot allocate destroys the mapping (the fault
//! handler will bring it back); a kernel superpage always has its table saved, so a kernel
//! demotion does not allocate.
//!
//! arm64 requires break-before-make for both: the entry goes invalid, the TLBs are flushed,
//! then the new entry is written.

use vmsys_arch::PteFlags;

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::page::{page_flags, PvEntry};
use crate::platform::Platform;

use super::table;
use super::tlb::Flush;
use super::{Pmap, PmapError, PmapState, PmapStats, PmapSystem};

/// What a failed demotion leaves behind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OnFail {
    /// Destroy the superpage (user mappings: the fault handler recreates them).
    Destroy,
    /// Leave the superpage as it was (operations that must not lose the mapping, e.g. unwire).
    Keep,
}

impl<P: Platform> PmapSystem<P> {
    /// Whether stores at `level` of `pmap` must be copied into every pmap (i386 2-level kernel
    /// page-directory entries).
    pub(crate) fn propagates(&self, pmap: &Pmap, level: usize) -> bool {
        pmap.kernel && level == 0 && self.kern.sync == super::KptSync::Propagate
    }

    /// Store `val` at `slot` (an entry at `level` of `pmap`), copying it to every pmap where
    /// the format shares kernel root entries by propagation. Returns the old value.
    pub(crate) fn set_entry(&self, pmap: &Pmap, level: usize, slot: u64, val: u64) -> u64 {
        let old = self.tables().swap(slot, val);
        self.propagate_slot(pmap, level, slot, val);
        old
    }

    /// After `slot` (an entry at `level` of `pmap`) became `val`: copy it to every pmap where
    /// the format shares kernel root entries by propagation.
    pub(crate) fn propagate_slot(&self, pmap: &Pmap, level: usize, slot: u64, val: u64) {
        if self.propagates(pmap, level) {
            let idx = ((slot - pmap.root.as_u64()) / self.geom.entry_bytes) as usize;
            self.propagate_root_entry(idx, val);
        }
    }

    /// Complete `flush` now (break-before-make needs the invalidation before the new entry).
    pub(crate) fn complete_now(&self, pmap: &Pmap, flush: &mut Flush) {
        let f = core::mem::take(flush);
        self.complete(pmap, f);
    }

    /// Try to promote the table under the superpage-sized region containing `va` into a leaf
    /// at `level`. Returns whether it did.
    pub(crate) fn try_promote(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        level: usize,
        flush: &mut Flush,
    ) -> bool {
        let g = &self.geom;
        let t = self.tables();
        let child = level + 1;
        // Only tables of base pages are promoted (as FreeBSD): a 1 GiB promotion would have to
        // keep 512 saved tables.
        if child != g.last() || g.levels[level].leaf.is_none() {
            return false;
        }
        let span = g.levels[level].span;
        let base = va & !(span - 1);
        let Some(ptable) = self.find_table(pmap, base, level) else {
            return false;
        };
        let slot = g.slot(ptable, g.index(base, level));
        let raw = t.load(slot);
        if !g.is_table(raw, level) {
            return false;
        }
        let pt = g.table_pa(raw, level);
        let n = g.levels[child].entries;
        let fail = || {
            PmapStats::bump(&self.stats.promotion_failures);
            false
        };
        // The first entry decides the frame and the attributes.
        let first_slot = g.slot(pt, 0);
        let first = t.load(first_slot);
        if !g.is_leaf(first, child) || first & g.no_promote_bit != 0 {
            return fail();
        }
        let pa0 = g.leaf_pa(first, child);
        if !pa0.is_multiple_of(span) {
            return fail();
        }
        let wp = |e: u64| {
            if g.writable(e) && !g.dirty(e) {
                g.write_protect(e, child)
            } else {
                e
            }
        };
        // Write-protecting a clean writable entry takes away a right that a TLB may hold: the
        // region is invalidated whenever that happened, whether or not promotion succeeds.
        let mut protected = false;
        let first = {
            let old = t.update(first_slot, wp);
            protected |= wp(old) != old;
            wp(old)
        };
        let cmp = !(g.levels[child].leaf_addr | g.accessed_mask());
        let mut all_accessed = g.accessed(first);
        let mut ok = true;
        // Top down, as FreeBSD: a concurrent fill tends to proceed bottom up.
        for i in (1..n).rev() {
            let s = g.slot(pt, i);
            let e = t.load(s);
            if !g.is_leaf(e, child)
                || g.leaf_pa(e, child) != pa0 + i as u64 * PAGE_SIZE
                || e & g.no_promote_bit != 0
            {
                ok = false;
                break;
            }
            let old = t.update(s, wp);
            let e = wp(old);
            protected |= e != old;
            if e & cmp != first & cmp {
                ok = false;
                break;
            }
            all_accessed &= g.accessed(e);
        }
        if protected {
            flush.add(base, span);
        }
        if !ok {
            return fail();
        }
        let new = g.reencode_leaf(first, child, level, pa0, |mut f| {
            f.set(PteFlags::PROMOTED_SW, g.promoted_bit != 0);
            f.set(PteFlags::ACCESSED, all_accessed);
            f
        });
        if g.managed(first) {
            for i in 0..n as u64 {
                let e = PvEntry {
                    pmap: pmap.id,
                    va: base + i * PAGE_SIZE,
                    level: child as u8,
                };
                let found = self.pv_unlink(pa0 + i * PAGE_SIZE, e);
                debug_assert!(found, "PV-1: promotion found no PV entry {e:?}");
            }
            self.pv_link(
                pa0,
                PvEntry {
                    pmap: pmap.id,
                    va: base,
                    level: level as u8,
                },
            );
            self.pv_release(n as u64 - 1);
        }
        if g.fmt.tlb.break_before_make {
            self.set_entry(pmap, level, slot, 0);
            flush.add(base, span);
            flush.add_table(base, span);
            self.complete_now(pmap, flush);
            self.set_entry(pmap, level, slot, new);
        } else {
            self.set_entry(pmap, level, slot, new);
            // The small entries of the region must go from every TLB, not only the one at
            // `base`: a later change of the superpage is invalidated by one address.
            flush.add(base, span);
            flush.add_table(base, span);
        }
        let meta = self.pages.meta(PhysAddr::new(pt));
        meta.set_flags(page_flags::SAVED_PTP);
        st.saved.insert((level as u8, base), PhysAddr::new(pt));
        PmapStats::bump(&self.stats.promotions);
        true
    }

    /// Demote the superpage leaf at `level` mapping `base`.
    pub(crate) fn demote(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        base: u64,
        level: usize,
        on_fail: OnFail,
        flush: &mut Flush,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let t = self.tables();
        let child = level + 1;
        let span = g.levels[level].span;
        debug_assert_eq!(base % span, 0);
        let ptable = self
            .find_table(pmap, base, level)
            .expect("a superpage leaf has a table above it");
        let slot = g.slot(ptable, g.index(base, level));
        let old = t.load(slot);
        debug_assert!(g.is_leaf(old, level), "demote of a non-leaf");
        let n = g.levels[child].entries;
        let cspan = g.levels[child].span;
        let pa0 = g.leaf_pa(old, level);
        let managed = g.managed(old);

        let saved = st.saved.remove(&(level as u8, base));
        let fresh = saved.is_none();
        let pt = match saved {
            Some(p) => p,
            None => {
                let got = if !g.accessed(old) && on_fail == OnFail::Destroy && !pmap.kernel {
                    // Never accessed: cheaper to destroy than to build a table (FreeBSD).
                    Err(PmapError::ResourceShortage)
                } else {
                    self.alloc_ptp(pmap.kernel)
                };
                match got {
                    Ok(p) => p,
                    Err(e) => {
                        return self
                            .demote_failed(pmap, st, base, level, slot, ptable, on_fail, e, flush)
                    }
                }
            }
        };
        if managed {
            if let Err(e) = self.pv_reserve(n as u64 - 1) {
                if fresh {
                    self.free_ptp_now(pt);
                } else {
                    st.saved.insert((level as u8, base), pt);
                }
                return self.demote_failed(pmap, st, base, level, slot, ptable, on_fail, e, flush);
            }
        }
        let fill = |from: u64| {
            let tmpl = g.reencode_leaf(from, level, child, pa0, |f| f - PteFlags::PROMOTED_SW);
            table::with_scratch(n, |vals| {
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = tmpl + i as u64 * cspan;
                }
                t.store_run(pt.as_u64(), 0, vals);
            });
        };
        let meta = self.pages.meta(pt);
        meta.clear_flags(page_flags::SAVED_PTP);
        if !pmap.kernel {
            meta.set_flags(page_flags::PTP);
            meta.ref_count
                .store(n as u32, core::sync::atomic::Ordering::Relaxed);
        }
        let te = g
            .fmt
            .make_table(pt.as_u64(), level)
            .expect("a page-table page is encodable");
        let ad = g.accessed_mask() | self.dirty_bits();
        if g.fmt.tlb.break_before_make {
            let last = self.set_entry(pmap, level, slot, 0);
            flush.add_table(base, span);
            self.complete_now(pmap, flush);
            fill(last);
            self.set_entry(pmap, level, slot, te);
        } else {
            fill(old);
            let last = self.set_entry(pmap, level, slot, te);
            if (last ^ old) & ad != 0 {
                // The MMU set A or D on the superpage meanwhile: carry it into the new entries.
                fill(last);
            }
            flush.add_table(base, span);
        }
        if managed {
            let head = PvEntry {
                pmap: pmap.id,
                va: base,
                level: level as u8,
            };
            let found = self.pv_unlink(pa0, head);
            debug_assert!(found, "PV-1: demotion found no PV entry {head:?}");
            for i in 0..n as u64 {
                self.pv_link(
                    pa0 + i * cspan,
                    PvEntry {
                        pmap: pmap.id,
                        va: base + i * cspan,
                        level: child as u8,
                    },
                );
            }
        }
        PmapStats::bump(&self.stats.demotions);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn demote_failed(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        base: u64,
        level: usize,
        slot: u64,
        ptable: u64,
        on_fail: OnFail,
        err: PmapError,
        flush: &mut Flush,
    ) -> Result<(), PmapError> {
        PmapStats::bump(&self.stats.demotion_failures);
        if on_fail == OnFail::Destroy && !pmap.kernel {
            self.remove_superpage(pmap, st, base, level, slot, ptable, flush);
        }
        Err(err)
    }

    /// The bits that record a write (x86 D; arm64 DBM: the hardware write permission).
    pub(crate) fn dirty_bits(&self) -> u64 {
        match self.geom.fmt.leaf_attrs.dirty {
            vmsys_arch::DirtyModel::HardwareBit(d) => d.mask,
            vmsys_arch::DirtyModel::Dbm { .. } => self.geom.fmt.leaf_attrs.writable.mask,
        }
    }
}
