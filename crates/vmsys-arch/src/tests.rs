//! Literal encodings below were worked out by hand from the bit positions in
//! the Intel SDM vol. 3A (tables 4-4..4-20) and the Arm ARM (D8.3), not from
//! the tables under test.

extern crate std;

use crate::*;
use std::vec::Vec;
use FormatId::{Amd64 as AMD, Amd64La57 as LA57, Arm64 as ARM, I386Pae as PAE, I386 as X32};

const RO: Prot = Prot::empty();
const RW: Prot = Prot::WRITE;
const RWU: Prot = Prot::WRITE.union(Prot::USER);
const RX: Prot = Prot::EXEC;
const UX: Prot = Prot::USER.union(Prot::EXEC);
const RWX: Prot = Prot::WRITE.union(Prot::EXEC);
const NONE: PteFlags = PteFlags::empty();
const A: PteFlags = PteFlags::ACCESSED;
const D: PteFlags = PteFlags::DIRTY;
const AD: PteFlags = A.union(D);
const GA: PteFlags = PteFlags::GLOBAL.union(A);
const GAD: PteFlags = GA.union(D);
const SW: PteFlags = PteFlags::WIRED_SW
    .union(PteFlags::MANAGED_SW)
    .union(PteFlags::NO_PROMOTE_SW)
    .union(PteFlags::PROMOTED_SW);
const WB: CacheMode = CacheMode::WriteBack;
const WT: CacheMode = CacheMode::WriteThrough;
const WC: CacheMode = CacheMode::WriteCombining;
const DEV: CacheMode = CacheMode::Device;

/// (format, level, pa, prot, flags, cache) -> raw entry.
#[rustfmt::skip]
const LEAVES: &[(FormatId, usize, u64, Prot, PteFlags, CacheMode, u64)] = &[
    // x86: P 0, R/W 1, U/S 2, PWT 3, PCD 4, A 5, D 6, PS 7 / PAT 7 (4K), G 8, PAT 12 (large), XD 63.
    (AMD, 3, 0x123_4000, RWU, A, WB, 0x8000_0000_0123_4027),
    (AMD, 2, 0x4000_0000, RWX, GAD, WB, 0x4000_01E3),
    // Write-through is PAT index 7: PAT at bit 12 on a 2M leaf, bit 7 on a 4K one.
    (AMD, 2, 0x4000_0000, RWX, NONE, WT, 0x4000_109B),
    (AMD, 3, 0x123_4000, RWX, NONE, WT, 0x0123_409B),
    // Write-combining is PAT index 1 (PWT alone) at every size.
    (AMD, 2, 0x4000_0000, RWX, NONE, WC, 0x4000_008B),
    (AMD, 1, 0x8000_0000, RO, A, WB, 0x8000_0000_8000_00A1),
    // Software: 9 wired, 10 managed, 11 no-promote, 52 promoted.
    (AMD, 3, 0x123_4000, RWX, SW, WB, 0x0010_0000_0123_4E03),
    (LA57, 4, 0x123_4000, RWU, A, WB, 0x8000_0000_0123_4027),
    (LA57, 3, 0x20_0000, RWX, NONE, WB, 0x0020_0083),
    // arm64 page: 11 | AttrIndx 2 (4:2) | AP[1] 6 | AP[2] 7 | SH 0b11 (9:8) | AF 10 | nG 11
    // | DBM 51 | PXN 53 | UXN 54. Writable-clean = DBM + AP[2].
    (ARM, 3, 0x4000_1000, RWU, A, WB, 0x0068_0000_4000_1FCB),
    // Writable-dirty: AP[2] clear, DBM kept.
    (ARM, 3, 0x4000_1000, RWU, AD, WB, 0x0068_0000_4000_1F4B),
    // User text: PXN only; kernel text (global): UXN only, nG clear.
    (ARM, 3, 0x4000_1000, UX, A, WB, 0x0020_0000_4000_1FCB),
    (ARM, 3, 0x8000, RX, GA, WB, 0x0040_0000_0000_878B),
    // Software 55 wired, 56 managed, 57 no-promote, 58 promoted.
    (ARM, 3, 0x8000, RX, GA.union(SW), WB, 0x07C0_0000_0000_878B),
    // Blocks end in 01. Device is AttrIndx 0.
    (ARM, 2, 0x4020_0000, RW, GAD, DEV, 0x0068_0000_4020_0701),
    (ARM, 1, 0x4000_0000, RW, GA, WB, 0x0068_0000_4000_0789),
    // i386: as x86, 4-byte entries, no XD.
    (X32, 1, 0x0012_3000, RWU.union(RX), A, WB, 0x0012_3027),
    (X32, 1, 0x0012_3000, RWX, GAD, WB, 0x0012_3163),
    (X32, 0, 0x0040_0000, RWX, GAD, WB, 0x0040_01E3),
    (X32, 0, 0x0040_0000, RWX, GAD, WT, 0x0040_11FB),
    // Lenient: no-exec is not expressible, so the page is executable.
    (X32, 1, 0x0012_3000, RWU, A, WB, 0x0012_3027),
    // Software: 11 marks a promoted 4M page.
    (X32, 0, 0x0040_0000, RWX, PteFlags::PROMOTED_SW, WB, 0x0040_0883),
    // PAE: 8-byte entries, XD, PAs above 4 GiB.
    (PAE, 2, 0x1_2345_6000, RWU, A, WB, 0x8000_0001_2345_6027),
    (PAE, 1, 0x20_0000, RWX, NONE, WB, 0x0020_0083),
];

