//! The disk abstraction every backend implements and every frontend consumes.
//!
//! Backends (a host file, a block device, a RAM disk, decorators such as encryption or
//! striping) implement [`DiskIo`]. Frontends (virtio-blk, NVMe, SCSI emulation) never see
//! the backend type: they hold a [`Disk`], a cheap-clone handle that
//!
//! - validates the backend's geometry once, in [`Disk::new`] (sector sizes are powers of two,
//!   at least 512 bytes, physical at least logical);
//! - caches the metadata that cannot change (sector sizes, disk id, FUA, read-only, unmap
//!   behaviour) while [`sector_count`](Disk::sector_count) stays live;
//! - rejects, before the backend sees them, requests whose buffers are not whole sectors
//!   ([`DiskError::InvalidInput`]), whose end byte offset overflows or exceeds `i64::MAX`
//!   ([`DiskError::IllegalBlock`]), and writes or unmaps to a read-only disk
//!   ([`DiskError::ReadOnly`]); a zero-length request succeeds without reaching the backend;
//! - erases the backend's future types without a heap allocation per request: futures up to
//!   [`INLINE_FUTURE_SIZE`] bytes live inside the returned future itself.
//!
//! # The contract of `DiskIo`
//!
//! - Reads and writes take [`RequestBuffers`] of whole sectors; a request outside
//!   `0..sector_count()` fails with [`DiskError::IllegalBlock`] and never panics, whatever
//!   the sector number. A backend may rely on `Disk` for overflow checks but must check the
//!   range itself, since the size can change under it.
//! - `write_vectored(.., fua: true)` is durable when it completes if
//!   [`is_fua_respected`](DiskIo::is_fua_respected) says so. [`sync_cache`](DiskIo::sync_cache)
//!   makes every completed write durable: it is never a no-op on a volatile cache.
//! - [`unmap`](DiskIo::unmap) behaves as [`unmap_behavior`](DiskIo::unmap_behavior) says.
//! - [`wait_resize`](DiskIo::wait_resize) completes when the sector count differs from the
//!   count passed in; decorators forward it.
//! - [`register_memory`](DiskIo::register_memory) is a hint that requests' buffers will come
//!   from the given guest memory; decorators forward it, backends may prepare the memory for
//!   zero-copy I/O, and a failure never stops the disk.
//! - A failed request leaves no state a later read could mistake for a completed one beyond
//!   what the medium semantics allow (sectors of a failed write may hold old or new data).
//! - **Sector atomicity.** Requests on disjoint ranges never affect each other. The order of
//!   overlapping requests in flight together is unspecified, but each sector is atomic: a
//!   read racing an overlapping write or unmap returns every sector whole, as it was before
//!   or after, and two racing writes leave each sector holding one of them, never a mix
//!   (as real disks promise for one logical block, and some guests rely on). Backends that
//!   copy through the host page cache, which does not promise it, order overlapping
//!   requests with a [`range_lock::RangeLock`]; `O_DIRECT` leaves it to the device.
//!   Decorators keep it: encryption writes each sector's ciphertext in one request, a
//!   striped sector lives on one member, a layered read takes each sector from one layer.
//!   `disk_conformance::sector_atomicity` checks it for every backend.
//!
//! # Threads
//!
//! A request's future may be polled on any thread. A thread that already waits for events
//! (a device queue's kick loop) can also drive its disks' I/O itself, with no completion
//! thread in between: see [`io_thread`].
//!
//! ```
//! use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
//! use request_buffers::{OwnedRequestBuffers, RequestBuffers};
//!
//! /// A disk of zeros that ignores writes.
//! struct ZeroDisk;
//!
//! impl DiskIo for ZeroDisk {
//!     fn disk_type(&self) -> &str { "zero" }
//!     fn sector_count(&self) -> u64 { 1024 }
//!     fn sector_size(&self) -> u32 { 512 }
//!     fn disk_id(&self) -> Option<[u8; 16]> { None }
//!     fn physical_sector_size(&self) -> u32 { 4096 }
//!     fn is_fua_respected(&self) -> bool { true }
//!     fn is_read_only(&self) -> bool { false }
//!     async fn read_vectored(&self, buffers: &RequestBuffers<'_>, sector: u64) -> Result<(), DiskError> {
//!         disk_backend::check_range(self, sector, buffers.len())?;
//!         guestmem::MemoryWrite::zero(&mut buffers.writer(), buffers.len())?;
//!         Ok(())
//!     }
//!     async fn write_vectored(&self, buffers: &RequestBuffers<'_>, sector: u64, _fua: bool) -> Result<(), DiskError> {
//!         disk_backend::check_range(self, sector, buffers.len())
//!     }
//!     async fn sync_cache(&self) -> Result<(), DiskError> { Ok(()) }
//!     async fn unmap(&self, sector: u64, count: u64, _block_level_only: bool) -> Result<(), DiskError> {
//!         disk_backend::check_unmap_range(self, sector, count)
//!     }
//!     fn unmap_behavior(&self) -> UnmapBehavior { UnmapBehavior::Zeroes }
//! }
//!
//! let disk = Disk::new(ZeroDisk).unwrap();
//! let buf = OwnedRequestBuffers::new(4096);
//! futures::executor::block_on(async {
//!     disk.read_vectored(&buf.buffers(true), 1016).await.unwrap();
//!     // One sector past the end, and a sector whose byte offset overflows.
//!     assert!(matches!(disk.read_vectored(&buf.buffers(true), 1017).await, Err(DiskError::IllegalBlock)));
//!     assert!(matches!(disk.read_vectored(&buf.buffers(true), u64::MAX).await, Err(DiskError::IllegalBlock)));
//! });
//! ```

