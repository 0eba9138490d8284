//! Cached metadata (L1, L2 tables, refcounts), cluster allocation, and write-back in a
//! crash-safe order.
//!
//! # The order of writes
//!
//! Every metadata change is made in memory first (the L1 and refcount tables are held
//! whole, L2 tables and refcount blocks in bounded caches) and written back by
//! [`Meta::writeback`], on a flush, a FUA write that allocated, or when a cache is full of
//! changed clusters. Write-back goes:
//!
//! 1. changed refcount blocks; a flush if one is new (a table entry will point at it);
//! 2. the refcount table (a moved table: written whole, flushed, then the header points at
//!    it);
//! 3. a flush: refcounts, and the data written before, are durable before anything on disk
//!    refers to a newly allocated cluster;
//! 4. changed L2 tables; a flush if one is new (an L1 entry will point at it);
//! 5. the L1 table (a moved one: written whole, flushed, then the header);
//! 6. a flush;
//! 7. only now the clusters that entries no longer point at lose their references (their
//!    refcounts are written at the next write-back). A crash in between leaks them, which
//!    `qemu-img check` reports as leaks, never as corruption.
//!
//! Data is written before its cluster's L2 entry changes in memory (the layer fills a newly
//! allocated cluster outside the lock, with the guest cluster marked in flight so no other
//! write or unmap touches its mapping meanwhile), so a concurrent read sees the old mapping
//! (and the layers below) or the new one with the data in place.
//! Clusters are allocated at the end of the image only (never reused while the image is
//! open), so a write in flight to a cluster that an unmap just freed lands in a cluster
//! nothing refers to.

use crate::cache::{Cache, Slot};
use crate::entry::{
    COMPRESSED, COPIED, Mapping, OFFSET_MASK, compressed_clusters, decode_extended, decode_l2,
    get_refcount, get_u64, max_refcount, set_refcount, set_u64,
};
use crate::error::CorruptImage;
use crate::header::{CompressionType, MAX_L1_BYTES, MAX_REFTABLE_BYTES, field};
use crate::host::ImageFile;
use disk_backend::DiskError;
use std::collections::BTreeSet;

/// What never changes while an image is open.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// log2 of the entries of an L2 table.
    pub l2_bits: u32,
    pub extended_l2: bool,
    /// Bit 0 of standard L2 entries means "reads as zeros" (version 3).
    pub zero_flag: bool,
    pub refcount_order: u32,
    /// log2 of the entries of a refcount block.
    pub refblock_bits: u32,
    pub compression: CompressionType,
}

impl Geometry {
    /// Guest bytes one L2 table maps.
    pub fn bytes_per_l2(&self) -> u64 {
        self.cluster_size << self.l2_bits
    }
}

/// The mutable metadata, behind the layer's async lock.
#[derive(Debug)]
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    l1_dirty: BTreeSet<usize>,
    /// The L1 table moved (it grew): the old offset and byte length.
    l1_moved: Option<(u64, u64)>,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    reftable_dirty: BTreeSet<usize>,
    /// The refcount table moved: the old offset and clusters.
    reftable_moved: Option<(u64, u64)>,
    /// The virtual size, when the header must be told a new one.
    size_changed: Option<u64>,
    l2: Cache,
    refs: Cache,
    refs_capacity: usize,
    /// Where the next cluster is allocated: after every cluster in use.
    pub alloc_end: u64,
    /// Host clusters to dereference once the entries that pointed at them are durable.
    deferred_free: Vec<u64>,
}

fn io_corrupt(e: CorruptImage) -> DiskError {
    e.into()
}

impl Meta {
    pub fn new(
        l1: Vec<u64>,
        l1_offset: u64,
        reftable: Vec<u64>,
        reftable_offset: u64,
        alloc_end: u64,
        l2_tables: usize,
        refblocks: usize,
    ) -> Self {
        Self {
            l1,
            l1_offset,
            l1_dirty: BTreeSet::new(),
            l1_moved: None,
            reftable,
            reftable_offset,
            reftable_dirty: BTreeSet::new(),
            reftable_moved: None,
            size_changed: None,
            l2: Cache::new(l2_tables),
            refs: Cache::new(refblocks),
            refs_capacity: refblocks.max(2),
            alloc_end,
            deferred_free: Vec::new(),
        }
    }

