//! The persistent reservation commands through the initiators' `Disk`s: registration,
//! reserve and release, unregistering the holder, the report, the generation counter and
//! the capabilities.

use disk_backend::pr::ReservationType::{self, *};
use disk_backend::pr::{PersistentReservation, RegisteredController, ReservationCapabilities};
use disk_backend::{Disk, DiskError};
use disk_prwrap::{DiskWithReservations, InitiatorId};
use disk_ram::RamDisk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;

fn wrapper() -> DiskWithReservations {
    DiskWithReservations::new(Disk::new(RamDisk::new(16, 512).unwrap()).unwrap())
}

fn pr(disk: &Disk) -> &dyn PersistentReservation {
    disk.pr()
        .expect("an initiator's disk has persistent reservations")
}

fn is_conflict(result: Result<(), DiskError>) -> bool {
    matches!(result, Err(DiskError::ReservationConflict))
}

#[test]
fn registration_needs_the_current_key() {
    let shared = wrapper();
    let a = shared.initiator(InitiatorId::new(*b"a", 0));
    block_on(async {
        // Unregistered: naming a key conflicts.
        assert!(is_conflict(pr(&a).register(Some(7), 1, None).await));
        pr(&a).register(Some(0), 1, None).await.unwrap();
        // Registered: the wrong current key conflicts, the right one replaces it.
        assert!(is_conflict(pr(&a).register(Some(2), 3, None).await));
        pr(&a).register(Some(1), 3, None).await.unwrap();
        // REGISTER AND IGNORE EXISTING KEY.
        pr(&a).register(None, 4, None).await.unwrap();
        assert_eq!(pr(&a).report().await.unwrap().controllers[0].key, 4);
        // Key 0 unregisters.
        pr(&a).register(Some(4), 0, None).await.unwrap();
        assert!(pr(&a).report().await.unwrap().controllers.is_empty());
    });
}

#[test]
fn reserve_and_release() {
    let shared = wrapper();
    let a = shared.initiator(InitiatorId::new(*b"a", 0));
    let b = shared.initiator(InitiatorId::new(*b"b", 0));
    block_on(async {
        // Unregistered: conflict.
        assert!(is_conflict(pr(&a).reserve(0, WriteExclusive).await));
        pr(&a).register(None, 1, None).await.unwrap();
        pr(&b).register(None, 2, None).await.unwrap();
        assert!(is_conflict(pr(&a).reserve(2, WriteExclusive).await));
        pr(&a).reserve(1, WriteExclusive).await.unwrap();
        // Same type again: no-op. Another type, or another initiator: conflict.
        pr(&a).reserve(1, WriteExclusive).await.unwrap();
        assert!(is_conflict(pr(&a).reserve(1, ExclusiveAccess).await));
        assert!(is_conflict(pr(&b).reserve(2, WriteExclusive).await));
        // A non-holder's release changes nothing; the holder's with the wrong type is
        // invalid; with the right type it releases.
        pr(&b).release(2, WriteExclusive).await.unwrap();
        assert_eq!(
            pr(&a).report().await.unwrap().reservation_type,
            Some(WriteExclusive)
        );
        assert!(matches!(
            pr(&a).release(1, ExclusiveAccess).await,
            Err(DiskError::InvalidInput)
        ));
        pr(&a).release(1, WriteExclusive).await.unwrap();
        assert_eq!(pr(&a).report().await.unwrap().reservation_type, None);
        // Now b may reserve.
        pr(&b).reserve(2, ExclusiveAccess).await.unwrap();
    });
}

#[test]
fn unregistering_the_holder_releases_the_reservation() {
    let shared = wrapper();
    let a = shared.initiator(InitiatorId::new(*b"a", 0));
    let b = shared.initiator(InitiatorId::new(*b"b", 0));
    let data = OwnedRequestBuffers::new(512);
    block_on(async {
        pr(&a).register(None, 1, None).await.unwrap();
        pr(&b).register(None, 2, None).await.unwrap();
        pr(&a).reserve(1, ExclusiveAccess).await.unwrap();
        assert!(is_conflict(b.read_vectored(&data.buffers(true), 0).await));
        pr(&a).register(Some(1), 0, None).await.unwrap();
        assert_eq!(pr(&b).report().await.unwrap().reservation_type, None);
        b.read_vectored(&data.buffers(true), 0).await.unwrap();

        // All Registrants: it lasts until the last registrant leaves.
        pr(&a).register(None, 1, None).await.unwrap();
        pr(&a)
            .reserve(1, ExclusiveAccessAllRegistrants)
            .await
            .unwrap();
        pr(&a).register(Some(1), 0, None).await.unwrap();
        assert_eq!(
            pr(&b).report().await.unwrap().reservation_type,
            Some(ExclusiveAccessAllRegistrants)
        );
        // a is no longer a registrant, so it is fenced out.
        assert!(is_conflict(a.read_vectored(&data.buffers(true), 0).await));
        pr(&b).register(Some(2), 0, None).await.unwrap();
        assert_eq!(pr(&b).report().await.unwrap().reservation_type, None);
        a.read_vectored(&data.buffers(true), 0).await.unwrap();
    });
}

