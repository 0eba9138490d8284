//! `cargo xtask guest-test`: a real Linux kernel (User-Mode Linux) drives a vhost-user-blk
//! export through its own virtio_blk driver, and checks the disk from inside.
//!
//! The harness builds a busybox initramfs holding `virtio_blk.ko`, fio and e2fsprogs (with
//! the libraries `ldd` lists), starts an export on a Unix socket (`diskctl serve` on one of
//! several stacks, or qemu-storage-daemon, the reference), boots
//! `linux.uml ... virtio_uml.device=SOCKET:2`, and reads the verdict the guest prints on its
//! console (`guest_init.sh`). Some guest lines ask the host to act while the guest waits:
//! `GUEST-FILE-CHECK` (compare a region of the backing file with what the guest wrote) and
//! `GUEST-RESIZE-READY` (grow the backing file). A guest that hangs is killed at the timeout
//! and fails.

use crate::bench_qcow2::qemu_img;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, String>;

const GUEST_INIT: &str = include_str!("guest_init.sh");
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DISK_BYTES: u64 = 64 << 20;
/// What the resize check grows the disk to.
const RESIZED_BYTES: u64 = 96 << 20;
/// How long a stopped export may take to drain and flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Binaries copied into the guest, with their libraries.
const GUEST_BINARIES: &[&str] = &[
    "/usr/bin/fio",
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/e2fsck",
    "/usr/sbin/blkdiscard",
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn sh(step: &str, script: &str) -> Result {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .map_err(|e| format!("{step}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("{step} failed ({status})"))
}

/// Installs what the guest test needs from Debian's packages where it is missing:
/// User-Mode Linux and the guest's tools always, qemu-storage-daemon (`qsd`) and
/// qemu-system-x86 (`qemu`) on request, both from bookworm-backports so that the installed
/// qemu-utils 10 is not replaced by bookworm's 7.2.
fn ensure_packages(qsd: bool, qemu: bool) -> Result {
    let mut missing: Vec<&str> = [
        ("/usr/bin/linux.uml", "user-mode-linux"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/fio", "fio"),
        ("/usr/sbin/e2fsck", "e2fsprogs"),
        ("/usr/sbin/blkdiscard", "util-linux"),
    ]
    .iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, package)| *package)
    .collect();
    let mut backports: Vec<&str> = Vec::new();
    if qsd && !Path::new("/usr/bin/qemu-storage-daemon").exists() {
        backports.push("qemu-system-common");
    }
    if qemu && !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        backports.push("qemu-system-x86");
    }
    if missing.is_empty() && backports.is_empty() {
        return Ok(());
    }
    if !is_root() {
        missing.extend(&backports);
        return Err(format!(
            "guest-test needs {} (qemu packages from bookworm-backports) and is not root to install them",
            missing.join(", ")
        ));
    }
    if !missing.is_empty() {
        sh(
            "apt-get install",
            &format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {}",
                missing.join(" ")
            ),
        )?;
    }
    if !backports.is_empty() {
        sh(
            "install from bookworm-backports",
            &format!(
                "echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list \
                 && apt-get update -qq \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports {}",
                backports.join(" ")
            ),
        )?;
    }
    Ok(())
}

fn virtio_blk_module() -> Result<PathBuf> {
    let base = Path::new("/usr/lib/uml/modules");
    std::fs::read_dir(base)
        .map_err(|e| format!("cannot list {}: {e}", base.display()))?
        .filter_map(|entry| {
            Some(
                entry
                    .ok()?
                    .path()
                    .join("kernel/drivers/block/virtio_blk.ko"),
            )
        })
        .find(|path| path.exists())
        .ok_or_else(|| "no virtio_blk.ko under /usr/lib/uml/modules".into())
}

/// The kernel a guest boots and the modules its initramfs loads, in order.
pub struct Kernel {
    /// `None` for User-Mode Linux (`linux.uml` is the kernel); the image for QEMU.
    pub image: Option<PathBuf>,
    /// Modules to copy into the initramfs and load, in order.
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// User-Mode Linux: only virtio_blk is a module.
    pub fn uml() -> Result<Self> {
        Ok(Self {
            image: None,
            modules: vec![virtio_blk_module()?],
        })
    }

