//! The arena's state under its lock: segment list, free lists, hash, spans, counters; the
//! allocation policies and the free path with coalescing.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;

use super::freelist::{bucket, guaranteed_bucket, FreeLists, NLISTS};
use super::hash::AllocHash;
use super::seg::{Kind, Segs, NIL, SENTINEL};
use super::{Policy, VmemError};

/// What an allocation must satisfy, already validated and rounded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Want {
    pub size: u64,
    pub align: u64,
    pub phase: u64,
    /// 0: none.
    pub nocross: u64,
    pub min: u64,
    /// Last address the segment may cover (inclusive).
    pub max: u64,
}

impl Want {
    pub fn plain(size: u64, quantum: u64) -> Want {
        Want {
            size,
            align: quantum,
            phase: 0,
            nocross: 0,
            min: 0,
            max: u64::MAX,
        }
    }

    /// No constraint on where in a segment the allocation may go, other than alignment.
    #[inline]
    fn anywhere(&self) -> bool {
        self.nocross == 0 && self.min == 0 && self.max == u64::MAX
    }

    /// Where in the free segment `[s, e)` the allocation can go (lowest address), if anywhere.
    #[inline(always)]
    pub fn fit(&self, s: u64, e: u64, quantum: u64) -> Option<u64> {
        if self.align == quantum && self.phase == 0 && self.anywhere() {
            return if e - s >= self.size { Some(s) } else { None };
        }
        // General case in u128: no intermediate value can overflow.
        let (size, align, phase) = (self.size as u128, self.align as u128, self.phase as u128);
        let lo = (s as u128).max(self.min as u128);
        let hi = (e as u128).min(self.max as u128 + 1);
        let phase_up = |x: u128| (x.saturating_sub(phase)).div_ceil(align) * align + phase;
        let mut a = phase_up(lo);
        if self.nocross != 0 {
            let nc = self.nocross as u128;
            let crosses = |a: u128| (a ^ (a + size - 1)) & !(nc - 1) != 0;
            if crosses(a) {
                // Start over at the next boundary; if that crosses too, so does every later
                // candidate (they repeat with period nocross), and the segment cannot serve.
                a = phase_up((a / nc + 1) * nc);
                if crosses(a) {
                    return None;
                }
            }
        }
        if a + size <= hi {
            Some(a as u64)
        } else {
            None
        }
    }
}

/// Counters kept exactly under the lock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub total: u64,
    pub imported: u64,
    pub in_use: u64,
    pub free: u64,
    pub live: u64,
    pub cached: u64,
    pub work: u64,
    pub imports: u64,
    pub releases: u64,
}

pub(crate) struct Inner {
    pub segs: Segs,
    pub fl: FreeLists,
    pub hash: AllocHash,
    /// Span start to its tag: overlap checks on `add`, sorted insertion, rotor recovery.
    pub spans: BTreeMap<u64, u32>,
    /// Next fit: the tag of the last next-fit allocation, and its start (to detect that the tag
    /// has since been merged away or reused).
    pub rotor: (u32, u64),
    pub c: Counters,
    pub quantum: u64,
}

/// A span that became wholly free and must go back to the source (after the lock is dropped).
pub(crate) type Release = Option<(u64, u64)>;

impl Inner {
    pub fn new(quantum: u64) -> Inner {
        Inner {
            segs: Segs::new(),
            fl: FreeLists::new(),
            hash: AllocHash::new(quantum.trailing_zeros()),
            spans: BTreeMap::new(),
            rotor: (NIL, 0),
            c: Counters::default(),
            quantum,
        }
    }

