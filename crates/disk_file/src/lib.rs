//! A disk backed by a host file or a block device (through the page cache).
//!
//! [`FileDisk`] serves [`DiskIo`] with positioned vectored I/O (`preadv`, `pwritev2`) run on
//! a blocking thread pool, so the futures work under any executor and never block it. Data
//! moves straight between the file and guest memory: the request's pages are locked and
//! their host addresses handed to the kernel, with no copy.
//!
//! A trip through the pool costs two thread wake-ups, which is most of the latency of a small
//! request the page cache can serve. So requests of up to [`INLINE_BYTES`] are first tried on
//! the calling thread where that cannot wait for a device ([`FileDiskOptions::inline_io`]):
//! - with `RWF_NOWAIT`, which moves what the page cache can move at once and returns
//!   instead of waiting (for a read from disk, writeback, a contended lock); the rest goes to
//!   the pool. A file system that does not take the flag (`EOPNOTSUPP`) is not asked again;
//! - whole, for a regular file on tmpfs or ramfs, whose data is memory (these do not take
//!   `RWF_NOWAIT`), flushes included. A tmpfs page swapped out is read back on the calling
//!   thread; the inline path is for files that are memory, and swapping them is already slow.
//!
//! Where simpler file backends cut corners, this one does not:
//! - short reads and writes are continued until the whole request is done;
//! - FUA writes use `RWF_DSYNC` and are durable on completion; flush is `fdatasync`;
//! - unmap punches holes (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) where the file system
//!   supports it, so unmapped sectors read as zeros ([`UnmapBehavior::Zeroes`]); where it does
//!   not (probed at open) unmap is [`UnmapBehavior::Ignored`];
//! - the size is the file's at open and nothing is ever written past it, so the file never
//!   grows by itself; [`wait_resize`](DiskIo::wait_resize) watches the file (every
//!   [`RESIZE_POLL`]) and picks up a size another process gave it (`truncate -s`), which is how
//!   a frontend learns about a resize;
//! - a file opened read-only refuses writes and unmaps with [`DiskError::ReadOnly`];
//! - a read racing an overlapping write sees every sector whole, from before or after the
//!   write. The page cache does not promise that (it copies a page while another copy into
//!   it runs: on ext4 here, 5% of 64 KiB reads racing writes came back with a torn sector),
//!   so overlapping requests are ordered by a
//!   [`RangeLock`]: one uncontended mutex per request;
//!   requests on disjoint ranges never wait for each other.
//!
//! Linux only (it relies on `pwritev2` and `fallocate`).
//!
//! ```no_run
//! use disk_backend::Disk;
//! use disk_file::{FileDisk, FileDiskOptions};
//!
//! let disk = Disk::new(FileDisk::open("disk.img", &FileDiskOptions::default())?)?;
//! println!("{} sectors of {} bytes", disk.sector_count(), disk.sector_size());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The one reason for unsafe here: the syscalls take raw iovecs that point into guest memory,
// which safe Rust cannot borrow (it may change under us), and `fallocate` has no std wrapper.
#![allow(unsafe_code)]

pub mod io_log;
mod resolve;
mod sys;

pub use io_log::Syscall;
pub use resolve::FileResolver;

use disk_backend::range_lock::{Access, RangeLock};
use disk_backend::{DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use request_buffers::RequestBuffers;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;

/// The largest request tried on the calling thread (see the [crate documentation](crate)).
/// Larger ones cost more to copy than the thread hop saves, and go to the pool, where several
/// run in parallel.
pub const INLINE_BYTES: usize = 64 << 10;

/// How often [`wait_resize`](DiskIo::wait_resize) looks at the file's size. Only a waiting
/// frontend pays for it (one `lseek` per interval).
pub const RESIZE_POLL: Duration = Duration::from_millis(200);

/// How to open a [`FileDisk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiskOptions {
    /// Open the file read-only; the disk refuses writes and unmaps.
    pub read_only: bool,
    /// Logical sector size in bytes: a power of two of at least 512. Default 512.
    pub sector_size: u32,
    /// Physical sector size reported to the guest; defaults to the logical sector size.
    pub physical_sector_size: Option<u32>,
    /// Try small requests on the calling thread where they cannot wait for a device (see
    /// the [crate documentation](crate)). Default `true`; `false` sends every request to
    /// the thread pool.
    pub inline_io: bool,
}

impl Default for FileDiskOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            sector_size: 512,
            physical_sector_size: None,
            inline_io: true,
        }
    }
}

