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
async fn http2_requests_share_a_connection_until_its_stream_limit() {
    let (gate, rx) = tokio::sync::watch::channel(0);
    let (addr, counts) = server(true, rx).await;
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
    let over = super::MAX_STREAMS_PER_CONNECTION as usize + 20;
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
