//! The qcow2 layer: opening and creating images, reads, writes with copy-on-write, unmap,
//! flush, resize.

use crate::compress::decompress_cluster;
use crate::entry::{COPIED, Mapping, OFFSET_MASK, ZERO, get_refcount, get_u64};
use crate::error::{CorruptImage, CreateError, InvalidImage, OpenError};
use crate::header::{self, Header, field, incompatible};
use crate::host::ImageFile;
use crate::meta::{Geometry, Meta, update_header};
use disk_backend::{DiskError, UnmapBehavior};
use disk_layered::{LayerAttach, LayerIo, LowerLayerMetadata, LowerLayers, SectorMarker};
use event_listener::Event;
use futures::lock::Mutex;
use request_buffers::{MemoryRead, MemoryWrite, OwnedRequestBuffers, RequestBuffers};
use smallvec::SmallVec;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use thiserror::Error;

/// The metadata cache size when none is given: L2 tables and refcount blocks together.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;

/// How to open an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Open for reading only: the layer refuses writes and never writes the file.
    pub read_only: bool,
    /// Bytes of metadata to cache (L2 tables, and a quarter as much for refcount blocks);
    /// at least a few clusters are always cached.
    pub cache_bytes: u64,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Self {
            read_only: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// What a new image looks like; see [`Qcow2Layer::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size: 9 (512 B) to 21 (2 MiB). Default 16 (64 KiB).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits: 0 (1 bit) to 6 (64 bits). Default 4 (16 bits,
    /// the only width of version 2).
    pub refcount_order: u32,
    /// 2 or 3. Default 3.
    pub version: u32,
}

impl CreateOptions {
    /// A version 3 image of `size` bytes with 64 KiB clusters and 16-bit refcounts, as
    /// `qemu-img create -f qcow2` makes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
        }
    }
}

/// A qcow2 image as a layer of a [`LayeredDisk`](disk_layered::LayeredDisk). See the
/// [crate documentation](crate).
///
/// Dropping a writable layer writes its cached metadata back (as QEMU does when it closes
/// an image), blocking the dropping thread until the image file's disk completes: flush
/// with [`sync_cache`](LayerIo::sync_cache) before dropping it on an executor thread that
/// the disk's completions need.
pub struct Qcow2Layer {
    file: ImageFile,
    g: Geometry,
    header: Header,
    read_only: bool,
    sector_shift: u32,
    sector_count: AtomicU64,
    /// The layer is the bottom of its stack (nothing below: unallocated reads as zeros).
    bottom: AtomicBool,
    meta: Mutex<Meta>,
    /// Guest clusters whose allocation is in flight (filled outside the metadata lock).
    allocating: parking_lot::Mutex<HashSet<u64>>,
    /// Notified whenever an allocation finishes.
    allocated: Event,
    resized: Event,
}

/// The most bytes of whole clusters one write allocates at once.
const MAX_RUN_BYTES: u64 = 1 << 20;

/// A guest cluster being allocated: its old mapping and the host cluster reserved for it.
struct Reserved<'a> {
    cluster: u64,
    old: Mapping,
    host: u64,
    _guard: InFlight<'a>,
}

/// Marks a guest cluster's allocation in flight until dropped (also when the write's future
/// is dropped half way: the cluster is then free to allocate again).
struct InFlight<'a> {
    layer: &'a Qcow2Layer,
    cluster: u64,
}

