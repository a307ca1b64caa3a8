//! The buddy allocator: per NUMA domain, free lists of naturally aligned blocks of 2^order
//! frames, order 0 to [`MAX_ORDER`] (FreeBSD's `vm_phys.c`).
//!
//! The free lists are intrusive: doubly linked through the page array's records (page indices),
//! so every list operation is O(1). A frame's record says whether it heads a free block (and of
//! which order), heads an allocated block (and of which order: the free must give the same
//! order), or lies inside a block. Each domain's lists, counts and the records of its frames'
//! buddy state are protected by the domain's spin lock.
//!
//! Blocks never span two segments: a segment's frames are seeded as the largest aligned blocks
//! that fit, and a freed block coalesces with its buddy only when the buddy lies in the same
//! segment. So once everything is freed the lists hold exactly the seeded blocks again.
//!
//! Every free path refuses, in every build and before it changes anything, a frame still in
//! use: busied, wired, one of the pmap's page-table pages or PV chunks, or mapped by a PV entry
//! (`PageMeta::check_freeable`); run lengths are checked arithmetic.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::frames::{FaultInjector, FrameError, FrameSource};
use crate::page::{BuddyState, PageArray, PageSeg, NO_LINK};

/// The largest order: blocks of 2^12 frames = 16 MiB (FreeBSD amd64's `VM_NFREEORDER` - 1). It
/// covers both the 2 MiB and the 4 MiB superpage.
pub const MAX_ORDER: usize = 12;
/// The number of orders (free lists per domain).
pub const NUM_ORDERS: usize = MAX_ORDER + 1;

/// Where an allocation may come from when its domain has no suitable block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainPolicy {
    /// Try the requested domain first, then the others in turn.
    Prefer,
    /// Only the requested domain.
    Strict,
}

/// Errors of the physical allocator. An operation that returns one has changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// Not a page-aligned address of a frame of this machine, or the block would leave its
    /// segment.
    NotOurs(PhysAddr),
    /// The frame is already free (it heads or lies inside a free block).
    DoubleFree(PhysAddr),
    /// The frame heads an allocated block of another order.
    WrongOrder {
        pa: PhysAddr,
        allocated: u8,
        freed: u8,
    },
    /// The frame lies inside an allocated block that starts elsewhere.
    InsideBlock {
        pa: PhysAddr,
        head: PhysAddr,
        order: u8,
    },
    /// The order is larger than [`MAX_ORDER`].
    BadOrder(u8),
    /// The frame is busied (shared or exclusive): its holder is still using it.
    Busy(PhysAddr),
    /// The frame is wired `count` times.
    Wired { pa: PhysAddr, count: u32 },
    /// The frame is one of the pmap's page-table pages or PV chunks (`flags`: its
    /// [`page_flags`](crate::page::page_flags) that say so).
    PmapPage { pa: PhysAddr, flags: u32 },
    /// The frame still has PV entries: a managed mapping maps it.
    Mapped(PhysAddr),
    /// A run of `npages` frames from `pa` reaches past the top of the physical address space.
    RunWraps { pa: PhysAddr, npages: u64 },
}

impl fmt::Display for PhysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PhysError::NotOurs(pa) => write!(f, "{pa} is not a frame (block) of this allocator"),
            PhysError::DoubleFree(pa) => write!(f, "frame {pa} is already free"),
            PhysError::WrongOrder {
                pa,
                allocated,
                freed,
            } => write!(
                f,
                "block {pa} was allocated with order {allocated} but freed with order {freed}"
            ),
            PhysError::InsideBlock { pa, head, order } => write!(
                f,
                "frame {pa} lies inside the allocated block {head} of order {order}"
            ),
            PhysError::BadOrder(o) => write!(f, "order {o} exceeds the maximum {MAX_ORDER}"),
            PhysError::Busy(pa) => write!(f, "frame {pa} is busied: it cannot be freed"),
            PhysError::Wired { pa, count } => {
                write!(f, "frame {pa} is wired ({count}): it cannot be freed")
            }
            PhysError::PmapPage { pa, flags } => write!(
                f,
                "frame {pa} is a page-table page or PV chunk of the pmap (flags {flags:#x}): it cannot be freed"
            ),
            PhysError::Mapped(pa) => {
                write!(f, "frame {pa} is still mapped (it has PV entries): it cannot be freed")
            }
            PhysError::RunWraps { pa, npages } => write!(
                f,
                "a run of {npages:#x} frames from {pa} reaches past the top of the address space"
            ),
        }
    }
}

/// One domain's free lists (under the domain's lock).
struct DomainFree {
    /// Head page index of each order's list.
    heads: [u32; NUM_ORDERS],
    /// Blocks on each list.
    counts: [u64; NUM_ORDERS],
}

/// A buddy allocator over a page array, one set of free lists per domain.
pub struct BuddyAllocator {
    pages: Arc<PageArray>,
    doms: Vec<spin::Mutex<DomainFree>>,
    /// Frames per domain.
    totals: Vec<u64>,
    policy: AtomicU8,
    /// `FrameSource` placement: `u8::MAX` round-robin, else the preferred domain.
    frame_domain: AtomicU8,
    rr: AtomicUsize,
    /// Frames allocated (updated under the domain lock of the frames).
    allocated: AtomicU64,
    faults: FaultInjector,
}

const ROUND_ROBIN: u8 = u8::MAX;

#[inline]
fn pa_of_pfn(pfn: u64) -> PhysAddr {
    PhysAddr::new(pfn << PAGE_SHIFT)
}

