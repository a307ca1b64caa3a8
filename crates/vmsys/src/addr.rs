//! Typed addresses and page sizes.
//!
//! Physical and virtual addresses are distinct types so that a physical address can never be
//! handed to code that expects a virtual one (or the reverse) without an explicit conversion.

use core::fmt;
use core::ops::{Add, Sub};

/// The base page size of every supported format (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Errors of address arithmetic and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrError {
    /// The address is not aligned to the size that the operation needs.
    Misaligned { addr: u64, align: u64 },
    /// The address (or the end of a range) lies outside what the format or machine allows.
    OutOfRange { addr: u64, limit: u64 },
    /// Address arithmetic overflowed.
    Overflow,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AddrError::Misaligned { addr, align } => {
                write!(f, "address {addr:#x} is not aligned to {align:#x}")
            }
            AddrError::OutOfRange { addr, limit } => {
                write!(f, "address {addr:#x} is out of range (limit {limit:#x})")
            }
            AddrError::Overflow => write!(f, "address arithmetic overflowed"),
        }
    }
}

macro_rules! addr_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }
            /// The raw address.
            #[inline]
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// Whether the address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Rounds down to a multiple of `align` (a power of two).
            #[inline]
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// Rounds up to a multiple of `align` (a power of two); `None` on overflow.
            #[inline]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }
            /// The offset of the address within a block of `align` bytes.
            #[inline]
            pub const fn offset_in(self, align: u64) -> u64 {
                self.0 & (align - 1)
            }
            /// Checked addition of a byte count.
            #[inline]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// Returns the address if it is aligned to `align`, else a `Misaligned` error.
            #[inline]
            pub const fn require_aligned(self, align: u64) -> Result<Self, AddrError> {
                if self.is_aligned(align) {
                    Ok(self)
                } else {
                    Err(AddrError::Misaligned { addr: self.0, align })
                }
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            #[inline]
            fn add(self, rhs: u64) -> Self {
                Self(self.0 + rhs)
            }
        }

        impl Sub<$name> for $name {
            type Output = u64;
            #[inline]
            fn sub(self, rhs: $name) -> u64 {
                self.0 - rhs.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

addr_type!(
    /// A physical (bus) address.
    PhysAddr,
    "PA"
);
addr_type!(
    /// A virtual address, in the raw form the format uses (sign-extended where the format is).
    VirtAddr,
    "VA"
);

/// The leaf sizes that the supported formats can map, smallest first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// 4 KiB: every format.
    Size4K,
    /// 2 MiB: amd64, arm64 and i386-PAE superpages.
    Size2M,
    /// 4 MiB: i386 2-level superpages.
    Size4M,
    /// 1 GiB: amd64 and arm64.
    Size1G,
}

impl PageSize {
    /// log2 of the size in bytes.
    #[inline]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size4M => 22,
            PageSize::Size1G => 30,
        }
    }
    /// The size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// The page size whose log2 is `shift`, if there is one.
    pub const fn from_shift(shift: u32) -> Option<Self> {
        match shift {
            12 => Some(PageSize::Size4K),
            21 => Some(PageSize::Size2M),
            22 => Some(PageSize::Size4M),
            30 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        let a = VirtAddr::new(0x20_1234);
        assert!(!a.is_aligned(PAGE_SIZE));
        assert_eq!(a.align_down(PAGE_SIZE), VirtAddr::new(0x20_1000));
        assert_eq!(a.align_up(PAGE_SIZE), Some(VirtAddr::new(0x20_2000)));
        assert_eq!(a.offset_in(PAGE_SIZE), 0x234);
        assert_eq!(VirtAddr::new(u64::MAX).align_up(PAGE_SIZE), None);
        assert_eq!(
            a.require_aligned(PAGE_SIZE),
            Err(AddrError::Misaligned {
                addr: 0x20_1234,
                align: PAGE_SIZE
            })
        );
        assert_eq!(PhysAddr::new(0x3000) - PhysAddr::new(0x1000), 0x2000);
    }

    #[test]
    fn page_sizes_round_trip() {
        for s in [
            PageSize::Size4K,
            PageSize::Size2M,
            PageSize::Size4M,
            PageSize::Size1G,
        ] {
            assert_eq!(PageSize::from_shift(s.shift()), Some(s));
            assert_eq!(s.bytes(), 1u64 << s.shift());
        }
        assert_eq!(PageSize::from_shift(13), None);
    }
}
