//! `BlockDeviceDisk` against fio's io_uring engine, on the same loop devices, in one run.
//!
//! Run as root with `cargo xtask bench blockdevice [--runtime SECS] [--reps N] [--only shm|disk]
//! [--engine TEXT] [--workload TEXT] [--size-mib N] [--pin CPU]`. It creates two loop devices with
//! `--direct-io=on` (one backed by a file in `/dev/shm`, one by a file on disk in `/var/tmp`),
//! installs fio with apt-get if it is missing, and for each workload (4 KiB random read at
//! queue depth 1 and 32, 1 MiB sequential read and write at depth 8, all `O_DIRECT`)
//! alternates fio and each of our engines `--reps` times, then prints IOPS per run, and the
//! medians of IOPS, bandwidth, mean and p99 latency and CPU time per request (user and
//! system: fio's job process, our whole process), and the ratio of each pair (ours / plain
//! fio, whose defaults are the reference; fio with `--fixedbufs --registerfiles` runs
//! too, for comparison, and for the 1 MiB workloads fio with `--mem=mmaphuge`, its buffers
//! in huge pages reserved for the run, as our guest memory is). Our engines: the default
//! options driven by `futures::executor::block_on` (what an executor without a reactor gets, such as the
//! `LocalPool` of `virtio_block`), the same with fixed buffers (the requests' memory
//! registered with `register_fixed_buffers`), `Completions::Tokio` on a tokio current-thread
//! runtime, `Completions::Owner` driven by the disk's own `OwnerDriver` without and with
//! fixed buffers, the owner mode with `completion_spin` (adaptive polling) without and with
//! fixed buffers, and at queue depth 1 the default with `completion_spin`. All requests' buffers
//! live in one guest memory (anonymous, in transparent huge pages where the kernel has them),
//! a page-aligned run of pages per request in flight. Each run also notes the mean size of
//! the requests the loop device served, from its `/sys/block/NAME/stat`.
//! `--pin CPU` pins the thread that runs our engines' futures (the owner, in owner mode) to
//! one CPU while they run (fio stays unpinned).
//! `--engine` and `--workload` keep only the engines and workloads whose
//! names contain the text, or one of its `|`-separated parts (for profiling; without fio the
//! ratios are to the first engine kept). Not part of CI: the figures depend on the machine.

use disk_backend::Disk;
use disk_blockdevice::{BlockDeviceDisk, BlockDeviceOptions, Completions, OwnerDriver};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use nix::sys::resource::{UsageWho, getrusage};
use rand::{Rng, SeedableRng};
use request_buffers::{GuestMemory, PagedRange, RequestBuffers};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    fio_rw: &'static str,
    block_size: usize,
    queue_depth: usize,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read, QD1",
        fio_rw: "randread",
        block_size: 4096,
        queue_depth: 1,
        random: true,
        write: false,
    },
    Workload {
        name: "4 KiB random read, QD32",
        fio_rw: "randread",
        block_size: 4096,
        queue_depth: 32,
        random: true,
        write: false,
    },
    Workload {
        name: "1 MiB sequential read, QD8",
        fio_rw: "read",
        block_size: 1 << 20,
        queue_depth: 8,
        random: false,
        write: false,
    },
    Workload {
        name: "1 MiB sequential write, QD8",
        fio_rw: "write",
        block_size: 1 << 20,
        queue_depth: 8,
        random: false,
        write: true,
    },
];

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    iops: f64,
    bytes_per_second: f64,
    mean_latency_us: f64,
    p99_latency_us: f64,
    /// User-space CPU time per request, in µs (fio's job process; our whole process).
    user_us: f64,
    /// Kernel CPU time per request, in µs.
    system_us: f64,
    /// The mean size of the requests the loop device served, in KiB: what the block layer
    /// made of the engine's (it splits a request with more segments than the device takes).
    /// NaN where the device's counters could not be read.
    device_kib: f64,
}

