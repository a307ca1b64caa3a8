//! AArch64 stage 1, 4 KiB granule, 48-bit VA and PA, 4 levels (Arm ARM D8).

use crate::format::{
    bit, bits, CacheField, CacheMode, CacheRegister, DirtyModel, ExecModel, Field, Format,
    LeafAttrs, LeafDesc, Level, Pattern, SoftwareBits, TableAttrs, TableDesc, TlbModel, TlbTag,
};
use crate::layout::{Canonical, Halves};
use crate::FormatId;

/// Bits 1:0: `x0` invalid, `11` table (L0-L2) or page (L3), `01` block (L1, L2).
const INVALID: Pattern = Pattern::new(0b01, 0);
const TABLE_OR_PAGE: Pattern = Pattern::new(0b11, 0b11);
const BLOCK: Pattern = Pattern::new(0b11, 0b01);

const ADDR: u64 = bits(47, 12);
/// Leaf bits 50:48: RES0 with 48-bit output addresses (50 is GP with FEAT_BTI,
/// unused here).
const LEAF_RES0: u64 = bits(50, 48);

const TABLE: TableDesc = TableDesc {
    pattern: TABLE_OR_PAGE,
    addr_mask: ADDR,
    reserved: bits(51, 48),
    bits: 0,
};

/// MAIR_EL1 slots: 0 Device-nGnRnE (0x00), 1 Normal non-cacheable (0x44),
/// 2 Normal WB RW-allocate (0xFF), 3 Normal WT RW-allocate (0xBB). Slots
/// 4-7 are 0x00, i.e. Device-nGnRnE too, which keeps decoding total.
const MAIR: u64 = 0x0000_0000_BBFF_4400;

const fn attr_indx(i: u64) -> u64 {
    i << 2
}

const CACHE: CacheField = CacheField {
    mask: bits(4, 2),
    modes: &[
        (CacheMode::WriteBack, attr_indx(2)),
        (CacheMode::WriteThrough, attr_indx(3)),
        (CacheMode::Uncacheable, attr_indx(1)),
        // Normal-NC gathers writes: it is arm64's write-combining.
        (CacheMode::WriteCombining, attr_indx(1)),
        (CacheMode::Device, attr_indx(0)),
        (CacheMode::Device, attr_indx(4)),
        (CacheMode::Device, attr_indx(5)),
        (CacheMode::Device, attr_indx(6)),
        (CacheMode::Device, attr_indx(7)),
    ],
};

/// Below a block's address: RES0 (nT at bit 16 needs FEAT_BBM).
const L1_BLOCK: LeafDesc = LeafDesc::new(30, BLOCK, bits(47, 30), LEAF_RES0 | bits(29, 12), CACHE);
const L2_BLOCK: LeafDesc = LeafDesc::new(21, BLOCK, bits(47, 21), LEAF_RES0 | bits(20, 12), CACHE);
const L3_PAGE: LeafDesc = LeafDesc::new(12, TABLE_OR_PAGE, ADDR, LEAF_RES0, CACHE);

static LEVELS: [Level; 4] = [
    // No L0 block with the 4 KiB granule (without FEAT_LPA2): `01` is invalid.
    Level::new("L0", (39, 9), 8, INVALID, Some(TABLE), None),
    Level::new("L1", (30, 9), 8, INVALID, Some(TABLE), Some(L1_BLOCK)),
    Level::new("L2", (21, 9), 8, INVALID, Some(TABLE), Some(L2_BLOCK)),
    // `01` at L3 is reserved and behaves as invalid.
    Level::new("L3", (12, 9), 8, INVALID, None, Some(L3_PAGE)),
];

pub static ARM64: Format = Format {
    id: FormatId::Arm64,
    levels: &LEVELS,
    pa_bits: 48,
    root_align: 4096,
    canonical: Canonical::SplitTtbr { va_bits: 48 },
    halves: Halves::TtbrPair { va_bits: 48 },
    leaf_attrs: LeafAttrs {
        // AP[2] (bit 7) means read-only.
        writable: Field::inverted(7),
        // AP[1] (bit 6) grants EL0 access.
        user: Field::bit(6),
        exec: ExecModel::Split {
            user: Field::inverted(54),
            privileged: Field::inverted(53),
        },
        accessed: Field::bit(10),
        // nG (bit 11): set means tagged with the ASID.
        global: Field::inverted(11),
        dirty: DirtyModel::Dbm {
            dbm: Field::bit(51),
        },
        fixed: 0b11 << 8,
        shareability: Some(bits(9, 8)),
        contiguous: Some(bit(52)),
        pkey: None,
    },
    table_attrs: Some(TableAttrs {
        pxn_table: bit(59),
        xn_table: bit(60),
        ap_table: bits(62, 61),
        ns_table: bit(63),
    }),
    // 55 wired, 56 managed, 57 no-promote, 58 promoted.
    software: SoftwareBits {
        available: bits(58, 55),
        wired: bit(55),
        managed: bit(56),
        no_promote_bit: Some(bit(57)),
        promoted_bit: Some(bit(58)),
    },
    cache_register: CacheRegister::Mair(MAIR),
    tlb: TlbModel {
        tag: TlbTag::Asid { bits: 16 },
        broadcast_invalidate: true,
        break_before_make: true,
        root_latched_on_switch: false,
        software_access_flag: true,
    },
};
