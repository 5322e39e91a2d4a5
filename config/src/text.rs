//! Helpers for values written as strings: a generic `FromStr` visitor and
//! socket addresses with a message that shows the expected form.
//!
//! serde's own `SocketAddr` error is `invalid socket address syntax`, which
//! does not say what to write; [`socket_addr`] names the value and gives an
//! example built from it when it is a bare IP. Only IP literals are accepted:
//! the config crate never resolves names.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A visitor for a string-only type whose `FromStr` error is already a
/// user-ready message.
pub(crate) struct ParseVisitor<T> {
    expecting: &'static str,
    marker: PhantomData<T>,
}

impl<T> ParseVisitor<T> {
    pub(crate) const fn new(expecting: &'static str) -> Self {
        Self {
            expecting,
            marker: PhantomData,
        }
    }
}

impl<T> Visitor<'_> for ParseVisitor<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

/// A socket address with this crate's error message.
#[derive(Debug, Clone, Copy)]
struct Addr(SocketAddr);

/// The error for a string that is not `IP:PORT`.
#[derive(Debug)]
struct AddrError(String);

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let example = match self.0.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 4143).to_string(),
            Err(_) => "10.0.0.5:4143".to_owned(),
        };
        write!(
            f,
            "invalid socket address {:?}: expected IP:PORT, e.g. {example:?}",
            self.0
        )
    }
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Addr).map_err(|_| AddrError(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("a socket address like \"10.0.0.5:4143\""))
    }
}

/// `deserialize_with` for a `SocketAddr`.
pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    Addr::deserialize(d).map(|a| a.0)
}

/// `deserialize_with` for a list of `SocketAddr`s.
pub(crate) fn socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let addrs = Vec::<Addr>::deserialize(d)?;
    Ok(addrs.into_iter().map(|a| a.0).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        #[serde(deserialize_with = "socket_addr")]
        a: SocketAddr,
    }

    fn err(src: &str) -> String {
        toml::from_str::<Doc>(src).unwrap_err().message().to_owned()
    }

    #[test]
    fn socket_addresses_parse_v4_and_v6() {
        let doc: Doc = toml::from_str("a = \"10.0.0.5:4143\"").unwrap();
        assert_eq!(doc.a.port(), 4143);
        let doc: Doc = toml::from_str("a = \"[::1]:80\"").unwrap();
        assert!(doc.a.is_ipv6());
    }

    #[test]
    fn socket_address_errors_show_the_expected_form() {
        assert_eq!(
            err("a = \"10.0.0.5\""),
            "invalid socket address \"10.0.0.5\": expected IP:PORT, e.g. \"10.0.0.5:4143\""
        );
        assert_eq!(
            err("a = \"::1\""),
            "invalid socket address \"::1\": expected IP:PORT, e.g. \"[::1]:4143\""
        );
        assert_eq!(
            err("a = \"billing:80\""),
            "invalid socket address \"billing:80\": expected IP:PORT, e.g. \"10.0.0.5:4143\""
        );
        assert!(err("a = 4143").contains("expected a socket address like"));
    }
}
