//! The layer rules, one by one.

mod support;

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_layered::{
    DiskAsLayer, DiskLayer, InvalidLayeredDisk, LayerConfiguration, LayerIo, LayeredDisk,
};
use disk_ram::{RamDisk, RamLayer};
use futures::FutureExt;
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;
use support::ProbeLayer;

fn cfg(
    layer: impl disk_layered::LayerAttach,
    write_through: bool,
    read_cache: bool,
) -> LayerConfiguration {
    LayerConfiguration {
        layer: DiskLayer::new(layer),
        write_through,
        read_cache,
    }
}

/// Writes `value` into `sectors` sectors at `sector` of a layer directly.
fn fill(layer: &impl LayerIo, sector: u64, sectors: usize, value: u8) {
    let data = OwnedRequestBuffers::from_slice(&vec![value; sectors * 512]);
    block_on(layer.write(&data.buffers(false), sector, false)).unwrap();
}

/// The first byte of each sector read from `disk`.
fn read_bytes(disk: &impl DiskIo, sector: u64, sectors: usize) -> Vec<u8> {
    let buf = OwnedRequestBuffers::new(sectors * 512);
    block_on(disk.read_vectored(&buf.buffers(true), sector)).unwrap();
    buf.to_vec().chunks(512).map(|s| s[0]).collect()
}

fn read_only_disk(sectors: u64) -> Disk {
    Disk::new(RamDisk::new(sectors, 512).unwrap().with_read_only(true)).unwrap()
}

#[test]
fn construction_errors() {
    use InvalidLayeredDisk as E;
    let err = |read_only, layers| LayeredDisk::new(read_only, layers).unwrap_err();
    assert!(matches!(err(false, vec![]), E::NoLayers));
    assert!(matches!(
        err(
            false,
            vec![
                cfg(RamLayer::new(8, 512).unwrap(), false, false),
                cfg(RamLayer::new(8, 4096).unwrap(), false, false)
            ]
        ),
        E::SectorSizeMismatch {
            index: 1,
            sector_size: 4096,
            expected: 512
        }
    ));
    assert!(matches!(
        err(
            true,
            vec![
                cfg(DiskAsLayer::new(read_only_disk(8)), false, true),
                cfg(RamLayer::new(8, 512).unwrap(), false, false)
            ]
        ),
        E::ReadCacheUnsupported { index: 0 }
    ));
    assert!(matches!(
        err(
            false,
            vec![cfg(RamLayer::new(8, 512).unwrap(), false, true)]
        ),
        E::UselessReadCache { index: 0 }
    ));
    assert!(matches!(
        err(
            false,
            vec![
                cfg(RamLayer::new(8, 512).unwrap(), true, false),
                cfg(RamLayer::new(8, 512).unwrap(), true, false)
            ]
        ),
        E::UselessWriteThrough { index: 1 }
    ));
    assert!(matches!(
        err(
            false,
            vec![cfg(DiskAsLayer::new(read_only_disk(8)), false, false)]
        ),
        E::ReadOnlyLayerOnWritePath { index: 0 }
    ));
    assert!(matches!(
        err(
            false,
            vec![
                cfg(RamLayer::new(8, 512).unwrap(), true, false),
                cfg(DiskAsLayer::new(read_only_disk(8)), false, false)
            ]
        ),
        E::ReadOnlyLayerOnWritePath { index: 1 }
    ));
    let attach = err(false, vec![cfg(RamLayer::lazy(), false, false)]);
    assert!(matches!(attach, E::Attach { index: 0, .. }));
    assert!(std::error::Error::source(&attach).is_some());
    // A read-only disk may have read-only layers anywhere, and a read-only layer below the
    // write path is fine for a writable disk.
    LayeredDisk::new(
        true,
        vec![cfg(DiskAsLayer::new(read_only_disk(8)), false, false)],
    )
    .unwrap();
    LayeredDisk::new(
        false,
        vec![
            cfg(RamLayer::new(8, 512).unwrap(), false, false),
            cfg(DiskAsLayer::new(read_only_disk(8)), false, false),
        ],
    )
    .unwrap();
}

