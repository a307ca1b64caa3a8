//! The page array: one record per physical frame (FreeBSD's `vm_page` array).
//!
//! For a frame used as a page-table page the record holds its reference count (the number of
//! valid entries, plus a temporary hold while an insertion is in progress). For a managed frame
//! it holds the list of PV entries: every (pmap, virtual address) that maps it. For the
//! physical-memory layer it holds the frame's domain, its buddy state and free-list links, its
//! owner (object and page index), the busy lock word, the wire count, the valid and dirty
//! bitmaps (one bit per 512-byte block) and the superpage index.
//!
//! # Which lock protects which field
//!
//! | field | protection |
//! |---|---|
//! | `ref_count`, `flags` | atomics; the pmap's page-table locks order their updates |
//! | `pv` (the head of the frame's PV list and its generation; the list's entries live in PV chunk frames, see `pmap::pv`) | its own spin lock, which also covers the entries on the list (their contents and links) |
//! | `domain` | immutable after construction |
//! | buddy order, free-list links | the buddy allocator's lock of the frame's domain |
//! | owner object and page index | written by the allocator that hands the frame to an object (under its lock) or by the holder of the exclusive busy lock; read with atomics |
//! | busy word | atomic compare-and-exchange (it *is* a lock) |
//! | wire count | atomic |
//! | valid, dirty | atomic bit operations (the owner's object lock orders them in a kernel) |
//! | superpage index | the reservation system's lock |
//!
//! The page array is `Sync` and may be shared behind an `Arc` by the pmap and the allocators.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::platform::PhysSegment;

/// One mapping of a managed frame (a reverse-map entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PvEntry {
    /// The pmap's identifier (see `Pmap::id`).
    pub pmap: u32,
    /// The virtual address of the mapping (of the superpage, for a superpage mapping).
    pub va: u64,
    /// The table level of the leaf: a superpage mapping's PV entry lives on the list of the
    /// superpage's first frame.
    pub level: u8,
}

/// The head of a managed frame's PV list (under the frame's PV spin lock).
///
/// The entries themselves are slots of PV chunk frames, threaded into a list through their
/// link words; the record holds only where the list starts and a generation that every change
/// of the list bumps (so that a walk which let go of the lock can tell whether its place is
/// still valid).
#[derive(Debug, Default)]
pub struct PvHead {
    /// The physical address of the first entry's slot; 0 when the list is empty (no slot is
    /// at offset 0 of a chunk, which holds its header).
    pub(crate) first: u64,
    /// Bumped by every insertion and removal.
    pub(crate) gen: u32,
}

impl PvHead {
    /// An empty list.
    pub const fn new() -> Self {
        PvHead { first: 0, gen: 0 }
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.first == 0
    }
}

/// What a frame is used for, as far as the pmap is concerned.
pub mod page_flags {
    /// A user page-table page: `ref_count` counts its valid entries.
    pub const PTP: u32 = 1 << 0;
    /// A kernel page-table page: never freed, `ref_count` never changes.
    pub const KERNEL_PTP: u32 = 1 << 1;
    /// A page-table page saved for a later demotion of the superpage that replaced it.
    pub const SAVED_PTP: u32 = 1 << 2;
    /// A page holding PV entries.
    pub const PV_CHUNK: u32 = 1 << 3;
    /// A write was recorded in a mapping that has since gone or lost write permission
    /// (FreeBSD's `vm_page_dirty` from the pmap).
    pub const MODIFIED: u32 = 1 << 4;
    /// An access was recorded in a mapping that has since gone (`PGA_REFERENCED`).
    pub const REFERENCED: u32 = 1 << 5;
}

/// The identity of a VM object that owns pages (FreeBSD's `vm_object_t`, as a number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u64);

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "obj#{}", self.0)
    }
}

