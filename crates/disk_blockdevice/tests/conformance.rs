//! The conformance suite on loop devices (512-byte and 4 KiB sectors, `O_DIRECT` through
//! the loop driver's direct I/O) and on regular files with and without `O_DIRECT`; each
//! test says why and passes where loop devices or io_uring are missing.

mod support;

use disk_blockdevice::BlockDeviceOptions;
use disk_conformance::DiskSpec;
use support::{FileDisk, LoopDisk};

fn loop_unavailable() -> Option<String> {
    support::loop_devices_unavailable().or_else(support::io_uring_unavailable)
}

fn loop_disk(spec: &DiskSpec, sector_size: u64) -> LoopDisk {
    let sector_size_arg = sector_size.to_string();
    let mut args = vec!["--direct-io=on", "-b", &sector_size_arg];
    if spec.read_only {
        args.push("-r");
    }
    LoopDisk::new(
        spec.sector_count * sector_size,
        &args,
        &BlockDeviceOptions::default(),
    )
    .expect("loop devices were found available")
}

fn file_disk(spec: &DiskSpec, direct: bool) -> FileDisk {
    FileDisk::new(
        spec.sector_count * 512,
        &BlockDeviceOptions {
            direct,
            read_only: spec.read_only,
            ..Default::default()
        },
    )
    .expect("io_uring was found available")
}

disk_conformance::conformance_tests!(
    loop_512,
    skip_if: loop_unavailable(),
    |spec: &DiskSpec| loop_disk(spec, 512)
);
disk_conformance::conformance_tests!(
    loop_4k,
    skip_if: loop_unavailable(),
    |spec: &DiskSpec| loop_disk(spec, 4096)
);
disk_conformance::conformance_tests!(
    file_direct,
    skip_if: support::io_uring_unavailable(),
    |spec: &DiskSpec| file_disk(spec, true)
);
disk_conformance::conformance_tests!(
    file_buffered,
    skip_if: support::io_uring_unavailable(),
    |spec: &DiskSpec| file_disk(spec, false)
);

/// More seeds of the model test on a loop device than the suite's one fixed seed.
#[test]
fn loop_model_more_seeds() {
    if let Some(reason) = loop_unavailable() {
        disk_conformance::skip::skip(reason);
        return;
    }
    let factory = disk_conformance::factory(|spec: &DiskSpec| loop_disk(spec, 512));
    for seed in 1..=4 {
        disk_conformance::model_with_seed(&factory, seed);
    }
}
