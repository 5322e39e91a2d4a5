//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay
//! their seed corpora. Not part of the API: hidden from the docs, and free to
//! change with the fuzz targets.
//!
//! - [`request`]: decodes arbitrary bytes into an `http::Request` (see
//!   [`decode`]) and runs it through what both listeners do with a request
//!   head before anything goes upstream: the screening ([`weft_core::screen`]),
//!   the destination ([`weft_core::target`]), route matching ([`weft_core::route`]),
//!   the forwarding headers and hop-by-hop removal ([`weft_core::headers`],
//!   [`weft_transport::forward::clean`]), the trace context, and the refusal
//!   response. Each step's promises are checked, not only that it does not
//!   panic.
//! - [`framing`]: follows arbitrary bytes as a client connection's HTTP/1
//!   requests ([`weft_core::framing::RequestFraming`]): fed whole, in thirds or
//!   byte by byte, it claims the same; and a claim names a request hyper
//!   itself serves last on that connection, with `Transfer-Encoding` (hyper,
//!   on an in-memory connection, is the reference).
//! - [`policy`]: parses arbitrary bytes as a policy file (checked by
//!   `weft_config::fuzzing::policy`) and compiles an accepted one the way the
//!   sidecar does, on both sides.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri, Version};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use weft_config::Policy;

use crate::outbound::WEFT_CALLER;
use crate::telemetry::trace;
use weft_core::error::ProxyError;
use weft_core::headers::{self, X_FORWARDED_FOR};
use weft_core::limits::Share;
use weft_core::policy::{InboundPolicy, OutboundPolicy};
use weft_core::route::RouteTable;
use weft_core::screen::{self, LocalNames};
use weft_core::stats::Stats;
use weft_core::target::Destination;
use weft_stack::respond::error_response;

/// `[limits] max_uri_length` of the request checks (the default is 8 KiB;
/// smaller, so fuzzed inputs reach it).
const MAX_URI_LENGTH: usize = 512;

/// At most this many headers are decoded (hyper's default limit is 100).
const MAX_HEADERS: usize = 256;

/// The routes requests are matched against: every kind of `match` key.
const ROUTES: &str = r#"
service = "billing"

[[routes]]
name = "charge"
match = { method = ["POST", "put"], path = "/charge" }

[[routes]]
name = "canary"
match = { path_prefix = "/api/", headers = [{ name = "X-Canary", value = "1" }, { name = "x-debug" }] }

[[routes]]
name = "api"
match = { path_prefix = "/api", method = "GET" }

[[routes]]
name = "root"
match = { path = "/" }

[[routes]]
name = "tokens"
match = { method = ["PURGE", "m-search"], headers = [{ name = "accept", value = "text/plain; q=0.5" }] }
"#;

