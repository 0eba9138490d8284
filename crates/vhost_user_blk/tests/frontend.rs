//! The backend driven by the `vhost` crate's frontend over a socket pair, the way a VMM
//! drives it: negotiation, rings, requests, resize notification, refusals, reconnects and a
//! clean stop.

mod support;

use disk_backend::Disk;
use disk_ram::RamDisk;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use support::{MEM_BYTES, QUEUE_SIZE, TestFrontend, USER_BASE, ring_base};
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_blk::{Server, SessionEnd, VhostUserBlk};
use virtio_block::BlockConfig;
use virtio_block::spec::blk;

fn ram_backend(sectors: u64, queues: u16) -> Arc<VhostUserBlk> {
    let disk = Disk::new(RamDisk::new(sectors, 512).expect("ram disk")).expect("disk");
    let config = BlockConfig {
        num_queues: queues,
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    Arc::new(VhostUserBlk::new(disk, config).expect("backend"))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn requests_round_trip_through_translated_rings() {
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate();
    assert_eq!(fe.capacity(), 2048);
    fe.start_queue(0, 0).expect("start queue 0");
    assert!(backend.is_running(0));
    let data = pattern(1, 4096);
    assert_eq!(fe.write(0, 8, &data), blk::S_OK);
    assert_eq!(fe.read(0, 8, 4096), (blk::S_OK, data));
    assert_eq!(fe.flush(0), blk::S_OK);
    // Past the end: the device core's validation answers, not a crash.
    assert_eq!(fe.read(0, 2048, 512).0, blk::S_IOERR);
    assert!(matches!(fe.disconnect(), SessionEnd::Closed));
    assert!(!backend.is_running(0), "a disconnect resets the device");
}

/// A call fd that blocks when full (here a blocking eventfd at its maximum, which its
/// frontend never reads) does not stall the backend: the interrupt's write fails instead of
/// blocking the thread that completes the request, and the session keeps answering. A
/// blocked write used to hang the kick thread and, through it, the next ring message.
#[test]
fn a_full_blocking_call_fd_does_not_stall_the_backend() {
    let backend = ram_backend(64, 1);
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate();
    fe.start_queue(0, 0).expect("start queue 0");
    let blocking = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    blocking.write(u64::MAX - 1).expect("fill the counter");
    fe.frontend
        .set_vring_call(0, &blocking)
        .expect("set the call fd");
    let (done, finished) = std::sync::mpsc::channel();
    // On its own thread, so that a hang fails the test at the deadline instead.
    std::thread::spawn(move || {
        let status = fe.write(0, 0, &[1; 512]);
        let base = fe.frontend.get_vring_base(0).ok();
        fe.disconnect();
        let _ = done.send((status, base));
    });
    let answered = finished.recv_timeout(Duration::from_secs(20));
    assert_eq!(answered, Ok((blk::S_OK, Some(1))));
    drop(blocking);
}

#[test]
fn requests_are_served_with_polling_off_and_at_its_longest() {
    // Off, the kick thread sleeps after every kick; with a long window it keeps polling
    // between the requests of a busy frontend. Both serve every request.
    for poll_max in [Duration::ZERO, Duration::from_secs(1)] {
        let backend = ram_backend(2048, 1);
        backend.set_poll_max(poll_max);
        let mut fe = TestFrontend::connect(backend.clone(), 1);
        fe.negotiate();
        fe.start_queue(0, 0).expect("start queue 0");
        for i in 0..32u64 {
            let data = pattern(i as u8, 512);
            assert_eq!(fe.write(0, i, &data), blk::S_OK, "{poll_max:?}");
            assert_eq!(fe.read(0, i, 512), (blk::S_OK, data), "{poll_max:?}");
        }
        assert!(matches!(fe.disconnect(), SessionEnd::Closed));
    }
}

#[test]
fn every_queue_serves_requests() {
    let backend = ram_backend(2048, 4);
    let mut fe = TestFrontend::connect(backend.clone(), 4);
    fe.negotiate();
    assert_eq!(fe.frontend.get_queue_num().expect("get_queue_num"), 4);
    let config = fe.config(60).expect("get_config");
    assert_eq!(
        u16::from_le_bytes([config[0x22], config[0x23]]),
        4,
        "num_queues"
    );
    for q in 0..4 {
        fe.start_queue(q, 0).expect("start queue");
    }
    for q in 0..4u16 {
        let data = pattern(q as u8, 1024);
        assert_eq!(fe.write(q, u64::from(q) * 16, &data), blk::S_OK);
    }
    for q in 0..4u16 {
        // Read each queue's data back through another queue.
        let (status, data) = fe.read((q + 1) % 4, u64::from(q) * 16, 1024);
        assert_eq!((status, data), (blk::S_OK, pattern(q as u8, 1024)));
    }
}

/// Over an io_uring disk, each kick thread submits the requests it starts to a ring of its
/// own and reaps it itself (`disk_backend::io_thread`): the disk's own ring sees none of
/// them, and every queue's requests complete with the right data.
#[test]
fn kick_threads_drive_an_io_uring_disk_on_their_own_rings() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(2048 * 512))
        .expect("image");
    let disk = Arc::new(
        disk_blockdevice::BlockDeviceDisk::open(&path, &Default::default()).expect("blockdev"),
    );
    disk.take_io_log();
    let config = BlockConfig {
        num_queues: 2,
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    let backend = Arc::new(
        VhostUserBlk::new(Disk::new(disk.clone()).expect("disk"), config).expect("backend"),
    );
    let mut fe = TestFrontend::connect(backend.clone(), 2);
    fe.negotiate();
    for q in 0..2 {
        fe.start_queue(q, 0).expect("start queue");
    }
    for round in 0..4u8 {
        for q in 0..2u16 {
            let data = pattern(round ^ q as u8, 8192);
            let sector = u64::from(q) * 64 + u64::from(round) * 16;
            assert_eq!(fe.write(q, sector, &data), blk::S_OK);
            assert_eq!(fe.flush(q), blk::S_OK);
            // Read back through the other queue's thread and ring.
            assert_eq!(fe.read(1 - q, sector, 8192), (blk::S_OK, data));
        }
    }
    assert!(
        disk.take_io_log().is_empty(),
        "requests went to the disk's own ring instead of the kick threads'"
    );
    assert!(matches!(fe.disconnect(), SessionEnd::Closed));
}

#[test]
fn get_vring_base_stops_the_ring_and_it_resumes_from_there() {
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate();
    fe.start_queue(0, 0).expect("start");
    for i in 0..3 {
        assert_eq!(fe.write(0, i, &[i as u8; 512]), blk::S_OK);
    }
    assert_eq!(fe.frontend.get_vring_base(0).expect("get_vring_base"), 3);
    assert!(!backend.is_running(0));
    // A request posted while stopped is not served...
    let (status, _) = fe.post(0, blk::T_IN, 0, &[], 512);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), 0xff);
    // ...until the ring is started again (from index 3, where the frontend's view is; its
    // own avail index is already 4), which picks the posted request up at once.
    let q = &mut fe.queues[0];
    let (avail, last_used) = (q.avail_idx, q.last_used);
    assert_eq!((avail, last_used), (4, 3));
    fe.frontend.set_vring_base(0, 3).expect("set_vring_base");
    let kick = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    fe.frontend
        .set_vring_kick(0, &kick)
        .expect("set_vring_kick");
    fe.queues[0].kick = kick;
    assert!(backend.is_running(0));
    fe.wait_used(0);
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    assert_eq!(fe.read(0, 2, 512), (blk::S_OK, vec![2; 512]));
}

