//! `BlockDeviceDisk`: opening, geometry, and the `DiskIo` implementation.

use crate::pr::{self, DevicePr};
use crate::ring::{
    self, Completions, FixedBufferStats, Op, Owned, Request, Ring, RingError, ThreadRing,
};
use crate::sys::{self, DeviceNumber, Sysfs};
use crate::uevent::{self, SizeWatch};
use disk_backend::range_lock::{Access, RangeGuard, RangeLock};
use disk_backend::{DiskError, DiskIo, UnmapBehavior, check_range, check_unmap_range};
use request_buffers::{BounceBuffer, GuestMemory, MemoryWrite, RequestBuffers};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use thiserror::Error;

/// The largest [`BlockDeviceOptions::queue_depth`]: far beyond what a device uses, and within
/// the kernel's limit on a ring's entries (32768) with the completion queue at twice the
/// submission queue.
pub const MAX_QUEUE_DEPTH: u32 = 16384;

/// How to open a [`BlockDeviceDisk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceOptions {
    /// Open read-only; the disk refuses writes and unmaps. A device the kernel reports as
    /// read-only (`BLKROGET`) is opened read-only whatever this says.
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache (the default). Guest buffers
    /// aligned to the logical sector size go straight to the device; others go through a
    /// bounce buffer.
    pub direct: bool,
    /// Submission queue entries, and so the most requests in flight at once (rounded up to
    /// a power of two by the kernel). Default 256; 1 to [`MAX_QUEUE_DEPTH`].
    pub queue_depth: u32,
    /// Logical sector size of a regular file (a device reports its own). Default 512.
    pub file_sector_size: u32,
    /// Physical sector size of a regular file; defaults to the file system's block size
    /// when that is a power of two of at least the logical sector size, else the logical
    /// sector size.
    pub file_physical_sector_size: Option<u32>,
    /// How long the completion thread polls for a completion before sleeping, while one or
    /// two requests are outstanding; in [`Completions::Owner`] mode, the longest window of
    /// the owner's adaptive polling, at any depth (see there). Zero (the default) never polls. Polling
    /// saves a thread wake-up per request at low queue depth (lower latency) at the price of
    /// a busy core while such requests are in flight; see `docs/benchmarks.md`.
    pub completion_spin: std::time::Duration,
    /// Who reaps completions when no request future is being polled: a completion thread
    /// (the default, any executor), a task on the current tokio runtime, or the thread that
    /// owns the ring. See the [crate documentation](crate#completions).
    pub completions: Completions,
    /// Register the guest memory a frontend announces with [`DiskIo::register_memory`]
    /// with the ring as io_uring fixed buffers (see
    /// [`BlockDeviceDisk::register_fixed_buffers`], which says what it demands of the
    /// memory): requests in it skip the kernel's per-request pinning of their pages, which
    /// saves about a quarter of the kernel time of a 4 KiB request (`docs/benchmarks.md`),
    /// at the price of all of guest RAM staying pinned. Off by default; without it
    /// `DiskIo::register_memory` does nothing.
    pub fixed_buffers: bool,
    /// With [`Completions::Thread`] and without fixed buffers, requests first polled on a
    /// thread that drives its own I/O ([`disk_backend::io_thread::IoThread`], as the
    /// vhost-user export's queue threads and `diskctl bench` do) go to that thread's ring,
    /// which the thread reaps itself, rather than to the disk's ring and its completion
    /// thread. See the [crate documentation](crate#completions). Default on.
    pub thread_rings: bool,
}

impl Default for BlockDeviceOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: true,
            queue_depth: 256,
            file_sector_size: 512,
            file_physical_sector_size: None,
            completion_spin: std::time::Duration::ZERO,
            completions: Completions::Thread,
            fixed_buffers: false,
            thread_rings: true,
        }
    }
}

