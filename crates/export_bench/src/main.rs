//! `cargo xtask bench export`: our vhost-user-blk export (`diskctl serve --vhost-user`)
//! against qemu-storage-daemon's, both serving the same image in `/dev/shm`, measured from
//! libblkio (the userspace virtio-blk driver QEMU's `blkio` block driver uses) with no VM in
//! between: what the export itself costs.
//!
//! For every stack, job and queue count, each round starts each exporter afresh and runs the
//! job through it, alternating the programs; the figures are medians of the rounds. The
//! exporter's CPU time over the measured interval comes from `/proc/PID/stat` (user and
//! system time of all its threads).
//!
//! ```text
//! cargo xtask bench export [--rounds N] [--seconds S] [--stack file|blockdev-buffered|blockdev|ram]... [--job NAME]...
//!     [--queues N]... [--serve-arg ARG]...
//! ```

mod frontend;

use frontend::{Job, Measured};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_BYTES: u64 = 1 << 30;

const JOBS: [Job; 6] = [
    Job {
        name: "4k-randread-qd1",
        write: false,
        random: true,
        block: 4096,
        depth: 1,
    },
    Job {
        name: "4k-randread-qd16",
        write: false,
        random: true,
        block: 4096,
        depth: 16,
    },
    Job {
        name: "4k-randread-qd32",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
    },
    Job {
        name: "4k-randwrite-qd32",
        write: true,
        random: true,
        block: 4096,
        depth: 32,
    },
    Job {
        name: "1m-read-qd4",
        write: false,
        random: false,
        block: 1 << 20,
        depth: 4,
    },
    Job {
        name: "1m-write-qd4",
        write: true,
        random: false,
        block: 1 << 20,
        depth: 4,
    },
];

/// A stack served by both exporters, in the same way.
#[derive(Debug, Clone, Copy)]
struct Stack {
    name: &'static str,
    /// Our spec, with `IMAGE` for the image's path.
    ours: &'static str,
    /// qemu-storage-daemon's `--blockdev` (node name `disk`), with `IMAGE` for the image's
    /// path and `AIO` for the I/O mode.
    qsd: &'static str,
}

const STACKS: [Stack; 4] = [
    Stack {
        name: "file",
        ours: "file:IMAGE",
        qsd: "driver=file,node-name=disk,filename=IMAGE,cache.direct=off,aio=AIO",
    },
    Stack {
        name: "blockdev-buffered",
        ours: "blockdev(IMAGE, buffered)",
        qsd: "driver=file,node-name=disk,filename=IMAGE,cache.direct=off,aio=AIO",
    },
    Stack {
        name: "blockdev",
        ours: "blockdev(IMAGE)",
        qsd: "driver=file,node-name=disk,filename=IMAGE,cache.direct=on,aio=AIO",
    },
    // Memory on both sides (reads of zeros): what the export itself costs, and how it
    // scales with queues. Not in the default set.
    Stack {
        name: "ram",
        ours: "ram(size=1G)",
        qsd: "driver=null-co,node-name=disk,size=1073741824,read-zeroes=on",
    },
];

/// The exporters compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exporter {
    Ours,
    /// qemu-storage-daemon with `aio=io_uring`.
    QsdIoUring,
    /// qemu-storage-daemon with its default `aio=threads`.
    QsdThreads,
}

const EXPORTERS: [Exporter; 3] = [Exporter::Ours, Exporter::QsdIoUring, Exporter::QsdThreads];

