//! `cargo xtask bench qcow2`: our qcow2 layer against QEMU's own qcow2 driver
//! (`qemu-img bench -t none -i io_uring`) on the same images in `/dev/shm`.
//!
//! Jobs: 4 KiB reads of a fully allocated image at QD1 and QD32, 4 KiB writes into a fresh
//! image (every one allocates a cluster) at QD32, and 1 MiB sequential writes into a fresh
//! image at QD4. Ours runs through `diskctl bench` on `qcow2(IMAGE, direct)` (io_uring,
//! `O_DIRECT`, as QEMU's `-t none -i io_uring`), and the allocated reads also on the raw file
//! through `blockdev(RAW)`, the same engine without the format. Rounds alternate the
//! programs; each figure is the median of the rounds, and each ratio is taken between the
//! medians.
//!
//! `qemu-img bench` has no random pattern: it steps through the image by a fixed stride,
//! wrapping at the end. It runs with a stride of 7919 × 4 KiB (a prime number of blocks, so
//! every block is visited once per pass, scattered over the image), and ours with
//! `--rw randread`/`randwrite` (uniformly random blocks): both move between clusters on every
//! request and neither finds the next block in a cache.

use crate::guest::build_diskctl;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const IMAGE_BYTES: u64 = 1 << 30;
/// The stride of qemu-img bench's scattered 4 KiB jobs: a prime number of blocks.
const STRIDE_BLOCKS: u64 = 7919;

type Result<T = ()> = std::result::Result<T, String>;

#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    write: bool,
    block: u64,
    depth: u32,
    /// Requests per run.
    count: u64,
    /// Writes go to a fresh image (made before every run).
    fresh: bool,
    /// Compared with the raw file too.
    raw: bool,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4k random read QD1",
        write: false,
        block: 4096,
        depth: 1,
        count: 100_000,
        fresh: false,
        raw: true,
    },
    Job {
        name: "4k random read QD32",
        write: false,
        block: 4096,
        depth: 32,
        count: 400_000,
        fresh: false,
        raw: true,
    },
    Job {
        name: "4k random write QD32 (allocating)",
        write: true,
        block: 4096,
        depth: 32,
        count: 100_000,
        fresh: true,
        raw: false,
    },
    Job {
        name: "1M sequential write QD4 (allocating)",
        write: true,
        block: 1 << 20,
        depth: 4,
        count: 1024,
        fresh: true,
        raw: false,
    },
];

/// Runs `command` and returns its standard output; what it printed becomes the error if it
/// fails.
fn run_output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .map_err(|e| format!("{command:?}: cannot start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img ARGS`, its standard output on success.
pub(crate) fn qemu_img(args: &[&str]) -> Result<String> {
    run_output(Command::new("qemu-img").args(args))
}

/// A qcow2 image of `IMAGE_BYTES`, every cluster allocated (and written) when `allocated`.
fn create_qcow2(path: &Path, allocated: bool) -> Result {
    let _ = std::fs::remove_file(path);
    let size = IMAGE_BYTES.to_string();
    let path = path.to_str().ok_or("path is not UTF-8")?;
    if allocated {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            path,
            &size,
        ])?;
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", path, &size])?;
    }
    Ok(())
}

/// IOPS of `qemu-img bench` on `image`.
fn qemu_bench(job: &Job, image: &Path) -> Result<f64> {
    let (count, depth, block) = (job.count.to_string(), job.depth.to_string(), job.block);
    let step = if job.block == 4096 {
        STRIDE_BLOCKS * block
    } else {
        block
    };
    let (block, step) = (block.to_string(), step.to_string());
    let mut args = vec![
        "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-c", &count, "-d", &depth, "-s",
        &block, "-S", &step,
    ];
    if job.write {
        args.push("-w");
    }
    let image = image.to_str().ok_or("path is not UTF-8")?;
    args.push(image);
    let start = Instant::now();
    let out = qemu_img(&args)?;
    let elapsed = start.elapsed().as_secs_f64();
    // "Run completed in N seconds." excludes start-up; fall back to the wall time.
    let seconds = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(elapsed);
    Ok(job.count as f64 / seconds)
}

