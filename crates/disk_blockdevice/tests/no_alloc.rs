//! Zero-copy reads, writes and flushes through `Disk` cost no heap allocation, with and
//! without fixed buffers: the request's future fits `Disk`'s inline storage, the locked
//! pages' iovecs are inline, each ring slot reuses its iovec array, and the fixed buffer is
//! found by a search. (Its own binary, so no other test allocates concurrently.)

mod support;

use alloc_counter::{CountingAlloc, allocations};
use disk_backend::Disk;
use disk_blockdevice::BlockDeviceOptions;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use support::FileDisk;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// One test, so that nothing else in this binary allocates while it counts.
#[test]
fn zero_copy_requests_do_not_allocate() {
    requests_do_not_allocate(false);
    requests_do_not_allocate(true);
}

fn requests_do_not_allocate(fixed_buffers: bool) {
    let Some(file) = FileDisk::new(
        1 << 20,
        &BlockDeviceOptions {
            direct: false,
            fixed_buffers,
            ..Default::default()
        },
    ) else {
        return;
    };
    let disk = Disk::new(file.disk.clone()).unwrap();
    let owned = OwnedRequestBuffers::new(16 * 1024);
    disk.register_memory(owned.guest_memory()).unwrap();
    let read = owned.buffers(true);
    let write = owned.buffers(false);
    // Warm up: the slot's iovec array and the completion thread's waker list grow once.
    for i in 0..8 {
        block_on(disk.write_vectored(&write, i * 32, false)).unwrap();
        block_on(disk.read_vectored(&read, i * 32)).unwrap();
        block_on(disk.sync_cache()).unwrap();
    }

    let before = allocations();
    for i in 0..500u64 {
        let sector = (i % 64) * 32;
        block_on(disk.write_vectored(&write, sector, i % 2 == 0)).unwrap();
        block_on(disk.read_vectored(&read, sector)).unwrap();
        block_on(disk.sync_cache()).unwrap();
    }
    let per_request = (allocations() - before) as f64 / 1500.0;
    assert_eq!(per_request, 0.0, "heap allocations per request");
    let fixed = file.disk.fixed_buffer_stats().requests;
    assert_eq!(
        fixed > 0,
        fixed_buffers,
        "{fixed} requests with fixed buffers"
    );
}
