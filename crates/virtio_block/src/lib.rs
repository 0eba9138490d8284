//! A virtio 1.x block device: split virtqueues, the MMIO transport, and two engines.
//!
//! The device core and the transport are separate layers:
//!
//! - [`VirtioDevice`] is what any transport drives: features, queue configuration,
//!   configuration space, activation, notifications, reset, queue state. [`BlockDevice`]
//!   implements it; nothing in it knows about MMIO, so a vhost-user server can serve the same
//!   device with the peer owning the transport.
//! - [`VirtioMmioTransport`] implements the virtio-mmio register layout (version 2) over any
//!   [`VirtioDevice`], and interrupts through an [`IrqLine`] (a callback or an eventfd).
//! - [`queue`] and [`descriptor`] are the split virtqueue: chains (direct and indirect),
//!   `EVENT_IDX` suppression both ways, and the memory ordering of the ring updates.
//! - [`request`] parses and validates a chain into a block request; [`engine`] serves it,
//!   either inline through a blocking [`BlockBackend`] ([`SyncFileBackend`]) or
//!   asynchronously over any [`Disk`](disk_backend::Disk) with many requests in flight.
//!
//! The device offers `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`, `BLK_SIZE`,
//! `SEG_MAX`, `TOPOLOGY`, `FLUSH`, `CONFIG_WCE` and `MQ`; `RO` for a read-only disk, else
//! `WRITE_ZEROES`, and `DISCARD` when the disk's unmap does something. It serves `IN`,
//! `OUT`, `FLUSH`, `GET_ID`, `DISCARD` and `WRITE_ZEROES`; anything else gets `UNSUPP`. A
//! disk resize raises a configuration-change interrupt with the new capacity.
//!
//! Nothing the guest writes is trusted: every address goes through bounds-checked
//! [`GuestMemory`](guestmem::GuestMemory) accessors, chains are bounded by the queue size,
//! and a driver that breaks the queue protocol gets `DEVICE_NEEDS_RESET`, never a panic.
//!
//! With the `test-utils` feature, `harness` is an in-process virtio driver that negotiates
//! through the MMIO registers the way Linux does and posts requests.
//!
//! ```
//! use disk_backend::Disk;
//! use disk_ram::RamDisk;
//! use guestmem::GuestMemory;
//! use virtio_block::{BlockConfig, BlockDevice, IrqLine, VirtioMmioTransport, spec};
//!
//! let disk = Disk::new(RamDisk::new(2048, 512)?)?;
//! let device = BlockDevice::new(BlockConfig::default(), disk)?;
//! let mem = GuestMemory::allocate(1 << 20);
//! let mut mmio = VirtioMmioTransport::new(device, mem, IrqLine::new(|| {}));
//!
//! let mut word = [0; 4];
//! mmio.read(spec::mmio::MAGIC_VALUE, &mut word);
//! assert_eq!(u32::from_le_bytes(word), spec::mmio::MAGIC);
//! mmio.read(spec::mmio::DEVICE_ID, &mut word);
//! assert_eq!(u32::from_le_bytes(word), spec::device_type::BLOCK);
//! let mut capacity = [0; 8];
//! mmio.read(spec::mmio::CONFIG, &mut capacity);
//! assert_eq!(u64::from_le_bytes(capacity), 2048);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod block;
pub mod config;
pub mod descriptor;
mod device;
pub mod engine;
#[cfg(feature = "test-utils")]
pub mod harness;
pub mod queue;
pub mod request;
pub mod spec;
mod transport;

pub use block::{Backend, BlockDevice};
pub use config::{BlockConfig, NewDeviceError};
pub use device::{
    ActivateError, ConfigState, IrqLine, RestoreError, VirtioDevice, VirtioDeviceType,
    VirtioInterrupt,
};
pub use engine::sync::{BlockBackend, SyncFileBackend};
pub use queue::{InflightLog, QueueConfig, QueueState};
pub use transport::{MmioState, VENDOR_ID, VirtioMmioTransport};
