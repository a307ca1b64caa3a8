//! Data frames for the run's mappings: a two-level allocator over a physical range, owned by
//! vmsim until the kernel-memory layer (the physical allocator, `kmem`) replaces it.
//!
//! The range is cut into blocks of the format's smallest superpage (2 MiB, or 4 MiB on i386).
//! A block is handed out whole (for a superpage or a full page-table page of contiguous frames,
//! which the pmap promotes) or split into 4 KiB frames; a block whose frames have all come back
//! is whole again. The lowest free block or frame is always taken, so that the run touches
//! (and the host commits) as little simulated memory as it can.

use std::collections::BTreeSet;
use std::sync::Mutex;

const PAGE: u64 = 4096;

/// Frames in use and free, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrameStats {
    pub pages_total: u64,
    pub pages_free: u64,
    pub blocks_free: u64,
    /// Superpage-sized requests that found no whole block.
    pub block_failures: u64,
}

struct Inner {
    /// Free 4 KiB frames per block, one bit each.
    bits: Vec<Vec<u64>>,
    free_in: Vec<u32>,
    /// Blocks with every frame free.
    whole: BTreeSet<u32>,
    /// Blocks with some frames free and some in use.
    partial: BTreeSet<u32>,
    block_failures: u64,
}

/// The allocator. Thread-safe (one lock; the run's CPUs allocate far less often than they
/// access memory).
pub struct DataFrames {
    start: u64,
    block: u64,
    per_block: u32,
    nblocks: u32,
    inner: Mutex<Inner>,
}

impl DataFrames {
    /// Blocks of `block` bytes over `[start, end)` (`start` rounded up, `end` down, to `block`).
    pub fn new(start: u64, end: u64, block: u64) -> Self {
        let start = start.next_multiple_of(block);
        let end = end & !(block - 1);
        let nblocks = (end.saturating_sub(start) / block) as u32;
        let per_block = (block / PAGE) as u32;
        let words = per_block.div_ceil(64) as usize;
        let full = |i: usize| {
            let left = per_block as usize - 64 * i;
            if left >= 64 {
                u64::MAX
            } else {
                (1u64 << left) - 1
            }
        };
        DataFrames {
            start,
            block,
            per_block,
            nblocks,
            inner: Mutex::new(Inner {
                bits: (0..nblocks)
                    .map(|_| (0..words).map(full).collect())
                    .collect(),
                free_in: vec![per_block; nblocks as usize],
                whole: (0..nblocks).collect(),
                partial: BTreeSet::new(),
                block_failures: 0,
            }),
        }
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// The first byte of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.start + self.nblocks as u64 * self.block
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn locate(&self, pa: u64) -> (u32, u32) {
        assert!(
            pa >= self.start && pa < self.end() && pa.is_multiple_of(PAGE),
            "frame {pa:#x} is not one of ours"
        );
        let off = pa - self.start;
        (
            (off / self.block) as u32,
            ((off % self.block) / PAGE) as u32,
        )
    }

    /// One 4 KiB frame, the lowest free one.
    pub fn alloc_page(&self) -> Option<u64> {
        let mut g = self.lock();
        let b = match g.partial.first() {
            Some(&b) => b,
            None => {
                let b = g.whole.pop_first()?;
                g.partial.insert(b);
                b
            }
        };
        let words = &mut g.bits[b as usize];
        let (w, word) = words.iter_mut().enumerate().find(|(_, w)| **w != 0)?;
        let bit = word.trailing_zeros();
        *word &= !(1 << bit);
        let i = w as u32 * 64 + bit;
        g.free_in[b as usize] -= 1;
        if g.free_in[b as usize] == 0 {
            g.partial.remove(&b);
        }
        Some(self.start + b as u64 * self.block + i as u64 * PAGE)
    }

    /// A whole block (aligned to its size), the lowest free one.
    pub fn alloc_block(&self) -> Option<u64> {
        let mut g = self.lock();
        let Some(b) = g.whole.pop_first() else {
            g.block_failures += 1;
            return None;
        };
        g.bits[b as usize].iter_mut().for_each(|w| *w = 0);
        g.free_in[b as usize] = 0;
        Some(self.start + b as u64 * self.block)
    }

    /// Return a 4 KiB frame (of a block or a split one).
    pub fn free_page(&self, pa: u64) {
        let (b, i) = self.locate(pa);
        let mut g = self.lock();
        let word = &mut g.bits[b as usize][i as usize / 64];
        assert!(*word & (1 << (i % 64)) == 0, "frame {pa:#x} freed twice");
        *word |= 1 << (i % 64);
        g.free_in[b as usize] += 1;
        if g.free_in[b as usize] == self.per_block {
            g.partial.remove(&b);
            g.whole.insert(b);
        } else {
            g.partial.insert(b);
        }
    }

    /// Counts, for the report.
    pub fn stats(&self) -> FrameStats {
        let g = self.lock();
        FrameStats {
            pages_total: self.nblocks as u64 * self.per_block as u64,
            pages_free: g.free_in.iter().map(|&n| n as u64).sum(),
            blocks_free: g.whole.len() as u64,
            block_failures: g.block_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_blocks() {
        let block = 2 << 20;
        let f = DataFrames::new(3 << 20, 9 << 20, block);
        assert_eq!((f.start(), f.end()), (4 << 20, 8 << 20));
        let a = f.alloc_page().unwrap();
        assert_eq!(a, 4 << 20, "lowest first");
        let b = f.alloc_block().unwrap();
        assert_eq!(b, 6 << 20, "the first block is split");
        assert!(f.alloc_block().is_none());
        assert_eq!(f.stats().block_failures, 1);
        f.free_page(a);
        assert_eq!(f.alloc_block(), Some(4 << 20), "a block comes back whole");
        for i in 0..512 {
            f.free_page(b + i * PAGE);
        }
        assert_eq!(f.stats().blocks_free, 1);
        let s = f.stats();
        assert_eq!((s.pages_total, s.pages_free), (1024, 512));
        // Split a block completely, then return it.
        let pages: Vec<u64> = (0..512).map(|_| f.alloc_page().unwrap()).collect();
        assert!(f.alloc_page().is_none());
        pages.iter().for_each(|&p| f.free_page(p));
        assert_eq!(f.stats().blocks_free, 1);
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn double_free_panics() {
        let f = DataFrames::new(0, 4 << 20, 4 << 20);
        let a = f.alloc_page().unwrap();
        f.free_page(a);
        f.free_page(a);
    }
}
