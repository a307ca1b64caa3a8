//! Where the pmap gets physical frames for page-table pages and PV chunks.
//!
//! [`FrameSource`] is the interface; the buddy allocator of the physical-memory layer implements
//! it. [`FrameList`] is a plain free list over a range of frames, with fault injection, used by
//! the pmap's tests and by `vmsim` until a machine has the full physical allocator.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::addr::{PhysAddr, PAGE_SIZE};

/// Errors of a frame source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The frame is not inside the source's range, or not page-aligned.
    NotOurs(PhysAddr),
    /// The frame is already free.
    DoubleFree(PhysAddr),
    /// The frame is still in use (busied, wired, a page-table page, or mapped): not freed.
    InUse(PhysAddr),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::NotOurs(pa) => write!(f, "frame {pa} does not belong to this source"),
            FrameError::DoubleFree(pa) => write!(f, "frame {pa} freed twice"),
            FrameError::InUse(pa) => write!(f, "frame {pa} is still in use: not freed"),
        }
    }
}

/// A source of 4 KiB physical frames.
///
/// `alloc` never sleeps: it returns `None` when memory is short (or a fault is injected), and
/// the caller treats that as the normal resource-shortage path.
pub trait FrameSource: Send + Sync {
    /// One frame, contents unspecified.
    fn alloc(&self) -> Option<PhysAddr>;
    /// Return a frame.
    fn free(&self, pa: PhysAddr) -> Result<(), FrameError>;
    /// Frames currently allocated from this source (for leak checks).
    fn in_use(&self) -> u64;
}

/// Fault injection for an allocator: after a number of successes, fail a number of times (or
/// forever). Shared by every allocator whose failure path must be tested.
pub struct FaultInjector {
    /// Successes left before failures begin (negative: disarmed).
    after: AtomicI64,
    /// Failures still to deliver once `after` reaches zero (negative: forever).
    count: AtomicI64,
}

impl FaultInjector {
    pub const fn new() -> Self {
        FaultInjector {
            after: AtomicI64::new(-1),
            count: AtomicI64::new(0),
        }
    }

    /// After `after` more successes, fail the next `count` (`None`: every one).
    pub fn arm(&self, after: u64, count: Option<u64>) {
        self.count
            .store(count.map_or(-1, |c| c as i64), Ordering::SeqCst);
        self.after.store(after as i64, Ordering::SeqCst);
    }

    /// No more injected failures.
    pub fn disarm(&self) {
        self.after.store(-1, Ordering::SeqCst);
    }

    /// Whether this allocation must fail (counts it either way).
    pub fn should_fail(&self) -> bool {
        let left = self.after.load(Ordering::SeqCst);
        if left < 0 {
            return false;
        }
        if left > 0 {
            self.after.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        match self.count.load(Ordering::SeqCst) {
            c if c < 0 => true,
            0 => {
                self.disarm();
                false
            }
            _ => {
                self.count.fetch_sub(1, Ordering::SeqCst);
                true
            }
        }
    }
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self::new()
    }
}

/// A free list of the frames in `[start, end)`, with fault injection.
pub struct FrameList {
    start: u64,
    end: u64,
    inner: spin::Mutex<FreeState>,
    in_use: AtomicU64,
    faults: FaultInjector,
}

struct FreeState {
    free: Vec<u64>,
    /// One bit per frame: set while allocated (catches double frees).
    allocated: Vec<u64>,
}

impl FrameList {
    /// A source over the page-aligned range `[start, end)`; the lowest frames are handed out
    /// first.
    pub fn new(start: PhysAddr, end: PhysAddr) -> Self {
        let (s, e) = (
            start.align_up(PAGE_SIZE).unwrap_or(start).as_u64(),
            end.align_down(PAGE_SIZE).as_u64(),
        );
        let e = e.max(s);
        let n = ((e - s) / PAGE_SIZE) as usize;
        let free = (0..n as u64).rev().map(|i| s + i * PAGE_SIZE).collect();
        FrameList {
            start: s,
            end: e,
            inner: spin::Mutex::new(FreeState {
                free,
                allocated: alloc::vec![0; n.div_ceil(64)],
            }),
            in_use: AtomicU64::new(0),
            faults: FaultInjector::new(),
        }
    }

    /// Make allocations fail: after `after` more successes, the next `count` allocations fail
    /// (`None`: every one from then on). Fault injection for the resource-shortage paths.
    pub fn inject_failures(&self, after: u64, count: Option<u64>) {
        self.faults.arm(after, count);
    }

    /// Stop injecting failures.
    pub fn clear_failures(&self) {
        self.faults.disarm();
    }

    /// Frames still free.
    pub fn free_count(&self) -> u64 {
        self.inner.lock().free.len() as u64
    }

    fn bit(&self, pa: u64) -> Result<(usize, u64), FrameError> {
        if pa < self.start || pa >= self.end || !pa.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::NotOurs(PhysAddr::new(pa)));
        }
        let i = ((pa - self.start) / PAGE_SIZE) as usize;
        Ok((i / 64, 1u64 << (i % 64)))
    }
}

impl FrameSource for FrameList {
    fn alloc(&self) -> Option<PhysAddr> {
        if self.faults.should_fail() {
            return None;
        }
        let mut st = self.inner.lock();
        let pa = st.free.pop()?;
        let (w, b) = self.bit(pa).expect("free list holds only our frames");
        st.allocated[w] |= b;
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(PhysAddr::new(pa))
    }

    fn free(&self, pa: PhysAddr) -> Result<(), FrameError> {
        let (w, b) = self.bit(pa.as_u64())?;
        let mut st = self.inner.lock();
        if st.allocated[w] & b == 0 {
            return Err(FrameError::DoubleFree(pa));
        }
        st.allocated[w] &= !b;
        st.free.push(pa.as_u64());
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_and_double_free() {
        let f = FrameList::new(PhysAddr::new(0x1000), PhysAddr::new(0x4000));
        let a = f.alloc().unwrap();
        assert_eq!(a, PhysAddr::new(0x1000));
        assert_eq!(f.in_use(), 1);
        assert_eq!(f.free(a), Ok(()));
        assert_eq!(f.free(a), Err(FrameError::DoubleFree(a)));
        assert_eq!(
            f.free(PhysAddr::new(0x8000)),
            Err(FrameError::NotOurs(PhysAddr::new(0x8000)))
        );
        let all: Vec<_> = (0..3).map(|_| f.alloc().unwrap()).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(f.alloc(), None, "exhausted");
    }

    #[test]
    fn injected_failures() {
        let f = FrameList::new(PhysAddr::new(0), PhysAddr::new(0x10000));
        f.inject_failures(1, Some(2));
        assert!(f.alloc().is_some());
        assert!(f.alloc().is_none());
        assert!(f.alloc().is_none());
        assert!(f.alloc().is_some());
        f.inject_failures(0, None);
        assert!(f.alloc().is_none());
        f.clear_failures();
        assert!(f.alloc().is_some());
    }
}
