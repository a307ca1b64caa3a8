//! No heap allocation inside vmsys's spin-lock critical sections (LOCK-1 in docs/INVARIANTS.md).
//!
//! A kernel's pmap runs its hot paths under spin locks, where the global allocator must not be
//! called (it may sleep, take locks of its own, or recurse into the VM). This binary replaces
//! the global allocator by one that counts every allocation made while the calling thread
//! holds a vmsys lock, and runs a pmap workload on every format.
//!
//! What it covers, precisely:
//! - "Holds a vmsys lock": every lock vmsys takes through `platform::lock_interruptible` (the
//!   pmap locks, the PV-list and PV-pool locks, the pmap registry, the tag allocator, the
//!   kernel pmap), as the pmap reports them through `Platform::lock_acquired`/`lock_released`;
//!   the simulated machine keeps the depth per host thread (`vmsys_sim::machine::lock_depth`).
//!   Locks vmsys takes with a plain `spin::Mutex::lock` (the buddy allocator's domains, the frame
//!   list) are not reported; they are taken under the reported ones, so what is done under them
//!   there is still counted.
//! - "Allocation": `alloc`, `alloc_zeroed` and `realloc` of the global allocator.
//! - Allocations made inside the simulated hardware are not counted: the platform the pmap
//!   runs on here (`Watched`) forwards every `Platform` method to the machine and marks the
//!   call, because the simulator models memory, TLBs, IPIs and the detector with host data
//!   structures where real hardware allocates nothing. This also leaves out vmsys code that the
//!   hardware runs on the caller's thread: the shootdown IPI handler taken while spinning, and
//!   the fault handler (the workload makes no accesses that fault).
//! - The workload: 4 KiB enters one by one and by range, a superpage entered directly,
//!   promotion (a page table filled with contiguous frames) and demotion or removal of
//!   superpages (by protect, by a partial remove, by `remove_write`), protect, wire and unwire, copy (fork) into a second
//!   pmap active on another CPU (so that shootdowns are sent), the PV queries (`is_modified`,
//!   `ts_referenced`, `clear_modify`, `remove_write`, `page_exists_quick`,
//!   `page_mapping_count`), `remove_all`, range removes, a PV allocation failure, and pmap
//!   creation and destruction. The audit is not covered (it collects what it checks into maps,
//!   and runs with nothing else in flight).
//!
//! `planted_allocation_under_the_pmap_lock_is_caught` shows that the check can fail.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmsys::arch::{FormatId, Prot};
use vmsys::page::PageArray;
use vmsys::phys::BuddyAllocator;
use vmsys::platform::{
    AccessKind, CpuId, CpuSet, Fault, FaultHandler, IpiHandler, IpiMessage, PhysSegment, Platform,
    PlatformError, RootLoad, TlbInval,
};
use vmsys::pmap::PmapError;
use vmsys::{EnterFlags, PhysAddr, PmapConfig, PmapSystem, VirtAddr, PAGE_SIZE};
use vmsys_sim::{DetectorMode, Machine, MachineConfig};

// ---------------------------------------------------------------------------------------------
// The counting allocator.

struct Counting;

/// Counting is on (only inside a test's workload, so that set-up and checks may allocate).
static ARMED: AtomicBool = AtomicBool::new(false);
/// Allocations made under a vmsys lock while armed.
static UNDER_LOCK: AtomicU64 = AtomicU64::new(0);
/// Where the first of them happened (filled only with `NOTING` set on the thread).
static SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Tests run one at a time: the counters are global.
static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Inside a call into the simulated hardware.
    static IN_HW: Cell<u32> = const { Cell::new(0) };
    /// Inside the allocator's own bookkeeping (its allocations are not counted).
    static NOTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if !ARMED.load(Ordering::Relaxed) || vmsys_sim::machine::lock_depth() == 0 {
        return;
    }
    if IN_HW.with(|h| h.get()) != 0 || NOTING.with(|n| n.replace(true)) {
        return;
    }
    if UNDER_LOCK.fetch_add(1, Ordering::Relaxed) < 64 {
        // The innermost vmsys function on the stack names the site.
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        let site = bt
            .lines()
            .find(|l| l.contains(" vmsys::"))
            .unwrap_or("(no vmsys frame)")
            .trim()
            .to_string();
        if let Ok(mut s) = SITES.lock() {
            s.push(site);
        }
    }
    NOTING.with(|n| n.set(false));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments; `note`
