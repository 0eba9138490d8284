//! Hostile drivers: each test breaks one rule and states the outcome the spec allows. None
//! may panic, hang, allocate without bound or keep a descriptor: a chain is either returned
//! through the used ring or the device reports `DEVICE_NEEDS_RESET`.

mod support;

use disk_ram::RamDisk;
use std::sync::atomic::Ordering;
use support::*;
use virtio_block::config::RequestHeader;
use virtio_block::descriptor::Descriptor;
use virtio_block::harness::{Buffer, Driver, DriverOptions, ProbeError, Used};
use virtio_block::spec::{blk, features, mmio, ring, status};
use virtio_block::{BlockConfig, BlockDevice, VirtioDevice};

fn needs_reset(driver: &mut Driver<BlockDevice>) -> bool {
    driver.status() & status::DEVICE_NEEDS_RESET != 0
}

fn header(driver: &mut Driver<BlockDevice>, request_type: u32, sector: u64) -> u64 {
    let at = driver.alloc(16, 16).unwrap();
    driver
        .mem()
        .write_plain(
            at,
            &RequestHeader {
                request_type: request_type.into(),
                reserved: 0.into(),
                sector: sector.into(),
            },
        )
        .unwrap();
    at
}

fn status_byte(driver: &mut Driver<BlockDevice>) -> u64 {
    let at = driver.alloc(1, 1).unwrap();
    driver.mem().write_plain(at, &0xffu8).unwrap();
    at
}

/// Posts `buffers`, notifies, and returns the used element and the status byte at
/// `status_at`.
fn submit(driver: &mut Driver<BlockDevice>, buffers: &[Buffer], status_at: u64) -> (Used, u8) {
    let head = driver.post(0, buffers).unwrap();
    driver.notify(0);
    let used = driver.wait_used(0).unwrap();
    assert_eq!(used.head, head);
    (used, driver.mem().read_plain(status_at).unwrap())
}

/// After a reset the device works again: the error state is not sticky.
fn recovers(driver: &mut Driver<BlockDevice>) {
    driver.write_reg(mmio::STATUS, 0);
    assert_eq!(driver.status(), 0);
    driver.probe(&DriverOptions::default()).unwrap();
    driver.free_all();
    assert_eq!(driver.write(0, 0, &[9; 512]).unwrap(), blk::S_OK);
    assert_eq!(driver.read(0, 0, 512).unwrap(), (blk::S_OK, vec![9; 512]));
}

/// Outcome: `DEVICE_NEEDS_RESET` with a configuration interrupt; the looping head is
/// returned with length 0; later notifications are ignored; a reset recovers.
#[test]
fn descriptor_loop() {
    let mut driver = ram_driver(64, 512);
    let data = driver.alloc(512, 512).unwrap();
    driver
        .write_descriptor(0, 0, Descriptor::new(data, 512, ring::DESC_F_NEXT, 1))
        .unwrap();
    driver
        .write_descriptor(0, 1, Descriptor::new(data, 512, ring::DESC_F_NEXT, 0))
        .unwrap();
    driver.publish(0, 0).unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
    assert_ne!(
        driver.read_reg(mmio::INTERRUPT_STATUS) & mmio::INT_CONFIG,
        0
    );
    assert_eq!(driver.poll_used(0).unwrap(), Some(Used { head: 0, len: 0 }));
    // A stopped device pops nothing more.
    driver.publish(0, 0).unwrap();
    driver.notify(0);
    assert_eq!(driver.poll_used(0).unwrap(), None);
    recovers(&mut driver);
}

