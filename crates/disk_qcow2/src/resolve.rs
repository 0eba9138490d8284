//! `qcow2(PATH, [ro], [cache=BYTES], [direct])`: a qcow2 image as a layer, or alone as a disk.

use crate::{GrowFn, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use disk_backend::Disk;
use disk_backend::resolve::{Args, DiskSpec, ResolveContext, ResolveDisk, ResolveError};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk, ResolveLayer};
use std::sync::Arc;

/// Opens `qcow2` nodes. The image file is opened as the registered `file` kind (or with
/// `direct`, as `blockdev`: io_uring with `O_DIRECT`, where the image cannot grow past the
/// file's size at open); `ro` opens it read-only; `cache` sizes the metadata cache
/// ([`DEFAULT_CACHE_BYTES`](crate::DEFAULT_CACHE_BYTES) by default).
///
/// Inside `layered` it is a layer over the layers after it; alone it is a disk whose
/// unallocated clusters read as zeros. The image's own backing file header is never
/// followed: an image that names one must be given its layers below in the spec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Resolver;

impl Qcow2Resolver {
    fn open(
        &self,
        ctx: &ResolveContext<'_>,
        args: &Args<'_>,
    ) -> Result<(Arc<Qcow2Layer>, bool), ResolveError> {
        let read_only = args.flag("ro");
        let path = args.positional_text(ctx, "an image path")?;
        let read_only = read_only || args.flag("ro");
        let direct = args.flag("direct");
        let cache_bytes = args
            .named_size(ctx, "cache")?
            .unwrap_or(crate::DEFAULT_CACHE_BYTES);
        args.finish(ctx)?;
        let mut host = DiskSpec::new(if direct { "blockdev" } else { "file" }).arg(path);
        if read_only {
            host = host.arg("ro");
        }
        let grow: Option<GrowFn> = if read_only || direct {
            None
        } else {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| ctx.error_with("cannot open the image file to grow it", e))?;
            // `qemu-img create` ends an image inside a sector, which a file disk would not
            // see: round the file up to whole sectors (what follows the end reads as zeros).
            let len = file
                .metadata()
                .map_err(|e| ctx.error_with("cannot size the image file", e))?
                .len();
            if !len.is_multiple_of(4096) {
                file.set_len(len.next_multiple_of(4096))
                    .map_err(|e| ctx.error_with("cannot size the image file", e))?;
            }
            Some(Box::new(move |len| {
                if file.metadata()?.len() < len {
                    file.set_len(len)?;
                }
                Ok(())
            }))
        };
        let disk = ctx.resolve_child(0, &host)?;
        let options = Qcow2Options {
            read_only,
            cache_bytes,
        };
        let layer =
            futures::executor::block_on(Qcow2Layer::open(ImageFile::new(disk, grow), &options))
                .map_err(|e| ctx.error_with("cannot open the qcow2 image", e))?;
        Ok((Arc::new(layer), read_only))
    }
}

impl ResolveDisk for Qcow2Resolver {
    fn kind(&self) -> &str {
        "qcow2"
    }

    fn usage(&self) -> &str {
        "qcow2(PATH, [ro], [cache=BYTES], [direct]): a qcow2 image; alone a disk, in layered a copy-on-write layer over the layers after it (its backing file header is never followed)"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let (layer, read_only) = self.open(ctx, args)?;
        let disk = LayeredDisk::new(
            read_only,
            vec![LayerConfiguration::new(DiskLayer::new(Qcow2Attach(layer)))],
        )
        .map_err(|e| ctx.error_with("cannot use the image", e))?;
        Disk::new(disk).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

impl ResolveLayer for Qcow2Resolver {
    fn kind(&self) -> &str {
        "qcow2"
    }

    fn resolve_layer(
        &self,
        ctx: &ResolveContext<'_>,
        args: &Args<'_>,
    ) -> Result<DiskLayer, ResolveError> {
        let (layer, _) = self.open(ctx, args)?;
        Ok(DiskLayer::new(Qcow2Attach(layer)))
    }
}
