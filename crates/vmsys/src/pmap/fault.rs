//! The pmap's share of a page fault (FreeBSD arm64 `pmap_fault`): faults that the page tables
//! themselves resolve, so that the machine-independent fault handler never sees them.
//!
//! - **Access flag** (arm64 without hardware AF management): the leaf is valid but its AF is
//!   clear, because `ts_referenced` cleared it to sample references or a promotion left the
//!   superpage unreferenced. The pmap sets AF and the access is retried.
//! - **A change in flight**: the access raced with another CPU that is changing the entry under
//!   the pmap lock, e.g. inside an arm64 break-before-make window, where a valid entry is
//!   briefly invalid. Taking the pmap lock waits the change out; if the tables now allow the
//!   access it is retried.
//!
//! Anything else (no mapping, a real protection violation) is delivered to the caller, whose
//! fault handler (the VM layer) decides.

use alloc::sync::Arc;

use vmsys_arch::{Entry, Prot};

use crate::platform::{AccessKind, Fault, FaultReason, FaultResolution, Platform};

use super::{Pmap, PmapStats, PmapSystem};

impl<P: Platform + 'static> PmapSystem<P> {
    /// Install [`PmapSystem::fault`] as the platform's fault handler. It holds the system
    /// weakly, so that the handler does not keep the pmap layer alive.
    pub fn install_fault_handler(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.plat.set_fault_handler(Arc::new(move |f: &Fault| {
            weak.upgrade()
                .map_or(FaultResolution::Deliver, |sys| sys.fault(f))
        }));
    }
}

impl<P: Platform> PmapSystem<P> {
    /// Resolve `f` if the page tables already allow the access (see the module comment).
    /// Runs on the faulting CPU.
    pub fn fault(&self, f: &Fault) -> FaultResolution {
        let va = f.va.as_u64();
        let fmt = self.geom.fmt;
        if !fmt.is_canonical(va) {
            return FaultResolution::Deliver;
        }
        let me = self.plat.current_cpu();
        if me as usize >= self.cpus.len() {
            return FaultResolution::Deliver;
        }
        let pmap: Arc<Pmap> = if fmt.is_kernel_va(va, self.cfg.split) {
            self.kernel.clone()
        } else {
            let id = self.cpus[me as usize]
                .current
                .load(core::sync::atomic::Ordering::SeqCst);
            match self.lookup_pmap(id) {
                Some(p) if !p.kernel => p,
                _ => return FaultResolution::Deliver,
            }
        };
        // Under the lock: a change of this address space by another CPU is complete.
        let Ok(_st) = self.lock_live(&pmap) else {
            return FaultResolution::Deliver;
        };
        let g = &self.geom;
        if !self.translates(&pmap, va) {
            return FaultResolution::Deliver;
        }
        let Some((slot, raw, level)) = self.leaf_at(&pmap, va) else {
            return FaultResolution::Deliver;
        };
        let Entry::Leaf { prot, .. } = fmt.decode(raw, level) else {
            return FaultResolution::Deliver;
        };
        let allowed = (!f.user || prot.contains(Prot::USER))
            && match f.access {
                AccessKind::Read => true,
                AccessKind::Write => g.writable(raw),
                AccessKind::Execute => prot.contains(Prot::EXEC),
            };
        if !allowed {
            return FaultResolution::Deliver;
        }
        if matches!(f.reason, FaultReason::AccessFlag { .. }) || !g.accessed(raw) {
            // Set AF with a compare-and-exchange: another CPU's MMU may update the entry too.
            let t = self.tables();
            t.update(slot, |e| if e == 0 { e } else { e | g.accessed_mask() });
            PmapStats::bump(&self.stats.access_flag_faults);
        } else {
            PmapStats::bump(&self.stats.spurious_faults);
        }
        // A stale TLB entry of this CPU may still say no: drop it (never a shootdown: only
        // this CPU faulted, and the tables allow the access everywhere).
        self.invalidate_local_page(va & !(crate::addr::PAGE_SIZE - 1));
        FaultResolution::Retry
    }
}
