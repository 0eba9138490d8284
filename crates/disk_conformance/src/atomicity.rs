//! Sector atomicity: a read racing a write sees each sector whole, before or after.

use crate::{DiskFactory, writable};
use disk_backend::Disk;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::atomic::{AtomicBool, Ordering};

/// Reads the checker issues while a writer rewrites the same range.
const READS: usize = 1500;

/// A writer thread rewrites the whole disk (up to 256 KiB of it) again and again, each time
/// with every byte equal to a new value, while this thread reads the same range back: every
/// sector of every read must hold one value throughout. A backend that copies through the
/// host page cache without ordering overlapping requests fails this within a few hundred
/// reads on these machines (a sector half old, half new); under encryption a torn sector
/// decrypts to noise.
pub fn sector_atomicity(factory: &impl DiskFactory) {
    let disk = Disk::new(factory.create(&writable(factory))).expect("backend geometry is valid");
    let ss = disk.sector_size() as usize;
    let len = (disk.sector_count() as usize * ss).min(256 << 10);
    check(&disk, len);
}

fn check(disk: &Disk, len: usize) {
    let ss = disk.sector_size() as usize;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let buf = OwnedRequestBuffers::new(len);
            let mut value = 1u8;
            while !stop.load(Ordering::Relaxed) {
                buf.copy_from_slice(&vec![value; len]);
                block_on(disk.write_vectored(&buf.buffers(false), 0, false)).expect("write");
                value = value.wrapping_add(1).max(1);
            }
        });
        let back = OwnedRequestBuffers::new(len);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for read in 0..READS {
                block_on(disk.read_vectored(&back.buffers(true), 0)).expect("read");
                let data = back.to_vec();
                for (index, sector) in data.chunks(ss).enumerate() {
                    assert!(
                        sector.iter().all(|&b| b == sector[0]),
                        "read {read}: sector {index} is torn (starts {:#x}, holds {:#x} too)",
                        sector[0],
                        sector.iter().find(|&&b| b != sector[0]).unwrap()
                    );
                }
            }
        }));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}
