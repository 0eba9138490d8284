//! How the device reaches the frontend: each queue's call eventfd, and configuration-change
//! messages on the backend request channel.

use parking_lot::Mutex;
use std::io::Write;
use std::os::unix::net::UnixStream;
use virtio_block::{IrqLine, VirtioInterrupt};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Protocol version 1 in the header's flags.
const HEADER_VERSION: u32 = 1;

/// The interrupt side of one session, shared with the device's engine.
#[derive(Debug)]
pub(crate) struct Interrupt {
    /// Each queue's call eventfd (`SET_VRING_CALL`); `None` until the frontend sends one.
    calls: Box<[Mutex<Option<IrqLine>>]>,
    /// The backend request channel, once the frontend gave one and negotiated `CONFIG`.
    config_channel: Mutex<Option<UnixStream>>,
}

impl Interrupt {
    pub fn new(queues: u16) -> Self {
        Self {
            calls: (0..queues).map(|_| Mutex::new(None)).collect(),
            config_channel: Mutex::new(None),
        }
    }

    /// Replaces queue `index`'s call eventfd. `false` if the queue does not exist.
    pub fn set_call(&self, index: usize, line: Option<IrqLine>) -> bool {
        match self.calls.get(index) {
            Some(call) => {
                *call.lock() = line;
                true
            }
            None => false,
        }
    }

    /// Where configuration changes go from now on.
    pub fn set_config_channel(&self, channel: Option<UnixStream>) {
        // Completions and resizes raise interrupts from the engine's threads: a frontend that
        // stops reading its channel must not block them.
        let channel = channel.filter(|stream| stream.set_nonblocking(true).is_ok());
        *self.config_channel.lock() = channel;
    }

    /// Forgets every call eventfd and the channel.
    pub fn clear(&self) {
        for call in &self.calls {
            *call.lock() = None;
        }
        self.set_config_channel(None);
    }
}

impl VirtioInterrupt for Interrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        // Clone the line out so that a SET_VRING_CALL racing with a completion never waits
        // for the eventfd write.
        let line = self
            .calls
            .get(usize::from(queue_index))
            .and_then(|call| call.lock().clone());
        if let Some(line) = line {
            line.raise();
        }
    }

    fn signal_config_change(&self) {
        let mut channel = self.config_channel.lock();
        let Some(stream) = channel.as_mut() else {
            return;
        };
        // A bare header, without NEED_REPLY: the frontend re-reads the configuration space
        // with GET_CONFIG on the main channel, so there is nothing to wait for here.
        let mut message = [0u8; 12];
        message[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        message[4..8].copy_from_slice(&HEADER_VERSION.to_le_bytes());
        if stream.write_all(&message).is_err() {
            // The frontend closed its end (or stopped reading): no one is left to tell, and
            // the next connection starts with a fresh configuration read.
            *channel = None;
        }
    }
}
