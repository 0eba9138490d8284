//! A request through `Disk` costs no heap allocation: the backend's future is stored inline.
//! (Its own binary, so no other test allocates concurrently.)

mod support;

use alloc_counter::{CountingAlloc, allocations};
use disk_backend::Disk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use support::NullDisk;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn requests_through_disk_do_not_allocate() {
    let disk = Disk::new(NullDisk::new(1 << 20)).unwrap();
    let owned = OwnedRequestBuffers::new(64 * 1024);
    let read = owned.buffers(true);
    let write = owned.buffers(false);
    // Warm up anything lazily initialised.
    block_on(disk.read_vectored(&read, 0)).unwrap();

    let before = allocations();
    for i in 0..1000u64 {
        block_on(disk.read_vectored(&read, i * 128)).unwrap();
        block_on(disk.write_vectored(&write, i * 128, i % 2 == 0)).unwrap();
        block_on(disk.unmap(i, 8, false)).unwrap();
        block_on(disk.sync_cache()).unwrap();
        // Rejected requests do not allocate either.
        assert!(block_on(disk.read_vectored(&read, u64::MAX)).is_err());
    }
    let per_request = (allocations() - before) as f64 / 5000.0;
    assert_eq!(
        per_request, 0.0,
        "heap allocations per request through Disk"
    );
}
