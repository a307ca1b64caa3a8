//! Virtual address space shape: which VAs exist and which half is the kernel's.

use core::ops::{Range, RangeInclusive};

use crate::Format;

/// Which virtual addresses the MMU accepts at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Canonical {
    /// x86-64: bits 63..bits-1 must all equal bit `bits - 1`.
    SignExtend { bits: u32 },
    /// arm64: bits 63..va_bits all 0 (TTBR0, user) or all 1 (TTBR1, kernel).
    /// Bit `va_bits - 1` is a plain address bit in both halves.
    SplitTtbr { va_bits: u32 },
    /// 32-bit formats: every VA below 4 GiB.
    Bits32,
}

/// Where the kernel half lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Halves {
    /// The upper half of a sign-extended `va_bits` space (amd64 PML4 / LA57
    /// PML5 entries 256-511), shared by every address space.
    UpperHalf { va_bits: u32 },
    /// Separate roots, each translating `va_bits`: TTBR0 for user, TTBR1 for
    /// the kernel (arm64).
    TtbrPair { va_bits: u32 },
    /// One root, split at a configurable [`Split32`] boundary (i386, PAE).
    Split32,
}

/// The 32-bit user/kernel split, named user-first like Linux's VMSPLIT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Split32 {
    /// 3 GiB user, 1 GiB kernel (the classic layout).
    #[default]
    G3G1,
    G2G2,
    G1G3,
}

impl Split32 {
    pub const ALL: [Split32; 3] = [Split32::G3G1, Split32::G2G2, Split32::G1G3];

    /// First kernel VA.
    pub const fn kernel_base(self) -> u64 {
        match self {
            Split32::G3G1 => 0xC000_0000,
            Split32::G2G2 => 0x8000_0000,
            Split32::G1G3 => 0x4000_0000,
        }
    }
}

/// The two halves of a format's address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Inclusive, because the kernel half ends at `u64::MAX` on 64-bit formats.
    pub user: RangeInclusive<u64>,
    pub kernel: RangeInclusive<u64>,
    /// Root-table indices covering the kernel half (in the kernel's root when
    /// `separate_roots`).
    pub kernel_top: Range<usize>,
    /// User and kernel have different roots (arm64 TTBR0/TTBR1).
    pub separate_roots: bool,
}

impl Format {
    /// Whether the MMU accepts `va` at all.
    pub const fn is_canonical(&self, va: u64) -> bool {
        match self.canonical {
            Canonical::SignExtend { bits } => {
                let top = va >> (bits - 1);
                top == 0 || top == u64::MAX >> (bits - 1)
            }
            Canonical::SplitTtbr { va_bits } => {
                let top = va >> va_bits;
                top == 0 || top == u64::MAX >> va_bits
            }
            Canonical::Bits32 => va >> 32 == 0,
        }
    }

    /// User and kernel halves. `split` matters only for [`Halves::Split32`].
    pub fn layout(&self, split: Split32) -> Layout {
        let root_entries = self.levels[0].entries;
        match self.halves {
            Halves::UpperHalf { va_bits } => Layout {
                user: 0..=(1u64 << (va_bits - 1)) - 1,
                kernel: u64::MAX << (va_bits - 1)..=u64::MAX,
                kernel_top: root_entries / 2..root_entries,
                separate_roots: false,
            },
            Halves::TtbrPair { va_bits } => Layout {
                user: 0..=(1u64 << va_bits) - 1,
                kernel: u64::MAX << va_bits..=u64::MAX,
                kernel_top: 0..root_entries,
                separate_roots: true,
            },
            Halves::Split32 => {
                let base = split.kernel_base();
                Layout {
                    user: 0..=base - 1,
                    kernel: base..=0xFFFF_FFFF,
                    kernel_top: self.index(base, 0)..root_entries,
                    separate_roots: false,
                }
            }
        }
    }

    pub fn user_range(&self, split: Split32) -> RangeInclusive<u64> {
        self.layout(split).user
    }

    pub fn kernel_range(&self, split: Split32) -> RangeInclusive<u64> {
        self.layout(split).kernel
    }

    /// Root-table index range of the kernel half.
    pub fn kernel_top_indices(&self, split: Split32) -> Range<usize> {
        self.layout(split).kernel_top
    }

    pub fn is_kernel_va(&self, va: u64, split: Split32) -> bool {
        self.layout(split).kernel.contains(&va)
    }
}
