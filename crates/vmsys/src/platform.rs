//! The one interface through which vmsys touches hardware.
//!
//! Everything machine-specific that the VM system needs (physical memory words, the MMU's root
//! registers, TLB maintenance, inter-processor interrupts) is a method here. The simulated machine
//! in `vmsys-sim` implements it; a bare-metal kernel implements it with real instructions.
//!
//! Every method acts on the *current* CPU unless it says otherwise, as `curcpu` does in a kernel.

use alloc::sync::Arc;
use core::fmt;

use crate::addr::{PhysAddr, VirtAddr};
use vmsys_arch::FormatId;

/// A CPU number, dense from 0.
pub type CpuId = u32;

/// The largest number of CPUs a [`CpuSet`] can name.
pub const MAX_CPUS: usize = 256;

/// A set of CPUs (a bitmap of [`MAX_CPUS`] bits).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CpuSet([u64; MAX_CPUS / 64]);

impl CpuSet {
    /// The empty set.
    pub const fn empty() -> Self {
        CpuSet([0; MAX_CPUS / 64])
    }
    /// CPUs `0..n`.
    pub fn first_n(n: u32) -> Self {
        let mut s = Self::empty();
        for c in 0..n {
            s.insert(c);
        }
        s
    }
    /// A set of one CPU.
    pub fn single(cpu: CpuId) -> Self {
        let mut s = Self::empty();
        s.insert(cpu);
        s
    }
    /// Adds `cpu`.
    pub fn insert(&mut self, cpu: CpuId) {
        let c = cpu as usize;
        assert!(c < MAX_CPUS, "cpu {cpu} beyond MAX_CPUS");
        self.0[c / 64] |= 1 << (c % 64);
    }
    /// Removes `cpu`.
    pub fn remove(&mut self, cpu: CpuId) {
        let c = cpu as usize;
        if c < MAX_CPUS {
            self.0[c / 64] &= !(1 << (c % 64));
        }
    }
    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: CpuId) -> bool {
        let c = cpu as usize;
        c < MAX_CPUS && self.0[c / 64] & (1 << (c % 64)) != 0
    }
    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// The number of CPUs in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// The CPUs in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = CpuId> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some((i * 64) as CpuId + b)
            })
        })
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Which address-space tags (PCID on amd64, ASID on arm64) an invalidation applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagSel {
    /// The tag currently loaded on the CPU that executes the invalidation (x86 INVLPG).
    Current,
    /// One tag (INVPCID type 0, TLBI VAE1 with an ASID).
    Tag(u16),
    /// Every tag (TLBI VAAE1; INVLPG of a global page).
    Any,
}

/// A TLB (and paging-structure cache) invalidation, in the forms that the formats' hardware has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbInval {
    /// The entries that translate `va`. Global entries go too with x86 INVLPG (`TagSel::Current`)
    /// and arm64 TLBI by VA, but not with x86 INVPCID by address (`TagSel::Tag`), which spares
    /// them. With `leaf_only` (arm64 TLBI VALE1) the paging-structure (walk) caches are left
    /// alone; without it they are invalidated too, as x86 INVLPG and arm64 TLBI VAE1 do (x86
    /// has no leaf-only form and ignores the flag).
    Page {
        va: VirtAddr,
        tag: TagSel,
        leaf_only: bool,
    },
    /// Every non-global entry with this tag, and the paging-structure caches for it.
    Tag(u16),
    /// Every non-global entry of every tag (x86 INVPCID type 3). arm64 has no such form: its
    /// TLBI VMALLE1 is [`TlbInval::All`].
    AllNonGlobal,
    /// Everything, global entries included.
    All,
}

/// A write of the translation root register of the current CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootLoad {
    /// The physical address of the top-level table (the PDPT on i386-PAE, 32-byte aligned).
    pub root: PhysAddr,
    /// The PCID (amd64 with PCIDs) or ASID (arm64, TTBR0); 0 where the format has none.
    pub tag: u16,
    /// Whether the load also flushes the tag's non-global entries (x86 CR3 without the
    /// no-flush bit; always true on i386).
    pub flush: bool,
}

/// What an access is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    Read,
    Write,
    Execute,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// No valid entry at `level` (0 is the root level).
    NotPresent { level: u8 },
    /// The entry exists but does not allow the access (user/supervisor, write, execute).
    Protection { level: u8 },
    /// A reserved bit is set in the entry at `level`.
    ReservedBit { level: u8 },
    /// The address is not canonical (x86) or lies in neither half (arm64), or beyond 32 bits.
    NonCanonical,
    /// arm64 with a software-managed access flag: the entry has AF = 0.
    AccessFlag { level: u8 },
}

/// A fault reported to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub cpu: CpuId,
    pub va: VirtAddr,
    pub access: AccessKind,
    /// The access was made in user mode.
    pub user: bool,
    pub reason: FaultReason,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {} {} {:?} fault at {}: {:?}",
            self.cpu,
            if self.user { "user" } else { "kernel" },
            self.access,
            self.va,
            self.reason
        )
    }
}

/// What the kernel's fault handler decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultResolution {
    /// The handler fixed the tables: retry the access.
    Retry,
    /// The fault stands: the access fails with it.
    Deliver,
}

/// The kernel's fault handler.
pub type FaultHandler = Arc<dyn Fn(&Fault) -> FaultResolution + Send + Sync>;

/// An inter-processor interrupt: a vector and a few words of payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpiMessage {
    pub vector: u8,
    pub args: [u64; 4],
}