impl<'a> InFlight<'a> {
    fn new(layer: &'a Qcow2Layer, cluster: u64) -> Self {
        layer.allocating.lock().insert(cluster);
        Self { layer, cluster }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.layer.allocating.lock().remove(&self.cluster);
        self.layer.allocated.notify(usize::MAX);
    }
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("file", &self.file)
            .field("header", &self.header)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

fn open_io(e: DiskError) -> OpenError {
    OpenError::Io(e)
}

impl Qcow2Layer {
    /// Opens the image in `file`.
    ///
    /// A writable open refuses images it cannot keep consistent (internal snapshots,
    /// extended L2 entries, the corrupt or dirty bit; read-only opens take them), and clears
    /// the autoclear feature bits, as the specification requires of a writer that does not
    /// maintain what they describe.
    pub async fn open(file: ImageFile, options: &Qcow2Options) -> Result<Self, OpenError> {
        let file_size = file.size();
        let probe = file
            .read(0, (file_size.min(4096) as usize).max(104))
            .await
            .map_err(open_io)?;
        let cluster_bits = u32::from_be_bytes(probe[20..24].try_into().expect("4 bytes"));
        let first_len =
            if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
                (1u64 << cluster_bits).min(file_size) as usize
            } else {
                probe.len()
            };
        let first = file.read(0, first_len.max(104)).await.map_err(open_io)?;
        let header = Header::parse(&first, file_size).map_err(OpenError::Invalid)?;
        let cluster_size = header.cluster_size();
        if cluster_size < file.sector_size() {
            return Err(OpenError::SectorSize {
                cluster_size,
                sector_size: file.sector_size() as u32,
            });
        }
        let read_only = options.read_only;
        if !read_only {
            if file.is_read_only() {
                return Err(OpenError::ReadOnlyFile);
            }
            if header.nb_snapshots > 0 {
                return Err(OpenError::NotWritable(
                    "it has internal snapshots (open it read-only)",
                ));
            }
            if header.extended_l2() {
                return Err(OpenError::NotWritable(
                    "writing extended l2 entries (subclusters) is not implemented (open it read-only)",
                ));
            }
            if header.incompatible_features & incompatible::CORRUPT != 0 {
                return Err(OpenError::NotWritable("the image is marked corrupt"));
            }
        }

        let entry_bytes = if header.extended_l2() { 16 } else { 8 };
        let g = Geometry {
            cluster_bits: header.cluster_bits,
            cluster_size,
            l2_bits: header.cluster_bits - (entry_bytes as u32).trailing_zeros(),
            extended_l2: header.extended_l2(),
            zero_flag: header.version >= 3 && !header.extended_l2(),
            refcount_order: header.refcount_order,
            refblock_bits: header.cluster_bits + 3 - header.refcount_order,
            compression: header.compression,
        };

        // Both tables are bounded by the header checks (32 MiB, 8 MiB, inside the file).
        let l1_bytes = file
            .read(header.l1_table_offset, header.l1_size as usize * 8)
            .await
            .map_err(open_io)?;
        let l1: Vec<u64> = (0..header.l1_size as usize)
            .map(|i| get_u64(&l1_bytes, i))
            .collect();
        let mut header = header;
        if !read_only && header.incompatible_features & incompatible::DIRTY != 0 {
            // Lazy refcounts, not closed cleanly: rebuild them before writing anything.
            let (offset, clusters) =
                crate::repair::rebuild_refcounts(&file, &header, &g, &l1).await?;
            header.refcount_table_offset = offset;
            header.refcount_table_clusters = clusters;
            header.incompatible_features &= !incompatible::DIRTY;
        }
        let reftable_bytes = header.refcount_table_clusters as u64 * cluster_size;
        let table = file
            .read(header.refcount_table_offset, reftable_bytes as usize)
            .await
            .map_err(open_io)?;
        let reftable: Vec<u64> = (0..(reftable_bytes / 8) as usize)
            .map(|i| get_u64(&table, i) & OFFSET_MASK)
            .collect();

        let alloc_end = if read_only {
            file_size.next_multiple_of(cluster_size)
        } else {
            allocation_end(&file, &g, &reftable, file.size()).await?
        };
        if !read_only {
            // The file may end inside the last cluster in use; writes to it need it whole.
            file.ensure_size(alloc_end).await.map_err(open_io)?;
        }
        if !read_only && header.autoclear_to_clear() != 0 {
            update_header(&file, &[(field::AUTOCLEAR, 0u64.to_be_bytes().to_vec())])
                .await
                .map_err(open_io)?;
            file.flush().await.map_err(open_io)?;
        }

        let l2_tables = (options.cache_bytes / cluster_size).max(4) as usize;
        let refblocks = (l2_tables / 4).max(4);
        let sector_shift = file.shift();
        let sector_count = header.size >> sector_shift;
        Ok(Self {
            meta: Mutex::new(Meta::new(
                l1,
                header.l1_table_offset,
                reftable,
                header.refcount_table_offset,
                alloc_end,
                l2_tables,
                refblocks,
            )),
            file,
            g,
            header,
            read_only,
            sector_shift,
            sector_count: AtomicU64::new(sector_count),
            bottom: AtomicBool::new(false),
            allocating: parking_lot::Mutex::new(HashSet::new()),
            allocated: Event::new(),
            resized: Event::new(),
        })
    }

