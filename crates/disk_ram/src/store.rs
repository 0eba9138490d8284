//! The sparse sector store behind [`RamLayer`](crate::RamLayer): chunks of sectors with
//! presence bitmaps, and runs of sectors known to be zero.
//!
//! The sector space is cut into aligned chunks of [`CHUNK_BYTES`]. A chunk that holds
//! anything is one map entry with two bitmaps, *data* (the sector holds data, in the chunk's
//! buffer) and *zero* (the sector is known to be zero); a sector with neither bit is not
//! held. The buffer is allocated when the first sector of data arrives, so a run of sectors
//! is one `memcpy` in and out. Where no chunk exists, a *zero run* entry (any length, one
//! entry however long) holds sectors known to be zero: an unmap of a terabyte over a
//! non-zero layer costs one entry. Entries never overlap; a chunk created inside a zero run
//! takes the run's part as zero bits.

use disk_backend::DiskError;
use request_buffers::{MemoryRead, MemoryWrite, RequestBuffers};
use std::collections::BTreeMap;
use std::ops::Range;

/// The bytes of one chunk: large enough that a 64 KiB request is two copies, small enough
/// that a scattered write costs little memory.
pub(crate) const CHUNK_BYTES: usize = 32 << 10;

/// One aligned chunk. Bit `i` of a bitmap is sector `start + i` of the chunk.
#[derive(Debug)]
struct Chunk {
    data: u64,
    zero: u64,
    /// Empty until the chunk holds data.
    buffer: Box<[u8]>,
}

#[derive(Debug)]
enum Entry {
    /// `len` sectors known to be zero.
    Zero { len: u64 },
    /// The sectors of one chunk (the entry's key is chunk-aligned).
    Chunk(Chunk),
}

/// What a sector of a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    Data,
    Zero,
    Nothing,
}

/// The bits `range` (within `0..64`) set.
fn mask(range: Range<u64>) -> u64 {
    debug_assert!(range.start <= range.end && range.end <= 64);
    let len = range.end - range.start;
    if len == 0 {
        0
    } else if len == 64 {
        u64::MAX
    } else {
        ((1u64 << len) - 1) << range.start
    }
}

impl Chunk {
    fn held(&self, bit: u64) -> Held {
        if self.data >> bit & 1 != 0 {
            Held::Data
        } else if self.zero >> bit & 1 != 0 {
            Held::Zero
        } else {
            Held::Nothing
        }
    }

    /// Maximal runs of bits in `range` that are alike.
    fn runs(&self, range: Range<u64>) -> impl Iterator<Item = (Range<u64>, Held)> + '_ {
        let mut at = range.start;
        std::iter::from_fn(move || {
            if at >= range.end {
                return None;
            }
            let start = at;
            let kind = self.held(start);
            while at < range.end && self.held(at) == kind {
                at += 1;
            }
            Some((start..at, kind))
        })
    }

    fn is_empty(&self) -> bool {
        self.data == 0 && self.zero == 0
    }
}

/// The store: see the [module documentation](self).
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) sector_count: u64,
    sector_shift: u32,
    /// log2 of sectors per chunk.
    chunk_shift: u32,
    /// Non-overlapping entries keyed by first sector.
    entries: BTreeMap<u64, Entry>,
    data_sectors: u64,
}

impl Store {
    pub(crate) fn new(sector_count: u64, sector_size: u32) -> Self {
        let sector_shift = sector_size.trailing_zeros();
        Self {
            sector_count,
            sector_shift,
            // At least one sector per chunk, at most 64 (the bitmap).
            chunk_shift: (CHUNK_BYTES.trailing_zeros().saturating_sub(sector_shift)).min(6),
            entries: BTreeMap::new(),
            data_sectors: 0,
        }
    }

    fn chunk_sectors(&self) -> u64 {
        1 << self.chunk_shift
    }

    fn chunk_start(&self, sector: u64) -> u64 {
        sector >> self.chunk_shift << self.chunk_shift
    }

    fn bytes(&self, sectors: u64) -> usize {
        (sectors << self.sector_shift) as usize
    }

    fn entry_len(&self, entry: &Entry) -> u64 {
        match entry {
            Entry::Zero { len } => *len,
            Entry::Chunk(_) => self.chunk_sectors(),
        }
    }

