//! The pmap's public API used as an outside caller would, with bad input (issue 10): a
//! destroyed or foreign pmap, addresses the MMU cannot translate, reversed and misaligned
//! ranges, the direct map's exact extent, kernel operations outside the kernel's dynamic range.
//! Each case must be a clear error (or `None` from a query) that touches no frame; after each
//! one the full audit (the pmap layer's invariants, every CPU's TLB and walk caches, the
//! detector on every access) shows that nothing was corrupted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use vmsys::arch::{FormatId, Prot};
use vmsys::platform::{AccessKind, Fault, FaultReason, FaultResolution};
use vmsys::{AddrError, EnterFlags, PhysAddr, Pmap, PmapConfig, PmapError, VirtAddr};

const PAGE: u64 = 4096;
const NONE: EnterFlags = EnterFlags::empty();

fn va(v: u64) -> VirtAddr {
    VirtAddr::new(v)
}
fn pa(p: u64) -> PhysAddr {
    PhysAddr::new(p)
}

/// The superpage size used for promotion (2 MiB, or 4 MiB on i386).
fn sp(e: &Env) -> u64 {
    e.sys.page_sizes().nth(1).unwrap()
}

/// Every operation on `p` that takes a pmap, each expected to fail with `want` (queries: no
/// answer), with `other` a live user pmap for `copy`.
fn refused_everywhere(e: &Env, p: &Arc<Pmap>, other: &Arc<Pmap>, v: u64, want: PmapError) {
    let s = &e.sys;
    let fr = frame(PAGE, 40);
    let spf = frame(sp(e), 2);
    assert_eq!(
        s.enter(p, va(v), pa(fr), RW, EnterFlags::MANAGED, 0),
        Err(want)
    );
    assert_eq!(
        s.enter(p, va(v.next_multiple_of(sp(e))), pa(spf), RW, NONE, 1),
        Err(want)
    );
    assert_eq!(
        s.enter_quick(p, va(v), pa(fr), Prot::empty(), true),
        Err(want)
    );
    assert_eq!(
        s.enter_range(p, va(v), pa(fr), 4 * PAGE, RW, NONE),
        Err(want)
    );
    assert_eq!(s.remove(p, va(v), va(v + PAGE)), Err(want));
    assert_eq!(s.protect(p, va(v), va(v + PAGE), Prot::empty()), Err(want));
    assert_eq!(s.unwire(p, va(v), va(v + PAGE)), Err(want));
    assert_eq!(s.copy(other, p, va(v), PAGE), Err(want));
    assert_eq!(s.copy(p, other, va(v), PAGE), Err(want));
    assert_eq!(s.activate(p), Err(want));
    assert_eq!(s.destroy(p.clone()), Err(want));
    assert_eq!(s.extract(p, va(v)), None);
    assert_eq!(s.mapping(p, va(v)), None);
}

/// Issue 10 item 1: a destroyed pmap stayed a working handle. Every operation through a stale
/// handle is `Destroyed`, allocates and frees nothing, and leaves the pmap that reused its root
/// frame intact; a second destroy does not free that pmap's root.
fn destroyed_pmap_refuses_every_operation_and_touches_no_frame(f: FormatId) {
    let e = env(f, 2);
    let s = &e.sys;
    let v = e.uva(sp(&e), 3);
    let fr = frame(PAGE, 7);
    let baseline = e.frames_in_use();
    e.m.run_on(0, |cpu| {
        let p = s.create().unwrap();
        let stale = p.clone();
        s.enter(&p, va(v), pa(fr), RW, EnterFlags::MANAGED, 0)
            .unwrap();
        s.remove(&p, va(v), va(v + PAGE)).unwrap();
        s.destroy(p).unwrap();
        assert!(stale.is_destroyed());
        assert_eq!(e.frames_in_use(), baseline, "destroy freed everything");
        e.audit();
        // A new pmap with a mapping: its root is the frame the stale handle names, if the
        // frame source hands the last freed frame out first.
        let q = s.create().unwrap();
        s.enter(&q, va(v), pa(fr + PAGE), RW, EnterFlags::MANAGED, 0)
            .unwrap();
        let held = e.frames_in_use();
        refused_everywhere(&e, &stale, &q, v, PmapError::Destroyed);
        assert!(
            !s.page_exists_quick(&stale, pa(fr + PAGE)),
            "a destroyed pmap maps nothing, even if its id was reused"
        );
        assert_eq!(e.frames_in_use(), held, "nothing allocated or freed");
        assert_eq!(s.extract(&q, va(v)), Some(pa(fr + PAGE)));
        s.activate(&q).unwrap();
        cpu.set_user(true);
        cpu.write_u64(v + 8, 42).unwrap();
        assert_eq!(cpu.read_u64(v + 8), Ok(42));
        cpu.set_user(false);
        e.audit();
        s.remove(&q, va(v), va(v + PAGE)).unwrap();
        s.activate(s.kernel_pmap()).unwrap();
        s.destroy(q).unwrap();
    });
    e.audit();
    assert_eq!(e.frames_in_use(), baseline);
}