    /// The L2 table at `offset` (the entry at `l1_index` points at it), loaded if needed.
    pub async fn l2_table(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        offset: u64,
        l1_index: usize,
    ) -> Result<&mut Slot, DiskError> {
        if self.l2.get(offset).is_none() {
            if !offset.is_multiple_of(g.cluster_size) || offset > f.size() {
                return Err(io_corrupt(CorruptImage::BadPointer {
                    what: "l1",
                    index: l1_index as u64,
                    offset,
                }));
            }
            if !self.l2.has_room() {
                self.writeback(f, g).await?;
            }
            let data = f.read(offset, g.cluster_size as usize).await?;
            self.l2.insert(offset, data, false);
        }
        Ok(self.l2.get(offset).expect("just inserted"))
    }

    /// The mapping of guest byte `offset`, and how many bytes from it map alike (to the end
    /// of the cluster, or of a run of subclusters).
    pub async fn lookup(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        offset: u64,
    ) -> Result<(Mapping, u64), DiskError> {
        let cluster = offset >> g.cluster_bits;
        let in_cluster = offset & (g.cluster_size - 1);
        let to_end = g.cluster_size - in_cluster;
        let l1_index = (cluster >> g.l2_bits) as usize;
        let l2_index = (cluster & ((1 << g.l2_bits) - 1)) as usize;
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Ok((Mapping::Unallocated, to_end));
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, to_end));
        }
        let file_size = f.size();
        let slot = self.l2_table(f, g, l2_offset, l1_index).await?;
        let bad = |offset| {
            io_corrupt(CorruptImage::BadPointer {
                what: "l2",
                index: cluster,
                offset,
            })
        };
        let (entry, bitmap) = if g.extended_l2 {
            (
                get_u64(&slot.data, l2_index * 2),
                get_u64(&slot.data, l2_index * 2 + 1),
            )
        } else {
            (get_u64(&slot.data, l2_index), 0)
        };
        if entry & COMPRESSED != 0 {
            let mapping = decode_l2(entry, g.cluster_bits, false);
            if let Mapping::Compressed { offset, .. } = mapping
                && offset > file_size
            {
                return Err(bad(offset));
            }
            return Ok((mapping, to_end));
        }
        let host = entry & OFFSET_MASK;
        if host != 0 && (!host.is_multiple_of(g.cluster_size) || host >= file_size) {
            return Err(bad(host));
        }
        if !g.extended_l2 {
            let mapping = match decode_l2(entry, g.cluster_bits, g.zero_flag) {
                Mapping::Data { host, copied } => Mapping::Data {
                    host: host + in_cluster,
                    copied,
                },
                other => other,
            };
            return Ok((mapping, to_end));
        }
        let sub_size = g.cluster_size / 32;
        let index = (in_cluster / sub_size) as u32;
        let first = decode_extended(entry, bitmap, index, sub_size);
        if matches!(first, Mapping::Data { .. }) && host == 0 {
            return Err(bad(host));
        }
        let same = |m: Mapping| std::mem::discriminant(&m) == std::mem::discriminant(&first);
        let mut end = index + 1;
        while end < 32 && same(decode_extended(entry, bitmap, end, sub_size)) {
            end += 1;
        }
        let len = end as u64 * sub_size - in_cluster;
        let mapping = match first {
            Mapping::Data { copied, .. } => Mapping::Data {
                host: host + in_cluster,
                copied,
            },
            other => other,
        };
        Ok((mapping, len))
    }

    /// Whether the layer may hold any byte of `offset..end` judging from what is in memory:
    /// `true` where an L2 table it would need is not cached.
    pub fn may_hold(&mut self, g: &Geometry, offset: u64, end: u64) -> bool {
        let mut cluster = offset >> g.cluster_bits;
        let last = (end - 1) >> g.cluster_bits;
        // Bounded work: a long range is assumed held.
        if last - cluster > 256 {
            return true;
        }
        while cluster <= last {
            let l1_index = (cluster >> g.l2_bits) as usize;
            let l2_offset = self.l1.get(l1_index).map_or(0, |e| e & OFFSET_MASK);
            if l2_offset == 0 {
                cluster = ((l1_index as u64) + 1) << g.l2_bits;
                continue;
            }
            let Some(slot) = self.l2.get(l2_offset) else {
                return true;
            };
            let l2_index = (cluster & ((1 << g.l2_bits) - 1)) as usize;
            let (entry, bitmap) = if g.extended_l2 {
                (
                    get_u64(&slot.data, l2_index * 2),
                    get_u64(&slot.data, l2_index * 2 + 1),
                )
            } else {
                (get_u64(&slot.data, l2_index), 0)
            };
            let held = if g.extended_l2 {
                entry & COMPRESSED != 0 || bitmap != 0
            } else {
                decode_l2(entry, g.cluster_bits, g.zero_flag) != Mapping::Unallocated
            };
            if held {
                return true;
            }
            cluster += 1;
        }
        false
    }

    /// Changes the refcount of the cluster at `offset` by `delta`, making room in the cache
    /// first (which may write back). Returns the new refcount.
    pub async fn add_ref(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        offset: u64,
        delta: i64,
    ) -> Result<u64, DiskError> {
        if !self.refs.has_room() {
            self.writeback(f, g).await?;
        }
        self.add_ref_inner(f, g, offset, delta).await
    }

    /// [`add_ref`](Self::add_ref) without writing back: the cache may exceed its capacity
    /// until the next write-back. Creates refcount blocks and grows the refcount table as
    /// needed (their own clusters are counted too).
    async fn add_ref_inner(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        offset: u64,
        delta: i64,
    ) -> Result<u64, DiskError> {
        let mut queue: Vec<(u64, i64)> = vec![(offset, delta)];
        let mut result = None;
        while let Some((offset, delta)) = queue.pop() {
            let cluster = offset >> g.cluster_bits;
            let block_index = (cluster >> g.refblock_bits) as usize;
            let entry_index = (cluster & ((1 << g.refblock_bits) - 1)) as usize;
            while block_index >= self.reftable.len() {
                self.grow_reftable(f, g, block_index, &mut queue).await?;
            }
            let block = self.reftable[block_index] & OFFSET_MASK;
            if block == 0 {
                let new = self.alloc_end;
                self.alloc_end += g.cluster_size;
                f.ensure_size(self.alloc_end).await?;
                // The block is in the cache before the table entry points at it.
                self.refs
                    .insert(new, vec![0; g.cluster_size as usize], true);
                self.reftable[block_index] = new;
                self.reftable_dirty.insert(block_index);
                queue.push((new, 1));
            } else if self.refs.get(block).is_none() {
                if !block.is_multiple_of(g.cluster_size) || block > f.size() {
                    return Err(io_corrupt(CorruptImage::BadPointer {
                        what: "refcount table",
                        index: block_index as u64,
                        offset: block,
                    }));
                }
                let data = f.read(block, g.cluster_size as usize).await?;
                self.refs.insert(block, data, false);
            }
            let block = self.reftable[block_index];
            let slot = self.refs.get(block).expect("cached above");
            let old = get_refcount(&slot.data, entry_index, g.refcount_order);
            let new = old as i128 + delta as i128;
            if new < 0 || new > max_refcount(g.refcount_order) as i128 {
                return Err(io_corrupt(CorruptImage::RefcountOverflow { offset }));
            }
            let at = set_refcount(&mut slot.data, entry_index, g.refcount_order, new as u64);
            slot.touch(at, ((1usize << g.refcount_order) / 8).max(1));
            result.get_or_insert(new as u64);
        }
        Ok(result.expect("the queue held the request"))
    }

    /// Moves the refcount table to a larger one at the end of the image, big enough for
    /// block `needed` and the blocks of its own clusters.
    async fn grow_reftable(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        needed: usize,
        queue: &mut Vec<(u64, i64)>,
    ) -> Result<(), DiskError> {
        let per_cluster = (g.cluster_size / 8) as usize;
        let entries = (needed + 1)
            .max(self.reftable.len() * 2)
            .next_multiple_of(per_cluster);
        let bytes = entries as u64 * 8;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(io_corrupt(CorruptImage::RefcountTableFull));
        }
        let new = self.alloc_end;
        self.alloc_end += bytes;
        f.ensure_size(self.alloc_end).await?;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(g.cluster_size);
        match self.reftable_moved {
            // Moved twice before a write-back: the intermediate table was never on disk.
            Some(_) => {
                for c in 0..old_clusters {
                    self.deferred_free
                        .push(self.reftable_offset + c * g.cluster_size);
                }
            }
            None => self.reftable_moved = Some((self.reftable_offset, old_clusters)),
        }
        self.reftable.resize(entries, 0);
        self.reftable_offset = new;
        for c in 0..bytes / g.cluster_size {
            queue.push((new + c * g.cluster_size, 1));
        }
        Ok(())
    }

    /// Allocates one cluster at the end of the image, with refcount 1.
    pub async fn alloc_cluster(&mut self, f: &ImageFile, g: &Geometry) -> Result<u64, DiskError> {
        let offset = self.alloc_end;
        self.alloc_end += g.cluster_size;
        f.ensure_size(self.alloc_end).await?;
        self.add_ref(f, g, offset, 1).await?;
        Ok(offset)
    }

    /// The L2 table offset the L1 entry of guest cluster `cluster` holds (0: none), or `None`
    /// past the L1 table.
    pub fn l1_entry(&self, g: &Geometry, cluster: u64) -> Option<u64> {
        self.l1
            .get((cluster >> g.l2_bits) as usize)
            .map(|e| e & OFFSET_MASK)
    }

    /// The L2 table for guest cluster `cluster`, allocated (empty) if the L1 entry has none.
    pub async fn l2_for_write(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        cluster: u64,
    ) -> Result<u64, DiskError> {
        let l1_index = (cluster >> g.l2_bits) as usize;
        let Some(&entry) = self.l1.get(l1_index) else {
            return Err(DiskError::IllegalBlock);
        };
        let offset = entry & OFFSET_MASK;
        if offset != 0 {
            if entry & COPIED == 0 {
                return Err(io_corrupt(CorruptImage::SharedTable));
            }
            return Ok(offset);
        }
        let offset = self.alloc_cluster(f, g).await?;
        if !self.l2.has_room() {
            self.writeback(f, g).await?;
        }
        self.l2
            .insert(offset, vec![0; g.cluster_size as usize], true);
        self.l1[l1_index] = offset | COPIED;
        self.l1_dirty.insert(l1_index);
        Ok(offset)
    }

    /// Points guest cluster `cluster` at `entry` (an encoded standard L2 entry), and queues
    /// the host clusters the old entry referenced for dereferencing after write-back.
    pub async fn set_l2(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        cluster: u64,
        entry: u64,
        old: Mapping,
    ) -> Result<(), DiskError> {
        let l2 = self.l2_for_write(f, g, cluster).await?;
        let l1_index = (cluster >> g.l2_bits) as usize;
        let slot = self.l2_table(f, g, l2, l1_index).await?;
        let index = (cluster & ((1 << g.l2_bits) - 1)) as usize;
        set_u64(&mut slot.data, index, entry);
        slot.touch(index * 8, 8);
        self.release(g, old);
        Ok(())
    }

    /// Queues the host clusters `old` referenced for dereferencing after write-back.
    pub fn release(&mut self, g: &Geometry, old: Mapping) {
        match old {
            Mapping::Data { host, .. } => self.deferred_free.push(host & !(g.cluster_size - 1)),
            Mapping::Zero { prealloc } if prealloc != 0 => self.deferred_free.push(prealloc),
            Mapping::Compressed { offset, len } => {
                self.deferred_free
                    .extend(compressed_clusters(offset, len, g.cluster_bits))
            }
            _ => {}
        }
    }

    /// Whether host byte `offset` lies in metadata a data write must never touch (the header,
    /// the L1 or the refcount table): a corrupt L2 entry pointing there is not written
    /// through.
    pub fn is_metadata(&self, g: &Geometry, offset: u64) -> bool {
        let in_table = |start: u64, bytes: u64| offset >= start && offset < start + bytes;
        offset < g.cluster_size
            || in_table(
                self.l1_offset,
                (self.l1.len() as u64 * 8).next_multiple_of(g.cluster_size),
            )
            || in_table(
                self.reftable_offset,
                (self.reftable.len() as u64 * 8).next_multiple_of(g.cluster_size),
            )
    }

    /// Grows the L1 table to `entries`, moving it to the end of the image.
    pub async fn grow_l1(
        &mut self,
        f: &ImageFile,
        g: &Geometry,
        entries: usize,
    ) -> Result<(), DiskError> {
        if entries <= self.l1.len() {
            return Ok(());
        }
        let bytes = (entries as u64 * 8).next_multiple_of(g.cluster_size);
        if bytes > MAX_L1_BYTES {
            return Err(DiskError::InvalidInput);
        }
        let old_bytes = (self.l1.len() as u64 * 8).next_multiple_of(g.cluster_size);
        let new = self.alloc_end;
        self.alloc_end += bytes;
        f.ensure_size(self.alloc_end).await?;
        for c in 0..bytes / g.cluster_size {
            self.add_ref(f, g, new + c * g.cluster_size, 1).await?;
        }
        match self.l1_moved {
            Some(_) => {
                for c in 0..old_bytes / g.cluster_size {
                    self.deferred_free.push(self.l1_offset + c * g.cluster_size);
                }
            }
            None => self.l1_moved = Some((self.l1_offset, old_bytes)),
        }
        self.l1.resize(entries, 0);
        self.l1_offset = new;
        Ok(())
    }

    /// Records a new virtual size for the header (written at the next write-back).
    pub fn set_size(&mut self, size: u64) {
        self.size_changed = Some(size);
    }

    pub fn is_dirty(&self) -> bool {
        self.refs.is_dirty()
            || self.l2.is_dirty()
            || !self.l1_dirty.is_empty()
            || !self.reftable_dirty.is_empty()
            || self.l1_moved.is_some()
            || self.reftable_moved.is_some()
            || self.size_changed.is_some()
            || !self.deferred_free.is_empty()
    }

    /// Writes every changed piece of metadata back in the crash-safe order of the module
    /// documentation, and flushes the file.
    pub async fn writeback(&mut self, f: &ImageFile, g: &Geometry) -> Result<(), DiskError> {
        if !self.is_dirty() {
            return f.flush().await;
        }
        let sector = f.sector_size() as usize;

        // 1, 2.
        self.write_refcounts(f, g).await?;
        let mut header: Vec<(usize, Vec<u8>)> = Vec::new();
        // 3. Refcounts and data are durable before anything points at new clusters.
        f.flush().await?;

        // 4. L2 tables.
        let mut fresh = false;
        for slot in self.l2.dirty_slots() {
            write_slot(f, slot, sector).await?;
            fresh |= std::mem::take(&mut slot.fresh);
        }
        if fresh {
            f.flush().await?;
        }
        // 5. The L1 table and the header. A move or a new size is forgotten only once the
        // header says so: after a failed write, the next write-back does it again.
        if self.l1_moved.is_some() {
            let table = encode_table(&self.l1, g.cluster_size);
            f.write(self.l1_offset, &table, false).await?;
            f.flush().await?;
            header.push((
                field::L1_TABLE_OFFSET,
                self.l1_offset.to_be_bytes().to_vec(),
            ));
            header.push((
                field::L1_SIZE,
                (self.l1.len() as u32).to_be_bytes().to_vec(),
            ));
        } else {
            write_entries(f, &self.l1, self.l1_offset, &self.l1_dirty, sector).await?;
        }
        if let Some(size) = self.size_changed {
            header.push((field::SIZE, size.to_be_bytes().to_vec()));
        }
        if !header.is_empty() {
            update_header(f, &header).await?;
        }
        self.l1_dirty.clear();
        self.size_changed = None;
        if let Some((old, bytes)) = self.l1_moved.take() {
            for c in 0..bytes / g.cluster_size {
                self.deferred_free.push(old + c * g.cluster_size);
            }
        }
        // 6.
        f.flush().await?;

        // 7. Dereference what nothing durable points at any more, and write the lowered
        // refcounts (a crash before that leaks the clusters, no worse). Moving the refcount
        // table can free its old clusters in turn.
        while !self.deferred_free.is_empty() {
            let frees = std::mem::take(&mut self.deferred_free);
            for offset in frees {
                if self.add_ref_inner(f, g, offset, -1).await? == 0 && !self.is_metadata(g, offset)
                {
                    self.l2.remove(offset);
                    f.discard(offset, g.cluster_size).await;
                }
            }
            self.write_refcounts(f, g).await?;
            f.flush().await?;
        }
        self.refs.trim(self.refs_capacity);
        Ok(())
    }

    /// Steps 1 and 2 of the write-back: changed refcount blocks, then the refcount table.
    async fn write_refcounts(&mut self, f: &ImageFile, g: &Geometry) -> Result<(), DiskError> {
        let sector = f.sector_size() as usize;
        // 1. Refcount blocks.
        let mut fresh = false;
        for slot in self.refs.dirty_slots() {
            write_slot(f, slot, sector).await?;
            fresh |= std::mem::take(&mut slot.fresh);
        }
        if fresh || self.reftable_moved.is_some() {
            f.flush().await?;
        }
        // 2. The refcount table.
        let mut header: Vec<(usize, Vec<u8>)> = Vec::new();
        // The move is forgotten only once it is complete: after a failed write, the next
        // write-back writes the whole table again.
        if let Some((old, clusters)) = self.reftable_moved {
            let bytes = encode_table(&self.reftable, g.cluster_size);
            f.write(self.reftable_offset, &bytes, false).await?;
            f.flush().await?;
            header.push((
                field::REFCOUNT_TABLE_OFFSET,
                self.reftable_offset.to_be_bytes().to_vec(),
            ));
            header.push((
                field::REFCOUNT_TABLE_CLUSTERS,
                ((bytes.len() as u64 / g.cluster_size) as u32)
                    .to_be_bytes()
                    .to_vec(),
            ));
            self.reftable_dirty.clear();
            update_header(f, &header).await?;
            header.clear();
            self.reftable_moved = None;
            for c in 0..clusters {
                self.deferred_free.push(old + c * g.cluster_size);
            }
        } else {
            write_entries(
                f,
                &self.reftable,
                self.reftable_offset,
                &self.reftable_dirty,
                sector,
            )
            .await?;
            self.reftable_dirty.clear();
        }
        Ok(())
    }
}

