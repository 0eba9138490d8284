//! One initiator's view of a [`DiskWithReservations`](crate::DiskWithReservations): its
//! I/O, checked against the shared reservation state, and its persistent reservation
//! commands.

use crate::InitiatorId;
use crate::state::{Access, Command, ReservationState};
use crate::state_file;
use disk_backend::pr::{
    PersistentReservation, ReservationCapabilities, ReservationReport, ReservationType,
};
use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use event_listener::Event;
use futures::future::{Either, select};
use parking_lot::Mutex;
use request_buffers::RequestBuffers;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What every initiator of one `DiskWithReservations` shares.
pub(crate) struct Shared {
    pub inner: Disk,
    /// The reservation state. Every I/O request takes this lock once, briefly, to check
    /// the conflict table; nothing slow ever happens under it.
    pub state: Mutex<ReservationState>,
    /// Serializes PERSISTENT RESERVE OUT commands, which may wait for the state file with
    /// `state` unlocked. Only command futures take it, so I/O never waits for a file write.
    pub commands: futures::lock::Mutex<()>,
    /// The abort bookkeeping of every identity that has been handed a disk. Entries are
    /// never removed: identities are few, and a later handle must see the same epoch.
    pub initiators: Mutex<HashMap<InitiatorId, Arc<Initiator>>>,
    /// Where the state persists through power loss, if anywhere.
    pub state_file: Option<PathBuf>,
}

/// Per-identity abort bookkeeping.
pub(crate) struct Initiator {
    pub id: InitiatorId,
    /// Bumped (under the state lock) by every PREEMPT AND ABORT that preempts this
    /// initiator. A request that started under an older epoch has been aborted.
    abort_epoch: AtomicU64,
    /// Notified after `abort_epoch` changes, to wake requests waiting on the inner disk.
    aborted: Event,
}

impl Initiator {
    pub fn new(id: InitiatorId) -> Self {
        Self {
            id,
            abort_epoch: AtomicU64::new(0),
            aborted: Event::new(),
        }
    }

    fn epoch(&self) -> u64 {
        self.abort_epoch.load(Ordering::Acquire)
    }

    /// Completes once a PREEMPT AND ABORT has hit this initiator after `epoch`.
    async fn aborted_since(&self, epoch: u64) {
        loop {
            // Listen before checking, so an abort between the two is not missed.
            let listener = self.aborted.listen();
            if self.epoch() != epoch {
                return;
            }
            listener.await;
        }
    }
}

/// The [`DiskIo`] of one initiator of a
/// [`DiskWithReservations`](crate::DiskWithReservations); its [`pr`](DiskIo::pr) issues
/// commands as this initiator.
///
/// Usually used through the [`Disk`] that
/// [`DiskWithReservations::initiator`](crate::DiskWithReservations::initiator) returns.
/// Clones are the same initiator.
#[derive(Clone)]
pub struct InitiatorDisk {
    shared: Arc<Shared>,
    initiator: Arc<Initiator>,
}

impl std::fmt::Debug for InitiatorDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitiatorDisk")
            .field("initiator", &self.initiator.id)
            .field("inner", &self.shared.inner)
            .finish()
    }
}

impl InitiatorDisk {
    pub(crate) fn new(shared: Arc<Shared>, initiator: Arc<Initiator>) -> Self {
        Self { shared, initiator }
    }

    /// The initiator this disk acts for.
    pub fn id(&self) -> &InitiatorId {
        &self.initiator.id
    }

    /// Checks the conflict table and, if the request may run, returns the abort epoch it
    /// runs under. Both happen under the state lock, so a request is ordered entirely
    /// before or entirely after any command.
    fn admit(&self, access: Access) -> Result<u64, DiskError> {
        let state = self.shared.state.lock();
        state.check_access(&self.initiator.id, access)?;
        Ok(self.initiator.epoch())
    }

    /// Runs the request `io` creates if the reservation allows it, and fails it with
    /// [`DiskError::AbortDueToPreemptAndAbort`] if a PREEMPT AND ABORT hits this initiator
    /// before it completes.
    ///
    /// `io` is only called after the check: a backend may start work as soon as its method
    /// is called, before the future is polled, and a refused request must not reach it.
    async fn guarded<F>(&self, access: Access, io: impl FnOnce() -> F) -> Result<(), DiskError>
    where
        F: Future<Output = Result<(), DiskError>>,
    {
        let epoch = self.admit(access)?;
        let io = pin!(io());
        // The abort future is only polled (and only allocates its listener) when the inner
        // request does not complete at once.
        let aborted = pin!(self.initiator.aborted_since(epoch));
        match select(io, aborted).await {
            Either::Left((result, _)) => {
                if self.initiator.epoch() != epoch {
                    // The inner request finished, but the abort came first: report what
                    // SCSI would for a command aborted while in progress.
                    Err(DiskError::AbortDueToPreemptAndAbort)
                } else {
                    result
                }
            }
            // Dropping the inner future abandons the request: what has not reached the
            // inner disk never will. A disk whose work continues on another thread after its
            // future is dropped may still complete it.
            Either::Right(((), _)) => Err(DiskError::AbortDueToPreemptAndAbort),
        }
    }