/// PT-7's rule for destroy: only a live user pmap with no mappings that no CPU has loaded; a
/// refused destroy changes nothing and the pmap stays usable. The kernel pmap is never
/// destroyable.
fn destroy_refuses_the_kernel_pmap_a_mapped_or_active_pmap_and_changes_nothing(f: FormatId) {
    let e = env(f, 2);
    let s = &e.sys;
    let v = e.uva(PAGE, 9);
    let fr = frame(PAGE, 3);
    let baseline = e.frames_in_use();
    let p = s.create().unwrap();
    e.m.run_on(0, |_| {
        assert_eq!(
            s.destroy(s.kernel_pmap().clone()),
            Err(PmapError::KernelPmap)
        );
        assert!(!s.kernel_pmap().is_destroyed());
        s.enter(&p, va(v), pa(fr), RW, EnterFlags::MANAGED, 0)
            .unwrap();
        assert_eq!(s.destroy(p.clone()), Err(PmapError::Busy));
        assert_eq!(s.extract(&p, va(v)), Some(pa(fr)));
        s.remove(&p, va(v), va(v + PAGE)).unwrap();
    });
    e.audit();
    // Loaded on CPU 1: refused, and CPU 1 keeps working in it.
    e.m.run_on(1, |_| s.activate(&p).unwrap());
    e.m.run_on(0, |_| {
        assert_eq!(s.destroy(p.clone()), Err(PmapError::Busy));
        assert!(!p.is_destroyed());
        s.enter(&p, va(v), pa(fr), RW, NONE, 0).unwrap();
    });
    e.m.run_on(1, |cpu| {
        cpu.set_user(true);
        cpu.write_u64(v, 7).unwrap();
        cpu.set_user(false);
    });
    e.audit();
    e.m.run_on(0, |_| s.remove(&p, va(v), va(v + PAGE)).unwrap());
    e.m.run_on(1, |_| s.activate(s.kernel_pmap()).unwrap());
    e.m.run_on(0, |_| s.destroy(p).unwrap());
    e.audit();
    assert_eq!(e.frames_in_use(), baseline);
}

