//! Paging-structure caches ("walk caches"): the upper-level entries of earlier walks that an MMU
//! keeps so that a later walk can skip the levels above (Intel SDM vol. 3A §4.10.3; the Arm ARM's
//! intermediate translation-table walk caches).
//!
//! An entry records, for a region of VA space and a tag (PCID/ASID), where the table at some
//! level below the root lies and what the levels above it allow. The hardware may go on using an
//! entry after the tables in memory changed, until the entry is invalidated; that is exactly the
//! behaviour the kernel must cope with, so this cache keeps entries until told otherwise.
//!
//! Fixed-size arrays, one set of ways per table level, round-robin replacement: no allocation
//! after construction.

use super::Mode;

/// The deepest table level an entry can point to (amd64 LA57: the page table is level 4).
const MAX_LEVEL: usize = 4;
/// Entries kept per table level.
const WAYS: usize = 32;

/// A cached upper-level paging-structure entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PscEntry {
    /// PCID/ASID at fill time.
    pub tag: u16,
    /// Walk level of the TABLE this entry points to (1.. = below the root).
    pub level: u8,
    /// Start of the VA region the cached upper entry covers (aligned to `1 << shift`; the full
    /// 64-bit VA, so upper-half regions keep their high bits).
    pub va_base: u64,
    /// log2 of that region (e.g. 21 for a cached amd64 PDE, 30 for a PDPTE, 39 for a PML4E).
    pub shift: u8,
    /// PA of the table at `level`.
    pub table_pa: u64,
    /// Rights accumulated from the levels above, in the walker's own encoding: x86: bit 1 = every
    /// R/W above is 1, bit 2 = every U/S above is 1, bit 63 = some XD above is 1; arm64: the OR
    /// of the table descriptors' bits 62:59 (APTable, XNTable, PXNTable).
    pub acc: u64,
    /// arm64: filled from a TTBR1 walk.
    pub upper: bool,
}

impl PscEntry {
    /// Whether the region this entry covers contains `va`.
    #[inline]
    pub fn covers(&self, va: u64) -> bool {
        region(va, self.shift) == region(self.va_base, self.shift)
    }
}

#[inline]
fn region(va: u64, shift: u8) -> u64 {
    va.checked_shr(u32::from(shift)).unwrap_or(0)
}

/// One CPU's paging-structure caches.
#[derive(Clone, Debug)]
pub struct WalkCache {
    /// `slots[l - 1]` holds entries pointing to tables at level `l`.
    slots: [[Option<PscEntry>; WAYS]; MAX_LEVEL],
    /// Round-robin victim per level.
    next: [u8; MAX_LEVEL],
    levels: usize,
}

impl WalkCache {
    /// An empty cache for walks of `levels` paging levels (4 amd64, 5 LA57, 2 i386, 3 PAE,
    /// 4 arm64). Entries for any table level 1..=4 are accepted whatever `levels` says, so the
    /// value only documents the format (see [`WalkCache::levels`]).
    pub fn new(levels: usize) -> Self {
        WalkCache {
            slots: [[None; WAYS]; MAX_LEVEL],
            next: [0; MAX_LEVEL],
            levels,
        }
    }

    /// An empty cache for the walks of `mode`.
    pub fn for_mode(mode: Mode) -> Self {
        Self::new(match mode {
            Mode::Amd64 { la57: false } | Mode::Arm64 => 4,
            Mode::Amd64 { la57: true } => 5,
            Mode::I386 => 2,
            Mode::I386Pae => 3,
        })
    }

    /// The paging depth given to [`WalkCache::new`].
    pub fn levels(&self) -> usize {
        self.levels
    }

    /// The deepest (smallest region) entry for `va` and `tag`.
    pub fn lookup(&self, va: u64, tag: u16) -> Option<PscEntry> {
        self.slots.iter().rev().find_map(|ways| {
            ways.iter()
                .flatten()
                .find(|e| e.tag == tag && e.covers(va))
                .copied()
        })
    }