#[rustfmt::skip]
const ERRORS: &[(FormatId, usize, u64, Prot, PteFlags, CacheMode, EncodeError)] = &[
    (AMD, 0, 0x5000, RW, NONE, WB, EncodeError::NotLeafLevel(0)),
    (AMD, 9, 0x1000, RW, NONE, WB, EncodeError::NoSuchLevel(9)),
    (AMD, 2, 0x1000, RW, NONE, WB, EncodeError::Misaligned { pa: 0x1000, align: 0x20_0000 }),
    (AMD, 3, 1 << 52, RW, NONE, WB, EncodeError::PaTooWide { pa: 1 << 52 }),
    (ARM, 0, 0, RW, NONE, WB, EncodeError::NotLeafLevel(0)),
    (ARM, 3, 1 << 48, RW, NONE, WB, EncodeError::PaTooWide { pa: 1 << 48 }),
    (ARM, 3, 0x1000, Prot::USER, D, WB, EncodeError::Unsupported(Feature::DirtyReadOnly)),
    (ARM, 3, 0x1000, RW, NONE, CacheMode::WriteProtect,
        EncodeError::Unsupported(Feature::Cache(CacheMode::WriteProtect))),
    (X32, 0, 0x0060_0000, RWX, NONE, WB, EncodeError::Misaligned { pa: 0x60_0000, align: 0x40_0000 }),
    (X32, 1, 1 << 32, RWX, NONE, WB, EncodeError::PaTooWide { pa: 1 << 32 }),
    (X32, 1, 0x1000, RWX, PteFlags::NO_PROMOTE_SW, WB, EncodeError::Unsupported(Feature::Flag(PteFlags::NO_PROMOTE_SW))),
    (PAE, 0, 0x20_0000, RWX, NONE, WB, EncodeError::NotLeafLevel(0)),
    (PAE, 2, 0x1000, RWX, PteFlags::NO_PROMOTE_SW, WB, EncodeError::Unsupported(Feature::Flag(PteFlags::NO_PROMOTE_SW))),
];

