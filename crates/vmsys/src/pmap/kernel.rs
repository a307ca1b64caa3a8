//! The kernel pmap: bootstrap, user pmap creation, `growkernel`, kernel page-table
//! synchronisation, `kenter`/`kremove`, `qenter`/`qremove`.
//!
//! Kernel page-table synchronisation (seed 004) is chosen from the format's shape:
//! - separate roots (arm64): every address space shares the kernel's TTBR1 table: nothing to
//!   synchronise;
//! - a root whose kernel entries point to tables of tables (amd64, LA57, PAE): the kernel's
//!   root entries over its address ranges are allocated at bootstrap and copied into each new
//!   pmap; below them the tables are shared, so `growkernel` never touches a root again;
//! - a root whose entries point straight at last-level tables (i386 2-level): preallocating
//!   every kernel table would cost 1 MiB per GiB of kernel space (Linux's arithmetic), so
//!   `growkernel` propagates each new root entry to every pmap, under the pmap-list lock that
//!   creation also takes.
//!
//! Invariant KPT-1: every pmap translates every kernel address exactly as the kernel pmap does.
//!
//! The kernel-entry operations (`kenter`, `kremove`, `qenter`, `qremove`, the local forms) act
//! only inside the kernel's dynamic range, on unmanaged 4 KiB entries, and check the whole
//! range before writing any of it: bad input is an error in every build that changes nothing
//! (KE-1, KE-2 of docs/INVARIANTS.md).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vmsys_arch::{CacheMode, Halves, Prot, PteFlags};

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::frames::FrameSource;
use crate::page::PageArray;
use crate::platform::Platform;

use super::remove::Found;
use super::tlb::{self, CpuLocal, CpuMask, Flush, TagAlloc};
use super::{table, Pmap, PmapConfig, PmapError, PmapState, PmapSystem};

/// How kernel page tables are kept identical across address spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KptSync {
    /// One kernel root shared by all (arm64 TTBR1).
    SharedRoot,
    /// Kernel root entries preallocated at bootstrap and copied into each new pmap.
    PreallocTop,
    /// New kernel root entries copied into every pmap when `growkernel` makes them.
    Propagate,
}

/// What a synchronisation strategy costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KptSyncCost {
    pub strategy: KptSync,
    /// Kernel tables allocated at bootstrap so that roots never change afterwards.
    pub preallocated_tables: u64,
    /// Root entries copied into each new pmap.
    pub entries_copied_per_pmap: u64,
    /// Extra tables each user pmap owns because of the format (PAE user page directories).
    pub fixed_tables_per_pmap: u64,
    /// Stores made by `growkernel` into other pmaps so far (propagation).
    pub propagated_stores: u64,
    /// Kernel page-table pages allocated so far (all strategies).
    pub kernel_ptps: u64,
}

/// Where things are in the kernel half.
#[derive(Debug)]
pub(crate) struct KernelLayout {
    pub sync: KptSync,
    pub kva_start: u64,
    /// First quick-map slot (2 per CPU).
    pub quick_base: u64,
    /// Direct map: base VA and size.
    pub dmap: Option<(u64, u64)>,
    /// Root indices preallocated (PreallocTop).
    pub prealloc: Vec<usize>,
    /// Number of upper levels each user pmap allocates with its root (PAE: 1).
    pub fixed_depth: usize,
    pub propagated: AtomicU64,
    pub kernel_ptps: AtomicU64,
}

/// Default kernel ranges per format shape.
fn default_ranges(g: &super::Geometry, split: vmsys_arch::Split32) -> ((u64, u64), Option<u64>) {
    match g.fmt.halves {
        Halves::UpperHalf { va_bits } => {
            // The last 2 TiB for kernel VA (FreeBSD's KVA lives at the top); the direct map at
            // the start of the kernel half.
            let kbase = u64::MAX << (va_bits - 1);
            (
                (0xffff_fe00_0000_0000, u64::MAX - PAGE_SIZE + 1),
                Some(kbase),
            )
        }
        Halves::TtbrPair { va_bits } => {
            let kbase = u64::MAX << va_bits;
            // 512 GiB of KVA at the bottom of TTBR1's half; the direct map halfway up.
            (
                (kbase, kbase + (1 << 39)),
                Some(kbase + (1u64 << (va_bits - 1))),
            )
        }
        Halves::Split32 => ((split.kernel_base(), 0xffff_f000), None),
    }
}

