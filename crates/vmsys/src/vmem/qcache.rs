//! Quantum caches: Bonwick's magazine layer in front of the arena.
//!
//! Small allocations (up to `qcache_max`) dominate most arenas, and each one through the arena
//! takes the arena lock and splits and coalesces boundary tags. A quantum cache keeps freed
//! segments of one size (a multiple of the quantum) in per-CPU *magazines* (fixed arrays of
//! addresses), so an alloc or free on a CPU normally touches only that CPU's cache line and
//! lock. Each CPU has a `loaded` and a `previous` magazine: alloc pops from `loaded`, free pushes
//! on it; when `loaded` is empty (alloc) or full (free) and `previous` is the opposite, the two
//! swap, so a CPU alternating alloc and free never leaves its own cache. Only when both are
//! unusable does it exchange a magazine with the *depot* (lists of full and of empty
//! magazines, one lock per cache). A miss on an empty depot goes to the arena.
//!
//! The arena reaps (returns every cached segment) on demand and when it is exhausted.
//!
//! Checked frees without the arena lock: when the arena verifies quantum-cache frees, each CPU
//! cache also keeps a small *outstanding set*: the segments it handed out that have not come
//! back. A segment in a magazine or in an outstanding set is marked cached in the arena (its
//! boundary tag says "owned by the cache layer"); the set says which of those are with callers.
//! A free that finds its address in this CPU's set is valid (allocated, this size, not free)
//! and goes straight into the magazine; anything else takes the arena's checked slow path
//! (see `Arena::free_on`). When a set is full its oldest entry is evicted: unmarked in the
//! arena (arena lock taken inside the CPU lock, the one place the two nest, always in that
//! order) so the arena tracks it again.

use alloc::boxed::Box;
use alloc::vec::Vec;
use spin::Mutex;

/// Rounds per magazine. Bonwick tunes it per cache; a fixed size keeps the magazine one
/// allocation of 128 bytes.
pub(crate) const MAG_ROUNDS: usize = 15;

pub(crate) struct Magazine {
    n: usize,
    rounds: [u64; MAG_ROUNDS],
}

impl Magazine {
    fn empty() -> Box<Magazine> {
        Box::new(Magazine {
            n: 0,
            rounds: [0; MAG_ROUNDS],
        })
    }

    fn drain_into(&mut self, out: &mut Vec<u64>) {
        out.extend_from_slice(&self.rounds[..self.n]);
        self.n = 0;
    }
}

/// Entries in a CPU's outstanding set.
pub(crate) const OUT_MAX: usize = 16;

struct CpuCache {
    loaded: Box<Magazine>,
    previous: Box<Magazine>,
    /// Elementary steps done in this cache (magazine operations and depot exchanges).
    work: u64,
    /// Outstanding set (checked caches only): `out[..nout]`, oldest first.
    nout: usize,
    out: [u64; OUT_MAX],
}

impl CpuCache {
    /// Where `addr` is in the outstanding set (newest first: a pair frees what it just got).
    #[inline]
    fn find_out(&mut self, addr: u64) -> Option<usize> {
        let mut k = self.nout;
        while k > 0 {
            k -= 1;
            self.work += 1;
            if self.out[k] == addr {
                return Some(k);
            }
        }
        None
    }

    #[inline]
    fn remove_out(&mut self, k: usize) {
        let n = self.nout;
        self.out.copy_within(k + 1..n, k);
        self.nout = n - 1;
    }

    /// Pop a round from the loaded magazine (the caller checked it is not empty).
    #[inline]
    fn pop(&mut self) -> u64 {
        self.loaded.n -= 1;
        self.loaded.rounds[self.loaded.n]
    }
}

/// One CPU's cache on its own cache line, so that CPUs do not false-share.
#[repr(align(64))]
struct Padded<T>(T);

/// Magazines move between CPUs and the depot by pointer, so they stay boxed in the lists.
#[allow(clippy::vec_box)]
struct Depot {
    full: Vec<Box<Magazine>>,
    empty: Vec<Box<Magazine>>,
}

pub(crate) struct QCache {
    pub size: u64,
    cpus: Box<[Padded<Mutex<CpuCache>>]>,
    depot: Mutex<Depot>,
}

