//! The pmap: the machine-dependent layer that owns page tables.
//!
//! One engine serves every format: levels, entry widths and bits come from
//! [`vmsys_arch::Format`] (precomputed in [`geom`]), never from format names. The split follows
//! the concerns of FreeBSD's `pmap.c` rather than its single file:
//!
//! | file | concern |
//! |---|---|
//! | `geom` | the format table, precomputed for hot paths |
//! | `table` | reading and writing entries; locking with interrupts serviced |
//! | `ptp` | page-table pages: allocation, reference counts, `abort_ptp`, saved pages |
//! | `tlb` | flush batches, shootdown, PCID/ASID assignment, activation |
//! | `pv` | PV entries (the reverse map) and their pool |
//! | `enter` | `enter`, `enter_quick`, the range map cursor |
//! | `remove` | `remove`, `remove_all`, `protect`, `unwire` |
//! | `superpage` | promotion and demotion |
//! | `kernel` | the kernel pmap: bootstrap, `growkernel`, `kenter`, `qenter`, page-table sync |
//! | `query` | `extract`, `is_modified`, `clear_modify`, `ts_referenced`, `remove_write`, ... |
//! | `copy` | `copy` (fork) |
//! | `fault` | faults the tables already resolve: software access flag, a change in flight |
//! | `quick` | per-CPU quick mappings |
//! | `audit` | the full invariant audit that tests call |
//!
//! Lifecycle (PT-7): a pmap is live from `create` until `destroy`, which marks it destroyed
//! under its lock before freeing anything; every later operation on any handle to it is
//! `PmapError::Destroyed` (queries answer `None`) and touches no frame. A pmap is usable only
//! with the `PmapSystem` that created it (`ForeignPmap` otherwise).
//!
//! Addresses (PT-8): the format's layout decides what a pmap translates: its own half, plus
//! the shared kernel half for a user pmap where one root serves both halves. Queries answer
//! `None` outside it and every operation refuses it; kernel-pmap operations that change
//! mappings are confined to the kernel's dynamic range (`kva_range`), never the direct map or
//! the quick-map slots. A range `[sva, eva)` with `eva < sva` is `AddrError::Overflow`; an
//! empty range is a no-op once its start has passed the same checks.
//!
//! Locking: each pmap has a spin lock (held across a whole operation, including its TLB
//! shootdown); PV lists have a lock per frame, always taken after a pmap lock. Every lock is
//! acquired with interrupts serviced while spinning, because the holder may be waiting for this
//! CPU to acknowledge a shootdown.

mod audit;
mod copy;
mod enter;
mod error;
mod fault;
pub mod geom;
mod kernel;
mod ptp;
mod pv;
mod query;
mod quick;
mod remove;
mod superpage;
mod table;
mod tlb;

use alloc::collections::BTreeMap;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vmsys_arch::{CacheMode, FormatId, Prot, Split32};

use crate::addr::{AddrError, PhysAddr, VirtAddr, PAGE_SIZE};
use crate::frames::FrameSource;
use crate::page::PageArray;
use crate::platform::{CpuId, Platform};

pub use audit::{AuditError, AuditReport};
pub use error::PmapError;
pub use geom::Geometry;
pub use kernel::{KptSync, KptSyncCost};
pub use query::Mapping;
pub use quick::QuickPage;
pub use tlb::CpuMask;

use pv::PvPool;
use tlb::{CpuLocal, TagAlloc};

bitflags::bitflags! {
    /// Options of [`PmapSystem::enter`] (FreeBSD's `PMAP_ENTER_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct EnterFlags: u32 {
        /// The mapping is wired (counted, and never removed by page-out).
        const WIRED = 1 << 0;
        /// Do not wait for memory: fail with `ResourceShortage` instead. (This layer never
        /// sleeps; the flag is kept so that callers state their intent, as in FreeBSD.)
        const NOSLEEP = 1 << 1;
        /// Fail if any mapping exists in the range instead of replacing it.
        const NOREPLACE = 1 << 2;
        /// The frame is managed: the mapping gets a PV entry and its A/D bits are tracked.
        const MANAGED = 1 << 3;
        /// The access that caused this entry was a write: create it dirty.
        const DIRTY = 1 << 4;
        /// Never promote this mapping into a superpage (transient mappings).
        const NO_PROMOTE = 1 << 5;
    }
}

