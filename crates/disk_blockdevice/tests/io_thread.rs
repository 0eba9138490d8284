//! Thread rings: requests first polled on a thread that drives its own I/O
//! (`disk_backend::io_thread::IoThread`) go to that thread's ring, are reaped there, and
//! read and write what they should; the disk's own ring then sees none of them (its
//! submissions are recorded with the `io-log` feature). Outside an `IoThread`, or with
//! `thread_rings` off, the disk's ring serves them as before.

mod support;

use disk_backend::io_thread::IoThread;
use disk_backend::{Disk, DiskIo};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{MemoryRead, MemoryWrite, OwnedRequestBuffers};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

const SECTORS: u64 = 2048;

fn file_disk(options: &BlockDeviceOptions) -> support::FileDisk {
    support::FileDisk::new(SECTORS * 512, options).expect("io_uring is available")
}

/// Random reads, writes (some FUA), flushes and discards, 32 in flight over disjoint
/// ranges, checked against a model of the disk's contents.
async fn workload(disk: &Disk, seed: u64) {
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    let mut rng = StdRng::seed_from_u64(seed);
    for _round in 0..20 {
        // 32 requests on disjoint 64-sector stripes, so their order does not matter.
        let mut stripes: Vec<u64> = (0..SECTORS / 64).collect();
        for i in (1..stripes.len()).rev() {
            stripes.swap(i, rng.random_range(0..=i));
        }
        let mut requests = FuturesUnordered::new();
        for &stripe in &stripes[..32] {
            let sector = stripe * 64 + rng.random_range(0..32);
            let count = rng.random_range(1..=32u64);
            let range = (sector * 512) as usize..((sector + count) * 512) as usize;
            let kind = rng.random_range(0..10);
            let fill: u8 = rng.random();
            if kind < 4 {
                model[range.clone()].fill(fill);
                let data = vec![fill; range.len()];
                requests.push(Box::pin(async move {
                    let buf = OwnedRequestBuffers::new(data.len());
                    buf.buffers(true).writer().write(&data).unwrap();
                    disk.write_vectored(&buf.buffers(false), sector, kind == 0)
                        .await
                        .expect("write");
                    None
                }) as Pin<Box<dyn Future<Output = _>>>);
            } else if kind < 9 {
                let expect = model[range.clone()].to_vec();
                requests.push(Box::pin(async move {
                    let buf = OwnedRequestBuffers::new(expect.len());
                    disk.read_vectored(&buf.buffers(true), sector)
                        .await
                        .expect("read");
                    let mut got = vec![0; expect.len()];
                    buf.buffers(false).reader().read(&mut got).unwrap();
                    Some((sector, got == expect))
                }));
            } else {
                requests.push(Box::pin(async move {
                    disk.sync_cache().await.expect("flush");
                    None
                }));
            }
        }
        while let Some(result) = requests.next().await {
            if let Some((sector, same)) = result {
                assert!(same, "a read at sector {sector} returned other data");
            }
        }
        // The file discards by punching holes: the range reads as zeros.
        let sector = rng.random_range(0..SECTORS - 64);
        disk.unmap(sector, 64, false).await.expect("unmap");
        model[(sector * 512) as usize..((sector + 64) * 512) as usize].fill(0);
    }
}

#[test]
fn an_io_thread_serves_a_disk_on_its_own_ring() {
    let file = file_disk(&BlockDeviceOptions::default());
    let backend: &BlockDeviceDisk = &file.disk;
    let disk = Disk::new(file.disk.clone()).unwrap();
    backend.take_io_log();
    let io = IoThread::enter().unwrap();
    io.block_on(workload(&disk, 1));
    assert!(
        backend.take_io_log().is_empty(),
        "the disk's own ring was used inside an IoThread"
    );
    drop(io);
    // Outside, the disk's own ring serves the requests (on a fresh disk: the model starts
    // from zeros).
    let file = file_disk(&BlockDeviceOptions::default());
    let disk = Disk::new(file.disk.clone()).unwrap();
    file.disk.take_io_log();
    futures::executor::block_on(workload(&disk, 2));
    assert!(!file.disk.take_io_log().is_empty());
}

#[test]
fn without_thread_rings_the_disk_keeps_its_own_ring() {
    let file = file_disk(&BlockDeviceOptions {
        thread_rings: false,
        ..Default::default()
    });
    let backend = file.disk.clone();
    let disk = Disk::new(file.disk.clone()).unwrap();
    backend.take_io_log();
    let io = IoThread::enter().unwrap();
    io.block_on(workload(&disk, 3));
    assert!(!backend.take_io_log().is_empty());
}

#[test]
fn requests_left_in_flight_when_the_io_thread_ends_still_complete() {
    let file = file_disk(&BlockDeviceOptions::default());
    let disk = Arc::new(Disk::new(file.disk.clone()).unwrap());
    let io = IoThread::enter().unwrap();
    // Start many reads on this thread's ring, poll each once, and end the IoThread while
    // the kernel still has some of them.
    let buffers: Vec<_> = (0..64)
        .map(|_| OwnedRequestBuffers::new(64 << 10))
        .collect();
    let mut reads: Vec<_> = buffers
        .iter()
        .enumerate()
        .map(|(i, buf)| {
            let disk = &disk;
            Box::pin(async move {
                disk.read_vectored(&buf.buffers(true), (i as u64 % 16) * 128)
                    .await
            })
        })
        .collect();
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for read in &mut reads {
        let _ = read.as_mut().poll(&mut cx);
    }
    drop(io);
    // A plain executor now: the ring's completion thread (started when the IoThread ended)
    // wakes them.
    for read in reads {
        futures::executor::block_on(read).expect("read");
    }
}
