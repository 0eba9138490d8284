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
