//! Request buffers that own their guest memory.

use crate::RequestBuffers;
use guestmem::{GuestMemory, MemoryRead, MemoryWrite, PAGE_SIZE, PagedRange};

/// Request buffers over guest memory of their own: for tests, decorators and adapters that
/// start from host data.
///
/// ```
/// use request_buffers::OwnedRequestBuffers;
///
/// let owned = OwnedRequestBuffers::from_slice(&[1, 2, 3, 4]);
/// assert_eq!(owned.buffers(false).len(), 4);
/// assert_eq!(owned.to_vec(), [1, 2, 3, 4]);
/// ```
#[derive(Debug, Clone)]
pub struct OwnedRequestBuffers {
    mem: GuestMemory,
    gpns: Vec<u64>,
    offset: usize,
    len: usize,
}

impl OwnedRequestBuffers {
    /// `len` zeroed bytes on consecutive pages, starting at a page boundary.
    pub fn new(len: usize) -> Self {
        Self::with_layout(len, 0, false)
    }

    /// `len` zeroed bytes starting `offset` bytes into the first page (`offset` is taken
    /// modulo the page size), on pages listed in reverse guest-physical order so that no two
    /// are adjacent: the layout that exercises a backend's scatter-gather and unaligned paths.
    pub fn scattered(len: usize, offset: usize) -> Self {
        Self::with_layout(len, offset % PAGE_SIZE, true)
    }

    fn with_layout(len: usize, offset: usize, reverse: bool) -> Self {
        let pages = (offset + len).div_ceil(PAGE_SIZE);
        // Leave a gap page between scattered pages so that none are guest-adjacent.
        let stride = if reverse { 2 } else { 1 };
        let mem = GuestMemory::allocate(pages * PAGE_SIZE * stride);
        let mut gpns: Vec<u64> = (0..pages as u64).map(|p| p * stride as u64).collect();
        if reverse {
            gpns.reverse();
        }
        Self {
            mem,
            gpns,
            offset,
            len,
        }
    }

    /// Buffers holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let owned = Self::new(data.len());
        owned.copy_from_slice(data);
        owned
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffers are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest memory behind the buffers.
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The paged range of the buffers.
    pub fn range(&self) -> PagedRange<'_> {
        PagedRange::new(self.offset, self.len, &self.gpns).expect("layout built to fit")
    }

    /// [`RequestBuffers`] over the whole buffer; `is_write` as in [`RequestBuffers::new`].
    pub fn buffers(&self, is_write: bool) -> RequestBuffers<'_> {
        RequestBuffers::new(&self.mem, self.range(), is_write)
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut data = vec![0; self.len];
        self.range()
            .reader(&self.mem)
            .read(&mut data)
            .expect("owned memory is always accessible");
        data
    }

    /// Copies `data` to the front of the buffers.
    ///
    /// # Panics
    ///
    /// If `data` is longer than the buffers.
    #[track_caller]
    pub fn copy_from_slice(&self, data: &[u8]) {
        assert!(data.len() <= self.len, "data longer than the buffers");
        self.range()
            .writer(&self.mem)
            .write(data)
            .expect("owned memory is always accessible");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_layout_is_not_contiguous() {
        let owned = OwnedRequestBuffers::scattered(3 * PAGE_SIZE, 100);
        let runs = owned.range().runs().count();
        assert_eq!(runs, 4);
        let data: Vec<u8> = (0..owned.len()).map(|i| i as u8).collect();
        owned.copy_from_slice(&data);
        assert_eq!(owned.to_vec(), data);
        assert!(OwnedRequestBuffers::new(0).to_vec().is_empty());
    }
}
