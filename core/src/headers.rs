//! Header rewriting that makes the proxy a correct HTTP intermediary.
//!
//! - Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it names,
//!   `Keep-Alive`, `Proxy-Connection`, `TE` other than `trailers`, `Transfer-Encoding`,
//!   `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate`, `Trailer`) are removed in
//!   both directions; they describe one connection, not the message.
//! - An HTTP/1.1 upgrade (WebSocket and friends) is the one exception: `Upgrade` and
//!   `Connection: upgrade` are kept so the next hop can agree to the switch.
//! - `TE: trailers` survives because gRPC needs it end to end. `TE` is itself
//!   hop-by-hop: on an HTTP/1.1 hop it goes with `Connection: te` (RFC 9110
//!   §10.1.4, [`name_te_in_connection`]); an HTTP/2 hop takes it alone (HTTP/2
//!   has no `Connection`).
//! - The inbound side records the client in `x-forwarded-for` and `forwarded`.
//! - A `Connection` option never removes a header the sidecar sets or relies on end
//!   to end ([`PROTECTED`]: `Host`, `weft-caller`, `x-forwarded-for`, `forwarded`,
//!   `traceparent`, `tracestate`): those are not hop-by-hop, and honouring such an
//!   option would let a client strip what the sidecar added (its caller identity,
//!   the client address, the trace context).
//!
//! `Host` is never touched here: the upstream sees the logical name the app used.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
];

/// Whether `name` is one of the hop-by-hop headers removed (or rewritten) by
/// [`strip_hop_by_hop`]; other headers only become hop-by-hop by being named
/// in `Connection`, which is one of them.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || HOP_BY_HOP.iter().any(|h| h == name)
}

/// Why the proxy answered a request itself (a short, stable label).
pub static WEFT_REASON: HeaderName = HeaderName::from_static("weft-reason");
/// The policy key of the limit that refused a request (e.g. `inbound.rate_limit`).
pub static WEFT_LIMIT: HeaderName = HeaderName::from_static("weft-limit");
/// The calling service's identity, towards the callee's sidecar.
pub static WEFT_CALLER: HeaderName = HeaderName::from_static("weft-caller");
/// Between sidecars: the HTTP version the callee's sidecar speaks to its app
/// (`http1` or `http2`).
pub static WEFT_PROTOCOL: HeaderName = HeaderName::from_static("weft-protocol");

/// `x-forwarded-for`, appended to on the inbound side.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that a `Connection` option does not remove (see the module docs).
pub static PROTECTED: [HeaderName; 6] = [
    header::HOST,
    HeaderName::from_static("weft-caller"),
    HeaderName::from_static("x-forwarded-for"),
    header::FORWARDED,
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Whether `headers` ask for an HTTP/1.1 protocol upgrade (`Connection: upgrade` and
/// an `Upgrade` header).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove hop-by-hop headers. When `keep_upgrade` is set (an upgrade request or a
/// `101 Switching Protocols` response), `Upgrade` is kept and `Connection` is reduced
/// to `upgrade`. Returns whether `TE: trailers` was kept (for
/// [`name_te_in_connection`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> bool {
    // Most messages carry none of them: one pass over the names present
    // (standard names compare as integers) is much cheaper than looking up
    // every hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return false;
    }
    // Read before anything is removed: a client that sends `TE` also names it in
    // `Connection` (RFC 9110 §10.1.4).
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // Headers named by Connection are hop-by-hop too; collect before removing it.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        if (keep_upgrade && name == header::UPGRADE) || PROTECTED.contains(&name) {
            continue;
        }
        headers.remove(&name);
    }
    for name in &HOP_BY_HOP {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade && headers.contains_key(header::UPGRADE) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    te_trailers
}

/// For an HTTP/1.1 hop, when [`strip_hop_by_hop`] kept `TE: trailers`: names
/// `TE` in `Connection`, as RFC 9110 §10.1.4 requires of a sender of `TE`.
/// Not for HTTP/2, which has no `Connection` (hyper refuses it there).
pub fn name_te_in_connection(headers: &mut HeaderMap) {
    headers.append(header::CONNECTION, HeaderValue::from_static("te"));
}

/// The host a client asked for, as `forwarded` records it: the Host header,
/// else the request target's authority.
pub fn requested_host<B>(req: &http::Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Record the client on the inbound side: append its address to `x-forwarded-for`
/// and add an RFC 7239 `forwarded` element naming the client, the protocol and
/// the host the client asked for.
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: Option<&str>) {
    add_forwarded_proto(headers, client, host, "http");
}

