//! The local APIC in xAPIC mode (memory-mapped), as QEMU 7.2's TCG offers it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::trap::lapic_base;

pub const PHYS: u64 = 0xfee0_0000;
/// The local APIC through the boot tables' copy of the first 4 GiB at the direct-map base.
pub const BOOT_ALIAS: u64 = crate::DMAP + PHYS;
/// The kernel pmap's uncached mapping of the local APIC (0 until made).
pub static KVA: AtomicU64 = AtomicU64::new(0);

fn reg(off: u64) -> *mut u32 {
    (lapic_base() + off) as *mut u32
}

fn read(off: u64) -> u32 {
    // SAFETY: `lapic_base` maps the local APIC on this CPU's current tables.
    unsafe { reg(off).read_volatile() }
}

fn write(off: u64, v: u32) {
    // SAFETY: as `read`.
    unsafe { reg(off).write_volatile(v) }
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    read(0x20) >> 24
}

/// Software-enable the local APIC (spurious vector 0xff).
pub fn enable() {
    write(0xf0, 0x1ff);
}

pub fn eoi() {
    write(0xb0, 0);
}

fn wait_idle() {
    while read(0x300) & (1 << 12) != 0 {
        crate::cpu::pause();
    }
}

/// Send `icr_low` (vector, delivery mode, level) to `apic_id`.
pub fn send(apic_id: u32, icr_low: u32) {
    wait_idle();
    write(0x310, apic_id << 24);
    write(0x300, icr_low);
    wait_idle();
}

/// A fixed interrupt of `vector` to `apic_id`.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send(apic_id, vector as u32 | 1 << 14);
}

/// Switch the calling CPU to the kernel pmap's mapping of the local APIC, once it exists.
pub fn use_kva() {
    let va = KVA.load(Ordering::Acquire);
    if va != 0 {
        crate::trap::set_lapic_base(va);
    }
}
