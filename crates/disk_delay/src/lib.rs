//! A disk decorator that adds a latency to every read and write.
//!
//! [`DelayDisk`] waits for its current delay before passing a read or write to the inner
//! [`Disk`]; everything else (flush, unmap, metadata, reservations, eject, resize
//! notification) is forwarded at once. It exists for tests of queue depth, timeouts and
//! cancellation, where a disk that answers instantly hides the behaviour under test.
//!
//! - The delay can change while requests are in flight ([`DelayDisk::set_delay`]); each
//!   request uses the delay in force when it was issued.
//! - Requests wait concurrently: sixteen requests issued together with a 10 ms delay all
//!   complete after about 10 ms, not 160 ms.
//! - The timer is `futures-timer`'s, driven by its own helper thread, so it works under any
//!   executor (`futures::executor::block_on`, tokio, a VMM's own), not only tokio's.
//! - A zero delay costs no timer at all.
//!
//! ```
//! use disk_backend::Disk;
//! use disk_delay::DelayDisk;
//! use disk_ram::RamDisk;
//! use request_buffers::OwnedRequestBuffers;
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//!
//! let inner = Disk::new(RamDisk::new(1024, 512)?)?;
//! let delay = Arc::new(DelayDisk::new(inner, Duration::from_millis(20)));
//! // Keep a handle to change the delay while a `Disk` owns the decorator.
//! let disk = Disk::new(delay.clone())?;
//! let buf = OwnedRequestBuffers::new(4096);
//!
//! let start = Instant::now();
//! futures::executor::block_on(disk.read_vectored(&buf.buffers(true), 0))?;
//! assert!(start.elapsed() >= Duration::from_millis(20));
//!
//! delay.set_delay(Duration::ZERO);
//! futures::executor::block_on(disk.read_vectored(&buf.buffers(true), 0))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod resolve;

pub use resolve::DelayResolver;

use disk_backend::pr::PersistentReservation;
use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use request_buffers::RequestBuffers;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A disk that delays every read and write by a changeable latency.
///
/// See the [crate documentation](crate).
#[derive(Debug)]
pub struct DelayDisk {
    inner: Disk,
    /// The delay in nanoseconds (saturated: about 584 years at most).
    delay_nanos: AtomicU64,
}

impl DelayDisk {
    /// Wraps `inner`, delaying reads and writes by `delay`.
    pub fn new(inner: Disk, delay: Duration) -> Self {
        Self {
            inner,
            delay_nanos: AtomicU64::new(nanos(delay)),
        }
    }

    /// Changes the delay for requests issued from now on; requests already waiting keep
    /// the delay they started with.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_nanos.store(nanos(delay), Ordering::Relaxed);
    }

    /// The current delay.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }

    /// The inner disk.
    pub fn inner(&self) -> &Disk {
        &self.inner
    }

    async fn wait(&self) {
        let delay = self.delay();
        if !delay.is_zero() {
            futures_timer::Delay::new(delay).await;
        }
    }
}

fn nanos(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX)
}

impl DiskIo for DelayDisk {
    fn disk_type(&self) -> &str {
        "delay"
    }

    disk_backend::forward_disk_metadata!(self.inner);

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.wait().await;
        self.inner.read_vectored(buffers, sector).await
    }

    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.wait().await;
        self.inner.write_vectored(buffers, sector, fua).await
    }

    fn sync_cache(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.sync_cache()
    }

    fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.unmap(sector, count, block_level_only)
    }

    fn unmap_behavior(&self) -> UnmapBehavior {
        self.inner.unmap_behavior()
    }

    fn optimal_unmap_sectors(&self) -> u32 {
        self.inner.optimal_unmap_sectors()
    }

    fn pr(&self) -> Option<&dyn PersistentReservation> {
        self.inner.pr()
    }

    fn eject(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        self.inner.eject()
    }

    fn wait_resize(&self, sector_count: u64) -> impl Future<Output = u64> + Send {
        self.inner.wait_resize(sector_count)
    }
}
