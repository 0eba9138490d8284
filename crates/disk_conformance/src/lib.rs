//! The conformance suite every [`DiskIo`] backend runs from its own tests.
//!
//! A backend hands the suite a factory that builds a fresh disk for a [`DiskSpec`]; the
//! suite checks the contract of [`DiskIo`] on it, both through [`Disk`] and on the bare
//! backend:
//!
//! - [`range_edges`]: sector 0, the last sector, one past the end, straddling the end,
//!   `u64::MAX`, a sector whose byte offset overflows `u64` and one past the `i64::MAX` byte
//!   limit, for read, write and unmap: in range succeeds, everything else is exactly
//!   [`DiskError::IllegalBlock`];
//! - [`zero_length`]: empty requests succeed without side effects;
//! - [`read_only`]: a read-only disk reads, flushes, and refuses writes and unmaps with
//!   [`DiskError::ReadOnly`] without changing a byte;
//! - [`buffer_layouts`]: data survives a round trip through scattered and unaligned guest
//!   buffers, with and without FUA;
//! - [`unmap_semantics`]: unmapped sectors read back as the disk's
//!   [`UnmapBehavior`] promises;
//! - [`model`]: random reads, writes, unmaps and flushes, many in flight at once, checked
//!   against a plain in-memory reference;
//! - [`sector_atomicity`]: a read racing an overlapping write sees every sector whole, from
//!   before or after the write, never a mix.
//!
//! [`conformance_tests!`] turns all of them into `#[test]`s:
//!
//! ```ignore
//! disk_conformance::conformance_tests!(ram_512, |spec| {
//!     disk_ram::RamDisk::new(spec.sector_count, 512).unwrap().with_read_only(spec.read_only)
//! });
//! ```
//!
//! [`MemoryProbe`] is a disk for checking that decorators and frontends pass guest memory
//! on ([`DiskIo::register_memory`]).
//!
//! The model test runs one fixed seed by default. `DISK_CONFORMANCE_SEED=N` replays seed `N`;
//! `DISK_CONFORMANCE_SEEDS=K` runs `K` seeds (`cargo xtask stress K` does that in release).

#![forbid(unsafe_code)]

mod atomicity;
pub mod host;
mod model;
mod probe;

/// Visible skips (the `test_skip` crate): `skipping: REASON`, a record `cargo xtask ci`
/// counts, and a failure under `CI=true` for what CI machines have.
pub use test_skip as skip;

pub use atomicity::sector_atomicity;
pub use model::{FIXED_SEED, model, model_with_seed, seeds};
pub use probe::MemoryProbe;

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;

/// What a factory is asked to build. The factory may round the sector count (a striped
/// disk needs whole stripes); the suite reads the actual geometry from the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Desired sector count.
    pub sector_count: u64,
    /// Whether the disk must be read-only.
    pub read_only: bool,
}

/// The sector count the suite asks for.
pub const DEFAULT_SECTOR_COUNT: u64 = 256;

/// Builds a disk for a spec.
pub trait DiskFactory {
    /// The backend type.
    type Backend: DiskIo;
    /// A fresh disk with all-zero contents (a read-only one may hold any data).
    fn create(&self, spec: &DiskSpec) -> Self::Backend;
}

impl<T: DiskIo, F: Fn(&DiskSpec) -> T> DiskFactory for F {
    type Backend = T;
    fn create(&self, spec: &DiskSpec) -> T {
        self(spec)
    }
}

/// Identity function that gives a closure's parameter its type, for
/// [`conformance_tests!`].
pub fn factory<T: DiskIo>(f: impl Fn(&DiskSpec) -> T) -> impl Fn(&DiskSpec) -> T {
    f
}

fn writable(factory: &impl DiskFactory) -> DiskSpec {
    let _ = factory;
    DiskSpec {
        sector_count: DEFAULT_SECTOR_COUNT,
        read_only: false,
    }
}

/// A byte pattern that differs per sector and per `salt`, so misplaced data is caught.
pub fn pattern(sector_size: u32, first_sector: u64, sectors: u64, salt: u8) -> Vec<u8> {
    let mut data = Vec::with_capacity((sectors * sector_size as u64) as usize);
    for s in first_sector..first_sector + sectors {
        for i in 0..sector_size as u64 {
            data.push((s.wrapping_mul(31) ^ i.wrapping_mul(7) ^ salt as u64) as u8 | 1);
        }
    }
    data
}

