//! The split virtqueue, device side.
//!
//! # Memory ordering
//!
//! The driver and the device share the rings with no lock, so the order in which each side's
//! accesses become visible to the other is the protocol. Descriptors and used elements are
//! copied with plain accesses (the protocol gives each to one side at a time). The 16-bit
//! fields the other side may be writing at the same moment (`avail.flags`, `avail.idx`, the available
//! ring entries, `used_event`, `avail_event`, `used.idx`) go through
//! [`GuestMemory::read_atomic_u16`] and [`GuestMemory::write_atomic_u16`]: one relaxed atomic
//! access each, so a concurrent update is seen whole or not at all. A byte copy of a `u16`
//! only happens to be one load when the compiler chooses so; a torn index is the bug of
//! rust-vmm vm-memory #93. Those accessors also refuse an index that is not 2-byte aligned in
//! guest or host memory (only an `external` region can put an aligned guest address at an
//! odd host one), which the queue reports as ring memory it cannot use.
//!
//! `std::sync::atomic::fence` orders the accesses, as `virt_rmb`/`virt_wmb`/`virt_mb` do
//! around `READ_ONCE`/`WRITE_ONCE` in Linux's `virtio_ring`: a relaxed load followed by an
//! acquire fence acquires, a release fence followed by a relaxed store releases. On x86 the
//! acquire and release fences only stop the compiler from reordering (the hardware keeps
//! loads and stores in order), and the sequentially consistent fence is an `mfence`; on
//! weaker machines they are the barriers the spec asks for. A value the device finds
//! implausible is a driver error, never trusted.
//!
//! - **Popping** (`pop`): read `avail.idx`, then an *acquire* fence, then the ring entry and
//!   the descriptors. The driver writes descriptors and the ring entry before it publishes the
//!   index (with a write barrier), so after the fence the device sees them complete.
//! - **Publishing a completion** (`add_used`): write the used element, then a *release* fence,
//!   then `used.idx`. Everything the device wrote for the request (the data of a read, the
//!   status byte) is ordered before the index the driver polls.
//! - **Deciding to interrupt** (`needs_notification`): a *sequentially consistent* fence
//!   between the store of `used.idx` and the load of `used_event` (or `avail.flags`). Without
//!   it the load could be satisfied before the store is visible, the driver could read the
//!   old index, decide to wait and set `used_event`, and both sides would sleep: a lost
//!   interrupt. The driver puts the mirror-image barrier between its `used_event` store and
//!   its `used.idx` load.
//! - **Re-arming notifications** (`enable_notification`): under `EVENT_IDX`, write
//!   `avail_event`, a *sequentially consistent* fence, then read `avail.idx` again: a
//!   request published between the last pop and the `avail_event` store would otherwise be
//!   left without a kick.
//!
//! # Inflight log
//!
//! A transport whose device can die without the driver noticing (a vhost-user backend killed
//! and restarted while the frontend keeps the guest running) gives the queue an
//! [`InflightLog`]: a record, in memory that outlives the device, of the heads the device
//! has popped and not yet put in the used ring. The queue calls it at the points the
//! vhost-user specification's "Inflight I/O tracking" fixes, so that a crash at any instant
//! leaves a record a new device can recover from:
//!
//! - `pop`: once a chain is read, [`InflightLog::popped`] marks its head.
//! - `add_used`: write the used element, [`InflightLog::before_used`] (the head of this
//!   "batch"), a *release* fence, `used.idx`, then [`InflightLog::after_used`] (clear the
//!   head's mark, then record the new used index). A crash after `used.idx` moved but before
//!   the log caught up shows as a used index in the ring one past the log's, and the head
//!   named by `before_used` is the one that completed.
//!
//! Heads to resubmit after such a recovery ([`SplitQueue::set_inflight`]) are popped before
//! anything new from the available ring, without moving `next_avail` (they were counted
//! when the previous device popped them).