/// Destroy racing with activations and operations on other CPUs through other handles: every
/// call either works on the live pmap or is refused, no CPU keeps a destroyed root loaded, and
/// nothing leaks (a destroy that wins frees exactly what the pmap had).
fn destroy_racing_activate_and_enter_never_uses_a_freed_root(f: FormatId) {
    let e = env(f, 3);
    let s = &e.sys;
    let v = e.uva(PAGE, 11);
    let fr = frame(PAGE, 5);
    let baseline = e.frames_in_use();
    let rounds: u64 = 60;
    let slot: Mutex<Option<Arc<Pmap>>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    let refused = AtomicU64::new(0);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            e.m.run_on(0, |c| {
                for _ in 0..rounds {
                    let p = s.create().unwrap();
                    *slot.lock().unwrap() = Some(p.clone());
                    // Destroy as soon as the others let it: they may map or load it meanwhile.
                    loop {
                        let _ = s.remove(&p, va(v), va(v + PAGE));
                        match s.destroy(p.clone()) {
                            Ok(()) => break,
                            Err(PmapError::Busy) => {
                                c.take_interrupts();
                                std::thread::yield_now();
                            }
                            Err(err) => panic!("destroy: {err}"),
                        }
                    }
                    assert!(p.is_destroyed());
                }
                done.store(true, Ordering::SeqCst);
            })
        });
        for cpu in 1..3u32 {
            let (slot, done, refused) = (&slot, &done, &refused);
            let e = &e;
            sc.spawn(move || {
                e.m.run_on(cpu, |c| {
                    while !done.load(Ordering::SeqCst) {
                        let Some(p) = slot.lock().unwrap().clone() else {
                            c.take_interrupts();
                            std::thread::yield_now();
                            continue;
                        };
                        if cpu == 1 {
                            match s.activate(&p) {
                                Ok(()) => {
                                    c.set_user(true);
                                    let _ = c.read_u64(v);
                                    c.set_user(false);
                                    s.activate(s.kernel_pmap()).unwrap();
                                }
                                Err(PmapError::Destroyed) => {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => panic!("activate: {err}"),
                            }
                        } else {
                            match s.enter(&p, va(v), pa(fr), RW, EnterFlags::MANAGED, 0) {
                                Ok(()) => {
                                    let _ = s.remove(&p, va(v), va(v + PAGE));
                                }
                                Err(PmapError::Destroyed) => {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => panic!("enter: {err}"),
                            }
                        }
                        c.take_interrupts();
                    }
                })
            });
        }
    });
    eprintln!(
        "{} calls refused on destroyed pmaps",
        refused.load(Ordering::Relaxed)
    );
    e.audit();
    assert_eq!(
        e.frames_in_use(),
        baseline,
        "every destroyed pmap's tables are freed and nothing else"
    );
}

/// Sibling of item 1: a pmap of another `PmapSystem` (another machine here) was walked as if
/// its root were a frame of this one. Every operation refuses it; both systems stay intact.
fn pmap_of_another_system_is_refused_everywhere(f: FormatId) {
    let e = env(f, 1);
    let other = env(f, 1);
    let foreign = other.sys.create().unwrap();
    let q = e.sys.create().unwrap();
    let v = e.uva(PAGE, 2);
    let held = e.frames_in_use();
    e.m.run_on(0, |_| {
        refused_everywhere(&e, &foreign, &q, v, PmapError::ForeignPmap);
        assert!(!e.sys.page_exists_quick(&foreign, pa(frame(PAGE, 1))));
        e.sys.destroy(q).unwrap();
    });
    assert!(e.frames_in_use() < held);
    e.audit();
    other.audit();
    other.m.run_on(0, |_| other.sys.destroy(foreign)).unwrap();
    other.audit();
}

