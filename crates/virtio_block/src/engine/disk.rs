//! The asynchronous engine: any [`Disk`], many requests in flight per queue, completed in
//! whatever order the disk finishes them.
//!
//! # Threads
//!
//! The thread that rings the doorbell pops chains, parses them and starts each request by
//! polling its future once. A request that finishes at once (a RAM disk, a file the page
//! cache serves) completes right there, with no thread hop. One that does not is left with
//! the disk: when the disk wakes it, it is queued to the device's executor thread, which polls
//! it again (each request is an `async-task` task; nothing is handed over until there is
//! work to do). A future's poll never blocks, so the doorbell thread never waits for I/O.
//! Completions write the status and put the chain in the used ring from whichever of the two
//! threads finished them.
//!
//! Interrupts are sent per batch, not per request: the doorbell thread once it has popped
//! what the driver made available, the executor thread once it has run what was queued to
//! it. Each asks the driver's event index whether it wants one for everything completed
//! since, so a driver that takes completions as fast as they come still gets them all at
//! once, and takes one interrupt where it would have taken one per request.
//!
//! At most a queue size of requests are in flight per queue: a driver that keeps republishing
//! heads it has not got back cannot make the device hold more. When the limit is reached the
//! queue is left alone until a completion frees a slot, which resumes popping.
//!
//! A thread that drives its own I/O ([`disk_backend::io_thread`], as the vhost-user export's
//! queue threads do) takes the executor thread's place for the requests its disks complete
//! on it: their tasks run there, and the whole path from kick to interrupt stays on one
//! thread (wrap that thread's work in [`defer_interrupts`]).
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
use async_task::Runnable;
use disk_backend::io_thread;
use disk_backend::{Disk, DiskError, UnmapBehavior};
use futures::future::{AbortHandle, Abortable};
use guestmem::{MemoryRead, PAGE_SIZE, PagedRange};
use parking_lot::{Condvar, Mutex};
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

/// The most bytes handed to the disk in one zero-copy request (256 pages).
pub const WINDOW_BYTES: usize = 1 << 20;

/// The host buffer a request whose guest buffers straddle blocks is bounced through.
pub const BOUNCE_BYTES: usize = 64 << 10;

/// Size of the shared buffer of zeros write-zeroes writes from.
const ZERO_BYTES: usize = 64 << 10;

/// The tasks the executor thread polls: those their disk woke, and the resize watcher.
struct RunQueue {
    state: Mutex<RunState>,
    ready: Condvar,
    /// Tasks spawned and not yet finished (or dropped); an atomic, so that a request does
    /// not take the lock to be counted.
    live: AtomicUsize,
}

struct RunState {
    queued: VecDeque<Runnable>,
    /// No new tasks: the executor thread returns once `live` is 0.
    closed: bool,
}

