//! Errors of the pmap layer.

use core::fmt;

use crate::addr::{AddrError, PhysAddr, VirtAddr};

/// Why a pmap operation did not do what was asked. The distinctions are those the callers act
/// on (FreeBSD's `KERN_*` results of `pmap_enter`, plus input errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmapError {
    /// A misaligned or out-of-range address, or a range that wraps.
    Addr(AddrError),
    /// The address lies in the other half (a user address in the kernel pmap, or the reverse).
    WrongHalf(VirtAddr),
    /// No such page-size index in this format.
    BadPageSize(usize),
    /// The format cannot express the requested protection or attributes.
    Unsupported,
    /// A page-table page or PV entry could not be allocated (FreeBSD `KERN_RESOURCE_SHORTAGE`).
    ResourceShortage,
    /// No-replace, and a mapping already exists in the range (`KERN_FAILURE`).
    ExistingMapping(VirtAddr),
    /// No-replace, and a superpage already maps the address (`KERN_NO_SPACE`).
    ExistingSuperpage(VirtAddr),
    /// A kernel address without a page-table page: `growkernel` has not covered it.
    NoPageTable(VirtAddr),
    /// `unwire` of a mapping that is not wired (or not mapped).
    NotWired(VirtAddr),
    /// A managed mapping of a frame that the machine does not have.
    NotManageable,
    /// The pmap still has mappings or is active on a CPU.
    Busy,
    /// The kernel address space cannot grow that far.
    KvaExhausted,
    /// The pmap was destroyed: no operation may touch it (its tables are freed and reused).
    Destroyed,
    /// The pmap belongs to another `PmapSystem`.
    ForeignPmap,
    /// The operation is not allowed on the kernel pmap (`destroy`, `copy`).
    KernelPmap,
    /// `copy` from a pmap into itself.
    SamePmap,
    /// A kernel address outside the kernel's dynamic range (`kva_range`): the direct map, the
    /// quick-map slots or an unused part of the kernel half, which only the pmap maps (the
    /// kernel-entry operations report a range that meets the direct map as `DirectMap`).
    OutsideKva(VirtAddr),
    /// A configuration the pmap cannot lay out (overlapping or misaligned kernel ranges).
    BadConfig(&'static str),
    /// A quick-map slot of this CPU is already held: quick mappings do not nest (seed 001).
    QuickMapBusy { cpu: u32, slot: u8 },
    /// `quick_remove_*` of an address that is not a live quick mapping of the current CPU made
    /// by that call's kind (removed twice, removed on another CPU, or never returned).
    QuickMapNotHeld(VirtAddr),
    /// A frame the machine does not have (no page record).
    NoSuchFrame(PhysAddr),
    /// A kernel-entry operation (`kenter`, `kremove`, `qenter`, `qremove`) whose range meets
    /// the direct map.
    DirectMap(VirtAddr),
    /// A kernel-entry operation over a managed mapping (`enter`'s; `remove` undoes it).
    ManagedMapping(VirtAddr),
}

impl From<AddrError> for PmapError {
    fn from(e: AddrError) -> Self {
        PmapError::Addr(e)
    }
}

impl fmt::Display for PmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PmapError::Addr(e) => write!(f, "{e}"),
            PmapError::WrongHalf(va) => {
                write!(f, "{va} is not in this pmap's half of the address space")
            }
            PmapError::BadPageSize(i) => write!(f, "no page size with index {i} in this format"),
            PmapError::Unsupported => write!(f, "the format cannot express this mapping"),
            PmapError::ResourceShortage => {
                write!(f, "out of memory for a page-table page or PV entry")
            }
            PmapError::ExistingMapping(va) => write!(f, "a mapping already exists at {va}"),
            PmapError::ExistingSuperpage(va) => write!(f, "a superpage already maps {va}"),
            PmapError::NoPageTable(va) => {
                write!(f, "no kernel page-table page for {va} (growkernel first)")
            }
            PmapError::NotWired(va) => write!(f, "the mapping at {va} is not wired"),
            PmapError::NotManageable => write!(f, "managed mapping of a frame without a page"),
            PmapError::Busy => write!(f, "the pmap still has mappings or is active"),
            PmapError::KvaExhausted => write!(f, "kernel address space exhausted"),
            PmapError::Destroyed => write!(f, "the pmap has been destroyed"),
            PmapError::ForeignPmap => write!(f, "the pmap belongs to another pmap system"),
            PmapError::KernelPmap => write!(f, "not allowed on the kernel pmap"),
            PmapError::SamePmap => write!(f, "source and destination are the same pmap"),
            PmapError::OutsideKva(va) => write!(
                f,
                "{va} is outside the kernel's dynamic range (direct map, quick-map slots or unused)"
            ),
            PmapError::BadConfig(why) => write!(f, "bad pmap configuration: {why}"),
            PmapError::QuickMapBusy { cpu, slot } => write!(
                f,
                "quick-map slot {slot} of cpu {cpu} is in use: quick mappings do not nest"
            ),
            PmapError::QuickMapNotHeld(va) => {
                write!(f, "{va} is not a live quick mapping of this cpu")
            }
            PmapError::NoSuchFrame(pa) => {
                write!(f, "{pa} is not a frame of this machine (no page record)")
            }
            PmapError::DirectMap(va) => write!(
                f,
                "{va}: kernel-entry operations may not touch the direct map"
            ),
            PmapError::ManagedMapping(va) => write!(
                f,
                "a managed mapping is at {va}: kernel-entry operations leave it to enter/remove"
            ),
        }
    }
}
