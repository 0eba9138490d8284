//! The virtio block device.

use crate::config::{BlockConfig, NewDeviceError, VirtioBlkConfig, limits};
use crate::device::{
    ActivateError, ConfigState, RestoreError, VirtioDevice, VirtioDeviceType, VirtioInterrupt,
};
use crate::engine::disk::DiskEngine;
use crate::engine::sync::{BlockBackend, SyncEngine};
use crate::engine::{Capacity, DeviceShared, EngineContext};
use crate::queue::{InflightLog, QueueConfig, QueueState, SplitQueue};
use crate::request::RequestLimits;
use crate::spec::{blk, features};
use disk_backend::{Disk, UnmapBehavior};
use guestmem::GuestMemory;
use parking_lot::Mutex;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use zerocopy::IntoBytes;

/// What serves a [`BlockDevice`]'s requests.
pub enum Backend {
    /// Blocking storage, served inline on the thread that rings the doorbell.
    Sync(Arc<dyn BlockBackend>),
    /// Any disk, served asynchronously with many requests in flight.
    Disk(Disk),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sync(b) => f
                .debug_struct("Sync")
                .field("size_bytes", &b.size_bytes())
                .finish(),
            Self::Disk(d) => f.debug_tuple("Disk").field(d).finish(),
        }
    }
}

impl From<Disk> for Backend {
    fn from(disk: Disk) -> Self {
        Self::Disk(disk)
    }
}

impl From<Arc<dyn BlockBackend>> for Backend {
    fn from(backend: Arc<dyn BlockBackend>) -> Self {
        Self::Sync(backend)
    }
}

impl<B: BlockBackend + 'static> From<Arc<B>> for Backend {
    fn from(backend: Arc<B>) -> Self {
        Self::Sync(backend)
    }
}

/// What [`BlockDevice::set_queue_inflight`] hands to a queue at activation.
type QueueInflight = (Arc<dyn InflightLog>, Vec<u16>);

enum Engine {
    Sync(SyncEngine),
    Disk(DiskEngine),
}

/// A virtio-blk device: request queues, configuration space and one of two engines.
///
/// Put it behind a transport ([`VirtioMmioTransport`](crate::VirtioMmioTransport)) to give
/// it to a guest. See the [crate documentation](crate) for what it offers.
pub struct BlockDevice {
    backend: Backend,
    config: BlockConfig,
    sector_shift: u32,
    physical_block_exp: u8,
    read_only: bool,
    discard_alignment: u32,
    write_zeroes_may_unmap: bool,
    id: [u8; blk::ID_BYTES],
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    restored: Vec<QueueState>,
    /// Per queue, the inflight log and the heads to resubmit that the next activation hands
    /// to the queue (see [`BlockDevice::set_queue_inflight`]).
    inflight: Vec<Option<QueueInflight>>,
    shared: Arc<DeviceShared>,
    engine: Option<Engine>,
}

impl fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDevice")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .field(
                "avail_features",
                &format_args!("{:#x}", self.avail_features),
            )
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("activated", &self.engine.is_some())
            .finish()
    }
}

