//! Model-based random testing against a plain in-memory reference.

use crate::{DiskFactory, DiskSpec, pattern};
use disk_backend::{Disk, DiskError, UnmapBehavior};
use futures::executor::block_on;
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::OwnedRequestBuffers;

/// The seed CI runs.
pub const FIXED_SEED: u64 = 0x5eed_d15c;

/// Rounds of concurrent requests per seed.
const ROUNDS: usize = 120;

/// Largest number of requests in flight at once.
const MAX_IN_FLIGHT: usize = 16;

/// Largest request, in sectors.
const MAX_SECTORS: u64 = 32;

/// The seeds the environment asks random tests to run: `DISK_CONFORMANCE_SEED=N` for seed
/// `N` alone, `DISK_CONFORMANCE_SEEDS=K` for `K` seeds from [`FIXED_SEED`] on (what `cargo
/// xtask stress` sets), and [`FIXED_SEED`] alone otherwise. Other crates' randomised tests
/// use it too, so one variable replays or widens all of them.
pub fn seeds() -> std::ops::Range<u64> {
    let env = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match (env("DISK_CONFORMANCE_SEED"), env("DISK_CONFORMANCE_SEEDS")) {
        (Some(seed), _) => seed..seed + 1,
        (None, Some(count)) => FIXED_SEED..FIXED_SEED.saturating_add(count),
        (None, None) => FIXED_SEED..FIXED_SEED + 1,
    }
}

/// Runs [`model_with_seed`] for each of [`seeds`].
pub fn model(factory: &impl DiskFactory) {
    for seed in seeds() {
        model_with_seed(factory, seed);
    }
}

