//! Tests of the ring: batching, owner mode, fixed buffers, abandoned requests.

use super::completion::owner::{OWNER_WAIT_BOUND, OwnerRequests, adapt_poll_window};
use super::fixed::{FixedBuffers, MAX_RW_COUNT, fixed_buffer_ranges};
use super::op::Target;
use super::request::Request;
use super::setup::{kernel_at_least, release_at_least};
use super::{Completions, Op, Owned, Ring};
use request_buffers::{GuestMemory, IoBuffer};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use request_buffers::BounceBuffer;
use std::pin::pin;
use std::sync::Weak;
use std::sync::mpsc;

/// A pipe's read and write ends: a read of the pipe stays in flight until something is
/// written (or the write end closes), which no file or block device offers.
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// An owner-mode ring reading the pipe `fd` with `completion_spin` = `spin`, or `None`
/// (the test skips, saying why) on a kernel without io_uring's `DEFER_TASKRUN` (6.1).
fn owner_ring(fd: &OwnedFd, spin: Duration) -> Option<Ring> {
    match Ring::new(fd.as_raw_fd(), 16, &[], Completions::Owner, spin) {
        Ok(ring) => Some(ring),
        Err(e) => {
            disk_conformance::skip::skip(format!(
                "no owner-mode ring (io_uring with DEFER_TASKRUN): {e}"
            ));
            None
        }
    }
}

/// Reads the owner's own requests' state of `ring` (owner mode) through `f`.
fn owner_requests<T>(ring: &Ring, f: impl FnOnce(&OwnerRequests) -> T) -> T {
    f(ring.shared.table.lock().owner.as_ref().expect("owner mode"))
}

/// Whether `ring` waits for batches (multishot timeouts, Linux 6.4); says so if not.
fn batching(ring: &Ring) -> bool {
    let batching = owner_requests(ring, |r| r.batching);
    if !batching {
        disk_conformance::skip::skip(
            "the batching checks: no multishot timeouts (io_uring, Linux 6.4)",
        );
    }
    batching
}

/// A one-byte read at the pipe's position (offset -1).
fn read_one(ring: &Ring) -> Request<'_> {
    ring.run(
        Op::Read { offset: u64::MAX },
        Owned::Bounce(BounceBuffer::new(1)),
        0,
    )
}

#[test]
fn poll_window_grows_to_the_maximum_and_halves_after_slow_waits() {
    let max = Duration::from_micros(50);
    let us = Duration::from_micros;
    // A completion within the maximum: poll the whole maximum next time.
    assert_eq!(adapt_poll_window(Duration::ZERO, us(17), max), max);
    assert_eq!(adapt_poll_window(us(12), max, max), max);
    // Slower than the maximum: halve, then stop below the minimum.
    assert_eq!(adapt_poll_window(max, us(51), max), us(25));
    assert_eq!(adapt_poll_window(us(4), us(900), max), us(2));
    assert_eq!(adapt_poll_window(us(3), us(900), max), Duration::ZERO);
    assert_eq!(
        adapt_poll_window(Duration::ZERO, us(900), max),
        Duration::ZERO
    );
}

/// With twelve reads in flight the owner waits for three completions; when only one
/// comes, the timeout request must end the wait, or that read would wait for the
/// others forever.
#[test]
fn a_batched_wait_ends_when_the_timer_fires() {
    let (read_end, write_end) = pipe();
    let Some(ring) = owner_ring(&read_end, Duration::ZERO) else {
        return;
    };
    let driver = ring.driver().unwrap();
    let (release, released) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        nix::unistd::write(&write_end, &[7]).unwrap();
        // Closing the write end completes the other reads (end of file); without the
        // timer, that is also what would end the test's wait, after 5 s.
        let _ = released.recv_timeout(Duration::from_secs(5));
    });
    let start = Instant::now();
    let mut reads: FuturesUnordered<_> = (0..12).map(|_| read_one(&ring)).collect();
    let (result, owned) = driver.block_on(reads.next()).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(result.unwrap(), 1);
    let Owned::Bounce(buffer) = owned else {
        panic!("the read's bounce buffer comes back");
    };
    assert_eq!(buffer.as_bytes(), &[7u8][..]);
    assert!(
        elapsed < Duration::from_secs(3),
        "the first completion took {elapsed:?}: the batched wait was not bounded"
    );
    release.send(()).unwrap();
    writer.join().unwrap();
    // The others end at end of file.
    let rest = driver.block_on(reads.collect::<Vec<_>>());
    assert_eq!(rest.len(), 11);
    assert!(rest.iter().all(|(result, _)| matches!(result, Ok(0))));
    // Idle, the owner's next wait removes the timeout, which would otherwise wake it
    // every period.
    if !batching(&ring) {
        return;
    }
    assert!(owner_requests(&ring, |r| r.timer_armed));
    let (wake, woken) = futures::channel::oneshot::channel::<()>();
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        wake.send(()).unwrap();
    });
    driver.block_on(woken).unwrap();
    waker.join().unwrap();
    assert!(
        !owner_requests(&ring, |r| r.timer_armed),
        "the timeout is removed"
    );
    assert!(!owner_requests(&ring, |r| r.timer_removing));
}

