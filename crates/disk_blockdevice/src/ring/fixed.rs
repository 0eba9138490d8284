//! Guest memory registered with the ring as fixed buffers.

use super::{Ring, RingError};
use io_uring::IoUring;
use request_buffers::{GuestMemory, IoBuffer};
use std::io;
use std::sync::atomic::Ordering;

/// The largest buffer the kernel registers (`IORING_REGISTER_BUFFERS` refuses larger ones):
/// guest memory regions are registered in pieces of at most this size.
pub(super) const FIXED_BUFFER_MAX: usize = 1 << 30;

/// The most buffers a ring's table holds (the kernel's `IORING_MAX_REG_BUFFERS`): pieces
/// beyond (guest RAM past 16 TiB) are not registered, and their requests go the plain way.
pub(super) const FIXED_BUFFERS_MAX: usize = 1 << 14;

/// The most bytes one read or write transfers (the kernel's `MAX_RW_COUNT`). A plain
/// request beyond transfers part and is continued; a vectored fixed one fails, so larger
/// requests go the plain way.
pub(super) const MAX_RW_COUNT: usize = 0x7fff_f000;

/// An empty slot of the kernel's buffer table (`NULL`, 0), which names no memory.
pub(super) const EMPTY_SLOT: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// The host address ranges of the writable regions of `memory` in pieces of at most
/// [`FIXED_BUFFER_MAX`] bytes, sorted, at most [`FIXED_BUFFERS_MAX`] of them. Read-only
/// regions stay out: the kernel pins registered memory for writing.
pub(super) fn fixed_buffer_ranges(memory: &GuestMemory) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = memory
        .host_regions()
        .filter(|&(_, _, writable)| writable)
        .flat_map(|(_, host, _)| {
            let (start, end) = (host.as_ptr() as usize, host.as_ptr() as usize + host.len());
            (start..end)
                .step_by(FIXED_BUFFER_MAX)
                .map(move |piece| (piece, end.min(piece + FIXED_BUFFER_MAX)))
        })
        .collect();
    ranges.sort_unstable();
    ranges.truncate(FIXED_BUFFERS_MAX);
    ranges
}

/// Figures of a disk's fixed buffers; see
/// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedBufferStats {
    /// Bytes of guest memory registered with the ring now (0: none, or registration failed).
    pub registered_bytes: u64,
    /// Read and write requests (or continuations of short transfers) submitted with a
    /// fixed buffer since the disk was opened.
    pub requests: u64,
    /// Whether the kernel takes several pieces of a buffer in one request
    /// (`IORING_OP_READV_FIXED`, Linux 6.15); before, only requests whose memory is one
    /// host-contiguous piece use fixed buffers.
    pub vectored: bool,
}

/// Guest memory registered with the ring (`IORING_REGISTER_BUFFERS`): a request whose
/// buffers all lie in one registered piece names it (`IORING_OP_READ_FIXED` and friends),
/// and the kernel skips pinning and unpinning its pages.
#[derive(Debug, Default)]
pub(super) struct FixedBuffers {
    /// The host address ranges `start..end` of the registered buffers, sorted and
    /// non-overlapping; a buffer's index in the ring is its position here.
    pub(super) ranges: Vec<(usize, usize)>,
    /// The kernel has `IORING_OP_READV_FIXED` and `IORING_OP_WRITEV_FIXED` (Linux 6.15), so
    /// requests of several pieces can use fixed buffers too.
    pub(super) vectored: bool,
    /// Keeps the registered memory mapped while the kernel may use it.
    pub(super) memory: Option<GuestMemory>,
    /// Requests submitted with a fixed buffer.
    pub(super) requests: u64,
    /// Entries of the kernel's buffer table (registered or empty), 0 while it has none.
    pub(super) table_len: u32,
}

impl FixedBuffers {
    /// Makes the kernel's table hold `ranges` (in its first slots; the rest empty), with
    /// `outstanding` requests in flight. On error nothing is registered any more (the
    /// caller forgets its ranges): the kernel never keeps a slot the table does not know.
    pub(super) fn replace(
        &mut self,
        ring: &IoUring,
        ranges: &[(usize, usize)],
        outstanding: usize,
    ) -> io::Result<()> {
        let submitter = ring.submitter();
        let iovec = |slot: usize| match ranges.get(slot) {
            Some(&(start, end)) => libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: end - start,
            },
            None => EMPTY_SLOT,
        };
        let table_len = self.table_len as usize;
        if table_len > 0 && ranges.len() <= table_len {
            // Slot by slot, so that a failure is known where it happened (the kernel
            // reports a partial update as the count done, which the crate turns into
            // success).
            for slot in 0..table_len {
                // Each non-empty iovec is a piece of a region of the memory the caller
                // keeps mapped (the table's clone) while it is registered. Requests already
                // submitted with the entry this replaces hold their own reference in the
                // kernel, and their memory is kept alive by their slots (`LockedPages`).
                // SAFETY: the memory outlives its registration (above); the guest may change
                // it at any time, which the kernel tolerates like any user buffer.
                let updated =
                    unsafe { submitter.register_buffers_update(slot as u32, &[iovec(slot)], None) };
                match updated {
                    Ok(()) if slot + 1 == table_len => return Ok(()),
                    Ok(()) => {}
                    // No updates (before Linux 5.13): a new table instead, below.
                    Err(e) if slot == 0 && e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => {
                        self.clear(ring);
                        return Err(e);
                    }
                }
            }
        }
        if table_len > 0 {
            // Unregistering waits for every request in flight before Linux 6.13.
            if outstanding > 0 {
                self.clear(ring);
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if let Err(e) = submitter.unregister_buffers() {
                self.clear(ring);
                return Err(e);
            }
            self.table_len = 0;
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let len = ranges
            .len()
            .next_power_of_two()
            .clamp(64, FIXED_BUFFERS_MAX);
        let iovecs: Vec<libc::iovec> = (0..len).map(iovec).collect();
        // SAFETY: as above; no request uses the new table yet.
        let registered = match unsafe { submitter.register_buffers(&iovecs) } {
            Ok(()) => len,
            // Kernels before 5.13 refuse empty slots: a table of exactly the pieces.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) && len > ranges.len() => {
                // SAFETY: as above.
                unsafe { submitter.register_buffers(&iovecs[..ranges.len()]) }?;
                ranges.len()
            }
            Err(e) => return Err(e),
        };
        self.table_len = registered as u32;
        Ok(())
    }

