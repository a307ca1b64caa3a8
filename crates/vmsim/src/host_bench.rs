//! Reference rows of this host's own Linux, for `vmsim bench`: what a real kernel takes for an
//! anonymous 4 KiB page fault and for a fork, beside what the pmap takes for its share of the
//! same work on the simulated machine.
//!
//! - page fault: `mmap` an anonymous region, touch each page, `munmap`; ns per page (the fault,
//!   the zeroing and the unmap). Ours: the pmap's `enter` of one managed 4 KiB page plus its
//!   `remove`, per page, on a machine with one CPU (the mapping work of a fault, not the rest).
//! - fork: a process with [`FORK_MIB`] MiB touched forks a child that exits at once; ns per
//!   fork, wait included. Ours: `create` + `copy` of an address space with as many managed pages
//!   mapped, then the child's `remove` and `destroy`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use vmsys::{EnterFlags, FrameList, FrameSource, PhysAddr, PmapConfig, PmapSystem, VirtAddr};
use vmsys_arch::{FormatId, Prot};
use vmsys_sim::{DetectorMode, Machine, MachineConfig};

use crate::error::CliError;

const PAGE: u64 = 4096;
/// Pages of the page-fault measurement.
pub const FAULT_PAGES: usize = 4096;
/// Touched memory of the fork measurement.
pub const FORK_MIB: usize = 16;

/// What the host took, in ns (None where it could not be measured).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostNumbers {
    pub fault_ns: Option<f64>,
    pub fork_ns: Option<f64>,
    /// The pmap's counterparts.
    pub enter_remove_ns: f64,
    pub copy_ns: f64,
}

/// ns per page of an anonymous fault on this host, over `rounds` regions.
#[cfg(unix)]
pub fn host_fault_ns(rounds: u32) -> Option<f64> {
    let len = FAULT_PAGES * PAGE as usize;
    let mut total = 0.0;
    for _ in 0..rounds {
        let start = Instant::now();
        // SAFETY: an anonymous private mapping of `len` bytes; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p.cast::<u8>();
        for i in 0..FAULT_PAGES {
            // SAFETY: inside the mapping just made, which is readable and writable.
            unsafe { base.add(i * PAGE as usize).write_volatile(1) };
        }
        // SAFETY: the mapping made above, not used after this.
        if unsafe { libc::munmap(p, len) } != 0 {
            return None;
        }
        total += start.elapsed().as_secs_f64();
    }
    Some(total * 1e9 / (rounds as f64 * FAULT_PAGES as f64))
}

/// ns per fork (child exits at once, parent waits) with `FORK_MIB` MiB touched.
#[cfg(unix)]
pub fn host_fork_ns(forks: u32) -> Option<f64> {
    let mut mem = vec![0u8; FORK_MIB << 20];
    for i in (0..mem.len()).step_by(PAGE as usize) {
        mem[i] = i as u8 | 1;
    }
    black_box(&mem);
    let start = Instant::now();
    for _ in 0..forks {
        // SAFETY: the child calls only `_exit`, which is async-signal-safe, so forking this
        // (possibly multi-threaded) process is sound.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => return None,
            // SAFETY: see above.
            0 => unsafe { libc::_exit(0) },
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                    return None;
                }
            }
        }
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / forks as f64;
    drop(mem);
    Some(ns)
}

#[cfg(not(unix))]
pub fn host_fault_ns(_rounds: u32) -> Option<f64> {
    None
}

#[cfg(not(unix))]
pub fn host_fork_ns(_forks: u32) -> Option<f64> {
    None
}

fn err(doing: &'static str) -> impl Fn(vmsys::PmapError) -> CliError {
    move |e| CliError::setup(FormatId::Amd64, format!("host bench: {doing}: {e}"))
}

