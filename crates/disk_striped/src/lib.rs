//! A disk striped (RAID 0) over several member disks of equal geometry.
//!
//! [`StripedDisk`] spreads its sectors over `N` member [`Disk`](disk_backend::Disk)s in
//! chunks (default [`DEFAULT_CHUNK_SIZE_BYTES`], 128 KiB): chunk `i` lives on member
//! `i % N` at chunk `i / N`. It adds capacity and parallelism, not redundancy: losing one
//! member loses the disk.
//!
//! - A read or write becomes one sub-request per chunk it touches, all issued concurrently.
//!   The striped request waits for every sub-request even after one fails, so no I/O is
//!   still running against the caller's buffers when it completes, then returns the first
//!   error in request order. I/O errors carry the failing member's index (see
//!   [`MemberError`] and [`failed_member`]).
//! - An unmap sends one merged range to each member involved; a flush goes to every member.
//! - Metadata folds over the members: the largest physical sector size and optimal unmap
//!   granularity, FUA only if every member respects it, and the unmap behaviour the members
//!   agree on (`Unspecified` if they disagree).
//! - Without an explicit size, the size follows the members (the whole chunks of the
//!   smallest, times `N`) and `wait_resize` completes when a member's resize changes it.
//!
//! ```
//! use disk_backend::{Disk, DiskIo};
//! use disk_ram::RamDisk;
//! use disk_striped::StripedDisk;
//! use request_buffers::OwnedRequestBuffers;
//!
//! let mut members = Vec::new();
//! for _ in 0..4 {
//!     members.push(Disk::new(RamDisk::new(1024, 512)?)?);
//! }
//! // 4 KiB chunks: chunk 1 (sectors 8..16) lives on member 1 at sectors 0..8.
//! let striped = StripedDisk::new(members.clone(), Some(4096), None)?;
//! assert_eq!(striped.sector_count(), 4 * 1024);
//! let disk = Disk::new(striped)?;
//!
//! let data = OwnedRequestBuffers::from_slice(&[7; 4096]);
//! let back = OwnedRequestBuffers::new(4096);
//! futures::executor::block_on(async {
//!     disk.write_vectored(&data.buffers(false), 8, false).await?;
//!     members[1].read_vectored(&back.buffers(true), 0).await
//! })?;
//! assert_eq!(back.to_vec(), vec![7; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod disk;
mod error;
mod layout;
mod resolve;

pub use disk::{DEFAULT_CHUNK_SIZE_BYTES, StripedDisk};
pub use error::{MemberError, NewStripedDiskError, failed_member};
pub use resolve::StripedResolver;
