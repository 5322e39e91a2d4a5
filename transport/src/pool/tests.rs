//! The pool against real servers on 127.0.0.1: reuse, limits, stale and
//! idle connections, HTTP/2 multiplexing, and how failures are classified.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_core::body::{self, ProxyBody};
use weft_core::retry::classify::{Outcome, outcome_of};

use crate::client::{ClientSettings, EndpointPools, UpstreamClient};
use crate::forward::send_error;

/// A server's counts: connections accepted, and closed by the client.
#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    requests: AtomicUsize,
}

impl Counts {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A server answering `ok`; the `n`th request it receives waits until the
/// gate reaches `n` (an open gate: `usize::MAX`).
async fn server(
    http2: bool,
    gate: tokio::sync::watch::Receiver<usize>,
) -> (SocketAddr, Arc<Counts>) {
    server_with_streams(http2, gate, 200).await
}

/// [`server`], allowing `max_streams` HTTP/2 streams per connection.
async fn server_with_streams(
    http2: bool,
    gate: tokio::sync::watch::Receiver<usize>,
    max_streams: u32,
) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            let gate = gate.clone();
            tokio::spawn(async move {
                let arrivals = Arc::clone(&c);
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let n = arrivals.requests.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut gate = gate.clone();
                    async move {
                        let _ = gate.wait_for(|open| *open >= n).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = TokioIo::new(stream);
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// A server whose requests are all answered at once.
async fn open_server(http2: bool) -> (SocketAddr, Arc<Counts>) {
    let (gate, rx) = tokio::sync::watch::channel(usize::MAX);
    // The receivers it hands out outlive this sender: the gate stays open.
    drop(gate);
    server(http2, rx).await
}

fn client(idle_timeout: Duration, max_idle: usize) -> UpstreamClient {
    UpstreamClient::new(
        ClientSettings {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            max_idle_per_endpoint: max_idle,
            mesh: false,
        },
        None,
    )
}

fn get(addr: SocketAddr, http2: bool) -> Request<ProxyBody> {
    let mut req = Request::get(format!("http://{addr}/x"))
        .header("host", "billing")
        .body(body::empty())
        .unwrap();
    if http2 {
        *req.version_mut() = Version::HTTP_2;
    }
    req
}

async fn ok(client: &UpstreamClient, addr: SocketAddr, http2: bool, pools: &EndpointPools) {
    let rsp = client
        .request(get(addr, http2), http2, addr, Some(pools))
        .await
        .unwrap();
    assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
}

/// Polls `check` for up to five seconds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let (addr, counts) = open_server(false).await;
    let client = client(Duration::from_secs(30), 8);
    let pools = EndpointPools::default();
    for _ in 0..5 {
        ok(&client, addr, false, &pools).await;
    }
    assert_eq!(counts.accepted(), 1);
}

#[tokio::test]
async fn an_unread_body_is_not_pooled_and_a_read_one_is() {
    let (addr, counts) = open_server(false).await;
    let client = client(Duration::from_secs(30), 8);
    let pools = EndpointPools::default();
    let rsp = client
        .request(get(addr, false), false, addr, Some(&pools))
        .await
        .unwrap();
    // Still reading it: the next request needs a connection of its own.
    ok(&client, addr, false, &pools).await;
    assert_eq!(counts.accepted(), 2);
    drop(rsp);
    eventually("the abandoned connection closes", || counts.closed() == 1).await;
    ok(&client, addr, false, &pools).await;
    assert_eq!(counts.accepted(), 2, "the read one was reused");
}

#[tokio::test]
async fn at_most_max_idle_connections_are_kept_and_dropping_the_pool_closes_them() {
    let (gate, rx) = tokio::sync::watch::channel(0);
    let (addr, counts) = server(false, rx).await;
    let client = Arc::new(client(Duration::from_secs(30), 2));
    let pools = Arc::new(EndpointPools::default());
    let tries: Vec<_> = (0..4)
        .map(|_| {
            let (client, pools) = (Arc::clone(&client), Arc::clone(&pools));
            tokio::spawn(async move { ok(&client, addr, false, &pools).await })
        })
        .collect();
    eventually("four requests in flight", || counts.requests() == 4).await;
    gate.send_replace(usize::MAX);
    for t in tries {
        t.await.unwrap();
    }
    assert_eq!(counts.accepted(), 4);
    eventually("two of four connections close", || counts.closed() == 2).await;
    drop(pools);
    eventually("the idle ones close with the pool", || counts.closed() == 4).await;
}

/// A server that answers one request per connection as if keeping it
/// alive, then closes it.
async fn closing_server() -> (SocketAddr, Arc<Counts>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    });
    (addr, counts)
}

#[tokio::test]
async fn a_connection_the_server_closed_is_not_reused() {
    let (addr, counts) = closing_server().await;
    let client = client(Duration::from_secs(30), 8);
    let pool = Arc::new(client.pool(addr));
    for _ in 0..3 {
        let rsp = pool.send(get(addr, false), false).await.unwrap();
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        eventually("the pool notices the close", || pool.is_empty()).await;
    }
    assert_eq!(counts.accepted(), 3);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let (addr, counts) = open_server(false).await;
    let client = client(Duration::from_millis(200), 8);
    let pools = EndpointPools::default();
    ok(&client, addr, false, &pools).await;
    eventually("the idle connection closes", || counts.closed() == 1).await;
    ok(&client, addr, false, &pools).await;
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn http2_requests_share_a_connection_until_the_peers_stream_limit() {
    let (gate, rx) = tokio::sync::watch::channel(0);
    let (addr, counts) = server_with_streams(true, rx, 30).await;
    let client = Arc::new(client(Duration::from_secs(30), 8));
    let pools = Arc::new(EndpointPools::default());
    // `n` requests all in flight at once, then answered.
    let run = |n: usize| {
        let target = counts.requests() + n;
        let tries: Vec<_> = (0..n)
            .map(|_| {
                let (client, pools) = (Arc::clone(&client), Arc::clone(&pools));
                tokio::spawn(async move { ok(&client, addr, true, &pools).await })
            })
            .collect();
        let (counts, gate) = (Arc::clone(&counts), gate.clone());
        async move {
            eventually("all in flight", || counts.requests() == target).await;
            gate.send_replace(target);
            for t in tries {
                t.await.unwrap();
            }
        }
    };
    run(20).await;
    assert_eq!(counts.accepted(), 1, "20 streams: one connection");
    // The server allows 30 streams per connection (its SETTINGS).
    let over = 50;
    run(over).await;
    assert_eq!(counts.accepted(), 2, "{over} streams: a second connection");
}

async fn outcome(client: &UpstreamClient, addr: SocketAddr, http2: bool) -> Outcome {
    let sent = client.request(get(addr, http2), http2, addr, None).await;
    let result = sent.map_err(|e| send_error(addr, e));
    outcome_of(&result).unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = client(Duration::from_secs(30), 8);
    assert_eq!(outcome(&client, addr, false).await, Outcome::ConnectFailure);
}

#[tokio::test]
async fn a_connection_closed_before_the_response_is_a_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        drop(stream);
    });
    let client = client(Duration::from_secs(30), 8);
    assert_eq!(outcome(&client, addr, false).await, Outcome::Reset);
}

