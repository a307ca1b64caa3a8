//! The `run` workload: page tables built by hand over a pool of frames, random reads and writes
//! on every CPU, and a kernel CPU that remaps pages under them with correct invalidation.
//!
//! Checking what the accesses see: every frame holds, at each *probe* offset, a word naming the
//! page, the candidate frame and the probe. A page may map only its own candidates, and a
//! per-page `allowed` mask says which of them an access may currently observe. The kernel adds
//! the new frame to the mask before it stores the new leaf and removes the old one only after
//! every CPU has invalidated, so a correct system can never produce a word outside the mask.
//! An access cannot straddle a shootdown either: a CPU takes its interrupts only at the start of
//! its next access, so the kernel cannot drop a frame from the mask between a reader's access
//! and its check of the mask. Writes go to the other words of a page, never to a probe word.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmsys::platform::{CpuId, CpuSet, IpiMessage, Platform, RootLoad, TagSel, TlbInval};
use vmsys::{PhysAddr, VirtAddr};
use vmsys_arch::{FormatId, Prot, PteFlags, TlbTag};
use vmsys_sim::testkit::{install_shootdown_handler, Kit};
use vmsys_sim::{Cpu, Machine};

use crate::error::CliError;

/// The CPU that plays the kernel and remaps pages.
pub const KERNEL_CPU: CpuId = 0;
/// The IPI vector of the x86 TLB shootdown (the range Linux and FreeBSD use for such IPIs).
pub const SHOOTDOWN_VECTOR: u8 = 0xF0;

const PAGE: u64 = 4096;
/// 4 KiB pages mapped in the kernel half (global) and in the user half.
pub const KERNEL_PAGES: u64 = 64;
pub const USER_PAGES: u64 = 64;
/// Frames each 4 KiB page can be remapped between.
const CANDIDATES: usize = 4;
/// Superpage frames: two are enough to remap it back and forth.
const SUPER_CANDIDATES: u64 = 2;
/// Probe words in a superpage, spread over it (each one commits a 2 MiB chunk of host memory,
/// so not one per 4 KiB page).
const SUPER_PROBES: u64 = 8;
/// The superpage lies this far above the kernel region, clear of its last-level table.
const SUPER_VA_OFFSET: u64 = 0x0800_0000;

/// Physical layout: the first MiB is left alone (as on a PC), then the table-page pool, then
/// the 4 KiB frames; superpage frames go above `LOW_END`, aligned to their size.
const POOL_START: u64 = 1 << 20;
const POOL_END: u64 = POOL_START + (256 << 10);
const FRAMES_START: u64 = 2 << 20;
const LOW_END: u64 = FRAMES_START + (KERNEL_PAGES + USER_PAGES) * CANDIDATES as u64 * PAGE;

/// Probe words carry this in their top 16 bits, so that a zero or a written value read through
/// a wrong translation is never mistaken for a probe.
const PROBE_MAGIC: u64 = 0xF8A3 << 48;

/// The probe word of `page`'s candidate frame `cand` at probe `probe`.
pub fn probe_word(page: usize, cand: usize, probe: usize) -> u64 {
    PROBE_MAGIC | (page as u64) << 24 | (cand as u64) << 16 | probe as u64
}

/// Decode a probe word into (page, candidate, probe).
pub fn decode_probe(word: u64) -> Option<(usize, usize, usize)> {
    (word & (0xFFFF << 48) == PROBE_MAGIC).then_some((
        ((word >> 24) & 0xFF_FFFF) as usize,
        ((word >> 16) & 0xFF) as usize,
        (word & 0xFFFF) as usize,
    ))
}

/// A word read from a probe, for a message.
fn describe_word(w: u64) -> String {
    match decode_probe(w) {
        Some((page, cand, probe)) => format!("frame {cand} of page {page} (probe {probe})"),
        None => format!("{w:#x} (no probe word)"),
    }
}

