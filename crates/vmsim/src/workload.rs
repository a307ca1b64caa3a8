//! The run's workload: every CPU of one machine runs a random mix of pmap operations
//! ([`OpKind`]) and accesses at once, against a model that predicts every result.
//!
//! **Ownership.** Each CPU owns its address spaces (up to [`MAX_SPACES`]), its kernel windows
//! (KVA it claimed with `growkernel`) and the frames mapped in them: only the owner changes
//! them, so its model is exact. Other CPUs *visit* them: they activate another CPU's address
//! space (so that its changes need shootdowns to them) and read its pages and kernel windows.
//!
//! **Checking.** The owner checks each of its accesses exactly (a value it wrote, the frame's
//! tag in word 0, or a fault), and after each operation compares the pmap's view
//! (`PmapSystem::mapping`) of the pages it touched with the model. A visitor checks with a
//! sequence lock per region: the owner makes the region's sequence odd before changing its
//! mappings and even after the operation (and its shootdown) returned and the expected tags are
//! published; a read taken between two equal even values must see the published tag, or fault
//! if the page is unmapped. A stale TLB entry on the visitor's CPU shows as a wrong tag.
//!
//! **Frame tags.** Every data frame gets a fresh tag in word 0 when it is allocated, so a read
//! through a wrong or stale translation is recognised. Word 1 is never written; words 2.. carry
//! the owner's writes (the last one per frame is remembered and checked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys::platform::CpuId;
use vmsys::pmap::WB;
use vmsys::{EnterFlags, PhysAddr, Pmap, PmapError, PmapSystem, VirtAddr};
use vmsys_arch::Prot;
use vmsys_sim::{Cpu, Machine};

use crate::frames::DataFrames;
use crate::ops::{OpCounts, OpKind, Picker};
use vmsys::kmem::Kmem;

pub const PAGE: u64 = 4096;
/// Regions (each one superpage of the format's smallest size) per address space.
pub const REGIONS: usize = 4;
/// Address spaces a CPU owns at most.
pub const MAX_SPACES: usize = 3;
/// Kernel windows a CPU claims at most.
pub const MAX_KWINS: usize = 3;
/// How many problems each CPU describes in full (all are counted).
const KEEP_ERRORS: usize = 8;
/// Frame tags carry this in their top byte.
const TAG_MAGIC: u64 = 0xA5 << 56;
/// Reads per visit.
const VISIT_READS: usize = 8;

/// A 64-bit mix (splitmix64's finaliser), to derive independent seeds from one.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The PmapSystem of a run.
pub type Sys = PmapSystem<Machine>;
/// Live kmem allocations a CPU keeps at most.
const MAX_KALLOCS: usize = 12;

/// A barrier whose waiters keep taking interrupts (shootdowns, the machine's audit), which a
/// host `Barrier` would not: a CPU blocked in one would deadlock any CPU that interrupts it.
pub struct SpinBarrier {
    n: u32,
    count: AtomicU32,
    gen: AtomicU64,
}

impl SpinBarrier {
    pub fn new(n: u32) -> Self {
        SpinBarrier {
            n,
            count: AtomicU32::new(0),
            gen: AtomicU64::new(0),
        }
    }

    /// Wait for all `n`; exactly one caller (the last to arrive) gets `true`.
    pub fn wait(&self, c: &Cpu<'_>) -> bool {
        let g = self.gen.load(SeqCst);
        if self.count.fetch_add(1, SeqCst) + 1 == self.n {
            self.count.store(0, SeqCst);
            self.gen.fetch_add(1, SeqCst);
            return true;
        }
        let mut spins = 0u32;
        while self.gen.load(SeqCst) == g {
            c.take_interrupts();
            spins += 1;
            if spins.is_multiple_of(32) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        false
    }
}

/// Spin until `done()`, taking interrupts.
fn spin_until(c: &Cpu<'_>, done: impl Fn() -> bool) {
    while !done() {
        c.take_interrupts();
        std::thread::yield_now();
    }
}

/// What an address space shows other CPUs.
pub struct SpaceShared {
    pub pmap: Arc<Pmap>,
    pub owner: CpuId,
    seq: [AtomicU64; REGIONS],
    /// The tag each page reads as in word 0 (0: unmapped).
    published: Vec<AtomicU64>,
    visitors: AtomicU32,
    closing: AtomicBool,
}

/// What a kernel window shows other CPUs.
pub struct KWinShared {
    pub base: u64,
    pub owner: CpuId,
    seq: AtomicU64,
    published: Vec<AtomicU64>,
}

/// Results of the audits made during and after the run.
#[derive(Clone, Debug, Default)]
pub struct AuditTally {
    /// Audits made (each is the pmap's `audit()` and the machine's).
    pub checks: u64,
    /// Broken pmap invariants.
    pub pmap_violations: u64,
    /// Stale TLB, walk-cache or PDPTE state the machine's audit found.
    pub machine_violations: u64,
    pub details: Vec<String>,
}

impl AuditTally {
    fn note(&mut self, s: String) {
        if self.details.len() < KEEP_ERRORS {
            self.details.push(s);
        }
    }
}

/// The run's geometry.
#[derive(Clone, Copy, Debug)]
pub struct Geo {
    /// First VA of every address space's window.
    pub base: u64,
    /// Region (smallest superpage) size and pages in it.
    pub region: u64,
    pub ppr: usize,
    /// The top of memory, where each CPU's scratch frame is (outside the data frames).
    pub scratch_top: u64,
}

impl Geo {
    pub fn pages(&self) -> usize {
        REGIONS * self.ppr
    }
    pub fn va(&self, i: usize) -> u64 {
        self.base + i as u64 * PAGE
    }
}

/// Everything the CPUs share.
pub struct Shared {
    pub m: Arc<Machine>,
    pub sys: Arc<Sys>,
    pub kmem: Arc<Kmem<Machine>>,
    pub frames: DataFrames,
    pub geo: Geo,
    spaces: Mutex<Vec<Arc<SpaceShared>>>,
    kwins: Mutex<Vec<Arc<KWinShared>>>,
    next_tag: AtomicU64,
    /// Operations done by all CPUs (the progress bar reads it).
    pub done: AtomicU64,
    audit_every: u64,
    next_audit: AtomicU64,
    audit_pending: AtomicBool,
    barrier: SpinBarrier,
    finished: AtomicU32,
    pub audits: Mutex<AuditTally>,
    /// The pmap's state after the run, before the teardown (taken by the final audit).
    pub before_teardown: Mutex<Option<Snapshot>>,
    /// When the last CPU finished its operations.
    pub ops_end: Mutex<Option<std::time::Instant>>,
}

/// The pmap's state at the end of the operations.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub audit: Option<vmsys::pmap::AuditReport>,
    pub pv_entries: u64,
    pub kernel_resident: u64,
    pub kernel_end: u64,
    pub spaces: u64,
    /// Kernel memory (arenas, allocations) at the end of the operations.
    pub kmem: vmsys::kmem::KmemSnapshot,
}

/// What one CPU did and saw.
#[derive(Clone, Debug, Default)]
pub struct CpuStats {
    pub counts: OpCounts,
    /// Accesses checked by the owner.
    pub owner_checks: u64,
    /// Visitor reads checked, and discarded because the region changed meanwhile.
    pub visit_checks: u64,
    pub visit_discarded: u64,
    /// Writes that faulted on a clean (write-protected) writable entry and were retried after
    /// entering the page again as dirty, as a kernel's fault handler does.
    pub soft_faults: u64,
    /// Pages of unaccessed superpages that a demotion destroyed (legitimately) instead.
    pub destroyed_pages: u64,
    /// Operations skipped because their precondition did not hold (picked again).
    pub skipped: u64,
    /// Wrong values, wrong faults, and pmap results the model did not predict.
    pub errors: u64,
    pub details: Vec<String>,
}

