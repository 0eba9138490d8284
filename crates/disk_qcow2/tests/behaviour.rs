//! Behaviour beyond the conformance suite: concurrent allocation of one cluster, resize,
//! `may_hold`, metadata kept without a final flush, images refused or opened read-only, and
//! corrupted images (an error, never a panic).

mod support;

use disk_backend::{Disk, DiskError, DiskIo};
use disk_layered::{LayerIo, LowerLayerMetadata};
use disk_qcow2::{CreateOptions, ImageFile, OpenError, Qcow2Layer, Qcow2Options};
use disk_ram::RamDisk;
use futures::FutureExt;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;
use support::{create, layer, qcow2_layer, stack};

fn read(disk: &Disk, sector: u64, len: usize) -> Vec<u8> {
    let buf = OwnedRequestBuffers::new(len);
    block_on(disk.read_vectored(&buf.buffers(true), sector)).unwrap();
    buf.to_vec()
}

fn write(disk: &Disk, sector: u64, data: &[u8]) {
    let buf = OwnedRequestBuffers::from_slice(data);
    block_on(disk.write_vectored(&buf.buffers(false), sector, false)).unwrap();
}

#[test]
fn concurrent_writes_into_one_unallocated_cluster() {
    let file = tempfile::tempfile().unwrap();
    create(&file, &CreateOptions::new(4 << 20));
    let disk = stack(false, vec![qcow2_layer(layer(&file, false))]);
    // Every sector of the first 4 clusters written by its own request, all at once: each
    // cluster is allocated once, and no request's data is lost to another's copy-on-write.
    let bufs: Vec<_> = (0..512u64)
        .map(|s| OwnedRequestBuffers::from_slice(&[(s % 251) as u8 + 1; 512]))
        .collect();
    let disk_ref = &disk;
    block_on(futures::future::join_all(bufs.iter().enumerate().map(
        |(s, buf)| async move {
            disk_ref
                .write_vectored(&buf.buffers(false), s as u64, false)
                .await
        },
    )))
    .into_iter()
    .collect::<Result<Vec<()>, _>>()
    .unwrap();
    let back = read(&disk, 0, 512 * 512);
    for s in 0..512usize {
        assert!(
            back[s * 512..(s + 1) * 512]
                .iter()
                .all(|&b| b == (s % 251) as u8 + 1),
            "sector {s}"
        );
    }
    block_on(disk.sync_cache()).unwrap();
}

#[test]
fn resize_grows_the_l1_table_and_wakes_waiters() {
    let file = tempfile::tempfile().unwrap();
    // 512-byte clusters: one L2 table maps 32 KiB, so growing needs a larger L1 table.
    create(
        &file,
        &CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(64 << 10)
        },
    );
    let qcow = layer(&file, false);
    let disk = stack(false, vec![qcow2_layer(qcow.clone())]);
    write(&disk, 100, &[9; 1024]);
    assert!(disk.wait_resize(128).now_or_never().is_none());
    block_on(qcow.resize(64 << 20)).unwrap();
    assert_eq!(block_on(disk.wait_resize(128)), 128 << 10);
    assert_eq!(disk.sector_count(), 128 << 10);
    write(&disk, (128 << 10) - 2, &[5; 1024]);
    assert!(matches!(
        block_on(qcow.resize(1 << 20)),
        Err(DiskError::InvalidInput)
    ));
    block_on(disk.sync_cache()).unwrap();
    drop(disk);
    drop(qcow);
    let disk = stack(true, vec![qcow2_layer(layer(&file, true))]);
    assert_eq!(disk.sector_count(), 128 << 10);
    assert_eq!(read(&disk, 100, 1024), vec![9; 1024]);
    assert_eq!(read(&disk, (128 << 10) - 2, 1024), vec![5; 1024]);
    assert_eq!(read(&disk, 0, 512), vec![0; 512]);
}

#[test]
fn may_hold_answers_from_the_tables() {
    let file = tempfile::tempfile().unwrap();
    create(&file, &CreateOptions::new(16 << 20));
    let qcow = layer(&file, false);
    let disk = stack(false, vec![qcow2_layer(qcow.clone())]);
    // Nothing allocated: no L2 table at all.
    assert!(!qcow.may_hold(0, 1000));
    write(&disk, 256, &[1; 512]);
    assert!(qcow.may_hold(256, 1));
    assert!(qcow.may_hold(200, 100));
    // The same L2 table, another cluster.
    assert!(!qcow.may_hold(1024, 128));
}