/// Opening a [`BlockDeviceDisk`] failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The path could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is neither a block device nor a regular file (a FIFO, a directory, a
    /// character device such as `/dev/null`): refused at once, without waiting on it.
    #[error("{} is a {kind}, not a regular file or a block device", path.display())]
    NotADisk {
        /// The path.
        path: PathBuf,
        /// What it is, in words (`fifo`, `directory`, `character device`, ...).
        kind: &'static str,
    },
    /// The file or device refused `O_DIRECT` (open with `buffered` instead).
    #[error("{} does not support direct I/O (O_DIRECT)", path.display())]
    DirectUnsupported {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the geometry (size, sector sizes, read-only flag) failed.
    #[error("cannot read the geometry of the disk")]
    Geometry(#[source] io::Error),
    /// A sector size is not a power of two of at least 512 (or, for the physical size, of
    /// at least the logical size).
    #[error("invalid sector sizes: logical {logical}, physical {physical}")]
    InvalidSectorSize {
        /// Logical sector size in bytes.
        logical: u32,
        /// Physical sector size in bytes.
        physical: u32,
    },
    /// The disk holds less than one sector.
    #[error("the disk holds {size} bytes, less than one {sector_size}-byte sector")]
    TooSmall {
        /// Size in bytes.
        size: u64,
        /// Logical sector size in bytes.
        sector_size: u32,
    },
    /// The file's (or device's) size is not a whole number of sectors: its tail would be out
    /// of reach.
    #[error("the disk holds {size} bytes, not a whole number of {sector_size}-byte sectors")]
    PartialSector {
        /// Size in bytes.
        size: u64,
        /// Logical sector size in bytes.
        sector_size: u32,
    },
    /// An `O_DIRECT` read of one sector failed: the file system does not accept direct I/O
    /// at the requested sector size.
    #[error("the file does not accept direct I/O of {sector_size}-byte sectors")]
    DirectIo {
        /// Logical sector size in bytes.
        sector_size: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`BlockDeviceOptions::queue_depth`] is 0 or above [`MAX_QUEUE_DEPTH`].
    #[error("queue depth {queue_depth} is not between 1 and {MAX_QUEUE_DEPTH}")]
    QueueDepth {
        /// The queue depth asked for.
        queue_depth: u32,
    },
    /// io_uring is unavailable or lacks an operation the disk needs.
    #[error("cannot set up io_uring")]
    Ring(#[source] RingError),
    /// The uevent listener that reports resizes could not be started.
    #[error("cannot listen for kernel uevents")]
    Uevents(#[source] io::Error),
}

/// What the disk learnt about the device or file at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Whether the disk is read-only (by request or because the device is).
    pub read_only: bool,
    /// Discard granularity in bytes (0: discard unsupported).
    pub discard_granularity: u32,
    /// Whether the device has a volatile write cache (`queue/write_cache` is
    /// `write back`). A flush is still issued either way.
    pub volatile_write_cache: bool,
    /// Whether the device implements FUA natively (`queue/fua`); without it the kernel
    /// emulates a `RWF_DSYNC` write with a flush.
    pub native_fua: bool,
    /// Whether the medium is removable and can be ejected.
    pub removable: bool,
    /// Whether the file was opened with `O_DIRECT`.
    pub direct: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Device,
    File,
}

/// A disk backed by a Linux block device or a regular file, served through io_uring. See
/// the [crate documentation](crate).
#[derive(Debug)]
pub struct BlockDeviceDisk {
    // Field order matters: the ring (whose drop waits for every outstanding request) goes
    // before the file it uses.
    ring: Ring,
    file: Arc<File>,
    kind: Kind,
    geometry: Geometry,
    sector_shift: u32,
    /// Fixed size of a regular file, in sectors; a device's lives in `size`.
    file_sector_count: u64,
    size: Option<Arc<SizeWatch>>,
    unmap_behavior: UnmapBehavior,
    pr: Option<DevicePr>,
    /// [`BlockDeviceOptions::fixed_buffers`].
    fixed_buffers: bool,
    /// Requests may go to the polling thread's ring ([`BlockDeviceOptions::thread_rings`]).
    thread_rings: bool,
    /// Orders overlapping requests through the page cache, which tears a sector that a read
    /// copies while a write copies into it. `None` with `O_DIRECT`: the device transfers
    /// whole sectors.
    ranges: Option<RangeLock>,
}

impl BlockDeviceDisk {
    /// Opens the block device or regular file at `path`.
    pub fn open(path: impl AsRef<Path>, options: &BlockDeviceOptions) -> Result<Self, OpenError> {
        let path = path.as_ref();
        if !(1..=MAX_QUEUE_DEPTH).contains(&options.queue_depth) {
            return Err(OpenError::QueueDepth {
                queue_depth: options.queue_depth,
            });
        }
        // Opened without blocking and checked before O_DIRECT is set, so a FIFO neither
        // hangs the open nor is refused with a bare EINVAL (disk_backend::host_file).
        let open = |write: bool| {
            use disk_backend::host_file::{HostFileKind, OpenHostFileError, open_host_file};
            let host = open_host_file(path, write, options.direct).map_err(|e| match e {
                OpenHostFileError::NotAFileOrDevice { path, kind } => {
                    OpenError::NotADisk { path, kind }
                }
                OpenHostFileError::Direct { path, source } => {
                    OpenError::DirectUnsupported { path, source }
                }
                OpenHostFileError::Open { path, source } => OpenError::Open { path, source },
                other => OpenError::Open {
                    path: path.to_owned(),
                    source: other.into_io_error(),
                },
            })?;
            let kind = match host.kind {
                HostFileKind::BlockDevice => Kind::Device,
                HostFileKind::Regular => Kind::File,
            };
            Ok::<_, OpenError>((host.file, kind))
        };
        // Open read-only first: a read-only device refuses a writable open.
        let (file, kind) = open(false)?;
        let device_read_only = kind == Kind::Device
            && sys::device_int(&file, sys::BLKROGET).map_err(OpenError::Geometry)? != 0;
        let read_only = options.read_only || device_read_only;
        let file = if read_only { file } else { open(true)?.0 };
        Self::from_parts(file, kind, read_only, options)
    }

    fn from_parts(
        file: File,
        kind: Kind,
        read_only: bool,
        options: &BlockDeviceOptions,
    ) -> Result<Self, OpenError> {
        let (mut geometry, size_bytes) = match kind {
            Kind::Device => device_geometry(&file, read_only)?,
            Kind::File => file_geometry(&file, read_only, options)?,
        };
        geometry.direct = options.direct;
        let (logical, physical) = (geometry.sector_size, geometry.physical_sector_size);
        if logical < 512
            || !logical.is_power_of_two()
            || physical < logical
            || !physical.is_power_of_two()
        {
            return Err(OpenError::InvalidSectorSize { logical, physical });
        }
        let sector_shift = logical.trailing_zeros();
        // Byte offsets past i64::MAX are not addressable.
        let size_bytes = size_bytes.min(i64::MAX as u64);
        let sector_count = size_bytes >> sector_shift;
        if sector_count == 0 {
            return Err(OpenError::TooSmall {
                size: size_bytes,
                sector_size: logical,
            });
        }
        if !size_bytes.is_multiple_of(u64::from(logical)) {
            return Err(OpenError::PartialSector {
                size: size_bytes,
                sector_size: logical,
            });
        }
        if kind == Kind::File && options.direct {
            check_direct_io(&file, logical)?;
        }
        let unmap_behavior = match kind {
            _ if read_only => UnmapBehavior::Ignored,
            Kind::File if sys::supports_punch_hole(&file, size_bytes) => UnmapBehavior::Zeroes,
            Kind::File => UnmapBehavior::Ignored,
            Kind::Device if geometry.discard_granularity == 0 => UnmapBehavior::Ignored,
            // A loop device discards by punching a hole in its backing file (or zeroing its
            // backing device), so discarded sectors read as zeros.
            Kind::Device
                if Sysfs::new(DeviceNumber::of(&file).map_err(OpenError::Geometry)?).is_loop() =>
            {
                UnmapBehavior::Zeroes
            }
            // Other devices may keep the old data (SCSI LBPRZ, NVMe DLFEAT are not
            // reported through the block layer).
            Kind::Device => UnmapBehavior::Unspecified,
        };
        let opcodes = match kind {
            Kind::File => ring::FILE_OPCODES,
            Kind::Device => &[],
        };
        let ring = Ring::new(
            file.as_raw_fd(),
            options.queue_depth,
            opcodes,
            options.completions,
            options.completion_spin,
        )
        .map_err(OpenError::Ring)?;
        let file = Arc::new(file);
        let (size, pr) = match kind {
            Kind::Device => {
                let device = DeviceNumber::of(&file).map_err(OpenError::Geometry)?;
                let watch = Arc::new(SizeWatch::new(
                    device,
                    file.clone(),
                    sector_shift,
                    sector_count,
                ));
                uevent::watch(&watch).map_err(OpenError::Uevents)?;
                let pr = pr::probe(&file).then(|| DevicePr::new(file.clone()));
                (Some(watch), pr)
            }
            Kind::File => (None, None),
        };
        Ok(Self {
            ring,
            file,
            kind,
            geometry,
            sector_shift,
            file_sector_count: sector_count,
            size,
            unmap_behavior,
            pr,
            fixed_buffers: options.fixed_buffers,
            thread_rings: options.thread_rings
                && options.completions == Completions::Thread
                && !options.fixed_buffers,
            ranges: (!options.direct).then(RangeLock::new),
        })
    }

    /// Claims the disk's ring for the calling thread and returns the driver that runs its
    /// futures there, in [`Completions::Owner`] mode. The first call makes
    /// the calling thread the owner; later calls on the same thread return another driver.
    /// Fails with [`RingError::NotOwnerMode`] in another mode and with
    /// [`RingError::OwnedElsewhere`] on another thread.
    pub fn driver(&self) -> Result<ring::OwnerDriver, RingError> {
        self.ring.driver()
    }

    /// Registers guest RAM with the disk's ring as io_uring fixed buffers, so that requests
    /// whose buffers lie in it (one region, within one 1 GiB piece) name it instead of
    /// having the kernel pin and unpin their pages on every request. Replaces an earlier
    /// registration (the same memory again pins its pages anew); an empty [`GuestMemory`]
    /// drops it. Read-only regions are left out.
    ///
    /// What it demands of the memory, as assigning a device with VFIO does:
    ///
    /// - The kernel pins every page of the writable regions for as long as they stay
    ///   registered: the memory can no longer be swapped, compacted or left unallocated,
    ///   and without `CAP_IPC_LOCK` it counts against `RLIMIT_MEMLOCK` (once per disk that
    ///   registers it).
    /// - The guest memory must not be discarded while registered (a balloon, free page
    ///   reporting or virtio-mem that punches holes in the memory file or `madvise`s pages
    ///   away): I/O goes to the pages pinned at registration, so after a discard reads would
    ///   land in pages the guest no longer sees and writes would store stale data (a test
    ///   shows it). Register the memory again after such a change, or leave fixed buffers
    ///   off.
    ///
    /// Call it when guest memory is set up (a device's activation), not per request. On
    /// error ([`RingError::RegisterMemory`]) nothing stays registered and the disk keeps
    /// working without fixed buffers. Requests with other buffers (bounce buffers,
    /// other memory) are not affected. Several pieces in one request use fixed buffers
    /// only on Linux 6.15 and later (`IORING_OP_READV_FIXED`). Replacing a registration
    /// while requests are in flight needs Linux 5.13 (`IORING_REGISTER_BUFFERS_UPDATE`) and
    /// memory of no more 1 GiB pieces than the kernel's table holds (at least 64);
    /// otherwise it is refused with `EBUSY` until nothing is in flight. In
    /// [`Completions::Owner`] mode, once the ring is claimed, only its owner thread may
    /// call this ([`RingError::OwnedElsewhere`]).
    pub fn register_fixed_buffers(&self, memory: &GuestMemory) -> Result<(), RingError> {
        self.ring.register_memory(memory)
    }

    /// How much memory is registered as fixed buffers, and how many requests used it.
    pub fn fixed_buffer_stats(&self) -> FixedBufferStats {
        self.ring.fixed_buffer_stats()
    }

    /// The geometry read at open.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The submission entries this disk handed the kernel since the last call, oldest
    /// first, decoded from their bytes (feature `io-log`; see [`crate::io_log`]). Recording
    /// starts with the first call, which returns nothing.
    #[cfg(feature = "io-log")]
    pub fn take_io_log(&self) -> Vec<crate::Submission> {
        self.ring.take_io_log()
    }

    /// Whether the disk is a block device (as opposed to a regular file).
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::Device
    }

    /// Re-reads a block device's size now (`BLKGETSIZE64`) instead of waiting for the
    /// uevent, and returns the sector count. A regular file's size is fixed at open.
    pub fn refresh_sector_count(&self) -> u64 {
        match &self.size {
            Some(watch) => watch.refresh(),
            None => self.file_sector_count,
        }
    }

    fn byte_offset(&self, sector: u64) -> u64 {
        sector << self.sector_shift
    }

    /// Holds `count` sectors at `sector` for `access`, where overlapping requests need
    /// ordering (buffered I/O).
    async fn hold(&self, sector: u64, count: u64, access: Access) -> Option<RangeGuard<'_>> {
        match &self.ranges {
            Some(ranges) => Some(ranges.lock(sector..sector + count, access).await),
            None => None,
        }
    }

    /// Whether the kernel can use `buffers` directly: always without `O_DIRECT`; with it,
    /// when every piece is aligned to the logical sector size.
    fn is_zero_copy(&self, buffers: &RequestBuffers<'_>) -> bool {
        !self.geometry.direct || buffers.is_aligned(self.geometry.sector_size as usize)
    }

    /// Runs `op` on the calling thread's ring where it has one (see
    /// [`BlockDeviceOptions::thread_rings`]), else on the disk's.
    fn run(&self, op: Op, owned: Owned, skip: usize) -> Request<'_> {
        if self.thread_rings
            && let Some(ring) = ThreadRing::current()
        {
            return ring.run(self.file.as_raw_fd(), op, owned, skip);
        }
        self.ring.run(op, owned, skip)
    }

    /// Runs a read or write of `owned.len()` bytes at `offset`, resubmitting the rest after
    /// a short transfer. A transfer of zero bytes is an error: the device ended early.
    fn transfer(&self, op: Op, owned: Owned) -> Transfer<'_> {
        let len = owned.len();
        Transfer {
            disk: self,
            len,
            done: 0,
            request: Some(self.run(op, owned, 0)),
            op,
        }
    }

    /// Runs a request that transfers no data (flush, fallocate).
    async fn command(&self, op: Op) -> Result<(), DiskError> {
        loop {
            match self.run(op, Owned::None, 0).await.0 {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(sys::disk_error(e)),
            }
        }
    }

    /// Runs a range ioctl (`BLKDISCARD`, `BLKZEROOUT`) on the device, on the blocking pool:
    /// the kernel does the work before it returns.
    ///
    /// Through the page cache, both ioctls first drop the range's cached pages, dirty ones
    /// included, and only then reach the device: a process killed in between would leave the
    /// device holding data older than writes it had acknowledged. So the range is written
    /// back first (found by the crash-consistency harness: about 2% of kills lost a write).
    async fn device_range(&self, request: u64, offset: u64, len: u64) -> Result<(), DiskError> {
        let file = self.file.clone();
        let write_back = !self.geometry.direct;
        blocking::unblock(move || {
            if write_back {
                sys::write_back_range(&file, offset, len)?;
            }
            sys::device_range(&file, request, offset, len)
        })
        .await
        .map_err(sys::disk_error)
    }

    /// Writes zeros to `count` sectors from `sector`, with `BLKZEROOUT` on a device and
    /// `FALLOC_FL_ZERO_RANGE` on a file (or plain writes of zeros where the file system
    /// lacks it). Unlike [`unmap`](DiskIo::unmap), the sectors are guaranteed to read as
    /// zeros afterwards, and the file never grows.
    pub async fn write_zeroes(&self, sector: u64, count: u64) -> Result<(), DiskError> {
        if self.geometry.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)?;
        if count == 0 {
            return Ok(());
        }
        let offset = self.byte_offset(sector);
        let len = self.byte_offset(count);
        let _range = self.hold(sector, count, Access::Exclusive).await;
        match self.kind {
            Kind::Device => self.device_range(sys::BLKZEROOUT, offset, len).await,
            Kind::File => {
                let op = Op::Fallocate {
                    offset,
                    len,
                    mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                };
                match self.command(op).await {
                    Err(DiskError::Io(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        self.write_zeroes_by_writing(offset, len).await
                    }
                    other => other,
                }
            }
        }
    }

    /// Zeroes `len` bytes at `offset` with ordinary writes, 1 MiB at a time.
    async fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const CHUNK: u64 = 1 << 20;
        let mut zeros = BounceBuffer::new(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let this = (len - done).min(CHUNK) as usize;
            if this < zeros.len() {
                zeros = BounceBuffer::new(this);
            }
            let op = Op::Write {
                offset: offset + done,
                dsync: false,
            };
            zeros = match self.transfer(op, Owned::Bounce(zeros)).await? {
                Owned::Bounce(zeros) => zeros,
                _ => unreachable!("transfer hands back what it was given"),
            };
            done += this as u64;
        }
        Ok(())
    }
}

