//! Crash consistency in process: the image lives on a host disk with a volatile write cache
//! (writes not yet flushed may or may not survive, each on its own), and the test "crashes"
//! at random moments, keeping a random subset of the unflushed writes. Every crashed image
//! must pass `qemu-img check` without corruption (leaked clusters allowed), and every sector
//! not written since the last completed flush (or last written by a FUA write) must read back
//! as it was then.
//! `QCOW2_CRASH_ROUNDS=1000 cargo test -p disk_qcow2 --release --test crash` is the long run.

mod support;

use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior, check_range};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use disk_qcow2::{CreateOptions, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use futures::executor::block_on;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use request_buffers::{MemoryRead, MemoryWrite, OwnedRequestBuffers, RequestBuffers};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use support::have_qemu;

const SECTOR: usize = 512;

/// A disk whose writes sit in a volatile cache until a flush (FUA writes are durable at once).
struct CacheDisk {
    sectors: u64,
    state: Mutex<CacheState>,
    /// Writes and flushes to fail from now on (an injected i/o error each).
    failures: std::sync::atomic::AtomicU32,
}

impl CacheDisk {
    fn new(sectors: u64, state: CacheState) -> Self {
        Self {
            sectors,
            state: Mutex::new(state),
            failures: Default::default(),
        }
    }

    fn inject(&self) -> Result<(), DiskError> {
        use std::sync::atomic::Ordering;
        let failing = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            Err(DiskError::Io(std::io::Error::other("injected")))
        } else {
            Ok(())
        }
    }
}

#[derive(Default)]
struct CacheState {
    /// What reads see.
    current: HashMap<u64, Vec<u8>>,
    /// What survives a crash for sure.
    durable: HashMap<u64, Vec<u8>>,
    /// Unflushed writes, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
}

impl CacheDisk {
    /// The image after a crash: what was durable plus each unflushed sector write with
    /// probability one half.
    fn crash(&self, rng: &mut StdRng) -> HashMap<u64, Vec<u8>> {
        let state = self.state.lock();
        let mut image = state.durable.clone();
        for (sector, data) in &state.pending {
            if rng.random_bool(0.5) {
                image.insert(*sector, data.clone());
            }
        }
        image
    }
}

impl DiskIo for CacheDisk {
    fn disk_type(&self) -> &str {
        "cache"
    }
    fn sector_count(&self) -> u64 {
        self.sectors
    }
    fn sector_size(&self) -> u32 {
        SECTOR as u32
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        None
    }
    fn physical_sector_size(&self) -> u32 {
        SECTOR as u32
    }
    fn is_fua_respected(&self) -> bool {
        true
    }
    fn is_read_only(&self) -> bool {
        false
    }
    async fn read_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
    ) -> Result<(), DiskError> {
        check_range(self, sector, buffers.len())?;
        let mut writer = buffers.writer();
        let state = self.state.lock();
        for s in sector..sector + (buffers.len() / SECTOR) as u64 {
            match state.current.get(&s) {
                Some(data) => writer.write(data)?,
                None => writer.zero(SECTOR)?,
            }
        }
        Ok(())
    }
    async fn write_vectored(
        &self,
        buffers: &RequestBuffers<'_>,
        sector: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        check_range(self, sector, buffers.len())?;
        self.inject()?;
        let mut data = vec![0; buffers.len()];
        buffers.reader().read(&mut data)?;
        let mut state = self.state.lock();
        if fua {
            // A durable write supersedes older cached writes of the same sectors.
            let end = sector + (data.len() / SECTOR) as u64;
            state.pending.retain(|(s, _)| !(sector..end).contains(s));
        }
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            let s = sector + i as u64;
            state.current.insert(s, chunk.to_vec());
            if fua {
                state.durable.insert(s, chunk.to_vec());
            } else {
                state.pending.push((s, chunk.to_vec()));
            }
        }
        Ok(())
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        self.inject()?;
        let mut state = self.state.lock();
        let pending = std::mem::take(&mut state.pending);
        for (s, data) in pending {
            state.durable.insert(s, data);
        }
        Ok(())
    }
    async fn unmap(&self, _: u64, _: u64, _: bool) -> Result<(), DiskError> {
        Ok(())
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        UnmapBehavior::Ignored
    }
}

