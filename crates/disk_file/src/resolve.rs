//! `file(PATH, ro, pool, partial_sector, sector_size=BYTES, physical_sector_size=BYTES)`.

use crate::{FileDisk, FileDiskOptions};
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};

/// Opens `file` nodes: a host file (or a block device through the page cache).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileResolver;

impl ResolveDisk for FileResolver {
    fn kind(&self) -> &str {
        "file"
    }

    fn usage(&self) -> &str {
        "file(PATH, [ro], [pool], [partial_sector], [sector_size=BYTES], [physical_sector_size=BYTES]): a host file (pool: no request on the calling thread; partial_sector: serve a file that ends inside a sector, without that sector)"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let read_only = args.flag("ro");
        let path = args.positional_text(ctx, "a file path")?;
        let read_only = read_only || args.flag("ro");
        let pool = args.flag("pool");
        let partial_last_sector = args.flag("partial_sector");
        let sector_size = args.named_size(ctx, "sector_size")?.unwrap_or(512);
        let physical = args.named_size(ctx, "physical_sector_size")?;
        args.finish(ctx)?;
        let to_u32 = |value: u64, name: &str| {
            u32::try_from(value).map_err(|_| ctx.error(format!("`{name}` {value} is too large")))
        };
        let options = FileDiskOptions {
            read_only,
            sector_size: to_u32(sector_size, "sector_size")?,
            physical_sector_size: physical
                .map(|p| to_u32(p, "physical_sector_size"))
                .transpose()?,
            inline_io: !pool,
            partial_last_sector,
        };
        let file = FileDisk::open(path, &options)
            .map_err(|e| ctx.error_with("cannot open the file", e))?;
        Disk::new(file).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}