impl QCache {
    pub fn new(size: u64, ncpu: usize) -> QCache {
        let cpus = (0..ncpu)
            .map(|_| {
                Padded(Mutex::new(CpuCache {
                    loaded: Magazine::empty(),
                    previous: Magazine::empty(),
                    work: 0,
                    nout: 0,
                    out: [0; OUT_MAX],
                }))
            })
            .collect();
        QCache {
            size,
            cpus,
            depot: Mutex::new(Depot {
                full: Vec::new(),
                empty: Vec::new(),
            }),
        }
    }

    /// A cached segment for `cpu`, or `None` (the caller goes to the arena). With `track`,
    /// the segment is recorded in the CPU's outstanding set; if the set is full, its oldest
    /// entry is passed to `evict` (under the CPU lock), which must unmark it in the arena.
    #[inline]
    pub fn alloc(&self, cpu: usize, track: bool, evict: impl FnOnce(u64)) -> Option<u64> {
        let mut c = self.cpus[cpu].0.lock();
        loop {
            c.work += 1;
            if c.loaded.n > 0 {
                let a = c.pop();
                if track {
                    if c.nout == OUT_MAX {
                        evict(c.out[0]);
                        c.remove_out(0);
                    }
                    let n = c.nout;
                    c.out[n] = a;
                    c.nout = n + 1;
                }
                return Some(a);
            }
            if c.previous.n > 0 {
                let c = &mut *c;
                core::mem::swap(&mut c.loaded, &mut c.previous);
                continue;
            }
            let mut d = self.depot.lock();
            c.work += 1;
            match d.full.pop() {
                Some(full) => {
                    // previous is empty: give it to the depot, keep loaded (empty) as previous.
                    let c = &mut *c;
                    let empty = core::mem::replace(&mut c.previous, full);
                    d.empty.push(empty);
                    core::mem::swap(&mut c.loaded, &mut c.previous);
                }
                None => return None,
            }
        }
    }

    /// The checked fast path: if `addr` is in `cpu`'s outstanding set, take it out and cache
    /// it (true); otherwise change nothing (false: the caller checks with the arena).
    #[inline]
    pub fn free_tracked(&self, cpu: usize, addr: u64) -> bool {
        let mut c = self.cpus[cpu].0.lock();
        match c.find_out(addr) {
            Some(k) => {
                c.remove_out(k);
                self.push(&mut c, addr);
                true
            }
            None => false,
        }
    }

    /// Take `addr` out of whichever CPU's outstanding set holds it (a checked free on another
    /// CPU than the one that allocated it, or a free that bypasses the cache).
    pub fn claim(&self, addr: u64) -> bool {
        self.cpus.iter().any(|p| {
            let mut c = p.0.lock();
            match c.find_out(addr) {
                Some(k) => {
                    c.remove_out(k);
                    true
                }
                None => false,
            }
        })
    }

    /// Cache `addr` on `cpu`. Never fails: if the depot has no empty magazine a new one is
    /// allocated (the only heap use, and only while the cache's working set grows).
    #[inline]
    pub fn free(&self, cpu: usize, addr: u64) {
        let mut c = self.cpus[cpu].0.lock();
        self.push(&mut c, addr);
    }

    #[inline]
    fn push(&self, c: &mut CpuCache, addr: u64) {
        loop {
            c.work += 1;
            if c.loaded.n < MAG_ROUNDS {
                let n = c.loaded.n;
                c.loaded.rounds[n] = addr;
                c.loaded.n += 1;
                return;
            }
            if c.previous.n < MAG_ROUNDS {
                core::mem::swap(&mut c.loaded, &mut c.previous);
                continue;
            }
            let mut d = self.depot.lock();
            c.work += 1;
            let empty = d.empty.pop().unwrap_or_else(Magazine::empty);
            let full = core::mem::replace(&mut c.previous, empty);
            d.full.push(full);
            core::mem::swap(&mut c.loaded, &mut c.previous);
        }
    }

    /// Take every cached segment out (into `out`); with `free_magazines`, also drop the empty
    /// magazines the depot holds.
    pub fn reap(&self, out: &mut Vec<u64>, free_magazines: bool) {
        for p in self.cpus.iter() {
            let mut c = p.0.lock();
            c.loaded.drain_into(out);
            c.previous.drain_into(out);
        }
        let mut d = self.depot.lock();
        while let Some(mut m) = d.full.pop() {
            m.drain_into(out);
            d.empty.push(m);
        }
        if free_magazines {
            d.empty = Vec::new();
        }
    }

