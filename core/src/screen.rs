//! Checks every request passes on the outbound and inbound listeners before it
//! is routed, for what hyper lets through (hyper itself refuses the rest; see
//! the README's "Hardening defaults").
//!
//! - the request target is at most `[limits] max_uri_length` (414);
//! - an HTTP/1 request has at most one `Host` (RFC 9112 §3.2: 400), and its
//!   framing is unambiguous (400, and the connection is closed after the
//!   answer): `Transfer-Encoding` is exactly `chunked`, and not sent together
//!   with `Content-Length` (RFC 9112 §6.3, as Envoy does). hyper already
//!   refuses differing `Content-Length`s, a `Transfer-Encoding` whose last
//!   coding is not `chunked`, and any `Transfer-Encoding` in HTTP/1.0. With
//!   both fields it frames by `Transfer-Encoding` and removes
//!   `Content-Length` before the request reaches the listener's service, so
//!   the server follows the raw bytes ([`crate::framing`]) and marks such a
//!   request ([`BothLengths`]); nothing of it goes upstream;
//! - on the inbound listener, an absolute-form (or CONNECT) HTTP/1 request
//!   must name the local service or this listener (403): the inbound listener
//!   is never a proxy to other hosts. HTTP/2's `:authority` is the `Host`
//!   header's equivalent and is not checked, like `Host`.

use std::net::{IpAddr, SocketAddr};

use http::uri::{Authority, Uri};
use http::{Request, Version, header};

use crate::error::ProxyError;
use crate::framing::BothLengths;

/// The request-target length of `uri` as it came (scheme, authority, path
/// and query), without allocating.
pub fn uri_length(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// The checks both listeners make.
pub fn request<B>(req: &Request<B>, max_uri_length: usize) -> Result<(), ProxyError> {
    let length = uri_length(req.uri());
    if length > max_uri_length {
        return Err(ProxyError::UriTooLong {
            length,
            max: max_uri_length,
        });
    }
    if req.version() <= Version::HTTP_11 {
        framing(req)?;
        let mut hosts = req.headers().get_all(header::HOST).iter();
        if hosts.next().is_some() && hosts.next().is_some() {
            return Err(ProxyError::AmbiguousRequest {
                problem: "more than one Host header",
            });
        }
    }
    Ok(())
}

/// `Transfer-Encoding`, when present, must be exactly one `chunked`, and
/// must not have come with a `Content-Length` (which hyper removed: the
/// server marked the request).
fn framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else {
        return Ok(());
    };
    if req.extensions().get::<BothLengths>().is_some() {
        return Err(ProxyError::AmbiguousRequest {
            problem: "both Content-Length and Transfer-Encoding",
        });
    }
    if codings.next().is_some()
        || !first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
    {
        return Err(ProxyError::AmbiguousRequest {
            problem: "Transfer-Encoding must be exactly \"chunked\"",
        });
    }
    Ok(())
}

/// What an inbound request may name in absolute form.
#[derive(Debug, Clone, Copy)]
pub struct LocalNames<'a> {
    /// The local service's name.
    pub service: &'a str,
    /// The inbound listener's bound address.
    pub listener: Option<SocketAddr>,
    /// `[service] advertise`.
    pub advertise: Option<SocketAddr>,
}

/// Refuses an HTTP/1 absolute-form or CONNECT request on the inbound listener
/// whose authority is not the local service or this listener.
pub fn inbound_authority<B>(req: &Request<B>, local: LocalNames<'_>) -> Result<(), ProxyError> {
    if req.version() > Version::HTTP_11 {
        return Ok(());
    }
    match req.uri().authority() {
        Some(authority) if !is_local(authority, local) => Err(ProxyError::ForeignAuthority {
            authority: authority.as_str().to_owned(),
        }),
        _ => Ok(()),
    }
}

fn is_local(authority: &Authority, local: LocalNames<'_>) -> bool {
    let host = authority.host();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare
        .trim_end_matches('.')
        .eq_ignore_ascii_case(local.service)
    {
        return true;
    }
    let Ok(ip) = bare.parse::<IpAddr>() else {
        return false;
    };
    let port = authority.port_u16().unwrap_or(80);
    let is =
        |addr: SocketAddr| addr.port() == port && (addr.ip() == ip || addr.ip().is_unspecified());
    local.listener.is_some_and(is) || local.advertise.is_some_and(is)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn long_targets_are_refused() {
        let long = format!("/{}", "a".repeat(100));
        assert!(request(&req(&long, &[]), 101).is_ok());
        assert!(matches!(
            request(&req(&long, &[]), 100),
            Err(ProxyError::UriTooLong {
                length: 101,
                max: 100
            })
        ));
        assert_eq!(uri_length(&"http://b:1/x?y".parse().unwrap()), 14);
    }

    #[test]
    fn transfer_encoding_is_chunked_or_absent() {
        for ok in ["chunked", "Chunked", " chunked "] {
            assert!(
                request(&req("/", &[("transfer-encoding", ok)]), 100).is_ok(),
                "{ok}"
            );
        }
        for bad in ["gzip, chunked", "identity", "chunked, chunked"] {
            assert!(
                request(&req("/", &[("transfer-encoding", bad)]), 100).is_err(),
                "{bad}"
            );
        }
        let two = req(
            "/",
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert!(request(&two, 100).is_err());
    }

    #[test]
    fn a_request_marked_with_both_lengths_is_refused() {
        let mut marked = req("/", &[("transfer-encoding", "chunked")]);
        assert!(request(&marked, 100).is_ok());
        marked.extensions_mut().insert(BothLengths);
        assert!(matches!(
            request(&marked, 100),
            Err(ProxyError::AmbiguousRequest {
                problem: "both Content-Length and Transfer-Encoding"
            })
        ));
    }

    #[test]
    fn inbound_absolute_form_must_name_this_service_or_listener() {
        let local = LocalNames {
            service: "billing",
            listener: Some("0.0.0.0:4143".parse().unwrap()),
            advertise: Some("10.0.0.5:4143".parse().unwrap()),
        };
        for ok in [
            "/charge",
            "http://billing/charge",
            "http://Billing.:8080/charge",
            "http://10.0.0.9:4143/x",
            "http://[::1]:4143/x",
        ] {
            assert!(inbound_authority(&req(ok, &[]), local).is_ok(), "{ok}");
        }
        for bad in [
            "http://example.com/",
            "http://10.0.0.9:80/x",
            "http://billing.evil/x",
        ] {
            assert!(
                matches!(
                    inbound_authority(&req(bad, &[]), local),
                    Err(ProxyError::ForeignAuthority { .. })
                ),
                "{bad}"
            );
        }
        let loopback = LocalNames {
            listener: Some("127.0.0.1:4143".parse().unwrap()),
            advertise: None,
            ..local
        };
        assert!(inbound_authority(&req("http://10.0.0.9:4143/x", &[]), loopback).is_err());
        let mut h2 = req("http://example.com/", &[]);
        *h2.version_mut() = Version::HTTP_2;
        assert!(
            inbound_authority(&h2, local).is_ok(),
            ":authority is like Host"
        );
    }
}