/// Issue 10 item 9: the direct map was rounded up to 1 GiB leaves. It maps exactly the
/// page-aligned part of `[0, limit)` with the largest leaves that fit (1 GiB, 2 MiB, 4 KiB),
/// and nothing at or above the limit translates. Kernel-pmap operations on it (or on the
/// quick-map slots) are refused instead of demoting or removing its leaves.
fn direct_map_is_exactly_the_limit_and_nothing_above_translates(f: FormatId) {
    const G: u64 = 1 << 30;
    let limit = G + (6 << 20) + 3 * PAGE + 100;
    let size = G + (6 << 20) + 3 * PAGE;
    let e = env_on(
        machine_config(f, 1).mem(2 * G).direct_map_limit(limit),
        PmapConfig::default(),
    );
    let s = &e.sys;
    let k = s.kernel_pmap().clone();
    let (_, quick_base) = s.kva_range();
    e.m.run_on(0, |cpu| {
        // The quick-map slots belong to the pmap.
        assert_eq!(
            s.enter(&k, quick_base, pa(frame(PAGE, 1)), RW, NONE, 0),
            Err(PmapError::OutsideKva(quick_base))
        );
        let Some((base, got)) = s.direct_map() else {
            assert!(
                matches!(f, FormatId::I386 | FormatId::I386Pae),
                "{f}: the 64-bit formats have a direct map"
            );
            return;
        };
        let base = base.as_u64();
        assert_eq!(got, size, "the direct map covers the page-aligned limit");
        let m = |off: u64| {
            s.mapping(&k, va(base + off))
                .map(|m| (m.pa.as_u64(), m.size))
        };
        assert_eq!(m(8), Some((8, G)));
        assert_eq!(m(G + 8), Some((G + 8, 2 << 20)));
        assert_eq!(m(G + (5 << 20)), Some((G + (5 << 20), 2 << 20)));
        assert_eq!(m(G + (6 << 20)), Some((G + (6 << 20), PAGE)));
        assert_eq!(m(size - 8), Some((size - 8, PAGE)));
        for off in [size, size + PAGE, G + (8 << 20), 2 * G - 8] {
            assert_eq!(
                m(off),
                None,
                "{f}: direct map offset {off:#x} is above the limit"
            );
            assert_eq!(s.extract(&k, va(base + off)), None);
            assert!(
                cpu.read_u64(base + off).is_err(),
                "{f}: the MMU translates {off:#x} past the direct map"
            );
        }
        e.m.mem().store_u64(size - 8, 0x5151);
        assert_eq!(cpu.read_u64(base + size - 8), Ok(0x5151));
        // Kernel operations on the direct map would demote or remove its leaves.
        let d = va(base + 2 * PAGE);
        let want = Err(PmapError::OutsideKva(d));
        assert_eq!(s.enter(&k, d, pa(frame(PAGE, 1)), RW, NONE, 0), want);
        assert_eq!(
            s.enter_range(&k, d, pa(frame(PAGE, 1)), PAGE, RW, NONE),
            want
        );
        assert_eq!(s.remove(&k, d, va(d.as_u64() + PAGE)), want);
        assert_eq!(s.protect(&k, d, va(d.as_u64() + PAGE), Prot::empty()), want);
        assert_eq!(s.unwire(&k, d, va(d.as_u64() + PAGE)), want);
        assert_eq!(
            cpu.read_u64(base + 2 * PAGE + 8),
            Ok(0),
            "the direct map is intact"
        );
    });
    let rep = e.audit();
    assert!(rep.kernel_ptps > 0);
}

/// The number of address bits a format's root translates (48, 57, 32).
fn translated_bits(e: &Env) -> u32 {
    let l0 = &e.sys.geometry().levels[0];
    l0.shift + l0.entries.trailing_zeros()
}

