//! The stale-translation detector.
//!
//! A TLB or paging-structure-cache entry that maps a different frame, or grants more rights,
//! than the page tables do *after the operation that changed them has returned* is a violation.
//! While an operation is in progress its range is expected to be stale somewhere (the kernel
//! writes the entry, then invalidates), so the kernel brackets each change with
//! `Platform::pt_update_begin`/`pt_update_end`, and a stale entry inside an open bracket is
//! excused. The detector checks on every TLB hit and walk-cache use (`Every`, the default in
//! tests), on one in N (`Sampled`), or not at all (`Off`); `Machine::audit` checks every CPU's
//! caches at a quiescent point whatever the mode.
//!
//! Whatever the sampling, when a bracket closes after its CPU replaced a valid page-table entry
//! inside it (the only kind of change that can leave a cached translation stale), the machine
//! checks every CPU's TLB and walk cache over the bracket's range before any of them uses or
//! drops an entry (`Machine::pt_update_end`): a missing shootdown is found at the operation that
//! owed it, whether or not the stale entry is ever used.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use vmsys::platform::CpuId;

use crate::walker::{PscEntry, Translation};

/// How often the detector checks a TLB hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectorMode {
    /// Every TLB hit and every walk-cache use is checked against the tables.
    Every,
    /// One TLB hit in `n` (per CPU) is checked. Walks (rarer than hits) still check the walk
    /// cache entry they used and, on PAE, the PDPTE registers, every time.
    Sampled(u32),
    /// No checks on accesses (an explicit audit still checks).
    Off,
}

impl DetectorMode {
    pub(crate) fn encode(self) -> u32 {
        match self {
            DetectorMode::Every => 1,
            DetectorMode::Off => 0,
            DetectorMode::Sampled(n) => n.max(2),
        }
    }
    pub(crate) fn decode(v: u32) -> Self {
        match v {
            0 => DetectorMode::Off,
            1 => DetectorMode::Every,
            n => DetectorMode::Sampled(n),
        }
    }
}

/// What kind of stale state was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// A TLB entry disagrees with the tables (`tables` is what they say now, `None` = unmapped).
    StaleTlb {
        tlb: Translation,
        tables: Option<Translation>,
    },
    /// A paging-structure-cache entry points to a table the upper levels no longer reference, or
    /// caches more rights than they grant (a freed table still cached).
    StaleWalkCache { entry: PscEntry },
    /// PAE: a PDPTE register differs from the PDPT in memory after the change returned (a CR3
    /// reload is owed).
    StalePdpte {
        index: usize,
        register: u64,
        memory: u64,
    },
    /// arm64: a valid descriptor was replaced by another valid one with a different output
    /// address, type (table/block/page) or memory attributes without passing through invalid.
    BreakBeforeMake { pa: u64, old: u64, new: u64 },
    /// arm64: two TLB entries of different sizes translate one address to different frames.
    TlbConflict {
        existing: Translation,
        new: Translation,
    },
}

/// One detected violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub cpu: CpuId,
    pub va: u64,
    pub kind: ViolationKind,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tr = |t: &Translation| {
            format!(
                "{:#x}->{:#x} (2^{}) {:?}",
                t.va_base, t.pa_base, t.shift, t.rights
            )
        };
        write!(f, "cpu {} va {:#x}: ", self.cpu, self.va)?;
        match &self.kind {
            ViolationKind::StaleTlb { tlb, tables } => write!(
                f,
                "stale TLB entry {} but the tables say {}",
                tr(tlb),
                tables.as_ref().map(tr).unwrap_or_else(|| "unmapped".into())
            ),
            ViolationKind::StaleWalkCache { entry } => write!(
                f,
                "stale walk-cache entry: level {} table {:#x} for {:#x}/2^{}",
                entry.level, entry.table_pa, entry.va_base, entry.shift
            ),
            ViolationKind::StalePdpte { index, register, memory } => write!(
                f,
                "PDPTE register {index} = {register:#x} but memory has {memory:#x} (CR3 reload owed)"
            ),
            ViolationKind::BreakBeforeMake { pa, old, new } => write!(
                f,
                "break-before-make violated at PA {pa:#x}: {old:#x} -> {new:#x} without an invalid entry between"
            ),
            ViolationKind::TlbConflict { existing, new } => {
                write!(f, "TLB conflict: {} and {}", tr(existing), tr(new))
            }
        }
    }
}

/// An open `pt_update_begin` bracket of one CPU.
#[derive(Default)]
struct OpenUpdate {
    /// Open brackets that the detector records (opened while it was on).
    depth: AtomicU32,
    lo: AtomicU64,
    hi: AtomicU64,
    /// Every open bracket, recorded or not, and which of them are recorded (bit `i` for the
    /// bracket at nesting level `i`). Only the owning CPU touches these, so plain loads and
    /// stores suffice: with the detector off a bracket costs no atomic read-modify-write.
    nest: AtomicU32,
    recorded: AtomicU64,
    /// A valid page-table entry was replaced while the recorded brackets were open (owner only).
    changed: AtomicBool,
}