    /// Writes a new, empty image (no backing file) into `file`, growing it as needed; open
    /// it with [`open`](Self::open).
    pub async fn create(file: &ImageFile, options: &CreateOptions) -> Result<(), CreateError> {
        let CreateOptions {
            size,
            cluster_bits,
            refcount_order,
            version,
        } = *options;
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(CreateError::Parameter(
                "cluster size must be 512 B to 2 MiB",
            ));
        }
        if refcount_order > 6 || (version == 2 && refcount_order != 4) {
            return Err(CreateError::Parameter(
                "refcount order must be 0..=6 (4 for version 2)",
            ));
        }
        if version != 2 && version != 3 {
            return Err(CreateError::Parameter("version must be 2 or 3"));
        }
        if size > header::MAX_VIRTUAL_BYTES {
            return Err(CreateError::Parameter("virtual size too large"));
        }
        let cs = 1u64 << cluster_bits;
        if cs < file.sector_size() {
            return Err(CreateError::Parameter(
                "clusters must be at least one host sector",
            ));
        }
        let l1_size = size.div_ceil(cs * (cs / 8)).max(1);
        if l1_size * 8 > header::MAX_L1_BYTES {
            return Err(CreateError::Parameter("virtual size too large"));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let per_block = (cs * 8) >> refcount_order;
        // Header, refcount table, refcount blocks, L1: grow the counts until they cover
        // themselves.
        let (mut table, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + table + blocks + l1_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks <= blocks && need_table <= table {
                break;
            }
            blocks = blocks.max(need_blocks);
            table = table.max(need_table);
        }
        if table * cs > header::MAX_REFTABLE_BYTES {
            return Err(CreateError::Parameter("virtual size too large"));
        }
        let total = 1 + table + blocks + l1_clusters;
        let table_offset = cs;
        let blocks_offset = table_offset + table * cs;
        let l1_offset = blocks_offset + blocks * cs;
        file.ensure_size(total * cs).await.map_err(|e| match e {
            DiskError::Io(_) => CreateError::TooSmall,
            other => CreateError::Io(other),
        })?;

        let mut image = vec![0u8; (total * cs) as usize];
        let head = header::build(
            version,
            cluster_bits,
            size,
            l1_size as u32,
            l1_offset,
            table_offset,
            table as u32,
            refcount_order,
        );
        image[..head.len()].copy_from_slice(&head);
        for b in 0..blocks {
            let at = (table_offset + b * 8) as usize;
            image[at..at + 8].copy_from_slice(&(blocks_offset + b * cs).to_be_bytes());
        }
        for cluster in 0..total {
            let block = (blocks_offset + (cluster / per_block) * cs) as usize;
            crate::entry::set_refcount(
                &mut image[block..block + cs as usize],
                (cluster % per_block) as usize,
                refcount_order,
                1,
            );
        }
        file.write(0, &image, false)
            .await
            .map_err(CreateError::Io)?;
        file.flush().await.map_err(CreateError::Io)
    }

    /// The header as it was when the image was opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file the image's header names (never opened: the layers below come from
    /// the caller).
    pub fn backing_file(&self) -> Option<&str> {
        self.header.backing_file.as_deref()
    }

