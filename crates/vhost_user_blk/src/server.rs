//! Listening on a Unix socket and serving one frontend connection at a time.
//!
//! Each connection gets a fresh [`VhostUserBlk`] (a fresh device over the same disk), so a
//! frontend that reconnects starts from the state a new one would. When a connection ends
//! (the frontend closed it, sent something malformed, or a request was refused), the device
//! is reset, which waits for the requests in flight, the disk is flushed, and the server
//! accepts the next connection. When the stop descriptor becomes readable the server stops
//! accepting, ends the current connection the same way and returns.

use crate::backend::{DEFAULT_POLL_MAX, VhostUserBlk};
use crate::memory::decode_mem_table;
use disk_backend::{Disk, DiskError};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vhost::vhost_user::BackendReqHandler;
use virtio_block::{BlockConfig, NewDeviceError};

/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_SET_MEM_TABLE`.
const SET_MEM_TABLE: u32 = 5;
/// Header flags: the protocol version, "this is a reply", "reply with an ack".
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The largest message body the protocol allows.
const MAX_BODY_BYTES: usize = 0x1000;
/// Size of a vhost-user message header: request, flags, size.
const HEADER_BYTES: usize = 12;
/// The most file descriptors one vhost-user message carries.
const MAX_FDS: usize = 32;

/// Starting a server failed.
#[derive(Debug, Error)]
pub enum BindError {
    /// The disk cannot be served as a block device with this configuration.
    #[error("cannot serve the disk")]
    Device(#[source] NewDeviceError),
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Serving failed as a whole (a connection ending is not an error of the server).
#[derive(Debug, Error)]
pub enum ServeError {
    /// Waiting for connections failed.
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
    /// The final flush of the disk failed.
    #[error("cannot flush the disk")]
    Flush(#[source] DiskError),
}

/// How a connection ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The frontend closed the connection.
    Closed,
    /// The server was asked to stop.
    Stopped,
    /// The frontend sent something the backend refused, or the socket failed; the
    /// connection was closed.
    Failed {
        /// The code of the request being handled (`VhostUserRequest`), if one was.
        request: Option<u32>,
        /// Why.
        error: vhost::vhost_user::Error,
    },
}

impl SessionEnd {
    fn failed(request: Option<u32>, error: vhost::vhost_user::Error) -> Self {
        Self::Failed { request, error }
    }
}

/// What a [`Server`] reports while it runs.
#[derive(Debug)]
pub enum Event {
    /// A frontend connected.
    Connected,
    /// The connection ended; the device was reset and the disk flushed.
    Disconnected(SessionEnd),
    /// Flushing the disk after a connection failed.
    FlushFailed(DiskError),
}

/// A vhost-user-blk export of one disk on a Unix socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    disk: Disk,
    config: BlockConfig,
    poll_max: Duration,
}

impl Server {
    /// Listens on `path` (replacing a stale socket there) to serve `disk` as `config`
    /// describes.
    pub fn bind(
        path: impl AsRef<Path>,
        disk: Disk,
        config: BlockConfig,
    ) -> Result<Self, BindError> {
        let path = path.as_ref().to_owned();
        // Refuse a disk the device cannot serve now, not when the first frontend connects.
        VhostUserBlk::new(disk.clone(), config.clone()).map_err(BindError::Device)?;
        if let Ok(metadata) = std::fs::symlink_metadata(&path) {
            if !metadata.file_type().is_socket() {
                return Err(BindError::NotASocket(path));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|source| BindError::Listen {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            listener,
            path,
            disk,
            config,
            poll_max: DEFAULT_POLL_MAX,
        })
    }

    /// Sets how long a queue's thread may keep checking for the guest's next kick before
    /// it sleeps (see [`VhostUserBlk::set_poll_max`]); 0 turns polling off.
    pub fn set_poll_max(&mut self, max: Duration) {
        self.poll_max = max;
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections one after another until `stop` becomes readable (a byte written
    /// to the other end of a pipe or socket pair, as a signal handler does), then flushes the
    /// disk and returns. `events` hears about each connection.
    pub fn run(
        &self,
        stop: BorrowedFd<'_>,
        mut events: impl FnMut(Event),
    ) -> Result<(), ServeError> {
        loop {
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ServeError::Accept(e.into())),
            }
            if fds[1].any().unwrap_or(true) {
                break;
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The peer gave up before we accepted: wait for the next one.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(ServeError::Accept(e)),
            };
            events(Event::Connected);
            let handler = match VhostUserBlk::new(self.disk.clone(), self.config.clone()) {
                Ok(handler) => {
                    handler.set_poll_max(self.poll_max);
                    Arc::new(handler)
                }
                // `bind` built the same device: only a disk that changed under us (shrunk to
                // nothing) can fail here. Refuse this connection and keep listening.
                Err(_) => continue,
            };
            let end = serve_connection(&handler, stream, stop);
            let stopped = matches!(end, SessionEnd::Stopped);
            if let Err(e) = futures::executor::block_on(self.disk.sync_cache()) {
                events(Event::FlushFailed(e));
            }
            events(Event::Disconnected(end));
            if stopped {
                break;
            }
        }
        futures::executor::block_on(self.disk.sync_cache()).map_err(ServeError::Flush)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one connected frontend with `handler` until the frontend goes away, a request
/// fails, or `stop` becomes readable. Leaves the handler reset: rings stopped, requests in
/// flight completed.
pub fn serve_connection(
    handler: &Arc<VhostUserBlk>,
    stream: UnixStream,
    stop: BorrowedFd<'_>,
) -> SessionEnd {
    let end = match stream.try_clone() {
        Ok(reader) => {
            let mut requests = BackendReqHandler::from_stream(reader, handler.clone());
            session(handler, &mut requests, &stream, stop)
        }
        Err(e) => SessionEnd::failed(None, vhost::vhost_user::Error::SocketError(e)),
    };
    handler.reset();
    end
}

fn session(
    handler: &VhostUserBlk,
    requests: &mut BackendReqHandler<VhostUserBlk>,
    stream: &UnixStream,
    stop: BorrowedFd<'_>,
) -> SessionEnd {
    loop {
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return SessionEnd::failed(None, vhost::vhost_user::Error::SocketError(e.into()));
            }
        }
        if fds[1].any().unwrap_or(true) {
            return SessionEnd::Stopped;
        }
        let request = match peek_backend_channel(stream) {
            Ok(Peek::Closed) => return SessionEnd::Closed,
            Ok(Peek::Channel(fd)) => {
                handler.offer_backend_channel(fd);
                Some(SET_BACKEND_REQ_FD)
            }
            Ok(Peek::Other(request)) => request,
            Err(e) => return SessionEnd::failed(None, vhost::vhost_user::Error::SocketError(e)),
        };
        let result = if request == Some(SET_MEM_TABLE) {
            set_mem_table(handler, stream)
        } else {
            requests.handle_request()
        };
        match result {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::Disconnected) => return SessionEnd::Closed,
            Err(e) => return SessionEnd::failed(request, e),
        }
    }
}

/// Receives and answers `SET_MEM_TABLE` here rather than in the `vhost` crate, which
/// requires the body to hold exactly the regions it counts. User-Mode Linux always sends its
/// whole two-region structure with a count of 1 (as QEMU's own backends accept): the regions
/// past the count are ignored.
fn set_mem_table(handler: &VhostUserBlk, stream: &UnixStream) -> vhost::vhost_user::Result<()> {
    use vhost::vhost_user::Error;
    let mut header = [0u8; HEADER_BYTES];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (received, files) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::SocketError(e.into()))?;
        let mut files = Vec::new();
        for control in message.cmsgs().map_err(|e| Error::SocketError(e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = control {
                files.extend(raw.into_iter().map(|fd| {
                    // SAFETY: the kernel installed `fd` in our table for this recvmsg call
                    // and nothing else refers to it; taking ownership closes it later.
                    #[allow(unsafe_code)]
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    std::fs::File::from(fd)
                }));
            }
        }
        (message.bytes, files)
    };
    if received != HEADER_BYTES {
        return Err(Error::PartialMessage);
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (flags, size) = (word(4), word(8) as usize);
    if flags & 0x3 != FLAG_VERSION || !(8..=MAX_BODY_BYTES).contains(&size) {
        return Err(Error::InvalidMessage);
    }
    let mut body = vec![0u8; size];
    std::io::Read::read_exact(&mut &*stream, &mut body).map_err(|_| Error::PartialMessage)?;
    let regions = decode_mem_table(&body, MAX_FDS).ok_or(Error::InvalidMessage)?;
    if files.len() != regions.len() {
        return Err(Error::InvalidMessage);
    }
    let result = handler.map_memory(&regions, &files);
    if flags & FLAG_NEED_REPLY != 0 && handler.reply_ack() {
        let mut reply = [0u8; HEADER_BYTES + 8];
        reply[0..4].copy_from_slice(&SET_MEM_TABLE.to_le_bytes());
        reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(result.is_err()).to_le_bytes());
        std::io::Write::write_all(&mut &*stream, &reply).map_err(Error::SocketError)?;
    }
    result.map_err(Into::into)
}

enum Peek {
    /// The frontend closed the connection.
    Closed,
    /// The next message is `SET_BACKEND_REQ_FD`; here is a duplicate of its socket.
    Channel(OwnedFd),
    /// Anything else: the request code, if a whole header was there.
    Other(Option<u32>),
}

/// Looks at the next message without consuming it. For `SET_BACKEND_REQ_FD`, peeking the
/// ancillary data makes the kernel install a duplicate of the attached socket: the `vhost`
/// crate still receives the message (and its own copy) as usual, and we keep ours, because
/// its `Backend` type cannot send `CONFIG_CHANGE_MSG`.
fn peek_backend_channel(stream: &UnixStream) -> std::io::Result<Peek> {
    let mut header = [0u8; HEADER_BYTES];
    let peeked = {
        let mut iov = [IoSliceMut::new(&mut header)];
        // No control buffer: attached descriptors are not installed by this look.
        recvmsg::<()>(stream.as_raw_fd(), &mut iov, None, MsgFlags::MSG_PEEK)
            .map_err(std::io::Error::from)?
            .bytes
    };
    if peeked == 0 {
        return Ok(Peek::Closed);
    }
    let code = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if peeked < HEADER_BYTES {
        return Ok(Peek::Other(None));
    }
    if code != SET_BACKEND_REQ_FD {
        return Ok(Peek::Other(Some(code)));
    }
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut header)];
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_PEEK | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for control in message.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = control {
            fds.extend(raw.into_iter().map(|fd| {
                // SAFETY: the kernel installed `fd` in our table for this recvmsg call and
                // nothing else refers to it; taking ownership here is what closes it later.
                #[allow(unsafe_code)]
                unsafe {
                    OwnedFd::from_raw_fd(fd)
                }
            }));
        }
    }
    // The vhost crate refuses the message unless it carries exactly one descriptor.
    Ok(match fds.len() {
        1 => Peek::Channel(fds.remove(0)),
        _ => Peek::Other(Some(code)),
    })
}
