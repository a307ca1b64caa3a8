//! The x86 walkers: 4-level and 5-level (LA57) IA-32e paging, 32-bit 2-level paging with
//! CR4.PSE, and PAE paging. Written from the Intel SDM vol. 3A ch. 4 (§4.3 32-bit paging, §4.4
//! PAE paging, §4.5 4-level and 5-level paging, §4.6 access rights, §4.8 accessed and dirty
//! flags, §4.10.3 paging-structure caches).
//!
//! Choices where the SDM leaves freedom:
//! - A walk that faults (not present, reserved bit, protection) sets no accessed or dirty flag.
//!   (The SDM allows A to be set on the entries a faulting walk used; we never do.)
//! - A successful walk sets A on every paging-structure entry it read from memory (not on the
//!   PAE PDPTE registers, nor on upper entries it skipped thanks to the paging-structure cache),
//!   and on a write D on the leaf, each with a compare-and-exchange; if an entry changed since it
//!   was read, the walk starts again (at most [`MAX_RESTARTS`] times, then the translation read
//!   last is reported without the update).
//! - Paging-structure cache entries are created for every valid non-leaf entry read (present, no
//!   reserved bit), also on a walk that faults further down, as the SDM permits.
//! - Reserved bits as the SDM lists them; on PAE the PDE/PTE bits 62:MAXPHYADDR and the PDPTE
//!   bits 63:MAXPHYADDR are reserved (there are no ignored high bits in PAE entries).

use vmsys::platform::{AccessKind, FaultReason};

use super::{MmuRegs, Mode, PscEntry, Rights, Translation, WalkCache, WalkResult, WalkStats};
use crate::mem::PhysMem;

/// Present.
const P: u64 = 1 << 0;
/// Read/write.
const RW: u64 = 1 << 1;
/// User/supervisor.
const US: u64 = 1 << 2;
/// Accessed.
const A: u64 = 1 << 5;
/// Dirty (leaves).
const D: u64 = 1 << 6;
/// Page size (PDE, PDPTE; reserved in PML4E/PML5E; PAT in a PTE).
const PS: u64 = 1 << 7;
/// Global (leaves).
const G: u64 = 1 << 8;
/// Execute-disable (with EFER.NXE; reserved otherwise).
const XD: u64 = 1 << 63;

/// 64-bit entries: physical-address field 51:12.
const ADDR_64: u64 = 0x000f_ffff_ffff_f000;
/// 32-bit paging entries: physical-address field 31:12.
const ADDR_32: u64 = 0xffff_f000;
/// 32-bit paging, 4 MiB PDE: bits 21:13 are reserved without PSE-36.
const RSVD_PDE_4M: u64 = 0x003f_e000;
/// 2 MiB leaf (PDE): bits 20:13 reserved.
const RSVD_PDE_2M: u64 = 0x001f_e000;
/// 1 GiB leaf (PDPTE): bits 29:13 reserved.
const RSVD_PDPTE_1G: u64 = 0x3fff_e000;
/// PAE PDPTE: bits 2:1 and 8:5 reserved.
const RSVD_PAE_PDPTE: u64 = 0x1e6;

/// How many times a walk starts again after losing an A/D compare-and-exchange.
const MAX_RESTARTS: u32 = 16;

/// The accumulated rights before any level: every R/W and U/S is 1, no XD.
const ACC_INIT: u64 = RW | US;

/// The paging format being walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    /// IA-32e paging with 4 or 5 levels.
    Amd64 { levels: u8 },
    /// 32-bit paging with CR4.PSE.
    I386,
    /// PAE paging; level 0 is the PDPTE registers.
    Pae,
}

impl Fmt {
    fn of(mode: Mode) -> Option<Fmt> {
        match mode {
            Mode::Amd64 { la57 } => Some(Fmt::Amd64 {
                levels: if la57 { 5 } else { 4 },
            }),
            Mode::I386 => Some(Fmt::I386),
            Mode::I386Pae => Some(Fmt::Pae),
            Mode::Arm64 => None,
        }
    }

    #[inline]
    fn levels(self) -> u8 {
        match self {
            Fmt::Amd64 { levels } => levels,
            Fmt::I386 => 2,
            Fmt::Pae => 3,
        }
    }

    /// log2 of the VA region one entry at `level` covers.
    #[inline]
    fn shift(self, level: u8) -> u32 {
        let below = u32::from(self.levels() - 1 - level);
        match self {
            Fmt::I386 => 12 + 10 * below,
            _ => 12 + 9 * below,
        }
    }

    /// Whether entries are 8 bytes (else 4).
    #[inline]
    fn wide(self) -> bool {
        self != Fmt::I386
    }

    /// The PA of the entry for `va` in the table at `table` of `level`.
    #[inline]
    fn entry_pa(self, table: u64, va: u64, level: u8) -> u64 {
        let (bits, size) = if self.wide() { (9, 8) } else { (10, 4) };
        table + ((va >> self.shift(level)) & ((1 << bits) - 1)) * size
    }

    /// Whether PS = 1 at `level` makes the entry a leaf (the PTE level is always a leaf).
    #[inline]
    fn large_leaf_at(self, level: u8) -> bool {
        let s = self.shift(level);
        match self {
            Fmt::Amd64 { .. } => s == 21 || s == 30,
            Fmt::I386 => s == 22,
            Fmt::Pae => s == 21,
        }
    }

    /// Whether the paging-structure caches hold entries pointing to tables at `level`.
    #[inline]
    fn caches_table_level(self, level: u8) -> bool {
        match self {
            // PML5E (LA57), PML4E, PDPTE and PDE caches.
            Fmt::Amd64 { .. } => level >= 1 && level < self.levels(),
            // The PDPTE registers are the upper level; only PDEs are cached.
            Fmt::Pae => level == 2,
            Fmt::I386 => level == 1,
        }
    }

    #[inline]
    fn canonical(self, va: u64) -> bool {
        match self {
            Fmt::Amd64 { levels } => {
                let bits = 12 + 9 * u32::from(levels); // 48 or 57
                let sh = 64 - bits;
                (((va << sh) as i64) >> sh) as u64 == va
            }
            Fmt::I386 | Fmt::Pae => va >> 32 == 0,
        }
    }

    /// Read the entry at `pa` (8 or 4 bytes).
    #[inline]
    fn load(self, mem: &PhysMem, pa: u64) -> u64 {
        if self.wide() {
            mem.load_u64(pa)
        } else {
            u64::from(mem.load_u32(pa))
        }
    }

    /// Compare-and-exchange the entry at `pa`; whether it succeeded.
    #[inline]
    fn cas(self, mem: &PhysMem, pa: u64, old: u64, new: u64) -> bool {
        if self.wide() {
            mem.cas_u64(pa, old, new).is_ok()
        } else {
            mem.cas_u32(pa, old as u32, new as u32).is_ok()
        }
    }

    /// Bits [pa_bits, top] of an address field, which are reserved.
    #[inline]
    fn above_maxphyaddr(regs: &MmuRegs, top: u32) -> u64 {
        let m = u32::from(regs.pa_bits).min(top + 1);
        if m > top {
            0
        } else {
            (u64::MAX >> (63 - top)) & !((1u64 << m) - 1)
        }
    }