/// (format, level, raw) -> decoded.
#[rustfmt::skip]
const DECODES: &[(FormatId, usize, u64, Entry)] = &[
    (AMD, 3, 0x8000_0000_0123_4027,
        Entry::Leaf { pa: 0x123_4000, size: 4096, prot: RWU, flags: A, cache: WB }),
    (AMD, 0, 0x5087, Entry::Reserved { raw: 0x5087 }), // PS is reserved in a PML4E
    (AMD, 2, 0x4000_2083, Entry::Reserved { raw: 0x4000_2083 }), // 20:13 of a 2M PDE
    (AMD, 2, 0x5007, Entry::Table { pa: 0x5000 }),
    (AMD, 2, 0x5006, Entry::Invalid),
    (ARM, 3, 0x0068_0000_4000_1FCB,
        Entry::Leaf { pa: 0x4000_1000, size: 4096, prot: RWU, flags: A, cache: WB }),
    // Writable without DBM (AP[2] clear) reads as writable-dirty.
    (ARM, 3, 0x0060_0000_4000_1F4B,
        Entry::Leaf { pa: 0x4000_1000, size: 4096, prot: RWU, flags: AD, cache: WB }),
    (ARM, 3, 0x4000_1001, Entry::Invalid), // 01 at L3 is not a page
    (ARM, 0, 0x4000_0001, Entry::Invalid), // no L0 blocks
    (ARM, 0, 0x1003, Entry::Table { pa: 0x1000 }),
    (ARM, 0, 0x1_0000_0000_1003, Entry::Reserved { raw: 0x1_0000_0000_1003 }), // 51:48
    (ARM, 2, 0x4020_1701, Entry::Reserved { raw: 0x4020_1701 }), // 20:12 of a 2M block
    // i386 decodes what the hardware does: always executable.
    (X32, 1, 0x0012_3027,
        Entry::Leaf { pa: 0x12_3000, size: 4096, prot: RWU.union(RX), flags: A, cache: WB }),
    (X32, 1, 0x1_0012_3027, Entry::Reserved { raw: 0x1_0012_3027 }), // 4-byte entries
    (X32, 0, 0x0040_2083, Entry::Reserved { raw: 0x0040_2083 }), // 21:13 of a 4M PDE
    // PDPTE: only P, PWT, PCD, address; R/W (1) and bit 63 are reserved.
    (PAE, 0, 0x3019, Entry::Table { pa: 0x3000 }),
    (PAE, 0, 0x3003, Entry::Reserved { raw: 0x3003 }),
    (PAE, 0, 0x8000_0000_0000_3001, Entry::Reserved { raw: 0x8000_0000_0000_3001 }),
    (PAE, 2, 0x0010_0000_0000_1001, Entry::Reserved { raw: 0x0010_0000_0000_1001 }), // 62:52
];

#[test]
fn literal_encodings() {
    for &(id, level, pa, prot, flags, cache, raw) in LEAVES {
        let got = id.format().make_leaf(pa, level, prot, flags, cache);
        assert_eq!(
            got,
            Ok(raw),
            "{id} L{level} {pa:#x} {prot:?} {flags:?} {cache:?}"
        );
    }
    for &(id, level, pa, prot, flags, cache, err) in ERRORS {
        let got = id.format().make_leaf(pa, level, prot, flags, cache);
        assert_eq!(
            got,
            Err(err),
            "{id} L{level} {pa:#x} {prot:?} {flags:?} {cache:?}"
        );
    }
    for &(id, level, raw, entry) in DECODES {
        assert_eq!(
            id.format().decode(raw, level),
            entry,
            "{id} L{level} {raw:#x}"
        );
    }
    // x86 tables are permissive (P R/W U/S); a PAE PDPTE has P only; arm64 ends in 11.
    for (id, level, raw) in [
        (AMD, 0, 0x5007),
        (AMD, 2, 0x5007),
        (ARM, 0, 0x5003),
        (X32, 0, 0x5007),
        (PAE, 0, 0x5001),
        (PAE, 1, 0x5007),
    ] {
        assert_eq!(
            id.format().make_table(0x5000, level),
            Ok(raw),
            "{id} L{level}"
        );
    }
    assert_eq!(
        AMD.format().make_table(0x5000, 3),
        Err(EncodeError::NotTableLevel(3))
    );
    assert_eq!(AMD.format().pa(0x8000_0000_0123_4027, 3), Some(0x123_4000));
}

#[test]
fn arm64_dirty_transitions() {
    let (x, clean, dirty) = (ARM.format(), 0x0068_0000_4000_1FCB, 0x0068_0000_4000_1F4B);
    assert_eq!(x.without_flags(dirty, 3, D), Ok(clean));
    assert_eq!(x.with_flags(clean, 3, D), Ok(dirty));
    // Read-only: DBM and AP[2]-clear both go.
    assert_eq!(x.with_prot(dirty, 3, Prot::USER), Ok(0x0060_0000_4000_1FCB));
    assert_eq!(
        x.with_flags(0x0060_0000_4000_1FCB, 3, D),
        Err(EncodeError::Unsupported(Feature::DirtyReadOnly))
    );
    assert_eq!(x.with_flags(0x1003, 2, D), Err(EncodeError::NotLeaf));
}

