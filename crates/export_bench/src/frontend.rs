//! The frontend: libblkio's `virtio-blk-vhost-user` driver, one thread per queue, each
//! keeping its queue depth of requests in flight and sleeping on the queue's completion
//! eventfd (no polling on this side), as QEMU's `blkio` block driver does.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

/// One job: what each queue's thread keeps doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub block: usize,
    /// Requests in flight per queue.
    pub depth: usize,
}

/// What a run measured, over every queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    /// Sum of the requests' latencies, in seconds.
    pub latency_sum: f64,
}

impl Measured {
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn mean_latency_us(&self) -> f64 {
        self.latency_sum / (self.requests.max(1) as f64) * 1e6
    }
}

/// Connects to the export at `socket` with `queues` queues and runs `job` on every queue for
/// `warmup` (not counted) and then `duration`. `between` is called once the warm-up is over
/// and once at the end of the measured time, from the calling thread (to sample the
/// exporter's CPU time).
pub fn run(
    socket: &str,
    queues: usize,
    job: Job,
    warmup: Duration,
    duration: Duration,
    mut between: impl FnMut(),
) -> Result<Measured, String> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(error("new"))?;
    blkio.set_str("path", socket).map_err(error("path"))?;
    blkio.connect().map_err(error("connect"))?;
    blkio
        .set_i32("num-queues", queues as i32)
        .map_err(error("num-queues"))?;
    let started = blkio.start().map_err(error("start"))?;
    let capacity = blkio.get_u64("capacity").map_err(error("capacity"))?;
    let alignment = blkio
        .get_u64("mem-region-alignment")
        .map_err(error("mem-region-alignment"))? as usize;
    let per_queue = (job.block * job.depth).next_multiple_of(alignment.max(4096));
    let region = blkio
        .alloc_mem_region(per_queue * queues)
        .map_err(error("alloc_mem_region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(error("map_mem_region"))?;
    let blocks = capacity / job.block as u64;
    if blocks == 0 {
        return Err(format!(
            "the export has {capacity} bytes: less than one block"
        ));
    }
    let start = Instant::now() + warmup;
    let end = start + duration;
    let results: Vec<Result<Measured, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| {
                let base = region.addr + index * per_queue;
                scope.spawn(move || run_queue(queue, base, job, blocks, index as u64, start, end))
            })
            .collect();
        // Sample at the end of the warm-up and of the measured time.
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        between();
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        between();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a queue thread panicked".to_string())?
            })
            .collect()
    });
    blkio.unmap_mem_region(&region);
    free(&mut blkio, &region);
    let mut total = Measured {
        seconds: duration.as_secs_f64(),
        ..Measured::default()
    };
    for result in results {
        let queue = result?;
        total.requests += queue.requests;
        total.latency_sum += queue.latency_sum;
    }
    Ok(total)
}

fn free(blkio: &mut Blkio, region: &MemoryRegion) {
    blkio.free_mem_region(region);
}

/// Turns a libblkio error into a message naming the step that failed.
fn error(what: &'static str) -> impl Fn(blkio::Error) -> String {
    move |e| format!("libblkio: {what}: {}", e.message())
}

/// A small xorshift generator: each queue's own sequence of random blocks.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Keeps `job.depth` requests in flight on `queue`, counting those that complete between
/// `start` and `end`.
fn run_queue(
    mut queue: Blkioq,
    base: usize,
    job: Job,
    blocks: u64,
    index: u64,
    start: Instant,
    end: Instant,
) -> Result<Measured, String> {
    let mut random =
        Random(0x9e37_79b9_7f4a_7c15 ^ (index + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    // Sequential jobs: each queue walks its own share of the disk.
    let mut next_sequential = blocks / 4 * (index % 4);
    let mut submitted_at = vec![Instant::now(); job.depth];
    let mut submit = |queue: &mut Blkioq, slot: usize, submitted_at: &mut [Instant]| {
        let block = if job.random {
            random.next() % blocks
        } else {
            let block = next_sequential % blocks;
            next_sequential += 1;
            block
        };
        let offset = block * job.block as u64;
        let buffer = (base + slot * job.block) as *mut u8;
        submitted_at[slot] = Instant::now();
        if job.write {
            queue.write(offset, buffer, job.block, slot, ReqFlags::empty());
        } else {
            queue.read(offset, buffer, job.block, slot, ReqFlags::empty());
        }
    };
    for slot in 0..job.depth {
        submit(&mut queue, slot, &mut submitted_at);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..job.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut measured = Measured::default();
    let mut in_flight = job.depth;
    while in_flight > 0 {
        let done = queue
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| format!("libblkio: do_io: {}", e.message()))?;
        let now = Instant::now();
        for completion in &completions[..done] {
            // SAFETY: `do_io` initialised the first `done` entries.
            #[allow(unsafe_code)]
            let completion = unsafe { completion.assume_init_read() };
            if completion.ret != 0 {
                return Err(format!("a request failed: {}", completion.ret));
            }
            let slot = completion.user_data;
            if now >= start && now < end {
                measured.requests += 1;
                measured.latency_sum += (now - submitted_at[slot]).as_secs_f64();
            }
            if now < end {
                submit(&mut queue, slot, &mut submitted_at);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(measured)
}
