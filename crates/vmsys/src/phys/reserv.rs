//! Superpage reservations (FreeBSD's `vm_reserv.c`).
//!
//! When an object first needs a page in an aligned range of 2^order page indices, a whole
//! naturally aligned block of 2^order frames is taken from the buddy allocator and *reserved*
//! for that range: page index `p` of the object then always gets frame `base + (p mod 2^order)`.
//! Once every page of the range is allocated (the reservation is *fully populated*), the frames
//! are physically contiguous and aligned as a superpage needs, and the pmap may promote.
//!
//! Each reservation keeps a population bitmap and count. Partially populated reservations sit
//! on a per-domain LRU queue (least recently changed first), from which they are broken under
//! memory pressure: the unpopulated frames go back to the buddy allocator one by one, the
//! populated ones stay allocated as ordinary frames. A reservation whose last page is freed
//! returns its whole block. The unpopulated frames of existing reservations are out of the buddy
//! but handed to no one: [`ReservSystem::unpopulated_frames`] counts them for frame accounting.
//! A free refuses a frame still in use as the buddy's does.
//!
//! Locking: one spin lock for all reservations (the maps, bitmaps, LRU queues and counters, and
//! the owner and superpage-index fields of the records of reserved frames). It is taken before
//! a buddy domain lock, never after.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{PhysAddr, PAGE_SHIFT};
use crate::frames::FaultInjector;
use crate::page::{BuddyState, ObjectId};

use super::buddy::{BuddyAllocator, DomainPolicy, PhysError, MAX_ORDER};

/// Errors of the reservation system. An operation that returns one has changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservError {
    /// No frame could be found (after breaking every partially populated reservation), or a
    /// failure was injected.
    NoMemory,
    /// The object already has a frame for this page index in its reservation.
    AlreadyPopulated {
        object: ObjectId,
        pindex: u64,
        pa: PhysAddr,
    },
    /// The buddy allocator refused the free (double free, not ours, ...).
    Phys(PhysError),
    /// The object id `u64::MAX` is the page record's "no owner" encoding: no object has it.
    BadObject(ObjectId),
}

impl fmt::Display for ReservError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReservError::NoMemory => write!(f, "no free memory"),
            ReservError::AlreadyPopulated { object, pindex, pa } => write!(
                f,
                "{object} page {pindex:#x} is already allocated (frame {pa}) in its reservation"
            ),
            ReservError::Phys(e) => write!(f, "{e}"),
            ReservError::BadObject(o) => {
                write!(
                    f,
                    "{o} is reserved (it means \"no owner\"): no page can belong to it"
                )
            }
        }
    }
}

impl From<PhysError> for ReservError {
    fn from(e: PhysError) -> Self {
        ReservError::Phys(e)
    }
}

/// A snapshot of one reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservInfo {
    /// The first frame (aligned to the reservation size).
    pub base: PhysAddr,
    /// log2 of the number of frames.
    pub order: u8,
    /// The domain of its frames.
    pub domain: u8,
    /// The object it is reserved for.
    pub object: ObjectId,
    /// The object's page index that maps to `base` (aligned to the reservation size).
    pub first_pindex: u64,
    /// Populated frames.
    pub popcnt: u32,
}

/// Counters of the reservation system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReservStats {
    /// Reservations that exist.
    pub active: u64,
    /// Of those, fully populated.
    pub full: u64,
    /// Of those, partially populated (on an LRU queue).
    pub partial: u64,
    /// Reservations created since the start.
    pub created: u64,
    /// Reservations broken since the start (under pressure, on request, or for a gone object).
    pub broken: u64,
    /// Reservations that returned their whole block when their last page was freed.
    pub freed: u64,
    /// Pages handed out as plain frames because no reservation could be made.
    pub fallback_pages: u64,
}

struct Reservation {
    base_pfn: u64,
    domain: u8,
    object: ObjectId,
    first: u64,
    popmap: Vec<u64>,
    popcnt: u32,
    /// The LRU stamp, while partially populated.
    lru: Option<u64>,
}

impl Reservation {
    fn is_set(&self, i: usize) -> bool {
        self.popmap[i / 64] & (1 << (i % 64)) != 0
    }
}

struct State {
    by_base: BTreeMap<u64, Reservation>,
    by_object: BTreeMap<(ObjectId, u64), u64>,
    /// Per domain: stamp -> base frame of a partially populated reservation, oldest first.
    lru: Vec<BTreeMap<u64, u64>>,
    clock: u64,
    stats: ReservStats,
}