/// Geometry and size in bytes of a block device, from ioctls and sysfs.
fn device_geometry(file: &File, read_only: bool) -> Result<(Geometry, u64), OpenError> {
    let size = sys::device_size(file).map_err(OpenError::Geometry)?;
    let sector_size = sys::device_int(file, sys::BLKSSZGET).map_err(OpenError::Geometry)?;
    let physical_sector_size =
        sys::device_int(file, sys::BLKPBSZGET).map_err(OpenError::Geometry)?;
    let sysfs = Sysfs::new(DeviceNumber::of(file).map_err(OpenError::Geometry)?);
    let discard_max = sysfs.queue_u64("discard_max_bytes").unwrap_or(0);
    let discard_granularity = if discard_max == 0 {
        0
    } else {
        // A device that discards but reports no granularity works in logical sectors.
        sysfs
            .queue_u64("discard_granularity")
            .filter(|&g| g > 0)
            .unwrap_or(sector_size as u64)
            .min(u32::MAX as u64) as u32
    };
    let geometry = Geometry {
        sector_size,
        physical_sector_size,
        read_only,
        discard_granularity,
        // Without sysfs, assume the worst: a volatile cache and no native FUA.
        volatile_write_cache: sysfs.queue("write_cache").as_deref() != Some("write through"),
        native_fua: sysfs.queue("fua").as_deref() == Some("1"),
        removable: sysfs.is_removable(),
        direct: false,
    };
    Ok((geometry, size))
}