struct Options {
    runtime: u64,
    reps: usize,
    size_mib: u64,
    only: Option<String>,
    /// Only the engines whose name contains this, or one of its `|`-separated parts (fio is
    /// "fio"; a part ending in `$` must end the name), for profiling.
    engine: Option<String>,
    /// Only the workloads whose name contains this.
    workload: Option<String>,
    /// Pin the thread that runs our engines' futures (the owner, in owner mode) to this CPU
    /// while they run; fio and the disks' own threads stay unpinned.
    pin: Option<usize>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        runtime: 5,
        reps: 3,
        size_mib: 1024,
        only: None,
        engine: None,
        workload: None,
        pin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--runtime" => options.runtime = value()?.parse().map_err(|_| "bad --runtime")?,
            "--reps" => options.reps = value()?.parse().map_err(|_| "bad --reps")?,
            "--size-mib" => options.size_mib = value()?.parse().map_err(|_| "bad --size-mib")?,
            "--only" => options.only = Some(value()?),
            "--engine" => options.engine = Some(value()?),
            "--workload" => options.workload = Some(value()?),
            "--pin" => options.pin = Some(value()?.parse().map_err(|_| "bad --pin")?),
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    if options.reps == 0 || options.runtime == 0 {
        return Err("--reps and --runtime must be at least 1".into());
    }
    Ok(options)
}

/// A loop device over a file; detached on drop.
struct LoopDevice {
    path: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    fn new(dir: &Path, size: u64) -> Result<Self, String> {
        let backing = dir.join(format!("fio-compare-{}.img", std::process::id()));
        fill(&backing, size).map_err(|e| format!("fill {}: {e}", backing.display()))?;
        let output = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&backing);
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(Self { path, backing })
    }

    /// Requests and 512-byte sectors the device has served so far, reads and writes
    /// (`/sys/block/NAME/stat`).
    fn served(&self) -> Result<(u64, u64), String> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let path = format!("/sys/block/{name}/stat");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(|f| f.parse().map_err(|_| format!("{path}: not a number: {f}")))
            .collect::<Result<_, _>>()?;
        if fields.len() < 7 {
            return Err(format!(
                "{path}: {} fields, expected at least 7",
                fields.len()
            ));
        }
        Ok((fields[0] + fields[4], fields[2] + fields[6]))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Writes `size` bytes of non-zero data, so reads hit allocated blocks, not holes.
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    let mut written = 0;
    while written < size {
        file.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    file.sync_all()
}

/// 2 MiB huge pages reserved for fio's buffers with `--mem=mmaphuge`, given back when
/// dropped.
struct HugePages {
    before: u64,
}

impl HugePages {
    /// The pool of 2 MiB pages (`/proc/sys/vm/nr_hugepages` counts the default size, which
    /// a kernel command line may have made 1 GiB).
    const PATH: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

    /// Reserves `count` more huge pages; `None` (after saying why) if the kernel cannot.
    fn reserve(count: u64) -> Option<Self> {
        let read = || -> Option<u64> {
            std::fs::read_to_string(Self::PATH)
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let before = read()?;
        let wanted = before + count;
        let reserved = std::fs::write(Self::PATH, wanted.to_string()).is_ok();
        let pages = Self { before };
        if reserved && read() == Some(wanted) {
            Some(pages)
        } else {
            eprintln!(
                "fio_compare: cannot reserve {count} huge pages in {}: skipping fio --mem=mmaphuge",
                Self::PATH
            );
            None
        }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.before.to_string());
    }
}

/// One fio run; `fixed` adds `--fixedbufs --registerfiles` (fio's buffers registered with
/// its ring, as our fixed buffers are), `huge` `--mem=mmaphuge` (its buffers in huge
/// pages, as our guest memory is).
fn run_fio(
    device: &Path,
    workload: &Workload,
    runtime: u64,
    fixed: bool,
    huge: bool,
) -> Result<Figures, String> {
    let output = Command::new("fio")
        .arg("--name=compare")
        .arg(format!("--filename={}", device.display()))
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--lat_percentiles=1",
            "--output-format=json",
        ])
        // Engine options, after `--ioengine`.
        .args(if fixed {
            &["--fixedbufs", "--registerfiles"][..]
        } else {
            &[]
        })
        .args(if huge {
            &["--mem=mmaphuge", "--hugepage-size=2m"][..]
        } else {
            &[]
        })
        .arg(format!("--rw={}", workload.fio_rw))
        .arg(format!("--bs={}", workload.block_size))
        .arg(format!("--iodepth={}", workload.queue_depth))
        .arg(format!("--runtime={runtime}"))
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cannot parse fio's output: {e}"))?;
    let side = &json["jobs"][0][if workload.write { "write" } else { "read" }];
    let number = |v: &serde_json::Value| v.as_f64().ok_or(format!("fio output lacks {v}"));
    // fio reports its job's CPU use as a percentage of the job's run time.
    let job = &json["jobs"][0];
    let seconds = number(&job["job_runtime"])? / 1000.0;
    let requests = number(&side["total_ios"])?;
    let cpu_us = |key: &str| -> Result<f64, String> {
        Ok(number(&job[key])? / 100.0 * seconds * 1e6 / requests)
    };
    Ok(Figures {
        user_us: cpu_us("usr_cpu")?,
        system_us: cpu_us("sys_cpu")?,
        iops: number(&side["iops"])?,
        bytes_per_second: number(&side["bw_bytes"])?,
        mean_latency_us: number(&side["lat_ns"]["mean"])? / 1000.0,
        p99_latency_us: number(&side["lat_ns"]["percentile"]["99.000000"])? / 1000.0,
        device_kib: 0.0,
    })
}

