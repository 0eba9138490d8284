//! [`Completions::Tokio`](crate::Completions::Tokio): a task on the runtime reaps completions when the eventfd registered
//! with the ring becomes readable.

use crate::ring::{RingError, Shared};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers an eventfd with the ring and spawns the task that waits for it on the
/// current tokio runtime.
pub(in crate::ring) fn spawn(shared: &Arc<Shared>) -> Result<tokio::task::AbortHandle, RingError> {
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
pub(in crate::ring) struct TakeOver(Arc<Shared>);

impl Drop for TakeOver {
    fn drop(&mut self) {
        // If no thread can be started, futures polled later still reap inline, and the
        // ring's drop reaps whatever is left.
        let _ = self.0.start_thread();
    }
}

pub(in crate::ring) async fn run(shared: Arc<Shared>, fd: AsyncFd<OwnedFd>) {
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
