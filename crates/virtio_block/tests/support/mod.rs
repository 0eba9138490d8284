//! Shared setup for the device tests.

#![allow(dead_code)]

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_ram::RamDisk;
use event_listener::Event;
use guestmem::GuestMemory;
use request_buffers::RequestBuffers;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use virtio_block::harness::{Driver, DriverOptions};
use virtio_block::{BlockConfig, BlockDevice};

/// Guest memory for one driver: rings, then buffers.
pub const GUEST_BYTES: usize = 16 << 20;

pub fn memory() -> GuestMemory {
    GuestMemory::allocate(GUEST_BYTES)
}

/// A driver over a fresh device on `disk`, probed with default options.
pub fn driver_for(disk: impl DiskIo, config: BlockConfig) -> Driver<BlockDevice> {
    driver_with(disk, config, DriverOptions::default())
}

pub fn driver_with(
    disk: impl DiskIo,
    config: BlockConfig,
    options: DriverOptions,
) -> Driver<BlockDevice> {
    let device = BlockDevice::new(config, Disk::new(disk).unwrap()).unwrap();
    Driver::new(device, memory(), options).unwrap()
}

/// A driver over a RAM disk of `sectors` sectors of `sector_size` bytes.
pub fn ram_driver(sectors: u64, sector_size: u32) -> Driver<BlockDevice> {
    driver_for(
        RamDisk::new(sectors, sector_size).unwrap(),
        BlockConfig::default(),
    )
}

/// Bytes that differ per position and per `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A disk that holds requests touching `gated_sector` until released, to force requests to
/// complete out of order, and counts what reaches it.
pub struct GateDisk {
    pub inner: RamDisk,
    pub gated_sector: u64,
    pub open: AtomicBool,
    pub event: Event,
    pub reads: AtomicUsize,
    pub waiting: AtomicUsize,
}

impl GateDisk {
    pub fn new(inner: RamDisk, gated_sector: u64) -> Arc<Self> {
        Arc::new(Self {
            inner,
            gated_sector,
            open: AtomicBool::new(false),
            event: Event::new(),
            reads: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    async fn gate(&self, sector: u64) {
        if sector != self.gated_sector {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            let listener = self.event.listen();
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            listener.await;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DiskIo for GateDisk {
    fn disk_type(&self) -> &str {
        "gate"
    }
    disk_backend::forward_disk_metadata!(self.inner);
    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.gate(sector).await;
        self.inner.read_vectored(buffers, sector).await
    }
    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.gate(sector).await;
        self.inner.write_vectored(buffers, sector, fua).await
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.inner.sync_cache().await
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.inner.unmap(sector, count, block_level_only).await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.inner.unmap_behavior()
    }
}
