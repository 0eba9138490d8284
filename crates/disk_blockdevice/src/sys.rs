//! Linux interfaces that have no std wrapper: block device ioctls, sysfs queue attributes,
//! `fallocate`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

// The ioctl numbers below use the generic `_IOC` encoding (x86, Arm, RISC-V, LoongArch).
// Architectures with their own encoding would need their own numbers.
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
compile_error!("disk_blockdevice encodes ioctl numbers for the generic _IOC layout only");

pub(crate) const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)` in the generic layout: nr 8 bits, type 8, size 14, dir 2.
pub(crate) const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `_IO(0x12, 94)`: read-only flag, an `int`.
pub(crate) const BLKROGET: u64 = ioc(0, 0x12, 94, 0);
/// `_IO(0x12, 104)`: logical sector size, an `int`.
pub(crate) const BLKSSZGET: u64 = ioc(0, 0x12, 104, 0);
/// `_IOR(0x12, 114, size_t)`: size in bytes, a `u64`.
pub(crate) const BLKGETSIZE64: u64 = ioc(IOC_READ, 0x12, 114, size_of::<usize>());
/// `_IO(0x12, 119)`: discard `[start, len]` bytes.
pub(crate) const BLKDISCARD: u64 = ioc(0, 0x12, 119, 0);
/// `_IO(0x12, 123)`: physical block size, an `unsigned int`.
pub(crate) const BLKPBSZGET: u64 = ioc(0, 0x12, 123, 0);
/// `_IO(0x12, 127)`: write zeroes to `[start, len]` bytes.
pub(crate) const BLKZEROOUT: u64 = ioc(0, 0x12, 127, 0);
/// `CDROMEJECT` from `linux/cdrom.h`.
pub(crate) const CDROMEJECT: u64 = 0x5309;

/// Issues `ioctl(fd, request, arg)`, retrying on `EINTR`.
///
/// # Safety
///
/// `arg` must be what `request` expects: null, an integer, or a pointer to memory of the
/// size and direction the request's number encodes, valid for the duration of the call.
pub(crate) unsafe fn ioctl(file: &File, request: u64, arg: *mut libc::c_void) -> io::Result<i32> {
    loop {
        // SAFETY: the caller vouches for `arg`; the descriptor is open for `file`'s lifetime.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) };
        if rc >= 0 {
            return Ok(rc);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The size of a block device in bytes (`BLKGETSIZE64`).
pub(crate) fn device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live and writable.
    unsafe { ioctl(file, BLKGETSIZE64, (&raw mut size).cast())? };
    Ok(size)
}

/// Reads an `int`-sized value with `request` (`BLKSSZGET`, `BLKPBSZGET`, `BLKROGET`).
pub(crate) fn device_int(file: &File, request: u64) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int through the pointer, which is live and writable.
    unsafe { ioctl(file, request, (&raw mut value).cast())? };
    Ok(value as u32)
}

/// Issues a range ioctl (`BLKDISCARD`, `BLKZEROOUT`) for `len` bytes at `offset`.
pub(crate) fn device_range(file: &File, request: u64, offset: u64, len: u64) -> io::Result<()> {
    let mut range = [offset, len];
    // SAFETY: both requests read two u64s through the pointer, which is live for the call.
    unsafe { ioctl(file, request, range.as_mut_ptr().cast())? };
    Ok(())
}

/// Writes the dirty page-cache pages of `offset..offset + len` back to the device and waits
/// for them (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`), retrying on `EINTR`.
pub(crate) fn write_back_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off64_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off64_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
        if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `fallocate(fd, mode, offset, len)`, retrying on `EINTR`.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether the file system can punch holes in `file` of `size` bytes. Punching past the end
/// with `KEEP_SIZE` changes nothing but tells an unsupported file system (`EOPNOTSUPP`) apart.
pub(crate) fn supports_punch_hole(file: &File, size: u64) -> bool {
    size.checked_add(4096)
        .is_some_and(|end| end <= i64::MAX as u64)
        && fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            size,
            4096,
        )
        .is_ok()
}