/// Runs on the target CPU (which is then the current CPU) when an IPI arrives.
pub type IpiHandler = Arc<dyn Fn(&IpiMessage) + Send + Sync>;

/// Errors of the platform layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// The hardware has no such operation (e.g. a broadcast TLBI on x86).
    Unsupported,
    /// A physical address beyond the machine's memory.
    BadPhysAddr(PhysAddr),
    /// A CPU number beyond the machine's CPUs.
    BadCpu(CpuId),
    /// The calling thread is not running on a CPU of this machine.
    NotOnCpu,
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::Unsupported => write!(f, "operation not supported by this hardware"),
            PlatformError::BadPhysAddr(pa) => write!(f, "physical address {pa} beyond memory"),
            PlatformError::BadCpu(c) => write!(f, "no cpu {c}"),
            PlatformError::NotOnCpu => write!(f, "caller is not running on a cpu"),
        }
    }
}

/// A range of physical memory and the NUMA domain it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysSegment {
    pub start: PhysAddr,
    pub end: PhysAddr,
    pub domain: u8,
}

/// The hardware as vmsys sees it.
///
/// Physical-memory methods take addresses that the machine has; page-table words are accessed
/// atomically, as the MMU of another CPU may read them (and set accessed/dirty bits) at any time.
pub trait Platform: Send + Sync {
    /// The page-table format the MMU walks.
    fn format(&self) -> FormatId;
    /// The number of CPUs.
    fn cpu_count(&self) -> u32;
    /// The CPU the caller runs on.
    fn current_cpu(&self) -> CpuId;
    /// The machine's physical memory, by NUMA domain.
    fn phys_segments(&self) -> &[PhysSegment];
    /// Physical memory below this address may be reached through a kernel direct map (the
    /// machine can limit it, so that the paths for memory outside the direct map are exercised).
    fn direct_map_limit(&self) -> PhysAddr;

    /// Atomic 8-byte load of a page-table word.
    fn pt_load64(&self, pa: PhysAddr) -> u64;
    /// Atomic 8-byte store of a page-table word.
    fn pt_store64(&self, pa: PhysAddr, val: u64);
    /// Atomic 8-byte exchange; returns the old value.
    fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64;
    /// Atomic 8-byte compare-and-exchange; `Err` carries the value found.
    fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64>;
    /// Atomic 4-byte load (i386 2-level entries).
    fn pt_load32(&self, pa: PhysAddr) -> u32;
    /// Atomic 4-byte store.
    fn pt_store32(&self, pa: PhysAddr, val: u32);
    /// Atomic 4-byte exchange.
    fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32;
    /// Atomic 4-byte compare-and-exchange.
    fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32>;
    /// Zero `len` bytes of physical memory.
    fn phys_zero(&self, pa: PhysAddr, len: u64);
    /// Copy `len` bytes of physical memory.
    fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64);
    /// Read bytes of physical memory.
    fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]);
    /// Write bytes of physical memory.
    fn phys_write(&self, pa: PhysAddr, buf: &[u8]);

    /// Load the translation root of the current CPU (CR3; TTBR0_EL1 on arm64).
    fn load_root(&self, load: RootLoad);
    /// arm64: load TTBR1_EL1, the kernel half's root. Elsewhere `Unsupported`.
    fn load_kernel_root(&self, root: PhysAddr) -> Result<(), PlatformError>;
    /// Invalidate on the current CPU only (INVLPG, INVPCID, TLBI without IS).
    fn tlb_invalidate_local(&self, inv: TlbInval);
    /// Invalidate on every CPU without interrupting them (arm64 TLBI ...IS followed by DSB ISH);
    /// returns when every CPU has done it. `Unsupported` on x86, where IPIs are the only way.
    fn tlb_invalidate_broadcast(&self, inv: TlbInval) -> Result<(), PlatformError>;

    /// Install the handler for an IPI vector (on every CPU).
    fn set_ipi_handler(&self, vector: u8, handler: IpiHandler);
    /// Send an IPI to `targets`; with `wait`, return only when every target has run the handler.
    /// The sender keeps taking its own interrupts while it waits, so two CPUs that interrupt
    /// each other at once do not deadlock.
    fn send_ipi(&self, targets: &CpuSet, msg: IpiMessage, wait: bool) -> Result<(), PlatformError>;
    /// A spin-wait iteration: pending interrupts are taken here.
    fn interrupt_point(&self);

    /// Install the kernel's page-fault handler.
    fn set_fault_handler(&self, handler: FaultHandler);

    /// Debug annotation: the caller begins changing the translations of `[start, end)`.
    /// Until the matching [`Platform::pt_update_end`], a stale translation in that range is
    /// expected and not a violation. No-op on real hardware.
    fn pt_update_begin(&self, _start: VirtAddr, _end: VirtAddr) {}
    /// Debug annotation: the change begun by [`Platform::pt_update_begin`] is complete, its
    /// invalidations included.
    fn pt_update_end(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn cpuset_basics() {
        let mut s = CpuSet::empty();
        assert!(s.is_empty());
        s.insert(0);
        s.insert(63);
        s.insert(64);
        s.insert(255);
        assert_eq!(s.len(), 4);
        assert!(s.contains(64) && !s.contains(65));
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 63, 64, 255]);
        s.remove(63);
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 64, 255]);
        assert_eq!(CpuSet::first_n(3).iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!s.contains(1000));
    }
}
