//! The `file` kind.

use disk_backend::resolve::Resolver;
use disk_file::FileResolver;

fn resolve(spec: &str) -> Result<disk_backend::Disk, String> {
    let mut resolver = Resolver::new();
    resolver.register(FileResolver);
    resolver
        .resolve(
            &spec
                .parse()
                .map_err(|e: disk_backend::resolve::ParseError| e.to_string())?,
        )
        .map_err(|e| e.to_string())
}

#[test]
fn file_specs() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let path = file.path().display();
    let disk = resolve(&format!("file:{path}")).unwrap();
    assert_eq!(
        (disk.sector_count(), disk.sector_size(), disk.is_read_only()),
        (2048, 512, false)
    );
    let disk = resolve(&format!(
        "file({path}, ro, sector_size=4k, physical_sector_size=8k)"
    ))
    .unwrap();
    assert_eq!(
        (
            disk.sector_count(),
            disk.sector_size(),
            disk.physical_sector_size()
        ),
        (256, 4096, 8192)
    );
    assert!(disk.is_read_only());
    assert!(resolve(&format!("file:{path}:ro")).unwrap().is_read_only());

    for (spec, error) in [
        ("file".to_string(), "file: missing a file path"),
        (
            format!("file({path}, rw)"),
            "file: unexpected argument `rw`",
        ),
        (
            format!("file({path}, sector_size=5G)"),
            "file: `sector_size` 5368709120 is too large",
        ),
        (
            format!("file({path}, sector_size=1000)"),
            "file: cannot open the file",
        ),
        (
            "file(/nonexistent/x)".to_string(),
            "file: cannot open the file",
        ),
        (format!("file({path}, {path})"), "unexpected argument"),
    ] {
        let err = resolve(&spec).unwrap_err();
        assert!(err.contains(error), "{spec}: {err}");
    }
}

/// An argument given twice is a duplicate, not an unknown argument.
#[test]
fn duplicate_arguments_are_named_as_such() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let path = file.path().display();
    for spec in [
        format!("file({path}, sector_size=4k, sector_size=8k)"),
        format!("file({path}, sector_size=4k, sector_size=4k)"),
    ] {
        let error = resolve(&spec).unwrap_err();
        assert!(
            error.contains("duplicate argument `sector_size`"),
            "{spec}: {error}"
        );
    }
}

/// Whatever the user typed is echoed at most 64 characters long (then `…`): a 100,000
/// character kind or argument name makes a short error, not a 200 KB one.
#[test]
fn long_user_text_is_cut_in_errors() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let path = file.path().display();
    let long = "x".repeat(100_000);
    for spec in [
        long.clone(),
        format!("file({path}, {long}=1)"),
        format!("file({path}, {long})"),
        format!("file({path}, sector_size={long})"),
    ] {
        let error = resolve(&spec).unwrap_err();
        assert!(
            error.len() < 400,
            "{} bytes: {}",
            error.len(),
            error.chars().take(400).collect::<String>()
        );
        assert!(error.contains(&format!("{}…", "x".repeat(64))), "{error}");
    }
}