    /// Add span `[base, base + size)` (validated by the caller except for overlap).
    pub fn add_span(&mut self, base: u64, size: u64, imported: bool) -> Result<(), VmemError> {
        let end = base + size;
        if let Some((&s, &t)) = self.spans.range(..end).next_back() {
            if s + self.segs.t(t).size > base {
                return Err(VmemError::SpanOverlap { base, size });
            }
        }
        // The span goes before the next span's tag, i.e. after the last segment of the
        // previous span: the list stays in address order.
        let before = self
            .spans
            .range(end..)
            .next()
            .map(|(_, &t)| t)
            .unwrap_or(SENTINEL);
        let st = self.segs.get(Kind::Span, base, size);
        self.segs.tm(st).imported = imported;
        self.segs.insert_before(before, st);
        let ft = self.segs.get(Kind::Free, base, size);
        self.segs.insert_after(st, ft);
        self.fl.insert(&mut self.segs, ft);
        self.spans.insert(base, st);
        self.c.total += size;
        self.c.free += size;
        if imported {
            self.c.imported += size;
            self.c.imports += 1;
        }
        Ok(())
    }

    /// Allocate per `policy`, or `None` if no free segment can serve.
    #[inline]
    pub fn alloc(&mut self, w: &Want, policy: Policy) -> Option<u64> {
        match policy {
            Policy::InstantFit => self.instant_fit(w),
            Policy::BestFit => self.best_fit(w),
            Policy::NextFit => self.next_fit(w),
        }
    }

    /// Bonwick's instant fit: the first segment of the lowest non-empty list whose every
    /// segment is large enough (including the worst-case alignment slop) — one bitmap scan and
    /// one list head. Only if no such list exists (or address constraints reject its
    /// segments) are the lists that *may* hold a fit searched.
    #[inline]
    fn instant_fit(&mut self, w: &Want) -> Option<u64> {
        let q = self.quantum;
        let slop = w.align - q;
        let g = w
            .size
            .checked_add(slop)
            .and_then(guaranteed_bucket)
            .unwrap_or(NLISTS);
        if let Some(hit) = self.first_fit_in(w, g, NLISTS) {
            return Some(hit);
        }
        self.first_fit_in(w, bucket(w.size), g)
    }

    /// First fit over the non-empty lists in `[from, to)`, lowest list first.
    #[inline]
    fn first_fit_in(&mut self, w: &Want, from: usize, to: usize) -> Option<u64> {
        let q = self.quantum;
        let mut b = from;
        loop {
            self.c.work += 1;
            b = self.fl.first_in(b, to)?;
            let mut i = self.fl.heads[b];
            while i != NIL {
                self.c.work += 1;
                let t = self.segs.t(i);
                if let Some(a) = w.fit(t.start, t.end(), q) {
                    self.carve(i, a, w.size);
                    return Some(a);
                }
                i = t.lnext;
            }
            b += 1;
        }
    }

    /// Best fit: the smallest free segment that can serve, searching lists upward from the
    /// one `size` falls in; the first list with a fit has the best one (higher lists hold only
    /// larger segments). Linear in the length of that list.
    fn best_fit(&mut self, w: &Want) -> Option<u64> {
        let q = self.quantum;
        let mut b = bucket(w.size);
        loop {
            self.c.work += 1;
            b = self.fl.first_in(b, NLISTS)?;
            let mut best: Option<(u32, u64, u64)> = None;
            let mut i = self.fl.heads[b];
            while i != NIL {
                self.c.work += 1;
                let t = self.segs.t(i);
                if best.is_none_or(|(_, _, sz)| t.size < sz) {
                    if let Some(a) = w.fit(t.start, t.end(), q) {
                        best = Some((i, a, t.size));
                        if t.size == w.size {
                            break;
                        }
                    }
                }
                i = t.lnext;
            }
            if let Some((i, a, _)) = best {
                self.carve(i, a, w.size);
                return Some(a);
            }
            b += 1;
        }
    }

    /// Next fit (illumos/FreeBSD's rotor): take the lowest fit at or after the end of the
    /// previous next-fit allocation, walking the address list and wrapping once. The
    /// allocator thus cycles through the address space before reusing an address (what
    /// process-ID-like resources want). Linear in the worst case.
    fn next_fit(&mut self, w: &Want) -> Option<u64> {
        let q = self.quantum;
        let r = self.rotor.1;
        let start = self.rotor_tag();
        let t = *self.segs.t(start);
        if t.kind == Kind::Free && r > t.start && r < t.end() {
            if let Some(a) = w.fit(r, t.end(), q) {
                return Some(self.carve_rotor(start, a, w.size));
            }
        }
        let mut i = start;
        loop {
            i = self.segs.t(i).next;
            self.c.work += 1;
            let t = self.segs.t(i);
            if t.kind == Kind::Free {
                if let Some(a) = w.fit(t.start, t.end(), q) {
                    return Some(self.carve_rotor(i, a, w.size));
                }
            }
            if i == start {
                return None;
            }
        }
    }

