//! A blocking [`Read`]/[`Write`]/[`Seek`] adapter over a [`Disk`], for code that is not async
//! (image tools, boot loaders, tests).
//!
//! Byte offsets need not be sector aligned: partial sectors are read, patched and written
//! back. Every call blocks the calling thread on the disk's futures, so do not use it from
//! inside an async task.
//!
//! ```
//! # use disk_backend::{Disk, sync_wrapper::BlockingDisk};
//! # fn demo(disk: Disk) -> std::io::Result<()> {
//! use std::io::{Read, Seek, SeekFrom, Write};
//! let mut file = BlockingDisk::new(disk);
//! file.seek(SeekFrom::Start(100))?;
//! file.write_all(b"hello")?;
//! file.flush()?; // the disk's sync_cache
//! # Ok(()) }
//! ```

use crate::{Disk, DiskError};
use request_buffers::{MemoryRead, MemoryWrite, OwnedRequestBuffers};
use std::io::{self, Read, Seek, SeekFrom, Write};

/// The largest span, in bytes, one disk request of the adapter covers.
const CHUNK_BYTES: usize = 256 * 1024;

/// Blocking byte-addressed access to a [`Disk`].
///
/// Reads stop at the end of the disk (returning 0 there); writes cannot extend it (a write at
/// the end returns 0, which `write_all` reports as [`io::ErrorKind::WriteZero`]).
#[derive(Debug)]
pub struct BlockingDisk {
    disk: Disk,
    position: u64,
    staging: OwnedRequestBuffers,
}

impl BlockingDisk {
    /// An adapter positioned at byte 0.
    pub fn new(disk: Disk) -> Self {
        let chunk = CHUNK_BYTES.max(disk.sector_size() as usize);
        Self {
            disk,
            position: 0,
            staging: OwnedRequestBuffers::new(chunk),
        }
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The disk size in bytes (saturating if it does not fit).
    fn size_bytes(&self) -> u64 {
        self.disk
            .sector_count()
            .saturating_mul(self.disk.sector_size() as u64)
    }

    /// The sector-aligned window around the next `len` bytes at the position, clamped to the
    /// end of the disk and to the staging buffer: `(first sector, window bytes, offset of the
    /// position within the window, bytes of the caller's buffer it covers)`.
    fn window(&self, len: usize) -> Option<(u64, usize, usize, usize)> {
        let size = self.size_bytes();
        if len == 0 || self.position >= size {
            return None;
        }
        let sector_size = self.disk.sector_size() as u64;
        let sector = self.position / sector_size;
        let head = (self.position % sector_size) as usize;
        let available = (size - self.position).min(len as u64) as usize;
        let covered = available.min(self.staging.len() - head);
        let window = (head + covered).next_multiple_of(sector_size as usize);
        Some((sector, window, head, covered))
    }
}

fn to_io_error(error: DiskError) -> io::Error {
    match error {
        DiskError::Io(e) => e,
        DiskError::IllegalBlock => io::Error::new(io::ErrorKind::InvalidInput, error),
        DiskError::ReadOnly => io::Error::new(io::ErrorKind::PermissionDenied, error),
        other => io::Error::other(other),
    }
}

fn staging_error(error: request_buffers::AccessError) -> io::Error {
    io::Error::other(DiskError::MemoryAccess(error))
}

impl Read for BlockingDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some((sector, window, head, covered)) = self.window(buf.len()) else {
            return Ok(0);
        };
        let buffers = self.staging.buffers(true).subrange(0, window);
        futures::executor::block_on(self.disk.read_vectored(&buffers, sector))
            .map_err(to_io_error)?;
        buffers
            .reader()
            .skip(head)
            .and_then(|r| r.read(&mut buf[..covered]))
            .map_err(staging_error)?;
        self.position += covered as u64;
        Ok(covered)
    }
}

impl Write for BlockingDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some((sector, window, head, covered)) = self.window(buf.len()) else {
            return Ok(0);
        };
        let sector_size = self.disk.sector_size() as usize;
        let buffers = self.staging.buffers(true).subrange(0, window);
        // Read-modify-write the partial sectors at either end of the window.
        if head != 0 {
            let first = buffers.subrange(0, sector_size);
            futures::executor::block_on(self.disk.read_vectored(&first, sector))
                .map_err(to_io_error)?;
        }
        let tail_start = head + covered;
        if tail_start % sector_size != 0 && (head == 0 || window > sector_size) {
            let last_offset = window - sector_size;
            let last = buffers.subrange(last_offset, sector_size);
            let last_sector = sector + (last_offset / sector_size) as u64;
            futures::executor::block_on(self.disk.read_vectored(&last, last_sector))
                .map_err(to_io_error)?;
        }
        buffers
            .subrange(head, covered)
            .writer()
            .write(&buf[..covered])
            .map_err(staging_error)?;
        let buffers = self.staging.buffers(false).subrange(0, window);
        futures::executor::block_on(self.disk.write_vectored(&buffers, sector, false))
            .map_err(to_io_error)?;
        self.position += covered as u64;
        Ok(covered)
    }

    fn flush(&mut self) -> io::Result<()> {
        futures::executor::block_on(self.disk.sync_cache()).map_err(to_io_error)
    }
}

impl Seek for BlockingDisk {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::End(delta) => self.size_bytes().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        self.position = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })?;
        Ok(self.position)
    }
}
