//! Bearer tokens for the admin API.
//!
//! Tokens are read from a file, one per line (blank lines and `#` comments
//! ignored), so they never appear on a command line or in a process listing.
//! Comparison is constant-time in the token's content; only the number of
//! configured tokens and the presented token's length can leak through timing.
//! Tokens never appear in logs or error messages (`Debug` is redacted).

use std::fmt;
use std::path::Path;

/// The accepted tokens.
#[derive(Clone)]
pub struct Tokens(Vec<Vec<u8>>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens(<{} redacted>)", self.0.len())
    }
}

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {path} holds no token")]
    Empty { path: String },
    #[error("a token in {path} is shorter than 16 characters")]
    TooShort { path: String },
}

impl Tokens {
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            TokenError::Empty { .. } => TokenError::Empty {
                path: path.display().to_string(),
            },
            TokenError::TooShort { .. } => TokenError::TooShort {
                path: path.display().to_string(),
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let tokens: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if tokens.is_empty() {
            return Err(TokenError::Empty {
                path: String::new(),
            });
        }
        if tokens.iter().any(|t| t.len() < 16) {
            return Err(TokenError::TooShort {
                path: String::new(),
            });
        }
        Ok(Self(tokens))
    }

    /// Whether `presented` is one of the tokens.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = presented.as_bytes();
        // Check every token, without short-circuiting, so timing does not say which matched.
        self.0
            .iter()
            .fold(false, |found, t| found | constant_time_eq(t, presented))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let t = Tokens::parse("# ops\nabcdefghijklmnop\n\nqrstuvwxyz0123456\n").unwrap();
        assert!(t.accepts("abcdefghijklmnop"));
        assert!(t.accepts("qrstuvwxyz0123456"));
        assert!(!t.accepts("abcdefghijklmnoq"));
        assert!(!t.accepts(""));
        assert!(!format!("{t:?}").contains("abcdef"));
    }

    #[test]
    fn rejects_empty_and_short() {
        assert!(matches!(
            Tokens::parse("# none\n"),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            Tokens::parse("short\n"),
            Err(TokenError::TooShort { .. })
        ));
    }
}
