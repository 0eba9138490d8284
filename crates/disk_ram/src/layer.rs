//! The RAM layer: a sparse map from sectors to data or known-zero runs.

use crate::RamDiskError;
use crate::store::Store;
use disk_backend::{DiskError, UnmapBehavior};
use disk_layered::{LayerAttach, LayerIo, LowerLayerMetadata, SectorMarker, WriteNoOverwrite};
use event_listener::Event;
use parking_lot::RwLock;
use request_buffers::RequestBuffers;
use std::sync::atomic::{AtomicU64, Ordering};

/// A sparse in-memory layer. See the [crate documentation](crate).
#[derive(Debug)]
pub struct RamLayer {
    sector_size: u32,
    sector_shift: u32,
    disk_id: Option<[u8; 16]>,
    /// Mirrors `State::sector_count` for lock-free reads; written under the state lock.
    sector_count: AtomicU64,
    state: RwLock<Store>,
    resized: Event,
}

fn check_geometry(sector_count: u64, sector_size: u32) -> Result<(), RamDiskError> {
    if sector_size < 512 || !sector_size.is_power_of_two() {
        return Err(RamDiskError::InvalidSectorSize(sector_size));
    }
    match sector_count.checked_mul(sector_size as u64) {
        Some(bytes) if bytes <= i64::MAX as u64 => Ok(()),
        _ => Err(RamDiskError::TooLarge {
            sector_count,
            sector_size,
        }),
    }
}

impl RamLayer {
    /// An empty layer of `sector_count` sectors of `sector_size` bytes.
    pub fn new(sector_count: u64, sector_size: u32) -> Result<Self, RamDiskError> {
        check_geometry(sector_count, sector_size)?;
        Ok(Self {
            sector_size,
            sector_shift: sector_size.trailing_zeros(),
            disk_id: None,
            sector_count: AtomicU64::new(sector_count),
            state: RwLock::new(Store::new(sector_count, sector_size)),
            resized: Event::new(),
        })
    }

    /// A layer that takes its sector count and sector size from the layer below it when the
    /// layered disk is built.
    pub fn lazy() -> RamLayerConfig {
        RamLayerConfig::default()
    }

    /// Gives the layer an identifier.
    pub fn with_disk_id(mut self, disk_id: [u8; 16]) -> Self {
        self.disk_id = Some(disk_id);
        self
    }

    /// Changes the sector count. Sectors beyond a smaller count are dropped (a later growth
    /// does not bring them back). Wakes every pending `wait_resize`.
    pub fn resize(&self, sector_count: u64) -> Result<(), RamDiskError> {
        check_geometry(sector_count, self.sector_size)?;
        let mut state = self.state.write();
        state.resize(sector_count);
        self.sector_count.store(sector_count, Ordering::Release);
        drop(state);
        self.resized.notify(usize::MAX);
        Ok(())
    }

    /// Bytes of sector data held (known-zero runs cost nothing). Memory is taken in chunks
    /// of 32 KiB, so a layer with scattered single sectors uses more than this.
    pub fn allocated_bytes(&self) -> u64 {
        self.state.read().data_sectors() << self.sector_shift
    }
}

/// How to build a [`RamLayer`] once the layer below is known: unset fields are taken from
/// it. Every field set makes it usable as the bottom layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamLayerConfig {
    /// The sector count; the lower layer's if `None`.
    pub sector_count: Option<u64>,
    /// The sector size; the lower layer's if `None`.
    pub sector_size: Option<u32>,
}

impl LayerAttach for RamLayerConfig {
    type Layer = RamLayer;
    type Error = RamDiskError;

    fn attach(self, lower: Option<&LowerLayerMetadata>) -> Result<RamLayer, RamDiskError> {
        let sector_count = self
            .sector_count
            .or(lower.map(|l| l.sector_count))
            .ok_or(RamDiskError::NoLowerLayer)?;
        let sector_size = self
            .sector_size
            .or(lower.map(|l| l.sector_size))
            .ok_or(RamDiskError::NoLowerLayer)?;
        RamLayer::new(sector_count, sector_size)
    }
}

