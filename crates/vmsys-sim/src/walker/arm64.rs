//! The arm64 walker: VMSAv8-64 stage 1, EL1&0 regime, 4 KiB granule, T0SZ = T1SZ = 16 (48-bit
//! VAs, four levels L0-L3). Written from the Arm ARM, chapter D8 (translation table descriptor
//! formats, hierarchical permissions, the Access flag, hardware management of dirty state,
//! fault prioritisation).
//!
//! Choices and readings of the manual:
//! - Fault priority within the walk: per level, Address size (here `ReservedBit`) and
//!   Translation (`NotPresent`) faults, then on the final descriptor the Access flag fault, then
//!   the Permission fault: an access that both lacks AF (without TCR.HA) and lacks permission
//!   reports `AccessFlag`.
//! - With TCR.HA, AF is set (and with TCR.HD, AP[2] cleared for a write to a writable-clean
//!   entry) only when the access is permitted: a faulting walk changes nothing. One
//!   compare-and-exchange does both; if the descriptor changed meanwhile, the walk starts again.
//! - A block descriptor with nonzero output-address bits below the block size, and any output or
//!   next-level table address at or above `pa_bits`, report `ReservedBit` (the Address size
//!   fault; also for the TTBR base, at level 0). Descriptor bits 51:48 are not address bits here.
//! - Rights: a writable-clean entry (DBM = 1, AP[2] = 1, TCR.HD) counts as writable, without
//!   DIRTY; an EL0-writable page (writable-clean included) is never EL1-executable, so the
//!   rights do not change when the hardware marks the entry dirty.
//! - Walk-cache entries are made for every valid table descriptor read (L0, L1, L2), also on a
//!   walk that faults further down, tagged with `regs.tag` and with `upper` for TTBR1 walks.

use vmsys::platform::{AccessKind, FaultReason};

use super::{MmuRegs, PscEntry, Rights, Translation, WalkCache, WalkResult, WalkStats};
use crate::mem::PhysMem;

/// Descriptor bit 0: valid.
const VALID: u64 = 1 << 0;
/// Descriptor bit 1: table (L0-L2) or page (L3); 0 = block (L1, L2).
const TABLE_OR_PAGE: u64 = 1 << 1;
/// AP[1]: access from EL0.
const AP_EL0: u64 = 1 << 6;
/// AP[2]: read-only.
const AP_RO: u64 = 1 << 7;
/// Access flag.
const AF: u64 = 1 << 10;
/// not Global.
const NG: u64 = 1 << 11;
/// Dirty Bit Modifier.
const DBM: u64 = 1 << 51;
/// Privileged execute-never.
const PXN: u64 = 1 << 53;
/// Unprivileged execute-never.
const UXN: u64 = 1 << 54;
/// Table descriptors: PXNTable.
const PXN_TABLE: u64 = 1 << 59;
/// Table descriptors: XNTable (UXNTable in the EL1&0 regime).
const XN_TABLE: u64 = 1 << 60;
/// Table descriptors: APTable[0], no EL0 access below.
const AP_TABLE_NO_EL0: u64 = 1 << 61;
/// Table descriptors: APTable[1], read-only below.
const AP_TABLE_RO: u64 = 1 << 62;
/// The hierarchical attributes that accumulate (NSTable, bit 63, is not modelled).
const TABLE_ATTRS: u64 = PXN_TABLE | XN_TABLE | AP_TABLE_NO_EL0 | AP_TABLE_RO;
/// Output address / next-level table address, bits 47:12.
const OA: u64 = 0x0000_ffff_ffff_f000;
/// The deepest level (L3).
const LAST: u8 = 3;

/// How many times a walk starts again after losing an AF/dirty compare-and-exchange.
const MAX_RESTARTS: u32 = 16;

/// log2 of the VA region one descriptor at `level` covers.
#[inline]
fn shift(level: u8) -> u32 {
    12 + 9 * u32::from(LAST - level)
}

/// Whether `addr` fits the output-address size (`pa_bits`, at most 48).
#[inline]
fn pa_ok(regs: &MmuRegs, addr: u64) -> bool {
    let bits = u32::from(regs.pa_bits).min(48);
    addr >> bits == 0
}