/// Configuration of the pmap layer.
#[derive(Clone, Debug)]
pub struct PmapConfig {
    /// 32-bit formats: where the kernel half begins.
    pub split: Split32,
    /// The IPI vector used for TLB shootdowns.
    pub shootdown_vector: u8,
    /// A ranged invalidation of more pages than this becomes a full flush (Linux uses 33).
    pub flush_ceiling: u64,
    /// Automatic promotion of filled page-table pages into superpages.
    pub promote: bool,
    /// Use PCIDs/ASIDs where the format has them.
    pub use_tags: bool,
    /// Limit the number of tags (tests force recycling with a small number).
    pub max_tags: Option<u32>,
    /// The kernel's dynamic virtual address range `[start, end)` (`growkernel` grows from start);
    /// `None`: the format's default.
    pub kva: Option<(u64, u64)>,
    /// Map physical memory below the platform's direct-map limit into a direct map (formats
    /// with room for one: the 64-bit ones).
    pub direct_map: bool,
}

impl Default for PmapConfig {
    fn default() -> Self {
        PmapConfig {
            split: Split32::G3G1,
            shootdown_vector: 0xf2,
            flush_ceiling: 32,
            promote: true,
            use_tags: true,
            max_tags: None,
            kva: None,
            direct_map: true,
        }
    }
}

/// Counters of what the pmap did (monotonic, relaxed).
#[derive(Default, Debug)]
pub struct PmapStats {
    pub promotions: AtomicU64,
    pub promotion_failures: AtomicU64,
    pub demotions: AtomicU64,
    pub demotion_failures: AtomicU64,
    pub shootdowns: AtomicU64,
    pub local_flushes: AtomicU64,
    pub full_flushes: AtomicU64,
    pub ptps_allocated: AtomicU64,
    pub ptps_freed: AtomicU64,
    pub tag_rollovers: AtomicU64,
    /// Faults resolved by setting a software-managed access flag (arm64 without HA).
    pub access_flag_faults: AtomicU64,
    /// Faults that the tables already allowed when the pmap looked (a change in flight).
    pub spurious_faults: AtomicU64,
}

/// A snapshot of [`PmapStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub promotions: u64,
    pub promotion_failures: u64,
    pub demotions: u64,
    pub demotion_failures: u64,
    pub shootdowns: u64,
    pub local_flushes: u64,
    pub full_flushes: u64,
    pub ptps_allocated: u64,
    pub ptps_freed: u64,
    pub tag_rollovers: u64,
    pub access_flag_faults: u64,
    pub spurious_faults: u64,
}

impl PmapStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            promotions: l(&self.promotions),
            promotion_failures: l(&self.promotion_failures),
            demotions: l(&self.demotions),
            demotion_failures: l(&self.demotion_failures),
            shootdowns: l(&self.shootdowns),
            local_flushes: l(&self.local_flushes),
            full_flushes: l(&self.full_flushes),
            ptps_allocated: l(&self.ptps_allocated),
            ptps_freed: l(&self.ptps_freed),
            tag_rollovers: l(&self.tag_rollovers),
            access_flag_faults: l(&self.access_flag_faults),
            spurious_faults: l(&self.spurious_faults),
        }
    }
}

/// Lifecycle states of a pmap (`Pmap::life`).
const LIVE: u8 = 0;
/// `destroy` holds the lock and is checking that no CPU has the pmap loaded; `activate` waits.
const DYING: u8 = 1;
/// Destroyed: its tables are freed; every operation refuses it.
const DEAD: u8 = 2;

/// Tokens that tie a pmap to the `PmapSystem` that created it.
static NEXT_SYSTEM: AtomicU64 = AtomicU64::new(1);

