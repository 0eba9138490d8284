//! Behaviour on real loop devices: geometry, O_DIRECT with aligned and unaligned buffers,
//! FUA, discard and write-zeroes, resize notifications, read-only devices, reservations,
//! eject, dropped futures, and executors.

mod support;

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, Completions, RingError};
use disk_conformance::pattern;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use support::{LoopDisk, many_tasks};

const MIB: u64 = 1 << 20;

fn loop_disk(size: u64, args: &[&str]) -> Option<LoopDisk> {
    LoopDisk::new(size, args, &BlockDeviceOptions::default())
}

#[test]
fn geometry_of_a_loop_device() {
    let Some(l) = loop_disk(4 * MIB, &["--direct-io=on", "-b", "4096"]) else {
        return;
    };
    let disk = &l.disk;
    assert!(disk.is_block_device());
    assert_eq!(disk.sector_size(), 4096);
    assert_eq!(disk.physical_sector_size(), 4096);
    assert_eq!(disk.sector_count(), 1024);
    assert!(!disk.is_read_only());
    assert!(disk.is_fua_respected());
    let geometry = disk.geometry();
    assert!(geometry.direct);
    assert!(!geometry.removable);
    // The loop driver discards by punching holes in its backing file.
    assert!(geometry.discard_granularity > 0);
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);
    assert_eq!(
        disk.optimal_unmap_sectors(),
        (geometry.discard_granularity / 4096).max(1)
    );
    assert_eq!(disk.disk_type(), "blockdevice");
    assert!(Disk::new(l.disk.clone()).is_ok());
}

#[test]
fn direct_io_with_aligned_and_unaligned_buffers() {
    let Some(l) = loop_disk(4 * MIB, &["--direct-io=on"]) else {
        return;
    };
    let disk = Disk::new(l.disk.clone()).unwrap();
    let sectors = 24u64;
    let len = (sectors * 512) as usize;
    block_on(async {
        // Offsets 0 and 512 are sector-aligned (zero-copy); 1 and 4000 are not, so they
        // must go through the bounce buffer (O_DIRECT would refuse them with EINVAL).
        for (salt, offset) in [0usize, 512, 1, 4000].into_iter().enumerate() {
            let sector = 100 + salt as u64 * sectors;
            let data = pattern(512, sector, sectors, salt as u8);
            let src = OwnedRequestBuffers::scattered(len, offset);
            src.copy_from_slice(&data);
            disk.write_vectored(&src.buffers(false), sector, false)
                .await
                .unwrap_or_else(|e| panic!("write from offset {offset}: {e:?}"));
            let dst = OwnedRequestBuffers::scattered(len, 4096 - offset % 4096);
            disk.read_vectored(&dst.buffers(true), sector)
                .await
                .unwrap_or_else(|e| panic!("read to offset {offset}: {e:?}"));
            assert!(dst.to_vec() == data, "round trip at offset {offset}");
            disk.sync_cache().await.unwrap();
            // And the data really is in the backing file, where the device put it.
            let backing = l.device().backing_bytes();
            let start = (sector * 512) as usize;
            assert!(
                backing[start..start + len] == data[..],
                "backing file at offset {offset}"
            );
        }
    });
}

#[test]
fn reads_what_was_written_behind_its_back() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    let data = pattern(512, 7, 3, 42);
    l.device().write_backing(7 * 512, &data);
    let buf = OwnedRequestBuffers::new(data.len());
    block_on(l.disk.read_vectored(&buf.buffers(true), 7)).unwrap();
    assert_eq!(buf.to_vec(), data);
}

#[test]
fn fua_writes_reach_the_backing_file_without_a_flush() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    let data = pattern(512, 10, 8, 5);
    let src = OwnedRequestBuffers::from_slice(&data);
    block_on(l.disk.write_vectored(&src.buffers(false), 10, true)).unwrap();
    assert_eq!(&l.device().backing_bytes()[10 * 512..18 * 512], &data[..]);
}

