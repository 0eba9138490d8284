//! `prwrap(..., state=PATH)` over a state path that is not a regular file: a one-line error
//! at once (a FIFO used to block the read of the state until a writer came).

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{error_chain, make_fifo, without_hanging};

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
        assert!(!error.contains('\n'), "{spec}: {error}");
        assert!(
            error.contains(&format!("{path} is a {kind}")),
            "{spec}: {error}"
        );
    }
}
