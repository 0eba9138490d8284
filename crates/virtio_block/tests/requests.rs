//! Every request type through the harness, transport and device, on RAM, file and layered
//! disks with 512-byte and 4 KiB sectors, the synchronous file engine, read-only disks,
//! several queues, resize, out-of-order completion and snapshot/restore.

mod support;

use disk_backend::{Disk, DiskIo};
use disk_file::{FileDisk, FileDiskOptions};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use disk_ram::{RamDisk, RamLayer};
use guestmem::PAGE_SIZE64;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use support::*;
use virtio_block::config::VirtioBlkConfig;
use virtio_block::harness::{Buffer, Driver, DriverOptions};
use virtio_block::spec::{blk, features, mmio, status};
use virtio_block::{BlockConfig, BlockDevice, IrqLine, SyncFileBackend, VirtioDevice};
use zerocopy::FromBytes;

fn config_space(driver: &mut Driver<BlockDevice>) -> VirtioBlkConfig {
    let mut bytes = [0u8; 60];
    driver.read_config(0, &mut bytes);
    VirtioBlkConfig::read_from_bytes(&bytes).unwrap()
}

/// Reads, writes (direct and indirect chains, scattered buffers), flush, GET_ID,
/// write-zeroes and discard, checked against what was written. `block` is the disk's
/// sector size; sectors in requests are virtio's 512-byte units.
fn exercise(driver: &mut Driver<BlockDevice>, block: u32) {
    let per_block = u64::from(block / 512);
    // Plain round trips of 4 KiB and 64 KiB at a few places.
    for (sector, len, seed) in [
        (0, 4096, 1),
        (8 * per_block, 65536, 2),
        (200 * per_block, 4096, 3),
    ] {
        let data = pattern(len, seed);
        assert_eq!(driver.write(0, sector, &data).unwrap(), blk::S_OK);
        let (status, back) = driver.read(0, sector, len as u32).unwrap();
        assert_eq!(status, blk::S_OK);
        assert_eq!(back, data, "sector {sector} len {len}");
    }
    // One block, if blocks are small.
    if block == 512 {
        let data = pattern(512, 9);
        assert_eq!(driver.write(0, 3, &data).unwrap(), blk::S_OK);
        assert_eq!(driver.read(0, 3, 512).unwrap(), (blk::S_OK, data));
    }
    // An indirect chain with the data spread over three descriptors.
    let data = pattern(3 * 4096, 4);
    let header = driver.alloc(16, 16).unwrap();
    let bufs: Vec<u64> = (0..3)
        .map(|_| driver.alloc(4096, PAGE_SIZE64).unwrap())
        .collect();
    let status_at = driver.alloc(1, 1).unwrap();
    let mem = driver.mem().clone();
    mem.write_plain(
        header,
        &virtio_block::config::RequestHeader {
            request_type: blk::T_OUT.into(),
            reserved: 0.into(),
            sector: (16 * per_block).into(),
        },
    )
    .unwrap();
    let mut chain = vec![Buffer::readable(header, 16)];
    for (i, &b) in bufs.iter().enumerate() {
        mem.write_at(b, &data[i * 4096..(i + 1) * 4096]).unwrap();
        chain.push(Buffer::readable(b, 4096));
    }
    chain.push(Buffer::writable(status_at, 1));
    let head = driver.post_indirect(0, &chain).unwrap();
    driver.kick(0).unwrap();
    let used = driver.wait_used(0).unwrap();
    assert_eq!(used.head, head);
    assert_eq!(used.len, 1);
    assert_eq!(mem.read_plain::<u8>(status_at).unwrap(), blk::S_OK);
    driver.free_all();
    assert_eq!(
        driver.read(0, 16 * per_block, 3 * 4096).unwrap(),
        (blk::S_OK, data)
    );

    // A read's used length counts the data and the status byte.
    let response = driver.block_request(0, blk::T_IN, 0, &[], 4096).unwrap();
    assert_eq!(response.used_len, 4097);

    assert_eq!(driver.flush(0).unwrap(), blk::S_OK);
    let (status, id) = driver.get_id(0).unwrap();
    assert_eq!(status, blk::S_OK);
    assert_eq!(id.len(), blk::ID_BYTES);

    // Write-zeroes without and with unmap, across two segments.
    let negotiated = driver.features();
    if negotiated & features::BLK_WRITE_ZEROES != 0 {
        let s = 8 * per_block;
        let n = 2 * per_block as u32;
        let status = driver
            .discard(
                0,
                &[
                    (s, n, 0),
                    (s + 4 * per_block, n, blk::WRITE_ZEROES_FLAG_UNMAP),
                ],
                true,
            )
            .unwrap();
        assert_eq!(status, blk::S_OK);
        let (_, back) = driver.read(0, s, 8 * block).unwrap();
        let mut expected = pattern(65536, 2)[..8 * block as usize].to_vec();
        expected[..2 * block as usize].fill(0);
        expected[4 * block as usize..6 * block as usize].fill(0);
        assert_eq!(back, expected);
    }
    if negotiated & features::BLK_DISCARD != 0 {
        let status = driver
            .discard(0, &[(200 * per_block, per_block as u32, 0)], false)
            .unwrap();
        assert_eq!(status, blk::S_OK);
    }
    assert_eq!(driver.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn ram_disk_512() {
    exercise(&mut ram_driver(4096, 512), 512);
}

#[test]
fn ram_disk_4k() {
    exercise(&mut ram_driver(1024, 4096), 4096);
}

fn temp_file(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

fn file_disk(file: &tempfile::NamedTempFile, sector_size: u32) -> FileDisk {
    FileDisk::open(
        file.path(),
        &FileDiskOptions {
            sector_size,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn file_disk_512() {
    let file = temp_file(4 << 20);
    exercise(
        &mut driver_for(file_disk(&file, 512), BlockConfig::default()),
        512,
    );
}

#[test]
fn file_disk_4k() {
    let file = temp_file(4 << 20);
    exercise(
        &mut driver_for(file_disk(&file, 4096), BlockConfig::default()),
        4096,
    );
}

#[test]
fn layered_ram_over_file() {
    for sector_size in [512, 4096] {
        let file = temp_file(4 << 20);
        let lower = Disk::new(file_disk(&file, sector_size)).unwrap();
        let disk = LayeredDisk::new(
            false,
            vec![
                LayerConfiguration::new(DiskLayer::new(RamLayer::lazy())),
                LayerConfiguration::new(DiskLayer::new(disk_layered::DiskAsLayer::new(lower))),
            ],
        )
        .unwrap();
        exercise(&mut driver_for(disk, BlockConfig::default()), sector_size);
    }
}

#[test]
fn sync_file_backend() {
    for block in [512, 4096] {
        let file = temp_file(4 << 20);
        let backend = Arc::new(
            SyncFileBackend::open(file.path(), false)
                .unwrap()
                .with_block_size(block),
        );
        let device = BlockDevice::new(BlockConfig::default(), backend).unwrap();
        assert_eq!(
            device.avail_features() & features::BLK_DISCARD,
            0,
            "no unmap: no discard"
        );
        let mut driver = Driver::new(device, memory(), DriverOptions::default()).unwrap();
        assert_eq!(driver.capacity(), (4 << 20) / 512);
        exercise(&mut driver, block);
        // The data is in the file itself.
        let mut contents = Vec::new();
        std::fs::File::open(file.path())
            .unwrap()
            .read_to_end(&mut contents)
            .unwrap();
        assert_eq!(&contents[..1024], &pattern(4096, 1)[..1024]);
    }
}

#[test]
fn seg_max_can_be_lowered_but_not_past_the_queue() {
    let mut driver = driver_for(
        RamDisk::new(1000, 512).unwrap(),
        BlockConfig {
            queue_size: 1024,
            seg_max: Some(126),
            ..Default::default()
        },
    );
    assert_eq!(config_space(&mut driver).seg_max.get(), 126);
    for bad in [0, 127] {
        let disk = Disk::new(RamDisk::new(1000, 512).unwrap()).unwrap();
        let config = BlockConfig {
            queue_size: 128,
            seg_max: Some(bad),
            ..Default::default()
        };
        assert_eq!(
            BlockDevice::new(config, disk).unwrap_err(),
            virtio_block::NewDeviceError::SegMax(bad)
        );
    }
}

#[test]
fn features_and_config_space_are_honest() {
    let disk = RamDisk::new(1000, 4096).unwrap();
    let mut driver = driver_for(
        disk,
        BlockConfig {
            num_queues: 2,
            queue_size: 128,
            ..Default::default()
        },
    );
    let f = driver.features();
    for feature in [
        features::VERSION_1,
        features::RING_INDIRECT_DESC,
        features::RING_EVENT_IDX,
        features::BLK_BLK_SIZE,
        features::BLK_SEG_MAX,
        features::BLK_TOPOLOGY,
        features::BLK_FLUSH,
        features::BLK_CONFIG_WCE,
        features::BLK_MQ,
        features::BLK_DISCARD,
        features::BLK_WRITE_ZEROES,
    ] {
        assert_ne!(f & feature, 0, "feature {feature:#x} offered");
    }
    assert_eq!(f & features::BLK_RO, 0);
    let c = config_space(&mut driver);
    assert_eq!(c.capacity.get(), 8000);
    assert_eq!(c.blk_size.get(), 4096);
    assert_eq!(c.seg_max.get(), 126);
    assert_eq!(c.physical_block_exp, 0);
    assert_eq!(c.min_io_size.get(), 1);
    assert_eq!(c.writeback, 1);
    assert_eq!(c.num_queues.get(), 2);
    assert!(c.max_discard_sectors.get() > 0);
    assert!(c.max_discard_seg.get() > 0);
    assert_eq!(c.discard_sector_alignment.get(), 8, "one 4 KiB block");
    assert!(c.max_write_zeroes_sectors.get() > 0);
    assert!(c.max_write_zeroes_seg.get() > 0);
    assert_eq!(c.write_zeroes_may_unmap, 1, "RAM unmaps to zeros");
    assert_eq!(
        driver.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
}

#[test]
fn read_only_disk() {
    let disk = RamDisk::new(64, 512).unwrap();
    let mut driver = driver_for(disk.with_read_only(true), BlockConfig::default());
    let f = driver.features();
    assert_ne!(f & features::BLK_RO, 0);
    assert_eq!(f & (features::BLK_DISCARD | features::BLK_WRITE_ZEROES), 0);
    assert_eq!(driver.read(0, 0, 4096).unwrap(), (blk::S_OK, vec![0; 4096]));
    assert_eq!(driver.write(0, 0, &[1; 4096]).unwrap(), blk::S_IOERR);
    assert_eq!(driver.read(0, 0, 4096).unwrap().1, vec![0; 4096]);
    assert_eq!(driver.flush(0).unwrap(), blk::S_OK);
    // Not negotiated, so not supported.
    assert_eq!(
        driver.discard(0, &[(0, 1, 0)], false).unwrap(),
        blk::S_UNSUPP
    );
    assert_eq!(
        driver.discard(0, &[(0, 1, 0)], true).unwrap(),
        blk::S_UNSUPP
    );
    // Read-only by configuration over a writable disk.
    let mut driver = driver_for(
        RamDisk::new(64, 512).unwrap(),
        BlockConfig {
            read_only: true,
            ..Default::default()
        },
    );
    assert_ne!(driver.features() & features::BLK_RO, 0);
    assert_eq!(driver.write(0, 0, &[1; 512]).unwrap(), blk::S_IOERR);
}

#[test]
fn multi_queue() {
    let mut driver = driver_for(
        RamDisk::new(4096, 512).unwrap(),
        BlockConfig {
            num_queues: 4,
            ..Default::default()
        },
    );
    for queue in 0..4u16 {
        let data = pattern(8192, queue as u8);
        assert_eq!(
            driver.write(queue, u64::from(queue) * 64, &data).unwrap(),
            blk::S_OK
        );
    }
    // Each queue reads what another wrote.
    for queue in 0..4u16 {
        let from = (queue + 1) % 4;
        let (status, data) = driver.read(queue, u64::from(from) * 64, 8192).unwrap();
        assert_eq!(status, blk::S_OK);
        assert_eq!(data, pattern(8192, from as u8));
    }
    // Requests in flight on all queues at once.
    let mut pending = Vec::new();
    for queue in 0..4u16 {
        pending.push((
            queue,
            driver
                .post_block(queue, blk::T_IN, u64::from(queue) * 64, &[], 8192, false)
                .unwrap(),
        ));
    }
    for queue in 0..4u16 {
        driver.kick(queue).unwrap();
    }
    for (queue, p) in pending {
        let used = driver.wait_used(queue).unwrap();
        assert_eq!(used.head, p.head);
        let response = driver.finish_block(&p, used).unwrap();
        assert_eq!(response.data, pattern(8192, queue as u8));
    }
}

#[test]
fn resize_raises_a_config_interrupt() {
    let disk = Arc::new(RamDisk::new(64, 512).unwrap());
    let mut driver = driver_for(disk.clone(), BlockConfig::default());
    assert_eq!(driver.capacity(), 64);
    let generation = driver.read_reg(mmio::CONFIG_GENERATION);
    assert_eq!(driver.read(0, 64, 512).unwrap().0, blk::S_IOERR);
    let seen = driver.interrupts().count();
    disk.resize(128).unwrap();
    assert!(driver.interrupts().wait_past(seen), "config interrupt");
    assert_ne!(
        driver.read_reg(mmio::INTERRUPT_STATUS) & mmio::INT_CONFIG,
        0
    );
    driver.write_reg(mmio::INTERRUPT_ACK, mmio::INT_CONFIG);
    assert_eq!(driver.capacity(), 128);
    assert_ne!(driver.read_reg(mmio::CONFIG_GENERATION), generation);
    assert_eq!(driver.write(0, 64, &[5; 512]).unwrap(), blk::S_OK);
    assert_eq!(driver.read(0, 64, 512).unwrap(), (blk::S_OK, vec![5; 512]));
    // Shrinking is announced the same way, and the lost sectors are out of range.
    let seen = driver.interrupts().count();
    disk.resize(32).unwrap();
    assert!(driver.interrupts().wait_past(seen));
    assert_eq!(driver.capacity(), 32);
    assert_eq!(driver.read(0, 32, 512).unwrap().0, blk::S_IOERR);
}

#[test]
fn requests_complete_out_of_order_without_blocking_the_doorbell() {
    let gate = GateDisk::new(RamDisk::new(256, 512).unwrap(), 0);
    let mut driver = driver_for(gate.clone(), BlockConfig::default());
    assert_eq!(driver.write(0, 8, &pattern(4096, 7)).unwrap(), blk::S_OK);
    let slow = driver
        .post_block(0, blk::T_IN, 0, &[], 4096, false)
        .unwrap();
    let fast = driver
        .post_block(0, blk::T_IN, 8, &[], 4096, false)
        .unwrap();
    // The doorbell returns although the first request cannot finish.
    driver.kick(0).unwrap();
    let used = driver.wait_used(0).unwrap();
    assert_eq!(used.head, fast.head, "the later request completes first");
    assert_eq!(
        driver.finish_block(&fast, used).unwrap().data,
        pattern(4096, 7)
    );
    assert_eq!(
        gate.waiting.load(Ordering::SeqCst),
        1,
        "the first is still in flight"
    );
    assert!(driver.poll_used(0).unwrap().is_none());
    gate.release();
    let used = driver.wait_used(0).unwrap();
    assert_eq!(used.head, slow.head);
    assert_eq!(driver.finish_block(&slow, used).unwrap().status, blk::S_OK);
}

#[test]
fn many_requests_in_flight() {
    let gate = GateDisk::new(RamDisk::new(4096, 512).unwrap(), 0);
    let mut driver = driver_for(gate.clone(), BlockConfig::default());
    for i in 0..60u64 {
        assert_eq!(
            driver.write(0, 8 + i * 8, &pattern(4096, i as u8)).unwrap(),
            blk::S_OK
        );
    }
    // 60 reads plus one held at the gate: all in flight together, completed as they finish.
    let held = driver.post_block(0, blk::T_IN, 0, &[], 512, false).unwrap();
    let pending: Vec<_> = (0..60u64)
        .map(|i| {
            (
                i,
                driver
                    .post_block(0, blk::T_IN, 8 + i * 8, &[], 4096, true)
                    .unwrap(),
            )
        })
        .collect();
    driver.kick(0).unwrap();
    for _ in 0..60 {
        let used = driver.wait_used(0).unwrap();
        let (i, p) = pending.iter().find(|(_, p)| p.head == used.head).unwrap();
        assert_eq!(
            driver.finish_block(p, used).unwrap().data,
            pattern(4096, *i as u8)
        );
    }
    gate.release();
    assert_eq!(driver.wait_used(0).unwrap().head, held.head);
}

/// Counts flushes and FUA writes that reach the disk.
#[derive(Default)]
struct Durability {
    flushes: std::sync::atomic::AtomicUsize,
    fua_writes: std::sync::atomic::AtomicUsize,
}

struct CountingDisk {
    inner: RamDisk,
    counts: Arc<Durability>,
    fua: bool,
}

impl DiskIo for CountingDisk {
    fn disk_type(&self) -> &str {
        "counting"
    }
    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        Some([0xab; 16])
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn is_fua_respected(&self) -> bool {
        self.fua
    }
    fn is_read_only(&self) -> bool {
        false
    }
    async fn read_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), disk_backend::DiskError> {
        self.inner.read_vectored(buffers, sector).await
    }
    async fn write_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), disk_backend::DiskError> {
        if fua {
            self.counts.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_vectored(buffers, sector, fua).await
    }
    async fn sync_cache(&self) -> Result<(), disk_backend::DiskError> {
        self.counts.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn unmap(&self, sector: u64, count: u64, b: bool) -> Result<(), disk_backend::DiskError> {
        self.inner.unmap(sector, count, b).await
    }
    fn unmap_behavior(&self) -> disk_backend::UnmapBehavior {
        disk_backend::UnmapBehavior::Unspecified
    }
}

#[test]
fn cache_modes_decide_durability() {
    for (writeback, fua) in [(true, true), (false, true), (false, false)] {
        let counts = Arc::new(Durability::default());
        let disk = CountingDisk {
            inner: RamDisk::new(64, 512).unwrap(),
            counts: counts.clone(),
            fua,
        };
        let mut driver = driver_with(
            disk,
            BlockConfig::default(),
            DriverOptions {
                writeback: Some(writeback),
                ..Default::default()
            },
        );
        let mut c = [0u8; 1];
        driver.read_config(0x20, &mut c);
        assert_eq!(c[0], u8::from(writeback));
        assert_eq!(driver.write(0, 0, &[1; 512]).unwrap(), blk::S_OK);
        let (fua_writes, flushes) = (
            counts.fua_writes.load(Ordering::SeqCst),
            counts.flushes.load(Ordering::SeqCst),
        );
        match (writeback, fua) {
            (true, _) => assert_eq!((fua_writes, flushes), (0, 0), "writeback: cached"),
            (false, true) => assert_eq!((fua_writes, flushes), (1, 0), "writethrough: FUA"),
            (false, false) => assert_eq!(flushes, 1, "writethrough without FUA: flush"),
        }
        // The id comes from the disk id, as hex; the topology from the physical sector size.
        let (_, id) = driver.get_id(0).unwrap();
        assert_eq!(&id, b"abababababababababab");
        let mut exp = [0u8; 1];
        driver.read_config(0x18, &mut exp);
        assert_eq!(exp[0], 3, "4 KiB physical over 512-byte logical");
        // DISCARD is offered (Unspecified), but write-zeroes may not unmap.
        let mut may_unmap = [0u8; 1];
        driver.read_config(0x38, &mut may_unmap);
        assert_eq!(may_unmap[0], 0);
    }
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut driver = ram_driver(64, 512);
    assert_ne!(driver.features() & features::RING_EVENT_IDX, 0);
    let (avail, size) = {
        let q = driver.queue(0).unwrap();
        (q.avail, q.size)
    };
    let mem = driver.mem().clone();
    // The driver asks to hear only when the used index passes 3 (used_event = 3).
    mem.write_plain(
        avail + 4 + 2 * u64::from(size),
        &zerocopy::little_endian::U16::new(3),
    )
    .unwrap();
    let before = driver.interrupts().count();
    let mut pending = Vec::new();
    for i in 0..5u64 {
        pending.push(driver.post_block(0, blk::T_IN, i, &[], 512, false).unwrap());
        driver.kick(0).unwrap();
        let used_idx = mem
            .read_plain::<zerocopy::little_endian::U16>(driver.queue(0).unwrap().used + 2)
            .unwrap()
            .get();
        assert_eq!(used_idx, i as u16 + 1, "completed inline");
        let interrupts = driver.interrupts().count() - before;
        // Moving the used index from 3 to 4 crosses used_event: the one interrupt.
        assert_eq!(interrupts, u64::from(i >= 3), "after request {i}");
    }
    for p in pending {
        let used = driver.poll_used(0).unwrap().unwrap();
        assert_eq!(used.head, p.head);
    }
}

#[test]
fn one_interrupt_per_batch_of_completions() {
    // Without EVENT_IDX the driver wants an interrupt for every completion it has not seen;
    // requests popped on one doorbell and completed at once still raise only one between
    // them, after the last.
    let mut driver = driver_with(
        RamDisk::new(64, 512).unwrap(),
        BlockConfig::default(),
        DriverOptions {
            features: !features::RING_EVENT_IDX,
            ..Default::default()
        },
    );
    let before = driver.interrupts().count();
    let pending: Vec<_> = (0..8u64)
        .map(|i| driver.post_block(0, blk::T_IN, i, &[], 512, false).unwrap())
        .collect();
    driver.kick(0).unwrap();
    assert_eq!(driver.interrupts().count() - before, 1);
    for p in pending {
        let used = driver.poll_used(0).unwrap().unwrap();
        assert_eq!(used.head, p.head);
        assert_eq!(driver.finish_block(&p, used).unwrap().status, blk::S_OK);
    }
}

#[test]
fn works_without_event_idx_or_indirect() {
    let mut driver = driver_with(
        RamDisk::new(256, 512).unwrap(),
        BlockConfig::default(),
        DriverOptions {
            features: !(features::RING_EVENT_IDX | features::RING_INDIRECT_DESC),
            ..Default::default()
        },
    );
    assert_eq!(driver.features() & features::RING_EVENT_IDX, 0);
    for i in 0..300u64 {
        // More requests than the queue size, so the indices wrap the ring.
        let data = pattern(512, i as u8);
        assert_eq!(driver.write(0, i % 256, &data).unwrap(), blk::S_OK);
        assert_eq!(driver.read(0, i % 256, 512).unwrap(), (blk::S_OK, data));
    }
}

#[test]
fn snapshot_and_restore_resume_the_queues() {
    let disk = Disk::new(RamDisk::new(256, 512).unwrap()).unwrap();
    let device = BlockDevice::new(BlockConfig::default(), disk.clone()).unwrap();
    let mut driver = Driver::new(device, memory(), DriverOptions::default()).unwrap();
    for i in 0..5u64 {
        assert_eq!(
            driver.write(0, i * 8, &pattern(4096, i as u8)).unwrap(),
            blk::S_OK
        );
    }
    // A request posted but not kicked is picked up after the restore.
    let pending = driver
        .post_block(0, blk::T_IN, 8, &[], 4096, false)
        .unwrap();
    let state = driver.save();
    assert_eq!(state.queue_states[0].next_avail, 5);
    assert_eq!(state.queue_states[0].next_used, 5);
    assert!(!driver.transport().device().is_activated());
    let fresh = BlockDevice::new(BlockConfig::default(), disk).unwrap();
    driver.restore(fresh, &state).unwrap();
    let used = driver.wait_used(0).unwrap();
    assert_eq!(used.head, pending.head);
    assert_eq!(
        driver.finish_block(&pending, used).unwrap().data,
        pattern(4096, 1)
    );
    for i in 0..5u64 {
        assert_eq!(
            driver.read(0, i * 8, 4096).unwrap(),
            (blk::S_OK, pattern(4096, i as u8))
        );
    }
    assert_eq!(driver.status() & status::DRIVER_OK, status::DRIVER_OK);
}

/// Linux switches the cache mode at run time (`cache_type` in sysfs writes the `writeback`
/// field with the device live): the switch takes effect for the next write either way.
#[test]
fn cache_mode_switches_after_driver_ok() {
    let counts = Arc::new(Durability::default());
    let disk = CountingDisk {
        inner: RamDisk::new(64, 512).unwrap(),
        counts: counts.clone(),
        fua: true,
    };
    let mut driver = driver_for(disk, BlockConfig::default());
    assert_eq!(driver.status() & status::DRIVER_OK, status::DRIVER_OK);
    let fua_writes = || counts.fua_writes.load(Ordering::SeqCst);
    assert_eq!(driver.write(0, 0, &[1; 512]).unwrap(), blk::S_OK);
    assert_eq!(fua_writes(), 0, "writeback: no FUA");
    for (writeback, expected_fua) in [(false, 1), (true, 1), (false, 2)] {
        driver.transport_mut().write(
            mmio::CONFIG + VirtioBlkConfig::WRITEBACK_OFFSET,
            &[u8::from(writeback)],
        );
        let mut c = [0u8; 1];
        driver.read_config(VirtioBlkConfig::WRITEBACK_OFFSET, &mut c);
        assert_eq!(c[0], u8::from(writeback), "the field reads back");
        assert_eq!(driver.write(0, 0, &[2; 512]).unwrap(), blk::S_OK);
        assert_eq!(fua_writes(), expected_fua, "writeback {writeback}");
    }
}

/// Save in one device, restore into a fresh one: the cache mode the driver chose and the
/// configuration generation (moved by a resize) survive, so a driver that read the
/// generation before the snapshot does not see it go back.
#[test]
fn snapshot_keeps_cache_mode_and_config_generation() {
    let disk = Arc::new(RamDisk::new(64, 512).unwrap());
    let mut driver = driver_with(
        disk.clone(),
        BlockConfig::default(),
        DriverOptions {
            writeback: Some(false),
            ..Default::default()
        },
    );
    let seen = driver.interrupts().count();
    disk.resize(128).unwrap();
    assert!(driver.interrupts().wait_past(seen), "config interrupt");
    let generation = driver.read_reg(mmio::CONFIG_GENERATION);
    assert_ne!(generation, 0);
    // The state crosses a serialised form, as it would to another process.
    let json = serde_json::to_string(&driver.save()).unwrap();
    let state: virtio_block::MmioState = serde_json::from_str(&json).unwrap();
    assert_eq!(state.version, virtio_block::MmioState::VERSION);
    let fresh = BlockDevice::new(BlockConfig::default(), Disk::new(disk.clone()).unwrap()).unwrap();
    driver.restore(fresh, &state).unwrap();
    let mut c = [0u8; 1];
    driver.read_config(VirtioBlkConfig::WRITEBACK_OFFSET, &mut c);
    assert_eq!(c[0], 0, "writethrough survives the restore");
    assert_eq!(driver.read_reg(mmio::CONFIG_GENERATION), generation);
    assert_eq!(driver.capacity(), 128);

    // A disk resized while the snapshot was stored: the restored device announces it with a
    // generation past the saved one.
    let state = driver.save();
    disk.resize(256).unwrap();
    let fresh = BlockDevice::new(BlockConfig::default(), Disk::new(disk.clone()).unwrap()).unwrap();
    driver.restore(fresh, &state).unwrap();
    assert_ne!(
        driver.read_reg(mmio::INTERRUPT_STATUS) & mmio::INT_CONFIG,
        0
    );
    assert_ne!(driver.read_reg(mmio::CONFIG_GENERATION), generation);
    assert_eq!(driver.capacity(), 256);

    // A format version this build does not know is refused.
    let mut future = driver.save();
    future.version += 1;
    let fresh = BlockDevice::new(BlockConfig::default(), Disk::new(disk.clone()).unwrap()).unwrap();
    assert!(matches!(
        driver.restore(fresh, &future),
        Err(virtio_block::RestoreError::Version { .. })
    ));
}

#[test]
fn snapshot_waits_for_requests_in_flight() {
    let gate = GateDisk::new(RamDisk::new(64, 512).unwrap(), 0);
    let mut driver = driver_for(gate.clone(), BlockConfig::default());
    let held = driver.post_block(0, blk::T_IN, 0, &[], 512, false).unwrap();
    driver.kick(0).unwrap();
    let releaser = std::thread::spawn({
        let gate = gate.clone();
        move || {
            while gate.waiting.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            gate.release();
        }
    });
    let state = driver.save();
    releaser.join().unwrap();
    // The request completed before save returned, and the indices say so.
    assert_eq!(state.queue_states[0].next_used, 1);
    assert_eq!(driver.poll_used(0).unwrap().unwrap().head, held.head);
}

#[test]
fn eventfd_line_writes_the_counter() {
    let (mut reader, writer) = std::io::pipe().unwrap();
    let line = IrqLine::eventfd(writer.into()).unwrap();
    line.raise();
    let mut value = [0u8; 8];
    reader.read_exact(&mut value).unwrap();
    assert_eq!(u64::from_ne_bytes(value), 1);
}

/// A line over a pipe nobody reads (blocking, as passed) never blocks the raising thread:
/// once the pipe is full the writes fail and are dropped.
#[test]
fn an_eventfd_line_never_blocks_on_a_full_pipe() {
    let (reader, writer) = std::io::pipe().unwrap();
    let line = IrqLine::eventfd(writer.into()).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Far more than a pipe holds (64 KiB by default: 8192 raises).
        for _ in 0..100_000 {
            line.raise();
        }
        let _ = done.send(());
    });
    // A deadline far beyond what the raises take, so that blocking fails the test.
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .is_ok()
    );
    drop(reader);
}

#[test]
fn reset_and_probe_again() {
    let mut driver = ram_driver(64, 512);
    assert_eq!(driver.write(0, 0, &[3; 512]).unwrap(), blk::S_OK);
    driver.write_reg(mmio::STATUS, 0);
    assert_eq!(driver.status(), 0);
    assert!(!driver.transport().device().is_activated());
    driver.probe(&DriverOptions::default()).unwrap();
    assert_eq!(driver.read(0, 0, 512).unwrap(), (blk::S_OK, vec![3; 512]));
}

/// Activation announces the guest memory to the disk (`DiskIo::register_memory`), a reset
/// takes it back (an empty memory), and a disk that refuses it still serves requests.
#[test]
fn activation_announces_guest_memory_to_the_disk() {
    for failing in [false, true] {
        let probe = Arc::new(disk_conformance::MemoryProbe::new(256));
        probe.set_failing(failing);
        // The driver resets the device before it sets it up: an empty memory, then the
        // guest's at activation.
        let mut driver = driver_for(probe.clone(), BlockConfig::default());
        assert_eq!(probe.calls(), 2);
        assert!(probe.last_is(driver.mem()));
        let (status, data) = driver.read(0, 8, 4096).unwrap();
        assert_eq!((status, data), (blk::S_OK, vec![0; 4096]));
        driver.write_reg(mmio::STATUS, 0);
        assert_eq!(probe.calls(), 3);
        assert!(probe.last_is(&guestmem::GuestMemory::empty()));
        driver.probe(&DriverOptions::default()).unwrap();
        assert!(probe.last_is(driver.mem()));
    }
}
