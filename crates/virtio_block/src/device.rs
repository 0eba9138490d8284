//! What a virtio device is to its transport.
//!
//! [`VirtioDevice`] is everything a transport needs: feature bits, queue configuration,
//! configuration space, activation, notifications and reset. The MMIO transport
//! ([`VirtioMmioTransport`](crate::VirtioMmioTransport)) drives a device only through this
//! trait, so another transport (vhost-user, where the peer owns the registers) can serve the
//! same device. Interrupts go out through [`VirtioInterrupt`], which each transport
//! implements its own way; the MMIO transport's is backed by an [`IrqLine`].

use crate::queue::{QueueConfig, QueueError, QueueState};
use guestmem::GuestMemory;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use thiserror::Error;

/// How a device tells the driver something happened. Implemented by each transport.
///
/// Both methods may be called from any thread (an I/O completion thread, the thread that
/// rang the doorbell) and must not block on the transport's own lock.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16);

    /// The device changed its configuration space (or set `DEVICE_NEEDS_RESET`).
    fn signal_config_change(&self);
}

/// An interrupt line a VMM connects to its interrupt controller: a callback, or an eventfd
/// (an `irqfd` in KVM).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use virtio_block::IrqLine;
///
/// let raised = Arc::new(AtomicU32::new(0));
/// let line = IrqLine::new({
///     let raised = raised.clone();
///     move || { raised.fetch_add(1, Ordering::Relaxed); }
/// });
/// line.raise();
/// assert_eq!(raised.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone)]
pub struct IrqLine {
    raise: Arc<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IrqLine")
    }
}

impl IrqLine {
    /// A line that calls `raise` each time the device interrupts.
    pub fn new(raise: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            raise: Arc::new(raise),
        }
    }

    /// A line that adds 1 to the eventfd `fd` each time the device interrupts (8 bytes,
    /// native endian, as eventfd expects; a pipe works too).
    ///
    /// `fd` is made non-blocking (`O_NONBLOCK`; the flag belongs to the open file, so it
    /// holds for every descriptor of it, the sender's too), so that a full counter or pipe
    /// makes a write fail rather than block the thread that completes requests. A failed
    /// write is dropped: it means the interrupt is pending already (a counter at its maximum,
    /// a pipe nobody reads). Fails if the flag cannot be set (not an open descriptor).
    pub fn eventfd(fd: OwnedFd) -> std::io::Result<Self> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        let file = std::fs::File::from(fd);
        Ok(Self::new(move || {
            let _ = (&file).write(&1u64.to_ne_bytes());
        }))
    }

    /// Raises the line.
    pub fn raise(&self) {
        (self.raise)()
    }
}

/// The device types this crate knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioDeviceType {
    /// A block device (id 2).
    Block,
}

impl VirtioDeviceType {
    /// The id the transport reports (`DeviceID`).
    pub fn id(self) -> u32 {
        match self {
            Self::Block => crate::spec::device_type::BLOCK,
        }
    }
}

/// Activating a device failed; the transport reports `DEVICE_NEEDS_RESET`.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The device is already active.
    #[error("device already activated")]
    AlreadyActive,
    /// A ready queue is misconfigured or outside guest memory.
    #[error("queue {index} cannot go live")]
    Queue {
        /// The queue.
        index: u16,
        /// Why.
        #[source]
        source: QueueError,
    },
    /// The device's I/O thread could not be started.
    #[error("cannot start the device's i/o thread")]
    Thread(#[source] std::io::Error),
}

/// Restoring saved queue state failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RestoreError {
    /// The state has a different number of queues than the device.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the saved state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// The device is active; state can only be restored before activation.
    #[error("device is active")]
    Active,
    /// The saved transport state is not one the transport can be in.
    #[error("invalid saved transport state: {0}")]
    InvalidState(&'static str),
    /// The saved state has a format version this build does not read.
    #[error("saved state has format version {saved}, this build reads version {supported}")]
    Version {
        /// The version in the saved state.
        saved: u32,
        /// The version this build writes and reads.
        supported: u32,
    },
}

