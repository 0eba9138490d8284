//! The synchronous engine: a [`BlockBackend`] served inline, one request at a time.
//!
//! The backend's API takes host byte slices, so data is copied through a host buffer of
//! [`CHUNK_BYTES`] owned by the engine (allocated once, whatever the request size). That
//! copy is the price of the simplest backend; the asynchronous engine over a
//! [`Disk`](disk_backend::Disk) avoids it.

use super::EngineContext;
use crate::queue::{QueueError, SplitQueue};
use crate::request::{self, DataSegments, Operation};
use crate::spec::blk;
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Bytes moved per backend call; also the engine's host buffer size.
pub const CHUNK_BYTES: usize = 128 << 10;

/// Zeros that `write_zeroes` writes from, shared by every request.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Blocking storage served by the synchronous engine. Offsets and lengths are in bytes and
/// always whole blocks inside [`size_bytes`](Self::size_bytes) (the device checks).
pub trait BlockBackend: Send + Sync {
    /// Total size in bytes. Never changes.
    fn size_bytes(&self) -> u64;

    /// Reads `buf.len()` bytes at `byte_offset`.
    ///
    /// # Errors
    ///
    /// Any I/O error; the request completes with `IOERR`.
    fn read_at(&self, byte_offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `byte_offset`.
    ///
    /// # Errors
    ///
    /// Any I/O error; the request completes with `IOERR`.
    fn write_at(&self, byte_offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes completed writes durable (`fdatasync`).
    ///
    /// # Errors
    ///
    /// Any I/O error; the request completes with `IOERR`.
    fn flush(&self) -> io::Result<()>;

    /// Whether the storage refuses writes.
    fn read_only(&self) -> bool;

    /// The logical block size in bytes: a power of two from 512 to 64 KiB. Default 512.
    fn block_size(&self) -> u32 {
        512
    }

    /// Writes `len` zero bytes at `byte_offset`. The default writes from a shared buffer
    /// of zeros, so it allocates nothing.
    ///
    /// # Errors
    ///
    /// Any I/O error; the request completes with `IOERR`.
    fn write_zeroes(&self, byte_offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.write_at(byte_offset + done, &ZEROS[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A host file served synchronously: opened once, every access serialized through one
/// `parking_lot::Mutex<File>`.
///
/// The size is fixed at open (a regular file's length, or a block device's capacity);
/// accesses past it fail rather than grow the file.
#[derive(Debug)]
pub struct SyncFileBackend {
    file: Mutex<File>,
    size_bytes: u64,
    read_only: bool,
    block_size: u32,
}

impl SyncFileBackend {
    /// Opens `path` for synchronous I/O, read-only if `read_only`, with 512-byte blocks.
    /// `path` must be a regular file or a block device (whose size is the device's).
    ///
    /// # Errors
    ///
    /// The error of opening the file or reading its size; `InvalidInput` for anything but a
    /// regular file or a block device (a FIFO, a directory, `/dev/null`), at once, without
    /// waiting on it.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let host = disk_backend::host_file::open_host_file(path, !read_only, false)
            .map_err(disk_backend::host_file::OpenHostFileError::into_io_error)?;
        let size_bytes = host.size_bytes()?;
        Ok(Self {
            file: Mutex::new(host.file),
            size_bytes,
            read_only,
            block_size: 512,
        })
    }

    /// Presents the file with `block_size`-byte logical blocks (checked by
    /// [`BlockDevice::new`](crate::BlockDevice::new)).
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }

    fn check(&self, byte_offset: u64, len: usize) -> io::Result<()> {
        match byte_offset.checked_add(len as u64) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access past the end of the backing file",
            )),
        }
    }
}

impl BlockBackend for SyncFileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, byte_offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(byte_offset, buf.len())?;
        self.file.lock().read_exact_at(buf, byte_offset)
    }

    fn write_at(&self, byte_offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.check(byte_offset, buf.len())?;
        self.file.lock().write_all_at(buf, byte_offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.lock().sync_data()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }
}

/// The live synchronous engine.
pub(crate) struct SyncEngine {
    backend: Arc<dyn BlockBackend>,
    ctx: EngineContext,
    capacity: u64,
    /// Each queue behind its own lock, so that queues are served in parallel.
    queues: Vec<Option<Mutex<SyncQueue>>>,
}

/// One live queue of the synchronous engine.
struct SyncQueue {
    queue: SplitQueue,
    /// The queue's bounce buffer, kept from request to request.
    buffer: Vec<u8>,
}

