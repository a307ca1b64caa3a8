//! The command line: `vmsim [run] ...` and `vmsim bench ...`.
//!
//! Every option is validated here, at parse time, so that a bad value is a one-line usage error
//! before any machine is built.

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmsys::platform::MAX_CPUS;
use vmsys_arch::FormatId;
use vmsys_sim::DetectorMode;

use crate::units::parse_size;

/// Runs the vmsys simulated machine: a multi-CPU workload under changing mappings (`run`, the
/// default) or the cost of a simulated access (`bench`).
#[derive(Parser, Debug)]
#[command(name = "vmsim", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// With no subcommand, these are the options of `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Cli {
    /// The command to execute: no subcommand means `run` with the top-level options.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Run(self.run))
    }
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum Command {
    /// Boot a machine per format, run random accesses on every CPU while CPU 0 remaps pages
    /// under them (with correct invalidation), then print counters and any stale-translation
    /// violations. Exits 1 if there was a violation or a wrong value was read.
    Run(RunArgs),
    /// Measure the cost of a simulated 8-byte load that hits the TLB (detector off, sampled and
    /// on every access) against a raw atomic load, and the cost of a TLB miss and walk
    /// (`--what access`); and what the pmap costs per page-table entry to map, unmap and
    /// translate, against the x86_64 crate's page-table code on the same memory (`--what pmap`).
    Bench(BenchArgs),
}

/// A selection of page-table formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Formats(pub Vec<FormatId>);

impl Default for Formats {
    fn default() -> Self {
        Formats(FormatId::ALL.to_vec())
    }
}

fn known_formats() -> String {
    FormatId::ALL.map(FormatId::name).join(", ")
}

/// `all`, one format name, or a comma-separated list of names.
pub fn parse_formats(s: &str) -> Result<Formats, String> {
    if s.trim() == "all" {
        return Ok(Formats::default());
    }
    let mut v = Vec::new();
    for name in s.split(',').map(str::trim) {
        let id = FormatId::from_name(name).ok_or_else(|| {
            format!(
                "unknown architecture '{name}' (expected all or one of {})",
                known_formats()
            )
        })?;
        if !v.contains(&id) {
            v.push(id);
        }
    }
    Ok(Formats(v))
}

/// A count that must be at least 1 (clap's range check would print the whole u64 range).
fn positive_u64(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

fn positive_u32(s: &str) -> Result<u32, String> {
    let n = positive_u64(s)?;
    u32::try_from(n).map_err(|_| format!("{n} is too large (at most {})", u32::MAX))
}

/// How often the stale-translation detector checks a TLB hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetectorArg {
    /// Check every TLB hit and every walk-cache use against the tables (slowest, catches most).
    Every,
    /// Check one TLB hit in --sample-period per CPU.
    Sampled,
    /// No checks on accesses; the audit after the run still checks every CPU's caches.
    Off,
}

impl DetectorArg {
    /// The simulator's mode; a period of 1 is checking every access.
    pub fn mode(self, period: u32) -> DetectorMode {
        match self {
            DetectorArg::Every => DetectorMode::Every,
            DetectorArg::Sampled if period <= 1 => DetectorMode::Every,
            DetectorArg::Sampled => DetectorMode::Sampled(period),
            DetectorArg::Off => DetectorMode::Off,
        }
    }
}

