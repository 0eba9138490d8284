//! Stock libblkio (the `blkio` crate: the userspace virtio-blk driver behind QEMU's `blkio`
//! block driver, here its `virtio-blk-vhost-user` driver) against our export, started in the
//! test over a RAM disk and over a file, with no VM in between.
//!
//! What libblkio asks of a backend (its `virtio-driver` dependency, `VhostUser::connect`):
//! `VHOST_USER_F_PROTOCOL_FEATURES`, the protocol features `REPLY_ACK`, `CONFIG` and
//! `CONFIGURE_MEM_SLOTS` (it refuses a backend without them, and never sends
//! `SET_MEM_TABLE`), `MQ` if offered. Every memory region it announces with `ADD_MEM_REG`
//! is a memfd mapped at an address of its own, which is also the guest address: first its
//! rings and request headers, one region exactly as long as they are (15120 bytes per
//! 256-entry queue, not a whole number of pages), then each buffer region the application
//! maps, of whatever length it chose. `REM_MEM_REG` comes when the application unmaps one.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use disk_backend::Disk;
use disk_file::{FileDisk, FileDiskOptions};
use disk_ram::RamDisk;
use guestmem::GuestMemory;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost_user_blk::{ServeError, Server};
use virtio_block::BlockConfig;

/// Disk size: room for each queue's own 1 MiB area.
const DISK_BYTES: u64 = 8 << 20;
/// Requests kept in flight at once on each queue.
const DEPTH: usize = 16;
/// Bytes per read or write.
const REQUEST_BYTES: usize = 8192;
/// Each queue's buffer region: room for a batch of writes and one of reads, and an odd
/// tail so that the region is not a whole number of pages.
const BUFFER_BYTES: usize = 2 * DEPTH * REQUEST_BYTES + 100;

/// The export on a socket in a temporary directory, served on a thread until dropped.
struct Export {
    path: PathBuf,
    stop: UnixStream,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: tempfile::TempDir,
}