impl SyncEngine {
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        ctx: EngineContext,
        capacity: u64,
        queues: Vec<Option<SplitQueue>>,
    ) -> Self {
        Self {
            backend,
            ctx,
            capacity,
            queues: queues
                .into_iter()
                .map(|queue| {
                    queue.map(|queue| {
                        Mutex::new(SyncQueue {
                            queue,
                            buffer: Vec::new(),
                        })
                    })
                })
                .collect(),
        }
    }

    /// The queues' indices (`None` for queues that are not live).
    pub fn queue_states(&self) -> Vec<Option<crate::queue::QueueState>> {
        self.queues
            .iter()
            .map(|q| q.as_ref().map(|q| q.lock().queue.state()))
            .collect()
    }

    /// Serves every request available on queue `index`, inline.
    pub fn process(&self, index: u16) {
        if self.ctx.failed() {
            return;
        }
        let Some(Some(queue)) = self.queues.get(usize::from(index)) else {
            return;
        };
        let mut queue = queue.lock();
        let SyncQueue { queue, buffer } = &mut *queue;
        let result = serve_queue(queue, &self.ctx, &*self.backend, self.capacity, buffer);
        // Even after an error, buffers may have been returned: tell the driver.
        match queue.needs_notification() {
            Ok(true) => self.ctx.interrupt.signal_used_queue(index),
            Ok(false) => {}
            Err(error) => self.ctx.fail(error),
        }
        if let Err(error) = result {
            self.ctx.fail(error);
        }
    }
}

fn serve_queue(
    queue: &mut SplitQueue,
    ctx: &EngineContext,
    backend: &dyn BlockBackend,
    capacity: u64,
    buffer: &mut Vec<u8>,
) -> Result<(), QueueError> {
    loop {
        while let Some(chain) = queue.pop()? {
            let request = request::parse(&ctx.mem, chain, &ctx.limits, capacity);
            let (status, written) = execute(ctx, backend, &request.operation, buffer);
            let len = request.complete(&ctx.mem, status, written);
            queue.add_used(request.head, len)?;
        }
        if !queue.enable_notification()? {
            return Ok(());
        }
    }
}

fn execute(
    ctx: &EngineContext,
    backend: &dyn BlockBackend,
    operation: &Operation,
    buffer: &mut Vec<u8>,
) -> (u8, u64) {
    let shift = ctx.limits.sector_shift;
    let result = match operation {
        Operation::Read { sector, data } => copy_chunks(buffer, data, |buf, offset| {
            backend.read_at((sector << shift) + offset, buf)?;
            data.write_at(&ctx.mem, offset, buf)
                .map_err(io::Error::other)
        })
        .map(|()| data.len()),
        Operation::Write { sector, data } => copy_chunks(buffer, data, |buf, offset| {
            data.read_at(&ctx.mem, offset, buf)
                .map_err(io::Error::other)?;
            backend.write_at((sector << shift) + offset, buf)
        })
        .and_then(|()| durable(ctx, backend))
        .map(|()| 0),
        Operation::Flush => backend.flush().map(|()| 0),
        Operation::GetId { data } => return ctx.get_id(data),
        Operation::WriteZeroes(ranges) => ranges
            .iter()
            .try_for_each(|r| backend.write_zeroes(r.sector << shift, r.count << shift))
            .and_then(|()| durable(ctx, backend))
            .map(|()| 0),
        // Discard is never offered by this engine, so it cannot have been negotiated.
        Operation::Discard(_) => return (blk::S_UNSUPP, 0),
        Operation::Fail(status) => return (*status, 0),
    };
    match result {
        Ok(written) => (blk::S_OK, written),
        Err(_) => (blk::S_IOERR, 0),
    }
}

/// In writethrough mode a write is durable before it completes.
fn durable(ctx: &EngineContext, backend: &dyn BlockBackend) -> io::Result<()> {
    if ctx.writeback() {
        Ok(())
    } else {
        backend.flush()
    }
}

/// Calls `f(chunk, offset)` for consecutive chunks of `data.len()` bytes through the engine's
/// host buffer.
fn copy_chunks(
    buffer: &mut Vec<u8>,
    data: &DataSegments,
    mut f: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    if buffer.is_empty() && !data.is_empty() {
        buffer.resize(CHUNK_BYTES, 0);
    }
    let mut offset = 0;
    while offset < data.len() {
        let n = (data.len() - offset).min(CHUNK_BYTES as u64) as usize;
        f(&mut buffer[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}
