//! libFuzzer target: the `phys` harness of vmsys-fuzz (see its module doc for the oracle).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsys_fuzz::phys::run(data));
