//! The layer trait, attachment to the layer below, and type-erased layers.

use crate::{LowerLayers, SectorMarker};
use disk_backend::{DiskError, UnmapBehavior};
use request_buffers::{GuestMemory, RequestBuffers};
use stackfuture::StackFuture;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Metadata and I/O of one layer of a [`LayeredDisk`](crate::LayeredDisk).
///
/// Like [`DiskIo`](disk_backend::DiskIo), but a read reports which sectors the layer holds
/// through a [`SectorMarker`]; the rest fall through to the layers below. A layer checks its
/// own ranges and returns [`DiskError::IllegalBlock`] outside them, never panicking.
pub trait LayerIo: 'static + Send + Sync {
    /// A short name of the layer type, for diagnostics.
    fn layer_type(&self) -> &str;

    /// The current sector count. May change at run time (see
    /// [`wait_resize`](Self::wait_resize)).
    fn sector_count(&self) -> u64;

    /// The logical sector size. Never changes.
    fn sector_size(&self) -> u32;

    /// A 16-byte identifier, if the layer has one. Never changes.
    fn disk_id(&self) -> Option<[u8; 16]>;

    /// The physical sector size. Never changes.
    fn physical_sector_size(&self) -> u32;

    /// Whether FUA writes are durable on completion. Never changes.
    fn is_fua_respected(&self) -> bool;

    /// Whether the layer refuses ordinary writes. A logically read-only layer may still be
    /// filled as a read cache through [`write_no_overwrite`](Self::write_no_overwrite).
    fn is_logically_read_only(&self) -> bool;

    /// Makes every completed write to the layer durable.
    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Reads the sectors the layer holds among `buffers.len()` bytes at `sector` into
    /// `buffers`, marking each one it supplied in `marker`. Bytes of unmarked sectors may be
    /// left in any state: a lower layer or zero-fill overwrites them.
    fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        marker: SectorMarker<'_>,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Whether the layer may hold any of the `count` sectors at `sector`: a cheap,
    /// synchronous hint that lets a read skip a layer without issuing I/O to it. It must
    /// never return `false` for a range in which the layer holds a sector; `true` is always
    /// allowed (the default).
    fn may_hold(&self, sector: u64, count: u64) -> bool {
        let _ = (sector, count);
        true
    }

    /// Writes whole sectors from `buffers` at `sector`.
    fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// Writes whole sectors from `buffers` at `sector`, with `below` to read the layers
    /// beneath this one: what [`LayeredDisk`](crate::LayeredDisk) calls. A layer whose
    /// allocation unit is larger than a sector (a qcow2 cluster) implements it to fill the
    /// rest of a unit a write allocates from `below` (copy-on-write), as QEMU does with a
    /// backing file. The default ignores `below` and calls [`write`](Self::write).
    fn write_cow(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        below: &LowerLayers<'_>,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        let _ = below;
        self.write(buffers, sector, fua)
    }

    /// Unmaps `count` sectors at `sector`. `next_is_zero` says the layers below read as zeros
    /// over the range, so the layer may simply drop the sectors rather than store zeros.
    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;

    /// What [`unmap`](Self::unmap) does to reads of the layer stack from this layer down.
    fn unmap_behavior(&self) -> UnmapBehavior;

    /// The preferred unmap granularity in sectors.
    fn optimal_unmap_sectors(&self) -> u32 {
        1
    }

    /// A writer that fills sectors the layer does not hold yet, never overwriting one it
    /// does: what a read cache is filled with. `None` if the layer cannot be a read cache.
    fn write_no_overwrite(&self) -> Option<impl WriteNoOverwrite> {
        None::<NoWriteNoOverwrite>
    }

    /// Completes with the new sector count once it differs from `sector_count`. The default
    /// never completes.
    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        let _ = sector_count;
        std::future::pending()
    }

    /// Requests' buffers will come from `memory`; see
    /// [`DiskIo::register_memory`](disk_backend::DiskIo::register_memory). The default does
    /// nothing.
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        let _ = memory;
        Ok(())
    }
}

