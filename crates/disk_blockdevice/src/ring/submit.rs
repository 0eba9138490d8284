//! Starting a request: a slot, its submission entry, and entering the kernel in batches.

use super::op::{Op, Owned, Target};
use super::request::{Request, RingRef, Stage};
use super::table::{SlotState, Table};
use super::{InlineReap, Ring};
use std::sync::atomic::Ordering;
use std::task::{Poll, Wake, Waker};

impl Ring {
    /// Runs `op` with `owned` lending the memory of the bytes after the first `skip`.
    /// Resolves to the kernel's result (bytes transferred, or 0) and the memory.
    pub(crate) fn run(&self, op: Op, owned: Owned, skip: usize) -> Request<'_> {
        Request {
            ring: RingRef::Disk(self),
            target: Target::Registered,
            stage: Stage::Queued {
                op,
                owned,
                skip,
                fixed: true,
            },
        }
    }

    /// Moves `owned` into a free slot and pushes the submission entry, or registers `waker`
    /// and hands `owned` back if every slot is in use. Returns the slot, the entry's position
    /// in the submission queue, and whether its request must see it submitted (not in owner
    /// mode, where the owner submits). Reaps completions inline first, which may free a slot.
    pub(super) fn start(
        &self,
        target: Target,
        op: Op,
        mut owned: Owned,
        skip: usize,
        allow_fixed: bool,
        waker: &Waker,
    ) -> Result<(u32, u64, bool), Owned> {
        let shared = &*self.shared;
        let mut inline = InlineReap::default();
        let mut table = shared.table.lock();
        inline.reap(shared, &mut table, None);
        let Some(index) = table.free.pop() else {
            table.waiting.push_back(waker.clone());
            drop(table);
            inline.wake();
            return Err(owned);
        };
        let Table { slots, fixed, .. } = &mut *table;
        let slot = &mut slots[index as usize];
        owned.iovecs(skip, &mut slot.iovecs);
        let buffer = match op {
            Op::Read { .. } | Op::Write { .. } if allow_fixed => fixed.index_of(&slot.iovecs),
            _ => None,
        };
        let entry = op
            .entry(target, &slot.iovecs, skip, buffer)
            .user_data(index as u64);
        shared.io_log.record(&entry);
        slot.owned = owned;
        slot.fixed = buffer.is_some();
        slot.state = SlotState::InFlight(Some(waker.clone()));
        table.outstanding += 1;
        // The entry's iovec array and the memory it points to belong to slot `index`
        // (`slot.iovecs`, `slot.owned`), which nothing modifies or frees until this entry's
        // completion has been reaped: the future only keeps the index, and a dropped future
        // abandons the slot instead of freeing it. A slot never has more than one entry and
        // there are no more slots than submission queue entries, so a full queue is not
        // expected (the owner mode's eventfd poll and timeout have entries of their own; a
        // failed push is handled below).
        // SAFETY: the entry's memory outlives it (above).
        let pushed = unsafe { table.push(&shared.ring, &entry) };
        let Ok(position) = pushed else {
            // Not expected (see above); give the slot back and retry from the executor.
            table.outstanding -= 1;
            let owned = table.release(index);
            drop(table);
            inline.wake();
            self.submit();
            waker.wake_by_ref();
            return Err(owned);
        };
        table.fixed.requests += u64::from(buffer.is_some());
        drop(table);
        inline.wake();
        if let Some(owner) = &shared.owner {
            // The owner submits when it next waits; another thread's entry wakes it.
            if !shared.on_owner_thread() {
                owner.signal.wake_by_ref();
            }
            return Ok((index, position, false));
        }
        shared.queued.fetch_add(1, Ordering::SeqCst);
        Ok((index, position, true))
    }

    /// Enters the kernel for every entry queued so far, unless another thread is doing so:
    /// that thread checks for entries queued during its call and submits them too, so
    /// concurrent submitters share one `io_uring_enter` per batch. If the kernel keeps
    /// refusing entries (see [`Ring::enter_queued`]), they stay in the submission queue and
    /// counted in `queued`; each request sees to its own entry (`Stage::Batched`), so the next
    /// poll of a request whose entry is still there tries again.
    pub(super) fn submit(&self) {
        let shared = &*self.shared;
        if let Some(owner) = &shared.owner {
            // Only the owner may enter the kernel; it does so when it next waits.
            owner.signal.wake_by_ref();
            return;
        }
        loop {
            if shared.submitting.swap(true, Ordering::SeqCst) {
                return;
            }
            shared.queued.store(0, Ordering::SeqCst);
            let taken = self.enter_queued();
            if !taken {
                shared.queued.fetch_add(1, Ordering::SeqCst);
            }
            shared.submitting.store(false, Ordering::SeqCst);
            // Someone may have queued an entry after our `io_uring_enter` read the queue and
            // seen `submitting` still set; this load sees their increment.
            if !taken || shared.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Submits what the submission queue holds, and returns whether the kernel took it all.
    /// The kernel may take only part of it: `io_uring_enter` fails with `EAGAIN` (no memory
    /// for a request) or `EINTR`, or, without `SUBMIT_ALL` (before Linux 5.18), it stops
    /// after an entry it could not set up. A few more tries, yielding in between, cover the
    /// transient cases. Entries other threads push meanwhile do not count: their own
    /// `queued` increment sends this submitter round again.
    pub(super) fn enter_queued(&self) -> bool {
        /// Tries before the entries are left for the next submitter.
        const TRIES: usize = 16;
        for _ in 0..TRIES {
            let waiting = self.shared.table.lock().waiting(&self.shared.ring);
            if waiting == 0 {
                return true;
            }
            // The kernel takes entries in order, at least `waiting` are offered to it, and
            // it reports how many it took.
            match self.shared.ring.submit() {
                Ok(taken) if taken >= waiting => return true,
                Ok(_) => std::thread::yield_now(),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    std::thread::yield_now();
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Submits the open batch, if a submitter has not already taken it.
    pub(super) fn submit_batch(&self) {
        if self.shared.queued.load(Ordering::SeqCst) > 0 {
            self.submit();
        }
    }

    /// Whether the kernel has taken the entry at `position` (from [`Table::push`]).
    pub(super) fn taken(&self, position: u64) -> bool {
        self.shared.table.lock().taken(&self.shared.ring, position)
    }

    /// Collects the result of slot `index` (and whether its entry named a fixed buffer), or
    /// records `waker`. Reaps completions inline first, so a future polled by a busy
    /// executor finds its completion without waiting for another thread to wake it.
    pub(super) fn poll_slot(&self, index: u32, waker: &Waker) -> Poll<(i32, Owned, bool)> {
        let shared = &*self.shared;
        let mut inline = InlineReap::default();
        let mut table = shared.table.lock();
        inline.reap(shared, &mut table, Some(index));
        let slot = &mut table.slots[index as usize];
        let poll = match &mut slot.state {
            SlotState::Done(result) => {
                let (result, fixed) = (*result, slot.fixed);
                let owned = table.release(index);
                inline.take_waiting(&mut table);
                Poll::Ready((result, owned, fixed))
            }
            SlotState::InFlight(current) => {
                if !current.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *current = Some(waker.clone());
                }
                Poll::Pending
            }
            SlotState::Free | SlotState::Abandoned => {
                unreachable!("a request's slot is in flight or done while its future lives")
            }
        };
        drop(table);
        inline.wake();
        poll
    }

    /// The future of slot `index` is gone: free the slot if the kernel is done with it, or
    /// leave it to whoever reaps its completion.
    pub(super) fn abandon(&self, index: u32) {
        let mut table = self.shared.table.lock();
        let slot = &mut table.slots[index as usize];
        match slot.state {
            SlotState::Done(_) => {
                let owned = table.release(index);
                let waiting = std::mem::take(&mut table.waiting);
                drop(table);
                drop(owned);
                waiting.into_iter().for_each(Waker::wake);
            }
            SlotState::InFlight(_) => slot.state = SlotState::Abandoned,
            SlotState::Free | SlotState::Abandoned => {
                unreachable!("a request's slot is in flight or done while its future lives")
            }
        }
    }
}
