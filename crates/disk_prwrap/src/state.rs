//! The SPC-4 persistent reservation state machine: registrations, the reservation, the
//! generation counter, and the rules of every PERSISTENT RESERVE OUT service action and of
//! the I/O conflict table.
//!
//! Everything here is pure: a command either fails and leaves the state untouched, or
//! succeeds and says which initiators must have their outstanding requests aborted. Locking,
//! persistence and aborting are the caller's business (`initiator.rs`).

use crate::InitiatorId;
use disk_backend::DiskError;
use disk_backend::pr::{RegisteredController, ReservationReport, ReservationType};
use std::collections::BTreeMap;

/// The whole reservation state of one logical unit, shared by every initiator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ReservationState {
    /// PRGENERATION.
    pub generation: u32,
    /// Whether the state persists through power loss (the last APTPL received).
    pub ptpl: bool,
    /// One key per registered initiator; a key is never 0.
    pub registrations: BTreeMap<InitiatorId, u64>,
    /// The persistent reservation, if any. Its holder is always registered.
    pub reservation: Option<Reservation>,
}

/// A persistent reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// A type other than the "All Registrants" ones: one registrant holds it.
    Single {
        reservation_type: ReservationType,
        holder: InitiatorId,
    },
    /// An "All Registrants" type: every registrant holds it, and it lasts until the last
    /// registrant leaves.
    AllRegistrants { reservation_type: ReservationType },
}

impl Reservation {
    /// A reservation of `reservation_type` taken by `holder`.
    pub fn new(reservation_type: ReservationType, holder: &InitiatorId) -> Self {
        if reservation_type.is_all_registrants() {
            Self::AllRegistrants { reservation_type }
        } else {
            Self::Single {
                reservation_type,
                holder: holder.clone(),
            }
        }
    }

    pub fn reservation_type(&self) -> ReservationType {
        match self {
            Self::Single {
                reservation_type, ..
            }
            | Self::AllRegistrants { reservation_type } => *reservation_type,
        }
    }
}

/// What a request does to the medium, for the conflict table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads.
    Read,
    /// Writes, unmaps, flushes, ejects: anything a write-exclusive reservation forbids.
    Write,
}

/// A PERSISTENT RESERVE OUT service action, as issued by one initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// REGISTER (`current_key: Some`) or REGISTER AND IGNORE EXISTING KEY (`None`).
    Register {
        current_key: Option<u64>,
        new_key: u64,
        ptpl: Option<bool>,
    },
    Reserve {
        key: u64,
        reservation_type: ReservationType,
    },
    Release {
        key: u64,
        reservation_type: ReservationType,
    },
    Clear {
        key: u64,
    },
    /// PREEMPT, or PREEMPT AND ABORT with `abort`.
    Preempt {
        current_key: u64,
        preempt_key: u64,
        reservation_type: ReservationType,
        abort: bool,
    },
}

/// The outcome of a successful command beyond the new state.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Initiators whose outstanding requests must fail with
    /// [`DiskError::AbortDueToPreemptAndAbort`].
    pub abort: Vec<InitiatorId>,
}

impl ReservationState {
    /// Whether `initiator` holds the reservation (for the "All Registrants" types, every
    /// registrant does).
    pub fn is_holder(&self, initiator: &InitiatorId) -> bool {
        match &self.reservation {
            None => false,
            Some(Reservation::Single { holder, .. }) => holder == initiator,
            Some(Reservation::AllRegistrants { .. }) => self.registrations.contains_key(initiator),
        }
    }

    /// The SPC-4 conflict table (SPC-4 table "persistent reservation type codes" and SBC's
    /// per-command table): whether `initiator` may perform `access` now.
    pub fn check_access(&self, initiator: &InitiatorId, access: Access) -> Result<(), DiskError> {
        let Some(reservation) = &self.reservation else {
            return Ok(());
        };
        if self.is_holder(initiator) {
            return Ok(());
        }
        let reservation_type = reservation.reservation_type();
        let registrant_allowed =
            reservation_type.grants_registrants() && self.registrations.contains_key(initiator);
        let allowed = match access {
            Access::Read => reservation_type.is_write_exclusive() || registrant_allowed,
            Access::Write => registrant_allowed,
        };
        if allowed {
            Ok(())
        } else {
            Err(DiskError::ReservationConflict)
        }
    }

