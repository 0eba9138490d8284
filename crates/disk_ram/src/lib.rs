//! Sparse memory: the RAM layer of layered disks, and the RAM disk built from it.
//!
//! [`RamLayer`] is a [`LayerIo`](disk_layered::LayerIo) that holds only the sectors written to it (plus runs of
//! sectors it knows are zero), so a terabyte-sized layer costs nothing until used. It can be
//! resized at run time ([`RamLayer::resize`], waking `wait_resize`), can take its size from the
//! layer below it ([`RamLayer::lazy`]), and can be a read cache (it fills without
//! overwriting). [`RamDisk`] is a single-layer [`LayeredDisk`] over one: the scratch disk of
//! tests and benchmarks. There is one implementation of RAM storage, and this is it.
//!
//! Nothing survives the process, so flush has nothing to do and FUA is trivially respected.
//!
//! ```
//! use disk_backend::Disk;
//! use disk_ram::RamDisk;
//! use request_buffers::OwnedRequestBuffers;
//!
//! let disk = Disk::new(RamDisk::new(2048, 512)?)?;
//! let data = OwnedRequestBuffers::from_slice(&[0x5a; 4096]);
//! let back = OwnedRequestBuffers::new(4096);
//! futures::executor::block_on(async {
//!     disk.write_vectored(&data.buffers(false), 8, false).await?;
//!     disk.read_vectored(&back.buffers(true), 8).await
//! })?;
//! assert_eq!(back.to_vec(), vec![0x5a; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod layer;
mod resolve;
mod store;

pub use layer::{RamLayer, RamLayerConfig};
pub use resolve::{DEFAULT_RAM_DISK_BYTES, RamResolver};

use disk_backend::{DiskError, DiskIo, UnmapBehavior};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use request_buffers::RequestBuffers;
use std::sync::Arc;
use thiserror::Error;

/// Creating, attaching or resizing RAM storage failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RamDiskError {
    /// The sector size is not a power of two of at least 512.
    #[error("invalid sector size {0}: must be a power of two of at least 512")]
    InvalidSectorSize(u32),
    /// The size in bytes does not fit in an `i64`.
    #[error("{sector_count} sectors of {sector_size} bytes is too large")]
    TooLarge {
        /// Requested sector count.
        sector_count: u64,
        /// Sector size.
        sector_size: u32,
    },
    /// A lazily sized layer is the bottom layer, so there is nothing to take its size from.
    #[error("a RAM layer without a size needs a layer below it to take the size from")]
    NoLowerLayer,
}

/// A sparse in-memory disk: a [`LayeredDisk`] with one [`RamLayer`].
#[derive(Debug)]
pub struct RamDisk {
    layer: Arc<RamLayer>,
    disk: LayeredDisk,
    disk_id: Option<[u8; 16]>,
}

impl RamDisk {
    /// An all-zero writable disk of `sector_count` sectors of `sector_size` bytes.
    pub fn new(sector_count: u64, sector_size: u32) -> Result<Self, RamDiskError> {
        Ok(Self::from_layer(
            Arc::new(RamLayer::new(sector_count, sector_size)?),
            false,
        ))
    }

    fn from_layer(layer: Arc<RamLayer>, read_only: bool) -> Self {
        let disk = LayeredDisk::new(
            read_only,
            vec![LayerConfiguration::new(DiskLayer::new(layer.clone()))],
        )
        .expect("a single writable RAM layer is a valid stack");
        Self {
            layer,
            disk,
            disk_id: None,
        }
    }

    /// Makes the disk refuse writes and unmaps (fill it first), keeping its contents.
    pub fn with_read_only(self, read_only: bool) -> Self {
        Self {
            disk_id: self.disk_id,
            ..Self::from_layer(self.layer, read_only)
        }
    }

    /// Gives the disk an identifier.
    pub fn with_disk_id(mut self, disk_id: [u8; 16]) -> Self {
        self.disk_id = Some(disk_id);
        self
    }

