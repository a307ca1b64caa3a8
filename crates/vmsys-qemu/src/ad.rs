//! The accessed/dirty-bit sequence that runs in two places: in the bare-metal kernel on QEMU's
//! MMU, and in the host test on the simulator's walker. The same pmap operations and the same
//! accesses, and after each step the leaf's A and D bits as the pmap reads them; the two
//! records must agree. This file is `no_std` (the kernel includes it by path).

use core::fmt;

use vmsys::arch::Prot;
use vmsys::platform::Platform;
use vmsys::{EnterFlags, PhysAddr, Pmap, PmapError, PmapSystem, VirtAddr, PAGE_SIZE};

/// One step of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `enter` a clean, writable, managed 4 KiB mapping.
    Enter,
    /// A load through the MMU.
    Read,
    /// A store through the MMU.
    Write,
    /// `clear_modify` of the frame.
    ClearModify,
    /// `ts_referenced` of the frame.
    TsReferenced,
    /// `protect` to read-only.
    ProtectReadOnly,
    /// `remove`.
    Remove,
}

use Step::*;

/// The sequence: every transition of A and D that the pmap and the MMU share, including the
/// ones that need the pmap's invalidation (a write after `clear_modify` must set D again; a
/// read after `ts_referenced` must set A again, unless the TLB still holds the entry).
pub const SEQUENCE: &[Step] = &[
    Enter,
    Read,
    Write,
    Read,
    ClearModify,
    Read,
    Write,
    TsReferenced,
    Read,
    TsReferenced,
    Write,
    ClearModify,
    ProtectReadOnly,
    Read,
    Write,
    Remove,
    Read,
];

/// What was seen after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub step: Step,
    /// The leaf's (accessed, dirty), `None` when unmapped.
    pub ad: Option<(bool, bool)>,
    /// The step's access faulted (and the fault was delivered).
    pub faulted: bool,
}

impl fmt::Display for Seen {
    /// `<Step> a=<0|1|-> d=<0|1|-> fault=<0|1>`, the kernel's `AD` line after its index.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |v: Option<bool>| match v {
            Some(true) => "1",
            Some(false) => "0",
            None => "-",
        };
        write!(
            f,
            "{:?} a={} d={} fault={}",
            self.step,
            b(self.ad.map(|x| x.0)),
            b(self.ad.map(|x| x.1)),
            u8::from(self.faulted)
        )
    }
}

/// Loads and stores through an MMU; `false` when the access faulted.
pub trait Mmu {
    fn read(&self, va: u64) -> bool;
    fn write(&self, va: u64) -> bool;
}

/// Run [`SEQUENCE`] on `pmap` (loaded on the calling CPU) at `va` over frame `pa`.
pub fn run<P: Platform>(
    sys: &PmapSystem<P>,
    pmap: &Pmap,
    va: u64,
    pa: PhysAddr,
    mmu: &dyn Mmu,
    out: &mut dyn FnMut(Seen),
) -> Result<(), PmapError> {
    let v = VirtAddr::new(va);
    for &step in SEQUENCE {
        let mut faulted = false;
        match step {
            Enter => sys.enter(pmap, v, pa, Prot::WRITE, EnterFlags::MANAGED, 0)?,
            Read => faulted = !mmu.read(va),
            Write => faulted = !mmu.write(va),
            ClearModify => sys.clear_modify(pa),
            TsReferenced => {
                sys.ts_referenced(pa);
            }
            ProtectReadOnly => {
                sys.protect(pmap, v, VirtAddr::new(va + PAGE_SIZE), Prot::empty())?
            }
            Remove => sys.remove(pmap, v, VirtAddr::new(va + PAGE_SIZE))?,
        }
        let ad = sys.mapping(pmap, v).map(|m| (m.accessed, m.dirty));
        out(Seen { step, ad, faulted });
    }
    Ok(())
}