/// The reservation system over a buddy allocator.
pub struct ReservSystem {
    buddy: Arc<BuddyAllocator>,
    order: usize,
    state: spin::Mutex<State>,
    faults: FaultInjector,
}

impl ReservSystem {
    /// Reservations of 2^`order` frames (9: 2 MiB for amd64, arm64 and PAE; 10: 4 MiB for i386
    /// 2-level) over `buddy`.
    ///
    /// # Panics
    /// If `order` is 0 or above [`MAX_ORDER`].
    pub fn new(buddy: Arc<BuddyAllocator>, order: usize) -> Self {
        assert!(
            (1..=MAX_ORDER).contains(&order),
            "reservation order {order} not in 1..={MAX_ORDER}"
        );
        let nd = buddy.domain_count();
        ReservSystem {
            buddy,
            order,
            state: spin::Mutex::new(State {
                by_base: BTreeMap::new(),
                by_object: BTreeMap::new(),
                lru: (0..nd).map(|_| BTreeMap::new()).collect(),
                clock: 0,
                stats: ReservStats::default(),
            }),
            faults: FaultInjector::new(),
        }
    }

    /// The buddy allocator.
    pub fn buddy(&self) -> &Arc<BuddyAllocator> {
        &self.buddy
    }

    /// log2 of the frames per reservation.
    pub fn order(&self) -> usize {
        self.order
    }

    /// Frames per reservation.
    pub fn npages(&self) -> u64 {
        1 << self.order
    }

    /// Make [`alloc_page`](Self::alloc_page) fail with `NoMemory`: after `after` more successes,
    /// the next `count` (`None`: all). (The buddy allocator's own injector governs its direct
    /// callers; the reservation system draws on the buddy without consulting it.)
    pub fn inject_failures(&self, after: u64, count: Option<u64>) {
        self.faults.arm(after, count);
    }

    /// Stop injecting failures.
    pub fn clear_failures(&self) {
        self.faults.disarm();
    }

    fn pa(pfn: u64) -> PhysAddr {
        PhysAddr::new(pfn << PAGE_SHIFT)
    }

    fn page(&self, pfn: u64) -> &crate::page::PageMeta {
        self.buddy.pages().page(
            self.buddy
                .pages()
                .index_of_pfn(pfn)
                .expect("reserved frame"),
        )
    }

    /// Put a partially populated reservation at the tail of its LRU queue (or take it off when
    /// it became full or empty).
    fn requeue(&self, st: &mut State, base: u64) {
        let n = self.npages() as u32;
        let State {
            by_base,
            lru,
            clock,
            ..
        } = st;
        let rv = by_base.get_mut(&base).expect("reservation");
        if let Some(s) = rv.lru.take() {
            lru[rv.domain as usize].remove(&s);
        }
        if rv.popcnt > 0 && rv.popcnt < n {
            *clock += 1;
            lru[rv.domain as usize].insert(*clock, base);
            rv.lru = Some(*clock);
        }
    }

    fn populate(&self, st: &mut State, base: u64, i: usize, object: ObjectId, pindex: u64) {
        let n = self.npages() as u32;
        let rv = st.by_base.get_mut(&base).expect("reservation");
        debug_assert!(!rv.is_set(i));
        rv.popmap[i / 64] |= 1 << (i % 64);
        rv.popcnt += 1;
        let full = rv.popcnt == n;
        self.page(base + i as u64).set_owner(Some((object, pindex)));
        if full {
            self.page(base).set_psind(1);
            st.stats.full += 1;
            st.stats.partial -= 1;
        } else if rv.popcnt == 1 {
            st.stats.partial += 1;
        }
        self.requeue(st, base);
    }