/// Issue 10 item 10: `extract`/`mapping` masked each level's index, so an address the MMU
/// cannot translate (non-canonical; bits above 32 on i386/PAE; on arm64 the other half through
/// a pmap whose root serves only one half) answered with the translation of an alias. They
/// answer `None`, and every operation that takes an address refuses it.
fn untranslatable_addresses_extract_to_none_and_every_operation_refuses_them(f: FormatId) {
    let e = env(f, 1);
    let s = &e.sys;
    let k = s.kernel_pmap().clone();
    let p = s.create().unwrap();
    let q = s.create().unwrap();
    let v = e.uva(PAGE, 5);
    let fr = frame(PAGE, 9);
    let kv = e.grow(PAGE);
    let kfr = frame(PAGE, 10);
    let bits = translated_bits(&e);
    let separate = f.format().layout(Default::default()).separate_roots;
    let low = |a: u64| {
        if bits < 64 {
            a & ((1u64 << bits) - 1)
        } else {
            a
        }
    };
    e.m.run_on(0, |cpu| {
        s.enter(
            &p,
            va(v),
            pa(fr),
            RW,
            EnterFlags::MANAGED | EnterFlags::WIRED,
            0,
        )
        .unwrap();
        s.enter(&k, va(kv), pa(kfr), RW, NONE, 0).unwrap();
        let mut user_aliases = vec![v | (1u64 << bits)];
        let mut kernel_aliases = vec![kv ^ (1u64 << bits)];
        if separate {
            // arm64: the kernel half's copy of `v` through TTBR0's table, and the user half's
            // copy of `kv` through TTBR1's.
            user_aliases.push(v | (u64::MAX << bits));
            kernel_aliases.push(low(kv));
        }
        for &a in &user_aliases {
            assert_eq!(
                s.extract(&p, va(a)),
                None,
                "{f}: user alias {a:#x} of {v:#x}"
            );
            assert_eq!(s.mapping(&p, va(a)), None, "{f}: user alias {a:#x}");
        }
        for &a in &kernel_aliases {
            assert_eq!(
                s.extract(&k, va(a)),
                None,
                "{f}: kernel alias {a:#x} of {kv:#x}"
            );
            assert_eq!(s.mapping(&k, va(a)), None, "{f}: kernel alias {a:#x}");
        }
        // Where one root serves both halves a user pmap does translate the kernel half.
        let through_user = s.extract(&p, va(kv));
        if separate {
            assert_eq!(through_user, None);
        } else {
            assert_eq!(through_user, Some(pa(kfr)));
        }
        assert_eq!(s.extract(&p, va(v)), Some(pa(fr)));
        assert_eq!(s.extract(&k, va(kv)), Some(pa(kfr)));
        let refused = |r: Result<(), PmapError>, what: &str, a: u64| {
            assert!(
                matches!(
                    r,
                    Err(PmapError::Addr(AddrError::OutOfRange { .. })
                        | PmapError::WrongHalf(_)
                        | PmapError::Addr(AddrError::Overflow))
                ),
                "{f}: {what} at {a:#x}: {r:?}"
            )
        };
        for &a in &user_aliases {
            refused(s.enter(&p, va(a), pa(fr + PAGE), RW, NONE, 0), "enter", a);
            refused(
                s.enter_range(&p, va(a), pa(fr + PAGE), PAGE, RW, NONE),
                "enter_range",
                a,
            );
            refused(s.remove(&p, va(a), va(a + PAGE)), "remove", a);
            refused(
                s.protect(&p, va(a), va(a + PAGE), Prot::empty()),
                "protect",
                a,
            );
            refused(s.unwire(&p, va(a), va(a + PAGE)), "unwire", a);
            refused(s.copy(&q, &p, va(a), PAGE).map(|_| ()), "copy", a);
            let flt = Fault {
                cpu: 0,
                va: va(a),
                access: AccessKind::Read,
                user: true,
                reason: FaultReason::NonCanonical,
            };
            assert_eq!(
                s.fault(&flt),
                FaultResolution::Deliver,
                "{f}: fault at {a:#x}"
            );
        }
        for &a in &kernel_aliases {
            refused(
                s.enter(&k, va(a), pa(kfr + PAGE), RW, NONE, 0),
                "kernel enter",
                a,
            );
            refused(s.remove(&k, va(a), va(a + PAGE)), "kernel remove", a);
        }
        // Nothing changed: the real mappings are intact (and still wired) and nothing else is
        // mapped.
        let m = s.mapping(&p, va(v)).unwrap();
        assert!(m.wired && m.managed);
        assert_eq!(p.resident_count(), 1);
        assert_eq!(q.resident_count(), 0);
        s.activate(&p).unwrap();
        cpu.set_user(true);
        cpu.write_u64(v, 3).unwrap();
        cpu.set_user(false);
        e.audit();
        s.unwire(&p, va(v), va(v + PAGE)).unwrap();
        s.remove(&p, va(v), va(v + PAGE)).unwrap();
        s.remove(&k, va(kv), va(kv + PAGE)).unwrap();
        s.activate(&k).unwrap();
        s.destroy(p).unwrap();
        s.destroy(q).unwrap();
    });
    e.audit();
}

