//! The syscalls: vectored positioned I/O on raw iovecs, hole punching, sizes.

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
fn transfer_all(
    buffers: &[IoBuffer],
    mut offset: u64,
    eof: io::ErrorKind,
    mut op: impl FnMut(*const libc::iovec, i32, libc::off_t) -> isize,
) -> io::Result<()> {
    let mut pending = Pending::new(buffers);
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

/// Reads the whole of `buffers` from `offset`.
pub(crate) fn read_all_at(file: &File, buffers: &[IoBuffer], offset: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    transfer_all(
        buffers,
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

/// Writes the whole of `buffers` at `offset`; with `fua`, durably (`RWF_DSYNC`).
pub(crate) fn write_all_at(
    file: &File,
    buffers: &[IoBuffer],
    offset: u64,
    fua: bool,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    let result = transfer_all(
        buffers,
        offset,
        io::ErrorKind::WriteZero,
        |iov, count, off| {
            // SAFETY: the iovecs describe locked guest memory kept mapped by the caller; the
            // kernel only reads it.
            unsafe { libc::pwritev2(fd, iov, count, off, flags) }
        },
    );
    match result {
        // Kernels before 4.7 lack RWF_DSYNC: write, then make it durable.
        Err(e) if fua && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            write_all_at(file, buffers, offset, false)?;
            file.sync_data()
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        transfer_all(&buffers, 0, io::ErrorKind::UnexpectedEof, |iov, _, off| {
            calls += 1;
            // SAFETY: `iov` points at the single live iovec built from `data`.
            let len = unsafe { (*iov).iov_len };
            assert_eq!(off as usize, 100 - len);
            len.min(30) as isize
        })
        .unwrap();
        assert_eq!(calls, 4);
        let err = transfer_all(&buffers, 0, io::ErrorKind::UnexpectedEof, |_, _, _| 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
