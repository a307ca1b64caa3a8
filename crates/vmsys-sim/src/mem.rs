//! Simulated physical memory.
//!
//! Memory is a table of 2 MiB chunks allocated on first write, each zero-filled by the host's
//! lazy page allocation, so a machine with far more simulated RAM than the host has can run a
//! workload that touches little of it. A chunk that was never written reads as zeroes.
//!
//! Every word is an `AtomicU64`: page-table words are read by other CPUs' walkers while the
//! kernel writes them, and the walkers set accessed/dirty bits with compare-and-exchange.
//! 4-byte words (i386 2-level entries) are accessed through their containing 8-byte word, so a
//! 4-byte compare-and-exchange is atomic with respect to everything else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const CHUNK_SHIFT: u32 = 21;
const CHUNK_BYTES: u64 = 1 << CHUNK_SHIFT;
const CHUNK_WORDS: usize = (CHUNK_BYTES / 8) as usize;

/// The physical memory of a simulated machine.
pub struct PhysMem {
    size: u64,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl std::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysMem")
            .field("size", &self.size)
            .field("chunks_touched", &self.chunks_touched())
            .finish()
    }
}

impl PhysMem {
    /// Memory of `size` bytes (rounded up to 2 MiB), all zero, none of it allocated yet.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(CHUNK_BYTES) as usize;
        PhysMem {
            size: n as u64 * CHUNK_BYTES,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The size in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `[pa, pa + len)` lies inside memory.
    #[inline]
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        pa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// How many 2 MiB chunks have been written (host memory actually committed).
    pub fn chunks_touched(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count()
    }

    #[inline]
    fn chunk(&self, pa: u64) -> Option<&[AtomicU64]> {
        self.chunks
            .get((pa >> CHUNK_SHIFT) as usize)?
            .get()
            .map(|b| &b[..])
    }

    #[inline]
    fn chunk_mut(&self, pa: u64) -> &[AtomicU64] {
        let slot = self
            .chunks
            .get((pa >> CHUNK_SHIFT) as usize)
            .unwrap_or_else(|| {
                panic!(
                    "machine check: write to PA {pa:#x} beyond memory ({:#x})",
                    self.size
                )
            });
        slot.get_or_init(|| {
            // SAFETY: an all-zero bit pattern is a valid AtomicU64 (it has the same layout as
            // u64). The allocation is zeroed by the host allocator (calloc, lazily by mmap).
            unsafe { Box::<[AtomicU64]>::new_zeroed_slice(CHUNK_WORDS).assume_init() }
        })
    }

    #[inline]
    fn word_index(pa: u64) -> usize {
        ((pa & (CHUNK_BYTES - 1)) >> 3) as usize
    }

    /// Atomic load of the aligned 8-byte word at `pa`; memory never written, or beyond the
    /// machine's memory, reads as zero (a walker reading garbage must not bring the host down).
    #[inline]
    pub fn load_u64(&self, pa: u64) -> u64 {
        debug_assert!(pa.is_multiple_of(8), "unaligned 8-byte load at {pa:#x}");
        match self.chunk(pa) {
            Some(c) => c[Self::word_index(pa)].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Atomic store of the aligned 8-byte word at `pa`.
    #[inline]
    pub fn store_u64(&self, pa: u64, val: u64) {
        debug_assert!(pa.is_multiple_of(8), "unaligned 8-byte store at {pa:#x}");
        self.chunk_mut(pa)[Self::word_index(pa)].store(val, Ordering::Release);
    }

    /// Atomic exchange of the aligned 8-byte word at `pa`.
    #[inline]
    pub fn swap_u64(&self, pa: u64, val: u64) -> u64 {
        self.chunk_mut(pa)[Self::word_index(pa)].swap(val, Ordering::AcqRel)
    }

    /// Atomic compare-and-exchange of the aligned 8-byte word at `pa`.
    #[inline]
    pub fn cas_u64(&self, pa: u64, old: u64, new: u64) -> Result<u64, u64> {
        self.chunk_mut(pa)[Self::word_index(pa)].compare_exchange(
            old,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
    }

    #[inline]
    fn half(pa: u64) -> (u64, u32) {
        (pa & !7, ((pa & 4) * 8) as u32)
    }

    /// Atomic load of the aligned 4-byte word at `pa`.
    #[inline]
    pub fn load_u32(&self, pa: u64) -> u32 {
        debug_assert!(pa.is_multiple_of(4), "unaligned 4-byte load at {pa:#x}");
        let (w, sh) = Self::half(pa);
        (self.load_u64(w) >> sh) as u32
    }

    /// Atomic compare-and-exchange of the aligned 4-byte word at `pa`.
    pub fn cas_u32(&self, pa: u64, old: u32, new: u32) -> Result<u32, u32> {
        debug_assert!(pa.is_multiple_of(4), "unaligned 4-byte cas at {pa:#x}");
        let (w, sh) = Self::half(pa);
        let mask = 0xffff_ffffu64 << sh;
        let mut cur = self.load_u64(w);
        loop {
            let cur32 = ((cur & mask) >> sh) as u32;
            if cur32 != old {
                return Err(cur32);
            }
            let next = (cur & !mask) | ((new as u64) << sh);
            match self.cas_u64(w, cur, next) {
                Ok(_) => return Ok(old),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Atomic exchange of the aligned 4-byte word at `pa`.
    pub fn swap_u32(&self, pa: u64, val: u32) -> u32 {
        let (w, sh) = Self::half(pa);
        let mask = 0xffff_ffffu64 << sh;
        let mut cur = self.load_u64(w);
        loop {
            let next = (cur & !mask) | ((val as u64) << sh);
            match self.cas_u64(w, cur, next) {
                Ok(_) => return ((cur & mask) >> sh) as u32,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Atomic store of the aligned 4-byte word at `pa`.
    #[inline]
    pub fn store_u32(&self, pa: u64, val: u32) {
        self.swap_u32(pa, val);
    }

    /// Read bytes starting at any `pa`.
    pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) {
        let mut off = 0usize;
        while off < buf.len() {
            let a = pa + off as u64;
            let w = self.load_u64(a & !7).to_le_bytes();
            let start = (a & 7) as usize;
            let n = (8 - start).min(buf.len() - off);
            buf[off..off + n].copy_from_slice(&w[start..start + n]);
            off += n;
        }
    }

    /// Write bytes starting at any `pa`; each 8-byte word is updated atomically.
    pub fn write_bytes(&self, pa: u64, buf: &[u8]) {
        let mut off = 0usize;
        while off < buf.len() {
            let a = pa + off as u64;
            let start = (a & 7) as usize;
            let n = (8 - start).min(buf.len() - off);
            if n == 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[off..off + 8]);
                self.store_u64(a, u64::from_le_bytes(b));
            } else {
                let word = &self.chunk_mut(a)[Self::word_index(a)];
                let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    let mut b = cur.to_le_bytes();
                    b[start..start + n].copy_from_slice(&buf[off..off + n]);
                    Some(u64::from_le_bytes(b))
                });
            }
            off += n;
        }
    }

    /// Zero `len` bytes at `pa` (both multiples of 8). Chunks never written stay unallocated.
    pub fn zero(&self, pa: u64, len: u64) {
        debug_assert!(pa.is_multiple_of(8) && len.is_multiple_of(8));
        let mut a = pa;
        while a < pa + len {
            let chunk_end = ((a >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT;
            let end = chunk_end.min(pa + len);
            if let Some(c) = self.chunk(a) {
                for w in &c[Self::word_index(a)..Self::word_index(a) + ((end - a) / 8) as usize] {
                    w.store(0, Ordering::Relaxed);
                }
            } else if a >= self.size {
                panic!(
                    "machine check: zeroing PA {a:#x} beyond memory ({:#x})",
                    self.size
                );
            }
            a = end;
        }
        std::sync::atomic::fence(Ordering::Release);
    }

    /// Copy `len` bytes from `src` to `dst` (all multiples of 8), word by word.
    pub fn copy(&self, src: u64, dst: u64, len: u64) {
        debug_assert!(src.is_multiple_of(8) && dst.is_multiple_of(8) && len.is_multiple_of(8));
        for off in (0..len).step_by(8) {
            self.store_u64(dst + off, self.load_u64(src + off));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_and_zero_initialised() {
        // 64 GiB of simulated memory on any host: nothing is committed until written.
        let m = PhysMem::new(64 << 30);
        assert_eq!(m.chunks_touched(), 0);
        assert_eq!(m.load_u64(40 << 30), 0);
        m.store_u64(40 << 30, 7);
        assert_eq!(m.load_u64(40 << 30), 7);
        assert_eq!(m.chunks_touched(), 1);
    }

    #[test]
    fn four_byte_words_share_an_eight_byte_word() {
        let m = PhysMem::new(4 << 20);
        m.store_u32(0x1000, 0xdead_beef);
        m.store_u32(0x1004, 0x1234_5678);
        assert_eq!(m.load_u64(0x1000), 0x1234_5678_dead_beef);
        assert_eq!(m.cas_u32(0x1004, 0x1234_5678, 1), Ok(0x1234_5678));
        assert_eq!(m.cas_u32(0x1004, 0x1234_5678, 2), Err(1));
        assert_eq!(m.load_u32(0x1000), 0xdead_beef);
        assert_eq!(m.swap_u32(0x1000, 5), 0xdead_beef);
    }

    #[test]
    fn bytes_zero_copy() {
        let m = PhysMem::new(4 << 20);
        let data: Vec<u8> = (0..100u8).collect();
        m.write_bytes(0x2003, &data);
        let mut back = vec![0u8; 100];
        m.read_bytes(0x2003, &mut back);
        assert_eq!(back, data);
        m.copy(0x2000, 0x3000, 0x100);
        m.read_bytes(0x3003, &mut back);
        assert_eq!(back, data);
        m.zero(0x3000, 0x1000);
        m.read_bytes(0x3003, &mut back);
        assert!(back.iter().all(|b| *b == 0));
        assert!(m.contains(0x3ff_ff8, 8) && !m.contains(0x400_000, 1));
    }

    #[test]
    #[should_panic(expected = "machine check")]
    fn write_beyond_memory_is_a_machine_check() {
        PhysMem::new(2 << 20).store_u64(4 << 20, 1);
    }
}
