//! Kernel memory: the kernel address-space layout and the allocators on it (FreeBSD
//! `vm_kern.c`, `vm_init.c`, and `pmap_map_io_transient`).
//!
//! ```text
//!  KVA: [kva_start ........................................ quick_base) [quick slots]
//!         kernel_arena  (grows the kernel page tables as it imports, superpage steps)
//!           |-- domain arena 0..n  imports superpage-sized, -aligned spans, never releases:
//!           |                      kmem_malloc (wired, mapped with `enter`: may promote)
//!           |-- transient arena    imports superpage-sized, -aligned spans, never releases:
//!           |                      map_io_transient (qenter / qenter_local: never promoted)
//!           `-- kva_alloc          page-granular, straight from kernel_arena (qenter users)
//! ```
//!
//! The seed 000 hazard (a promotion swallowing a transient entry) needs a superpage-sized,
//! -aligned KVA region that holds both `enter` mappings and `qenter`/`kenter` ones. Here the
//! only `enter` user is `kmem_malloc`, whose KVA comes from domain arenas that own whole
//! aligned superpage regions; every other user gets KVA outside them (KVA-1). This holds for
//! every format, whether or not it has a no-promote bit. [`KvaLayout::Unified`] is the
//! layout before that rule (everything straight from `kernel_arena`), kept so that tests can
//! reproduce the hazard.
//!
//! Caller input is checked before anything changes, with checked arithmetic: sizes (zero or
//! beyond the kernel address space: `BadSize`, before any rounding), bounce offsets (`off + len`
//! inside the page: `OutsidePage`), transient pages (`NotAFrame`), and the alignment of a
//! `kernel_arena` import (the grower never rounds its frontier past its limit or 2^64).
//!
//! Lock order: the kmem registry lock is a leaf (nothing is called while it is held except
//! map lookups); arenas, then the pmap, then the reservation system are taken by the calls in
//! that order and never nested the other way.

mod io;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use vmsys_arch::Prot;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::frames::FaultInjector;
use crate::page::ObjectId;
use crate::phys::{ReservError, ReservSystem};
use crate::platform::{Fault, Platform};
use crate::pmap::{EnterFlags, PmapError, PmapSystem};
use crate::vmem::{Arena, ArenaConfig, Policy, VmemError, VmemSource};

pub use io::IoMapping;

/// The object that owns kernel memory pages: its page index is the page's offset from the
/// start of KVA, so that a superpage-aligned KVA range draws from one reservation and the
/// pmap can promote it (FreeBSD's `kernel_object`).
pub const KERNEL_OBJECT: ObjectId = ObjectId(0);

/// Where each kind of kernel VA comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvaLayout {
    /// Ours: `kmem_malloc` from per-domain arenas and transient mappings from the transient
    /// arena, both importing whole superpages; nothing else shares their regions.
    Segregated,
    /// Everything from `kernel_arena` directly (the layout in which seed 000's hazard can
    /// happen). For tests that reproduce it.
    Unified,
}

/// Configuration of the kernel-memory layer.
#[derive(Clone, Copy, Debug)]
pub struct KmemConfig {
    pub layout: KvaLayout,
    /// Guard pages (left unmapped) before and after each transient mapping.
    pub transient_guards: bool,
    /// Sizes up to this many bytes go through the domain arenas' per-CPU quantum caches.
    pub qcache_max: u64,
}

impl Default for KmemConfig {
    fn default() -> Self {
        KmemConfig {
            layout: KvaLayout::Segregated,
            transient_guards: false,
            qcache_max: 8 * PAGE_SIZE,
        }
    }
}

/// Errors of the kernel-memory layer. An operation that returns one has changed nothing
/// (allocations are undone on failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmemError {
    /// Zero bytes, or more than the kernel address space.
    BadSize(u64),
    /// No domain of that number.
    BadDomain(usize),
    /// No kernel virtual address space left (or a failure was injected).
    NoKva(VmemError),
    /// No physical page left.
    NoMemory,
    /// The pmap could not map (a page-table page, ...).
    Pmap(PmapError),
    /// A free of something that is not a live allocation of that kind and size.
    BadFree { va: VirtAddr, size: u64 },
    /// A transient mapping made without `can_fault` unmapped on another CPU than its own.
    WrongCpu { mapped_on: u32, unmapped_on: u32 },
    /// A kernel access faulted (a layer below is broken).
    Fault(Fault),
    /// A bounce copy of `len` bytes at `off` does not lie inside the page (or `off + len`
    /// overflows).
    OutsidePage { off: u64, len: u64 },
    /// Not a page-aligned address of a frame this machine has.
    NotAFrame(PhysAddr),
}

