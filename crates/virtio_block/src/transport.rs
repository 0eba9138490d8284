//! The virtio-mmio transport, register layout version 2.
//!
//! [`VirtioMmioTransport`] is the MMIO region a VMM maps for one device: it decodes register
//! reads and writes, runs the status state machine and feature negotiation, records queue
//! configuration, and hands notifications to the device. It drives the device only through
//! [`VirtioDevice`].
//!
//! Rules it enforces, as the spec asks or allows:
//! - control registers take aligned 32-bit accesses only; anything else reads as zero and is
//!   ignored when written;
//! - `FEATURES_OK` sticks only after `ACKNOWLEDGE | DRIVER`, when the driver accepted
//!   `VERSION_1` and no bit the device did not offer; the driver reads `Status` back to
//!   find out;
//! - `DRIVER_OK` sticks only after `FEATURES_OK`; it activates the device, and a failed
//!   activation reports `DEVICE_NEEDS_RESET`;
//! - a status write that clears bits (other than writing 0, the reset) is ignored;
//! - feature writes after `FEATURES_OK` and queue writes to a ready queue or after
//!   `DRIVER_OK` are dropped; configuration-space writes reach the device at any time (the
//!   device ignores read-only fields), because a driver may change a writable field with the
//!   device live: Linux switches a block device's cache mode (`writeback`, `CONFIG_WCE`)
//!   through sysfs `cache_type`;
//! - a notification for a queue that does not exist or is not ready, or before `DRIVER_OK`,
//!   is ignored.

use crate::device::{ConfigState, IrqLine, RestoreError, VirtioDevice, VirtioInterrupt};
use crate::queue::{QueueConfig, QueueState};
use crate::spec::{features, mmio, status};
use guestmem::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The vendor id reported in `VendorID`.
pub const VENDOR_ID: u32 = 0x1af4;

/// The interrupt side of the transport: the `InterruptStatus` bits and the line.
#[derive(Debug)]
struct MmioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) {
        // Set the bit before raising the line, so that the driver's handler finds it.
        self.status.fetch_or(mmio::INT_USED_RING, Ordering::SeqCst);
        self.line.raise();
    }

    fn signal_config_change(&self) {
        self.status.fetch_or(mmio::INT_CONFIG, Ordering::SeqCst);
        self.line.raise();
    }
}

/// The registers of a [`VirtioMmioTransport`] and its device's queue and configuration
/// state, for a snapshot.
///
/// Serialisable with serde in any format (the tests use JSON). `version` is
/// [`MmioState::VERSION`] when saved; a restore refuses any other, so a change of meaning
/// bumps it rather than being misread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The format version, [`MmioState::VERSION`].
    pub version: u32,
    /// The device status.
    pub status: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// Each queue's configuration.
    pub queues: Vec<QueueConfig>,
    /// Each queue's indices.
    pub queue_states: Vec<QueueState>,
    /// The device's configuration generation and the fields the driver wrote.
    pub config: ConfigState,
}

impl MmioState {
    /// The format version this build saves and restores. Version 1 is the first serialised
    /// form.
    pub const VERSION: u32 = 1;
}

/// A virtio device behind the MMIO register layout, version 2.
///
/// The VMM forwards the guest's accesses to the device's MMIO window to
/// [`read`](Self::read) and [`write`](Self::write), with offsets relative to the window.
#[derive(Debug)]
pub struct VirtioMmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    interrupt: Arc<MmioInterrupt>,
    status: u32,
    /// Set when activation failed; a device reports its own errors through
    /// [`VirtioDevice::needs_reset`].
    activation_failed: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote a non-zero feature window beyond bit 63: bits nobody offered.
    driver_features_beyond_64: bool,
    queue_sel: u32,
}

