//! The shared conformance suite on qcow2 images alone (several cluster sizes) and as an
//! overlay over a read-only RAM base.

mod support;

use disk_conformance::DiskSpec;
use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayeredDisk};
use disk_qcow2::CreateOptions;
use support::{create, layer, qcow2_layer};

fn image(spec: &DiskSpec, cluster_bits: u32, refcount_order: u32, version: u32) -> LayeredDisk {
    let file = tempfile::tempfile().unwrap();
    create(
        &file,
        &CreateOptions {
            size: spec.sector_count * 512,
            cluster_bits,
            refcount_order,
            version,
        },
    );
    LayeredDisk::new(
        spec.read_only,
        vec![LayerConfiguration::new(qcow2_layer(layer(
            &file,
            spec.read_only,
        )))],
    )
    .unwrap()
}

disk_conformance::conformance_tests!(clusters_512_refcount_1, |spec: &DiskSpec| image(
    spec, 9, 0, 3
));
disk_conformance::conformance_tests!(clusters_4k_v2, |spec: &DiskSpec| image(spec, 12, 4, 2));
disk_conformance::conformance_tests!(clusters_64k, |spec: &DiskSpec| image(spec, 16, 4, 3));
disk_conformance::conformance_tests!(clusters_2m_refcount_64, |spec: &DiskSpec| image(
    spec, 21, 6, 3
));

// A qcow2 overlay over a read-only (zero) base: writes go through the copy-on-write path
// (`tests/model.rs` covers a base that holds data).
disk_conformance::conformance_tests!(overlay_over_ram, |spec: &DiskSpec| {
    let base = disk_ram::RamDisk::new(spec.sector_count, 512).unwrap();
    let base = disk_backend::Disk::new(base.with_read_only(true)).unwrap();
    let file = tempfile::tempfile().unwrap();
    create(
        &file,
        &CreateOptions {
            cluster_bits: 12,
            ..CreateOptions::new(spec.sector_count * 512)
        },
    );
    LayeredDisk::new(
        spec.read_only,
        vec![
            LayerConfiguration::new(qcow2_layer(layer(&file, spec.read_only))),
            LayerConfiguration::new(DiskLayer::new(DiskAsLayer::new(base))),
        ],
    )
    .unwrap()
});
