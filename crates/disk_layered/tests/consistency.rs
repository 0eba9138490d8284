//! Concurrent requests on layered stacks leave a state that one order of those requests
//! explains, in every layer.
//!
//! The deterministic tests drive requests by hand: a [`GateLayer`] holds calls at a gate,
//! and a small scheduler polls every request and then releases the *newest* held call first,
//! the order that makes a racing request overtake an older one. The threaded tests hammer
//! real files from several threads and compare the layers afterwards.

mod support;

use support::cfg;

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_file::{FileDisk, FileDiskOptions};
use disk_layered::{DiskAsLayer, LayerIo, LayeredDisk, SectorMarker, WriteNoOverwrite};
use disk_ram::{RamDisk, RamLayer};
use futures::executor::block_on;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Which calls of a [`GateLayer`] wait at the gate.
#[derive(Debug, Clone, Copy, Default)]
struct Hold {
    writes: bool,
    unmaps: bool,
    /// Reads wait *after* the inner layer has filled the buffers.
    reads: bool,
    cache_fills: bool,
}

#[derive(Debug, Default)]
struct GateState {
    /// Everything passes: the race is over.
    open: bool,
    next_id: u64,
    held: Vec<u64>,
    released: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
struct Gate(Arc<Mutex<GateState>>);

impl Gate {
    /// Waits until the test releases this call.
    async fn pass(&self) {
        let id = {
            let mut state = self.0.lock();
            if state.open {
                return;
            }
            let id = state.next_id;
            state.next_id += 1;
            state.held.push(id);
            id
        };
        std::future::poll_fn(|_| {
            if self.0.lock().released.contains(&id) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Lets every later call pass.
    fn open(&self) {
        self.0.lock().open = true;
    }

    /// Releases the newest held call; false if none is held.
    fn release_newest(&self) -> bool {
        let mut state = self.0.lock();
        match state.held.pop() {
            Some(id) => {
                state.released.push(id);
                true
            }
            None => false,
        }
    }
}

/// A layer whose chosen calls wait at a [`Gate`].
struct GateLayer<L> {
    inner: L,
    hold: Hold,
    gate: Gate,
}

impl<L: LayerIo> LayerIo for GateLayer<L> {
    fn layer_type(&self) -> &str {
        "gate"
    }
    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        self.inner.physical_sector_size()
    }
    fn is_fua_respected(&self) -> bool {
        self.inner.is_fua_respected()
    }
    fn is_logically_read_only(&self) -> bool {
        self.inner.is_logically_read_only()
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.inner.sync_cache().await
    }
    async fn read(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        marker: SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        self.inner.read(buffers, sector, marker).await?;
        if self.hold.reads {
            self.gate.pass().await;
        }
        Ok(())
    }
    async fn write(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        if self.hold.writes {
            self.gate.pass().await;
        }
        self.inner.write(buffers, sector, fua).await
    }
    async fn unmap(
        &self,
        sector: u64,
        count: u64,
        block_level_only: bool,
        next_is_zero: bool,
    ) -> Result<(), DiskError> {
        if self.hold.unmaps {
            self.gate.pass().await;
        }
        self.inner
            .unmap(sector, count, block_level_only, next_is_zero)
            .await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.inner.unmap_behavior()
    }
    fn write_no_overwrite(&self) -> Option<impl WriteNoOverwrite> {
        self.inner.write_no_overwrite().is_some().then_some(self)
    }
}

impl<L: LayerIo> WriteNoOverwrite for &GateLayer<L> {
    async fn write_no_overwrite(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        if self.hold.cache_fills {
            self.gate.pass().await;
        }
        let writer = self
            .inner
            .write_no_overwrite()
            .expect("checked at construction");
        writer.write_no_overwrite(buffers, sector).await
    }
}

type Request<'a> = Pin<Box<dyn Future<Output = Result<(), DiskError>> + 'a>>;

/// Drives `requests` to completion: polls every one, then releases the newest call held at
/// `gate`, until all are done. Panics if no request can make progress.
fn run_adversarially(gate: &Gate, mut requests: Vec<Request<'_>>, mut between: impl FnMut()) {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut done = vec![false; requests.len()];
    loop {
        for (request, done) in requests.iter_mut().zip(&mut done) {
            if !*done && let Poll::Ready(result) = request.as_mut().poll(&mut cx) {
                result.unwrap();
                *done = true;
            }
        }
        if done.iter().all(|&d| d) {
            gate.open();
            return;
        }
        between();
        assert!(
            gate.release_newest(),
            "no request can make progress and none is held at the gate"
        );
    }
}

fn ram_disk(sectors: u64, value: u8) -> Disk {
    let disk = Disk::new(RamDisk::new(sectors, 512).unwrap()).unwrap();
    let data = OwnedRequestBuffers::from_slice(&vec![value; sectors as usize * 512]);
    block_on(disk.write_vectored(&data.buffers(false), 0, false)).unwrap();
    disk
}

fn read_all(disk: &impl DiskIo, sectors: u64) -> Vec<u8> {
    let buf = OwnedRequestBuffers::new(sectors as usize * 512);
    block_on(disk.read_vectored(&buf.buffers(true), 0)).unwrap();
    buf.to_vec()
}

/// `layered(layer(gate(ram), write_through), bottom)`: the upper layer's chosen calls wait
/// at the gate. Returns the disk.
fn write_through_over(sectors: u64, bottom: &Disk, gate: &Gate, hold: Hold) -> LayeredDisk {
    let top = Arc::new(RamLayer::new(sectors, 512).unwrap());
    LayeredDisk::new(
        false,
        vec![
            cfg(
                GateLayer {
                    inner: top,
                    hold,
                    gate: gate.clone(),
                },
                true,
                false,
            ),
            cfg(DiskAsLayer::new(bottom.clone()), false, false),
        ],
    )
    .unwrap()
}

/// Panics if the stack reads differently from its bottom layer.
fn assert_alike(disk: &LayeredDisk, bottom: &Disk, sectors: u64) {
    let seen = read_all(disk, sectors);
    let stored = read_all(bottom, sectors);
    assert!(
        seen == stored,
        "the layers disagree: the disk reads {:?}.., the lower layer holds {:?}..",
        &seen[..1],
        &stored[..1]
    );
}

/// 128 KiB writes of 'A' and 'B' to sector 0, issued together, with the write-through
/// upper layer's writes held and released newest first.
#[test]
fn overlapping_writes_leave_every_layer_alike() {
    const SECTORS: u64 = 256;
    let gate = Gate::default();
    let bottom = ram_disk(SECTORS, 0);
    let hold = Hold {
        writes: true,
        ..Hold::default()
    };
    let disk = write_through_over(SECTORS, &bottom, &gate, hold);
    let a = OwnedRequestBuffers::from_slice(&vec![b'A'; SECTORS as usize * 512]);
    let b = OwnedRequestBuffers::from_slice(&vec![b'B'; SECTORS as usize * 512]);
    let (a, b) = (a.buffers(false), b.buffers(false));
    run_adversarially(
        &gate,
        vec![
            Box::pin(disk.write_vectored(&a, 0, false)),
            Box::pin(disk.write_vectored(&b, 0, false)),
        ],
        || {},
    );
    block_on(disk.sync_cache()).unwrap();
    assert_alike(&disk, &bottom, SECTORS);
}

/// A write and an unmap of the same range, issued together, with the upper layer's calls
/// held and released newest first.
#[test]
fn a_write_racing_an_unmap_leaves_every_layer_alike() {
    const SECTORS: u64 = 64;
    let gate = Gate::default();
    let bottom = ram_disk(SECTORS, b'O');
    let hold = Hold {
        writes: true,
        unmaps: true,
        ..Hold::default()
    };
    let disk = write_through_over(SECTORS, &bottom, &gate, hold);
    let a = OwnedRequestBuffers::from_slice(&vec![b'A'; SECTORS as usize * 512]);
    let a = a.buffers(false);
    run_adversarially(
        &gate,
        vec![
            Box::pin(disk.write_vectored(&a, 0, false)),
            Box::pin(disk.unmap(0, SECTORS, false)),
        ],
        || {},
    );
    assert_alike(&disk, &bottom, SECTORS);
}

/// A read that missed a write-through read cache, racing an unmap of the same range: the
/// read's cache fill must not bring back the data from before the unmap.
#[test]
fn a_read_racing_an_unmap_does_not_refill_the_cache_with_old_data() {
    const SECTORS: u64 = 8;
    let gate = Gate::default();
    let cache = Arc::new(RamLayer::new(SECTORS, 512).unwrap());
    let bottom = ram_disk(SECTORS, b'O');
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(cache.clone(), true, true),
            cfg(
                GateLayer {
                    inner: DiskAsLayer::new(bottom.clone()),
                    hold: Hold {
                        reads: true,
                        ..Hold::default()
                    },
                    gate: gate.clone(),
                },
                false,
                false,
            ),
        ],
    )
    .unwrap();
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);
    let buf = OwnedRequestBuffers::new(SECTORS as usize * 512);
    let buffers = buf.buffers(true);
    run_adversarially(
        &gate,
        vec![
            Box::pin(disk.read_vectored(&buffers, 0)),
            Box::pin(disk.unmap(0, SECTORS, false)),
        ],
        || {},
    );
    assert!(read_all(&bottom, SECTORS).iter().all(|&b| b == 0));
    assert!(
        read_all(&disk, SECTORS).iter().all(|&b| b == 0),
        "the cache was refilled with data from before the unmap"
    );
}

