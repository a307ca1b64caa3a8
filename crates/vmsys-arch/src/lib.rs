//! Page-table formats described as data.
//!
//! Each supported format is one `static` [`Format`] table (levels, descriptor
//! patterns, attribute fields with their polarity, reserved and software
//! bits, address-space halves, TLB model). All encoding and decoding is
//! generic code that reads the table, so adding a format means adding a
//! table, not a code path.
//!
//! Entries are `u64` throughout; 4-byte formats use the low 32 bits and
//! [`Format::entry_bytes`] says how wide to store them. Levels are numbered
//! from the root: `levels[0]` is the PML4 / PML5 / L0 / PD / PDPT.
#![no_std]
#![forbid(unsafe_code)]

mod amd64;
mod arm64;
pub mod entry;
pub mod format;
mod i386;
pub mod layout;
mod x86;

#[cfg(test)]
mod tests;

pub use entry::{EncodeError, Entry, Feature};
pub use format::{
    CacheField, CacheMode, CacheRegister, DirtyModel, ExecModel, Field, Format, LeafAttrs,
    LeafDesc, Level, Pattern, Prot, PteFlags, SoftwareBits, TableAttrs, TableDesc, TlbModel,
    TlbTag,
};
pub use layout::{Canonical, Halves, Layout, Split32};

/// The supported page-table formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FormatId {
    /// x86-64, 4-level paging, 48-bit VA.
    Amd64,
    /// x86-64, 5-level paging (LA57), 57-bit VA.
    Amd64La57,
    /// AArch64, 4 KiB granule, 48-bit VA, 4 levels.
    Arm64,
    /// i386, 2-level, 4-byte entries.
    I386,
    /// i386 with PAE, 3-level, 8-byte entries.
    I386Pae,
}

impl FormatId {
    pub const ALL: [FormatId; 5] = [
        FormatId::Amd64,
        FormatId::Amd64La57,
        FormatId::Arm64,
        FormatId::I386,
        FormatId::I386Pae,
    ];

    /// The format's table.
    pub fn format(self) -> &'static Format {
        match self {
            FormatId::Amd64 => &amd64::AMD64,
            FormatId::Amd64La57 => &amd64::AMD64_LA57,
            FormatId::Arm64 => &arm64::ARM64,
            FormatId::I386 => &i386::I386,
            FormatId::I386Pae => &i386::I386_PAE,
        }
    }

    /// Stable name, for command lines and traces.
    pub const fn name(self) -> &'static str {
        match self {
            FormatId::Amd64 => "amd64",
            FormatId::Amd64La57 => "amd64-la57",
            FormatId::Arm64 => "arm64",
            FormatId::I386 => "i386",
            FormatId::I386Pae => "i386-pae",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|id| id.name() == name)
    }
}

impl core::fmt::Display for FormatId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
