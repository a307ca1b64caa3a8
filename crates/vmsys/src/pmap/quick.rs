//! Per-CPU quick mappings (seed 001, FreeBSD `pmap_quick_enter_page`): a temporary kernel
//! mapping of one page that never sleeps and never fails. Where the format has a direct map
//! and the frame is inside it, the direct-map address is returned and removal is a no-op;
//! otherwise the CPU's own slot is used, invalidated on this CPU only (no other CPU uses the
//! slot's address). One mapping per CPU at a time: nesting is a bug and asserts in debug
//! builds. A second slot serves page-to-page copies.

use core::sync::atomic::Ordering;

use vmsys_arch::{CacheMode, Prot, PteFlags};

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::platform::Platform;

use super::PmapSystem;

impl<P: Platform> PmapSystem<P> {
    fn quick_va(&self, cpu: usize, slot: usize) -> u64 {
        self.kern.quick_base + (cpu as u64 * 2 + slot as u64) * PAGE_SIZE
    }

    fn in_direct_map(&self, pa: PhysAddr) -> Option<u64> {
        let (base, size) = self.kern.dmap?;
        (pa.as_u64() < size).then(|| base + pa.as_u64())
    }

    fn quick_slot_entry(&self, va: u64) -> u64 {
        let g = &self.geom;
        let table = self
            .find_table(&self.kernel, va, g.last())
            .expect("bootstrap gives the quick slots page tables");
        g.slot(table, g.index(va, g.last()))
    }

    fn quick_map(&self, slot: usize, pa: PhysAddr) -> VirtAddr {
        if let Some(va) = self.in_direct_map(pa) {
            return VirtAddr::new(va);
        }
        let cpu = super::cpu_index(&*self.plat);
        let busy = self.cpus[cpu].quick_busy[slot].swap(true, Ordering::Relaxed);
        debug_assert!(
            !busy,
            "quick mapping slot {slot} of cpu {cpu} is busy: quick mappings do not nest (seed 001)"
        );
        let va = self.quick_va(cpu, slot);
        let entry = self
            .geom
            .fmt
            .make_leaf(
                pa.as_u64() & !(PAGE_SIZE - 1),
                self.geom.last(),
                Prot::WRITE,
                PteFlags::ACCESSED | PteFlags::DIRTY,
                CacheMode::WriteBack,
            )
            .expect("a writable kernel page is encodable in every format");
        self.tables().store(self.quick_slot_entry(va), entry);
        VirtAddr::new(va + pa.as_u64() % PAGE_SIZE)
    }

    fn quick_unmap(&self, slot: usize, va: VirtAddr) {
        let cpu = super::cpu_index(&*self.plat);
        let q = self.quick_va(cpu, slot);
        if va.as_u64() & !(PAGE_SIZE - 1) != q {
            // A direct-map address: nothing to undo.
            return;
        }
        self.tables().store(self.quick_slot_entry(q), 0);
        // Only this CPU used the slot: a local invalidation, before the slot's next use.
        self.invalidate_local_page(q);
        self.cpus[cpu].quick_busy[slot].store(false, Ordering::Relaxed);
    }

    /// Map `pa` for the current CPU's use. Never sleeps, never fails; must not nest.
    pub fn quick_enter_page(&self, pa: PhysAddr) -> VirtAddr {
        self.quick_map(0, pa)
    }

    /// Undo [`PmapSystem::quick_enter_page`].
    pub fn quick_remove_page(&self, va: VirtAddr) {
        self.quick_unmap(0, va)
    }

    /// Map two pages at once (a source and a destination for a copy).
    pub fn quick_enter_pair(&self, src: PhysAddr, dst: PhysAddr) -> (VirtAddr, VirtAddr) {
        (self.quick_map(0, src), self.quick_map(1, dst))
    }

    /// Undo [`PmapSystem::quick_enter_pair`].
    pub fn quick_remove_pair(&self, src: VirtAddr, dst: VirtAddr) {
        self.quick_unmap(1, dst);
        self.quick_unmap(0, src);
    }
}
