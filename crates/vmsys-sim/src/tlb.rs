//! A CPU's TLB: one set-associative array per leaf size, entries tagged by PCID/ASID, with
//! global entries that match every tag.
//!
//! The TLB belongs to one CPU and is only touched by whoever holds that CPU (its own thread, or
//! a sender acting for it while it is idle), so it needs no atomics: a hit is a few compares.

use crate::walker::Translation;
use vmsys::platform::TagSel;

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// PCID/ASID the entry was filled under (ignored when the translation is global).
    pub tag: u16,
    pub tr: Translation,
}

impl TlbEntry {
    #[inline]
    fn global(&self) -> bool {
        self.tr.rights.contains(crate::walker::Rights::GLOBAL)
    }
    #[inline]
    fn matches_tag(&self, tag: u16) -> bool {
        self.global() || self.tag == tag
    }
}

const INVALID_KEY: u64 = u64::MAX;

/// The entries of one page size.
#[derive(Clone, Debug)]
struct SizeClass {
    shift: u8,
    set_mask: u64,
    ways: usize,
    /// `va >> shift` of each slot, `INVALID_KEY` when empty: kept apart from the entries so a
    /// lookup scans one small dense array.
    keys: Vec<u64>,
    entries: Vec<TlbEntry>,
    victim: Vec<u8>,
}

impl SizeClass {
    fn new(shift: u8, sets: usize, ways: usize) -> Self {
        assert!(sets.is_power_of_two());
        let empty = TlbEntry {
            tag: 0,
            tr: Translation {
                va_base: 0,
                pa_base: 0,
                shift,
                rights: crate::walker::Rights::empty(),
            },
        };
        SizeClass {
            shift,
            set_mask: sets as u64 - 1,
            ways,
            keys: vec![INVALID_KEY; sets * ways],
            entries: vec![empty; sets * ways],
            victim: vec![0; sets],
        }
    }

    #[inline]
    fn set_of(&self, key: u64) -> usize {
        // Fold in the high bits so the two halves of a 64-bit space do not collide.
        ((key ^ (key >> 17)) & self.set_mask) as usize
    }

    #[inline]
    fn lookup(&self, va: u64, tag: u16) -> Option<&TlbEntry> {
        let key = va >> self.shift;
        let base = self.set_of(key) * self.ways;
        for i in base..base + self.ways {
            if self.keys[i] == key && self.entries[i].matches_tag(tag) {
                return Some(&self.entries[i]);
            }
        }
        None
    }

    fn insert(&mut self, e: TlbEntry) {
        let key = e.tr.va_base >> self.shift;
        let set = self.set_of(key);
        let base = set * self.ways;
        // The fill replaces every entry that would match the same lookups: the page's entries
        // of the same tag, and all of them if either side is global (a refill after a dirty
        // update, say). Replacing only the first such entry would leave two entries answering
        // one lookup.
        let global = e.tr.rights.contains(crate::walker::Rights::GLOBAL);
        for i in base..base + self.ways {
            if self.keys[i] == key
                && (self.entries[i].tag == e.tag || self.entries[i].global() || global)
            {
                self.keys[i] = INVALID_KEY;
            }
        }
        let slot = (base..base + self.ways)
            .find(|&i| self.keys[i] == INVALID_KEY)
            .unwrap_or_else(|| {
                let v = self.victim[set] as usize;
                self.victim[set] = ((v + 1) % self.ways) as u8;
                base + v
            });
        self.keys[slot] = key;
        self.entries[slot] = e;
    }

    fn retain(&mut self, mut keep: impl FnMut(u64, &TlbEntry) -> bool) -> usize {
        let mut dropped = 0;
        for i in 0..self.keys.len() {
            if self.keys[i] != INVALID_KEY && !keep(self.keys[i], &self.entries[i]) {
                self.keys[i] = INVALID_KEY;
                dropped += 1;
            }
        }
        dropped
    }

