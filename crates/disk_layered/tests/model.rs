//! Random multi-layer stacks driven by random reads, writes and unmaps, checked against a
//! reference that applies the layer rules directly (`support/reference.rs`): the first layer
//! from the top that holds a sector (within the clamp) supplies it, zeros otherwise; read
//! caches fill gaps from below; writes land on the write path; unmap drops or zeroes per
//! `next_is_zero`.
//!
//! Seeds: `DISK_CONFORMANCE_SEED=N` replays one, `DISK_CONFORMANCE_SEEDS=K` runs more.

#[allow(dead_code)]
#[path = "support/reference.rs"]
mod reference;

use disk_backend::DiskError;
use futures::executor::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reference::{LayerPlan, SS, Stack, StackPlan, sector_data};
use request_buffers::OwnedRequestBuffers;

fn random_plan(rng: &mut StdRng) -> StackPlan {
    let count = rng.random_range(1..=4usize);
    let top = rng.random_range(32..=128u64);
    let mut plan = StackPlan {
        layers: (0..count)
            .map(|index| {
                let sector_count = if index == 0 {
                    top
                } else {
                    rng.random_range(16..=top + 32)
                };
                LayerPlan {
                    sector_count,
                    full: rng.random_bool(0.5),
                    read_cache: rng.random_bool(0.3),
                    prefill: (0..rng.random_range(0..sector_count / 2))
                        .map(|_| (rng.random_range(0..sector_count), rng.random()))
                        .collect(),
                }
            })
            .collect(),
        write_path: rng.random_range(1..=count),
    };
    plan.normalize();
    plan
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for stack_index in 0..40 {
        let mut stack = Stack::build(&random_plan(&mut rng));
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
                    let expected = stack.expect_read(sector, sectors);
                    let got = buf.to_vec();
                    if got != expected {
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
                    let bytes: Vec<u8> = (0..sectors)
                        .flat_map(|_| sector_data(rng.random()))
                        .collect();
                    let buf = OwnedRequestBuffers::from_slice(&bytes);
                    block_on(stack.disk.write_vectored(
                        &buf.buffers(false),
                        sector,
                        rng.random_bool(0.2),
                    ))
                    .unwrap_or_else(|e| panic!("{}: write failed: {e}", context()));
                    stack.apply_write(sector, &bytes);
                }
                8 => {
                    block_on(stack.disk.unmap(sector, sectors, false))
                        .unwrap_or_else(|e| panic!("{}: unmap failed: {e}", context()));
                    stack.apply_unmap(sector, sectors);
                }
                _ => {
                    // Out of range: refused, and nothing changes (later reads check that).
                    let buf = OwnedRequestBuffers::from_slice(&vec![0xee; sectors as usize * SS]);
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
