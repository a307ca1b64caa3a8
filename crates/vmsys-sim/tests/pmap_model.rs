//! Property test: random sequences of pmap operations, issued from two CPUs that both have the
//! address space loaded and access it through their MMUs, against a reference model (a map
//! from page to frame and write right). After every operation the touched pages are checked
//! through `extract` and through a CPU access; at the end every page, and the audit (tables vs
//! counts, PV lists, saved tables, kernel sync, no stale TLB entry, no leak).
//!
//! proptest prints the failing case (and its seed for replay with `PROPTEST_SEED`-style
//! regression files); `PROPTEST_CASES` scales the run.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use vmsys::arch::{FormatId, Prot};
use vmsys::{EnterFlags, PhysAddr, VirtAddr};

const PAGE: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Enter {
        page: u64,
        frame: u64,
        write: bool,
    },
    EnterRange {
        page: u64,
        n: u64,
        frame: u64,
    },
    Remove {
        page: u64,
        n: u64,
    },
    Protect {
        page: u64,
        n: u64,
    },
    /// Map a whole superpage region page by page with aligned, contiguous frames (promotes).
    Fill {
        region: u64,
    },
    /// A superpage entered directly.
    Super {
        region: u64,
        frame_region: u64,
    },
    Access {
        page: u64,
        write: bool,
    },
    Qenter {
        slot: u64,
        frame: u64,
    },
    Qremove {
        slot: u64,
    },
}

fn ops(pages: u64) -> impl Strategy<Value = Vec<(u32, Op)>> {
    let op = prop_oneof![
        4 => (0..pages, 0..2 * pages, any::<bool>()).prop_map(|(page, frame, write)| Op::Enter { page, frame, write }),
        2 => (0..pages, 1..600u64, 0..pages).prop_map(|(page, n, frame)| Op::EnterRange { page, n, frame }),
        3 => (0..pages, 1..700u64).prop_map(|(page, n)| Op::Remove { page, n }),
        2 => (0..pages, 1..700u64).prop_map(|(page, n)| Op::Protect { page, n }),
        1 => (0..2u64).prop_map(|region| Op::Fill { region }),
        1 => (0..2u64, 0..2u64).prop_map(|(region, frame_region)| Op::Super { region, frame_region }),
        4 => (0..pages, any::<bool>()).prop_map(|(page, write)| Op::Access { page, write }),
        1 => (0..8u64, 0..pages).prop_map(|(slot, frame)| Op::Qenter { slot, frame }),
        1 => (0..8u64).prop_map(|slot| Op::Qremove { slot }),
    ];
    prop::collection::vec((0..2u32, op), 1..40)
}

struct World {
    e: Env,
    p: std::sync::Arc<vmsys::Pmap>,
    ubase: u64,
    fbase: u64,
    kbase: u64,
    sp: u64,
    pages: u64,
    model: BTreeMap<u64, (u64, bool)>,
    kmodel: BTreeMap<u64, u64>,
}

impl World {
    fn new(f: FormatId) -> Self {
        let e = env(f, 2);
        let sp = e.sys.page_sizes().nth(1).unwrap();
        let p = e.sys.create().unwrap();
        for c in 0..2 {
            e.m.run_on(c, |_| e.sys.activate(&p).unwrap());
        }
        let ubase = e.uva(sp, 4);
        let kbase = e.grow(sp);
        World {
            ubase,
            fbase: frame(sp, 4),
            kbase,
            pages: 2 * sp / PAGE,
            sp,
            p,
            e,
            model: BTreeMap::new(),
            kmodel: BTreeMap::new(),
        }
    }

    fn check_page(&self, cpu: &vmsys_sim::Cpu<'_>, page: u64) {
        check_page(
            &self.e,
            &self.p,
            self.ubase,
            self.fbase,
            &self.model,
            cpu,
            page,
        );
    }