/// Options of `vmsim run`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct RunArgs {
    /// Page-table formats to run: all, or a comma-separated list of amd64, amd64-la57, arm64,
    /// i386, i386-pae.
    #[arg(long, value_name = "ARCH", default_value = "all", value_parser = parse_formats)]
    pub arch: Formats,

    /// Simulated CPUs per machine (one host thread each), 1 to 256.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub cpus: u32,

    /// Physical memory per machine, with an optional K, M, G or T suffix (binary units); at
    /// least 4M and within the format's physical address space. Host memory is committed only
    /// where the workload touches it.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub mem: u64,

    /// Memory accesses per CPU.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub ops: u64,

    /// Seed of the random access and remap choices (each CPU and format derives its own).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// Stale-translation detector mode during the run.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = DetectorArg::Sampled)]
    pub detector: DetectorArg,

    /// With --detector sampled: check one TLB hit in N per CPU (1 = every hit).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = positive_u32)]
    pub sample_period: u32,

    /// CPU 0 remaps a page to another frame after every N of its own accesses.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = positive_u64)]
    pub remap_every: u64,

    /// Plant a kernel bug to see the checks catch it: CPU 0 invalidates only its own TLB after
    /// a remap, never the other CPUs'. The run is then expected to fail.
    #[arg(long)]
    pub omit_shootdown: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            arch: Formats::default(),
            cpus: 4,
            mem: 1 << 30,
            ops: 200_000,
            seed: 1,
            detector: DetectorArg::Sampled,
            sample_period: 64,
            remap_every: 64,
            omit_shootdown: false,
        }
    }
}

impl RunArgs {
    pub fn detector_mode(&self) -> DetectorMode {
        self.detector.mode(self.sample_period)
    }
}

/// Which benchmarks `vmsim bench` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BenchWhat {
    /// The cost of a simulated memory access (TLB hit, TLB miss and walk), per --arch format.
    Access,
    /// The pmap's map, unmap and extract per page-table entry on amd64, against the x86_64
    /// crate's page-table code over the same simulated memory.
    Pmap,
    /// Both.
    #[default]
    All,
}

impl BenchWhat {
    pub fn access(self) -> bool {
        matches!(self, BenchWhat::Access | BenchWhat::All)
    }
    pub fn pmap(self) -> bool {
        matches!(self, BenchWhat::Pmap | BenchWhat::All)
    }
}

/// Default of `--pmap-ranges`.
pub const PMAP_RANGES: u32 = 16;
/// Default of `--pmap-rounds`.
pub const PMAP_ROUNDS: u32 = 64;
/// Default of `--pmap-samples`.
pub const PMAP_SAMPLES: u32 = 7;

