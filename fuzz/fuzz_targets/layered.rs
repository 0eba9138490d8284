//! Random layered stacks under random reads, writes, unmaps and flushes, with sector
//! numbers and counts anywhere in `u64`. The oracle is exact: a request inside the disk
//! succeeds and returns what the reference predicts; one outside fails with exactly
//! `IllegalBlock` and changes nothing; nothing panics.

#![no_main]

#[allow(dead_code)]
#[path = "../../crates/disk_layered/tests/support/reference.rs"]
mod reference;

use arbitrary::{Arbitrary, Unstructured};
use disk_backend::DiskError;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use reference::{LayerPlan, SS, Stack, StackPlan, sector_data};
use request_buffers::OwnedRequestBuffers;
use std::sync::OnceLock;

/// Operations per input, at most.
const MAX_OPS: usize = 32;

/// A sector number: usually near the disk (where the interesting edges are), sometimes
/// anything at all.
#[derive(Debug, Arbitrary)]
enum Sector {
    Near(u16),
    Raw(u64),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Read {
        sector: Sector,
        sectors: u8,
    },
    Write {
        sector: Sector,
        sectors: u8,
        seed: u8,
        fua: bool,
    },
    Unmap {
        sector: Sector,
        count: Sector,
    },
    Flush,
}

/// `sector_data` for every seed, computed once: building write data byte by byte took most
/// of each input's time.
fn patterns() -> &'static [Vec<u8>] {
    static PATTERNS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PATTERNS.get_or_init(|| (0..=255).map(sector_data).collect())
}

fn plan(u: &mut Unstructured<'_>) -> arbitrary::Result<StackPlan> {
    let count = u.int_in_range(1..=4usize)?;
    let mut layers = Vec::new();
    for _ in 0..count {
        let sector_count = u.int_in_range(1..=256u64)?;
        let mut prefill = Vec::new();
        for _ in 0..u.int_in_range(0..=16usize)? {
            prefill.push((u.int_in_range(0..=255u64)?, u.arbitrary()?));
        }
        layers.push(LayerPlan {
            sector_count,
            full: u.arbitrary()?,
            read_cache: u.arbitrary()?,
            prefill,
        });
    }
    let mut plan = StackPlan {
        layers,
        write_path: u.int_in_range(1..=count)?,
    };
    plan.normalize();
    Ok(plan)
}

/// Whether `count` sectors at `sector` lie inside a disk of `sector_count` sectors. Empty
/// requests succeed when their byte offset is representable.
fn accepted(sector: u64, count: u64, sector_count: u64) -> bool {
    if count == 0 {
        return sector <= (i64::MAX as u64) / SS as u64;
    }
    sector
        .checked_add(count)
        .is_some_and(|end| end <= sector_count)
}

fn check(what: &str, result: Result<(), DiskError>, accept: bool) -> bool {
    match (result, accept) {
        (Ok(()), true) => true,
        (Err(DiskError::IllegalBlock), false) => false,
        (result, accept) => panic!(
            "{what}: expected {}, got {result:?}",
            if accept { "success" } else { "IllegalBlock" }
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(plan) = plan(&mut u) else { return };
    let mut stack = Stack::build(&plan);
    let sector_count = stack.disk.sector_count();
    let resolve = |s: &Sector| match *s {
        Sector::Near(n) => n as u64 % (sector_count + 4),
        Sector::Raw(n) => n,
    };
    // `arbitrary` keeps producing default values from exhausted input, so stop on empty.
    // At most `MAX_OPS` operations: the disks are small (256 sectors at most), so a short
    // sequence reaches any state, while a long input cost time on every run of it (the
    // target fell from about 5,000 to 1,300 inputs a second as its inputs grew).
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        match op {
            Op::Read { sector, sectors } => {
                let sector = resolve(&sector);
                let sectors = sectors as u64 % 65;
                let buf = OwnedRequestBuffers::new(sectors as usize * SS);
                let result = block_on(stack.disk.read_vectored(&buf.buffers(true), sector));
                if check("read", result, accepted(sector, sectors, sector_count)) && sectors > 0 {
                    assert!(
                        buf.to_vec() == stack.expect_read(sector, sectors),
                        "read {sectors} at {sector}: wrong data"
                    );
                }
            }
            Op::Write {
                sector,
                sectors,
                seed,
                fua,
            } => {
                let sector = resolve(&sector);
                let sectors = sectors as u64 % 65;
                let patterns = patterns();
                let mut bytes = Vec::with_capacity(sectors as usize * SS);
                for i in 0..sectors {
                    bytes.extend_from_slice(&patterns[usize::from(seed.wrapping_add(i as u8))]);
                }
                let buf = OwnedRequestBuffers::from_slice(&bytes);
                let result = block_on(stack.disk.write_vectored(&buf.buffers(false), sector, fua));
                if check("write", result, accepted(sector, sectors, sector_count)) && sectors > 0 {
                    stack.apply_write(sector, &bytes);
                }
            }
            Op::Unmap { sector, count } => {
                let sector = resolve(&sector);
                let count = resolve(&count);
                let result = block_on(stack.disk.unmap(sector, count, false));
                if check("unmap", result, accepted(sector, count, sector_count)) && count > 0 {
                    stack.apply_unmap(sector, count);
                }
            }
            Op::Flush => block_on(stack.disk.sync_cache()).expect("flush"),
        }
    }
});
