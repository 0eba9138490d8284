//! The engines that serve block requests once the device is live.
//!
//! - [`sync`]: a [`BlockBackend`](sync::BlockBackend) served inline on the thread that rang
//!   the doorbell, one request after another (seed design: `SyncFileBackend`, one mutex
//!   around one file).
//! - [`disk`]: any [`Disk`](disk_backend::Disk), with many requests in flight per queue,
//!   completed out of order on a small executor thread the device owns; the doorbell thread
//!   only pops descriptors and starts requests.
//!
//! Both parse requests the same way ([`crate::request`]) and complete them the same way:
//! status byte, used element, interrupt if the driver wants one.

pub mod disk;
pub mod sync;

use crate::device::VirtioInterrupt;
use crate::queue::QueueError;
use crate::request::{DataSegments, RequestLimits};
use crate::spec::{blk, features};
use guestmem::GuestMemory;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The size and its generation, changed together so that a driver that reads the capacity
/// in two halves between two reads of the generation never sees a torn value with an
/// unchanged generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Disk sectors.
    pub sectors: u64,
    /// The configuration generation.
    pub generation: u32,
}

/// State the device and its engine share across threads.
#[derive(Debug)]
pub(crate) struct DeviceShared {
    /// `DEVICE_NEEDS_RESET`.
    pub needs_reset: AtomicBool,
    /// The `writeback` configuration field.
    pub writeback: AtomicBool,
    /// The size and configuration generation.
    pub capacity: Mutex<Capacity>,
}

impl DeviceShared {
    /// Records a new size, bumping the generation if it changed. Returns whether it did.
    pub fn set_capacity(&self, sectors: u64) -> bool {
        let mut capacity = self.capacity.lock();
        if capacity.sectors == sectors {
            return false;
        }
        capacity.sectors = sectors;
        capacity.generation = capacity.generation.wrapping_add(1);
        true
    }
}

/// What an engine needs to serve requests.
pub(crate) struct EngineContext {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub shared: Arc<DeviceShared>,
    pub limits: RequestLimits,
}

impl EngineContext {
    /// Whether the device is in its error state and must not touch the queues.
    pub fn failed(&self) -> bool {
        self.shared.needs_reset.load(Ordering::Acquire)
    }

    /// Enters the error state (once) and tells the driver through a configuration-change
    /// interrupt, as the spec requires for `DEVICE_NEEDS_RESET` after `DRIVER_OK`.
    pub fn fail(&self, _error: QueueError) {
        if !self.shared.needs_reset.swap(true, Ordering::AcqRel) {
            self.interrupt.signal_config_change();
        }
    }

    /// Whether completed writes may sit in a volatile cache until a flush. Without
    /// `CONFIG_WCE` the spec ties the mode to `FLUSH`: a driver that cannot flush gets
    /// writethrough.
    pub fn writeback(&self) -> bool {
        let f = self.limits.features;
        if f & features::BLK_CONFIG_WCE != 0 {
            self.shared.writeback.load(Ordering::Relaxed)
        } else {
            f & features::BLK_FLUSH != 0
        }
    }

    /// Serves `GET_ID`: writes up to 20 bytes of the id. Returns the status and the bytes
    /// written.
    pub fn get_id(&self, data: &DataSegments) -> (u8, u64) {
        let n = data.len().min(blk::ID_BYTES as u64) as usize;
        match data.write_at(&self.mem, 0, &self.limits.id[..n]) {
            Ok(()) => (blk::S_OK, n as u64),
            Err(_) => (blk::S_IOERR, 0),
        }
    }
}