#[inline]
fn idx_in(seg: &PageSeg, pfn: u64) -> usize {
    debug_assert!(seg.contains(pfn));
    seg.base + (pfn - seg.start_pfn) as usize
}

/// The largest aligned block starting at `pfn` that fits below `end` (capped at `MAX_ORDER`).
#[inline]
fn max_block_order(pfn: u64, end: u64) -> usize {
    let align = if pfn == 0 {
        MAX_ORDER
    } else {
        (pfn.trailing_zeros() as usize).min(MAX_ORDER)
    };
    let fit = (63 - (end - pfn).leading_zeros()) as usize;
    align.min(fit)
}

/// Calls `f(pfn, order)` for the maximal aligned blocks that tile `[start, end)`.
fn tile(mut start: u64, end: u64, mut f: impl FnMut(u64, usize)) {
    while start < end {
        let k = max_block_order(start, end);
        f(start, k);
        start += 1 << k;
    }
}

impl BuddyAllocator {
    /// An allocator owning every frame of `pages`, all free, with the [`DomainPolicy::Prefer`]
    /// policy and round-robin placement for [`FrameSource`].
    ///
    /// # Panics
    /// If the page array has more than 2^32 - 1 frames (the links are 32-bit indices).
    pub fn new(pages: Arc<PageArray>) -> Self {
        assert!(
            pages.len() < NO_LINK as usize,
            "too many frames for 32-bit links"
        );
        let nd = pages.domain_count();
        let doms = (0..nd)
            .map(|_| {
                spin::Mutex::new(DomainFree {
                    heads: [NO_LINK; NUM_ORDERS],
                    counts: [0; NUM_ORDERS],
                })
            })
            .collect();
        let mut totals = alloc::vec![0u64; nd];
        let b = BuddyAllocator {
            pages,
            doms,
            totals: Vec::new(),
            policy: AtomicU8::new(0),
            frame_domain: AtomicU8::new(ROUND_ROBIN),
            rr: AtomicUsize::new(0),
            allocated: AtomicU64::new(0),
            faults: FaultInjector::new(),
        };
        for seg in b.pages.segments() {
            totals[seg.domain as usize] += seg.len();
            let mut d = b.doms[seg.domain as usize].lock();
            tile(seg.start_pfn, seg.end_pfn, |pfn, k| {
                b.push(&mut d, idx_in(seg, pfn), k);
            });
        }
        BuddyAllocator { totals, ..b }
    }

    /// The page array.
    pub fn pages(&self) -> &Arc<PageArray> {
        &self.pages
    }

    /// The number of domains.
    pub fn domain_count(&self) -> usize {
        self.doms.len()
    }

    /// The fallback policy.
    pub fn policy(&self) -> DomainPolicy {
        match self.policy.load(Ordering::Relaxed) {
            0 => DomainPolicy::Prefer,
            _ => DomainPolicy::Strict,
        }
    }

    /// Set the fallback policy.
    pub fn set_policy(&self, p: DomainPolicy) {
        self.policy.store(
            match p {
                DomainPolicy::Prefer => 0,
                DomainPolicy::Strict => 1,
            },
            Ordering::Relaxed,
        );
    }

    /// Where [`FrameSource::alloc`] takes frames from: `None` round-robin over the domains (each
    /// tried in turn until one has a frame), `Some(d)` domain `d` under the fallback policy.
    pub fn set_frame_domain(&self, d: Option<u8>) {
        self.frame_domain
            .store(d.unwrap_or(ROUND_ROBIN), Ordering::Relaxed);
    }

    /// Make allocations fail: after `after` more successes, the next `count` allocations
    /// (`None`: all) return `None`. Every allocation path counts (`alloc`, `alloc_contig`,
    /// [`FrameSource::alloc`], and the reservation system's block and page allocations).
    pub fn inject_failures(&self, after: u64, count: Option<u64>) {
        self.faults.arm(after, count);
    }

    /// Stop injecting failures.
    pub fn clear_failures(&self) {
        self.faults.disarm();
    }

