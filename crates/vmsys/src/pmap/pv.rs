//! PV entries: the reverse map from a managed frame to the (pmap, address) pairs that map it.
//!
//! The entries live in PV chunks, as FreeBSD's `pv_chunk`s do: a chunk is one 4 KiB frame taken
//! from the frame source, with a header (a used-slot count, links of the pool's chunk lists and
//! a free bitmap) and [`PV_PER_CHUNK`] fixed-size entry slots. A frame's PV list is threaded
//! through the slots of its entries (each slot holds the entry and the address of the next
//! slot); the frame's page record keeps only the head and a generation
//! ([`crate::page::PvHead`]). Nothing here calls the global allocator under a lock: inserting,
//! removing and walking entries are word accesses to chunk frames (only `pv_collect`, for
//! queries and the audit, grows a copy of a list, between two holds of its lock).
//!
//! Accounting is by reservation: [`PvPool::reserve`] takes `n` entries from the pool, all or
//! none, adding chunk frames when the chunks in hand cannot cover them; linking an entry puts a
//! reserved one into a free slot, unlinking frees the slot but keeps the reservation until
//! [`PvPool::release`]. So the pool's count (`in_use`) is the number of reserved entries, and
//! equals the listed ones whenever no operation is in flight. A shortage of frames is a PV
//! allocation failure (no sleeping, no reclaim), and so is an injected fault. A chunk with no
//! used slot goes back to the frame source as soon as the other chunks cover the reservations.
//!
//! Locks: a frame's PV lock (in its page record) covers its list: the head and the contents and
//! links of the slots on it. The pool lock covers the chunk headers and lists and the counts.
//! Neither is held while the other is taken; both come after a pmap lock.
//!
//! Chunk memory is reached with [`Platform::phys_read`] and [`Platform::phys_write`], not the
//! `pt_*` page-table accessors: PV words are ordinary kernel data that no MMU walks, and a
//! platform may treat page-table stores specially (the simulator checks arm64 break-before-make
//! on every `pt_store64` and would misread a PV word as a descriptor; a real platform may add
//! barriers or cache maintenance for walker coherence that kernel data does not need).

use core::ops::ControlFlow;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::frames::{FaultInjector, FrameSource};
use crate::page::{page_flags, PageArray, PvEntry};
use crate::platform::Platform;

use super::{table, PmapError};

/// Entry slots per chunk frame: a 64-byte header and 168 slots of 24 bytes fill the 4 KiB
/// (FreeBSD's amd64 chunk also holds 168 entries).
pub const PV_PER_CHUNK: u64 = 168;

/// Header words of a chunk (byte offsets).
const H_COUNT: u64 = 0;
const H_NEXT: u64 = 8;
const H_PREV: u64 = 16;
/// Three words of free bitmap (1: free), slots 0..64, 64..128, 128..168.
const H_MAP: u64 = 24;
const H_MAGIC: u64 = 48;
const HEADER_BYTES: u64 = 64;
const SLOT_BYTES: u64 = 24;
/// The link word of a slot (byte offset in the slot).
const S_NEXT: u64 = 16;
const MAP_WORDS: usize = 3;
/// What a chunk's magic word holds (checked by the audit).
const CHUNK_MAGIC: u64 = 0x5056_4348_554e_4b31; // "PVCHUNK1"
/// The end of a chunk list (a chunk frame may be frame 0).
const NONE: u64 = u64::MAX;

const _: () = assert!(HEADER_BYTES + PV_PER_CHUNK * SLOT_BYTES == PAGE_SIZE);
const _: () = assert!(H_MAGIC + 8 <= HEADER_BYTES && PV_PER_CHUNK <= 64 * MAP_WORDS as u64);

/// The free bitmap of a fresh chunk: every slot free.
const fn full_map(w: usize) -> u64 {
    let lo = 64 * w as u64;
    if PV_PER_CHUNK >= lo + 64 {
        u64::MAX
    } else if PV_PER_CHUNK <= lo {
        0
    } else {
        (1u64 << (PV_PER_CHUNK - lo)) - 1
    }
}

