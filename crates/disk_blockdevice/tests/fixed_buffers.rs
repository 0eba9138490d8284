//! Guest memory registered as io_uring fixed buffers (`BlockDeviceOptions::fixed_buffers`,
//! `register_fixed_buffers`, `DiskIo::register_memory`): reads and writes through them against a model, on a loop device and
//! a regular file, with every buffer layout a guest can produce (one piece, scattered pages,
//! pages of two regions, unaligned, read-only memory), and what registration does and does
//! not accept.

mod support;

use disk_backend::{Disk, DiskError, DiskIo};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, RingError};
use futures::executor::block_on;
use guestmem::{GuestMemory, PAGE_SIZE, PAGE_SIZE64, PagedRange};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use request_buffers::{MemoryRead, MemoryWrite, RequestBuffers};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use support::{FileDisk, LoopDisk};

const MIB: u64 = 1 << 20;
/// Pages of the heap region (at guest page 0) and of the shared-memory region after it.
const REGION_PAGES: u64 = 32;
/// The first guest page of the read-only region.
const READ_ONLY_FIRST: u64 = 128;
const READ_ONLY_PAGES: u64 = 8;

fn fixed_options() -> BlockDeviceOptions {
    BlockDeviceOptions {
        fixed_buffers: true,
        ..Default::default()
    }
}

/// A file in `/dev/shm` (shared memory, which the kernel pins for long like anonymous
/// memory) of `pages` pages: what a VMM or a vhost-user backend maps guest RAM from.
fn shm_file(pages: u64) -> File {
    let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
    file.set_len(pages * PAGE_SIZE64).unwrap();
    file
}

/// Guest memory of three regions: heap pages at guest page 0, a shared mapping right
/// after them in guest-physical space (but not in host space), and a read-only mapping of
/// `read_only` (which the test fills through the file) further up.
fn guest_memory(read_only: &File) -> GuestMemory {
    let shared = shm_file(REGION_PAGES);
    GuestMemory::builder()
        .heap(0, REGION_PAGES * PAGE_SIZE64)
        .unwrap()
        .file(
            REGION_PAGES * PAGE_SIZE64,
            REGION_PAGES * PAGE_SIZE64,
            shared.as_fd(),
            0,
            true,
        )
        .unwrap()
        .file(
            READ_ONLY_FIRST * PAGE_SIZE64,
            READ_ONLY_PAGES * PAGE_SIZE64,
            read_only.as_fd(),
            0,
            false,
        )
        .unwrap()
        .build()
        .unwrap()
}

/// Where a request's bytes live in guest memory, and what the disk can do with it.
struct Layout {
    gpns: Vec<u64>,
    offset: usize,
    /// One piece of one registered region: a fixed buffer on every kernel.
    single: bool,
    /// Several pieces of one registered region: a fixed buffer on Linux 6.15 and later.
    multi: bool,
}

/// A random layout of `len` bytes; `write` allows the read-only region (the disk only reads
/// guest memory for a write).
fn layout(rng: &mut impl Rng, len: usize, write: bool) -> Layout {
    let pages_for = |offset: usize| (offset + len).div_ceil(PAGE_SIZE) as u64;
    let run = |rng: &mut dyn rand::RngCore, first: u64, region: u64, pages: u64| -> Vec<u64> {
        let start = rng.random_range(first..=first + region - pages);
        (start..start + pages).collect()
    };
    match rng.random_range(0..if write { 7 } else { 6 }) {
        // Contiguous pages of the heap region, or of the shared region.
        kind @ (0 | 1) => Layout {
            gpns: run(rng, kind * REGION_PAGES, REGION_PAGES, pages_for(0)),
            offset: 0,
            single: true,
            multi: false,
        },
        // Distinct pages of the shared region, in random order.
        2 => {
            let mut pages: Vec<u64> = (REGION_PAGES..2 * REGION_PAGES).collect();
            pages.shuffle(rng);
            pages.truncate(pages_for(0) as usize);
            let contiguous = pages.windows(2).all(|w| w[1] == w[0] + 1);
            Layout {
                gpns: pages,
                offset: 0,
                single: contiguous,
                multi: !contiguous,
            }
        }
        // From the last sector of the heap region on across the guest-physical boundary
        // into the shared region: two registered buffers (one sector stays in the first).
        3 => {
            let offset = PAGE_SIZE - 512;
            let pages = pages_for(offset);
            let first = REGION_PAGES - 1;
            Layout {
                gpns: (first..first + pages).collect(),
                offset,
                single: pages == 1,
                multi: false,
            }
        }
        // Sector-aligned but not page-aligned: still zero-copy.
        4 => {
            let offset = 512 * rng.random_range(1..8);
            Layout {
                gpns: run(rng, REGION_PAGES, REGION_PAGES, pages_for(offset)),
                offset,
                single: true,
                multi: false,
            }
        }
        // Unaligned: through a bounce buffer.
        5 => {
            let offset = rng.random_range(1..512);
            Layout {
                gpns: run(rng, 0, REGION_PAGES, pages_for(offset)),
                offset,
                single: false,
                multi: false,
            }
        }
        // The read-only region, which is not registered.
        _ => Layout {
            gpns: run(rng, READ_ONLY_FIRST, READ_ONLY_PAGES, pages_for(0)),
            offset: 0,
            single: false,
            multi: false,
        },
    }
}

