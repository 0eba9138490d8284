//! The Persist Through Power Loss state file: its format, atomic replacement, and the checks
//! that refuse a torn or corrupted file.
//!
//! Layout (integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `PRWRAPST` |
//! | 4 | format version (1) |
//! | 4 | payload length `n` |
//! | `n` | payload |
//! | 4 | CRC-32 (IEEE) of everything before it |
//!
//! Payload: APTPL (1 byte, 0 or 1); the registration count (4 bytes), then per registration
//! the host id length (4), the host id, the controller id (2) and the key (8), in the order of
//! [`InitiatorId`]'s `Ord`; the reservation type as its SPC-4 code (1 byte, 0 for none) and,
//! for a type with a single holder, the holder's index in the registration list (4).
//!
//! A file is replaced by writing a temporary file in the same directory, syncing it, renaming
//! it over the old one and syncing the directory, so after a crash the path holds either the
//! old or the new state. The length and checksum catch what that cannot prevent (a file
//! truncated or damaged by something else, a file that is not ours).

use crate::InitiatorId;
use crate::state::{Reservation, ReservationState};
use disk_backend::pr::ReservationType;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"PRWRAPST";
const VERSION: u32 = 1;
/// Magic, version and payload length.
const HEADER_LEN: usize = 16;
const CHECKSUM_LEN: usize = 4;
/// The longest file the format can describe (a payload length is 32 bits): a load never
/// reads more.
const MAX_FILE_LEN: u64 = (HEADER_LEN + CHECKSUM_LEN) as u64 + u32::MAX as u64;

/// Restoring the reservation state from its file failed.
#[derive(Debug, Error)]
pub enum LoadStateError {
    /// The file exists but could not be read.
    #[error("failed to read reservation state file {}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file could never be saved: its directory does not exist, is on a read-only
    /// mount, or refuses new files. Found when the wrapper is built, so that the first
    /// command asking for persistence does not discover it.
    #[error("reservation state file {} cannot be written", path.display())]
    Unwritable {
        /// The state file.
        path: PathBuf,
        /// Why a file cannot be created next to it.
        #[source]
        source: io::Error,
    },
    /// The file is torn, damaged, or not a reservation state file.
    #[error("reservation state file {} is corrupt", path.display())]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: DecodeStateError,
    },
}

/// Decoding the bytes of a reservation state file failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeStateError {
    /// Shorter than the fixed header and checksum.
    #[error("{len} bytes is too short for a reservation state file")]
    TooShort {
        /// The file's length.
        len: usize,
    },
    /// Does not start with the magic bytes.
    #[error("not a reservation state file (bad magic)")]
    BadMagic,
    /// Written by a format version this code does not know.
    #[error("unsupported reservation state format version {0}")]
    UnsupportedVersion(u32),
    /// The file is not as long as its header says: typically a torn write.
    #[error("file is {actual} bytes but its header describes {expected}")]
    LengthMismatch {
        /// The length the header implies.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The checksum does not match the contents.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
    },
    /// The checksum matches but the contents break the format's rules.
    #[error("malformed reservation state: {0}")]
    Malformed(&'static str),
}

/// The bytes of the file for `state`. Only what survives power loss is written: when APTPL
/// is off that is nothing but the flag, and the generation restarts at 0 on every power on
/// (SPC-4), so it is never written.
pub(crate) fn encode(state: &ReservationState) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.push(u8::from(state.ptpl));
    let empty = Default::default();
    let registrations = if state.ptpl {
        &state.registrations
    } else {
        &empty
    };
    payload.extend_from_slice(&(registrations.len() as u32).to_le_bytes());
    for (id, key) in registrations {
        payload.extend_from_slice(&(id.host_id().len() as u32).to_le_bytes());
        payload.extend_from_slice(id.host_id());
        payload.extend_from_slice(&id.controller_id().to_le_bytes());
        payload.extend_from_slice(&key.to_le_bytes());
    }
    match state.reservation.as_ref().filter(|_| state.ptpl) {
        None => payload.push(0),
        Some(Reservation::AllRegistrants { reservation_type }) => {
            payload.push(type_code(*reservation_type));
        }
        Some(Reservation::Single {
            reservation_type,
            holder,
        }) => {
            payload.push(type_code(*reservation_type));
            // The holder is always registered (an invariant of `ReservationState`).
            let index = registrations
                .keys()
                .position(|id| id == holder)
                .unwrap_or(0);
            payload.extend_from_slice(&(index as u32).to_le_bytes());
        }
    }

    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