/// How many violations are kept in full (all are counted).
const KEEP: usize = 1024;

/// The detector state of a machine.
pub struct Detector {
    mode: AtomicU32,
    open: Vec<OpenUpdate>,
    any_open: AtomicU32,
    count: AtomicU64,
    excused: AtomicU64,
    checks: AtomicU64,
    kept: Mutex<Vec<Violation>>,
    /// Panic at the first violation (useful under a debugger).
    pub(crate) panic_on_violation: AtomicBool,
}

impl Detector {
    pub(crate) fn new(cpus: usize, mode: DetectorMode) -> Self {
        Detector {
            mode: AtomicU32::new(mode.encode()),
            open: (0..cpus).map(|_| OpenUpdate::default()).collect(),
            any_open: AtomicU32::new(0),
            count: AtomicU64::new(0),
            excused: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            kept: Mutex::new(Vec::new()),
            panic_on_violation: AtomicBool::new(false),
        }
    }

    /// The current mode.
    #[inline]
    pub fn mode(&self) -> DetectorMode {
        DetectorMode::decode(self.mode.load(Ordering::Relaxed))
    }

    /// The raw sampling period: 0 off, 1 every access, n one in n.
    #[inline]
    pub(crate) fn period(&self) -> u32 {
        self.mode.load(Ordering::Relaxed)
    }

