//! The asynchronous engine: any [`Disk`], many requests in flight per queue, completed in
//! whatever order the disk finishes them.
//!
//! # Threads
//!
//! The thread that rings the doorbell pops chains, parses them and starts each request by
//! polling its future once. A request that finishes at once (a RAM disk) completes right
//! there, with no thread hop; one that does not is handed to the device's executor thread (a
//! `futures` `LocalPool`), which drives it to completion. A future's poll never blocks, so
//! the doorbell thread never waits for I/O. Completions write the status, put the chain in
//! the used ring and interrupt if the driver wants it, from whichever thread finished them.
//!
//! At most a queue size of requests are in flight per queue: a driver that keeps republishing
//! heads it has not got back cannot make the device hold more. When the limit is reached the
//! queue is left alone until a completion frees a slot, which resumes popping.
//!
//! The executor thread also runs a task awaiting [`Disk::wait_resize`], which updates the
//! capacity, bumps the configuration generation and raises a configuration-change interrupt.
//!
//! # Data path
//!
//! A read or write is handed to the disk as [`RequestBuffers`] over the guest's own pages, no
//! copy, one disk request per window of up to [`WINDOW_BYTES`] that is page-contiguous (only
//! the first and last page partially covered, which is what a `PagedRange` can describe).
//! Linux's buffers are: every segment but the first starts on a page boundary and every
//! segment but the last ends on one. Where the guest's segments break that rule, the request
//! is still split without a copy if each break falls on a block boundary of the request;
//! otherwise (a block straddles two unaligned segments) the data is bounced through a host
//! buffer of at most [`BOUNCE_BYTES`], chunk by chunk.
//!
//! Write-zeroes writes from one shared buffer of zeros, or unmaps when the driver set the
//! unmap flag and the disk's unmapped sectors read as zeros.

use super::EngineContext;
use crate::queue::{QueueError, QueueState, SplitQueue};
use crate::request::{self, DataSegments, Operation, Request, SectorRange};
use crate::spec::blk;
use disk_backend::{Disk, DiskError, UnmapBehavior};
use futures::StreamExt;
use futures::channel::mpsc;
use futures::executor::LocalPool;
use futures::future::{AbortHandle, Abortable};
use futures::task::{LocalSpawnExt, noop_waker_ref};
use guestmem::{MemoryRead, PAGE_SIZE, PagedRange};
use parking_lot::{Condvar, Mutex};
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use smallvec::SmallVec;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Context;
use std::thread::JoinHandle;

/// The most bytes handed to the disk in one zero-copy request (256 pages).
pub const WINDOW_BYTES: usize = 1 << 20;

/// The host buffer a request whose guest buffers straddle blocks is bounced through.
pub const BOUNCE_BYTES: usize = 64 << 10;

/// Size of the shared buffer of zeros write-zeroes writes from.
const ZERO_BYTES: usize = 64 << 10;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

struct WorkerState {
    queue: SplitQueue,
    in_flight: u16,
    /// Popping stopped at the in-flight limit; the next completion resumes it.
    blocked: bool,
    stopped: bool,
}

/// One live queue.
struct QueueWorker {
    index: u16,
    disk: Disk,
    ctx: Arc<EngineContext>,
    spawner: mpsc::UnboundedSender<Task>,
    state: Mutex<WorkerState>,
    idle: Condvar,
}

impl QueueWorker {
    /// Pops and starts requests until the queue is empty or the in-flight limit is reached.
    fn process(self: &Arc<Self>) {
        loop {
            let request = {
                let mut state = self.state.lock();
                if state.stopped || self.ctx.failed() {
                    return;
                }
                if state.in_flight >= state.queue.size() {
                    state.blocked = true;
                    return;
                }
                match state.queue.pop() {
                    Ok(Some(chain)) => {
                        state.in_flight += 1;
                        let capacity = self.disk.sector_count();
                        request::parse(&self.ctx.mem, chain, &self.ctx.limits, capacity)
                    }
                    Ok(None) => match state.queue.enable_notification() {
                        Ok(true) => continue,
                        Ok(false) => return,
                        Err(error) => return self.fail(state, error),
                    },
                    Err(error) => return self.fail(state, error),
                }
            };
            self.start(request);
        }
    }

    fn fail(&self, mut state: parking_lot::MutexGuard<'_, WorkerState>, error: QueueError) {
        // A malformed chain's head went back to the used ring: the driver should hear.
        let notify = state.queue.needs_notification().unwrap_or(false);
        drop(state);
        if notify {
            self.ctx.interrupt.signal_used_queue(self.index);
        }
        self.ctx.fail(error);
    }

