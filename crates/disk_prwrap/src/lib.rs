//! SCSI-3 persistent reservations (SPC-4) emulated in memory over any [`Disk`], shared by
//! many initiators.
//!
//! Clustered guests fence each other with persistent reservations. [`DiskWithReservations`]
//! wraps a disk that has none and hands out one [`Disk`] per initiator (an [`InitiatorId`]:
//! a host id and a controller number). All of them share one reservation state; each one's
//! [`pr()`](Disk::pr) issues commands as that initiator, and each one's I/O is checked
//! against the reservation before it reaches the inner disk. It is an emulation, not a lock
//! manager: it fences the initiators that go through it, and nothing else that writes the
//! inner disk.
//!
//! # Model
//!
//! - **Registrations**: one key per initiator. REGISTER with the wrong current key, or with a
//!   key while unregistered, is [`DiskError::ReservationConflict`]; `current_key: None` is
//!   REGISTER AND IGNORE EXISTING KEY; new key 0 unregisters.
//! - **Reservations**: the six SPC-4 types. Reserving needs a registration and the right key;
//!   while another initiator holds the reservation, or with another type, it conflicts;
//!   reserving the type already held is a no-op. For the "All Registrants" types every
//!   registrant is a holder.
//! - **I/O** follows SPC-4's conflict table: a holder does everything; under Write Exclusive
//!   everyone reads and only the holder writes; under Exclusive Access only the holder reads
//!   or writes; the "Registrants Only" and "All Registrants" types extend the holder's rights
//!   to every registrant. Flush, unmap and eject follow the write rule. A refused request fails
//!   with [`DiskError::ReservationConflict`] and never reaches the inner disk.
//! - **Release** by the holder with the wrong type is [`DiskError::InvalidInput`]; by a
//!   registered non-holder it succeeds and changes nothing. Unregistering the holder releases
//!   the reservation (for the "All Registrants" types, only when the last registrant leaves).
//! - **Preempt**: when the preempted key is the holder's, the issuer takes the reservation
//!   with the requested type and every other registration with that key is removed; otherwise
//!   only those registrations are removed. Against an "All Registrants" reservation, key 0
//!   removes every other registrant and replaces the reservation. A key nobody has is a
//!   conflict; key 0 against any other reservation, or none, is invalid.
//! - **Preempt and abort** also aborts the outstanding requests of every initiator that was
//!   registered with the preempted key (see below).
//! - **Clear** removes every registration and the reservation; any registrant may clear.
//! - **Generation**: PRGENERATION increments on every successful REGISTER (both kinds),
//!   CLEAR, PREEMPT and PREEMPT AND ABORT, never on RESERVE, RELEASE, a report, or a failed
//!   command, and restarts at 0 when the state is restored from its file, as at a power on.
//! - **Persist Through Power Loss**: with a state file ([`DiskWithReservations::with_state_file`]),
//!   `register(.., ptpl: Some(true))` makes every later change reach the file before the
//!   command completes, and the next construction restores it; `Some(false)` stops that and
//!   empties the file. Without a file, `Some(true)` is [`DiskError::InvalidInput`] and
//!   [`capabilities`](disk_backend::pr::PersistentReservation::capabilities) says so.
//!
//! # What "in flight" means for PREEMPT AND ABORT
//!
//! A request is in flight from the moment it passes the reservation check until its future
//! completes. Each initiator has an abort epoch that the check records; PREEMPT AND ABORT
//! advances the epoch of every preempted initiator in the same critical section that changes
//! the state, and wakes their requests. A request in flight at that moment completes with
//! [`DiskError::AbortDueToPreemptAndAbort`]:
//!
//! - if it is still pending in the inner disk, it is woken, its inner future is dropped, and
//!   it fails at once, without waiting for the inner disk. A request the inner disk had only
//!   queued is thereby cancelled and never touches the medium. A write the inner disk had
//!   already begun may have been applied, wholly or in part; and an inner disk that keeps
//!   working on another thread after its future is dropped (a file served by a thread pool)
//!   may even apply it after the PREEMPT AND ABORT has returned. The emulation cannot reach
//!   into the inner disk to stop that;
//! - if the inner request completed but its future had not yet returned, it fails anyway,
//!   though the write was applied (as with a SCSI command aborted after the medium was
//!   written).
//!
//! A request that starts after the command is checked against the new state: a preempted
//! initiator is no longer registered and gets [`DiskError::ReservationConflict`] wherever the
//! reservation excludes unregistered initiators. As SPC-4 says, the issuer's own requests
//! are aborted too when it is itself registered with the preempted key, and when it
//! preempts an "All Registrants" reservation with key 0 (which aborts every registrant).
//!
//! # Example
//!
//! ```
//! use disk_backend::pr::ReservationType;
//! use disk_backend::{Disk, DiskError};
//! use disk_prwrap::{DiskWithReservations, InitiatorId};
//! use request_buffers::OwnedRequestBuffers;
//!
//! let inner = Disk::new(disk_ram::RamDisk::new(64, 512)?)?;
//! let shared = DiskWithReservations::new(inner);
//! let node_a = shared.initiator(InitiatorId::new(*b"node-a", 0));
//! let node_b = shared.initiator(InitiatorId::new(*b"node-b", 0));
//! let data = OwnedRequestBuffers::from_slice(&[7; 512]);
//!
//! futures::executor::block_on(async {
//!     let (a, b) = (node_a.pr().unwrap(), node_b.pr().unwrap());
//!     a.register(None, 0xa, None).await?;
//!     b.register(None, 0xb, None).await?;
//!     a.reserve(0xa, ReservationType::WriteExclusive).await?;
//!
//!     // Only the holder writes; everyone reads.
//!     node_a.write_vectored(&data.buffers(false), 0, false).await?;
//!     assert!(matches!(
//!         node_b.write_vectored(&data.buffers(false), 0, false).await,
//!         Err(DiskError::ReservationConflict)
//!     ));
//!     node_b.read_vectored(&data.buffers(true), 0).await?;
//!
//!     // Node b fences node a: it takes the reservation and a's registration is gone.
//!     b.preempt(0xb, 0xa, ReservationType::WriteExclusive, true).await?;
//!     assert!(matches!(
//!         node_a.write_vectored(&data.buffers(false), 0, false).await,
//!         Err(DiskError::ReservationConflict)
//!     ));
//!     let report = b.report().await?;
//!     assert_eq!(report.controllers.len(), 1);
//!     assert!(report.controllers[0].holds_reservation);
//!     Ok::<(), DiskError>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`DiskError::ReservationConflict`]: disk_backend::DiskError::ReservationConflict
//! [`DiskError::InvalidInput`]: disk_backend::DiskError::InvalidInput
//! [`DiskError::AbortDueToPreemptAndAbort`]: disk_backend::DiskError::AbortDueToPreemptAndAbort

