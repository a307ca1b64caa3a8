//! The one interface through which vmsys touches hardware.
//!
//! Everything machine-specific that the VM system needs (physical memory words, the MMU's root
//! registers, TLB maintenance, inter-processor interrupts) is a method here. The simulated machine
//! in `vmsys-sim` implements it; a bare-metal kernel implements it with real instructions.
//!
//! Every method acts on the *current* CPU unless it says otherwise, as `curcpu` does in a kernel.

use alloc::sync::Arc;
use core::fmt;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
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

impl PhysSegment {
    /// `[start, end)` in `domain`.
    pub const fn new(start: u64, end: u64, domain: u8) -> Self {
        PhysSegment {
            start: PhysAddr::new(start),
            end: PhysAddr::new(end),
            domain,
        }
    }
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
    /// Loads consecutive 8-byte page-table words from `pa` into `out` (all within one 4 KiB page).
    ///
    /// Each word is loaded as by [`Platform::pt_load64`]; the run as a whole is not atomic. A
    /// run that crosses a 4 KiB page is a caller bug (checked in debug builds). The default
    /// loops over `pt_load64`; a platform overrides it to look the page up once.
    fn pt_load_run64(&self, pa: PhysAddr, out: &mut [u64]) {
        debug_assert_run_in_page(pa, out.len());
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.pt_load64(pa + 8 * i as u64);
        }
    }
    /// Stores `vals` to consecutive 8-byte page-table words from `pa` (all within one 4 KiB page).
    ///
    /// Each word is stored as by [`Platform::pt_store64`], in increasing address order; the run
    /// as a whole is not atomic. A run that crosses a 4 KiB page is a caller bug (checked in
    /// debug builds). The default loops over `pt_store64`.
    fn pt_store_run64(&self, pa: PhysAddr, vals: &[u64]) {
        debug_assert_run_in_page(pa, vals.len());
        for (i, &v) in vals.iter().enumerate() {
            self.pt_store64(pa + 8 * i as u64, v);
        }
    }
    /// Exchanges consecutive words: each `vals[i]` is stored and replaced by the old value.
    ///
    /// Each word is exchanged atomically as by [`Platform::pt_swap64`], in increasing address
    /// order; the run as a whole is not atomic. Same page rule as
    /// [`Platform::pt_store_run64`]. The default loops over `pt_swap64`.
    fn pt_swap_run64(&self, pa: PhysAddr, vals: &mut [u64]) {
        debug_assert_run_in_page(pa, vals.len());
        for (i, v) in vals.iter_mut().enumerate() {
            *v = self.pt_swap64(pa + 8 * i as u64, *v);
        }
    }
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

    /// Translate `va` for a supervisor access of kind `access` by the current CPU, through its
    /// MMU exactly as a kernel dereferencing a pointer would: TLB, page tables, faults to the
    /// fault handler. The `kernel_*` methods below are built on it; on real hardware they would
    /// be overridden by plain pointer accesses.
    fn kernel_translate(&self, va: VirtAddr, access: AccessKind) -> Result<PhysAddr, Fault>;

    /// Zero `len` bytes of kernel virtual memory (through the current CPU's translations).
    fn kernel_zero(&self, va: VirtAddr, len: u64) -> Result<(), Fault> {
        for_each_page(va, len, |va, _, n| {
            let pa = self.kernel_translate(va, AccessKind::Write)?;
            self.phys_zero(pa, n);
            Ok(())
        })
    }

    /// Copy `len` bytes between kernel virtual addresses.
    fn kernel_copy(&self, src: VirtAddr, dst: VirtAddr, len: u64) -> Result<(), Fault> {
        // Page by page of the destination, split again where the source crosses a page.
        for_each_page(dst, len, |d, off, n| {
            for_each_page(VirtAddr::new(src.as_u64() + off), n, |s, off2, m| {
                let spa = self.kernel_translate(s, AccessKind::Read)?;
                let dpa =
                    self.kernel_translate(VirtAddr::new(d.as_u64() + off2), AccessKind::Write)?;
                self.phys_copy(spa, dpa, m);
                Ok(())
            })
        })
    }

    /// Read kernel virtual memory.
    fn kernel_read(&self, va: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        for_each_page(va, buf.len() as u64, |va, off, n| {
            let pa = self.kernel_translate(va, AccessKind::Read)?;
            self.phys_read(pa, &mut buf[off as usize..(off + n) as usize]);
            Ok(())
        })
    }

    /// Write kernel virtual memory.
    fn kernel_write(&self, va: VirtAddr, buf: &[u8]) -> Result<(), Fault> {
        for_each_page(va, buf.len() as u64, |va, off, n| {
            let pa = self.kernel_translate(va, AccessKind::Write)?;
            self.phys_write(pa, &buf[off as usize..(off + n) as usize]);
            Ok(())
        })
    }

    /// Debug annotation: the caller begins changing the translations of `[start, end)`.
    /// Until the matching [`Platform::pt_update_end`], a stale translation in that range is
    /// expected and not a violation. No-op on real hardware.
    fn pt_update_begin(&self, _start: VirtAddr, _end: VirtAddr) {}
    /// Debug annotation: the change begun by [`Platform::pt_update_begin`] is complete, its
    /// invalidations included.
    fn pt_update_end(&self) {}

    /// Debug annotation: the current CPU took one of vmsys's spin locks (every lock taken
    /// through [`lock_interruptible`]: pmap, PV list, PV pool, ...). Paired with
    /// [`Platform::lock_released`]; a platform may count the depth to check what happens inside
    /// critical sections (the simulator's allocation test does). No-op on real hardware.
    #[inline]
    fn lock_acquired(&self) {}
    /// Debug annotation: the lock announced by [`Platform::lock_acquired`] was released.
    #[inline]
    fn lock_released(&self) {}
}

