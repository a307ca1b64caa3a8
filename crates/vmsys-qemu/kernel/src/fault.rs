//! The #PF handler: CR2 and the error code become a `vmsys::platform::Fault` for the handler
//! the pmap installed; a delivered fault either lands in a probe's fixup (an access the kernel
//! expected might fault, FreeBSD's `onfault`) or is fatal.

use core::sync::atomic::{AtomicU64, Ordering};

use vmsys::platform::{AccessKind, Fault, FaultHandler, FaultReason, FaultResolution};
use vmsys::VirtAddr;

use crate::trap::{cpu_id, Frame, MAX_CPUS};

static HANDLER: spin::Mutex<Option<FaultHandler>> = spin::Mutex::new(None);
/// Page faults taken, per CPU.
pub static FAULTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The last delivered fault of each CPU that a probe caught: va, error code.
static LAST: [[AtomicU64; 2]; MAX_CPUS] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAX_CPUS];
/// Consecutive retries of the same address (a handler that keeps saying Retry is a bug).
static RETRY: [[AtomicU64; 2]; MAX_CPUS] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAX_CPUS];

pub fn set_handler(h: FaultHandler) {
    let _irq = crate::cpu::IrqGuard::new();
    *HANDLER.lock() = Some(h);
}

extern "C" {
    fn probe_read64_insn();
    fn probe_write64_insn();
    fn probe_copy_insn();
    fn probe_touch_insn();
    fn probe_fixup();
    fn probe_read64(va: u64, out: *mut u64) -> u64;
    fn probe_copy(dst: u64, src: u64, n: u64) -> u64;
    fn probe_touch(va: u64) -> u64;
}

core::arch::global_asm!(
    r#"
    .text
    .globl probe_read64, probe_read64_insn, probe_write64, probe_write64_insn
    .globl probe_copy, probe_copy_insn, probe_touch, probe_touch_insn, probe_fixup
probe_read64:
probe_read64_insn:
    movq (%rdi), %rax
    movq %rax, (%rsi)
    xorl %eax, %eax
    ret
probe_write64:
probe_write64_insn:
    movq %rsi, (%rdi)
    xorl %eax, %eax
    ret
probe_copy:
    movq %rdx, %rcx
probe_copy_insn:
    rep movsb
    xorl %eax, %eax
    ret
probe_touch:
probe_touch_insn:
    lock orb $0, (%rdi)
    xorl %eax, %eax
    ret
probe_fixup:
    movl $1, %eax
    ret
"#,
    options(att_syntax)
);

fn fixup_for(rip: u64) -> Option<u64> {
    let insns = [
        probe_read64_insn as *const () as u64,
        probe_write64_insn as *const () as u64,
        probe_copy_insn as *const () as u64,
        probe_touch_insn as *const () as u64,
    ];
    insns
        .contains(&rip)
        .then_some(probe_fixup as *const () as u64)
}

/// Decode the error code into vmsys's terms. The hardware does not say at which level the
/// walk stopped: it is found by walking the current tables (the level of the non-present
/// entry, or of the leaf that denied the access).
pub fn decode(va: u64, error: u64) -> Fault {
    let access = if error & 0x10 != 0 {
        AccessKind::Execute
    } else if error & 2 != 0 {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    let level = crate::plat::walk_level(crate::cpu::cr3() & 0x000f_ffff_ffff_f000, va);
    let reason = if va >> 47 != 0 && va >> 47 != 0x1ffff {
        FaultReason::NonCanonical
    } else if error & 8 != 0 {
        FaultReason::ReservedBit { level }
    } else if error & 1 != 0 {
        FaultReason::Protection { level }
    } else {
        FaultReason::NotPresent { level }
    };
    Fault {
        cpu: cpu_id(),
        va: VirtAddr::new(va),
        access,
        user: error & 4 != 0,
        reason,
    }
}

pub fn page_fault(f: &mut Frame) {
    let va = crate::cpu::cr2();
    let me = cpu_id() as usize;
    FAULTS[me].fetch_add(1, Ordering::Relaxed);
    let fault = decode(va, f.error);
    let h = HANDLER.lock().clone();
    if let Some(h) = h {
        if h(&fault) == FaultResolution::Retry {
            let r = &RETRY[me];
            if r[0].load(Ordering::Relaxed) == va {
                if r[1].fetch_add(1, Ordering::Relaxed) > 1000 {
                    crate::println!("FATAL: {fault}: the fault handler retried it 1000 times");
                    crate::serial::exit(crate::serial::EXIT_FAILURE);
                }
            } else {
                r[0].store(va, Ordering::Relaxed);
                r[1].store(0, Ordering::Relaxed);
            }
            return;
        }
    }
    if let Some(fix) = fixup_for(f.rip) {
        LAST[me][0].store(va, Ordering::Relaxed);
        LAST[me][1].store(f.error, Ordering::Relaxed);
        f.rip = fix;
        return;
    }
    crate::println!(
        "FATAL: unhandled {fault} (error {:#x}) at rip {:#x}",
        f.error,
        f.rip
    );
    crate::serial::exit(crate::serial::EXIT_FAILURE);
}

/// The fault a probe on this CPU just took.
fn last_fault() -> Fault {
    let me = cpu_id() as usize;
    decode(
        LAST[me][0].load(Ordering::Relaxed),
        LAST[me][1].load(Ordering::Relaxed),
    )
}

/// Load 8 bytes at `va` through the MMU; a fault the handler delivers comes back as `Err`.
pub fn read64(va: u64) -> Result<u64, Fault> {
    let mut v = 0;
    // SAFETY: the access either completes or faults into the fixup; `v` is ours.
    match unsafe { probe_read64(va, &mut v) } {
        0 => Ok(v),
        _ => Err(last_fault()),
    }
}

/// A write access that leaves the byte unchanged (an atomic `or` of 0): the MMU checks the
/// write permission and sets the dirty bit.
pub fn touch_write(va: u64) -> Result<(), Fault> {
    // SAFETY: the byte is rewritten with its own value, atomically.
    match unsafe { probe_touch(va) } {
        0 => Ok(()),
        _ => Err(last_fault()),
    }
}

/// Copy `n` bytes between virtual addresses through the MMU.
///
/// # Safety
/// The destination, where mapped, may be overwritten; the ranges do not overlap.
pub unsafe fn copy(dst: u64, src: u64, n: u64) -> Result<(), Fault> {
    // SAFETY: the caller's contract.
    match unsafe { probe_copy(dst, src, n) } {
        0 => Ok(()),
        _ => Err(last_fault()),
    }
}
