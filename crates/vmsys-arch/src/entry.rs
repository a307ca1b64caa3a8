//! Generic encoding and decoding of entries, driven only by the [`Format`] tables.

use crate::format::{CacheMode, DirtyModel, ExecModel, Field, Format, Level, Prot, PteFlags};

/// A decoded entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not valid; hardware ignores the other bits.
    Invalid,
    /// Points at the next-level table.
    Table { pa: u64 },
    /// Maps `size` bytes at `pa`.
    Leaf {
        pa: u64,
        size: u64,
        prot: Prot,
        flags: PteFlags,
        cache: CacheMode,
    },
    /// Valid, but a must-be-zero bit is set: the hardware would fault.
    Reserved { raw: u64 },
}

/// Something a format cannot express.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// A mapping without [`Prot::EXEC`] on a format with no execute control.
    NoExec,
    /// [`PteFlags::DIRTY`] without [`Prot::WRITE`] under [`DirtyModel::Dbm`].
    DirtyReadOnly,
    /// A flag with no bit in this format (e.g. [`PteFlags::NO_PROMOTE_SW`] on i386).
    Flag(PteFlags),
    Cache(CacheMode),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// Level index beyond the format's levels.
    NoSuchLevel(usize),
    /// The level cannot hold a leaf (arm64 L0, amd64 PML4, PAE PDPT).
    NotLeafLevel(usize),
    /// The level cannot point to a table (the last level).
    NotTableLevel(usize),
    /// `pa` is not aligned to `align` (leaf size, or table alignment).
    Misaligned {
        pa: u64,
        align: u64,
    },
    /// `pa` has bits outside the level's address mask.
    PaTooWide {
        pa: u64,
    },
    Unsupported(Feature),
    /// `with_*` on an entry that is not a valid leaf.
    NotLeaf,
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Checks `pa` against an address mask whose lowest set bit is the alignment.
fn check_pa(pa: u64, addr_mask: u64) -> Result<u64, EncodeError> {
    let align = 1u64 << addr_mask.trailing_zeros();
    if pa & (align - 1) != 0 {
        Err(EncodeError::Misaligned { pa, align })
    } else if pa & !addr_mask != 0 {
        Err(EncodeError::PaTooWide { pa })
    } else {
        Ok(pa)
    }
}

impl Format {
    /// Width in bytes of stored entries (uniform across levels in every format).
    pub fn entry_bytes(&self) -> usize {
        self.levels[0].entry_bytes
    }

