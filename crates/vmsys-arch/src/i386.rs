//! i386 2-level paging (4-byte entries) and PAE (3-level, 8-byte entries).
//!
//! Software bits, both formats: 9 wired, 10 managed, 11 promoted (large
//! leaves). That uses all three available bits, 9-11: 2-level entries have
//! no others, and PAE reserves 62:M (SDM table 4-11), unlike IA-32e where
//! 62:52 are free. So neither has a spare for a no-promote marker; a pmap on
//! these formats must keep transient mappings out of promotable ranges (e.g.
//! allocate them from superpage-aligned arenas) instead. Promoted wins the
//! bit because demotion otherwise needs a separate record per superpage.

use crate::format::{
    bit, bits, CacheRegister, DirtyModel, ExecModel, Format, LeafAttrs, LeafDesc, Level,
    SoftwareBits, TableDesc, TlbModel, TlbTag,
};
use crate::layout::{Canonical, Halves};
use crate::x86::*;
use crate::FormatId;

/// 4-byte entries are held in a `u64`; the upper half must stay clear.
const HIGH: u64 = bits(63, 32);
const PD_TABLE: TableDesc = TableDesc {
    pattern: TABLE_PS0,
    addr_mask: bits(31, 12),
    reserved: HIGH,
    bits: TABLE_BITS,
};
/// 4 MiB pages need CR4.PSE. Bits 21:13 are reserved without PSE-36 (which
/// would put PA 39:32 in 20:13); the format stays at 32-bit PAs.
const LEAF_4M: LeafDesc =
    LeafDesc::new(22, LEAF_PS1, bits(31, 22), HIGH | bits(21, 13), CACHE_LARGE);
const LEAF_4K: LeafDesc = LeafDesc::new(12, PRESENT, bits(31, 12), HIGH, CACHE_4K);

static LEVELS_2: [Level; 2] = [
    Level::new("PD", (22, 10), 4, INVALID, Some(PD_TABLE), Some(LEAF_4M)),
    Level::new("PT", (12, 10), 4, INVALID, None, Some(LEAF_4K)),
];

/// PAE bits 62:52 are reserved (63 is XD).
const PAE_HIGH: u64 = bits(62, 52);
/// The four PDPTEs are loaded into registers on a CR3 write and carry only
/// P, PWT, PCD and the address; 2:1, 8:5 and 63:52 are reserved.
const PDPTE: TableDesc = TableDesc {
    pattern: PRESENT,
    addr_mask: ADDR_4K,
    reserved: bits(2, 1) | bits(8, 5) | bits(63, 52),
    bits: 0,
};
const PAE_TABLE: TableDesc = TableDesc {
    addr_mask: ADDR_4K,
    reserved: PAE_HIGH,
    ..PD_TABLE
};
const PAE_2M: LeafDesc = LeafDesc::new(
    21,
    LEAF_PS1,
    bits(51, 21),
    PAE_HIGH | bits(20, 13),
    CACHE_LARGE,
);
const PAE_4K: LeafDesc = LeafDesc::new(12, PRESENT, ADDR_4K, PAE_HIGH, CACHE_4K);

static LEVELS_PAE: [Level; 3] = [
    Level::new("PDPT", (30, 2), 8, INVALID, Some(PDPTE), None),
    Level::new("PD", (21, 9), 8, INVALID, Some(PAE_TABLE), Some(PAE_2M)),
    Level::new("PT", (12, 9), 8, INVALID, None, Some(PAE_4K)),
];

const SOFTWARE: SoftwareBits = SoftwareBits {
    available: bits(11, 9),
    wired: bit(9),
    managed: bit(10),
    no_promote_bit: None,
    promoted_bit: Some(bit(11)),
};

const TLB: TlbModel = TlbModel {
    tag: TlbTag::None,
    broadcast_invalidate: false,
    break_before_make: false,
    root_latched_on_switch: false,
    software_access_flag: false,
};

pub static I386: Format = Format {
    id: FormatId::I386,
    levels: &LEVELS_2,
    pa_bits: 32,
    root_align: 4096,
    canonical: Canonical::Bits32,
    halves: Halves::Split32,
    leaf_attrs: LeafAttrs {
        writable: WRITABLE,
        user: USER,
        // No execute-disable in 2-level paging.
        exec: ExecModel::Always,
        accessed: ACCESSED,
        global: GLOBAL,
        dirty: DirtyModel::HardwareBit(DIRTY),
        fixed: 0,
        shareability: None,
        contiguous: None,
        pkey: None,
    },
    table_attrs: None,
    software: SOFTWARE,
    cache_register: CacheRegister::Pat(PAT_MSR),
    tlb: TLB,
};

pub static I386_PAE: Format = Format {
    id: FormatId::I386Pae,
    levels: &LEVELS_PAE,
    pa_bits: 52,
    // CR3 holds a 32-byte-aligned PDPT.
    root_align: 32,
    leaf_attrs: LeafAttrs {
        exec: ExecModel::Single(EXEC),
        ..I386.leaf_attrs
    },
    tlb: TlbModel {
        root_latched_on_switch: true,
        ..TLB
    },
    ..I386
};