    /// The end of a request of `count` sectors at `sector`, or `IllegalBlock`.
    pub(crate) fn check(&self, sector: u64, count: u64) -> Result<u64, DiskError> {
        match sector.checked_add(count) {
            Some(end) if end <= self.sector_count => Ok(end),
            _ => Err(DiskError::IllegalBlock),
        }
    }

    /// Sectors holding data.
    pub(crate) fn data_sectors(&self) -> u64 {
        self.data_sectors
    }

    /// Entries in the map (chunks and zero runs), for tests of the representation.
    #[cfg(test)]
    pub(crate) fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Splits a zero run that straddles `at`, so that every entry lies on one side of it.
    /// Chunks are aligned and never straddle a chunk boundary, and callers split only there
    /// or where no chunk is.
    fn split_zero_run(&mut self, at: u64) {
        if let Some((&start, Entry::Zero { len })) = self.entries.range_mut(..at).next_back() {
            let end = start + *len;
            if end > at {
                *len = at - start;
                self.entries.insert(at, Entry::Zero { len: end - at });
            }
        }
    }

    /// The chunk starting at `key` (chunk-aligned), created if absent: a zero run over its
    /// sectors becomes zero bits.
    fn chunk_mut(&mut self, key: u64) -> &mut Chunk {
        if !matches!(self.entries.get(&key), Some(Entry::Chunk(_))) {
            let end = key + self.chunk_sectors();
            self.split_zero_run(key);
            self.split_zero_run(end);
            // After the splits, only zero runs lie inside the chunk's sectors.
            let mut zero = 0;
            while let Some((&start, _)) = self.entries.range(key..end).next() {
                if let Some(Entry::Zero { len }) = self.entries.remove(&start) {
                    zero |= mask(start - key..start - key + len);
                }
            }
            self.entries.insert(
                key,
                Entry::Chunk(Chunk {
                    data: 0,
                    zero,
                    buffer: Box::default(),
                }),
            );
        }
        match self.entries.get_mut(&key) {
            Some(Entry::Chunk(chunk)) => chunk,
            _ => unreachable!("inserted above"),
        }
    }