    fn carve_rotor(&mut self, i: u32, a: u64, size: u64) -> u64 {
        let at = self.carve(i, a, size);
        self.rotor = (at, a + size);
        a
    }

    /// The tag covering address `rotor - 1` (the walk resumes there): the rotor's tag if it
    /// still does, else found through the span map; the list head if the rotor is at 0.
    fn rotor_tag(&mut self) -> u32 {
        let (i, r) = self.rotor;
        if i != NIL {
            let t = self.segs.t(i);
            if matches!(t.kind, Kind::Free | Kind::Alloc) && t.start < r && r <= t.end() {
                return i;
            }
        }
        if r == 0 {
            return SENTINEL;
        }
        let Some((_, &span)) = self.spans.range(..r).next_back() else {
            return SENTINEL;
        };
        if self.segs.t(span).end() < r {
            // In a gap between spans: resume after this span's last segment.
            let after = self
                .spans
                .range(r..)
                .next()
                .map(|(_, &t)| t)
                .unwrap_or(SENTINEL);
            return self.segs.t(after).prev;
        }
        let mut j = self.segs.t(span).next;
        while self.segs.t(j).end() < r {
            self.c.work += 1;
            j = self.segs.t(j).next;
        }
        j
    }

    /// Allocate `[a, a + size)` out of free tag `i`, splitting off free remainders before and
    /// after. Returns the allocated tag.
    #[inline]
    fn carve(&mut self, i: u32, a: u64, size: u64) -> u32 {
        let (s, e) = (self.segs.t(i).start, self.segs.t(i).end());
        if a == s && a + size < e {
            // The common case: the front of a larger segment. The remainder keeps the free
            // tag (and its place on its list, unless its size moves it to another list); a new
            // tag takes the allocation.
            let j = self.segs.get(Kind::Alloc, a, size);
            self.segs.insert_before(i, j);
            self.resize_free(i, a + size, e - a - size);
            return self.allocated(j, size);
        }
        self.fl.remove(&mut self.segs, i);
        let (s, e) = (self.segs.t(i).start, self.segs.t(i).end());
        debug_assert!(s <= a && a + size <= e);
        if a > s {
            let j = self.segs.get(Kind::Free, s, a - s);
            self.segs.insert_before(i, j);
            self.fl.insert(&mut self.segs, j);
        }
        if a + size < e {
            let k = self.segs.get(Kind::Free, a + size, e - a - size);
            self.segs.insert_after(i, k);
            self.fl.insert(&mut self.segs, k);
        }
        let t = self.segs.tm(i);
        t.start = a;
        t.size = size;
        t.kind = Kind::Alloc;
        t.cached = false;
        self.allocated(i, size)
    }

    /// Account for the new allocated tag `i`.
    #[inline(always)]
    fn allocated(&mut self, i: u32, size: u64) -> u32 {
        self.hash.insert(&mut self.segs, i, &mut self.c.work);
        self.c.free -= size;
        self.c.in_use += size;
        self.c.live += 1;
        i
    }

    /// Give free tag `f` (on its free list) a new extent, moving it to another list only if
    /// its size class changes.
    #[inline(always)]
    fn resize_free(&mut self, f: u32, start: u64, size: u64) {
        if bucket(self.segs.t(f).size) != bucket(size) {
            self.fl.remove(&mut self.segs, f);
            let t = self.segs.tm(f);
            t.start = start;
            t.size = size;
            self.fl.insert(&mut self.segs, f);
        } else {
            let t = self.segs.tm(f);
            t.start = start;
            t.size = size;
        }
    }

