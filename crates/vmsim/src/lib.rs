//! vmsim: the command-line program that runs vmsys's simulated machine.
//!
//! - [`cli`]: the command line (clap).
//! - [`run`]: `vmsim run`, the multi-CPU workload under changing mappings, with the page tables
//!   and access loop in [`workload`].
//! - [`bench`]: `vmsim bench`, the cost of a simulated access; [`pmap_bench`], the cost of the
//!   pmap's map, unmap and extract against the x86_64 crate's page-table code.
//! - [`report`]: what the commands print.
//!
//! The commands are library functions that write to any `io::Write`, so tests call them
//! directly; `main.rs` only parses arguments and turns outcomes into exit statuses.

pub mod bench;
pub mod cli;
pub mod error;
pub mod flush_bench;
pub mod kmem_bench;
pub mod pmap_bench;
pub mod report;
pub mod run;
pub mod units;
pub mod vmem_bench;
pub mod workload;

pub use error::CliError;