/// The candidates in an `allowed` mask, for a message: `{1, 3}`.
fn frame_list(mask: u64) -> String {
    let v: Vec<String> = (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    format!("{{{}}}", v.join(", "))
}

/// One mapped page (4 KiB or a superpage) and the frames it may map.
pub struct Page {
    pub va: u64,
    pub size: u64,
    pub user: bool,
    /// Physical address of its leaf entry.
    slot: u64,
    /// The invalid encoding of its leaf level (arm64's break in break-before-make).
    invalid: u64,
    /// Candidate frames and the leaf entry that maps each.
    pub frames: Vec<u64>,
    leaves: Vec<u64>,
    /// Offsets of the probe words in the page.
    pub probes: Vec<u64>,
    /// Candidates an access may observe now (bit per candidate).
    allowed: AtomicU64,
    /// Odd while the kernel is changing the page's mapping (an arm64 access may then fault).
    seq: AtomicU64,
    /// The candidate the tables map; written only by the kernel CPU.
    current: AtomicUsize,
}

/// What the workload's page tables look like, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub kernel_pages: u64,
    pub user_pages: u64,
    /// The superpage's size and how many frames it moves between (1 = never remapped).
    pub superpage: Option<(u64, u64)>,
}

/// The workload of one machine.
pub struct Workload<'m> {
    kit: Kit<'m>,
    format: FormatId,
    pages: Vec<Page>,
    /// Pages with more than one candidate frame.
    remappable: Vec<usize>,
    user_root: u64,
    /// arm64: the TTBR1 root of the kernel half.
    kernel_root: Option<u64>,
    tag: u16,
    /// Changing a valid leaf needs an invalid entry and an invalidation in between (arm64).
    bbm: bool,
    /// The hardware broadcasts invalidations (arm64); otherwise IPIs.
    broadcast: bool,
    shape: Shape,
}

/// Per-run parameters of the access loop.
#[derive(Clone, Copy, Debug)]
pub struct LoopParams {
    pub ops: u64,
    pub remap_every: u64,
    /// Already mixed with the format; each CPU mixes in its number.
    pub seed: u64,
    /// The planted bug: remaps invalidate only the kernel CPU's TLB.
    pub omit_shootdown: bool,
}

/// What one CPU did and saw.
#[derive(Clone, Debug, Default)]
pub struct CpuStats {
    pub reads: u64,
    pub writes: u64,
    pub remaps: u64,
    /// Probe words that named another page or probe, or a frame the page could not map then.
    pub content_errors: u64,
    /// arm64: faults on a page in the middle of its break-before-make, which are expected.
    pub transient_faults: u64,
    /// Faults a correct system cannot take.
    pub unexpected_faults: u64,
    /// The first few problems, described.
    pub errors: Vec<String>,
}

/// How many problem descriptions a CPU keeps.
const KEEP_ERRORS: usize = 10;

impl CpuStats {
    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.errors.len() < KEEP_ERRORS {
            self.errors.push(what());
        }
    }

    /// Add another CPU's stats to these.
    pub fn merge(&mut self, o: &CpuStats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.remaps += o.remaps;
        self.content_errors += o.content_errors;
        self.transient_faults += o.transient_faults;
        self.unexpected_faults += o.unexpected_faults;
        for e in &o.errors {
            if self.errors.len() < KEEP_ERRORS {
                self.errors.push(e.clone());
            }
        }
    }
}

/// A 64-bit mix (splitmix64's finaliser), to derive independent seeds from one.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The largest superpage size with at least one aligned frame above the 4 KiB frames, its
/// first frame, and how many frames (up to `SUPER_CANDIDATES`) fit.
fn pick_superpage(sizes: impl Iterator<Item = u64>, mem: u64) -> Option<(u64, u64, u64)> {
    let mut sizes: Vec<u64> = sizes.filter(|&s| s > PAGE).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.into_iter().find_map(|size| {
        let first = LOW_END.next_multiple_of(size);
        let fit = mem.saturating_sub(first) / size;
        (fit >= 1).then_some((size, first, fit.min(SUPER_CANDIDATES)))
    })
}

