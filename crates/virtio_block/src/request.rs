//! Block requests: parsing a descriptor chain into a validated [`Request`].
//!
//! The chain is a byte stream (virtio 1.x makes no framing promises): device-readable bytes
//! first (the 16-byte header, then the data of a write or the discard/write-zeroes segments),
//! then device-writable bytes (the data of a read or the id of `GET_ID`), the last of which
//! is the status byte. Everything is checked before any I/O starts, so a rejected request
//! touches neither the disk nor guest memory beyond its status byte:
//!
//! | what the driver did | outcome |
//! |---|---|
//! | no device-writable last byte (missing status) | returned with length 0, nothing written |
//! | a readable descriptor after a writable one | `IOERR` |
//! | header shorter than 16 bytes or not in guest memory | `IOERR` |
//! | unknown type, or a feature's type without the feature | `UNSUPP` |
//! | readable data on a read, writable data on a write | `IOERR` |
//! | data not whole blocks, sector not block aligned | `IOERR` |
//! | sector + length past the end or overflowing | `IOERR` |
//! | a write, discard or write-zeroes on a read-only device | `IOERR` |
//! | data buffers not in guest memory (or a read's not writable) | `IOERR` |
//! | discard segments: ragged, none, more than `max_discard_seg`, over `max_discard_sectors`, misaligned, out of range | `IOERR` |
//! | discard with the unmap flag or any reserved flag; write-zeroes with a reserved flag | `UNSUPP` |

use crate::config::{DiscardWriteZeroes, RequestHeader, limits};
use crate::descriptor::{DescriptorChain, Segment};
use crate::spec::{blk, features};
use guestmem::{AccessError, GuestMemory};
use smallvec::SmallVec;
use zerocopy::IntoBytes;

/// A byte stream over guest buffers: some of a chain's segments, with empty ones dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataSegments {
    segments: SmallVec<[(u64, u32); 8]>,
    len: u64,
}

impl DataSegments {
    /// The bytes of `segments` after skipping `skip` bytes at the front and `trim` at the
    /// back.
    pub(crate) fn new(segments: &[Segment], mut skip: u64, trim: u64) -> Self {
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let mut keep = total.saturating_sub(skip).saturating_sub(trim);
        let mut out = Self::default();
        for s in segments {
            let len = u64::from(s.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(keep);
            if take > 0 {
                // A segment's address plus its length may overflow: that is found by
                // `validate` (guest memory refuses it), not here.
                out.segments.push((s.addr.wrapping_add(skip), take as u32));
                out.len += take;
                keep -= take;
            }
            skip = 0;
        }
        out
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The non-empty `(guest physical address, length)` pieces, in order.
    pub fn segments(&self) -> &[(u64, u32)] {
        &self.segments
    }

    /// Checks that every byte is in guest memory (writable if `write`).
    pub fn validate(&self, mem: &GuestMemory, write: bool) -> Result<(), AccessError> {
        for &(gpa, len) in &self.segments {
            mem.check_range(gpa, len as usize, write)?;
        }
        Ok(())
    }

    /// Calls `f(gpa, offset_in_buffer, len)` for the pieces covering `offset..offset+len`.
    fn for_pieces(
        &self,
        mut offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), AccessError>,
    ) -> Result<(), AccessError> {
        let mut done = 0usize;
        for &(gpa, seg_len) in &self.segments {
            if done == len {
                break;
            }
            let seg_len = u64::from(seg_len);
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let take = ((seg_len - offset) as usize).min(len - done);
            f(gpa + offset, done, take)?;
            done += take;
            offset = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(AccessError::RangeExhausted {
                requested: len,
                remaining: done,
            })
        }
    }

    /// Copies `buf.len()` bytes at byte `offset` of the stream out of guest memory.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), AccessError> {
        self.for_pieces(offset, buf.len(), |gpa, at, n| {
            mem.read_at(gpa, &mut buf[at..at + n])
        })
    }

    /// Copies `buf` into guest memory at byte `offset` of the stream.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), AccessError> {
        self.for_pieces(offset, buf.len(), |gpa, at, n| {
            mem.write_at(gpa, &buf[at..at + n])
        })
    }
}

/// A discard or write-zeroes range in disk sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First disk sector.
    pub sector: u64,
    /// Disk sectors.
    pub count: u64,
    /// The write-zeroes unmap flag.
    pub unmap: bool,
}

/// What a request asks for, validated. Sectors are the disk's, not virtio's 512-byte units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read from `sector` into `data`.
    Read {
        /// First disk sector.
        sector: u64,
        /// Where the data goes.
        data: DataSegments,
    },
    /// Write `data` at `sector`.
    Write {
        /// First disk sector.
        sector: u64,
        /// Where the data comes from.
        data: DataSegments,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device id into `data` (at most 20 bytes).
    GetId {
        /// Where the id goes.
        data: DataSegments,
    },
    /// Unmap the ranges.
    Discard(SmallVec<[SectorRange; 1]>),
    /// Zero the ranges.
    WriteZeroes(SmallVec<[SectorRange; 1]>),
    /// Finish at once with this status.
    Fail(u8),
}