/// The state a file holds, as it is after a power on: generation 0, and nothing at all when
/// APTPL was off.
pub(crate) fn decode(bytes: &[u8]) -> Result<ReservationState, DecodeStateError> {
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(DecodeStateError::TooShort { len: bytes.len() });
    }
    if &bytes[..8] != MAGIC {
        return Err(DecodeStateError::BadMagic);
    }
    let mut header = Reader(&bytes[8..HEADER_LEN]);
    let version = header.u32()?;
    if version != VERSION {
        return Err(DecodeStateError::UnsupportedVersion(version));
    }
    let payload_len = header.u32()?;
    let expected = (HEADER_LEN + CHECKSUM_LEN) as u64 + u64::from(payload_len);
    if expected != bytes.len() as u64 {
        return Err(DecodeStateError::LengthMismatch {
            expected,
            actual: bytes.len() as u64,
        });
    }
    let (contents, stored) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let stored = Reader(stored).u32()?;
    let computed = crc32fast::hash(contents);
    if stored != computed {
        return Err(DecodeStateError::ChecksumMismatch { stored, computed });
    }

    let mut payload = Reader(&contents[HEADER_LEN..]);
    let mut state = ReservationState {
        ptpl: match payload.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeStateError::Malformed("invalid APTPL flag")),
        },
        ..Default::default()
    };
    let count = payload.u32()?;
    let mut ids = Vec::new();
    for _ in 0..count {
        let host_id_len = payload.u32()? as usize;
        let host_id = payload.take(host_id_len)?;
        let id = InitiatorId::new(host_id, payload.u16()?);
        let key = payload.u64()?;
        if key == 0 {
            return Err(DecodeStateError::Malformed("registration with key 0"));
        }
        if ids.last().is_some_and(|last| *last >= id) {
            return Err(DecodeStateError::Malformed(
                "registrations out of order or duplicated",
            ));
        }
        state.registrations.insert(id.clone(), key);
        ids.push(id);
    }
    let code = payload.u8()?;
    state.reservation = match code {
        0 => None,
        code => {
            let reservation_type = type_from_code(code)
                .ok_or(DecodeStateError::Malformed("unknown reservation type"))?;
            if reservation_type.is_all_registrants() {
                if ids.is_empty() {
                    return Err(DecodeStateError::Malformed(
                        "all registrants reservation without registrants",
                    ));
                }
                Some(Reservation::AllRegistrants { reservation_type })
            } else {
                let holder = ids
                    .get(payload.u32()? as usize)
                    .ok_or(DecodeStateError::Malformed("holder is not registered"))?;
                Some(Reservation::new(reservation_type, holder))
            }
        }
    };
    if !payload.0.is_empty() {
        return Err(DecodeStateError::Malformed("trailing bytes"));
    }
    if !state.ptpl {
        // Without APTPL nothing survives a power loss, whatever the file holds.
        return Ok(ReservationState::default());
    }
    Ok(state)
}

