//! `CONFIGURE_MEM_SLOTS`: guest memory added and removed region by region while the rings
//! run (`GET_MAX_MEM_SLOTS`, `ADD_MEM_REG`, `REM_MEM_REG`), as libblkio and QEMU with that
//! feature describe memory, and what a hostile frontend can do with it.

mod support;

use disk_backend::Disk;
use disk_delay::DelayDisk;
use disk_ram::RamDisk;
use guestmem::GuestMemory;
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{QUEUE_SIZE, TestFrontend, ring_base};
use vhost::VhostUserMemoryRegionInfo;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
};
use vhost::vhost_user::{VhostUserBackendReqHandler, VhostUserFrontend};
use vhost_user_blk::memory::MAX_MEM_SLOTS;
use vhost_user_blk::{SessionEnd, VhostUserBlk};
use virtio_block::BlockConfig;
use virtio_block::spec::{blk, ring};

/// The second region: not a whole number of pages, starting inside a page of its file, at
/// a guest address far from the first.
const EXTRA_GPA: u64 = 1 << 32;
const EXTRA_USER: u64 = 0x7f10_0000_0000;
const EXTRA_BYTES: u64 = 3 * 4096 + 100;
const EXTRA_OFFSET: u64 = 100;

fn backend_over(disk: Disk) -> Arc<VhostUserBlk> {
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    Arc::new(VhostUserBlk::new(disk, config).expect("backend"))
}

fn ram_backend() -> Arc<VhostUserBlk> {
    backend_over(Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk"))
}

fn memfd(len: u64) -> File {
    let file = File::from(memfd_create("extra", MFdFlags::MFD_CLOEXEC).expect("memfd"));
    file.set_len(len).expect("size the memfd");
    file
}

/// The second region's file, and our own view of it at its guest address.
fn extra_memory() -> (File, GuestMemory) {
    let file = memfd(4 * 4096);
    let mem = GuestMemory::builder()
        .file(EXTRA_GPA, EXTRA_BYTES, file.as_fd(), EXTRA_OFFSET, true)
        .expect("map")
        .build()
        .expect("build");
    (file, mem)
}

fn extra_region(file: &File) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: EXTRA_GPA,
        memory_size: EXTRA_BYTES,
        userspace_addr: EXTRA_USER,
        mmap_offset: EXTRA_OFFSET,
        mmap_handle: file.as_raw_fd(),
    }
}

/// A frontend that negotiated `CONFIGURE_MEM_SLOTS` (and `extra`) and added guest memory as
/// one region, with queue 0 running.
fn slots_frontend(backend: Arc<VhostUserBlk>, extra: VhostUserProtocolFeatures) -> TestFrontend {
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate_features_with(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS | extra);
    assert_eq!(
        fe.frontend.get_max_mem_slots().expect("get_max_mem_slots"),
        MAX_MEM_SLOTS as u64
    );
    let main = fe.memory_region();
    fe.frontend.add_mem_region(&main).expect("add_mem_region");
    fe
}