/// Copies `data` into guest memory at `layout`; the read-only region through the file behind
/// it.
fn fill(memory: &GuestMemory, layout: &Layout, data: &[u8], read_only: &File) {
    let range = PagedRange::new(layout.offset, data.len(), &layout.gpns).unwrap();
    if layout.gpns[0] < READ_ONLY_FIRST {
        RequestBuffers::new(memory, range, true)
            .writer()
            .write(data)
            .unwrap();
        return;
    }
    let mut done = 0;
    for run in range.runs() {
        let (gpa, len) = run.unwrap();
        let at = gpa - READ_ONLY_FIRST * PAGE_SIZE64;
        read_only.write_all_at(&data[done..done + len], at).unwrap();
        done += len;
    }
}

/// The `len` bytes of guest memory at `layout`.
fn gather(memory: &GuestMemory, layout: &Layout, len: usize) -> Vec<u8> {
    let range = PagedRange::new(layout.offset, len, &layout.gpns).unwrap();
    let mut data = vec![0; len];
    RequestBuffers::new(memory, range, false)
        .reader()
        .read(&mut data)
        .unwrap();
    data
}

/// Random reads and writes of 1 to 32 sectors in random layouts against a model of the
/// contents of a disk that starts zeroed; checks that exactly the requests in registered
/// memory used a fixed buffer (those of several pieces only where the kernel takes them).
fn model(backend: &BlockDeviceDisk, disk: &Disk, seed: u64) {
    let read_only = shm_file(READ_ONLY_PAGES);
    let memory = guest_memory(&read_only);
    disk.register_memory(&memory).unwrap();
    let stats = backend.fixed_buffer_stats();
    assert_eq!(stats.registered_bytes, 2 * REGION_PAGES * PAGE_SIZE64);
    let sectors = disk.sector_count().min(4096);
    let mut contents = vec![0u8; (sectors * 512) as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut single, mut multi) = (0, 0);
    for _ in 0..400 {
        let count = rng.random_range(1..=32u64);
        let sector = rng.random_range(0..=sectors - count);
        let len = (count * 512) as usize;
        let span = sector as usize * 512..sector as usize * 512 + len;
        let write = rng.random_bool(0.5);
        let layout = layout(&mut rng, len, write);
        single += u64::from(layout.single);
        multi += u64::from(layout.multi);
        let range = PagedRange::new(layout.offset, len, &layout.gpns).unwrap();
        if write {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            fill(&memory, &layout, &data, &read_only);
            let buffers = RequestBuffers::new(&memory, range, false);
            block_on(disk.write_vectored(&buffers, sector, rng.random_bool(0.2))).unwrap();
            contents[span].copy_from_slice(&data);
        } else {
            fill(&memory, &layout, &vec![0xee; len], &read_only);
            let buffers = RequestBuffers::new(&memory, range, true);
            block_on(disk.read_vectored(&buffers, sector)).unwrap();
            assert!(
                gather(&memory, &layout, len) == contents[span],
                "read of {count} sectors at {sector} into {:?} + {}",
                layout.gpns,
                layout.offset
            );
        }
    }
    let used = backend.fixed_buffer_stats().requests - stats.requests;
    let expected = single + if stats.vectored { multi } else { 0 };
    assert_eq!(
        used, expected,
        "fixed-buffer requests; {single} single-piece and {multi} multi-piece ones in \
         registered memory, vectored: {}",
        stats.vectored
    );
    assert!(single > 0 && multi > 0);
}

#[test]
fn model_on_a_loop_device_with_fixed_buffers() {
    for seed in 0..2 {
        let Some(l) = LoopDisk::new(2 * MIB, &["--direct-io=on"], &fixed_options()) else {
            return;
        };
        model(&l.disk, &Disk::new(l.disk.clone()).unwrap(), seed);
    }
}

#[test]
fn model_on_a_file_with_fixed_buffers() {
    let Some(f) = FileDisk::new(2 * MIB, &fixed_options()) else {
        return;
    };
    model(&f.disk, &Disk::new(f.disk.clone()).unwrap(), 7);
}

