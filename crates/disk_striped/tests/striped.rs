//! `StripedDisk` against the conformance suite over RAM and file members, the chunk layout
//! seen from the members, construction errors, metadata folding, unmap merging and error
//! handling with a fault-injecting member.

use disk_backend::{Disk, DiskError, DiskIo, MediumErrorDetails, UnmapBehavior};
use disk_file::{FileDisk, FileDiskOptions};
use disk_ram::RamDisk;
use disk_striped::{NewStripedDiskError, StripedDisk, failed_member};
use futures::FutureExt;
use futures::executor::block_on;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Poll, Waker};

/// Sectors per member so that `members` members of chunks of `chunk_sectors` give at least
/// `sectors` sectors in whole stripes.
fn member_sectors(sectors: u64, members: u64, chunk_sectors: u64) -> u64 {
    sectors.div_ceil(members * chunk_sectors) * chunk_sectors
}

fn ram_striped(
    spec: &disk_conformance::DiskSpec,
    members: u64,
    sector_size: u32,
    chunk_size: u32,
) -> StripedDisk {
    let per_member = member_sectors(
        spec.sector_count,
        members,
        (chunk_size / sector_size) as u64,
    );
    let disks = (0..members)
        .map(|_| {
            Disk::new(
                RamDisk::new(per_member, sector_size)
                    .unwrap()
                    .with_read_only(spec.read_only),
            )
            .unwrap()
        })
        .collect();
    StripedDisk::new(disks, Some(chunk_size), None).unwrap()
}

/// A temporary file of `sectors` sectors as a `FileDisk`; a read-only one holds a pattern.
fn file_member(sectors: u64, sector_size: u32, read_only: bool, salt: u8) -> Disk {
    let mut file = tempfile::tempfile().unwrap();
    if read_only {
        file.write_all(&disk_conformance::pattern(sector_size, 0, sectors, salt))
            .unwrap();
    } else {
        file.set_len(sectors * sector_size as u64).unwrap();
    }
    let options = FileDiskOptions {
        read_only,
        sector_size,
        ..Default::default()
    };
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    Disk::new(FileDisk::open(path, &options).unwrap()).unwrap()
}

fn file_striped(spec: &disk_conformance::DiskSpec, members: u64, chunk_size: u32) -> StripedDisk {
    let per_member = member_sectors(spec.sector_count, members, (chunk_size / 512) as u64);
    let disks = (0..members)
        .map(|i| file_member(per_member, 512, spec.read_only, i as u8))
        .collect();
    StripedDisk::new(disks, Some(chunk_size), None).unwrap()
}

// Small chunks (4 KiB = 8 sectors of 512 bytes) so that the suite's requests of up to 32
// sectors cross several chunks and members.
disk_conformance::conformance_tests!(ram_1_member, |spec| ram_striped(spec, 1, 512, 4096));
disk_conformance::conformance_tests!(ram_2_members, |spec| ram_striped(spec, 2, 512, 4096));
disk_conformance::conformance_tests!(ram_4_members, |spec| ram_striped(spec, 4, 512, 4096));
disk_conformance::conformance_tests!(ram_4_members_4k_sectors, |spec| {
    ram_striped(spec, 4, 4096, 8192)
});
disk_conformance::conformance_tests!(file_1_member, |spec| file_striped(spec, 1, 4096));
disk_conformance::conformance_tests!(file_2_members, |spec| file_striped(spec, 2, 4096));
disk_conformance::conformance_tests!(file_4_members, |spec| file_striped(spec, 4, 2048));

/// The conformance model over random stripe geometries: 1 to 5 members, chunks of 1 to 12
/// sectors (not only powers of two), several seeds.
#[test]
fn random_geometries_pass_the_model() {
    let mut rng = StdRng::seed_from_u64(0x5712);
    for _ in 0..12 {
        let members = rng.random_range(1..=5u64);
        let chunk_sectors = rng.random_range(1..=12u64);
        let seed = rng.random();
        let factory = |spec: &disk_conformance::DiskSpec| {
            ram_striped(spec, members, 512, chunk_sectors as u32 * 512)
        };
        disk_conformance::model_with_seed(&factory, seed);
    }
}

