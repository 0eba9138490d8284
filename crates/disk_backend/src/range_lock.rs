//! Serialising requests whose sector ranges overlap.
//!
//! A [`RangeLock`] orders requests that touch the same sectors, the way a disk orders
//! overlapping commands: a holder of an [`Access::Exclusive`] range (a write, an unmap) runs
//! alone over that range, holders of [`Access::Shared`] ranges (reads) run together, and
//! requests on disjoint ranges never wait for each other. Waiting is first come, first
//! served among overlapping requests: a request waits only for requests that asked before
//! it, so a stream of reads cannot starve a write and no two requests can wait for each
//! other.
//!
//! A backend or decorator whose request is several steps (a write to two layers, a read
//! followed by a cache fill, a read-modify-write) takes the range for the whole request, so
//! that every overlapping pair of requests appears to have run in one order.
//!
//! ```
//! use disk_backend::range_lock::{Access, RangeLock};
//!
//! futures::executor::block_on(async {
//!     let lock = RangeLock::new();
//!     let read = lock.lock(0..8, Access::Shared).await;
//!     let other_read = lock.lock(4..12, Access::Shared).await; // shares
//!     let write = lock.lock(100..108, Access::Exclusive).await; // disjoint
//!     drop((read, other_read, write));
//! });
//! ```

use event_listener::Event;
use parking_lot::Mutex;
use std::ops::Range;

/// How a range is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// With other shared holders of overlapping ranges (reads).
    Shared,
    /// Alone over the range (writes, unmaps, read-modify-writes).
    Exclusive,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    ticket: u64,
    start: u64,
    end: u64,
    access: Access,
}

impl Entry {
    fn conflicts(&self, other: &Entry) -> bool {
        self.start < self.end
            && other.start < other.end
            && self.start < other.end
            && other.start < self.end
            && (self.access == Access::Exclusive || other.access == Access::Exclusive)
    }
}

#[derive(Debug, Default)]
struct State {
    next_ticket: u64,
    /// Held and waiting ranges in ticket order.
    entries: Vec<Entry>,
}

impl State {
    fn index(&self, ticket: u64) -> usize {
        self.entries
            .binary_search_by_key(&ticket, |e| e.ticket)
            .expect("a guard's entry stays until the guard drops")
    }

    /// Whether an earlier request holds or waits for a range that conflicts with `ticket`'s.
    fn must_wait(&self, ticket: u64) -> bool {
        let index = self.index(ticket);
        let me = &self.entries[index];
        self.entries[..index].iter().any(|e| e.conflicts(me))
    }
}

/// Ranges of sectors held by requests in flight; see the [module documentation](self).
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Event,
}

/// A held range; dropping it releases the range (also when the request is cancelled while it
/// waits).
#[derive(Debug)]
#[must_use = "the range is released when the guard drops"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until `range` can be held with `access`, then holds it until the guard drops.
    /// An empty range never waits.
    ///
    /// Uncontended, this takes one mutex and allocates nothing once the lock has seen as
    /// many requests in flight as it holds now; a request that has to wait registers an
    /// event listener.
    pub async fn lock(&self, range: Range<u64>, access: Access) -> RangeGuard<'_> {
        let (ticket, wait) = {
            let mut state = self.state.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.entries.push(Entry {
                ticket,
                start: range.start,
                end: range.end,
                access,
            });
            (ticket, state.must_wait(ticket))
        };
        // From here on, dropping the future releases the entry.
        let guard = RangeGuard { lock: self, ticket };
        if !wait {
            return guard;
        }
        loop {
            let listener = self.released.listen();
            // Checked after listening, so a release between the check and the listen cannot
            // be missed.
            if !self.state.lock().must_wait(guard.ticket) {
                return guard;
            }
            listener.await;
        }
    }

    /// The number of ranges held or waited for.
    pub fn in_flight(&self) -> usize {
        self.state.lock().entries.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.lock.state.lock();
            let index = state.index(self.ticket);
            state.entries.remove(index);
            !state.entries.is_empty()
        };
        if waiting {
            self.lock.released.notify(usize::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use futures::executor::block_on;

    fn try_lock(lock: &RangeLock, range: Range<u64>, access: Access) -> Option<RangeGuard<'_>> {
        lock.lock(range, access).now_or_never()
    }

    #[test]
    fn shared_ranges_share_and_exclusive_ones_exclude() {
        let lock = RangeLock::new();
        let a = block_on(lock.lock(0..8, Access::Shared));
        let b = block_on(lock.lock(4..12, Access::Shared));
        assert!(try_lock(&lock, 7..9, Access::Exclusive).is_none());
        assert!(
            try_lock(&lock, 12..20, Access::Exclusive).is_some(),
            "touching, not overlapping"
        );
        assert!(
            try_lock(&lock, 5..5, Access::Exclusive).is_some(),
            "empty ranges never wait"
        );
        drop((a, b));
        let w = try_lock(&lock, 0..100, Access::Exclusive).unwrap();
        assert!(try_lock(&lock, 99..100, Access::Shared).is_none());
        drop(w);
        assert_eq!(
            lock.in_flight(),
            0,
            "cancelled waiters leave nothing behind"
        );
    }

    #[test]
    fn waiting_is_first_come_first_served() {
        let lock = RangeLock::new();
        let read = block_on(lock.lock(0..8, Access::Shared));
        let mut write = Box::pin(lock.lock(0..8, Access::Exclusive));
        assert!((&mut write).now_or_never().is_none());
        // A later read of the same range waits behind the waiting write.
        let mut late_read = Box::pin(lock.lock(0..8, Access::Shared));
        assert!((&mut late_read).now_or_never().is_none());
        drop(read);
        let write = block_on(write);
        assert!((&mut late_read).now_or_never().is_none());
        drop(write);
        drop(block_on(late_read));
    }

    #[test]
    fn a_release_wakes_a_waiter_on_another_thread() {
        let lock = RangeLock::new();
        let held = block_on(lock.lock(10..20, Access::Exclusive));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| drop(block_on(lock.lock(15..16, Access::Exclusive))));
            while lock.in_flight() < 2 {
                std::thread::yield_now();
            }
            drop(held);
            waiter.join().unwrap();
        });
        assert_eq!(lock.in_flight(), 0);
    }
}
