//! `FileDisk` against the conformance suite and file-specific behaviour.

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_file::{FileDisk, FileDiskOptions, OpenError};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

/// A fresh temporary file of `sectors` sectors opened as a `FileDisk`. A read-only disk is
/// filled with a pattern first, so reads have something to compare.
fn file_disk(sectors: u64, sector_size: u32, read_only: bool) -> FileDisk {
    file_disk_in(
        tempfile::tempfile().unwrap(),
        sectors,
        sector_size,
        read_only,
        true,
    )
}

/// A temporary file in /dev/shm (tmpfs), where small requests run whole on the calling
/// thread; `None` (with a note) on a machine without it.
fn shm_file() -> Option<std::fs::File> {
    match tempfile::tempfile_in("/dev/shm") {
        Ok(file) => Some(file),
        Err(e) => {
            disk_conformance::skip::skip_optional(format!("no tmpfs at /dev/shm ({e})"));
            None
        }
    }
}

/// `file` made `sectors` sectors long and opened as a `FileDisk`.
fn file_disk_in(
    mut file: std::fs::File,
    sectors: u64,
    sector_size: u32,
    read_only: bool,
    inline_io: bool,
) -> FileDisk {
    if read_only {
        file.write_all(&disk_conformance::pattern(sector_size, 0, sectors, 0x42))
            .unwrap();
    } else {
        file.set_len(sectors * sector_size as u64).unwrap();
    }
    // Reopen through /proc to get a descriptor of the requested mode.
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let options = FileDiskOptions {
        read_only,
        sector_size,
        inline_io,
        ..Default::default()
    };
    FileDisk::open(path, &options).unwrap()
}

disk_conformance::conformance_tests!(sectors_512, |spec| {
    file_disk(spec.sector_count, 512, spec.read_only)
});

disk_conformance::conformance_tests!(sectors_4k, |spec| {
    file_disk(spec.sector_count, 4096, spec.read_only)
});

// Every request through the thread pool.
disk_conformance::conformance_tests!(pool_only, |spec| {
    let file = tempfile::tempfile().unwrap();
    file_disk_in(file, spec.sector_count, 512, spec.read_only, false)
});

// A file in memory: small requests and flushes whole on the calling thread. Without
// /dev/shm the suite runs on an ordinary temporary file instead (and says so).
disk_conformance::conformance_tests!(in_memory, |spec| {
    let file = shm_file().unwrap_or_else(|| tempfile::tempfile().unwrap());
    file_disk_in(file, spec.sector_count, 4096, spec.read_only, true)
});

#[test]
fn a_read_the_page_cache_holds_in_part_comes_back_whole() {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    use std::os::fd::AsRawFd;
    // 128 KiB of a pattern, written and synced, then dropped from the page cache but for its
    // first page: reading 64 KiB, the disk's RWF_NOWAIT attempt gets that page and the pool
    // reads the rest.
    let data = disk_conformance::pattern(512, 0, 256, 7);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    file.sync_all().unwrap();
    posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    let reader = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
    // RANDOM turns read-ahead off for this descriptor: only the first page gets cached.
    posix_fadvise(&reader, 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM).unwrap();
    let mut first = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut first, 0).unwrap();
    let disk = file_disk_in(file, 256, 512, false, true);
    let buffers = OwnedRequestBuffers::new(64 << 10);
    block_on(disk.read_vectored(&buffers.buffers(true), 0)).unwrap();
    assert!(
        buffers.to_vec() == data[..64 << 10],
        "the read differs from the file"
    );
}

#[test]
fn open_errors() {
    let missing = FileDisk::open("/nonexistent/disk.img", &FileDiskOptions::default());
    assert!(matches!(missing, Err(OpenError::Open { .. })));
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(511).unwrap();
    assert!(matches!(
        FileDisk::open(file.path(), &FileDiskOptions::default()),
        Err(OpenError::TooSmall { .. })
    ));
    for bad in [0, 256, 1000] {
        let options = FileDiskOptions {
            sector_size: bad,
            ..Default::default()
        };
        assert!(matches!(
            FileDisk::open(file.path(), &options),
            Err(OpenError::InvalidSectorSize(_))
        ));
    }
    let options = FileDiskOptions {
        sector_size: 4096,
        physical_sector_size: Some(512),
        ..Default::default()
    };
    assert!(matches!(
        FileDisk::open(file.path(), &options),
        Err(OpenError::InvalidPhysicalSectorSize(512))
    ));
}