/// What the kernel is asked, per request: every write entry of a FUA write carries
/// `RWF_DSYNC` and no other write entry does, neither brings an `fsync`, and a flush is one
/// data-sync `fsync`. Checked on a loop device with `O_DIRECT` (zero-copy and, for an
/// unaligned buffer, bounced), buffered, and on a regular file. The backing file holds the
/// same bytes with or without the flag, so only the record of the submission entries
/// (`take_io_log`, feature `io-log`, decoded from the entries' bytes) can tell.
#[test]
fn fua_reaches_the_kernel_as_rwf_dsync() {
    use disk_blockdevice::Submission;
    let direct = BlockDeviceOptions::default();
    let buffered = BlockDeviceOptions {
        direct: false,
        ..Default::default()
    };
    let mut disks: Vec<(&str, Arc<BlockDeviceDisk>, Box<dyn std::any::Any>)> = Vec::new();
    for (what, options) in [("loop, direct", &direct), ("loop, buffered", &buffered)] {
        let Some(l) = LoopDisk::new(4 * MIB, &["--direct-io=on"], options) else {
            return;
        };
        disks.push((what, l.disk.clone(), Box::new(l)));
    }
    let Some(f) = support::FileDisk::new(4 * MIB, &buffered) else {
        return;
    };
    disks.push(("file", f.disk.clone(), Box::new(f)));
    for (what, disk, _keep) in &disks {
        disk.take_io_log();
        // 4 KiB aligned, 1 MiB aligned, and 512 bytes at an odd offset into a page (a bounce
        // buffer under O_DIRECT).
        let aligned = OwnedRequestBuffers::from_slice(&vec![3u8; MIB as usize]);
        for fua in [true, false] {
            for (len, offset_in_page) in [(4096, 0), (MIB as usize, 0), (512, 8)] {
                let buffers = aligned.buffers(false).subrange(offset_in_page, len);
                block_on(disk.write_vectored(&buffers, 8, fua)).unwrap();
                let log = disk.take_io_log();
                let writes: Vec<bool> = log
                    .iter()
                    .map(|entry| match entry {
                        Submission::Write { rw_flags, .. } => {
                            *rw_flags & libc::RWF_DSYNC as u32 != 0
                        }
                        other => panic!("{what}: {other:?} in a write"),
                    })
                    .collect();
                assert!(
                    !writes.is_empty(),
                    "{what}: {len} bytes, fua {fua}: no write"
                );
                assert!(
                    writes.iter().all(|&dsync| dsync == fua),
                    "{what}: {len} bytes, fua {fua}: {log:?}"
                );
            }
        }
        block_on(disk.sync_cache()).unwrap();
        assert_eq!(
            disk.take_io_log(),
            [Submission::Fsync {
                fsync_flags: io_uring_fsync_datasync()
            }],
            "{what}: flush"
        );
    }
}

/// `IORING_FSYNC_DATASYNC`.
fn io_uring_fsync_datasync() -> u32 {
    1
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    assert_eq!(l.disk.unmap_behavior(), UnmapBehavior::Zeroes);
    let sectors = 64u64;
    let data = pattern(512, 0, sectors, 3);
    let src = OwnedRequestBuffers::from_slice(&data);
    let back = OwnedRequestBuffers::new(data.len());
    block_on(async {
        l.disk
            .write_vectored(&src.buffers(false), 0, false)
            .await
            .unwrap();
        // Discard 8..24 and zero 40..56; the sectors around them keep their data.
        l.disk.unmap(8, 16, false).await.unwrap();
        l.disk.write_zeroes(40, 16).await.unwrap();
        l.disk.read_vectored(&back.buffers(true), 0).await.unwrap();
    });
    let got = back.to_vec();
    for sector in 0..sectors as usize {
        let range = sector * 512..(sector + 1) * 512;
        let zeroed = (8..24).contains(&sector) || (40..56).contains(&sector);
        if zeroed {
            assert!(
                got[range].iter().all(|&b| b == 0),
                "sector {sector} not zero"
            );
        } else {
            assert_eq!(got[range.clone()], data[range], "sector {sector} changed");
        }
    }
    // The backing file agrees.
    let backing = l.device().backing_bytes();
    assert!(backing[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(block_on(l.disk.write_zeroes(u64::MAX, 1)).is_err());
    assert!(matches!(
        block_on(l.disk.write_zeroes(2048, 1)),
        Err(DiskError::IllegalBlock)
    ));
}

/// Runs `future` on a thread and fails the test if it does not finish within `limit`: a
/// lost notification would otherwise hang the test run.
fn finish_within<T: Send + 'static>(
    limit: Duration,
    future: impl Future<Output = T> + Send + 'static,
) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(block_on(future));
    });
    receiver
        .recv_timeout(limit)
        .expect("the future did not complete")
}

