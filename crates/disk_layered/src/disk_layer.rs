//! Any `Disk` as a layer.

use crate::{LayerIo, SectorMarker};
use disk_backend::{Disk, DiskError, UnmapBehavior};
use request_buffers::{GuestMemory, RequestBuffers};

/// A layer that holds every sector: any [`Disk`] (a file, a block device, another layered
/// disk) at the bottom of a stack, or in the middle of one.
///
/// It is logically read-only when the disk is, and cannot be a read cache.
#[derive(Debug, Clone)]
pub struct DiskAsLayer(Disk);

impl DiskAsLayer {
    /// The layer over `disk`.
    pub fn new(disk: Disk) -> Self {
        Self(disk)
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.0
    }
}

impl LayerIo for DiskAsLayer {
    fn layer_type(&self) -> &str {
        "disk"
    }

    fn sector_count(&self) -> u64 {
        self.0.sector_count()
    }

    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        self.0.disk_id()
    }

    fn physical_sector_size(&self) -> u32 {
        self.0.physical_sector_size()
    }

    fn is_fua_respected(&self) -> bool {
        self.0.is_fua_respected()
    }

    fn is_logically_read_only(&self) -> bool {
        self.0.is_read_only()
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.0.sync_cache().await
    }

    async fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        mut marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        self.0.read_vectored(buffers, sector).await?;
        marker.set_all();
        Ok(())
    }

    async fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.0.write_vectored(buffers, sector, fua).await
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        _next_is_zero: bool,
    ) -> Result<(), DiskError> {
        self.0.unmap(sector, count, block_level_only).await
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.0.unmap_behavior()
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.0.optimal_unmap_sectors()
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.0.wait_resize(sector_count).await
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        self.0.register_memory(memory)
    }
}