    /// The image file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    fn disk_end(&self) -> u64 {
        self.sector_count.load(Ordering::Relaxed) << self.sector_shift
    }

    fn check(&self, sector: u64, count: u64) -> Result<(), DiskError> {
        match sector.checked_add(count) {
            Some(end) if end <= self.sector_count.load(Ordering::Relaxed) => Ok(()),
            _ => Err(DiskError::IllegalBlock),
        }
    }

    /// Grows the virtual disk to `size` bytes (a whole number of sectors); shrinking is
    /// refused. Wakes [`wait_resize`](LayerIo::wait_resize).
    pub async fn resize(&self, size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if size < self.disk_end()
            || !size.is_multiple_of(1 << self.sector_shift)
            || size > header::MAX_VIRTUAL_BYTES
        {
            return Err(DiskError::InvalidInput);
        }
        let mut meta = self.meta.lock().await;
        let entries = size.div_ceil(self.g.bytes_per_l2()) as usize;
        meta.grow_l1(&self.file, &self.g, entries).await?;
        meta.set_size(size);
        meta.writeback(&self.file, &self.g).await?;
        self.sector_count
            .store(size >> self.sector_shift, Ordering::Relaxed);
        drop(meta);
        self.resized.notify(usize::MAX);
        Ok(())
    }

    /// Reads host data at `host` into `buffers`; bytes past the end of the file read as
    /// zeros (an image may end inside its last cluster).
    async fn read_host(&self, buffers: &RequestBuffers<'_>, host: u64) -> Result<(), DiskError> {
        let len = buffers.len() as u64;
        let size = self.file.size();
        let inside = size.saturating_sub(host).min(len);
        if inside > 0 {
            self.file
                .disk()
                .read_vectored(
                    &buffers.subrange(0, inside as usize),
                    host >> self.file.shift(),
                )
                .await?;
        }
        if inside < len {
            buffers
                .subrange(inside as usize, (len - inside) as usize)
                .writer()
                .zero((len - inside) as usize)?;
        }
        Ok(())
    }

    async fn decompress(&self, offset: u64, len: u64) -> Result<Vec<u8>, DiskError> {
        let input = self.file.read(offset, len as usize).await?;
        let mut out = vec![0; self.g.cluster_size as usize];
        decompress_cluster(self.g.compression, &input, &mut out)
            .map_err(|()| DiskError::from(CorruptImage::Compressed { offset }))?;
        Ok(out)
    }

    async fn read_impl(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        mut marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        let len = buffers.len() as u64;
        self.check(sector, len >> self.sector_shift)?;
        let start = sector << self.sector_shift;
        let mut pos = 0;
        while pos < len {
            let (mapping, run) = {
                let mut meta = self.meta.lock().await;
                let (mapping, mut run) = meta.lookup(&self.file, &self.g, start + pos).await?;
                // One host read for clusters that follow each other in the file too.
                if let Mapping::Data { host, .. } = mapping {
                    while pos + run < len {
                        match meta.lookup(&self.file, &self.g, start + pos + run).await? {
                            (Mapping::Data { host: next, .. }, more) if next == host + run => {
                                run += more
                            }
                            _ => break,
                        }
                    }
                }
                (mapping, run.min(len - pos))
            };
            let sub = buffers.subrange(pos as usize, run as usize);
            let first = sector + (pos >> self.sector_shift);
            let sectors = first..first + (run >> self.sector_shift);
            match mapping {
                Mapping::Unallocated => {}
                Mapping::Zero { .. } => {
                    sub.writer().zero(run as usize)?;
                    marker.set_range(sectors);
                }
                Mapping::Data { host, .. } => {
                    self.read_host(&sub, host).await?;
                    marker.set_range(sectors);
                }
                Mapping::Compressed { offset, len } => {
                    let data = self.decompress(offset, len).await?;
                    let at = ((start + pos) & (self.g.cluster_size - 1)) as usize;
                    sub.writer().write(&data[at..at + run as usize])?;
                    marker.set_range(sectors);
                }
            }
            pos += run;
        }
        Ok(())
    }

    async fn write_impl(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        below: Option<&LowerLayers<'_>>,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let len = buffers.len() as u64;
        if !len.is_multiple_of(1 << self.sector_shift) {
            return Err(DiskError::InvalidInput);
        }
        self.check(sector, len >> self.sector_shift)?;
        if len == 0 {
            return Ok(());
        }
        buffers.validate()?;
        let start = sector << self.sector_shift;
        let cs = self.g.cluster_size;
        let mut pos = 0;
        let mut allocated = false;
        while pos < len {
            let mut meta = self.meta.lock().await;
            let (mapping, run) = meta.lookup(&self.file, &self.g, start + pos).await?;
            if let Mapping::Data { host, .. } = mapping
                && meta.is_metadata(&self.g, host)
            {
                return Err(metadata_overlap(start + pos, host));
            }
            if let Mapping::Data { host, copied: true } = mapping {
                // In place: coalesce the clusters that follow in the file too.
                let mut run = run.min(len - pos);
                while pos + run < len {
                    match meta.lookup(&self.file, &self.g, start + pos + run).await? {
                        (
                            Mapping::Data {
                                host: next,
                                copied: true,
                            },
                            more,
                        ) if next == host + run && !meta.is_metadata(&self.g, next) => {
                            run += more.min(len - pos - run)
                        }
                        _ => break,
                    }
                }
                drop(meta);
                let sub = buffers.subrange(pos as usize, run as usize);
                self.file
                    .disk()
                    .write_vectored(&sub, host >> self.file.shift(), fua)
                    .await?;
                pos += run;
                continue;
            }
            let cluster_start = (start + pos) & !(cs - 1);
            let cluster = cluster_start >> self.g.cluster_bits;
            if let Some(listener) = self.allocation_in_flight(cluster) {
                // Another write is allocating this cluster: wait, then look again.
                drop(meta);
                listener.await;
                continue;
            }
            let piece = (cluster_start + cs).min(start + len) - (start + pos);
            // Reserve the cluster and its host cluster under the lock, fill it without the
            // lock (reads and other writes go on meanwhile; reads of this cluster see its
            // old mapping until it is published), then publish the new mapping.
            let mut run: SmallVec<[Reserved<'_>; 4]> = SmallVec::new();
            let guard = InFlight::new(self, cluster);
            let host = meta.alloc_cluster(&self.file, &self.g).await?;
            run.push(Reserved {
                cluster,
                old: mapping,
                host,
                _guard: guard,
            });
            // A write that covers whole clusters reserves the ones that follow too (up to
            // 1 MiB of them), so clusters allocated one after the other take one host write.
            let mut end = pos + piece;
            if start + pos == cluster_start && piece == cs {
                while end + cs <= len && end - pos < MAX_RUN_BYTES {
                    let next = (start + end) >> self.g.cluster_bits;
                    if self.allocation_in_flight(next).is_some() {
                        break;
                    }
                    let (old, _) = meta.lookup(&self.file, &self.g, start + end).await?;
                    if matches!(old, Mapping::Data { .. }) {
                        // In place, or to be copied: left to the next round.
                        break;
                    }
                    let guard = InFlight::new(self, next);
                    let host = meta.alloc_cluster(&self.file, &self.g).await?;
                    run.push(Reserved {
                        cluster: next,
                        old,
                        host,
                        _guard: guard,
                    });
                    end += cs;
                }
            }
            drop(meta);
            let filled = if run.len() == 1 {
                let data = buffers.subrange(pos as usize, piece as usize);
                self.fill_cluster(host, mapping, &data, start + pos, below)
                    .await
            } else {
                self.write_whole_clusters(&run, buffers, pos).await
            };
            let mut meta = self.meta.lock().await;
            if let Err(e) = filled {
                // Nothing points at the reserved clusters: free them at the next write-back.
                for r in &run {
                    meta.release(
                        &self.g,
                        Mapping::Data {
                            host: r.host,
                            copied: true,
                        },
                    );
                }
                return Err(e);
            }
            for r in &run {
                meta.set_l2(&self.file, &self.g, r.cluster, r.host | COPIED, r.old)
                    .await?;
            }
            drop(meta);
            drop(run);
            allocated = true;
            pos = end;
        }
        // A FUA write is durable with its mapping: the clusters it allocated, or an
        // in-place write into a cluster allocated since the last flush, need the metadata
        // written back too.
        if fua {
            let mut meta = self.meta.lock().await;
            if allocated || meta.is_dirty() {
                meta.writeback(&self.file, &self.g).await?;
            }
        }
        Ok(())
    }

    /// Writes `data` at guest byte `offset` into the newly allocated host cluster `host`
    /// (all inside one guest cluster whose mapping was `old`), filling the rest of the
    /// cluster from what it read as before: the layers below, zeros, the old data, or the
    /// decompressed data. Takes no lock: the caller owns the allocation.
    async fn fill_cluster(
        &self,
        host: u64,
        old: Mapping,
        data: &RequestBuffers<'_>,
        offset: u64,
        below: Option<&LowerLayers<'_>>,
    ) -> Result<(), DiskError> {
        let cs = self.g.cluster_size;
        let cluster_start = offset & !(cs - 1);
        let in_cluster = (offset - cluster_start) as usize;
        let valid = (self.disk_end() - cluster_start).min(cs) as usize;
        let piece = data.len();
        if in_cluster == 0 && piece >= valid {
            return self
                .file
                .disk()
                .write_vectored(data, host >> self.file.shift(), false)
                .await;
        }
        let mut cluster = match old {
            Mapping::Unallocated | Mapping::Zero { .. } => vec![0; cs as usize],
            Mapping::Compressed { offset, len } => self.decompress(offset, len).await?,
            Mapping::Data { host, .. } => self.file.read(host & !(cs - 1), cs as usize).await?,
        };
        if let (Mapping::Unallocated, Some(below)) = (old, below) {
            // Copy-on-write: what the stack below holds around the written piece.
            for (from, to) in [(0, in_cluster), (in_cluster + piece, valid)] {
                if from < to {
                    let buf = OwnedRequestBuffers::new(to - from);
                    below
                        .read(
                            &buf.buffers(true),
                            (cluster_start + from as u64) >> self.sector_shift,
                        )
                        .await?;
                    buf.buffers(false).reader().read(&mut cluster[from..to])?;
                }
            }
        }
        data.reader()
            .read(&mut cluster[in_cluster..in_cluster + piece])?;
        self.file.write(host, &cluster, false).await
    }

    /// Writes whole clusters reserved for consecutive guest clusters from `buffers` (the
    /// first at byte `pos` of them): one host write per run of host clusters that follow
    /// each other in the file.
    async fn write_whole_clusters(
        &self,
        run: &[Reserved<'_>],
        buffers: &RequestBuffers<'_>,
        pos: u64,
    ) -> Result<(), DiskError> {
        let cs = self.g.cluster_size;
        let mut i = 0;
        while i < run.len() {
            let mut j = i + 1;
            while j < run.len() && run[j].host == run[j - 1].host + cs {
                j += 1;
            }
            let sub = buffers.subrange(
                (pos + i as u64 * cs) as usize,
                ((j - i) as u64 * cs) as usize,
            );
            self.file
                .disk()
                .write_vectored(&sub, run[i].host >> self.file.shift(), false)
                .await?;
            i = j;
        }
        Ok(())
    }

    /// Allocates the cluster of guest byte `offset` and writes `data` there, all under the
    /// metadata lock (unmap's rare rewrite of a compressed or shared cluster).
    async fn allocate_write_locked(
        &self,
        meta: &mut Meta,
        old: Mapping,
        data: &RequestBuffers<'_>,
        offset: u64,
    ) -> Result<(), DiskError> {
        let host = meta.alloc_cluster(&self.file, &self.g).await?;
        if let Err(e) = self.fill_cluster(host, old, data, offset, None).await {
            meta.release(&self.g, Mapping::Data { host, copied: true });
            return Err(e);
        }
        let cluster = offset >> self.g.cluster_bits;
        meta.set_l2(&self.file, &self.g, cluster, host | COPIED, old)
            .await
    }

    /// Whether guest cluster `cluster` is being allocated; if so, returns a listener that
    /// completes when some allocation finishes (the caller drops its lock and waits).
    fn allocation_in_flight(&self, cluster: u64) -> Option<event_listener::EventListener> {
        if !self.allocating.lock().contains(&cluster) {
            return None;
        }
        let listener = self.allocated.listen();
        // Checked again with the listener registered, so a completion is never missed.
        self.allocating
            .lock()
            .contains(&cluster)
            .then_some(listener)
    }

    async fn unmap_impl(
        &self,
        sector: u64,
        count: u64,
        next_is_zero: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check(sector, count)?;
        let cs = self.g.cluster_size;
        let start = sector << self.sector_shift;
        let end = (sector + count) << self.sector_shift;
        let disk_end = self.disk_end();
        let mut meta = self.meta.lock().await;
        let mut pos = start;
        while pos < end {
            let cluster_start = pos & !(cs - 1);
            let cluster_end = (cluster_start + cs).min(disk_end);
            let piece_end = cluster_end.min(end);
            let cluster = cluster_start >> self.g.cluster_bits;
            if let Some(listener) = self.allocation_in_flight(cluster) {
                drop(meta);
                listener.await;
                meta = self.meta.lock().await;
                continue;
            }
            if next_is_zero && meta.l1_entry(&self.g, cluster) == Some(0) {
                // No L2 table: nothing here to drop, up to the next table's clusters (a
                // discard of a whole, mostly empty disk costs one step per L1 entry).
                let bytes_per_l2 = self.g.bytes_per_l2();
                pos = ((pos / bytes_per_l2) + 1)
                    .saturating_mul(bytes_per_l2)
                    .min(end);
                continue;
            }
            let (mapping, _) = meta.lookup(&self.file, &self.g, pos).await?;
            if pos == cluster_start && piece_end == cluster_end {
                let entry = if next_is_zero {
                    Some(0)
                } else if self.g.zero_flag {
                    Some(ZERO)
                } else {
                    // Version 2 over a lower layer has no way to say "zeros" but to write
                    // them; unmap is allowed to leave the data (`Unspecified`).
                    None
                };
                match (entry, mapping) {
                    (Some(0), Mapping::Unallocated)
                    | (Some(ZERO), Mapping::Zero { prealloc: 0 }) => {}
                    (Some(entry), old) => {
                        meta.set_l2(&self.file, &self.g, cluster, entry, old)
                            .await?;
                    }
                    (None, _) => {}
                }
            } else {
                let len = (piece_end - pos) as usize;
                match mapping {
                    Mapping::Zero { .. } => {}
                    Mapping::Unallocated => {
                        // Over a lower layer that is not zero this leaves its data: the
                        // layer's unmap behaviour is then `Unspecified`.
                    }
                    Mapping::Data { host, .. } if meta.is_metadata(&self.g, host) => {
                        return Err(metadata_overlap(pos, host));
                    }
                    Mapping::Data { host, copied: true } => {
                        self.file.write(host, &vec![0; len], false).await?;
                    }
                    old => {
                        let zeros = OwnedRequestBuffers::new(len);
                        self.allocate_write_locked(&mut meta, old, &zeros.buffers(false), pos)
                            .await?;
                    }
                }
            }
            pos = piece_end;
        }
        Ok(())
    }
}

/// A data cluster that lies on the header or a table: writing it would destroy metadata.
fn metadata_overlap(guest: u64, host: u64) -> DiskError {
    CorruptImage::BadPointer {
        what: "l2",
        index: guest,
        offset: host,
    }
    .into()
}

/// Where allocation may start: after the last cluster with a nonzero refcount (and never
/// before the end of what the refcount table describes as used).
async fn allocation_end(
    file: &ImageFile,
    g: &Geometry,
    reftable: &[u64],
    file_size: u64,
) -> Result<u64, OpenError> {
    for (index, &block) in reftable.iter().enumerate().rev() {
        if block == 0 {
            continue;
        }
        if !block.is_multiple_of(g.cluster_size) || block > file_size {
            return Err(OpenError::Corrupt(CorruptImage::BadPointer {
                what: "refcount table",
                index: index as u64,
                offset: block,
            }));
        }
        let data = file
            .read(block, g.cluster_size as usize)
            .await
            .map_err(open_io)?;
        let entries = 1usize << g.refblock_bits;
        if let Some(last) = (0..entries)
            .rev()
            .find(|&i| get_refcount(&data, i, g.refcount_order) != 0)
        {
            // A cluster in use may end past the file (the file ends inside the last
            // cluster), but not by more than a cluster.
            let cluster = ((index as u64) << g.refblock_bits) + last as u64;
            let end = (cluster + 1).checked_mul(g.cluster_size);
            let limit = file_size.next_multiple_of(g.cluster_size) + g.cluster_size;
            return match end {
                Some(end) if end <= limit => Ok(end),
                _ => Err(OpenError::Corrupt(CorruptImage::BadPointer {
                    what: "refcount block",
                    index: index as u64,
                    offset: block,
                })),
            };
        }
    }
    // No refcounts at all: a broken image, but allocating after the file keeps it intact.
    Ok(file_size.next_multiple_of(g.cluster_size))
}

/// Opening a layer on top of the layers below failed; see [`Qcow2Attach`].
#[derive(Debug, Error)]
pub enum AttachError {
    /// The image names a backing file but the stack gives no layer below it.
    #[error(
        "the image names the backing file `{0}` but no layer is given below it; list the backing layers in the spec (the backing file header is never followed)"
    )]
    MissingBacking(String),
}

