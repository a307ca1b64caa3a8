//! Queries and A/D maintenance: `extract`, `is_modified`, `clear_modify`, `ts_referenced`,
//! `remove_write`, `page_exists_quick`.
//!
//! `extract` and `mapping` answer only for addresses the MMU translates through the pmap
//! (PT-8, from the format's layout: never an alias made by masking each level's index), and
//! `None` for a destroyed pmap or one of another system (PT-7).
//!
//! The page-level ones go through the frame's PV entries: the list is walked one entry per hold
//! of its lock, and each mapping is re-checked under its pmap's lock (the pmap lock comes first
//! in the lock order, so it cannot be taken while a PV list lock is held).

use vmsys_arch::{Entry, Prot, PteFlags};

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::page::{page_flags, PvEntry};
use crate::platform::Platform;

use super::geom::Geometry;
use super::remove::Found;
use super::superpage::OnFail;
use super::table;
use super::tlb::Flush;
use super::{Pmap, PmapSystem};

/// One mapping, as `extract` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The frame that `va` translates to (not the page's base).
    pub pa: PhysAddr,
    /// The leaf's size.
    pub size: u64,
    pub prot: Prot,
    pub wired: bool,
    pub managed: bool,
    pub accessed: bool,
    pub dirty: bool,
}

impl<P: Platform> PmapSystem<P> {
    /// The physical address `va` translates to in `pmap` (FreeBSD `pmap_extract`). Lock-free:
    /// a walk of atomic loads, as the MMU does. `None` for an address the MMU cannot translate
    /// through `pmap` (PT-8: non-canonical, the other half where it has its own root), for a
    /// pmap of another system, and for a destroyed pmap (PT-7: the state is read before and
    /// after the walk, so a walk that overlapped a `destroy` is discarded).
    #[inline]
    pub fn extract(&self, pmap: &Pmap, va: VirtAddr) -> Option<PhysAddr> {
        if !self.translates(pmap, va.as_u64()) || pmap.is_destroyed() {
            return None;
        }
        let r = self.extract_walk(pmap, va);
        if pmap.is_destroyed() {
            return None;
        }
        r
    }

    #[inline(always)]
    fn extract_walk(&self, pmap: &Pmap, va: VirtAddr) -> Option<PhysAddr> {
        // The entry width and the depth decided once, so that the walk below is a fixed-length
        // loop with one kind of load (the compiler unrolls it).
        let g = &self.geom;
        let (va, root) = (va.as_u64(), pmap.root.as_u64());
        let plat = &*self.plat;
        if g.entry_bytes == 8 {
            let load = |a: u64| plat.pt_load64(PhysAddr::new(a));
            match g.nlevels {
                4 => walk(g, 4, root, va, 8, load),
                5 => walk(g, 5, root, va, 8, load),
                3 => walk(g, 3, root, va, 8, load),
                n => walk(g, n, root, va, 8, load),
            }
        } else {
            let load = |a: u64| plat.pt_load32(PhysAddr::new(a)) as u64;
            walk(g, g.nlevels, root, va, 4, load)
        }
    }

    /// The whole mapping at `va` (`None` where [`PmapSystem::extract`] answers `None`).
    pub fn mapping(&self, pmap: &Pmap, va: VirtAddr) -> Option<Mapping> {
        let g = &self.geom;
        let v = va.as_u64();
        if !self.translates(pmap, v) || pmap.is_destroyed() {
            return None;
        }
        let (_, raw, lvl) = self.leaf_at(pmap, v)?;
        if pmap.is_destroyed() {
            return None;
        }
        let Entry::Leaf {
            pa,
            size,
            prot,
            flags,
            ..
        } = g.fmt.decode(raw, lvl)
        else {
            return None;
        };
        Some(Mapping {
            pa: PhysAddr::new(pa | (v & (size - 1))),
            size,
            prot,
            wired: flags.contains(PteFlags::WIRED_SW),
            managed: flags.contains(PteFlags::MANAGED_SW),
            accessed: flags.contains(PteFlags::ACCESSED),
            dirty: g.dirty(raw),
        })
    }

