//! Guest memory: a cheap-clone handle over guest RAM, and page-list ranges over it.
//!
//! [`GuestMemory`] maps guest physical addresses (GPAs) to host memory made of one or more
//! regions: heap allocations (tests, bounce buffers), anonymous or fd-backed `mmap`s (a VMM,
//! vhost-user), or mappings owned elsewhere. Every access is bounds-checked and fails with an
//! [`AccessError`]; none panics. A handle never changes: to add or remove a region at run
//! time, build a new handle that [includes](GuestMemoryBuilder::include) the regions that
//! stay; whoever still holds the old handle (a request in flight) keeps its memory mapped.
//!
//! Guest RAM can change under us at any moment (another vCPU, a device), so this crate never
//! creates a Rust reference (`&[u8]`, `&mut [u8]`) to it. Data moves with raw pointer copies
//! into and out of host buffers, and [`GuestMemory::lock`] hands out raw addresses
//! ([`IoBuffer`], laid out like `struct iovec`) for zero-copy host I/O.
//!
//! [`PagedRange`] is a byte window over a list of guest page numbers, the shape in which a
//! device model describes a request's data; [`PagedRangeReader`] and [`PagedRangeWriter`]
//! stream through one ([`MemoryRead`], [`MemoryWrite`]).
//!
//! ```
//! use guestmem::{GuestMemory, MemoryRead, MemoryWrite, PagedRange, PAGE_SIZE};
//!
//! let mem = GuestMemory::allocate(4 * PAGE_SIZE);
//! // Bytes 100..8292 of the guest pages 3, 1 and 2, in that order.
//! let gpns = [3, 1, 2];
//! let range = PagedRange::new(100, 2 * PAGE_SIZE, &gpns).unwrap();
//! range.writer(&mem).write(&[0xab; 2 * PAGE_SIZE]).unwrap();
//! assert_eq!(mem.read_plain::<u8>(3 * PAGE_SIZE as u64 + 100).unwrap(), 0xab);
//! assert_eq!(mem.read_plain::<u8>(3 * PAGE_SIZE as u64 + 99).unwrap(), 0);
//!
//! let mut data = vec![0; 2 * PAGE_SIZE];
//! range.reader(&mem).read(&mut data).unwrap();
//! assert!(data.iter().all(|&b| b == 0xab));
//!
//! // Out of range is an error, never a panic.
//! assert!(mem.read_plain::<u64>(u64::MAX - 3).is_err());
//! ```

// This crate is where raw host memory is touched: aligned allocation, mmap/munmap and the
// pointer copies into memory shared with the guest. Every other crate builds on its safe API.
#![allow(unsafe_code)]

mod access;
mod alloc;
mod error;
mod lock;
mod memory;
mod ranges;

pub use access::{MemoryRead, MemoryWrite, PagedRangeReader, PagedRangeWriter};
pub use alloc::AlignedBuffer;
pub use error::{AccessError, BuildError};
pub use lock::{IoBuffer, LockedPages};
pub use memory::{GuestMemory, GuestMemoryBuilder};
pub use ranges::{PagedRange, PagedRangeRuns};

/// The guest page size in bytes. Guest page numbers (GPNs) count in these units.
pub const PAGE_SIZE: usize = 4096;

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// [`PAGE_SIZE`] as a `u64`, for address arithmetic.
pub const PAGE_SIZE64: u64 = PAGE_SIZE as u64;