#[inline]
fn rd<P: Platform + ?Sized>(plat: &P, pa: u64) -> u64 {
    let mut b = [0u8; 8];
    plat.phys_read(PhysAddr::new(pa), &mut b);
    u64::from_le_bytes(b)
}

#[inline]
fn wr<P: Platform + ?Sized>(plat: &P, pa: u64, v: u64) {
    plat.phys_write(PhysAddr::new(pa), &v.to_le_bytes());
}

/// A slot's words: `va | level` (the VA is page-aligned, the level below 8), the pmap id, and
/// the address of the next slot on the list (0: the end).
#[inline]
fn read_slot<P: Platform + ?Sized>(plat: &P, slot: u64) -> (PvEntry, u64) {
    let mut b = [0u8; SLOT_BYTES as usize];
    plat.phys_read(PhysAddr::new(slot), &mut b);
    let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let (a, p, next) = (w(0), w(1), w(2));
    let e = PvEntry {
        pmap: p as u32,
        va: a & !(PAGE_SIZE - 1),
        level: (a & 0xff) as u8,
    };
    (e, next)
}

#[inline]
fn write_slot<P: Platform + ?Sized>(plat: &P, slot: u64, e: PvEntry, next: u64) {
    debug_assert!(
        e.va & (PAGE_SIZE - 1) == 0,
        "PV entry VA {:#x} unaligned",
        e.va
    );
    let mut b = [0u8; SLOT_BYTES as usize];
    b[0..8].copy_from_slice(&(e.va | e.level as u64).to_le_bytes());
    b[8..16].copy_from_slice(&(e.pmap as u64).to_le_bytes());
    b[16..24].copy_from_slice(&next.to_le_bytes());
    plat.phys_write(PhysAddr::new(slot), &b);
}

pub(crate) struct PvPool {
    st: spin::Mutex<PoolState>,
    /// Reserved entries (written under the pool lock, read without it).
    in_use: AtomicU64,
    faults: FaultInjector,
    /// Damage met: a removal that found no entry, or a list link that leads outside the chunk
    /// slots (chunk frames are ordinary memory, which a stray write through a stale
    /// translation can reach). The walk stops there, and the audit reports it (PV-1).
    damaged: AtomicU64,
}

struct PoolState {
    /// Chunks with some slots used and some free (taken from first, to pack entries).
    partial: u64,
    /// Chunks with every slot free.
    empty: u64,
    /// Chunk frames held (full chunks are on no list).
    chunks: u64,
}

impl PoolState {
    fn slots(&self) -> u64 {
        self.chunks * PV_PER_CHUNK
    }
}

/// Put chunk `c` at the front of the list that starts at `head`.
fn list_push<P: Platform + ?Sized>(plat: &P, head: &mut u64, c: u64) {
    wr(plat, c + H_PREV, NONE);
    wr(plat, c + H_NEXT, *head);
    if *head != NONE {
        wr(plat, *head + H_PREV, c);
    }
    *head = c;
}

/// Take chunk `c` off the list that starts at `head`.
fn list_remove<P: Platform + ?Sized>(plat: &P, head: &mut u64, c: u64) {
    let (next, prev) = (rd(plat, c + H_NEXT), rd(plat, c + H_PREV));
    if prev == NONE {
        debug_assert_eq!(*head, c, "PV-2: chunk {c:#x} is not its list's head");
        *head = next;
    } else {
        wr(plat, prev + H_NEXT, next);
    }
    if next != NONE {
        wr(plat, next + H_PREV, prev);
    }
    wr(plat, c + H_NEXT, NONE);
    wr(plat, c + H_PREV, NONE);
}

impl PvPool {
    pub fn new() -> Self {
        PvPool {
            st: spin::Mutex::new(PoolState {
                partial: NONE,
                empty: NONE,
                chunks: 0,
            }),
            in_use: AtomicU64::new(0),
            faults: FaultInjector::new(),
            damaged: AtomicU64::new(0),
        }
    }

