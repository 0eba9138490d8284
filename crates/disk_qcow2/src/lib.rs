//! qcow2 images as persistent copy-on-write layers of a layered disk.
//!
//! [`Qcow2Layer`] is a [`LayerIo`](disk_layered::LayerIo): it holds the clusters written to
//! the image, and the layers below it in a [`LayeredDisk`](disk_layered::LayeredDisk) supply
//! the rest (alone, unallocated clusters read as zeros). Its host I/O goes through a
//! [`Disk`](disk_backend::Disk) ([`ImageFile`]), so the image can sit on a file, a block
//! device through io_uring, or anything else that is a disk.
//!
//! What it reads: versions 2 and 3, clusters of 512 B to 2 MiB, refcounts of 1 to 64 bits,
//! zero clusters, compressed clusters (deflate and zstd), extended L2 entries
//! (subclusters), images with internal snapshots (the active layer). What it writes: version
//! 2 and 3 images without snapshots or subclusters, allocating clusters, L2 tables, refcount
//! blocks and a larger refcount table at the end of the file, in an order that keeps the
//! image consistent through a crash (see the `meta` module); a partial write into a cluster
//! it does not hold copies the rest of the cluster from the layers below
//! ([`LayerIo::write_cow`](disk_layered::LayerIo::write_cow)), as QEMU copies from a backing
//! file.
//!
//! What it is not: it never opens the backing file an image names (the layers below come
//! from the caller's configuration, never from bytes a guest could have written), it does
//! not decrypt (encrypted images are refused: the `crypt` decorator is the encryption
//! story), it does not write compressed clusters, create or delete snapshots, keep
//! persistent bitmaps (their autoclear bit is cleared), or reuse freed clusters before the
//! image is reopened. A dirty image (lazy refcounts, not closed cleanly) gets its refcounts
//! rebuilt from its tables when it is opened for writing.
//!
//! ```
//! use disk_backend::Disk;
//! use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
//! use disk_qcow2::{CreateOptions, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
//! use disk_ram::RamDisk;
//! use request_buffers::OwnedRequestBuffers;
//! use std::sync::Arc;
//!
//! futures::executor::block_on(async {
//!     // A qcow2 image on a RAM disk (any `Disk` will do; a file is the usual host).
//!     let host = Disk::new(RamDisk::new(2048, 512)?)?;
//!     let file = ImageFile::new(host, None);
//!     Qcow2Layer::create(&file, &CreateOptions::new(1 << 20)).await?;
//!     let layer = Qcow2Layer::open(file, &Qcow2Options::default()).await?;
//!     let disk = LayeredDisk::new(false, vec![LayerConfiguration::new(DiskLayer::new(
//!         Qcow2Attach(Arc::new(layer)),
//!     ))])?;
//!     let disk = Disk::new(disk)?;
//!     let data = OwnedRequestBuffers::from_slice(&[7; 4096]);
//!     disk.write_vectored(&data.buffers(false), 8, false).await?;
//!     disk.sync_cache().await?;
//!     let back = OwnedRequestBuffers::new(8192);
//!     disk.read_vectored(&back.buffers(true), 0).await?;
//!     assert_eq!(&back.to_vec()[..4096], &[0; 4096]);
//!     assert_eq!(&back.to_vec()[4096..], &[7; 4096]);
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod cache;
mod compress;
mod entry;
mod error;
pub mod header;
mod host;
mod layer;
mod meta;
mod repair;
mod resolve;

pub use error::{CorruptImage, CreateError, InvalidImage, OpenError};
pub use host::{GrowFn, ImageFile};
pub use layer::{
    AttachError, CreateOptions, DEFAULT_CACHE_BYTES, Qcow2Attach, Qcow2Layer, Qcow2Options,
};
pub use resolve::Qcow2Resolver;