impl Export {
    fn start(disk: Disk, queues: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blk.sock");
        let config = BlockConfig {
            num_queues: queues,
            ..BlockConfig::default()
        };
        let server = Server::bind(&path, disk, config).expect("bind");
        let (stop, stop_reader) = UnixStream::pair().expect("socketpair");
        let thread = std::thread::spawn(move || server.run(stop_reader.as_fd(), |_| {}));
        Self {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.stop.write_all(&[1]);
        if let Some(thread) = self.thread.take() {
            let result = thread.join().expect("the server thread panicked");
            if !std::thread::panicking() {
                result.expect("the server stopped cleanly");
            }
        }
    }
}

fn ram_disk() -> Disk {
    Disk::new(RamDisk::new(DISK_BYTES / 512, 512).expect("ram disk")).expect("disk")
}

fn file_disk(dir: &Path) -> Disk {
    let path = dir.join("disk.img");
    File::create(&path)
        .and_then(|file| file.set_len(DISK_BYTES))
        .expect("create the image");
    Disk::new(FileDisk::open(&path, &FileDiskOptions::default()).expect("open")).expect("disk")
}

/// libblkio connected to `export` and started with `queues` queues.
fn connect(export: &Export, queues: i32) -> (Blkio, Vec<Blkioq>) {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
    let path = export.path.to_str().expect("utf-8 path");
    blkio.set_str("path", path).expect("path");
    blkio.connect().expect("libblkio connects");
    assert_eq!(blkio.get_u64("capacity").expect("capacity"), DISK_BYTES);
    assert!(blkio.get_u64("max-mem-regions").expect("max-mem-regions") >= 2);
    blkio.set_i32("num-queues", queues).expect("num-queues");
    let started = blkio.start().expect("libblkio starts");
    assert_eq!(started.queues.len(), queues as usize);
    (blkio, started.queues)
}

/// A buffer region libblkio allocated and announced, and our own mapping of its memory
/// (through its memfd, at the address libblkio uses as guest address).
struct Buffers {
    region: MemoryRegion,
    mem: GuestMemory,
}

impl Buffers {
    fn new(blkio: &mut Blkio, len: usize) -> Self {
        let region = blkio.alloc_mem_region(len).expect("alloc_mem_region");
        blkio.map_mem_region(&region).expect("map_mem_region");
        // A second open file description of the same memfd, so that no raw descriptor is
        // borrowed: its pages are the ones libblkio has mapped.
        let file = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", region.fd))
            .expect("open the region's memfd");
        let mem = GuestMemory::builder()
            .file(region.addr as u64, len as u64, file.as_fd(), 0, true)
            .expect("map")
            .build()
            .expect("build");
        Self { region, mem }
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    fn addr(&self, offset: usize) -> u64 {
        (self.region.addr + offset) as u64
    }
}

/// Waits for `count` completions on `queue`: (user data, result) in completion order.
fn complete(queue: &mut Blkioq, count: usize) -> Vec<(usize, i32)> {
    let empty = || Completion {
        user_data: usize::MAX,
        error_msg: std::ptr::null(),
        ret: 0,
        reserved_: [0; 12],
    };
    let mut slots: Vec<MaybeUninit<Completion>> =
        (0..count).map(|_| MaybeUninit::new(empty())).collect();
    let mut done = Vec::new();
    while done.len() < count {
        let want = count - done.len();
        // A guard against a hang, not a timing assertion.
        let mut timeout = Duration::from_secs(120);
        let n = queue
            .do_io(&mut slots[..want], want, Some(&mut timeout), None)
            .expect("do_io (completions within the guard)");
        for slot in &slots[..n] {
            // SAFETY: every slot was initialised above, and `do_io` only writes whole
            // completions into the slots it fills.
            #[allow(unsafe_code)]
            let completion = unsafe { slot.assume_init_ref() };
            done.push((completion.user_data, completion.ret));
        }
    }
    done
}

fn all_succeeded(mut results: Vec<(usize, i32)>, first: usize, what: &str) {
    results.sort_unstable();
    let expected: Vec<(usize, i32)> = (first..first + results.len()).map(|u| (u, 0)).collect();
    assert_eq!(results, expected, "{what}");
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ (seed as u8).wrapping_mul(101))
        .collect()
}

/// What the export offers that libblkio reads from the configuration.
#[derive(Clone, Copy)]
struct Offers {
    discard: bool,
    write_zeroes: bool,
}

/// Every kind of request on `queue`, `DEPTH` at a time where it matters, in the disk area
/// at `base` (bytes), with the data verified.
fn exercise(queue: &mut Blkioq, buffers: &Buffers, base: u64, seed: usize, offers: Offers) {
    let reads_at = DEPTH * REQUEST_BYTES;
    // A batch of writes, all in flight together.
    for i in 0..DEPTH {
        let data = pattern(seed + i, REQUEST_BYTES);
        let offset = i * REQUEST_BYTES;
        buffers
            .mem
            .write_at(buffers.addr(offset), &data)
            .expect("fill");
        let start = base + (i * REQUEST_BYTES) as u64;
        queue.write(
            start,
            buffers.ptr(offset),
            REQUEST_BYTES,
            i,
            ReqFlags::empty(),
        );
    }
    all_succeeded(complete(queue, DEPTH), 0, "writes");
    // Read them back, all in flight together, in reverse order.
    for i in (0..DEPTH).rev() {
        let start = base + (i * REQUEST_BYTES) as u64;
        let offset = reads_at + i * REQUEST_BYTES;
        queue.read(
            start,
            buffers.ptr(offset),
            REQUEST_BYTES,
            100 + i,
            ReqFlags::empty(),
        );
    }
    all_succeeded(complete(queue, DEPTH), 100, "reads");
    for i in 0..DEPTH {
        let mut back = vec![0; REQUEST_BYTES];
        let offset = reads_at + i * REQUEST_BYTES;
        buffers
            .mem
            .read_at(buffers.addr(offset), &mut back)
            .expect("read");
        assert!(
            back == pattern(seed + i, REQUEST_BYTES),
            "request {i} read back"
        );
    }
    // A flush, and a FUA write (libblkio follows it with a flush).
    queue.flush(200, ReqFlags::empty());
    queue.write(base, buffers.ptr(0), 512, 201, ReqFlags::FUA);
    all_succeeded(complete(queue, 2), 200, "flush and FUA write");
    if offers.write_zeroes {
        queue.write_zeroes(base, 16384, 300, ReqFlags::empty());
        queue.write_zeroes(base + 16384, 4096, 301, ReqFlags::NO_UNMAP);
        all_succeeded(complete(queue, 2), 300, "write-zeroes");
        queue.read(base, buffers.ptr(reads_at), 20480, 302, ReqFlags::empty());
        all_succeeded(complete(queue, 1), 302, "read of zeroes");
        let mut back = vec![1; 20480];
        buffers
            .mem
            .read_at(buffers.addr(reads_at), &mut back)
            .expect("read");
        assert!(back.iter().all(|&b| b == 0), "write-zeroes left data");
        // The next sector is untouched.
        queue.read(
            base + 20480,
            buffers.ptr(reads_at),
            512,
            303,
            ReqFlags::empty(),
        );
        all_succeeded(complete(queue, 1), 303, "read after the zeroes");
        let mut back = vec![0; 512];
        buffers
            .mem
            .read_at(buffers.addr(reads_at), &mut back)
            .expect("read");
        assert_eq!(back, pattern(seed + 2, REQUEST_BYTES)[4096..4608]);
    }
    if offers.discard {
        queue.discard(base + 32768, 32768, 400, ReqFlags::empty());
        all_succeeded(complete(queue, 1), 400, "discard");
    }
    // Past the end of the disk: an error, not a hang.
    queue.read(DISK_BYTES, buffers.ptr(0), 512, 500, ReqFlags::empty());
    let results = complete(queue, 1);
    assert_eq!(results.len(), 1);
    assert!(
        results[0].1 < 0,
        "a read past the end succeeded: {results:?}"
    );
}

/// Connects, starts, and runs every job on every queue at once.
fn drive(disk: Disk, queues: u16) {
    let export = Export::start(disk, queues);
    let (mut blkio, mut started) = connect(&export, i32::from(queues));
    let offers = Offers {
        discard: blkio.get_u64("max-discard-len").expect("max-discard-len") > 0,
        write_zeroes: blkio
            .get_u64("max-write-zeroes-len")
            .expect("max-write-zeroes-len")
            > 0,
    };
    assert!(
        offers.discard && offers.write_zeroes,
        "both disks can unmap"
    );
    let buffers: Vec<Buffers> = (0..queues)
        .map(|_| Buffers::new(&mut blkio, BUFFER_BYTES))
        .collect();
    std::thread::scope(|scope| {
        for (index, (queue, buffers)) in started.iter_mut().zip(&buffers).enumerate() {
            scope.spawn(move || {
                let base = (index as u64 + 1) << 20;
                exercise(queue, buffers, base, index * 1000, offers);
            });
        }
    });
    // Another round on the same connection: nothing was left behind.
    exercise(&mut started[0], &buffers[0], 6 << 20, 7, offers);
    drop(started);
    drop(blkio);
}

#[test]
fn libblkio_drives_a_ram_disk_over_one_queue() {
    drive(ram_disk(), 1);
}

#[test]
fn libblkio_drives_a_ram_disk_over_two_queues() {
    drive(ram_disk(), 2);
}

#[test]
fn libblkio_drives_a_file_over_one_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    drive(file_disk(dir.path()), 1);
}

