//! A whole vmsys booted on a simulated machine: one page array shared by the buddy allocator
//! and the pmap, the pmap drawing its page-table pages from the buddy, its fault handler
//! installed, superpage reservations, and the kernel-memory layer. What `vmsim` runs and what
//! the kernel-memory tests start from.

use std::sync::Arc;

use vmsys::kmem::{Kmem, KmemConfig, KmemError};
use vmsys::page::PageArray;
use vmsys::phys::{BuddyAllocator, ReservSystem};
use vmsys::platform::Platform;
use vmsys::pmap::PmapError;
use vmsys::{FrameSource, PmapConfig, PmapSystem, PAGE_SIZE};

use crate::{ConfigError, Machine, MachineConfig};

/// Why a system could not boot.
#[derive(Debug)]
pub enum BootError {
    Machine(ConfigError),
    Pmap(PmapError),
    Kmem(KmemError),
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootError::Machine(e) => write!(f, "machine: {e}"),
            BootError::Pmap(e) => write!(f, "pmap bootstrap: {e}"),
            BootError::Kmem(e) => write!(f, "kernel memory: {e}"),
        }
    }
}

impl std::error::Error for BootError {}

/// The layers of a booted system. `P` is how vmsys reaches the machine: the machine itself, or
/// a wrapper around it.
pub struct System<P: Platform + 'static = Machine> {
    pub m: Arc<Machine>,
    pub pmap: Arc<PmapSystem<P>>,
    pub buddy: Arc<BuddyAllocator>,
    pub reserv: Arc<ReservSystem>,
    pub kmem: Arc<Kmem<P>>,
}

/// What an audit of every layer found.
#[derive(Clone, Debug, Default)]
pub struct SystemAudit {
    /// Checks run (pmap tables and counts, TLB entries, kmem, arenas, reservations, frames).
    pub checks: u64,
    /// Violations, described.
    pub violations: Vec<String>,
}

impl System {
    /// Boot: machine, page array, buddy, then [`System::boot_on`].
    pub fn boot(
        mcfg: MachineConfig,
        pcfg: PmapConfig,
        kcfg: KmemConfig,
    ) -> Result<System, BootError> {
        let m = Machine::new(mcfg).map_err(BootError::Machine)?;
        let (pages, buddy) = System::memory(&m);
        System::boot_on(m.clone(), m, pages, buddy, pcfg, kcfg)
    }

    /// The page array of `m`'s memory and a buddy allocator over all of it: the first step of
    /// a boot, for a caller that takes memory for itself before the rest boots.
    pub fn memory(m: &Machine) -> (Arc<PageArray>, Arc<BuddyAllocator>) {
        let pages = Arc::new(PageArray::new(m.phys_segments()));
        let buddy = Arc::new(BuddyAllocator::new(pages.clone()));
        (pages, buddy)
    }
}

impl<P: Platform + 'static> System<P> {
    /// Boot the layers above memory on `m`, reached through `plat`: the pmap over `buddy`
    /// (initialised on every CPU, its fault handler installed), reservations of the pmap's
    /// first superpage size, kernel memory.
    pub fn boot_on(
        m: Arc<Machine>,
        plat: Arc<P>,
        pages: Arc<PageArray>,
        buddy: Arc<BuddyAllocator>,
        pcfg: PmapConfig,
        kcfg: KmemConfig,
    ) -> Result<System<P>, BootError> {
        let pmap = PmapSystem::bootstrap_with_pages(plat, buddy.clone(), pages, pcfg)
            .map_err(BootError::Pmap)?;
        for c in 0..m.cpu_count() {
            m.run_on(c, |_| pmap.init_cpu());
        }
        pmap.install_fault_handler();
        let sp = pmap.page_sizes().nth(1).unwrap_or(PAGE_SIZE);
        let reserv = Arc::new(ReservSystem::new(
            buddy.clone(),
            (sp / PAGE_SIZE).trailing_zeros() as usize,
        ));
        let kmem = m
            .run_on(0, |_| Kmem::new(pmap.clone(), reserv.clone(), kcfg))
            .map_err(BootError::Kmem)?;
        Ok(System {
            m,
            pmap,
            buddy,
            reserv,
            kmem,
        })
    }

    /// Audit every layer at a quiet moment (no CPU in the middle of an operation). `extra`
    /// frames are held by the caller outside these layers (data pages of user mappings, test
    /// frames), so that frame accounting can be checked: every frame the buddy has handed out
    /// is held by the pmap, by live kernel memory, by a reservation that has not handed it out
    /// yet (the unpopulated frames of a partially populated one: a small `kmem_malloc` leaves
    /// most of its reservation so), or by the caller.
    pub fn audit(&self, extra_frames: u64) -> SystemAudit {
        let mut a = SystemAudit::default();
        match self.pmap.audit() {
            Ok(rep) => {
                a.checks += rep.leaves + rep.user_ptps + rep.kernel_ptps + rep.pv_entries;
                let kmem_pages = self.kmem.stats().kmem_bytes / PAGE_SIZE;
                let reserved = self.reserv.unpopulated_frames();
                a.checks += 1;
                if self.buddy.in_use() != rep.frames_held + kmem_pages + reserved + extra_frames {
                    a.violations.push(format!(
                        "frames: the buddy has {} out, the pmap holds {}, kmem {}, reservations {} (unpopulated), others {}",
                        self.buddy.in_use(),
                        rep.frames_held,
                        kmem_pages,
                        reserved,
                        extra_frames
                    ));
                }
            }
            Err(errs) => a
                .violations
                .extend(errs.iter().map(|e| format!("pmap: {e:?}"))),
        }
        a.checks += 1;
        if let Err(errs) = self.kmem.audit() {
            a.violations.extend(errs);
        }
        // What the detector met on accesses, before the machine's audit records its own
        // findings there too.
        let seen = self.m.detector().violations();
        a.checks += self.m.cpu_count() as u64;
        a.violations.extend(
            self.m
                .audit()
                .iter()
                .map(|v| format!("stale translation: {v:?}")),
        );
        a.violations
            .extend(seen.iter().map(|v| format!("detector: {v:?}")));
        a
    }
}
