//! The registry of disk kinds and resolution with error paths.

use super::{Args, Disk, DiskSpec};
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;

/// Opens one kind of disk from its spec node. Backend crates implement this for their kinds.
pub trait ResolveDisk: Send + Sync {
    /// The kind this opens (`file`, `ram`, ...).
    fn kind(&self) -> &str;

    /// One line of usage, such as `file(PATH, ro, sector_size=BYTES)`.
    fn usage(&self) -> &str;

    /// Opens the disk. Consume the arguments through `args` and end with
    /// [`Args::finish`]; open nested disks with [`ResolveContext::resolve_child`].
    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError>;
}

/// Resolving a spec failed at the node `path` names.
#[derive(Debug, Error)]
#[error("{path}: {message}")]
pub struct ResolveError {
    /// The failing node, from the root: `crypt/striped[2]/file[1]` is the `file` that is the
    /// first argument of the `striped` that is the second argument of the root `crypt`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Where in the tree a resolver is working, and the resolver to open nested disks with.
pub struct ResolveContext<'a> {
    resolver: &'a Resolver,
    path: String,
}

impl<'a> ResolveContext<'a> {
    /// The path of the node being resolved.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// An error at this node.
    pub fn error(&self, message: impl Into<String>) -> ResolveError {
        ResolveError {
            path: self.path.clone(),
            message: message.into(),
            source: None,
        }
    }

    /// An error at this node with its cause.
    pub fn error_with(
        &self,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ResolveError {
        ResolveError {
            source: Some(Box::new(source)),
            ..self.error(message)
        }
    }

    /// The context of a `kind` node that is the argument at `index` of this node, for
    /// resolvers that interpret a nested node themselves.
    pub fn nested(&self, kind: &str, index: usize) -> ResolveContext<'a> {
        ResolveContext {
            resolver: self.resolver,
            path: format!("{}/{}[{}]", self.path, super::shown(kind), index + 1),
        }
    }

    /// Resolves `spec`, the argument at `index` of this node.
    pub fn resolve_child(&self, index: usize, spec: &DiskSpec) -> Result<Disk, ResolveError> {
        self.resolver
            .resolve_at(spec, self.nested(&spec.kind, index).path)
    }
}

/// The kinds of disk a program can open, and resolution of specs into disks.
///
/// ```
/// use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError, Resolver};
/// use disk_backend::Disk;
///
/// struct Nothing;
/// impl ResolveDisk for Nothing {
///     fn kind(&self) -> &str { "nothing" }
///     fn usage(&self) -> &str { "nothing" }
///     fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
///         args.finish(ctx)?;
///         Err(ctx.error("there is nothing to open"))
///     }
/// }
///
/// let mut resolver = Resolver::new();
/// resolver.register(Nothing);
/// let err = resolver.resolve(&"nothing".parse().unwrap()).unwrap_err();
/// assert_eq!(err.to_string(), "nothing: there is nothing to open");
/// let err = resolver.resolve(&"something".parse().unwrap()).unwrap_err();
/// assert_eq!(err.to_string(), "something: unknown disk kind `something` (known: nothing)");
/// ```
#[derive(Default, Clone)]
pub struct Resolver {
    kinds: BTreeMap<String, Arc<dyn ResolveDisk>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl Resolver {
    /// A resolver that knows no kinds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the resolver of a kind.
    pub fn register(&mut self, resolver: impl ResolveDisk + 'static) -> &mut Self {
        self.kinds
            .insert(resolver.kind().to_owned(), Arc::new(resolver));
        self
    }

    /// The known kinds and their usage lines, sorted by kind.
    pub fn kinds(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.kinds
            .iter()
            .map(|(kind, r)| (kind.as_str(), r.usage()))
    }

    /// Opens the disk `spec` describes.
    pub fn resolve(&self, spec: &DiskSpec) -> Result<Disk, ResolveError> {
        self.resolve_at(spec, super::shown(&spec.kind).into_owned())
    }

    fn resolve_at(&self, spec: &DiskSpec, path: String) -> Result<Disk, ResolveError> {
        let ctx = ResolveContext {
            resolver: self,
            path,
        };
        let Some(resolver) = self.kinds.get(&spec.kind) else {
            let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
            return Err(ctx.error(format!(
                "unknown disk kind `{}` (known: {})",
                super::shown(&spec.kind),
                known.join(", ")
            )));
        };
        resolver.resolve(&ctx, &Args::new(spec))
    }
}
