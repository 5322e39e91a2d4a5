//! Where an outbound request wants to go.
//!
//! The logical destination is the request's authority: the absolute-form URI an
//! HTTP proxy client sends (`GET http://billing/charge`), the `:authority` of an
//! HTTP/2 request, or else the `Host` header. [`Destination`] is that authority
//! parsed once: a lower-cased host without a trailing dot (so `Billing.` and
//! `billing` are the same directory name) and an optional port.

use std::net::IpAddr;

use http::Request;
use http::uri::Authority;

use crate::error::ProxyError;

/// The logical destination of an outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Lower-cased host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// The port, if the authority named one.
    pub port: Option<u16>,
    /// The authority exactly as the client sent it (for the `Host` header).
    pub authority: Authority,
}

impl Destination {
    /// Read the destination from a request.
    pub fn from_request<B>(req: &Request<B>) -> Result<Self, ProxyError> {
        if let Some(authority) = req.uri().authority() {
            return Self::parse(authority.clone());
        }
        let host = req
            .headers()
            .get(http::header::HOST)
            .ok_or(ProxyError::NoAuthority)?;
        let text = host.to_str().map_err(|_| ProxyError::BadAuthority {
            authority: String::from_utf8_lossy(host.as_bytes()).into_owned(),
            problem: "the Host header is not valid text",
        })?;
        let authority: Authority = text.parse().map_err(|_| ProxyError::BadAuthority {
            authority: text.to_owned(),
            problem: "not a host[:port]",
        })?;
        Self::parse(authority)
    }

    fn parse(authority: Authority) -> Result<Self, ProxyError> {
        let bad = |problem| ProxyError::BadAuthority {
            authority: authority.as_str().to_owned(),
            problem,
        };
        if authority.as_str().contains('@') {
            return Err(bad("user info is not allowed in a destination"));
        }
        let raw_host = authority.host();
        let host = raw_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(raw_host)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let port = match authority.as_str().rsplit_once(':') {
            // `authority.port_u16()` is None both for "no port" and "bad port".
            Some((before, after)) if !before.ends_with(':') && !after.contains(']') => Some(
                after
                    .parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            _ => None,
        };
        Ok(Self {
            host,
            port,
            authority,
        })
    }

    /// The host as an IP address, if it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dest(uri: &str, host: Option<&str>) -> Result<Destination, ProxyError> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        Destination::from_request(&b.body(()).unwrap())
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let d = dest("http://Billing./charge", Some("other")).unwrap();
        assert_eq!(d.host, "billing");
        assert_eq!(d.port, None);
        assert_eq!(d.authority.as_str(), "Billing.");
    }

    #[test]
    fn host_header_with_port() {
        let d = dest("/x", Some("svc.test:8080")).unwrap();
        assert_eq!((d.host.as_str(), d.port), ("svc.test", Some(8080)));
    }

    #[test]
    fn ipv6_literal() {
        let d = dest("http://[::1]:81/", None).unwrap();
        assert_eq!(d.host, "::1");
        assert_eq!(d.port, Some(81));
        assert!(d.ip().is_some());
    }

    #[test]
    fn missing_and_bad() {
        assert!(matches!(dest("/x", None), Err(ProxyError::NoAuthority)));
        assert!(matches!(
            dest("/x", Some("a b")),
            Err(ProxyError::BadAuthority { .. })
        ));
        assert!(matches!(
            dest("http://u@billing/", None),
            Err(ProxyError::BadAuthority { .. })
        ));
    }
}
