//! Inflight I/O tracking end to end, without a VM: a backend dies with requests in flight,
//! a fresh backend takes the same inflight region over a new connection, and the unfinished
//! requests complete exactly once, with the right data, before new ones.

mod support;

use disk_backend::Disk;
use disk_delay::DelayDisk;
use disk_ram::RamDisk;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{QUEUE_SIZE, TestFrontend};
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_blk::VhostUserBlk;
use virtio_block::BlockConfig;
use virtio_block::spec::blk;

fn config() -> BlockConfig {
    BlockConfig {
        queue_size: QUEUE_SIZE,
        ..BlockConfig::default()
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i as u8) ^ seed).collect()
}

/// The head `TestFrontend::post` uses for the request published at available index `n`.
fn head_of(n: u16) -> u16 {
    n % QUEUE_SIZE * 3 % QUEUE_SIZE
}

/// Heads marked in flight in the region (one queue), read the way a new backend would.
fn marked(region: &std::fs::File) -> Vec<u16> {
    (0..QUEUE_SIZE)
        .filter(|&head| {
            let mut byte = [0u8];
            region
                .read_exact_at(&mut byte, 16 + 16 * u64::from(head))
                .expect("read the region");
            byte[0] != 0
        })
        .collect()
}

#[test]
fn a_restarted_backend_completes_what_its_predecessor_left_in_flight_exactly_once() {
    let inner = Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk");
    let delay = Arc::new(DelayDisk::new(inner.clone(), Duration::ZERO));
    let first = Arc::new(
        VhostUserBlk::new(Disk::new(delay.clone()).expect("disk"), config()).expect("backend"),
    );
    let mut fe = TestFrontend::connect(first, 1);
    fe.negotiate_features_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    let (inflight, region) = fe
        .frontend
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        })
        .expect("get_inflight_fd");
    assert!(inflight.mmap_size >= 16 + 16 * u64::from(QUEUE_SIZE));
    fe.frontend
        .set_inflight_fd(&inflight, region.as_raw_fd())
        .expect("set_inflight_fd");
    fe.set_mem_table().expect("set_mem_table");
    fe.start_queue(0, 0).expect("start");

    // A completes. B and C are issued while the disk hangs (an hour: longer than any test),
    // then D completes out of order around them.
    assert_eq!(fe.write(0, 0, &pattern(0xa)), blk::S_OK);
    delay.set_delay(Duration::from_secs(3600));
    let (b_status, _) = fe.post(0, blk::T_OUT, 8, &pattern(0xb), 0);
    let (c_status, _) = fe.post(0, blk::T_OUT, 16, &pattern(0xc), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while marked(&region) != [head_of(1), head_of(2)] {
        assert!(
            Instant::now() < deadline,
            "B and C never showed as in flight: {:?}",
            marked(&region)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    delay.set_delay(Duration::ZERO);
    assert_eq!(fe.write(0, 24, &pattern(0xd)), blk::S_OK);
    assert_eq!(marked(&region), [head_of(1), head_of(2)]);
    let used_before = fe.queues[0].last_used;
    assert_eq!(used_before, 2, "A and D are in the used ring");

    // The backend is gone as far as the frontend is concerned (it never completes B and C:
    // its disk hangs). A fresh backend, over the same disk, gets the same region.
    let second = Arc::new(VhostUserBlk::new(inner.clone(), config()).expect("backend"));
    let _old = fe.reconnect(second);
    fe.negotiate_features_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    fe.frontend
        .set_inflight_fd(&inflight, region.as_raw_fd())
        .expect("set_inflight_fd again");
    fe.set_mem_table().expect("set_mem_table");
    fe.resume_queue(0).expect("resume");

    // B and C come back, then a new request E.
    fe.wait_used(0);
    fe.wait_used(0);
    assert_eq!(fe.write(0, 32, &pattern(0xe)), blk::S_OK);
    let entries = fe.used_entries(0, used_before);
    let heads: Vec<u16> = entries.iter().map(|&(head, _)| head).collect();
    assert_eq!(
        heads,
        [head_of(1), head_of(2), head_of(4)],
        "the unfinished requests, once each, in the order they were popped, then the new one"
    );
    assert_eq!(
        fe.mem.read_plain::<u8>(b_status).expect("status"),
        blk::S_OK
    );
    assert_eq!(
        fe.mem.read_plain::<u8>(c_status).expect("status"),
        blk::S_OK
    );
    assert!(marked(&region).is_empty(), "nothing is left in flight");
    for (sector, seed) in [(0, 0xa), (8, 0xb), (16, 0xc), (24, 0xd), (32, 0xe)] {
        assert_eq!(
            fe.read(0, sector, 4096),
            (blk::S_OK, pattern(seed)),
            "sector {sector}"
        );
    }
    // Every entry added since is one of those reads: no late duplicate of B or C.
    let after = fe.used_entries(0, used_before);
    assert_eq!(after.len(), 3 + 5);
}

/// A region whose areas claim another queue size is refused when the ring starts: the
/// ring stays stopped and the frontend hears of it, no panic.
#[test]
fn a_corrupt_region_keeps_the_ring_stopped() {
    let backend = Arc::new(
        VhostUserBlk::new(
            Disk::new(RamDisk::new(2048, 512).expect("ram")).expect("disk"),
            config(),
        )
        .expect("backend"),
    );
    let mut fe = TestFrontend::connect(backend.clone(), 1);
    fe.negotiate_features_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    let (inflight, region) = fe
        .frontend
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        })
        .expect("get_inflight_fd");
    region
        .write_all_at(&3u16.to_le_bytes(), 10)
        .expect("corrupt desc_num");
    fe.frontend
        .set_inflight_fd(&inflight, region.as_raw_fd())
        .expect("set_inflight_fd");
    fe.set_mem_table().expect("set_mem_table");
    assert!(fe.start_queue(0, 0).is_err(), "the ring must not start");
    assert!(!backend.is_running(0));
}
