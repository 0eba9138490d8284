//! What `Disk` checks before a request reaches the backend.

mod support;

use disk_backend::{Disk, DiskError, InvalidDisk};
use futures::FutureExt;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use support::NullDisk;

fn geometry(sector_size: u32, physical_sector_size: u32) -> NullDisk {
    NullDisk {
        sector_size,
        physical_sector_size,
        ..NullDisk::new(100)
    }
}

#[test]
fn new_validates_geometry() {
    for bad in [0, 1, 256, 511, 513, 1000, 4097, u32::MAX] {
        assert_eq!(
            Disk::new(geometry(bad, 1 << 31)).unwrap_err(),
            InvalidDisk::InvalidSectorSize(bad)
        );
    }
    for bad in [0, 512, 2048, 6144] {
        assert_eq!(
            Disk::new(geometry(4096, bad)).unwrap_err(),
            InvalidDisk::InvalidPhysicalSectorSize(bad)
        );
    }
    let no_unmap = NullDisk {
        optimal_unmap_sectors: 0,
        ..NullDisk::new(1)
    };
    assert_eq!(
        Disk::new(no_unmap).unwrap_err(),
        InvalidDisk::InvalidOptimalUnmapSectors
    );
    let disk = Disk::new(geometry(4096, 4096)).unwrap();
    assert_eq!((disk.sector_size(), disk.sector_shift()), (4096, 12));
    assert_eq!(disk.physical_sector_size(), 4096);
    assert_eq!(disk.disk_type(), "null");
}

#[test]
fn malformed_and_unrepresentable_requests_never_reach_the_backend() {
    let backend = Arc::new(NullDisk::new(u64::MAX));
    let disk = Disk::new(backend.clone()).unwrap();
    let ragged = OwnedRequestBuffers::new(513);
    let one = OwnedRequestBuffers::new(512);
    let empty = OwnedRequestBuffers::new(0);
    block_on(async {
        assert!(matches!(
            disk.read_vectored(&ragged.buffers(true), 0).await,
            Err(DiskError::InvalidInput)
        ));
        assert!(matches!(
            disk.write_vectored(&ragged.buffers(false), 0, true).await,
            Err(DiskError::InvalidInput)
        ));
        // The backend claims u64::MAX sectors, but byte offsets stop at i64::MAX.
        let last = (i64::MAX as u64) / 512;
        for sector in [last, u64::MAX / 512 + 1, u64::MAX] {
            assert!(matches!(
                disk.read_vectored(&one.buffers(true), sector).await,
                Err(DiskError::IllegalBlock)
            ));
            assert!(matches!(
                disk.unmap(sector, 1, false).await,
                Err(DiskError::IllegalBlock)
            ));
        }
        assert!(matches!(
            disk.unmap(1, u64::MAX, false).await,
            Err(DiskError::IllegalBlock)
        ));
        disk.read_vectored(&empty.buffers(true), 5).await.unwrap();
        disk.unmap(5, 0, false).await.unwrap();
        assert_eq!(backend.requests.load(Ordering::Relaxed), 0);
        // The last representable sector does reach it.
        disk.read_vectored(&one.buffers(true), last - 1)
            .await
            .unwrap();
        assert_eq!(backend.requests.load(Ordering::Relaxed), 1);
    });
}

#[test]
fn read_only_is_enforced_by_disk() {
    let backend = Arc::new(NullDisk {
        read_only: true,
        ..NullDisk::new(100)
    });
    let disk = Disk::new(backend.clone()).unwrap();
    assert!(disk.is_read_only());
    let one = OwnedRequestBuffers::new(512);
    block_on(async {
        assert!(matches!(
            disk.write_vectored(&one.buffers(false), 0, false).await,
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(
            disk.unmap(0, 1, false).await,
            Err(DiskError::ReadOnly)
        ));
        disk.read_vectored(&one.buffers(true), 0).await.unwrap();
        disk.sync_cache().await.unwrap();
    });
    // Only the read reached the backend (flush is not counted by it).
    assert_eq!(backend.requests.load(Ordering::Relaxed), 1);
}

#[test]
fn defaults_and_pass_through() {
    let disk = Disk::new(NullDisk::new(8)).unwrap();
    assert!(disk.pr().is_none());
    assert!(matches!(
        block_on(disk.eject()),
        Err(DiskError::UnsupportedEject)
    ));
    // The default wait_resize never completes.
    assert!(disk.wait_resize(8).now_or_never().is_none());
    let clone = disk.clone();
    assert_eq!(clone.sector_count(), 8);
    assert!(format!("{disk:?}").contains("null"));
    // A Disk is a DiskIo, so it can be wrapped again.
    let outer = Disk::new(disk).unwrap();
    let one = OwnedRequestBuffers::new(512);
    assert!(matches!(
        block_on(outer.read_vectored(&one.buffers(true), 8)),
        Err(DiskError::IllegalBlock)
    ));
}

#[test]
fn blocking_adapter_edges() {
    use disk_backend::sync_wrapper::BlockingDisk;
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = BlockingDisk::new(Disk::new(NullDisk::new(4)).unwrap());
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), 2048);
    assert_eq!(file.read(&mut [0; 16]).unwrap(), 0);
    assert_eq!(file.write(&[0; 16]).unwrap(), 0);
    assert!(file.seek(SeekFrom::End(-2049)).is_err());
    assert_eq!(file.seek(SeekFrom::Start(u64::MAX)).unwrap(), u64::MAX);
    assert!(file.seek(SeekFrom::Current(1)).is_err());
    assert_eq!(file.read(&mut [0; 16]).unwrap(), 0);
    file.seek(SeekFrom::Start(10)).unwrap();
    let mut big = vec![0; 10_000];
    assert_eq!(file.read(&mut big).unwrap(), 2038);
    file.flush().unwrap();
}