    /// The allocated tag at `addr`, checked against `size` and the cached state the caller
    /// expects. Changes nothing.
    #[inline]
    pub fn lookup(&mut self, addr: u64, size: u64, cached: bool) -> Result<u32, VmemError> {
        let i = self
            .hash
            .find(&self.segs, addr, &mut self.c.work)
            .ok_or(VmemError::NotAllocated { addr })?;
        Self::check(self.segs.t(i), addr, size, cached)?;
        Ok(i)
    }

    #[inline(always)]
    fn check(t: &super::seg::Tag, addr: u64, size: u64, cached: bool) -> Result<(), VmemError> {
        if t.size != size {
            return Err(VmemError::WrongSize {
                addr,
                size,
                actual: t.size,
            });
        }
        if t.cached != cached {
            return Err(if t.cached {
                VmemError::AlreadyFree { addr }
            } else {
                VmemError::NotCached { addr }
            });
        }
        Ok(())
    }

    /// Mark a segment as held in (or taken out of) a quantum cache.
    pub fn set_cached(&mut self, addr: u64, size: u64, cached: bool) -> Result<(), VmemError> {
        let i = self.lookup(addr, size, !cached)?;
        self.segs.tm(i).cached = cached;
        if cached {
            self.c.cached += 1;
        } else {
            self.c.cached -= 1;
        }
        Ok(())
    }

    /// Free `[addr, addr + size)`: coalesce with free neighbours (never across a span
    /// boundary: span tags sit between spans), and if that leaves an imported span wholly
    /// free and `release` is set, take the span out and return it for the source.
    pub fn free(
        &mut self,
        addr: u64,
        size: u64,
        cached: bool,
        release: bool,
    ) -> Result<Release, VmemError> {
        // Found, checked and unhashed in one walk of the chain; a bad free changes nothing.
        let i = self.hash.take(
            &mut self.segs,
            addr,
            &mut self.c.work,
            |i, segs| Self::check(segs.t(i), addr, size, cached),
            VmemError::NotAllocated { addr },
        )?;
        if cached {
            self.c.cached -= 1;
        }
        self.c.in_use -= size;
        self.c.free += size;
        self.c.live -= 1;
        let (p, n) = (self.segs.t(i).prev, self.segs.t(i).next);
        let pfree = self.segs.t(p).kind == Kind::Free;
        let nfree = self.segs.t(n).kind == Kind::Free;
        // Coalesce into a free neighbour's tag where there is one (it keeps its place on its
        // list unless its size class changes); only a segment with no free neighbour is new
        // on a free list.
        let (f, listed) = match (pfree, nfree) {
            (false, false) => {
                let t = self.segs.tm(i);
                t.kind = Kind::Free;
                t.cached = false;
                (i, false)
            }
            (false, true) => {
                self.segs.unlink(i);
                self.segs.put(i);
                let ns = self.segs.t(n).size;
                self.resize_free(n, addr, ns + size);
                (n, true)
            }
            (true, nfree) => {
                let mut grow = size;
                if nfree {
                    self.fl.remove(&mut self.segs, n);
                    grow += self.segs.t(n).size;
                    self.segs.unlink(n);
                    self.segs.put(n);
                }
                self.segs.unlink(i);
                self.segs.put(i);
                let pt = self.segs.t(p);
                let (ps, psz) = (pt.start, pt.size);
                self.resize_free(p, ps, psz + grow);
                (p, true)
            }
        };
        let i = f;
        let p = self.segs.t(i).prev;
        let n = self.segs.t(i).next;
        let span = *self.segs.t(p);
        if release
            && span.kind == Kind::Span
            && span.imported
            && matches!(self.segs.t(n).kind, Kind::Span | Kind::Sentinel)
        {
            debug_assert_eq!(span.size, self.segs.t(i).size);
            if listed {
                self.fl.remove(&mut self.segs, i);
            }
            self.segs.unlink(i);
            self.segs.put(i);
            self.segs.unlink(p);
            self.segs.put(p);
            self.spans.remove(&span.start);
            self.c.total -= span.size;
            self.c.imported -= span.size;
            self.c.free -= span.size;
            self.c.releases += 1;
            return Ok(Some((span.start, span.size)));
        }
        if !listed {
            self.fl.insert(&mut self.segs, i);
        }
        Ok(None)
    }

