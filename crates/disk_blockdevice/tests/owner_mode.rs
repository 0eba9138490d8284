//! `Completions::Owner`: the owner thread runs the disk's futures with its
//! driver. The conformance suite on a file disk whose futures are polled on the test thread
//! while an owner thread drives the ring; reads and writes through the driver, refusals, a
//! request polled on another thread, a cross-thread wake, and dropped futures.

mod support;

use disk_backend::{Disk, DiskIo};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, Completions, RingError};
use disk_conformance::DiskSpec;
use request_buffers::OwnedRequestBuffers;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// A thread that owns a ring and drives it until dropped.
#[derive(Debug)]
struct OwnerThread {
    stop: Option<futures::channel::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnerThread {
    /// Claims `disk`'s ring on a new thread, which then runs the driver until dropped.
    fn new(disk: Arc<BlockDeviceDisk>) -> Self {
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        let (ready, claimed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let driver = disk.driver().expect("claim the ring");
            drop(disk);
            ready.send(()).unwrap();
            let _ = driver.block_on(stopped);
        });
        claimed.recv().expect("the owner thread claims the ring");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for OwnerThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// A file disk in owner mode driven by an [`OwnerThread`]; the conformance suite polls its
/// futures on the test thread.
fn driven_file_disk(spec: &DiskSpec) -> support::KeptDisk<(support::FileDisk, OwnerThread)> {
    let file = support::FileDisk::new(
        spec.sector_count * 512,
        &BlockDeviceOptions {
            read_only: spec.read_only,
            completions: Completions::Owner,
            ..Default::default()
        },
    )
    .expect("io_uring is available");
    let disk = file.disk.clone();
    let owner = OwnerThread::new(disk.clone());
    support::KeptDisk {
        disk,
        keep: (file, owner),
    }
}

disk_conformance::conformance_tests!(
    file_owner,
    skip_if: owner_mode_unavailable(),
    |spec: &DiskSpec| driven_file_disk(spec)
);

fn owner_options() -> BlockDeviceOptions {
    BlockDeviceOptions {
        completions: Completions::Owner,
        direct: false,
        ..Default::default()
    }
}

/// A 1 MiB file disk opened with `options`, and the file (kept alive with the disk); `None`,
/// after saying why, where the kernel has no owner mode (io_uring's `DEFER_TASKRUN`, Linux
/// 6.1).
fn file_disk_with(
    options: &BlockDeviceOptions,
) -> Option<(BlockDeviceDisk, tempfile::NamedTempFile)> {
    let file = tempfile::NamedTempFile::new().expect("temporary file");
    file.as_file().set_len(1 << 20).expect("set_len");
    match BlockDeviceDisk::open(file.path(), options) {
        Ok(disk) => Some((disk, file)),
        Err(e) => {
            disk_conformance::skip::skip(format!(
                "no owner-mode ring here (io_uring with DEFER_TASKRUN): {e}"
            ));
            None
        }
    }
}

/// [`file_disk_with`] the owner mode's options.
fn file_disk() -> Option<(BlockDeviceDisk, tempfile::NamedTempFile)> {
    file_disk_with(&owner_options())
}

/// Why the owner mode cannot be tested here, if it cannot.
fn owner_mode_unavailable() -> Option<&'static str> {
    file_disk()
        .is_none()
        .then_some("no owner-mode ring here (io_uring with DEFER_TASKRUN, Linux 6.1)")
}

#[test]
fn reads_what_it_wrote() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    reads_what_it_wrote_on(backend);
}

#[test]
fn reads_what_it_wrote_with_completion_spin() {
    let Some((backend, _file)) = file_disk_with(&BlockDeviceOptions {
        completion_spin: std::time::Duration::from_micros(50),
        ..owner_options()
    }) else {
        return;
    };
    reads_what_it_wrote_on(backend);
}

fn reads_what_it_wrote_on(backend: BlockDeviceDisk) {
    let driver = backend.driver().expect("claim the ring");
    let disk = Disk::new(backend).unwrap();
    let data = OwnedRequestBuffers::new(4096);
    data.copy_from_slice(&[0xa5; 4096]);
    driver
        .block_on(disk.write_vectored(&data.buffers(false), 8, false))
        .unwrap();
    let read = OwnedRequestBuffers::new(4096);
    driver
        .block_on(disk.read_vectored(&read.buffers(true), 8))
        .unwrap();
    assert_eq!(read.to_vec(), vec![0xa5; 4096]);
    driver.block_on(disk.sync_cache()).unwrap();
}