    fn invalidate_va(&mut self, va: u64, tag: TagSel, current: u16, globals: bool) -> usize {
        let key = va >> self.shift;
        let base = self.set_of(key) * self.ways;
        let mut dropped = 0;
        for i in base..base + self.ways {
            if self.keys[i] != key {
                continue;
            }
            let e = &self.entries[i];
            // Global entries go whatever the tag when the instruction drops them at all.
            let hit = if e.global() {
                globals
            } else {
                match tag {
                    TagSel::Current => e.tag == current,
                    TagSel::Tag(t) => e.tag == t,
                    TagSel::Any => true,
                }
            };
            if hit {
                self.keys[i] = INVALID_KEY;
                dropped += 1;
            }
        }
        dropped
    }
}

/// Geometry of one size class: (page shift, sets, ways).
pub type TlbGeometry = (u8, usize, usize);

/// A TLB with one array per leaf size.
#[derive(Clone, Debug)]
pub struct Tlb {
    classes: Vec<SizeClass>,
}

impl Tlb {
    /// A TLB with the given size classes, smallest page first.
    pub fn new(geometry: &[TlbGeometry]) -> Self {
        Tlb {
            classes: geometry
                .iter()
                .map(|&(s, sets, ways)| SizeClass::new(s, sets, ways))
                .collect(),
        }
    }

    /// The entry that translates `va` for `tag`, if any.
    #[inline]
    pub fn lookup(&self, va: u64, tag: u16) -> Option<&TlbEntry> {
        self.classes.iter().find_map(|c| c.lookup(va, tag))
    }

    /// An entry of another size that overlaps `e` for its tag and maps the overlap to different
    /// frames: two entries translating one address differently are a TLB conflict on arm64.
    /// Larger classes are probed at `e`'s address; smaller ones (only when `e` is a block, which
    /// is rare) are scanned.
    pub fn conflicting(&self, e: &TlbEntry) -> Option<TlbEntry> {
        let (lo, hi) = (e.tr.va_base, e.tr.va_base + (1u64 << e.tr.shift));
        let differs = |o: &TlbEntry| {
            let start = lo.max(o.tr.va_base);
            start < hi.min(o.tr.va_base + (1u64 << o.tr.shift))
                && o.tr.pa_of(start) != e.tr.pa_of(start)
        };
        for c in &self.classes {
            if c.shift > e.tr.shift {
                if let Some(o) = c.lookup(lo, e.tag).filter(|o| differs(o)) {
                    return Some(*o);
                }
            } else if c.shift < e.tr.shift {
                let hit = c
                    .keys
                    .iter()
                    .zip(&c.entries)
                    .filter(|(k, o)| {
                        **k != INVALID_KEY && (o.global() || o.tag == e.tag || e.global())
                    })
                    .map(|(_, o)| o)
                    .find(|o| differs(o));
                if let Some(o) = hit {
                    return Some(*o);
                }
            }
        }
        None
    }

    /// Cache a translation.
    pub fn insert(&mut self, e: TlbEntry) {
        // TLB-2: an entry covers exactly one aligned page of its size.
        debug_assert!(
            e.tr.va_base & ((1u64 << e.tr.shift) - 1) == 0
                && e.tr.pa_base & ((1u64 << e.tr.shift) - 1) == 0,
            "TLB-2: unaligned entry {e:?}"
        );
        if let Some(c) = self.classes.iter_mut().find(|c| c.shift == e.tr.shift) {
            c.insert(e);
        }
    }

    /// Drop the entries for `va` (every size) selected by `tag`, and global ones for `va` if
    /// `globals`.
    pub fn invalidate_va(&mut self, va: u64, tag: TagSel, current: u16, globals: bool) -> usize {
        self.classes
            .iter_mut()
            .map(|c| c.invalidate_va(va, tag, current, globals))
            .sum()
    }

    /// Drop every non-global entry of `tag`.
    pub fn invalidate_tag(&mut self, tag: u16) -> usize {
        self.classes
            .iter_mut()
            .map(|c| c.retain(|_, e| e.global() || e.tag != tag))
            .sum()
    }

    /// Drop every non-global entry.
    pub fn invalidate_non_global(&mut self) -> usize {
        self.classes
            .iter_mut()
            .map(|c| c.retain(|_, e| e.global()))
            .sum()
    }

