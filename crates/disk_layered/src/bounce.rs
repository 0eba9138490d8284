//! Private buffers for reads that fill a read cache.

use parking_lot::Mutex;
use request_buffers::OwnedRequestBuffers;

/// The smallest buffer the pool hands out, so small reads share buffers.
const MIN_BYTES: usize = 64 << 10;
/// Buffers the pool keeps for reuse.
const KEEP: usize = 8;
/// Larger buffers are freed after use rather than kept.
const KEEP_MAX_BYTES: usize = 4 << 20;

/// Reusable host buffers, so that a cache miss costs no allocation once the pool has
/// buffers of the sizes in use.
#[derive(Debug, Default)]
pub(crate) struct BouncePool {
    free: Mutex<Vec<OwnedRequestBuffers>>,
}

impl BouncePool {
    /// A buffer of at least `len` bytes.
    pub(crate) fn take(&self, len: usize) -> OwnedRequestBuffers {
        let reused = {
            let mut free = self.free.lock();
            free.iter()
                .position(|b| b.len() >= len)
                .map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| OwnedRequestBuffers::new(len.next_power_of_two().max(MIN_BYTES)))
    }

    /// Returns a buffer from [`take`](Self::take) for reuse.
    pub(crate) fn give_back(&self, buffer: OwnedRequestBuffers) {
        let mut free = self.free.lock();
        if free.len() < KEEP && buffer.len() <= KEEP_MAX_BYTES {
            free.push(buffer);
        }
    }
}