/// IOPS of `diskctl bench` on `spec`.
fn our_bench(diskctl: &Path, job: &Job, spec: &str) -> Result<f64> {
    let rw = match (job.write, job.block == 4096) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let size = (job.count * job.block).to_string();
    let out = run_output(Command::new(diskctl).args([
        "bench",
        spec,
        "--rw",
        rw,
        "--bs",
        &job.block.to_string(),
        "--qd",
        &job.depth.to_string(),
        "--size",
        &size,
        "--no-verify",
        "--json",
    ]))?;
    let report: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("diskctl bench output: {e}: {out}"))?;
    report["result"]["iops"]
        .as_f64()
        .ok_or_else(|| format!("no iops in {out}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs the comparison; `args`: `--rounds N` (default 3).
pub fn bench_qcow2(args: &[String]) -> Result {
    let rounds = match args {
        [] => 3,
        [flag, n] if flag == "--rounds" => n
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or("--rounds takes a positive number")?,
        _ => return Err("usage: cargo xtask bench qcow2 [--rounds N]".into()),
    };
    qemu_img(&["--version"]).map_err(|e| format!("qemu-img is needed (qemu-utils): {e}"))?;
    let diskctl = build_diskctl(true)?;
    let dir = PathBuf::from("/dev/shm").join(format!("xtask-bench-qcow2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = compare(&diskctl, &dir, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare(diskctl: &Path, dir: &Path, rounds: usize) -> Result {
    let allocated = dir.join("allocated.qcow2");
    let fresh = dir.join("fresh.qcow2");
    let raw = dir.join("raw.img");
    create_qcow2(&allocated, true)?;
    // Every byte written, as the preallocated image's clusters are: a sparse raw file would
    // read holes, which tmpfs serves without touching a page, and flatter the raw figure.
    let mut raw_file =
        std::fs::File::create(&raw).map_err(|e| format!("{}: {e}", raw.display()))?;
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..IMAGE_BYTES / chunk.len() as u64 {
        std::io::Write::write_all(&mut raw_file, &chunk)
            .map_err(|e| format!("{}: {e}", raw.display()))?;
    }
    drop(raw_file);
    let spec = |image: &Path, ro: bool| {
        format!(
            "qcow2({}{}, direct)",
            image.display(),
            if ro { ", ro" } else { "" }
        )
    };
    println!(
        "qcow2: ours (diskctl bench, qcow2(IMAGE, direct)) against qemu-img bench -f qcow2 -t none -i io_uring; {} GiB images in /dev/shm; medians of {rounds} alternated rounds",
        IMAGE_BYTES >> 30
    );
    println!(
        "{:<40} {:>12} {:>12} {:>8} {:>12} {:>10}",
        "job", "ours IOPS", "qemu IOPS", "ratio", "raw IOPS", "qcow2/raw"
    );
    for job in &JOBS {
        let (mut ours, mut theirs, mut raws) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let image = if job.fresh {
                create_qcow2(&fresh, false)?;
                &fresh
            } else {
                &allocated
            };
            ours.push(our_bench(diskctl, job, &spec(image, !job.write))?);
            if job.fresh {
                create_qcow2(&fresh, false)?;
            }
            theirs.push(qemu_bench(job, image)?);
            if job.raw {
                raws.push(our_bench(
                    diskctl,
                    job,
                    &format!("blockdev({}, ro)", raw.display()),
                )?);
            }
        }
        let (ours, theirs) = (median(&mut ours), median(&mut theirs));
        let raw_cell = |raws: &mut Vec<f64>| {
            if raws.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                let raw = median(raws);
                (format!("{raw:.0}"), format!("{:.2}", raw / ours))
            }
        };
        let (raw, raw_ratio) = raw_cell(&mut raws);
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>8.2} {:>12} {:>10}",
            job.name,
            ours,
            theirs,
            ours / theirs,
            raw,
            raw_ratio
        );
    }
    println!(
        "ratio: ours / qemu-img bench (goal >= 1.0); qcow2/raw: time of a qcow2 read against the raw file through the same engine (goal <= 1.15)"
    );
    Ok(())
}
