//! TLB invalidation: flush batches, shootdown, PCID/ASID assignment and activation.
//!
//! A change to the tables is recorded in a [`Flush`], a value that must be completed: it keeps
//! the covering range of the change and the page-table pages that the change detached, and
//! [`PmapSystem::complete`] invalidates (locally when only this CPU can hold the entries,
//! otherwise by IPI to the CPUs where the pmap is active, or by broadcast TLBI on arm64) and only
//! then frees those pages. Above `flush_ceiling` pages the ranged flush becomes a full one.
//!
//! Tags (PCIDs, ASIDs) are assigned per generation from one allocator and never returned within
//! a generation: when they run out the generation advances, the tags loaded on CPUs are carried
//! over, and every CPU flushes before it loads a pmap again (the scheme of Linux arm64 and
//! FreeBSD amd64's per-generation PCIDs). A CPU that held a pmap's entries but was not
//! interrupted by a shootdown (the pmap was not active there) is marked `stale_on` and flushes
//! the tag when it next loads the pmap.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use vmsys_arch::TlbTag;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::page::page_flags;
use crate::platform::{CpuId, CpuSet, IpiMessage, Platform, RootLoad, TagSel, TlbInval, MAX_CPUS};

use super::{table, Pmap, PmapError, PmapStats, PmapSystem};

/// An atomic set of CPUs.
#[derive(Default)]
pub struct CpuMask([AtomicU64; MAX_CPUS / 64]);

impl CpuMask {
    pub fn insert(&self, cpu: CpuId) {
        self.0[cpu as usize / 64].fetch_or(1 << (cpu % 64), Ordering::SeqCst);
    }
    pub fn remove(&self, cpu: CpuId) {
        self.0[cpu as usize / 64].fetch_and(!(1 << (cpu % 64)), Ordering::SeqCst);
    }
    /// Remove `cpu`; whether it was present.
    pub fn take(&self, cpu: CpuId) -> bool {
        let b = 1 << (cpu % 64);
        self.0[cpu as usize / 64].fetch_and(!b, Ordering::SeqCst) & b != 0
    }
    pub fn contains(&self, cpu: CpuId) -> bool {
        self.0[cpu as usize / 64].load(Ordering::SeqCst) & (1 << (cpu % 64)) != 0
    }
    pub fn snapshot(&self) -> CpuSet {
        let mut s = CpuSet::empty();
        for (w, a) in self.0.iter().enumerate() {
            let mut bits = a.load(Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                s.insert((w * 64) as CpuId + b);
            }
        }
        s
    }
    /// Add every CPU of `cpus` not in `except`.
    fn insert_all_but(&self, cpus: u32, except: &CpuSet) {
        for c in 0..cpus {
            if !except.contains(c) {
                self.insert(c);
            }
        }
    }
}

/// A pending invalidation: what a change to the tables owes the TLBs, and the page-table
/// pages it detached (freed only once the invalidation is complete).
#[must_use = "a Flush must be completed: until then CPUs may hold stale translations and detached page-table pages are not freed"]
#[derive(Default)]
pub(crate) struct Flush {
    start: u64,
    end: u64,
    any: bool,
    /// A table entry changed: paging-structure caches must go too (no leaf-only TLBI).
    tables: bool,
    /// Force a full flush of the pmap.
    full: bool,
    free: Vec<PhysAddr>,
}