/// A guest that rewrites its buffer while a read is in flight does not decide what the read
/// cache holds.
#[test]
fn the_read_cache_is_not_filled_from_the_guest_buffer() {
    const SECTORS: u64 = 8;
    let gate = Gate::default();
    let cache = Arc::new(RamLayer::new(SECTORS, 512).unwrap());
    let bottom = ram_disk(SECTORS, b'O');
    let disk = LayeredDisk::new(
        true,
        vec![
            cfg(
                GateLayer {
                    inner: cache.clone(),
                    hold: Hold {
                        cache_fills: true,
                        ..Hold::default()
                    },
                    gate: gate.clone(),
                },
                false,
                true,
            ),
            cfg(DiskAsLayer::new(bottom.clone()), false, false),
        ],
    )
    .unwrap();
    let buf = OwnedRequestBuffers::new(SECTORS as usize * 512);
    let buffers = buf.buffers(true);
    run_adversarially(
        &gate,
        vec![Box::pin(disk.read_vectored(&buffers, 0))],
        // The "guest" scribbles over its buffer while the read waits to fill the cache.
        || buf.copy_from_slice(&vec![b'X'; SECTORS as usize * 512]),
    );
    assert_eq!(
        cache.allocated_bytes(),
        SECTORS * 512,
        "the cache was filled"
    );
    assert!(
        read_all(&disk, SECTORS).iter().all(|&b| b == b'O'),
        "the cache holds what the guest wrote into its buffer"
    );
}

