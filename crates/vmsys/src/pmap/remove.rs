//! Removing and restricting mappings: `remove`, `remove_all`, `protect`, `unwire`.
//!
//! Ranges `[sva, eva)` are checked as every range of the pmap is (PT-8): `eva < sva` is
//! `AddrError::Overflow`, both ends page-aligned, inside the pmap's half (the kernel's dynamic
//! range for the kernel pmap); `sva == eva` is an empty range, a no-op after those checks.
//!
//! Ranges are walked with a cursor that visits each table once: a run of last-level entries is
//! read and written with one batched platform call, and a superpage is removed whole when the
//! range covers it or demoted first when it does not.

use vmsys_arch::Prot;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::page::{page_flags, PvEntry};
use crate::platform::Platform;

use super::superpage::OnFail;
use super::table;
use super::tlb::Flush;
use super::{Pmap, PmapError, PmapState, PmapSystem};

/// What the range cursor found at an address.
pub(crate) enum Found {
    /// Nothing mapped up to `next` (`None`: nothing up to the end of the address space).
    Hole { next: Option<u64> },
    /// A run of last-level entries: the table, and the first index.
    Run { table: u64, idx: usize },
    /// A superpage leaf.
    Super {
        level: usize,
        slot: u64,
        ptable: u64,
        raw: u64,
    },
}

impl<P: Platform> PmapSystem<P> {
    /// Where the range cursor stands at `va`.
    pub(crate) fn cursor_at(&self, pmap: &Pmap, va: u64) -> Found {
        let g = &self.geom;
        let t = self.tables();
        let mut table = pmap.root.as_u64();
        for lvl in 0..g.nlevels {
            let slot = g.slot(table, g.index(va, lvl));
            let raw = t.load(slot);
            if lvl == g.last() {
                return Found::Run {
                    table,
                    idx: g.index(va, lvl),
                };
            }
            if g.is_table(raw, lvl) {
                table = g.table_pa(raw, lvl);
                continue;
            }
            if g.is_leaf(raw, lvl) {
                return Found::Super {
                    level: lvl,
                    slot,
                    ptable: table,
                    raw,
                };
            }
            let span = g.levels[lvl].span;
            let next = (va & !(span - 1)).wrapping_add(span);
            return Found::Hole {
                next: (next > va).then_some(next),
            };
        }
        unreachable!("the last level returns")
    }

    /// The entry that maps `va` at leaf level, if a table reaches it: its slot, its value
    /// (possibly 0: nothing mapped) and its level.
    pub(crate) fn leaf_at(&self, pmap: &Pmap, va: u64) -> Option<(u64, u64, usize)> {
        let g = &self.geom;
        let (slot, level) = match self.cursor_at(pmap, va) {
            Found::Run { table, idx } => (g.slot(table, idx), g.last()),
            Found::Super { level, slot, .. } => (slot, level),
            Found::Hole { .. } => return None,
        };
        Some((slot, self.tables().load(slot), level))
    }

    /// Record what the frame's record must remember when a managed leaf goes away or loses
    /// write permission (FreeBSD's `vm_page_dirty` / `PGA_REFERENCED`).
    pub(crate) fn harvest(&self, raw: u64, pa: u64, size: u64) {
        let g = &self.geom;
        if !g.managed(raw) {
            return;
        }
        let dirty = g.dirty(raw);
        let referenced = g.accessed(raw);
        if !dirty && !referenced {
            return;
        }
        let mut f = 0;
        if dirty {
            f |= page_flags::MODIFIED;
        }
        if referenced {
            f |= page_flags::REFERENCED;
        }
        let mut off = 0;
        while off < size {
            if let Some(m) = self.pages.get(PhysAddr::new(pa + off)) {
                m.set_flags(f);
            }
            off += PAGE_SIZE;
        }
    }

