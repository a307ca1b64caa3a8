//! Hand-built page tables for tests, benchmarks and the foundation demo.
//!
//! This is scaffolding, not the pmap: a bump allocator of table pages and a function that writes
//! leaf entries, encoded with `vmsys-arch`'s format tables and stored through the machine's
//! `Platform` page-table stores (so the arm64 break-before-make check sees them). Because the
//! walker decodes the same entries independently, every test that maps through this kit also
//! checks `vmsys-arch`'s encodings against the manuals' walker.

use std::fmt;
use std::sync::Arc;

use vmsys::arch::{CacheMode, Entry, Format, FormatId, Prot, PteFlags};
use vmsys::platform::{IpiMessage, Platform, TagSel, TlbInval};
use vmsys::{PhysAddr, VirtAddr};

use crate::machine::Machine;

/// Install, for `vector`, the x86 shootdown handler of the tests and the demo: the CPU that
/// takes the IPI invalidates the page in `args[0]` locally (INVLPG). The handler holds the
/// machine weakly: the machine owns its handlers, so a strong reference would leak it.
pub fn install_shootdown_handler(m: &Arc<Machine>, vector: u8) {
    let weak = Arc::downgrade(m);
    m.set_ipi_handler(
        vector,
        Arc::new(move |msg: &IpiMessage| {
            if let Some(m) = weak.upgrade() {
                m.tlb_invalidate_local(TlbInval::Page {
                    va: VirtAddr::new(msg.args[0]),
                    tag: TagSel::Current,
                    leaf_only: false,
                });
            }
        }),
    );
}

/// Why a hand-built mapping could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KitError {
    /// No format level maps pages of this size.
    NoSuchSize(u64),
    /// A leaf already covers part of the range at a higher level.
    LeafInTheWay { va: u64, level: usize },
    /// The table-page pool is exhausted.
    OutOfTablePages,
    /// The encoder refused the entry.
    Encode(String),
}

impl fmt::Display for KitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KitError::NoSuchSize(s) => write!(f, "no leaf level maps {s:#x}-byte pages"),
            KitError::LeafInTheWay { va, level } => {
                write!(f, "a leaf at level {level} already covers {va:#x}")
            }
            KitError::OutOfTablePages => write!(f, "out of table pages"),
            KitError::Encode(e) => write!(f, "encoding refused: {e}"),
        }
    }
}

impl std::error::Error for KitError {}

/// A pool of page-table pages and the helpers to map through them.
pub struct Kit<'m> {
    pub m: &'m Machine,
    pub fmt: &'static Format,
    next: u64,
    end: u64,
}

impl<'m> Kit<'m> {
    /// Table pages come from `[pool_start, pool_end)` of physical memory.
    pub fn new(m: &'m Machine, pool_start: u64, pool_end: u64) -> Self {
        Kit {
            m,
            fmt: m.config().format.format(),
            next: pool_start,
            end: pool_end,
        }
    }

    /// The format being built.
    pub fn format_id(&self) -> FormatId {
        self.fmt.id
    }

    /// A zeroed 4 KiB page from the pool.
    pub fn alloc_page(&mut self) -> Result<u64, KitError> {
        if self.next + 4096 > self.end {
            return Err(KitError::OutOfTablePages);
        }
        let pa = self.next;
        self.next += 4096;
        self.m.phys_zero(PhysAddr::new(pa), 4096);
        Ok(pa)
    }

    /// A new, empty root table.
    pub fn new_root(&mut self) -> Result<u64, KitError> {
        self.alloc_page()
    }

    /// Read the entry at physical address `pa`.
    pub fn load(&self, pa: u64) -> u64 {
        if self.fmt.entry_bytes() == 4 {
            self.m.pt_load32(PhysAddr::new(pa)) as u64
        } else {
            self.m.pt_load64(PhysAddr::new(pa))
        }
    }