/// A device number split into major and minor (glibc's `dev_t` encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceNumber {
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl DeviceNumber {
    /// Splits a `dev_t`.
    pub fn from_dev(dev: u64) -> Self {
        Self {
            major: (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32,
        }
    }

    /// The device number of an open block device.
    pub(crate) fn of(file: &File) -> io::Result<Self> {
        Ok(Self::from_dev(file.metadata()?.rdev()))
    }
}

/// The sysfs directory of a block device (`/sys/dev/block/MAJ:MIN`), and the attributes this
/// crate reads from it. Absent attributes read as `None`: sysfs may not be mounted (a
/// container), in which case the defaults are the conservative choice.
#[derive(Debug, Clone)]
pub(crate) struct Sysfs {
    dir: PathBuf,
}

impl Sysfs {
    pub(crate) fn new(device: DeviceNumber) -> Self {
        Self {
            dir: PathBuf::from(format!("/sys/dev/block/{}:{}", device.major, device.minor)),
        }
    }

    fn read(&self, relative: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(relative))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// A queue attribute; a partition has none of its own and uses its disk's.
    pub(crate) fn queue(&self, name: &str) -> Option<String> {
        self.read(&format!("queue/{name}"))
            .or_else(|| self.read(&format!("../queue/{name}")))
    }

    pub(crate) fn queue_u64(&self, name: &str) -> Option<u64> {
        self.queue(name)?.parse().ok()
    }

    /// Whether the medium is removable (`removable` is 1).
    pub(crate) fn is_removable(&self) -> bool {
        self.read("removable").as_deref() == Some("1")
    }

    /// Whether the device is a loop device (it has a `loop` directory).
    pub(crate) fn is_loop(&self) -> bool {
        self.dir.join("loop").is_dir()
    }
}

/// Maps an errno from the block layer to a disk error: `EBADE` is how the kernel reports a
/// reservation conflict (`BLK_STS_RESV_CONFLICT`), `EILSEQ`/`ENODATA` a medium error.
pub(crate) fn disk_error(error: io::Error) -> disk_backend::DiskError {
    use disk_backend::{DiskError, MediumErrorDetails};
    match error.raw_os_error() {
        Some(libc::EBADE) => DiskError::ReservationConflict,
        Some(libc::EROFS) => DiskError::ReadOnly,
        Some(libc::ENODATA) | Some(libc::EILSEQ) => {
            DiskError::MediumError(error, MediumErrorDetails::UnrecoveredReadError)
        }
        _ => DiskError::Io(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/fs.h> on x86-64.
        assert_eq!(BLKROGET, 0x125e);
        assert_eq!(BLKSSZGET, 0x1268);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKDISCARD, 0x1277);
        assert_eq!(BLKPBSZGET, 0x127b);
        assert_eq!(BLKZEROOUT, 0x127f);
    }

    #[test]
    fn device_numbers_split_like_glibc() {
        // makedev(7, 3), and a major and minor wide enough to use the high bits.
        assert_eq!(
            DeviceNumber::from_dev(0x703),
            DeviceNumber { major: 7, minor: 3 }
        );
        let (major, minor) = (4100u64, 65537u64);
        let dev =
            (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12;
        assert_eq!(
            DeviceNumber::from_dev(dev),
            DeviceNumber {
                major: 4100,
                minor: 65537
            }
        );
    }

    #[test]
    fn errno_mapping() {
        use disk_backend::DiskError;
        let map = |errno| disk_error(io::Error::from_raw_os_error(errno));
        assert!(matches!(map(libc::EBADE), DiskError::ReservationConflict));
        assert!(matches!(map(libc::EROFS), DiskError::ReadOnly));
        assert!(matches!(map(libc::ENODATA), DiskError::MediumError(..)));
        assert!(matches!(map(libc::EIO), DiskError::Io(e) if e.raw_os_error() == Some(libc::EIO)));
    }
}
