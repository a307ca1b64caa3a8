//! `vmsim bench --what pmap`: what the pmap costs per page-table entry, against the `x86_64`
//! crate's page-table code doing the same work on the same simulated memory.
//!
//! One amd64 machine (one CPU, detector off) with a bootstrapped pmap layer and one user pmap.
//! Each round maps `ranges` ranges of 512 pages (one last-level table each, 2 MiB apart), then
//! unmaps them, timing the maps and the unmaps apart; a sample is `rounds` rounds, and the
//! median of the samples (after one warm-up sample) is reported. The same is done with
//! `enter`/`remove` one page at a time and with the x86_64 crate's `map_to`/`unmap`, in the
//! same sample, so that a change of host clock speed hits every column alike. Translation is
//! timed round-robin over the 512 pages of one mapped range (warm caches).
//!
//! Entries are 4 KiB entries: the pmap runs with `PmapConfig::default()` (promotion on), but the
//! data frames begin one page past a 2 MiB boundary, so a full table fails the promotion check
//! (its first entry's frame is not superpage-aligned) and stays a table.
//!
//! The user pmap is active on no CPU, so no operation invalidates a TLB: both sides measure the
//! table work alone (the x86_64 crate's flushes are INVLPG, privileged, and are ignored).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmsys::platform::{Platform, RootLoad};
use vmsys::{EnterFlags, FrameList, FrameSource, PhysAddr, Pmap, PmapConfig, PmapSystem, VirtAddr};
use vmsys_arch::{FormatId, Prot};
use vmsys_sim::{Cpu, DetectorMode, Machine, MachineConfig, PhysMem};
use x86_64::structures::paging::mapper::{
    MappedPageTable, Mapper, PageTableFrameMapping, Translate,
};
use x86_64::structures::paging::{
    FrameAllocator, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};

use crate::cli::BenchArgs;
use crate::error::CliError;

/// The format measured.
pub const FORMAT: FormatId = FormatId::Amd64;
/// Pages per range: one last-level table.
pub const RANGE_PAGES: u64 = 512;
/// Target: range map and range unmap, ns per entry amortised over 512 pages.
pub const TARGET_RANGE_NS: f64 = 2.0;
/// Target: the x86_64 crate's per-page time over vmsys's range time.
pub const TARGET_SPEEDUP: f64 = 5.0;
/// Target: a warm `extract`, ns per call.
pub const TARGET_EXTRACT_NS: f64 = 10.0;

const PAGE: u64 = 4096;
const RANGE_BYTES: u64 = RANGE_PAGES * PAGE;
const MEM: u64 = 64 << 20;
/// vmsys's page-table pages come from here (a `FrameList`).
const PT_POOL: (u64, u64) = (4 << 20, 16 << 20);
/// The 512 data frames both sides map, in every range: one page past a 2 MiB boundary, so that
/// a full table cannot be promoted to a superpage.
const DATA: u64 = (32 << 20) + PAGE;
/// The x86_64 crate's tables, bump-allocated: 2 MiB chunks of simulated memory of their own,
/// which nothing but the x86_64 crate touches while its mapper lives.
const X86_TABLES: (u64, u64) = (40 << 20, 48 << 20);
/// Range `i` is mapped at `VA_BASE + i * 2 MiB` (user half, 2 MiB-aligned), on both sides.
const VA_BASE: u64 = 0x10_0000_0000;
/// What the check through the simulated MMU reads.
const MAGIC: u64 = 0x5eed_cafe_f00d_0001;
/// The page of a range that the MMU check reads.
const CHECK_PAGE: u64 = 5;

/// How much the pmap benchmark does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmapParams {
    /// 512-page ranges mapped, then unmapped, per round.
    pub ranges: u32,
    /// Rounds per timed sample.
    pub rounds: u32,
    /// Timed samples per operation (after one warm-up sample).
    pub samples: u32,
}

impl PmapParams {
    pub fn from_args(a: &BenchArgs) -> Self {
        PmapParams {
            ranges: a.pmap_ranges.max(1),
            rounds: a.pmap_rounds.max(1),
            samples: a.pmap_samples.max(1),
        }
    }