impl BlockDevice {
    /// A block device over `backend` (a [`Disk`], or an `Arc` of a [`BlockBackend`]). A
    /// `BlockBackend` whose size is not a whole number of its blocks is refused
    /// ([`NewDeviceError::PartialBlock`]), as `FileDisk` refuses a partial last sector.
    pub fn new(config: BlockConfig, backend: impl Into<Backend>) -> Result<Self, NewDeviceError> {
        let backend = backend.into();
        if config.num_queues == 0 {
            return Err(NewDeviceError::NoQueues);
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 4 {
            return Err(NewDeviceError::QueueSize(config.queue_size));
        }
        if let Some(seg_max) = config.seg_max
            && (seg_max == 0 || seg_max > u32::from(config.queue_size - 2))
        {
            return Err(NewDeviceError::SegMax(seg_max));
        }
        let (block_size, physical, read_only, sectors, disk_id) = match &backend {
            Backend::Sync(b) => {
                let bs = b.block_size();
                (
                    bs,
                    bs,
                    b.read_only(),
                    b.size_bytes() / u64::from(bs.max(1)),
                    None,
                )
            }
            Backend::Disk(d) => (
                d.sector_size(),
                d.physical_sector_size(),
                d.is_read_only(),
                d.sector_count(),
                d.disk_id(),
            ),
        };
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(NewDeviceError::BlockSize(block_size));
        }
        if let Backend::Sync(b) = &backend
            && !b.size_bytes().is_multiple_of(u64::from(block_size))
        {
            return Err(NewDeviceError::PartialBlock {
                size_bytes: b.size_bytes(),
                block_size,
            });
        }
        let read_only = read_only || config.read_only;
        let id = match &config.serial {
            Some(serial) if serial.len() > blk::ID_BYTES => {
                return Err(NewDeviceError::SerialTooLong(serial.len()));
            }
            Some(serial) => {
                let mut id = [0; blk::ID_BYTES];
                id[..serial.len()].copy_from_slice(serial);
                id
            }
            None => disk_id.map_or([0; blk::ID_BYTES], |disk_id| {
                // 20 hex digits of the disk's id: printable, as drivers show it as a serial.
                let mut id = [0; blk::ID_BYTES];
                for (i, byte) in disk_id[..blk::ID_BYTES / 2].iter().enumerate() {
                    id[2 * i..2 * i + 2].copy_from_slice(format!("{byte:02x}").as_bytes());
                }
                id
            }),
        };
        let mut avail_features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | features::BLK_SEG_MAX
            | features::BLK_BLK_SIZE
            | features::BLK_TOPOLOGY
            | features::BLK_FLUSH
            | features::BLK_CONFIG_WCE
            | features::BLK_MQ;
        let mut discard_alignment = 0;
        let mut write_zeroes_may_unmap = false;
        if read_only {
            avail_features |= features::BLK_RO;
        } else {
            avail_features |= features::BLK_WRITE_ZEROES;
            if let Backend::Disk(disk) = &backend {
                if disk.unmap_behavior() != UnmapBehavior::Ignored {
                    avail_features |= features::BLK_DISCARD;
                    discard_alignment =
                        disk.optimal_unmap_sectors() * (disk.sector_size() >> blk::SECTOR_SHIFT);
                }
                write_zeroes_may_unmap = disk.unmap_behavior() == UnmapBehavior::Zeroes;
            }
        }
        let sector_shift = block_size.trailing_zeros();
        Ok(Self {
            sector_shift,
            physical_block_exp: (physical / block_size).trailing_zeros() as u8,
            read_only,
            discard_alignment,
            write_zeroes_may_unmap,
            id,
            avail_features,
            acked_features: 0,
            queue_max_sizes: vec![config.queue_size; config.num_queues.into()],
            queues: vec![QueueConfig::new(config.queue_size); config.num_queues.into()],
            restored: vec![QueueState::default(); config.num_queues.into()],
            inflight: vec![None; config.num_queues.into()],
            shared: Arc::new(DeviceShared {
                needs_reset: AtomicBool::new(false),
                writeback: AtomicBool::new(config.writeback),
                capacity: Mutex::new(Capacity {
                    sectors,
                    generation: 0,
                }),
            }),
            backend,
            config,
            engine: None,
        })
    }

