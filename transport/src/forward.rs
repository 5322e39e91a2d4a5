//! The mechanics of the last hop, which the endpoint client layer
//! ([`weft_stack::endpoint`]) applies to each try.
//!
//! A request is made a correct proxied request once ([`clean`]: hop-by-hop
//! headers removed, `Host` kept or filled in from an HTTP/2 `:authority`); each
//! try then points the URI at the endpoint and chooses the HTTP version for the
//! hop, sends it over the endpoint's pool, and cleans the response. Bodies are
//! passed through frame by frame, trailers included.
//!
//! A hop to a sidecar over mTLS ([`crate::client::UpstreamClient::is_mesh`]) is always HTTP/2
//! (HTTP/1.1 for upgrades), with an `https` URI; the version the callee's
//! sidecar should speak to its app (the one the app used, or the service's
//! `protocol`) travels in the [`WEFT_PROTOCOL`] header, which the callee's
//! inbound listener removes.
//!
//! HTTP/1.1 upgrades (WebSocket): the `Upgrade`/`Connection` headers are kept, and
//! when the endpoint answers `101 Switching Protocols` a tracked task joins the two
//! upgraded connections and copies bytes both ways until either side closes.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use weft_config::Protocol;

use crate::pool::SendError;
use weft_core::error::ProxyError;
use weft_core::headers;
use weft_core::retry::replay::BodyError;

pub use weft_core::headers::WEFT_PROTOCOL;

/// The app-side protocol a caller's sidecar asked for in [`WEFT_PROTOCOL`],
/// removed from `headers`; `Auto` when absent or unknown.
pub fn take_protocol(headers: &mut HeaderMap) -> Protocol {
    match headers
        .remove(&WEFT_PROTOCOL)
        .as_ref()
        .map(HeaderValue::as_bytes)
    {
        Some(b"http1") => Protocol::Http1,
        Some(b"http2") => Protocol::Http2,
        _ => Protocol::Auto,
    }
}

/// Make `req` a correct proxied request, once, whatever the number of tries:
/// `Host` filled in from an HTTP/2 `:authority` when missing, hop-by-hop
/// headers removed (an HTTP/1.1 upgrade's `Upgrade`/`Connection` kept).
pub fn clean<B>(req: &mut Request<B>) {
    let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
    // An HTTP/2 request carries its authority in `:authority`; an HTTP/1.1 hop
    // needs it as `Host`, and the endpoint should see the logical name either way.
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, value);
    }
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);
}

/// Whether a cleaned request asks for a protocol upgrade (never retried):
/// hyper gave it the means to upgrade (only a request that asked gets
/// them, so most requests are told apart without a header lookup), and it
/// asks for an HTTP/1.1 one.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.extensions().get::<OnUpgrade>().is_some() && asks_upgrade(req.version(), req.headers())
}

/// [`is_upgrade`] of a request head.
pub fn asks_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version <= Version::HTTP_11 && headers.contains_key(header::UPGRADE)
}

/// Join the two upgraded connections of a `101 Switching Protocols` answer
/// in a tracked task that copies bytes both ways until either side closes.
pub fn join_upgrade<B>(
    tasks: &TaskTracker,
    endpoint: SocketAddr,
    downstream: OnUpgrade,
    rsp: &mut Response<B>,
) {
    let upstream = hyper::upgrade::on(rsp);
    tasks.spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(endpoint.addr = %endpoint, %error, "upgrade failed");
                return;
            }
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((sent, received)) => {
                tracing::debug!(endpoint.addr = %endpoint, bytes.sent = sent, bytes.received = received, "upgraded connection closed")
            }
            Err(error) => tracing::debug!(endpoint.addr = %endpoint, %error, "upgraded connection failed"),
        }
    });
}

/// The failure of one send, classified: the connection, the client's own
/// request body, or the endpoint.
pub fn send_error(endpoint: SocketAddr, source: SendError) -> ProxyError {
    match source {
        SendError::Connect(error) => ProxyError::Connect {
            endpoint,
            source: Box::new(error),
        },
        // The client's own body broke (e.g. a bad chunk size): its fault, not
        // the endpoint's.
        SendError::Http(error) if request_body_failed(&error) => {
            ProxyError::RequestBody(BodyError(Box::new(error)))
        }
        SendError::Http(error) => ProxyError::Upstream {
            endpoint,
            source: Box::new(error),
        },
        SendError::Http2(error) => ProxyError::Upstream {
            endpoint,
            source: Box::new(error),
        },
    }
}

/// Whether sending failed because the request body (read from the client)
/// failed: hyper reports that as a user error somewhere in the chain.
fn request_body_failed(error: &hyper::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = next {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// `endpoint` as a URI authority (`IP:port`, `[IPv6]:port`).
pub fn authority_of(endpoint: SocketAddr) -> Option<Authority> {
    Authority::try_from(endpoint.to_string()).ok()
}

pub fn endpoint_uri(
    endpoint: SocketAddr,
    authority: Option<&Authority>,
    path: &PathAndQuery,
    tls: bool,
) -> Result<Uri, ProxyError> {
    let bad = || ProxyError::BadAuthority {
        authority: endpoint.to_string(),
        problem: "the endpoint address does not form a valid URI",
    };
    let authority = match authority {
        Some(authority) => authority.clone(),
        None => authority_of(endpoint).ok_or_else(bad)?,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority);
    parts.path_and_query = Some(path.clone());
    Uri::from_parts(parts).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoint_uris() {
        let path = PathAndQuery::from_static("/a/b?c=d");
        for addr in ["10.0.0.5:4143", "[::1]:8080", "[fe80::1]:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let made = authority_of(addr).unwrap();
            let uri = endpoint_uri(addr, Some(&made), &path, false).unwrap();
            assert_eq!(uri, endpoint_uri(addr, None, &path, false).unwrap());
            assert_eq!(uri.to_string(), format!("http://{addr}/a/b?c=d"));
            let tls = endpoint_uri(addr, Some(&made), &path, true).unwrap();
            assert_eq!(tls.to_string(), format!("https://{addr}/a/b?c=d"));
        }
    }
}