/// Chunk `i` is on member `i % N` at chunk `i / N`, seen by reading the members directly.
#[test]
fn chunks_land_on_the_members_the_layout_says() {
    let (n, chunk_sectors, per_member) = (3u64, 4u64, 16u64);
    let members: Vec<Disk> = (0..n)
        .map(|_| Disk::new(RamDisk::new(per_member, 512).unwrap()).unwrap())
        .collect();
    let disk = Disk::new(StripedDisk::new(members.clone(), Some(2048), None).unwrap()).unwrap();
    let total = n * per_member;
    assert_eq!(disk.sector_count(), total);
    let data = disk_conformance::pattern(512, 0, total, 0x33);
    // Written in one unaligned request and one that straddles chunks, to go through both
    // the single-piece and the split path.
    let first = OwnedRequestBuffers::from_slice(&data[..3 * 512]);
    let rest = OwnedRequestBuffers::scattered(data.len() - 3 * 512, 100);
    rest.copy_from_slice(&data[3 * 512..]);
    block_on(async {
        disk.write_vectored(&first.buffers(false), 0, false)
            .await
            .unwrap();
        disk.write_vectored(&rest.buffers(false), 3, true)
            .await
            .unwrap();
    });
    for (m, member) in members.iter().enumerate() {
        let back = OwnedRequestBuffers::new((per_member * 512) as usize);
        block_on(member.read_vectored(&back.buffers(true), 0)).unwrap();
        let back = back.to_vec();
        for member_chunk in 0..per_member / chunk_sectors {
            let chunk = member_chunk * n + m as u64;
            let want =
                &data[(chunk * chunk_sectors * 512) as usize..][..(chunk_sectors * 512) as usize];
            let have = &back[(member_chunk * chunk_sectors * 512) as usize..][..want.len()];
            assert!(
                want == have,
                "chunk {chunk} on member {m} at chunk {member_chunk}"
            );
        }
    }
}

fn ram(sectors: u64, sector_size: u32) -> Disk {
    Disk::new(RamDisk::new(sectors, sector_size).unwrap()).unwrap()
}

#[test]
fn construction_errors() {
    use NewStripedDiskError as E;
    assert_eq!(
        StripedDisk::new(vec![], None, None).unwrap_err(),
        E::NoDisks
    );
    let two = || vec![ram(64, 512), ram(64, 512)];
    for bad in [0, 100, 513, 1000] {
        assert_eq!(
            StripedDisk::new(two(), Some(bad), None).unwrap_err(),
            E::InvalidChunkSize {
                chunk_size_bytes: bad,
                sector_size: 512
            }
        );
    }
    assert_eq!(
        StripedDisk::new(vec![ram(16, 4096), ram(16, 4096)], Some(512), None).unwrap_err(),
        E::InvalidChunkSize {
            chunk_size_bytes: 512,
            sector_size: 4096
        }
    );
    assert_eq!(
        StripedDisk::new(vec![ram(64, 512), ram(8, 4096)], Some(4096), None).unwrap_err(),
        E::SectorSizeMismatch {
            member: 1,
            expected: 512,
            found: 4096
        }
    );
    assert_eq!(
        StripedDisk::new(
            vec![ram(64, 512), ram(64, 512), ram(72, 512)],
            Some(4096),
            None
        )
        .unwrap_err(),
        E::SectorCountMismatch {
            member: 2,
            expected: 64,
            found: 72
        }
    );
    let read_only = Disk::new(RamDisk::new(64, 512).unwrap().with_read_only(true)).unwrap();
    assert_eq!(
        StripedDisk::new(vec![ram(64, 512), read_only], Some(4096), None).unwrap_err(),
        E::ReadOnlyMismatch {
            member: 1,
            read_only: true
        }
    );
    // 60 sectors per member are not whole 8-sector chunks, so all of them are not whole
    // stripes; 96 of the 120 sectors are.
    let uneven = || vec![ram(60, 512), ram(60, 512)];
    assert_eq!(
        StripedDisk::new(uneven(), Some(4096), None).unwrap_err(),
        E::NotWholeStripes {
            sector_count: 120,
            stripe_sectors: 16
        }
    );
    assert_eq!(
        StripedDisk::new(uneven(), Some(4096), Some(100)).unwrap_err(),
        E::NotWholeStripes {
            sector_count: 100,
            stripe_sectors: 16
        }
    );
    assert_eq!(
        StripedDisk::new(uneven(), Some(4096), Some(96))
            .unwrap()
            .sector_count(),
        96
    );
    assert_eq!(
        StripedDisk::new(two(), Some(4096), Some(144)).unwrap_err(),
        E::TooLarge {
            requested: 144,
            available: 128
        }
    );
    // The default chunk is 128 KiB; 512 sectors of 512 bytes are two chunks.
    let default = StripedDisk::new(vec![ram(512, 512), ram(512, 512)], None, None).unwrap();
    assert_eq!(default.chunk_size_bytes(), 128 * 1024);
    assert_eq!(default.sector_count(), 1024);
    assert_eq!(default.members().len(), 2);
    // Every message is lowercase without a trailing period.
    let message = E::TooLarge {
        requested: 1,
        available: 0,
    }
    .to_string();
    assert!(!message.starts_with(char::is_uppercase) && !message.ends_with('.'));
    assert_eq!(message, "1 sectors requested, the stripe set holds 0");
}