#[test]
fn resize_wakes_wait_resize() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    let disk = Disk::new(l.disk.clone()).unwrap();
    assert_eq!(disk.sector_count(), 2048);

    // A waiter that starts before the resize is woken by the uevent.
    let waiter = {
        let disk = disk.clone();
        std::thread::spawn(move || block_on(disk.wait_resize(2048)))
    };
    // Give the waiter a chance to block first; the test passes either way, since a waiter
    // that starts late sees the new size straight away.
    std::thread::sleep(Duration::from_millis(50));
    l.device().resize(3 * MIB);
    assert_eq!(waiter.join().unwrap(), 6144);
    // The cached count follows once the uevent arrived (the waiter may have read the size
    // itself first, so wait for the count rather than assume it).
    let disk2 = disk.clone();
    assert_eq!(
        finish_within(Duration::from_secs(30), async move {
            disk2.wait_resize(2048).await
        }),
        6144
    );
    assert_eq!(disk.sector_count(), 6144);

    // The new sectors are usable; and a shrink is noticed too.
    let buf = OwnedRequestBuffers::from_slice(&pattern(512, 6143, 1, 1));
    block_on(disk.write_vectored(&buf.buffers(false), 6143, false)).unwrap();
    let disk2 = disk.clone();
    let waiter = std::thread::spawn(move || block_on(disk2.wait_resize(6144)));
    l.device().resize(MIB / 2);
    assert_eq!(waiter.join().unwrap(), 1024);
    // Only the uevent updates the cached count: wait until it has.
    let disk2 = disk.clone();
    finish_within(Duration::from_secs(30), async move {
        while disk2.sector_count() != 1024 {
            let _ = disk2.wait_resize(disk2.sector_count()).await;
        }
    });
    assert!(matches!(
        block_on(disk.read_vectored(&buf.buffers(true), 6143)),
        Err(DiskError::IllegalBlock)
    ));
}

