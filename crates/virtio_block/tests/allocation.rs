//! No allocation grows with lengths or counts the driver chose: requests whose descriptors
//! ask for 64 MiB in guest memory or a TiB outside it, and requests whose buffers force
//! the bounce path, never make the device allocate more than its fixed buffers.
//!
//! Its own test binary: the counting allocator is process-wide.

mod support;

use alloc_counter::{CountingAlloc, largest_allocation, reset_largest};
use std::sync::Arc;
use support::*;
use virtio_block::config::RequestHeader;
use virtio_block::harness::{Buffer, Driver, DriverOptions};
use virtio_block::spec::blk;
use virtio_block::{BlockConfig, BlockDevice, SyncFileBackend};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The largest buffer the device owns: the sync engine's 128 KiB chunk (the async engine's
/// bounce buffer is 64 KiB).
const BOUND: usize = 128 << 10;

/// Posts `header` + `data` + a status byte as one chain and returns the status and the
/// largest allocation made meanwhile (by any thread).
fn largest_for(
    driver: &mut Driver<BlockDevice>,
    request_type: u32,
    data: &[Buffer],
) -> (u8, usize) {
    let header = driver.alloc(16, 16).unwrap();
    let status = driver.alloc(1, 1).unwrap();
    driver
        .mem()
        .write_plain(
            header,
            &RequestHeader {
                request_type: request_type.into(),
                reserved: 0.into(),
                sector: 0.into(),
            },
        )
        .unwrap();
    let mut chain = vec![Buffer::readable(header, 16)];
    chain.extend_from_slice(data);
    chain.push(Buffer::writable(status, 1));
    reset_largest();
    let head = driver.post(0, &chain).unwrap();
    driver.notify(0);
    let used = driver.wait_used(0).unwrap();
    let largest = largest_allocation();
    assert_eq!(used.head, head);
    (driver.mem().read_plain(status).unwrap(), largest)
}

fn check(driver: &mut Driver<BlockDevice>) {
    let mib = driver.alloc(1 << 20, 4096).unwrap();
    // 64 descriptors over the same MiB: a 64 MiB read and write, served.
    let big_in: Vec<_> = (0..64).map(|_| Buffer::writable(mib, 1 << 20)).collect();
    let big_out: Vec<_> = (0..64).map(|_| Buffer::readable(mib, 1 << 20)).collect();
    // 254 descriptors of nearly 4 GiB each: refused, but only after looking at them.
    let huge: Vec<_> = (0..254).map(|_| Buffer::writable(mib, u32::MAX)).collect();
    // 252 pieces of 256 bytes on different pages: blocks straddle pieces, so the data is
    // bounced.
    let ragged: Vec<_> = (0..252)
        .map(|i| Buffer::writable(mib + 4096 * i + 100, 256))
        .collect();
    for (what, request_type, data, expected) in [
        ("64 MiB read", blk::T_IN, &big_in, blk::S_OK),
        ("64 MiB write", blk::T_OUT, &big_out, blk::S_OK),
        ("1 TiB outside memory", blk::T_IN, &huge, blk::S_IOERR),
        ("bounced read", blk::T_IN, &ragged, blk::S_OK),
    ] {
        let (status, largest) = largest_for(driver, request_type, data);
        assert_eq!(status, expected, "{what}");
        assert!(largest <= BOUND, "{what}: an allocation of {largest} bytes");
    }
}

#[test]
fn allocations_do_not_grow_with_the_request() {
    // 128 MiB: room for the 64 MiB request.
    check(&mut ram_driver(256 << 10, 512));
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(128 << 20).unwrap();
    let backend = Arc::new(SyncFileBackend::open(file.path(), false).unwrap());
    let device = BlockDevice::new(BlockConfig::default(), backend).unwrap();
    check(&mut Driver::new(device, memory(), DriverOptions::default()).unwrap());
}
