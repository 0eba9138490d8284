//! Reading a node's arguments, with every unused argument an error.

use super::{DiskSpec, ResolveContext, ResolveError, SpecValue, shown};
use std::borrow::Cow;
use std::cell::RefCell;

/// The arguments of one [`DiskSpec`] node, as a resolver reads them. Each accessor marks what
/// it consumed; [`finish`](Self::finish) then reports anything left over, so a typo is an
/// error rather than silently ignored.
#[derive(Debug)]
pub struct Args<'a> {
    spec: &'a DiskSpec,
    used: RefCell<Vec<bool>>,
}

impl<'a> Args<'a> {
    /// The arguments of `spec`.
    pub fn new(spec: &'a DiskSpec) -> Self {
        Self {
            spec,
            used: RefCell::new(vec![false; spec.args.len()]),
        }
    }

    /// The node.
    pub fn spec(&self) -> &'a DiskSpec {
        self.spec
    }

    fn take(&self, pick: impl Fn(&super::SpecArg) -> bool) -> Option<(usize, &'a SpecValue)> {
        let mut used = self.used.borrow_mut();
        let (index, arg) = self
            .spec
            .args
            .iter()
            .enumerate()
            .find(|(i, arg)| !used[*i] && pick(arg))?;
        used[index] = true;
        Some((index, &arg.value))
    }

    /// Consumes the positional flag `name` (`file(a.img, ro)`), returning whether it is there.
    pub fn flag(&self, name: &str) -> bool {
        self.take(|arg| arg.name.is_none() && matches!(&arg.value, SpecValue::Text(t) if t == name))
            .is_some()
    }

    /// Consumes the named argument `name` as text. Given twice, it is an error ("duplicate
    /// argument"), whatever the values.
    pub fn named_text(
        &self,
        ctx: &ResolveContext<'_>,
        name: &str,
    ) -> Result<Option<&'a str>, ResolveError> {
        let is_name = |arg: &super::SpecArg| arg.name.as_deref() == Some(name);
        let taken = self.take(is_name);
        if taken.is_some() && self.take(is_name).is_some() {
            return Err(ctx.error(format!("duplicate argument `{}`", shown(name))));
        }
        match taken {
            None => Ok(None),
            Some((_, SpecValue::Text(text))) => Ok(Some(text)),
            Some((_, SpecValue::Disk(_))) => {
                Err(ctx.error(format!("`{}` takes text, not a disk", shown(name))))
            }
        }
    }

    /// Consumes the named argument `name` as a size in bytes (`4096`, `64k`, `1G`).
    pub fn named_size(
        &self,
        ctx: &ResolveContext<'_>,
        name: &str,
    ) -> Result<Option<u64>, ResolveError> {
        self.named_text(ctx, name)?
            .map(|text| {
                parse_size(text)
                    .map_err(|message| ctx.error(format!("`{}`: {message}", shown(name))))
            })
            .transpose()
    }

    /// Consumes the named argument `name` as an unsigned integer.
    pub fn named_u64(
        &self,
        ctx: &ResolveContext<'_>,
        name: &str,
    ) -> Result<Option<u64>, ResolveError> {
        self.named_text(ctx, name)?
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    ctx.error(format!(
                        "`{}`: `{}` is not a number",
                        shown(name),
                        shown(text)
                    ))
                })
            })
            .transpose()
    }

    /// Consumes the next positional argument as text.
    pub fn positional_text(
        &self,
        ctx: &ResolveContext<'_>,
        what: &str,
    ) -> Result<&'a str, ResolveError> {
        match self.take(|arg| arg.name.is_none()) {
            Some((_, SpecValue::Text(text))) => Ok(text),
            Some((_, SpecValue::Disk(disk))) => Err(ctx.error(format!(
                "expected {what}, found a `{}` disk",
                shown(&disk.kind)
            ))),
            None => Err(ctx.error(format!("missing {what}"))),
        }
    }

    /// Consumes every remaining positional argument as a disk, with its argument index.
    /// A bare word (`ram`) is a disk without arguments.
    pub fn disks(&self) -> Vec<(usize, Cow<'a, DiskSpec>)> {
        let mut disks = Vec::new();
        while let Some((index, value)) = self.take(|arg| arg.name.is_none()) {
            disks.push((
                index,
                match value {
                    SpecValue::Disk(disk) => Cow::Borrowed(disk),
                    SpecValue::Text(kind) => Cow::Owned(DiskSpec::new(kind.clone())),
                },
            ));
        }
        disks
    }

    /// Fails if any argument was not consumed: a named argument given twice whose first copy
    /// was consumed is a duplicate, anything else unknown or unexpected.
    pub fn finish(&self, ctx: &ResolveContext<'_>) -> Result<(), ResolveError> {
        let used = self.used.borrow();
        let args = &self.spec.args;
        let Some(index) = used.iter().position(|used| !used) else {
            return Ok(());
        };
        let arg = &args[index];
        let duplicate = arg.name.is_some()
            && args
                .iter()
                .zip(used.iter())
                .any(|(other, used)| *used && other.name == arg.name);
        Err(ctx.error(match (&arg.name, &arg.value) {
            (Some(name), _) if duplicate => format!("duplicate argument `{}`", shown(name)),
            (Some(name), _) => format!("unknown argument `{}`", shown(name)),
            (None, SpecValue::Text(text)) => format!("unexpected argument `{}`", shown(text)),
            (None, SpecValue::Disk(disk)) => format!("unexpected `{}` disk", shown(&disk.kind)),
        }))
    }
}

/// Parses `4096`, `4k`, `256M`, `1G`, `2T` (binary multiples, case-insensitive, optional `B`
/// or `iB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let shift = match &lower[digits.len()..] {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        suffix => {
            return Err(format!(
                "unknown size suffix `{}` in `{}`",
                shown(suffix),
                shown(text)
            ));
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{}` is not a size", shown(text)))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{}` is too large", shown(text)))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