#[test]
fn dropping_without_a_flush_keeps_completed_writes() {
    let file = tempfile::tempfile().unwrap();
    create(&file, &CreateOptions::new(4 << 20));
    let disk = stack(false, vec![qcow2_layer(layer(&file, false))]);
    write(&disk, 77, &[3; 4096]);
    drop(disk);
    let disk = stack(true, vec![qcow2_layer(layer(&file, true))]);
    assert_eq!(read(&disk, 77, 4096), vec![3; 4096]);
}

/// An image on a RAM host, with its bytes patched by `patch` after creation.
fn ram_image(patch: impl FnOnce(&mut Vec<u8>)) -> Disk {
    let host = Disk::new(RamDisk::new(2048, 512).unwrap()).unwrap();
    let file = ImageFile::new(host.clone(), None);
    block_on(Qcow2Layer::create(&file, &CreateOptions::new(1 << 20))).unwrap();
    let mut bytes = read(&host, 0, 1 << 20);
    patch(&mut bytes);
    write(&host, 0, &bytes);
    host
}

fn open(host: &Disk, read_only: bool) -> Result<Qcow2Layer, OpenError> {
    block_on(Qcow2Layer::open(
        ImageFile::new(host.clone(), None),
        &Qcow2Options {
            read_only,
            ..Default::default()
        },
    ))
}

