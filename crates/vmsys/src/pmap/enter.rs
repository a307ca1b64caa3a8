//! Creating mappings: `enter` (4 KiB and superpages), `enter_quick`, and the range map.

use vmsys_arch::{CacheMode, Prot, PteFlags};

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::page::PvEntry;
use crate::platform::Platform;

use super::ptp::Walk;
use super::superpage::OnFail;
use super::table;
use super::tlb::Flush;
use super::{EnterFlags, Pmap, PmapError, PmapState, PmapSystem};

impl<P: Platform> PmapSystem<P> {
    /// The leaf entry `pmap` gets for `pa` at `level`.
    pub(crate) fn make_entry(
        &self,
        pmap: &Pmap,
        level: usize,
        pa: u64,
        prot: Prot,
        flags: EnterFlags,
        cache: CacheMode,
    ) -> Result<u64, PmapError> {
        let prot = self.leaf_prot(pmap, prot);
        let mut f = PteFlags::ACCESSED;
        f.set(PteFlags::GLOBAL, pmap.kernel);
        f.set(
            PteFlags::DIRTY,
            flags.contains(EnterFlags::DIRTY) && prot.contains(Prot::WRITE),
        );
        f.set(PteFlags::WIRED_SW, flags.contains(EnterFlags::WIRED));
        f.set(PteFlags::MANAGED_SW, flags.contains(EnterFlags::MANAGED));
        f.set(
            PteFlags::NO_PROMOTE_SW,
            flags.contains(EnterFlags::NO_PROMOTE) && self.geom.no_promote_bit != 0,
        );
        self.geom
            .fmt
            .make_leaf(pa, level, prot, f, cache)
            .map_err(|_| PmapError::Unsupported)
    }

    /// Map `pa` at `va` in `pmap` (FreeBSD `pmap_enter`). `psind` selects the page size (0:
    /// 4 KiB; 1, 2: the format's superpages, see [`PmapSystem::page_sizes`]).
    pub fn enter(
        &self,
        pmap: &Pmap,
        va: VirtAddr,
        pa: PhysAddr,
        prot: Prot,
        flags: EnterFlags,
        psind: usize,
    ) -> Result<(), PmapError> {
        self.usable(pmap)?;
        if psind >= self.geom.npsind {
            return Err(PmapError::BadPageSize(psind));
        }
        let level = self.geom.psind_level[psind];
        let size = self.geom.levels[level].span;
        self.check_range(pmap, va, size, size)?;
        self.check_pa(pa, size, flags.contains(EnterFlags::MANAGED))?;
        let new = self.make_entry(pmap, level, pa.as_u64(), prot, flags, CacheMode::WriteBack)?;
        let mut st = self.lock_live(pmap)?;
        let mut flush = Flush::new();
        self.plat
            .pt_update_begin(va, VirtAddr::new(va.as_u64() + size));
        let r = if psind == 0 {
            self.enter_4k(pmap, &mut st, va.as_u64(), new, flags, &mut flush)
        } else {
            self.enter_super(pmap, &mut st, va.as_u64(), level, new, flags, &mut flush)
        };
        self.complete(pmap, flush);
        self.plat.pt_update_end();
        r
    }