/// Writes `bytes` to the pipe after `delay`, on another thread.
fn write_later(write_end: &OwnedFd, delay: Duration, bytes: usize) -> JoinHandle<()> {
    let write_end = write_end.try_clone().unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        nix::unistd::write(&write_end, &vec![1; bytes]).unwrap();
    })
}

/// The owner's polling at depth: the window grows to `completion_spin` after a
/// completion that came within it, completions found while polling are collected at
/// once (eight reads in flight, and no batched wait, which would arm the timeout), and
/// a slower completion halves the window.
#[test]
fn the_owner_polls_at_any_depth_within_an_adaptive_window() {
    let (read_end, write_end) = pipe();
    let max = Duration::from_millis(100);
    let Some(ring) = owner_ring(&read_end, max) else {
        return;
    };
    let driver = ring.driver().unwrap();
    let window = || {
        let owner = ring.shared.owner.as_ref().unwrap();
        Duration::from_nanos(owner.poll_window.load(Ordering::Relaxed))
    };
    let read_all = |count: usize, delay: Duration| {
        let writer = write_later(&write_end, delay, count);
        let reads: FuturesUnordered<_> = (0..count).map(|_| read_one(&ring)).collect();
        let results = driver.block_on(reads.collect::<Vec<_>>());
        writer.join().unwrap();
        assert!(results.iter().all(|(result, _)| matches!(result, Ok(1))));
    };
    // No window yet: the first wait sleeps, and its 10 ms were within the maximum.
    assert_eq!(window(), Duration::ZERO);
    read_all(1, Duration::from_millis(10));
    assert_eq!(window(), max);
    // Polling catches the next completions: the window stays.
    read_all(8, Duration::from_millis(10));
    assert_eq!(window(), max);
    assert!(!owner_requests(&ring, |r| r.timer_armed), "no batched wait");
    // Slower than the maximum: halved.
    read_all(1, Duration::from_secs(1));
    assert_eq!(window(), max / 2);
}

/// A batch that completes by count, then more than a timer period in user space (where
/// a single-shot timeout would fire and only post a completion), then a wait for a batch
/// of which only one read completes: the multishot timeout must still end that wait.
#[test]
fn a_timer_that_fires_between_waits_still_bounds_the_next_one() {
    let (read_end, write_end) = pipe();
    let Some(ring) = owner_ring(&read_end, Duration::ZERO) else {
        return;
    };
    let driver = ring.driver().unwrap();
    let batching = batching(&ring);
    // Data for five reads before anything is submitted: those five complete as they are
    // submitted, so the first wait (for five) ends by count with its timeout armed.
    nix::unistd::write(&write_end, &[1; 5]).unwrap();
    let (go, gone) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        if gone.recv_timeout(Duration::from_secs(5)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
            nix::unistd::write(&write_end, &[2]).unwrap();
        }
        // The rest end at end of file (also the test's fallback).
        let _ = released.recv_timeout(Duration::from_secs(5));
    });
    let mut reads: FuturesUnordered<_> = (0..20).map(|_| read_one(&ring)).collect();
    let elapsed = driver.block_on(async {
        for _ in 0..5 {
            assert!(matches!(reads.next().await, Some((Ok(1), _))));
        }
        assert_eq!(owner_requests(&ring, |r| r.timer_armed), batching);
        // Fifteen in flight: the next wait is for a batch of three.
        std::thread::sleep(5 * OWNER_WAIT_BOUND);
        go.send(()).unwrap();
        let start = Instant::now();
        assert!(matches!(reads.next().await, Some((Ok(1), _))));
        start.elapsed()
    });
    assert!(
        elapsed < Duration::from_secs(3),
        "the read took {elapsed:?}: the wait for its batch was not bounded"
    );
    release.send(()).unwrap();
    writer.join().unwrap();
    let rest = driver.block_on(reads.collect::<Vec<_>>());
    assert_eq!(rest.len(), 14);
}

