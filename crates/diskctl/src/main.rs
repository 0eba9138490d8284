//! `diskctl`: build a disk stack and run workloads through it.
//!
//! `diskctl bench` with no arguments creates a temporary 256 MiB file, serves it as a
//! [`disk_file::FileDisk`] through [`disk_backend::Disk`], runs a verified
//! mixed random workload for a few seconds and prints IOPS, bandwidth and latency.

#![forbid(unsafe_code)]

mod size;
mod workload;

use clap::{Parser, Subcommand, ValueEnum};
use disk_backend::Disk;
use disk_file::{FileDisk, FileDiskOptions};
use disk_ram::RamDisk;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Build a disk stack and run verified workloads through it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a verified random workload and report IOPS, bandwidth and latency.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// A host file (a temporary one unless --file is given).
    File,
    /// A sparse in-memory disk.
    Ram,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The backend to build.
    #[arg(long, value_enum, default_value = "file")]
    backend: Backend,
    /// An existing file to use instead of a temporary one. Its contents are overwritten.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Disk size for temporary files and RAM disks (suffixes k, M, G).
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    size: u64,
    /// Logical sector size in bytes.
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
    /// Block size of each request (suffixes k, M); a multiple of the sector size.
    #[arg(long, default_value = "4k", value_parser = size::parse)]
    bs: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Percentage of requests that are reads; the rest are writes.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// Seed of the random block choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("diskctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    // The temporary file lives until the end of the run.
    let mut _temp = None;
    let (disk, description) = match args.backend {
        Backend::Ram => {
            let sector_count = args.size / args.sector_size as u64;
            let ram = RamDisk::new(sector_count, args.sector_size).map_err(|e| e.to_string())?;
            (
                Disk::new(ram).map_err(|e| e.to_string())?,
                "ram".to_string(),
            )
        }
        Backend::File => {
            let path = match &args.file {
                Some(path) => path.clone(),
                None => {
                    let temp = tempfile::NamedTempFile::new()
                        .map_err(|e| format!("cannot create a temporary file: {e}"))?;
                    temp.as_file()
                        .set_len(args.size)
                        .map_err(|e| format!("cannot size the temporary file: {e}"))?;
                    let path = temp.path().to_owned();
                    _temp = Some(temp);
                    path
                }
            };
            let options = FileDiskOptions {
                sector_size: args.sector_size,
                ..Default::default()
            };
            let file = FileDisk::open(&path, &options).map_err(|e| error_chain(&e))?;
            (
                Disk::new(file).map_err(|e| e.to_string())?,
                format!("file {}", path.display()),
            )
        }
    };
    let config = workload::Config {
        block_bytes: args.bs,
        queue_depth: args.qd,
        duration: Duration::try_from_secs_f64(args.seconds)
            .map_err(|_| format!("invalid duration {}", args.seconds))?,
        read_percent: args.read_pct,
        seed: args.seed,
    };
    println!(
        "disk: {description}, {} sectors of {} bytes; {} B blocks, qd {}, {}% reads, {:.1} s",
        disk.sector_count(),
        disk.sector_size(),
        config.block_bytes,
        config.queue_depth,
        config.read_percent,
        config.duration.as_secs_f64()
    );
    let report = workload::run(&disk, &config).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
