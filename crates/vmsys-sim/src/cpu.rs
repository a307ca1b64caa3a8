//! One simulated CPU: its MMU registers, TLB and walk cache, the access path through them, local
//! invalidation, and the detector's checks of its caches.

use std::sync::atomic::{AtomicU64, Ordering};

use vmsys::platform::{AccessKind, CpuId, FaultReason, RootLoad, TagSel, TlbInval};

use crate::detector::{Violation, ViolationKind};
use crate::mem::PhysMem;
use crate::tlb::{Tlb, TlbEntry, TlbGeometry};
use crate::walker::{self, MmuRegs, Mode, Rights, Translation, WalkCache};
use crate::Detector;

/// A counter written only by whoever holds its CPU, read by anyone: a plain load and store,
/// no locked read-modify-write on the access path.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub(crate) fn bump(&self) {
        self.add(1);
    }
    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counters of one CPU.
#[derive(Default, Debug)]
pub struct CpuCounters {
    pub tlb_hits: Counter,
    pub tlb_misses: Counter,
    pub walks: Counter,
    pub walk_cache_hits: Counter,
    pub ad_updates: Counter,
    pub faults: Counter,
    /// Invalidations this CPU executed on itself (INVLPG, INVPCID, CR3 flushes, TLBI without IS).
    pub local_invalidations: Counter,
    /// Broadcast invalidations (TLBI ...IS) this CPU issued.
    pub broadcast_invalidations: Counter,
    /// Broadcast invalidations from other CPUs that this CPU's TLB applied.
    pub remote_invalidations: Counter,
    pub ipis_sent: Counter,
    pub ipis_handled: Counter,
    pub root_loads: Counter,
}

/// A snapshot of counters, summed over CPUs or for one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub tlb_hits: u64,
    pub tlb_misses: u64,
    pub walks: u64,
    pub walk_cache_hits: u64,
    pub ad_updates: u64,
    pub faults: u64,
    pub local_invalidations: u64,
    pub broadcast_invalidations: u64,
    pub remote_invalidations: u64,
    pub ipis_sent: u64,
    pub ipis_handled: u64,
    pub root_loads: u64,
}

impl CpuCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            tlb_hits: self.tlb_hits.get(),
            tlb_misses: self.tlb_misses.get(),
            walks: self.walks.get(),
            walk_cache_hits: self.walk_cache_hits.get(),
            ad_updates: self.ad_updates.get(),
            faults: self.faults.get(),
            local_invalidations: self.local_invalidations.get(),
            broadcast_invalidations: self.broadcast_invalidations.get(),
            remote_invalidations: self.remote_invalidations.get(),
            ipis_sent: self.ipis_sent.get(),
            ipis_handled: self.ipis_handled.get(),
            root_loads: self.root_loads.get(),
        }
    }
}

impl std::ops::AddAssign for CounterSnapshot {
    fn add_assign(&mut self, o: Self) {
        self.tlb_hits += o.tlb_hits;
        self.tlb_misses += o.tlb_misses;
        self.walks += o.walks;
        self.walk_cache_hits += o.walk_cache_hits;
        self.ad_updates += o.ad_updates;
        self.faults += o.faults;
        self.local_invalidations += o.local_invalidations;
        self.broadcast_invalidations += o.broadcast_invalidations;
        self.remote_invalidations += o.remote_invalidations;
        self.ipis_sent += o.ipis_sent;
        self.ipis_handled += o.ipis_handled;
        self.root_loads += o.root_loads;
    }
}

/// TLB geometry per mode: (page shift, sets, ways) per leaf size, smallest first. Roughly a
/// modern core's L1 DTLB, large enough that a small workload hits.
pub(crate) fn tlb_geometry(mode: Mode) -> &'static [TlbGeometry] {
    match mode {
        Mode::Amd64 { .. } | Mode::Arm64 => &[(12, 64, 4), (21, 8, 4), (30, 1, 4)],
        Mode::I386Pae => &[(12, 64, 4), (21, 8, 4)],
        Mode::I386 => &[(12, 64, 4), (22, 8, 4)],
    }
}

