//! The simulator's side of the kernel's `shootdown_timing_idle_targets`: the same replacement
//! of one page of a pmap loaded on 4 CPUs (amd64, no PCIDs), each one a shootdown IPI to the 3
//! others, timed on the simulated machine. Prints ns per replacement.
//!
//! `cargo run --release -p vmsys-qemu --example sim_shootdown`

use std::time::Instant;

use vmsys::arch::Prot;
use vmsys::{EnterFlags, VirtAddr};

#[path = "../tests/sim/mod.rs"]
mod sim;

fn main() {
    let (m, buddy, sys) = sim::sim_pmap(4, 256 << 20);
    let p = sys.create().expect("create");
    for c in 0..4 {
        m.run_on(c, |_| {
            sys.init_cpu();
            sys.activate(&p).expect("activate");
        });
    }
    let a = buddy.alloc(0, 0).expect("frame");
    let b = buddy.alloc(0, 0).expect("frame");
    let va = VirtAddr::new(0x0000_0048_0000_0000);
    const N: u32 = 1000;
    let before = sys.stats().shootdowns;
    let t = Instant::now();
    m.run_on(0, |_| {
        for i in 0..N {
            let pa = if i % 2 == 0 { a } else { b };
            sys.enter(&p, va, pa, Prot::WRITE, EnterFlags::MANAGED, 0)
                .expect("enter");
        }
    });
    let el = t.elapsed();
    println!(
        "simulator: {N} replacements, {} shootdowns to 3 CPUs, {} ns per replacement",
        sys.stats().shootdowns - before,
        el.as_nanos() / N as u128
    );
}