impl<P: Platform + 'static> PmapSystem<P> {
    /// Build the kernel pmap and the machine-dependent state (FreeBSD `pmap_bootstrap` +
    /// `pmap_init`): the kernel root, the preallocated kernel root entries, the direct map, the
    /// quick-map slots, and the shootdown handler. Call [`PmapSystem::init_cpu`] on each CPU
    /// afterwards.
    pub fn bootstrap(
        plat: Arc<P>,
        frames: Arc<dyn FrameSource>,
        cfg: PmapConfig,
    ) -> Result<Arc<Self>, PmapError> {
        let pages = Arc::new(PageArray::new(plat.phys_segments()));
        Self::bootstrap_with_pages(plat, frames, pages, cfg)
    }

    /// [`PmapSystem::bootstrap`] over a page array shared with the physical allocator (one
    /// record per frame for the whole system, as FreeBSD's `vm_page_array`).
    pub fn bootstrap_with_pages(
        plat: Arc<P>,
        frames: Arc<dyn FrameSource>,
        pages: Arc<PageArray>,
        cfg: PmapConfig,
    ) -> Result<Arc<Self>, PmapError> {
        let geom = super::Geometry::new(plat.format());
        let ncpu = plat.cpu_count();
        let ((kva_start, kva_end), dmap_base) = match cfg.kva {
            Some(r) => (r, default_ranges(&geom, cfg.split).1),
            None => default_ranges(&geom, cfg.split),
        };
        let layout = geom.fmt.layout(cfg.split);
        if kva_start >= kva_end
            || !layout.kernel.contains(&kva_start)
            || !layout.kernel.contains(&(kva_end - 1))
            || kva_start % PAGE_SIZE != 0
        {
            return Err(PmapError::WrongHalf(VirtAddr::new(kva_start)));
        }
        let sync = match geom.fmt.halves {
            Halves::TtbrPair { .. } => KptSync::SharedRoot,
            _ if geom.nlevels == 2 => KptSync::Propagate,
            _ => KptSync::PreallocTop,
        };
        if kva_end % PAGE_SIZE != 0 {
            return Err(PmapError::BadConfig(
                "the kernel range's end is not page-aligned",
            ));
        }
        // The direct map covers exactly the page-aligned part of `[0, limit)` (PT-9).
        let dmap = if cfg.direct_map {
            dmap_base.map(|b| (b, plat.direct_map_limit().as_u64() & !(PAGE_SIZE - 1)))
        } else {
            None
        };
        if let Some((b, s)) = dmap {
            let fits = s == 0
                || b.checked_add(s - 1)
                    .is_some_and(|last| layout.kernel.contains(&last));
            if !fits {
                return Err(PmapError::BadConfig(
                    "the direct map does not fit in the kernel half",
                ));
            }
            if s > 0 && b < kva_end && kva_start <= b + (s - 1) {
                return Err(PmapError::BadConfig(
                    "the kernel range overlaps the direct map",
                ));
            }
        }
        let quick_base = (2 * ncpu as u64)
            .checked_mul(PAGE_SIZE)
            .and_then(|q| kva_end.checked_sub(q))
            .filter(|&q| q > kva_start)
            .ok_or(PmapError::BadConfig(
                "the kernel range has no room for the quick-map slots",
            ))?;
        let tag_limit = match geom.fmt.tlb.tag {
            vmsys_arch::TlbTag::None => 1,
            vmsys_arch::TlbTag::Pcid { bits } | vmsys_arch::TlbTag::Asid { bits } => {
                let hw = 1u32 << bits.min(16);
                cfg.max_tags.map_or(hw, |m| m.clamp(2, hw))
            }
        };
        let root_latched = geom.fmt.tlb.root_latched_on_switch;
        let mut prealloc = Vec::new();
        if sync == KptSync::PreallocTop {
            let mut add = |lo: u64, hi: u64| {
                let (a, b) = (geom.index(lo, 0), geom.index(hi - 1, 0));
                for i in a..=b {
                    if !prealloc.contains(&i) {
                        prealloc.push(i);
                    }
                }
            };
            add(kva_start, kva_end);
            if let Some((b, s)) = dmap {
                if s > 0 {
                    add(b, b + s);
                }
            }
        }
        let kern = KernelLayout {
            sync,
            kva_start,
            quick_base,
            dmap,
            prealloc,
            fixed_depth: usize::from(root_latched),
            propagated: AtomicU64::new(0),
            kernel_ptps: AtomicU64::new(0),
        };
        // The kernel root.
        let root = frames.alloc().ok_or(PmapError::ResourceShortage)?;
        let token = super::NEXT_SYSTEM.fetch_add(1, Ordering::Relaxed);
        let kernel = Arc::new(Pmap {
            id: 0,
            kernel: true,
            owner: token,
            life: AtomicU8::new(super::LIVE),
            root,
            active: CpuMask::default(),
            stale_on: CpuMask::default(),
            tlb_cpus: CpuMask::default(),
            tag: Default::default(),
            state: spin::Mutex::new(PmapState::default()),
        });
        let mut sys = PmapSystem {
            plat: plat.clone(),
            geom,
            cfg,
            frames,
            pages,
            pv: super::pv::PvPool::new(),
            kernel,
            registry: spin::Mutex::new(alloc::vec![None]),
            tags: spin::Mutex::new(TagAlloc::new(tag_limit)),
            cpus: (0..ncpu).map(|_| CpuLocal::new()).collect(),
            kern,
            kernel_end: Default::default(),
            empty_user_root: None,
            stats: Default::default(),
            token,
            space: super::VaSpace {
                user: (*layout.user.start(), *layout.user.end()),
                kernel: (*layout.kernel.start(), *layout.kernel.end()),
                shared_root: !layout.separate_roots,
                kva: (kva_start, quick_base - 1),
            },
        };
        sys.tables().zero_table(root.as_u64());
        sys.mark_kernel_ptp(root);
        sys.kern.kernel_ptps.fetch_add(1, Ordering::Relaxed);
        if sync == KptSync::SharedRoot {
            sys.empty_user_root = Some(sys.alloc_kernel_table()?);
        }
        for i in sys.kern.prealloc.clone() {
            let va = sys.index_va(i);
            sys.kernel_table(va, 1)?;
        }
        sys.map_direct()?;
        sys.kernel_end.store(kva_start, Ordering::SeqCst);
        // Page tables for the quick-map slots.
        let mut va = quick_base;
        while va < kva_end {
            sys.kernel_table(va, sys.geom.last())?;
            va += PAGE_SIZE;
        }
        let sys = Arc::new(sys);
        tlb::install_handler(&sys.plat, sys.cfg.shootdown_vector);
        Ok(sys)
    }

    /// Per-CPU start-up: load the kernel half's root (arm64 TTBR1) and activate the kernel pmap
    /// on the calling CPU.
    pub fn init_cpu(&self) {
        if self.kern.sync == KptSync::SharedRoot {
            self.plat
                .load_kernel_root(self.kernel.root)
                .expect("the format has a separate kernel root");
        }
        let k = self.kernel.clone();
        // The kernel pmap is this system's and never destroyed: this cannot fail.
        let loaded = self.activate_inner(&k);
        debug_assert!(loaded);
    }
}

