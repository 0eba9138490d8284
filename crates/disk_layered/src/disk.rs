//! The layered disk: construction rules and the read/write/unmap algorithms.

use crate::bounce::BouncePool;
use crate::layer::{DiskLayer, DynLayer, LowerLayerMetadata};
use crate::marker::{SectorBitmap, SectorMarker};
use disk_backend::range_lock::{Access, RangeLock};
use disk_backend::{DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use request_buffers::{GuestMemory, MemoryRead, MemoryWrite, RequestBuffers};
use smallvec::SmallVec;
use thiserror::Error;

/// One layer of a [`LayeredDisk`] with its role in the stack.
#[derive(Debug)]
pub struct LayerConfiguration<L = DiskLayer> {
    /// The layer.
    pub layer: L,
    /// Writes and flushes that reach this layer also go to the layer below it.
    pub write_through: bool,
    /// Fill this layer with what the layers below return to reads, without overwriting
    /// anything it already holds.
    pub read_cache: bool,
}

impl LayerConfiguration {
    /// A plain layer: no write-through, no read cache.
    pub fn new(layer: DiskLayer) -> Self {
        Self {
            layer,
            write_through: false,
            read_cache: false,
        }
    }
}

/// Building a [`LayeredDisk`] failed.
#[derive(Debug, Error)]
pub enum InvalidLayeredDisk {
    /// The list of layers is empty.
    #[error("a layered disk needs at least one layer")]
    NoLayers,
    /// A layer could not attach to the layer below it.
    #[error("layer {index} could not be attached")]
    Attach {
        /// Layer index, 0 at the top.
        index: usize,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A layer's sector size differs from the top layer's.
    #[error("layer {index} has {sector_size}-byte sectors but the top layer has {expected}")]
    SectorSizeMismatch {
        /// Layer index, 0 at the top.
        index: usize,
        /// The layer's sector size.
        sector_size: u32,
        /// The top layer's sector size.
        expected: u32,
    },
    /// A layer flagged `read_cache` cannot be filled without overwriting.
    #[error("layer {index} cannot be a read cache")]
    ReadCacheUnsupported {
        /// Layer index, 0 at the top.
        index: usize,
    },
    /// The bottom layer is flagged `read_cache`: there is nothing below it to cache.
    #[error("layer {index} is the bottom layer, so there is nothing for it to cache")]
    UselessReadCache {
        /// Layer index, 0 at the top.
        index: usize,
    },
    /// The bottom layer is flagged `write_through`: there is nothing below it.
    #[error("layer {index} is the bottom layer, so there is nothing to write through to")]
    UselessWriteThrough {
        /// Layer index, 0 at the top.
        index: usize,
    },
    /// A logically read-only layer is on the write path of a writable disk.
    #[error("layer {index} is read-only but on the write path of a writable disk")]
    ReadOnlyLayerOnWritePath {
        /// Layer index, 0 at the top.
        index: usize,
    },
}

struct Layer {
    io: Box<dyn DynLayer>,
    read_cache: bool,
}

/// The layers below one layer of a [`LayeredDisk`], as that layer's
/// [`write_cow`](crate::LayerIo::write_cow) sees them: reads return what the stack below
/// the layer holds, and zeros where no layer below holds a sector.
pub struct LowerLayers<'a> {
    disk: &'a LayeredDisk,
    /// The first layer below the writing one.
    first: usize,
}

impl std::fmt::Debug for LowerLayers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LowerLayers")
            .field("first", &self.first)
            .finish_non_exhaustive()
    }
}

impl LowerLayers<'_> {
    /// Reads whole sectors at `sector` from the layers below into `buffers`, zero-filling
    /// what none of them holds. Sectors past the disk's end read as zeros.
    pub async fn read(&self, buffers: &RequestBuffers<'_>, sector: u64) -> Result<(), DiskError> {
        let sector_size = self.disk.sector_size as usize;
        if !buffers.len().is_multiple_of(sector_size) {
            return Err(DiskError::InvalidInput);
        }
        if buffers.is_empty() {
            return Ok(());
        }
        if sector.checked_add(self.disk.sectors_of(buffers)).is_none() {
            return Err(DiskError::IllegalBlock);
        }
        self.disk.read_layers(self.first, buffers, sector).await
    }

    /// Whether there is no layer below (reads are all zeros).
    pub fn is_empty(&self) -> bool {
        self.first >= self.disk.layers.len()
    }
}

