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
//! a [`Slot`](table::Slot) of the table before its submission entry is pushed, and stay there until the
//! kernel's completion for that slot has been reaped. The future only holds the slot's
//! index. If the future is dropped first, the slot is marked abandoned and whoever reaps its
//! completion frees the buffers, so memory the kernel may still write is never freed or
//! handed back early. Dropping the ring waits for every outstanding completion.
//!
//! # Layout
//!
//! - `setup`: building the ring, probing the kernel, [`RingError`].
//! - `op`: the operations and the memory a request lends the kernel.
//! - `table`: the slots of the requests in flight.
//! - `fixed`: guest memory registered as fixed buffers.
//! - `submit`: pushing entries and entering the kernel in batches.
//! - `completion`: one module per completion strategy ([`Completions`]).
//! - `request`: the future of one operation.

mod completion;
mod fixed;
mod op;
mod request;
mod setup;
mod submit;
mod table;
#[cfg(test)]
mod tests;

pub use completion::Completions;
pub(crate) use completion::io_thread::ThreadRing;
pub use completion::owner::OwnerDriver;
pub use fixed::FixedBufferStats;
pub(crate) use op::{Op, Owned};
pub(crate) use request::Request;
pub(crate) use setup::FILE_OPCODES;
pub use setup::RingError;

use completion::owner::OwnerState;
use io_uring::{IoUring, opcode, types};
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::Duration;
use table::{SlotState, Table};

/// `user_data` of the no-op that wakes the completion thread at shutdown; never a slot index.
const WAKE_TOKEN: u64 = u64::MAX;

/// Most completions a future reaps inline at once: their wakers wait on the stack until the
/// table lock is released. The rest stay queued for the next reaper.
const INLINE_REAP: usize = 32;

/// How long a thread waiting for completions sleeps at most before it looks at the table
/// again. Waits normally end with a completion; the timeout only bounds a race at shutdown
/// with another reaper that consumed the completion the waiter was woken for.
const WAIT_TIMEOUT: Duration = Duration::from_millis(100);

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
            let more = io_uring::cqueue::more(cqe.flags());
            if let Some(owner) = table.owner.as_mut()
                && owner.complete(token, cqe.result(), more)
            {
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
    /// The submission entries recorded since the last call (feature `io-log`).
    #[cfg(feature = "io-log")]
    pub(crate) fn take_io_log(&self) -> Vec<crate::io_log::Submission> {
        self.shared.io_log.take()
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
