//! The conformance suite on the stacks the issue names: one RAM layer (512 B and 4 KiB
//! sectors), RAM over a file, a read cache over a file, and three layers of different sizes.

use disk_backend::Disk;
use disk_conformance::DiskSpec;
use disk_file::{FileDisk, FileDiskOptions};
use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayeredDisk};
use disk_ram::{RamLayer, RamLayerConfig};

fn file(sectors: u64, read_only: bool) -> Disk {
    let file = tempfile::tempfile().unwrap();
    file.set_len(sectors * 512).unwrap();
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let options = FileDiskOptions {
        read_only,
        ..Default::default()
    };
    Disk::new(FileDisk::open(path, &options).unwrap()).unwrap()
}

fn ram(sector_count: u64, sector_size: u32) -> DiskLayer {
    DiskLayer::new(RamLayer::new(sector_count, sector_size).unwrap())
}

fn layer(layer: DiskLayer, write_through: bool, read_cache: bool) -> LayerConfiguration {
    LayerConfiguration {
        layer,
        write_through,
        read_cache,
    }
}

disk_conformance::conformance_tests!(one_ram_layer_512, |spec: &DiskSpec| {
    LayeredDisk::new(
        spec.read_only,
        vec![layer(ram(spec.sector_count, 512), false, false)],
    )
    .unwrap()
});

disk_conformance::conformance_tests!(one_ram_layer_4k, |spec: &DiskSpec| {
    LayeredDisk::new(
        spec.read_only,
        vec![layer(ram(spec.sector_count, 4096), false, false)],
    )
    .unwrap()
});

// A writable RAM overlay (sized from the file) over a read-only file.
disk_conformance::conformance_tests!(ram_over_file, |spec: &DiskSpec| {
    LayeredDisk::new(
        spec.read_only,
        vec![
            layer(DiskLayer::new(RamLayer::lazy()), false, false),
            layer(
                DiskLayer::new(DiskAsLayer::new(file(spec.sector_count, true))),
                false,
                false,
            ),
        ],
    )
    .unwrap()
});

// A RAM read cache that writes through to the file.
disk_conformance::conformance_tests!(read_cache_over_file, |spec: &DiskSpec| {
    LayeredDisk::new(
        spec.read_only,
        vec![
            layer(DiskLayer::new(RamLayer::lazy()), !spec.read_only, true),
            layer(
                DiskLayer::new(DiskAsLayer::new(file(spec.sector_count, spec.read_only))),
                false,
                false,
            ),
        ],
    )
    .unwrap()
});

// Top 256 sectors, a middle layer of 200 and a bottom file of 300: sectors 200..256 exist
// only in the top layer, and the bottom is clamped to 200.
disk_conformance::conformance_tests!(three_layers_of_different_sizes, |spec: &DiskSpec| {
    LayeredDisk::new(
        spec.read_only,
        vec![
            layer(ram(spec.sector_count, 512), false, false),
            layer(
                DiskLayer::new(RamLayerConfig {
                    sector_count: Some(spec.sector_count * 25 / 32),
                    sector_size: None,
                }),
                false,
                false,
            ),
            layer(
                DiskLayer::new(DiskAsLayer::new(file(spec.sector_count * 75 / 64, true))),
                false,
                false,
            ),
        ],
    )
    .unwrap()
});
