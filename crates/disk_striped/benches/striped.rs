//! 4 KiB and 1 MiB reads and writes over four RAM members striped in 128 KiB chunks, next
//! to the same requests on one RAM disk. Requests are polled to completion one at a time
//! with `futures::executor::block_on`, so the figures show the cost of splitting and
//! joining, not parallelism across members (RAM members complete synchronously).

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use disk_backend::Disk;
use disk_ram::RamDisk;
use disk_striped::StripedDisk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::hint::black_box;
use std::time::Duration;

const DISK_BYTES: u64 = 256 << 20;

fn ram(bytes: u64) -> Disk {
    Disk::new(RamDisk::new(bytes / 512, 512).unwrap()).unwrap()
}

fn striped(c: &mut Criterion) {
    let single = ram(DISK_BYTES);
    let members = (0..4).map(|_| ram(DISK_BYTES / 4)).collect();
    let four = Disk::new(StripedDisk::new(members, None, None).unwrap()).unwrap();

    for (name, len) in [("4k", 4096usize), ("1m", 1 << 20)] {
        // 64 request slots spread over the first 64 MiB; every sector written first so that
        // reads copy data rather than zero-fill.
        let slots = 64u64;
        let stride = (64 << 20) / 512 / slots;
        let data = OwnedRequestBuffers::from_slice(&vec![0x5a; len]);
        let sink = OwnedRequestBuffers::new(len);
        for disk in [&single, &four] {
            for slot in 0..slots {
                block_on(disk.write_vectored(&data.buffers(false), slot * stride, false)).unwrap();
            }
        }
        let mut group = c.benchmark_group(format!("{name}_io"));
        group.throughput(Throughput::Bytes(len as u64));
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));
        for (label, disk) in [("one_ram_disk", &single), ("striped_4_ram", &four)] {
            let mut slot = 0u64;
            group.bench_function(BenchmarkId::new("read", label), |b| {
                b.iter(|| {
                    slot = (slot + 1) % slots;
                    block_on(disk.read_vectored(black_box(&sink.buffers(true)), slot * stride))
                })
            });
            group.bench_function(BenchmarkId::new("write", label), |b| {
                b.iter(|| {
                    slot = (slot + 1) % slots;
                    block_on(disk.write_vectored(
                        black_box(&data.buffers(false)),
                        slot * stride,
                        false,
                    ))
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, striped);
criterion_main!(benches);