#![forbid(unsafe_code)]

mod disk;
mod error;
pub mod host_file;
#[cfg(unix)]
pub mod io_thread;
pub mod pr;
pub mod range_lock;
pub mod resolve;
pub mod sync_wrapper;

pub use disk::{Disk, INLINE_FUTURE_SIZE};
pub use error::{DiskError, InvalidDisk, MediumErrorDetails};
pub use request_buffers::GuestMemory;

use request_buffers::RequestBuffers;
use std::future::Future;

/// What happens to sectors that are unmapped (trimmed, discarded, deallocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmapBehavior {
    /// Unmapped sectors read back as zeros.
    Zeroes,
    /// Unmapped sectors read back as unspecified data (until written again).
    Unspecified,
    /// Unmap does nothing; a frontend should not advertise discard.
    Ignored,
}

/// Disk metadata and I/O: the trait every disk backend implements.
///
/// Frontends use it through [`Disk`]. See the [crate documentation](crate) for the contract.
pub trait DiskIo: 'static + Send + Sync {
    /// A short name of the backend type, for diagnostics (`"file"`, `"ram"`, `"crypt"`).
    fn disk_type(&self) -> &str;

    /// The current sector count. It may change at runtime; a backend whose size can change
    /// implements [`wait_resize`](Self::wait_resize).
    fn sector_count(&self) -> u64;

    /// The logical sector size in bytes: a power of two, at least 512. Never changes.
    fn sector_size(&self) -> u32;

    /// A 16-byte identifier of the disk, if it has a natural one. Never changes.
    fn disk_id(&self) -> Option<[u8; 16]>;

    /// The physical sector size in bytes: a power of two, at least the logical sector size.
    /// Never changes.
    fn physical_sector_size(&self) -> u32;

    /// Whether `fua` on [`write_vectored`](Self::write_vectored) makes the write durable
    /// before it completes. Never changes.
    fn is_fua_respected(&self) -> bool;

    /// Whether the disk refuses writes and unmaps with [`DiskError::ReadOnly`]. Never
    /// changes.
    fn is_read_only(&self) -> bool;

    /// Reads `buffers.len()` bytes (whole sectors) starting at `sector` into `buffers`.
    fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Writes `buffers` (whole sectors) starting at `sector`. With `fua`, the data is durable
    /// when this completes if [`is_fua_respected`](Self::is_fua_respected).
    fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Makes every completed write durable (SCSI SYNCHRONIZE CACHE, NVMe FLUSH).
    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Unmaps `count` sectors starting at `sector`. `block_level_only` asks the backend to
    /// unmap only at its own level, not in anything it is layered over.
    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// What [`unmap`](Self::unmap) does to the sectors. Never changes.
    fn unmap_behavior(&self) -> UnmapBehavior;

    /// The unmap granularity the backend prefers, in sectors. Never changes.
    fn optimal_unmap_sectors(&self) -> u32 {
        1
    }

    /// Persistent reservation support, if the backend has it.
    fn pr(&self) -> Option<&dyn pr::PersistentReservation> {
        None
    }

    /// Ejects the medium. The default fails with [`DiskError::UnsupportedEject`].
    fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        async { Err(DiskError::UnsupportedEject) }
    }

    /// Completes with the new sector count once it differs from `sector_count`. The default
    /// never completes: the backend's size never changes.
    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        let _ = sector_count;
        std::future::pending()
    }

    /// Tells the backend that requests' buffers will come from `memory` (a frontend calls it
    /// when it gets guest memory, such as a virtio device's activation), so that it can
    /// prepare that memory for zero-copy I/O once instead of per request: a
    /// `BlockDeviceDisk` opened with fixed buffers registers it with its io_uring. Replaces
    /// an earlier call's memory; an empty [`GuestMemory`] forgets it.
    ///
    /// A hint: buffers from any other memory still work, and on error the disk works as
    /// before (the error says why the memory could not be used). The default does nothing;
    /// decorators forward it to the disks below ([`forward_disk_metadata!`] does).
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        let _ = memory;
        Ok(())
    }
}

