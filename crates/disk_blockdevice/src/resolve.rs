//! `blockdev(PATH, [ro], [buffered], [fixed_buffers], [queue_depth=N], [sector_size=BYTES],
//! [spin_us=N], [completions=thread|tokio])`.

use crate::{BlockDeviceDisk, BlockDeviceOptions, Completions, MAX_QUEUE_DEPTH};
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};
use std::time::Duration;

/// Opens `blockdev` nodes: a Linux block device (or a regular file) through io_uring,
/// `O_DIRECT` unless `buffered`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockDeviceResolver;

impl ResolveDisk for BlockDeviceResolver {
    fn kind(&self) -> &str {
        "blockdev"
    }

    fn usage(&self) -> &str {
        "blockdev(PATH, [ro], [buffered], [fixed_buffers], [queue_depth=N], [sector_size=BYTES], [spin_us=N], [completions=thread|tokio]): a block device or file through io_uring, O_DIRECT unless buffered; fixed_buffers registers (and pins) the guest memory the frontend announces; completions reaped by the thread that polled the request where it drives its own I/O (diskctl serve and bench), else by the disk's completion thread (default), always by the completion thread (completions=thread), or by a task on the current tokio runtime (completions=tokio)"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let read_only = args.flag("ro");
        let buffered = args.flag("buffered");
        let fixed_buffers = args.flag("fixed_buffers");
        let path = args.positional_text(ctx, "a device or file path")?;
        let read_only = read_only || args.flag("ro");
        let buffered = buffered || args.flag("buffered");
        let fixed_buffers = fixed_buffers || args.flag("fixed_buffers");
        let defaults = BlockDeviceOptions::default();
        let queue_depth = args
            .named_u64(ctx, "queue_depth")?
            .unwrap_or(defaults.queue_depth.into());
        let sector_size = args
            .named_size(ctx, "sector_size")?
            .unwrap_or(defaults.file_sector_size.into());
        let spin_us = args.named_u64(ctx, "spin_us")?.unwrap_or(0);
        let named = args.named_text(ctx, "completions")?;
        // Named explicitly, `thread` keeps every request on the disk's own ring.
        let thread_rings = named.is_none();
        let completions = match named {
            None | Some("thread") => Completions::Thread,
            #[cfg(feature = "tokio")]
            Some("tokio") => Completions::Tokio,
            Some("owner") => {
                // A resolved disk has no way to hand its driver to the thread that should
                // run its futures, and without a driver its requests would never progress.
                return Err(ctx.error(
                    "`completions=owner` is not available in a spec: the owner mode needs the \
                     program to run the disk's futures on the thread that claims its driver \
                     (`Completions::Owner` and `BlockDeviceDisk::driver` in code)",
                ));
            }
            Some(other) => {
                return Err(ctx.error(format!(
                    "`completions` is `thread`{}, not `{}`",
                    if cfg!(feature = "tokio") {
                        " or `tokio`"
                    } else {
                        " (built without the `tokio` feature)"
                    },
                    disk_backend::resolve::shown(other)
                )));
            }
        };
        args.finish(ctx)?;
        let to_u32 = |value: u64, name: &str| {
            u32::try_from(value).map_err(|_| ctx.error(format!("`{name}` {value} is too large")))
        };
        if !(1..=u64::from(MAX_QUEUE_DEPTH)).contains(&queue_depth) {
            return Err(ctx.error(format!(
                "`queue_depth` must be between 1 and {MAX_QUEUE_DEPTH}"
            )));
        }
        let options = BlockDeviceOptions {
            read_only,
            direct: !buffered,
            queue_depth: to_u32(queue_depth, "queue_depth")?,
            file_sector_size: to_u32(sector_size, "sector_size")?,
            completion_spin: Duration::from_micros(spin_us),
            completions,
            fixed_buffers,
            thread_rings,
            ..defaults
        };
        let disk = BlockDeviceDisk::open(path, &options)
            .map_err(|e| ctx.error_with("cannot open the device", e))?;
        Disk::new(disk).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::resolve::Resolver;

    fn resolve(spec: &str) -> Result<Disk, String> {
        let mut resolver = Resolver::new();
        resolver.register(BlockDeviceResolver);
        resolver.resolve(&spec.parse().unwrap()).map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            message
        })
    }

    #[test]
    fn blockdev_specs_on_a_file() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let path = file.path().display();
        match resolve(&format!("blockdev({path}, buffered, queue_depth=8)")) {
            Ok(disk) => {
                assert_eq!(disk.sector_count(), 2048);
                let disk =
                    resolve(&format!("blockdev({path}, ro, buffered, sector_size=4k)")).unwrap();
                assert_eq!((disk.sector_count(), disk.sector_size()), (256, 4096));
                assert!(disk.is_read_only());
                let disk = resolve(&format!(
                    "blockdev({path}, buffered, spin_us=20, completions=thread)"
                ))
                .unwrap();
                assert_eq!(disk.sector_count(), 2048);
                // With the flag, `register_memory` registers (the disk's tests check that
                // requests then use the memory as fixed buffers); reads still work.
                let disk = resolve(&format!("blockdev({path}, buffered, fixed_buffers)")).unwrap();
                let buffer = request_buffers::OwnedRequestBuffers::new(1 << 20);
                disk.register_memory(buffer.guest_memory()).unwrap();
                futures::executor::block_on(disk.read_vectored(&buffer.buffers(true), 0)).unwrap();
                #[cfg(feature = "tokio")]
                {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .build()
                        .unwrap();
                    let _context = runtime.enter();
                    let disk =
                        resolve(&format!("blockdev({path}, buffered, completions=tokio)")).unwrap();
                    let buffer = request_buffers::OwnedRequestBuffers::new(4096);
                    runtime
                        .block_on(disk.read_vectored(&buffer.buffers(true), 0))
                        .unwrap();
                }
            }
            Err(e) if e.contains("io_uring") => {
                disk_conformance::skip::skip(format!("io_uring is not available here: {e}"));
                return;
            }
            Err(e) => panic!("{e}"),
        }
        for (spec, error) in [
            (
                "blockdev".to_string(),
                "blockdev: missing a device or file path",
            ),
            (
                format!("blockdev({path}, queue_depth=0)"),
                "`queue_depth` must be between 1 and 16384",
            ),
            (
                format!("blockdev({path}, queue_depth=16385)"),
                "`queue_depth` must be between 1 and 16384",
            ),
            (
                format!("blockdev({path}, queue_depth=5000000000)"),
                "`queue_depth` must be between 1 and 16384",
            ),
            (
                format!("blockdev({path}, fast)"),
                "unexpected argument `fast`",
            ),
            (
                format!("blockdev({path}, completions=fast)"),
                "`completions` is `thread`",
            ),
            (
                format!("blockdev({path}, completions=owner)"),
                "`completions=owner` is not available in a spec",
            ),
            (
                // Outside a tokio runtime.
                format!("blockdev({path}, buffered, completions=tokio)"),
                "needs a tokio runtime",
            ),
            (
                "blockdev(/nonexistent/dev)".to_string(),
                "blockdev: cannot open the device",
            ),
        ] {
            let err = resolve(&spec).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }
}
