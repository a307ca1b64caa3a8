//! The kernel heap: power-of-two size classes with free lists over a region of physical memory
//! reached through the direct map. vmsys allocates with `alloc` (Arc, Vec, BTreeMap) and frees
//! often, so a bump allocator would run out; big allocations (the page array) come from the
//! region's top and are rarely freed (they go back to their class list).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

const MIN_SHIFT: usize = 4;
const CLASSES: usize = 28;

struct State {
    next: usize,
    end: usize,
    free: [usize; CLASSES],
}

pub struct Heap(spin::Mutex<State>);

#[global_allocator]
pub static HEAP: Heap = Heap(spin::Mutex::new(State {
    next: 0,
    end: 0,
    free: [0; CLASSES],
}));

/// Hand `[start, end)` (virtual, mapped through the direct map) to the heap.
pub fn init(start: usize, end: usize) {
    let _irq = crate::cpu::IrqGuard::new();
    let mut s = HEAP.0.lock();
    s.next = start;
    s.end = end;
}

/// Bytes of the region not handed out yet.
pub fn remaining() -> usize {
    let _irq = crate::cpu::IrqGuard::new();
    let s = HEAP.0.lock();
    s.end - s.next
}

fn class(l: &Layout) -> usize {
    let size = l.size().max(l.align()).max(1 << MIN_SHIFT);
    (usize::BITS - (size - 1).leading_zeros()) as usize - MIN_SHIFT
}

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let c = class(&l);
        if c >= CLASSES {
            return null_mut();
        }
        // Interrupts off while the lock is held: an interrupt handler on this CPU that
        // allocated would spin on it forever.
        let _irq = crate::cpu::IrqGuard::new();
        let mut s = self.0.lock();
        let head = s.free[c];
        if head != 0 {
            // SAFETY: free blocks hold the address of the next one in their first word.
            s.free[c] = unsafe { *(head as *const usize) };
            return head as *mut u8;
        }
        let size = 1usize << (c + MIN_SHIFT);
        // Blocks are aligned to their size, which covers any alignment up to it.
        let at = (s.next + size - 1) & !(size - 1);
        if at + size > s.end {
            return null_mut();
        }
        s.next = at + size;
        at as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let c = class(&l);
        let _irq = crate::cpu::IrqGuard::new();
        let mut s = self.0.lock();
        // SAFETY: `p` was a block of class `c`, at least 16 bytes, now unused.
        unsafe { *(p as *mut usize) = s.free[c] };
        s.free[c] = p as usize;
    }
}