impl<P: Platform> PmapSystem<P> {
    /// The first VA of root entry `i` of the kernel's root (sign-extended where the format is).
    pub(crate) fn index_va(&self, i: usize) -> u64 {
        let g = &self.geom;
        let raw = (i as u64) << g.levels[0].shift;
        match g.fmt.halves {
            Halves::UpperHalf { va_bits } => {
                let sh = 64 - va_bits;
                (((raw << sh) as i64) >> sh) as u64
            }
            Halves::TtbrPair { va_bits } => raw | (u64::MAX << va_bits),
            Halves::Split32 => raw,
        }
    }

    fn mark_kernel_ptp(&self, pa: PhysAddr) {
        let meta = self.pages.meta(pa);
        meta.set_flags(crate::page::page_flags::KERNEL_PTP);
        meta.ref_count.store(0, Ordering::Relaxed);
    }

    fn alloc_kernel_table(&self) -> Result<PhysAddr, PmapError> {
        let p = self.alloc_ptp(true)?;
        self.kern.kernel_ptps.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    /// The kernel table at `level` for `va`, allocating missing ones (bootstrap and
    /// `growkernel` only). New root entries are propagated where the format needs it.
    fn kernel_table(&self, va: u64, level: usize) -> Result<u64, PmapError> {
        let g = &self.geom;
        let mut table = self.kernel.root.as_u64();
        for lvl in 0..level {
            let slot = g.slot(table, g.index(va, lvl));
            let raw = self.tables().load(slot);
            if g.is_table(raw, lvl) {
                table = g.table_pa(raw, lvl);
                continue;
            }
            if g.is_leaf(raw, lvl) {
                return Err(PmapError::ExistingSuperpage(VirtAddr::new(va)));
            }
            let new = self.alloc_kernel_table()?;
            let e = self
                .geom
                .fmt
                .make_table(new.as_u64(), lvl)
                .expect("a page-table page is encodable");
            self.tables().store(slot, e);
            if lvl == 0 && self.kern.sync == KptSync::Propagate {
                self.propagate_root_entry(self.geom.index(va, 0), e);
            }
            table = new.as_u64();
        }
        Ok(table)
    }

    /// Copy kernel root entry `idx` into every user pmap (i386 2-level).
    pub(crate) fn propagate_root_entry(&self, idx: usize, val: u64) {
        let reg = table::lock(&self.registry, &*self.plat);
        let mut n = 0;
        for p in reg.iter().flatten().filter_map(|w| w.upgrade()) {
            self.tables()
                .store(self.geom.slot(p.root.as_u64(), idx), val);
            n += 1;
        }
        self.kern.propagated.fetch_add(n, Ordering::Relaxed);
    }

    /// Map the direct map at bootstrap (PT-9): exactly `[0, size)`, each piece with the largest
    /// leaf that lies wholly inside it and is aligned in both address spaces (1 GiB, then
    /// 2 MiB, then 4 KiB where the format has them), so that nothing at or above the limit
    /// translates. The tables below the top leaves are kernel page-table pages like any other
    /// (never freed, counted by the audit).
    fn map_direct(&self) -> Result<(), PmapError> {
        let Some((base, size)) = self.kern.dmap else {
            return Ok(());
        };
        let g = &self.geom;
        let mut off = 0;
        while off < size {
            let va = base + off;
            let level = (0..g.npsind)
                .rev()
                .map(|i| g.psind_level[i])
                .find(|&l| {
                    let span = g.levels[l].span;
                    va % span == 0 && off % span == 0 && size - off >= span
                })
                .expect("a page-aligned remainder fits a 4 KiB leaf");
            let leaf = g
                .fmt
                .make_leaf(
                    off,
                    level,
                    Prot::WRITE,
                    PteFlags::GLOBAL | PteFlags::ACCESSED | PteFlags::DIRTY,
                    CacheMode::WriteBack,
                )
                .map_err(|_| PmapError::Unsupported)?;
            let table = self.kernel_table(va, level)?;
            let slot = self.geom.slot(table, self.geom.index(va, level));
            self.tables().store(slot, leaf);
            off += g.levels[level].span;
        }
        Ok(())
    }

    /// Create a user pmap (FreeBSD `pmap_pinit`).
    pub fn create(&self) -> Result<Arc<Pmap>, PmapError> {
        let g = &self.geom;
        let root = self.alloc_ptp(false)?;
        let mut fixed = Vec::new();
        let layout = g.fmt.layout(self.cfg.split);
        if self.kern.fixed_depth > 0 {
            // PAE: the PDPTEs are latched on CR3 loads, so every user page directory is
            // allocated now and the PDPT never changes while the pmap lives.
            for i in 0..layout.kernel_top.start {
                match self.alloc_ptp(false) {
                    Ok(pd) => {
                        let e = g.fmt.make_table(pd.as_u64(), 0).expect("encodable");
                        self.tables().store(g.slot(root.as_u64(), i), e);
                        fixed.push(pd);
                    }
                    Err(e) => {
                        for pd in fixed {
                            self.free_ptp_now(pd);
                        }
                        self.free_ptp_now(root);
                        return Err(e);
                    }
                }
            }
        }
        let mut reg = table::lock(&self.registry, &*self.plat);
        if self.kern.sync != KptSync::SharedRoot {
            // Under the registry lock, so that a concurrent propagation is not missed.
            for i in layout.kernel_top.clone() {
                let e = self.tables().load(g.slot(self.kernel.root.as_u64(), i));
                self.tables().store(g.slot(root.as_u64(), i), e);
            }
        }
        // Reuse the id of a destroyed pmap (slot 0 is the kernel's). A slot whose pmap was
        // dropped without `destroy` keeps its id: its tables and PV entries still name it.
        let id = match reg.iter().skip(1).position(|s| s.is_none()) {
            Some(i) => i + 1,
            None => {
                reg.push(None);
                reg.len() - 1
            }
        };
        let Ok(id32) = u32::try_from(id) else {
            drop(reg);
            for pd in fixed {
                self.free_ptp_now(pd);
            }
            self.free_ptp_now(root);
            return Err(PmapError::ResourceShortage);
        };
        let pmap = Arc::new(Pmap {
            id: id32,
            kernel: false,
            owner: self.token,
            life: AtomicU8::new(super::LIVE),
            root,
            active: CpuMask::default(),
            stale_on: CpuMask::default(),
            tlb_cpus: CpuMask::default(),
            tag: Default::default(),
            state: spin::Mutex::new(PmapState {
                fixed_tables: fixed,
                ..PmapState::default()
            }),
        });
        reg[id] = Some(Arc::downgrade(&pmap));
        Ok(pmap)
    }

    /// Destroy a user pmap (FreeBSD `pmap_release`). The rule (PT-7): it must be a live user
    /// pmap of this system (`KernelPmap`, `ForeignPmap`, `Destroyed` otherwise), with no
    /// mappings (nothing resident, no saved table) and loaded on no CPU (`Busy` otherwise, and
    /// nothing changes). It is marked destroyed under its lock before anything is freed, so
    /// every other handle to it is refused from then on, even after its frames are reused.
    pub fn destroy(&self, pmap: Arc<Pmap>) -> Result<(), PmapError> {
        if pmap.owner != self.token {
            return Err(PmapError::ForeignPmap);
        }
        if pmap.kernel {
            return Err(PmapError::KernelPmap);
        }
        let mut st = self.lock_live(&pmap)?;
        if st.resident != 0 || !st.saved.is_empty() {
            return Err(PmapError::Busy);
        }
        // Dekker with `activate`, which publishes its CPU in `active` and then reads `life`:
        // either it sees DYING/DEAD and backs off, or we see it active and refuse.
        pmap.life.store(super::DYING, Ordering::SeqCst);
        if !pmap.active.snapshot().is_empty() {
            pmap.life.store(super::LIVE, Ordering::SeqCst);
            return Err(PmapError::Busy);
        }
        pmap.life.store(super::DEAD, Ordering::SeqCst);
        let mut reg = table::lock(&self.registry, &*self.plat);
        if let Some(slot) = reg.get_mut(pmap.id as usize) {
            if slot
                .as_ref()
                .is_some_and(|w| core::ptr::eq(w.as_ptr(), Arc::as_ptr(&pmap)))
            {
                *slot = None;
            }
        }
        drop(reg);
        // The walk caches of CPUs that ran this pmap may still hold its upper tables (with its
        // tag): flush them there before the tables are reused.
        let mut flush = Flush::new();
        flush.add_full();
        for pd in st.fixed_tables.drain(..) {
            flush.free_after(pd);
        }
        flush.free_after(pmap.root);
        let cpus = pmap.tlb_cpus.snapshot();
        drop(st);
        for c in cpus.iter() {
            pmap.active.insert(c);
        }
        self.complete(&pmap, flush);
        for c in cpus.iter() {
            pmap.active.remove(c);
        }
        Ok(())
    }

    /// Provide kernel page tables up to `end` (FreeBSD `pmap_growkernel`). Kernel tables are
    /// never freed. Returns the new end of the grown kernel range.
    pub fn growkernel(&self, end: VirtAddr) -> Result<VirtAddr, PmapError> {
        let g = &self.geom;
        let chunk = g.levels[g.last() - 1].span;
        let target = end
            .as_u64()
            .checked_add(chunk - 1)
            .ok_or(PmapError::KvaExhausted)?
            & !(chunk - 1);
        let limit = self.kern.quick_base & !(chunk - 1);
        if target > limit || end.as_u64() < self.kern.kva_start {
            return Err(PmapError::KvaExhausted);
        }
        let _k = table::lock(&self.kernel.state, &*self.plat);
        let mut va = self.kernel_end.load(Ordering::SeqCst);
        while va < target {
            if let Err(e) = self.kernel_table(va, g.last()) {
                self.kernel_end.store(va, Ordering::SeqCst);
                return Err(e);
            }
            va += chunk;
        }
        self.kernel_end.store(
            va.max(self.kernel_end.load(Ordering::SeqCst)),
            Ordering::SeqCst,
        );
        Ok(VirtAddr::new(self.kernel_end.load(Ordering::SeqCst)))
    }

    /// How far the kernel range has page tables.
    pub fn kernel_end(&self) -> VirtAddr {
        VirtAddr::new(self.kernel_end.load(Ordering::SeqCst))
    }

    /// The kernel's dynamic range `[start, end)`.
    pub fn kva_range(&self) -> (VirtAddr, VirtAddr) {
        (
            VirtAddr::new(self.kern.kva_start),
            VirtAddr::new(self.kern.quick_base),
        )
    }

    /// The direct map: base VA and the size of physical memory it covers.
    pub fn direct_map(&self) -> Option<(VirtAddr, u64)> {
        self.kern.dmap.map(|(b, s)| (VirtAddr::new(b), s))
    }

    /// The synchronisation strategy and what it costs.
    pub fn kpt_sync_cost(&self) -> KptSyncCost {
        let g = &self.geom;
        let layout = g.fmt.layout(self.cfg.split);
        KptSyncCost {
            strategy: self.kern.sync,
            preallocated_tables: self.kern.prealloc.len() as u64,
            entries_copied_per_pmap: match self.kern.sync {
                KptSync::SharedRoot => 0,
                _ => layout.kernel_top.len() as u64,
            },
            fixed_tables_per_pmap: if self.kern.fixed_depth > 0 {
                layout.kernel_top.start as u64
            } else {
                0
            },
            propagated_stores: self.kern.propagated.load(Ordering::Relaxed),
            kernel_ptps: self.kern.kernel_ptps.load(Ordering::Relaxed),
        }
    }

    fn kernel_entry(
        &self,
        level: usize,
        pa: u64,
        cache: CacheMode,
        no_promote: bool,
    ) -> Result<u64, PmapError> {
        let mut f = PteFlags::GLOBAL | PteFlags::ACCESSED | PteFlags::DIRTY;
        f.set(
            PteFlags::NO_PROMOTE_SW,
            no_promote && self.geom.no_promote_bit != 0,
        );
        self.geom
            .fmt
            .make_leaf(pa, level, Prot::WRITE, f, cache)
            .map_err(|_| PmapError::Unsupported)
    }

    /// Map one kernel page, unmanaged and global (FreeBSD `pmap_kenter_attr`). Refused, with
    /// nothing changed, as [`PmapSystem::qenter`] refuses.
    pub fn kenter(&self, va: VirtAddr, pa: PhysAddr, cache: CacheMode) -> Result<(), PmapError> {
        self.check_kernel_entry(va, 1)?;
        self.check_pa(pa, PAGE_SIZE, false)?;
        let new = self.kernel_entry(self.geom.last(), pa.as_u64(), cache, false)?;
        self.kernel_pages(va.as_u64(), 1, |_| new, Scope::Global)
    }

    /// Unmap one kernel page mapped by `kenter` (FreeBSD `pmap_kremove`). Refused, with nothing
    /// changed, as [`PmapSystem::qremove`] refuses.
    pub fn kremove(&self, va: VirtAddr) -> Result<(), PmapError> {
        self.check_kernel_entry(va, 1)?;
        self.kernel_pages(va.as_u64(), 1, |_| 0, Scope::Global)
    }

    /// Map `pages` at `va`, transient kernel mappings (FreeBSD `pmap_qenter`): unmanaged,
    /// global, never promoted where the format has a no-promote bit; entries that already
    /// hold the same frame are not rewritten, and only replaced valid entries are shot down.
    ///
    /// Refused in every build, with nothing changed (see `check_kernel_entry`): a range that
    /// overflows, is misaligned, lies outside the kernel half or is
    /// non-canonical, meets the direct map, lies outside `kva_range()` (the quick-map slots),
    /// or reaches past `kernel_end()`; a range that meets a superpage (`ExistingSuperpage`:
    /// such a region belongs to `enter`, whose leaves these calls never demote) or a managed
    /// mapping (`ManagedMapping`: FreeBSD's kernel-entry mappings are unmanaged, replacing a
    /// managed one would strand its PV entry).
    pub fn qenter(&self, va: VirtAddr, pages: &[PhysAddr]) -> Result<(), PmapError> {
        self.qenter_scoped(va, pages, Scope::Global)
    }

    /// Unmap `count` pages at `va` mapped by `qenter` (FreeBSD `pmap_qremove`). Refused as
    /// [`PmapSystem::qenter`] refuses, a huge `count` included.
    pub fn qremove(&self, va: VirtAddr, count: usize) -> Result<(), PmapError> {
        self.qremove_scoped(va, count, Scope::Global)
    }

    /// `qenter` for a mapping that only the current CPU will use (the caller is pinned to it:
    /// `map_io_transient` without `can_fault`). Nothing is shot down, so the entries must be
    /// invalid (or already hold the same frame): a valid other entry is refused
    /// (`ExistingMapping`), as another CPU may cache it.
    pub fn qenter_local(&self, va: VirtAddr, pages: &[PhysAddr]) -> Result<(), PmapError> {
        self.qenter_scoped(va, pages, Scope::LocalEnter)
    }

    /// Undo [`PmapSystem::qenter_local`] on the CPU that made it: the entries are cleared (not
    /// left valid in freed KVA, as FreeBSD's `pmap_unmap_io_transient` does) and invalidated on
    /// this CPU only.
    pub fn qremove_local(&self, va: VirtAddr, count: usize) -> Result<(), PmapError> {
        self.qremove_scoped(va, count, Scope::LocalRemove)
    }

    /// The range checks of every kernel-entry operation, before anything is touched: `count`
    /// pages from `va`, without overflow, page-aligned, canonical and in the kernel half
    /// (`check_range`); clear of the direct map (its leaves are never demoted or aliased through
    /// these calls); inside the kernel's dynamic range `kva_range()` (so never the quick-map
    /// slots); below `kernel_end()`, so that every page has its page table and a refusal never
    /// comes after a part of the range was written.
    fn check_kernel_entry(&self, va: VirtAddr, count: usize) -> Result<(), PmapError> {
        let len = u64::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(PAGE_SIZE))
            .ok_or(PmapError::Addr(crate::addr::AddrError::Overflow))?;
        // The direct map first, so that a range meeting it is named as such (check_range would
        // call it merely outside KVA). It is exactly `[base, base + size)` (PT-9).
        let lo = va.as_u64();
        if let (Some((base, size)), Some(last)) = (
            self.kern.dmap.filter(|&(_, s)| s > 0),
            lo.checked_add(len.saturating_sub(1)),
        ) {
            if len > 0 && lo < base.saturating_add(size) && last >= base {
                return Err(PmapError::DirectMap(VirtAddr::new(lo.max(base))));
            }
        }
        self.check_range(&self.kernel, va, len, PAGE_SIZE)?;
        if len == 0 {
            // Nothing to touch; the start passed the same checks as any range (PT-8).
            return Ok(());
        }
        let last = lo + (len - 1);
        if lo < self.kern.kva_start || last >= self.kern.quick_base {
            return Err(PmapError::OutsideKva(va));
        }
        let end = self.kernel_end.load(Ordering::SeqCst);
        if last >= end {
            return Err(PmapError::NoPageTable(VirtAddr::new(lo.max(end))));
        }
        Ok(())
    }

