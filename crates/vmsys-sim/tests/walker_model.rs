//! Property test: random mappings (4 KiB pages and superpages, mixed rights) built through
//! `vmsys-arch`'s encoders agree, access by access, with a simple reference model (a map from
//! page to frame and rights) when translated by the independent walker through a CPU's TLB.
//! Proptest prints the failing case (and persists its seed) on failure.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use vmsys::arch::{FormatId, Prot};
use vmsys::platform::{AccessKind, FaultReason};
use vmsys_sim::testkit::Kit;

/// One slot of the window (one superpage's worth of VA): a superpage, or some 4 KiB pages.
#[derive(Clone, Debug)]
enum Slot {
    Empty,
    Large { frame: u64, write: bool, user: bool },
    Small(Vec<(u64, u64, bool, bool)>), // (page index in slot, frame, write, user)
}

fn slot_strategy() -> impl Strategy<Value = Slot> {
    prop_oneof![
        1 => Just(Slot::Empty),
        2 => (0..4u64, any::<bool>(), any::<bool>()).prop_map(|(frame, write, user)| Slot::Large { frame, write, user }),
        3 => proptest::collection::vec((0..1024u64, 0..4096u64, any::<bool>(), any::<bool>()), 1..24).prop_map(Slot::Small),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Model {
    pa: u64,
    write: bool,
    user: bool,
}

fn check(f: FormatId, slots: &[Slot], probes: &[(usize, u64)]) -> Result<(), TestCaseError> {
    let m = machine(f, 1);
    let mut kit = Kit::new(&m, POOL.0, POOL.1);
    let roots = Roots::new(&mut kit);
    let large = kit.fmt.leaf_sizes().nth(1).unwrap();
    let pages_per_large = large / 4096;
    let base = uva(&kit, large, 0);
    let mut model: BTreeMap<u64, Model> = BTreeMap::new(); // 4 KiB page VA -> frame
    for (i, s) in slots.iter().enumerate() {
        let sva = base + i as u64 * large;
        match s {
            Slot::Empty => {}
            Slot::Large {
                frame: fr,
                write,
                user,
            } => {
                let pa = frame(large, *fr);
                let prot = prot_of(*write, *user);
                kit.map(roots.user, sva, pa, large, prot, af()).unwrap();
                for p in 0..pages_per_large {
                    model.insert(
                        sva + p * 4096,
                        Model {
                            pa: pa + p * 4096,
                            write: *write,
                            user: *user,
                        },
                    );
                }
            }
            Slot::Small(pages) => {
                // One entry per page: rewriting a valid entry in place would itself be a
                // break-before-make violation on arm64.
                let unique: BTreeMap<u64, (u64, bool, bool)> = pages
                    .iter()
                    .map(|&(idx, fr, w, u)| (idx % pages_per_large, (fr, w, u)))
                    .collect();
                for (idx, (fr, write, user)) in unique {
                    let va = sva + idx * 4096;
                    let pa = frame(4096, fr);
                    kit.map(roots.user, va, pa, 4096, prot_of(write, user), af())
                        .unwrap();
                    model.insert(va, Model { pa, write, user });
                }
            }
        }
    }
    m.run_on(0, |c| -> Result<(), TestCaseError> {
        activate(&m, roots, 0);
        // Every mapped page, then random probes (mapped or not), each twice (miss, then hit).
        let mut vas: Vec<u64> = model.keys().copied().collect();
        vas.extend(probes.iter().map(|&(s, off)| base + (s % slots.len()) as u64 * large + ((off % large) & !7)));
        for round in 0..2 {
            for &va in &vas {
                let page = va & !0xfff;
                let want = model.get(&page).copied();
                for user in [false, true] {
                    c.set_user(user);
                    for kind in [AccessKind::Read, AccessKind::Write] {
                        let got = c.translate(va, kind);
                        match want {
                            None => prop_assert!(
                                matches!(got, Err(ref e) if matches!(e.reason, FaultReason::NotPresent { .. })),
                                "{f} round {round}: unmapped {va:#x} gave {got:?}"
                            ),
                            Some(w) => {
                                let allowed = (!user || w.user) && (kind == AccessKind::Read || w.write);
                                if allowed {
                                    prop_assert_eq!(got.ok(), Some(w.pa | (va & 0xfff)), "{} {:#x} {:?} user={}", f, va, kind, user);
                                } else {
                                    prop_assert!(
                                        matches!(got, Err(ref e) if matches!(e.reason, FaultReason::Protection { .. })),
                                        "{f}: {va:#x} {kind:?} user={user} should fault, gave {got:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        c.set_user(false);
        Ok(())
    })?;
    prop_assert_eq!(m.detector().violation_count(), 0);
    prop_assert!(m.audit().is_empty());
    Ok(())
}

fn prot_of(write: bool, user: bool) -> Prot {
    let mut p = Prot::empty();
    if write {
        p |= Prot::WRITE;
    }
    if user {
        p |= Prot::USER;
    }
    p
}

macro_rules! model_tests {
    ($($name:ident => $f:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(
                    slots in proptest::collection::vec(slot_strategy(), 1..6),
                    probes in proptest::collection::vec((0..8usize, any::<u64>()), 0..32),
                ) {
                    check($f, &slots, &probes)?;
                }
            )*
        }
    };
}

model_tests! {
    amd64_matches_model => FormatId::Amd64;
    amd64_la57_matches_model => FormatId::Amd64La57;
    arm64_matches_model => FormatId::Arm64;
    i386_matches_model => FormatId::I386;
    i386_pae_matches_model => FormatId::I386Pae;
}