    /// Remove `[sva, eva)` from `pmap` (lock held).
    pub(crate) fn remove_locked(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        sva: u64,
        eva: u64,
        flush: &mut Flush,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let mut va = sva;
        while va < eva {
            match self.cursor_at(pmap, va) {
                Found::Hole { next: Some(next) } => va = next,
                Found::Hole { next: None } => break,
                Found::Run { table, idx } => {
                    let n = g.run_len(idx, (eva - va) / PAGE_SIZE);
                    self.remove_run(pmap, st, table, va, idx, n, flush);
                    va += n as u64 * PAGE_SIZE;
                }
                Found::Super {
                    level,
                    slot,
                    ptable,
                    ..
                } => {
                    let span = g.levels[level].span;
                    let base = va & !(span - 1);
                    if va == base && eva - va >= span {
                        self.remove_superpage(pmap, st, base, level, slot, ptable, flush);
                        va = base.wrapping_add(span);
                        if va == 0 {
                            break;
                        }
                    } else {
                        // Partial: demote, then the loop finds the smaller entries (or, if the
                        // user mapping was destroyed, a hole).
                        match self.demote(pmap, st, base, level, OnFail::Destroy, flush) {
                            Ok(()) | Err(PmapError::ResourceShortage) if !pmap.kernel => {}
                            Ok(()) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Clear `n` last-level entries from index `idx` of `table` (which maps `va` at `idx`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn remove_run(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        table: u64,
        va: u64,
        idx: usize,
        n: usize,
        flush: &mut Flush,
    ) {
        table::with_scratch(n, |old| {
            self.remove_run_in(pmap, st, table, va, idx, old, flush)
        })
    }

    /// `remove_run` with a scratch buffer of the run's length.
    #[allow(clippy::too_many_arguments)]
    fn remove_run_in(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        table: u64,
        va: u64,
        idx: usize,
        old: &mut [u64],
        flush: &mut Flush,
    ) {
        let g = &self.geom;
        let t = self.tables();
        let last = g.last();
        let n = old.len();
        t.load_run(table, idx, old);
        // One branch-free pass counts what goes (PT-1: a non-zero last-level entry is a leaf).
        let (mut valid, mut wired, mut any_managed) = (0u32, 0u64, false);
        for &e in old.iter() {
            valid += (e != 0) as u32;
            wired += g.wired(e) as u64;
            any_managed |= g.managed(e);
        }
        debug_assert!(
            old.iter().all(|&e| e == 0 || g.is_leaf(e, last)),
            "PT-1: a non-zero last-level entry that is not a leaf in table {table:#x}"
        );
        if valid == 0 {
            return;
        }
        st.resident -= valid as u64;
        st.wired -= wired;
        if any_managed {
            // Exchange, so that an A/D update by another CPU's MMU is not lost.
            old.iter_mut().for_each(|e| *e = 0);
            t.swap_run(table, idx, old);
            for (i, &e) in old.iter().enumerate() {
                if g.managed(e) {
                    let pa = g.leaf_pa(e, last);
                    self.harvest(e, pa, PAGE_SIZE);
                    self.pv_remove(
                        pa,
                        PvEntry {
                            pmap: pmap.id,
                            va: va + i as u64 * PAGE_SIZE,
                            level: last as u8,
                        },
                    );
                }
            }
        } else {
            t.store_run(table, idx, &table::ZEROS[..n]);
        }
        flush.add(va, n as u64 * PAGE_SIZE);
        self.ptp_unref(pmap, va, last, table, valid, flush);
    }

    /// Remove the superpage leaf at `slot` (level `level`, in table `ptable`) mapping `base`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn remove_superpage(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        base: u64,
        level: usize,
        slot: u64,
        ptable: u64,
        flush: &mut Flush,
    ) {
        let g = &self.geom;
        let span = g.levels[level].span;
        let old = self.set_entry(pmap, level, slot, 0);
        let pa = g.leaf_pa(old, level);
        st.resident -= span / PAGE_SIZE;
        if g.wired(old) {
            st.wired -= span / PAGE_SIZE;
        }
        if g.managed(old) {
            self.harvest(old, pa, span);
            self.pv_remove(
                pa,
                PvEntry {
                    pmap: pmap.id,
                    va: base,
                    level: level as u8,
                },
            );
        }
        // One invalidation by address removes a superpage's TLB entry.
        flush.add(base, PAGE_SIZE);
        let saved = st.saved.remove(&(level as u8, base));
        if pmap.kernel {
            // Kernel page-table pages are never freed: put the saved one back, zero-filled.
            if let Some(pt) = saved {
                self.tables().zero_table(pt.as_u64());
                let meta = self.pages.meta(pt);
                meta.clear_flags(page_flags::SAVED_PTP);
                if g.fmt.tlb.break_before_make {
                    self.complete_now(pmap, flush);
                }
                let te = g
                    .fmt
                    .make_table(pt.as_u64(), level)
                    .expect("a page-table page is encodable");
                self.set_entry(pmap, level, slot, te);
                flush.add_table(base, span);
            }
            return;
        }
        if let Some(pt) = saved {
            flush.free_after(pt);
        }
        self.ptp_unref(pmap, base, level, ptable, 1, flush);
    }

    /// Remove every mapping of `[sva, eva)` from `pmap` (FreeBSD `pmap_remove`).
    pub fn remove(&self, pmap: &Pmap, sva: VirtAddr, eva: VirtAddr) -> Result<(), PmapError> {
        self.usable(pmap)?;
        let len = Self::range_len(sva, eva)?;
        self.check_range(pmap, sva, len, PAGE_SIZE)?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.lock_live(pmap)?;
        let mut flush = Flush::new();
        self.plat.pt_update_begin(sva, eva);
        let r = self.remove_locked(pmap, &mut st, sva.as_u64(), eva.as_u64(), &mut flush);
        self.complete(pmap, flush);
        self.plat.pt_update_end();
        r
    }

    /// Remove every mapping of the managed frame `pa`, in every pmap (FreeBSD
    /// `pmap_remove_all`). Superpage mappings that include the frame are demoted first.
    pub fn remove_all(&self, pa: PhysAddr) {
        let pa = pa.align_down(PAGE_SIZE).as_u64();
        while let Some((e, head)) = self.first_mapping(pa) {
            let Some(pmap) = self.lookup_pmap(e.pmap) else {
                debug_assert!(false, "PV-1: PV entry of a dead pmap {e:?}");
                self.pv_remove(head, e);
                continue;
            };
            let mut st = table::lock(&pmap.state, &*self.plat);
            if pmap.is_destroyed() {
                // A destroyed pmap was empty: an entry naming it is stale, not a mapping.
                drop(st);
                self.pv_remove(head, e);
                continue;
            }
            let mut flush = Flush::new();
            let size = self.geom.levels[e.level as usize].span;
            let va = if e.level as usize == self.geom.last() {
                e.va
            } else {
                e.va + (pa - head)
            };
            self.plat
                .pt_update_begin(VirtAddr::new(e.va), VirtAddr::new(e.va + size));
            // Re-check under the pmap lock: the mapping may have changed meanwhile.
            if self.pv_contains(head, e) {
                if e.level as usize == self.geom.last() {
                    let _ = self.remove_locked(&pmap, &mut st, va, va + PAGE_SIZE, &mut flush);
                } else {
                    let _ = self.demote(
                        &pmap,
                        &mut st,
                        e.va,
                        e.level as usize,
                        OnFail::Destroy,
                        &mut flush,
                    );
                }
            }
            self.complete(&pmap, flush);
            self.plat.pt_update_end();
        }
    }

    /// A mapping of frame `pa`: a 4 KiB PV entry on its own list, or a superpage PV entry on
    /// the list of the superpage's first frame. Returns the entry and the frame whose list
    /// holds it.
    pub(crate) fn first_mapping(&self, pa: u64) -> Option<(PvEntry, u64)> {
        self.pv_mappings(pa, |e, head| core::ops::ControlFlow::Break((e, head)))
    }

    /// Take rights away from `[sva, eva)`: write and/or execute, whatever `prot` lacks
    /// (FreeBSD `pmap_protect`; it never adds rights).
    pub fn protect(
        &self,
        pmap: &Pmap,
        sva: VirtAddr,
        eva: VirtAddr,
        prot: Prot,
    ) -> Result<(), PmapError> {
        self.usable(pmap)?;
        let len = Self::range_len(sva, eva)?;
        self.check_range(pmap, sva, len, PAGE_SIZE)?;
        if len == 0 {
            return Ok(());
        }
        let g = &self.geom;
        let remove = (Prot::WRITE | Prot::EXEC) - prot;
        if remove.is_empty() {
            return Ok(());
        }
        let mut st = self.lock_live(pmap)?;
        let mut flush = Flush::new();
        self.plat.pt_update_begin(sva, eva);
        let (sva, eva) = (sva.as_u64(), eva.as_u64());
        let mut va = sva;
        let restrict = |e: u64, lvl: usize| -> u64 {
            let vmsys_arch::Entry::Leaf { prot: p, .. } = g.fmt.decode(e, lvl) else {
                return e;
            };
            let np = p - remove;
            if np == p {
                return e;
            }
            g.fmt.with_prot(e, lvl, np).unwrap_or(e)
        };
        let mut result = Ok(());
        while va < eva {
            match self.cursor_at(pmap, va) {
                Found::Hole { next: Some(next) } => va = next,
                Found::Hole { next: None } => break,
                Found::Run { table, idx } => {
                    let last = g.last();
                    let n = g.run_len(idx, (eva - va) / PAGE_SIZE);
                    let t = self.tables();
                    let mut changed = false;
                    for i in 0..n {
                        let s = g.slot(table, idx + i);
                        if t.load(s) == 0 {
                            continue;
                        }
                        let old = t.update(s, |e| restrict(e, last));
                        let new = restrict(old, last);
                        if new != old {
                            changed = true;
                            if g.writable(old) && !g.writable(new) {
                                self.harvest(old, g.leaf_pa(old, last), PAGE_SIZE);
                            }
                        }
                    }
                    if changed {
                        flush.add(va, n as u64 * PAGE_SIZE);
                    }
                    va += n as u64 * PAGE_SIZE;
                }
                Found::Super { level, slot, .. } => {
                    let span = g.levels[level].span;
                    let base = va & !(span - 1);
                    if va == base && eva - va >= span {
                        let t = self.tables();
                        let old = t.update(slot, |e| restrict(e, level));
                        let new = restrict(old, level);
                        if new != old {
                            self.propagate_slot(pmap, level, slot, new);
                            if g.writable(old) && !g.writable(new) {
                                self.harvest(old, g.leaf_pa(old, level), span);
                            }
                            flush.add(base, PAGE_SIZE);
                        }
                        va = base.wrapping_add(span);
                        if va == 0 {
                            break;
                        }
                    } else if let Err(e) =
                        self.demote(pmap, &mut st, base, level, OnFail::Destroy, &mut flush)
                    {
                        if pmap.kernel {
                            result = Err(e);
                            break;
                        }
                    }
                }
            }
        }
        self.complete(pmap, flush);
        self.plat.pt_update_end();
        result
    }

    /// Clear the wired attribute of every mapping in `[sva, eva)` (FreeBSD `pmap_unwire`).
    /// Every valid mapping in the range must be wired: otherwise `NotWired`, and nothing
    /// changes. A superpage that the range covers only in part is demoted; if that cannot
    /// allocate, `ResourceShortage`, and the superpage stays whole and wired.
    pub fn unwire(&self, pmap: &Pmap, sva: VirtAddr, eva: VirtAddr) -> Result<(), PmapError> {
        self.usable(pmap)?;
        let len = Self::range_len(sva, eva)?;
        self.check_range(pmap, sva, len, PAGE_SIZE)?;
        if len == 0 {
            return Ok(());
        }
        let g = &self.geom;
        let mut st = self.lock_live(pmap)?;
        let (s, e) = (sva.as_u64(), eva.as_u64());
        // Pass 1: check, and demote the superpages cut by the range's ends.
        let mut flush = Flush::new();
        let mut va = s;
        while va < e {
            match self.cursor_at(pmap, va) {
                Found::Hole { next: Some(next) } => va = next,
                Found::Hole { next: None } => break,
                Found::Run { table, idx } => {
                    let n = g.run_len(idx, (e - va) / PAGE_SIZE);
                    let t = self.tables();
                    for i in 0..n {
                        let raw = t.load(g.slot(table, idx + i));
                        if raw != 0 && !g.wired(raw) {
                            self.complete(pmap, flush);
                            return Err(PmapError::NotWired(VirtAddr::new(
                                va + i as u64 * PAGE_SIZE,
                            )));
                        }
                    }
                    va += n as u64 * PAGE_SIZE;
                }
                Found::Super { level, raw, .. } => {
                    if !g.wired(raw) {
                        self.complete(pmap, flush);
                        return Err(PmapError::NotWired(VirtAddr::new(va)));
                    }
                    let span = g.levels[level].span;
                    let base = va & !(span - 1);
                    if va != base || e - va < span {
                        // Only the range's ends can cut a superpage: demote it now, before
                        // anything is unwired, so that a failure changes nothing.
                        if let Err(err) =
                            self.demote(pmap, &mut st, base, level, OnFail::Keep, &mut flush)
                        {
                            self.complete(pmap, flush);
                            return Err(err);
                        }
                        continue;
                    }
                    va = base.wrapping_add(span);
                    if va == 0 {
                        break;
                    }
                }
            }
        }
        // Pass 2: unwire.
        let mut va = s;
        let unwired = |raw: u64| raw & !g.wired_bit;
        while va < e {
            match self.cursor_at(pmap, va) {
                Found::Hole { next: Some(next) } => va = next,
                Found::Hole { next: None } => break,
                Found::Run { table, idx } => {
                    let n = g.run_len(idx, (e - va) / PAGE_SIZE);
                    let t = self.tables();
                    for i in 0..n {
                        let sl = g.slot(table, idx + i);
                        if t.load(sl) != 0 {
                            t.update(sl, unwired);
                            st.wired -= 1;
                        }
                    }
                    va += n as u64 * PAGE_SIZE;
                }
                Found::Super { level, slot, .. } => {
                    let span = g.levels[level].span;
                    let base = va & !(span - 1);
                    if va == base && e - va >= span {
                        let new = unwired(self.tables().update(slot, unwired));
                        self.propagate_slot(pmap, level, slot, new);
                        st.wired -= span / PAGE_SIZE;
                        va = base.wrapping_add(span);
                        if va == 0 {
                            break;
                        }
                    } else {
                        unreachable!("pass 1 demoted the superpages the range cuts");
                    }
                }
            }
        }
        // Wiring is software state: no TLB entry caches it, so only demotions need a flush.
        self.complete(pmap, flush);
        Ok(())
    }
}
