//! A minimal vhost-user frontend for the tests: the `vhost` crate's `Frontend` for the
//! messages, a memfd as guest memory, and a split-ring driver that writes descriptors,
//! kicks and waits for the call eventfd, as a VMM's guest would.

#![allow(dead_code)]

use guestmem::GuestMemory;
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_blk::{SessionEnd, VhostUserBlk, serve_connection};
use virtio_block::spec::{blk, features, ring};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_BYTES: u64 = 4 << 20;
/// Where the frontend pretends to have guest memory mapped: ring addresses are sent as
/// `USER_BASE + gpa` and the backend must translate them.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
/// Ring size used by the tests.
pub const QUEUE_SIZE: u16 = 16;
/// How long to wait for an interrupt before calling the test hung (a guard, not a timing
/// assertion).
pub const WAIT_MS: u32 = 20_000;

/// Where queue `q`'s rings live.
pub fn ring_base(q: u16) -> u64 {
    0x10000 * (u64::from(q) + 1)
}

/// Start of the data area (headers, buffers, status bytes).
const DATA_BASE: u64 = 1 << 20;

/// One queue as the driver sees it.
pub struct DriverQueue {
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub last_used: u16,
}

/// A connection a test moved away from with [`TestFrontend::reconnect`], kept open.
pub struct OldConnection {
    _raw: UnixStream,
    _frontend: Frontend,
    _stop: UnixStream,
    _server: Option<JoinHandle<SessionEnd>>,
}

/// A frontend connected to a backend served on another thread.
pub struct TestFrontend {
    pub frontend: Frontend,
    pub mem: GuestMemory,
    pub memfd: File,
    pub queues: Vec<DriverQueue>,
    /// The frontend's end of the backend request channel, if set up.
    pub channel: Option<UnixStream>,
    next_data: u64,
    pub server: Option<JoinHandle<SessionEnd>>,
    pub stop: UnixStream,
    /// The frontend's socket, for messages the `vhost` crate's frontend cannot send.
    pub raw: UnixStream,
}

/// Guest memory as a memfd, mapped on our side too.
pub fn guest_memory() -> (File, GuestMemory) {
    let fd = memfd_create("guest", MFdFlags::MFD_CLOEXEC).expect("memfd");
    let file = File::from(fd);
    file.set_len(MEM_BYTES).expect("size the memfd");
    let mem = GuestMemory::builder()
        .file(0, MEM_BYTES, file.as_fd(), 0, true)
        .expect("map")
        .build()
        .expect("build");
    (file, mem)
}

impl TestFrontend {
    /// The virtio features the test frontend accepts (with `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub const FEATURES: u64 =
        features::VERSION_1 | features::BLK_FLUSH | features::BLK_MQ | 1 << 30;

    /// Connects a frontend (which believes the device has `frontend_queues` queues) to
    /// `handler`, served by `serve_connection` on a thread.
    pub fn connect(handler: Arc<VhostUserBlk>, frontend_queues: u64) -> Self {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (stop, stop_reader) = UnixStream::pair().expect("socketpair");
        let server =
            std::thread::spawn(move || serve_connection(&handler, theirs, stop_reader.as_fd()));
        let (memfd, mem) = guest_memory();
        Self {
            raw: ours.try_clone().expect("clone"),
            frontend: Frontend::from_stream(ours, frontend_queues),
            mem,
            memfd,
            queues: Vec::new(),
            channel: None,
            next_data: DATA_BASE,
            server: Some(server),
            stop,
        }
    }

    /// A frontend over an already connected stream (to a [`Server`](vhost_user_blk::Server)).
    pub fn attach(stream: UnixStream) -> Self {
        let (stop, _) = UnixStream::pair().expect("socketpair");
        let (memfd, mem) = guest_memory();
        Self {
            raw: stream.try_clone().expect("clone"),
            frontend: Frontend::from_stream(stream, 1),
            mem,
            memfd,
            queues: Vec::new(),
            channel: None,
            next_data: DATA_BASE,
            server: None,
            stop,
        }
    }

