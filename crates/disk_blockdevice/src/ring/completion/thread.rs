//! [`Completions::Thread`](crate::Completions::Thread): a completion thread per disk.

use crate::ring::Shared;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Shared {
    /// Starts the completion thread, unless the ring is stopping or it runs already.
    pub(in crate::ring) fn start_thread(self: &Arc<Self>) -> io::Result<()> {
        let mut thread = self.thread.lock();
        if self.stopping.load(Ordering::SeqCst) || thread.is_some() {
            return Ok(());
        }
        *thread = Some(
            std::thread::Builder::new()
                .name("disk-uring".into())
                .spawn({
                    let shared = self.clone();
                    move || completion_thread(&shared)
                })?,
        );
        Ok(())
    }
}

/// Reaps completions until the ring stops and nothing is outstanding.
pub(in crate::ring) fn completion_thread(shared: &Shared) {
    let (mut wakers, mut freed) = shared.scratch();
    loop {
        if !shared.spin.is_zero() && spin_for_completion(shared) {
            // A completion arrived while spinning: reap it without sleeping.
        } else {
            shared.wait();
        }
        if shared.reap_all(&mut wakers, &mut freed) {
            return;
        }
    }
}

/// With one or two requests outstanding, where the wake-up of this thread is a large part of
/// a request's latency, polls the completion queue for up to `shared.spin` instead of
/// sleeping. Returns whether a completion is ready. Deeper queues do not spin: completions
/// arrive in batches there, and the spinning would take a core from the submitters.
pub(in crate::ring) fn spin_for_completion(shared: &Shared) -> bool {
    if !(1..=2).contains(&shared.table.lock().outstanding) {
        return false;
    }
    let start = Instant::now();
    loop {
        // A future holding the lock is reaping inline; look again.
        if let Some(table) = shared.table.try_lock() {
            // SAFETY: the completion queue is only read with the table lock held; the
            // queue is only inspected here, not consumed.
            let ready = !unsafe { shared.ring.completion_shared() }.is_empty();
            if ready || table.outstanding == 0 {
                return ready;
            }
        }
        if start.elapsed() >= shared.spin {
            return false;
        }
        std::hint::spin_loop();
    }
}
