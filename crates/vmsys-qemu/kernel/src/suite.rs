//! The conformance suite: the pmap's operations checked through the real (emulated) MMU, with
//! the full `PmapSystem::audit` after each test; then cross-CPU tests where the APs read
//! through their TLBs while the BSP changes the mapping.
//!
//! Every check reads or writes through a probe (`fault::read64`...), so that what is checked is
//! what the MMU translated, and a fault comes back as a value.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use vmsys::arch::{CacheMode, Prot};
use vmsys::phys::BuddyAllocator;
use vmsys::platform::{FaultReason, Platform};
use vmsys::{EnterFlags, PhysAddr, VirtAddr, PAGE_SIZE};

use crate::fault::{read64, touch_write};
use crate::Sys;

type R = Result<(), String>;

const UVA: u64 = 0x0000_0040_0000_0000;
const MB2: u64 = 2 << 20;
const GB1: u64 = 1 << 30;

struct Ctx<'a> {
    sys: &'a Arc<Sys>,
    buddy: &'a Arc<BuddyAllocator>,
    passed: u32,
    failed: u32,
    /// Only the cross-CPU tests (the run with shootdowns dropped).
    only_cross: bool,
}

fn pattern(pa: u64) -> u64 {
    pa ^ 0x5aa5_0000_0000_0000
}

impl Ctx<'_> {
    fn test(&mut self, name: &str, f: impl FnOnce(&Self) -> R) {
        if self.only_cross && !name.starts_with("cross_cpu") {
            return;
        }
        let t = crate::cpu::rdtsc();
        let mut r = f(self);
        // Back to the kernel pmap whatever the test left loaded.
        self.sys
            .activate(self.sys.kernel_pmap())
            .expect("the kernel pmap activates");
        if r.is_ok() {
            if let Err(e) = self.sys.audit() {
                r = Err(format!("audit after the test: {e:?}"));
            }
        }
        let mcyc = (crate::cpu::rdtsc() - t) / 1_000_000;
        match r {
            Ok(()) => {
                crate::println!("TEST {name} ... ok");
                self.passed += 1;
            }
            Err(e) => {
                crate::println!("TEST {name} ... FAIL: {e}");
                self.failed += 1;
            }
        }
        crate::println!("  ({name}: {mcyc} Mcycles)");
    }

    fn frames(&self, order: usize) -> Result<PhysAddr, String> {
        let pa = self
            .buddy
            .alloc(0, order)
            .ok_or(format!("no free block of order {order}"))?;
        let plat = self.sys.platform();
        let mut off = 0;
        while off < PAGE_SIZE << order {
            let p = pa.as_u64() + off;
            plat.phys_write(PhysAddr::new(p), &pattern(p).to_le_bytes());
            off += PAGE_SIZE;
        }
        Ok(pa)
    }

    fn free(&self, pa: PhysAddr, order: usize) {
        self.buddy
            .free(pa, order)
            .expect("a test frame is freed once");
    }
}

fn expect_word(va: u64, want: u64) -> R {
    match read64(va) {
        Ok(v) if v == want => Ok(()),
        Ok(v) => Err(format!("{va:#x} reads {v:#x}, expected {want:#x}")),
        Err(f) => Err(format!("{va:#x} faults ({f}), expected {want:#x}")),
    }
}

fn expect_fault(va: u64, write: bool, what: fn(&FaultReason) -> bool) -> R {
    let r = if write {
        touch_write(va)
    } else {
        read64(va).map(|_| ())
    };
    match r {
        Ok(()) => Err(format!(
            "{} of {va:#x} did not fault",
            if write { "write" } else { "read" }
        )),
        Err(f) if what(&f.reason) && f.va.as_u64() == va => Ok(()),
        Err(f) => Err(format!("unexpected fault {f}")),
    }
}

fn not_present(r: &FaultReason) -> bool {
    matches!(r, FaultReason::NotPresent { .. })
}
fn protection(r: &FaultReason) -> bool {
    matches!(r, FaultReason::Protection { .. })
}

