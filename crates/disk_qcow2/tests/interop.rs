//! Interoperability with QEMU's own tools, both ways: images made by `qemu-img` read through
//! us exactly as `qemu-img convert -O raw` reads them, and images we write pass
//! `qemu-img check` and compare equal to our model with `qemu-img compare` and `qemu-io`.
//! Each test says `skipping` and passes where qemu-img is missing, except under `CI=true`.

mod support;

use disk_backend::Disk;
use disk_backend::resolve::{DiskSpec, Resolver};
use disk_file::FileResolver;
use disk_layered::LayeredResolver;
use disk_qcow2::{CreateOptions, Qcow2Resolver};
use futures::executor::block_on;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use request_buffers::OwnedRequestBuffers;
use std::path::Path;
use support::{create, have_qemu, layer, open_path, pattern, qcow2_layer, qemu_check, run, stack};

const MIB: usize = 1 << 20;

fn resolver() -> Resolver {
    let mut resolver = Resolver::new();
    resolver
        .register(FileResolver)
        .register(Qcow2Resolver)
        .register(LayeredResolver::new().with_layer(Qcow2Resolver));
    resolver
}

fn resolve(spec: &str) -> Result<Disk, String> {
    let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
    resolver().resolve(&spec).map_err(|e| {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    })
}

fn read_disk(disk: &Disk) -> Vec<u8> {
    let len = (disk.sector_count() * disk.sector_size() as u64) as usize;
    let buf = OwnedRequestBuffers::new(len);
    block_on(disk.read_vectored(&buf.buffers(true), 0)).unwrap();
    buf.to_vec()
}

/// What QEMU reads from an image (following its backing file).
fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    let _ = std::fs::remove_file(&out);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// 8 MiB of data with zero stretches, compressible stretches and noise.
fn source(dir: &Path) -> std::path::PathBuf {
    let mut data = pattern(8 * MIB, 11);
    for (i, chunk) in data.chunks_mut(96 << 10).enumerate() {
        match i % 4 {
            0 => chunk.fill(0),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j / 512) as u8),
            _ => {}
        }
    }
    let path = dir.join("source.raw");
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn qemu_images_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let cases: &[(&str, &[&str])] = &[
        (
            "512 B clusters, 16-bit refcounts",
            &["-o", "cluster_size=512,refcount_bits=16"],
        ),
        (
            "64 KiB clusters, 1-bit refcounts",
            &["-o", "cluster_size=64k,refcount_bits=1"],
        ),
        (
            "2 MiB clusters, 64-bit refcounts",
            &["-o", "cluster_size=2M,refcount_bits=64"],
        ),
        ("version 2", &["-o", "compat=0.10"]),
        (
            "version 2, 4 KiB clusters, compressed",
            &["-c", "-o", "compat=0.10,cluster_size=4k"],
        ),
        ("deflate compressed", &["-c"]),
        ("zstd compressed", &["-c", "-o", "compression_type=zstd"]),
        (
            "extended L2 entries",
            &["-o", "extended_l2=on,cluster_size=128k"],
        ),
    ];
    for (name, options) in cases {
        let image = dir.path().join("image.qcow2");
        let _ = std::fs::remove_file(&image);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(options);
        args.extend([src.to_str().unwrap(), image.to_str().unwrap()]);
        run("qemu-img", &args);
        // Zero clusters, partial writes (subclusters with extended L2 entries, copy-on-write
        // of compressed clusters), a discard.
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -z 1M 256k",
                "-c",
                "write -P 0x5a 3146240 1024",
                "-c",
                "write -P 0x33 5M 4096",
                "-c",
                "discard 6M 128k",
                image.to_str().unwrap(),
            ],
        );
        let expected = qemu_raw(&image, dir.path());
        let disk = resolve(&format!("qcow2(\"{}\", ro)", image.display()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(disk.sector_count() * 512, expected.len() as u64, "{name}");
        assert!(
            read_disk(&disk) == expected,
            "{name}: contents differ from qemu's"
        );
        drop(disk);
        if name.contains("extended") {
            println!("{name}: identical (read-only)");
            continue;
        }
        // Our writes over QEMU's clusters (in place, into zero clusters, rewriting compressed
        // ones, allocating), then QEMU checks the image and reads what we read.
        let disk = resolve(&format!("qcow2(\"{}\")", image.display()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut rng = StdRng::seed_from_u64(name.len() as u64);
        for _ in 0..40 {
            let sectors = rng.random_range(1..200u64);
            let sector = rng.random_range(0..disk.sector_count() - sectors);
            let mut bytes = vec![0; sectors as usize * 512];
            rng.fill_bytes(&mut bytes);
            let buf = OwnedRequestBuffers::from_slice(&bytes);
            block_on(disk.write_vectored(&buf.buffers(false), sector, false)).unwrap();
            if rng.random_bool(0.2) {
                block_on(disk.unmap(sector, sectors, false)).unwrap();
            }
        }
        block_on(disk.sync_cache()).unwrap();
        let ours = read_disk(&disk);
        drop(disk);
        qemu_check(&image);
        assert!(
            ours == qemu_raw(&image, dir.path()),
            "{name}: qemu reads our writes differently"
        );
        println!("{name}: identical, and after our writes too");
    }
}

#[test]
fn backing_chain_comes_from_the_spec() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            b,
        ],
    );
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    );
    // QEMU's copy-on-write from the backing file around partial-cluster writes.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 100k 8k",
            "-c",
            "write -P 0x78 2M 512",
            t,
        ],
    );
    let stack = format!("layered(qcow2(\"{t}\", ro), qcow2(\"{b}\", ro), ro)");
    assert!(read_disk(&resolve(&stack).unwrap()) == qemu_raw(&top, dir.path()));

    // A top with extended L2 entries: subclusters QEMU did not write fall through to the
    // base, zeroed subclusters do not.
    let sub = dir.path().join("subclusters.qcow2");
    let s = sub.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "-b",
            b,
            "-F",
            "qcow2",
            s,
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 2k 2k",
            "-c",
            "write -P 0x62 70k 6k",
            "-c",
            "write -z 200k 4k",
            "-c",
            "write -P 0x63 1M 64k",
            s,
        ],
    );
    let stack = format!("layered(qcow2(\"{s}\", ro), qcow2(\"{b}\", ro), ro)");
    assert!(
        read_disk(&resolve(&stack).unwrap()) == qemu_raw(&sub, dir.path()),
        "subclusters read differently"
    );
    // Writable opens of extended L2 images are refused, naming the reason.
    let err = resolve(&format!("layered(qcow2(\"{s}\"), qcow2(\"{b}\", ro))")).unwrap_err();
    assert!(err.contains("extended l2"), "{err}");

    // Alone, the top names a backing file the spec does not give: refused, naming it.
    let err = resolve(&format!("qcow2(\"{t}\", ro)")).unwrap_err();
    assert!(err.contains("backing file") && err.contains(b), "{err}");

    // Our partial writes into the top copy the rest of the cluster from the base, exactly
    // as QEMU would: QEMU, following the header's backing file, reads what we read.
    let writable = resolve(&format!("layered(qcow2(\"{t}\"), qcow2(\"{b}\", ro))")).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..50 {
        let sectors = rng.random_range(1..64u64);
        let sector = rng.random_range(0..writable.sector_count() - sectors);
        let mut bytes = vec![0; sectors as usize * 512];
        rng.fill_bytes(&mut bytes);
        let buf = OwnedRequestBuffers::from_slice(&bytes);
        block_on(writable.write_vectored(&buf.buffers(false), sector, false)).unwrap();
    }
    block_on(writable.sync_cache()).unwrap();
    let ours = read_disk(&writable);
    drop(writable);
    qemu_check(&top);
    assert!(
        ours == qemu_raw(&top, dir.path()),
        "qemu reads our overlay differently"
    );
}