/// A request whose data lies at `data` (any region), header and status in the main region:
/// returns the status byte's address.
fn post_data_at(fe: &mut TestFrontend, request_type: u32, data: u64, len: u32) -> u64 {
    let (header, status) = (fe.alloc(16), fe.alloc(1));
    let flags = if request_type == blk::T_IN {
        ring::DESC_F_WRITE
    } else {
        0
    };
    fe.post_with(0, request_type, 8, header, &[(data, len, flags)], status);
    status
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn regions_added_and_removed_while_the_ring_runs() {
    let backend = ram_backend();
    let mut fe = slots_frontend(backend.clone(), VhostUserProtocolFeatures::empty());
    fe.start_queue(0, 0).expect("start");
    assert_eq!(fe.write(0, 0, &[1; 512]), blk::S_OK);

    // A second region while the ring runs: requests may use it at once.
    let (file, extra) = extra_memory();
    fe.frontend
        .add_mem_region(&extra_region(&file))
        .expect("add the second region");
    assert!(backend.is_running(0));
    let data = pattern(3, 1024);
    let at = EXTRA_GPA + EXTRA_BYTES - 1024;
    extra.write_at(at, &data).expect("data");
    let status = post_data_at(&mut fe, blk::T_OUT, at, 1024);
    fe.wait_used(0);
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    assert_eq!(fe.read(0, 8, 1024), (blk::S_OK, data.clone()));
    // The region ends where it says, even inside a page.
    let status = post_data_at(&mut fe, blk::T_IN, at + 512, 1024);
    fe.wait_used(0);
    assert_eq!(
        fe.mem.read_plain::<u8>(status).expect("status"),
        blk::S_IOERR
    );

    // Removed: a request into it fails with an I/O error, others go on.
    fe.frontend
        .remove_mem_region(&extra_region(&file))
        .expect("remove the second region");
    assert!(backend.is_running(0));
    let status = post_data_at(&mut fe, blk::T_IN, at, 1024);
    fe.wait_used(0);
    assert_eq!(
        fe.mem.read_plain::<u8>(status).expect("status"),
        blk::S_IOERR
    );
    assert_eq!(
        extra.read_plain::<u8>(at).expect("still ours"),
        data[0],
        "the failed read wrote nothing"
    );
    assert_eq!(fe.read(0, 0, 512), (blk::S_OK, vec![1; 512]));

    // Back again: served again.
    fe.frontend
        .add_mem_region(&extra_region(&file))
        .expect("add it again");
    extra.fill_at(at, 0, 1024).expect("clear");
    let status = post_data_at(&mut fe, blk::T_IN, at, 1024);
    fe.wait_used(0);
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    let mut back = vec![0; 1024];
    extra.read_at(at, &mut back).expect("read");
    assert_eq!(back, data);
    assert!(matches!(fe.disconnect(), SessionEnd::Closed));
}

/// A request in flight on a region when the frontend removes it finishes before the removal
/// is acknowledged, in memory this process still has mapped: the frontend may unmap the
/// region as soon as it has the reply. (It used to be refused: `CONFIGURE_MEM_SLOTS` was
/// not offered.)
#[test]
fn a_removal_is_acknowledged_after_the_requests_in_flight_on_it() {
    let inner = Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk");
    let delay = Arc::new(DelayDisk::new(inner.clone(), Duration::ZERO));
    let backend = backend_over(Disk::new(delay.clone()).expect("disk"));
    let mut fe = slots_frontend(backend, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    // The inflight region shows when the backend has taken the request.
    let (inflight, region) = fe
        .frontend
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        })
        .expect("get_inflight_fd");
    fe.frontend
        .set_inflight_fd(&inflight, region.as_raw_fd())
        .expect("set_inflight_fd");
    fe.start_queue(0, 0).expect("start");
    let (file, extra) = extra_memory();
    fe.frontend
        .add_mem_region(&extra_region(&file))
        .expect("add the second region");
    let data = pattern(9, 4096);
    extra.write_at(EXTRA_GPA, &data).expect("data");

    delay.set_delay(Duration::from_millis(300));
    let status = post_data_at(&mut fe, blk::T_OUT, EXTRA_GPA, 4096);
    let deadline = Instant::now() + Duration::from_secs(20);
    let in_flight = || {
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8];
        region
            .read_exact_at(&mut byte, 16)
            .expect("read the region");
        byte[0] != 0
    };
    while !in_flight() {
        assert!(Instant::now() < deadline, "the write never went in flight");
        std::thread::sleep(Duration::from_millis(1));
    }
    fe.frontend
        .remove_mem_region(&extra_region(&file))
        .expect("remove the region under the write");
    // Acknowledged: the write is complete, used and recorded, and its data is on the disk.
    let used: u16 = fe
        .mem
        .read_plain(ring_base(0) + 0x2000 + 2)
        .expect("used idx");
    assert_eq!(
        used, 1,
        "the request completed before the removal was acknowledged"
    );
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    assert!(!in_flight());
    fe.wait_used(0);
    delay.set_delay(Duration::ZERO);
    assert_eq!(fe.read(0, 8, 4096), (blk::S_OK, data));
}

/// libvhost-user's rule: a frontend may remove the region its rings live in and add it back
/// (QEMU does when a region changes shape). The ring waits, stopped, in between; requests
/// posted meanwhile are served once it is back.
#[test]
fn a_ring_whose_region_is_removed_waits_for_it_to_come_back() {
    let backend = ram_backend();
    let mut fe = slots_frontend(backend.clone(), VhostUserProtocolFeatures::empty());
    fe.start_queue(0, 0).expect("start");
    assert_eq!(fe.write(0, 2, &[2; 512]), blk::S_OK);
    let main = fe.memory_region();
    fe.frontend
        .remove_mem_region(&main)
        .expect("remove the rings' region");
    assert!(!backend.is_running(0));
    let (status, data) = fe.post(0, blk::T_IN, 2, &[], 512);
    // Other messages still work while the ring waits.
    assert_eq!(fe.capacity(), 2048);
    fe.frontend
        .set_vring_enable(0, true)
        .expect("enable while waiting");
    fe.frontend.add_mem_region(&main).expect("add it back");
    assert!(backend.is_running(0));
    fe.wait_used(0);
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    let mut back = [0u8; 512];
    fe.mem.read_at(data, &mut back).expect("data");
    assert_eq!(back, [2; 512]);
}