/// Without the option, `DiskIo::register_memory` is a no-op; the inherent method always
/// registers. A new registration replaces the old one, an empty memory drops it, and I/O
/// stays correct throughout.
#[test]
fn fixed_buffers_follow_the_option_and_can_be_replaced() {
    let Some(f) = FileDisk::new(MIB, &BlockDeviceOptions::default()) else {
        return;
    };
    let memory = guest_memory(&shm_file(READ_ONLY_PAGES));
    DiskIo::register_memory(&*f.disk, &memory).unwrap();
    assert_eq!(f.disk.fixed_buffer_stats().registered_bytes, 0);
    f.disk.register_fixed_buffers(&memory).unwrap();
    assert_eq!(
        f.disk.fixed_buffer_stats().registered_bytes,
        2 * REGION_PAGES * PAGE_SIZE64
    );
    let other = GuestMemory::allocate(4 * PAGE_SIZE);
    let disk = Disk::new(f.disk.clone()).unwrap();
    let gpns = [0, 1];
    let io = |memory: &GuestMemory, sector: u64, write: bool| {
        let range = PagedRange::new(0, 2 * PAGE_SIZE, &gpns).unwrap();
        let buffers = RequestBuffers::new(memory, range, !write);
        if write {
            block_on(disk.write_vectored(&buffers, sector, false)).unwrap();
        } else {
            block_on(disk.read_vectored(&buffers, sector)).unwrap();
        }
    };
    memory.fill_at(0, 0x11, 2 * PAGE_SIZE).unwrap();
    io(&memory, 0, true);
    assert_eq!(f.disk.fixed_buffer_stats().requests, 1);
    // Replaced: the first memory goes the plain way, the new one the fixed way.
    f.disk.register_fixed_buffers(&other).unwrap();
    assert_eq!(
        f.disk.fixed_buffer_stats().registered_bytes,
        4 * PAGE_SIZE64
    );
    io(&other, 0, false);
    assert_eq!(
        other.read_plain::<u64>(PAGE_SIZE64).unwrap(),
        0x1111111111111111
    );
    assert_eq!(f.disk.fixed_buffer_stats().requests, 2);
    memory.fill_at(0, 0x22, 2 * PAGE_SIZE).unwrap();
    io(&memory, 16, true);
    assert_eq!(f.disk.fixed_buffer_stats().requests, 2);
    io(&other, 16, false);
    assert_eq!(other.read_plain::<u8>(0).unwrap(), 0x22);
    // Dropped.
    f.disk
        .register_fixed_buffers(&GuestMemory::empty())
        .unwrap();
    assert_eq!(f.disk.fixed_buffer_stats().registered_bytes, 0);
    io(&other, 0, false);
    assert_eq!(f.disk.fixed_buffer_stats().requests, 3);
}

/// Memory the kernel will not pin for long (a shared mapping of a file on a regular file
/// system, since Linux 6.5) fails registration with `RegisterMemory` through the inherent
/// method and a `DiskError::Io` through `DiskIo`, and the disk keeps working without fixed
/// buffers.
#[test]
fn memory_the_kernel_cannot_pin_is_an_error_not_a_broken_disk() {
    let Some(f) = FileDisk::new(MIB, &fixed_options()) else {
        return;
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("ram"))
        .unwrap();
    backing.set_len(4 * PAGE_SIZE64).unwrap();
    let memory = GuestMemory::builder()
        .file(0, 4 * PAGE_SIZE64, backing.as_fd(), 0, true)
        .unwrap()
        .build()
        .unwrap();
    let disk = Disk::new(f.disk.clone()).unwrap();
    match f.disk.register_fixed_buffers(&memory) {
        Ok(()) => eprintln!("this kernel pins file mappings for long; nothing to check"),
        Err(error) => {
            assert!(matches!(error, RingError::RegisterMemory(_)), "{error:?}");
            assert_eq!(f.disk.fixed_buffer_stats().registered_bytes, 0);
            assert!(matches!(
                disk.register_memory(&memory),
                Err(DiskError::Io(_))
            ));
            memory.fill_at(0, 0x33, 4 * PAGE_SIZE).unwrap();
            let gpns = [0, 1, 2, 3];
            let range = PagedRange::new(0, 4 * PAGE_SIZE, &gpns).unwrap();
            block_on(disk.write_vectored(&RequestBuffers::new(&memory, range, false), 8, false))
                .unwrap();
            memory.fill_at(0, 0, 4 * PAGE_SIZE).unwrap();
            block_on(disk.read_vectored(&RequestBuffers::new(&memory, range, true), 8)).unwrap();
            assert_eq!(
                memory.read_plain::<u32>(3 * PAGE_SIZE64).unwrap(),
                0x33333333
            );
            assert_eq!(f.disk.fixed_buffer_stats().requests, 0);
        }
    }
}