/// Geometry and size in bytes of a regular file.
fn file_geometry(
    file: &File,
    read_only: bool,
    options: &BlockDeviceOptions,
) -> Result<(Geometry, u64), OpenError> {
    let metadata = file.metadata().map_err(OpenError::Geometry)?;
    let sector_size = options.file_sector_size;
    let block_size = metadata.blksize().min(u32::MAX as u64) as u32;
    let physical_sector_size = options.file_physical_sector_size.unwrap_or(
        if block_size.is_power_of_two() && block_size >= sector_size && block_size <= 65536 {
            block_size
        } else {
            sector_size
        },
    );
    let geometry = Geometry {
        sector_size,
        physical_sector_size,
        read_only,
        discard_granularity: sector_size,
        volatile_write_cache: true,
        native_fua: false,
        removable: false,
        direct: false,
    };
    Ok((geometry, metadata.len()))
}

/// Reads the first sector with `O_DIRECT` to make sure the file system accepts direct I/O
/// at this sector size; failing at open is clearer than failing every unaligned request.
fn check_direct_io(file: &File, sector_size: u32) -> Result<(), OpenError> {
    let mut buffer = BounceBuffer::new(sector_size as usize);
    let io_buffer = buffer.io_buffer();
    loop {
        // SAFETY: the bounce buffer is live, writable and `sector_size` bytes long; no
        // slice of it exists during the call.
        let rc = unsafe {
            libc::pread(
                file.as_raw_fd(),
                io_buffer.as_ptr().cast(),
                io_buffer.len(),
                0,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        if source.kind() != io::ErrorKind::Interrupted {
            return Err(OpenError::DirectIo {
                sector_size,
                source,
            });
        }
    }
}

/// The future of [`BlockDeviceDisk::transfer`]. Written out rather than an `async fn`: the
/// generated state machine kept a slot for the memory both in the loop and in the request,
/// which made the disk's read and write futures outgrow [`Disk`]'s inline storage.
struct Transfer<'a> {
    disk: &'a BlockDeviceDisk,
    op: Op,
    len: usize,
    done: usize,
    /// The request in flight; `None` once finished.
    request: Option<Request<'a>>,
}

impl Future for Transfer<'_> {
    type Output = Result<Owned, DiskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let Some(request) = &mut this.request else {
                panic!("transfer polled after completion");
            };
            let (result, owned) = std::task::ready!(Pin::new(request).poll(cx));
            this.request = None;
            match result {
                // An empty transfer (not expected: callers skip those) asks nothing more.
                Ok(0) if this.len == 0 => return Poll::Ready(Ok(owned)),
                Ok(0) => {
                    return Poll::Ready(Err(DiskError::Io(io::Error::new(
                        match this.op {
                            Op::Read { .. } => io::ErrorKind::UnexpectedEof,
                            _ => io::ErrorKind::WriteZero,
                        },
                        "the device transferred nothing",
                    ))));
                }
                Ok(n) => this.done += n as usize,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(sys::disk_error(e))),
            }
            if this.done >= this.len {
                return Poll::Ready(Ok(owned));
            }
            this.request = Some(this.disk.run(this.op, owned, this.done));
        }
    }
}

