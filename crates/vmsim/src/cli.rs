//! The command line: `vmsim [run] ...`, `vmsim layout ...` and `vmsim bench ...`.
//!
//! Every option is validated here, at parse time, so that a bad value is a one-line usage error
//! before any machine is built.

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmsys::platform::MAX_CPUS;
use vmsys_arch::{FormatId, Split32};
use vmsys_sim::DetectorMode;

use crate::units::parse_size;

/// Runs the vmsys simulated machine: a mixed pmap workload on every CPU of one machine with
/// every result checked (`run`, the default), the kernel address-space layout of a format
/// (`layout`), or benchmarks (`bench`).
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
    /// Boot one machine with the whole system (buddy allocator, pmap, reservations, kernel
    /// memory) and run a mixed workload on every CPU at once: address spaces created,
    /// activated, visited, forked and destroyed; enter (4 KiB and superpages), enter_range,
    /// protect, remove, remove_all, unwire, promotion and demotion; kernel windows from
    /// kva_alloc (growing the kernel), kenter/kremove, qenter/qremove and quick maps;
    /// kmem_malloc/kmem_free (superpage allocations promote), transient I/O maps (pinned and
    /// can-fault) and bounce copies; loads and stores through the simulated MMU checked against
    /// what the workload wrote. Audits the pmap's and kernel memory's invariants, every CPU's
    /// TLB and the stale-translation detector, then prints a report. Exits 1 on any violation
    /// or wrong value.
    Run(RunArgs),
    /// Print the kernel address-space layout of a format as the pmap computes it (direct map,
    /// KVA, the kernel, domain and transient arenas, quick-map slots) and what each kernel
    /// page-table synchronisation strategy costs in memory and per growkernel.
    Layout(LayoutArgs),
    /// Measure the cost of a simulated 8-byte load that hits the TLB (detector off, sampled and
    /// on every access) against a raw atomic load, and of a TLB miss and walk (`--what access`);
    /// what the pmap costs per page-table entry to map, unmap and translate, against the x86_64
    /// crate (`--what pmap`); and this host's own anonymous page fault and fork for reference.
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
        v.push(parse_format(name)?);
    }
    v.dedup();
    Ok(Formats(v))
}

/// One format name.
pub fn parse_format(s: &str) -> Result<FormatId, String> {
    FormatId::from_name(s.trim()).ok_or_else(|| {
        format!(
            "unknown architecture '{}' (expected one of {})",
            s.trim(),
            known_formats()
        )
    })
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
    /// No checks on accesses; the audits still check every CPU's caches.
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

/// Default of `run --ops`.
pub const DEFAULT_OPS: u64 = 40_000;
/// Default of `run --ops` on arm64, where every invalidation of a shared address space or of
/// the kernel is a broadcast TLBI that every simulated CPU must take: on a host with fewer cores
/// than simulated CPUs each one waits for host threads to be scheduled, so the default run is
/// kept to about the same time as the others'.
pub const DEFAULT_OPS_ARM64: u64 = 12_000;

/// The default number of operations of a run on `arch`.
pub fn default_ops(arch: FormatId) -> u64 {
    match arch {
        FormatId::Arm64 => DEFAULT_OPS_ARM64,
        _ => DEFAULT_OPS,
    }
}
/// Default of `run --audit-every`.
pub const DEFAULT_AUDIT_EVERY: u64 = 10_000;

/// Options of `vmsim run`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct RunArgs {
    /// Page-table format of the machine: amd64, amd64-la57, arm64, i386 or i386-pae.
    #[arg(long, value_name = "ARCH", default_value = "amd64", value_parser = parse_format)]
    pub arch: FormatId,

    /// Simulated CPUs (one host thread each, all running the workload at once), 1 to 256.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub cpus: u32,

    /// Physical memory of the machine, with an optional K, M, G or T suffix (binary units); at
    /// least 64M and within the format's physical address space. Host memory is committed only
    /// where the workload touches it.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub mem: u64,

    /// Operations in all, shared out evenly between the CPUs (an access is one operation, so is
    /// a pmap call or a visit of another CPU's address space). Default: 40000, or 12000 on
    /// arm64 (its broadcast invalidations make each operation dearer to simulate).
    #[arg(long, value_name = "N", value_parser = positive_u64)]
    pub ops: Option<u64>,

    /// Seed of every random choice; each CPU derives its own generator from it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// Quiesce every CPU at a barrier after every N operations (counted over all CPUs) and audit
    /// the pmap's invariants and every CPU's TLB; 0: audit only at the end (always done).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AUDIT_EVERY)]
    pub audit_every: u64,

    /// Print one JSON object on standard output instead of the report.
    #[arg(long)]
    pub json: bool,

    /// Stale-translation detector mode during the run.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = DetectorArg::Sampled)]
    pub detector: DetectorArg,

    /// With --detector sampled: check one TLB hit in N per CPU (1 = every hit).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = positive_u32)]
    pub sample_period: u32,

    /// Plant a kernel bug to see the checks catch it: the platform drops the pmap's TLB
    /// shootdowns (IPIs are not sent, arm64 broadcast invalidations stay local). The run is then
    /// expected to fail.
    #[arg(long)]
    pub omit_shootdown: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            arch: FormatId::Amd64,
            cpus: 4,
            mem: 1 << 30,
            ops: None,
            seed: 1,
            audit_every: DEFAULT_AUDIT_EVERY,
            json: false,
            detector: DetectorArg::Sampled,
            sample_period: 64,
            omit_shootdown: false,
        }
    }
}