/// Writes sectors a layer does not hold yet; see [`LayerIo::write_no_overwrite`].
pub trait WriteNoOverwrite: Send + Sync {
    /// Writes each sector of `buffers` at `sector` that the layer does not already hold;
    /// sectors it holds keep their (newer) contents.
    fn write_no_overwrite(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;
}

/// The `WriteNoOverwrite` type of layers that have none.
#[derive(Debug)]
pub enum NoWriteNoOverwrite {}

impl WriteNoOverwrite for NoWriteNoOverwrite {
    async fn write_no_overwrite(&self, _: &RequestBuffers<'_>, _: u64) -> Result<(), DiskError> {
        match *self {}
    }
}

/// What a layer learns about the layer below it when it is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerLayerMetadata {
    /// The lower layer's sector count when attached.
    pub sector_count: u64,
    /// The lower layer's sector size.
    pub sector_size: u32,
    /// The lower layer's physical sector size.
    pub physical_sector_size: u32,
    /// The lower layer's identifier.
    pub disk_id: Option<[u8; 16]>,
}

/// Something that becomes a layer once it knows the layer below: a RAM layer that takes its
/// size from the disk it sits on, say. Every [`LayerIo`] is one (it ignores the layer below).
pub trait LayerAttach: 'static + Send {
    /// The layer it becomes.
    type Layer: LayerIo;
    /// Why attaching can fail.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Becomes a layer on top of `lower` (`None` for the bottom layer).
    fn attach(self, lower: Option<&LowerLayerMetadata>) -> Result<Self::Layer, Self::Error>;
}

impl<T: LayerIo> LayerAttach for T {
    type Layer = T;
    type Error = Infallible;

    fn attach(self, _lower: Option<&LowerLayerMetadata>) -> Result<T, Infallible> {
        Ok(self)
    }
}

/// A shared layer is a layer, so its owner can keep a handle (to resize it, inspect it).
impl<T: LayerIo> LayerIo for Arc<T> {
    fn layer_type(&self) -> &str {
        (**self).layer_type()
    }
    fn sector_count(&self) -> u64 {
        (**self).sector_count()
    }
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        (**self).disk_id()
    }
    fn physical_sector_size(&self) -> u32 {
        (**self).physical_sector_size()
    }
    fn is_fua_respected(&self) -> bool {
        (**self).is_fua_respected()
    }
    fn is_logically_read_only(&self) -> bool {
        (**self).is_logically_read_only()
    }
    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).sync_cache()
    }
    fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        marker: SectorMarker<'_>,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).read(buffers, sector, marker)
    }
    fn may_hold(&self, sector: u64, count: u64) -> bool {
        (**self).may_hold(sector, count)
    }
    fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).write(buffers, sector, fua)
    }
    fn write_cow(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        below: &LowerLayers<'_>,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).write_cow(buffers, sector, fua, below)
    }
    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        (**self).unmap(sector, count, block_level_only, next_is_zero)
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        (**self).unmap_behavior()
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        (**self).optimal_unmap_sectors()
    }
    fn write_no_overwrite(&self) -> Option<impl WriteNoOverwrite> {
        (**self).write_no_overwrite()
    }
    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        (**self).wait_resize(sector_count)
    }
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        (**self).register_memory(memory)
    }
}

/// Layer futures up to this size are stored inline; larger ones are boxed.
pub(crate) const LAYER_FUTURE_SIZE: usize = 128;

pub(crate) type LayerFuture<'a> = StackFuture<'a, Result<(), DiskError>, LAYER_FUTURE_SIZE>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`LayerIo`].
pub(crate) trait DynLayer: Send + Sync {
    fn layer_type(&self) -> &str;
    fn sector_count(&self) -> u64;
    fn sector_size(&self) -> u32;
    fn disk_id(&self) -> Option<[u8; 16]>;
    fn physical_sector_size(&self) -> u32;
    fn is_fua_respected(&self) -> bool;
    fn is_logically_read_only(&self) -> bool;
    fn unmap_behavior(&self) -> UnmapBehavior;
    fn optimal_unmap_sectors(&self) -> u32;
    fn can_write_no_overwrite(&self) -> bool;
    fn may_hold(&self, sector: u64, count: u64) -> bool;
    fn sync_cache(&self) -> LayerFuture<'_>;
    fn read<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        marker: SectorMarker<'a>,
    ) -> LayerFuture<'a>;
    fn write_cow<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        fua: bool,
        below: &'a LowerLayers<'a>,
    ) -> LayerFuture<'a>;
    fn write_no_overwrite<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
    ) -> LayerFuture<'a>;
    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> LayerFuture<'_>;
    fn wait_resize(&self, sector_count: u64) -> BoxFuture<'_, u64>;
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError>;
}

