//! `Disk`: the validated, type-erased, cheap-clone handle over a `DiskIo`.

use crate::pr::PersistentReservation;
use crate::{DiskError, DiskIo, InvalidDisk, UnmapBehavior};
use futures::future::{Either, Ready, ready};
use request_buffers::{GuestMemory, RequestBuffers};
use stackfuture::StackFuture;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The largest backend future, in bytes, that [`Disk`] stores inline. A larger one is boxed
/// (one heap allocation for that request).
///
/// Leaf backends' futures are small (`FileDisk`: 224 bytes, most of it the wait for an
/// overlapping request; a layered read 496). A decorator that awaits an inner `Disk` holds
/// that inner future, so it exceeds this size and is boxed at its own level: a
/// decorator that wants to avoid that can be generic over its inner `DiskIo` instead.
pub const INLINE_FUTURE_SIZE: usize = 512;

type IoFuture<'a> = StackFuture<'a, Result<(), DiskError>, INLINE_FUTURE_SIZE>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`DiskIo`] that `Disk` stores.
trait DynDisk: Send + Sync {
    fn disk_type(&self) -> &str;
    fn sector_count(&self) -> u64;
    fn pr(&self) -> Option<&dyn PersistentReservation>;
    fn read_vectored<'a>(&'a self, buffers: &'a RequestBuffers<'a>, sector: u64) -> IoFuture<'a>;
    fn write_vectored<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        fua: bool,
    ) -> IoFuture<'a>;
    fn sync_cache(&self) -> IoFuture<'_>;
    fn unmap(&self, sector: u64, count: u64, block_level_only: bool) -> IoFuture<'_>;
    fn eject(&self) -> BoxFuture<'_, Result<(), DiskError>>;
    fn wait_resize(&self, sector_count: u64) -> BoxFuture<'_, u64>;
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError>;
}

impl<T: DiskIo> DynDisk for T {
    fn disk_type(&self) -> &str {
        DiskIo::disk_type(self)
    }

    fn sector_count(&self) -> u64 {
        DiskIo::sector_count(self)
    }

    fn pr(&self) -> Option<&dyn PersistentReservation> {
        DiskIo::pr(self)
    }

    fn read_vectored<'a>(&'a self, buffers: &'a RequestBuffers<'a>, sector: u64) -> IoFuture<'a> {
        StackFuture::from_or_box(DiskIo::read_vectored(self, buffers, sector))
    }

    fn write_vectored<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        fua: bool,
    ) -> IoFuture<'a> {
        StackFuture::from_or_box(DiskIo::write_vectored(self, buffers, sector, fua))
    }

    fn sync_cache(&self) -> IoFuture<'_> {
        StackFuture::from_or_box(DiskIo::sync_cache(self))
    }

    fn unmap(&self, sector: u64, count: u64, block_level_only: bool) -> IoFuture<'_> {
        StackFuture::from_or_box(DiskIo::unmap(self, sector, count, block_level_only))
    }

    fn eject(&self) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(DiskIo::eject(self))
    }

    fn wait_resize(&self, sector_count: u64) -> BoxFuture<'_, u64> {
        Box::pin(DiskIo::wait_resize(self, sector_count))
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        DiskIo::register_memory(self, memory)
    }
}

struct DiskInner<T: ?Sized> {
    sector_size: u32,
    sector_shift: u32,
    physical_sector_size: u32,
    disk_id: Option<[u8; 16]>,
    is_fua_respected: bool,
    is_read_only: bool,
    unmap_behavior: UnmapBehavior,
    optimal_unmap_sectors: u32,
    disk: T,
}

/// An asynchronous block device: a validated, type-erased, cheap-clone handle over a
/// [`DiskIo`] backend.
///
/// See the [crate documentation](crate) for what it checks and caches.
#[derive(Clone)]
pub struct Disk(Arc<DiskInner<dyn DynDisk>>);

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("disk_type", &self.disk_type())
            .field("sector_size", &self.0.sector_size)
            .field("sector_count", &self.sector_count())
            .field("read_only", &self.0.is_read_only)
            .finish()
    }
}

/// The outcome of validating a request: run it, or finish at once with this result.
type Checked<'a> = Either<IoFuture<'a>, Ready<Result<(), DiskError>>>;

impl Disk {
    /// Wraps `disk`, validating and caching its immutable metadata.
    pub fn new(disk: impl DiskIo) -> Result<Self, InvalidDisk> {
        let sector_size = disk.sector_size();
        if sector_size < 512 || !sector_size.is_power_of_two() {
            return Err(InvalidDisk::InvalidSectorSize(sector_size));
        }
        let physical_sector_size = disk.physical_sector_size();
        if physical_sector_size < sector_size || !physical_sector_size.is_power_of_two() {
            return Err(InvalidDisk::InvalidPhysicalSectorSize(physical_sector_size));
        }
        let optimal_unmap_sectors = disk.optimal_unmap_sectors();
        if optimal_unmap_sectors == 0 {
            return Err(InvalidDisk::InvalidOptimalUnmapSectors);
        }
        Ok(Self(Arc::new(DiskInner {
            sector_size,
            sector_shift: sector_size.trailing_zeros(),
            physical_sector_size,
            disk_id: disk.disk_id(),
            is_fua_respected: disk.is_fua_respected(),
            is_read_only: disk.is_read_only(),
            unmap_behavior: disk.unmap_behavior(),
            optimal_unmap_sectors,
            disk,
        })))
    }

    /// The backend type name.
    pub fn disk_type(&self) -> &str {
        self.0.disk.disk_type()
    }