    /// Has queue `index` record what it pops and completes in `log` once the device is next
    /// activated, and serve `resubmit` (heads a previous device popped and never completed,
    /// oldest first) before anything new. The transport restores the queue's indices to
    /// match ([`restore_queues`](VirtioDevice::restore_queues): `next_avail` counts the heads
    /// to resubmit as popped). This is the hook vhost-user's inflight tracking needs (see
    /// [`InflightLog`]); it holds until the next activation, which consumes it, or a reset.
    ///
    /// Returns `false` (and does nothing) if the queue does not exist or the device is
    /// active.
    pub fn set_queue_inflight(
        &mut self,
        index: u16,
        log: Arc<dyn InflightLog>,
        resubmit: Vec<u16>,
    ) -> bool {
        if self.engine.is_some() {
            return false;
        }
        match self.inflight.get_mut(usize::from(index)) {
            Some(slot) => {
                *slot = Some((log, resubmit));
                true
            }
            None => false,
        }
    }

    /// The size in 512-byte sectors, as the configuration space reports it.
    pub fn capacity_sectors(&self) -> u64 {
        self.refresh_capacity() << (self.sector_shift - blk::SECTOR_SHIFT)
    }

    /// Whether the device presents the disk read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The current size in disk sectors. A resize the watcher has not seen yet (or any
    /// resize before activation) is picked up here, so the generation moves with it.
    fn refresh_capacity(&self) -> u64 {
        if let Backend::Disk(disk) = &self.backend {
            self.shared.set_capacity(disk.sector_count());
        }
        self.shared.capacity.lock().sectors
    }

    fn config_space(&self) -> VirtioBlkConfig {
        let capacity = self.capacity_sectors();
        let block_size = 1u32 << self.sector_shift;
        let mut config = VirtioBlkConfig {
            capacity: capacity.into(),
            // Every descriptor of a chain but the header and the status may carry data.
            seg_max: self
                .config
                .seg_max
                .unwrap_or(u32::from(self.config.queue_size - 2))
                .into(),
            blk_size: block_size.into(),
            physical_block_exp: self.physical_block_exp,
            alignment_offset: 0,
            min_io_size: (1u16 << self.physical_block_exp).into(),
            opt_io_size: 0.into(),
            writeback: self.shared.writeback.load(Ordering::Relaxed).into(),
            num_queues: self.config.num_queues.into(),
            ..Default::default()
        };
        if self.avail_features & features::BLK_DISCARD != 0 {
            config.max_discard_sectors = limits::MAX_DISCARD_SECTORS.into();
            config.max_discard_seg = limits::MAX_DISCARD_SEG.into();
            config.discard_sector_alignment = self.discard_alignment.into();
        }
        if self.avail_features & features::BLK_WRITE_ZEROES != 0 {
            config.max_write_zeroes_sectors = limits::MAX_WRITE_ZEROES_SECTORS.into();
            config.max_write_zeroes_seg = limits::MAX_WRITE_ZEROES_SEG.into();
            config.write_zeroes_may_unmap = self.write_zeroes_may_unmap.into();
        }
        config
    }

