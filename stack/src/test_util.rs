//! Mock services for the layers' unit tests (`tower-test`), failing with
//! [`ProxyError`] as the layers' inner services do.

use std::time::Duration;

use tower::ServiceExt;
use tower::util::MapErr;
use tower_test::mock;

use weft_core::body::BoxError;
use weft_core::error::ProxyError;

pub type MockService<Req, Rsp> = MapErr<mock::Mock<Req, Rsp>, fn(BoxError) -> ProxyError>;
pub type Handle<Req, Rsp> = mock::Handle<Req, Rsp>;

fn upstream_failed(_: BoxError) -> ProxyError {
    ProxyError::NoAuthority
}

/// A mock inner service and its handle.
pub fn pair<Req, Rsp>() -> (MockService<Req, Rsp>, Handle<Req, Rsp>) {
    let (service, handle) = mock::pair();
    (
        service.map_err(upstream_failed as fn(BoxError) -> ProxyError),
        handle,
    )
}

/// The request the inner service got, if one arrived (without waiting).
pub async fn arrived<Req, Rsp>(
    handle: &mut Handle<Req, Rsp>,
) -> Option<(Req, mock::SendResponse<Rsp>)> {
    tokio::time::timeout(Duration::ZERO, handle.next_request())
        .await
        .ok()
        .flatten()
}

/// The refusal a call ended with (its response need not be `Debug`).
pub fn refusal<T>(result: Result<T, ProxyError>) -> ProxyError {
    match result {
        Err(error) => error,
        Ok(_) => panic!("expected a refusal, the request went through"),
    }
}

/// Endpoint clients answering with a fixed status per endpoint, logging
/// which endpoint each try went to.
#[derive(Debug, Clone, Default)]
pub struct FakeEndpoints {
    statuses: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, http::StatusCode>>,
    >,
    log: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    delays:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Duration>>>,
}

impl FakeEndpoints {
    pub fn answer(&self, endpoint: std::net::SocketAddr, status: u16) {
        let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(endpoint, status);
    }

    /// Answer after `delay` (tokio's clock: paused in tests).
    pub fn delay(&self, endpoint: std::net::SocketAddr, delay: Duration) {
        self.delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(endpoint, delay);
    }

    /// The endpoints tries went to, in order (and forgets them).
    pub fn tries(&self) -> Vec<std::net::SocketAddr> {
        std::mem::take(
            &mut *self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl crate::NewService<std::sync::Arc<weft_discovery::balance::Endpoint>> for FakeEndpoints {
    type Service = FakeEndpoint;

    fn new_service(
        &self,
        endpoint: std::sync::Arc<weft_discovery::balance::Endpoint>,
    ) -> FakeEndpoint {
        FakeEndpoint {
            addr: endpoint.addr(),
            all: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeEndpoint {
    addr: std::net::SocketAddr,
    all: FakeEndpoints,
}

impl<B> tower::Service<http::Request<B>> for FakeEndpoint {
    type Response = http::Response<http_body_util::Full<bytes::Bytes>>;
    type Error = ProxyError;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, ProxyError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(context) = crate::context::RequestContext::of(&req) {
            context.set_endpoint(self.addr);
        }
        self.all
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(self.addr);
        let status = self
            .all
            .statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&self.addr)
            .copied()
            .unwrap_or(http::StatusCode::OK);
        let mut rsp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
        *rsp.status_mut() = status;
        let delay = self
            .all
            .delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&self.addr)
            .copied();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            Ok(rsp)
        })
    }
}

/// A compiled outbound policy from policy-file text (after `service = ...`).
pub fn outbound_policy(text: &str) -> std::sync::Arc<weft_core::policy::OutboundPolicy> {
    let src = format!("service = \"billing\"\n{text}");
    let policy = weft_config::parse_policy(&src, std::path::Path::new("billing.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::sync::Arc::new(weft_core::policy::OutboundPolicy::new(
        Some(&policy),
        std::sync::Arc::new(weft_core::stats::Stats::default()),
    ))
}
