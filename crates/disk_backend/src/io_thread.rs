//! Threads that drive their own disks' I/O.
//!
//! A device's queue thread (a vhost-user queue's kick loop, a benchmark's submitting thread)
//! already sleeps waiting for events. Backends whose completions arrive on a file descriptor
//! (io_uring) can then be driven by that thread instead of a completion thread of their own:
//! no thread hand-off between a request's submission, its completion and the code that
//! finishes it.
//!
//! While a thread holds an [`IoThread`] (from [`IoThread::enter`]):
//!
//! - a backend that supports it submits the requests first polled on this thread to a
//!   [`ThreadDriver`] of this thread's own, made on first use with [`driver`] and kept until
//!   the `IoThread` is dropped;
//! - the thread's wait loop adds the drivers' descriptors to what it waits for
//!   ([`IoThread::with_fds`]) and lets the drivers whose descriptors became readable reap
//!   their completions ([`IoThread::dispatch`]);
//! - a task scheduler can queue tasks woken on this thread here ([`schedule_local`]), and
//!   the loop runs them ([`IoThread::run_local`]) before it sleeps again, so a request whose
//!   completion was reaped here is finished here too.
//!
//! [`IoThread::block_on`] is such a loop for a thread with nothing else to wait for.
//!
//! A thread inside an `IoThread` must wait only through such a loop: blocking it on a
//! request some other way (a nested `futures::executor::block_on`) would wait for
//! completions that only this thread's loop reaps.
//!
//! Nothing here is required: a backend without a driver, or a thread without an
//! `IoThread`, works as before, with the backend's own threads.

use async_task::Runnable;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use smallvec::SmallVec;
use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// A backend's per-thread state that a thread's wait loop drives: typically an io_uring of
/// the thread's own, whose completions signal an eventfd.
pub trait ThreadDriver: Any {
    /// A descriptor that becomes readable when [`dispatch`](Self::dispatch) has work to do.
    fn fd(&self) -> BorrowedFd<'_>;

    /// Does what is ready (reaps completions and wakes their futures) without blocking.
    fn dispatch(&self);

    /// The thread's [`IoThread`] ends: requests still in flight must complete without this
    /// thread's help from now on (for example, on a completion thread started here).
    fn detach(&self);
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Scope>>> = const { RefCell::new(None) };
}

/// What an [`IoThread`] holds.
#[derive(Default)]
struct Scope {
    drivers: RefCell<Vec<Rc<dyn ThreadDriver>>>,
    local: RefCell<VecDeque<Runnable>>,
}

/// This thread drives its disks' I/O while this value lives; see the
/// [module documentation](self). Not `Send`: it belongs to the thread that entered it.
pub struct IoThread {
    scope: Rc<Scope>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("drivers", &self.scope.drivers.borrow().len())
            .field("local_tasks", &self.scope.local.borrow().len())
            .finish()
    }
}

/// The thread already drives its I/O: [`IoThread`]s do not nest.
#[derive(Debug, thiserror::Error)]
#[error("this thread is already an I/O thread")]
pub struct AlreadyEntered;

impl IoThread {
    /// Makes the calling thread drive the I/O of the disks whose requests it polls, until the
    /// returned value is dropped.
    pub fn enter() -> Result<Self, AlreadyEntered> {
        CURRENT.with(|current| {
            let mut current = current.borrow_mut();
            if current.is_some() {
                return Err(AlreadyEntered);
            }
            let scope = Rc::new(Scope::default());
            *current = Some(scope.clone());
            Ok(Self { scope })
        })
    }

    /// Whether the calling thread is inside an [`IoThread`].
    pub fn is_active() -> bool {
        CURRENT.with(|current| current.borrow().is_some())
    }

