//! Thin wrappers over the privileged instructions the kernel uses.

use core::arch::asm;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the ports used are QEMU's COM1 and debug-exit.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
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

/// # Safety
/// `msr` exists and `v` is a value the kernel means to put there.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// `v` names page tables that map the running code, its stack and data as before.
pub unsafe fn write_cr3(v: u64) {
    // SAFETY: the caller's contract. Not `nomem`: the translation of every access changes.
    unsafe { asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) }
}

pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// `v` keeps long mode and paging as the kernel set them up.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller's contract.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) }
}

pub fn invlpg(va: u64) {
    // SAFETY: dropping a TLB entry only makes the next access walk the tables.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

/// INVPCID of `kind` (0: address in one PCID, 1: one PCID, 2: all with globals, 3: all but
/// globals). Only where CPUID says INVPCID exists.
pub fn invpcid(kind: u64, pcid: u16, va: u64) {
    let desc: [u64; 2] = [pcid as u64, va];
    // SAFETY: invalidation only; the descriptor is on our stack. The caller checked CPUID.
    unsafe {
        asm!("invpcid {}, [{}]", in(reg) kind, in(reg) desc.as_ptr(), options(nostack, preserves_flags))
    }
}

/// Take pending interrupts here: `sti` takes effect after the next instruction, so the window
/// is after the `nop`; then interrupts are off again, as the kernel runs. The `pause` matters
/// under QEMU's TCG, which looks at pending interrupts only when it returns to its main loop
/// (not between chained translation blocks); its PAUSE helper returns there, with IF set.
/// With `sti; nop; cli` (or a jump in between) an IPI to a busy CPU waited 10-40 ms.
pub fn interrupt_window() {
    // SAFETY: the IDT and the handlers are installed before the first call.
    unsafe { asm!("sti", "nop", "pause", "cli", options(nostack)) }
}

/// Wait for an interrupt with interrupts enabled just for the `hlt` (the `sti` shadow covers
/// it, so a pending interrupt wakes it rather than being taken before it), then off again.
pub fn halt_window() {
    // SAFETY: as `interrupt_window`.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
}

pub fn pause() {
    core::hint::spin_loop();
}

pub fn rdtsc() -> u64 {
    // SAFETY: reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}
