//! Per-CPU descriptor tables (GDT with a TSS, one IDT for all), the interrupt stubs and the
//! dispatch of exceptions and IPIs.
//!
//! Every vector runs on an IST stack: the host target's precompiled `core` uses the red zone
//! below `rsp`, which an interrupt taken on the current stack would overwrite. Exceptions use
//! IST1, IPIs IST2, so that an IPI taken inside the page-fault handler (whose lock waits take
//! interrupts) does not reuse the stack it interrupted. The stubs save the general registers
//! and the SSE state (`fxsave`), since `core` uses SSE registers anywhere.

use core::sync::atomic::{AtomicU32, Ordering};

pub const MAX_CPUS: usize = 8;
const IST_SIZE: usize = 32 * 1024;
/// First and last IPI vectors with a stub (the pmap's shootdown vector is 0xf2).
pub const IPI_FIRST: u8 = 0xf0;

/// What a CPU keeps for itself; `gs:0` is its dense number.
#[repr(C, align(64))]
pub struct PerCpu {
    pub id: u32,
    pub apic_id: u32,
    /// Where this CPU reaches its local APIC (`gs:8`): the boot tables' alias until it loads
    /// vmsys's tables, then the kernel pmap's uncached mapping.
    pub lapic: u64,
    gdt: [u64; 7],
    tss: [u32; 26],
}

#[repr(C, align(4096))]
struct Stacks([[u8; IST_SIZE]; 2 * MAX_CPUS]);

static mut PERCPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        id: 0,
        apic_id: 0,
        lapic: 0,
        gdt: [0; 7],
        tss: [0; 26],
    }
}; MAX_CPUS];
static mut IST: Stacks = Stacks([[0; IST_SIZE]; 2 * MAX_CPUS]);
static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];
static IDT_READY: AtomicU32 = AtomicU32::new(0);

