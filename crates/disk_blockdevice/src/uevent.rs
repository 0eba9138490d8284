//! Capacity changes of block devices, from kernel uevents.
//!
//! One thread per process listens on a `NETLINK_KOBJECT_UEVENT` socket (multicast group 1,
//! the kernel's own events). A `change` event for a watched device (matched by `MAJOR` and
//! `MINOR`) makes the watcher re-read the size with `BLKGETSIZE64`; the event's content is
//! only a hint, so a forged or unrelated message costs one ioctl and changes nothing. The
//! kernel sends `change` with `RESIZE=1` when a disk's capacity changes (`losetup -c`, a
//! resized virtual disk).

use crate::sys::{self, DeviceNumber};
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// The size of one block device as last read, and the futures waiting for it to change.
#[derive(Debug)]
pub(crate) struct SizeWatch {
    device: DeviceNumber,
    file: Arc<File>,
    sector_shift: u32,
    sector_count: AtomicU64,
    changed: event_listener::Event,
}

impl SizeWatch {
    pub(crate) fn new(
        device: DeviceNumber,
        file: Arc<File>,
        sector_shift: u32,
        sector_count: u64,
    ) -> Self {
        Self {
            device,
            file,
            sector_shift,
            sector_count: AtomicU64::new(sector_count),
            changed: event_listener::Event::new(),
        }
    }

    /// The sector count as of the last uevent or refresh.
    pub(crate) fn sector_count(&self) -> u64 {
        self.sector_count.load(Ordering::Acquire)
    }

    /// Re-reads the size, records it, and wakes waiters if it changed. A failed read keeps
    /// the last known size (the device may be going away; its I/O will fail on its own).
    pub(crate) fn refresh(&self) -> u64 {
        let Ok(size) = sys::device_size(&self.file) else {
            return self.sector_count();
        };
        let count = size.min(i64::MAX as u64) >> self.sector_shift;
        if self.sector_count.swap(count, Ordering::AcqRel) != count {
            self.changed.notify(usize::MAX);
        }
        count
    }

    /// Completes with the sector count once it differs from `known`.
    pub(crate) async fn wait_for_change(&self, known: u64) -> u64 {
        loop {
            // Listen before re-reading, so a change between the two is not missed.
            let listener = self.changed.listen();
            let count = self.refresh();
            if count != known {
                return count;
            }
            listener.await;
        }
    }
}

/// The process-wide uevent listener.
#[derive(Debug)]
struct Listener {
    watches: Mutex<Vec<Weak<SizeWatch>>>,
}

/// Started by the first watch. A failure to start it (out of descriptors or memory, say) is
/// not kept: the next watch tries again.
static LISTENER: Mutex<Option<Arc<Listener>>> = Mutex::new(None);

/// Starts watching `watch`'s device for resizes; the watch ends when it is dropped.
pub(crate) fn watch(watch: &Arc<SizeWatch>) -> io::Result<()> {
    let listener = started(&LISTENER, start)?;
    let mut watches = listener.watches.lock();
    watches.retain(|w| w.strong_count() > 0);
    watches.push(Arc::downgrade(watch));
    Ok(())
}

/// What `slot` holds, or what `start` makes of it if it holds nothing yet; a failure leaves
/// it empty, for the next call to try again.
fn started<T>(
    slot: &Mutex<Option<Arc<T>>>,
    start: impl FnOnce() -> io::Result<Arc<T>>,
) -> io::Result<Arc<T>> {
    let mut slot = slot.lock();
    match &*slot {
        Some(started) => Ok(started.clone()),
        None => Ok(slot.insert(start()?).clone()),
    }
}

/// `struct sockaddr_nl`.
#[repr(C)]
struct SockaddrNl {
    nl_family: libc::sa_family_t,
    nl_pad: u16,
    nl_pid: u32,
    nl_groups: u32,
}

/// Multicast group of the kernel's uevents (group 2 is udev's re-broadcast).
const KERNEL_UEVENT_GROUP: u32 = 1;

