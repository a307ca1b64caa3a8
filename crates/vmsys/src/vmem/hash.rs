//! The hash of allocated segments, keyed by start address.
//!
//! `free(addr, size)` must find the segment's tag in O(1) whatever the number of live
//! segments, so the table grows (by 4x) when the live count exceeds the bucket count and
//! shrinks (by 4x) when it falls below 1/16 of it: the load factor stays at most 1 and the
//! hysteresis keeps a workload that oscillates around a size from resizing on every operation.
//! Resizing rehashes every chain, so its cost is amortized over the inserts that caused it.
//! Chains are threaded through the tags' `lnext`, so an insert or remove touches no heap.

use alloc::vec;
use alloc::vec::Vec;

use super::seg::{Kind, Segs, NIL};

const MIN_BUCKETS: usize = 16;

pub(crate) struct AllocHash {
    buckets: Vec<u32>,
    /// `64 - log2(buckets.len())`: Fibonacci hashing takes the high bits of the product.
    shift: u32,
    /// Allocations are quantum multiples: the low bits carry no information.
    qshift: u32,
    pub count: usize,
}

impl AllocHash {
    pub fn new(qshift: u32) -> AllocHash {
        AllocHash {
            buckets: vec![NIL; MIN_BUCKETS],
            shift: 64 - MIN_BUCKETS.trailing_zeros(),
            qshift,
            count: 0,
        }
    }

    #[inline]
    fn slot(&self, addr: u64) -> usize {
        ((addr >> self.qshift).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[cfg(test)]
    pub fn nbuckets(&self) -> usize {
        self.buckets.len()
    }

    /// Insert allocated tag `i`; `work` counts the buckets rehashed if the table grows.
    #[inline]
    pub fn insert(&mut self, segs: &mut Segs, i: u32, work: &mut u64) {
        let s = self.slot(segs.t(i).start);
        segs.tm(i).lnext = self.buckets[s];
        self.buckets[s] = i;
        self.count += 1;
        *work += 1;
        if self.count > self.buckets.len() {
            self.resize(segs, self.buckets.len() * 4, work);
        }
    }

    /// The allocated tag starting at `addr`; `work` counts chain entries probed.
    #[inline]
    pub fn find(&self, segs: &Segs, addr: u64, work: &mut u64) -> Option<u32> {
        let mut i = self.buckets[self.slot(addr)];
        while i != NIL {
            *work += 1;
            if segs.t(i).start == addr {
                return Some(i);
            }
            i = segs.t(i).lnext;
        }
        *work += 1;
        None
    }

    /// Find the allocated tag at `addr` and, if `ok` accepts it, unlink it, in one walk of
    /// the chain; `work` counts chain entries probed (as `find` would) plus the unlink.
    #[inline(always)]
    pub fn take<E>(
        &mut self,
        segs: &mut Segs,
        addr: u64,
        work: &mut u64,
        ok: impl FnOnce(u32, &Segs) -> Result<(), E>,
        missing: E,
    ) -> Result<u32, E> {
        let s = self.slot(addr);
        let mut p = NIL;
        let mut i = self.buckets[s];
        loop {
            *work += 1;
            if i == NIL {
                return Err(missing);
            }
            if segs.t(i).start == addr {
                break;
            }
            p = i;
            i = segs.t(i).lnext;
        }
        ok(i, segs)?;
        *work += 1;
        self.unlink(segs, s, p, i, work);
        Ok(i)
    }

    /// Unlink tag `i` of bucket `s`, whose predecessor in the chain is `p` (`NIL`: the head),
    /// and shrink the table if it has become sparse.
    #[inline(always)]
    fn unlink(&mut self, segs: &mut Segs, s: usize, p: u32, i: u32, work: &mut u64) {
        let n = segs.t(i).lnext;
        if p == NIL {
            self.buckets[s] = n;
        } else {
            segs.tm(p).lnext = n;
        }
        segs.tm(i).lnext = NIL;
        self.count -= 1;
        if self.buckets.len() > MIN_BUCKETS && self.count < self.buckets.len() / 16 {
            self.resize(segs, self.buckets.len() / 4, work);
        }
    }

    /// Unlink allocated tag `i` (which must be in the table).
    #[cfg(test)]
    pub fn remove(&mut self, segs: &mut Segs, i: u32, work: &mut u64) {
        let s = self.slot(segs.t(i).start);
        let mut p = NIL;
        let mut j = self.buckets[s];
        while j != i {
            *work += 1;
            debug_assert_ne!(j, NIL, "tag not in the hash");
            p = j;
            j = segs.t(j).lnext;
        }
        *work += 1;
        self.unlink(segs, s, p, i, work);
    }

    fn resize(&mut self, segs: &mut Segs, n: usize, work: &mut u64) {
        let n = n.max(MIN_BUCKETS);
        let old = core::mem::replace(&mut self.buckets, vec![NIL; n]);
        self.shift = 64 - n.trailing_zeros();
        for mut i in old {
            *work += 1;
            while i != NIL {
                let next = segs.t(i).lnext;
                let s = self.slot(segs.t(i).start);
                segs.tm(i).lnext = self.buckets[s];
                self.buckets[s] = i;
                i = next;
                *work += 1;
            }
        }
    }

    /// Every chain holds allocated tags in the right bucket, and the table holds `count` tags.
    pub fn audit(&self, segs: &Segs) -> Result<usize, alloc::string::String> {
        let mut n = 0;
        for (b, &head) in self.buckets.iter().enumerate() {
            let mut i = head;
            while i != NIL {
                let t = segs.t(i);
                if t.kind != Kind::Alloc {
                    return Err(alloc::format!("hash bucket {b} holds a {:?} tag", t.kind));
                }
                if self.slot(t.start) != b {
                    return Err(alloc::format!("hash: {:#x} in bucket {b}", t.start));
                }
                n += 1;
                if n > segs.tags.len() {
                    return Err("hash chain has a cycle".into());
                }
                i = t.lnext;
            }
        }
        if n != self.count {
            return Err(alloc::format!("hash count {} but {n} chained", self.count));
        }
        if self.count > self.buckets.len() {
            return Err(alloc::format!(
                "hash load {} over {} buckets",
                self.count,
                self.buckets.len()
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks_with_live_count() {
        let mut segs = Segs::new();
        let mut h = AllocHash::new(12);
        let mut w = 0;
        let mut ids = Vec::new();
        for k in 0..1000u64 {
            let i = segs.get(Kind::Alloc, k << 12, 4096);
            h.insert(&mut segs, i, &mut w);
            ids.push(i);
        }
        assert!(h.nbuckets() >= 1000);
        h.audit(&segs).unwrap();
        for (k, &i) in ids.iter().enumerate() {
            assert_eq!(h.find(&segs, (k as u64) << 12, &mut w), Some(i));
        }
        assert_eq!(h.find(&segs, 5000 << 12, &mut w), None);
        for &i in &ids {
            h.remove(&mut segs, i, &mut w);
        }
        assert_eq!(h.count, 0);
        assert!(h.nbuckets() <= 64);
        h.audit(&segs).unwrap();
    }
}
