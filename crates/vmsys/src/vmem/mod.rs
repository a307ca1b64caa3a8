//! vmem: Bonwick's resource arenas ("Magazines and Vmem", USENIX ATC 2001), as in illumos and
//! FreeBSD `subr_vmem.c`.
//!
//! An [`Arena`] hands out ranges of an integer resource (kernel virtual addresses, I/O space,
//! IDs) in multiples of its *quantum*. The pieces, one file each:
//!
//! - [`seg`]: boundary tags in a slab (`Vec` + free-index list), on one address-ordered list.
//!   Steady-state alloc/free never touches the heap.
//! - [`freelist`]: power-of-two free lists and a bitmap of the non-empty ones, for Bonwick's
//!   O(1) *instant fit*; best fit and next fit (a rotor) are in [`inner`].
//! - [`hash`]: allocated segments by start address, grown and shrunk with the live count, so
//!   `free(addr, size)` is O(1) at any number of live segments.
//! - [`qcache`]: per-CPU quantum caches (magazines and a depot) for sizes up to `qcache_max`.
//!
//! An arena may *import* spans from a [`VmemSource`] (another arena, or a kernel layer whose
//! import also maps pages) in multiples of its import quantum, and releases an imported span
//! when it becomes wholly free, unless configured to keep what it imports.
//!
//! Every operation counts its elementary steps (list nodes visited, hash probes, bitmap scans,
//! magazine operations) in [`VmemStats::work`], so that tests show constant time by counting,
//! not timing. [`Arena::audit`] checks every invariant VMEM-1..12 of docs/INVARIANTS.md.
//!
//! Locking: one `spin::Mutex` for the arena's segments; one per CPU per quantum cache and one
//! per depot. The arena lock is never held while a cache lock is taken or the source is
//! called, so sources may be arenas themselves and a source's import may sleep or map pages.
//! (A CPU cache evicting from its outstanding set takes the arena lock inside the CPU lock:
//! that order only.)

mod freelist;
mod hash;
mod inner;
mod qcache;
mod seg;

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use spin::Mutex;

use inner::{Inner, Release, Want};
use qcache::QCache;

/// The lowest address an `xalloc` may return (no lower bound).
pub const ADDR_MIN: u64 = 0;
/// The highest address an `xalloc`'d segment may cover (no upper bound).
pub const ADDR_MAX: u64 = u64::MAX;
/// At most this many quantum caches (`qcache_max / quantum`).
pub const MAX_QCACHES: u64 = 64;

/// How to choose among free segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// O(1): the first segment of the smallest free list whose every segment is large enough.
    /// Bonwick's default; slightly more fragmentation than best fit.
    InstantFit,
    /// The smallest free segment that fits (linear in one free list).
    BestFit,
    /// The first fit after the previous next-fit allocation, cycling through the address space
    /// (for resources that should not be reused soon, like IDs). Bypasses the quantum caches.
    NextFit,
}

/// Why an arena operation failed. Every failed operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmemError {
    /// The quantum is not a power of two.
    BadQuantum(u64),
    /// `qcache_max` is not a multiple of the quantum or exceeds `MAX_QCACHES` quanta.
    BadQcacheMax { qcache_max: u64, quantum: u64 },
    /// The import quantum is not a multiple of the quantum.
    BadImportQuantum { import_quantum: u64, quantum: u64 },
    /// An arena needs at least one CPU.
    NoCpus,
    /// A CPU index beyond the arena's CPU count.
    BadCpu { cpu: usize, ncpu: usize },
    /// A zero size.
    ZeroSize,
    /// The size cannot be rounded up to the quantum without overflowing.
    SizeOverflow { size: u64 },
    /// A span's base or size is not a multiple of the quantum.
    Unaligned {
        what: &'static str,
        value: u64,
        quantum: u64,
    },
    /// A span reaching the top of the address space (`base + size` must fit in a u64).
    SpanWraps { base: u64, size: u64 },
    /// A span overlapping one already in the arena.
    SpanOverlap { base: u64, size: u64 },
    /// Alignment not a power of two, or below the quantum.
    BadAlign { align: u64, quantum: u64 },
    /// Phase not below the alignment, or not a multiple of the quantum.
    BadPhase { phase: u64, align: u64 },
    /// Nocross not a power of two, or smaller than the size.
    BadNocross { nocross: u64, size: u64 },
    /// `minaddr > maxaddr`.
    BadRange { min: u64, max: u64 },
    /// No free segment can satisfy the request, and importing (if any) did not help.
    Exhausted { size: u64 },
    /// The source could not supply a span (sources report this; the arena passes it on).
    ImportFailed { size: u64 },
    /// The source returned a span the arena cannot use (misaligned or overlapping); it was
    /// released back.
    BadImport { base: u64, size: u64 },
    /// No allocated segment starts at this address (never allocated, already freed, or the
    /// address of a segment's interior or of part of a span).
    NotAllocated { addr: u64 },
    /// The segment at `addr` is `actual` bytes, not `size`.
    WrongSize { addr: u64, size: u64, actual: u64 },
    /// The segment at `addr` is already free (sitting in a quantum cache).
    AlreadyFree { addr: u64 },
    /// Internal: a quantum-cache alloc found the segment not marked cached.
    NotCached { addr: u64 },
}

