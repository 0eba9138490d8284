//! A request through `Disk` costs no heap allocation: the backend's future is stored inline.
//! (Its own binary, with a counting allocator; the count is the test thread's own, so other
//! threads allocating meanwhile cannot disturb it.)

mod support;

use alloc_counter::{CountingAlloc, thread_allocations};
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

    let before = allocations_here();
    for i in 0..1000u64 {
        block_on(disk.read_vectored(&read, i * 128)).unwrap();
        block_on(disk.write_vectored(&write, i * 128, i % 2 == 0)).unwrap();
        block_on(disk.unmap(i, 8, false)).unwrap();
        block_on(disk.sync_cache()).unwrap();
        // Rejected requests do not allocate either.
        assert!(block_on(disk.read_vectored(&read, u64::MAX)).is_err());
    }
    let per_request = (allocations_here() - before) as f64 / 5000.0;
    assert_eq!(
        per_request, 0.0,
        "heap allocations per request through Disk"
    );
}

/// The count is this thread's only: another thread allocating all through the measured
/// requests (as other tests, the harness or a runtime may) changes nothing. Process-wide
/// counting made `requests_through_disk_do_not_allocate` fail once in a loaded CI run.
#[test]
fn other_threads_allocations_are_not_counted() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let disk = Disk::new(NullDisk::new(1 << 20)).unwrap();
    let owned = OwnedRequestBuffers::new(4096);
    let read = owned.buffers(true);
    block_on(disk.read_vectored(&read, 0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let allocated = Arc::new(AtomicU64::new(0));
    let noise = std::thread::spawn({
        let (stop, allocated) = (stop.clone(), allocated.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::black_box(vec![0u8; 64]);
                allocated.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let before = allocations_here();
    let seen = allocated.load(Ordering::Relaxed);
    for i in 0..100u64 {
        block_on(disk.read_vectored(&read, i * 8)).unwrap();
    }
    // Make sure the other thread allocated while we were counting.
    while allocated.load(Ordering::Relaxed) < seen + 10 {
        std::hint::spin_loop();
    }
    let during = allocations_here() - before;
    stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    assert_eq!(during, 0, "allocations counted during 100 requests");
}

/// The allocations the counter attributes to this thread.
fn allocations_here() -> u64 {
    thread_allocations()
}