/// Issue 10 item 11: `remove`, `protect`, `unwire` took `eva < sva` (a wrapped `sva + len`) as
/// an empty range without checking anything. It is `AddrError::Overflow`; an empty range is a
/// no-op only once its start has passed the checks every range gets (alignment, half), for
/// every range-taking operation.
fn reversed_misaligned_and_empty_ranges_are_checked_consistently(f: FormatId) {
    let e = env(f, 1);
    let s = &e.sys;
    let p = s.create().unwrap();
    let q = s.create().unwrap();
    let v = e.uva(PAGE, 20);
    let fr = frame(PAGE, 11);
    let kva = s.kva_range().0;
    let overflow = Err(PmapError::Addr(AddrError::Overflow));
    e.m.run_on(0, |_| {
        s.enter(
            &p,
            va(v),
            pa(fr),
            RW,
            EnterFlags::MANAGED | EnterFlags::WIRED,
            0,
        )
        .unwrap();
        let (a, b) = (va(v + PAGE), va(v));
        assert_eq!(s.remove(&p, a, b), overflow);
        assert_eq!(s.protect(&p, a, b, Prot::empty()), overflow);
        assert_eq!(s.unwire(&p, a, b), overflow);
        // A wrapped end: `sva + len` past 2^64.
        let wrapped = va(v.wrapping_add(u64::MAX - PAGE + 1));
        assert_eq!(s.remove(&p, va(v), wrapped), overflow);
        // Misaligned ends.
        let mis = |r: Result<(), PmapError>| {
            assert!(
                matches!(r, Err(PmapError::Addr(AddrError::Misaligned { .. }))),
                "{r:?}"
            )
        };
        mis(s.remove(&p, va(v), va(v + 10)));
        mis(s.protect(&p, va(v + 8), va(v + PAGE), Prot::empty()));
        mis(s.unwire(&p, va(v), va(v + PAGE + 1)));
        mis(s.enter_range(&p, va(v + PAGE), pa(fr), PAGE + 8, RW, NONE));
        mis(s.copy(&q, &p, va(v), 100).map(|_| ()));
        // Empty ranges: checked, then nothing.
        for empty in [
            s.remove(&p, va(v + 1), va(v + 1)),
            s.protect(&p, va(v + 1), va(v + 1), Prot::empty()),
            s.unwire(&p, va(v + 1), va(v + 1)),
            s.enter_range(&p, va(v + 1), pa(fr), 0, RW, NONE),
            s.copy(&q, &p, va(v + 1), 0).map(|_| ()),
        ] {
            mis(empty);
        }
        for empty in [
            s.remove(&p, kva, kva),
            s.protect(&p, kva, kva, Prot::empty()),
            s.unwire(&p, kva, kva),
            s.enter_range(&p, kva, pa(fr), 0, RW, NONE),
            s.copy(&q, &p, kva, 0).map(|_| ()),
        ] {
            assert_eq!(empty, Err(PmapError::WrongHalf(kva)));
        }
        assert_eq!(s.remove(&p, va(v), va(v)), Ok(()));
        assert_eq!(s.protect(&p, va(v), va(v), Prot::empty()), Ok(()));
        assert_eq!(s.unwire(&p, va(v), va(v)), Ok(()));
        assert_eq!(s.enter_range(&p, va(v + PAGE), pa(fr), 0, RW, NONE), Ok(()));
        assert_eq!(s.copy(&q, &p, va(v), 0), Ok(0));
        // The one mapping is untouched: still writable and wired.
        let m = s.mapping(&p, va(v)).unwrap();
        assert!(m.wired && m.prot.contains(Prot::WRITE), "{m:?}");
        assert_eq!(s.mapping(&p, va(v + PAGE)), None);
        assert_eq!((p.resident_count(), p.wired_count()), (1, 1));
        assert_eq!(q.resident_count(), 0);
        e.audit();
        s.unwire(&p, va(v), va(v + PAGE)).unwrap();
        s.remove(&p, va(v), va(v + PAGE)).unwrap();
        s.destroy(p).unwrap();
        s.destroy(q).unwrap();
    });
    e.audit();
}