/// The pmap's counterparts on amd64 (one CPU, detector off): (enter+remove ns per page, ns per
/// copy of an address space with `FORK_MIB` MiB mapped).
pub fn pmap_counterparts(rounds: u32) -> Result<(f64, f64), CliError> {
    let format = FormatId::Amd64;
    let m = Machine::new(
        MachineConfig::new(format)
            .cpus(1)
            .mem(256 << 20)
            .detector(DetectorMode::Off),
    )
    .map_err(|err| CliError::Config { format, err })?;
    let frames = Arc::new(FrameList::new(
        PhysAddr::new(1 << 20),
        PhysAddr::new(32 << 20),
    ));
    let sys = PmapSystem::bootstrap(
        m.clone(),
        frames as Arc<dyn FrameSource>,
        PmapConfig::default(),
    )
    .map_err(err("bootstrap"))?;
    // Frames start one page past 2 MiB alignment, so nothing is promoted (as a fault maps).
    let data = (64 << 20) + PAGE;
    let va0 = 0x10_0000_0000u64;
    let pages = (FORK_MIB << 20) as u64 / PAGE;
    m.run_on(0, |_| {
        sys.init_cpu();
        let p = sys.create().map_err(err("create"))?;
        let start = Instant::now();
        for _ in 0..rounds {
            for i in 0..FAULT_PAGES as u64 {
                sys.enter(
                    &p,
                    VirtAddr::new(va0 + i * PAGE),
                    PhysAddr::new(data + i * PAGE),
                    Prot::WRITE,
                    EnterFlags::MANAGED | EnterFlags::DIRTY,
                    0,
                )
                .map_err(err("enter"))?;
            }
            for i in 0..FAULT_PAGES as u64 {
                let va = va0 + i * PAGE;
                sys.remove(&p, VirtAddr::new(va), VirtAddr::new(va + PAGE))
                    .map_err(err("remove"))?;
            }
        }
        let fault = start.elapsed().as_secs_f64() * 1e9 / (rounds as f64 * FAULT_PAGES as f64);
        sys.enter_range(
            &p,
            VirtAddr::new(va0),
            PhysAddr::new(data),
            pages * PAGE,
            Prot::WRITE,
            EnterFlags::MANAGED | EnterFlags::DIRTY,
        )
        .map_err(err("enter_range"))?;
        let end = VirtAddr::new(va0 + pages * PAGE);
        sys.protect(&p, VirtAddr::new(va0), end, Prot::empty())
            .map_err(err("protect"))?;
        let start = Instant::now();
        for _ in 0..rounds {
            let child = sys.create().map_err(err("create"))?;
            let n = sys
                .copy(&child, &p, VirtAddr::new(va0), pages * PAGE)
                .map_err(err("copy"))?;
            if n != pages {
                return Err(CliError::setup(
                    format,
                    format!("host bench: copy copied {n} of {pages} pages"),
                ));
            }
            sys.remove(&child, VirtAddr::new(va0), end)
                .map_err(err("remove"))?;
            sys.destroy(child).map_err(err("destroy"))?;
        }
        let fork = start.elapsed().as_secs_f64() * 1e9 / rounds as f64;
        sys.remove(&p, VirtAddr::new(va0), end)
            .map_err(err("remove"))?;
        sys.destroy(p).map_err(err("destroy"))?;
        Ok((fault, fork))
    })
}

/// Everything, with `quick` for tests (fewer rounds).
pub fn measure(quick: bool) -> Result<HostNumbers, CliError> {
    let rounds = if quick { 1 } else { 8 };
    let (enter_remove_ns, copy_ns) = pmap_counterparts(rounds)?;
    Ok(HostNumbers {
        fault_ns: host_fault_ns(rounds),
        fork_ns: host_fork_ns(if quick { 2 } else { 50 }),
        enter_remove_ns,
        copy_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_pmap_numbers_are_positive() {
        let h = measure(true).expect("host bench");
        assert!(h.enter_remove_ns > 0.0 && h.copy_ns > 0.0, "{h:?}");
        if cfg!(target_os = "linux") {
            assert!(h.fault_ns.is_some_and(|x| x > 0.0), "{h:?}");
            assert!(h.fork_ns.is_some_and(|x| x > 0.0), "{h:?}");
        }
    }
}