    /// Apply `f` to the leaf of each mapping of `pa`, under its pmap's lock. `f` gets the
    /// pmap, its locked state, the leaf's slot and level and the VA of the 4 KiB page; it
    /// returns whether to continue.
    fn for_each_mapping(
        &self,
        pa: u64,
        mut f: impl FnMut(&Pmap, &mut super::PmapState, u64, usize, u64, &mut Flush) -> bool,
    ) {
        let pa = pa & !(PAGE_SIZE - 1);
        let g = &self.geom;
        // Each list is walked one entry per PV-lock hold (the pmap lock comes first in the lock
        // order); 4 KiB entries on the frame's own list, then superpages, larger last.
        'lists: for lvl in (0..=g.last()).rev() {
            if lvl != g.last() && g.levels[lvl].leaf.is_none() {
                continue;
            }
            let head = pa & !(g.levels[lvl].span - 1);
            let mut pos = super::pv::PvPos::default();
            while let Some(e) = self.pv_next(head, Some(lvl as u8), &mut pos) {
                let Some(pmap) = self.lookup_pmap(e.pmap) else {
                    continue;
                };
                let mut st = table::lock(&pmap.state, &*self.plat);
                if pmap.is_destroyed() || !self.pv_contains(head, e) {
                    continue;
                }
                let level = e.level as usize;
                let va = e.va + (pa - head);
                let mut flush = Flush::new();
                let slot = match self.cursor_at(&pmap, va) {
                    Found::Run { table, idx } if level == self.geom.last() => {
                        self.geom.slot(table, idx)
                    }
                    Found::Super { level: l, slot, .. } if l == level => slot,
                    _ => {
                        debug_assert!(false, "PV-1: PV entry {e:?} without its mapping");
                        continue;
                    }
                };
                let go = f(&pmap, &mut st, slot, level, va, &mut flush);
                self.complete(&pmap, flush);
                if !go {
                    break 'lists;
                }
            }
        }
    }

    /// Whether any mapping of the managed frame `pa` has recorded a write (FreeBSD
    /// `pmap_is_modified`).
    pub fn is_modified(&self, pa: PhysAddr) -> bool {
        let mut m = false;
        self.for_each_mapping(pa.as_u64(), |_, _, slot, _, _, _| {
            m |= self.geom.dirty(self.tables().load(slot));
            !m
        });
        m
    }

    /// Whether the frame was written through a mapping that has since gone or lost write
    /// permission (what the pmap told the page's record).
    pub fn page_modified_flag(&self, pa: PhysAddr) -> bool {
        self.pages
            .get(pa)
            .is_some_and(|m| m.flags() & page_flags::MODIFIED != 0)
    }

    /// Forget the writes recorded for `pa`: every mapping becomes clean (and, where the
    /// format records writes only by faulting, write-protected until the next write). A
    /// superpage mapping is demoted first so that only this frame is affected.
    pub fn clear_modify(&self, pa: PhysAddr) {
        self.restrict_mappings(pa.as_u64(), false);
        if let Some(m) = self.pages.get(pa) {
            m.clear_flags(page_flags::MODIFIED);
        }
    }

    /// Write-protect every mapping of `pa` (FreeBSD `pmap_remove_write`), recording whether it
    /// was dirty.
    pub fn remove_write(&self, pa: PhysAddr) {
        self.restrict_mappings(pa.as_u64(), true);
    }

    fn restrict_mappings(&self, pa: u64, write_protect: bool) {
        let g = &self.geom;
        let pa = pa & !(PAGE_SIZE - 1);
        // Demote writable superpages that contain the frame: restrictions are per 4 KiB page.
        loop {
            let mut demoted = false;
            self.for_each_mapping(pa, |pmap, st, slot, level, va, flush| {
                if level != g.last() && g.writable(self.tables().load(slot)) {
                    let base = va & !(g.levels[level].span - 1);
                    let _ = self.demote(pmap, st, base, level, OnFail::Destroy, flush);
                    demoted = true;
                    return false;
                }
                true
            });
            if !demoted {
                break;
            }
        }
        self.for_each_mapping(pa, |_pmap, _st, slot, level, va, flush| {
            let t = self.tables();
            let old = t.update(slot, |e| {
                if !g.writable(e) {
                    return e;
                }
                if write_protect {
                    g.write_protect(e, level)
                } else if g.dirty(e) {
                    g.fmt.without_flags(e, level, PteFlags::DIRTY).unwrap_or(e)
                } else {
                    e
                }
            });
            if g.writable(old) && (write_protect || g.dirty(old)) {
                if g.dirty(old) {
                    self.harvest(old, g.leaf_pa(old, level), PAGE_SIZE);
                }
                flush.add(va, PAGE_SIZE);
            }
            true
        });
    }

    /// Count and clear the accessed bits of `pa`'s mappings (FreeBSD `pmap_ts_referenced`);
    /// the page's own referenced flag (from mappings already gone) counts once.
    pub fn ts_referenced(&self, pa: PhysAddr) -> u32 {
        let g = &self.geom;
        let mut n = 0;
        if let Some(m) = self.pages.get(pa) {
            if m.flags() & page_flags::REFERENCED != 0 {
                m.clear_flags(page_flags::REFERENCED);
                n += 1;
            }
        }
        self.for_each_mapping(pa.as_u64(), |_, _, slot, level, va, flush| {
            let old = self.tables().update(slot, |e| g.clear_accessed(e));
            if g.accessed(old) {
                n += 1;
                let span = g.levels[level].span;
                flush.add(va & !(span - 1), PAGE_SIZE);
            }
            true
        });
        n
    }

    /// Whether `pmap` maps `pa` among the first 16 mappings of the frame (FreeBSD
    /// `pmap_page_exists_quick`).
    pub fn page_exists_quick(&self, pmap: &Pmap, pa: PhysAddr) -> bool {
        // A destroyed pmap's id may name a live one now.
        if self.usable(pmap).is_err() {
            return false;
        }
        let mut seen = 0;
        self.pv_mappings(pa.as_u64(), |e, _| {
            seen += 1;
            if e.pmap == pmap.id {
                core::ops::ControlFlow::Break(true)
            } else if seen == 16 {
                core::ops::ControlFlow::Break(false)
            } else {
                core::ops::ControlFlow::Continue(())
            }
        })
        .unwrap_or(false)
    }

    /// Number of mappings of `pa` (4 KiB and superpage).
    pub fn page_mapping_count(&self, pa: PhysAddr) -> usize {
        let mut n = 0;
        self.pv_mappings(pa.as_u64(), |_, _| {
            n += 1;
            core::ops::ControlFlow::<()>::Continue(())
        });
        n
    }

    /// The PV entries on `pa`'s own list.
    pub fn pv_entries(&self, pa: PhysAddr) -> alloc::vec::Vec<PvEntry> {
        self.pv_collect(pa.as_u64())
    }
}