#[test]
fn reads_fall_through_and_lower_layers_are_clamped() {
    let top = Arc::new(RamLayer::new(16, 512).unwrap());
    let middle = Arc::new(RamLayer::new(8, 512).unwrap());
    let bottom = Arc::new(RamLayer::new(32, 512).unwrap());
    fill(&*top, 1, 1, 1);
    fill(&*middle, 1, 3, 2); // sector 1 is hidden by the top layer
    fill(&*bottom, 0, 32, 3);
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(top.clone(), false, false),
            cfg(middle.clone(), false, false),
            cfg(bottom.clone(), false, false),
        ],
    )
    .unwrap();
    assert_eq!(disk.sector_count(), 16);
    // Sectors 8..16 are beyond the middle layer, so the bottom is clamped to 8 as well: zeros.
    assert_eq!(
        read_bytes(&disk, 0, 16),
        [3, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // Sector 16 is past the top layer: out of range even though the bottom has it.
    let one = OwnedRequestBuffers::new(512);
    assert!(matches!(
        block_on(disk.read_vectored(&one.buffers(true), 16)),
        Err(DiskError::IllegalBlock)
    ));
    // Growing the middle layer uncovers the bottom layer's data.
    middle.resize(16).unwrap();
    assert_eq!(read_bytes(&disk, 8, 8), [3; 8]);
}

#[test]
fn read_cache_fills_without_overwriting_and_failures_do_not_fail_reads() {
    let cache = ProbeLayer::new(16);
    let cache_ram = cache.ram.clone();
    let base = Arc::new(RamLayer::new(16, 512).unwrap());
    fill(&*base, 0, 16, 5);
    fill(&*cache_ram, 3, 1, 9); // newer data already in the cache
    let disk = LayeredDisk::new(
        false,
        vec![cfg(cache, true, true), cfg(base.clone(), false, false)],
    )
    .unwrap();
    assert_eq!(read_bytes(&disk, 0, 8), [5, 5, 5, 9, 5, 5, 5, 5]);
    // The cache now holds sectors 0..8 (and kept its own sector 3); change the base behind
    // its back to see that reads are served from the cache.
    fill(&*base, 0, 16, 6);
    assert_eq!(read_bytes(&disk, 0, 10), [5, 5, 5, 9, 5, 5, 5, 5, 6, 6]);
    assert_eq!(cache_ram.allocated_bytes(), 10 * 512);

    let failing = ProbeLayer {
        fail_cache_fill: true,
        ..ProbeLayer::new(16)
    };
    let calls = failing.calls.clone();
    let disk = LayeredDisk::new(
        true,
        vec![cfg(failing, false, true), cfg(base.clone(), false, false)],
    )
    .unwrap();
    assert_eq!(read_bytes(&disk, 0, 4), [6; 4]);
    assert_eq!(calls.lock().cache_fills, 1, "the fill was attempted");
}

#[test]
fn writes_and_flushes_follow_the_write_path_bottom_first() {
    let a = ProbeLayer::new(16);
    let b = ProbeLayer::new(16);
    let c = ProbeLayer::new(16);
    let (ca, cb, cc) = (a.calls.clone(), b.calls.clone(), c.calls.clone());
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(a, true, false),
            cfg(b, false, false),
            cfg(c, false, false),
        ],
    )
    .unwrap();
    assert_eq!(disk.write_path_len(), 2);
    let data = OwnedRequestBuffers::from_slice(&[1; 512]);
    block_on(disk.write_vectored(&data.buffers(false), 4, false)).unwrap();
    block_on(disk.sync_cache()).unwrap();
    let (wa, wb) = (ca.lock().writes.clone(), cb.lock().writes.clone());
    assert_eq!((wa.len(), wb.len(), cc.lock().writes.len()), (1, 1, 0));
    assert!(
        wb[0].0 < wa[0].0,
        "the lower layer of the write path is written first"
    );
    assert_eq!(
        (ca.lock().flushes, cb.lock().flushes, cc.lock().flushes),
        (1, 1, 0)
    );
}