fn open_stack(host: Disk, read_only: bool) -> Disk {
    let layer = block_on(Qcow2Layer::open(
        ImageFile::new(host, None),
        &Qcow2Options {
            read_only,
            // Small caches, so write-back on cache pressure happens too.
            cache_bytes: 0,
        },
    ))
    .unwrap();
    Disk::new(
        LayeredDisk::new(
            read_only,
            vec![LayerConfiguration::new(DiskLayer::new(Qcow2Attach(
                Arc::new(layer),
            )))],
        )
        .unwrap(),
    )
    .unwrap()
}

/// `qemu-img check` on the image made of `sectors`: no corruption (leaked clusters allowed).
fn check_image(sectors: &HashMap<u64, Vec<u8>>, what: &str) {
    if !have_qemu() {
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let end = sectors.keys().max().map_or(0, |s| s + 1);
    let mut bytes = vec![0u8; end as usize * SECTOR];
    for (s, data) in sectors {
        bytes[*s as usize * SECTOR..(*s as usize + 1) * SECTOR].copy_from_slice(data);
    }
    std::fs::write(file.path(), &bytes).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(file.path())
        .output()
        .unwrap();
    // 0: clean; 3: leaked clusters only. 2 would be corruption.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rounds per geometry: `rounds`, or `QCOW2_CRASH_ROUNDS` for a long run on demand.
fn crashes(options: CreateOptions, seed: u64, rounds: usize) {
    let rounds = std::env::var("QCOW2_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(rounds);
    let mut rng = StdRng::seed_from_u64(seed);
    let size = options.size as usize;
    let sectors = options.size / SECTOR as u64;
    let host_sectors = (options.size * 3) / SECTOR as u64 + 4096;
    for round in 0..rounds {
        let cache = Arc::new(CacheDisk::new(host_sectors, CacheState::default()));
        let host = Disk::new(cache.clone()).unwrap();
        block_on(Qcow2Layer::create(
            &ImageFile::new(host.clone(), None),
            &options,
        ))
        .unwrap();
        let disk = open_stack(host, false);
        let mut flushed = vec![0u8; size];
        let mut model = vec![0u8; size];
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        let ops = rng.random_range(1..80);
        let mut log = Vec::new();
        for _ in 0..ops {
            let count = rng.random_range(1..=160u64);
            let sector = rng.random_range(0..=sectors - count);
            let at = sector as usize * SECTOR;
            let len = count as usize * SECTOR;
            match rng.random_range(0..10) {
                0..6 => {
                    let mut data = vec![0; len];
                    rng.fill_bytes(&mut data);
                    let buf = OwnedRequestBuffers::from_slice(&data);
                    let fua = rng.random_bool(0.1);
                    block_on(disk.write_vectored(&buf.buffers(false), sector, fua)).unwrap();
                    model[at..at + len].copy_from_slice(&data);
                    if fua {
                        // Durable on completion, mapping included.
                        flushed[at..at + len].copy_from_slice(&data);
                        for s in sector..sector + count {
                            touched.remove(&s);
                        }
                    } else {
                        touched.extend(sector..sector + count);
                    }
                    log.push(format!("write {sector}+{count} fua {fua}"));
                }
                6..8 => {
                    log.push(format!("unmap {sector}+{count}"));
                    block_on(disk.unmap(sector, count, false)).unwrap();
                    model[at..at + len].fill(0);
                    touched.extend(sector..sector + count);
                }
                _ => {
                    log.push("flush".to_string());
                    block_on(disk.sync_cache()).unwrap();
                    flushed.copy_from_slice(&model);
                    touched.clear();
                }
            }
        }
        // Crash: the layer's cached metadata is lost with the process.
        let image = cache.crash(&mut rng);
        std::mem::forget(disk);

        let crashed = Arc::new(CacheDisk::new(
            host_sectors,
            CacheState {
                current: image.clone(),
                durable: image.clone(),
                pending: Vec::new(),
            },
        ));
        check_image(&image, &format!("round {round}"));
        let disk = open_stack(Disk::new(crashed.clone()).unwrap(), true);
        let buf = OwnedRequestBuffers::new(size);
        block_on(disk.read_vectored(&buf.buffers(true), 0)).unwrap();
        let back = buf.to_vec();
        for s in 0..sectors {
            if touched.contains(&s) {
                continue;
            }
            let r = s as usize * SECTOR..(s as usize + 1) * SECTOR;
            assert!(
                back[r.clone()] == flushed[r.clone()],
                "round {round}: sector {s}, flushed before the crash, reads back differently ({:?} vs {:?}): {log:#?}",
                &back[r.start..r.start + 8],
                &flushed[r.start..r.start + 8]
            );
        }
        drop(disk);
        // And the crashed image stays writable.
        let disk = open_stack(Disk::new(crashed).unwrap(), false);
        let buf = OwnedRequestBuffers::from_slice(&[1; 4096]);
        block_on(disk.write_vectored(&buf.buffers(false), 0, true)).unwrap();
    }
}

#[test]
fn crashes_64k_clusters() {
    crashes(CreateOptions::new(4 << 20), 1, 40);
}

#[test]
fn crashes_512_byte_clusters_8_bit_refcounts() {
    // Refcount blocks of 512 entries: blocks and refcount tables are created as the image
    // grows, so their ordering is exercised too.
    crashes(
        CreateOptions {
            cluster_bits: 9,
            refcount_order: 3,
            ..CreateOptions::new(1 << 20)
        },
        2,
        40,
    );
}

#[test]
fn crashes_version_2() {
    crashes(
        CreateOptions {
            cluster_bits: 12,
            version: 2,
            ..CreateOptions::new(2 << 20)
        },
        3,
        40,
    );
}

#[test]
fn crashes_2k_clusters_1_bit_refcounts() {
    crashes(
        CreateOptions {
            cluster_bits: 11,
            refcount_order: 0,
            ..CreateOptions::new(2 << 20)
        },
        4,
        30,
    );
}

/// Writes and flushes of the image file fail at random moments (each failure an i/o error
/// the layer passes up), then the file works again: after a flush the image passes
/// `qemu-img check` without corruption, and what succeeded reads back.
#[test]
fn failed_writes_leave_a_consistent_image() {
    let mut rng = StdRng::seed_from_u64(77);
    let options = CreateOptions {
        cluster_bits: 10,
        refcount_order: 2,
        ..CreateOptions::new(1 << 20)
    };
    let size = options.size as usize;
    let sectors = options.size / SECTOR as u64;
    for round in 0..30 {
        let cache = Arc::new(CacheDisk::new(sectors * 4, CacheState::default()));
        let host = Disk::new(cache.clone()).unwrap();
        block_on(Qcow2Layer::create(
            &ImageFile::new(host.clone(), None),
            &options,
        ))
        .unwrap();
        let disk = open_stack(host, false);
        let mut model = vec![0u8; size];
        let mut unknown: BTreeSet<u64> = BTreeSet::new();
        for _ in 0..60 {
            if rng.random_bool(0.1) {
                cache
                    .failures
                    .store(rng.random_range(1..4), std::sync::atomic::Ordering::Relaxed);
            }
            let count = rng.random_range(1..=64u64);
            let sector = rng.random_range(0..=sectors - count);
            let at = sector as usize * SECTOR;
            let len = count as usize * SECTOR;
            let result = match rng.random_range(0..10) {
                0..7 => {
                    let mut data = vec![0; len];
                    rng.fill_bytes(&mut data);
                    let buf = OwnedRequestBuffers::from_slice(&data);
                    let r = block_on(disk.write_vectored(&buf.buffers(false), sector, false));
                    if r.is_ok() {
                        model[at..at + len].copy_from_slice(&data);
                    }
                    r
                }
                7..9 => {
                    let r = block_on(disk.unmap(sector, count, false));
                    if r.is_ok() {
                        model[at..at + len].fill(0);
                    }
                    r
                }
                _ => block_on(disk.sync_cache()),
            };
            if result.is_err() {
                // A failed request may have changed its sectors, or not.
                unknown.extend(sector..sector + count);
            } else {
                for s in sector..sector + count {
                    unknown.remove(&s);
                }
            }
        }
        cache
            .failures
            .store(0, std::sync::atomic::Ordering::Relaxed);
        block_on(disk.sync_cache()).unwrap();
        let buf = OwnedRequestBuffers::new(size);
        block_on(disk.read_vectored(&buf.buffers(true), 0)).unwrap();
        let back = buf.to_vec();
        for s in 0..sectors {
            let r = s as usize * SECTOR..(s as usize + 1) * SECTOR;
            assert!(
                unknown.contains(&s) || back[r.clone()] == model[r],
                "round {round}: sector {s} lost a successful write"
            );
        }
        std::mem::forget(disk);
        let image = cache.state.lock().durable.clone();
        check_image(&image, &format!("round {round} after injected failures"));
    }
}