/// A backend whose futures are far larger than the inline storage: `Disk` boxes them and
/// they still work.
struct BigFutureDisk(NullDisk);

impl disk_backend::DiskIo for BigFutureDisk {
    fn disk_type(&self) -> &str {
        "big"
    }
    fn sector_count(&self) -> u64 {
        self.0.sector_count
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn is_fua_respected(&self) -> bool {
        false
    }
    fn is_read_only(&self) -> bool {
        false
    }
    async fn read_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        let scratch = [0xabu8; 4 * disk_backend::INLINE_FUTURE_SIZE];
        // Held across an await point, so it lives in the future.
        futures::future::ready(()).await;
        disk_backend::check_range(self, sector, buffers.len())?;
        let mut writer = buffers.writer();
        guestmem::MemoryWrite::write(&mut writer, &scratch[..buffers.len().min(scratch.len())])?;
        Ok(())
    }
    async fn write_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
        _fua: bool,
    ) -> Result<(), DiskError> {
        disk_backend::check_range(self, sector, buffers.len())
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        Ok(())
    }
    async fn unmap(&self, sector: u64, count: u64, _: bool) -> Result<(), DiskError> {
        disk_backend::check_unmap_range(self, sector, count)
    }
    fn unmap_behavior(&self) -> disk_backend::UnmapBehavior {
        disk_backend::UnmapBehavior::Ignored
    }
}

#[test]
fn futures_larger_than_the_inline_storage_are_boxed() {
    let disk = Disk::new(BigFutureDisk(NullDisk::new(16))).unwrap();
    let buf = OwnedRequestBuffers::new(1024);
    block_on(disk.read_vectored(&buf.buffers(true), 2)).unwrap();
    assert_eq!(buf.to_vec(), vec![0xab; 1024]);
    assert!(matches!(
        block_on(disk.read_vectored(&buf.buffers(true), 15)),
        Err(DiskError::IllegalBlock)
    ));
}

/// A decorator that changes nothing, written with `forward_disk_metadata!`.
struct PassThrough(Arc<NullDisk>);

impl disk_backend::DiskIo for PassThrough {
    disk_backend::forward_disk_metadata!(self.0);

    fn disk_type(&self) -> &str {
        "pass-through"
    }
    async fn read_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.0.read_vectored(buffers, sector).await
    }
    async fn write_vectored(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.0.write_vectored(buffers, sector, fua).await
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.0.sync_cache().await
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.0.unmap(sector, count, block_level_only).await
    }
    fn unmap_behavior(&self) -> disk_backend::UnmapBehavior {
        self.0.unmap_behavior()
    }
}

/// `register_memory` reaches the backend through `Disk`, `Arc` and a decorator written with
/// `forward_disk_metadata!`, however deep.
#[test]
fn register_memory_reaches_the_backend_through_every_wrapper() {
    let backend = Arc::new(NullDisk::new(8));
    let memory = disk_backend::GuestMemory::allocate(4096);
    let inner = Disk::new(backend.clone()).unwrap();
    inner.register_memory(&memory).unwrap();
    assert_eq!(backend.registrations.load(Ordering::Relaxed), 1);
    let outer = Disk::new(PassThrough(backend.clone())).unwrap();
    let outermost = Disk::new(outer.clone()).unwrap();
    outermost.register_memory(&memory).unwrap();
    disk_backend::DiskIo::register_memory(&outer, &memory).unwrap();
    assert_eq!(backend.registrations.load(Ordering::Relaxed), 3);
}