/// log2 of the block size that the valid and dirty bitmaps track (FreeBSD's `DEV_BSHIFT`).
pub const BLOCK_SHIFT: u32 = 9;
/// The block size of the valid and dirty bitmaps: 512 bytes.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;
/// Blocks per page: one bit each in the valid and dirty bitmaps.
pub const BLOCKS_PER_PAGE: u32 = (PAGE_SIZE >> BLOCK_SHIFT) as u32;
/// Every block of a page.
pub const ALL_BLOCKS: u8 = ((1u32 << BLOCKS_PER_PAGE) - 1) as u8;

/// A byte range of a page that the valid and dirty bitmaps cannot take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRangeError {
    /// `[off, off + len)` does not lie inside the page (or `off + len` overflows).
    OutsidePage { off: u64, len: u64 },
    /// Dirtying blocks that are not valid (a dirty block must be valid): `invalid` are they.
    NotValid { off: u64, len: u64, invalid: u8 },
}

impl fmt::Display for BlockRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlockRangeError::OutsidePage { off, len } => {
                write!(f, "byte range {off:#x}+{len:#x} is not inside a page")
            }
            BlockRangeError::NotValid { off, len, invalid } => write!(
                f,
                "dirtying {off:#x}+{len:#x}: blocks {invalid:#010b} are not valid"
            ),
        }
    }
}

/// The bitmap of the 512-byte blocks that the byte range `[off, off + len)` of a page touches
/// (FreeBSD's `vm_page_bits`). An empty range touches none; a range that leaves the page is
/// an error (in every build).
pub fn block_bits(off: u64, len: u64) -> Result<u8, BlockRangeError> {
    if off.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
        return Err(BlockRangeError::OutsidePage { off, len });
    }
    if len == 0 {
        return Ok(0);
    }
    let first = (off >> BLOCK_SHIFT) as u32;
    let last = ((off + len - 1) >> BLOCK_SHIFT) as u32;
    Ok((((1u32 << (last + 1)) - 1) & !((1u32 << first) - 1)) as u8)
}

/// The busy lock word: exclusive bit, or a count of shared holders.
const BUSY_EXCLUSIVE: u32 = 1 << 31;

/// The buddy state of a frame, as kept in its record (see [`PageMeta::buddy_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuddyState {
    /// The first frame of a free block of this order.
    FreeHead(u8),
    /// The first frame of an allocated block of this order.
    AllocHead(u8),
    /// Inside a block (free or allocated) whose first frame is elsewhere, or a frame the
    /// allocator does not manage.
    Interior,
}

const ORDER_FREE: u8 = 0x80;
const ORDER_ALLOC: u8 = 0x40;
const ORDER_MASK: u8 = 0x3f;
/// The "not a block head" marker of the order byte.
const ORDER_NONE: u8 = 0;
/// No link in an intrusive free list.
pub(crate) const NO_LINK: u32 = u32::MAX;
/// No owner (object id).
const NO_OBJECT: u64 = u64::MAX;

/// Per-frame record.
pub struct PageMeta {
    /// Page-table pages: valid entries (+1 while an insertion holds it).
    pub ref_count: AtomicU32,
    /// [`page_flags`].
    pub flags: AtomicU32,
    /// The PV list of a managed frame (its entries live in PV chunk frames).
    pub(crate) pv: spin::Mutex<PvHead>,
    /// The NUMA domain of the frame (immutable).
    domain: u8,
    /// Buddy state: `ORDER_FREE | k`, `ORDER_ALLOC | k` or `ORDER_NONE` (buddy domain lock).
    order: AtomicU8,
    /// Superpage index: 1 on the first frame of a fully populated reservation (reservation lock).
    psind: AtomicU8,
    /// Valid 512-byte blocks.
    valid: AtomicU8,
    /// Dirty 512-byte blocks.
    dirty: AtomicU8,
    /// Intrusive free-list links: page indices (buddy domain lock).
    next: AtomicU32,
    prev: AtomicU32,
    /// Busy lock word: `BUSY_EXCLUSIVE` or the number of shared holders.
    busy: AtomicU32,
    /// Wirings.
    wire_count: AtomicU32,
    /// Owner object id (`NO_OBJECT`: none) and the page's index in it.
    object: AtomicU64,
    pindex: AtomicU64,
}

