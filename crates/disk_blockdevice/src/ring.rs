//! The io_uring of one disk: a table of requests in flight, batched submission, and the
//! reaping of completions.
//!
//! # Who reaps completions
//!
//! The completion queue is read only under the table lock, by whoever holds it first:
//!
//! - a request's future, each time it is polled or pushes a submission entry (*inline
//!   reaping*): on a busy executor most completions are found this way, on the executor's
//!   own thread, without a thread hand-off;
//! - the completion thread, which sleeps in `io_uring_enter` until a completion arrives and
//!   wakes the futures, so a future whose executor is idle is woken too (the default mode,
//!   [`Completions::Thread`]);
//! - or, in [`Completions::Tokio`] mode, a task on a tokio runtime, woken through an eventfd
//!   registered with the ring by the runtime's own reactor: no completion thread at all. If
//!   that task goes away while the disk lives (the runtime shuts down), a completion thread
//!   takes over.
//!
//! # Who owns the memory the kernel uses
//!
//! A request's buffers (locked guest pages or a bounce buffer) and its iovec array move into
//! a [`Slot`] of the table before its submission entry is pushed, and stay there until the
//! kernel's completion for that slot has been reaped. The future only holds the slot's
//! index. If the future is dropped first, the slot is marked abandoned and whoever reaps its
//! completion frees the buffers, so memory the kernel may still write is never freed or
//! handed back early. Dropping the ring waits for every outstanding completion.

use io_uring::{IoUring, Probe, opcode, squeue, types};
use parking_lot::{Mutex, MutexGuard};
use request_buffers::{BounceBuffer, GuestMemory, IoBuffer, LockedIoBuffers};
use smallvec::SmallVec;
use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

// `IoBuffer` is documented to be laid out like `struct iovec`; the iovec pointers handed to
// the kernel are slices of `IoBuffer`s.
const _: () = {
    assert!(size_of::<IoBuffer>() == size_of::<libc::iovec>());
    assert!(align_of::<IoBuffer>() == align_of::<libc::iovec>());
};

/// The kernel's limit on iovecs per request (`UIO_MAXIOV`). Longer lists are submitted in
/// pieces, as if the kernel had made a short transfer.
const IOV_MAX: usize = 1024;

/// `user_data` of the no-op that wakes the completion thread at shutdown; never a slot index.
const WAKE_TOKEN: u64 = u64::MAX;

/// In [`Completions::Owner`] mode with many requests in flight, the owner waits for this
/// fraction of them to complete (a quarter) before it wakes ...
const OWNER_BATCH_DIVISOR: usize = 4;

/// ... or until a multishot timeout request with this period fires: a timeout that fires
/// while a thread waits in `io_uring_enter` ends the wait whatever the count, and one that
/// fires every period ends any wait within a period of its start. It is armed with the
/// first batched wait and removed when nothing is in flight. It bounds the delay the
/// batching adds to a completed request (should the rest of the batch be slow or stuck) and
/// to a wake-up from another thread. Measured at queue depth 32 at memory speed
/// (`docs/benchmarks.md`): a timer per wait (`min_wait_usec`, or a wait timeout) cost 8 to
/// 10 % of the IOPS, a 100 µs period 12 %, this period nothing measurable; timer interrupts
/// are expensive in a virtual machine. A single-shot timeout would not do: one that fires
/// between two waits only posts a completion, and the next wait would have no bound.
const OWNER_WAIT_BOUND: Duration = Duration::from_millis(1);

/// Multishot timeouts came with Linux 6.4; before, the owner wakes for every completion.
const MULTISHOT_TIMEOUT_KERNEL: (u32, u32) = (6, 4);

/// `user_data` of the timeout request of [`OWNER_WAIT_BOUND`]; never a slot index.
const TIMER_TOKEN: u64 = u64::MAX - 2;

/// `user_data` of the request that removes it; never a slot index.
const TIMER_REMOVE_TOKEN: u64 = u64::MAX - 3;

/// Whether the running kernel's version is at least `(major, minor)`, from `uname`.
fn kernel_at_least((major, minor): (u32, u32)) -> bool {
    // SAFETY: `utsname` is plain data, for which all zeroes is a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uname` fills the structure it is given, which is live and writable.
    if unsafe { libc::uname(&mut name) } != 0 {
        return false;
    }
    // SAFETY: `uname` stores a NUL-terminated string in `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    release_at_least(&release.to_string_lossy(), (major, minor))
}

/// Whether a kernel release string such as `6.18.0-1-amd64` is at least `(major, minor)`.
fn release_at_least(release: &str, wanted: (u32, u32)) -> bool {
    let mut numbers = release.split('.').map(|part| {
        part.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= wanted,
        _ => false,
    }
}

/// The shortest poll window of the owner: halving a window below this stops polling (see
/// [`adapt_poll_window`]).
const POLL_MIN: Duration = Duration::from_micros(2);

/// The owner's next poll window, after a wait that polling did not catch and that took
/// `waited` in all, polling `window` first: the whole of `max` if the completion came
/// within it (polling that long would have caught it), half of `window` if it took longer
/// (down to nothing, for a device slower than `max`, where polling only burns a core).
/// Halving rather than stopping at once keeps one slow request from costing the next ones
/// their polling; growing at once rather than step by step (QEMU's event loop doubles its
/// `poll-ns`) catches the very next completion: measured at queue depth 1 at memory speed,
/// doubling from 4 µs and stopping after a slow request gave 1.07× fio's latency, this
/// 0.8 to 0.9× (`docs/benchmarks.md`).
fn adapt_poll_window(window: Duration, waited: Duration, max: Duration) -> Duration {
    if waited <= max {
        max
    } else if window / 2 >= POLL_MIN {
        window / 2
    } else {
        Duration::ZERO
    }
}

/// `user_data` of the multishot poll on the eventfd of [`Completions::Owner`]; never a slot
/// index.
const EVENT_TOKEN: u64 = u64::MAX - 1;

/// Most completions a future reaps inline at once: their wakers wait on the stack until the
/// table lock is released. The rest stay queued for the next reaper.
const INLINE_REAP: usize = 32;

/// How long a thread waiting for completions sleeps at most before it looks at the table
/// again. Waits normally end with a completion; the timeout only bounds a race at shutdown
/// with another reaper that consumed the completion the waiter was woken for.
const WAIT_TIMEOUT: Duration = Duration::from_millis(100);

/// Who reaps completions when no future is being polled: see the
/// [crate documentation](crate#completions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Completions {
    /// A completion thread per disk sleeps in `io_uring_enter` and wakes the futures. Works
    /// under any executor, including `futures::executor::block_on`.
    #[default]
    Thread,
    /// A task on the tokio runtime that is current when the disk is opened waits for
    /// completions through an eventfd registered with the ring (`IORING_REGISTER_EVENTFD`),
    /// so the runtime's reactor wakes it on its own thread and no completion thread runs.
    /// The runtime must have I/O enabled (`enable_io`, as `#[tokio::main]` does). Futures
    /// still work under any executor while that runtime runs; if the runtime shuts down
    /// before the disk is dropped, a completion thread takes over.
    #[cfg(feature = "tokio")]
    Tokio,
    /// One thread owns the ring (`IORING_SETUP_SINGLE_ISSUER |
    /// IORING_SETUP_DEFER_TASKRUN`, as fio sets up its own) and runs the disk's futures
    /// with [`OwnerDriver::block_on`], whose idle step is one `io_uring_enter` that submits
    /// what the futures queued and waits for completions, so completions are processed by
    /// the thread that submitted, with no other thread involved and no completion thread.
    /// The owner is the thread that first calls
    /// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver).
    ///
    /// - Requests polled on other threads queue their entries and wake the owner through an
    ///   eventfd polled in the ring; they make progress only while the owner runs
    ///   `block_on` (possibly on a future that only waits for the program to stop).
    /// - With eight or more requests in flight the owner sleeps until a quarter of them
    ///   have completed, or at most about 1 ms (a multishot timeout request, armed from the
    ///   first such wait until nothing is in flight), so a completed request, or a wake-up
    ///   from another thread, may wait that long for the rest of its batch. Before Linux 6.4
    ///   (no multishot timeouts) it wakes for every completion.
    /// - With [`completion_spin`](crate::BlockDeviceOptions::completion_spin), while
    ///   requests are in flight the owner polls the ring's task-run flag before it sleeps,
    ///   for an adaptive window of up to that long: the whole of it after a completion that
    ///   came within it, half the last window after one that did not (down to none, on a
    ///   device slower than that). A busy core while requests complete that fast; little
    ///   polling on a slower device.
    /// - Dropping the disk on the owner thread waits for abandoned requests; dropped on
    ///   another thread with requests still in flight, the ring and their memory are leaked
    ///   rather than freed while the kernel may use them.
    ///
    /// Needs Linux 6.1 (`DEFER_TASKRUN`).
    Owner,
}

