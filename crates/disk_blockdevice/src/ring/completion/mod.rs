//! Who reaps completions when no future is being polled.

pub(super) mod io_thread;
pub(super) mod owner;
pub(super) mod thread;
#[cfg(feature = "tokio")]
pub(super) mod tokio;

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
    /// with [`OwnerDriver::block_on`](crate::OwnerDriver::block_on), whose idle step is one `io_uring_enter` that submits
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