impl DiskIo for BlockDeviceDisk {
    fn disk_type(&self) -> &str {
        match self.kind {
            Kind::Device => "blockdevice",
            Kind::File => "blockdevice-file",
        }
    }

    fn sector_count(&self) -> u64 {
        match &self.size {
            Some(watch) => watch.sector_count(),
            None => self.file_sector_count,
        }
    }

    fn sector_size(&self) -> u32 {
        self.geometry.sector_size
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }

    fn physical_sector_size(&self) -> u32 {
        self.geometry.physical_sector_size
    }

    fn is_fua_respected(&self) -> bool {
        // RWF_DSYNC makes the write durable before it completes: natively with FUA, or by
        // the kernel flushing after it.
        true
    }

    fn is_read_only(&self) -> bool {
        self.geometry.read_only
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
        let op = Op::Read {
            offset: self.byte_offset(sector),
        };
        let count = (buffers.len() >> self.sector_shift) as u64;
        let _range = self.hold(sector, count, Access::Shared).await;
        if self.is_zero_copy(buffers) {
            let locked = buffers.lock(true)?;
            self.transfer(op, Owned::Locked(locked)).await?;
            return Ok(());
        }
        // Fail on bad guest memory before doing the I/O.
        buffers.validate()?;
        if !buffers.is_write() {
            return Err(DiskError::MemoryAccess(
                request_buffers::AccessError::NotWritable,
            ));
        }
        let bounce = BounceBuffer::new(buffers.len());
        match self.transfer(op, Owned::Bounce(bounce)).await? {
            Owned::Bounce(bounce) => buffers.writer().write(bounce.as_bytes())?,
            _ => unreachable!("transfer hands back what it was given"),
        }
        Ok(())
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        if self.geometry.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self, sector, buffers.len())?;
        if buffers.is_empty() {
            return Ok(());
        }
        let op = Op::Write {
            offset: self.byte_offset(sector),
            dsync: fua,
        };
        let count = (buffers.len() >> self.sector_shift) as u64;
        let _range = self.hold(sector, count, Access::Exclusive).await;
        let owned = if self.is_zero_copy(buffers) {
            Owned::Locked(buffers.lock(false)?)
        } else {
            let mut bounce = BounceBuffer::new(buffers.len());
            request_buffers::MemoryRead::read(&mut buffers.reader(), bounce.as_mut_bytes())?;
            Owned::Bounce(bounce)
        };
        self.transfer(op, owned).await?;
        Ok(())
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.command(Op::Fsync).await
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        _block_level_only: bool,
    ) -> Result<(), DiskError> {
        if self.geometry.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_unmap_range(self, sector, count)?;
        if count == 0 || self.unmap_behavior == UnmapBehavior::Ignored {
            return Ok(());
        }
        let offset = self.byte_offset(sector);
        let len = self.byte_offset(count);
        let _range = self.hold(sector, count, Access::Exclusive).await;
        match self.kind {
            Kind::Device => self.device_range(sys::BLKDISCARD, offset, len).await,
            Kind::File => {
                self.command(Op::Fallocate {
                    offset,
                    len,
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                })
                .await
            }
        }
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        (self.geometry.discard_granularity >> self.sector_shift).max(1)
    }

    fn pr(&self) -> Option<&dyn disk_backend::pr::PersistentReservation> {
        self.pr.as_ref().map(|pr| pr as _)
    }

    async fn eject(&self) -> Result<(), DiskError> {
        if !self.geometry.removable {
            return Err(DiskError::UnsupportedEject);
        }
        let file = self.file.clone();
        blocking::unblock(move || {
            // SAFETY: CDROMEJECT takes no argument.
            unsafe { sys::ioctl(&file, sys::CDROMEJECT, std::ptr::null_mut()) }
        })
        .await
        .map(drop)
        .map_err(sys::disk_error)
    }

    async fn wait_resize(&self, sector_count: u64) -> u64 {
        match &self.size {
            Some(watch) => watch.wait_for_change(sector_count).await,
            // A regular file's size is fixed at open.
            None => std::future::pending().await,
        }
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), DiskError> {
        if !self.fixed_buffers {
            return Ok(());
        }
        self.ring
            .register_memory(memory)
            .map_err(|e| DiskError::Io(io::Error::other(e)))
    }
}
