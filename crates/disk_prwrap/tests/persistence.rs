//! Persist Through Power Loss: the state survives dropping and recreating the wrapper, a
//! torn or damaged state file is refused with a clear error, and without a file asking for
//! persistence is refused.

use disk_backend::pr::ReservationType::{ExclusiveAccessRegistrantsOnly, WriteExclusive};
use disk_backend::{Disk, DiskError};
use disk_prwrap::{DecodeStateError, DiskWithReservations, InitiatorId, LoadStateError};
use disk_ram::RamDisk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;

fn id(name: &str, controller_id: u16) -> InitiatorId {
    InitiatorId::new(name.as_bytes(), controller_id)
}

/// The medium outlives the wrapper, as a disk outlives a power cycle of its controller.
fn open(ram: &Arc<RamDisk>, path: &Path) -> Result<DiskWithReservations, LoadStateError> {
    DiskWithReservations::with_state_file(Disk::new(ram.clone()).unwrap(), path)
}

fn ram() -> Arc<RamDisk> {
    Arc::new(RamDisk::new(64, 512).unwrap())
}

#[test]
fn state_survives_dropping_and_recreating_the_wrapper() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reservations");
    let ram = ram();
    let before = {
        let shared = open(&ram, &path).unwrap();
        let a = shared.initiator(id("host-a", 1));
        let b = shared.initiator(id("host-b", 0));
        block_on(async {
            let (a, b) = (a.pr().unwrap(), b.pr().unwrap());
            assert!(a.capabilities().persist_through_power_loss);
            a.register(None, 0xa, Some(true)).await.unwrap();
            b.register(None, 0xb, None).await.unwrap();
            a.reserve(0xa, ExclusiveAccessRegistrantsOnly)
                .await
                .unwrap();
            let report = a.report().await.unwrap();
            assert!(report.persist_through_power_loss);
            report
        })
    };
    assert!(path.exists());

    let shared = open(&ram, &path).unwrap();
    let a = shared.initiator(id("host-a", 1));
    let outsider = shared.initiator(id("host-c", 0));
    let after = block_on(a.pr().unwrap().report()).unwrap();
    // PRGENERATION restarts at 0 at power on; everything else is as it was.
    assert_eq!(after.generation, 0);
    assert_eq!(
        disk_backend::pr::ReservationReport {
            generation: 0,
            ..before
        },
        after
    );
    // And it is enforced: the restored reservation still fences the outsider.
    let buffer = OwnedRequestBuffers::new(512);
    assert!(matches!(
        block_on(outsider.read_vectored(&buffer.buffers(true), 0)),
        Err(DiskError::ReservationConflict)
    ));
    block_on(a.write_vectored(&buffer.buffers(false), 0, false)).unwrap();
}

#[test]
fn every_change_is_saved_before_the_command_completes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reservations");
    let ram = ram();
    let shared = open(&ram, &path).unwrap();
    let a = shared.initiator(id("a", 0));
    let b = shared.initiator(id("b", 0));
    let (a, b) = (a.pr().unwrap(), b.pr().unwrap());
    // What a fresh wrapper restores from the file right now.
    let restored = || {
        let shared = open(&ram, &path).unwrap();
        let report = block_on(shared.initiator(id("x", 0)).pr().unwrap().report()).unwrap();
        (
            report.reservation_type,
            report
                .controllers
                .iter()
                .map(|c| (c.host_id.clone(), c.key, c.holds_reservation))
                .collect::<Vec<_>>(),
        )
    };
    // One command at a time, each awaited to completion before the file is read.
    block_on(a.register(None, 1, Some(true))).unwrap();
    assert_eq!(restored(), (None, vec![(b"a".to_vec(), 1, false)]));
    block_on(b.register(None, 2, None)).unwrap();
    block_on(a.reserve(1, WriteExclusive)).unwrap();
    assert_eq!(
        restored(),
        (
            Some(WriteExclusive),
            vec![(b"a".to_vec(), 1, true), (b"b".to_vec(), 2, false)]
        )
    );
    block_on(b.preempt(2, 1, WriteExclusive, true)).unwrap();
    assert_eq!(
        restored(),
        (Some(WriteExclusive), vec![(b"b".to_vec(), 2, true)])
    );
    block_on(b.release(2, WriteExclusive)).unwrap();
    assert_eq!(restored(), (None, vec![(b"b".to_vec(), 2, false)]));
    block_on(b.clear(2)).unwrap();
    assert_eq!(restored(), (None, vec![]));
}

#[test]
fn turning_persistence_off_forgets_the_state_at_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reservations");
    let ram = ram();
    {
        let shared = open(&ram, &path).unwrap();
        let a = shared.initiator(id("a", 0));
        block_on(async {
            let a = a.pr().unwrap();
            a.register(None, 1, Some(true)).await.unwrap();
            a.reserve(1, WriteExclusive).await.unwrap();
            a.register(Some(1), 1, Some(false)).await.unwrap();
            assert!(!a.report().await.unwrap().persist_through_power_loss);
        });
    }
    let shared = open(&ram, &path).unwrap();
    let report = block_on(shared.initiator(id("a", 0)).pr().unwrap().report()).unwrap();
    assert!(report.controllers.is_empty());
    assert_eq!(report.reservation_type, None);
    assert!(!report.persist_through_power_loss);
}

