//! Initiators fencing each other while I/O is in flight: refused writes never reach the
//! inner disk, and PREEMPT AND ABORT fails the preempted initiator's outstanding requests.

mod support;

use disk_backend::pr::ReservationType::WriteExclusive;
use disk_backend::{Disk, DiskError};
use disk_prwrap::{DiskWithReservations, InitiatorId};
use futures::executor::block_on;
use futures::future::join_all;
use request_buffers::OwnedRequestBuffers;
use std::collections::HashSet;
use std::future::Future;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll};
use std::time::Duration;
use support::{ProbeDisk, SECTOR_SIZE, tagged};

const KEY_A: u64 = 0xa;
const KEY_B: u64 = 0xb;
const WAIT: Duration = Duration::from_secs(10);

fn id(name: &str) -> InitiatorId {
    InitiatorId::new(name.as_bytes(), 0)
}

fn expect_ok_or_conflict(result: Result<(), DiskError>, what: &str) {
    match result {
        Ok(()) | Err(DiskError::ReservationConflict) => {}
        Err(other) => panic!("{what}: unexpected {other:?}"),
    }
}

/// A unique tag per write: node, round, index.
fn tag(node: u64, round: usize, index: usize) -> u64 {
    (node << 48) | ((round as u64) << 16) | index as u64
}

#[derive(Debug, Default)]
struct Tally {
    ok: Vec<u64>,
    refused: Vec<u64>,
    aborted: Vec<u64>,
}

const ROUNDS: usize = 60;
const BURST: usize = 6;
const SECTORS: u64 = 32;

/// One cluster node: every third round one node (alternating) fences the other (reserve,
/// or preempt the other's key, with abort every other time), and every round both nodes
/// issue a burst of concurrent tagged writes to overlapping sectors, released together
/// by a barrier so fencing and writes race.
fn node(shared: &DiskWithReservations, index: u64, barrier: &Barrier) -> Tally {
    let (name, key, other_key) = if index == 0 {
        ("a", KEY_A, KEY_B)
    } else {
        ("b", KEY_B, KEY_A)
    };
    let disk = &shared.initiator(id(name));
    let pr = disk.pr().unwrap();
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        barrier.wait();
        block_on(async {
            let fence = async {
                if round % 3 == 0 && (round / 3) as u64 % 2 == index {
                    expect_ok_or_conflict(pr.register(None, key, None).await, "register");
                    match pr.reserve(key, WriteExclusive).await {
                        Ok(()) => {}
                        Err(DiskError::ReservationConflict) => {
                            // Each node alternates between PREEMPT and PREEMPT AND ABORT.
                            let abort = (round / 6) % 2 == 0;
                            pr.preempt(key, other_key, WriteExclusive, abort)
                                .await
                                .expect("the other node holds the reservation");
                        }
                        Err(other) => panic!("reserve: {other:?}"),
                    }
                }
            };
            let buffers: Vec<(u64, OwnedRequestBuffers)> = (0..BURST)
                .map(|i| {
                    let tag = tag(index, round, i);
                    (tag, tagged(tag, 1))
                })
                .collect();
            let writes = join_all(buffers.iter().enumerate().map(|(i, (tag, buffer))| {
                let sector = (round as u64 + i as u64) % SECTORS;
                async move {
                    (
                        *tag,
                        disk.write_vectored(&buffer.buffers(false), sector, false)
                            .await,
                    )
                }
            }));
            let ((), outcomes) = futures::join!(fence, writes);
            for (tag, result) in outcomes {
                match result {
                    Ok(()) => tally.ok.push(tag),
                    Err(DiskError::ReservationConflict) => tally.refused.push(tag),
                    Err(DiskError::AbortDueToPreemptAndAbort) => tally.aborted.push(tag),
                    Err(other) => panic!("write: unexpected {other:?}"),
                }
            }
        });
    }
    tally
}

