//! 64 KiB reads and writes through `Disk` on a RAM disk, on one core, against plain
//! `memcpy`s of the same bytes between two host buffers in the same run: prints GB/s and the
//! ratio (medians of alternating rounds).

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use disk_backend::Disk;
use disk_ram::RamDisk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::hint::black_box;
use std::time::Instant;

const DISK_BYTES: u64 = 256 << 20;
const BLOCK: usize = 64 << 10;

fn disk() -> Disk {
    let disk = Disk::new(RamDisk::new(DISK_BYTES / 512, 512).unwrap()).unwrap();
    let fill = OwnedRequestBuffers::from_slice(&vec![0x5a; 1 << 20]);
    for s in (0..DISK_BYTES / 512).step_by((1 << 20) / 512) {
        block_on(disk.write_vectored(&fill.buffers(false), s, false)).unwrap();
    }
    disk
}

/// Sectors of the 64 KiB blocks, in a fixed scattered order.
fn sectors() -> Vec<u64> {
    let blocks = DISK_BYTES / BLOCK as u64;
    (0..blocks)
        .map(|i| (i.wrapping_mul(2_654_435_761) % blocks) * (BLOCK as u64 / 512))
        .collect()
}

fn ram_throughput(c: &mut Criterion) {
    let disk = disk();
    let buf = OwnedRequestBuffers::new(BLOCK);
    let sectors = sectors();
    let mut group = c.benchmark_group("ram_64k");
    group.throughput(criterion::Throughput::Bytes((BLOCK * sectors.len()) as u64));
    group.bench_function("read", |b| {
        b.iter(|| {
            for &s in &sectors {
                block_on(disk.read_vectored(black_box(&buf.buffers(true)), s)).unwrap();
            }
        })
    });
    group.bench_function("write", |b| {
        b.iter(|| {
            for &s in &sectors {
                block_on(disk.write_vectored(black_box(&buf.buffers(false)), s, false)).unwrap();
            }
        })
    });
    group.finish();

    // The same bytes moved by memcpy between host buffers as large as the disk, scattered
    // the same way: what the hardware gives this access pattern.
    let source = vec![0x5au8; DISK_BYTES as usize];
    let mut target = vec![0u8; BLOCK];
    let copy = |target: &mut [u8]| {
        for &s in &sectors {
            let at = (s * 512) as usize;
            target.copy_from_slice(black_box(&source[at..at + BLOCK]));
            black_box(&mut *target);
        }
    };
    let gbps = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..5 {
            f();
        }
        (5 * BLOCK * sectors.len()) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let (mut reads, mut writes, mut copies) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        copies.push(gbps(&mut || copy(&mut target)));
        reads.push(gbps(&mut || {
            for &s in &sectors {
                block_on(disk.read_vectored(&buf.buffers(true), s)).unwrap();
            }
        }));
        writes.push(gbps(&mut || {
            for &s in &sectors {
                block_on(disk.write_vectored(&buf.buffers(false), s, false)).unwrap();
            }
        }));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r, w, m) = (median(&mut reads), median(&mut writes), median(&mut copies));
    println!(
        "RAM disk 64 KiB through Disk: read {r:.2} GB/s ({:.2}x memcpy), write {w:.2} GB/s ({:.2}x memcpy); memcpy {m:.2} GB/s (medians of 7 alternating rounds; goal >= 8 GB/s)",
        r / m,
        w / m
    );
}

criterion_group!(benches, ram_throughput);
criterion_main!(benches);
