//! The block device's configuration: what the VMM chooses ([`BlockConfig`]) and what the
//! driver reads at `0x100` ([`VirtioBlkConfig`]).

use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// How the VMM wants a [`BlockDevice`](crate::BlockDevice) set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Request queues (more than one offers `MQ`'s parallelism to the driver). Default 1.
    pub num_queues: u16,
    /// The maximum size of each queue: a power of two from 4 to 32768. Default 256.
    pub queue_size: u16,
    /// Present the disk read-only (`RO`) even if the backend is writable. Default false.
    pub read_only: bool,
    /// Start in writeback cache mode (the driver may switch with `CONFIG_WCE`); in
    /// writethrough mode every write is durable before it completes. Default true.
    pub writeback: bool,
    /// The id `GET_ID` returns (at most 20 bytes, zero-padded). Default: derived from the
    /// disk's id if it has one, else empty.
    pub serial: Option<Vec<u8>>,
    /// The most data segments per request the device advertises (`seg_max`), from 1 to
    /// `queue_size - 2`. Default `queue_size - 2`. A chain must fit the ring the driver
    /// chose, so a transport whose driver picks ring sizes after reading the configuration
    /// (vhost-user) sets this to fit the smallest ring it expects.
    pub seg_max: Option<u32>,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            writeback: true,
            serial: None,
            seg_max: None,
        }
    }
}

/// Creating a [`BlockDevice`](crate::BlockDevice) failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NewDeviceError {
    /// `num_queues` is 0.
    #[error("a block device needs at least one queue")]
    NoQueues,
    /// `queue_size` is not a power of two from 4 to 32768.
    #[error("queue size {0} is not a power of two from 4 to 32768")]
    QueueSize(u16),
    /// The serial is longer than 20 bytes.
    #[error("serial of {0} bytes is longer than 20")]
    SerialTooLong(usize),
    /// `seg_max` is 0 or more than `queue_size - 2`.
    #[error("seg_max {0} is not from 1 to the queue size minus 2")]
    SegMax(u32),
    /// The backend's block size is not a power of two from 512 to 64 KiB.
    #[error("block size {0} is not a power of two from 512 to 65536")]
    BlockSize(u32),
    /// A [`BlockBackend`](crate::BlockBackend)'s size is not a whole number of blocks: its
    /// tail would be out of reach.
    #[error("the backend holds {size_bytes} bytes, not a whole number of {block_size}-byte blocks")]
    PartialBlock {
        /// The backend's size in bytes.
        size_bytes: u64,
        /// The block size in bytes.
        block_size: u32,
    },
}

/// Upper bounds the device advertises for discard and write-zeroes requests.
///
/// Each is non-zero when its feature is offered: some drivers crash on zeros.
pub mod limits {
    /// Most 512-byte sectors in one discard segment (512 GiB).
    pub const MAX_DISCARD_SECTORS: u32 = 1 << 30;
    /// Most segments in one discard request. Bounds what the device reads per request.
    pub const MAX_DISCARD_SEG: u32 = 64;
    /// Most 512-byte sectors in one write-zeroes segment (32 MiB): a write-zeroes without
    /// unmap is written out, so this bounds the work of one request.
    pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;
    /// Most segments in one write-zeroes request.
    pub const MAX_WRITE_ZEROES_SEG: u32 = 64;
}

/// `struct virtio_blk_config`, little-endian, as the driver reads it.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VirtioBlkConfig {
    /// Size in 512-byte sectors, whatever the block size.
    pub capacity: U64,
    /// Largest segment (`SIZE_MAX`, not offered: 0).
    pub size_max: U32,
    /// Most data segments per request (`SEG_MAX`).
    pub seg_max: U32,
    /// Legacy geometry (`GEOMETRY`, not offered: 0).
    pub cylinders: U16,
    /// Legacy geometry.
    pub heads: u8,
    /// Legacy geometry.
    pub sectors: u8,
    /// Logical block size in bytes (`BLK_SIZE`).
    pub blk_size: U32,
    /// log2 of logical blocks per physical block (`TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (`TOPOLOGY`).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks (`TOPOLOGY`).
    pub min_io_size: U16,
    /// Suggested optimal I/O size in logical blocks, 0 for none (`TOPOLOGY`).
    pub opt_io_size: U32,
    /// 1 for writeback, 0 for writethrough (`CONFIG_WCE`: the driver may write it).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Request queues (`MQ`).
    pub num_queues: U16,
    /// Most 512-byte sectors per discard segment (`DISCARD`).
    pub max_discard_sectors: U32,
    /// Most discard segments per request (`DISCARD`).
    pub max_discard_seg: U32,
    /// Discard alignment in 512-byte sectors (`DISCARD`).
    pub discard_sector_alignment: U32,
    /// Most 512-byte sectors per write-zeroes segment (`WRITE_ZEROES`).
    pub max_write_zeroes_sectors: U32,
    /// Most write-zeroes segments per request (`WRITE_ZEROES`).
    pub max_write_zeroes_seg: U32,
    /// 1 if a write-zeroes with the unmap flag may deallocate (`WRITE_ZEROES`).
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

impl VirtioBlkConfig {
    /// Offset of `writeback`, the one field the driver may write.
    pub const WRITEBACK_OFFSET: u64 = 0x20;
}

/// One discard or write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DiscardWriteZeroes {
    /// First 512-byte sector.
    pub sector: U64,
    /// 512-byte sectors.
    pub num_sectors: U32,
    /// Bit 0: unmap (write-zeroes only); the rest reserved.
    pub flags: U32,
}

/// The request header (`struct virtio_blk_outhdr`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RequestHeader {
    /// `T_IN`, `T_OUT`, ...
    pub request_type: U32,
    /// Reserved (Linux puts an I/O priority here).
    pub reserved: U32,
    /// First 512-byte sector.
    pub sector: U64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_spec() {
        assert_eq!(size_of::<VirtioBlkConfig>(), 60);
        assert_eq!(size_of::<RequestHeader>(), 16);
        assert_eq!(size_of::<DiscardWriteZeroes>(), 16);
        let config = VirtioBlkConfig {
            writeback: 1,
            num_queues: 3.into(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let bytes = config.as_bytes();
        assert_eq!(bytes[VirtioBlkConfig::WRITEBACK_OFFSET as usize], 1);
        assert_eq!(bytes[0x22], 3);
        assert_eq!(bytes[0x38], 1);
    }
}
