//! A record of the write and flush syscalls a [`FileDisk`](crate::FileDisk) makes, with the
//! flags it passed, so tests can check what reached the kernel (a FUA write as `RWF_DSYNC`,
//! a flush as `fdatasync`) rather than only where the data ended up, which looks the same
//! with or without them. Recorded only with the `io-log` feature (tests); without it the
//! log is empty and costs nothing.

/// One syscall of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syscall {
    /// `pwritev2` at the byte `offset` with `flags` (`RWF_DSYNC`, `RWF_NOWAIT` or 0). A
    /// short write continued is one entry per call.
    Pwritev2 {
        /// Byte offset of this call.
        offset: u64,
        /// The `RWF_*` flags passed.
        flags: i32,
    },
    /// `fdatasync`.
    Fdatasync,
}

/// Where a disk records its syscalls, from the first [`take`](Self::take) on (so that a
/// disk nobody asks records nothing and allocates nothing); a clone shares the record.
#[derive(Debug, Clone, Default)]
pub(crate) struct IoLog {
    #[cfg(feature = "io-log")]
    calls: std::sync::Arc<(
        std::sync::atomic::AtomicBool,
        parking_lot::Mutex<Vec<Syscall>>,
    )>,
}

impl IoLog {
    /// Records the syscall `call` describes (only with the feature, once recording
    /// started).
    #[inline]
    pub(crate) fn record(&self, call: impl FnOnce() -> Syscall) {
        #[cfg(feature = "io-log")]
        if self.calls.0.load(std::sync::atomic::Ordering::Relaxed) {
            self.calls.1.lock().push(call());
        }
        #[cfg(not(feature = "io-log"))]
        let _ = call;
    }

    /// Takes what was recorded since the last call; the first call starts recording.
    #[cfg(feature = "io-log")]
    pub(crate) fn take(&self) -> Vec<Syscall> {
        self.calls
            .0
            .store(true, std::sync::atomic::Ordering::Relaxed);
        std::mem::take(&mut *self.calls.1.lock())
    }
}
