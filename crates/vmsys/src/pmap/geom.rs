//! The format table, precomputed for the pmap's hot paths.
//!
//! `vmsys_arch::Format` describes a format completely but decodes through patterns and fields;
//! the pmap needs a handful of questions answered in a few instructions (is this entry a table,
//! a leaf, which frame, is it dirty), so they are computed once here from the same table. No
//! format is named in this file: everything is read from the `Format`.

use vmsys_arch::{DirtyModel, Entry, Field, Format, FormatId, Pattern, Prot, PteFlags};

/// The most levels any format has (LA57).
pub const MAX_LEVELS: usize = 5;

/// Per-level facts.
#[derive(Clone, Copy, Debug)]
pub struct LevelGeom {
    pub shift: u32,
    pub entries: usize,
    /// Bytes covered by one entry.
    pub span: u64,
    pub table: Option<Pattern>,
    pub table_addr: u64,
    pub leaf: Option<Pattern>,
    pub leaf_addr: u64,
    /// `table` and `leaf` as patterns that never match when absent, so the hot-path tests are
    /// one AND and one compare.
    pub(crate) table_pat: Pattern,
    pub(crate) leaf_pat: Pattern,
}

/// Matches no entry (`raw & 0` is never 1).
const NEVER: Pattern = Pattern::new(0, 1);

/// A format, precomputed.
#[derive(Debug)]
pub struct Geometry {
    pub fmt: &'static Format,
    pub id: FormatId,
    pub nlevels: usize,
    pub levels: [LevelGeom; MAX_LEVELS],
    /// Bytes per stored entry (4 or 8).
    pub entry_bytes: u64,
    /// Leaf level of each page-size index (`psind` 0 = 4 KiB, 1 = the next larger leaf, ...).
    pub psind_level: [usize; 3],
    pub npsind: usize,
    accessed: Field,
    dirty: DirtyModel,
    writable: Field,
    pub wired_bit: u64,
    pub managed_bit: u64,
    pub no_promote_bit: u64,
    pub promoted_bit: u64,
}

impl Geometry {
    pub fn new(id: FormatId) -> Self {
        let fmt = id.format();
        let empty = LevelGeom {
            shift: 0,
            entries: 0,
            span: 0,
            table: None,
            table_addr: 0,
            leaf: None,
            leaf_addr: 0,
            table_pat: NEVER,
            leaf_pat: NEVER,
        };
        let mut levels = [empty; MAX_LEVELS];
        for (i, l) in fmt.levels.iter().enumerate() {
            levels[i] = LevelGeom {
                shift: l.shift,
                entries: l.entries,
                span: 1u64 << l.shift,
                table: l.table.map(|t| t.pattern),
                table_addr: l.table.map_or(0, |t| t.addr_mask),
                leaf: l.leaf.map(|d| d.pattern),
                leaf_addr: l.leaf.map_or(0, |d| d.addr_mask),
                table_pat: l.table.map_or(NEVER, |t| t.pattern),
                leaf_pat: l.leaf.map_or(NEVER, |d| d.pattern),
            };
        }
        let nlevels = fmt.levels.len();
        let mut psind_level = [usize::MAX; 3];
        let mut npsind = 0;
        for lvl in (0..nlevels).rev() {
            if levels[lvl].leaf.is_some() && npsind < 3 {
                psind_level[npsind] = lvl;
                npsind += 1;
            }
        }
        let sw = &fmt.software;
        Geometry {
            fmt,
            id,
            nlevels,
            levels,
            entry_bytes: fmt.entry_bytes() as u64,
            psind_level,
            npsind,
            accessed: fmt.leaf_attrs.accessed,
            dirty: fmt.leaf_attrs.dirty,
            writable: fmt.leaf_attrs.writable,
            wired_bit: sw.wired,
            managed_bit: sw.managed,
            no_promote_bit: sw.no_promote_bit.unwrap_or(0),
            promoted_bit: sw.promoted_bit.unwrap_or(0),
        }
    }

    /// The last (4 KiB) level.
    #[inline]
    pub fn last(&self) -> usize {
        self.nlevels - 1
    }

    /// Index of `va` in a table at `level`.
    #[inline]
    pub fn index(&self, va: u64, level: usize) -> usize {
        let l = &self.levels[level];
        ((va >> l.shift) as usize) & (l.entries - 1)
    }

    /// How many of `pages` remaining 4 KiB pages a last-level table holds from index `idx`
    /// (the length of a range cursor's run).
    #[inline]
    pub fn run_len(&self, idx: usize, pages: u64) -> usize {
        ((self.levels[self.last()].entries - idx) as u64).min(pages) as usize
    }

    /// Physical address of entry `idx` of the table at `table`.
    #[inline]
    pub fn slot(&self, table: u64, idx: usize) -> u64 {
        table + idx as u64 * self.entry_bytes
    }

    /// The entry points to a table. The pmap stores every invalid entry as 0.
    #[inline]
    pub fn is_table(&self, raw: u64, level: usize) -> bool {
        self.levels[level].table_pat.matches(raw)
    }

    /// The entry is a leaf (a page or a superpage).
    #[inline]
    pub fn is_leaf(&self, raw: u64, level: usize) -> bool {
        self.levels[level].leaf_pat.matches(raw) && !self.is_table(raw, level)
    }

    /// `is_leaf` for an entry already known not to be a table.
    #[inline]
    pub fn is_leaf_not_table(&self, raw: u64, level: usize) -> bool {
        debug_assert!(!self.is_table(raw, level));
        self.levels[level].leaf_pat.matches(raw)
    }