fn e<E: core::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// Pages `pages` of the run at `va` read the pattern of the frames at `pa` onwards.
fn expect_frames(va: u64, pa: PhysAddr, pages: impl IntoIterator<Item = u64>) -> R {
    for i in pages {
        expect_word(va + i * PAGE_SIZE, pattern(pa.as_u64() + i * PAGE_SIZE))?;
    }
    Ok(())
}

/// `len` bytes of frames from `pa`, mapped writable and managed at `va` by one `enter_range`.
fn map_managed_range(sys: &Sys, p: &vmsys::Pmap, va: u64, pa: PhysAddr, len: u64) -> R {
    sys.enter_range(
        p,
        VirtAddr::new(va),
        pa,
        len,
        Prot::WRITE,
        EnterFlags::MANAGED,
    )
    .map_err(e("enter_range"))
}

/// enter / protect / remove of one page size, checked through the MMU.
fn page_size_cycle(c: &Ctx, psind: usize, order: usize, unmanaged_pa: Option<u64>) -> R {
    let sys = c.sys;
    let size = PAGE_SIZE << order;
    let p = sys.create().map_err(e("create"))?;
    sys.activate(&p).map_err(e("activate"))?;
    let (pa, owned) = match unmanaged_pa {
        Some(pa) => (PhysAddr::new(pa), false),
        None => (c.frames(order)?, true),
    };
    let va = UVA + GB1;
    let flags = if owned {
        EnterFlags::MANAGED
    } else {
        EnterFlags::empty()
    };
    let r = (|| {
        sys.enter(&p, VirtAddr::new(va), pa, Prot::WRITE, flags, psind)
            .map_err(e("enter"))?;
        let m = sys
            .mapping(&p, VirtAddr::new(va))
            .ok_or("no mapping after enter")?;
        if m.size != size {
            return Err(format!("mapping size {:#x}, expected {size:#x}", m.size));
        }
        // Words at the start, middle and end of the page, through the MMU.
        let offs = if owned {
            [0, (size / 2) & !(PAGE_SIZE - 1), size - PAGE_SIZE]
        } else {
            [0, 0x8000, 0x10_0000]
        };
        for off in offs {
            let p = pa.as_u64() + off;
            let want = if owned {
                pattern(p)
            } else {
                let mut b = [0u8; 8];
                sys.platform().phys_read(PhysAddr::new(p), &mut b);
                u64::from_le_bytes(b)
            };
            expect_word(va + off, want)?;
        }
        touch_write(va + 8).map_err(|f| format!("write to a writable page faulted: {f}"))?;
        sys.protect(
            &p,
            VirtAddr::new(va),
            VirtAddr::new(va + size),
            Prot::empty(),
        )
        .map_err(e("protect"))?;
        if let Err(err) = expect_fault(va + size - 8, true, protection) {
            let root = crate::cpu::cr3() & !0xfff;
            return Err(format!(
                "{err}; the walk finds {:x?}, cr3 {root:#x} pmap root {:#x}",
                crate::plat::walk(root, va + size - 8),
                p.root().as_u64()
            ));
        }
        expect_word(
            va,
            if owned {
                pattern(pa.as_u64())
            } else {
                read64(va).unwrap_or(0)
            },
        )?;
        sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + size))
            .map_err(e("remove"))?;
        expect_fault(va, false, not_present)?;
        expect_fault(va + size - 8, false, not_present)
    })();
    sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + size))
        .ok();
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    if owned {
        c.free(pa, order);
    }
    r
}