/// A disk made of layers, listed top first.
///
/// - A read asks each layer in turn for the sectors still missing; what no layer supplies
///   reads as zeros. Layer `i` is only asked for sectors below the smallest sector count of
///   layers `0..=i` (a lower layer is clamped to the layers above it).
/// - A `read_cache` layer is filled, with `write_no_overwrite`, from what the layers below
///   it returned; a failure to fill it does not fail the read.
/// - Writes and flushes go to the top layer and on down while a layer is `write_through`
///   (the *write path*). Writes reach the lowest layer of the path first, so a failed
///   write never leaves an upper layer holding data the lower one refused.
/// - Unmap goes to the write path bottom first; each layer learns whether the stack below
///   it now reads as zeros (`next_is_zero`).
/// - The disk's size, resize notifications and identity come from the top layer (the id
///   from the first layer from the top that has one); FUA is respected only if every layer
///   on the write path respects it.
///
/// Overlapping requests in flight together are applied in one order, the same in every
/// layer: when the write path has more than one layer, writes and unmaps hold their sector
/// range exclusively (a [`RangeLock`], first come first served), and when a read cache lies
/// above a layer that writes reach, reads hold theirs shared until their cache fill is done.
/// So the layers of a write-through stack never disagree, and a cache fill never installs
/// data older than a write or unmap that was in flight with the read. Requests on disjoint
/// ranges never wait for each other, and stacks that need neither rule take no lock.
/// Layers below a read cache read into a private buffer, from which both the caller's
/// buffers and the caches are filled: a guest rewriting its buffer during a read cannot
/// decide what the cache holds.
pub struct LayeredDisk {
    layers: Vec<Layer>,
    read_only: bool,
    /// Layers `0..write_path_len` receive writes.
    write_path_len: usize,
    /// `next_is_zero` to pass to each write-path layer's unmap.
    next_is_zero: Vec<bool>,
    sector_size: u32,
    sector_shift: u32,
    physical_sector_size: u32,
    disk_id: Option<[u8; 16]>,
    is_fua_respected: bool,
    unmap_behavior: UnmapBehavior,
    optimal_unmap_sectors: u32,
    /// Writes and unmaps hold their range exclusively: the write path has several layers,
    /// which must see overlapping requests in one order.
    lock_writes: bool,
    /// Reads hold their range shared: a read cache lies above a layer that writes reach, so
    /// a read's cache fill must not overtake a write or unmap.
    lock_reads: bool,
    ranges: RangeLock,
    bounce: BouncePool,
}

impl std::fmt::Debug for LayeredDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<&str> = self.layers.iter().map(|l| l.io.layer_type()).collect();
        f.debug_struct("LayeredDisk")
            .field("layers", &layers)
            .field("read_only", &self.read_only)
            .field("write_path_len", &self.write_path_len)
            .finish()
    }
}

/// The unmap behaviour of a write-path layer with `below` the merged behaviour of the
/// write-path layers under it: reads come from the upper layer first, so it decides unless
/// it ignores unmaps, in which case unmapped sectors it does not hold show what is below.
fn merge_unmap(upper: UnmapBehavior, below: Option<UnmapBehavior>) -> UnmapBehavior {
    match (upper, below) {
        (UnmapBehavior::Ignored, None | Some(UnmapBehavior::Ignored)) => UnmapBehavior::Ignored,
        (UnmapBehavior::Ignored, Some(_)) => UnmapBehavior::Unspecified,
        (upper, _) => upper,
    }
}

