//! A RAM-backed layer whose properties tests choose and whose calls they observe.

#![allow(dead_code)]

use disk_backend::{DiskError, UnmapBehavior};
use disk_layered::{
    DiskLayer, LayerAttach, LayerConfiguration, LayerIo, SectorMarker, WriteNoOverwrite,
};
use disk_ram::RamLayer;
use parking_lot::Mutex;
use request_buffers::RequestBuffers;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A global clock so tests can check the order of calls across layers.
static CLOCK: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    CLOCK.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone, Default)]
pub struct Calls {
    /// `(time, sector)` of each write.
    pub writes: Vec<(u64, u64)>,
    /// `(time, next_is_zero)` of each unmap.
    pub unmaps: Vec<(u64, bool)>,
    pub flushes: u64,
    pub cache_fills: u64,
}

pub struct ProbeLayer {
    pub ram: Arc<RamLayer>,
    pub fua: bool,
    pub read_only: bool,
    pub disk_id: Option<[u8; 16]>,
    pub unmap_behavior: UnmapBehavior,
    pub can_cache: bool,
    pub fail_cache_fill: bool,
    pub calls: Arc<Mutex<Calls>>,
}

impl ProbeLayer {
    pub fn new(sector_count: u64) -> Self {
        Self {
            ram: Arc::new(RamLayer::new(sector_count, 512).unwrap()),
            fua: true,
            read_only: false,
            disk_id: None,
            unmap_behavior: UnmapBehavior::Zeroes,
            can_cache: true,
            fail_cache_fill: false,
            calls: Arc::default(),
        }
    }
}

impl LayerIo for ProbeLayer {
    fn layer_type(&self) -> &str {
        "probe"
    }
    fn sector_count(&self) -> u64 {
        self.ram.sector_count()
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        self.disk_id
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn is_fua_respected(&self) -> bool {
        self.fua
    }
    fn is_logically_read_only(&self) -> bool {
        self.read_only
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.calls.lock().flushes += 1;
        Ok(())
    }
    async fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        self.ram.read(buffers, sector, marker).await
    }
    async fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.calls.lock().writes.push((tick(), sector));
        self.ram.write(buffers, sector, fua).await
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> Result<(), DiskError> {
        self.calls.lock().unmaps.push((tick(), next_is_zero));
        self.ram
            .unmap(sector, count, block_level_only, next_is_zero)
            .await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }
    fn write_no_overwrite(&self) -> Option<impl WriteNoOverwrite> {
        self.can_cache.then_some(self)
    }
    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.ram.wait_resize(sector_count).await
    }
}

impl WriteNoOverwrite for &ProbeLayer {
    async fn write_no_overwrite(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.calls.lock().cache_fills += 1;
        if self.fail_cache_fill {
            return Err(DiskError::Io(std::io::Error::other("cache fill refused")));
        }
        let writer = LayerIo::write_no_overwrite(&*self.ram).expect("RAM layers can cache");
        writer.write_no_overwrite(buffers, sector).await
    }
}

/// A layer's place in a stack: `write_through` and `read_cache` as given.
pub fn cfg(layer: impl LayerAttach, write_through: bool, read_cache: bool) -> LayerConfiguration {
    LayerConfiguration {
        layer: DiskLayer::new(layer),
        write_through,
        read_cache,
    }
}