/// Opening a [`FileDisk`] failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The file could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is not a regular file or a block device (a FIFO, a directory, a character
    /// device): refused at once, without waiting on it.
    #[error(transparent)]
    NotAFile(disk_backend::host_file::OpenHostFileError),
    /// The file's size could not be determined.
    #[error("cannot determine the size of the file")]
    Size(#[source] io::Error),
    /// The logical sector size is not a power of two of at least 512.
    #[error("invalid sector size {0}: must be a power of two of at least 512")]
    InvalidSectorSize(u32),
    /// The physical sector size is not a power of two of at least the logical size.
    #[error("invalid physical sector size {0}: must be a power of two of at least the sector size")]
    InvalidPhysicalSectorSize(u32),
    /// The file's size is not a whole number of sectors: its tail would be out of reach.
    #[error("the file holds {size} bytes, not a whole number of {sector_size}-byte sectors")]
    PartialSector {
        /// File size in bytes.
        size: u64,
        /// Sector size in bytes.
        sector_size: u32,
    },
    /// The file is smaller than one sector.
    #[error("the file holds {size} bytes, less than one {sector_size}-byte sector")]
    TooSmall {
        /// File size in bytes.
        size: u64,
        /// Sector size in bytes.
        sector_size: u32,
    },
}

/// A disk backed by a host file. See the [crate documentation](crate).
#[derive(Debug)]
pub struct FileDisk {
    file: Arc<File>,
    sector_size: u32,
    sector_shift: u32,
    physical_sector_size: u32,
    /// Changes only when `wait_resize` finds the file resized.
    sector_count: AtomicU64,
    read_only: bool,
    unmap_behavior: UnmapBehavior,
    inline: Inline,
    /// Cleared when the file system refuses `RWF_NOWAIT` on a read, or on a write.
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// Orders overlapping requests, which the page cache does not: see the [crate
    /// documentation](crate).
    ranges: RangeLock,
    /// The syscalls made, with the `io-log` feature.
    io_log: io_log::IoLog,
}

/// Which requests run on the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inline {
    /// None: every request goes to the pool.
    Never,
    /// Small reads and writes with `RWF_NOWAIT`, the rest of them in the pool.
    NoWait,
    /// Small reads and writes, and flushes, in full: the file is memory.
    Memory,
}

impl FileDisk {
    /// Opens `path` (read-write unless `options.read_only`), which must be a regular file or
    /// a block device; anything else ([`OpenError::NotAFile`]) is refused at once, a FIFO
    /// included (opened without blocking, then checked).
    pub fn open(path: impl AsRef<Path>, options: &FileDiskOptions) -> Result<Self, OpenError> {
        use disk_backend::host_file::{OpenHostFileError, open_host_file};
        let path = path.as_ref();
        let host = open_host_file(path, !options.read_only, false).map_err(|e| match e {
            OpenHostFileError::Open { path, source } => OpenError::Open { path, source },
            other => OpenError::NotAFile(other),
        })?;
        Self::from_file(host.file, options)
    }

    /// Serves an open file. `options.read_only` must be set if the file is not open for
    /// writing (writes would fail with `EBADF` otherwise).
    ///
    /// The size is the file's size (or a block device's) now, which must be a whole number
    /// of sectors ([`OpenError::PartialSector`] otherwise: the tail would be out of reach
    /// without a word).
    pub fn from_file(file: File, options: &FileDiskOptions) -> Result<Self, OpenError> {
        let sector_size = options.sector_size;
        if sector_size < 512 || !sector_size.is_power_of_two() {
            return Err(OpenError::InvalidSectorSize(sector_size));
        }
        let physical_sector_size = options.physical_sector_size.unwrap_or(sector_size);
        if physical_sector_size < sector_size || !physical_sector_size.is_power_of_two() {
            return Err(OpenError::InvalidPhysicalSectorSize(physical_sector_size));
        }
        let size = sys::file_size(&file).map_err(OpenError::Size)?;
        // Sizes beyond i64::MAX cannot be addressed with file offsets.
        let size = size.min(i64::MAX as u64);
        let sector_count = size / sector_size as u64;
        if sector_count == 0 {
            return Err(OpenError::TooSmall { size, sector_size });
        }
        if !size.is_multiple_of(u64::from(sector_size)) {
            return Err(OpenError::PartialSector { size, sector_size });
        }
        let unmap_behavior = if !options.read_only && sys::supports_punch_hole(&file, size) {
            UnmapBehavior::Zeroes
        } else {
            UnmapBehavior::Ignored
        };
        let inline = if !options.inline_io {
            Inline::Never
        } else if sys::is_in_memory(&file) {
            Inline::Memory
        } else {
            Inline::NoWait
        };
        Ok(Self {
            file: Arc::new(file),
            sector_size,
            sector_shift: sector_size.trailing_zeros(),
            physical_sector_size,
            sector_count: AtomicU64::new(sector_count),
            read_only: options.read_only,
            unmap_behavior,
            inline,
            nowait_reads: AtomicBool::new(true),
            nowait_writes: AtomicBool::new(true),
            ranges: RangeLock::new(),
            io_log: io_log::IoLog::default(),
        })
    }

    /// The write and flush syscalls made since the last call, oldest first, with the flags
    /// passed to the kernel (feature `io-log`; see [`io_log`]). Recording starts with the
    /// first call, which returns nothing.
    #[cfg(feature = "io-log")]
    pub fn take_io_log(&self) -> Vec<Syscall> {
        self.io_log.take()
    }