impl RunArgs {
    pub fn detector_mode(&self) -> DetectorMode {
        self.detector.mode(self.sample_period)
    }
    /// `--ops`, or the default for the format.
    pub fn ops(&self) -> u64 {
        self.ops.unwrap_or_else(|| default_ops(self.arch))
    }
}

/// The user/kernel split of the 32-bit formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    /// 3 GiB user, 1 GiB kernel (kernel from 0xC0000000).
    #[value(name = "3g1g")]
    G3G1,
    /// 2 GiB user, 2 GiB kernel (kernel from 0x80000000).
    #[value(name = "2g2g")]
    G2G2,
    /// 1 GiB user, 3 GiB kernel (kernel from 0x40000000).
    #[value(name = "1g3g")]
    G1G3,
}

impl SplitArg {
    pub fn split(self) -> Split32 {
        match self {
            SplitArg::G3G1 => Split32::G3G1,
            SplitArg::G2G2 => Split32::G2G2,
            SplitArg::G1G3 => Split32::G1G3,
        }
    }
}

/// Options of `vmsim layout`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct LayoutArgs {
    /// Page-table format: amd64, amd64-la57, arm64, i386 or i386-pae.
    #[arg(long, value_name = "ARCH", default_value = "amd64", value_parser = parse_format)]
    pub arch: FormatId,

    /// The user/kernel split of a 32-bit format (i386, i386-pae): 3g1g, 2g2g or 1g3g (user
    /// first). Default 3g1g; an error for a 64-bit format.
    #[arg(long, value_enum, value_name = "SPLIT")]
    pub split: Option<SplitArg>,

    /// Physical memory of the machine the layout is computed on (the direct map covers it), with
    /// an optional K, M, G or T suffix.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub mem: u64,

    /// CPUs of the machine (each has two quick-map slots), 1 to 256.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub cpus: u32,

    /// Print one JSON object on standard output instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Default for LayoutArgs {
    fn default() -> Self {
        LayoutArgs {
            arch: FormatId::Amd64,
            split: None,
            mem: 1 << 30,
            cpus: 4,
            json: false,
        }
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
    /// Kernel memory: vmem arenas against the crates.io vmem crate, kmem_malloc (with the rate
    /// at which superpage allocations end promoted), transient maps and bounce copies.
    Kmem,
    /// Where a ranged TLB invalidation should become a full one (the pmap's flush ceiling).
    Flush,
    /// All of them.
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
    pub fn kmem(self) -> bool {
        matches!(self, BenchWhat::Kmem | BenchWhat::All)
    }
    pub fn flush(self) -> bool {
        matches!(self, BenchWhat::Flush | BenchWhat::All)
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
    /// Which benchmarks to run: access, pmap, kmem, flush or all.
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

    /// Print a JSON list of rows (name, ours_ns, peer, peer_ns, ratio) on standard output
    /// instead of the tables.
    #[arg(long)]
    pub json: bool,

    /// Skip this host's reference measurements (anonymous page fault, fork).
    #[arg(long)]
    pub no_host: bool,
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
            json: false,
            no_host: false,
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
        for args in [&["vmsim"][..], &["vmsim", "run"]] {
            assert_eq!(
                parse(args).map_err(|e| e.to_string()).ok(),
                Some(Command::Run(RunArgs::default()))
            );
        }
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
            "--audit-every",
            "5",
            "--json",
            "--detector",
            "every",
            "--sample-period",
            "3",
        ]);
        let Ok(Command::Run(a)) = c else {
            panic!("expected run, got {c:?}")
        };
        assert_eq!(a.arch, FormatId::Arm64);
        assert_eq!((a.cpus, a.mem, a.ops(), a.seed), (8, 512 << 20, 10, 7));
        assert_eq!(a.audit_every, 5);
        assert!(a.json && !a.omit_shootdown);
        assert_eq!(a.detector_mode(), DetectorMode::Every);
    }

    #[test]
    fn top_level_options_mean_run() {
        let Ok(Command::Run(a)) = parse(&["vmsim", "--arch", "i386-pae", "--detector", "off"])
        else {
            panic!("top-level options should parse as run")
        };
        assert_eq!(a.arch, FormatId::I386Pae);
        assert_eq!(a.detector_mode(), DetectorMode::Off);
    }

    #[test]
    fn layout_options_parse() {
        let Ok(Command::Layout(l)) = parse(&["vmsim", "layout"]) else {
            panic!("expected layout")
        };
        assert_eq!(l, LayoutArgs::default());
        let Ok(Command::Layout(l)) = parse(&[
            "vmsim", "layout", "--arch", "i386", "--split", "2g2g", "--mem", "256M", "--json",
        ]) else {
            panic!("expected layout")
        };
        assert_eq!(l.arch, FormatId::I386);
        assert_eq!(l.split.map(SplitArg::split), Some(Split32::G2G2));
        assert!(l.json);
        assert_eq!(l.mem, 256 << 20);
    }

    #[test]
    fn bench_options_parse() {
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
            "--arch",
            "amd64",
            "--iters",
            "1000",
            "--pmap-ranges",
            "2",
            "--pmap-rounds",
            "3",
            "--pmap-samples",
            "4",
            "--json",
            "--no-host",
        ]) else {
            panic!("expected bench")
        };
        assert_eq!(b.what, BenchWhat::Pmap);
        assert!(!b.what.access() && b.what.pmap());
        assert_eq!(b.arch, Formats(vec![FormatId::Amd64]));
        assert_eq!(b.iters, 1000);
        assert_eq!((b.pmap_ranges, b.pmap_rounds, b.pmap_samples), (2, 3, 4));
        assert!(b.json && b.no_host);
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            &["vmsim", "--arch", "x86"][..],
            &["vmsim", "run", "--arch", "amd64,arm64"],
            &["vmsim", "run", "--cpus", "0"],
            &["vmsim", "run", "--cpus", "257"],
            &["vmsim", "run", "--mem", "lots"],
            &["vmsim", "run", "--ops", "0"],
            &["vmsim", "run", "--ops", "many"],
            &["vmsim", "run", "--seed", "-1"],
            &["vmsim", "run", "--audit-every", "x"],
            &["vmsim", "run", "--detector", "sometimes"],
            &["vmsim", "run", "--sample-period", "0"],
            &["vmsim", "run", "--sample-period", "5000000000"],
            &["vmsim", "run", "--remap-every", "5"],
            &["vmsim", "run", "--json=yes"],
            &["vmsim", "layout", "--split", "4g0g"],
            &["vmsim", "layout", "--arch", "sparc"],
            &["vmsim", "layout", "--ops", "3"],
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

    /// Every option of every command has help text.
    #[test]
    fn every_option_is_explained() {
        let cmd = Cli::command();
        let mut cmds = vec![&cmd];
        cmds.extend(cmd.get_subcommands());
        for c in cmds {
            assert!(
                c.get_about().is_some() || c.get_name() == "vmsim",
                "{}",
                c.get_name()
            );
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    a.get_help().is_some(),
                    "{} --{id} has no help",
                    c.get_name()
                );
            }
        }
    }

    #[test]
    fn sampled_period_one_is_every() {
        assert_eq!(DetectorArg::Sampled.mode(1), DetectorMode::Every);
        assert_eq!(DetectorArg::Sampled.mode(64), DetectorMode::Sampled(64));
    }
}