    /// Debian's `linux-image-amd64` for QEMU, unpacked (not installed) under `dir`: the
    /// kernel image and, from the same package, the modules a virtio-mmio disk and ext4 need.
    pub fn debian(dir: &Path) -> Result<Self> {
        let cache = dir.join("debian-kernel");
        let root = cache.join("root");
        if !root.join("boot").is_dir() {
            std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
            let depends = Command::new("apt-cache")
                .args(["depends", "linux-image-amd64"])
                .output()
                .map_err(|e| format!("apt-cache: {e}"))?;
            let depends = String::from_utf8_lossy(&depends.stdout);
            let package = depends
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: "))
                .filter(|p| p.starts_with("linux-image-"))
                .ok_or(
                    "apt-cache names no kernel package for linux-image-amd64 (run apt-get update)",
                )?
                .to_string();
            sh(
                "download the Debian kernel",
                &format!(
                    "cd '{}' && rm -f *.deb && apt-get download -q {package} 2>/dev/null && dpkg-deb -x {package}_*.deb root && rm -f *.deb",
                    cache.display()
                ),
            )?;
        }
        let image = std::fs::read_dir(root.join("boot"))
            .map_err(|e| format!("debian kernel: {e}"))?
            .filter_map(|e| Some(e.ok()?.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or("no vmlinuz in the Debian kernel package")?;
        let version = image
            .file_name()
            .and_then(|n| {
                n.to_string_lossy()
                    .strip_prefix("vmlinuz-")
                    .map(String::from)
            })
            .ok_or("bad kernel image name")?;
        let modules = root.join("lib/modules").join(version).join("kernel");
        // Dependencies first: the virtio core, the MMIO transport microvm uses, the disk;
        // then ext4 and what it needs.
        let order = [
            "drivers/virtio/virtio_ring.ko",
            "drivers/virtio/virtio.ko",
            "drivers/virtio/virtio_mmio.ko",
            "drivers/block/virtio_blk.ko",
            "lib/crc16.ko",
            "fs/mbcache.ko",
            "fs/jbd2/jbd2.ko",
            "crypto/crc32c_generic.ko",
            "fs/ext4/ext4.ko",
        ];
        Ok(Self {
            image: Some(image),
            modules: order.iter().map(|m| modules.join(m)).collect(),
        })
    }
}

/// Builds the initramfs for `kernel` under `dir` (as `name`) and returns its path.
fn build_initramfs(dir: &Path, kernel: &Kernel, name: &str) -> Result<PathBuf> {
    let root = dir.join(format!("root-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "dev", "proc", "sys", "tmp", "mnt"] {
        std::fs::create_dir_all(root.join(sub)).map_err(|e| format!("initramfs: {e}"))?;
    }
    let copy = |from: &Path, to: &Path| -> Result {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("initramfs: {e}"))?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("initramfs: copy {}: {e}", from.display()))
    };
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    let mut names = Vec::new();
    for module in &kernel.modules {
        let file = module.file_name().ok_or("a module without a name")?;
        copy(module, &root.join(file))?;
        names.push(file.to_string_lossy().into_owned());
    }
    std::fs::write(root.join("modules"), names.join(" ")).map_err(|e| format!("initramfs: {e}"))?;
    for binary in GUEST_BINARIES {
        let name = Path::new(binary).file_name().expect("a file name");
        copy(Path::new(binary), &root.join("bin").join(name))?;
        let ldd = Command::new("ldd")
            .arg(binary)
            .output()
            .map_err(|e| format!("ldd: {e}"))?;
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
        {
            let source =
                std::fs::canonicalize(lib).map_err(|e| format!("initramfs: {lib}: {e}"))?;
            copy(&source, &root.join(lib.trim_start_matches('/')))?;
        }
    }
    let init = root.join("init");
    std::fs::write(&init, GUEST_INIT).map_err(|e| format!("initramfs: {e}"))?;
    sh("chmod init", &format!("chmod +x {}", init.display()))?;
    let image = dir.join(format!("initramfs-{name}.gz"));
    sh(
        "pack initramfs",
        &format!(
            "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            root.display(),
            image.display()
        ),
    )?;
    Ok(image)
}

/// What serves the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    /// `diskctl serve --vhost-user`: the export under test.
    Diskctl,
    /// qemu-storage-daemon: the reference the harness itself was checked against.
    Qsd,
}

/// An export serving a disk over vhost-user-blk, stopped on drop.
struct Export {
    child: Child,
    socket: PathBuf,
    kind: ExportKind,
    log: PathBuf,
}

/// Removes a socket left by an earlier run. It must happen before the export starts: removing
/// it afterwards could delete the socket the new export just bound, and the harness would wait
/// for it in vain.
fn remove_stale_socket(socket: &Path) -> Result {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!(
            "cannot remove the stale socket {}: {e}",
            socket.display()
        )),
        _ => Ok(()),
    }
}

