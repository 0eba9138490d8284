//! A backend that does no work, shared by the tests and the overhead benchmark.

#![allow(dead_code)]

use disk_backend::{DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use request_buffers::RequestBuffers;
use std::sync::atomic::{AtomicU64, Ordering};

/// A disk whose I/O completes at once without touching the buffers, with configurable
/// geometry and a count of the requests that reached it.
pub struct NullDisk {
    pub sector_count: u64,
    pub sector_size: u32,
    pub physical_sector_size: u32,
    pub read_only: bool,
    pub optimal_unmap_sectors: u32,
    pub requests: AtomicU64,
    /// `register_memory` calls that reached it.
    pub registrations: AtomicU64,
}

impl NullDisk {
    pub fn new(sector_count: u64) -> Self {
        Self {
            sector_count,
            sector_size: 512,
            physical_sector_size: 4096,
            read_only: false,
            optimal_unmap_sectors: 1,
            requests: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
        }
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

impl DiskIo for NullDisk {
    fn disk_type(&self) -> &str {
        "null"
    }
    fn sector_count(&self) -> u64 {
        self.sector_count
    }
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    fn is_fua_respected(&self) -> bool {
        true
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        self.optimal_unmap_sectors
    }
    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.count();
        check_range(self, sector, buffers.len())
    }
    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        _fua: bool,
    ) -> Result<(), DiskError> {
        self.count();
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self, sector, buffers.len())
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        Ok(())
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        _block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.count();
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Ignored
    }
    fn register_memory(&self, _memory: &disk_backend::GuestMemory) -> Result<(), DiskError> {
        self.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