#[test]
fn a_trailing_partial_sector_is_refused_and_the_file_never_grows() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(10 * 512 + 100).unwrap();
    assert!(matches!(
        FileDisk::open(file.path(), &FileDiskOptions::default()),
        Err(OpenError::PartialSector {
            size: 5220,
            sector_size: 512
        })
    ));
    // Asked to, the disk leaves the partial sector out of reach, and never touches it.
    let partial = FileDiskOptions {
        partial_last_sector: true,
        ..Default::default()
    };
    let disk = Disk::new(FileDisk::open(file.path(), &partial).unwrap()).unwrap();
    assert_eq!(disk.sector_count(), 10);
    let tail = OwnedRequestBuffers::from_slice(&[1; 512]);
    assert!(matches!(
        block_on(disk.write_vectored(&tail.buffers(false), 10, false)),
        Err(DiskError::IllegalBlock)
    ));
    block_on(disk.write_vectored(&tail.buffers(false), 9, false)).unwrap();
    assert_eq!(file.as_file().metadata().unwrap().len(), 10 * 512 + 100);

    file.as_file().set_len(10 * 512).unwrap();
    let disk =
        Disk::new(FileDisk::open(file.path(), &FileDiskOptions::default()).unwrap()).unwrap();
    assert_eq!(disk.sector_count(), 10);
    let buf = OwnedRequestBuffers::from_slice(&[1; 1024]);
    assert!(matches!(
        block_on(disk.write_vectored(&buf.buffers(false), 9, false)),
        Err(DiskError::IllegalBlock)
    ));
    block_on(disk.write_vectored(&buf.buffers(false), 8, true)).unwrap();
    assert_eq!(file.as_file().metadata().unwrap().len(), 10 * 512);
}

#[test]
fn data_reaches_the_file_and_unmap_punches_holes() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let size = 64 * 4096u64;
    file.as_file().set_len(size).unwrap();
    let disk =
        Disk::new(FileDisk::open(file.path(), &FileDiskOptions::default()).unwrap()).unwrap();
    let data = OwnedRequestBuffers::from_slice(&vec![0xa5; size as usize]);
    block_on(disk.write_vectored(&data.buffers(false), 0, false)).unwrap();
    block_on(disk.sync_cache()).unwrap();
    let mut raw = Vec::new();
    file.as_file_mut().seek(SeekFrom::Start(0)).unwrap();
    file.as_file_mut().read_to_end(&mut raw).unwrap();
    assert!(raw.iter().all(|&b| b == 0xa5));

    if disk.unmap_behavior() == UnmapBehavior::Zeroes {
        let allocated = file.as_file().metadata().unwrap().blocks();
        block_on(disk.unmap(8, 64 * 8 - 16, false)).unwrap();
        let after = file.as_file().metadata().unwrap().blocks();
        assert!(
            after < allocated,
            "punching holes frees blocks ({allocated} -> {after})"
        );
        assert_eq!(file.as_file().metadata().unwrap().len(), size);
    } else {
        disk_conformance::skip::skip_optional(
            "the hole check: this file system cannot punch holes",
        );
    }
}

#[test]
fn read_only_file_reports_ignored_unmap() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let options = FileDiskOptions {
        read_only: true,
        ..Default::default()
    };
    let disk = FileDisk::open(file.path(), &options).unwrap();
    assert!(disk.is_read_only());
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Ignored);
}

