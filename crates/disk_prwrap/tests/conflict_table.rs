//! SPC-4's table, case by case: every reservation type × initiator role × operation, with
//! the outcome SPC-4 prescribes written next to it, driven through the initiators' `Disk`s
//! over a probe that counts what reaches it.
//!
//! Each case starts from the same state: the holder registered key 1 and reserved the type,
//! the registrant registered key 2, the outsider is not registered. Under the "All
//! Registrants" types the registrant is a holder too, which is why its row matches the
//! holder's.
//!
//! The commands, per role (own key: holder 1, registrant 2, outsider 3):
//! - reserve: the type already held, with the own key;
//! - release: the type held, with the own key;
//! - preempt: the other party's key (holder → 2, registrant → 1, outsider → 1), same type;
//! - clear: with the own key.

mod support;

use disk_backend::pr::{ReservationReport, ReservationType};
use disk_backend::{Disk, DiskError};
use disk_prwrap::InitiatorId;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use support::{Counts, ProbeDisk, SECTOR_SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Holder,
    Registrant,
    Outsider,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Unmap,
    Reserve,
    Release,
    Preempt,
    Clear,
}

const OPS: [Op; 8] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Unmap,
    Op::Reserve,
    Op::Release,
    Op::Preempt,
    Op::Clear,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Succeeds and takes effect: the request reaches the disk, the command changes state.
    Done,
    /// Succeeds and changes nothing.
    NoOp,
    /// RESERVATION CONFLICT; nothing reaches the disk, the state is unchanged.
    Conflict,
}

use Outcome::{Conflict as CONFLICT, Done as DONE, NoOp as NOOP};
use ReservationType::*;
use Role::*;

