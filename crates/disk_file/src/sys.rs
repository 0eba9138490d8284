//! The syscalls: vectored positioned I/O on raw iovecs, hole punching, sizes.

use crate::io_log::{IoLog, Syscall};
use request_buffers::IoBuffer;
use smallvec::SmallVec;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;

// `IoBuffer` is documented to be laid out like `struct iovec`; the casts below rely on it.
const _: () = {
    assert!(size_of::<IoBuffer>() == size_of::<libc::iovec>());
    assert!(align_of::<IoBuffer>() == align_of::<libc::iovec>());
};

/// The kernel's limit on iovecs per call (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    // Seeking to the end works for block devices too, where the metadata length is 0.
    let mut file = file;
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Whether the file system can punch holes. Punching past the end of the file with
/// `KEEP_SIZE` changes nothing but tells an unsupported file system (`EOPNOTSUPP`) apart.
pub(crate) fn supports_punch_hole(file: &File, size: u64) -> bool {
    let Ok(offset) = libc::off_t::try_from(size) else {
        return false;
    };
    if offset.checked_add(4096).is_none() {
        return false;
    }
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            4096,
        )
    };
    rc == 0
}

pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // The caller's range check keeps both inside i64.
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The iovecs still to transfer: a copy of the caller's list that is advanced past
/// completed bytes, so short transfers can be resumed.
struct Pending {
    iovecs: SmallVec<[libc::iovec; 8]>,
    first: usize,
}

impl Pending {
    fn new(buffers: &[IoBuffer]) -> Self {
        Self {
            iovecs: buffers
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect(),
            first: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.first == self.iovecs.len()
    }

    fn batch(&self) -> (*const libc::iovec, i32) {
        let rest = &self.iovecs[self.first..];
        (rest.as_ptr(), rest.len().min(IOV_MAX) as i32)
    }

    fn advance(&mut self, mut done: usize) {
        while done > 0 {
            let iov = &mut self.iovecs[self.first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                self.first += 1;
            } else {
                iov.iov_base = iov.iov_base.wrapping_byte_add(done);
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
}

/// Runs `op(iovecs, count, offset)` until every byte is transferred. A transfer of 0 bytes
/// (end of file, or a device that accepts nothing) is an error: a short transfer is never
/// silently accepted.
///
/// The first `skip` bytes are taken as already transferred (by an earlier attempt).
fn transfer_all(
    buffers: &[IoBuffer],
    skip: usize,
    offset: u64,
    eof: io::ErrorKind,
    mut op: impl FnMut(*const libc::iovec, i32, libc::off_t) -> isize,
) -> io::Result<()> {
    let mut pending = Pending::new(buffers);
    pending.advance(skip);
    let mut offset = offset + skip as u64;
    while !pending.is_done() {
        let (iov, count) = pending.batch();
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let n = op(iov, count, off);
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if n == 0 {
            return Err(eof.into());
        }
        pending.advance(n as usize);
        offset += n as u64;
    }
    Ok(())
}

/// Whether the file's data lives in memory (a regular file on tmpfs or ramfs): a transfer
/// is then a copy that never waits for a device. Anything else, including a device node on
/// devtmpfs, is not.
pub(crate) fn is_in_memory(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.file_type().is_file())
        && fs_type(file).is_some_and(|f| f == libc::TMPFS_MAGIC || f == RAMFS_MAGIC)
}

/// The file system's magic number (`statfs.f_type`).
fn fs_type(file: &File) -> Option<libc::__fsword_t> {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the statfs it is given, which lives for the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so it initialised the structure.
    Some(unsafe { stat.assume_init() }.f_type)
}

/// `RAMFS_MAGIC` from `<linux/magic.h>` (the libc crate lacks it).
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;

/// One `preadv2` or `pwritev2` with `RWF_NOWAIT`: what the page cache can take or give
/// without waiting for a device or a lock. Returns the bytes transferred (0 when the call
/// would have waited, `EAGAIN`); `EOPNOTSUPP` means the file system does not take the flag.
fn transfer_nowait(
    buffers: &[IoBuffer],
    offset: u64,
    op: impl Fn(*const libc::iovec, i32, libc::off_t) -> isize,
) -> io::Result<usize> {
    let pending = Pending::new(buffers);
    let (iov, count) = pending.batch();
    let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        let n = op(iov, count, off);
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(error),
        }
    }
}

/// Reads what the page cache holds at `offset` into `buffers`, without waiting (see
/// [`transfer_nowait`]).
pub(crate) fn read_nowait(file: &File, buffers: &[IoBuffer], offset: u64) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    transfer_nowait(buffers, offset, |iov, count, off| {
        // SAFETY: as in `read_all_at`.
        unsafe { libc::preadv2(fd, iov, count, off, libc::RWF_NOWAIT) }
    })
}