/// An address space's page tables.
pub struct Pmap {
    id: u32,
    kernel: bool,
    /// The token of the `PmapSystem` that created it.
    owner: u64,
    /// `LIVE`, `DYING` or `DEAD`; changed only by `destroy`, under the pmap's lock (SeqCst:
    /// `activate` publishes `active` then reads this; `destroy` writes this then reads
    /// `active`).
    life: AtomicU8,
    /// The root table (TTBR0's table for an arm64 user pmap, TTBR1's for the kernel pmap).
    root: PhysAddr,
    /// CPUs on which this pmap is loaded now.
    active: CpuMask,
    /// CPUs that must flush this pmap's tag before they next load it (they were not
    /// interrupted by a shootdown because the pmap was not active there).
    stale_on: CpuMask,
    /// CPUs that have loaded this pmap's tag since it was assigned.
    tlb_cpus: CpuMask,
    /// `generation << 16 | tag`; 0 = none assigned yet.
    tag: AtomicU64,
    state: spin::Mutex<PmapState>,
}

/// The part of a pmap that its lock protects.
#[derive(Default)]
pub(crate) struct PmapState {
    /// Page-table pages kept for the demotion of the superpage that replaced them, keyed by
    /// (level of the superpage leaf, its virtual address).
    saved: BTreeMap<(u8, u64), PhysAddr>,
    /// Upper-level tables that belong to the pmap but are not reference-counted: PAE's user
    /// page directories, allocated with the pmap because the PDPTEs are latched on a CR3 load.
    fixed_tables: Vec<PhysAddr>,
    /// 4 KiB pages mapped.
    resident: u64,
    /// 4 KiB pages mapped wired.
    wired: u64,
}

impl Pmap {
    /// The pmap's identifier (PV entries name it).
    pub fn id(&self) -> u32 {
        self.id
    }
    /// Whether this is the kernel pmap.
    pub fn is_kernel(&self) -> bool {
        self.kernel
    }
    /// The root table.
    pub fn root(&self) -> PhysAddr {
        self.root
    }
    /// CPUs on which the pmap is active.
    pub fn active_cpus(&self) -> crate::platform::CpuSet {
        self.active.snapshot()
    }
    /// The PCID/ASID currently assigned (0: none).
    pub fn tag(&self) -> u16 {
        (self.tag.load(Ordering::Acquire) & 0xffff) as u16
    }
    /// Whether [`PmapSystem::destroy`] has destroyed this pmap.
    pub fn is_destroyed(&self) -> bool {
        self.life.load(Ordering::SeqCst) == DEAD
    }
    /// 4 KiB pages mapped (a superpage counts as its 4 KiB pages).
    pub fn resident_count(&self) -> u64 {
        self.state.lock().resident
    }
    /// 4 KiB pages mapped wired.
    pub fn wired_count(&self) -> u64 {
        self.state.lock().wired
    }
}

impl core::fmt::Debug for Pmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pmap")
            .field("id", &self.id)
            .field("kernel", &self.kernel)
            .field("root", &self.root)
            .field("destroyed", &self.is_destroyed())
            .finish()
    }
}

/// The machine-dependent VM state of one machine: the kernel pmap, every user pmap, the page
/// array, the PV pool, tags and per-CPU state.
pub struct PmapSystem<P: Platform> {
    plat: Arc<P>,
    geom: Geometry,
    cfg: PmapConfig,
    frames: Arc<dyn FrameSource>,
    pages: Arc<PageArray>,
    pv: PvPool,
    kernel: Arc<Pmap>,
    /// Every live pmap by id (FreeBSD's `allpmaps`, used by i386 page-directory propagation and
    /// by PV-driven operations to find the pmap of an entry).
    registry: spin::Mutex<Vec<Option<Weak<Pmap>>>>,
    tags: spin::Mutex<TagAlloc>,
    cpus: Vec<CpuLocal>,
    /// The kernel's page-table layout (sync strategy, KVA bounds, quick-map slots).
    kern: kernel::KernelLayout,
    /// How far `growkernel` has provided kernel page-table pages.
    kernel_end: AtomicU64,
    /// arm64: an empty TTBR0 table loaded while the kernel pmap is active.
    empty_user_root: Option<PhysAddr>,
    stats: PmapStats,
    /// This system's token (`Pmap::owner`).
    token: u64,
    /// What the MMU translates, from the format's layout.
    space: VaSpace,
}