/// Outcome: `DEVICE_NEEDS_RESET`, head returned. A direct chain can only exceed the queue
/// by looping (above); through an indirect table, a table larger than the queue and a loop
/// inside a table are both refused.
#[test]
fn chains_longer_than_the_queue() {
    for case in ["table larger than queue", "loop inside table"] {
        let mut driver = driver_with(
            RamDisk::new(64, 512).unwrap(),
            BlockConfig::default(),
            DriverOptions {
                queue_size: Some(4),
                ..Default::default()
            },
        );
        let buf = driver.alloc(512, 512).unwrap();
        let entries: u16 = if case == "loop inside table" { 2 } else { 8 };
        let table = driver.alloc(16 * u64::from(entries), 16).unwrap();
        for i in 0..entries {
            let next = if case == "loop inside table" {
                (i + 1) % 2
            } else {
                i + 1
            };
            driver
                .mem()
                .write_plain(
                    table + 16 * u64::from(i),
                    &Descriptor::new(buf, 512, ring::DESC_F_NEXT, next),
                )
                .unwrap();
        }
        driver
            .write_descriptor(
                0,
                2,
                Descriptor::new(table, 16 * u32::from(entries), ring::DESC_F_INDIRECT, 0),
            )
            .unwrap();
        driver.publish(0, 2).unwrap();
        driver.notify(0);
        assert!(needs_reset(&mut driver), "{case}");
        assert_eq!(
            driver.poll_used(0).unwrap(),
            Some(Used { head: 2, len: 0 }),
            "{case}"
        );
    }
}

/// Outcome: `DEVICE_NEEDS_RESET` and nothing popped: the driver cannot have more than a
/// queue size of buffers outstanding.
#[test]
fn avail_index_jumps_past_the_queue_size() {
    let mut driver = ram_driver(64, 512);
    let size = driver.queue(0).unwrap().size;
    driver.set_avail_idx(0, size + 1).unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
    assert_eq!(driver.poll_used(0).unwrap(), None);
    // Going backwards is a jump of nearly 2^16, just as bad.
    let mut driver = ram_driver(64, 512);
    assert_eq!(driver.write(0, 0, &[1; 512]).unwrap(), blk::S_OK);
    driver.set_avail_idx(0, 0).unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
}

/// Outcomes: a data buffer, a header or an address that overflows outside guest memory is
/// `IOERR` with the disk untouched; a status byte outside is returned with length 0; an
/// indirect table outside is `DEVICE_NEEDS_RESET`; rings outside memory fail activation
/// with `DEVICE_NEEDS_RESET`.
#[test]
fn addresses_outside_guest_memory() {
    let outside = GUEST_BYTES as u64;
    let mut driver = ram_driver(64, 512);
    for (what, addr) in [
        ("past the end", outside - 256),
        ("overflowing", u64::MAX - 100),
    ] {
        // A write whose data is not guest memory changes nothing.
        let h = header(&mut driver, blk::T_OUT, 0);
        let s = status_byte(&mut driver);
        let (used, st) = submit(
            &mut driver,
            &[
                Buffer::readable(h, 16),
                Buffer::readable(addr, 512),
                Buffer::writable(s, 1),
            ],
            s,
        );
        assert_eq!((st, used.len), (blk::S_IOERR, 1), "{what}");
        // A read into it as well.
        let h = header(&mut driver, blk::T_IN, 0);
        let (_, st) = submit(
            &mut driver,
            &[
                Buffer::readable(h, 16),
                Buffer::writable(addr, 512),
                Buffer::writable(s, 1),
            ],
            s,
        );
        assert_eq!(st, blk::S_IOERR, "{what}");
        // The header itself, straddling the end or overflowing.
        let header_at = if addr > outside { addr } else { outside - 8 };
        let (_, st) = submit(
            &mut driver,
            &[Buffer::readable(header_at, 16), Buffer::writable(s, 1)],
            s,
        );
        assert_eq!(st, blk::S_IOERR, "{what}");
    }
    assert_eq!(driver.read(0, 0, 512).unwrap(), (blk::S_OK, vec![0; 512]));
    // The status byte outside: nothing to report into.
    let h = header(&mut driver, blk::T_IN, 0);
    let data = driver.alloc(512, 512).unwrap();
    let head = driver
        .post(
            0,
            &[
                Buffer::readable(h, 16),
                Buffer::writable(data, 512),
                Buffer::writable(outside, 1),
            ],
        )
        .unwrap();
    driver.notify(0);
    assert_eq!(driver.wait_used(0).unwrap(), Used { head, len: 0 });
    // An indirect table outside.
    driver
        .write_descriptor(0, 5, Descriptor::new(outside, 32, ring::DESC_F_INDIRECT, 0))
        .unwrap();
    driver.publish(0, 5).unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
    assert_eq!(driver.poll_used(0).unwrap(), Some(Used { head: 5, len: 0 }));

    // Rings outside guest memory: set up by hand, DRIVER_OK fails activation.
    let device = BlockDevice::new(
        BlockConfig::default(),
        disk_backend::Disk::new(RamDisk::new(64, 512).unwrap()).unwrap(),
    )
    .unwrap();
    let mut driver = Driver::attach(device, memory());
    for s in [status::ACKNOWLEDGE, 3, 3] {
        driver.write_reg(mmio::STATUS, s);
    }
    driver.write_reg(mmio::DRIVER_FEATURES_SEL, 1);
    driver.write_reg(mmio::DRIVER_FEATURES, 1);
    driver.write_reg(mmio::STATUS, 3 | status::FEATURES_OK);
    driver.write_reg(mmio::QUEUE_SEL, 0);
    driver.write_reg(mmio::QUEUE_DESC_HIGH, 0x100);
    driver.write_reg(mmio::QUEUE_READY, 1);
    driver.write_reg(mmio::STATUS, 3 | status::FEATURES_OK | status::DRIVER_OK);
    assert!(needs_reset(&mut driver));
    assert!(!driver.transport().device().is_activated());
    driver.notify(0);
}

