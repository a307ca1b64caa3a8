//! The simulated machine: memory, CPUs run by host threads, IPIs and broadcast invalidation,
//! and the `Platform` implementation that vmsys runs on.
//!
//! A host thread runs on a simulated CPU by *binding* to it ([`Machine::run_on`]): it takes the
//! CPU's state lock for the duration and keeps the guard in a thread-local stack, so that the
//! `Platform` methods (which act on the current CPU, as in a kernel) find it. Another CPU reaches
//! a bound CPU only through its mailbox, which the bound thread drains at interrupt points (every
//! simulated access and every spin-wait iteration). A CPU that no thread is running has nobody to
//! drain its mailbox, so a sender that is waiting for it takes its state lock and drains the
//! mailbox on its behalf. While it waits, a sender keeps draining its own mailbox: two CPUs that
//! interrupt each other at once both make progress.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::lock_api::ArcMutexGuard;
use parking_lot::{Mutex, RawMutex, RwLock};
use vmsys::arch::FormatId;
use vmsys::platform::{
    AccessKind, CpuId, CpuSet, Fault, FaultHandler, FaultReason, FaultResolution, IpiHandler,
    IpiMessage, PhysSegment, Platform, PlatformError, RootLoad, TagSel, TlbInval,
};
use vmsys::{PhysAddr, VirtAddr};

use crate::cpu::{CounterSnapshot, CpuCounters, CpuState};
use crate::detector::{Detector, DetectorMode, Violation, ViolationKind};
use crate::mem::PhysMem;
use crate::walker::{MmuRegs, Mode};

/// How a machine is built.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub format: FormatId,
    pub cpus: u32,
    /// Physical memory in bytes (rounded up to 2 MiB).
    pub mem_bytes: u64,
    /// NUMA domains; memory is split evenly between them.
    pub domains: u8,
    /// The kernel's direct map may cover only memory below this (default: all of it).
    pub direct_map_limit: Option<u64>,
    pub detector: DetectorMode,
    /// arm64: hardware-managed access flag (TCR_EL1.HA); without it AF = 0 faults.
    pub arm64_hw_af: bool,
    /// arm64: hardware dirty state through DBM (TCR_EL1.HD).
    pub arm64_hw_dbm: bool,
    /// Physical-address width in bits (MAXPHYADDR); 32 on i386 2-level.
    pub pa_bits: u8,
    /// A planted kernel bug, to show that the checks catch it: with `Some(vector)`, IPIs sent
    /// on `vector` (the pmap's shootdown vector) are dropped and reported as delivered, and a
    /// broadcast TLBI invalidates the issuing CPU only. Every other IPI and every local
    /// invalidation (INVLPG, INVPCID, TLBI without IS, the flush of a root load) is done.
    pub omit_shootdown: Option<u8>,
}

impl MachineConfig {
    /// Defaults for a format: 4 CPUs, 1 GiB in one domain, the detector on every access.
    pub fn new(format: FormatId) -> Self {
        MachineConfig {
            format,
            cpus: 4,
            mem_bytes: 1 << 30,
            domains: 1,
            direct_map_limit: None,
            detector: DetectorMode::Every,
            arm64_hw_af: true,
            arm64_hw_dbm: true,
            pa_bits: match format {
                FormatId::I386 => 32,
                FormatId::I386Pae => 36,
                FormatId::Arm64 => 48,
                FormatId::Amd64 | FormatId::Amd64La57 => 46,
            },
            omit_shootdown: None,
        }
    }
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    pub fn mem(mut self, bytes: u64) -> Self {
        self.mem_bytes = bytes;
        self
    }
    pub fn domains(mut self, n: u8) -> Self {
        self.domains = n;
        self
    }
    pub fn detector(mut self, mode: DetectorMode) -> Self {
        self.detector = mode;
        self
    }
    pub fn direct_map_limit(mut self, limit: u64) -> Self {
        self.direct_map_limit = Some(limit);
        self
    }
    pub fn arm64_software_af(mut self) -> Self {
        self.arm64_hw_af = false;
        self
    }
    /// Plant the missing-shootdown bug: drop the IPIs of `vector` and make broadcast TLBIs
    /// local (see [`MachineConfig::omit_shootdown`]).
    pub fn omit_shootdown(mut self, vector: u8) -> Self {
        self.omit_shootdown = Some(vector);
        self
    }
}

/// Why a machine could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    Cpus(u32),
    PaBits(u8),
    Memory(u64),
    Domains(u8),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Cpus(n) => {
                write!(f, "{n} CPUs: a machine has 1 to {} CPUs", vmsys::platform::MAX_CPUS)
            }
            ConfigError::Memory(b) => write!(
                f,
                "{b} bytes of memory: need at least 4 MiB and no more than the format's physical address space"
            ),
            ConfigError::PaBits(b) => write!(
                f,
                "{b} physical-address bits: the format allows 24 up to its architectural maximum"
            ),
            ConfigError::Domains(d) => write!(f, "{d} NUMA domains: need 1 to 64, each at least 2 MiB"),
        }
    }
}

impl std::error::Error for ConfigError {}

fn mode_of(f: FormatId) -> Mode {
    match f {
        FormatId::Amd64 => Mode::Amd64 { la57: false },
        FormatId::Amd64La57 => Mode::Amd64 { la57: true },
        FormatId::Arm64 => Mode::Arm64,
        FormatId::I386 => Mode::I386,
        FormatId::I386Pae => Mode::I386Pae,
    }
}

enum Work {
    Ipi(IpiMessage),
    Inval(TlbInval),
    Audit(Arc<Mutex<Vec<Violation>>>),
}

/// What a waiting sender watches: how many targets have yet to finish, and whether one of them
/// panicked doing it (so the sender fails instead of waiting forever).
struct Ack {
    remaining: AtomicUsize,
    poisoned: AtomicBool,
}