    fn start(self: &Arc<Self>, request: Request) {
        let worker = self.clone();
        let mut task: Task = Box::pin(async move {
            let (status, written) = execute(&worker.disk, &worker.ctx, &request.operation).await;
            worker.complete(&request, status, written);
        });
        // Requests that finish at once complete here, without a hop to the executor thread.
        let mut cx = Context::from_waker(noop_waker_ref());
        if task.as_mut().poll(&mut cx).is_pending() {
            // The executor polls a new task at least once, so a wake-up sent to the no-op
            // waker meanwhile is not lost. The channel closes only once nothing is in
            // flight (see `stop`), and this request is.
            let _ = self.spawner.unbounded_send(task);
        }
    }

    fn complete(self: &Arc<Self>, request: &Request, status: u8, written: u64) {
        let len = request.complete(&self.ctx.mem, status, written);
        let mut state = self.state.lock();
        let result = state
            .queue
            .add_used(request.head, len)
            .and_then(|()| state.queue.needs_notification());
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.idle.notify_all();
        }
        let resume = std::mem::take(&mut state.blocked);
        drop(state);
        match result {
            Ok(true) => self.ctx.interrupt.signal_used_queue(self.index),
            Ok(false) => {}
            Err(error) => self.ctx.fail(error),
        }
        if resume {
            self.process();
        }
    }
}

/// The live asynchronous engine.
pub(crate) struct DiskEngine {
    workers: Vec<Option<Arc<QueueWorker>>>,
    spawner: mpsc::UnboundedSender<Task>,
    thread: Option<JoinHandle<()>>,
    resize: AbortHandle,
}

impl DiskEngine {
    /// Starts the executor thread and the resize watcher.
    pub fn start(
        disk: Disk,
        ctx: EngineContext,
        queues: Vec<Option<SplitQueue>>,
    ) -> std::io::Result<Self> {
        let ctx = Arc::new(ctx);
        let (spawner, tasks) = mpsc::unbounded::<Task>();
        let thread = std::thread::Builder::new()
            .name("virtio-blk-io".into())
            .spawn(move || {
                let mut pool = LocalPool::new();
                let local = pool.spawner();
                pool.run_until(tasks.for_each(|task| {
                    // Spawning fails only once the pool is shut down, which it is not while
                    // this loop runs.
                    let _ = local.spawn_local(task);
                    async {}
                }));
                // The channel is closed: finish what is left (nothing is in flight by then;
                // the aborted resize watcher ends at its next poll).
                pool.run();
            })?;
        let (resize, registration) = AbortHandle::new_pair();
        let watcher = {
            let disk = disk.clone();
            let ctx = ctx.clone();
            async move {
                // Start from what the driver was told, not from the disk now: a resize
                // between activation and this task's first poll must still be announced.
                let mut known = ctx.shared.capacity.lock().sectors;
                loop {
                    known = disk.wait_resize(known).await;
                    // A configuration read may have picked the new size up already (and
                    // bumped the generation); the driver is told either way.
                    ctx.shared.set_capacity(known);
                    ctx.interrupt.signal_config_change();
                }
            }
        };
        let _ = spawner.unbounded_send(Box::pin(async move {
            let _ = Abortable::new(watcher, registration).await;
        }));
        let workers = queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| {
                queue.map(|queue| {
                    Arc::new(QueueWorker {
                        index: index as u16,
                        disk: disk.clone(),
                        ctx: ctx.clone(),
                        spawner: spawner.clone(),
                        state: Mutex::new(WorkerState {
                            queue,
                            in_flight: 0,
                            blocked: false,
                            stopped: false,
                        }),
                        idle: Condvar::new(),
                    })
                })
            })
            .collect();
        Ok(Self {
            workers,
            spawner,
            thread: Some(thread),
            resize,
        })
    }

    /// Handles a notification of queue `index`.
    pub fn process(&self, index: u16) {
        if let Some(Some(worker)) = self.workers.get(usize::from(index)) {
            worker.process();
        }
    }

    /// Stops popping, waits for every request in flight to complete, stops the executor
    /// thread, and returns the queues' indices (`None` for queues that were not live).
    pub fn stop(&mut self) -> Vec<Option<QueueState>> {
        let workers: Vec<_> = self.workers.iter().flatten().cloned().collect();
        for worker in &workers {
            worker.state.lock().stopped = true;
        }
        for worker in &workers {
            let mut state = worker.state.lock();
            while state.in_flight > 0 {
                worker.idle.wait(&mut state);
            }
        }
        self.resize.abort();
        self.spawner.close_channel();
        if let Some(thread) = self.thread.take() {
            // A panic on the executor thread would have been a bug in a request future;
            // there is nothing left to clean up after it.
            let _ = thread.join();
        }
        self.workers
            .iter()
            .map(|w| w.as_ref().map(|w| w.state.lock().queue.state()))
            .collect()
    }
}