/// A member with chosen metadata and optional faults, recording the unmaps it receives.
struct Member {
    ram: RamDisk,
    physical_sector_size: u32,
    fua: bool,
    unmap_behavior: UnmapBehavior,
    optimal_unmap_sectors: u32,
    /// Fail every read and write with this kind of error.
    fail: Option<fn() -> DiskError>,
    /// Reads and writes wait for this gate to open.
    gate: Option<Arc<Gate>>,
    finished: AtomicUsize,
    unmaps: Mutex<Vec<(u64, u64)>>,
}

impl Member {
    fn new(sectors: u64) -> Self {
        Self {
            ram: RamDisk::new(sectors, 512).unwrap(),
            physical_sector_size: 512,
            fua: true,
            unmap_behavior: UnmapBehavior::Zeroes,
            optimal_unmap_sectors: 1,
            fail: None,
            gate: None,
            finished: AtomicUsize::new(0),
            unmaps: Mutex::new(Vec::new()),
        }
    }

    async fn io(&self) -> Result<(), DiskError> {
        if let Some(gate) = &self.gate {
            gate.wait().await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.fail.map_or(Ok(()), |fail| Err(fail()))
    }
}

/// A latch that futures wait on until it is opened.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        for waker in self.wakers.lock().drain(..) {
            waker.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            let mut wakers = self.wakers.lock();
            if self.open.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                wakers.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl DiskIo for Member {
    fn disk_type(&self) -> &str {
        "member"
    }
    fn sector_count(&self) -> u64 {
        self.ram.sector_count()
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    fn is_fua_respected(&self) -> bool {
        self.fua
    }
    fn is_read_only(&self) -> bool {
        false
    }
    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.io().await?;
        self.ram.read_vectored(buffers, sector).await
    }
    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.io().await?;
        self.ram.write_vectored(buffers, sector, fua).await
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.fail.map_or(Ok(()), |fail| Err(fail()))
    }
    async fn unmap(&self, sector: u64, count: u64, level: bool) -> Result<(), DiskError> {
        self.unmaps.lock().push((sector, count));
        self.ram.unmap(sector, count, level).await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        self.optimal_unmap_sectors
    }
}

fn striped_over(members: &[Arc<Member>], chunk_size: u32) -> Disk {
    let disks = members
        .iter()
        .map(|m| Disk::new(m.clone()).unwrap())
        .collect();
    Disk::new(StripedDisk::new(disks, Some(chunk_size), None).unwrap()).unwrap()
}

#[test]
fn metadata_folds_over_the_members() {
    let mut a = Member::new(64);
    a.physical_sector_size = 4096;
    a.optimal_unmap_sectors = 8;
    let b = Member::new(64);
    let disk = striped_over(&[Arc::new(a), Arc::new(b)], 4096);
    assert_eq!(disk.physical_sector_size(), 4096);
    assert_eq!(disk.optimal_unmap_sectors(), 8);
    assert!(disk.is_fua_respected());
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);
    assert_eq!(disk.disk_type(), "striped");
    assert_eq!(disk.disk_id(), None);

    let mut c = Member::new(64);
    c.fua = false;
    c.unmap_behavior = UnmapBehavior::Ignored;
    let disk = striped_over(&[Arc::new(Member::new(64)), Arc::new(c)], 4096);
    assert!(!disk.is_fua_respected(), "FUA needs every member");
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Unspecified);

    let ignored = || {
        let mut m = Member::new(64);
        m.unmap_behavior = UnmapBehavior::Ignored;
        Arc::new(m)
    };
    let disk = striped_over(&[ignored(), ignored()], 4096);
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Ignored);
}