#[test]
fn kernel_releases_compare_by_major_and_minor() {
    assert!(release_at_least("6.18.0-1-amd64", (6, 4)));
    assert!(release_at_least("6.4.0", (6, 4)));
    assert!(release_at_least("7.0-rc1", (6, 4)));
    assert!(!release_at_least("6.3.13-generic", (6, 4)));
    assert!(!release_at_least("5.15.0", (6, 4)));
    assert!(!release_at_least("garbage", (6, 4)));
    assert!(
        kernel_at_least((2, 6)),
        "the running kernel is newer than 2.6"
    );
}

/// Runs `ring`'s driver on a new thread until two pipe reads are in flight, then drops
/// their futures there and returns, leaving the reads to the kernel.
fn abandon_two_reads_on_another_thread(ring: &Ring) {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let driver = ring.driver().unwrap();
            let mut first = pin!(read_one(ring));
            let mut second = pin!(read_one(ring));
            let (wake, woken) = futures::channel::oneshot::channel::<()>();
            let waker = scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                wake.send(()).unwrap();
            });
            // Polls both reads (queued), then waits in the ring (submitted) until the
            // other thread's wake-up.
            driver.block_on(async {
                futures::future::poll_fn(|cx| {
                    assert!(first.as_mut().poll(cx).is_pending());
                    assert!(second.as_mut().poll(cx).is_pending());
                    Poll::Ready(())
                })
                .await;
                woken.await.unwrap();
            });
            waker.join().unwrap();
            assert_eq!(ring.shared.table.lock().outstanding, 2);
        });
    });
}

#[test]
fn dropped_off_the_owner_thread_with_reads_in_flight_the_ring_is_leaked() {
    let (read_end, write_end) = pipe();
    let Some(ring) = owner_ring(&read_end, Duration::ZERO) else {
        return;
    };
    abandon_two_reads_on_another_thread(&ring);
    let shared: Weak<Shared> = Arc::downgrade(&ring.shared);
    // This thread cannot run the completions' task work: dropping must not wait for
    // them (it would wait forever) nor free their buffers.
    drop(ring);
    assert!(
        shared.upgrade().is_some(),
        "the ring and the buffers the kernel may still write must be kept"
    );
    drop(write_end);
}

#[test]
fn dropped_on_the_owner_thread_the_ring_waits_for_reads_in_flight() {
    let (read_end, write_end) = pipe();
    let Some(ring) = owner_ring(&read_end, Duration::ZERO) else {
        return;
    };
    let driver = ring.driver().unwrap();
    let mut reads: FuturesUnordered<_> = (0..2).map(|_| read_one(&ring)).collect();
    // Polled once: both reads are queued, not yet submitted; dropping the ring on this
    // thread submits them and waits for them to complete.
    driver.block_on(futures::future::poll_fn(|cx| {
        assert!(reads.poll_next_unpin(cx).is_pending());
        Poll::Ready(())
    }));
    drop(reads);
    let shared: Weak<Shared> = Arc::downgrade(&ring.shared);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        nix::unistd::write(&write_end, &[1, 2]).unwrap();
    });
    let start = Instant::now();
    drop(driver);
    drop(ring);
    assert!(
        start.elapsed() >= Duration::from_millis(20),
        "the drop waited"
    );
    assert!(shared.upgrade().is_none(), "nothing is leaked");
    writer.join().unwrap();
}

/// Host buffers at `address` of `len` bytes, for the pure lookups below (never
/// dereferenced).
fn at(address: usize, len: usize) -> IoBuffer {
    IoBuffer::new(address as *mut u8, len)
}

