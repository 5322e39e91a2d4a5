//! From a failed parse or a broken rule to a [`ConfigError::Invalid`] that
//! points at the right key.
//!
//! Two kinds of failure reach here:
//!
//! - serde errors from [`deserialize`]: `serde_path_to_error` records the key
//!   path, and the `toml` deserializer records the byte span of the value (or,
//!   for an unknown key, of the key). serde's stock wording is reworded by
//!   [`humanize`] into this crate's voice (`unknown key "x", expected one of:
//!   ...`, `expected a duration string like "2s", found integer 2`).
//! - [`Problem`]s from the cross-key rules run after a successful parse
//!   (duplicate names, `min <= max` pairs, ...). Those values are plain Rust
//!   by then, so a problem carries a [`KeyPath`] and [`Problem::into_error`]
//!   re-parses the document with spans to find where that key is written.
//!   A path that names a key left to its default falls back to its nearest
//!   written ancestor, so every error still has a location.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{ConfigError, invalid};

/// Parses `src` as TOML into `T`, with located, reworded errors.
pub(crate) fn deserialize<T: DeserializeOwned>(src: &str, file: &Path) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        invalid(src, file, span, "<root>".to_owned(), e.message().to_owned())
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut key = e.path().to_string();
        let inner = e.into_inner();
        let mut message = humanize(inner.message());
        let mut span = inner.span().unwrap_or(0..0);
        if let Some(field) = inner.message().strip_prefix("missing field `") {
            // Name the missing key itself, not the table that lacks it.
            let field = field.trim_end_matches('`');
            message = format!("missing required key {field:?}");
            if key == "." {
                // The document's span starts at its first byte, often a
                // comment; quote the first line with content instead.
                key = field.to_owned();
                span = first_content_line(src);
            } else {
                key = format!("{key}.{field}");
            }
        }
        if key == "." {
            key = "<root>".to_owned();
        }
        invalid(src, file, span, key, message)
    })
}

/// The span of the first line that is neither blank nor a comment.
fn first_content_line(src: &str) -> Range<usize> {
    let mut start = 0;
    for line in src.split_inclusive('\n') {
        let text = line.trim();
        if !text.is_empty() && !text.starts_with('#') {
            return start..start + line.trim_end().len();
        }
        start += line.len();
    }
    0..0
}

/// Rewords serde's stock messages; anything else passes through.
pub(crate) fn humanize(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return unknown("key", rest);
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        return unknown("value", rest);
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            return format!(
                "expected {}, found {}",
                noun(expected),
                noun(&found.replace('`', ""))
            );
        }
    }
    message.to_owned()
}

/// `x`, expected one of `a`, `b`  ->  "x", expected one of: a, b
fn unknown(what: &str, rest: &str) -> String {
    let Some((name, expected)) = rest.split_once("`, ") else {
        return format!("unknown {what} `{rest}");
    };
    let list = expected
        .trim_start_matches("expected one of ")
        .trim_start_matches("expected ")
        .replace(" or ", ", ")
        .replace('`', "");
    if expected.starts_with("there are no") {
        format!("unknown {what} {name:?}: nothing is accepted here")
    } else {
        format!("unknown {what} {name:?}, expected one of: {list}")
    }
}

