//! Workloads through a `Disk`: random or sequential, reads, writes or a mix, with optional
//! end-to-end verification.
//!
//! With verification every written block starts with a header: a magic number, the block's
//! own number, a generation and a CRC-32 of the rest of the block. A read checks the header
//! of any block that has one (so corruption written by an earlier run is caught too), and,
//! for a block this run wrote, that it holds the last acknowledged generation. A block is
//! never in two requests at once, so the expected contents are always known.

use disk_backend::{Disk, DiskError};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{GuestMemory, MemoryRead, MemoryWrite, PagedRange, RequestBuffers};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The access pattern, named as fio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes (`--read-pct` reads).
    Randrw,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Sequential reads and writes (`--read-pct` reads).
    Rw,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

impl Pattern {
    fn is_random(self) -> bool {
        matches!(self, Self::Randread | Self::Randwrite | Self::Randrw)
    }

    /// The share of reads, in percent.
    fn read_percent(self, mixed: u8) -> u8 {
        match self {
            Self::Randread | Self::Read => 100,
            Self::Randwrite | Self::Write => 0,
            Self::Randrw | Self::Rw => mixed,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The access pattern.
    pub rw: Pattern,
    /// Bytes per request.
    pub block_size: u64,
    /// Requests in flight.
    pub queue_depth: usize,
    /// Share of reads for mixed patterns, in percent.
    pub read_percent: u8,
    /// Stop after this long (if set).
    pub runtime_seconds: Option<f64>,
    /// Stop after this many bytes (if set).
    pub size_bytes: Option<u64>,
    /// Check every read.
    pub verify: bool,
    /// Seed of the random block choice.
    pub seed: u64,
}

/// The workload could not run, or the disk returned wrong data.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// The block size is zero, not a multiple of the sector size, or too large.
    #[error(
        "block size {block_size} must be a non-zero multiple of the {sector_size}-byte sector size, at most 64 MiB"
    )]
    BlockSize {
        /// Requested block size.
        block_size: u64,
        /// The disk's sector size.
        sector_size: u32,
    },
    /// The disk has too few blocks to keep every request on a block of its own.
    #[error("the disk has {blocks} blocks of this size, too few for queue depth {queue_depth}")]
    TooSmall {
        /// Blocks on the disk.
        blocks: u64,
        /// Requested queue depth.
        queue_depth: usize,
    },
    /// The queue depth is zero or absurd.
    #[error("queue depth must be between 1 and 4096")]
    QueueDepth,
    /// Neither a positive runtime nor a positive size.
    #[error("the runtime must be positive and finite and the size at least one block")]
    StopCondition,
    /// Writes were asked of a read-only disk.
    #[error("the disk is read-only; use a read pattern")]
    ReadOnly,
    /// A request failed.
    #[error("{op} of block {block} failed")]
    Disk {
        /// "read" or "write".
        op: &'static str,
        /// The block.
        block: u64,
        /// The error.
        #[source]
        source: DiskError,
    },
    /// A read returned data that is not what was written.
    #[error("data mismatch: block {block} (byte offset {byte_offset}): {reason}")]
    Mismatch {
        /// The block.
        block: u64,
        /// Byte offset of the block on the disk.
        byte_offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Wall time of the run.
    pub elapsed_seconds: f64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second, reads and writes.
    pub bandwidth_bytes_per_second: f64,
    /// Request latency.
    pub latency_us: Latency,
    /// Reads whose contents were checked.
    pub verified_reads: u64,
    /// Reads of blocks never written with verification (nothing to check).
    pub unverified_reads: u64,
    /// Why the disk refused the run's buffer memory (`DiskIo::register_memory`, which a
    /// stack with fixed buffers uses), if it did; the run went on without.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_refused: Option<String>,
}