/// A popped request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The chain's head, for the used ring.
    pub head: u16,
    /// Where the status byte goes; `None` if the chain has none (the request is returned
    /// with length 0 and nothing written).
    pub status_gpa: Option<u64>,
    /// What to do.
    pub operation: Operation,
}

impl Request {
    /// Writes `status` and returns the used length: the bytes written to the chain.
    /// `written` counts the data bytes written before the status.
    pub fn complete(&self, mem: &GuestMemory, status: u8, written: u64) -> u32 {
        match self.status_gpa {
            // The status byte was checked to be writable guest memory when the request was
            // parsed; a memory map that changed since is the VMM's doing, and then the
            // driver sees the length only.
            Some(gpa) => match mem.write_plain(gpa, &status) {
                Ok(()) => (written.min(u64::from(u32::MAX - 1)) + 1) as u32,
                Err(_) => 0,
            },
            None => 0,
        }
    }
}

/// What request validation needs to know about the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// log2 of the disk's sector size.
    pub sector_shift: u32,
    /// Negotiated features.
    pub features: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// The `GET_ID` answer.
    pub id: [u8; blk::ID_BYTES],
}

impl RequestLimits {
    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Converts a 512-byte sector and count to disk sectors, or `None` if either is not
    /// block aligned.
    fn to_disk(&self, sector: u64, count_512: u64) -> Option<(u64, u64)> {
        let shift = self.sector_shift - blk::SECTOR_SHIFT;
        let mask = (1u64 << shift) - 1;
        (sector & mask == 0 && count_512 & mask == 0).then(|| (sector >> shift, count_512 >> shift))
    }
}

/// Whether `count` sectors at `sector` lie inside `capacity`, without overflow.
fn in_range(sector: u64, count: u64, capacity: u64) -> bool {
    sector.checked_add(count).is_some_and(|end| end <= capacity)
}

/// Parses and validates the chain. `capacity` is the disk's size in disk sectors.
pub fn parse(
    mem: &GuestMemory,
    chain: DescriptorChain,
    limits: &RequestLimits,
    capacity: u64,
) -> Request {
    let head = chain.head();
    let segments = chain.into_segments();
    let status_gpa = segments
        .last()
        .filter(|s| s.writable && s.len > 0)
        .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
        .filter(|&gpa| mem.check_range(gpa, 1, true).is_ok());
    let operation = match status_gpa {
        Some(_) => parse_operation(mem, &segments, limits, capacity),
        None => Operation::Fail(blk::S_IOERR),
    };
    Request {
        head,
        status_gpa,
        operation,
    }
}

fn parse_operation(
    mem: &GuestMemory,
    segments: &[Segment],
    limits: &RequestLimits,
    capacity: u64,
) -> Operation {
    let fail = Operation::Fail(blk::S_IOERR);
    let readable_count = segments.iter().take_while(|s| !s.writable).count();
    let (readable, writable) = segments.split_at(readable_count);
    if writable.iter().any(|s| !s.writable) {
        return fail;
    }
    let out = DataSegments::new(readable, 0, 0);
    let mut header = RequestHeader::default();
    if out.read_at(mem, 0, header.as_mut_bytes()).is_err() {
        return fail;
    }
    let out_data = DataSegments::new(readable, size_of::<RequestHeader>() as u64, 0);
    // Everything writable but the status byte.
    let in_data = DataSegments::new(writable, 0, 1);
    let sector = header.sector.get();
    let writes = |op: Operation| {
        if limits.read_only {
            Operation::Fail(blk::S_IOERR)
        } else {
            op
        }
    };
    match header.request_type.get() {
        blk::T_IN => {
            if !out_data.is_empty() {
                return fail;
            }
            match data_range(limits, sector, &in_data, capacity) {
                Some(sector) if in_data.validate(mem, true).is_ok() => Operation::Read {
                    sector,
                    data: in_data,
                },
                _ => fail,
            }
        }
        blk::T_OUT => {
            if !in_data.is_empty() {
                return fail;
            }
            match data_range(limits, sector, &out_data, capacity) {
                Some(sector) if out_data.validate(mem, false).is_ok() => writes(Operation::Write {
                    sector,
                    data: out_data,
                }),
                _ => fail,
            }
        }
        blk::T_FLUSH if limits.has(features::BLK_FLUSH) => Operation::Flush,
        blk::T_GET_ID => match in_data.validate(mem, true) {
            Ok(()) => Operation::GetId { data: in_data },
            Err(_) => fail,
        },
        blk::T_DISCARD if limits.has(features::BLK_DISCARD) => {
            match ranges(mem, &out_data, limits, capacity, false) {
                Ok(ranges) => writes(Operation::Discard(ranges)),
                Err(status) => Operation::Fail(status),
            }
        }
        blk::T_WRITE_ZEROES if limits.has(features::BLK_WRITE_ZEROES) => {
            match ranges(mem, &out_data, limits, capacity, true) {
                Ok(ranges) => writes(Operation::WriteZeroes(ranges)),
                Err(status) => Operation::Fail(status),
            }
        }
        _ => Operation::Fail(blk::S_UNSUPP),
    }
}

