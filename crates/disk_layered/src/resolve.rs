//! `layered(LAYER, LAYER, ..., [ro])` and `layer(CHILD, [read_cache], [write_through])`.

use crate::{DiskAsLayer, DiskLayer, LayerConfiguration, LayeredDisk};
use disk_backend::Disk;
use disk_backend::resolve::{Args, DiskSpec, ResolveContext, ResolveDisk, ResolveError};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds one kind of layer from its spec node (a RAM layer, say). Kinds that are not layer
/// kinds are opened as disks and become [`DiskAsLayer`]s.
pub trait ResolveLayer: Send + Sync {
    /// The kind this builds.
    fn kind(&self) -> &str;

    /// Builds the layer. Consume the arguments through `args` and end with
    /// [`Args::finish`].
    fn resolve_layer(
        &self,
        ctx: &ResolveContext<'_>,
        args: &Args<'_>,
    ) -> Result<DiskLayer, ResolveError>;
}

/// Opens `layered` nodes. Each positional argument is a layer, top first:
///
/// - a kind registered with [`with_layer`](Self::with_layer) (such as `ram`) builds that
///   layer;
/// - any other kind is opened as a disk and used as a [`DiskAsLayer`];
/// - `layer(CHILD, read_cache, write_through)` sets the flags of `CHILD`'s layer.
///
/// `ro` makes the layered disk read-only.
#[derive(Clone, Default)]
pub struct LayeredResolver {
    layers: BTreeMap<String, Arc<dyn ResolveLayer>>,
}

impl std::fmt::Debug for LayeredResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredResolver")
            .field("layer_kinds", &self.layers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl LayeredResolver {
    /// A resolver for which every layer is a disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind of layer.
    pub fn with_layer(mut self, resolver: impl ResolveLayer + 'static) -> Self {
        self.layers
            .insert(resolver.kind().to_owned(), Arc::new(resolver));
        self
    }

    fn layer(
        &self,
        ctx: &ResolveContext<'_>,
        index: usize,
        spec: &DiskSpec,
    ) -> Result<LayerConfiguration, ResolveError> {
        if spec.kind == "layer" {
            let here = ctx.nested("layer", index);
            let args = Args::new(spec);
            let read_cache = args.flag("read_cache");
            let write_through = args.flag("write_through");
            let mut children = args.disks();
            args.finish(&here)?;
            let (child_index, child) = match children.len() {
                1 => children.pop().expect("one child"),
                n => return Err(here.error(format!("`layer` takes exactly one layer, not {n}"))),
            };
            let mut config = self.layer(&here, child_index, &child)?;
            config.read_cache = read_cache;
            config.write_through = write_through;
            return Ok(config);
        }
        let layer = match self.layers.get(&spec.kind) {
            Some(resolver) => {
                resolver.resolve_layer(&ctx.nested(&spec.kind, index), &Args::new(spec))?
            }
            None => DiskLayer::new(DiskAsLayer::new(ctx.resolve_child(index, spec)?)),
        };
        Ok(LayerConfiguration::new(layer))
    }
}

impl ResolveDisk for LayeredResolver {
    fn kind(&self) -> &str {
        "layered"
    }

    fn usage(&self) -> &str {
        "layered(LAYER, ..., [ro]): layers top first; layer(CHILD, [read_cache], [write_through]) sets flags"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let read_only = args.flag("ro");
        let children = args.disks();
        args.finish(ctx)?;
        let layers = children
            .iter()
            .map(|(index, spec)| self.layer(ctx, *index, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let disk = LayeredDisk::new(read_only, layers)
            .map_err(|e| ctx.error_with("invalid layer stack", e))?;
        Disk::new(disk).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}