static ROUTE_POLICY: LazyLock<Policy> = LazyLock::new(|| {
    weft_config::parse_policy(ROUTES, Path::new("fuzz-routes.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
});

static ROUTE_TABLE: LazyLock<RouteTable> = LazyLock::new(|| RouteTable::new(&ROUTE_POLICY.routes));

/// The inbound listener's names: service `billing`, listening on every
/// address at port 4143, advertised as 10.0.0.5:4143.
fn local_names() -> LocalNames<'static> {
    LocalNames {
        service: "billing",
        listener: Some(SocketAddr::from(([0, 0, 0, 0], 4143))),
        advertise: Some(SocketAddr::from(([10, 0, 0, 5], 4143))),
    }
}

/// Decodes `data` as an HTTP/1-style request head, leniently so that every
/// input yields a request: a request line `METHOD TARGET VERSION`, then
/// `name: value` lines up to an empty line (lines end in `\n`, a `\r` before
/// it is dropped). A method or target that `http` refuses becomes `GET` or
/// `/`; a header line it refuses is skipped; `HTTP/1.0`, `HTTP/2` (or
/// `HTTP/2.0`) and `HTTP/0.9` select those versions, anything else is
/// HTTP/1.1. Whatever follows the head is ignored.
///
/// `http`'s types are the boundary here: hyper hands the proxy only requests
/// made of them, over HTTP/1 (after its own stricter parse) and HTTP/2.
pub fn decode(data: &[u8]) -> Request<()> {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, |&b| b == b' ');
    let method = parts
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = parts
        .next()
        .and_then(|t| Uri::from_maybe_shared(Bytes::copy_from_slice(t)).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let version = match parts.next().unwrap_or_default() {
        b"HTTP/0.9" => Version::HTTP_09,
        b"HTTP/1.0" => Version::HTTP_10,
        b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()).take(MAX_HEADERS) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.trim_ascii_start();
        let value = value
            .strip_suffix(b" ")
            .or_else(|| value.strip_suffix(b"\t"))
            .unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// Runs the request path's checks and rewrites on the request [`decode`]
/// makes of `data`; panics when one of them breaks a promise.
pub fn request(data: &[u8]) {
    let req = decode(data);
    screening(&req);
    let destination = destination(&req);
    inbound_authority(&req, destination.as_ref());
    routing(&req);
    outbound_rewrite(&req);
    inbound_rewrite(&req);
    trace_context(req.headers());
}

/// A refusal answers with a client error, and its response builds.
fn refused(error: &ProxyError) {
    let rsp = error_response(error, false);
    assert!(rsp.status().is_client_error(), "{error}: {}", rsp.status());
    assert_eq!(rsp.status(), error.status());
}

fn screening(req: &Request<()>) {
    match screen::request(req, MAX_URI_LENGTH) {
        Ok(()) => {
            assert!(screen::uri_length(req.uri()) <= MAX_URI_LENGTH);
            if req.version() <= Version::HTTP_11 {
                assert!(req.headers().get_all(header::HOST).iter().count() <= 1);
                let mut te = req.headers().get_all(header::TRANSFER_ENCODING).iter();
                if let Some(first) = te.next() {
                    assert!(te.next().is_none());
                    assert!(
                        first
                            .as_bytes()
                            .trim_ascii()
                            .eq_ignore_ascii_case(b"chunked")
                    );
                }
            }
        }
        Err(error) => {
            assert!(matches!(
                error,
                ProxyError::UriTooLong { .. } | ProxyError::AmbiguousRequest { .. }
            ));
            refused(&error);
        }
    }
}

fn destination(req: &Request<()>) -> Option<Destination> {
    match Destination::from_request(req) {
        Ok(dest) => {
            assert!(!dest.host.is_empty());
            assert!(!dest.host.ends_with('.'), "{dest:?}");
            assert_eq!(dest.host, dest.host.to_ascii_lowercase());
            assert!(!dest.authority.as_str().contains('@'));
            if let Some(authority) = req.uri().authority() {
                assert_eq!(&dest.authority, authority);
            }
            Some(dest)
        }
        Err(error) => {
            assert!(matches!(
                error,
                ProxyError::NoAuthority | ProxyError::BadAuthority { .. }
            ));
            refused(&error);
            None
        }
    }
}

/// An absolute-form HTTP/1 request the inbound listener accepts names the
/// local service, or this listener's port on an address it is reachable at;
/// what the outbound side makes of the same authority agrees.
fn inbound_authority(req: &Request<()>, dest: Option<&Destination>) {
    let local = local_names();
    match screen::inbound_authority(req, local) {
        Ok(()) => {
            if req.version() > Version::HTTP_11 || req.uri().authority().is_none() {
                return;
            }
            // The URI's authority came first, so this is its destination.
            let Some(dest) = dest else { return };
            let port = dest.port.unwrap_or(80);
            let named = dest.host == local.service;
            let reached = dest.ip().is_some_and(|ip: IpAddr| {
                [local.listener, local.advertise]
                    .into_iter()
                    .flatten()
                    .any(|a| a.port() == port && (a.ip() == ip || a.ip().is_unspecified()))
            });
            assert!(named || reached, "inbound accepted {dest:?}");
        }
        Err(error) => {
            assert!(matches!(error, ProxyError::ForeignAuthority { .. }));
            refused(&error);
        }
    }
}

/// The first route whose `match` fits wins, computed again from the policy
/// as written.
fn routing(req: &Request<()>) {
    let (method, path, headers) = (req.method(), req.uri().path(), req.headers());
    let found = ROUTE_TABLE.find(method, path, headers);
    let path = if path.is_empty() { "/" } else { path };
    let expected = ROUTE_POLICY.routes.iter().position(|route| {
        let m = &route.r#match;
        (m.method.is_empty() || m.method.iter().any(|x| x.as_str() == method.as_str()))
            && m.path.as_deref().is_none_or(|p| p == path)
            && m.path_prefix
                .as_deref()
                .is_none_or(|p| path.as_bytes().starts_with(p.as_bytes()))
            && m.headers.iter().all(|h| {
                let mut values = headers.get_all(h.name.as_str()).iter().peekable();
                match &h.value {
                    None => values.peek().is_some(),
                    Some(value) => values.any(|v| v.as_bytes() == value.as_bytes()),
                }
            })
    });
    assert_eq!(found, expected, "{method} {path}");
    let label = ROUTE_TABLE.label(found);
    assert_eq!(
        &**label,
        found.map_or("", |i| ROUTE_POLICY.routes[i].name.as_str())
    );
}

/// The headers a hop must not carry on, after [`headers::strip_hop_by_hop`]
/// without an upgrade.
fn assert_no_hop_by_hop(headers: &HeaderMap, upgrade: bool) {
    for name in [
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
    ] {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    let connection: Vec<_> = headers.get_all(header::CONNECTION).iter().collect();
    if upgrade && headers.contains_key(header::UPGRADE) {
        assert_eq!(connection, [HeaderValue::from_static("upgrade")]);
    } else {
        assert!(connection.is_empty(), "connection survived");
    }
    if !upgrade {
        assert!(!headers.contains_key(header::UPGRADE), "upgrade survived");
    }
    let te: Vec<_> = headers.get_all(header::TE).iter().collect();
    assert!(te.is_empty() || te == [HeaderValue::from_static("trailers")]);
}

/// The outbound side: the sidecar sets `weft-caller` (and, when tracing, a
/// `traceparent`), then [`weft_transport::forward::clean`] cleans the head for the
/// hop. What the sidecar set survives the cleaning, whatever `Connection`
/// names; the hop-by-hop headers do not.
fn outbound_rewrite(req: &Request<()>) {
    let mut req = req.clone();
    req.headers_mut().remove(&WEFT_CALLER);
    req.headers_mut()
        .insert(&WEFT_CALLER, HeaderValue::from_static("checkout"));
    let traceparent =
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    req.headers_mut().insert("traceparent", traceparent.clone());
    let host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let te_trailers = req
        .headers()
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    let mut head = req;
    weft_transport::forward::clean(&mut head);
    assert_eq!(
        weft_transport::forward::asks_upgrade(head.version(), head.headers()),
        upgrade
    );
    assert_no_hop_by_hop(head.headers(), upgrade);
    assert_eq!(
        head.headers().get(&WEFT_CALLER),
        Some(&HeaderValue::from_static("checkout")),
        "the sidecar's weft-caller was removed"
    );
    assert_eq!(
        head.headers().get("traceparent"),
        Some(&traceparent),
        "the sidecar's traceparent was removed"
    );
    assert_eq!(
        head.headers().get(header::HOST),
        host.as_ref(),
        "Host changed"
    );
    assert_eq!(
        head.headers().contains_key(header::TE),
        te_trailers,
        "TE: trailers is kept exactly when the client sent it"
    );

    // Every attempt's URI points at the endpoint, with the request's path.
    for endpoint in [
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        "[::1]:443"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 16], 443))),
    ] {
        let authority = weft_transport::forward::authority_of(endpoint);
        for tls in [false, true] {
            let uri =
                weft_transport::forward::endpoint_uri(endpoint, authority.as_ref(), &path, tls)
                    .unwrap_or_else(|e| panic!("{endpoint} {path}: {e}"));
            assert_eq!(uri.path_and_query(), Some(&path));
            assert_eq!(uri.port_u16(), Some(endpoint.port()));
        }
    }
}