    /// The current sector count (asks the backend).
    pub fn sector_count(&self) -> u64 {
        self.0.disk.sector_count()
    }

    /// The logical sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.0.sector_size
    }

    /// `log2(sector_size())`.
    pub fn sector_shift(&self) -> u32 {
        self.0.sector_shift
    }

    /// The physical sector size in bytes.
    pub fn physical_sector_size(&self) -> u32 {
        self.0.physical_sector_size
    }

    /// The disk's identifier, if it has one.
    pub fn disk_id(&self) -> Option<[u8; 16]> {
        self.0.disk_id
    }

    /// Whether FUA writes are durable when they complete.
    pub fn is_fua_respected(&self) -> bool {
        self.0.is_fua_respected
    }

    /// Whether the disk is read-only.
    pub fn is_read_only(&self) -> bool {
        self.0.is_read_only
    }

    /// What unmap does.
    pub fn unmap_behavior(&self) -> UnmapBehavior {
        self.0.unmap_behavior
    }

    /// The preferred unmap granularity in sectors.
    pub fn optimal_unmap_sectors(&self) -> u32 {
        self.0.optimal_unmap_sectors
    }

    /// Persistent reservation support, if the backend has it.
    pub fn pr(&self) -> Option<&dyn PersistentReservation> {
        self.0.disk.pr()
    }

    /// Validates a request of `sectors` sectors at `sector`: `Ok(true)` means it is empty and
    /// needs no backend call.
    fn check_sectors(&self, sector: u64, sectors: u64, write: bool) -> Result<bool, DiskError> {
        // The end byte offset must fit in an i64 (what file offsets and most protocols use).
        let max_end = (i64::MAX as u64) >> self.0.sector_shift;
        match sector.checked_add(sectors) {
            Some(end) if end <= max_end => {}
            _ => return Err(DiskError::IllegalBlock),
        }
        if sectors == 0 {
            return Ok(true);
        }
        if write && self.0.is_read_only {
            return Err(DiskError::ReadOnly);
        }
        Ok(false)
    }

    fn check_buffers(&self, sector: u64, len: usize, write: bool) -> Result<bool, DiskError> {
        if len & (self.0.sector_size as usize - 1) != 0 {
            return Err(DiskError::InvalidInput);
        }
        self.check_sectors(sector, (len >> self.0.sector_shift) as u64, write)
    }

    fn run<'a>(checked: Result<bool, DiskError>, io: impl FnOnce() -> IoFuture<'a>) -> Checked<'a> {
        match checked {
            Ok(false) => Either::Left(io()),
            Ok(true) => Either::Right(ready(Ok(()))),
            Err(e) => Either::Right(ready(Err(e))),
        }
    }

    /// Reads whole sectors starting at `sector` into `buffers`.
    pub fn read_vectored<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'_>,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + 'a {
        let checked = self.check_buffers(sector, buffers.len(), false);
        Self::run(checked, || self.0.disk.read_vectored(buffers, sector))
    }

    /// Writes whole sectors from `buffers` starting at `sector`, durably before completion if
    /// `fua` and [`is_fua_respected`](Self::is_fua_respected).
    pub fn write_vectored<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + 'a {
        let checked = self.check_buffers(sector, buffers.len(), true);
        Self::run(checked, || self.0.disk.write_vectored(buffers, sector, fua))
    }

    /// Makes every completed write durable.
    pub fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send + '_ {
        self.0.disk.sync_cache()
    }

    /// Unmaps `count` sectors at `sector`.
    pub fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + '_ {
        let checked = self.check_sectors(sector, count, true);
        Self::run(checked, || {
            self.0.disk.unmap(sector, count, block_level_only)
        })
    }

    /// Ejects the medium.
    pub fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send + '_ {
        self.0.disk.eject()
    }

    /// Completes with the new sector count once it differs from `sector_count`.
    pub fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send + '_ {
        self.0.disk.wait_resize(sector_count)
    }

    /// Tells the backend that requests' buffers will come from `memory`; see
    /// [`DiskIo::register_memory`].
    pub fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        self.0.disk.register_memory(memory)
    }
}

/// A `Disk` is itself a `DiskIo`, so code generic over backends (the conformance suite, a
/// layer that wraps any disk) accepts one.
impl DiskIo for Disk {
    fn disk_type(&self) -> &str {
        Disk::disk_type(self)
    }

    fn sector_count(&self) -> u64 {
        Disk::sector_count(self)
    }

    fn sector_size(&self) -> u32 {
        Disk::sector_size(self)
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        Disk::disk_id(self)
    }

    fn physical_sector_size(&self) -> u32 {
        Disk::physical_sector_size(self)
    }

    fn is_fua_respected(&self) -> bool {
        Disk::is_fua_respected(self)
    }

    fn is_read_only(&self) -> bool {
        Disk::is_read_only(self)
    }

    // `async fn` lets the future name the two borrows' lifetimes separately, which the
    // inherent methods (one lifetime for both) cannot.
    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        Disk::read_vectored(self, buffers, sector).await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        Disk::write_vectored(self, buffers, sector, fua).await
    }

    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::sync_cache(self)
    }

    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::unmap(self, sector, count, block_level_only)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        Disk::unmap_behavior(self)
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        Disk::optimal_unmap_sectors(self)
    }

    fn pr(&self) -> Option<&dyn PersistentReservation> {
        Disk::pr(self)
    }

    fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::eject(self)
    }

    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        Disk::wait_resize(self, sector_count)
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        Disk::register_memory(self, memory)
    }
}
