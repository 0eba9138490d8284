//! The table of slots: one per request in flight, owning the memory the kernel uses.

use super::Owned;
use super::completion::owner::OwnerRequests;
use super::fixed::FixedBuffers;
use io_uring::{IoUring, squeue};
use request_buffers::IoBuffer;
use std::collections::VecDeque;
use std::task::Waker;

#[derive(Debug)]
pub(super) enum SlotState {
    Free,
    /// Submitted; the waker of the future waiting for it.
    InFlight(Option<Waker>),
    /// Completed with this result; the future has not collected it yet.
    Done(i32),
    /// Submitted, and the future was dropped: the completion thread frees the slot.
    Abandoned,
}

/// One request in flight. The iovec array's heap storage is reused from request to request
/// and is not touched between submission and completion.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) owned: Owned,
    pub(super) iovecs: Vec<IoBuffer>,
    /// The entry names a fixed buffer.
    pub(super) fixed: bool,
}

#[derive(Debug)]
pub(super) struct Table {
    pub(super) slots: Box<[Slot]>,
    /// Registered guest memory.
    pub(super) fixed: FixedBuffers,
    pub(super) free: Vec<u32>,
    /// Slots the kernel still owns (in flight or abandoned).
    pub(super) outstanding: usize,
    /// Futures waiting for a free slot; all are woken when one frees (a waiter may have been
    /// dropped, so waking only one could strand the others).
    pub(super) waiting: VecDeque<Waker>,
    /// Entries ever pushed onto the submission queue: every push goes through
    /// [`Table::push`], so this is the queue's tail (which wraps at 32 bits; this does not,
    /// so that a request held unpolled for billions of pushes still compares right).
    pub(super) pushed: u64,
    /// The owner's own requests, in [`Completions::Owner`](crate::Completions::Owner) mode.
    pub(super) owner: Option<OwnerRequests>,
}

impl Table {
    /// Pushes `entry` onto `ring`'s submission queue and returns its position: the number of
    /// entries pushed so far, which the kernel's head reaches once it has taken this one.
    ///
    /// # Safety
    ///
    /// As [`io_uring::SubmissionQueue::push`]: the memory `entry` points to stays valid until
    /// its completion. Holding the table (`&mut self`, behind its lock) makes this the only
    /// `SubmissionQueue` of the ring.
    pub(super) unsafe fn push(
        &mut self,
        ring: &IoUring,
        entry: &squeue::Entry,
    ) -> Result<u64, squeue::PushError> {
        // SAFETY: the caller's promise, and the table lock (see above).
        unsafe { ring.submission_shared().push(entry) }?;
        self.pushed += 1;
        Ok(self.pushed)
    }

    /// How many entries pushed onto `ring`'s submission queue the kernel has not taken yet.
    pub(super) fn waiting(&self, ring: &IoUring) -> usize {
        // SAFETY: holding the table makes this the only `SubmissionQueue`; only its head and
        // tail are read.
        unsafe { ring.submission_shared() }.len()
    }

    /// Whether the kernel has taken the entry [`Table::push`] put at `position`.
    pub(super) fn taken(&self, ring: &IoUring, position: u64) -> bool {
        self.pushed - self.waiting(ring) as u64 >= position
    }

    /// Frees `index` and returns its memory, which the caller drops outside the lock.
    pub(super) fn release(&mut self, index: u32) -> Owned {
        let slot = &mut self.slots[index as usize];
        slot.state = SlotState::Free;
        self.free.push(index);
        std::mem::take(&mut slot.owned)
    }
}