/// The opcodes a disk needs, checked with `IORING_REGISTER_PROBE` when the ring is built.
pub(crate) const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Readv::CODE, "IORING_OP_READV"),
    (opcode::Writev::CODE, "IORING_OP_WRITEV"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Nop::CODE, "IORING_OP_NOP"),
];

/// The largest buffer the kernel registers (`IORING_REGISTER_BUFFERS` refuses larger ones):
/// guest memory regions are registered in pieces of at most this size.
const FIXED_BUFFER_MAX: usize = 1 << 30;

/// The most buffers a ring's table holds (the kernel's `IORING_MAX_REG_BUFFERS`): pieces
/// beyond (guest RAM past 16 TiB) are not registered, and their requests go the plain way.
const FIXED_BUFFERS_MAX: usize = 1 << 14;

/// The most bytes one read or write transfers (the kernel's `MAX_RW_COUNT`). A plain
/// request beyond transfers part and is continued; a vectored fixed one fails, so larger
/// requests go the plain way.
const MAX_RW_COUNT: usize = 0x7fff_f000;

/// An empty slot of the kernel's buffer table (`NULL`, 0), which names no memory.
const EMPTY_SLOT: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// The host address ranges of the writable regions of `memory` in pieces of at most
/// [`FIXED_BUFFER_MAX`] bytes, sorted, at most [`FIXED_BUFFERS_MAX`] of them. Read-only
/// regions stay out: the kernel pins registered memory for writing.
fn fixed_buffer_ranges(memory: &GuestMemory) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = memory
        .host_regions()
        .filter(|&(_, _, writable)| writable)
        .flat_map(|(_, host, _)| {
            let (start, end) = (host.as_ptr() as usize, host.as_ptr() as usize + host.len());
            (start..end)
                .step_by(FIXED_BUFFER_MAX)
                .map(move |piece| (piece, end.min(piece + FIXED_BUFFER_MAX)))
        })
        .collect();
    ranges.sort_unstable();
    ranges.truncate(FIXED_BUFFERS_MAX);
    ranges
}

/// The opcode a disk over a regular file needs in addition (discard and write-zeroes).
pub(crate) const FILE_OPCODES: &[(u8, &str)] = &[(opcode::Fallocate::CODE, "IORING_OP_FALLOCATE")];

