//! The MMU walkers: one per format, written from the architecture manuals (Intel SDM vol. 3A
//! ch. 4; Arm ARM VMSAv8-64), sharing no code with vmsys's page-table code, so that they are an
//! independent oracle for it.
//!
//! A walk reads page-table words from simulated physical memory, checks permissions, sets
//! accessed/dirty state atomically as the hardware does, and optionally consults and fills the
//! CPU's paging-structure (walk) cache.

use bitflags::bitflags;
use vmsys::platform::{AccessKind, FaultReason};

use crate::mem::PhysMem;

pub mod psc;
pub use psc::{PscEntry, WalkCache};

/// The paging mode of the simulated MMU (the sim's own notion, independent of vmsys-arch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// x86-64 4-level paging (`la57 == false`) or 5-level paging.
    Amd64 { la57: bool },
    /// AArch64, 4 KiB granule, T0SZ = T1SZ = 16 (48-bit VAs), 4 levels from L0.
    Arm64,
    /// i386 2-level paging with CR4.PSE (4 MiB pages).
    I386,
    /// i386 PAE paging: PDPTE registers, 2 MiB pages.
    I386Pae,
}

/// The MMU control state of one CPU that a walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuRegs {
    pub mode: Mode,
    /// CR3 page-table base (PDPT base, 32-byte aligned, on PAE) or TTBR0_EL1 base.
    pub root: u64,
    /// TTBR1_EL1 base (arm64 only).
    pub kernel_root: u64,
    /// Current PCID (CR3[11:0] with CR4.PCIDE) or ASID (TTBR0[63:48]); 0 where none.
    pub tag: u16,
    /// PAE: the four PDPTE registers loaded by the last CR3 write.
    pub pdpte: [u64; 4],
    /// EFER.NXE: bit 63 is XD (else reserved on PAE/amd64).
    pub nxe: bool,
    /// CR0.WP: supervisor writes honour read-only entries.
    pub wp: bool,
    /// CR4.PGE: the G bit makes TLB entries global.
    pub pge: bool,
    /// CR4.SMEP: supervisor instruction fetch from user pages faults.
    pub smep: bool,
    /// arm64 TCR_EL1.HA: hardware sets AF; without it AF = 0 raises an Access Flag fault.
    pub hw_af: bool,
    /// arm64 TCR_EL1.HD: DBM = 1 makes a read-only entry writable-clean; a write clears AP[2].
    pub hw_dbm: bool,
    /// MAXPHYADDR (x86) / output-address size (arm64) in bits: higher address bits are reserved.
    pub pa_bits: u8,
}

bitflags! {
    /// What a translation allows, for user and supervisor accesses, plus cached state.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Rights: u16 {
        const USER_READ = 1 << 0;
        const USER_WRITE = 1 << 1;
        const USER_EXEC = 1 << 2;
        const KERN_READ = 1 << 3;
        const KERN_WRITE = 1 << 4;
        const KERN_EXEC = 1 << 5;
        /// A write may proceed without touching the entry: x86 D = 1; arm64 AP[2] = 0.
        /// Without it a permitted write goes back to the tables to set the dirty state.
        const DIRTY = 1 << 6;
        /// The TLB entry may be global (x86 G with CR4.PGE; arm64 nG = 0).
        const GLOBAL = 1 << 7;
    }
}

/// A successful translation: what a TLB entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The VA of the start of the mapped page (aligned to `1 << shift`).
    pub va_base: u64,
    /// The PA of the start of the mapped page.
    pub pa_base: u64,
    /// log2 of the page size: 12, 21, 22 or 30.
    pub shift: u8,
    pub rights: Rights,
}

impl Translation {
    /// The PA that `va` (inside this page) translates to.
    #[inline]
    pub fn pa_of(&self, va: u64) -> u64 {
        self.pa_base | (va & ((1u64 << self.shift) - 1))
    }
    /// Whether `rights` permits `access` (kind and privilege). DIRTY is not required here: a
    /// permitted write to a clean entry is the walker's business (it sets the dirty state).
    #[inline]
    pub fn permits(&self, kind: AccessKind, user: bool) -> bool {
        let need = match (kind, user) {
            (AccessKind::Read, true) => Rights::USER_READ,
            (AccessKind::Write, true) => Rights::USER_WRITE,
            (AccessKind::Execute, true) => Rights::USER_EXEC,
            (AccessKind::Read, false) => Rights::KERN_READ,
            (AccessKind::Write, false) => Rights::KERN_WRITE,
            (AccessKind::Execute, false) => Rights::KERN_EXEC,
        };
        self.rights.contains(need)
    }
}

