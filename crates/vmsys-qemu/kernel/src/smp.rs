//! Application processors: INIT-SIPI-SIPI into a real-mode trampoline copied to 0x8000, which
//! enters long mode on the boot tables and jumps to `ap_entry` on the AP's own stack; then a
//! work slot per CPU, polled with interrupts taken, through which the BSP runs code on others.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::trap::MAX_CPUS;
use crate::DMAP;

const TRAMPOLINE: u64 = 0x8000;
const AP_STACK: usize = 128 * 1024;

#[repr(C, align(4096))]
struct Stacks([[u8; AP_STACK]; MAX_CPUS]);
static mut AP_STACKS: Stacks = Stacks([[0; AP_STACK]; MAX_CPUS]);

static STARTING: AtomicU32 = AtomicU32::new(0);
static STARTING_APIC: AtomicU32 = AtomicU32::new(0);
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// Set by the BSP once vmsys is up: APs then load the kernel pmap.
pub static GO: AtomicBool = AtomicBool::new(false);

/// The vector that only wakes a halted CPU.
pub const WAKE_VECTOR: u8 = 0xf0;

type Job = Box<dyn FnOnce() + Send>;
static WORK: [spin::Mutex<Option<Job>>; MAX_CPUS] = [const { spin::Mutex::new(None) }; MAX_CPUS];
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static POSTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static boot_pml4: u8;
}

core::arch::global_asm!(
    r#"
    .section .rodata.trampoline, "a"
    .globl ap_tramp_start
    .globl ap_tramp_end
    .code16
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(0x8000 + tramp_pm - ap_tramp_start)
    .code32
tramp_pm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl (0x8000 + tramp_cr3 - ap_tramp_start), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax
    wrmsr
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0x8000 + tramp_lm - ap_tramp_start)
    .code64
tramp_lm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq (0x8000 + tramp_stack - ap_tramp_start), %rsp
    movq (0x8000 + tramp_entry - ap_tramp_start), %rax
    jmpq *%rax
    .p2align 3
tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
tramp_gdt_ptr:
    .word 31
    .long 0x8000 + tramp_gdt - ap_tramp_start
    .p2align 3
    .globl tramp_cr3
tramp_cr3:   .quad 0
tramp_stack: .quad 0
tramp_entry: .quad 0
ap_tramp_end:
    .text
"#,
    options(att_syntax)
);

fn tramp_len() -> u64 {
    // SAFETY: linker symbols; only their addresses are used.
    core::ptr::addr_of!(ap_tramp_end) as u64 - core::ptr::addr_of!(ap_tramp_start) as u64
}

fn spin_for(n: u64) {
    let t = crate::cpu::rdtsc();
    while crate::cpu::rdtsc() - t < n {
        crate::cpu::pause();
    }
}

/// Start every AP in `apic_ids` but the caller's; returns the number of CPUs (BSP included).
/// The APs wait (interrupts off) for [`GO`].
pub fn start_aps(apic_ids: &[u32], my_apic: u32) -> u32 {
    let len = tramp_len();
    // SAFETY: 0x8000 is conventional RAM below 1 MiB that nothing else uses after boot; the
    // boot tables map it at DMAP.
    unsafe {
        core::ptr::copy_nonoverlapping(
            core::ptr::addr_of!(ap_tramp_start),
            (DMAP + TRAMPOLINE) as *mut u8,
            len as usize,
        );
    }
    let slot = |i: u64| (DMAP + TRAMPOLINE + len - 24 + 8 * i) as *mut u64;
    // The boot PML4 is identity-linked (its VMA is its physical address).
    let cr3 = core::ptr::addr_of!(boot_pml4) as u64;
    let mut n = 1u32;
    for &apic in apic_ids {
        if apic == my_apic || n as usize >= MAX_CPUS {
            continue;
        }
        let stack = core::ptr::addr_of_mut!(AP_STACKS) as u64 + (n as u64 + 1) * AP_STACK as u64;
        STARTING.store(n, Ordering::SeqCst);
        STARTING_APIC.store(apic, Ordering::SeqCst);
        // SAFETY: the three slots at the end of the copied trampoline.
        unsafe {
            slot(0).write_volatile(cr3);
            slot(1).write_volatile(stack);
            slot(2).write_volatile(ap_entry as *const () as u64);
        }
        let before = CHECKED_IN.load(Ordering::SeqCst);
        crate::apic::send(apic, 0x4500);
        spin_for(100_000);
        for _ in 0..2 {
            crate::apic::send(apic, 0x4600 | (TRAMPOLINE >> 12) as u32);
            let t = crate::cpu::rdtsc();
            while CHECKED_IN.load(Ordering::SeqCst) == before
                && crate::cpu::rdtsc() - t < 2_000_000_000
            {
                crate::cpu::pause();
            }
            if CHECKED_IN.load(Ordering::SeqCst) != before {
                break;
            }
        }
        if CHECKED_IN.load(Ordering::SeqCst) == before {
            crate::println!("smp: APIC id {apic} did not start");
            continue;
        }
        n += 1;
    }
    n
}

extern "C" fn ap_entry() -> ! {
    let id = STARTING.load(Ordering::SeqCst);
    // SAFETY: `id` is unique (the BSP starts one AP at a time).
    unsafe { crate::trap::init_cpu(id, STARTING_APIC.load(Ordering::SeqCst)) };
    crate::cpu_features_enable();
    CHECKED_IN.fetch_add(1, Ordering::SeqCst);
    while !GO.load(Ordering::SeqCst) {
        crate::cpu::pause();
    }
    crate::ap_main(id)
}

/// The AP's loop: run posted work, else halt until an interrupt (a shootdown, or the wake-up
/// IPI of [`spawn`]). Halting, not spinning: under TCG every spinning vCPU is a host thread
/// competing for the host's cores, which slows every IPI round trip.
pub fn idle(id: u32) -> ! {
    loop {
        let job = {
            let _irq = crate::cpu::IrqGuard::new();
            WORK[id as usize].lock().take()
        };
        if let Some(j) = job {
            j();
            DONE[id as usize].fetch_add(1, Ordering::SeqCst);
        } else {
            // `sti; hlt`: an interrupt that arrived while IF was 0 wakes the hlt at once.
            crate::cpu::halt_window();
        }
    }
}

/// Run `f` on CPU `cpu` (not the caller's); returns a ticket for [`wait`].
pub fn spawn(cpu: u32, f: impl FnOnce() + Send + 'static) -> (u32, u64) {
    assert!(cpu != crate::trap::cpu_id(), "spawn on the calling CPU");
    let t = POSTED[cpu as usize].fetch_add(1, Ordering::SeqCst) + 1;
    loop {
        {
            let _irq = crate::cpu::IrqGuard::new();
            let mut w = WORK[cpu as usize].lock();
            if w.is_none() {
                *w = Some(Box::new(f));
                drop(w);
                // Wake it (an IPI with no message: the handler finds no pending slot).
                crate::apic::send_fixed(crate::trap::apic_id_of(cpu), WAKE_VECTOR);
                return (cpu, t);
            }
        }
        crate::cpu::interrupt_window();
    }
}

/// Wait (taking interrupts) until the job of `ticket` has finished.
pub fn wait(ticket: (u32, u64)) {
    while DONE[ticket.0 as usize].load(Ordering::SeqCst) < ticket.1 {
        crate::cpu::interrupt_window();
        crate::cpu::pause();
    }
}