    /// Frames currently allocated.
    pub fn allocated_pages(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Frames of domain `d`.
    pub fn total_pages(&self, d: usize) -> u64 {
        self.totals.get(d).copied().unwrap_or(0)
    }

    /// Free blocks of domain `d` per order.
    pub fn free_counts(&self, d: usize) -> [u64; NUM_ORDERS] {
        self.doms
            .get(d)
            .map_or([0; NUM_ORDERS], |m| m.lock().counts)
    }

    /// Free frames of domain `d`.
    pub fn free_pages(&self, d: usize) -> u64 {
        self.free_counts(d)
            .iter()
            .enumerate()
            .map(|(k, &c)| c << k)
            .sum()
    }

    /// Free frames of every domain.
    pub fn total_free_pages(&self) -> u64 {
        (0..self.doms.len()).map(|d| self.free_pages(d)).sum()
    }

    /// Every free block (address, order), in address order.
    pub fn free_blocks(&self) -> Vec<(PhysAddr, u8)> {
        let mut v = Vec::new();
        for m in &self.doms {
            let d = m.lock();
            for (k, &h) in d.heads.iter().enumerate() {
                let mut i = h;
                while i != NO_LINK {
                    v.push((self.pages.pa_of(i as usize), k as u8));
                    i = self.pages.page(i as usize).link_next();
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// The blocks of a fully free allocator: each segment tiled by maximal aligned blocks.
    /// After everything is freed, [`free_blocks`](Self::free_blocks) equals this.
    pub fn initial_blocks(&self) -> Vec<(PhysAddr, u8)> {
        let mut v = Vec::new();
        for s in self.pages.segments() {
            tile(s.start_pfn, s.end_pfn, |pfn, k| {
                v.push((pa_of_pfn(pfn), k as u8))
            });
        }
        v
    }

    // ---------------------------------------------------------------------------------------
    // List operations (caller holds the domain lock of the frame).

    fn push(&self, d: &mut DomainFree, idx: usize, k: usize) {
        let m = self.pages.page(idx);
        debug_assert_eq!(
            m.buddy_state(),
            BuddyState::Interior,
            "pushing a block head"
        );
        let old = d.heads[k];
        m.set_links(NO_LINK, old);
        if old != NO_LINK {
            self.pages.page(old as usize).set_link_prev(idx as u32);
        }
        d.heads[k] = idx as u32;
        d.counts[k] += 1;
        m.set_buddy_state(BuddyState::FreeHead(k as u8));
    }

    fn unlink(&self, d: &mut DomainFree, idx: usize, k: usize) {
        let m = self.pages.page(idx);
        debug_assert_eq!(m.buddy_state(), BuddyState::FreeHead(k as u8));
        let (p, n) = (m.link_prev(), m.link_next());
        if p == NO_LINK {
            debug_assert_eq!(d.heads[k], idx as u32);
            d.heads[k] = n;
        } else {
            self.pages.page(p as usize).set_link_next(n);
        }
        if n != NO_LINK {
            self.pages.page(n as usize).set_link_prev(p);
        }
        m.set_links(NO_LINK, NO_LINK);
        m.set_buddy_state(BuddyState::Interior);
        d.counts[k] -= 1;
    }

    /// Free the block `(pfn, k)` of `seg` (its head already `Interior`), coalescing with free
    /// buddies inside the segment.
    fn free_locked(&self, d: &mut DomainFree, seg: &PageSeg, mut pfn: u64, mut k: usize) {
        debug_assert!(pfn.is_multiple_of(1 << k), "misaligned block");
        debug_assert!(pfn + (1 << k) <= seg.end_pfn);
        while k < MAX_ORDER {
            let b = pfn ^ (1 << k);
            if b < seg.start_pfn || b + (1 << k) > seg.end_pfn {
                break;
            }
            let bi = idx_in(seg, b);
            if self.pages.page(bi).buddy_state() != BuddyState::FreeHead(k as u8) {
                break;
            }
            self.unlink(d, bi, k);
            pfn &= !(1 << k);
            k += 1;
        }
        self.push(d, idx_in(seg, pfn), k);
    }

    /// Take a block of order `k` from `d`'s lists, splitting a larger one if needed; returns the
    /// page index of its head (marked allocated).
    fn alloc_locked(&self, d: &mut DomainFree, k: usize) -> Option<usize> {
        let j = (k..NUM_ORDERS).find(|&j| d.heads[j] != NO_LINK)?;
        let idx = d.heads[j] as usize;
        self.unlink(d, idx, j);
        // The block lies inside one segment, whose page indices are consecutive.
        for o in (k..j).rev() {
            self.push(d, idx + (1 << o), o);
        }
        self.pages
            .page(idx)
            .set_buddy_state(BuddyState::AllocHead(k as u8));
        self.allocated.fetch_add(1 << k, Ordering::Relaxed);
        Some(idx)
    }

    /// The domains to try for a request on `domain`, in order.
    fn domain_order(&self, domain: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.doms.len();
        let tries = match self.policy() {
            DomainPolicy::Prefer => n,
            DomainPolicy::Strict => usize::from(domain < n),
        };
        // Reduced first: `domain + i` of a caller's domain near usize::MAX would overflow.
        let first = domain % n.max(1);
        (0..tries).map(move |i| (first + i) % n.max(1))
    }

    /// Why the frames `[idx, idx + n)` cannot be freed now, if one cannot (see
    /// [`PageMeta::check_freeable`](crate::page::PageMeta)); checked before anything changes.
    fn check_freeable(&self, idx: usize, n: usize) -> Result<(), PhysError> {
        for i in idx..idx + n {
            self.pages.page(i).check_freeable(self.pages.pa_of(i))?;
        }
        Ok(())
    }

    /// Clear the per-owner state of a block being freed (so free frames have none).
    fn reset_block(&self, idx: usize, k: usize) {
        for i in idx..idx + (1 << k) {
            self.pages.page(i).reset_owner_state();
        }
    }

    // ---------------------------------------------------------------------------------------
    // Allocation.

    /// A naturally aligned block of 2^`order` frames from `domain` (or, under
    /// [`DomainPolicy::Prefer`], another domain). Its records are clear (no owner, invalid,
    /// clean, unwired, unbusied): the free path cleared them.
    /// `None` when no domain allowed has such a block, or a failure is injected.
    pub fn alloc(&self, domain: usize, order: usize) -> Option<PhysAddr> {
        if order > MAX_ORDER || self.faults.should_fail() {
            return None;
        }
        self.alloc_nofault(domain, order)
    }

    /// [`alloc`](Self::alloc) without consulting the fault injector (for callers that already
    /// did, as the reservation system does once per request).
    pub(crate) fn alloc_nofault(&self, domain: usize, order: usize) -> Option<PhysAddr> {
        for dom in self.domain_order(domain) {
            let idx = self.alloc_locked(&mut self.doms[dom].lock(), order);
            if let Some(idx) = idx {
                return Some(self.pages.pa_of(idx));
            }
        }
        None
    }

    /// The segment and page index of the frame at `pa`.
    fn locate(&self, pa: PhysAddr) -> Result<(&PageSeg, u64), PhysError> {
        if !pa.is_aligned(PAGE_SIZE) {
            return Err(PhysError::NotOurs(pa));
        }
        let pfn = pa.as_u64() >> PAGE_SHIFT;
        let s = self.pages.seg_of_pfn(pfn).ok_or(PhysError::NotOurs(pa))?;
        Ok((&self.pages.segments()[s], pfn))
    }

    /// Why the frame `pfn` of `seg` is not an allocated block of order `order`, if it is not
    /// (caller holds the domain lock).
    fn check_alloc_head(&self, seg: &PageSeg, pfn: u64, order: usize) -> Result<(), PhysError> {
        let pa = pa_of_pfn(pfn);
        match self.pages.page(idx_in(seg, pfn)).buddy_state() {
            BuddyState::AllocHead(k) if k as usize == order => Ok(()),
            BuddyState::AllocHead(k) => Err(PhysError::WrongOrder {
                pa,
                allocated: k,
                freed: order as u8,
            }),
            BuddyState::FreeHead(_) => Err(PhysError::DoubleFree(pa)),
            BuddyState::Interior => {
                // Find the block that contains it: the first aligned head whose order covers it.
                for j in 1..NUM_ORDERS {
                    let h = pfn & !((1u64 << j) - 1);
                    if !seg.contains(h) {
                        break;
                    }
                    match self.pages.page(idx_in(seg, h)).buddy_state() {
                        BuddyState::FreeHead(k) if k as usize >= j => {
                            return Err(PhysError::DoubleFree(pa))
                        }
                        BuddyState::AllocHead(k) if k as usize >= j => {
                            return Err(PhysError::InsideBlock {
                                pa,
                                head: pa_of_pfn(h),
                                order: k,
                            })
                        }
                        _ => {}
                    }
                }
                Err(PhysError::NotOurs(pa))
            }
        }
    }

    /// Return the block of 2^`order` frames at `pa`. It must have been allocated with that
    /// order (or be a frame of a block split by [`split`](Self::split) or of an
    /// [`alloc_contig`](Self::alloc_contig) run, with order 0); otherwise the error says why and
    /// nothing changes.
    pub fn free(&self, pa: PhysAddr, order: usize) -> Result<(), PhysError> {
        if order > MAX_ORDER {
            return Err(PhysError::BadOrder(order as u8));
        }
        let (seg, pfn) = self.locate(pa)?;
        let mut d = self.doms[seg.domain as usize].lock();
        self.check_alloc_head(seg, pfn, order)?;
        // An allocated head of order k is aligned to 2^k (alloc_locked and take_run make no
        // other), and lies wholly in its segment: the check covers only frames of the block.
        self.check_freeable(idx_in(seg, pfn), 1 << order)?;
        // Clears owner, valid, dirty and psind.
        self.reset_block(idx_in(seg, pfn), order);
        self.pages
            .page(idx_in(seg, pfn))
            .set_buddy_state(BuddyState::Interior);
        self.allocated.fetch_sub(1 << order, Ordering::Relaxed);
        self.free_locked(&mut d, seg, pfn, order);
        Ok(())
    }

    /// Turn the allocated block of 2^`order` frames at `pa` into 2^`order` allocated frames of
    /// order 0, each to be freed on its own (FreeBSD frees reservation pages so).
    pub fn split(&self, pa: PhysAddr, order: usize) -> Result<(), PhysError> {
        if order > MAX_ORDER {
            return Err(PhysError::BadOrder(order as u8));
        }
        let (seg, pfn) = self.locate(pa)?;
        let _d = self.doms[seg.domain as usize].lock();
        self.check_alloc_head(seg, pfn, order)?;
        let idx = idx_in(seg, pfn);
        for i in idx..idx + (1 << order) {
            self.pages.page(i).set_buddy_state(BuddyState::AllocHead(0));
        }
        Ok(())
    }

    /// Free `npages` frames of order 0 from `pa` (a run from [`alloc_contig`](Self::alloc_contig)
    /// or from [`split`](Self::split)). Every frame is checked first: on error nothing changes.
    pub fn free_contig(&self, pa: PhysAddr, npages: u64) -> Result<(), PhysError> {
        let (seg, pfn) = self.locate(pa)?;
        if npages == 0 {
            return Ok(());
        }
        let end = pfn
            .checked_add(npages)
            .filter(|&e| e <= 1 << (64 - PAGE_SHIFT))
            .ok_or(PhysError::RunWraps { pa, npages })?;
        if end > seg.end_pfn {
            // The first frame past the segment (its address fits: end - 1 is below 2^52).
            return Err(PhysError::NotOurs(pa_of_pfn(seg.end_pfn)));
        }
        let mut d = self.doms[seg.domain as usize].lock();
        for p in pfn..end {
            self.check_alloc_head(seg, p, 0)?;
        }
        self.check_freeable(idx_in(seg, pfn), (end - pfn) as usize)?;
        for p in pfn..end {
            self.reset_block(idx_in(seg, p), 0);
            self.pages
                .page(idx_in(seg, p))
                .set_buddy_state(BuddyState::Interior);
            self.allocated.fetch_sub(1, Ordering::Relaxed);
            self.free_locked(&mut d, seg, p, 0);
        }
        Ok(())
    }

    /// `npages` physically contiguous frames (FreeBSD's `vm_phys_alloc_contig`): the run lies in
    /// `[low, high)`, starts at a multiple of `alignment` (a power of two; anything below a page
    /// means a page) and does not cross a multiple of `boundary` (a power of two, or 0 for no
    /// boundary). The run may be carved out of several adjacent free blocks. It is returned as
    /// `npages` allocated frames of order 0 (free them with [`free_contig`](Self::free_contig)
    /// or one by one with order 0). Domains are tried as for [`alloc`](Self::alloc).
    pub fn alloc_contig(
        &self,
        domain: usize,
        npages: u64,
        low: PhysAddr,
        high: PhysAddr,
        alignment: u64,
        boundary: u64,
    ) -> Option<PhysAddr> {
        let alignment = alignment.max(PAGE_SIZE);
        if npages == 0
            || !alignment.is_power_of_two()
            || (boundary != 0 && !boundary.is_power_of_two())
            || (boundary != 0 && npages.checked_mul(PAGE_SIZE)? > boundary)
        {
            return None;
        }
        if self.faults.should_fail() {
            return None;
        }
        let align_p = alignment >> PAGE_SHIFT;
        let bound_p = boundary >> PAGE_SHIFT;
        let lo = low.as_u64().div_ceil(PAGE_SIZE);
        let hi = high.as_u64() >> PAGE_SHIFT;
        for dom in self.domain_order(domain) {
            let mut d = self.doms[dom].lock();
            if let Some(start) = self.find_run(&d, npages, lo, hi, align_p, bound_p) {
                self.take_run(&mut d, start, npages);
                return Some(pa_of_pfn(start));
            }
        }
        None
    }

    /// The free blocks of a domain as `(pfn, order)`, sorted.
    fn blocks_locked(&self, d: &DomainFree) -> Vec<(u64, usize)> {
        let mut v = Vec::new();
        for (k, &h) in d.heads.iter().enumerate() {
            let mut i = h;
            while i != NO_LINK {
                v.push((self.pages.pfn_of(i as usize), k));
                i = self.pages.page(i as usize).link_next();
            }
        }
        v.sort_unstable();
        v
    }

    /// The first start frame of a run honouring the constraints, inside the domain's free runs.
    fn find_run(
        &self,
        d: &DomainFree,
        n: u64,
        lo: u64,
        hi: u64,
        align_p: u64,
        bound_p: u64,
    ) -> Option<u64> {
        let blocks = self.blocks_locked(d);
        let mut i = 0;
        while i < blocks.len() {
            // A maximal run of physically adjacent free blocks of one segment.
            let rs = blocks[i].0;
            let send = self.pages.segments()[self.pages.seg_of_pfn(rs).expect("free")].end_pfn;
            let mut re = rs + (1 << blocks[i].1);
            i += 1;
            while i < blocks.len() && blocks[i].0 == re && re < send {
                re += 1 << blocks[i].1;
                i += 1;
            }
            let (a, b) = (rs.max(lo), re.min(hi));
            let mut s = a.checked_next_multiple_of(align_p)?;
            while s.checked_add(n).is_some_and(|e| e <= b) {
                if bound_p != 0 && s / bound_p != (s + n - 1) / bound_p {
                    s = ((s / bound_p + 1) * bound_p).checked_next_multiple_of(align_p)?;
                    continue;
                }
                return Some(s);
            }
        }
        None
    }

    /// Take the free frames `[start, start + n)` off the lists (they lie in free blocks), put
    /// back the rest of the blocks they came from, and mark them allocated frames of order 0.
    fn take_run(&self, d: &mut DomainFree, start: u64, n: u64) {
        let end = start + n;
        let mut pfn = start;
        while pfn < end {
            let si = self.pages.seg_of_pfn(pfn).expect("free frame");
            let seg = self.pages.segments()[si];
            // The free block holding pfn.
            let (h, k) = (0..NUM_ORDERS)
                .map(|j| (pfn & !((1u64 << j) - 1), j))
                .find(|&(h, j)| {
                    seg.contains(h)
                        && self.pages.page(idx_in(&seg, h)).buddy_state()
                            == BuddyState::FreeHead(j as u8)
                })
                .expect("run frames lie in free blocks");
            let be = h + (1 << k);
            self.unlink(d, idx_in(&seg, h), k);
            tile(h, pfn, |p, o| self.free_locked(d, &seg, p, o));
            let take_end = be.min(end);
            tile(take_end, be, |p, o| self.free_locked(d, &seg, p, o));
            for p in pfn..take_end {
                self.pages
                    .page(idx_in(&seg, p))
                    .set_buddy_state(BuddyState::AllocHead(0));
            }
            self.allocated.fetch_add(take_end - pfn, Ordering::Relaxed);
            pfn = take_end;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Audit.

    /// Check the whole allocator (every domain lock held, in domain order): every list is well
    /// linked, holds blocks of its order that are aligned, inside one segment of its domain, and
    /// disjoint; no two free buddies are left uncoalesced; every frame not in a free block lies
    /// in exactly one allocated block with a head of its order; counts match.
    pub fn audit(&self) -> Result<(), String> {
        use alloc::format;
        let guards: Vec<_> = self.doms.iter().map(|m| m.lock()).collect();
        let n = self.pages.len();
        // 0: unseen, 1: in a free block.
        let mut free = alloc::vec![false; n];
        let mut free_frames = 0u64;
        for (dom, d) in guards.iter().enumerate() {
            for k in 0..NUM_ORDERS {
                let mut prev = NO_LINK;
                let mut i = d.heads[k];
                let mut count = 0u64;
                while i != NO_LINK {
                    let idx = i as usize;
                    if idx >= n || count > n as u64 {
                        return Err(format!("domain {dom} order {k}: list broken at {i}"));
                    }
                    let m = self.pages.page(idx);
                    let pfn = self.pages.pfn_of(idx);
                    let pa = pa_of_pfn(pfn);
                    if m.link_prev() != prev {
                        return Err(format!("free block {pa}: back link wrong"));
                    }
                    if m.buddy_state() != BuddyState::FreeHead(k as u8) {
                        return Err(format!(
                            "free block {pa} on list {k} has state {:?}",
                            m.buddy_state()
                        ));
                    }
                    if m.domain() as usize != dom {
                        return Err(format!("free block {pa} of domain {} on {dom}", m.domain()));
                    }
                    if !pfn.is_multiple_of(1 << k) {
                        return Err(format!("free block {pa} of order {k} misaligned"));
                    }
                    let si = self.pages.seg_of_pfn(pfn).expect("pfn_of");
                    let seg = self.pages.segments()[si];
                    if pfn + (1 << k) > seg.end_pfn {
                        return Err(format!("free block {pa} of order {k} leaves its segment"));
                    }
                    for (j, f) in free.iter_mut().enumerate().skip(idx).take(1 << k) {
                        if *f {
                            return Err(format!("free blocks overlap at {}", self.pages.pa_of(j)));
                        }
                        *f = true;
                        if self.pages.page(j).owner().is_some()
                            || self.pages.page(j).wire_count() != 0
                        {
                            return Err(format!(
                                "free frame {} has an owner or is wired",
                                self.pages.pa_of(j)
                            ));
                        }
                        if j != idx && self.pages.page(j).buddy_state() != BuddyState::Interior {
                            return Err(format!(
                                "frame {} inside free block {pa} is a block head",
                                self.pages.pa_of(j)
                            ));
                        }
                    }
                    if k < MAX_ORDER {
                        let b = pfn ^ (1 << k);
                        if seg.contains(b)
                            && seg.contains(b + (1 << k) - 1)
                            && self.pages.page(idx_in(&seg, b)).buddy_state()
                                == BuddyState::FreeHead(k as u8)
                        {
                            return Err(format!(
                                "free buddies {pa} and {} of order {k} not coalesced",
                                pa_of_pfn(b)
                            ));
                        }
                    }
                    count += 1;
                    prev = i;
                    i = m.link_next();
                }
                if count != d.counts[k] {
                    return Err(format!(
                        "domain {dom} order {k}: {count} blocks listed, count says {}",
                        d.counts[k]
                    ));
                }
                free_frames += count << k;
            }
        }
        // Every other frame: in exactly one allocated block.
        let mut allocated = 0u64;
        for seg in self.pages.segments() {
            let mut pfn = seg.start_pfn;
            while pfn < seg.end_pfn {
                let idx = idx_in(seg, pfn);
                let m = self.pages.page(idx);
                let pa = pa_of_pfn(pfn);
                if free[idx] {
                    if let BuddyState::AllocHead(_) = m.buddy_state() {
                        return Err(format!("frame {pa} both free and allocated"));
                    }
                    pfn += 1;
                    continue;
                }
                match m.buddy_state() {
                    BuddyState::AllocHead(k) => {
                        let k = k as usize;
                        if !pfn.is_multiple_of(1 << k) || pfn + (1 << k) > seg.end_pfn {
                            return Err(format!("allocated block {pa} of order {k} misplaced"));
                        }
                        for (j, &f) in free.iter().enumerate().skip(idx + 1).take((1 << k) - 1) {
                            if f || self.pages.page(j).buddy_state() != BuddyState::Interior {
                                return Err(format!(
                                    "frame {} inside allocated block {pa} is free or a head",
                                    self.pages.pa_of(j)
                                ));
                            }
                        }
                        allocated += 1 << k;
                        pfn += 1 << k;
                    }
                    BuddyState::FreeHead(k) => {
                        return Err(format!("frame {pa} marked free (order {k}) but on no list"))
                    }
                    BuddyState::Interior => {
                        return Err(format!("frame {pa} is in no block (free or allocated)"))
                    }
                }
            }
        }
        if allocated != self.allocated.load(Ordering::Relaxed) {
            return Err(format!(
                "{allocated} frames in allocated blocks, counter says {}",
                self.allocated.load(Ordering::Relaxed)
            ));
        }
        if allocated + free_frames != n as u64 {
            return Err(format!(
                "{allocated} allocated + {free_frames} free != {n} frames"
            ));
        }
        Ok(())
    }
}

impl FrameSource for BuddyAllocator {
    fn alloc(&self) -> Option<PhysAddr> {
        if self.faults.should_fail() {
            return None;
        }
        match self.frame_domain.load(Ordering::Relaxed) {
            ROUND_ROBIN => {
                let n = self.doms.len();
                let first = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n).find_map(|i| {
                    let idx = self.alloc_locked(&mut self.doms[(first + i) % n].lock(), 0)?;
                    Some(self.pages.pa_of(idx))
                })
            }
            d => self.alloc_nofault(d as usize, 0),
        }
    }

    /// Frees a frame of order 0. A frame that heads a larger block, or lies inside one, is
    /// reported as `NotOurs`, one still in use (busied, wired, a pmap page, mapped) as `InUse`
    /// (the trait has no finer errors; [`BuddyAllocator::free`] has).
    fn free(&self, pa: PhysAddr) -> Result<(), FrameError> {
        BuddyAllocator::free(self, pa, 0).map_err(|e| match e {
            PhysError::DoubleFree(pa) => FrameError::DoubleFree(pa),
            PhysError::Busy(pa)
            | PhysError::Wired { pa, .. }
            | PhysError::PmapPage { pa, .. }
            | PhysError::Mapped(pa) => FrameError::InUse(pa),
            _ => FrameError::NotOurs(pa),
        })
    }

    fn in_use(&self) -> u64 {
        self.allocated_pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::PhysSegment;

    fn buddy(segs: &[PhysSegment]) -> BuddyAllocator {
        BuddyAllocator::new(Arc::new(PageArray::new(segs)))
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn seeding_is_maximal_aligned_blocks() {
        // 0x1000..0x10_0000 + 0x3000: 1 + 2 + 4 + ... frames.
        let b = buddy(&[PhysSegment::new(0x1000, 0x10_3000, 0)]);
        b.audit().unwrap();
        let blocks = b.free_blocks();
        assert_eq!(blocks, b.initial_blocks());
        assert_eq!(blocks[0], (PhysAddr::new(0x1000), 0));
        assert_eq!(blocks[1], (PhysAddr::new(0x2000), 1));
        assert_eq!(*blocks.last().unwrap(), (PhysAddr::new(0x10_2000), 0));
        assert_eq!(b.total_free_pages(), 0x102);
        // 64 MiB at 0: four blocks of MAX_ORDER.
        let b = buddy(&[PhysSegment::new(0, 64 * MB, 0)]);
        assert_eq!(b.free_counts(0)[MAX_ORDER], 4);
        assert_eq!(b.free_pages(0), 64 * MB / PAGE_SIZE);
    }

    #[test]
    fn split_and_coalesce() {
        let b = buddy(&[PhysSegment::new(0, 16 * MB, 0)]);
        let a = b.alloc(0, 0).unwrap();
        assert_eq!(a, PhysAddr::new(0));
        let counts = b.free_counts(0);
        assert_eq!(&counts[..MAX_ORDER], &[1; MAX_ORDER]);
        assert_eq!(counts[MAX_ORDER], 0);
        b.audit().unwrap();
        let c = b.alloc(0, 3).unwrap();
        assert!(c.is_aligned(8 * PAGE_SIZE));
        b.audit().unwrap();
        b.free(a, 0).unwrap();
        b.free(c, 3).unwrap();
        b.audit().unwrap();
        assert_eq!(b.free_blocks(), b.initial_blocks());
        assert_eq!(b.allocated_pages(), 0);
    }

    #[test]
    fn free_errors_change_nothing() {
        let b = buddy(&[PhysSegment::new(0, 4 * MB, 0)]);
        let a = b.alloc(0, 2).unwrap();
        let before = b.free_blocks();
        assert_eq!(
            b.free(a, 1),
            Err(PhysError::WrongOrder {
                pa: a,
                allocated: 2,
                freed: 1
            })
        );
        assert_eq!(
            b.free(a + PAGE_SIZE, 0),
            Err(PhysError::InsideBlock {
                pa: a + PAGE_SIZE,
                head: a,
                order: 2
            })
        );
        let f = before[0].0;
        assert_eq!(
            b.free(f, before[0].1 as usize),
            Err(PhysError::DoubleFree(f))
        );
        assert_eq!(
            b.free(PhysAddr::new(0x123), 0),
            Err(PhysError::NotOurs(PhysAddr::new(0x123)))
        );
        assert_eq!(
            b.free(PhysAddr::new(64 * MB), 0),
            Err(PhysError::NotOurs(PhysAddr::new(64 * MB)))
        );
        assert_eq!(b.free(a, 13), Err(PhysError::BadOrder(13)));
        assert_eq!(b.free_blocks(), before);
        b.free(a, 2).unwrap();
        assert_eq!(b.free(a, 2), Err(PhysError::DoubleFree(a)));
        assert_eq!(
            b.free(a + PAGE_SIZE, 0),
            Err(PhysError::DoubleFree(a + PAGE_SIZE))
        );
        b.audit().unwrap();
    }

    /// PHYS-4: a free of a frame still in use (wired, busied shared or exclusive, a pmap
    /// page-table page or PV chunk, mapped by a PV entry) was a debug assertion at most (release
    /// builds freed the frame to its next owner while its user still had it). It is an error in
    /// every build, for every frame of the block and every free path, and changes nothing.
    #[test]
    fn free_of_a_wired_frame_is_refused_in_every_build() {
        use crate::page::page_flags;
        let b = buddy(&[PhysSegment::new(0, 4 * MB, 0)]);
        let a = b.alloc(0, 2).unwrap();
        let third = a + 2 * PAGE_SIZE;
        let m = b.pages().meta(third);
        type Make = fn(&crate::page::PageMeta);
        type Undo = fn(&crate::page::PageMeta);
        let cases: [(Make, Undo, PhysError); 5] = [
            (
                |m| {
                    m.wire();
                },
                |m| {
                    m.unwire();
                },
                PhysError::Wired {
                    pa: third,
                    count: 1,
                },
            ),
            (
                |m| assert!(m.try_xbusy()),
                |m| m.xunbusy(),
                PhysError::Busy(third),
            ),
            (
                |m| assert!(m.try_sbusy()),
                |m| m.sunbusy(),
                PhysError::Busy(third),
            ),
            (
                |m| m.set_flags(page_flags::PTP),
                |m| m.clear_flags(page_flags::PTP),
                PhysError::PmapPage {
                    pa: third,
                    flags: page_flags::PTP,
                },
            ),
            (
                // A non-empty PV list: its head names a slot (what the PV chunks would link).
                |m| m.pv.lock().first = 0x1040,
                |m| *m.pv.lock() = crate::page::PvHead::new(),
                PhysError::Mapped(third),
            ),
        ];
        for (make, undo, err) in cases {
            make(m);
            let (blocks, out) = (b.free_blocks(), b.allocated_pages());
            assert_eq!(b.free(a, 2), Err(err));
            assert_eq!(
                (b.free_blocks(), b.allocated_pages()),
                (blocks.clone(), out)
            );
            // The same frame as part of a run: nothing of the run is freed either.
            let r = b
                .alloc_contig(
                    0,
                    4,
                    PhysAddr::new(0),
                    PhysAddr::new(u64::MAX),
                    PAGE_SIZE,
                    0,
                )
                .unwrap();
            let rm = b.pages().meta(r + PAGE_SIZE);
            make(rm);
            let (blocks, out) = (b.free_blocks(), b.allocated_pages());
            let e = b.free_contig(r, 4).unwrap_err();
            assert!(
                core::mem::discriminant(&e) == core::mem::discriminant(&err),
                "{e:?}"
            );
            assert_eq!((b.free_blocks(), b.allocated_pages()), (blocks, out));
            undo(rm);
            b.free_contig(r, 4).unwrap();
            undo(m);
            b.audit().unwrap();
        }
        // And through the frame-source face.
        let f = FrameSource::alloc(&b).unwrap();
        b.pages().meta(f).wire();
        assert_eq!(FrameSource::free(&b, f), Err(FrameError::InUse(f)));
        b.pages().meta(f).unwire();
        FrameSource::free(&b, f).unwrap();
        b.free(a, 2).unwrap();
        b.audit().unwrap();
        assert_eq!(b.free_blocks(), b.initial_blocks());
    }

    /// PHYS-4: `free_contig` of a count near 2^64 computed `pfn + npages` unchecked (dev: a
    /// panic; release: the sum wrapped below `pfn`, the run was empty, and the call returned
    /// `Ok` having freed nothing). It is an error, as is a run that leaves its segment.
    #[test]
    fn free_contig_of_a_wrapping_count_is_an_error_that_frees_nothing() {
        let b = buddy(&[PhysSegment::new(0, 4 * MB, 0)]);
        let r = b
            .alloc_contig(
                0,
                8,
                PhysAddr::new(0),
                PhysAddr::new(u64::MAX),
                PAGE_SIZE,
                0,
            )
            .unwrap();
        let before = (b.free_blocks(), b.allocated_pages());
        for n in [u64::MAX, u64::MAX - 1, 1 << 52] {
            assert_eq!(
                b.free_contig(r + PAGE_SIZE, n),
                Err(PhysError::RunWraps {
                    pa: r + PAGE_SIZE,
                    npages: n
                })
            );
        }
        assert_eq!(
            b.free_contig(r, 4 * MB / PAGE_SIZE + 1),
            Err(PhysError::NotOurs(PhysAddr::new(4 * MB)))
        );
        assert_eq!((b.free_blocks(), b.allocated_pages()), before);
        b.audit().unwrap();
        b.free_contig(r, 8).unwrap();
        assert_eq!(b.free_blocks(), b.initial_blocks());
    }

    #[test]
    fn split_block_frees_page_by_page() {
        let b = buddy(&[PhysSegment::new(0, 4 * MB, 0)]);
        let a = b.alloc(0, 4).unwrap();
        b.split(a, 4).unwrap();
        b.audit().unwrap();
        assert_eq!(b.allocated_pages(), 16);
        for i in (0..16).rev() {
            b.free(a + i * PAGE_SIZE, 0).unwrap();
            b.audit().unwrap();
        }
        assert_eq!(b.free_blocks(), b.initial_blocks());
    }

    #[test]
    fn contig_out_of_several_blocks() {
        // Segment starts at 3 frames: blocks 3(0), 4(2), 8(3), 16(4)...
        let b = buddy(&[PhysSegment::new(0x3000, 0x40_0000, 0)]);
        let r = b
            .alloc_contig(
                0,
                10,
                PhysAddr::new(0),
                PhysAddr::new(u64::MAX),
                PAGE_SIZE,
                0,
            )
            .unwrap();
        assert_eq!(r, PhysAddr::new(0x3000));
        b.audit().unwrap();
        assert_eq!(b.allocated_pages(), 10);
        b.free_contig(r, 10).unwrap();
        b.audit().unwrap();
        assert_eq!(b.free_blocks(), b.initial_blocks());
    }

    #[test]
    fn frame_source_round_robin() {
        let b = buddy(&[PhysSegment::new(0, MB, 0), PhysSegment::new(MB, 2 * MB, 1)]);
        let f: &dyn FrameSource = &b;
        let x = f.alloc().unwrap();
        let y = f.alloc().unwrap();
        let dx = b.pages().meta(x).domain();
        let dy = b.pages().meta(y).domain();
        assert_ne!(dx, dy);
        assert_eq!(f.in_use(), 2);
        f.free(x).unwrap();
        assert_eq!(f.free(x), Err(FrameError::DoubleFree(x)));
        f.free(y).unwrap();
        assert_eq!(f.in_use(), 0);
        let big = b.alloc(0, 2).unwrap();
        assert_eq!(f.free(big), Err(FrameError::NotOurs(big)));
        b.free(big, 2).unwrap();
    }
}