/// Random overlapping writes, unmaps and reads from several threads on stacks over a real
/// file; afterwards every layer of the write path agrees with the file.
fn hammer(read_cache: bool, seed: u64) {
    const SECTORS: u64 = 512;
    const THREADS: usize = 4;
    const OPS: usize = 1000;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(SECTORS * 512).unwrap();
    let bottom =
        Disk::new(FileDisk::open(file.path(), &FileDiskOptions::default()).unwrap()).unwrap();
    let top = Arc::new(RamLayer::new(SECTORS, 512).unwrap());
    let disk = Disk::new(
        LayeredDisk::new(
            false,
            vec![
                cfg(top.clone(), true, read_cache),
                cfg(DiskAsLayer::new(bottom.clone()), false, false),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let disk = disk.clone();
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(100) + t as u64);
                let buf = OwnedRequestBuffers::new(64 * 512);
                for op in 0..OPS {
                    // Few distinct ranges, so that requests overlap all the time.
                    let sector = rng.random_range(0..8u64) * 32;
                    let count = rng.random_range(1..=64u64).min(SECTORS - sector);
                    let buffers = buf.buffers(true).subrange(0, count as usize * 512);
                    match rng.random_range(0..4) {
                        0 | 1 => {
                            buf.copy_from_slice(&vec![(t * OPS + op) as u8; 64 * 512]);
                            block_on(disk.write_vectored(&buffers, sector, false)).unwrap()
                        }
                        2 => block_on(disk.unmap(sector, count, false)).unwrap(),
                        _ => block_on(disk.read_vectored(&buffers, sector)).unwrap(),
                    }
                }
            });
        }
    });
    block_on(disk.sync_cache()).unwrap();
    let stored = read_all(&bottom, SECTORS);
    // What the upper layer holds must be what the file holds; for a read cache, where it
    // holds anything at all.
    let layer_view = LayeredDisk::new(true, vec![cfg(top.clone(), false, false)]).unwrap();
    let held = read_all(&layer_view, SECTORS);
    let seen = read_all(&disk, SECTORS);
    for s in 0..SECTORS as usize {
        let range = s * 512..(s + 1) * 512;
        assert!(
            seen[range.clone()] == stored[range.clone()],
            "seed {seed}: sector {s} reads {} through the stack but the file holds {}",
            seen[s * 512],
            stored[s * 512]
        );
        if !read_cache {
            assert!(
                held[range.clone()] == stored[range],
                "seed {seed}: sector {s}"
            );
        }
    }
}

// `cargo xtask stress` runs these over many seeds (they are named for its filter).
#[test]
fn consistency_of_a_write_through_stack_under_concurrency() {
    for seed in disk_conformance::seeds() {
        hammer(false, seed);
    }
}

#[test]
fn consistency_of_a_write_through_read_cache_under_concurrency() {
    for seed in disk_conformance::seeds() {
        hammer(true, seed);
    }
}