    /// Segments cached, and the work counter, summed over CPUs (not atomic across CPUs).
    pub fn counts(&self) -> (u64, u64) {
        let mut n = 0;
        let mut w = 0;
        for p in self.cpus.iter() {
            let c = p.0.lock();
            n += (c.loaded.n + c.previous.n) as u64;
            w += c.work;
        }
        let d = self.depot.lock();
        n += d.full.iter().map(|m| m.n as u64).sum::<u64>();
        (n, w)
    }

    /// Every cached address (for the audit), and into `outstanding` every address in an
    /// outstanding set.
    pub fn contents(
        &self,
        out: &mut Vec<u64>,
        outstanding: &mut Vec<u64>,
    ) -> Result<(), alloc::string::String> {
        for (cpu, p) in self.cpus.iter().enumerate() {
            let c = p.0.lock();
            if c.nout > OUT_MAX {
                return Err(alloc::format!(
                    "qcache {}: cpu {cpu} outstanding set overfull",
                    self.size
                ));
            }
            outstanding.extend_from_slice(&c.out[..c.nout]);
            for m in [&c.loaded, &c.previous] {
                if m.n > MAG_ROUNDS {
                    return Err(alloc::format!(
                        "qcache {}: cpu {cpu} magazine overfull",
                        self.size
                    ));
                }
                out.extend_from_slice(&m.rounds[..m.n]);
            }
        }
        let d = self.depot.lock();
        for m in &d.full {
            if m.n != MAG_ROUNDS {
                return Err(alloc::format!(
                    "qcache {}: depot 'full' magazine has {}",
                    self.size,
                    m.n
                ));
            }
            out.extend_from_slice(&m.rounds[..m.n]);
        }
        if d.empty.iter().any(|m| m.n != 0) {
            return Err(alloc::format!(
                "qcache {}: depot 'empty' magazine not empty",
                self.size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magazines_round_trip_through_the_depot() {
        let q = QCache::new(4096, 2);
        assert_eq!(q.alloc(0, false, |_| ()), None);
        // More than two magazines' worth: forces full magazines into the depot.
        for k in 0..100u64 {
            q.free(0, k * 4096);
        }
        assert_eq!(q.counts().0, 100);
        // CPU 1 takes full magazines from the depot.
        let mut got = Vec::new();
        while let Some(a) = q.alloc(1, false, |_| ()) {
            got.push(a);
        }
        // CPU 0's own two magazines stay with CPU 0.
        assert!(got.len() >= 100 - 2 * MAG_ROUNDS);
        let mut rest = Vec::new();
        q.reap(&mut rest, true);
        got.extend(rest);
        got.sort_unstable();
        assert_eq!(got, (0..100u64).map(|k| k * 4096).collect::<Vec<_>>());
        assert_eq!(q.counts().0, 0);
    }

    #[test]
    fn outstanding_sets_track_what_went_out_and_evict_the_oldest() {
        let q = QCache::new(4096, 2);
        for k in 0..(OUT_MAX as u64 + 4) {
            q.free(0, k * 4096);
        }
        let mut evicted = Vec::new();
        let got: Vec<u64> = (0..OUT_MAX + 2)
            .map(|_| q.alloc(0, true, |x| evicted.push(x)).unwrap())
            .collect();
        // The two oldest were evicted, in order.
        assert_eq!(evicted, got[..2]);
        // Fast path only for what the set holds, and only once.
        assert!(!q.free_tracked(0, got[0]));
        assert!(q.free_tracked(0, got[5]));
        assert!(!q.free_tracked(0, got[5]));
        // Another CPU's free claims it from CPU 0's set.
        assert!(!q.free_tracked(1, got[6]));
        assert!(q.claim(got[6]));
        assert!(!q.claim(got[6]));
        let (mut cached, mut out) = (Vec::new(), Vec::new());
        q.contents(&mut cached, &mut out).unwrap();
        assert_eq!(out.len(), OUT_MAX - 2);
    }
}
