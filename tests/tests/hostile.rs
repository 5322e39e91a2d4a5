//! Scenario: hostile clients against every listener, black-box over real
//! sockets (the `[limits]` defaults and what hyper already refuses).
//!
//! One sidecar takes the whole battery: oversized and too many headers, a long
//! request line, request-smuggling variants, slowloris, an HTTP/2 rapid-reset
//! burst and a CONTINUATION flood, and absolute-form requests to another host
//! on the inbound listener. Each attack must end in a 4xx or a closed
//! connection, and afterwards a normal request on a fresh connection must
//! still succeed on both data listeners. At the end the proxy has logged no
//! panic and its resident memory grew by less than 50 MiB. The connection cap
//! gets its own sidecar (a small cap would starve the battery), and
//! `corpus_of_hostile_inputs_is_refused_on_both_listeners` replays every
//! `tests/corpus/hostile/*.http` file against both data listeners. Requests
//! with both `Content-Length` and `Transfer-Encoding` are refused (the
//! battery, and `requests_with_both_lengths_are_refused_over_tls`), while
//! pipelined requests whose bodies look like such heads pass untouched
//! (`only_requests_with_both_lengths_are_refused`, and over TLS).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::process::Proxy;
use weft_tests::tls::Pki;
use weft_tests::{eventually, within};

/// `[limits] header_read_timeout` of the battery's sidecar.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// `[limits] idle_timeout` of the battery's sidecar.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack on the timeouts: scheduling on a busy 2-core machine.
const MARGIN: Duration = Duration::from_millis(1500);
/// How long a refused or closed connection may take to show it.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// The battery's sidecar: local app `shop`, directory service `backend`.
struct Setup {
    proxy: Proxy,
    app: Backend,
    backend: Backend,
}

impl Setup {
    async fn start(limits: &[(&str, &str)]) -> anyhow::Result<Self> {
        let app = Backend::start("app").await?;
        let backend = Backend::start("backend").await?;
        let mut bootstrap = Bootstrap::new()
            .app("shop", app.addr())
            .service(DirService::new("backend").endpoint(backend.addr()));
        for (key, value) in limits {
            bootstrap = bootstrap.limit(key, value);
        }
        let proxy = Proxy::start(bootstrap.render()).await?;
        Ok(Self {
            proxy,
            app,
            backend,
        })
    }

    /// A normal request on a fresh connection succeeds on both data listeners.
    async fn still_serves(&self, after: &str) -> anyhow::Result<()> {
        let out = Client::host_header(self.proxy.outbound())
            .get("http://backend/ok")
            .await
            .with_context(|| format!("outbound after {after}"))?;
        out.expect_status(200)
            .with_context(|| format!("outbound after {after}"))?;
        ensure!(out.backend() == Some("backend"), "after {after}: {out:?}");
        let inb = Client::host_header(self.proxy.inbound())
            .get("http://shop/ok")
            .await
            .with_context(|| format!("inbound after {after}"))?;
        inb.expect_status(200)
            .with_context(|| format!("inbound after {after}"))?;
        ensure!(inb.backend() == Some("app"), "after {after}: {inb:?}");
        ensure!(
            !self.proxy.logs().contains("panic"),
            "the proxy logged a panic after {after}"
        );
        Ok(())
    }

    async fn rss(&self) -> anyhow::Result<f64> {
        let scrape = self.proxy.admin_client().metrics().await?;
        scrape.value("process_resident_memory_bytes", &[])
    }
}

/// How a raw exchange ended.
#[derive(Debug)]
enum Verdict {
    /// A response with this status, then the connection was closed.
    Closed(Option<u16>, String),
    /// A response with this status, the connection still open.
    Open(u16, String),
}

impl Verdict {
    fn status(&self) -> Option<u16> {
        match self {
            Self::Closed(status, _) => *status,
            Self::Open(status, _) => Some(*status),
        }
    }

    /// "A 4xx status or a close".
    fn refused(&self) -> bool {
        match self {
            Self::Closed(..) => true,
            Self::Open(status, _) => (400..500).contains(status),
        }
    }