    /// Entries mapped (and unmapped, and translated) per sample and operation.
    pub fn entries_per_sample(&self) -> u64 {
        self.ranges as u64 * self.rounds as u64 * RANGE_PAGES
    }
}

/// One operation's samples, in ns per entry (or per call).
#[derive(Clone, Debug, Default)]
pub struct Timing {
    pub samples: Vec<f64>,
}

impl Timing {
    fn push(&mut self, d: Duration, n: u64) {
        self.samples.push(d.as_secs_f64() * 1e9 / n.max(1) as f64);
    }

    /// The median sample (the mean of the middle two for an even count; 0 with none).
    pub fn median(&self) -> f64 {
        crate::timing::median(&self.samples)
    }

    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }
}

/// Everything the pmap benchmark measured.
#[derive(Clone, Debug)]
pub struct PmapBench {
    pub params: PmapParams,
    /// Raw `AtomicU64` stores, 512 words a table: the floor of any map.
    pub floor_store: Timing,
    /// vmsys `enter_range` of 512 pages, per entry.
    pub range_map: Timing,
    /// vmsys `remove` of a 512-page range, per entry.
    pub range_unmap: Timing,
    /// vmsys `enter`, one page at a time.
    pub page_map: Timing,
    /// vmsys `remove` of one page at a time.
    pub page_unmap: Timing,
    /// x86_64 crate `map_to`, one page at a time.
    pub x86_map: Timing,
    /// x86_64 crate `unmap`, one page at a time.
    pub x86_unmap: Timing,
    /// vmsys `extract`, warm, per call.
    pub extract: Timing,
    /// x86_64 crate `translate_addr`, warm, per call.
    pub x86_translate: Timing,
    /// Promotions during the benchmark (0 expected: the entries measured are 4 KiB entries).
    pub promotions: u64,
    /// Promotion checks that failed (one per table filled, as the frames are misaligned).
    pub promotion_failures: u64,
    /// vmsys page-table pages allocated per 512-page range mapped.
    pub ptps_per_range: f64,
    /// Page-table frames the x86_64 crate took (it never frees one).
    pub x86_tables: u64,
}

/// One line of the comparison: ns per entry (per call for translation).
#[derive(Clone, Copy, Debug)]
pub struct PmapRow {
    pub op: &'static str,
    /// vmsys's range operation (`extract` for translation).
    pub vmsys: f64,
    /// vmsys one page at a time (none for translation).
    pub vmsys_per_page: Option<f64>,
    pub x86_64: f64,
}

impl PmapRow {
    /// The x86_64 crate's time over vmsys's.
    pub fn ratio(&self) -> f64 {
        self.x86_64 / self.vmsys.max(f64::MIN_POSITIVE)
    }
    /// The x86_64 crate's time over vmsys's per-page time.
    pub fn ratio_per_page(&self) -> Option<f64> {
        self.vmsys_per_page
            .map(|p| self.x86_64 / p.max(f64::MIN_POSITIVE))
    }
}

/// One target and whether it was met.
#[derive(Clone, Debug)]
pub struct Target {
    pub what: String,
    /// The measured value, printed with its unit.
    pub value: String,
    pub met: bool,
}

impl PmapBench {
    pub fn rows(&self) -> [PmapRow; 3] {
        [
            PmapRow {
                op: "map",
                vmsys: self.range_map.median(),
                vmsys_per_page: Some(self.page_map.median()),
                x86_64: self.x86_map.median(),
            },
            PmapRow {
                op: "unmap",
                vmsys: self.range_unmap.median(),
                vmsys_per_page: Some(self.page_unmap.median()),
                x86_64: self.x86_unmap.median(),
            },
            PmapRow {
                op: "translate",
                vmsys: self.extract.median(),
                vmsys_per_page: None,
                x86_64: self.x86_translate.median(),
            },
        ]
    }