impl LayeredDisk {
    /// Attaches `layers` (top first) bottom to top and checks the stack.
    pub fn new(
        read_only: bool,
        layers: Vec<LayerConfiguration>,
    ) -> Result<Self, InvalidLayeredDisk> {
        if layers.is_empty() {
            return Err(InvalidLayeredDisk::NoLayers);
        }
        let count = layers.len();
        let mut attached: Vec<Layer> = Vec::with_capacity(count);
        let mut lower: Option<LowerLayerMetadata> = None;
        let mut flags = Vec::with_capacity(count);
        for (index, config) in layers.into_iter().enumerate().rev() {
            let io = config
                .layer
                .attach(lower.as_ref())
                .map_err(|source| InvalidLayeredDisk::Attach { index, source })?;
            lower = Some(LowerLayerMetadata {
                sector_count: io.sector_count(),
                sector_size: io.sector_size(),
                physical_sector_size: io.physical_sector_size(),
                disk_id: io.disk_id(),
            });
            flags.push(config.write_through);
            attached.push(Layer {
                io,
                read_cache: config.read_cache,
            });
        }
        attached.reverse();
        flags.reverse();
        let layers = attached;

        let sector_size = layers[0].io.sector_size();
        for (index, layer) in layers.iter().enumerate() {
            if layer.io.sector_size() != sector_size {
                return Err(InvalidLayeredDisk::SectorSizeMismatch {
                    index,
                    sector_size: layer.io.sector_size(),
                    expected: sector_size,
                });
            }
            if layer.read_cache {
                if index == count - 1 {
                    return Err(InvalidLayeredDisk::UselessReadCache { index });
                }
                if !layer.io.can_write_no_overwrite() {
                    return Err(InvalidLayeredDisk::ReadCacheUnsupported { index });
                }
            }
        }
        if flags[count - 1] {
            return Err(InvalidLayeredDisk::UselessWriteThrough { index: count - 1 });
        }
        let write_path_len = flags
            .iter()
            .position(|&through| !through)
            .unwrap_or(count - 1)
            + 1;
        let write_path = &layers[..write_path_len];
        if !read_only
            && let Some(index) = write_path
                .iter()
                .position(|l| l.io.is_logically_read_only())
        {
            return Err(InvalidLayeredDisk::ReadOnlyLayerOnWritePath { index });
        }

        // Merge unmap behaviour bottom-up and work out what each layer may assume below it.
        let mut next_is_zero = vec![false; write_path_len];
        let mut below: Option<UnmapBehavior> = None;
        for index in (0..write_path_len).rev() {
            next_is_zero[index] = if index == count - 1 {
                true
            } else {
                below == Some(UnmapBehavior::Zeroes)
            };
            below = Some(merge_unmap(layers[index].io.unmap_behavior(), below));
        }
        let unmap_behavior = below.expect("the write path has at least one layer");
        let lock_writes = write_path_len > 1;
        let lock_reads = layers
            .iter()
            .enumerate()
            .any(|(index, l)| l.read_cache && index + 1 < write_path_len);

        Ok(Self {
            read_only,
            write_path_len,
            next_is_zero,
            sector_size,
            sector_shift: sector_size.trailing_zeros(),
            physical_sector_size: layers[0].io.physical_sector_size(),
            disk_id: layers.iter().find_map(|l| l.io.disk_id()),
            is_fua_respected: write_path.iter().all(|l| l.io.is_fua_respected()),
            optimal_unmap_sectors: write_path
                .iter()
                .map(|l| l.io.optimal_unmap_sectors())
                .max()
                .unwrap_or(1),
            unmap_behavior,
            lock_writes,
            lock_reads,
            ranges: RangeLock::new(),
            bounce: BouncePool::default(),
            layers,
        })
    }

    /// The number of layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// The number of layers writes reach, from the top.
    pub fn write_path_len(&self) -> usize {
        self.write_path_len
    }

    fn sectors_of(&self, buffers: &RequestBuffers<'_>) -> u64 {
        (buffers.len() >> self.sector_shift) as u64
    }

    fn bytes(&self, sectors: u64) -> usize {
        (sectors << self.sector_shift) as usize
    }