impl fmt::Display for KmemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmemError::BadSize(s) => write!(f, "bad size {s:#x}"),
            KmemError::BadDomain(d) => write!(f, "no memory domain {d}"),
            KmemError::NoKva(e) => write!(f, "kernel address space exhausted: {e}"),
            KmemError::NoMemory => write!(f, "physical memory exhausted"),
            KmemError::Pmap(e) => write!(f, "pmap: {e}"),
            KmemError::BadFree { va, size } => {
                write!(f, "free of {va}+{size:#x}: not a live allocation of that size")
            }
            KmemError::WrongCpu {
                mapped_on,
                unmapped_on,
            } => write!(
                f,
                "a pinned transient mapping made on cpu {mapped_on} was unmapped on cpu {unmapped_on}"
            ),
            KmemError::Fault(flt) => write!(f, "kernel access faulted: {flt}"),
            KmemError::OutsidePage { off, len } => {
                write!(f, "{len:#x} bytes at offset {off:#x} do not lie inside a page")
            }
            KmemError::NotAFrame(pa) => {
                write!(f, "{pa} is not a page-aligned frame of this machine")
            }
        }
    }
}

impl From<PmapError> for KmemError {
    fn from(e: PmapError) -> Self {
        KmemError::Pmap(e)
    }
}

impl From<Fault> for KmemError {
    fn from(e: Fault) -> Self {
        KmemError::Fault(e)
    }
}

/// What is live, by kind, for frees and for the audit.
#[derive(Default)]
struct Registry {
    /// kmem_malloc: va -> (bytes, domain).
    kmem: BTreeMap<u64, (u64, usize)>,
    /// kva_alloc: va -> bytes.
    kva: BTreeMap<u64, u64>,
    /// map_io_transient KVA: base -> (pages including guards, the frames mapped after the
    /// leading guard).
    transient: BTreeMap<u64, (u64, Vec<PhysAddr>)>,
}

/// Counters.
#[derive(Default)]
pub struct KmemStats {
    pub mallocs: AtomicU64,
    pub frees: AtomicU64,
    pub malloc_failures: AtomicU64,
    pub transient_direct: AtomicU64,
    pub transient_local: AtomicU64,
    pub transient_global: AtomicU64,
    pub bounce_copies: AtomicU64,
    pub pages_zeroed: AtomicU64,
}

/// A snapshot of [`KmemStats`] and of the arenas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmemSnapshot {
    pub mallocs: u64,
    pub frees: u64,
    pub malloc_failures: u64,
    pub transient_direct: u64,
    pub transient_local: u64,
    pub transient_global: u64,
    pub bounce_copies: u64,
    pub pages_zeroed: u64,
    /// Bytes in use: kmem_malloc, kva_alloc, transient KVA (guards included).
    pub kmem_bytes: u64,
    pub kva_bytes: u64,
    pub transient_bytes: u64,
    /// Bytes imported by kernel_arena (the grown kernel range).
    pub kernel_arena_bytes: u64,
}

/// `kernel_arena`'s source: hands out KVA upwards from where the kernel's page tables end,
/// growing them first (FreeBSD's `kva_import` + `pmap_growkernel`). Never takes KVA back:
/// kernel page-table pages are never freed.
struct KvaGrower<P: Platform + 'static> {
    sys: Arc<PmapSystem<P>>,
    next: spin::Mutex<u64>,
    limit: u64,
    faults: FaultInjector,
}