    /// The targets (printed, never asserted).
    pub fn targets(&self) -> Vec<Target> {
        let [map, unmap, translate] = self.rows();
        let ns = |what: String, v: f64, limit: f64| Target {
            what,
            value: format!("{v:.2} ns"),
            met: v <= limit,
        };
        let speedup = |what: String, r: f64| Target {
            what,
            value: format!("{r:.1}x"),
            met: r >= TARGET_SPEEDUP,
        };
        vec![
            ns(
                format!("range map <= {TARGET_RANGE_NS} ns/entry over 512 pages"),
                map.vmsys,
                TARGET_RANGE_NS,
            ),
            ns(
                format!("range unmap <= {TARGET_RANGE_NS} ns/entry over 512 pages"),
                unmap.vmsys,
                TARGET_RANGE_NS,
            ),
            speedup(
                format!("vmsys range map >= {TARGET_SPEEDUP}x faster than x86_64 map_to"),
                map.ratio(),
            ),
            speedup(
                format!("vmsys range unmap >= {TARGET_SPEEDUP}x faster than x86_64 unmap"),
                unmap.ratio(),
            ),
            ns(
                format!("extract <= {TARGET_EXTRACT_NS} ns warm"),
                translate.vmsys,
                TARGET_EXTRACT_NS,
            ),
        ]
    }
}

fn va_of(range: u32) -> u64 {
    VA_BASE + range as u64 * RANGE_BYTES
}

fn pmap_err(doing: &'static str) -> impl Fn(vmsys::PmapError) -> CliError {
    move |e| CliError::setup(FORMAT, format!("pmap benchmark: {doing}: {e}"))
}

// --- vmsys ---------------------------------------------------------------------------------

type Sys = PmapSystem<Machine>;

fn vm_map_ranges(sys: &Sys, pmap: &Pmap, ranges: u32) -> Result<(), CliError> {
    for i in 0..ranges {
        sys.enter_range(
            pmap,
            VirtAddr::new(va_of(i)),
            PhysAddr::new(DATA),
            RANGE_BYTES,
            Prot::WRITE,
            EnterFlags::empty(),
        )
        .map_err(pmap_err("enter_range"))?;
    }
    Ok(())
}

fn vm_unmap_ranges(sys: &Sys, pmap: &Pmap, ranges: u32) -> Result<(), CliError> {
    for i in 0..ranges {
        let va = va_of(i);
        sys.remove(pmap, VirtAddr::new(va), VirtAddr::new(va + RANGE_BYTES))
            .map_err(pmap_err("remove of a range"))?;
    }
    Ok(())
}

fn vm_map_pages(sys: &Sys, pmap: &Pmap, ranges: u32) -> Result<(), CliError> {
    for i in 0..ranges {
        let va = va_of(i);
        for j in 0..RANGE_PAGES {
            sys.enter(
                pmap,
                VirtAddr::new(va + j * PAGE),
                PhysAddr::new(DATA + j * PAGE),
                Prot::WRITE,
                EnterFlags::empty(),
                0,
            )
            .map_err(pmap_err("enter"))?;
        }
    }
    Ok(())
}

fn vm_unmap_pages(sys: &Sys, pmap: &Pmap, ranges: u32) -> Result<(), CliError> {
    for i in 0..ranges {
        let va = va_of(i);
        for j in 0..RANGE_PAGES {
            let a = va + j * PAGE;
            sys.remove(pmap, VirtAddr::new(a), VirtAddr::new(a + PAGE))
                .map_err(pmap_err("remove of a page"))?;
        }
    }
    Ok(())
}

/// `n` extracts round-robin over range 0's pages; returns how many found no mapping.
fn vm_extract(sys: &Sys, pmap: &Pmap, n: u64) -> u64 {
    let mut acc = 0u64;
    let mut missing = 0u64;
    let mut j = 0u64;
    for _ in 0..n {
        match sys.extract(pmap, VirtAddr::new(VA_BASE + j * PAGE)) {
            Some(pa) => acc = acc.wrapping_add(pa.as_u64()),
            None => missing += 1,
        }
        j += 1;
        if j == RANGE_PAGES {
            j = 0;
        }
    }
    black_box(acc);
    missing
}