    fn stop_engine(&mut self) -> Option<Vec<Option<QueueState>>> {
        match self.engine.take()? {
            Engine::Sync(engine) => Some(engine.queue_states()),
            Engine::Disk(mut engine) => Some(engine.stop()),
        }
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Block
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [QueueConfig] {
        &mut self.queues
    }

    fn config_generation(&self) -> u32 {
        self.refresh_capacity();
        self.shared.capacity.lock().generation
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let bytes = config.as_bytes();
        data.fill(0);
        if let Ok(start) = usize::try_from(offset)
            && start < bytes.len()
        {
            let n = (bytes.len() - start).min(data.len());
            data[..n].copy_from_slice(&bytes[start..start + n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` is the only writable field, and only with CONFIG_WCE.
        if offset == VirtioBlkConfig::WRITEBACK_OFFSET
            && data.len() == 1
            && self.avail_features & features::BLK_CONFIG_WCE != 0
        {
            self.shared.writeback.store(data[0] != 0, Ordering::Relaxed);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.engine.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let features = self.acked_features & self.avail_features;
        let indirect = features & features::RING_INDIRECT_DESC != 0;
        let event_idx = features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, (config, state)) in self.queues.iter().zip(&self.restored).enumerate() {
            if !config.ready {
                queues.push(None);
                continue;
            }
            let mut queue = SplitQueue::new(mem.clone(), config, *state, indirect, event_idx)
                .map_err(|source| ActivateError::Queue {
                    index: index as u16,
                    source,
                })?;
            if let Some((log, resubmit)) = self.inflight[index].take() {
                queue.set_inflight(log, resubmit);
            }
            queues.push(Some(queue));
        }
        let ctx = EngineContext {
            mem,
            interrupt,
            shared: self.shared.clone(),
            limits: RequestLimits {
                sector_shift: self.sector_shift,
                features,
                read_only: self.read_only,
                id: self.id,
            },
        };
        let capacity = self.refresh_capacity();
        self.engine = Some(match &self.backend {
            Backend::Sync(backend) => {
                Engine::Sync(SyncEngine::new(backend.clone(), ctx, capacity, queues))
            }
            Backend::Disk(disk) => {
                // Lets the backend prepare guest memory for zero-copy I/O (io_uring fixed
                // buffers). Only a hint: on failure the disk serves requests as before, and
                // activation must not fail for it.
                let _ = disk.register_memory(&ctx.mem);
                let engine = DiskEngine::start(disk.clone(), ctx, queues).map_err(|e| {
                    let _ = disk.register_memory(&GuestMemory::empty());
                    ActivateError::Thread(e)
                })?;
                Engine::Disk(engine)
            }
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.engine.is_some()
    }

    fn process_queue(&self, queue_index: u16) {
        match &self.engine {
            Some(Engine::Sync(engine)) => engine.process(queue_index),
            Some(Engine::Disk(engine)) => engine.process(queue_index),
            None => {}
        }
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset.load(Ordering::Acquire)
    }

    fn reset(&mut self) {
        self.stop_engine();
        if let Backend::Disk(disk) = &self.backend {
            // The guest memory announced at activation may go away with the driver (a
            // vhost-user frontend that disconnects): let the disk forget it.
            let _ = disk.register_memory(&GuestMemory::empty());
        }
        self.acked_features = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        self.restored.fill(QueueState::default());
        self.inflight.fill(None);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared
            .writeback
            .store(self.config.writeback, Ordering::Relaxed);
    }

    fn save_queues(&mut self) -> Vec<QueueState> {
        let live = self.stop_engine().unwrap_or_default();
        self.restored
            .iter()
            .enumerate()
            .map(|(i, restored)| live.get(i).copied().flatten().unwrap_or(*restored))
            .collect()
    }

    fn save_config(&self) -> ConfigState {
        let capacity = self.capacity_sectors();
        ConfigState {
            generation: self.shared.capacity.lock().generation,
            capacity,
            writeback: Some(self.shared.writeback.load(Ordering::Relaxed)),
        }
    }

    fn restore_config(&mut self, state: &ConfigState) -> Result<(), RestoreError> {
        if self.engine.is_some() {
            return Err(RestoreError::Active);
        }
        if let Some(writeback) = state.writeback {
            self.shared.writeback.store(writeback, Ordering::Relaxed);
        }
        let sectors = self.refresh_capacity();
        let mut capacity = self.shared.capacity.lock();
        capacity.generation = state.generation;
        if sectors << (self.sector_shift - blk::SECTOR_SHIFT) != state.capacity {
            // The driver last saw another size: a new generation tells it to look again.
            capacity.generation = capacity.generation.wrapping_add(1);
        }
        Ok(())
    }

    fn restore_queues(&mut self, states: &[QueueState]) -> Result<(), RestoreError> {
        if self.engine.is_some() {
            return Err(RestoreError::Active);
        }
        if states.len() != self.restored.len() {
            return Err(RestoreError::QueueCount {
                saved: states.len(),
                device: self.restored.len(),
            });
        }
        self.restored.copy_from_slice(states);
        Ok(())
    }
}
