//! The io_uring of one disk: a table of requests in flight, batched submission, and a
//! completion thread that wakes the requests' futures.
//!
//! # Who owns the memory the kernel uses
//!
//! A request's buffers (locked guest pages or a bounce buffer) and its iovec array move into
//! a [`Slot`] of the table before its submission entry is pushed, and stay there until the
//! kernel's completion for that slot has been reaped. The future only holds the slot's
//! index. If the future is dropped first, the slot is marked abandoned and the completion
//! thread frees the buffers when the completion arrives, so memory the kernel may still
//! write is never freed or handed back early. Dropping the ring waits for every outstanding
//! completion before the ring and the table are freed.

use io_uring::{IoUring, Probe, opcode, types};
use parking_lot::Mutex;
use request_buffers::{BounceBuffer, IoBuffer, LockedIoBuffers};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
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

/// The opcodes a disk needs, checked with `IORING_REGISTER_PROBE` when the ring is built.
pub(crate) const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Readv::CODE, "IORING_OP_READV"),
    (opcode::Writev::CODE, "IORING_OP_WRITEV"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Nop::CODE, "IORING_OP_NOP"),
];

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
}

#[derive(Debug)]
struct Table {
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// Slots the kernel still owns (in flight or abandoned).
    outstanding: usize,
    /// Futures waiting for a free slot; all are woken when one frees (a waiter may have been
    /// dropped, so waking only one could strand the others).
    waiting: VecDeque<Waker>,
}