#[track_caller]
fn expect_illegal(result: Result<(), DiskError>, what: &str) {
    match result {
        Err(DiskError::IllegalBlock) => {}
        other => panic!("{what}: expected IllegalBlock, got {other:?}"),
    }
}

/// Requests that must fail with `IllegalBlock` for a disk of `sector_count` sectors of
/// `sector_size` bytes, as `(description, sector, sectors)`.
fn illegal_ranges(sector_count: u64, sector_size: u32) -> Vec<(&'static str, u64, u64)> {
    let ss = sector_size as u64;
    vec![
        ("one past the end", sector_count, 1),
        ("straddling the end", sector_count - 1, 2),
        ("far past the end", sector_count + 1000, 1),
        ("u64::MAX", u64::MAX, 1),
        ("sector * sector_size overflows u64", u64::MAX / ss + 1, 1),
        ("end byte offset past i64::MAX", (i64::MAX as u64) / ss, 1),
        ("start byte offset at 2^63", (1u64 << 63) / ss, 1),
    ]
}

/// Sector range edges for read, write and unmap, through [`Disk`] and on the bare backend.
pub fn range_edges(factory: &impl DiskFactory) {
    let spec = writable(factory);
    let bare = factory.create(&spec);
    let disk = Disk::new(factory.create(&spec)).expect("backend geometry is valid");
    let sector_count = disk.sector_count();
    let ss = disk.sector_size();
    assert!(sector_count >= 2, "the suite needs at least two sectors");

    let one = OwnedRequestBuffers::from_slice(&pattern(ss, 0, 1, 1));
    let two = OwnedRequestBuffers::from_slice(&pattern(ss, 0, 2, 2));
    let sink = OwnedRequestBuffers::new(2 * ss as usize);
    let last = sector_count - 1;

    block_on(async {
        // In range, at both ends.
        for sector in [0, last] {
            disk.write_vectored(&one.buffers(false), sector, false)
                .await
                .expect("write in range");
            disk.read_vectored(&sink.buffers(true).subrange(0, ss as usize), sector)
                .await
                .expect("read in range");
            assert_eq!(
                &sink.to_vec()[..ss as usize],
                &one.to_vec()[..],
                "data at sector {sector}"
            );
            bare.write_vectored(&one.buffers(false), sector, true)
                .await
                .expect("bare write in range");
            bare.read_vectored(&sink.buffers(true).subrange(0, ss as usize), sector)
                .await
                .expect("bare read in range");
        }
        disk.unmap(0, 1, false).await.expect("unmap sector 0");
        disk.unmap(last, 1, false).await.expect("unmap last sector");
        disk.unmap(0, sector_count, false)
            .await
            .expect("unmap whole disk");
        bare.unmap(last, 1, false)
            .await
            .expect("bare unmap last sector");

        for (what, sector, sectors) in illegal_ranges(sector_count, ss) {
            let buf = if sectors == 1 { &one } else { &two };
            let len = (sectors * ss as u64) as usize;
            let reads = sink.buffers(true).subrange(0, len);
            expect_illegal(
                disk.read_vectored(&reads, sector).await,
                &format!("read {what}"),
            );
            expect_illegal(
                bare.read_vectored(&reads, sector).await,
                &format!("bare read {what}"),
            );
            expect_illegal(
                disk.write_vectored(&buf.buffers(false), sector, false)
                    .await,
                &format!("write {what}"),
            );
            expect_illegal(
                bare.write_vectored(&buf.buffers(false), sector, false)
                    .await,
                &format!("bare write {what}"),
            );
            expect_illegal(
                disk.unmap(sector, sectors, false).await,
                &format!("unmap {what}"),
            );
            expect_illegal(
                bare.unmap(sector, sectors, false).await,
                &format!("bare unmap {what}"),
            );
        }
        for (what, sector, count) in [
            ("count u64::MAX", 0, u64::MAX),
            ("sector + count overflows", 1, u64::MAX),
            ("count one past the end", 0, sector_count + 1),
        ] {
            expect_illegal(
                disk.unmap(sector, count, false).await,
                &format!("unmap {what}"),
            );
            expect_illegal(
                bare.unmap(sector, count, false).await,
                &format!("bare unmap {what}"),
            );
        }

        // Buffers that are not whole sectors are malformed, not out of range.
        let ragged = OwnedRequestBuffers::new(ss as usize + 1);
        assert!(matches!(
            disk.read_vectored(&ragged.buffers(true), 0).await,
            Err(DiskError::InvalidInput)
        ));
        assert!(matches!(
            disk.write_vectored(&ragged.buffers(false), 0, false).await,
            Err(DiskError::InvalidInput)
        ));
    });
}