    /// Each chunk-aligned piece of `sector..end`, as `(chunk key, bits within the chunk)`.
    fn pieces(&self, sector: u64, end: u64) -> impl Iterator<Item = (u64, Range<u64>)> + use<> {
        let shift = self.chunk_shift;
        let mut at = sector;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let key = at >> shift << shift;
            let stop = end.min(key + (1 << shift));
            let piece = (key, at - key..stop - key);
            at = stop;
            Some(piece)
        })
    }

    /// Copies the sectors `sector..end` this store holds into `buffers` (which start at
    /// `sector`), calling `held` with each run it supplied.
    pub(crate) fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        end: u64,
        mut held: impl FnMut(Range<u64>),
    ) -> Result<(), DiskError> {
        // One descent of the tree: walk back from the last entry starting before the end,
        // until one ends before the start. Entries do not overlap, so every earlier one does.
        for (&start, entry) in self.entries.range(..end).rev() {
            let entry_end = start + self.entry_len(entry);
            if entry_end <= sector {
                break;
            }
            let first = start.max(sector);
            let last = entry_end.min(end);
            let out = |from: u64, to: u64| {
                buffers.subrange(self.bytes(from - sector), self.bytes(to - from))
            };
            match entry {
                Entry::Zero { .. } => {
                    out(first, last).writer().zero(self.bytes(last - first))?;
                    held(first..last);
                }
                Entry::Chunk(chunk) => {
                    for (bits, kind) in chunk.runs(first - start..last - start) {
                        let (from, to) = (start + bits.start, start + bits.end);
                        match kind {
                            Held::Data => out(from, to).writer().write(
                                &chunk.buffer[self.bytes(bits.start)..self.bytes(bits.end)],
                            )?,
                            Held::Zero => out(from, to).writer().zero(self.bytes(to - from))?,
                            Held::Nothing => continue,
                        }
                        held(from..to);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether any of `sector..end` is held.
    pub(crate) fn holds_any(&self, sector: u64, end: u64) -> bool {
        for (&start, entry) in self.entries.range(..end).rev() {
            let entry_end = start + self.entry_len(entry);
            if entry_end <= sector {
                return false;
            }
            match entry {
                Entry::Zero { .. } => return true,
                Entry::Chunk(chunk) => {
                    let bits = mask(sector.max(start) - start..end.min(entry_end) - start);
                    if (chunk.data | chunk.zero) & bits != 0 {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Writes `buffers` (validated by the caller) at `sector..end`. With `overwrite` false,
    /// only sectors not held are written (a read-cache fill).
    pub(crate) fn write(
        &mut self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        end: u64,
        overwrite: bool,
    ) -> Result<(), DiskError> {
        let chunk_bytes = self.bytes(self.chunk_sectors());
        let (sector_shift, mut added) = (self.sector_shift, 0);
        for (key, bits) in self.pieces(sector, end) {
            if !overwrite && self.entry_covers(key, &bits) {
                continue;
            }
            let chunk = self.chunk_mut(key);
            let wanted = mask(bits.clone());
            let targets = if overwrite {
                wanted
            } else {
                wanted & !(chunk.data | chunk.zero)
            };
            if targets == 0 {
                continue;
            }
            if chunk.buffer.is_empty() {
                chunk.buffer = vec![0; chunk_bytes].into_boxed_slice();
            }
            let byte = |bit: u64| (bit << sector_shift) as usize;
            let mut run_start = None;
            for bit in bits.start..=bits.end {
                let take = bit < bits.end && targets >> bit & 1 != 0;
                match (take, run_start) {
                    (true, None) => run_start = Some(bit),
                    (false, Some(first)) => {
                        run_start = None;
                        let offset = byte(key + first - sector);
                        buffers
                            .subrange(offset, byte(bit - first))
                            .reader()
                            .read(&mut chunk.buffer[byte(first)..byte(bit)])?;
                    }
                    _ => {}
                }
            }
            added += (targets & !chunk.data).count_ones() as u64;
            chunk.data |= targets;
            chunk.zero &= !targets;
        }
        self.data_sectors += added;
        Ok(())
    }

    /// Whether a zero run covers the whole piece `bits` of chunk `key` (so a fill that must
    /// not overwrite has nothing to do there, and need not break the run up).
    fn entry_covers(&self, key: u64, bits: &Range<u64>) -> bool {
        let (first, last) = (key + bits.start, key + bits.end);
        self.entries.range(..=first).next_back().is_some_and(
            |(&start, entry)| matches!(entry, Entry::Zero { len } if start + len >= last),
        )
    }

    /// Forgets `sector..end`; with `keep_zero`, remembers the sectors as zero instead.
    pub(crate) fn unmap(&mut self, sector: u64, end: u64, keep_zero: bool) {
        self.split_zero_run(sector);
        self.split_zero_run(end);
        let mut removed = 0;
        let mut cursor = self.chunk_start(sector);
        while let Some((&key, entry)) = self.entries.range(cursor..end).next() {
            cursor = key + 1;
            let len = self.entry_len(entry);
            if key + len <= sector {
                continue;
            }
            let covered = key >= sector && key + len <= end;
            match self.entries.get_mut(&key) {
                Some(Entry::Zero { .. }) => {
                    self.entries.remove(&key);
                }
                Some(Entry::Chunk(chunk)) if covered => {
                    removed += chunk.data.count_ones() as u64;
                    self.entries.remove(&key);
                }
                Some(Entry::Chunk(chunk)) => {
                    let bits = mask(sector.max(key) - key..end.min(key + len) - key);
                    removed += (chunk.data & bits).count_ones() as u64;
                    chunk.data &= !bits;
                    if keep_zero {
                        chunk.zero |= bits;
                    } else {
                        chunk.zero &= !bits;
                    }
                    if chunk.data == 0 {
                        chunk.buffer = Box::default();
                    }
                    if chunk.is_empty() {
                        self.entries.remove(&key);
                    }
                }
                None => {}
            }
        }
        self.data_sectors -= removed;
        if keep_zero {
            // The chunks left are the partly covered ones at either end; the rest of the
            // range becomes one zero run.
            let is_chunk =
                |store: &Self, key| matches!(store.entries.get(&key), Some(Entry::Chunk(_)));
            let mut first = sector;
            let head = self.chunk_start(sector);
            if is_chunk(self, head) {
                first = head + self.chunk_sectors();
            }
            let mut last = end;
            let tail = self.chunk_start(end.saturating_sub(1));
            if end > sector && is_chunk(self, tail) && tail + self.chunk_sectors() > end {
                last = tail;
            }
            if first < last {
                self.entries
                    .insert(first, Entry::Zero { len: last - first });
            }
        }
    }

    /// Drops everything at or past `sector_count` and takes it as the new size.
    pub(crate) fn resize(&mut self, sector_count: u64) {
        let old = self.sector_count;
        if sector_count < old {
            self.unmap(sector_count, old.max(sector_count), false);
            // A partly cut chunk may keep no bits past the end, but unmap removed those.
        }
        self.sector_count = sector_count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use request_buffers::OwnedRequestBuffers;

    fn read(store: &Store, sector: u64, sectors: u64) -> (Vec<u8>, Vec<Range<u64>>) {
        let buf = OwnedRequestBuffers::new(store.bytes(sectors));
        let mut runs = Vec::new();
        store
            .read(&buf.buffers(true), sector, sector + sectors, |r| {
                runs.push(r)
            })
            .unwrap();
        runs.sort_by_key(|r| r.start);
        (buf.to_vec(), runs)
    }

    fn write(store: &mut Store, sector: u64, sectors: u64, value: u8, overwrite: bool) {
        let data = OwnedRequestBuffers::from_slice(&vec![value; store.bytes(sectors)]);
        store
            .write(&data.buffers(false), sector, sector + sectors, overwrite)
            .unwrap();
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0..0), 0);
        assert_eq!(mask(0..64), u64::MAX);
        assert_eq!(mask(3..5), 0b11000);
        assert_eq!(mask(63..64), 1 << 63);
    }

    #[test]
    fn chunks_and_zero_runs() {
        let mut store = Store::new(1 << 20, 512);
        assert_eq!(store.chunk_sectors(), 64);
        write(&mut store, 60, 10, 7, true); // two chunks
        assert_eq!((store.data_sectors(), store.entry_count()), (10, 2));
        let (data, runs) = read(&store, 58, 14);
        assert_eq!(runs, [60..64, 64..70]);
        assert!(data[..1024].iter().all(|&b| b == 0));
        assert!(data[1024..6 * 1024].iter().all(|&b| b == 7));

        // A zero run over most of the space, keeping the sectors as zero: partial chunks at
        // the ends keep their other sectors; the rest is one run.
        store.unmap(62, (1 << 20) - 2, true);
        assert_eq!(store.data_sectors(), 2);
        assert_eq!(store.entry_count(), 2, "chunk 0 and one run");
        let (data, runs) = read(&store, 60, 8);
        assert_eq!(runs, [60..62, 62..64, 64..68]);
        assert!(data[..1024].iter().all(|&b| b == 7));
        assert!(data[1024..].iter().all(|&b| b == 0));
        assert!(store.holds_any(1000, 1001));
        assert!(!store.holds_any((1 << 20) - 2, 1 << 20));

        // Writing inside the run makes a chunk of its sectors.
        write(&mut store, 5000, 1, 9, true);
        let (data, runs) = read(&store, 4999, 3);
        assert_eq!(runs, [4999..5000, 5000..5001, 5001..5002]);
        assert_eq!((data[0], data[512], data[1024]), (0, 9, 0));
        assert_eq!(store.entry_count(), 4, "chunk 0, run, chunk, run");

        // Forgetting everything leaves nothing.
        store.unmap(0, 1 << 20, false);
        assert_eq!((store.data_sectors(), store.entry_count()), (0, 0));
        assert!(!store.holds_any(0, 1 << 20));
    }

    #[test]
    fn fills_do_not_overwrite() {
        let mut store = Store::new(256, 512);
        write(&mut store, 3, 1, 2, true);
        store.unmap(6, 8, true);
        store.unmap(100, 200, true);
        write(&mut store, 0, 120, 9, false);
        let (data, runs) = read(&store, 0, 120);
        assert_eq!(runs.iter().map(|r| r.end - r.start).sum::<u64>(), 120);
        for (s, want) in [
            (0, 9),
            (3, 2),
            (4, 9),
            (6, 0),
            (7, 0),
            (8, 9),
            (99, 9),
            (100, 0),
        ] {
            assert_eq!(data[s * 512], want, "sector {s}");
        }
        assert_eq!(store.data_sectors(), 1 + 117 - 20);
    }

    #[test]
    fn resize_cuts_a_chunk() {
        let mut store = Store::new(128, 4096);
        assert_eq!(store.chunk_sectors(), 8);
        write(&mut store, 0, 20, 1, true);
        store.resize(10);
        assert_eq!(store.data_sectors(), 10);
        store.resize(128);
        assert!(!store.holds_any(10, 128));
        assert!(store.holds_any(9, 10));
    }
}