    /// A frame for page `pindex` of `object`, from the object's reservation for the aligned
    /// range holding `pindex` (made now from a free block of `domain` if there is none). If no
    /// block is free, a plain frame; if none is free either, partially populated reservations
    /// are broken, least recently changed first, until one is. The frame's record names the
    /// object and page index. `NoMemory` when every domain allowed (the buddy's policy) is
    /// exhausted and has no partial reservation left.
    ///
    /// An existing reservation for the range is used whatever its domain (the object's range
    /// is already placed there), even under the `Strict` policy. The reservation system does not
    /// know the object's resident pages: a new reservation may cover page indices the object
    /// already holds as ordinary frames; the caller must not ask again for those.
    pub fn alloc_page(
        &self,
        object: ObjectId,
        pindex: u64,
        domain: usize,
    ) -> Result<PhysAddr, ReservError> {
        // Refused before anything changes: recording this owner would panic (set_owner).
        if object.0 == u64::MAX {
            return Err(ReservError::BadObject(object));
        }
        if self.faults.should_fail() {
            return Err(ReservError::NoMemory);
        }
        let n = self.npages();
        let first = pindex & !(n - 1);
        let i = (pindex - first) as usize;
        let mut st = self.state.lock();
        if let Some(&base) = st.by_object.get(&(object, first)) {
            let rv = &st.by_base[&base];
            if rv.is_set(i) {
                return Err(ReservError::AlreadyPopulated {
                    object,
                    pindex,
                    pa: Self::pa(base + i as u64),
                });
            }
            self.populate(&mut st, base, i, object, pindex);
            return Ok(Self::pa(base + i as u64));
        }
        // A new reservation, if a block of the reservation's order is free.
        if let Some(pa) = self.buddy.alloc_nofault(domain, self.order) {
            let base = pa.as_u64() >> PAGE_SHIFT;
            let dom = self.page(base).domain();
            st.by_base.insert(
                base,
                Reservation {
                    base_pfn: base,
                    domain: dom,
                    object,
                    first,
                    popmap: alloc::vec![0; (n as usize).div_ceil(64)],
                    popcnt: 0,
                    lru: None,
                },
            );
            st.by_object.insert((object, first), base);
            st.stats.active += 1;
            st.stats.created += 1;
            self.populate(&mut st, base, i, object, pindex);
            return Ok(Self::pa(base + i as u64));
        }
        // A plain frame; under pressure, break partially populated reservations (least
        // recently changed first, one at a time) to recover their unpopulated frames. Breaking
        // can never yield a block for a new reservation (a broken block keeps a populated
        // frame), so it only serves this path.
        loop {
            if let Some(pa) = self.buddy.alloc_nofault(domain, 0) {
                self.buddy
                    .pages()
                    .meta(pa)
                    .set_owner(Some((object, pindex)));
                st.stats.fallback_pages += 1;
                return Ok(pa);
            }
            if !self.break_lru_one(&mut st, domain) {
                return Err(ReservError::NoMemory);
            }
        }
    }

    /// Break the least recently changed partial reservation of `domain` (or, under the
    /// [`DomainPolicy::Prefer`] policy, of another domain if `domain` has none). Returns
    /// whether one was broken.
    fn break_lru_one(&self, st: &mut State, domain: usize) -> bool {
        let nd = st.lru.len();
        let tries = match self.buddy.policy() {
            DomainPolicy::Prefer => nd,
            DomainPolicy::Strict => usize::from(domain < nd),
        };
        for t in 0..tries {
            // Reduced first: `domain + t` would overflow for a domain near usize::MAX.
            let d = (domain % nd + t) % nd;
            if let Some((_, &base)) = st.lru[d].first_key_value() {
                self.break_locked(st, base);
                return true;
            }
        }
        false
    }

    /// Break the reservation at `base`: unpopulated frames go back to the buddy one by one,
    /// populated ones stay allocated as ordinary frames (still owned by the object).
    fn break_locked(&self, st: &mut State, base: u64) {
        let n = self.npages() as u32;
        let rv = st.by_base.remove(&base).expect("reservation");
        st.by_object.remove(&(rv.object, rv.first));
        if let Some(s) = rv.lru {
            st.lru[rv.domain as usize].remove(&s);
        }
        st.stats.active -= 1;
        if rv.popcnt == n {
            st.stats.full -= 1;
        } else {
            st.stats.partial -= 1;
        }
        st.stats.broken += 1;
        self.page(base).set_psind(0);
        self.buddy
            .split(Self::pa(base), self.order)
            .expect("a reservation's block is allocated with the reservation's order");
        for i in 0..n as usize {
            if !rv.is_set(i) {
                self.buddy
                    .free(Self::pa(base + i as u64), 0)
                    .expect("an unpopulated reserved frame is allocated");
            }
        }
    }

