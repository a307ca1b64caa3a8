//! The full invariant audit (docs/INVARIANTS.md, PT-*, PV-*, KPT-*, SP-*; PT-9: the direct
//! map is exactly `[0, limit)`). Tests call it at
//! quiescent points; it takes every pmap's lock in turn.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::page::{page_flags, PvEntry};
use crate::platform::Platform;

use super::{table, KptSync, Pmap, PmapSystem};

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditError {
    /// The invariant's name in docs/INVARIANTS.md.
    pub invariant: &'static str,
    pub detail: String,
}

/// What the audit saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub pmaps: usize,
    pub user_ptps: u64,
    pub kernel_ptps: u64,
    pub saved_ptps: u64,
    pub leaves: u64,
    pub superpages: u64,
    pub pv_entries: u64,
    /// Frames the pmap layer holds from the frame source (tables, saved tables, PV chunks).
    pub frames_held: u64,
}

impl<P: Platform> PmapSystem<P> {
    /// Every live pmap, the kernel's first.
    pub fn all_pmaps(&self) -> Vec<Arc<Pmap>> {
        let mut v = alloc::vec![self.kernel.clone()];
        let reg = table::lock(&self.registry, &*self.plat);
        v.extend(reg.iter().flatten().filter_map(|w| w.upgrade()));
        v
    }

