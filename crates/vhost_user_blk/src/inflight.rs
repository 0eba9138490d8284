//! vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a shared memory
//! region, kept by the frontend across backend restarts, that records which descriptor heads
//! the backend has taken from each ring and not yet put in the used ring.
//!
//! The frontend asks for a region with `GET_INFLIGHT_FD` (the backend creates a zeroed memfd
//! and says how large it is) and hands it back with `SET_INFLIGHT_FD` on every start,
//! including after the backend was killed and a new one accepted the reconnection. While a
//! ring runs, the device core records each pop and completion through [`InflightLog`] (see
//! `virtio_block::queue` for where). When a ring starts, [`QueueInflight::recover`] reads what
//! a previous backend left: the heads still marked are resubmitted, oldest first, before
//! anything new, and the ring's indices are rebuilt from the used ring and that count.
//!
//! # Layout (split rings, version 1)
//!
//! The region holds one area per queue, each [`queue_area_bytes`] long for the area's
//! `desc_num` (libvhost-user's size; a region libvhost-user made, where `desc_num` is the
//! frontend's queue size, maps the same way). The backend makes `desc_num` the largest ring
//! the device allows, which can exceed the queue size the frontend asked for: QEMU asks for
//! its `queue-size` but offers a virtio-mmio guest 1024 entries.
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | `features: u64` | 0 |
//! | 8 | `version: u16` | 1; 0 means "fresh, nothing to recover" |
//! | 10 | `desc_num: u16` | the queue size the region was made for |
//! | 12 | `last_batch_head: u16` | the head most recently being put in the used ring |
//! | 14 | `used_idx: u16` | the used index once that head's mark was cleared |
//! | 16 + 16·i | `inflight: u8`, `padding: [u8; 5]`, `next: u16`, `counter: u64` | head `i` |
//!
//! # What a crash can leave, and how recovery reads it
//!
//! A completion writes the used element, `last_batch_head`, then `used.idx` in the ring,
//! then clears the head's `inflight` byte, then the region's `used_idx`. If the ring's
//! `used.idx` differs from the region's `used_idx`, the crash came after the ring moved and
//! before the region caught up: `last_batch_head` completed, its mark is cleared. Every head
//! still marked was popped and never completed; resubmitting it re-runs the request (reads
//! and writes of a block device are idempotent; the guest has not seen a completion). The
//! next available index is the used index plus the number of heads marked: everything the
//! driver published up to there is either used or marked, and a head popped but not yet
//! marked when the backend died is simply popped again.
//!
//! # Trust
//!
//! The region is memory the frontend can write at any time. It is accessed only through
//! [`GuestMemory`]'s bounds-checked, single-access (atomic) accessors, never through Rust
//! references; a region that is too small, a `desc_num` that is not the queue size, a
//! marked head outside the ring, or an exhausted counter is an error ([`InflightError`])
//! that keeps the ring stopped, never a panic.
//! A region the backend creates is a memfd sealed against shrinking; one a frontend made
//! itself and truncates after handing it over can still fault the backend (`SIGBUS`), as
//! guest memory can.

use guestmem::{AccessError, BuildError, GuestMemory, PAGE_SIZE64};
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use thiserror::Error;
use virtio_block::{InflightLog, QueueState};

/// The region format this backend writes and reads.
pub const VERSION: u16 = 1;

/// Bytes of a queue area's header: `features`, `version`, `desc_num`, `last_batch_head`,
/// `used_idx`.
const HEADER_BYTES: u64 = 16;
/// Bytes of one descriptor's state: `inflight`, padding, `next`, `counter`.
const DESC_BYTES: u64 = 16;
/// Queue areas are rounded up to this (libvhost-user's `INFLIGHT_ALIGNMENT`).
const AREA_ALIGN: u64 = 64;
/// The largest split ring.
const MAX_QUEUE_SIZE: u16 = 32768;

const VERSION_OFFSET: u64 = 8;
const DESC_NUM_OFFSET: u64 = 10;
const LAST_BATCH_HEAD_OFFSET: u64 = 12;
const USED_IDX_OFFSET: u64 = 14;
const COUNTER_OFFSET: u64 = 8;

/// The size of one queue's area for a ring of `queue_size` entries: libvhost-user's formula
/// (`16 * queue_size + 2` rounded up to 64 bytes), which always holds the 16-byte header and
/// the descriptor states.
pub fn queue_area_bytes(queue_size: u16) -> u64 {
    (DESC_BYTES * u64::from(queue_size) + 2).next_multiple_of(AREA_ALIGN)
}