#![forbid(unsafe_code)]

mod initiator;
mod resolve;
mod state;
mod state_file;

pub use initiator::InitiatorDisk;
pub use resolve::PrWrapResolver;
#[doc(hidden)]
pub use state_file::codec as state_file_codec;
pub use state_file::{DecodeStateError, LoadStateError};

use disk_backend::Disk;
use initiator::{Initiator, Shared};
use parking_lot::Mutex;
use state::ReservationState;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The identity of an initiator (an I_T nexus in SCSI terms): a host id and a controller
/// (or path) number within that host. Handles created for equal identities are the same
/// initiator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorId {
    host_id: Vec<u8>,
    controller_id: u16,
}

impl InitiatorId {
    /// The initiator `controller_id` of host `host_id` (an NVMe host id, a SCSI initiator
    /// port name, any bytes that tell hosts apart).
    pub fn new(host_id: impl Into<Vec<u8>>, controller_id: u16) -> Self {
        Self {
            host_id: host_id.into(),
            controller_id,
        }
    }

    /// The host id.
    pub fn host_id(&self) -> &[u8] {
        &self.host_id
    }

    /// The controller number within the host.
    pub fn controller_id(&self) -> u16 {
        self.controller_id
    }
}

/// A disk with SPC-4 persistent reservations shared by many initiators. See the
/// [crate documentation](crate) for the model.
///
/// Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct DiskWithReservations {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DiskWithReservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskWithReservations")
            .field("inner", &self.shared.inner)
            .field("state_file", &self.shared.state_file)
            .finish()
    }
}

impl DiskWithReservations {
    /// Wraps `inner` with an empty reservation state kept only in memory: requests to
    /// persist through power loss are refused.
    pub fn new(inner: Disk) -> Self {
        Self::with_state(inner, ReservationState::default(), None)
    }

    /// Wraps `inner` with a reservation state that can persist through power loss in the
    /// file at `path`, restoring what the file holds (nothing if it does not exist). Fails
    /// if the file cannot be read or is torn, damaged, or not a state file: starting empty
    /// instead would silently drop the fencing the cluster relies on.
    ///
    /// The path must be a regular file or not exist, and a file must be creatable in its
    /// directory (checked here with a temporary file, as a save does): a directory that
    /// does not exist or a read-only mount fails with [`LoadStateError::Unwritable`] now,
    /// rather than at the first command that asks for persistence.
    ///
    /// The file is only written once an initiator turns persistence on; a failure to save
    /// then (a disk that filled up) fails that command with
    /// [`DiskError::Io`](disk_backend::DiskError::Io) and leaves the state unchanged. Only one
    /// wrapper may use a file at a time.
    pub fn with_state_file(inner: Disk, path: impl Into<PathBuf>) -> Result<Self, LoadStateError> {
        let path = path.into();
        let state = state_file::load(&path)?;
        state_file::check_writable(&path)?;
        Ok(Self::with_state(inner, state, Some(path)))
    }

    fn with_state(inner: Disk, state: ReservationState, state_file: Option<PathBuf>) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                state: Mutex::new(state),
                commands: futures::lock::Mutex::new(()),
                initiators: Mutex::new(HashMap::new()),
                state_file,
            }),
        }
    }

    /// The disk of initiator `id`, whose [`pr()`](Disk::pr) issues commands as `id`.
    pub fn initiator(&self, id: InitiatorId) -> Disk {
        // The geometry comes from a `Disk`, which validated it already.
        Disk::new(self.initiator_disk(id)).expect("the inner disk's geometry is valid")
    }

    /// The same as [`initiator`](Self::initiator) without the [`Disk`] around it, for code
    /// generic over [`DiskIo`](disk_backend::DiskIo).
    pub fn initiator_disk(&self, id: InitiatorId) -> InitiatorDisk {
        let initiator = self
            .shared
            .initiators
            .lock()
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Initiator::new(id)))
            .clone();
        InitiatorDisk::new(self.shared.clone(), initiator)
    }

    /// The disk every initiator's I/O goes to.
    pub fn inner(&self) -> &Disk {
        &self.shared.inner
    }
}