/// Counts of what a walk did, for the CPU's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Page-table words read from memory.
    pub reads: u32,
    /// Accessed/dirty (or AF / AP[2]) updates written atomically.
    pub ad_updates: u32,
    /// The walk started from a paging-structure cache entry.
    pub psc_hit: bool,
}

/// The outcome of a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkResult {
    pub result: Result<Translation, FaultReason>,
    pub stats: WalkStats,
    /// The paging-structure cache entry the walk started from, if any (for the detector).
    pub psc_used: Option<PscEntry>,
}

/// Walk the tables for an access, as the MMU does on a TLB miss (or on a write to a clean
/// entry): checks permissions, sets A/D (x86) or AF/clears AP[2] (arm64 with HA/HD)
/// atomically, and consults and fills `cache` when one is given.
pub fn walk(
    mem: &PhysMem,
    regs: &MmuRegs,
    va: u64,
    kind: AccessKind,
    user: bool,
    cache: Option<&mut WalkCache>,
) -> WalkResult {
    match regs.mode {
        Mode::Amd64 { .. } => x86::walk_amd64(mem, regs, va, kind, user, cache),
        Mode::I386 => x86::walk_i386(mem, regs, va, kind, user, cache),
        Mode::I386Pae => x86::walk_pae(mem, regs, va, kind, user, cache),
        Mode::Arm64 => arm64::walk(mem, regs, va, kind, user, cache),
    }
}

/// The translation the tables give for `va` right now, with no side effects (no A/D update, no
/// permission check, no cache): what the detector compares TLB entries against. `None` where
/// the tables do not translate `va` (including entries an access would fault on for AF = 0,
/// which the hardware never caches). PAE uses the PDPTE *registers* in `regs`, as hardware
/// does; see [`pae_pdpte_stale`].
pub fn peek(mem: &PhysMem, regs: &MmuRegs, va: u64) -> Option<Translation> {
    match regs.mode {
        Mode::Amd64 { .. } => x86::peek_amd64(mem, regs, va),
        Mode::I386 => x86::peek_i386(mem, regs, va),
        Mode::I386Pae => x86::peek_pae(mem, regs, va),
        Mode::Arm64 => arm64::peek(mem, regs, va),
    }
}

/// Whether a paging-structure cache entry still agrees with the tables in memory: the table it
/// points to is the one the upper levels now reference, with no more rights than they grant.
pub fn psc_entry_current(mem: &PhysMem, regs: &MmuRegs, e: &PscEntry) -> bool {
    match regs.mode {
        Mode::Amd64 { .. } | Mode::I386 | Mode::I386Pae => x86::psc_entry_current(mem, regs, e),
        Mode::Arm64 => arm64::psc_entry_current(mem, regs, e),
    }
}

/// PAE: the PDPTE registers that differ from the PDPT in memory (a CR3 reload is owed), as
/// (index, register value, memory value).
pub fn pae_pdpte_stale(mem: &PhysMem, regs: &MmuRegs) -> Option<(usize, u64, u64)> {
    if regs.mode != Mode::I386Pae {
        return None;
    }
    // What a register may differ in: presence (only register-present, memory-absent is stale:
    // fewer rights are allowed), the directory address, and its cache attributes (PWT, PCD).
    const P: u64 = 1;
    const ADDR_CACHE: u64 = 0x000f_ffff_ffff_f000 | (1 << 3) | (1 << 4);
    (0..4).find_map(|i| {
        let m = mem.load_u64(regs.root + 8 * i as u64);
        let r = regs.pdpte[i];
        let stale = r & P != 0 && (m & P == 0 || (m ^ r) & ADDR_CACHE != 0);
        stale.then_some((i, r, m))
    })
}

/// PAE: the PDPTE register values a CR3 write with `root` loads.
pub fn pae_load_pdptes(mem: &PhysMem, root: u64) -> [u64; 4] {
    core::array::from_fn(|i| mem.load_u64(root + 8 * i as u64))
}

mod arm64;
mod x86;