#[derive(Debug)]
enum Op {
    Read {
        sector: u64,
        sectors: u64,
    },
    Write {
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    Unmap {
        sector: u64,
        sectors: u64,
    },
    Flush,
}

struct Reference {
    data: Vec<u8>,
    /// Whether each sector's contents are known (false after an `Unspecified` unmap).
    known: Vec<bool>,
    sector_size: usize,
}

impl Reference {
    fn bytes(&self, sector: u64, sectors: u64) -> std::ops::Range<usize> {
        let start = sector as usize * self.sector_size;
        start..start + sectors as usize * self.sector_size
    }
}

/// One run of the model test with `seed`: rounds of up to 16 concurrent requests on
/// disjoint ranges (reads, writes with and without FUA, unmaps, flushes, and requests that
/// cross the end of the disk), each checked against the reference; a final full read
/// compares everything.
pub fn model_with_seed(factory: &impl DiskFactory, seed: u64) {
    let spec = DiskSpec {
        sector_count: crate::DEFAULT_SECTOR_COUNT,
        read_only: false,
    };
    let disk = Disk::new(factory.create(&spec)).expect("backend geometry is valid");
    let sector_count = disk.sector_count();
    let ss = disk.sector_size();
    let size = (sector_count * ss as u64) as usize;
    let behavior = disk.unmap_behavior();
    let whole = OwnedRequestBuffers::new(size);
    block_on(disk.read_vectored(&whole.buffers(true), 0)).expect("initial full read");
    let mut reference = Reference {
        data: whole.to_vec(),
        known: vec![true; sector_count as usize],
        sector_size: ss as usize,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let fail = |round: usize, what: String| -> ! {
        panic!(
            "model test failed (seed {seed}, round {round}; replay with DISK_CONFORMANCE_SEED={seed}): {what}"
        )
    };

    for round in 0..ROUNDS {
        // Pick disjoint ranges so the outcome does not depend on completion order.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut ops = Vec::new();
        let mut out_of_range = Vec::new();
        for _ in 0..rng.random_range(1..=MAX_IN_FLIGHT) {
            if rng.random_ratio(1, 12) {
                ops.push(Op::Flush);
                continue;
            }
            let sectors = rng.random_range(1..=MAX_SECTORS.min(sector_count));
            if rng.random_ratio(1, 16) {
                // A request that crosses or lies past the end: must fail and change nothing.
                let sector = rng.random_range(sector_count - sectors + 1..=sector_count + 2);
                out_of_range.push((sector, sectors, rng.random_bool(0.5)));
                continue;
            }
            let sector = rng.random_range(0..=sector_count - sectors);
            if taken
                .iter()
                .any(|&(s, n)| sector < s + n && s < sector + sectors)
            {
                continue;
            }
            taken.push((sector, sectors));
            ops.push(match rng.random_range(0..10) {
                0..4 => Op::Read { sector, sectors },
                4..8 => Op::Write {
                    sector,
                    sectors,
                    fua: rng.random_ratio(1, 4),
                },
                _ => Op::Unmap { sector, sectors },
            });
        }

        let buffers: Vec<OwnedRequestBuffers> = ops
            .iter()
            .map(|op| match *op {
                Op::Read { sectors, .. } | Op::Write { sectors, .. } => {
                    let len = (sectors * ss as u64) as usize;
                    let owned = if rng.random_bool(0.5) {
                        OwnedRequestBuffers::new(len)
                    } else {
                        OwnedRequestBuffers::scattered(len, rng.random_range(0..4096))
                    };
                    if let Op::Write { sector, .. } = *op {
                        owned.copy_from_slice(&pattern(ss, sector, sectors, rng.random()));
                    }
                    owned
                }
                _ => OwnedRequestBuffers::new(0),
            })
            .collect();

        let results = block_on(join_all(ops.iter().zip(&buffers).map(|(op, buf)| {
            let disk = &disk;
            async move {
                match *op {
                    Op::Read { sector, .. } => disk.read_vectored(&buf.buffers(true), sector).await,
                    Op::Write { sector, fua, .. } => {
                        disk.write_vectored(&buf.buffers(false), sector, fua).await
                    }
                    Op::Unmap { sector, sectors } => disk.unmap(sector, sectors, false).await,
                    Op::Flush => disk.sync_cache().await,
                }
            }
        })));

        for ((op, buf), result) in ops.iter().zip(&buffers).zip(results) {
            if let Err(e) = result {
                fail(round, format!("{op:?} failed: {e:?}"));
            }
            match *op {
                Op::Read { sector, sectors } => {
                    let got = buf.to_vec();
                    for i in 0..sectors {
                        let s = sector + i;
                        if !reference.known[s as usize] {
                            continue;
                        }
                        let want = &reference.data[reference.bytes(s, 1)];
                        let have = &got[i as usize * ss as usize..][..ss as usize];
                        if want != have {
                            fail(round, format!("{op:?}: sector {s} holds the wrong data"));
                        }
                    }
                }
                Op::Write {
                    sector, sectors, ..
                } => {
                    let range = reference.bytes(sector, sectors);
                    reference.data[range].copy_from_slice(&buf.to_vec());
                    reference.known[sector as usize..(sector + sectors) as usize].fill(true);
                }
                Op::Unmap { sector, sectors } => {
                    let sectors_range = sector as usize..(sector + sectors) as usize;
                    match behavior {
                        UnmapBehavior::Zeroes => {
                            let range = reference.bytes(sector, sectors);
                            reference.data[range].fill(0);
                        }
                        UnmapBehavior::Unspecified => reference.known[sectors_range].fill(false),
                        UnmapBehavior::Ignored => {}
                    }
                }
                Op::Flush => {}
            }
        }

        for (sector, sectors, write) in out_of_range {
            let buf = OwnedRequestBuffers::from_slice(&pattern(ss, sector, sectors, 0xee));
            let result = if write {
                block_on(disk.write_vectored(&buf.buffers(false), sector, false))
            } else {
                block_on(disk.read_vectored(&buf.buffers(true), sector))
            };
            if !matches!(result, Err(DiskError::IllegalBlock)) {
                fail(
                    round,
                    format!(
                        "{} of {sectors} sectors at {sector} (disk has {sector_count}) returned {result:?}, not IllegalBlock",
                        if write { "write" } else { "read" }
                    ),
                );
            }
        }
    }

    block_on(disk.read_vectored(&whole.buffers(true), 0)).expect("final full read");
    let got = whole.to_vec();
    for s in 0..sector_count {
        let range = reference.bytes(s, 1);
        if reference.known[s as usize] && got[range.clone()] != reference.data[range] {
            fail(
                ROUNDS,
                format!("final read: sector {s} holds the wrong data"),
            );
        }
    }
}
