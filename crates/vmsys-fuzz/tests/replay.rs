//! The fuzz harnesses as tests: every input of the committed corpus (`corpus/<target>/`, the
//! crashes found and the inputs that reached new coverage) is replayed, then seeded random
//! inputs are run. A failure names the file, or prints the seed and the input in hex.
//! `VMSYS_SEED` picks the seed, `VMSYS_FUZZ_INPUTS` the number of random inputs per target,
//! `VMSYS_FUZZ_FILE` replays one file through every target.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys_fuzz::TARGETS;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus(target: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn committed_corpus_replays_clean() {
    if let Ok(f) = std::env::var("VMSYS_FUZZ_FILE") {
        let data = std::fs::read(&f).expect("VMSYS_FUZZ_FILE is readable");
        for (name, run) in TARGETS {
            eprintln!("replaying {f} through {name}");
            run(&data);
        }
        return;
    }
    for (name, run) in TARGETS {
        let files = corpus(name);
        assert!(
            !files.is_empty(),
            "corpus/{name}/ is empty: the fuzz target has no committed corpus"
        );
        for f in files {
            let data = std::fs::read(&f).expect("corpus file is readable");
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                panic!(
                    "{name}: corpus input {} fails (replay: VMSYS_FUZZ_FILE={})",
                    f.display(),
                    f.display()
                );
            }
        }
    }
}

#[test]
fn seeded_random_inputs_run_clean() {
    let seed = env_u64("VMSYS_SEED", 0x5eed_f022);
    let n = env_u64("VMSYS_FUZZ_INPUTS", 300);
    eprintln!("fuzz harnesses: seed {seed} (VMSYS_SEED), {n} inputs per target");
    for (name, run) in TARGETS {
        let mut rng = SmallRng::seed_from_u64(seed ^ name.len() as u64);
        for k in 0..n {
            let len = rng.gen_range(0..2048);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                panic!("{name}: random input {k} of seed {seed} fails (VMSYS_SEED={seed}); input: {hex}");
            }
        }
    }
}