/// The inbound side: the client is recorded in `x-forwarded-for` and
/// `forwarded`, and those survive the cleaning for the hop to the app.
fn inbound_rewrite(req: &Request<()>) {
    let mut req = req.clone();
    let client = SocketAddr::from(([192, 0, 2, 7], 40000));
    let host = headers::requested_host(&req);
    headers::add_forwarded(req.headers_mut(), client, host.as_deref());
    let xff = req
        .headers()
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let forwarded = req
        .headers()
        .get(header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let xff = xff.unwrap_or_else(|| panic!("no x-forwarded-for"));
    assert!(xff.ends_with("192.0.2.7"), "{xff}");
    let forwarded = forwarded.unwrap_or_else(|| panic!("no forwarded"));
    assert!(
        forwarded.contains("for=192.0.2.7;proto=http"),
        "{forwarded}"
    );

    let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let mut head = req;
    weft_transport::forward::clean(&mut head);
    assert_no_hop_by_hop(head.headers(), upgrade);
    assert_eq!(
        head.headers()
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok()),
        Some(xff.as_str()),
        "the sidecar's x-forwarded-for was removed"
    );
    assert_eq!(
        head.headers()
            .get(header::FORWARDED)
            .and_then(|v| v.to_str().ok()),
        Some(forwarded.as_str()),
        "the sidecar's forwarded was removed"
    );

    // Cleaning is idempotent.
    let mut again = head.headers().clone();
    headers::strip_hop_by_hop(&mut again, upgrade);
    assert_eq!(&again, head.headers());
}