impl Export {
    /// qemu-storage-daemon serving `image` from the page cache; with `iothread`, from an
    /// I/O thread (which polls, up to 32 µs by default) instead of its main loop.
    pub fn qemu_storage_daemon(
        image: &Path,
        socket: &Path,
        read_only: bool,
        iothread: bool,
        log: &Path,
    ) -> Result<Self> {
        remove_stale_socket(socket)?;
        let mut command = Command::new("qemu-storage-daemon");
        if iothread {
            command.args(["--object", "iothread,id=iothread0"]);
        }
        let child = command
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={},cache.direct=off", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={}{}",
                socket.display(),
                if read_only { "off" } else { "on" },
                if iothread { ",iothread=iothread0" } else { "" }
            ))
            .stdout(Stdio::null())
            .stderr(log_file(log)?)
            .spawn()
            .map_err(|e| format!("cannot start qemu-storage-daemon: {e}"))?;
        Self::started(child, socket, ExportKind::Qsd, log)
    }

    /// `diskctl serve` (the binary at `diskctl`) serving `spec`.
    pub fn diskctl(
        diskctl: &Path,
        spec: &str,
        socket: &Path,
        read_only: bool,
        log: &Path,
    ) -> Result<Self> {
        remove_stale_socket(socket)?;
        let mut command = Command::new(diskctl);
        command
            .args(["serve", "--vhost-user"])
            .arg(socket)
            .arg(spec);
        if read_only {
            command.arg("--read-only");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log_file(log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", diskctl.display()))?;
        Self::started(child, socket, ExportKind::Diskctl, log)
    }

    fn started(child: Child, socket: &Path, kind: ExportKind, log: &Path) -> Result<Self> {
        let mut export = Self {
            child,
            socket: socket.to_owned(),
            kind,
            log: log.to_owned(),
        };
        // Generous: on a loaded two-core machine a start can take seconds, and a slow start
        // is not what this test is about.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !export.socket.exists() {
            if let Ok(Some(status)) = export.child.try_wait() {
                return Err(format!(
                    "the export exited ({status}): {}",
                    export.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the export never created {}",
                    export.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(export)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .replace('\n', " | ")
    }

    /// Stops the export as an operator would (SIGTERM) and checks that it drains, flushes
    /// and exits 0 in time.
    fn stop(mut self) -> Result {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "the export exited with {status} on SIGTERM: {}",
                        self.log_text()
                    ));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    return Err(format!(
                        "the export did not stop within {} s of SIGTERM",
                        STOP_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What the guest reported, with the host's own checks mixed in.
pub struct Verdict {
    pub passed: bool,
    pub checks: Vec<String>,
}

/// What the host does when the guest asks while it waits.
#[derive(Default)]
pub struct HostSide {
    /// The backing file a `GUEST-FILE-CHECK` is compared against.
    pub file_check: Option<PathBuf>,
    /// The backing file a `GUEST-RESIZE-READY` grows, and to what size.
    pub resize: Option<(PathBuf, u64)>,
    /// Kills the export with SIGKILL and starts it again when the guest says
    /// `GUEST-KILL-EXPORT`; returns the `HOST-CHECK` lines. With it, QEMU's chardev
    /// reconnects (`reconnect-ms`); User-Mode Linux cannot (see the `qemu-microvm-restart` case).
    pub restart: Option<Box<dyn Fn() -> String>>,
}

impl HostSide {
    /// Acts on a guest line; returns a `HOST-CHECK` line for the verdict.
    fn on_line(&self, line: &str) -> Option<String> {
        if let Some(rest) = line.strip_prefix("GUEST-FILE-CHECK ") {
            let path = self.file_check.as_ref()?;
            return Some(match file_check(path, rest) {
                Ok(()) => "HOST-CHECK flush-reached-file ok".into(),
                Err(e) => format!("HOST-CHECK flush-reached-file FAIL: {e}"),
            });
        }
        if line == "GUEST-KILL-EXPORT" {
            let restart = self.restart.as_ref()?;
            return Some(restart());
        }
        if line == "GUEST-RESIZE-READY" {
            let (path, bytes) = self.resize.as_ref()?;
            let grown = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(*bytes));
            return Some(match grown {
                Ok(()) => format!("HOST-CHECK grew-backing-file ok ({} MiB)", bytes >> 20),
                Err(e) => format!("HOST-CHECK grew-backing-file FAIL: {e}"),
            });
        }
        None
    }
}

/// Compares `len` bytes at `offset` of `path` with the md5 the guest printed.
fn file_check(path: &Path, fields: &str) -> Result {
    let field = |name: &str| {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("no {name} in `{fields}`"))
    };
    let offset: u64 = field("offset")?.parse().map_err(|_| "bad offset")?;
    let len: u64 = field("len")?.parse().map_err(|_| "bad len")?;
    let md5 = field("md5")?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if='{}' bs=4096 skip={} count={} status=none | md5sum",
            path.display(),
            offset / 4096,
            len / 4096
        ))
        .output()
        .map_err(|e| format!("md5sum: {e}"))?;
    let host = String::from_utf8_lossy(&out.stdout);
    let host = host.split_whitespace().next().unwrap_or_default();
    if host == md5 {
        Ok(())
    } else {
        Err(format!("the file holds {host}, the guest wrote {md5}"))
    }
}

/// The vhost-user frontend a guest runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// User-Mode Linux: `virtio_uml`.
    Uml,
    /// QEMU's `-M microvm` with `vhost-user-blk` on virtio-mmio, software emulation.
    Qemu,
}

/// A bootable guest: its frontend, kernel and initramfs.
pub struct Guest {
    frontend: Frontend,
    kernel: Kernel,
    initramfs: PathBuf,
}

impl Guest {
    /// Builds the initramfs for `frontend`'s kernel under `dir`.
    pub fn new(frontend: Frontend, dir: &Path) -> Result<Self> {
        let (kernel, name) = match frontend {
            Frontend::Uml => (Kernel::uml()?, "uml"),
            Frontend::Qemu => (Kernel::debian(dir)?, "qemu"),
        };
        let initramfs = build_initramfs(dir, &kernel, name)?;
        Ok(Self {
            frontend,
            kernel,
            initramfs,
        })
    }

    /// The guest's command line; with `reconnect`, QEMU reconnects to a restarted export.
    fn command(&self, socket: &Path, expect: &str, reconnect: bool) -> Result<Command> {
        match (self.frontend, &self.kernel.image) {
            (Frontend::Uml, _) => {
                let mut command = Command::new("linux.uml");
                command
                    .args([
                        "mem=512M".to_string(),
                        format!("initrd={}", self.initramfs.display()),
                        "con=null".into(),
                        "con0=fd:0,fd:1".into(),
                        format!("virtio_uml.device={}:2", socket.display()),
                    ])
                    .args(expect.split_whitespace());
                Ok(command)
            }
            (Frontend::Qemu, Some(image)) => {
                let mut command = Command::new("qemu-system-x86_64");
                // vhost-user needs guest memory in a shared fd, and the modern virtio-mmio
                // layout; without tsc_early_khz the Debian kernel can hang calibrating the
                // timer under software emulation.
                command
                    .args([
                        "-M",
                        "microvm,memory-backend=mem",
                        "-m",
                        "512M",
                        "-smp",
                        "1",
                    ])
                    .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .arg("-chardev")
                    .arg(format!(
                        "socket,id=c,path={}{}",
                        socket.display(),
                        // QEMU 10 calls it `reconnect-ms` (`reconnect`, in seconds, is gone).
                        if reconnect { ",reconnect-ms=200" } else { "" }
                    ))
                    .args(["-device", "vhost-user-blk,chardev=c"])
                    .arg("-kernel")
                    .arg(image)
                    .arg("-initrd")
                    .arg(&self.initramfs)
                    .arg("-append")
                    .arg(format!(
                        "console=ttyS0 quiet tsc_early_khz=2500000 panic=-1 {expect}"
                    ))
                    .args([
                        "-nographic",
                        "-nodefaults",
                        "-no-reboot",
                        "-serial",
                        "stdio",
                    ]);
                Ok(command)
            }
            (Frontend::Qemu, None) => Err("a QEMU guest needs a kernel image".into()),
        }
    }
}

/// Boots `guest` against `socket` and returns its verdict. The guest and its helper
/// processes run in a process group of their own, killed at the timeout.
pub fn boot(guest: &Guest, socket: &Path, expect: &str, host: &HostSide) -> Result<Verdict> {
    use std::os::unix::process::CommandExt;
    let mut child = guest
        .command(socket, expect, host.restart.is_some())?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the {:?} guest: {e}", guest.frontend))?;
    let stdout = child.stdout.take().expect("piped");
    let (sender, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            // A serial console ends lines with CR LF.
            let line = line.trim_end_matches('\r').to_string();
            if line.starts_with("GUEST-") && sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut checks = Vec::new();
    let finished = loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let reply = host.on_line(&line);
                checks.push(line);
                checks.extend(reply);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if child
            .try_wait()
            .map_err(|e| format!("the guest: {e}"))?
            .is_some()
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    // UML leaves helper processes in the group; end them all.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let _ = reader.join();
    while let Ok(line) = lines.try_recv() {
        let reply = host.on_line(&line);
        checks.push(line);
        checks.extend(reply);
    }
    if !finished {
        return Err(format!(
            "the guest hung and was killed after {} s; it said: {checks:?}",
            BOOT_TIMEOUT.as_secs()
        ));
    }
    let guest_passed = checks.iter().any(|l| l == "GUEST-RESULT PASS");
    if !guest_passed && !checks.iter().any(|l| l.starts_with("GUEST-RESULT")) {
        return Err(format!(
            "the guest stopped without a verdict; it said: {checks:?}"
        ));
    }
    let host_failed = checks
        .iter()
        .any(|l| l.starts_with("HOST-CHECK") && l.contains(" FAIL"));
    Ok(Verdict {
        passed: guest_passed && !host_failed,
        checks,
    })
}

/// One export of one stack, and what the guest should find.
struct Case {
    name: &'static str,
    kind: ExportKind,
    frontend: Frontend,
    /// The spec for diskctl; for qemu-storage-daemon, the image is `images[0]`.
    spec: String,
    /// Files to create (path, bytes) before the export starts.
    images: Vec<(PathBuf, u64)>,
    read_only: bool,
    /// Size in 512-byte sectors and logical block size the guest must see.
    sectors: u64,
    lbs: u32,
    host: HostSide,
    /// After the guest: this file must still be all zeros (an overlay must not write through).
    untouched: Option<PathBuf>,
    /// While the guest runs, the export must pin memory (`VmPin`): the guest's, registered
    /// as io_uring fixed buffers.
    pinned: bool,
    /// The guest runs `fio --verify` and, once it has written some data, asks the host to
    /// kill the export with SIGKILL and start it again (see `restart_export`).
    restart: bool,
    /// A qcow2 image of `DISK_BYTES` the spec writes to: made with `qemu-img create` before
    /// the export starts, and checked with `qemu-img check` after it stops.
    qcow2: Option<PathBuf>,
}

impl Case {
    fn expect(&self) -> String {
        if self.restart {
            return "guest.mode=restart".into();
        }
        let mut expect = format!(
            "guest.sectors={} guest.lbs={} guest.ro={}",
            self.sectors,
            self.lbs,
            u8::from(self.read_only)
        );
        if self.host.file_check.is_some() {
            expect.push_str(" guest.filecheck=1");
        }
        if let Some((_, bytes)) = &self.host.resize {
            expect.push_str(&format!(" guest.resize={}", bytes / 512));
        }
        expect
    }
}

/// The stacks the guest checks on each export.
fn cases(kind: ExportKind, dir: &Path) -> Result<Vec<Case>> {
    let img = |name: &str| dir.join(format!("{name}.img"));
    let sectors = DISK_BYTES / 512;
    if kind == ExportKind::Qsd {
        return Ok([("qsd-file", false), ("qsd-file-read-only", true)]
            .into_iter()
            .map(|(name, read_only)| Case {
                name,
                kind,
                frontend: Frontend::Uml,
                spec: String::new(),
                images: vec![(img(name), DISK_BYTES)],
                read_only,
                sectors,
                lbs: 512,
                host: HostSide::default(),
                untouched: None,
                pinned: false,
                restart: false,
                qcow2: None,
            })
            .collect());
    }
    let key = dir.join("crypt.key");
    // 64 bytes whose halves differ, as XTS requires.
    let key_bytes: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(&key, key_bytes).map_err(|e| format!("{}: {e}", key.display()))?;
    let (file, four_k, base, a, b) = (
        img("file"),
        img("file-4k"),
        img("base"),
        img("stripe-a"),
        img("stripe-b"),
    );
    let qemu_file = img("qemu-file");
    let (overlay, qcow2_base) = (dir.join("overlay.qcow2"), img("qcow2-base"));
    let plain = img("blockdev");
    let fixed = img("blockdev-fixed");
    let qemu_fixed = img("qemu-blockdev-fixed");
    let (restart_a, restart_b) = (img("qemu-restart-a"), img("qemu-restart-b"));
    Ok(vec![
        Case {
            frontend: Frontend::Uml,
            name: "file",
            kind,
            spec: format!("file:{}", file.display()),
            images: vec![(file.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide {
                file_check: Some(file.clone()),
                resize: Some((file, RESIZED_BYTES)),
                restart: None,
            },
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        Case {
            frontend: Frontend::Uml,
            name: "file-read-only",
            kind,
            spec: format!("file:{}", img("file-ro").display()),
            images: vec![(img("file-ro"), DISK_BYTES)],
            read_only: true,
            sectors,
            lbs: 512,
            host: HostSide::default(),
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        Case {
            frontend: Frontend::Uml,
            name: "file-4k-sectors",
            kind,
            spec: format!("file({}, sector_size=4096)", four_k.display()),
            images: vec![(four_k.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 4096,
            host: HostSide {
                file_check: Some(four_k),
                resize: None,
                restart: None,
            },
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        Case {
            frontend: Frontend::Uml,
            name: "ram-over-file",
            kind,
            spec: format!("layered(ram, file:{}:ro)", base.display()),
            images: vec![(base.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide::default(),
            untouched: Some(base),
            pinned: false,
            restart: false,
            qcow2: None,
        },
        // A persistent qcow2 overlay over a read-only raw base: the guest's writes land in
        // the overlay (copy-on-write of partial clusters from the base), which QEMU's own
        // checker must find consistent afterwards.
        Case {
            frontend: Frontend::Uml,
            name: "qcow2-over-file",
            kind,
            spec: format!(
                "layered(qcow2({}), file:{}:ro)",
                overlay.display(),
                qcow2_base.display()
            ),
            images: vec![(qcow2_base.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide::default(),
            untouched: Some(qcow2_base),
            pinned: false,
            qcow2: Some(overlay),
            restart: false,
        },
        Case {
            frontend: Frontend::Uml,
            name: "crypt-over-striped",
            kind,
            spec: format!(
                "crypt(striped(file:{}, file:{}, chunk=64k), key=@{})",
                a.display(),
                b.display(),
                key.display()
            ),
            images: vec![(a, DISK_BYTES / 2), (b, DISK_BYTES / 2)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide::default(),
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        // io_uring with O_DIRECT and the default options: each of the export's queue threads
        // submits the guest's requests to a ring of its own and reaps it itself.
        Case {
            frontend: Frontend::Uml,
            name: "blockdev",
            kind,
            spec: format!("blockdev({})", plain.display()),
            images: vec![(plain.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide {
                file_check: Some(plain),
                resize: None,
                restart: None,
            },
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        // io_uring with the guest's memory registered as fixed buffers: UML's memory is a
        // file on tmpfs, which the kernel pins for long.
        Case {
            frontend: Frontend::Uml,
            name: "blockdev-fixed-buffers",
            kind,
            spec: format!("blockdev({}, fixed_buffers)", fixed.display()),
            images: vec![(fixed.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide {
                file_check: Some(fixed),
                resize: None,
                restart: None,
            },
            untouched: None,
            pinned: true,
            restart: false,
            qcow2: None,
        },
        // A second, independent frontend: QEMU (microvm, virtio-mmio) with Debian's kernel.
        Case {
            frontend: Frontend::Qemu,
            name: "qemu-microvm-file",
            kind,
            spec: format!("file:{}", qemu_file.display()),
            images: vec![(qemu_file.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide {
                file_check: Some(qemu_file.clone()),
                resize: Some((qemu_file, RESIZED_BYTES)),
                restart: None,
            },
            untouched: None,
            pinned: false,
            restart: false,
            qcow2: None,
        },
        // The same through QEMU, whose memory is a memfd and which resets the device before
        // every start: the registration is replaced through the update path.
        Case {
            frontend: Frontend::Qemu,
            name: "qemu-microvm-blockdev-fixed-buffers",
            kind,
            spec: format!("blockdev({}, fixed_buffers)", qemu_fixed.display()),
            images: vec![(qemu_fixed.clone(), DISK_BYTES)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide {
                file_check: Some(qemu_fixed),
                resize: None,
                restart: None,
            },
            untouched: None,
            pinned: true,
            restart: false,
            qcow2: None,
        },
        // The export killed with SIGKILL in the middle of the guest's fio and started again:
        // QEMU reconnects and hands over the inflight region, the new export resubmits what
        // the old one left in flight, and fio verifies every block. User-Mode Linux has no
        // such case: its virtio_uml transport does not reconnect (a lost socket leaves the
        // device broken until the guest reboots) and does not offer inflight tracking.
        Case {
            frontend: Frontend::Qemu,
            name: "qemu-microvm-restart",
            kind,
            // Latency keeps the guest's queue depth of requests inside the export, so the kill
            // always catches some of them (the host check requires it); two members of
            // different latency complete them out of order, so a restart that resumed from
            // the used index without the inflight region would complete some twice (which
            // Linux's virtio_ring treats as a broken device) instead of resubmitting exactly
            // the unfinished ones.
            spec: format!(
                "striped(delay(file:{}, ms=2), delay(file:{}, ms=40), chunk=4k)",
                restart_a.display(),
                restart_b.display()
            ),
            images: vec![(restart_a, DISK_BYTES / 2), (restart_b, DISK_BYTES / 2)],
            read_only: false,
            sectors,
            lbs: 512,
            host: HostSide::default(),
            untouched: None,
            pinned: false,
            restart: true,
            qcow2: None,
        },
    ])
}

/// Builds `diskctl` and returns the binary's path.
pub fn build_diskctl(release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--locked", "-p", "diskctl"]);
    if release {
        command.arg("--release");
    }
    let status = command.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p diskctl failed ({status})"));
    }
    let dir = std::env::current_dir().map_err(|e| e.to_string())?;
    Ok(dir.join(if release {
        "target/release/diskctl"
    } else {
        "target/debug/diskctl"
    }))
}

/// The harness's scratch directory, `target/guest`.
pub fn guest_dir() -> Result<PathBuf> {
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("target/guest");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Creates (or empties) the image files of a case.
fn create_images(images: &[(PathBuf, u64)]) -> Result {
    for (path, bytes) in images {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.set_len(*bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn all_zeros(path: &Path) -> Result {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let out = Command::new("cmp")
        .args(["-n", &len.to_string()])
        .arg(path)
        .arg("/dev/zero")
        .output()
        .map_err(|e| format!("cmp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Samples a process's pinned memory (`VmPin` in `/proc/PID/status`) every 50 ms on a
/// thread, keeping the largest value.
struct PinSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PinSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut most = 0;
                while !stop.load(Ordering::Relaxed) {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
                    let pinned = status.ok().and_then(|status| {
                        let line = status.lines().find(|l| l.starts_with("VmPin:"))?;
                        line.split_whitespace().nth(1)?.parse::<u64>().ok()
                    });
                    most = most.max(pinned.unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(50));
                }
                most
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling; the largest `VmPin` seen, in kB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn run_case(case: &Case, guest: &Guest, diskctl: Option<&Path>, dir: &Path) -> Result<Verdict> {
    create_images(&case.images)?;
    if let Some(image) = &case.qcow2 {
        let image = image.to_str().ok_or("path is not UTF-8")?;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            image,
            &DISK_BYTES.to_string(),
        ])?;
    }
    let socket = dir.join(format!("{}.sock", case.name));
    let log = dir.join(format!("{}.log", case.name));
    let export = match case.kind {
        ExportKind::Qsd => {
            Export::qemu_storage_daemon(&case.images[0].0, &socket, case.read_only, false, &log)?
        }
        ExportKind::Diskctl => Export::diskctl(
            diskctl.ok_or("no diskctl binary")?,
            &case.spec,
            &socket,
            case.read_only,
            &log,
        )?,
    };
    let sampler = case.pinned.then(|| PinSampler::start(export.child.id()));
    let socket = export.socket.clone();
    // The restart hook replaces the export while the guest runs.
    let export = std::rc::Rc::new(std::cell::RefCell::new(Some(export)));
    let restart_host;
    let host = if case.restart {
        let diskctl = diskctl.ok_or("no diskctl binary")?.to_owned();
        let (export, spec, socket) = (export.clone(), case.spec.clone(), socket.clone());
        let log = dir.join(format!("{}-restarted.log", case.name));
        let read_only = case.read_only;
        restart_host = HostSide {
            restart: Some(Box::new(move || {
                let Some(old) = export.borrow_mut().take() else {
                    return "HOST-CHECK export-restarted FAIL: no export to kill".into();
                };
                match restart_export(old, &diskctl, &spec, &socket, read_only, &log) {
                    Ok((new, None)) => {
                        *export.borrow_mut() = Some(new);
                        "HOST-CHECK export-restarted FAIL: the export held no inflight \
                         region (QEMU did not negotiate INFLIGHT_SHMFD)"
                            .into()
                    }
                    Ok((new, Some(0))) => {
                        *export.borrow_mut() = Some(new);
                        "HOST-CHECK export-restarted FAIL: the inflight region marked no \
                         request in flight at the kill, so nothing was resubmitted"
                            .into()
                    }
                    Ok((new, Some(marked))) => {
                        *export.borrow_mut() = Some(new);
                        format!(
                            "HOST-CHECK export-restarted ok (SIGKILL with {marked} requests \
                             marked in flight in the inflight region)"
                        )
                    }
                    Err(e) => format!("HOST-CHECK export-restarted FAIL: {e}"),
                }
            })),
            ..HostSide::default()
        };
        &restart_host
    } else {
        &case.host
    };
    let verdict = boot(guest, &socket, &case.expect(), host);
    let pinned_kb = sampler.map(PinSampler::stop);
    let export = export
        .borrow_mut()
        .take()
        .ok_or("the export was killed and not restarted")?;
    let kind = export.kind;
    let log_text = export.log_text();
    let stopped = export.stop();
    let mut verdict = verdict.map_err(|e| format!("{e}; export log: {log_text}"))?;
    if case.restart
        && !verdict
            .checks
            .iter()
            .any(|c| c.starts_with("HOST-CHECK export-restarted"))
    {
        verdict
            .checks
            .push("HOST-CHECK export-restarted FAIL: the guest never asked for it".into());
        verdict.passed = false;
    }
    if kind == ExportKind::Diskctl {
        verdict.checks.push(match &stopped {
            Ok(()) => "HOST-CHECK export-stops-cleanly ok".into(),
            Err(e) => format!("HOST-CHECK export-stops-cleanly FAIL: {e}"),
        });
        verdict.passed &= stopped.is_ok();
    }
    if let Some(kb) = pinned_kb {
        verdict.checks.push(if kb > 0 {
            format!("HOST-CHECK guest-memory-pinned ok ({kb} kB at most)")
        } else {
            "HOST-CHECK guest-memory-pinned FAIL: the export never pinned memory".into()
        });
        verdict.passed &= kb > 0;
    }
    if let Some(base) = &case.untouched {
        let result = all_zeros(base);
        verdict.checks.push(match &result {
            Ok(()) => "HOST-CHECK base-untouched ok".into(),
            Err(e) => format!("HOST-CHECK base-untouched FAIL: {e}"),
        });
        verdict.passed &= result.is_ok();
    }
    if let Some(image) = &case.qcow2 {
        let result = match image.to_str() {
            Some(image) => qemu_img(&["check", "-q", "-f", "qcow2", image]).map(drop),
            None => Err("path is not UTF-8".to_string()),
        };
        verdict.checks.push(match &result {
            Ok(()) => "HOST-CHECK qemu-img-check ok".into(),
            Err(e) => format!("HOST-CHECK qemu-img-check FAIL: {e}"),
        });
        verdict.passed &= result.is_ok();
    }
    if !verdict.passed {
        verdict.checks.push(format!("export log: {log_text}"));
    }
    Ok(verdict)
}

/// Kills `old` with SIGKILL (no drain, no flush: what a crash does), reads how many requests
/// the inflight region marks in flight at that instant, and starts `diskctl serve` again
/// with the same spec on the same socket. Returns the new export and that count (`None` if
/// the export held no region: the restart still happens, so the guest can show what a
/// restart without inflight tracking does).
fn restart_export(
    mut old: Export,
    diskctl: &Path,
    spec: &str,
    socket: &Path,
    read_only: bool,
    log: &Path,
) -> Result<(Export, Option<usize>)> {
    // Opened before the kill: a dead process has no descriptors to find it by.
    let region = inflight_region_of(old.child.id());
    old.child
        .kill()
        .map_err(|e| format!("cannot kill the export: {e}"))?;
    let _ = old.child.wait();
    let marked = region.map(|file| count_marked(&file)).transpose()?;
    // Its drop removes the socket it left behind, before the new export binds it.
    drop(old);
    let new = Export::diskctl(diskctl, spec, socket, read_only, log)?;
    Ok((new, marked))
}

/// The inflight region (a memfd) the export `pid` holds, opened through `/proc`.
fn inflight_region_of(pid: u32) -> Option<std::fs::File> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten().find_map(|entry| {
        let target = std::fs::read_link(entry.path()).ok()?;
        target
            .to_string_lossy()
            .contains("vhost-user-blk-inflight")
            .then(|| std::fs::File::open(entry.path()).ok())?
    })
}

/// Heads marked in flight in an inflight region (split layout, version 1; see
/// `vhost_user_blk::inflight`): per queue area, a 16-byte header whose `desc_num` is at
/// byte 10, then 16 bytes per descriptor whose first is the `inflight` flag.
fn count_marked(file: &std::fs::File) -> Result<usize> {
    use std::io::Read;
    let mut bytes = Vec::new();
    (&*file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the inflight region: {e}"))?;
    let mut marked = 0;
    let mut area = 0usize;
    while area + 16 <= bytes.len() {
        let desc_num = usize::from(u16::from_le_bytes([bytes[area + 10], bytes[area + 11]]));
        if desc_num == 0 || area + 16 + 16 * desc_num > bytes.len() {
            break;
        }
        marked += (0..desc_num)
            .filter(|i| bytes[area + 16 + 16 * i] != 0)
            .count();
        area += (16 * desc_num + 2).next_multiple_of(64);
    }
    Ok(marked)
}

/// Runs the guest checks against each stack, printing every check.
pub fn guest_test(args: &[String]) -> Result {
    let usage = "usage: cargo xtask guest-test [--export diskctl|qsd] [--frontend uml|qemu|all] [--case NAME]";
    let mut kind = ExportKind::Diskctl;
    let mut frontends: Option<Vec<Frontend>> = None;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next().map(String::as_str)) {
            ("--export", Some("diskctl")) => kind = ExportKind::Diskctl,
            ("--export", Some("qsd")) => kind = ExportKind::Qsd,
            ("--frontend", Some("uml")) => frontends = Some(vec![Frontend::Uml]),
            ("--frontend", Some("qemu")) => frontends = Some(vec![Frontend::Qemu]),
            ("--frontend", Some("all")) => frontends = Some(vec![Frontend::Uml, Frontend::Qemu]),
            ("--case", Some(name)) => only = Some(name.to_string()),
            _ => return Err(usage.into()),
        }
    }
    let frontends = frontends.unwrap_or_else(|| match kind {
        ExportKind::Diskctl => vec![Frontend::Uml, Frontend::Qemu],
        ExportKind::Qsd => vec![Frontend::Uml],
    });
    ensure_packages(kind == ExportKind::Qsd, frontends.contains(&Frontend::Qemu))?;
    let diskctl = match kind {
        ExportKind::Diskctl => Some(build_diskctl(false)?),
        ExportKind::Qsd => None,
    };
    let dir = guest_dir()?;
    let guests = frontends
        .iter()
        .map(|&frontend| Ok((frontend, Guest::new(frontend, &dir)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut failures = Vec::new();
    let cases = cases(kind, &dir)?;
    if let Some(name) = &only
        && !cases.iter().any(|c| c.name == name)
    {
        let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
        return Err(format!("no case `{name}`; cases: {}", names.join(", ")));
    }
    for case in cases {
        if only.as_ref().is_some_and(|name| name != case.name) {
            continue;
        }
        let Some((_, guest)) = guests.iter().find(|(f, _)| *f == case.frontend) else {
            continue;
        };
        let started = Instant::now();
        match run_case(&case, guest, diskctl.as_deref(), &dir) {
            Ok(verdict) => {
                for check in &verdict.checks {
                    eprintln!("xtask: guest {}: {check}", case.name);
                }
                eprintln!(
                    "xtask: guest {}: {} in {:.1} s",
                    case.name,
                    if verdict.passed { "passed" } else { "FAILED" },
                    started.elapsed().as_secs_f64()
                );
                if !verdict.passed {
                    failures.push(case.name);
                }
            }
            Err(e) => {
                eprintln!("xtask: guest {}: {e}", case.name);
                failures.push(case.name);
            }
        }
        for (path, _) in &case.images {
            let _ = std::fs::remove_file(path);
        }
        if let Some(image) = &case.qcow2 {
            let _ = std::fs::remove_file(image);
        }
    }
    if failures.is_empty() {
        eprintln!("xtask: guest-test passed");
        Ok(())
    } else {
        Err(format!("guest checks failed: {}", failures.join(", ")))
    }
}

/// The fio jobs of `cargo xtask bench guest`, as the guest names them.
const BENCH_JOBS: &[&str] = &["randread-4k-qd1", "randread-4k-qd32", "write-1m-qd4"];
/// Size of the shared backing file.
const BENCH_BYTES: u64 = 1 << 30;

/// One job's result: IOPS and KiB/s.
type JobResult = (f64, f64);

/// Boots the bench guest against one export and returns each job's result.
fn bench_once(guest: &Guest, export: Export, runtime: u32) -> Result<Vec<JobResult>> {
    let expect = format!("guest.mode=bench guest.runtime={runtime}");
    let verdict = boot(guest, &export.socket, &expect, &HostSide::default());
    let log = export.log_text();
    let _ = export.stop();
    let verdict = verdict.map_err(|e| format!("{e}; export log: {log}"))?;
    BENCH_JOBS
        .iter()
        .map(|job| {
            let prefix = format!("GUEST-BENCH {job} ");
            let line = verdict
                .checks
                .iter()
                .find_map(|l| l.strip_prefix(&prefix))
                .ok_or_else(|| {
                    format!(
                        "no result for {job}: {:?}; export log: {log}",
                        verdict.checks
                    )
                })?;
            let field = |name: &str| -> Result<f64> {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{job}: {line}"))
            };
            Ok((field("iops")?, field("kibps")?))
        })
        .collect()
}

/// `cargo xtask bench guest [--runtime SECS] [--rounds N]`: the same User-Mode Linux guest and
/// fio jobs against qemu-storage-daemon and `diskctl serve` on one backing file, alternated,
/// with the ratio per job.
pub fn bench_guest(args: &[String]) -> Result {
    let usage = "usage: cargo xtask bench guest [--runtime SECS] [--rounds N] [--spec SPEC] \
                 [--qsd-iothread]";
    let mut qsd_iothread = false;
    let mut runtime = 10u32;
    let mut rounds = 3u32;
    let mut spec_template = "file:IMAGE".to_string();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--qsd-iothread" {
            qsd_iothread = true;
            continue;
        }
        let value = it.next().ok_or(usage)?;
        match flag.as_str() {
            "--runtime" => runtime = value.parse().map_err(|_| usage)?,
            "--rounds" => rounds = value.parse().ok().filter(|&v| v > 0).ok_or(usage)?,
            "--spec" if value.contains("IMAGE") => spec_template = value.clone(),
            "--spec" => return Err("--spec: the stack must name its backing file as IMAGE".into()),
            _ => return Err(usage.into()),
        }
    }
    ensure_packages(true, false)?;
    let diskctl = build_diskctl(true)?;
    let dir = guest_dir()?;
    let guest = Guest::new(Frontend::Uml, &dir)?;
    // In memory, as both exports serve it through the page cache: the comparison is of the
    // software paths, not of a disk whose timings swing between runs.
    let shm = Path::new("/dev/shm");
    let image = if shm.is_dir() {
        shm.join("xtask-bench-guest.img")
    } else {
        dir.join("bench.img")
    };
    sh(
        "fill the bench image",
        &format!(
            "dd if=/dev/zero of='{}' bs=1M count={} status=none",
            image.display(),
            BENCH_BYTES >> 20
        ),
    )?;
    let socket = dir.join("bench.sock");
    let log = dir.join("bench.log");
    let mut qsd: Vec<Vec<JobResult>> = Vec::new();
    let mut ours: Vec<Vec<JobResult>> = Vec::new();
    let result = (|| -> Result {
        for round in 1..=rounds {
            eprintln!("xtask: bench guest: round {round}/{rounds}: qemu-storage-daemon");
            let export = Export::qemu_storage_daemon(&image, &socket, false, qsd_iothread, &log)?;
            qsd.push(bench_once(&guest, export, runtime)?);
            eprintln!("xtask: bench guest: round {round}/{rounds}: diskctl serve");
            let spec = spec_template.replace("IMAGE", &image.display().to_string());
            let export = Export::diskctl(&diskctl, &spec, &socket, false, &log)?;
            ours.push(bench_once(&guest, export, runtime)?);
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&image);
    result?;
    // The figure a job reports: bandwidth for the write job, IOPS for the others.
    let figure = |job: usize, (iops, kibps): JobResult| -> f64 {
        if BENCH_JOBS[job].starts_with("write") {
            kibps / 1024.0
        } else {
            iops
        }
    };
    let unit = |job: usize| {
        if BENCH_JOBS[job].starts_with("write") {
            "MiB/s"
        } else {
            "IOPS"
        }
    };
    let median = |runs: &[Vec<JobResult>], job: usize| -> f64 {
        let mut values: Vec<f64> = runs.iter().map(|r| figure(job, r[job])).collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        }
    };
    println!(
        "User-Mode Linux guest, fio libaio direct I/O on /dev/vda, {runtime} s per job, \
         {rounds} alternated rounds; qemu-storage-daemon {}, diskctl serve '{spec_template}'",
        if qsd_iothread {
            "with an iothread"
        } else {
            "with its defaults"
        }
    );
    println!(
        "{:<18} {:>20} {:>20} {:>7}   per round (qsd / ours = ratio)",
        "job (median)", "qemu-storage-daemon", "diskctl serve", "ratio"
    );
    for (job, name) in BENCH_JOBS.iter().enumerate() {
        let (a, b) = (median(&qsd, job), median(&ours, job));
        let rounds: Vec<String> = qsd
            .iter()
            .zip(&ours)
            .map(|(q, o)| {
                let (q, o) = (figure(job, q[job]), figure(job, o[job]));
                format!("{q:.0}/{o:.0}={:.2}x", o / q)
            })
            .collect();
        println!(
            "{name:<18} {:>14.0} {:<5} {:>14.0} {:<5} {:>6.2}x   {}",
            a,
            unit(job),
            b,
            unit(job),
            b / a,
            rounds.join("  ")
        );
    }
    Ok(())
}
