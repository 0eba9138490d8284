//! Random multi-layer stacks driven by random reads, writes and unmaps, checked against a
//! reference that applies the layer rules directly: first layer from the top holding a
//! sector (within the clamp) supplies it, zeros otherwise; read caches fill gaps from below;
//! writes land on the write path; unmap drops or zeroes per `next_is_zero`.
//!
//! Seeds: `DISK_CONFORMANCE_SEED=N` replays one, `DISK_CONFORMANCE_SEEDS=K` runs more.

use disk_backend::{Disk, DiskError, DiskIo};
use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayerIo, LayeredDisk};
use disk_ram::{RamDisk, RamLayer};
use futures::executor::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::OwnedRequestBuffers;
use std::collections::HashMap;
use std::sync::Arc;

const SS: usize = 512;

/// The reference for one layer.
struct ModelLayer {
    sector_count: u64,
    /// Sectors held and their data. A "full" layer (a disk) holds every sector.
    held: HashMap<u64, Vec<u8>>,
    full: bool,
    read_cache: bool,
}

impl ModelLayer {
    fn get(&self, sector: u64) -> Option<Vec<u8>> {
        match self.held.get(&sector) {
            Some(data) => Some(data.clone()),
            None if self.full => Some(vec![0; SS]),
            None => None,
        }
    }
}

struct Stack {
    disk: Disk,
    model: Vec<ModelLayer>,
    write_path: usize,
}

fn data(rng: &mut StdRng) -> Vec<u8> {
    let b: u8 = rng.random_range(1..=255);
    (0..SS).map(|i| b ^ (i as u8)).collect()
}

fn build(rng: &mut StdRng) -> Stack {
    let count = rng.random_range(1..=4usize);
    let top_count = rng.random_range(32..=128u64);
    let mut model = Vec::new();
    let mut configs = Vec::new();
    // The write path reaches `write_path` layers from the top.
    let write_path = rng.random_range(1..=count);
    for index in 0..count {
        let bottom = index == count - 1;
        let on_path = index < write_path;
        // Write-path layers are at least as large as the top so writes fit all of them.
        let sector_count = if index == 0 {
            top_count
        } else if on_path {
            rng.random_range(top_count..=top_count + 32)
        } else {
            rng.random_range(16..=top_count + 32)
        };
        let full = bottom && rng.random_bool(0.5);
        let write_through = on_path && index + 1 < write_path;
        let read_cache = !bottom && !full && rng.random_bool(0.3);
        let mut layer = ModelLayer {
            sector_count,
            held: HashMap::new(),
            full,
            read_cache,
        };
        // Pre-populate some sectors.
        let prefill: Vec<(u64, Vec<u8>)> = (0..rng.random_range(0..sector_count / 2))
            .map(|_| (rng.random_range(0..sector_count), data(rng)))
            .collect();
        let disk_layer = if full {
            let ram = RamDisk::new(sector_count, SS as u32).unwrap();
            for (s, d) in &prefill {
                let buf = OwnedRequestBuffers::from_slice(d);
                block_on(ram.write_vectored(&buf.buffers(false), *s, false)).unwrap();
            }
            DiskLayer::new(DiskAsLayer::new(Disk::new(ram).unwrap()))
        } else {
            let ram = Arc::new(RamLayer::new(sector_count, SS as u32).unwrap());
            for (s, d) in &prefill {
                let buf = OwnedRequestBuffers::from_slice(d);
                block_on(ram.write(&buf.buffers(false), *s, false)).unwrap();
            }
            DiskLayer::new(ram)
        };
        layer.held.extend(prefill);
        model.push(layer);
        configs.push(LayerConfiguration {
            layer: disk_layer,
            write_through,
            read_cache,
        });
    }
    let disk = Disk::new(LayeredDisk::new(false, configs).unwrap()).unwrap();
    Stack {
        disk,
        model,
        write_path,
    }
}

impl Stack {
    /// The expected contents of `sector`, and the index of the layer that supplies it.
    fn lookup(&self, sector: u64) -> (Vec<u8>, Option<usize>) {
        let mut visible = u64::MAX;
        for (index, layer) in self.model.iter().enumerate() {
            visible = visible.min(layer.sector_count);
            if sector >= visible {
                break;
            }
            if let Some(data) = layer.get(sector) {
                return (data, Some(index));
            }
        }
        (vec![0; SS], None)
    }

