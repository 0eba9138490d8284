//! `StripedDisk`: construction, metadata folding and request splitting.

use crate::error::{NewStripedDiskError, first_error, tag_member};
use crate::layout::Layout;
use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use futures::future::join_all;
use request_buffers::{GuestMemory, RequestBuffers};
use smallvec::SmallVec;

/// The chunk size when none is given: 128 KiB.
pub const DEFAULT_CHUNK_SIZE_BYTES: u32 = 128 * 1024;

/// A disk striped (RAID 0) over member disks of equal geometry.
///
/// Chunk `i` (of `chunk_size_bytes`) lives on member `i % N` at chunk `i / N`. See the
/// [crate documentation](crate) for the request and error semantics.
#[derive(Debug)]
pub struct StripedDisk {
    members: Vec<Disk>,
    layout: Layout,
    chunk_size_bytes: u32,
    /// The size given at construction, which pins it; `None`: the size follows the members.
    pinned_sector_count: Option<u64>,
    sector_size: u32,
    sector_shift: u32,
    physical_sector_size: u32,
    is_fua_respected: bool,
    is_read_only: bool,
    unmap_behavior: UnmapBehavior,
    optimal_unmap_sectors: u32,
}

/// The direction of a read or write sub-request.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Read,
    Write { fua: bool },
}

impl StripedDisk {
    /// Stripes over `members` (in this order) with chunks of `chunk_size_bytes` (default
    /// [`DEFAULT_CHUNK_SIZE_BYTES`]) and `sector_count` sectors (default: all the members
    /// hold).
    ///
    /// The members must agree on sector size, sector count and read-only flag; the chunk
    /// size must be a non-zero multiple of the sector size; the size must be a whole number
    /// of stripes (`chunk_size_bytes * members.len()` bytes) and no larger than the
    /// members together.
    ///
    /// Without `sector_count` the size follows the members at run time: it is always the
    /// whole stripes the smallest member holds (the chunk rule places every existing chunk
    /// where it was, so growing adds stripes at the end), and [`DiskIo::wait_resize`]
    /// completes when a member's resize changes it. A `sector_count` given here pins the
    /// size.
    pub fn new(
        members: Vec<Disk>,
        chunk_size_bytes: Option<u32>,
        sector_count: Option<u64>,
    ) -> Result<Self, NewStripedDiskError> {
        let first = members.first().ok_or(NewStripedDiskError::NoDisks)?;
        let sector_size = first.sector_size();
        let member_sectors = first.sector_count();
        let is_read_only = first.is_read_only();
        for (member, disk) in members.iter().enumerate().skip(1) {
            if disk.sector_size() != sector_size {
                return Err(NewStripedDiskError::SectorSizeMismatch {
                    member,
                    expected: sector_size,
                    found: disk.sector_size(),
                });
            }
            if disk.sector_count() != member_sectors {
                return Err(NewStripedDiskError::SectorCountMismatch {
                    member,
                    expected: member_sectors,
                    found: disk.sector_count(),
                });
            }
            if disk.is_read_only() != is_read_only {
                return Err(NewStripedDiskError::ReadOnlyMismatch {
                    member,
                    read_only: disk.is_read_only(),
                });
            }
        }

        let chunk_size_bytes = chunk_size_bytes.unwrap_or(DEFAULT_CHUNK_SIZE_BYTES);
        if chunk_size_bytes == 0 || !chunk_size_bytes.is_multiple_of(sector_size) {
            return Err(NewStripedDiskError::InvalidChunkSize {
                chunk_size_bytes,
                sector_size,
            });
        }
        let layout = Layout::new(members.len(), (chunk_size_bytes / sector_size) as u64);
        // Saturating: a stripe set too large to count is only ever cut down by `sector_count`.
        let available = member_sectors.saturating_mul(members.len() as u64);
        let pinned_sector_count = sector_count;
        let sector_count = sector_count.unwrap_or(available);
        if sector_count > available {
            return Err(NewStripedDiskError::TooLarge {
                requested: sector_count,
                available,
            });
        }
        let stripe_sectors = layout
            .stripe_sectors()
            .ok_or(NewStripedDiskError::TooLarge {
                requested: sector_count,
                available,
            })?;
        if !sector_count.is_multiple_of(stripe_sectors) {
            return Err(NewStripedDiskError::NotWholeStripes {
                sector_count,
                stripe_sectors,
            });
        }

        let unmap_behavior = members
            .iter()
            .map(Disk::unmap_behavior)
            .reduce(|a, b| {
                if a == b {
                    a
                } else {
                    UnmapBehavior::Unspecified
                }
            })
            .unwrap_or(UnmapBehavior::Unspecified);
        Ok(Self {
            physical_sector_size: members
                .iter()
                .map(Disk::physical_sector_size)
                .max()
                .unwrap_or(sector_size),
            is_fua_respected: members.iter().all(Disk::is_fua_respected),
            optimal_unmap_sectors: members
                .iter()
                .map(Disk::optimal_unmap_sectors)
                .max()
                .unwrap_or(1),
            unmap_behavior,
            layout,
            chunk_size_bytes,
            pinned_sector_count,
            sector_size,
            sector_shift: sector_size.trailing_zeros(),
            is_read_only,
            members,
        })
    }

