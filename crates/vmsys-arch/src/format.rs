//! The vocabulary in which a page-table format is written down.
//!
//! Everything here is plain data. The generic code in [`crate::entry`] and
//! [`crate::layout`] interprets it, so a new format is a new `static Format`.

use crate::layout::{Canonical, Halves};
use crate::FormatId;

/// Bits `hi..=lo` set, for writing masks the way the manuals print them.
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Bit `n` set.
pub(crate) const fn bit(n: u32) -> u64 {
    1 << n
}

/// A descriptor-type pattern: an entry is of this type iff `raw & mask == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub mask: u64,
    pub value: u64,
}

impl Pattern {
    pub const fn new(mask: u64, value: u64) -> Self {
        Self { mask, value }
    }

    pub const fn matches(self, raw: u64) -> bool {
        raw & self.mask == self.value
    }
}

/// One abstract boolean attribute stored in `mask`.
///
/// Polarity is data: arm64 AP\[2\] means *read-only*, so "writable" is
/// `when_set: 0, when_clear: bit 7`; x86 XD likewise inverts "executable".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub mask: u64,
    pub when_set: u64,
    pub when_clear: u64,
}

impl Field {
    /// Active-high single bit.
    pub const fn bit(n: u32) -> Self {
        Self {
            mask: bit(n),
            when_set: bit(n),
            when_clear: 0,
        }
    }

    /// Active-high bits `mask` (software bits).
    pub const fn mask(mask: u64) -> Self {
        Self {
            mask,
            when_set: mask,
            when_clear: 0,
        }
    }

    /// Active-low single bit (the bit *disables* the property).
    pub const fn inverted(n: u32) -> Self {
        Self {
            mask: bit(n),
            when_set: 0,
            when_clear: bit(n),
        }
    }

    /// `raw` with this field rewritten to say `on`.
    pub const fn put(self, raw: u64, on: bool) -> u64 {
        (raw & !self.mask) | if on { self.when_set } else { self.when_clear }
    }

    /// Whether `raw` says the property holds.
    pub const fn get(self, raw: u64) -> bool {
        raw & self.mask == self.when_set
    }
}

/// How a leaf controls instruction fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecModel {
    /// No control at all: every valid leaf is executable (i386 2-level).
    Always,
    /// One control for every privilege level (x86 XD, bit 63).
    Single(Field),
    /// One control per privilege level (arm64 UXN / PXN). The control of the
    /// privilege that does not own the mapping is always set to "no execute",
    /// so the kernel never runs user pages and vice versa.
    Split { user: Field, privileged: Field },
}

/// How the dirty state of a leaf is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyModel {
    /// A bit the MMU sets on the first write (x86 D); independent of writability.
    HardwareBit(Field),
    /// arm64 FEAT_HAFDBS: `dbm` marks the page *logically* writable and the
    /// format's `writable` field (AP\[2\]) doubles as the dirty state, because
    /// hardware (or the fault handler) grants write permission on the first
    /// write: writable-clean = DBM 1 + AP\[2\] 1, writable-dirty = DBM + AP\[2\] 0.
    /// A read-only page therefore cannot be dirty.
    Dbm { dbm: Field },
}

/// Memory types a mapping can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheMode {
    WriteBack,
    WriteThrough,
    WriteCombining,
    WriteProtect,
    /// Uncached normal memory (x86 UC, arm64 Normal-NC).
    Uncacheable,
    /// Memory-mapped I/O: no gathering, reordering or speculation.
    Device,
}

impl CacheMode {
    pub const ALL: [CacheMode; 6] = [
        CacheMode::WriteBack,
        CacheMode::WriteThrough,
        CacheMode::WriteCombining,
        CacheMode::WriteProtect,
        CacheMode::Uncacheable,
        CacheMode::Device,
    ];
}

/// The cache-attribute bits of one leaf level.
///
/// `modes` maps each supported mode to its bit pattern within `mask`. Encoding
/// uses the first pair with that mode; decoding the first pair with those
/// bits, so aliases (x86 Device = UC) follow the canonical pair. Every pattern
/// within `mask` should appear so that decoding is total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheField {
    pub mask: u64,
    pub modes: &'static [(CacheMode, u64)],
}

impl CacheField {
    pub fn bits_for(&self, mode: CacheMode) -> Option<u64> {
        self.modes.iter().find(|(m, _)| *m == mode).map(|&(_, b)| b)
    }

    pub fn mode_of(&self, raw: u64) -> Option<CacheMode> {
        let b = raw & self.mask;
        self.modes.iter().find(|(_, v)| *v == b).map(|&(m, _)| m)
    }
}

/// The register that gives the cache-attribute bits their meaning; the
/// per-level [`CacheField`] tables assume it holds exactly this value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRegister {
    /// IA32_PAT (MSR 0x277).
    Pat(u64),
    /// MAIR_EL1.
    Mair(u64),
}

/// A table-pointer descriptor at one level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableDesc {
    pub pattern: Pattern,
    /// Address bits of the next-level table; its lowest bit gives the alignment.
    pub addr_mask: u64,
    /// Must-be-zero bits; a present entry with any set is malformed.
    pub reserved: u64,
    /// Bits [`crate::Format::make_table`] sets besides the pattern. On x86 the
    /// table entries are permissive (RW, US) so the leaf alone decides access.
    pub bits: u64,
}

/// A leaf (page or block) descriptor at one level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafDesc {
    pub size: u64,
    pub pattern: Pattern,
    pub addr_mask: u64,
    pub reserved: u64,
    /// Per level because x86 PAT moves from bit 7 (4 KiB) to bit 12 (large).
    pub cache: CacheField,
}