    /// Runs one PERSISTENT RESERVE OUT command as this initiator: applies it to a copy of
    /// the state, saves that to the state file when it must persist, then publishes it
    /// and aborts whom it preempted.
    async fn command(&self, command: Command) -> Result<(), DiskError> {
        let _serialized = self.shared.commands.lock().await;
        let current = self.shared.state.lock().clone();
        let mut next = current.clone();
        let applied = next.apply(
            &self.initiator.id,
            command,
            self.shared.state_file.is_some(),
        )?;

        if let Some(path) = &self.shared.state_file {
            let image = state_file::encode(&next);
            // Saved before it takes effect: a command that reports success has persisted,
            // and one that fails to persist has changed nothing. (If the caller drops this
            // future while the save runs, the file may briefly hold a state that never took
            // effect, like a device that lost power mid-command; the next save replaces it.)
            if image != state_file::encode(&current) {
                let path = path.clone();
                blocking::unblock(move || state_file::save(&path, &image))
                    .await
                    .map_err(DiskError::Io)?;
            }
        }

        let mut state = self.shared.state.lock();
        *state = next;
        let mut woken = Vec::new();
        if !applied.abort.is_empty() {
            let initiators = self.shared.initiators.lock();
            for id in &applied.abort {
                // An identity never handed a disk has nothing in flight.
                if let Some(initiator) = initiators.get(id) {
                    initiator.abort_epoch.fetch_add(1, Ordering::AcqRel);
                    woken.push(initiator.clone());
                }
            }
        }
        drop(state);
        for initiator in woken {
            initiator.aborted.notify(usize::MAX);
        }
        Ok(())
    }
}

impl DiskIo for InitiatorDisk {
    fn disk_type(&self) -> &str {
        "prwrap"
    }

    fn sector_count(&self) -> u64 {
        self.shared.inner.sector_count()
    }

    fn sector_size(&self) -> u32 {
        self.shared.inner.sector_size()
    }

    fn disk_id(&self) -> Option<[u8; 16]> {
        self.shared.inner.disk_id()
    }

    fn physical_sector_size(&self) -> u32 {
        self.shared.inner.physical_sector_size()
    }

    fn is_fua_respected(&self) -> bool {
        self.shared.inner.is_fua_respected()
    }

    fn is_read_only(&self) -> bool {
        self.shared.inner.is_read_only()
    }

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.guarded(Access::Read, || {
            self.shared.inner.read_vectored(buffers, sector)
        })
        .await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.guarded(Access::Write, || {
            self.shared.inner.write_vectored(buffers, sector, fua)
        })
        .await
    }

    async fn sync_cache(&self) -> Result<(), DiskError> {
        // SBC: SYNCHRONIZE CACHE conflicts wherever a write would.
        self.guarded(Access::Write, || self.shared.inner.sync_cache())
            .await
    }

    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.guarded(Access::Write, || {
            self.shared.inner.unmap(sector, count, block_level_only)
        })
        .await
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.shared.inner.unmap_behavior()
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.shared.inner.optimal_unmap_sectors()
    }

    fn pr(&self) -> Option<&dyn PersistentReservation> {
        Some(self)
    }

    async fn eject(&self) -> Result<(), DiskError> {
        // Removing the medium changes it for everyone: the write rule applies.
        self.guarded(Access::Write, || self.shared.inner.eject())
            .await
    }

    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        self.shared.inner.wait_resize(sector_count)
    }

    fn register_memory(&self, memory: &disk_backend::GuestMemory) -> Result<(), DiskError> {
        self.shared.inner.register_memory(memory)
    }
}

#[async_trait::async_trait]
impl PersistentReservation for InitiatorDisk {
    fn capabilities(&self) -> ReservationCapabilities {
        ReservationCapabilities {
            write_exclusive: true,
            exclusive_access: true,
            write_exclusive_registrants_only: true,
            exclusive_access_registrants_only: true,
            write_exclusive_all_registrants: true,
            exclusive_access_all_registrants: true,
            persist_through_power_loss: self.shared.state_file.is_some(),
        }
    }

    async fn report(&self) -> Result<ReservationReport, DiskError> {
        Ok(self.shared.state.lock().report())
    }

    async fn register(
        &self,
        current_key: Option<u64>,
        new_key: u64,
        ptpl: Option<bool>,
    ) -> Result<(), DiskError> {
        self.command(Command::Register {
            current_key,
            new_key,
            ptpl,
        })
        .await
    }

    async fn reserve(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError> {
        self.command(Command::Reserve {
            key,
            reservation_type,
        })
        .await
    }

    async fn release(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError> {
        self.command(Command::Release {
            key,
            reservation_type,
        })
        .await
    }

    async fn clear(&self, key: u64) -> Result<(), DiskError> {
        self.command(Command::Clear { key }).await
    }

    async fn preempt(
        &self,
        current_key: u64,
        preempt_key: u64,
        reservation_type: ReservationType,
        abort: bool,
    ) -> Result<(), DiskError> {
        self.command(Command::Preempt {
            current_key,
            preempt_key,
            reservation_type,
            abort,
        })
        .await
    }
}
