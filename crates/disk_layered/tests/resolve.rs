//! The `layered` kind: layers, flags and error paths.

use disk_backend::Disk;
use disk_backend::resolve::Resolver;
use disk_layered::LayeredResolver;
use disk_ram::RamResolver;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;

fn resolve(spec: &str) -> Result<Disk, String> {
    let mut resolver = Resolver::new();
    resolver
        .register(RamResolver)
        .register(LayeredResolver::new().with_layer(RamResolver));
    resolver.resolve(&spec.parse().unwrap()).map_err(|e| {
        // The whole chain, as diskctl prints it.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        message
    })
}

#[test]
fn layers_and_flags() {
    let disk = resolve("layered(layer(ram, read_cache, write_through), ram(size=1M), ro)").unwrap();
    assert!(disk.is_read_only());
    assert_eq!(disk.sector_count(), 2048);
    // A nested layered disk is a disk layer.
    let disk = resolve("layered(ram, layered(ram, ram(size=512k)))").unwrap();
    assert_eq!(disk.sector_count(), 1024);
    let data = OwnedRequestBuffers::from_slice(&[3; 512]);
    block_on(disk.write_vectored(&data.buffers(false), 7, false)).unwrap();
    let back = OwnedRequestBuffers::new(512);
    block_on(disk.read_vectored(&back.buffers(true), 7)).unwrap();
    assert_eq!(back.to_vec(), vec![3; 512]);
}

#[test]
fn errors_name_the_failing_node() {
    for (spec, error) in [
        (
            "layered(ram, layered(ram, nothing))",
            "layered/layered[2]/nothing[2]: unknown disk kind `nothing`",
        ),
        (
            "layered(layer(ram, ram), ram)",
            "layered/layer[1]: `layer` takes exactly one layer, not 2",
        ),
        (
            "layered(layer(ram, shiny), ram)",
            "layered/layer[1]: `layer` takes exactly one layer, not 2",
        ),
        (
            "layered(ram(size=1M), layer(ram(size=1M), write_through))",
            "nothing to write through to",
        ),
        (
            "layered(layer(ram(size=1M), read_cache))",
            "nothing for it to cache",
        ),
        ("layered(ram, key=x)", "layered: unknown argument `key`"),
    ] {
        let err = resolve(spec).unwrap_err();
        assert!(err.contains(error), "{spec}: {err}");
    }
}
