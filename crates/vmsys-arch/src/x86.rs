//! Pieces shared by the three x86 formats (Intel SDM vol. 3A, ch. 4).

use crate::format::{bit, bits, CacheField, CacheMode, Field, Pattern};

pub(crate) const P: u64 = bit(0);
pub(crate) const RW: u64 = bit(1);
pub(crate) const US: u64 = bit(2);
pub(crate) const PWT: u64 = bit(3);
pub(crate) const PCD: u64 = bit(4);
/// PS in PDEs/PDPTEs; the same position is PAT in PTEs.
pub(crate) const PS: u64 = bit(7);

pub(crate) const WRITABLE: Field = Field::bit(1);
pub(crate) const USER: Field = Field::bit(2);
pub(crate) const ACCESSED: Field = Field::bit(5);
pub(crate) const DIRTY: Field = Field::bit(6);
pub(crate) const GLOBAL: Field = Field::bit(8);
/// XD (EFER.NXE): set means *not* executable.
pub(crate) const EXEC: Field = Field::inverted(63);

pub(crate) const INVALID: Pattern = Pattern::new(P, 0);
/// PDE/PDPTE: present with PS clear points to a table ...
pub(crate) const TABLE_PS0: Pattern = Pattern::new(P | PS, P);
/// ... present with PS set is a large leaf.
pub(crate) const LEAF_PS1: Pattern = Pattern::new(P | PS, P | PS);
/// PTE (and PML4E/PML5E/PDPTE-of-PAE, whose bit 7 is reserved): present is enough.
pub(crate) const PRESENT: Pattern = Pattern::new(P, P);

/// Table entries grant everything; the leaf alone restricts access.
pub(crate) const TABLE_BITS: u64 = RW | US;

/// IA32_PAT as Linux programs it: PA0 WB, PA1 WC, PA2 UC-, PA3 UC, PA4 WB,
/// PA5 WP, PA6 UC-, PA7 WT. WB/WC/UC need no PAT bit, so they are encoded
/// identically on small and large leaves.
pub(crate) const PAT_MSR: u64 = 0x0407_0506_0007_0106;

/// Cache encodings for a leaf whose PAT bit is `pat`: PAT index = PAT:PCD:PWT.
const fn modes(pat: u64) -> [(CacheMode, u64); 9] {
    [
        (CacheMode::WriteBack, 0),
        (CacheMode::WriteCombining, PWT),
        (CacheMode::Uncacheable, PCD | PWT),
        (CacheMode::Device, PCD | PWT),
        (CacheMode::WriteProtect, pat | PWT),
        (CacheMode::WriteThrough, pat | PCD | PWT),
        // Aliases, so that every PAT index decodes: UC- reads as uncacheable.
        (CacheMode::Uncacheable, PCD),
        (CacheMode::WriteBack, pat),
        (CacheMode::Uncacheable, pat | PCD),
    ]
}

const MODES_PAT7: [(CacheMode, u64); 9] = modes(bit(7));
const MODES_PAT12: [(CacheMode, u64); 9] = modes(bit(12));

/// 4 KiB leaves: PAT is bit 7.
pub(crate) const CACHE_4K: CacheField = CacheField {
    mask: PWT | PCD | bit(7),
    modes: &MODES_PAT7,
};
/// 2M/4M/1G leaves: bit 7 is PS, so PAT moves to bit 12.
pub(crate) const CACHE_LARGE: CacheField = CacheField {
    mask: PWT | PCD | bit(12),
    modes: &MODES_PAT12,
};

/// Physical address bits 51:12 (architectural maximum MAXPHYADDR of 52).
pub(crate) const ADDR_4K: u64 = bits(51, 12);
