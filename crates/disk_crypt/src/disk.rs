//! `CryptDisk`: the decorator that encrypts writes and decrypts reads.

use crate::error::InvalidKey;
use crate::xts::XtsAes256;
use disk_backend::pr::PersistentReservation;
use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior, check_range};
use parking_lot::Mutex;
use request_buffers::{MemoryRead, MemoryWrite, OwnedRequestBuffers, RequestBuffers};
use std::future::Future;

/// Bytes of host scratch memory a request encrypts or decrypts at a time (at least one
/// sector): large enough to amortise the copies, small enough to stay in cache.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Bounce buffers and scratch buffers larger than this are not kept for reuse.
const MAX_POOLED_BYTES: usize = 1 << 20;

/// Buffers of each kind kept for reuse: more than the requests usually in flight at once.
const MAX_POOLED: usize = 32;

/// A disk that stores its sectors encrypted with XTS-AES-256 on an inner disk.
///
/// See the [crate documentation](crate) for what it does and does not protect.
#[derive(Debug)]
pub struct CryptDisk {
    inner: Disk,
    cipher: XtsAes256,
    sector_size: usize,
    /// Guest memory of our own that encrypted data is written from, kept for reuse so that
    /// a write does not allocate.
    bounce_pool: Mutex<Vec<OwnedRequestBuffers>>,
    /// Host memory that data is encrypted and decrypted in, kept for reuse.
    scratch_pool: Mutex<Vec<Vec<u8>>>,
}

impl CryptDisk {
    /// Encrypts `inner` with `key`: 64 bytes, the AES-256 data key then the AES-256 tweak
    /// key, whose halves must differ (see [`XtsAes256::new`]).
    ///
    /// The key is not kept: only the expanded key schedules are, and they are zeroed when
    /// the disk is dropped.
    pub fn new(inner: Disk, key: &[u8]) -> Result<Self, InvalidKey> {
        Ok(Self {
            cipher: XtsAes256::new(key)?,
            sector_size: inner.sector_size() as usize,
            inner,
            bounce_pool: Mutex::new(Vec::new()),
            scratch_pool: Mutex::new(Vec::new()),
        })
    }

    /// The inner disk, which holds the ciphertext.
    pub fn inner(&self) -> &Disk {
        &self.inner
    }

    /// The cipher.
    pub fn cipher(&self) -> &XtsAes256 {
        &self.cipher
    }

    fn take_bounce(&self, len: usize) -> OwnedRequestBuffers {
        let mut pool = self.bounce_pool.lock();
        match pool.iter().position(|bounce| bounce.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                OwnedRequestBuffers::new(len)
            }
        }
    }

    fn put_bounce(&self, bounce: OwnedRequestBuffers) {
        let mut pool = self.bounce_pool.lock();
        if bounce.len() <= MAX_POOLED_BYTES && pool.len() < MAX_POOLED {
            pool.push(bounce);
        }
    }

    /// Scratch memory for a request of `len` bytes: whole sectors, at most
    /// [`SCRATCH_BYTES`] unless a sector is larger.
    fn take_scratch(&self, len: usize) -> Vec<u8> {
        let sectors = (SCRATCH_BYTES / self.sector_size).max(1);
        let want = (sectors * self.sector_size).min(len);
        let mut pool = self.scratch_pool.lock();
        match pool.iter().position(|scratch| scratch.len() >= want) {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                vec![0; want]
            }
        }
    }

    fn put_scratch(&self, scratch: Vec<u8>) {
        let mut pool = self.scratch_pool.lock();
        if scratch.len() <= MAX_POOLED_BYTES && pool.len() < MAX_POOLED {
            pool.push(scratch);
        }
    }

    /// Streams `len` bytes of sectors starting at `sector` from `reader` through `scratch`,
    /// transforming each sector, into `writer`. Every byte is read exactly once.
    fn transform(
        &self,
        scratch: &mut [u8],
        mut reader: impl MemoryRead,
        mut writer: impl MemoryWrite,
        len: usize,
        mut sector: u64,
        encrypt: bool,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        // Whole sectors of scratch per step; `take_scratch` gives at least one for a
        // non-empty request.
        let step = scratch.len() - scratch.len() % self.sector_size;
        if step == 0 {
            return Err(DiskError::InvalidInput);
        }
        let mut remaining = len;
        while remaining > 0 {
            let chunk = &mut scratch[..step.min(remaining)];
            reader.read(chunk)?;
            for data_unit in chunk.chunks_exact_mut(self.sector_size) {
                let result = if encrypt {
                    self.cipher.encrypt_sector(sector, data_unit)
                } else {
                    self.cipher.decrypt_sector(sector, data_unit)
                };
                // Sectors are powers of two of at least 512 bytes (`Disk::new` checks), so
                // always whole blocks.
                result.map_err(|_| DiskError::InvalidInput)?;
                sector += 1;
            }
            writer.write(chunk)?;
            remaining -= chunk.len();
        }
        Ok(())
    }

    async fn encrypted_write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        bounce: &OwnedRequestBuffers,
    ) -> Result<(), DiskError> {
        let len = buffers.len();
        let target = bounce
            .buffers(true)
            .try_subrange(0, len)
            .ok_or(DiskError::InvalidInput)?;
        let mut scratch = self.take_scratch(len);
        // The guest's buffer is read once, chunk by chunk, into host memory, and only that
        // copy is encrypted: the guest can neither see its buffer change nor change what
        // is encrypted half way through.
        let result = self.transform(
            &mut scratch,
            buffers.reader(),
            target.writer(),
            len,
            sector,
            true,
        );
        self.put_scratch(scratch);
        result?;
        let source = bounce
            .buffers(false)
            .try_subrange(0, len)
            .ok_or(DiskError::InvalidInput)?;
        self.inner.write_vectored(&source, sector, fua).await
    }
}

impl DiskIo for CryptDisk {
    fn disk_type(&self) -> &str {
        "crypt"
    }

    disk_backend::forward_disk_metadata!(self.inner);

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        check_range(self, sector, buffers.len())?;
        if buffers.is_empty() {
            return Ok(());
        }
        self.inner.read_vectored(buffers, sector).await?;
        // Decrypt in place. There is no harm in the guest transiently seeing the
        // ciphertext: it is what the disk holds.
        let mut scratch = self.take_scratch(buffers.len());
        let result = self.transform(
            &mut scratch,
            buffers.reader(),
            buffers.writer(),
            buffers.len(),
            sector,
            false,
        );
        self.put_scratch(scratch);
        result
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        if self.inner.is_read_only() {
            return Err(DiskError::ReadOnly);
        }
        check_range(self, sector, buffers.len())?;
        if buffers.is_empty() {
            return Ok(());
        }
        let bounce = self.take_bounce(buffers.len());
        let result = self.encrypted_write(buffers, sector, fua, &bounce).await;
        self.put_bounce(bounce);
        result
    }

    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.sync_cache()
    }

    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.unmap(sector, count, block_level_only)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        match self.inner.unmap_behavior() {
            // Zeros on the inner disk decrypt to noise.
            UnmapBehavior::Zeroes => UnmapBehavior::Unspecified,
            other => other,
        }
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.inner.optimal_unmap_sectors()
    }

    fn pr(&self) -> Option<&dyn PersistentReservation> {
        self.inner.pr()
    }

    fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.eject()
    }

    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        self.inner.wait_resize(sector_count)
    }
}