/// serde's names for data shapes, in TOML's words.
fn noun(s: &str) -> String {
    match s {
        "map" | "a map" => "a table".to_owned(),
        "sequence" | "a sequence" => "an array".to_owned(),
        _ => s.replace("floating point", "float"),
    }
}

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A dotted key path such as `directory.services[1].endpoints[0].address`,
/// written the way `serde_path_to_error` writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// A path of plain keys: `KeyPath::new(["dns", "max_ttl"])`.
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            keys.into_iter()
                .map(|k| Segment::Key(k.to_owned()))
                .collect(),
        )
    }

    /// This path, then `key`.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_owned()));
        next
    }

    /// This path, then `[index]`.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// How many leading segments `root` contains, and the span of the last.
    fn resolve(&self, root: &Spanned<DeTable<'_>>) -> (usize, Range<usize>) {
        let mut span = root.span();
        let mut node: Option<&DeValue<'_>> = None;
        for (depth, segment) in self.0.iter().enumerate() {
            let found = match (segment, node) {
                (Segment::Key(k), None) => root.get_ref().get(k.as_str()),
                (Segment::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
                (Segment::Index(i), Some(DeValue::Array(a))) => a.get(*i),
                _ => None,
            };
            let Some(found) = found else {
                return (depth, span);
            };
            span = found.span();
            node = Some(found.get_ref());
        }
        (self.0.len(), span)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<root>");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A broken cross-key rule, found after parsing, waiting to be located.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    path: KeyPath,
    alternative: Option<KeyPath>,
    message: String,
}

impl Problem {
    /// A problem with the value at `path`.
    pub(crate) fn new(path: KeyPath, message: impl Into<String>) -> Self {
        Self {
            path,
            alternative: None,
            message: message.into(),
        }
    }

    /// Point at `other` instead when `path` is not written in the file (a
    /// rule between two keys, one of which may be left to its default).
    pub(crate) fn or_at(mut self, other: KeyPath) -> Self {
        self.alternative = Some(other);
        self
    }

    /// Locates the problem in `src`, the text it was parsed from.
    pub(crate) fn into_error(self, src: &str, file: &Path) -> ConfigError {
        let Ok(root) = DeTable::parse(src) else {
            // Unreachable: `src` parsed once already.
            return invalid(src, file, 0..0, self.path.to_string(), self.message);
        };
        let (depth, span) = self.path.resolve(&root);
        let (path, span) = match &self.alternative {
            Some(alt) if depth < self.path.0.len() => match alt.resolve(&root) {
                (d, alt_span) if d == alt.0.len() => (alt.clone(), alt_span),
                _ => (self.path, span),
            },
            _ => (self.path, span),
        };
        invalid(src, file, span, path.to_string(), self.message)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rewords_serde_messages() {
        assert_eq!(
            humanize("unknown field `retires`, expected one of `attempts`, `on`, `backoff`"),
            "unknown key \"retires\", expected one of: attempts, on, backoff"
        );
        assert_eq!(
            humanize("unknown field `x`, expected `a` or `b`"),
            "unknown key \"x\", expected one of: a, b"
        );
        assert_eq!(
            humanize("unknown field `x`, expected `a`"),
            "unknown key \"x\", expected one of: a"
        );
        assert_eq!(
            humanize("unknown variant `rr`, expected one of `p2c-ewma`, `round-robin`"),
            "unknown value \"rr\", expected one of: p2c-ewma, round-robin"
        );
        assert_eq!(
            humanize("invalid type: integer `2`, expected a duration string like \"2s\""),
            "expected a duration string like \"2s\", found integer 2"
        );
        assert_eq!(
            humanize("invalid type: map, expected a string"),
            "expected a string, found a table"
        );
        assert_eq!(
            humanize("invalid type: floating point `1.5`, expected an integer"),
            "expected an integer, found float 1.5"
        );
        assert_eq!(
            humanize("invalid type: string \"x\", expected a sequence"),
            "expected an array, found string \"x\""
        );
        assert_eq!(humanize("must be longer than 0s"), "must be longer than 0s");
    }

    #[test]
    fn key_paths_display_and_locate() {
        let path = KeyPath::new(["directory", "services"]).index(1).key("name");
        assert_eq!(path.to_string(), "directory.services[1].name");
        assert_eq!(KeyPath::default().to_string(), "<root>");

        let src = "[[directory.services]]\nname = \"a\"\n[[directory.services]]\nname = \"b\"\n";
        let root = DeTable::parse(src).unwrap();
        let (depth, span) = path.resolve(&root);
        assert_eq!((depth, &src[span]), (4, "\"b\""));
        let missing = KeyPath::new(["directory", "services"])
            .index(1)
            .key("endpoints");
        let (depth, span) = missing.resolve(&root);
        assert_eq!((depth, &src[span]), (3, "[[directory.services]]"));
    }

    #[test]
    fn problems_fall_back_to_the_written_key() {
        let src = "[dns]\nmin_ttl = \"10m\"\n";
        let problem = Problem::new(KeyPath::new(["dns", "max_ttl"]), "m")
            .or_at(KeyPath::new(["dns", "min_ttl"]));
        let err = problem.into_error(src, Path::new("f")).to_string();
        assert!(err.starts_with("f:2:11: dns.min_ttl: m"), "{err}");
    }
}