    fn read(&mut self, sector: u64, sectors: u64) -> Vec<u8> {
        let mut expected = Vec::new();
        for s in sector..sector + sectors {
            let (data, from) = self.lookup(s);
            // Every read cache above the supplier learns the sector.
            if let Some(from) = from {
                for cache in 0..from {
                    if self.model[cache].read_cache && !self.model[cache].held.contains_key(&s) {
                        self.model[cache].held.insert(s, data.clone());
                    }
                }
            }
            expected.extend(data);
        }
        expected
    }

    fn write(&mut self, sector: u64, data: &[u8]) {
        for layer in &mut self.model[..self.write_path] {
            for (i, chunk) in data.chunks(SS).enumerate() {
                layer.held.insert(sector + i as u64, chunk.to_vec());
            }
        }
    }

    fn unmap(&mut self, sector: u64, count: u64) {
        let last = self.model.len() - 1;
        for index in (0..self.write_path).rev() {
            // Every layer here has Zeroes behaviour, so the stack below a write-path layer
            // reads as zeros after its unmap iff it is the bottom or the next is on the path.
            let next_is_zero = index == last || index + 1 < self.write_path;
            let layer = &mut self.model[index];
            for s in sector..sector + count {
                if layer.full || !next_is_zero {
                    layer.held.insert(s, vec![0; SS]);
                } else {
                    layer.held.remove(&s);
                }
            }
        }
    }
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for stack_index in 0..40 {
        let mut stack = build(&mut rng);
        let sector_count = stack.disk.sector_count();
        for op in 0..60 {
            let sectors = rng.random_range(1..=16u64.min(sector_count));
            let sector = rng.random_range(0..=sector_count - sectors);
            let context = || {
                format!("seed {seed}, stack {stack_index}, op {op}, {sectors} sectors at {sector}")
            };
            match rng.random_range(0..10) {
                0..5 => {
                    let buf = OwnedRequestBuffers::new(sectors as usize * SS);
                    block_on(stack.disk.read_vectored(&buf.buffers(true), sector)).unwrap();
                    let expected = stack.read(sector, sectors);
                    if buf.to_vec() != expected {
                        let got = buf.to_vec();
                        let bad = (0..sectors as usize)
                            .find(|&i| got[i * SS..][..SS] != expected[i * SS..][..SS])
                            .unwrap();
                        panic!(
                            "{}: sector {} differs (replay with DISK_CONFORMANCE_SEED={seed})",
                            context(),
                            sector + bad as u64
                        );
                    }
                }
                5..8 => {
                    let bytes: Vec<u8> = (0..sectors).flat_map(|_| data(&mut rng)).collect();
                    let buf = OwnedRequestBuffers::from_slice(&bytes);
                    block_on(stack.disk.write_vectored(
                        &buf.buffers(false),
                        sector,
                        rng.random_bool(0.2),
                    ))
                    .unwrap_or_else(|e| panic!("{}: write failed: {e}", context()));
                    stack.write(sector, &bytes);
                }
                8 => {
                    block_on(stack.disk.unmap(sector, sectors, false))
                        .unwrap_or_else(|e| panic!("{}: unmap failed: {e}", context()));
                    stack.unmap(sector, sectors);
                }
                _ => {
                    // Out of range: refused, and nothing changes.
                    let buf = OwnedRequestBuffers::new(sectors as usize * SS);
                    let past = sector_count - sectors + 1 + rng.random_range(0..4);
                    let result =
                        block_on(stack.disk.write_vectored(&buf.buffers(false), past, false));
                    assert!(
                        matches!(result, Err(DiskError::IllegalBlock)),
                        "{}: {result:?}",
                        context()
                    );
                }
            }
        }
    }
}

#[test]
fn random_stacks_match_the_reference() {
    let env = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let first = 0x1a7e_5eed;
    let seeds = match (env("DISK_CONFORMANCE_SEED"), env("DISK_CONFORMANCE_SEEDS")) {
        (Some(seed), _) => seed..seed + 1,
        (None, Some(count)) => first..first + count,
        (None, None) => first..first + 3,
    };
    for seed in seeds {
        run_seed(seed);
    }
}