    /// If the imported span at `base` is wholly free, take it out (to release it).
    pub fn take_free_span(&mut self, base: u64) -> Release {
        let &st = self.spans.get(&base)?;
        let span = *self.segs.t(st);
        let f = span.next;
        let ft = *self.segs.t(f);
        if !span.imported || ft.kind != Kind::Free || ft.size != span.size {
            return None;
        }
        self.fl.remove(&mut self.segs, f);
        self.segs.unlink(f);
        self.segs.put(f);
        self.segs.unlink(st);
        self.segs.put(st);
        self.spans.remove(&base);
        self.c.total -= span.size;
        self.c.imported -= span.size;
        self.c.free -= span.size;
        self.c.releases += 1;
        Some((base, span.size))
    }

    /// Every imported span (for the arena's destruction).
    pub fn imported_spans(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.spans.values().filter_map(|&t| {
            let t = self.segs.t(t);
            t.imported.then_some((t.start, t.size))
        })
    }

    /// Check every invariant of the state under the lock (docs/INVARIANTS.md, VMEM-1..12).
    pub fn audit(&self) -> Result<(), String> {
        let q = self.quantum;
        let s = &self.segs;
        let mut c = Counters::default();
        let (mut nfree, mut nspans, mut nlisted) = (0usize, 0usize, 1usize);
        let mut prev_end: Option<u64> = None;
        let mut i = s.t(SENTINEL).next;
        if s.t(SENTINEL).kind != Kind::Sentinel {
            return Err("tag 0 is not the sentinel".into());
        }
        while i != SENTINEL {
            let span = s.t(i);
            if span.kind != Kind::Span {
                return Err(format!(
                    "{:?} tag {i} at {:#x} outside any span",
                    span.kind, span.start
                ));
            }
            if let Some(pe) = prev_end {
                if span.start < pe {
                    return Err(format!(
                        "span {:#x} overlaps or is out of order",
                        span.start
                    ));
                }
            }
            if self.spans.get(&span.start) != Some(&i) {
                return Err(format!("span {:#x} not in the span map", span.start));
            }
            if span.size == 0 || !span.start.is_multiple_of(q) || !span.size.is_multiple_of(q) {
                return Err(format!(
                    "span {:#x}+{:#x} empty or not quantum-aligned",
                    span.start, span.size
                ));
            }
            nspans += 1;
            nlisted += 1;
            c.total += span.size;
            if span.imported {
                c.imported += span.size;
            }
            let mut at = span.start;
            let mut prev_free = false;
            let mut j = span.next;
            while matches!(s.t(j).kind, Kind::Free | Kind::Alloc) {
                let t = s.t(j);
                nlisted += 1;
                if s.t(t.next).prev != j || s.t(t.prev).next != j {
                    return Err(format!("address list links broken at tag {j}"));
                }
                if t.start != at {
                    return Err(format!(
                        "segment at {:#x}, expected {at:#x} (gap or overlap)",
                        t.start
                    ));
                }
                if t.size == 0 || !t.size.is_multiple_of(q) || !t.start.is_multiple_of(q) {
                    return Err(format!(
                        "segment {:#x}+{:#x} empty or not quantum-aligned",
                        t.start, t.size
                    ));
                }
                at += t.size;
                if t.kind == Kind::Free {
                    if prev_free {
                        return Err(format!("adjacent free segments at {:#x}", t.start));
                    }
                    if t.cached {
                        return Err(format!("free segment {:#x} marked cached", t.start));
                    }
                    nfree += 1;
                    c.free += t.size;
                } else {
                    c.in_use += t.size;
                    c.live += 1;
                    if t.cached {
                        c.cached += 1;
                    }
                    let mut w = 0;
                    if self.hash.find(s, t.start, &mut w) != Some(j) {
                        return Err(format!("allocated segment {:#x} not in the hash", t.start));
                    }
                }
                prev_free = t.kind == Kind::Free;
                j = t.next;
            }
            if at != span.end() {
                return Err(format!(
                    "span {:#x}: segments end at {at:#x}, span at {:#x}",
                    span.start,
                    span.end()
                ));
            }
            prev_end = Some(span.end());
            i = j;
        }
        if nspans != self.spans.len() {
            return Err(format!(
                "{} spans in the map, {nspans} in the list",
                self.spans.len()
            ));
        }
        // Free lists: exactly the free segments, each in its bucket; bitmap mirrors them.
        let mut listed = 0;
        for b in 0..NLISTS {
            let mut j = self.fl.heads[b];
            if (j != NIL) != (self.fl.bitmap >> b & 1 == 1) {
                return Err(format!("bitmap bit {b} disagrees with list {b}"));
            }
            let mut p = NIL;
            while j != NIL {
                let t = s.t(j);
                if t.kind != Kind::Free || bucket(t.size) != b || t.lprev != p {
                    return Err(format!(
                        "free list {b}: bad tag {j} ({:?}, size {:#x})",
                        t.kind, t.size
                    ));
                }
                listed += 1;
                if listed > nfree {
                    return Err("free lists hold more tags than there are free segments".into());
                }
                p = j;
                j = t.lnext;
            }
        }
        if listed != nfree {
            return Err(format!("{nfree} free segments, {listed} on free lists"));
        }
        let hashed = self.hash.audit(s)?;
        if hashed as u64 != c.live {
            return Err(format!("{} allocated segments, {hashed} hashed", c.live));
        }
        let unused = s.count_free_index()?;
        if unused != s.unused || nlisted + unused != s.tags.len() {
            return Err(format!(
                "slab: {} tags, {nlisted} listed, {unused} unused (counted {})",
                s.tags.len(),
                s.unused
            ));
        }
        let k = &self.c;
        if (k.total, k.imported, k.in_use, k.free, k.live, k.cached)
            != (c.total, c.imported, c.in_use, c.free, c.live, c.cached)
        {
            return Err(format!("counters {k:?} disagree with the segments {c:?}"));
        }
        if k.total != k.in_use + k.free {
            return Err("total != in use + free".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(size: u64, align: u64, phase: u64, nocross: u64, min: u64, max: u64) -> Want {
        Want {
            size,
            align,
            phase,
            nocross,
            min,
            max,
        }
    }

    #[test]
    fn fit_honours_every_constraint() {
        let q = 16;
        assert_eq!(Want::plain(32, q).fit(0, 32, q), Some(0));
        assert_eq!(Want::plain(48, q).fit(0, 32, q), None);
        assert_eq!(w(16, 64, 0, 0, 0, u64::MAX).fit(16, 256, q), Some(64));
        assert_eq!(w(16, 64, 32, 0, 0, u64::MAX).fit(16, 256, q), Some(32));
        assert_eq!(w(16, 64, 32, 0, 0, u64::MAX).fit(48, 256, q), Some(96));
        // 64 bytes must not cross a 128 boundary: 96 would, so 128.
        assert_eq!(w(64, 32, 0, 128, 0, u64::MAX).fit(96, 512, q), Some(128));
        // Alignment 256 with phase 192 and nocross 256: every candidate crosses.
        assert_eq!(w(128, 256, 192, 256, 0, u64::MAX).fit(0, 4096, q), None);
        assert_eq!(w(16, 16, 0, 0, 100, u64::MAX).fit(0, 4096, q), Some(112));
        assert_eq!(w(32, 16, 0, 0, 0, 63).fit(0, 4096, q), Some(0));
        assert_eq!(w(32, 16, 0, 0, 40, 63).fit(0, 4096, q), None);
        // The top of the address space.
        let top = u64::MAX - 15;
        assert_eq!(
            w(16, 16, 0, 0, 0, u64::MAX).fit(top - 16, top, q),
            Some(top - 16)
        );
    }
}