#[test]
fn unmap_passes_next_is_zero_and_merges_behaviour() {
    // Write path a (write-through) -> b, and b is the last layer: b sees zeros below it,
    // and so does a once b (Zeroes) is unmapped.
    let a = ProbeLayer::new(16);
    let b = ProbeLayer::new(16);
    let (ca, cb) = (a.calls.clone(), b.calls.clone());
    let disk = LayeredDisk::new(false, vec![cfg(a, true, false), cfg(b, false, false)]).unwrap();
    block_on(disk.unmap(0, 4, false)).unwrap();
    let (ua, ub) = (ca.lock().unmaps.clone(), cb.lock().unmaps.clone());
    assert_eq!((ua[0].1, ub[0].1), (true, true));
    assert!(ub[0].0 < ua[0].0, "unmap goes bottom first");
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);

    // The write path stops above a layer with data: the top layer must not assume zeros.
    let top = ProbeLayer::new(16);
    let calls = top.calls.clone();
    let base = Arc::new(RamLayer::new(16, 512).unwrap());
    fill(&*base, 0, 16, 7);
    let disk =
        LayeredDisk::new(false, vec![cfg(top, false, false), cfg(base, false, false)]).unwrap();
    block_on(disk.unmap(2, 4, false)).unwrap();
    assert!(!calls.lock().unmaps[0].1);
    assert_eq!(read_bytes(&disk, 0, 8), [7, 7, 0, 0, 0, 0, 7, 7]);

    // Unspecified below Zeroes: the top decides. Ignored over Zeroes: unspecified.
    let unspecified = ProbeLayer {
        unmap_behavior: UnmapBehavior::Unspecified,
        ..ProbeLayer::new(16)
    };
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(ProbeLayer::new(16), true, false),
            cfg(unspecified, false, false),
        ],
    )
    .unwrap();
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Zeroes);
    let ignored = ProbeLayer {
        unmap_behavior: UnmapBehavior::Ignored,
        ..ProbeLayer::new(16)
    };
    let below_unspecified = ProbeLayer {
        unmap_behavior: UnmapBehavior::Unspecified,
        ..ProbeLayer::new(16)
    };
    let calls = ignored.calls.clone();
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(ignored, true, false),
            cfg(below_unspecified, false, false),
        ],
    )
    .unwrap();
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Unspecified);
    block_on(disk.unmap(0, 1, false)).unwrap();
    assert!(
        !calls.lock().unmaps[0].1,
        "an Unspecified layer below is not known to be zero"
    );
}

