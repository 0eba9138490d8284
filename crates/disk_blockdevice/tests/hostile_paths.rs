//! `blockdev` nodes over paths that are neither block devices nor regular files: a one-line
//! error naming the path and what it is, at once. A FIFO used to block `open` until a writer
//! came; `/dev/null` and a directory gave a bare "Invalid argument (os error 22)" (the
//! `O_DIRECT` open failing before the type was looked at).

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{error_chain, make_fifo, without_hanging};

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
            assert!(!error.contains('\n'), "{spec}: {error}");
            assert!(
                error.contains(&format!("{path} is a {kind}")),
                "{spec}: {error}"
            );
        }
    }
}