    /// Tries a transfer of `len` bytes on the calling thread, as [`Inline`] allows, with
    /// `full` (the whole transfer) or `nowait` (one `RWF_NOWAIT` call; `supported` is
    /// cleared if the file system refuses the flag). Returns how many bytes are done.
    fn try_inline(
        &self,
        len: usize,
        supported: &AtomicBool,
        full: impl FnOnce() -> io::Result<()>,
        nowait: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        if len > INLINE_BYTES {
            return Ok(0);
        }
        match self.inline {
            Inline::Never => Ok(0),
            Inline::Memory => full().map(|()| len),
            Inline::NoWait if !supported.load(Ordering::Relaxed) => Ok(0),
            Inline::NoWait => match nowait() {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    supported.store(false, Ordering::Relaxed);
                    Ok(0)
                }
                other => other,
            },
        }
    }

    fn byte_offset(&self, sector: u64) -> u64 {
        sector << self.sector_shift
    }

    /// The sectors a request of `len` bytes at `sector` covers.
    fn sectors(&self, sector: u64, len: usize) -> std::ops::Range<u64> {
        sector..sector + (len as u64 >> self.sector_shift)
    }

    /// Reads the file's size again and returns the sector count it gives. A file that
    /// cannot be measured, or shrank below one sector, keeps the last size.
    fn refresh_size(&self) -> u64 {
        if let Ok(size) = sys::file_size(&self.file) {
            let sectors = size.min(i64::MAX as u64) >> self.sector_shift;
            if sectors > 0 {
                self.sector_count.store(sectors, Ordering::Relaxed);
            }
        }
        self.sector_count.load(Ordering::Relaxed)
    }
}

impl DiskIo for FileDisk {
    fn disk_type(&self) -> &str {
        "file"
    }

    fn sector_count(&self) -> u64 {
        self.sector_count.load(Ordering::Relaxed)
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
        true
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        check_range(self, sector, buffers.len())?;
        if buffers.is_empty() {
            return Ok(());
        }
        let locked = buffers.lock(true)?;
        let offset = self.byte_offset(sector);
        let len = buffers.len();
        let _range = self
            .ranges
            .lock(self.sectors(sector, len), Access::Shared)
            .await;
        let done = self
            .try_inline(
                len,
                &self.nowait_reads,
                || sys::read_all_at(&self.file, locked.io_buffers(), 0, offset),
                || sys::read_nowait(&self.file, locked.io_buffers(), offset),
            )
            .map_err(DiskError::Io)?;
        if done == len {
            return Ok(());
        }
        let file = self.file.clone();
        blocking::unblock(move || sys::read_all_at(&file, locked.io_buffers(), done, offset))
            .await
            .map_err(DiskError::Io)
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
        let locked = buffers.lock(false)?;
        let offset = self.byte_offset(sector);
        let len = buffers.len();
        let _range = self
            .ranges
            .lock(self.sectors(sector, len), Access::Exclusive)
            .await;
        // A FUA write waits for the device by definition: only a file in memory does it here.
        let done = if fua && self.inline != Inline::Memory {
            0
        } else {
            self.try_inline(
                len,
                &self.nowait_writes,
                || {
                    sys::write_all_at(
                        &self.file,
                        locked.io_buffers(),
                        0,
                        offset,
                        fua,
                        &self.io_log,
                    )
                },
                || sys::write_nowait(&self.file, locked.io_buffers(), offset, &self.io_log),
            )
            .map_err(DiskError::Io)?
        };
        if done == len {
            return Ok(());
        }
        let file = self.file.clone();
        let log = self.io_log.clone();
        blocking::unblock(move || {
            sys::write_all_at(&file, locked.io_buffers(), done, offset, fua, &log)
        })
        .await
        .map_err(DiskError::Io)
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        if self.inline == Inline::Memory {
            // Nothing to wait for: the data has no other place to go.
            self.io_log.record(|| Syscall::Fdatasync);
            return self.file.sync_data().map_err(DiskError::Io);
        }
        let file = self.file.clone();
        let log = self.io_log.clone();
        blocking::unblock(move || {
            log.record(|| Syscall::Fdatasync);
            file.sync_data()
        })
        .await
        .map_err(DiskError::Io)
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        _block_level_only: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)?;
        if count == 0 || self.unmap_behavior == UnmapBehavior::Ignored {
            return Ok(());
        }
        let file = self.file.clone();
        let offset = self.byte_offset(sector);
        let len = self.byte_offset(count);
        let _range = self
            .ranges
            .lock(sector..sector + count, Access::Exclusive)
            .await;
        blocking::unblock(move || sys::punch_hole(&file, offset, len))
            .await
            .map_err(DiskError::Io)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        loop {
            let current = self.refresh_size();
            if current != sector_count {
                return current;
            }
            futures_timer::Delay::new(RESIZE_POLL).await;
        }
    }
}