impl fmt::Display for VmemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use VmemError::*;
        match *self {
            BadQuantum(q) => write!(f, "vmem: quantum {q:#x} is not a power of two"),
            BadQcacheMax { qcache_max, quantum } => write!(
                f,
                "vmem: qcache_max {qcache_max:#x} is not a multiple of the quantum {quantum:#x} \
                 of at most {MAX_QCACHES} quanta"
            ),
            BadImportQuantum { import_quantum, quantum } => write!(
                f,
                "vmem: import quantum {import_quantum:#x} is not a multiple of the quantum {quantum:#x}"
            ),
            NoCpus => write!(f, "vmem: an arena needs at least one CPU"),
            BadCpu { cpu, ncpu } => write!(f, "vmem: CPU {cpu} but the arena has {ncpu} CPUs"),
            ZeroSize => write!(f, "vmem: zero size"),
            SizeOverflow { size } => write!(f, "vmem: size {size:#x} overflows when rounded"),
            Unaligned { what, value, quantum } => {
                write!(f, "vmem: span {what} {value:#x} is not a multiple of the quantum {quantum:#x}")
            }
            SpanWraps { base, size } => {
                write!(f, "vmem: span {base:#x}+{size:#x} wraps past the top of the address space")
            }
            SpanOverlap { base, size } => {
                write!(f, "vmem: span {base:#x}+{size:#x} overlaps a span of the arena")
            }
            BadAlign { align, quantum } => write!(
                f,
                "vmem: alignment {align:#x} is not a power of two at least the quantum {quantum:#x}"
            ),
            BadPhase { phase, align } => write!(
                f,
                "vmem: phase {phase:#x} is not below the alignment {align:#x} or not a quantum multiple"
            ),
            BadNocross { nocross, size } => write!(
                f,
                "vmem: nocross {nocross:#x} is not a power of two at least the size {size:#x}"
            ),
            BadRange { min, max } => write!(f, "vmem: minaddr {min:#x} above maxaddr {max:#x}"),
            Exhausted { size } => write!(f, "vmem: no space for {size:#x} bytes"),
            ImportFailed { size } => write!(f, "vmem: the source could not supply {size:#x} bytes"),
            BadImport { base, size } => {
                write!(f, "vmem: the source returned an unusable span {base:#x}+{size:#x}")
            }
            NotAllocated { addr } => write!(
                f,
                "vmem: bad free: no allocated segment starts at {addr:#x} (never allocated, \
                 already freed, or not a segment's start)"
            ),
            WrongSize { addr, size, actual } => write!(
                f,
                "vmem: bad free: segment {addr:#x} is {actual:#x} bytes, freed as {size:#x}"
            ),
            AlreadyFree { addr } => {
                write!(f, "vmem: bad free: segment {addr:#x} is already free (double free)")
            }
            NotCached { addr } => write!(f, "vmem: internal: segment {addr:#x} is not cached"),
        }
    }
}