#[test]
fn blocking_adapter_read_modify_write() {
    use disk_backend::sync_wrapper::BlockingDisk;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(8 * 512).unwrap();
    let disk =
        Disk::new(FileDisk::open(file.path(), &FileDiskOptions::default()).unwrap()).unwrap();
    let mut blocking = BlockingDisk::new(disk);
    // Unaligned at both ends, spanning three sectors.
    blocking.seek(SeekFrom::Start(500)).unwrap();
    blocking.write_all(&[7; 600]).unwrap();
    blocking.seek(SeekFrom::Start(0)).unwrap();
    let mut all = vec![0; 8 * 512];
    blocking.read_exact(&mut all).unwrap();
    assert!(all[..500].iter().all(|&b| b == 0));
    assert!(all[500..1100].iter().all(|&b| b == 7));
    assert!(all[1100..].iter().all(|&b| b == 0));
    // At the end: reads return 0, writes cannot extend.
    assert_eq!(blocking.read(&mut [0; 10]).unwrap(), 0);
    assert_eq!(
        blocking.write_all(&[1]).unwrap_err().kind(),
        std::io::ErrorKind::WriteZero
    );
    blocking.seek(SeekFrom::End(-3)).unwrap();
    assert_eq!(blocking.write(&[9; 10]).unwrap(), 3);
    assert!(blocking.seek(SeekFrom::Current(-100_000)).is_err());
    blocking.flush().unwrap();
}

#[test]
fn wait_resize_follows_the_file_growing_and_shrinking() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let disk =
        Disk::new(FileDisk::open(file.path(), &FileDiskOptions::default()).unwrap()).unwrap();
    assert_eq!(disk.sector_count(), 2048);
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(2048))
    });
    // Grown by someone else, as `truncate -s` does.
    file.as_file().set_len(2 << 20).unwrap();
    assert_eq!(waiter.join().unwrap(), 4096);
    assert_eq!(disk.sector_count(), 4096);
    let data = OwnedRequestBuffers::new(512);
    data.copy_from_slice(&[7; 512]);
    block_on(disk.write_vectored(&data.buffers(false), 4095, false)).unwrap();
    file.as_file().set_len(1 << 19).unwrap();
    assert_eq!(block_on(disk.wait_resize(4096)), 1024);
    assert!(matches!(
        block_on(disk.read_vectored(&data.buffers(true), 1024)),
        Err(DiskError::IllegalBlock)
    ));
}

/// What reaches the kernel, per request: every `pwritev2` of a FUA write carries
/// `RWF_DSYNC`, no other write does, neither asks for `fdatasync`, and a flush is exactly one
/// `fdatasync`. Checked on a file on disk (small writes tried inline with `RWF_NOWAIT`,
/// FUA in the pool), with every request in the pool, and on tmpfs (everything inline). The
/// data in the file is the same with or without the flag, so only the record of the
/// syscalls (`take_io_log`, feature `io-log`) can tell.
#[test]
fn fua_reaches_the_kernel_as_rwf_dsync() {
    use disk_file::Syscall;
    let mut files = vec![
        ("disk, inline", tempfile::tempfile().unwrap(), true),
        ("disk, pool", tempfile::tempfile().unwrap(), false),
    ];
    if let Some(file) = shm_file() {
        files.push(("tmpfs", file, true));
    }
    for (what, file, inline_io) in files {
        let disk = file_disk_in(file, 4096, 512, false, inline_io);
        let dsync = |calls: &[Syscall]| {
            calls
                .iter()
                .map(|call| match call {
                    Syscall::Pwritev2 { flags, .. } => Some(flags & libc::RWF_DSYNC != 0),
                    Syscall::Fdatasync => None,
                })
                .collect::<Vec<_>>()
        };
        disk.take_io_log();
        for (len, fua) in [
            (4096, true),
            (4096, false),
            (1 << 20, true),
            (1 << 20, false),
        ] {
            let data = OwnedRequestBuffers::from_slice(&vec![7u8; len]);
            block_on(disk.write_vectored(&data.buffers(false), 8, fua)).unwrap();
            let calls = dsync(&disk.take_io_log());
            assert!(
                !calls.is_empty(),
                "{what}: {len} bytes, fua {fua}: no write"
            );
            assert!(
                calls.iter().all(|call| *call == Some(fua)),
                "{what}: {len} bytes, fua {fua}: {calls:?}"
            );
        }
        block_on(disk.sync_cache()).unwrap();
        assert_eq!(disk.take_io_log(), [Syscall::Fdatasync], "{what}: flush");
    }
}
