//! A whole virtio-blk device (MMIO transport, asynchronous engine, RAM disk) under a hostile
//! driver: descriptors, headers, discard segments, ring indices and notifications all come
//! from the input, with addresses inside buffers, inside the rings, at the end of guest
//! memory, far outside it and overflowing.
//!
//! Oracle: nothing panics or hangs; after the device is stopped (which waits for requests in
//! flight), every chain it consumed is back in the used ring, whether it was served, refused
//! with a status or malformed (then with `DEVICE_NEEDS_RESET`).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use disk_backend::Disk;
use disk_ram::RamDisk;
use guestmem::GuestMemory;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use virtio_block::config::{DiscardWriteZeroes, RequestHeader};
use virtio_block::descriptor::Descriptor;
use virtio_block::harness::{Driver, DriverOptions};
use virtio_block::spec::{blk, mmio};
use virtio_block::{BlockConfig, BlockDevice};
use zerocopy::IntoBytes;
use zerocopy::little_endian::U16;

/// Guest memory: rings, a 64 KiB data area and room past it; small, since every input zeroes it.
const MEM: u64 = 256 << 10;

/// Steps per input, at most.
const MAX_STEPS: usize = 96;

#[derive(Debug, Arbitrary)]
enum Addr {
    Data(u16),
    Ring(u16),
    End(u8),
    Raw(u64),
}

#[derive(Debug, Arbitrary)]
enum Type {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
enum Step {
    Descriptor {
        index: u8,
        addr: Addr,
        len: u32,
        flags: u8,
        next: u8,
    },
    Header {
        at: u16,
        request_type: Type,
        sector: u64,
        near: bool,
    },
    Segment {
        at: u16,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    },
    Publish {
        head: u8,
    },
    SetAvailIdx(u16),
    Notify(u8),
    Consume,
}

type BlockDriver = Driver<BlockDevice>;

thread_local! {
    /// One driver per disk shape (512 B or 4 KiB sectors, read-only or not), built once:
    /// starting a device and mapping its memory per input kept the target at a few hundred
    /// inputs a second. Each input resets the device, zeroes guest memory and probes again
    /// with its own features and ring size. The RAM disks keep what earlier inputs wrote,
    /// which no request's handling depends on.
    static DRIVERS: RefCell<Vec<BlockDriver>> = RefCell::new(
        [(512, false), (512, true), (4096, false), (4096, true)]
            .into_iter()
            .map(|(block, read_only)| {
                let disk = RamDisk::new(64, block).unwrap().with_read_only(read_only);
                let config = BlockConfig {
                    queue_size: 16,
                    ..Default::default()
                };
                let device = BlockDevice::new(config, Disk::new(disk).unwrap()).unwrap();
                Driver::attach(device, GuestMemory::allocate(MEM as usize))
            })
            .collect(),
    );
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (Ok(big_blocks), Ok(read_only), Ok(mask), Ok(size_shift)) = (
        u.arbitrary::<bool>(),
        u.arbitrary::<bool>(),
        u.arbitrary::<u64>(),
        u.int_in_range(2..=4u32),
    ) else {
        return;
    };
    let block = if big_blocks { 4096 } else { 512 };
    let options = DriverOptions {
        features: mask | virtio_block::spec::features::VERSION_1,
        queue_size: Some(1 << size_shift),
        ..Default::default()
    };
    DRIVERS.with_borrow_mut(|drivers| {
        let driver = &mut drivers[usize::from(big_blocks) * 2 + usize::from(read_only)];
        // A reset stops the device (waiting for requests in flight) before memory is cleared.
        driver.write_reg(mmio::STATUS, 0);
        driver.mem().fill_at(0, 0, MEM as usize).unwrap();
        if driver.probe(&options).is_ok() {
            run(driver, &mut u, block);
        }
    });
});

fn run(driver: &mut BlockDriver, u: &mut Unstructured<'_>, block: u32) {
    let data_base = driver.alloc(64 << 10, 4096).unwrap();
    let mem = driver.mem().clone();
    let resolve = |a: &Addr| match *a {
        Addr::Data(x) => data_base + u64::from(x),
        Addr::Ring(x) => u64::from(x) % 0x2000,
        Addr::End(x) => MEM - u64::from(x),
        Addr::Raw(x) => x,
    };
    let capacity = 64 * u64::from(block / 512);
    // At most `MAX_STEPS` steps (a dozen requests written, published and notified): longer
    // inputs cost time on every run without reaching device states a shorter one cannot.
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        let Ok(step) = Step::arbitrary(u) else {
            break;
        };
        match step {
            Step::Descriptor {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let desc = Descriptor::new(
                    resolve(&addr),
                    len % 0x2_0000,
                    (flags & 7).into(),
                    (next % 20).into(),
                );
                let _ = driver.write_descriptor(0, u16::from(index % 16), desc);
            }
            Step::Header {
                at,
                request_type,
                sector,
                near,
            } => {
                let request_type = match request_type {
                    Type::In => blk::T_IN,
                    Type::Out => blk::T_OUT,
                    Type::Flush => blk::T_FLUSH,
                    Type::GetId => blk::T_GET_ID,
                    Type::Discard => blk::T_DISCARD,
                    Type::WriteZeroes => blk::T_WRITE_ZEROES,
                    Type::Raw(t) => t,
                };
                let sector = if near {
                    sector % (capacity + 16)
                } else {
                    sector
                };
                let header = RequestHeader {
                    request_type: request_type.into(),
                    reserved: 0.into(),
                    sector: sector.into(),
                };
                let _ = mem.write_at(data_base + u64::from(at), header.as_bytes());
            }
            Step::Segment {
                at,
                sector,
                num_sectors,
                flags,
            } => {
                let seg = DiscardWriteZeroes {
                    sector: sector.into(),
                    num_sectors: num_sectors.into(),
                    flags: flags.into(),
                };
                let _ = mem.write_at(data_base + u64::from(at), seg.as_bytes());
            }
            Step::Publish { head } => {
                let _ = driver.publish(0, u16::from(head % 20));
            }
            Step::SetAvailIdx(idx) => {
                let _ = driver.set_avail_idx(0, idx);
            }
            Step::Notify(queue) => driver.notify(u32::from(queue % 3)),
            Step::Consume => while let Ok(Some(_)) = driver.poll_used(0) {},
        }
    }
    // Stopping the device waits for every request in flight.
    let state = driver.save();
    let queue = state.queue_states[0];
    assert_eq!(
        queue.next_used, queue.next_avail,
        "every consumed chain returned"
    );
    let used_ring = driver.queue(0).unwrap().used;
    assert_eq!(
        mem.read_plain::<U16>(used_ring + 2).unwrap().get(),
        queue.next_used
    );
}