/// An inflight region could not be created, mapped or recovered from.
#[derive(Debug, Error)]
pub enum InflightError {
    /// The frontend asked for no queues, empty queues, or queues larger than a split ring.
    #[error("cannot track {num_queues} queues of {queue_size} entries")]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The memfd could not be created, sized or sealed.
    #[error("cannot create the inflight region")]
    Create(#[source] std::io::Error),
    /// The region the frontend passed is smaller than its queues need.
    #[error("inflight region of {mmap_size} bytes cannot hold {num_queues} queues of {queue_size}")]
    TooSmall {
        /// The size the frontend announced.
        mmap_size: u64,
        /// Queues it announced.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The region reaches past the end of its file: touching it would raise `SIGBUS`.
    #[error("inflight region ends at byte {end} of a file of {file_len} bytes")]
    PastEndOfFile {
        /// The file offset the region ends at.
        end: u64,
        /// The file's size.
        file_len: u64,
    },
    /// The region's file could not be inspected.
    #[error("cannot inspect the inflight region's file")]
    Stat(#[source] std::io::Error),
    /// The region could not be mapped (`mmap` refused).
    #[error("cannot map the inflight region")]
    Map(#[source] BuildError),
    /// The region's `desc_num` is not the queue size it was announced with.
    #[error("inflight area of queue {queue} is for {found} descriptors, expected {expected}")]
    DescNum {
        /// The queue.
        queue: u16,
        /// What the region says.
        found: u16,
        /// The announced queue size.
        expected: u16,
    },
    /// The ring is larger than the region tracks.
    #[error("queue {queue} has {ring_size} entries but its inflight area tracks {desc_num}")]
    RingSize {
        /// The queue.
        queue: u16,
        /// The ring's size.
        ring_size: u16,
        /// Descriptors the area tracks.
        desc_num: u16,
    },
    /// A head marked in flight is not one the ring can have.
    #[error("queue {queue}: head {head} is marked in flight but the ring has {ring_size} entries")]
    Head {
        /// The queue.
        queue: u16,
        /// The head.
        head: u16,
        /// The ring's size.
        ring_size: u16,
    },
    /// A marked head carries the largest counter: no later pop could be ordered after it.
    #[error("queue {queue}: inflight counter exhausted")]
    Counter {
        /// The queue.
        queue: u16,
    },
    /// The region (or the ring's used index) could not be accessed.
    #[error("queue {queue}: inaccessible inflight state")]
    Access {
        /// The queue.
        queue: u16,
        /// Why.
        #[source]
        source: AccessError,
    },
}

/// A mapped inflight region: one [`QueueInflight`] per queue it was made for.
#[derive(Debug)]
pub struct InflightRegion {
    file: File,
    mmap_size: u64,
    queue_size: u16,
    queues: Vec<Arc<QueueInflight>>,
}

impl InflightRegion {
    /// A fresh, zeroed region for `num_queues` rings of up to `queue_size` entries
    /// (`GET_INFLIGHT_FD`), in a memfd sealed against shrinking and growing, so that no one
    /// can make a mapped page vanish under the backend. Each area's header says
    /// `desc_num = queue_size`, which is how [`map`](Self::map) finds the layout again.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size)?;
        let mmap_size = u64::from(num_queues) * queue_area_bytes(queue_size);
        let fd = memfd_create(
            "vhost-user-blk-inflight",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(mmap_size.next_multiple_of(PAGE_SIZE64))
            .map_err(InflightError::Create)?;
        {
            use nix::fcntl::{FcntlArg, SealFlag, fcntl};
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
            fcntl(&file, FcntlArg::F_ADD_SEALS(seals))
                .map_err(|e| InflightError::Create(e.into()))?;
        }
        let region = Self::map(file, mmap_size, 0, num_queues, queue_size)?;
        // A new memfd reads as zeros; each area says how many descriptors it tracks, as
        // libvhost-user's does. `version` stays 0: the first start finds nothing to recover.
        for (index, queue) in region.queues.iter().enumerate() {
            queue
                .write_u16(DESC_NUM_OFFSET, queue_size)
                .map_err(|source| InflightError::Access {
                    queue: index as u16,
                    source,
                })?;
        }
        Ok(region)
    }

    /// Maps the region the frontend passes with `SET_INFLIGHT_FD`: `mmap_size` bytes at
    /// `mmap_offset` in `file`, for `num_queues` rings of `queue_size` entries.
    ///
    /// The areas are laid out for the `desc_num` the first area's header gives, which may be
    /// larger than `queue_size`: [`create`](Self::create) is asked for the frontend's queue
    /// size, but a virtio-mmio guest may pick a larger ring (see `VhostUserBlk`). A header
    /// that says 0 (a region zeroed by its frontend) means `queue_size`.
    pub fn map(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        use std::os::unix::fs::FileExt;
        check_shape(num_queues, queue_size)?;
        let file_len = file.metadata().map_err(InflightError::Stat)?.len();
        let past_end = |end: Option<u64>| InflightError::PastEndOfFile {
            end: end.unwrap_or(u64::MAX),
            file_len,
        };
        let header_end = mmap_offset.checked_add(HEADER_BYTES);
        if header_end.is_none_or(|end| end > file_len) {
            return Err(past_end(header_end));
        }
        let mut desc_num = [0u8; 2];
        file.read_exact_at(&mut desc_num, mmap_offset + DESC_NUM_OFFSET)
            .map_err(InflightError::Stat)?;
        let desc_num = match u16::from_le_bytes(desc_num) {
            0 => queue_size,
            n => n,
        };
        check_shape(num_queues, desc_num)?;
        let area = queue_area_bytes(desc_num);
        let needed = u64::from(num_queues) * area;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                mmap_size,
                num_queues,
                queue_size: desc_num,
            });
        }
        let end = mmap_offset.checked_add(needed);
        if end.is_none_or(|end| end > file_len) {
            return Err(past_end(end));
        }
        // Only what the queues need is mapped, and only that much is reachable: nothing past
        // it is accessed, so no page past the end of the file can fault.
        let memory = GuestMemory::builder()
            .file(0, needed, file.as_fd(), mmap_offset, true)
            .and_then(|builder| builder.build())
            .map_err(InflightError::Map)?;
        let queues = (0..num_queues)
            .map(|index| {
                Arc::new(QueueInflight {
                    memory: memory.clone(),
                    index,
                    base: u64::from(index) * area,
                    desc_num,
                    counter: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Self {
            file,
            mmap_size,
            queue_size: desc_num,
            queues,
        })
    }

    /// The region's file (a memfd for a region this backend created).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The region's size in bytes, as `GET_INFLIGHT_FD` reports it.
    pub fn mmap_size(&self) -> u64 {
        self.mmap_size
    }

    /// The number of descriptors each queue's area tracks.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s area, if the region has one for it. Rings past the region's queue
    /// count run untracked.
    pub fn queue(&self, index: usize) -> Option<&Arc<QueueInflight>> {
        self.queues.get(index)
    }
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Shape {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

/// What a ring starts from after [`QueueInflight::recover`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The ring's indices, rebuilt from the region and the used ring; `None` for a fresh
    /// region, where the base the frontend sent (`SET_VRING_BASE`) stands.
    pub state: Option<QueueState>,
    /// The heads a previous backend popped and never completed, oldest pop first.
    pub resubmit: Vec<u16>,
}

/// One queue's area of an [`InflightRegion`]: the [`InflightLog`] its ring records to.
#[derive(Debug)]
pub struct QueueInflight {
    memory: GuestMemory,
    index: u16,
    /// Offset of the area in the region.
    base: u64,
    /// Descriptors the area tracks (the queue size the region was made for).
    desc_num: u16,
    /// The counter the next pop gets.
    counter: AtomicU64,
}

impl QueueInflight {
    fn access(&self) -> impl Fn(AccessError) -> InflightError + '_ {
        move |source| InflightError::Access {
            queue: self.index,
            source,
        }
    }

    fn read_u16(&self, offset: u64) -> Result<u16, AccessError> {
        self.memory
            .read_atomic_u16(self.base + offset)
            .map(u16::from_le)
    }

    fn write_u16(&self, offset: u64, value: u16) -> Result<(), AccessError> {
        self.memory
            .write_atomic_u16(self.base + offset, value.to_le())
    }

    fn desc(&self, head: u16) -> u64 {
        self.base + HEADER_BYTES + DESC_BYTES * u64::from(head)
    }

    fn is_inflight(&self, head: u16) -> Result<bool, AccessError> {
        Ok(self.memory.read_atomic_u8(self.desc(head))? != 0)
    }

    fn set_inflight(&self, head: u16, inflight: bool) -> Result<(), AccessError> {
        self.memory
            .write_atomic_u8(self.desc(head), u8::from(inflight))
    }

    fn counter_of(&self, head: u16) -> Result<u64, AccessError> {
        self.memory
            .read_atomic_u64(self.desc(head) + COUNTER_OFFSET)
            .map(u64::from_le)
    }

    /// Reads what a previous backend left for a ring of `ring_size` entries whose used ring
    /// shows `used_idx`, repairs the one completion a crash can leave half-recorded, and
    /// says where the ring resumes and what to resubmit. Call it when the ring starts, with
    /// nothing of this backend's in flight on it. Marks a fresh area (version 0) as version
    /// 1 with nothing in flight.
    pub fn recover(&self, ring_size: u16, used_idx: u16) -> Result<Recovery, InflightError> {
        let queue = self.index;
        let access = self.access();
        let found = self.read_u16(DESC_NUM_OFFSET).map_err(&access)?;
        if found != self.desc_num {
            return Err(InflightError::DescNum {
                queue,
                found,
                expected: self.desc_num,
            });
        }
        if ring_size > self.desc_num {
            return Err(InflightError::RingSize {
                queue,
                ring_size,
                desc_num: self.desc_num,
            });
        }
        let version = self.read_u16(VERSION_OFFSET).map_err(&access)?;
        if version == 0 {
            // A region the frontend just obtained, or one it zeroed for a device reset:
            // nothing was in flight. Start from a clean slate.
            for head in 0..self.desc_num {
                self.set_inflight(head, false).map_err(&access)?;
            }
            self.write_u16(USED_IDX_OFFSET, used_idx).map_err(&access)?;
            fence(Ordering::Release);
            self.write_u16(VERSION_OFFSET, VERSION).map_err(&access)?;
            self.counter.store(0, Ordering::Relaxed);
            return Ok(Recovery {
                state: None,
                resubmit: Vec::new(),
            });
        }
        let logged_used = self.read_u16(USED_IDX_OFFSET).map_err(&access)?;
        if logged_used != used_idx {
            // The used index moved and the backend died before clearing the mark of the head
            // it was completing. A head outside the area was never marked (a malformed
            // chain returned at once).
            let last = self.read_u16(LAST_BATCH_HEAD_OFFSET).map_err(&access)?;
            if last < self.desc_num {
                self.set_inflight(last, false).map_err(&access)?;
            }
            fence(Ordering::Release);
            self.write_u16(USED_IDX_OFFSET, used_idx).map_err(&access)?;
        }
        let mut marked = Vec::new();
        for head in 0..self.desc_num {
            if !self.is_inflight(head).map_err(&access)? {
                continue;
            }
            if head >= ring_size {
                return Err(InflightError::Head {
                    queue,
                    head,
                    ring_size,
                });
            }
            marked.push((self.counter_of(head).map_err(&access)?, head));
        }
        // Oldest pop first; equal counters (only a corrupt region has them) by head.
        marked.sort_unstable();
        let next_counter = match marked.last() {
            Some(&(counter, _)) => counter
                .checked_add(1)
                .ok_or(InflightError::Counter { queue })?,
            None => 0,
        };
        self.counter.store(next_counter, Ordering::Relaxed);
        // At most `ring_size` heads (each below it, each once), so this cannot wrap past a
        // ring's worth.
        let in_flight = marked.len() as u16;
        Ok(Recovery {
            state: Some(QueueState {
                next_avail: used_idx.wrapping_add(in_flight),
                next_used: used_idx,
            }),
            resubmit: marked.into_iter().map(|(_, head)| head).collect(),
        })
    }
}

impl InflightLog for QueueInflight {
    fn popped(&self, head: u16) -> bool {
        if head >= self.desc_num {
            return false;
        }
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        if self
            .memory
            .write_atomic_u64(self.desc(head) + COUNTER_OFFSET, counter.to_le())
            .is_err()
        {
            return false;
        }
        // The counter must be in place before the mark that makes recovery read it.
        fence(Ordering::Release);
        self.set_inflight(head, true).is_ok()
    }

    fn before_used(&self, head: u16) -> bool {
        self.write_u16(LAST_BATCH_HEAD_OFFSET, head).is_ok()
    }

    fn after_used(&self, head: u16, used_idx: u16) -> bool {
        // The ring's used index (stored just before this call) goes first: a mark cleared
        // while the ring still showed the old index would lose the request.
        fence(Ordering::Release);
        if head < self.desc_num && self.set_inflight(head, false).is_err() {
            return false;
        }
        fence(Ordering::Release);
        self.write_u16(USED_IDX_OFFSET, used_idx).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const QUEUE_SIZE: u16 = 8;

    /// A second mapping of the same memfd: what a new backend process sees.
    fn reopen(region: &InflightRegion) -> InflightRegion {
        InflightRegion::map(
            region.file().try_clone().unwrap(),
            region.mmap_size(),
            0,
            region.queues.len() as u16,
            region.queue_size(),
        )
        .unwrap()
    }

    #[test]
    fn a_fresh_region_has_the_spec_layout() {
        let region = InflightRegion::create(2, 128).unwrap();
        // libvhost-user's size: (16 * 128 + 2) rounded up to 64, per queue.
        assert_eq!(region.mmap_size(), 2 * 2112);
        assert_eq!(queue_area_bytes(1), 64);
        assert_eq!(queue_area_bytes(4), 128);
        let mut bytes = vec![0u8; region.mmap_size() as usize];
        region.file().read_exact_at(&mut bytes, 0).unwrap();
        for area in [0, 2112] {
            assert_eq!(
                &bytes[area + 10..area + 12],
                &128u16.to_le_bytes(),
                "desc_num"
            );
            assert_eq!(
                &bytes[area + 8..area + 10],
                &[0, 0],
                "version 0 until started"
            );
        }
        let queue = region.queue(1).unwrap();
        assert_eq!(
            queue.recover(128, 7).unwrap(),
            Recovery {
                state: None,
                resubmit: vec![]
            }
        );
        region.file().read_exact_at(&mut bytes, 0).unwrap();
        assert_eq!(
            &bytes[2112 + 8..2112 + 10],
            &1u16.to_le_bytes(),
            "version 1"
        );
        assert_eq!(
            &bytes[2112 + 14..2112 + 16],
            &7u16.to_le_bytes(),
            "used_idx"
        );
    }

    /// A simulated crash: heads popped, some completed, the backend gone. A new backend over
    /// the same region resubmits exactly the unfinished heads, in the order they were popped,
    /// and resumes the available ring after them.
    #[test]
    fn a_new_backend_resubmits_exactly_the_unfinished_heads_in_order() {
        let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let queue = region.queue(0).unwrap();
        queue.recover(QUEUE_SIZE, 0).unwrap();
        // Popped in this order; 5 and 1 complete (out of order), 7, 2, 4 do not.
        for head in [5, 7, 2, 1, 4] {
            assert!(queue.popped(head));
        }
        let mut used = 0u16;
        for head in [1, 5] {
            assert!(queue.before_used(head));
            used += 1;
            assert!(queue.after_used(head, used));
        }
        let restarted = reopen(&region);
        let recovery = restarted
            .queue(0)
            .unwrap()
            .recover(QUEUE_SIZE, used)
            .unwrap();
        assert_eq!(recovery.resubmit, [7, 2, 4]);
        assert_eq!(
            recovery.state,
            Some(QueueState {
                next_avail: 5,
                next_used: 2
            })
        );
        // New pops are ordered after the resubmitted ones, across another restart.
        let queue = restarted.queue(0).unwrap();
        assert!(queue.popped(0));
        let again = reopen(&restarted)
            .queue(0)
            .unwrap()
            .recover(QUEUE_SIZE, used)
            .unwrap();
        assert_eq!(again.resubmit, [7, 2, 4, 0]);
    }

    /// A crash between each step of a completion: the head is resubmitted exactly when the
    /// used ring does not show it yet.
    #[test]
    fn a_crash_at_any_step_of_a_completion_is_recovered() {
        // The steps of completing head 3 (ring used index 0 -> 1), and whether the ring's
        // used index had moved by then.
        for crash_after in 0..=4 {
            let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
            let queue = region.queue(0).unwrap();
            queue.recover(QUEUE_SIZE, 0).unwrap();
            assert!(queue.popped(6));
            assert!(queue.popped(3));
            let mut ring_used = 0;
            let steps: [&dyn Fn(&mut u16); 4] = [
                &|_| assert!(queue.before_used(3)),
                &|ring_used| *ring_used = 1,
                &|_| queue.set_inflight(3, false).unwrap(),
                &|_| queue.write_u16(USED_IDX_OFFSET, 1).unwrap(),
            ];
            for step in steps.iter().take(crash_after) {
                step(&mut ring_used);
            }
            let recovery = reopen(&region)
                .queue(0)
                .unwrap()
                .recover(QUEUE_SIZE, ring_used)
                .unwrap();
            let expected: &[u16] = if ring_used == 0 { &[6, 3] } else { &[6] };
            assert_eq!(
                recovery.resubmit, expected,
                "crash after step {crash_after}"
            );
            assert_eq!(
                recovery.state.unwrap().next_avail,
                2,
                "both heads were taken from the available ring"
            );
        }
    }

    fn corrupt(edit: impl FnOnce(&File)) -> InflightError {
        let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let queue = region.queue(0).unwrap();
        queue.recover(QUEUE_SIZE, 0).unwrap();
        assert!(queue.popped(1));
        edit(region.file());
        region
            .queue(0)
            .unwrap()
            .recover(QUEUE_SIZE, 0)
            .expect_err("a corrupt region must be refused")
    }

    #[test]
    fn a_corrupt_region_is_an_error() {
        let desc = |head: u64| 16 + 16 * head;
        assert!(matches!(
            corrupt(|f| f.write_all_at(&9u16.to_le_bytes(), 10).unwrap()),
            InflightError::DescNum { found: 9, .. }
        ));
        // A ring larger than the area.
        let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        assert!(matches!(
            region.queue(0).unwrap().recover(2 * QUEUE_SIZE, 0),
            Err(InflightError::RingSize { .. })
        ));
        // A head marked that a smaller ring cannot have.
        let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        region.queue(0).unwrap().recover(QUEUE_SIZE, 0).unwrap();
        region.file().write_all_at(&[1], desc(7)).unwrap();
        assert!(matches!(
            region.queue(0).unwrap().recover(4, 0),
            Err(InflightError::Head { head: 7, .. })
        ));
        assert!(matches!(
            corrupt(|f| f
                .write_all_at(&u64::MAX.to_le_bytes(), desc(1) + 8)
                .unwrap()),
            InflightError::Counter { .. }
        ));
        // Garbage in `last_batch_head` with a mismatched used index is not an error: that
        // head was never marked.
        let region = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        region.queue(0).unwrap().recover(QUEUE_SIZE, 0).unwrap();
        region
            .file()
            .write_all_at(&0xffffu16.to_le_bytes(), 12)
            .unwrap();
        assert!(region.queue(0).unwrap().recover(QUEUE_SIZE, 3).is_ok());
        // Heads outside the area are refused by the log, not written.
        assert!(!region.queue(0).unwrap().popped(QUEUE_SIZE));
    }

    /// QEMU asks for its queue size (128) and hands the region back with the same, but a
    /// virtio-mmio guest may run a 1024-entry ring: the layout comes from the region's own
    /// header, so the larger ring is tracked.
    #[test]
    fn the_layout_comes_from_the_region_not_the_frontends_queue_size() {
        let region = InflightRegion::create(2, 1024).unwrap();
        let mapped = InflightRegion::map(
            region.file().try_clone().unwrap(),
            region.mmap_size(),
            0,
            2,
            128,
        )
        .unwrap();
        assert_eq!(mapped.queue_size(), 1024);
        let queue = mapped.queue(1).unwrap();
        queue.recover(1024, 0).unwrap();
        assert!(queue.popped(1000));
        let again = InflightRegion::map(
            region.file().try_clone().unwrap(),
            region.mmap_size(),
            0,
            2,
            128,
        )
        .unwrap();
        assert_eq!(
            again.queue(1).unwrap().recover(1024, 0).unwrap().resubmit,
            [1000]
        );
        assert!(
            again
                .queue(0)
                .unwrap()
                .recover(1024, 0)
                .unwrap()
                .resubmit
                .is_empty()
        );
    }

    #[test]
    fn bad_shapes_and_short_files_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 8),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            InflightRegion::create(1, 0),
            Err(InflightError::Shape { .. })
        ));
        let region = InflightRegion::create(1, 128).unwrap();
        let file = || region.file().try_clone().unwrap();
        assert!(matches!(
            InflightRegion::map(file(), 100, 0, 1, 128),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::map(file(), 1 << 20, 0, 200, 128),
            Err(InflightError::PastEndOfFile { .. })
        ));
        assert!(matches!(
            InflightRegion::map(file(), 2112 * 4, 0, 4, 128),
            Err(InflightError::PastEndOfFile { .. })
        ));
        assert!(matches!(
            InflightRegion::map(file(), 2112, u64::MAX - 10, 1, 128),
            Err(InflightError::PastEndOfFile { .. })
        ));
        // The offset needs no alignment: the areas start exactly there.
        let zeroed = InflightRegion::map(file(), 64, 100, 1, 1).expect("unaligned offset");
        assert_eq!(zeroed.queue(0).unwrap().desc_num, 1);
    }
}