    fn apply(&mut self, cpu: u32, op: &Op) {
        let mut model = std::mem::take(&mut self.model);
        let mut kmodel = std::mem::take(&mut self.kmodel);
        let (ubase, fbase, kbase) = (self.ubase, self.fbase, self.kbase);
        let (e, p) = (&self.e, self.p.clone());
        let n_sp = self.sp / PAGE;
        let uva = |page: u64| VirtAddr::new(ubase + page * PAGE);
        let fpa = |f: u64| PhysAddr::new(fbase + f * PAGE);
        let pages = self.pages;
        e.m.run_on(cpu, |c| {
            let mut touched: Vec<u64> = Vec::new();
            match *op {
                Op::Enter { page, frame, write } => {
                    let prot = if write { Prot::WRITE } else { Prot::empty() };
                    e.sys
                        .enter(&p, uva(page), fpa(frame), prot, EnterFlags::MANAGED, 0)
                        .unwrap();
                    // (A clean writable entry: the first write sets the dirty bit.)
                    model.insert(page, (frame, write));
                    touched.push(page);
                }
                Op::EnterRange { page, n, frame } => {
                    let n = n.min(pages - page);
                    let free = (page..page + n).all(|q| !model.contains_key(&q));
                    let r = e.sys.enter_range(
                        &p,
                        uva(page),
                        fpa(frame),
                        n * PAGE,
                        Prot::WRITE,
                        EnterFlags::MANAGED,
                    );
                    assert_eq!(r.is_ok(), free, "enter_range over {page}+{n}: {r:?}");
                    if free {
                        for q in 0..n {
                            model.insert(page + q, (frame + q, true));
                        }
                    }
                    touched.extend([page, page + n - 1]);
                }
                Op::Remove { page, n } => {
                    let n = n.min(pages - page);
                    e.sys.remove(&p, uva(page), uva(page + n)).unwrap();
                    for q in page..page + n {
                        model.remove(&q);
                    }
                    touched.extend([
                        page.saturating_sub(1),
                        page,
                        page + n - 1,
                        (page + n).min(pages - 1),
                    ]);
                }
                Op::Protect { page, n } => {
                    let n = n.min(pages - page);
                    e.sys
                        .protect(&p, uva(page), uva(page + n), Prot::empty())
                        .unwrap();
                    for q in page..page + n {
                        if let Some(m) = model.get_mut(&q) {
                            m.1 = false;
                        }
                    }
                    touched.extend([page, page + n - 1]);
                }
                Op::Fill { region } => {
                    let first = region * n_sp;
                    for q in 0..n_sp {
                        let fr = region * n_sp + q;
                        e.sys
                            .enter(
                                &p,
                                uva(first + q),
                                fpa(fr),
                                Prot::WRITE,
                                EnterFlags::MANAGED | EnterFlags::DIRTY,
                                0,
                            )
                            .unwrap();
                        model.insert(first + q, (fr, true));
                    }
                    touched.extend([first, first + n_sp - 1]);
                }
                Op::Super {
                    region,
                    frame_region,
                } => {
                    let first = region * n_sp;
                    e.sys
                        .enter(
                            &p,
                            uva(first),
                            fpa(frame_region * n_sp),
                            Prot::WRITE,
                            EnterFlags::MANAGED,
                            1,
                        )
                        .unwrap();
                    for q in 0..n_sp {
                        model.insert(first + q, (frame_region * n_sp + q, true));
                    }
                    touched.extend([first, first + 5]);
                }
                Op::Access { page, write } => {
                    let va = uva(page).as_u64();
                    c.set_user(true);
                    let mut r = if write {
                        c.write_u64(va, page)
                    } else {
                        c.read_u64(va).map(|_| ())
                    };
                    c.set_user(false);
                    let ok = match model.get(&page) {
                        Some(&(_, w)) => !write || w,
                        None => false,
                    };
                    if write && ok && r.is_err() {
                        // A clean writable page that promotion write-protected (to see the next
                        // write): the VM's soft write fault re-enters it dirty.
                        let (fr, _) = model[&page];
                        e.sys
                            .enter(
                                &p,
                                uva(page),
                                fpa(fr),
                                Prot::WRITE,
                                EnterFlags::MANAGED | EnterFlags::DIRTY,
                                0,
                            )
                            .unwrap();
                        c.set_user(true);
                        r = c.write_u64(va, page);
                        c.set_user(false);
                    }
                    assert_eq!(
                        r.is_ok(),
                        ok,
                        "cpu {cpu} {} of page {page}: {r:?}",
                        if write { "write" } else { "read" }
                    );
                }
                Op::Qenter { slot, frame } => {
                    let va = VirtAddr::new(kbase + slot * PAGE);
                    e.sys.qenter(va, &[fpa(frame)]).unwrap();
                    kmodel.insert(slot, frame);
                    assert!(c.read_u64(va.as_u64()).is_ok(), "qenter reached cpu {cpu}");
                }
                Op::Qremove { slot } => {
                    let va = VirtAddr::new(kbase + slot * PAGE);
                    e.sys.qremove(va, 1).unwrap();
                    kmodel.remove(&slot);
                    assert!(
                        c.read_u64(va.as_u64()).is_err(),
                        "qremove reached cpu {cpu}"
                    );
                }
            }
            for t in touched {
                check_page(e, &p, ubase, fbase, &model, c, t);
            }
        });
        // The other CPU sees the same (no stale TLB entry survives a completed operation).
        e.m.run_on(1 - cpu, |c| {
            for page in [0, 1, n_sp - 1, n_sp, pages - 1] {
                check_page(e, &p, ubase, fbase, &model, c, page);
            }
        });
        self.model = model;
        self.kmodel = kmodel;
    }