#[test]
fn i386_no_exec() {
    let x = X32.format();
    assert!(!x.can_express(RW) && x.can_express(RWX));
    assert_eq!(x.effective_prot(RW), RWX);
    let err = x.make_leaf_strict(0x0012_3000, 1, RWU, A, WB);
    assert_eq!(err, Err(EncodeError::Unsupported(Feature::NoExec)));
    assert!(AMD.format().can_express(RW) && PAE.format().can_express(RW));
}

#[test]
fn model_data() {
    let (amd, arm, pae) = (AMD.format(), ARM.format(), PAE.format());
    assert_eq!(amd.leaf_attrs.pkey, Some(0x7800_0000_0000_0000));
    assert_eq!(amd.tlb.tag, TlbTag::Pcid { bits: 12 });
    assert!(!amd.tlb.broadcast_invalidate && !amd.tlb.break_before_make);
    assert_eq!(
        amd.cache_register,
        CacheRegister::Pat(0x0407_0506_0007_0106)
    );
    assert_eq!(arm.cache_register, CacheRegister::Mair(0xBBFF_4400));
    assert_eq!(arm.tlb.tag, TlbTag::Asid { bits: 16 });
    assert!(arm.tlb.broadcast_invalidate && arm.tlb.break_before_make);
    assert!(arm.tlb.software_access_flag && !amd.tlb.software_access_flag);
    assert!(pae.tlb.root_latched_on_switch && pae.tlb.tag == TlbTag::None);
    assert_eq!((pae.levels[0].entries, pae.root_align), (4, 32));
    assert_eq!(X32.format().entry_bytes(), 4);
    assert_eq!(X32.format().software.no_promote_bit, None);
    assert_eq!(pae.software.no_promote_bit, None);
    assert_eq!(arm.software.no_promote_bit, Some(1 << 57));
    assert_eq!(amd.level_for_size(1 << 30), Some(1));
    assert_eq!(arm.level_for_size(1 << 39), None);
    assert_eq!(
        X32.format().leaf_sizes().collect::<Vec<_>>(),
        [4096, 4 << 20]
    );
}

#[test]
fn index_and_canonical() {
    let x = AMD.format();
    assert_eq!(x.index(0xffff_8000_0000_0000, 0), 256);
    assert_eq!(
        [0, 1, 2, 3].map(|l| x.index(0xffff_ffff_8020_3000, l)),
        [511, 510, 1, 3]
    );
    assert_eq!(
        [0, 1, 2, 3].map(|l| x.index(0x7fff_ffff_f000, l)),
        [255, 511, 511, 511]
    );
    let y = LA57.format();
    assert_eq!(y.levels[0].name, "PML5");
    assert_eq!([0, 1].map(|l| y.index(0xff00_0000_0000_0000, l)), [256, 0]);
    assert_eq!(X32.format().index(0xC040_5000, 0), 769); // 3 GiB + 4 MiB
    assert_eq!(X32.format().index(0xC040_5000, 1), 5);
    assert_eq!(PAE.format().index(0xC020_0000, 0), 3);
    assert_eq!(PAE.format().index(0xC020_0000, 1), 1);

    #[rustfmt::skip]
    let cases = [
        (AMD, 0x0000_8000_0000_0000, false), (AMD, 0x0000_7fff_ffff_ffff, true),
        (AMD, 0xffff_8000_0000_0000, true), (AMD, 0xfffe_8000_0000_0000, false),
        (LA57, 0x0000_8000_0000_0000, true), (LA57, 0xff00_0000_0000_0000, true),
        (LA57, 0x0100_0000_0000_0000, false),
        (ARM, 0x0000_8000_0000_0000, true), (ARM, 0xffff_0000_0000_0000, true),
        (ARM, 0x0001_0000_0000_0000, false), (ARM, 0x8000_0000_0000_0000, false),
        (X32, 0xffff_ffff, true), (PAE, 0x1_0000_0000, false),
    ];
    for (id, va, ok) in cases {
        assert_eq!(id.format().is_canonical(va), ok, "{id} {va:#x}");
    }
}