#[rustfmt::skip]
const TABLE: [(ReservationType, Role, [Outcome; 8]); 18] = [
    //                                             read      write     flush     unmap     reserve   release   preempt   clear
    (WriteExclusive,                 Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (WriteExclusive,                 Registrant, [DONE,     CONFLICT, CONFLICT, CONFLICT, CONFLICT, NOOP,     DONE,     DONE]),
    (WriteExclusive,                 Outsider,   [DONE,     CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
    (ExclusiveAccess,                Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (ExclusiveAccess,                Registrant, [CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, NOOP,     DONE,     DONE]),
    (ExclusiveAccess,                Outsider,   [CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
    (WriteExclusiveRegistrantsOnly,  Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (WriteExclusiveRegistrantsOnly,  Registrant, [DONE,     DONE,     DONE,     DONE,     CONFLICT, NOOP,     DONE,     DONE]),
    (WriteExclusiveRegistrantsOnly,  Outsider,   [DONE,     CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
    (ExclusiveAccessRegistrantsOnly, Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (ExclusiveAccessRegistrantsOnly, Registrant, [DONE,     DONE,     DONE,     DONE,     CONFLICT, NOOP,     DONE,     DONE]),
    (ExclusiveAccessRegistrantsOnly, Outsider,   [CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
    (WriteExclusiveAllRegistrants,   Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (WriteExclusiveAllRegistrants,   Registrant, [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (WriteExclusiveAllRegistrants,   Outsider,   [DONE,     CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
    (ExclusiveAccessAllRegistrants,  Holder,     [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (ExclusiveAccessAllRegistrants,  Registrant, [DONE,     DONE,     DONE,     DONE,     NOOP,     DONE,     DONE,     DONE]),
    (ExclusiveAccessAllRegistrants,  Outsider,   [CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT, CONFLICT]),
];

const HOLDER_KEY: u64 = 1;
const REGISTRANT_KEY: u64 = 2;
const OUTSIDER_KEY: u64 = 3;

fn id(role: Role) -> InitiatorId {
    InitiatorId::new(format!("{role:?}").into_bytes(), 0)
}

fn own_key(role: Role) -> u64 {
    match role {
        Holder => HOLDER_KEY,
        Registrant => REGISTRANT_KEY,
        Outsider => OUTSIDER_KEY,
    }
}

fn victim_key(role: Role) -> u64 {
    match role {
        Holder => REGISTRANT_KEY,
        Registrant | Outsider => HOLDER_KEY,
    }
}

fn key_of(report: &ReservationReport, role: Role) -> Option<(u64, bool)> {
    let id = id(role);
    report
        .controllers
        .iter()
        .find(|c| c.host_id == id.host_id())
        .map(|c| (c.key, c.holds_reservation))
}

/// Runs one case and returns what happened, checking that the outcome's promises hold.
fn run_case(reservation_type: ReservationType, role: Role, op: Op) -> Outcome {
    let (probe, shared) = ProbeDisk::wrapped(16);
    let holder = shared.initiator(id(Holder));
    let registrant = shared.initiator(id(Registrant));
    let actor: Disk = shared.initiator(id(role));
    let case = format!("{reservation_type:?} {role:?} {op:?}");

    block_on(async {
        let (h, r) = (holder.pr().unwrap(), registrant.pr().unwrap());
        h.register(None, HOLDER_KEY, None).await.unwrap();
        r.register(None, REGISTRANT_KEY, None).await.unwrap();
        h.reserve(HOLDER_KEY, reservation_type).await.unwrap();

        let pr = actor.pr().unwrap();
        let counts_before = probe.counts();
        let before = pr.report().await.unwrap();
        let one = OwnedRequestBuffers::from_slice(&[9; SECTOR_SIZE as usize]);
        let key = own_key(role);
        let result = match op {
            Op::Read => actor.read_vectored(&one.buffers(true), 0).await,
            Op::Write => actor.write_vectored(&one.buffers(false), 1, false).await,
            Op::Flush => actor.sync_cache().await,
            Op::Unmap => actor.unmap(2, 1, false).await,
            Op::Reserve => pr.reserve(key, reservation_type).await,
            Op::Release => pr.release(key, reservation_type).await,
            Op::Preempt => {
                pr.preempt(key, victim_key(role), reservation_type, false)
                    .await
            }
            Op::Clear => pr.clear(key).await,
        };
        let after = pr.report().await.unwrap();
        let counts_after = probe.counts();

        let outcome = match result {
            Err(DiskError::ReservationConflict) => CONFLICT,
            Ok(()) if op_is_io(op) || after != before => DONE,
            Ok(()) => NOOP,
            Err(other) => panic!("{case}: unexpected error {other:?}"),
        };

        // What each outcome promises beyond the status.
        if outcome == CONFLICT || op_is_io(op) {
            assert_eq!(after, before, "{case}: the reservation state changed");
        }
        let expected_counts = if outcome == DONE {
            reached(counts_before, op)
        } else {
            counts_before
        };
        assert_eq!(
            counts_after, expected_counts,
            "{case}: what reached the inner disk"
        );
        if outcome == DONE {
            check_effect(&case, reservation_type, role, op, &before, &after);
        }
        outcome
    })
}

fn op_is_io(op: Op) -> bool {
    matches!(op, Op::Read | Op::Write | Op::Flush | Op::Unmap)
}

/// The counts after `op` reached the disk once.
fn reached(mut counts: Counts, op: Op) -> Counts {
    match op {
        Op::Read => counts.reads += 1,
        Op::Write => counts.writes += 1,
        Op::Flush => counts.flushes += 1,
        Op::Unmap => counts.unmaps += 1,
        _ => {}
    }
    counts
}

/// The effect SPC-4 gives a command that took effect.
fn check_effect(
    case: &str,
    reservation_type: ReservationType,
    role: Role,
    op: Op,
    before: &ReservationReport,
    after: &ReservationReport,
) {
    match op {
        Op::Release => {
            assert_eq!(after.reservation_type, None, "{case}: released");
            assert_eq!(after.controllers.len(), 2, "{case}: registrations kept");
            assert_eq!(after.generation, before.generation, "{case}: generation");
        }
        Op::Preempt => {
            let victim = if role == Holder { Registrant } else { Holder };
            assert_eq!(key_of(after, victim), None, "{case}: victim unregistered");
            assert_eq!(
                key_of(after, role),
                Some((own_key(role), true)),
                "{case}: the issuer is registered and holds the reservation"
            );
            assert_eq!(after.reservation_type, Some(reservation_type), "{case}");
            assert_eq!(
                after.generation,
                before.generation + 1,
                "{case}: generation"
            );
        }
        Op::Clear => {
            assert!(after.controllers.is_empty(), "{case}: no registrations");
            assert_eq!(after.reservation_type, None, "{case}: no reservation");
            assert_eq!(
                after.generation,
                before.generation + 1,
                "{case}: generation"
            );
        }
        Op::Reserve | Op::Read | Op::Write | Op::Flush | Op::Unmap => {}
    }
}

#[test]
fn spc4_conflict_table() {
    let mut failures = Vec::new();
    for (reservation_type, role, expected) in TABLE {
        for (op, expected) in OPS.into_iter().zip(expected) {
            let actual = run_case(reservation_type, role, op);
            if actual != expected {
                failures.push(format!(
                    "{reservation_type:?} {role:?} {op:?}: expected {expected:?}, got {actual:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_table_covers_every_type_and_role() {
    for reservation_type in ReservationType::ALL {
        for role in [Holder, Registrant, Outsider] {
            assert_eq!(
                TABLE
                    .iter()
                    .filter(|(t, r, _)| *t == reservation_type && *r == role)
                    .count(),
                1,
                "{reservation_type:?} {role:?}"
            );
        }
    }
}

#[test]
fn no_reservation_restricts_nobody() {
    for role in [Holder, Registrant, Outsider] {
        let (probe, shared) = ProbeDisk::wrapped(16);
        let disk = shared.initiator(id(role));
        block_on(async {
            shared
                .initiator(id(Holder))
                .pr()
                .unwrap()
                .register(None, HOLDER_KEY, None)
                .await
                .unwrap();
            let one = OwnedRequestBuffers::new(SECTOR_SIZE as usize);
            disk.read_vectored(&one.buffers(true), 0).await.unwrap();
            disk.write_vectored(&one.buffers(false), 0, true)
                .await
                .unwrap();
            disk.sync_cache().await.unwrap();
            disk.unmap(0, 1, false).await.unwrap();
        });
        assert_eq!(
            probe.counts(),
            Counts {
                reads: 1,
                writes: 1,
                flushes: 1,
                unmaps: 1
            },
            "{role:?}"
        );
    }
}