impl Flush {
    pub fn new() -> Self {
        Flush::default()
    }
    /// `[va, va + len)` changed at leaf level.
    pub fn add(&mut self, va: u64, len: u64) {
        let end = va.wrapping_add(len);
        if !self.any {
            (self.start, self.end, self.any) = (va, end, true);
        } else {
            self.start = self.start.min(va);
            self.end = self.end.max(end);
        }
    }
    /// A table entry covering `[va, va + len)` changed (a table detached or replaced).
    pub fn add_table(&mut self, va: u64, len: u64) {
        // One page of the range suffices on x86 (INVLPG drops all the tag's walk-cache
        // entries); arm64 TLBI by VA without leaf-only drops the walk entries for that VA.
        self.add(va, len.min(PAGE_SIZE));
        self.tables = true;
    }
    /// Flush everything of the pmap.
    pub fn add_full(&mut self) {
        self.any = true;
        self.full = true;
        self.tables = true;
    }
    /// Free `ptp` once the invalidation is complete.
    pub fn free_after(&mut self, ptp: PhysAddr) {
        self.free.push(ptp);
    }
    pub fn is_empty(&self) -> bool {
        !self.any && self.free.is_empty()
    }
    fn pages(&self) -> u64 {
        self.end.wrapping_sub(self.start).div_ceil(PAGE_SIZE)
    }
}

/// IPI payload kinds.
const IPI_PAGES: u64 = 1;
const IPI_TAG: u64 = 2;
const IPI_ALL: u64 = 3;
const IPI_NONGLOBAL: u64 = 4;
/// Tag-selector encoding in the payload.
const SEL_CURRENT: u64 = 1 << 32;
const SEL_ANY: u64 = 2 << 32;

fn encode_sel(sel: TagSel) -> u64 {
    match sel {
        TagSel::Current => SEL_CURRENT,
        TagSel::Any => SEL_ANY,
        TagSel::Tag(t) => t as u64,
    }
}

fn decode_sel(v: u64) -> TagSel {
    match v & (3 << 32) {
        SEL_CURRENT => TagSel::Current,
        SEL_ANY => TagSel::Any,
        _ => TagSel::Tag(v as u16),
    }
}

/// Executes an invalidation request on the current CPU (the IPI handler's body).
fn run_request<P: Platform>(plat: &P, args: &[u64; 4]) {
    match args[0] {
        IPI_PAGES => {
            let sel = decode_sel(args[3]);
            let mut va = args[1];
            while va < args[2] {
                plat.tlb_invalidate_local(TlbInval::Page {
                    va: VirtAddr::new(va),
                    tag: sel,
                    leaf_only: false,
                });
                va += PAGE_SIZE;
            }
        }
        IPI_TAG => plat.tlb_invalidate_local(TlbInval::Tag(args[3] as u16)),
        IPI_NONGLOBAL => plat.tlb_invalidate_local(TlbInval::AllNonGlobal),
        IPI_ALL => plat.tlb_invalidate_local(TlbInval::All),
        _ => {}
    }
}

/// Installs the shootdown handler on every CPU.
pub(crate) fn install_handler<P: Platform + 'static>(plat: &Arc<P>, vector: u8) {
    let weak = Arc::downgrade(plat);
    plat.set_ipi_handler(
        vector,
        Arc::new(move |msg: &IpiMessage| {
            if let Some(p) = weak.upgrade() {
                run_request(&*p, &msg.args);
            }
        }),
    );
}

/// The tag allocator.
pub(crate) struct TagAlloc {
    gen: u64,
    /// Tags `1..limit` are assigned (0 is the kernel's / no tag).
    limit: u32,
    next: u32,
    used: Vec<u64>,
    /// `gen << 16 | tag` values loaded on a CPU at the last rollover: their pmaps keep the tag.
    reserved: Vec<u64>,
}

impl TagAlloc {
    pub fn new(limit: u32) -> Self {
        TagAlloc {
            gen: 1,
            limit,
            next: 1,
            used: alloc::vec![0; (limit as usize).div_ceil(64)],
            reserved: Vec::new(),
        }
    }
    fn is_used(&self, t: u32) -> bool {
        self.used[t as usize / 64] & (1 << (t % 64)) != 0
    }
    fn mark(&mut self, t: u32) {
        self.used[t as usize / 64] |= 1 << (t % 64);
    }
    fn find_free(&mut self) -> Option<u32> {
        (0..self.limit.saturating_sub(1))
            .map(|i| 1 + (self.next - 1 + i) % (self.limit - 1))
            .find(|&t| !self.is_used(t))
    }
}

