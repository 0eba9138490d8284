//! The operations a ring runs and the memory a request lends the kernel.

use io_uring::{opcode, squeue, types};
use request_buffers::{BounceBuffer, IoBuffer, LockedIoBuffers};
use std::os::fd::RawFd;

// `IoBuffer` is documented to be laid out like `struct iovec`; the iovec pointers handed to
// the kernel are slices of `IoBuffer`s.
const _: () = {
    assert!(size_of::<IoBuffer>() == size_of::<libc::iovec>());
    assert!(align_of::<IoBuffer>() == align_of::<libc::iovec>());
};

/// The kernel's limit on iovecs per request (`UIO_MAXIOV`). Longer lists are submitted in
/// pieces, as if the kernel had made a short transfer.
pub(super) const IOV_MAX: usize = 1024;

/// The file an operation is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The ring's own file, registered with it as fixed file 0 (a disk's ring).
    Registered,
    /// A descriptor (a thread's ring, which serves every disk polled on the thread).
    Fd(RawFd),
}

/// Builds `$build` with `$fd` bound to the operation's file: the registered file or a plain
/// descriptor (the opcode builders take either, through a trait the crate keeps sealed).
macro_rules! on_target {
    ($target:expr, |$fd:ident| $build:expr) => {
        match $target {
            Target::Registered => {
                let $fd = types::Fixed(0);
                $build
            }
            Target::Fd(raw) => {
                let $fd = types::Fd(raw);
                $build
            }
        }
    };
}

/// One operation on a file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// `IORING_OP_READV` at a byte offset.
    Read { offset: u64 },
    /// `IORING_OP_WRITEV` at a byte offset, with `RWF_DSYNC` for FUA.
    Write { offset: u64, dsync: bool },
    /// `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`.
    Fsync,
    /// `IORING_OP_FALLOCATE`.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

impl Op {
    /// The submission entry for this operation on `target`, on the bytes of `iovecs`,
    /// which start `skip` bytes into the request; `fixed` is the registered buffer holding
    /// all of them.
    pub(super) fn entry(
        self,
        target: Target,
        iovecs: &[IoBuffer],
        skip: usize,
        fixed: Option<u16>,
    ) -> squeue::Entry {
        let pointer = iovecs.as_ptr().cast::<libc::iovec>();
        let count = iovecs.len() as u32;
        on_target!(target, |fd| {
            match (self, fixed, iovecs) {
                // One piece of registered memory: the plain fixed opcodes (Linux 5.1).
                (Op::Read { offset }, Some(buffer), [one]) => {
                    opcode::ReadFixed::new(fd, one.as_ptr(), one.len() as u32, buffer)
                        .offset(offset + skip as u64)
                        .build()
                }
                (Op::Read { offset }, Some(buffer), _) => {
                    opcode::ReadvFixed::new(fd, pointer, count, buffer)
                        .offset(offset + skip as u64)
                        .build()
                }
                (Op::Read { offset }, None, _) => opcode::Readv::new(fd, pointer, count)
                    .offset(offset + skip as u64)
                    .build(),
                (Op::Write { offset, dsync }, Some(buffer), [one]) => {
                    opcode::WriteFixed::new(fd, one.as_ptr(), one.len() as u32, buffer)
                        .offset(offset + skip as u64)
                        .rw_flags(dsync_flag(dsync))
                        .build()
                }
                (Op::Write { offset, dsync }, Some(buffer), _) => {
                    opcode::WritevFixed::new(fd, pointer, count, buffer)
                        .offset(offset + skip as u64)
                        .rw_flags(dsync_flag(dsync))
                        .build()
                }
                (Op::Write { offset, dsync }, None, _) => opcode::Writev::new(fd, pointer, count)
                    .offset(offset + skip as u64)
                    .rw_flags(dsync_flag(dsync))
                    .build(),
                (Op::Fsync, ..) => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                (Op::Fallocate { offset, len, mode }, ..) => opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
            }
        })
    }
}

pub(super) fn dsync_flag(dsync: bool) -> i32 {
    if dsync { libc::RWF_DSYNC } else { 0 }
}

/// Memory a request lends the kernel: it lives in the request's slot while the kernel may
/// use it.
#[derive(Debug, Default)]
pub(crate) enum Owned {
    /// No memory (flush, fallocate).
    #[default]
    None,
    /// Locked guest pages: zero-copy I/O.
    Locked(LockedIoBuffers),
    /// A bounce buffer.
    Bounce(BounceBuffer),
}

impl Owned {
    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Owned::None => 0,
            Owned::Locked(locked) => locked.len(),
            Owned::Bounce(bounce) => bounce.len(),
        }
    }

    /// Replaces `out` with the iovecs of the bytes after the first `skip`, at most
    /// [`IOV_MAX`] of them.
    pub(super) fn iovecs(&mut self, skip: usize, out: &mut Vec<IoBuffer>) {
        out.clear();
        let bounce;
        let buffers: &[IoBuffer] = match self {
            Owned::None => &[],
            Owned::Locked(locked) => locked.io_buffers(),
            Owned::Bounce(buffer) => {
                bounce = [buffer.io_buffer()];
                &bounce
            }
        };
        let mut skip = skip;
        for buffer in buffers {
            if out.len() == IOV_MAX {
                break;
            }
            if skip >= buffer.len() {
                skip -= buffer.len();
                continue;
            }
            out.push(IoBuffer::new(
                buffer.as_ptr().wrapping_add(skip),
                buffer.len() - skip,
            ));
            skip = 0;
        }
    }
}