/// Building the ring failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed: the kernel lacks io_uring or it is disabled
    /// (`kernel.io_uring_disabled`, a seccomp filter).
    #[error("io_uring is unavailable")]
    Setup(#[source] io::Error),
    /// Registering the probe or the file failed.
    #[error("io_uring registration failed")]
    Register(#[source] io::Error),
    /// The kernel's io_uring lacks an opcode the disk needs.
    #[error("io_uring lacks {0}")]
    MissingOpcode(&'static str),
    /// The completion thread could not be started.
    #[error("cannot start the completion thread")]
    Thread(#[source] io::Error),
    /// [`Completions::Tokio`] was asked for outside a tokio runtime, or on a runtime without
    /// I/O enabled.
    #[cfg(feature = "tokio")]
    #[error("the tokio completion mode needs a tokio runtime with I/O enabled")]
    NoRuntime,
    /// The eventfd for [`Completions::Tokio`] could not be created or registered.
    #[cfg(feature = "tokio")]
    #[error("cannot set up the completion eventfd")]
    EventFd(#[source] io::Error),
    /// The eventfd that wakes the owner in [`Completions::Owner`] mode could not be created.
    #[error("cannot create the owner's eventfd")]
    OwnerEventFd(#[source] io::Error),
    /// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver) on a disk that is not in
    /// [`Completions::Owner`] mode.
    #[error("the disk's ring is not in owner mode")]
    NotOwnerMode,
    /// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver) on a thread other than the
    /// one that owns the ring.
    #[error("another thread owns the disk's ring")]
    OwnedElsewhere,
    /// Enabling the ring for its owner (`IORING_REGISTER_ENABLE_RINGS`) failed.
    #[error("cannot enable the ring for its owner")]
    Enable(#[source] io::Error),
    /// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers):
    /// the memory could not be registered (`ENOMEM`: over `RLIMIT_MEMLOCK` without
    /// `CAP_IPC_LOCK`; `EFAULT`: memory the kernel cannot pin for long, such as a shared
    /// mapping of a file on a regular file system; `EBUSY`: a new buffer table was needed
    /// while requests were in flight). Nothing stays registered; the disk works as before,
    /// without fixed buffers.
    #[error("cannot register guest memory with the ring")]
    RegisterMemory(#[source] io::Error),
}

/// One operation on the ring's file (registered as fixed file 0).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// `IORING_OP_READV` at a byte offset.
    Read { offset: u64 },
    /// `IORING_OP_WRITEV` at a byte offset, with `RWF_DSYNC` for FUA.
    Write { offset: u64, dsync: bool },
    /// `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`.
    Fsync,
    /// `IORING_OP_FALLOCATE`.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

impl Op {
    /// The submission entry for this operation on the bytes of `iovecs`, which start `skip`
    /// bytes into the request; `fixed` is the registered buffer holding all of them.
    fn entry(self, iovecs: &[IoBuffer], skip: usize, fixed: Option<u16>) -> squeue::Entry {
        let fd = types::Fixed(0);
        let pointer = iovecs.as_ptr().cast::<libc::iovec>();
        let count = iovecs.len() as u32;
        match (self, fixed, iovecs) {
            // One piece of registered memory: the plain fixed opcodes (Linux 5.1).
            (Op::Read { offset }, Some(buffer), [one]) => {
                opcode::ReadFixed::new(fd, one.as_ptr(), one.len() as u32, buffer)
                    .offset(offset + skip as u64)
                    .build()
            }
            (Op::Read { offset }, Some(buffer), _) => {
                opcode::ReadvFixed::new(fd, pointer, count, buffer)
                    .offset(offset + skip as u64)
                    .build()
            }
            (Op::Read { offset }, None, _) => opcode::Readv::new(fd, pointer, count)
                .offset(offset + skip as u64)
                .build(),
            (Op::Write { offset, dsync }, Some(buffer), [one]) => {
                opcode::WriteFixed::new(fd, one.as_ptr(), one.len() as u32, buffer)
                    .offset(offset + skip as u64)
                    .rw_flags(dsync_flag(dsync))
                    .build()
            }
            (Op::Write { offset, dsync }, Some(buffer), _) => {
                opcode::WritevFixed::new(fd, pointer, count, buffer)
                    .offset(offset + skip as u64)
                    .rw_flags(dsync_flag(dsync))
                    .build()
            }
            (Op::Write { offset, dsync }, None, _) => opcode::Writev::new(fd, pointer, count)
                .offset(offset + skip as u64)
                .rw_flags(dsync_flag(dsync))
                .build(),
            (Op::Fsync, ..) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Op::Fallocate { offset, len, mode }, ..) => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
    }
}

fn dsync_flag(dsync: bool) -> i32 {
    if dsync { libc::RWF_DSYNC } else { 0 }
}

/// Memory a request lends the kernel: it lives in the request's slot while the kernel may
/// use it.
#[derive(Debug, Default)]
pub(crate) enum Owned {
    /// No memory (flush, fallocate).
    #[default]
    None,
    /// Locked guest pages: zero-copy I/O.
    Locked(LockedIoBuffers),
    /// A bounce buffer.
    Bounce(BounceBuffer),
}

impl Owned {
    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Owned::None => 0,
            Owned::Locked(locked) => locked.len(),
            Owned::Bounce(bounce) => bounce.len(),
        }
    }

    /// Replaces `out` with the iovecs of the bytes after the first `skip`, at most
    /// [`IOV_MAX`] of them.
    fn iovecs(&mut self, skip: usize, out: &mut Vec<IoBuffer>) {
        out.clear();
        let bounce;
        let buffers: &[IoBuffer] = match self {
            Owned::None => &[],
            Owned::Locked(locked) => locked.io_buffers(),
            Owned::Bounce(buffer) => {
                bounce = [buffer.io_buffer()];
                &bounce
            }
        };
        let mut skip = skip;
        for buffer in buffers {
            if out.len() == IOV_MAX {
                break;
            }
            if skip >= buffer.len() {
                skip -= buffer.len();
                continue;
            }
            out.push(IoBuffer::new(
                buffer.as_ptr().wrapping_add(skip),
                buffer.len() - skip,
            ));
            skip = 0;
        }
    }
}

#[derive(Debug)]
enum SlotState {
    Free,
    /// Submitted; the waker of the future waiting for it.
    InFlight(Option<Waker>),
    /// Completed with this result; the future has not collected it yet.
    Done(i32),
    /// Submitted, and the future was dropped: the completion thread frees the slot.
    Abandoned,
}

/// One request in flight. The iovec array's heap storage is reused from request to request
/// and is not touched between submission and completion.
#[derive(Debug)]
struct Slot {
    state: SlotState,
    owned: Owned,
    iovecs: Vec<IoBuffer>,
    /// The entry names a fixed buffer.
    fixed: bool,
}

/// Figures of a disk's fixed buffers; see
/// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedBufferStats {
    /// Bytes of guest memory registered with the ring now (0: none, or registration failed).
    pub registered_bytes: u64,
    /// Read and write requests (or continuations of short transfers) submitted with a
    /// fixed buffer since the disk was opened.
    pub requests: u64,
    /// Whether the kernel takes several pieces of a buffer in one request
    /// (`IORING_OP_READV_FIXED`, Linux 6.15); before, only requests whose memory is one
    /// host-contiguous piece use fixed buffers.
    pub vectored: bool,
}

/// Guest memory registered with the ring (`IORING_REGISTER_BUFFERS`): a request whose
/// buffers all lie in one registered piece names it (`IORING_OP_READ_FIXED` and friends),
/// and the kernel skips pinning and unpinning its pages.
#[derive(Debug, Default)]
struct FixedBuffers {
    /// The host address ranges `start..end` of the registered buffers, sorted and
    /// non-overlapping; a buffer's index in the ring is its position here.
    ranges: Vec<(usize, usize)>,
    /// The kernel has `IORING_OP_READV_FIXED` and `IORING_OP_WRITEV_FIXED` (Linux 6.15), so
    /// requests of several pieces can use fixed buffers too.
    vectored: bool,
    /// Keeps the registered memory mapped while the kernel may use it.
    memory: Option<GuestMemory>,
    /// Requests submitted with a fixed buffer.
    requests: u64,
    /// Entries of the kernel's buffer table (registered or empty), 0 while it has none.
    table_len: u32,
}

impl FixedBuffers {
    /// Makes the kernel's table hold `ranges` (in its first slots; the rest empty), with
    /// `outstanding` requests in flight. On error nothing is registered any more (the
    /// caller forgets its ranges): the kernel never keeps a slot the table does not know.
    fn replace(
        &mut self,
        ring: &IoUring,
        ranges: &[(usize, usize)],
        outstanding: usize,
    ) -> io::Result<()> {
        let submitter = ring.submitter();
        let iovec = |slot: usize| match ranges.get(slot) {
            Some(&(start, end)) => libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: end - start,
            },
            None => EMPTY_SLOT,
        };
        let table_len = self.table_len as usize;
        if table_len > 0 && ranges.len() <= table_len {
            // Slot by slot, so that a failure is known where it happened (the kernel
            // reports a partial update as the count done, which the crate turns into
            // success).
            for slot in 0..table_len {
                // Each non-empty iovec is a piece of a region of the memory the caller
                // keeps mapped (the table's clone) while it is registered. Requests already
                // submitted with the entry this replaces hold their own reference in the
                // kernel, and their memory is kept alive by their slots (`LockedPages`).
                // SAFETY: the memory outlives its registration (above); the guest may change
                // it at any time, which the kernel tolerates like any user buffer.
                let updated =
                    unsafe { submitter.register_buffers_update(slot as u32, &[iovec(slot)], None) };
                match updated {
                    Ok(()) if slot + 1 == table_len => return Ok(()),
                    Ok(()) => {}
                    // No updates (before Linux 5.13): a new table instead, below.
                    Err(e) if slot == 0 && e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => {
                        self.clear(ring);
                        return Err(e);
                    }
                }
            }
        }
        if table_len > 0 {
            // Unregistering waits for every request in flight before Linux 6.13.
            if outstanding > 0 {
                self.clear(ring);
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if let Err(e) = submitter.unregister_buffers() {
                self.clear(ring);
                return Err(e);
            }
            self.table_len = 0;
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let len = ranges
            .len()
            .next_power_of_two()
            .clamp(64, FIXED_BUFFERS_MAX);
        let iovecs: Vec<libc::iovec> = (0..len).map(iovec).collect();
        // SAFETY: as above; no request uses the new table yet.
        let registered = match unsafe { submitter.register_buffers(&iovecs) } {
            Ok(()) => len,
            // Kernels before 5.13 refuse empty slots: a table of exactly the pieces.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) && len > ranges.len() => {
                // SAFETY: as above.
                unsafe { submitter.register_buffers(&iovecs[..ranges.len()]) }?;
                ranges.len()
            }
            Err(e) => return Err(e),
        };
        self.table_len = registered as u32;
        Ok(())
    }

    /// Empties every slot of the kernel's table after a failed change, or, where a slot
    /// cannot be emptied, drops the table.
    fn clear(&mut self, ring: &IoUring) {
        let submitter = ring.submitter();
        for slot in 0..self.table_len {
            // SAFETY: an empty slot names no memory.
            if unsafe { submitter.register_buffers_update(slot, &[EMPTY_SLOT], None) }.is_err() {
                // Unregistering may wait for requests in flight (before 6.13), but it is
                // the only way left to make the kernel let go of the memory.
                if submitter.unregister_buffers().is_ok() {
                    self.table_len = 0;
                }
                return;
            }
        }
    }

    /// The index of the registered buffer that holds every byte of `iovecs`, if there is
    /// one and the kernel can take that many pieces from it.
    fn index_of(&self, iovecs: &[IoBuffer]) -> Option<u16> {
        let first = iovecs.first()?;
        if iovecs.len() > 1 && !self.vectored {
            return None;
        }
        let total = iovecs
            .iter()
            .try_fold(0usize, |total, buffer| total.checked_add(buffer.len()))?;
        if total > MAX_RW_COUNT {
            return None;
        }
        let start = first.as_ptr() as usize;
        let index = self.ranges.partition_point(|&(_, end)| end <= start);
        let &(low, high) = self.ranges.get(index)?;
        let inside = |buffer: &IoBuffer| {
            let address = buffer.as_ptr() as usize;
            address >= low
                && address
                    .checked_add(buffer.len())
                    .is_some_and(|end| end <= high)
        };
        iovecs
            .iter()
            .all(inside)
            .then(|| u16::try_from(index).ok())
            .flatten()
    }
}

#[derive(Debug)]
struct Table {
    slots: Box<[Slot]>,
    /// Registered guest memory.
    fixed: FixedBuffers,
    free: Vec<u32>,
    /// Slots the kernel still owns (in flight or abandoned).
    outstanding: usize,
    /// Futures waiting for a free slot; all are woken when one frees (a waiter may have been
    /// dropped, so waking only one could strand the others).
    waiting: VecDeque<Waker>,
    /// Entries ever pushed onto the submission queue: every push goes through
    /// [`Table::push`], so this is the queue's tail (which wraps at 32 bits; this does not,
    /// so that a request held unpolled for billions of pushes still compares right).
    pushed: u64,
}

impl Table {
    /// Pushes `entry` onto `ring`'s submission queue and returns its position: the number of
    /// entries pushed so far, which the kernel's head reaches once it has taken this one.
    ///
    /// # Safety
    ///
    /// As [`io_uring::SubmissionQueue::push`]: the memory `entry` points to stays valid until
    /// its completion. Holding the table (`&mut self`, behind its lock) makes this the only
    /// `SubmissionQueue` of the ring.
    unsafe fn push(
        &mut self,
        ring: &IoUring,
        entry: &squeue::Entry,
    ) -> Result<u64, squeue::PushError> {
        // SAFETY: the caller's promise, and the table lock (see above).
        unsafe { ring.submission_shared().push(entry) }?;
        self.pushed += 1;
        Ok(self.pushed)
    }

    /// How many entries pushed onto `ring`'s submission queue the kernel has not taken yet.
    fn waiting(&self, ring: &IoUring) -> usize {
        // SAFETY: holding the table makes this the only `SubmissionQueue`; only its head and
        // tail are read.
        unsafe { ring.submission_shared() }.len()
    }

    /// Whether the kernel has taken the entry [`Table::push`] put at `position`.
    fn taken(&self, ring: &IoUring, position: u64) -> bool {
        self.pushed - self.waiting(ring) as u64 >= position
    }

    /// Frees `index` and returns its memory, which the caller drops outside the lock.
    fn release(&mut self, index: u32) -> Owned {
        let slot = &mut self.slots[index as usize];
        slot.state = SlotState::Free;
        self.free.push(index);
        std::mem::take(&mut slot.owned)
    }
}

struct Shared {
    ring: IoUring,
    table: Mutex<Table>,
    /// Entries pushed since the last submitter entered the kernel.
    queued: AtomicUsize,
    /// Whether a thread is in `io_uring_enter` for the submitters.
    submitting: AtomicBool,
    /// Set when the disk is dropped (under the `thread` lock): the completion thread exits
    /// once nothing is outstanding, and no new one is started.
    stopping: AtomicBool,
    /// The completion thread, once started.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// How long the completion thread polls before sleeping (`completion_spin`).
    spin: Duration,
    /// [`Completions::Owner`] mode's state.
    owner: Option<OwnerState>,
    /// The entries submitted, with the `io-log` feature.
    io_log: crate::io_log::IoLog,
}

/// The state of [`Completions::Owner`] mode.
#[derive(Debug)]
struct OwnerState {
    /// Wakes the owner; also the waker of the futures it runs.
    signal: Arc<Signal>,
    /// The owning thread, once claimed.
    thread: OnceLock<ThreadId>,
    /// Whether the owner has enabled the ring (`IORING_REGISTER_ENABLE_RINGS`): nothing is
    /// submitted before.
    enabled: AtomicBool,
    /// The eventfd poll is not armed (at first, or its multishot ended).
    rearm: AtomicBool,
    /// The eventfd poll fired: drain the counter.
    event: AtomicBool,
    /// The kernel has multishot timeouts, so the owner may wait for batches.
    batching: AtomicBool,
    /// The [`OWNER_WAIT_BOUND`] timeout request is in flight (until its last completion).
    timer_armed: AtomicBool,
    /// Its removal was pushed and has not completed yet.
    timer_removing: AtomicBool,
    /// How long the owner polls before it sleeps, in nanoseconds, at most `completion_spin`
    /// (see [`adapt_poll_window`]).
    poll_window: AtomicU64,
    /// Its period; the kernel reads it when the request is submitted, by the owner thread
    /// during its wait, while `Shared` (and so this field) lives.
    tick: types::Timespec,
}

/// How the owner thread is woken: a flag it checks before it waits, and an eventfd polled
/// in the ring to interrupt a wait in `io_uring_enter`.
#[derive(Debug)]
struct Signal {
    eventfd: OwnedFd,
    /// Something to do: poll the future again, or submit entries other threads queued.
    woken: AtomicBool,
    /// The owner is (about to be) in `io_uring_enter`.
    parked: AtomicBool,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: `one` is a live 8-byte buffer; the eventfd is open as long as `self`.
            // A full counter (`EAGAIN`) already wakes the poll.
            let _ = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&raw const one).cast(),
                    size_of::<u64>(),
                )
            };
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("table", &self.table)
            .field("queued", &self.queued)
            .field("submitting", &self.submitting)
            .field("stopping", &self.stopping)
            .field("spin", &self.spin)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Consumes up to `limit` completions with the table lock held (`table` is its guard):
    /// records each result in its slot, hands the waker of a waiting future to `wake` (with
    /// the slot's index) and the memory of an abandoned slot to `free`. Returns whether a
    /// slot was freed, in which case the futures waiting for a slot should be woken.
    fn reap(
        &self,
        table: &mut MutexGuard<'_, Table>,
        limit: usize,
        mut wake: impl FnMut(u32, Waker),
        mut free: impl FnMut(Owned),
    ) -> bool {
        let mut slot_freed = false;
        // SAFETY: the completion queue is only ever read with the table lock held (as here,
        // through `table`), so this is the only `CompletionQueue` alive.
        let completions = unsafe { self.ring.completion_shared() };
        for cqe in completions.take(limit) {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                continue;
            }
            if token == TIMER_TOKEN || token == TIMER_REMOVE_TOKEN {
                if let Some(owner) = &self.owner {
                    if token == TIMER_REMOVE_TOKEN {
                        owner.timer_removing.store(false, Ordering::Relaxed);
                    } else if !io_uring::cqueue::more(cqe.flags()) {
                        // Its last completion: removed, or refused (a kernel without
                        // multishot timeouts despite its version: stop batching).
                        owner.timer_armed.store(false, Ordering::Relaxed);
                        if cqe.result() == -libc::EINVAL {
                            owner.batching.store(false, Ordering::Relaxed);
                        }
                    }
                }
                continue;
            }
            if token == EVENT_TOKEN {
                if let Some(owner) = &self.owner {
                    owner.event.store(true, Ordering::Relaxed);
                    if !io_uring::cqueue::more(cqe.flags()) {
                        owner.rearm.store(true, Ordering::Relaxed);
                    }
                }
                continue;
            }
            let index = token as u32;
            table.outstanding -= 1;
            let slot = &mut table.slots[index as usize];
            match std::mem::replace(&mut slot.state, SlotState::Done(cqe.result())) {
                SlotState::InFlight(waker) => {
                    if let Some(waker) = waker {
                        wake(index, waker);
                    }
                }
                SlotState::Abandoned => {
                    // The kernel is done with this memory.
                    free(table.release(index));
                    slot_freed = true;
                }
                SlotState::Free | SlotState::Done(_) => {
                    unreachable!("a completion for a slot that was not in flight")
                }
            }
        }
        slot_freed
    }

    /// Scratch space for [`Shared::reap_all`], sized for every slot, so that a reaper's
    /// first large batch does not allocate (a thread that reaps rarely, such as the
    /// completion thread while the futures reap inline, would otherwise allocate at a time
    /// that depends on timing).
    fn scratch(&self) -> (Vec<Waker>, Vec<Owned>) {
        let slots = self.table.lock().slots.len();
        (Vec::with_capacity(slots), Vec::with_capacity(slots))
    }

    /// Reaps every completion queued now and wakes the futures, outside the lock; `wakers`
    /// and `freed` are scratch space kept by the caller. Returns whether the ring is
    /// stopping with nothing outstanding.
    fn reap_all(&self, wakers: &mut Vec<Waker>, freed: &mut Vec<Owned>) -> bool {
        let mut table = self.table.lock();
        if self.reap(
            &mut table,
            usize::MAX,
            |_, waker| wakers.push(waker),
            |owned| freed.push(owned),
        ) {
            wakers.extend(table.waiting.drain(..));
        }
        let finished = self.stopping.load(Ordering::SeqCst) && table.outstanding == 0;
        drop(table);
        freed.clear();
        wakers.drain(..).for_each(Waker::wake);
        finished
    }

    /// Sleeps in `io_uring_enter` until a completion is queued (or [`WAIT_TIMEOUT`] passes,
    /// where the kernel can time out a wait); also submits whatever a failed submitter left
    /// queued.
    fn wait(&self) {
        let result = if self.ring.params().is_feature_ext_arg() {
            let timeout = types::Timespec::from(WAIT_TIMEOUT);
            let args = types::SubmitArgs::new().timespec(&timeout);
            self.ring.submitter().submit_with_args(1, &args)
        } else if self.stopping.load(Ordering::SeqCst) {
            // A kernel without timed waits (before 5.11): at shutdown, poll instead of
            // sleeping, since another reaper may take the completion this wait is for.
            std::thread::sleep(Duration::from_millis(1));
            self.ring.submit()
        } else {
            self.ring.submit_and_wait(1)
        };
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => {}
                // Not expected from a valid ring; back off rather than spin.
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Whether the calling thread owns the ring ([`Completions::Owner`]).
    fn on_owner_thread(&self) -> bool {
        self.owner
            .as_ref()
            .and_then(|owner| owner.thread.get())
            .is_some_and(|thread| *thread == std::thread::current().id())
    }

    /// The owner's wait ([`Completions::Owner`], on the owner thread): arms the eventfd poll
    /// if needed, then unless `signal` was woken, submits everything queued and waits for a
    /// completion in one `io_uring_enter`, which also runs the completions' task work here.
    fn owner_wait(&self, signal: &Signal) {
        let Some(owner) = &self.owner else {
            return;
        };
        if owner.rearm.swap(false, Ordering::Relaxed) {
            let poll =
                opcode::PollAdd::new(types::Fd(signal.eventfd.as_raw_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(EVENT_TOKEN);
            let mut table = self.table.lock();
            // An entry beyond the slots is kept free for the poll (two more for the timeout).
            // SAFETY: the poll references no memory, only the eventfd, which the kernel holds
            // a reference to.
            let pushed = unsafe { table.push(&self.ring, &poll) };
            drop(table);
            if pushed.is_err() {
                // Not expected; try again at the next wait.
                owner.rearm.store(true, Ordering::Relaxed);
            }
        }
        let outstanding = self.table.lock().outstanding;
        // With requests in flight and `completion_spin` set, poll for up to the adaptive
        // window before sleeping, and adapt the window after the wait. Unlike the completion
        // thread's polling, at any depth: the owner is the submitting thread, so polling
        // takes no core from a submitter, and it keeps the owner on its core while the
        // device's work runs on the other (+3 to 5 % IOPS at queue depth 32 at memory speed).
        let polling = !self.spin.is_zero() && outstanding > 0;
        let start = polling.then(Instant::now);
        let window = Duration::from_nanos(owner.poll_window.load(Ordering::Relaxed));
        let caught = match start {
            Some(start) if !window.is_zero() => self.owner_poll(signal, start, window),
            _ => false,
        };
        signal.parked.store(true, Ordering::SeqCst);
        if signal.woken.load(Ordering::SeqCst) {
            signal.parked.store(false, Ordering::SeqCst);
            return;
        }
        let result = if self.stopping.load(Ordering::SeqCst) {
            let timeout = types::Timespec::from(WAIT_TIMEOUT);
            let args = types::SubmitArgs::new().timespec(&timeout);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            // With many requests in flight, wake once for a batch of completions rather than
            // for each (fewer wake-ups of this thread: +15-20 % IOPS at queue depth 32), or
            // when the `OWNER_WAIT_BOUND` timeout fires. If polling found a completion, only
            // collect what is there.
            let want = if caught || !owner.batching.load(Ordering::Relaxed) {
                1
            } else {
                (outstanding / OWNER_BATCH_DIVISOR).max(1)
            };
            let want = self.owner_timer(owner, outstanding, want);
            self.ring.submit_and_wait(want)
        };
        signal.parked.store(false, Ordering::SeqCst);
        // Adapt to how long the completions took; not after a wait that another thread's
        // wake-up ended.
        if let Some(start) = start.filter(|_| !caught && !signal.woken.load(Ordering::SeqCst)) {
            let window = adapt_poll_window(window, start.elapsed(), self.spin);
            owner
                .poll_window
                .store(window.as_nanos() as u64, Ordering::Relaxed);
        }
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => {}
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        if owner.event.swap(false, Ordering::Relaxed) {
            let mut count = [0u8; 8];
            // SAFETY: `count` is a live, writable 8-byte buffer; reading an eventfd resets
            // its counter (`EAGAIN` when it is zero already, which is fine).
            let _ = unsafe {
                libc::read(
                    signal.eventfd.as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    count.len(),
                )
            };
        }
    }

    /// Arms the [`OWNER_WAIT_BOUND`] timeout before the owner waits for a batch (`want` >
    /// 1), or removes it when nothing is in flight. Returns the count to wait for: `want`,
    /// or 1 if the timeout could not be armed.
    fn owner_timer(&self, owner: &OwnerState, outstanding: usize, want: usize) -> usize {
        if want > 1 && !owner.timer_armed.load(Ordering::Relaxed) {
            let timeout = opcode::Timeout::new(&raw const owner.tick)
                .flags(types::TimeoutFlags::MULTISHOT)
                .build()
                .user_data(TIMER_TOKEN);
            let mut table = self.table.lock();
            // Entries beyond the slots are kept free for the timeout and its removal.
            // SAFETY: the kernel copies `owner.tick` (alive as long as `self`) when the owner
            // submits the entry.
            let pushed = unsafe { table.push(&self.ring, &timeout) };
            drop(table);
            owner.timer_armed.store(pushed.is_ok(), Ordering::Relaxed);
            if pushed.is_err() {
                // Not expected; without the bound, do not wait for a batch.
                return 1;
            }
        } else if outstanding == 0
            && owner.timer_armed.load(Ordering::Relaxed)
            && !owner.timer_removing.load(Ordering::Relaxed)
        {
            // Idle: stop the timer, which would otherwise wake the owner every period.
            let remove = opcode::TimeoutRemove::new(TIMER_TOKEN)
                .build()
                .user_data(TIMER_REMOVE_TOKEN);
            let mut table = self.table.lock();
            // SAFETY: the entry references no memory. An entry beyond the slots is kept free
            // for it.
            let pushed = unsafe { table.push(&self.ring, &remove) };
            drop(table);
            // If the push failed (not expected), the next idle wait tries again.
            owner
                .timer_removing
                .store(pushed.is_ok(), Ordering::Relaxed);
        }
        want
    }

    /// Polls for the completions' task work, after submitting what is queued, until one is
    /// there, another thread wakes the owner, or `window` has passed since `start`. Returns
    /// whether a completion was found.
    fn owner_poll(&self, signal: &Signal, start: Instant, window: Duration) -> bool {
        let _ = self.ring.submit();
        loop {
            let table = self.table.lock();
            // SAFETY: the table lock makes this the only `SubmissionQueue`; only its flags
            // are read.
            let taskrun = unsafe { self.ring.submission_shared() }.taskrun();
            // SAFETY: the table lock also makes this the only `CompletionQueue` (every
            // reaper takes it); only its head and tail are read.
            let completed = !unsafe { self.ring.completion_shared() }.is_empty();
            drop(table);
            if taskrun || completed {
                return true;
            }
            if signal.woken.load(Ordering::SeqCst) || start.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Starts the completion thread, unless the ring is stopping or it runs already.
    fn start_thread(self: &Arc<Self>) -> io::Result<()> {
        let mut thread = self.thread.lock();
        if self.stopping.load(Ordering::SeqCst) || thread.is_some() {
            return Ok(());
        }
        *thread = Some(
            std::thread::Builder::new()
                .name("disk-uring".into())
                .spawn({
                    let shared = self.clone();
                    move || completion_thread(&shared)
                })?,
        );
        Ok(())
    }
}

/// An io_uring over one file, with whatever reaps its completions.
#[derive(Debug)]
pub(crate) struct Ring {
    shared: Arc<Shared>,
    /// The tokio task that reaps completions in [`Completions::Tokio`] mode.
    #[cfg(feature = "tokio")]
    reactor: Option<tokio::task::AbortHandle>,
}

impl Ring {
    /// A ring of `entries` slots over `fd`, which must stay open for the ring's lifetime.
    /// Fails if io_uring is unavailable or lacks one of `opcodes`.
    /// The submission entries recorded since the last call (feature `io-log`).
    #[cfg(feature = "io-log")]
    pub(crate) fn take_io_log(&self) -> Vec<crate::io_log::Submission> {
        self.shared.io_log.take()
    }

    pub(crate) fn new(
        fd: RawFd,
        entries: u32,
        opcodes: &[(u8, &'static str)],
        completions: Completions,
        completion_spin: Duration,
    ) -> Result<Self, RingError> {
        let owner_mode = completions == Completions::Owner;
        // In owner mode, entries beyond the slots for the eventfd poll, the timeout and its
        // removal.
        let reserved = if owner_mode { 3 } else { 0 };
        let mut builder = IoUring::builder();
        if owner_mode {
            // The ring is enabled by the thread that claims it, which becomes its single
            // issuer.
            builder
                .setup_cqsize((entries + reserved) * 2)
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled();
        } else {
            // The completion queue is twice the slots, so it can never overflow.
            builder.setup_cqsize(entries * 2);
            // Not COOP_TASKRUN: it made no measurable difference (benchmarks.md), and it
            // would hold back the completions of a submitter that computes without entering
            // the kernel.
        }
        // With `SUBMIT_ALL` (Linux 5.18) an entry the kernel fails to set up completes with
        // its error instead of ending the submission there, leaving the entries after it
        // queued; without it, `submit` notices what was left (see there).
        builder.setup_submit_all();
        let ring = match builder.build(entries + reserved) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !owner_mode => {
                IoUring::builder().setup_cqsize(entries * 2).build(entries)
            }
            built => built,
        }
        .map_err(RingError::Setup)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Register)?;
        for &(code, name) in REQUIRED_OPCODES.iter().chain(opcodes) {
            if !probe.is_supported(code) {
                return Err(RingError::MissingOpcode(name));
            }
        }
        let fixed = FixedBuffers {
            vectored: probe.is_supported(opcode::ReadvFixed::CODE)
                && probe.is_supported(opcode::WritevFixed::CODE),
            ..FixedBuffers::default()
        };
        // A registered file saves the kernel a descriptor lookup and reference per request.
        ring.submitter()
            .register_files(&[fd])
            .map_err(RingError::Register)?;
        // As many slots as asked for (the kernel rounds the queue up to a power of two).
        let slots = entries.min(ring.params().sq_entries() - reserved);
        let owner = if owner_mode {
            // SAFETY: `eventfd` takes no pointers; a non-negative result is a new descriptor
            // that nothing else owns.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(RingError::OwnerEventFd(io::Error::last_os_error()));
            }
            Some(OwnerState {
                signal: Arc::new(Signal {
                    // SAFETY: see above: `fd` is open and owned by no one else.
                    eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
                    woken: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                }),
                thread: OnceLock::new(),
                enabled: AtomicBool::new(false),
                rearm: AtomicBool::new(true),
                event: AtomicBool::new(false),
                batching: AtomicBool::new(kernel_at_least(MULTISHOT_TIMEOUT_KERNEL)),
                timer_armed: AtomicBool::new(false),
                timer_removing: AtomicBool::new(false),
                poll_window: AtomicU64::new(0),
                tick: types::Timespec::from(OWNER_WAIT_BOUND),
            })
        } else {
            None
        };
        let table = Table {
            slots: (0..slots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    owned: Owned::None,
                    iovecs: Vec::new(),
                    fixed: false,
                })
                .collect(),
            free: (0..slots).rev().collect(),
            fixed,
            outstanding: 0,
            waiting: VecDeque::new(),
            pushed: 0,
        };
        let shared = Arc::new(Shared {
            ring,
            table: Mutex::new(table),
            queued: AtomicUsize::new(0),
            submitting: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
            spin: completion_spin,
            owner,
            io_log: Default::default(),
        });
        match completions {
            Completions::Thread => {
                shared.start_thread().map_err(RingError::Thread)?;
                Ok(Self {
                    shared,
                    #[cfg(feature = "tokio")]
                    reactor: None,
                })
            }
            #[cfg(feature = "tokio")]
            Completions::Tokio => {
                let reactor = reactor::spawn(&shared)?;
                Ok(Self {
                    shared,
                    reactor: Some(reactor),
                })
            }
            Completions::Owner => Ok(Self {
                shared,
                #[cfg(feature = "tokio")]
                reactor: None,
            }),
        }
    }

    /// Claims the ring for the calling thread in [`Completions::Owner`] mode (enabling it
    /// the first time) and returns its driver.
    pub(crate) fn driver(&self) -> Result<OwnerDriver, RingError> {
        let shared = &self.shared;
        let owner = shared.owner.as_ref().ok_or(RingError::NotOwnerMode)?;
        let me = std::thread::current().id();
        if *owner.thread.get_or_init(|| me) != me {
            return Err(RingError::OwnedElsewhere);
        }
        // Only the owner thread gets here, so this is not racy.
        if !owner.enabled.load(Ordering::SeqCst) {
            // With `SINGLE_ISSUER`, enabling the ring makes this thread its submitter.
            shared
                .ring
                .submitter()
                .register_enable_rings()
                .map_err(RingError::Enable)?;
            owner.enabled.store(true, Ordering::SeqCst);
        }
        Ok(OwnerDriver {
            shared: shared.clone(),
            scratch: Cell::new(shared.scratch()),
            _not_send: PhantomData,
        })
    }

    /// Registers the writable regions of `memory` with the ring as fixed buffers (in pieces
    /// of at most 1 GiB, at most [`FIXED_BUFFERS_MAX`] of them), replacing any earlier
    /// registration; an empty `memory` just drops it. See
    /// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers).
    ///
    /// The kernel's buffer table is registered once, with room to spare, and later changed
    /// in place, slot by slot (`IORING_REGISTER_BUFFERS_UPDATE`, Linux 5.13): unregistering
    /// a table waits for every request in flight on kernels before 6.13, an update never
    /// does. A new table (memory of more pieces than the table holds, or a kernel without
    /// updates) is only made while no request is in flight (`EBUSY` until then). On any
    /// error nothing stays registered, so the table and what the kernel holds never differ.
    pub(crate) fn register_memory(&self, memory: &GuestMemory) -> Result<(), RingError> {
        let shared = &*self.shared;
        if let Some(owner) = &shared.owner {
            // With `SINGLE_ISSUER`, only the submitter may register once the ring is
            // enabled (the kernel says `EEXIST`).
            if owner.enabled.load(Ordering::SeqCst) && !shared.on_owner_thread() {
                return Err(RingError::OwnedElsewhere);
            }
        }
        let ranges = fixed_buffer_ranges(memory);
        let mut table = shared.table.lock();
        if table.fixed.table_len > 0 {
            // Entries queued but not submitted name buffers by index: let the kernel take
            // them (and their buffers' references) before the slots change. One that stays
            // queued (a failed submission) may fail with `EFAULT`, which is retried without
            // a fixed buffer.
            if shared.owner.is_none() || shared.on_owner_thread() {
                let _ = shared.ring.submit();
            }
        }
        let outstanding = table.outstanding;
        let result = table.fixed.replace(&shared.ring, &ranges, outstanding);
        // The old memory (maybe all of guest RAM, or an external keep-alive) is released
        // after the lock.
        let old = match result {
            Ok(()) => {
                let memory = (!ranges.is_empty()).then(|| memory.clone());
                table.fixed.ranges = ranges;
                std::mem::replace(&mut table.fixed.memory, memory)
            }
            Err(_) => {
                table.fixed.ranges.clear();
                table.fixed.memory.take()
            }
        };
        drop(table);
        drop(old);
        result.map_err(RingError::RegisterMemory)
    }

    /// See [`BlockDeviceDisk::fixed_buffer_stats`](crate::BlockDeviceDisk::fixed_buffer_stats).
    pub(crate) fn fixed_buffer_stats(&self) -> FixedBufferStats {
        let table = self.shared.table.lock();
        FixedBufferStats {
            registered_bytes: table
                .fixed
                .ranges
                .iter()
                .map(|&(start, end)| (end - start) as u64)
                .sum(),
            requests: table.fixed.requests,
            vectored: table.fixed.vectored,
        }
    }

    /// Runs `op` with `owned` lending the memory of the bytes after the first `skip`.
    /// Resolves to the kernel's result (bytes transferred, or 0) and the memory.
    pub(crate) fn run(&self, op: Op, owned: Owned, skip: usize) -> Request<'_> {
        Request {
            ring: self,
            stage: Stage::Queued {
                op,
                owned,
                skip,
                fixed: true,
            },
        }
    }

    /// Moves `owned` into a free slot and pushes the submission entry, or registers `waker`
    /// and hands `owned` back if every slot is in use. Returns the slot, the entry's position
    /// in the submission queue, and whether its request must see it submitted (not in owner
    /// mode, where the owner submits). Reaps completions inline first, which may free a slot.
    fn start(
        &self,
        op: Op,
        mut owned: Owned,
        skip: usize,
        allow_fixed: bool,
        waker: &Waker,
    ) -> Result<(u32, u64, bool), Owned> {
        let shared = &*self.shared;
        let mut inline = InlineReap::default();
        let mut table = shared.table.lock();
        inline.reap(shared, &mut table, None);
        let Some(index) = table.free.pop() else {
            table.waiting.push_back(waker.clone());
            drop(table);
            inline.wake();
            return Err(owned);
        };
        let Table { slots, fixed, .. } = &mut *table;
        let slot = &mut slots[index as usize];
        owned.iovecs(skip, &mut slot.iovecs);
        let buffer = match op {
            Op::Read { .. } | Op::Write { .. } if allow_fixed => fixed.index_of(&slot.iovecs),
            _ => None,
        };
        let entry = op.entry(&slot.iovecs, skip, buffer).user_data(index as u64);
        shared.io_log.record(&entry);
        slot.owned = owned;
        slot.fixed = buffer.is_some();
        slot.state = SlotState::InFlight(Some(waker.clone()));
        table.outstanding += 1;
        // The entry's iovec array and the memory it points to belong to slot `index`
        // (`slot.iovecs`, `slot.owned`), which nothing modifies or frees until this entry's
        // completion has been reaped: the future only keeps the index, and a dropped future
        // abandons the slot instead of freeing it. A slot never has more than one entry and
        // there are no more slots than submission queue entries, so a full queue is not
        // expected (the owner mode's eventfd poll and timeout have entries of their own; a
        // failed push is handled below).
        // SAFETY: the entry's memory outlives it (above).
        let pushed = unsafe { table.push(&shared.ring, &entry) };
        let Ok(position) = pushed else {
            // Not expected (see above); give the slot back and retry from the executor.
            table.outstanding -= 1;
            let owned = table.release(index);
            drop(table);
            inline.wake();
            self.submit();
            waker.wake_by_ref();
            return Err(owned);
        };
        table.fixed.requests += u64::from(buffer.is_some());
        drop(table);
        inline.wake();
        if let Some(owner) = &shared.owner {
            // The owner submits when it next waits; another thread's entry wakes it.
            if !shared.on_owner_thread() {
                owner.signal.wake_by_ref();
            }
            return Ok((index, position, false));
        }
        shared.queued.fetch_add(1, Ordering::SeqCst);
        Ok((index, position, true))
    }

    /// Enters the kernel for every entry queued so far, unless another thread is doing so:
    /// that thread checks for entries queued during its call and submits them too, so
    /// concurrent submitters share one `io_uring_enter` per batch. If the kernel keeps
    /// refusing entries (see [`Ring::enter_queued`]), they stay in the submission queue and
    /// counted in `queued`; each request sees to its own entry (`Stage::Batched`), so the next
    /// poll of a request whose entry is still there tries again.
    fn submit(&self) {
        let shared = &*self.shared;
        if let Some(owner) = &shared.owner {
            // Only the owner may enter the kernel; it does so when it next waits.
            owner.signal.wake_by_ref();
            return;
        }
        loop {
            if shared.submitting.swap(true, Ordering::SeqCst) {
                return;
            }
            shared.queued.store(0, Ordering::SeqCst);
            let taken = self.enter_queued();
            if !taken {
                shared.queued.fetch_add(1, Ordering::SeqCst);
            }
            shared.submitting.store(false, Ordering::SeqCst);
            // Someone may have queued an entry after our `io_uring_enter` read the queue and
            // seen `submitting` still set; this load sees their increment.
            if !taken || shared.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Submits what the submission queue holds, and returns whether the kernel took it all.
    /// The kernel may take only part of it: `io_uring_enter` fails with `EAGAIN` (no memory
    /// for a request) or `EINTR`, or, without `SUBMIT_ALL` (before Linux 5.18), it stops
    /// after an entry it could not set up. A few more tries, yielding in between, cover the
    /// transient cases. Entries other threads push meanwhile do not count: their own
    /// `queued` increment sends this submitter round again.
    fn enter_queued(&self) -> bool {
        /// Tries before the entries are left for the next submitter.
        const TRIES: usize = 16;
        for _ in 0..TRIES {
            let waiting = self.shared.table.lock().waiting(&self.shared.ring);
            if waiting == 0 {
                return true;
            }
            // The kernel takes entries in order, at least `waiting` are offered to it, and
            // it reports how many it took.
            match self.shared.ring.submit() {
                Ok(taken) if taken >= waiting => return true,
                Ok(_) => std::thread::yield_now(),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    std::thread::yield_now();
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Submits the open batch, if a submitter has not already taken it.
    fn submit_batch(&self) {
        if self.shared.queued.load(Ordering::SeqCst) > 0 {
            self.submit();
        }
    }

    /// Whether the kernel has taken the entry at `position` (from [`Table::push`]).
    fn taken(&self, position: u64) -> bool {
        self.shared.table.lock().taken(&self.shared.ring, position)
    }

    /// Collects the result of slot `index` (and whether its entry named a fixed buffer), or
    /// records `waker`. Reaps completions inline first, so a future polled by a busy
    /// executor finds its completion without waiting for another thread to wake it.
    fn poll_slot(&self, index: u32, waker: &Waker) -> Poll<(i32, Owned, bool)> {
        let shared = &*self.shared;
        let mut inline = InlineReap::default();
        let mut table = shared.table.lock();
        inline.reap(shared, &mut table, Some(index));
        let slot = &mut table.slots[index as usize];
        let poll = match &mut slot.state {
            SlotState::Done(result) => {
                let (result, fixed) = (*result, slot.fixed);
                let owned = table.release(index);
                inline.take_waiting(&mut table);
                Poll::Ready((result, owned, fixed))
            }
            SlotState::InFlight(current) => {
                if !current.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *current = Some(waker.clone());
                }
                Poll::Pending
            }
            SlotState::Free | SlotState::Abandoned => {
                unreachable!("a request's slot is in flight or done while its future lives")
            }
        };
        drop(table);
        inline.wake();
        poll
    }

    /// The future of slot `index` is gone: free the slot if the kernel is done with it, or
    /// leave it to whoever reaps its completion.
    fn abandon(&self, index: u32) {
        let mut table = self.shared.table.lock();
        let slot = &mut table.slots[index as usize];
        match slot.state {
            SlotState::Done(_) => {
                let owned = table.release(index);
                let waiting = std::mem::take(&mut table.waiting);
                drop(table);
                drop(owned);
                waiting.into_iter().for_each(Waker::wake);
            }
            SlotState::InFlight(_) => slot.state = SlotState::Abandoned,
            SlotState::Free | SlotState::Abandoned => {
                unreachable!("a request's slot is in flight or done while its future lives")
            }
        }
    }
}

/// Runs futures on the thread that owns a [`Completions::Owner`] ring; see
/// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver). Not `Send`: it belongs to
/// the owner thread.
pub struct OwnerDriver {
    shared: Arc<Shared>,
    /// [`Shared::reap_all`]'s scratch space, kept from one `block_on` to the next.
    scratch: Cell<(Vec<Waker>, Vec<Owned>)>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for OwnerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerDriver")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl OwnerDriver {
    /// Runs `future` to completion on this thread. While it is pending and not woken, the
    /// thread submits the entries the disk's futures queued and waits for a completion in
    /// one `io_uring_enter`, then reaps the completions and wakes their futures. A waker
    /// called from another thread interrupts the wait through an eventfd polled in the ring.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let shared = &*self.shared;
        let Some(owner) = &shared.owner else {
            unreachable!("a driver exists only in owner mode");
        };
        let signal = &owner.signal;
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        // A nested `block_on` (from within `future`) finds it empty and grows its own.
        let (mut wakers, mut freed) = self.scratch.take();
        loop {
            signal.woken.store(false, Ordering::SeqCst);
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                self.scratch.set((wakers, freed));
                return output;
            }
            while !signal.woken.load(Ordering::SeqCst) {
                shared.owner_wait(signal);
                shared.reap_all(&mut wakers, &mut freed);
            }
        }
    }
}

/// What one inline reap found: wakers to call once the table lock is released.
#[derive(Default)]
struct InlineReap {
    wakers: SmallVec<[Waker; INLINE_REAP]>,
    /// Futures that were waiting for a free slot (empty unless a slot was freed).
    waiting: VecDeque<Waker>,
}

impl InlineReap {
    /// Reaps up to [`INLINE_REAP`] completions; the waker of slot `own` (the caller's) is
    /// not kept, since its future is being polled. Memory of abandoned slots is freed under
    /// the lock (it is only dropped: an `Arc` and a small vector, or a bounce buffer).
    fn reap(&mut self, shared: &Shared, table: &mut MutexGuard<'_, Table>, own: Option<u32>) {
        let wakers = &mut self.wakers;
        if shared.reap(
            table,
            INLINE_REAP,
            |index, waker| {
                if Some(index) != own {
                    wakers.push(waker);
                }
            },
            drop,
        ) {
            self.take_waiting(table);
        }
    }

    /// Takes the futures waiting for a free slot, to wake them: one was freed.
    fn take_waiting(&mut self, table: &mut Table) {
        if self.waiting.is_empty() {
            std::mem::swap(&mut self.waiting, &mut table.waiting);
        } else {
            self.waiting.append(&mut table.waiting);
        }
    }

    /// Wakes what was found; call without the table lock.
    fn wake(self) {
        self.wakers.into_iter().for_each(Waker::wake);
        self.waiting.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let shared = &*self.shared;
        let thread = {
            let mut thread = shared.thread.lock();
            shared.stopping.store(true, Ordering::SeqCst);
            thread.take()
        };
        // The task may be mid-reap on another thread; that is fine, reaping is shared.
        #[cfg(feature = "tokio")]
        if let Some(reactor) = self.reactor.take() {
            reactor.abort();
        }
        if let Some(owner) = &shared.owner {
            match owner.thread.get() {
                // Never enabled: nothing was ever submitted.
                _ if !owner.enabled.load(Ordering::SeqCst) => {}
                None => {}
                Some(thread) if *thread == std::thread::current().id() => {
                    let (mut wakers, mut freed) = shared.scratch();
                    while !shared.reap_all(&mut wakers, &mut freed) {
                        owner.signal.woken.store(false, Ordering::SeqCst);
                        shared.owner_wait(&owner.signal);
                    }
                }
                // Only the owner can run the completions' task work. If requests are
                // outstanding, leak the ring and their memory rather than free memory the
                // kernel may still write.
                Some(_) if shared.table.lock().outstanding > 0 => {
                    std::mem::forget(self.shared.clone());
                }
                Some(_) => {}
            }
            return;
        }
        let Some(thread) = thread else {
            // No completion thread (tokio mode): wait for the outstanding completions here,
            // so no memory the kernel may use is freed before the kernel is done with it.
            let (mut wakers, mut freed) = shared.scratch();
            while !shared.reap_all(&mut wakers, &mut freed) {
                shared.wait();
            }
            return;
        };
        // Wake the completion thread with a no-op; it leaves once every abandoned request's
        // completion has arrived, so no buffer the kernel may use is freed before that.
        let nop = opcode::Nop::new().build().user_data(WAKE_TOKEN);
        loop {
            let mut table = shared.table.lock();
            // SAFETY: a no-op references no memory.
            let pushed = unsafe { table.push(&shared.ring, &nop) };
            drop(table);
            if pushed.is_ok() {
                break;
            }
            // The queue holds entries an earlier failed `io_uring_enter` left behind.
            let _ = shared.ring.submit();
        }
        loop {
            match shared.ring.submit() {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                _ => break,
            }
        }
        // The completion thread does not panic; if it did, there is nothing to add.
        let _ = thread.join();
    }
}

/// Reaps completions until the ring stops and nothing is outstanding.
fn completion_thread(shared: &Shared) {
    let (mut wakers, mut freed) = shared.scratch();
    loop {
        if !shared.spin.is_zero() && spin_for_completion(shared) {
            // A completion arrived while spinning: reap it without sleeping.
        } else {
            shared.wait();
        }
        if shared.reap_all(&mut wakers, &mut freed) {
            return;
        }
    }
}

/// With one or two requests outstanding, where the wake-up of this thread is a large part of
/// a request's latency, polls the completion queue for up to `shared.spin` instead of
/// sleeping. Returns whether a completion is ready. Deeper queues do not spin: completions
/// arrive in batches there, and the spinning would take a core from the submitters.
fn spin_for_completion(shared: &Shared) -> bool {
    if !(1..=2).contains(&shared.table.lock().outstanding) {
        return false;
    }
    let start = Instant::now();
    loop {
        // A future holding the lock is reaping inline; look again.
        if let Some(table) = shared.table.try_lock() {
            // SAFETY: the completion queue is only read with the table lock held; the
            // queue is only inspected here, not consumed.
            let ready = !unsafe { shared.ring.completion_shared() }.is_empty();
            if ready || table.outstanding == 0 {
                return ready;
            }
        }
        if start.elapsed() >= shared.spin {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// [`Completions::Tokio`]: a task on the runtime reaps completions when the eventfd registered
/// with the ring becomes readable.
#[cfg(feature = "tokio")]
mod reactor {
    use super::{RingError, Shared};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// Registers an eventfd with the ring and spawns the task that waits for it on the
    /// current tokio runtime.
    pub(super) fn spawn(shared: &Arc<Shared>) -> Result<tokio::task::AbortHandle, RingError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RingError::NoRuntime)?;
        // SAFETY: `eventfd` takes no pointers; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(RingError::EventFd(std::io::Error::last_os_error()));
        }
        // SAFETY: see above: `fd` is open and owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let _context = runtime.enter();
        // Registering with a runtime whose I/O driver is disabled panics inside tokio; that
        // is a configuration error the caller gets as one.
        let fd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, referring to
            // the same eventfd, for as long as it lives inside the `AsyncFd`.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        }))
        .map_err(|_| RingError::NoRuntime)?
        .map_err(|e| RingError::EventFd(e.into()))?;
        // The ring signals the eventfd for every completion it posts from now on.
        shared
            .ring
            .submitter()
            .register_eventfd(fd.get_ref().as_raw_fd())
            .map_err(RingError::EventFd)?;
        // The guard lives in the task's future from the start, so it also fires if the task
        // is dropped without ever being polled.
        let take_over = TakeOver(shared.clone());
        let task = run(shared.clone(), fd);
        Ok(runtime
            .spawn(async move {
                let _take_over = take_over;
                task.await;
            })
            .abort_handle())
    }

    /// Starts a completion thread when the task ends without the ring stopping: its runtime
    /// shut down (or the eventfd failed), and the futures still need their completions.
    /// (When the ring is stopping, `start_thread` does nothing.)
    struct TakeOver(Arc<Shared>);

    impl Drop for TakeOver {
        fn drop(&mut self) {
            // If no thread can be started, futures polled later still reap inline, and the
            // ring's drop reaps whatever is left.
            let _ = self.0.start_thread();
        }
    }

    async fn run(shared: Arc<Shared>, fd: AsyncFd<OwnedFd>) {
        let (mut wakers, mut freed) = shared.scratch();
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            // Clear the readiness before reading the counter and the queue: a completion
            // posted after this point signals the eventfd again and so wakes this task again.
            ready.clear_ready();
            let mut count = [0u8; 8];
            // SAFETY: `count` is a live, writable 8-byte buffer; reading an eventfd resets its
            // counter. With `EFD_NONBLOCK` this fails with `EAGAIN` when it is already zero,
            // which is fine: the queue is read below either way.
            let _ = unsafe {
                libc::read(
                    fd.get_ref().as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    count.len(),
                )
            };
            if shared.reap_all(&mut wakers, &mut freed) {
                return;
            }
        }
    }
}

/// The future of one ring operation; see [`Ring::run`].
#[derive(Debug)]
pub(crate) struct Request<'a> {
    ring: &'a Ring,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Queued {
        op: Op,
        owned: Owned,
        skip: usize,
        /// May name a fixed buffer (not on the retry after `EFAULT`).
        fixed: bool,
    },
    /// Pushed into a batch that may not be submitted yet.
    Batched(Pushed),
    InFlight(Pushed),
    Finished,
}

/// A request whose entry is pushed: its slot, its position in the submission queue, and
/// what a retry needs.
#[derive(Debug, Clone, Copy)]
struct Pushed {
    index: u32,
    position: u64,
    op: Op,
    skip: usize,
}

impl Future for Request<'_> {
    type Output = (io::Result<u32>, Owned);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.stage, Stage::Finished) {
            Stage::Queued {
                op,
                owned,
                skip,
                fixed,
            } => {
                match this.ring.start(op, owned, skip, fixed, cx.waker()) {
                    // The entry does not enter the kernel yet: the request asks to be
                    // polled again, so that the requests the executor polls meanwhile (the
                    // rest of a queue refill) join the batch; the first of them polled again
                    // submits them all with one `io_uring_enter`, the others find their
                    // entries taken. Every request answers for its own entry rather than
                    // leaving it to another: a caller may hold the first without polling it
                    // (a future kept across a `select!` loop) while it awaits the others, and
                    // a submitter may fail, or be dropped, after another request left its
                    // entry to it.
                    Ok((index, position, batched)) => {
                        let pushed = Pushed {
                            index,
                            position,
                            op,
                            skip,
                        };
                        if batched {
                            this.stage = Stage::Batched(pushed);
                            cx.waker().wake_by_ref();
                        } else {
                            this.stage = Stage::InFlight(pushed);
                        }
                    }
                    Err(owned) => {
                        this.stage = Stage::Queued {
                            op,
                            owned,
                            skip,
                            fixed,
                        }
                    }
                }
                Poll::Pending
            }
            Stage::Batched(pushed) => {
                // Nothing to do if another request submitted the batch already.
                this.ring.submit_batch();
                if !this.ring.taken(pushed.position) {
                    // Another thread is submitting, or the kernel refused the entry for now:
                    // look again on the next poll, which nothing else may bring.
                    this.stage = Stage::Batched(pushed);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.stage = Stage::InFlight(pushed);
                Pin::new(this).poll(cx)
            }
            Stage::InFlight(pushed) => match this.ring.poll_slot(pushed.index, cx.waker()) {
                // The buffer an entry names is looked up when the kernel takes the entry:
                // one queued across a new registration may find other memory there and
                // fail. Once more without a fixed buffer.
                Poll::Ready((result, owned, true)) if result == -libc::EFAULT => {
                    this.stage = Stage::Queued {
                        op: pushed.op,
                        owned,
                        skip: pushed.skip,
                        fixed: false,
                    };
                    Pin::new(this).poll(cx)
                }
                Poll::Ready((result, owned, _)) => {
                    let result = if result < 0 {
                        Err(io::Error::from_raw_os_error(-result))
                    } else {
                        Ok(result as u32)
                    };
                    Poll::Ready((result, owned))
                }
                Poll::Pending => {
                    this.stage = Stage::InFlight(pushed);
                    Poll::Pending
                }
            },
            Stage::Finished => panic!("request polled after completion"),
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        match self.stage {
            Stage::Batched(pushed) => {
                // The batch may still hold this entry, and other requests' entries.
                self.ring.submit_batch();
                self.ring.abandon(pushed.index);
            }
            Stage::InFlight(pushed) => self.ring.abandon(pushed.index),
            Stage::Queued { .. } | Stage::Finished => {}
        }
    }
}

