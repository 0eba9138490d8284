//! 4 KiB random reads through a four-layer stack whose data sits in the bottom layer,
//! against the same reads on a flat RAM disk; prints the ratio and allocations per request.

#![allow(missing_docs)]

use alloc_counter::{CountingAlloc, allocations};
use criterion::{Criterion, criterion_group, criterion_main};
use disk_backend::Disk;
use disk_layered::{DiskLayer, LayerConfiguration, LayerIo, LayeredDisk};
use disk_ram::{RamDisk, RamLayer};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const SECTORS: u64 = (256 << 20) / 512;
const BLOCK: usize = 4096;

fn stacks() -> (Disk, Disk) {
    let fill = OwnedRequestBuffers::from_slice(&vec![0x5a; 1 << 20]);
    let flat = RamDisk::new(SECTORS, 512).unwrap();
    let bottom = Arc::new(RamLayer::new(SECTORS, 512).unwrap());
    for s in (0..SECTORS).step_by((1 << 20) / 512) {
        block_on(disk_backend::DiskIo::write_vectored(
            &flat,
            &fill.buffers(false),
            s,
            false,
        ))
        .unwrap();
        block_on(bottom.write(&fill.buffers(false), s, false)).unwrap();
    }
    // The upper layers hold a little data elsewhere, as overlays in use do.
    let mut layers = Vec::new();
    for i in 0..3u64 {
        let layer = RamLayer::new(SECTORS, 512).unwrap();
        let one = OwnedRequestBuffers::from_slice(&[1; 512]);
        for s in (i..SECTORS).step_by(4099) {
            block_on(layer.write(&one.buffers(false), s, false)).unwrap();
        }
        layers.push(LayerConfiguration::new(DiskLayer::new(layer)));
    }
    layers.push(LayerConfiguration::new(DiskLayer::new(bottom)));
    let layered = Disk::new(LayeredDisk::new(false, layers).unwrap()).unwrap();
    (Disk::new(flat).unwrap(), layered)
}

/// Sector numbers of 4 KiB-aligned blocks in a fixed pseudo-random order.
fn offsets(n: usize) -> Vec<u64> {
    let blocks = SECTORS / 8;
    (0..n as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) % blocks) * 8)
        .collect()
}

fn run(disk: &Disk, buffers: &request_buffers::RequestBuffers<'_>, offsets: &[u64]) {
    for &sector in offsets {
        block_on(disk.read_vectored(buffers, sector)).unwrap();
    }
}

fn layered_read(c: &mut Criterion) {
    let (flat, layered) = stacks();
    let buf = OwnedRequestBuffers::new(BLOCK);
    let buffers = buf.buffers(true);
    let offsets = offsets(4096);

    let mut group = c.benchmark_group("4k_random_read");
    group.throughput(criterion::Throughput::Elements(offsets.len() as u64));
    group.bench_function("flat_ram", |b| {
        b.iter(|| run(&flat, black_box(&buffers), &offsets))
    });
    group.bench_function("four_layers", |b| {
        b.iter(|| run(&layered, black_box(&buffers), &offsets))
    });
    group.finish();

    // Alternate A and B in the same process and report the median ratio.
    let mut ratios = Vec::new();
    let time = |disk: &Disk| {
        let start = Instant::now();
        for _ in 0..20 {
            run(disk, &buffers, &offsets);
        }
        start.elapsed()
    };
    for _ in 0..9 {
        let a: Duration = time(&flat);
        let b: Duration = time(&layered);
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let before = allocations();
    run(&layered, &buffers, &offsets);
    let per_request = (allocations() - before) as f64 / offsets.len() as f64;
    println!(
        "four layers / flat RAM disk, 4 KiB random reads: {:.3}x (median of 9 alternating rounds; goal <= 1.15x); heap allocations per request: {per_request}",
        ratios[ratios.len() / 2]
    );
}

criterion_group!(benches, layered_read);
criterion_main!(benches);