    /// Negotiates as QEMU does: features, protocol features with REPLY_ACK (so that every
    /// refusal comes back as an error), the backend channel, the memory table.
    pub fn negotiate(&mut self) {
        self.negotiate_features();
        self.set_mem_table().expect("set_mem_table");
    }

    /// Everything [`negotiate`](Self::negotiate) does but the memory table.
    pub fn negotiate_features(&mut self) {
        self.negotiate_features_with(VhostUserProtocolFeatures::empty());
    }

    /// [`negotiate_features`](Self::negotiate_features), also accepting `extra` protocol
    /// features (which the backend must offer).
    pub fn negotiate_features_with(&mut self, extra: VhostUserProtocolFeatures) {
        let fe = &mut self.frontend;
        fe.set_owner().expect("set_owner");
        let offered = fe.get_features().expect("get_features");
        assert_ne!(offered & features::VERSION_1, 0);
        let protocol_bit = 1 << 30;
        assert_ne!(offered & protocol_bit, 0, "VHOST_USER_F_PROTOCOL_FEATURES");
        fe.set_features(
            features::VERSION_1 | features::BLK_FLUSH | features::BLK_MQ | protocol_bit,
        )
        .expect("set_features");
        let protocol = fe.get_protocol_features().expect("get_protocol_features");
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
            | extra;
        assert!(protocol.contains(wanted), "offered {protocol:?}");
        fe.set_protocol_features(wanted)
            .expect("set_protocol_features");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        fe.set_backend_request_fd(&theirs)
            .expect("set_backend_request_fd");
        self.channel = Some(ours);
    }

    pub fn set_mem_table(&self) -> vhost::Result<Option<Vec<u64>>> {
        self.frontend.set_mem_table(&[self.memory_region()])
    }

