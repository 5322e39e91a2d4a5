//! Forward one request to one chosen endpoint and bring its response back.
//!
//! This is the last stage of both the outbound and the inbound path. It makes the
//! request a correct proxied request (hop-by-hop headers removed, `Host` kept or
//! filled in from an HTTP/2 `:authority`, URI pointed at the endpoint, HTTP version
//! chosen for the hop), sends it over the pooled client, and cleans the response.
//! Bodies are passed through frame by frame, trailers included.
//!
//! HTTP/1.1 upgrades (WebSocket): the `Upgrade`/`Connection` headers are kept, and
//! when the endpoint answers `101 Switching Protocols` a tracked task joins the two
//! upgraded connections and copies bytes both ways until either side closes.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use weft_config::Protocol;

use crate::body::{self, ProxyBody};
use crate::client::UpstreamClient;
use crate::error::ProxyError;
use crate::headers;
use crate::retry::replay::BodyError;

/// Everything the last stage needs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    pub client: &'a UpstreamClient,
    pub endpoint: SocketAddr,
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
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);
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
    let http2 = !upgrade
        && match hop.protocol {
            Protocol::Http2 => true,
            Protocol::Http1 => false,
            Protocol::Auto => head.version == Version::HTTP_2,
        };
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = endpoint_uri(hop.endpoint, &head.path)?;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = head.headers.clone();

    let mut rsp = hop.client.send(req, http2).await.map_err(|source| {
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

pub(crate) fn endpoint_uri(endpoint: SocketAddr, path: &PathAndQuery) -> Result<Uri, ProxyError> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.to_string())
        .path_and_query(path.clone())
        .build()
        .map_err(|_| ProxyError::BadAuthority {
            authority: endpoint.to_string(),
            problem: "the endpoint address does not form a valid URI",
        })
}