/// A random workload on an image of ours alone; then qemu-img check, compare and qemu-io.
fn our_image(options: CreateOptions, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.qcow2");
    create(&std::fs::File::create_new(&path).unwrap(), &options);
    let size = options.size as usize;
    let mut model = vec![0u8; size];
    let disk = stack(
        false,
        vec![qcow2_layer(layer(&open_path(&path, false), false))],
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let sectors = (size / 512) as u64;
    for _ in 0..300 {
        let count = rng.random_range(1..=256u64).min(sectors);
        let sector = rng.random_range(0..=sectors - count);
        let at = sector as usize * 512;
        let len = count as usize * 512;
        match rng.random_range(0..10) {
            0..6 => {
                let mut bytes = vec![0; len];
                rng.fill_bytes(&mut bytes);
                let buf = OwnedRequestBuffers::from_slice(&bytes);
                block_on(disk.write_vectored(&buf.buffers(false), sector, rng.random_bool(0.1)))
                    .unwrap();
                model[at..at + len].copy_from_slice(&bytes);
            }
            6..8 => {
                // Alone, unmapped sectors read as zeros.
                block_on(disk.unmap(sector, count, false)).unwrap();
                model[at..at + len].fill(0);
            }
            _ => block_on(disk.sync_cache()).unwrap(),
        }
    }
    // A recognisable pattern for qemu-io.
    let buf = OwnedRequestBuffers::from_slice(&vec![0xc3; 12288]);
    block_on(disk.write_vectored(&buf.buffers(false), 3, false)).unwrap();
    model[1536..1536 + 12288].fill(0xc3);
    block_on(disk.sync_cache()).unwrap();
    assert!(read_disk(&disk) == model);
    drop(disk);

    qemu_check(&path);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xc3 1536 12288",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("read 12288/12288") && !out.contains("verification failed"),
        "{out}"
    );
}

