//! `diskctl`: build a disk stack from a spec and inspect it or run workloads through it.
//!
//! A spec describes the stack (`layered(ram, file:base.img:ro)`); see `diskctl kinds` and
//! `docs/diskctl.md`. Without a spec, `diskctl` works on a built-in default: a temporary
//! 256 MiB file.

#![forbid(unsafe_code)]

mod crash;
mod info;
mod serve;
mod stack;
mod workload;

use clap::{Parser, Subcommand};
use disk_backend::resolve::parse_size;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;
use virtio_block::BlockConfig;
use workload::{Config, Pattern, Progress};

#[derive(Parser)]
#[command(
    version,
    about = "Build a disk stack from a spec and inspect it or run workloads through it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the geometry, features and tree of a stack.
    Info {
        /// The stack (default: a temporary 256 MiB file).
        spec: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a workload and report IOPS, bandwidth and latency.
    Bench(Box<BenchArgs>),
    /// List the kinds of disk a spec can use.
    Kinds,
    /// Serve the stack to a VMM over vhost-user-blk until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Crash-consistency test: kill a writer with SIGKILL, check what survived (`cargo
    /// xtask crash`; docs/testing.md).
    #[command(subcommand, hide = true)]
    Crash(crash::CrashCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Listen on this Unix socket for a vhost-user frontend (QEMU, User-Mode Linux, ...).
    #[arg(long = "vhost-user", value_name = "SOCKET")]
    vhost_user: PathBuf,
    /// The stack (default: a temporary 256 MiB file).
    spec: Option<String>,
    /// Request queues offered to the guest.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Most entries per queue, a power of two from 4 to 32768 (the frontend picks the size;
    /// QEMU's virtio-mmio rings have 1024).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Present the disk read-only, whatever the stack allows.
    #[arg(long)]
    read_only: bool,
    /// Longest time, in microseconds, a queue's thread keeps checking for the guest's next
    /// request before it sleeps; the window adapts to the guest, and 0 turns polling off.
    #[arg(long, default_value_t = vhost_user_blk::DEFAULT_POLL_MAX.as_micros() as u64)]
    poll_us: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The stack (default: a temporary 256 MiB file).
    spec: Option<String>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randrw")]
    rw: Pattern,
    /// Bytes per request (suffixes k, M).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// Percentage of reads for randrw and rw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// Stop after this many seconds (default 3 unless --size is given).
    #[arg(long)]
    runtime: Option<f64>,
    /// Stop after this many bytes (suffixes k, M, G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Stamp every written block with a checksummed header and check every read: on by
    /// default; kept for explicitness.
    #[arg(long, overrides_with = "no_verify")]
    verify: bool,
    /// Do not stamp or check data.
    #[arg(long)]
    no_verify: bool,
    /// Seed of the random block choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { spec, json } => info(spec.as_deref(), json),
        Command::Bench(args) => bench(&args),
        Command::Kinds => stack::resolver()
            .kinds()
            .try_for_each(|(kind, usage)| emit(format!("{kind:<10} {usage}"))),
        Command::Crash(command) => crash::main(&command),
        Command::Serve(args) => serve::serve(
            &args.vhost_user,
            args.spec.as_deref(),
            BlockConfig {
                num_queues: args.queues,
                queue_size: args.queue_size,
                read_only: args.read_only,
                ..BlockConfig::default()
            },
            Duration::from_micros(args.poll_us),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("diskctl: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a line to standard output. A reader that went away (`diskctl ... | head`) ends the
/// output quietly instead of panicking as `println!` would.
fn emit(text: impl std::fmt::Display) -> Result<(), String> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write the output: {e}"))
        }
        _ => Ok(()),
    }
}

fn to_json(value: &impl Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| format!("cannot encode JSON: {e}"))
}

fn info(spec: Option<&str>, json: bool) -> Result<(), String> {
    let stack = stack::open(spec)?;
    let info = info::Info::new(&stack.disk, &stack.spec);
    if json {
        emit(to_json(&info)?)
    } else {
        emit(&info)
    }
}

/// What `diskctl bench --json` prints.
#[derive(Serialize)]
struct BenchOutput<'a> {
    disk: &'a info::Info,
    workload: &'a Config,
    result: &'a workload::Report,
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    let stack = stack::open(args.spec.as_deref())?;
    let config = Config {
        rw: args.rw,
        block_size: args.bs,
        queue_depth: args.qd,
        read_percent: args.read_pct,
        runtime_seconds: args.runtime,
        size_bytes: args.size,
        verify: !args.no_verify,
        seed: args.seed,
    };
    let info = info::Info::new(&stack.disk, &stack.spec);
    if !args.json {
        emit(format_args!(
            "disk: {} ({} sectors of {} bytes)\nworkload: {}, {} B blocks, qd {}, {}",
            info.spec,
            info.sector_count,
            info.sector_size,
            config.rw,
            config.block_size,
            config.queue_depth,
            if config.verify {
                "verified"
            } else {
                "not verified"
            }
        ))?;
    }
    let progress = Progress::default();
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let done = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        if show_progress {
            let (progress, done) = (&progress, &done);
            let length = match (config.runtime_seconds, config.size_bytes) {
                (None, Some(size)) => size,
                (runtime, _) => (runtime.unwrap_or(3.0) * 1000.0) as u64,
            };
            let by_bytes = config.runtime_seconds.is_none() && config.size_bytes.is_some();
            scope.spawn(move || {
                let bar = ProgressBar::new(length.max(1));
                let template = if by_bytes {
                    "{bar:40} {bytes}/{total_bytes} {msg}"
                } else {
                    "{bar:40} {elapsed} {msg}"
                };
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style);
                }
                let start = std::time::Instant::now();
                while !done.load(Ordering::Relaxed) {
                    let ops = progress.ops.load(Ordering::Relaxed);
                    bar.set_position(if by_bytes {
                        progress.bytes.load(Ordering::Relaxed)
                    } else {
                        start.elapsed().as_millis() as u64
                    });
                    bar.set_message(format!("{ops} requests"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            });
        }
        let report = workload::run(&stack.disk, &config, &progress);
        done.store(true, Ordering::Relaxed);
        report
    })
    .map_err(|e| stack::error_chain(&e))?;
    if args.json {
        emit(to_json(&BenchOutput {
            disk: &info,
            workload: &config,
            result: &report,
        })?)
    } else {
        emit(&report)
    }
}
