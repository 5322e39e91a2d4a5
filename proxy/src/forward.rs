//! Forward one request to one chosen endpoint and bring its response back.
//!
//! This is the last stage of both the outbound and the inbound path. It makes the
//! request a correct proxied request (hop-by-hop headers removed, `Host` kept or
//! filled in from an HTTP/2 `:authority`, URI pointed at the endpoint, HTTP version
//! chosen for the hop), sends it over the pooled client, and cleans the response.
//! Bodies are passed through frame by frame, trailers included.
//!
//! A hop to a sidecar over mTLS ([`UpstreamClient::is_mesh`]) is always HTTP/2
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
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use weft_config::Protocol;

use crate::body::{self, ProxyBody};
use crate::client::{EndpointPools, UpstreamClient};
use crate::error::ProxyError;
use crate::headers;
use crate::retry::replay::BodyError;

/// Between sidecars: the HTTP version the callee's sidecar speaks to its app
/// (`http1` or `http2`).
pub const WEFT_PROTOCOL: &str = "weft-protocol";

/// The app-side protocol a caller's sidecar asked for in [`WEFT_PROTOCOL`],
/// removed from `headers`; `Auto` when absent or unknown.
pub fn take_protocol(headers: &mut HeaderMap) -> Protocol {
    match headers
        .remove(WEFT_PROTOCOL)
        .as_ref()
        .map(HeaderValue::as_bytes)
    {
        Some(b"http1") => Protocol::Http1,
        Some(b"http2") => Protocol::Http2,
        _ => Protocol::Auto,
    }
}

/// Everything the last stage needs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    pub client: &'a UpstreamClient,
    pub endpoint: SocketAddr,
    /// `endpoint` as a URI authority ([`authority_of`]), when made up front.
    pub authority: Option<&'a Authority>,
    /// The balanced endpoint's own pools (none: the client's shared ones).
    pub pools: Option<&'a EndpointPools>,
    pub protocol: Protocol,
    pub tasks: &'a TaskTracker,
}

/// A request head made ready for proxying, reusable for every attempt.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    path: PathAndQuery,
    version: Version,
    pub headers: HeaderMap,
    /// The downstream side of an HTTP/1.1 upgrade, taken by the first attempt.
    upgrade: Option<OnUpgrade>,
    /// `TE: trailers` was kept: an HTTP/1.1 hop names it in `Connection`.
    te_trailers: bool,
}

impl RequestHead {
    /// Whether this request asks for a protocol upgrade (never retried).
    pub fn is_upgrade(&self) -> bool {
        self.upgrade.is_some()
    }
}

/// Split `req` into a cleaned head and its body: `Host` filled in from an HTTP/2
/// `:authority` when missing, hop-by-hop headers removed, an upgrade taken aside.
pub fn prepare<B>(mut req: Request<B>) -> (RequestHead, B) {
    let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // An HTTP/2 request carries its authority in `:authority`; an HTTP/1.1 hop
    // needs it as `Host`, and the endpoint should see the logical name either way.
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, value);
    }
    let te_trailers = headers::strip_hop_by_hop(req.headers_mut(), upgrade);
    let (parts, body) = req.into_parts();
    let head = RequestHead {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        version: parts.version,
        headers: parts.headers,
        upgrade: on_upgrade,
        te_trailers,
    };
    (head, body)
}

/// Send `req` to `hop.endpoint`; the response's body streams from the endpoint.
pub async fn forward(
    hop: Hop<'_>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    let (mut head, body) = prepare(req);
    send(hop, &mut head, body::boxed(body)).await
}

/// Send one attempt of `head` with `body` to `hop.endpoint`.
pub async fn send(
    hop: Hop<'_>,
    head: &mut RequestHead,
    body: ProxyBody,
) -> Result<Response<Incoming>, ProxyError> {
    let downstream = head.upgrade.take();
    let upgrade = downstream.is_some();
    let app_http2 = !upgrade
        && match hop.protocol {
            Protocol::Http2 => true,
            Protocol::Http1 => false,
            Protocol::Auto => head.version == Version::HTTP_2,
        };
    let mesh = hop.client.is_mesh();
    let http2 = app_http2 || (mesh && !upgrade);
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = endpoint_uri(hop.endpoint, hop.authority, &head.path, mesh)?;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = head.headers.clone();
    if head.te_trailers && !http2 {
        // `TE: trailers` (kept for gRPC) is hop-by-hop: on HTTP/1.1 it must
        // be named in `Connection`.
        headers::name_te_in_connection(req.headers_mut());
    }
    if mesh {
        let app = if app_http2 { "http2" } else { "http1" };
        req.headers_mut()
            .insert(WEFT_PROTOCOL, HeaderValue::from_static(app));
    }

    let mut rsp = hop
        .client
        .send(req, http2, hop.pools)
        .await
        .map_err(|source| {
            if source.is_connect() {
                ProxyError::Connect {
                    endpoint: hop.endpoint,
                    source,
                }
            } else if request_body_failed(&source) {
                // The client's own body broke (e.g. a bad chunk size): its fault, not
                // the endpoint's.
                ProxyError::RequestBody(BodyError(Box::new(source)))
            } else {
                ProxyError::Upstream {
                    endpoint: hop.endpoint,
                    source,
                }
            }
        })?;

    let switching = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(rsp.headers_mut(), switching && upgrade);
    if let (true, Some(downstream)) = (switching, downstream) {
        let upstream = hyper::upgrade::on(&mut rsp);
        let endpoint = hop.endpoint;
        hop.tasks.spawn(async move {
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
    Ok(rsp)
}

/// Whether sending failed because the request body (read from the client)
/// failed: hyper reports that as a user error somewhere in the chain.
fn request_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = error.source();
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

pub(crate) fn endpoint_uri(
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