fn promotion_and_demotion(c: &Ctx) -> R {
    let sys = c.sys;
    let p = sys.create().map_err(e("create"))?;
    sys.activate(&p).map_err(e("activate"))?;
    let pa = c.frames(9)?;
    let va = UVA + 2 * GB1;
    let before = sys.stats();
    let r = (|| {
        for i in 0..512 {
            let o = i * PAGE_SIZE;
            // Entered dirty, as after a write fault: a clean writable run would be promoted
            // read-only (as FreeBSD does, so that the first write to the superpage faults and
            // its dirtiness is tracked), and the write checks below would fault.
            sys.enter(
                &p,
                VirtAddr::new(va + o),
                PhysAddr::new(pa.as_u64() + o),
                Prot::WRITE,
                EnterFlags::MANAGED | EnterFlags::DIRTY,
                0,
            )
            .map_err(e("enter"))?;
            expect_word(va + o, pattern(pa.as_u64() + o))?;
            touch_write(va + o).map_err(|f| format!("write before promotion faulted: {f}"))?;
        }
        let m = sys.mapping(&p, VirtAddr::new(va)).ok_or("no mapping")?;
        let promoted = sys.stats().promotions - before.promotions;
        if m.size != MB2 || promoted != 1 {
            return Err(format!(
                "after filling the table: leaf size {:#x}, {promoted} promotions",
                m.size
            ));
        }
        expect_frames(va, pa, (0..512).step_by(97))?;
        // Write-protect one 4 KiB page: the superpage must be demoted.
        let one = va + 5 * PAGE_SIZE;
        sys.protect(
            &p,
            VirtAddr::new(one),
            VirtAddr::new(one + PAGE_SIZE),
            Prot::empty(),
        )
        .map_err(e("protect"))?;
        let m = sys
            .mapping(&p, VirtAddr::new(va))
            .ok_or("no mapping after demotion")?;
        if m.size != PAGE_SIZE || sys.stats().demotions == before.demotions {
            return Err(format!(
                "after protecting one page: leaf size {:#x}",
                m.size
            ));
        }
        expect_fault(one, true, protection)?;
        touch_write(one + PAGE_SIZE).map_err(|f| format!("neighbour not writable: {f}"))?;
        expect_word(one, pattern(pa.as_u64() + 5 * PAGE_SIZE))
    })();
    sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + MB2))
        .map_err(e("remove"))?;
    expect_fault(va, false, not_present)?;
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(pa, 9);
    r
}

fn range_map_unmap(c: &Ctx) -> R {
    let sys = c.sys;
    let p = sys.create().map_err(e("create"))?;
    sys.activate(&p).map_err(e("activate"))?;
    let pa = c.frames(6)?;
    let len = 64 * PAGE_SIZE;
    // Across a 2 MiB boundary, so that two last-level tables are filled by the cursor.
    let va = UVA + 3 * GB1 + MB2 - 32 * PAGE_SIZE;
    let r = (|| {
        map_managed_range(sys, &p, va, pa, len)?;
        expect_frames(va, pa, 0..64)?;
        if p.resident_count() != 64 {
            return Err(format!("resident count {}", p.resident_count()));
        }
        sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + len))
            .map_err(e("remove"))?;
        for i in 0..64 {
            expect_fault(va + i * PAGE_SIZE, false, not_present)?;
        }
        Ok(())
    })();
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(pa, 6);
    r
}

/// A new kernel page table made by growkernel is seen from an address space created before and
/// one created after, each loaded on another CPU.
fn growkernel_everywhere(c: &Ctx) -> R {
    let sys = c.sys.clone();
    let old = sys.create().map_err(e("create"))?;
    let end = sys.kernel_end().as_u64();
    let va = end + 64 * MB2;
    sys.growkernel(VirtAddr::new(va + PAGE_SIZE))
        .map_err(e("growkernel"))?;
    let pa = c.frames(0)?;
    sys.kenter(VirtAddr::new(va), pa, CacheMode::WriteBack)
        .map_err(e("kenter"))?;
    let new = sys.create().map_err(e("create"))?;
    let want = pattern(pa.as_u64());
    let n = sys.platform().cpu_count();
    let bad = Arc::new(AtomicU64::new(0));
    let mut tickets = Vec::new();
    for (i, p) in [old.clone(), new.clone()].into_iter().enumerate() {
        let cpu = 1 + (i as u32 % (n - 1).max(1));
        let (s, b) = (sys.clone(), bad.clone());
        tickets.push(crate::smp::spawn(cpu, move || {
            s.activate(&p).expect("activate");
            if read64(va) != Ok(want) {
                b.fetch_add(1, Ordering::SeqCst);
            }
            s.activate(s.kernel_pmap()).expect("activate");
        }));
    }
    tickets.into_iter().for_each(crate::smp::wait);
    sys.activate(&new).map_err(e("activate"))?;
    expect_word(va, want)?;
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.kremove(VirtAddr::new(va)).map_err(e("kremove"))?;
    expect_fault(va, false, not_present)?;
    sys.destroy(old).map_err(e("destroy"))?;
    sys.destroy(new).map_err(e("destroy"))?;
    c.free(pa, 0);
    match bad.load(Ordering::SeqCst) {
        0 => Ok(()),
        b => Err(format!("{b} address spaces did not see the kernel mapping")),
    }
}

