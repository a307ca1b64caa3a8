//! Transient I/O mappings (FreeBSD `pmap_map_io_transient` / `pmap_unmap_io_transient`).
//!
//! A page inside the direct map is reached through it. The others get KVA from the transient
//! arena and:
//! - without `can_fault`: the caller is pinned to its CPU, the entries are made with no
//!   shootdown (they were invalid) and cleared on unmap with a local invalidation only. FreeBSD
//!   leaves the entry valid in freed KVA; we clear it, so freed KVA never translates.
//! - with `can_fault`: the mapping may be used after a migration, so it is a `qenter` and its
//!   removal a broadcast invalidation.
//!
//! This path works on every format (FreeBSD's arm64 and riscv panic for pages outside the
//! direct map), and on formats with no direct map at all (i386).
//!
//! Every page must be a page-aligned frame that the machine has (a page record): anything else
//! is `NotAFrame` before anything is mapped. The direct-map test is checked arithmetic, so a
//! frame near 2^64 is never taken for one inside the direct map.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::platform::Platform;
use crate::vmem::Policy;

use super::{Kmem, KmemError};

/// A live transient mapping: the VA of each page, in order.
#[must_use = "a transient mapping must be unmapped with unmap_io_transient"]
#[derive(Debug)]
pub struct IoMapping {
    /// The address of each page (in the direct map or in transient KVA).
    pub vas: Vec<VirtAddr>,
    /// Transient KVA, if any page needed it: base and pages (guards included).
    kva: Option<(u64, u64)>,
    /// Mapped without `can_fault`: the CPU it is pinned to.
    pinned: Option<u32>,
}

impl IoMapping {
    /// Whether every page went through the direct map.
    pub fn is_direct(&self) -> bool {
        self.kva.is_none()
    }
    /// The CPU a mapping made without `can_fault` must be used and unmapped on.
    pub fn pinned_cpu(&self) -> Option<u32> {
        self.pinned
    }
}

impl<P: Platform + 'static> Kmem<P> {
    /// Map `pages` for a short I/O access by this CPU (see the module comment).
    pub fn map_io_transient(
        &self,
        pages: &[PhysAddr],
        can_fault: bool,
    ) -> Result<IoMapping, KmemError> {
        if pages.is_empty() {
            return Err(KmemError::BadSize(0));
        }
        if let Some(&bad) = pages
            .iter()
            .find(|&&p| !p.is_aligned(PAGE_SIZE) || self.sys.pages().get(p).is_none())
        {
            return Err(KmemError::NotAFrame(bad));
        }
        let dmap = self.sys.direct_map();
        let direct = |pa: PhysAddr| {
            dmap.filter(|&(_, size)| {
                pa.as_u64()
                    .checked_add(PAGE_SIZE)
                    .is_some_and(|end| end <= size)
            })
            .map(|(base, _)| VirtAddr::new(base.as_u64() + pa.as_u64()))
        };
        let outside: Vec<PhysAddr> = pages
            .iter()
            .copied()
            .filter(|&p| direct(p).is_none())
            .collect();
        if outside.is_empty() {
            self.stats.transient_direct.fetch_add(1, Ordering::Relaxed);
            return Ok(IoMapping {
                vas: pages.iter().map(|&p| direct(p).expect("inside")).collect(),
                kva: None,
                pinned: None,
            });
        }
        let guards = if self.cfg.transient_guards { 2 } else { 0 };
        let npages = outside.len() as u64 + guards;
        let bytes = npages
            .checked_mul(PAGE_SIZE)
            .ok_or(KmemError::BadSize(npages))?;
        let base = self
            .transient_arena
            .alloc(bytes, Policy::InstantFit)
            .map_err(KmemError::NoKva)?;
        let first = base + (guards / 2) * PAGE_SIZE;
        let me = self.plat().current_cpu();
        let r = if can_fault {
            self.sys.qenter(VirtAddr::new(first), &outside)
        } else {
            self.sys.qenter_local(VirtAddr::new(first), &outside)
        };
        if let Err(e) = r {
            self.transient_arena
                .free(base, bytes)
                .expect("KVA just allocated goes back");
            return Err(e.into());
        }
        let mut k = 0;
        let vas = pages
            .iter()
            .map(|&p| {
                direct(p).unwrap_or_else(|| {
                    k += 1;
                    VirtAddr::new(first + (k - 1) * PAGE_SIZE)
                })
            })
            .collect();
        self.registry
            .lock()
            .transient
            .insert(base, (npages, outside));
        let counter = if can_fault {
            &self.stats.transient_global
        } else {
            &self.stats.transient_local
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(IoMapping {
            vas,
            kva: Some((base, npages)),
            pinned: (!can_fault).then_some(me),
        })
    }

    /// Undo [`Kmem::map_io_transient`]. A mapping made without `can_fault` must be unmapped on
    /// its CPU (`WrongCpu` otherwise, and the mapping is handed back unchanged).
    pub fn unmap_io_transient(&self, m: IoMapping) -> Result<(), (KmemError, IoMapping)> {
        let Some((base, npages)) = m.kva else {
            return Ok(());
        };
        let me = self.plat().current_cpu();
        if let Some(cpu) = m.pinned {
            if cpu != me {
                return Err((
                    KmemError::WrongCpu {
                        mapped_on: cpu,
                        unmapped_on: me,
                    },
                    m,
                ));
            }
        }
        let guards = if self.cfg.transient_guards { 2 } else { 0 };
        let first = VirtAddr::new(base + (guards / 2) * PAGE_SIZE);
        let count = (npages - guards) as usize;
        let r = if m.pinned.is_some() {
            self.sys.qremove_local(first, count)
        } else {
            self.sys.qremove(first, count)
        };
        if let Err(e) = r {
            return Err((e.into(), m));
        }
        self.registry.lock().transient.remove(&base);
        self.transient_arena
            .free(base, npages * PAGE_SIZE)
            .expect("transient KVA goes back once");
        Ok(())
    }
}
