//! Entry from QEMU (PVH: 32-bit protected mode, paging off, `ebx` = start info), the boot page
//! tables, the switch to long mode, and the jump to `kernel_main` in the higher half.
//!
//! The boot tables map, with 2 MiB pages: the first 4 GiB at 0 (the entry code and the AP
//! trampoline run there), the same 4 GiB at the vmsys direct-map base (so that the platform's
//! physical accesses work before and after the switch to vmsys's tables), and the first GiB at
//! `KERNEL_VMA`, where the kernel is linked. CR0.WP is set: without it supervisor writes ignore
//! read-only entries, and the kernel's own accesses could not check write protection. None is global, so that the CR3 load into the vmsys
//! kernel pmap drops them all.

core::arch::global_asm!(
    r#"
    .section .note.xen, "a", @note
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad _start32

    .section .boot.bss, "aw", @nobits
    .p2align 12
    .globl boot_pml4
boot_pml4:    .skip 4096
boot_pdpt_lo: .skip 4096
boot_pdpt_hi: .skip 4096
boot_pd:      .skip 4 * 4096

    .section .boot.data, "aw"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .boot.text, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %ebx, %esi
    movl $boot_pml4, %edi
    movl $(7 * 1024), %ecx
    xorl %eax, %eax
    rep stosl
    movl $boot_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
1:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 1b
    movl $boot_pdpt_lo, %edi
    movl $(boot_pd + 3), %eax
    movl $4, %ecx
2:  movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 2b
    movl $(boot_pd + 3), boot_pdpt_hi + 510 * 8
    movl $(boot_pdpt_lo + 3), boot_pml4
    movl $(boot_pdpt_lo + 3), boot_pml4 + 256 * 8
    movl $(boot_pdpt_hi + 3), boot_pml4 + 511 * 8
    movl $boot_pml4, %eax
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
    lgdt boot_gdt_ptr
    ljmp $0x08, $3f
    .code64
3:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %r12d
    movabsq $__bss_start, %rdi
    movabsq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movabsq $bsp_stack_top, %rsp
    movl %r12d, %edi
    movabsq $kernel_main, %rax
    callq *%rax
4:  hlt
    jmp 4b

    .section .bss.bsp_stack, "aw", @nobits
    .p2align 12
    .skip 64 * 1024
    .globl bsp_stack_top
bsp_stack_top:
    .text
"#,
    options(att_syntax)
);