fn qenter_and_quick_maps(c: &Ctx) -> R {
    let sys = c.sys;
    let pa = c.frames(2)?;
    let pages: Vec<PhysAddr> = (0..4)
        .map(|i| PhysAddr::new(pa.as_u64() + i * PAGE_SIZE))
        .collect();
    let va = sys.kernel_end().as_u64() - 8 * PAGE_SIZE;
    let r = (|| {
        sys.qenter(VirtAddr::new(va), &pages).map_err(e("qenter"))?;
        for (i, p) in pages.iter().enumerate() {
            expect_word(va + i as u64 * PAGE_SIZE, pattern(p.as_u64()))?;
        }
        // Remap in reverse order: the old translations must be gone.
        let rev: Vec<PhysAddr> = pages.iter().rev().copied().collect();
        sys.qenter(VirtAddr::new(va), &rev)
            .map_err(e("qenter again"))?;
        for (i, p) in rev.iter().enumerate() {
            expect_word(va + i as u64 * PAGE_SIZE, pattern(p.as_u64()))?;
        }
        sys.qremove(VirtAddr::new(va), 4).map_err(e("qremove"))?;
        expect_fault(va, false, not_present)?;
        let q = sys
            .quick_enter_page(pages[2])
            .map_err(e("quick_enter_page"))?;
        let r = expect_word(q.as_u64(), pattern(pages[2].as_u64()));
        sys.quick_remove_page(q).map_err(e("quick_remove_page"))?;
        r?;
        let q2 = sys
            .quick_enter_page(pages[3])
            .map_err(e("quick_enter_page"))?;
        let r = expect_word(q2.as_u64(), pattern(pages[3].as_u64()));
        sys.quick_remove_page(q2).map_err(e("quick_remove_page"))?;
        r?;
        // Nesting is refused on the real machine too, and leaves the held slot intact.
        let held = sys
            .quick_enter_page(pages[2])
            .map_err(e("quick_enter_page"))?;
        let nested = sys.quick_enter_page(pages[3]);
        let r = expect_word(held.as_u64(), pattern(pages[2].as_u64()));
        sys.quick_remove_page(held)
            .map_err(e("quick_remove_page"))?;
        if nested.is_ok() {
            return Err(String::from("a nested quick map was allowed"));
        }
        r?;
        let (s, d) = sys
            .quick_enter_pair(pages[0], pages[1])
            .map_err(e("quick_enter_pair"))?;
        let r = expect_word(s.as_u64(), pattern(pages[0].as_u64()))
            .and_then(|_| expect_word(d.as_u64(), pattern(pages[1].as_u64())));
        sys.quick_remove_pair(s, d)
            .map_err(e("quick_remove_pair"))?;
        r
    })();
    c.free(pa, 2);
    r
}