    /// Drop everything.
    pub fn invalidate_all(&mut self) -> usize {
        self.classes
            .iter_mut()
            .map(|c| c.retain(|_, _| false))
            .sum()
    }

    /// Every valid entry.
    pub fn iter(&self) -> impl Iterator<Item = &TlbEntry> + '_ {
        self.classes.iter().flat_map(|c| {
            c.keys
                .iter()
                .zip(&c.entries)
                .filter(|(k, _)| **k != INVALID_KEY)
                .map(|(_, e)| e)
        })
    }

    /// The number of valid entries.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether the TLB holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walker::Rights;

    fn entry(va: u64, pa: u64, shift: u8, tag: u16, global: bool) -> TlbEntry {
        let mut rights = Rights::KERN_READ | Rights::KERN_WRITE;
        if global {
            rights |= Rights::GLOBAL;
        }
        TlbEntry {
            tag,
            tr: Translation {
                va_base: va,
                pa_base: pa,
                shift,
                rights,
            },
        }
    }

    fn tlb() -> Tlb {
        Tlb::new(&[(12, 16, 4), (21, 4, 4), (30, 1, 4)])
    }

    #[test]
    fn lookup_by_size_and_tag() {
        let mut t = tlb();
        t.insert(entry(0x4000, 0x9000, 12, 1, false));
        t.insert(entry(0x20_0000, 0x40_0000, 21, 1, false));
        assert_eq!(t.lookup(0x4abc, 1).unwrap().tr.pa_of(0x4abc), 0x9abc);
        assert!(t.lookup(0x4abc, 2).is_none(), "another PCID must miss");
        assert_eq!(
            t.lookup(0x3f_fff8, 1).unwrap().tr.pa_of(0x3f_fff8),
            0x5f_fff8
        );
        t.insert(entry(0xffff_8000_0000_0000, 0x1000, 12, 7, true));
        assert!(
            t.lookup(0xffff_8000_0000_0010, 3).is_some(),
            "global entries match every tag"
        );
    }

    #[test]
    fn invalidations() {
        let mut t = tlb();
        t.insert(entry(0x4000, 0x9000, 12, 1, false));
        t.insert(entry(0x4000, 0xa000, 12, 2, false));
        t.insert(entry(0x8000, 0xb000, 12, 1, true));
        assert_eq!(t.invalidate_va(0x4000, TagSel::Current, 1, true), 1);
        assert!(t.lookup(0x4000, 2).is_some());
        assert_eq!(t.invalidate_tag(2), 1);
        assert_eq!(t.invalidate_non_global(), 0);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.invalidate_va(0x8000, TagSel::Tag(9), 1, true),
            1,
            "global entries go by address"
        );
        t.insert(entry(0x8000, 0xb000, 12, 1, true));
        assert_eq!(t.invalidate_all(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn replacement_keeps_sets_bounded() {
        let mut t = Tlb::new(&[(12, 2, 2)]);
        for i in 0..100u64 {
            t.insert(entry(i << 12, i << 12, 12, 0, false));
        }
        assert_eq!(t.len(), 4);
        // A refill of the same page replaces, not duplicates.
        t.insert(entry(99 << 12, 0x5000, 12, 0, false));
        assert_eq!(t.iter().filter(|e| e.tr.va_base == 99 << 12).count(), 1);
    }

    #[test]
    fn conflict_between_sizes() {
        let mut t = tlb();
        t.insert(entry(0x20_0000, 0x80_0000, 12, 1, false));
        let block = entry(0x20_0000, 0x40_0000, 21, 1, false);
        assert!(t.conflicting(&block).is_some());
        // The same frames through a larger page are no conflict (a promotion that kept them).
        let same = entry(0x20_0000, 0x80_0000, 21, 1, false);
        assert!(t.conflicting(&same).is_none());
        assert!(
            t.conflicting(&entry(0x20_0000, 0x40_0000, 21, 2, false))
                .is_none(),
            "other ASID"
        );
    }

    /// The TLB against a model of what may be cached: whatever the sequence of fills and
    /// invalidations, a lookup returns only a translation that was filled for that page and tag
    /// and not invalidated since (the TLB may forget entries, never invent or keep them).
    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Clone, Debug)]
        enum Op {
            Fill {
                page: u64,
                size: u8,
                frame: u64,
                tag: u16,
                global: bool,
            },
            Page {
                va: u64,
                sel: u8,
                tag: u16,
            },
            Tag(u16),
            NonGlobal,
            All,
            Lookup {
                va: u64,
                tag: u16,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            let va = 0u64..(1 << 32);
            prop_oneof![
                4 => (0u64..64, 0u8..3, 0u64..64, 0u16..3, any::<bool>())
                    .prop_map(|(page, size, frame, tag, global)| Op::Fill { page, size, frame, tag, global }),
                2 => (va.clone(), 0u8..3, 0u16..3).prop_map(|(va, sel, tag)| Op::Page { va, sel, tag }),
                1 => (0u16..3).prop_map(Op::Tag),
                1 => Just(Op::NonGlobal),
                1 => Just(Op::All),
                6 => (va, 0u16..3).prop_map(|(va, tag)| Op::Lookup { va, tag }),
            ]
        }

        const SHIFTS: [u8; 3] = [12, 21, 30];

        proptest! {
            #[test]
            fn lookups_never_return_invalidated_entries(ops in proptest::collection::vec(op(), 1..200)) {
                let mut t = Tlb::new(&[(12, 4, 2), (21, 2, 2), (30, 1, 2)]);
                // (shift, va_base, tag or None for global) -> entry: what may legitimately be cached.
                let mut live: HashMap<(u8, u64, Option<u16>), TlbEntry> = HashMap::new();
                let current = 1u16;
                for op in ops {
                    match op {
                        Op::Fill { page, size, frame, tag, global } => {
                            let shift = SHIFTS[size as usize];
                            // Spread pages over the 4 GiB space at this size.
                            let va = (page << shift) & ((1 << 32) - 1);
                            let e = entry(va, frame << shift, shift, tag, global);
                            // A fill replaces what the TLB held for that page and tag.
                            live.retain(|k, _| !(k.0 == shift && k.1 == va && (k.2 == Some(tag) || k.2.is_none() || global)));
                            live.insert((shift, va, if global { None } else { Some(tag) }), e);
                            t.insert(e);
                        }
                        Op::Page { va, sel, tag } => {
                            let sel = [TagSel::Current, TagSel::Tag(tag), TagSel::Any][sel as usize];
                            t.invalidate_va(va, sel, current, true);
                            live.retain(|k, _| {
                                let covers = k.1 == va & !((1u64 << k.0) - 1);
                                let hit = match (k.2, sel) {
                                    (None, _) | (_, TagSel::Any) => true,
                                    (Some(g), TagSel::Current) => g == current,
                                    (Some(g), TagSel::Tag(x)) => g == x,
                                };
                                !(covers && hit)
                            });
                        }
                        Op::Tag(g) => {
                            t.invalidate_tag(g);
                            live.retain(|k, _| k.2 != Some(g));
                        }
                        Op::NonGlobal => {
                            t.invalidate_non_global();
                            live.retain(|k, _| k.2.is_none());
                        }
                        Op::All => {
                            t.invalidate_all();
                            live.clear();
                        }
                        Op::Lookup { va, tag } => {
                            if let Some(e) = t.lookup(va, tag) {
                                let key = (e.tr.shift, e.tr.va_base, if e.global() { None } else { Some(e.tag) });
                                prop_assert_eq!(live.get(&key), Some(e), "lookup({:#x}, {}) returned a dead entry", va, tag);
                                prop_assert!(e.global() || e.tag == tag);
                                prop_assert_eq!(e.tr.va_base, va & !((1u64 << e.tr.shift) - 1));
                            }
                        }
                    }
                }
                let all_live = t.iter().all(|e| {
                    live.get(&(e.tr.shift, e.tr.va_base, if e.global() { None } else { Some(e.tag) })) == Some(e)
                });
                prop_assert!(all_live, "the TLB holds an entry the model says is dead");
            }
        }
    }
}
