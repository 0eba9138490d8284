//! Reads of up to 64 KiB through a four-layer stack make no heap allocation.
//! (Its own binary, so no other test allocates concurrently.)

use alloc_counter::{CountingAlloc, count_on_this_thread};
use disk_backend::Disk;
use disk_layered::{DiskLayer, LayerConfiguration, LayerIo, LayeredDisk};
use disk_ram::RamLayer;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn reads_through_four_layers_do_not_allocate() {
    for sector_size in [512u32, 4096] {
        let sectors = (64 << 20) / sector_size as u64;
        let layers: Vec<Arc<RamLayer>> = (0..4)
            .map(|_| Arc::new(RamLayer::new(sectors, sector_size).unwrap()))
            .collect();
        // Data everywhere in the bottom layer, a sprinkling in the upper ones.
        let fill = OwnedRequestBuffers::from_slice(&vec![1; 1 << 20]);
        for s in (0..sectors).step_by((1 << 20) / sector_size as usize) {
            block_on(layers[3].write(&fill.buffers(false), s, false)).unwrap();
        }
        let one = OwnedRequestBuffers::from_slice(&vec![2; sector_size as usize]);
        for (i, layer) in layers[..3].iter().enumerate() {
            block_on(layer.write(&one.buffers(false), 1000 * i as u64 + 7, false)).unwrap();
        }
        let disk = Disk::new(
            LayeredDisk::new(
                false,
                layers
                    .iter()
                    .map(|l| LayerConfiguration::new(DiskLayer::new(l.clone())))
                    .collect(),
            )
            .unwrap(),
        )
        .unwrap();

        for len in [4096usize, 16 << 10, 64 << 10] {
            let buf = OwnedRequestBuffers::new(len);
            let buffers = buf.buffers(true);
            let step = (len / sector_size as usize) as u64;
            block_on(disk.read_vectored(&buffers, 0)).unwrap();
            let ((), allocations) = count_on_this_thread(|| {
                for i in 0..500u64 {
                    block_on(disk.read_vectored(&buffers, (i * 7919 * step) % (sectors - step)))
                        .unwrap();
                }
            });
            assert_eq!(
                allocations, 0,
                "{len}-byte reads with {sector_size}-byte sectors allocated"
            );
        }
    }
}