/// The root for `va` (TTBR0 or TTBR1 base) and whether it is TTBR1; `None` if `va` lies in
/// neither half.
#[inline]
fn select_root(regs: &MmuRegs, va: u64) -> Option<(u64, bool)> {
    match va >> 48 {
        0 => Some((regs.root & OA, false)),
        0xffff => Some((regs.kernel_root & OA, true)),
        _ => None,
    }
}

struct Leaf {
    level: u8,
    shift: u32,
    pa_base: u64,
    /// The descriptor's address and value.
    pa: u64,
    desc: u64,
    /// Table attributes accumulated from the levels above.
    acc: u64,
}

#[derive(Clone, Copy)]
struct Start {
    level: u8,
    table: u64,
    acc: u64,
}

/// Walk from `start` to the leaf descriptor for `va`: validity, descriptor types and address
/// sizes, table attributes, cache fills; no AF, permission or dirty handling.
#[allow(clippy::too_many_arguments)]
fn descend(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    upper: bool,
    start: Start,
    mut cache: Option<&mut WalkCache>,
    stats: &mut WalkStats,
) -> Result<Leaf, FaultReason> {
    let Start {
        mut level,
        mut table,
        mut acc,
    } = start;
    if !pa_ok(regs, table) {
        return Err(FaultReason::ReservedBit { level });
    }
    loop {
        let sh = shift(level);
        let pa = table + ((va >> sh) & 0x1ff) * 8;
        let d = mem.load_u64(pa);
        stats.reads += 1;
        if d & VALID == 0 {
            return Err(FaultReason::NotPresent { level });
        }
        if level < LAST && d & TABLE_OR_PAGE != 0 {
            let next = d & OA;
            if !pa_ok(regs, next) {
                return Err(FaultReason::ReservedBit { level });
            }
            acc |= d & TABLE_ATTRS;
            table = next;
            level += 1;
            if let Some(c) = cache.as_deref_mut() {
                c.fill(PscEntry {
                    tag: regs.tag,
                    level,
                    va_base: va & !((1u64 << sh) - 1),
                    shift: sh as u8,
                    table_pa: next,
                    acc,
                    upper,
                });
            }
            continue;
        }
        // Block at L1/L2, page at L3; `01` at L0 (no L0 blocks with a 4 KiB granule and 48-bit
        // OAs) and at L3 is invalid.
        if level == 0 || (level == LAST && d & TABLE_OR_PAGE == 0) {
            return Err(FaultReason::NotPresent { level });
        }
        let oa = d & OA;
        if oa & ((1u64 << sh) - 1) != 0 || !pa_ok(regs, oa) {
            return Err(FaultReason::ReservedBit { level });
        }
        return Ok(Leaf {
            level,
            shift: sh,
            pa_base: oa,
            pa,
            desc: d,
            acc,
        });
    }
}

/// The rights of leaf descriptor `d` under table attributes `acc`.
fn rights(regs: &MmuRegs, acc: u64, d: u64) -> Rights {
    let el0 = d & AP_EL0 != 0 && acc & AP_TABLE_NO_EL0 == 0;
    let writable = acc & AP_TABLE_RO == 0 && (d & AP_RO == 0 || (regs.hw_dbm && d & DBM != 0));
    let user_write = el0 && writable;
    let mut r = Rights::KERN_READ;
    if el0 {
        r |= Rights::USER_READ;
    }
    if user_write {
        r |= Rights::USER_WRITE;
    }
    if writable {
        r |= Rights::KERN_WRITE;
    }
    if d & UXN == 0 && acc & XN_TABLE == 0 {
        r |= Rights::USER_EXEC;
    }
    if d & PXN == 0 && acc & PXN_TABLE == 0 && !user_write {
        r |= Rights::KERN_EXEC;
    }
    if d & AP_RO == 0 {
        r |= Rights::DIRTY;
    }
    if d & NG == 0 {
        r |= Rights::GLOBAL;
    }
    r
}

fn translation(regs: &MmuRegs, va: u64, leaf: &Leaf, desc: u64) -> Translation {
    Translation {
        va_base: va & !((1u64 << leaf.shift) - 1),
        pa_base: leaf.pa_base,
        shift: leaf.shift as u8,
        rights: rights(regs, leaf.acc, desc),
    }
}

