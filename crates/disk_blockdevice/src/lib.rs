//! A disk backed by a Linux block device or a regular file, served through io_uring.
//!
//! [`BlockDeviceDisk`] opens a block device (`/dev/nvme0n1`, `/dev/loop3`) or a regular file,
//! by default with `O_DIRECT`, reads its geometry from ioctls and sysfs, and serves
//! [`DiskIo`](disk_backend::DiskIo) with many requests in flight on one io_uring per disk:
//!
//! - **Zero-copy** when the guest's buffers are aligned to the logical sector size (or
//!   always, without `O_DIRECT`): the kernel reads and writes the locked guest pages
//!   directly. Unaligned buffers go through a page-aligned bounce buffer.
//! - **Fixed buffers** (opt-in, [`BlockDeviceOptions::fixed_buffers`]): guest memory a
//!   frontend announces with [`DiskIo::register_memory`](disk_backend::DiskIo::register_memory)
//!   (virtio-blk does at activation) is registered with the ring once, and requests in it
//!   use `IORING_OP_READ_FIXED` and friends: the kernel no longer pins and unpins their
//!   pages per request (a quarter of the kernel time of a 4 KiB request), at the price of
//!   guest RAM staying pinned and not discarded (see
//!   [`register_fixed_buffers`](BlockDeviceDisk::register_fixed_buffers)).
//!   [`BlockDeviceDisk::fixed_buffer_stats`] shows whether it took. In a resolver spec:
//!   `blockdev(PATH, fixed_buffers)`.
//! - **Batched submission**: requests push their entries under one lock, and one
//!   `io_uring_enter` submits everything queued while it runs.
//! - **Any executor**: futures work under tokio, `futures::executor::block_on`, or anything
//!   else; see [Completions](#completions) for who reaps the kernel's completions.
//! - **Dropped futures are safe**: the memory the kernel uses belongs to the ring until the
//!   completion arrives, not to the future.
//! - FUA is `RWF_DSYNC`, flush is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`; discard
//!   is `BLKDISCARD` on a device and a punched hole in a file; [`write_zeroes`] uses
//!   `BLKZEROOUT` or `FALLOC_FL_ZERO_RANGE`. A short transfer is continued, a transfer of
//!   nothing is an error, and a file never grows.
//! - **Resize**: a kernel uevent listener notices a device's capacity change (`losetup -c`,
//!   a grown virtual disk) and completes [`wait_resize`](disk_backend::DiskIo::wait_resize).
//! - **Persistent reservations** through the `IOC_PR_*` ioctls where the device has them;
//!   **eject** for removable media; read-only devices refuse writes with
//!   [`DiskError::ReadOnly`](disk_backend::DiskError::ReadOnly).
//!
//! # Completions
//!
//! The completion queue is shared memory, read under the lock of the ring's request table by
//! whoever gets there first:
//!
//! - **Inline**, by the request futures themselves: each poll of a request, and each
//!   submission, reaps whatever completions are queued (up to 32 at a time) and wakes their
//!   futures. On a busy executor most completions are found this way, on the executor's own
//!   thread. Always on.
//! - **Thread rings**, the default wherever a thread drives its own I/O: a thread inside a
//!   [`disk_backend::io_thread::IoThread`] (the vhost-user export's queue threads,
//!   `diskctl bench`) has a ring of its own, made on first use, and the requests first
//!   polled on it go there rather than to the disk's ring. The ring signals an eventfd
//!   (`IORING_REGISTER_EVENTFD`) that the thread waits on with its other events; it reaps
//!   its completions itself and runs the woken futures there, so a request costs no thread
//!   hand-off from kick to completion. One ring serves every disk polled on the thread
//!   (its entries name each disk's descriptor instead of a registered file). Used by disks
//!   in [`Completions::Thread`] mode without fixed buffers
//!   ([`BlockDeviceOptions::thread_rings`]; `completions=thread` in a spec turns it off).
//!   When the `IoThread` ends with requests in flight, its ring gets a completion thread.
//!   A thread inside an `IoThread` must wait only through its loop: blocking it on a
//!   request some other way (a nested `block_on`) would wait for completions nobody reaps.
//! - [`Completions::Thread`] (the default mode of the disk's own ring): a completion thread
//!   per disk sleeps in `io_uring_enter` and wakes the futures whose completions nobody
//!   reaped inline, so a future whose executor sleeps is woken too. Works under every
//!   executor.
//! - [`Completions::Tokio`] (cargo feature `tokio`, on by default): no completion thread.
//!   The disk registers an eventfd with the ring (`IORING_REGISTER_EVENTFD`), and a task on
//!   the tokio runtime that is current at [`BlockDeviceDisk::open`] waits for it through the
//!   runtime's own reactor, then reaps and wakes. A completion then costs no hand-off between
//!   threads when the futures run on that runtime (up to about 10 % more IOPS than the
//!   default at queue depth 32, and at queue depth 1 on a disk-backed device:
//!   `docs/benchmarks.md`). The futures still work under any
//!   executor as long as the runtime runs (a current-thread runtime runs only while something
//!   blocks on it); if the runtime shuts down before the disk is dropped, a completion thread
//!   takes over. Opening fails with [`RingError::NoRuntime`] outside a runtime with I/O
//!   enabled. In a resolver spec: `blockdev(PATH, completions=tokio)`.
//!
//! - [`Completions::Owner`]: one thread owns the ring (`SINGLE_ISSUER | DEFER_TASKRUN`, as
//!   fio) and runs the futures with the [`OwnerDriver`] from [`BlockDeviceDisk::driver`],
//!   which submits and waits for completions in one `io_uring_enter` when the futures are
//!   idle, as fio's own loop does; with many requests in flight it wakes once per quarter of
//!   them. Requests polled on other threads wake the owner and progress only while it
//!   drives. The fastest mode: 0.9 to 1.0× fio's IOPS at queue depth 32 at memory speed
//!   (0.95 to 1.02× with fixed buffers; 0.65 to 0.75× for the other modes), 1.03 to 1.15×
//!   on a disk-backed device, and with
//!   `completion_spin` (adaptive polling) at or below fio's latency at queue depth 1
//!   (`docs/benchmarks.md`). Not available in a resolver spec, which cannot hand out the
//!   driver.
//!
//! [`BlockDeviceOptions::completion_spin`] makes the completion thread poll for a fixed time
//! before it sleeps (one or two requests in flight), and the owner poll for an adaptive
//! window of at most that long (any depth), at the price of a busy core while completions
//! come that fast.
//!
//! io_uring and every opcode the disk uses are probed at open: a kernel without them fails
//! [`BlockDeviceDisk::open`] with [`OpenError::Ring`], never the first I/O.
//!
//! It is not a cache, a format (raw sectors only) or portable: Linux only.
//!
//! ```no_run
//! use disk_backend::Disk;
//! use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions};
//! use request_buffers::OwnedRequestBuffers;
//!
//! let disk = Disk::new(BlockDeviceDisk::open("/dev/loop0", &BlockDeviceOptions::default())?)?;
//! let buffer = OwnedRequestBuffers::new(4096);
//! futures::executor::block_on(disk.read_vectored(&buffer.buffers(true), 0))?;
//! println!("{} sectors of {} bytes", disk.sector_count(), disk.sector_size());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`write_zeroes`]: BlockDeviceDisk::write_zeroes

// The reasons for unsafe here: io_uring takes raw pointers to the memory it reads and
// writes (locked guest pages, bounce buffers, iovec arrays) that must outlive the request,
// and the block device ioctls and the netlink socket have no safe wrappers.
#![allow(unsafe_code)]
#![cfg(target_os = "linux")]

mod disk;
pub mod io_log;
mod pr;
mod resolve;
mod ring;
mod sys;
mod uevent;

pub use disk::{BlockDeviceDisk, BlockDeviceOptions, Geometry, MAX_QUEUE_DEPTH, OpenError};
pub use io_log::Submission;
pub use resolve::BlockDeviceResolver;
pub use ring::{Completions, FixedBufferStats, OwnerDriver, RingError};
pub use sys::DeviceNumber;