#[test]
fn driver_only_on_the_owner_thread_and_in_owner_mode() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    let _driver = backend.driver().expect("claim the ring");
    // A second driver on the same thread is fine.
    let _again = backend.driver().expect("the owner gets another driver");
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(matches!(backend.driver(), Err(RingError::OwnedElsewhere)));
        });
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let thread_mode = BlockDeviceDisk::open(
        file.path(),
        &BlockDeviceOptions {
            direct: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(thread_mode.driver(), Err(RingError::NotOwnerMode)));
}

#[test]
fn requests_polled_on_another_thread_complete_while_the_owner_drives() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    let driver = backend.driver().expect("claim the ring");
    let disk = Arc::new(Disk::new(backend).unwrap());
    let (done, finished) = futures::channel::oneshot::channel();
    let worker = std::thread::spawn({
        let disk = disk.clone();
        move || {
            for i in 0..100u64 {
                let buffer = OwnedRequestBuffers::new(4096);
                buffer.copy_from_slice(&[i as u8; 4096]);
                futures::executor::block_on(disk.write_vectored(
                    &buffer.buffers(false),
                    i * 8,
                    false,
                ))
                .unwrap();
                let read = OwnedRequestBuffers::new(4096);
                futures::executor::block_on(disk.read_vectored(&read.buffers(true), i * 8))
                    .unwrap();
                assert_eq!(read.to_vec(), vec![i as u8; 4096]);
            }
            // Wakes the owner, which is waiting in `io_uring_enter`, from this thread.
            done.send(()).unwrap();
        }
    });
    driver.block_on(finished).unwrap();
    worker.join().unwrap();
}

/// Polls `future` once with a waker that does nothing.
fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
    future
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

#[test]
fn dropped_futures_and_dropping_the_disk_with_requests_in_flight() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    let driver = backend.driver().expect("claim the ring");
    let disk = Disk::new(backend).unwrap();
    let buffers: Vec<OwnedRequestBuffers> = (0..16)
        .map(|_| OwnedRequestBuffers::new(64 << 10))
        .collect();
    for round in 0..20u64 {
        for (i, buffer) in buffers.iter().enumerate() {
            let buffers = buffer.buffers(true);
            let mut read = pin!(disk.read_vectored(&buffers, (round + i as u64) * 8));
            // Queued (and maybe submitted later by the driver), then dropped.
            if !poll_once(read.as_mut()) {
                continue;
            }
        }
        // The driver submits and reaps what the dropped futures left behind.
        let check = OwnedRequestBuffers::new(4096);
        driver
            .block_on(disk.read_vectored(&check.buffers(true), 0))
            .unwrap();
    }
    // One more abandoned request: dropping the disk on the owner waits for it.
    let buffer = OwnedRequestBuffers::new(4096);
    {
        let buffers = buffer.buffers(true);
        let mut read = pin!(disk.read_vectored(&buffers, 0));
        let _ = poll_once(read.as_mut());
    }
    drop(disk);
    drop(driver);
    assert_eq!(buffer.to_vec().len(), 4096);
}

#[test]
fn a_waker_from_another_thread_interrupts_the_wait() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    let driver = backend.driver().expect("claim the ring");
    let mut waited = false;
    let woken = driver.block_on(std::future::poll_fn(|cx| {
        if waited {
            return Poll::Ready(true);
        }
        waited = true;
        let waker = cx.waker().clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            waker.wake();
        });
        Poll::Pending
    }));
    assert!(woken);
    drop(backend);
}

/// Fixed buffers in owner mode: memory can be registered from any thread until the ring is
/// claimed, then only by its owner; requests the owner drives use them.
#[test]
fn fixed_buffers_are_registered_by_the_owner() {
    let Some((backend, _file)) = file_disk() else {
        return;
    };
    let first = OwnedRequestBuffers::new(4096);
    std::thread::scope(|s| {
        s.spawn(|| {
            backend
                .register_fixed_buffers(first.guest_memory())
                .unwrap()
        });
    });
    let driver = backend.driver().expect("claim the ring");
    let data = OwnedRequestBuffers::new(8192);
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(matches!(
                backend.register_fixed_buffers(data.guest_memory()),
                Err(RingError::OwnedElsewhere)
            ));
        });
    });
    backend.register_fixed_buffers(data.guest_memory()).unwrap();
    assert_eq!(backend.fixed_buffer_stats().registered_bytes, 8192);
    let backend = Arc::new(backend);
    let disk = Disk::new(backend.clone()).unwrap();
    data.copy_from_slice(&[0x5c; 8192]);
    driver
        .block_on(disk.write_vectored(&data.buffers(false), 16, false))
        .unwrap();
    data.copy_from_slice(&[0; 8192]);
    driver
        .block_on(disk.read_vectored(&data.buffers(true), 16))
        .unwrap();
    assert_eq!(data.to_vec(), vec![0x5c; 8192]);
    assert_eq!(backend.fixed_buffer_stats().requests, 2);
}