#[test]
fn without_a_request_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reservations");
    let ram = ram();
    {
        let shared = open(&ram, &path).unwrap();
        let a = shared.initiator(id("a", 0));
        block_on(async {
            let a = a.pr().unwrap();
            a.register(None, 1, None).await.unwrap();
            a.reserve(1, WriteExclusive).await.unwrap();
        });
    }
    assert!(!path.exists(), "APTPL was never set");
    let shared = open(&ram, &path).unwrap();
    let report = block_on(shared.initiator(id("a", 0)).pr().unwrap().report()).unwrap();
    assert!(report.controllers.is_empty());
}

#[test]
fn without_a_state_file_persistence_is_refused() {
    let shared = DiskWithReservations::new(Disk::new(RamDisk::new(8, 512).unwrap()).unwrap());
    let a = shared.initiator(id("a", 0));
    let pr = a.pr().unwrap();
    assert!(!pr.capabilities().persist_through_power_loss);
    block_on(async {
        assert!(matches!(
            pr.register(None, 1, Some(true)).await,
            Err(DiskError::InvalidInput)
        ));
        // Refused entirely: not registered, generation unchanged.
        let report = pr.report().await.unwrap();
        assert!(report.controllers.is_empty());
        assert_eq!(report.generation, 0);
        // Asking for no persistence is fine.
        pr.register(None, 1, Some(false)).await.unwrap();
        pr.register(Some(1), 2, None).await.unwrap();
        assert_eq!(pr.report().await.unwrap().controllers[0].key, 2);
    });
}

/// Writes a state file with two registrations and a reservation, and returns its bytes.
fn valid_state_file(ram: &Arc<RamDisk>, path: &Path) -> Vec<u8> {
    let shared = open(ram, path).unwrap();
    let a = shared.initiator(id("a", 0));
    let b = shared.initiator(id("b", 0));
    block_on(async {
        a.pr().unwrap().register(None, 1, Some(true)).await.unwrap();
        b.pr().unwrap().register(None, 2, None).await.unwrap();
        a.pr().unwrap().reserve(1, WriteExclusive).await.unwrap();
    });
    std::fs::read(path).unwrap()
}

fn corrupt_error(ram: &Arc<RamDisk>, path: &Path, bytes: &[u8]) -> LoadStateError {
    std::fs::write(path, bytes).unwrap();
    open(ram, path).expect_err("a damaged state file was accepted")
}

#[test]
fn a_torn_or_damaged_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reservations");
    let ram = ram();
    let bytes = valid_state_file(&ram, &path);

    // Torn: every shorter prefix, including an empty file.
    for len in 0..bytes.len() {
        let error = corrupt_error(&ram, &path, &bytes[..len]);
        assert!(
            matches!(
                error,
                LoadStateError::Corrupt {
                    source: DecodeStateError::TooShort { .. }
                        | DecodeStateError::LengthMismatch { .. },
                    ..
                }
            ),
            "truncated to {len}: {error:?}"
        );
    }
    // Damaged in the middle.
    let mut flipped = bytes.clone();
    let middle = bytes.len() / 2;
    flipped[middle] ^= 0x10;
    let error = corrupt_error(&ram, &path, &flipped);
    assert!(matches!(
        error,
        LoadStateError::Corrupt {
            source: DecodeStateError::ChecksumMismatch { .. },
            ..
        }
    ));
    // Not ours at all.
    let error = corrupt_error(&ram, &path, b"this is some other file, not a state file");
    assert!(matches!(
        error,
        LoadStateError::Corrupt {
            source: DecodeStateError::BadMagic,
            ..
        }
    ));

    // The message names the file, and the cause is kept as the source.
    let error = corrupt_error(&ram, &path, &bytes[..bytes.len() - 3]);
    let message = error.to_string();
    assert!(message.contains("corrupt"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    let source = error.source().expect("the cause is the source").to_string();
    assert!(source.contains("header describes"), "{source}");

    // The intact file still loads.
    std::fs::write(&path, &bytes).unwrap();
    open(&ram, &path).unwrap();
}

#[test]
fn an_unreadable_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let error = open(&ram(), dir.path()).unwrap_err();
    assert!(matches!(error, LoadStateError::Read { .. }), "{error:?}");
    assert!(error.source().is_some());
}

#[test]
fn a_failed_save_fails_the_command_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let path = state_dir.join("reservations");
    let shared = open(&ram(), &path).unwrap();
    let a = shared.initiator(id("a", 0));
    let pr = a.pr().unwrap();
    block_on(async {
        pr.register(None, 1, Some(true)).await.unwrap();
        // The directory disappears: the next change cannot be saved.
        std::fs::remove_dir_all(&state_dir).unwrap();
        let before = pr.report().await.unwrap();
        assert!(matches!(
            pr.reserve(1, WriteExclusive).await,
            Err(DiskError::Io(_))
        ));
        assert!(matches!(
            pr.register(Some(1), 5, None).await,
            Err(DiskError::Io(_))
        ));
        assert_eq!(pr.report().await.unwrap(), before);
        // Commands that change nothing the file holds need no save and still work.
        pr.release(1, WriteExclusive).await.unwrap();
        pr.register(Some(1), 1, None).await.unwrap();
        assert_eq!(pr.report().await.unwrap().generation, before.generation + 1);
    });
}
