//! The writer: random writes (some FUA), unmaps and flushes with several requests in flight,
//! each announced and acknowledged in the journal, until it is killed.

use super::journal::{Header, JournalWriter, Record};
use super::stamp::stamp;
use disk_backend::{Disk, UnmapBehavior};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{GuestMemory, MemoryWrite, PagedRange, RequestBuffers};
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `diskctl crash writer`: what to open and how to write.
#[derive(clap::Args, Debug)]
pub struct WriterArgs {
    /// The stack to write.
    pub spec: String,
    /// The journal to create.
    #[arg(long)]
    pub journal: PathBuf,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub queue_depth: usize,
    /// Most sectors per write or unmap.
    #[arg(long, default_value_t = 256)]
    pub max_sectors: u64,
    /// Flush before every unmap (a diagnosis: with nothing dirty in the page cache, an
    /// unmap cut short by the kill has nothing acknowledged to drop).
    #[arg(long)]
    pub flush_before_unmap: bool,
    /// Give up (exit with an error) if not killed within this many seconds.
    #[arg(long, default_value_t = 120)]
    pub max_seconds: u64,
}

struct Shared<'a> {
    disk: &'a Disk,
    journal: RefCell<JournalWriter>,
    next_id: Cell<u64>,
    /// Ranges (start, end) of writes and unmaps in flight: no two overlap.
    busy: RefCell<Vec<(u64, u64)>>,
    memory: GuestMemory,
    pages_per_worker: u64,
    max_sectors: u64,
    unmap: bool,
    flush_before_unmap: bool,
    deadline: Instant,
}

impl Shared<'_> {
    fn id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    fn record(&self, record: &Record) -> Result<(), String> {
        self.journal
            .borrow_mut()
            .append(record)
            .map_err(|e| crate::stack::error_chain(&e))
    }

    /// Claims a random range no request in flight touches.
    fn claim(&self, rng: &mut StdRng) -> (u64, u64) {
        let sector_count = self.disk.sector_count();
        loop {
            // Mostly small requests, some up to the maximum.
            let most = if rng.random_bool(0.8) {
                self.max_sectors.min(16)
            } else {
                self.max_sectors
            };
            let count = rng.random_range(1..=most);
            let start = rng.random_range(0..=sector_count - count);
            let end = start + count;
            let mut busy = self.busy.borrow_mut();
            if busy.iter().all(|&(s, e)| end <= s || e <= start) {
                busy.push((start, end));
                return (start, count);
            }
        }
    }

    fn release(&self, start: u64) {
        self.busy.borrow_mut().retain(|&(s, _)| s != start);
    }
}

/// Opens `args.spec` and writes until killed (or the time limit, an error).
pub fn run(args: &WriterArgs) -> Result<(), String> {
    let stack = crate::stack::open(Some(&args.spec))?;
    let disk = &stack.disk;
    if disk.is_read_only() {
        return Err("the stack is read-only".into());
    }
    let queue_depth = args.queue_depth.clamp(1, 64);
    let sector_size = disk.sector_size() as u64;
    // Requests in flight cover at most half the disk, so a free range is always found.
    let max_sectors = args
        .max_sectors
        .min(disk.sector_count() / 2 / queue_depth as u64);
    if max_sectors == 0 {
        return Err(format!(
            "the disk's {} sectors are too few for {queue_depth} requests in flight",
            disk.sector_count()
        ));
    }
    let pages_per_worker = (max_sectors * sector_size).div_ceil(guestmem::PAGE_SIZE64);
    let memory = GuestMemory::allocate(
        (pages_per_worker * queue_depth as u64 * guestmem::PAGE_SIZE64) as usize,
    );
    // A refusal only means no fixed buffers; the writer goes on without.
    let _ = disk.register_memory(&memory);
    let mut journal =
        JournalWriter::create(&args.journal).map_err(|e| crate::stack::error_chain(&e))?;
    let unmap = disk.unmap_behavior() != UnmapBehavior::Ignored;
    journal
        .append(&Record::Header(Header {
            sector_count: disk.sector_count(),
            sector_size: disk.sector_size(),
            fua_respected: disk.is_fua_respected(),
            unmap_zeroes: disk.unmap_behavior() == UnmapBehavior::Zeroes,
        }))
        .map_err(|e| crate::stack::error_chain(&e))?;
    let shared = Shared {
        disk,
        journal: RefCell::new(journal),
        next_id: Cell::new(1),
        busy: RefCell::new(Vec::new()),
        memory,
        pages_per_worker,
        max_sectors,
        unmap,
        flush_before_unmap: args.flush_before_unmap,
        deadline: Instant::now() + Duration::from_secs(args.max_seconds),
    };
    let results = crate::workload::drive(join_all(
        (0..queue_depth as u64).map(|worker| run_worker(&shared, worker, args.seed)),
    ));
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Err(format!("not killed within {} s", args.max_seconds))
}

async fn run_worker(shared: &Shared<'_>, worker: u64, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x100_0000).wrapping_add(worker));
    let disk = shared.disk;
    let sector_size = disk.sector_size() as usize;
    let first = worker * shared.pages_per_worker;
    let gpns: Vec<u64> = (first..first + shared.pages_per_worker).collect();
    let mut data = vec![0u8; shared.max_sectors as usize * sector_size];
    while Instant::now() < shared.deadline {
        let choice = rng.random_range(0..100u32);
        if choice < 8 {
            flush(shared).await?;
            continue;
        }
        let (sector, count) = shared.claim(&mut rng);
        let unmap = choice < 20 && shared.unmap;
        if unmap && shared.flush_before_unmap {
            // After the claim: every earlier request on the range was acknowledged before
            // this flush started.
            flush(shared).await?;
        }
        let id = shared.id();
        if unmap {
            shared.record(&Record::Unmap { id, sector, count })?;
            disk.unmap(sector, count, false)
                .await
                .map_err(|e| format!("unmap {id} failed: {}", crate::stack::error_chain(&e)))?;
        } else {
            let fua = choice >= 85;
            let bytes = count as usize * sector_size;
            for (i, sector_buf) in data[..bytes].chunks_exact_mut(sector_size).enumerate() {
                stamp(sector_buf, sector + i as u64, id);
            }
            let range = PagedRange::new(0, bytes, &gpns).expect("the worker's pages hold it");
            RequestBuffers::new(&shared.memory, range, true)
                .writer()
                .write(&data[..bytes])
                .expect("the writer's own memory is accessible");
            shared.record(&Record::Write {
                id,
                sector,
                count,
                fua,
            })?;
            disk.write_vectored(
                &RequestBuffers::new(&shared.memory, range, false),
                sector,
                fua,
            )
            .await
            .map_err(|e| format!("write {id} failed: {}", crate::stack::error_chain(&e)))?;
        }
        // Acknowledged before the range is released, so the next request to these sectors
        // is journalled after this one's acknowledgement.
        shared.record(&Record::Ack { id })?;
        shared.release(sector);
    }
    Ok(())
}

/// A flush, journalled.
async fn flush(shared: &Shared<'_>) -> Result<(), String> {
    let id = shared.id();
    shared.record(&Record::FlushStart { id })?;
    shared
        .disk
        .sync_cache()
        .await
        .map_err(|e| format!("flush {id} failed: {}", crate::stack::error_chain(&e)))?;
    shared.record(&Record::FlushDone { id })
}
