//! vmem: Bonwick's resource arenas (issue 4). Filled in by the vmem work.