#[test]
fn a_request_uses_the_registered_buffer_that_holds_all_of_it() {
    let mut fixed = FixedBuffers {
        ranges: vec![
            (0x1000, 0x3000),
            (0x5000, 0x6000),
            (usize::MAX - 0xfff, usize::MAX),
        ],
        vectored: false,
        ..FixedBuffers::default()
    };
    assert_eq!(fixed.index_of(&[]), None);
    assert_eq!(
        fixed.index_of(&[at(0x1000, 0x2000)]),
        Some(0),
        "exactly the buffer"
    );
    assert_eq!(fixed.index_of(&[at(0x2fff, 1)]), Some(0), "its last byte");
    assert_eq!(fixed.index_of(&[at(0x2fff, 2)]), None, "one byte past");
    assert_eq!(fixed.index_of(&[at(0xfff, 2)]), None, "one byte before");
    assert_eq!(fixed.index_of(&[at(0x3000, 1)]), None, "between buffers");
    assert_eq!(fixed.index_of(&[at(0x5800, 0x800)]), Some(1));
    assert_eq!(
        fixed.index_of(&[at(0x7000, 1)]),
        None,
        "past the last buffer"
    );
    assert_eq!(fixed.index_of(&[at(usize::MAX - 0x10, 0x10)]), Some(2));
    assert_eq!(
        fixed.index_of(&[at(usize::MAX - 0x10, 0x20)]),
        None,
        "overflow"
    );
    // Two pieces of one buffer need the vectored fixed opcodes.
    let two = [at(0x2000, 0x800), at(0x1000, 0x800)];
    assert_eq!(fixed.index_of(&two), None);
    fixed.vectored = true;
    assert_eq!(fixed.index_of(&two), Some(0));
    assert_eq!(
        fixed.index_of(&[at(0x2000, 0x800), at(0x5000, 0x800)]),
        None
    );
    // At most `MAX_RW_COUNT` bytes, in one piece or several.
    let huge = FixedBuffers {
        ranges: vec![(0, usize::MAX)],
        vectored: true,
        ..FixedBuffers::default()
    };
    assert_eq!(huge.index_of(&[at(0, MAX_RW_COUNT)]), Some(0));
    assert_eq!(huge.index_of(&[at(0, MAX_RW_COUNT + 1)]), None);
    let halves = [at(0, MAX_RW_COUNT / 2), at(0, MAX_RW_COUNT / 2 + 1)];
    assert_eq!(huge.index_of(&halves[..1]), Some(0));
    assert_eq!(
        huge.index_of(&halves),
        None,
        "overlapping pieces past the limit"
    );
    assert_eq!(
        huge.index_of(&[at(0, usize::MAX), at(0, 1)]),
        None,
        "sum overflow"
    );
    assert_eq!(FixedBuffers::default().index_of(&[at(0x1000, 1)]), None);
}

#[test]
fn entries_name_the_fixed_buffer_with_the_fixed_opcodes() {
    let one = [at(0x1000, 512)];
    let two = [at(0x1000, 512), at(0x3000, 512)];
    let read = Op::Read { offset: 4096 };
    let write = Op::Write {
        offset: 4096,
        dsync: true,
    };
    let cases: [(Op, &[IoBuffer], Option<u16>, u8); 7] = [
        (read, &one, Some(3), opcode::ReadFixed::CODE),
        (read, &two, Some(3), opcode::ReadvFixed::CODE),
        (read, &one, None, opcode::Readv::CODE),
        (write, &one, Some(3), opcode::WriteFixed::CODE),
        (write, &two, Some(3), opcode::WritevFixed::CODE),
        (write, &two, None, opcode::Writev::CODE),
        (Op::Fsync, &[], None, opcode::Fsync::CODE),
    ];
    for (op, iovecs, fixed, code) in cases {
        for target in [Target::Registered, Target::Fd(5)] {
            let entry = op.entry(target, iovecs, 0, fixed);
            assert_eq!(
                entry.get_opcode(),
                u32::from(code),
                "{op:?} {fixed:?} {target:?}"
            );
        }
    }
}

/// Guest memory of `pages` pages.
fn memory(pages: usize) -> GuestMemory {
    GuestMemory::allocate(pages * guestmem::PAGE_SIZE)
}

/// Locked buffers over `len` bytes at the start of `memory`.
fn lock(memory: &GuestMemory, len: usize) -> Owned {
    let gpns: Vec<u64> = (0..len.div_ceil(guestmem::PAGE_SIZE) as u64).collect();
    let range = request_buffers::PagedRange::new(0, len, &gpns).unwrap();
    Owned::Locked(
        request_buffers::RequestBuffers::new(memory, range, true)
            .lock(true)
            .unwrap(),
    )
}