/// Zero-length requests succeed and change nothing.
pub fn zero_length(factory: &impl DiskFactory) {
    let spec = writable(factory);
    let bare = factory.create(&spec);
    let disk = Disk::new(factory.create(&spec)).expect("backend geometry is valid");
    let sector_count = disk.sector_count();
    let empty = OwnedRequestBuffers::new(0);
    block_on(async {
        for sector in [0, sector_count - 1, sector_count] {
            disk.read_vectored(&empty.buffers(true), sector)
                .await
                .expect("empty read");
            disk.write_vectored(&empty.buffers(false), sector, true)
                .await
                .expect("empty write");
            disk.unmap(sector, 0, false).await.expect("empty unmap");
        }
        bare.read_vectored(&empty.buffers(true), 0)
            .await
            .expect("bare empty read");
        bare.write_vectored(&empty.buffers(false), 0, false)
            .await
            .expect("bare empty write");
        // A zero-length request at an unrepresentable sector is still malformed.
        expect_illegal(
            disk.read_vectored(&empty.buffers(true), u64::MAX).await,
            "empty read at u64::MAX",
        );
        let all = OwnedRequestBuffers::new((sector_count * disk.sector_size() as u64) as usize);
        disk.read_vectored(&all.buffers(true), 0)
            .await
            .expect("read whole disk");
        assert!(
            all.to_vec().iter().all(|&b| b == 0),
            "a fresh disk reads as zeros"
        );
    });
}

/// A read-only disk reads and flushes but refuses writes and unmaps, unchanged.
pub fn read_only(factory: &impl DiskFactory) {
    let spec = DiskSpec {
        sector_count: DEFAULT_SECTOR_COUNT,
        read_only: true,
    };
    let bare = factory.create(&spec);
    assert!(bare.is_read_only(), "the factory must honour read_only");
    let disk = Disk::new(factory.create(&spec)).expect("backend geometry is valid");
    assert!(disk.is_read_only());
    let ss = disk.sector_size() as usize;
    let size = (disk.sector_count() * ss as u64) as usize;
    let before = OwnedRequestBuffers::new(size);
    let after = OwnedRequestBuffers::new(size);
    let data = OwnedRequestBuffers::from_slice(&pattern(ss as u32, 0, 2, 3));
    block_on(async {
        disk.read_vectored(&before.buffers(true), 0)
            .await
            .expect("read-only disks read");
        for fua in [false, true] {
            for target in [&disk as &dyn ReadOnlyProbe, &bare as &dyn ReadOnlyProbe] {
                assert!(
                    matches!(
                        target.probe_write(&data, 0, fua).await,
                        Err(DiskError::ReadOnly)
                    ),
                    "write (fua {fua}) to a read-only disk"
                );
                assert!(
                    matches!(target.probe_unmap(0, 2).await, Err(DiskError::ReadOnly)),
                    "unmap of a read-only disk"
                );
            }
        }
        disk.sync_cache().await.expect("read-only disks flush");
        bare.sync_cache().await.expect("bare read-only disks flush");
        disk.read_vectored(&after.buffers(true), 0)
            .await
            .expect("read-only disks read");
    });
    assert!(
        before.to_vec() == after.to_vec(),
        "a refused request changed the disk"
    );
}

/// Object-safe access to write/unmap for testing `Disk` and the bare backend alike.
trait ReadOnlyProbe {
    fn probe_write<'a>(
        &'a self,
        data: &'a OwnedRequestBuffers,
        sector: u64,
        fua: bool,
    ) -> futures::future::BoxFuture<'a, Result<(), DiskError>>;
    fn probe_unmap(
        &self,
        sector: u64,
        count: u64,
    ) -> futures::future::BoxFuture<'_, Result<(), DiskError>>;
}

impl<T: DiskIo> ReadOnlyProbe for T {
    fn probe_write<'a>(
        &'a self,
        data: &'a OwnedRequestBuffers,
        sector: u64,
        fua: bool,
    ) -> futures::future::BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(async move { self.write_vectored(&data.buffers(false), sector, fua).await })
    }
    fn probe_unmap(
        &self,
        sector: u64,
        count: u64,
    ) -> futures::future::BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(DiskIo::unmap(self, sector, count, false))
    }
}

