//! Shared set-up for the machine tests: a machine, hand-built roots, and correct shootdowns.
#![allow(dead_code)]

use std::sync::Arc;

use vmsys::arch::{FormatId, Prot, PteFlags};
use vmsys::platform::{CpuSet, IpiMessage, Platform, RootLoad, TagSel, TlbInval};
use vmsys::{PhysAddr, VirtAddr};
use vmsys_sim::testkit::{install_shootdown_handler, Kit};
use vmsys_sim::{DetectorMode, Machine, MachineConfig};

/// Table pages come from here; data frames from `DATA` up.
pub const POOL: (u64, u64) = (16 << 20, 48 << 20);
pub const DATA: u64 = 64 << 20;
pub const SHOOTDOWN_VECTOR: u8 = 0xf0;

/// The seed for a randomized test: `VMSYS_SEED` if set, else `default`. Printed, so that a
/// failure can be reproduced.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("VMSYS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("seed = {s} (reproduce with VMSYS_SEED={s})");
    s
}

pub fn mem_for(f: FormatId) -> u64 {
    match f {
        FormatId::I386 | FormatId::I386Pae => 1 << 30,
        _ => 4 << 30,
    }
}

pub fn machine(f: FormatId, cpus: u32) -> Arc<Machine> {
    machine_with(
        MachineConfig::new(f)
            .cpus(cpus)
            .mem(mem_for(f))
            .detector(DetectorMode::Every),
    )
}

pub fn machine_with(cfg: MachineConfig) -> Arc<Machine> {
    let m = Machine::new(cfg).expect("machine");
    install_shootdown_handler(&m, SHOOTDOWN_VECTOR);
    m
}

/// The roots of one address space: `user` translates the user half, `kernel` the kernel half
/// (the same table except on arm64, where TTBR0 and TTBR1 are separate).
#[derive(Clone, Copy, Debug)]
pub struct Roots {
    pub user: u64,
    pub kernel: u64,
}

impl Roots {
    pub fn new(kit: &mut Kit<'_>) -> Self {
        let user = kit.new_root().unwrap();
        let kernel = if kit.format_id() == FormatId::Arm64 {
            kit.new_root().unwrap()
        } else {
            user
        };
        Roots { user, kernel }
    }
    pub fn for_va(&self, kit: &Kit<'_>, va: u64) -> u64 {
        if kit.fmt.is_kernel_va(va, Default::default()) {
            self.kernel
        } else {
            self.user
        }
    }
}

/// Load `roots` on the current CPU.
pub fn activate(m: &Machine, roots: Roots, tag: u16) {
    m.load_root(RootLoad {
        root: PhysAddr::new(roots.user),
        tag,
        flush: true,
    });
    if m.format() == FormatId::Arm64 {
        m.load_kernel_root(PhysAddr::new(roots.kernel)).unwrap();
    }
}

/// Load `roots` on every CPU.
pub fn activate_all(m: &Machine, roots: Roots) {
    for c in 0..m.cpu_count() {
        m.run_on(c, |_| activate(m, roots, 0));
    }
}

/// The correct invalidation of `va` everywhere, from the current CPU: a local invalidation, then
/// a broadcast TLBI (arm64) or an IPI to every other CPU, waiting for them.
pub fn shootdown(m: &Machine, va: u64) {
    let inv = TlbInval::Page {
        va: VirtAddr::new(va),
        tag: TagSel::Current,
        leaf_only: false,
    };
    if m.format().format().tlb.broadcast_invalidate {
        m.tlb_invalidate_broadcast(inv).unwrap();
    } else {
        m.tlb_invalidate_local(inv);
        let mut others = CpuSet::first_n(m.cpu_count());
        others.remove(m.current_cpu());
        m.send_ipi(
            &others,
            IpiMessage {
                vector: SHOOTDOWN_VECTOR,
                args: [va, 0, 0, 0],
            },
            true,
        )
        .unwrap();
    }
}

/// Invalidate `va` on the current CPU only.
pub fn local_invalidate(m: &Machine, va: u64) {
    m.tlb_invalidate_local(TlbInval::Page {
        va: VirtAddr::new(va),
        tag: TagSel::Current,
        leaf_only: false,
    });
}

pub const RW: Prot = Prot::WRITE;
pub const URW: Prot = Prot::WRITE.union(Prot::USER);

pub fn af() -> PteFlags {
    PteFlags::ACCESSED
}