#[test]
fn reset_device_stops_the_rings_but_keeps_the_connection_state() {
    // QEMU sends RESET_DEVICE before starting the device, then only features, the memory
    // table and rings: the negotiated REPLY_ACK must survive, or its SET_MEM_TABLE would wait
    // for an ack forever.
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate();
    fe.start_queue(0, 0).expect("start");
    assert_eq!(fe.write(0, 1, &[1; 512]), blk::S_OK);
    fe.frontend.reset_device().expect("reset_device");
    assert!(!backend.is_running(0));
    fe.frontend
        .set_features(TestFrontend::FEATURES)
        .expect("set_features");
    fe.set_mem_table().expect("set_mem_table is acked");
    fe.start_queue(0, 0).expect("start again");
    assert_eq!(fe.read(0, 1, 512), (blk::S_OK, vec![1; 512]));
    assert_eq!(fe.capacity(), 2048, "CONFIG is still negotiated");
}

#[test]
fn a_resize_sends_config_change_on_the_backend_channel() {
    let ram = Arc::new(RamDisk::new(2048, 512).expect("ram disk"));
    let disk = Disk::new(ram.clone()).expect("disk");
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    let backend = Arc::new(VhostUserBlk::new(disk, config).expect("backend"));
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate();
    fe.start_queue(0, 0).expect("start");
    assert_eq!(fe.capacity(), 2048);
    ram.resize(4096).expect("resize");
    let mut channel = fe.channel.take().expect("backend channel");
    channel
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut header = [0u8; 12];
    channel.read_exact(&mut header).expect("CONFIG_CHANGE_MSG");
    assert_eq!(
        u32::from_le_bytes(header[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    assert_eq!(
        u32::from_le_bytes(header[4..8].try_into().unwrap()) & 0x3,
        1,
        "version 1"
    );
    assert_eq!(
        u32::from_le_bytes(header[8..12].try_into().unwrap()),
        0,
        "no payload"
    );
    assert_eq!(fe.capacity(), 4096);
    assert_eq!(
        fe.write(0, 4000, &[9; 512]),
        blk::S_OK,
        "the new sectors are usable"
    );
}

#[test]
fn a_memory_table_with_trailing_unused_regions_is_accepted() {
    // User-Mode Linux sends its whole `regions[2]` array with a count of 1.
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate_features();
    let mut message = Vec::new();
    for word in [5u32, 0x1 | 0x8, 8 + 2 * 32, 1, 0] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    for value in [0, MEM_BYTES, USER_BASE, 0] {
        message.extend_from_slice(&value.to_le_bytes());
    }
    message.extend_from_slice(&[0xaa; 32]);
    let fds = [fe.memfd.as_raw_fd()];
    sendmsg::<()>(
        fe.raw.as_raw_fd(),
        &[IoSlice::new(&message)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let mut reply = [0u8; 20];
    fe.raw.read_exact(&mut reply).expect("ack");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 5);
    assert_eq!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()),
        0x1 | 0x4,
        "a reply"
    );
    assert_eq!(
        u64::from_le_bytes(reply[12..20].try_into().unwrap()),
        0,
        "success"
    );
    fe.start_queue(0, 0).expect("start");
    assert_eq!(fe.write(0, 3, &[3; 512]), blk::S_OK);
    assert_eq!(fe.read(0, 3, 512), (blk::S_OK, vec![3; 512]));
}

#[test]
fn a_memory_table_shorter_than_its_count_is_refused() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate_features();
    let mut message = Vec::new();
    // A count of 2 with one region's worth of body.
    for word in [5u32, 0x1, 8 + 32, 2, 0] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    for value in [0, MEM_BYTES, USER_BASE, 0] {
        message.extend_from_slice(&value.to_le_bytes());
    }
    let fds = [fe.memfd.as_raw_fd()];
    sendmsg::<()>(
        fe.raw.as_raw_fd(),
        &[IoSlice::new(&message)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let end = fe.disconnect();
    assert!(
        matches!(
            end,
            SessionEnd::Failed {
                request: Some(5),
                ..
            }
        ),
        "{end:?}"
    );
}

/// Each refused request gets a failure reply (REPLY_ACK), the connection ends, and the
/// backend is left reset; nothing panics.
fn refused(setup: impl FnOnce(&mut TestFrontend) -> vhost::Result<()>) {
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend.clone(), 8);
    fe.negotiate();
    let result = setup(&mut fe);
    assert!(result.is_err(), "the backend accepted a bad request");
    let end = fe.disconnect();
    assert!(matches!(end, SessionEnd::Failed { .. }), "{end:?}");
    assert!(!backend.is_running(0));
}

#[test]
fn queue_index_out_of_range_is_refused() {
    refused(|fe| fe.frontend.set_vring_num(1, QUEUE_SIZE));
    refused(|fe| fe.frontend.set_vring_base(7, 0));
    refused(|fe| fe.frontend.set_vring_enable(5, true));
    refused(|fe| fe.frontend.get_vring_base(3).map(|_| ()));
}

#[test]
fn bad_ring_sizes_and_bases_are_refused() {
    refused(|fe| fe.frontend.set_vring_num(0, 3));
    refused(|fe| fe.frontend.set_vring_num(0, QUEUE_SIZE * 2));
    refused(|fe| fe.frontend.set_vring_num(0, 0));
}

#[test]
fn unoffered_features_are_refused() {
    let backend = ram_backend(2048, 1);
    let fe = TestFrontend::connect(backend, 1);
    fe.frontend.set_owner().expect("set_owner");
    let offered = fe.frontend.get_features().expect("get_features");
    // Without REPLY_ACK the refusal shows as the connection closing.
    fe.frontend.set_features(offered | 1 << 27).expect("sent");
    assert!(matches!(fe.disconnect(), SessionEnd::Failed { .. }));
}

#[test]
fn bad_memory_tables_are_refused() {
    // A region reaching past the end of its file would SIGBUS the backend on access.
    refused(|fe| {
        fe.frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_BYTES * 2,
                userspace_addr: USER_BASE,
                mmap_offset: 0,
                mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&fe.memfd),
            }])
            .map(|_| ())
    });
    // Two regions over the same guest addresses. (Alignment is not asked for: a region
    // may have any size and start anywhere, as the protocol allows.)
    refused(|fe| {
        let region = |guest_phys_addr, userspace_addr| VhostUserMemoryRegionInfo {
            guest_phys_addr,
            memory_size: 8192,
            userspace_addr,
            mmap_offset: 0,
            mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&fe.memfd),
        };
        fe.frontend
            .set_mem_table(&[region(0x100, USER_BASE), region(0x1100, USER_BASE << 1)])
            .map(|_| ())
    });
}