/// Acquire `m`, taking this CPU's interrupts while spinning. Any lock that may be held while
/// its holder waits for another CPU (a TLB shootdown waits for every target to acknowledge)
/// must be taken this way, or a CPU spinning on it never acknowledges and both wait forever.
pub fn lock_interruptible<'a, T, P: Platform + ?Sized>(
    m: &'a spin::Mutex<T>,
    plat: &'a P,
) -> SpinGuard<'a, T, P> {
    loop {
        if let Some(g) = m.try_lock() {
            plat.lock_acquired();
            return SpinGuard { g, plat };
        }
        plat.interrupt_point();
        core::hint::spin_loop();
    }
}

/// A spin lock held through [`lock_interruptible`]: the lock's guard, which tells the platform
/// when it is released ([`Platform::lock_released`]).
pub struct SpinGuard<'a, T, P: Platform + ?Sized> {
    g: spin::MutexGuard<'a, T>,
    plat: &'a P,
}

impl<T, P: Platform + ?Sized> core::ops::Deref for SpinGuard<'_, T, P> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.g
    }
}

impl<T, P: Platform + ?Sized> core::ops::DerefMut for SpinGuard<'_, T, P> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.g
    }
}

impl<T, P: Platform + ?Sized> Drop for SpinGuard<'_, T, P> {
    #[inline]
    fn drop(&mut self) {
        // Announced while the lock is still held (the guard's field drops after this body):
        // nothing the holder does is outside the bracket.
        self.plat.lock_released();
    }
}

/// Call `f(va, offset, len)` for each piece of `[va, va + len)` that lies inside one 4 KiB page.
fn for_each_page(
    va: VirtAddr,
    len: u64,
    mut f: impl FnMut(VirtAddr, u64, u64) -> Result<(), Fault>,
) -> Result<(), Fault> {
    let mut off = 0;
    while off < len {
        let a = va.as_u64() + off;
        let n = (crate::addr::PAGE_SIZE - (a & (crate::addr::PAGE_SIZE - 1))).min(len - off);
        f(VirtAddr::new(a), off, n)?;
        off += n;
    }
    Ok(())
}

