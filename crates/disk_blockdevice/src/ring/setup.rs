//! Building a ring: the kernel's features and the opcodes a disk needs.

use super::completion::owner::{OWNER_WAIT_BOUND, OwnerRequests, OwnerState, Signal};
use super::fixed::FixedBuffers;
use super::table::{Slot, SlotState, Table};
use super::{Completions, Owned, Ring, Shared};
use io_uring::{IoUring, Probe, opcode, types};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Whether the running kernel's version is at least `(major, minor)`, from `uname`.
pub(super) fn kernel_at_least((major, minor): (u32, u32)) -> bool {
    // SAFETY: `utsname` is plain data, for which all zeroes is a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uname` fills the structure it is given, which is live and writable.
    if unsafe { libc::uname(&mut name) } != 0 {
        return false;
    }
    // SAFETY: `uname` stores a NUL-terminated string in `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    release_at_least(&release.to_string_lossy(), (major, minor))
}

/// Whether a kernel release string such as `6.18.0-1-amd64` is at least `(major, minor)`.
pub(super) fn release_at_least(release: &str, wanted: (u32, u32)) -> bool {
    let mut numbers = release.split('.').map(|part| {
        part.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= wanted,
        _ => false,
    }
}

/// The opcodes a disk needs, checked with `IORING_REGISTER_PROBE` when the ring is built.
pub(crate) const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Readv::CODE, "IORING_OP_READV"),
    (opcode::Writev::CODE, "IORING_OP_WRITEV"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Nop::CODE, "IORING_OP_NOP"),
];

/// The opcode a disk over a regular file needs in addition (discard and write-zeroes).
pub(crate) const FILE_OPCODES: &[(u8, &str)] = &[(opcode::Fallocate::CODE, "IORING_OP_FALLOCATE")];