/// The run-time part of a device's configuration space, for a snapshot: what the driver
/// wrote and what it has seen change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The configuration generation the driver last read. A restore keeps it (and moves it
    /// on if the configuration changed meanwhile), so the driver never sees it go back.
    pub generation: u32,
    /// The size the configuration space reported, in the device's own unit (512-byte
    /// sectors for a block device): a restore over a disk that changed size meanwhile
    /// announces the change.
    pub capacity: u64,
    /// The cache mode the driver chose (the block device's `writeback` field, `CONFIG_WCE`);
    /// `None` for a device without one.
    pub writeback: Option<bool>,
}

/// A virtio device, as seen by a transport.
///
/// Lifecycle: the transport negotiates features ([`avail_features`](Self::avail_features),
/// [`set_acked_features`](Self::set_acked_features)) and configures queues
/// ([`queues_mut`](Self::queues_mut)), then calls [`activate`](Self::activate) once, on
/// `DRIVER_OK`. From then on notifications arrive through
/// [`process_queue`](Self::process_queue), until [`reset`](Self::reset).
///
/// `process_queue` takes `&self`: a transport may call it from one thread per queue at once
/// (behind a read lock, say, with the control path's `&mut self` calls behind the write
/// lock), and the queues are then served in parallel.
pub trait VirtioDevice: Send + Sync {
    /// The device type.
    fn device_type(&self) -> VirtioDeviceType;

    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// The feature bits the driver accepted.
    fn acked_features(&self) -> u64;

    /// Records the driver's feature bits. The transport checks them against
    /// [`avail_features`](Self::avail_features) before it lets `FEATURES_OK` stick.
    fn set_acked_features(&mut self, features: u64);

    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The queues' configuration.
    fn queues(&self) -> &[QueueConfig];

    /// The queues' configuration, for the transport to fill in before activation.
    fn queues_mut(&mut self) -> &mut [QueueConfig];

    /// The configuration generation: changes whenever the configuration space does.
    fn config_generation(&self) -> u32;

    /// Reads `data.len()` bytes of configuration space at `offset`. Bytes past the end read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes configuration space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Takes guest memory and the interrupt and brings the ready queues live. Called once,
    /// when the driver sets `DRIVER_OK`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;

    /// Whether [`activate`](Self::activate) succeeded and no reset happened since.
    fn is_activated(&self) -> bool;

    /// The driver notified queue `queue_index`. Ignored for a queue that does not exist or
    /// is not live. Never blocks on I/O in an asynchronous device. Calls for different
    /// queues run in parallel; calls for the same queue are serialised by the device.
    fn process_queue(&self, queue_index: u16);

    /// Whether the device hit an error only a reset can clear (`DEVICE_NEEDS_RESET`).
    fn needs_reset(&self) -> bool;

    /// Returns the device to its initial state: waits for requests in flight, forgets the
    /// features and queue configuration, clears any error.
    fn reset(&mut self);

    /// Waits for the requests in flight, stops the device and returns each queue's indices,
    /// for a snapshot. The device is left stopped (as after a reset, but keeping its
    /// configuration); restore the state into a new device to continue.
    fn save_queues(&mut self) -> Vec<QueueState>;

    /// Sets the indices activation resumes from (each queue starts at zero otherwise).
    fn restore_queues(&mut self, states: &[QueueState]) -> Result<(), RestoreError>;

    /// The configuration state a snapshot carries.
    fn save_config(&self) -> ConfigState;

    /// Restores configuration state saved by [`save_config`](Self::save_config), before
    /// activation. If the device's configuration differs from the saved one (a disk
    /// resized while the snapshot was stored), the generation moves past the saved one.
    fn restore_config(&mut self, state: &ConfigState) -> Result<(), RestoreError>;
}