/// Debug check of the precondition of the `pt_*_run64` methods: `words` 8-byte words from `pa`
/// are 8-byte aligned and lie within one 4 KiB page.
#[inline]
#[track_caller]
pub fn debug_assert_run_in_page(pa: PhysAddr, words: usize) {
    debug_assert!(
        pa.is_aligned(8) && words <= 512 && pa.offset_in(PAGE_SIZE) + 8 * words as u64 <= PAGE_SIZE,
        "page-table run of {words} words at {pa} is unaligned or crosses a 4 KiB page"
    );
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

    use core::sync::atomic::Ordering;

    /// Bit offset of the 4-byte half of its 8-byte word that `pa` names (little-endian).
    fn half_shift(pa: PhysAddr) -> u64 {
        (pa.as_u64() & 4) * 8
    }

    /// A platform with one page of words and nothing else, to exercise the default methods.
    struct OnePage {
        words: [core::sync::atomic::AtomicU64; 512],
        stores: core::sync::atomic::AtomicU32,
    }

    impl OnePage {
        fn word(&self, pa: PhysAddr) -> &core::sync::atomic::AtomicU64 {
            &self.words[(pa.as_u64() / 8) as usize]
        }
    }

    impl Platform for OnePage {
        fn format(&self) -> FormatId {
            FormatId::Amd64
        }
        fn cpu_count(&self) -> u32 {
            1
        }
        fn current_cpu(&self) -> CpuId {
            0
        }
        fn phys_segments(&self) -> &[PhysSegment] {
            &[]
        }
        fn direct_map_limit(&self) -> PhysAddr {
            PhysAddr::new(PAGE_SIZE)
        }
        fn pt_load64(&self, pa: PhysAddr) -> u64 {
            self.word(pa).load(core::sync::atomic::Ordering::Acquire)
        }
        fn pt_store64(&self, pa: PhysAddr, val: u64) {
            self.stores
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            self.word(pa)
                .store(val, core::sync::atomic::Ordering::Release)
        }
        fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64 {
            self.word(pa)
                .swap(val, core::sync::atomic::Ordering::AcqRel)
        }
        fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64> {
            self.word(pa)
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
        }
        fn pt_load32(&self, pa: PhysAddr) -> u32 {
            (self.pt_load64(PhysAddr::new(pa.as_u64() & !7)) >> half_shift(pa)) as u32
        }
        fn pt_store32(&self, pa: PhysAddr, val: u32) {
            self.pt_swap32(pa, val);
        }
        fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32 {
            let sh = half_shift(pa);
            let w = self.word(PhysAddr::new(pa.as_u64() & !7));
            let old = w
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v & !(0xffff_ffff << sh) | (val as u64) << sh)
                })
                .expect("the update always succeeds");
            (old >> sh) as u32
        }
        fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32> {
            let sh = half_shift(pa);
            let w = self.word(PhysAddr::new(pa.as_u64() & !7));
            w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                ((v >> sh) as u32 == old).then(|| v & !(0xffff_ffff << sh) | (new as u64) << sh)
            })
            .map(|v| (v >> sh) as u32)
            .map_err(|v| (v >> sh) as u32)
        }
        fn phys_zero(&self, pa: PhysAddr, len: u64) {
            self.phys_write(pa, &alloc::vec![0u8; len as usize]);
        }
        fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64) {
            let mut buf = alloc::vec![0u8; len as usize];
            self.phys_read(src, &mut buf);
            self.phys_write(dst, &buf);
        }
        fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]) {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = pa.as_u64() + i as u64;
                *b = (self.word(PhysAddr::new(a & !7)).load(Ordering::Acquire) >> ((a & 7) * 8))
                    as u8;
            }
        }
        fn phys_write(&self, pa: PhysAddr, buf: &[u8]) {
            for (i, &b) in buf.iter().enumerate() {
                let a = pa.as_u64() + i as u64;
                let sh = (a & 7) * 8;
                self.word(PhysAddr::new(a & !7))
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                        Some(v & !(0xff << sh) | (b as u64) << sh)
                    })
                    .expect("the update always succeeds");
            }
        }
        fn load_root(&self, _: RootLoad) {}
        fn load_kernel_root(&self, _: PhysAddr) -> Result<(), PlatformError> {
            Err(PlatformError::Unsupported)
        }
        fn tlb_invalidate_local(&self, _: TlbInval) {}
        fn tlb_invalidate_broadcast(&self, _: TlbInval) -> Result<(), PlatformError> {
            Err(PlatformError::Unsupported)
        }
        fn set_ipi_handler(&self, _: u8, _: IpiHandler) {}
        fn send_ipi(&self, _: &CpuSet, _: IpiMessage, _: bool) -> Result<(), PlatformError> {
            Err(PlatformError::Unsupported)
        }
        fn interrupt_point(&self) {}
        fn set_fault_handler(&self, _: FaultHandler) {}
        /// Kernel VA `0x1000..0x2000` maps the page; nothing else is mapped.
        fn kernel_translate(&self, va: VirtAddr, access: AccessKind) -> Result<PhysAddr, Fault> {
            if (0x1000..0x2000).contains(&va.as_u64()) {
                Ok(PhysAddr::new(va.as_u64() - 0x1000))
            } else {
                Err(Fault {
                    cpu: 0,
                    va,
                    access,
                    user: false,
                    reason: FaultReason::NotPresent { level: 0 },
                })
            }
        }
    }

    #[test]
    fn kernel_accesses_go_through_the_translation_page_by_page() {
        let p = one_page();
        let data: Vec<u8> = (1..=20).collect();
        p.kernel_write(VirtAddr::new(0x1010), &data).unwrap();
        let mut back = [0u8; 20];
        p.phys_read(PhysAddr::new(0x10), &mut back);
        assert_eq!(back[..], data[..]);
        p.kernel_copy(VirtAddr::new(0x1010), VirtAddr::new(0x1ff0), 20)
            .unwrap_err();
        p.kernel_copy(VirtAddr::new(0x1010), VirtAddr::new(0x1100), 20)
            .unwrap();
        let mut back = [0u8; 20];
        p.kernel_read(VirtAddr::new(0x1100), &mut back).unwrap();
        assert_eq!(back[..], data[..]);
        p.kernel_zero(VirtAddr::new(0x1100), 10).unwrap();
        p.kernel_read(VirtAddr::new(0x1100), &mut back).unwrap();
        assert_eq!(back[..10], [0; 10]);
        assert_eq!(back[10..], data[10..]);
        let err = p.kernel_write(VirtAddr::new(0x1ff8), &data).unwrap_err();
        assert_eq!(
            err.va,
            VirtAddr::new(0x2000),
            "the fault names the unmapped page"
        );
        assert_eq!(err.access, AccessKind::Write);
    }

    fn one_page() -> OnePage {
        OnePage {
            words: core::array::from_fn(|_| core::sync::atomic::AtomicU64::new(0)),
            stores: core::sync::atomic::AtomicU32::new(0),
        }
    }

    #[test]
    fn one_page_word_views_agree() {
        let p = one_page();
        p.pt_store64(PhysAddr::new(16), 0x1122_3344_5566_7788);
        assert_eq!(p.pt_load32(PhysAddr::new(16)), 0x5566_7788);
        assert_eq!(p.pt_load32(PhysAddr::new(20)), 0x1122_3344);
        assert_eq!(p.pt_cas32(PhysAddr::new(20), 1, 2), Err(0x1122_3344));
        assert_eq!(
            p.pt_cas32(PhysAddr::new(20), 0x1122_3344, 9),
            Ok(0x1122_3344)
        );
        assert_eq!(p.pt_load64(PhysAddr::new(16)), 0x0000_0009_5566_7788);
        let mut b = [0u8; 3];
        p.phys_read(PhysAddr::new(16), &mut b);
        assert_eq!(b, [0x88, 0x77, 0x66]);
        p.phys_copy(PhysAddr::new(16), PhysAddr::new(40), 8);
        assert_eq!(
            p.pt_cas64(PhysAddr::new(40), 0x0000_0009_5566_7788, 0),
            Ok(0x0000_0009_5566_7788)
        );
        p.phys_zero(PhysAddr::new(16), 8);
        assert_eq!(p.pt_load64(PhysAddr::new(16)), 0);
    }

    #[test]
    fn default_run_methods_loop_over_words() {
        let p = one_page();
        let vals: Vec<u64> = (0..512).map(|i| i * 3 + 1).collect();
        p.pt_store_run64(PhysAddr::new(0), &vals);
        assert_eq!(p.stores.load(core::sync::atomic::Ordering::Relaxed), 512);
        assert_eq!(p.pt_load64(PhysAddr::new(8 * 100)), vals[100]);
        let mut out = [0u64; 4];
        p.pt_load_run64(PhysAddr::new(0xfe0), &mut out);
        assert_eq!(out, vals[508..]);
        let mut v = [7, 8];
        p.pt_swap_run64(PhysAddr::new(8), &mut v);
        assert_eq!(v, vals[1..3]);
        p.pt_load_run64(PhysAddr::new(0), &mut out);
        assert_eq!(out, [vals[0], 7, 8, vals[3]]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "crosses a 4 KiB page")]
    fn default_run_across_a_page_is_rejected() {
        one_page().pt_store_run64(PhysAddr::new(0xff8), &[1, 2]);
    }
}
