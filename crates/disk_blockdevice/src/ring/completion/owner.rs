//! [`Completions::Owner`](crate::Completions::Owner): the thread that submits reaps, in one `io_uring_enter`.

use crate::ring::setup::kernel_at_least;
use crate::ring::{Owned, Ring, RingError, Shared, WAIT_TIMEOUT};
use io_uring::{opcode, types};
use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// In [`Completions::Owner`](crate::Completions::Owner) mode with many requests in flight, the owner waits for this
/// fraction of them to complete (a quarter) before it wakes ...
pub(in crate::ring) const OWNER_BATCH_DIVISOR: usize = 4;

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
pub(in crate::ring) const OWNER_WAIT_BOUND: Duration = Duration::from_millis(1);

/// Multishot timeouts came with Linux 6.4; before, the owner wakes for every completion.
pub(in crate::ring) const MULTISHOT_TIMEOUT_KERNEL: (u32, u32) = (6, 4);

/// `user_data` of the timeout request of [`OWNER_WAIT_BOUND`]; never a slot index.
pub(in crate::ring) const TIMER_TOKEN: u64 = u64::MAX - 2;

/// `user_data` of the request that removes it; never a slot index.
pub(in crate::ring) const TIMER_REMOVE_TOKEN: u64 = u64::MAX - 3;

/// The shortest poll window of the owner: halving a window below this stops polling (see
/// [`adapt_poll_window`]).
pub(in crate::ring) const POLL_MIN: Duration = Duration::from_micros(2);

/// The owner's next poll window, after a wait that polling did not catch and that took
/// `waited` in all, polling `window` first: the whole of `max` if the completion came
/// within it (polling that long would have caught it), half of `window` if it took longer
/// (down to nothing, for a device slower than `max`, where polling only burns a core).
/// Halving rather than stopping at once keeps one slow request from costing the next ones
/// their polling; growing at once rather than step by step (QEMU's event loop doubles its
/// `poll-ns`) catches the very next completion: measured at queue depth 1 at memory speed,
/// doubling from 4 µs and stopping after a slow request gave 1.07× fio's latency, this
/// 0.8 to 0.9× (`docs/benchmarks.md`).
pub(in crate::ring) fn adapt_poll_window(
    window: Duration,
    waited: Duration,
    max: Duration,
) -> Duration {
    if waited <= max {
        max
    } else if window / 2 >= POLL_MIN {
        window / 2
    } else {
        Duration::ZERO
    }
}

/// `user_data` of the multishot poll on the eventfd of [`Completions::Owner`](crate::Completions::Owner); never a slot
/// index.
pub(in crate::ring) const EVENT_TOKEN: u64 = u64::MAX - 1;

/// The state of [`Completions::Owner`](crate::Completions::Owner) mode.
#[derive(Debug)]
pub(in crate::ring) struct OwnerState {
    /// Wakes the owner; also the waker of the futures it runs.
    pub(in crate::ring) signal: Arc<Signal>,
    /// The owning thread, once claimed.
    pub(in crate::ring) thread: OnceLock<ThreadId>,
    /// Whether the owner has enabled the ring (`IORING_REGISTER_ENABLE_RINGS`): nothing is
    /// submitted before.
    pub(in crate::ring) enabled: AtomicBool,
    /// How long the owner polls before it sleeps, in nanoseconds, at most `completion_spin`
    /// (see [`adapt_poll_window`]).
    pub(in crate::ring) poll_window: AtomicU64,
    /// Its period; the kernel reads it when the request is submitted, by the owner thread
    /// during its wait, while `Shared` (and so this field) lives.
    pub(in crate::ring) tick: types::Timespec,
}

/// The requests an owner-mode ring keeps in flight for its owner, the multishot poll of the
/// eventfd and the [`OWNER_WAIT_BOUND`] timeout, and what their completions said. It lives in
/// the table ([`Table::owner`](crate::ring::table::Table::owner)): whoever reaps a completion
/// updates it, under the table lock, and the owner reads it there before it waits.
#[derive(Debug)]
pub(in crate::ring) struct OwnerRequests {
    /// The eventfd poll is not armed (at first, or its multishot ended): arm it before the
    /// next wait.
    pub(in crate::ring) poll_unarmed: bool,
    /// The eventfd poll fired since the owner last drained the counter.
    pub(in crate::ring) event: bool,
    /// The kernel has multishot timeouts, so the owner may wait for batches.
    pub(in crate::ring) batching: bool,
    /// The timeout request is in flight (until its last completion).
    pub(in crate::ring) timer_armed: bool,
    /// Its removal was pushed and has not completed yet.
    pub(in crate::ring) timer_removing: bool,
}

impl OwnerRequests {
    /// Nothing armed yet; batching where the kernel has multishot timeouts.
    pub(in crate::ring) fn new() -> Self {
        Self {
            poll_unarmed: true,
            event: false,
            batching: kernel_at_least(MULTISHOT_TIMEOUT_KERNEL),
            timer_armed: false,
            timer_removing: false,
        }
    }

