//! A verified random workload through a `Disk`.
//!
//! Every write stamps its block with a pattern derived from the block number and a per-block
//! generation; every read of a block written during the run is compared with the pattern of
//! the last acknowledged write. A block is never in two requests at once, so the expected
//! contents are always known.

use disk_backend::{Disk, DiskError};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{MemoryRead, OwnedRequestBuffers};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// What to run.
pub struct Config {
    /// Bytes per request.
    pub block_bytes: u64,
    /// Requests in flight.
    pub queue_depth: usize,
    /// How long to run.
    pub duration: Duration,
    /// Share of reads, in percent.
    pub read_percent: u8,
    /// Seed of the random block choice.
    pub seed: u64,
}

/// The workload could not run, or the disk returned wrong data.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// The block size is zero, not a multiple of the sector size, or larger than the disk.
    #[error(
        "block size {block_bytes} must be a non-zero multiple of the {sector_size}-byte sector size"
    )]
    BlockSize {
        /// Requested block size.
        block_bytes: u64,
        /// The disk's sector size.
        sector_size: u32,
    },
    /// The disk has too few blocks to keep every request on a block of its own.
    #[error("the disk has {blocks} blocks, too few for queue depth {queue_depth}")]
    TooSmall {
        /// Blocks on the disk.
        blocks: u64,
        /// Requested queue depth.
        queue_depth: usize,
    },
    /// The queue depth is zero.
    #[error("queue depth must be at least 1")]
    QueueDepth,
    /// Writes were asked of a read-only disk.
    #[error("the disk is read-only; use --read-pct 100")]
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
    /// A read returned data other than the last acknowledged write.
    #[error(
        "data mismatch: block {block} (byte offset {byte_offset}) does not hold write generation {generation}"
    )]
    Mismatch {
        /// The block.
        block: u64,
        /// Byte offset of the block on the disk.
        byte_offset: u64,
        /// The generation of the last acknowledged write.
        generation: u64,
    },
}

/// What a run measured.
pub struct Report {
    reads: u64,
    writes: u64,
    verified: u64,
    block_bytes: u64,
    elapsed: Duration,
    /// Sorted request latencies.
    latencies: Vec<Duration>,
}

impl Report {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        let ops = self.reads + self.writes;
        let mib = |n: u64| (n * self.block_bytes) as f64 / seconds / (1 << 20) as f64;
        let mean = self
            .latencies
            .iter()
            .sum::<Duration>()
            .checked_div(self.latencies.len().max(1) as u32)
            .unwrap_or_default();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "reads:   {:>10} ops {:>12.0} IOPS {:>10.1} MiB/s",
            self.reads,
            self.reads as f64 / seconds,
            mib(self.reads)
        )?;
        writeln!(
            f,
            "writes:  {:>10} ops {:>12.0} IOPS {:>10.1} MiB/s",
            self.writes,
            self.writes as f64 / seconds,
            mib(self.writes)
        )?;
        writeln!(
            f,
            "total:   {:>10} ops {:>12.0} IOPS {:>10.1} MiB/s",
            ops,
            ops as f64 / seconds,
            mib(ops)
        )?;
        writeln!(
            f,
            "latency: mean {:.1} us, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            us(mean),
            us(self.percentile(0.50)),
            us(self.percentile(0.99)),
            us(self.percentile(0.999))
        )?;
        write!(
            f,
            "verified {} reads of written blocks: no mismatches",
            self.verified
        )
    }
}

/// Fills `buf` with the pattern of `generation` of `block`.
fn stamp(buf: &mut [u8], block: u64, generation: u64) {
    let seed = (block << 24) ^ generation;
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let value = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        word.copy_from_slice(&value.to_le_bytes());
    }
}

struct Shared<'a> {
    disk: &'a Disk,
    config: &'a Config,
    blocks: u64,
    deadline: Instant,
    /// Generation of the last acknowledged write per block; 0 = not written by this run.
    generations: Vec<AtomicU64>,
    busy: Vec<AtomicBool>,
}

#[derive(Default)]
struct WorkerStats {
    reads: u64,
    writes: u64,
    verified: u64,
    latencies: Vec<Duration>,
}

