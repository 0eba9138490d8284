//! Rings of the threads that drive their own I/O ([`disk_backend::io_thread`]).
//!
//! A disk in the default [`Completions::Thread`](crate::Completions::Thread) mode, without
//! fixed buffers, submits the requests first polled on a thread inside an
//! [`IoThread`](disk_backend::io_thread::IoThread) to that thread's ring rather than its own:
//! one ring per thread, made on first use, serving every such disk polled there (its requests
//! name their file's descriptor). The ring signals an eventfd for every completion
//! (`IORING_REGISTER_EVENTFD`); the thread's wait loop watches it with its other descriptors
//! and reaps when it becomes readable, and the futures reap inline as on any ring. So a
//! request is submitted, reaped and finished on the thread that polled it, with no
//! completion thread and no hand-off.
//!
//! When the `IoThread` ends with requests still in flight on its ring (or held by futures
//! that may yet submit), the ring gets a completion thread, as a disk's own ring has.

use crate::ring::op::Target;
use crate::ring::request::{Request, RingRef, Stage};
use crate::ring::{FILE_OPCODES, Op, Owned, Ring, RingError};
use disk_backend::io_thread::{self, ThreadDriver};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

/// Slots of a thread's ring: the most requests in flight on it at once (more wait for a
/// slot), enough for a virtio queue of 256 entries.
const THREAD_RING_SLOTS: u32 = 256;

thread_local! {
    /// A thread's ring could not be built here once (io_uring unavailable or limited): do
    /// not try again for every request.
    static UNAVAILABLE: Cell<bool> = const { Cell::new(false) };
}

/// The ring of a thread that drives its own I/O.
pub(crate) struct ThreadRing {
    ring: Arc<Ring>,
    eventfd: EventFd,
    /// [`Shared::reap_all`](crate::ring::Shared::reap_all)'s scratch space.
    scratch: RefCell<(Vec<Waker>, Vec<Owned>)>,
}

impl ThreadRing {
    fn new() -> Result<Self, RingError> {
        let ring = Ring::unattached(THREAD_RING_SLOTS, FILE_OPCODES)?;
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| RingError::Register(e.into()))?;
        ring.shared
            .ring
            .submitter()
            .register_eventfd(eventfd.as_fd().as_raw_fd())
            .map_err(RingError::Register)?;
        let scratch = RefCell::new(ring.shared.scratch());
        Ok(Self {
            ring: Arc::new(ring),
            eventfd,
            scratch,
        })
    }

    /// The calling thread's ring, if it is inside an `IoThread` and io_uring lets it have
    /// one.
    pub(crate) fn current() -> Option<Rc<Self>> {
        if UNAVAILABLE.get() {
            return None;
        }
        io_thread::driver(|| {
            let made = Self::new().ok();
            UNAVAILABLE.set(made.is_none());
            made
        })
    }

    /// Runs `op` on the file `fd` (which must stay open until the request completes or is
    /// dropped), as [`Ring::run`] does on a disk's ring.
    pub(crate) fn run(&self, fd: RawFd, op: Op, owned: Owned, skip: usize) -> Request<'static> {
        Request {
            ring: RingRef::Thread(self.ring.clone()),
            target: Target::Fd(fd),
            stage: Stage::Queued {
                op,
                owned,
                skip,
                fixed: false,
            },
        }
    }
}

impl ThreadDriver for ThreadRing {
    fn fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    fn dispatch(&self) {
        // Reset the counter before reaping: a completion posted after this signals again.
        let _ = self.eventfd.read();
        let mut scratch = self.scratch.borrow_mut();
        let (wakers, freed) = &mut *scratch;
        self.ring.shared.reap_all(wakers, freed);
    }

    fn detach(&self) {
        let held_elsewhere = Arc::strong_count(&self.ring) > 1;
        if held_elsewhere || self.ring.shared.table.lock().outstanding > 0 {
            // If no thread can be started, the futures still reap inline when polled, and
            // the ring's drop reaps whatever is left.
            let _ = self.ring.shared.start_thread();
        }
    }
}