    /// Whether entry `e` (present) at `level` sets a reserved bit.
    fn reserved(self, regs: &MmuRegs, level: u8, e: u64) -> bool {
        let mask = match self {
            Fmt::I386 => {
                if level == 0 && e & PS != 0 {
                    RSVD_PDE_4M
                } else {
                    0
                }
            }
            Fmt::Amd64 { levels } => {
                let mut r = Self::above_maxphyaddr(regs, 51);
                if !regs.nxe {
                    r |= XD;
                }
                let s = self.shift(level);
                if level + 1 < levels && e & PS != 0 {
                    r |= match s {
                        21 => RSVD_PDE_2M,
                        30 => RSVD_PDPTE_1G,
                        _ => PS, // PML4E, PML5E: PS is reserved
                    };
                }
                r
            }
            Fmt::Pae => {
                if level == 0 {
                    RSVD_PAE_PDPTE | Self::above_maxphyaddr(regs, 63)
                } else {
                    let mut r = Self::above_maxphyaddr(regs, 62);
                    if !regs.nxe {
                        r |= XD;
                    }
                    if level == 1 && e & PS != 0 {
                        r |= RSVD_PDE_2M;
                    }
                    r
                }
            }
        };
        e & mask != 0
    }

    /// The physical address an entry holds, for a table or a leaf mapping `1 << shift` bytes.
    #[inline]
    fn addr(self, e: u64, shift: u32) -> u64 {
        let field = if self.wide() { ADDR_64 } else { ADDR_32 };
        e & field & !((1u64 << shift) - 1)
    }
}

/// Fold the rights of entry `e` into `acc`: R/W and U/S are ANDed, XD is ORed.
#[inline]
fn accumulate(acc: u64, e: u64) -> u64 {
    (acc & (e | !(RW | US))) | (e & XD)
}

/// Whether rights `have` (accumulated from memory) grant at least `cached`.
#[inline]
fn grants_at_least(have: u64, cached: u64) -> bool {
    cached & !have & (RW | US) == 0 && have & !cached & XD == 0
}

/// The entries of one walk attempt read from memory, top-down, the last being the leaf.
struct Path {
    n: usize,
    pa: [u64; 5],
    val: [u64; 5],
}

impl Path {
    fn new() -> Self {
        Path {
            n: 0,
            pa: [0; 5],
            val: [0; 5],
        }
    }
    #[inline]
    fn push(&mut self, pa: u64, val: u64) {
        self.pa[self.n] = pa;
        self.val[self.n] = val;
        self.n += 1;
    }
}

/// The leaf a walk reached.
struct Leaf {
    level: u8,
    shift: u32,
    pa_base: u64,
    entry: u64,
    /// Rights accumulated over every level, the leaf included.
    acc: u64,
}

/// Where a walk starts: the table at `level` with the rights of the levels above.
#[derive(Clone, Copy)]
struct Start {
    level: u8,
    table: u64,
    acc: u64,
}

/// The entry at `level` for `va` in `table`: (its PA, or `None` for a PAE PDPTE register; value).
#[inline]
fn read_entry(
    mem: &PhysMem,
    regs: &MmuRegs,
    fmt: Fmt,
    table: u64,
    va: u64,
    level: u8,
) -> (Option<u64>, u64) {
    if fmt == Fmt::Pae && level == 0 {
        (None, regs.pdpte[((va >> 30) & 3) as usize])
    } else {
        let pa = fmt.entry_pa(table, va, level);
        (Some(pa), fmt.load(mem, pa))
    }
}

/// Walk from `start` to the leaf for `va`: presence and reserved bits, rights accumulation, and
/// cache fills; no permission check and no A/D update.
#[allow(clippy::too_many_arguments)]
fn descend(
    mem: &PhysMem,
    regs: &MmuRegs,
    fmt: Fmt,
    va: u64,
    start: Start,
    mut cache: Option<&mut WalkCache>,
    stats: &mut WalkStats,
    path: &mut Path,
) -> Result<Leaf, FaultReason> {
    let last = fmt.levels() - 1;
    let Start {
        mut level,
        mut table,
        mut acc,
    } = start;
    loop {
        let (pa, e) = read_entry(mem, regs, fmt, table, va, level);
        if let Some(pa) = pa {
            stats.reads += 1;
            path.push(pa, e);
        }
        if e & P == 0 {
            return Err(FaultReason::NotPresent { level });
        }
        if fmt.reserved(regs, level, e) {
            return Err(FaultReason::ReservedBit { level });
        }
        // PAE PDPTEs have no R/W, U/S or XD.
        if pa.is_some() {
            acc = accumulate(acc, e);
        }
        let shift = fmt.shift(level);
        if level == last || (e & PS != 0 && fmt.large_leaf_at(level)) {
            return Ok(Leaf {
                level,
                shift,
                pa_base: fmt.addr(e, shift),
                entry: e,
                acc,
            });
        }
        table = fmt.addr(e, 12);
        level += 1;
        if fmt.caches_table_level(level) {
            if let Some(c) = cache.as_deref_mut() {
                c.fill(PscEntry {
                    tag: regs.tag,
                    level,
                    va_base: va & !((1u64 << shift) - 1),
                    shift: shift as u8,
                    table_pa: table,
                    acc,
                    upper: false,
                });
            }
        }
    }
}

/// The rights of a leaf reached with accumulated rights `acc`.
fn rights(regs: &MmuRegs, acc: u64, leaf: u64) -> Rights {
    let user = acc & US != 0;
    let write = acc & RW != 0;
    let xd = acc & XD != 0;
    let mut r = Rights::KERN_READ;
    if user {
        r |= Rights::USER_READ;
        if write {
            r |= Rights::USER_WRITE;
        }
        if !xd {
            r |= Rights::USER_EXEC;
        }
    }
    if write || !regs.wp {
        r |= Rights::KERN_WRITE;
    }
    // SMEP: no supervisor fetch from a user page.
    let smep_blocks = regs.smep && user;
    if !xd && !smep_blocks {
        r |= Rights::KERN_EXEC;
    }
    if leaf & D != 0 {
        r |= Rights::DIRTY;
    }
    if leaf & G != 0 && regs.pge {
        r |= Rights::GLOBAL;
    }
    r
}

fn translation(regs: &MmuRegs, va: u64, leaf: &Leaf, entry: u64) -> Translation {
    Translation {
        va_base: va & !((1u64 << leaf.shift) - 1),
        pa_base: leaf.pa_base,
        shift: leaf.shift as u8,
        rights: rights(regs, leaf.acc, entry),
    }
}

fn root_start(fmt: Fmt, regs: &MmuRegs) -> Start {
    let table = match fmt {
        Fmt::I386 => regs.root & ADDR_32,
        Fmt::Pae => regs.root & !0x1f,
        Fmt::Amd64 { .. } => regs.root & ADDR_64,
    };
    Start {
        level: 0,
        table,
        acc: ACC_INIT,
    }
}