/// The translatable address ranges, from the format's layout (canonical rule and halves),
/// precomputed so that `extract` pays two compares. All bounds inclusive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VaSpace {
    pub user: (u64, u64),
    pub kernel: (u64, u64),
    /// One root translates both halves (not arm64's TTBR pair): a user pmap translates the
    /// kernel half too, through the kernel's root entries.
    pub shared_root: bool,
    /// The kernel's dynamic range, where kernel-pmap operations may change mappings.
    pub kva: (u64, u64),
}

impl VaSpace {
    #[inline]
    fn within(r: (u64, u64), va: u64) -> bool {
        va >= r.0 && va <= r.1
    }
}

impl<P: Platform> PmapSystem<P> {
    /// The platform.
    pub fn platform(&self) -> &Arc<P> {
        &self.plat
    }
    /// The format's precomputed geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }
    /// The configuration.
    pub fn config(&self) -> &PmapConfig {
        &self.cfg
    }
    /// The page array.
    pub fn pages(&self) -> &PageArray {
        &self.pages
    }
    /// The frame source.
    pub fn frames(&self) -> &Arc<dyn FrameSource> {
        &self.frames
    }
    /// The kernel pmap.
    pub fn kernel_pmap(&self) -> &Arc<Pmap> {
        &self.kernel
    }
    /// The format.
    pub fn format(&self) -> FormatId {
        self.geom.id
    }
    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
    /// PV entries in use.
    pub fn pv_in_use(&self) -> u64 {
        self.pv.in_use()
    }