#[test]
fn halves() {
    #[rustfmt::skip]
    let cases = [
        (AMD, 0..=0x7fff_ffff_ffff, 0xffff_8000_0000_0000..=u64::MAX, 256..512, false),
        (LA57, 0..=0x00ff_ffff_ffff_ffff, 0xff00_0000_0000_0000..=u64::MAX, 256..512, false),
        (ARM, 0..=0xffff_ffff_ffff, 0xffff_0000_0000_0000..=u64::MAX, 0..512, true),
    ];
    for (id, user, kernel, kernel_top, separate_roots) in cases {
        let want = Layout {
            user,
            kernel,
            kernel_top,
            separate_roots,
        };
        assert_eq!(id.format().layout(Split32::default()), want, "{id}");
    }
    let (i, p) = (X32.format(), PAE.format());
    for (split, base, pd, pdpt) in [
        (Split32::G3G1, 0xC000_0000, 768, 3),
        (Split32::G2G2, 0x8000_0000, 512, 2),
        (Split32::G1G3, 0x4000_0000, 256, 1),
    ] {
        assert_eq!(split.kernel_base(), base);
        assert_eq!(i.user_range(split), 0..=base - 1);
        assert_eq!(i.kernel_range(split), base..=0xFFFF_FFFF);
        assert_eq!(p.kernel_range(split), base..=0xFFFF_FFFF);
        assert_eq!(i.kernel_top_indices(split), pd..1024);
        assert_eq!(p.kernel_top_indices(split), pdpt..4);
        assert!(i.is_kernel_va(base, split) && !i.is_kernel_va(base - 1, split));
    }
}

#[test]
fn names() {
    for id in FormatId::ALL {
        assert_eq!(FormatId::from_name(id.name()), Some(id));
        assert_eq!(id.format().id, id);
    }
    assert_eq!(FormatId::from_name("sparc"), None);
    assert_eq!(FormatId::Amd64.format().levels.len(), 4);
    assert_eq!(FormatId::I386Pae.name(), "i386-pae");
}