    /// Reads `buffers` at `sector` from the layers `first..` (zeros where none of them holds
    /// a sector): the whole stack for an ordinary read (`first == 0`: the range is checked and,
    /// where reads must, held), the stack below a layer for its copy-on-write
    /// ([`LowerLayers`]). A copy-on-write takes no range: it runs inside a write that holds
    /// its own, and taking a neighbour's there could deadlock two writes that each need the
    /// other's.
    async fn read_layers(
        &self,
        first: usize,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        let whole_stack = first == 0;
        if whole_stack {
            check_range(self, sector, buffers.len())?;
        }
        let count = self.sectors_of(buffers);
        if count == 0 {
            return Ok(());
        }
        let _range = match self.lock_reads && whole_stack {
            true => Some(
                self.ranges
                    .lock(sector..sector + count, Access::Shared)
                    .await,
            ),
            false => None,
        };
        let mut present = SectorBitmap::new(count);
        // Layers down to the first read cache read straight into the caller's buffers.
        let first_cache = self.layers[first..]
            .iter()
            .position(|l| l.read_cache)
            .map(|i| first + i);
        let upper_end = first_cache.map_or(self.layers.len(), |c| c + 1);
        let mut visible = sector + count;
        for index in first..upper_end {
            match self
                .read_layer(index, buffers, sector, &mut present, visible)
                .await?
            {
                Some(v) if !present.is_full() => visible = v,
                _ => break,
            }
            if index + 1 == upper_end && index < self.layers.len() - 1 {
                // Missed a read cache: the rest is read, and the caches filled, through
                // memory of our own. Boxed, as the miss path is rare and needs a buffer.
                Box::pin(self.read_below_cache(buffers, sector, &mut present, visible, index))
                    .await?;
            }
        }

        for run in present.clear_runs(0..count) {
            buffers
                .subrange(self.bytes(run.start), self.bytes(run.end - run.start))
                .writer()
                .zero(self.bytes(run.end - run.start))?;
        }
        Ok(())
    }

    /// Asks layer `index` for the sectors of `present` still missing below `visible`,
    /// reading into `target` (which covers the whole request). Returns the new visible limit,
    /// or `None` if the layer (and every layer below it) is clamped out of the request.
    async fn read_layer(
        &self,
        index: usize,
        target: &RequestBuffers<'_>,
        sector: u64,
        present: &mut SectorBitmap,
        visible: u64,
    ) -> Result<Option<u64>, DiskError> {
        let layer = &self.layers[index];
        let visible = visible.min(layer.io.sector_count());
        if visible <= sector {
            return Ok(None);
        }
        let limit = visible - sector;
        // A layer that certainly holds none of the sectors costs no I/O call.
        if !layer.io.may_hold(sector, limit) {
            return Ok(Some(visible));
        }
        let mut at = 0;
        while at < limit {
            let Some(run) = present.clear_runs(at..limit).next() else {
                break;
            };
            at = run.end;
            let sub = target.subrange(self.bytes(run.start), self.bytes(run.end - run.start));
            let marker = SectorMarker::new(present, sector, sector + run.start..sector + run.end);
            layer.io.read(&sub, sector + run.start, marker).await?;
        }
        Ok(Some(visible))
    }

