//! `vmsys::Platform` on the (emulated) machine: physical memory through the direct map, CR3,
//! INVLPG/INVPCID, local-APIC IPIs with acknowledgement, interrupt points, the #PF handler.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vmsys::arch::FormatId;
use vmsys::platform::{
    AccessKind, CpuId, CpuSet, Fault, FaultHandler, IpiHandler, IpiMessage, PhysSegment, Platform,
    PlatformError, RootLoad, TagSel, TlbInval,
};
use vmsys::{PhysAddr, VirtAddr};

use crate::DMAP;

/// What CPUID said about the paging features the platform uses.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub pcid: bool,
    pub invpcid: bool,
    pub pdpe1gb: bool,
    pub la57: bool,
    pub pge: bool,
}

impl Features {
    pub fn probe() -> Self {
        let l1 = crate::cpu::cpuid(1, 0);
        let l7 = crate::cpu::cpuid(7, 0);
        let e1 = crate::cpu::cpuid(0x8000_0001, 0);
        Features {
            pcid: l1[2] & (1 << 17) != 0,
            invpcid: l7[1] & (1 << 10) != 0,
            pdpe1gb: e1[3] & (1 << 26) != 0,
            la57: l7[2] & (1 << 16) != 0,
            pge: l1[3] & (1 << 13) != 0,
        }
    }
}

pub struct QemuPlatform {
    ncpu: u32,
    segments: Vec<PhysSegment>,
    /// The end of the physical memory the direct map covers (and the platform accepts).
    phys_end: u64,
    pub features: Features,
    /// Whether CR4.PCIDE is set (PCIDs in CR3 loads).
    pub pcid_on: bool,
    /// Planted bug for the teeth test: drop the IPIs of this vector (0: none).
    omit_vector: AtomicU32,
    pub dropped_ipis: AtomicU64,
    pub ipis_sent: AtomicU64,
    pub cr3_loads: AtomicU64,
}

impl QemuPlatform {
    pub fn new(
        ncpu: u32,
        segments: Vec<PhysSegment>,
        phys_end: u64,
        features: Features,
        pcid_on: bool,
    ) -> Self {
        QemuPlatform {
            ncpu,
            segments,
            phys_end,
            features,
            pcid_on,
            omit_vector: AtomicU32::new(0),
            dropped_ipis: AtomicU64::new(0),
            ipis_sent: AtomicU64::new(0),
            cr3_loads: AtomicU64::new(0),
        }
    }

    pub fn phys_segments_owned(&self) -> Vec<PhysSegment> {
        self.segments.clone()
    }

    /// Drop every IPI of `vector` from now on (0: stop dropping).
    pub fn plant_omitted_ipis(&self, vector: u8) {
        self.omit_vector.store(vector as u32, Ordering::SeqCst);
    }

    fn va(&self, pa: PhysAddr, len: u64) -> u64 {
        // A real check, not a debug one: an address past the direct map would fault in the
        // kernel (or reach MMIO), far from the caller that produced it.
        assert!(
            pa.as_u64()
                .checked_add(len)
                .is_some_and(|e| e <= self.phys_end),
            "physical address {pa} (+{len:#x}) beyond the direct map ({:#x})",
            self.phys_end
        );
        DMAP + pa.as_u64()
    }

    fn word(&self, pa: PhysAddr) -> &AtomicU64 {
        assert!(pa.is_aligned(8), "unaligned page-table word {pa}");
        // SAFETY: within the direct map (checked), 8-byte aligned; page-table words are only
        // accessed atomically, by us and by the MMUs.
        unsafe { AtomicU64::from_ptr(self.va(pa, 8) as *mut u64) }
    }

    fn word32(&self, pa: PhysAddr) -> &AtomicU32 {
        assert!(pa.is_aligned(4), "unaligned page-table word {pa}");
        // SAFETY: as `word`.
        unsafe { AtomicU32::from_ptr(self.va(pa, 4) as *mut u32) }
    }

    /// Flush every TLB entry of this CPU, global ones and all PCIDs (toggling CR4.PGE).
    fn flush_everything(&self) {
        let cr4 = crate::cpu::cr4();
        // SAFETY: clearing and restoring PGE only flushes the TLB.
        unsafe {
            crate::cpu::write_cr4(cr4 & !(1 << 7));
            crate::cpu::write_cr4(cr4);
        }
        if cr4 & (1 << 7) == 0 {
            // Without PGE there are no global entries: a CR3 reload flushes the rest.
            // SAFETY: the same tables.
            unsafe { crate::cpu::write_cr3(crate::cpu::cr3() & !(1 << 63)) };
        }
    }