/// One request of the workload; `issued` is when it was queued, so the latency includes
/// the time until the executor first polls it.
async fn one_request(
    disk: &Disk,
    memory: &GuestMemory,
    buffer: PagedRange<'_>,
    slot: usize,
    sector: u64,
    write: bool,
    issued: Instant,
) -> (usize, Instant) {
    let buffers = RequestBuffers::new(memory, buffer, !write);
    let result = if write {
        disk.write_vectored(&buffers, sector, false).await
    } else {
        disk.read_vectored(&buffers, sector).await
    };
    if let Err(e) = result {
        panic!("request at sector {sector} failed: {e}");
    }
    (slot, issued)
}

/// How an engine of ours drives its futures.
#[derive(Clone, Copy)]
enum Executor<'a> {
    /// `futures::executor::block_on` on the calling thread (any executor without a reactor
    /// behaves alike: it parks the thread until a waker unparks it).
    BlockOn,
    /// A tokio current-thread runtime, which also runs the disk's completion task
    /// (`Completions::Tokio`).
    Tokio(&'a tokio::runtime::Runtime),
    /// `Completions::Owner`: this thread owns the ring and runs the futures with the disk's
    /// own driver.
    Owner(&'a OwnerDriver),
}

/// Runs `workload` on `disk` with request buffers in `memory` (consecutive pages, one run of
/// `block_size` bytes per request in flight), which must be large enough.
fn run_ours(
    disk: &Disk,
    executor: Executor<'_>,
    memory: &GuestMemory,
    workload: &Workload,
    runtime: u64,
    pin: Option<usize>,
) -> Figures {
    let _pinned = pin.map(Pinned::to);
    let sector_size = disk.sector_size() as u64;
    let sectors_per_request = workload.block_size as u64 / sector_size;
    let positions = disk.sector_count() / sectors_per_request;
    let pages = workload.block_size.div_ceil(guestmem::PAGE_SIZE);
    memory
        .fill_at(0, 0x5a, workload.queue_depth * workload.block_size)
        .expect("the benchmark's memory holds every request's buffer");
    let page_numbers: Vec<Vec<u64>> = (0..workload.queue_depth)
        .map(|slot| (0..pages).map(|p| (slot * pages + p) as u64).collect())
        .collect();
    let buffers: Vec<PagedRange<'_>> = page_numbers
        .iter()
        .map(|gpns| PagedRange::new(0, workload.block_size, gpns).expect("whole pages"))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut next_sequential = 0u64;
    let mut next_sector = || {
        let position = if workload.random {
            rng.random_range(0..positions)
        } else {
            let p = next_sequential;
            next_sequential = (next_sequential + 1) % positions;
            p
        };
        position * sectors_per_request
    };
    let mut latencies_ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let usage_before = cpu_usage();
    let start = Instant::now();
    let end = start + Duration::from_secs(runtime);
    let job = async {
        let mut in_flight = FuturesUnordered::new();
        for (slot, buffer) in buffers.iter().enumerate() {
            in_flight.push(one_request(
                disk,
                memory,
                *buffer,
                slot,
                next_sector(),
                workload.write,
                Instant::now(),
            ));
        }
        while let Some((slot, issued)) = in_flight.next().await {
            let now = Instant::now();
            latencies_ns.push((now - issued).as_nanos() as u64);
            if now < end {
                in_flight.push(one_request(
                    disk,
                    memory,
                    buffers[slot],
                    slot,
                    next_sector(),
                    workload.write,
                    now,
                ));
            }
        }
    };
    match executor {
        Executor::BlockOn => futures::executor::block_on(job),
        Executor::Tokio(runtime) => runtime.block_on(job),
        Executor::Owner(driver) => driver.block_on(job),
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (user, system) = cpu_usage();
    let count = latencies_ns.len();
    let per_request =
        |after: Duration, before: Duration| (after - before).as_secs_f64() * 1e6 / count as f64;
    let mean = latencies_ns.iter().sum::<u64>() as f64 / count as f64;
    latencies_ns.sort_unstable();
    let p99 = latencies_ns[(count * 99 / 100).min(count - 1)];
    Figures {
        iops: count as f64 / elapsed,
        bytes_per_second: (count * workload.block_size) as f64 / elapsed,
        mean_latency_us: mean / 1000.0,
        p99_latency_us: p99 as f64 / 1000.0,
        user_us: per_request(user, usage_before.0),
        system_us: per_request(system, usage_before.1),
        device_kib: 0.0,
    }
}

/// The calling thread pinned to one CPU until dropped, when its affinity is restored (so
/// that the fio processes this thread starts later are not pinned).
struct Pinned(nix::sched::CpuSet);

impl Pinned {
    fn to(cpu: usize) -> Self {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let before = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        let mut one = CpuSet::new();
        one.set(cpu).expect("--pin names a CPU");
        sched_setaffinity(Pid::from_raw(0), &one).expect("sched_setaffinity");
        Self(before)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// The user and system CPU time this process has used so far.
fn cpu_usage() -> (Duration, Duration) {
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage(RUSAGE_SELF) cannot fail");
    let duration =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    (duration(usage.user_time()), duration(usage.system_time()))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn ensure_fio() -> Result<(), String> {
    if Command::new("fio").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("fio is missing; installing it with apt-get");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "fio"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err("fio is not installed and `apt-get install fio` failed".into())
    }
}

fn format_runs(runs: &[Figures], value: impl Fn(&Figures) -> f64, scale: f64) -> String {
    runs.iter()
        .map(|f| format!("{:.0}", value(f) / scale))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `completion_spin` of the polling engines: the completion thread's fixed spin (QD1 only,
/// where a thread wake-up is a large part of the latency; it only spins with one or two
/// requests in flight) and the owner's adaptive polling (every workload).
const SPIN: Duration = Duration::from_micros(50);

/// What one row of the comparison runs.
#[derive(Clone, Copy)]
enum Engine<'a, 'b> {
    Fio { fixed: bool, huge: bool },
    Ours(&'b Ours<'a>),
}

/// One engine of ours: a disk and how its futures are driven.
struct Ours<'a> {
    disk: Disk,
    executor: Executor<'a>,
}

fn compare(label: &str, dir: &Path, options: &Options) -> Result<(), String> {
    let device = LoopDevice::new(dir, options.size_mib << 20)?;
    // The "guest memory" every engine's requests use: room for the largest workload, in
    // transparent huge pages as a VMM's guest RAM usually is (`GuestMemoryBuilder::anonymous`).
    // With scattered 4 KiB pages a 1 MiB request has 256 segments and the loop device (128
    // per request) serves it as two; fio's buffers are split or not depending on how
    // contiguous the pages it happens to get are (the column "KiB per device request").
    let memory_len = WORKLOADS
        .iter()
        .map(|w| w.queue_depth * w.block_size)
        .max()
        .unwrap_or(0);
    let memory = GuestMemory::builder()
        .anonymous(0, memory_len as u64)
        .and_then(|b| b.build())
        .map_err(|e| format!("guest memory: {e}"))?;
    // A backend of the device, with `memory` registered as fixed buffers if `fixed`
    // (before an owner claims the ring, which any thread may do).
    let open_backend = |completion_spin, completions, fixed| -> Result<BlockDeviceDisk, String> {
        let backend = BlockDeviceDisk::open(
            &device.path,
            &BlockDeviceOptions {
                completion_spin,
                completions,
                ..Default::default()
            },
        )
        .map_err(|e| format!("open {}: {e}", device.path.display()))?;
        if fixed {
            backend
                .register_fixed_buffers(&memory)
                .map_err(|e| format!("register_fixed_buffers: {e}"))?;
        }
        Ok(backend)
    };
    let open = |completion_spin, completions, fixed| -> Result<Disk, String> {
        Disk::new(open_backend(completion_spin, completions, fixed)?).map_err(|e| e.to_string())
    };
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let thread_disk = open(Duration::ZERO, Completions::Thread, false)?;
    let thread_fixed = open(Duration::ZERO, Completions::Thread, true)?;
    let spinning = open(SPIN, Completions::Thread, false)?;
    let tokio_disk = {
        let _context = tokio.enter();
        open(Duration::ZERO, Completions::Tokio, false)?
    };
    // `Completions::Owner`: this thread owns the rings and drives their futures.
    let open_owner = |completion_spin, fixed| -> Result<(Disk, OwnerDriver), String> {
        let backend = open_backend(completion_spin, Completions::Owner, fixed)?;
        let driver = backend.driver().map_err(|e| e.to_string())?;
        Ok((Disk::new(backend).map_err(|e| e.to_string())?, driver))
    };
    let (owner_disk, owner_driver) = open_owner(Duration::ZERO, false)?;
    let (owner_fixed, owner_fixed_driver) = open_owner(Duration::ZERO, true)?;
    let (owner_spinning, owner_spinning_driver) = open_owner(SPIN, false)?;
    let (owner_spinning_fixed, owner_spinning_fixed_driver) = open_owner(SPIN, true)?;
    let all: Vec<(&str, Ours<'_>)> = vec![
        (
            "ours (default), block_on",
            Ours {
                disk: thread_disk,
                executor: Executor::BlockOn,
            },
        ),
        (
            "ours, tokio mode, current-thread runtime",
            Ours {
                disk: tokio_disk,
                executor: Executor::Tokio(&tokio),
            },
        ),
        (
            "ours (default), fixed buffers, block_on",
            Ours {
                disk: thread_fixed,
                executor: Executor::BlockOn,
            },
        ),
        (
            "ours, owner mode, driver block_on",
            Ours {
                disk: owner_disk,
                executor: Executor::Owner(&owner_driver),
            },
        ),
        (
            "ours, owner mode, fixed buffers, driver block_on",
            Ours {
                disk: owner_fixed,
                executor: Executor::Owner(&owner_fixed_driver),
            },
        ),
        (
            "ours (default), block_on, spin 50 µs",
            Ours {
                disk: spinning,
                executor: Executor::BlockOn,
            },
        ),
        (
            "ours, owner mode, driver block_on, adaptive poll ≤ 50 µs",
            Ours {
                disk: owner_spinning,
                executor: Executor::Owner(&owner_spinning_driver),
            },
        ),
        (
            "ours, owner mode, fixed buffers, driver block_on, adaptive poll ≤ 50 µs",
            Ours {
                disk: owner_spinning_fixed,
                executor: Executor::Owner(&owner_spinning_fixed_driver),
            },
        ),
    ];
    println!(
        "\n### {label}: {} over {} ({} MiB, --direct-io=on)\n",
        device.path.display(),
        device.backing.display(),
        options.size_mib
    );
    println!(
        "| workload | engine | IOPS (runs) | median IOPS | median MiB/s | median mean lat (µs) | median p99 lat (µs) | median CPU µs/request (user + sys) | median KiB per device request | ours/fio IOPS per pair | median IOPS ratio | median mean-latency ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    // `a|b` keeps names that match either part; `text$` one that ends with `text`.
    let matches = |filter: &Option<String>, name: &str| {
        filter.as_ref().is_none_or(|f| {
            f.split('|').any(|part| match part.strip_suffix('$') {
                Some(end) => name.ends_with(end),
                None => name.contains(part),
            })
        })
    };
    let wanted = |name: &str| matches(&options.engine, name);
    // Huge pages for fio's buffers (`--mem=mmaphuge --hugepage-size=2m`), if a workload that
    // needs them runs: fio maps its buffers plus a page for alignment, rounded up to 2 MiB;
    // one more page for slack.
    let huge_bytes = WORKLOADS
        .iter()
        .filter(|w| w.block_size > guestmem::PAGE_SIZE && matches(&options.workload, w.name))
        .map(|w| w.queue_depth * w.block_size)
        .max();
    let huge_pages = match huge_bytes {
        Some(bytes) if wanted("fio --mem=mmaphuge") => {
            HugePages::reserve((bytes as u64 + 4096).div_ceil(2 << 20) + 1)
        }
        _ => None,
    };
    for workload in &WORKLOADS {
        if !matches(&options.workload, workload.name) {
            continue;
        }
        // The ratios are to plain fio (the first engine): the reference.
        let mut engines: Vec<(&str, Engine<'_, '_>)> = vec![
            (
                "fio",
                Engine::Fio {
                    fixed: false,
                    huge: false,
                },
            ),
            (
                "fio --fixedbufs --registerfiles",
                Engine::Fio {
                    fixed: true,
                    huge: false,
                },
            ),
        ];
        // Where a request spans pages, fio with its buffers in huge pages too: how contiguous
        // the pages of its default buffers are decides how the loop device splits them.
        if workload.block_size > guestmem::PAGE_SIZE && huge_pages.is_some() {
            engines.push((
                "fio --mem=mmaphuge",
                Engine::Fio {
                    fixed: false,
                    huge: true,
                },
            ));
        }
        for (name, ours) in &all {
            if name.contains("spin") && workload.queue_depth != 1 {
                continue;
            }
            engines.push((name, Engine::Ours(ours)));
        }
        engines.retain(|(name, _)| wanted(name));
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); engines.len()];
        let mut warned_stat = false;
        for rep in 0..options.reps {
            // Alternate the order, so drift over time does not favour one engine.
            let mut order: Vec<usize> = (0..engines.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let before = device.served();
                let mut figures = match engines[i].1 {
                    Engine::Fio { fixed, huge } => {
                        run_fio(&device.path, workload, options.runtime, fixed, huge)?
                    }
                    Engine::Ours(ours) => run_ours(
                        &ours.disk,
                        ours.executor,
                        &memory,
                        workload,
                        options.runtime,
                        options.pin,
                    ),
                };
                figures.device_kib = match (before, device.served()) {
                    (Ok((requests_before, sectors_before)), Ok((requests, sectors))) => {
                        match (
                            requests.checked_sub(requests_before),
                            sectors.checked_sub(sectors_before),
                        ) {
                            (Some(requests), Some(sectors)) if requests > 0 => {
                                sectors as f64 / 2.0 / requests as f64
                            }
                            _ => f64::NAN,
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        if !warned_stat {
                            eprintln!("fio_compare: no request sizes: {e}");
                            warned_stat = true;
                        }
                        f64::NAN
                    }
                };
                runs[i].push(figures);
            }
        }
        for (i, (engine, _)) in engines.iter().enumerate() {
            let med =
                |f: fn(&Figures) -> f64| median(&mut runs[i].iter().map(f).collect::<Vec<_>>());
            let (pairs, iops_ratio, latency_ratio) = if i == 0 {
                (String::new(), String::new(), String::new())
            } else {
                let mut iops: Vec<f64> = runs[i]
                    .iter()
                    .zip(&runs[0])
                    .map(|(o, f)| o.iops / f.iops)
                    .collect();
                let mut latency: Vec<f64> = runs[i]
                    .iter()
                    .zip(&runs[0])
                    .map(|(o, f)| o.mean_latency_us / f.mean_latency_us)
                    .collect();
                let pairs = iops
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let iops_ratio = format!("{:.2}", median(&mut iops));
                let latency_ratio = format!("{:.2}", median(&mut latency));
                eprintln!(
                    "{label}: {} ({engine}): ours/fio IOPS {iops_ratio}, mean latency {latency_ratio}",
                    workload.name
                );
                (pairs, iops_ratio, latency_ratio)
            };
            println!(
                "| {} | {engine} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} + {:.1} | {:.0} | {pairs} | {iops_ratio} | {latency_ratio} |",
                workload.name,
                format_runs(&runs[i], |f| f.iops, 1.0),
                med(|f| f.iops),
                med(|f| f.bytes_per_second) / (1 << 20) as f64,
                med(|f| f.mean_latency_us),
                med(|f| f.p99_latency_us),
                med(|f| f.user_us),
                med(|f| f.system_us),
                med(|f| f.device_kib),
            );
        }
    }
    Ok(())
}

fn main() {
    let result = parse_options().and_then(|options| {
        ensure_fio()?;
        let targets: [(&str, &str); 2] =
            [("memory-backed", "/dev/shm"), ("disk-backed", "/var/tmp")];
        for (label, dir) in targets {
            let key = if dir == "/dev/shm" { "shm" } else { "disk" };
            if options.only.as_deref().is_some_and(|only| only != key) {
                continue;
            }
            compare(label, Path::new(dir), &options)?;
        }
        Ok(())
    });
    if let Err(message) = result {
        eprintln!("fio_compare: {message}");
        std::process::exit(1);
    }
}
