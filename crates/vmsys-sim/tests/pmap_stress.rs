//! Concurrency stress: four CPUs run pmap operations at once on one address space that is
//! loaded on all of them, while they access it through their MMUs.
//!
//! Each CPU owns some pages so that results can be checked exactly: every fourth page of two
//! shared superpage regions (so that all four CPUs change entries of the same page-table pages
//! and race on their counts), a superpage region of its own that it fills until it promotes and
//! then demotes, a block of kernel VA for `qenter`, and its quick-map slot. It also reads other
//! CPUs' pages (no value check: they change under it; the stale-translation detector checks every
//! access) and forks the shared region into a private pmap with `copy`. At the end: every owned
//! page against the model, the full audit (counts, PV lists, kernel sync, no stale translation),
//! and no page-table page leaked.
//!
//! `VMSYS_SEED` reproduces a run; `VMSYS_STRESS_OPS` scales it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use common::*;
use rand::{Rng, SeedableRng};
use vmsys::arch::{CacheMode, FormatId, Prot};
use vmsys::{EnterFlags, PhysAddr, VirtAddr};

const PAGE: u64 = 4096;
const CPUS: u32 = 4;
const KPAGES: u64 = 16;

/// What one CPU knows of its own pages of the shared region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Own {
    frame: u64,
    write: bool,
    /// The last value this CPU stored in the page (0: none since it was entered).
    tag: u64,
}

struct Layout {
    /// The shared region: two superpages' worth, page `i` owned by CPU `i % 4`.
    shared: u64,
    shared_pages: u64,
    /// Per CPU: a superpage region to promote and demote.
    private: [u64; CPUS as usize],
    sp: u64,
    /// Per CPU: `KPAGES` pages of kernel VA.
    kblock: [u64; CPUS as usize],
}

/// Frames of CPU `cpu`: 16 MiB each above `DATA`, a second version of each page 4 MiB in.
fn shared_frame(cpu: u32, page: u64, version: u64) -> u64 {
    DATA + cpu as u64 * (16 << 20) + (version % 2) * (4 << 20) + (page / CPUS as u64) * PAGE
}

/// An aligned superpage of frames for CPU `cpu`'s promotions (above the shared frames).
fn super_frames(cpu: u32, sp: u64) -> u64 {
    (DATA + (64 << 20)).next_multiple_of(sp) + cpu as u64 * sp
}