/// Siblings: `copy` of or into the kernel pmap, or of a pmap into itself, said `WrongHalf`;
/// pmap ids were never reused (the registry grew by one slot per `create`, forever).
fn copy_refuses_the_kernel_and_itself_and_destroyed_ids_are_reused(f: FormatId) {
    let e = env(f, 1);
    let s = &e.sys;
    let k = s.kernel_pmap().clone();
    let p = s.create().unwrap();
    let v = e.uva(PAGE, 1);
    e.m.run_on(0, |_| {
        assert_eq!(s.copy(&p, &k, va(v), PAGE), Err(PmapError::KernelPmap));
        assert_eq!(s.copy(&k, &p, va(v), PAGE), Err(PmapError::KernelPmap));
        assert_eq!(s.copy(&p, &p, va(v), PAGE), Err(PmapError::SamePmap));
        let mut ids = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let q = s.create().unwrap();
            ids.insert(q.id());
            s.destroy(q).unwrap();
        }
        assert_eq!(ids.len(), 1, "create reuses a destroyed pmap's id: {ids:?}");
        assert_ne!(ids.first(), Some(&p.id()));
        s.destroy(p).unwrap();
    });
    assert_eq!(e.sys.all_pmaps().len(), 1);
    e.audit();
}

/// Sibling: bootstrap accepted a kernel range over the direct map (kernel mappings would have
/// replaced direct-map leaves) and one too small for the quick-map slots (the slots' base fell
/// below the range: `kva_end - slots` unchecked).
fn bootstrap_refuses_overlapping_or_cramped_kernel_layouts(f: FormatId) {
    let e = env(f, 2);
    let try_boot = |kva: (u64, u64)| {
        let m = machine_with(machine_config(f, 2));
        let frames = Arc::new(vmsys::FrameList::new(
            PhysAddr::new(PT_POOL.0),
            PhysAddr::new(PT_POOL.1),
        ));
        let cfg = PmapConfig {
            kva: Some(kva),
            ..PmapConfig::default()
        };
        vmsys::PmapSystem::bootstrap(m, frames, cfg).map(|_| ())
    };
    let (start, _) = e.sys.kva_range();
    let start = start.as_u64();
    assert!(matches!(
        try_boot((start, start + PAGE)),
        Err(PmapError::BadConfig(_))
    ));
    assert!(matches!(
        try_boot((start, start + 3 * PAGE)),
        Err(PmapError::BadConfig(_))
    ));
    assert!(matches!(
        try_boot((start, start + (64 << 20) + 10)),
        Err(PmapError::BadConfig(_))
    ));
    if let Some((base, _)) = e.sys.direct_map() {
        let b = base.as_u64();
        assert!(matches!(
            try_boot((b + (64 << 20), b + (1 << 30))),
            Err(PmapError::BadConfig(_))
        ));
    }
    assert_eq!(try_boot((start, start + (64 << 20))), Ok(()));
    e.audit();
}

for_each_format! {
    destroyed_pmap_refuses_every_operation_and_touches_no_frame_ =>
        super::destroyed_pmap_refuses_every_operation_and_touches_no_frame;
    destroy_refuses_the_kernel_pmap_a_mapped_or_active_pmap_and_changes_nothing_ =>
        super::destroy_refuses_the_kernel_pmap_a_mapped_or_active_pmap_and_changes_nothing;
    destroy_racing_activate_and_enter_never_uses_a_freed_root_ =>
        super::destroy_racing_activate_and_enter_never_uses_a_freed_root;
    pmap_of_another_system_is_refused_everywhere_ =>
        super::pmap_of_another_system_is_refused_everywhere;
    direct_map_is_exactly_the_limit_and_nothing_above_translates_ =>
        super::direct_map_is_exactly_the_limit_and_nothing_above_translates;
    untranslatable_addresses_extract_to_none_and_every_operation_refuses_them_ =>
        super::untranslatable_addresses_extract_to_none_and_every_operation_refuses_them;
    reversed_misaligned_and_empty_ranges_are_checked_consistently_ =>
        super::reversed_misaligned_and_empty_ranges_are_checked_consistently;
    copy_refuses_the_kernel_and_itself_and_destroyed_ids_are_reused_ =>
        super::copy_refuses_the_kernel_and_itself_and_destroyed_ids_are_reused;
    bootstrap_refuses_overlapping_or_cramped_kernel_layouts_ =>
        super::bootstrap_refuses_overlapping_or_cramped_kernel_layouts;
}