impl CpuStats {
    pub fn merge(&mut self, o: &CpuStats) {
        self.counts.merge(&o.counts);
        self.owner_checks += o.owner_checks;
        self.visit_checks += o.visit_checks;
        self.visit_discarded += o.visit_discarded;
        self.soft_faults += o.soft_faults;
        self.destroyed_pages += o.destroyed_pages;
        self.skipped += o.skipped;
        self.errors += o.errors;
        for d in &o.details {
            if self.details.len() < KEEP_ERRORS {
                self.details.push(d.clone());
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pg {
    /// 0: unmapped.
    frame: u64,
    w: bool,
    wired: bool,
}

struct FrameInfo {
    tag: u64,
    maps: u32,
    /// The owner's last write to the frame: byte offset and value.
    last: Option<(u64, u64)>,
}

struct Space {
    sh: Arc<SpaceShared>,
    pages: Vec<Pg>,
}

struct KWin {
    sh: Arc<KWinShared>,
    pages: Vec<u64>,
}

/// One CPU's run: its model, its RNG, its counters.
struct CpuRun<'a, 'c> {
    s: &'a Shared,
    c: &'a Cpu<'c>,
    me: CpuId,
    rng: SmallRng,
    picker: Picker,
    st: CpuStats,
    spaces: Vec<Space>,
    /// The space active here (None: the kernel pmap).
    home: Option<usize>,
    frames: HashMap<u64, FrameInfo>,
    kwins: Vec<KWin>,
    scratch: u64,
    /// (space, region) mapped by an unaccessed superpage when its change began.
    droppable: Vec<(usize, usize)>,
    /// Live kmem_malloc allocations: (va, size, tag in the first and last word).
    kallocs: Vec<(u64, u64, u64)>,
}

/// What each CPU hands back at the end.
pub struct CpuOutcome {
    pub stats: CpuStats,
}

impl Shared {
    pub fn new(
        m: Arc<Machine>,
        sys: Arc<Sys>,
        kmem: Arc<Kmem<Machine>>,
        frames: DataFrames,
        geo: Geo,
        audit_every: u64,
    ) -> Self {
        let n = m.config().cpus;
        Shared {
            m,
            sys,
            kmem,
            frames,
            geo,
            spaces: Mutex::new(Vec::new()),
            kwins: Mutex::new(Vec::new()),
            next_tag: AtomicU64::new(1),
            done: AtomicU64::new(0),
            audit_every,
            next_audit: AtomicU64::new(if audit_every == 0 {
                u64::MAX
            } else {
                audit_every
            }),
            audit_pending: AtomicBool::new(false),
            barrier: SpinBarrier::new(n),
            finished: AtomicU32::new(0),
            audits: Mutex::new(AuditTally::default()),
            before_teardown: Mutex::new(None),
            ops_end: Mutex::new(None),
        }
    }

    /// Run `ops` operations on the calling CPU (every CPU calls this at once).
    pub fn cpu_main(&self, c: &Cpu<'_>, ops: u64, seed: u64) -> CpuOutcome {
        let me = c.id();
        let mut r = CpuRun {
            s: self,
            c,
            me,
            rng: SmallRng::seed_from_u64(mix(seed, me as u64 + 1)),
            picker: Picker::default(),
            st: CpuStats::default(),
            spaces: Vec::new(),
            home: None,
            frames: HashMap::new(),
            kwins: Vec::new(),
            scratch: self.geo.scratch_top + me as u64 * PAGE,
            droppable: Vec::new(),
            kallocs: Vec::new(),
        };
        // Start with one address space, active here.
        if r.create_space() {
            r.switch_to(Some(0));
        }
        self.barrier.wait(c);
        for _ in 0..ops {
            let mut kind = r.picker.pick(&mut r.rng);
            let mut tries = 0;
            while !r.perform(kind) {
                r.st.skipped += 1;
                tries += 1;
                kind = if tries < 8 {
                    r.picker.pick(&mut r.rng)
                } else {
                    OpKind::Read
                };
                if tries > 16 {
                    break;
                }
            }
            r.st.counts.add(kind);
            self.after_op(c);
        }
        // Done: stay available for audits until every CPU is.
        if self.finished.fetch_add(1, SeqCst) + 1 == self.m.config().cpus {
            *self.ops_end.lock().unwrap() = Some(std::time::Instant::now());
        }
        while self.finished.load(SeqCst) < self.m.config().cpus {
            if self.audit_pending.load(SeqCst) {
                self.audit_barrier(c);
            }
            c.take_interrupts();
            std::thread::yield_now();
        }
        // Nobody runs ops any more: verify everything this CPU owns, then tear it down.
        self.barrier.wait(c);
        r.verify_all();
        if self.barrier.wait(c) {
            let rep = self.audit_now();
            *self.before_teardown.lock().unwrap() = Some(Snapshot {
                audit: rep,
                pv_entries: self.sys.pv_in_use(),
                kernel_resident: self.sys.kernel_pmap().resident_count(),
                kernel_end: self.sys.kernel_end().as_u64(),
                spaces: self.spaces.lock().unwrap().len() as u64,
                kmem: self.kmem.stats(),
            });
        }
        self.barrier.wait(c);
        r.teardown();
        self.barrier.wait(c);
        CpuOutcome { stats: r.st }
    }

    fn after_op(&self, c: &Cpu<'_>) {
        let n = self.done.fetch_add(1, SeqCst) + 1;
        let due = self.next_audit.load(SeqCst);
        if n >= due
            && self
                .next_audit
                .compare_exchange(due, due + self.audit_every, SeqCst, SeqCst)
                .is_ok()
        {
            self.audit_pending.store(true, SeqCst);
        }
        if self.audit_pending.load(SeqCst) {
            self.audit_barrier(c);
        }
    }

    fn audit_barrier(&self, c: &Cpu<'_>) {
        if self.barrier.wait(c) {
            self.audit_now();
            self.audit_pending.store(false, SeqCst);
        }
        self.barrier.wait(c);
    }

    /// The pmap's audit and the machine's (call with every other CPU quiesced, on a CPU).
    pub fn audit_now(&self) -> Option<vmsys::pmap::AuditReport> {
        let mut t = self.audits.lock().unwrap_or_else(|e| e.into_inner());
        t.checks += 1;
        let rep = match self.sys.audit() {
            Ok(r) => Some(r),
            Err(errs) => {
                t.pmap_violations += errs.len() as u64;
                for e in errs {
                    t.note(format!("pmap audit: {}: {}", e.invariant, e.detail));
                }
                None
            }
        };
        if let Err(errs) = self.kmem.audit() {
            t.pmap_violations += errs.len() as u64;
            for e in errs {
                t.note(format!("kmem audit: {e}"));
            }
        }
        let v = self.m.audit();
        t.machine_violations += v.len() as u64;
        for x in v {
            t.note(format!("machine audit: {x}"));
        }
        rep
    }

    fn new_tag(&self) -> u64 {
        TAG_MAGIC | self.next_tag.fetch_add(1, SeqCst)
    }
}

/// The rights and flags of a managed user mapping: writable (and entered dirty) if `w`.
fn user_mapping(w: bool, wired: bool) -> (Prot, EnterFlags) {
    let mut fl = EnterFlags::MANAGED;
    fl.set(EnterFlags::DIRTY, w);
    fl.set(EnterFlags::WIRED, wired);
    (if w { Prot::WRITE } else { Prot::empty() }, fl)
}

fn is_odd(x: u64) -> bool {
    x & 1 == 1
}

impl CpuRun<'_, '_> {
    fn err(&mut self, what: impl FnOnce() -> String) {
        self.st.errors += 1;
        if self.st.details.len() < KEEP_ERRORS {
            let me = self.me;
            self.st.details.push(format!("cpu {me}: {}", what()));
        }
    }

    fn sys(&self) -> &Sys {
        &self.s.sys
    }

    // --- frames ----------------------------------------------------------------------------

    fn tag_frame(&mut self, pa: u64) {
        let tag = self.s.new_tag();
        self.s.m.mem().store_u64(pa, tag);
        self.frames.insert(
            pa,
            FrameInfo {
                tag,
                maps: 0,
                last: None,
            },
        );
    }

    fn new_frame(&mut self) -> Option<u64> {
        let pa = self.s.frames.alloc_page()?;
        self.tag_frame(pa);
        Some(pa)
    }

    /// A block with pages `[k, k + n)` tagged and kept, the rest freed.
    fn new_block_part(&mut self, k: usize, n: usize) -> Option<u64> {
        let b = self.s.frames.alloc_block()?;
        for j in 0..self.s.geo.ppr {
            let pa = b + j as u64 * PAGE;
            if j >= k && j < k + n {
                self.tag_frame(pa);
            } else {
                self.s.frames.free_page(pa);
            }
        }
        Some(b)
    }

    fn map_ref(&mut self, pa: u64) {
        self.frames.get_mut(&pa).expect("a tracked frame").maps += 1;
    }

    fn unref(&mut self, pa: u64) {
        let f = self.frames.get_mut(&pa).expect("a tracked frame");
        f.maps -= 1;
        if f.maps == 0 {
            self.frames.remove(&pa);
            self.s.frames.free_page(pa);
        }
    }

    /// Free a frame that was allocated for a mapping that did not happen.
    fn drop_if_unmapped(&mut self, pa: u64) {
        if self.frames.get(&pa).is_some_and(|f| f.maps == 0) {
            self.frames.remove(&pa);
            self.s.frames.free_page(pa);
        }
    }

    // --- spaces ----------------------------------------------------------------------------

    fn pick_space(&mut self) -> Option<usize> {
        if self.spaces.is_empty() {
            None
        } else {
            Some(self.rng.gen_range(0..self.spaces.len()))
        }
    }

    /// Start changing region `region` of space `si`: visitors stop judging its reads. If the
    /// pmap maps the region with a superpage whose accessed bit is clear, a demotion may
    /// destroy it instead (FreeBSD's choice, as the VM refaults such pages): `end` then takes
    /// the pmap's word for that region.
    fn begin(&mut self, si: usize, region: usize) {
        let prev = self.spaces[si].sh.seq[region].fetch_add(1, SeqCst);
        debug_assert!(!is_odd(prev));
        let va = self.s.geo.va(region * self.s.geo.ppr);
        if let Some(m) = self
            .sys()
            .mapping(&self.spaces[si].sh.pmap, VirtAddr::new(va))
        {
            if m.size > PAGE && !m.accessed {
                self.droppable.push((si, region));
            }
        }
    }

    /// Publish the regions of pages `[lo, hi)` and end their change.
    fn end(&mut self, si: usize, lo: usize, hi: usize) {
        let ppr = self.s.geo.ppr;
        let (r0, r1) = (lo / ppr, (hi - 1) / ppr);
        // Superpages the pmap may have destroyed rather than demoted.
        let drops: Vec<usize> = self
            .droppable
            .iter()
            .filter(|&&(s, r)| s == si && r >= r0 && r <= r1)
            .map(|&(_, r)| r)
            .collect();
        self.droppable
            .retain(|&(s, r)| !(s == si && r >= r0 && r <= r1));
        for r in drops {
            for i in r * ppr..(r + 1) * ppr {
                let pg = self.spaces[si].pages[i];
                if pg.frame == 0 {
                    continue;
                }
                let va = VirtAddr::new(self.s.geo.va(i));
                if self.sys().extract(&self.spaces[si].sh.pmap, va).is_none() {
                    self.st.destroyed_pages += 1;
                    self.spaces[si].pages[i] = Pg::default();
                    self.unref(pg.frame);
                }
            }
        }
        let sp = &self.spaces[si];
        for i in r0 * ppr..(r1 + 1) * ppr {
            let pg = sp.pages[i];
            let tag = if pg.frame == 0 {
                0
            } else {
                self.frames[&pg.frame].tag
            };
            sp.sh.published[i].store(tag, SeqCst);
        }
        for r in r0..=r1 {
            if is_odd(sp.sh.seq[r].load(SeqCst)) {
                sp.sh.seq[r].fetch_add(1, SeqCst);
            }
        }
    }

    fn begin_all(&mut self, si: usize) {
        for r in 0..REGIONS {
            self.begin(si, r);
        }
    }

    fn end_all(&mut self, si: usize) {
        self.end(si, 0, self.s.geo.pages());
    }

    fn create_space(&mut self) -> bool {
        if self.spaces.len() >= MAX_SPACES {
            return false;
        }
        let pmap = match self.sys().create() {
            Ok(p) => p,
            Err(PmapError::ResourceShortage) => return false,
            Err(e) => {
                self.err(|| format!("create: {e}"));
                return false;
            }
        };
        let n = self.s.geo.pages();
        let sh = Arc::new(SpaceShared {
            pmap,
            owner: self.me,
            seq: Default::default(),
            published: (0..n).map(|_| AtomicU64::new(0)).collect(),
            visitors: AtomicU32::new(0),
            closing: AtomicBool::new(false),
        });
        self.s.spaces.lock().unwrap().push(sh.clone());
        self.spaces.push(Space {
            sh,
            pages: vec![Pg::default(); n],
        });
        true
    }

    fn switch_to(&mut self, to: Option<usize>) {
        let r = match to {
            Some(i) => self.sys().activate(&self.spaces[i].sh.pmap),
            None => {
                let k = self.sys().kernel_pmap().clone();
                self.sys().activate(&k)
            }
        };
        if let Err(e) = r {
            self.err(|| format!("activate: {e}"));
        }
        self.home = to;
    }

    /// The pmap's view of pages `[lo, hi)` of space `si` against the model (every page of a
    /// short range; the ends and a sample of a long one).
    fn verify(&mut self, si: usize, lo: usize, hi: usize) {
        let n = hi - lo;
        if n <= 32 {
            for i in lo..hi {
                self.verify_page(si, i);
            }
        } else {
            self.verify_page(si, lo);
            self.verify_page(si, hi - 1);
            for _ in 0..16 {
                let i = self.rng.gen_range(lo..hi);
                self.verify_page(si, i);
            }
        }
    }

    fn verify_page(&mut self, si: usize, i: usize) {
        let va = self.s.geo.va(i);
        let pg = self.spaces[si].pages[i];
        let m = self
            .sys()
            .mapping(&self.spaces[si].sh.pmap, VirtAddr::new(va));
        let bad = match (m, pg.frame) {
            (None, 0) => None,
            (None, f) => Some(format!("unmapped, expected frame {f:#x}")),
            (Some(m), 0) => Some(format!("maps {:#x}, expected unmapped", m.pa.as_u64())),
            (Some(m), f) => {
                let writable = m.prot.contains(Prot::WRITE);
                if m.pa.as_u64() != f {
                    Some(format!("maps {:#x}, expected {f:#x}", m.pa.as_u64()))
                } else if m.wired != pg.wired {
                    Some(format!("wired {}, expected {}", m.wired, pg.wired))
                } else if !m.managed {
                    Some("unmanaged, expected managed".into())
                } else if writable && !pg.w {
                    Some("writable, expected read-only".into())
                } else if !writable && pg.w && m.dirty {
                    Some("read-only and dirty, expected writable".into())
                } else {
                    None
                }
            }
        };
        if let Some(b) = bad {
            let owner = self.me;
            self.err(|| format!("space of cpu {owner}, va {va:#x}: {b}"));
        }
    }

    fn verify_all(&mut self) {
        for i in 0..self.kallocs.len() {
            self.check_kalloc(i);
        }
        for si in 0..self.spaces.len() {
            for i in 0..self.s.geo.pages() {
                self.verify_page(si, i);
            }
            let mapped = self.spaces[si]
                .pages
                .iter()
                .filter(|p| p.frame != 0)
                .count() as u64;
            let wired = self.spaces[si].pages.iter().filter(|p| p.wired).count() as u64;
            let pmap = &self.spaces[si].sh.pmap;
            let (res, wc) = (pmap.resident_count(), pmap.wired_count());
            if res != mapped || wc != wired {
                self.err(|| {
                    format!(
                        "resident/wired counts {res}/{wc}, the model has {mapped}/{wired} mapped/wired"
                    )
                });
            }
        }
        for wi in 0..self.kwins.len() {
            for i in 0..self.kwins[wi].pages.len() {
                self.verify_kpage(wi, i);
            }
        }
    }

    fn verify_kpage(&mut self, wi: usize, i: usize) {
        let va = self.kwins[wi].sh.base + i as u64 * PAGE;
        let want = self.kwins[wi].pages[i];
        let got = self
            .sys()
            .extract(self.sys().kernel_pmap(), VirtAddr::new(va))
            .map_or(0, |p| p.as_u64());
        if got != want {
            self.err(|| format!("kernel va {va:#x} maps {got:#x}, expected {want:#x}"));
        }
    }

    // --- the operations ---------------------------------------------------------------------

    /// Do one operation of `kind`; `false` if its precondition does not hold now.
    fn perform(&mut self, kind: OpKind) -> bool {
        match kind {
            OpKind::CreateSpace => self.create_space(),
            OpKind::DestroySpace => self.destroy_space(),
            OpKind::Switch => self.op_switch(),
            OpKind::Visit => self.visit(),
            OpKind::Fork => self.fork(),
            OpKind::Read => self.read(),
            OpKind::Write => self.write(),
            OpKind::Enter => self.enter(),
            OpKind::EnterSuper => self.enter_super(),
            OpKind::EnterRange => self.enter_range(),
            OpKind::Fill => self.fill(),
            OpKind::Protect => self.protect_or_remove(false),
            OpKind::Remove => self.protect_or_remove(true),
            OpKind::Demote => self.demote(),
            OpKind::RemoveAll => self.remove_all(),
            OpKind::Unwire => self.unwire(),
            OpKind::GrowKernel => self.growkernel(),
            OpKind::Kenter => self.kenter(),
            OpKind::Kremove => self.kremove(),
            OpKind::Qenter => self.qenter(),
            OpKind::Qremove => self.qremove(),
            OpKind::QuickMap => self.quick_map(),
            OpKind::KmemAlloc => self.kmem_alloc(),
            OpKind::KmemFree => self.kmem_free(),
            OpKind::IoMap => self.io_map(false),
            OpKind::IoMapFault => self.io_map(true),
            OpKind::Bounce => self.bounce(),
        }
    }

    fn op_switch(&mut self) -> bool {
        let n = self.spaces.len();
        let to = self.rng.gen_range(0..=n);
        let to = (to < n).then_some(to);
        if to == self.home {
            return false;
        }
        self.switch_to(to);
        true
    }

    fn destroy_space(&mut self) -> bool {
        // Keep at least one space most of the time.
        if self.spaces.len() < 2 && self.rng.gen_ratio(3, 4) {
            return false;
        }
        let Some(si) = self.pick_space() else {
            return false;
        };
        if self.home == Some(si) {
            self.switch_to(None);
        }
        let sh = self.spaces[si].sh.clone();
        self.s
            .spaces
            .lock()
            .unwrap()
            .retain(|x| !Arc::ptr_eq(x, &sh));
        sh.closing.store(true, SeqCst);
        spin_until(self.c, || sh.visitors.load(SeqCst) == 0);
        self.begin_all(si);
        // The space goes away: nothing of it to reconcile, and the indices above it shift.
        self.droppable.retain(|&(s, _)| s != si);
        for d in &mut self.droppable {
            if d.0 > si {
                d.0 -= 1;
            }
        }
        let g = self.s.geo;
        let r = self.sys().remove(
            &sh.pmap,
            VirtAddr::new(g.base),
            VirtAddr::new(g.va(g.pages())),
        );
        if let Err(e) = r {
            self.err(|| format!("remove of a whole space: {e}"));
        }
        let frames: Vec<u64> = self.spaces[si]
            .pages
            .iter()
            .filter(|p| p.frame != 0)
            .map(|p| p.frame)
            .collect();
        for f in frames {
            self.unref(f);
        }
        if let Err(e) = self.sys().destroy(sh.pmap.clone()) {
            self.err(|| format!("destroy: {e}"));
        }
        self.spaces.remove(si);
        if let Some(h) = self.home {
            if h > si {
                self.home = Some(h - 1);
            }
        }
        true
    }

    fn visit(&mut self) -> bool {
        // Another CPU's address space (if any), and other CPUs' kernel windows.
        let target = {
            let list = self.s.spaces.lock().unwrap();
            let others: Vec<_> = list.iter().filter(|s| s.owner != self.me).collect();
            if others.is_empty() {
                None
            } else {
                Some(others[self.rng.gen_range(0..others.len())].clone())
            }
        };
        let kwin = {
            let list = self.s.kwins.lock().unwrap();
            let others: Vec<_> = list.iter().filter(|k| k.owner != self.me).collect();
            if others.is_empty() {
                None
            } else {
                Some(others[self.rng.gen_range(0..others.len())].clone())
            }
        };
        if target.is_none() && kwin.is_none() {
            return false;
        }
        let c = self.c;
        let g = self.s.geo;
        if let Some(t) = target {
            t.visitors.fetch_add(1, SeqCst);
            if !t.closing.load(SeqCst) {
                if let Err(e) = self.sys().activate(&t.pmap) {
                    self.err(|| format!("activate of a visited space: {e}"));
                }
                c.set_user(true);
                for _ in 0..VISIT_READS {
                    let i = self.rng.gen_range(0..g.pages());
                    let seq = &t.seq[i / g.ppr];
                    self.checked_read(seq, &t.published[i], g.va(i), "visit");
                }
                c.set_user(false);
                let home = self.home;
                self.switch_to(home);
            }
            t.visitors.fetch_sub(1, SeqCst);
        }
        if let Some(k) = kwin {
            c.set_user(false);
            for _ in 0..VISIT_READS / 2 {
                let i = self.rng.gen_range(0..k.published.len());
                self.checked_read(
                    &k.seq,
                    &k.published[i],
                    k.base + i as u64 * PAGE,
                    "kernel visit",
                );
            }
        }
        true
    }

    /// A visitor's read under the owner's sequence lock.
    fn checked_read(&mut self, seq: &AtomicU64, published: &AtomicU64, va: u64, what: &str) {
        let s1 = seq.load(SeqCst);
        if is_odd(s1) {
            self.st.visit_discarded += 1;
            return;
        }
        let want = published.load(SeqCst);
        let got = self.c.read_u64(va);
        if seq.load(SeqCst) != s1 {
            self.st.visit_discarded += 1;
            return;
        }
        self.st.visit_checks += 1;
        match (want, got) {
            (0, Err(_)) => {}
            (0, Ok(v)) => {
                self.err(|| format!("{what}: {va:#x} read {v:#x}, expected a fault (unmapped)"))
            }
            (w, Ok(v)) if v == w => {}
            (w, Ok(v)) => self.err(|| format!("{what}: {va:#x} read {v:#x}, expected tag {w:#x}")),
            (w, Err(f)) => {
                self.err(|| format!("{what}: {va:#x} faulted ({f}), expected tag {w:#x}"))
            }
        }
    }

    fn fork(&mut self) -> bool {
        if self.spaces.len() >= MAX_SPACES {
            return false;
        }
        let Some(pi) = self.pick_space() else {
            return false;
        };
        if !self.create_space() {
            return false;
        }
        let ci = self.spaces.len() - 1;
        let g = self.s.geo;
        let (base, len) = (VirtAddr::new(g.base), g.pages() as u64 * PAGE);
        // Copy-on-write: the parent becomes read-only first. (The child is visible to visitors
        // already: its regions change too.)
        self.begin_all(pi);
        self.begin_all(ci);
        let parent = self.spaces[pi].sh.pmap.clone();
        let child = self.spaces[ci].sh.pmap.clone();
        if let Err(e) = self.sys().protect(
            &parent,
            base,
            VirtAddr::new(base.as_u64() + len),
            Prot::empty(),
        ) {
            self.err(|| format!("fork: protect: {e}"));
        }
        for p in self.spaces[pi].pages.iter_mut() {
            p.w = false;
        }
        let expect: Vec<(usize, u64)> = self.spaces[pi]
            .pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.frame != 0 && !p.wired)
            .map(|(i, p)| (i, p.frame))
            .collect();
        match self.sys().copy(&child, &parent, base, len) {
            Ok(n) if n == expect.len() as u64 => {}
            Ok(n) => {
                let e = expect.len();
                self.err(|| format!("fork: copy copied {n} pages, expected {e}"));
            }
            Err(e) => self.err(|| format!("fork: copy: {e}")),
        }
        for (i, f) in expect {
            self.spaces[ci].pages[i] = Pg {
                frame: f,
                w: false,
                wired: false,
            };
            self.map_ref(f);
        }
        self.end_all(pi);
        self.end_all(ci);
        let n = g.pages();
        self.verify(pi, 0, n);
        self.verify(ci, 0, n);
        true
    }

    fn read(&mut self) -> bool {
        let c = self.c;
        let kernel = self.home.is_none() || self.rng.gen_ratio(1, 5);
        if kernel {
            if self.kwins.is_empty() {
                return false;
            }
            let wi = self.rng.gen_range(0..self.kwins.len());
            let i = self.rng.gen_range(0..self.kwins[wi].pages.len());
            let va = self.kwins[wi].sh.base + i as u64 * PAGE;
            let f = self.kwins[wi].pages[i];
            c.set_user(false);
            self.owner_read(va, f, "kernel read");
            return true;
        }
        let h = self.home.expect("checked");
        let i = self.rng.gen_range(0..self.s.geo.pages());
        let f = self.spaces[h].pages[i].frame;
        c.set_user(true);
        self.owner_read(self.s.geo.va(i), f, "read");
        c.set_user(false);
        true
    }

    /// Read `va` (mapped to `frame`, 0 = unmapped) and check it.
    fn owner_read(&mut self, va: u64, frame: u64, what: &str) {
        self.st.owner_checks += 1;
        let got = if frame == 0 {
            self.c.read_u64(va)
        } else {
            let fi = &self.frames[&frame];
            let (off, want) = match fi.last {
                Some(l) if self.rng.gen_bool(0.5) => l,
                _ => (0, fi.tag),
            };
            let got = self.c.read_u64(va + off);
            match got {
                Ok(v) if v == want => return,
                Ok(v) => {
                    return self
                        .err(|| format!("{what}: {:#x} read {v:#x}, expected {want:#x}", va + off))
                }
                Err(f) => return self.err(|| format!("{what}: {:#x} faulted: {f}", va + off)),
            }
        };
        if let Ok(v) = got {
            self.err(|| format!("{what}: {va:#x} read {v:#x}, expected a fault (unmapped)"));
        }
    }

    fn write(&mut self) -> bool {
        let Some(h) = self.home else {
            return false;
        };
        let c = self.c;
        let i = self.rng.gen_range(0..self.s.geo.pages());
        let va = self.s.geo.va(i);
        let pg = self.spaces[h].pages[i];
        let off = self.rng.gen_range(2..PAGE / 8) * 8;
        let val: u64 = self.rng.gen();
        self.st.owner_checks += 1;
        c.set_user(true);
        let mut r = c.write_u64(va + off, val);
        if r.is_err() && pg.frame != 0 && pg.w {
            // A clean entry write-protected by a promotion attempt: enter it again as written,
            // as a fault handler does, and retry once.
            self.st.soft_faults += 1;
            self.begin(h, i / self.s.geo.ppr);
            let mut fl = EnterFlags::MANAGED | EnterFlags::DIRTY;
            fl.set(EnterFlags::WIRED, pg.wired);
            let e = self.sys().enter(
                &self.spaces[h].sh.pmap,
                VirtAddr::new(va),
                PhysAddr::new(pg.frame),
                Prot::WRITE,
                fl,
                0,
            );
            self.end(h, i, i + 1);
            if let Err(e) = e {
                self.err(|| format!("write fault: enter: {e}"));
            }
            r = c.write_u64(va + off, val);
        }
        c.set_user(false);
        match (r, pg.frame != 0 && pg.w) {
            (Ok(()), true) => {
                self.frames.get_mut(&pg.frame).expect("tracked").last = Some((off, val));
            }
            (Err(_), false) => {}
            (Ok(()), false) => {
                if pg.frame != 0 {
                    self.frames.get_mut(&pg.frame).expect("tracked").last = Some((off, val));
                }
                self.err(|| format!("write: {va:#x} accepted a store, expected a fault ({pg:?})"));
            }
            (Err(f), true) => self.err(|| format!("write: {va:#x} faulted: {f} ({pg:?})")),
        }
        true
    }

    fn enter(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let i = self.rng.gen_range(0..self.s.geo.pages());
        let va = VirtAddr::new(self.s.geo.va(i));
        let pg = self.spaces[si].pages[i];
        let region = i / self.s.geo.ppr;
        let (frame, w, wired) = if pg.frame == 0 || self.rng.gen_ratio(1, 3) {
            let Some(f) = self.new_frame() else {
                return false;
            };
            (f, self.rng.gen_ratio(3, 4), self.rng.gen_ratio(1, 6))
        } else {
            (pg.frame, !pg.w, pg.wired)
        };
        let (prot, fl) = user_mapping(w, wired);
        self.begin(si, region);
        let r = self.sys().enter(
            &self.spaces[si].sh.pmap,
            va,
            PhysAddr::new(frame),
            prot,
            fl,
            0,
        );
        match r {
            Ok(()) => {
                if frame != pg.frame {
                    self.map_ref(frame);
                    if pg.frame != 0 {
                        self.unref(pg.frame);
                    }
                }
                self.spaces[si].pages[i] = Pg { frame, w, wired };
            }
            Err(e) => {
                self.drop_if_unmapped(frame);
                self.err(|| format!("enter {va}: {e}"));
            }
        }
        self.end(si, i, i + 1);
        self.verify(si, i, i + 1);
        true
    }

    /// An empty region of space `si`, if it has one (looked for from a random start).
    fn empty_region(&mut self, si: usize) -> Option<usize> {
        let ppr = self.s.geo.ppr;
        let start = self.rng.gen_range(0..REGIONS);
        (0..REGIONS).map(|k| (start + k) % REGIONS).find(|&r| {
            self.spaces[si].pages[r * ppr..(r + 1) * ppr]
                .iter()
                .all(|p| p.frame == 0)
        })
    }

    fn enter_super(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let Some(r) = self.empty_region(si) else {
            return false;
        };
        let ppr = self.s.geo.ppr;
        let Some(b) = self.new_block_part(0, ppr) else {
            return false;
        };
        let w = self.rng.gen_ratio(4, 5);
        let wired = self.rng.gen_ratio(1, 4);
        let (prot, fl) = user_mapping(w, wired);
        let lo = r * ppr;
        self.begin(si, r);
        let res = self.sys().enter(
            &self.spaces[si].sh.pmap,
            VirtAddr::new(self.s.geo.va(lo)),
            PhysAddr::new(b),
            prot,
            fl,
            1,
        );
        self.record_run(
            si,
            lo,
            b,
            ppr,
            Pg { frame: 0, w, wired },
            res,
            "enter of a superpage",
        );
        self.end(si, lo, lo + ppr);
        self.verify(si, lo, lo + ppr);
        true
    }

    /// Model the outcome of mapping `n` contiguous new frames from `pa` at pages `lo..lo + n`
    /// of space `si` with `pg`'s rights: the pages map them if `res` is Ok; otherwise the
    /// frames go back and the error is reported.
    #[allow(clippy::too_many_arguments)]
    fn record_run(
        &mut self,
        si: usize,
        lo: usize,
        pa: u64,
        n: usize,
        pg: Pg,
        res: Result<(), PmapError>,
        what: &str,
    ) {
        match res {
            Ok(()) => {
                for j in 0..n {
                    let frame = pa + j as u64 * PAGE;
                    self.map_ref(frame);
                    self.spaces[si].pages[lo + j] = Pg { frame, ..pg };
                }
            }
            Err(e) => {
                for j in 0..n {
                    self.drop_if_unmapped(pa + j as u64 * PAGE);
                }
                self.err(|| format!("{what}: {e}"));
            }
        }
    }

    fn enter_range(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let ppr = self.s.geo.ppr;
        let r = self.rng.gen_range(0..REGIONS);
        let k = self.rng.gen_range(0..ppr);
        let want = self.rng.gen_range(1..=32usize);
        let base = r * ppr;
        let pages = &self.spaces[si].pages;
        let n = (k..ppr.min(k + want))
            .take_while(|&j| pages[base + j].frame == 0)
            .count();
        if n == 0 {
            return false;
        }
        let Some(b) = self.new_block_part(k, n) else {
            return false;
        };
        let w = self.rng.gen_ratio(3, 4);
        let wired = self.rng.gen_ratio(1, 8);
        let (prot, fl) = user_mapping(w, wired);
        let lo = base + k;
        let pa = b + k as u64 * PAGE;
        self.begin(si, r);
        let res = self.sys().enter_range(
            &self.spaces[si].sh.pmap,
            VirtAddr::new(self.s.geo.va(lo)),
            PhysAddr::new(pa),
            n as u64 * PAGE,
            prot,
            fl,
        );
        let what = format!("enter_range of {n} pages");
        self.record_run(si, lo, pa, n, Pg { frame: 0, w, wired }, res, &what);
        self.end(si, lo, lo + n);
        self.verify(si, lo, lo + n);
        true
    }

    fn fill(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let Some(r) = self.empty_region(si) else {
            return false;
        };
        let ppr = self.s.geo.ppr;
        let Some(b) = self.new_block_part(0, ppr) else {
            return false;
        };
        let lo = r * ppr;
        let pmap = self.spaces[si].sh.pmap.clone();
        self.begin(si, r);
        for j in 0..ppr {
            let f = b + j as u64 * PAGE;
            let (prot, fl) = user_mapping(true, false);
            let res = self.sys().enter(
                &pmap,
                VirtAddr::new(self.s.geo.va(lo + j)),
                PhysAddr::new(f),
                prot,
                fl,
                0,
            );
            let pg = Pg {
                frame: 0,
                w: true,
                wired: false,
            };
            self.record_run(si, lo + j, f, 1, pg, res, "fill: enter");
        }
        self.end(si, lo, lo + ppr);
        self.verify(si, lo, lo + ppr);
        true
    }

    /// A random range in one region: a whole region one time in four, else up to 64 pages.
    fn pick_range(&mut self) -> (usize, usize) {
        let ppr = self.s.geo.ppr;
        let r = self.rng.gen_range(0..REGIONS);
        if self.rng.gen_ratio(1, 4) {
            return (r * ppr, (r + 1) * ppr);
        }
        let k = self.rng.gen_range(0..ppr);
        let n = self.rng.gen_range(1..=64usize).min(ppr - k);
        (r * ppr + k, r * ppr + k + n)
    }

    fn protect_or_remove(&mut self, remove: bool) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let (lo, hi) = self.pick_range();
        self.change_range(si, lo, hi, remove);
        true
    }

    /// Remove or write-protect pages `[lo, hi)` (one region) of space `si`.
    fn change_range(&mut self, si: usize, lo: usize, hi: usize, remove: bool) {
        let g = self.s.geo;
        let (s, e) = (VirtAddr::new(g.va(lo)), VirtAddr::new(g.va(hi)));
        let pmap = self.spaces[si].sh.pmap.clone();
        self.begin(si, lo / g.ppr);
        let res = if remove {
            self.sys().remove(&pmap, s, e)
        } else {
            self.sys().protect(&pmap, s, e, Prot::empty())
        };
        if let Err(err) = res {
            self.err(|| {
                format!(
                    "{} {s}..{e}: {err}",
                    if remove { "remove" } else { "protect" }
                )
            });
        }
        for i in lo..hi {
            let pg = self.spaces[si].pages[i];
            if remove {
                if pg.frame != 0 {
                    self.spaces[si].pages[i] = Pg::default();
                    self.unref(pg.frame);
                }
            } else {
                self.spaces[si].pages[i].w = false;
            }
        }
        self.end(si, lo, hi);
        self.verify(si, lo, hi);
    }

    fn demote(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        // A region mapped with contiguous, aligned frames of one kind: the pmap holds it as a
        // superpage (promoted or entered so).
        let ppr = self.s.geo.ppr;
        let start = self.rng.gen_range(0..REGIONS);
        let found = (0..REGIONS).map(|k| (start + k) % REGIONS).find(|&r| {
            let p = &self.spaces[si].pages[r * ppr..(r + 1) * ppr];
            p[0].frame != 0
                && p[0].frame.is_multiple_of(self.s.frames.block_size())
                && p.iter().enumerate().all(|(j, x)| {
                    x.frame == p[0].frame + j as u64 * PAGE
                        && x.w == p[0].w
                        && x.wired == p[0].wired
                })
        });
        let Some(r) = found else {
            return false;
        };
        let j = r * ppr + self.rng.gen_range(0..ppr);
        let remove = self.rng.gen_bool(0.5);
        self.change_range(si, j, j + 1, remove);
        true
    }

    fn remove_all(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let n = self.s.geo.pages();
        let start = self.rng.gen_range(0..n);
        let Some(i) = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.spaces[si].pages[i].frame != 0)
        else {
            return false;
        };
        let pa = self.spaces[si].pages[i].frame;
        for s in 0..self.spaces.len() {
            self.begin_all(s);
        }
        self.sys().remove_all(PhysAddr::new(pa));
        for s in 0..self.spaces.len() {
            for k in 0..n {
                if self.spaces[s].pages[k].frame == pa {
                    self.spaces[s].pages[k] = Pg::default();
                    self.unref(pa);
                }
            }
        }
        for s in 0..self.spaces.len() {
            self.end_all(s);
            let ppr = self.s.geo.ppr;
            let r = i / ppr;
            self.verify(s, r * ppr, (r + 1) * ppr);
        }
        true
    }

    fn unwire(&mut self) -> bool {
        let Some(si) = self.pick_space() else {
            return false;
        };
        let g = self.s.geo;
        let n = g.pages();
        let start = self.rng.gen_range(0..n);
        // Mostly around a wired page (else any range, which should fail).
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.spaces[si].pages[i].wired)
            .unwrap_or(start);
        let r = i / g.ppr;
        let hi = (i + self.rng.gen_range(1..=8usize)).min((r + 1) * g.ppr);
        let pages = &self.spaces[si].pages[i..hi];
        let ok = pages.iter().all(|p| p.frame == 0 || p.wired);
        self.begin(si, r);
        let res = self.sys().unwire(
            &self.spaces[si].sh.pmap,
            VirtAddr::new(g.va(i)),
            VirtAddr::new(g.va(hi)),
        );
        match (res, ok) {
            (Ok(()), true) => {
                for p in &mut self.spaces[si].pages[i..hi] {
                    p.wired = false;
                }
            }
            (Err(PmapError::NotWired(_)), false) => {}
            (res, ok) => self.err(|| {
                format!(
                    "unwire {:#x}..{:#x}: {res:?}, expected {}",
                    g.va(i),
                    g.va(hi),
                    if ok { "Ok" } else { "NotWired" }
                )
            }),
        }
        self.end(si, i, hi);
        self.verify(si, i, hi);
        true
    }