fn stress(f: FormatId) {
    let seed = seed(0x5eed_0005);
    let ops: u32 = std::env::var("VMSYS_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let e = env(f, CPUS);
    let sp = e.sys.page_sizes().nth(1).unwrap();
    let kbase = e.grow(KPAGES * PAGE * CPUS as u64);
    let baseline = e.frames_in_use();
    let p = e.sys.create().unwrap();
    for c in 0..CPUS {
        e.m.run_on(c, |_| e.sys.activate(&p).unwrap());
    }
    let lay = Layout {
        shared: e.uva(sp, 4),
        shared_pages: 2 * sp / PAGE,
        private: std::array::from_fn(|c| e.uva(sp, 8 + c as u64)),
        sp,
        kblock: std::array::from_fn(|c| kbase + c as u64 * KPAGES * PAGE),
    };
    let start = Barrier::new(CPUS as usize);
    let models: Vec<BTreeMap<u64, Own>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CPUS)
            .map(|cpu| {
                let (e, p, lay, start) = (&e, &p, &lay, &start);
                s.spawn(move || {
                    e.m.run_on(cpu, |c| {
                        start.wait();
                        run_cpu(e, p, lay, c, cpu, seed, ops)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // Every owned page as its CPU left it, from CPU 0.
    e.m.run_on(0, |c| {
        for (cpu, model) in models.iter().enumerate() {
            for page in (cpu as u64..lay.shared_pages).step_by(CPUS as usize) {
                let va = lay.shared + page * PAGE;
                let got = e.sys.extract(&p, VirtAddr::new(va)).map(|pa| pa.as_u64());
                assert_eq!(
                    got,
                    model.get(&page).map(|o| o.frame),
                    "seed {seed}: page {page} of cpu {cpu}"
                );
                if let Some(o) = model.get(&page) {
                    c.set_user(true);
                    let r = c.read_u64(va);
                    c.set_user(false);
                    if o.tag != 0 {
                        assert_eq!(r, Ok(o.tag), "seed {seed}: page {page} of cpu {cpu}");
                    }
                }
            }
        }
    });
    let rep = e.audit();
    assert!(rep.user_ptps > 0);
    let st = e.sys.stats();
    assert!(
        st.shootdowns > 0,
        "seed {seed}: four CPUs sharing a pmap must have shot each other down"
    );
    e.m.run_on(0, |_| {
        e.sys
            .remove(
                &p,
                VirtAddr::new(lay.shared),
                VirtAddr::new(lay.private[CPUS as usize - 1] + sp),
            )
            .unwrap();
    });
    e.audit();
    for c in 0..CPUS {
        e.m.run_on(c, |_| e.sys.activate(e.sys.kernel_pmap()).unwrap());
    }
    e.m.run_on(0, |_| e.sys.destroy(p).unwrap());
    assert_eq!(
        e.frames_in_use(),
        baseline,
        "seed {seed}: page-table pages leaked"
    );
}

fn run_cpu(
    e: &Env,
    p: &Arc<vmsys::Pmap>,
    lay: &Layout,
    c: &vmsys_sim::Cpu<'_>,
    cpu: u32,
    seed: u64,
    ops: u32,
) -> BTreeMap<u64, Own> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ ((cpu as u64 + 1) * 0x9e37_79b9));
    let mut own: BTreeMap<u64, Own> = BTreeMap::new();
    let mine: Vec<u64> = (cpu as u64..lay.shared_pages)
        .step_by(CPUS as usize)
        .collect();
    let uva = |page: u64| lay.shared + page * PAGE;
    let user = |f: &dyn Fn() -> Result<u64, vmsys::platform::Fault>| {
        c.set_user(true);
        let r = f();
        c.set_user(false);
        r
    };
    let mut version = 0u64;
    for step in 0..ops {
        let ctx = |what: &str| format!("seed {seed}, cpu {cpu}, step {step}: {what}");
        match rng.gen_range(0..100) {
            // Enter one of my pages (replacing what was there), store a tag, read it back.
            0..=29 => {
                let page = mine[rng.gen_range(0..mine.len())];
                version += 1;
                let frame = shared_frame(cpu, page, version);
                let mut flags = EnterFlags::MANAGED;
                if rng.gen_bool(0.2) {
                    flags |= EnterFlags::WIRED;
                }
                e.sys
                    .enter(
                        p,
                        VirtAddr::new(uva(page)),
                        PhysAddr::new(frame),
                        Prot::WRITE | Prot::USER,
                        flags,
                        0,
                    )
                    .unwrap_or_else(|err| panic!("{}", ctx(&format!("enter: {err}"))));
                let tag = (cpu as u64) << 56 | page << 24 | step as u64;
                user(&|| c.write_u64(uva(page), tag).map(|_| 0))
                    .unwrap_or_else(|err| panic!("{}", ctx(&format!("write: {err:?}"))));
                own.insert(
                    page,
                    Own {
                        frame,
                        write: true,
                        tag,
                    },
                );
            }
            // Remove one of my pages (the others' are not mine to remove).
            30..=41 => {
                let page = mine[rng.gen_range(0..mine.len())];
                e.sys
                    .remove(p, VirtAddr::new(uva(page)), VirtAddr::new(uva(page) + PAGE))
                    .unwrap();
                own.remove(&page);
                assert!(
                    user(&|| c.read_u64(uva(page))).is_err(),
                    "{}",
                    ctx("a removed page still reads")
                );
            }
            // Write-protect one of my pages: reads keep working, writes fault.
            42..=51 => {
                let page = mine[rng.gen_range(0..mine.len())];
                e.sys
                    .protect(
                        p,
                        VirtAddr::new(uva(page)),
                        VirtAddr::new(uva(page) + PAGE),
                        Prot::USER,
                    )
                    .unwrap();
                if let Some(o) = own.get_mut(&page) {
                    o.write = false;
                    let r = user(&|| c.read_u64(uva(page)));
                    assert_eq!(r, Ok(o.tag), "{}", ctx("read after protect"));
                    assert!(
                        user(&|| c.write_u64(uva(page), 1).map(|_| 0)).is_err(),
                        "{}",
                        ctx("a write-protected page takes writes")
                    );
                }
            }
            // Read my pages back, and someone else's (the detector checks those).
            52..=71 => {
                let page = mine[rng.gen_range(0..mine.len())];
                let r = user(&|| c.read_u64(uva(page)));
                match own.get(&page) {
                    Some(o) => assert_eq!(r, Ok(o.tag), "{}", ctx("read back")),
                    None => assert!(r.is_err(), "{}", ctx("an unmapped page reads")),
                }
                let other = rng.gen_range(0..lay.shared_pages);
                let _ = user(&|| c.read_u64(uva(other)));
            }
            // Fill my private region page by page until it promotes, check it through the
            // MMU, demote it with a one-page protect, then remove it.
            72..=76 => {
                let base = lay.private[cpu as usize];
                let fb = super_frames(cpu, lay.sp);
                let n = lay.sp / PAGE;
                for i in 0..n {
                    e.sys
                        .enter(
                            p,
                            VirtAddr::new(base + i * PAGE),
                            PhysAddr::new(fb + i * PAGE),
                            Prot::WRITE | Prot::USER,
                            EnterFlags::MANAGED,
                            0,
                        )
                        .unwrap();
                }
                let m = e.sys.mapping(p, VirtAddr::new(base)).unwrap();
                assert_eq!(m.size, lay.sp, "{}", ctx("a filled region promotes"));
                let probe = base + rng.gen_range(0..n) * PAGE;
                if user(&|| c.write_u64(probe, probe).map(|_| 0)).is_err() {
                    // Promotion write-protected the clean entries: the first write faults and
                    // the fault path maps the superpage writable (vm_fault's superpage enter).
                    e.sys
                        .enter(
                            p,
                            VirtAddr::new(base),
                            PhysAddr::new(fb),
                            Prot::WRITE | Prot::USER,
                            EnterFlags::MANAGED,
                            1,
                        )
                        .unwrap();
                    user(&|| c.write_u64(probe, probe).map(|_| 0)).unwrap();
                }
                e.sys
                    .protect(
                        p,
                        VirtAddr::new(base),
                        VirtAddr::new(base + PAGE),
                        Prot::USER,
                    )
                    .unwrap();
                assert_eq!(
                    e.sys.mapping(p, VirtAddr::new(probe)).unwrap().size,
                    PAGE,
                    "{}",
                    ctx("a one-page protect demotes")
                );
                assert_eq!(user(&|| c.read_u64(probe)), Ok(probe), "{}", ctx("demoted"));
                e.sys
                    .remove(p, VirtAddr::new(base), VirtAddr::new(base + lay.sp))
                    .unwrap();
                assert!(user(&|| c.read_u64(probe)).is_err());
            }
            // qenter some of my frames in my kernel block, use them, qremove.
            77..=86 => {
                let va = lay.kblock[cpu as usize];
                let n = rng.gen_range(1..=KPAGES);
                let frames: Vec<PhysAddr> = (0..n)
                    .map(|i| PhysAddr::new(shared_frame(cpu, i * CPUS as u64 + cpu as u64, 1)))
                    .collect();
                e.sys.qenter(VirtAddr::new(va), &frames).unwrap();
                let i = rng.gen_range(0..n);
                let w = 0xbeef_0000 | step as u64;
                // Word 511 of the page: the tags live in word 0.
                c.write_u64(va + i * PAGE + 511 * 8, w).unwrap();
                assert_eq!(c.read_u64(va + i * PAGE + 511 * 8), Ok(w));
                e.sys.qremove(VirtAddr::new(va), n as usize).unwrap();
                assert!(c.read_u64(va + i * PAGE).is_err(), "{}", ctx("qremove"));
            }
            // kenter/kremove one page of my block.
            87..=90 => {
                let va = lay.kblock[cpu as usize] + (KPAGES - 1) * PAGE;
                e.sys
                    .kenter(
                        VirtAddr::new(va),
                        PhysAddr::new(shared_frame(cpu, cpu as u64, 0)),
                        CacheMode::WriteBack,
                    )
                    .unwrap();
                assert!(c.read_u64(va).is_ok());
                e.sys.kremove(VirtAddr::new(va)).unwrap();
                assert!(c.read_u64(va).is_err(), "{}", ctx("kremove"));
            }
            // A quick mapping of one of my frames.
            91..=94 => {
                let frame = PhysAddr::new(shared_frame(cpu, cpu as u64, 1) + 8 * PAGE);
                let va = e.sys.quick_enter_page(frame).unwrap();
                c.write_u64(va.as_u64() + 8, step as u64).unwrap();
                assert_eq!(c.read_u64(va.as_u64() + 8), Ok(step as u64));
                e.sys.quick_remove_page(va).unwrap();
            }
            // Fork the shared region: my unwired pages must appear in the child, read-only.
            _ => {
                let child = e.sys.create().unwrap();
                e.sys
                    .copy(
                        &child,
                        p,
                        VirtAddr::new(lay.shared),
                        lay.shared_pages * PAGE,
                    )
                    .unwrap();
                for &page in &mine {
                    let got = e.sys.extract(&child, VirtAddr::new(uva(page)));
                    if let (Some(got), Some(o)) = (got, own.get(&page)) {
                        assert_eq!(got.as_u64(), o.frame, "{}", ctx("copied frame"));
                    }
                }
                e.sys
                    .remove(
                        &child,
                        VirtAddr::new(lay.shared),
                        VirtAddr::new(lay.shared + lay.shared_pages * PAGE),
                    )
                    .unwrap();
                e.sys.destroy(child).unwrap();
            }
        }
    }
    own
}

/// One CPU remaps a page back and forth between two frames (on arm64 through break-before-make,
/// so the entry is briefly invalid) while three others read it. With the pmap's fault handler
/// installed no read ever fails: a read that meets the window waits for the pmap lock and
/// retries. Every read returns one of the two frames' tags, and no CPU keeps a stale entry.
fn remap_under_readers(f: FormatId) {
    let e = env(f, CPUS);
    e.sys.install_fault_handler();
    let p = e.sys.create().unwrap();
    let v = e.uva(PAGE, 3);
    let frames = [shared_frame(0, 0, 0), shared_frame(0, 0, 1)];
    e.m.run_on(0, |c| {
        for (i, &fr) in frames.iter().enumerate() {
            let va = e.sys.quick_enter_page(PhysAddr::new(fr)).unwrap();
            c.write_u64(va.as_u64(), 0x7a90 + i as u64).unwrap();
            e.sys.quick_remove_page(va).unwrap();
        }
    });
    let rounds = 300;
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = Barrier::new(CPUS as usize);
    std::thread::scope(|s| {
        for cpu in 1..CPUS {
            let (e, p, done, start) = (&e, &p, &done, &start);
            s.spawn(move || {
                e.m.run_on(cpu, |c| {
                    e.sys.activate(p).unwrap();
                    start.wait();
                    let mut reads = 0u64;
                    while !done.load(std::sync::atomic::Ordering::SeqCst) || reads == 0 {
                        c.set_user(true);
                        let r = c.read_u64(v);
                        c.set_user(false);
                        let w = r.unwrap_or_else(|f| panic!("cpu {cpu}: a read failed: {f}"));
                        assert!(w == 0x7a90 || w == 0x7a91, "cpu {cpu}: read {w:#x}");
                        reads += 1;
                    }
                })
            });
        }
        e.m.run_on(0, |_| {
            e.sys.activate(&p).unwrap();
            e.sys
                .enter(
                    &p,
                    VirtAddr::new(v),
                    PhysAddr::new(frames[0]),
                    Prot::USER,
                    EnterFlags::MANAGED,
                    0,
                )
                .unwrap();
            start.wait();
            for r in 0..rounds {
                e.sys
                    .enter(
                        &p,
                        VirtAddr::new(v),
                        PhysAddr::new(frames[(r + 1) % 2]),
                        Prot::USER,
                        EnterFlags::MANAGED,
                        0,
                    )
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    e.audit();
    e.m.run_on(0, |_| {
        e.sys
            .remove(&p, VirtAddr::new(v), VirtAddr::new(v + PAGE))
            .unwrap()
    });
}

for_each_format! {
    four_cpus_on_one_pmap => crate::stress;
    remap_under_readers_ => crate::remap_under_readers;
}
