//! Per-CPU quick mappings (seed 001, FreeBSD `pmap_quick_enter_page`): a temporary kernel
//! mapping of one whole page that never sleeps and never fails for lack of resources. Where the
//! format has a direct map and the frame is inside it, the direct-map address is returned;
//! otherwise the CPU's own slot is used, invalidated on this CPU only (no other CPU uses the
//! slot's address). A second slot serves page-to-page copies.
//!
//! Caller errors are refused before any slot is touched, on every path and in every build
//! (QM-1): a frame address that is not page-aligned (a whole-page operation on it would spill
//! into the next frame or the next slot, possibly another CPU's), a frame the machine does not
//! have (no page record), and nesting (a slot already held on this CPU, direct map included, so
//! that a nesting bug shows on every format, not only those without a direct map). Each slot
//! records what it handed out, so a removal of anything else (twice, on another CPU, an address
//! inside the page) is refused too. [`QuickPage`] releases its slot when dropped, so a failing
//! or panicking user of the mapping cannot leave the slot busy.

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use vmsys_arch::{CacheMode, Prot, PteFlags};

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::platform::Platform;

use super::{PmapError, PmapSystem};

/// Marks a slot held by a [`QuickPage`] (addresses are page-aligned, so bit 0 is free): the
/// explicit `quick_remove_*` calls cannot release a guard's slot under it.
const GUARD: u64 = 1;

/// A quick mapping of one page on the current CPU, released when dropped. Not `Send`: the
/// mapping belongs to the CPU that made it and must be dropped there (asserted).
#[must_use = "the quick mapping is released as soon as this is dropped"]
pub struct QuickPage<'a, P: Platform> {
    sys: &'a PmapSystem<P>,
    va: VirtAddr,
    cpu: usize,
    slot: usize,
    _cpu_bound: PhantomData<*const ()>,
}

impl<P: Platform> QuickPage<'_, P> {
    /// The kernel address of the page's first byte.
    pub fn va(&self) -> VirtAddr {
        self.va
    }
}

impl<P: Platform> core::fmt::Debug for QuickPage<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QuickPage")
            .field("va", &self.va)
            .field("cpu", &self.cpu)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<P: Platform> Drop for QuickPage<'_, P> {
    fn drop(&mut self) {
        let here = super::cpu_index(&*self.sys.plat);
        // Releasing on another CPU would clear the entry there while the owner's TLB keeps it.
        assert_eq!(
            here, self.cpu,
            "a quick mapping made on cpu {} was dropped on cpu {here}",
            self.cpu
        );
        self.sys
            .quick_release(self.cpu, self.slot, self.va.as_u64() | GUARD)
            .expect("only its guard releases a guarded quick-map slot");
    }
}

impl<P: Platform> PmapSystem<P> {
    fn quick_va(&self, cpu: usize, slot: usize) -> u64 {
        self.kern.quick_base + (cpu as u64 * 2 + slot as u64) * PAGE_SIZE
    }

    /// Validate a frame for a quick mapping: its direct-map address, if the direct map covers
    /// the whole page. Touches nothing.
    #[inline]
    fn quick_check(&self, pa: PhysAddr) -> Result<Option<u64>, PmapError> {
        pa.require_aligned(PAGE_SIZE)?;
        if self.pages.get(pa).is_none() {
            return Err(PmapError::NoSuchFrame(pa));
        }
        Ok(self.kern.dmap.and_then(|(base, size)| {
            (size.saturating_sub(pa.as_u64()) >= PAGE_SIZE).then(|| base + pa.as_u64())
        }))
    }

    /// Take `slot` of `cpu` for `va` (`tag`: 0 or [`GUARD`]); busy is an error. Only `cpu`
    /// itself touches its slots, and an interrupt handler there releases what it takes before
    /// returning, so a plain load and store suffice (a locked compare-exchange cost more than
    /// the rest of the direct-map path together).
    #[inline]
    fn quick_claim(&self, cpu: usize, slot: usize, va: u64, tag: u64) -> Result<(), PmapError> {
        let held = &self.cpus[cpu].quick_held[slot];
        if held.load(Ordering::Relaxed) != 0 {
            return Err(PmapError::QuickMapBusy {
                cpu: cpu as u32,
                slot: slot as u8,
            });
        }
        held.store(va | tag, Ordering::Relaxed);
        Ok(())
    }

    fn quick_slot_entry(&self, va: u64) -> u64 {
        let g = &self.geom;
        let table = self
            .find_table(&self.kernel, va, g.last())
            .expect("bootstrap gives the quick slots page tables");
        g.slot(table, g.index(va, g.last()))
    }

    /// Point the (claimed, invalid) slot at `va` to `pa`.
    fn quick_install(&self, va: u64, pa: PhysAddr) {
        let entry = self
            .geom
            .fmt
            .make_leaf(
                pa.as_u64(),
                self.geom.last(),
                Prot::WRITE,
                PteFlags::ACCESSED | PteFlags::DIRTY,
                CacheMode::WriteBack,
            )
            .expect("a writable kernel page is encodable in every format");
        self.tables().store(self.quick_slot_entry(va), entry);
    }

