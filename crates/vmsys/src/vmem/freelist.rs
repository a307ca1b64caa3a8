//! Power-of-two free lists and the bitmap of non-empty lists.
//!
//! List `b` holds the free segments whose size is in `[2^b, 2^(b+1))`. Every segment on a list
//! above `floor(log2(n))` (or on that list, when `n` is a power of two) is at least `n` long, so
//! instant fit finds a segment with one bitmap scan and one list head: Bonwick's O(1) policy.
//! The links are the tags' `lprev`/`lnext`, so the lists cost no memory of their own.

use super::seg::{Kind, Segs, NIL};

/// Number of lists: one per bit of a `u64` size.
pub(crate) const NLISTS: usize = 64;

/// The list a segment of `size` bytes is on.
#[inline]
pub(crate) fn bucket(size: u64) -> usize {
    debug_assert!(size > 0);
    63 - size.leading_zeros() as usize
}

/// The lowest list whose every segment is at least `need` bytes, if any.
#[inline]
pub(crate) fn guaranteed_bucket(need: u64) -> Option<usize> {
    let b = bucket(need);
    if need.is_power_of_two() {
        Some(b)
    } else if b + 1 < NLISTS {
        Some(b + 1)
    } else {
        None
    }
}

pub(crate) struct FreeLists {
    pub heads: [u32; NLISTS],
    /// Bit `b` set iff list `b` is non-empty.
    pub bitmap: u64,
}

impl FreeLists {
    pub fn new() -> FreeLists {
        FreeLists {
            heads: [NIL; NLISTS],
            bitmap: 0,
        }
    }

    /// Push free tag `i` on the front of its list (LIFO: the most recently freed, cache-warm
    /// segment is reused first). A free segment that only grows by coalescing or shrinks by
    /// an allocation from its front keeps its tag and its place unless its list changes.
    #[inline]
    pub fn insert(&mut self, segs: &mut Segs, i: u32) {
        debug_assert_eq!(segs.t(i).kind, Kind::Free);
        let b = bucket(segs.t(i).size);
        let h = self.heads[b];
        segs.tm(i).lprev = NIL;
        segs.tm(i).lnext = h;
        if h != NIL {
            segs.tm(h).lprev = i;
        }
        self.heads[b] = i;
        self.bitmap |= 1 << b;
    }

    /// Take free tag `i` off its list (its size must not have changed since `insert`).
    #[inline]
    pub fn remove(&mut self, segs: &mut Segs, i: u32) {
        let b = bucket(segs.t(i).size);
        let (p, n) = (segs.t(i).lprev, segs.t(i).lnext);
        if p != NIL {
            segs.tm(p).lnext = n;
        } else {
            debug_assert_eq!(self.heads[b], i);
            self.heads[b] = n;
            if n == NIL {
                self.bitmap &= !(1 << b);
            }
        }
        if n != NIL {
            segs.tm(n).lprev = p;
        }
        segs.tm(i).lprev = NIL;
        segs.tm(i).lnext = NIL;
    }

    /// The lowest non-empty list in `[from, to)`: one bitmap word scanned.
    #[inline]
    pub fn first_in(&self, from: usize, to: usize) -> Option<usize> {
        if from >= to {
            return None;
        }
        let mut m = self.bitmap >> from << from;
        if to < NLISTS {
            m &= (1u64 << to) - 1;
        }
        if m == 0 {
            None
        } else {
            Some(m.trailing_zeros() as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(4096), 12);
        assert_eq!(bucket(4097), 12);
        assert_eq!(bucket(u64::MAX), 63);
        assert_eq!(guaranteed_bucket(4096), Some(12));
        assert_eq!(guaranteed_bucket(4097), Some(13));
        assert_eq!(guaranteed_bucket(u64::MAX), None);
    }

    #[test]
    fn first_in_respects_bounds() {
        let mut f = FreeLists::new();
        f.bitmap = (1 << 3) | (1 << 10) | (1 << 63);
        assert_eq!(f.first_in(0, 64), Some(3));
        assert_eq!(f.first_in(4, 64), Some(10));
        assert_eq!(f.first_in(4, 10), None);
        assert_eq!(f.first_in(11, 64), Some(63));
        assert_eq!(f.first_in(64, 64), None);
    }
}
