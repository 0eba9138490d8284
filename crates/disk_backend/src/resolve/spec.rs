//! The spec tree, its parser and its canonical printer.

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// One node of a disk stack description: a kind of disk and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DiskSpec {
    /// The kind of disk (`file`, `ram`, `layered`, ...): letters, digits, `_` and `-`.
    pub kind: String,
    /// The arguments, in order.
    pub args: Vec<SpecArg>,
}

/// An argument of a [`DiskSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SpecArg {
    /// The name of a `name=value` argument; `None` for a positional one.
    pub name: Option<String>,
    /// The value.
    pub value: SpecValue,
}

/// The value of a [`SpecArg`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SpecValue {
    /// Text: a path, a number, a flag.
    Text(String),
    /// A nested disk.
    Disk(DiskSpec),
}

impl DiskSpec {
    /// A node of `kind` without arguments.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            args: Vec::new(),
        }
    }

    /// Adds a positional argument.
    pub fn arg(mut self, value: impl Into<SpecValue>) -> Self {
        self.args.push(SpecArg {
            name: None,
            value: value.into(),
        });
        self
    }

    /// Adds a named argument.
    pub fn named(mut self, name: impl Into<String>, value: impl Into<SpecValue>) -> Self {
        self.args.push(SpecArg {
            name: Some(name.into()),
            value: value.into(),
        });
        self
    }

    fn fmt_at(&self, f: &mut fmt::Formatter<'_>, top: bool) -> fmt::Result {
        f.write_str(&self.kind)?;
        // An argument-less node inside another prints with parentheses, so that it does not
        // read back as text.
        if self.args.is_empty() {
            return if top { Ok(()) } else { f.write_str("()") };
        }
        f.write_str("(")?;
        for (i, arg) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if let Some(name) = &arg.name {
                write!(f, "{name}=")?;
            }
            match &arg.value {
                SpecValue::Text(text) => write_text(f, text)?,
                SpecValue::Disk(disk) => disk.fmt_at(f, false)?,
            }
        }
        f.write_str(")")
    }
}

impl From<&str> for SpecValue {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<String> for SpecValue {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<DiskSpec> for SpecValue {
    fn from(disk: DiskSpec) -> Self {
        Self::Disk(disk)
    }
}

fn is_kind_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Characters that end a bare word.
fn is_special(c: char) -> bool {
    c.is_whitespace() || matches!(c, '(' | ')' | ',' | '=' | ':' | '"')
}

fn write_text(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    if !text.is_empty() && !text.chars().any(is_special) {
        return f.write_str(text);
    }
    f.write_str("\"")?;
    for c in text.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// Prints the canonical text form, which parses back to an equal tree.
impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_at(f, true)
    }
}

/// A spec's text form is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed disk spec at column {column}: {message}")]
pub struct ParseError {
    /// 1-based character column of the problem.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl FromStr for DiskSpec {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let mut parser = Parser {
            chars: text.chars().collect(),
            at: 0,
            depth: 0,
        };
        parser.skip_space();
        let spec = parser.node()?;
        parser.skip_space();
        if parser.at < parser.chars.len() {
            return Err(parser.error(format!(
                "unexpected `{}` after the spec",
                parser.chars[parser.at]
            )));
        }
        Ok(spec)
    }
}

/// Deeper nesting than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

