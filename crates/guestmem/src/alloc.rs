//! Page-aligned heap allocations.

use crate::PAGE_SIZE;
use std::alloc::Layout;
use std::ptr::NonNull;

/// An owned, zero-initialised, page-aligned heap allocation. Used as the backing of heap
/// guest memory (accessed only through raw pointers) and by [`AlignedBuffer`].
pub(crate) struct HeapAllocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a `HeapAllocation` uniquely owns its memory, like a `Box<[u8]>`; it has no
// thread affinity.
unsafe impl Send for HeapAllocation {}
// SAFETY: shared references to a `HeapAllocation` only expose its address; every access to
// the memory goes through code that upholds its own synchronisation rules.
unsafe impl Sync for HeapAllocation {}

impl HeapAllocation {
    /// Allocates `len` zeroed bytes aligned to [`PAGE_SIZE`]. Aborts on allocation failure,
    /// like `Vec`.
    pub(crate) fn zeroed(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), PAGE_SIZE)
            .expect("allocation size overflows isize");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, layout }
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for HeapAllocation {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A zero-initialised, page-aligned byte buffer owned by the host.
///
/// Unlike guest memory, nobody else can write it, so it derefs to ordinary slices. Its
/// alignment makes it usable for `O_DIRECT` I/O.
///
/// ```
/// let mut buf = guestmem::AlignedBuffer::new(10_000);
/// assert_eq!(buf.len(), 10_000);
/// assert_eq!(buf.as_ptr() as usize % guestmem::PAGE_SIZE, 0);
/// buf[9_999] = 1;
/// ```
pub struct AlignedBuffer {
    alloc: HeapAllocation,
    len: usize,
}

impl AlignedBuffer {
    /// Allocates `len` zeroed bytes aligned to [`PAGE_SIZE`].
    pub fn new(len: usize) -> Self {
        Self {
            alloc: HeapAllocation::zeroed(len),
            len,
        }
    }
}

impl AlignedBuffer {
    /// The address of the first byte, for I/O that bypasses Rust references.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.alloc.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialised bytes owned by `self`, and
        // the returned borrow ties them to `&self`.
        unsafe { std::slice::from_raw_parts(self.alloc.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuffer")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