impl<P: Platform + 'static> VmemSource for KvaGrower<P> {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError> {
        if self.faults.should_fail() {
            return Err(VmemError::ImportFailed { size });
        }
        // Held across growkernel, which may wait for shootdowns: spin servicing interrupts.
        let mut next = crate::platform::lock_interruptible(&self.next, &**self.sys.platform());
        // Checked: a large alignment (2^42 on amd64, 2^63 on arm64) rounds past 2^64, and a
        // wrapped base would be VA 0 or the user half. `limit` ends the kernel half's KVA, and
        // a refused import leaves the frontier where it was.
        let end = next
            .checked_next_multiple_of(align.max(PAGE_SIZE))
            .and_then(|base| Some((base, base.checked_add(size)?)))
            .filter(|&(_, e)| e <= self.limit);
        let Some((base, end)) = end else {
            return Err(VmemError::ImportFailed { size });
        };
        if end > self.sys.kernel_end().as_u64() {
            self.sys
                .growkernel(VirtAddr::new(end))
                .map_err(|_| VmemError::ImportFailed { size })?;
        }
        *next = end;
        Ok(base)
    }
    /// Only when `kernel_arena` itself goes away (it keeps what it imports): the range keeps
    /// its page tables, which are never freed, and is not handed out again.
    fn release(&self, _base: u64, _size: u64) {}
}

/// `kernel_arena` as the source of the per-domain and transient arenas, with every import
/// aligned to a superpage (the importing arena's import quantum makes them superpage-sized).
struct SuperpageImports {
    parent: Arc<Arena>,
    sp: u64,
}

impl VmemSource for SuperpageImports {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError> {
        debug_assert!(size.is_multiple_of(self.sp), "imports are superpage-sized");
        self.parent.import(size, align.max(self.sp))
    }
    fn release(&self, base: u64, size: u64) {
        self.parent
            .xfree(base, size)
            .expect("a span imported from kernel_arena goes back whole");
    }
}

/// The kernel-memory layer of one machine.
pub struct Kmem<P: Platform + 'static> {
    sys: Arc<PmapSystem<P>>,
    reserv: Arc<ReservSystem>,
    cfg: KmemConfig,
    /// The promotable superpage size (the pmap's `psind` 1).
    sp: u64,
    kva_start: u64,
    grower_start: u64,
    grower: Arc<KvaGrower<P>>,
    kernel_arena: Arc<Arena>,
    domain_arenas: Vec<Arc<Arena>>,
    transient_arena: Arc<Arena>,
    registry: spin::Mutex<Registry>,
    stats: KmemStats,
}

