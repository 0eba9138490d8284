//! A disk decorator that encrypts every sector with XTS-AES-256.
//!
//! [`CryptDisk`] wraps an inner [`Disk`](disk_backend::Disk) and stores each sector
//! encrypted with XTS-AES-256 ([`XtsAes256`]): a 64-byte key, the sector as the data unit,
//! and the sector number as a 128-bit little-endian tweak, exactly dm-crypt's
//! `aes-xts-plain64`, so `cryptsetup --cipher aes-xts-plain64 --key-size 512` (plain mode,
//! same key) or OpenSSL's `aes-256-xts` read what it writes.
//!
//! It gives **confidentiality, not authentication**: whoever can write the inner disk can
//! corrupt sectors or replay old ones without detection, and equal plaintext in the same
//! sector gives equal ciphertext. It is not a key manager either: the caller supplies the
//! key.
//!
//! - Writes encrypt into a bounce buffer: the guest's buffer is read exactly once and
//!   never modified. Reads decrypt in place in the guest's buffer.
//! - Unmap is forwarded; [`UnmapBehavior::Zeroes`](disk_backend::UnmapBehavior) becomes
//!   `Unspecified`, since zeros on the inner disk decrypt to noise.
//! - Metadata, flush, persistent reservations, eject and `wait_resize` are the inner
//!   disk's.
//! - The key is not kept; the expanded key schedules are zeroed on drop.
//!
//! ```
//! use disk_backend::{Disk, DiskIo, UnmapBehavior};
//! use disk_crypt::CryptDisk;
//! use disk_ram::RamDisk;
//! use request_buffers::OwnedRequestBuffers;
//!
//! let key: Vec<u8> = (0..64).collect();
//! let inner = Disk::new(RamDisk::new(1024, 512)?)?;
//! let disk = Disk::new(CryptDisk::new(inner.clone(), &key)?)?;
//! assert_eq!(disk.unmap_behavior(), UnmapBehavior::Unspecified);
//!
//! let data = OwnedRequestBuffers::from_slice(&[0x42; 4096]);
//! let back = OwnedRequestBuffers::new(4096);
//! let raw = OwnedRequestBuffers::new(4096);
//! futures::executor::block_on(async {
//!     disk.write_vectored(&data.buffers(false), 8, false).await?;
//!     disk.read_vectored(&back.buffers(true), 8).await?;
//!     inner.read_vectored(&raw.buffers(true), 8).await
//! })?;
//! assert_eq!(back.to_vec(), vec![0x42; 4096]);
//! assert_ne!(raw.to_vec(), vec![0x42; 4096], "the inner disk holds ciphertext");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod disk;
mod error;
mod resolve;
mod xts;

pub use disk::CryptDisk;
pub use error::{InvalidDataUnit, InvalidKey};
pub use resolve::CryptResolver;
pub use xts::XtsAes256;
