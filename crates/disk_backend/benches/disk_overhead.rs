//! The cost of one request through `Disk` (validation + type-erased dispatch) on a backend
//! that does no work, next to calling the backend directly, and the heap allocations per
//! request (expected: zero).

#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use alloc_counter::{CountingAlloc, allocations};
use criterion::{Criterion, criterion_group, criterion_main};
use disk_backend::{Disk, DiskIo};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::hint::black_box;
use support::NullDisk;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn overhead(c: &mut Criterion) {
    let disk = Disk::new(NullDisk::new(1 << 20)).unwrap();
    let raw = NullDisk::new(1 << 20);
    let owned = OwnedRequestBuffers::new(4096);
    let buffers = owned.buffers(true);

    let mut group = c.benchmark_group("4k_read_null_backend");
    group.bench_function("direct", |b| {
        b.iter(|| block_on(raw.read_vectored(black_box(&buffers), black_box(8))))
    });
    group.bench_function("through_disk", |b| {
        b.iter(|| block_on(disk.read_vectored(black_box(&buffers), black_box(8))))
    });
    group.finish();

    let requests = 100_000u64;
    let before = allocations();
    for i in 0..requests {
        block_on(disk.read_vectored(&buffers, i % 1000)).unwrap();
    }
    let per_request = (allocations() - before) as f64 / requests as f64;
    println!("heap allocations per request through Disk: {per_request}");
}

criterion_group!(benches, overhead);
criterion_main!(benches);