/// The private state of one CPU, held by the thread running on it.
pub struct CpuState {
    pub(crate) id: CpuId,
    pub(crate) regs: MmuRegs,
    pub(crate) tlb: Tlb,
    pub(crate) psc: WalkCache,
    pub(crate) user: bool,
    sample: u32,
}

impl CpuState {
    pub(crate) fn new(id: CpuId, regs: MmuRegs) -> Self {
        CpuState {
            id,
            regs,
            tlb: Tlb::new(tlb_geometry(regs.mode)),
            psc: WalkCache::for_mode(regs.mode),
            user: false,
            sample: 0,
        }
    }

    fn is_x86(&self) -> bool {
        !matches!(self.regs.mode, Mode::Arm64)
    }

    /// Translate `va` for an access, through the TLB, then the walk. On success the PA.
    #[inline]
    pub(crate) fn translate(
        &mut self,
        mem: &PhysMem,
        det: &Detector,
        ctr: &CpuCounters,
        va: u64,
        kind: AccessKind,
    ) -> Result<u64, FaultReason> {
        let tag = self.regs.tag;
        if let Some(e) = self.tlb.lookup(va, tag) {
            // Work from the reference: copying the entry out costs store-forwarding stalls on
            // this, the hottest path of the simulator.
            let rights = e.tr.rights;
            if rights.contains(need(kind, self.user)) {
                let pa = e.tr.pa_of(va);
                ctr.tlb_hits.bump();
                let period = det.period();
                if period != 0 {
                    self.sample += 1;
                    if self.sample >= period {
                        self.sample = 0;
                        let e = *e;
                        self.check_entry(mem, det, &e, va);
                    }
                }
                return Ok(pa);
            }
            // Too few rights cached, or a write to a clean entry: the hardware goes back to the
            // tables (to set the dirty state, or to fault, which drops the entry).
            let etag = e.tag;
            self.tlb.invalidate_va(va, TagSel::Tag(etag), tag, true);
        }
        ctr.tlb_misses.bump();
        self.walk_and_fill(mem, det, ctr, va, kind)
    }

    #[cold]
    fn walk_and_fill(
        &mut self,
        mem: &PhysMem,
        det: &Detector,
        ctr: &CpuCounters,
        va: u64,
        kind: AccessKind,
    ) -> Result<u64, FaultReason> {
        let checking = det.period() != 0;
        if checking {
            self.check_pdptes(mem, det);
        }
        let r = walker::walk(mem, &self.regs, va, kind, self.user, Some(&mut self.psc));
        ctr.walks.bump();
        ctr.ad_updates.add(r.stats.ad_updates as u64);
        if r.stats.psc_hit {
            ctr.walk_cache_hits.bump();
        }
        if let (true, Some(pe)) = (checking, r.psc_used) {
            det.note_check();
            if !walker::psc_entry_current(mem, &self.regs, &pe)
                && !det.excused(pe.va_base, pe.va_base.wrapping_add(1u64 << pe.shift))
            {
                det.record(Violation {
                    cpu: self.id,
                    va,
                    kind: ViolationKind::StaleWalkCache { entry: pe },
                });
            }
        }
        let tr = match r.result {
            Ok(tr) => tr,
            Err(reason) => {
                ctr.faults.bump();
                return Err(reason);
            }
        };
        let entry = TlbEntry {
            tag: self.regs.tag,
            tr,
        };
        if matches!(self.regs.mode, Mode::Arm64) {
            if let Some(existing) = self.tlb.conflicting(&entry) {
                det.record(Violation {
                    cpu: self.id,
                    va,
                    kind: ViolationKind::TlbConflict {
                        existing: existing.tr,
                        new: tr,
                    },
                });
            }
        }
        self.tlb.insert(entry);
        Ok(tr.pa_of(va))
    }