#[test]
fn fua_identity_and_resize() {
    let no_fua = ProbeLayer {
        fua: false,
        ..ProbeLayer::new(16)
    };
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(ProbeLayer::new(16), true, false),
            cfg(no_fua, false, false),
        ],
    )
    .unwrap();
    assert!(
        !disk.is_fua_respected(),
        "FUA is the AND over the write path"
    );
    let no_fua_below_path = ProbeLayer {
        fua: false,
        ..ProbeLayer::new(16)
    };
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(ProbeLayer::new(16), false, false),
            cfg(no_fua_below_path, false, false),
        ],
    )
    .unwrap();
    assert!(disk.is_fua_respected());

    let with_id = |id| ProbeLayer {
        disk_id: id,
        ..ProbeLayer::new(16)
    };
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(with_id(None), false, false),
            cfg(with_id(Some([2; 16])), false, false),
            cfg(with_id(Some([3; 16])), false, false),
        ],
    )
    .unwrap();
    assert_eq!(disk.disk_id(), Some([2; 16]));

    let top = Arc::new(RamLayer::new(16, 512).unwrap());
    let bottom = Arc::new(RamLayer::new(16, 512).unwrap());
    let disk = Disk::new(
        LayeredDisk::new(
            false,
            vec![
                cfg(top.clone(), false, false),
                cfg(bottom.clone(), false, false),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    bottom.resize(32).unwrap();
    assert!(
        disk.wait_resize(16).now_or_never().is_none(),
        "only the top layer's size counts"
    );
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(16))
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    top.resize(24).unwrap();
    assert_eq!(waiter.join().unwrap(), 24);
    assert_eq!(disk.sector_count(), 24);
}

/// Guest memory announced to the layered disk reaches every layer's disk, even after one of
/// them refuses it; the first refusal is the result.
#[test]
fn register_memory_reaches_every_layer() {
    let probes: Vec<Arc<disk_conformance::MemoryProbe>> = (0..3)
        .map(|_| Arc::new(disk_conformance::MemoryProbe::new(64)))
        .collect();
    // Write-through down to the bottom layer (a write-through bottom layer is useless).
    let layers = probes
        .iter()
        .enumerate()
        .map(|(index, probe)| {
            let layer = DiskAsLayer::new(Disk::new(probe.clone()).unwrap());
            cfg(layer, index < probes.len() - 1, false)
        })
        .collect();
    let disk = Disk::new(LayeredDisk::new(false, layers).unwrap()).unwrap();
    let memory = request_buffers::GuestMemory::allocate(8192);
    disk.register_memory(&memory).unwrap();
    assert!(probes.iter().all(|probe| probe.last_is(&memory)));
    probes[1].set_failing(true);
    assert!(matches!(
        disk.register_memory(&memory),
        Err(DiskError::Io(_))
    ));
    assert!(probes.iter().all(|probe| probe.calls() == 2));
}

/// A RAM layer that, on each write, records what the stack below it holds around the write
/// (through `write_cow`'s reader), as a copy-on-write layer would read it.
struct CowProbe {
    ram: RamLayer,
    seen: parking_lot::Mutex<Vec<(bool, Vec<u8>)>>,
}

impl LayerIo for CowProbe {
    fn layer_type(&self) -> &str {
        "cow-probe"
    }
    fn sector_count(&self) -> u64 {
        self.ram.sector_count()
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn is_fua_respected(&self) -> bool {
        true
    }
    fn is_logically_read_only(&self) -> bool {
        false
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        Ok(())
    }
    async fn read(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
        marker: disk_layered::SectorMarker<'_>,
    ) -> Result<(), DiskError> {
        self.ram.read(buffers, sector, marker).await
    }
    async fn write(
        &self,
        _: &request_buffers::RequestBuffers<'_>,
        _: u64,
        _: bool,
    ) -> Result<(), DiskError> {
        panic!("LayeredDisk writes through write_cow");
    }
    async fn write_cow(
        &self,
        buffers: &request_buffers::RequestBuffers<'_>,
        sector: u64,
        fua: bool,
        below: &disk_layered::LowerLayers<'_>,
    ) -> Result<(), DiskError> {
        let around = OwnedRequestBuffers::new(12 * 512);
        below.read(&around.buffers(true), 0).await?;
        let first: Vec<u8> = around.to_vec().chunks(512).map(|s| s[0]).collect();
        self.seen.lock().push((below.is_empty(), first));
        assert!(matches!(
            below.read(&around.buffers(true), u64::MAX).await,
            Err(DiskError::IllegalBlock)
        ));
        self.ram.write(buffers, sector, fua).await
    }
    async fn unmap(&self, s: u64, c: u64, b: bool, z: bool) -> Result<(), DiskError> {
        self.ram.unmap(s, c, b, z).await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Zeroes
    }
}

#[test]
fn write_cow_reads_the_stack_below_the_writing_layer() {
    let cow = Arc::new(CowProbe {
        ram: RamLayer::new(16, 512).unwrap(),
        seen: Default::default(),
    });
    let middle = RamLayer::new(16, 512).unwrap();
    fill(&middle, 3, 1, 5);
    let bottom = RamDisk::new(8, 512).unwrap();
    let data = OwnedRequestBuffers::from_slice(&[7; 8 * 512]);
    block_on(bottom.write_vectored(&data.buffers(false), 0, false)).unwrap();
    let bottom = Disk::new(bottom.with_read_only(true)).unwrap();
    let disk = LayeredDisk::new(
        false,
        vec![
            cfg(cow.clone(), false, false),
            cfg(middle, false, false),
            cfg(DiskAsLayer::new(bottom), false, false),
        ],
    )
    .unwrap();
    let one = OwnedRequestBuffers::from_slice(&[9; 512]);
    block_on(disk.write_vectored(&one.buffers(false), 2, false)).unwrap();
    // The middle layer's sector 3, the bottom's 7s, zeros past the bottom's end; not the
    // writing layer's own data.
    assert_eq!(
        cow.seen.lock().pop().unwrap(),
        (false, vec![7, 7, 7, 5, 7, 7, 7, 7, 0, 0, 0, 0])
    );
    assert_eq!(read_bytes(&disk, 2, 2), vec![9, 5]);

    // At the bottom there is nothing below: zeros.
    let alone = LayeredDisk::new(false, vec![cfg(cow.clone(), false, false)]).unwrap();
    block_on(alone.write_vectored(&one.buffers(false), 0, false)).unwrap();
    assert_eq!(cow.seen.lock().pop().unwrap(), (true, vec![0; 12]));
}