#[test]
fn our_images_pass_qemu_check_512_byte_clusters() {
    if have_qemu() {
        our_image(
            CreateOptions {
                cluster_bits: 9,
                refcount_order: 0,
                ..CreateOptions::new(2 << 20)
            },
            1,
        );
    }
}

#[test]
fn our_images_pass_qemu_check_64k_clusters() {
    if have_qemu() {
        our_image(CreateOptions::new(32 << 20), 2);
    }
}

#[test]
fn our_images_pass_qemu_check_2m_clusters_64_bit_refcounts() {
    if have_qemu() {
        our_image(
            CreateOptions {
                cluster_bits: 21,
                refcount_order: 6,
                ..CreateOptions::new(32 << 20)
            },
            3,
        );
    }
}

#[test]
fn our_images_pass_qemu_check_version_2() {
    if have_qemu() {
        our_image(
            CreateOptions {
                version: 2,
                cluster_bits: 12,
                ..CreateOptions::new(8 << 20)
            },
            4,
        );
    }
}

#[test]
fn resized_images_pass_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resized.qcow2");
    create(
        &std::fs::File::create_new(&path).unwrap(),
        &CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(64 << 10)
        },
    );
    let qcow = layer(&open_path(&path, false), false);
    let disk = stack(false, vec![qcow2_layer(qcow.clone())]);
    let buf = OwnedRequestBuffers::from_slice(&[0x42; 4096]);
    block_on(disk.write_vectored(&buf.buffers(false), 10, false)).unwrap();
    block_on(qcow.resize(8 << 20)).unwrap();
    block_on(disk.write_vectored(&buf.buffers(false), (8 << 11) - 8, false)).unwrap();
    block_on(disk.sync_cache()).unwrap();
    let ours = read_disk(&disk);
    drop(disk);
    drop(qcow);
    qemu_check(&path);
    assert!(ours == qemu_raw(&path, dir.path()));
    let info = run("qemu-img", &["info", path.to_str().unwrap()]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
}

#[test]
fn refcount_table_growth_passes_qemu_check() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the
    // first refcount table 4096 clusters (2 MiB), so filling 8 MiB moves the table twice.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    create(
        &std::fs::File::create_new(&path).unwrap(),
        &CreateOptions {
            cluster_bits: 9,
            refcount_order: 6,
            ..CreateOptions::new(8 << 20)
        },
    );
    let disk = stack(
        false,
        vec![qcow2_layer(layer(&open_path(&path, false), false))],
    );
    let data = pattern(8 << 20, 5);
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        let buf = OwnedRequestBuffers::from_slice(chunk);
        block_on(disk.write_vectored(&buf.buffers(false), i as u64 * 128, false)).unwrap();
    }
    block_on(disk.sync_cache()).unwrap();
    assert!(read_disk(&disk) == data);
    drop(disk);
    qemu_check(&path);
    assert!(qemu_raw(&path, dir.path()) == data);
}

#[test]
fn dirty_images_get_their_refcounts_rebuilt() {
    if !have_qemu() {
        return;
    }
    // QEMU with lazy refcounts, killed (`abort`) before it wrote its refcounts back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "16M"],
    );
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 128k",
            "-c",
            "write -P 0x22 1M 64k",
            "-c",
            "abort",
            p,
        ])
        .output()
        .unwrap();
    let disk = resolve(&format!("qcow2(\"{p}\")")).unwrap();
    let buf = OwnedRequestBuffers::from_slice(&[0x33; 4096]);
    block_on(disk.write_vectored(&buf.buffers(false), 4096, false)).unwrap();
    block_on(disk.sync_cache()).unwrap();
    let ours = read_disk(&disk);
    drop(disk);
    qemu_check(&path);
    assert!(ours == qemu_raw(&path, dir.path()));
    assert!(ours[..128 << 10].iter().all(|&b| b == 0x11));
    assert!(
        ours[1 << 20..(1 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0x22)
    );
}

#[test]
fn a_writer_locks_the_image_against_other_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.qcow2");
    create(
        &std::fs::File::create_new(&path).unwrap(),
        &CreateOptions::new(1 << 20),
    );
    let p = path.to_str().unwrap();
    let writer = resolve(&format!("qcow2(\"{p}\")")).unwrap();
    for spec in [format!("qcow2(\"{p}\")"), format!("qcow2(\"{p}\", ro)")] {
        let err = resolve(&spec).unwrap_err();
        assert!(err.contains("in use by another process"), "{err}");
    }
    drop(writer);
    // Readers share.
    let a = resolve(&format!("qcow2(\"{p}\", ro)")).unwrap();
    let b = resolve(&format!("qcow2(\"{p}\", ro)")).unwrap();
    assert!(resolve(&format!("qcow2(\"{p}\")")).is_err());
    drop((a, b));
    resolve(&format!("qcow2(\"{p}\")")).unwrap();
}