    // --- kernel ------------------------------------------------------------------------------

    fn growkernel(&mut self) -> bool {
        if self.kwins.len() >= MAX_KWINS {
            return false;
        }
        let chunk = self.s.geo.region;
        // KVA from the kernel-memory layer: kernel_arena grows the kernel's page tables
        // (growkernel) as it imports, and never hands out what kmem or the transient arena own.
        let start = match self.s.kmem.kva_alloc(chunk) {
            Ok(va) => va.as_u64(),
            Err(vmsys::kmem::KmemError::NoKva(_)) => return false,
            Err(e) => {
                self.err(|| format!("kva_alloc({chunk:#x}): {e}"));
                return true;
            }
        };
        if self.sys().kernel_end().as_u64() < start + chunk {
            self.err(|| format!("kva_alloc gave {start:#x}+{chunk:#x} beyond the grown kernel"));
        }
        let pages = (chunk / PAGE) as usize;
        let sh = Arc::new(KWinShared {
            base: start,
            owner: self.me,
            seq: AtomicU64::new(0),
            published: (0..pages).map(|_| AtomicU64::new(0)).collect(),
        });
        self.s.kwins.lock().unwrap().push(sh.clone());
        self.kwins.push(KWin {
            sh,
            pages: vec![0; pages],
        });
        true
    }