/// A table of regions that are not whole pages, at guest addresses and file offsets inside
/// pages, serves requests: the memory libblkio describes. It used to be refused.
#[test]
fn a_memory_table_of_unaligned_regions_serves_requests() {
    let backend = ram_backend(2048, 1);
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate_features();
    let region = |guest_phys_addr: u64, memory_size: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr,
        memory_size,
        userspace_addr: USER_BASE + guest_phys_addr,
        mmap_offset: guest_phys_addr,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&fe.memfd),
    };
    // The rings and data area in two regions split at an odd byte, the second one ending
    // 100 bytes short of the memfd.
    let split = (1 << 20) + 0x123;
    fe.frontend
        .set_mem_table(&[region(0, split), region(split, MEM_BYTES - split - 100)])
        .expect("set_mem_table");
    fe.start_queue(0, 0).expect("start");
    let data = pattern(5, 4096);
    assert_eq!(fe.write(0, 16, &data), blk::S_OK);
    assert_eq!(fe.read(0, 16, 4096), (blk::S_OK, data));
}

#[test]
fn ring_addresses_outside_memory_are_refused() {
    // Not in any region's user range.
    refused(|fe| {
        fe.start_queue(0, 0)?;
        fe.frontend.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: 0x1000,
                used_ring_addr: USER_BASE + ring_base(0) + 0x2000,
                avail_ring_addr: USER_BASE + ring_base(0) + 0x1000,
                log_addr: None,
            },
        )
    });
    // Inside a region, but the used ring runs past its end.
    refused(|fe| {
        fe.start_queue(0, 0)?;
        fe.frontend.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: USER_BASE + ring_base(0),
                used_ring_addr: USER_BASE + MEM_BYTES - 8,
                avail_ring_addr: USER_BASE + ring_base(0) + 0x1000,
                log_addr: None,
            },
        )
    });
}