/// Reads the state file at `path`; a missing file is a fresh, empty state. Anything but a
/// regular file (a FIFO, a directory, a device) is refused at once, without waiting on it,
/// and no more than the format allows is ever read.
pub(crate) fn load(path: &Path) -> Result<ReservationState, LoadStateError> {
    use disk_backend::host_file::{OpenHostFileError, read_small_file};
    let bytes = match read_small_file(path, MAX_FILE_LEN) {
        Ok(bytes) => bytes,
        Err(OpenHostFileError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(ReservationState::default());
        }
        Err(error) => {
            return Err(LoadStateError::Read {
                path: path.to_path_buf(),
                source: error.into_io_error(),
            });
        }
    };
    decode(&bytes).map_err(|source| LoadStateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that [`save`] can replace the file at `path`: creates (and removes) a temporary
/// file in its directory, as `save` does.
pub(crate) fn check_writable(path: &Path) -> Result<(), LoadStateError> {
    tempfile::NamedTempFile::new_in(directory(path))
        .map(drop)
        .map_err(|source| LoadStateError::Unwritable {
            path: path.to_path_buf(),
            source,
        })
}

/// The directory holding `path`.
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Atomically replaces the file at `path` with `bytes`: temporary file in the same
/// directory, `fsync`, rename, `fsync` of the directory. Blocking.
pub(crate) fn save(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = directory(path);
    // The temporary file deletes itself if anything below fails before the rename.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|error| error.error)?;
    // The rename is durable only once the directory entry is.
    File::open(dir)?.sync_all()
}

/// The state file's decoder and encoder for the fuzz target (`fuzz/fuzz_targets/prwrap_state.rs`),
/// which checks that whatever decodes re-encodes to a file that decodes to the same state.
/// Not part of the crate's interface: the state itself stays private.
#[doc(hidden)]
pub mod codec {
    use super::{DecodeStateError, ReservationState};

    /// A decoded state file, opaque but comparable.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DecodedState(ReservationState);

    impl DecodedState {
        /// Whether the state persists through power loss (APTPL): only then does the file
        /// keep registrations and the reservation.
        pub fn persists(&self) -> bool {
            self.0.ptpl
        }

        /// The file the wrapper would write for this state.
        pub fn encode(&self) -> Vec<u8> {
            super::encode(&self.0)
        }
    }

    /// Decodes state file bytes exactly as loading a state file does.
    pub fn decode(bytes: &[u8]) -> Result<DecodedState, DecodeStateError> {
        super::decode(bytes).map(DecodedState)
    }
}

/// SPC-4's TYPE codes.
fn type_code(reservation_type: ReservationType) -> u8 {
    match reservation_type {
        ReservationType::WriteExclusive => 1,
        ReservationType::ExclusiveAccess => 3,
        ReservationType::WriteExclusiveRegistrantsOnly => 5,
        ReservationType::ExclusiveAccessRegistrantsOnly => 6,
        ReservationType::WriteExclusiveAllRegistrants => 7,
        ReservationType::ExclusiveAccessAllRegistrants => 8,
    }
}

fn type_from_code(code: u8) -> Option<ReservationType> {
    ReservationType::ALL
        .into_iter()
        .find(|&t| type_code(t) == code)
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeStateError> {
        if len > self.0.len() {
            return Err(DecodeStateError::Malformed("truncated payload"));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeStateError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, DecodeStateError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeStateError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeStateError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeStateError> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, controller_id: u16) -> InitiatorId {
        InitiatorId::new(name.as_bytes(), controller_id)
    }

    fn sample() -> ReservationState {
        let mut state = ReservationState {
            generation: 17,
            ptpl: true,
            ..Default::default()
        };
        state.registrations.insert(id("host-a", 0), 0xaaaa);
        state.registrations.insert(id("host-a", 1), 0xaaaa);
        state.registrations.insert(id("host-b", 0), u64::MAX);
        state
            .registrations
            .insert(InitiatorId::new(Vec::new(), 7), 1);
        state.reservation = Some(Reservation::new(
            ReservationType::ExclusiveAccessRegistrantsOnly,
            &id("host-b", 0),
        ));
        state
    }

    /// Re-seals `bytes` after editing the payload, so the checksum is valid and only the
    /// payload rules can catch the edit.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let len = bytes.len() - CHECKSUM_LEN;
        bytes.truncate(len);
        let payload_len = (len - HEADER_LEN) as u32;
        bytes[12..16].copy_from_slice(&payload_len.to_le_bytes());
        let checksum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    #[test]
    fn round_trip_resets_the_generation() {
        let state = sample();
        let restored = decode(&encode(&state)).unwrap();
        assert_eq!(restored.generation, 0, "PRGENERATION restarts at power on");
        assert_eq!(
            restored,
            ReservationState {
                generation: 0,
                ..state.clone()
            }
        );
        for t in ReservationType::ALL {
            let mut state = state.clone();
            state.reservation = Some(Reservation::new(t, &id("host-a", 1)));
            let restored = decode(&encode(&state)).unwrap();
            assert_eq!(restored.reservation, state.reservation, "{t:?}");
        }
    }

    #[test]
    fn without_ptpl_nothing_is_kept() {
        let state = ReservationState {
            ptpl: false,
            ..sample()
        };
        let bytes = encode(&state);
        assert!(bytes.len() < 30, "only the flag is written");
        assert_eq!(decode(&bytes).unwrap(), ReservationState::default());
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let error = decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    error,
                    DecodeStateError::TooShort { .. } | DecodeStateError::LengthMismatch { .. }
                ),
                "truncated to {len}: {error:?}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(DecodeStateError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = encode(&sample());
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    decode(&damaged).is_err(),
                    "flipping bit {bit} of byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn header_errors() {
        let bytes = encode(&sample());
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(decode(&magic), Err(DecodeStateError::BadMagic));
        let mut version = bytes.clone();
        version[8] = 2;
        assert_eq!(
            decode(&version),
            Err(DecodeStateError::UnsupportedVersion(2))
        );
        // A header claiming a huge payload is a length mismatch, not an allocation.
        let mut huge = bytes.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge),
            Err(DecodeStateError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn payload_rules_hold_even_with_a_valid_checksum() {
        let one = |key: u64, tail: &[u8]| {
            let mut state = ReservationState {
                ptpl: true,
                ..Default::default()
            };
            state.registrations.insert(id("a", 0), key.max(1));
            let mut bytes = encode(&state);
            // Rewrite the key and the reservation tail in place.
            let key_at = HEADER_LEN + 1 + 4 + 4 + 1 + 2;
            bytes[key_at..key_at + 8].copy_from_slice(&key.to_le_bytes());
            let tail_at = key_at + 8;
            bytes.truncate(tail_at);
            bytes.extend_from_slice(tail);
            bytes.extend_from_slice(&[0; CHECKSUM_LEN]);
            decode(&reseal(bytes))
        };
        assert_eq!(one(5, &[0]).unwrap().registrations.len(), 1);
        assert_eq!(
            one(0, &[0]),
            Err(DecodeStateError::Malformed("registration with key 0"))
        );
        assert_eq!(
            one(5, &[2]),
            Err(DecodeStateError::Malformed("unknown reservation type"))
        );
        assert_eq!(
            one(5, &[1, 1, 0, 0, 0]),
            Err(DecodeStateError::Malformed("holder is not registered"))
        );
        assert_eq!(
            one(5, &[1, 0, 0]),
            Err(DecodeStateError::Malformed("truncated payload"))
        );
        assert_eq!(
            one(5, &[0, 9]),
            Err(DecodeStateError::Malformed("trailing bytes"))
        );
        assert!(one(5, &[7]).is_ok());

        // Duplicated identities.
        let mut state = ReservationState {
            ptpl: true,
            ..Default::default()
        };
        state.registrations.insert(id("a", 0), 1);
        state.registrations.insert(id("b", 0), 2);
        let mut bytes = encode(&state);
        let second = HEADER_LEN + 1 + 4 + (4 + 1 + 2 + 8);
        bytes[second + 4] = b'a';
        assert_eq!(
            decode(&reseal(bytes)),
            Err(DecodeStateError::Malformed(
                "registrations out of order or duplicated"
            ))
        );
        // An All Registrants reservation needs registrants.
        let bytes = encode(&ReservationState {
            ptpl: true,
            ..Default::default()
        });
        let mut bytes = bytes[..bytes.len() - CHECKSUM_LEN - 1].to_vec();
        bytes.push(8);
        bytes.extend_from_slice(&[0; CHECKSUM_LEN]);
        assert_eq!(
            decode(&reseal(bytes)),
            Err(DecodeStateError::Malformed(
                "all registrants reservation without registrants"
            ))
        );
    }

    #[test]
    fn save_replaces_atomically_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pr.state");
        assert_eq!(load(&path).unwrap(), ReservationState::default());
        save(&path, &encode(&sample())).unwrap();
        let mut second = sample();
        second.registrations.clear();
        second.reservation = None;
        save(&path, &encode(&second)).unwrap();
        assert_eq!(load(&path).unwrap().registrations.len(), 0);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pr.state")]);
        // A directory that does not exist fails cleanly.
        assert!(save(&dir.path().join("missing/pr.state"), &[1]).is_err());
    }

    #[test]
    fn load_reports_unreadable_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as a file.
        assert!(matches!(load(dir.path()), Err(LoadStateError::Read { .. })));
        let path = dir.path().join("pr.state");
        std::fs::write(&path, b"").unwrap();
        let error = load(&path).unwrap_err();
        assert!(matches!(
            error,
            LoadStateError::Corrupt {
                source: DecodeStateError::TooShort { len: 0 },
                ..
            }
        ));
        assert!(error.to_string().contains("pr.state"));
    }
}