/// Hostile `ADD_MEM_REG`/`REM_MEM_REG` bodies, called the way the `vhost` crate calls the
/// handler once it has decoded them: each is refused with an error, nothing panics, and the
/// table is left as it was.
#[test]
fn hostile_region_messages_are_refused() {
    let backend = ram_backend();
    let file = memfd(4 * 4096);
    let add = |gpa, size, user, offset| {
        let fd = file.try_clone().expect("dup");
        backend
            .add_mem_region(
                &VhostUserSingleMemoryRegion::new(gpa, size, user, offset),
                fd,
                None,
            )
            .map(|_| ())
    };
    let remove = |gpa, size, user, offset| {
        backend.remove_mem_region(&VhostUserSingleMemoryRegion::new(gpa, size, user, offset))
    };
    add(0, 2 * 4096, 0x7f00_0000_0000, 0).expect("a good region");
    assert!(add(1 << 32, 0, 0x7f10_0000_0000, 0).is_err(), "zero size");
    assert!(
        add(4096, 4096, 0x7f10_0000_0000, 0).is_err(),
        "overlaps the first in guest addresses"
    );
    assert!(
        add(0, 2 * 4096, 0x7f00_0000_0000, 0).is_err(),
        "the same again"
    );
    assert!(
        add(1 << 32, u64::MAX, 0x7f10_0000_0000, 0).is_err(),
        "size overflows"
    );
    assert!(
        add(u64::MAX - 4095, 8192, 0x7f10_0000_0000, 0).is_err(),
        "guest address overflows"
    );
    assert!(
        add(1 << 32, 4096, u64::MAX - 100, 0).is_err(),
        "user address overflows"
    );
    assert!(
        add(1 << 32, 4096, 0x7f10_0000_0000, u64::MAX - 100).is_err(),
        "file offset overflows"
    );
    assert!(
        add(1 << 32, 4096, 0x7f10_0000_0000, 3 * 4096 + 1).is_err(),
        "past the end of the file"
    );
    assert!(
        remove(1 << 32, 4096, 0x7f10_0000_0000, 0).is_err(),
        "unknown"
    );
    assert!(
        remove(0, 4096, 0x7f00_0000_0000, 0).is_err(),
        "a different size"
    );
    assert!(
        remove(0, 2 * 4096, 0x7f00_0000_1000, 0).is_err(),
        "a different user address"
    );
    remove(0, 2 * 4096, 0x7f00_0000_0000, 4096).expect("the file offset is not compared");
    assert!(
        remove(0, 2 * 4096, 0x7f00_0000_0000, 0).is_err(),
        "removed twice"
    );

    // As many regions as announced, and not one more.
    for slot in 0..MAX_MEM_SLOTS as u64 {
        add(slot << 20, 4096, 0x7f00_0000_0000 + (slot << 20), 0).expect("within the slots");
    }
    let past = MAX_MEM_SLOTS as u64;
    assert!(
        add(past << 20, 4096, 0x7f00_0000_0000 + (past << 20), 0).is_err(),
        "more regions than GET_MAX_MEM_SLOTS announced"
    );
    remove(0, 4096, 0x7f00_0000_0000, 0).expect("free a slot");
    add(past << 20, 4096, 0x7f00_0000_0000 + (past << 20), 0).expect("the freed slot");
    backend.reset();
}

/// `ADD_MEM_REG` must carry exactly one file descriptor: without one the connection ends
/// (the `vhost` crate refuses the message), with nothing mapped and nothing panicking.
#[test]
fn a_region_without_its_file_descriptor_ends_the_connection() {
    use nix::sys::socket::{MsgFlags, sendmsg};
    use std::io::IoSlice;
    let backend = ram_backend();
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate_features_with(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    let mut message = Vec::new();
    // ADD_MEM_REG (37), version 1 with NEED_REPLY, a 40-byte body: padding, then a region.
    for word in [37u32, 0x1 | 0x8, 40] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    for value in [0u64, 0, 4096, 0x7f00_0000_0000, 0] {
        message.extend_from_slice(&value.to_le_bytes());
    }
    sendmsg::<()>(
        fe.raw.as_raw_fd(),
        &[IoSlice::new(&message)],
        &[],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let end = fe.disconnect();
    assert!(
        matches!(
            end,
            SessionEnd::Failed {
                request: Some(37),
                ..
            }
        ),
        "{end:?}"
    );
    assert!(!backend.is_running(0));
}

/// The memory slot messages need the protocol feature: a frontend that did not negotiate
/// `CONFIGURE_MEM_SLOTS` and sends `GET_MAX_MEM_SLOTS` anyway loses its connection.
#[test]
fn memory_slot_messages_without_the_feature_end_the_connection() {
    use nix::sys::socket::{MsgFlags, sendmsg};
    use std::io::IoSlice;
    let backend = ram_backend();
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate_features();
    let mut message = Vec::new();
    // GET_MAX_MEM_SLOTS (36), version 1, no body.
    for word in [36u32, 0x1, 0] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    sendmsg::<()>(
        fe.raw.as_raw_fd(),
        &[IoSlice::new(&message)],
        &[],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let end = fe.disconnect();
    assert!(
        matches!(
            end,
            SessionEnd::Failed {
                request: Some(36),
                ..
            }
        ),
        "{end:?}"
    );
}