    /// Guest memory as one region: the memfd at guest address 0, mapped at [`USER_BASE`].
    pub fn memory_region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_BYTES,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        }
    }

    /// Replaces the connection with a new one to `handler` (served on a new thread), keeping
    /// guest memory, the rings and what the driver knows of them, as a VMM does when its
    /// backend is restarted. Returns the old connection, still open: the old backend keeps
    /// whatever it had in flight and never hears from this frontend again.
    pub fn reconnect(&mut self, handler: Arc<VhostUserBlk>) -> OldConnection {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (stop, stop_reader) = UnixStream::pair().expect("socketpair");
        let server =
            std::thread::spawn(move || serve_connection(&handler, theirs, stop_reader.as_fd()));
        let queues = self.queues.len() as u64;
        OldConnection {
            _raw: std::mem::replace(&mut self.raw, ours.try_clone().expect("clone")),
            _frontend: std::mem::replace(
                &mut self.frontend,
                Frontend::from_stream(ours, queues.max(1)),
            ),
            _stop: std::mem::replace(&mut self.stop, stop),
            _server: self.server.replace(server),
        }
    }

    /// Starts queue `q` again on a new connection without touching the rings, from the used
    /// index the ring shows (what QEMU sends when the old backend cannot say where it was),
    /// with new kick and call eventfds.
    pub fn resume_queue(&mut self, q: u16) -> vhost::Result<()> {
        let i = usize::from(q);
        let r = ring_base(q);
        let used: u16 = self.mem.read_plain(r + 0x2000 + 2).expect("used idx");
        let (call, kick) = self.connect_queue(q, used)?;
        self.queues[i].call = call;
        self.queues[i].kick = kick;
        Ok(())
    }

    /// The used ring's entries from position `from` up to its index: (head, length).
    pub fn used_entries(&self, q: u16, from: u16) -> Vec<(u16, u32)> {
        let r = ring_base(q);
        let used: u16 = self.mem.read_plain(r + 0x2000 + 2).expect("used idx");
        let mut entries = Vec::new();
        let mut at = from;
        while at != used {
            let slot = r + 0x2000 + 4 + u64::from(at % QUEUE_SIZE) * 8;
            let head: u32 = self.mem.read_plain(slot).expect("used id");
            let len: u32 = self.mem.read_plain(slot + 4).expect("used len");
            entries.push((head as u16, len));
            at = at.wrapping_add(1);
        }
        entries
    }

    /// Lays out queue `q` in guest memory and starts it from index `base`.
    pub fn start_queue(&mut self, q: u16, base: u16) -> vhost::Result<()> {
        let i = usize::from(q);
        let r = ring_base(q);
        // Zeroed rings: flags 0 (interrupts wanted), indices where the base says.
        self.mem.fill_at(r, 0, 0x10000).expect("clear rings");
        self.mem
            .write_plain(r + 0x1000 + 2, &base)
            .expect("avail idx");
        self.mem
            .write_plain(r + 0x2000 + 2, &base)
            .expect("used idx");
        let (call, kick) = self.connect_queue(q, base)?;
        let queue = DriverQueue {
            kick,
            call,
            avail_idx: base,
            last_used: base,
        };
        if self.queues.len() <= i {
            self.queues.resize_with(i + 1, || DriverQueue {
                kick: EventFd::new(0).expect("eventfd"),
                call: EventFd::new(0).expect("eventfd"),
                avail_idx: 0,
                last_used: 0,
            });
        }
        self.queues[i] = queue;
        Ok(())
    }

    /// Hands queue `q`'s size, rings (at their place in guest memory), `base` and new call
    /// and kick eventfds to the backend, and enables it; returns (call, kick).
    fn connect_queue(&mut self, q: u16, base: u16) -> vhost::Result<(EventFd, EventFd)> {
        let (i, r) = (usize::from(q), ring_base(q));
        let fe = &mut self.frontend;
        fe.set_vring_num(i, QUEUE_SIZE)?;
        fe.set_vring_base(i, base)?;
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: USER_BASE + r,
                used_ring_addr: USER_BASE + r + 0x2000,
                avail_ring_addr: USER_BASE + r + 0x1000,
                log_addr: None,
            },
        )?;
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(0).expect("eventfd");
        fe.set_vring_call(i, &call)?;
        fe.set_vring_kick(i, &kick)?;
        fe.set_vring_enable(i, true)?;
        Ok((call, kick))
    }

    /// Room for `len` bytes in the data area of guest memory: its guest address.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + len).next_multiple_of(512);
        assert!(self.next_data <= MEM_BYTES, "test data area exhausted");
        addr
    }

    /// Posts a block request on queue `q` and kicks: a header, then `payload` for the
    /// device to read if it is not empty, or `read_len` bytes for the device to write if that
    /// is not 0, then the status byte. Returns the status byte's address and the data's.
    pub fn post(
        &mut self,
        q: u16,
        request_type: u32,
        sector: u64,
        payload: &[u8],
        read_len: u32,
    ) -> (u64, u64) {
        let device_writes = payload.is_empty();
        let data_len = if device_writes {
            read_len
        } else {
            payload.len() as u32
        };
        let header = self.alloc(16);
        let data = self.alloc(u64::from(data_len.max(1)));
        let status = self.alloc(1);
        self.mem.write_at(data, payload).expect("payload");
        let mut chain = Vec::new();
        if data_len > 0 {
            chain.push((
                data,
                data_len,
                if device_writes { ring::DESC_F_WRITE } else { 0 },
            ));
        }
        self.post_with(q, request_type, sector, header, &chain, status);
        (status, data)
    }

    /// Posts a block request on queue `q` and kicks: the header at `header` (written here),
    /// the data descriptors `data` as (guest address, length, flags) wherever they are, and
    /// the status byte at `status` (set to 0xff here).
    pub fn post_with(
        &mut self,
        q: u16,
        request_type: u32,
        sector: u64,
        header: u64,
        data: &[(u64, u32, u16)],
        status: u64,
    ) {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_at(header, &bytes).expect("header");
        self.mem.write_at(status, &[0xff]).expect("status");
        let queue = &self.queues[usize::from(q)];
        let head = queue.avail_idx % QUEUE_SIZE * 3 % QUEUE_SIZE;
        let mut chain = vec![(header, 16u32, 0u16)];
        chain.extend_from_slice(data);
        chain.push((status, 1, ring::DESC_F_WRITE));
        let r = ring_base(q);
        let mut index = head;
        for (n, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = (index + 1) % QUEUE_SIZE;
            let last = n + 1 == chain.len();
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            let flags = flags | if last { 0 } else { ring::DESC_F_NEXT };
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_at(r + u64::from(index) * 16, &desc)
                .expect("descriptor");
            index = next;
        }
        let queue = &mut self.queues[usize::from(q)];
        let slot = r + 0x1000 + 4 + u64::from(queue.avail_idx % QUEUE_SIZE) * 2;
        self.mem.write_plain(slot, &head).expect("avail ring");
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_plain(r + 0x1000 + 2, &queue.avail_idx)
            .expect("avail idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        queue.kick.write(1).expect("kick");
    }

    /// Waits until queue `q` has used one more chain; returns its written length.
    pub fn wait_used(&mut self, q: u16) -> u32 {
        let r = ring_base(q);
        let mut waited_ms = 0;
        loop {
            let used_idx: u16 = self.mem.read_plain(r + 0x2000 + 2).expect("used idx");
            let queue = &mut self.queues[usize::from(q)];
            if used_idx != queue.last_used {
                let slot = r + 0x2000 + 4 + u64::from(queue.last_used % QUEUE_SIZE) * 8;
                let len: u32 = self.mem.read_plain(slot + 4).expect("used len");
                queue.last_used = queue.last_used.wrapping_add(1);
                return len;
            }
            // The call eventfd is non-blocking (vmm-sys-util's EventFd has no `AsFd` to poll):
            // look again every millisecond, up to the guard.
            if queue.call.read().is_err() {
                waited_ms += 1;
                assert!(
                    waited_ms < WAIT_MS,
                    "no interrupt from the backend within {WAIT_MS} ms"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// A whole write: returns the status byte.
    pub fn write(&mut self, q: u16, sector: u64, data: &[u8]) -> u8 {
        let (status, _) = self.post(q, blk::T_OUT, sector, data, 0);
        self.wait_used(q);
        self.mem.read_plain(status).expect("status")
    }

    /// A whole read: returns the status byte and the data.
    pub fn read(&mut self, q: u16, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let (status, data) = self.post(q, blk::T_IN, sector, &[], len);
        self.wait_used(q);
        let mut buf = vec![0; len as usize];
        self.mem.read_at(data, &mut buf).expect("data");
        (self.mem.read_plain(status).expect("status"), buf)
    }

    /// A flush: returns the status byte.
    pub fn flush(&mut self, q: u16) -> u8 {
        let (status, _) = self.post(q, blk::T_FLUSH, 0, &[], 0);
        self.wait_used(q);
        self.mem.read_plain(status).expect("status")
    }

    /// The configuration space's first `len` bytes.
    pub fn config(&mut self, len: u32) -> vhost::Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        self.frontend
            .get_config(
                0,
                len,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map(|(_, payload)| payload)
    }

    /// The capacity field (512-byte sectors).
    pub fn capacity(&mut self) -> u64 {
        let config = self.config(60).expect("get_config");
        u64::from_le_bytes(config[0..8].try_into().expect("8 bytes"))
    }

    /// Closes the connection and returns how the server saw it end.
    pub fn disconnect(mut self) -> SessionEnd {
        let server = self.server.take().expect("server thread");
        // Close both handles on the connection, but keep the stop channel open until the
        // server has seen the connection end (its closing would read as a stop).
        let Self {
            frontend,
            raw,
            stop,
            ..
        } = self;
        drop(frontend);
        drop(raw);
        let end = server.join().expect("server thread");
        drop(stop);
        end
    }
}