impl PageMeta {
    fn new(domain: u8) -> Self {
        PageMeta {
            ref_count: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            pv: spin::Mutex::new(PvHead::new()),
            domain,
            order: AtomicU8::new(ORDER_NONE),
            psind: AtomicU8::new(0),
            valid: AtomicU8::new(0),
            dirty: AtomicU8::new(0),
            next: AtomicU32::new(NO_LINK),
            prev: AtomicU32::new(NO_LINK),
            busy: AtomicU32::new(0),
            wire_count: AtomicU32::new(0),
            object: AtomicU64::new(NO_OBJECT),
            pindex: AtomicU64::new(0),
        }
    }
    /// The flags.
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Relaxed)
    }
    /// Set `f`.
    pub fn set_flags(&self, f: u32) {
        self.flags.fetch_or(f, Ordering::Relaxed);
    }
    /// Clear `f`.
    pub fn clear_flags(&self, f: u32) {
        self.flags.fetch_and(!f, Ordering::Relaxed);
    }

    /// The NUMA domain of the frame.
    #[inline]
    pub fn domain(&self) -> u8 {
        self.domain
    }

    // --- buddy state (the buddy allocator's domain lock) ---

    /// The frame's buddy state.
    #[inline]
    pub fn buddy_state(&self) -> BuddyState {
        let o = self.order.load(Ordering::Relaxed);
        if o & ORDER_FREE != 0 {
            BuddyState::FreeHead(o & ORDER_MASK)
        } else if o & ORDER_ALLOC != 0 {
            BuddyState::AllocHead(o & ORDER_MASK)
        } else {
            BuddyState::Interior
        }
    }

    /// The order of the free block this frame heads, if it heads one (FreeBSD's `m->order`;
    /// `None` is `VM_FREEPOOL`'s "not free" marker).
    #[inline]
    pub fn free_order(&self) -> Option<u8> {
        match self.buddy_state() {
            BuddyState::FreeHead(k) => Some(k),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn set_buddy_state(&self, s: BuddyState) {
        let v = match s {
            BuddyState::FreeHead(k) => ORDER_FREE | k,
            BuddyState::AllocHead(k) => ORDER_ALLOC | k,
            BuddyState::Interior => ORDER_NONE,
        };
        self.order.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn link_next(&self) -> u32 {
        self.next.load(Ordering::Relaxed)
    }
    #[inline]
    pub(crate) fn link_prev(&self) -> u32 {
        self.prev.load(Ordering::Relaxed)
    }
    #[inline]
    pub(crate) fn set_links(&self, prev: u32, next: u32) {
        self.prev.store(prev, Ordering::Relaxed);
        self.next.store(next, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn set_link_next(&self, next: u32) {
        self.next.store(next, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn set_link_prev(&self, prev: u32) {
        self.prev.store(prev, Ordering::Relaxed);
    }

    // --- owner ---

    /// The object that owns the frame and the frame's page index in it.
    pub fn owner(&self) -> Option<(ObjectId, u64)> {
        match self.object.load(Ordering::Acquire) {
            NO_OBJECT => None,
            o => Some((ObjectId(o), self.pindex.load(Ordering::Relaxed))),
        }
    }

    /// Record (or, with `None`, clear) the owner.
    ///
    /// # Panics
    /// If the object id is `u64::MAX` (the "no owner" encoding).
    pub fn set_owner(&self, owner: Option<(ObjectId, u64)>) {
        match owner {
            Some((o, p)) => {
                assert_ne!(o.0, NO_OBJECT, "object id u64::MAX is reserved");
                self.pindex.store(p, Ordering::Relaxed);
                self.object.store(o.0, Ordering::Release);
            }
            None => {
                self.object.store(NO_OBJECT, Ordering::Release);
                self.pindex.store(0, Ordering::Relaxed);
            }
        }
    }

    // --- busy lock ---

    /// Try to take the exclusive busy lock (FreeBSD's `vm_page_tryxbusy`).
    pub fn try_xbusy(&self) -> bool {
        self.busy
            .compare_exchange(0, BUSY_EXCLUSIVE, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Try to take a shared busy lock (`vm_page_trysbusy`): fails while exclusively busied.
    pub fn try_sbusy(&self) -> bool {
        let mut v = self.busy.load(Ordering::Relaxed);
        loop {
            if v & BUSY_EXCLUSIVE != 0 || v == BUSY_EXCLUSIVE - 1 {
                return false;
            }
            match self
                .busy
                .compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => v = cur,
            }
        }
    }

    /// Release the exclusive busy lock.
    ///
    /// # Panics
    /// If the page is not exclusively busied.
    pub fn xunbusy(&self) {
        let r = self
            .busy
            .compare_exchange(BUSY_EXCLUSIVE, 0, Ordering::Release, Ordering::Relaxed);
        assert!(r.is_ok(), "xunbusy of a page not exclusively busied");
    }

    /// Release one shared busy lock.
    ///
    /// # Panics
    /// If the page is not shared-busied.
    pub fn sunbusy(&self) {
        let mut v = self.busy.load(Ordering::Relaxed);
        loop {
            assert!(
                v != 0 && v & BUSY_EXCLUSIVE == 0,
                "sunbusy of a page not shared-busied"
            );
            match self
                .busy
                .compare_exchange_weak(v, v - 1, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(cur) => v = cur,
            }
        }
    }

    /// Turn the exclusive busy lock into one shared lock (`vm_page_busy_downgrade`).
    ///
    /// # Panics
    /// If the page is not exclusively busied.
    pub fn busy_downgrade(&self) {
        let r = self
            .busy
            .compare_exchange(BUSY_EXCLUSIVE, 1, Ordering::Release, Ordering::Relaxed);
        assert!(r.is_ok(), "downgrade of a page not exclusively busied");
    }

    /// Whether the page is exclusively busied.
    pub fn is_xbusied(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == BUSY_EXCLUSIVE
    }

    /// The number of shared busy holders (0 if unbusied or exclusively busied).
    pub fn sbusy_count(&self) -> u32 {
        match self.busy.load(Ordering::Relaxed) {
            BUSY_EXCLUSIVE => 0,
            v => v,
        }
    }

    // --- wiring ---

    /// Add a wiring; returns the new count.
    pub fn wire(&self) -> u32 {
        self.wire_count.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Drop a wiring; returns whether it was the last.
    ///
    /// # Panics
    /// If the page is not wired.
    pub fn unwire(&self) -> bool {
        let before = self.wire_count.fetch_sub(1, Ordering::Relaxed);
        assert!(before != 0, "unwire of an unwired page");
        before == 1
    }

    /// The wire count.
    pub fn wire_count(&self) -> u32 {
        self.wire_count.load(Ordering::Relaxed)
    }

    // --- valid and dirty bitmaps ---

    /// The valid blocks (bit *i*: bytes `[512 i, 512 (i + 1))`).
    pub fn valid_bits(&self) -> u8 {
        self.valid.load(Ordering::Acquire)
    }
    /// Mark the blocks that `[off, off + len)` touches valid.
    pub fn set_valid_range(&self, off: u64, len: u64) -> Result<(), BlockRangeError> {
        self.valid
            .fetch_or(block_bits(off, len)?, Ordering::Release);
        Ok(())
    }
    /// Mark the blocks that `[off, off + len)` touches invalid (and therefore clean).
    pub fn clear_valid_range(&self, off: u64, len: u64) -> Result<(), BlockRangeError> {
        let b = block_bits(off, len)?;
        self.dirty.fetch_and(!b, Ordering::Relaxed);
        self.valid.fetch_and(!b, Ordering::Release);
        Ok(())
    }
    /// Whether every block that `[off, off + len)` touches is valid.
    pub fn is_valid_range(&self, off: u64, len: u64) -> Result<bool, BlockRangeError> {
        let b = block_bits(off, len)?;
        Ok(self.valid_bits() & b == b)
    }
    /// Whether the whole page is valid.
    pub fn is_fully_valid(&self) -> bool {
        self.valid_bits() == ALL_BLOCKS
    }
    /// Whether some block of the page is valid.
    pub fn is_partially_valid(&self) -> bool {
        self.valid_bits() != 0
    }

    /// The dirty blocks.
    pub fn dirty_bits(&self) -> u8 {
        self.dirty.load(Ordering::Acquire)
    }
    /// Mark the blocks that `[off, off + len)` touches dirty. Dirtying a block that is not
    /// valid is an error in every build, and marks nothing (a dirty block must be valid).
    pub fn set_dirty_range(&self, off: u64, len: u64) -> Result<(), BlockRangeError> {
        let b = block_bits(off, len)?;
        let invalid = b & !self.valid_bits();
        if invalid != 0 {
            return Err(BlockRangeError::NotValid { off, len, invalid });
        }
        self.dirty.fetch_or(b, Ordering::Release);
        Ok(())
    }
    /// Mark the blocks that `[off, off + len)` touches clean.
    pub fn clear_dirty_range(&self, off: u64, len: u64) -> Result<(), BlockRangeError> {
        self.dirty
            .fetch_and(!block_bits(off, len)?, Ordering::Release);
        Ok(())
    }
    /// Whether the whole page is dirty.
    pub fn is_fully_dirty(&self) -> bool {
        self.dirty_bits() == ALL_BLOCKS
    }
    /// Whether some block of the page is dirty.
    pub fn is_dirty(&self) -> bool {
        self.dirty_bits() != 0
    }

    // --- superpage index ---

    /// The superpage index: 0 for a base page, 1 on the first frame of a fully populated
    /// reservation (FreeBSD's `m->psind`).
    pub fn psind(&self) -> u8 {
        self.psind.load(Ordering::Relaxed)
    }
    /// Set the superpage index.
    pub fn set_psind(&self, p: u8) {
        self.psind.store(p, Ordering::Relaxed);
    }

    /// Why the frame cannot go back to the free lists now, if it cannot: it is busied (shared
    /// or exclusive), wired, a page-table page (user or saved) or PV chunk of the pmap, or still
    /// has PV entries (a managed mapping). Checked in every build by every free path of the
    /// physical-memory layer, before it changes anything. Unmanaged mappings (`kenter`,
    /// `qenter`) leave no trace in the record and cannot be seen here. A PV list that another
    /// CPU is changing at this moment is taken as mapped (a frame being freed has no mapping
    /// for anyone to change); the lock is only tried, so that the check never waits.
    pub(crate) fn check_freeable(&self, pa: PhysAddr) -> Result<(), crate::phys::PhysError> {
        use crate::phys::PhysError;
        let busy = self.busy.load(Ordering::Relaxed);
        if busy != 0 {
            return Err(PhysError::Busy(pa));
        }
        let wired = self.wire_count();
        if wired != 0 {
            return Err(PhysError::Wired { pa, count: wired });
        }
        let f = self.flags()
            & (page_flags::PTP
                | page_flags::KERNEL_PTP
                | page_flags::SAVED_PTP
                | page_flags::PV_CHUNK);
        if f != 0 {
            return Err(PhysError::PmapPage { pa, flags: f });
        }
        match self.pv.try_lock() {
            Some(l) if l.is_empty() => Ok(()),
            _ => Err(PhysError::Mapped(pa)),
        }
    }

    /// Clear the per-owner state of a frame being freed: owner, valid, dirty, superpage index,
    /// and the pmap's records about its contents (modified, referenced). The caller has checked
    /// [`check_freeable`](Self::check_freeable).
    pub(crate) fn reset_owner_state(&self) {
        debug_assert_eq!(self.busy.load(Ordering::Relaxed), 0, "freeing a busy page");
        debug_assert_eq!(self.wire_count(), 0, "freeing a wired page");
        self.set_owner(None);
        self.valid.store(0, Ordering::Relaxed);
        self.dirty.store(0, Ordering::Relaxed);
        self.psind.store(0, Ordering::Relaxed);
        self.clear_flags(page_flags::MODIFIED | page_flags::REFERENCED);
    }
}

/// A contiguous run of frames in the page array, from one platform segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSeg {
    /// First frame number.
    pub start_pfn: u64,
    /// One past the last frame number.
    pub end_pfn: u64,
    /// Index of the first frame's record in the page array.
    pub base: usize,
    /// NUMA domain.
    pub domain: u8,
}

impl PageSeg {
    /// Whether the segment holds frame `pfn`.
    #[inline]
    pub fn contains(&self, pfn: u64) -> bool {
        (self.start_pfn..self.end_pfn).contains(&pfn)
    }
    /// The number of frames.
    #[inline]
    pub fn len(&self) -> u64 {
        self.end_pfn - self.start_pfn
    }
    /// Whether the segment has no frame.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end_pfn == self.start_pfn
    }
}

/// The records of every frame of the machine's physical segments.
pub struct PageArray {
    /// Sorted by address, non-overlapping, non-empty.
    segs: Vec<PageSeg>,
    pages: Vec<PageMeta>,
    domains: usize,
}

impl PageArray {
    /// Records for every frame of `segments` (each frame's domain is its segment's).
    ///
    /// # Panics
    /// If two segments overlap.
    pub fn new(segments: &[PhysSegment]) -> Self {
        let mut raw: Vec<(u64, u64, u8)> = segments
            .iter()
            .map(|s| {
                (
                    s.start.as_u64() >> PAGE_SHIFT,
                    s.end.as_u64() >> PAGE_SHIFT,
                    s.domain,
                )
            })
            .filter(|(lo, hi, _)| hi > lo)
            .collect();
        raw.sort_unstable();
        for w in raw.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "physical segments overlap: frames {:#x}..{:#x} and {:#x}..{:#x}",
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            );
        }
        let mut segs = Vec::with_capacity(raw.len());
        let mut pages = Vec::new();
        let mut domains = 0usize;
        for (lo, hi, d) in raw {
            segs.push(PageSeg {
                start_pfn: lo,
                end_pfn: hi,
                base: pages.len(),
                domain: d,
            });
            pages.extend((lo..hi).map(|_| PageMeta::new(d)));
            domains = domains.max(d as usize + 1);
        }
        PageArray {
            segs,
            pages,
            domains,
        }
    }

    /// The segments, sorted by address.
    pub fn segments(&self) -> &[PageSeg] {
        &self.segs
    }

    /// The number of domains (one more than the highest domain number of a segment).
    pub fn domain_count(&self) -> usize {
        self.domains
    }

    /// The number of frames.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether there is no frame.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The index of the segment holding frame `pfn`.
    #[inline]
    pub fn seg_of_pfn(&self, pfn: u64) -> Option<usize> {
        // Segments are few: a binary search over them (first segment ending beyond pfn).
        let i = self.segs.partition_point(|s| s.end_pfn <= pfn);
        (i < self.segs.len() && self.segs[i].start_pfn <= pfn).then_some(i)
    }

    /// The record index of frame `pfn`.
    #[inline]
    pub fn index_of_pfn(&self, pfn: u64) -> Option<usize> {
        self.seg_of_pfn(pfn).map(|i| {
            let s = &self.segs[i];
            s.base + (pfn - s.start_pfn) as usize
        })
    }

    /// The record index of the frame holding `pa`.
    #[inline]
    pub fn index_of(&self, pa: PhysAddr) -> Option<usize> {
        self.index_of_pfn(pa.as_u64() >> PAGE_SHIFT)
    }

    /// The frame number of record `idx`.
    ///
    /// # Panics
    /// If `idx` is out of range.
    #[inline]
    pub fn pfn_of(&self, idx: usize) -> u64 {
        assert!(idx < self.pages.len(), "page index {idx} out of range");
        let i = self.segs.partition_point(|s| s.base <= idx) - 1;
        let s = &self.segs[i];
        s.start_pfn + (idx - s.base) as u64
    }

    /// The address of the frame of record `idx`.
    #[inline]
    pub fn pa_of(&self, idx: usize) -> PhysAddr {
        PhysAddr::new(self.pfn_of(idx) << PAGE_SHIFT)
    }

    /// Record `idx`.
    #[inline]
    pub fn page(&self, idx: usize) -> &PageMeta {
        &self.pages[idx]
    }

    /// The record of the frame holding `pa`, if the machine has that frame.
    #[inline]
    pub fn get(&self, pa: PhysAddr) -> Option<&PageMeta> {
        self.index_of(pa).map(|i| &self.pages[i])
    }

    /// The record of a frame that must exist (a page-table page the pmap allocated).
    #[inline]
    pub fn meta(&self, pa: PhysAddr) -> &PageMeta {
        self.get(pa)
            .unwrap_or_else(|| panic!("no page record for {pa}: not a frame of this machine"))
    }

    /// Every frame with its record, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (PhysAddr, &PageMeta)> + '_ {
        self.segs.iter().flat_map(move |s| {
            (s.start_pfn..s.end_pfn).map(move |pfn| {
                (
                    PhysAddr::new(pfn << PAGE_SHIFT),
                    &self.pages[s.base + (pfn - s.start_pfn) as usize],
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_address_and_index() {
        // Given out of order: the array sorts them.
        let pa = PageArray::new(&[
            PhysSegment::new(0x10_0000, 0x10_4000, 1),
            PhysSegment::new(0x1000, 0x3000, 0),
        ]);
        assert_eq!(pa.len(), 6);
        assert_eq!(pa.domain_count(), 2);
        assert_eq!(pa.index_of(PhysAddr::new(0x1000)), Some(0));
        assert_eq!(pa.index_of(PhysAddr::new(0x2fff)), Some(1));
        assert_eq!(pa.index_of(PhysAddr::new(0x3000)), None);
        assert_eq!(pa.index_of(PhysAddr::new(0)), None);
        assert_eq!(pa.index_of(PhysAddr::new(0x10_3000)), Some(5));
        assert_eq!(pa.index_of(PhysAddr::new(0x10_4000)), None);
        for i in 0..pa.len() {
            assert_eq!(pa.index_of(pa.pa_of(i)), Some(i));
        }
        assert_eq!(pa.get(PhysAddr::new(0x10_1000)).unwrap().domain(), 1);
        let all: Vec<_> = pa.iter().map(|(a, _)| a.as_u64()).collect();
        assert_eq!(
            all,
            [0x1000, 0x2000, 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]
        );
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn overlapping_segments_are_refused() {
        PageArray::new(&[
            PhysSegment::new(0, 0x3000, 0),
            PhysSegment::new(0x2000, 0x5000, 1),
        ]);
    }

    #[test]
    fn busy_lock() {
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        let m = pa.page(0);
        assert!(m.try_sbusy() && m.try_sbusy());
        assert_eq!(m.sbusy_count(), 2);
        assert!(!m.try_xbusy());
        m.sunbusy();
        m.sunbusy();
        assert!(m.try_xbusy());
        assert!(m.is_xbusied());
        assert!(!m.try_sbusy() && !m.try_xbusy());
        m.busy_downgrade();
        assert_eq!(m.sbusy_count(), 1);
        m.sunbusy();
        assert!(m.try_xbusy());
        m.xunbusy();
        assert_eq!(m.sbusy_count(), 0);
    }

    #[test]
    #[should_panic(expected = "not exclusively busied")]
    fn xunbusy_unbusied_panics() {
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        pa.page(0).xunbusy();
    }

    #[test]
    fn valid_and_dirty_blocks() {
        assert_eq!(block_bits(0, 0), Ok(0));
        assert_eq!(block_bits(0, 1), Ok(0b1));
        assert_eq!(block_bits(511, 2), Ok(0b11));
        assert_eq!(block_bits(512, 1024), Ok(0b110));
        assert_eq!(block_bits(0, PAGE_SIZE), Ok(ALL_BLOCKS));
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        let m = pa.page(0);
        m.set_valid_range(0, 1000).unwrap();
        assert_eq!(m.valid_bits(), 0b11);
        assert!(m.is_partially_valid() && !m.is_fully_valid());
        assert_eq!(m.is_valid_range(100, 900), Ok(true));
        assert_eq!(m.is_valid_range(0, 1025), Ok(false));
        m.set_dirty_range(512, 10).unwrap();
        assert_eq!(m.dirty_bits(), 0b10);
        m.set_valid_range(1024, PAGE_SIZE - 1024).unwrap();
        assert!(m.is_fully_valid());
        m.clear_valid_range(0, 1024).unwrap();
        assert_eq!(m.valid_bits(), ALL_BLOCKS & !0b11);
        assert!(!m.is_dirty(), "invalidated blocks are clean");
        m.set_dirty_range(1024, PAGE_SIZE - 1024).unwrap();
        m.clear_dirty_range(4000, 10).unwrap();
        assert_eq!(m.dirty_bits(), 0b0111_1100);
    }

    /// PHYS-9: a range that leaves the page, including one whose end wraps past 2^64, is an
    /// error for every bitmap operation, and changes no bit.
    #[test]
    fn block_ranges_beyond_the_page_are_errors_that_change_nothing() {
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        let m = pa.page(0);
        m.set_valid_range(0, 512).unwrap();
        for (off, len) in [
            (4000, 100),
            (0, PAGE_SIZE + 1),
            (PAGE_SIZE, 1),
            (1, u64::MAX),
        ] {
            let e = BlockRangeError::OutsidePage { off, len };
            assert_eq!(block_bits(off, len), Err(e));
            assert_eq!(m.set_valid_range(off, len), Err(e));
            assert_eq!(m.clear_valid_range(off, len), Err(e));
            assert_eq!(m.is_valid_range(off, len), Err(e));
            assert_eq!(m.set_dirty_range(off, len), Err(e));
            assert_eq!(m.clear_dirty_range(off, len), Err(e));
        }
        assert_eq!((m.valid_bits(), m.dirty_bits()), (0b1, 0));
    }

    /// PHYS-9: dirtying a block that is not valid was a debug assertion only (release builds
    /// recorded a dirty, invalid block); it is an error in every build and marks nothing.
    #[test]
    fn dirtying_an_invalid_block_is_refused_in_every_build() {
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        let m = pa.page(0);
        m.set_valid_range(0, 512).unwrap();
        assert_eq!(
            m.set_dirty_range(0, 1024),
            Err(BlockRangeError::NotValid {
                off: 0,
                len: 1024,
                invalid: 0b10
            })
        );
        assert_eq!(m.dirty_bits(), 0, "a refused dirtying marks nothing");
        m.set_dirty_range(0, 512).unwrap();
        assert_eq!(m.dirty_bits(), 0b1);
    }

    #[test]
    fn owner_and_wiring() {
        let pa = PageArray::new(&[PhysSegment::new(0, 0x1000, 0)]);
        let m = pa.page(0);
        assert_eq!(m.owner(), None);
        m.set_owner(Some((ObjectId(7), 42)));
        assert_eq!(m.owner(), Some((ObjectId(7), 42)));
        m.set_owner(None);
        assert_eq!(m.owner(), None);
        assert_eq!(m.wire(), 1);
        assert_eq!(m.wire(), 2);
        assert!(!m.unwire());
        assert!(m.unwire());
        assert_eq!(m.wire_count(), 0);
    }
}
