//! One thread per queue waiting on the queue's kick eventfd.
//!
//! A kick means "look at the available ring": the thread resets the eventfd and has the
//! device process the queue. The device's asynchronous engine only pops and starts requests
//! there (a request that cannot finish at once moves to the engine's executor thread), so a
//! kick thread never waits for the disk.

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use parking_lot::Mutex;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_block::{BlockDevice, VirtioDevice};

/// A running kick thread; dropping it stops the thread and closes the kick eventfd.
#[derive(Debug)]
pub(crate) struct KickWorker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl KickWorker {
    /// Starts watching `kick` for queue `index` of `device`.
    pub fn start(
        index: u16,
        kick: OwnedFd,
        device: Arc<Mutex<BlockDevice>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new().map_err(std::io::Error::from)?);
        let thread = std::thread::Builder::new()
            .name(format!("vhost-kick-{index}"))
            .spawn({
                let stop = stop.clone();
                move || watch(index, &kick, &stop, &device)
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

fn watch(index: u16, kick: &OwnedFd, stop: &EventFd, device: &Mutex<BlockDevice>) {
    let mut buf = [0u8; 8];
    loop {
        let mut fds = [
            PollFd::new(kick.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        let kicked = fds[0].revents().unwrap_or(PollFlags::POLLNVAL);
        if kicked.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
            // Not a usable eventfd: the frontend gets no more service on this queue until it
            // sends another kick fd.
            return;
        }
        if !kicked.contains(PollFlags::POLLIN) {
            continue;
        }
        // Resets the eventfd's counter. Anything else the frontend might have passed (a pipe
        // at end of file, a regular file) reads 0 bytes or fails: stop watching it rather
        // than spin.
        match nix::unistd::read(kick, &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(_) => return,
        }
        device.lock().process_queue(index);
    }
}