    /// Free a frame that [`alloc_page`](Self::alloc_page) returned (from a reservation, from a
    /// broken one, or a plain one). A reservation whose last frame this was returns its block.
    pub fn free_page(&self, pa: PhysAddr) -> Result<(), ReservError> {
        let n = self.npages();
        let pfn = pa.as_u64() >> PAGE_SHIFT;
        let base = pfn & !(n - 1);
        let mut st = self.state.lock();
        if !pa.is_aligned(crate::addr::PAGE_SIZE) || !st.by_base.contains_key(&base) {
            // Not reserved: an ordinary frame (the buddy checks it and clears its record).
            return self.buddy.free(pa, 0).map_err(ReservError::Phys);
        }
        let i = (pfn - base) as usize;
        let rv = st.by_base.get_mut(&base).expect("checked");
        if !rv.is_set(i) {
            return Err(ReservError::Phys(PhysError::DoubleFree(pa)));
        }
        // As the buddy's free checks the frames it takes back: in every build, before anything
        // changes.
        self.page(pfn).check_freeable(pa)?;
        let rv = st.by_base.get_mut(&base).expect("checked");
        let was_full = rv.popcnt == n as u32;
        rv.popmap[i / 64] &= !(1 << (i % 64));
        rv.popcnt -= 1;
        let left = rv.popcnt;
        self.page(pfn).reset_owner_state();
        if was_full {
            self.page(base).set_psind(0);
            st.stats.full -= 1;
            st.stats.partial += 1;
        }
        if left == 0 {
            let rv = st.by_base.remove(&base).expect("checked");
            st.by_object.remove(&(rv.object, rv.first));
            if let Some(s) = rv.lru {
                st.lru[rv.domain as usize].remove(&s);
            }
            st.stats.active -= 1;
            st.stats.partial -= 1;
            st.stats.freed += 1;
            self.buddy
                .free(Self::pa(base), self.order)
                .expect("a reservation's block is allocated with the reservation's order");
        } else {
            self.requeue(&mut st, base);
        }
        Ok(())
    }

    /// Break the reservation holding `pa`, if there is one (returns whether there was).
    pub fn break_reservation(&self, pa: PhysAddr) -> bool {
        let base = (pa.as_u64() >> PAGE_SHIFT) & !(self.npages() - 1);
        let mut st = self.state.lock();
        if !st.by_base.contains_key(&base) {
            return false;
        }
        self.break_locked(&mut st, base);
        true
    }

    /// The object is being destroyed: break every reservation of it (its frames that are
    /// still allocated stay allocated, for the object to free). Returns how many were broken.
    pub fn object_gone(&self, object: ObjectId) -> usize {
        let mut st = self.state.lock();
        let bases: Vec<u64> = st
            .by_object
            .range((object, 0)..=(object, u64::MAX))
            .map(|(_, &b)| b)
            .collect();
        for &b in &bases {
            self.break_locked(&mut st, b);
        }
        bases.len()
    }

    /// Whether `pa` lies in a fully populated reservation (so its superpage may be promoted).
    pub fn is_fully_populated(&self, pa: PhysAddr) -> bool {
        self.reservation_of(pa)
            .is_some_and(|r| r.popcnt as u64 == self.npages())
    }

    /// The reservation holding `pa`, if any.
    pub fn reservation_of(&self, pa: PhysAddr) -> Option<ReservInfo> {
        let base = (pa.as_u64() >> PAGE_SHIFT) & !(self.npages() - 1);
        let st = self.state.lock();
        st.by_base.get(&base).map(|rv| ReservInfo {
            base: Self::pa(rv.base_pfn),
            order: self.order as u8,
            domain: rv.domain,
            object: rv.object,
            first_pindex: rv.first,
            popcnt: rv.popcnt,
        })
    }

    /// The reservation of `object` for the range holding `pindex`, if any.
    pub fn reservation_for(&self, object: ObjectId, pindex: u64) -> Option<ReservInfo> {
        let first = pindex & !(self.npages() - 1);
        let base = *self.state.lock().by_object.get(&(object, first))?;
        self.reservation_of(Self::pa(base))
    }

    /// The partially populated reservations of `domain`, least recently changed first.
    pub fn lru(&self, domain: usize) -> Vec<PhysAddr> {
        let st = self.state.lock();
        st.lru
            .get(domain)
            .map(|q| q.values().map(|&b| Self::pa(b)).collect())
            .unwrap_or_default()
    }

    /// Frames the reservations hold from the buddy allocator without having handed them out:
    /// the unpopulated frames of every partially populated reservation. A frame accounting
    /// (frames the buddy has out = frames the holders account for) must count them as held.
    pub fn unpopulated_frames(&self) -> u64 {
        let n = self.npages();
        let st = self.state.lock();
        st.by_base.values().map(|rv| n - rv.popcnt as u64).sum()
    }

