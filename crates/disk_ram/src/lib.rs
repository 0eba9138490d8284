//! A sparse in-memory disk: only sectors that were written use memory.
//!
//! [`RamDisk`] is the scratch disk of tests and benchmarks, and the storage of the RAM layer
//! of layered disks. Unwritten and unmapped sectors read as zeros
//! ([`UnmapBehavior::Zeroes`]). The size can change at run time ([`RamDisk::resize`]),
//! which completes pending [`wait_resize`](DiskIo::wait_resize) calls. Nothing survives the
//! process, so flush has nothing to do and FUA is trivially respected.
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

use disk_backend::{DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use event_listener::Event;
use parking_lot::RwLock;
use request_buffers::{MemoryRead, MemoryWrite, RequestBuffers};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Creating or resizing a [`RamDisk`] failed.
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
}

/// A sparse in-memory disk.
#[derive(Debug)]
pub struct RamDisk {
    sector_size: u32,
    read_only: bool,
    disk_id: Option<[u8; 16]>,
    /// Mirrors `State::sector_count` for lock-free `sector_count()`; changed under the write
    /// lock.
    sector_count: AtomicU64,
    state: RwLock<State>,
    resized: Event,
}

#[derive(Debug)]
struct State {
    sector_count: u64,
    /// Written sectors by sector number; everything else is zero.
    sectors: BTreeMap<u64, Box<[u8]>>,
}

impl RamDisk {
    /// An empty (all-zero) writable disk of `sector_count` sectors of `sector_size` bytes.
    pub fn new(sector_count: u64, sector_size: u32) -> Result<Self, RamDiskError> {
        if sector_size < 512 || !sector_size.is_power_of_two() {
            return Err(RamDiskError::InvalidSectorSize(sector_size));
        }
        check_size(sector_count, sector_size)?;
        Ok(Self {
            sector_size,
            read_only: false,
            disk_id: None,
            sector_count: AtomicU64::new(sector_count),
            state: RwLock::new(State {
                sector_count,
                sectors: BTreeMap::new(),
            }),
            resized: Event::new(),
        })
    }

    /// Makes the disk refuse writes and unmaps (fill it first).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Gives the disk an identifier.
    pub fn with_disk_id(mut self, disk_id: [u8; 16]) -> Self {
        self.disk_id = Some(disk_id);
        self
    }

    /// Changes the sector count. Sectors beyond a smaller size are dropped (and read as
    /// zeros if the disk grows again). Wakes every pending `wait_resize`.
    pub fn resize(&self, sector_count: u64) -> Result<(), RamDiskError> {
        check_size(sector_count, self.sector_size)?;
        let mut state = self.state.write();
        state.sectors.split_off(&sector_count);
        state.sector_count = sector_count;
        self.sector_count.store(sector_count, Ordering::Release);
        drop(state);
        self.resized.notify(usize::MAX);
        Ok(())
    }

    /// Bytes of sector data held in memory (written sectors only).
    pub fn allocated_bytes(&self) -> u64 {
        self.state.read().sectors.len() as u64 * self.sector_size as u64
    }

    fn shift(&self) -> u32 {
        self.sector_size.trailing_zeros()
    }
}

fn check_size(sector_count: u64, sector_size: u32) -> Result<(), RamDiskError> {
    match sector_count.checked_mul(sector_size as u64) {
        Some(bytes) if bytes <= i64::MAX as u64 => Ok(()),
        _ => Err(RamDiskError::TooLarge {
            sector_count,
            sector_size,
        }),
    }
}

impl DiskIo for RamDisk {
    fn disk_type(&self) -> &str {
        "ram"
    }

    fn sector_count(&self) -> u64 {
        self.sector_count.load(Ordering::Acquire)
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        self.disk_id
    }

    fn physical_sector_size(&self) -> u32 {
        self.sector_size
    }

    fn is_fua_respected(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        // Validate the memory first so a bad buffer fails before anything is copied.
        buffers.validate()?;
        let state = self.state.read();
        check_range(self, sector, buffers.len())?;
        let shift = self.shift();
        let end = sector + (buffers.len() >> shift) as u64;
        let mut writer = buffers.writer();
        let mut next = sector;
        for (&present, data) in state.sectors.range(sector..end) {
            if present > next {
                writer.zero(((present - next) << shift) as usize)?;
            }
            writer.write(data)?;
            next = present + 1;
        }
        writer.zero(((end - next) << shift) as usize)?;
        Ok(())
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        _fua: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        // Validated up front, so the copy below cannot stop half way through the request.
        buffers.validate()?;
        let mut state = self.state.write();
        check_range(self, sector, buffers.len())?;
        let end = sector + (buffers.len() >> self.shift()) as u64;
        let mut reader = buffers.reader();
        for s in sector..end {
            match state.sectors.entry(s) {
                Entry::Occupied(mut entry) => {
                    reader.read(entry.get_mut())?;
                }
                Entry::Vacant(entry) => {
                    let mut data = vec![0; self.sector_size as usize].into_boxed_slice();
                    reader.read(&mut data)?;
                    entry.insert(data);
                }
            }
        }
        Ok(())
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
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut state = self.state.write();
        check_unmap_range(self, sector, count)?;
        let mut unmapped = state.sectors.split_off(&sector);
        let mut after = unmapped.split_off(&(sector + count));
        state.sectors.append(&mut after);
        drop(state);
        // Free the sectors outside the lock.
        drop(unmapped);
        Ok(())
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Zeroes
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        loop {
            let listener = self.resized.listen();
            let current = self.sector_count();
            if current != sector_count {
                return current;
            }
            listener.await;
        }
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
    }
}