fn copy_to_child(c: &Ctx) -> R {
    let sys = c.sys;
    let src = sys.create().map_err(e("create"))?;
    let dst = sys.create().map_err(e("create"))?;
    let pa = c.frames(3)?;
    let va = UVA + 4 * GB1;
    let len = 8 * PAGE_SIZE;
    let r = (|| {
        map_managed_range(sys, &src, va, pa, len)?;
        let n = sys
            .copy(&dst, &src, VirtAddr::new(va), len)
            .map_err(e("copy"))?;
        sys.activate(&dst).map_err(e("activate"))?;
        // What copy did not copy must not be readable; what it did must be the same frames.
        for i in 0..8 {
            let v = va + i * PAGE_SIZE;
            match read64(v) {
                Ok(w) if w == pattern(pa.as_u64() + i * PAGE_SIZE) => {}
                Ok(w) => return Err(format!("child reads {w:#x} at {v:#x}")),
                Err(f) if n < 8 && not_present(&f.reason) => {}
                Err(f) => return Err(format!("child faults at {v:#x}: {f}")),
            }
        }
        if n == 0 {
            return Err("copy copied nothing".into());
        }
        Ok(())
    })();
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.remove(&src, VirtAddr::new(va), VirtAddr::new(va + len))
        .map_err(e("remove"))?;
    sys.remove(&dst, VirtAddr::new(va), VirtAddr::new(va + len))
        .map_err(e("remove"))?;
    sys.destroy(src).map_err(e("destroy"))?;
    sys.destroy(dst).map_err(e("destroy"))?;
    c.free(pa, 3);
    r
}

static GEN: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU64 = AtomicU64::new(0);
static STALE: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);