/// A qcow2 layer waiting to learn its place in the stack: at the bottom, unallocated
/// clusters read as zeros and unmap is [`UnmapBehavior::Zeroes`]; an image that names a
/// backing file refuses to be the bottom layer (the backing file would silently vanish).
#[derive(Debug)]
pub struct Qcow2Attach(pub Arc<Qcow2Layer>);

impl LayerAttach for Qcow2Attach {
    type Layer = Arc<Qcow2Layer>;
    type Error = AttachError;

    fn attach(self, lower: Option<&LowerLayerMetadata>) -> Result<Arc<Qcow2Layer>, AttachError> {
        if lower.is_none()
            && let Some(name) = self.0.backing_file()
        {
            return Err(AttachError::MissingBacking(name.to_owned()));
        }
        self.0.bottom.store(lower.is_none(), Ordering::Relaxed);
        Ok(self.0)
    }
}

impl LayerIo for Qcow2Layer {
    fn layer_type(&self) -> &str {
        "qcow2"
    }

    fn sector_count(&self) -> u64 {
        self.sector_count.load(Ordering::Relaxed)
    }

    fn sector_size(&self) -> u32 {
        1 << self.sector_shift
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }

    fn physical_sector_size(&self) -> u32 {
        self.file
            .disk()
            .physical_sector_size()
            .max(1 << self.sector_shift)
    }