    fn head(&self) -> &str {
        match self {
            Self::Closed(_, head) | Self::Open(_, head) => head,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head().lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `bytes` on a fresh connection and reads what comes back: the first
/// response head (if any), then whether the connection closes within
/// `VERDICT_WAIT`. A reset counts as a close; a write the proxy cut short too.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<Verdict> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // The proxy may close before it read everything: a failed write is fine.
    let _ = stream.write_all(bytes).await;
    read_verdict(&mut stream).await
}

async fn read_verdict<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<Verdict> {
    read_verdict_after(stream, Vec::new()).await
}

/// [`read_verdict`] with `buf` already read from `stream`.
async fn read_verdict_after<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
) -> anyhow::Result<Verdict> {
    let mut head: Option<(u16, String)> = None;
    let deadline = Instant::now() + VERDICT_WAIT;
    loop {
        // Anything but an HTTP/1 response (HTTP/2 frames) only counts by the close.
        if head.is_none()
            && buf.starts_with(b"HTTP/")
            && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = text
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| text.strip_prefix("HTTP/1.0 "))
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok());
            match status {
                Some(status) => head = Some((status, text)),
                None => bail!("not an HTTP/1 response: {text:?}"),
            }
        }
        // After a 4xx, a close (if any) follows at once.
        let deadline = match &head {
            Some((status, _)) if (400..500).contains(status) => {
                deadline.min(Instant::now() + Duration::from_millis(500))
            }
            _ => deadline,
        };
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Ok(match head {
                    Some((status, text)) => Verdict::Closed(Some(status), text),
                    None => Verdict::Closed(None, String::from_utf8_lossy(&buf).into_owned()),
                });
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                return match head {
                    Some((status, text)) => Ok(Verdict::Open(status, text)),
                    None => bail!(
                        "neither an answer nor a close within {VERDICT_WAIT:?} (read {:?})",
                        String::from_utf8_lossy(&buf)
                    ),
                };
            }
        }
    }
}

/// Fails unless `verdict` is `status` (with a close when `closed`).
fn expect(verdict: &Verdict, status: u16, what: &str) -> anyhow::Result<()> {
    ensure!(
        verdict.status() == Some(status),
        "{what}: expected {status}, got {verdict:?}"
    );
    Ok(())
}

