//! `ram(size=BYTES, sector_size=BYTES)`: a RAM disk, or inside `layered` a RAM layer.

use crate::{RamDisk, RamDiskError, RamLayer, RamLayerConfig};
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};
use disk_layered::{DiskLayer, ResolveLayer};

/// The size of a `ram` disk that does not give one.
pub const DEFAULT_RAM_DISK_BYTES: u64 = 64 << 20;

/// Opens `ram` nodes: as a disk ([`ResolveDisk`]) a [`RamDisk`] of `size` bytes (64 MiB by
/// default); as a layer ([`ResolveLayer`]) a [`RamLayer`] that takes the size and sector
/// size it is not given from the layer below.
#[derive(Debug, Clone, Copy, Default)]
pub struct RamResolver;

fn sector_size(ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Option<u32>, ResolveError> {
    args.named_size(ctx, "sector_size")?
        .map(|s| u32::try_from(s).map_err(|_| ctx.error(format!("`sector_size` {s} is too large"))))
        .transpose()
}

fn sectors(ctx: &ResolveContext<'_>, bytes: u64, sector_size: u32) -> Result<u64, ResolveError> {
    if sector_size < 512 || !sector_size.is_power_of_two() {
        return Err(ctx.error_with(
            "invalid RAM disk",
            RamDiskError::InvalidSectorSize(sector_size),
        ));
    }
    if bytes == 0 || !bytes.is_multiple_of(sector_size as u64) {
        return Err(ctx.error(format!(
            "size {bytes} is not a positive multiple of the {sector_size}-byte sector size"
        )));
    }
    Ok(bytes / sector_size as u64)
}

impl ResolveDisk for RamResolver {
    fn kind(&self) -> &str {
        "ram"
    }

    fn usage(&self) -> &str {
        "ram([size=BYTES], [sector_size=BYTES]): sparse memory, 64 MiB unless sized; in layered, sized from the layer below"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let size = args
            .named_size(ctx, "size")?
            .unwrap_or(DEFAULT_RAM_DISK_BYTES);
        let sector_size = sector_size(ctx, args)?.unwrap_or(512);
        args.finish(ctx)?;
        let ram = RamDisk::new(sectors(ctx, size, sector_size)?, sector_size)
            .map_err(|e| ctx.error_with("invalid RAM disk", e))?;
        Disk::new(ram).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

impl ResolveLayer for RamResolver {
    fn kind(&self) -> &str {
        "ram"
    }

    fn resolve_layer(
        &self,
        ctx: &ResolveContext<'_>,
        args: &Args<'_>,
    ) -> Result<DiskLayer, ResolveError> {
        let size = args.named_size(ctx, "size")?;
        let sector_size = sector_size(ctx, args)?;
        args.finish(ctx)?;
        // A size is in bytes, so it fixes the sector size too (512 unless given).
        let sector_size = sector_size.or(size.map(|_| 512));
        let sector_count = match size {
            Some(bytes) => Some(sectors(ctx, bytes, sector_size.unwrap_or(512))?),
            None => None,
        };
        if let (Some(count), Some(size)) = (sector_count, sector_size) {
            // Fully specified: check now so the error names this node.
            RamLayer::new(count, size).map_err(|e| ctx.error_with("invalid RAM layer", e))?;
        }
        Ok(DiskLayer::new(RamLayerConfig {
            sector_count,
            sector_size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::resolve::Resolver;
    use disk_layered::LayeredResolver;

    fn resolve(spec: &str) -> Result<Disk, String> {
        let mut resolver = Resolver::new();
        resolver
            .register(RamResolver)
            .register(LayeredResolver::new().with_layer(RamResolver));
        resolver
            .resolve(&spec.parse().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn ram_as_disk_and_as_layer() {
        let disk = resolve("ram").unwrap();
        assert_eq!(disk.sector_count() * 512, DEFAULT_RAM_DISK_BYTES);
        let disk = resolve("ram(size=1M, sector_size=4k)").unwrap();
        assert_eq!((disk.sector_count(), disk.sector_size()), (256, 4096));
        // A lazy layer takes the size of the disk below it.
        let disk = resolve("layered(ram, ram(size=2M, sector_size=4096))").unwrap();
        assert_eq!((disk.sector_count(), disk.sector_size()), (512, 4096));
        // A sized layer keeps its own size.
        let disk = resolve("layered(ram(size=1M), ram(size=2M))").unwrap();
        assert_eq!(disk.sector_count(), 2048);
        for (spec, error) in [
            ("ram(size=0)", "ram: size 0 is not a positive multiple"),
            ("ram(size=1M, sector_size=256)", "ram: invalid RAM disk"),
            ("ram(size=8E)", "unknown size suffix"),
            ("ram(size=9000000T)", "ram: invalid RAM disk"),
            (
                "layered(ram(size=1M, colour=red), ram)",
                "layered/ram[1]: unknown argument `colour`",
            ),
            ("layered(ram(size=1000), ram)", "layered/ram[1]: size 1000"),
        ] {
            let err = resolve(spec).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }
}
