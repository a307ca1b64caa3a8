//! IPIs with a payload and acknowledgement: a mailbox per (target, sender) pair, so that any
//! number of CPUs can interrupt the same target at once. The sender fills its slot, raises
//! `pending`, sends the vector; the target runs the handler of every pending slot and clears
//! `pending`, which is the acknowledgement a waiting sender spins on (taking its own
//! interrupts meanwhile, so two CPUs that interrupt each other do not deadlock).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use vmsys::platform::{IpiHandler, IpiMessage};

use crate::trap::{cpu_id, MAX_CPUS};

struct Slot {
    pending: AtomicBool,
    vector: AtomicU8,
    args: [AtomicU64; 4],
}

// Only an initializer for the array below (each element is a fresh copy).
#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot {
    pending: AtomicBool::new(false),
    vector: AtomicU8::new(0),
    args: [const { AtomicU64::new(0) }; 4],
};

static SLOTS: [[Slot; MAX_CPUS]; MAX_CPUS] = [const { [SLOT; MAX_CPUS] }; MAX_CPUS];
/// CPUs that take IPIs (their local APIC is enabled and they have interrupt points).
pub static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static HANDLERS: spin::Mutex<[Option<IpiHandler>; 16]> = spin::Mutex::new([const { None }; 16]);
/// IPIs handled, per CPU.
pub static HANDLED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

pub fn set_handler(vector: u8, h: IpiHandler) {
    assert!(
        vector >= crate::trap::IPI_FIRST,
        "IPI vector {vector:#x} has no stub"
    );
    let _irq = crate::cpu::IrqGuard::new();
    HANDLERS.lock()[(vector - crate::trap::IPI_FIRST) as usize] = Some(h);
}

fn handler(vector: u8) -> Option<IpiHandler> {
    if vector < crate::trap::IPI_FIRST {
        return None;
    }
    // Interrupts are off here (an interrupt gate or a caller's guard); the lock is never held
    // across a wait.
    HANDLERS.lock()[(vector - crate::trap::IPI_FIRST) as usize].clone()
}

/// Post `msg` to `target` from the calling CPU and interrupt it. Waits for the previous
/// message of this pair to be acknowledged first.
pub fn post(target: u32, msg: &IpiMessage) {
    let me = cpu_id() as usize;
    let s = &SLOTS[target as usize][me];
    while s.pending.load(Ordering::Acquire) {
        crate::cpu::interrupt_window();
        crate::cpu::pause();
    }
    s.vector.store(msg.vector, Ordering::Relaxed);
    for (a, v) in s.args.iter().zip(msg.args) {
        a.store(v, Ordering::Relaxed);
    }
    s.pending.store(true, Ordering::Release);
    crate::apic::send_fixed(crate::trap::apic_id_of(target), msg.vector);
}

/// Whether the message from the calling CPU to `target` is still unacknowledged.
pub fn pending(target: u32) -> bool {
    SLOTS[target as usize][cpu_id() as usize]
        .pending
        .load(Ordering::Acquire)
}

/// The IPI entry: run every pending message addressed to this CPU.
pub fn interrupt(_vector: u8) {
    let me = cpu_id() as usize;
    for s in SLOTS[me].iter() {
        if !s.pending.load(Ordering::Acquire) {
            continue;
        }
        let msg = IpiMessage {
            vector: s.vector.load(Ordering::Relaxed),
            args: core::array::from_fn(|i| s.args[i].load(Ordering::Relaxed)),
        };
        if let Some(h) = handler(msg.vector) {
            h(&msg);
        }
        HANDLED[me].fetch_add(1, Ordering::Relaxed);
        s.pending.store(false, Ordering::Release);
    }
    crate::apic::eoi();
}

/// Run `msg`'s handler on the calling CPU, with interrupts off as in an interrupt.
pub fn run_local(msg: &IpiMessage) {
    let _irq = crate::cpu::IrqGuard::new();
    if let Some(h) = handler(msg.vector) {
        h(msg);
    }
}
