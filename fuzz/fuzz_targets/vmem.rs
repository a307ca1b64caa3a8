//! libFuzzer target: the `vmem` harness of vmsys-fuzz (see its module doc for the oracle).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsys_fuzz::vmem::run(data));
