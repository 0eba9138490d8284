//! One thread per queue waiting on the queue's kick eventfd.
//!
//! A kick means "look at the available ring": the thread resets the eventfd and has the
//! device process the queue. The device's asynchronous engine only pops and starts requests
//! there, so a kick thread never waits for the disk.
//!
//! Each kick thread drives its own I/O ([`disk_backend::io_thread`]): a disk that can
//! (`blockdev`, io_uring) submits the requests started here to a ring of this thread's,
//! whose eventfd the thread waits on with the kick; when it becomes readable the thread
//! reaps the completions and finishes their requests itself (status, used ring, interrupt),
//! so a request costs no thread hand-off. Requests of other disks, or woken elsewhere, finish
//! on the engine's executor thread as before.
//!
//! # Polling
//!
//! Going to sleep and being woken by the next kick costs a context switch each way, which is
//! a large part of a small request's latency. So after serving a kick the thread keeps
//! checking the eventfd, without sleeping, for a while (the poll window) before it sleeps.
//! The window adapts, as QEMU's event loop does (`poll-max-ns`): it starts at 0, grows (from
//! [`POLL_START`], doubling) each time a sleep ended sooner than the maximum, so that polling
//! would have caught the kick, and drops back to 0 when a sleep lasted longer than the
//! maximum (the guest went quiet). A busy queue thus costs up to one core while it is busy,
//! and an idle one nothing. A maximum of 0 turns polling off.

use disk_backend::io_thread::IoThread;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use parking_lot::RwLock;
use smallvec::SmallVec;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first poll window once polling starts.
pub const POLL_START: Duration = Duration::from_micros(4);
use virtio_block::engine::disk::defer_interrupts;
use virtio_block::{BlockDevice, VirtioDevice};

/// A running kick thread; dropping it stops the thread and closes the kick eventfd.
#[derive(Debug)]
pub(crate) struct KickWorker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl KickWorker {
    /// Starts watching `kick` for queue `index` of `device`.
    /// `poll_max` is the longest poll window (see the module documentation).
    pub fn start(
        index: u16,
        kick: OwnedFd,
        device: Arc<RwLock<BlockDevice>>,
        poll_max: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new().map_err(std::io::Error::from)?);
        let thread = std::thread::Builder::new()
            .name(format!("vhost-kick-{index}"))
            .spawn({
                let stop = stop.clone();
                move || watch(index, &kick, &stop, &device, poll_max)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KickWorker {
    fn drop(&mut self) {
        // Writing 1 to a fresh eventfd cannot overflow it.
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            // The thread only ends by returning; a panic in it would be a bug in the device,
            // already reported on stderr by the runtime.
            let _ = thread.join();
        }
    }
}

/// The next poll window after a sleep of `slept` with window `window`: grown if a longer
/// window (up to `max`) would have caught the kick, 0 if the queue went quiet for longer.
fn adapt(window: Duration, slept: Duration, max: Duration) -> Duration {
    if slept > max {
        Duration::ZERO
    } else if window < max {
        (window * 2).clamp(POLL_START, max)
    } else {
        window
    }
}

fn watch(
    index: u16,
    kick: &OwnedFd,
    stop: &EventFd,
    device: &RwLock<BlockDevice>,
    poll_max: Duration,
) {
    // This thread drives the I/O of the requests it starts: disks that can (io_uring) submit
    // them to a ring of this thread's, which it reaps below, and their tasks finish here.
    let io = IoThread::enter().ok();
    let mut buf = [0u8; 8];
    let mut window = Duration::ZERO;
    let mut served = Instant::now();
    let mut readable: SmallVec<[bool; 4]> = SmallVec::new();
    loop {
        if let Some(io) = &io
            && io.has_local_work()
        {
            // Requests woken on this thread (while it started others, or by the last
            // completions it reaped) before it sleeps.
            defer_interrupts(|| io.run_local());
        }
        let polling = served.elapsed() < window;
        let timeout = if polling {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        let asleep = (!polling).then(Instant::now);
        let wait = |drivers: &[BorrowedFd<'_>], readable: &mut SmallVec<[bool; 4]>| {
            let mut fds: SmallVec<[PollFd<'_>; 6]> = SmallVec::new();
            fds.push(PollFd::new(kick.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
            fds.extend(drivers.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
            let result = poll(&mut fds, timeout);
            readable.clear();
            readable.extend(fds[2..].iter().map(|fd| fd.any().unwrap_or(true)));
            let stopped = fds[1].any().unwrap_or(true);
            let kicked = fds[0].revents().unwrap_or(PollFlags::POLLNVAL);
            result.map(|ready| (ready, stopped, kicked))
        };
        let waited = match &io {
            Some(io) => io.with_fds(|drivers| wait(drivers, &mut readable)),
            None => wait(&[], &mut readable),
        };
        let (stopped, kicked) = match waited {
            Ok((0, ..)) => continue,
            Ok((_, stopped, kicked)) => (stopped, kicked),
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if let Some(asleep) = asleep {
            window = adapt(window, asleep.elapsed(), poll_max);
        }
        if stopped {
            return;
        }
        if let Some(io) = &io
            && readable.contains(&true)
        {
            // Completions: reap them and finish their requests here.
            defer_interrupts(|| {
                io.dispatch(&readable);
                io.run_local();
            });
        }
        if kicked.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
            // Not a usable eventfd: the frontend gets no more service on this queue until it
            // sends another kick fd.
            return;
        }
        if !kicked.contains(PollFlags::POLLIN) {
            if kicked.is_empty() {
                continue;
            }
            // Hung up with nothing to read (a pipe whose writer is gone): it would report
            // this at once forever, so polling again would spin. Stop watching.
            return;
        }
        // Resets the eventfd's counter (the descriptor is non-blocking, so a counter the
        // frontend drained meanwhile is `EAGAIN`). Anything else the frontend might have
        // passed (a pipe at end of file, a regular file) reads 0 bytes or fails: stop
        // watching it rather than spin.
        match nix::unistd::read(kick, &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(_) => return,
        }
        // The read lock: other queues' threads serve theirs at the same time.
        device.read().process_queue(index);
        served = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::Disk;
    use disk_ram::RamDisk;
    use virtio_block::BlockConfig;

    /// A kick fd that reports a hang-up and nothing to read (a pipe whose writer is gone)
    /// ends the thread; it used to poll again at once, forever, on a whole core.
    #[test]
    fn a_kick_fd_that_hung_up_ends_the_thread() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(write_end);
        let disk = Disk::new(RamDisk::new(64, 512).unwrap()).unwrap();
        let device = BlockDevice::new(BlockConfig::default(), disk).unwrap();
        let mut worker =
            KickWorker::start(0, read_end, Arc::new(RwLock::new(device)), Duration::ZERO).unwrap();
        let thread = worker.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() {
            // On failure, dropping the worker stops the thread through its stop eventfd.
            assert!(Instant::now() < deadline, "the kick thread still runs");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_window_grows_while_kicks_come_soon_and_drops_when_they_stop() {
        let max = Duration::from_micros(100);
        let soon = Duration::from_micros(30);
        let mut window = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..7 {
            window = adapt(window, soon, max);
            seen.push(window.as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 64, 100, 100]);
        assert_eq!(
            adapt(window, Duration::from_micros(101), max),
            Duration::ZERO
        );
        // A maximum of 0 never polls.
        assert_eq!(
            adapt(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            Duration::ZERO
        );
    }
}