/// Readers on every AP load `va` of `pmap` through their TLBs while the BSP runs `op`; once
/// `op` has returned (GEN = 1), no read may see `old`. Returns (stale reads, reads after).
fn readers_during(
    c: &Ctx,
    pmap: &Arc<vmsys::Pmap>,
    va: u64,
    old: u64,
    op: impl FnOnce() -> R,
) -> Result<(u64, u64), String> {
    for a in [&GEN, &STOP, &STALE, &READS] {
        a.store(0, Ordering::SeqCst);
    }
    let sys = c.sys.clone();
    let n = sys.platform().cpu_count();
    if n < 2 {
        return Err("needs at least 2 CPUs".into());
    }
    let mut tickets = Vec::new();
    for cpu in 1..n {
        let (s, p) = (sys.clone(), pmap.clone());
        tickets.push(crate::smp::spawn(cpu, move || {
            s.activate(&p).expect("activate");
            while STOP.load(Ordering::SeqCst) == 0 {
                let g = GEN.load(Ordering::SeqCst);
                let v = read64(va);
                if g == 1 {
                    READS.fetch_add(1, Ordering::SeqCst);
                    if v == Ok(old) {
                        STALE.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Where a shootdown is taken (and acknowledged).
                s.platform().interrupt_point();
            }
            s.activate(s.kernel_pmap()).expect("activate");
        }));
    }
    // Let every reader cache the translation.
    let t = crate::cpu::rdtsc();
    while crate::cpu::rdtsc() - t < 50_000_000 {
        crate::cpu::interrupt_window();
    }
    let r = op();
    GEN.store(1, Ordering::SeqCst);
    while r.is_ok() && READS.load(Ordering::SeqCst) < 3000 * (n as u64 - 1) {
        crate::cpu::interrupt_window();
    }
    STOP.store(1, Ordering::SeqCst);
    tickets.into_iter().for_each(crate::smp::wait);
    r?;
    Ok((STALE.load(Ordering::SeqCst), READS.load(Ordering::SeqCst)))
}

/// One CPU changes or removes a mapping that the others read through their TLBs.
fn cross_cpu(c: &Ctx, change: bool) -> R {
    let sys = c.sys;
    let p = sys.create().map_err(e("create"))?;
    let old = c.frames(0)?;
    let new = c.frames(0)?;
    let va = UVA + 5 * GB1;
    sys.enter(
        &p,
        VirtAddr::new(va),
        old,
        Prot::WRITE,
        EnterFlags::MANAGED,
        0,
    )
    .map_err(e("enter"))?;
    sys.activate(&p).map_err(e("activate"))?;
    let r = readers_during(c, &p, va, pattern(old.as_u64()), || {
        if change {
            sys.enter(
                &p,
                VirtAddr::new(va),
                new,
                Prot::WRITE,
                EnterFlags::MANAGED,
                0,
            )
            .map_err(e("enter (replace)"))
        } else {
            sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + PAGE_SIZE))
                .map_err(e("remove"))
        }
    });
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + PAGE_SIZE))
        .map_err(e("remove"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(old, 0);
    c.free(new, 0);
    let (stale, reads) = r?;
    crate::println!(
        "  (readers made {reads} reads after the operation returned, {stale} saw the old frame)"
    );
    if stale > 0 {
        return Err(format!(
            "{stale} of {reads} reads after the operation returned saw the old frame"
        ));
    }
    Ok(())
}

/// Shootdowns per second under TCG: a page of a pmap active on every CPU is replaced again and
/// again (each replacement invalidates it on the other CPUs with an IPI and waits for them).
fn shootdown_timing(c: &Ctx) -> R {
    let sys = c.sys;
    let p = sys.create().map_err(e("create"))?;
    let a = c.frames(0)?;
    let b = c.frames(0)?;
    let va = UVA + 6 * GB1;
    sys.activate(&p).map_err(e("activate"))?;
    let before = sys.stats().shootdowns;
    let mut cycles = 0;
    const N: u64 = 50;
    let r = readers_during(c, &p, va, u64::MAX, || {
        let t = crate::cpu::rdtsc();
        for i in 0..N {
            let pa = if i % 2 == 0 { a } else { b };
            sys.enter(
                &p,
                VirtAddr::new(va),
                pa,
                Prot::WRITE,
                EnterFlags::MANAGED,
                0,
            )
            .map_err(e("enter"))?;
        }
        cycles = crate::cpu::rdtsc() - t;
        Ok(())
    });
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + PAGE_SIZE))
        .map_err(e("remove"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(a, 0);
    c.free(b, 0);
    r?;
    let shots = sys.stats().shootdowns - before;
    let ns = crate::tsc_ns(cycles);
    crate::println!(
        "TIMING shootdown to {} CPUs reading the page: {N} replacements, {shots} shootdowns, {} ns per replacement ({} cycles)",
        sys.platform().cpu_count() - 1,
        ns / N,
        cycles / N
    );
    if shots < N - 1 {
        return Err(format!("only {shots} shootdowns for {N} replacements"));
    }
    Ok(())
}

struct RealMmu;

impl crate::ad::Mmu for RealMmu {
    fn read(&self, va: u64) -> bool {
        read64(va).is_ok()
    }
    fn write(&self, va: u64) -> bool {
        touch_write(va).is_ok()
    }
}

/// The A/D sequence shared with the host test (`crates/vmsys-qemu/src/ad.rs`), printed as
/// `AD <i> <seen>` lines that the host compares with the simulator's.
fn accessed_dirty_sequence(c: &Ctx) -> R {
    let sys = c.sys;
    let p = sys.create().map_err(e("create"))?;
    sys.activate(&p).map_err(e("activate"))?;
    let pa = c.frames(0)?;
    let mut i = 0;
    let r = crate::ad::run(sys, &p, UVA + 7 * GB1, pa, &RealMmu, &mut |s| {
        crate::println!("AD {i} {s}");
        i += 1;
    })
    .map_err(e("sequence"));
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.remove(
        &p,
        VirtAddr::new(UVA + 7 * GB1),
        VirtAddr::new(UVA + 7 * GB1 + PAGE_SIZE),
    )
    .map_err(e("remove"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(pa, 0);
    r
}

/// The same replacements with the other CPUs idle (halted) with the pmap loaded: the IPI
/// round trip of a kernel whose other CPUs are not busy.
fn shootdown_timing_idle_targets(c: &Ctx) -> R {
    let sys = c.sys;
    let n = sys.platform().cpu_count();
    let p = sys.create().map_err(e("create"))?;
    let a = c.frames(0)?;
    let b = c.frames(0)?;
    let va = UVA + 8 * GB1;
    sys.activate(&p).map_err(e("activate"))?;
    for cpu in 1..n {
        let (s, q) = (sys.clone(), p.clone());
        crate::smp::wait(crate::smp::spawn(cpu, move || {
            s.activate(&q).expect("activate")
        }));
    }
    let before = sys.stats().shootdowns;
    const N: u64 = 1000;
    let t = crate::cpu::rdtsc();
    let mut r = Ok(());
    for i in 0..N {
        let pa = if i % 2 == 0 { a } else { b };
        if let Err(err) = sys.enter(
            &p,
            VirtAddr::new(va),
            pa,
            Prot::WRITE,
            EnterFlags::MANAGED,
            0,
        ) {
            r = Err(format!("enter: {err}"));
            break;
        }
    }
    let cycles = crate::cpu::rdtsc() - t;
    let shots = sys.stats().shootdowns - before;
    for cpu in 1..n {
        let s = sys.clone();
        crate::smp::wait(crate::smp::spawn(cpu, move || {
            s.activate(s.kernel_pmap()).expect("activate")
        }));
    }
    sys.activate(sys.kernel_pmap()).map_err(e("activate"))?;
    sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + PAGE_SIZE))
        .map_err(e("remove"))?;
    sys.destroy(p).map_err(e("destroy"))?;
    c.free(a, 0);
    c.free(b, 0);
    r?;
    crate::println!(
        "TIMING shootdown to {} idle CPUs: {N} replacements, {shots} shootdowns, {} ns per replacement ({} cycles)",
        n - 1,
        crate::tsc_ns(cycles) / N,
        cycles / N
    );
    if shots < N - 1 {
        return Err(format!("only {shots} shootdowns for {N} replacements"));
    }
    Ok(())
}

pub fn run(sys: &Arc<Sys>, buddy: &Arc<BuddyAllocator>, cmdline: &str) -> u32 {
    let omit = cmdline.split_whitespace().any(|w| w == "omit-shootdown");
    if omit {
        crate::println!("vmsys-qemu: planted bug: the pmap's shootdown IPIs are dropped; only the cross-CPU tests run");
        sys.platform()
            .plant_omitted_ipis(sys.config().shootdown_vector);
    }
    let mut c = Ctx {
        sys,
        buddy,
        passed: 0,
        failed: 0,
        only_cross: omit,
    };
    c.test("boot_audit", |c| {
        c.sys.audit().map(|_| ()).map_err(|e| format!("{e:?}"))
    });
    c.test("enter_protect_remove_4k", |c| {
        page_size_cycle(c, 0, 0, None)
    });
    c.test("enter_protect_remove_2m", |c| {
        page_size_cycle(c, 1, 9, None)
    });
    if sys.platform().features.pdpe1gb {
        // No 1 GiB of free RAM to own: the first GiB of physical memory, unmanaged.
        c.test("enter_protect_remove_1g", |c| {
            page_size_cycle(c, 2, 18, Some(0))
        });
    }
    c.test("promotion_and_demotion_2m", promotion_and_demotion);
    c.test("range_map_unmap", range_map_unmap);
    c.test(
        "growkernel_seen_from_every_address_space",
        growkernel_everywhere,
    );
    c.test("qenter_qremove_and_quick_maps", qenter_and_quick_maps);
    c.test("copy_into_a_child", copy_to_child);
    c.test("accessed_dirty_sequence", accessed_dirty_sequence);
    c.test("cross_cpu_remove_seen_by_every_reader", |c| {
        cross_cpu(c, false)
    });
    c.test("cross_cpu_change_seen_by_every_reader", |c| {
        cross_cpu(c, true)
    });
    if !omit {
        c.test("shootdown_timing_busy_readers", shootdown_timing);
        c.test(
            "shootdown_timing_idle_targets",
            shootdown_timing_idle_targets,
        );
    }
    crate::println!("SUITE {} passed {} failed", c.passed, c.failed);
    c.failed
}