    /// Check every invariant of the layer.
    pub fn audit(&self) -> Result<AuditReport, Vec<AuditError>> {
        let g = &self.geom;
        let t = self.tables();
        let mut errs = Vec::new();
        let mut err = |inv: &'static str, detail: String| {
            errs.push(AuditError {
                invariant: inv,
                detail,
            })
        };
        let mut rep = AuditReport::default();
        // PV entries that the tables imply, to compare with the lists.
        let mut expect_pv: BTreeSet<(u64, PvEntry)> = BTreeSet::new();
        let mut held: BTreeSet<u64> = BTreeSet::new();
        let pmaps = self.all_pmaps();
        rep.pmaps = pmaps.len();
        let layout = g.fmt.layout(self.cfg.split);
        let mut dmap_bytes = 0u64;
        for pmap in &pmaps {
            let st = table::lock(&pmap.state, &*self.plat);
            held.insert(pmap.root.as_u64());
            for f in &st.fixed_tables {
                held.insert(f.as_u64());
            }
            let mut resident = 0u64;
            let mut wired = 0u64;
            // Depth-first walk over this pmap's own half.
            let mut stack: Vec<(u64, usize, u64)> = alloc::vec![(pmap.root.as_u64(), 0, 0)];
            let user_root_raw = !pmap.kernel && layout.separate_roots;
            while let Some((table, lvl, base)) = stack.pop() {
                let n = g.levels[lvl].entries;
                let mut valid = 0u32;
                for i in 0..n {
                    let raw = t.load(g.slot(table, i));
                    if raw == 0 {
                        continue;
                    }
                    let va = self.entry_va(base, lvl, i, user_root_raw);
                    let kernel_slot =
                        lvl == 0 && layout.kernel_top.contains(&i) && !layout.separate_roots;
                    if !pmap.kernel && kernel_slot {
                        // KPT-1: user copies of kernel root entries equal the kernel's.
                        // The MMU sets the accessed bit of upper-level entries it walks
                        // through (x86), independently in each copy.
                        let k = t.load(g.slot(self.kernel.root.as_u64(), i));
                        let a = g.accessed_mask();
                        if k & !a != raw & !a {
                            err(
                                "KPT-1",
                                format!(
                                    "pmap {} root entry {i} = {raw:#x}, kernel has {k:#x}",
                                    pmap.id
                                ),
                            );
                        }
                        continue;
                    }
                    valid += 1;
                    if g.is_table(raw, lvl) {
                        let child = g.table_pa(raw, lvl);
                        let fixed = st.fixed_tables.iter().any(|f| f.as_u64() == child);
                        if !fixed {
                            held.insert(child);
                        }
                        stack.push((child, lvl + 1, va));
                        let meta = self.pages.meta(PhysAddr::new(child));
                        let fl = meta.flags();
                        if pmap.kernel && fl & page_flags::KERNEL_PTP == 0 {
                            err("PT-3", format!("kernel table {child:#x} not marked as a kernel page-table page"));
                        }
                        if !pmap.kernel && !fixed && fl & page_flags::PTP == 0 {
                            err(
                                "PT-2",
                                format!(
                                    "pmap {} table {child:#x} not marked as a page-table page",
                                    pmap.id
                                ),
                            );
                        }
                    } else if g.is_leaf(raw, lvl) {
                        let span = g.levels[lvl].span;
                        let pa = g.leaf_pa(raw, lvl);
                        let is_dmap = self
                            .kern
                            .dmap
                            .is_some_and(|(b, s)| va >= b && va < b + s.max(1));
                        if is_dmap {
                            // The direct map is not counted as mappings. PT-9: it maps
                            // `va - base` and lies wholly below its limit.
                            let (b, s) = self.kern.dmap.unwrap_or_default();
                            if !pmap.kernel {
                                continue;
                            }
                            dmap_bytes += span;
                            if pa != va - b || va - b + span > s {
                                err(
                                    "PT-9",
                                    format!(
                                        "direct-map leaf at {va:#x} (size {span:#x}) maps {pa:#x}: not inside [0, {s:#x}) at its offset"
                                    ),
                                );
                            }
                            continue;
                        }
                        rep.leaves += 1;
                        resident += span / PAGE_SIZE;
                        if g.wired(raw) {
                            wired += span / PAGE_SIZE;
                        }
                        if lvl != g.last() {
                            rep.superpages += 1;
                            if pmap.kernel && !st.saved.contains_key(&(lvl as u8, va)) {
                                err(
                                    "SP-2",
                                    format!(
                                        "kernel superpage at {va:#x} has no saved page-table page"
                                    ),
                                );
                            }
                        }
                        if g.managed(raw) {
                            expect_pv.insert((
                                pa,
                                PvEntry {
                                    pmap: pmap.id,
                                    va,
                                    level: lvl as u8,
                                },
                            ));
                        }
                    } else {
                        err("PT-1", format!("pmap {} entry {raw:#x} at level {lvl} index {i} is neither table nor leaf", pmap.id));
                    }
                }
                if lvl > 0 {
                    let meta = self.pages.meta(PhysAddr::new(table));
                    let rc = meta.ref_count.load(Ordering::Relaxed);
                    let fixed = st.fixed_tables.iter().any(|f| f.as_u64() == table);
                    if pmap.kernel {
                        rep.kernel_ptps += 1;
                        if rc != 0 {
                            err(
                                "PT-3",
                                format!("kernel table {table:#x} count changed to {rc}"),
                            );
                        }
                    } else if !fixed {
                        rep.user_ptps += 1;
                        if rc != valid {
                            err("PT-2", format!("pmap {} table {table:#x} (level {lvl}) counts {rc}, has {valid} valid entries", pmap.id));
                        }
                        if valid == 0 {
                            err(
                                "PT-2",
                                format!("pmap {} empty table {table:#x} still linked", pmap.id),
                            );
                        }
                    }
                }
            }
            for (&(lvl, va), &pt) in st.saved.iter() {
                rep.saved_ptps += 1;
                held.insert(pt.as_u64());
                if self.pages.meta(pt).flags() & page_flags::SAVED_PTP == 0 {
                    err(
                        "SP-1",
                        format!("saved table {pt} for {va:#x} not marked saved"),
                    );
                }
                match self.cursor_at(pmap, va) {
                    super::remove::Found::Super { level, .. } if level == lvl as usize => {}
                    _ => err(
                        "SP-1",
                        format!(
                            "pmap {} saved table {pt} for {va:#x} but no superpage there",
                            pmap.id
                        ),
                    ),
                }
            }
            if st.resident != resident {
                err(
                    "PT-4",
                    format!(
                        "pmap {} resident {} but tables map {resident} pages",
                        pmap.id, st.resident
                    ),
                );
            }
            if st.wired != wired {
                err(
                    "PT-4",
                    format!(
                        "pmap {} wired {} but tables have {wired} wired pages",
                        pmap.id, st.wired
                    ),
                );
            }
        }
        if let Some(r) = self.empty_user_root {
            held.insert(r.as_u64());
        }
        if let Some((b, s)) = self.kern.dmap {
            if dmap_bytes != s {
                err(
                    "PT-9",
                    format!("the direct map at {b:#x} maps {dmap_bytes:#x} bytes, not {s:#x}"),
                );
            }
        }
        // PV-1: the lists equal what the tables imply.
        let mut actual: BTreeMap<(u64, PvEntry), u32> = BTreeMap::new();
        let mut chunks = 0u64;
        let mut chunk_slots_used = 0u64;
        for (pa, meta) in self.pages.iter() {
            if meta.flags() & page_flags::PV_CHUNK != 0 {
                chunks += 1;
                match self.pv_chunk_used(pa.as_u64()) {
                    Ok(n) => chunk_slots_used += n,
                    Err(why) => err("PV-2", format!("PV chunk {pa}: {why}")),
                }
            }
            for e in self.pv_collect(pa.as_u64()) {
                *actual.entry((pa.as_u64(), e)).or_default() += 1;
            }
        }
        rep.pv_entries = actual.values().map(|&c| c as u64).sum();
        for (k, c) in &actual {
            if *c > 1 {
                err(
                    "PV-1",
                    format!("PV entry {:?} on frame {:#x} {c} times", k.1, k.0),
                );
            }
            if !expect_pv.contains(k) {
                err(
                    "PV-1",
                    format!(
                        "PV entry {:?} on frame {:#x} without a managed mapping",
                        k.1, k.0
                    ),
                );
            }
        }
        for k in &expect_pv {
            if !actual.contains_key(k) {
                err(
                    "PV-1",
                    format!(
                        "managed mapping {:?} of frame {:#x} without a PV entry",
                        k.1, k.0
                    ),
                );
            }
        }
        if rep.pv_entries != self.pv.in_use() {
            err(
                "PV-2",
                format!(
                    "{} PV entries listed, pool counts {}",
                    rep.pv_entries,
                    self.pv.in_use()
                ),
            );
        }
        if self.pv.damaged() != 0 {
            err(
                "PV-1",
                format!(
                    "{} PV removals found no entry or list walks met a damaged link",
                    self.pv.damaged()
                ),
            );
        }
        if chunk_slots_used != rep.pv_entries {
            err(
                "PV-2",
                format!(
                    "{} PV entries listed, chunks have {chunk_slots_used} slots in use",
                    rep.pv_entries
                ),
            );
        }
        if chunks != self.pv.chunk_frames() as u64 {
            err(
                "PV-2",
                format!(
                    "{chunks} frames marked as PV chunks, pool holds {}",
                    self.pv.chunk_frames()
                ),
            );
        }
        rep.frames_held = held.len() as u64 + chunks;
        // KPT-2: under propagation every user root holds every kernel root entry (checked per
        // entry above); under preallocation the preallocated entries are all present.
        if self.kern.sync == KptSync::PreallocTop {
            for &i in &self.kern.prealloc {
                if !g.is_table(t.load(g.slot(self.kernel.root.as_u64(), i)), 0) {
                    err(
                        "KPT-2",
                        format!("preallocated kernel root entry {i} missing"),
                    );
                }
            }
        }
        if errs.is_empty() {
            Ok(rep)
        } else {
            Err(errs)
        }
    }

    /// The VA of entry `i` of a table at `lvl` whose first entry maps `base`.
    fn entry_va(&self, base: u64, lvl: usize, i: usize, user_root_raw: bool) -> u64 {
        let g = &self.geom;
        if lvl == 0 {
            if user_root_raw {
                return (i as u64) << g.levels[0].shift;
            }
            return self.index_va(i);
        }
        base + ((i as u64) << g.levels[lvl].shift)
    }
}
