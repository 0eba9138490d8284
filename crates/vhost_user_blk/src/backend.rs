//! The vhost-user request handler: the protocol state of one connection, driving a
//! [`BlockDevice`] through the [`VirtioDevice`] trait as the MMIO transport does.
//!
//! vhost-user has no `DRIVER_OK`: each ring starts on its own, once it has a size, addresses,
//! a kick eventfd, a memory table to live in and (with `VHOST_USER_F_PROTOCOL_FEATURES`)
//! `SET_VRING_ENABLE`; `GET_VRING_BASE` stops it. The device core activates its queues
//! together, so whenever the set of running rings changes the handler stops the device
//! (waiting for the requests in flight), keeps each ring's indices, and activates it again
//! with the new set. That happens a handful of times while a frontend sets up, never per
//! request.
//!
//! The memory table changes while rings run when the frontend adds or removes regions
//! (`CONFIGURE_MEM_SLOTS`): the handler builds the new table, then restarts the running
//! rings in it the same way, so that requests in flight finish in the old memory (still
//! mapped: their handle holds it) before the message is answered, and the rings' addresses
//! are translated again through the new table. A ring whose memory is gone waits, stopped,
//! until a region holding it comes back.

use crate::inflight::{InflightError, InflightRegion, QueueInflight, Recovery};
use crate::interrupt::Interrupt;
use crate::kick::KickWorker;
use crate::memory::{MAX_MEM_SLOTS, MapMemoryError, MemoryRegion, MemoryTable};
use disk_backend::Disk;
use parking_lot::{Mutex, RwLock};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandler};
use virtio_block::{
    ActivateError, BlockConfig, BlockDevice, InflightLog, IrqLine, NewDeviceError, QueueConfig,
    QueueState, VirtioDevice,
};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit in the virtio feature word.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The protocol features the backend offers. `REPLY_ACK` is added (and handled) by the
/// `vhost` crate.
fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// How long, at most, a queue's thread keeps checking for the guest's next kick before it
/// sleeps: the poll window grows up to this while kicks follow each other closely and drops
/// to nothing when they stop. Long enough for a slow guest's next request (User-Mode Linux
/// takes about 100 µs between a completion and its next kick at queue depth 1).
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(200);

/// The smallest ring the backend expects a frontend to choose. The frontend picks ring
/// sizes after reading `seg_max`, and a request may not need more descriptors than its ring
/// has: User-Mode Linux uses 256 entries, QEMU 128 by default (`queue-size`) on PCI and 1024
/// on virtio-mmio.
pub const MIN_EXPECTED_RING: u16 = 128;

/// The largest configuration-space window a frontend may read or write. The block
/// configuration is 60 bytes; newer frontends ask for the zoned and secure-erase fields
/// after it, which read as zero.
const CONFIG_SPACE_LIMIT: u64 = 0x100;