    /// After `after` more successful reservations, fail the next `count` (`None`: all).
    pub fn inject_failures(&self, after: u64, count: Option<u64>) {
        self.faults.arm(after, count);
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Damage met so far (see `damaged`).
    pub fn damaged(&self) -> u64 {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Chunk frames held.
    pub fn chunk_frames(&self) -> usize {
        self.st.lock().chunks as usize
    }

    /// Take `n` entries from the pool, all or none. Chunk frames are added one at a time, each
    /// initialised and put on the empty list at once, so a shortage midway only has to give
    /// back the chunks that are now idle.
    pub fn reserve<P: Platform + ?Sized>(
        &self,
        n: u64,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) -> Result<(), PmapError> {
        if self.faults.should_fail() {
            return Err(PmapError::ResourceShortage);
        }
        self.grow(n, frames, pages, plat)
    }

    /// [`PvPool::reserve`] after its fault injection.
    fn grow<P: Platform + ?Sized>(
        &self,
        n: u64,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) -> Result<(), PmapError> {
        let mut st = table::lock(&self.st, plat);
        let in_use = self.in_use.load(Ordering::Relaxed);
        while st.slots() < in_use + n {
            let Some(f) = frames.alloc() else {
                self.trim(&mut st, in_use, frames, pages, plat);
                return Err(PmapError::ResourceShortage);
            };
            self.add_chunk(&mut st, f.as_u64(), pages, plat);
        }
        self.in_use.store(in_use + n, Ordering::Relaxed);
        Ok(())
    }

    /// Return `n` reserved entries; chunks no longer needed go back to the frame source.
    pub fn release<P: Platform + ?Sized>(
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
        let in_use = self.in_use.load(Ordering::Relaxed);
        assert!(
            n <= in_use,
            "PV-2: releasing {n} PV entries, {in_use} reserved"
        );
        self.in_use.store(in_use - n, Ordering::Relaxed);
        self.trim(&mut st, in_use - n, frames, pages, plat);
    }

    fn add_chunk<P: Platform + ?Sized>(
        &self,
        st: &mut PoolState,
        c: u64,
        pages: &PageArray,
        plat: &P,
    ) {
        wr(plat, c + H_COUNT, 0);
        for w in 0..MAP_WORDS {
            wr(plat, c + H_MAP + 8 * w as u64, full_map(w));
        }
        wr(plat, c + H_MAGIC, CHUNK_MAGIC);
        list_push(plat, &mut st.empty, c);
        st.chunks += 1;
        if let Some(m) = pages.get(PhysAddr::new(c)) {
            m.set_flags(page_flags::PV_CHUNK);
        }
    }

    /// Give back empty chunks while the others still cover `in_use` reserved entries.
    fn trim<P: Platform + ?Sized>(
        &self,
        st: &mut PoolState,
        in_use: u64,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) {
        while st.empty != NONE && st.slots() - PV_PER_CHUNK >= in_use {
            let c = st.empty;
            list_remove(plat, &mut st.empty, c);
            wr(plat, c + H_MAGIC, 0);
            st.chunks -= 1;
            if let Some(m) = pages.get(PhysAddr::new(c)) {
                m.clear_flags(page_flags::PV_CHUNK);
            }
            frames
                .free(PhysAddr::new(c))
                .expect("a PV chunk frame is freed once");
        }
    }

    /// A free slot for a reserved entry (with `reserve`, reserve it too: one pool lock for
    /// both). The slot's contents are the caller's to write, under the list's lock.
    fn take_slot<P: Platform + ?Sized>(&self, plat: &P, reserve: bool) -> Option<u64> {
        let mut st = table::lock(&self.st, plat);
        let in_use = self.in_use.load(Ordering::Relaxed);
        if reserve {
            if st.slots() < in_use + 1 {
                return None;
            }
            self.in_use.store(in_use + 1, Ordering::Relaxed);
        }
        let from_empty = st.partial == NONE;
        let c = if from_empty { st.empty } else { st.partial };
        // Reservations never exceed the slots, and every linked entry is reserved: a reserved
        // entry always finds a free slot.
        assert!(c != NONE, "PV-2: a PV entry linked without a reservation");
        let (w, bit, map) = (0..MAP_WORDS)
            .find_map(|w| {
                let map = rd(plat, c + H_MAP + 8 * w as u64);
                (map != 0).then(|| (w, map.trailing_zeros() as u64, map))
            })
            .expect("PV-2: a chunk on the partial or empty list has a free slot");
        wr(plat, c + H_MAP + 8 * w as u64, map & !(1 << bit));
        let count = rd(plat, c + H_COUNT) + 1;
        wr(plat, c + H_COUNT, count);
        if from_empty {
            list_remove(plat, &mut st.empty, c);
            if count < PV_PER_CHUNK {
                list_push(plat, &mut st.partial, c);
            }
        } else if count == PV_PER_CHUNK {
            list_remove(plat, &mut st.partial, c);
        }
        let idx = 64 * w as u64 + bit;
        Some(c + HEADER_BYTES + idx * SLOT_BYTES)
    }

    /// Free `slot` (its entry already off its list); with `release`, release its reservation
    /// too. An idle chunk goes back to the frame source if the others cover the reservations.
    fn free_slot<P: Platform + ?Sized>(
        &self,
        slot: u64,
        release: bool,
        frames: &dyn FrameSource,
        pages: &PageArray,
        plat: &P,
    ) {
        let c = slot & !(PAGE_SIZE - 1);
        let idx = (slot - c - HEADER_BYTES) / SLOT_BYTES;
        let (w, bit) = ((idx / 64) as usize, idx % 64);
        let mut st = table::lock(&self.st, plat);
        let mut in_use = self.in_use.load(Ordering::Relaxed);
        if release {
            assert!(in_use > 0, "PV-2: releasing a PV entry, none reserved");
            in_use -= 1;
            self.in_use.store(in_use, Ordering::Relaxed);
        }
        let map = rd(plat, c + H_MAP + 8 * w as u64);
        assert!(map & (1 << bit) == 0, "PV-2: PV slot {slot:#x} freed twice");
        wr(plat, c + H_MAP + 8 * w as u64, map | (1 << bit));
        let count = rd(plat, c + H_COUNT) - 1;
        wr(plat, c + H_COUNT, count);
        if count + 1 == PV_PER_CHUNK {
            // It was full: on no list.
            if count == 0 {
                list_push(plat, &mut st.empty, c);
            } else {
                list_push(plat, &mut st.partial, c);
            }
        } else if count == 0 {
            list_remove(plat, &mut st.partial, c);
            list_push(plat, &mut st.empty, c);
        }
        self.trim(&mut st, in_use, frames, pages, plat);
    }

    /// The used-slot count of the chunk at `c`, checked against its header (for the audit):
    /// `Err` says what is wrong.
    pub fn chunk_used<P: Platform + ?Sized>(&self, c: u64, plat: &P) -> Result<u64, &'static str> {
        let _st = table::lock(&self.st, plat);
        if rd(plat, c + H_MAGIC) != CHUNK_MAGIC {
            return Err("a frame marked as a PV chunk has no chunk header");
        }
        let free: u64 = (0..MAP_WORDS)
            .map(|w| {
                let m = rd(plat, c + H_MAP + 8 * w as u64);
                if m & !full_map(w) != 0 {
                    u64::MAX
                } else {
                    m.count_ones() as u64
                }
            })
            .fold(0u64, |a, b| a.saturating_add(b));
        let used = rd(plat, c + H_COUNT);
        if free == u64::MAX || free + used != PV_PER_CHUNK {
            return Err("a PV chunk's used count disagrees with its free bitmap");
        }
        Ok(used)
    }
}

/// Where a walk of one PV list stands between two visits (the lock is not held in between).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PvPos {
    /// The slot last visited (0: none yet).
    slot: u64,
    /// The list's generation when it was visited.
    gen: u32,
    /// How many times the list changed under the walk, which then began again.
    restarts: u32,
    /// The end was reached.
    done: bool,
    /// Links followed since the walk (re)began (bounds it if the list is damaged).
    steps: u64,
}