/// Options of `vmsim bench`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct BenchArgs {
    /// Which benchmarks to run: access, pmap or all.
    #[arg(long, value_enum, value_name = "WHICH", default_value_t = BenchWhat::All)]
    pub what: BenchWhat,

    /// Page-table formats of the access benchmark: all, or a comma-separated list of amd64,
    /// amd64-la57, arm64, i386, i386-pae. (The pmap benchmark is amd64 only.)
    #[arg(long, value_name = "ARCH", default_value = "all", value_parser = parse_formats)]
    pub arch: Formats,

    /// Timed TLB-hit accesses per measurement of the access benchmark (the TLB-miss
    /// measurement does a twentieth as many, as each costs a walk).
    #[arg(long, value_name = "N", default_value_t = 20_000_000, value_parser = positive_u64)]
    pub iters: u64,

    /// Pmap benchmark: 512-page ranges (one last-level table each) mapped, then unmapped, per
    /// round, 1 to 256.
    #[arg(long, value_name = "N", default_value_t = PMAP_RANGES,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub pmap_ranges: u32,

    /// Pmap benchmark: rounds over the ranges per timed sample.
    #[arg(long, value_name = "N", default_value_t = PMAP_ROUNDS, value_parser = positive_u32)]
    pub pmap_rounds: u32,

    /// Pmap benchmark: timed samples per operation (the median is reported), after a warm-up.
    #[arg(long, value_name = "N", default_value_t = PMAP_SAMPLES,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pmap_samples: u32,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            what: BenchWhat::All,
            arch: Formats::default(),
            iters: 20_000_000,
            pmap_ranges: PMAP_RANGES,
            pmap_rounds: PMAP_ROUNDS,
            pmap_samples: PMAP_SAMPLES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(args).map(Cli::into_command)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_is_run_with_defaults() {
        assert_eq!(
            parse(&["vmsim"]).map_err(|e| e.to_string()).ok(),
            Some(Command::Run(RunArgs::default()))
        );
        assert_eq!(
            parse(&["vmsim", "run"]).map_err(|e| e.to_string()).ok(),
            Some(Command::Run(RunArgs::default()))
        );
    }

    #[test]
    fn run_options_parse() {
        let c = parse(&[
            "vmsim",
            "run",
            "--arch",
            "arm64",
            "--cpus",
            "8",
            "--mem",
            "512M",
            "--ops",
            "10",
            "--seed",
            "7",
            "--detector",
            "every",
            "--sample-period",
            "3",
            "--remap-every",
            "5",
        ]);
        let Ok(Command::Run(a)) = c else {
            panic!("expected run, got {c:?}")
        };
        assert_eq!(a.arch, Formats(vec![FormatId::Arm64]));
        assert_eq!((a.cpus, a.mem, a.ops, a.seed), (8, 512 << 20, 10, 7));
        assert_eq!(a.detector_mode(), DetectorMode::Every);
        assert_eq!(a.remap_every, 5);
    }

    #[test]
    fn top_level_options_mean_run() {
        let Ok(Command::Run(a)) = parse(&["vmsim", "--arch", "i386,i386-pae", "--detector", "off"])
        else {
            panic!("top-level options should parse as run")
        };
        assert_eq!(a.arch, Formats(vec![FormatId::I386, FormatId::I386Pae]));
        assert_eq!(a.detector_mode(), DetectorMode::Off);
    }

    #[test]
    fn bench_options_parse() {
        let Ok(Command::Bench(b)) =
            parse(&["vmsim", "bench", "--arch", "amd64", "--iters", "1000"])
        else {
            panic!("expected bench")
        };
        assert_eq!(b.arch, Formats(vec![FormatId::Amd64]));
        assert_eq!(b.iters, 1000);
        assert_eq!(b.what, BenchWhat::All);
    }

    #[test]
    fn bench_what_parses() {
        let Ok(Command::Bench(b)) = parse(&["vmsim", "bench"]) else {
            panic!("expected bench")
        };
        assert_eq!(b, BenchArgs::default());
        assert!(b.what.access() && b.what.pmap());
        let Ok(Command::Bench(b)) = parse(&[
            "vmsim",
            "bench",
            "--what",
            "pmap",
            "--pmap-ranges",
            "2",
            "--pmap-rounds",
            "3",
            "--pmap-samples",
            "4",
        ]) else {
            panic!("expected bench")
        };
        assert_eq!(b.what, BenchWhat::Pmap);
        assert!(!b.what.access() && b.what.pmap());
        assert_eq!((b.pmap_ranges, b.pmap_rounds, b.pmap_samples), (2, 3, 4));
        let Ok(Command::Bench(b)) = parse(&["vmsim", "bench", "--what", "access"]) else {
            panic!("expected bench")
        };
        assert!(b.what.access() && !b.what.pmap());
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            &["vmsim", "--arch", "x86"][..],
            &["vmsim", "run", "--arch", "amd64,sparc"],
            &["vmsim", "run", "--cpus", "0"],
            &["vmsim", "run", "--cpus", "257"],
            &["vmsim", "run", "--mem", "lots"],
            &["vmsim", "run", "--detector", "sometimes"],
            &["vmsim", "run", "--sample-period", "0"],
            &["vmsim", "run", "--sample-period", "5000000000"],
            &["vmsim", "run", "--remap-every", "x"],
            &["vmsim", "bench", "--iters", "0"],
            &["vmsim", "bench", "--cpus", "2"],
            &["vmsim", "bench", "--what", "everything"],
            &["vmsim", "bench", "--pmap-ranges", "0"],
            &["vmsim", "bench", "--pmap-ranges", "257"],
            &["vmsim", "bench", "--pmap-rounds", "0"],
            &["vmsim", "bench", "--pmap-samples", "0"],
            &["vmsim", "frobnicate"],
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?} should be rejected"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn sampled_period_one_is_every() {
        assert_eq!(DetectorArg::Sampled.mode(1), DetectorMode::Every);
        assert_eq!(DetectorArg::Sampled.mode(64), DetectorMode::Sampled(64));
    }
}