/// A valid trace context read from the request is written back as the same
/// trace.
fn trace_context(headers: &HeaderMap) {
    let propagator = TraceContextPropagator::new();
    let cx = trace::extract(&propagator, headers);
    let span = cx.span().span_context().clone();
    if !span.is_valid() {
        return;
    }
    let mut out = headers.clone();
    trace::inject(&propagator, &span, &mut out);
    let back = trace::extract(&propagator, &out);
    assert_eq!(back.span().span_context().trace_id(), span.trace_id());
    assert_eq!(back.span().span_context().span_id(), span.span_id());
}

/// Parses `data` as a policy file and compiles an accepted one for both
/// sides: every route of an accepted policy compiles (the config crate and
/// `http` agree on methods, header names and values), and every route's plan
/// resolves.
pub fn policy(data: &[u8]) {
    let Some(policy) = weft_config::fuzzing::policy(data) else {
        return;
    };
    let table = RouteTable::new(&policy.routes);
    assert_eq!(
        table.compiled(),
        policy.routes.len(),
        "a route the config crate accepted does not compile"
    );
    let outbound = OutboundPolicy::new(Some(&policy), Arc::new(Stats::default()));
    assert!(outbound.compiled_from(Some(&policy)));
    for index in (0..policy.routes.len()).map(Some).chain([None]) {
        let plan = outbound.plan(index);
        assert_eq!(
            plan.route.as_deref(),
            index.map(|i| policy.routes[i].name.as_str()),
            "the plan of route {index:?}"
        );
        plan.budget.deposit();
        let _ = plan.budget.withdraw();
    }
    for share in [1, 3, u32::MAX] {
        let share = Share::new(NonZeroU32::new(share).unwrap_or(NonZeroU32::MIN));
        let inbound = InboundPolicy::new(Some(&policy), share, Arc::new(Stats::default()), None);
        assert!(inbound.compiled_from(Some(&policy), share));
        let again = InboundPolicy::new(
            Some(&policy),
            share,
            Arc::new(Stats::default()),
            Some(&inbound),
        );
        for index in 0..policy.routes.len() {
            assert!(again.route(Some(index)).is_some());
        }
        if let Some(limit) = &again.rate_limit {
            let _ = limit.check();
        }
        if let Some(limit) = &again.caller_rate_limit {
            let _ = limit.check("web");
        }
    }
}