/// A thread-mode ring reading the pipe `fd`.
fn thread_ring(fd: &OwnedFd) -> Ring {
    Ring::new(fd.as_raw_fd(), 4, &[], Completions::Thread, Duration::ZERO).expect("io_uring")
}

/// A pipe read of `len` bytes into `memory` (at offset `skip` of the buffers).
fn read_into<'a>(ring: &'a Ring, memory: &GuestMemory, len: usize, skip: usize) -> Request<'a> {
    ring.run(Op::Read { offset: u64::MAX }, lock(memory, len), skip)
}

/// Every request of a batch sees it submitted on its own next poll: the first one may be
/// held unpolled (a future kept across a `select!` loop) while its caller awaits a later
/// one. When only the first submitted, the later one's entry stayed queued.
#[test]
fn a_batch_is_submitted_by_any_of_its_requests() {
    let (read_end, write_end) = pipe();
    let ring = thread_ring(&read_end);
    let (first_memory, second_memory) = (memory(1), memory(1));
    // The data is there from the start, so that a failed check below does not hang in
    // the ring's drop, which waits for the reads.
    nix::unistd::write(&write_end, &[7, 8]).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut first = pin!(read_into(&ring, &first_memory, 1, 0));
    let mut second = pin!(read_into(&ring, &second_memory, 1, 0));
    let queued = || ring.shared.queued.load(Ordering::SeqCst);
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    assert_eq!(queued(), 2, "both entries wait in one batch");
    // The second request's next poll submits the batch (and may find its read done);
    // the first is not polled again until the end.
    let polled = second.as_mut().poll(&mut cx);
    assert_eq!(queued(), 0, "the batch was submitted");
    assert_eq!(ring.shared.table.lock().waiting(&ring.shared.ring), 0);
    let (result, _) = match polled {
        Poll::Ready(done) => done,
        Poll::Pending => futures::executor::block_on(second),
    };
    assert_eq!(result.unwrap(), 1);
    let (result, _) = futures::executor::block_on(first);
    assert_eq!(result.unwrap(), 1);
    let mut bytes = [
        first_memory.read_plain::<u8>(0).unwrap(),
        second_memory.read_plain::<u8>(0).unwrap(),
    ];
    bytes.sort_unstable();
    assert_eq!(bytes, [7, 8]);
}

/// A request whose entry another submitter was to take stays responsible for it: while
/// that submitter is in the kernel (and might fail, or leave later entries behind), the
/// request asks to be polled again instead of leaving its entry to it.
#[test]
fn a_request_sees_its_own_entry_submitted() {
    let (read_end, write_end) = pipe();
    let ring = thread_ring(&read_end);
    let memory = memory(1);
    let woken = Arc::new(AtomicUsize::new(0));
    struct Count(Arc<AtomicUsize>);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let waker = Waker::from(Arc::new(Count(woken.clone())));
    let mut cx = Context::from_waker(&waker);
    let mut read = pin!(read_into(&ring, &memory, 1, 0));
    // The data comes only at the end (so that the read stays pending even if the
    // completion thread's timed wait submits it between the polls), or when a failed
    // check unwinds: the ring's drop waits for the read.
    struct Feed<'a>(&'a OwnedFd, bool);
    impl Feed<'_> {
        fn feed(&mut self) {
            if !std::mem::replace(&mut self.1, true) {
                nix::unistd::write(self.0, &[5]).unwrap();
            }
        }
    }
    impl Drop for Feed<'_> {
        fn drop(&mut self) {
            self.feed();
        }
    }
    let mut feed = Feed(&write_end, false);
    assert!(read.as_mut().poll(&mut cx).is_pending());
    // Another thread holds the submission (it may fail without taking this entry).
    ring.shared.submitting.store(true, Ordering::SeqCst);
    let before = woken.load(Ordering::SeqCst);
    assert!(read.as_mut().poll(&mut cx).is_pending());
    let waiting = ring.shared.table.lock().waiting(&ring.shared.ring) > 0;
    // (The completion thread's timed wait, every 100 ms, may have taken the entry in
    // the microseconds between the two polls; then there is nothing to wait for.)
    assert!(
        !waiting || woken.load(Ordering::SeqCst) == before + 1,
        "the request asks to be polled again while its entry waits"
    );
    // That submitter gave up (here: without entering the kernel at all).
    ring.shared.submitting.store(false, Ordering::SeqCst);
    feed.feed();
    let (result, _) = futures::executor::block_on(read);
    assert_eq!(result.unwrap(), 1);
    assert_eq!(memory.read_plain::<u8>(0).unwrap(), 5);
}