/// Latency statistics in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let at = |p: f64| {
            samples
                .get(((samples.len().saturating_sub(1)) as f64 * p).round() as usize)
                .map_or(0.0, |d| us(*d))
        };
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64
        };
        Self {
            mean,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.elapsed_seconds.max(f64::MIN_POSITIVE);
        let mib = |bytes: u64| bytes as f64 / seconds / (1 << 20) as f64;
        writeln!(f, "          {:>12} {:>12} {:>12}", "ops", "IOPS", "MiB/s")?;
        writeln!(
            f,
            "read      {:>12} {:>12.0} {:>12.1}",
            self.reads,
            self.reads as f64 / seconds,
            mib(self.read_bytes)
        )?;
        writeln!(
            f,
            "write     {:>12} {:>12.0} {:>12.1}",
            self.writes,
            self.writes as f64 / seconds,
            mib(self.write_bytes)
        )?;
        writeln!(
            f,
            "total     {:>12} {:>12.0} {:>12.1}",
            self.reads + self.writes,
            self.iops,
            mib(self.read_bytes + self.write_bytes)
        )?;
        writeln!(
            f,
            "latency   mean {:.1} us, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            self.latency_us.mean, self.latency_us.p50, self.latency_us.p99, self.latency_us.p999
        )?;
        write!(
            f,
            "verified  {} reads checked, {} of never-written blocks",
            self.verified_reads, self.unverified_reads
        )?;
        if let Some(reason) = &self.memory_refused {
            write!(
                f,
                "\nnote      the disk refused the buffer memory: {reason}"
            )?;
        }
        Ok(())
    }
}

const MAGIC: u64 = u64::from_le_bytes(*b"DISKCTL1");
const HEADER: usize = 32;

/// Fills `buf` with generation `generation` of `block`, headed by magic, block, generation
/// and a CRC-32 of everything after the CRC.
fn stamp(buf: &mut [u8], block: u64, generation: u64) {
    let seed = block.rotate_left(32) ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, word) in buf[HEADER..].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(
            &(seed ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)).to_le_bytes(),
        );
    }
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[28..32].fill(0);
    let crc = crc32fast::hash(&buf[28..]);
    buf[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a block read back. `expected` is the generation this run last wrote (0 if none).
/// Returns whether the block carried a header.
fn check(buf: &[u8], block: u64, expected: u64) -> Result<bool, String> {
    let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return if expected != 0 {
            Err(format!(
                "generation {expected} was written but the block has no header"
            ))
        } else {
            Ok(false)
        };
    }
    if word(8) != block {
        return Err(format!("holds block {} (a misdirected write)", word(8)));
    }
    let crc = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[28..]) != crc {
        return Err("checksum mismatch: the block is corrupt".into());
    }
    if expected != 0 && word(16) != expected {
        return Err(format!(
            "holds generation {} instead of {expected}",
            word(16)
        ));
    }
    Ok(true)
}

/// Counters a progress display can read while the workload runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests completed.
    pub ops: AtomicU64,
    /// Bytes transferred.
    pub bytes: AtomicU64,
}

struct Shared<'a> {
    disk: &'a Disk,
    config: &'a Config,
    blocks: u64,
    start: Instant,
    deadline: Option<Instant>,
    /// Bytes left to issue when the run is bounded by size.
    budget: Option<AtomicU64>,
    next_sequential: AtomicU64,
    generations: Vec<AtomicU64>,
    busy: Vec<AtomicBool>,
    progress: &'a Progress,
    failed: AtomicBool,
    /// Every worker's buffer: worker `w` uses `pages_per_block` pages from page
    /// `w * pages_per_block`. One memory, so that the disk can be told of it once.
    memory: GuestMemory,
    pages_per_block: u64,
}

impl Shared<'_> {
    /// Claims the next block, or `None` when the run is over.
    fn claim(&self, rng: &mut StdRng) -> Option<u64> {
        if self.failed.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
        {
            return None;
        }
        if let Some(budget) = &self.budget {
            let bs = self.config.block_size;
            budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(bs)
                })
                .ok()?;
        }
        loop {
            let block = if self.config.rw.is_random() {
                rng.random_range(0..self.blocks)
            } else {
                self.next_sequential.fetch_add(1, Ordering::Relaxed) % self.blocks
            };
            if !self.busy[block as usize].swap(true, Ordering::Acquire) {
                return Some(block);
            }
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    reads: u64,
    writes: u64,
    verified: u64,
    unverified: u64,
    latencies: Vec<Duration>,
}

