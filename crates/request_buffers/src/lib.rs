//! The guest memory of one storage request.
//!
//! A device model describes a request's data as a [`RequestBuffers`]: guest memory, a
//! [`PagedRange`] over it and a direction. Backends copy through
//! [`reader`](RequestBuffers::reader)/[`writer`](RequestBuffers::writer), or
//! [`lock`](RequestBuffers::lock) the pages to hand host addresses straight to the kernel.
//! When a backend needs aligned host memory the guest's pages cannot provide (`O_DIRECT`
//! with an unaligned buffer), it goes through a [`BounceBuffer`]. Tests and decorators that
//! need buffers of their own use [`OwnedRequestBuffers`].
//!
//! ```
//! use guestmem::{MemoryRead, MemoryWrite};
//! use request_buffers::OwnedRequestBuffers;
//!
//! // 8 KiB starting 512 bytes into a page, spread over pages in reverse order.
//! let owned = OwnedRequestBuffers::scattered(8192, 512);
//! let buffers = owned.buffers(true);
//! assert_eq!(buffers.len(), 8192);
//! assert!(buffers.is_aligned(512));
//! assert!(!buffers.is_aligned(4096));
//! buffers.writer().fill(7, 8192)?;
//! assert_eq!(owned.to_vec(), vec![7; 8192]);
//! # Ok::<(), guestmem::AccessError>(())
//! ```

#![forbid(unsafe_code)]

mod bounce;
mod owned;

pub use bounce::BounceBuffer;
pub use guestmem::{AccessError, GuestMemory, IoBuffer, MemoryRead, MemoryWrite, PagedRange};
pub use owned::OwnedRequestBuffers;

use guestmem::{PAGE_SIZE, PagedRangeReader, PagedRangeWriter};

/// Host buffers locked for the duration of an I/O; see [`RequestBuffers::lock`].
pub type LockedIoBuffers = guestmem::LockedPages;

/// The guest memory associated with one storage request.
///
/// One [`PagedRange`] over one [`GuestMemory`], plus whether the request may write it. A
/// disk *read* writes the buffers (`is_write == true`); a disk *write* only reads them.
///
/// Because interior pages of a `PagedRange` are covered whole, disjoint guest regions that do
/// not meet at page boundaries cannot share one `RequestBuffers`: issue one request per
/// region (when each is a whole number of sectors) or coalesce them through a
/// [`BounceBuffer`].
#[derive(Clone, Copy, Debug)]
pub struct RequestBuffers<'a> {
    guest_memory: &'a GuestMemory,
    range: PagedRange<'a>,
    is_write: bool,
}

impl<'a> RequestBuffers<'a> {
    /// Request buffers over `range` of `guest_memory`. `is_write` says the request may write
    /// the buffers (it is a disk read).
    pub fn new(guest_memory: &'a GuestMemory, range: PagedRange<'a>, is_write: bool) -> Self {
        Self {
            guest_memory,
            range,
            is_write,
        }
    }