impl LeafDesc {
    /// A leaf mapping `1 << shift` bytes.
    pub const fn new(
        shift: u32,
        pattern: Pattern,
        addr_mask: u64,
        reserved: u64,
        cache: CacheField,
    ) -> Self {
        Self {
            size: 1 << shift,
            pattern,
            addr_mask,
            reserved,
            cache,
        }
    }
}

/// One level of the tree; index 0 of [`Format::levels`] is the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub name: &'static str,
    /// Lowest VA bit this level indexes.
    pub shift: u32,
    pub index_bits: u32,
    pub entries: usize,
    /// 4 or 8; entries are handled as `u64` and stored with this width.
    pub entry_bytes: usize,
    /// The canonical invalid encoding. Anything matching neither `table` nor
    /// `leaf` is invalid too (arm64 `01` at L3 or L0).
    pub invalid: Pattern,
    pub table: Option<TableDesc>,
    pub leaf: Option<LeafDesc>,
}

impl Level {
    pub const fn new(
        name: &'static str,
        (shift, index_bits): (u32, u32),
        entry_bytes: usize,
        invalid: Pattern,
        table: Option<TableDesc>,
        leaf: Option<LeafDesc>,
    ) -> Self {
        let entries = 1 << index_bits;
        Self {
            name,
            shift,
            index_bits,
            entries,
            entry_bytes,
            invalid,
            table,
            leaf,
        }
    }
}

/// Leaf attributes shared by every leaf level of a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafAttrs {
    pub writable: Field,
    pub user: Field,
    pub exec: ExecModel,
    pub accessed: Field,
    /// x86 G needs CR4.PGE; arm64 nG is inverted and scoped by the ASID.
    pub global: Field,
    pub dirty: DirtyModel,
    /// Set on every leaf made (arm64: SH = inner shareable, since all CPUs
    /// of the machine are in one coherent domain). Not interpreted on decode.
    pub fixed: u64,
    /// Shareability field, if the format has one (arm64 SH, 9:8).
    pub shareability: Option<u64>,
    /// arm64 contiguous hint (bit 52): 16 adjacent aligned entries may share a TLB entry.
    pub contiguous: Option<u64>,
    /// amd64 protection key (62:59), meaningful with CR4.PKE.
    pub pkey: Option<u64>,
}

/// Hierarchical attributes of arm64 table descriptors, which restrict
/// everything below them. This crate leaves them zero (no restriction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableAttrs {
    pub pxn_table: u64,
    pub xn_table: u64,
    pub ap_table: u64,
    pub ns_table: u64,
}

/// Bits the hardware ignores and the VM uses for its own bookkeeping.
///
/// Masks, not bit numbers. `available` is every software-available bit of
/// a leaf; the named ones are the assignments this project uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftwareBits {
    pub available: u64,
    /// Mapping is wired (not pageable); speeds up unwire and pmap accounting.
    pub wired: u64,
    /// The page is managed (has pv entries), so removal must update them.
    pub managed: u64,
    /// The mapping must never be promoted into a superpage (transient kernel
    /// mappings such as qenter, which are torn down without demotion).
    pub no_promote_bit: Option<u64>,
    /// On superpage leaves: made by promotion, so the page-table page it
    /// replaced was kept and demotion can reuse it.
    pub promoted_bit: Option<u64>,
}

/// Tag that lets TLB entries of several address spaces coexist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbTag {
    None,
    /// x86 PCID in CR3 11:0 (CR4.PCIDE).
    Pcid {
        bits: u32,
    },
    /// arm64 ASID in TTBR 63:48 (16 bits with TCR.AS).
    Asid {
        bits: u32,
    },
}

/// What the TLB asks of software.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbModel {
    pub tag: TlbTag,
    /// Hardware broadcasts invalidations (arm64 TLBI ...IS); x86 needs IPIs.
    pub broadcast_invalidate: bool,
    /// A valid entry may not be changed in place between table/block or to
    /// another address: invalidate, flush, then write (arm64).
    pub break_before_make: bool,
    /// Root entries are latched into registers on a root-pointer write (PAE
    /// PDPTEs on a CR3 load), so changing one needs a reload.
    pub root_latched_on_switch: bool,
    /// The accessed flag may be software-managed: a clear flag faults instead
    /// of being set by hardware (arm64 without TCR.HA).
    pub software_access_flag: bool,
}

/// A complete page-table format.
#[derive(Debug, PartialEq, Eq)]
pub struct Format {
    pub id: FormatId,
    pub levels: &'static [Level],
    /// Largest physical address width the format can encode.
    pub pa_bits: u32,
    /// Alignment of the root table (the PAE PDPT is only 32-byte aligned).
    pub root_align: u64,
    pub canonical: Canonical,
    pub halves: Halves,
    pub leaf_attrs: LeafAttrs,
    pub table_attrs: Option<TableAttrs>,
    pub software: SoftwareBits,
    pub cache_register: CacheRegister,
    pub tlb: TlbModel,
}

bitflags::bitflags! {
    /// Access rights of a mapping. Read is implied by a valid leaf.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: u8 {
        const WRITE = 1 << 0;
        const EXEC = 1 << 1;
        const USER = 1 << 2;
    }
}

bitflags::bitflags! {
    /// Format-independent leaf flags; `_SW` ones live in software bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u8 {
        const GLOBAL = 1 << 0;
        const ACCESSED = 1 << 1;
        const DIRTY = 1 << 2;
        const WIRED_SW = 1 << 3;
        const MANAGED_SW = 1 << 4;
        const NO_PROMOTE_SW = 1 << 5;
        const PROMOTED_SW = 1 << 6;
    }
}
