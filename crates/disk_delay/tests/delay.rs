//! `DelayDisk`: the conformance suite with and without a delay, the latency it adds, changing
//! it while requests wait, concurrency, and what it forwards undelayed.

use disk_backend::{Disk, UnmapBehavior};
use disk_delay::DelayDisk;
use disk_ram::RamDisk;
use futures::FutureExt;
use futures::executor::block_on;
use futures::future::join_all;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn delayed(spec: &disk_conformance::DiskSpec, sector_size: u32, delay: Duration) -> DelayDisk {
    let inner = RamDisk::new(spec.sector_count, sector_size)
        .unwrap()
        .with_read_only(spec.read_only);
    DelayDisk::new(Disk::new(inner).unwrap(), delay)
}

disk_conformance::conformance_tests!(no_delay, |spec| delayed(spec, 512, Duration::ZERO));
disk_conformance::conformance_tests!(delay_200us_4k, |spec| {
    delayed(spec, 4096, Duration::from_micros(200))
});

fn ram(sectors: u64) -> Disk {
    Disk::new(RamDisk::new(sectors, 512).unwrap()).unwrap()
}

#[test]
fn reads_and_writes_wait_for_the_delay() {
    let delay = Arc::new(DelayDisk::new(ram(64), Duration::from_millis(150)));
    let disk = Disk::new(delay.clone()).unwrap();
    let data = OwnedRequestBuffers::from_slice(&[5; 1024]);
    let back = OwnedRequestBuffers::new(1024);

    let start = Instant::now();
    block_on(disk.write_vectored(&data.buffers(false), 3, false)).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "write delayed"
    );
    let start = Instant::now();
    block_on(disk.read_vectored(&back.buffers(true), 3)).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "read delayed"
    );
    assert_eq!(back.to_vec(), vec![5; 1024]);

    // Not ready until the timer fires, whatever the executor polls.
    let buffers = back.buffers(true);
    let mut read = Box::pin(disk.read_vectored(&buffers, 3));
    assert!((&mut read).now_or_never().is_none());
    block_on(read).unwrap();

    delay.set_delay(Duration::ZERO);
    assert_eq!(delay.delay(), Duration::ZERO);
    // Without a delay the request completes on its first poll: no timer is involved.
    let buffers = back.buffers(true);
    assert!(disk.read_vectored(&buffers, 3).now_or_never().is_some());
}

/// A change applies to requests issued after it; a request already waiting keeps its delay.
/// Checked by polling, not by timing.
#[test]
fn the_delay_changes_while_requests_wait() {
    let delay = Arc::new(DelayDisk::new(ram(64), Duration::from_secs(3600)));
    let disk = Disk::new(delay.clone()).unwrap();
    let slow_buf = OwnedRequestBuffers::new(512);
    let slow_buffers = slow_buf.buffers(true);
    let mut slow = Box::pin(disk.read_vectored(&slow_buffers, 0));
    assert!((&mut slow).now_or_never().is_none(), "waiting for an hour");
    delay.set_delay(Duration::ZERO);
    let buf = OwnedRequestBuffers::new(512);
    let buffers = buf.buffers(true);
    assert!(
        disk.read_vectored(&buffers, 0).now_or_never().is_some(),
        "a request issued after the change does not wait"
    );
    assert!(
        (&mut slow).now_or_never().is_none(),
        "the waiting request keeps its delay"
    );
}

/// Requests wait side by side, not one after another.
#[test]
fn requests_wait_concurrently() {
    let delay = Duration::from_millis(250);
    let disk = Disk::new(DelayDisk::new(ram(64), delay)).unwrap();
    let buffers: Vec<OwnedRequestBuffers> =
        (0..16).map(|_| OwnedRequestBuffers::new(512)).collect();
    let start = Instant::now();
    let results = block_on(join_all(buffers.iter().enumerate().map(|(i, b)| {
        let disk = &disk;
        async move { disk.read_vectored(&b.buffers(true), i as u64).await }
    })));
    let elapsed = start.elapsed();
    assert!(results.iter().all(Result::is_ok));
    assert!(elapsed >= delay);
    // One after another they would take 16 delays; side by side, one. The bound is the
    // serial time, so only a serialising implementation (not a slow machine) fails it.
    assert!(
        elapsed < 16 * delay,
        "16 requests took {elapsed:?}: they waited in turn"
    );
}

/// Flush, unmap and metadata are the inner disk's, without delay; resize notification is
/// forwarded.
#[test]
fn everything_else_is_forwarded_at_once() {
    let ram = Arc::new(RamDisk::new(100, 512).unwrap().with_disk_id([3; 16]));
    let disk = Disk::new(DelayDisk::new(
        Disk::new(ram.clone()).unwrap(),
        Duration::from_secs(3600),
    ))
    .unwrap();
    assert_eq!(disk.disk_type(), "delay");
    assert_eq!(disk.disk_id(), Some([3; 16]));
    assert_eq!(disk.sector_size(), 512);
    assert_eq!(disk.physical_sector_size(), 512);
    assert!(disk.is_fua_respected());
    assert!(!disk.is_read_only());
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);
    assert!(disk.pr().is_none());
    assert!(
        disk.sync_cache().now_or_never().is_some(),
        "flush not delayed"
    );
    assert!(
        matches!(disk.unmap(0, 10, false).now_or_never(), Some(Ok(()))),
        "unmap not delayed"
    );
    assert!(matches!(
        block_on(disk.eject()),
        Err(disk_backend::DiskError::UnsupportedEject)
    ));

    assert!(disk.wait_resize(100).now_or_never().is_none());
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(100))
    });
    std::thread::sleep(Duration::from_millis(20));
    ram.resize(150).unwrap();
    assert_eq!(waiter.join().unwrap(), 150);
    assert_eq!(disk.sector_count(), 150);
}

#[test]
fn huge_delays_saturate() {
    let delay = DelayDisk::new(ram(8), Duration::MAX);
    assert_eq!(delay.delay(), Duration::from_nanos(u64::MAX));
    assert_eq!(delay.inner().sector_count(), 8);
}

/// Guest memory announced to the delay disk reaches the disk below, at once.
#[test]
fn register_memory_is_forwarded() {
    let probe = Arc::new(disk_conformance::MemoryProbe::new(64));
    let disk = Disk::new(DelayDisk::new(
        Disk::new(probe.clone()).unwrap(),
        Duration::from_secs(3600),
    ))
    .unwrap();
    let memory = request_buffers::GuestMemory::allocate(4096);
    disk.register_memory(&memory).unwrap();
    assert!(probe.last_is(&memory));
}
