//! `blockdev` nodes over paths that are neither block devices nor regular files: a one-line
//! error naming the path and what it is, at once. A FIFO used to block `open` until a writer
//! came; `/dev/null` and a directory gave a bare "Invalid argument (os error 22)" (the
//! `O_DIRECT` open failing before the type was looked at).

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{assert_one_line_error, error_chain, make_fifo, without_hanging};

fn resolve(spec: String) -> Result<disk_backend::Disk, String> {
    without_hanging(&spec.clone(), move || {
        let mut resolver = Resolver::new();
        resolver.register(disk_blockdevice::BlockDeviceResolver);
        let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
        resolver.resolve(&spec).map_err(|e| error_chain(&e))
    })
}

#[test]
fn non_disks_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(dir.path(), "fifo");
    for (path, kind) in [
        (fifo.display().to_string(), "fifo"),
        (dir.path().display().to_string(), "directory"),
        ("/dev/null".to_owned(), "character device"),
    ] {
        for spec in [
            format!("blockdev({path})"),
            format!("blockdev({path}, ro)"),
            format!("blockdev({path}, buffered)"),
        ] {
            let error = resolve(spec.clone()).unwrap_err();
            assert_one_line_error(&spec, &error, &format!("{path} is a {kind}"));
        }
    }
}

/// A regular file whose size is not a whole number of sectors is refused, saying so,
/// instead of silently losing its tail.
#[test]
fn a_partial_last_sector_is_refused() {
    if let Some(reason) = io_uring_unavailable() {
        disk_conformance::skip::skip(reason);
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4096 + 100).unwrap();
    let path = file.path().display();
    for spec in [
        format!("blockdev({path}, buffered)"),
        format!("blockdev({path}, buffered, ro)"),
        format!("blockdev({path}, buffered, sector_size=4096)"),
    ] {
        let error = resolve(spec.clone()).unwrap_err();
        assert!(!error.contains('\n'), "{spec}: {error}");
        assert!(
            error.contains("4196 bytes") && error.contains("not a whole number of"),
            "{spec}: {error}"
        );
    }
}

/// Why io_uring cannot be used here, if it cannot.
fn io_uring_unavailable() -> Option<String> {
    let file = tempfile::NamedTempFile::new().ok()?;
    file.as_file().set_len(4096).ok()?;
    match disk_blockdevice::BlockDeviceDisk::open(
        file.path(),
        &disk_blockdevice::BlockDeviceOptions {
            direct: false,
            ..Default::default()
        },
    ) {
        Err(disk_blockdevice::OpenError::Ring(e)) => Some(format!("io_uring is unavailable ({e})")),
        _ => None,
    }
}
