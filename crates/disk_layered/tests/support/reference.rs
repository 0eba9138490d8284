//! A layered stack built from a plan, and a reference that predicts what it must return by
//! applying the layer rules directly. Shared by `tests/model.rs` and the `layered` fuzz
//! target, so both check the same semantics.

use disk_backend::{Disk, DiskIo};
use disk_layered::{DiskAsLayer, DiskLayer, LayerConfiguration, LayerIo, LayeredDisk};
use disk_ram::{RamDisk, RamLayer};
use futures::executor::block_on;
use request_buffers::OwnedRequestBuffers;
use std::collections::HashMap;
use std::sync::Arc;

/// Sector size of every planned stack.
pub const SS: usize = 512;

/// The most layers a plan keeps.
pub const MAX_LAYERS: usize = 4;

/// The largest layer a plan keeps, in sectors.
pub const MAX_SECTORS: u64 = 256;

/// One layer of a plan.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub sector_count: u64,
    /// A disk layer holding every sector (only at the bottom), rather than a RAM layer.
    pub full: bool,
    pub read_cache: bool,
    /// Sectors written into the layer before the stack is built, with a data seed.
    pub prefill: Vec<(u64, u8)>,
}

/// A stack to build: layers top first; writes reach the top `write_path` layers.
#[derive(Debug, Clone)]
pub struct StackPlan {
    pub layers: Vec<LayerPlan>,
    pub write_path: usize,
}

impl StackPlan {
    /// Turns any plan into a valid one, so arbitrary input always builds: 1 to 4 layers,
    /// sizes within bounds, write-path layers at least as large as the top (so writes fit
    /// them all), read caches and disk layers only where the rules allow them.
    pub fn normalize(&mut self) {
        if self.layers.is_empty() {
            self.layers.push(LayerPlan {
                sector_count: 1,
                full: false,
                read_cache: false,
                prefill: Vec::new(),
            });
        }
        self.layers.truncate(MAX_LAYERS);
        let count = self.layers.len();
        self.write_path = self.write_path.clamp(1, count);
        let top = self.layers[0].sector_count.clamp(1, MAX_SECTORS);
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let bottom = index == count - 1;
            layer.sector_count = if index < self.write_path {
                layer.sector_count.clamp(top, MAX_SECTORS.max(top))
            } else {
                layer.sector_count.clamp(1, MAX_SECTORS)
            };
            layer.full &= bottom;
            layer.read_cache &= !bottom && !layer.full;
            let sectors = layer.sector_count;
            layer.prefill.retain(|&(s, _)| s < sectors);
        }
    }
}

/// The contents of a sector written with data seed `seed` (never all zero).
pub fn sector_data(seed: u8) -> Vec<u8> {
    (0..SS).map(|i| seed ^ (i as u8) | 1).collect()
}

struct ModelLayer {
    sector_count: u64,
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

/// A built stack and its reference.
pub struct Stack {
    pub disk: Disk,
    model: Vec<ModelLayer>,
    write_path: usize,
}

impl Stack {
    /// Builds the (normalized) plan.
    pub fn build(plan: &StackPlan) -> Self {
        let count = plan.layers.len();
        let mut model = Vec::new();
        let mut configs = Vec::new();
        for (index, layer) in plan.layers.iter().enumerate() {
            let prefill: Vec<(u64, Vec<u8>)> = layer
                .prefill
                .iter()
                .map(|&(s, seed)| (s, sector_data(seed)))
                .collect();
            let disk_layer = if layer.full {
                let ram = RamDisk::new(layer.sector_count, SS as u32).unwrap();
                for (s, d) in &prefill {
                    let buf = OwnedRequestBuffers::from_slice(d);
                    block_on(ram.write_vectored(&buf.buffers(false), *s, false)).unwrap();
                }
                DiskLayer::new(DiskAsLayer::new(Disk::new(ram).unwrap()))
            } else {
                let ram = Arc::new(RamLayer::new(layer.sector_count, SS as u32).unwrap());
                for (s, d) in &prefill {
                    let buf = OwnedRequestBuffers::from_slice(d);
                    block_on(ram.write(&buf.buffers(false), *s, false)).unwrap();
                }
                DiskLayer::new(ram)
            };
            configs.push(LayerConfiguration {
                layer: disk_layer,
                write_through: index + 1 < plan.write_path,
                read_cache: layer.read_cache,
            });
            model.push(ModelLayer {
                sector_count: layer.sector_count,
                held: prefill.into_iter().collect(),
                full: layer.full,
                read_cache: layer.read_cache,
            });
        }
        assert_eq!(model.len(), count);
        let disk = Disk::new(LayeredDisk::new(false, configs).unwrap()).unwrap();
        Self {
            disk,
            model,
            write_path: plan.write_path,
        }
    }

    /// The expected contents of `sector` and the index of the layer that supplies it.
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

    /// What a read must return, updating the read caches it fills.
    pub fn expect_read(&mut self, sector: u64, sectors: u64) -> Vec<u8> {
        let mut expected = Vec::new();
        for s in sector..sector + sectors {
            let (data, from) = self.lookup(s);
            if let Some(from) = from {
                for cache in &mut self.model[..from] {
                    if cache.read_cache && !cache.held.contains_key(&s) {
                        cache.held.insert(s, data.clone());
                    }
                }
            }
            expected.extend(data);
        }
        expected
    }

    /// Applies a completed write.
    pub fn apply_write(&mut self, sector: u64, data: &[u8]) {
        for layer in &mut self.model[..self.write_path] {
            for (i, chunk) in data.chunks(SS).enumerate() {
                layer.held.insert(sector + i as u64, chunk.to_vec());
            }
        }
    }

    /// Applies a completed unmap.
    pub fn apply_unmap(&mut self, sector: u64, count: u64) {
        let last = self.model.len() - 1;
        for index in (0..self.write_path).rev() {
            // Every layer here unmaps to zeros, so the stack below a write-path layer reads
            // as zeros after its unmap iff it is the bottom or the next layer is on the path.
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