#[test]
fn report_lists_every_registrant() {
    let shared = wrapper();
    let a0 = shared.initiator(InitiatorId::new(*b"host-a", 0));
    let a1 = shared.initiator(InitiatorId::new(*b"host-a", 1));
    let b = shared.initiator(InitiatorId::new(*b"host-b", 9));
    let controller = |host_id: &[u8], controller_id, key, holds_reservation| RegisteredController {
        key,
        host_id: host_id.to_vec(),
        controller_id,
        holds_reservation,
    };
    block_on(async {
        pr(&a0).register(None, 0xa0, None).await.unwrap();
        pr(&a1).register(None, 0xa1, None).await.unwrap();
        pr(&b).register(None, 0xb, None).await.unwrap();
        pr(&a1)
            .reserve(0xa1, WriteExclusiveRegistrantsOnly)
            .await
            .unwrap();
        let report = pr(&b).report().await.unwrap();
        assert_eq!(report.reservation_type, Some(WriteExclusiveRegistrantsOnly));
        assert!(!report.persist_through_power_loss);
        assert_eq!(
            report.controllers,
            vec![
                controller(b"host-a", 0, 0xa0, false),
                controller(b"host-a", 1, 0xa1, true),
                controller(b"host-b", 9, 0xb, false),
            ]
        );
        // Under an All Registrants type everyone holds it.
        pr(&a1)
            .release(0xa1, WriteExclusiveRegistrantsOnly)
            .await
            .unwrap();
        pr(&b)
            .reserve(0xb, WriteExclusiveAllRegistrants)
            .await
            .unwrap();
        let report = pr(&a0).report().await.unwrap();
        assert!(report.controllers.iter().all(|c| c.holds_reservation));
    });
}

#[test]
fn generation_changes_exactly_when_spc4_says() {
    let shared = wrapper();
    let (a, b) = (
        shared.initiator(InitiatorId::new(*b"a", 0)),
        shared.initiator(InitiatorId::new(*b"b", 0)),
    );
    let (a, b) = (pr(&a), pr(&b));
    let mut expected = 0;
    let mut step = |what: &str, result: Result<(), DiskError>, succeeds: bool, changes: bool| {
        assert_eq!(result.is_ok(), succeeds, "{what}: {result:?}");
        expected += u32::from(changes);
        let generation = block_on(a.report()).unwrap().generation;
        assert_eq!(generation, expected, "after: {what}");
    };
    generation_script(a, b, &mut step);
}

/// The commands of `generation_changes_exactly_when_spc4_says`, one a line: what, the
/// result, whether it succeeds, whether PRGENERATION changes.
#[rustfmt::skip]
fn generation_script(
    a: &dyn PersistentReservation,
    b: &dyn PersistentReservation,
    step: &mut impl FnMut(&str, Result<(), DiskError>, bool, bool),
) {
    step("a registers", block_on(a.register(None, 1, None)), true, true);
    step("b registers", block_on(b.register(None, 2, None)), true, true);
    step("a reserves", block_on(a.reserve(1, WriteExclusive)), true, false);
    step("a reserves again", block_on(a.reserve(1, WriteExclusive)), true, false);
    step("b reserves", block_on(b.reserve(2, WriteExclusive)), false, false);
    step("b releases", block_on(b.release(2, WriteExclusive)), true, false);
    step("a releases", block_on(a.release(1, WriteExclusive)), true, false);
    step("a re-registers", block_on(a.register(Some(1), 1, None)), true, true);
    step("a, wrong key", block_on(a.register(Some(9), 3, None)), false, false);
    step("a reserves", block_on(a.reserve(1, ExclusiveAccess)), true, false);
    step("b preempts", block_on(b.preempt(2, 1, ExclusiveAccess, false)), true, true);
    step("a registers", block_on(a.register(None, 1, None)), true, true);
    step("b aborts a", block_on(b.preempt(2, 1, ExclusiveAccess, true)), true, true);
    step("a clears", block_on(a.clear(1)), false, false);
    step("b clears", block_on(b.clear(2)), true, true);
    // SPC-4 counts a REGISTER that completes even when it registers nothing.
    step("a registers 0", block_on(a.register(None, 0, None)), true, true);
}

