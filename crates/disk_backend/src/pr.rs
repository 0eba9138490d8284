//! Persistent reservations (SCSI-3 PERSISTENT RESERVE IN/OUT, NVMe reservations).
//!
//! A backend that supports them returns an implementation of [`PersistentReservation`] from
//! [`DiskIo::pr`](crate::DiskIo::pr). Keys are 64-bit values an initiator registers; key 0
//! means "no key". Failures that SPC-4 reports as RESERVATION CONFLICT are
//! [`crate::DiskError::ReservationConflict`].

use crate::DiskError;

/// The six reservation types of SPC-4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    /// Only the holder may write; everyone may read.
    WriteExclusive,
    /// Only the holder may read or write.
    ExclusiveAccess,
    /// Only registrants may write; everyone may read. One registrant holds it.
    WriteExclusiveRegistrantsOnly,
    /// Only registrants may read or write. One registrant holds it.
    ExclusiveAccessRegistrantsOnly,
    /// Only registrants may write; everyone may read. Every registrant holds it.
    WriteExclusiveAllRegistrants,
    /// Only registrants may read or write. Every registrant holds it.
    ExclusiveAccessAllRegistrants,
}

impl ReservationType {
    /// All six types.
    pub const ALL: [Self; 6] = [
        Self::WriteExclusive,
        Self::ExclusiveAccess,
        Self::WriteExclusiveRegistrantsOnly,
        Self::ExclusiveAccessRegistrantsOnly,
        Self::WriteExclusiveAllRegistrants,
        Self::ExclusiveAccessAllRegistrants,
    ];

    /// Whether the type only restricts writes (the "Write Exclusive" family).
    pub fn is_write_exclusive(self) -> bool {
        matches!(
            self,
            Self::WriteExclusive
                | Self::WriteExclusiveRegistrantsOnly
                | Self::WriteExclusiveAllRegistrants
        )
    }

    /// Whether every registrant is a holder (the "All Registrants" types).
    pub fn is_all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether registrants, not only the holder, get access (the "Registrants Only" and
    /// "All Registrants" types).
    pub fn grants_registrants(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }
}

/// Which reservation features a backend supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReservationCapabilities {
    /// Write Exclusive.
    pub write_exclusive: bool,
    /// Exclusive Access.
    pub exclusive_access: bool,
    /// Write Exclusive, Registrants Only.
    pub write_exclusive_registrants_only: bool,
    /// Exclusive Access, Registrants Only.
    pub exclusive_access_registrants_only: bool,
    /// Write Exclusive, All Registrants.
    pub write_exclusive_all_registrants: bool,
    /// Exclusive Access, All Registrants.
    pub exclusive_access_all_registrants: bool,
    /// Persist Through Power Loss can be requested.
    pub persist_through_power_loss: bool,
}

impl ReservationCapabilities {
    /// Whether `reservation_type` is supported.
    pub fn supports(&self, reservation_type: ReservationType) -> bool {
        match reservation_type {
            ReservationType::WriteExclusive => self.write_exclusive,
            ReservationType::ExclusiveAccess => self.exclusive_access,
            ReservationType::WriteExclusiveRegistrantsOnly => self.write_exclusive_registrants_only,
            ReservationType::ExclusiveAccessRegistrantsOnly => {
                self.exclusive_access_registrants_only
            }
            ReservationType::WriteExclusiveAllRegistrants => self.write_exclusive_all_registrants,
            ReservationType::ExclusiveAccessAllRegistrants => self.exclusive_access_all_registrants,
        }
    }
}

/// One registrant in a [`ReservationReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredController {
    /// The registered key (never 0).
    pub key: u64,
    /// The initiator's identity (a host id).
    pub host_id: Vec<u8>,
    /// The controller (or path) number within the host.
    pub controller_id: u16,
    /// Whether this registrant holds the reservation.
    pub holds_reservation: bool,
}

/// The reservation state, as READ FULL STATUS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationReport {
    /// The generation counter (PRGENERATION).
    pub generation: u32,
    /// The reservation held, if any.
    pub reservation_type: Option<ReservationType>,
    /// Whether the state persists through power loss.
    pub persist_through_power_loss: bool,
    /// Every registrant.
    pub controllers: Vec<RegisteredController>,
}

/// Persistent reservation operations, issued on behalf of the initiator that owns the
/// [`Disk`](crate::Disk) they are called through.
#[async_trait::async_trait]
pub trait PersistentReservation: Send + Sync {
    /// The supported features.
    fn capabilities(&self) -> ReservationCapabilities;

    /// Reports the full reservation state.
    async fn report(&self) -> Result<ReservationReport, DiskError>;

    /// Registers `new_key` for this initiator, replacing `current_key` (`None` ignores the
    /// existing key: REGISTER AND IGNORE EXISTING KEY). A `new_key` of 0 unregisters.
    /// `ptpl` sets Persist Through Power Loss when given.
    async fn register(
        &self,
        current_key: Option<u64>,
        new_key: u64,
        ptpl: Option<bool>,
    ) -> Result<(), DiskError>;

    /// Takes a reservation of `reservation_type` with this initiator's `key`.
    async fn reserve(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError>;

    /// Releases the reservation of `reservation_type` held with `key`.
    async fn release(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError>;

    /// Removes every registration and the reservation.
    async fn clear(&self, key: u64) -> Result<(), DiskError>;

    /// Removes the registrations of `preempt_key` (taking the reservation with
    /// `reservation_type` if `preempt_key` holds it); with `abort`, also aborts the preempted
    /// initiators' outstanding requests.
    async fn preempt(
        &self,
        current_key: u64,
        preempt_key: u64,
        reservation_type: ReservationType,
        abort: bool,
    ) -> Result<(), DiskError>;
}