/// Internal consistency of every table, so that a new table is checked too.
#[test]
fn tables_are_consistent() {
    for id in FormatId::ALL {
        let x = id.format();
        let n = x.levels.len();
        assert_eq!(x.levels[n - 1].shift, 12, "{id}");
        assert!(x.levels[n - 1].table.is_none() && x.levels[n - 1].leaf.is_some());
        assert_eq!((x.levels[0].entries * x.entry_bytes()) as u64, x.root_align);
        let va_bits = x.levels[0].shift + x.levels[0].index_bits;
        match (x.canonical, x.halves) {
            (Canonical::SignExtend { bits }, Halves::UpperHalf { va_bits: h }) => {
                assert_eq!((bits, h), (va_bits, va_bits))
            }
            (Canonical::SplitTtbr { va_bits: c }, Halves::TtbrPair { va_bits: h }) => {
                assert_eq!((c, h), (va_bits, va_bits))
            }
            (Canonical::Bits32, Halves::Split32) => assert_eq!(va_bits, 32),
            other => panic!("{id}: {other:?}"),
        }
        let a = &x.leaf_attrs;
        let mut attr = a.writable.mask | a.user.mask | a.accessed.mask | a.global.mask | a.fixed;
        attr |= match a.exec {
            ExecModel::Always => 0,
            ExecModel::Single(e) => e.mask,
            ExecModel::Split { user, privileged } => user.mask | privileged.mask,
        };
        attr |= match a.dirty {
            DirtyModel::HardwareBit(d) | DirtyModel::Dbm { dbm: d } => d.mask,
        };
        let sw = &x.software;
        let named = [
            Some(sw.wired),
            Some(sw.managed),
            sw.no_promote_bit,
            sw.promoted_bit,
        ];
        let named: Vec<u64> = named.into_iter().flatten().collect();
        assert_eq!(
            named.iter().fold(0, |a, b| a | b) & !sw.available,
            0,
            "{id}"
        );
        assert_eq!(
            named.iter().fold(0, |a, b| a | b).count_ones() as usize,
            named.len()
        );
        for (i, l) in x.levels.iter().enumerate() {
            assert_eq!(l.entries, 1 << l.index_bits);
            if i > 0 {
                assert_eq!(l.entries * l.entry_bytes, 4096, "{id} {}", l.name);
                assert_eq!(x.levels[i - 1].shift, l.shift + l.index_bits);
            }
            assert_eq!(l.entry_bytes, x.entry_bytes());
            assert_eq!(x.decode(0, i), Entry::Invalid);
            assert!(l.invalid.matches(0));
            if let (Some(t), Some(d)) = (l.table, l.leaf) {
                assert!(!d.pattern.matches(t.pattern.value) && !t.pattern.matches(d.pattern.value));
            }
            if let Some(t) = l.table {
                assert_eq!(t.addr_mask & (t.reserved | t.pattern.mask | t.bits), 0);
            }
            if let Some(d) = l.leaf {
                assert_eq!(d.size, 1 << l.shift);
                assert_eq!(d.addr_mask.trailing_zeros(), l.shift);
                assert_eq!(64 - d.addr_mask.leading_zeros(), x.pa_bits);
                let used = [
                    d.addr_mask,
                    d.reserved,
                    d.pattern.mask,
                    d.cache.mask,
                    attr,
                    sw.available,
                ];
                for (j, m) in used.iter().enumerate() {
                    for o in &used[j + 1..] {
                        assert_eq!(m & o, 0, "{id} {}: overlapping masks {m:#x} {o:#x}", l.name);
                    }
                }
                // Every cache pattern decodes (walk all subsets of the mask).
                let c = d.cache.mask;
                let subsets = core::iter::successors(Some(c), |&s| (s != 0).then(|| (s - 1) & c));
                assert!(
                    subsets.into_iter().all(|s| d.cache.mode_of(s).is_some()),
                    "{id}"
                );
            }
        }
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// decode(encode(x)) == x over every leaf level, protection, flag set and
/// cache mode, at pseudo-random addresses; with_* are consistent with it.
#[test]
fn round_trip() {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for id in FormatId::ALL {
        let x = id.format();
        let sw = x.software;
        let dbm = matches!(x.leaf_attrs.dirty, DirtyModel::Dbm { .. });
        for (level, d) in x
            .levels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.leaf?)))
        {
            for n in 0..8 * 128 * CacheMode::ALL.len() {
                let prot = Prot::from_bits_truncate((n % 8) as u8);
                let flags = PteFlags::from_bits_truncate((n / 8 % 128) as u8);
                let cache = CacheMode::ALL[n / 1024];
                let pa = xorshift(&mut seed) & d.addr_mask;
                let ctx = (id, level, prot, flags, cache);
                let unsupported = (flags.contains(PteFlags::NO_PROMOTE_SW)
                    && sw.no_promote_bit.is_none())
                    || (flags.contains(PteFlags::PROMOTED_SW) && sw.promoted_bit.is_none())
                    || (dbm && flags.contains(D) && !prot.contains(Prot::WRITE))
                    || d.cache.bits_for(cache).is_none();
                let raw = match x.make_leaf(pa, level, prot, flags, cache) {
                    Ok(raw) if !unsupported => raw,
                    Err(EncodeError::Unsupported(_)) if unsupported => continue,
                    other => panic!("{ctx:?}: {other:?}"),
                };
                assert!(x.entry_bytes() == 8 || raw >> 32 == 0, "{ctx:?}");
                let cache = d.cache.mode_of(d.cache.bits_for(cache).unwrap()).unwrap();
                let prot = x.effective_prot(prot);
                let want = Entry::Leaf {
                    pa,
                    size: d.size,
                    prot,
                    flags,
                    cache,
                };
                assert_eq!(x.decode(raw, level), want, "{ctx:?}");
                assert_eq!(x.with_prot(raw, level, prot), Ok(raw), "{ctx:?}");
                let cleared = x.without_flags(raw, level, flags).unwrap();
                assert_eq!(x.with_flags(cleared, level, flags), Ok(raw), "{ctx:?}");
            }
        }
    }
}