struct Parser {
    chars: Vec<char>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            column: self.at + 1,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// A bare word or a quoted string; `Ok(None)` if neither starts here.
    fn word(&mut self) -> Result<Option<(String, bool)>, ParseError> {
        self.skip_space();
        match self.peek() {
            Some('"') => {
                let start = self.at;
                self.at += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None => {
                            self.at = start;
                            return Err(self.error("unterminated string"));
                        }
                        Some('"') => {
                            self.at += 1;
                            return Ok(Some((text, true)));
                        }
                        Some('\\') => {
                            self.at += 1;
                            match self.peek() {
                                Some(c @ ('"' | '\\')) => text.push(c),
                                _ => return Err(self.error("only `\\\"` and `\\\\` are escapes")),
                            }
                            self.at += 1;
                        }
                        Some(c) => {
                            text.push(c);
                            self.at += 1;
                        }
                    }
                }
            }
            Some(c) if !is_special(c) => {
                let start = self.at;
                while self.peek().is_some_and(|c| !is_special(c)) {
                    self.at += 1;
                }
                Ok(Some((self.chars[start..self.at].iter().collect(), false)))
            }
            _ => Ok(None),
        }
    }

    fn kind(&mut self) -> Result<String, ParseError> {
        let start = self.at;
        match self.word()? {
            Some((kind, false)) if kind.chars().all(is_kind_char) => Ok(kind),
            Some(_) => {
                self.at = start;
                self.skip_space();
                Err(self.error("a disk kind is letters, digits, `_` and `-`"))
            }
            None => Err(self.error(match self.peek() {
                Some(c) => format!("expected a disk kind, found `{c}`"),
                None => "expected a disk kind, found the end".into(),
            })),
        }
    }

    /// `kind(:word)*` and an optional argument list.
    fn node(&mut self) -> Result<DiskSpec, ParseError> {
        let kind = self.kind()?;
        self.node_rest(kind)
    }

    fn node_rest(&mut self, kind: String) -> Result<DiskSpec, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(format!("nested more than {MAX_DEPTH} deep")));
        }
        let mut spec = DiskSpec::new(kind);
        while self.eat(':') {
            let Some((text, _)) = self.word()? else {
                return Err(self.error("expected a value after `:`"));
            };
            spec = spec.arg(text);
        }
        // `kind()` is the same as `kind`.
        if self.eat('(') && !self.eat(')') {
            loop {
                let arg = self.arg()?;
                spec.args.push(arg);
                if self.eat(')') {
                    break;
                }
                if !self.eat(',') {
                    return Err(self.error(match self.peek() {
                        Some(c) => format!("expected `,` or `)`, found `{c}`"),
                        None => "expected `,` or `)`, found the end".into(),
                    }));
                }
                // A trailing comma before `)` is allowed.
                if self.eat(')') {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(spec)
    }

    fn arg(&mut self) -> Result<SpecArg, ParseError> {
        self.skip_space();
        let start = self.at;
        let Some((word, quoted)) = self.word()? else {
            return Err(self.error(match self.peek() {
                Some(c) => format!("expected an argument, found `{c}`"),
                None => "expected an argument, found the end".into(),
            }));
        };
        if !quoted && self.eat('=') {
            if !word.chars().all(is_kind_char) {
                self.at = start;
                return Err(self.error("an argument name is letters, digits, `_` and `-`"));
            }
            let value = self.value(true)?;
            return Ok(SpecArg {
                name: Some(word),
                value,
            });
        }
        self.at = start;
        Ok(SpecArg {
            name: None,
            value: self.value(false)?,
        })
    }

    /// Text, or a nested node when a bare word is followed by `(` or `:` (positional only:
    /// a named value may contain `:`, as paths and keys do).
    fn value(&mut self, named: bool) -> Result<SpecValue, ParseError> {
        self.skip_space();
        let start = self.at;
        let Some((word, quoted)) = self.word()? else {
            return Err(self.error("expected a value"));
        };
        if quoted {
            return Ok(SpecValue::Text(word));
        }
        self.skip_space();
        match self.peek() {
            Some('(') | Some(':') if !named || self.peek() == Some('(') => {
                if !word.chars().all(is_kind_char) {
                    self.at = start;
                    return Err(self.error("a disk kind is letters, digits, `_` and `-`"));
                }
                Ok(SpecValue::Disk(self.node_rest(word)?))
            }
            Some(':') => {
                // A named value such as `state=/tmp/a:b`: join the colon-separated words.
                let mut text = word;
                while self.eat(':') {
                    text.push(':');
                    if let Some((more, _)) = self.word()? {
                        text.push_str(&more);
                    }
                }
                Ok(SpecValue::Text(text))
            }
            _ => Ok(SpecValue::Text(word)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> DiskSpec {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn shapes() {
        let spec = parse("crypt(key=@k.key, striped(chunk=64k, file:a.img, file:b.img))");
        assert_eq!(spec.kind, "crypt");
        assert_eq!(spec.args[0].name.as_deref(), Some("key"));
        assert_eq!(spec.args[0].value, SpecValue::Text("@k.key".into()));
        let SpecValue::Disk(striped) = &spec.args[1].value else {
            panic!()
        };
        assert_eq!(striped.args.len(), 3);
        assert_eq!(
            striped.args[1].value,
            SpecValue::Disk(DiskSpec::new("file").arg("a.img"))
        );
        assert_eq!(parse("ram"), DiskSpec::new("ram"));
        assert_eq!(parse("  ram ( ) "), DiskSpec::new("ram"));
        assert_eq!(
            parse("layered(ram)").args[0].value,
            SpecValue::Text("ram".into())
        );
        assert_eq!(
            parse("layered(ram())").args[0].value,
            SpecValue::Disk(DiskSpec::new("ram"))
        );
        assert_eq!(
            parse(r#"file("my \"disk\".img", ro,)"#),
            DiskSpec::new("file").arg("my \"disk\".img").arg("ro")
        );
        assert_eq!(
            parse("prwrap(file:x, state=/tmp/a:b)").args[1].value,
            SpecValue::Text("/tmp/a:b".into())
        );
    }

    #[test]
    fn round_trips() {
        for text in [
            "ram",
            "ram(size=64M)",
            "layered(ram, file:base.img:ro)",
            "layered(layer(ram, read_cache, write_through), file(base.img))",
            "crypt(key=@k, striped(chunk=64k, file:a.img, file:b.img))",
            r#"file("a b.img", "x:y", "", "q\"\\")"#,
            "delay(ms=5, layered(ram(), ram(size=1G)))",
        ] {
            let tree = parse(text);
            let printed = tree.to_string();
            assert_eq!(parse(&printed), tree, "{text} -> {printed}");
            assert_eq!(
                parse(&printed).to_string(),
                printed,
                "canonical form is stable"
            );
        }
    }

    #[test]
    fn errors_name_the_column() {
        for (text, column, fragment) in [
            ("", 1, "expected a disk kind"),
            ("(", 1, "expected a disk kind"),
            ("ram(", 5, "expected an argument"),
            ("ram(a", 6, "expected `,` or `)`"),
            ("ram(a b)", 7, "expected `,` or `)`"),
            ("ram)", 4, "unexpected `)`"),
            ("ram(\"abc", 5, "unterminated string"),
            ("ram(x=)", 7, "expected a value"),
            ("r@m", 1, "disk kind is letters"),
            ("ram(a.b=1)", 5, "argument name"),
            ("ram(\"\\n\")", 7, "escapes"),
            ("ram:", 5, "after `:`"),
            ("ram(,)", 5, "expected an argument"),
        ] {
            let err = text.parse::<DiskSpec>().unwrap_err();
            assert!(err.message.contains(fragment), "{text:?}: {err}");
            assert_eq!(err.column, column, "{text:?}: {err}");
        }
        let deep = "a(".repeat(100) + &")".repeat(100);
        assert!(
            deep.parse::<DiskSpec>()
                .unwrap_err()
                .message
                .contains("nested")
        );
    }
}