    /// Change the mode.
    pub fn set_mode(&self, mode: DetectorMode) {
        self.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// Open an update bracket on `cpu`. With the detector off it is only counted, so that the
    /// matching `end` is (a detector switched on while the bracket is open does not excuse
    /// accesses in its range: switch modes while the machine is quiet).
    pub(crate) fn begin(&self, cpu: CpuId, lo: u64, hi: u64) {
        let o = &self.open[cpu as usize];
        let nest = o.nest.load(Ordering::Relaxed);
        assert!(nest < 64, "pt_update_begin nested 64 deep on cpu {cpu}");
        o.nest.store(nest + 1, Ordering::Relaxed);
        if self.period() == 0 {
            return;
        }
        o.recorded.store(
            o.recorded.load(Ordering::Relaxed) | 1 << nest,
            Ordering::Relaxed,
        );
        if o.depth.load(Ordering::Relaxed) == 0 {
            o.lo.store(lo, Ordering::Relaxed);
            o.hi.store(hi, Ordering::Relaxed);
            o.changed.store(false, Ordering::Relaxed);
            self.any_open.fetch_add(1, Ordering::SeqCst);
        } else {
            // Nested brackets widen the open range.
            o.lo.fetch_min(lo, Ordering::Relaxed);
            o.hi.fetch_max(hi, Ordering::Relaxed);
        }
        o.depth.fetch_add(1, Ordering::SeqCst);
    }

    /// Close the innermost bracket of `cpu`. When that closes the last recorded bracket and a
    /// valid entry was replaced inside, the range `[lo, hi)` that every CPU's caches must now
    /// agree with (DET-7).
    pub(crate) fn end(&self, cpu: CpuId) -> Option<(u64, u64)> {
        let o = &self.open[cpu as usize];
        let nest = o.nest.load(Ordering::Relaxed);
        assert!(
            nest > 0,
            "pt_update_end on cpu {cpu} without pt_update_begin"
        );
        let nest = nest - 1;
        o.nest.store(nest, Ordering::Relaxed);
        let recorded = o.recorded.load(Ordering::Relaxed);
        if recorded & 1 << nest == 0 {
            return None;
        }
        o.recorded.store(recorded & !(1 << nest), Ordering::Relaxed);
        let d = o.depth.load(Ordering::Relaxed);
        assert!(d > 0, "pt_update_end on cpu {cpu} without pt_update_begin");
        if d == 1 {
            o.depth.store(0, Ordering::SeqCst);
            self.any_open.fetch_sub(1, Ordering::SeqCst);
            o.changed
                .load(Ordering::Relaxed)
                .then(|| (o.lo.load(Ordering::Relaxed), o.hi.load(Ordering::Relaxed)))
        } else {
            o.depth.store(d - 1, Ordering::SeqCst);
            None
        }
    }

    /// `cpu` replaced a valid page-table entry: if it has a recorded bracket open, the caches
    /// must be checked when it closes.
    #[inline]
    pub(crate) fn note_valid_replaced(&self, cpu: CpuId) {
        let o = &self.open[cpu as usize];
        if o.depth.load(Ordering::Relaxed) != 0 {
            o.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether some CPU is in the middle of changing translations that overlap `[lo, hi)`.
    pub(crate) fn excused(&self, lo: u64, hi: u64) -> bool {
        if self.any_open.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let hit = self.open.iter().any(|o| {
            o.depth.load(Ordering::SeqCst) > 0
                && o.lo.load(Ordering::Relaxed) < hi
                && lo < o.hi.load(Ordering::Relaxed)
        });
        if hit {
            self.excused.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    pub(crate) fn note_check(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, v: Violation) {
        if self.panic_on_violation.load(Ordering::Relaxed) {
            panic!("translation violation: {v}");
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        let mut kept = self.kept.lock();
        if kept.len() < KEEP {
            kept.push(v);
        }
    }

    /// The number of violations found so far.
    pub fn violation_count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// The violations found so far (the first 1024 in full).
    pub fn violations(&self) -> Vec<Violation> {
        self.kept.lock().clone()
    }

    /// Forget the violations found so far.
    pub fn clear(&self) {
        self.kept.lock().clear();
        self.count.store(0, Ordering::SeqCst);
    }

    /// How many stale observations fell inside an open update and were excused.
    pub fn excused_count(&self) -> u64 {
        self.excused.load(Ordering::Relaxed)
    }

    /// How many checks against the tables were made.
    pub fn check_count(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_excuse_only_their_range() {
        let d = Detector::new(2, DetectorMode::Every);
        assert!(!d.excused(0, 0x1000));
        d.begin(1, 0x1000, 0x3000);
        assert!(d.excused(0x2000, 0x2001));
        assert!(!d.excused(0x3000, 0x4000));
        d.begin(1, 0x8000, 0x9000);
        assert!(d.excused(0x5000, 0x5001), "nested brackets widen");
        d.end(1);
        assert!(d.excused(0x2000, 0x2001));
        d.end(1);
        assert!(!d.excused(0x2000, 0x2001));
    }

    #[test]
    fn brackets_opened_while_off_are_free_and_balance_across_mode_changes() {
        let d = Detector::new(1, DetectorMode::Off);
        d.begin(0, 0x1000, 0x2000);
        assert_eq!(
            d.any_open.load(Ordering::SeqCst),
            0,
            "off: nothing recorded"
        );
        d.set_mode(DetectorMode::Every);
        d.begin(0, 0x8000, 0x9000);
        assert!(d.excused(0x8000, 0x8001));
        assert!(
            !d.excused(0x1000, 0x1001),
            "the bracket opened while off is not recorded"
        );
        d.end(0);
        assert_eq!(d.any_open.load(Ordering::SeqCst), 0);
        d.end(0);
        assert_eq!(d.any_open.load(Ordering::SeqCst), 0);
        // And the other way round: recorded outer, mode off, unrecorded inner.
        d.begin(0, 0x1000, 0x2000);
        d.set_mode(DetectorMode::Off);
        d.begin(0, 0x5000, 0x6000);
        d.end(0);
        assert!(d.excused(0x1000, 0x1001));
        d.end(0);
        assert!(!d.excused(0x1000, 0x1001));
    }

    #[test]
    #[should_panic(expected = "without pt_update_begin")]
    fn unbalanced_end_is_caught_even_when_off() {
        let d = Detector::new(1, DetectorMode::Off);
        d.end(0);
    }

    #[test]
    fn only_a_closed_update_that_replaced_a_valid_entry_owes_a_cache_check() {
        let d = Detector::new(2, DetectorMode::Every);
        d.begin(0, 0x1000, 0x2000);
        assert_eq!(d.end(0), None, "nothing replaced");
        d.begin(0, 0x1000, 0x2000);
        d.begin(0, 0x8000, 0x9000);
        d.note_valid_replaced(0);
        assert_eq!(d.end(0), None, "the outer bracket is still open");
        assert_eq!(d.end(0), Some((0x1000, 0x9000)), "the widened range");
        // A replacement outside any bracket, or on another CPU, owes nothing here.
        d.note_valid_replaced(0);
        d.begin(0, 0x1000, 0x2000);
        d.note_valid_replaced(1);
        assert_eq!(d.end(0), None);
        // Off: brackets are not recorded and owe nothing.
        d.set_mode(DetectorMode::Off);
        d.begin(0, 0x1000, 0x2000);
        d.note_valid_replaced(0);
        assert_eq!(d.end(0), None);
    }

    #[test]
    fn modes_round_trip() {
        for m in [
            DetectorMode::Every,
            DetectorMode::Off,
            DetectorMode::Sampled(64),
        ] {
            assert_eq!(DetectorMode::decode(m.encode()), m);
        }
    }

    #[test]
    #[should_panic(expected = "without pt_update_begin")]
    fn unbalanced_end_asserts() {
        Detector::new(1, DetectorMode::Every).end(0);
    }
}