    fn qenter_scoped(
        &self,
        va: VirtAddr,
        pages: &[PhysAddr],
        scope: Scope,
    ) -> Result<(), PmapError> {
        if pages.is_empty() {
            return Ok(());
        }
        self.check_kernel_entry(va, pages.len())?;
        let mut vals = Vec::with_capacity(pages.len());
        for &p in pages {
            self.check_pa(p, PAGE_SIZE, false)?;
            vals.push(self.kernel_entry(
                self.geom.last(),
                p.as_u64(),
                CacheMode::WriteBack,
                true,
            )?);
        }
        self.kernel_pages(va.as_u64(), pages.len(), |i| vals[i], scope)
    }

    fn qremove_scoped(&self, va: VirtAddr, count: usize, scope: Scope) -> Result<(), PmapError> {
        if count == 0 {
            return Ok(());
        }
        self.check_kernel_entry(va, count)?;
        self.kernel_pages(va.as_u64(), count, |_| 0, scope)
    }

    /// Check the `count` entries from `va` (under the kernel pmap's lock) for what a
    /// kernel-entry operation must not touch: a superpage, a managed mapping, and (a local
    /// enter) a valid entry to replace without a shootdown.
    fn kernel_pages_check(
        &self,
        va: u64,
        count: usize,
        val: &impl Fn(usize) -> u64,
        scope: Scope,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let mut i = 0usize;
        while i < count {
            let cva = va + i as u64 * PAGE_SIZE;
            match self.cursor_at(&self.kernel, cva) {
                Found::Hole { .. } => return Err(PmapError::NoPageTable(VirtAddr::new(cva))),
                Found::Super { .. } => {
                    return Err(PmapError::ExistingSuperpage(VirtAddr::new(cva)))
                }
                Found::Run { table, idx } => {
                    let n = g.run_len(idx, (count - i) as u64);
                    table::with_scratch(n, |old| {
                        self.tables().load_run(table, idx, old);
                        for (k, &o) in old.iter().enumerate() {
                            let at = VirtAddr::new(cva + k as u64 * PAGE_SIZE);
                            if o == 0 {
                                continue;
                            }
                            if g.managed(o) {
                                return Err(PmapError::ManagedMapping(at));
                            }
                            if scope == Scope::LocalEnter && o != val(i + k) {
                                return Err(PmapError::ExistingMapping(at));
                            }
                        }
                        Ok(())
                    })?;
                    i += n;
                }
            }
        }
        Ok(())
    }