    /// The rest of a read that missed read cache `first_cache`: the layers below it read
    /// into a private buffer, from which the caller's buffers and every read cache on the way
    /// are filled. Filling caches from the caller's buffers would let a guest that rewrites
    /// its buffer during the read decide what later reads return.
    async fn read_below_cache(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        present: &mut SectorBitmap,
        mut visible: u64,
        first_cache: usize,
    ) -> Result<(), DiskError> {
        let bounce = self.bounce.take(buffers.len());
        let private = bounce.buffers(true).subrange(0, buffers.len());
        // What each read cache (or a layer above it) had supplied, to work out what the
        // layers below it added.
        let mut snapshots: SmallVec<[(usize, SectorBitmap); 1]> = SmallVec::new();
        snapshots.push((first_cache, present.clone()));
        for index in first_cache + 1..self.layers.len() {
            match self
                .read_layer(index, &private, sector, present, visible)
                .await?
            {
                Some(v) if !present.is_full() => visible = v,
                _ => break,
            }
            if self.layers[index].read_cache {
                snapshots.push((index, present.clone()));
            }
        }

        for run in present.newly_set_runs(&snapshots[0].1) {
            let (offset, len) = (self.bytes(run.start), self.bytes(run.end - run.start));
            copy(
                &private.subrange(offset, len),
                &buffers.subrange(offset, len),
            )?;
        }
        // The cache never overwrites what it holds, and the range lock keeps writes and
        // unmaps of these sectors out until the fill is done, so a fill never installs data
        // older than a write the caller could have seen.
        for (index, before) in &snapshots {
            let cache = &self.layers[*index].io;
            for run in present.newly_set_runs(before) {
                let sub = private.subrange(self.bytes(run.start), self.bytes(run.end - run.start));
                let sub = RequestBuffers::new(sub.guest_memory(), sub.range(), false);
                // A cache that cannot be filled costs a later miss, not this read.
                let _ = cache.write_no_overwrite(&sub, sector + run.start).await;
            }
        }
        self.bounce.give_back(bounce);
        Ok(())
    }
}

impl DiskIo for LayeredDisk {
    fn disk_type(&self) -> &str {
        "layered"
    }

    fn sector_count(&self) -> u64 {
        self.layers[0].io.sector_count()
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        self.disk_id
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }

    fn is_fua_respected(&self) -> bool {
        self.is_fua_respected
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        // One state machine for the whole read (not a future awaiting another), so that it
        // fits `Disk`'s inline storage.
        self.read_layers(0, buffers, sector)
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self, sector, buffers.len())?;
        if buffers.is_empty() {
            return Ok(());
        }
        let count = self.sectors_of(buffers);
        let _range = match self.lock_writes {
            true => Some(
                self.ranges
                    .lock(sector..sector + count, Access::Exclusive)
                    .await,
            ),
            false => None,
        };
        for index in (0..self.write_path_len).rev() {
            // A layer whose allocation unit is larger than the write (a qcow2 cluster) takes
            // the rest of the unit from the layers below it: see `LayerIo::write_cow`.
            let below = LowerLayers {
                disk: self,
                first: index + 1,
            };
            self.layers[index]
                .io
                .write_cow(buffers, sector, fua, &below)
                .await?;
        }
        Ok(())
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        for layer in self.layers[..self.write_path_len].iter().rev() {
            layer.io.sync_cache().await?;
        }
        Ok(())
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)?;
        if count == 0 {
            return Ok(());
        }
        let _range = match self.lock_writes {
            true => Some(
                self.ranges
                    .lock(sector..sector + count, Access::Exclusive)
                    .await,
            ),
            false => None,
        };
        for index in (0..self.write_path_len).rev() {
            self.layers[index]
                .io
                .unmap(sector, count, block_level_only, self.next_is_zero[index])
                .await?;
        }
        Ok(())
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.optimal_unmap_sectors
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.layers[0].io.wait_resize(sector_count).await
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        // Every layer gets the memory even if one fails; the first failure is reported.
        self.layers
            .iter()
            .map(|layer| layer.io.register_memory(memory))
            .fold(Ok(()), Result::and)
    }
}

/// Copies `from` into `to`, which have the same length.
fn copy(from: &RequestBuffers<'_>, to: &RequestBuffers<'_>) -> Result<(), DiskError> {
    let mut reader = from.reader();
    let mut writer = to.writer();
    let mut chunk = [0; 4096];
    let mut left = from.len();
    while left > 0 {
        let n = left.min(chunk.len());
        reader.read(&mut chunk[..n])?;
        writer.write(&chunk[..n])?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_merge() {
        use UnmapBehavior::*;
        assert_eq!(merge_unmap(Zeroes, Some(Ignored)), Zeroes);
        assert_eq!(merge_unmap(Unspecified, Some(Zeroes)), Unspecified);
        assert_eq!(merge_unmap(Ignored, Some(Zeroes)), Unspecified);
        assert_eq!(merge_unmap(Ignored, Some(Ignored)), Ignored);
        assert_eq!(merge_unmap(Ignored, None), Ignored);
    }
}
