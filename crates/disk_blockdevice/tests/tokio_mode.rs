//! `Completions::Tokio`: completions reaped by a task on a tokio runtime, woken through an
//! eventfd. The conformance suite (futures driven by `block_on` on the test thread while the
//! runtime's worker reaps), tokio's two schedulers, dropped futures, dropping the disk on the
//! runtime's own thread, and the hand-over to a completion thread when the runtime ends.

#![cfg(feature = "tokio")]

mod support;

use disk_backend::{Disk, DiskIo};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, Completions, OpenError, RingError};
use disk_conformance::{DiskSpec, pattern};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use support::{FileDisk, LoopDisk, many_tasks};

const MIB: u64 = 1 << 20;

/// The runtime whose worker reaps the completions of the conformance suite's disks.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .build()
        .expect("build a tokio runtime")
});

fn tokio_options() -> BlockDeviceOptions {
    BlockDeviceOptions {
        completions: Completions::Tokio,
        ..Default::default()
    }
}

/// A file disk in tokio mode on [`RUNTIME`].
fn file_disk(spec: &DiskSpec) -> FileDisk {
    let _context = RUNTIME.enter();
    FileDisk::new(
        spec.sector_count * 512,
        &BlockDeviceOptions {
            read_only: spec.read_only,
            ..tokio_options()
        },
    )
    .expect("io_uring is available")
}

disk_conformance::conformance_tests!(
    file_tokio,
    skip_if: support::io_uring_unavailable(),
    |spec: &DiskSpec| file_disk(spec)
);

/// A loop device in tokio mode on [`RUNTIME`], or `None` where loop devices are unavailable.
fn loop_disk(size: u64, read_only: bool) -> Option<LoopDisk> {
    let _context = RUNTIME.enter();
    let mut args = vec!["--direct-io=on"];
    if read_only {
        args.push("-r");
    }
    LoopDisk::new(size, &args, &tokio_options())
}

mod loop_tokio {
    use super::*;

    macro_rules! check {
        ($check:ident) => {
            #[test]
            fn $check() {
                if let Some(reason) = support::loop_devices_unavailable() {
                    disk_conformance::skip::skip(reason);
                    return;
                }
                disk_conformance::$check(&disk_conformance::factory(|spec: &DiskSpec| {
                    loop_disk(spec.sector_count * 512, spec.read_only)
                        .expect("loop devices were found available")
                }));
            }
        };
    }