impl Drop for DiskEngine {
    fn drop(&mut self) {
        // Requests in flight hold guest memory and the used ring: never let them outlive
        // the engine.
        if self.thread.is_some() {
            self.stop();
        }
    }
}

async fn execute(disk: &Disk, ctx: &EngineContext, operation: &Operation) -> (u8, u64) {
    let result = match operation {
        Operation::Read { sector, data } => transfer(disk, ctx, *sector, data, Direction::Read)
            .await
            .map(|()| data.len()),
        Operation::Write { sector, data } => {
            let fua = !ctx.writeback();
            let direction = Direction::Write { fua };
            match transfer(disk, ctx, *sector, data, direction).await {
                Ok(()) => durable(disk, fua).await.map(|()| 0),
                Err(e) => Err(e),
            }
        }
        Operation::Flush => disk.sync_cache().await.map(|()| 0),
        Operation::GetId { data } => return ctx.get_id(data),
        Operation::Discard(ranges) => {
            let mut result = Ok(0);
            for range in ranges {
                if let Err(e) = disk.unmap(range.sector, range.count, false).await {
                    result = Err(e);
                    break;
                }
            }
            result
        }
        Operation::WriteZeroes(ranges) => {
            let fua = !ctx.writeback();
            let mut result = Ok(0);
            for range in ranges {
                if let Err(e) = write_zeroes(disk, range, fua).await {
                    result = Err(e);
                    break;
                }
            }
            match result {
                Ok(_) => durable(disk, fua).await.map(|()| 0),
                Err(e) => Err(e),
            }
        }
        Operation::Fail(status) => return (*status, 0),
    };
    match result {
        Ok(written) => (blk::S_OK, written),
        Err(_) => (blk::S_IOERR, 0),
    }
}

/// FUA makes a write durable only where the disk respects it; elsewhere writethrough needs
/// a flush.
async fn durable(disk: &Disk, fua: bool) -> Result<(), DiskError> {
    if fua && !disk.is_fua_respected() {
        disk.sync_cache().await
    } else {
        Ok(())
    }
}

async fn write_zeroes(disk: &Disk, range: &SectorRange, fua: bool) -> Result<(), DiskError> {
    if range.unmap && disk.unmap_behavior() == UnmapBehavior::Zeroes {
        return disk.unmap(range.sector, range.count, false).await;
    }
    static ZEROS: OnceLock<OwnedRequestBuffers> = OnceLock::new();
    // Never handed out writable, so it stays zero.
    let zeros = ZEROS.get_or_init(|| OwnedRequestBuffers::new(ZERO_BYTES));
    let shift = disk.sector_shift();
    let per_write = (ZERO_BYTES >> shift) as u64;
    let mut done = 0;
    while done < range.count {
        let n = (range.count - done).min(per_write);
        let buffers = zeros.buffers(false).subrange(0, (n << shift) as usize);
        disk.write_vectored(&buffers, range.sector + done, fua)
            .await?;
        done += n;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Read,
    Write { fua: bool },
}

async fn io(
    disk: &Disk,
    buffers: &RequestBuffers<'_>,
    sector: u64,
    direction: Direction,
) -> Result<(), DiskError> {
    match direction {
        Direction::Read => disk.read_vectored(buffers, sector).await,
        Direction::Write { fua } => disk.write_vectored(buffers, sector, fua).await,
    }
}

async fn transfer(
    disk: &Disk,
    ctx: &EngineContext,
    sector: u64,
    data: &DataSegments,
    direction: Direction,
) -> Result<(), DiskError> {
    let shift = disk.sector_shift();
    if !splits_on_blocks(data, 1 << shift) {
        return bounce(disk, ctx, sector, data, direction).await;
    }
    let read = direction == Direction::Read;
    let mut gpns = SmallVec::<[u64; 17]>::new();
    let mut cursor = Cursor::default();
    let mut offset = 0u64;
    while let Some((first, len)) = next_window(data, &mut cursor, WINDOW_BYTES, &mut gpns) {
        let range = PagedRange::new(first, len, &gpns).ok_or(DiskError::InvalidInput)?;
        let buffers = RequestBuffers::new(&ctx.mem, range, read);
        io(disk, &buffers, sector + (offset >> shift), direction).await?;
        offset += len as u64;
    }
    Ok(())
}

/// Whether every place where the segments stop being page-contiguous falls on a multiple of
/// `block` bytes into the data, so that the request splits into whole-block zero-copy pieces.
pub fn splits_on_blocks(data: &DataSegments, block: u64) -> bool {
    let page = PAGE_SIZE as u64;
    let mut offset = 0u64;
    let mut previous_end: Option<u64> = None;
    for &(gpa, len) in data.segments() {
        if let Some(end) = previous_end {
            let contiguous = end.is_multiple_of(page) && gpa.is_multiple_of(page);
            if !contiguous && !offset.is_multiple_of(block) {
                return false;
            }
        }
        offset += u64::from(len);
        previous_end = Some(gpa.wrapping_add(u64::from(len)));
    }
    true
}

/// Where [`next_window`] resumes: a segment and a byte offset into it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    index: usize,
    offset: u64,
}