/// Set A on every entry of `path` and, for a write, D on the leaf; `false` if an entry changed.
fn set_accessed_dirty(
    mem: &PhysMem,
    fmt: Fmt,
    path: &Path,
    write: bool,
    stats: &mut WalkStats,
) -> bool {
    for i in 0..path.n {
        let old = path.val[i];
        let mut new = old | A;
        if write && i + 1 == path.n {
            new |= D;
        }
        if new != old {
            if !fmt.cas(mem, path.pa[i], old, new) {
                return false;
            }
            stats.ad_updates += 1;
        }
    }
    true
}

fn walk_fmt(
    mem: &PhysMem,
    regs: &MmuRegs,
    fmt: Fmt,
    va: u64,
    kind: AccessKind,
    user: bool,
    mut cache: Option<&mut WalkCache>,
) -> WalkResult {
    let mut stats = WalkStats::default();
    if !fmt.canonical(va) {
        return WalkResult {
            result: Err(FaultReason::NonCanonical),
            stats,
            psc_used: None,
        };
    }
    let write = kind == AccessKind::Write;
    let mut attempt = 0;
    loop {
        let hit = cache
            .as_deref()
            .and_then(|c| c.lookup(va, regs.tag))
            .filter(|e| e.level >= 1 && e.level < fmt.levels() && fmt.caches_table_level(e.level));
        stats.psc_hit = hit.is_some();
        let start = match hit {
            Some(e) => Start {
                level: e.level,
                table: e.table_pa,
                acc: e.acc,
            },
            None => root_start(fmt, regs),
        };
        let mut path = Path::new();
        let done = |result, stats| WalkResult {
            result,
            stats,
            psc_used: hit,
        };
        let leaf = match descend(
            mem,
            regs,
            fmt,
            va,
            start,
            cache.as_deref_mut(),
            &mut stats,
            &mut path,
        ) {
            Ok(l) => l,
            Err(f) => return done(Err(f), stats),
        };
        let t = translation(
            regs,
            va,
            &leaf,
            if write { leaf.entry | D } else { leaf.entry },
        );
        if !t.permits(kind, user) {
            return done(Err(FaultReason::Protection { level: leaf.level }), stats);
        }
        if set_accessed_dirty(mem, fmt, &path, write, &mut stats) {
            return done(Ok(t), stats);
        }
        attempt += 1;
        if attempt > MAX_RESTARTS {
            // Lost every race: report the translation as read, without the D we could not set.
            return done(Ok(translation(regs, va, &leaf, leaf.entry)), stats);
        }
    }
}

fn peek_fmt(mem: &PhysMem, regs: &MmuRegs, fmt: Fmt, va: u64) -> Option<Translation> {
    if !fmt.canonical(va) {
        return None;
    }
    let mut stats = WalkStats::default();
    let mut path = Path::new();
    let leaf = descend(
        mem,
        regs,
        fmt,
        va,
        root_start(fmt, regs),
        None,
        &mut stats,
        &mut path,
    )
    .ok()?;
    Some(translation(regs, va, &leaf, leaf.entry))
}

/// amd64 4-level or 5-level walk.
pub(super) fn walk_amd64(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    kind: AccessKind,
    user: bool,
    cache: Option<&mut WalkCache>,
) -> WalkResult {
    let fmt = Fmt::of(regs.mode).unwrap_or(Fmt::Amd64 { levels: 4 });
    walk_fmt(mem, regs, fmt, va, kind, user, cache)
}

/// i386 2-level walk (CR4.PSE).
pub(super) fn walk_i386(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    kind: AccessKind,
    user: bool,
    cache: Option<&mut WalkCache>,
) -> WalkResult {
    walk_fmt(mem, regs, Fmt::I386, va, kind, user, cache)
}

/// i386 PAE walk, from the PDPTE registers.
pub(super) fn walk_pae(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    kind: AccessKind,
    user: bool,
    cache: Option<&mut WalkCache>,
) -> WalkResult {
    walk_fmt(mem, regs, Fmt::Pae, va, kind, user, cache)
}

pub(super) fn peek_amd64(mem: &PhysMem, regs: &MmuRegs, va: u64) -> Option<Translation> {
    let fmt = Fmt::of(regs.mode).unwrap_or(Fmt::Amd64 { levels: 4 });
    peek_fmt(mem, regs, fmt, va)
}

pub(super) fn peek_i386(mem: &PhysMem, regs: &MmuRegs, va: u64) -> Option<Translation> {
    peek_fmt(mem, regs, Fmt::I386, va)
}

pub(super) fn peek_pae(mem: &PhysMem, regs: &MmuRegs, va: u64) -> Option<Translation> {
    peek_fmt(mem, regs, Fmt::Pae, va)
}

/// Whether `e` agrees with the tables: the entries from the root (the PDPTE registers on PAE)
/// down to the one for `e.va_base` that points to `e.level`'s table are valid non-leaf entries,
/// that one points to `e.table_pa`, and together they grant at least `e.acc`. Evaluated against
/// `regs.root`: the caller passes the registers of `e`'s address space.
pub(super) fn psc_entry_current(mem: &PhysMem, regs: &MmuRegs, e: &PscEntry) -> bool {
    let Some(fmt) = Fmt::of(regs.mode) else {
        return false;
    };
    if e.level == 0 || e.level >= fmt.levels() || u32::from(e.shift) != fmt.shift(e.level - 1) {
        return false;
    }
    let va = e.va_base;
    if !fmt.canonical(va) {
        return false;
    }
    let Start {
        mut table, mut acc, ..
    } = root_start(fmt, regs);
    for level in 0..e.level {
        let (pa, ent) = read_entry(mem, regs, fmt, table, va, level);
        if ent & P == 0
            || fmt.reserved(regs, level, ent)
            || (ent & PS != 0 && fmt.large_leaf_at(level))
        {
            return false;
        }
        if pa.is_some() {
            acc = accumulate(acc, ent);
        }
        table = fmt.addr(ent, 12);
    }
    table == e.table_pa && grants_at_least(acc, e.acc)
}

#[cfg(test)]
mod tests {
    use super::super::{pae_load_pdptes, peek, psc_entry_current, walk};
    use super::*;
    use AccessKind::{Execute, Read, Write};
    use FaultReason::*;

    const MEM: u64 = 16 << 20;

    fn regs(mode: Mode, root: u64) -> MmuRegs {
        MmuRegs {
            mode,
            root,
            kernel_root: 0,
            tag: 0,
            pdpte: [0; 4],
            nxe: true,
            wp: true,
            pge: true,
            smep: false,
            hw_af: false,
            hw_dbm: false,
            pa_bits: 46,
        }
    }