/// Runs the workload, updating `progress` as requests complete.
pub fn run(disk: &Disk, config: &Config, progress: &Progress) -> Result<Report, WorkloadError> {
    let sector_size = disk.sector_size();
    let block_size = config.block_size;
    if block_size == 0 || !block_size.is_multiple_of(sector_size as u64) || block_size > 64 << 20 {
        return Err(WorkloadError::BlockSize {
            block_size,
            sector_size,
        });
    }
    if config.queue_depth == 0 || config.queue_depth > 4096 {
        return Err(WorkloadError::QueueDepth);
    }
    let read_percent = config.rw.read_percent(config.read_percent);
    if disk.is_read_only() && read_percent < 100 {
        return Err(WorkloadError::ReadOnly);
    }
    let blocks = disk.sector_count().saturating_mul(sector_size as u64) / block_size;
    if blocks < 2 * config.queue_depth as u64 {
        return Err(WorkloadError::TooSmall {
            blocks,
            queue_depth: config.queue_depth,
        });
    }
    let runtime = match (config.runtime_seconds, config.size_bytes) {
        (None, None) => Some(Duration::from_secs(3)),
        (Some(seconds), _) => Some(
            Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or(WorkloadError::StopCondition)?,
        ),
        (None, Some(_)) => None,
    };
    if config.size_bytes.is_some_and(|size| size < block_size) {
        return Err(WorkloadError::StopCondition);
    }
    let pages_per_block = block_size.div_ceil(guestmem::PAGE_SIZE64);
    // At most 4096 workers of 64 MiB (checked above): 2^38 bytes, as much as the workers'
    // own buffers would take.
    let memory = GuestMemory::allocate(
        (pages_per_block * config.queue_depth as u64 * guestmem::PAGE_SIZE64) as usize,
    );
    let memory_refused = disk
        .register_memory(&memory)
        .err()
        .map(|e| crate::stack::error_chain(&e));
    let start = Instant::now();
    let shared = Shared {
        disk,
        config,
        blocks,
        start,
        deadline: runtime.map(|r| start + r),
        budget: config.size_bytes.map(AtomicU64::new),
        next_sequential: AtomicU64::new(0),
        generations: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
        busy: (0..blocks).map(|_| AtomicBool::new(false)).collect(),
        progress,
        failed: AtomicBool::new(false),
        memory,
        pages_per_block,
    };
    let results =
        drive(join_all((0..config.queue_depth).map(|worker| {
            run_worker(&shared, worker as u64, read_percent)
        })));
    let elapsed = shared.start.elapsed();
    let mut stats = WorkerStats::default();
    for result in results {
        let worker = result?;
        stats.reads += worker.reads;
        stats.writes += worker.writes;
        stats.verified += worker.verified;
        stats.unverified += worker.unverified;
        stats.latencies.extend(worker.latencies);
    }
    let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let ops = stats.reads + stats.writes;
    Ok(Report {
        elapsed_seconds: elapsed.as_secs_f64(),
        reads: stats.reads,
        writes: stats.writes,
        read_bytes: stats.reads * block_size,
        write_bytes: stats.writes * block_size,
        iops: ops as f64 / seconds,
        bandwidth_bytes_per_second: (ops * block_size) as f64 / seconds,
        latency_us: Latency::of(stats.latencies),
        verified_reads: stats.verified,
        unverified_reads: stats.unverified,
        memory_refused,
    })
}

async fn run_worker(
    shared: &Shared<'_>,
    worker: u64,
    read_percent: u8,
) -> Result<WorkerStats, WorkloadError> {
    let result = worker_loop(shared, worker, read_percent).await;
    if result.is_err() {
        // Stop the other workers: the first failure is the answer.
        shared.failed.store(true, Ordering::Relaxed);
    }
    result
}