impl<'m> Workload<'m> {
    /// Build the tables and fill the frames (host side, before any CPU runs).
    pub fn build(m: &'m Machine) -> Result<Self, CliError> {
        let format = m.config().format;
        let fmt = format.format();
        let mem = m.mem().size();
        if mem < LOW_END {
            return Err(CliError::setup(
                format,
                format!(
                    "the workload needs at least {LOW_END} bytes of memory, the machine has {mem}"
                ),
            ));
        }
        let mut kit = Kit::new(m, POOL_START, POOL_END);
        let kit_err = |doing: &str| {
            let doing = doing.to_string();
            move |e| CliError::kit(format, &doing, e)
        };
        let user_root = kit.new_root().map_err(kit_err("allocating the root"))?;
        let kernel_root = if fmt.layout(Default::default()).separate_roots {
            Some(
                kit.new_root()
                    .map_err(kit_err("allocating the kernel root"))?,
            )
        } else {
            None
        };
        let tag = match fmt.tlb.tag {
            TlbTag::None => 0,
            // Any nonzero tag: it makes the user entries tagged while the kernel's are global.
            TlbTag::Pcid { .. } | TlbTag::Asid { .. } => 1,
        };

        let mut wl = Workload {
            kit,
            format,
            pages: Vec::new(),
            remappable: Vec::new(),
            user_root,
            kernel_root,
            tag,
            bbm: fmt.tlb.break_before_make,
            broadcast: fmt.tlb.broadcast_invalidate,
            shape: Shape {
                kernel_pages: KERNEL_PAGES,
                user_pages: USER_PAGES,
                superpage: None,
            },
        };

        let mut next_frame = FRAMES_START;
        for (user, count) in [(false, KERNEL_PAGES), (true, USER_PAGES)] {
            for i in 0..count {
                let va = wl.kit.test_va(user, i * PAGE);
                let frames: Vec<u64> = (0..CANDIDATES as u64)
                    .map(|c| next_frame + c * PAGE)
                    .collect();
                next_frame += CANDIDATES as u64 * PAGE;
                wl.add_page(va, PAGE, user, frames, vec![0])?;
            }
        }

        if let Some((size, first, count)) = pick_superpage(fmt.leaf_sizes(), mem) {
            let base = wl
                .kit
                .test_va(false, SUPER_VA_OFFSET)
                .next_multiple_of(size);
            let fits = base
                .checked_add(size - 1)
                .is_some_and(|last| fmt.kernel_range(Default::default()).contains(&last));
            if fits {
                let frames = (0..count).map(|c| first + c * size).collect();
                let probes = (0..SUPER_PROBES)
                    .map(|k| k * (size / SUPER_PROBES))
                    .collect();
                wl.add_page(base, size, false, frames, probes)?;
                wl.shape.superpage = Some((size, count));
            }
        }
        wl.remappable = (0..wl.pages.len())
            .filter(|&i| wl.pages[i].frames.len() > 1)
            .collect();
        Ok(wl)
    }

