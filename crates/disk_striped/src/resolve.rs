//! `striped(DISK, DISK, ..., [chunk=BYTES], [size=BYTES])`.

use crate::StripedDisk;
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};

/// Opens `striped` nodes: RAID 0 over the member disks, in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct StripedResolver;

impl ResolveDisk for StripedResolver {
    fn kind(&self) -> &str {
        "striped"
    }

    fn usage(&self) -> &str {
        "striped(DISK, DISK, ..., [chunk=BYTES], [size=BYTES]): RAID 0, 128 KiB chunks by default"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let chunk = args
            .named_size(ctx, "chunk")?
            .map(|c| u32::try_from(c).map_err(|_| ctx.error(format!("`chunk` {c} is too large"))))
            .transpose()?;
        let size = args.named_size(ctx, "size")?;
        let children = args.disks();
        args.finish(ctx)?;
        let members = children
            .iter()
            .map(|(index, spec)| ctx.resolve_child(*index, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let sector_count = match (size, members.first()) {
            (Some(bytes), Some(first)) => {
                let sector_size = first.sector_size() as u64;
                if !bytes.is_multiple_of(sector_size) {
                    return Err(ctx.error(format!(
                        "size {bytes} is not a whole number of {sector_size}-byte sectors"
                    )));
                }
                Some(bytes / sector_size)
            }
            _ => None,
        };
        let striped = StripedDisk::new(members, chunk, sector_count)
            .map_err(|e| ctx.error_with("invalid stripe set", e))?;
        Disk::new(striped).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::resolve::Resolver;

    fn resolve(spec: &str) -> Result<Disk, String> {
        let mut resolver = Resolver::new();
        resolver
            .register(StripedResolver)
            .register(disk_ram::RamResolver);
        resolver
            .resolve(&spec.parse().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn striped_specs() {
        let disk = resolve("striped(ram(size=1M), ram(size=1M), ram(size=1M))").unwrap();
        assert_eq!(disk.sector_count(), 3 * 2048);
        let disk = resolve("striped(ram(size=1M), ram(size=1M), chunk=4k, size=512k)").unwrap();
        assert_eq!(disk.sector_count(), 1024);
        for (spec, error) in [
            ("striped()", "striped: invalid stripe set"),
            ("striped(ram, chunk=8G)", "`chunk` 8589934592 is too large"),
            (
                "striped(ram, ram, size=1000)",
                "size 1000 is not a whole number",
            ),
            ("striped(ram, ram, size=1T)", "striped: invalid stripe set"),
            (
                "striped(ram, nothing)",
                "striped/nothing[2]: unknown disk kind",
            ),
        ] {
            let err = resolve(spec).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }
}
