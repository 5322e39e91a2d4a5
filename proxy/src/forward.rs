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

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use weft_config::Protocol;

use crate::body;
use crate::client::UpstreamClient;
use crate::error::ProxyError;
use crate::headers;

/// Everything the last stage needs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    pub client: &'a UpstreamClient,
    pub endpoint: SocketAddr,
    pub protocol: Protocol,
    pub tasks: &'a TaskTracker,
}

/// Send `req` to `hop.endpoint`; the response's body streams from the endpoint.
pub async fn forward(
    hop: Hop<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));

    let http2 = !upgrade
        && match hop.protocol {
            Protocol::Http2 => true,
            Protocol::Http1 => false,
            Protocol::Auto => req.version() == Version::HTTP_2,
        };

    // An HTTP/2 request carries its authority in `:authority`; an HTTP/1.1 hop
    // needs it as `Host`, and the endpoint should see the logical name either way.
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, value);
    }
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);

    let (mut parts, incoming) = req.into_parts();
    parts.uri = endpoint_uri(hop.endpoint, parts.uri.path_and_query())?;
    parts.version = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let upstream_req = Request::from_parts(parts, body::boxed(incoming));

    let mut rsp = hop
        .client
        .send(upstream_req, http2)
        .await
        .map_err(|source| {
            if source.is_connect() {
                ProxyError::Connect {
                    endpoint: hop.endpoint,
                    source,
                }
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

fn endpoint_uri(endpoint: SocketAddr, path: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
    let path = path
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.to_string())
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::BadAuthority {
            authority: endpoint.to_string(),
            problem: "the endpoint address does not form a valid URI",
        })
}