use crate::descriptor::{ChainError, DescriptorChain, read_chain};
use crate::spec::ring::{AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE};
use guestmem::{AccessError, GuestMemory};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use thiserror::Error;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Where a queue lives and whether the driver made it ready: what the transport (MMIO
/// registers, or a vhost-user peer) configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// The largest size the device supports (`QueueNumMax`).
    pub max_size: u16,
    /// The size the driver chose (`QueueNum`); defaults to `max_size`.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the driver area (available ring).
    pub avail_ring: u64,
    /// Guest physical address of the device area (used ring).
    pub used_ring: u64,
}

impl QueueConfig {
    /// An unconfigured queue of at most `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    /// Whether `size` is one a split queue of this queue's maximum may have: a power of two
    /// no larger than `max_size`.
    pub fn is_valid_size(&self, size: u16) -> bool {
        size.is_power_of_two() && size <= self.max_size && size <= MAX_QUEUE_SIZE
    }
}

/// How far the device has got through a queue: what a snapshot saves and a restore resumes
/// from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The next available-ring index the device will read.
    pub next_avail: u16,
    /// The next used-ring index the device will write.
    pub next_used: u16,
}

/// An element of the used ring.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct UsedElement {
    /// The head index of the chain.
    pub id: U32,
    /// Bytes the device wrote into the chain's buffers.
    pub len: U32,
}

/// A queue failed in a way only a reset can recover from.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The queue size is not a power of two up to the maximum.
    #[error("queue size {size} is not a power of two up to {max_size}")]
    InvalidSize {
        /// The size the driver wrote.
        size: u16,
        /// The largest size allowed.
        max_size: u16,
    },
    /// A ring is not aligned as the spec requires (16, 2 and 4 bytes).
    #[error("{ring} at {gpa:#x} is misaligned")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        gpa: u64,
    },
    /// A ring is not (entirely) in guest memory, the used ring is not writable, or a ring
    /// index cannot be accessed with one aligned 16-bit access.
    #[error("{ring} is not usable guest memory")]
    RingMemory {
        /// Which ring.
        ring: &'static str,
        /// Why.
        #[source]
        source: AccessError,
    },
    /// The driver moved `avail.idx` more than a queue size past what the device has seen:
    /// it cannot have that many buffers outstanding.
    #[error("available index jumped from {next_avail} to {avail_idx} in a queue of {size}")]
    AvailIndexJump {
        /// The device's next index.
        next_avail: u16,
        /// What the driver published.
        avail_idx: u16,
        /// The queue size.
        size: u16,
    },
    /// The inflight log could not record a head (see [`InflightLog`]).
    #[error("the inflight log cannot record head {head}")]
    InflightLog {
        /// The head index.
        head: u16,
    },
    /// A popped chain is malformed. Its head has been returned with length 0.
    #[error("malformed descriptor chain at head {head}")]
    Chain {
        /// The head index.
        head: u16,
        /// What is wrong with it.
        #[source]
        source: ChainError,
    },
}

/// A record of the heads the device holds, kept where it survives the device (vhost-user's
/// inflight region). See the module documentation for when the queue calls each method.
///
/// Each returns `false` if it could not record `head` (outside the log): the queue then
/// reports [`QueueError::InflightLog`] and the device needs a reset.
pub trait InflightLog: Send + Sync + fmt::Debug {
    /// `head` was popped from the available ring: the device holds it now.
    fn popped(&self, head: u16) -> bool;

    /// `head` is about to go into the used ring; `used.idx` has not moved yet. Called for
    /// every used element, also for heads `popped` never saw (a malformed chain).
    fn before_used(&self, head: u16) -> bool;

    /// `head` is in the used ring and `used.idx` is now `used_idx`.
    fn after_used(&self, head: u16, used_idx: u16) -> bool;
}

/// A live split virtqueue: the rings in guest memory plus the device's indices.
#[derive(Debug)]
pub struct SplitQueue {
    mem: GuestMemory,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    indirect: bool,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// `next_used` when the device last decided whether to interrupt, for `vring_need_event`.
    signalled_used: u16,
    /// Where popped and completed heads are recorded, if anywhere.
    inflight: Option<Arc<dyn InflightLog>>,
    /// Heads a previous device popped and never completed, to serve before new ones.
    resubmit: VecDeque<u16>,
}