/// A request from the frontend was refused. The `vhost` crate answers with a failure when
/// the frontend asked for `REPLY_ACK`; the server then ends the connection.
#[derive(Debug, Error)]
pub enum RequestError {
    /// The queue index is not one of the device's queues.
    #[error("queue index {0} is out of range")]
    QueueIndex(u32),
    /// The ring size is not a power of two up to the device's maximum.
    #[error("queue {index} cannot have {size} entries")]
    QueueSize {
        /// The queue.
        index: u32,
        /// The size asked for.
        size: u32,
    },
    /// A split ring's index is 16 bits wide.
    #[error("vring base {0} does not fit a split ring index")]
    VringBase(u32),
    /// The ring is running; its base can only change while it is stopped.
    #[error("queue {0} is running")]
    Running(u32),
    /// The frontend accepted virtio features the device does not offer.
    #[error("feature bits {0:#x} were not offered")]
    Features(u64),
    /// The frontend accepted protocol features the backend does not offer.
    #[error("protocol feature bits {0:#x} were not offered")]
    ProtocolFeatures(u64),
    /// A configuration-space access outside the window.
    #[error("configuration access of {size} bytes at offset {offset} is out of range")]
    ConfigRange {
        /// Offset of the access.
        offset: u32,
        /// Its length.
        size: usize,
    },
    /// `SET_VRING_KICK` without a file descriptor asks the backend to poll the ring.
    #[error("queue {0}: polling a ring without a kick eventfd is not supported")]
    NoKickFd(u8),
    /// A ring address is outside every region of the memory table.
    #[error("queue {index}: ring address {user_addr:#x} is not in any memory region")]
    Unmapped {
        /// The queue.
        index: usize,
        /// The frontend's address.
        user_addr: u64,
    },
    /// The memory table, or a region added to it, could not be mapped.
    #[error("cannot map the memory table")]
    Memory(#[source] MapMemoryError),
    /// `REM_MEM_REG` names no region of the table (regions are named by guest address,
    /// size and user address).
    #[error(
        "no memory region {guest_phys_addr:#x}+{memory_size:#x} at user address {user_addr:#x} to remove"
    )]
    UnknownRegion {
        /// The guest physical address named.
        guest_phys_addr: u64,
        /// The size named.
        memory_size: u64,
        /// The user address named.
        user_addr: u64,
    },
    /// A ring could not go live (misaligned or outside guest memory), or the device's I/O
    /// thread could not start.
    #[error("cannot start the rings")]
    Activate(#[source] ActivateError),
    /// The kick thread could not start.
    #[error("cannot start a kick thread")]
    Thread(#[source] std::io::Error),
    /// A kick file descriptor could not be made non-blocking.
    #[error("queue {index}: unusable kick file descriptor")]
    KickFd {
        /// The queue.
        index: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A call file descriptor could not be made non-blocking.
    #[error("unusable call file descriptor")]
    CallFd(#[source] std::io::Error),
    /// The inflight region could not be created or mapped, or a ring cannot recover from
    /// what it holds (the ring stays stopped).
    #[error("inflight tracking failed")]
    Inflight(#[source] InflightError),
    /// `SET_INFLIGHT_FD` while rings run: their requests are recorded in the old region.
    #[error("the inflight region cannot change while rings run")]
    InflightWhileRunning,
    /// A request for a protocol feature the backend does not offer.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

impl From<RequestError> for vhost::vhost_user::Error {
    fn from(error: RequestError) -> Self {
        // The `vhost` crate's error shows the handler's error but not its causes: put the
        // whole chain in the message so that the operator sees why.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::ReqHandlerError(std::io::Error::other(message))
    }
}

type Result<T> = std::result::Result<T, vhost::vhost_user::Error>;

/// Ring addresses as the frontend gave them: its own (user) addresses.
#[derive(Clone, Copy, Debug)]
struct RingAddresses {
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Vring {
    size: Option<u16>,
    addresses: Option<RingAddresses>,
    state: QueueState,
    enabled: bool,
    kick: Option<KickWorker>,
    /// The ring ran until a region it lives in was removed (`REM_MEM_REG`): it waits,
    /// stopped, for memory that holds it again, instead of failing the next message. Cleared
    /// when it runs again or gets new addresses.
    parked: bool,
}

#[derive(Debug)]
struct Session {
    acked_features: u64,
    protocol_features: u64,
    memory: Option<MemoryTable>,
    vrings: Vec<Vring>,
    /// Which rings the device is running.
    live: Vec<bool>,
    /// The inflight region (`GET_INFLIGHT_FD`/`SET_INFLIGHT_FD`), which the rings record
    /// their requests in and recover from when they start.
    inflight: Option<InflightRegion>,
    /// A duplicate of the backend request channel the frontend is sending, taken by the
    /// server before the `vhost` crate consumes the message (see `server.rs`).
    pending_channel: Option<OwnedFd>,
}

impl Session {
    fn new(queues: u16) -> Self {
        Self {
            acked_features: 0,
            protocol_features: 0,
            memory: None,
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            live: vec![false; queues.into()],
            inflight: None,
            pending_channel: None,
        }
    }

    fn wanted(&self, index: usize) -> bool {
        let vring = &self.vrings[index];
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        let enabled = vring.enabled || self.acked_features & PROTOCOL_FEATURES == 0;
        self.memory.is_some() && vring.kick.is_some() && vring.addresses.is_some() && enabled
    }
}

/// The backend side of one vhost-user-blk connection: a [`BlockDevice`] over a [`Disk`],
/// configured by the frontend's messages.
///
/// It implements the `vhost` crate's [`VhostUserBackendReqHandler`]; the crate's
/// `BackendReqHandler` decodes messages and calls it. Use a fresh one per connection
/// ([`Server`](crate::Server) does).
#[derive(Debug)]
pub struct VhostUserBlk {
    queue_max_size: u16,
    /// The longest poll window of the kick threads, in nanoseconds.
    poll_max_ns: AtomicU64,
    /// Kick threads serve their queues under the read lock, in parallel; the control path
    /// (messages, restarts) takes the write lock.
    device: Arc<RwLock<BlockDevice>>,
    interrupt: Arc<Interrupt>,
    session: Mutex<Session>,
}

impl VhostUserBlk {
    /// A backend serving `disk` as `config` describes (queues, sizes, read-only, ...).
    ///
    /// Unless `config.seg_max` says otherwise, requests are limited to fit a ring of
    /// [`MIN_EXPECTED_RING`] entries (or of the maximum queue size, if smaller).
    pub fn new(disk: Disk, mut config: BlockConfig) -> std::result::Result<Self, NewDeviceError> {
        if config.seg_max.is_none() && config.queue_size >= 4 {
            config.seg_max = Some(u32::from(config.queue_size.min(MIN_EXPECTED_RING)) - 2);
        }
        let queues = config.num_queues;
        let queue_max_size = config.queue_size;
        let device = BlockDevice::new(config, disk)?;
        Ok(Self {
            queue_max_size,
            poll_max_ns: AtomicU64::new(DEFAULT_POLL_MAX.as_nanos() as u64),
            device: Arc::new(RwLock::new(device)),
            interrupt: Arc::new(Interrupt::new(queues)),
            session: Mutex::new(Session::new(queues)),
        })
    }

    /// Hands over a duplicate of the backend request channel the frontend is about to send
    /// with `SET_BACKEND_REQ_FD`; `set_backend_req_fd` keeps it for configuration-change
    /// messages.
    pub fn offer_backend_channel(&self, fd: OwnedFd) {
        self.session.lock().pending_channel = Some(fd);
    }

    /// Sets the longest time a queue's thread keeps checking for the guest's next kick
    /// before it sleeps (default [`DEFAULT_POLL_MAX`]; 0 never polls). The window adapts to
    /// the guest (see [`POLL_START`](crate::POLL_START)); it applies to rings started
    /// afterwards.
    pub fn set_poll_max(&self, max: Duration) {
        let ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        self.poll_max_ns.store(ns, Ordering::Relaxed);
    }

    /// Stops every ring (waiting for the requests in flight), unmaps guest memory and
    /// forgets everything the frontend set up, as a disconnect does.
    pub fn reset(&self) {
        let mut session = self.session.lock();
        let queues = session.vrings.len() as u16;
        // Kick threads take the device lock: stop them before taking it.
        let old = std::mem::replace(&mut *session, Session::new(queues));
        drop(old);
        self.device.write().reset();
        self.interrupt.clear();
    }

    /// `RESET_DEVICE`: stops every ring (waiting for the requests in flight) and returns the
    /// device to its initial state, but keeps what belongs to the connection: the
    /// negotiated protocol features, the backend channel and the memory table. QEMU resets
    /// the device this way before every start and then sends only features and rings.
    fn reset_device_state(&self) {
        let mut session = self.session.lock();
        let queues = session.vrings.len() as u16;
        let mut fresh = Session::new(queues);
        fresh.protocol_features = session.protocol_features;
        fresh.memory = session.memory.take();
        // QEMU hands the region over before it resets and starts the device.
        fresh.inflight = session.inflight.take();
        let old = std::mem::replace(&mut *session, fresh);
        drop(old);
        self.device.write().reset();
        for index in 0..usize::from(queues) {
            self.interrupt.set_call(index, None);
        }
    }

    /// Maps a new memory table (`SET_MEM_TABLE`) and restarts the running rings in it.
    pub(crate) fn map_memory(
        &self,
        regions: &[MemoryRegion],
        files: &[File],
    ) -> std::result::Result<(), RequestError> {
        let table = MemoryTable::map(regions, files).map_err(RequestError::Memory)?;
        let mut session = self.session.lock();
        session.memory = Some(table);
        self.apply(&mut session, true)
    }

    /// Whether the frontend negotiated `REPLY_ACK` (always offered, with
    /// `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub(crate) fn reply_ack(&self) -> bool {
        self.session.lock().protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Whether the device currently runs ring `index`.
    pub fn is_running(&self, index: usize) -> bool {
        self.session
            .lock()
            .live
            .get(index)
            .copied()
            .unwrap_or(false)
    }

    fn vring_index(&self, session: &Session, index: u32) -> Result<usize> {
        let i = index as usize;
        if i < session.vrings.len() {
            Ok(i)
        } else {
            Err(RequestError::QueueIndex(index).into())
        }
    }

    fn queue_config(
        &self,
        session: &Session,
        index: usize,
    ) -> std::result::Result<QueueConfig, RequestError> {
        let vring = &session.vrings[index];
        let (Some(memory), Some(addresses)) = (&session.memory, vring.addresses) else {
            return Ok(QueueConfig::new(self.queue_max_size));
        };
        let translate = |user_addr| {
            memory
                .translate(user_addr)
                .ok_or(RequestError::Unmapped { index, user_addr })
        };
        Ok(QueueConfig {
            max_size: self.queue_max_size,
            size: vring.size.unwrap_or(self.queue_max_size),
            ready: true,
            desc_table: translate(addresses.desc)?,
            avail_ring: translate(addresses.avail)?,
            used_ring: translate(addresses.used)?,
        })
    }

    /// Brings the device's running rings in line with what the frontend set up. With
    /// `restart`, running rings are restarted even if the set is unchanged (new memory,
    /// features or ring layout).
    ///
    /// A ring whose addresses are not in the memory table is left stopped; that is an error
    /// (the frontend gave addresses outside its memory), unless `park` says the table lost
    /// the ring's memory now (a region was removed) or the ring already waits for it.
    fn apply(&self, session: &mut Session, restart: bool) -> std::result::Result<(), RequestError> {
        self.apply_with(session, restart, false)
    }

    fn apply_with(
        &self,
        session: &mut Session,
        restart: bool,
        park: bool,
    ) -> std::result::Result<(), RequestError> {
        let queues = session.vrings.len();
        let mut want: Vec<bool> = (0..queues).map(|i| session.wanted(i)).collect();
        let running = session.live.iter().any(|&live| live);
        if want == session.live && !(restart && running) {
            return Ok(());
        }
        let mut result = Ok(());
        let mut configs = vec![QueueConfig::new(self.queue_max_size); queues];
        for (index, config) in configs.iter_mut().enumerate() {
            if !want[index] {
                continue;
            }
            match self.queue_config(session, index) {
                Ok(c) => {
                    *config = c;
                    session.vrings[index].parked = false;
                }
                Err(RequestError::Unmapped { user_addr, .. })
                    if park || session.vrings[index].parked =>
                {
                    want[index] = false;
                    if !session.vrings[index].parked {
                        tracing::warn!(
                            queue = index,
                            user_addr,
                            "vhost-user ring stopped: its memory was removed; it resumes when \
                             a region holding it is added"
                        );
                    }
                    session.vrings[index].parked = true;
                }
                Err(error) => {
                    want[index] = false;
                    result = Err(error);
                }
            }
        }
        let mut device = self.device.write();
        if device.is_activated() {
            // Waits for the requests in flight; the indices carry over to the restart.
            let states = device.save_queues();
            for (index, state) in states.into_iter().enumerate() {
                if session.live[index] {
                    session.vrings[index].state = state;
                }
            }
        }
        // Nothing of this device is in flight now: what the inflight region marks was left
        // by a previous backend, to resubmit.
        let mut resubmits = vec![None; queues];
        for index in 0..queues {
            if !want[index] {
                continue;
            }
            match self.recover(session, index, &configs[index]) {
                Ok(Some((log, recovery))) => {
                    if let Some(state) = recovery.state {
                        session.vrings[index].state = state;
                    }
                    resubmits[index] = Some((log, recovery.resubmit));
                }
                Ok(None) => {}
                Err(error) => {
                    want[index] = false;
                    result = Err(error);
                }
            }
        }
        let states: Vec<QueueState> = session.vrings.iter().map(|v| v.state).collect();
        loop {
            for (index, queue) in device.queues_mut().iter_mut().enumerate() {
                *queue = QueueConfig {
                    ready: want[index],
                    ..configs[index]
                };
            }
            // Only refused for an active device or a different queue count, neither of
            // which can be the case here.
            let _ = device.restore_queues(&states);
            for (index, resubmit) in resubmits.iter().enumerate() {
                if let Some((log, heads)) = resubmit
                    && want[index]
                {
                    let log: Arc<dyn InflightLog> = log.clone();
                    device.set_queue_inflight(index as u16, log, heads.clone());
                }
            }
            if !want.iter().any(|&w| w) {
                break;
            }
            let memory = session
                .memory
                .as_ref()
                .map(|table| table.memory().clone())
                .unwrap_or_else(guestmem::GuestMemory::empty);
            match device.activate(memory, self.interrupt.clone()) {
                Ok(()) => break,
                Err(ActivateError::Queue { index, source }) if want[usize::from(index)] => {
                    // Leave the bad ring out and keep the others running.
                    want[usize::from(index)] = false;
                    result = Err(RequestError::Activate(ActivateError::Queue {
                        index,
                        source,
                    }));
                }
                Err(error) => {
                    want.fill(false);
                    result = Err(RequestError::Activate(error));
                    break;
                }
            }
        }
        session.live.clone_from(&want);
        // Requests posted while the rings were stopped got their kick then; look now.
        for (index, &live) in want.iter().enumerate() {
            if live {
                device.process_queue(index as u16);
            }
        }
        result
    }

    /// Reads ring `index`'s area of the inflight region, if there is one, before the ring
    /// starts: the log to record in, and where the ring resumes with what to resubmit.
    fn recover(
        &self,
        session: &Session,
        index: usize,
        config: &QueueConfig,
    ) -> std::result::Result<Option<(Arc<QueueInflight>, Recovery)>, RequestError> {
        let (Some(region), Some(memory)) = (&session.inflight, &session.memory) else {
            return Ok(None);
        };
        let Some(log) = region.queue(index) else {
            return Ok(None);
        };
        let used_idx = memory
            .memory()
            .read_atomic_u16(config.used_ring + 2)
            .map(u16::from_le)
            .map_err(|source| {
                RequestError::Inflight(InflightError::Access {
                    queue: index as u16,
                    source,
                })
            })?;
        let recovery = log
            .recover(config.size, used_idx)
            .map_err(RequestError::Inflight)?;
        Ok(Some((log.clone(), recovery)))
    }

    fn apply_reply(&self, session: &mut Session, restart: bool) -> Result<()> {
        self.apply(session, restart).map_err(Into::into)
    }
}

impl VhostUserBackendReqHandler for VhostUserBlk {
    fn set_owner(&self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&self) -> Result<()> {
        self.reset_device_state();
        Ok(())
    }

    fn reset_device(&self) -> Result<()> {
        self.reset_device_state();
        Ok(())
    }

    fn get_features(&self) -> Result<u64> {
        Ok(self.device.read().avail_features() | PROTOCOL_FEATURES)
    }

    fn set_features(&self, features: u64) -> Result<()> {
        let offered = self.device.read().avail_features() | PROTOCOL_FEATURES;
        if features & !offered != 0 {
            return Err(RequestError::Features(features & !offered).into());
        }
        let mut session = self.session.lock();
        session.acked_features = features;
        self.device
            .write()
            .set_acked_features(features & !PROTOCOL_FEATURES);
        self.apply_reply(&mut session, true)
    }

    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions: Vec<MemoryRegion> = ctx
            .iter()
            .map(|r| MemoryRegion {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        self.map_memory(&regions, &files)?;
        Ok(None)
    }

    fn set_vring_num(&self, index: u32, num: u32) -> Result<()> {
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index)?;
        let size = u16::try_from(num)
            .ok()
            .filter(|&size| QueueConfig::new(self.queue_max_size).is_valid_size(size))
            .ok_or(RequestError::QueueSize { index, size: num })?;
        session.vrings[i].size = Some(size);
        let restart = session.live[i];
        self.apply_reply(&mut session, restart)
    }

    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        // The log address only matters with VHOST_F_LOG_ALL, which is not offered.
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index)?;
        session.vrings[i].addresses = Some(RingAddresses {
            desc: descriptor,
            avail: available,
            used,
        });
        session.vrings[i].parked = false;
        let restart = session.live[i];
        self.apply_reply(&mut session, restart)
    }

    fn set_vring_base(&self, index: u32, base: u32) -> Result<()> {
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index)?;
        if session.live[i] {
            return Err(RequestError::Running(index).into());
        }
        let base = u16::try_from(base).map_err(|_| RequestError::VringBase(base))?;
        // With nothing in flight the used index has caught up with the available one.
        session.vrings[i].state = QueueState {
            next_avail: base,
            next_used: base,
        };
        Ok(())
    }

    fn get_vring_base(&self, index: u32) -> Result<VhostUserVringState> {
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index)?;
        // The ring stops until the next SET_VRING_KICK. The worker must be gone before the
        // device lock is taken in `apply`, since it takes that lock itself.
        let kick = session.vrings[i].kick.take();
        drop(kick);
        self.apply_reply(&mut session, false)?;
        Ok(VhostUserVringState::new(
            index,
            session.vrings[i].state.next_avail.into(),
        ))
    }

    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> Result<()> {
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index.into())?;
        let fd = fd.ok_or(RequestError::NoKickFd(index))?;
        let old = session.vrings[i].kick.take();
        drop(old);
        let poll_max = Duration::from_nanos(self.poll_max_ns.load(Ordering::Relaxed));
        // A blocking kick fd could block the kick thread in `read` (a frontend that drains
        // the eventfd itself between our `poll` and our `read`), and its drop at disconnect
        // would then wait for the next kick forever.
        let fd = OwnedFd::from(fd);
        set_nonblocking(&fd).map_err(|source| RequestError::KickFd { index, source })?;
        let worker = KickWorker::start(u16::from(index), fd, self.device.clone(), poll_max)
            .map_err(RequestError::Thread)?;
        session.vrings[i].kick = Some(worker);
        self.apply_reply(&mut session, false)?;
        if session.live[i] {
            // The old kick fd may have been signalled after the old worker stopped.
            self.device.read().process_queue(index.into());
        }
        Ok(())
    }

    fn set_vring_call(&self, index: u8, fd: Option<File>) -> Result<()> {
        let line = fd
            .map(|file| IrqLine::eventfd(OwnedFd::from(file)))
            .transpose()
            .map_err(RequestError::CallFd)?;
        if self.interrupt.set_call(index.into(), line) {
            Ok(())
        } else {
            Err(RequestError::QueueIndex(index.into()).into())
        }
    }

    fn set_vring_err(&self, index: u8, _fd: Option<File>) -> Result<()> {
        // The device reports errors through the used ring and DEVICE_NEEDS_RESET semantics,
        // never through the error eventfd, so it is closed at once.
        let session = self.session.lock();
        self.vring_index(&session, index.into()).map(|_| ())
    }

    fn get_protocol_features(&self) -> Result<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&self, features: u64) -> Result<()> {
        let offered = (offered_protocol_features() | VhostUserProtocolFeatures::REPLY_ACK).bits();
        if features & !offered != 0 {
            return Err(RequestError::ProtocolFeatures(features & !offered).into());
        }
        self.session.lock().protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&self) -> Result<u64> {
        Ok(self.session.lock().vrings.len() as u64)
    }

    fn set_vring_enable(&self, index: u32, enable: bool) -> Result<()> {
        let mut session = self.session.lock();
        let i = self.vring_index(&session, index)?;
        session.vrings[i].enabled = enable;
        self.apply_reply(&mut session, false)
    }

    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        let len = size as usize;
        if u64::from(offset) + u64::from(size) > CONFIG_SPACE_LIMIT {
            return Err(RequestError::ConfigRange { offset, size: len }.into());
        }
        let mut data = vec![0; len];
        self.device.read().read_config(offset.into(), &mut data);
        Ok(data)
    }

    fn set_config(&self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        if u64::from(offset) + buf.len() as u64 > CONFIG_SPACE_LIMIT {
            return Err(RequestError::ConfigRange {
                offset,
                size: buf.len(),
            }
            .into());
        }
        self.device.write().write_config(offset.into(), buf);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        // The `vhost` crate's `Backend` cannot send CONFIG_CHANGE_MSG; the duplicate the
        // server took of the same socket can.
        drop(backend);
        let mut session = self.session.lock();
        let channel = session.pending_channel.take();
        let config = session.protocol_features & VhostUserProtocolFeatures::CONFIG.bits() != 0;
        if config {
            self.interrupt
                .set_config_channel(channel.map(UnixStream::from));
        }
    }

    fn set_gpu_socket(&self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(RequestError::Unsupported("a GPU socket").into())
    }

    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(RequestError::Unsupported("SHARED_OBJECT").into())
    }

    fn get_inflight_fd(&self, inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        // Room for the largest ring the device allows, not only the size the frontend asks
        // for: QEMU asks for its `queue-size` (128 by default), but on virtio-mmio it
        // offers the guest 1024 entries and the ring is what the guest picks.
        let desc_num = inflight.queue_size.max(self.queue_max_size);
        let region = InflightRegion::create(inflight.num_queues, desc_num)
            .map_err(RequestError::Inflight)?;
        let file = region
            .file()
            .try_clone()
            .map_err(|e| RequestError::Inflight(InflightError::Create(e)))?;
        let reply = VhostUserInflight {
            mmap_size: region.mmap_size(),
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        // As libvhost-user: the region is in use from now on; the frontend normally hands
        // it straight back with SET_INFLIGHT_FD, which replaces it with the same memory.
        let mut session = self.session.lock();
        if session.live.iter().any(|&live| live) {
            return Err(RequestError::InflightWhileRunning.into());
        }
        session.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let mut session = self.session.lock();
        if session.live.iter().any(|&live| live) {
            return Err(RequestError::InflightWhileRunning.into());
        }
        let region = InflightRegion::map(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(RequestError::Inflight)?;
        session.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let region = MemoryRegion {
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            user_addr: region.user_addr,
            mmap_offset: region.mmap_offset,
        };
        let mut session = self.session.lock();
        let table = session
            .memory
            .as_ref()
            .map_or_else(MemoryTable::empty, Clone::clone)
            .with_region(&region, &fd, MAX_MEM_SLOTS)
            .map_err(RequestError::Memory)?;
        tracing::debug!(
            guest_phys_addr = region.guest_phys_addr,
            memory_size = region.memory_size,
            user_addr = region.user_addr,
            regions = table.regions().len(),
            "vhost-user memory region added"
        );
        session.memory = Some(table);
        // Parked rings may live in the new region; running ones need the new memory for
        // requests that use it.
        self.apply_with(&mut session, true, true)?;
        Ok(None)
    }

    fn remove_mem_region(&self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let named = MemoryRegion {
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            user_addr: region.user_addr,
            mmap_offset: region.mmap_offset,
        };
        let mut session = self.session.lock();
        let table = session
            .memory
            .as_ref()
            .and_then(|table| table.without_region(&named))
            .ok_or(RequestError::UnknownRegion {
                guest_phys_addr: named.guest_phys_addr,
                memory_size: named.memory_size,
                user_addr: named.user_addr,
            })?;
        tracing::debug!(
            guest_phys_addr = named.guest_phys_addr,
            memory_size = named.memory_size,
            user_addr = named.user_addr,
            regions = table.regions().len(),
            "vhost-user memory region removed"
        );
        session.memory = Some(table);
        // Waits for the requests in flight (they finish in the old memory, which they keep
        // mapped), then runs the rings in the new table: a request read from a ring after
        // this that points into the removed region fails with an I/O error status.
        self.apply_with(&mut session, true, true)?;
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(RequestError::Unsupported("DEVICE_STATE").into())
    }

    fn check_device_state(&self) -> Result<()> {
        Err(RequestError::Unsupported("DEVICE_STATE").into())
    }

    fn get_shmem_config(&self) -> Result<VhostUserShMemConfig> {
        Err(RequestError::Unsupported("SHMEM").into())
    }

    fn set_log_base(&self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(RequestError::Unsupported("LOG_SHMFD").into())
    }
}

/// Sets `O_NONBLOCK` on `fd`'s open file (shared with the frontend, which passed it).
fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