/// Writes what the page cache takes at once from `buffers` at `offset`, without waiting
/// (see [`transfer_nowait`]).
pub(crate) fn write_nowait(
    file: &File,
    buffers: &[IoBuffer],
    offset: u64,
    log: &IoLog,
) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    transfer_nowait(buffers, offset, |iov, count, off| {
        log.record(|| Syscall::Pwritev2 {
            offset: off as u64,
            flags: libc::RWF_NOWAIT,
        });
        // SAFETY: as in `write_all_at`.
        unsafe { libc::pwritev2(fd, iov, count, off, libc::RWF_NOWAIT) }
    })
}

/// Reads the whole of `buffers` from `offset`, but for the first `skip` bytes.
pub(crate) fn read_all_at(
    file: &File,
    buffers: &[IoBuffer],
    skip: usize,
    offset: u64,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    transfer_all(
        buffers,
        skip,
        offset,
        io::ErrorKind::UnexpectedEof,
        |iov, count, off| {
            // SAFETY: the iovecs describe locked guest memory (kept mapped by the caller's
            // `LockedPages`) that the request may write; the kernel writes into it, no Rust
            // reference to it exists.
            unsafe { libc::preadv(fd, iov, count, off) }
        },
    )
}

/// Writes the whole of `buffers` at `offset`, but for the first `skip` bytes; with `fua`,
/// durably (`RWF_DSYNC`).
pub(crate) fn write_all_at(
    file: &File,
    buffers: &[IoBuffer],
    skip: usize,
    offset: u64,
    fua: bool,
    log: &IoLog,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    let result = transfer_all(
        buffers,
        skip,
        offset,
        io::ErrorKind::WriteZero,
        |iov, count, off| {
            log.record(|| Syscall::Pwritev2 {
                offset: off as u64,
                flags,
            });
            // SAFETY: the iovecs describe locked guest memory kept mapped by the caller; the
            // kernel only reads it.
            unsafe { libc::pwritev2(fd, iov, count, off, flags) }
        },
    );
    match result {
        // Kernels before 4.7 lack RWF_DSYNC: write, then make it durable.
        Err(e) if fua && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            write_all_at(file, buffers, skip, offset, false, log)?;
            log.record(|| Syscall::Fdatasync);
            file.sync_data()
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_memory_are_told_apart() {
        // A device node on devtmpfs is not a file in memory, whatever its file system.
        assert!(!is_in_memory(&File::open("/dev/null").unwrap()));
        match tempfile::tempfile_in("/dev/shm") {
            Ok(file) => assert!(is_in_memory(&file)),
            Err(e) => test_skip::skip_optional(format!("the tmpfs half: no /dev/shm ({e})")),
        }
        let dir = std::env::temp_dir();
        let on_tmp = tempfile::tempfile_in(&dir).unwrap();
        let f_type = fs_type(&on_tmp).unwrap();
        let memory_fs = f_type == libc::TMPFS_MAGIC || f_type == RAMFS_MAGIC;
        assert_eq!(
            is_in_memory(&on_tmp),
            memory_fs,
            "{} is on {f_type:#x}",
            dir.display()
        );
    }

    #[test]
    fn a_transfer_resumes_after_skipped_bytes() {
        let mut data = [0u8; 100];
        let buffers = [
            IoBuffer::new(data.as_mut_ptr(), 40),
            IoBuffer::new(data[40..].as_mut_ptr(), 60),
        ];
        let mut seen = Vec::new();
        transfer_all(
            &buffers,
            50,
            1000,
            io::ErrorKind::UnexpectedEof,
            |iov, count, off| {
                // SAFETY: `iov` points at `count` live iovecs built from `data`.
                let first = unsafe { *iov };
                seen.push((count, first.iov_len, off));
                first.iov_len as isize
            },
        )
        .unwrap();
        assert_eq!(seen, [(1, 50, 1050)]);
    }

    #[test]
    fn pending_advances_across_iovecs() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 20];
        let buffers = [
            IoBuffer::new(a.as_mut_ptr(), 10),
            IoBuffer::new(b.as_mut_ptr(), 20),
        ];
        let mut pending = Pending::new(&buffers);
        pending.advance(4);
        assert_eq!(pending.iovecs[0].iov_len, 6);
        pending.advance(10);
        assert_eq!(pending.first, 1);
        assert_eq!(pending.iovecs[1].iov_len, 16);
        pending.advance(16);
        assert!(pending.is_done());
    }

    #[test]
    fn short_transfers_are_resumed_and_zero_is_an_error() {
        let mut data = [0u8; 100];
        let buffers = [IoBuffer::new(data.as_mut_ptr(), 100)];
        let mut calls = 0;
        // A kernel that moves at most 30 bytes per call.
        transfer_all(
            &buffers,
            0,
            0,
            io::ErrorKind::UnexpectedEof,
            |iov, _, off| {
                calls += 1;
                // SAFETY: `iov` points at the single live iovec built from `data`.
                let len = unsafe { (*iov).iov_len };
                assert_eq!(off as usize, 100 - len);
                len.min(30) as isize
            },
        )
        .unwrap();
        assert_eq!(calls, 4);
        let err =
            transfer_all(&buffers, 0, 0, io::ErrorKind::UnexpectedEof, |_, _, _| 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
