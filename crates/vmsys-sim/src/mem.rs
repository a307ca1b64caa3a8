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
//!
//! Each chunk is 4 KiB-aligned in host memory, so every simulated 4 KiB page is a host-aligned
//! 4 KiB block ([`PhysMem::host_page_ptr`]), as page-table code written for real memory expects.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::OnceLock;

const CHUNK_SHIFT: u32 = 21;
const CHUNK_BYTES: u64 = 1 << CHUNK_SHIFT;
const CHUNK_WORDS: usize = (CHUNK_BYTES / 8) as usize;
/// The host alignment of a chunk.
const CHUNK_ALIGN: usize = 4096;

/// One zero-initialised, 4 KiB-aligned 2 MiB chunk of memory, owned.
///
/// It is allocated as `CHUNK_BYTES + CHUNK_ALIGN` bytes at the allocator's natural alignment
/// and used from the first 4 KiB boundary in it, rather than requested with 4 KiB alignment:
/// the system allocator serves a zeroed request of small alignment with `calloc`, which for a
/// block this size takes fresh zero pages from the OS and commits them only when touched, but
/// serves a zeroed over-aligned request with an aligned allocation followed by a `memset` of
/// the whole block, which would commit all 2 MiB on the first write to the chunk.
struct Chunk {
    /// The allocation, as returned by the allocator (what `Drop` gives back).
    alloc: NonNull<u8>,
    /// The first word of the chunk: `alloc` rounded up to `CHUNK_ALIGN`.
    words: NonNull<AtomicU64>,
}

// SAFETY: a `Chunk` owns its allocation exclusively (no other handle to it exists), and what it
// holds is `AtomicU64`s, which may be shared and sent between threads; the raw pointers are
// only what makes the auto traits unavailable.
unsafe impl Send for Chunk {}
// SAFETY: as above; through `&Chunk` the memory is reached only as `&[AtomicU64]` (and as a raw
// pointer whose users take the responsibility, see `PhysMem::host_page_ptr`).
unsafe impl Sync for Chunk {}

impl Chunk {
    const LAYOUT: Layout = match Layout::from_size_align(
        CHUNK_BYTES as usize + CHUNK_ALIGN,
        std::mem::align_of::<AtomicU64>(),
    ) {
        Ok(l) => l,
        Err(_) => panic!("chunk layout"),
    };

    fn new_zeroed() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        let Some(alloc) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(Self::LAYOUT)
        };
        let pad = alloc.as_ptr().align_offset(CHUNK_ALIGN);
        debug_assert!(pad < CHUNK_ALIGN && pad.is_multiple_of(8));
        // SAFETY: `pad < CHUNK_ALIGN`, so `alloc + pad` and the `CHUNK_BYTES` after it lie in
        // the allocation of `CHUNK_BYTES + CHUNK_ALIGN` bytes; the allocation is 8-byte aligned
        // and `pad` a multiple of 8 (both are powers of two no smaller than 8 apart from the
        // offset), so the pointer is aligned for `AtomicU64`, and not null.
        let words = unsafe { NonNull::new_unchecked(alloc.as_ptr().add(pad).cast::<AtomicU64>()) };
        Chunk { alloc, words }
    }

    /// The chunk's first byte, 4 KiB-aligned.
    #[inline]
    fn base(&self) -> *mut u8 {
        self.words.as_ptr().cast()
    }

    #[inline]
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `words` points to `CHUNK_WORDS` aligned words inside the live allocation,
        // zero-initialised (all-zero bits are a valid `AtomicU64`, which has the layout of a
        // `u64`); they live as long as `self`, and shared references to atomics may coexist.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), CHUNK_WORDS) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: `alloc` came from `alloc_zeroed` with `LAYOUT` and is freed only here, once;
        // no reference into the chunk outlives it (they borrow `self`).
        unsafe { std::alloc::dealloc(self.alloc.as_ptr(), Self::LAYOUT) }
    }
}

