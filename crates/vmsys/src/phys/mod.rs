//! Physical memory: a buddy allocator per NUMA domain ([`buddy`], after FreeBSD's `vm_phys.c`)
//! and superpage reservations ([`reserv`], after `vm_reserv.c`), both over the page array
//! ([`crate::page::PageArray`]).
//!
//! Lock order: the reservation system's lock, then one buddy domain lock. The buddy allocator
//! never calls into the reservation system; its audit takes every domain lock in domain order.

pub mod buddy;
pub mod reserv;

pub use buddy::{BuddyAllocator, DomainPolicy, PhysError, MAX_ORDER, NUM_ORDERS};
pub use reserv::{ReservError, ReservInfo, ReservStats, ReservSystem};