    /// Write the entry at physical address `pa` (through the platform's page-table store).
    pub fn store(&self, pa: u64, raw: u64) {
        if self.fmt.entry_bytes() == 4 {
            self.m.pt_store32(PhysAddr::new(pa), raw as u32)
        } else {
            self.m.pt_store64(PhysAddr::new(pa), raw)
        }
    }

    /// The physical address of the entry for `va` in the table at `table_pa` of `level`.
    pub fn slot(&self, table_pa: u64, level: usize, va: u64) -> u64 {
        table_pa + (self.fmt.index(va, level) * self.fmt.entry_bytes()) as u64
    }

    /// The leaf level for pages of `size` bytes.
    pub fn level_for(&self, size: u64) -> Result<usize, KitError> {
        self.fmt
            .level_for_size(size)
            .ok_or(KitError::NoSuchSize(size))
    }

    /// The physical address of the entry at `level` for `va`, creating the tables above it.
    pub fn entry_slot(&mut self, root: u64, va: u64, level: usize) -> Result<u64, KitError> {
        let mut table = root;
        for l in 0..level {
            let slot = self.slot(table, l, va);
            match self.fmt.decode(self.load(slot), l) {
                Entry::Table { pa } => table = pa,
                Entry::Invalid => {
                    let t = self.alloc_page()?;
                    let raw = self
                        .fmt
                        .make_table(t, l)
                        .map_err(|e| KitError::Encode(format!("{e:?}")))?;
                    self.store(slot, raw);
                    table = t;
                }
                _ => return Err(KitError::LeafInTheWay { va, level: l }),
            }
        }
        Ok(self.slot(table, level, va))
    }

    /// The slot of the entry at `level` for `va` if the tables above it exist.
    pub fn find_slot(&self, root: u64, va: u64, level: usize) -> Option<u64> {
        let mut table = root;
        for l in 0..level {
            match self.fmt.decode(self.load(self.slot(table, l, va)), l) {
                Entry::Table { pa } => table = pa,
                _ => return None,
            }
        }
        Some(self.slot(table, level, va))
    }

    /// Encode a leaf of `size` bytes.
    pub fn leaf(&self, pa: u64, size: u64, prot: Prot, flags: PteFlags) -> Result<u64, KitError> {
        let level = self.level_for(size)?;
        self.fmt
            .make_leaf(pa, level, prot, flags, CacheMode::WriteBack)
            .map_err(|e| KitError::Encode(format!("{e:?}")))
    }

    /// Map `[va, va + size)` to `pa` with one leaf of `size` bytes.
    pub fn map(
        &mut self,
        root: u64,
        va: u64,
        pa: u64,
        size: u64,
        prot: Prot,
        flags: PteFlags,
    ) -> Result<u64, KitError> {
        let level = self.level_for(size)?;
        let raw = self.leaf(pa, size, prot, flags)?;
        let slot = self.entry_slot(root, va, level)?;
        self.store(slot, raw);
        Ok(slot)
    }

    /// Map `pages` 4 KiB pages from `va` to consecutive frames from `pa`.
    pub fn map_range(
        &mut self,
        root: u64,
        va: u64,
        pa: u64,
        pages: u64,
        prot: Prot,
        flags: PteFlags,
    ) -> Result<(), KitError> {
        for i in 0..pages {
            self.map(root, va + i * 4096, pa + i * 4096, 4096, prot, flags)?;
        }
        Ok(())
    }

    /// A VA for tests: in the user half (`user`) or the kernel half, `offset` bytes in.
    pub fn test_va(&self, user: bool, offset: u64) -> u64 {
        let r = if user {
            self.fmt.user_range(Default::default())
        } else {
            self.fmt.kernel_range(Default::default())
        };
        // Keep clear of address 0 and of the kernel half's first, often special, gigabyte.
        let base = if user {
            0x4000_0000
        } else {
            r.start() + 0x1000_0000
        };
        assert!(
            offset <= r.end() - base,
            "test VA offset {offset:#x} beyond the half"
        );
        base + offset
    }
}