/// Where an arena gets more space when it runs out.
///
/// `import` returns the base of `size` bytes aligned to `align`; it may do anything a source
/// needs (allocate from a parent arena, and map pages behind the range for a kernel-memory
/// arena). `release` takes back exactly a range `import` returned, once; it cannot fail (an
/// arena never half-releases). An arena calls neither with its own lock held.
pub trait VmemSource: Send + Sync {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError>;
    fn release(&self, base: u64, size: u64);
}

/// How to build an [`Arena`]. Start from [`ArenaConfig::new`] and adjust fields or use the
/// builder methods.
#[derive(Clone)]
pub struct ArenaConfig {
    pub name: &'static str,
    /// The initial span (none if `size` is 0).
    pub base: u64,
    pub size: u64,
    /// Power of two: every base and size is a multiple of it.
    pub quantum: u64,
    /// Sizes up to this (a multiple of the quantum; 0: no caches) go through quantum caches.
    pub qcache_max: u64,
    /// CPUs the quantum caches have per-CPU magazines for; callers pass their index.
    pub ncpu: usize,
    pub source: Option<Arc<dyn VmemSource>>,
    /// Imports are rounded up to this (a multiple of the quantum; 0: the quantum).
    pub import_quantum: u64,
    /// Release an imported span when it becomes wholly free (false: keep what is imported,
    /// as FreeBSD's per-domain kernel arenas do).
    pub release_imports: bool,
    /// Check frees that go to a quantum cache, so that bad frees of cache-sized segments are
    /// rejected like any other. A free of a segment this CPU's cache handed out is checked
    /// against the CPU's outstanding set, under the CPU lock only; any other cache-sized free
    /// is checked against the arena (its lock). Off: Bonwick's unchecked fast path; a bad free
    /// of a cache-sized segment is then not detected.
    pub verify_qcache_frees: bool,
}

impl ArenaConfig {
    /// An empty arena with no caches, no source, one CPU.
    pub fn new(name: &'static str, quantum: u64) -> ArenaConfig {
        ArenaConfig {
            name,
            base: 0,
            size: 0,
            quantum,
            qcache_max: 0,
            ncpu: 1,
            source: None,
            import_quantum: 0,
            release_imports: true,
            verify_qcache_frees: true,
        }
    }

    pub fn span(mut self, base: u64, size: u64) -> Self {
        self.base = base;
        self.size = size;
        self
    }

    pub fn qcache(mut self, qcache_max: u64, ncpu: usize) -> Self {
        self.qcache_max = qcache_max;
        self.ncpu = ncpu;
        self
    }

    pub fn source(mut self, source: Arc<dyn VmemSource>, import_quantum: u64) -> Self {
        self.source = Some(source);
        self.import_quantum = import_quantum;
        self
    }

    pub fn keep_imports(mut self) -> Self {
        self.release_imports = false;
        self
    }

    pub fn trust_qcache_frees(mut self) -> Self {
        self.verify_qcache_frees = false;
        self
    }
}

/// A snapshot of an arena's accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmemStats {
    /// Bytes in spans (added and imported).
    pub total: u64,
    /// Bytes in imported spans.
    pub imported: u64,
    /// Bytes allocated to callers (not counting quantum-cached segments).
    pub in_use: u64,
    /// Bytes held in quantum caches (allocated from the arena, free to callers).
    pub cached: u64,
    /// Free bytes in the arena's free lists.
    pub free: u64,
    /// Segments allocated to callers.
    pub live: u64,
    /// Spans imported / released over the arena's life.
    pub imports: u64,
    pub releases: u64,
    /// Elementary steps done so far (see the module doc).
    pub work: u64,
}