#[test]
fn images_refused_or_read_only() {
    let set = |at: usize, value: &[u8]| {
        let value = value.to_vec();
        move |b: &mut Vec<u8>| b[at..at + value.len()].copy_from_slice(&value)
    };
    // Dirty: refcounts rebuilt by a writable open, which clears the bit.
    let host = ram_image(set(79, &[1]));
    drop(open(&host, true).unwrap());
    assert_eq!(read(&host, 0, 512)[79], 1);
    drop(open(&host, false).unwrap());
    assert_eq!(read(&host, 0, 512)[79], 0);
    // Corrupt, snapshots: readable, not writable.
    for (what, host) in [
        ("corrupt", ram_image(set(79, &[2]))),
        ("snapshots", ram_image(set(60, &[0, 0, 0, 1]))),
    ] {
        assert!(
            matches!(open(&host, false), Err(OpenError::NotWritable(_))),
            "{what}"
        );
        open(&host, true).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // Encrypted, unknown incompatible feature: refused outright.
    for host in [
        ram_image(set(32, &[0, 0, 0, 1])),
        ram_image(set(72, &[0x80])),
    ] {
        assert!(matches!(open(&host, true), Err(OpenError::Invalid(_))));
    }
    // Autoclear bits are cleared by a writable open, kept by a read-only one.
    let host = ram_image(set(95, &[3]));
    drop(open(&host, true).unwrap());
    assert_eq!(read(&host, 0, 512)[95], 3);
    drop(open(&host, false).unwrap());
    assert_eq!(read(&host, 0, 512)[95], 0);
}

#[test]
fn a_backing_file_needs_layers_below() {
    let host = ram_image(|b| {
        b[8..16].copy_from_slice(&512u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[512..520].copy_from_slice(b"base.img");
    });
    let qcow = Arc::new(open(&host, true).unwrap());
    assert_eq!(qcow.backing_file(), Some("base.img"));
    let lower = LowerLayerMetadata {
        sector_count: 2048,
        sector_size: 512,
        physical_sector_size: 512,
        disk_id: None,
    };
    use disk_layered::LayerAttach;
    let err = disk_qcow2::Qcow2Attach(qcow.clone())
        .attach(None)
        .unwrap_err();
    assert!(err.to_string().contains("base.img"), "{err}");
    disk_qcow2::Qcow2Attach(qcow).attach(Some(&lower)).unwrap();
}

/// Deterministic corruption of a used image's metadata: every open, read, write, unmap and
/// flush returns, with an error or not, and nothing panics.
#[test]
fn corrupted_images_fail_cleanly() {
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let host = ram_image(|_| {});
        {
            let disk = stack(
                false,
                vec![disk_layered::DiskLayer::new(disk_qcow2::Qcow2Attach(
                    Arc::new(open(&host, false).unwrap()),
                ))],
            );
            write(&disk, 0, &[1; 4096]);
            write(&disk, 1000, &[2; 512]);
            block_on(disk.sync_cache()).unwrap();
        }
        let mut bytes = read(&host, 0, 1 << 20);
        // Flip bytes in the metadata clusters (header, refcount table and block, L1, L2).
        for _ in 0..1 + next() % 8 {
            let cluster = next() % 6;
            let at = (cluster << 16) as usize + (next() % 512) as usize;
            bytes[at] ^= 1 << (next() % 8);
        }
        write(&host, 0, &bytes);
        for read_only in [true, false] {
            let Ok(qcow) = open(&host, read_only) else {
                continue;
            };
            let Ok(disk) = disk_layered::LayeredDisk::new(
                read_only,
                vec![disk_layered::LayerConfiguration::new(
                    disk_layered::DiskLayer::new(disk_qcow2::Qcow2Attach(Arc::new(qcow))),
                )],
            ) else {
                continue;
            };
            let buf = OwnedRequestBuffers::new(8192);
            let count = disk.sector_count();
            block_on(async {
                for sector in [0, 8, 1000, count.saturating_sub(16)] {
                    let _ = disk.read_vectored(&buf.buffers(true), sector).await;
                    if !read_only {
                        let _ = disk
                            .write_vectored(&buf.buffers(false), sector, round % 2 == 0)
                            .await;
                        let _ = disk.unmap(sector, 3, false).await;
                    }
                }
                let _ = disk.sync_cache().await;
            });
        }
    }
}

/// A sector that says which sector it is and which write put it there.
fn stamp(sector: u64, version: u8) -> Vec<u8> {
    let mut data = vec![version; 512];
    data[..8].copy_from_slice(&sector.to_le_bytes());
    data
}

/// Threads writing, reading and flushing the same few clusters of an overlay over a base
/// that holds data, all at once. Each thread owns every fourth sector (so clusters are
/// shared: allocations and copy-on-write of one thread race with the others' writes and
/// reads), and each read of its own sectors must return exactly what it last wrote there, or
/// the base's data: a lost update, garbage or a read of an unfilled cluster fails.
#[test]
fn concurrent_allocation_loses_nothing_and_reads_old_or_new() {
    let sectors = 64u64; // 8 clusters of 4 KiB
    let base = RamDisk::new(sectors, 512).unwrap();
    let all: Vec<u8> = (0..sectors).flat_map(|s| stamp(s, 0)).collect();
    let buf = OwnedRequestBuffers::from_slice(&all);
    block_on(base.write_vectored(&buf.buffers(false), 0, false)).unwrap();
    let base = Disk::new(base.with_read_only(true)).unwrap();
    let file = tempfile::tempfile().unwrap();
    create(
        &file,
        &CreateOptions {
            cluster_bits: 12,
            ..CreateOptions::new(sectors * 512)
        },
    );
    let disk = stack(
        false,
        vec![
            qcow2_layer(support::slow_layer(
                &file,
                std::time::Duration::from_micros(200),
            )),
            disk_layered::DiskLayer::new(disk_layered::DiskAsLayer::new(base)),
        ],
    );
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let disk = disk.clone();
            scope.spawn(move || {
                let mut x = t * 7919 + 1;
                let mut next = move |n: u64| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % n
                };
                let mine: Vec<u64> = (t..sectors).step_by(4).collect();
                let mut expected: Vec<u8> = vec![0; sectors as usize];
                for i in 0..600u64 {
                    let s = mine[next(mine.len() as u64) as usize];
                    match next(10) {
                        0..4 => {
                            let version = (i % 255) as u8 + 1;
                            write(&disk, s, &stamp(s, version));
                            expected[s as usize] = version;
                        }
                        4 => block_on(disk.sync_cache()).unwrap(),
                        _ => {
                            let back = read(&disk, s, 512);
                            assert!(
                                back == stamp(s, expected[s as usize]),
                                "thread {t}: sector {s} lost its data"
                            );
                        }
                    }
                }
            });
        }
    });
    block_on(disk.sync_cache()).unwrap();
}

#[test]
fn discarding_a_whole_large_disk_skips_empty_tables() {
    // 1 TiB: 2048 L1 entries, 16 M clusters. A discard of everything steps over the L1
    // entries without tables and drops the clusters of the one that has one.
    let file = tempfile::tempfile().unwrap();
    create(&file, &CreateOptions::new(1 << 40));
    let disk = stack(false, vec![qcow2_layer(layer(&file, false))]);
    write(&disk, (1 << 31) - 16, &[4; 8192]);
    block_on(disk.unmap(0, disk.sector_count(), false)).unwrap();
    assert_eq!(read(&disk, (1 << 31) - 16, 8192), vec![0; 8192]);
    block_on(disk.sync_cache()).unwrap();
}