impl RunQueue {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(RunState {
                queued: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            live: AtomicUsize::new(0),
        })
    }

    /// Makes `future` a task whose wake-ups queue it here, and returns it unpolled: the
    /// caller polls it first, on its own thread.
    fn spawn(self: &Arc<Self>, future: impl Future<Output = ()> + Send + 'static) -> Runnable {
        self.live.fetch_add(1, Ordering::Relaxed);
        let finished = LiveTask(self.clone());
        let future = async move {
            let _finished = finished;
            future.await;
        };
        let queue = self.clone();
        let (runnable, task) = async_task::spawn(future, move |runnable| {
            // Woken on a thread that drives its own I/O (a queue thread whose ring reaped the
            // completion): it runs there, before that thread sleeps again.
            if let Err(runnable) = io_thread::schedule_local(runnable) {
                queue.state.lock().queued.push_back(runnable);
                queue.ready.notify_one();
            }
        });
        task.detach();
        runnable
    }

    /// The executor thread: runs what is queued, batch by batch, until closed and idle.
    fn run(&self) {
        let mut batch = VecDeque::new();
        loop {
            {
                let mut state = self.state.lock();
                while state.queued.is_empty() {
                    if state.closed && self.live.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    self.ready.wait(&mut state);
                }
                std::mem::swap(&mut batch, &mut state.queued);
            }
            Notifications::batch(|| {
                for runnable in batch.drain(..) {
                    runnable.run();
                }
            });
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Counts a task as live until its future is finished or dropped.
struct LiveTask(Arc<RunQueue>);

impl Drop for LiveTask {
    fn drop(&mut self) {
        // The last task tells a closed executor under its lock, so the executor cannot miss
        // it between checking the count and waiting.
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.state.lock().closed {
            self.0.ready.notify_all();
        }
    }
}

thread_local! {
    /// The queues with completions not yet told to the driver, while this thread runs a
    /// batch (`None` outside one).
    static UNSIGNALLED: RefCell<Option<SmallVec<[Arc<QueueWorker>; 4]>>> =
        const { RefCell::new(None) };
}

/// Runs `work` with used-buffer interrupts deferred to its end: each queue that completed
/// requests meanwhile asks its driver once whether it wants an interrupt. A thread that runs
/// request tasks itself (an [`IoThread`](disk_backend::io_thread::IoThread)'s local tasks)
/// wraps them in this, as the engine's own threads do. Nested calls join the outer one.
pub fn defer_interrupts<R>(work: impl FnOnce() -> R) -> R {
    let mut result = None;
    Notifications::batch(|| result = Some(work()));
    result.expect("the work ran")
}

/// Used-buffer interrupts deferred to the end of a batch of work on one thread.
struct Notifications;

impl Notifications {
    /// Runs `work`, then asks each queue it completed requests on whether the driver wants
    /// an interrupt. Nested calls join the outer batch.
    fn batch(work: impl FnOnce()) {
        /// Ends the outermost batch, even if `work` panics.
        struct Outermost;
        impl Drop for Outermost {
            fn drop(&mut self) {
                // Signalling completes nothing, so it cannot add to the list: take it whole.
                let workers = UNSIGNALLED.with(|cell| cell.borrow_mut().take());
                for worker in workers.into_iter().flatten() {
                    worker.signal();
                }
            }
        }
        let outermost = UNSIGNALLED.with(|cell| {
            let mut cell = cell.borrow_mut();
            cell.is_none().then(|| {
                *cell = Some(SmallVec::new());
                Outermost
            })
        });
        work();
        drop(outermost);
    }

    /// Notes that `worker` completed requests: signalled at the end of this thread's batch,
    /// or now outside one.
    fn completed(worker: &Arc<QueueWorker>) {
        if worker.unsignalled.swap(true, Ordering::AcqRel) {
            return;
        }
        let deferred = UNSIGNALLED.with(|cell| match cell.borrow_mut().as_mut() {
            Some(list) => {
                list.push(worker.clone());
                true
            }
            None => false,
        });
        if !deferred {
            worker.signal();
        }
    }
}

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
    tasks: Arc<RunQueue>,
    state: Mutex<WorkerState>,
    idle: Condvar,
    /// Requests completed since the driver was last asked whether it wants an interrupt.
    unsignalled: AtomicBool,
}

impl QueueWorker {
    /// Pops and starts requests until the queue is empty or the in-flight limit is reached,
    /// then interrupts the driver once for those that completed meanwhile, if it wants one.
    fn process(self: &Arc<Self>) {
        Notifications::batch(|| self.pop_and_start());
    }

    fn pop_and_start(self: &Arc<Self>) {
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
        let task = self.tasks.spawn(async move {
            let (status, written) = execute(&worker.disk, &worker.ctx, &request.operation).await;
            worker.complete(&request, status, written);
        });
        // The first poll happens here: a request that finishes at once completes without a
        // hop to the executor thread; one that does not is queued there when its disk wakes
        // it. The run queue closes only once nothing is in flight (see `stop`).
        task.run();
    }

    fn complete(self: &Arc<Self>, request: &Request, status: u8, written: u64) {
        let len = request.complete(&self.ctx.mem, status, written);
        let mut state = self.state.lock();
        let result = state.queue.add_used(request.head, len);
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.idle.notify_all();
        }
        let resume = std::mem::take(&mut state.blocked);
        drop(state);
        match result {
            Ok(()) => Notifications::completed(self),
            Err(error) => self.ctx.fail(error),
        }
        if resume {
            self.process();
        }
    }

    /// Interrupts the driver if it wants to hear of the requests completed since it was
    /// last asked.
    fn signal(&self) {
        if !self.unsignalled.swap(false, Ordering::AcqRel) {
            return;
        }
        let result = self.state.lock().queue.needs_notification();
        match result {
            Ok(true) => self.ctx.interrupt.signal_used_queue(self.index),
            Ok(false) => {}
            Err(error) => self.ctx.fail(error),
        }
    }
}

/// The live asynchronous engine.
pub(crate) struct DiskEngine {
    workers: Vec<Option<Arc<QueueWorker>>>,
    tasks: Arc<RunQueue>,
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
        let tasks = RunQueue::new();
        let thread = std::thread::Builder::new()
            .name("virtio-blk-io".into())
            .spawn({
                let tasks = tasks.clone();
                move || tasks.run()
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
        // Its first poll, like every later one, on the executor thread.
        tasks
            .spawn(async move {
                let _ = Abortable::new(watcher, registration).await;
            })
            .schedule();
        let workers = queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| {
                queue.map(|queue| {
                    Arc::new(QueueWorker {
                        index: index as u16,
                        disk: disk.clone(),
                        ctx: ctx.clone(),
                        tasks: tasks.clone(),
                        state: Mutex::new(WorkerState {
                            queue,
                            in_flight: 0,
                            blocked: false,
                            stopped: false,
                        }),
                        idle: Condvar::new(),
                        unsignalled: AtomicBool::new(false),
                    })
                })
            })
            .collect();
        Ok(Self {
            workers,
            tasks,
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
        // The aborted resize watcher ends at its next poll, and the executor thread once it
        // has (nothing else is in flight by now).
        self.resize.abort();
        self.tasks.close();
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