    /// Validate, claim and (outside the direct map) install one slot.
    fn quick_map(&self, slot: usize, pa: PhysAddr, tag: u64) -> Result<VirtAddr, PmapError> {
        let direct = self.quick_check(pa)?;
        let cpu = super::cpu_index(&*self.plat);
        let va = direct.unwrap_or_else(|| self.quick_va(cpu, slot));
        self.quick_claim(cpu, slot, va, tag)?;
        if direct.is_none() {
            self.quick_install(va, pa);
        }
        Ok(VirtAddr::new(va))
    }

    /// Validate and claim both slots, then install them: all or nothing.
    fn quick_map_pair(
        &self,
        src: PhysAddr,
        dst: PhysAddr,
        tag: u64,
    ) -> Result<(VirtAddr, VirtAddr), PmapError> {
        let (ds, dd) = (self.quick_check(src)?, self.quick_check(dst)?);
        let cpu = super::cpu_index(&*self.plat);
        let s = ds.unwrap_or_else(|| self.quick_va(cpu, 0));
        let d = dd.unwrap_or_else(|| self.quick_va(cpu, 1));
        self.quick_claim(cpu, 0, s, tag)?;
        if let Err(e) = self.quick_claim(cpu, 1, d, tag) {
            self.cpus[cpu].quick_held[0].store(0, Ordering::Relaxed);
            return Err(e);
        }
        if ds.is_none() {
            self.quick_install(s, src);
        }
        if dd.is_none() {
            self.quick_install(d, dst);
        }
        Ok((VirtAddr::new(s), VirtAddr::new(d)))
    }

    /// Whether `slot` of `cpu` holds exactly `token` (its address and tag).
    fn quick_holds(&self, cpu: usize, slot: usize, token: u64) -> Result<(), PmapError> {
        if token & !GUARD == 0 || self.cpus[cpu].quick_held[slot].load(Ordering::Relaxed) != token {
            return Err(PmapError::QuickMapNotHeld(VirtAddr::new(token & !GUARD)));
        }
        Ok(())
    }

    /// Release `slot` of `cpu` if it holds `token`: the slot's entry is cleared and invalidated
    /// here before the slot is free again (a direct-map address has nothing to undo).
    fn quick_release(&self, cpu: usize, slot: usize, token: u64) -> Result<(), PmapError> {
        self.quick_holds(cpu, slot, token)?;
        let q = self.quick_va(cpu, slot);
        if token & !GUARD == q {
            self.tables().store(self.quick_slot_entry(q), 0);
            // Only this CPU used the slot: a local invalidation, before the slot's next use.
            self.invalidate_local_page(q);
        }
        self.cpus[cpu].quick_held[slot].store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Map the page-aligned frame `pa` for the current CPU's use; undo with
    /// [`PmapSystem::quick_remove_page`] on this CPU. Never sleeps, never fails for lack of
    /// resources; a misaligned `pa`, a frame without a page record, or a quick mapping already
    /// held on this CPU is an error that touches nothing.
    pub fn quick_enter_page(&self, pa: PhysAddr) -> Result<VirtAddr, PmapError> {
        self.quick_map(0, pa, 0)
    }

    /// Undo [`PmapSystem::quick_enter_page`]: `va` must be what it returned on this CPU.
    pub fn quick_remove_page(&self, va: VirtAddr) -> Result<(), PmapError> {
        self.quick_release(super::cpu_index(&*self.plat), 0, va.as_u64())
    }

    /// Map two pages at once (a source and a destination for a copy), as
    /// [`PmapSystem::quick_enter_page`] does: both or neither.
    pub fn quick_enter_pair(
        &self,
        src: PhysAddr,
        dst: PhysAddr,
    ) -> Result<(VirtAddr, VirtAddr), PmapError> {
        self.quick_map_pair(src, dst, 0)
    }

    /// Undo [`PmapSystem::quick_enter_pair`]: both or neither.
    pub fn quick_remove_pair(&self, src: VirtAddr, dst: VirtAddr) -> Result<(), PmapError> {
        let cpu = super::cpu_index(&*self.plat);
        self.quick_holds(cpu, 0, src.as_u64())?;
        self.quick_holds(cpu, 1, dst.as_u64())?;
        self.quick_release(cpu, 1, dst.as_u64())?;
        self.quick_release(cpu, 0, src.as_u64())
    }

    /// [`PmapSystem::quick_enter_page`] as a guard that releases the mapping when dropped.
    pub fn quick_page(&self, pa: PhysAddr) -> Result<QuickPage<'_, P>, PmapError> {
        let va = self.quick_map(0, pa, GUARD)?;
        Ok(self.guard(va, 0))
    }

    /// [`PmapSystem::quick_enter_pair`] as two guards (source, destination).
    pub fn quick_pair(
        &self,
        src: PhysAddr,
        dst: PhysAddr,
    ) -> Result<(QuickPage<'_, P>, QuickPage<'_, P>), PmapError> {
        let (s, d) = self.quick_map_pair(src, dst, GUARD)?;
        Ok((self.guard(s, 0), self.guard(d, 1)))
    }

    fn guard(&self, va: VirtAddr, slot: usize) -> QuickPage<'_, P> {
        QuickPage {
            sys: self,
            va,
            cpu: super::cpu_index(&*self.plat),
            slot,
            _cpu_bound: PhantomData,
        }
    }
}
