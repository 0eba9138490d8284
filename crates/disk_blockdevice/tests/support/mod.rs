//! Loop devices for tests: created from a backing file in a temporary directory, detached
//! when dropped (even when the test panics), and a way to skip where they are unavailable.

#![allow(dead_code)]

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, OpenError, RingError};
use disk_conformance::pattern;
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A loop device over a file of its own; `losetup -d` on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where backing files go: memory, so the tests do not depend on the disk's speed.
fn backing_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("create a temporary directory")
}

impl LoopDevice {
    /// Attaches a loop device over a zeroed file of `size` bytes with `losetup -f --show`
    /// and `args` (`--direct-io=on`, `-r`, `-b 4096`, ...).
    pub fn new(size: u64, args: &[&str]) -> Result<Self, String> {
        let dir = backing_dir();
        let backing = dir.path().join("backing.img");
        let file = std::fs::File::create(&backing).map_err(|e| e.to_string())?;
        file.set_len(size).map_err(|e| e.to_string())?;
        drop(file);
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .args(args)
            .arg(&backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(Self {
            path,
            backing,
            _dir: dir,
        })
    }

    /// Changes the backing file's size and tells the loop driver (`losetup -c`), which
    /// sends a `change` uevent with `RESIZE=1`.
    pub fn resize(&self, size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .and_then(|f| f.set_len(size))
            .expect("resize the backing file");
        let status = Command::new("losetup")
            .arg("-c")
            .arg(&self.path)
            .status()
            .expect("run losetup -c");
        assert!(status.success(), "losetup -c failed");
    }

    /// The backing file's bytes.
    pub fn backing_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.backing).expect("read the backing file")
    }

    /// Writes `data` into the backing file at `offset`, behind the device's back.
    pub fn write_backing(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .expect("open the backing file");
        file.write_all_at(data, offset)
            .expect("write the backing file");
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Why loop devices cannot be used here, if they cannot.
pub fn loop_devices_unavailable() -> Option<String> {
    // /proc/self belongs to the process's effective user.
    let euid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if euid.map_or(true, |uid| uid != 0) {
        return Some("loop devices need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop driver missing)".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup not installed (util-linux/mount)".into());
    }
    None
}

/// A loop device, or `None` after skipping the test ([`disk_conformance::skip::skip`]).
pub fn loop_device_or_skip(size: u64, args: &[&str]) -> Option<LoopDevice> {
    if let Some(reason) = loop_devices_unavailable() {
        disk_conformance::skip::skip(reason);
        return None;
    }
    match LoopDevice::new(size, args) {
        Ok(device) => Some(device),
        Err(reason) => {
            disk_conformance::skip::skip(reason);
            None
        }
    }
}

/// Opens `path`, or `None` after skipping the test when io_uring is unavailable here.
pub fn open_or_skip(path: &Path, options: &BlockDeviceOptions) -> Option<BlockDeviceDisk> {
    match BlockDeviceDisk::open(path, options) {
        Ok(disk) => Some(disk),
        Err(OpenError::Ring(RingError::Setup(e))) => {
            disk_conformance::skip::skip(format!("io_uring is unavailable ({e})"));
            None
        }
        Err(e) => panic!("open {}: {e:?}", path.display()),
    }
}

/// A disk and what must outlive it (a loop device, a temporary directory); the disk closes
/// first.
#[derive(Debug)]
pub struct KeptDisk<T> {
    pub disk: Arc<BlockDeviceDisk>,
    pub keep: T,
}

/// A disk over a loop device.
pub type LoopDisk = KeptDisk<LoopDevice>;

impl LoopDisk {
    /// A loop device of `size` bytes with `args`, opened with `options`; `None` (after
    /// saying why) where loop devices or io_uring are unavailable.
    pub fn new(size: u64, args: &[&str], options: &BlockDeviceOptions) -> Option<Self> {
        let device = loop_device_or_skip(size, args)?;
        let disk = open_or_skip(&device.path, options)?;
        Some(Self {
            disk: Arc::new(disk),
            keep: device,
        })
    }

    pub fn device(&self) -> &LoopDevice {
        &self.keep
    }
}

/// A disk over a regular file in a temporary directory.
pub type FileDisk = KeptDisk<(tempfile::TempDir, PathBuf)>;

impl FileDisk {
    /// A zeroed file of `size` bytes on the test machine's disk (tmpfs accepts `O_DIRECT`
    /// only on recent kernels), opened with `options`; `None` where io_uring is unavailable.
    pub fn new(size: u64, options: &BlockDeviceOptions) -> Option<Self> {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let path = dir.path().join("disk.img");
        let file = std::fs::File::create(&path).expect("create the file");
        file.set_len(size).expect("size the file");
        drop(file);
        let disk = open_or_skip(&path, options)?;
        Some(Self {
            disk: Arc::new(disk),
            keep: (dir, path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.keep.1
    }
}

/// Why the tests cannot run io_uring here, if they cannot.
pub fn io_uring_unavailable() -> Option<String> {
    match FileDisk::new(
        4096,
        &BlockDeviceOptions {
            direct: false,
            ..Default::default()
        },
    ) {
        Some(_) => None,
        None => Some("io_uring is unavailable".into()),
    }
}

/// The kept disk serves `DiskIo` itself, so the conformance suite can own what it keeps.
impl<T: Send + Sync + 'static> DiskIo for KeptDisk<T> {
    fn disk_type(&self) -> &str {
        self.disk.disk_type()
    }
    disk_backend::forward_disk_metadata!(self.disk);

    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        self.disk.read_vectored(buffers, sector).await
    }
    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.disk.write_vectored(buffers, sector, fua).await
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.disk.sync_cache().await
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
    ) -> Result<(), DiskError> {
        self.disk.unmap(sector, count, block_level_only).await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.disk.unmap_behavior()
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        self.disk.optimal_unmap_sectors()
    }
    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.disk.wait_resize(sector_count).await
    }
}

/// Writes and reads back from many tasks at once, checking every byte.
pub async fn many_tasks(disk: Disk) {
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let disk = disk.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(512, i * 16, 16, i as u8);
            let src =
                OwnedRequestBuffers::scattered(data.len(), (i as usize % 3) * 512 + i as usize % 2);
            src.copy_from_slice(&data);
            disk.write_vectored(&src.buffers(false), i * 16, i % 4 == 0)
                .await
                .unwrap();
            let dst = OwnedRequestBuffers::new(data.len());
            disk.read_vectored(&dst.buffers(true), i * 16)
                .await
                .unwrap();
            assert!(dst.to_vec() == data, "task {i}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    disk.sync_cache().await.unwrap();
}