    /// Map `pa` read-only/executable at `va` if nothing is mapped there and no memory is needed
    /// beyond what is at hand (FreeBSD `pmap_enter_quick`, used to pre-fault neighbours).
    /// Returns whether it mapped.
    pub fn enter_quick(
        &self,
        pmap: &Pmap,
        va: VirtAddr,
        pa: PhysAddr,
        prot: Prot,
        managed: bool,
    ) -> Result<bool, PmapError> {
        let mut flags = EnterFlags::NOREPLACE | EnterFlags::NOSLEEP;
        flags.set(EnterFlags::MANAGED, managed);
        match self.enter(pmap, va, pa, prot - Prot::WRITE, flags, 0) {
            Ok(()) => Ok(true),
            Err(
                PmapError::ExistingMapping(_)
                | PmapError::ExistingSuperpage(_)
                | PmapError::ResourceShortage,
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The last-level table for `va`, demoting a superpage in the way. User tables are held.
    fn table_for_4k(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        flags: EnterFlags,
        flush: &mut Flush,
    ) -> Result<u64, PmapError> {
        let last = self.geom.last();
        loop {
            match self.table_for(pmap, va, last, true, flush)? {
                Walk::Table(t) => return Ok(t),
                Walk::Leaf { level, .. } => {
                    if flags.contains(EnterFlags::NOREPLACE) {
                        return Err(PmapError::ExistingSuperpage(VirtAddr::new(va)));
                    }
                    let base = va & !(self.geom.levels[level].span - 1);
                    match self.demote(pmap, st, base, level, OnFail::Destroy, flush) {
                        Ok(()) => {}
                        Err(e) if pmap.kernel => return Err(e),
                        // The user superpage was destroyed: walk again.
                        Err(_) => {}
                    }
                }
            }
        }
    }

    pub(crate) fn enter_4k(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        new: u64,
        flags: EnterFlags,
        flush: &mut Flush,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let t = self.tables();
        let last = g.last();
        let table = self.table_for_4k(pmap, st, va, flags, flush)?;
        let slot = g.slot(table, g.index(va, last));
        let old = t.load(slot);
        let pa = g.leaf_pa(new, last);
        if old != 0 {
            if flags.contains(EnterFlags::NOREPLACE) {
                self.abort_ptp(pmap, va, last, table, flush);
                return Err(PmapError::ExistingMapping(VirtAddr::new(va)));
            }
            if g.leaf_pa(old, last) == pa && g.managed(old) == g.managed(new) {
                // Same frame: new attributes, keeping what the hardware recorded.
                let mut new = new;
                if g.dirty(old) && g.writable(new) {
                    new = g.fmt.with_flags(new, last, PteFlags::DIRTY).unwrap_or(new);
                }
                let prev = t.swap(slot, new);
                if g.writable(prev) && !g.writable(new) {
                    self.harvest(prev, pa, PAGE_SIZE);
                }
                match (g.wired(prev), g.wired(new)) {
                    (false, true) => st.wired += 1,
                    (true, false) => st.wired -= 1,
                    _ => {}
                }
                if prev & !g.accessed_mask() != new & !g.accessed_mask() {
                    flush.add(va, PAGE_SIZE);
                }
                // The entry existed: the hold is not a new entry.
                self.ptp_unref(pmap, va, last, table, 1, flush);
                if !flags.contains(EnterFlags::NO_PROMOTE) {
                    self.maybe_promote(pmap, st, va, table, flush);
                }
                return Ok(());
            }
            // Another frame: remove the old mapping (our hold keeps the table), and on arm64
            // complete its invalidation before the new entry (break-before-make).
            self.remove_run(pmap, st, table, va, g.index(va, last), 1, flush);
            if g.fmt.tlb.break_before_make {
                self.complete_now(pmap, flush);
            }
        }
        if g.managed(new) {
            let e = PvEntry {
                pmap: pmap.id,
                va,
                level: last as u8,
            };
            if let Err(err) = self.pv_insert(pa, e) {
                self.abort_ptp(pmap, va, last, table, flush);
                return Err(err);
            }
        }
        t.store(slot, new);
        st.resident += 1;
        if g.wired(new) {
            st.wired += 1;
        }
        if !flags.contains(EnterFlags::NO_PROMOTE) {
            self.maybe_promote(pmap, st, va, table, flush);
        }
        Ok(())
    }

    /// Promotion gate after an entry was added to the last-level `table`: a user table counts
    /// its entries, so it must be full; a kernel table is checked at its ends first (its count
    /// is fixed), and the promotion itself checks every entry.
    pub(crate) fn maybe_promote(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        table: u64,
        flush: &mut Flush,
    ) {
        let g = &self.geom;
        if !self.cfg.promote || g.npsind < 2 {
            return;
        }
        let last = g.last();
        let level = last - 1;
        if g.levels[level].leaf.is_none() {
            return;
        }
        let n = g.levels[last].entries;
        let full = if pmap.kernel {
            let t = self.tables();
            let (a, b) = (t.load(g.slot(table, 0)), t.load(g.slot(table, n - 1)));
            g.is_leaf(a, last)
                && g.is_leaf(b, last)
                && g.leaf_pa(b, last) == g.leaf_pa(a, last) + (n as u64 - 1) * PAGE_SIZE
        } else {
            self.pages
                .meta(PhysAddr::new(table))
                .ref_count
                .load(core::sync::atomic::Ordering::Relaxed)
                == n as u32
        };
        if full {
            self.try_promote(pmap, st, va, level, flush);
        }
    }

    /// Enter a superpage leaf at `level` (FreeBSD `pmap_enter_pde` / `pmap_enter_l2`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enter_super(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        level: usize,
        new: u64,
        flags: EnterFlags,
        flush: &mut Flush,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let t = self.tables();
        let span = g.levels[level].span;
        let noreplace = flags.contains(EnterFlags::NOREPLACE);
        let table = loop {
            match self.table_for(pmap, va, level, true, flush)? {
                Walk::Table(t) => break t,
                Walk::Leaf { level: l, .. } => {
                    if noreplace {
                        return Err(PmapError::ExistingSuperpage(VirtAddr::new(va)));
                    }
                    let base = va & !(g.levels[l].span - 1);
                    match self.demote(pmap, st, base, l, OnFail::Destroy, flush) {
                        Ok(()) => {}
                        Err(e) if pmap.kernel => return Err(e),
                        Err(_) => {}
                    }
                }
            }
        };
        let slot = g.slot(table, g.index(va, level));
        let old = t.load(slot);
        // The page-table page that a later demotion of a kernel superpage will use.
        let mut saved: Option<(PhysAddr, bool)> = None;
        let mut detach = false;
        if g.is_leaf(old, level) {
            if noreplace {
                self.abort_ptp(pmap, va, level, table, flush);
                return Err(PmapError::ExistingSuperpage(VirtAddr::new(va)));
            }
            let keep = if pmap.kernel {
                st.saved.remove(&(level as u8, va))
            } else {
                None
            };
            if let Some(k) = keep {
                // Replacing a kernel superpage: its saved table serves the new one.
                let old = self.set_entry(pmap, level, slot, 0);
                st.resident -= span / PAGE_SIZE;
                if g.wired(old) {
                    st.wired -= span / PAGE_SIZE;
                }
                flush.add(va, PAGE_SIZE);
                saved = Some((k, false));
            } else {
                self.remove_superpage(pmap, st, va, level, slot, table, flush);
            }
        } else if g.is_table(old, level) {
            let child = g.table_pa(old, level);
            if pmap.kernel {
                if !t.table_is_zero(child, level + 1) {
                    if noreplace || level + 1 != g.last() {
                        return Err(PmapError::ExistingMapping(VirtAddr::new(va)));
                    }
                    self.remove_locked(pmap, st, va, va + span, flush)?;
                }
                // FreeBSD D22763: an all-zero kernel table may be replaced under no-replace;
                // it is kept for the superpage's demotion.
                saved = Some((PhysAddr::new(child), false));
                detach = true;
            } else {
                if noreplace {
                    self.abort_ptp(pmap, va, level, table, flush);
                    return Err(PmapError::ExistingMapping(VirtAddr::new(va)));
                }
                // Removing every entry frees the table and clears the slot; the hold on
                // `table` keeps it.
                self.remove_locked(pmap, st, va, va + span, flush)?;
            }
        } else if pmap.kernel && level < g.last() {
            saved = Some((self.alloc_ptp(true)?, true));
        }
        if g.managed(new) {
            let e = PvEntry {
                pmap: pmap.id,
                va,
                level: level as u8,
            };
            if let Err(err) = self.pv_insert(g.leaf_pa(new, level), e) {
                match saved {
                    Some((p, true)) => self.free_ptp_now(p),
                    Some((p, false)) if !detach => {
                        st.saved.insert((level as u8, va), p);
                        self.set_entry(pmap, level, slot, 0);
                    }
                    _ => {}
                }
                if !pmap.kernel {
                    self.abort_ptp(pmap, va, level, table, flush);
                }
                return Err(err);
            }
        }
        if detach {
            if g.fmt.tlb.break_before_make {
                self.set_entry(pmap, level, slot, 0);
                flush.add_table(va, span);
                self.complete_now(pmap, flush);
                self.set_entry(pmap, level, slot, new);
            } else {
                self.set_entry(pmap, level, slot, new);
                flush.add_table(va, span);
            }
        } else {
            if g.fmt.tlb.break_before_make && !flush.is_empty() {
                self.complete_now(pmap, flush);
            }
            self.set_entry(pmap, level, slot, new);
        }
        if let Some((p, _)) = saved {
            self.pages
                .meta(p)
                .set_flags(crate::page::page_flags::SAVED_PTP);
            st.saved.insert((level as u8, va), p);
        }
        st.resident += span / PAGE_SIZE;
        if g.wired(new) {
            st.wired += span / PAGE_SIZE;
        }
        Ok(())
    }

    /// Map the physically contiguous `[pa, pa + len)` at `va` with 4 KiB pages, one batched
    /// store per table (the range cursor). The range must be unmapped (`ExistingMapping`
    /// otherwise). All or nothing: on failure nothing this call mapped is left mapped. `len` 0
    /// maps nothing once `va` and `pa` have been checked.
    pub fn enter_range(
        &self,
        pmap: &Pmap,
        va: VirtAddr,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
        flags: EnterFlags,
    ) -> Result<(), PmapError> {
        self.usable(pmap)?;
        self.check_range(pmap, va, len, PAGE_SIZE)?;
        self.check_frames(pa, len, PAGE_SIZE, flags.contains(EnterFlags::MANAGED))?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.lock_live(pmap)?;
        let mut flush = Flush::new();
        let end = VirtAddr::new(va.as_u64() + len);
        self.plat.pt_update_begin(va, end);
        let r = self.enter_run_locked(
            pmap,
            &mut st,
            va.as_u64(),
            len,
            |i| pa.as_u64() + i * PAGE_SIZE,
            prot,
            flags,
            &mut flush,
        );
        let r = match r {
            Ok(()) => Ok(()),
            Err((e, done)) => {
                if done > 0 {
                    let _ = self.remove_locked(
                        pmap,
                        &mut st,
                        va.as_u64(),
                        va.as_u64() + done,
                        &mut flush,
                    );
                }
                Err(e)
            }
        };
        self.complete(pmap, flush);
        self.plat.pt_update_end();
        r
    }

    /// The range cursor's map: entries for `len` bytes at `va` into unmapped space, the frame
    /// of page `i` being `frame(i)`; each table's run is written with one batched store. On
    /// failure, returns how many bytes from `va` it had mapped.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enter_run_locked(
        &self,
        pmap: &Pmap,
        st: &mut PmapState,
        va: u64,
        len: u64,
        frame: impl Fn(u64) -> u64,
        prot: Prot,
        flags: EnterFlags,
        flush: &mut Flush,
    ) -> Result<(), (PmapError, u64)> {
        let g = &self.geom;
        let t = self.tables();
        let last = g.last();
        let tmpl = self
            .make_entry(pmap, last, 0, prot, flags, CacheMode::WriteBack)
            .map_err(|e| (e, 0))?;
        let managed = flags.contains(EnterFlags::MANAGED);
        let wired = flags.contains(EnterFlags::WIRED);
        let npages = len / PAGE_SIZE;
        let mut i = 0u64;
        table::with_scratch(npages.min(1024) as usize, |buf| {
            while i < npages {
                let done = i * PAGE_SIZE;
                let cva = va + done;
                let idx = g.index(cva, last);
                let n = g.run_len(idx, npages - i);
                let table = self
                    .table_for_4k(pmap, st, cva, flags | EnterFlags::NOREPLACE, flush)
                    .map_err(|e| (e, done))?;
                let run = &mut buf[..n];
                t.load_run(table, idx, run);
                if let Some(k) = run.iter().position(|&e| e != 0) {
                    self.abort_ptp(pmap, cva, last, table, flush);
                    return Err((
                        PmapError::ExistingMapping(VirtAddr::new(cva + k as u64 * PAGE_SIZE)),
                        done,
                    ));
                }
                if managed {
                    if let Err(e) = self.pv_reserve(n as u64) {
                        self.abort_ptp(pmap, cva, last, table, flush);
                        return Err((e, done));
                    }
                    for k in 0..n as u64 {
                        self.pv_link(
                            frame(i + k),
                            PvEntry {
                                pmap: pmap.id,
                                va: cva + k * PAGE_SIZE,
                                level: last as u8,
                            },
                        );
                    }
                }
                for (k, v) in run.iter_mut().enumerate() {
                    *v = tmpl | frame(i + k as u64);
                }
                t.store_run(table, idx, run);
                if !pmap.kernel {
                    // The hold becomes one of the n entries.
                    self.ptp_ref(table, n as u32 - 1);
                }
                st.resident += n as u64;
                if wired {
                    st.wired += n as u64;
                }
                if !flags.contains(EnterFlags::NO_PROMOTE) {
                    self.maybe_promote(pmap, st, cva, table, flush);
                }
                i += n as u64;
            }
            Ok(())
        })
    }
}