fn request(head: &str) -> Vec<u8> {
    head.replace('\n', "\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_battery_is_refused_and_the_sidecar_keeps_serving() -> anyhow::Result<()> {
    let setup = Setup::start(&[
        ("header_read_timeout", "\"1s\""),
        ("idle_timeout", "\"3s\""),
    ])
    .await?;
    setup.still_serves("start").await?;
    let rss_before = setup.rss().await?;
    let out = setup.proxy.outbound();
    let inb = setup.proxy.inbound();

    // Oversized headers: hyper answers 431 itself (max_buf_size) and closes.
    let big = format!(
        "GET /ok HTTP/1.1\r\nHost: backend\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    for addr in [out, inb] {
        let verdict = exchange(addr, big.as_bytes()).await?;
        expect(&verdict, 431, "a 70 KiB header")?;
        ensure!(matches!(verdict, Verdict::Closed(..)), "{verdict:?}");
    }
    setup.still_serves("oversized headers").await?;

    // Too many headers: 101 fields against max_headers = 100.
    let mut many = String::from("GET /ok HTTP/1.1\r\nHost: backend\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    for addr in [out, inb] {
        expect(&exchange(addr, many.as_bytes()).await?, 431, "101 headers")?;
    }
    setup.still_serves("too many headers").await?;

    // A long request line: over max_uri_length (8 KiB), under the head cap.
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: backend\r\n\r\n",
        "p".repeat(10 * 1024)
    );
    for addr in [out, inb] {
        let verdict = exchange(addr, long.as_bytes()).await?;
        expect(&verdict, 414, "a 10 KiB request target")?;
        ensure!(
            verdict.header("weft-reason") == Some("uri-too-long")
                && verdict.header("weft-limit") == Some("limits.max_uri_length"),
            "{verdict:?}"
        );
    }
    setup.still_serves("a long request line").await?;
    let forwarded_before = (setup.backend.requests(), setup.app.requests());

    // Smuggling. Each variant hides a second request; none may reach a backend.
    let smuggled = "GET /smuggled HTTP/1.1\nHost: backend\n\n";
    let refused = [
        // Differing Content-Lengths: hyper, 400.
        (
            "CL,CL",
            format!(
                "POST /echo HTTP/1.1\nHost: backend\nContent-Length: 3\nContent-Length: 41\n\nabc{smuggled}"
            ),
            "",
        ),
        // A Content-Length list: hyper, 400.
        (
            "CL list",
            format!("POST /echo HTTP/1.1\nHost: backend\nContent-Length: 3, 3\n\nabc{smuggled}"),
            "",
        ),
        // A coding other than chunked: hyper, 400.
        (
            "TE: gzip",
            format!("POST /echo HTTP/1.1\nHost: backend\nTransfer-Encoding: gzip\n\n{smuggled}"),
            "",
        ),
        // chunked after another coding: hyper lets it through, the screen refuses.
        (
            "TE: gzip, chunked",
            format!(
                "POST /echo HTTP/1.1\nHost: backend\nTransfer-Encoding: gzip, chunked\n\n0\n\n{smuggled}"
            ),
            "ambiguous-request",
        ),
        // Two Transfer-Encoding fields: the screen refuses.
        (
            "TE, TE",
            format!(
                "POST /echo HTTP/1.1\nHost: backend\nTransfer-Encoding: chunked\nTransfer-Encoding: chunked\n\n0\n\n{smuggled}"
            ),
            "ambiguous-request",
        ),
        // Transfer-Encoding in HTTP/1.0: hyper, 400.
        (
            "TE in HTTP/1.0",
            format!(
                "POST /echo HTTP/1.0\nHost: backend\nTransfer-Encoding: chunked\n\n0\n\n{smuggled}"
            ),
            "",
        ),
        // Two Host headers: the screen refuses.
        (
            "Host, Host",
            "GET /ok HTTP/1.1\nHost: backend\nHost: shop\n\n".to_owned(),
            "ambiguous-request",
        ),
    ];
    for (name, text, reason) in &refused {
        for addr in [out, inb] {
            let verdict = exchange(addr, &request(text)).await?;
            expect(&verdict, 400, name)?;
            if !reason.is_empty() {
                ensure!(
                    verdict.header("weft-reason") == Some(*reason),
                    "{name}: {verdict:?}"
                );
            }
        }
    }
    // A chunk size that is not hex: the body fails mid-way; the client gets a
    // 4xx or a close.
    let bad_chunk = request(
        "POST /echo HTTP/1.1\nHost: backend\nTransfer-Encoding: chunked\n\nzz\nhello\n0\n\n",
    );
    for addr in [out, inb] {
        let verdict = exchange(addr, &bad_chunk).await?;
        ensure!(verdict.refused(), "bad chunk size: {verdict:?}");
    }
    // CL + TE, in either order (RFC 9112 §6.3 "ought to be handled as an
    // error"): 400 and a close, nothing forwarded. hyper alone would frame by
    // Transfer-Encoding and drop Content-Length; the sidecar follows the raw
    // bytes to know. Also as the second request of a pipelined connection.
    let before_both = (setup.backend.requests(), setup.app.requests());
    let both = [
        (
            "CL,TE",
            format!(
                "POST /echo HTTP/1.1\nHost: backend\nContent-Length: 5\nTransfer-Encoding: chunked\n\n0\n\n{smuggled}"
            ),
        ),
        (
            "TE,CL",
            format!(
                "POST /echo HTTP/1.1\nHost: backend\ntransfer-encoding: chunked\ncontent-length: 5\n\n0\n\n{smuggled}"
            ),
        ),
    ];
    for (name, text) in &both {
        for addr in [out, inb] {
            let verdict = exchange(addr, &request(text)).await?;
            expect(&verdict, 400, name)?;
            ensure!(
                verdict.header("weft-reason") == Some("ambiguous-request")
                    && matches!(verdict, Verdict::Closed(..)),
                "{name}: expected ambiguous-request and a close: {verdict:?}"
            );
        }
    }
    for addr in [out, inb] {
        let mut stream = TcpStream::connect(addr).await?;
        let pipelined = format!("GET /ok HTTP/1.1\nHost: backend\n\n{}", both[0].1);
        stream.write_all(&request(&pipelined)).await?;
        let mut responses = Responses::new(stream);
        let first = responses.next().await?;
        ensure!(first.status == 200, "pipelined GET: {first:?}");
        let verdict = responses.verdict().await?;
        ensure!(
            verdict.status() == Some(400)
                && verdict.header("weft-reason") == Some("ambiguous-request")
                && matches!(verdict, Verdict::Closed(..)),
            "CL+TE after a GET: {verdict:?}"
        );
    }
    let after_both = (setup.backend.requests(), setup.app.requests());
    ensure!(
        after_both == (before_both.0 + 1, before_both.1 + 1),
        "only the pipelined GETs may be forwarded: {before_both:?} -> {after_both:?}"
    );
    for seen in setup.backend.seen().iter().chain(setup.app.seen().iter()) {
        ensure!(
            seen.path != "/smuggled",
            "a smuggled request got through: {seen:?}"
        );
        ensure!(
            !(seen.headers.contains_key("content-length")
                && seen.headers.contains_key("transfer-encoding")),
            "forwarded with two framings: {seen:?}"
        );
    }
    let forwarded = (setup.backend.requests(), setup.app.requests());
    ensure!(
        forwarded.0 - forwarded_before.0 <= 2 && forwarded.1 - forwarded_before.1 <= 2,
        "only the pipelined GET (and at most the bad-chunk) requests may be forwarded: {forwarded_before:?} -> {forwarded:?}"
    );
    setup.still_serves("smuggling").await?;

    // Slowloris: a head dribbled one field every 300 ms is cut within the
    // header read timeout of its first byte, plus slack.
    for addr in [out, inb] {
        let mut stream = TcpStream::connect(addr).await?;
        let started = Instant::now();
        stream
            .write_all(b"GET /ok HTTP/1.1\r\nHost: backend\r\n")
            .await?;
        let closed = within(
            HEADER_TIMEOUT + MARGIN + Duration::from_secs(5),
            "slowloris",
            async {
                for i in 0.. {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if stream
                        .write_all(format!("X-D{i}: x\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let mut probe = [0u8; 512];
                    if let Ok(read) =
                        tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe))
                            .await
                    {
                        match read {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                started.elapsed()
            },
        )
        .await?;
        ensure!(
            closed <= HEADER_TIMEOUT + MARGIN,
            "a dribbled head held the connection for {closed:?} (header_read_timeout {HEADER_TIMEOUT:?})"
        );
    }
    // A connection that never says anything, and one stuck inside the HTTP/2
    // preface, are closed within the header read timeout too.
    for (what, bytes) in [
        ("silence", &b""[..]),
        ("half an HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
    ] {
        let mut stream = TcpStream::connect(out).await?;
        stream.write_all(bytes).await?;
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = within(HEADER_TIMEOUT + MARGIN, what, stream.read(&mut buf)).await?;
        ensure!(
            matches!(read, Ok(0) | Err(_)),
            "{what}: {read:?} after {:?}",
            started.elapsed()
        );
    }
    // An idle keep-alive connection outlives the header read timeout (idle is
    // its own limit) and is closed after the idle timeout.
    {
        let mut stream = TcpStream::connect(out).await?;
        let get = b"GET /ok HTTP/1.1\r\nHost: backend\r\n\r\n";
        stream.write_all(get).await?;
        let verdict = read_one(&mut stream).await?;
        ensure!(
            verdict == 200,
            "first request on the kept-alive connection: {verdict}"
        );
        tokio::time::sleep(HEADER_TIMEOUT + Duration::from_millis(500)).await;
        stream.write_all(get).await?;
        let verdict = read_one(&mut stream).await?;
        ensure!(
            verdict == 200,
            "an idle connection was closed before idle_timeout: {verdict}"
        );
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = within(IDLE_TIMEOUT + MARGIN, "idle close", stream.read(&mut buf)).await?;
        ensure!(
            matches!(read, Ok(0) | Err(_)),
            "idle: {read:?} after {:?}",
            started.elapsed()
        );
    }
    setup.still_serves("slowloris").await?;

    // An idle HTTP/2 connection (it answers the keep-alive pings) is asked to
    // finish once no request has started for the idle timeout.
    idle_h2(out).await?;
    setup.still_serves("an idle HTTP/2 connection").await?;

    // HTTP/2 rapid reset: open and cancel streams as fast as the client can;
    // the connection gets GOAWAY, other clients are still served.
    rapid_reset(out).await?;
    setup.still_serves("an HTTP/2 rapid-reset burst").await?;

    // HTTP/2 CONTINUATION flood: a header block that never ends.
    continuation_flood(out).await?;
    setup.still_serves("an HTTP/2 CONTINUATION flood").await?;

    // The inbound listener is not a proxy: absolute form naming another host
    // is refused, naming this service or this listener is served.
    let foreign = [
        "GET http://example.com/ok HTTP/1.1\nHost: example.com\n\n".to_owned(),
        "GET http://10.1.2.3:8080/ok HTTP/1.1\nHost: shop\n\n".to_owned(),
        "CONNECT example.com:443 HTTP/1.1\nHost: example.com:443\n\n".to_owned(),
    ];
    let app_before = setup.app.requests();
    for text in &foreign {
        let verdict = exchange(inb, &request(text)).await?;
        expect(&verdict, 403, text)?;
        ensure!(
            verdict.header("weft-reason") == Some("foreign-authority"),
            "{verdict:?}"
        );
    }
    ensure!(
        setup.app.requests() == app_before,
        "a foreign request reached the app"
    );
    for text in [
        "GET http://shop/ok HTTP/1.1\nHost: shop\n\n".to_owned(),
        format!("GET http://{inb}/ok HTTP/1.1\nHost: shop\n\n"),
    ] {
        let verdict = exchange(inb, &request(&text)).await?;
        expect(&verdict, 200, &text)?;
    }
    setup.still_serves("absolute form to another host").await?;

    let scrape = setup.proxy.admin_client().metrics().await?;
    for reason in ["uri-too-long", "ambiguous-request", "foreign-authority"] {
        ensure!(
            scrape.sum("weft_refusals_total", &[("reason", reason)]) >= 1.0,
            "no refusal counted for {reason}"
        );
    }
    let rss_after = setup.rss().await?;
    let growth = rss_after - rss_before;
    ensure!(
        growth < 50.0 * 1024.0 * 1024.0,
        "resident memory grew by {:.1} MiB ({rss_before} -> {rss_after})",
        growth / 1024.0 / 1024.0
    );
    Ok(())
}

/// Reads one response (Content-Length or chunked body); its status.
async fn read_one(stream: &mut TcpStream) -> anyhow::Result<u16> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head
                .strip_prefix("http/1.1 ")
                .and_then(|rest| rest.get(..3))
                .with_context(|| format!("not a response: {:?}", String::from_utf8_lossy(&buf)))?
                .parse()?;
            let body = &buf[end + 4..];
            let complete = if head.contains("transfer-encoding: chunked") {
                body.ends_with(b"0\r\n\r\n")
            } else {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(Ok(0), |v| v.trim().parse())?;
                body.len() >= len
            };
            if complete {
                return Ok(status);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = within(VERDICT_WAIT, "a response", stream.read(&mut chunk)).await??;
        ensure!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request over HTTP/2, then nothing: the proxy ends the connection
/// after `IDLE_TIMEOUT` (GOAWAY, then close), not before.
async fn idle_h2(addr: SocketAddr) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    let mut driver = tokio::spawn(connection);
    let mut client = within(VERDICT_WAIT, "h2 ready", client.ready()).await??;
    let (response, _) = client.send_request(Request::get("http://backend/ok").body(())?, true)?;
    let response = within(VERDICT_WAIT, "an h2 response", response).await??;
    ensure!(response.status() == 200, "{}", response.status());
    drop(response);
    let idle_from = Instant::now();
    // Alive past the header read timeout: idle is its own limit.
    ensure!(
        tokio::time::timeout(HEADER_TIMEOUT + Duration::from_millis(500), &mut driver)
            .await
            .is_err(),
        "the idle HTTP/2 connection ended before idle_timeout"
    );
    let ended = within(
        IDLE_TIMEOUT + MARGIN,
        "the idle h2 connection to end",
        driver,
    )
    .await??;
    let waited = idle_from.elapsed();
    ensure!(
        waited + Duration::from_millis(200) >= IDLE_TIMEOUT,
        "closed after {waited:?}, before idle_timeout"
    );
    match ended {
        Ok(()) => Ok(()),
        Err(error) if error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR) => Ok(()),
        Err(error) => bail!("the idle h2 connection ended with {error:?}"),
    }
}

/// Opens and resets streams back to back until the proxy sends GOAWAY.
async fn rapid_reset(addr: SocketAddr) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut client, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(connection);
    let mut sent = 0;
    for _ in 0..5000 {
        let ready = std::future::poll_fn(|cx| client.poll_ready(cx));
        if within(VERDICT_WAIT, "h2 ready", ready).await?.is_err() {
            break;
        }
        let req = Request::get("http://backend/slow?ms=2000").body(())?;
        let Ok((_response, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    drop(client);
    let ended = within(VERDICT_WAIT, "the rapid-reset connection to end", driver).await??;
    let error = match ended {
        Ok(()) => bail!("{sent} streams opened and reset, and no GOAWAY"),
        Err(error) => error,
    };
    // GOAWAY, or (when the close overtook the client still writing its burst)
    // the connection cut under it.
    ensure!(
        (error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
            || error.is_io(),
        "expected GOAWAY ENHANCE_YOUR_CALM after {sent} resets, got {error:?}"
    );
    ensure!(sent < 5000, "the whole burst of {sent} resets was accepted");
    Ok(())
}

/// One HTTP/2 frame header.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK literal without indexing, new name (both shorter than 127 bytes).
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name.as_bytes());
    out.push(u8::try_from(value.len()).unwrap());
    out.extend_from_slice(value.as_bytes());
    out
}

/// HEADERS without END_HEADERS, then CONTINUATION frames of fresh headers far
/// past the header list limit: the proxy must end the connection, not buffer.
async fn continuation_flood(addr: SocketAddr) -> anyhow::Result<()> {
    const HEADERS: u8 = 0x1;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const CONTINUATION: u8 = 0x9;
    const END_STREAM: u8 = 0x1;
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await?;
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    // :method GET, :scheme http, :path /, :authority backend.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 7];
    block.extend_from_slice(b"backend");
    stream
        .write_all(&frame(HEADERS, END_STREAM, 1, &block))
        .await?;
    let value = "v".repeat(100);
    let mut sent = 0usize;
    let mut index = 0;
    while sent < 4 * 1024 * 1024 {
        let mut payload = Vec::new();
        while payload.len() < 16 * 1024 - 200 {
            payload.extend_from_slice(&literal(&format!("x-flood-{index}"), &value));
            index += 1;
        }
        let bytes = frame(CONTINUATION, 0, 1, &payload);
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&bytes)).await {
            Ok(Ok(())) => sent += bytes.len(),
            // Refused (reset, or the proxy stopped reading): the flood is cut.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // The proxy ends the connection: GOAWAY, then a close.
    let mut seen = Vec::new();
    let ended = within(
        VERDICT_WAIT,
        "the CONTINUATION flood connection to end",
        async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
        },
    )
    .await;
    let mut frames = Vec::new();
    let mut rest = &seen[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frames.push(rest[3]);
        rest = rest.get(9 + len..).unwrap_or_default();
    }
    ensure!(
        ended.is_ok() || frames.contains(&GOAWAY),
        "the proxy neither closed nor sent GOAWAY after {sent} bytes of CONTINUATION (frames {frames:?})"
    );
    ensure!(
        sent < 4 * 1024 * 1024 || frames.contains(&GOAWAY),
        "the proxy read 4 MiB of one header block without a GOAWAY (frames {frames:?})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_and_counted() -> anyhow::Result<()> {
    let setup = Setup::start(&[("max_connections", "3")]).await?;
    let out = setup.proxy.outbound();
    // Three kept-alive connections fill the outbound listener.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(out).await?;
        stream
            .write_all(b"GET /ok HTTP/1.1\r\nHost: backend\r\n\r\n")
            .await?;
        ensure!(read_one(&mut stream).await? == 200);
        held.push(stream);
    }
    // The fourth is accepted and closed at once, without an answer.
    let verdict = exchange(out, b"GET /ok HTTP/1.1\r\nHost: backend\r\n\r\n").await?;
    ensure!(
        matches!(verdict, Verdict::Closed(None, _)),
        "past the cap: {verdict:?}"
    );
    let scrape = setup.proxy.admin_client().metrics().await?;
    ensure!(
        scrape.value(
            "weft_tcp_connections_refused_total",
            &[("direction", "outbound")]
        )? >= 1.0,
        "{}",
        scrape.text
    );
    ensure!(
        scrape.value(
            "weft_tcp_connections_refused_total",
            &[("direction", "inbound")]
        )? == 0.0
    );
    ensure!(
        setup.proxy.logs().contains("connection refused"),
        "no log line for the refusal"
    );
    // The inbound listener has its own cap.
    let inb = Client::host_header(setup.proxy.inbound())
        .get("http://shop/ok")
        .await?;
    inb.expect_status(200)?;
    // Closing one frees its slot.
    held.pop();
    eventually(Duration::from_secs(5), || async {
        let reply = Client::host_header(out).get("http://backend/ok").await?;
        reply.expect_status(200)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// The corpus: `tests/corpus/hostile/*.http`, raw request bytes.
fn corpus() -> anyhow::Result<Vec<(String, Bytes)>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/hostile");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("http") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.push((name, Bytes::from(std::fs::read(&path)?)));
        }
    }
    files.sort();
    ensure!(files.len() >= 20, "only {} corpus files", files.len());
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_of_hostile_inputs_is_refused_on_both_listeners() -> anyhow::Result<()> {
    let setup = Setup::start(&[]).await?;
    let mut failures = Vec::new();
    for (name, bytes) in corpus()? {
        for (listener, addr) in [
            ("outbound", setup.proxy.outbound()),
            ("inbound", setup.proxy.inbound()),
        ] {
            match exchange(addr, &bytes).await {
                Ok(verdict) if verdict.refused() => {}
                Ok(verdict) => failures.push(format!("{name} on {listener}: {verdict:?}")),
                Err(error) => failures.push(format!("{name} on {listener}: {error:#}")),
            }
            if let Err(error) = setup.still_serves(&format!("{name} on {listener}")).await {
                failures.push(format!("{error:#}"));
            }
        }
    }
    ensure!(
        setup.backend.seen().iter().all(|s| s.path != "/smuggled")
            && setup.app.seen().iter().all(|s| s.path != "/smuggled"),
        "a smuggled request reached a backend"
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// One whole HTTP/1 response read by [`Responses`].
#[derive(Debug)]
struct Response {
    status: u16,
    /// The head, lower case.
    head: String,
    body: Vec<u8>,
}

/// Reads HTTP/1 responses one after the other from a connection (pipelined
/// requests), keeping what it read past each.
struct Responses<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Responses<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> anyhow::Result<Response> {
        loop {
            if let Some((response, used)) = parse_response(&self.buf)? {
                self.buf.drain(..used);
                return Ok(response);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = within(VERDICT_WAIT, "a response", self.stream.read(&mut chunk)).await??;
            ensure!(
                n > 0,
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next response as a [`Verdict`] (whether the connection closes).
    async fn verdict(mut self) -> anyhow::Result<Verdict> {
        let buf = std::mem::take(&mut self.buf);
        read_verdict_after(&mut self.stream, buf).await
    }
}

/// A whole response at the start of `buf` (Content-Length or chunked body,
/// no trailers) and the bytes it took; `None` while incomplete.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(Response, usize)>> {
    let find = |from: usize, what: &[u8]| {
        buf.get(from..)
            .and_then(|rest| rest.windows(what.len()).position(|w| w == what))
            .map(|at| from + at)
    };
    let Some(end) = find(0, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not a response: {head:?}"))?;
    let mut at = end + 4;
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        loop {
            let Some(line_end) = find(at, b"\r\n") else {
                return Ok(None);
            };
            let line = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            at = line_end + 2;
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
            if size == 0 {
                break;
            }
        }
    } else {
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(Ok(0), |v| v.trim().parse())?;
        if buf.len() < at + len {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + len]);
        at += len;
    }
    Ok(Some((Response { status, head, body }, at)))
}

/// Bytes that look like a head with both framings, for bodies.
const LOOKALIKE: &str = "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n";

/// Pipelined on one connection, what the framing check must let through:
/// a GET, a Content-Length body and a chunked one (with an extension and a
/// trailer) that both hold [`LOOKALIKE`] and a whole head with both fields,
/// then a GET. Each is answered, bodies echoed byte for byte, and the
/// connection stays open.
async fn legitimate_framing_passes<S>(stream: S, host: &str, what: &str) -> anyhow::Result<()>
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let fake_head = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\n{LOOKALIKE}\r\n");
    let cl_body = format!("{LOOKALIKE}{fake_head}");
    let chunked_body = format!("{fake_head}{LOOKALIKE}");
    let (first, second) = chunked_body.split_at(10);
    let text = format!(
        "GET /ok HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{cl_body}\
         POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};ext=1\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\nX-Trailer: 1\r\n\r\n\
         GET /ok HTTP/1.1\r\nHost: {host}\r\n\r\n",
        cl_body.len(),
        first.len(),
        second.len(),
    );
    let mut stream = stream;
    stream.write_all(text.as_bytes()).await?;
    let mut responses = Responses::new(stream);
    let expected = [
        ("GET", &b""[..]),
        ("Content-Length POST", cl_body.as_bytes()),
        ("chunked POST", chunked_body.as_bytes()),
        ("GET", &b""[..]),
    ];
    for (name, body) in expected {
        let rsp = responses
            .next()
            .await
            .with_context(|| format!("{what}: {name}"))?;
        ensure!(rsp.status == 200, "{what}: {name}: {rsp:?}");
        ensure!(
            body.is_empty() || rsp.body == body,
            "{what}: {name}: body not echoed byte for byte: {:?}",
            String::from_utf8_lossy(&rsp.body)
        );
        ensure!(
            !rsp.head.contains("connection: close"),
            "{what}: {name}: closed: {rsp:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_with_both_lengths_are_refused() -> anyhow::Result<()> {
    let setup = Setup::start(&[]).await?;
    for (addr, host) in [
        (setup.proxy.outbound(), "backend"),
        (setup.proxy.inbound(), "shop"),
    ] {
        let stream = TcpStream::connect(addr).await?;
        legitimate_framing_passes(stream, host, &format!("plaintext to {host}")).await?;
    }
    ensure!(
        setup.backend.requests() == 4 && setup.app.requests() == 4,
        "({}, {})",
        setup.backend.requests(),
        setup.app.requests()
    );
    setup.still_serves("legitimate framing").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_both_lengths_are_refused_over_tls() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("app").await?;
    let bootstrap = Bootstrap::new().app("shop", app.addr()).tls("shop", None);
    let proxy = pki
        .files(
            Proxy::builder(bootstrap.render()),
            "shop",
            &pki.issue("shop"),
        )
        .start()
        .await?;
    let web = pki.issue("web");
    let inb = proxy.inbound();
    for order in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
    ] {
        let mut conn = weft_tests::tls::connect(inb, pki.ca_pem(), Some(&web)).await?;
        let text = format!(
            "POST /echo HTTP/1.1\r\nHost: shop\r\n{order}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n"
        );
        conn.stream.write_all(text.as_bytes()).await?;
        let verdict = read_verdict(&mut conn.stream).await?;
        ensure!(
            verdict.status() == Some(400)
                && verdict.header("weft-reason") == Some("ambiguous-request")
                && matches!(verdict, Verdict::Closed(..)),
            "{order:?} over TLS: {verdict:?}"
        );
    }
    ensure!(app.requests() == 0, "{:?}", app.seen());
    let conn = weft_tests::tls::connect(inb, pki.ca_pem(), Some(&web)).await?;
    legitimate_framing_passes(conn.stream, "shop", "over TLS").await?;
    ensure!(app.requests() == 4, "{}", app.requests());
    Ok(())
}