// only reads and writes atomics and thread-locals (its own allocations pass through unnoted).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Run `f` with counting armed; the allocations it made under a vmsys lock, and where.
fn counted(f: impl FnOnce()) -> (u64, Vec<String>) {
    UNDER_LOCK.store(0, Ordering::Relaxed);
    SITES.lock().unwrap().clear();
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    let n = UNDER_LOCK.load(Ordering::Relaxed);
    (n, std::mem::take(&mut *SITES.lock().unwrap()))
}

// ---------------------------------------------------------------------------------------------
// The platform: the machine, with its calls marked as hardware.

struct Watched {
    m: Arc<Machine>,
    /// Plant a vmsys-side allocation in `pt_update_begin` (called under the pmap lock).
    plant: AtomicBool,
}

/// Mark a call into the machine.
fn hw<R>(f: impl FnOnce() -> R) -> R {
    IN_HW.with(|h| h.set(h.get() + 1));
    let r = f();
    IN_HW.with(|h| h.set(h.get() - 1));
    r
}

impl Platform for Watched {
    fn format(&self) -> FormatId {
        self.m.format()
    }
    fn cpu_count(&self) -> u32 {
        self.m.cpu_count()
    }
    fn current_cpu(&self) -> CpuId {
        self.m.current_cpu()
    }
    fn phys_segments(&self) -> &[PhysSegment] {
        self.m.phys_segments()
    }
    fn direct_map_limit(&self) -> PhysAddr {
        self.m.direct_map_limit()
    }
    fn pt_load64(&self, pa: PhysAddr) -> u64 {
        hw(|| self.m.pt_load64(pa))
    }
    fn pt_store64(&self, pa: PhysAddr, val: u64) {
        hw(|| self.m.pt_store64(pa, val))
    }
    fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64 {
        hw(|| self.m.pt_swap64(pa, val))
    }
    fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64> {
        hw(|| self.m.pt_cas64(pa, old, new))
    }
    fn pt_load_run64(&self, pa: PhysAddr, out: &mut [u64]) {
        hw(|| self.m.pt_load_run64(pa, out))
    }
    fn pt_store_run64(&self, pa: PhysAddr, vals: &[u64]) {
        hw(|| self.m.pt_store_run64(pa, vals))
    }
    fn pt_swap_run64(&self, pa: PhysAddr, vals: &mut [u64]) {
        hw(|| self.m.pt_swap_run64(pa, vals))
    }
    fn pt_load32(&self, pa: PhysAddr) -> u32 {
        hw(|| self.m.pt_load32(pa))
    }
    fn pt_store32(&self, pa: PhysAddr, val: u32) {
        hw(|| self.m.pt_store32(pa, val))
    }
    fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32 {
        hw(|| self.m.pt_swap32(pa, val))
    }
    fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32> {
        hw(|| self.m.pt_cas32(pa, old, new))
    }
    fn phys_zero(&self, pa: PhysAddr, len: u64) {
        hw(|| self.m.phys_zero(pa, len))
    }
    fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64) {
        hw(|| self.m.phys_copy(src, dst, len))
    }
    fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]) {
        hw(|| self.m.phys_read(pa, buf))
    }
    fn phys_write(&self, pa: PhysAddr, buf: &[u8]) {
        hw(|| self.m.phys_write(pa, buf))
    }
    fn load_root(&self, load: RootLoad) {
        hw(|| self.m.load_root(load))
    }
    fn load_kernel_root(&self, root: PhysAddr) -> Result<(), PlatformError> {
        hw(|| self.m.load_kernel_root(root))
    }
    fn tlb_invalidate_local(&self, inv: TlbInval) {
        hw(|| self.m.tlb_invalidate_local(inv))
    }
    fn tlb_invalidate_broadcast(&self, inv: TlbInval) -> Result<(), PlatformError> {
        hw(|| self.m.tlb_invalidate_broadcast(inv))
    }
    fn set_ipi_handler(&self, vector: u8, handler: IpiHandler) {
        hw(|| self.m.set_ipi_handler(vector, handler))
    }
    fn send_ipi(&self, targets: &CpuSet, msg: IpiMessage, wait: bool) -> Result<(), PlatformError> {
        hw(|| self.m.send_ipi(targets, msg, wait))
    }
    fn interrupt_point(&self) {
        hw(|| self.m.interrupt_point())
    }
    fn set_fault_handler(&self, handler: FaultHandler) {
        hw(|| self.m.set_fault_handler(handler))
    }
    fn kernel_translate(&self, va: VirtAddr, access: AccessKind) -> Result<PhysAddr, Fault> {
        hw(|| self.m.kernel_translate(va, access))
    }
    fn pt_update_begin(&self, start: VirtAddr, end: VirtAddr) {
        if self.plant.load(Ordering::Relaxed) {
            // Outside the hardware bracket: as if the pmap allocated here, under its lock.
            std::hint::black_box(Vec::<u64>::with_capacity(16));
        }
        hw(|| self.m.pt_update_begin(start, end))
    }
    fn pt_update_end(&self) {
        hw(|| self.m.pt_update_end())
    }
    fn lock_acquired(&self) {
        self.m.lock_acquired()
    }
    fn lock_released(&self) {
        self.m.lock_released()
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test.

struct Rig {
    m: Arc<Machine>,
    w: Arc<Watched>,
    sys: Arc<PmapSystem<Watched>>,
    buddy: Arc<BuddyAllocator>,
}

fn rig(f: FormatId) -> Rig {
    let m = Machine::new(
        MachineConfig::new(f)
            .cpus(2)
            .mem(256 << 20)
            .detector(DetectorMode::Every),
    )
    .expect("machine");
    let w = Arc::new(Watched {
        m: m.clone(),
        plant: AtomicBool::new(false),
    });
    let pages = Arc::new(PageArray::new(m.phys_segments()));
    let buddy = Arc::new(BuddyAllocator::new(pages.clone()));
    let sys =
        PmapSystem::bootstrap_with_pages(w.clone(), buddy.clone(), pages, PmapConfig::default())
            .expect("bootstrap");
    for c in 0..m.cpu_count() {
        m.run_on(c, |_| sys.init_cpu());
    }
    Rig { m, w, sys, buddy }
}

impl Rig {
    fn audit(&self) {
        if let Err(errs) = self.sys.audit() {
            panic!("pmap audit failed: {errs:#?}");
        }
        let v = self.m.audit();
        assert!(v.is_empty(), "stale translations: {v:#?}");
        let live = self.m.detector().violations();
        assert!(live.is_empty(), "detector violations: {live:#?}");
    }
}

fn va(v: u64) -> VirtAddr {
    VirtAddr::new(v)
}
fn pa(p: u64) -> PhysAddr {
    PhysAddr::new(p)
}

fn user_base(f: FormatId, align: u64) -> u64 {
    let base: u64 = match f {
        FormatId::I386 | FormatId::I386Pae => 0x1000_0000,
        _ => 0x10_0000_0000,
    };
    base.next_multiple_of(align)
}

/// The workload of the module comment, on `r` (counting is armed by the caller).
fn workload(r: &Rig) {
    let s = &r.sys;
    let f = r.m.format();
    let sp = s.page_sizes().nth(1).expect("a superpage size");
    let n = sp / PAGE_SIZE;
    let order = n.trailing_zeros() as usize;
    // Data frames: two superpage-aligned blocks and a few single frames.
    let block0 = r.buddy.alloc(0, order).expect("data block").as_u64();
    let block1 = r.buddy.alloc(0, order).expect("data block").as_u64();
    let singles: Vec<u64> = (0..8)
        .map(|_| r.buddy.alloc(0, 0).expect("data frame").as_u64())
        .collect();
    let v0 = user_base(f, sp);
    let v1 = v0 + 4 * sp;
    let v2 = v0 + 8 * sp;
    let rw = Prot::WRITE;
    let dirty = EnterFlags::MANAGED | EnterFlags::DIRTY;
    let p = s.create().expect("pmap");
    let child = s.create().expect("pmap");
    r.m.run_on(1, |_| s.activate(&child).unwrap());
    r.m.run_on(0, |_| {
        s.activate(&p).unwrap();
        // Promotion: a page table filled one entry at a time with contiguous dirty frames.
        for i in 0..n {
            s.enter(
                &p,
                va(v0 + i * PAGE_SIZE),
                pa(block0 + i * PAGE_SIZE),
                rw,
                dirty,
                0,
            )
            .unwrap();
        }
        // A superpage entered directly, and 4 KiB pages by range.
        s.enter(&p, va(v1), pa(block1), rw, dirty, 1).unwrap();
        s.enter_range(
            &p,
            va(v2),
            pa(singles[0]),
            PAGE_SIZE,
            rw,
            EnterFlags::MANAGED,
        )
        .unwrap();
        for (i, &fr) in singles.iter().enumerate().skip(1) {
            s.enter(
                &p,
                va(v2 + i as u64 * PAGE_SIZE),
                pa(fr),
                rw,
                dirty | EnterFlags::WIRED,
                0,
            )
            .unwrap();
        }
        // Fork: the child shares every frame (its CPU takes the shootdowns from now on).
        s.copy(&child, &p, va(v0), 12 * sp).unwrap();
    });
    // Touch the superpages in both pmaps: a superpage never accessed is destroyed rather
    // than demoted, and the demotions are what this workload wants.
    for (c, pm) in [(0u32, &p), (1, &child)] {
        r.m.run_on(c, |cpu| {
            cpu.set_user(true);
            for a in [
                v0,
                v0 + 7 * PAGE_SIZE,
                v1,
                v1 + 9 * PAGE_SIZE,
                v2 + PAGE_SIZE,
            ] {
                // (copy leaves out what it does not copy: wired pages.)
                if s.extract(pm, va(a)).is_some() {
                    cpu.read_u64(a).expect("a mapped page reads");
                }
            }
            cpu.set_user(false);
        });
    }
    r.m.run_on(0, |_| {
        // The PV queries, over 4 KiB and superpage mappings.
        for fr in [block0 + 3 * PAGE_SIZE, block1 + 5 * PAGE_SIZE, singles[2]] {
            let _ = s.is_modified(pa(fr));
            let _ = s.ts_referenced(pa(fr));
            assert!(s.page_exists_quick(&p, pa(fr)));
            assert!(s.page_mapping_count(pa(fr)) >= 1);
        }
        // Superpages split by write-protecting one frame, by protect of part of one and by a
        // remove of part of one: each a demotion (at least one, checked below), or the
        // superpage's removal where the pmap never accessed it (FreeBSD's choice too).
        s.remove_write(pa(block0 + 7 * PAGE_SIZE));
        s.clear_modify(pa(block1 + 9 * PAGE_SIZE));
        s.protect(&p, va(v1), va(v1 + 4 * PAGE_SIZE), Prot::empty())
            .unwrap();
        s.remove(&child, va(v0 + PAGE_SIZE), va(v0 + 2 * PAGE_SIZE))
            .unwrap();
        s.unwire(&p, va(v2 + PAGE_SIZE), va(v2 + 8 * PAGE_SIZE))
            .unwrap();
        // Every mapping of some frames, in both pmaps.
        for fr in [block0, block1 + 17 * PAGE_SIZE, singles[3]] {
            s.remove_all(pa(fr));
            assert_eq!(s.page_mapping_count(pa(fr)), 0);
        }
        // A PV allocation failure is a clean error.
        s.inject_pv_failures(0, Some(1));
        assert_eq!(
            s.enter(&p, va(v2 + 9 * PAGE_SIZE), pa(singles[0]), rw, dirty, 0),
            Err(PmapError::ResourceShortage)
        );
        // Everything goes.
        s.remove(&p, va(v0), va(v0 + 12 * sp)).unwrap();
        s.remove(&child, va(v0), va(v0 + 12 * sp)).unwrap();
        let k = s.kernel_pmap().clone();
        s.activate(&k).unwrap();
    });
    r.m.run_on(1, |_| s.activate(&s.kernel_pmap().clone()).unwrap());
    let st = s.stats();
    assert!(
        st.promotions >= 1 && st.demotions >= 1,
        "the workload promotes and demotes: {st:?}"
    );
    r.m.run_on(0, |_| {
        s.destroy(child).unwrap();
        s.destroy(p).unwrap();
    });
    assert_eq!(s.pv_in_use(), 0);
    for fr in singles {
        r.buddy.free(pa(fr), 0).unwrap();
    }
    r.buddy.free(pa(block0), order).unwrap();
    r.buddy.free(pa(block1), order).unwrap();
}

/// Allocations under a vmsys lock that are known and not yet removed, by the innermost vmsys
/// function on the stack (docs/INVARIANTS.md, LOCK-1, lists them as open): the list of
/// page-table pages a flush frees after its shootdown (`Flush::free_after` pushes to a `Vec`),
/// the pmap registry's insertion on `create`, and the map of page-table pages saved by a
/// promotion (`PmapState::saved`, a `BTreeMap`). Anything else, the PV paths included, fails.
const KNOWN_OPEN: &[&str] = &[
    "vmsys::pmap::tlb::Flush::free_after",
    "vmsys::pmap::kernel::<impl vmsys::pmap::PmapSystem<P>>::create",
    "vmsys::pmap::superpage::<impl vmsys::pmap::PmapSystem<P>>::try_promote",
];

fn known_open(site: &str) -> bool {
    // A site line reads "N: path" (at most 64 are recorded; the count covers all).
    let path = site.split_once(": ").map_or(site, |(_, p)| p);
    KNOWN_OPEN.contains(&path)
}

fn pmap_allocates_nothing_under_its_locks(f: FormatId) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = rig(f);
    let (n, sites) = counted(|| workload(&r));
    r.audit();
    let unknown: Vec<&String> = sites.iter().filter(|s| !known_open(s)).collect();
    eprintln!(
        "{f:?}: {n} allocations under vmsys locks, {} at sites not known to be open",
        unknown.len()
    );
    assert!(
        unknown.is_empty() && (n as usize) <= 64,
        "{n} heap allocations under a vmsys spin lock on {f:?}; sites (the first 64):\n{}",
        sites.join("\n")
    );
}