/// Implements the [`DiskIo`] metadata methods that a decorator passes through unchanged
/// (`sector_count`, `sector_size`, `disk_id`, `physical_sector_size`, `is_fua_respected`,
/// `is_read_only`), and [`register_memory`](DiskIo::register_memory), by forwarding them to
/// the expression `$inner`, written in terms of `self`.
/// Use it inside `impl DiskIo for ...`, and write the methods the decorator changes by hand.
///
/// ```
/// use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior, forward_disk_metadata};
/// use request_buffers::RequestBuffers;
///
/// /// Counts reads, and is otherwise its inner disk.
/// struct Counting {
///     inner: Disk,
///     reads: std::sync::atomic::AtomicU64,
/// }
///
/// impl DiskIo for Counting {
///     forward_disk_metadata!(self.inner);
///
///     fn disk_type(&self) -> &str { "counting" }
///     async fn read_vectored(&self, buffers: &RequestBuffers<'_>, sector: u64) -> Result<(), DiskError> {
///         self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         self.inner.read_vectored(buffers, sector).await
///     }
///     async fn write_vectored(&self, buffers: &RequestBuffers<'_>, sector: u64, fua: bool) -> Result<(), DiskError> {
///         self.inner.write_vectored(buffers, sector, fua).await
///     }
///     async fn sync_cache(&self) -> Result<(), DiskError> { self.inner.sync_cache().await }
///     async fn unmap(&self, sector: u64, count: u64, block_level_only: bool) -> Result<(), DiskError> {
///         self.inner.unmap(sector, count, block_level_only).await
///     }
///     fn unmap_behavior(&self) -> UnmapBehavior { self.inner.unmap_behavior() }
/// }
/// ```
#[macro_export]
macro_rules! forward_disk_metadata {
    ($self:ident . $($inner:tt)+) => {
        fn sector_count(&$self) -> u64 {
            $crate::DiskIo::sector_count(&$self.$($inner)+)
        }

        fn sector_size(&$self) -> u32 {
            $crate::DiskIo::sector_size(&$self.$($inner)+)
        }

        fn disk_id(&$self) -> Option<[u8; 16]> {
            $crate::DiskIo::disk_id(&$self.$($inner)+)
        }

        fn physical_sector_size(&$self) -> u32 {
            $crate::DiskIo::physical_sector_size(&$self.$($inner)+)
        }

        fn is_fua_respected(&$self) -> bool {
            $crate::DiskIo::is_fua_respected(&$self.$($inner)+)
        }

        fn is_read_only(&$self) -> bool {
            $crate::DiskIo::is_read_only(&$self.$($inner)+)
        }

        fn register_memory(
            &$self,
            memory: &$crate::GuestMemory,
        ) -> Result<(), $crate::DiskError> {
            $crate::DiskIo::register_memory(&$self.$($inner)+, memory)
        }
    };
}

/// A shared backend is a backend: the owner can keep a handle (to resize it, inject faults,
/// inspect it) while a [`Disk`] wraps it.
impl<T: DiskIo> DiskIo for std::sync::Arc<T> {
    fn disk_type(&self) -> &str {
        (**self).disk_type()
    }

    fn sector_count(&self) -> u64 {
        (**self).sector_count()
    }

    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        (**self).disk_id()
    }

    fn physical_sector_size(&self) -> u32 {
        (**self).physical_sector_size()
    }

    fn is_fua_respected(&self) -> bool {
        (**self).is_fua_respected()
    }

    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }

    fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).read_vectored(buffers, sector)
    }

    fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).write_vectored(buffers, sector, fua)
    }

    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).sync_cache()
    }

    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).unmap(sector, count, block_level_only)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        (**self).unmap_behavior()
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        (**self).optimal_unmap_sectors()
    }

    fn pr(&self) -> Option<&dyn pr::PersistentReservation> {
        (**self).pr()
    }

    fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).eject()
    }

    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        (**self).wait_resize(sector_count)
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        (**self).register_memory(memory)
    }
}

/// Checks that a request of `len_bytes` at `sector` lies inside `disk`, for backends to call
/// at the top of `read_vectored`/`write_vectored`. Fails with [`DiskError::IllegalBlock`]
/// when it does not and [`DiskError::InvalidInput`] when `len_bytes` is not whole sectors.
/// Never overflows, whatever the inputs.
pub fn check_range(
    disk: &(impl DiskIo + ?Sized),
    sector: u64,
    len_bytes: usize,
) -> Result<(), DiskError> {
    let sector_size = disk.sector_size() as usize;
    if !len_bytes.is_multiple_of(sector_size) {
        return Err(DiskError::InvalidInput);
    }
    check_unmap_range(disk, sector, (len_bytes / sector_size) as u64)
}

/// Checks that `count` sectors at `sector` lie inside `disk` (see [`check_range`]).
pub fn check_unmap_range(
    disk: &(impl DiskIo + ?Sized),
    sector: u64,
    count: u64,
) -> Result<(), DiskError> {
    match sector.checked_add(count) {
        Some(end) if end <= disk.sector_count() => Ok(()),
        _ => Err(DiskError::IllegalBlock),
    }
}