impl LayerIo for RamLayer {
    fn layer_type(&self) -> &str {
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

    fn is_logically_read_only(&self) -> bool {
        false
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        Ok(())
    }

    async fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        mut marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        let state = self.state.read();
        let end = state.check(sector, (buffers.len() >> self.sector_shift) as u64)?;
        state.read(buffers, sector, end, |held| marker.set_range(held))
    }

    fn may_hold(&self, sector: u64, count: u64) -> bool {
        let end = sector.saturating_add(count);
        self.state.read().holds_any(sector, end)
    }

    async fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        _fua: bool,
    ) -> Result<(), DiskError> {
        // Validated before anything changes, so the copy below cannot stop half way.
        buffers.validate()?;
        let mut state = self.state.write();
        let end = state.check(sector, (buffers.len() >> self.sector_shift) as u64)?;
        state.write(buffers, sector, end, true)
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        _block_level_only: bool,
        next_is_zero: bool,
    ) -> Result<(), DiskError> {
        let mut state = self.state.write();
        let end = state.check(sector, count)?;
        if count == 0 {
            return Ok(());
        }
        // Dropping the sectors would expose the layer below; if that is not zero, hold the
        // range as known zeros instead.
        state.unmap(sector, end, !next_is_zero);
        Ok(())
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Zeroes
    }

    fn write_no_overwrite(&self) -> Option<impl WriteNoOverwrite> {
        Some(self)
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        loop {
            let listener = self.resized.listen();
            let current = LayerIo::sector_count(self);
            if current != sector_count {
                return current;
            }
            listener.await;
        }
    }
}