#[test]
fn handles_of_one_identity_are_one_initiator() {
    let shared = wrapper();
    let first = shared.initiator(InitiatorId::new(*b"a", 0));
    let second = shared.clone().initiator(InitiatorId::new(*b"a", 0));
    let other_path = shared.initiator(InitiatorId::new(*b"a", 1));
    block_on(async {
        pr(&first).register(None, 1, None).await.unwrap();
        pr(&second).reserve(1, ExclusiveAccess).await.unwrap();
        let data = OwnedRequestBuffers::new(512);
        first
            .write_vectored(&data.buffers(false), 0, false)
            .await
            .unwrap();
        // Another controller of the same host is another initiator.
        assert!(is_conflict(
            other_path
                .write_vectored(&data.buffers(false), 0, false)
                .await
        ));
        assert_eq!(pr(&second).report().await.unwrap().controllers.len(), 1);
    });
}

#[test]
fn capabilities_are_honest() {
    let shared = wrapper();
    let disk = shared.initiator(InitiatorId::new(*b"a", 0));
    let capabilities = pr(&disk).capabilities();
    for t in ReservationType::ALL {
        assert!(capabilities.supports(t), "{t:?}");
    }
    assert_eq!(
        capabilities,
        ReservationCapabilities {
            write_exclusive: true,
            exclusive_access: true,
            write_exclusive_registrants_only: true,
            exclusive_access_registrants_only: true,
            write_exclusive_all_registrants: true,
            exclusive_access_all_registrants: true,
            persist_through_power_loss: false,
        }
    );
    // Every advertised type really works.
    block_on(async {
        pr(&disk).register(None, 1, None).await.unwrap();
        for t in ReservationType::ALL {
            pr(&disk).reserve(1, t).await.unwrap();
            assert_eq!(pr(&disk).report().await.unwrap().reservation_type, Some(t));
            pr(&disk).release(1, t).await.unwrap();
        }
    });
}

#[test]
fn the_initiator_disk_forwards_the_inner_geometry() {
    let ram = std::sync::Arc::new(RamDisk::new(100, 4096).unwrap().with_disk_id([3; 16]));
    let shared = DiskWithReservations::new(Disk::new(ram.clone()).unwrap());
    let disk = shared.initiator(InitiatorId::new(*b"a", 0));
    assert_eq!(disk.disk_type(), "prwrap");
    assert_eq!(disk.sector_count(), 100);
    assert_eq!(disk.sector_size(), 4096);
    assert_eq!(disk.disk_id(), Some([3; 16]));
    assert!(!disk.is_read_only());
    assert_eq!(shared.inner().sector_count(), 100);
    // Resizes of the inner disk are visible and wake wait_resize.
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(100))
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    ram.resize(200).unwrap();
    assert_eq!(waiter.join().unwrap(), 200);
    assert_eq!(disk.sector_count(), 200);
}

#[test]
fn prwrap_specs() {
    use disk_backend::resolve::Resolver;
    let mut resolver = Resolver::new();
    resolver
        .register(disk_prwrap::PrWrapResolver)
        .register(disk_ram::RamResolver);
    let resolve = |spec: &str| {
        resolver
            .resolve(&spec.parse().unwrap())
            .map_err(|e| e.to_string())
    };
    let disk = resolve("prwrap(ram(size=1M), host=node-a, controller=3)").unwrap();
    assert_eq!(disk.sector_count(), 2048);
    let pr = disk.pr().expect("reservations");
    block_on(pr.register(None, 0x11, None)).unwrap();
    let report = block_on(pr.report()).unwrap();
    assert_eq!(report.controllers[0].host_id, b"node-a");
    assert_eq!(report.controllers[0].controller_id, 3);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("pr.state");
    std::fs::write(&state, b"not a state file").unwrap();
    let err = resolve(&format!("prwrap(ram, state={})", state.display())).unwrap_err();
    assert!(
        err.contains("prwrap: cannot load the reservation state"),
        "{err}"
    );
    for (spec, error) in [
        ("prwrap", "prwrap: takes exactly one disk, not 0"),
        ("prwrap(ram, controller=70000)", "does not fit in 16 bits"),
        (
            "prwrap(ram, controller=x)",
            "`controller`: `x` is not a number",
        ),
        ("prwrap(ram, host=a, host=b)", "duplicate argument `host`"),
        ("prwrap(bogus)", "prwrap/bogus[1]: unknown disk kind"),
    ] {
        let err = resolve(spec).unwrap_err();
        assert!(err.contains(error), "{spec}: {err}");
    }
}

/// Guest memory announced to an initiator's disk reaches the shared disk below.
#[test]
fn register_memory_is_forwarded() {
    let probe = std::sync::Arc::new(disk_conformance::MemoryProbe::new(64));
    let shared = DiskWithReservations::new(Disk::new(probe.clone()).unwrap());
    let disk = shared.initiator(InitiatorId::new(*b"a", 0));
    let memory = request_buffers::GuestMemory::allocate(4096);
    disk.register_memory(&memory).unwrap();
    assert!(probe.last_is(&memory));
}