/// Outcome: `IOERR`, nothing written. The header in a device-writable descriptor leaves no
/// readable header; a write's data in a device-writable descriptor is data on the wrong side.
#[test]
fn device_writable_where_readable_is_required() {
    let mut driver = ram_driver(64, 512);
    let h = header(&mut driver, blk::T_IN, 0);
    let s = status_byte(&mut driver);
    let data = driver.alloc(512, 512).unwrap();
    let (_, st) = submit(
        &mut driver,
        &[
            Buffer::writable(h, 16),
            Buffer::writable(data, 512),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!(st, blk::S_IOERR);
    let h = header(&mut driver, blk::T_OUT, 0);
    driver.mem().fill_at(data, 0x55, 512).unwrap();
    let (used, st) = submit(
        &mut driver,
        &[
            Buffer::readable(h, 16),
            Buffer::writable(data, 512),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!((st, used.len), (blk::S_IOERR, 1));
    assert_eq!(driver.read(0, 0, 512).unwrap().1, vec![0; 512]);
}

/// Outcomes: a read into device-readable buffers is `IOERR` and leaves them alone; a
/// readable status byte means no status byte (returned with length 0); a readable buffer
/// after a writable one is `IOERR`.
#[test]
fn device_readable_where_writable_is_required() {
    let mut driver = ram_driver(64, 512);
    assert_eq!(driver.write(0, 0, &[7; 512]).unwrap(), blk::S_OK);
    let h = header(&mut driver, blk::T_IN, 0);
    let s = status_byte(&mut driver);
    let data = driver.alloc(512, 512).unwrap();
    let (_, st) = submit(
        &mut driver,
        &[
            Buffer::readable(h, 16),
            Buffer::readable(data, 512),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!(st, blk::S_IOERR);
    assert_eq!(driver.mem().read_plain::<u8>(data).unwrap(), 0);
    let head = driver
        .post(
            0,
            &[
                Buffer::readable(h, 16),
                Buffer::writable(data, 512),
                Buffer::readable(s, 1),
            ],
        )
        .unwrap();
    driver.mem().write_plain(s, &0xffu8).unwrap();
    driver.notify(0);
    assert_eq!(driver.wait_used(0).unwrap(), Used { head, len: 0 });
    assert_eq!(driver.mem().read_plain::<u8>(s).unwrap(), 0xff);
    let (_, st) = submit(
        &mut driver,
        &[
            Buffer::readable(h, 16),
            Buffer::writable(data, 256),
            Buffer::readable(data + 256, 256),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!(st, blk::S_IOERR);
}

/// Outcome: a header of fewer than 16 readable bytes is `IOERR`; 16 bytes split over two
/// descriptors are fine (virtio 1.x has no framing rule).
#[test]
fn headers_shorter_than_16_bytes() {
    let mut driver = ram_driver(64, 512);
    let h = header(&mut driver, blk::T_FLUSH, 0);
    let s = status_byte(&mut driver);
    for len in [0, 1, 8, 15] {
        let mut buffers = Vec::new();
        if len > 0 {
            buffers.push(Buffer::readable(h, len));
        }
        buffers.push(Buffer::writable(s, 1));
        let (_, st) = submit(&mut driver, &buffers, s);
        assert_eq!(st, blk::S_IOERR, "{len}-byte header");
    }
    let (_, st) = submit(
        &mut driver,
        &[
            Buffer::readable(h, 10),
            Buffer::readable(h + 10, 6),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!(st, blk::S_OK);
}

/// Outcome: returned with length 0 and nothing written: a chain without a device-writable
/// last byte has nowhere to put a status.
#[test]
fn missing_status_byte() {
    let mut driver = ram_driver(64, 512);
    let h = header(&mut driver, blk::T_OUT, 0);
    let data = driver.alloc(512, 512).unwrap();
    driver.mem().fill_at(data, 0x77, 512).unwrap();
    for buffers in [
        vec![Buffer::readable(h, 16)],
        vec![Buffer::readable(h, 16), Buffer::readable(data, 512)],
        vec![
            Buffer::readable(h, 16),
            Buffer::readable(data, 512),
            Buffer::writable(data, 0),
        ],
    ] {
        let head = driver.post(0, &buffers).unwrap();
        driver.notify(0);
        assert_eq!(driver.wait_used(0).unwrap(), Used { head, len: 0 });
    }
    assert_eq!(
        driver.read(0, 0, 512).unwrap().1,
        vec![0; 512],
        "no write happened"
    );
    assert!(!needs_reset(&mut driver));
}

/// Outcome: `IOERR` and no change, for reads, writes and every discard and write-zeroes
/// segment position, at the end, straddling it, far past it, misaligned for 4 KiB blocks,
/// and where `sector + count` overflows.
#[test]
fn sector_ranges_past_the_end_or_overflowing() {
    for block in [512u32, 4096] {
        let sectors = 64u64;
        let per = u64::from(block / 512);
        let capacity = sectors * per;
        let mut driver = ram_driver(sectors, block);
        let marker = vec![0x3c; block as usize];
        assert_eq!(driver.write(0, capacity - per, &marker).unwrap(), blk::S_OK);
        let mut bad_starts = vec![capacity, u64::MAX, u64::MAX - per + 1, 1 << 62];
        if per > 1 {
            // Inside the last block but not at its start.
            bad_starts.push(capacity - per / 2);
        }
        for &sector in &bad_starts {
            assert_eq!(
                driver.read(0, sector, block).unwrap().0,
                blk::S_IOERR,
                "read {sector}"
            );
            assert_eq!(
                driver.write(0, sector, &marker).unwrap(),
                blk::S_IOERR,
                "write {sector}"
            );
        }
        // Straddling the end.
        assert_eq!(
            driver.read(0, capacity - per, 2 * block).unwrap().0,
            blk::S_IOERR
        );
        assert_eq!(
            driver
                .write(0, capacity - per, &vec![1; 2 * block as usize])
                .unwrap(),
            blk::S_IOERR
        );
        if block == 4096 {
            assert_eq!(
                driver.read(0, 1, block).unwrap().0,
                blk::S_IOERR,
                "misaligned"
            );
            assert_eq!(
                driver.read(0, 0, 512).unwrap().0,
                blk::S_IOERR,
                "partial block"
            );
        }
        // Every segment position of a three-segment discard or write-zeroes.
        let good = (0u64, per as u32, 0u32);
        let bads = [
            (capacity, per as u32, 0),
            (capacity - per, 2 * per as u32, 0),
            (u64::MAX - per + 1, per as u32, 0),
            (!(per - 1), !(per as u32 - 1), 0),
        ];
        for write_zeroes in [false, true] {
            for bad in bads {
                for position in 0..3 {
                    let mut segments = vec![
                        good,
                        (4 * per, per as u32, 0),
                        (capacity - per, per as u32, 0),
                    ];
                    segments[position] = bad;
                    let st = driver.discard(0, &segments, write_zeroes).unwrap();
                    assert_eq!(st, blk::S_IOERR, "{write_zeroes} {bad:?} at {position}");
                }
            }
        }
        // Nothing was zeroed by the refused write-zeroes.
        assert_eq!(
            driver.read(0, capacity - per, block).unwrap().1,
            marker,
            "block {block}"
        );
        assert!(!needs_reset(&mut driver));
    }
}

/// Outcome: zero-length reads and writes inside the disk succeed without touching it;
/// past the end they are `IOERR`; empty descriptors among the data are skipped.
#[test]
fn zero_length_data() {
    let mut driver = ram_driver(64, 512);
    assert_eq!(driver.read(0, 0, 0).unwrap(), (blk::S_OK, vec![]));
    assert_eq!(driver.read(0, 64, 0).unwrap().0, blk::S_OK);
    assert_eq!(driver.read(0, 65, 0).unwrap().0, blk::S_IOERR);
    assert_eq!(driver.write(0, 64, &[]).unwrap(), blk::S_OK);
    let h = header(&mut driver, blk::T_OUT, 2);
    let s = status_byte(&mut driver);
    let data = driver.alloc(512, 512).unwrap();
    driver.mem().fill_at(data, 0x42, 512).unwrap();
    let (_, st) = submit(
        &mut driver,
        &[
            Buffer::readable(h, 16),
            Buffer::readable(data, 0),
            Buffer::readable(data, 512),
            Buffer::readable(data, 0),
            Buffer::writable(s, 1),
        ],
        s,
    );
    assert_eq!(st, blk::S_OK);
    assert_eq!(driver.read(0, 2, 512).unwrap().1, vec![0x42; 512]);
    // Discard and write-zeroes need at least one segment.
    assert_eq!(driver.discard(0, &[], false).unwrap(), blk::S_IOERR);
    assert_eq!(driver.discard(0, &[], true).unwrap(), blk::S_IOERR);
}

/// Outcome: ignored. Notifications for a queue that does not exist, one the driver never
/// readied, or before `DRIVER_OK` do nothing.
#[test]
fn notify_for_a_missing_or_unready_queue() {
    let device = BlockDevice::new(
        BlockConfig {
            num_queues: 2,
            ..Default::default()
        },
        disk_backend::Disk::new(RamDisk::new(64, 512).unwrap()).unwrap(),
    )
    .unwrap();
    let mut driver = Driver::attach(device, memory());
    driver.notify(0);
    driver
        .probe(&DriverOptions {
            num_queues: Some(1),
            ..Default::default()
        })
        .unwrap();
    for queue in [1, 2, 7, 0xffff, 0x1_0000, u32::MAX] {
        driver.notify(queue);
    }
    assert!(!needs_reset(&mut driver));
    assert_eq!(driver.read(0, 0, 512).unwrap().0, blk::S_OK);
}

/// Outcome: `FEATURES_OK` does not stick (the driver reads it back and gives up), and
/// `DRIVER_OK` cannot follow: accepting a bit never offered, a bit beyond 64, or not
/// accepting `VERSION_1`.
#[test]
fn feature_bits_never_offered() {
    let new = || {
        BlockDevice::new(
            BlockConfig::default(),
            disk_backend::Disk::new(RamDisk::new(64, 512).unwrap().with_read_only(true)).unwrap(),
        )
        .unwrap()
    };
    for (what, options) in [
        (
            "packed ring",
            DriverOptions {
                force_features: 1 << 34,
                ..Default::default()
            },
        ),
        (
            "discard on a read-only disk",
            DriverOptions {
                force_features: features::BLK_DISCARD,
                ..Default::default()
            },
        ),
        (
            "legacy driver",
            DriverOptions {
                features: !features::VERSION_1,
                ..Default::default()
            },
        ),
    ] {
        let mut driver = Driver::attach(new(), memory());
        assert_eq!(
            driver.probe(&options),
            Err(ProbeError::FeaturesRefused),
            "{what}"
        );
        driver.write_reg(mmio::STATUS, 0xf);
        assert_eq!(driver.status() & status::DRIVER_OK, 0, "{what}");
        assert!(!driver.transport().device().is_activated());
    }
    // A non-zero window beyond bit 63.
    let mut driver = Driver::attach(new(), memory());
    driver.write_reg(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    driver.write_reg(mmio::DRIVER_FEATURES_SEL, 1);
    driver.write_reg(mmio::DRIVER_FEATURES, 1);
    driver.write_reg(mmio::DRIVER_FEATURES_SEL, 2);
    driver.write_reg(mmio::DRIVER_FEATURES, 1);
    driver.write_reg(mmio::STATUS, 3 | status::FEATURES_OK);
    assert_eq!(driver.status() & status::FEATURES_OK, 0);
}

/// Outcome: `UNSUPP` for every type the device does not implement, and for `FLUSH`,
/// `DISCARD` and `WRITE_ZEROES` when their feature was not negotiated.
#[test]
fn unknown_or_unnegotiated_request_types() {
    let mut driver = ram_driver(64, 512);
    for t in [
        2,
        3,
        5,
        blk::T_GET_LIFETIME,
        blk::T_SECURE_ERASE,
        15,
        99,
        u32::MAX,
    ] {
        let response = driver.block_request(0, t, 0, &[], 0).unwrap();
        assert_eq!(response.status, blk::S_UNSUPP, "type {t}");
    }
    let mut driver = driver_with(
        RamDisk::new(64, 512).unwrap(),
        BlockConfig::default(),
        DriverOptions {
            features: !(features::BLK_FLUSH | features::BLK_DISCARD | features::BLK_WRITE_ZEROES),
            ..Default::default()
        },
    );
    assert_eq!(driver.flush(0).unwrap(), blk::S_UNSUPP);
    assert_eq!(
        driver.discard(0, &[(0, 1, 0)], false).unwrap(),
        blk::S_UNSUPP
    );
    assert_eq!(
        driver.discard(0, &[(0, 1, 0)], true).unwrap(),
        blk::S_UNSUPP
    );
}

/// Outcomes: discard with the unmap flag or a reserved flag, and write-zeroes with a
/// reserved flag, are `UNSUPP`; ragged segment lists, more segments than advertised and
/// more sectors than advertised are `IOERR`.
#[test]
fn discard_and_write_zeroes_limits() {
    let mut driver = ram_driver(1 << 20, 512);
    assert_eq!(
        driver.discard(0, &[(0, 8, 1)], false).unwrap(),
        blk::S_UNSUPP
    );
    assert_eq!(
        driver.discard(0, &[(0, 8, 4)], false).unwrap(),
        blk::S_UNSUPP
    );
    assert_eq!(
        driver.discard(0, &[(0, 8, 2)], true).unwrap(),
        blk::S_UNSUPP
    );
    let many = vec![(0, 8, 0); 65];
    assert_eq!(driver.discard(0, &many, false).unwrap(), blk::S_IOERR);
    assert_eq!(driver.discard(0, &many, true).unwrap(), blk::S_IOERR);
    assert_eq!(driver.discard(0, &many[..64], true).unwrap(), blk::S_OK);
    assert_eq!(
        driver.discard(0, &[(0, (1 << 16) + 1, 0)], true).unwrap(),
        blk::S_IOERR
    );
    assert_eq!(
        driver.discard(0, &[(0, 1 << 16, 0)], true).unwrap(),
        blk::S_OK
    );
    let ragged = driver
        .block_request(0, blk::T_DISCARD, 0, &[0; 17], 0)
        .unwrap();
    assert_eq!(ragged.status, blk::S_IOERR);
}

/// Outcome: a driver that republishes a head it has not got back cannot make the device
/// hold more than a queue size of requests; every published entry is returned once the
/// disk lets them finish.
#[test]
fn republished_heads_do_not_grow_the_requests_in_flight() {
    let gate = GateDisk::new(RamDisk::new(64, 512).unwrap(), 0);
    let mut driver = driver_with(
        gate.clone(),
        BlockConfig::default(),
        DriverOptions {
            queue_size: Some(4),
            // Without EVENT_IDX every completion interrupts, which the wait below relies on
            // (this driver never moves used_event).
            features: !features::RING_EVENT_IDX,
            ..Default::default()
        },
    );
    let pending = driver.post_block(0, blk::T_IN, 0, &[], 512, false).unwrap();
    for _ in 0..3 {
        driver.publish(0, pending.head).unwrap();
    }
    driver.notify(0);
    while gate.waiting.load(Ordering::SeqCst) < 4 {
        std::thread::yield_now();
    }
    for _ in 0..2 {
        driver.publish(0, pending.head).unwrap();
    }
    driver.notify(0);
    assert_eq!(
        gate.reads.load(Ordering::SeqCst),
        4,
        "no more than the queue size in flight"
    );
    gate.release();
    let used_ring = driver.queue(0).unwrap().used;
    loop {
        let seen = driver.interrupts().count();
        let used_idx: zerocopy::little_endian::U16 =
            driver.mem().read_plain(used_ring + 2).unwrap();
        if used_idx.get() == 6 {
            break;
        }
        assert!(driver.interrupts().wait_past(seen), "all six returned");
    }
    assert_eq!(gate.reads.load(Ordering::SeqCst), 6);
    assert!(!needs_reset(&mut driver));
}

/// Outcome: `DEVICE_NEEDS_RESET`, head returned: an indirect descriptor without the
/// feature, or one that is not alone in its chain.
#[test]
fn indirect_descriptors_where_not_allowed() {
    let mut driver = driver_with(
        RamDisk::new(64, 512).unwrap(),
        BlockConfig::default(),
        DriverOptions {
            features: !features::RING_INDIRECT_DESC,
            ..Default::default()
        },
    );
    let h = header(&mut driver, blk::T_FLUSH, 0);
    let s = status_byte(&mut driver);
    let head = driver
        .post_indirect(0, &[Buffer::readable(h, 16), Buffer::writable(s, 1)])
        .unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
    assert_eq!(driver.poll_used(0).unwrap(), Some(Used { head, len: 0 }));

    let mut driver = ram_driver(64, 512);
    let table = driver.alloc(32, 16).unwrap();
    driver
        .write_descriptor(
            0,
            0,
            Descriptor::new(table, 32, ring::DESC_F_INDIRECT | ring::DESC_F_NEXT, 1),
        )
        .unwrap();
    driver.publish(0, 0).unwrap();
    driver.notify(0);
    assert!(needs_reset(&mut driver));
    assert_eq!(driver.poll_used(0).unwrap(), Some(Used { head: 0, len: 0 }));
}

/// Outcome: dropped. Writes to read-only fields, before or after `DRIVER_OK`, change
/// nothing; the one writable field (`writeback`) takes one-byte writes at any time.
#[test]
fn configuration_writes() {
    let mut driver = ram_driver(64, 512);
    driver.transport_mut().write(mmio::CONFIG, &[0xff; 8]);
    assert_eq!(
        driver.capacity(),
        64,
        "capacity is read-only after DRIVER_OK"
    );
    driver.transport_mut().write(mmio::CONFIG + 0x20, &[0]);
    let mut wce = [0u8];
    driver.read_config(0x20, &mut wce);
    assert_eq!(wce[0], 0, "the cache mode can change after DRIVER_OK");
    let device = BlockDevice::new(
        BlockConfig::default(),
        disk_backend::Disk::new(RamDisk::new(64, 512).unwrap()).unwrap(),
    )
    .unwrap();
    let mut driver = Driver::attach(device, memory());
    driver.transport_mut().write(mmio::CONFIG, &[0xff; 8]);
    driver.transport_mut().write(mmio::CONFIG + 0x20, &[0, 0]);
    assert_eq!(driver.capacity(), 64);
    driver.read_config(0x20, &mut wce);
    assert_eq!(
        wce[0], 1,
        "a two-byte write is not a write of the one-byte field"
    );
    driver.transport_mut().write(mmio::CONFIG + 0x20, &[0]);
    driver.read_config(0x20, &mut wce);
    assert_eq!(
        wce[0], 0,
        "before DRIVER_OK the driver picks the cache mode"
    );
    // Reads past the end of the configuration space are zeros.
    let mut far = [0xaa; 8];
    driver.transport_mut().read(mmio::CONFIG + 0x1000, &mut far);
    assert_eq!(far, [0; 8]);
}

/// Outcome: ignored. Registers take aligned 32-bit accesses only; a queue size that is not
/// a power of two never becomes ready; a status write that clears bits is ignored, and so
/// is `DRIVER_OK` without `FEATURES_OK`.
#[test]
fn register_protocol_violations() {
    let device = BlockDevice::new(
        BlockConfig::default(),
        disk_backend::Disk::new(RamDisk::new(64, 512).unwrap()).unwrap(),
    )
    .unwrap();
    let mut driver = Driver::attach(device, memory());
    let mut half = [0xaa; 2];
    driver.transport_mut().read(mmio::MAGIC_VALUE, &mut half);
    assert_eq!(half, [0, 0]);
    assert_eq!(driver.read_reg(mmio::MAGIC_VALUE + 2), 0);
    driver.transport_mut().write(mmio::STATUS, &[1, 0]);
    assert_eq!(driver.status(), 0);
    driver.write_reg(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    driver.write_reg(mmio::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        driver.status(),
        status::ACKNOWLEDGE | status::DRIVER,
        "bits are never cleared"
    );
    driver.write_reg(mmio::STATUS, 3 | status::DRIVER_OK);
    assert_eq!(
        driver.status() & status::DRIVER_OK,
        0,
        "DRIVER_OK needs FEATURES_OK"
    );
    driver.write_reg(mmio::QUEUE_SEL, 0);
    for size in [0, 3, 100, 512, 0x1_0000] {
        driver.write_reg(mmio::QUEUE_NUM, size);
        driver.write_reg(mmio::QUEUE_READY, 1);
        assert_eq!(driver.read_reg(mmio::QUEUE_READY), 0, "size {size}");
    }
    driver.write_reg(mmio::QUEUE_SEL, 9);
    assert_eq!(driver.read_reg(mmio::QUEUE_NUM_MAX), 0);
    driver.write_reg(mmio::QUEUE_READY, 1);
    assert_eq!(driver.read_reg(mmio::QUEUE_READY), 0);
}
