//! A record of the submission entries a [`BlockDeviceDisk`](crate::BlockDeviceDisk) hands
//! the kernel, decoded from the entries' own bytes, so tests can check what the kernel was
//! asked (a FUA write as `RWF_DSYNC`, a flush as a data-sync `fsync`) rather than only where
//! the data ended up, which looks the same with or without them. Recorded only with the
//! `io-log` feature (tests); without it the log is empty and costs nothing.

/// One submission entry, as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// A write (`WRITEV`, `WRITE_FIXED`, `WRITEV_FIXED`) at the byte `offset` with the
    /// `RWF_*` flags `rw_flags`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The entry's `rw_flags`.
        rw_flags: u32,
    },
    /// A read (`READV`, `READ_FIXED`, `READV_FIXED`) at the byte `offset`.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// `FSYNC` with the entry's `fsync_flags` (`IORING_FSYNC_DATASYNC`).
    Fsync {
        /// The entry's `fsync_flags`.
        fsync_flags: u32,
    },
    /// Anything else (`FALLOCATE`), by opcode.
    Other {
        /// The opcode.
        opcode: u8,
    },
}

/// Where a ring records its submissions, from the first [`take`](Self::take) on (so that
/// a disk nobody asks, in the allocation tests say, records nothing and allocates nothing).
#[derive(Debug, Default)]
pub(crate) struct IoLog {
    #[cfg(feature = "io-log")]
    recording: std::sync::atomic::AtomicBool,
    #[cfg(feature = "io-log")]
    entries: parking_lot::Mutex<Vec<Submission>>,
}

impl IoLog {
    /// Records `entry` (only with the feature, once recording started).
    #[inline]
    pub(crate) fn record(&self, entry: &io_uring::squeue::Entry) {
        #[cfg(feature = "io-log")]
        if self.recording.load(std::sync::atomic::Ordering::Relaxed) {
            self.entries.lock().push(decode(entry));
        }
        #[cfg(not(feature = "io-log"))]
        let _ = entry;
    }

    /// Takes what was recorded since the last call; the first call starts recording.
    #[cfg(feature = "io-log")]
    pub(crate) fn take(&self) -> Vec<Submission> {
        self.recording
            .store(true, std::sync::atomic::Ordering::Relaxed);
        std::mem::take(&mut *self.entries.lock())
    }
}

/// Decodes the fields of `entry` that say what the kernel will do, from its bytes (the
/// `io_uring` crate has no getters for them): `struct io_uring_sqe` has the opcode at byte
/// 0, the offset at bytes 8..16 and the per-opcode flags (`rw_flags`, `fsync_flags`) at
/// bytes 28..32, all native-endian.
#[cfg(feature = "io-log")]
fn decode(entry: &io_uring::squeue::Entry) -> Submission {
    use io_uring::opcode;
    const _: () = assert!(size_of::<io_uring::squeue::Entry>() == 64);
    // SAFETY: `Entry` is `#[repr(C)]` around `struct io_uring_sqe`, 64 bytes (checked
    // above) of plain integers and unions of integers, and the crate's builders start from a
    // zeroed entry, so every byte is initialised; reading them as bytes is a copy.
    let bytes: [u8; 64] = unsafe { std::mem::transmute_copy(entry) };
    let opcode = bytes[0];
    let offset = u64::from_ne_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let flags = u32::from_ne_bytes(bytes[28..32].try_into().expect("4 bytes"));
    match opcode {
        opcode::Writev::CODE | opcode::WriteFixed::CODE | opcode::WritevFixed::CODE => {
            Submission::Write {
                offset,
                rw_flags: flags,
            }
        }
        opcode::Readv::CODE | opcode::ReadFixed::CODE | opcode::ReadvFixed::CODE => {
            Submission::Read { offset }
        }
        opcode::Fsync::CODE => Submission::Fsync { fsync_flags: flags },
        opcode => Submission::Other { opcode },
    }
}
