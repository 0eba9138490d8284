//! An in-process virtio driver for tests, fuzz targets and benchmarks (feature `test-utils`).
//!
//! [`Driver`] owns a [`VirtioMmioTransport`] and plays the guest: it lays out split rings in
//! guest memory, negotiates through the MMIO registers in the order Linux's `virtio_mmio` and
//! `virtio_blk` drivers do, posts descriptor chains (direct or indirect), notifies the device
//! (honouring `EVENT_IDX`'s `avail_event` like Linux), and waits for the interrupt. Block
//! helpers ([`Driver::read`], [`Driver::write`], ...) build whole requests; raw accessors
//! ([`Driver::write_descriptor`], [`Driver::publish`], [`Driver::set_avail_idx`]) let hostile
//! tests break every rule.
//!
//! ```
//! use disk_backend::Disk;
//! use disk_ram::RamDisk;
//! use guestmem::GuestMemory;
//! use virtio_block::harness::{Driver, DriverOptions};
//! use virtio_block::{BlockConfig, BlockDevice, spec::blk};
//!
//! let device = BlockDevice::new(BlockConfig::default(), Disk::new(RamDisk::new(64, 512)?)?)?;
//! let mut driver = Driver::new(device, GuestMemory::allocate(1 << 20), DriverOptions::default())?;
//! assert_eq!(driver.write(0, 8, &[7; 1024])?, blk::S_OK);
//! let (status, data) = driver.read(0, 8, 1024)?;
//! assert_eq!((status, data), (blk::S_OK, vec![7; 1024]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::config::{DiscardWriteZeroes, RequestHeader};
use crate::descriptor::Descriptor;
use crate::device::{IrqLine, RestoreError, VirtioDevice};
use crate::queue::need_event;
use crate::spec::{blk, features, mmio, ring, status};
use crate::transport::{MmioState, VirtioMmioTransport};
use guestmem::{AccessError, GuestMemory, PAGE_SIZE64};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;
use thiserror::Error;
use zerocopy::IntoBytes;
use zerocopy::little_endian::U16;

/// How long [`Driver::wait_used`] waits for an interrupt before giving up: a guard against
/// a hung test, not a timing assertion.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// Counts interrupts and wakes waiters.
#[derive(Debug, Default)]
pub struct Interrupts {
    count: Mutex<u64>,
    raised: Condvar,
}

impl Interrupts {
    fn raise(&self) {
        *self.count.lock() += 1;
        self.raised.notify_all();
    }

    /// Interrupts raised so far.
    pub fn count(&self) -> u64 {
        *self.count.lock()
    }

    /// Waits until more than `seen` interrupts were raised; `false` after [`WAIT_LIMIT`].
    pub fn wait_past(&self, seen: u64) -> bool {
        let mut count = self.count.lock();
        while *count <= seen {
            if self.raised.wait_for(&mut count, WAIT_LIMIT).timed_out() {
                return *count > seen;
            }
        }
        true
    }
}

/// What the driver asks for during [`Driver::probe`].
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Features the driver accepts if offered (the default accepts everything offered).
    pub features: u64,
    /// Extra feature bits to accept whether offered or not (to test refusal).
    pub force_features: u64,
    /// Queue size to ask for; the device's maximum if `None`.
    pub queue_size: Option<u16>,
    /// Queues to set up; all of `num_queues` (with `MQ`) or 1 if `None`.
    pub num_queues: Option<u16>,
    /// Notify on every [`Driver::kick`], ignoring `avail_event`.
    pub always_kick: bool,
    /// Write the `writeback` configuration field (with `CONFIG_WCE`) after `FEATURES_OK`:
    /// the transport drops configuration writes once `DRIVER_OK` is set.
    pub writeback: Option<bool>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            features: u64::MAX,
            force_features: 0,
            queue_size: None,
            num_queues: None,
            always_kick: false,
            writeback: None,
        }
    }
}

/// Probing the device failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbeError {
    /// `MagicValue` is wrong.
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    /// `Version` is not 2.
    #[error("unsupported version {0}")]
    BadVersion(u32),
    /// `DeviceID` is 0.
    #[error("no device")]
    NoDevice,
    /// The device did not keep `FEATURES_OK`.
    #[error("device refused the features")]
    FeaturesRefused,
    /// A queue has `QueueNumMax` 0 or was already ready.
    #[error("queue {0} unavailable")]
    QueueUnavailable(u16),
    /// The rings do not fit in guest memory.
    #[error("guest memory too small for the rings")]
    NoRoom,
    /// The device reports `DEVICE_NEEDS_RESET`.
    #[error("device needs reset")]
    NeedsReset,
}

