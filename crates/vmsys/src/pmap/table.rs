//! Reading and writing page-table entries through the platform, in the format's entry width,
//! and taking locks without deadlocking against shootdowns.

use crate::addr::PhysAddr;
use crate::platform::Platform;

use super::geom::Geometry;

/// Acquire `m`, taking this CPU's interrupts while spinning: the holder may be waiting for this
/// CPU to acknowledge a TLB shootdown. The platform hears of the acquisition and the release
/// ([`Platform::lock_acquired`]), which is how a test checks that nothing allocates inside.
#[inline]
pub(crate) fn lock<'a, T, P: Platform + ?Sized>(
    m: &'a spin::Mutex<T>,
    plat: &'a P,
) -> crate::platform::SpinGuard<'a, T, P> {
    crate::platform::lock_interruptible(m, plat)
}

/// Zeros for clearing a run of entries without building a buffer.
pub(crate) static ZEROS: [u64; 1024] = [0; 1024];

/// Run `f` on a zeroed scratch buffer of `n` words (up to two tables' worth), clearing only a
/// buffer of about that size: a one-page operation must not pay for zeroing 8 KiB of stack.
#[inline]
pub(crate) fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [u64]) -> R) -> R {
    if n <= 16 {
        let mut b = [0u64; 16];
        f(&mut b[..n])
    } else if n <= 128 {
        let mut b = [0u64; 128];
        f(&mut b[..n])
    } else if n <= 512 {
        let mut b = [0u64; 512];
        f(&mut b[..n])
    } else {
        let mut b = [0u64; 2048];
        f(&mut b[..n])
    }
}

/// Entry access for one format.
pub(crate) struct Tables<'a, P: Platform> {
    pub plat: &'a P,
    pub geom: &'a Geometry,
}

impl<P: Platform> Tables<'_, P> {
    #[inline]
    fn wide(&self) -> bool {
        self.geom.entry_bytes == 8
    }

    #[inline]
    pub fn load(&self, slot: u64) -> u64 {
        if self.wide() {
            self.plat.pt_load64(PhysAddr::new(slot))
        } else {
            self.plat.pt_load32(PhysAddr::new(slot)) as u64
        }
    }

    #[inline]
    pub fn store(&self, slot: u64, v: u64) {
        if self.wide() {
            self.plat.pt_store64(PhysAddr::new(slot), v)
        } else {
            self.plat.pt_store32(PhysAddr::new(slot), v as u32)
        }
    }

    #[inline]
    pub fn swap(&self, slot: u64, v: u64) -> u64 {
        if self.wide() {
            self.plat.pt_swap64(PhysAddr::new(slot), v)
        } else {
            self.plat.pt_swap32(PhysAddr::new(slot), v as u32) as u64
        }
    }

    #[inline]
    pub fn cas(&self, slot: u64, old: u64, new: u64) -> Result<u64, u64> {
        if self.wide() {
            self.plat.pt_cas64(PhysAddr::new(slot), old, new)
        } else {
            self.plat
                .pt_cas32(PhysAddr::new(slot), old as u32, new as u32)
                .map(|v| v as u64)
                .map_err(|v| v as u64)
        }
    }

    /// Atomically replace `slot` by `f(old)` (retrying if the MMU changes A/D meanwhile);
    /// returns the old value.
    pub fn update(&self, slot: u64, mut f: impl FnMut(u64) -> u64) -> u64 {
        let mut old = self.load(slot);
        loop {
            let new = f(old);
            if new == old {
                return old;
            }
            match self.cas(slot, old, new) {
                Ok(_) => return old,
                Err(cur) => old = cur,
            }
        }
    }

    /// Entries `[first, first + out.len())` of the table at `table`.
    #[inline]
    pub fn load_run(&self, table: u64, first: usize, out: &mut [u64]) {
        let slot = self.geom.slot(table, first);
        if self.wide() {
            self.plat.pt_load_run64(PhysAddr::new(slot), out)
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.plat.pt_load32(PhysAddr::new(slot + 4 * i as u64)) as u64;
            }
        }
    }

    /// Plain stores of a run (for entries no MMU can be updating: invalid ones, or unmanaged
    /// ones whose A/D state nobody needs).
    #[inline]
    pub fn store_run(&self, table: u64, first: usize, vals: &[u64]) {
        let slot = self.geom.slot(table, first);
        if self.wide() {
            self.plat.pt_store_run64(PhysAddr::new(slot), vals)
        } else {
            for (i, v) in vals.iter().enumerate() {
                self.plat
                    .pt_store32(PhysAddr::new(slot + 4 * i as u64), *v as u32);
            }
        }
    }

    /// Exchanges of a run: `vals[i]` is stored and replaced by the old entry (A/D harvest).
    #[inline]
    pub fn swap_run(&self, table: u64, first: usize, vals: &mut [u64]) {
        let slot = self.geom.slot(table, first);
        if self.wide() {
            self.plat.pt_swap_run64(PhysAddr::new(slot), vals)
        } else {
            for (i, v) in vals.iter_mut().enumerate() {
                *v = self
                    .plat
                    .pt_swap32(PhysAddr::new(slot + 4 * i as u64), *v as u32)
                    as u64;
            }
        }
    }

    /// Zero a whole table page.
    pub fn zero_table(&self, table: u64) {
        self.plat
            .phys_zero(PhysAddr::new(table), crate::addr::PAGE_SIZE);
    }

    /// Whether every entry of the table at `table` (a table at `level`) is zero.
    pub fn table_is_zero(&self, table: u64, level: usize) -> bool {
        let n = self.geom.levels[level].entries;
        let mut buf = [0u64; 64];
        let mut i = 0;
        while i < n {
            let k = (n - i).min(buf.len());
            self.load_run(table, i, &mut buf[..k]);
            if buf[..k].iter().any(|&e| e != 0) {
                return false;
            }
            i += k;
        }
        true
    }
}
