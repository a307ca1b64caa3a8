//! `copy` (FreeBSD `pmap_copy`): at fork, pre-populate the child's tables with the parent's
//! managed, unwired mappings of a range, so that the child does not fault on every page. It is
//! an optimisation: it copies what it can and stops quietly at the first shortage, and the
//! copies are clean, unaccessed and unwired (the VM has already write-protected the parent for
//! copy-on-write).

use vmsys_arch::PteFlags;

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::page::PvEntry;
use crate::platform::Platform;

use super::ptp::Walk;
use super::remove::Found;
use super::tlb::Flush;
use super::{Pmap, PmapError, PmapSystem};

impl<P: Platform> PmapSystem<P> {
    /// Copy `src`'s mappings of `[addr, addr + len)` into `dst` at the same addresses. Returns
    /// the number of 4 KiB pages copied. Both must be live user pmaps of this system, and
    /// different; `len` 0 copies nothing once `addr` is checked.
    pub fn copy(&self, dst: &Pmap, src: &Pmap, addr: VirtAddr, len: u64) -> Result<u64, PmapError> {
        self.usable(dst)?;
        self.usable(src)?;
        if dst.kernel || src.kernel {
            return Err(PmapError::KernelPmap);
        }
        if core::ptr::eq(dst, src) {
            return Err(PmapError::SamePmap);
        }
        self.check_range(src, addr, len, PAGE_SIZE)?;
        if len == 0 {
            return Ok(0);
        }
        let g = &self.geom;
        let t = self.tables();
        // Lock order between two pmaps: by id, then by address (a destroyed pmap's id may have
        // been given to a live one; the destroyed one is refused once its lock is held).
        let key = |p: &Pmap| (p.id, p as *const Pmap as usize);
        let (sst, mut dst_st) = if key(src) < key(dst) {
            let a = self.lock_live(src)?;
            (a, self.lock_live(dst)?)
        } else {
            let b = self.lock_live(dst)?;
            (self.lock_live(src)?, b)
        };
        let mut flush = Flush::new();
        let (sva, eva) = (addr.as_u64(), addr.as_u64() + len);
        let mut va = sva;
        let mut copied = 0u64;
        let clean = |e: u64, lvl: usize| -> u64 {
            g.fmt
                .without_flags(
                    e,
                    lvl,
                    PteFlags::WIRED_SW | PteFlags::ACCESSED | PteFlags::DIRTY,
                )
                .unwrap_or(0)
        };
        'walk: while va < eva {
            match self.cursor_at(src, va) {
                Found::Hole { next: Some(next) } => va = next,
                Found::Hole { next: None } => break,
                Found::Super { level, raw, .. } => {
                    let span = g.levels[level].span;
                    let base = va & !(span - 1);
                    let next = base.wrapping_add(span);
                    if va == base && eva - va >= span && g.managed(raw) && !g.wired(raw) {
                        let table = match self.table_for(dst, base, level, true, &mut flush) {
                            Ok(Walk::Table(tb)) => tb,
                            Ok(Walk::Leaf { .. }) => {
                                va = next;
                                continue;
                            }
                            Err(_) => break 'walk,
                        };
                        let slot = g.slot(table, g.index(base, level));
                        if t.load(slot) != 0 {
                            // Something is there: the table had other entries, a plain unref.
                            self.ptp_unref(dst, base, level, table, 1, &mut flush);
                        } else {
                            let e = PvEntry {
                                pmap: dst.id,
                                va: base,
                                level: level as u8,
                            };
                            if self.pv_insert(g.leaf_pa(raw, level), e).is_err() {
                                // The table may have been allocated just now (count 1): this
                                // frees it (D22763's pmap_copy leak).
                                self.abort_ptp(dst, base, level, table, &mut flush);
                                break 'walk;
                            }
                            t.store(slot, clean(raw, level));
                            dst_st.resident += span / PAGE_SIZE;
                            copied += span / PAGE_SIZE;
                        }
                    }
                    if next == 0 {
                        break;
                    }
                    va = next;
                }
                Found::Run { table: stable, idx } => {
                    let last = g.last();
                    let n = g.run_len(idx, (eva - va) / PAGE_SIZE);
                    let mut src_run = [0u64; 1024];
                    let src_run = &mut src_run[..n];
                    t.load_run(stable, idx, src_run);
                    let wanted = |e: u64| e != 0 && g.managed(e) && !g.wired(e);
                    if !src_run.iter().any(|&e| wanted(e)) {
                        va += n as u64 * PAGE_SIZE;
                        continue;
                    }
                    let dtable = match self.table_for(dst, va, last, true, &mut flush) {
                        Ok(Walk::Table(tb)) => tb,
                        Ok(Walk::Leaf { .. }) => {
                            va += n as u64 * PAGE_SIZE;
                            continue;
                        }
                        Err(_) => break 'walk,
                    };
                    let mut added = 0u32;
                    let mut stop = false;
                    for (k, &e) in src_run.iter().enumerate() {
                        if !wanted(e) {
                            continue;
                        }
                        let slot = g.slot(dtable, idx + k);
                        if t.load(slot) != 0 {
                            continue;
                        }
                        let pv = PvEntry {
                            pmap: dst.id,
                            va: va + k as u64 * PAGE_SIZE,
                            level: last as u8,
                        };
                        if self.pv_insert(g.leaf_pa(e, last), pv).is_err() {
                            stop = true;
                            break;
                        }
                        t.store(slot, clean(e, last));
                        added += 1;
                    }
                    dst_st.resident += added as u64;
                    copied += added as u64;
                    // Turn the hold into the new entries' counts (and free the table if it
                    // got none and was fresh).
                    self.ptp_ref(dtable, added);
                    self.abort_ptp(dst, va, last, dtable, &mut flush);
                    if stop {
                        break 'walk;
                    }
                    va += n as u64 * PAGE_SIZE;
                }
            }
        }
        // The destination's new entries were invalid before: only freed tables need a flush.
        self.complete(dst, flush);
        drop(sst);
        Ok(copied)
    }
}
