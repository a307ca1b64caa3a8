//! PV entries: the reverse map from a managed frame to the (pmap, address) pairs that map it.
//!
//! Entries are counted against a pool backed by physical frames, as FreeBSD's PV chunks are:
//! when the pool is empty, a frame is taken from the frame source for another chunk's worth of
//! entries, and a shortage of frames is a PV allocation failure (no sleeping, no reclaim). A
//! chunk's worth of idle entries goes back to the frame source.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::PhysAddr;
use crate::frames::{FaultInjector, FrameSource};
use crate::page::{page_flags, PageArray, PvEntry};
use crate::platform::Platform;

use super::{table, PmapError};

/// Entries per chunk frame (FreeBSD fits 168 40-byte entries in a page; ours are 16 bytes of
/// payload plus list overhead, and we keep the same figure).
pub const PV_PER_CHUNK: u64 = 168;

pub(crate) struct PvPool {
    st: spin::Mutex<PoolState>,
    in_use: AtomicU64,
    faults: FaultInjector,
}

struct PoolState {
    free_slots: u64,
    chunks: Vec<PhysAddr>,
}

impl PvPool {
    pub fn new() -> Self {
        PvPool {
            st: spin::Mutex::new(PoolState {
                free_slots: 0,
                chunks: Vec::new(),
            }),
            in_use: AtomicU64::new(0),
            faults: FaultInjector::new(),
        }
    }

    /// After `after` more successful reservations, fail the next `count` (`None`: all).
    pub fn inject_failures(&self, after: u64, count: Option<u64>) {
        self.faults.arm(after, count);
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Chunk frames held.
    pub fn chunk_frames(&self) -> usize {
        self.st.lock().chunks.len()
    }

    /// Take `n` entries from the pool, all or none.
    pub fn reserve<P: Platform>(
        &self,
        n: u64,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) -> Result<(), PmapError> {
        if self.faults.should_fail() {
            return Err(PmapError::ResourceShortage);
        }
        let mut st = table::lock(&self.st, plat);
        let mut got = Vec::new();
        while st.free_slots + got.len() as u64 * PV_PER_CHUNK < n {
            match frames.alloc() {
                Some(f) => got.push(f),
                None => {
                    for f in got {
                        frames.free(f).expect("just allocated");
                    }
                    return Err(PmapError::ResourceShortage);
                }
            }
        }
        for f in got {
            if let Some(m) = pages.get(f) {
                m.set_flags(page_flags::PV_CHUNK);
            }
            st.chunks.push(f);
            st.free_slots += PV_PER_CHUNK;
        }
        st.free_slots -= n;
        self.in_use.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Return `n` entries; chunks no longer needed go back to the frame source.
    pub fn release<P: Platform>(
        &self,
        n: u64,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) {
        if n == 0 {
            return;
        }
        let mut st = table::lock(&self.st, plat);
        st.free_slots += n;
        self.in_use.fetch_sub(n, Ordering::Relaxed);
        while st.free_slots >= PV_PER_CHUNK {
            let f = st.chunks.pop().expect("free slots imply chunks");
            st.free_slots -= PV_PER_CHUNK;
            if let Some(m) = pages.get(f) {
                m.clear_flags(page_flags::PV_CHUNK);
            }
            frames.free(f).expect("a PV chunk frame is freed once");
        }
    }
}

impl<P: Platform> super::PmapSystem<P> {
    /// Allocate one PV entry and put it on `pa`'s list.
    pub(crate) fn pv_insert(&self, pa: u64, e: PvEntry) -> Result<(), PmapError> {
        self.pv
            .reserve(1, &*self.frames, &self.pages, &*self.plat)?;
        self.pv_link(pa, e);
        Ok(())
    }

    /// Put an already reserved entry on `pa`'s list.
    pub(crate) fn pv_link(&self, pa: u64, e: PvEntry) {
        let meta = self.pages.meta(PhysAddr::new(pa));
        table::lock(&meta.pv, &*self.plat).push(e);
    }

    /// Take `e` off `pa`'s list without returning it to the pool; whether it was there.
    pub(crate) fn pv_unlink(&self, pa: u64, e: PvEntry) -> bool {
        let meta = self.pages.meta(PhysAddr::new(pa));
        let mut l = table::lock(&meta.pv, &*self.plat);
        match l.iter().position(|x| *x == e) {
            Some(i) => {
                l.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Remove `e` from `pa`'s list and free it.
    pub(crate) fn pv_remove(&self, pa: u64, e: PvEntry) {
        let found = self.pv_unlink(pa, e);
        debug_assert!(found, "PV-1: no PV entry {e:?} on frame {pa:#x}");
        if found {
            self.pv_release(1);
        }
    }

    pub(crate) fn pv_release(&self, n: u64) {
        self.pv.release(n, &*self.frames, &self.pages, &*self.plat);
    }

    /// Fault injection for PV allocation: after `after` more successful allocations, the next
    /// `count` fail (`None`: every one), as a no-sleep allocation under memory pressure does.
    pub fn inject_pv_failures(&self, after: u64, count: Option<u64>) {
        self.pv.inject_failures(after, count);
    }

    pub(crate) fn pv_reserve(&self, n: u64) -> Result<(), PmapError> {
        self.pv.reserve(n, &*self.frames, &self.pages, &*self.plat)
    }

    /// A copy of `pa`'s PV list.
    pub(crate) fn pv_list(&self, pa: u64) -> Vec<PvEntry> {
        match self.pages.get(PhysAddr::new(pa)) {
            Some(m) => table::lock(&m.pv, &*self.plat).clone(),
            None => Vec::new(),
        }
    }
}
