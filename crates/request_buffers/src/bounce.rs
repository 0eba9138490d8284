//! Page-aligned host memory for I/O the guest's buffers cannot serve directly.

use guestmem::{AlignedBuffer, IoBuffer};

/// Page-aligned host memory to stage I/O through when the guest's buffers are unaligned or
/// cannot be locked.
///
/// It belongs to the host alone, so unlike guest memory it is an ordinary byte slice.
#[derive(Debug)]
pub struct BounceBuffer {
    buffer: AlignedBuffer,
}

impl BounceBuffer {
    /// A zeroed buffer of `len` bytes, aligned to the page size.
    pub fn new(len: usize) -> Self {
        Self {
            buffer: AlignedBuffer::new(len),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buffer
    }

    /// The bytes, mutably.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.buffer
    }

    /// The whole buffer as one iovec-compatible [`IoBuffer`]. Taking `&mut self` makes sure
    /// no slice of the buffer is alive while the returned address is used for I/O; the
    /// caller must not use the address after the buffer is dropped or borrowed again.
    pub fn io_buffer(&mut self) -> IoBuffer {
        IoBuffer::new(self.buffer.as_mut_ptr(), self.buffer.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_addressable() {
        let mut bounce = BounceBuffer::new(3 * 4096 + 5);
        assert_eq!(bounce.len(), 3 * 4096 + 5);
        assert!(bounce.as_bytes().iter().all(|&b| b == 0));
        bounce.as_mut_bytes()[4096] = 7;
        let io = bounce.io_buffer();
        assert_eq!(io.as_ptr() as usize % guestmem::PAGE_SIZE, 0);
        assert_eq!(io.len(), 3 * 4096 + 5);
        assert_eq!(bounce.as_bytes()[4096], 7);
        assert!(BounceBuffer::new(0).is_empty());
    }
}
