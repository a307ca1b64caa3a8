//! vmsim: the command-line program that runs vmsys's simulated machine.
//!
//! - [`cli`]: the command line (clap).
//! - [`run`]: `vmsim run`, one machine with the pmap and a mixed workload on every CPU
//!   ([`workload`], its operation kinds in [`ops`], its data frames in [`frames`]; the planted
//!   missing-shootdown bug is a machine setting, `MachineConfig::omit_shootdown`).
//! - [`layout`]: `vmsim layout`, the kernel address-space layout and kernel page-table sync costs.
//! - [`bench`]: `vmsim bench`, the cost of a simulated access; [`pmap_bench`], the pmap against
//!   the x86_64 crate; [`host_bench`], this host's own page fault and fork for reference.
//! - [`report`]: what the commands print.
//!
//! The commands are library functions that write to any `io::Write`, so tests call them
//! directly; `main.rs` only parses arguments and turns outcomes into exit statuses.

pub mod bench;
pub mod cli;
pub mod error;
pub mod flush_bench;
pub mod frames;
pub mod host_bench;
pub mod kmem_bench;
pub mod layout;
pub mod ops;
pub mod pmap_bench;
pub mod report;
pub mod run;
pub mod timing;
pub mod units;
pub mod vmem_bench;
pub mod workload;

pub use error::CliError;
