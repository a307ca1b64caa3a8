//! The platform the run's pmap uses: the simulated machine, with one planted bug available.
//!
//! `SimPlat` delegates every [`Platform`] method to the [`Machine`]. With `omit_shootdown` it
//! drops the pmap's shootdowns: the IPIs of the shootdown vector are not sent (and reported as
//! acknowledged), and arm64's broadcast TLBI becomes a local one. The pmap itself is left
//! untouched (vmsys is not ours to break); this is the missing-shootdown kernel bug that
//! `vmsim run --omit-shootdown` plants to show that the checks catch it.

use std::sync::Arc;

use vmsys::platform::{
    CpuId, CpuSet, FaultHandler, IpiHandler, IpiMessage, PhysSegment, Platform, PlatformError,
    RootLoad, TlbInval,
};
use vmsys::{PhysAddr, VirtAddr};
use vmsys_arch::FormatId;
use vmsys_sim::Machine;

/// The simulated machine as the pmap's platform.
pub struct SimPlat {
    pub m: Arc<Machine>,
    /// Drop remote invalidations of this IPI vector (`None`: a correct platform).
    omit_vector: Option<u8>,
}

impl SimPlat {
    /// A correct platform, or one that drops the shootdowns sent on `shootdown_vector`.
    pub fn new(m: Arc<Machine>, omit_shootdown: bool, shootdown_vector: u8) -> Self {
        SimPlat {
            m,
            omit_vector: omit_shootdown.then_some(shootdown_vector),
        }
    }
}

impl Platform for SimPlat {
    fn format(&self) -> FormatId {
        self.m.format()
    }
    fn cpu_count(&self) -> u32 {
        self.m.cpu_count()
    }
    #[inline]
    fn current_cpu(&self) -> CpuId {
        self.m.current_cpu()
    }
    fn phys_segments(&self) -> &[PhysSegment] {
        self.m.phys_segments()
    }
    fn direct_map_limit(&self) -> PhysAddr {
        self.m.direct_map_limit()
    }
    #[inline]
    fn pt_load64(&self, pa: PhysAddr) -> u64 {
        self.m.pt_load64(pa)
    }
    #[inline]
    fn pt_store64(&self, pa: PhysAddr, val: u64) {
        self.m.pt_store64(pa, val)
    }
    #[inline]
    fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64 {
        self.m.pt_swap64(pa, val)
    }
    #[inline]
    fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64> {
        self.m.pt_cas64(pa, old, new)
    }
    #[inline]
    fn pt_load_run64(&self, pa: PhysAddr, out: &mut [u64]) {
        self.m.pt_load_run64(pa, out)
    }
    #[inline]
    fn pt_store_run64(&self, pa: PhysAddr, vals: &[u64]) {
        self.m.pt_store_run64(pa, vals)
    }
    #[inline]
    fn pt_swap_run64(&self, pa: PhysAddr, vals: &mut [u64]) {
        self.m.pt_swap_run64(pa, vals)
    }
    #[inline]
    fn pt_load32(&self, pa: PhysAddr) -> u32 {
        self.m.pt_load32(pa)
    }
    #[inline]
    fn pt_store32(&self, pa: PhysAddr, val: u32) {
        self.m.pt_store32(pa, val)
    }
    #[inline]
    fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32 {
        self.m.pt_swap32(pa, val)
    }
    #[inline]
    fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32> {
        self.m.pt_cas32(pa, old, new)
    }
    fn phys_zero(&self, pa: PhysAddr, len: u64) {
        self.m.phys_zero(pa, len)
    }
    fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64) {
        self.m.phys_copy(src, dst, len)
    }
    fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]) {
        self.m.phys_read(pa, buf)
    }
    fn phys_write(&self, pa: PhysAddr, buf: &[u8]) {
        self.m.phys_write(pa, buf)
    }
    fn load_root(&self, load: RootLoad) {
        self.m.load_root(load)
    }
    fn load_kernel_root(&self, root: PhysAddr) -> Result<(), PlatformError> {
        self.m.load_kernel_root(root)
    }
    fn tlb_invalidate_local(&self, inv: TlbInval) {
        self.m.tlb_invalidate_local(inv)
    }
    fn tlb_invalidate_broadcast(&self, inv: TlbInval) -> Result<(), PlatformError> {
        if self.omit_vector.is_some() {
            // The planted bug: this CPU only.
            self.m.tlb_invalidate_local(inv);
            return Ok(());
        }
        self.m.tlb_invalidate_broadcast(inv)
    }
    fn set_ipi_handler(&self, vector: u8, handler: IpiHandler) {
        self.m.set_ipi_handler(vector, handler)
    }
    fn send_ipi(&self, targets: &CpuSet, msg: IpiMessage, wait: bool) -> Result<(), PlatformError> {
        if self.omit_vector == Some(msg.vector) {
            // The planted bug: the shootdown is never sent.
            return Ok(());
        }
        self.m.send_ipi(targets, msg, wait)
    }
    #[inline]
    fn interrupt_point(&self) {
        self.m.interrupt_point()
    }
    fn set_fault_handler(&self, handler: FaultHandler) {
        self.m.set_fault_handler(handler)
    }
    fn kernel_translate(
        &self,
        va: VirtAddr,
        access: vmsys::platform::AccessKind,
    ) -> Result<PhysAddr, vmsys::platform::Fault> {
        self.m.kernel_translate(va, access)
    }
    #[inline]
    fn pt_update_begin(&self, start: VirtAddr, end: VirtAddr) {
        self.m.pt_update_begin(start, end)
    }
    #[inline]
    fn pt_update_end(&self) {
        self.m.pt_update_end()
    }
}