struct Options {
    rounds: usize,
    seconds: f64,
    stacks: Vec<String>,
    jobs: Vec<String>,
    queues: Vec<usize>,
    diskctl: PathBuf,
    /// Extra arguments to `diskctl serve` (`--serve-arg=--poll-us=0`).
    serve_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        rounds: 3,
        seconds: 3.0,
        stacks: Vec::new(),
        jobs: Vec::new(),
        queues: Vec::new(),
        diskctl: PathBuf::from("target/release/diskctl"),
        serve_args: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{flag} takes a value"))
        };
        match flag.as_str() {
            "--rounds" => {
                options.rounds = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--rounds takes a positive number")?
            }
            "--seconds" => {
                options.seconds = value()?
                    .parse()
                    .ok()
                    .filter(|&s: &f64| s > 0.0 && s.is_finite())
                    .ok_or("--seconds takes a positive number")?
            }
            "--stack" => options.stacks.push(value()?),
            "--job" => options.jobs.push(value()?),
            "--queues" => options.queues.push(
                value()?
                    .parse()
                    .ok()
                    .filter(|&n| (1..=16).contains(&n))
                    .ok_or("--queues takes 1 to 16")?,
            ),
            "--diskctl" => options.diskctl = PathBuf::from(value()?),
            "--serve-arg" => options.serve_args.push(value()?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    for stack in &options.stacks {
        if !STACKS.iter().any(|s| s.name == stack) {
            return Err(format!("unknown stack `{stack}`"));
        }
    }
    for job in &options.jobs {
        if !JOBS.iter().any(|j| j.name == job) {
            return Err(format!("unknown job `{job}`"));
        }
    }
    if options.queues.is_empty() {
        options.queues = vec![1, 2];
    }
    Ok(options)
}

/// A running exporter, killed when dropped.
struct Running {
    child: Child,
    socket: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM first (both exporters stop cleanly on it), then make sure.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start(
    exporter: Exporter,
    stack: &Stack,
    image: &Path,
    socket: &Path,
    queues: usize,
    options: &Options,
) -> Result<Running, String> {
    let _ = std::fs::remove_file(socket);
    let mut command = match exporter {
        Exporter::Ours => {
            let mut c = Command::new(&options.diskctl);
            c.arg("serve")
                .arg("--vhost-user")
                .arg(socket)
                .args(["--queues", &queues.to_string()])
                .args(&options.serve_args)
                .arg(stack.ours.replace("IMAGE", &image.display().to_string()));
            c
        }
        Exporter::QsdIoUring | Exporter::QsdThreads => {
            let aio = if exporter == Exporter::QsdIoUring {
                "io_uring"
            } else {
                "threads"
            };
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(
                    stack
                        .qsd
                        .replace("IMAGE", &image.display().to_string())
                        .replace("AIO", aio),
                )
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    socket.display()
                ));
            c
        }
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {exporter:?}: {e}"))?;
    let mut running = Running {
        child,
        socket: socket.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = running.child.try_wait() {
            return Err(format!("{exporter:?} exited at start: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{exporter:?} did not create {}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(running)
}

/// User and system time of process `pid` and its threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name in parentheses: field 14 (utime) and 15 (stime) overall.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    ticks / hz
}

/// One run: IOPS, mean latency and the exporter's CPU time per request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    iops: f64,
    latency_us: f64,
    cpu_us_per_request: f64,
}

fn measure(
    exporter: Exporter,
    stack: &Stack,
    job: Job,
    queues: usize,
    dir: &Path,
    image: &Path,
    options: &Options,
) -> Result<Sample, String> {
    let socket = dir.join("export.sock");
    let running = start(exporter, stack, image, &socket, queues, options)?;
    let pid = running.child.id();
    let mut cpu = Vec::new();
    let measured: Measured = frontend::run(
        &socket.display().to_string(),
        queues,
        job,
        Duration::from_millis(500),
        Duration::from_secs_f64(options.seconds),
        || cpu.push(cpu_seconds(pid)),
    )?;
    drop(running);
    let cpu_used = match cpu.as_slice() {
        [before, after] => after - before,
        _ => 0.0,
    };
    Ok(Sample {
        iops: measured.iops(),
        latency_us: measured.mean_latency_us(),
        cpu_us_per_request: cpu_used / measured.requests.max(1) as f64 * 1e6,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn fill_image(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Every byte written (a sparse image would read holes) with data, not zeros.
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 1) as u8).collect();
    for _ in 0..IMAGE_BYTES / chunk.len() as u64 {
        file.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    file.sync_all().map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("export_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let options = parse(args)?;
    if !options.diskctl.exists() {
        return Err(format!(
            "{} is missing: build it with `cargo build --release -p diskctl`",
            options.diskctl.display()
        ));
    }
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .map_err(|e| format!("qemu-storage-daemon is needed (qemu-system-common): {e}"))?;
    let dir = PathBuf::from("/dev/shm").join(format!("export-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = compare(&options, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare(options: &Options, dir: &Path) -> Result<(), String> {
    let image = dir.join("disk.img");
    fill_image(&image)?;
    println!(
        "export: ours (diskctl serve --vhost-user) against qemu-storage-daemon (aio=io_uring / aio=threads), from libblkio; 1 GiB image in /dev/shm; {} s per run, medians of {} alternated rounds",
        options.seconds, options.rounds
    );
    println!(
        "{:<18} {:<18} {:>2} {:>10} {:>10} {:>10} {:>6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}",
        "stack",
        "job",
        "q",
        "ours",
        "qsd-uring",
        "qsd-thr",
        "ratio",
        "cpu-ours",
        "cpu-qsd",
        "cpu-r",
        "lat-ours",
        "lat-qsd",
        "lat-r"
    );
    for stack in STACKS.iter().filter(|s| {
        if options.stacks.is_empty() {
            s.name != "ram"
        } else {
            options.stacks.iter().any(|n| n == s.name)
        }
    }) {
        for job in JOBS
            .iter()
            .filter(|j| options.jobs.is_empty() || options.jobs.iter().any(|n| n == j.name))
        {
            for &queues in &options.queues {
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); EXPORTERS.len()];
                for _ in 0..options.rounds {
                    for (index, &exporter) in EXPORTERS.iter().enumerate() {
                        samples[index].push(measure(
                            exporter, stack, *job, queues, dir, &image, options,
                        )?);
                    }
                }
                let figure = |index: usize, f: fn(&Sample) -> f64| {
                    median(&mut samples[index].iter().map(f).collect::<Vec<_>>())
                };
                let iops: Vec<f64> = (0..EXPORTERS.len())
                    .map(|i| figure(i, |s| s.iops))
                    .collect();
                // The better of qemu-storage-daemon's two modes is the reference.
                let reference = if iops[1] >= iops[2] { 1 } else { 2 };
                let cpu = (
                    figure(0, |s| s.cpu_us_per_request),
                    figure(reference, |s| s.cpu_us_per_request),
                );
                let latency = (
                    figure(0, |s| s.latency_us),
                    figure(reference, |s| s.latency_us),
                );
                println!(
                    "{:<18} {:<18} {:>2} {:>10.0} {:>10.0} {:>10.0} {:>6.2} {:>8.1} {:>8.1} {:>6.2} {:>8.1} {:>8.1} {:>6.2}",
                    stack.name,
                    job.name,
                    queues,
                    iops[0],
                    iops[1],
                    iops[2],
                    iops[0] / iops[reference],
                    cpu.0,
                    cpu.1,
                    cpu.0 / cpu.1.max(f64::MIN_POSITIVE),
                    latency.0,
                    latency.1,
                    latency.0 / latency.1.max(f64::MIN_POSITIVE),
                );
            }
        }
    }
    println!(
        "ratio: ours / the faster qemu-storage-daemon mode (goal >= 1.5 at 4 KiB, >= 1.0 at 1 MiB); cpu: exporter CPU microseconds per request (goal ratio <= 0.8); lat: mean latency in microseconds (goal at QD1 <= 0.7)"
    );
    Ok(())
}
