//! The image file: byte-addressed I/O over the host `Disk`, and growing it.

use disk_backend::{Disk, DiskError};
use futures::FutureExt;
use request_buffers::{MemoryRead, OwnedRequestBuffers};
use std::io;

/// Makes the storage behind the host disk at least `bytes` long (`set_len` on the image
/// file). The host disk must see the new size afterwards: a `FileDisk` does once its
/// `wait_resize` is polled, which [`ImageFile`] does.
pub type GrowFn = Box<dyn Fn(u64) -> io::Result<()> + Send + Sync>;

/// The image file: a host [`Disk`] and, if the file can grow, how to grow it.
pub struct ImageFile {
    disk: Disk,
    grow: Option<GrowFn>,
    /// Kept open while the image is (with the lock it holds, if any).
    _held: Option<std::fs::File>,
}

impl std::fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFile")
            .field("disk", &self.disk.disk_type())
            .field("growable", &self.grow.is_some())
            .finish()
    }
}

/// How much the file grows at least at a time: fewer `set_len` calls on allocating writes.
const GROW_STEP: u64 = 1 << 20;

impl ImageFile {
    /// The image file on `disk`; `grow` extends the storage behind it (`None`: a fixed size,
    /// such as a block device or a file opened through io_uring).
    pub fn new(disk: Disk, grow: Option<GrowFn>) -> Self {
        Self {
            disk,
            grow,
            _held: None,
        }
    }

    /// Keeps `file` open for as long as the image is open: a handle holding an advisory
    /// lock on the image file, say.
    pub fn holding(mut self, file: std::fs::File) -> Self {
        self._held = Some(file);
        self
    }

    /// The host disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub(crate) fn shift(&self) -> u32 {
        self.disk.sector_shift()
    }

    pub(crate) fn sector_size(&self) -> u64 {
        self.disk.sector_size() as u64
    }

    /// The size in bytes (whole host sectors).
    pub(crate) fn size(&self) -> u64 {
        self.disk.sector_count() << self.shift()
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    /// Reads `len` bytes at `offset`, any alignment; bytes past the end of the file read as
    /// zeros.
    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let sector = self.sector_size();
        let start = offset / sector * sector;
        let end = (offset + len as u64).next_multiple_of(sector);
        let readable_end = end.min(self.size()).max(start);
        let mut out = vec![0u8; (end - start) as usize];
        if readable_end > start {
            let buf = OwnedRequestBuffers::new((readable_end - start) as usize);
            self.disk
                .read_vectored(&buf.buffers(true), start >> self.shift())
                .await?;
            buf.buffers(false)
                .reader()
                .read(&mut out[..(readable_end - start) as usize])?;
        }
        let skip = (offset - start) as usize;
        out.drain(..skip);
        out.truncate(len);
        Ok(out)
    }

    /// Writes `data` at `offset`; both must be whole host sectors.
    pub(crate) async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        debug_assert!(offset.is_multiple_of(self.sector_size()));
        debug_assert!((data.len() as u64).is_multiple_of(self.sector_size()));
        let buf = OwnedRequestBuffers::from_slice(data);
        self.disk
            .write_vectored(&buf.buffers(false), offset >> self.shift(), fua)
            .await
    }

    /// Makes completed writes durable.
    pub(crate) async fn flush(&self) -> Result<(), DiskError> {
        self.disk.sync_cache().await
    }

    /// Makes the file at least `bytes` long.
    pub(crate) async fn ensure_size(&self, bytes: u64) -> Result<(), DiskError> {
        let before = self.disk.sector_count();
        if before << self.shift() >= bytes {
            return Ok(());
        }
        let Some(grow) = &self.grow else {
            return Err(DiskError::Io(io::Error::new(
                io::ErrorKind::StorageFull,
                "the image file has a fixed size and is full",
            )));
        };
        let target = bytes.next_multiple_of(GROW_STEP);
        grow(target).map_err(DiskError::Io)?;
        // A file disk re-reads the file's size on the first poll of `wait_resize`.
        let _ = self.disk.wait_resize(before).now_or_never();
        if self.size() < bytes {
            return Err(DiskError::Io(io::Error::other(
                "the image file grew but its disk does not see the new size",
            )));
        }
        Ok(())
    }

    /// Tells the host the bytes at `offset` are unused (best effort).
    pub(crate) async fn discard(&self, offset: u64, len: u64) {
        if self.disk.is_read_only()
            || self.disk.unmap_behavior() == disk_backend::UnmapBehavior::Ignored
        {
            return;
        }
        let _ = self
            .disk
            .unmap(offset >> self.shift(), len >> self.shift(), false)
            .await;
    }
}
