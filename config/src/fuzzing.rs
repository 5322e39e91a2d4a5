//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay
//! their seed corpora. Not part of the API: hidden from the docs, and free to
//! change with the fuzz targets.
//!
//! Each function takes arbitrary bytes and panics only when the parser breaks
//! one of its promises:
//!
//! - no input panics (non-UTF-8 input is not text, and is skipped);
//! - a rejected file yields a located [`ConfigError::Invalid`] whose display
//!   names the file, a line that exists and a column on it, and quotes one
//!   line;
//! - an accepted file survives the JSON round trip of the admin `/config`
//!   endpoint unchanged.

use std::fmt::Debug;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ConfigError;
use crate::{Bootstrap, Policy};

/// The file name errors are reported against.
const FILE: &str = "fuzz.toml";

/// Parses `data` as a bootstrap file and checks the result.
pub fn bootstrap(data: &[u8]) -> Option<Bootstrap> {
    let src = std::str::from_utf8(data).ok()?;
    check(src, crate::parse_bootstrap(src, Path::new(FILE)))
}

/// Parses `data` as a policy file and checks the result.
pub fn policy(data: &[u8]) -> Option<Policy> {
    let src = std::str::from_utf8(data).ok()?;
    check(src, crate::parse_policy(src, Path::new(FILE)))
}

fn check<T>(src: &str, parsed: Result<T, ConfigError>) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    match parsed {
        Ok(value) => {
            let json = serde_json::to_string(&value)
                .unwrap_or_else(|e| panic!("an accepted file does not serialize: {e}"));
            let back: T = serde_json::from_str(&json).unwrap_or_else(|e| {
                panic!("the JSON of an accepted file does not parse back: {e}\n{json}")
            });
            assert_eq!(back, value, "the JSON round trip changed the value");
            Some(value)
        }
        Err(error) => {
            check_error(src, &error);
            None
        }
    }
}

fn check_error(src: &str, error: &ConfigError) {
    let ConfigError::Invalid {
        file,
        line,
        column,
        source_line,
        width,
        ..
    } = error
    else {
        panic!("parsing text reported an I/O error: {error}");
    };
    assert_eq!(file, Path::new(FILE));
    let lines = src.split('\n').count();
    assert!(
        (1..=lines).contains(line),
        "line {line} of a {lines}-line file"
    );
    let text = src.split('\n').nth(line - 1).unwrap_or_default();
    assert_eq!(
        source_line,
        text.trim_end_matches('\r'),
        "the quote is not line {line}"
    );
    let chars = source_line.chars().count();
    assert!(
        *column >= 1 && *column <= chars + 1,
        "column {column} of a {chars}-character line"
    );
    assert!(*width >= 1);
    let shown = error.to_string();
    let head = format!("{FILE}:{line}:{column}: ");
    assert!(shown.starts_with(&head), "{shown}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_inputs_do_not_panic() {
        for input in [
            &b""[..],
            b"\xff",
            b"\n",
            b"\r\n",
            b"[",
            b"service = \"a\"\r",
            b"a = \"\xc3\xa9\"\n\xc3\xa9",
            b"[service]\nname = \"x\"\napp = \"127.0.0.1:1\"\n",
        ] {
            bootstrap(input);
            policy(input);
        }
    }
}