    /// Page sizes this format maps, by `psind`.
    pub fn page_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.geom.npsind).map(|i| self.geom.levels[self.geom.psind_level[i]].span)
    }

    /// The `psind` of a page size in bytes.
    pub fn psind_of(&self, size: u64) -> Option<usize> {
        self.page_sizes().position(|s| s == size)
    }

    /// Whether `pmap` is this system's and not destroyed (lock-free; authoritative only under
    /// the pmap's lock, see [`PmapSystem::lock_live`]).
    pub(crate) fn usable(&self, pmap: &Pmap) -> Result<(), PmapError> {
        if pmap.owner != self.token {
            return Err(PmapError::ForeignPmap);
        }
        if pmap.life.load(Ordering::SeqCst) == DEAD {
            return Err(PmapError::Destroyed);
        }
        Ok(())
    }

    /// Take `pmap`'s lock, refusing a pmap destroyed meanwhile: `destroy` marks it under this
    /// lock before freeing anything, so a holder that saw it live works on live tables.
    pub(crate) fn lock_live<'a>(
        &'a self,
        pmap: &'a Pmap,
    ) -> Result<crate::platform::SpinGuard<'a, PmapState, P>, PmapError> {
        let st = table::lock(&pmap.state, &*self.plat);
        if pmap.life.load(Ordering::SeqCst) == DEAD {
            return Err(PmapError::Destroyed);
        }
        Ok(st)
    }

    /// Whether the MMU translates `va` through `pmap` (PT-8): canonical, in the pmap's half,
    /// or in the shared kernel half for a user pmap of a one-root format. Index masking alone
    /// would turn anything else into the translation of an alias.
    #[inline]
    pub(crate) fn translates(&self, pmap: &Pmap, va: u64) -> bool {
        let s = &self.space;
        if pmap.owner != self.token {
            return false;
        }
        if pmap.kernel {
            VaSpace::within(s.kernel, va)
        } else {
            VaSpace::within(s.user, va) || (s.shared_root && VaSpace::within(s.kernel, va))
        }
    }

    fn lookup_pmap(&self, id: u32) -> Option<Arc<Pmap>> {
        if id == self.kernel.id {
            return Some(self.kernel.clone());
        }
        let reg = table::lock(&self.registry, &*self.plat);
        reg.get(id as usize)?.as_ref()?.upgrade()
    }

    /// Checks that `[va, va+len)` is a valid, aligned range that `pmap`'s operations may
    /// change: canonical, in the pmap's half, and for the kernel pmap inside the kernel's
    /// dynamic range (never the direct map or the quick-map slots). `len` 0 is an empty range:
    /// only its start is checked.
    fn check_range(
        &self,
        pmap: &Pmap,
        va: VirtAddr,
        len: u64,
        align: u64,
    ) -> Result<(), PmapError> {
        va.require_aligned(align)?;
        if !len.is_multiple_of(align) {
            return Err(PmapError::Addr(AddrError::Misaligned {
                addr: va.as_u64().wrapping_add(len),
                align,
            }));
        }
        let fmt = self.geom.fmt;
        let s = &self.space;
        let (half, allowed) = if pmap.kernel {
            (s.kernel, s.kva)
        } else {
            (s.user, s.user)
        };
        let check = |a: u64| -> Result<(), PmapError> {
            if !fmt.is_canonical(a) {
                return Err(PmapError::Addr(AddrError::OutOfRange {
                    addr: a,
                    limit: half.1,
                }));
            }
            if !VaSpace::within(half, a) {
                return Err(PmapError::WrongHalf(va));
            }
            if !VaSpace::within(allowed, a) {
                return Err(PmapError::OutsideKva(VirtAddr::new(a)));
            }
            Ok(())
        };
        check(va.as_u64())?;
        if len == 0 {
            return Ok(());
        }
        let last = va
            .as_u64()
            .checked_add(len - 1)
            .ok_or(PmapError::Addr(AddrError::Overflow))?;
        check(last)
    }

    /// The length of `[sva, eva)`: `eva < sva` (a wrapped `sva + len`) is `Overflow`.
    fn range_len(sva: VirtAddr, eva: VirtAddr) -> Result<u64, PmapError> {
        eva.as_u64()
            .checked_sub(sva.as_u64())
            .ok_or(PmapError::Addr(AddrError::Overflow))
    }

    /// Checks a frame address for a mapping of `size` bytes, aligned to `size`.
    fn check_pa(&self, pa: PhysAddr, size: u64, managed: bool) -> Result<(), PmapError> {
        self.check_frames(pa, size, size, managed)
    }

    /// Checks `[pa, pa + size)` for a mapping: aligned to `align`, below the format's physical
    /// limit, and for a managed mapping every frame with a page record.
    fn check_frames(
        &self,
        pa: PhysAddr,
        size: u64,
        align: u64,
        managed: bool,
    ) -> Result<(), PmapError> {
        pa.require_aligned(align)?;
        let limit = 1u64 << self.geom.fmt.pa_bits;
        if pa.as_u64().checked_add(size).is_none_or(|e| e > limit) {
            return Err(PmapError::Addr(AddrError::OutOfRange {
                addr: pa.as_u64(),
                limit,
            }));
        }
        if managed && size > 0 {
            // Every frame needs a record: records are in address order, so the first and last
            // frames' indices are `size / PAGE_SIZE - 1` apart exactly when no segment gap lies
            // between them.
            let first = self.pages.index_of(pa);
            let last = self
                .pages
                .index_of(PhysAddr::new(pa.as_u64() + size - PAGE_SIZE));
            match (first, last) {
                (Some(a), Some(b)) if b.checked_sub(a) == Some((size / PAGE_SIZE - 1) as usize) => {
                }
                _ => return Err(PmapError::NotManageable),
            }
        }
        Ok(())
    }

    /// The protection a user or kernel leaf gets for `prot`.
    fn leaf_prot(&self, pmap: &Pmap, prot: Prot) -> Prot {
        if pmap.kernel {
            prot - Prot::USER
        } else {
            prot | Prot::USER
        }
    }
}

/// The cache mode of ordinary memory.
pub const WB: CacheMode = CacheMode::WriteBack;

/// The CPU the caller runs on, as an index.
fn cpu_index<P: Platform>(plat: &P) -> usize {
    plat.current_cpu() as usize
}

#[allow(dead_code)]
fn _assert_send_sync<P: Platform>() {
    fn is<T: Send + Sync>() {}
    is::<PmapSystem<P>>();
    is::<Pmap>();
    let _: CpuId = 0;
}