    fn finish(self) {
        self.e.m.run_on(0, |c| {
            for page in 0..self.pages {
                self.check_page(c, page);
            }
            for slot in 0..8 {
                let va = self.kbase + slot * PAGE;
                let want = self
                    .kmodel
                    .get(&slot)
                    .map(|&f| PhysAddr::new(self.fbase + f * PAGE));
                assert_eq!(
                    self.e
                        .sys
                        .extract(self.e.sys.kernel_pmap(), VirtAddr::new(va)),
                    want
                );
            }
        });
        let rep = self.e.audit();
        assert_eq!(
            rep.pv_entries,
            self.model.len() as u64 - self.superpage_pv_savings(&rep)
        );
        // Tear down: nothing may leak.
        self.e.m.run_on(0, |_| {
            self.e
                .sys
                .remove(
                    &self.p,
                    VirtAddr::new(self.ubase),
                    VirtAddr::new(self.ubase + self.pages * PAGE),
                )
                .unwrap();
            self.e.sys.qremove(VirtAddr::new(self.kbase), 8).unwrap();
        });
        let rep = self.e.audit();
        assert_eq!(rep.user_ptps, 0);
        assert_eq!(self.e.sys.pv_in_use(), 0);
    }

    /// A superpage has one PV entry for all its pages.
    fn superpage_pv_savings(&self, rep: &vmsys::pmap::AuditReport) -> u64 {
        rep.superpages * (self.sp / PAGE - 1)
    }
}

fn check_page(
    e: &Env,
    p: &vmsys::Pmap,
    ubase: u64,
    fbase: u64,
    model: &BTreeMap<u64, (u64, bool)>,
    cpu: &vmsys_sim::Cpu<'_>,
    page: u64,
) {
    let va = ubase + page * PAGE;
    let got = e.sys.extract(p, VirtAddr::new(va));
    let want = model
        .get(&page)
        .map(|&(f, _)| PhysAddr::new(fbase + f * PAGE));
    assert_eq!(got, want, "extract of page {page}");
    cpu.set_user(true);
    let r = cpu.read_u64(va);
    cpu.set_user(false);
    assert_eq!(
        r.is_ok(),
        want.is_some(),
        "cpu {} read of page {page}: {r:?}",
        cpu.id()
    );
}

fn run(f: FormatId, ops: &[(u32, Op)]) {
    let mut w = World::new(f);
    for (cpu, op) in ops {
        w.apply(*cpu, op);
    }
    w.finish();
}

macro_rules! model_tests {
    ($($name:ident => $fmt:expr, $pages:expr;)*) => {
        $(
            proptest! {
                #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
                #[test]
                fn $name(ops in ops($pages)) {
                    run($fmt, &ops);
                }
            }
        )*
    };
}

model_tests! {
    model_amd64 => FormatId::Amd64, 1024;
    model_amd64_la57 => FormatId::Amd64La57, 1024;
    model_arm64 => FormatId::Arm64, 1024;
    model_i386 => FormatId::I386, 2048;
    model_i386_pae => FormatId::I386Pae, 1024;
}