    /// Insert `e`, replacing an entry with the same tag, level and region, else a free slot,
    /// else the level's round-robin victim. Entries with a level outside 1..=4 are dropped.
    pub fn fill(&mut self, e: PscEntry) {
        let l = e.level as usize;
        if l == 0 || l > MAX_LEVEL {
            return;
        }
        let ways = &mut self.slots[l - 1];
        let same = |s: &Option<PscEntry>| {
            s.is_some_and(|o| o.tag == e.tag && o.va_base == e.va_base && o.upper == e.upper)
        };
        let idx = match ways.iter().position(same) {
            Some(i) => i,
            None => match ways.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    let v = self.next[l - 1] as usize % WAYS;
                    self.next[l - 1] = ((v + 1) % WAYS) as u8;
                    v
                }
            },
        };
        ways[idx] = Some(e);
    }

    /// Drop the entries whose region contains `va`, for `tag` (`None`: every tag).
    pub fn invalidate_va(&mut self, va: u64, tag: Option<u16>) {
        self.retain(|e| !(e.covers(va) && tag.is_none_or(|t| t == e.tag)));
    }

    /// Drop every entry of `tag`.
    pub fn invalidate_tag(&mut self, tag: u16) {
        self.retain(|e| e.tag != tag);
    }

    /// Drop everything.
    pub fn invalidate_all(&mut self) {
        self.slots = [[None; WAYS]; MAX_LEVEL];
        self.next = [0; MAX_LEVEL];
    }

    /// Keep only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&PscEntry) -> bool) {
        for s in self.slots.iter_mut().flatten() {
            if s.is_some_and(|e| !keep(&e)) {
                *s = None;
            }
        }
    }

    /// The entries held, shallowest level first.
    pub fn iter(&self) -> impl Iterator<Item = &PscEntry> {
        self.slots.iter().flatten().flatten()
    }

    /// The number of entries held.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(tag: u16, level: u8, va: u64, shift: u8) -> PscEntry {
        PscEntry {
            tag,
            level,
            va_base: va & !((1u64 << shift) - 1),
            shift,
            table_pa: 0x1000 * u64::from(level) + (va >> shift),
            acc: 0x6,
            upper: false,
        }
    }

    #[test]
    fn lookup_returns_the_deepest_match_for_the_tag() {
        let mut c = WalkCache::for_mode(Mode::Amd64 { la57: false });
        assert!(c.is_empty() && c.levels() == 4);
        let va = 0x0000_7f12_3456_7000;
        c.fill(ent(1, 1, va, 39));
        c.fill(ent(1, 2, va, 30));
        assert_eq!(c.lookup(va, 1), Some(ent(1, 2, va, 30)));
        c.fill(ent(1, 3, va, 21));
        assert_eq!(c.lookup(va, 1), Some(ent(1, 3, va, 21)));
        // Another 2 MiB region under the same PDPTE: the PDPTE entry.
        assert_eq!(c.lookup(va + (1 << 21), 1), Some(ent(1, 2, va, 30)));
        // Another 1 GiB region under the same PML4E.
        assert_eq!(c.lookup(va + (1 << 30), 1), Some(ent(1, 1, va, 39)));
        assert_eq!(c.lookup(va + (1 << 39), 1), None);
        assert_eq!(c.lookup(va, 2), None);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn upper_half_regions_keep_their_high_bits() {
        let mut c = WalkCache::new(4);
        let hi = 0xffff_8000_0000_0000u64;
        let e = PscEntry {
            upper: true,
            ..ent(0, 1, hi, 39)
        };
        c.fill(e);
        assert_eq!(c.lookup(hi + 0x1234_5000, 0), Some(e));
        assert_eq!(c.lookup(0x0000_8000_0000_0000, 0), None);
    }

    #[test]
    fn fill_replaces_the_same_key() {
        let mut c = WalkCache::new(4);
        let va = 0x4000_0000;
        c.fill(ent(0, 3, va, 21));
        let newer = PscEntry {
            table_pa: 0x9000,
            ..ent(0, 3, va, 21)
        };
        c.fill(newer);
        assert_eq!(c.len(), 1);
        assert_eq!(c.lookup(va, 0), Some(newer));
        // Same region and level, other tag: a second entry.
        c.fill(ent(5, 3, va, 21));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn capacity_is_bounded_with_round_robin_replacement() {
        let mut c = WalkCache::new(4);
        for i in 0..(WAYS as u64 + 8) {
            c.fill(ent(0, 3, i << 21, 21));
        }
        assert_eq!(c.len(), WAYS);
        // The first 8 were the victims; the last WAYS remain.
        for i in 0..8u64 {
            assert_eq!(c.lookup(i << 21, 0), None);
        }
        for i in 8..(WAYS as u64 + 8) {
            assert!(c.lookup(i << 21, 0).is_some());
        }
        // Other levels are unaffected.
        c.fill(ent(0, 1, 0, 39));
        assert_eq!(c.len(), WAYS + 1);
        // Out-of-range levels are ignored.
        c.fill(ent(0, 0, 0, 48));
        c.fill(ent(0, 5, 0, 12));
        assert_eq!(c.len(), WAYS + 1);
    }

    #[test]
    fn invalidate_va_drops_entries_whose_region_contains_it() {
        let mut c = WalkCache::new(4);
        let va = 0x0000_0040_0060_0000u64;
        c.fill(ent(1, 1, va, 39));
        c.fill(ent(1, 2, va, 30));
        c.fill(ent(1, 3, va, 21));
        c.fill(ent(1, 3, va + (1 << 21), 21)); // a neighbouring PDE region
        c.fill(ent(2, 3, va, 21)); // another tag
        c.invalidate_va(va + 0x5000, Some(1));
        // The PML4E, PDPTE and PDE entries of tag 1 covering va are gone; the neighbour's PDE
        // entry and tag 2's entry stay.
        let left: Vec<_> = c.iter().copied().collect();
        assert_eq!(left, vec![ent(1, 3, va + (1 << 21), 21), ent(2, 3, va, 21)]);
        c.invalidate_va(va, None);
        assert_eq!(
            c.iter().copied().collect::<Vec<_>>(),
            vec![ent(1, 3, va + (1 << 21), 21)]
        );
    }

    #[test]
    fn invalidate_tag_and_all() {
        let mut c = WalkCache::new(2);
        c.fill(ent(1, 1, 0x40_0000, 22));
        c.fill(ent(2, 1, 0x40_0000, 22));
        c.fill(ent(2, 1, 0x80_0000, 22));
        c.invalidate_tag(2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.lookup(0x40_0000, 1), Some(ent(1, 1, 0x40_0000, 22)));
        c.fill(ent(3, 1, 0, 22));
        c.invalidate_all();
        assert!(c.is_empty());
        assert_eq!(c.len(), 0);
    }
}