    /// Takes the completion of the request `token` (its `result`, and whether a multishot
    /// request stays armed) if it is one of the owner's; returns whether it was.
    pub(in crate::ring) fn complete(&mut self, token: u64, result: i32, more: bool) -> bool {
        match token {
            TIMER_REMOVE_TOKEN => self.timer_removing = false,
            TIMER_TOKEN if !more => {
                // Its last completion: removed, or refused (a kernel without multishot
                // timeouts despite its version: stop batching).
                self.timer_armed = false;
                if result == -libc::EINVAL {
                    self.batching = false;
                }
            }
            TIMER_TOKEN => {}
            EVENT_TOKEN => {
                self.event = true;
                if !more {
                    self.poll_unarmed = true;
                }
            }
            _ => return false,
        }
        true
    }
}

/// How the owner thread is woken: a flag it checks before it waits, and an eventfd polled
/// in the ring to interrupt a wait in `io_uring_enter`.
#[derive(Debug)]
pub(in crate::ring) struct Signal {
    pub(in crate::ring) eventfd: OwnedFd,
    /// Something to do: poll the future again, or submit entries other threads queued.
    pub(in crate::ring) woken: AtomicBool,
    /// The owner is (about to be) in `io_uring_enter`.
    pub(in crate::ring) parked: AtomicBool,
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

impl Shared {
    /// Whether the calling thread owns the ring ([`Completions::Owner`](crate::Completions::Owner)).
    pub(in crate::ring) fn on_owner_thread(&self) -> bool {
        self.owner
            .as_ref()
            .and_then(|owner| owner.thread.get())
            .is_some_and(|thread| *thread == std::thread::current().id())
    }

    /// The owner's wait ([`Completions::Owner`](crate::Completions::Owner), on the owner thread): arms the eventfd poll
    /// if needed, then unless `signal` was woken, submits everything queued and waits for a
    /// completion in one `io_uring_enter`, which also runs the completions' task work here.
    pub(in crate::ring) fn owner_wait(&self, signal: &Signal) {
        let Some(owner) = &self.owner else {
            return;
        };
        let mut table = self.table.lock();
        let Some(requests) = table.owner.as_mut() else {
            return;
        };
        if requests.poll_unarmed {
            let poll =
                opcode::PollAdd::new(types::Fd(signal.eventfd.as_raw_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(EVENT_TOKEN);
            // An entry beyond the slots is kept free for the poll (two more for the timeout).
            // SAFETY: the poll references no memory, only the eventfd, which the kernel holds
            // a reference to.
            let pushed = unsafe { table.push(&self.ring, &poll) };
            // If the push failed (not expected), the next wait tries again.
            table.owner.as_mut().expect("owner mode").poll_unarmed = pushed.is_err();
        }
        let outstanding = table.outstanding;
        let batching = table.owner.as_ref().is_some_and(|r| r.batching);
        drop(table);
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
            let want = if caught || !batching {
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
        let fired = self
            .table
            .lock()
            .owner
            .as_mut()
            .is_some_and(|r| std::mem::take(&mut r.event));
        if fired {
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
    pub(in crate::ring) fn owner_timer(
        &self,
        owner: &OwnerState,
        outstanding: usize,
        want: usize,
    ) -> usize {
        let mut table = self.table.lock();
        let Some(requests) = table.owner.as_ref() else {
            return want;
        };
        if want > 1 && !requests.timer_armed {
            let timeout = opcode::Timeout::new(&raw const owner.tick)
                .flags(types::TimeoutFlags::MULTISHOT)
                .build()
                .user_data(TIMER_TOKEN);
            // Entries beyond the slots are kept free for the timeout and its removal.
            // SAFETY: the kernel copies `owner.tick` (alive as long as `self`) when the owner
            // submits the entry.
            let pushed = unsafe { table.push(&self.ring, &timeout) };
            table.owner.as_mut().expect("owner mode").timer_armed = pushed.is_ok();
            if pushed.is_err() {
                // Not expected; without the bound, do not wait for a batch.
                return 1;
            }
        } else if outstanding == 0 && requests.timer_armed && !requests.timer_removing {
            // Idle: stop the timer, which would otherwise wake the owner every period.
            let remove = opcode::TimeoutRemove::new(TIMER_TOKEN)
                .build()
                .user_data(TIMER_REMOVE_TOKEN);
            // SAFETY: the entry references no memory. An entry beyond the slots is kept free
            // for it.
            let pushed = unsafe { table.push(&self.ring, &remove) };
            // If the push failed (not expected), the next idle wait tries again.
            table.owner.as_mut().expect("owner mode").timer_removing = pushed.is_ok();
        }
        want
    }

    /// Polls for the completions' task work, after submitting what is queued, until one is
    /// there, another thread wakes the owner, or `window` has passed since `start`. Returns
    /// whether a completion was found.
    pub(in crate::ring) fn owner_poll(
        &self,
        signal: &Signal,
        start: Instant,
        window: Duration,
    ) -> bool {
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
}

impl Ring {
    /// Claims the ring for the calling thread in [`Completions::Owner`](crate::Completions::Owner) mode (enabling it
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
}

/// Runs futures on the thread that owns a [`Completions::Owner`](crate::Completions::Owner) ring; see
/// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver). Not `Send`: it belongs to
/// the owner thread.
pub struct OwnerDriver {
    pub(in crate::ring) shared: Arc<Shared>,
    /// [`Shared::reap_all`]'s scratch space, kept from one `block_on` to the next.
    pub(in crate::ring) scratch: Cell<(Vec<Waker>, Vec<Owned>)>,
    pub(in crate::ring) _not_send: PhantomData<*const ()>,
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
