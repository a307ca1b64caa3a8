//! The page array: one record per physical frame (FreeBSD's `vm_page` array, reduced to what
//! the machine-dependent layer keeps per frame so far).
//!
//! For a frame used as a page-table page the record holds its reference count (the number of
//! valid entries, plus a temporary hold while an insertion is in progress). For a managed frame
//! it holds the list of PV entries: every (pmap, virtual address) that maps it.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::addr::{PhysAddr, PAGE_SHIFT};
use crate::platform::PhysSegment;

/// One mapping of a managed frame (a reverse-map entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PvEntry {
    /// The pmap's identifier (see `Pmap::id`).
    pub pmap: u32,
    /// The virtual address of the mapping (of the superpage, for a superpage mapping).
    pub va: u64,
    /// The table level of the leaf: a superpage mapping's PV entry lives on the list of the
    /// superpage's first frame.
    pub level: u8,
}

/// What a frame is used for, as far as the pmap is concerned.
pub mod page_flags {
    /// A user page-table page: `ref_count` counts its valid entries.
    pub const PTP: u32 = 1 << 0;
    /// A kernel page-table page: never freed, `ref_count` never changes.
    pub const KERNEL_PTP: u32 = 1 << 1;
    /// A page-table page saved for a later demotion of the superpage that replaced it.
    pub const SAVED_PTP: u32 = 1 << 2;
    /// A page holding PV entries.
    pub const PV_CHUNK: u32 = 1 << 3;
    /// A write was recorded in a mapping that has since gone or lost write permission
    /// (FreeBSD's `vm_page_dirty` from the pmap).
    pub const MODIFIED: u32 = 1 << 4;
    /// An access was recorded in a mapping that has since gone (`PGA_REFERENCED`).
    pub const REFERENCED: u32 = 1 << 5;
}

/// Per-frame record.
pub struct PageMeta {
    /// Page-table pages: valid entries (+1 while an insertion holds it).
    pub ref_count: AtomicU32,
    /// [`page_flags`].
    pub flags: AtomicU32,
    /// PV entries of a managed frame.
    pub pv: spin::Mutex<Vec<PvEntry>>,
}

impl PageMeta {
    fn new() -> Self {
        PageMeta {
            ref_count: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            pv: spin::Mutex::new(Vec::new()),
        }
    }
    /// The flags.
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Relaxed)
    }
    /// Set `f`.
    pub fn set_flags(&self, f: u32) {
        self.flags.fetch_or(f, Ordering::Relaxed);
    }
    /// Clear `f`.
    pub fn clear_flags(&self, f: u32) {
        self.flags.fetch_and(!f, Ordering::Relaxed);
    }
}

/// The records of every frame of the machine's physical segments.
pub struct PageArray {
    segs: Vec<(u64, u64, usize)>,
    pages: Vec<PageMeta>,
}

impl PageArray {
    /// Records for every frame of `segments`.
    pub fn new(segments: &[PhysSegment]) -> Self {
        let mut segs = Vec::new();
        let mut n = 0usize;
        for s in segments {
            let (lo, hi) = (s.start.as_u64() >> PAGE_SHIFT, s.end.as_u64() >> PAGE_SHIFT);
            segs.push((lo, hi, n));
            n += (hi - lo) as usize;
        }
        PageArray {
            segs,
            pages: (0..n).map(|_| PageMeta::new()).collect(),
        }
    }

    /// The record of the frame holding `pa`, if the machine has that frame.
    #[inline]
    pub fn get(&self, pa: PhysAddr) -> Option<&PageMeta> {
        let pfn = pa.as_u64() >> PAGE_SHIFT;
        self.segs
            .iter()
            .find(|(lo, hi, _)| (*lo..*hi).contains(&pfn))
            .map(|(lo, _, base)| &self.pages[base + (pfn - lo) as usize])
    }

    /// The record of a frame that must exist (a page-table page the pmap allocated).
    #[inline]
    pub fn meta(&self, pa: PhysAddr) -> &PageMeta {
        self.get(pa)
            .unwrap_or_else(|| panic!("no page record for {pa}: not a frame of this machine"))
    }

    /// Every frame with its record.
    pub fn iter(&self) -> impl Iterator<Item = (PhysAddr, &PageMeta)> + '_ {
        self.segs.iter().flat_map(move |&(lo, hi, base)| {
            (lo..hi).map(move |pfn| {
                (
                    PhysAddr::new(pfn << PAGE_SHIFT),
                    &self.pages[base + (pfn - lo) as usize],
                )
            })
        })
    }
}
