//! An in-process test backend: the service instances behind the proxy.
//!
//! A [`Backend`] listens on a loopback address (port 0 by default) and speaks
//! HTTP/1.1 and HTTP/2 prior knowledge on the same port (hyper-util's auto
//! server, upgrades enabled). Every response carries `x-backend: <id>` so a
//! test knows which instance answered. Routes:
//!
//! | path | behaviour |
//! |---|---|
//! | `/echo` | streams the request body back as it arrives (no buffering) |
//! | `/slow?ms=N` | answers after N ms |
//! | `/drip?chunks=N&ms=M` | streams N chunks, M ms apart |
//! | `/pattern?len=N` | streams N bytes of [`crate::pattern`] |
//! | `/grpc` | echoes the body, then trailers `grpc-status: 0` (or the request's `x-grpc-status`), `grpc-message: ok` and `x-seen-trailer-<name>` for each request trailer |
//! | `/ws` | `Upgrade: websocket` -> 101, then echoes raw bytes |
//! | `/status?code=N` | answers N |
//! | `/hold` | answers 200 once the test calls [`Backend::release`] (at most [`HOLD_LIMIT`]) |
//! | anything else | 200, body `backend <id>` |
//!
//! Every response also echoes what the proxy forwarded: `x-seen-host`,
//! `x-seen-x-forwarded-for`, `x-seen-forwarded`, `x-seen-version`. The
//! backend counts requests and in-flight requests (a request is in flight
//! until its response body is finished or dropped) and records every request
//! head for later assertions. Dropping the [`Backend`] stops it and closes its
//! connections.
//!
//! Switches change a running backend, so one test can make an instance
//! fail and heal, or turn slow: [`Backend::set_latency`] (a delay before every
//! answer, also settable up front with [`BackendBuilder::latency`]),
//! [`Backend::set_slow_every`] (a slow tail: every n-th answer late) and
//! [`Backend::set_status`] (answer every request, whatever its path, with one
//! status after reading its whole body; `None` restores the routes above).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::stream;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{Body, BoxError, full};

/// What the backend saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: Method,
    /// The request target as received (absolute form keeps the authority).
    pub target: String,
    /// Path and query.
    pub path: String,
    pub version: Version,
    /// The Host header, or the URI authority for HTTP/2.
    pub host: Option<String>,
    pub headers: HeaderMap,
    pub peer: SocketAddr,
}

/// The longest a `/hold` request waits for [`Backend::release`], so a test
/// that forgets to release cannot hang.
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct State {
    id: String,
    /// Delay before every answer, in microseconds.
    latency_us: AtomicU64,
    /// Every `slow_every`-th request (0: none) waits `slow_us` more.
    slow_every: AtomicU64,
    slow_us: AtomicU64,
    /// Status forced on every answer; 0 when the routes answer normally.
    forced_status: AtomicU16,
    /// Bumped by [`Backend::release`]; `/hold` waits for it to change.
    release: watch::Sender<u64>,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Connections accepted and not yet closed.
    open_connections: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: &Arc<State>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Configures a [`Backend`] before it starts.
#[derive(Debug)]
pub struct BackendBuilder {
    id: String,
    latency: Duration,
    addr: SocketAddr,
}

impl BackendBuilder {
    /// Adds a fixed delay before every answer (to look slow to a balancer).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Listens on `addr` instead of `127.0.0.1:0`.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(self) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding backend {} on {}", self.id, self.addr))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            id: self.id,
            latency_us: AtomicU64::new(micros(self.latency)),
            slow_every: AtomicU64::new(0),
            slow_us: AtomicU64::new(0),
            forced_status: AtomicU16::new(0),
            release: watch::Sender::new(0),
            requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Backend { addr, state, task })
    }
}