#[test]
fn configuration_access_out_of_range_is_refused() {
    // Called on the handler directly: the `vhost` crate answers a refused GET_CONFIG with an
    // empty payload (as the spec says), which its own frontend cannot read back.
    use vhost::vhost_user::VhostUserBackendReqHandler;
    use vhost::vhost_user::message::VhostUserConfigFlags;
    let backend = ram_backend(2048, 1);
    let flags = VhostUserConfigFlags::WRITABLE;
    assert!(backend.get_config(0x100, 64, flags).is_err());
    assert!(backend.get_config(0xf0, 32, flags).is_err());
    assert!(backend.set_config(0xff, &[0, 0], flags).is_err());
    let config = backend.get_config(0, 60, flags).expect("in range");
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 2048);
    // seg_max fits the ring (QUEUE_SIZE entries here), whatever size the frontend picks
    // up to it.
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        u32::from(QUEUE_SIZE) - 2
    );
    let large = VhostUserBlk::new(
        Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk"),
        BlockConfig {
            queue_size: 1024,
            ..BlockConfig::default()
        },
    )
    .expect("backend");
    let config = large.get_config(0, 60, flags).expect("in range");
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        u32::from(vhost_user_blk::MIN_EXPECTED_RING) - 2,
        "a 128-entry ring must hold any request"
    );
    // Past the 60 bytes of the block configuration, still inside the window: zeros.
    assert_eq!(
        backend.get_config(60, 36, flags).expect("in range"),
        vec![0; 36]
    );
}

