//! A disk that records the guest memory announced to it.

use disk_backend::{DiskError, DiskIo, GuestMemory, UnmapBehavior, check_range, check_unmap_range};
use parking_lot::Mutex;
use request_buffers::{IoBuffer, MemoryWrite, RequestBuffers};
use std::sync::atomic::{AtomicBool, Ordering};

/// A disk that records every [`register_memory`](DiskIo::register_memory) call, for tests
/// that check that a decorator or a frontend passes guest memory on. Its sectors are 512
/// bytes and read as zeros; writes are checked and dropped. Share it with an `Arc` and
/// inspect it while a `Disk` wraps it.
///
/// ```
/// use disk_backend::{Disk, GuestMemory};
/// use disk_conformance::MemoryProbe;
/// use std::sync::Arc;
///
/// let probe = Arc::new(MemoryProbe::new(64));
/// let disk = Disk::new(probe.clone()).unwrap();
/// let memory = GuestMemory::allocate(4096);
/// disk.register_memory(&memory).unwrap();
/// assert!(probe.last_is(&memory));
/// assert_eq!(probe.calls(), 1);
/// ```
#[derive(Debug)]
pub struct MemoryProbe {
    sector_count: u64,
    /// The host regions of each registered memory, in call order.
    calls: Mutex<Vec<Vec<(u64, IoBuffer, bool)>>>,
    failing: AtomicBool,
}

impl MemoryProbe {
    /// A probe of `sector_count` sectors.
    pub fn new(sector_count: u64) -> Self {
        Self {
            sector_count,
            calls: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
        }
    }

    /// Makes later `register_memory` calls fail with [`DiskError::Io`] (still recording
    /// them) or succeed again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// How many times `register_memory` was called.
    pub fn calls(&self) -> usize {
        self.calls.lock().len()
    }

    /// Whether the last call registered `memory` (the same host regions, not a copy).
    pub fn last_is(&self, memory: &GuestMemory) -> bool {
        let calls = self.calls.lock();
        calls
            .last()
            .is_some_and(|last| *last == memory.host_regions().collect::<Vec<_>>())
    }
}

impl DiskIo for MemoryProbe {
    fn disk_type(&self) -> &str {
        "memory-probe"
    }

    fn sector_count(&self) -> u64 {
        self.sector_count
    }

    fn sector_size(&self) -> u32 {
        512
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }

    fn physical_sector_size(&self) -> u32 {
        512
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
        check_range(self, sector, buffers.len())?;
        buffers.writer().zero(buffers.len())?;
        Ok(())
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        _fua: bool,
    ) -> Result<(), DiskError> {
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
        check_unmap_range(self, sector, count)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Zeroes
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        self.calls.lock().push(memory.host_regions().collect());
        if self.failing.load(Ordering::Relaxed) {
            return Err(DiskError::Io(std::io::Error::other(
                "the probe refuses guest memory",
            )));
        }
        Ok(())
    }
}
