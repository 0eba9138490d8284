//! `SyncFileBackend` over a block device (a loop device; needs root) and over files that are
//! neither regular files nor block devices.

use std::path::PathBuf;
use std::process::Command;
use virtio_block::{BlockBackend, BlockConfig, BlockDevice, SyncFileBackend, VirtioDevice};

/// A loop device over a file of its own in a temporary directory; `losetup -d` on drop.
struct LoopDevice {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Self {
            path: PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()),
            _dir: dir,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A block device's size is the device's, not the 0 its inode reports.
#[test]
fn a_block_device_has_its_device_size() {
    let device = match LoopDevice::new(3 << 20) {
        Ok(device) => device,
        Err(reason) => {
            disk_conformance::skip::skip(format!("loop devices unavailable ({reason})"));
            return;
        }
    };
    let backend = SyncFileBackend::open(&device.path, false).unwrap();
    assert_eq!(backend.size_bytes(), 3 << 20);
    let block = BlockDevice::new(BlockConfig::default(), std::sync::Arc::new(backend)).unwrap();
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 6144);
}

/// A FIFO, a directory or a character device is refused at once with an error naming what
/// it is, never opened and waited on.
#[test]
fn other_file_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (path, what) in [
        (fifo.as_path(), "fifo"),
        (dir.path(), "directory"),
        (std::path::Path::new("/dev/null"), "character device"),
    ] {
        for read_only in [false, true] {
            let error = SyncFileBackend::open(path, read_only).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{path:?}");
            let text = error.to_string();
            assert!(text.contains(what), "{path:?}: {text}");
        }
    }
}

/// A backing file whose size is not a whole number of blocks is refused, as `file` and
/// `blockdev` refuse it, instead of silently losing its tail.
#[test]
fn a_partial_last_block_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4096 + 100).unwrap();
    for block_size in [512, 4096] {
        let backend = SyncFileBackend::open(file.path(), false)
            .unwrap()
            .with_block_size(block_size);
        let error = BlockDevice::new(BlockConfig::default(), std::sync::Arc::new(backend))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("4196 bytes") && error.contains(&format!("{block_size}-byte")),
            "{error}"
        );
    }
}
