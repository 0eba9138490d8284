//! Disk stacks described as data or as text, and their resolution into a [`Disk`].
//!
//! A [`DiskSpec`] is a tree: a node names a kind of disk and carries arguments, positional or
//! named (`name=value`), whose values are text or nested nodes. Its text form is what a person
//! types:
//!
//! ```text
//! layered(ram, file:base.img:ro)
//! crypt(striped(file:a.img, file:b.img, chunk=64k), key=@disk.key)
//! file("/images/my disk.img", sector_size=4096)
//! ```
//!
//! - `kind(arg, arg, name=value)`; spaces are allowed around punctuation.
//! - `kind:a:b` is shorthand for `kind(a, b)`.
//! - A bare word is text (`ro`, `64k`, `base.img`) or, where a disk is expected, a node
//!   without arguments (`ram`). Quote text with other characters: `"a b.img"`, `"c:\\x"`
//!   (`\"` and `\\` escape).
//!
//! Each backend crate contributes a [`ResolveDisk`] for its kinds; a [`Resolver`] holding
//! them turns a spec into a [`Disk`], and its errors name the path of the failing node. The
//! format of every node comes from the spec, never from the bytes of an image.
//!
//! ```
//! use disk_backend::resolve::{DiskSpec, SpecValue};
//!
//! let spec: DiskSpec = "layered(ram, file:base.img:ro)".parse()?;
//! assert_eq!(spec.kind, "layered");
//! assert_eq!(spec.to_string(), "layered(ram, file(base.img, ro))");
//! assert_eq!(spec.to_string().parse::<DiskSpec>()?, spec);
//! assert!(matches!(&spec.args[1].value, SpecValue::Disk(file) if file.kind == "file"));
//! assert!("layered(ram".parse::<DiskSpec>().is_err());
//! # Ok::<(), disk_backend::resolve::ParseError>(())
//! ```

mod args;
mod resolver;
mod spec;

pub use args::{Args, parse_size};

/// How many characters of user text an error message echoes; the rest becomes `…`.
pub const SHOWN_CHARS: usize = 64;

/// `text` as an error message should echo it: whole if it has at most [`SHOWN_CHARS`]
/// characters, else its first [`SHOWN_CHARS`] characters and `…`. A spec can hold a
/// 100,000-character word; a one-line error should not.
///
/// ```
/// use disk_backend::resolve::shown;
///
/// assert_eq!(shown("file"), "file");
/// assert_eq!(shown(&"x".repeat(100)), format!("{}…", "x".repeat(64)));
/// ```
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => text.into(),
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
    }
}
pub use resolver::{ResolveContext, ResolveDisk, ResolveError, Resolver};
pub use spec::{DiskSpec, ParseError, SpecArg, SpecValue};

use crate::Disk;