/// Walk for an access (see [`super::walk`]).
pub(super) fn walk(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    kind: AccessKind,
    user: bool,
    mut cache: Option<&mut WalkCache>,
) -> WalkResult {
    let mut stats = WalkStats::default();
    let Some((root, upper)) = select_root(regs, va) else {
        return WalkResult {
            result: Err(FaultReason::NonCanonical),
            stats,
            psc_used: None,
        };
    };
    let write = kind == AccessKind::Write;
    let mut attempt = 0;
    loop {
        let hit = cache
            .as_deref()
            .and_then(|c| c.lookup(va, regs.tag))
            .filter(|e| e.upper == upper && (1..=LAST).contains(&e.level));
        stats.psc_hit = hit.is_some();
        let start = match hit {
            Some(e) => Start {
                level: e.level,
                table: e.table_pa,
                acc: e.acc,
            },
            None => Start {
                level: 0,
                table: root,
                acc: 0,
            },
        };
        let done = |result, stats| WalkResult {
            result,
            stats,
            psc_used: hit,
        };
        let leaf = match descend(
            mem,
            regs,
            va,
            upper,
            start,
            cache.as_deref_mut(),
            &mut stats,
        ) {
            Ok(l) => l,
            Err(f) => return done(Err(f), stats),
        };
        let d = leaf.desc;
        if d & AF == 0 && !regs.hw_af {
            return done(Err(FaultReason::AccessFlag { level: leaf.level }), stats);
        }
        if !translation(regs, va, &leaf, d).permits(kind, user) {
            return done(Err(FaultReason::Protection { level: leaf.level }), stats);
        }
        // A permitted write with AP[2] = 1 is a write to a writable-clean entry: the hardware
        // clears AP[2].
        let after = if write { d & !AP_RO } else { d };
        let t = translation(regs, va, &leaf, after);
        let new = after | AF;
        if new == d {
            return done(Ok(t), stats);
        }
        if mem.cas_u64(leaf.pa, d, new).is_ok() {
            stats.ad_updates += 1;
            return done(Ok(t), stats);
        }
        attempt += 1;
        if attempt > MAX_RESTARTS {
            // Lost every race: report the translation as read.
            return done(Ok(translation(regs, va, &leaf, d)), stats);
        }
    }
}

/// The translation the tables give now, with no side effects (see [`super::peek`]).
pub(super) fn peek(mem: &PhysMem, regs: &MmuRegs, va: u64) -> Option<Translation> {
    let (root, upper) = select_root(regs, va)?;
    let mut stats = WalkStats::default();
    let start = Start {
        level: 0,
        table: root,
        acc: 0,
    };
    let leaf = descend(mem, regs, va, upper, start, None, &mut stats).ok()?;
    if leaf.desc & AF == 0 && !regs.hw_af {
        return None;
    }
    Some(translation(regs, va, &leaf, leaf.desc))
}

/// Whether `e` agrees with the tables: the table descriptors from the TTBR (TTBR1 if
/// `e.upper`) down to the one for `e.va_base` that points to `e.level`'s table are valid table
/// descriptors, that one points to `e.table_pa`, and their hierarchical attributes restrict no
/// more than `e.acc` records.
pub(super) fn psc_entry_current(mem: &PhysMem, regs: &MmuRegs, e: &PscEntry) -> bool {
    if e.level == 0 || e.level > LAST || u32::from(e.shift) != shift(e.level - 1) {
        return false;
    }
    let Some((mut table, upper)) = select_root(regs, e.va_base) else {
        return false;
    };
    if upper != e.upper || !pa_ok(regs, table) {
        return false;
    }
    let mut acc = 0;
    for level in 0..e.level {
        let d = mem.load_u64(table + ((e.va_base >> shift(level)) & 0x1ff) * 8);
        if d & VALID == 0 || d & TABLE_OR_PAGE == 0 || !pa_ok(regs, d & OA) {
            return false;
        }
        acc |= d & TABLE_ATTRS;
        table = d & OA;
    }
    table == e.table_pa && acc & !e.acc & TABLE_ATTRS == 0
}

#[cfg(test)]
mod tests {
    use super::super::{peek, psc_entry_current, walk, Mode};
    use super::*;
    use AccessKind::{Execute, Read, Write};
    use FaultReason::*;

