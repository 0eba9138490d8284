//! Layered disks: a stack of layers, each holding some sectors, read top to bottom.
//!
//! A [`LayeredDisk`] is a [`DiskIo`](disk_backend::DiskIo) made of layers ([`LayerIo`]) listed
//! top first. A read asks each layer in turn for the sectors still missing, and each layer
//! marks what it supplied in a [`SectorMarker`]; what no layer holds reads as zeros. Writes go
//! to the top layer, and on down through layers configured `write_through`. A layer
//! configured `read_cache` is filled from what the layers below it return. A layer whose
//! allocation unit is larger than a sector (a qcow2 cluster) gets a reader of the layers
//! below it with each write ([`LayerIo::write_cow`], [`LowerLayers`]) to copy the rest of a
//! unit it allocates.
//!
//! Typical stacks: a RAM layer over a read-only base image (a throw-away overlay), a RAM
//! read cache over a slow disk, a differencing layer over a shared parent. Layers come from
//! `disk_ram::RamLayer` (sparse memory), [`DiskAsLayer`] (any
//! [`Disk`](disk_backend::Disk)), or any other [`LayerIo`]. A layer can take its geometry from
//! the layer below it when the disk is built ([`LayerAttach`]). The format of each layer comes
//! from configuration, never from bytes on a disk.
//!
//! ```
//! use disk_backend::{Disk, DiskIo};
//! use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayeredDisk};
//! use disk_ram::{RamDisk, RamLayer};
//! use request_buffers::OwnedRequestBuffers;
//!
//! // A read-only "base image" with data in sector 0.
//! let base = RamDisk::new(64, 512)?;
//! let data = OwnedRequestBuffers::from_slice(&[7; 512]);
//! futures::executor::block_on(base.write_vectored(&data.buffers(false), 0, false))?;
//! let base = Disk::new(base.with_read_only(true))?;
//!
//! // A writable RAM overlay that takes its size from the base.
//! let disk = Disk::new(LayeredDisk::new(false, vec![
//!     LayerConfiguration::new(DiskLayer::new(RamLayer::lazy())),
//!     LayerConfiguration::new(DiskLayer::new(DiskAsLayer::new(base.clone()))),
//! ])?)?;
//! assert_eq!(disk.sector_count(), 64);
//!
//! let back = OwnedRequestBuffers::new(1024);
//! futures::executor::block_on(disk.read_vectored(&back.buffers(true), 0))?;
//! assert_eq!(&back.to_vec()[..512], &[7; 512]); // from the base
//! assert_eq!(&back.to_vec()[512..], &[0; 512]); // nobody has it: zeros
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod bounce;
mod disk;
mod disk_layer;
mod layer;
mod marker;
mod resolve;

pub use disk::{InvalidLayeredDisk, LayerConfiguration, LayeredDisk, LowerLayers};
pub use disk_layer::DiskAsLayer;
pub use layer::{
    DiskLayer, LayerAttach, LayerIo, LowerLayerMetadata, NoWriteNoOverwrite, WriteNoOverwrite,
};
pub use marker::SectorMarker;
pub use resolve::{LayeredResolver, ResolveLayer};