    /// Write `count` unmanaged kernel entries from `va`: entry `i` becomes `val(i)`, a table at
    /// a time, after [`PmapSystem::kernel_pages_check`] passed under the same lock hold (so a
    /// refusal changes nothing, and no superpage is ever demoted or written through: seed 000).
    ///
    /// With a local scope, the invalidation is this CPU's only: only valid for mappings no other
    /// CPU has used (the replaced entries of a `qenter_local` are invalid, so there is nothing
    /// to invalidate; a `qremove_local` invalidates here).
    fn kernel_pages(
        &self,
        va: u64,
        count: usize,
        val: impl Fn(usize) -> u64,
        scope: Scope,
    ) -> Result<(), PmapError> {
        let g = &self.geom;
        let t = self.tables();
        let last = g.last();
        let k = &self.kernel;
        let mut st = table::lock(&k.state, &*self.plat);
        self.kernel_pages_check(va, count, &val, scope)?;
        let mut flush = Flush::new();
        let end = va + count as u64 * PAGE_SIZE;
        self.plat
            .pt_update_begin(VirtAddr::new(va), VirtAddr::new(end));
        let mut i = 0usize;
        while i < count {
            let cva = va + i as u64 * PAGE_SIZE;
            let Found::Run { table, idx } = self.cursor_at(k, cva) else {
                unreachable!("kernel_pages_check found a page table at {cva:#x} under this lock");
            };
            let n = g.run_len(idx, (count - i) as u64);
            table::with_scratch(2 * n, |buf| {
                let (old, new) = buf.split_at_mut(n);
                t.load_run(table, idx, old);
                let mut valid_replaced = false;
                for k in 0..n {
                    new[k] = val(i + k);
                    if old[k] != 0 && old[k] != new[k] {
                        valid_replaced = true;
                    }
                    if old[k] != 0 && g.is_leaf(old[k], last) {
                        st.resident -= 1;
                    }
                    if new[k] != 0 {
                        st.resident += 1;
                    }
                }
                if valid_replaced && g.fmt.tlb.break_before_make && new.iter().any(|&v| v != 0) {
                    // arm64: valid -> other valid needs the entry invalid and flushed first.
                    t.store_run(table, idx, &table::ZEROS[..n]);
                    flush.add(cva, n as u64 * PAGE_SIZE);
                    self.complete_now(k, &mut flush);
                }
                t.store_run(table, idx, new);
                if valid_replaced {
                    flush.add(cva, n as u64 * PAGE_SIZE);
                }
            });
            i += n;
        }
        match scope {
            Scope::Global => self.complete(k, flush),
            Scope::LocalEnter | Scope::LocalRemove => self.complete_local(flush),
        }
        self.plat.pt_update_end();
        drop(st);
        Ok(())
    }
}

/// Who may have cached the entries a kernel-entry operation changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Any CPU: replaced valid entries are shot down everywhere.
    Global,
    /// `qenter_local`: only invalid entries are replaced (checked), nothing to invalidate.
    LocalEnter,
    /// `qremove_local`: only this CPU used the entries, invalidated here.
    LocalRemove,
}
