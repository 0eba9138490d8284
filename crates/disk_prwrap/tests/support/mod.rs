//! A probe backend for the integration tests: a RAM disk that counts what reaches it,
//! records the tag of every write it applies, and can hold requests at a gate.

#![allow(dead_code)]

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_prwrap::DiskWithReservations;
use disk_ram::RamDisk;
use event_listener::Event;
use parking_lot::Mutex;
use request_buffers::{MemoryRead, RequestBuffers};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

pub const SECTOR_SIZE: u32 = 512;

/// Counts of the requests that reached the probe, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub reads: usize,
    pub writes: usize,
    pub flushes: usize,
    pub unmaps: usize,
}

pub struct ProbeDisk {
    ram: RamDisk,
    reads: AtomicUsize,
    writes: AtomicUsize,
    flushes: AtomicUsize,
    unmaps: AtomicUsize,
    /// Requests that have reached the probe (counted before the gate).
    arrived: AtomicUsize,
    gate_open: AtomicBool,
    gate: Event,
    /// How long a write takes once through the gate, to widen the window in which a
    /// command can land while the write is in flight.
    write_latency: Mutex<Duration>,
    /// The first eight bytes of every write the probe applied, in order.
    applied_tags: Mutex<Vec<u64>>,
}

impl ProbeDisk {
    pub fn new(sector_count: u64) -> Arc<Self> {
        Arc::new(Self {
            ram: RamDisk::new(sector_count, SECTOR_SIZE).unwrap(),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            unmaps: AtomicUsize::new(0),
            arrived: AtomicUsize::new(0),
            gate_open: AtomicBool::new(true),
            gate: Event::new(),
            write_latency: Mutex::new(Duration::ZERO),
            applied_tags: Mutex::new(Vec::new()),
        })
    }

    /// A probe wrapped in a fresh `DiskWithReservations`.
    pub fn wrapped(sector_count: u64) -> (Arc<Self>, DiskWithReservations) {
        let probe = Self::new(sector_count);
        let shared = DiskWithReservations::new(Disk::new(probe.clone()).unwrap());
        (probe, shared)
    }

    pub fn counts(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            flushes: self.flushes.load(Ordering::SeqCst),
            unmaps: self.unmaps.load(Ordering::SeqCst),
        }
    }

    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Waits (polling, bounded) until `count` requests have reached the probe.
    pub fn wait_arrived(&self, count: usize) {
        for _ in 0..2000 {
            if self.arrived() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "only {} of {count} requests reached the disk",
            self.arrived()
        );
    }

    pub fn close_gate(&self) {
        self.gate_open.store(false, Ordering::SeqCst);
    }

    pub fn open_gate(&self) {
        self.gate_open.store(true, Ordering::SeqCst);
        self.gate.notify(usize::MAX);
    }

    pub fn set_write_latency(&self, latency: Duration) {
        *self.write_latency.lock() = latency;
    }

    pub fn applied_tags(&self) -> Vec<u64> {
        self.applied_tags.lock().clone()
    }

    async fn pass_gate(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        loop {
            let listener = self.gate.listen();
            if self.gate_open.load(Ordering::SeqCst) {
                return;
            }
            listener.await;
        }
    }
}

/// A buffer of `sectors` sectors whose first eight bytes are `tag`.
pub fn tagged(tag: u64, sectors: usize) -> request_buffers::OwnedRequestBuffers {
    let mut data = vec![0x5a; sectors * SECTOR_SIZE as usize];
    data[..8].copy_from_slice(&tag.to_le_bytes());
    request_buffers::OwnedRequestBuffers::from_slice(&data)
}

impl DiskIo for ProbeDisk {
    fn disk_type(&self) -> &str {
        "probe"
    }

    fn sector_count(&self) -> u64 {
        self.ram.sector_count()
    }

    fn sector_size(&self) -> u32 {
        self.ram.sector_size()
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }

    fn physical_sector_size(&self) -> u32 {
        self.ram.physical_sector_size()
    }

    fn is_fua_respected(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        false
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.pass_gate().await;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.ram.read_vectored(buffers, sector).await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.pass_gate().await;
        self.writes.fetch_add(1, Ordering::SeqCst);
        let latency = *self.write_latency.lock();
        if !latency.is_zero() {
            // Deliberately blocking: the write is "on the medium" for this long.
            std::thread::sleep(latency);
        }
        self.ram.write_vectored(buffers, sector, fua).await?;
        let mut tag = [0; 8];
        buffers.reader().read(&mut tag)?;
        self.applied_tags.lock().push(u64::from_le_bytes(tag));
        Ok(())
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.pass_gate().await;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.pass_gate().await;
        self.unmaps.fetch_add(1, Ordering::SeqCst);
        self.ram.unmap(sector, count, block_level_only).await
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Zeroes
    }
}
