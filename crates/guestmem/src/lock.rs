//! Host addresses of guest memory for zero-copy I/O.

use crate::{AccessError, GuestMemory, PagedRange};
use smallvec::SmallVec;

/// One contiguous piece of host memory, laid out exactly like Linux's `struct iovec`.
///
/// It is an address, not a borrow: code that dereferences it must keep the memory alive (a
/// [`LockedPages`] does) and must not form Rust references to it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoBuffer {
    address: usize,
    len: usize,
}

impl IoBuffer {
    /// An I/O buffer for `len` bytes at host address `ptr`.
    pub fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            address: ptr as usize,
            len,
        }
    }

    /// The host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.address as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The host memory behind a [`PagedRange`], kept mapped for as long as this value lives.
///
/// Adjacent pieces are merged, so a range over contiguous guest pages of one region is a
/// single [`IoBuffer`].
#[derive(Debug)]
pub struct LockedPages {
    _mem: GuestMemory,
    buffers: SmallVec<[IoBuffer; 4]>,
    len: usize,
}

impl LockedPages {
    /// The host buffers, in the order of the range.
    pub fn io_buffers(&self) -> &[IoBuffer] {
        &self.buffers
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl GuestMemory {
    /// Resolves `range` to host buffers and keeps them mapped until the result is dropped.
    ///
    /// With `for_write`, every page must be writable. The guest can still change the memory
    /// concurrently; the buffers are for handing to the kernel or to raw copies.
    pub fn lock(&self, range: PagedRange<'_>, for_write: bool) -> Result<LockedPages, AccessError> {
        let mut buffers = SmallVec::<[IoBuffer; 4]>::new();
        for run in range.runs() {
            let (gpa, len) = run?;
            self.check_range(gpa, len, for_write)?;
            self.walk(gpa, len, for_write, |host, _, len| {
                let address = host as usize;
                match buffers.last_mut() {
                    Some(last) if last.address + last.len == address => last.len += len,
                    _ => buffers.push(IoBuffer { address, len }),
                }
            })?;
        }
        Ok(LockedPages {
            _mem: self.clone(),
            buffers,
            len: range.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PAGE_SIZE, PAGE_SIZE64};

    #[test]
    fn lock_merges_and_checks() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        let gpns = [0, 1, 3];
        let range = PagedRange::new(8, 3 * PAGE_SIZE - 16, &gpns).unwrap();
        let locked = mem.lock(range, true).unwrap();
        assert_eq!(locked.io_buffers().len(), 2);
        assert_eq!(locked.io_buffers()[0].len(), 2 * PAGE_SIZE - 8);
        assert_eq!(locked.len(), 3 * PAGE_SIZE - 16);

        let bad = [0, 99];
        let range = PagedRange::new(0, 2 * PAGE_SIZE, &bad).unwrap();
        assert!(matches!(
            mem.lock(range, false),
            Err(AccessError::OutOfRange { .. })
        ));
        drop(mem);
        // The locked pages stay mapped after the last handle is gone.
        let first = locked.io_buffers()[0];
        // SAFETY: `locked` keeps the heap region alive; nothing else references it.
        let byte = unsafe { first.as_ptr().read() };
        assert_eq!(byte, 0);
        let _ = PAGE_SIZE64;
    }
}