    /// Calls `f` with the descriptors of this thread's drivers, in the order
    /// [`dispatch`](Self::dispatch) takes them. `f` must not make drivers (it waits on
    /// the descriptors; requests are polled elsewhere).
    pub fn with_fds<R>(&self, f: impl FnOnce(&[BorrowedFd<'_>]) -> R) -> R {
        let drivers = self.scope.drivers.borrow();
        let fds: SmallVec<[BorrowedFd<'_>; 4]> = drivers.iter().map(|d| d.fd()).collect();
        f(&fds)
    }

    /// Lets the drivers reap what is ready: those whose index in the last
    /// [`with_fds`](Self::with_fds) slice `readable` says, or all of them if `readable` is
    /// shorter than the list.
    pub fn dispatch(&self, readable: &[bool]) {
        for index in 0.. {
            let Some(driver) = self.scope.drivers.borrow().get(index).cloned() else {
                return;
            };
            if readable.get(index).copied().unwrap_or(true) {
                driver.dispatch();
            }
        }
    }

    /// Runs the tasks scheduled on this thread ([`schedule_local`]), including those they
    /// schedule while running, and returns how many ran.
    pub fn run_local(&self) -> usize {
        let mut ran = 0;
        loop {
            let next = self.scope.local.borrow_mut().pop_front();
            let Some(runnable) = next else {
                return ran;
            };
            runnable.run();
            ran += 1;
        }
    }

    /// Whether tasks wait in this thread's queue.
    pub fn has_local_work(&self) -> bool {
        !self.scope.local.borrow().is_empty()
    }

    /// Runs `future` to completion on this thread, driving its disks' I/O: between polls it
    /// runs local tasks, and sleeps in `poll(2)` on the drivers' descriptors and on an
    /// eventfd that a wake-up from another thread writes.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            parked: AtomicBool::new(false),
            eventfd: EventFd::new().ok(),
        });
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if signal.woken.swap(false, Ordering::SeqCst)
                && let Poll::Ready(output) = future.as_mut().poll(&mut cx)
            {
                return output;
            }
            if self.run_local() > 0 || signal.woken.load(Ordering::SeqCst) {
                continue;
            }
            signal.parked.store(true, Ordering::SeqCst);
            if signal.woken.load(Ordering::SeqCst) {
                signal.parked.store(false, Ordering::SeqCst);
                continue;
            }
            let (readable, signalled) = self.with_fds(|fds| {
                let mut polled: SmallVec<[PollFd<'_>; 5]> = fds
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
                    .collect();
                if let Some(eventfd) = &signal.eventfd {
                    polled.push(PollFd::new(eventfd.as_fd(), PollFlags::POLLIN));
                }
                // Without an eventfd (none could be made), look again every millisecond.
                let timeout = match signal.eventfd {
                    Some(_) => PollTimeout::NONE,
                    None => PollTimeout::from(1u8),
                };
                match poll(&mut polled, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    // Not expected with valid descriptors: look at everything.
                    Err(_) => return (SmallVec::new(), true),
                }
                let ready = |fd: &PollFd<'_>| fd.any().unwrap_or(true);
                let readable: SmallVec<[bool; 4]> = polled[..fds.len()].iter().map(ready).collect();
                (readable, polled[fds.len()..].iter().any(ready))
            });
            signal.parked.store(false, Ordering::SeqCst);
            if signalled && let Some(eventfd) = &signal.eventfd {
                // Readable, so this does not block.
                let _ = eventfd.read();
            }
            self.dispatch(&readable);
        }
    }
}

/// Wakes an [`IoThread::block_on`].
struct Signal {
    woken: AtomicBool,
    /// The thread is (about to be) asleep in `poll(2)`.
    parked: AtomicBool,
    eventfd: Option<EventFd>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst)
            && let Some(eventfd) = &self.eventfd
        {
            // A full counter already wakes the poll.
            let _ = eventfd.write(1);
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // What was already reaped runs here; the rest is left to the drivers' own threads
        // and to the schedulers' other threads.
        self.dispatch(&[]);
        self.run_local();
        CURRENT.with(|current| current.borrow_mut().take());
        let drivers = std::mem::take(&mut *self.scope.drivers.borrow_mut());
        for driver in &drivers {
            driver.detach();
        }
        // Tasks woken by the drivers' last completions, after `CURRENT` was cleared, went to
        // their schedulers' other threads; any queued before ran above or run now.
        self.run_local();
    }
}

/// The calling thread's driver of type `T`, made with `make` on first use; `None` outside
/// an [`IoThread`], or if `make` fails.
pub fn driver<T: ThreadDriver>(make: impl FnOnce() -> Option<T>) -> Option<Rc<T>> {
    let scope = CURRENT.with(|current| current.borrow().clone())?;
    let existing = scope
        .drivers
        .borrow()
        .iter()
        .find_map(|driver| (driver.clone() as Rc<dyn Any>).downcast::<T>().ok());
    if existing.is_some() {
        return existing;
    }
    let made = Rc::new(make()?);
    scope.drivers.borrow_mut().push(made.clone());
    Some(made)
}