/// The disk sector of a read or write of `data` at 512-byte `sector`, if it is whole blocks,
/// aligned and inside the disk.
fn data_range(
    limits: &RequestLimits,
    sector: u64,
    data: &DataSegments,
    capacity: u64,
) -> Option<u64> {
    let block = 1u64 << limits.sector_shift;
    if !data.len().is_multiple_of(block) {
        return None;
    }
    let (disk_sector, _) = limits.to_disk(sector, 0)?;
    in_range(disk_sector, data.len() >> limits.sector_shift, capacity).then_some(disk_sector)
}

fn ranges(
    mem: &GuestMemory,
    data: &DataSegments,
    limits: &RequestLimits,
    capacity: u64,
    write_zeroes: bool,
) -> Result<SmallVec<[SectorRange; 1]>, u8> {
    let entry = size_of::<DiscardWriteZeroes>() as u64;
    let (max_segments, max_sectors) = if write_zeroes {
        (
            limits::MAX_WRITE_ZEROES_SEG,
            limits::MAX_WRITE_ZEROES_SECTORS,
        )
    } else {
        (limits::MAX_DISCARD_SEG, limits::MAX_DISCARD_SECTORS)
    };
    let count = data.len() / entry;
    if data.is_empty() || !data.len().is_multiple_of(entry) || count > u64::from(max_segments) {
        return Err(blk::S_IOERR);
    }
    // Bounded by max_segments (64), not by anything the driver chose.
    let mut out = SmallVec::with_capacity(count as usize);
    for i in 0..count {
        let mut seg = DiscardWriteZeroes::default();
        data.read_at(mem, i * entry, seg.as_mut_bytes())
            .map_err(|_| blk::S_IOERR)?;
        let flags = seg.flags.get();
        let allowed = if write_zeroes {
            blk::WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(blk::S_UNSUPP);
        }
        let num_sectors = seg.num_sectors.get();
        if num_sectors > max_sectors {
            return Err(blk::S_IOERR);
        }
        let (sector, count) = limits
            .to_disk(seg.sector.get(), num_sectors.into())
            .ok_or(blk::S_IOERR)?;
        if !in_range(sector, count, capacity) {
            return Err(blk::S_IOERR);
        }
        out.push(SectorRange {
            sector,
            count,
            unmap: flags & blk::WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn data_segments_skip_and_trim() {
        let segs = [
            seg(0x100, 10, false),
            seg(0x200, 0, false),
            seg(0x300, 20, false),
        ];
        let d = DataSegments::new(&segs, 12, 3);
        assert_eq!(d.segments(), &[(0x302, 15)]);
        assert_eq!(d.len(), 15);
        let d = DataSegments::new(&segs, 0, 25);
        assert_eq!(d.segments(), &[(0x100, 5)]);
        assert!(DataSegments::new(&segs, 40, 0).is_empty());
        assert!(DataSegments::new(&segs, 0, 40).is_empty());
    }

    #[test]
    fn stream_copies_cross_segments() {
        let mem = GuestMemory::allocate(4096);
        let segs = [seg(0x100, 3, true), seg(0x200, 5, true)];
        let d = DataSegments::new(&segs, 0, 0);
        d.write_at(&mem, 1, &[1, 2, 3, 4]).unwrap();
        let mut back = [0; 8];
        d.read_at(&mem, 0, &mut back).unwrap();
        assert_eq!(back, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert!(d.read_at(&mem, 4, &mut back).is_err());
    }

    #[test]
    fn sector_conversion_checks_alignment() {
        let limits = RequestLimits {
            sector_shift: 12,
            features: 0,
            read_only: false,
            id: [0; 20],
        };
        assert_eq!(limits.to_disk(16, 8), Some((2, 1)));
        assert_eq!(limits.to_disk(17, 8), None);
        assert_eq!(limits.to_disk(16, 9), None);
        assert!(in_range(0, 4, 4));
        assert!(!in_range(1, 4, 4));
        assert!(!in_range(u64::MAX, 2, u64::MAX));
    }
}
