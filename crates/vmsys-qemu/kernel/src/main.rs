//! A freestanding x86-64 kernel that runs vmsys on QEMU's emulated machine (see
//! `docs/EMBEDDING.md`). Built with the stable host toolchain and its own linker script.
//!
//! Boot order: PVH entry and long mode on boot tables (`boot`), COM1, this CPU's GDT/TSS/IDT,
//! paging features, the PVH memory map, the heap, the APs (they wait on the boot tables), the
//! page array, the buddy allocator and the pmap over the memory map, the kernel image and the
//! local APIC mapped by the pmap, the switch of every CPU to the kernel pmap, then the suite.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[path = "../../src/ad.rs"]
mod ad;
mod apic;
mod boot;
mod cpu;
mod fault;
mod heap;
mod ipi;
mod plat;
mod pvh;
mod rt;
mod serial;
mod smp;
mod suite;
mod trap;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmsys::arch::{CacheMode, Prot};
use vmsys::page::PageArray;
use vmsys::phys::BuddyAllocator;
use vmsys::platform::PhysSegment;
use vmsys::{EnterFlags, PhysAddr, PmapConfig, PmapSystem, VirtAddr, PAGE_SIZE};

use plat::{Features, QemuPlatform};

/// The vmsys direct map's base for 4-level amd64 (the start of the kernel half).
pub const DMAP: u64 = 0xffff_8000_0000_0000;
/// Where the kernel is linked: `KERNEL_VMA + physical address` (the top 2 GiB).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
const HEAP_SIZE: u64 = 48 << 20;

pub type Sys = PmapSystem<QemuPlatform>;
pub static SYSTEM: spin::Once<(Arc<Sys>, Arc<BuddyAllocator>)> = spin::Once::new();
static PCID_ON: AtomicBool = AtomicBool::new(false);

extern "C" {
    static __kernel_end: u8;
}

/// Per-CPU paging features: global pages, and PCIDs where CPUID has them (CR3's low bits are
/// 0 on the boot tables, as CR4.PCIDE requires).
pub fn cpu_features_enable() {
    let f = Features::probe();
    let mut cr4 = cpu::cr4();
    if f.pge {
        cr4 |= 1 << 7;
    }
    if f.pcid {
        cr4 |= 1 << 17;
        PCID_ON.store(true, Ordering::SeqCst);
    }
    // SAFETY: enabling PGE/PCIDE keeps the current translations.
    unsafe { cpu::write_cr4(cr4) };
}

fn fail(what: &str) -> ! {
    println!("FATAL: {what}");
    serial::exit(serial::EXIT_FAILURE)
}

