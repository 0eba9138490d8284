//! `qcow2(PATH, [ro], [cache=BYTES], [direct])`: a qcow2 image as a layer, or alone as a disk.

use crate::{GrowFn, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use disk_backend::Disk;
use disk_backend::resolve::{Args, DiskSpec, ResolveContext, ResolveDisk, ResolveError};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk, ResolveLayer};
use std::sync::Arc;

/// Opens `qcow2` nodes. The image file is opened as the registered `file` kind (or with
/// `direct`, as `blockdev`: io_uring with `O_DIRECT`, whose view of a regular file's size is
/// fixed at open, so a writable image file is first extended, sparsely, to its virtual size
/// and an eighth more for metadata: room to allocate every cluster once); `ro` opens it
/// read-only; `cache` sizes the metadata cache
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
        // One handle for the whole time the image is open: it holds an advisory lock (one
        // writer, or any number of readers, among the processes that use it) and grows the
        // file.
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| ctx.error_with("cannot open the image file", e))?;
        let locked = if read_only {
            handle.try_lock_shared()
        } else {
            handle.try_lock()
        };
        locked.map_err(|e| {
            ctx.error_with(
                "the image is in use by another process (it holds a lock on the file)",
                e,
            )
        })?;
        if direct && !read_only {
            make_room_for_direct(&handle)
                .map_err(|e| ctx.error_with("cannot size the image file", e))?;
        }
        let grow: Option<GrowFn> = if read_only || direct {
            None
        } else {
            let file = handle
                .try_clone()
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
        let layer = futures::executor::block_on(Qcow2Layer::open(
            ImageFile::new(disk, grow).holding(handle),
            &options,
        ))
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

/// Extends the regular `file` (sparsely) to the image's virtual size plus an eighth
/// and 64 MiB, so an image opened through a disk that cannot grow can allocate every cluster
/// once. A block device, or a file that is already that large, is left alone (allocation
/// past its end then fails with an i/o error).
fn make_room_for_direct(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(());
    }
    let mut head = [0u8; 32];
    file.read_exact_at(&mut head, 0)?;
    let size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
    // The header is checked when the image is opened; only a sane size is acted on here.
    if size > crate::header::MAX_VIRTUAL_BYTES {
        return Ok(());
    }
    let room = (size + size / 8 + (64 << 20)).next_multiple_of(1 << 20);
    if meta.len() < room {
        file.set_len(room)?;
    }
    Ok(())
}