/// One level of a lock-free walk: the next table, the translation, or nothing.
enum Step {
    Table(u64),
    Done(Option<PhysAddr>),
}

#[inline(always)]
fn step(
    g: &Geometry,
    lvl: usize,
    table: u64,
    va: u64,
    eb: u64,
    load: &impl Fn(u64) -> u64,
) -> Step {
    let l = &g.levels[lvl];
    let raw = load(table + ((va >> l.shift) & (l.entries as u64 - 1)) * eb);
    if l.table_pat.matches(raw) {
        Step::Table(raw & l.table_addr)
    } else if l.leaf_pat.matches(raw) {
        Step::Done(Some(PhysAddr::new(
            (raw & l.leaf_addr) | (va & (l.span - 1)),
        )))
    } else {
        Step::Done(None)
    }
}

/// A walk of `depth` levels. Inlined where it is called with a constant depth, so that the
/// loop unrolls.
#[inline(always)]
fn walk(
    g: &Geometry,
    depth: usize,
    mut table: u64,
    va: u64,
    eb: u64,
    load: impl Fn(u64) -> u64,
) -> Option<PhysAddr> {
    debug_assert_eq!(g.nlevels, depth);
    for lvl in 0..depth {
        match step(g, lvl, table, va, eb, &load) {
            Step::Table(t) => table = t,
            Step::Done(r) => return r,
        }
    }
    None
}
