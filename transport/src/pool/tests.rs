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
}

impl Counts {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A server answering `ok` after `delay`, HTTP/1.1 or HTTP/2 (prior
/// knowledge).
async fn server(http2: bool, delay: Duration) -> (SocketAddr, Arc<Counts>) {
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
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
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
    let (addr, counts) = server(false, Duration::ZERO).await;
    let client = client(Duration::from_secs(30), 8);
    let pools = EndpointPools::default();
    for _ in 0..5 {
        ok(&client, addr, false, &pools).await;
    }
    assert_eq!(counts.accepted(), 1);
}

#[tokio::test]
async fn an_unread_body_is_not_pooled_and_a_read_one_is() {
    let (addr, counts) = server(false, Duration::ZERO).await;
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
    let (addr, counts) = server(false, Duration::from_millis(50)).await;
    let client = Arc::new(client(Duration::from_secs(30), 2));
    let pools = Arc::new(EndpointPools::default());
    let tries: Vec<_> = (0..4)
        .map(|_| {
            let (client, pools) = (Arc::clone(&client), Arc::clone(&pools));
            tokio::spawn(async move { ok(&client, addr, false, &pools).await })
        })
        .collect();
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
    let pools = EndpointPools::default();
    for _ in 0..3 {
        ok(&client, addr, false, &pools).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts.accepted(), 3);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let (addr, counts) = server(false, Duration::ZERO).await;
    let client = client(Duration::from_millis(200), 8);
    let pools = EndpointPools::default();
    ok(&client, addr, false, &pools).await;
    eventually("the idle connection closes", || counts.closed() == 1).await;
    ok(&client, addr, false, &pools).await;
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn http2_requests_share_a_connection_until_its_stream_limit() {
    let (addr, counts) = server(true, Duration::from_millis(300)).await;
    let client = Arc::new(client(Duration::from_secs(30), 8));
    let pools = Arc::new(EndpointPools::default());
    let run = |n: usize| {
        let tries: Vec<_> = (0..n)
            .map(|_| {
                let (client, pools) = (Arc::clone(&client), Arc::clone(&pools));
                tokio::spawn(async move { ok(&client, addr, true, &pools).await })
            })
            .collect();
        async move {
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