async fn worker_loop(
    shared: &Shared<'_>,
    worker: u64,
    read_percent: u8,
) -> Result<WorkerStats, WorkloadError> {
    let config = shared.config;
    let block_bytes = config.block_size as usize;
    let sectors_per_block = config.block_size / shared.disk.sector_size() as u64;
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(worker));
    let first = worker * shared.pages_per_block;
    let gpns: Vec<u64> = (first..first + shared.pages_per_block).collect();
    let range = PagedRange::new(0, block_bytes, &gpns).expect("the worker's pages hold a block");
    let buffers = |is_write| RequestBuffers::new(&shared.memory, range, is_write);
    let mut host = vec![0u8; block_bytes];
    let mut stats = WorkerStats::default();
    while let Some(block) = shared.claim(&mut rng) {
        let sector = block * sectors_per_block;
        let generation = shared.generations[block as usize].load(Ordering::Relaxed);
        let started = Instant::now();
        if rng.random_range(0..100u8) < read_percent {
            shared
                .disk
                .read_vectored(&buffers(true), sector)
                .await
                .map_err(|source| WorkloadError::Disk {
                    op: "read",
                    block,
                    source,
                })?;
            stats.latencies.push(started.elapsed());
            stats.reads += 1;
            if config.verify {
                buffers(false)
                    .reader()
                    .read(&mut host)
                    .expect("the workload's own memory is accessible");
                match check(&host, block, generation) {
                    Ok(true) => stats.verified += 1,
                    Ok(false) => stats.unverified += 1,
                    Err(reason) => {
                        return Err(WorkloadError::Mismatch {
                            block,
                            byte_offset: block * config.block_size,
                            reason,
                        });
                    }
                }
            }
        } else {
            let generation = generation + 1;
            if config.verify {
                stamp(&mut host, block, generation);
                buffers(true)
                    .writer()
                    .write(&host)
                    .expect("the workload's own memory is accessible");
            }
            shared
                .disk
                .write_vectored(&buffers(false), sector, false)
                .await
                .map_err(|source| WorkloadError::Disk {
                    op: "write",
                    block,
                    source,
                })?;
            stats.latencies.push(started.elapsed());
            stats.writes += 1;
            shared.generations[block as usize].store(generation, Ordering::Relaxed);
        }
        shared.busy[block as usize].store(false, Ordering::Release);
        shared.progress.ops.fetch_add(1, Ordering::Relaxed);
        shared
            .progress
            .bytes
            .fetch_add(config.block_size, Ordering::Relaxed);
    }
    Ok(stats)
}