    /// Map `va` to the first of `frames` and write the probe words of every frame.
    fn add_page(
        &mut self,
        va: u64,
        size: u64,
        user: bool,
        frames: Vec<u64>,
        probes: Vec<u64>,
    ) -> Result<(), CliError> {
        let format = self.format;
        let index = self.pages.len();
        // Kernel mappings are global, as kernels make them; user ones are tagged.
        let (prot, flags, root) = if user {
            (Prot::WRITE | Prot::USER, PteFlags::empty(), self.user_root)
        } else {
            (
                Prot::WRITE,
                PteFlags::GLOBAL,
                self.kernel_root.unwrap_or(self.user_root),
            )
        };
        let m = self.kit.m;
        for (c, &frame) in frames.iter().enumerate() {
            for (p, &off) in probes.iter().enumerate() {
                m.mem().store_u64(frame + off, probe_word(index, c, p));
            }
        }
        let leaves = frames
            .iter()
            .map(|&f| self.kit.leaf(f, size, prot, flags))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::kit(format, "encoding a leaf", e))?;
        let slot = self
            .kit
            .map(root, va, frames[0], size, prot, flags)
            .map_err(|e| CliError::kit(format, &format!("mapping {va:#x}"), e))?;
        let level = self
            .kit
            .level_for(size)
            .map_err(|e| CliError::kit(format, "finding the leaf level", e))?;
        self.pages.push(Page {
            va,
            size,
            user,
            slot,
            invalid: self.kit.fmt.levels[level].invalid.value,
            frames,
            leaves,
            probes,
            allowed: AtomicU64::new(1),
            seq: AtomicU64::new(0),
            current: AtomicUsize::new(0),
        });
        Ok(())
    }

    /// The tables' shape, for the report.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The mapped pages.
    pub fn pages(&self) -> &[Page] {
        &self.pages
    }

    /// Install the shootdown handler (x86) and load the roots on every CPU.
    pub fn install(&self, m: &Arc<Machine>) -> Result<(), CliError> {
        if !self.broadcast {
            install_shootdown_handler(m, SHOOTDOWN_VECTOR);
        }
        let load = RootLoad {
            root: PhysAddr::new(self.user_root),
            tag: self.tag,
            flush: true,
        };
        let results = m.run_on_all(|_cpu| {
            m.load_root(load);
            match self.kernel_root {
                Some(k) => m.load_kernel_root(PhysAddr::new(k)),
                None => Ok(()),
            }
        });
        results.into_iter().try_for_each(|r| {
            r.map_err(|e| CliError::setup(self.format, format!("loading the kernel root: {e}")))
        })
    }

    /// The access loop of one CPU; the kernel CPU also remaps. Every CPU first reads each page
    /// once, so that all TLBs hold translations the remaps must shoot down, then waits at
    /// `start` for the others: host threads start at different times, and a CPU that ran
    /// before or after all the remaps would exercise nothing.
    pub fn cpu_loop(&self, c: &Cpu<'_>, p: &LoopParams, start: &Barrier) -> CpuStats {
        let m = c.machine();
        let me = c.id();
        let mut rng = SmallRng::seed_from_u64(mix(p.seed, me as u64));
        let mut st = CpuStats::default();
        let mut others = CpuSet::first_n(m.cpu_count());
        others.remove(me);
        let kernel = me == KERNEL_CPU && !self.remappable.is_empty();
        for (index, page) in self.pages.iter().enumerate() {
            c.set_user(page.user);
            match c.read_u64(page.va) {
                Ok(w) => self.check_word(&mut st, me, index, 0, w),
                Err(fault) => {
                    st.unexpected_faults += 1;
                    st.note(|| format!("warming up: unexpected {fault}"));
                }
            }
        }
        let mut user = false;
        c.set_user(false);
        start.wait();
        let n = self.pages.len() as u64;
        for op in 0..p.ops {
            if kernel && op % p.remap_every == p.remap_every - 1 {
                self.remap(c, &mut rng, &others, p.omit_shootdown, &mut st);
            }
            // One draw decides everything, to keep the generator off the profile.
            let r: u64 = rng.gen();
            let index = (r % n) as usize;
            let page = &self.pages[index];
            if page.user != user {
                user = page.user;
                c.set_user(user);
            }
            let probe = ((r >> 24) % page.probes.len() as u64) as usize;
            let probe_va = page.va + page.probes[probe];
            let write = (r >> 40) & 3 == 0;
            let seq0 = page.seq.load(Ordering::Acquire);
            let result = if write {
                // Any word of the probe's 4 KiB page but the probe itself.
                let word = 1 + (r >> 44) % (PAGE / 8 - 1);
                st.writes += 1;
                c.write_u64(probe_va + word * 8, (me as u64) << 56 | op)
            } else {
                st.reads += 1;
                c.read_u64(probe_va)
                    .map(|w| self.check_word(&mut st, me, index, probe, w))
            };
            if let Err(fault) = result {
                let seq1 = page.seq.load(Ordering::Acquire);
                if self.bbm && (seq0 & 1 == 1 || seq1 != seq0) {
                    st.transient_faults += 1;
                } else {
                    st.unexpected_faults += 1;
                    st.note(|| format!("unexpected {fault}"));
                }
            }
        }
        c.set_user(false);
        st
    }

    /// Check a probe word read from `page`'s probe `probe`.
    fn check_word(&self, st: &mut CpuStats, cpu: CpuId, page: usize, probe: usize, w: u64) {
        let ok = decode_probe(w).is_some_and(|(pg, cand, pr)| {
            pg == page
                && pr == probe
                && cand < 64
                && self.pages[page].allowed.load(Ordering::Acquire) & (1 << cand) != 0
        });
        if !ok {
            st.content_errors += 1;
            let p = &self.pages[page];
            st.note(|| {
                format!(
                    "cpu {cpu} read {} at {:#x}, but page {page} may map only frame(s) {}",
                    describe_word(w),
                    p.va + p.probes[probe],
                    frame_list(p.allowed.load(Ordering::Relaxed))
                )
            });
        }
    }

    /// Move a random page to another of its frames, as a kernel must: inside an update bracket,
    /// store the leaf (arm64: break, invalidate, make), invalidate here, and shoot down the
    /// others before the bracket closes.
    fn remap(
        &self,
        c: &Cpu<'_>,
        rng: &mut SmallRng,
        others: &CpuSet,
        omit_shootdown: bool,
        st: &mut CpuStats,
    ) {
        let m = c.machine();
        let index = self.remappable[rng.gen_range(0..self.remappable.len())];
        let page = &self.pages[index];
        let n = page.frames.len();
        let old = page.current.load(Ordering::Relaxed);
        let new = (old + rng.gen_range(1..n)) % n;
        page.seq.fetch_add(1, Ordering::SeqCst);
        page.allowed.fetch_or(1 << new, Ordering::SeqCst);
        m.pt_update_begin(VirtAddr::new(page.va), VirtAddr::new(page.va + page.size));
        // The planted bug invalidates here only, as if the kernel forgot the other CPUs.
        let others = (!omit_shootdown).then_some(others);
        if self.bbm {
            self.kit.store(page.slot, page.invalid);
            self.shootdown(m, page.va, others, st);
            // Invalid entries are never cached, so the new leaf needs no second invalidation.
            self.kit.store(page.slot, page.leaves[new]);
        } else {
            self.kit.store(page.slot, page.leaves[new]);
            self.shootdown(m, page.va, others, st);
        }
        m.pt_update_end();
        page.current.store(new, Ordering::Relaxed);
        page.allowed.fetch_and(!(1 << old), Ordering::SeqCst);
        page.seq.fetch_add(1, Ordering::SeqCst);
        st.remaps += 1;
    }

    /// Invalidate `va` on every CPU: arm64 by a broadcast TLBI (which includes this CPU), x86
    /// by INVLPG here and an IPI that waits for the others to do theirs. `others: None` is the
    /// planted bug: this CPU only.
    fn shootdown(&self, m: &Machine, va: u64, others: Option<&CpuSet>, st: &mut CpuStats) {
        let inv = TlbInval::Page {
            va: VirtAddr::new(va),
            tag: TagSel::Current,
            leaf_only: false,
        };
        let Some(others) = others else {
            m.tlb_invalidate_local(inv);
            return;
        };
        if self.broadcast {
            if let Err(e) = m.tlb_invalidate_broadcast(inv) {
                st.unexpected_faults += 1;
                st.note(|| format!("broadcast invalidation of {va:#x} failed: {e}"));
            }
            return;
        }
        m.tlb_invalidate_local(inv);
        if others.is_empty() {
            return;
        }
        let msg = IpiMessage {
            vector: SHOOTDOWN_VECTOR,
            args: [va, 0, 0, 0],
        };
        if let Err(e) = m.send_ipi(others, msg, true) {
            st.unexpected_faults += 1;
            st.note(|| format!("shootdown IPI for {va:#x} failed: {e}"));
        }
    }

    /// After the run, on the kernel CPU: every probe must show exactly the frame the tables map.
    pub fn final_check(&self, m: &Machine) -> CpuStats {
        m.run_on(KERNEL_CPU, |c| {
            let mut st = CpuStats::default();
            for (index, page) in self.pages.iter().enumerate() {
                c.set_user(page.user);
                let cur = page.current.load(Ordering::Relaxed);
                for (probe, &off) in page.probes.iter().enumerate() {
                    let va = page.va + off;
                    st.reads += 1;
                    match c.read_u64(va) {
                        Ok(w) if w == probe_word(index, cur, probe) => {}
                        Ok(w) => {
                            st.content_errors += 1;
                            st.note(|| {
                                format!(
                                    "after the run {va:#x} reads {}, but the tables map frame {cur} of page {index}",
                                    describe_word(w)
                                )
                            });
                        }
                        Err(f) => {
                            st.unexpected_faults += 1;
                            st.note(|| format!("after the run: {f}"));
                        }
                    }
                }
            }
            c.set_user(false);
            st
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_words_round_trip() {
        let w = probe_word(128, 3, 7);
        assert_eq!(decode_probe(w), Some((128, 3, 7)));
        assert_eq!(decode_probe(0), None);
        assert_eq!(decode_probe(5 << 56 | 1234), None);
        assert_eq!(describe_word(w), "frame 3 of page 128 (probe 7)");
        assert_eq!(frame_list(0b1010), "{1, 3}");
    }

    #[test]
    fn superpage_is_the_largest_that_fits() {
        let amd64 = || [4096u64, 2 << 20, 1 << 30].into_iter();
        assert_eq!(
            pick_superpage(amd64(), 1 << 30),
            Some((2 << 20, 4 << 20, 2))
        );
        assert_eq!(
            pick_superpage(amd64(), 2 << 30),
            Some((1 << 30, 1 << 30, 1))
        );
        assert_eq!(
            pick_superpage(amd64(), 4 << 30),
            Some((1 << 30, 1 << 30, 2))
        );
        assert_eq!(pick_superpage(amd64(), 4 << 20), None);
        assert_eq!(pick_superpage([4096u64].into_iter(), 1 << 30), None);
    }
}