/// The next page-contiguous window of at most `max` bytes: fills `gpns` with its pages and
/// returns its offset into the first page and its length, or `None` at the end.
pub fn next_window(
    data: &DataSegments,
    cursor: &mut Cursor,
    max: usize,
    gpns: &mut SmallVec<[u64; 17]>,
) -> Option<(usize, usize)> {
    let page = PAGE_SIZE as u64;
    let segments = data.segments();
    gpns.clear();
    let &(first_gpa, _) = segments.get(cursor.index)?;
    let first_offset = ((first_gpa + cursor.offset) % page) as usize;
    let mut len = 0usize;
    let mut previous_end: Option<u64> = None;
    while let Some(&(gpa, seg_len)) = segments.get(cursor.index) {
        if len == max {
            break;
        }
        let at = gpa + cursor.offset;
        if let Some(end) = previous_end
            && (!end.is_multiple_of(page) || !at.is_multiple_of(page))
        {
            break;
        }
        let take = (u64::from(seg_len) - cursor.offset).min((max - len) as u64);
        gpns.extend(at / page..=(at + take - 1) / page);
        len += take as usize;
        cursor.offset += take;
        previous_end = Some(at + take);
        if cursor.offset == u64::from(seg_len) {
            cursor.index += 1;
            cursor.offset = 0;
        }
    }
    Some((first_offset, len))
}

/// The path for guest buffers that straddle blocks: through a host buffer, chunk by chunk.
async fn bounce(
    disk: &Disk,
    ctx: &EngineContext,
    sector: u64,
    data: &DataSegments,
    direction: Direction,
) -> Result<(), DiskError> {
    let shift = disk.sector_shift();
    let chunk = data.len().min(BOUNCE_BYTES as u64) as usize;
    let bounce = OwnedRequestBuffers::new(chunk);
    let mut host = vec![0u8; chunk];
    let mut offset = 0u64;
    while offset < data.len() {
        let n = (data.len() - offset).min(chunk as u64) as usize;
        let at = sector + (offset >> shift);
        let buffers = bounce.buffers(direction == Direction::Read).subrange(0, n);
        if direction == Direction::Read {
            io(disk, &buffers, at, direction).await?;
            bounce
                .range()
                .reader(bounce.guest_memory())
                .read(&mut host[..n])?;
            data.write_at(&ctx.mem, offset, &host[..n])?;
        } else {
            data.read_at(&ctx.mem, offset, &mut host[..n])?;
            bounce.copy_from_slice(&host[..n]);
            io(disk, &buffers, at, direction).await?;
        }
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Segment;

    fn data(segments: &[(u64, u32)]) -> DataSegments {
        let segs: Vec<Segment> = segments
            .iter()
            .map(|&(addr, len)| Segment {
                addr,
                len,
                writable: true,
            })
            .collect();
        DataSegments::new(&segs, 0, 0)
    }

    fn windows(d: &DataSegments, max: usize) -> Vec<(usize, usize, Vec<u64>)> {
        let mut cursor = Cursor::default();
        let mut gpns = SmallVec::new();
        let mut out = Vec::new();
        while let Some((first, len)) = next_window(d, &mut cursor, max, &mut gpns) {
            out.push((first, len, gpns.to_vec()));
        }
        out
    }

    #[test]
    fn linux_shaped_buffers_are_one_window() {
        // An O_DIRECT buffer starting 512 bytes into a page, spread over three pages.
        let d = data(&[(0x5200, 3584), (0x9000, 4096), (0x2000, 512)]);
        assert!(splits_on_blocks(&d, 4096));
        assert_eq!(windows(&d, WINDOW_BYTES), vec![(512, 8192, vec![5, 9, 2])]);
    }

    #[test]
    fn breaks_split_or_bounce() {
        // Two 512-byte pieces in the middle of pages: a break at 512 bytes.
        let d = data(&[(0x1100, 512), (0x3300, 512)]);
        assert!(splits_on_blocks(&d, 512));
        assert!(!splits_on_blocks(&d, 1024));
        assert_eq!(
            windows(&d, WINDOW_BYTES),
            vec![(0x100, 512, vec![1]), (0x300, 512, vec![3])]
        );
        // The window limit cuts inside a segment.
        let d = data(&[(0x10000, 3 * 4096)]);
        assert_eq!(
            windows(&d, 8192),
            vec![(0, 8192, vec![16, 17]), (0, 4096, vec![18])]
        );
    }
}