/// [`add_forwarded`] for a request that arrived over `proto` (`http`, or
/// `https` on an mTLS connection between sidecars).
pub fn add_forwarded_proto(
    headers: &mut HeaderMap,
    client: SocketAddr,
    host: Option<&str>,
    proto: &str,
) {
    use std::fmt::Write as _;
    let ip = client.ip();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let mut xff = String::with_capacity(prev.len() + 2 + 39);
            xff.push_str(prev);
            xff.push_str(", ");
            xff
        }
        _ => String::with_capacity(39),
    };
    let mut xff = xff;
    let node_at = xff.len();
    push_ip(&mut xff, ip);
    let mut element = String::with_capacity(64);
    element.push_str("for=");
    match ip {
        IpAddr::V4(_) => element.push_str(&xff[node_at..]),
        IpAddr::V6(v6) => {
            let _ = write!(element, "\"[{v6}]\"");
        }
    }
    element.push_str(";proto=");
    element.push_str(proto);
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    if let Some(host) = host.filter(|h| is_token_or_host(h)) {
        element.push_str(";host=");
        element.push_str(host);
    }
    let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {element}"),
        _ => element,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(header::FORWARDED, value);
    }
}

/// `ip` in its usual text form. IPv4 by hand: `Ipv4Addr`'s `Display` (which
/// honours width and padding) cost more than the rest of the inbound
/// forwarding headers together.
fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A host that can go unquoted into a `forwarded` element.
fn is_token_or_host(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("host", "billing"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-keep"]);
    }

    #[test]
    fn leaves_end_to_end_headers_alone() {
        let mut h = map(&[("host", "billing"), ("x-keep", "1"), ("accept", "*/*")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, before);
    }

    #[test]
    fn removes_a_lone_hop_by_hop_header() {
        for name in [
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "trailer",
            "te",
        ] {
            let mut h = map(&[("host", "billing"), (name, "x")]);
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} kept");
            assert!(h.contains_key("host"));
        }
    }

    #[test]
    fn keeps_te_trailers_for_grpc() {
        let mut h = map(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_trailers_survives_being_named_in_connection() {
        // What a conforming HTTP/1.1 client sends with TE.
        let mut h = map(&[("connection", "TE"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_goes_with_connection_te_on_an_http1_hop() {
        let mut h = map(&[("te", "trailers"), ("connection", "TE, x-a")]);
        assert!(strip_hop_by_hop(&mut h, false));
        name_te_in_connection(&mut h);
        assert_eq!(h["te"], "trailers");
        let tokens: Vec<_> = connection_tokens(&h).collect();
        assert_eq!(tokens, ["te"]);
        // An upgrade keeps its own token.
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(strip_hop_by_hop(&mut h, true));
        name_te_in_connection(&mut h);
        let tokens: Vec<_> = connection_tokens(&h).collect();
        assert_eq!(tokens, ["upgrade", "te"]);
        // Without TE: trailers, there is nothing to name.
        for other in [
            &[("host", "billing")][..],
            &[("te", "gzip")],
            &[("connection", "te")],
        ] {
            assert!(!strip_hop_by_hop(&mut map(other), false), "{other:?}");
        }
    }

    #[test]
    fn connection_cannot_remove_what_the_sidecar_sets() {
        // Found by the `request` fuzz target's checks: `Connection: weft-caller`
        // from the app removed the caller identity the outbound side had just
        // set, and `Connection: x-forwarded-for, forwarded` from a client removed
        // the inbound side's record of it.
        let protected = [
            ("host", "billing"),
            ("weft-caller", "checkout"),
            ("x-forwarded-for", "192.0.2.7"),
            ("forwarded", "for=192.0.2.7;proto=http"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", "v=1"),
        ];
        let connection = "Host, weft-caller, X-Forwarded-For, forwarded, traceparent, \
             tracestate, x-other";
        let mut h = map(&protected);
        h.append("connection", HeaderValue::from_static(connection));
        h.append("x-other", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), protected.len());
        for (name, value) in protected {
            assert_eq!(h[name], value, "{name}");
        }
    }

    #[test]
    fn upgrade_keeps_upgrade_and_connection() {
        let mut h = map(&[
            ("connection", "Upgrade, x-other"),
            ("upgrade", "websocket"),
            ("x-other", "1"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-other"));
    }

    #[test]
    fn upgrade_needs_both_headers() {
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn forwarded_appends() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        add_forwarded(&mut h, "10.0.0.2:5555".parse().unwrap(), Some("billing"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
        assert_eq!(h["forwarded"], "for=10.0.0.2;proto=http;host=billing");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "[::1]:1".parse().unwrap(), Some("bad host\""));
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "99.100.109.255",
            "1.9.10.199",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
        let v6: IpAddr = "fe80::1".parse().unwrap();
        let mut out = String::new();
        push_ip(&mut out, v6);
        assert_eq!(out, "fe80::1");
    }
}