/// Driving the device failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DriverError {
    /// No interrupt came within [`WAIT_LIMIT`].
    #[error("no completion within the wait limit")]
    Timeout,
    /// The queue has not enough free descriptors.
    #[error("queue full")]
    QueueFull,
    /// The driver's buffer area is exhausted.
    #[error("out of driver memory")]
    OutOfMemory,
    /// The queue does not exist or was not set up.
    #[error("no such queue {0}")]
    NoQueue(u16),
    /// Guest memory access failed.
    #[error("guest memory access failed")]
    Memory(#[from] AccessError),
}

/// A used element as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head of the chain.
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// One buffer of a chain to post.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buffer {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// The driver's side of one split queue.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    /// Entries.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kicked_at: u16,
}

impl DriverQueue {
    /// The driver's next available index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
}

/// A block request posted with [`Driver::post_block`], not yet completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingBlock {
    /// The chain's head.
    pub head: u16,
    /// Where the device writes the data of a read.
    pub in_addr: u64,
    /// Its length.
    pub in_len: u32,
    /// Where the device writes the status.
    pub status_addr: u64,
}

/// A completed block request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockResponse {
    /// The status byte.
    pub status: u8,
    /// The device-writable data (read data, id).
    pub data: Vec<u8>,
    /// The used length.
    pub used_len: u32,
}

/// An in-process virtio-mmio driver. See the [module documentation](self).
pub struct Driver<D: VirtioDevice> {
    transport: VirtioMmioTransport<D>,
    mem: GuestMemory,
    irq: IrqLine,
    interrupts: Arc<Interrupts>,
    features: u64,
    queues: Vec<DriverQueue>,
    heap_start: u64,
    heap_next: u64,
    heap_end: u64,
    always_kick: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for Driver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .finish()
    }
}

impl<D: VirtioDevice> Driver<D> {
    /// A driver attached to `device` over `mem` (its first region is used), not yet probed.
    pub fn attach(device: D, mem: GuestMemory) -> Self {
        let interrupts = Arc::new(Interrupts::default());
        let irq = IrqLine::new({
            let interrupts = interrupts.clone();
            move || interrupts.raise()
        });
        let heap_end = mem.regions().next().map_or(0, |(gpa, len, _)| gpa + len);
        let transport = VirtioMmioTransport::new(device, mem.clone(), irq.clone());
        Self {
            transport,
            mem,
            irq,
            interrupts,
            features: 0,
            queues: Vec::new(),
            heap_start: 0,
            heap_next: 0,
            heap_end,
            always_kick: false,
        }
    }

    /// Attaches and probes.
    pub fn new(device: D, mem: GuestMemory, options: DriverOptions) -> Result<Self, ProbeError> {
        let mut driver = Self::attach(device, mem);
        driver.probe(&options)?;
        Ok(driver)
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut word = [0; 4];
        self.transport.read(offset, &mut word);
        u32::from_le_bytes(word)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn add_status(&mut self, bits: u32) {
        let current = self.read_reg(mmio::STATUS);
        self.write_reg(mmio::STATUS, current | bits);
    }

    /// Reads configuration space consistently: retries while `ConfigGeneration` changes
    /// across the read, as Linux's `virtio_cread` does.
    pub fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        loop {
            let before = self.read_reg(mmio::CONFIG_GENERATION);
            // 32-bit accesses as far as possible, like the kernel's `vm_get`.
            for (i, chunk) in data.chunks_mut(4).enumerate() {
                self.transport
                    .read(mmio::CONFIG + offset + 4 * i as u64, chunk);
            }
            if self.read_reg(mmio::CONFIG_GENERATION) == before {
                return;
            }
        }
    }