impl<T: LayerIo> DynLayer for T {
    fn layer_type(&self) -> &str {
        LayerIo::layer_type(self)
    }
    fn sector_count(&self) -> u64 {
        LayerIo::sector_count(self)
    }
    fn sector_size(&self) -> u32 {
        LayerIo::sector_size(self)
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        LayerIo::disk_id(self)
    }
    fn physical_sector_size(&self) -> u32 {
        LayerIo::physical_sector_size(self)
    }
    fn is_fua_respected(&self) -> bool {
        LayerIo::is_fua_respected(self)
    }
    fn is_logically_read_only(&self) -> bool {
        LayerIo::is_logically_read_only(self)
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        LayerIo::unmap_behavior(self)
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        LayerIo::optimal_unmap_sectors(self)
    }
    fn can_write_no_overwrite(&self) -> bool {
        LayerIo::write_no_overwrite(self).is_some()
    }
    fn may_hold(&self, sector: u64, count: u64) -> bool {
        LayerIo::may_hold(self, sector, count)
    }
    fn sync_cache(&self) -> LayerFuture<'_> {
        StackFuture::from_or_box(LayerIo::sync_cache(self))
    }
    fn read<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        marker: SectorMarker<'a>,
    ) -> LayerFuture<'a> {
        StackFuture::from_or_box(LayerIo::read(self, buffers, sector, marker))
    }
    fn write_cow<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
        fua: bool,
        below: &'a LowerLayers<'a>,
    ) -> LayerFuture<'a> {
        StackFuture::from_or_box(LayerIo::write_cow(self, buffers, sector, fua, below))
    }
    fn write_no_overwrite<'a>(
        &'a self,
        buffers: &'a RequestBuffers<'a>,
        sector: u64,
    ) -> LayerFuture<'a> {
        StackFuture::from_or_box(async move {
            match LayerIo::write_no_overwrite(self) {
                Some(writer) => writer.write_no_overwrite(buffers, sector).await,
                None => Err(DiskError::InvalidInput),
            }
        })
    }
    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> LayerFuture<'_> {
        StackFuture::from_or_box(LayerIo::unmap(
            self,
            sector,
            count,
            block_level_only,
            next_is_zero,
        ))
    }
    fn wait_resize(&self, sector_count: u64) -> BoxFuture<'_, u64> {
        Box::pin(LayerIo::wait_resize(self, sector_count))
    }
    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        LayerIo::register_memory(self, memory)
    }
}

type AttachFn = Box<
    dyn FnOnce(
            Option<&LowerLayerMetadata>,
        ) -> Result<Box<dyn DynLayer>, Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

/// A layer of any type, not yet attached to the layer below it. Build one with
/// [`DiskLayer::new`] from a [`LayerIo`] or any other [`LayerAttach`].
pub struct DiskLayer {
    attach: AttachFn,
}

impl std::fmt::Debug for DiskLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLayer").finish_non_exhaustive()
    }
}

impl DiskLayer {
    /// A layer from `layer`, attached when the layered disk is built.
    pub fn new(layer: impl LayerAttach) -> Self {
        Self {
            attach: Box::new(move |lower| {
                layer
                    .attach(lower)
                    .map(|layer| Box::new(layer) as Box<dyn DynLayer>)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }),
        }
    }

    pub(crate) fn attach(
        self,
        lower: Option<&LowerLayerMetadata>,
    ) -> Result<Box<dyn DynLayer>, Box<dyn std::error::Error + Send + Sync>> {
        (self.attach)(lower)
    }
}
