//! Writes and read-cache hits on a stack whose requests hold their sector ranges make no
//! heap allocation. (Its own binary, so no other test allocates concurrently.)

use alloc_counter::{CountingAlloc, count_on_this_thread};
use disk_backend::Disk;
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use disk_ram::RamLayer;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Writes and cache hits on a stack whose requests hold their ranges (a write-through read
/// cache over a lower layer) make no heap allocation either, once warm.
#[test]
fn writes_and_cache_hits_through_a_locked_stack_do_not_allocate() {
    let sectors = 4096;
    let cache = Arc::new(RamLayer::new(sectors, 512).unwrap());
    let lower = Arc::new(RamLayer::new(sectors, 512).unwrap());
    let disk = Disk::new(
        LayeredDisk::new(
            false,
            vec![
                LayerConfiguration {
                    layer: DiskLayer::new(cache.clone()),
                    write_through: true,
                    read_cache: true,
                },
                LayerConfiguration::new(DiskLayer::new(lower.clone())),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let data = OwnedRequestBuffers::from_slice(&[3; 16 << 10]);
    let buf = OwnedRequestBuffers::new(16 << 10);
    // Warm up: every sector written once, so later writes overwrite in place.
    for s in (0..sectors).step_by(32) {
        block_on(disk.write_vectored(&data.buffers(false), s, false)).unwrap();
    }
    let ((), allocations) = count_on_this_thread(|| {
        for i in 0..500u64 {
            let s = (i * 7919 * 32) % (sectors - 32);
            block_on(disk.write_vectored(&data.buffers(false), s, false)).unwrap();
            block_on(disk.read_vectored(&buf.buffers(true), s)).unwrap();
        }
    });
    let ((), reads) = count_on_this_thread(|| {
        for i in 0..500u64 {
            let s = (i * 7919 * 32) % (sectors - 32);
            block_on(disk.read_vectored(&buf.buffers(true), s)).unwrap();
        }
    });
    assert_eq!(
        (allocations, reads),
        (0, 0),
        "locked writes and cache hits allocated"
    );
}