    /// Changes the sector count; see [`RamLayer::resize`].
    pub fn resize(&self, sector_count: u64) -> Result<(), RamDiskError> {
        self.layer.resize(sector_count)
    }

    /// Bytes of sector data held in memory.
    pub fn allocated_bytes(&self) -> u64 {
        self.layer.allocated_bytes()
    }

    /// The RAM layer.
    pub fn layer(&self) -> &Arc<RamLayer> {
        &self.layer
    }
}

impl DiskIo for RamDisk {
    fn disk_type(&self) -> &str {
        "ram"
    }

    fn sector_count(&self) -> u64 {
        self.disk.sector_count()
    }

    fn sector_size(&self) -> u32 {
        self.disk.sector_size()
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        self.disk_id.or(self.disk.disk_id())
    }

    fn physical_sector_size(&self) -> u32 {
        self.disk.physical_sector_size()
    }

    fn is_fua_respected(&self) -> bool {
        self.disk.is_fua_respected()
    }

    fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.disk.read_vectored(buffers, sector).await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.disk.write_vectored(buffers, sector, fua).await
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.disk.sync_cache().await
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.disk.unmap(sector, count, block_level_only).await
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.disk.unmap_behavior()
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.disk.wait_resize(sector_count).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use request_buffers::OwnedRequestBuffers;

    #[test]
    fn sparse_allocation() {
        let disk = RamDisk::new(1 << 40, 512).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        let data = OwnedRequestBuffers::from_slice(&[1; 1024]);
        block_on(disk.write_vectored(&data.buffers(false), (1 << 40) - 2, false)).unwrap();
        assert_eq!(disk.allocated_bytes(), 1024);
        block_on(disk.unmap(0, 1 << 40, false)).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn invalid_geometry() {
        assert_eq!(
            RamDisk::new(1, 256).unwrap_err(),
            RamDiskError::InvalidSectorSize(256)
        );
        assert_eq!(
            RamDisk::new(1, 1000).unwrap_err(),
            RamDiskError::InvalidSectorSize(1000)
        );
        assert!(matches!(
            RamDisk::new(u64::MAX, 512),
            Err(RamDiskError::TooLarge { .. })
        ));
        assert!(matches!(
            RamDisk::new(1 << 54, 512),
            Err(RamDiskError::TooLarge { .. })
        ));
        assert!(RamDisk::new((1 << 54) - 1, 512).is_ok());
        let disk = RamDisk::new(1, 4096).unwrap();
        assert!(disk.resize(u64::MAX).is_err());
    }

    #[test]
    fn shrink_drops_data() {
        let disk = RamDisk::new(16, 512).unwrap();
        let data = OwnedRequestBuffers::from_slice(&[9; 512]);
        block_on(disk.write_vectored(&data.buffers(false), 15, false)).unwrap();
        disk.resize(8).unwrap();
        assert!(matches!(
            block_on(disk.read_vectored(&data.buffers(true), 15)),
            Err(DiskError::IllegalBlock)
        ));
        disk.resize(16).unwrap();
        let back = OwnedRequestBuffers::new(512);
        block_on(disk.read_vectored(&back.buffers(true), 15)).unwrap();
        assert_eq!(back.to_vec(), vec![0; 512]);
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn identity_and_read_only_keep_contents() {
        let disk = RamDisk::new(4, 512).unwrap().with_disk_id([3; 16]);
        let data = OwnedRequestBuffers::from_slice(&[5; 512]);
        block_on(disk.write_vectored(&data.buffers(false), 1, false)).unwrap();
        let disk = disk.with_read_only(true);
        assert!(disk.is_read_only());
        assert_eq!(disk.disk_id(), Some([3; 16]));
        let back = OwnedRequestBuffers::new(512);
        block_on(disk.read_vectored(&back.buffers(true), 1)).unwrap();
        assert_eq!(back.to_vec(), vec![5; 512]);
        assert!(matches!(
            block_on(disk.write_vectored(&data.buffers(false), 1, false)),
            Err(DiskError::ReadOnly)
        ));
    }
}
