//! A vhost-user-blk backend: the [`virtio_block`] device core served to a VMM over a Unix
//! socket, for any [`Disk`](disk_backend::Disk).
//!
//! In vhost-user the VMM (the *frontend*: QEMU, Cloud Hypervisor, User-Mode Linux, or a
//! userspace driver such as libblkio, with no VM at all) keeps the
//! guest and shares its memory and doorbells; this process (the *backend*) owns the
//! virtqueues and the disk. The `vhost` crate decodes the protocol; this crate answers it:
//!
//! - [`memory`]: the frontend's memory regions mapped from their file descriptors into one
//!   [`GuestMemory`](guestmem::GuestMemory), whole (`SET_MEM_TABLE`) or region by region
//!   (`VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS`: `GET_MAX_MEM_SLOTS`, `ADD_MEM_REG`,
//!   `REM_MEM_REG`, which libblkio requires), regions of any size and alignment; and the
//!   frontend's ring addresses translated to guest physical addresses through the table.
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
//! # Memory that changes while rings run
//!
//! The device core reads guest memory through the [`GuestMemory`](guestmem::GuestMemory)
//! handle it was activated with, and every request in flight holds a clone of it. A handle
//! never changes, and a region's mapping lives as long as any handle that holds it. So
//! when the frontend adds or removes a region, the backend builds a new handle that shares
//! the mappings of the regions that stay, stops the running rings (which waits for the
//! requests in flight: they finish in the old handle's memory, still mapped in this process
//! whatever the frontend has done with its own mapping), and starts them again in the new
//! handle, translating their addresses through the new table; only then is the message
//! answered. After a `REM_MEM_REG` has been answered, nothing of the backend touches the
//! removed region: a request read from a ring afterwards that points into it fails with
//! `VIRTIO_BLK_S_IOERR`, as any address outside guest memory does, and its mapping goes
//! when the last old handle does. A ring whose own memory was removed stays stopped,
//! keeping its indices, until a region that holds it is added again (QEMU removes and adds
//! a region when it changes shape). This costs a ring restart per region change, which
//! frontends make while setting up and when the VM's memory layout changes, never per
//! request.
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