/// Every page of range 0 translates to its data frame, and `ranges` ranges are resident.
fn vm_check_range0(sys: &Sys, pmap: &Pmap, ranges: u32, what: &str) -> Result<(), CliError> {
    for j in 0..RANGE_PAGES {
        let got = sys.extract(pmap, VirtAddr::new(VA_BASE + j * PAGE));
        if got != Some(PhysAddr::new(DATA + j * PAGE)) {
            return Err(CliError::setup(
                FORMAT,
                format!(
                    "pmap benchmark: after {what}, extract({:#x}) = {got:?}, expected {:#x}",
                    VA_BASE + j * PAGE,
                    DATA + j * PAGE
                ),
            ));
        }
    }
    let resident = pmap.resident_count();
    let expected = ranges as u64 * RANGE_PAGES;
    if resident != expected {
        return Err(CliError::setup(
            FORMAT,
            format!("pmap benchmark: after {what}, {resident} pages resident, expected {expected}"),
        ));
    }
    Ok(())
}

fn vm_check_empty(pmap: &Pmap, what: &str) -> Result<(), CliError> {
    match pmap.resident_count() {
        0 => Ok(()),
        n => Err(CliError::setup(
            FORMAT,
            format!("pmap benchmark: after {what}, {n} pages still resident"),
        )),
    }
}

// --- the x86_64 crate ----------------------------------------------------------------------

/// Physical frames of the simulated machine as host page-table pointers.
struct SimTables<'m> {
    mem: &'m PhysMem,
}

// SAFETY: `host_page_ptr` returns, for any frame inside the machine's memory, a 4096-aligned
// pointer valid for reads and writes of 4096 bytes for as long as the `PhysMem` lives (`'m`),
// which is the size and alignment of a `PageTable`; the memory is `AtomicU64` words, which have
// the layout of `u64` (and so of `PageTableEntry`), and any bit pattern is a valid entry. Only
// frames from `BumpFrames` (inside `X86_TABLES`) are ever translated: the crate follows only
// entries it wrote itself, and their frames came from that allocator.
unsafe impl PageTableFrameMapping for SimTables<'_> {
    fn frame_to_pointer(&self, frame: PhysFrame) -> *mut PageTable {
        self.mem
            .host_page_ptr(frame.start_address().as_u64())
            .cast::<PageTable>()
    }
}

/// Page-table frames for the x86_64 crate, bumped from `X86_TABLES`; never freed.
struct BumpFrames {
    next: u64,
    end: u64,
}

impl BumpFrames {
    fn used(&self) -> u64 {
        (self.next - X86_TABLES.0) / PAGE
    }
}

// SAFETY: every frame is returned once and lies in `X86_TABLES`, which nothing else uses: not
// vmsys's `FrameList` (`PT_POOL`), not the data frames (`DATA`).
unsafe impl FrameAllocator<Size4KiB> for BumpFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next >= self.end {
            return None;
        }
        let pa = self.next;
        self.next += PAGE;
        Some(PhysFrame::containing_address(x86_64::PhysAddr::new(pa)))
    }
}

/// The x86_64 crate's page tables over the simulated memory.
struct X86Side<'m> {
    mapper: MappedPageTable<'m, SimTables<'m>>,
    frames: BumpFrames,
    root: u64,
}

fn x86_err(doing: &'static str) -> impl Fn(String) -> CliError {
    move |e| CliError::setup(FORMAT, format!("pmap benchmark: x86_64 crate {doing}: {e}"))
}

fn x86_page(va: u64) -> Page<Size4KiB> {
    Page::containing_address(x86_64::VirtAddr::new(va))
}

const X86_FLAGS: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::USER_ACCESSIBLE);