impl SplitQueue {
    /// Brings the queue described by `config` live over `mem`, resuming from `state`.
    ///
    /// Checks the size, the rings' alignment, and that the three areas lie in guest memory
    /// (the used ring writable), so that a later ring access can only fail if the memory map
    /// changes.
    pub fn new(
        mem: GuestMemory,
        config: &QueueConfig,
        state: QueueState,
        indirect: bool,
        event_idx: bool,
    ) -> Result<Self, QueueError> {
        let size = config.size;
        if !config.is_valid_size(size) {
            return Err(QueueError::InvalidSize {
                size,
                max_size: config.max_size,
            });
        }
        let n = u64::from(size);
        let areas = [
            ("descriptor table", config.desc_table, 16, 16 * n, false),
            ("available ring", config.avail_ring, 2, 6 + 2 * n, false),
            ("used ring", config.used_ring, 4, 6 + 8 * n, true),
        ];
        for (ring, gpa, align, len, write) in areas {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned { ring, gpa });
            }
            mem.check_range(gpa, len as usize, write)
                .map_err(|source| QueueError::RingMemory { ring, source })?;
        }
        // The indices must be reachable with single 16-bit accesses (see the module docs);
        // better to refuse the queue now than to fail on its first request.
        for (ring, gpa) in [
            ("available ring", config.avail_ring + 2),
            ("used ring", config.used_ring + 2),
        ] {
            mem.read_atomic_u16(gpa)
                .map_err(|source| QueueError::RingMemory { ring, source })?;
        }
        Ok(Self {
            mem,
            size,
            desc_table: config.desc_table,
            avail_ring: config.avail_ring,
            used_ring: config.used_ring,
            indirect,
            event_idx,
            next_avail: state.next_avail,
            next_used: state.next_used,
            signalled_used: state.next_used,
            inflight: None,
            resubmit: VecDeque::new(),
        })
    }

    /// Records popped and completed heads in `log` from now on, and serves `resubmit` (heads
    /// a previous device popped and never completed, oldest first) before anything new in
    /// the available ring. The state the queue was created with must already count the
    /// resubmitted heads as popped (`next_avail` = used index + their number), as vhost-user
    /// recovery computes it.
    pub fn set_inflight(&mut self, log: Arc<dyn InflightLog>, resubmit: Vec<u16>) {
        self.inflight = Some(log);
        self.resubmit = resubmit.into();
    }

    /// Heads still waiting to be resubmitted.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device's indices.
    pub fn state(&self) -> QueueState {
        QueueState {
            next_avail: self.next_avail,
            next_used: self.next_used,
        }
    }

    /// The guest memory the rings live in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn ring_error(ring: &'static str) -> impl FnOnce(AccessError) -> QueueError {
        move |source| QueueError::RingMemory { ring, source }
    }

    /// Reads a 16-bit little-endian ring field the driver may be updating right now.
    fn read_index(&self, gpa: u64, ring: &'static str) -> Result<u16, QueueError> {
        self.mem
            .read_atomic_u16(gpa)
            .map(u16::from_le)
            .map_err(Self::ring_error(ring))
    }

    /// Writes a 16-bit little-endian ring field the driver may be reading right now.
    fn write_index(&self, gpa: u64, value: u16) -> Result<(), QueueError> {
        self.mem
            .write_atomic_u16(gpa, value.to_le())
            .map_err(Self::ring_error("used ring"))
    }

    fn avail_idx(&self) -> Result<u16, QueueError> {
        self.read_index(self.avail_ring + 2, "available ring")
    }

    /// Pops the next available chain, or `None` if the driver has published nothing new.
    ///
    /// On [`QueueError::Chain`] the head has been consumed and already returned to the used
    /// ring with length 0, so no descriptor is lost; the caller should still mark the device
    /// as needing a reset.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        if let Some(head) = self.resubmit.pop_front() {
            // Already marked in the log by the device that popped it first.
            return self.read_popped(head).map(Some);
        }
        let avail_idx = self.avail_idx()?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndexJump {
                next_avail: self.next_avail,
                avail_idx,
                size: self.size,
            });
        }
        // Pairs with the driver's write barrier before it published `avail.idx`: the ring
        // entry and the descriptors are read after the index (see the module docs).
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = self.read_index(self.avail_ring + 4 + 2 * slot, "available ring")?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let chain = self.read_popped(head)?;
        if let Some(log) = &self.inflight
            && !log.popped(head)
        {
            self.add_used(head, 0)?;
            return Err(QueueError::InflightLog { head });
        }
        Ok(Some(chain))
    }

    /// Reads the chain of a head taken off the available ring (or the resubmit list).
    fn read_popped(&mut self, head: u16) -> Result<DescriptorChain, QueueError> {
        match read_chain(&self.mem, self.desc_table, self.size, head, self.indirect) {
            Ok(chain) => Ok(chain),
            Err(source) => {
                // The head is the driver's to reuse only once it is in the used ring.
                self.add_used(head, 0)?;
                Err(QueueError::Chain { head, source })
            }
        }
    }

    /// Puts the chain with head `head` into the used ring, `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size);
        let element = UsedElement {
            id: u32::from(head).into(),
            len: len.into(),
        };
        self.mem
            .write_plain(self.used_ring + 4 + 8 * slot, &element)
            .map_err(Self::ring_error("used ring"))?;
        let logged = self
            .inflight
            .as_ref()
            .is_none_or(|log| log.before_used(head));
        // The element (and the request's data and status, written before this call) must be
        // visible before the index that publishes them; so must the log's batch head, which
        // recovery trusts once it sees the index moved.
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        self.write_index(self.used_ring + 2, self.next_used)?;
        let logged = logged
            && self
                .inflight
                .as_ref()
                .is_none_or(|log| log.after_used(head, self.next_used));
        if logged {
            Ok(())
        } else {
            Err(QueueError::InflightLog { head })
        }
    }

    /// Whether the driver wants an interrupt for the used entries added since the last call.
    pub fn needs_notification(&mut self) -> Result<bool, QueueError> {
        // Store of used.idx (in add_used) before the load of used_event/flags below: see the
        // module docs for the lost-interrupt race this prevents.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let old = std::mem::replace(&mut self.signalled_used, new);
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let used_event = self.read_index(
                self.avail_ring + 4 + 2 * u64::from(self.size),
                "available ring",
            )?;
            Ok(need_event(used_event, new, old))
        } else {
            let flags = self.read_index(self.avail_ring, "available ring")?;
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to notify the device for the next available entry (under
    /// `EVENT_IDX`), then returns whether entries are already pending, in which case the
    /// caller must keep popping instead of waiting for a notification.
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        if self.event_idx {
            self.write_index(
                self.used_ring + 4 + 8 * u64::from(self.size),
                self.next_avail,
            )?;
            // Store of avail_event before the reload of avail.idx (module docs).
            fence(Ordering::SeqCst);
        }
        Ok(self.avail_idx()? != self.next_avail)
    }
}

