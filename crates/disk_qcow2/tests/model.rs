//! A model-based random test: a qcow2 overlay over a base that holds data, against a plain
//! byte vector. Writes (many of them partial clusters, so copy-on-write from the base),
//! reads, unmaps, flushes, concurrent batches, and closing and reopening the image; on
//! several cluster sizes and refcount widths. Where qemu-img exists, the image must then
//! pass `qemu-img check` with no errors and no leaks.

mod support;

use disk_backend::{Disk, DiskIo};
use disk_layered::{DiskAsLayer, DiskLayer};
use disk_qcow2::CreateOptions;
use futures::executor::block_on;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use request_buffers::OwnedRequestBuffers;
use std::path::Path;
use support::{create, have_qemu, layer, open_path, qcow2_layer, qemu_check, stack};

const SECTOR: u64 = 512;

fn overlay(path: &Path, base: &Disk) -> Disk {
    let file = open_path(path, false);
    stack(
        false,
        vec![
            qcow2_layer(layer(&file, false)),
            DiskLayer::new(DiskAsLayer::new(base.clone())),
        ],
    )
}

fn read_all(disk: &Disk, sector: u64, len: usize) -> Vec<u8> {
    let buf = OwnedRequestBuffers::scattered(len, 512);
    block_on(disk.read_vectored(&buf.buffers(true), sector)).unwrap();
    buf.to_vec()
}

fn run(options: CreateOptions, seed: u64, ops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlay.qcow2");
    let file = std::fs::File::create_new(&path).unwrap();
    create(&file, &options);
    drop(file);

    let size = options.size as usize;
    let sectors = options.size / SECTOR;
    let cluster = 1u64 << options.cluster_bits;
    let mut model = support::pattern(size, seed ^ 0xba5e);
    let base = disk_ram::RamDisk::new(sectors, 512).unwrap();
    let data = OwnedRequestBuffers::from_slice(&model);
    block_on(base.write_vectored(&data.buffers(false), 0, false)).unwrap();
    let base = Disk::new(base.with_read_only(true)).unwrap();

    let mut disk = overlay(&path, &base);
    let mut rng = StdRng::seed_from_u64(seed);
    // Requests of up to two clusters (at least 16 sectors), often partial clusters.
    let max_sectors = (2 * cluster / SECTOR).clamp(16, 512);
    let pick = |rng: &mut StdRng| {
        let count = rng.random_range(1..=max_sectors);
        let sector = rng.random_range(0..=sectors - count);
        (sector, count)
    };
    for op in 0..ops {
        match rng.random_range(0..100) {
            0..45 => {
                let (sector, count) = pick(&mut rng);
                let mut bytes = vec![0u8; (count * SECTOR) as usize];
                rng.fill_bytes(&mut bytes);
                let buf = OwnedRequestBuffers::from_slice(&bytes);
                let fua = rng.random_bool(0.1);
                block_on(disk.write_vectored(&buf.buffers(false), sector, fua)).unwrap();
                let at = (sector * SECTOR) as usize;
                model[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            45..65 => {
                let (sector, count) = pick(&mut rng);
                let at = (sector * SECTOR) as usize;
                let len = (count * SECTOR) as usize;
                assert!(
                    read_all(&disk, sector, len) == model[at..at + len],
                    "op {op}: read of {count} sectors at {sector} differs from the model"
                );
            }
            65..75 => {
                let (sector, count) = pick(&mut rng);
                block_on(disk.unmap(sector, count, false)).unwrap();
                // Unmapped sectors over a lower layer read as zeros or as before, never
                // anything else.
                let at = (sector * SECTOR) as usize;
                let len = (count * SECTOR) as usize;
                let back = read_all(&disk, sector, len);
                for (i, chunk) in back.chunks(SECTOR as usize).enumerate() {
                    let old = &model[at + i * 512..at + (i + 1) * 512];
                    assert!(
                        chunk.iter().all(|&b| b == 0) || chunk == old,
                        "op {op}: unmapped sector {} reads garbage",
                        sector + i as u64
                    );
                }
                model[at..at + len].copy_from_slice(&back);
            }
            75..83 => block_on(disk.sync_cache()).unwrap(),
            83..88 => {
                block_on(disk.sync_cache()).unwrap();
                drop(disk);
                disk = overlay(&path, &base);
            }
            _ => {
                // Concurrent writes to disjoint ranges, and reads of other ranges.
                let stripe = sectors / 8;
                let mut writes = Vec::new();
                for s in 0..8u64 {
                    let count = rng.random_range(1..=max_sectors.min(stripe));
                    let sector = s * stripe + rng.random_range(0..=stripe - count);
                    let mut bytes = vec![0u8; (count * SECTOR) as usize];
                    rng.fill_bytes(&mut bytes);
                    writes.push((sector, bytes));
                }
                let bufs: Vec<_> = writes
                    .iter()
                    .map(|(_, b)| OwnedRequestBuffers::from_slice(b))
                    .collect();
                let disk_ref = &disk;
                block_on(futures::future::join_all(writes.iter().zip(&bufs).map(
                    |((sector, _), buf)| async move {
                        disk_ref
                            .write_vectored(&buf.buffers(false), *sector, false)
                            .await
                    },
                )))
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .unwrap();
                for (sector, bytes) in &writes {
                    let at = (*sector * SECTOR) as usize;
                    model[at..at + bytes.len()].copy_from_slice(bytes);
                }
            }
        }
    }
    block_on(disk.sync_cache()).unwrap();
    drop(disk);
    let disk = overlay(&path, &base);
    assert!(
        read_all(&disk, 0, size) == model,
        "the reopened image differs from the model"
    );
    drop(disk);
    if have_qemu() {
        qemu_check(&path);
    }
}

#[test]
fn clusters_512_refcount_1() {
    run(
        CreateOptions {
            cluster_bits: 9,
            refcount_order: 0,
            ..CreateOptions::new(1 << 20)
        },
        1,
        600,
    );
}

#[test]
fn clusters_4k_version_2() {
    run(
        CreateOptions {
            cluster_bits: 12,
            version: 2,
            ..CreateOptions::new(4 << 20)
        },
        2,
        600,
    );
}

#[test]
fn clusters_64k() {
    run(CreateOptions::new(16 << 20), 3, 600);
}

#[test]
fn clusters_64k_refcount_64() {
    run(
        CreateOptions {
            refcount_order: 6,
            ..CreateOptions::new(16 << 20)
        },
        4,
        400,
    );
}

#[test]
fn clusters_2m() {
    run(
        CreateOptions {
            cluster_bits: 21,
            ..CreateOptions::new(16 << 20)
        },
        5,
        200,
    );
}