/// An HTTP/2 server that resets every stream with `reason`.
async fn h2_resetting(reason: h2::Reason) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(stream).await.unwrap();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(reason);
        }
    });
    addr
}

#[tokio::test]
async fn stream_resets_are_told_apart() {
    let client = client(Duration::from_secs(30), 8);
    let refused = h2_resetting(h2::Reason::REFUSED_STREAM).await;
    assert_eq!(
        outcome(&client, refused, true).await,
        Outcome::RefusedStream
    );
    let internal = h2_resetting(h2::Reason::INTERNAL_ERROR).await;
    assert_eq!(outcome(&client, internal, true).await, Outcome::Reset);
}

/// An HTTP/2 server (the `h2` crate's) whose every stream answers with
/// `answer`, counting connections.
async fn h2_server<F, Fut>(answer: F) -> (SocketAddr, Arc<Counts>)
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let (c, answer) = (Arc::clone(&c), answer.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(stream).await.unwrap();
                while let Some(Ok((req, respond))) = conn.accept().await {
                    c.requests.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(answer.clone()(req, respond));
                }
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// Echoes the request's body and trailers back.
async fn echo(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let mut body = req.into_body();
    let mut send = respond.send_response(Response::new(()), false).unwrap();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        body.flow_control().release_capacity(data.len()).unwrap();
        send.send_data(data, false).unwrap();
    }
    match body.trailers().await.unwrap() {
        Some(trailers) => send.send_trailers(trailers).unwrap(),
        None => send.send_data(Bytes::new(), true).unwrap(),
    }
}

