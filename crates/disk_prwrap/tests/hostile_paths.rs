//! `prwrap(..., state=PATH)` over a state path that is not a regular file: a one-line error
//! at once (a FIFO used to block the read of the state until a writer came).

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{assert_one_line_error, error_chain, make_fifo, without_hanging};

fn resolve(spec: String) -> Result<disk_backend::Disk, String> {
    without_hanging(&spec.clone(), move || {
        let mut resolver = Resolver::new();
        resolver
            .register(disk_prwrap::PrWrapResolver)
            .register(disk_ram::RamResolver);
        let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
        resolver.resolve(&spec).map_err(|e| error_chain(&e))
    })
}

#[test]
fn state_files_must_be_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(dir.path(), "fifo");
    for (path, kind) in [
        (fifo.display().to_string(), "fifo"),
        (dir.path().display().to_string(), "directory"),
        ("/dev/zero".to_owned(), "character device"),
    ] {
        let spec = format!("prwrap(ram, state={path})");
        let error = resolve(spec.clone()).unwrap_err();
        assert_one_line_error(&spec, &error, &format!("{path} is a {kind}"));
    }
}

/// A state file that could never be written is refused when the wrapper is built, not
/// accepted until the first command that must persist fails: a directory that does not exist,
/// a file on a read-only mount.
#[test]
fn state_files_must_be_writable() {
    let spec = "prwrap(ram, state=/nonexistent/dir/x)".to_owned();
    let error = resolve(spec.clone()).unwrap_err();
    assert!(!error.contains('\n'), "{spec}: {error}");
    assert!(
        error.contains("/nonexistent/dir/x") && error.contains("cannot be written"),
        "{spec}: {error}"
    );

    let Some(mount) = ReadOnlyMount::new() else {
        return;
    };
    for name in ["missing", "present"] {
        let spec = format!("prwrap(ram, state={}/{name})", mount.path.display());
        let error = resolve(spec.clone()).unwrap_err();
        assert!(error.contains("cannot be written"), "{spec}: {error}");
        assert!(error.contains("Read-only file system"), "{spec}: {error}");
    }
}

/// A read-only tmpfs holding a valid state file `present`; unmounted on drop.
struct ReadOnlyMount {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    /// Mounts one, or skips the test (mounting needs root).
    fn new() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::create_dir(&path).unwrap();
        let mount = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .arg(&path)
                .output()
                .map_err(|e| e.to_string())
                .and_then(|out| {
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
                    }
                })
        };
        if let Err(e) = mount(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"]) {
            disk_conformance::skip::skip(format!("mounting a tmpfs needs root ({e})"));
            return None;
        }
        let this = Self {
            path: path.clone(),
            _dir: dir,
        };
        // A valid state file, written by a wrapper that persists a registration.
        let ram = disk_backend::Disk::new(disk_ram::RamDisk::new(64, 512).unwrap()).unwrap();
        let shared =
            disk_prwrap::DiskWithReservations::with_state_file(ram, this.path.join("present"))
                .unwrap();
        let initiator = shared.initiator(disk_prwrap::InitiatorId::new(b"host", 0));
        futures::executor::block_on(initiator.pr().unwrap().register(None, 1, Some(true))).unwrap();
        assert!(this.path.join("present").exists());
        mount(&["-o", "remount,ro"]).expect("remount read-only");
        Some(this)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}