impl<P: Platform> super::PmapSystem<P> {
    /// Allocate one PV entry and put it on `pa`'s list.
    pub(crate) fn pv_insert(&self, pa: u64, e: PvEntry) -> Result<(), PmapError> {
        if self.pv.faults.should_fail() {
            return Err(PmapError::ResourceShortage);
        }
        let slot = match self.pv.take_slot(&*self.plat, true) {
            Some(s) => s,
            None => {
                // The chunks in hand are full: reserve (adding a chunk), then take the slot.
                self.pv.grow(1, &*self.frames, &self.pages, &*self.plat)?;
                self.pv
                    .take_slot(&*self.plat, false)
                    .expect("a reserved entry has a slot")
            }
        };
        self.pv_put(pa, slot, e);
        Ok(())
    }

    /// Put an already reserved entry on `pa`'s list.
    pub(crate) fn pv_link(&self, pa: u64, e: PvEntry) {
        let slot = self
            .pv
            .take_slot(&*self.plat, false)
            .expect("a reserved entry has a slot");
        self.pv_put(pa, slot, e);
    }

    /// Whether `next`, read from a slot, may be followed: the end, or a slot of a chunk frame
    /// (and the walk is not longer than the entries reserved, which a cycle would be).
    /// Otherwise the damage is counted and the walk ends.
    #[inline]
    fn pv_follow(&self, next: u64, steps: u64) -> bool {
        if next == 0 {
            return false;
        }
        let off = next & (PAGE_SIZE - 1);
        let ok = off >= HEADER_BYTES
            && (off - HEADER_BYTES).is_multiple_of(SLOT_BYTES)
            && steps <= self.pv.in_use()
            && self
                .pages
                .get(PhysAddr::new(next - off))
                .is_some_and(|m| m.flags() & page_flags::PV_CHUNK != 0);
        if !ok {
            self.pv.damaged.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn pv_put(&self, pa: u64, slot: u64, e: PvEntry) {
        let meta = self.pages.meta(PhysAddr::new(pa));
        let mut h = table::lock(&meta.pv, &*self.plat);
        write_slot(&*self.plat, slot, e, h.first);
        h.first = slot;
        h.gen = h.gen.wrapping_add(1);
    }

    /// Take `e` off `pa`'s list; its slot goes back to its chunk (and with `release`, its
    /// reservation to the pool). Whether it was there.
    fn pv_take(&self, pa: u64, e: PvEntry, release: bool) -> bool {
        let Some(meta) = self.pages.get(PhysAddr::new(pa)) else {
            return false;
        };
        let plat = &*self.plat;
        let slot = {
            let mut h = table::lock(&meta.pv, plat);
            let (mut prev, mut cur) = (0u64, h.first);
            let mut steps = 0;
            loop {
                if cur == 0 {
                    return false;
                }
                steps += 1;
                let (x, next) = read_slot(plat, cur);
                if x == e {
                    if prev == 0 {
                        h.first = next;
                    } else {
                        wr(plat, prev + S_NEXT, next);
                    }
                    h.gen = h.gen.wrapping_add(1);
                    break cur;
                }
                if !self.pv_follow(next, steps) {
                    return false;
                }
                (prev, cur) = (cur, next);
            }
        };
        self.pv
            .free_slot(slot, release, &*self.frames, &self.pages, plat);
        true
    }

    /// Take `e` off `pa`'s list without returning it to the pool; whether it was there.
    pub(crate) fn pv_unlink(&self, pa: u64, e: PvEntry) -> bool {
        self.pv_take(pa, e, false)
    }

    /// Remove `e` from `pa`'s list and free it.
    pub(crate) fn pv_remove(&self, pa: u64, e: PvEntry) {
        if !self.pv_take(pa, e, true) {
            // PV-1 broken (a bug, or the list damaged): the audit reports it; the reservation
            // is returned all the same, so that the pool's count stays that of the mappings.
            self.pv.damaged.fetch_add(1, Ordering::Relaxed);
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

    /// Visit the entries of `pa`'s own list under its lock, until `f` breaks. `f` runs with
    /// the PV lock held: it must not lock or allocate.
    pub(crate) fn pv_visit<B>(
        &self,
        pa: u64,
        mut f: impl FnMut(PvEntry) -> ControlFlow<B>,
    ) -> Option<B> {
        let meta = self.pages.get(PhysAddr::new(pa))?;
        let plat = &*self.plat;
        let h = table::lock(&meta.pv, plat);
        let (mut cur, mut steps) = (h.first, 0);
        while cur != 0 {
            steps += 1;
            let (e, next) = read_slot(plat, cur);
            if let ControlFlow::Break(b) = f(e) {
                return Some(b);
            }
            if !self.pv_follow(next, steps) {
                break;
            }
            cur = next;
        }
        None
    }

    /// Whether `e` is on `pa`'s list.
    pub(crate) fn pv_contains(&self, pa: u64, e: PvEntry) -> bool {
        self.pv_visit(pa, |x| {
            if x == e {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .is_some()
    }

    /// The next entry on `pa`'s list after `pos` (of level `level`, if given), for a walk
    /// that lets go of the list's lock between entries (to take a pmap lock, which comes first
    /// in the lock order). If the list changed since the last visit, the walk begins again
    /// from its head (counted in `pos.restarts`): callers visit an entry again rather than miss
    /// one.
    pub(crate) fn pv_next(&self, pa: u64, level: Option<u8>, pos: &mut PvPos) -> Option<PvEntry> {
        if pos.done {
            return None;
        }
        let Some(meta) = self.pages.get(PhysAddr::new(pa)) else {
            pos.done = true;
            return None;
        };
        let plat = &*self.plat;
        let h = table::lock(&meta.pv, plat);
        let mut cur = if pos.slot == 0 {
            h.first
        } else if pos.gen == h.gen {
            let next = read_slot(plat, pos.slot).1;
            pos.steps += 1;
            if self.pv_follow(next, pos.steps) {
                next
            } else {
                0
            }
        } else {
            pos.restarts += 1;
            pos.steps = 0;
            h.first
        };
        while cur != 0 {
            let (e, next) = read_slot(plat, cur);
            if level.is_none_or(|l| l == e.level) {
                (pos.slot, pos.gen) = (cur, h.gen);
                return Some(e);
            }
            pos.steps += 1;
            if !self.pv_follow(next, pos.steps) {
                break;
            }
            cur = next;
        }
        pos.done = true;
        None
    }

    /// Visit every mapping of frame `pa` (4 KiB entries on its own list, then superpage
    /// entries on the lists of the superpages' first frames, larger pages last) with the list
    /// that holds each, until `f` breaks; each list under its lock, so `f` must not lock or
    /// allocate.
    pub(crate) fn pv_mappings<B>(
        &self,
        pa: u64,
        mut f: impl FnMut(PvEntry, u64) -> ControlFlow<B>,
    ) -> Option<B> {
        let g = &self.geom;
        let last = g.last();
        let pa = pa & !(PAGE_SIZE - 1);
        for lvl in (0..=last).rev() {
            if lvl != last && g.levels[lvl].leaf.is_none() {
                continue;
            }
            let head = pa & !(g.levels[lvl].span - 1);
            let r = self.pv_visit(head, |e| {
                if e.level as usize == lvl {
                    f(e, head)
                } else {
                    ControlFlow::Continue(())
                }
            });
            if r.is_some() {
                return r;
            }
        }
        None
    }

    /// A copy of `pa`'s own PV list, collected one entry per lock hold (the copy grows outside
    /// the lock). Not for hot paths: queries and the audit.
    pub(crate) fn pv_collect(&self, pa: u64) -> alloc::vec::Vec<PvEntry> {
        let mut out = alloc::vec::Vec::new();
        let mut pos = PvPos::default();
        loop {
            let restarts = pos.restarts;
            let next = self.pv_next(pa, None, &mut pos);
            if pos.restarts != restarts {
                out.clear();
            }
            match next {
                Some(e) => out.push(e),
                None => return out,
            }
        }
    }

    /// Audit of the PV chunk frame at `c`: its used-slot count (checked against its bitmap).
    pub(crate) fn pv_chunk_used(&self, c: u64) -> Result<u64, &'static str> {
        self.pv.chunk_used(c, &*self.plat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_layout_fills_one_page() {
        assert_eq!(HEADER_BYTES + PV_PER_CHUNK * SLOT_BYTES, PAGE_SIZE);
        let free: u32 = (0..MAP_WORDS).map(|w| full_map(w).count_ones()).sum();
        assert_eq!(free as u64, PV_PER_CHUNK);
    }
}