    /// The size the members hold now: the whole chunks of the smallest member, times the
    /// member count (a member resized before the others does not count until they follow).
    fn size_over_members(&self) -> u64 {
        let chunk_sectors = u64::from(self.chunk_size_bytes >> self.sector_shift);
        let smallest = self
            .members
            .iter()
            .map(Disk::sector_count)
            .min()
            .unwrap_or(0);
        // Saturating, as at construction: a size too large to count is never reached.
        (smallest / chunk_sectors)
            .saturating_mul(chunk_sectors)
            .saturating_mul(self.members.len() as u64)
    }

    /// The member disks, in stripe order.
    pub fn members(&self) -> &[Disk] {
        &self.members
    }

    /// The chunk size in bytes.
    pub fn chunk_size_bytes(&self) -> u32 {
        self.chunk_size_bytes
    }

    /// Runs one read or write over the members: one sub-request per chunk, all in flight at
    /// once, all awaited even after one fails (so nothing still uses the caller's buffers
    /// when this returns), then the first error in request order.
    async fn split_io(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        direction: Direction,
    ) -> Result<(), DiskError> {
        let sectors = (buffers.len() >> self.sector_shift) as u64;
        let mut pieces = self.layout.pieces(sector, sectors);
        let Some(first) = pieces.next() else {
            return Ok(());
        };
        if first.sectors == sectors {
            // A request inside one chunk (most small I/O) needs no splitting and no join.
            return self
                .member_io(first.member, buffers, first.member_sector, direction)
                .await
                .map_err(|error| tag_member(first.member, error));
        }
        // A 1 MiB request over 128 KiB chunks has 8 pieces; more spill to the heap.
        let mut subs: SmallVec<[(usize, u64, RequestBuffers<'_>); 16]> = SmallVec::new();
        for piece in std::iter::once(first).chain(pieces) {
            let sub = buffers
                .try_subrange(
                    (piece.request_sector << self.sector_shift) as usize,
                    (piece.sectors << self.sector_shift) as usize,
                )
                .ok_or(DiskError::InvalidInput)?;
            subs.push((piece.member, piece.member_sector, sub));
        }
        let results = join_all(subs.iter().map(|(member, member_sector, sub)| {
            self.member_io(*member, sub, *member_sector, direction)
        }))
        .await;
        first_error(subs.iter().map(|(member, ..)| *member).zip(results))
    }

    async fn member_io(
        &self,
        member: usize,
        buffers: &RequestBuffers<'_>,
        member_sector: u64,
        direction: Direction,
    ) -> Result<(), DiskError> {
        let disk = self.members.get(member).ok_or(DiskError::InvalidInput)?;
        match direction {
            Direction::Read => disk.read_vectored(buffers, member_sector).await,
            Direction::Write { fua } => disk.write_vectored(buffers, member_sector, fua).await,
        }
    }
}

impl DiskIo for StripedDisk {
    fn disk_type(&self) -> &str {
        "striped"
    }

    fn sector_count(&self) -> u64 {
        self.pinned_sector_count
            .unwrap_or_else(|| self.size_over_members())
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }

    fn is_fua_respected(&self) -> bool {
        self.is_fua_respected
    }

    fn is_read_only(&self) -> bool {
        self.is_read_only
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        check_range(self, sector, buffers.len())?;
        self.split_io(buffers, sector, Direction::Read).await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        if self.is_read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self, sector, buffers.len())?;
        // Each member validates only its own piece; validating the whole request first keeps
        // bad guest memory in a later chunk from leaving the earlier chunks written.
        buffers.validate()?;
        self.split_io(buffers, sector, Direction::Write { fua })
            .await
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        let results = join_all(self.members.iter().map(Disk::sync_cache)).await;
        first_error(results.into_iter().enumerate())
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        if self.is_read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)?;
        if count == 0 {
            return Ok(());
        }
        let ranges: SmallVec<[(usize, u64, u64); 8]> =
            self.layout.member_ranges(sector, count).collect();
        let results = join_all(ranges.iter().map(|&(member, member_sector, member_count)| {
            let disk = &self.members[member];
            disk.unmap(member_sector, member_count, block_level_only)
        }))
        .await;
        first_error(ranges.iter().map(|&(member, ..)| member).zip(results))
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.optimal_unmap_sectors
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        if self.pinned_sector_count.is_some() {
            return futures::future::pending().await;
        }
        loop {
            let current = self.size_over_members();
            if current != sector_count {
                return current;
            }
            // Any member's resize may change the size; each waiter is given the size read
            // now, so a resize between the read and the wait completes it at once.
            let waits: Vec<_> = self
                .members
                .iter()
                .map(|member| member.wait_resize(member.sector_count()))
                .collect();
            futures::future::select_all(waits).await;
        }
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        // Every member gets the memory even if one fails; the first failure is reported.
        let results: SmallVec<[Result<(), DiskError>; 8]> = self
            .members
            .iter()
            .map(|member| member.register_memory(memory))
            .collect();
        first_error(results.into_iter().enumerate())
    }
}