/// A running test backend; stops (and drops its connections) on drop.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Configures a backend whose responses say `x-backend: <id>`.
    pub fn builder(id: &str) -> BackendBuilder {
        BackendBuilder {
            id: id.to_owned(),
            latency: Duration::ZERO,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Starts a backend on `127.0.0.1:0`.
    pub async fn start(id: &str) -> anyhow::Result<Backend> {
        Self::builder(id).start().await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its id (the `x-backend` value).
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests whose response has not finished yet.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Connections open to it now (accepted, not yet closed by either side).
    pub fn open_connections(&self) -> usize {
        self.state.open_connections.load(Ordering::SeqCst)
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every request head received so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The last request head received.
    pub fn last_seen(&self) -> Option<SeenRequest> {
        self.state.seen.lock().unwrap().last().cloned()
    }

    /// How many requests arrived with header `name` equal to `value`.
    pub fn seen_with(&self, name: &str, value: &str) -> usize {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.headers.get(name).is_some_and(|v| v == value))
            .count()
    }

    /// Changes the delay added before every answer, from the next request on.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(micros(latency), Ordering::SeqCst);
    }

    /// A slow tail: every `every`-th request (counting from the first this
    /// backend received) waits `latency` more before its answer.
    pub fn set_slow_every(&self, every: u64, latency: Duration) {
        self.state.slow_us.store(micros(latency), Ordering::SeqCst);
        self.state.slow_every.store(every, Ordering::SeqCst);
    }

    /// Forces every answer to `status` (after reading the request body), or
    /// with `None` goes back to answering by path.
    pub fn set_status(&self, status: Option<u16>) {
        self.state
            .forced_status
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// Lets every `/hold` request that has arrived so far answer.
    pub fn release(&self) {
        self.state
            .release
            .send_modify(|generation| *generation += 1);
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// Counts a connection as open until dropped (with its task, however it ends).
struct OpenConnection(Arc<State>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                state.open_connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let _open = OpenConnection(state.clone());
                    let service = hyper::service::service_fn(move |request| {
                        handle(state.clone(), peer, request)
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Parses the query string into a map (no percent-decoding; tests don't need it).
fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn number(query: &BTreeMap<String, String>, key: &str, default: u64) -> u64 {
    query
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Subscribed before the request counts as arrived or in flight, so a test
    // that sees it in flight and calls `release` always lets it go.
    let mut release = state.release.subscribe();
    let in_flight = InFlight::new(&state);
    let nth = state.requests.fetch_add(1, Ordering::SeqCst) as u64 + 1;
    let host = request
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    let seen = SeenRequest {
        method: request.method().clone(),
        target: request.uri().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: request.version(),
        host,
        headers: request.headers().clone(),
        peer,
    };
    state.seen.lock().unwrap().push(seen.clone());

    let mut latency = Duration::from_micros(state.latency_us.load(Ordering::SeqCst));
    let slow_every = state.slow_every.load(Ordering::SeqCst);
    if slow_every > 0 && nth.is_multiple_of(slow_every) {
        latency += Duration::from_micros(state.slow_us.load(Ordering::SeqCst));
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let params = query(&request);
    let path = request.uri().path().to_owned();
    let forced = state.forced_status.load(Ordering::SeqCst);
    let mut response = match path.as_str() {
        _ if forced != 0 => {
            // Read the whole body first, as a real server answering an error
            // would, so the proxy never sees a reset while it is still sending.
            let read = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len());
            let mut response = Response::new(full(format!(
                "forced status {forced} (read {read:?} body bytes)"
            )));
            *response.status_mut() =
                StatusCode::from_u16(forced).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            response
        }
        "/echo" => Response::new(request.into_body().map_err(BoxError::from).boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(number(&params, "ms", 1000))).await;
            Response::new(full(format!("slow {}", state.id)))
        }
        "/drip" => drip(number(&params, "chunks", 5), number(&params, "ms", 100)),
        "/pattern" => Response::new(crate::client::pattern_body(number(&params, "len", 0))),
        "/grpc" => grpc(request).await,
        "/ws" => websocket(&mut request),
        "/status" => {
            let code = number(&params, "code", 200);
            let mut response = Response::new(full(format!("status {code}")));
            *response.status_mut() =
                StatusCode::from_u16(code as u16).unwrap_or(StatusCode::BAD_REQUEST);
            response
        }
        "/hold" => {
            let _ = tokio::time::timeout(HOLD_LIMIT, release.changed()).await;
            Response::new(full(format!("held {}", state.id)))
        }
        _ => Response::new(full(format!("backend {}", state.id))),
    };

    let headers = response.headers_mut();
    insert(headers, "x-backend", Some(&state.id));
    insert(headers, "x-seen-host", seen.host.as_deref());
    insert(
        headers,
        "x-seen-version",
        Some(&format!("{:?}", seen.version)),
    );
    for name in ["x-forwarded-for", "forwarded"] {
        let value = seen.headers.get(name).and_then(|v| v.to_str().ok());
        insert(headers, &format!("x-seen-{name}"), value);
    }

    // The request stays in flight until the response body is done with.
    let (parts, body) = response.into_parts();
    let body = body
        .map_frame(move |frame| {
            let _ = &in_flight;
            frame
        })
        .boxed();
    Ok(Response::from_parts(parts, body))
}

fn insert(headers: &mut HeaderMap, name: &str, value: Option<&str>) {
    if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            value,
        );
    }
}

fn drip(chunks: u64, ms: u64) -> Response<Body> {
    let frames = stream::unfold(0_u64, move |sent| async move {
        if sent >= chunks {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let data = Bytes::from(format!("chunk {sent}\n"));
        Some((Ok::<_, BoxError>(Frame::data(data)), sent + 1))
    });
    Response::new(StreamBody::new(frames).boxed())
}

async fn grpc(request: Request<Incoming>) -> Response<Body> {
    let status = request
        .headers()
        .get("x-grpc-status")
        .cloned()
        .unwrap_or(HeaderValue::from_static("0"));
    let collected = match request.into_body().collect().await {
        Ok(collected) => collected,
        Err(error) => {
            let mut response = Response::new(full(format!("bad request body: {error}")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status);
    trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    if let Some(seen) = collected.trailers() {
        for (name, value) in seen {
            let echoed = format!("x-seen-trailer-{name}");
            if let Ok(echoed) = http::HeaderName::from_bytes(echoed.as_bytes()) {
                trailers.append(echoed, value.clone());
            }
        }
    }
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(collected.to_bytes())),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(StreamBody::new(stream::iter(frames)).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

fn websocket(request: &mut Request<Incoming>) -> Response<Body> {
    let wants_websocket = request
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !wants_websocket {
        let mut response = Response::new(full("expected Upgrade: websocket"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    }
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    });
    let mut response = Response::new(crate::client::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response
        .headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, RawConn, pattern_body};
    use http_body_util::channel::Channel;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_http1_and_h2_with_its_id_and_counts() {
        let backend = Backend::start("a").await.unwrap();
        for client in [
            Client::host_header(backend.addr()),
            Client::h2(backend.addr()),
        ] {
            let reply = client.get("http://billing:81/x?y=1").await.unwrap();
            assert_eq!(reply.status, 200);
            assert_eq!(reply.backend(), Some("a"));
            assert_eq!(reply.header("x-seen-host"), Some("billing:81"));
        }
        let seen = backend.seen();
        assert_eq!(backend.requests(), 2);
        assert_eq!(seen[0].version, Version::HTTP_11);
        assert_eq!(seen[1].version, Version::HTTP_2);
        assert_eq!(seen[1].path, "/x?y=1");
        assert_eq!(backend.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_requests_count_as_in_flight() {
        let backend = Backend::start("a").await.unwrap();
        let client = Client::host_header(backend.addr());
        let slow = tokio::spawn({
            let client = client.clone();
            async move { client.get("http://a/slow?ms=300").await }
        });
        crate::eventually(Duration::from_secs(2), || async {
            anyhow::ensure!(backend.in_flight() == 1);
            Ok(())
        })
        .await
        .unwrap();
        slow.await.unwrap().unwrap().expect_status(200).unwrap();
        assert_eq!(backend.in_flight(), 0);
        assert_eq!(backend.max_in_flight(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_streams_large_bodies_over_http1_and_h2() {
        let backend = Backend::start("a").await.unwrap();
        let len = 10 * 1024 * 1024 + 7;
        for client in [
            Client::host_header(backend.addr()),
            Client::h2(backend.addr()),
        ] {
            let request = Request::post("http://a/echo")
                .body(pattern_body(len))
                .unwrap();
            let reply = client.request(request).await.unwrap();
            assert_eq!(reply.body.len() as u64, len);
            crate::check_pattern(0, &reply.body).unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_is_full_duplex_over_h2() {
        let backend = Backend::start("a").await.unwrap();
        let client = Client::h2(backend.addr());
        let (mut tx, body) = Channel::<Bytes, BoxError>::new(4);
        let request = Request::post("http://a/echo").body(body.boxed()).unwrap();
        tx.send_data(Bytes::from_static(b"first")).await.unwrap();
        let response = client.send(request).await.unwrap();
        let mut body = response.into_body();
        let frame = crate::within(Duration::from_secs(5), "first echo", body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        drop(tx);
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_returns_trailers_and_echoes_request_trailers() {
        let backend = Backend::start("a").await.unwrap();
        let client = Client::h2(backend.addr());
        let (mut tx, body) = Channel::<Bytes, BoxError>::new(4);
        let request = Request::post("http://a/grpc")
            .header("content-type", "application/grpc")
            .body(body.boxed())
            .unwrap();
        let sender = tokio::spawn(async move {
            tx.send_data(Bytes::from_static(b"hello")).await.unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("x-client-trailer", HeaderValue::from_static("t1"));
            tx.send_trailers(trailers).await.unwrap();
        });
        let reply = client.request(request).await.unwrap();
        sender.await.unwrap();
        assert_eq!(reply.body, "hello");
        assert_eq!(reply.trailer("grpc-status"), Some("0"));
        assert_eq!(reply.trailer("grpc-message"), Some("ok"));
        assert_eq!(reply.trailer("x-seen-trailer-x-client-trailer"), Some("t1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_upgrade_echoes_raw_bytes() {
        let backend = Backend::start("a").await.unwrap();
        let mut conn = RawConn::connect(backend.addr()).await.unwrap();
        conn.write(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let head = conn.read_head().await.unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.header("x-backend"), Some("a"));
        conn.write(b"ping").await.unwrap();
        assert_eq!(conn.read_exact(4).await.unwrap(), "ping");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_and_drip_take_their_time() {
        let backend = Backend::builder("slow")
            .latency(Duration::from_millis(100))
            .start()
            .await
            .unwrap();
        let client = Client::host_header(backend.addr());
        let started = tokio::time::Instant::now();
        let reply = client.get("http://a/drip?chunks=3&ms=50").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(reply.text(), "chunk 0\nchunk 1\nchunk 2\n");
        let reply = client.get("http://a/status?code=503").await.unwrap();
        assert_eq!(reply.status, 503);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switches_change_a_running_backend() {
        let backend = Backend::start("a").await.unwrap();
        let client = Client::host_header(backend.addr());
        backend.set_status(Some(503));
        let reply = client.post("http://a/echo", "body").await.unwrap();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.backend(), Some("a"));
        assert!(reply.text().contains("read Ok(4)"), "{}", reply.text());
        backend.set_status(None);
        client
            .get("http://a/")
            .await
            .unwrap()
            .expect_status(200)
            .unwrap();

        backend.set_latency(Duration::from_millis(150));
        let started = tokio::time::Instant::now();
        client.get("http://a/").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        backend.set_latency(Duration::ZERO);

        let request = Request::get("http://a/").header("x-request-id", "r1");
        client
            .request(request.body(crate::client::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(backend.seen_with("x-request-id", "r1"), 1);
        assert_eq!(backend.seen_with("x-request-id", "r2"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hold_answers_only_once_released() {
        let backend = Backend::start("a").await.unwrap();
        let client = Client::host_header(backend.addr());
        let held: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.get("http://a/hold").await })
            })
            .collect();
        crate::eventually(Duration::from_secs(5), || async {
            anyhow::ensure!(
                backend.in_flight() == 3,
                "{} in flight",
                backend.in_flight()
            );
            Ok(())
        })
        .await
        .unwrap();
        assert!(held.iter().all(|h| !h.is_finished()));
        backend.release();
        for handle in held {
            let reply = crate::within(Duration::from_secs(5), "released", handle)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(reply.text(), "held a");
        }
    }
}