struct Msg {
    work: Work,
    ack: Option<Arc<Ack>>,
}

impl Drop for Msg {
    /// A message is acknowledged when it is dropped: after its work is done, or while a panic
    /// unwinds through the target (then the acknowledgement poisons the sender's wait).
    fn drop(&mut self) {
        if let Some(a) = &self.ack {
            if std::thread::panicking() {
                a.poisoned.store(true, Ordering::Release);
            }
            a.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Pops this thread's `BOUND` stack back to a recorded depth, also when unwinding.
struct Unbind(usize);

impl Drop for Unbind {
    fn drop(&mut self) {
        BOUND.with(|b| b.borrow_mut().truncate(self.0));
    }
}

struct CpuShared {
    state: Arc<Mutex<CpuState>>,
    mailbox: Mutex<VecDeque<Msg>>,
    pending: AtomicBool,
    /// With the detector on, held by whoever touches this CPU's caches and MMU registers: the
    /// thread running it, for each access and each `with_state`, and a CPU that closes a
    /// page-table update and checks every CPU's caches at once (DET-7).
    caches: Mutex<()>,
    counters: CpuCounters,
}

struct Bound {
    machine: usize,
    cpu: CpuId,
    /// Every access to the state goes through this pointer, taken from `_guard` when the CPU was
    /// bound; the guard itself is only kept to hold the lock.
    state: *mut CpuState,
    _guard: ArcMutexGuard<RawMutex, CpuState>,
}

impl Bound {
    fn new(machine: usize, cpu: CpuId, mut guard: ArcMutexGuard<RawMutex, CpuState>) -> Self {
        // The state lives in the Arc's allocation, so the pointer stays valid while the guard
        // (which moves with this struct) is held.
        let state: *mut CpuState = &mut *guard;
        Bound {
            machine,
            cpu,
            state,
            _guard: guard,
        }
    }
}

thread_local! {
    /// The CPUs this thread runs on, innermost last (a sender that drains an idle CPU's mailbox
    /// runs on it for that while).
    static BOUND: RefCell<Vec<Bound>> = const { RefCell::new(Vec::new()) };
}

/// A simulated machine.
pub struct Machine {
    cfg: MachineConfig,
    mode: Mode,
    mem: PhysMem,
    segments: Vec<PhysSegment>,
    cpus: Vec<CpuShared>,
    detector: Detector,
    /// The detector was on when the machine was built: CPU caches are then touched only under
    /// their `caches` lock, so that DET-7's check can read them from another thread. Fixed for
    /// the machine's life (a later `set_mode` changes what is checked, not the locking).
    guard_caches: bool,
    ipi_handlers: RwLock<Vec<Option<IpiHandler>>>,
    fault_handler: RwLock<Option<FaultHandler>>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Build a machine.
    pub fn new(cfg: MachineConfig) -> Result<Arc<Machine>, ConfigError> {
        if cfg.cpus == 0 || cfg.cpus as usize > vmsys::platform::MAX_CPUS {
            return Err(ConfigError::Cpus(cfg.cpus));
        }
        let max_pa_bits = match cfg.format {
            FormatId::I386 => 32,
            FormatId::I386Pae | FormatId::Amd64 | FormatId::Amd64La57 => 52,
            FormatId::Arm64 => 48,
        };
        if cfg.pa_bits < 24 || cfg.pa_bits > max_pa_bits {
            return Err(ConfigError::PaBits(cfg.pa_bits));
        }
        let pa_limit = 1u128 << cfg.pa_bits;
        if cfg.mem_bytes < 4 << 20 || cfg.mem_bytes as u128 > pa_limit {
            return Err(ConfigError::Memory(cfg.mem_bytes));
        }
        let mem = PhysMem::new(cfg.mem_bytes);
        let per = (mem.size() / cfg.domains.max(1) as u64) & !((2 << 20) - 1);
        if cfg.domains == 0 || cfg.domains > 64 || per == 0 {
            return Err(ConfigError::Domains(cfg.domains));
        }
        let segments = (0..cfg.domains)
            .map(|d| PhysSegment {
                start: PhysAddr::new(d as u64 * per),
                end: PhysAddr::new(if d + 1 == cfg.domains {
                    mem.size()
                } else {
                    (d as u64 + 1) * per
                }),
                domain: d,
            })
            .collect();
        let mode = mode_of(cfg.format);
        let regs = MmuRegs {
            mode,
            root: 0,
            kernel_root: 0,
            tag: 0,
            pdpte: [0; 4],
            nxe: mode != Mode::I386,
            wp: true,
            pge: true,
            smep: false,
            hw_af: cfg.arm64_hw_af,
            hw_dbm: cfg.arm64_hw_dbm,
            pa_bits: cfg.pa_bits,
        };
        let cpus = (0..cfg.cpus)
            .map(|id| CpuShared {
                state: Arc::new(Mutex::new(CpuState::new(id, regs))),
                mailbox: Mutex::new(VecDeque::new()),
                pending: AtomicBool::new(false),
                caches: Mutex::new(()),
                counters: CpuCounters::default(),
            })
            .collect();
        Ok(Arc::new(Machine {
            detector: Detector::new(cfg.cpus as usize, cfg.detector),
            guard_caches: cfg.detector != DetectorMode::Off,
            cfg,
            mode,
            mem,
            segments,
            cpus,
            ipi_handlers: RwLock::new(vec![None; 256]),
            fault_handler: RwLock::new(None),
        }))
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// Its physical memory (for the walker tests and the host side of workloads).
    pub fn mem(&self) -> &PhysMem {
        &self.mem
    }

    /// The stale-translation detector.
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    fn id(&self) -> usize {
        self as *const Machine as usize
    }

    /// Run `f` on CPU `cpu` from the calling thread. The CPU is this thread's until `f` returns.
    pub fn run_on<R>(&self, cpu: CpuId, f: impl FnOnce(&Cpu<'_>) -> R) -> R {
        let shared = self
            .cpus
            .get(cpu as usize)
            .unwrap_or_else(|| panic!("no cpu {cpu}"));
        let me = self.id();
        BOUND.with(|b| {
            assert!(
                !b.borrow().iter().any(|x| x.machine == me),
                "this thread already runs on a cpu of this machine"
            )
        });
        let bound = Bound::new(me, cpu, shared.state.lock_arc());
        let state = bound.state;
        let depth = BOUND.with(|b| {
            let mut b = b.borrow_mut();
            b.push(bound);
            b.len() - 1
        });
        let _unbind = Unbind(depth);
        let c = Cpu {
            m: self,
            id: cpu,
            shared,
            state,
        };
        c.take_interrupts();
        f(&c)
    }

    /// Run `f` on every CPU at once, one host thread each; returns their results by CPU.
    pub fn run_on_all<R: Send>(&self, f: impl Fn(&Cpu<'_>) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..self.cfg.cpus)
                .map(|c| {
                    let f = &f;
                    s.spawn(move || self.run_on(c, f))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// The CPU the calling thread runs on, if it runs on one of this machine.
    pub fn current(&self) -> Option<CpuId> {
        let me = self.id();
        BOUND.with(|b| b.borrow().last().filter(|x| x.machine == me).map(|x| x.cpu))
    }

    #[inline]
    fn with_state<R>(&self, f: impl FnOnce(&mut CpuState) -> R) -> R {
        let me = self.id();
        BOUND.with(|b| {
            let mut b = b.borrow_mut();
            let top = b
                .last_mut()
                .filter(|x| x.machine == me)
                .expect("not running on a cpu of this machine");
            // SAFETY: this thread holds the CPU's lock (the guard in `top`), and the RefCell
            // borrow held across `f` keeps any other `with_state` from overlapping; the access
            // path (`Cpu::translate`) never runs inside `f` (every `f` here is internal).
            let _caches = self
                .guard_caches
                .then(|| self.cpus[top.cpu as usize].caches.lock());
            f(unsafe { &mut *top.state })
        })
    }

    /// Drain the current CPU's mailbox (an interrupt point).
    fn service_current(&self, cpu: CpuId) {
        let sh = &self.cpus[cpu as usize];
        while sh.pending.swap(false, Ordering::Acquire) {
            let msgs: Vec<Msg> = sh.mailbox.lock().drain(..).collect();
            // Each message is acknowledged as it is dropped, at the end of its iteration; if a
            // handler panics, the rest are dropped (and acknowledged, poisoned) by the unwind.
            for m in msgs {
                match &m.work {
                    Work::Ipi(msg) => {
                        let h = self.ipi_handlers.read()[msg.vector as usize].clone();
                        if let Some(h) = h {
                            h(msg);
                        }
                        sh.counters.ipis_handled.bump();
                    }
                    Work::Inval(inv) => {
                        let inv = *inv;
                        self.with_state(|st| st.invalidate(inv));
                        sh.counters.remote_invalidations.bump();
                    }
                    Work::Audit(out) => {
                        let v = self.with_state(|st| st.audit(&self.mem, &self.detector));
                        out.lock().extend(v);
                    }
                }
            }
        }
    }

    /// If `cpu` has mail and no thread runs it, run on it briefly and drain the mail.
    fn service_if_idle(&self, cpu: CpuId) {
        let sh = &self.cpus[cpu as usize];
        if !sh.pending.load(Ordering::Acquire) {
            return;
        }
        if let Some(guard) = sh.state.try_lock_arc() {
            let depth = BOUND.with(|b| {
                let mut b = b.borrow_mut();
                b.push(Bound::new(self.id(), cpu, guard));
                b.len() - 1
            });
            let _unbind = Unbind(depth);
            self.service_current(cpu);
        }
    }

    /// Take the interrupts of every CPU of this machine that this thread holds, the buried ones
    /// too (a thread serving an idle CPU still holds its own): each is brought to the top of the
    /// stack for the while, so that its handlers run on it.
    fn service_held(&self) {
        let me = self.id();
        let held: Vec<(usize, CpuId)> = BOUND.with(|b| {
            b.borrow()
                .iter()
                .enumerate()
                .filter(|(_, x)| x.machine == me)
                .map(|(i, x)| (i, x.cpu))
                .collect()
        });
        let top = BOUND.with(|b| b.borrow().len()) - 1;
        for (i, cpu) in held {
            if !self.cpus[cpu as usize].pending.load(Ordering::Acquire) {
                continue;
            }
            if i == top {
                self.service_current(cpu);
                continue;
            }
            struct Restore(usize);
            impl Drop for Restore {
                fn drop(&mut self) {
                    BOUND.with(|b| {
                        let mut b = b.borrow_mut();
                        let x = b.pop().expect("restore a buried cpu");
                        b.insert(self.0, x);
                    });
                }
            }
            BOUND.with(|b| {
                let mut b = b.borrow_mut();
                let x = b.remove(i);
                b.push(x);
            });
            let _restore = Restore(i);
            self.service_current(cpu);
        }
    }

    fn post(&self, cpu: CpuId, work: Work, ack: Option<Arc<Ack>>) {
        let sh = &self.cpus[cpu as usize];
        sh.mailbox.lock().push_back(Msg { work, ack });
        sh.pending.store(true, Ordering::Release);
    }

    /// Post `make()` to every target and wait until all have done it, taking the caller's own
    /// interrupts and serving idle targets meanwhile.
    fn deliver_and_wait(&self, targets: &CpuSet, make: impl Fn() -> Work) {
        let ack = Arc::new(Ack {
            remaining: AtomicUsize::new(targets.len() as usize),
            poisoned: AtomicBool::new(false),
        });
        for t in targets.iter() {
            self.post(t, make(), Some(ack.clone()));
        }
        let me = self.current();
        let mut spins = 0u32;
        while ack.remaining.load(Ordering::Acquire) != 0 {
            assert!(
                !ack.poisoned.load(Ordering::Acquire),
                "a target cpu panicked while handling an interrupt"
            );
            if me.is_some() {
                self.service_held();
            }
            for t in targets.iter() {
                if Some(t) != me {
                    self.service_if_idle(t);
                }
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        assert!(
            !ack.poisoned.load(Ordering::Acquire),
            "a target cpu panicked while handling an interrupt"
        );
    }

    /// Check every CPU's TLB, walk cache and PAE registers against the tables; the violations
    /// found are recorded and returned. Meant for quiescent points (between operations).
    pub fn audit(&self) -> Vec<Violation> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let all = CpuSet::first_n(self.cfg.cpus);
        self.deliver_and_wait(&all, || Work::Audit(out.clone()));
        let v = std::mem::take(&mut *out.lock());
        for x in &v {
            self.detector.record(x.clone());
        }
        v
    }

    /// Counters of one CPU.
    pub fn cpu_counters(&self, cpu: CpuId) -> CounterSnapshot {
        self.cpus[cpu as usize].counters.snapshot()
    }

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> CounterSnapshot {
        let mut t = CounterSnapshot::default();
        for c in &self.cpus {
            t += c.counters.snapshot();
        }
        t
    }

    /// Panic at the first violation instead of recording it (for debugging).
    pub fn panic_on_violation(&self, on: bool) {
        self.detector
            .panic_on_violation
            .store(on, Ordering::Relaxed);
    }

    /// Whether page-table stores are checked for break-before-make (arm64, detector on).
    #[inline]
    fn bbm_active(&self) -> bool {
        self.mode == Mode::Arm64 && self.detector.period() != 0
    }

    /// Whether page-table stores are watched (detector on): then every store is done as an
    /// exchange, to learn the value it replaces, for the break-before-make test (arm64) and for
    /// DET-7 (a valid entry replaced inside an update bracket owes a check of every CPU's caches
    /// when the bracket closes). Off, a store is a plain store.
    #[inline]
    fn pt_watch(&self) -> bool {
        self.detector.period() != 0
    }

    /// The checks of one watched store of `new` over `old` at `pa`; whether it replaced a
    /// valid entry.
    #[inline]
    fn watch_store(&self, pa: u64, old: u64, new: u64) -> bool {
        if self.bbm_active() {
            self.bbm_compare(pa, old, new);
        }
        valid_replaced(old, new)
    }

    /// The current CPU replaced a valid page-table entry (DET-7).
    #[cold]
    #[inline(never)]
    fn note_replaced(&self) {
        if let Some(cpu) = self.current() {
            self.detector.note_valid_replaced(cpu);
        }
    }

    /// DET-7: `me` closed an update of `[lo, hi)` in which it replaced a valid entry. The
    /// operation is complete, so every CPU's caches must agree with the tables over the range
    /// (entries of dormant tags excepted: TLB-P1 flushes them before the tag is loaded again).
    /// This CPU reads each one's caches itself, under that CPU's cache lock, right away: what
    /// it checks is what every CPU holds the moment the update closed, whether or not its host
    /// thread is running, so the finding does not depend on thread timing.
    #[cold]
    #[inline(never)]
    fn check_after_update(&self, me: CpuId, lo: u64, hi: u64) {
        if !self.guard_caches {
            return;
        }
        let last = match hi {
            0 => u64::MAX,
            h if h > lo => h - 1,
            _ => return,
        };
        for (id, sh) in self.cpus.iter().enumerate() {
            let found = if id as CpuId == me {
                self.with_state(|st| st.audit_range(&self.mem, &self.detector, lo, last))
            } else {
                let _caches = sh.caches.lock();
                // SAFETY: the thread that runs this CPU (or serves it while idle) touches its
                // state only while holding `caches` (`with_state`, `Cpu::translate`), which
                // this thread now holds; the state itself lives as long as the machine.
                let st = unsafe { &*sh.state.data_ptr() };
                st.audit_range(&self.mem, &self.detector, lo, last)
            };
            for v in found {
                self.detector.record(v);
            }
        }
    }

    /// The break-before-make test of one store of `new` over `old`, once `bbm_active` holds.
    #[inline]
    fn bbm_compare(&self, pa: u64, old: u64, new: u64) {
        // Arm ARM: changing a valid descriptor's output address, its type (table/block/page),
        // memory type, shareability, contiguous hint or nG needs break-before-make.
        const VALID: u64 = 1;
        const BBM_FIELDS: u64 =
            0x0000_ffff_ffff_f000 | 0b11 | (0b111 << 2) | (0b11 << 8) | (1 << 11) | (1 << 52);
        if old & VALID != 0 && new & VALID != 0 && (old ^ new) & BBM_FIELDS != 0 {
            self.bbm_violation(pa, old, new);
        }
    }

    #[cold]
    #[inline(never)]
    fn bbm_violation(&self, pa: u64, old: u64, new: u64) {
        self.detector.record(Violation {
            cpu: self.current().unwrap_or(CpuId::MAX),
            va: 0,
            kind: ViolationKind::BreakBeforeMake { pa, old, new },
        });
    }

    #[inline]
    #[track_caller]
    fn check_pa(&self, pa: PhysAddr, len: u64) {
        assert!(
            self.mem.contains(pa.as_u64(), len),
            "machine check: physical access {pa}+{len:#x} beyond memory ({:#x})",
            self.mem.size()
        );
    }

    /// The checks of a `pt_*_run64` call: the run is inside memory (always), 8-byte aligned
    /// and inside one 4 KiB page (debug builds).
    #[inline]
    #[track_caller]
    fn check_run(&self, pa: PhysAddr, words: usize) {
        self.check_pa(pa, 8 * words as u64);
        vmsys::platform::debug_assert_run_in_page(pa, words);
    }
}

/// How many times one access is retried at the fault handler's request before the fault is
/// delivered anyway. Hardware retries for ever; the bound only catches a handler that asks for
/// a retry without fixing anything. It is large because a legitimate retry can lose a race
/// again: a reader retrying while another CPU keeps remapping the page (arm64
/// break-before-make) on a host with fewer cores than simulated CPUs.
const MAX_FAULT_RETRIES: u32 = 1024;

/// A handle for the CPU the calling thread runs on (see [`Machine::run_on`]).
pub struct Cpu<'m> {
    m: &'m Machine,
    id: CpuId,
    shared: &'m CpuShared,
    /// The bound CPU's state (see `Bound`); a raw pointer also makes `Cpu` neither `Send` nor
    /// `Sync`, so it cannot leave the thread that holds the CPU.
    state: *mut CpuState,
}

impl<'m> Cpu<'m> {
    /// This CPU's number.
    pub fn id(&self) -> CpuId {
        self.id
    }

    /// The machine.
    pub fn machine(&self) -> &'m Machine {
        self.m
    }

    /// An interrupt point: take pending IPIs and broadcast invalidations.
    #[inline]
    pub fn take_interrupts(&self) {
        if self.m.cpus[self.id as usize]
            .pending
            .load(Ordering::Relaxed)
        {
            self.m.service_current(self.id);
        }
    }

    /// Switch between user and supervisor mode for the accesses that follow.
    pub fn set_user(&self, user: bool) {
        self.m.with_state(|st| st.user = user);
    }

    /// The MMU registers of this CPU.
    pub fn regs(&self) -> MmuRegs {
        self.m.with_state(|st| st.regs)
    }

    /// Set MMU control bits (CR0.WP, CR4.SMEP, ...), for tests. The root and tag are better
    /// loaded through `Platform::load_root`, which also does what the hardware does on a load.
    pub fn set_regs(&self, regs: MmuRegs) {
        self.m.with_state(|st| st.regs = regs);
    }

    /// The number of valid TLB entries and walk-cache entries.
    pub fn cache_sizes(&self) -> (usize, usize) {
        self.m.with_state(|st| (st.tlb.len(), st.psc.len()))
    }

    /// Translate `va` for an access, delivering faults to the kernel's handler (which may fix the
    /// tables and ask for a retry).
    #[inline]
    pub fn translate(&self, va: u64, kind: AccessKind) -> Result<u64, Fault> {
        self.take_interrupts();
        // SAFETY: `run_on` holds this CPU's lock for as long as `self` exists (`Cpu` is created
        // there and only lent out by reference, and it is neither Send nor Sync). No other
        // reference to the state is live: `with_state` borrows end before they return and never
        // call back into the access path, and `CpuState::translate` calls out to nothing. With
        // the detector on, a CPU checking every CPU's caches (DET-7) reads them only under the
        // cache lock taken here.
        let r = {
            let _caches = self.m.guard_caches.then(|| self.shared.caches.lock());
            let st = unsafe { &mut *self.state };
            st.translate(
                &self.m.mem,
                &self.m.detector,
                &self.shared.counters,
                va,
                kind,
            )
        };
        // The fault handler runs without the cache lock: it may change the tables and close an
        // update, which checks this CPU's caches too.
        match r {
            Ok(pa) => Ok(pa),
            Err(reason) => self.fault(va, kind, reason),
        }
    }

    /// Deliver a fault to the kernel's handler; retry the access while it asks to.
    #[cold]
    fn fault(&self, va: u64, kind: AccessKind, mut reason: FaultReason) -> Result<u64, Fault> {
        let mut retries = 0;
        loop {
            let user = self.m.with_state(|st| st.user);
            let fault = Fault {
                cpu: self.id,
                va: VirtAddr::new(va),
                access: kind,
                user,
                reason,
            };
            let handler = self.m.fault_handler.read().clone();
            match handler {
                Some(h) if retries < MAX_FAULT_RETRIES && h(&fault) == FaultResolution::Retry => {
                    retries += 1
                }
                _ => return Err(fault),
            }
            self.take_interrupts();
            let m = self.m;
            match m
                .with_state(|st| st.translate(&m.mem, &m.detector, &self.shared.counters, va, kind))
            {
                Ok(pa) => return Ok(pa),
                Err(r) => reason = r,
            }
        }
    }

    /// Load 8 bytes (aligned) at `va`.
    #[inline]
    pub fn read_u64(&self, va: u64) -> Result<u64, Fault> {
        let pa = self.translate(va, AccessKind::Read)?;
        Ok(self.m.mem.load_u64(pa))
    }

    /// Store 8 bytes (aligned) at `va`.
    #[inline]
    pub fn write_u64(&self, va: u64, val: u64) -> Result<(), Fault> {
        let pa = self.translate(va, AccessKind::Write)?;
        self.m.mem.store_u64(pa, val);
        Ok(())
    }

    /// Fetch an instruction word (8 bytes) at `va`: an execute access.
    pub fn fetch_u64(&self, va: u64) -> Result<u64, Fault> {
        let pa = self.translate(va, AccessKind::Execute)?;
        Ok(self.m.mem.load_u64(pa))
    }

    /// Read bytes at any `va`, page by page.
    pub fn read_bytes(&self, va: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let mut off = 0;
        while off < buf.len() {
            let a = va + off as u64;
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - off);
            let pa = self.translate(a, AccessKind::Read)?;
            self.m.mem.read_bytes(pa, &mut buf[off..off + n]);
            off += n;
        }
        Ok(())
    }

    /// Write bytes at any `va`, page by page.
    pub fn write_bytes(&self, va: u64, buf: &[u8]) -> Result<(), Fault> {
        let mut off = 0;
        while off < buf.len() {
            let a = va + off as u64;
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - off);
            let pa = self.translate(a, AccessKind::Write)?;
            self.m.mem.write_bytes(pa, &buf[off..off + n]);
            off += n;
        }
        Ok(())
    }
}

impl Platform for Machine {
    fn format(&self) -> FormatId {
        self.cfg.format
    }
    fn cpu_count(&self) -> u32 {
        self.cfg.cpus
    }
    fn current_cpu(&self) -> CpuId {
        self.current()
            .expect("current_cpu: not running on a cpu of this machine")
    }
    fn phys_segments(&self) -> &[PhysSegment] {
        &self.segments
    }
    fn direct_map_limit(&self) -> PhysAddr {
        PhysAddr::new(
            self.cfg
                .direct_map_limit
                .unwrap_or(self.mem.size())
                .min(self.mem.size()),
        )
    }

    #[inline]
    fn pt_load64(&self, pa: PhysAddr) -> u64 {
        self.check_pa(pa, 8);
        self.mem.load_u64(pa.as_u64())
    }
    #[inline]
    fn pt_store64(&self, pa: PhysAddr, val: u64) {
        if self.pt_watch() {
            self.pt_swap64(pa, val);
        } else {
            self.check_pa(pa, 8);
            self.mem.store_u64(pa.as_u64(), val);
        }
    }
    #[inline]
    fn pt_swap64(&self, pa: PhysAddr, val: u64) -> u64 {
        self.check_pa(pa, 8);
        let old = self.mem.swap_u64(pa.as_u64(), val);
        if self.pt_watch() && self.watch_store(pa.as_u64(), old, val) {
            self.note_replaced();
        }
        old
    }
    fn pt_load_run64(&self, pa: PhysAddr, out: &mut [u64]) {
        self.check_run(pa, out.len());
        self.mem.load_run(pa.as_u64(), out);
    }
    fn pt_store_run64(&self, pa: PhysAddr, vals: &[u64]) {
        self.check_run(pa, vals.len());
        if self.pt_watch() {
            let mut replaced = false;
            self.mem.store_run_with(pa.as_u64(), vals, |a, old, new| {
                replaced |= self.watch_store(a, old, new)
            });
            if replaced {
                self.note_replaced();
            }
        } else {
            self.mem.store_run(pa.as_u64(), vals);
        }
    }
    fn pt_swap_run64(&self, pa: PhysAddr, vals: &mut [u64]) {
        self.check_run(pa, vals.len());
        if self.pt_watch() {
            let mut replaced = false;
            self.mem.swap_run_with(pa.as_u64(), vals, |a, old, new| {
                replaced |= self.watch_store(a, old, new)
            });
            if replaced {
                self.note_replaced();
            }
        } else {
            self.mem.swap_run(pa.as_u64(), vals);
        }
    }
    #[inline]
    fn pt_cas64(&self, pa: PhysAddr, old: u64, new: u64) -> Result<u64, u64> {
        self.check_pa(pa, 8);
        let r = self.mem.cas_u64(pa.as_u64(), old, new);
        if r.is_ok() && self.pt_watch() && self.watch_store(pa.as_u64(), old, new) {
            self.note_replaced();
        }
        r
    }
    fn pt_load32(&self, pa: PhysAddr) -> u32 {
        self.check_pa(pa, 4);
        self.mem.load_u32(pa.as_u64())
    }
    fn pt_store32(&self, pa: PhysAddr, val: u32) {
        if self.pt_watch() {
            self.pt_swap32(pa, val);
        } else {
            self.check_pa(pa, 4);
            self.mem.store_u32(pa.as_u64(), val)
        }
    }
    fn pt_swap32(&self, pa: PhysAddr, val: u32) -> u32 {
        self.check_pa(pa, 4);
        let old = self.mem.swap_u32(pa.as_u64(), val);
        if self.pt_watch() && valid_replaced(old as u64, val as u64) {
            self.note_replaced();
        }
        old
    }
    fn pt_cas32(&self, pa: PhysAddr, old: u32, new: u32) -> Result<u32, u32> {
        self.check_pa(pa, 4);
        let r = self.mem.cas_u32(pa.as_u64(), old, new);
        if r.is_ok() && self.pt_watch() && valid_replaced(old as u64, new as u64) {
            self.note_replaced();
        }
        r
    }
    fn phys_zero(&self, pa: PhysAddr, len: u64) {
        self.check_pa(pa, len);
        self.mem.zero(pa.as_u64(), len)
    }
    fn phys_copy(&self, src: PhysAddr, dst: PhysAddr, len: u64) {
        self.check_pa(src, len);
        self.check_pa(dst, len);
        self.mem.copy(src.as_u64(), dst.as_u64(), len)
    }
    fn phys_read(&self, pa: PhysAddr, buf: &mut [u8]) {
        self.check_pa(pa, buf.len() as u64);
        self.mem.read_bytes(pa.as_u64(), buf)
    }
    fn phys_write(&self, pa: PhysAddr, buf: &[u8]) {
        self.check_pa(pa, buf.len() as u64);
        self.mem.write_bytes(pa.as_u64(), buf)
    }

    fn load_root(&self, load: RootLoad) {
        let cpu = self.current_cpu();
        self.with_state(|st| st.load_root(&self.mem, load));
        self.cpus[cpu as usize].counters.root_loads.bump();
        if load.flush {
            self.cpus[cpu as usize].counters.local_invalidations.bump();
        }
    }
    fn load_kernel_root(&self, root: PhysAddr) -> Result<(), PlatformError> {
        if self.mode != Mode::Arm64 {
            return Err(PlatformError::Unsupported);
        }
        self.current().ok_or(PlatformError::NotOnCpu)?;
        self.with_state(|st| st.regs.kernel_root = root.as_u64());
        Ok(())
    }
    fn tlb_invalidate_local(&self, inv: TlbInval) {
        let cpu = self.current_cpu();
        self.with_state(|st| st.invalidate(inv));
        self.cpus[cpu as usize].counters.local_invalidations.bump();
    }
    fn tlb_invalidate_broadcast(&self, inv: TlbInval) -> Result<(), PlatformError> {
        if self.mode != Mode::Arm64 {
            return Err(PlatformError::Unsupported);
        }
        let me = self.current().ok_or(PlatformError::NotOnCpu)?;
        if self.cfg.omit_shootdown.is_some() {
            // The planted bug: this CPU only, as a TLBI without IS.
            self.tlb_invalidate_local(inv);
            return Ok(());
        }
        // TLBI ...IS names the ASID explicitly: "current" means the issuer's.
        let inv = match inv {
            TlbInval::Page {
                va,
                tag: TagSel::Current,
                leaf_only,
            } => TlbInval::Page {
                va,
                tag: TagSel::Tag(self.with_state(|st| st.regs.tag)),
                leaf_only,
            },
            other => other,
        };
        self.with_state(|st| st.invalidate(inv));
        let mut others = CpuSet::first_n(self.cfg.cpus);
        others.remove(me);
        self.deliver_and_wait(&others, || Work::Inval(inv));
        self.cpus[me as usize]
            .counters
            .broadcast_invalidations
            .bump();
        Ok(())
    }

    fn set_ipi_handler(&self, vector: u8, handler: IpiHandler) {
        self.ipi_handlers.write()[vector as usize] = Some(handler);
    }
    fn send_ipi(&self, targets: &CpuSet, msg: IpiMessage, wait: bool) -> Result<(), PlatformError> {
        if let Some(bad) = targets.iter().find(|&c| c >= self.cfg.cpus) {
            return Err(PlatformError::BadCpu(bad));
        }
        let me = self.current().ok_or(PlatformError::NotOnCpu)?;
        if self.cfg.omit_shootdown == Some(msg.vector) {
            // The planted bug: the shootdown is never sent (nor counted as sent).
            return Ok(());
        }
        self.cpus[me as usize]
            .counters
            .ipis_sent
            .add(targets.len() as u64);
        if wait {
            self.deliver_and_wait(targets, || Work::Ipi(msg));
        } else {
            for t in targets.iter() {
                self.post(t, Work::Ipi(msg), None);
            }
        }
        Ok(())
    }
    fn interrupt_point(&self) {
        if let Some(me) = self.current() {
            if self.cpus[me as usize].pending.load(Ordering::Relaxed) {
                self.service_current(me);
            }
        }
    }

    fn set_fault_handler(&self, handler: FaultHandler) {
        *self.fault_handler.write() = Some(handler);
    }

    fn kernel_translate(&self, va: VirtAddr, access: AccessKind) -> Result<PhysAddr, Fault> {
        let me = self.id();
        let (id, state) = BOUND
            .with(|b| {
                b.borrow()
                    .last()
                    .filter(|x| x.machine == me)
                    .map(|x| (x.cpu, x.state))
            })
            .expect("kernel access: not running on a cpu of this machine");
        // The handle `run_on` would give: the thread holds this CPU's lock (in BOUND) for longer
        // than the handle lives, and the handle is used only here, on this thread.
        let c = Cpu {
            m: self,
            id,
            shared: &self.cpus[id as usize],
            state,
        };
        // Kernel code runs in supervisor mode, whatever the CPU was doing for its caller.
        let was_user = self.with_state(|st| std::mem::replace(&mut st.user, false));
        let r = c.translate(va.as_u64(), access);
        self.with_state(|st| st.user = was_user);
        r.map(PhysAddr::new)
    }

    fn pt_update_begin(&self, start: VirtAddr, end: VirtAddr) {
        self.detector
            .begin(self.current_cpu(), start.as_u64(), end.as_u64());
    }
    fn pt_update_end(&self) {
        let me = self.current_cpu();
        if let Some((lo, hi)) = self.detector.end(me) {
            self.check_after_update(me, lo, hi);
        }
    }

    #[inline]
    fn lock_acquired(&self) {
        LOCK_DEPTH.with(|d| d.set(d.get() + 1));
    }
    #[inline]
    fn lock_released(&self) {
        LOCK_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

thread_local! {
    /// vmsys spin locks held by this host thread (through any machine).
    static LOCK_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// How many of vmsys's spin locks the calling thread holds, as the pmap told the machine
/// ([`Platform::lock_acquired`]/[`Platform::lock_released`]). Allocation-free, so a test's
/// global allocator may call it to tell whether an allocation happens inside a critical
/// section.
#[inline]
pub fn lock_depth() -> u32 {
    LOCK_DEPTH.with(|d| d.get())
}

/// Whether a store of `new` over `old` replaced a valid entry: the only kind of page-table
/// change that can leave a cached translation stale. Bit 0 is the present/valid bit of every
/// entry of every format the machine runs (x86 P, arm64 descriptor valid).
#[inline]
fn valid_replaced(old: u64, new: u64) -> bool {
    old & 1 != 0 && old != new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(format: FormatId, detector: DetectorMode) -> Arc<Machine> {
        Machine::new(
            MachineConfig::new(format)
                .cpus(2)
                .mem(8 << 20)
                .detector(detector),
        )
        .unwrap()
    }

    fn bbm_pas(m: &Machine) -> Vec<u64> {
        m.detector()
            .violations()
            .iter()
            .filter_map(|v| match v.kind {
                ViolationKind::BreakBeforeMake { pa, .. } => Some(pa),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pt_run_store_load_round_trip() {
        for (format, det) in [
            (FormatId::Amd64, DetectorMode::Every),
            (FormatId::Arm64, DetectorMode::Off),
            (FormatId::Arm64, DetectorMode::Every),
        ] {
            let m = machine(format, det);
            let pa = PhysAddr::new(0x30_1000);
            let vals: Vec<u64> = (0..512u64).map(|i| (i << 12) | 3).collect();
            m.pt_store_run64(pa, &vals);
            let mut out = vec![0u64; 512];
            m.pt_load_run64(pa, &mut out);
            assert_eq!(out, vals, "{format:?}");
            assert_eq!(m.pt_load64(pa + 8 * 17), vals[17]);
            // A partial run from the middle of the page, up to its end.
            let mut tail = [0u64; 3];
            m.pt_load_run64(pa + 0xfe8, &mut tail);
            assert_eq!(tail, vals[509..]);
            // Empty runs, also at the very end of memory.
            m.pt_store_run64(PhysAddr::new(8 << 20), &[]);
            m.pt_load_run64(PhysAddr::new(8 << 20), &mut []);
            assert!(m.detector().violations().is_empty());
        }
    }

    #[test]
    fn pt_swap_run_returns_old_values() {
        let m = machine(FormatId::Amd64, DetectorMode::Every);
        let pa = PhysAddr::new(0x2000);
        m.pt_store_run64(pa, &[1, 2, 3, 4]);
        let mut v = [10, 20, 30];
        m.pt_swap_run64(pa + 8, &mut v);
        assert_eq!(v, [2, 3, 4]);
        let mut out = [0; 4];
        m.pt_load_run64(pa, &mut out);
        assert_eq!(out, [1, 10, 20, 30]);
        // The same through the arm64 checking path.
        let m = machine(FormatId::Arm64, DetectorMode::Every);
        m.pt_store_run64(pa, &[1, 2, 3, 4]);
        let mut v = [10, 20, 30];
        m.pt_swap_run64(pa + 8, &mut v);
        assert_eq!(v, [2, 3, 4]);
        assert_eq!(m.pt_load64(pa + 24), 30);
    }

    #[test]
    fn pt_store_run_bbm_violation_is_detected() {
        let m = machine(FormatId::Arm64, DetectorMode::Every);
        let pa = PhysAddr::new(0x40_0000);
        // Valid page descriptors (bits 1:0 = 0b11) to two frames; making them from nothing is
        // allowed.
        let old = [0x10_0000 | 0b11, 0x10_1000 | 0b11, 0];
        m.pt_store_run64(pa, &old);
        assert!(bbm_pas(&m).is_empty());
        // Word 0 keeps its frame, word 1 changes its output address while valid (a violation),
        // word 2 goes from invalid to valid (allowed).
        m.pt_store_run64(
            pa,
            &[old[0] | (1 << 10), 0x20_0000 | 0b11, 0x30_0000 | 0b11],
        );
        assert_eq!(bbm_pas(&m), [pa.as_u64() + 8]);
        match m.detector().violations()[0].kind {
            ViolationKind::BreakBeforeMake { old: o, new, .. } => {
                assert_eq!((o, new), (old[1], 0x20_0000 | 0b11))
            }
            ref k => panic!("{k:?}"),
        }
        // Through the swap run too, and break-before-make done right is not flagged.
        m.detector().clear();
        let mut v = [0x40_0000 | 0b11, 0, 0];
        m.pt_swap_run64(pa + 8, &mut v);
        assert_eq!(bbm_pas(&m), [pa.as_u64() + 8]);
        m.detector().clear();
        m.pt_store_run64(pa + 16, &[0]);
        m.pt_store_run64(pa + 16, &[0x50_0000 | 0b11]);
        assert!(bbm_pas(&m).is_empty());
        // The per-word store still checks too.
        m.pt_store64(pa + 16, 0x60_0000 | 0b11);
        assert_eq!(bbm_pas(&m), [pa.as_u64() + 16]);
    }

    #[test]
    fn no_bbm_check_when_inactive() {
        // Detector off on arm64, and any detector on x86: the plain-store paths, nothing
        // recorded, values stored all the same.
        for (format, det) in [
            (FormatId::Arm64, DetectorMode::Off),
            (FormatId::Amd64, DetectorMode::Every),
        ] {
            let m = machine(format, det);
            assert!(!m.bbm_active());
            let pa = PhysAddr::new(0x1000);
            m.pt_store_run64(pa, &[0x10_0000 | 0b11]);
            m.pt_store_run64(pa, &[0x20_0000 | 0b11]);
            m.pt_store64(pa + 8, 0x10_0000 | 0b11);
            m.pt_store64(pa + 8, 0x20_0000 | 0b11);
            let mut out = [0; 2];
            m.pt_load_run64(pa, &mut out);
            assert_eq!(out, [0x20_0000 | 0b11; 2]);
            assert!(m.detector().violations().is_empty(), "{format:?}");
        }
        assert!(machine(FormatId::Arm64, DetectorMode::Sampled(8)).bbm_active());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "crosses a 4 KiB page")]
    fn pt_run_across_a_page_is_rejected() {
        let m = machine(FormatId::Amd64, DetectorMode::Off);
        m.pt_store_run64(PhysAddr::new(0x1ff8), &[1, 2]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "crosses a 4 KiB page")]
    fn pt_load_run_across_a_page_is_rejected() {
        let m = machine(FormatId::Arm64, DetectorMode::Every);
        let mut out = [0; 513];
        m.pt_load_run64(PhysAddr::new(0x1000), &mut out);
    }

    #[test]
    #[should_panic(expected = "machine check")]
    fn pt_run_beyond_memory_is_a_machine_check() {
        let m = machine(FormatId::Amd64, DetectorMode::Off);
        let mut v = [0; 2];
        m.pt_swap_run64(PhysAddr::new((8 << 20) - 8), &mut v);
    }
}