/// The `framing` target (see the module docs).
pub fn framing(data: &[u8]) {
    let whole = follow(data, &[]);
    let thirds = [data.len() / 3, data.len() * 2 / 3];
    assert_eq!(follow(data, &thirds), whole, "fed in thirds");
    let every: Vec<usize> = (1..data.len()).collect();
    assert_eq!(follow(data, &every), whole, "fed byte by byte");
    let (Some(claimed), _) = whole else {
        return;
    };
    // What hyper served, in order: whether each request had Transfer-Encoding.
    let Some(served) = served_by_hyper(data) else {
        return;
    };
    let Ok(nth) = usize::try_from(claimed - 1) else {
        return;
    };
    // hyper may have refused an earlier head the tracker followed (a byte
    // in a field value, too many fields): then it served fewer.
    if let Some(&transfer_encoding) = served.get(nth) {
        assert!(
            transfer_encoding,
            "claimed request {claimed} has no Transfer-Encoding"
        );
        assert_eq!(
            served.len(),
            nth + 1,
            "hyper served requests after the claimed one ({claimed})"
        );
    }
}

/// [`weft_core::framing::RequestFraming`] fed `data` in pieces cut at `cuts`:
/// its claim, and whether it still follows.
fn follow(data: &[u8], cuts: &[usize]) -> (Option<u64>, bool) {
    let mut framing = weft_core::framing::RequestFraming::new();
    let mut claim = None;
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&data.len())) {
        if let Some(n) = framing.feed(data.get(from..to).unwrap_or_default()) {
            assert!(claim.is_none(), "two claims on one connection");
            claim = Some(n);
        }
        from = to;
    }
    (claim, framing.is_following())
}

/// Serves `data` as one client connection with hyper's HTTP/1 server (each
/// request's body read whole, answered 200) and returns, for each request
/// served, whether it had `Transfer-Encoding`; `None` if it did not end.
fn served_by_hyper(data: &[u8]) -> Option<Vec<bool>> {
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    static RUNTIME: LazyLock<Option<tokio::runtime::Runtime>> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()
    });
    let runtime = RUNTIME.as_ref()?;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        if let Ok(mut seen) = record.lock() {
            seen.push(req.headers().contains_key(header::TRANSFER_ENCODING));
        }
        async move {
            let _ = req.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    let input = data.to_vec();
    let ended = runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let client = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), async {
            tokio::join!(conn, client)
        })
        .await
        .is_ok()
    });
    if !ended {
        return None;
    }
    seen.lock().ok().map(|seen| seen.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decodes_a_request_head() {
        let req = decode(
            b"POST http://billing:81/charge?x=1 HTTP/1.0\r\nHost: a\r\nX-A:  1 \r\nbad line\r\nX-A: 2\r\n\r\nbody",
        );
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "http://billing:81/charge?x=1");
        assert_eq!(req.version(), Version::HTTP_10);
        assert_eq!(req.headers()["host"], "a");
        let xa: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        let req = decode(b"\xff \x01");
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, "/"));
    }

    #[test]
    fn seeds_of_every_kind_pass() {
        for input in [
            &b""[..],
            b"GET /charge HTTP/1.1\r\nHost: billing\r\n\r\n",
            b"PUT /charge HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n",
            b"GET /api/x HTTP/2\r\nx-canary: 1\r\nx-debug: \r\n\r\n",
            b"GET http://10.0.0.5:4143/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: billing\r\nTE: trailers, gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
        ] {
            request(input);
        }
        policy(b"service = \"a\"\n[[routes]]\nname = \"r\"\nmatch = { method = \"get\" }\n");
    }

    #[test]
    fn framing_claims_agree_with_hyper() {
        let both =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(follow(both, &[]), (Some(1), false));
        assert_eq!(served_by_hyper(both), Some(vec![true]));
        let mut two = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        two.extend_from_slice(both);
        two.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(follow(&two, &[]), (Some(2), false));
        assert_eq!(served_by_hyper(&two), Some(vec![false, true]));
        for input in [
            &b""[..],
            both,
            &two,
            b"GET / HTTP/1.1\r\nUpgrade: x\r\n\r\n",
        ] {
            framing(input);
        }
    }
}