impl WriteNoOverwrite for &RamLayer {
    async fn write_no_overwrite(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        buffers.validate()?;
        let mut state = self.state.write();
        let end = state.check(sector, (buffers.len() >> self.sector_shift) as u64)?;
        state.write(buffers, sector, end, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::{Disk, DiskIo};
    use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayeredDisk};
    use futures::executor::block_on;
    use request_buffers::OwnedRequestBuffers;
    use std::sync::Arc;

    /// A RAM layer over a base disk full of 0xbb.
    fn overlay() -> (Arc<RamLayer>, Disk) {
        let base = crate::RamDisk::new(1 << 30, 512).unwrap();
        let fill = OwnedRequestBuffers::from_slice(&[0xbb; 64 * 512]);
        block_on(base.write_vectored(&fill.buffers(false), 0, false)).unwrap();
        let ram = Arc::new(RamLayer::new(1 << 30, 512).unwrap());
        let disk = LayeredDisk::new(
            false,
            vec![
                LayerConfiguration::new(DiskLayer::new(ram.clone())),
                LayerConfiguration::new(DiskLayer::new(DiskAsLayer::new(
                    Disk::new(base.with_read_only(true)).unwrap(),
                ))),
            ],
        )
        .unwrap();
        (ram, Disk::new(disk).unwrap())
    }

    fn read(disk: &Disk, sector: u64, sectors: usize) -> Vec<u8> {
        let buf = OwnedRequestBuffers::new(sectors * 512);
        block_on(disk.read_vectored(&buf.buffers(true), sector)).unwrap();
        buf.to_vec()
    }

    #[test]
    fn unmap_over_nonzero_layer_records_one_zero_run() {
        let (ram, disk) = overlay();
        // Unmap (almost) the whole terabyte-scale layer: one entry, no data.
        block_on(disk.unmap(2, (1 << 30) - 4, false)).unwrap();
        assert_eq!(ram.state.read().entry_count(), 1);
        assert_eq!(ram.allocated_bytes(), 0);
        let got = read(&disk, 0, 8);
        assert!(got[..1024].iter().all(|&b| b == 0xbb));
        assert!(got[1024..].iter().all(|&b| b == 0));
        // Writing into the run makes a chunk of the run's first sectors (known zero but
        // for the one written) and leaves the rest of the run whole.
        let data = OwnedRequestBuffers::from_slice(&[1; 512]);
        block_on(disk.write_vectored(&data.buffers(false), 5, false)).unwrap();
        assert_eq!(ram.state.read().entry_count(), 2);
        let got = read(&disk, 4, 3);
        assert_eq!(&got[..512], &[0; 512]);
        assert_eq!(&got[512..1024], &[1; 512]);
        assert_eq!(&got[1024..], &[0; 512]);
    }

    #[test]
    fn write_no_overwrite_fills_only_gaps() {
        let ram = Arc::new(RamLayer::new(64, 512).unwrap());
        let newer = OwnedRequestBuffers::from_slice(&[2; 512]);
        block_on(LayerIo::write(&*ram, &newer.buffers(false), 3, false)).unwrap();
        block_on(LayerIo::unmap(&*ram, 6, 2, false, false)).unwrap();
        let cache = OwnedRequestBuffers::from_slice(&[9; 10 * 512]);
        let writer = LayerIo::write_no_overwrite(&*ram).unwrap();
        block_on(writer.write_no_overwrite(&cache.buffers(false), 0)).unwrap();
        let disk = Disk::new(crate::RamDisk::from_layer(ram.clone(), false)).unwrap();
        let got = read(&disk, 0, 10);
        for (s, want) in [
            (0, 9),
            (2, 9),
            (3, 2),
            (4, 9),
            (6, 0),
            (7, 0),
            (8, 9),
            (9, 9),
        ] {
            assert_eq!(got[s * 512], want, "sector {s}");
        }
        assert!(matches!(
            block_on(writer.write_no_overwrite(&cache.buffers(false), 60)),
            Err(DiskError::IllegalBlock)
        ));
    }

    #[test]
    fn may_hold_is_exact_at_the_edges() {
        let ram = RamLayer::new(1000, 512).unwrap();
        assert!(!ram.may_hold(0, 1000));
        let one = OwnedRequestBuffers::from_slice(&[1; 512]);
        block_on(LayerIo::write(&ram, &one.buffers(false), 10, false)).unwrap();
        block_on(LayerIo::unmap(&ram, 100, 50, false, false)).unwrap();
        for (sector, count, expected) in [
            (0, 10, false),
            (0, 11, true),
            (10, 1, true),
            (11, 89, false),
            (99, 2, true),
            (149, 1, true),
            (150, 850, false),
            (u64::MAX, u64::MAX, false),
            (0, u64::MAX, true),
        ] {
            assert_eq!(
                ram.may_hold(sector, count),
                expected,
                "{count} sectors at {sector}"
            );
        }
    }

    #[test]
    fn lazy_layer_takes_the_lower_geometry() {
        let lower = LowerLayerMetadata {
            sector_count: 77,
            sector_size: 4096,
            physical_sector_size: 4096,
            disk_id: None,
        };
        let layer = RamLayer::lazy().attach(Some(&lower)).unwrap();
        assert_eq!(
            (LayerIo::sector_count(&layer), LayerIo::sector_size(&layer)),
            (77, 4096)
        );
        assert_eq!(
            RamLayer::lazy().attach(None).unwrap_err(),
            RamDiskError::NoLowerLayer
        );
        let sized = RamLayerConfig {
            sector_count: Some(5),
            sector_size: Some(512),
        };
        assert_eq!(LayerIo::sector_count(&sized.attach(None).unwrap()), 5);
    }

    #[test]
    fn resize_wakes_waiters() {
        let ram = Arc::new(RamLayer::new(10, 512).unwrap());
        let waiter = std::thread::spawn({
            let ram = ram.clone();
            move || block_on(LayerIo::wait_resize(&*ram, 10))
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        ram.resize(20).unwrap();
        assert_eq!(waiter.join().unwrap(), 20);
        assert_eq!(block_on(LayerIo::wait_resize(&*ram, 10)), 20);
    }
}