/// A vmem arena. `Send + Sync`; every method takes `&self`.
pub struct Arena {
    name: &'static str,
    quantum: u64,
    qshift: u32,
    qcache_max: u64,
    ncpu: usize,
    source: Option<Arc<dyn VmemSource>>,
    import_quantum: u64,
    release_imports: bool,
    verify_qcache: bool,
    inner: Mutex<Inner>,
    qcaches: Box<[QCache]>,
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("name", &self.name)
            .field("quantum", &self.quantum)
            .field("qcache_max", &self.qcache_max)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Arena {
    /// Build an arena from `cfg` (validated: every field error is reported, nothing panics).
    pub fn new(cfg: ArenaConfig) -> Result<Arena, VmemError> {
        let q = cfg.quantum;
        if !q.is_power_of_two() {
            return Err(VmemError::BadQuantum(q));
        }
        if !cfg.qcache_max.is_multiple_of(q) || cfg.qcache_max / q > MAX_QCACHES {
            return Err(VmemError::BadQcacheMax {
                qcache_max: cfg.qcache_max,
                quantum: q,
            });
        }
        let import_quantum = if cfg.import_quantum == 0 {
            q
        } else {
            cfg.import_quantum
        };
        if !import_quantum.is_multiple_of(q) {
            return Err(VmemError::BadImportQuantum {
                import_quantum,
                quantum: q,
            });
        }
        if cfg.ncpu == 0 {
            return Err(VmemError::NoCpus);
        }
        let qcaches = (1..=cfg.qcache_max / q)
            .map(|k| QCache::new(k * q, cfg.ncpu))
            .collect();
        let arena = Arena {
            name: cfg.name,
            quantum: q,
            qshift: q.trailing_zeros(),
            qcache_max: cfg.qcache_max,
            ncpu: cfg.ncpu,
            source: cfg.source,
            import_quantum,
            release_imports: cfg.release_imports,
            verify_qcache: cfg.verify_qcache_frees,
            inner: Mutex::new(Inner::new(q)),
            qcaches,
        };
        if cfg.size != 0 {
            arena.add(cfg.base, cfg.size)?;
        }
        Ok(arena)
    }

    /// A plain arena over `[base, base + size)`: no caches, no source.
    pub fn create(
        name: &'static str,
        base: u64,
        size: u64,
        quantum: u64,
    ) -> Result<Arena, VmemError> {
        Arena::new(ArenaConfig::new(name, quantum).span(base, size))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn quantum(&self) -> u64 {
        self.quantum
    }

    pub fn qcache_max(&self) -> u64 {
        self.qcache_max
    }

    pub fn ncpu(&self) -> usize {
        self.ncpu
    }

    fn check_span(&self, base: u64, size: u64) -> Result<(), VmemError> {
        let q = self.quantum;
        if size == 0 {
            return Err(VmemError::ZeroSize);
        }
        if !base.is_multiple_of(q) {
            return Err(VmemError::Unaligned {
                what: "base",
                value: base,
                quantum: q,
            });
        }
        if !size.is_multiple_of(q) {
            return Err(VmemError::Unaligned {
                what: "size",
                value: size,
                quantum: q,
            });
        }
        if base.checked_add(size).is_none() {
            return Err(VmemError::SpanWraps { base, size });
        }
        Ok(())
    }

    /// Add the span `[base, base + size)`. It must not overlap a span of the arena; it is
    /// never coalesced with a neighbouring span (spans may come from different places).
    pub fn add(&self, base: u64, size: u64) -> Result<(), VmemError> {
        self.check_span(base, size)?;
        self.inner.lock().add_span(base, size, false)
    }

    #[inline]
    fn round(&self, size: u64) -> Result<u64, VmemError> {
        if size == 0 {
            return Err(VmemError::ZeroSize);
        }
        size.checked_add(self.quantum - 1)
            .map(|s| s & !(self.quantum - 1))
            .ok_or(VmemError::SizeOverflow { size })
    }

    #[inline]
    fn check_cpu(&self, cpu: usize) -> Result<(), VmemError> {
        if cpu < self.ncpu {
            Ok(())
        } else {
            Err(VmemError::BadCpu {
                cpu,
                ncpu: self.ncpu,
            })
        }
    }

    #[inline]
    fn qcache_for(&self, size: u64) -> &QCache {
        &self.qcaches[(size >> self.qshift) as usize - 1]
    }

    /// `size` bytes (rounded up to the quantum) by `policy`, on CPU 0.
    pub fn alloc(&self, size: u64, policy: Policy) -> Result<u64, VmemError> {
        self.alloc_on(0, size, policy)
    }

    /// `size` bytes by `policy` for a caller running on `cpu`: sizes up to `qcache_max`
    /// (except next fit) come from that CPU's quantum cache when it has one.
    #[inline]
    pub fn alloc_on(&self, cpu: usize, size: u64, policy: Policy) -> Result<u64, VmemError> {
        let size = self.round(size)?;
        self.check_cpu(cpu)?;
        if size <= self.qcache_max && policy != Policy::NextFit {
            let evict = |old: u64| {
                let r = self.inner.lock().set_cached(old, size, false);
                debug_assert!(r.is_ok(), "quantum cache evicted a bad segment: {r:?}");
            };
            if let Some(a) = self.qcache_for(size).alloc(cpu, self.verify_qcache, evict) {
                return Ok(a);
            }
        }
        self.alloc_want(Want::plain(size, self.quantum), policy)
    }

    /// A constrained allocation (illumos `vmem_xalloc`): `size` bytes at an address `a` with
    /// `a % align == phase`, `[a, a + size)` not crossing a multiple of `nocross`, and
    /// `minaddr <= a`, `a + size - 1 <= maxaddr`. `align` 0 means the quantum, `nocross` 0
    /// means none; `ADDR_MIN`/`ADDR_MAX` mean no bound. Bypasses the quantum caches.
    #[allow(clippy::too_many_arguments)] // the classic vmem_xalloc argument list
    pub fn xalloc(
        &self,
        size: u64,
        align: u64,
        phase: u64,
        nocross: u64,
        minaddr: u64,
        maxaddr: u64,
        policy: Policy,
    ) -> Result<u64, VmemError> {
        let q = self.quantum;
        let size = self.round(size)?;
        let align = if align == 0 { q } else { align };
        if !align.is_power_of_two() || align < q {
            return Err(VmemError::BadAlign { align, quantum: q });
        }
        if phase >= align || !phase.is_multiple_of(q) {
            return Err(VmemError::BadPhase { phase, align });
        }
        if nocross != 0 && (!nocross.is_power_of_two() || nocross < size) {
            return Err(VmemError::BadNocross { nocross, size });
        }
        if minaddr > maxaddr {
            return Err(VmemError::BadRange {
                min: minaddr,
                max: maxaddr,
            });
        }
        let w = Want {
            size,
            align,
            phase,
            nocross,
            min: minaddr,
            max: maxaddr,
        };
        self.alloc_want(w, policy)
    }

    /// The arena, then one import, then reaping the quantum caches.
    fn alloc_want(&self, w: Want, policy: Policy) -> Result<u64, VmemError> {
        if let Some(a) = self.inner.lock().alloc(&w, policy) {
            return Ok(a);
        }
        if let Some(src) = &self.source {
            if let Some(a) = self.import_and_alloc(src.as_ref(), &w, policy)? {
                return Ok(a);
            }
        }
        if !self.qcaches.is_empty() && self.reap() > 0 {
            if let Some(a) = self.inner.lock().alloc(&w, policy) {
                return Ok(a);
            }
        }
        Err(VmemError::Exhausted { size: w.size })
    }

    /// Import a span large enough for `w` (rounded up to the import quantum, aligned as `w`
    /// wants) and allocate from it. If the new span cannot serve (address constraints the
    /// source cannot know about), it goes straight back: imports and releases stay balanced.
    fn import_and_alloc(
        &self,
        src: &dyn VmemSource,
        w: &Want,
        policy: Policy,
    ) -> Result<Option<u64>, VmemError> {
        let iq = self.import_quantum;
        let size = w
            .size
            .checked_add(w.phase)
            .and_then(|s| s.checked_add(iq - 1))
            .map(|s| s / iq * iq)
            .ok_or(VmemError::SizeOverflow { size: w.size })?;
        let base = src.import(size, w.align)?;
        if self.check_span(base, size).is_err() {
            src.release(base, size);
            return Err(VmemError::BadImport { base, size });
        }
        let mut g = self.inner.lock();
        if g.add_span(base, size, true).is_err() {
            drop(g);
            src.release(base, size);
            return Err(VmemError::BadImport { base, size });
        }
        if let Some(a) = g.alloc(w, policy) {
            return Ok(Some(a));
        }
        let rel = if self.release_imports {
            g.take_free_span(base)
        } else {
            None
        };
        drop(g);
        self.release(rel);
        Ok(None)
    }

    #[inline]
    fn release(&self, rel: Release) {
        if let (Some((base, size)), Some(src)) = (rel, &self.source) {
            src.release(base, size);
        }
    }

    /// Free `[addr, addr + size)` (size as allocated, rounded to the quantum), on CPU 0.
    pub fn free(&self, addr: u64, size: u64) -> Result<(), VmemError> {
        self.free_on(0, addr, size)
    }

    /// Free from a caller on `cpu`: cache-sized segments go to that CPU's quantum cache.
    #[inline]
    pub fn free_on(&self, cpu: usize, addr: u64, size: u64) -> Result<(), VmemError> {
        let size = self.round(size)?;
        self.check_cpu(cpu)?;
        if size <= self.qcache_max {
            let qc = self.qcache_for(size);
            if self.verify_qcache {
                if qc.free_tracked(cpu, addr) {
                    return Ok(());
                }
                self.mark_cached(qc, addr, size)?;
            }
            qc.free(cpu, addr);
            return Ok(());
        }
        self.xfree_rounded(addr, size)
    }

    /// The checked slow path of a cache-sized free that is not in this CPU's outstanding set:
    /// the arena must know the segment as allocated, of this size, and not cached; or it is
    /// in another CPU's outstanding set (allocated there, freed here). A segment evicted from
    /// a set between the two looks is unmarked by then, so the second look at the arena sees
    /// it; anything else is a bad free, and nothing has changed.
    #[cold]
    fn mark_cached(&self, qc: &QCache, addr: u64, size: u64) -> Result<(), VmemError> {
        let r = self.inner.lock().set_cached(addr, size, true);
        match r {
            Err(VmemError::AlreadyFree { .. }) => {}
            r => return r,
        }
        if qc.claim(addr) {
            return Ok(());
        }
        self.inner.lock().set_cached(addr, size, true)
    }

    /// Free straight to the arena, bypassing the quantum caches (illumos `vmem_xfree`).
    pub fn xfree(&self, addr: u64, size: u64) -> Result<(), VmemError> {
        let size = self.round(size)?;
        self.xfree_rounded(addr, size)
    }

    #[inline]
    fn xfree_rounded(&self, addr: u64, size: u64) -> Result<(), VmemError> {
        // (The guard must be gone before the slow path locks again.)
        let r = self
            .inner
            .lock()
            .free(addr, size, false, self.release_imports);
        let rel = match r {
            Err(VmemError::AlreadyFree { .. }) if self.verify_qcache && size <= self.qcache_max => {
                self.xfree_outstanding(addr, size)?
            }
            r => r?,
        };
        self.release(rel);
        Ok(())
    }

    /// `xfree` of a segment marked cached: valid if it is in an outstanding set (a cached
    /// allocation freed past the cache), or was evicted from one meanwhile.
    #[cold]
    fn xfree_outstanding(&self, addr: u64, size: u64) -> Result<Release, VmemError> {
        let claimed = self.qcache_for(size).claim(addr);
        self.inner
            .lock()
            .free(addr, size, claimed, self.release_imports)
    }

    /// Return every segment held in the quantum caches to the arena (Bonwick's reap; illumos
    /// and FreeBSD drain the caches this way under memory pressure). Returns the number of
    /// segments returned. A segment the arena rejects (only possible when the caches trust
    /// frees and a caller freed a bad one) is dropped.
    pub fn reap(&self) -> usize {
        self.reap_inner(false)
    }

    /// Reap, and also free the empty magazines.
    pub fn drain(&self) -> usize {
        self.reap_inner(true)
    }

    fn reap_inner(&self, free_magazines: bool) -> usize {
        let mut n = 0;
        let mut addrs = Vec::new();
        let mut rels = Vec::new();
        for qc in self.qcaches.iter() {
            addrs.clear();
            qc.reap(&mut addrs, free_magazines);
            n += addrs.len();
            let mut g = self.inner.lock();
            for &a in &addrs {
                if let Ok(Some(r)) = g.free(a, qc.size, self.verify_qcache, self.release_imports) {
                    rels.push(r);
                }
            }
        }
        for r in rels {
            self.release(Some(r));
        }
        n
    }

    /// The accounting (exact when no other thread is using the arena).
    pub fn stats(&self) -> VmemStats {
        let (mut cached_segs, mut cached_bytes, mut qwork) = (0, 0, 0);
        for qc in self.qcaches.iter() {
            let (n, w) = qc.counts();
            cached_segs += n;
            cached_bytes += n * qc.size;
            qwork += w;
        }
        let c = self.inner.lock().c;
        VmemStats {
            total: c.total,
            imported: c.imported,
            in_use: c.in_use - cached_bytes.min(c.in_use),
            cached: cached_bytes,
            free: c.free,
            live: c.live - cached_segs.min(c.live),
            imports: c.imports,
            releases: c.releases,
            work: c.work + qwork,
        }
    }

    /// The work counter alone (see [`VmemStats::work`]).
    pub fn work(&self) -> u64 {
        self.stats().work
    }

    /// Check every invariant (VMEM-1..12 of docs/INVARIANTS.md): the segment list, free lists,
    /// bitmap, hash, slab and counters, and that the quantum caches hold only allocated segments of
    /// their size, each once. The cross-check between caches and arena is exact only when no
    /// other thread is using the arena.
    pub fn audit(&self) -> Result<(), String> {
        let mut cached: Vec<(u64, u64)> = Vec::new();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        for qc in self.qcaches.iter() {
            buf.clear();
            out.clear();
            qc.contents(&mut buf, &mut out)?;
            if !self.verify_qcache && !out.is_empty() {
                return Err("an unchecked quantum cache tracks outstanding segments".into());
            }
            cached.extend(buf.iter().chain(&out).map(|&a| (a, qc.size)));
        }
        let g = self.inner.lock();
        g.audit()?;
        if self.release_imports {
            for (&base, &st) in &g.spans {
                let span = g.segs.t(st);
                let f = g.segs.t(span.next);
                if span.imported && f.kind == seg::Kind::Free && f.size == span.size {
                    return Err(alloc::format!(
                        "imported span {base:#x} wholly free but kept"
                    ));
                }
            }
        }
        if self.verify_qcache && cached.len() as u64 != g.c.cached {
            return Err(alloc::format!(
                "{} segments in quantum caches or outstanding sets, {} marked cached",
                cached.len(),
                g.c.cached
            ));
        }
        cached.sort_unstable();
        for w in cached.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(alloc::format!("{:#x} cached twice", w[0].0));
            }
        }
        let mut work = 0;
        for &(a, size) in &cached {
            let ok = g.hash.find(&g.segs, a, &mut work).is_some_and(|i| {
                let t = g.segs.t(i);
                t.size == size && t.cached == self.verify_qcache
            });
            if !ok {
                return Err(alloc::format!(
                    "quantum cache {size:#x} holds {a:#x}, not such a segment"
                ));
            }
        }
        Ok(())
    }
}

/// An arena is a source for arenas layered on it (Bonwick's arena stacking).
impl VmemSource for Arena {
    fn import(&self, size: u64, align: u64) -> Result<u64, VmemError> {
        self.xalloc(
            size,
            align.max(self.quantum),
            0,
            0,
            ADDR_MIN,
            ADDR_MAX,
            Policy::InstantFit,
        )
    }

    fn release(&self, base: u64, size: u64) {
        let r = self.xfree(base, size);
        debug_assert!(
            r.is_ok(),
            "vmem {}: release of {base:#x}+{size:#x}: {r:?}",
            self.name
        );
    }
}

impl Drop for Arena {
    /// Cached segments go back to the arena, and every imported span to the source (as
    /// illumos `vmem_destroy` does, whatever is still allocated in it).
    fn drop(&mut self) {
        self.drain();
        if let Some(src) = &self.source {
            let spans: Vec<(u64, u64)> = self.inner.get_mut().imported_spans().collect();
            for (base, size) in spans {
                src.release(base, size);
            }
        }
    }
}

#[cfg(test)]
mod tests;