#[test]
fn libblkio_drives_a_file_over_two_queues() {
    let dir = tempfile::tempdir().expect("tempdir");
    drive(file_disk(dir.path()), 2);
}

/// Requests libblkio has queued into a buffer region when it unmaps that region fail with
/// an error; the queue goes on serving requests into the regions that stay, and into the
/// region once it is mapped again.
#[test]
fn requests_into_a_region_libblkio_unmapped_fail_cleanly() {
    let export = Export::start(ram_disk(), 1);
    let (mut blkio, mut queues) = connect(&export, 1);
    let queue = &mut queues[0];
    let kept = Buffers::new(&mut blkio, BUFFER_BYTES);
    let gone = Buffers::new(&mut blkio, 3 * 4096 + 1);
    let data = pattern(5, 4096);
    gone.mem.write_at(gone.addr(0), &data).expect("fill");
    queue.write(0, gone.ptr(0), 4096, 1, ReqFlags::empty());
    all_succeeded(complete(queue, 1), 1, "write from the region");

    // Queued (published in the ring, not yet signalled), then the region goes away.
    for i in 0..4 {
        queue.read(0, gone.ptr(0), 4096, 10 + i, ReqFlags::empty());
    }
    blkio.unmap_mem_region(&gone.region);
    let results = complete(queue, 4);
    assert_eq!(results.len(), 4);
    assert!(
        results.iter().all(|&(_, ret)| ret < 0),
        "a request into an unmapped region succeeded: {results:?}"
    );
    queue.read(0, kept.ptr(0), 4096, 20, ReqFlags::empty());
    all_succeeded(complete(queue, 1), 20, "read into a region that stayed");
    let mut back = vec![0; 4096];
    kept.mem.read_at(kept.addr(0), &mut back).expect("read");
    assert_eq!(back, data);

    blkio.map_mem_region(&gone.region).expect("map it again");
    gone.mem.fill_at(gone.addr(0), 0, 4096).expect("clear");
    queue.read(0, gone.ptr(0), 4096, 30, ReqFlags::empty());
    all_succeeded(complete(queue, 1), 30, "read into the region mapped again");
    gone.mem.read_at(gone.addr(0), &mut back).expect("read");
    assert_eq!(back, data);
}
