//! Thin wrappers over the privileged instructions the kernel uses.

use core::arch::asm;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the ports used are QEMU's COM1 and debug-exit.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as `outb`.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn hlt() {
    // SAFETY: waits for an interrupt; no memory effects.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

pub fn rflags() -> u64 {
    let r: u64;
    // SAFETY: reads RFLAGS through the stack (pushfq/pop).
    unsafe { asm!("pushfq", "pop {}", out(reg) r, options(preserves_flags)) }
    r
}

/// Disables interrupts until dropped, then restores the previous state.
pub struct IrqGuard(bool);

impl IrqGuard {
    pub fn new() -> Self {
        let was = rflags() & (1 << 9) != 0;
        // SAFETY: clearing IF only delays interrupts.
        unsafe { asm!("cli", options(nomem, nostack)) }
        IrqGuard(was)
    }
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: restores the interrupt flag that `new` found set.
            unsafe { asm!("sti", options(nomem, nostack)) }
        }
    }
}
