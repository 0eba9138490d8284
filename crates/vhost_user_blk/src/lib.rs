//! A vhost-user-blk backend: the [`virtio_block`] device core served to a VMM over a Unix
//! socket, for any [`Disk`](disk_backend::Disk).
//!
//! In vhost-user the VMM (the *frontend*: QEMU, Cloud Hypervisor, User-Mode Linux) keeps the
//! guest and shares its memory and doorbells; this process (the *backend*) owns the
//! virtqueues and the disk. The `vhost` crate decodes the protocol; this crate answers it:
//!
//! - [`memory`]: `SET_MEM_TABLE`'s body decoded and its file descriptors mapped into one
//!   [`GuestMemory`](guestmem::GuestMemory), and the frontend's ring addresses translated to
//!   guest physical addresses through that table.
//! - [`VhostUserBlk`]: features and protocol features, ring size, addresses, base, kick,
//!   call and enable, configuration space, reset; it drives a
//!   [`BlockDevice`](virtio_block::BlockDevice) through the same `VirtioDevice` trait the
//!   MMIO transport uses, so every request runs through `virtio_block`'s parsing and its
//!   asynchronous engine, not a copy of them.
//! - [`inflight`]: `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`. The frontend keeps a shared
//!   region recording which requests the backend took and has not completed; a backend
//!   killed and restarted (SIGKILL, a crash) resubmits exactly those, oldest first, when the
//!   frontend reconnects, so the guest sees every request complete once and none lost.
//! - [`Server`]: one connection at a time, a fresh device per connection (a frontend that
//!   reconnects starts clean, or from its inflight region), configuration-change messages
//!   when the disk is resized, and a clean stop (requests in flight completed, disk flushed).
//!
//! It is not a general vhost-user framework: one device type, split rings only, no
//! migration (dirty logging, device state).
//!
//! ```no_run
//! use disk_backend::Disk;
//! use disk_ram::RamDisk;
//! use std::os::fd::AsFd;
//! use vhost_user_blk::Server;
//! use virtio_block::BlockConfig;
//!
//! let disk = Disk::new(RamDisk::new(2048, 512)?)?;
//! let server = Server::bind("/tmp/disk.sock", disk, BlockConfig::default())?;
//! // Writing a byte to `stop_writer` (a signal handler can) ends `run`.
//! let (stop_reader, stop_writer) = std::os::unix::net::UnixStream::pair()?;
//! server.run(stop_reader.as_fd(), |event| eprintln!("{event:?}"))?;
//! # drop(stop_writer);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// `unsafe` is denied except where the server takes ownership of the file descriptors
// `recvmsg` installs (two blocks in `server.rs`), which no safe wrapper returns owned.
// Everything else goes through safe wrappers.
#![deny(unsafe_code)]

mod backend;
pub mod inflight;
mod interrupt;
mod kick;
pub mod memory;
mod server;

pub use backend::{DEFAULT_POLL_MAX, MIN_EXPECTED_RING, RequestError, VhostUserBlk};
pub use kick::POLL_START;
pub use server::{BindError, Event, ServeError, Server, SessionEnd, serve_connection};
