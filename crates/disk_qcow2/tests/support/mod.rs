//! Shared helpers: images in files, stacks over them, qemu-img.

#![allow(dead_code)]

use disk_backend::Disk;
use disk_file::{FileDisk, FileDiskOptions};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use disk_qcow2::{CreateOptions, GrowFn, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use futures::executor::block_on;
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// The image file in `file` (read-write unless `read_only`), growing through `set_len`.
pub fn image_file(file: &File, read_only: bool) -> ImageFile {
    let options = FileDiskOptions {
        read_only,
        ..Default::default()
    };
    let disk = FileDisk::from_file(file.try_clone().unwrap(), &options).unwrap();
    let grow: Option<GrowFn> = if read_only {
        None
    } else {
        let file = file.try_clone().unwrap();
        Some(Box::new(move |len| {
            if file.metadata()?.len() < len {
                file.set_len(len)?;
            }
            Ok(())
        }))
    };
    ImageFile::new(Disk::new(disk).unwrap(), grow)
}

/// Opens the image in `file` writable, on a host that adds `delay` to every read and write
/// (wider windows for races).
pub fn slow_layer(file: &File, delay: std::time::Duration) -> Arc<Qcow2Layer> {
    let fast = image_file(file, false);
    let grow_file = file.try_clone().unwrap();
    let grow: GrowFn = Box::new(move |len| {
        if grow_file.metadata()?.len() < len {
            grow_file.set_len(len)?;
        }
        Ok(())
    });
    let slow = Disk::new(disk_delay::DelayDisk::new(fast.disk().clone(), delay)).unwrap();
    Arc::new(
        block_on(Qcow2Layer::open(
            ImageFile::new(slow, Some(grow)),
            &Qcow2Options::default(),
        ))
        .unwrap(),
    )
}

/// Opens `path` for reading, or for reading and writing.
pub fn open_path(path: &Path, read_only: bool) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .unwrap()
}

/// Writes a new image into `file` (which may be empty).
pub fn create(file: &File, options: &CreateOptions) {
    if file.metadata().unwrap().len() < 4096 {
        file.set_len(4096).unwrap();
    }
    block_on(Qcow2Layer::create(&image_file(file, false), options)).unwrap();
}

/// Opens the image in `file` as a layer.
pub fn layer(file: &File, read_only: bool) -> Arc<Qcow2Layer> {
    let options = Qcow2Options {
        read_only,
        ..Default::default()
    };
    Arc::new(block_on(Qcow2Layer::open(image_file(file, read_only), &options)).unwrap())
}

/// A layered disk of `layers`, top first.
pub fn stack(read_only: bool, layers: Vec<DiskLayer>) -> Disk {
    Disk::new(
        LayeredDisk::new(
            read_only,
            layers.into_iter().map(LayerConfiguration::new).collect(),
        )
        .unwrap(),
    )
    .unwrap()
}

/// A qcow2 layer as a stack layer.
pub fn qcow2_layer(layer: Arc<Qcow2Layer>) -> DiskLayer {
    DiskLayer::new(Qcow2Attach(layer))
}

/// Whether qemu-img can be used; `false` (having said so) where it is missing, except under
/// `CI=true`, where its absence fails the test.
pub fn have_qemu() -> bool {
    let found = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-img is missing under CI=true (install qemu-utils)");
        }
        eprintln!("skipping: qemu-img not found (install qemu-utils)");
    }
    found
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check`: no errors, no leaks.
pub fn qemu_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        path.display()
    );
    assert!(
        !text.contains("leaked"),
        "qemu-img check found leaks: {text}"
    );
}

/// A deterministic, mostly incompressible pattern with runs of zeros.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
