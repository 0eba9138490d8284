//! Error types.

use disk_backend::DiskError;
use thiserror::Error;

/// The bytes of an image are not a qcow2 image this crate can use.
#[derive(Debug, Error)]
pub enum InvalidImage {
    /// The file is shorter than a header.
    #[error("the image is truncated: shorter than its header")]
    Truncated,
    /// The magic number is not `QFI\xfb`.
    #[error("bad magic: not a qcow2 image")]
    BadMagic,
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// The cluster size is outside 512 B..=2 MiB (16 KiB..=2 MiB with extended L2 entries).
    #[error("unsupported cluster size: 2^{0} bytes")]
    ClusterBits(u32),
    /// The image is encrypted; use the `crypt` decorator for encryption instead.
    #[error("encrypted images are not supported (use the crypt decorator instead)")]
    Encrypted,
    /// The header length is not a multiple of 8 of at least 104 inside the first cluster.
    #[error("invalid header length {0}")]
    HeaderLength(u32),
    /// The refcount order is above 6 (64-bit refcounts).
    #[error("invalid refcount order {0}")]
    RefcountOrder(u32),
    /// An unknown compression type, or zstd without the compression type feature bit.
    #[error("unsupported compression type {0}")]
    CompressionType(u8),
    /// Header extensions run past the first cluster.
    #[error("header extensions run past the first cluster")]
    Extensions,
    /// The backing file name does not lie in the first cluster or is too long.
    #[error("the backing file name does not fit in the first cluster")]
    BackingFileName,
    /// Incompatible features this crate does not implement.
    #[error("unsupported incompatible features: {names}")]
    UnsupportedFeatures {
        /// The features, by name where the image names them.
        names: String,
    },
    /// The virtual size is too large.
    #[error("virtual size {0} is too large")]
    VirtualSize(u64),
    /// The L1 table is too small for the virtual size, or absurdly large.
    #[error("invalid l1 size {0} for the virtual size")]
    L1Size(u32),
    /// The refcount table is empty or absurdly large.
    #[error("invalid refcount table size: {0} clusters")]
    RefcountTableSize(u32),
    /// A table is misaligned or lies outside the file.
    #[error("the {what} at {offset:#x} is misaligned or outside the file")]
    TableOutsideFile {
        /// Which table.
        what: &'static str,
        /// Its byte offset.
        offset: u64,
    },
}

/// Opening an image failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// Reading or writing the image file failed.
    #[error("i/o on the image file failed")]
    Io(#[source] DiskError),
    /// The image is invalid or uses features this crate does not implement.
    #[error("invalid qcow2 image")]
    Invalid(#[source] InvalidImage),
    /// The image's metadata is inconsistent.
    #[error("corrupt qcow2 image")]
    Corrupt(#[source] CorruptImage),
    /// The host disk's sector size is larger than the image's clusters.
    #[error(
        "the image's {cluster_size}-byte clusters are smaller than the host's {sector_size}-byte sectors"
    )]
    SectorSize {
        /// The cluster size.
        cluster_size: u64,
        /// The host disk's sector size.
        sector_size: u32,
    },
    /// The image cannot be opened for writing.
    #[error("cannot write to this image: {0}")]
    NotWritable(&'static str),
    /// The host disk is read-only but the layer was asked to be writable.
    #[error("the image file is read-only")]
    ReadOnlyFile,
}

/// Creating an image failed.
#[derive(Debug, Error)]
pub enum CreateError {
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Parameter(&'static str),
    /// The image file is too small and cannot grow.
    #[error("the image file is too small for the new image's metadata and cannot grow")]
    TooSmall,
    /// Writing the image file failed.
    #[error("i/o on the image file failed")]
    Io(#[source] DiskError),
}

/// Metadata found inconsistent while serving I/O or opening.
#[derive(Debug, Error)]
pub enum CorruptImage {
    /// A table entry points outside the file or is misaligned.
    #[error("{what} entry {index} points at {offset:#x}: misaligned or outside the file")]
    BadPointer {
        /// Which table.
        what: &'static str,
        /// The entry index.
        index: u64,
        /// The offset found.
        offset: u64,
    },
    /// A refcount would overflow its width or drop below zero.
    #[error("refcount of the cluster at {offset:#x} would overflow or underflow")]
    RefcountOverflow {
        /// The cluster's byte offset.
        offset: u64,
    },
    /// A compressed cluster does not decompress to a whole cluster.
    #[error("compressed cluster at {offset:#x} does not decompress")]
    Compressed {
        /// The compressed data's byte offset.
        offset: u64,
    },
    /// The refcount table cannot grow further.
    #[error("the image is too large for its refcount table limit")]
    RefcountTableFull,
    /// A table shared with an internal snapshot cannot be written in place.
    #[error("a table shared with an internal snapshot cannot be modified")]
    SharedTable,
}

impl From<CorruptImage> for DiskError {
    fn from(error: CorruptImage) -> Self {
        DiskError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    }
}