#[cfg(test)]
mod tests {
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

    /// Whether `ring` waits for batches (multishot timeouts, Linux 6.4); says so if not.
    fn batching(ring: &Ring) -> bool {
        let batching = ring
            .shared
            .owner
            .as_ref()
            .unwrap()
            .batching
            .load(Ordering::Relaxed);
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
        let owner = ring.shared.owner.as_ref().unwrap();
        assert!(owner.timer_armed.load(Ordering::Relaxed));
        let (wake, woken) = futures::channel::oneshot::channel::<()>();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            wake.send(()).unwrap();
        });
        driver.block_on(woken).unwrap();
        waker.join().unwrap();
        assert!(
            !owner.timer_armed.load(Ordering::Relaxed),
            "the timeout is removed"
        );
        assert!(!owner.timer_removing.load(Ordering::Relaxed));
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
        let owner = ring.shared.owner.as_ref().unwrap();
        assert!(
            !owner.timer_armed.load(Ordering::Relaxed),
            "no batched wait"
        );
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
            let owner = ring.shared.owner.as_ref().unwrap();
            assert_eq!(owner.timer_armed.load(Ordering::Relaxed), batching);
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
            let entry = op.entry(iovecs, 0, fixed);
            assert_eq!(entry.get_opcode(), u32::from(code), "{op:?} {fixed:?}");
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
        let discarded =
            unsafe { libc::madvise(host.as_ptr().cast(), host.len(), libc::MADV_DONTNEED) };
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
}