    // ---------------------------------------------------------------- amd64, 4-level
    //
    // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
    // VA = PML4 index 1, PDPT index 2, PD index 3, PT index 4 = 0x0000_0080_8060_4000.
    const VA4: u64 = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12);
    const PML4E: u64 = 0x1000 + 8;
    const PDPTE: u64 = 0x2000 + 2 * 8;
    const PDE: u64 = 0x3000 + 3 * 8;
    const PTE: u64 = 0x4000 + 4 * 8;

    /// Upper entries P|RW|US (0x7), leaf P|RW|US -> PA 0x0123_4000.
    fn amd64_tables() -> (PhysMem, MmuRegs) {
        let m = PhysMem::new(MEM);
        m.store_u64(PML4E, 0x2007);
        m.store_u64(PDPTE, 0x3007);
        m.store_u64(PDE, 0x4007);
        m.store_u64(PTE, 0x0123_4007);
        (m, regs(Mode::Amd64 { la57: false }, 0x1000))
    }

    fn fault(m: &PhysMem, r: &MmuRegs, va: u64, kind: AccessKind, user: bool) -> FaultReason {
        walk(m, r, va, kind, user, None).result.unwrap_err()
    }

    fn ok(m: &PhysMem, r: &MmuRegs, va: u64, kind: AccessKind, user: bool) -> Translation {
        walk(m, r, va, kind, user, None).result.unwrap()
    }

    #[test]
    fn amd64_4k_read_sets_accessed_on_every_level_not_dirty() {
        let (m, r) = amd64_tables();
        let w = walk(&m, &r, VA4 + 0x123, Read, true, None);
        let t = w.result.unwrap();
        assert_eq!(t.va_base, VA4);
        assert_eq!(t.pa_base, 0x0123_4000);
        assert_eq!(t.shift, 12);
        assert_eq!(t.pa_of(VA4 + 0x123), 0x0123_4123);
        let all = Rights::USER_READ
            | Rights::USER_WRITE
            | Rights::USER_EXEC
            | Rights::KERN_READ
            | Rights::KERN_WRITE
            | Rights::KERN_EXEC;
        assert_eq!(t.rights, all);
        assert_eq!(
            w.stats,
            WalkStats {
                reads: 4,
                ad_updates: 4,
                psc_hit: false
            }
        );
        assert_eq!(w.psc_used, None);
        assert_eq!(m.load_u64(PML4E), 0x2027);
        assert_eq!(m.load_u64(PDPTE), 0x3027);
        assert_eq!(m.load_u64(PDE), 0x4027);
        assert_eq!(m.load_u64(PTE), 0x0123_4027);
        // A second read: nothing left to set.
        let w = walk(&m, &r, VA4, Read, false, None);
        assert_eq!(w.stats.ad_updates, 0);
        assert!(!w.result.unwrap().rights.contains(Rights::DIRTY));
    }

    #[test]
    fn amd64_write_sets_dirty_on_the_leaf_only() {
        let (m, r) = amd64_tables();
        let w = walk(&m, &r, VA4, Write, true, None);
        assert!(w.result.unwrap().rights.contains(Rights::DIRTY));
        assert_eq!(w.stats.ad_updates, 4);
        assert_eq!(m.load_u64(PML4E), 0x2027);
        assert_eq!(m.load_u64(PDPTE), 0x3027);
        assert_eq!(m.load_u64(PDE), 0x4027); // bit 6 of a PDE pointing to a table stays 0
        assert_eq!(m.load_u64(PTE), 0x0123_4067);
        // Read first, then write: the write updates the leaf only (one CAS setting D).
        let (m, r) = amd64_tables();
        ok(&m, &r, VA4, Read, false);
        let w = walk(&m, &r, VA4, Write, false, None);
        assert_eq!(w.stats.ad_updates, 1);
        assert_eq!(m.load_u64(PTE), 0x0123_4067);
    }

    #[test]
    fn amd64_2m_and_1g_pages() {
        let (m, r) = amd64_tables();
        // PDE with PS: 2 MiB page at PA 0x4_0060_0000, PAT bit 12 set (not an address bit).
        m.store_u64(PDE, 0x0000_0004_0060_1087);
        let w = walk(&m, &r, VA4 + 0x5678, Write, true, None);
        let t = w.result.unwrap();
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (VA4 & !0x1f_ffff, 0x4_0060_0000, 21)
        );
        assert_eq!(t.pa_of(VA4 + 0x5678), 0x4_0060_9678);
        assert_eq!(w.stats.reads, 3);
        assert_eq!(m.load_u64(PDE), 0x0000_0004_0060_10e7);
        assert_eq!(m.load_u64(PTE), 0x0123_4007); // not used
                                                  // PDPTE with PS: 1 GiB page at PA 0x40_4000_0000.
        m.store_u64(PDPTE, 0x0000_0040_4000_0087);
        let t = ok(&m, &r, VA4, Read, true);
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (VA4 & !0x3fff_ffff, 0x40_4000_0000, 30)
        );
        assert_eq!(t.pa_of(VA4 + 7), 0x40_4000_0000 + (VA4 & 0x3fff_ffff) + 7);
        assert_eq!(m.load_u64(PDPTE), 0x0000_0040_4000_00a7);
    }

    #[test]
    fn amd64_not_present_at_each_level() {
        for (level, pa) in [(0u8, PML4E), (1, PDPTE), (2, PDE), (3, PTE)] {
            let (m, r) = amd64_tables();
            m.store_u64(pa, m.load_u64(pa) & !P);
            assert_eq!(fault(&m, &r, VA4, Read, false), NotPresent { level });
            assert_eq!(peek(&m, &r, VA4), None);
        }
    }

    #[test]
    fn amd64_reserved_bits() {
        // A PA bit at MAXPHYADDR (46) at each level.
        for (level, pa) in [(0u8, PML4E), (1, PDPTE), (2, PDE), (3, PTE)] {
            let (m, r) = amd64_tables();
            m.store_u64(pa, m.load_u64(pa) | (1 << 46));
            assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level });
            assert_eq!(peek(&m, &r, VA4), None);
            // Bit 51 too; bits 52-62 are ignored.
            let (m, r) = amd64_tables();
            m.store_u64(pa, m.load_u64(pa) | (1 << 51));
            assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level });
            let (m, r) = amd64_tables();
            m.store_u64(pa, m.load_u64(pa) | 0x7ff0_0000_0000_0000);
            assert!(walk(&m, &r, VA4, Read, false, None).result.is_ok());
            // XD without EFER.NXE.
            let (m, mut r) = amd64_tables();
            r.nxe = false;
            m.store_u64(pa, m.load_u64(pa) | XD);
            assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level });
        }
        // With MAXPHYADDR 52 no address bit is reserved.
        let (m, mut r) = amd64_tables();
        r.pa_bits = 52;
        m.store_u64(PTE, 0x000f_0000_0000_0007);
        assert_eq!(ok(&m, &r, VA4, Read, false).pa_base, 0x000f_0000_0000_0000);
        // PS in a PML4E.
        let (m, r) = amd64_tables();
        m.store_u64(PML4E, 0x2087);
        assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level: 0 });
        // 2 MiB leaf with bit 13 (bits 20:13 reserved).
        let (m, r) = amd64_tables();
        m.store_u64(PDE, 0x0060_2087);
        assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level: 2 });
        // 1 GiB leaf with bit 29 (bits 29:13 reserved).
        let (m, r) = amd64_tables();
        m.store_u64(PDPTE, 0x6000_0087);
        assert_eq!(fault(&m, &r, VA4, Read, false), ReservedBit { level: 1 });
        // PTE bit 7 is PAT, not reserved.
        let (m, r) = amd64_tables();
        m.store_u64(PTE, 0x0123_4087);
        assert_eq!(ok(&m, &r, VA4, Read, false).shift, 12);
    }

    #[test]
    fn amd64_non_canonical() {
        let (m, r) = amd64_tables();
        for va in [
            0x0000_8000_0000_0000u64,
            0xffff_7fff_ffff_f000,
            0x0001_0000_0000_0000,
        ] {
            assert_eq!(fault(&m, &r, va, Read, false), NonCanonical);
            assert_eq!(peek(&m, &r, va), None);
        }
        // The upper half: PML4 index 511.
        m.store_u64(0x1000 + 511 * 8, 0x2003);
        let va = 0xffff_ff80_0000_0000 | (2 << 30) | (3 << 21) | (4 << 12);
        let t = ok(&m, &r, va, Read, false);
        assert_eq!((t.va_base, t.pa_base), (va, 0x0123_4000));
        assert!(!t.rights.contains(Rights::USER_READ));
    }

    #[test]
    fn amd64_user_supervisor_and_write_protect() {
        // U/S = 0 in the PDPTE: user accesses fault at the leaf level, supervisor ones do not.
        let (m, r) = amd64_tables();
        m.store_u64(PDPTE, 0x3003);
        assert_eq!(fault(&m, &r, VA4, Read, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA4, Execute, true), Protection { level: 3 });
        let t = ok(&m, &r, VA4, Write, false);
        assert!(!t
            .rights
            .intersects(Rights::USER_READ | Rights::USER_WRITE | Rights::USER_EXEC));
        // R/W = 0 in the PD: user writes fault; supervisor writes fault with CR0.WP only.
        let (m, mut r) = amd64_tables();
        m.store_u64(PDE, 0x4005);
        assert_eq!(fault(&m, &r, VA4, Write, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA4, Write, false), Protection { level: 3 });
        assert_eq!(m.load_u64(PTE), 0x0123_4007); // nothing set on the faulting walks
        assert_eq!(m.load_u64(PML4E), 0x2007);
        let t = ok(&m, &r, VA4, Read, true);
        assert!(t.rights.contains(Rights::USER_READ) && !t.rights.contains(Rights::KERN_WRITE));
        r.wp = false;
        let t = ok(&m, &r, VA4, Write, false);
        assert!(t.rights.contains(Rights::KERN_WRITE | Rights::DIRTY));
        assert!(!t.rights.contains(Rights::USER_WRITE));
        assert_eq!(fault(&m, &r, VA4, Write, true), Protection { level: 3 });
        assert_eq!(m.load_u64(PTE), 0x0123_4067);
        // A 2 MiB leaf faults at level 2.
        let (m, r) = amd64_tables();
        m.store_u64(PDE, 0x0060_0085);
        assert_eq!(fault(&m, &r, VA4, Write, true), Protection { level: 2 });
    }

    #[test]
    fn amd64_execute_disable_and_smep() {
        let (m, mut r) = amd64_tables();
        m.store_u64(PDE, 0x8000_0000_0000_4007); // XD in the PDE
        assert_eq!(fault(&m, &r, VA4, Execute, true), Protection { level: 3 });
        assert_eq!(fault(&m, &r, VA4, Execute, false), Protection { level: 3 });
        let t = ok(&m, &r, VA4, Read, true);
        assert!(!t.rights.intersects(Rights::USER_EXEC | Rights::KERN_EXEC));
        assert!(t.rights.contains(Rights::USER_READ | Rights::USER_WRITE));
        // Without NXE, XD is reserved (tested above); clear it: executable.
        m.store_u64(PDE, 0x4007);
        r.nxe = false;
        assert!(ok(&m, &r, VA4, Execute, true)
            .rights
            .contains(Rights::KERN_EXEC));
        // SMEP: supervisor fetches from a user page fault; user fetches do not.
        r.smep = true;
        assert_eq!(fault(&m, &r, VA4, Execute, false), Protection { level: 3 });
        assert!(ok(&m, &r, VA4, Execute, true)
            .rights
            .contains(Rights::USER_EXEC));
        assert!(ok(&m, &r, VA4, Read, false)
            .rights
            .contains(Rights::KERN_READ));
        // U/S = 0 anywhere makes it a supervisor page: SMEP does not apply.
        m.store_u64(PTE, 0x0123_4003);
        assert!(ok(&m, &r, VA4, Execute, false)
            .rights
            .contains(Rights::KERN_EXEC));
    }

    #[test]
    fn amd64_global_needs_pge() {
        let (m, mut r) = amd64_tables();
        m.store_u64(PTE, 0x0123_4107);
        assert!(ok(&m, &r, VA4, Read, false).rights.contains(Rights::GLOBAL));
        r.pge = false;
        assert!(!ok(&m, &r, VA4, Read, false).rights.contains(Rights::GLOBAL));
        // G in a non-leaf entry means nothing.
        let (m, r) = amd64_tables();
        m.store_u64(PDE, 0x4107);
        assert!(!ok(&m, &r, VA4, Read, false).rights.contains(Rights::GLOBAL));
    }

    #[test]
    fn amd64_la57() {
        // PML5 at 0x5000; PML5 index 1 -> the PML4 at 0x1000.
        let (m, mut r) = amd64_tables();
        r.mode = Mode::Amd64 { la57: true };
        r.root = 0x5000;
        m.store_u64(0x5000 + 8, 0x1007);
        let va = (1u64 << 48) | VA4;
        let w = walk(&m, &r, va, Read, true, None);
        assert_eq!(w.result.unwrap().pa_base, 0x0123_4000);
        assert_eq!(w.stats.reads, 5);
        assert_eq!(m.load_u64(0x5008), 0x1027);
        // Bit 56 set: canonical only with bits 63:57 set too (PML5 index 511).
        assert_eq!(fault(&m, &r, 1 << 56, Read, false), NonCanonical);
        let hi = 0xff00_0000_0000_0000u64 | VA4 | (0x1ff << 48);
        assert_eq!(fault(&m, &r, hi, Read, false), NotPresent { level: 0 });
        m.store_u64(0x5000 + 511 * 8, 0x1003);
        let t = ok(&m, &r, hi, Read, false);
        assert_eq!((t.va_base, t.pa_base), (hi, 0x0123_4000));
        // A VA that is non-canonical with 4 levels is fine with 5.
        assert!(Fmt::Amd64 { levels: 5 }.canonical(0x0000_8000_0000_0000));
        assert!(!Fmt::Amd64 { levels: 4 }.canonical(0x0000_8000_0000_0000));
        // PS in a PML5E is reserved.
        m.store_u64(0x5008, 0x1087);
        assert_eq!(fault(&m, &r, va, Read, false), ReservedBit { level: 0 });
        // The PML5E is cached too.
        m.store_u64(0x5008, 0x1007);
        let mut c = WalkCache::for_mode(r.mode);
        walk(&m, &r, va, Read, false, Some(&mut c));
        let shifts: Vec<u8> = c.iter().map(|e| e.shift).collect();
        assert_eq!(shifts, vec![48, 39, 30, 21]);
        assert!(c.iter().all(|e| psc_entry_current(&m, &r, e)));
    }

    #[test]
    fn amd64_walk_cache() {
        let (m, r) = amd64_tables();
        let mut c = WalkCache::for_mode(r.mode);
        let w = walk(&m, &r, VA4, Read, true, Some(&mut c));
        assert!(!w.stats.psc_hit && w.psc_used.is_none());
        assert_eq!(c.len(), 3);
        let pde_entry = PscEntry {
            tag: 0,
            level: 3,
            va_base: VA4 & !0x1f_ffff,
            shift: 21,
            table_pa: 0x4000,
            acc: RW | US,
            upper: false,
        };
        assert_eq!(c.lookup(VA4, 0), Some(pde_entry));
        assert!(c.iter().all(|e| psc_entry_current(&m, &r, e)));
        // The neighbouring page: one read, from the cached PDE.
        m.store_u64(PTE + 8, 0x0999_9007);
        let w = walk(&m, &r, VA4 + 0x1000, Write, true, Some(&mut c));
        assert_eq!(w.result.unwrap().pa_base, 0x0999_9000);
        assert!(w.stats.psc_hit);
        assert_eq!(w.psc_used, Some(pde_entry));
        assert_eq!((w.stats.reads, w.stats.ad_updates), (1, 1));
        assert_eq!(m.load_u64(PTE + 8), 0x0999_9067);
        // The cache is used even when memory changed: the hardware behaviour the kernel must
        // invalidate against.
        m.store_u64(PDE, 0);
        assert!(!psc_entry_current(&m, &r, &pde_entry));
        assert!(walk(&m, &r, VA4, Read, true, Some(&mut c)).result.is_ok());
        assert_eq!(peek(&m, &r, VA4), None);
        c.invalidate_va(VA4, Some(0));
        let w = walk(&m, &r, VA4, Read, true, Some(&mut c));
        // invalidate_va dropped every entry covering VA4 (PML4E, PDPTE and PDE caches): the walk
        // starts from the root and refills the two valid levels.
        assert_eq!(w.result, Err(NotPresent { level: 2 }));
        assert!(!w.stats.psc_hit);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn amd64_walk_cache_refill_and_currency() {
        let (m, r) = amd64_tables();
        let mut c = WalkCache::for_mode(r.mode);
        walk(&m, &r, VA4, Read, true, Some(&mut c));
        c.invalidate_va(VA4, None);
        assert!(c.is_empty());
        // A faulting walk still fills the cache for the valid upper entries.
        m.store_u64(PTE, 0);
        let w = walk(&m, &r, VA4, Read, true, Some(&mut c));
        assert_eq!(w.result, Err(NotPresent { level: 3 }));
        assert!(!w.stats.psc_hit);
        assert_eq!(c.len(), 3);
        m.store_u64(PTE, 0x0123_4007);
        // Rights: cached R/W = 1; memory now R/W = 0 in the PML4E: the cache is more permissive.
        let pml4_entry = *c.iter().find(|e| e.level == 1).unwrap();
        let pde_entry = c.lookup(VA4, 0).unwrap();
        m.store_u64(PML4E, 0x2025);
        assert!(!psc_entry_current(&m, &r, &pml4_entry));
        assert!(!psc_entry_current(&m, &r, &pde_entry));
        // Cached acc less permissive than memory: still current.
        let strict = PscEntry {
            acc: US,
            ..pml4_entry
        };
        assert!(psc_entry_current(&m, &r, &strict));
        let strict = PscEntry {
            acc: US | XD,
            ..pml4_entry
        };
        assert!(psc_entry_current(&m, &r, &strict));
        // XD added in memory: a cached entry without XD is more permissive.
        m.store_u64(PML4E, XD | 0x2027);
        assert!(psc_entry_current(&m, &r, &strict));
        assert!(!psc_entry_current(
            &m,
            &r,
            &PscEntry {
                acc: US,
                ..pml4_entry
            }
        ));
        // A cached entry pointing elsewhere, or one whose path now ends in a leaf, is stale.
        m.store_u64(PML4E, 0x2027);
        assert!(psc_entry_current(&m, &r, &pde_entry));
        assert!(!psc_entry_current(
            &m,
            &r,
            &PscEntry {
                table_pa: 0x7000,
                ..pde_entry
            }
        ));
        m.store_u64(PDPTE, 0x4000_0087);
        assert!(!psc_entry_current(&m, &r, &pde_entry));
        // With a cached PDE, the walk uses the cached acc: the neighbour page is user-readable
        // although memory now says otherwise (until invalidated).
        m.store_u64(PDPTE, 0x3003);
        assert!(walk(&m, &r, VA4, Read, true, Some(&mut c)).result.is_ok());
        c.invalidate_tag(0);
        assert_eq!(
            walk(&m, &r, VA4, Read, true, Some(&mut c)).result,
            Err(Protection { level: 3 })
        );
        // Tags: another PCID does not hit this one's entries.
        let mut r2 = r;
        r2.tag = 7;
        let w = walk(&m, &r2, VA4, Read, false, Some(&mut c));
        assert!(!w.stats.psc_hit);
        assert!(c.iter().any(|e| e.tag == 7));
        c.invalidate_all();
        assert!(c.is_empty());
    }

    #[test]
    fn amd64_peek_has_no_side_effects() {
        let (m, r) = amd64_tables();
        m.store_u64(PDE, 0x4005); // read-only
        let t = peek(&m, &r, VA4 + 0x10).unwrap();
        assert_eq!((t.va_base, t.pa_base, t.shift), (VA4, 0x0123_4000, 12));
        assert!(!t.rights.contains(Rights::KERN_WRITE | Rights::DIRTY));
        assert_eq!(m.load_u64(PTE), 0x0123_4007);
        assert_eq!(m.load_u64(PML4E), 0x2007);
        m.store_u64(PTE, 0x0123_4047);
        assert!(peek(&m, &r, VA4).unwrap().rights.contains(Rights::DIRTY));
    }

    #[test]
    fn amd64_concurrent_walks_of_a_fresh_entry() {
        for _ in 0..50 {
            let (m, r) = amd64_tables();
            let results: Vec<WalkResult> = std::thread::scope(|s| {
                let a = s.spawn(|| walk(&m, &r, VA4, Write, true, None));
                let b = s.spawn(|| walk(&m, &r, VA4 + 8, Read, true, None));
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            assert!(results.iter().all(|w| w.result.is_ok()));
            // Each flag is set once: the loser of a race restarts and finds it set.
            let updates: u32 = results.iter().map(|w| w.stats.ad_updates).sum();
            assert!((4..=5).contains(&updates), "{updates}");
            assert_eq!(m.load_u64(PML4E), 0x2027);
            assert_eq!(m.load_u64(PDPTE), 0x3027);
            assert_eq!(m.load_u64(PDE), 0x4027);
            assert_eq!(m.load_u64(PTE), 0x0123_4067);
        }
    }

    #[test]
    fn amd64_walk_restarts_when_the_entry_changes_under_it() {
        let (m, r) = amd64_tables();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Flip a software bit and clear A/D over and over.
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    m.store_u64(PTE, 0x0123_4007 | ((i & 1) << 9));
                    i += 1;
                }
            });
            for _ in 0..2000 {
                let w = walk(&m, &r, VA4, Write, true, None);
                assert_eq!(w.result.unwrap().pa_base, 0x0123_4000);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        m.store_u64(PTE, 0x0123_4007);
        assert!(walk(&m, &r, VA4, Write, true, None)
            .result
            .unwrap()
            .rights
            .contains(Rights::DIRTY));
        assert_eq!(m.load_u64(PTE), 0x0123_4067);
    }

    // ---------------------------------------------------------------- i386, 2-level
    //
    // PD at 0x1000 (1024 4-byte entries), PT at 0x2000. VA = PD index 0x301, PT index 0x45.
    const VA32: u64 = (0x301 << 22) | (0x45 << 12);
    const PDE32: u64 = 0x1000 + 0x301 * 4;
    const PTE32: u64 = 0x2000 + 0x45 * 4;

    fn i386_tables() -> (PhysMem, MmuRegs) {
        let m = PhysMem::new(MEM);
        m.store_u32(PDE32, 0x2007);
        m.store_u32(PTE32, 0xfedc_b007);
        // Neighbours sharing the 8-byte words, which must not be disturbed.
        m.store_u32(PDE32 - 4, 0xaaaa_a000);
        m.store_u32(PTE32 - 4, 0xbbbb_b000);
        let mut r = regs(Mode::I386, 0x1000);
        r.nxe = false;
        r.pa_bits = 32;
        (m, r)
    }

    #[test]
    fn i386_4k_walk_and_accessed_dirty() {
        let (m, r) = i386_tables();
        let w = walk(&m, &r, VA32 + 0xabc, Read, true, None);
        let t = w.result.unwrap();
        assert_eq!((t.va_base, t.pa_base, t.shift), (VA32, 0xfedc_b000, 12));
        assert_eq!(t.pa_of(VA32 + 0xabc), 0xfedc_babc);
        assert!(t.rights.contains(Rights::USER_EXEC | Rights::KERN_EXEC)); // no XD on i386
        assert_eq!((w.stats.reads, w.stats.ad_updates), (2, 2));
        assert_eq!(m.load_u32(PDE32), 0x2027);
        assert_eq!(m.load_u32(PTE32), 0xfedc_b027);
        ok(&m, &r, VA32, Write, true);
        assert_eq!(m.load_u32(PDE32), 0x2027);
        assert_eq!(m.load_u32(PTE32), 0xfedc_b067);
        assert_eq!(m.load_u32(PDE32 - 4), 0xaaaa_a000);
        assert_eq!(m.load_u32(PTE32 - 4), 0xbbbb_b000);
    }

    #[test]
    fn i386_4m_pages_and_reserved_bits() {
        let (m, r) = i386_tables();
        m.store_u32(PDE32, 0xc040_1087); // 4 MiB at 0xc040_0000, PAT (bit 12) set
        let w = walk(&m, &r, VA32 + 0x17, Write, false, None);
        let t = w.result.unwrap();
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (0x301 << 22, 0xc040_0000, 22)
        );
        assert_eq!(t.pa_of(VA32 + 0x17), 0xc040_0000 + (0x45 << 12) + 0x17);
        assert_eq!(w.stats.reads, 1);
        assert_eq!(m.load_u32(PDE32), 0xc040_10e7);
        // Bits 21:13 of a 4 MiB PDE are reserved (no PSE-36).
        for bit in 13..=21 {
            m.store_u32(PDE32, 0xc040_0087 | (1 << bit));
            assert_eq!(fault(&m, &r, VA32, Read, false), ReservedBit { level: 0 });
        }
        // A PDE pointing to a table has no reserved bits.
        m.store_u32(PDE32, 0x2f47);
        assert_eq!(ok(&m, &r, VA32, Read, false).pa_base, 0xfedc_b000);
    }

    #[test]
    fn i386_faults() {
        let (m, r) = i386_tables();
        assert_eq!(fault(&m, &r, 1 << 32, Read, false), NonCanonical);
        assert_eq!(peek(&m, &r, 1 << 32), None);
        assert_eq!(
            fault(&m, &r, VA32 + (1 << 22), Read, false),
            NotPresent { level: 0 }
        );
        m.store_u32(PTE32, 0xfedc_b006);
        assert_eq!(fault(&m, &r, VA32, Read, false), NotPresent { level: 1 });
        // U/S and R/W are ANDed across the two levels.
        let (m, mut r) = i386_tables();
        m.store_u32(PDE32, 0x2003);
        assert_eq!(fault(&m, &r, VA32, Read, true), Protection { level: 1 });
        m.store_u32(PDE32, 0x2005);
        assert_eq!(fault(&m, &r, VA32, Write, true), Protection { level: 1 });
        assert_eq!(fault(&m, &r, VA32, Write, false), Protection { level: 1 });
        assert_eq!(m.load_u32(PTE32), 0xfedc_b007);
        r.wp = false;
        ok(&m, &r, VA32, Write, false);
        assert_eq!(m.load_u32(PTE32), 0xfedc_b067);
        // A 4-byte entry cannot hold XD: SMEP still applies.
        r.smep = true;
        assert_eq!(fault(&m, &r, VA32, Execute, false), Protection { level: 1 });
    }

    #[test]
    fn i386_walk_cache() {
        let (m, r) = i386_tables();
        let mut c = WalkCache::for_mode(Mode::I386);
        walk(&m, &r, VA32, Read, true, Some(&mut c));
        let e = c.lookup(VA32, 0).unwrap();
        assert_eq!(
            (e.level, e.shift, e.table_pa, e.va_base),
            (1, 22, 0x2000, 0x301 << 22)
        );
        assert_eq!(c.len(), 1);
        m.store_u32(PTE32 + 4, 0x0010_0007);
        let w = walk(&m, &r, VA32 + 0x1000, Read, true, Some(&mut c));
        assert!(w.stats.psc_hit);
        assert_eq!(w.stats.reads, 1);
        assert_eq!(w.result.unwrap().pa_base, 0x0010_0000);
        assert!(psc_entry_current(&m, &r, &e));
        m.store_u32(PDE32, 0x3027);
        assert!(!psc_entry_current(&m, &r, &e));
        // 4 MiB leaves are not cached.
        c.invalidate_all();
        m.store_u32(PDE32, 0xc040_0087);
        walk(&m, &r, VA32, Read, true, Some(&mut c));
        assert!(c.is_empty());
    }

    // ---------------------------------------------------------------- i386 PAE
    //
    // PDPT at 0x1000 (4 entries, 32-byte aligned), PD at 0x2000, PT at 0x3000.
    // VA = PDPT index 2, PD index 5, PT index 6.
    const VAP: u64 = (2 << 30) | (5 << 21) | (6 << 12);
    const PDPTE_P: u64 = 0x1000 + 2 * 8;
    const PDE_P: u64 = 0x2000 + 5 * 8;
    const PTE_P: u64 = 0x3000 + 6 * 8;

    fn pae_tables() -> (PhysMem, MmuRegs) {
        let m = PhysMem::new(MEM);
        m.store_u64(PDPTE_P, 0x2001);
        m.store_u64(PDE_P, 0x3007);
        m.store_u64(PTE_P, 0x0000_0008_7654_3007);
        let mut r = regs(Mode::I386Pae, 0x1000);
        r.pa_bits = 36;
        r.pdpte = pae_load_pdptes(&m, 0x1000);
        (m, r)
    }

    #[test]
    fn pae_4k_and_2m() {
        let (m, r) = pae_tables();
        let w = walk(&m, &r, VAP + 0x321, Write, true, None);
        let t = w.result.unwrap();
        assert_eq!((t.va_base, t.pa_base, t.shift), (VAP, 0x8_7654_3000, 12));
        assert!(t
            .rights
            .contains(Rights::USER_WRITE | Rights::DIRTY | Rights::USER_EXEC));
        // Two memory reads (PDE, PTE): the PDPTE comes from the register.
        assert_eq!((w.stats.reads, w.stats.ad_updates), (2, 2));
        assert_eq!(m.load_u64(PDPTE_P), 0x2001); // no A on a PDPTE
        assert_eq!(m.load_u64(PDE_P), 0x3027);
        assert_eq!(m.load_u64(PTE_P), 0x0000_0008_7654_3067);
        m.store_u64(PDE_P, 0x8000_0000_00a0_0083); // 2 MiB at 0xa0_0000, XD, supervisor
        let t = ok(&m, &r, VAP, Read, false);
        assert_eq!(
            (t.va_base, t.pa_base, t.shift),
            (VAP & !0x1f_ffff, 0xa0_0000, 21)
        );
        assert!(!t.rights.intersects(Rights::KERN_EXEC | Rights::USER_READ));
        assert_eq!(fault(&m, &r, VAP, Execute, false), Protection { level: 1 });
        assert_eq!(fault(&m, &r, VAP, Read, true), Protection { level: 1 });
    }

    #[test]
    fn pae_faults_and_reserved_bits() {
        let (m, r) = pae_tables();
        assert_eq!(fault(&m, &r, 1 << 32, Read, false), NonCanonical);
        assert_eq!(
            fault(&m, &r, VAP - (1 << 30), Read, false),
            NotPresent { level: 0 }
        );
        // PDPTE reserved bits 1, 2, 5-8, and 63:MAXPHYADDR (no XD in a PDPTE).
        for bits in [
            1u64 << 1,
            1 << 2,
            1 << 5,
            1 << 6,
            1 << 7,
            1 << 8,
            1 << 63,
            1 << 36,
            1 << 55,
        ] {
            let mut r2 = r;
            r2.pdpte[2] = 0x2001 | bits;
            assert_eq!(
                fault(&m, &r2, VAP, Read, false),
                ReservedBit { level: 0 },
                "{bits:#x}"
            );
            assert_eq!(peek(&m, &r2, VAP), None);
        }
        // PWT, PCD and the ignored bits 11:9 are fine.
        let mut r2 = r;
        r2.pdpte[2] = 0x2e19;
        assert!(walk(&m, &r2, VAP, Read, false, None).result.is_ok());
        // PDE/PTE: bits 62:MAXPHYADDR reserved, XD reserved without NXE, 2 MiB bits 20:13.
        for (level, pa) in [(1u8, PDE_P), (2, PTE_P)] {
            for bits in [1u64 << 36, 1 << 51, 1 << 52, 1 << 62] {
                let (m, r) = pae_tables();
                m.store_u64(pa, m.load_u64(pa) | bits);
                assert_eq!(
                    fault(&m, &r, VAP, Read, false),
                    ReservedBit { level },
                    "{bits:#x}"
                );
            }
            let (m, mut r) = pae_tables();
            r.nxe = false;
            m.store_u64(pa, m.load_u64(pa) | XD);
            assert_eq!(fault(&m, &r, VAP, Read, false), ReservedBit { level });
            m.store_u64(pa, m.load_u64(pa) & !XD);
            assert!(walk(&m, &r, VAP, Read, false, None).result.is_ok());
        }
        let (m, r) = pae_tables();
        m.store_u64(PDE_P, 0x00a0_2083);
        assert_eq!(fault(&m, &r, VAP, Read, false), ReservedBit { level: 1 });
        m.store_u64(PDE_P, 0x3006);
        assert_eq!(fault(&m, &r, VAP, Read, false), NotPresent { level: 1 });
        m.store_u64(PDE_P, 0x3007);
        m.store_u64(PTE_P, 0);
        assert_eq!(fault(&m, &r, VAP, Read, false), NotPresent { level: 2 });
    }

    #[test]
    fn pae_uses_the_pdpte_registers() {
        let (m, mut r) = pae_tables();
        // A second PD at 0x4000 whose entry 5 maps a 2 MiB page at 0x60_0000; the PDPT in
        // memory now points to it.
        m.store_u64(0x4000 + 5 * 8, 0x0060_0083);
        m.store_u64(PDPTE_P, 0x4001);
        // Memory changed, the registers did not: the old PD is still walked.
        assert_eq!(ok(&m, &r, VAP, Read, false).pa_base, 0x8_7654_3000);
        assert_eq!(peek(&m, &r, VAP).unwrap().pa_base, 0x8_7654_3000);
        assert_eq!(
            super::super::pae_pdpte_stale(&m, &r),
            Some((2, 0x2001, 0x4001))
        );
        // A PDPTE cleared in memory only: still translates.
        m.store_u64(PDPTE_P, 0);
        assert!(walk(&m, &r, VAP, Read, false, None).result.is_ok());
        m.store_u64(PDPTE_P, 0x4001);
        // CR3 reload.
        r.pdpte = pae_load_pdptes(&m, 0x1000);
        assert_eq!(super::super::pae_pdpte_stale(&m, &r), None);
        let t = ok(&m, &r, VAP, Read, false);
        assert_eq!((t.pa_base, t.shift), (0x0060_0000, 21));
    }

    #[test]
    fn pae_walk_cache() {
        let (m, mut r) = pae_tables();
        let mut c = WalkCache::for_mode(Mode::I386Pae);
        walk(&m, &r, VAP, Read, true, Some(&mut c));
        // Only the PDE is cached (the PDPTE registers are the upper level).
        assert_eq!(c.len(), 1);
        let e = c.lookup(VAP, 0).unwrap();
        assert_eq!(
            (e.level, e.shift, e.table_pa, e.va_base),
            (2, 21, 0x3000, VAP & !0x1f_ffff)
        );
        let w = walk(&m, &r, VAP + 0x1000, Read, true, Some(&mut c));
        assert!(w.stats.psc_hit);
        assert_eq!(w.stats.reads, 1);
        assert_eq!(w.result, Err(NotPresent { level: 2 }));
        assert!(psc_entry_current(&m, &r, &e));
        // Currency is judged from the registers: a memory-only PDPTE change does not matter...
        m.store_u64(PDPTE_P, 0x5001);
        assert!(psc_entry_current(&m, &r, &e));
        // ...until the registers are reloaded.
        r.pdpte = pae_load_pdptes(&m, 0x1000);
        assert!(!psc_entry_current(&m, &r, &e));
    }
}
