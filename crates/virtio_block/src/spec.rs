//! Numbers from the virtio 1.x specification: feature bits, device status bits, ring flags,
//! MMIO registers and the block device's request types and statuses.
//!
//! Everything on the wire is little-endian.

/// Feature bits (bit numbers are the spec's; the constants are masks).
pub mod features {
    /// `VIRTIO_BLK_F_SIZE_MAX` (1): `size_max` holds the largest segment. Not offered.
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    /// `VIRTIO_BLK_F_SEG_MAX` (2): `seg_max` holds the most data segments per request.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_GEOMETRY` (4): legacy CHS geometry. Not offered.
    pub const BLK_GEOMETRY: u64 = 1 << 4;
    /// `VIRTIO_BLK_F_RO` (5): the device is read-only.
    pub const BLK_RO: u64 = 1 << 5;
    /// `VIRTIO_BLK_F_BLK_SIZE` (6): `blk_size` holds the logical block size.
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH` (9): the `FLUSH` request exists.
    pub const BLK_FLUSH: u64 = 1 << 9;
    /// `VIRTIO_BLK_F_TOPOLOGY` (10): `topology` is valid.
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    /// `VIRTIO_BLK_F_CONFIG_WCE` (11): the driver can switch the cache mode (`writeback`).
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    /// `VIRTIO_BLK_F_MQ` (12): `num_queues` request queues.
    pub const BLK_MQ: u64 = 1 << 12;
    /// `VIRTIO_BLK_F_DISCARD` (13): the `DISCARD` request exists.
    pub const BLK_DISCARD: u64 = 1 << 13;
    /// `VIRTIO_BLK_F_WRITE_ZEROES` (14): the `WRITE_ZEROES` request exists.
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    /// `VIRTIO_RING_F_INDIRECT_DESC` (28): descriptors may point at indirect tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `VIRTIO_RING_F_EVENT_IDX` (29): `used_event`/`avail_event` suppress notifications.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1` (32): a virtio 1.x (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (the `Status` register).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Split virtqueue flags.
pub mod ring {
    /// Descriptor flag: the chain continues at `next`.
    pub const DESC_F_NEXT: u16 = 1;
    /// Descriptor flag: the buffer is device-writable (otherwise device-readable).
    pub const DESC_F_WRITE: u16 = 2;
    /// Descriptor flag: the buffer is a table of indirect descriptors.
    pub const DESC_F_INDIRECT: u16 = 4;
    /// Available ring flag: the driver asks for no interrupts (ignored under `EVENT_IDX`).
    pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
    /// Used ring flag: the device asks for no notifications (ignored under `EVENT_IDX`).
    pub const USED_F_NO_NOTIFY: u16 = 1;
    /// The largest queue size a split virtqueue can have.
    pub const MAX_QUEUE_SIZE: u16 = 32768;
}

/// Device types (the `DeviceID` register).
pub mod device_type {
    /// A block device.
    pub const BLOCK: u32 = 2;
}

/// The virtio-mmio register layout, version 2 (offsets in bytes).
pub mod mmio {
    /// `0x74726976`, "virt" in little-endian ASCII.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 2 for the non-legacy layout.
    pub const VERSION: u64 = 0x004;
    /// The device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// The vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits of the device, the window picked by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32-bit window `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 feature bits the driver accepts, the window picked by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32-bit window `DRIVER_FEATURES` writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Which queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// The largest size of the selected queue; 0 if it does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// The size the driver chose for the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Written with a queue index to notify the device.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Why the interrupt was raised: bit 0 used buffers, bit 1 configuration change.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Written with the bits of `INTERRUPT_STATUS` the driver handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// The device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver area (available ring) address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Driver area (available ring) address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Device area (used ring) address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Device area (used ring) address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Changes whenever the device changes its configuration space.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;

    /// The value of `MAGIC_VALUE`.
    pub const MAGIC: u32 = 0x7472_6976;
    /// The value of `VERSION` for the modern layout.
    pub const VERSION_2: u32 = 2;
    /// `INTERRUPT_STATUS` bit: the device used buffers.
    pub const INT_USED_RING: u32 = 1;
    /// `INTERRUPT_STATUS` bit: the configuration changed.
    pub const INT_CONFIG: u32 = 2;
}

/// The block device's requests and statuses.
pub mod blk {
    /// Read sectors into device-writable buffers.
    pub const T_IN: u32 = 0;
    /// Write sectors from device-readable buffers.
    pub const T_OUT: u32 = 1;
    /// Make completed writes durable.
    pub const T_FLUSH: u32 = 4;
    /// Return the 20-byte device id.
    pub const T_GET_ID: u32 = 8;
    /// Return lifetime information (not supported: `UNSUPP`).
    pub const T_GET_LIFETIME: u32 = 10;
    /// Discard (unmap) sector ranges.
    pub const T_DISCARD: u32 = 11;
    /// Write zeros to sector ranges, optionally unmapping them.
    pub const T_WRITE_ZEROES: u32 = 13;
    /// Securely erase sector ranges (not supported: `UNSUPP`).
    pub const T_SECURE_ERASE: u32 = 14;

    /// The request succeeded.
    pub const S_OK: u8 = 0;
    /// The request failed.
    pub const S_IOERR: u8 = 1;
    /// The request type (or a flag of it) is not supported.
    pub const S_UNSUPP: u8 = 2;

    /// The `unmap` flag of a write-zeroes segment.
    pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

    /// Bytes in a `GET_ID` answer.
    pub const ID_BYTES: usize = 20;
    /// virtio-blk addresses sectors of 512 bytes whatever the block size.
    pub const SECTOR_SHIFT: u32 = 9;
}
