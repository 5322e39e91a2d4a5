//! [`ConfigError`]: the one error type of this crate, and how it reads.
//!
//! Every mistake in a file — TOML syntax, an unknown key, a wrong type, a bad
//! value, a rule across keys — is an [`ConfigError::Invalid`] that names the
//! file, the 1-based line and column, the dotted key path and what is wrong,
//! then quotes the line with the offending text underlined:
//!
//! ```text
//! billing.toml:18:11: routes[0].retry.backoff: invalid duration range "250ms..25ms": ...
//!    |
//!  18 | backoff = "250ms..25ms"
//!    |           ^^^^^^^^^^^^^
//! ```
//!
//! The wording is pinned by the golden tests in `tests/golden/`; it is a
//! user-facing contract, so change it on purpose only. A file that cannot be
//! read at all is an [`ConfigError::Io`]. The display is complete on its own:
//! print it with `{}`, not with an error-chain printer that would repeat the
//! OS error.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a config file was rejected. Nothing from a rejected file is applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file was read, but its content is not a valid config.
    #[error(fmt = render_invalid)]
    Invalid {
        /// The file, as the caller named it.
        file: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column, in characters, of the offending text.
        column: usize,
        /// Dotted key path, e.g. `routes[0].retry.backoff`; `<root>` when the
        /// mistake is not under any key (e.g. a TOML syntax error).
        key: String,
        /// What is wrong, in one line.
        message: String,
        /// The full text of the offending line, for the quote.
        source_line: String,
        /// How many characters of the line to underline (at least 1).
        width: usize,
    },
    /// The file could not be read.
    #[error(fmt = render_io)]
    Io {
        /// The file that could not be read.
        file: PathBuf,
        /// Where the path came from, e.g. `directory.services[0].policy in
        /// bootstrap.toml`; `None` for the file the caller asked for.
        context: Option<String>,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            Self::Invalid { file, .. } | Self::Io { file, .. } => file,
        }
    }
}

#[allow(clippy::too_many_arguments)] // thiserror passes every field
fn render_invalid(
    file: &Path,
    line: &usize,
    column: &usize,
    key: &str,
    message: &str,
    source_line: &str,
    width: &usize,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let number = line.to_string();
    let gutter = " ".repeat(number.len().max(3));
    // Keep tabs before the caret so it lines up under a tab-indented line.
    let pad: String = source_line
        .chars()
        .take(column.saturating_sub(1))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    writeln!(f, "{}:{line}:{column}: {key}: {message}", file.display())?;
    writeln!(f, "{gutter} |")?;
    writeln!(f, "{number:>3} | {source_line}")?;
    write!(f, "{gutter} | {pad}{}", "^".repeat((*width).max(1)))
}

fn render_io(
    file: &Path,
    context: &Option<String>,
    source: &std::io::Error,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    write!(f, "cannot read {}", file.display())?;
    if let Some(context) = context {
        write!(f, " ({context})")?;
    }
    write!(f, ": {source}")
}

/// Builds an [`ConfigError::Invalid`] for the byte range `span` of `src`.
///
/// The caret underlines `span` up to the end of its first line. A span at the
/// very end of the file (where a syntax error about a missing token points)
/// is moved onto the last line so there is text to quote.
pub(crate) fn invalid(
    src: &str,
    file: &Path,
    span: std::ops::Range<usize>,
    key: String,
    message: String,
) -> ConfigError {
    let mut start = floor_char_boundary(src, span.start.min(src.len()));
    if start == src.len() && src.ends_with('\n') {
        start -= 1;
    }
    let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
    // The quote leaves out the `\r` of a CRLF line; so do the column and the
    // caret, which would otherwise stand one past the quoted text.
    let text_end = line_start + src[line_start..line_end].trim_end_matches('\r').len();
    let start = start.min(text_end);
    let end = floor_char_boundary(src, span.end.clamp(start, text_end));
    ConfigError::Invalid {
        file: file.to_owned(),
        line: src[..start].matches('\n').count() + 1,
        column: src[line_start..start].chars().count() + 1,
        key,
        message,
        source_line: src[line_start..text_end].to_owned(),
        width: src[start..end].chars().count().max(1),
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_line_and_underlines_the_span() {
        let src = "a = 1\ntimeout = \"2 s\"\n";
        let start = src.find('"').unwrap_or(0);
        let err = invalid(
            src,
            Path::new("f.toml"),
            start..start + 5,
            "timeout".into(),
            "bad".into(),
        );
        assert_eq!(
            err.to_string(),
            "f.toml:2:11: timeout: bad\n    |\n  2 | timeout = \"2 s\"\n    |           ^^^^^"
        );
    }

    #[test]
    fn handles_end_of_file_tabs_and_wide_line_numbers() {
        let err = invalid("x = \n", Path::new("f"), 5..5, "<root>".into(), "m".into());
        assert!(err.to_string().starts_with("f:1:5: <root>: m\n"), "{err}");
        let err = invalid("\tk = 1", Path::new("f"), 5..6, "k".into(), "m".into());
        assert!(
            err.to_string().ends_with("  1 | \tk = 1\n    | \t    ^"),
            "{err}"
        );
        // A CRLF file: the column and caret are those of the same LF file
        // (found by the `bootstrap` fuzz target: a syntax error at the end of a
        // CRLF file was reported one column past the end of its last line).
        let err = invalid(
            "x = \r\n",
            Path::new("f"),
            6..6,
            "<root>".into(),
            "m".into(),
        );
        assert!(err.to_string().starts_with("f:1:5: <root>: m\n"), "{err}");
        assert!(
            err.to_string().ends_with("  1 | x = \n    |     ^"),
            "{err}"
        );
        let err = invalid("k = 1\r\n", Path::new("f"), 4..7, "k".into(), "m".into());
        assert!(
            err.to_string().ends_with("  1 | k = 1\n    |     ^"),
            "{err}"
        );
        let src = "\n".repeat(1200) + "k = 1";
        let err = invalid(&src, Path::new("f"), 1200..1201, "k".into(), "m".into());
        assert!(err.to_string().ends_with("1201 | k = 1\n     | ^"), "{err}");
    }
}
