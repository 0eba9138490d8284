//! Ring indices are read and written with single 16-bit atomic accesses, never byte copies.
//!
//! The hostile layout here needs a guest memory region at a host address that is not 2-byte
//! aligned, which only `GuestMemoryBuilder::external` can build: hence the one `unsafe` block.
#![expect(
    unsafe_code,
    reason = "builds a guest memory region at an odd host address"
)]

use guestmem::{GuestMemory, PAGE_SIZE};
use std::sync::Arc;
use virtio_block::queue::{QueueConfig, QueueState, SplitQueue};

/// A ring index at an address where the host cannot make one 16-bit access (an odd host
/// address behind an even guest address) must be refused, not read byte by byte: a byte copy
/// can tear an index the driver is updating (rust-vmm vm-memory #93).
#[test]
fn ring_index_at_odd_host_address_is_refused() {
    let backing: Arc<parking_lot::Mutex<Vec<u8>>> =
        Arc::new(parking_lot::Mutex::new(vec![0u8; 4 * PAGE_SIZE + 1]));
    let host = backing.lock().as_mut_ptr().wrapping_add(1);
    // SAFETY: `host..host + 4 pages` lies inside the vector, which `keep_alive` owns and which
    // is never resized or touched through a reference while the memory lives.
    let mem = unsafe {
        GuestMemory::builder()
            .external(0, 4 * PAGE_SIZE as u64, host, true, backing.clone())
            .unwrap()
            .build()
            .unwrap()
    };
    let config = QueueConfig {
        max_size: 4,
        size: 4,
        ready: true,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
    };
    let outcome = SplitQueue::new(mem, &config, QueueState::default(), false, true)
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        })
        .and_then(|mut queue| queue.pop().map(|_| ()).map_err(|e| e.to_string()));
    let error = outcome.expect_err("an index at an odd host address was read byte-wise");
    assert!(error.contains("aligned"), "{error}");
}