/// The calling CPU's number (from `gs:0`, set by [`init_cpu`]).
#[inline]
pub fn cpu_id() -> u32 {
    let v: u32;
    // SAFETY: GS base points at this CPU's `PerCpu` from `init_cpu` on, whose first field is id.
    unsafe {
        core::arch::asm!("mov {:e}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    }
    v
}

/// The calling CPU's local APIC base (virtual).
#[inline]
pub fn lapic_base() -> u64 {
    let v: u64;
    // SAFETY: as `cpu_id`; `lapic` is at offset 8.
    unsafe {
        core::arch::asm!("mov {}, gs:[8]", out(reg) v, options(nostack, readonly, preserves_flags))
    }
    v
}

/// Point the calling CPU at its local APIC through `va`.
pub fn set_lapic_base(va: u64) {
    // SAFETY: this CPU's own `PerCpu` (GS base), field `lapic` at offset 8.
    unsafe { core::arch::asm!("mov gs:[8], {}", in(reg) va, options(nostack, preserves_flags)) }
}

/// The APIC id of CPU `id` (set by its `init_cpu`).
pub fn apic_id_of(id: u32) -> u32 {
    // SAFETY: read-only after the CPU's init; ids are below MAX_CPUS.
    unsafe { (*core::ptr::addr_of!(PERCPU))[id as usize].apic_id }
}

extern "C" {
    static isr_table: [u64; 256];
}

fn build_idt() {
    // SAFETY: isr_table is the stub addresses, written by the assembler.
    let table = unsafe { &*core::ptr::addr_of!(isr_table) };
    for (v, &addr) in table.iter().enumerate() {
        if addr == 0 {
            continue;
        }
        let ist: u64 = if v >= IPI_FIRST as usize { 2 } else { 1 };
        let lo = (addr & 0xffff)
            | (0x08 << 16)
            | (ist << 32)
            | (0x8e << 40)
            | ((addr >> 16) & 0xffff) << 48;
        // SAFETY: built once by the BSP before any other CPU loads it.
        unsafe { (*core::ptr::addr_of_mut!(IDT))[v] = [lo, addr >> 32] };
    }
}

/// Load this CPU's GDT (code, data, TSS), TSS with its IST stacks, the IDT, and GS base.
///
/// # Safety
/// Once per CPU, with `id` unique and below `MAX_CPUS`, before interrupts are enabled there.
pub unsafe fn init_cpu(id: u32, apic_id: u32) {
    if id == 0 && IDT_READY.swap(1, Ordering::SeqCst) == 0 {
        build_idt();
    }
    // SAFETY: each CPU touches only its own slot (ids are unique).
    let pc = unsafe { &mut (*core::ptr::addr_of_mut!(PERCPU))[id as usize] };
    pc.id = id;
    pc.apic_id = apic_id;
    pc.lapic = crate::apic::BOOT_ALIAS;
    let stacks = core::ptr::addr_of_mut!(IST) as u64;
    let ist1 = stacks + ((2 * id as u64) + 1) * IST_SIZE as u64;
    let ist2 = stacks + ((2 * id as u64) + 2) * IST_SIZE as u64;
    // TSS: IST1 at byte offset 36, IST2 at 44 (u32 words 9..13); no I/O bitmap.
    pc.tss = [0; 26];
    pc.tss[9] = ist1 as u32;
    pc.tss[10] = (ist1 >> 32) as u32;
    pc.tss[11] = ist2 as u32;
    pc.tss[12] = (ist2 >> 32) as u32;
    pc.tss[25] = 104 << 16;
    let tss = pc.tss.as_ptr() as u64;
    pc.gdt = [
        0,
        0x00af9a000000ffff,
        0x00cf92000000ffff,
        0,
        (103 | (tss & 0xffffff) << 16) | 0x89 << 40 | ((tss >> 24) & 0xff) << 56,
        tss >> 32,
        0,
    ];
    let gdtr: [u16; 5] = {
        let b = pc.gdt.as_ptr() as u64;
        [
            (7 * 8 - 1) as u16,
            b as u16,
            (b >> 16) as u16,
            (b >> 32) as u16,
            (b >> 48) as u16,
        ]
    };
    let idt = core::ptr::addr_of!(IDT) as u64;
    let idtr: [u16; 5] = [
        4095,
        idt as u16,
        (idt >> 16) as u16,
        (idt >> 32) as u16,
        (idt >> 48) as u16,
    ];
    // SAFETY: the tables are static and stay; the selectors match the GDT just built.
    unsafe {
        core::arch::asm!(
            "lgdt [{g}]",
            "push 0x08",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov {t:e}, 0x10",
            "mov ds, {t:e}",
            "mov es, {t:e}",
            "mov ss, {t:e}",
            "mov {t:e}, 0x20",
            "ltr {t:x}",
            "lidt [{i}]",
            g = in(reg) gdtr.as_ptr(),
            i = in(reg) idtr.as_ptr(),
            t = out(reg) _,
        );
        crate::cpu::wrmsr(0xc000_0101, pc as *mut PerCpu as u64);
    }
}

/// The registers an interrupt stub saved, in stack order.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[no_mangle]
extern "C" fn isr_dispatch(f: &mut Frame) {
    match f.vector {
        14 => crate::fault::page_fault(f),
        v if v >= IPI_FIRST as u64 => crate::ipi::interrupt(v as u8),
        v => {
            crate::println!(
                "FATAL: exception {v} error {:#x} at rip {:#x} rsp {:#x} on cpu {} (cr2 {:#x})",
                f.error,
                f.rip,
                f.rsp,
                cpu_id(),
                crate::cpu::cr2()
            );
            crate::serial::exit(crate::serial::EXIT_FAILURE);
        }
    }
}

macro_rules! stubs {
    () => {
        r#"
    .text
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255
    .p2align 4
isr_\v:
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp isr_common
    .endr

isr_common:
    cld
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rbp
    subq $512, %rsp
    andq $-16, %rsp
    fxsave64 (%rsp)
    movq %rbp, %rdi
    call isr_dispatch
    fxrstor64 (%rsp)
    movq %rbp, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

    .section .rodata
    .p2align 3
    .globl isr_table
isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\v
    .endr
    .fill 0xf0 - 32, 8, 0
    .irp v, 240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255
    .quad isr_\v
    .endr
    .text
"#
    };
}

core::arch::global_asm!(stubs!(), options(att_syntax));
