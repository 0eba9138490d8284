//! Opening the host files behind disks and their small companions (keys, state files)
//! without hanging on, or reading without bound from, something that is not a file.
//!
//! A path in a disk spec is whatever the user typed, and `open(2)` of a FIFO blocks until a
//! writer appears, a read of `/dev/zero` never ends, and `O_DIRECT` on `/dev/null` fails with
//! a bare `EINVAL`. So every path is opened with `O_NONBLOCK` (which makes `open` of a FIFO
//! return at once and does nothing to regular files or block devices), its type is checked
//! on the open descriptor (no window for the path to change in between), and only then is
//! `O_NONBLOCK` cleared and `O_DIRECT` set with `fcntl`.

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use std::fs::{File, FileType};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What a data path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFileKind {
    /// A regular file.
    Regular,
    /// A block device.
    BlockDevice,
}

/// An open data file, checked to be a regular file or a block device.
#[derive(Debug)]
pub struct HostFile {
    /// The open file, blocking (`O_NONBLOCK` cleared).
    pub file: File,
    /// What it is.
    pub kind: HostFileKind,
}

impl HostFile {
    /// The size in bytes: a regular file's length, or a block device's capacity (its inode
    /// says 0), found by seeking to the end. The file position is not used by positioned
    /// I/O, so moving it is harmless.
    pub fn size_bytes(&self) -> io::Result<u64> {
        match self.kind {
            HostFileKind::Regular => Ok(self.file.metadata()?.len()),
            HostFileKind::BlockDevice => (&self.file).seek(SeekFrom::End(0)),
        }
    }
}