/// Queues `runnable` on the calling thread if it is inside an [`IoThread`] (which runs it
/// before it sleeps again), or hands it back.
pub fn schedule_local(runnable: Runnable) -> Result<(), Runnable> {
    CURRENT.with(|current| match &*current.borrow() {
        Some(scope) => {
            scope.local.borrow_mut().push_back(runnable);
            Ok(())
        }
        None => Err(runnable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Resets an eventfd's counter if it is non-zero, without blocking.
    fn drain(eventfd: &EventFd) {
        let mut fds = [PollFd::new(eventfd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO).unwrap() > 0 {
            eventfd.read().unwrap();
        }
    }

    /// A driver over an eventfd that counts its dispatches (waking what waits for one) and
    /// detaches.
    struct Counter {
        fd: EventFd,
        dispatched: Cell<u32>,
        waiting: Cell<Option<Waker>>,
        detached: Cell<bool>,
    }

    impl ThreadDriver for Counter {
        fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
        fn dispatch(&self) {
            drain(&self.fd);
            self.dispatched.set(self.dispatched.get() + 1);
            if let Some(waker) = self.waiting.take() {
                waker.wake();
            }
        }
        fn detach(&self) {
            self.detached.set(true);
        }
    }

    fn counter() -> Option<Counter> {
        Some(Counter {
            fd: EventFd::new().ok()?,
            dispatched: Cell::new(0),
            waiting: Cell::new(None),
            detached: Cell::new(false),
        })
    }

    #[test]
    fn drivers_exist_only_inside_an_io_thread_and_are_made_once() {
        assert!(driver(counter).is_none());
        let io = IoThread::enter().unwrap();
        assert!(IoThread::is_active());
        assert!(IoThread::enter().is_err());
        let first = driver(counter).unwrap();
        let again = driver(|| -> Option<Counter> { panic!("made twice") }).unwrap();
        assert!(Rc::ptr_eq(&first, &again));
        io.with_fds(|fds| assert_eq!(fds.len(), 1));
        io.dispatch(&[false]);
        assert_eq!(first.dispatched.get(), 0);
        io.dispatch(&[true]);
        assert_eq!(first.dispatched.get(), 1);
        drop(io);
        assert!(first.detached.get());
        assert!(!IoThread::is_active());
        assert!(driver(counter).is_none());
    }

    #[test]
    fn local_tasks_run_on_the_thread_and_outside_go_back() {
        let ran = Rc::new(Cell::new(0));
        let make = |ran: Rc<Cell<u32>>| {
            // Scheduled locally when woken on this thread (the task is not `Send`).
            let (runnable, task) =
                async_task::spawn_local(async move { ran.set(ran.get() + 1) }, |runnable| {
                    if let Err(runnable) = schedule_local(runnable) {
                        drop(runnable);
                    }
                });
            task.detach();
            runnable
        };
        assert!(schedule_local(make(ran.clone())).is_err());
        let io = IoThread::enter().unwrap();
        schedule_local(make(ran.clone())).unwrap();
        assert!(io.has_local_work());
        assert_eq!(io.run_local(), 1);
        assert_eq!(ran.get(), 1);
        assert!(!io.has_local_work());
    }

    #[test]
    fn block_on_wakes_for_another_threads_waker_and_for_a_driver() {
        let io = IoThread::enter().unwrap();
        let (send, receive) = futures::channel::oneshot::channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            send.send(7).unwrap();
        });
        assert_eq!(io.block_on(receive).unwrap(), 7);
        sender.join().unwrap();

        // A driver whose descriptor becomes readable is dispatched by the loop.
        let counter = driver(counter).unwrap();
        counter.fd.write(1).unwrap();
        let seen = {
            let counter = counter.clone();
            std::future::poll_fn(move |cx| {
                if counter.dispatched.get() > 0 {
                    Poll::Ready(counter.dispatched.get())
                } else {
                    counter.waiting.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
        };
        assert!(io.block_on(seen) >= 1);
    }
}
