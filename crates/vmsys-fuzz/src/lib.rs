//! Fuzz harnesses over vmsys's operation sequences.
//!
//! Each harness turns an arbitrary byte string into a sequence of operations on one layer, runs
//! them, and checks after every step the layer's own audit and a simple reference model of what
//! must be allocated. Caller values are drawn raw (any `u64`), so sizes, alignments and
//! addresses near the edges of the address space are tried as well as sensible ones: a panic,
//! an audit failure or a disagreement with the model is a bug, and the harness panics with a
//! message naming the step.
//!
//! The same functions serve three drivers: the cargo-fuzz targets in `fuzz/` (coverage-guided),
//! the tests of this crate (the committed corpus in `corpus/<target>/` replayed, plus seeded
//! random inputs whose seed is printed), and whoever wants to replay one input by hand
//! (`cargo test -p vmsys-fuzz -- --nocapture` with `VMSYS_FUZZ_FILE=<path>`).

pub mod input;
pub mod phys;
pub mod vmem;

/// A harness: runs one input, panics on a broken invariant.
pub type Harness = fn(&[u8]);

/// The harnesses by name, as the corpus directories and the fuzz targets call them.
pub const TARGETS: &[(&str, Harness)] = &[("vmem", vmem::run), ("buddy", phys::run)];