/// The physical memory of a simulated machine.
pub struct PhysMem {
    size: u64,
    chunks: Box<[OnceLock<Chunk>]>,
    /// Each chunk's first word once it exists (null before): the load path reads one pointer
    /// instead of going through the `OnceLock`, which matters for page-table walks (a load per
    /// level).
    words: Box<[AtomicPtr<AtomicU64>]>,
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
            words: (0..n)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
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
            .map(Chunk::words)
    }

    #[inline]
    fn chunk_mut(&self, pa: u64) -> &[AtomicU64] {
        self.chunk_slot(pa).words()
    }

    /// The chunk holding `pa`, allocated if needed; a machine check beyond memory.
    #[inline]
    fn chunk_slot(&self, pa: u64) -> &Chunk {
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
            // Published once, when the chunk is made (its words are on the heap, so the
            // pointer stays valid as the `Chunk` moves into the slot).
            let c = Chunk::new_zeroed();
            self.words[(pa >> CHUNK_SHIFT) as usize].store(c.words.as_ptr(), Ordering::Release);
            c
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
        let Some(w) = self.words.get((pa >> CHUNK_SHIFT) as usize) else {
            return 0;
        };
        let base = w.load(Ordering::Acquire);
        if base.is_null() {
            // Never written (or its pointer not yet published): zero, as the chunk would read.
            return match self.chunk(pa) {
                Some(c) => c[Self::word_index(pa)].load(Ordering::Acquire),
                None => 0,
            };
        }
        // SAFETY: `base` was published (Release, read Acquire) from a live chunk of
        // `CHUNK_WORDS` words that this `PhysMem` owns until it drops (chunks are never freed
        // or replaced before then), and `word_index` is below `CHUNK_WORDS`.
        unsafe { (*base.add(Self::word_index(pa))).load(Ordering::Acquire) }
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

    /// The index range of the run of `n` words at `pa` in its chunk; panics unless the run is
    /// inside one chunk.
    #[inline]
    #[track_caller]
    fn run_range(pa: u64, n: usize) -> std::ops::Range<usize> {
        debug_assert!(pa.is_multiple_of(8), "unaligned 8-byte run at {pa:#x}");
        let i = Self::word_index(pa);
        assert!(
            n <= CHUNK_WORDS - i,
            "run of {n} words at PA {pa:#x} crosses a 2 MiB chunk"
        );
        i..i + n
    }

    /// Atomic loads (each Acquire) of `out.len()` consecutive aligned 8-byte words from `pa`,
    /// which must not cross a 2 MiB boundary. The chunk is looked up once. Memory never
    /// written reads as zero, as with [`PhysMem::load_u64`].
    #[inline]
    pub fn load_run(&self, pa: u64, out: &mut [u64]) {
        let r = Self::run_range(pa, out.len());
        match self.chunk(pa) {
            Some(c) => {
                for (o, w) in out.iter_mut().zip(&c[r]) {
                    *o = w.load(Ordering::Acquire);
                }
            }
            None => out.fill(0),
        }
    }

    /// Atomic stores (each Release) of `vals` to consecutive aligned 8-byte words from `pa`, in
    /// increasing address order; the run must not cross a 2 MiB boundary. The chunk is looked
    /// up (and allocated) once; an empty run touches nothing.
    #[inline]
    pub fn store_run(&self, pa: u64, vals: &[u64]) {
        if vals.is_empty() {
            return;
        }
        let r = Self::run_range(pa, vals.len());
        for (w, &v) in self.chunk_mut(pa)[r].iter().zip(vals) {
            w.store(v, Ordering::Release);
        }
    }

    /// Atomic exchanges (each AcqRel) of consecutive aligned 8-byte words from `pa`, in
    /// increasing address order: each `vals[i]` is stored and replaced by the old value. The
    /// run must not cross a 2 MiB boundary.
    #[inline]
    pub fn swap_run(&self, pa: u64, vals: &mut [u64]) {
        self.swap_run_with(pa, vals, |_, _, _| {});
    }

    /// [`PhysMem::swap_run`] that also calls `f(word_pa, old, new)` after each exchange, before
    /// the next one.
    #[inline]
    pub fn swap_run_with(&self, pa: u64, vals: &mut [u64], mut f: impl FnMut(u64, u64, u64)) {
        if vals.is_empty() {
            return;
        }
        let r = Self::run_range(pa, vals.len());
        let mut a = pa;
        for (w, v) in self.chunk_mut(pa)[r].iter().zip(vals) {
            let new = *v;
            *v = w.swap(new, Ordering::AcqRel);
            f(a, *v, new);
            a += 8;
        }
    }

    /// Atomic exchanges of `vals` into consecutive aligned 8-byte words from `pa`, in
    /// increasing address order, calling `f(word_pa, old, new)` after each one; the old values
    /// are not kept. The run must not cross a 2 MiB boundary. For a store that must see what
    /// it overwrites (the break-before-make check); a plain store is [`PhysMem::store_run`].
    #[inline]
    pub fn store_run_with(&self, pa: u64, vals: &[u64], mut f: impl FnMut(u64, u64, u64)) {
        if vals.is_empty() {
            return;
        }
        let r = Self::run_range(pa, vals.len());
        let mut a = pa;
        for (w, &new) in self.chunk_mut(pa)[r].iter().zip(vals) {
            f(a, w.swap(new, Ordering::AcqRel), new);
            a += 8;
        }
    }

    /// Host address of the 4 KiB page holding `pa` (the chunk is allocated if needed).
    /// The memory is `AtomicU64` words shared with every simulated CPU; writing through the
    /// pointer non-atomically races with MMU walkers and is only for single-threaded benchmarks.
    ///
    /// The pointer is 4096-aligned and valid for reads and writes of 4096 bytes for as long as
    /// this `PhysMem` lives. Panics (a machine check) when `pa` is beyond memory.
    pub fn host_page_ptr(&self, pa: u64) -> *mut u8 {
        let off = (pa & (CHUNK_BYTES - 1) & !0xfff) as usize;
        let published = self
            .words
            .get((pa >> CHUNK_SHIFT) as usize)
            .map_or(std::ptr::null_mut(), |w| w.load(Ordering::Acquire));
        let base = if published.is_null() {
            self.chunk_slot(pa).base()
        } else {
            published.cast::<u8>()
        };
        // SAFETY: `base` is the first byte of a live chunk of `CHUNK_BYTES` (published from
        // one, or just looked up) and `off` is below `CHUNK_BYTES` (a page offset inside the
        // chunk), so the result stays inside the chunk's allocation.
        unsafe { base.add(off) }
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

    #[test]
    fn runs_store_load_swap() {
        let m = PhysMem::new(4 << 20);
        let vals: Vec<u64> = (0..512u64).map(|i| i * 0x1001 + 1).collect();
        // A load from a chunk never written reads zeroes and allocates nothing.
        let mut out = vec![u64::MAX; 512];
        m.load_run(0x20_0000, &mut out);
        assert!(out.iter().all(|w| *w == 0));
        assert_eq!(m.chunks_touched(), 0);
        // An empty store allocates nothing either.
        m.store_run(0x20_0000, &[]);
        assert_eq!(m.chunks_touched(), 0);

        m.store_run(0x20_1000, &vals);
        m.load_run(0x20_1000, &mut out);
        assert_eq!(out, vals);
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(m.load_u64(0x20_1000 + 8 * i as u64), *v);
        }
        // The words around the run are untouched.
        assert_eq!(m.load_u64(0x20_0ff8), 0);
        assert_eq!(m.load_u64(0x20_2000), 0);

        let mut new: Vec<u64> = vec![7, 8, 9];
        m.swap_run(0x20_1008, &mut new);
        assert_eq!(new, vals[1..4]);
        let mut seen = Vec::new();
        let mut back = vec![10, 11];
        m.swap_run_with(0x20_1010, &mut back, |a, old, v| seen.push((a, old, v)));
        assert_eq!(back, [8, 9]);
        assert_eq!(seen, [(0x20_1010, 8, 10), (0x20_1018, 9, 11)]);
        seen.clear();
        m.store_run_with(0x20_1008, &[1, 2], |a, old, v| seen.push((a, old, v)));
        assert_eq!(seen, [(0x20_1008, 7, 1), (0x20_1010, 10, 2)]);
        let mut four = [0u64; 4];
        m.load_run(0x20_1000, &mut four);
        assert_eq!(four, [vals[0], 1, 2, 11]);
    }

    #[test]
    #[should_panic(expected = "crosses a 2 MiB chunk")]
    fn run_across_a_chunk_is_rejected() {
        PhysMem::new(4 << 20).store_run(0x1f_fff8, &[1, 2]);
    }

    #[test]
    fn host_page_ptr_is_aligned_and_shows_the_words() {
        let m = PhysMem::new(8 << 20);
        for pa in [0u64, 0x1234, 0x1f_f000, 0x20_0008, 0x7f_fff8] {
            let p = m.host_page_ptr(pa);
            assert_eq!(p as usize % 4096, 0, "pa {pa:#x}");
            m.store_u64(pa & !7, 0x1122_3344_5566_7788 ^ pa);
            let off = (pa & 0xff8) as usize;
            // SAFETY: the pointer is valid for the 4 KiB page and `off + 8` is inside it; no
            // other thread touches this memory.
            let seen = unsafe { p.add(off).cast::<u64>().read() };
            assert_eq!(seen, 0x1122_3344_5566_7788 ^ pa);
        }
        // Pages of one chunk are consecutive in host memory.
        assert_eq!(
            m.host_page_ptr(0x20_3000) as usize - m.host_page_ptr(0x20_0000) as usize,
            0x3000
        );
        // A write through the pointer is seen by the atomic accessors.
        let p = m.host_page_ptr(0x40_0000);
        // SAFETY: as above.
        unsafe { p.add(0x10).cast::<u64>().write(42) };
        assert_eq!(m.load_u64(0x40_0010), 42);
        assert_eq!(m.chunks_touched(), 4);
    }

    #[test]
    #[should_panic(expected = "machine check")]
    fn host_page_ptr_beyond_memory_is_a_machine_check() {
        PhysMem::new(2 << 20).host_page_ptr(2 << 20);
    }
}