#[test]
fn fencing_under_concurrent_io_never_lets_a_refused_write_through() {
    let (probe, shared) = ProbeDisk::wrapped(SECTORS);
    // Each write stays on the "medium" a while, so preempts land while writes are in flight.
    probe.set_write_latency(Duration::from_micros(100));
    let barrier = Barrier::new(2);
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..2)
            .map(|index| {
                let (shared, barrier) = (&shared, &barrier);
                scope.spawn(move || node(shared, index, barrier))
            })
            .collect();
        nodes.into_iter().map(|n| n.join().unwrap()).collect()
    });

    let applied: HashSet<u64> = probe.applied_tags().into_iter().collect();
    for (index, tally) in tallies.iter().enumerate() {
        for tag in &tally.refused {
            assert!(
                !applied.contains(tag),
                "node {index}: write {tag:#x} was refused but reached the disk"
            );
        }
        for tag in &tally.ok {
            assert!(
                applied.contains(tag),
                "node {index}: write {tag:#x} succeeded but never reached the disk"
            );
        }
        // Ownership alternates, so each node both wrote and was fenced.
        assert!(!tally.ok.is_empty(), "node {index} never wrote");
        assert!(!tally.refused.is_empty(), "node {index} was never fenced");
    }
    assert_eq!(
        applied.len(),
        probe.counts().writes,
        "every write that reached the disk is accounted for"
    );
}

/// Issues `writes` tagged writes (tags 100..) and one read from `disk` on threads, each
/// sending its outcome.
fn spawn_requests<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    disk: &Disk,
    who: &'static str,
    writes: usize,
    tx: &mpsc::Sender<(&'static str, Result<(), DiskError>)>,
) {
    for i in 0..writes {
        let (disk, tx) = (disk.clone(), tx.clone());
        scope.spawn(move || {
            let buffer = tagged(100 + i as u64, 1);
            let result = block_on(disk.write_vectored(&buffer.buffers(false), i as u64, false));
            tx.send((who, result)).unwrap();
        });
    }
    let (disk, tx) = (disk.clone(), tx.clone());
    scope.spawn(move || {
        let buffer = OwnedRequestBuffers::new(SECTOR_SIZE as usize);
        let result = block_on(disk.read_vectored(&buffer.buffers(true), 0));
        tx.send((who, result)).unwrap();
    });
}

/// The probe, the wrapper, and the disks of a (holding Write Exclusive) and b (registered).
fn two_nodes() -> (Arc<ProbeDisk>, DiskWithReservations, Disk, Disk) {
    let (probe, shared) = ProbeDisk::wrapped(64);
    let a = shared.initiator(id("a"));
    let b = shared.initiator(id("b"));
    block_on(async {
        a.pr().unwrap().register(None, KEY_A, None).await.unwrap();
        b.pr().unwrap().register(None, KEY_B, None).await.unwrap();
        a.pr()
            .unwrap()
            .reserve(KEY_A, WriteExclusive)
            .await
            .unwrap();
    });
    (probe, shared, a, b)
}

#[test]
fn preempt_and_abort_fails_in_flight_and_queued_requests() {
    let (probe, _shared, a, b) = two_nodes();
    probe.close_gate();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        // Four writes and a read of a, a read of b: all waiting in the inner disk.
        spawn_requests(scope, &a, "a", 4, &tx);
        spawn_requests(scope, &b, "b", 0, &tx);
        probe.wait_arrived(6);

        block_on(b.pr().unwrap().preempt(KEY_B, KEY_A, WriteExclusive, true)).unwrap();

        // a's five requests fail at once, although the inner disk still holds them.
        for _ in 0..5 {
            let (who, result) = rx.recv_timeout(WAIT).expect("an aborted request hung");
            assert_eq!(who, "a", "only the preempted initiator is aborted");
            assert!(
                matches!(result, Err(DiskError::AbortDueToPreemptAndAbort)),
                "{result:?}"
            );
        }
        // b's read is not aborted: it is still waiting for the disk.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        probe.open_gate();
        let (who, result) = rx.recv_timeout(WAIT).expect("b's read hung");
        assert_eq!(who, "b");
        result.unwrap();
    });
    // The aborted writes were still queued, so none of them reached the medium.
    assert_eq!(probe.counts().writes, 0);
    assert!(probe.applied_tags().is_empty());

    // Requests a starts now are checked against the new state and not aborted: it is no
    // longer registered, so it cannot write under b's Write Exclusive, but it can read.
    let buffer = tagged(1, 1);
    assert!(matches!(
        block_on(a.write_vectored(&buffer.buffers(false), 0, false)),
        Err(DiskError::ReservationConflict)
    ));
    block_on(a.read_vectored(&buffer.buffers(true), 0)).unwrap();
    let report = block_on(b.pr().unwrap().report()).unwrap();
    assert_eq!(report.controllers.len(), 1);
    assert_eq!(report.controllers[0].key, KEY_B);
    assert!(report.controllers[0].holds_reservation);
}