#[test]
fn garbage_on_the_socket_ends_the_connection() {
    let backend = ram_backend(2048, 1);
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let (_stop, stop_reader) = UnixStream::pair().expect("socketpair");
    let server = std::thread::spawn({
        let backend = backend.clone();
        move || vhost_user_blk::serve_connection(&backend, theirs, stop_reader.as_fd())
    });
    use std::io::Write;
    // Request 9999, version 1, a 4 KiB payload that never comes in full.
    let mut message = Vec::new();
    message.extend_from_slice(&9999u32.to_le_bytes());
    message.extend_from_slice(&1u32.to_le_bytes());
    message.extend_from_slice(&8u32.to_le_bytes());
    message.extend_from_slice(&[0xee; 8]);
    ours.write_all(&message).expect("write");
    let end = server.join().expect("no panic");
    assert!(matches!(end, SessionEnd::Failed { .. }), "{end:?}");
}

#[test]
fn the_server_accepts_a_new_connection_after_a_disconnect_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blk.sock");
    let disk = Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk");
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    let server = Server::bind(&path, disk, config).expect("bind");
    let (mut stop, stop_reader) = UnixStream::pair().expect("socketpair");
    let runner = std::thread::spawn(move || {
        let mut events = Vec::new();
        let result = server.run(stop_reader.as_fd(), |event| {
            events.push(format!("{event:?}"))
        });
        (result, events)
    });
    for round in 0..2u8 {
        let stream = UnixStream::connect(&path).expect("connect");
        let mut fe = TestFrontend::attach(stream);
        fe.negotiate();
        // Fresh state each time: ring base 0 again, and data from the last round is there
        // (the disk outlives connections).
        fe.start_queue(0, 0).expect("start");
        if round == 1 {
            assert_eq!(fe.read(0, 0, 512), (blk::S_OK, vec![7; 512]));
        }
        assert_eq!(fe.write(0, 0, &[7; 512]), blk::S_OK);
        drop(fe);
    }
    use std::io::Write;
    stop.write_all(&[1]).expect("stop");
    let (result, events) = runner.join().expect("no panic");
    result.expect("clean stop");
    let connected = events.iter().filter(|e| *e == "Connected").count();
    assert_eq!(connected, 2, "{events:?}");
    assert!(!path.exists(), "the socket is removed");
}

#[test]
fn stopping_waits_for_requests_in_flight() {
    let inner = Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk");
    let slow = Disk::new(disk_delay::DelayDisk::new(
        inner,
        Duration::from_millis(300),
    ))
    .expect("disk");
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    };
    let backend = Arc::new(VhostUserBlk::new(slow, config).expect("backend"));
    let mut fe = TestFrontend::connect(backend, 1);
    fe.negotiate();
    fe.start_queue(0, 0).expect("start");
    let (status, _) = fe.post(0, blk::T_OUT, 0, &[5; 512], 0);
    // Give the kick thread time to start the request, then stop: the session must not end
    // before the request completed.
    std::thread::sleep(Duration::from_millis(50));
    use std::io::Write;
    fe.stop.write_all(&[1]).expect("stop");
    let server = fe.server.take().expect("server");
    assert!(matches!(
        server.join().expect("no panic"),
        SessionEnd::Stopped
    ));
    assert_eq!(fe.mem.read_plain::<u8>(status).expect("status"), blk::S_OK);
    let used: u16 = fe
        .mem
        .read_plain(ring_base(0) + 0x2000 + 2)
        .expect("used idx");
    assert_eq!(
        used, 1,
        "the completion reached the used ring before the stop returned"
    );
}