impl Table {
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
    /// Set when the disk is dropped: the completion thread exits once nothing is
    /// outstanding.
    stopping: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("table", &self.table)
            .field("queued", &self.queued)
            .field("submitting", &self.submitting)
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

/// An io_uring over one file, with its completion thread.
#[derive(Debug)]
pub(crate) struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// A ring of `entries` slots over `fd`, which must stay open for the ring's lifetime.
    /// Fails if io_uring is unavailable or lacks one of `opcodes`.
    pub(crate) fn new(
        fd: RawFd,
        entries: u32,
        opcodes: &[(u8, &'static str)],
        completion_spin: Duration,
    ) -> Result<Self, RingError> {
        let ring = IoUring::builder()
            // The completion queue is twice the slots, so it can never overflow.
            .setup_cqsize(entries * 2)
            // Not COOP_TASKRUN: it made no measurable difference (benchmarks.md), and it would
            // hold back the completions of a submitter that computes without entering the
            // kernel.
            .build(entries)
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
        // A registered file saves the kernel a descriptor lookup and reference per request.
        ring.submitter()
            .register_files(&[fd])
            .map_err(RingError::Register)?;
        let slots = ring.params().sq_entries();
        let table = Table {
            slots: (0..slots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    owned: Owned::None,
                    iovecs: Vec::new(),
                })
                .collect(),
            free: (0..slots).rev().collect(),
            outstanding: 0,
            waiting: VecDeque::new(),
        };
        let shared = Arc::new(Shared {
            ring,
            table: Mutex::new(table),
            queued: AtomicUsize::new(0),
            submitting: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name("disk-uring".into())
            .spawn({
                let shared = shared.clone();
                move || completion_thread(&shared, completion_spin)
            })
            .map_err(RingError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `op` with `owned` lending the memory of the bytes after the first `skip`.
    /// Resolves to the kernel's result (bytes transferred, or 0) and the memory.
    pub(crate) fn run(&self, op: Op, owned: Owned, skip: usize) -> Request<'_> {
        Request {
            ring: self,
            stage: Stage::Queued { op, owned, skip },
        }
    }

    /// Moves `owned` into a free slot and pushes the submission entry, or registers `waker`
    /// and hands `owned` back if every slot is in use. Returns the slot and whether this
    /// entry opened a batch (its request must see that the batch gets submitted).
    fn start(
        &self,
        op: Op,
        mut owned: Owned,
        skip: usize,
        waker: &Waker,
    ) -> Result<(u32, bool), Owned> {
        let shared = &*self.shared;
        let mut table = shared.table.lock();
        let Some(index) = table.free.pop() else {
            table.waiting.push_back(waker.clone());
            return Err(owned);
        };
        let slot = &mut table.slots[index as usize];
        owned.iovecs(skip, &mut slot.iovecs);
        let iovecs = slot.iovecs.as_ptr().cast::<libc::iovec>();
        let iovec_count = slot.iovecs.len() as u32;
        let fd = types::Fixed(0);
        let entry = match op {
            Op::Read { offset } => opcode::Readv::new(fd, iovecs, iovec_count)
                .offset(offset + skip as u64)
                .build(),
            Op::Write { offset, dsync } => opcode::Writev::new(fd, iovecs, iovec_count)
                .offset(offset + skip as u64)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(index as u64);
        slot.owned = owned;
        slot.state = SlotState::InFlight(Some(waker.clone()));
        table.outstanding += 1;
        // SAFETY: the table lock serializes every producer of the submission queue, so this
        // is the only `SubmissionQueue` alive. The entry's iovec array and the memory it
        // points to belong to slot `index` (`slot.iovecs`, `slot.owned`), which nothing
        // modifies or frees until the completion thread has reaped this entry's completion:
        // the future only keeps the index, and a dropped future abandons the slot instead
        // of freeing it. A slot never has more than one entry, and there are no more slots
        // than submission queue entries, so the push cannot fail for lack of space while
        // entries are only pushed here and consumed by `io_uring_enter`.
        let pushed = unsafe { shared.ring.submission_shared().push(&entry) };
        if pushed.is_err() {
            // Not expected (see above); give the slot back and retry from the executor.
            table.outstanding -= 1;
            let owned = table.release(index);
            drop(table);
            self.submit();
            waker.wake_by_ref();
            return Err(owned);
        }
        drop(table);
        let leader = shared.queued.fetch_add(1, Ordering::SeqCst) == 0;
        Ok((index, leader))
    }

    /// Enters the kernel for every entry queued so far, unless another thread is doing so:
    /// that thread checks for entries queued during its call and submits them too, so
    /// concurrent submitters share one `io_uring_enter` per batch.
    fn submit(&self) {
        let shared = &*self.shared;
        loop {
            if shared.submitting.swap(true, Ordering::SeqCst) {
                return;
            }
            shared.queued.store(0, Ordering::SeqCst);
            // A failure (`EAGAIN`, `EBUSY`, `EINTR`) leaves the entries queued; the next
            // submitter or the completion thread's next `io_uring_enter` submits them.
            let _ = shared.ring.submit();
            shared.submitting.store(false, Ordering::SeqCst);
            // Someone may have queued an entry after our `io_uring_enter` read the queue and
            // seen `submitting` still set; this load sees their increment.
            if shared.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Submits the open batch, if a submitter has not already taken it.
    fn submit_batch(&self) {
        if self.shared.queued.load(Ordering::SeqCst) > 0 {
            self.submit();
        }
    }

    /// Collects the result of slot `index`, or records `waker`.
    fn poll_slot(&self, index: u32, waker: &Waker) -> Poll<(i32, Owned)> {
        let mut table = self.shared.table.lock();
        let slot = &mut table.slots[index as usize];
        match &mut slot.state {
            SlotState::Done(result) => {
                let result = *result;
                let owned = table.release(index);
                let waiting = std::mem::take(&mut table.waiting);
                drop(table);
                waiting.into_iter().for_each(Waker::wake);
                Poll::Ready((result, owned))
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
        }
    }

    /// The future of slot `index` is gone: free the slot if the kernel is done with it, or
    /// leave it to the completion thread.
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

impl Drop for Ring {
    fn drop(&mut self) {
        let shared = &*self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        // Wake the completion thread with a no-op; it leaves once every abandoned request's
        // completion has arrived, so no buffer the kernel may use is freed before that.
        let nop = opcode::Nop::new().build().user_data(WAKE_TOKEN);
        loop {
            let table = shared.table.lock();
            // SAFETY: the table lock makes this the only `SubmissionQueue`; a no-op
            // references no memory.
            let pushed = unsafe { shared.ring.submission_shared().push(&nop) };
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
        if let Some(thread) = self.thread.take() {
            // The completion thread does not panic; if it did, there is nothing to add.
            let _ = thread.join();
        }
    }
}

/// Reaps completions until the ring stops and nothing is outstanding.
fn completion_thread(shared: &Shared, spin: Duration) {
    let mut wakers: Vec<Waker> = Vec::new();
    let mut freed: Vec<Owned> = Vec::new();
    loop {
        if !spin.is_zero() && spin_for_completion(shared, spin) {
            // A completion arrived while spinning: reap it without sleeping.
        } else if let Err(e) = shared.ring.submit_and_wait(1) {
            // Waiting also submits whatever a failed submitter left queued.
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                // Not expected from a valid ring; back off rather than spin.
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let mut table = shared.table.lock();
        let mut slot_freed = false;
        // SAFETY: this thread is the only one that reads the completion queue.
        let completions = unsafe { shared.ring.completion_shared() };
        for cqe in completions {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                continue;
            }
            let index = token as u32;
            table.outstanding -= 1;
            let slot = &mut table.slots[index as usize];
            match std::mem::replace(&mut slot.state, SlotState::Done(cqe.result())) {
                SlotState::InFlight(waker) => wakers.extend(waker),
                SlotState::Abandoned => {
                    freed.push(table.release(index));
                    slot_freed = true;
                }
                SlotState::Free | SlotState::Done(_) => {
                    unreachable!("a completion for a slot that was not in flight")
                }
            }
        }
        if slot_freed {
            wakers.extend(table.waiting.drain(..));
        }
        let exit = shared.stopping.load(Ordering::SeqCst) && table.outstanding == 0;
        drop(table);
        // The kernel is done with these; free them outside the lock.
        freed.clear();
        wakers.drain(..).for_each(Waker::wake);
        if exit {
            return;
        }
    }
}

/// With one or two requests outstanding, where the wake-up of this thread is a large part of
/// a request's latency, polls the completion queue for up to `spin` instead of sleeping.
/// Returns whether a completion is ready. Deeper queues do not spin: completions arrive in
/// batches there, and the spinning would take a core from the submitters.
fn spin_for_completion(shared: &Shared, spin: Duration) -> bool {
    if !(1..=2).contains(&shared.table.lock().outstanding) {
        return false;
    }
    let start = Instant::now();
    loop {
        // SAFETY: this thread is the only one that reads the completion queue; the queue
        // is only inspected here, not consumed.
        if !unsafe { shared.ring.completion_shared() }.is_empty() {
            return true;
        }
        if start.elapsed() >= spin {
            return false;
        }
        std::hint::spin_loop();
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
    },
    /// Pushed as the first entry of a batch, not yet submitted.
    Leading(u32),
    InFlight(u32),
    Finished,
}

impl Future for Request<'_> {
    type Output = (io::Result<u32>, Owned);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.stage, Stage::Finished) {
            Stage::Queued { op, owned, skip } => {
                match this.ring.start(op, owned, skip, cx.waker()) {
                    // The first entry of a batch does not enter the kernel yet: it asks to
                    // be polled again, so that the requests the executor polls meanwhile
                    // (the rest of a queue refill) join the batch, and then submits them
                    // all with one `io_uring_enter`. Later entries leave it to the leader.
                    Ok((index, true)) => {
                        this.stage = Stage::Leading(index);
                        cx.waker().wake_by_ref();
                    }
                    Ok((index, false)) => this.stage = Stage::InFlight(index),
                    Err(owned) => this.stage = Stage::Queued { op, owned, skip },
                }
                Poll::Pending
            }
            Stage::Leading(index) => {
                this.ring.submit_batch();
                this.stage = Stage::InFlight(index);
                Pin::new(this).poll(cx)
            }
            Stage::InFlight(index) => match this.ring.poll_slot(index, cx.waker()) {
                Poll::Ready((result, owned)) => {
                    let result = if result < 0 {
                        Err(io::Error::from_raw_os_error(-result))
                    } else {
                        Ok(result as u32)
                    };
                    Poll::Ready((result, owned))
                }
                Poll::Pending => {
                    this.stage = Stage::InFlight(index);
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
            Stage::Leading(index) => {
                // Other requests may be waiting for this batch to be submitted.
                self.ring.submit_batch();
                self.ring.abandon(index);
            }
            Stage::InFlight(index) => self.ring.abandon(index),
            Stage::Queued { .. } | Stage::Finished => {}
        }
    }
}