#[test]
fn unmap_sends_one_merged_range_per_member() {
    let members: Vec<Arc<Member>> = (0..3).map(|_| Arc::new(Member::new(64))).collect();
    let disk = striped_over(&members, 2048);
    // Sectors 6..70 of 4-sector chunks: chunks 1 (from sector 2 of it) to 17 (up to sector
    // 1 of it). Member 1 holds chunks 1, 4, ..., 16; member 2 chunks 2, ..., 17 (partial
    // last); member 0 chunks 3, ..., 15.
    block_on(disk.unmap(6, 64, false)).unwrap();
    assert_eq!(*members[0].unmaps.lock(), vec![(4, 20)]);
    assert_eq!(*members[1].unmaps.lock(), vec![(2, 22)]);
    assert_eq!(*members[2].unmaps.lock(), vec![(0, 22)]);
    // A range inside one chunk (chunk 5: member 2, its chunk 1) reaches one member only.
    block_on(disk.unmap(21, 2, false)).unwrap();
    assert_eq!(members[0].unmaps.lock().len(), 1);
    assert_eq!(members[1].unmaps.lock().len(), 1);
    assert_eq!(members[2].unmaps.lock().last(), Some(&(5, 2)));
}

#[test]
fn a_failure_waits_for_every_sub_request_and_names_the_member() {
    let gate = Arc::new(Gate::default());
    let members: Vec<Arc<Member>> = (0..4)
        .map(|i| {
            let mut m = Member::new(64);
            if i == 2 {
                m.fail = Some(|| DiskError::Io(std::io::Error::other("member broke")));
            } else {
                m.gate = Some(gate.clone());
            }
            Arc::new(m)
        })
        .collect();
    let disk = striped_over(&members, 2048);
    // 16 sectors from sector 0: one 4-sector chunk on each member.
    let buf = OwnedRequestBuffers::new(16 * 512);
    let buffers = buf.buffers(true);
    let mut read = Box::pin(disk.read_vectored(&buffers, 0));
    assert!(
        (&mut read).now_or_never().is_none(),
        "the request completed while sub-requests were still running"
    );
    assert_eq!(
        members[2].finished.load(Ordering::SeqCst),
        1,
        "member 2 failed"
    );
    gate.open();
    let error = block_on(read).unwrap_err();
    for member in &members {
        assert_eq!(member.finished.load(Ordering::SeqCst), 1);
    }
    assert_eq!(failed_member(&error), Some(2), "{error:?}");
    assert!(matches!(&error, DiskError::Io(io) if io.kind() == std::io::ErrorKind::Other));
}

#[test]
fn the_first_error_in_request_order_wins() {
    let members: Vec<Arc<Member>> = (0..3)
        .map(|i| {
            let mut m = Member::new(64);
            m.fail = match i {
                0 => None,
                1 => Some(|| {
                    DiskError::MediumError(
                        std::io::ErrorKind::InvalidData.into(),
                        MediumErrorDetails::UnrecoveredReadError,
                    )
                }),
                _ => Some(|| DiskError::Io(std::io::Error::other("later"))),
            };
            Arc::new(m)
        })
        .collect();
    let disk = striped_over(&members, 2048);
    let buf = OwnedRequestBuffers::new(8 * 512);
    // Sectors 8..16 are chunks 2 (member 2) then 3 (member 0): member 2 alone fails.
    let error = block_on(disk.read_vectored(&buf.buffers(true), 8)).unwrap_err();
    assert_eq!(failed_member(&error), Some(2));
    // Sectors 4..12 are chunks 1 (member 1) then 2 (member 2): member 1 is first.
    let error = block_on(disk.read_vectored(&buf.buffers(true), 4)).unwrap_err();
    assert_eq!(failed_member(&error), Some(1));
    assert!(matches!(
        error,
        DiskError::MediumError(_, MediumErrorDetails::UnrecoveredReadError)
    ));
    // Inside one chunk (the unsplit path) the member is named too.
    let one = OwnedRequestBuffers::new(512);
    let error = block_on(disk.write_vectored(&one.buffers(false), 9, false)).unwrap_err();
    assert_eq!(failed_member(&error), Some(2));
    // Flush reaches every member; members 1 and 2 fail, member 1 is reported.
    let error = block_on(disk.sync_cache()).unwrap_err();
    assert_eq!(failed_member(&error), Some(1));
}

