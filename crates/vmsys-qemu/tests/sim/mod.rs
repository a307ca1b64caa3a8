//! The simulated machine configured as the QEMU kernel runs the pmap (amd64, no PCIDs: QEMU's
//! TCG offers none), with the buddy allocator over its page array and the pmap's fault handler
//! installed; shared by the host test and the shootdown-timing example, so that the two compare
//! the same set-up with the kernel.

use std::sync::Arc;

use vmsys::arch::FormatId;
use vmsys::page::PageArray;
use vmsys::phys::BuddyAllocator;
use vmsys::platform::Platform;
use vmsys::{PmapConfig, PmapSystem};
use vmsys_sim::{Machine, MachineConfig};

/// A pmap on a simulated amd64 machine of `cpus` CPUs and `mem` bytes.
pub fn sim_pmap(
    cpus: u32,
    mem: u64,
) -> (Arc<Machine>, Arc<BuddyAllocator>, Arc<PmapSystem<Machine>>) {
    let m = Machine::new(MachineConfig::new(FormatId::Amd64).cpus(cpus).mem(mem)).expect("machine");
    let pages = Arc::new(PageArray::new(m.phys_segments()));
    let buddy = Arc::new(BuddyAllocator::new(pages.clone()));
    let cfg = PmapConfig {
        use_tags: false,
        ..PmapConfig::default()
    };
    let sys =
        PmapSystem::bootstrap_with_pages(m.clone(), buddy.clone(), pages, cfg).expect("bootstrap");
    sys.install_fault_handler();
    (m, buddy, sys)
}