    /// Applies `command` issued by `initiator`. On failure the state is unchanged.
    /// `ptpl_supported` says whether Persist Through Power Loss can be turned on.
    pub fn apply(
        &mut self,
        initiator: &InitiatorId,
        command: Command,
        ptpl_supported: bool,
    ) -> Result<Applied, DiskError> {
        match command {
            Command::Register {
                current_key,
                new_key,
                ptpl,
            } => self.register(initiator, current_key, new_key, ptpl, ptpl_supported),
            Command::Reserve {
                key,
                reservation_type,
            } => self.reserve(initiator, key, reservation_type),
            Command::Release {
                key,
                reservation_type,
            } => self.release(initiator, key, reservation_type),
            Command::Clear { key } => self.clear(initiator, key),
            Command::Preempt {
                current_key,
                preempt_key,
                reservation_type,
                abort,
            } => self.preempt(initiator, current_key, preempt_key, reservation_type, abort),
        }
    }

    /// The registered key of `initiator`, or a conflict if it is not registered with `key`.
    fn check_key(&self, initiator: &InitiatorId, key: u64) -> Result<(), DiskError> {
        match self.registrations.get(initiator) {
            Some(&registered) if registered == key => Ok(()),
            _ => Err(DiskError::ReservationConflict),
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn register(
        &mut self,
        initiator: &InitiatorId,
        current_key: Option<u64>,
        new_key: u64,
        ptpl: Option<bool>,
        ptpl_supported: bool,
    ) -> Result<Applied, DiskError> {
        // An APTPL the device cannot honour is an invalid field of the parameter list.
        if ptpl == Some(true) && !ptpl_supported {
            return Err(DiskError::InvalidInput);
        }
        match self.registrations.get(initiator) {
            None => {
                // An unregistered initiator that names a key believes it is registered: it
                // has lost its registration (preempted, cleared) and must find out.
                if current_key.is_some_and(|key| key != 0) {
                    return Err(DiskError::ReservationConflict);
                }
                if new_key != 0 {
                    self.registrations.insert(initiator.clone(), new_key);
                }
            }
            Some(&registered) => {
                if current_key.is_some_and(|key| key != registered) {
                    return Err(DiskError::ReservationConflict);
                }
                if new_key == 0 {
                    self.unregister(initiator);
                } else {
                    self.registrations.insert(initiator.clone(), new_key);
                }
            }
        }
        if let Some(ptpl) = ptpl {
            self.ptpl = ptpl;
        }
        // SPC-4 counts every REGISTER that completes, including one that changes nothing
        // (an unregistered initiator registering key 0).
        self.bump_generation();
        Ok(Applied::default())
    }

    /// Removes `initiator`'s registration, releasing what only it held.
    fn unregister(&mut self, initiator: &InitiatorId) {
        self.registrations.remove(initiator);
        let released = match &self.reservation {
            None => false,
            Some(Reservation::Single { holder, .. }) => holder == initiator,
            Some(Reservation::AllRegistrants { .. }) => self.registrations.is_empty(),
        };
        if released {
            self.reservation = None;
        }
    }

    fn reserve(
        &mut self,
        initiator: &InitiatorId,
        key: u64,
        reservation_type: ReservationType,
    ) -> Result<Applied, DiskError> {
        self.check_key(initiator, key)?;
        match &self.reservation {
            None => self.reservation = Some(Reservation::new(reservation_type, initiator)),
            Some(reservation)
                if reservation.reservation_type() == reservation_type
                    && self.is_holder(initiator) => {}
            // Held by someone else, or by this initiator with another type.
            Some(_) => return Err(DiskError::ReservationConflict),
        }
        Ok(Applied::default())
    }

    fn release(
        &mut self,
        initiator: &InitiatorId,
        key: u64,
        reservation_type: ReservationType,
    ) -> Result<Applied, DiskError> {
        self.check_key(initiator, key)?;
        let Some(reservation) = &self.reservation else {
            return Ok(Applied::default());
        };
        // A registered non-holder's release succeeds and changes nothing.
        if !self.is_holder(initiator) {
            return Ok(Applied::default());
        }
        if reservation.reservation_type() != reservation_type {
            // SPC-4: ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
            return Err(DiskError::InvalidInput);
        }
        self.reservation = None;
        Ok(Applied::default())
    }

    fn clear(&mut self, initiator: &InitiatorId, key: u64) -> Result<Applied, DiskError> {
        self.check_key(initiator, key)?;
        self.registrations.clear();
        self.reservation = None;
        self.bump_generation();
        // CLEAR does not abort anything (SPC-4: commands being processed are not affected).
        Ok(Applied::default())
    }

    fn preempt(
        &mut self,
        initiator: &InitiatorId,
        current_key: u64,
        preempt_key: u64,
        reservation_type: ReservationType,
        abort: bool,
    ) -> Result<Applied, DiskError> {
        self.check_key(initiator, current_key)?;
        let all_registrants = matches!(self.reservation, Some(Reservation::AllRegistrants { .. }));
        if preempt_key == 0 && !all_registrants {
            // SPC-4: a zero SERVICE ACTION RESERVATION KEY is only meaningful against an
            // "All Registrants" reservation; otherwise it is an invalid field.
            return Err(DiskError::InvalidInput);
        }

        // Who loses the registration, and whether the issuer takes the reservation.
        let preempts_holder = match &self.reservation {
            None => false,
            Some(Reservation::Single { holder, .. }) => {
                self.registrations.get(holder) == Some(&preempt_key)
            }
            Some(Reservation::AllRegistrants { .. }) => preempt_key == 0,
        };
        let targets: Vec<InitiatorId> = self
            .registrations
            .iter()
            .filter(|&(_, &key)| preempt_key == 0 || key == preempt_key)
            .map(|(id, _)| id.clone())
            .collect();
        let removed: Vec<InitiatorId> = targets
            .iter()
            // When the issuer takes the reservation, its own registration survives even if
            // it shares the preempted key (a holder may preempt itself to change the type).
            // When it only removes registrations, SPC-4 makes no such exception.
            .filter(|&id| !(id == initiator && (preempts_holder || all_registrants)))
            .cloned()
            .collect();
        if !preempts_holder && removed.is_empty() {
            // The key matches nobody (SPC-4: RESERVATION CONFLICT).
            return Err(DiskError::ReservationConflict);
        }

        for id in &removed {
            self.registrations.remove(id);
        }
        // Otherwise only non-holders lost their registrations (a single holder's key is not
        // the preempted one; an "All Registrants" reservation keeps the issuer), so the
        // reservation stands as it is.
        if preempts_holder {
            self.reservation = Some(Reservation::new(reservation_type, initiator));
        }
        self.bump_generation();

        // PREEMPT AND ABORT aborts the commands of every initiator registered with the
        // preempted key, holder or not, the issuer included when it preempts its own key;
        // against an "All Registrants" reservation with key 0, of every registrant.
        let abort = if abort { targets } else { Vec::new() };
        Ok(Applied { abort })
    }

    /// The report READ FULL STATUS gives.
    pub fn report(&self) -> ReservationReport {
        ReservationReport {
            generation: self.generation,
            reservation_type: self.reservation.as_ref().map(Reservation::reservation_type),
            persist_through_power_loss: self.ptpl,
            controllers: self
                .registrations
                .iter()
                .map(|(id, &key)| RegisteredController {
                    key,
                    host_id: id.host_id().to_vec(),
                    controller_id: id.controller_id(),
                    holds_reservation: self.is_holder(id),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReservationType::*;

    fn id(name: &str) -> InitiatorId {
        InitiatorId::new(name.as_bytes(), 0)
    }

    fn register(state: &mut ReservationState, who: &str, key: u64) {
        state
            .apply(
                &id(who),
                Command::Register {
                    current_key: None,
                    new_key: key,
                    ptpl: None,
                },
                false,
            )
            .unwrap();
    }

    fn run(state: &mut ReservationState, who: &str, command: Command) -> Result<Applied, String> {
        let before = state.clone();
        let result = state.apply(&id(who), command, false);
        if result.is_err() {
            assert_eq!(*state, before, "a failed command changed the state");
        }
        result.map_err(|e| format!("{e:?}"))
    }

    fn reserve(key: u64, reservation_type: ReservationType) -> Command {
        Command::Reserve {
            key,
            reservation_type,
        }
    }

    fn preempt(current_key: u64, preempt_key: u64, t: ReservationType, abort: bool) -> Command {
        Command::Preempt {
            current_key,
            preempt_key,
            reservation_type: t,
            abort,
        }
    }

    fn holder(state: &ReservationState) -> Option<InitiatorId> {
        match &state.reservation {
            Some(Reservation::Single { holder, .. }) => Some(holder.clone()),
            _ => None,
        }
    }

    #[test]
    fn register_checks_the_current_key() {
        let mut s = ReservationState::default();
        let reg = |current_key, new_key| Command::Register {
            current_key,
            new_key,
            ptpl: None,
        };
        // Unregistered: naming a key is a conflict, key 0 or "ignore" registers.
        assert_eq!(
            run(&mut s, "a", reg(Some(5), 7)).unwrap_err(),
            "ReservationConflict"
        );
        run(&mut s, "a", reg(Some(0), 7)).unwrap();
        assert_eq!(s.registrations[&id("a")], 7);
        // Registered: the wrong key is a conflict, the right one replaces.
        assert_eq!(
            run(&mut s, "a", reg(Some(8), 9)).unwrap_err(),
            "ReservationConflict"
        );
        run(&mut s, "a", reg(Some(7), 9)).unwrap();
        assert_eq!(s.registrations[&id("a")], 9);
        // Ignore existing key replaces whatever is there.
        run(&mut s, "a", reg(None, 11)).unwrap();
        assert_eq!(s.registrations[&id("a")], 11);
        // New key 0 unregisters.
        run(&mut s, "a", reg(Some(11), 0)).unwrap();
        assert!(s.registrations.is_empty());
        // Unregistered and key 0: succeeds, registers nothing.
        run(&mut s, "a", reg(None, 0)).unwrap();
        assert!(s.registrations.is_empty());
    }

    #[test]
    fn ptpl_needs_support() {
        let mut s = ReservationState::default();
        let cmd = Command::Register {
            current_key: None,
            new_key: 1,
            ptpl: Some(true),
        };
        assert!(matches!(
            s.apply(&id("a"), cmd, false),
            Err(DiskError::InvalidInput)
        ));
        assert_eq!(s, ReservationState::default());
        s.apply(&id("a"), cmd, true).unwrap();
        assert!(s.ptpl);
        // Turning it off needs no support, and leaving it out keeps the current value.
        let off = Command::Register {
            current_key: Some(1),
            new_key: 1,
            ptpl: Some(false),
        };
        s.apply(&id("a"), off, false).unwrap();
        assert!(!s.ptpl);
    }

    #[test]
    fn generation_changes_exactly_on_register_clear_preempt() {
        let mut s = ReservationState::default();
        let mut expect = 0;
        let mut check = |s: &ReservationState, changes: bool, what: &str| {
            if changes {
                expect += 1;
            }
            assert_eq!(s.generation, expect, "after {what}");
        };
        register(&mut s, "a", 1);
        check(&s, true, "register");
        register(&mut s, "b", 2);
        check(&s, true, "register");
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        check(&s, false, "reserve");
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        check(&s, false, "repeated reserve");
        run(
            &mut s,
            "a",
            Command::Release {
                key: 1,
                reservation_type: WriteExclusive,
            },
        )
        .unwrap();
        check(&s, false, "release");
        // Failed commands never count.
        run(&mut s, "b", reserve(99, WriteExclusive)).unwrap_err();
        check(&s, false, "failed reserve");
        run(&mut s, "c", Command::Clear { key: 3 }).unwrap_err();
        check(&s, false, "failed clear");
        run(&mut s, "a", reserve(1, ExclusiveAccess)).unwrap();
        run(&mut s, "b", preempt(2, 1, ExclusiveAccess, false)).unwrap();
        check(&s, true, "preempt");
        register(&mut s, "a", 1);
        check(&s, true, "register");
        run(&mut s, "b", preempt(2, 1, ExclusiveAccess, true)).unwrap();
        check(&s, true, "preempt and abort");
        run(&mut s, "b", Command::Clear { key: 2 }).unwrap();
        check(&s, true, "clear");
        // A REGISTER that changes nothing still completes, and SPC-4 counts it.
        register(&mut s, "c", 0);
        check(&s, true, "register of key 0 while unregistered");
    }

    #[test]
    fn reserve_rules() {
        let mut s = ReservationState::default();
        // Unregistered: conflict.
        assert_eq!(
            run(&mut s, "a", reserve(0, WriteExclusive)).unwrap_err(),
            "ReservationConflict"
        );
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        // Wrong key: conflict.
        assert_eq!(
            run(&mut s, "a", reserve(2, WriteExclusive)).unwrap_err(),
            "ReservationConflict"
        );
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        // The same type again is a no-op; another type, or another initiator, conflicts.
        let before = s.clone();
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        assert_eq!(s, before);
        assert_eq!(
            run(&mut s, "a", reserve(1, ExclusiveAccess)).unwrap_err(),
            "ReservationConflict"
        );
        assert_eq!(
            run(&mut s, "b", reserve(2, WriteExclusive)).unwrap_err(),
            "ReservationConflict"
        );
    }

    #[test]
    fn all_registrants_reserve_is_shared() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, ExclusiveAccessAllRegistrants)).unwrap();
        assert!(s.is_holder(&id("a")) && s.is_holder(&id("b")));
        // Every registrant holds it, so reserving the same type is a no-op for b too.
        run(&mut s, "b", reserve(2, ExclusiveAccessAllRegistrants)).unwrap();
        // A registrant joining later holds it as well.
        register(&mut s, "c", 3);
        assert!(s.is_holder(&id("c")));
        assert!(s.report().controllers.iter().all(|c| c.holds_reservation));
    }

    #[test]
    fn release_rules() {
        let release = |key, reservation_type| Command::Release {
            key,
            reservation_type,
        };
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        // Nothing reserved: success.
        run(&mut s, "a", release(1, WriteExclusive)).unwrap();
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        // Unregistered or wrong key: conflict.
        assert_eq!(
            run(&mut s, "c", release(0, WriteExclusive)).unwrap_err(),
            "ReservationConflict"
        );
        assert_eq!(
            run(&mut s, "a", release(2, WriteExclusive)).unwrap_err(),
            "ReservationConflict"
        );
        // A non-holder changes nothing, whatever the type.
        let before = s.clone();
        run(&mut s, "b", release(2, ExclusiveAccess)).unwrap();
        assert_eq!(s, before);
        // The holder with the wrong type: invalid.
        assert_eq!(
            run(&mut s, "a", release(1, ExclusiveAccess)).unwrap_err(),
            "InvalidInput"
        );
        run(&mut s, "a", release(1, WriteExclusive)).unwrap();
        assert_eq!(s.reservation, None);
        assert_eq!(s.registrations.len(), 2, "release keeps registrations");
    }

    #[test]
    fn unregistering_releases() {
        let unregister = |key| Command::Register {
            current_key: Some(key),
            new_key: 0,
            ptpl: None,
        };
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, WriteExclusiveRegistrantsOnly)).unwrap();
        // A non-holder leaving changes nothing for the reservation.
        run(&mut s, "b", unregister(2)).unwrap();
        assert_eq!(holder(&s), Some(id("a")));
        // The holder leaving releases it.
        run(&mut s, "a", unregister(1)).unwrap();
        assert_eq!(s.reservation, None);

        // All Registrants: only the last registrant leaving releases it.
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, WriteExclusiveAllRegistrants)).unwrap();
        run(&mut s, "a", unregister(1)).unwrap();
        assert_eq!(
            s.reservation,
            Some(Reservation::AllRegistrants {
                reservation_type: WriteExclusiveAllRegistrants
            })
        );
        run(&mut s, "b", unregister(2)).unwrap();
        assert_eq!(s.reservation, None);
    }

    #[test]
    fn clear_removes_everything() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, ExclusiveAccess)).unwrap();
        assert_eq!(
            run(&mut s, "c", Command::Clear { key: 0 }).unwrap_err(),
            "ReservationConflict"
        );
        assert_eq!(
            run(&mut s, "b", Command::Clear { key: 1 }).unwrap_err(),
            "ReservationConflict"
        );
        // Any registrant may clear, not only the holder.
        let applied = run(&mut s, "b", Command::Clear { key: 2 }).unwrap();
        assert!(applied.abort.is_empty());
        assert!(s.registrations.is_empty());
        assert_eq!(s.reservation, None);
    }

    #[test]
    fn preempt_the_holder() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "a2", 1); // a second path of the holder with the same key
        register(&mut s, "b", 2);
        register(&mut s, "c", 3);
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        let applied = run(&mut s, "b", preempt(2, 1, ExclusiveAccess, true)).unwrap();
        // b takes the reservation with the new type; every registration of key 1 goes.
        assert_eq!(holder(&s), Some(id("b")));
        assert_eq!(
            s.reservation.as_ref().unwrap().reservation_type(),
            ExclusiveAccess
        );
        assert_eq!(
            s.registrations.keys().cloned().collect::<Vec<_>>(),
            vec![id("b"), id("c")]
        );
        assert_eq!(applied.abort, vec![id("a"), id("a2")]);
    }

    #[test]
    fn preempt_without_abort_aborts_nothing() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        let applied = run(&mut s, "b", preempt(2, 1, WriteExclusive, false)).unwrap();
        assert!(applied.abort.is_empty());
        assert_eq!(holder(&s), Some(id("b")));
    }

    #[test]
    fn preempt_a_non_holder_only_removes_registrations() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        register(&mut s, "c", 3);
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        let applied = run(&mut s, "b", preempt(2, 3, ExclusiveAccess, true)).unwrap();
        // The reservation (holder and type) is untouched; c is gone.
        assert_eq!(holder(&s), Some(id("a")));
        assert_eq!(
            s.reservation.as_ref().unwrap().reservation_type(),
            WriteExclusive
        );
        assert!(!s.registrations.contains_key(&id("c")));
        assert_eq!(applied.abort, vec![id("c")]);
        // No reservation at all: same, registrations only.
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", preempt(1, 2, WriteExclusive, false)).unwrap();
        assert_eq!(s.reservation, None);
        assert_eq!(s.registrations.len(), 1);
    }

    #[test]
    fn preempt_failures() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        // Unregistered issuer, or the issuer's wrong key: conflict.
        assert_eq!(
            run(&mut s, "c", preempt(0, 1, WriteExclusive, false)).unwrap_err(),
            "ReservationConflict"
        );
        assert_eq!(
            run(&mut s, "b", preempt(3, 1, WriteExclusive, false)).unwrap_err(),
            "ReservationConflict"
        );
        // A key nobody has: conflict.
        assert_eq!(
            run(&mut s, "b", preempt(2, 9, WriteExclusive, false)).unwrap_err(),
            "ReservationConflict"
        );
        // Key 0 without an All Registrants reservation: invalid, with or without a
        // reservation.
        assert_eq!(
            run(&mut s, "b", preempt(2, 0, WriteExclusive, false)).unwrap_err(),
            "InvalidInput"
        );
        run(&mut s, "a", reserve(1, ExclusiveAccess)).unwrap();
        assert_eq!(
            run(&mut s, "b", preempt(2, 0, WriteExclusive, false)).unwrap_err(),
            "InvalidInput"
        );
    }

    #[test]
    fn holder_preempts_itself_to_change_type() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        run(&mut s, "a", reserve(1, WriteExclusive)).unwrap();
        let applied = run(&mut s, "a", preempt(1, 1, ExclusiveAccess, true)).unwrap();
        assert_eq!(holder(&s), Some(id("a")));
        assert_eq!(
            s.reservation.as_ref().unwrap().reservation_type(),
            ExclusiveAccess
        );
        assert_eq!(
            s.registrations.len(),
            2,
            "the issuer keeps its registration"
        );
        // SPC-4 aborts every initiator registered with the preempted key, the issuer too.
        assert_eq!(applied.abort, vec![id("a")]);
    }

    #[test]
    fn preempt_all_registrants() {
        let mut s = ReservationState::default();
        register(&mut s, "a", 1);
        register(&mut s, "b", 2);
        register(&mut s, "c", 3);
        run(&mut s, "a", reserve(1, WriteExclusiveAllRegistrants)).unwrap();
        // A non-zero key removes those registrations; the reservation stays.
        let applied = run(&mut s, "a", preempt(1, 3, ExclusiveAccess, true)).unwrap();
        assert_eq!(
            s.reservation.as_ref().unwrap().reservation_type(),
            WriteExclusiveAllRegistrants
        );
        assert!(!s.registrations.contains_key(&id("c")));
        assert_eq!(applied.abort, vec![id("c")]);
        // Key 0 removes everyone else and replaces the reservation with the issuer's.
        let applied = run(&mut s, "b", preempt(2, 0, ExclusiveAccess, true)).unwrap();
        assert_eq!(holder(&s), Some(id("b")));
        assert_eq!(
            s.reservation.as_ref().unwrap().reservation_type(),
            ExclusiveAccess
        );
        assert_eq!(
            s.registrations.keys().cloned().collect::<Vec<_>>(),
            vec![id("b")]
        );
        assert_eq!(applied.abort, vec![id("a"), id("b")]);
    }

    #[test]
    fn conflict_table_by_predicate() {
        // The integration test drives the full table through disks; this checks the
        // predicate against SPC-4's table directly, so a failure points here.
        // (type, holder read/write, registrant read/write, unregistered read/write)
        let table = [
            (WriteExclusive, [true, true], [true, false], [true, false]),
            (
                ExclusiveAccess,
                [true, true],
                [false, false],
                [false, false],
            ),
            (
                WriteExclusiveRegistrantsOnly,
                [true, true],
                [true, true],
                [true, false],
            ),
            (
                ExclusiveAccessRegistrantsOnly,
                [true, true],
                [true, true],
                [false, false],
            ),
            (
                WriteExclusiveAllRegistrants,
                [true, true],
                [true, true],
                [true, false],
            ),
            (
                ExclusiveAccessAllRegistrants,
                [true, true],
                [true, true],
                [false, false],
            ),
        ];
        for (t, holder, registrant, unregistered) in table {
            let mut s = ReservationState::default();
            register(&mut s, "h", 1);
            register(&mut s, "r", 2);
            run(&mut s, "h", reserve(1, t)).unwrap();
            for (who, [read, write]) in [("h", holder), ("r", registrant), ("u", unregistered)] {
                assert_eq!(
                    s.check_access(&id(who), Access::Read).is_ok(),
                    read,
                    "{t:?} {who} read"
                );
                assert_eq!(
                    s.check_access(&id(who), Access::Write).is_ok(),
                    write,
                    "{t:?} {who} write"
                );
            }
        }
        // No reservation: everyone does everything.
        let s = ReservationState::default();
        assert!(s.check_access(&id("u"), Access::Write).is_ok());
    }
}