/// A write whose guest memory is bad in a later chunk changes nothing on any member.
#[test]
fn bad_guest_memory_in_a_later_chunk_writes_nothing() {
    let members: Vec<Disk> = (0..2).map(|_| ram(64, 512)).collect();
    let disk = Disk::new(StripedDisk::new(members.clone(), Some(2048), None).unwrap()).unwrap();
    let mem = request_buffers::GuestMemory::allocate(4096);
    // Page 0 exists, page 9 does not: the second 4 KiB of the request is unbacked.
    let gpns = [0, 9];
    let range = request_buffers::PagedRange::new(0, 8192, &gpns).unwrap();
    let buffers = RequestBuffers::new(&mem, range, false);
    let first_page = request_buffers::PagedRange::new(0, 4096, &gpns[..1]).unwrap();
    request_buffers::MemoryWrite::fill(
        &mut RequestBuffers::new(&mem, first_page, true).writer(),
        0xff,
        4096,
    )
    .unwrap();
    let result = block_on(disk.write_vectored(&buffers, 0, false));
    assert!(
        matches!(result, Err(DiskError::MemoryAccess(_))),
        "{result:?}"
    );
    for member in &members {
        let back = OwnedRequestBuffers::new(64 * 512);
        block_on(member.read_vectored(&back.buffers(true), 0)).unwrap();
        assert!(back.to_vec().iter().all(|&b| b == 0));
    }
}

/// Guest memory announced to the striped disk reaches every member, even after one refuses
/// it; the refusal names its member.
#[test]
fn register_memory_reaches_every_member() {
    let probes: Vec<Arc<disk_conformance::MemoryProbe>> = (0..3)
        .map(|_| Arc::new(disk_conformance::MemoryProbe::new(64)))
        .collect();
    let members = probes
        .iter()
        .map(|probe| Disk::new(probe.clone()).unwrap())
        .collect();
    let disk = Disk::new(StripedDisk::new(members, Some(4096), None).unwrap()).unwrap();
    let memory = request_buffers::GuestMemory::allocate(8192);
    disk.register_memory(&memory).unwrap();
    assert!(probes.iter().all(|probe| probe.last_is(&memory)));
    probes[1].set_failing(true);
    let error = disk.register_memory(&memory).unwrap_err();
    assert_eq!(failed_member(&error), Some(1));
    assert!(probes.iter().all(|probe| probe.calls() == 2));
}

/// A resize of the members reaches the striped disk: its size follows the smallest member
/// (in whole stripes), and `wait_resize` completes when that changes, as every decorator's
/// must (a virtio-blk device waits on it to tell the guest).
#[test]
fn wait_resize_follows_the_members() {
    let members: Vec<Arc<RamDisk>> = (0..2)
        .map(|_| Arc::new(RamDisk::new(64, 512).unwrap()))
        .collect();
    let disks = members
        .iter()
        .map(|m| Disk::new(m.clone()).unwrap())
        .collect();
    // Chunks of 8 sectors: a stripe is 16 sectors.
    let striped = Disk::new(StripedDisk::new(disks, Some(4096), None).unwrap()).unwrap();
    assert_eq!(striped.sector_count(), 128);
    assert!(striped.wait_resize(128).now_or_never().is_none());

    // Both members grow: the change is visible at once and to a waiter asking about the old
    // size.
    for member in &members {
        member.resize(128).unwrap();
    }
    assert_eq!(striped.sector_count(), 256);
    assert_eq!(striped.wait_resize(128).now_or_never(), Some(256));

    // A waiter that started before the resize is woken by it; one member growing alone does
    // not change the size (the smallest member decides), the second one does.
    let waiter = std::thread::spawn({
        let striped = striped.clone();
        move || block_on(striped.wait_resize(256))
    });
    members[0].resize(200).unwrap();
    assert_eq!(striped.sector_count(), 256);
    members[1].resize(203).unwrap();
    // 200 sectors per member hold 25 whole chunks of 8: 25 stripes of 16 sectors.
    assert_eq!(waiter.join().unwrap(), 400);
    assert_eq!(striped.sector_count(), 400);

    // Past the new end is out of range; inside it works.
    let buf = OwnedRequestBuffers::new(512);
    assert!(block_on(striped.read_vectored(&buf.buffers(true), 399)).is_ok());
    assert!(matches!(
        block_on(striped.read_vectored(&buf.buffers(true), 400)),
        Err(DiskError::IllegalBlock)
    ));

    // Shrinking is a change too.
    for member in &members {
        member.resize(32).unwrap();
    }
    assert_eq!(block_on(striped.wait_resize(400)), 64);
}

/// A size given at construction pins it: the members may grow without the disk changing.
#[test]
fn an_explicit_size_does_not_follow_the_members() {
    let member = Arc::new(RamDisk::new(64, 512).unwrap());
    let striped = StripedDisk::new(
        vec![Disk::new(member.clone()).unwrap()],
        Some(4096),
        Some(32),
    )
    .unwrap();
    member.resize(128).unwrap();
    assert_eq!(striped.sector_count(), 32);
    assert!(striped.wait_resize(32).now_or_never().is_none());
}
