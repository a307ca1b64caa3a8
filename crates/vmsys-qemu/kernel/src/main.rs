//! A freestanding x86-64 kernel that runs vmsys on QEMU's emulated machine (see
//! `docs/EMBEDDING.md`). Built with the stable host toolchain and its own linker script.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

mod boot;
mod cpu;
mod rt;
mod serial;

#[no_mangle]
extern "C" fn kernel_main(_pvh: u32) -> ! {
    serial::init();
    println!("vmsys-qemu: hello");
    serial::exit(serial::EXIT_SUCCESS)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    serial::exit(serial::EXIT_FAILURE)
}