#[test]
fn plain_preempt_lets_in_flight_requests_finish() {
    let (probe, _shared, a, b) = two_nodes();
    probe.close_gate();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        spawn_requests(scope, &a, "a", 4, &tx);
        probe.wait_arrived(5);
        block_on(b.pr().unwrap().preempt(KEY_B, KEY_A, WriteExclusive, false)).unwrap();
        // Without abort, requests admitted before the preempt run to completion.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        probe.open_gate();
        for _ in 0..5 {
            let (_, result) = rx.recv_timeout(WAIT).expect("a request hung");
            result.unwrap();
        }
    });
    let mut applied = probe.applied_tags();
    applied.sort();
    assert_eq!(applied, vec![100, 101, 102, 103]);
    // New writes are fenced.
    let buffer = tagged(1, 1);
    assert!(matches!(
        block_on(a.write_vectored(&buffer.buffers(false), 0, false)),
        Err(DiskError::ReservationConflict)
    ));
}

#[test]
fn an_aborted_write_that_reached_the_disk_still_reports_abort() {
    let (probe, _shared, a, b) = two_nodes();
    probe.close_gate();
    let buffer = tagged(7, 1);
    let buffers = buffer.buffers(false);
    let mut write = Box::pin(a.write_vectored(&buffers, 0, false));
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    assert!(write.as_mut().poll(&mut cx).is_pending());
    assert_eq!(probe.arrived(), 1);

    block_on(b.pr().unwrap().preempt(KEY_B, KEY_A, WriteExclusive, true)).unwrap();
    // The inner disk finishes the write before the request is polled again: the data is
    // on the medium, and the request still reports the abort (it was in flight).
    probe.open_gate();
    match write.as_mut().poll(&mut cx) {
        Poll::Ready(Err(DiskError::AbortDueToPreemptAndAbort)) => {}
        other => panic!("expected an abort, got {other:?}"),
    }
    assert_eq!(probe.applied_tags(), vec![7]);
}

#[test]
fn preempt_and_abort_of_all_registrants_aborts_every_other_registrant() {
    let (probe, shared) = ProbeDisk::wrapped(64);
    let nodes: Vec<Disk> = ["a", "b", "c"]
        .into_iter()
        .map(|name| shared.initiator(id(name)))
        .collect();
    block_on(async {
        for (key, node) in (1..).zip(&nodes) {
            node.pr().unwrap().register(None, key, None).await.unwrap();
        }
        nodes[0]
            .pr()
            .unwrap()
            .reserve(
                1,
                disk_backend::pr::ReservationType::WriteExclusiveAllRegistrants,
            )
            .await
            .unwrap();
    });
    probe.close_gate();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        spawn_requests(scope, &nodes[1], "b", 1, &tx);
        spawn_requests(scope, &nodes[2], "c", 1, &tx);
        probe.wait_arrived(4);
        // Key 0 against an All Registrants reservation preempts everyone else.
        block_on(nodes[0].pr().unwrap().preempt(1, 0, WriteExclusive, true)).unwrap();
        for _ in 0..4 {
            let (_, result) = rx.recv_timeout(WAIT).expect("an aborted request hung");
            assert!(matches!(result, Err(DiskError::AbortDueToPreemptAndAbort)));
        }
        probe.open_gate();
    });
    let report = block_on(nodes[0].pr().unwrap().report()).unwrap();
    assert_eq!(report.reservation_type, Some(WriteExclusive));
    assert_eq!(report.controllers.len(), 1);
    assert!(report.controllers[0].holds_reservation);
}