/// Round trips through scattered and unaligned guest buffers, with and without FUA.
pub fn buffer_layouts(factory: &impl DiskFactory) {
    let disk = Disk::new(factory.create(&writable(factory))).expect("backend geometry is valid");
    let ss = disk.sector_size();
    let sectors = 5u64.min(disk.sector_count());
    let len = (sectors * ss as u64) as usize;
    block_on(async {
        for (i, offset) in [0usize, 1, 512, 4095].into_iter().enumerate() {
            let data = pattern(ss, 0, sectors, i as u8);
            let src = OwnedRequestBuffers::scattered(len, offset);
            src.copy_from_slice(&data);
            disk.write_vectored(&src.buffers(false), 0, i % 2 == 1)
                .await
                .expect("write");
            let dst = OwnedRequestBuffers::scattered(len, 4095 - offset);
            disk.read_vectored(&dst.buffers(true), 0)
                .await
                .expect("read");
            assert!(
                dst.to_vec() == data,
                "round trip through buffers at offset {offset}"
            );
        }
        disk.sync_cache().await.expect("flush");
    });
}

/// Unmapped sectors read back as the disk's unmap behaviour promises.
pub fn unmap_semantics(factory: &impl DiskFactory) {
    let disk = Disk::new(factory.create(&writable(factory))).expect("backend geometry is valid");
    let ss = disk.sector_size();
    let count = disk.sector_count().min(64);
    let data = pattern(ss, 0, count, 9);
    let buf = OwnedRequestBuffers::from_slice(&data);
    let back = OwnedRequestBuffers::new(data.len());
    block_on(async {
        disk.write_vectored(&buf.buffers(false), 0, false)
            .await
            .expect("write");
        // Unmap the middle, leaving a sector on each side.
        disk.unmap(1, count - 2, false).await.expect("unmap");
        disk.read_vectored(&back.buffers(true), 0)
            .await
            .expect("read");
    });
    let got = back.to_vec();
    let ss = ss as usize;
    assert!(
        got[..ss] == data[..ss],
        "unmap touched the sector before the range"
    );
    assert!(
        got[got.len() - ss..] == data[data.len() - ss..],
        "unmap touched the sector after the range"
    );
    match disk.unmap_behavior() {
        UnmapBehavior::Zeroes => assert!(
            got[ss..got.len() - ss].iter().all(|&b| b == 0),
            "UnmapBehavior::Zeroes but unmapped sectors are not zero"
        ),
        UnmapBehavior::Ignored => assert!(got == data, "UnmapBehavior::Ignored but data changed"),
        UnmapBehavior::Unspecified => {}
    }
}

/// Expands to one `#[test]` per conformance check, in a module named `$name`, for the disks
/// `$factory` (a closure from [`&DiskSpec`](DiskSpec) to a backend) builds.
///
/// With `skip_if: $unavailable` (an expression giving `Option<impl Display>`, evaluated in
/// each test), a test whose `$unavailable` is `Some(reason)` is skipped through
/// [`skip::skip`] without building a disk: for backends that need something the machine may
/// lack (root for loop devices, a kernel feature). It says `skipping: reason` and passes,
/// or fails under `CI=true`.
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $factory:expr) => {
        $crate::conformance_tests!($name, skip_if: None::<&str>, $factory);
    };
    ($name:ident, skip_if: $unavailable:expr, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            /// The factory, or `None` (having said why) where the disks cannot be built.
            fn factory() -> Option<impl $crate::DiskFactory> {
                if let Some(reason) = $unavailable {
                    $crate::skip::skip(reason);
                    return None;
                }
                Some($crate::factory($factory))
            }

            #[test]
            fn conformance_range_edges() {
                if let Some(f) = factory() {
                    $crate::range_edges(&f);
                }
            }

            #[test]
            fn conformance_zero_length() {
                if let Some(f) = factory() {
                    $crate::zero_length(&f);
                }
            }

            #[test]
            fn conformance_read_only() {
                if let Some(f) = factory() {
                    $crate::read_only(&f);
                }
            }

            #[test]
            fn conformance_buffer_layouts() {
                if let Some(f) = factory() {
                    $crate::buffer_layouts(&f);
                }
            }

            #[test]
            fn conformance_unmap_semantics() {
                if let Some(f) = factory() {
                    $crate::unmap_semantics(&f);
                }
            }

            #[test]
            fn conformance_model() {
                if let Some(f) = factory() {
                    $crate::model(&f);
                }
            }

            #[test]
            fn conformance_sector_atomicity() {
                if let Some(f) = factory() {
                    $crate::sector_atomicity(&f);
                }
            }
        }
    };
}
