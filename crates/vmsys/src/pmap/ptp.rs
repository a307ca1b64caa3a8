//! Page-table pages: allocation, reference counts, release, `abort_ptp`.
//!
//! A user page-table page counts its valid entries in its page record, plus one temporary
//! hold taken by [`PmapSystem::table_for`] while an insertion is in progress. At zero it is
//! detached from its parent (whose count drops in turn) and freed only after the invalidation
//! that removes it from every paging-structure cache (it goes on the [`Flush`]). The root is
//! not counted. Kernel page-table pages are allocated by `growkernel` (and bootstrap), are never
//! freed, and their counts never change.

use core::sync::atomic::Ordering;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::page::page_flags;

use super::table::Tables;
use super::tlb::Flush;
use super::{Pmap, PmapError, PmapStats, PmapSystem};
use crate::platform::Platform;

/// What [`PmapSystem::table_for`] found on the way down.
pub(crate) enum Walk {
    /// The table at the requested level (held, for a user pmap).
    Table(u64),
    /// A leaf (superpage) at `level` covers the address.
    Leaf { level: usize },
}

impl<P: Platform> PmapSystem<P> {
    pub(crate) fn tables(&self) -> Tables<'_, P> {
        Tables {
            plat: &self.plat,
            geom: &self.geom,
        }
    }

    /// A fresh, zeroed page-table page.
    pub(crate) fn alloc_ptp(&self, kernel: bool) -> Result<PhysAddr, PmapError> {
        let pa = self.frames.alloc().ok_or(PmapError::ResourceShortage)?;
        self.tables().zero_table(pa.as_u64());
        let meta = self.pages.meta(pa);
        meta.ref_count.store(0, Ordering::Relaxed);
        meta.set_flags(if kernel {
            page_flags::KERNEL_PTP
        } else {
            page_flags::PTP
        });
        PmapStats::bump(&self.stats.ptps_allocated);
        Ok(pa)
    }

    /// Walk `pmap` to the table at `level` that maps `va`, allocating missing user tables (with
    /// `alloc`). For a user pmap the returned table is held (+1) and the caller must either
    /// turn the hold into an entry or release it ([`PmapSystem::abort_ptp`]). A superpage on
    /// the way is reported, not demoted.
    pub(crate) fn table_for(
        &self,
        pmap: &Pmap,
        va: u64,
        level: usize,
        alloc: bool,
        flush: &mut Flush,
    ) -> Result<Walk, PmapError> {
        let g = &self.geom;
        let t = self.tables();
        let mut table = pmap.root.as_u64();
        for lvl in 0..level {
            let slot = g.slot(table, g.index(va, lvl));
            let raw = t.load(slot);
            if g.is_table(raw, lvl) {
                table = g.table_pa(raw, lvl);
                continue;
            }
            if g.is_leaf(raw, lvl) {
                return Ok(Walk::Leaf { level: lvl });
            }
            if pmap.kernel {
                return Err(PmapError::NoPageTable(VirtAddr::new(va)));
            }
            if !alloc {
                return Err(PmapError::ResourceShortage);
            }
            let new = match self.alloc_ptp(false) {
                Ok(new) => new,
                Err(e) => {
                    // Tables allocated above on this walk may now be empty: release them.
                    if lvl > 0 {
                        self.ptp_ref(table, 1);
                        self.ptp_unref(pmap, va, lvl, table, 1, flush);
                    }
                    return Err(e);
                }
            };
            let entry = g
                .fmt
                .make_table(new.as_u64(), lvl)
                .expect("a page-table page is encodable");
            t.store(slot, entry);
            if lvl > 0 {
                self.ptp_ref(table, 1);
            }
            table = new.as_u64();
        }
        if !pmap.kernel && level > 0 {
            self.ptp_ref(table, 1);
        }
        Ok(Walk::Table(table))
    }

    /// The table at `level` for `va` if it exists (no allocation, no hold).
    pub(crate) fn find_table(&self, pmap: &Pmap, va: u64, level: usize) -> Option<u64> {
        let g = &self.geom;
        let t = self.tables();
        let mut table = pmap.root.as_u64();
        for lvl in 0..level {
            let raw = t.load(g.slot(table, g.index(va, lvl)));
            if !g.is_table(raw, lvl) {
                return None;
            }
            table = g.table_pa(raw, lvl);
        }
        Some(table)
    }

    #[inline]
    pub(crate) fn ptp_ref(&self, table: u64, n: u32) {
        self.pages
            .meta(PhysAddr::new(table))
            .ref_count
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Drop `n` references (entries or holds) of the user table at `level` that maps `va`;
    /// at zero the table is detached from its parent, queued on `flush` for freeing, and the
    /// parent released in turn. The root and kernel tables are never released.
    pub(crate) fn ptp_unref(
        &self,
        pmap: &Pmap,
        va: u64,
        level: usize,
        table: u64,
        n: u32,
        flush: &mut Flush,
    ) {
        if pmap.kernel || level == 0 || n == 0 {
            return;
        }
        let meta = self.pages.meta(PhysAddr::new(table));
        let before = meta.ref_count.fetch_sub(n, Ordering::Relaxed);
        debug_assert!(
            before >= n,
            "PT-2: page-table page {table:#x} count underflow ({before} - {n})"
        );
        // Tables allocated with the pmap (PAE's page directories, whose PDPTEs the CPU latches)
        // stay until the pmap is destroyed.
        if before != n || level <= self.kern.fixed_depth {
            return;
        }
        // Detach from the parent: the parent's entry for this table is at level - 1.
        let g = &self.geom;
        let parent = self
            .find_table(pmap, va, level - 1)
            .expect("a counted table has a parent");
        let slot = g.slot(parent, g.index(va, level - 1));
        self.tables().store(slot, 0);
        // Any address the detached table translated will do (x86 INVLPG drops the tag's whole
        // walk cache; arm64 TLBI by VA drops the walk entries on that VA's path), and `va`
        // itself keeps the flush's bounding range tight: the table's aligned base could lie
        // gigabytes below the leaves being removed and turn a few pages into a huge range.
        flush.add_table(va & !(PAGE_SIZE - 1), PAGE_SIZE);
        flush.free_after(PhysAddr::new(table));
        self.ptp_unref(pmap, va, level - 1, parent, 1, flush);
    }

    /// Release the hold that [`PmapSystem::table_for`] took on the table at `level` for `va`,
    /// after an insertion failed (FreeBSD `pmap_abort_ptp`): a page-table page allocated for it
    /// and left empty is detached and freed, after its invalidation.
    pub(crate) fn abort_ptp(
        &self,
        pmap: &Pmap,
        va: u64,
        level: usize,
        table: u64,
        flush: &mut Flush,
    ) {
        self.ptp_unref(pmap, va, level, table, 1, flush);
    }
}
