//! The kinds of operation the run's workload performs, and their counters.
//!
//! Adding a kind is adding a variant here (with its name, weight and group) and an arm in
//! `workload::CpuRun::perform`. The kernel-memory layer's kinds (kmem alloc/free, transient I/O
//! maps with and without `can_fault`, bounce copies) are meant to be added this way.

use serde::Serialize;

macro_rules! op_kinds {
    ($($kind:ident => $name:literal, $weight:literal, $group:ident, $doc:literal;)*) => {
        /// One kind of operation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        pub enum OpKind {
            $(#[doc = $doc] $kind,)*
        }

        impl OpKind {
            pub const ALL: &'static [OpKind] = &[$(OpKind::$kind,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// The name in reports and JSON.
            pub const fn name(self) -> &'static str {
                match self { $(OpKind::$kind => $name,)* }
            }

            /// The relative frequency with which the workload picks this kind.
            pub const fn weight(self) -> u32 {
                match self { $(OpKind::$kind => $weight,)* }
            }

            /// The group the report lists it under.
            pub const fn group(self) -> Group {
                match self { $(OpKind::$kind => Group::$group,)* }
            }

            /// What it does, for `--help`-like listings and the report.
            pub const fn doc(self) -> &'static str {
                match self { $(OpKind::$kind => $doc,)* }
            }
        }
    };
}

/// Groups of kinds in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Group {
    Space,
    Access,
    User,
    Kernel,
    Kmem,
}

op_kinds! {
    CreateSpace => "create", 8, Space, "create a user address space (pmap create)";
    DestroySpace => "destroy", 6, Space, "empty and destroy an address space once no CPU visits it";
    Switch => "activate", 30, Space, "activate another of this CPU's address spaces";
    Visit => "visit", 60, Space, "activate another CPU's address space and check reads of it";
    Fork => "fork", 6, Space, "write-protect an address space and copy it into a new one (pmap copy)";
    Read => "read", 250, Access, "load through the MMU, checked against the expected value or fault";
    Write => "write", 150, Access, "store through the MMU (or expect a fault)";
    Enter => "enter", 120, User, "enter a 4 KiB page (new frame, or new rights), wired or not, managed";
    EnterSuper => "enter-super", 15, User, "enter a superpage (psind 1) into an empty region";
    EnterRange => "enter-range", 40, User, "enter_range of contiguous frames into unmapped pages";
    Fill => "fill", 8, User, "fill a region page by page with aligned contiguous frames (promotes)";
    Protect => "protect", 50, User, "write-protect part of a region";
    Remove => "remove", 60, User, "remove part of a region";
    Demote => "demote", 15, User, "remove or protect one page of a superpage region (demotes)";
    RemoveAll => "remove-all", 20, User, "remove every mapping of one frame (pmap remove_all)";
    Unwire => "unwire", 25, User, "unwire a range (expects NotWired if a mapping in it is unwired)";
    GrowKernel => "kva-alloc", 3, Kernel, "kva_alloc a kernel window (kernel_arena grows the kernel's page tables as it imports)";
    Kenter => "kenter", 20, Kernel, "kenter a page in this CPU's kernel window";
    Kremove => "kremove", 12, Kernel, "kremove a page of this CPU's kernel window";
    Qenter => "qenter", 12, Kernel, "qenter a run of pages in this CPU's kernel window";
    Qremove => "qremove", 10, Kernel, "qremove a run of pages of this CPU's kernel window";
    QuickMap => "quick-map", 30, Kernel, "quick_enter_page / quick_remove_page of a frame";
    KmemAlloc => "kmem-alloc", 20, Kmem, "kmem_malloc of 1 to 64 pages or of a superpage (which promotes), tagged through its kernel VA";
    KmemFree => "kmem-free", 16, Kmem, "check a kmem allocation's tags and kmem_free it";
    IoMap => "io-map", 14, Kmem, "map_io_transient of an owned frame, pinned (local invalidation only), read its tag, unmap";
    IoMapFault => "io-map-fault", 8, Kmem, "map_io_transient with can_fault (qenter; its unmap is shot down everywhere)";
    Bounce => "bounce", 14, Kmem, "bounce-buffer copy of an owned frame's tag through a quick mapping";
}

/// A count per kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpCounts(pub [u64; OpKind::COUNT]);

impl Default for OpCounts {
    fn default() -> Self {
        OpCounts([0; OpKind::COUNT])
    }
}

impl OpCounts {
    pub fn add(&mut self, k: OpKind) {
        self.0[k as usize] += 1;
    }
    pub fn get(&self, k: OpKind) -> u64 {
        self.0[k as usize]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    pub fn merge(&mut self, o: &OpCounts) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
    /// (name, count) for every kind, in declaration order.
    pub fn by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OpKind::ALL.iter().map(|&k| (k.name(), self.get(k)))
    }
}

/// Picks kinds at random by weight. (Kernel-mapping kinds are rarer than user ones: each
/// change of a global kernel mapping interrupts every CPU, which on an oversubscribed host
/// costs a scheduling round trip per shootdown.)
pub struct Picker {
    cumulative: Vec<(u32, OpKind)>,
    total: u32,
}

impl Default for Picker {
    fn default() -> Self {
        let mut total = 0;
        let cumulative = OpKind::ALL
            .iter()
            .map(|&k| {
                total += k.weight();
                (total, k)
            })
            .collect();
        Picker { cumulative, total }
    }
}

impl Picker {
    pub fn pick(&self, rng: &mut impl rand::Rng) -> OpKind {
        let x = rng.gen_range(0..self.total);
        let i = self.cumulative.partition_point(|&(c, _)| c <= x);
        self.cumulative[i].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn names_are_unique_and_every_kind_is_picked() {
        let mut names: Vec<_> = OpKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OpKind::COUNT);
        let p = Picker::default();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut c = OpCounts::default();
        for _ in 0..100_000 {
            c.add(p.pick(&mut rng));
        }
        for &k in OpKind::ALL {
            assert!(c.get(k) > 0, "{k:?} never picked");
        }
        assert_eq!(c.total(), 100_000);
    }
}