    /// Detector: does the cached `e`, used for `va`, still agree with the tables?
    fn check_entry(&self, mem: &PhysMem, det: &Detector, e: &TlbEntry, va: u64) {
        det.note_check();
        let fresh = walker::peek(mem, &self.regs, va);
        if is_stale(&e.tr, fresh.as_ref(), va) {
            let lo = e.tr.va_base;
            if !det.excused(lo, lo.wrapping_add(1u64 << e.tr.shift)) {
                det.record(Violation {
                    cpu: self.id,
                    va,
                    kind: ViolationKind::StaleTlb {
                        tlb: e.tr,
                        tables: fresh,
                    },
                });
            }
        }
    }

    fn check_pdptes(&self, mem: &PhysMem, det: &Detector) {
        if let Some(v) = self.stale_pdpte(mem, det) {
            det.record(v);
        }
    }

    /// DET-3: a PAE PDPTE register that memory no longer agrees with, outside an open update.
    fn stale_pdpte(&self, mem: &PhysMem, det: &Detector) -> Option<Violation> {
        let (index, register, memory) = walker::pae_pdpte_stale(mem, &self.regs)?;
        let lo = (index as u64) << 30;
        (!det.excused(lo, lo + (1 << 30))).then_some(Violation {
            cpu: self.id,
            va: lo,
            kind: ViolationKind::StalePdpte {
                index,
                register,
                memory,
            },
        })
    }

    /// Check every cache of this CPU that the current context can use against the tables.
    pub(crate) fn audit(&self, mem: &PhysMem, det: &Detector) -> Vec<Violation> {
        self.audit_range(mem, det, 0, u64::MAX)
    }

    /// [`CpuState::audit`] of the entries that translate some address of `[lo, last]` (both
    /// ends inclusive, so that a range may end at the top of the address space).
    pub(crate) fn audit_range(
        &self,
        mem: &PhysMem,
        det: &Detector,
        lo: u64,
        last: u64,
    ) -> Vec<Violation> {
        let mut out = Vec::new();
        let tag = self.regs.tag;
        let meets = |base: u64, shift: u8| {
            let end = base.wrapping_add((1u64 << shift) - 1);
            base <= last && lo <= end
        };
        for e in self.tlb.iter() {
            if !(e.tag == tag || e.tr.rights.contains(Rights::GLOBAL)) {
                // Entries of a dormant tag cannot be used until that tag is loaded again, and
                // the kernel owes a flush before reusing it with another address space.
                continue;
            }
            if !meets(e.tr.va_base, e.tr.shift) {
                continue;
            }
            let end = e.tr.va_base.wrapping_add(1u64 << e.tr.shift);
            let mut va = e.tr.va_base;
            // Check the whole page at the granularity the tables now use (bounded at 512 steps).
            loop {
                det.note_check();
                let fresh = walker::peek(mem, &self.regs, va);
                if is_stale(&e.tr, fresh.as_ref(), va) {
                    if !det.excused(e.tr.va_base, end) {
                        out.push(Violation {
                            cpu: self.id,
                            va,
                            kind: ViolationKind::StaleTlb {
                                tlb: e.tr,
                                tables: fresh,
                            },
                        });
                    }
                    break;
                }
                let step_shift = fresh
                    .map_or(12, |f| f.shift)
                    .max(e.tr.shift.saturating_sub(9));
                va = (va | ((1u64 << step_shift) - 1)).wrapping_add(1);
                if va >= end || va == 0 {
                    break;
                }
            }
        }
        for p in self.psc.iter() {
            if p.tag != tag || !meets(p.va_base, p.shift) {
                continue;
            }
            det.note_check();
            if !walker::psc_entry_current(mem, &self.regs, p)
                && !det.excused(p.va_base, p.va_base.wrapping_add(1u64 << p.shift))
            {
                out.push(Violation {
                    cpu: self.id,
                    va: p.va_base,
                    kind: ViolationKind::StaleWalkCache { entry: *p },
                });
            }
        }
        out.extend(self.stale_pdpte(mem, det).filter(|v| meets(v.va, 30)));
        out
    }