impl<P: Platform + 'static> Kmem<P> {
    /// Lay out the kernel address space above what the pmap has grown so far.
    pub fn new(
        sys: Arc<PmapSystem<P>>,
        reserv: Arc<ReservSystem>,
        cfg: KmemConfig,
    ) -> Result<Arc<Self>, KmemError> {
        let plat = sys.platform().clone();
        let ncpu = plat.cpu_count() as usize;
        let sp = sys.page_sizes().nth(1).unwrap_or(PAGE_SIZE);
        let (kva_start, quick_base) = sys.kva_range();
        // Nothing promotable may share a superpage region with the quick-map slots.
        let limit = quick_base.as_u64() & !(sp - 1);
        let start = sys
            .kernel_end()
            .as_u64()
            .checked_next_multiple_of(sp)
            .filter(|&s| s < limit)
            .ok_or(KmemError::NoKva(VmemError::Exhausted { size: sp }))?;
        let grower = Arc::new(KvaGrower {
            sys: sys.clone(),
            next: spin::Mutex::new(start),
            limit,
            faults: FaultInjector::new(),
        });
        let arena = |c: ArenaConfig| Arena::new(c).map(Arc::new).map_err(KmemError::NoKva);
        let kernel_arena = arena(
            ArenaConfig::new("kernel arena", PAGE_SIZE)
                .source(grower.clone(), sp)
                .keep_imports(),
        )?;
        let sub = |name: &'static str, qcache: u64| {
            let c = ArenaConfig::new(name, PAGE_SIZE).qcache(qcache, ncpu);
            let c = match cfg.layout {
                KvaLayout::Segregated => c
                    .source(
                        Arc::new(SuperpageImports {
                            parent: kernel_arena.clone(),
                            sp,
                        }),
                        sp,
                    )
                    .keep_imports(),
                // Unified: kernel_arena itself is the source, page-granular imports released
                // at once, so that allocations land wherever kernel_arena puts them.
                KvaLayout::Unified => c.source(kernel_arena.clone(), PAGE_SIZE),
            };
            arena(c)
        };
        let ndom = reserv.buddy().domain_count().max(1);
        let mut domain_arenas = Vec::with_capacity(ndom);
        for _ in 0..ndom {
            domain_arenas.push(sub("kernel domain arena", cfg.qcache_max)?);
        }
        let transient_arena = sub("transient arena", 0)?;
        Ok(Arc::new(Kmem {
            sys,
            reserv,
            cfg,
            sp,
            kva_start: kva_start.as_u64(),
            grower_start: start,
            grower,
            kernel_arena,
            domain_arenas,
            transient_arena,
            registry: spin::Mutex::new(Registry::default()),
            stats: KmemStats::default(),
        }))
    }

    pub fn pmap(&self) -> &Arc<PmapSystem<P>> {
        &self.sys
    }
    pub fn reservations(&self) -> &Arc<ReservSystem> {
        &self.reserv
    }
    pub fn config(&self) -> &KmemConfig {
        &self.cfg
    }
    /// The superpage size that kernel memory is laid out in.
    pub fn superpage(&self) -> u64 {
        self.sp
    }
    /// The range `kernel_arena` imports from: `[start, limit)`, `start` where the kernel's page
    /// tables ended at boot (rounded up to a superpage), `limit` below the superpage region
    /// holding the quick-map slots.
    pub fn kva_span(&self) -> (VirtAddr, VirtAddr) {
        let start = self.kva_start.max(self.grower_start);
        (VirtAddr::new(start), VirtAddr::new(self.grower.limit))
    }
    /// How far `kernel_arena` has imported (grown the kernel) so far.
    pub fn kva_frontier(&self) -> VirtAddr {
        VirtAddr::new(*crate::platform::lock_interruptible(
            &self.grower.next,
            &**self.sys.platform(),
        ))
    }
    pub fn kernel_arena(&self) -> &Arc<Arena> {
        &self.kernel_arena
    }
    pub fn domain_arena(&self, domain: usize) -> Option<&Arc<Arena>> {
        self.domain_arenas.get(domain)
    }
    pub fn transient_arena(&self) -> &Arc<Arena> {
        &self.transient_arena
    }
    /// Fail the next KVA imports by `kernel_arena` (after `after` successes).
    pub fn inject_kva_failures(&self, after: u64, count: Option<u64>) {
        self.grower.faults.arm(after, count);
    }
    pub fn clear_kva_failures(&self) {
        self.grower.faults.disarm();
    }

    fn plat(&self) -> &P {
        self.sys.platform()
    }
    fn cpu(&self) -> usize {
        self.plat().current_cpu() as usize
    }

    /// `size` bytes of wired kernel memory in `domain`, zeroed if `zero` (FreeBSD
    /// `kmem_malloc_domain`). Pages come from the kernel object's reservations at the page
    /// index of their KVA, so an aligned superpage-sized allocation fills one reservation and
    /// the pmap promotes it. All or nothing.
    pub fn kmem_malloc(&self, size: u64, domain: usize, zero: bool) -> Result<VirtAddr, KmemError> {
        let arena = self
            .domain_arenas
            .get(domain)
            .ok_or(KmemError::BadDomain(domain))?;
        let len = self.length(size)?;
        let cpu = self.cpu();
        let va = if len >= self.sp {
            arena.xalloc(
                len,
                self.sp,
                0,
                0,
                crate::vmem::ADDR_MIN,
                crate::vmem::ADDR_MAX,
                Policy::BestFit,
            )
        } else {
            arena.alloc_on(cpu, len, Policy::InstantFit)
        }
        .map_err(|e| {
            self.stats.malloc_failures.fetch_add(1, Ordering::Relaxed);
            KmemError::NoKva(e)
        })?;
        if let Err(e) = self.back(va, len, domain, zero) {
            let r = if len >= self.sp {
                arena.xfree(va, len)
            } else {
                arena.free_on(cpu, va, len)
            };
            r.expect("KVA just allocated goes back");
            self.stats.malloc_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.registry.lock().kmem.insert(va, (len, domain));
        self.stats.mallocs.fetch_add(1, Ordering::Relaxed);
        Ok(VirtAddr::new(va))
    }

    /// Map wired pages behind `[va, va + len)`; on failure unmap and free what was done.
    fn back(&self, va: u64, len: u64, domain: usize, zero: bool) -> Result<(), KmemError> {
        let kpm = self.sys.kernel_pmap();
        let mut done = 0;
        let mut result = Ok(());
        while done < len {
            let cva = va + done;
            let pindex = (cva - self.kva_start) / PAGE_SIZE;
            let pa = match self.reserv.alloc_page(KERNEL_OBJECT, pindex, domain) {
                Ok(pa) => pa,
                Err(ReservError::NoMemory) => {
                    result = Err(KmemError::NoMemory);
                    break;
                }
                Err(e) => panic!("kernel object page {pindex:#x} at {cva:#x}: {e}"),
            };
            if zero {
                if let Err(e) = self.zero_page(pa) {
                    self.reserv.free_page(pa).expect("page just allocated");
                    result = Err(e);
                    break;
                }
            }
            if let Err(e) = self.sys.enter(
                kpm,
                VirtAddr::new(cva),
                pa,
                Prot::WRITE,
                // Wired at the page level (the page's wire count): the kernel pmap never
                // unwires, so the entry needs no wired bit. Dirty from the start, as kernel
                // memory is written at once (and so that promotion need not write-protect).
                EnterFlags::DIRTY | EnterFlags::NOSLEEP,
                0,
            ) {
                self.reserv.free_page(pa).expect("page just allocated");
                result = Err(e.into());
                break;
            }
            self.sys.pages().meta(pa).wire();
            done += PAGE_SIZE;
        }
        if result.is_err() && done > 0 {
            self.unback(va, done);
        }
        result
    }

    /// Unmap `[va, va + len)` and return its pages.
    fn unback(&self, va: u64, len: u64) {
        let kpm = self.sys.kernel_pmap();
        let frames: Vec<PhysAddr> = (0..len / PAGE_SIZE)
            .map(|i| {
                self.sys
                    .extract(kpm, VirtAddr::new(va + i * PAGE_SIZE))
                    .expect("kmem pages stay mapped until freed")
            })
            .collect();
        self.sys
            .remove(kpm, VirtAddr::new(va), VirtAddr::new(va + len))
            .expect("removing kernel memory cannot fail");
        for pa in frames {
            self.sys.pages().meta(pa).unwire();
            self.reserv
                .free_page(pa)
                .expect("a kmem page goes back to its reservation once");
        }
    }

    /// The page-rounded length of a `size` a caller passes: `BadSize` for zero or more than
    /// the kernel address space (checked before rounding, so the rounding cannot overflow).
    fn length(&self, size: u64) -> Result<u64, KmemError> {
        if size == 0 || size > self.grower.limit.saturating_sub(self.kva_start) {
            return Err(KmemError::BadSize(size));
        }
        Ok(size.next_multiple_of(PAGE_SIZE))
    }

    /// Free what `kmem_malloc` returned; `size` as asked then.
    pub fn kmem_free(&self, va: VirtAddr, size: u64) -> Result<(), KmemError> {
        let len = self.length(size)?;
        let domain = {
            let mut r = self.registry.lock();
            match r.kmem.get(&va.as_u64()) {
                Some(&(l, d)) if l == len => {
                    r.kmem.remove(&va.as_u64());
                    d
                }
                _ => return Err(KmemError::BadFree { va, size }),
            }
        };
        self.unback(va.as_u64(), len);
        let arena = &self.domain_arenas[domain];
        if len >= self.sp {
            arena.xfree(va.as_u64(), len)
        } else {
            arena.free_on(self.cpu(), va.as_u64(), len)
        }
        .expect("a registered allocation goes back to its arena");
        self.stats.frees.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Kernel VA with nothing behind it, for `qenter`/`kenter` users (FreeBSD `kva_alloc`):
    /// straight from `kernel_arena`, never inside a domain or transient arena's superpages.
    pub fn kva_alloc(&self, size: u64) -> Result<VirtAddr, KmemError> {
        let len = self.length(size)?;
        let va = self
            .kernel_arena
            .alloc(len, Policy::InstantFit)
            .map_err(KmemError::NoKva)?;
        self.registry.lock().kva.insert(va, len);
        Ok(VirtAddr::new(va))
    }

    /// Free what `kva_alloc` returned. The caller has removed its mappings.
    pub fn kva_free(&self, va: VirtAddr, size: u64) -> Result<(), KmemError> {
        let len = self.length(size)?;
        {
            let mut r = self.registry.lock();
            match r.kva.get(&va.as_u64()) {
                Some(&l) if l == len => {
                    r.kva.remove(&va.as_u64());
                }
                _ => return Err(KmemError::BadFree { va, size }),
            }
        }
        self.kernel_arena
            .free(va.as_u64(), len)
            .expect("a registered range goes back to kernel_arena");
        Ok(())
    }

    /// Run `f` on the kernel address of the page-aligned frame `pa`: the direct map, or a
    /// quick mapping held around `f` and released on every path (the guard drops). A misaligned
    /// `pa` or a frame the machine does not have is refused by the pmap before anything is
    /// mapped (`KmemError::Pmap`), so no whole-page operation can spill past the frame.
    fn through_quick_map<R>(
        &self,
        pa: PhysAddr,
        f: impl FnOnce(VirtAddr) -> Result<R, Fault>,
    ) -> Result<R, KmemError> {
        let q = self.sys.quick_page(pa)?;
        let r = f(q.va());
        drop(q);
        r.map_err(KmemError::Fault)
    }

    /// Zero the physical page at the page-aligned `pa` through the direct map, or a quick
    /// mapping where the page lies outside it.
    pub fn zero_page(&self, pa: PhysAddr) -> Result<(), KmemError> {
        self.stats.pages_zeroed.fetch_add(1, Ordering::Relaxed);
        self.through_quick_map(pa, |va| self.plat().kernel_zero(va, PAGE_SIZE))
    }

    /// Copy a physical page to another (through the direct map or the two quick slots); both
    /// must be page-aligned frames of the machine.
    pub fn copy_page(&self, src: PhysAddr, dst: PhysAddr) -> Result<(), KmemError> {
        let (s, d) = self.sys.quick_pair(src, dst)?;
        let r = self.plat().kernel_copy(s.va(), d.va(), PAGE_SIZE);
        drop((s, d));
        r.map_err(KmemError::Fault)
    }

    /// A bounce copy of `len` bytes at `off` must stay inside the page (checked: an `off`
    /// near 2^64 would wrap the sum); count it.
    fn start_bounce(&self, off: u64, len: usize) -> Result<(), KmemError> {
        let len = len as u64;
        if off.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(KmemError::OutsidePage { off, len });
        }
        self.stats.bounce_copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Bounce-buffer copy (busdma style): `data` into the physical page `pa` (page-aligned) at
    /// `off`.
    pub fn bounce_to_phys(&self, pa: PhysAddr, off: u64, data: &[u8]) -> Result<(), KmemError> {
        self.start_bounce(off, data.len())?;
        self.through_quick_map(pa, |va| {
            self.plat()
                .kernel_write(VirtAddr::new(va.as_u64() + off), data)
        })
    }

    /// Bounce-buffer copy: bytes of the physical page `pa` (page-aligned) from `off` into `buf`.
    pub fn bounce_from_phys(
        &self,
        pa: PhysAddr,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), KmemError> {
        self.start_bounce(off, buf.len())?;
        self.through_quick_map(pa, |va| {
            self.plat()
                .kernel_read(VirtAddr::new(va.as_u64() + off), buf)
        })
    }

    /// Counters and bytes in use.
    pub fn stats(&self) -> KmemSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let r = self.registry.lock();
        KmemSnapshot {
            mallocs: l(&s.mallocs),
            frees: l(&s.frees),
            malloc_failures: l(&s.malloc_failures),
            transient_direct: l(&s.transient_direct),
            transient_local: l(&s.transient_local),
            transient_global: l(&s.transient_global),
            bounce_copies: l(&s.bounce_copies),
            pages_zeroed: l(&s.pages_zeroed),
            kmem_bytes: r.kmem.values().map(|&(l, _)| l).sum(),
            kva_bytes: r.kva.values().sum(),
            transient_bytes: r.transient.values().map(|(n, _)| n * PAGE_SIZE).sum(),
            kernel_arena_bytes: self.kernel_arena.stats().imported,
        }
    }

    /// Check the layout and every live allocation (KVA-1..4 of docs/INVARIANTS.md): returns
    /// the violations found.
    pub fn audit(&self) -> Result<(), Vec<String>> {
        use alloc::collections::BTreeSet;
        use alloc::format;
        let mut errs = Vec::new();
        let kpm = self.sys.kernel_pmap();
        let sp = self.sp;
        let r = self.registry.lock();
        // KVA-1: no superpage region holds both promotable and transient/kva mappings.
        let mut promotable = BTreeSet::new();
        for (&va, &(len, _)) in &r.kmem {
            for region in (va & !(sp - 1)..va + len).step_by(sp as usize) {
                promotable.insert(region);
            }
        }
        let mut others: Vec<(u64, u64, &str)> = Vec::new();
        for (&va, &len) in &r.kva {
            others.push((va, len, "kva_alloc"));
        }
        for (&va, (n, _)) in &r.transient {
            others.push((va, n * PAGE_SIZE, "transient"));
        }
        for &(va, len, what) in &others {
            for region in (va & !(sp - 1)..va + len).step_by(sp as usize) {
                if promotable.contains(&region) {
                    errs.push(format!(
                        "KVA-1: {what} KVA {va:#x}+{len:#x} shares the superpage region {region:#x} with kmem_malloc memory"
                    ));
                }
            }
        }
        // KVA-2: every kmem page is mapped, wired, and owned by the kernel object at its index.
        for (&va, &(len, _)) in &r.kmem {
            for i in 0..len / PAGE_SIZE {
                let cva = va + i * PAGE_SIZE;
                match self.sys.extract(kpm, VirtAddr::new(cva)) {
                    None => errs.push(format!("KVA-2: kmem page {cva:#x} is not mapped")),
                    Some(pa) => {
                        let m = self.sys.pages().meta(pa);
                        let want = (cva - self.kva_start) / PAGE_SIZE;
                        if m.owner() != Some((KERNEL_OBJECT, want)) || m.wire_count() == 0 {
                            errs.push(format!(
                                "KVA-2: kmem page {cva:#x} -> {pa}: owner {:?}, wired {}",
                                m.owner(),
                                m.wire_count()
                            ));
                        }
                    }
                }
            }
        }
        // KVA-3: every transient page is mapped by a 4 KiB entry to its frame (never swallowed
        // by a superpage), guard pages are unmapped.
        for (&va, (n, frames)) in &r.transient {
            let lead = self.cfg.transient_guards as u64;
            for i in 0..*n {
                let cva = va + i * PAGE_SIZE;
                let m = self.sys.mapping(kpm, VirtAddr::new(cva));
                let inner = i >= lead && i < lead + frames.len() as u64;
                match (inner, m) {
                    (true, Some(m))
                        if m.size == PAGE_SIZE && m.pa == frames[(i - lead) as usize] => {}
                    (false, None) => {}
                    (_, m) => errs.push(format!(
                        "KVA-3: transient page {cva:#x} ({}) is mapped as {m:?}",
                        if inner { "mapped" } else { "guard" }
                    )),
                }
            }
        }
        drop(r);
        for (name, a) in [
            ("kernel arena", &self.kernel_arena),
            ("transient arena", &self.transient_arena),
        ]
        .into_iter()
        .chain(self.domain_arenas.iter().map(|a| ("domain arena", a)))
        {
            if let Err(e) = a.audit() {
                errs.push(format!("KVA-4: {name}: {e}"));
            }
        }
        if let Err(e) = self.reserv.audit() {
            errs.push(format!("KVA-4: reservations: {e}"));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}