    fn is_fua_respected(&self) -> bool {
        self.file.disk().is_fua_respected()
    }

    fn is_logically_read_only(&self) -> bool {
        self.read_only
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        if meta.is_dirty() {
            return meta.writeback(&self.file, &self.g).await;
        }
        // Only data was written since the last write-back (in place): the file's flush
        // needs no lock, so reads and writes go on meanwhile.
        drop(meta);
        self.file.flush().await
    }

    async fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        self.read_impl(buffers, sector, marker).await
    }

    fn may_hold(&self, sector: u64, count: u64) -> bool {
        if count == 0 {
            return false;
        }
        let Some(mut meta) = self.meta.try_lock() else {
            return true;
        };
        let end = sector.saturating_add(count).min(self.sector_count());
        if end <= sector {
            return true;
        }
        meta.may_hold(
            &self.g,
            sector << self.sector_shift,
            end << self.sector_shift,
        )
    }

    async fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.write_impl(buffers, sector, fua, None).await
    }

    async fn write_cow(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        below: &LowerLayers<'_>,
    ) -> Result<(), DiskError> {
        self.write_impl(buffers, sector, fua, Some(below)).await
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        _block_level_only: bool,
        next_is_zero: bool,
    ) -> Result<(), DiskError> {
        self.unmap_impl(sector, count, next_is_zero).await
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        if self.bottom.load(Ordering::Relaxed) {
            UnmapBehavior::Zeroes
        } else {
            UnmapBehavior::Unspecified
        }
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        (self.g.cluster_size >> self.sector_shift) as u32
    }

    fn register_memory(&self, memory: &request_buffers::GuestMemory) -> Result<(), DiskError> {
        // Reads and writes of allocated clusters go straight between the guest's buffers and
        // the image file's disk.
        self.file.disk().register_memory(memory)
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        loop {
            let listener = self.resized.listen();
            let current = self.sector_count();
            if current != sector_count {
                return current;
            }
            listener.await;
        }
    }
}

/// A layer dropped without a flush writes its cached metadata back (best effort), so the
/// writes that completed are not lost to a missing final flush.
impl Drop for Qcow2Layer {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Some(mut meta) = self.meta.try_lock()
            && meta.is_dirty()
        {
            let _ = futures::executor::block_on(meta.writeback(&self.file, &self.g));
        }
    }
}

impl From<InvalidImage> for OpenError {
    fn from(e: InvalidImage) -> Self {
        OpenError::Invalid(e)
    }
}
