//! vmsys-sim: a simulated multi-CPU machine for vmsys.
//!
//! - [`mem`]: physical memory, lazily allocated, accessed in atomic words.
//! - [`walker`]: the MMU walkers, one per format, written from the manuals and independent of
//!   vmsys's page-table code (the oracle that checks it).
//! - [`tlb`]: per-CPU TLBs tagged by PCID/ASID with global entries of every leaf size; the walk
//!   caches live with the walker.
//! - [`cpu`]: one CPU's registers, caches, access path and counters.
//! - [`machine`]: the machine, CPUs run by host threads, IPIs, broadcast invalidation, and the
//!   `vmsys::Platform` implementation.
//! - [`detector`]: the stale-translation detector.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cpu;
pub mod detector;
pub mod machine;
pub mod mem;
pub mod system;
pub mod testkit;
pub mod tlb;
pub mod walker;

pub use cpu::CounterSnapshot;
pub use detector::{Detector, DetectorMode, Violation, ViolationKind};
pub use machine::{ConfigError, Cpu, Machine, MachineConfig};
pub use mem::PhysMem;
