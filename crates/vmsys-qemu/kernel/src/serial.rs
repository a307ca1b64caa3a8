//! COM1 (a 16550 at port 0x3f8), polled, and the isa-debug-exit device.

use crate::cpu::{inb, outb, outl};

const COM1: u16 = 0x3f8;

/// Program COM1: 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

fn put(b: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// The serial line; one writer at a time (the lock is in `print`).
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

static LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Print under the serial lock, with interrupts off so that an IPI handler on this CPU cannot
/// find the lock held by the code it interrupted.
pub fn print(args: core::fmt::Arguments) {
    let _irq = crate::cpu::IrqGuard::new();
    let _g = LOCK.lock();
    let _ = core::fmt::Write::write_fmt(&mut Serial, args);
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Exit QEMU through isa-debug-exit (iobase 0xf4): QEMU exits with `(code << 1) | 1`.
pub fn exit(code: u32) -> ! {
    outl(0xf4, code);
    loop {
        crate::cpu::hlt();
    }
}

/// The code the host test treats as success (QEMU exit status 33).
pub const EXIT_SUCCESS: u32 = 0x10;
/// Any failing test (QEMU exit status 35).
pub const EXIT_FAILURE: u32 = 0x11;