    /// The counters.
    pub fn stats(&self) -> ReservStats {
        self.state.lock().stats
    }

    /// Check every reservation (its lock held, then the buddy allocator's audit): population
    /// counts equal the bitmaps; blocks are aligned, allocated from the buddy with the
    /// reservation's order and in the recorded domain; the object map matches; populated frames
    /// name their object and page index, unpopulated ones no owner; the superpage index is set
    /// exactly on fully populated reservations; the LRU queues hold exactly the partial ones;
    /// the counters match.
    pub fn audit(&self) -> Result<(), String> {
        use alloc::format;
        let n = self.npages();
        let st = self.state.lock();
        let mut full = 0u64;
        let mut partial = 0u64;
        for (&base, rv) in &st.by_base {
            let pa = Self::pa(base);
            if rv.base_pfn != base || base % n != 0 {
                return Err(format!("reservation {pa} misaligned or misfiled"));
            }
            let bits: u32 = rv.popmap.iter().map(|w| w.count_ones()).sum();
            if bits != rv.popcnt {
                return Err(format!(
                    "reservation {pa}: popcnt {} but {bits} bits set",
                    rv.popcnt
                ));
            }
            if rv.popcnt == 0 || rv.popcnt as u64 > n {
                return Err(format!("reservation {pa}: popcnt {}", rv.popcnt));
            }
            if st.by_object.get(&(rv.object, rv.first)) != Some(&base) || rv.first % n != 0 {
                return Err(format!("reservation {pa}: object map disagrees"));
            }
            let head = self.page(base);
            if head.buddy_state() != BuddyState::AllocHead(self.order as u8) {
                return Err(format!(
                    "reservation {pa}: block state {:?} in the buddy",
                    head.buddy_state()
                ));
            }
            let is_full = rv.popcnt as u64 == n;
            if (head.psind() == 1) != is_full {
                return Err(format!(
                    "reservation {pa}: psind {} with popcnt {}",
                    head.psind(),
                    rv.popcnt
                ));
            }
            for i in 0..n as usize {
                let m = self.page(base + i as u64);
                if m.domain() != rv.domain {
                    return Err(format!("reservation {pa}: frame {i} in another domain"));
                }
                if i > 0 && m.buddy_state() != BuddyState::Interior {
                    return Err(format!("reservation {pa}: frame {i} is a block head"));
                }
                let want = rv.is_set(i).then_some((rv.object, rv.first + i as u64));
                if m.owner() != want {
                    return Err(format!(
                        "reservation {pa}: frame {i} owner {:?}, expected {want:?}",
                        m.owner()
                    ));
                }
            }
            match (is_full, rv.lru) {
                (true, None) => full += 1,
                (false, Some(s)) if st.lru[rv.domain as usize].get(&s) == Some(&base) => {
                    partial += 1
                }
                _ => {
                    return Err(format!(
                        "reservation {pa}: LRU membership wrong (popcnt {})",
                        rv.popcnt
                    ))
                }
            }
        }
        let queued: usize = st.lru.iter().map(|q| q.len()).sum();
        if queued as u64 != partial || st.by_object.len() != st.by_base.len() {
            return Err(format!(
                "{queued} queued, {partial} partial; {} object entries, {} reservations",
                st.by_object.len(),
                st.by_base.len()
            ));
        }
        let s = st.stats;
        if s.active != st.by_base.len() as u64 || s.full != full || s.partial != partial {
            return Err(format!(
                "counters {s:?} but {} active, {full} full, {partial} partial",
                st.by_base.len()
            ));
        }
        self.buddy.audit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::page::PageArray;
    use crate::platform::PhysSegment;

    fn system(mb: u64, order: usize) -> ReservSystem {
        let pages = Arc::new(PageArray::new(&[PhysSegment::new(0, mb << 20, 0)]));
        ReservSystem::new(Arc::new(BuddyAllocator::new(pages)), order)
    }

    #[test]
    fn pages_of_a_range_share_a_reservation() {
        let r = system(8, 9);
        let o = ObjectId(1);
        let a = r.alloc_page(o, 5, 0).unwrap();
        let b = r.alloc_page(o, 7, 0).unwrap();
        assert_eq!(b - a, 2 * PAGE_SIZE);
        let info = r.reservation_of(a).unwrap();
        assert_eq!(info.base, PhysAddr::new(a.as_u64() - 5 * PAGE_SIZE));
        assert_eq!(info.popcnt, 2);
        assert_eq!(r.buddy().pages().meta(b).owner(), Some((o, 7)));
        assert_eq!(
            r.alloc_page(o, 5, 0),
            Err(ReservError::AlreadyPopulated {
                object: o,
                pindex: 5,
                pa: a
            })
        );
        // Another range of the object: another reservation.
        let c = r.alloc_page(o, 512, 0).unwrap();
        assert_ne!(r.reservation_of(c).unwrap().base, info.base);
        assert_eq!(r.stats().active, 2);
        r.audit().unwrap();
        for p in [a, b, c] {
            r.free_page(p).unwrap();
        }
        assert_eq!(
            r.free_page(a),
            Err(ReservError::Phys(PhysError::DoubleFree(a)))
        );
        assert_eq!(r.stats().active, 0);
        assert_eq!(r.stats().freed, 2);
        r.audit().unwrap();
        assert_eq!(r.buddy().free_blocks(), r.buddy().initial_blocks());
    }

    /// A caller's domain number near usize::MAX made `domain + i` overflow when choosing the
    /// domains to try (dev: a panic) in the buddy and in the reservation system's pressure
    /// path; the object id u64::MAX (the record's "no owner" encoding) panicked in `set_owner`
    /// after the block was already taken. Both are served or refused cleanly, and the object id
    /// is an error that changes nothing.
    #[test]
    fn huge_domain_numbers_and_the_reserved_object_id_are_handled_without_panics() {
        // Two domains of 4 MiB: usize::MAX % 2 == 1, so domain 1 is tried first.
        let pages = Arc::new(PageArray::new(&[
            PhysSegment::new(0, 4 << 20, 0),
            PhysSegment::new(4 << 20, 8 << 20, 1),
        ]));
        let b = Arc::new(BuddyAllocator::new(pages));
        let r = ReservSystem::new(b.clone(), 9);
        let before = (b.free_blocks(), r.stats());
        assert_eq!(
            r.alloc_page(ObjectId(u64::MAX), 0, 0),
            Err(ReservError::BadObject(ObjectId(u64::MAX)))
        );
        assert_eq!((b.free_blocks(), r.stats()), before);
        // A partial reservation in domain 0, then every other frame taken.
        let p = r.alloc_page(ObjectId(1), 0, 0).unwrap();
        let mut held = Vec::new();
        for d in [1, 0] {
            b.set_policy(DomainPolicy::Strict);
            while let Some(x) = b.alloc(d, 0) {
                held.push(x);
            }
        }
        b.set_policy(DomainPolicy::Prefer);
        // Domain 1 (tried first) has nothing: the next domain is found without overflow.
        let x = held.pop().unwrap();
        b.free(x, 0).unwrap();
        assert_eq!(
            b.alloc(usize::MAX, 0),
            Some(x),
            "Prefer: the other domain serves"
        );
        held.push(x);
        // The pressure path: domain 1 has no partial reservation, domain 0's is broken.
        let q = r.alloc_page(ObjectId(2), 0, usize::MAX).unwrap();
        assert_eq!(r.stats().broken, 1);
        b.set_policy(DomainPolicy::Strict);
        assert_eq!(b.alloc(usize::MAX, 0), None, "Strict: no such domain");
        b.set_policy(DomainPolicy::Prefer);
        for x in held {
            b.free(x, 0).unwrap();
        }
        r.free_page(p).unwrap();
        r.free_page(q).unwrap();
        r.audit().unwrap();
        assert_eq!(b.free_blocks(), b.initial_blocks());
    }

    #[test]
    fn object_gone_breaks_its_reservations() {
        let r = system(8, 9);
        let (o, p) = (ObjectId(3), ObjectId(4));
        let a = r.alloc_page(o, 0, 0).unwrap();
        let b = r.alloc_page(o, 1000, 0).unwrap();
        let c = r.alloc_page(p, 0, 0).unwrap();
        assert_eq!(r.object_gone(o), 2);
        assert_eq!(r.stats().broken, 2);
        assert!(r.reservation_of(a).is_none());
        assert!(r.reservation_of(c).is_some());
        r.audit().unwrap();
        assert_eq!(r.buddy().allocated_pages(), 2 + 512);
        r.free_page(a).unwrap();
        r.free_page(b).unwrap();
        r.free_page(c).unwrap();
        r.audit().unwrap();
        assert_eq!(r.buddy().allocated_pages(), 0);
        assert_eq!(r.buddy().free_blocks(), r.buddy().initial_blocks());
    }
}
