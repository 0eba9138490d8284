//! The cost of a block request through the whole virtio path (harness driver → MMIO
//! transport → device → asynchronous engine → RAM disk) next to the same request straight
//! on the `Disk`, for 4 KiB and 64 KiB reads and writes. Prints the overhead ratio.

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use disk_backend::Disk;
use disk_ram::RamDisk;
use futures::executor::block_on;
use guestmem::{GuestMemory, PAGE_SIZE64};
use request_buffers::OwnedRequestBuffers;
use std::hint::black_box;
use std::time::{Duration, Instant};
use virtio_block::config::RequestHeader;
use virtio_block::harness::{Buffer, Driver, DriverOptions};
use virtio_block::spec::blk;
use virtio_block::{BlockConfig, BlockDevice};

const SECTORS: u64 = 128 << 10; // 64 MiB of 512-byte sectors

struct Rig {
    driver: Driver<BlockDevice>,
    disk: Disk,
    header: u64,
    data: u64,
    status: u64,
    direct: OwnedRequestBuffers,
}

impl Rig {
    fn new() -> Self {
        let disk = Disk::new(RamDisk::new(SECTORS, 512).unwrap()).unwrap();
        let device = BlockDevice::new(BlockConfig::default(), disk.clone()).unwrap();
        let mut driver = Driver::new(
            device,
            GuestMemory::allocate(4 << 20),
            DriverOptions::default(),
        )
        .unwrap();
        let header = driver.alloc(16, 16).unwrap();
        let data = driver.alloc(64 << 10, PAGE_SIZE64).unwrap();
        let status = driver.alloc(1, 1).unwrap();
        driver.mem().fill_at(data, 0x5a, 64 << 10).unwrap();
        let direct = OwnedRequestBuffers::from_slice(&[0x5a; 64 << 10]);
        // Fill the whole disk, so that every read copies data (a RAM disk reads unwritten
        // sectors as a cheap zero fill) and both sides see the same disk in every case.
        for sector in (0..SECTORS).step_by(128) {
            block_on(disk.write_vectored(&direct.buffers(false), sector, false)).unwrap();
        }
        Self {
            driver,
            disk,
            header,
            data,
            status,
            direct,
        }
    }

    /// One request through the device: post, notify, wait for the used element.
    fn through_device(&mut self, write: bool, len: u32, sector: u64) {
        let request_type = if write { blk::T_OUT } else { blk::T_IN };
        let header = RequestHeader {
            request_type: request_type.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        self.driver.mem().write_plain(self.header, &header).unwrap();
        let data = Buffer {
            addr: self.data,
            len,
            writable: !write,
        };
        self.driver
            .post(
                0,
                &[
                    Buffer::readable(self.header, 16),
                    data,
                    Buffer::writable(self.status, 1),
                ],
            )
            .unwrap();
        self.driver.kick(0).unwrap();
        self.driver.wait_used(0).unwrap();
        assert_eq!(
            self.driver.mem().read_plain::<u8>(self.status).unwrap(),
            blk::S_OK
        );
    }

    /// The same request straight on the disk.
    fn direct(&self, write: bool, len: usize, sector: u64) {
        let buffers = self.direct.buffers(!write).subrange(0, len);
        if write {
            block_on(self.disk.write_vectored(&buffers, sector, false)).unwrap();
        } else {
            block_on(self.disk.read_vectored(&buffers, sector)).unwrap();
        }
    }
}

const CASES: [(&str, bool, u32); 4] = [
    ("read_4k", false, 4096),
    ("write_4k", true, 4096),
    ("read_64k", false, 65536),
    ("write_64k", true, 65536),
];

fn overhead(c: &mut Criterion) {
    let mut rig = Rig::new();
    for (name, write, len) in CASES {
        let mut group = c.benchmark_group(name);
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));
        let mut sector = 0u64;
        group.bench_function("direct_disk", |b| {
            b.iter(|| {
                sector = (sector + 128) % (SECTORS - 128);
                rig.direct(write, len as usize, black_box(sector));
            })
        });
        group.bench_function("through_virtio", |b| {
            b.iter(|| {
                sector = (sector + 128) % (SECTORS - 128);
                rig.through_device(write, len, black_box(sector));
            })
        });
        group.finish();
    }

    // Criterion's reports have no ratio; measure both sides the same way and print one.
    println!("\nrequest | direct on Disk | through virtio | overhead ratio");
    for (name, write, len) in CASES {
        let mut sector = 0u64;
        let mut time = |through: bool, rig: &mut Rig| {
            let rounds: Vec<f64> = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..5000 {
                        sector = (sector + 128) % (SECTORS - 128);
                        if through {
                            rig.through_device(write, len, sector);
                        } else {
                            rig.direct(write, len as usize, sector);
                        }
                    }
                    start.elapsed().as_nanos() as f64 / 5000.0
                })
                .collect();
            let mut sorted = rounds;
            sorted.sort_by(f64::total_cmp);
            sorted[2]
        };
        let direct = time(false, &mut rig);
        let through = time(true, &mut rig);
        println!(
            "{name} | {direct:.0} ns | {through:.0} ns | {:.2}x",
            through / direct
        );
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