#[tokio::test]
async fn http2_request_and_response_bodies_stream_with_their_trailers() {
    let (addr, _) = h2_server(echo).await;
    let client = client(Duration::from_secs(30), 8);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(1);
    let mut rx = rx;
    let body =
        http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut req = Request::post(format!("http://{addr}/echo"))
        .body(body::boxed(body))
        .unwrap();
    *req.version_mut() = Version::HTTP_2;
    let sent = tokio::spawn(async move {
        // The body comes after the request went out: it is piped.
        for chunk in ["one ", "two ", "three"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let frame = http_body::Frame::data(Bytes::from_static(chunk.as_bytes()));
            tx.send(Ok(frame)).await.unwrap();
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(http_body::Frame::trailers(trailers)))
            .await
            .unwrap();
    });
    let rsp = client.request(req, true, addr, None).await.unwrap();
    let collected = rsp.into_body().collect().await.unwrap();
    sent.await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "one two three");
}

#[tokio::test]
async fn a_dropped_http2_response_resets_its_stream_and_frees_its_place() {
    let (reset_tx, mut reset_rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, counts) = h2_server(move |_req, mut respond| {
        let reset_tx = reset_tx.clone();
        async move {
            // A body that never ends, until the client gives up on it.
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(Bytes::from_static(b"first"), false).unwrap();
            let reason = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
            reset_tx.send(reason.unwrap()).unwrap();
        }
    })
    .await;
    let client = client(Duration::from_secs(30), 8);
    let pool = Arc::new(client.pool(addr));
    for _ in 0..3 {
        let rsp = pool.send(get(addr, true), true).await.unwrap();
        let mut body = rsp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        drop(body);
        let reason = tokio::time::timeout(Duration::from_secs(5), reset_rx.recv())
            .await
            .unwrap();
        assert_eq!(reason, Some(h2::Reason::CANCEL));
    }
    assert_eq!(counts.accepted(), 1, "one connection throughout");
    assert!(
        super::lock(&pool.http2)
            .iter()
            .all(|c| c.activity.in_use() == 0),
        "every stream's place was given back"
    );
}

#[tokio::test]
async fn http2_connections_close_when_idle_and_with_their_pool() {
    let (addr, counts) = h2_server(echo).await;
    let client = client(Duration::from_millis(200), 8);
    let pools = EndpointPools::default();
    let send = |pools: &EndpointPools| client.request(get(addr, true), true, addr, Some(pools));
    send(&pools)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    eventually("the idle connection closes", || counts.closed() == 1).await;
    send(&pools)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(counts.accepted(), 2, "a closed connection is not reused");
    let long = self::client(Duration::from_secs(30), 8);
    let kept = EndpointPools::default();
    long.request(get(addr, true), true, addr, Some(&kept))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    drop(kept);
    eventually("the connection closes with its pool", || {
        counts.closed() == 3
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_whose_pings_go_unanswered_is_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(stream).await.unwrap();
        let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
        // A response that stays open...
        let _send = respond.send_response(Response::new(()), false).unwrap();
        // ...sent, then a peer that stops reading (and so answering pings).
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.accept()).await;
        std::future::pending::<()>().await;
        drop(conn);
    });
    let client = client(Duration::from_secs(3600), 8);
    let pool = Arc::new(client.pool(addr));
    let rsp = pool.send(get(addr, true), true).await.unwrap();
    let started = tokio::time::Instant::now();
    let read = rsp.into_body().collect().await;
    assert!(read.is_err(), "the stream failed with its connection");
    let after = started.elapsed();
    // A ping after 30 s with the stream open, unanswered for 10 s.
    assert!(
        after >= Duration::from_secs(39) && after <= Duration::from_secs(45),
        "closed after {after:?}"
    );
    eventually("the pool drops the connection", || pool.is_empty()).await;
}