/// Runs the workload.
pub fn run(disk: &Disk, config: &Config) -> Result<Report, WorkloadError> {
    let sector_size = disk.sector_size();
    if config.block_bytes == 0 || !config.block_bytes.is_multiple_of(sector_size as u64) {
        return Err(WorkloadError::BlockSize {
            block_bytes: config.block_bytes,
            sector_size,
        });
    }
    if config.queue_depth == 0 {
        return Err(WorkloadError::QueueDepth);
    }
    if disk.is_read_only() && config.read_percent < 100 {
        return Err(WorkloadError::ReadOnly);
    }
    let blocks = disk.sector_count() * sector_size as u64 / config.block_bytes;
    if blocks < 2 * config.queue_depth as u64 {
        return Err(WorkloadError::TooSmall {
            blocks,
            queue_depth: config.queue_depth,
        });
    }
    let shared = Shared {
        disk,
        config,
        blocks,
        deadline: Instant::now() + config.duration,
        generations: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
        busy: (0..blocks).map(|_| AtomicBool::new(false)).collect(),
    };
    let start = Instant::now();
    let results = futures::executor::block_on(join_all(
        (0..config.queue_depth).map(|worker| run_worker(&shared, worker as u64)),
    ));
    let elapsed = start.elapsed();
    let mut report = Report {
        reads: 0,
        writes: 0,
        verified: 0,
        block_bytes: config.block_bytes,
        elapsed,
        latencies: Vec::new(),
    };
    for result in results {
        let stats = result?;
        report.reads += stats.reads;
        report.writes += stats.writes;
        report.verified += stats.verified;
        report.latencies.extend(stats.latencies);
    }
    report.latencies.sort_unstable();
    Ok(report)
}

async fn run_worker(shared: &Shared<'_>, worker: u64) -> Result<WorkerStats, WorkloadError> {
    let config = shared.config;
    let block_bytes = config.block_bytes as usize;
    let sectors_per_block = config.block_bytes / shared.disk.sector_size() as u64;
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(worker));
    let buffers = OwnedRequestBuffers::new(block_bytes);
    let mut host = vec![0u8; block_bytes];
    let mut expected = vec![0u8; block_bytes];
    let mut stats = WorkerStats::default();
    while Instant::now() < shared.deadline {
        // Claim a block no other request is using.
        let block = loop {
            let block = rng.random_range(0..shared.blocks);
            if !shared.busy[block as usize].swap(true, Ordering::Acquire) {
                break block;
            }
        };
        let sector = block * sectors_per_block;
        let generation = shared.generations[block as usize].load(Ordering::Relaxed);
        let is_read = rng.random_range(0..100u8) < config.read_percent;
        let started = Instant::now();
        if is_read {
            shared
                .disk
                .read_vectored(&buffers.buffers(true), sector)
                .await
                .map_err(|source| WorkloadError::Disk {
                    op: "read",
                    block,
                    source,
                })?;
            stats.latencies.push(started.elapsed());
            stats.reads += 1;
            if generation != 0 {
                buffers
                    .buffers(false)
                    .reader()
                    .read(&mut host)
                    .expect("owned buffers are accessible");
                stamp(&mut expected, block, generation);
                if host != expected {
                    return Err(WorkloadError::Mismatch {
                        block,
                        byte_offset: block * config.block_bytes,
                        generation,
                    });
                }
                stats.verified += 1;
            }
        } else {
            let generation = generation + 1;
            stamp(&mut host, block, generation);
            buffers.copy_from_slice(&host);
            shared
                .disk
                .write_vectored(&buffers.buffers(false), sector, false)
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
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_ram::RamDisk;

    fn config(read_percent: u8) -> Config {
        Config {
            block_bytes: 4096,
            queue_depth: 8,
            duration: Duration::from_millis(200),
            read_percent,
            seed: 7,
        }
    }

    #[test]
    fn runs_and_verifies_on_ram() {
        let disk = Disk::new(RamDisk::new(1024, 512).unwrap()).unwrap();
        let report = run(&disk, &config(50)).unwrap();
        assert!(report.reads > 0 && report.writes > 0);
        assert!(report.verified > 0, "some reads hit written blocks");
        assert_eq!(report.latencies.len() as u64, report.reads + report.writes);
    }

    #[test]
    fn rejects_bad_configurations() {
        let disk = Disk::new(RamDisk::new(64, 512).unwrap()).unwrap();
        let mut bad = config(50);
        bad.block_bytes = 1000;
        assert!(matches!(
            run(&disk, &bad),
            Err(WorkloadError::BlockSize { .. })
        ));
        bad.block_bytes = 0;
        assert!(matches!(
            run(&disk, &bad),
            Err(WorkloadError::BlockSize { .. })
        ));
        let mut deep = config(50);
        deep.queue_depth = 64;
        assert!(matches!(
            run(&disk, &deep),
            Err(WorkloadError::TooSmall { .. })
        ));
        deep.queue_depth = 0;
        assert!(matches!(run(&disk, &deep), Err(WorkloadError::QueueDepth)));
        let ro = Disk::new(RamDisk::new(1024, 512).unwrap().with_read_only(true)).unwrap();
        assert!(matches!(
            run(&ro, &config(50)),
            Err(WorkloadError::ReadOnly)
        ));
        assert!(run(&ro, &config(100)).is_ok());
    }
}
