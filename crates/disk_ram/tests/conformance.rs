//! The shared conformance suite on the RAM disk, and resize notification through `Disk`.

use disk_backend::Disk;
use disk_ram::RamDisk;
use futures::FutureExt;
use futures::executor::block_on;

disk_conformance::conformance_tests!(sectors_512, |spec| {
    RamDisk::new(spec.sector_count, 512)
        .unwrap()
        .with_read_only(spec.read_only)
});

disk_conformance::conformance_tests!(sectors_4k, |spec| {
    RamDisk::new(spec.sector_count, 4096)
        .unwrap()
        .with_read_only(spec.read_only)
});

#[test]
fn wait_resize_is_forwarded_by_disk() {
    let ram = std::sync::Arc::new(RamDisk::new(100, 512).unwrap());
    let disk = Disk::new(ram.clone()).unwrap();
    // Nothing changed yet: the future stays pending.
    assert!(disk.wait_resize(100).now_or_never().is_none());
    // A count that already differs completes at once.
    assert_eq!(block_on(disk.wait_resize(50)), 100);
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(100))
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    ram.resize(200).unwrap();
    assert_eq!(waiter.join().unwrap(), 200);
    assert_eq!(disk.sector_count(), 200);
}