    fn current_pcid(&self) -> u16 {
        if self.pcid_on {
            (crate::cpu::cr3() & 0xfff) as u16
        } else {
            0
        }
    }
}

/// The level (0 = PML4) at which a walk of the 4-level tables at `root` for `va` stops: the
/// first non-present entry, or the leaf.
pub fn walk_level(root: u64, va: u64) -> u8 {
    let mut table = root;
    for level in 0..4u8 {
        let idx = (va >> (39 - 9 * level as u64)) & 511;
        if table + 8 * idx + 8 > 1 << 30 {
            return level;
        }
        // SAFETY: page-table pages are in RAM below the direct map's end (checked above).
        let e = unsafe { ((DMAP + table + 8 * idx) as *const u64).read_volatile() };
        if e & 1 == 0 || level == 3 || (level > 0 && e & 0x80 != 0) {
            return level;
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    3
}

/// The physical address `va` translates to in the tables at `root` (software walk), if any.
pub fn walk(root: u64, va: u64) -> Option<(u64, u8, u64)> {
    let mut table = root;
    for level in 0..4u8 {
        let shift = 39 - 9 * level as u64;
        let idx = (va >> shift) & 511;
        // SAFETY: as in `walk_level`.
        let e = unsafe { ((DMAP + table + 8 * idx) as *const u64).read_volatile() };
        if e & 1 == 0 {
            return None;
        }
        if level == 3 || (level > 0 && e & 0x80 != 0) {
            let mask = (1u64 << shift) - 1;
            return Some(((e & 0x000f_ffff_ffff_f000 & !mask) | (va & mask), level, e));
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    None
}

impl Platform for QemuPlatform {
    fn format(&self) -> FormatId {
        FormatId::Amd64
    }
    fn cpu_count(&self) -> u32 {
        self.ncpu
    }
    fn current_cpu(&self) -> CpuId {
        crate::trap::cpu_id()
    }
    fn phys_segments(&self) -> &[PhysSegment] {
        &self.segments
    }
    fn direct_map_limit(&self) -> PhysAddr {
        PhysAddr::new(self.phys_end)
    }

    fn pt_load64(&self, pa: PhysAddr) -> u64 {
        self.word(pa).load(Ordering::Acquire)
    }
    fn pt_store64(&self, pa: PhysAddr, val: u64) {
        self.word(pa).store(val, Ordering::Release)
    }
    fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64 {
        self.word(pa).swap(val, Ordering::AcqRel)
    }
    fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64> {
        self.word(pa)
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
    }
    fn pt_load32(&self, pa: PhysAddr) -> u32 {
        self.word32(pa).load(Ordering::Acquire)
    }
    fn pt_store32(&self, pa: PhysAddr, val: u32) {
        self.word32(pa).store(val, Ordering::Release)
    }
    fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32 {
        self.word32(pa).swap(val, Ordering::AcqRel)
    }
    fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32> {
        self.word32(pa)
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
    }
    fn phys_zero(&self, pa: PhysAddr, len: u64) {
        let p = self.va(pa, len) as *mut u8;
        // SAFETY: inside the direct map (checked); the caller owns the frames.
        unsafe { core::ptr::write_bytes(p, 0, len as usize) }
    }
    fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64) {
        let s = self.va(src, len) as *const u8;
        let d = self.va(dst, len) as *mut u8;
        // SAFETY: as `phys_zero`; frames of a copy are distinct.
        unsafe { core::ptr::copy(s, d, len as usize) }
    }
    fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]) {
        let s = self.va(pa, buf.len() as u64) as *const u8;
        // SAFETY: as `phys_zero`.
        unsafe { core::ptr::copy_nonoverlapping(s, buf.as_mut_ptr(), buf.len()) }
    }
    fn phys_write(&self, pa: PhysAddr, buf: &[u8]) {
        let d = self.va(pa, buf.len() as u64) as *mut u8;
        // SAFETY: as `phys_zero`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), d, buf.len()) }
    }

    fn load_root(&self, load: RootLoad) {
        let mut v = load.root.as_u64();
        if self.pcid_on {
            v |= load.tag as u64 & 0xfff;
            if !load.flush {
                v |= 1 << 63;
            }
        }
        self.cr3_loads.fetch_add(1, Ordering::Relaxed);
        // SAFETY: vmsys's roots share the kernel half (code, stacks, heap through the direct
        // map, the local APIC), so the running code stays mapped.
        unsafe { crate::cpu::write_cr3(v) };
        crate::apic::use_kva();
    }
    fn load_kernel_root(&self, _root: PhysAddr) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported)
    }
    fn tlb_invalidate_local(&self, inv: TlbInval) {
        let f = &self.features;
        match inv {
            TlbInval::Page { va, tag, .. } => match tag {
                // INVLPG: the current PCID's entries and global ones.
                TagSel::Current | TagSel::Any => crate::cpu::invlpg(va.as_u64()),
                TagSel::Tag(t) if !self.pcid_on || t == self.current_pcid() => {
                    crate::cpu::invlpg(va.as_u64())
                }
                TagSel::Tag(t) if f.invpcid => crate::cpu::invpcid(0, t, va.as_u64()),
                TagSel::Tag(_) => self.flush_everything(),
            },
            TlbInval::Tag(t) => {
                if f.invpcid && self.pcid_on {
                    crate::cpu::invpcid(1, t, 0)
                } else {
                    self.flush_everything()
                }
            }
            TlbInval::AllNonGlobal => {
                if f.invpcid && self.pcid_on {
                    crate::cpu::invpcid(3, 0, 0)
                } else {
                    self.flush_everything()
                }
            }
            TlbInval::All => {
                if f.invpcid && self.pcid_on {
                    crate::cpu::invpcid(2, 0, 0)
                } else {
                    self.flush_everything()
                }
            }
        }
    }
    fn tlb_invalidate_broadcast(&self, _inv: TlbInval) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported)
    }

    fn set_ipi_handler(&self, vector: u8, handler: IpiHandler) {
        crate::ipi::set_handler(vector, handler)
    }
    fn send_ipi(&self, targets: &CpuSet, msg: IpiMessage, wait: bool) -> Result<(), PlatformError> {
        if let Some(c) = targets.iter().find(|&c| c >= self.ncpu) {
            return Err(PlatformError::BadCpu(c));
        }
        if self.omit_vector.load(Ordering::Relaxed) == msg.vector as u32 {
            self.dropped_ipis
                .fetch_add(targets.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let me = self.current_cpu();
        let mut sent = CpuSet::empty();
        for t in targets.iter() {
            if t == me {
                // The handler runs here, as the target would run it.
                crate::ipi::run_local(&msg);
                continue;
            }
            // A CPU not started yet has never loaded vmsys's tables: it has nothing to
            // invalidate, and it loads CR3 (flushing) when it starts.
            if !crate::ipi::ONLINE[t as usize].load(Ordering::SeqCst) {
                continue;
            }
            crate::ipi::post(t, &msg);
            sent.insert(t);
        }
        self.ipis_sent
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        if wait {
            for t in sent.iter() {
                while crate::ipi::pending(t) {
                    crate::cpu::interrupt_window();
                    crate::cpu::pause();
                }
            }
        }
        Ok(())
    }
    fn interrupt_point(&self) {
        crate::cpu::interrupt_window();
    }

    fn set_fault_handler(&self, handler: FaultHandler) {
        crate::fault::set_handler(handler)
    }

    /// The access is made for real (a load, or an atomic no-op write), so that the MMU
    /// translates it through this CPU's TLB and a fault goes to the fault handler; then the
    /// physical address is read from the tables.
    fn kernel_translate(&self, va: VirtAddr, access: AccessKind) -> Result<PhysAddr, Fault> {
        match access {
            AccessKind::Read => crate::fault::read64(va.as_u64() & !7).map(|_| ())?,
            AccessKind::Write => crate::fault::touch_write(va.as_u64())?,
            AccessKind::Execute => {}
        }
        let root = crate::cpu::cr3() & 0x000f_ffff_ffff_f000;
        match walk(root, va.as_u64()) {
            Some((pa, _, _)) => Ok(PhysAddr::new(pa)),
            None => Err(crate::fault::decode(va.as_u64(), 0)),
        }
    }

    fn kernel_read(&self, va: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        // SAFETY: `buf` is ours; the source is read through the MMU.
        unsafe { crate::fault::copy(buf.as_mut_ptr() as u64, va.as_u64(), buf.len() as u64) }
    }
    fn kernel_write(&self, va: VirtAddr, buf: &[u8]) -> Result<(), Fault> {
        // SAFETY: the caller writes kernel memory it owns, as a pointer store would.
        unsafe { crate::fault::copy(va.as_u64(), buf.as_ptr() as u64, buf.len() as u64) }
    }
    fn kernel_copy(&self, src: VirtAddr, dst: VirtAddr, len: u64) -> Result<(), Fault> {
        // SAFETY: as `kernel_write`.
        unsafe { crate::fault::copy(dst.as_u64(), src.as_u64(), len) }
    }
}