fn start() -> io::Result<Arc<Listener>> {
    // SAFETY: plain socket creation; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let address = SockaddrNl {
        nl_family: libc::AF_NETLINK as libc::sa_family_t,
        nl_pad: 0,
        nl_pid: 0,
        nl_groups: KERNEL_UEVENT_GROUP,
    };
    // SAFETY: `address` is a valid `sockaddr_nl` of the length passed, live for the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<SockaddrNl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let listener = Arc::new(Listener {
        watches: Mutex::new(Vec::new()),
    });
    std::thread::Builder::new()
        .name("disk-uevents".into())
        .spawn({
            let listener = listener.clone();
            move || listen(&socket, &listener)
        })?;
    Ok(listener)
}

fn listen(socket: &OwnedFd, listener: &Listener) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let mut sender = SockaddrNl {
            nl_family: 0,
            nl_pad: 0,
            nl_pid: 0,
            nl_groups: 0,
        };
        let mut sender_len = size_of::<SockaddrNl>() as libc::socklen_t;
        // SAFETY: the buffer and the address are live, writable and of the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
                (&raw mut sender).cast(),
                &raw mut sender_len,
            )
        };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // The socket overflowed: events were lost, so every size may be stale.
                Some(libc::ENOBUFS) => refresh_matching(listener, |_| true),
                // Nothing else is expected; avoid spinning if it happens.
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
            continue;
        }
        // Only the kernel (port 0) sends on this group.
        if sender.nl_pid != 0 {
            continue;
        }
        if let Some(device) = parse_change(&buffer[..n as usize]) {
            refresh_matching(listener, |d| d == device);
        }
    }
}

fn refresh_matching(listener: &Listener, matches: impl Fn(DeviceNumber) -> bool) {
    let watches: Vec<Arc<SizeWatch>> = listener
        .watches
        .lock()
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|w| matches(w.device))
        .collect();
    for watch in watches {
        watch.refresh();
    }
}

/// The device of a kernel `change` uevent: `change@DEVPATH\0ACTION=change\0...MAJOR=7\0
/// MINOR=0\0...`. Other events, and messages without both numbers, give `None`.
pub(crate) fn parse_change(message: &[u8]) -> Option<DeviceNumber> {
    let mut fields = message.split(|&b| b == 0);
    let header = fields.next()?;
    if !header.starts_with(b"change@") {
        return None;
    }
    let (mut action, mut major, mut minor) = (None, None, None);
    for field in fields {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        if let Some((key, value)) = field.split_once('=') {
            match key {
                "ACTION" => action = Some(value),
                "MAJOR" => major = value.parse().ok(),
                "MINOR" => minor = value.parse().ok(),
                _ => {}
            }
        }
    }
    if action != Some("change") {
        return None;
    }
    Some(DeviceNumber {
        major: major?,
        minor: minor?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed start is not kept: the next call starts again, and a started value is kept.
    #[test]
    fn a_failed_start_is_tried_again() {
        let slot = Mutex::new(None);
        let failed = started(&slot, || Err(io::Error::from_raw_os_error(libc::EMFILE)));
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EMFILE));
        let first = started(&slot, || Ok(Arc::new(1))).unwrap();
        let again = started(&slot, || -> io::Result<Arc<i32>> {
            panic!("started twice")
        })
        .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
    }

    #[test]
    fn parses_a_resize_event() {
        let message = b"change@/devices/virtual/block/loop3\0ACTION=change\0\
            DEVPATH=/devices/virtual/block/loop3\0SUBSYSTEM=block\0RESIZE=1\0MAJOR=7\0\
            MINOR=3\0DEVNAME=loop3\0DEVTYPE=disk\0SEQNUM=4242\0";
        assert_eq!(
            parse_change(message),
            Some(DeviceNumber { major: 7, minor: 3 })
        );
    }

    #[test]
    fn ignores_other_events_and_partial_messages() {
        assert_eq!(
            parse_change(b"add@/devices/virtual/block/loop3\0ACTION=add\0MAJOR=7\0MINOR=3\0"),
            None
        );
        assert_eq!(
            parse_change(b"change@/devices/x\0ACTION=change\0MAJOR=7\0"),
            None
        );
        assert_eq!(
            parse_change(b"change@/devices/x\0ACTION=remove\0MAJOR=7\0MINOR=1\0"),
            None
        );
        assert_eq!(parse_change(b""), None);
        assert_eq!(
            parse_change(b"libudev\0\xfe\xed\xca\xfe\0\0\0\0\0\0\0\0"),
            None
        );
    }
}
