//! `delay(DISK, [ms=N], [us=N])`.

use crate::DelayDisk;
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};
use std::time::Duration;

/// Opens `delay` nodes: a disk whose reads and writes take `ms` milliseconds plus `us`
/// microseconds longer.
#[derive(Debug, Clone, Copy, Default)]
pub struct DelayResolver;

impl ResolveDisk for DelayResolver {
    fn kind(&self) -> &str {
        "delay"
    }

    fn usage(&self) -> &str {
        "delay(DISK, [ms=N], [us=N]): adds latency to reads and writes"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let ms = args.named_u64(ctx, "ms")?.unwrap_or(0);
        let us = args.named_u64(ctx, "us")?.unwrap_or(0);
        let mut disks = args.disks();
        args.finish(ctx)?;
        let delay = ms
            .checked_mul(1000)
            .and_then(|ms_us| ms_us.checked_add(us))
            .map(Duration::from_micros)
            .ok_or_else(|| ctx.error("the delay is too long"))?;
        let (index, inner) = match disks.len() {
            1 => disks.pop().expect("one disk"),
            n => return Err(ctx.error(format!("takes exactly one disk, not {n}"))),
        };
        let inner = ctx.resolve_child(index, &inner)?;
        Disk::new(DelayDisk::new(inner, delay)).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::resolve::Resolver;

    fn resolve(spec: &str) -> Result<Disk, String> {
        let mut resolver = Resolver::new();
        resolver
            .register(DelayResolver)
            .register(disk_ram::RamResolver);
        resolver
            .resolve(&spec.parse().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn delay_specs() {
        assert_eq!(
            resolve("delay(ram(size=1M), ms=2, us=500)")
                .unwrap()
                .sector_count(),
            2048
        );
        assert_eq!(resolve("delay(ram)").unwrap().disk_type(), "delay");
        for (spec, error) in [
            (
                "delay(ram, ms=18446744073709551615)",
                "the delay is too long",
            ),
            ("delay(ram, ram)", "takes exactly one disk, not 2"),
            ("delay(ram, s=1)", "unknown argument `s`"),
        ] {
            let err = resolve(spec).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }
}