impl<'m> X86Side<'m> {
    fn new(mem: &'m PhysMem) -> Result<Self, CliError> {
        let mut frames = BumpFrames {
            next: X86_TABLES.0,
            end: X86_TABLES.1,
        };
        let root = frames
            .allocate_frame()
            .ok_or_else(|| x86_err("root")("no frame".into()))?;
        let ptr = SimTables { mem }.frame_to_pointer(root);
        // SAFETY: `ptr` is a 4096-aligned page of simulated memory valid for `'m` (see
        // `SimTables`), a fresh frame from the bump range that no other reference points into:
        // the benchmark is single-threaded, no simulated CPU accesses memory while the mapper
        // lives (the x86_64 tables' 2 MiB chunks are touched by nothing else), and the page is
        // `AtomicU64` words viewed as plain `u64` (the same layout; every bit pattern valid).
        // The frame is fresh and zeroed (simulated memory starts zero; `zero()` makes sure).
        let l4: &'m mut PageTable = unsafe { &mut *ptr };
        l4.zero();
        // SAFETY: `l4` is the root of a valid (empty) hierarchy and `SimTables` maps every frame
        // the crate will follow to its page, as above; single-threaded, no simulated CPU runs.
        let mapper = unsafe { MappedPageTable::new(l4, SimTables { mem }) };
        Ok(X86Side {
            mapper,
            frames,
            root: root.start_address().as_u64(),
        })
    }

    fn map_pages(&mut self, ranges: u32) -> Result<(), CliError> {
        for i in 0..ranges {
            let va = va_of(i);
            for j in 0..RANGE_PAGES {
                let frame = PhysFrame::<Size4KiB>::containing_address(x86_64::PhysAddr::new(
                    DATA + j * PAGE,
                ));
                // SAFETY: the frame is simulated physical memory that no host reference points
                // into (a mapping in these tables aliases nothing the host uses), and the new
                // tables come from `BumpFrames`. The flush is ignored: INVLPG is privileged,
                // and these tables are loaded on no CPU while it runs.
                let flush = unsafe {
                    self.mapper
                        .map_to(x86_page(va + j * PAGE), frame, X86_FLAGS, &mut self.frames)
                };
                flush
                    .map_err(|e| x86_err("map_to")(format!("{e:?}")))?
                    .ignore();
            }
        }
        Ok(())
    }

    fn unmap_pages(&mut self, ranges: u32) -> Result<(), CliError> {
        for i in 0..ranges {
            let va = va_of(i);
            for j in 0..RANGE_PAGES {
                let (_, flush) = self
                    .mapper
                    .unmap(x86_page(va + j * PAGE))
                    .map_err(|e| x86_err("unmap")(format!("{e:?}")))?;
                flush.ignore();
            }
        }
        Ok(())
    }

    /// `n` translations round-robin over range 0's pages; returns how many found nothing.
    fn translate(&self, n: u64) -> u64 {
        let mut acc = 0u64;
        let mut missing = 0u64;
        let mut j = 0u64;
        for _ in 0..n {
            match self
                .mapper
                .translate_addr(x86_64::VirtAddr::new(VA_BASE + j * PAGE))
            {
                Some(pa) => acc = acc.wrapping_add(pa.as_u64()),
                None => missing += 1,
            }
            j += 1;
            if j == RANGE_PAGES {
                j = 0;
            }
        }
        black_box(acc);
        missing
    }

    fn check_range0(&self) -> Result<(), CliError> {
        for j in 0..RANGE_PAGES {
            let got = self
                .mapper
                .translate_addr(x86_64::VirtAddr::new(VA_BASE + j * PAGE))
                .map(|p| p.as_u64());
            if got != Some(DATA + j * PAGE) {
                return Err(x86_err("translate_addr")(format!(
                    "{:#x} translates to {got:x?}, expected {:#x}",
                    VA_BASE + j * PAGE,
                    DATA + j * PAGE
                )));
            }
        }
        Ok(())
    }
}

// --- the benchmark -------------------------------------------------------------------------

/// Raw `AtomicU64` stores (release, as the simulator's), 512 words per table.
fn floor_store(words: &[AtomicU64], rounds: u32) -> Duration {
    let start = Instant::now();
    for r in 0..rounds as u64 {
        for (i, w) in words.iter().enumerate() {
            w.store(r ^ i as u64, Ordering::Release);
        }
    }
    let d = start.elapsed();
    black_box(words);
    d
}

/// Time `f` once, adding to `total`.
fn timed(total: &mut Duration, f: impl FnOnce() -> Result<(), CliError>) -> Result<(), CliError> {
    let start = Instant::now();
    f()?;
    *total += start.elapsed();
    Ok(())
}