/// A read in flight into registered memory completes into that memory although the
/// registration changes meanwhile (the kernel keeps what a request uses; unregistering
/// would wait for it on kernels before 6.13, and this test would hang there), requests
/// after the change use the new registration.
#[test]
fn a_read_in_flight_keeps_its_buffer_across_a_new_registration() {
    let (read_end, write_end) = pipe();
    let ring = thread_ring(&read_end);
    let first = memory(2);
    ring.register_memory(&first).unwrap();
    let stats = ring.fixed_buffer_stats();
    assert_eq!(
        (stats.registered_bytes, stats.requests),
        (2 * guestmem::PAGE_SIZE as u64, 0)
    );
    let mut read = pin!(read_into(&ring, &first, 3, 0));
    assert!(
        read.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    assert_eq!(ring.fixed_buffer_stats().requests, 1);
    let second = memory(1);
    ring.register_memory(&second).unwrap();
    ring.register_memory(&second).unwrap();
    assert_eq!(
        ring.fixed_buffer_stats().registered_bytes,
        guestmem::PAGE_SIZE as u64
    );
    nix::unistd::write(&write_end, &[7, 8, 9]).unwrap();
    let (result, _) = futures::executor::block_on(read);
    assert_eq!(result.unwrap(), 3);
    let mut back = [0; 3];
    first.read_at(0, &mut back).unwrap();
    assert_eq!(back, [7, 8, 9]);
    // The first memory goes the plain way now, the second the fixed way.
    nix::unistd::write(&write_end, &[4, 5]).unwrap();
    let (result, _) = futures::executor::block_on(read_into(&ring, &first, 1, 0));
    assert_eq!(result.unwrap(), 1);
    assert_eq!(ring.fixed_buffer_stats().requests, 1);
    let (result, _) = futures::executor::block_on(read_into(&ring, &second, 1, 0));
    assert_eq!(result.unwrap(), 1);
    assert_eq!(second.read_plain::<u8>(0).unwrap(), 5);
    assert_eq!(ring.fixed_buffer_stats().requests, 2);
    // An empty memory drops the registration.
    ring.register_memory(&GuestMemory::empty()).unwrap();
    assert_eq!(ring.fixed_buffer_stats().registered_bytes, 0);
}

/// The continuation of a short transfer (bytes after the first `skip`) reads the rest
/// of the range into the right place of the registered buffer.
#[test]
fn a_continuation_uses_the_fixed_buffer_past_what_was_done() {
    let mut file = tempfile::tempfile().unwrap();
    io::Write::write_all(&mut file, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
    let ring = Ring::new(
        file.as_raw_fd(),
        4,
        &[],
        Completions::Thread,
        Duration::ZERO,
    )
    .expect("io_uring");
    let memory = memory(1);
    ring.register_memory(&memory).unwrap();
    let read = ring.run(Op::Read { offset: 0 }, lock(&memory, 10), 4);
    let (result, _) = futures::executor::block_on(read);
    assert_eq!(result.unwrap(), 6);
    assert_eq!(
        memory.read_plain::<[u8; 10]>(0).unwrap(),
        [0, 0, 0, 0, 5, 6, 7, 8, 9, 10]
    );
    assert_eq!(ring.fixed_buffer_stats().requests, 1);
}

/// An entry queued with a buffer index that a change of the kernel's table (behind the
/// ring's back here; a failed submission before a new registration in real life) no
/// longer matches fails with `EFAULT`, and the request is retried without a fixed
/// buffer: the data arrives, the caller never sees the error.
#[test]
fn a_request_whose_buffer_changed_under_it_is_retried_plainly() {
    let (read_end, write_end) = pipe();
    let (first, other) = (memory(1), memory(1));
    let ring = thread_ring(&read_end);
    ring.register_memory(&first).unwrap();
    nix::unistd::write(&write_end, &[42]).unwrap();
    // Pushed into a batch: not submitted until polled again.
    let mut read = pin!(read_into(&ring, &first, 1, 0));
    assert!(
        read.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    assert_eq!(ring.fixed_buffer_stats().requests, 1);
    let elsewhere = fixed_buffer_ranges(&other)[0];
    let iovec = libc::iovec {
        iov_base: elsewhere.0 as *mut libc::c_void,
        iov_len: elsewhere.1 - elsewhere.0,
    };
    // SAFETY: `other` is declared before the ring, so it outlives the ring and every
    // request that may name it.
    unsafe {
        ring.shared
            .ring
            .submitter()
            .register_buffers_update(0, &[iovec], None)
            .unwrap();
    }
    let (result, _) = futures::executor::block_on(read);
    assert_eq!(result.unwrap(), 1);
    assert_eq!(first.read_plain::<u8>(0).unwrap(), 42);
    assert_eq!(other.read_plain::<u8>(0).unwrap(), 0);
}

/// Registering the same memory again pins its pages anew: after guest memory was
/// discarded (`MADV_DONTNEED`, as a balloon does) the ring still holds the old pages, and
/// a read lands where the guest no longer looks, until the memory is registered again.
#[test]
fn registering_again_after_a_discard_pins_the_new_pages() {
    let (read_end, write_end) = pipe();
    let ring = thread_ring(&read_end);
    let memory = GuestMemory::builder()
        .anonymous(0, guestmem::PAGE_SIZE as u64)
        .and_then(guestmem::GuestMemoryBuilder::build)
        .unwrap();
    memory.write_at(0, &[1]).unwrap();
    ring.register_memory(&memory).unwrap();
    let (_, host, _) = memory.host_regions().next().unwrap();
    // SAFETY: `host` is the whole private anonymous mapping of `memory`, which lives;
    // discarding it only makes its next access see a fresh zero page.
    let discarded = unsafe { libc::madvise(host.as_ptr().cast(), host.len(), libc::MADV_DONTNEED) };
    assert_eq!(discarded, 0);
    nix::unistd::write(&write_end, &[9]).unwrap();
    let (result, _) = futures::executor::block_on(read_into(&ring, &memory, 1, 0));
    assert_eq!(result.unwrap(), 1);
    assert_eq!(
        memory.read_plain::<u8>(0).unwrap(),
        0,
        "the read went to the old page"
    );
    ring.register_memory(&memory).unwrap();
    nix::unistd::write(&write_end, &[7]).unwrap();
    let (result, _) = futures::executor::block_on(read_into(&ring, &memory, 1, 0));
    assert_eq!(result.unwrap(), 1);
    assert_eq!(memory.read_plain::<u8>(0).unwrap(), 7);
    assert_eq!(ring.fixed_buffer_stats().requests, 2);
}

/// Memory of more pieces than the kernel's table holds (64 slots at first) needs a new
/// table, which is refused with `EBUSY` while a request is in flight, leaving nothing
/// registered (the request completes), and made once nothing is.
#[test]
fn a_larger_table_waits_until_nothing_is_in_flight() {
    let (read_end, write_end) = pipe();
    let ring = thread_ring(&read_end);
    let small = memory(1);
    ring.register_memory(&small).unwrap();
    // 65 one-page regions, apart in guest-physical space: 65 pieces.
    let many = (0..65u64)
        .try_fold(GuestMemory::builder(), |builder, i| {
            builder.heap(
                2 * i * guestmem::PAGE_SIZE as u64,
                guestmem::PAGE_SIZE as u64,
            )
        })
        .and_then(guestmem::GuestMemoryBuilder::build)
        .unwrap();
    let mut read = pin!(read_into(&ring, &small, 1, 0));
    assert!(
        read.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    let error = ring.register_memory(&many).unwrap_err();
    assert!(
        matches!(&error, RingError::RegisterMemory(e) if e.raw_os_error() == Some(libc::EBUSY)),
        "{error:?}"
    );
    assert_eq!(ring.fixed_buffer_stats().registered_bytes, 0);
    nix::unistd::write(&write_end, &[3]).unwrap();
    let (result, _) = futures::executor::block_on(read);
    assert_eq!(result.unwrap(), 1);
    assert_eq!(small.read_plain::<u8>(0).unwrap(), 3);
    ring.register_memory(&many).unwrap();
    assert_eq!(
        ring.fixed_buffer_stats().registered_bytes,
        65 * guestmem::PAGE_SIZE as u64
    );
    nix::unistd::write(&write_end, &[4]).unwrap();
    let (result, _) = futures::executor::block_on(read_into(&ring, &many, 1, 0));
    assert_eq!(result.unwrap(), 1);
    assert_eq!(many.read_plain::<u8>(0).unwrap(), 4);
    assert_eq!(ring.fixed_buffer_stats().requests, 2);
}
