//! `file` nodes over paths that are not files: each is a one-line error naming the path and
//! what it is, at once (a FIFO used to block `open` until a writer came).

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{assert_one_line_error, error_chain, make_fifo, without_hanging};
use disk_file::FileResolver;

fn resolve(spec: String) -> Result<disk_backend::Disk, String> {
    without_hanging(&spec.clone(), move || {
        let mut resolver = Resolver::new();
        resolver.register(FileResolver);
        let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
        resolver.resolve(&spec).map_err(|e| error_chain(&e))
    })
}

#[test]
fn non_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(dir.path(), "fifo");
    let dir_path = dir.path().display().to_string();
    for (path, kind) in [
        (fifo.display().to_string(), "fifo"),
        (dir_path, "directory"),
        ("/dev/null".to_owned(), "character device"),
        ("/dev/zero".to_owned(), "character device"),
    ] {
        for spec in [format!("file({path})"), format!("file({path}, ro)")] {
            let error = resolve(spec.clone()).unwrap_err();
            assert_one_line_error(&spec, &error, &format!("{path} is a {kind}"));
        }
    }
}

/// A file whose size is not a whole number of sectors is refused, saying so, instead of
/// silently losing its tail.
#[test]
fn a_partial_last_sector_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4096 + 100).unwrap();
    let path = file.path().display();
    for spec in [
        format!("file({path})"),
        format!("file({path}, ro)"),
        format!("file({path}, sector_size=4096)"),
    ] {
        let error = resolve(spec.clone()).unwrap_err();
        assert!(!error.contains('\n'), "{spec}: {error}");
        assert!(
            error.contains("4196 bytes") && error.contains("not a whole number of"),
            "{spec}: {error}"
        );
    }
    // Whole sectors are fine.
    file.as_file().set_len(8192).unwrap();
    assert_eq!(resolve(format!("file({path})")).unwrap().sector_count(), 16);
}
