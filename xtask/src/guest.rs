//! `cargo xtask guest-test`: a real Linux kernel (User-Mode Linux) drives a vhost-user-blk
//! export through its own virtio_blk driver, and checks the disk from inside.
//!
//! The harness builds a busybox initramfs holding `virtio_blk.ko`, fio and e2fsprogs (with
//! the libraries `ldd` lists), starts an export on a Unix socket, boots
//! `linux.uml ... virtio_uml.device=SOCKET:2`, and reads the verdict the guest prints on its
//! console (`guest_init.sh`). A guest that hangs is killed at the timeout and fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, String>;

const GUEST_INIT: &str = include_str!("guest_init.sh");
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DISK_BYTES: u64 = 64 << 20;

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

/// Installs what the guest test needs from Debian's packages where it is missing.
fn ensure_packages(need_qsd: bool) -> Result {
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
    let qsd_missing = need_qsd && !Path::new("/usr/bin/qemu-storage-daemon").exists();
    if missing.is_empty() && !qsd_missing {
        return Ok(());
    }
    if !is_root() {
        missing.extend(qsd_missing.then_some("qemu-system-common (bookworm-backports)"));
        return Err(format!(
            "guest-test needs {} and is not root to install them",
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
    if qsd_missing {
        // From bookworm-backports, so the installed qemu-utils 10 is not replaced by 7.2.
        sh(
            "install qemu-storage-daemon",
            "echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list \
             && apt-get update -qq \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-common",
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

/// Builds the initramfs under `dir` and returns its path.
fn build_initramfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
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
    copy(&virtio_blk_module()?, &root.join("virtio_blk.ko"))?;
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
    let image = dir.join("initramfs.gz");
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

/// An export serving a disk image over vhost-user-blk, stopped on drop.
struct Export {
    child: Child,
    socket: PathBuf,
}

impl Export {
    /// qemu-storage-daemon serving `image`: the reference export.
    fn qemu_storage_daemon(image: &Path, socket: &Path, read_only: bool) -> Result<Self> {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={},cache.direct=off", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={}",
                socket.display(),
                if read_only { "off" } else { "on" }
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start qemu-storage-daemon: {e}"))?;
        let export = Self {
            child,
            socket: socket.to_owned(),
        };
        export.wait_for_socket()?;
        Ok(export)
    }

    fn wait_for_socket(&self) -> Result {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the export never created {}",
                    self.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What the guest reported.
struct Verdict {
    passed: bool,
    checks: Vec<String>,
}

/// Boots the guest against `socket` and returns its verdict. The guest and its helper
/// processes run in a process group of their own, killed at the timeout.
fn boot(initramfs: &Path, socket: &Path, expect: &str) -> Result<Verdict> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("linux.uml")
        .args([
            "mem=512M".to_string(),
            format!("initrd={}", initramfs.display()),
            "con=null".into(),
            "con0=fd:0,fd:1".into(),
            format!("virtio_uml.device={}:2", socket.display()),
        ])
        .args(expect.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start linux.uml: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
            .filter(|line| line.starts_with("GUEST-"))
            .collect::<Vec<String>>()
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let finished = loop {
        if child
            .try_wait()
            .map_err(|e| format!("linux.uml: {e}"))?
            .is_some()
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // UML leaves helper processes in the group; end them all.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let lines = reader.join().unwrap_or_default();
    if !finished {
        return Err(format!(
            "the guest hung and was killed after {} s; it said: {lines:?}",
            BOOT_TIMEOUT.as_secs()
        ));
    }
    let passed = lines.iter().any(|l| l == "GUEST-RESULT PASS");
    if !passed && !lines.iter().any(|l| l.starts_with("GUEST-RESULT")) {
        return Err(format!(
            "the guest stopped without a verdict; it said: {lines:?}"
        ));
    }
    Ok(Verdict {
        passed,
        checks: lines,
    })
}

/// Runs the guest checks against each export and stack, printing every check.
pub fn guest_test(args: &[String]) -> Result {
    let export = match args {
        [] => "qsd",
        [flag, value] if flag == "--export" => value.as_str(),
        _ => return Err("usage: cargo xtask guest-test [--export qsd]".into()),
    };
    if export != "qsd" {
        return Err(format!(
            "unknown export `{export}`: this build has only `qsd` (qemu-storage-daemon, the reference the harness is checked against)"
        ));
    }
    ensure_packages(true)?;
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("target/guest");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let initramfs = build_initramfs(&dir)?;
    let mut failures = Vec::new();
    for (name, read_only) in [("qsd-file", false), ("qsd-file-read-only", true)] {
        let image = dir.join(format!("{name}.img"));
        let file =
            std::fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
        file.set_len(DISK_BYTES).map_err(|e| e.to_string())?;
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let export = Export::qemu_storage_daemon(&image, &socket, read_only)?;
        let expect = format!(
            "guest.sectors={} guest.lbs=512 guest.ro={}",
            DISK_BYTES / 512,
            u8::from(read_only)
        );
        let started = Instant::now();
        let verdict = boot(&initramfs, &export.socket, &expect);
        drop(export);
        match verdict {
            Ok(verdict) => {
                for check in &verdict.checks {
                    eprintln!("xtask: guest {name}: {check}");
                }
                eprintln!(
                    "xtask: guest {name}: {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                if !verdict.passed {
                    failures.push(name);
                }
            }
            Err(e) => {
                eprintln!("xtask: guest {name}: {e}");
                failures.push(name);
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("guest checks failed: {}", failures.join(", ")))
    }
}