/// Per-CPU state of the pmap layer.
pub(crate) struct CpuLocal {
    /// Id of the pmap loaded here (u32::MAX: none yet).
    pub current: AtomicU32,
    /// `gen << 16 | tag` loaded here.
    pub loaded_tag: AtomicU64,
    /// A tag rollover happened: flush all non-global entries before loading a pmap.
    pub flush_pending: AtomicBool,
    /// Quick-mapping slots: 0 when free, else the address handed out (see `pmap::quick`).
    pub quick_held: [AtomicU64; 2],
}

impl CpuLocal {
    pub fn new() -> Self {
        CpuLocal {
            current: AtomicU32::new(u32::MAX),
            loaded_tag: AtomicU64::new(0),
            flush_pending: AtomicBool::new(false),
            quick_held: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl<P: Platform> PmapSystem<P> {
    /// Whether this format uses tags (and the configuration allows them).
    pub(crate) fn tags_enabled(&self) -> bool {
        self.cfg.use_tags && !matches!(self.geom.fmt.tlb.tag, TlbTag::None)
    }

    /// Make `pmap` the address space of the current CPU (FreeBSD `pmap_activate`). A pmap of
    /// another system is `ForeignPmap`, and a destroyed one `Destroyed`: its root is never
    /// loaded. If a `destroy` on another CPU wins the race, the CPU is left on the kernel pmap.
    pub fn activate(&self, pmap: &Arc<Pmap>) -> Result<(), PmapError> {
        self.usable(pmap)?;
        if self.activate_inner(pmap) {
            return Ok(());
        }
        let k = self.kernel.clone();
        let loaded = self.activate_inner(&k);
        debug_assert!(loaded, "the kernel pmap is never destroyed");
        Err(PmapError::Destroyed)
    }

    /// Load `pmap` here unless it is being destroyed (then nothing changes and `false`).
    pub(crate) fn activate_inner(&self, pmap: &Arc<Pmap>) -> bool {
        let plat = &*self.plat;
        let me = plat.current_cpu();
        let local = &self.cpus[me as usize];
        // Dekker with `destroy`: publish this CPU in `active` (SeqCst), then read the state;
        // `destroy` writes DYING, then reads `active`. A DYING pmap is waited out: `destroy`
        // decides at once, under the pmap's lock, without waiting for anything.
        let was_active = pmap.active.contains(me);
        pmap.active.insert(me);
        loop {
            match pmap.life.load(Ordering::SeqCst) {
                super::LIVE => break,
                super::DYING => {
                    plat.interrupt_point();
                    core::hint::spin_loop();
                }
                _ => {
                    if !was_active {
                        pmap.active.remove(me);
                    }
                    // Whatever of it this CPU still caches goes too (the destroyer may have
                    // missed this CPU while it was not in `active`).
                    plat.tlb_invalidate_local(TlbInval::AllNonGlobal);
                    return false;
                }
            }
        }
        let prev = local.current.swap(pmap.id, Ordering::SeqCst);
        if prev != pmap.id && prev != u32::MAX {
            if let Some(p) = self.lookup_pmap(prev) {
                p.active.remove(me);
            }
        }
        pmap.tlb_cpus.insert(me);
        // Dekker with `shootdown`: we publish `active` before reading `stale_on`; it publishes
        // `stale_on` before reading `active` (both SeqCst).
        let (root, tag, mut flush) =
            if pmap.kernel && self.geom.fmt.layout(self.cfg.split).separate_roots {
                // arm64: the kernel half is TTBR1 (loaded at init_cpu); TTBR0 gets an empty table.
                (
                    self.empty_user_root.expect("arm64 has an empty user root"),
                    0,
                    false,
                )
            } else if self.tags_enabled() && !pmap.kernel {
                let (tag, fresh) = self.tag_for(pmap, me);
                (pmap.root, tag, fresh)
            } else {
                (pmap.root, 0, true)
            };
        if pmap.stale_on.take(me) {
            flush = true;
        }
        if local.flush_pending.swap(false, Ordering::SeqCst) {
            plat.tlb_invalidate_local(TlbInval::AllNonGlobal);
            flush = false;
        }
        local
            .loaded_tag
            .store(pmap.tag.load(Ordering::SeqCst), Ordering::SeqCst);
        plat.load_root(RootLoad { root, tag, flush });
        true
    }

    /// The tag of `pmap` in the current generation, assigning one if needed; `true` if the tag
    /// is newly assigned (its entries on this CPU must be flushed on load).
    fn tag_for(&self, pmap: &Pmap, me: CpuId) -> (u16, bool) {
        let mut ta = table::lock(&self.tags, &*self.plat);
        let cur = pmap.tag.load(Ordering::SeqCst);
        if cur != 0 && cur >> 16 == ta.gen {
            return (cur as u16, false);
        }
        if cur != 0 && ta.reserved.contains(&cur) {
            // Loaded somewhere at the rollover: keep the number in the new generation.
            let t = (cur & 0xffff) as u32;
            ta.mark(t);
            pmap.tag.store(ta.gen << 16 | t as u64, Ordering::SeqCst);
            return (t as u16, false);
        }
        let t = match ta.find_free() {
            Some(t) => t,
            None => {
                self.rollover(&mut ta, me);
                ta.find_free().expect("a rollover frees tags")
            }
        };
        ta.mark(t);
        ta.next = t + 1;
        if ta.next >= ta.limit {
            ta.next = 1;
        }
        pmap.tag.store(ta.gen << 16 | t as u64, Ordering::SeqCst);
        (t as u16, true)
    }

    /// Start a new tag generation: keep the tags loaded on CPUs, make every CPU flush before it
    /// loads any pmap again.
    fn rollover(&self, ta: &mut TagAlloc, me: CpuId) {
        PmapStats::bump(&self.stats.tag_rollovers);
        ta.gen += 1;
        ta.used.iter_mut().for_each(|w| *w = 0);
        ta.reserved.clear();
        for (c, local) in self.cpus.iter().enumerate() {
            let loaded = local.loaded_tag.load(Ordering::SeqCst);
            if loaded != 0 && c as CpuId != me {
                ta.mark((loaded & 0xffff) as u32);
                ta.reserved.push(loaded);
            }
            local.flush_pending.store(true, Ordering::SeqCst);
        }
    }

    /// Invalidate what `flush` records for `pmap`, then free the page-table pages it holds.
    pub(crate) fn complete(&self, pmap: &Pmap, mut flush: Flush) {
        if flush.any {
            self.invalidate(pmap, &flush);
        }
        for ptp in flush.free.drain(..) {
            self.free_ptp_now(ptp);
        }
        flush.any = false;
    }

    /// Complete a kernel flush on this CPU only (mappings that only this CPU has used). It
    /// cannot free tables: kernel tables are never freed.
    pub(crate) fn complete_local(&self, mut flush: Flush) {
        debug_assert!(flush.free.is_empty(), "a local flush frees no table");
        if flush.any {
            let mut va = flush.start;
            while va < flush.end {
                self.invalidate_local_page(va);
                va += PAGE_SIZE;
            }
            PmapStats::bump(&self.stats.local_flushes);
        }
        flush.any = false;
    }

    /// Return a page-table page to the frame source (after its invalidation).
    pub(crate) fn free_ptp_now(&self, ptp: PhysAddr) {
        let meta = self.pages.meta(ptp);
        // Every page-table mark goes (a saved kernel table carries KERNEL_PTP): the frame source
        // refuses frames that still bear one (PHYS-4).
        meta.clear_flags(page_flags::PTP | page_flags::SAVED_PTP | page_flags::KERNEL_PTP);
        meta.ref_count.store(0, Ordering::Relaxed);
        PmapStats::bump(&self.stats.ptps_freed);
        self.frames
            .free(ptp)
            .expect("a page-table page is freed exactly once");
    }

    fn invalidate(&self, pmap: &Pmap, f: &Flush) {
        let plat = &*self.plat;
        let full = f.full || f.pages() > self.cfg.flush_ceiling;
        let tlb = &self.geom.fmt.tlb;
        let tag = if self.tags_enabled() && !pmap.kernel {
            Some(pmap.tag())
        } else {
            None
        };
        if full {
            PmapStats::bump(&self.stats.full_flushes);
        }
        let leaf_only = !f.tables;
        let me = plat.current_cpu();
        if tlb.broadcast_invalidate {
            // arm64: TLBI ...IS reaches every CPU without interrupting it. Kernel entries are
            // global: by VA for every ASID.
            let sel = match tag {
                Some(t) => TagSel::Tag(t),
                None => TagSel::Any,
            };
            let local_only = !pmap.kernel && self.only_here(pmap, me);
            let issue = |inv: TlbInval| {
                if local_only {
                    plat.tlb_invalidate_local(inv);
                } else {
                    plat.tlb_invalidate_broadcast(inv)
                        .expect("broadcast invalidation exists where the format says so");
                }
            };
            if local_only {
                PmapStats::bump(&self.stats.local_flushes);
            } else {
                PmapStats::bump(&self.stats.shootdowns);
            }
            if full {
                issue(match tag {
                    Some(t) => TlbInval::Tag(t),
                    None => TlbInval::All,
                });
            } else {
                let mut va = f.start;
                while va < f.end {
                    issue(TlbInval::Page {
                        va: VirtAddr::new(va),
                        tag: sel,
                        leaf_only,
                    });
                    va += PAGE_SIZE;
                }
            }
            return;
        }
        // x86: IPIs to the CPUs where the pmap is loaded; the rest flush on their next load.
        let args = if full {
            match (pmap.kernel, tag) {
                (true, _) => [IPI_ALL, 0, 0, 0],
                (false, Some(t)) => [IPI_TAG, 0, 0, t as u64],
                (false, None) => [IPI_NONGLOBAL, 0, 0, 0],
            }
        } else {
            let sel = match tag {
                Some(t) => TagSel::Tag(t),
                None => TagSel::Current,
            };
            [IPI_PAGES, f.start, f.end, encode_sel(sel)]
        };
        let targets = if pmap.kernel {
            CpuSet::first_n(plat.cpu_count())
        } else {
            let a1 = pmap.active.snapshot();
            pmap.stale_on.insert_all_but(plat.cpu_count(), &a1);
            let mut t = pmap.active.snapshot();
            for c in a1.iter() {
                t.insert(c);
            }
            t
        };
        if targets.contains(me) {
            run_request(plat, &args);
        }
        let mut others = targets;
        others.remove(me);
        if others.is_empty() {
            PmapStats::bump(&self.stats.local_flushes);
        } else {
            PmapStats::bump(&self.stats.shootdowns);
            plat.send_ipi(
                &others,
                IpiMessage {
                    vector: self.cfg.shootdown_vector,
                    args,
                },
                true,
            )
            .expect("shootdown targets are CPUs of this machine");
        }
    }

    /// Whether only the current CPU can hold entries of `pmap` (it was never loaded elsewhere
    /// since its tag was assigned).
    fn only_here(&self, pmap: &Pmap, me: CpuId) -> bool {
        let seen = pmap.tlb_cpus.snapshot();
        let only = seen.iter().all(|c| c == me);
        only
    }

    /// Invalidate `va` on this CPU only (per-CPU mappings: quick maps, pinned transient maps).
    pub(crate) fn invalidate_local_page(&self, va: u64) {
        self.plat.tlb_invalidate_local(TlbInval::Page {
            va: VirtAddr::new(va),
            tag: TagSel::Current,
            leaf_only: true,
        });
    }
}
