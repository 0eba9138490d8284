//! A bounded cache of metadata clusters (L2 tables, refcount blocks) with write-back.

use std::collections::HashMap;

/// One cached cluster.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Host byte offset of the cluster.
    pub offset: u64,
    pub data: Vec<u8>,
    /// Bytes changed since the last write-back, as a byte range.
    pub dirty: Option<(usize, usize)>,
    /// Allocated in this session and never written: the file holds no valid copy yet, so
    /// nothing may point at it on disk before it is written and flushed.
    pub fresh: bool,
    last_use: u64,
}

impl Slot {
    /// Marks `len` bytes at `at` changed.
    pub fn touch(&mut self, at: usize, len: usize) {
        let (lo, hi) = self.dirty.unwrap_or((at, at + len));
        self.dirty = Some((lo.min(at), hi.max(at + len)));
    }
}

/// A fixed number of cluster slots, least recently used evicted first; only clean slots
/// are evicted (the owner writes dirty ones back first).
#[derive(Debug)]
pub(crate) struct Cache {
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    capacity: usize,
    clock: u64,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Vec::new(),
            index: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// The slot holding `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&mut Slot> {
        let i = *self.index.get(&offset)?;
        self.clock += 1;
        let slot = &mut self.slots[i];
        slot.last_use = self.clock;
        Some(slot)
    }

    /// Whether a new slot can be inserted without writing anything back first.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.capacity || self.slots.iter().any(|s| s.dirty.is_none())
    }

    /// Inserts a cluster, evicting the least recently used clean one if the cache is full
    /// (the caller makes room first where it can: see [`has_room`](Self::has_room)).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, fresh: bool) -> &mut Slot {
        self.clock += 1;
        let len = data.len();
        let slot = Slot {
            offset,
            data,
            dirty: fresh.then_some((0, len)),
            fresh,
            last_use: self.clock,
        };
        let victim = if self.slots.len() < self.capacity {
            None
        } else {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.dirty.is_none())
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i)
        };
        // Without a clean victim the cache grows past its capacity until the next
        // write-back trims it (see `trim`).
        let i = match victim {
            Some(victim) => {
                self.index.remove(&self.slots[victim].offset);
                self.slots[victim] = slot;
                victim
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(offset, i);
        &mut self.slots[i]
    }

    /// Forgets the cluster at `offset` (freed).
    pub fn remove(&mut self, offset: u64) {
        if let Some(i) = self.index.remove(&offset) {
            self.slots.swap_remove(i);
            if i < self.slots.len() {
                self.index.insert(self.slots[i].offset, i);
            }
        }
    }

    pub fn dirty_slots(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.slots.iter_mut().filter(|s| s.dirty.is_some())
    }

    pub fn is_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty.is_some())
    }

    /// Drops clean clusters, least recently used first, until at most `capacity` remain.
    pub fn trim(&mut self, capacity: usize) {
        while self.slots.len() > capacity {
            let Some(victim) = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.dirty.is_none())
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i)
            else {
                return;
            };
            let offset = self.slots[victim].offset;
            self.remove(offset);
        }
    }
}
