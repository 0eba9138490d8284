//! Heap allocations per request on the hot path: reads and in-place writes of allocated
//! clusters. (Its own binary, so no other test allocates concurrently.)

use alloc_counter::{CountingAlloc, count};
use disk_backend::Disk;
use disk_layered::{DiskLayer, LayerConfiguration, LayerIo, LayeredDisk};
use disk_qcow2::{CreateOptions, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn allocated_clusters_cost_one_allocation_per_request() {
    // A file disk on tmpfs serves small requests on the calling thread without allocating.
    let tmp = tempfile::tempfile_in("/dev/shm").unwrap_or_else(|_| tempfile::tempfile().unwrap());
    tmp.set_len(16 << 20).unwrap();
    let host = disk_file::FileDisk::from_file(tmp, &Default::default()).unwrap();
    let file = ImageFile::new(Disk::new(host).unwrap(), None);
    block_on(Qcow2Layer::create(&file, &CreateOptions::new(8 << 20))).unwrap();
    let layer = Arc::new(block_on(Qcow2Layer::open(file, &Qcow2Options::default())).unwrap());
    let fill = OwnedRequestBuffers::from_slice(&vec![1; 8 << 20]);
    block_on(layer.write(&fill.buffers(false), 0, false)).unwrap();
    let disk = Disk::new(
        LayeredDisk::new(
            false,
            vec![LayerConfiguration::new(DiskLayer::new(Qcow2Attach(layer)))],
        )
        .unwrap(),
    )
    .unwrap();
    let buf = OwnedRequestBuffers::new(4096);
    for (what, write) in [("read", false), ("write", true)] {
        let ((), allocations) = count(|| {
            for i in 0..1000u64 {
                let sector = (i * 7919 * 8) % ((8 << 11) - 8);
                if write {
                    block_on(disk.write_vectored(&buf.buffers(false), sector, false)).unwrap();
                } else {
                    block_on(disk.read_vectored(&buf.buffers(true), sector)).unwrap();
                }
            }
        });
        // The layer's future (it holds the image file's disk future) is larger than the
        // layered disk's inline slot for a layer call, so it is boxed: one allocation.
        assert!(
            allocations <= 1000,
            "{what}s of allocated clusters made {allocations} allocations for 1000 requests"
        );
        println!("{what}: {allocations} allocations for 1000 requests");
    }
}