    // TTBR0: L0 at 0x1000, L1 at 0x2000, L2 at 0x3000, L3 at 0x4000.
    // VA = L0 index 1, L1 index 2, L2 index 3, L3 index 4.
    const VA: u64 = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12);
    const L0E: u64 = 0x1000 + 8;
    const L1E: u64 = 0x2000 + 2 * 8;
    const L2E: u64 = 0x3000 + 3 * 8;
    const L3E: u64 = 0x4000 + 4 * 8;
    // TTBR1: L0 at 0x8000, L1 at 0x9000, L2 at 0xa000, L3 at 0xb000.
    // KVA = L0 index 256, L1 index 2, L2 index 3, L3 index 4.
    const KVA: u64 = 0xffff_8000_0000_0000 | (2 << 30) | (3 << 21) | (4 << 12);
    const K_L3E: u64 = 0xb000 + 4 * 8;

    // Page descriptors (L3, bits 1:0 = 11), SH = inner shareable (0x300), AttrIndx 0:
    /// EL0 RW, AF.
    const PAGE_USER_RW: u64 = 0x743;
    /// EL0 RO, AF (AP = 11).
    const PAGE_USER_RO: u64 = 0x7c3;
    /// EL1 RW only, AF (AP = 00).
    const PAGE_KERN_RW: u64 = 0x703;
    /// EL1 RO only, AF (AP = 10).
    const PAGE_KERN_RO: u64 = 0x783;

    fn tables() -> (PhysMem, MmuRegs) {
        let m = PhysMem::new(16 << 20);
        m.store_u64(L0E, 0x2003);
        m.store_u64(L1E, 0x3003);
        m.store_u64(L2E, 0x4003);
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RW);
        m.store_u64(0x8000 + 256 * 8, 0x9003);
        m.store_u64(0x9000 + 2 * 8, 0xa003);
        m.store_u64(0xa000 + 3 * 8, 0xb003);
        m.store_u64(K_L3E, 0x0456_7000 | PAGE_KERN_RW | UXN);
        let r = MmuRegs {
            mode: Mode::Arm64,
            root: 0x1000,
            kernel_root: 0x8000,
            tag: 0,
            pdpte: [0; 4],
            nxe: false,
            wp: false,
            pge: false,
            smep: false,
            hw_af: false,
            hw_dbm: false,
            pa_bits: 48,
        };
        (m, r)
    }

    fn fault(m: &PhysMem, r: &MmuRegs, va: u64, kind: AccessKind, user: bool) -> FaultReason {
        walk(m, r, va, kind, user, None).result.unwrap_err()
    }

    fn ok(m: &PhysMem, r: &MmuRegs, va: u64, kind: AccessKind, user: bool) -> Translation {
        walk(m, r, va, kind, user, None).result.unwrap()
    }

    #[test]
    fn page_translation_and_rights() {
        let (m, r) = tables();
        let w = walk(&m, &r, VA + 0xabc, Read, true, None);
        let t = w.result.unwrap();
        assert_eq!((t.va_base, t.pa_base, t.shift), (VA, 0x0123_4000, 12));
        assert_eq!(
            w.stats,
            WalkStats {
                reads: 4,
                ad_updates: 0,
                psc_hit: false
            }
        );
        // EL0 RW page: EL1 may not execute it.
        assert_eq!(
            t.rights,
            Rights::USER_READ
                | Rights::USER_WRITE
                | Rights::USER_EXEC
                | Rights::KERN_READ
                | Rights::KERN_WRITE
                | Rights::DIRTY
                | Rights::GLOBAL
        );
        assert_eq!(fault(&m, &r, VA, Execute, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Execute, true)
            .rights
            .contains(Rights::USER_EXEC));
        // Nothing is written (AF already set, AP[2] = 0).
        ok(&m, &r, VA, Write, true);
        assert_eq!(m.load_u64(L3E), 0x0123_4000 | PAGE_USER_RW);
        assert_eq!(m.load_u64(L0E), 0x2003);
    }

    #[test]
    fn blocks_and_invalid_encodings() {
        let (m, r) = tables();
        // L2 block: 2 MiB at 0x0060_0000 (bits 1:0 = 01).
        m.store_u64(L2E, 0x0060_0741);
        let w = walk(&m, &r, VA + 0x10, Write, true, None);
        let t = w.result.unwrap();
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (VA & !0x1f_ffff, 0x0060_0000, 21)
        );
        assert_eq!(t.pa_of(VA + 0x10), 0x0060_4010);
        assert_eq!(w.stats.reads, 3);
        // L1 block: 1 GiB at 0x8000_0000.
        m.store_u64(L1E, 0x8000_0741);
        let t = ok(&m, &r, VA, Read, true);
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (VA & !0x3fff_ffff, 0x8000_0000, 30)
        );
        // Output-address bits below the block size.
        m.store_u64(L1E, 0x8020_0741);
        assert_eq!(fault(&m, &r, VA, Read, true), ReservedBit { level: 1 });
        m.store_u64(L1E, 0x3003);
        m.store_u64(L2E, 0x0060_1741);
        assert_eq!(fault(&m, &r, VA, Read, true), ReservedBit { level: 2 });
        assert_eq!(peek(&m, &r, VA), None);
        // `01` at L0 and at L3 is invalid.
        let (m, r) = tables();
        m.store_u64(L3E, 0x0123_4741);
        assert_eq!(fault(&m, &r, VA, Read, true), NotPresent { level: 3 });
        assert_eq!(peek(&m, &r, VA), None);
        m.store_u64(L0E, 0x4000_0741);
        assert_eq!(fault(&m, &r, VA, Read, true), NotPresent { level: 0 });
        // x0 at each level.
        for (level, pa) in [(0u8, L0E), (1, L1E), (2, L2E), (3, L3E)] {
            let (m, r) = tables();
            m.store_u64(pa, m.load_u64(pa) & !VALID);
            assert_eq!(fault(&m, &r, VA, Read, false), NotPresent { level });
            assert_eq!(peek(&m, &r, VA), None);
        }
    }

    #[test]
    fn halves_and_non_canonical() {
        let (m, r) = tables();
        for va in [
            0x0001_0000_0000_0000u64,
            0xfffe_ffff_ffff_f000,
            0x8000_0000_0000_0000,
        ] {
            assert_eq!(fault(&m, &r, va, Read, false), NonCanonical);
            assert_eq!(peek(&m, &r, va), None);
        }
        let t = ok(&m, &r, KVA + 8, Write, false);
        assert_eq!((t.va_base, t.pa_base), (KVA, 0x0456_7000));
        assert!(t.rights.contains(Rights::KERN_EXEC | Rights::KERN_WRITE));
        assert!(!t.rights.intersects(Rights::USER_READ | Rights::USER_EXEC));
        assert_eq!(fault(&m, &r, KVA, Read, true), Protection { level: 3 });
        // The same low bits in TTBR0 land elsewhere (nothing mapped at L0 index 256).
        assert_eq!(
            fault(&m, &r, KVA & 0xffff_ffff_ffff, Read, false),
            NotPresent { level: 0 }
        );
    }

    #[test]
    fn address_size() {
        let (m, mut r) = tables();
        r.pa_bits = 40;
        assert!(walk(&m, &r, VA, Read, true, None).result.is_ok());
        // A next-level table at bit 40.
        m.store_u64(L1E, 0x100_0000_3003);
        assert_eq!(fault(&m, &r, VA, Read, true), ReservedBit { level: 1 });
        assert!(peek(&m, &r, VA).is_none());
        m.store_u64(L1E, 0x3003);
        // An output address at bit 47 with 40-bit PAs; fine with 48.
        m.store_u64(L3E, 0x8000_0000_0000 | PAGE_USER_RW);
        assert_eq!(fault(&m, &r, VA, Read, true), ReservedBit { level: 3 });
        r.pa_bits = 48;
        assert_eq!(ok(&m, &r, VA, Read, true).pa_base, 0x8000_0000_0000);
        // A TTBR beyond the PA size faults at level 0.
        r.pa_bits = 40;
        r.root = 1 << 44;
        assert_eq!(fault(&m, &r, VA, Read, true), ReservedBit { level: 0 });
    }

    #[test]
    fn access_flag_software_and_hardware() {
        let (m, mut r) = tables();
        let fresh = 0x0123_4000 | (PAGE_USER_RW & !AF);
        m.store_u64(L3E, fresh);
        assert_eq!(fault(&m, &r, VA, Read, true), AccessFlag { level: 3 });
        assert_eq!(m.load_u64(L3E), fresh);
        assert_eq!(peek(&m, &r, VA), None);
        // The Access flag fault has priority over the Permission fault.
        m.store_u64(L3E, 0x0123_4000 | (PAGE_KERN_RO & !AF));
        assert_eq!(fault(&m, &r, VA, Write, true), AccessFlag { level: 3 });
        // Blocks too.
        m.store_u64(L2E, 0x0060_0341);
        assert_eq!(fault(&m, &r, VA, Read, true), AccessFlag { level: 2 });
        m.store_u64(L2E, 0x4003);
        // TCR.HA: the walk sets AF.
        r.hw_af = true;
        m.store_u64(L3E, fresh);
        let t = peek(&m, &r, VA).unwrap();
        assert_eq!(t.pa_base, 0x0123_4000);
        assert_eq!(m.load_u64(L3E), fresh); // peek changes nothing
                                            // An access that faults on permissions leaves AF clear.
        assert_eq!(fault(&m, &r, VA, Execute, false), Protection { level: 3 });
        assert_eq!(m.load_u64(L3E), fresh);
        let w = walk(&m, &r, VA, Read, true, None);
        assert!(w.result.is_ok());
        assert_eq!(w.stats.ad_updates, 1);
        assert_eq!(m.load_u64(L3E), fresh | AF);
        assert_eq!(walk(&m, &r, VA, Read, true, None).stats.ad_updates, 0);
    }

    #[test]
    fn dbm_writable_clean() {
        let (m, mut r) = tables();
        // EL0 RW via DBM: AP = 11 (read-only), DBM = 1.
        let clean = 0x0123_4000 | PAGE_USER_RO | DBM;
        m.store_u64(L3E, clean);
        // Without TCR.HD it is read-only.
        assert_eq!(fault(&m, &r, VA, Write, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA, Write, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Execute, false)
            .rights
            .contains(Rights::KERN_EXEC));
        r.hw_dbm = true;
        r.hw_af = true;
        let t = ok(&m, &r, VA, Read, true);
        assert!(t.rights.contains(Rights::USER_WRITE | Rights::KERN_WRITE));
        assert!(!t.rights.intersects(Rights::DIRTY | Rights::KERN_EXEC));
        assert_eq!(m.load_u64(L3E), clean);
        assert_eq!(peek(&m, &r, VA).unwrap().rights, t.rights);
        let w = walk(&m, &r, VA, Write, true, None);
        assert!(w
            .result
            .unwrap()
            .rights
            .contains(Rights::DIRTY | Rights::USER_WRITE));
        assert_eq!(w.stats.ad_updates, 1);
        assert_eq!(m.load_u64(L3E), clean & !AP_RO);
        // The same rights but DIRTY before and after.
        assert_eq!(peek(&m, &r, VA).unwrap().rights, t.rights | Rights::DIRTY);
        // AF = 0 and writable-clean: one update sets AF and clears AP[2].
        m.store_u64(L3E, clean & !AF);
        let w = walk(&m, &r, VA, Write, false, None);
        assert!(w.result.is_ok());
        assert_eq!(w.stats.ad_updates, 1);
        assert_eq!(m.load_u64(L3E), clean & !AP_RO);
        // APTable[1] makes it read-only whatever DBM says.
        m.store_u64(L3E, clean);
        m.store_u64(L1E, 0x3003 | AP_TABLE_RO);
        assert_eq!(fault(&m, &r, VA, Write, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA, Write, false), Protection { level: 3 });
        assert_eq!(m.load_u64(L3E), clean);
        // DBM without AP[2]: already dirty, nothing to do.
        m.store_u64(L1E, 0x3003);
        m.store_u64(L3E, (clean & !AP_RO) | DBM);
        assert_eq!(walk(&m, &r, VA, Write, true, None).stats.ad_updates, 0);
    }

    #[test]
    fn hierarchical_attributes() {
        // APTable[0]: no EL0 access below.
        let (m, r) = tables();
        m.store_u64(L1E, 0x3003 | AP_TABLE_NO_EL0);
        assert_eq!(fault(&m, &r, VA, Read, true), Protection { level: 3 });
        let t = ok(&m, &r, VA, Write, false);
        assert!(!t.rights.intersects(Rights::USER_READ | Rights::USER_WRITE));
        // The page is no longer EL0-writable, so EL1 may execute it.
        assert!(t.rights.contains(Rights::KERN_EXEC));
        // APTable[1]: read-only below.
        let (m, r) = tables();
        m.store_u64(L0E, 0x2003 | AP_TABLE_RO);
        assert_eq!(fault(&m, &r, VA, Write, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA, Write, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Read, true)
            .rights
            .contains(Rights::USER_READ | Rights::DIRTY));
        // XNTable: no EL0 execution below; EL1 unaffected.
        let (m, r) = tables();
        m.store_u64(L2E, 0x4003 | XN_TABLE);
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RO);
        assert_eq!(fault(&m, &r, VA, Execute, true), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Execute, false)
            .rights
            .contains(Rights::KERN_EXEC));
        // PXNTable: no EL1 execution below; EL0 unaffected.
        let (m, r) = tables();
        m.store_u64(L2E, 0x4003 | PXN_TABLE);
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RO);
        assert_eq!(fault(&m, &r, VA, Execute, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Execute, true)
            .rights
            .contains(Rights::USER_EXEC));
    }

    #[test]
    fn leaf_permissions() {
        let (m, r) = tables();
        // EL0 RO: EL1 may execute it (no implicit PXN), nobody writes.
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RO);
        let t = ok(&m, &r, VA, Execute, false);
        assert!(t
            .rights
            .contains(Rights::KERN_EXEC | Rights::USER_READ | Rights::USER_EXEC));
        assert!(!t
            .rights
            .intersects(Rights::KERN_WRITE | Rights::USER_WRITE | Rights::DIRTY));
        // EL1 RW: no EL0 access at all, EL0 execute-only as far as UXN goes.
        m.store_u64(L3E, 0x0123_4000 | PAGE_KERN_RW);
        let t = ok(&m, &r, VA, Write, false);
        assert!(t.rights.contains(Rights::KERN_EXEC | Rights::KERN_WRITE));
        assert_eq!(fault(&m, &r, VA, Read, true), Protection { level: 3 });
        // UXN / PXN.
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RO | UXN);
        assert_eq!(fault(&m, &r, VA, Execute, true), Protection { level: 3 });
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RO | PXN);
        assert_eq!(fault(&m, &r, VA, Execute, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA, Execute, true)
            .rights
            .contains(Rights::USER_EXEC));
        // EL1 RO.
        m.store_u64(L3E, 0x0123_4000 | PAGE_KERN_RO);
        assert_eq!(fault(&m, &r, VA, Write, false), Protection { level: 3 });
        // nG.
        m.store_u64(L3E, 0x0123_4000 | PAGE_USER_RW | NG);
        assert!(!ok(&m, &r, VA, Read, true).rights.contains(Rights::GLOBAL));
    }

    #[test]
    fn walk_cache_and_currency() {
        let (m, mut r) = tables();
        r.tag = 3;
        let mut c = WalkCache::for_mode(Mode::Arm64);
        walk(&m, &r, VA, Read, true, Some(&mut c));
        walk(&m, &r, KVA, Read, false, Some(&mut c));
        assert_eq!(c.len(), 6);
        assert_eq!(c.iter().filter(|e| e.upper).count(), 3);
        assert!(c.iter().all(|e| e.tag == 3 && psc_entry_current(&m, &r, e)));
        let l2 = c.lookup(VA, 3).unwrap();
        assert_eq!(
            l2,
            PscEntry {
                tag: 3,
                level: 3,
                va_base: VA & !0x1f_ffff,
                shift: 21,
                table_pa: 0x4000,
                acc: 0,
                upper: false
            }
        );
        let kl2 = c.lookup(KVA, 3).unwrap();
        assert_eq!(
            (kl2.upper, kl2.table_pa, kl2.va_base),
            (true, 0xb000, KVA & !0x1f_ffff)
        );
        // A neighbouring page starts from the cached L2 descriptor.
        m.store_u64(L3E + 8, 0x0777_7000 | PAGE_USER_RW);
        let w = walk(&m, &r, VA + 0x1000, Read, true, Some(&mut c));
        assert_eq!(w.result.unwrap().pa_base, 0x0777_7000);
        assert!(w.stats.psc_hit);
        assert_eq!(w.stats.reads, 1);
        assert_eq!(w.psc_used, Some(l2));
        // Another ASID misses.
        let mut r2 = r;
        r2.tag = 4;
        assert!(!walk(&m, &r2, VA, Read, true, Some(&mut c)).stats.psc_hit);
        // An L1 descriptor moved: the L1-level entry (pointing to the L2 table) and the entry
        // below it are stale; the L0 one is not.
        m.store_u64(L1E, 0x5003);
        let l0 = c
            .iter()
            .find(|e| e.level == 1 && !e.upper && e.tag == 3)
            .copied()
            .unwrap();
        let l1 = c
            .iter()
            .find(|e| e.level == 2 && !e.upper && e.tag == 3)
            .copied()
            .unwrap();
        assert!(psc_entry_current(&m, &r, &l0));
        assert!(!psc_entry_current(&m, &r, &l1));
        assert!(!psc_entry_current(&m, &r, &l2));
        // The stale entry is still used until invalidated.
        assert!(walk(&m, &r, VA, Read, true, Some(&mut c)).result.is_ok());
        c.invalidate_va(VA, Some(3));
        let w = walk(&m, &r, VA, Read, true, Some(&mut c));
        assert_eq!(w.result, Err(NotPresent { level: 2 }));
        // Attributes: APTable added in memory makes the cached entries too permissive.
        m.store_u64(L1E, 0x3003 | AP_TABLE_NO_EL0);
        assert!(!psc_entry_current(&m, &r, &l2));
        let strict = PscEntry {
            acc: AP_TABLE_NO_EL0 | XN_TABLE,
            ..l2
        };
        assert!(psc_entry_current(&m, &r, &strict));
        m.store_u64(L1E, 0x3003);
        assert!(psc_entry_current(&m, &r, &l2));
        // A TTBR1 entry is judged against TTBR1.
        assert!(psc_entry_current(&m, &r, &kl2));
        assert!(!psc_entry_current(
            &m,
            &r,
            &PscEntry {
                upper: false,
                ..kl2
            }
        ));
        r.kernel_root = 0xc000;
        assert!(!psc_entry_current(&m, &r, &kl2));
        // A level-3 table descriptor cannot exist: an L2 block on the path is stale too.
        r.kernel_root = 0x8000;
        m.store_u64(0xa000 + 3 * 8, 0x0060_0741);
        assert!(!psc_entry_current(&m, &r, &kl2));
        c.invalidate_tag(3);
        assert!(c.iter().all(|e| e.tag == 4));
    }

    #[test]
    fn concurrent_walks_of_a_fresh_entry() {
        for _ in 0..50 {
            let (m, mut r) = tables();
            r.hw_af = true;
            r.hw_dbm = true;
            let fresh = 0x0123_4000 | ((PAGE_USER_RO | DBM) & !AF);
            m.store_u64(L3E, fresh);
            let results: Vec<WalkResult> = std::thread::scope(|s| {
                let a = s.spawn(|| walk(&m, &r, VA, Read, true, None));
                let b = s.spawn(|| walk(&m, &r, VA, Read, false, None));
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            assert!(results.iter().all(|w| w.result.is_ok()));
            assert_eq!(results.iter().map(|w| w.stats.ad_updates).sum::<u32>(), 1);
            assert_eq!(m.load_u64(L3E), fresh | AF);
            // A reader and a writer: AF set and AP[2] cleared, in one or two updates.
            m.store_u64(L3E, fresh);
            let results: Vec<WalkResult> = std::thread::scope(|s| {
                let a = s.spawn(|| walk(&m, &r, VA, Write, true, None));
                let b = s.spawn(|| walk(&m, &r, VA, Read, true, None));
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            assert!(results.iter().all(|w| w.result.is_ok()));
            assert!(results[0].result.unwrap().rights.contains(Rights::DIRTY));
            let n: u32 = results.iter().map(|w| w.stats.ad_updates).sum();
            assert!((1..=2).contains(&n));
            assert_eq!(m.load_u64(L3E), (fresh | AF) & !AP_RO);
        }
    }
}