    #[inline]
    pub fn table_pa(&self, raw: u64, level: usize) -> u64 {
        raw & self.levels[level].table_addr
    }

    #[inline]
    pub fn leaf_pa(&self, raw: u64, level: usize) -> u64 {
        raw & self.levels[level].leaf_addr
    }

    /// Whether a table at `level` can hold leaves that `level - 1` could map as one superpage.
    pub fn leaf_size(&self, level: usize) -> Option<u64> {
        self.levels[level].leaf.map(|_| self.levels[level].span)
    }

    #[inline]
    pub fn accessed(&self, raw: u64) -> bool {
        self.accessed.get(raw)
    }

    /// Whether the hardware has recorded a write (x86 D; arm64 with DBM: writable in hardware).
    #[inline]
    pub fn dirty(&self, raw: u64) -> bool {
        match self.dirty {
            DirtyModel::HardwareBit(d) => d.get(raw),
            DirtyModel::Dbm { .. } => self.writable.get(raw),
        }
    }

    /// Whether the mapping permits writes (possibly after a hardware dirty-bit update).
    #[inline]
    pub fn writable(&self, raw: u64) -> bool {
        match self.dirty {
            DirtyModel::HardwareBit(_) => self.writable.get(raw),
            DirtyModel::Dbm { dbm } => dbm.get(raw) || self.writable.get(raw),
        }
    }

    /// The bits that make an entry accessed.
    #[inline]
    pub fn accessed_mask(&self) -> u64 {
        self.accessed.mask
    }

    #[inline]
    pub fn wired(&self, raw: u64) -> bool {
        raw & self.wired_bit != 0
    }

    #[inline]
    pub fn managed(&self, raw: u64) -> bool {
        raw & self.managed_bit != 0
    }

    /// Entry `raw` with the accessed flag cleared.
    #[inline]
    pub fn clear_accessed(&self, raw: u64) -> u64 {
        self.accessed.put(raw, false)
    }

    /// A leaf template for `level` with frame address 0: OR in a frame address to get an entry.
    pub fn leaf_template(
        &self,
        level: usize,
        prot: Prot,
        flags: PteFlags,
        cache: vmsys_arch::CacheMode,
    ) -> Result<u64, vmsys_arch::EncodeError> {
        self.fmt.make_leaf(0, level, prot, flags, cache)
    }

    /// Re-encode leaf `raw` of `from` as a leaf of `to` (promotion and demotion: x86 moves the
    /// PAT bit between 4 KiB and large leaves) at frame `pa`, with `flags` edited by `edit`.
    pub fn reencode_leaf(
        &self,
        raw: u64,
        from: usize,
        to: usize,
        pa: u64,
        edit: impl FnOnce(PteFlags) -> PteFlags,
    ) -> u64 {
        let Entry::Leaf {
            prot, flags, cache, ..
        } = self.fmt.decode(raw, from)
        else {
            panic!("reencode of a non-leaf {raw:#x} at level {from}");
        };
        self.fmt
            .make_leaf(pa, to, prot, edit(flags), cache)
            .expect("a leaf's attributes re-encode at another leaf level of its format")
    }

    /// Write-protect leaf `raw` (which must be a leaf at `level`). Under DBM this also clears
    /// dirty, so callers harvest it first.
    pub fn write_protect(&self, raw: u64, level: usize) -> u64 {
        let Entry::Leaf { prot, .. } = self.fmt.decode(raw, level) else {
            return raw;
        };
        self.fmt
            .with_prot(raw, level, prot - Prot::WRITE)
            .expect("write protection is expressible in every format")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsys_arch::CacheMode;

    #[test]
    fn psind_levels_follow_the_table() {
        for id in FormatId::ALL {
            let g = Geometry::new(id);
            assert_eq!(g.psind_level[0], g.last(), "{id}");
            assert_eq!(g.levels[g.last()].span, 4096, "{id}");
            let sizes: alloc::vec::Vec<u64> = (0..g.npsind)
                .map(|i| g.levels[g.psind_level[i]].span)
                .collect();
            let expect: alloc::vec::Vec<u64> = id.format().leaf_sizes().collect();
            assert_eq!(sizes, expect, "{id}");
        }
    }

    #[test]
    fn fast_predicates_agree_with_decode() {
        for id in FormatId::ALL {
            let g = Geometry::new(id);
            for lvl in 0..g.nlevels {
                if let Some(size) = g.leaf_size(lvl) {
                    let pa = size * 3;
                    let raw = g
                        .fmt
                        .make_leaf(pa, lvl, Prot::WRITE, PteFlags::DIRTY, CacheMode::WriteBack)
                        .unwrap();
                    assert!(g.is_leaf(raw, lvl) && !g.is_table(raw, lvl), "{id} {lvl}");
                    assert_eq!(g.leaf_pa(raw, lvl), pa);
                    assert!(g.dirty(raw) && g.writable(raw));
                    let wp = g.write_protect(raw, lvl);
                    assert!(!g.writable(wp), "{id} {lvl}");
                }
                if lvl < g.last() && g.levels[lvl].table.is_some() {
                    let raw = g.fmt.make_table(0x5000, lvl).unwrap();
                    assert!(g.is_table(raw, lvl) && !g.is_leaf(raw, lvl), "{id} {lvl}");
                    assert_eq!(g.table_pa(raw, lvl), 0x5000);
                }
                assert!(!g.is_table(0, lvl) && !g.is_leaf(0, lvl));
            }
        }
    }
}