/// Building the ring failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed: the kernel lacks io_uring or it is disabled
    /// (`kernel.io_uring_disabled`, a seccomp filter).
    #[error("io_uring is unavailable")]
    Setup(#[source] io::Error),
    /// Registering the probe or the file failed.
    #[error("io_uring registration failed")]
    Register(#[source] io::Error),
    /// The kernel's io_uring lacks an opcode the disk needs.
    #[error("io_uring lacks {0}")]
    MissingOpcode(&'static str),
    /// The completion thread could not be started.
    #[error("cannot start the completion thread")]
    Thread(#[source] io::Error),
    /// [`Completions::Tokio`] was asked for outside a tokio runtime, or on a runtime without
    /// I/O enabled.
    #[cfg(feature = "tokio")]
    #[error("the tokio completion mode needs a tokio runtime with I/O enabled")]
    NoRuntime,
    /// The eventfd for [`Completions::Tokio`] could not be created or registered.
    #[cfg(feature = "tokio")]
    #[error("cannot set up the completion eventfd")]
    EventFd(#[source] io::Error),
    /// The eventfd that wakes the owner in [`Completions::Owner`] mode could not be created.
    #[error("cannot create the owner's eventfd")]
    OwnerEventFd(#[source] io::Error),
    /// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver) on a disk that is not in
    /// [`Completions::Owner`] mode.
    #[error("the disk's ring is not in owner mode")]
    NotOwnerMode,
    /// [`BlockDeviceDisk::driver`](crate::BlockDeviceDisk::driver) on a thread other than the
    /// one that owns the ring.
    #[error("another thread owns the disk's ring")]
    OwnedElsewhere,
    /// Enabling the ring for its owner (`IORING_REGISTER_ENABLE_RINGS`) failed.
    #[error("cannot enable the ring for its owner")]
    Enable(#[source] io::Error),
    /// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers):
    /// the memory could not be registered (`ENOMEM`: over `RLIMIT_MEMLOCK` without
    /// `CAP_IPC_LOCK`; `EFAULT`: memory the kernel cannot pin for long, such as a shared
    /// mapping of a file on a regular file system; `EBUSY`: a new buffer table was needed
    /// while requests were in flight). Nothing stays registered; the disk works as before,
    /// without fixed buffers.
    #[error("cannot register guest memory with the ring")]
    RegisterMemory(#[source] io::Error),
}

impl Ring {
    /// A ring of `entries` slots over `fd`, which must stay open for the ring's lifetime.
    /// Fails if io_uring is unavailable or lacks one of `opcodes`.
    pub(crate) fn new(
        fd: RawFd,
        entries: u32,
        opcodes: &[(u8, &'static str)],
        completions: Completions,
        completion_spin: Duration,
    ) -> Result<Self, RingError> {
        let shared = Self::build(Some(fd), entries, opcodes, completions, completion_spin)?;
        match completions {
            Completions::Thread => {
                shared.start_thread().map_err(RingError::Thread)?;
                Ok(Self {
                    shared,
                    #[cfg(feature = "tokio")]
                    reactor: None,
                })
            }
            #[cfg(feature = "tokio")]
            Completions::Tokio => {
                let reactor = super::completion::tokio::spawn(&shared)?;
                Ok(Self {
                    shared,
                    reactor: Some(reactor),
                })
            }
            Completions::Owner => Ok(Self {
                shared,
                #[cfg(feature = "tokio")]
                reactor: None,
            }),
        }
    }

    /// A ring of `entries` slots over no file in particular (its requests name their
    /// descriptors), with no completion thread: whoever holds it reaps (see
    /// [`ThreadRing`](super::completion::io_thread::ThreadRing)).
    pub(crate) fn unattached(
        entries: u32,
        opcodes: &[(u8, &'static str)],
    ) -> Result<Self, RingError> {
        Ok(Self {
            shared: Self::build(None, entries, opcodes, Completions::Thread, Duration::ZERO)?,
            #[cfg(feature = "tokio")]
            reactor: None,
        })
    }

    /// The ring and its table, with `fd` registered as fixed file 0 if given.
    fn build(
        fd: Option<RawFd>,
        entries: u32,
        opcodes: &[(u8, &'static str)],
        completions: Completions,
        completion_spin: Duration,
    ) -> Result<Arc<Shared>, RingError> {
        let owner_mode = completions == Completions::Owner;
        // In owner mode, entries beyond the slots for the eventfd poll, the timeout and its
        // removal.
        let reserved = if owner_mode { 3 } else { 0 };
        let mut builder = IoUring::builder();
        if owner_mode {
            // The ring is enabled by the thread that claims it, which becomes its single
            // issuer.
            builder
                .setup_cqsize((entries + reserved) * 2)
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled();
        } else {
            // The completion queue is twice the slots, so it can never overflow.
            builder.setup_cqsize(entries * 2);
            if fd.is_none() {
                // A thread's ring: its thread enters the kernel all the time (its wait loop
                // polls), so completions' task work need not interrupt it with an IPI each.
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            // Not COOP_TASKRUN on a disk's ring: it made no measurable difference
            // (benchmarks.md), and it would hold back the completions of a submitter that
            // computes without entering the kernel.
        }
        // With `SUBMIT_ALL` (Linux 5.18) an entry the kernel fails to set up completes with
        // its error instead of ending the submission there, leaving the entries after it
        // queued; without it, `submit` notices what was left (see there).
        builder.setup_submit_all();
        let ring = match builder.build(entries + reserved) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !owner_mode => {
                IoUring::builder().setup_cqsize(entries * 2).build(entries)
            }
            built => built,
        }
        .map_err(RingError::Setup)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Register)?;
        for &(code, name) in REQUIRED_OPCODES.iter().chain(opcodes) {
            if !probe.is_supported(code) {
                return Err(RingError::MissingOpcode(name));
            }
        }
        let fixed = FixedBuffers {
            vectored: probe.is_supported(opcode::ReadvFixed::CODE)
                && probe.is_supported(opcode::WritevFixed::CODE),
            ..FixedBuffers::default()
        };
        // A registered file saves the kernel a descriptor lookup and reference per request.
        if let Some(fd) = fd {
            ring.submitter()
                .register_files(&[fd])
                .map_err(RingError::Register)?;
        }
        // As many slots as asked for (the kernel rounds the queue up to a power of two).
        let slots = entries.min(ring.params().sq_entries() - reserved);
        let owner = if owner_mode {
            // SAFETY: `eventfd` takes no pointers; a non-negative result is a new descriptor
            // that nothing else owns.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(RingError::OwnerEventFd(io::Error::last_os_error()));
            }
            Some(OwnerState {
                signal: Arc::new(Signal {
                    // SAFETY: see above: `fd` is open and owned by no one else.
                    eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
                    woken: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                }),
                thread: OnceLock::new(),
                enabled: AtomicBool::new(false),
                poll_window: AtomicU64::new(0),
                tick: types::Timespec::from(OWNER_WAIT_BOUND),
            })
        } else {
            None
        };
        let table = Table {
            slots: (0..slots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    owned: Owned::None,
                    iovecs: Vec::new(),
                    fixed: false,
                })
                .collect(),
            free: (0..slots).rev().collect(),
            fixed,
            outstanding: 0,
            waiting: VecDeque::new(),
            pushed: 0,
            owner: owner_mode.then(OwnerRequests::new),
        };
        Ok(Arc::new(Shared {
            ring,
            table: Mutex::new(table),
            queued: AtomicUsize::new(0),
            submitting: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
            spin: completion_spin,
            owner,
            io_log: Default::default(),
        }))
    }
}