    pub fn level(&self, level: usize) -> Result<&'static Level, EncodeError> {
        self.levels
            .get(level)
            .ok_or(EncodeError::NoSuchLevel(level))
    }

    /// Index of `va` in a table at `level` (0 = root).
    ///
    /// # Panics
    /// If `level` is out of range.
    pub fn index(&self, va: u64, level: usize) -> usize {
        let l = &self.levels[level];
        ((va >> l.shift) & ((1u64 << l.index_bits) - 1)) as usize
    }

    /// Size mapped by a leaf at `level`, if the level may hold one.
    pub fn leaf_size(&self, level: usize) -> Option<u64> {
        self.levels.get(level)?.leaf.map(|l| l.size)
    }

    /// The level whose leaves map exactly `size` bytes.
    pub fn level_for_size(&self, size: u64) -> Option<usize> {
        self.levels
            .iter()
            .position(|l| l.leaf.is_some_and(|d| d.size == size))
    }

    /// Leaf sizes, smallest first (for superpage policy).
    pub fn leaf_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels
            .iter()
            .rev()
            .filter_map(|l| l.leaf.map(|d| d.size))
    }

    /// Entry at `level` pointing to the next-level table at `pa`.
    pub fn make_table(&self, pa: u64, level: usize) -> Result<u64, EncodeError> {
        let t = self
            .level(level)?
            .table
            .ok_or(EncodeError::NotTableLevel(level))?;
        Ok(t.pattern.value | t.bits | check_pa(pa, t.addr_mask)?)
    }

    /// Whether the hardware enforces `prot` exactly.
    pub fn can_express(&self, prot: Prot) -> bool {
        self.effective_prot(prot) == prot
    }

    /// What the hardware will enforce for a request of `prot`: on a format
    /// without execute control every mapping is executable.
    pub fn effective_prot(&self, prot: Prot) -> Prot {
        match self.leaf_attrs.exec {
            ExecModel::Always => prot | Prot::EXEC,
            _ => prot,
        }
    }

    /// Leaf at `level` mapping `pa`.
    ///
    /// Lenient about execute permission: where the format has no execute
    /// control (i386 2-level) the mapping is executable, as on every real
    /// i386 kernel; [`Format::decode`] then reports [`Prot::EXEC`]. Use
    /// [`Format::make_leaf_strict`] to refuse instead. Everything else the
    /// format cannot express (software flags without a bit, cache modes,
    /// dirty read-only under DBM) is an error, because dropping it silently
    /// would lose state the VM relies on.
    pub fn make_leaf(
        &self,
        pa: u64,
        level: usize,
        prot: Prot,
        flags: PteFlags,
        cache: CacheMode,
    ) -> Result<u64, EncodeError> {
        let leaf = self
            .level(level)?
            .leaf
            .ok_or(EncodeError::NotLeafLevel(level))?;
        let pa = check_pa(pa, leaf.addr_mask)?;
        let cache_bits = leaf
            .cache
            .bits_for(cache)
            .ok_or(EncodeError::Unsupported(Feature::Cache(cache)))?;
        let raw = leaf.pattern.value | self.leaf_attrs.fixed | pa | cache_bits;
        self.put_attrs(raw, prot, flags)
    }

    /// Like [`Format::make_leaf`], but refuses a `prot` the hardware cannot enforce.
    pub fn make_leaf_strict(
        &self,
        pa: u64,
        level: usize,
        prot: Prot,
        flags: PteFlags,
        cache: CacheMode,
    ) -> Result<u64, EncodeError> {
        if !self.can_express(prot) {
            return Err(EncodeError::Unsupported(Feature::NoExec));
        }
        self.make_leaf(pa, level, prot, flags, cache)
    }

    /// Rewrites every abstract attribute of a leaf, leaving address, cache,
    /// and bits not described by an attribute (pkey, contiguous, spare
    /// software bits) untouched.
    fn put_attrs(&self, mut raw: u64, prot: Prot, flags: PteFlags) -> Result<u64, EncodeError> {
        let a = &self.leaf_attrs;
        let write = prot.contains(Prot::WRITE);
        let dirty = flags.contains(PteFlags::DIRTY);
        let user = prot.contains(Prot::USER);
        let exec = prot.contains(Prot::EXEC);
        raw = match a.dirty {
            DirtyModel::HardwareBit(d) => d.put(a.writable.put(raw, write), dirty),
            DirtyModel::Dbm { dbm } => {
                if dirty && !write {
                    return Err(EncodeError::Unsupported(Feature::DirtyReadOnly));
                }
                a.writable.put(dbm.put(raw, write), dirty)
            }
        };
        raw = a.user.put(raw, user);
        raw = match a.exec {
            ExecModel::Always => raw,
            ExecModel::Single(x) => x.put(raw, exec),
            ExecModel::Split {
                user: ux,
                privileged: px,
            } => px.put(ux.put(raw, exec && user), exec && !user),
        };
        for (flag, field) in self.flag_fields() {
            match field {
                Some(f) => raw = f.put(raw, flags.contains(flag)),
                None if flags.contains(flag) => {
                    return Err(EncodeError::Unsupported(Feature::Flag(flag)))
                }
                None => {}
            }
        }
        Ok(raw)
    }

    /// Flags held in one field each; `None` where the format has no bit.
    fn flag_fields(&self) -> [(PteFlags, Option<Field>); 6] {
        let (a, sw) = (&self.leaf_attrs, &self.software);
        [
            (PteFlags::ACCESSED, Some(a.accessed)),
            (PteFlags::GLOBAL, Some(a.global)),
            (PteFlags::WIRED_SW, Some(Field::mask(sw.wired))),
            (PteFlags::MANAGED_SW, Some(Field::mask(sw.managed))),
            (PteFlags::NO_PROMOTE_SW, sw.no_promote_bit.map(Field::mask)),
            (PteFlags::PROMOTED_SW, sw.promoted_bit.map(Field::mask)),
        ]
    }

    /// Decodes `raw` as an entry of a table at `level`.
    ///
    /// # Panics
    /// If `level` is out of range.
    pub fn decode(&self, raw: u64, level: usize) -> Entry {
        let l = &self.levels[level];
        if let Some(t) = l.table.filter(|t| t.pattern.matches(raw)) {
            return if raw & t.reserved != 0 {
                Entry::Reserved { raw }
            } else {
                Entry::Table {
                    pa: raw & t.addr_mask,
                }
            };
        }
        let Some(leaf) = l.leaf.filter(|d| d.pattern.matches(raw)) else {
            return Entry::Invalid;
        };
        let Some(cache) = leaf.cache.mode_of(raw).filter(|_| raw & leaf.reserved == 0) else {
            return Entry::Reserved { raw };
        };
        let (prot, flags) = self.get_attrs(raw);
        Entry::Leaf {
            pa: raw & leaf.addr_mask,
            size: leaf.size,
            prot,
            flags,
            cache,
        }
    }

    fn get_attrs(&self, raw: u64) -> (Prot, PteFlags) {
        let a = &self.leaf_attrs;
        let mut prot = Prot::empty();
        let mut flags = PteFlags::empty();
        let hw_write = a.writable.get(raw);
        let (write, dirty) = match a.dirty {
            DirtyModel::HardwareBit(d) => (hw_write, d.get(raw)),
            DirtyModel::Dbm { dbm } => (hw_write || dbm.get(raw), hw_write),
        };
        let user = a.user.get(raw);
        let exec = match a.exec {
            ExecModel::Always => true,
            ExecModel::Single(x) => x.get(raw),
            ExecModel::Split {
                user: u,
                privileged: p,
            } => if user { u } else { p }.get(raw),
        };
        prot.set(Prot::WRITE, write);
        prot.set(Prot::USER, user);
        prot.set(Prot::EXEC, exec);
        flags.set(PteFlags::DIRTY, dirty);
        for (flag, field) in self.flag_fields() {
            flags.set(flag, field.is_some_and(|f| f.get(raw)));
        }
        (prot, flags)
    }

    /// Physical address held by a valid table or leaf entry.
    pub fn pa(&self, raw: u64, level: usize) -> Option<u64> {
        match self.decode(raw, level) {
            Entry::Table { pa } | Entry::Leaf { pa, .. } => Some(pa),
            Entry::Invalid | Entry::Reserved { .. } => None,
        }
    }

    fn edit_leaf(
        &self,
        raw: u64,
        level: usize,
        f: impl FnOnce(Prot, PteFlags) -> (Prot, PteFlags),
    ) -> Result<u64, EncodeError> {
        self.level(level)?;
        let Entry::Leaf { prot, flags, .. } = self.decode(raw, level) else {
            return Err(EncodeError::NotLeaf);
        };
        let (prot, flags) = f(prot, flags);
        self.put_attrs(raw, prot, flags)
    }

    /// Leaf `raw` with `flags` added. Under [`DirtyModel::Dbm`], setting DIRTY
    /// grants hardware write permission, so the leaf must be writable.
    pub fn with_flags(&self, raw: u64, level: usize, flags: PteFlags) -> Result<u64, EncodeError> {
        self.edit_leaf(raw, level, |p, f| (p, f | flags))
    }

    /// Leaf `raw` with `flags` removed. Clearing DIRTY under DBM write-protects
    /// the page so the next write is seen again.
    pub fn without_flags(
        &self,
        raw: u64,
        level: usize,
        flags: PteFlags,
    ) -> Result<u64, EncodeError> {
        self.edit_leaf(raw, level, |p, f| (p, f - flags))
    }

    /// Leaf `raw` with its protection replaced. Removing WRITE under DBM
    /// also drops DIRTY (a read-only page cannot be dirty there), so harvest
    /// the dirty state first.
    pub fn with_prot(&self, raw: u64, level: usize, prot: Prot) -> Result<u64, EncodeError> {
        let dbm = matches!(self.leaf_attrs.dirty, DirtyModel::Dbm { .. });
        self.edit_leaf(raw, level, |_, mut f| {
            if dbm && !prot.contains(Prot::WRITE) {
                f.remove(PteFlags::DIRTY);
            }
            (prot, f)
        })
    }
}