#[test]
fn resize_is_noticed_without_a_waiter() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    l.device().resize(2 * MIB);
    // No future was waiting; the listener alone refreshes the count.
    let disk = l.disk.clone();
    let count = finish_within(Duration::from_secs(30), async move {
        loop {
            let count = disk.sector_count();
            if count != 2048 {
                return count;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    assert_eq!(count, 4096);
    assert_eq!(l.disk.refresh_sector_count(), 4096);
}

#[test]
fn a_read_past_a_shrunk_end_fails() {
    let Some(l) = loop_disk(MIB, &["--direct-io=on"]) else {
        return;
    };
    l.device().resize(MIB / 2);
    let buf = OwnedRequestBuffers::new(512);
    // Whether the uevent has arrived yet (IllegalBlock) or not (the device returns
    // nothing: an I/O error), the read must fail rather than return short data.
    match block_on(l.disk.read_vectored(&buf.buffers(true), 2047)) {
        Err(DiskError::IllegalBlock) => {}
        Err(DiskError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("read past the shrunk end: {other:?}"),
    }
}

#[test]
fn read_only_loop_device_refuses_writes() {
    let Some(l) = loop_disk(MIB, &["-r"]) else {
        return;
    };
    let data = pattern(512, 0, 2, 9);
    l.device().write_backing(0, &data);
    let disk = &l.disk;
    // Opened with default options: the device itself says it is read-only.
    assert!(disk.is_read_only());
    assert!(disk.geometry().read_only);
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Ignored);
    let buf = OwnedRequestBuffers::from_slice(&pattern(512, 0, 2, 1));
    block_on(async {
        for fua in [false, true] {
            assert!(matches!(
                disk.write_vectored(&buf.buffers(false), 0, fua).await,
                Err(DiskError::ReadOnly)
            ));
        }
        assert!(matches!(
            disk.unmap(0, 2, false).await,
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(
            disk.write_zeroes(0, 2).await,
            Err(DiskError::ReadOnly)
        ));
        disk.sync_cache().await.unwrap();
        let back = OwnedRequestBuffers::new(1024);
        disk.read_vectored(&back.buffers(true), 0).await.unwrap();
        assert_eq!(back.to_vec(), data);
    });
    assert_eq!(&l.device().backing_bytes()[..1024], &data[..]);
}

#[test]
fn loop_devices_have_no_reservations_and_no_eject() {
    let Some(l) = loop_disk(MIB, &[]) else {
        return;
    };
    // The loop driver has no pr_ops: the probe at open says so.
    assert!(l.disk.pr().is_none());
    assert!(matches!(
        block_on(l.disk.eject()),
        Err(DiskError::UnsupportedEject)
    ));
    let disk = Disk::new(l.disk.clone()).unwrap();
    assert!(disk.pr().is_none());
}

#[test]
fn buffered_open_of_a_device_serves_any_alignment() {
    let Some(l) = LoopDisk::new(
        MIB,
        &[],
        &BlockDeviceOptions {
            direct: false,
            ..Default::default()
        },
    ) else {
        return;
    };
    assert!(!l.disk.geometry().direct);
    let data = pattern(512, 3, 5, 11);
    let src = OwnedRequestBuffers::scattered(data.len(), 17);
    src.copy_from_slice(&data);
    let dst = OwnedRequestBuffers::scattered(data.len(), 999);
    block_on(async {
        l.disk
            .write_vectored(&src.buffers(false), 3, false)
            .await
            .unwrap();
        l.disk.sync_cache().await.unwrap();
        l.disk.read_vectored(&dst.buffers(true), 3).await.unwrap();
    });
    assert_eq!(dst.to_vec(), data);
}

/// Polls `future` once, so that its request is submitted, and returns whether it is still
/// pending.
fn poll_once<F: Future>(future: Pin<&mut F>) -> bool {
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    future.poll(&mut cx).is_pending()
}

/// Starts reads, drops each future right after submission together with its buffers, and
/// reuses the memory; returns how many reads were still in flight when dropped.
fn drop_reads_in_flight(l: LoopDisk, len: usize, rounds: u64) -> usize {
    let data = pattern(512, 0, rounds * len as u64 / 512, 77);
    let src = OwnedRequestBuffers::from_slice(&data);
    block_on(l.disk.write_vectored(&src.buffers(false), 0, true)).unwrap();
    drop(src);

    let mut fresh: Vec<Vec<u8>> = Vec::new();
    let mut dropped_in_flight = 0;
    for round in 0..rounds {
        // Aligned (zero-copy into the guest pages) and unaligned (through a bounce
        // buffer) reads, each of a region not read before (so not cached).
        let offset = if round % 2 == 0 { 0 } else { 1 };
        let target = OwnedRequestBuffers::scattered(len, offset);
        {
            let buffers = target.buffers(true);
            let sector = round * len as u64 / 512;
            let mut read = std::pin::pin!(l.disk.read_vectored(&buffers, sector));
            if poll_once(read.as_mut()) {
                dropped_in_flight += 1;
            }
        }
        drop(target);
        // Reuse the memory: fresh allocations of the same size, filled and kept. If the
        // kernel were still writing into freed memory, some of these would change.
        for _ in 0..4 {
            fresh.push(vec![0xa5; len + 4096]);
        }
    }
    // Dropping the disk waits for every abandoned request before freeing its buffers.
    drop(l);
    for (i, buffer) in fresh.iter().enumerate() {
        assert!(
            buffer.iter().all(|&b| b == 0xa5),
            "fresh allocation {i} was overwritten"
        );
    }
    dropped_in_flight
}

#[test]
fn dropped_futures_do_not_corrupt_memory() {
    // O_DIRECT: the kernel pins the pages at submission.
    let Some(l) = loop_disk(16 * MIB, &["--direct-io=on"]) else {
        return;
    };
    let in_flight = drop_reads_in_flight(l, MIB as usize, 16);
    assert!(
        in_flight > 0,
        "no direct read was still in flight when dropped"
    );
    // Buffered: an uncached read completes later by copying to the buffer's address, so
    // memory freed early and reused by the heap would be overwritten.
    let Some(l) = LoopDisk::new(
        16 * MIB,
        &[],
        &BlockDeviceOptions {
            direct: false,
            ..Default::default()
        },
    ) else {
        return;
    };
    let in_flight = drop_reads_in_flight(l, 32 * 1024, 256);
    assert!(
        in_flight > 0,
        "no buffered read was still in flight when dropped"
    );
}

#[test]
fn a_dropped_future_does_not_stop_the_disk() {
    let Some(l) = loop_disk(4 * MIB, &["--direct-io=on"]) else {
        return;
    };
    let target = OwnedRequestBuffers::new(MIB as usize);
    {
        let buffers = target.buffers(true);
        let mut read = std::pin::pin!(l.disk.read_vectored(&buffers, 0));
        poll_once(read.as_mut());
    }
    // Later requests still complete and see the right data.
    let data = pattern(512, 0, 8, 1);
    let src = OwnedRequestBuffers::from_slice(&data);
    let back = OwnedRequestBuffers::new(data.len());
    block_on(async {
        l.disk
            .write_vectored(&src.buffers(false), 0, false)
            .await
            .unwrap();
        l.disk.read_vectored(&back.buffers(true), 0).await.unwrap();
    });
    assert_eq!(back.to_vec(), data);
}

#[test]
fn more_requests_than_slots_all_complete() {
    let Some(l) = LoopDisk::new(
        4 * MIB,
        &["--direct-io=on"],
        &BlockDeviceOptions {
            queue_depth: 4,
            ..Default::default()
        },
    ) else {
        return;
    };
    let disk = Disk::new(l.disk.clone()).unwrap();
    let buffers: Vec<OwnedRequestBuffers> = (0..64)
        .map(|i| OwnedRequestBuffers::from_slice(&pattern(512, i * 8, 8, i as u8)))
        .collect();
    block_on(futures::future::try_join_all(
        buffers
            .iter()
            .enumerate()
            .map(|(i, b)| disk.write_vectored_owned(b, i as u64 * 8)),
    ))
    .unwrap();
    let back = OwnedRequestBuffers::new(64 * 8 * 512);
    block_on(disk.read_vectored(&back.buffers(true), 0)).unwrap();
    let expected: Vec<u8> = buffers.iter().flat_map(|b| b.to_vec()).collect();
    assert!(back.to_vec() == expected);
}

/// A write of owned buffers, so many can be joined.
trait WriteOwned {
    fn write_vectored_owned<'a>(
        &'a self,
        buffers: &'a OwnedRequestBuffers,
        sector: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + 'a;
}

impl WriteOwned for Disk {
    async fn write_vectored_owned(
        &self,
        buffers: &OwnedRequestBuffers,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.write_vectored(&buffers.buffers(false), sector, false)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_under_tokio() {
    let Some(l) = loop_disk(8 * MIB, &["--direct-io=on"]) else {
        return;
    };
    many_tasks(Disk::new(l.disk.clone()).unwrap()).await;
}

#[test]
fn open_errors() {
    if let Some(reason) = support::io_uring_unavailable() {
        disk_conformance::skip::skip(reason);
        return;
    }
    let options = BlockDeviceOptions::default();
    assert!(matches!(
        BlockDeviceDisk::open("/nonexistent/disk", &options),
        Err(disk_blockdevice::OpenError::Open { .. })
    ));
    assert!(matches!(
        BlockDeviceDisk::open(
            "/dev/null",
            &BlockDeviceOptions {
                direct: false,
                ..Default::default()
            }
        ),
        Err(disk_blockdevice::OpenError::NotADisk { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    assert!(matches!(
        BlockDeviceDisk::open(
            &tiny,
            &BlockDeviceOptions {
                direct: false,
                ..Default::default()
            }
        ),
        Err(disk_blockdevice::OpenError::TooSmall { size: 100, .. })
    ));
    let file = dir.path().join("file");
    std::fs::write(&file, vec![0u8; 8192]).unwrap();
    assert!(matches!(
        BlockDeviceDisk::open(
            &file,
            &BlockDeviceOptions {
                direct: false,
                file_sector_size: 1000,
                ..Default::default()
            }
        ),
        Err(disk_blockdevice::OpenError::InvalidSectorSize { logical: 1000, .. })
    ));
    // Queue depths: 0 and anything past the limit are refused (a depth near `u32::MAX`
    // overflowed the ring's size computation), the limit itself opens, in every mode (the
    // owner mode where the kernel has it: Linux 6.1).
    let max = disk_blockdevice::MAX_QUEUE_DEPTH;
    let open = |queue_depth, completions| {
        BlockDeviceDisk::open(
            &file,
            &BlockDeviceOptions {
                direct: false,
                queue_depth,
                completions,
                ..Default::default()
            },
        )
    };
    // Only a kernel without the owner mode's setup flags (`EINVAL`) skips it; any other
    // failure to open an owner-mode disk is a failure of this test.
    let owner_mode = match open(1, Completions::Owner) {
        Ok(_) => true,
        Err(disk_blockdevice::OpenError::Ring(RingError::Setup(e)))
            if e.raw_os_error() == Some(libc::EINVAL) =>
        {
            false
        }
        Err(e) => panic!("owner mode: {e}"),
    };
    for completions in [Completions::Thread, Completions::Owner] {
        if completions == Completions::Owner && !owner_mode {
            eprintln!("no owner-mode ring here (DEFER_TASKRUN, Linux 6.1): thread mode only");
            continue;
        }
        for (queue_depth, fine) in [
            (0, false),
            (1, true),
            (max, true),
            (max + 1, false),
            (u32::MAX, false),
        ] {
            match open(queue_depth, completions) {
                Ok(_) => assert!(fine, "queue depth {queue_depth} opened"),
                Err(disk_blockdevice::OpenError::QueueDepth { queue_depth: got }) => {
                    assert!(!fine, "queue depth {queue_depth} refused");
                    assert_eq!(got, queue_depth);
                }
                // Before Linux 5.12 a ring's memory counts against `RLIMIT_MEMLOCK`, which
                // the largest ring may exceed.
                Err(disk_blockdevice::OpenError::Ring(RingError::Setup(e)))
                    if queue_depth == max && e.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    eprintln!("queue depth {queue_depth}: the kernel refused the ring: {e}");
                }
                Err(e) => panic!("queue depth {queue_depth}: {e}"),
            }
        }
    }
    // The disk can be shared and dropped from any thread.
    let disk = Arc::new(
        BlockDeviceDisk::open(
            &file,
            &BlockDeviceOptions {
                direct: false,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    std::thread::spawn(move || drop(disk)).join().unwrap();
}
