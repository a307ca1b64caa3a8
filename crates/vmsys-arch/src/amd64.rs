//! x86-64 4-level and 5-level (LA57) paging.
//!
//! Physical-address masks assume the architectural maximum of 52 bits; a CPU
//! with a smaller MAXPHYADDR reserves the bits above it as well.

use crate::format::{
    bit, bits, CacheRegister, DirtyModel, ExecModel, Format, LeafAttrs, LeafDesc, Level,
    SoftwareBits, TableDesc, TlbModel, TlbTag,
};
use crate::layout::{Canonical, Halves};
use crate::x86::*;
use crate::FormatId;

const TABLE: TableDesc = TableDesc {
    pattern: TABLE_PS0,
    addr_mask: ADDR_4K,
    reserved: 0,
    bits: TABLE_BITS,
};
/// PML5E/PML4E: bit 7 (PS) is reserved, there are no 512 GiB pages.
const ROOT: TableDesc = TableDesc {
    pattern: PRESENT,
    reserved: PS,
    ..TABLE
};
const LEAF_1G: LeafDesc = LeafDesc::new(30, LEAF_PS1, bits(51, 30), bits(29, 13), CACHE_LARGE);
const LEAF_2M: LeafDesc = LeafDesc::new(21, LEAF_PS1, bits(51, 21), bits(20, 13), CACHE_LARGE);
const LEAF_4K: LeafDesc = LeafDesc::new(12, PRESENT, ADDR_4K, 0, CACHE_4K);

const PML5: Level = Level::new("PML5", (48, 9), 8, INVALID, Some(ROOT), None);
const PML4: Level = Level::new("PML4", (39, 9), 8, INVALID, Some(ROOT), None);
const PDPT: Level = Level::new("PDPT", (30, 9), 8, INVALID, Some(TABLE), Some(LEAF_1G));
const PD: Level = Level::new("PD", (21, 9), 8, INVALID, Some(TABLE), Some(LEAF_2M));
const PT: Level = Level::new("PT", (12, 9), 8, INVALID, None, Some(LEAF_4K));

static LEVELS_4: [Level; 4] = [PML4, PDPT, PD, PT];
static LEVELS_5: [Level; 5] = [PML5, PML4, PDPT, PD, PT];

const LEAF_ATTRS: LeafAttrs = LeafAttrs {
    writable: WRITABLE,
    user: USER,
    exec: ExecModel::Single(EXEC),
    accessed: ACCESSED,
    global: GLOBAL,
    dirty: DirtyModel::HardwareBit(DIRTY),
    fixed: 0,
    shareability: None,
    contiguous: None,
    pkey: Some(bits(62, 59)),
};

/// 9 wired, 10 managed, 11 no-promote, 52 promoted. 53-58 stay free; 59-62
/// are left out of `available` because they are the protection key with
/// CR4.PKE (software may use them only with PKE off).
const SOFTWARE: SoftwareBits = SoftwareBits {
    available: bits(11, 9) | bits(58, 52),
    wired: bit(9),
    managed: bit(10),
    no_promote_bit: Some(bit(11)),
    promoted_bit: Some(bit(52)),
};

const TLB: TlbModel = TlbModel {
    tag: TlbTag::Pcid { bits: 12 },
    broadcast_invalidate: false,
    break_before_make: false,
    root_latched_on_switch: false,
    software_access_flag: false,
};

pub static AMD64: Format = Format {
    id: FormatId::Amd64,
    levels: &LEVELS_4,
    pa_bits: 52,
    root_align: 4096,
    canonical: Canonical::SignExtend { bits: 48 },
    halves: Halves::UpperHalf { va_bits: 48 },
    leaf_attrs: LEAF_ATTRS,
    table_attrs: None,
    software: SOFTWARE,
    cache_register: CacheRegister::Pat(PAT_MSR),
    tlb: TLB,
};

pub static AMD64_LA57: Format = Format {
    id: FormatId::Amd64La57,
    levels: &LEVELS_5,
    canonical: Canonical::SignExtend { bits: 57 },
    halves: Halves::UpperHalf { va_bits: 57 },
    ..AMD64
};
