//! `crypt(..., key=@PATH)` over key paths that are not regular files: a one-line error at
//! once. A FIFO used to block the read until a writer came, and `/dev/zero` was read without
//! bound (1 GB in 3 s) before the length check.

use disk_backend::resolve::{DiskSpec, Resolver};
use disk_conformance::host::{assert_one_line_error, error_chain, make_fifo, without_hanging};

fn resolve(spec: String) -> Result<disk_backend::Disk, String> {
    without_hanging(&spec.clone(), move || {
        let mut resolver = Resolver::new();
        resolver
            .register(disk_crypt::CryptResolver)
            .register(disk_ram::RamResolver);
        let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
        resolver.resolve(&spec).map_err(|e| error_chain(&e))
    })
}

#[test]
fn key_files_must_be_small_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(dir.path(), "fifo");
    for (path, kind) in [
        ("/dev/zero".to_owned(), "character device"),
        (fifo.display().to_string(), "fifo"),
        (dir.path().display().to_string(), "directory"),
    ] {
        let spec = format!("crypt(ram, key=@{path})");
        let error = resolve(spec.clone()).unwrap_err();
        assert_one_line_error(&spec, &error, &format!("{path} is a {kind}"));
    }
    // A regular file longer than a key is refused without reading it all.
    let long = dir.path().join("long");
    std::fs::File::create(&long)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let error = resolve(format!("crypt(ram, key=@{})", long.display())).unwrap_err();
    assert!(error.contains("more than 64 bytes"), "{error}");
}
