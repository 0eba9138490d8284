//! Error types.

use thiserror::Error;

/// A disk operation failed. Frontends map these to protocol status codes.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The request was aborted because another initiator preempted this one's reservation
    /// with PREEMPT AND ABORT.
    #[error("aborted by a preempt and abort")]
    AbortDueToPreemptAndAbort,
    /// The sector range is outside the disk, or its byte offsets are not representable.
    #[error("sector range outside the disk")]
    IllegalBlock,
    /// The request is malformed (buffers not a whole number of sectors, an invalid
    /// reservation request, ...).
    #[error("invalid request")]
    InvalidInput,
    /// The backend failed.
    #[error("i/o error")]
    Io(#[source] std::io::Error),
    /// The medium reported an error about the data itself.
    #[error("medium error: {1:?}")]
    MediumError(#[source] std::io::Error, MediumErrorDetails),
    /// The request's guest memory could not be accessed.
    #[error("guest memory access failed")]
    MemoryAccess(#[source] guestmem::AccessError),
    /// The disk, or this part of it, is read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// A persistent reservation held by another initiator forbids the request.
    #[error("reservation conflict")]
    ReservationConflict,
    /// The disk has no removable medium to eject.
    #[error("eject is not supported")]
    UnsupportedEject,
}

impl From<guestmem::AccessError> for DiskError {
    fn from(error: guestmem::AccessError) -> Self {
        Self::MemoryAccess(error)
    }
}

/// What kind of medium error a [`DiskError::MediumError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediumErrorDetails {
    /// The protection information's application tag did not match.
    ApplicationTagCheckFailed,
    /// The protection information's guard (checksum) did not match.
    GuardCheckFailed,
    /// The protection information's reference tag did not match.
    ReferenceTagCheckFailed,
    /// The data could not be read back.
    UnrecoveredReadError,
    /// The data could not be written.
    WriteFault,
}

/// A backend's geometry is invalid; returned by [`Disk::new`](crate::Disk::new).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidDisk {
    /// The logical sector size is not a power of two or is below 512.
    #[error("invalid sector size {0}: must be a power of two of at least 512")]
    InvalidSectorSize(u32),
    /// The physical sector size is not a power of two or is below the logical sector size.
    #[error("invalid physical sector size {0}: must be a power of two of at least the sector size")]
    InvalidPhysicalSectorSize(u32),
    /// The optimal unmap granularity is zero.
    #[error("optimal unmap granularity must be at least one sector")]
    InvalidOptimalUnmapSectors,
}