    check!(range_edges);
    check!(zero_length);
    check!(read_only);
    check!(buffer_layouts);
    check!(unmap_semantics);
    check!(model);
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() {
    let Some(file) = FileDisk::new(8 * MIB, &tokio_options()) else {
        return;
    };
    many_tasks(Disk::new(file.disk.clone()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_multi_thread_runtime() {
    let Some(file) = FileDisk::new(8 * MIB, &tokio_options()) else {
        return;
    };
    many_tasks(Disk::new(file.disk.clone()).unwrap()).await;
}

/// Polls `future` once, so that its request is submitted, and returns whether it is still
/// pending.
fn poll_once<F: Future>(future: Pin<&mut F>) -> bool {
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    future.poll(&mut cx).is_pending()
}

/// A request polled once and then held without being polled again (a future kept across a
/// `select!` loop) does not hold back the requests after it. In tokio mode nothing but the
/// requests' own polls submits their entries (the runtime's task only reaps), and when only
/// the first request of a batch submitted it, the next one waited forever.
#[test]
fn a_held_request_does_not_hold_back_the_next() {
    let Some(file) = ({
        let _context = RUNTIME.enter();
        FileDisk::new(MIB, &tokio_options())
    }) else {
        return;
    };
    let held_target = OwnedRequestBuffers::new(4096);
    let held_buffers = held_target.buffers(true);
    let mut held = std::pin::pin!(file.disk.read_vectored(&held_buffers, 0));
    assert!(poll_once(held.as_mut()));
    let (done, finished) = std::sync::mpsc::channel();
    let disk = file.disk.clone();
    std::thread::spawn(move || {
        let target = OwnedRequestBuffers::new(4096);
        let result = block_on(disk.read_vectored(&target.buffers(true), 8));
        let _ = done.send(result.is_ok());
    });
    // A deadline far beyond what a read takes, so that the bug fails the test instead of
    // hanging it.
    let next = finished.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(
        next,
        Ok(true),
        "the next read completes while the first is held"
    );
    assert!(block_on(held).is_ok());
}

/// Starts direct reads of 1 MiB, drops each future right after submission together with its
/// buffers, reuses the memory, then drops the disk; returns how many reads were in flight
/// when dropped. Panics if the kernel wrote into memory handed back early. Nothing here
/// waits for a completion, so it works whether or not the disk's runtime runs.
fn drop_reads_in_flight(disk: BlockDeviceDisk, rounds: u64) -> usize {
    let len = MIB as usize;
    let mut fresh: Vec<Vec<u8>> = Vec::new();
    let mut dropped_in_flight = 0;
    for round in 0..rounds {
        // Aligned (zero-copy) and unaligned (bounce buffer) reads.
        let target = OwnedRequestBuffers::scattered(len, (round % 2) as usize);
        {
            let buffers = target.buffers(true);
            let mut read = std::pin::pin!(disk.read_vectored(&buffers, round * MIB / 512));
            if poll_once(read.as_mut()) {
                dropped_in_flight += 1;
            }
        }
        drop(target);
        for _ in 0..4 {
            fresh.push(vec![0xa5; len + 4096]);
        }
    }
    // Dropping the disk waits for every abandoned request before freeing its buffers.
    drop(disk);
    for (i, buffer) in fresh.iter().enumerate() {
        assert!(
            buffer.iter().all(|&b| b == 0xa5),
            "fresh allocation {i} was overwritten"
        );
    }
    dropped_in_flight
}

/// Opens the loop device at `l` again in tokio mode on the current runtime.
fn reopen(l: &LoopDisk) -> BlockDeviceDisk {
    BlockDeviceDisk::open(&l.device().path, &tokio_options()).expect("open the loop device")
}

#[test]
fn dropped_futures_do_not_corrupt_memory() {
    let Some(l) = loop_disk(16 * MIB, false) else {
        return;
    };
    // Data in every block, so the reads are not of holes.
    l.device()
        .write_backing(0, &pattern(512, 0, 16 * MIB / 512, 77));
    // The runtime's worker reaps while the futures are dropped on this thread.
    let disk = {
        let _context = RUNTIME.enter();
        reopen(&l)
    };
    let in_flight = drop_reads_in_flight(disk, 16);
    assert!(in_flight > 0, "no read was still in flight when dropped");

    // A current-thread runtime that never runs while the futures are dropped: nothing reaps
    // until the disk is dropped, which must then wait for the kernel itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let disk = {
        let _context = runtime.enter();
        reopen(&l)
    };
    let in_flight = drop_reads_in_flight(disk, 16);
    assert!(in_flight > 0, "no read was still in flight when dropped");
}

/// Reads the first 8 MiB of `disk`, 1 MiB at a time, with `block_on` on a thread of its own,
/// and returns whether that finished (within a deadline far beyond what it takes, so a
/// request nobody completes fails the test instead of hanging it).
fn reads_complete_under_block_on(l: LoopDisk) -> bool {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let back = OwnedRequestBuffers::new(MIB as usize);
        for i in 0..8 {
            // Through the loop driver's worker: the completion arrives asynchronously, after
            // the request's future has parked its thread.
            block_on(l.disk.read_vectored(&back.buffers(true), i * MIB / 512)).unwrap();
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .is_ok()
}

/// A current-thread runtime, and a loop disk in tokio mode whose completion task is on it.
fn loop_disk_on_a_current_thread_runtime() -> Option<(tokio::runtime::Runtime, LoopDisk)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let disk = {
        let _context = runtime.enter();
        LoopDisk::new(8 * MIB, &["--direct-io=on"], &tokio_options())
    }?;
    Some((runtime, disk))
}

#[test]
fn a_completion_thread_takes_over_when_the_runtime_shuts_down() {
    let Some((runtime, l)) = loop_disk_on_a_current_thread_runtime() else {
        return;
    };
    // Requests completed by the runtime's task while it runs.
    let back = OwnedRequestBuffers::new(MIB as usize);
    for i in 0..8 {
        runtime
            .block_on(l.disk.read_vectored(&back.buffers(true), i * MIB / 512))
            .unwrap();
    }
    // The runtime shuts down, dropping the disk's completion task.
    drop(runtime);
    assert!(
        reads_complete_under_block_on(l),
        "requests on a disk whose runtime has shut down never completed"
    );
}

#[test]
fn a_runtime_that_never_ran_hands_over_too() {
    let Some((runtime, l)) = loop_disk_on_a_current_thread_runtime() else {
        return;
    };
    // The completion task was spawned but never polled; dropping it must still start a
    // completion thread.
    drop(runtime);
    assert!(
        reads_complete_under_block_on(l),
        "requests on a disk whose runtime never ran did not complete"
    );
}

#[test]
fn tokio_mode_needs_a_runtime_with_io() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(MIB).unwrap();
    let options = BlockDeviceOptions {
        direct: false,
        ..tokio_options()
    };
    match BlockDeviceDisk::open(file.path(), &options) {
        Err(OpenError::Ring(RingError::NoRuntime)) => {}
        Err(OpenError::Ring(RingError::Setup(e))) => {
            disk_conformance::skip::skip(format!("io_uring is unavailable ({e})"));
            return;
        }
        other => panic!("opened outside a runtime: {other:?}"),
    }
    let without_io = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _context = without_io.enter();
    assert!(matches!(
        BlockDeviceDisk::open(file.path(), &options),
        Err(OpenError::Ring(RingError::NoRuntime))
    ));
}