/// Read `va` through the simulated MMU and expect `MAGIC`.
fn mmu_check(c: &Cpu<'_>, tables: &str) -> Result<(), CliError> {
    let va = VA_BASE + CHECK_PAGE * PAGE;
    match c.read_u64(va) {
        Ok(MAGIC) => Ok(()),
        r => Err(CliError::setup(
            FORMAT,
            format!("pmap benchmark: the simulated MMU read {va:#x} through {tables} as {r:x?}, expected {MAGIC:#x}"),
        )),
    }
}

/// Run the pmap benchmark.
pub fn measure(p: PmapParams) -> Result<PmapBench, CliError> {
    let m = Machine::new(
        MachineConfig::new(FORMAT)
            .cpus(1)
            .mem(MEM)
            .detector(DetectorMode::Off),
    )
    .map_err(|err| CliError::Config {
        format: FORMAT,
        err,
    })?;
    let frames = Arc::new(FrameList::new(
        PhysAddr::new(PT_POOL.0),
        PhysAddr::new(PT_POOL.1),
    )) as Arc<dyn FrameSource>;
    let sys = PmapSystem::bootstrap(m.clone(), frames, PmapConfig::default())
        .map_err(pmap_err("bootstrap"))?;
    let ranges = p.ranges;
    let n = p.entries_per_sample();
    m.run_on(0, |c| {
        sys.init_cpu();
        let pmap = sys.create().map_err(pmap_err("create"))?;
        let mut x86 = X86Side::new(m.mem())?;
        let words: Vec<AtomicU64> = (0..ranges as u64 * RANGE_PAGES)
            .map(AtomicU64::new)
            .collect();
        let before = sys.stats();
        let mut r = PmapBench {
            params: p,
            floor_store: Timing::default(),
            range_map: Timing::default(),
            range_unmap: Timing::default(),
            page_map: Timing::default(),
            page_unmap: Timing::default(),
            x86_map: Timing::default(),
            x86_unmap: Timing::default(),
            extract: Timing::default(),
            x86_translate: Timing::default(),
            promotions: 0,
            promotion_failures: 0,
            ptps_per_range: 0.0,
            x86_tables: 0,
        };
        // Sample 0 is the warm-up (it also checks that each operation does what it claims).
        for s in 0..=p.samples {
            let [mut rm, mut ru, mut pm, mut pu, mut xm, mut xu] = [Duration::ZERO; 6];
            for round in 0..p.rounds {
                let check = s == 0 && round == 0;
                timed(&mut rm, || vm_map_ranges(&sys, &pmap, ranges))?;
                if check {
                    vm_check_range0(&sys, &pmap, ranges, "enter_range")?;
                }
                timed(&mut ru, || vm_unmap_ranges(&sys, &pmap, ranges))?;
                if check {
                    vm_check_empty(&pmap, "remove of the ranges")?;
                }
                timed(&mut pm, || vm_map_pages(&sys, &pmap, ranges))?;
                if check {
                    vm_check_range0(&sys, &pmap, ranges, "enter of each page")?;
                }
                timed(&mut pu, || vm_unmap_pages(&sys, &pmap, ranges))?;
                if check {
                    vm_check_empty(&pmap, "remove of each page")?;
                }
                timed(&mut xm, || x86.map_pages(ranges))?;
                if check {
                    x86.check_range0()?;
                }
                timed(&mut xu, || x86.unmap_pages(ranges))?;
            }
            let floor = floor_store(&words, p.rounds);
            if s > 0 {
                r.range_map.push(rm, n);
                r.range_unmap.push(ru, n);
                r.page_map.push(pm, n);
                r.page_unmap.push(pu, n);
                r.x86_map.push(xm, n);
                r.x86_unmap.push(xu, n);
                r.floor_store.push(floor, n);
            }
        }
        let after = sys.stats();
        r.promotions = after.promotions - before.promotions;
        r.promotion_failures = after.promotion_failures - before.promotion_failures;
        let range_maps = 2 * (p.samples as u64 + 1) * p.rounds as u64 * ranges as u64;
        r.ptps_per_range =
            (after.ptps_allocated - before.ptps_allocated) as f64 / range_maps as f64;
        r.x86_tables = x86.frames.used();

        // Translation over range 0, mapped on both sides.
        vm_map_ranges(&sys, &pmap, 1)?;
        vm_check_range0(&sys, &pmap, 1, "enter_range")?;
        x86.map_pages(1)?;
        x86.check_range0()?;
        for s in 0..=p.samples {
            let start = Instant::now();
            let missing = vm_extract(&sys, &pmap, n);
            let ve = start.elapsed();
            let start = Instant::now();
            let x_missing = x86.translate(n);
            let xt = start.elapsed();
            if missing + x_missing > 0 {
                return Err(CliError::setup(
                    FORMAT,
                    format!("pmap benchmark: {missing} extracts and {x_missing} translate_addr calls found no mapping"),
                ));
            }
            if s > 0 {
                r.extract.push(ve, n);
                r.x86_translate.push(xt, n);
            }
        }

        // Both sides built real amd64 tables: the simulated MMU reads through each.
        m.mem().store_u64(DATA + CHECK_PAGE * PAGE, MAGIC);
        sys.activate(&pmap).map_err(pmap_err("activate"))?;
        mmu_check(c, "the vmsys pmap")?;
        // The x86_64 side (and its `&mut PageTable`) ends here, before the simulated MMU reads
        // through its tables.
        let x86_root = {
            let x86 = x86;
            x86.root
        };
        m.load_root(RootLoad {
            root: PhysAddr::new(x86_root),
            tag: 0,
            flush: true,
        });
        mmu_check(c, "the x86_64 crate's tables")?;
        let kernel = sys.kernel_pmap().clone();
        sys.activate(&kernel).map_err(pmap_err("activate"))?;
        vm_unmap_ranges(&sys, &pmap, 1)?;
        sys.destroy(pmap).map_err(pmap_err("destroy"))?;
        Ok(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark runs with tiny counts, every row is produced and every time is positive
    /// (no timing is asserted), and the entries measured were 4 KiB entries.
    #[test]
    fn pmap_bench_produces_rows() {
        let p = PmapParams {
            ranges: 2,
            rounds: 1,
            samples: 3,
        };
        let b = measure(p).expect("pmap bench");
        let rows = b.rows();
        assert_eq!(
            rows.iter().map(|r| r.op).collect::<Vec<_>>(),
            ["map", "unmap", "translate"]
        );
        for r in rows {
            assert!(r.vmsys > 0.0 && r.x86_64 > 0.0, "{r:?}");
            assert!(r.vmsys_per_page.is_none_or(|v| v > 0.0), "{r:?}");
            assert!(r.ratio() > 0.0, "{r:?}");
        }
        for t in [
            &b.floor_store,
            &b.range_map,
            &b.range_unmap,
            &b.page_map,
            &b.page_unmap,
            &b.x86_map,
            &b.x86_unmap,
            &b.extract,
            &b.x86_translate,
        ] {
            assert_eq!(t.samples.len(), 3);
            assert!(t.samples.iter().all(|&s| s > 0.0), "{t:?}");
        }
        assert_eq!(
            b.promotions, 0,
            "a full table was promoted: not 4 KiB entries"
        );
        assert!(b.ptps_per_range > 0.0);
        assert_eq!(b.targets().len(), 5);
        let mut out = Vec::new();
        crate::report::print_pmap_bench(&mut out, &b).expect("print");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("translate") && text.contains("targets"),
            "{text}"
        );
    }

    #[test]
    fn timing_median() {
        let t = Timing {
            samples: vec![3.0, 1.0, 2.0],
        };
        assert_eq!((t.median(), t.min(), t.max()), (2.0, 1.0, 3.0));
        let t = Timing {
            samples: vec![4.0, 1.0, 2.0, 3.0],
        };
        assert_eq!(t.median(), 2.5);
        assert_eq!(Timing::default().median(), 0.0);
    }
}