/// Opening a host file failed.
#[derive(Debug, Error)]
pub enum OpenHostFileError {
    /// `open` failed.
    #[error("cannot open {}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is something a disk cannot be backed by (a FIFO, a directory, a character
    /// device such as `/dev/null` or `/dev/zero`, a socket).
    #[error("{} is a {kind}, not a regular file or a block device", path.display())]
    NotAFileOrDevice {
        /// The path.
        path: PathBuf,
        /// What it is, in words (`fifo`, `directory`, `character device`, `socket`).
        kind: &'static str,
    },
    /// The path is something a small companion file (a key, a state file) cannot be.
    #[error("{} is a {kind}, not a regular file", path.display())]
    NotARegularFile {
        /// The path.
        path: PathBuf,
        /// What it is, in words.
        kind: &'static str,
    },
    /// The file refused `O_DIRECT`.
    #[error("{} does not support direct I/O (O_DIRECT)", path.display())]
    Direct {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A companion file is larger than its format allows.
    #[error("{} holds more than the {limit} bytes its format allows", path.display())]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// The most bytes allowed.
        limit: u64,
    },
    /// Reading a companion file failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl OpenHostFileError {
    /// The error as an `io::Error` of a fitting kind (`InvalidInput` for a wrong type or
    /// size, the cause's own kind otherwise), keeping this error as its payload.
    pub fn into_io_error(self) -> io::Error {
        let kind = match &self {
            Self::Open { source, .. } | Self::Direct { source, .. } | Self::Read { source, .. } => {
                source.kind()
            }
            Self::NotAFileOrDevice { .. }
            | Self::NotARegularFile { .. }
            | Self::TooLarge { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, self)
    }
}

/// A file type in words, for errors.
pub fn file_type_name(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` without blocking, whatever it is; on failure, says what the path is if that
/// explains it (a directory opened for writing, a socket).
fn open_nonblocking(
    path: &Path,
    write: bool,
    refuse: impl Fn(&'static str) -> OpenHostFileError,
) -> Result<File, OpenHostFileError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|source| match std::fs::metadata(path) {
            Ok(metadata) if !metadata.is_file() && !metadata.file_type().is_block_device() => {
                refuse(file_type_name(metadata.file_type()))
            }
            _ => OpenHostFileError::Open {
                path: path.to_owned(),
                source,
            },
        })
}

/// Sets the status flags of `file` to `set`, clearing `O_NONBLOCK`.
fn set_flags(file: &File, set: OFlag) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL((flags - OFlag::O_NONBLOCK) | set))?;
    Ok(())
}

/// Opens the data file of a disk: for reading, and writing if `write`; with `O_DIRECT` if
/// `direct`. Refuses anything but a regular file or a block device, at once (a FIFO is never
/// waited on).
pub fn open_host_file(
    path: &Path,
    write: bool,
    direct: bool,
) -> Result<HostFile, OpenHostFileError> {
    let refuse = |kind| OpenHostFileError::NotAFileOrDevice {
        path: path.to_owned(),
        kind,
    };
    let file = open_nonblocking(path, write, refuse)?;
    let metadata = file.metadata().map_err(|source| OpenHostFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    let file_type = metadata.file_type();
    let kind = if file_type.is_file() {
        HostFileKind::Regular
    } else if file_type.is_block_device() {
        HostFileKind::BlockDevice
    } else {
        return Err(refuse(file_type_name(file_type)));
    };
    let set = if direct {
        OFlag::O_DIRECT
    } else {
        OFlag::empty()
    };
    set_flags(&file, set).map_err(|source| {
        if direct {
            OpenHostFileError::Direct {
                path: path.to_owned(),
                source,
            }
        } else {
            OpenHostFileError::Open {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    Ok(HostFile { file, kind })
}

/// Opens a companion file (a state file) that must be a regular file: for reading, and
/// writing if `write`. Refuses anything else at once.
pub fn open_regular_file(path: &Path, write: bool) -> Result<File, OpenHostFileError> {
    let refuse = |kind| OpenHostFileError::NotARegularFile {
        path: path.to_owned(),
        kind,
    };
    let file = open_nonblocking(path, write, refuse)?;
    let metadata = file.metadata().map_err(|source| OpenHostFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(refuse(file_type_name(metadata.file_type())));
    }
    set_flags(&file, OFlag::empty()).map_err(|source| OpenHostFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(file)
}

/// Reads a small regular file (a key) whole, refusing anything else at once and a file of
/// more than `limit` bytes without reading past `limit + 1` bytes (a file can grow while it
/// is read, so its size alone is not trusted).
pub fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>, OpenHostFileError> {
    let file = open_regular_file(path, false)?;
    let mut data = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|source| OpenHostFileError::Read {
            path: path.to_owned(),
            source,
        })?;
    if data.len() as u64 > limit {
        return Err(OpenHostFileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &Path) -> PathBuf {
        let path = dir.join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    #[test]
    fn data_files_must_be_files_or_devices() {
        let dir = tempfile_dir();
        let fifo = fifo(&dir);
        for write in [false, true] {
            for (path, kind) in [
                (fifo.as_path(), "fifo"),
                (dir.as_path(), "directory"),
                (Path::new("/dev/null"), "character device"),
            ] {
                for direct in [false, true] {
                    let error = open_host_file(path, write, direct).unwrap_err();
                    assert!(
                        matches!(error, OpenHostFileError::NotAFileOrDevice { kind: k, .. } if k == kind),
                        "{path:?} write {write} direct {direct}: {error}"
                    );
                    assert!(error.to_string().contains(&*path.to_string_lossy()));
                }
            }
        }
        let file = dir.join("data");
        std::fs::write(&file, [1u8; 4096]).unwrap();
        let host = open_host_file(&file, true, false).unwrap();
        assert_eq!(host.kind, HostFileKind::Regular);
        assert_eq!(host.size_bytes().unwrap(), 4096);
        let flags = OFlag::from_bits_retain(fcntl(&host.file, FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_NONBLOCK));
        assert!(matches!(
            open_host_file(&dir.join("missing"), false, false),
            Err(OpenHostFileError::Open { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn small_files_are_bounded() {
        let dir = tempfile_dir();
        let fifo = fifo(&dir);
        assert!(matches!(
            read_small_file(&fifo, 64),
            Err(OpenHostFileError::NotARegularFile { kind: "fifo", .. })
        ));
        assert!(matches!(
            read_small_file(Path::new("/dev/zero"), 64),
            Err(OpenHostFileError::NotARegularFile {
                kind: "character device",
                ..
            })
        ));
        let key = dir.join("key");
        std::fs::write(&key, [7u8; 64]).unwrap();
        assert_eq!(read_small_file(&key, 64).unwrap(), [7u8; 64]);
        std::fs::write(&key, [7u8; 65]).unwrap();
        assert!(matches!(
            read_small_file(&key, 64),
            Err(OpenHostFileError::TooLarge { limit: 64, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "host-file-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap();
        dir
    }
}