    /// Empties every slot of the kernel's table after a failed change, or, where a slot
    /// cannot be emptied, drops the table.
    pub(super) fn clear(&mut self, ring: &IoUring) {
        let submitter = ring.submitter();
        for slot in 0..self.table_len {
            // SAFETY: an empty slot names no memory.
            if unsafe { submitter.register_buffers_update(slot, &[EMPTY_SLOT], None) }.is_err() {
                // Unregistering may wait for requests in flight (before 6.13), but it is
                // the only way left to make the kernel let go of the memory.
                if submitter.unregister_buffers().is_ok() {
                    self.table_len = 0;
                }
                return;
            }
        }
    }

    /// The index of the registered buffer that holds every byte of `iovecs`, if there is
    /// one and the kernel can take that many pieces from it.
    pub(super) fn index_of(&self, iovecs: &[IoBuffer]) -> Option<u16> {
        let first = iovecs.first()?;
        if iovecs.len() > 1 && !self.vectored {
            return None;
        }
        let total = iovecs
            .iter()
            .try_fold(0usize, |total, buffer| total.checked_add(buffer.len()))?;
        if total > MAX_RW_COUNT {
            return None;
        }
        let start = first.as_ptr() as usize;
        let index = self.ranges.partition_point(|&(_, end)| end <= start);
        let &(low, high) = self.ranges.get(index)?;
        let inside = |buffer: &IoBuffer| {
            let address = buffer.as_ptr() as usize;
            address >= low
                && address
                    .checked_add(buffer.len())
                    .is_some_and(|end| end <= high)
        };
        iovecs
            .iter()
            .all(inside)
            .then(|| u16::try_from(index).ok())
            .flatten()
    }
}

impl Ring {
    /// Registers the writable regions of `memory` with the ring as fixed buffers (in pieces
    /// of at most 1 GiB, at most [`FIXED_BUFFERS_MAX`] of them), replacing any earlier
    /// registration; an empty `memory` just drops it. See
    /// [`BlockDeviceDisk::register_fixed_buffers`](crate::BlockDeviceDisk::register_fixed_buffers).
    ///
    /// The kernel's buffer table is registered once, with room to spare, and later changed
    /// in place, slot by slot (`IORING_REGISTER_BUFFERS_UPDATE`, Linux 5.13): unregistering
    /// a table waits for every request in flight on kernels before 6.13, an update never
    /// does. A new table (memory of more pieces than the table holds, or a kernel without
    /// updates) is only made while no request is in flight (`EBUSY` until then). On any
    /// error nothing stays registered, so the table and what the kernel holds never differ.
    pub(crate) fn register_memory(&self, memory: &GuestMemory) -> Result<(), RingError> {
        let shared = &*self.shared;
        if let Some(owner) = &shared.owner {
            // With `SINGLE_ISSUER`, only the submitter may register once the ring is
            // enabled (the kernel says `EEXIST`).
            if owner.enabled.load(Ordering::SeqCst) && !shared.on_owner_thread() {
                return Err(RingError::OwnedElsewhere);
            }
        }
        let ranges = fixed_buffer_ranges(memory);
        let mut table = shared.table.lock();
        if table.fixed.table_len > 0 {
            // Entries queued but not submitted name buffers by index: let the kernel take
            // them (and their buffers' references) before the slots change. One that stays
            // queued (a failed submission) may fail with `EFAULT`, which is retried without
            // a fixed buffer.
            if shared.owner.is_none() || shared.on_owner_thread() {
                let _ = shared.ring.submit();
            }
        }
        let outstanding = table.outstanding;
        let result = table.fixed.replace(&shared.ring, &ranges, outstanding);
        // The old memory (maybe all of guest RAM, or an external keep-alive) is released
        // after the lock.
        let old = match result {
            Ok(()) => {
                let memory = (!ranges.is_empty()).then(|| memory.clone());
                table.fixed.ranges = ranges;
                std::mem::replace(&mut table.fixed.memory, memory)
            }
            Err(_) => {
                table.fixed.ranges.clear();
                table.fixed.memory.take()
            }
        };
        drop(table);
        drop(old);
        result.map_err(RingError::RegisterMemory)
    }

    /// See [`BlockDeviceDisk::fixed_buffer_stats`](crate::BlockDeviceDisk::fixed_buffer_stats).
    pub(crate) fn fixed_buffer_stats(&self) -> FixedBufferStats {
        let table = self.shared.table.lock();
        FixedBufferStats {
            registered_bytes: table
                .fixed
                .ranges
                .iter()
                .map(|&(start, end)| (end - start) as u64)
                .sum(),
            requests: table.fixed.requests,
            vectored: table.fixed.vectored,
        }
    }
}