impl<D: VirtioDevice> VirtioMmioTransport<D> {
    /// Puts `device` behind MMIO registers; it will see `mem` as guest memory and interrupt
    /// through `irq`.
    pub fn new(device: D, mem: GuestMemory, irq: IrqLine) -> Self {
        Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                line: irq,
            }),
            status: 0,
            activation_failed: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (for the VMM's own controls; the driver goes through registers).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = self.activation_failed || self.device.needs_reset();
        self.status
            | if needs_reset {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    /// The pending interrupt reasons (`InterruptStatus`).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    /// Handles a read of `data.len()` bytes at `offset` into the MMIO window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= mmio::CONFIG {
            self.device.read_config(offset - mmio::CONFIG, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// Handles a write of `data` at `offset` into the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= mmio::CONFIG {
            // Writable fields stay writable with the device live (module docs).
            self.device.write_config(offset - mmio::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.device.queues().get(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            mmio::MAGIC_VALUE => mmio::MAGIC,
            mmio::VERSION => mmio::VERSION_2,
            mmio::DEVICE_ID => self.device.device_type().id(),
            mmio::VENDOR_ID => VENDOR_ID,
            mmio::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            mmio::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            mmio::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready.into()),
            mmio::INTERRUPT_STATUS => self.interrupt_status(),
            mmio::STATUS => self.status(),
            mmio::CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            mmio::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            mmio::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            mmio::DRIVER_FEATURES => self.write_driver_features(value),
            mmio::QUEUE_SEL => self.queue_sel = value,
            mmio::QUEUE_NOTIFY => self.notify(value),
            mmio::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            mmio::STATUS => self.write_status(value),
            mmio::QUEUE_NUM
            | mmio::QUEUE_READY
            | mmio::QUEUE_DESC_LOW
            | mmio::QUEUE_DESC_HIGH
            | mmio::QUEUE_DRIVER_LOW
            | mmio::QUEUE_DRIVER_HIGH
            | mmio::QUEUE_DEVICE_LOW
            | mmio::QUEUE_DEVICE_HIGH => self.write_queue(offset, value),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            // No feature lives beyond bit 63; accepting one is accepting a bit never offered,
            // which FEATURES_OK refuses.
            _ => {
                self.driver_features_beyond_64 |= value != 0;
                return;
            }
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
        self.device.set_acked_features(self.driver_features);
    }

    fn write_queue(&mut self, offset: u64, value: u32) {
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(queue) = self.device.queues_mut().get_mut(self.queue_sel as usize) else {
            return;
        };
        if offset == mmio::QUEUE_READY {
            // Only sizes a split queue can have become ready; the driver sees the refusal
            // when it reads QueueReady back, and Linux's probe fails cleanly.
            queue.ready = value == 1 && queue.is_valid_size(queue.size);
            return;
        }
        if queue.ready {
            return;
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            mmio::QUEUE_NUM => queue.size = value.try_into().unwrap_or(0),
            mmio::QUEUE_DESC_LOW => queue.desc_table = low(queue.desc_table),
            mmio::QUEUE_DESC_HIGH => queue.desc_table = high(queue.desc_table),
            mmio::QUEUE_DRIVER_LOW => queue.avail_ring = low(queue.avail_ring),
            mmio::QUEUE_DRIVER_HIGH => queue.avail_ring = high(queue.avail_ring),
            mmio::QUEUE_DEVICE_LOW => queue.used_ring = low(queue.used_ring),
            mmio::QUEUE_DEVICE_HIGH => queue.used_ring = high(queue.used_ring),
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        if self.status & status::DRIVER_OK == 0 || !self.device.is_activated() {
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA (not offered) the value is the queue index.
        let Ok(index) = u16::try_from(value) else {
            return;
        };
        if self
            .device
            .queues()
            .get(usize::from(index))
            .is_some_and(|q| q.ready)
        {
            self.device.process_queue(index);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; clearing one is a driver bug we do not act on.
        if value & self.status != self.status {
            return;
        }
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable(value) {
            value &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                value &= !status::DRIVER_OK;
            } else {
                self.status = value;
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if self.device.activate(self.mem.clone(), interrupt).is_err() {
                    self.activation_failed = true;
                    self.interrupt.signal_config_change();
                }
                return;
            }
        }
        self.status = value;
    }

    fn features_acceptable(&self, value: u32) -> bool {
        let steps = status::ACKNOWLEDGE | status::DRIVER;
        value & steps == steps
            && !self.driver_features_beyond_64
            && self.driver_features & !self.device.avail_features() == 0
            && self.driver_features & features::VERSION_1 != 0
    }

    /// Resets the device and every register, as the driver's write of 0 to `Status` does.
    /// Waits for requests in flight.
    pub fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.activation_failed = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    /// Waits for requests in flight, stops the device and returns the transport's registers
    /// and the queues' indices. Restore them with [`restore`](Self::restore) to continue;
    /// this transport's device stays stopped.
    pub fn save(&mut self) -> MmioState {
        let queue_states = self.device.save_queues();
        MmioState {
            version: MmioState::VERSION,
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status(),
            queues: self.device.queues().to_vec(),
            queue_states,
            config: self.device.save_config(),
        }
    }

    /// A transport over a fresh `device` in the state `state` (from [`save`](Self::save)):
    /// features, queue configuration and indices are restored, and a device that was live is
    /// activated again and looks at its queues for requests posted meanwhile.
    pub fn restore(
        mut device: D,
        mem: GuestMemory,
        irq: IrqLine,
        state: &MmioState,
    ) -> Result<Self, RestoreError> {
        if state.version != MmioState::VERSION {
            return Err(RestoreError::Version {
                saved: state.version,
                supported: MmioState::VERSION,
            });
        }
        if state.queues.len() != device.queues().len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: device.queues().len(),
            });
        }
        if state.driver_features & !device.avail_features() != 0 {
            return Err(RestoreError::InvalidState(
                "features the device does not offer",
            ));
        }
        if state.status & status::DRIVER_OK != 0 && state.status & status::FEATURES_OK == 0 {
            return Err(RestoreError::InvalidState("DRIVER_OK without FEATURES_OK"));
        }
        for (config, saved) in device.queues_mut().iter_mut().zip(&state.queues) {
            if saved.max_size != config.max_size {
                return Err(RestoreError::InvalidState("queue sizes differ"));
            }
            *config = *saved;
        }
        device.set_acked_features(state.driver_features);
        device.restore_queues(&state.queue_states)?;
        device.restore_config(&state.config)?;
        let mut transport = Self::new(device, mem, irq);
        transport.driver_features = state.driver_features;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.queue_sel = state.queue_sel;
        transport
            .interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        transport.status = state.status & !status::DRIVER_OK;
        if transport.device.config_generation() != state.config.generation
            && state.status & status::DRIVER_OK != 0
        {
            // The configuration changed while the snapshot was stored (the disk was
            // resized): tell the driver, as a live device would have.
            transport.interrupt.signal_config_change();
        }
        if state.status & status::DRIVER_OK != 0 {
            transport.write_status(state.status);
            let queues = transport.device.queues().len();
            for index in 0..queues as u16 {
                transport.notify(index.into());
            }
        }
        Ok(transport)
    }
}
