//! Errors.

use thiserror::Error;

/// An XTS-AES-256 key was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum InvalidKey {
    /// The key is not 64 bytes long.
    #[error("invalid key length {0}: an XTS-AES-256 key is 64 bytes")]
    Length(usize),
    /// The two 32-byte halves of the key are equal.
    #[error("the two halves of the key are equal")]
    EqualHalves,
}

/// A buffer handed to [`XtsAes256`](crate::XtsAes256) is not a data unit: XTS without
/// ciphertext stealing needs a non-zero multiple of the 16-byte block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("invalid data unit of {len} bytes: must be a non-zero multiple of 16")]
pub struct InvalidDataUnit {
    /// The buffer's length in bytes.
    pub len: usize,
}
