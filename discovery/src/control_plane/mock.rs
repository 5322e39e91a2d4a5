//! A scripted control plane for the client's tests: a real gRPC server on a
//! loopback port (the generated `ControlPlaneServer` over hyper) whose
//! behaviour the test sets and whose received messages the test reads.
//!
//! - `Subscribe`: records every request. With a script
//!   ([`Mock::script`]), the first stream sends exactly what the test pushes;
//!   otherwise each request is answered like the real control plane answers
//!   a store with no services (the first in full, every added name in
//!   `removed`).
//! - `Register`: records every message; fails the first
//!   [`MockState::fail_registers`] streams with `UNAVAILABLE`, accepts the
//!   rest and acknowledges a `deregister` (unless told to hang).
//!
//! Stopping the server (or dropping it) closes the listener and drops every
//! connection at once, like a killed process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weft_api::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use weft_api::v1::register_request::Msg;
use weft_api::v1::{RegisterRequest, RegisterResponse, SubscribeRequest, SubscribeResponse};

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the mock saw, and how it behaves.
#[derive(Debug, Default)]
pub struct MockState {
    pub subscribes: AtomicUsize,
    pub registers: AtomicUsize,
    /// `Register` streams still to fail.
    pub fail_registers: AtomicUsize,
    /// Leave a `deregister` unanswered (a hung control plane).
    pub ignore_deregister: AtomicBool,
    pub subscribe_requests: Mutex<Vec<SubscribeRequest>>,
    pub register_requests: Mutex<Vec<RegisterRequest>>,
    script: Mutex<Option<mpsc::Receiver<SubscribeResponse>>>,
}

#[derive(Debug, Clone, Default)]
pub struct Mock {
    pub state: Arc<MockState>,
}

impl Mock {
    /// Makes the first `Subscribe` stream send what is pushed on the returned
    /// sender, and nothing else.
    pub fn script(&self) -> mpsc::Sender<SubscribeResponse> {
        let (tx, rx) = mpsc::channel(16);
        *self.state.script.lock().unwrap() = Some(rx);
        tx
    }

    pub fn subscribe_requests(&self) -> Vec<SubscribeRequest> {
        self.state.subscribe_requests.lock().unwrap().clone()
    }

    pub fn register_requests(&self) -> Vec<RegisterRequest> {
        self.state.register_requests.lock().unwrap().clone()
    }
}

fn stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Responses<T> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[tonic::async_trait]
impl ControlPlane for Mock {
    type RegisterStream = Responses<RegisterResponse>;
    type SubscribeStream = Responses<SubscribeResponse>;

    async fn register(
        &self,
        request: Request<Streaming<RegisterRequest>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let state = Arc::clone(&self.state);
        state.registers.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no message"))?;
        state.register_requests.lock().unwrap().push(first);
        let fail = state
            .fail_registers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(Status::unavailable("the store is unreachable"));
        }
        let (tx, rx) = mpsc::channel(4);
        let ack = RegisterResponse {
            lease_ttl_ms: 10_000,
            revision: 1,
        };
        tx.send(Ok(ack)).await.unwrap();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let deregister = matches!(message.msg, Some(Msg::Deregister(_)));
                state.register_requests.lock().unwrap().push(message);
                if deregister && !state.ignore_deregister.load(Ordering::SeqCst) {
                    let _ = tx.send(Ok(RegisterResponse::default())).await;
                    return;
                }
            }
        });
        Ok(Response::new(stream(rx)))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let state = Arc::clone(&self.state);
        state.subscribes.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let script = state.script.lock().unwrap().take();
        tokio::spawn(async move {
            let record = |r: SubscribeRequest| state.subscribe_requests.lock().unwrap().push(r);
            match script {
                Some(mut script) => loop {
                    tokio::select! {
                        request = inbound.message() => match request {
                            Ok(Some(r)) => record(r),
                            _ => return,
                        },
                        Some(push) = script.recv() => {
                            if tx.send(Ok(push)).await.is_err() {
                                return;
                            }
                        }
                    }
                },
                None => {
                    let mut full = true;
                    while let Ok(Some(r)) = inbound.message().await {
                        let reply = SubscribeResponse {
                            version: 1,
                            full,
                            services: Vec::new(),
                            removed: r.add.clone(),
                            warming: false,
                        };
                        record(r);
                        full = false;
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(stream(rx)))
    }
}

/// A running mock; stopped on drop.
#[derive(Debug)]
pub struct MockServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockServer {
    /// Serves `mock` on `addr` (port 0 for any).
    pub async fn start(mock: Mock, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let service = ControlPlaneServer::new(mock.clone());
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((io, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new()).http2_only();
                    let _ = builder.serve_connection(TokioIo::new(io), service).await;
                });
            }
            // Dropping the set aborts every connection: a killed server.
            drop(connections);
        });
        Self {
            addr,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it like a killed process: the port is free when this returns.
    pub async fn kill(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