/// `vring_need_event`: whether moving the used index from `old` to `new` crossed the index
/// `event` at which the driver asked to be interrupted. All arithmetic wraps at 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Descriptor;
    use guestmem::PAGE_SIZE;
    use zerocopy::little_endian::U16;

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(10, 10, 3));
        assert!(need_event(u16::MAX, 1, u16::MAX - 2));
        assert!(!need_event(2, 1, u16::MAX));
        // Exhaustive against the definition over a window of the u16 circle.
        for old in [0u16, 100, u16::MAX - 3] {
            for step in 0..8u16 {
                let new = old.wrapping_add(step);
                for e in 0..8u16 {
                    let event = old.wrapping_add(e);
                    // The event index lies in [old, new) exactly when the driver must hear.
                    assert_eq!(need_event(event, new, old), e < step);
                }
            }
        }
    }

    fn config() -> QueueConfig {
        QueueConfig {
            max_size: 4,
            size: 4,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        let ok = config();
        assert!(SplitQueue::new(mem.clone(), &ok, QueueState::default(), false, false).is_ok());
        for bad in [
            QueueConfig { size: 3, ..ok },
            QueueConfig { size: 8, ..ok },
            QueueConfig { size: 0, ..ok },
            QueueConfig {
                desc_table: 0x1008,
                ..ok
            },
            QueueConfig {
                used_ring: 0x3002,
                ..ok
            },
            QueueConfig {
                used_ring: 4 * PAGE_SIZE as u64 - 8,
                ..ok
            },
            QueueConfig {
                avail_ring: u64::MAX - 1,
                ..ok
            },
        ] {
            assert!(
                SplitQueue::new(mem.clone(), &bad, QueueState::default(), false, false).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pop_and_complete_round_trip() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        let mut q =
            SplitQueue::new(mem.clone(), &config(), QueueState::default(), false, true).unwrap();
        assert_eq!(q.pop().unwrap(), None);
        mem.write_plain(0x1000, &Descriptor::new(0x100, 8, 0, 0))
            .unwrap();
        mem.write_plain(0x2004, &U16::new(0)).unwrap();
        mem.write_plain(0x2002, &U16::new(1)).unwrap();
        let chain = q.pop().unwrap().unwrap();
        assert_eq!(chain.head(), 0);
        assert!(!q.enable_notification().unwrap());
        assert_eq!(mem.read_plain::<U16>(0x3000 + 4 + 32).unwrap().get(), 1);
        q.add_used(0, 8).unwrap();
        assert_eq!(mem.read_plain::<U16>(0x3002).unwrap().get(), 1);
        // used_event is 0: moving the used index past it notifies; nothing new does not.
        assert!(q.needs_notification().unwrap());
        assert!(!q.needs_notification().unwrap());
        // A jump of more than the queue size is refused.
        mem.write_plain(0x2002, &U16::new(6)).unwrap();
        assert!(matches!(q.pop(), Err(QueueError::AvailIndexJump { .. })));
    }

    /// Records the calls the queue makes, in order.
    #[derive(Debug, Default)]
    struct Recorder(parking_lot::Mutex<Vec<String>>);

    impl InflightLog for Recorder {
        fn popped(&self, head: u16) -> bool {
            self.0.lock().push(format!("popped {head}"));
            true
        }
        fn before_used(&self, head: u16) -> bool {
            self.0.lock().push(format!("before {head}"));
            true
        }
        fn after_used(&self, head: u16, used_idx: u16) -> bool {
            self.0.lock().push(format!("after {head} {used_idx}"));
            true
        }
    }

    /// Resubmitted heads come first and are not logged again; new heads are logged when
    /// popped; every used element is bracketed by the log's two calls.
    #[test]
    fn the_inflight_log_hears_pops_and_completions_and_resubmits_come_first() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        for head in 0..4u16 {
            mem.write_plain(
                0x1000 + 16 * u64::from(head),
                &Descriptor::new(0x100, 8, 0, 0),
            )
            .unwrap();
        }
        // Heads 0 and 2 were popped by a previous device; the driver then published head 3.
        mem.write_plain(0x2004, &U16::new(0)).unwrap();
        mem.write_plain(0x2006, &U16::new(2)).unwrap();
        mem.write_plain(0x2008, &U16::new(3)).unwrap();
        mem.write_plain(0x2002, &U16::new(3)).unwrap();
        let state = QueueState {
            next_avail: 2,
            next_used: 0,
        };
        let mut q = SplitQueue::new(mem.clone(), &config(), state, false, false).unwrap();
        let log = Arc::new(Recorder::default());
        q.set_inflight(log.clone(), vec![2, 0]);
        let heads: Vec<u16> = std::iter::from_fn(|| q.pop().unwrap().map(|c| c.head())).collect();
        assert_eq!(heads, [2, 0, 3]);
        q.add_used(0, 8).unwrap();
        assert_eq!(
            *log.0.lock(),
            ["popped 3", "before 0", "after 0 1"],
            "resubmitted heads are logged already"
        );
    }
}
