//! vmsys: a kernel virtual-memory system.
//!
//! `no_std` + `alloc`, so that it drops into a Rust kernel. The hardware is reached only through
//! [`platform::Platform`]; the page-table formats it manages are described as data in
//! [`vmsys_arch`].
#![no_std]
// The VM system needs no `unsafe`: the hardware is behind `Platform`, whose implementor owns it.
#![forbid(unsafe_code)]

extern crate alloc;

pub mod addr;
pub mod frames;
pub mod kmem;
pub mod page;
pub mod phys;
pub mod platform;
pub mod pmap;
pub mod vmem;

pub use addr::{AddrError, PageSize, PhysAddr, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
pub use frames::{FrameList, FrameSource};
pub use platform::Platform;
pub use pmap::{EnterFlags, Pmap, PmapConfig, PmapError, PmapSystem};
pub use vmsys_arch as arch;