    /// Execute an invalidation on this CPU, as its hardware defines it.
    pub(crate) fn invalidate(&mut self, inv: TlbInval) {
        let cur = self.regs.tag;
        match inv {
            TlbInval::Page { va, tag, leaf_only } => {
                let va = va.as_u64();
                // INVLPG drops global entries for the page; INVPCID by address and PCID (type 0)
                // does not (SDM: "except global translations"). arm64 TLBI by VA drops global
                // entries whatever the ASID.
                let globals = !self.is_x86() || tag == TagSel::Current;
                self.tlb.invalidate_va(va, tag, cur, globals);
                if self.is_x86() {
                    // SDM 4.10.4.1: INVLPG (and INVPCID by address) invalidate every
                    // paging-structure-cache entry of the PCID, whatever the address; there is no
                    // leaf-only form on x86.
                    match tag {
                        TagSel::Current => self.psc.invalidate_tag(cur),
                        TagSel::Tag(t) => self.psc.invalidate_tag(t),
                        TagSel::Any => self.psc.invalidate_all(),
                    }
                } else if !leaf_only {
                    let t = match tag {
                        TagSel::Current => Some(cur),
                        TagSel::Tag(t) => Some(t),
                        TagSel::Any => None,
                    };
                    self.psc.invalidate_va(va, t);
                }
            }
            TlbInval::Tag(t) => {
                self.tlb.invalidate_tag(t);
                self.psc.invalidate_tag(t);
            }
            TlbInval::AllNonGlobal => {
                self.tlb.invalidate_non_global();
                self.psc.invalidate_all();
            }
            TlbInval::All => {
                self.tlb.invalidate_all();
                self.psc.invalidate_all();
            }
        }
    }

    /// A write of the root register (CR3 / TTBR0_EL1).
    pub(crate) fn load_root(&mut self, mem: &PhysMem, load: RootLoad) {
        let root = load.root.as_u64();
        match self.regs.mode {
            Mode::Amd64 { .. } => {
                debug_assert!(load.tag < 4096, "a PCID has 12 bits: {:#x}", load.tag);
                self.regs.root = root;
                self.regs.tag = load.tag & 0xfff;
                if load.flush {
                    self.invalidate(TlbInval::Tag(self.regs.tag));
                }
            }
            Mode::I386 | Mode::I386Pae => {
                // No PCIDs: every CR3 write flushes the non-global entries and, on PAE, loads
                // the four PDPTE registers from the new PDPT.
                self.regs.root = root;
                self.regs.tag = 0;
                if self.regs.mode == Mode::I386Pae {
                    self.regs.pdpte = walker::pae_load_pdptes(mem, root);
                }
                self.invalidate(TlbInval::AllNonGlobal);
            }
            Mode::Arm64 => {
                // A TTBR0 write invalidates nothing; the kernel flushes an ASID before reuse.
                self.regs.root = root;
                self.regs.tag = load.tag;
                if load.flush {
                    self.invalidate(TlbInval::Tag(load.tag));
                }
            }
        }
    }
}

/// The rights a TLB hit needs for an access: the permission, and for a write the dirty state
/// (a write through a clean entry goes back to the tables to set it).
#[inline]
fn need(kind: AccessKind, user: bool) -> Rights {
    match (kind, user) {
        (AccessKind::Read, false) => Rights::KERN_READ,
        (AccessKind::Read, true) => Rights::USER_READ,
        (AccessKind::Write, false) => Rights::KERN_WRITE.union(Rights::DIRTY),
        (AccessKind::Write, true) => Rights::USER_WRITE.union(Rights::DIRTY),
        (AccessKind::Execute, false) => Rights::KERN_EXEC,
        (AccessKind::Execute, true) => Rights::USER_EXEC,
    }
}

/// Whether a cached translation, used for `va`, maps a different frame or grants more rights than
/// the tables' translation `fresh` (`None` = the tables do not translate `va`).
pub(crate) fn is_stale(cached: &Translation, fresh: Option<&Translation>, va: u64) -> bool {
    match fresh {
        None => true,
        Some(f) => f.pa_of(va) != cached.pa_of(va) || !f.rights.contains(cached.rights),
    }
}