/// Runs `future` on this thread, which drives the I/O of the disks it polls
/// ([`disk_backend::io_thread`]: an io_uring disk submits to this thread's ring and this
/// thread reaps it, as a vhost-user queue thread does); on a thread that already does, or
/// where that cannot be set up, with a plain executor.
pub(crate) fn drive<F: Future>(future: F) -> F::Output {
    match disk_backend::io_thread::IoThread::enter() {
        Ok(io) => io.block_on(future),
        Err(_) => futures::executor::block_on(future),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_ram::RamDisk;

    fn config(rw: Pattern) -> Config {
        Config {
            rw,
            block_size: 4096,
            queue_depth: 8,
            read_percent: 50,
            runtime_seconds: Some(0.2),
            size_bytes: None,
            verify: true,
            seed: 7,
        }
    }

    fn ram(sectors: u64) -> Disk {
        Disk::new(RamDisk::new(sectors, 512).unwrap()).unwrap()
    }

    #[test]
    fn mixed_random_verifies() {
        let report = run(&ram(1024), &config(Pattern::Randrw), &Progress::default()).unwrap();
        assert!(report.reads > 0 && report.writes > 0);
        assert!(report.verified_reads > 0, "some reads hit written blocks");
    }

    #[test]
    fn sequential_fill_then_read_checks_every_block() {
        let disk = ram(1024);
        let whole = 1024 * 512;
        let fill = Config {
            runtime_seconds: None,
            size_bytes: Some(whole),
            ..config(Pattern::Write)
        };
        let report = run(&disk, &fill, &Progress::default()).unwrap();
        assert_eq!(report.writes, 128);
        let read = Config {
            runtime_seconds: None,
            size_bytes: Some(whole),
            ..config(Pattern::Read)
        };
        let report = run(&disk, &read, &Progress::default()).unwrap();
        assert_eq!((report.reads, report.verified_reads), (128, 128));
    }

    /// The run announces its buffer memory to the disk once, with every worker's block in
    /// it, and a refusal is reported, not fatal.
    #[test]
    fn buffer_memory_is_announced_and_a_refusal_reported() {
        for failing in [false, true] {
            let probe = std::sync::Arc::new(disk_conformance::MemoryProbe::new(1024));
            probe.set_failing(failing);
            let disk = Disk::new(probe.clone()).unwrap();
            let quiet = Config {
                verify: false,
                ..config(Pattern::Randrw)
            };
            let report = run(&disk, &quiet, &Progress::default()).unwrap();
            assert!(report.reads > 0 && report.writes > 0);
            assert_eq!(probe.calls(), 1);
            assert_eq!(report.memory_refused.is_some(), failing);
            assert_eq!(
                report.to_string().contains("refused the buffer memory"),
                failing
            );
        }
    }

    #[test]
    fn corruption_is_caught() {
        let mut block = vec![0u8; 4096];
        stamp(&mut block, 9, 3);
        assert_eq!(check(&block, 9, 3), Ok(true));
        assert_eq!(check(&block, 9, 0), Ok(true));
        assert!(check(&block, 9, 4).unwrap_err().contains("generation"));
        assert!(check(&block, 8, 0).unwrap_err().contains("misdirected"));
        block[1000] ^= 1;
        assert!(check(&block, 9, 0).unwrap_err().contains("checksum"));
        assert_eq!(check(&[0u8; 4096], 9, 0), Ok(false));
        assert!(check(&[0u8; 4096], 9, 1).unwrap_err().contains("no header"));
    }

    #[test]
    fn rejects_bad_configurations() {
        let disk = ram(64);
        let mut bad = config(Pattern::Randrw);
        bad.block_size = 1000;
        assert!(matches!(
            run(&disk, &bad, &Progress::default()),
            Err(WorkloadError::BlockSize { .. })
        ));
        bad.block_size = 0;
        assert!(matches!(
            run(&disk, &bad, &Progress::default()),
            Err(WorkloadError::BlockSize { .. })
        ));
        let mut deep = config(Pattern::Randrw);
        deep.queue_depth = 64;
        assert!(matches!(
            run(&disk, &deep, &Progress::default()),
            Err(WorkloadError::TooSmall { .. })
        ));
        deep.queue_depth = 0;
        assert!(matches!(
            run(&disk, &deep, &Progress::default()),
            Err(WorkloadError::QueueDepth)
        ));
        let mut stop = config(Pattern::Randrw);
        stop.runtime_seconds = Some(-1.0);
        assert!(matches!(
            run(&ram(1024), &stop, &Progress::default()),
            Err(WorkloadError::StopCondition)
        ));
        stop.runtime_seconds = Some(f64::NAN);
        assert!(matches!(
            run(&ram(1024), &stop, &Progress::default()),
            Err(WorkloadError::StopCondition)
        ));
        let ro = Disk::new(RamDisk::new(1024, 512).unwrap().with_read_only(true)).unwrap();
        assert!(matches!(
            run(&ro, &config(Pattern::Randrw), &Progress::default()),
            Err(WorkloadError::ReadOnly)
        ));
        assert!(run(&ro, &config(Pattern::Randread), &Progress::default()).is_ok());
    }
}