for_each_format! {
    no_alloc_under_pmap_locks_ => crate::pmap_allocates_nothing_under_its_locks;
}

/// The check fails when something allocates under the pmap lock (here the platform, outside
/// its hardware bracket, in a call the pmap makes with its lock held), and only then: the
/// same allocation with no lock held is not counted.
#[test]
fn planted_allocation_under_the_pmap_lock_is_caught() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = rig(FormatId::Amd64);
    let s = &r.sys;
    let fr = r.buddy.alloc(0, 0).unwrap();
    let v = user_base(FormatId::Amd64, PAGE_SIZE);
    let p = s.create().unwrap();
    r.m.run_on(0, |_| {
        s.enter(&p, va(v), fr, Prot::WRITE, EnterFlags::MANAGED, 0)
            .unwrap();
    });
    let (outside, _) = counted(|| {
        std::hint::black_box(Vec::<u64>::with_capacity(16));
    });
    assert_eq!(outside, 0, "an allocation with no lock held is not counted");
    r.w.plant.store(true, Ordering::SeqCst);
    let (n, sites) = counted(|| {
        r.m.run_on(0, |_| s.remove(&p, va(v), va(v + PAGE_SIZE)).unwrap());
    });
    r.w.plant.store(false, Ordering::SeqCst);
    assert!(
        n >= 1,
        "the planted allocation under the pmap lock was missed"
    );
    assert!(
        sites.iter().any(|s| !known_open(s)),
        "the planted site is not among the known open ones: {sites:?}"
    );
    r.m.run_on(0, |_| s.destroy(p)).unwrap();
    r.buddy.free(fr, 0).unwrap();
    r.audit();
}