/// Writes the changed bytes of a cached cluster, widened to whole host sectors.
async fn write_slot(f: &ImageFile, slot: &mut Slot, sector: usize) -> Result<(), DiskError> {
    let (lo, hi) = slot.dirty.take().expect("a dirty slot");
    let (lo, hi) = if slot.fresh {
        (0, slot.data.len())
    } else {
        (
            lo / sector * sector,
            hi.next_multiple_of(sector).min(slot.data.len()),
        )
    };
    let result = f
        .write(slot.offset + lo as u64, &slot.data[lo..hi], false)
        .await;
    if result.is_err() {
        slot.touch(lo, hi - lo);
    }
    result
}

/// A table of entries as the bytes of whole clusters.
fn encode_table(entries: &[u64], cluster_size: u64) -> Vec<u8> {
    let len = (entries.len() as u64 * 8).next_multiple_of(cluster_size) as usize;
    let mut bytes = vec![0; len.max(cluster_size as usize)];
    for (i, e) in entries.iter().enumerate() {
        set_u64(&mut bytes, i, *e);
    }
    bytes
}

/// Writes the host sectors of a table at `offset` that hold the entries in `dirty`.
async fn write_entries(
    f: &ImageFile,
    table: &[u64],
    offset: u64,
    dirty: &BTreeSet<usize>,
    sector: usize,
) -> Result<(), DiskError> {
    let per_sector = sector / 8;
    let mut last = None;
    for &i in dirty {
        let s = i / per_sector;
        if last == Some(s) {
            continue;
        }
        last = Some(s);
        let mut bytes = vec![0u8; sector];
        for (j, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            let e = table.get(s * per_sector + j).copied().unwrap_or(0);
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        f.write(offset + (s * sector) as u64, &bytes, false).await?;
    }
    Ok(())
}

/// Rewrites header fields in place (they all lie in the first host sector).
pub(crate) async fn update_header(
    f: &ImageFile,
    fields: &[(usize, Vec<u8>)],
) -> Result<(), DiskError> {
    let sector = f.sector_size() as usize;
    let mut bytes = f.read(0, sector).await?;
    for (at, value) in fields {
        bytes[*at..*at + value.len()].copy_from_slice(value);
    }
    f.write(0, &bytes, false).await
}