#[no_mangle]
extern "C" fn kernel_main(pvh_pa: u32) -> ! {
    let t0 = cpu::rdtsc();
    serial::init();
    // Mask the legacy 8259s: the firmware left them at vector base 8, where the timer would
    // arrive as a "double fault" at the first interrupt window.
    cpu::outb(0x21, 0xff);
    cpu::outb(0xa1, 0xff);
    // SAFETY: the BSP is CPU 0, first to initialise.
    unsafe { trap::init_cpu(0, 0) };
    let my_apic = apic::id();
    // SAFETY: the same CPU, again, with its real APIC id (the tables are rebuilt identically).
    unsafe { trap::init_cpu(0, my_apic) };
    cpu_features_enable();
    let feat = Features::probe();
    let bi = pvh::read(pvh_pa as u64).unwrap_or_else(|e| fail(e));
    println!(
        "vmsys-qemu: cmdline '{}', cpu features {feat:?}",
        bi.cmdline()
    );

    let image_end =
        (core::ptr::addr_of!(__kernel_end) as u64 - KERNEL_VMA + (2 << 20) - 1) & !((2 << 20) - 1);
    let heap_end = image_end + HEAP_SIZE;
    heap::init((DMAP + image_end) as usize, (DMAP + heap_end) as usize);
    let mut segments = Vec::new();
    let mut ram_end = 0;
    for e in bi.map().iter().filter(|e| e.kind == 1) {
        let (s, end) = (e.addr.max(heap_end), e.addr + e.size);
        ram_end = ram_end.max(end);
        let (s, end) = (
            (s + PAGE_SIZE - 1) & !(PAGE_SIZE - 1),
            end & !(PAGE_SIZE - 1),
        );
        if end > s {
            segments.push(PhysSegment::new(s, end, 0));
        }
    }
    if ram_end > 1 << 30 {
        fail("this kernel maps at most 1 GiB of RAM (boot with -m 1G or less)");
    }
    let mut ids = [0u32; trap::MAX_CPUS];
    let n = pvh::madt_apic_ids(bi.rsdp, &mut ids).unwrap_or_else(|e| fail(e));
    let ncpu = smp::start_aps(&ids[..n], my_apic);
    println!("vmsys-qemu: {ncpu} CPUs, RAM {:?}", segments);

    let plat = Arc::new(QemuPlatform::new(
        ncpu,
        segments,
        ram_end,
        feat,
        PCID_ON.load(Ordering::SeqCst),
    ));
    let pages = Arc::new(PageArray::new(&plat.phys_segments_owned()));
    let buddy = Arc::new(BuddyAllocator::new(pages.clone()));
    let kernel_end_va = core::ptr::addr_of!(__kernel_end) as u64;
    let cfg = PmapConfig {
        use_tags: plat.pcid_on,
        // The kernel's dynamic range starts at the image, which the pmap maps like any kernel
        // mapping (the page tables for it come from growkernel).
        kva: Some((KERNEL_VMA, u64::MAX - PAGE_SIZE + 1)),
        ..PmapConfig::default()
    };
    let sys = PmapSystem::bootstrap_with_pages(plat.clone(), buddy.clone(), pages, cfg)
        .unwrap_or_else(|e| fail(&alloc::format!("pmap bootstrap: {e}")));
    sys.install_fault_handler();
    let lapic_va = (kernel_end_va + 2 * PAGE_SIZE) & !(PAGE_SIZE - 1);
    sys.growkernel(VirtAddr::new(lapic_va + PAGE_SIZE))
        .unwrap_or_else(|e| fail(&alloc::format!("growkernel: {e}")));
    let k = sys.kernel_pmap().clone();
    let mut va = KERNEL_VMA + 0x10_0000;
    while va < kernel_end_va {
        sys.enter(
            &k,
            VirtAddr::new(va),
            PhysAddr::new(va - KERNEL_VMA),
            Prot::WRITE | Prot::EXEC,
            EnterFlags::WIRED | EnterFlags::NO_PROMOTE,
            0,
        )
        .unwrap_or_else(|e| fail(&alloc::format!("mapping the kernel image at {va:#x}: {e}")));
        va += PAGE_SIZE;
    }
    sys.kenter(
        VirtAddr::new(lapic_va),
        PhysAddr::new(apic::PHYS),
        CacheMode::Uncacheable,
    )
    .unwrap_or_else(|e| fail(&alloc::format!("mapping the local APIC: {e}")));
    apic::KVA.store(lapic_va, Ordering::Release);
    apic::enable();
    ipi::ONLINE[0].store(true, Ordering::SeqCst);
    sys.init_cpu();
    SYSTEM.call_once(|| (sys.clone(), buddy.clone()));
    smp::GO.store(true, Ordering::SeqCst);
    let t1 = cpu::rdtsc();
    calibrate_tsc();
    // Wait until every AP runs on the kernel pmap.
    while (0..ncpu).any(|c| !ipi::ONLINE[c as usize].load(Ordering::SeqCst)) {
        cpu::interrupt_window();
    }
    println!(
        "vmsys-qemu: vmsys up on {ncpu} CPUs (cr3 {:#x}, {} us from entry; TSC {} MHz), heap left {} KiB",
        cpu::cr3(),
        tsc_ns(t1 - t0) / 1000,
        TSC_PER_US.load(Ordering::SeqCst),
        heap::remaining() / 1024
    );
    let failed = suite::run(&sys, &buddy, bi.cmdline());
    serial::exit(if failed == 0 {
        serial::EXIT_SUCCESS
    } else {
        serial::EXIT_FAILURE
    })
}

/// An AP after [`smp::GO`]: its local APIC, the kernel pmap, then the idle loop.
pub fn ap_main(id: u32) -> ! {
    apic::enable();
    // Online before the CR3 load: a shootdown that missed this CPU happened before its first
    // walk of the vmsys tables.
    ipi::ONLINE[id as usize].store(true, Ordering::SeqCst);
    let (sys, _) = SYSTEM.get().expect("GO is set after SYSTEM");
    sys.init_cpu();
    smp::idle(id)
}

static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

/// Calibrate the TSC against the ACPI PM timer (3.579545 MHz, port 0x608 on q35).
fn calibrate_tsc() {
    let pm = || cpu::inl(0x608) & 0xff_ffff;
    let start = pm();
    let t0 = cpu::rdtsc();
    let mut ticks = 0;
    while ticks < 178_977 {
        ticks = (pm().wrapping_sub(start)) & 0xff_ffff;
    }
    let cycles = cpu::rdtsc() - t0;
    // 178977 ticks = 50 ms.
    TSC_PER_US.store((cycles / 50_000).max(1), Ordering::SeqCst);
}

/// TSC cycles as nanoseconds.
pub fn tsc_ns(cycles: u64) -> u64 {
    cycles * 1000 / TSC_PER_US.load(Ordering::SeqCst).max(1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC on cpu {}: {info}", trap::cpu_id());
    serial::exit(serial::EXIT_FAILURE)
}