    /// The capacity field (512-byte sectors).
    pub fn capacity(&mut self) -> u64 {
        let mut bytes = [0; 8];
        self.read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    /// Negotiates and sets up queues in the order of Linux's `vm_probe`, `virtio_dev_probe`,
    /// `virtblk_probe`/`init_vq` and `vm_setup_vq`, ending with `DRIVER_OK`.
    pub fn probe(&mut self, options: &DriverOptions) -> Result<(), ProbeError> {
        let magic = self.read_reg(mmio::MAGIC_VALUE);
        if magic != mmio::MAGIC {
            return Err(ProbeError::BadMagic(magic));
        }
        let version = self.read_reg(mmio::VERSION);
        if version != mmio::VERSION_2 {
            return Err(ProbeError::BadVersion(version));
        }
        if self.read_reg(mmio::DEVICE_ID) == 0 {
            return Err(ProbeError::NoDevice);
        }
        let _vendor = self.read_reg(mmio::VENDOR_ID);
        // register_virtio_device: reset, then ACKNOWLEDGE; virtio_dev_probe: DRIVER.
        self.write_reg(mmio::STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.write_reg(mmio::DEVICE_FEATURES_SEL, 1);
        let high = self.read_reg(mmio::DEVICE_FEATURES);
        self.write_reg(mmio::DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(mmio::DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        let accepted = (offered & options.features) | options.force_features;
        self.write_reg(mmio::DRIVER_FEATURES_SEL, 1);
        self.write_reg(mmio::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write_reg(mmio::DRIVER_FEATURES_SEL, 0);
        self.write_reg(mmio::DRIVER_FEATURES, accepted as u32);
        self.add_status(status::FEATURES_OK);
        if self.read_reg(mmio::STATUS) & status::FEATURES_OK == 0 {
            return Err(ProbeError::FeaturesRefused);
        }
        self.features = accepted;
        if let Some(writeback) = options.writeback {
            self.transport
                .write(mmio::CONFIG + 0x20, &[u8::from(writeback)]);
        }
        // virtblk_probe reads num_queues (with MQ) before init_vq sets the queues up.
        let offered_queues = if accepted & features::BLK_MQ != 0 {
            let mut n = [0; 2];
            self.read_config(0x22, &mut n);
            u16::from_le_bytes(n).max(1)
        } else {
            1
        };
        let num_queues = options.num_queues.unwrap_or(offered_queues);
        self.queues.clear();
        let mut next = 0u64;
        for index in 0..num_queues {
            self.write_reg(mmio::QUEUE_SEL, index.into());
            if self.read_reg(mmio::QUEUE_READY) != 0 {
                return Err(ProbeError::QueueUnavailable(index));
            }
            let max = self.read_reg(mmio::QUEUE_NUM_MAX) as u16;
            if max == 0 {
                return Err(ProbeError::QueueUnavailable(index));
            }
            let size = options.queue_size.map_or(max, |s| s.min(max));
            let desc = next;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(PAGE_SIZE64);
            next = (used + 6 + 8 * u64::from(size)).next_multiple_of(PAGE_SIZE64);
            if next > self.heap_end {
                return Err(ProbeError::NoRoom);
            }
            let zero = vec![0u8; (next - desc) as usize];
            self.mem
                .write_at(desc, &zero)
                .map_err(|_| ProbeError::NoRoom)?;
            self.write_reg(mmio::QUEUE_NUM, size.into());
            for (low, value) in [
                (mmio::QUEUE_DESC_LOW, desc),
                (mmio::QUEUE_DRIVER_LOW, avail),
                (mmio::QUEUE_DEVICE_LOW, used),
            ] {
                self.write_reg(low, value as u32);
                self.write_reg(low + 4, (value >> 32) as u32);
            }
            self.write_reg(mmio::QUEUE_READY, 1);
            self.queues.push(DriverQueue {
                size,
                desc,
                avail,
                used,
                free: (0..size).rev().collect(),
                chains: vec![Vec::new(); size.into()],
                avail_idx: 0,
                last_used: 0,
                kicked_at: 0,
            });
        }
        self.heap_start = next;
        self.heap_next = next;
        self.always_kick = options.always_kick;
        self.add_status(status::DRIVER_OK);
        if self.read_reg(mmio::STATUS) & status::DEVICE_NEEDS_RESET != 0 {
            return Err(ProbeError::NeedsReset);
        }
        Ok(())
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device status register.
    pub fn status(&mut self) -> u32 {
        self.read_reg(mmio::STATUS)
    }

    /// The transport.
    pub fn transport(&self) -> &VirtioMmioTransport<D> {
        &self.transport
    }

    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut VirtioMmioTransport<D> {
        &mut self.transport
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The interrupt counter.
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.interrupts
    }

    /// The driver's view of queue `index`.
    pub fn queue(&self, index: u16) -> Option<&DriverQueue> {
        self.queues.get(usize::from(index))
    }

    fn queue_mut(&mut self, index: u16) -> Result<&mut DriverQueue, DriverError> {
        self.queues
            .get_mut(usize::from(index))
            .ok_or(DriverError::NoQueue(index))
    }

    /// Allocates `len` bytes of driver memory aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, DriverError> {
        let at = self.heap_next.next_multiple_of(align.max(1));
        let end = at.checked_add(len).ok_or(DriverError::OutOfMemory)?;
        if end > self.heap_end {
            return Err(DriverError::OutOfMemory);
        }
        self.heap_next = end;
        Ok(at)
    }

    /// Frees all driver memory allocated with [`alloc`](Self::alloc).
    pub fn free_all(&mut self) {
        self.heap_next = self.heap_start;
    }

    /// Writes descriptor `index` of queue `queue` directly (for hostile tests).
    pub fn write_descriptor(
        &mut self,
        queue: u16,
        index: u16,
        descriptor: Descriptor,
    ) -> Result<(), DriverError> {
        let desc = self.queue_mut(queue)?.desc;
        self.mem
            .write_plain(desc + 16 * u64::from(index), &descriptor)?;
        Ok(())
    }

    /// Publishes `head` in the available ring without any checks (for hostile tests).
    pub fn publish(&mut self, queue: u16, head: u16) -> Result<(), DriverError> {
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        let slot = u64::from(q.avail_idx % q.size);
        mem.write_atomic_u16(q.avail + 4 + 2 * slot, head.to_le())?;
        // The ring entry (and the descriptors before it) become visible before the index.
        fence(Ordering::Release);
        q.avail_idx = q.avail_idx.wrapping_add(1);
        mem.write_atomic_u16(q.avail + 2, q.avail_idx.to_le())?;
        Ok(())
    }

    /// Sets `avail.idx` to anything (for hostile tests).
    pub fn set_avail_idx(&mut self, queue: u16, idx: u16) -> Result<(), DriverError> {
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        q.avail_idx = idx;
        mem.write_atomic_u16(q.avail + 2, idx.to_le())?;
        Ok(())
    }

    /// Posts a direct chain of `buffers` and returns its head.
    pub fn post(&mut self, queue: u16, buffers: &[Buffer]) -> Result<u16, DriverError> {
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        if buffers.is_empty() || q.free.len() < buffers.len() {
            return Err(DriverError::QueueFull);
        }
        let indices: Vec<u16> = (0..buffers.len()).filter_map(|_| q.free.pop()).collect();
        for (i, b) in buffers.iter().enumerate() {
            let mut flags = if b.writable { ring::DESC_F_WRITE } else { 0 };
            let next = indices.get(i + 1).copied().unwrap_or(0);
            if i + 1 < buffers.len() {
                flags |= ring::DESC_F_NEXT;
            }
            mem.write_plain(
                q.desc + 16 * u64::from(indices[i]),
                &Descriptor::new(b.addr, b.len, flags, next),
            )?;
        }
        let head = indices[0];
        q.chains[usize::from(head)] = indices;
        self.publish(queue, head)?;
        Ok(head)
    }

    /// Posts `buffers` through an indirect table (allocated from driver memory) and returns
    /// the head.
    pub fn post_indirect(&mut self, queue: u16, buffers: &[Buffer]) -> Result<u16, DriverError> {
        let table = self.alloc(16 * buffers.len() as u64, 16)?;
        for (i, b) in buffers.iter().enumerate() {
            let mut flags = if b.writable { ring::DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= ring::DESC_F_NEXT;
            }
            self.mem.write_plain(
                table + 16 * i as u64,
                &Descriptor::new(b.addr, b.len, flags, (i + 1) as u16),
            )?;
        }
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        let head = q.free.pop().ok_or(DriverError::QueueFull)?;
        mem.write_plain(
            q.desc + 16 * u64::from(head),
            &Descriptor::new(table, 16 * buffers.len() as u32, ring::DESC_F_INDIRECT, 0),
        )?;
        q.chains[usize::from(head)] = vec![head];
        self.publish(queue, head)?;
        Ok(head)
    }

    /// Notifies the device about queue `queue` if it asked to be (`avail_event` under
    /// `EVENT_IDX`), like Linux's `virtqueue_kick_prepare`. Returns whether it notified.
    pub fn kick(&mut self, queue: u16) -> Result<bool, DriverError> {
        let event_idx = self.features & features::RING_EVENT_IDX != 0;
        let always = self.always_kick;
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        let (new, old) = (q.avail_idx, q.kicked_at);
        q.kicked_at = new;
        let notify = if always || !event_idx {
            // NO_NOTIFY is only a hint; the device here never sets it, but honour it.
            always || u16::from_le(mem.read_atomic_u16(q.used)?) & ring::USED_F_NO_NOTIFY == 0
        } else {
            // Publish avail.idx before reading avail_event (mirror of the device's fence).
            fence(Ordering::SeqCst);
            let avail_event =
                u16::from_le(mem.read_atomic_u16(q.used + 4 + 8 * u64::from(q.size))?);
            need_event(avail_event, new, old)
        };
        if notify {
            self.write_reg(mmio::QUEUE_NOTIFY, queue.into());
        }
        Ok(notify)
    }

    /// Notifies the device unconditionally.
    pub fn notify(&mut self, queue: u32) {
        self.write_reg(mmio::QUEUE_NOTIFY, queue);
    }

    /// Takes the next used element of `queue`, if any, and frees its descriptors.
    pub fn poll_used(&mut self, queue: u16) -> Result<Option<Used>, DriverError> {
        let event_idx = self.features & features::RING_EVENT_IDX != 0;
        let mem = self.mem.clone();
        let q = self.queue_mut(queue)?;
        let used_idx = u16::from_le(mem.read_atomic_u16(q.used + 2)?);
        if used_idx == q.last_used {
            return Ok(None);
        }
        // Pairs with the device's release fence before it published used.idx.
        fence(Ordering::Acquire);
        let slot = u64::from(q.last_used % q.size);
        let id = mem.read_plain::<U16>(q.used + 4 + 8 * slot)?.get();
        let len = mem
            .read_plain::<zerocopy::little_endian::U32>(q.used + 8 + 8 * slot)?
            .get();
        q.last_used = q.last_used.wrapping_add(1);
        if let Some(chain) = q.chains.get_mut(usize::from(id)) {
            q.free.append(chain);
        }
        if event_idx {
            // Ask for an interrupt for the next element (used_event = last_used).
            mem.write_atomic_u16(q.avail + 4 + 2 * u64::from(q.size), q.last_used.to_le())?;
            fence(Ordering::SeqCst);
        }
        Ok(Some(Used { head: id, len }))
    }

    /// Waits for the next used element of `queue`: polls, and sleeps on the interrupt
    /// between polls, acknowledging it as Linux's `vm_interrupt` does.
    pub fn wait_used(&mut self, queue: u16) -> Result<Used, DriverError> {
        loop {
            let seen = self.interrupts.count();
            if let Some(used) = self.poll_used(queue)? {
                return Ok(used);
            }
            if !self.interrupts.wait_past(seen) {
                return Err(DriverError::Timeout);
            }
            let pending = self.read_reg(mmio::INTERRUPT_STATUS);
            self.write_reg(mmio::INTERRUPT_ACK, pending);
        }
    }

    /// Posts a block request on `queue`: a header descriptor, `out` (device-readable data)
    /// if not empty, `in_len` bytes of device-writable data if not zero, and a status byte.
    /// With `indirect`, through an indirect table. Memory comes from
    /// [`alloc`](Self::alloc); free it with [`free_all`](Self::free_all).
    pub fn post_block(
        &mut self,
        queue: u16,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
        indirect: bool,
    ) -> Result<PendingBlock, DriverError> {
        let header = self.alloc(16, 16)?;
        let header_value = RequestHeader {
            request_type: request_type.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        self.mem.write_plain(header, &header_value)?;
        let mut buffers = vec![Buffer::readable(header, 16)];
        if !out.is_empty() {
            let at = self.alloc(out.len() as u64, PAGE_SIZE64)?;
            self.mem.write_at(at, out)?;
            buffers.push(Buffer::readable(at, out.len() as u32));
        }
        let in_addr = self.alloc(u64::from(in_len), PAGE_SIZE64)?;
        if in_len > 0 {
            self.mem.fill_at(in_addr, 0xee, in_len as usize)?;
            buffers.push(Buffer::writable(in_addr, in_len));
        }
        let status_addr = self.alloc(1, 1)?;
        self.mem.write_plain(status_addr, &0xffu8)?;
        buffers.push(Buffer::writable(status_addr, 1));
        let head = if indirect {
            self.post_indirect(queue, &buffers)?
        } else {
            self.post(queue, &buffers)?
        };
        Ok(PendingBlock {
            head,
            in_addr,
            in_len,
            status_addr,
        })
    }

    /// Reads back the outcome of a completed [`PendingBlock`].
    pub fn finish_block(
        &self,
        pending: &PendingBlock,
        used: Used,
    ) -> Result<BlockResponse, DriverError> {
        let mut data = vec![0; pending.in_len as usize];
        self.mem.read_at(pending.in_addr, &mut data)?;
        Ok(BlockResponse {
            status: self.mem.read_plain(pending.status_addr)?,
            data,
            used_len: used.len,
        })
    }

    /// Posts one block request on `queue`, notifies, waits for it and frees its memory.
    pub fn block_request(
        &mut self,
        queue: u16,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Result<BlockResponse, DriverError> {
        let mark = self.heap_next;
        let result = (|| {
            let pending = self.post_block(queue, request_type, sector, out, in_len, false)?;
            self.kick(queue)?;
            let used = self.wait_used(queue)?;
            debug_assert_eq!(used.head, pending.head);
            self.finish_block(&pending, used)
        })();
        self.heap_next = mark;
        result
    }

    /// Reads `len` bytes at 512-byte `sector` on `queue`: the status and the data.
    pub fn read(
        &mut self,
        queue: u16,
        sector: u64,
        len: u32,
    ) -> Result<(u8, Vec<u8>), DriverError> {
        let response = self.block_request(queue, blk::T_IN, sector, &[], len)?;
        Ok((response.status, response.data))
    }

    /// Writes `data` at 512-byte `sector` on `queue`: the status.
    pub fn write(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<u8, DriverError> {
        Ok(self
            .block_request(queue, blk::T_OUT, sector, data, 0)?
            .status)
    }

    /// Flushes on `queue`: the status.
    pub fn flush(&mut self, queue: u16) -> Result<u8, DriverError> {
        Ok(self.block_request(queue, blk::T_FLUSH, 0, &[], 0)?.status)
    }

    /// `GET_ID` on `queue`: the status and the 20 bytes.
    pub fn get_id(&mut self, queue: u16) -> Result<(u8, Vec<u8>), DriverError> {
        let response = self.block_request(queue, blk::T_GET_ID, 0, &[], blk::ID_BYTES as u32)?;
        Ok((response.status, response.data))
    }

    /// `DISCARD` (or, with `write_zeroes`, `WRITE_ZEROES`) of `segments`
    /// (`(sector, num_sectors, flags)` in 512-byte sectors): the status.
    pub fn discard(
        &mut self,
        queue: u16,
        segments: &[(u64, u32, u32)],
        write_zeroes: bool,
    ) -> Result<u8, DriverError> {
        let mut out = Vec::with_capacity(16 * segments.len());
        for &(sector, num_sectors, flags) in segments {
            out.extend_from_slice(
                DiscardWriteZeroes {
                    sector: sector.into(),
                    num_sectors: num_sectors.into(),
                    flags: flags.into(),
                }
                .as_bytes(),
            );
        }
        let request_type = if write_zeroes {
            blk::T_WRITE_ZEROES
        } else {
            blk::T_DISCARD
        };
        Ok(self.block_request(queue, request_type, 0, &out, 0)?.status)
    }

    /// Saves the transport and device state (the device is stopped; see
    /// [`VirtioMmioTransport::save`]).
    pub fn save(&mut self) -> MmioState {
        self.transport.save()
    }

    /// Replaces the transport by `device` restored to `state`, keeping the driver's own
    /// ring state, as a VMM restoring a snapshot under a running guest would.
    pub fn restore(&mut self, device: D, state: &MmioState) -> Result<(), RestoreError> {
        self.transport =
            VirtioMmioTransport::restore(device, self.mem.clone(), self.irq.clone(), state)?;
        Ok(())
    }
}
