//! The PVH start info QEMU passes in `ebx`: the memory map, the command line, the RSDP.

use crate::DMAP;

pub const MAGIC: u32 = 0x336e_c578;
pub const MAX_MAP: usize = 32;

#[derive(Clone, Copy, Debug, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the kernel copies out of the start info before it reuses low memory.
pub struct BootInfo {
    pub map: [MemEntry; MAX_MAP],
    pub map_len: usize,
    pub cmdline: [u8; 256],
    pub cmdline_len: usize,
    pub rsdp: u64,
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
    pub fn map(&self) -> &[MemEntry] {
        &self.map[..self.map_len]
    }
}

fn rd<T: Copy>(pa: u64) -> T {
    // SAFETY: the boot tables map the first 4 GiB at DMAP; QEMU places the start info there.
    unsafe { ((DMAP + pa) as *const T).read_unaligned() }
}

/// Read the start info at physical `pa`; `Err` says why it is not one.
pub fn read(pa: u64) -> Result<BootInfo, &'static str> {
    if rd::<u32>(pa) != MAGIC {
        return Err("bad PVH start info magic");
    }
    let cmd_pa: u64 = rd(pa + 24);
    let rsdp: u64 = rd(pa + 32);
    let map_pa: u64 = rd(pa + 40);
    let n: u32 = rd(pa + 48);
    let version: u32 = rd(pa + 4);
    if version < 1 || map_pa == 0 {
        return Err("PVH start info has no memory map (version 0)");
    }
    let mut bi = BootInfo {
        map: [MemEntry::default(); MAX_MAP],
        map_len: 0,
        cmdline: [0; 256],
        cmdline_len: 0,
        rsdp,
    };
    for i in 0..(n as usize).min(MAX_MAP) {
        let e = map_pa + 24 * i as u64;
        bi.map[i] = MemEntry {
            addr: rd(e),
            size: rd(e + 8),
            kind: rd(e + 16),
        };
        bi.map_len = i + 1;
    }
    if cmd_pa != 0 {
        while bi.cmdline_len < 255 {
            let b: u8 = rd(cmd_pa + bi.cmdline_len as u64);
            if b == 0 {
                break;
            }
            bi.cmdline[bi.cmdline_len] = b;
            bi.cmdline_len += 1;
        }
    }
    Ok(bi)
}

/// The APIC ids of the enabled processors in the ACPI MADT (found from the RSDP).
pub fn madt_apic_ids(rsdp: u64, out: &mut [u32]) -> Result<usize, &'static str> {
    if rsdp == 0 || rd::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return Err("no RSDP");
    }
    let rev: u8 = rd(rsdp + 15);
    let (root, wide) = if rev >= 2 && rd::<u64>(rsdp + 24) != 0 {
        (rd::<u64>(rsdp + 24), true)
    } else {
        (rd::<u32>(rsdp + 16) as u64, false)
    };
    let len: u32 = rd(root + 4);
    let esz = if wide { 8 } else { 4 };
    let mut off = 36;
    while off + esz <= len as u64 {
        let t = if wide {
            rd::<u64>(root + off)
        } else {
            rd::<u32>(root + off) as u64
        };
        off += esz;
        if rd::<[u8; 4]>(t) != *b"APIC" {
            continue;
        }
        let tlen: u32 = rd(t + 4);
        let mut p = 44;
        let mut n = 0;
        while p + 2 <= tlen as u64 {
            let kind: u8 = rd(t + p);
            let elen: u8 = rd(t + p + 1);
            if elen < 2 {
                return Err("malformed MADT entry");
            }
            if kind == 0 && rd::<u32>(t + p + 4) & 1 != 0 && n < out.len() {
                out[n] = rd::<u8>(t + p + 3) as u32;
                n += 1;
            }
            p += elen as u64;
        }
        return Ok(n);
    }
    Err("no MADT")
}
