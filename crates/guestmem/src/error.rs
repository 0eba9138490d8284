//! Error types.

use thiserror::Error;

/// A guest memory access failed. Nothing was copied when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccessError {
    /// Part of the range is not backed by any region of guest memory.
    #[error("guest range {gpa:#x}+{len:#x} is not backed by guest memory")]
    OutOfRange {
        /// First guest physical address of the access.
        gpa: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// The end of the range does not fit in a 64-bit address.
    #[error("guest range {gpa:#x}+{len:#x} overflows the address space")]
    AddressOverflow {
        /// First guest physical address of the access.
        gpa: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// A guest page number is too large to form a guest physical address.
    #[error("guest page number {gpn:#x} is beyond the address space")]
    InvalidPageNumber {
        /// The offending page number.
        gpn: u64,
    },
    /// A write (or a lock for writing) touched a region mapped read-only.
    #[error("guest memory at {gpa:#x} is read-only")]
    ReadOnly {
        /// A guest physical address inside the read-only region.
        gpa: u64,
    },
    /// A reader or writer was asked for more bytes than remain in its range.
    #[error("access of {requested} bytes exceeds the {remaining} bytes remaining in the range")]
    RangeExhausted {
        /// Bytes asked for.
        requested: usize,
        /// Bytes left in the range.
        remaining: usize,
    },
    /// The buffers may only be read (for example the data of a disk write), not written.
    #[error("the buffers are not writable")]
    NotWritable,
    /// An atomic access is not naturally aligned, in guest physical or in host memory, so it
    /// cannot be made as one access.
    #[error("atomic access of {size} bytes at guest address {gpa:#x} is misaligned")]
    Misaligned {
        /// The guest physical address of the access.
        gpa: u64,
        /// The size (and required alignment) of the access in bytes.
        size: u64,
    },
}

/// Building a [`GuestMemory`](crate::GuestMemory) failed.
#[derive(Debug, Error)]
pub enum BuildError {
    /// A region's address or length is not a multiple of the page size, or its length is 0.
    #[error("region {gpa:#x}+{len:#x} is empty or not page aligned")]
    Unaligned {
        /// Guest physical address of the region.
        gpa: u64,
        /// Length of the region in bytes.
        len: u64,
    },
    /// A region ends beyond the 64-bit address space or beyond what the host can map.
    #[error("region {gpa:#x}+{len:#x} is too large")]
    TooLarge {
        /// Guest physical address of the region.
        gpa: u64,
        /// Length of the region in bytes.
        len: u64,
    },
    /// Two regions overlap.
    #[error("region at {gpa:#x} overlaps another region")]
    Overlap {
        /// Guest physical address of the later region.
        gpa: u64,
    },
    /// `mmap` failed.
    #[error("failed to map region at {gpa:#x}")]
    Map {
        /// Guest physical address of the region.
        gpa: u64,
        /// The error `mmap` returned.
        #[source]
        source: std::io::Error,
    },
}