/// Kernel-half VA aligned to `align`, `n` blocks of `align` in.
pub fn kva(kit: &Kit<'_>, align: u64, n: u64) -> u64 {
    let base = kit.test_va(false, 0);
    base.next_multiple_of(align) + n * align
}

/// User-half VA aligned to `align`, `n` blocks of `align` in.
pub fn uva(kit: &Kit<'_>, align: u64, n: u64) -> u64 {
    let base = kit.test_va(true, 0);
    base.next_multiple_of(align) + n * align
}

/// A data frame aligned to `align`, `n` blocks of `align` above `DATA`.
pub fn frame(align: u64, n: u64) -> u64 {
    DATA.next_multiple_of(align) + n * align
}

/// Generate one `#[test]` per format that calls `$body(FormatId)`.
#[macro_export]
macro_rules! for_each_format {
    ($($name:ident => $body:path;)*) => {
        $(
            mod $name {
                use vmsys::arch::FormatId;
                #[test] fn amd64() { $body(FormatId::Amd64) }
                #[test] fn amd64_la57() { $body(FormatId::Amd64La57) }
                #[test] fn arm64() { $body(FormatId::Arm64) }
                #[test] fn i386() { $body(FormatId::I386) }
                #[test] fn i386_pae() { $body(FormatId::I386Pae) }
            }
        )*
    };
}

/// A machine with a bootstrapped pmap layer.
pub struct Env {
    pub m: Arc<Machine>,
    pub sys: Arc<vmsys::PmapSystem<Machine>>,
    pub frames: Arc<vmsys::FrameList>,
}

/// Page-table frames for the pmap come from here (data frames from `DATA` up).
pub const PT_POOL: (u64, u64) = (8 << 20, 56 << 20);

pub fn env(f: FormatId, cpus: u32) -> Env {
    env_with(f, cpus, vmsys::PmapConfig::default())
}

pub fn env_with(f: FormatId, cpus: u32, cfg: vmsys::PmapConfig) -> Env {
    env_on(machine_config(f, cpus), cfg)
}

/// The machine of `env`: 1 GiB, the direct map over the first 512 MiB (so that frames above
/// it take the quick-map slot), the detector on every access.
pub fn machine_config(f: FormatId, cpus: u32) -> MachineConfig {
    MachineConfig::new(f)
        .cpus(cpus)
        .mem(1 << 30)
        .direct_map_limit(512 << 20)
        .detector(DetectorMode::Every)
}

pub fn env_on(mcfg: MachineConfig, cfg: vmsys::PmapConfig) -> Env {
    let cpus = mcfg.cpus;
    let m = machine_with(mcfg);
    let frames = Arc::new(vmsys::FrameList::new(
        PhysAddr::new(PT_POOL.0),
        PhysAddr::new(PT_POOL.1),
    ));
    let sys = vmsys::PmapSystem::bootstrap(m.clone(), frames.clone(), cfg).expect("bootstrap");
    for c in 0..cpus {
        m.run_on(c, |_| sys.init_cpu());
    }
    Env { m, sys, frames }
}

impl Env {
    /// Audit the pmap layer and every CPU's TLB; panic with the findings.
    pub fn audit(&self) -> vmsys::pmap::AuditReport {
        let rep = match self.sys.audit() {
            Ok(r) => r,
            Err(errs) => panic!("pmap audit failed: {errs:#?}"),
        };
        let v = self.m.audit();
        assert!(v.is_empty(), "stale translations: {v:#?}");
        let live = self.m.detector().violations();
        assert!(live.is_empty(), "detector violations: {live:#?}");
        rep
    }

    /// A user-half VA `n` blocks of `align` into the user half (above 4 GiB where possible).
    pub fn uva(&self, align: u64, n: u64) -> u64 {
        let base: u64 = match self.m.format() {
            FormatId::I386 | FormatId::I386Pae => 0x1000_0000,
            _ => 0x10_0000_0000,
        };
        base.next_multiple_of(align) + n * align
    }

    /// Grow the kernel by `len` and return the start of the new range.
    pub fn grow(&self, len: u64) -> u64 {
        let start = self.sys.kernel_end().as_u64();
        self.sys
            .growkernel(VirtAddr::new(start + len))
            .expect("growkernel");
        start
    }

    /// Frames the pmap holds from its frame source.
    pub fn frames_in_use(&self) -> u64 {
        use vmsys::FrameSource;
        self.frames.in_use()
    }
}