    /// Whether the buffers are empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// The guest memory the range points into.
    pub fn guest_memory(&self) -> &'a GuestMemory {
        self.guest_memory
    }

    /// The paged range.
    pub fn range(&self) -> PagedRange<'a> {
        self.range
    }

    /// Whether the request may write the buffers.
    pub fn is_write(&self) -> bool {
        self.is_write
    }

    /// Whether the start offset and the length are multiples of `alignment`, so that every
    /// piece of the buffers is too (pages are [`PAGE_SIZE`]-aligned).
    ///
    /// Returns `false` for an `alignment` that is not a power of two or exceeds the page
    /// size, since pages need not be contiguous on the host.
    pub fn is_aligned(&self, alignment: usize) -> bool {
        alignment.is_power_of_two()
            && alignment <= PAGE_SIZE
            && self.range.offset().is_multiple_of(alignment)
            && self.range.len().is_multiple_of(alignment)
    }

    /// Checks that every byte is backed by guest memory (and writable, for a disk read),
    /// so that a backend can validate before it changes any state.
    pub fn validate(&self) -> Result<(), AccessError> {
        for run in self.range.runs() {
            let (gpa, len) = run?;
            self.guest_memory.check_range(gpa, len, self.is_write)?;
        }
        Ok(())
    }

    /// A reader over the buffers.
    pub fn reader(&self) -> PagedRangeReader<'a> {
        self.range.reader(self.guest_memory)
    }

    /// A writer over the buffers. Every write fails with [`AccessError::NotWritable`] if the
    /// request may not write them.
    pub fn writer(&self) -> RequestWriter<'a> {
        RequestWriter {
            inner: self.is_write.then(|| self.range.writer(self.guest_memory)),
        }
    }

    /// Resolves the buffers to host memory for zero-copy I/O. `for_write` asks for memory
    /// the I/O will write (a disk read) and fails with [`AccessError::NotWritable`] if the
    /// request may not write it.
    pub fn lock(&self, for_write: bool) -> Result<LockedIoBuffers, AccessError> {
        if for_write && !self.is_write {
            return Err(AccessError::NotWritable);
        }
        self.guest_memory.lock(self.range, for_write)
    }

    /// The buffers from byte `offset` for `len` bytes, or `None` if that is out of bounds.
    pub fn try_subrange(&self, offset: usize, len: usize) -> Option<Self> {
        Some(Self {
            range: self.range.try_subrange(offset, len)?,
            ..*self
        })
    }

    /// The buffers from byte `offset` for `len` bytes.
    ///
    /// # Panics
    ///
    /// If `offset + len > self.len()`, like slice indexing.
    #[track_caller]
    pub fn subrange(&self, offset: usize, len: usize) -> Self {
        Self {
            range: self.range.subrange(offset, len),
            ..*self
        }
    }
}

/// The writer of [`RequestBuffers::writer`].
#[derive(Debug, Clone)]
pub struct RequestWriter<'a> {
    inner: Option<PagedRangeWriter<'a>>,
}

impl MemoryWrite for RequestWriter<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), AccessError> {
        self.inner
            .as_mut()
            .ok_or(AccessError::NotWritable)?
            .write(data)
    }

    fn fill(&mut self, value: u8, len: usize) -> Result<(), AccessError> {
        self.inner
            .as_mut()
            .ok_or(AccessError::NotWritable)?
            .fill(value, len)
    }

    fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |w| w.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_is_enforced() {
        let owned = OwnedRequestBuffers::new(4096);
        let ro = owned.buffers(false);
        assert_eq!(ro.writer().write(&[1]), Err(AccessError::NotWritable));
        assert!(matches!(ro.lock(true), Err(AccessError::NotWritable)));
        assert!(ro.lock(false).is_ok());
        let rw = owned.buffers(true);
        rw.writer().write(&[1]).unwrap();
        assert_eq!(rw.lock(true).unwrap().len(), 4096);
    }

    #[test]
    fn alignment_edges() {
        let owned = OwnedRequestBuffers::scattered(4096 * 3, 0);
        let b = owned.buffers(true);
        assert!(b.is_aligned(4096));
        assert!(!b.is_aligned(8192));
        assert!(!b.is_aligned(0));
        assert!(!b.is_aligned(3));
        assert!(b.subrange(512, 1024).is_aligned(512));
        assert!(!b.subrange(1, 1024).is_aligned(512));
        assert!(b.try_subrange(1, 4096 * 3).is_none());
    }

    #[test]
    fn validate_catches_missing_pages() {
        let mem = GuestMemory::allocate(4096);
        let gpns = [0, 5];
        let range = PagedRange::new(0, 8192, &gpns).unwrap();
        let b = RequestBuffers::new(&mem, range, false);
        assert!(b.validate().is_err());
        assert!(b.subrange(0, 4096).validate().is_ok());
    }
}
