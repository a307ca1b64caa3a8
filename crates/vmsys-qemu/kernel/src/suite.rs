//! The conformance suite, run on the BSP with the APs as helpers.

use alloc::sync::Arc;
use vmsys::phys::BuddyAllocator;

use crate::Sys;

pub fn run(sys: &Arc<Sys>, _buddy: &Arc<BuddyAllocator>, _cmdline: &str) -> u32 {
    let mut failed = 0;
    let mut passed = 0;
    match sys.audit() {
        Ok(_) => {
            crate::println!("TEST boot_audit ... ok");
            passed += 1;
        }
        Err(e) => {
            crate::println!("TEST boot_audit ... FAIL: {:?}", e);
            failed += 1;
        }
    }
    crate::println!("SUITE {passed} passed {failed} failed");
    failed
}