    fn pick_kwin(&mut self) -> Option<usize> {
        if self.kwins.is_empty() {
            None
        } else {
            Some(self.rng.gen_range(0..self.kwins.len()))
        }
    }

    fn kbegin(&self, wi: usize) {
        self.kwins[wi].sh.seq.fetch_add(1, SeqCst);
    }

    fn kend(&self, wi: usize, lo: usize, hi: usize) {
        let w = &self.kwins[wi];
        for i in lo..hi {
            let f = w.pages[i];
            let tag = if f == 0 { 0 } else { self.frames[&f].tag };
            w.sh.published[i].store(tag, SeqCst);
        }
        w.sh.seq.fetch_add(1, SeqCst);
    }

    /// Set kernel page `i` of window `wi` to `f` (0: unmapped) in the model.
    fn kset(&mut self, wi: usize, i: usize, f: u64) {
        let old = self.kwins[wi].pages[i];
        if old == f {
            return;
        }
        if f != 0 {
            self.map_ref(f);
        }
        self.kwins[wi].pages[i] = f;
        if old != 0 {
            self.unref(old);
        }
    }

    fn kenter(&mut self) -> bool {
        let Some(wi) = self.pick_kwin() else {
            return false;
        };
        let i = self.rng.gen_range(0..self.kwins[wi].pages.len());
        let Some(f) = self.new_frame() else {
            return false;
        };
        let va = self.kwins[wi].sh.base + i as u64 * PAGE;
        self.kbegin(wi);
        match self.sys().kenter(VirtAddr::new(va), PhysAddr::new(f), WB) {
            Ok(()) => self.kset(wi, i, f),
            Err(e) => {
                self.drop_if_unmapped(f);
                self.err(|| format!("kenter {va:#x}: {e}"));
            }
        }
        self.kend(wi, i, i + 1);
        self.verify_kpage(wi, i);
        true
    }

