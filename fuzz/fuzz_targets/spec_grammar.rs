//! The disk spec grammar (`disk_backend::resolve`): arbitrary text through the parser, and
//! arbitrary trees through the printer.
//!
//! Oracle: parsing never panics; for any text that parses, printing the tree and parsing
//! the print gives the same tree, and printing is stable (the canonical form prints as
//! itself); any well-formed tree (kinds and names of letters, digits, `_` and `-`, any text,
//! nesting within the parser's limit) prints to text that parses back to it; `parse_size`
//! never panics on any text value, and a size it accepts reads back from its decimal form.

#![no_main]

use arbitrary::Unstructured;
use disk_backend::resolve::{DiskSpec, SpecArg, SpecValue, parse_size, shown};
use libfuzzer_sys::fuzz_target;

/// Deep enough for every stack a person writes, well inside the parser's limit of 64.
const MAX_TREE_DEPTH: usize = 6;

fn round_trip(tree: &DiskSpec, source: &str) {
    let printed = tree.to_string();
    let reparsed: DiskSpec = printed
        .parse()
        .unwrap_or_else(|e| panic!("{source:?} printed as {printed:?}, which does not parse: {e}"));
    assert_eq!(&reparsed, tree, "{source:?} printed as {printed:?}");
    assert_eq!(
        reparsed.to_string(),
        printed,
        "the canonical form is stable"
    );
    check_values(tree);
}

/// `parse_size` and `shown` on every text value of the tree.
fn check_values(tree: &DiskSpec) {
    let _ = shown(&tree.kind);
    for arg in &tree.args {
        match &arg.value {
            SpecValue::Text(text) => {
                let _ = shown(text);
                if let Ok(size) = parse_size(text) {
                    assert_eq!(parse_size(&size.to_string()), Ok(size), "{text:?}");
                }
            }
            SpecValue::Disk(disk) => check_values(disk),
        }
    }
}

/// A word of letters, digits, `_` and `-` (a kind or an argument name), never empty.
fn identifier(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-ABZ";
    let len = u.int_in_range(1..=8usize)?;
    (0..len)
        .map(|_| u.choose(CHARS).map(|&c| char::from(c)))
        .collect()
}

/// Text made mostly of the grammar's own punctuation, so that quoting is exercised.
fn text(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    if u.ratio(1, 4)? {
        return u.arbitrary();
    }
    const PIECES: &[&str] = &[
        "a", "ram", "64k", "/tmp/x", "\"", "\\", "(", ")", ",", "=", ":", " ", "\t", "\n", "é",
        "\u{a0}", "",
    ];
    let len = u.int_in_range(0..=6usize)?;
    let mut text = String::new();
    for _ in 0..len {
        text.push_str(u.choose(PIECES)?);
    }
    Ok(text)
}

fn tree(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<DiskSpec> {
    let mut spec = DiskSpec::new(identifier(u)?);
    for _ in 0..u.int_in_range(0..=4usize)? {
        let name = if u.arbitrary()? {
            Some(identifier(u)?)
        } else {
            None
        };
        let value = if depth < MAX_TREE_DEPTH && u.ratio(1, 3)? {
            SpecValue::Disk(tree(u, depth + 1)?)
        } else {
            SpecValue::Text(text(u)?)
        };
        spec.args.push(SpecArg { name, value });
    }
    Ok(spec)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let Ok(source) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(tree) = source.parse::<DiskSpec>() {
            round_trip(&tree, source);
        }
    } else {
        let mut u = Unstructured::new(rest);
        if let Ok(tree) = tree(&mut u, 0) {
            round_trip(&tree, "a generated tree");
        }
    }
});