    fn kremove(&mut self) -> bool {
        let Some(wi) = self.pick_kwin() else {
            return false;
        };
        let n = self.kwins[wi].pages.len();
        let start = self.rng.gen_range(0..n);
        let Some(i) = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.kwins[wi].pages[i] != 0)
        else {
            return false;
        };
        let va = self.kwins[wi].sh.base + i as u64 * PAGE;
        self.kbegin(wi);
        match self.sys().kremove(VirtAddr::new(va)) {
            Ok(()) => self.kset(wi, i, 0),
            Err(e) => self.err(|| format!("kremove {va:#x}: {e}")),
        }
        self.kend(wi, i, i + 1);
        self.verify_kpage(wi, i);
        true
    }

    fn krange(&mut self, wi: usize) -> (usize, usize) {
        let n = self.kwins[wi].pages.len();
        let k = self.rng.gen_range(0..n);
        (k, (k + self.rng.gen_range(1..=16usize)).min(n))
    }

    fn qenter(&mut self) -> bool {
        let Some(wi) = self.pick_kwin() else {
            return false;
        };
        let (lo, hi) = self.krange(wi);
        let mut fr = Vec::with_capacity(hi - lo);
        for _ in lo..hi {
            match self.new_frame() {
                Some(f) => fr.push(f),
                None => {
                    for f in fr {
                        self.drop_if_unmapped(f);
                    }
                    return false;
                }
            }
        }
        let va = self.kwins[wi].sh.base + lo as u64 * PAGE;
        let pas: Vec<PhysAddr> = fr.iter().map(|&f| PhysAddr::new(f)).collect();
        self.kbegin(wi);
        match self.sys().qenter(VirtAddr::new(va), &pas) {
            Ok(()) => {
                for (k, &f) in fr.iter().enumerate() {
                    self.kset(wi, lo + k, f);
                }
            }
            Err(e) => {
                for &f in &fr {
                    self.drop_if_unmapped(f);
                }
                self.err(|| format!("qenter {va:#x} x{}: {e}", hi - lo));
            }
        }
        self.kend(wi, lo, hi);
        for i in lo..hi {
            self.verify_kpage(wi, i);
        }
        true
    }

    fn qremove(&mut self) -> bool {
        let Some(wi) = self.pick_kwin() else {
            return false;
        };
        let (lo, hi) = self.krange(wi);
        let va = self.kwins[wi].sh.base + lo as u64 * PAGE;
        self.kbegin(wi);
        match self.sys().qremove(VirtAddr::new(va), hi - lo) {
            Ok(()) => {
                for i in lo..hi {
                    self.kset(wi, i, 0);
                }
            }
            Err(e) => self.err(|| format!("qremove {va:#x} x{}: {e}", hi - lo)),
        }
        self.kend(wi, lo, hi);
        for i in lo..hi {
            self.verify_kpage(wi, i);
        }
        true
    }

    fn quick_map(&mut self) -> bool {
        let c = self.c;
        c.set_user(false);
        // One of this CPU's mapped frames (its tag), or its scratch frame above the data frames
        // (outside the direct map where the format has one, so that the slot is used).
        let own = self
            .home
            .and_then(|h| {
                let n = self.s.geo.pages();
                let i = self.rng.gen_range(0..n);
                let f = self.spaces[h].pages[i].frame;
                (f != 0).then_some(f)
            })
            .filter(|_| self.rng.gen_bool(0.5));
        let pa = own.unwrap_or(self.scratch);
        let va = match self.sys().quick_enter_page(PhysAddr::new(pa)) {
            Ok(va) => va.as_u64(),
            Err(e) => {
                self.err(|| format!("quick map of {pa:#x}: {e}"));
                return true;
            }
        };
        self.st.owner_checks += 1;
        if own.is_some() {
            let want = self.frames[&pa].tag;
            match c.read_u64(va) {
                Ok(v) if v == want => {}
                r => self.err(|| {
                    format!("quick map of {pa:#x} at {va:#x} read {r:x?}, expected {want:#x}")
                }),
            }
        } else {
            let val: u64 = self.rng.gen();
            let off = self.rng.gen_range(0..PAGE / 8) * 8;
            if let Err(f) = c.write_u64(va + off, val) {
                self.err(|| format!("quick map of {pa:#x} at {va:#x}: write faulted: {f}"));
            } else if self.s.m.mem().load_u64(pa + off) != val {
                self.err(|| format!("quick map of {pa:#x} at {va:#x}: the write missed the frame"));
            }
        }
        if let Err(e) = self.sys().quick_remove_page(VirtAddr::new(va)) {
            self.err(|| format!("quick unmap of {pa:#x} at {va:#x}: {e}"));
        }
        let direct = self.sys().direct_map().is_some_and(|(_, size)| pa < size);
        if !direct {
            if let Ok(v) = c.read_u64(va) {
                self.err(|| {
                    format!("quick slot {va:#x} still reads {v:#x} after quick_remove_page")
                });
            }
        }
        true
    }

    /// Remove and destroy everything this CPU owns (after the final verification).
    /// An owned, mapped data frame of the home space (its tag is in word 0).
    fn own_frame(&mut self) -> Option<u64> {
        let h = self.home?;
        let n = self.s.geo.pages();
        (0..8).find_map(|_| {
            let i = self.rng.gen_range(0..n);
            let f = self.spaces[h].pages[i].frame;
            (f != 0 && self.frames.contains_key(&f)).then_some(f)
        })
    }

    fn kmem_alloc(&mut self) -> bool {
        if self.kallocs.len() >= MAX_KALLOCS {
            return false;
        }
        let k = &self.s.kmem;
        let size = if self.rng.gen_ratio(1, 6) {
            k.superpage()
        } else {
            self.rng.gen_range(1..=64) * PAGE - self.rng.gen_range(0..PAGE)
        };
        // Each CPU keeps its kernel memory within its share (an eighth of memory over the
        // CPUs), so that page-table pages, which the workload expects to get, never run out.
        let held: u64 = self
            .kallocs
            .iter()
            .map(|&(_, s, _)| s.next_multiple_of(PAGE))
            .sum();
        let budget = self.s.m.mem().size() / 8 / self.s.m.config().cpus as u64;
        if held + size.next_multiple_of(PAGE) > budget {
            return false;
        }
        let va = match k.kmem_malloc(size, 0, false) {
            Ok(va) => va.as_u64(),
            // Memory may run short with every CPU holding allocations: a clean refusal.
            Err(vmsys::kmem::KmemError::NoMemory) | Err(vmsys::kmem::KmemError::NoKva(_)) => {
                self.st.skipped += 1;
                return true;
            }
            Err(e) => {
                self.err(|| format!("kmem_malloc({size:#x}): {e}"));
                return true;
            }
        };
        let tag = self.s.new_tag();
        let last = va + size.next_multiple_of(PAGE) - 8;
        self.c.set_user(false);
        for a in [va, last] {
            if let Err(f) = self.c.write_u64(a, tag) {
                self.err(|| format!("kmem memory at {a:#x} faulted: {f}"));
            }
        }
        self.kallocs.push((va, size, tag));
        true
    }

    fn check_kalloc(&mut self, i: usize) {
        let (va, size, tag) = self.kallocs[i];
        let last = va + size.next_multiple_of(PAGE) - 8;
        self.c.set_user(false);
        for a in [va, last] {
            self.st.owner_checks += 1;
            match self.c.read_u64(a) {
                Ok(v) if v == tag => {}
                r => self.err(|| format!("kmem memory at {a:#x} read {r:x?}, expected {tag:#x}")),
            }
        }
    }

    fn kmem_free(&mut self) -> bool {
        if self.kallocs.is_empty() {
            return false;
        }
        let i = self.rng.gen_range(0..self.kallocs.len());
        self.check_kalloc(i);
        let (va, size, _) = self.kallocs.swap_remove(i);
        if let Err(e) = self.s.kmem.kmem_free(VirtAddr::new(va), size) {
            self.err(|| format!("kmem_free({va:#x}, {size:#x}): {e}"));
        }
        true
    }

    fn io_map(&mut self, can_fault: bool) -> bool {
        let Some(pa) = self.own_frame() else {
            return false;
        };
        let want = self.frames[&pa].tag;
        let k = self.s.kmem.clone();
        let m = match k.map_io_transient(&[PhysAddr::new(pa)], can_fault) {
            Ok(m) => m,
            Err(vmsys::kmem::KmemError::NoKva(_)) => {
                self.st.skipped += 1;
                return true;
            }
            Err(e) => {
                self.err(|| format!("map_io_transient({pa:#x}): {e}"));
                return true;
            }
        };
        let va = m.vas[0].as_u64();
        self.c.set_user(false);
        self.st.owner_checks += 1;
        match self.c.read_u64(va) {
            Ok(v) if v == want => {}
            r => self.err(|| {
                format!("transient map of {pa:#x} at {va:#x} read {r:x?}, expected {want:#x}")
            }),
        }
        if let Err((e, _)) = k.unmap_io_transient(m) {
            self.err(|| format!("unmap_io_transient({pa:#x}): {e}"));
        }
        true
    }

    fn bounce(&mut self) -> bool {
        let Some(pa) = self.own_frame() else {
            return false;
        };
        let want = self.frames[&pa].tag;
        let mut b = [0u8; 8];
        self.st.owner_checks += 1;
        match self.s.kmem.bounce_from_phys(PhysAddr::new(pa), 0, &mut b) {
            Ok(()) if u64::from_le_bytes(b) == want => {}
            r => self.err(|| {
                format!(
                    "bounce copy of {pa:#x} gave {:#x} ({r:?}), expected {want:#x}",
                    u64::from_le_bytes(b)
                )
            }),
        }
        true
    }

    fn teardown(&mut self) {
        while let Some((va, size, _)) = self.kallocs.pop() {
            if let Err(e) = self.s.kmem.kmem_free(VirtAddr::new(va), size) {
                self.err(|| format!("teardown: kmem_free({va:#x}, {size:#x}): {e}"));
            }
        }
        self.switch_to(None);
        while !self.spaces.is_empty() {
            let sh = self.spaces[0].sh.clone();
            sh.closing.store(true, SeqCst);
            let g = self.s.geo;
            if let Err(e) = self.sys().remove(
                &sh.pmap,
                VirtAddr::new(g.base),
                VirtAddr::new(g.va(g.pages())),
            ) {
                self.err(|| format!("teardown: remove: {e}"));
            }
            let frames: Vec<u64> = self.spaces[0]
                .pages
                .iter()
                .filter(|p| p.frame != 0)
                .map(|p| p.frame)
                .collect();
            for f in frames {
                self.unref(f);
            }
            self.spaces.remove(0);
            self.s
                .spaces
                .lock()
                .unwrap()
                .retain(|x| !Arc::ptr_eq(x, &sh));
            if let Err(e) = self.sys().destroy(sh.pmap.clone()) {
                self.err(|| format!("teardown: destroy: {e}"));
            }
        }
        for wi in 0..self.kwins.len() {
            let n = self.kwins[wi].pages.len();
            let va = self.kwins[wi].sh.base;
            if let Err(e) = self.sys().qremove(VirtAddr::new(va), n) {
                self.err(|| format!("teardown: qremove: {e}"));
            }
            for i in 0..n {
                self.kset(wi, i, 0);
            }
            if let Err(e) = self.s.kmem.kva_free(VirtAddr::new(va), n as u64 * PAGE) {
                self.err(|| format!("teardown: kva_free: {e}"));
            }
        }
        if !self.frames.is_empty() {
            let n = self.frames.len();
            self.err(|| format!("teardown: {n} frames still referenced by the model"));
        }
    }
}
