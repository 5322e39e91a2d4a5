//! The inbound path: other sidecars call the local app.
//!
//! Every request goes to the `[service] app` address, whatever its authority says
//! (the inbound listener is never an open proxy to other hosts). The client is
//! recorded in `x-forwarded-for` and `forwarded`; `Host` is kept. This is where the
//! service's inbound limits and mTLS attach.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, header};
use hyper::body::Incoming;
use weft_config::Protocol;

use crate::body::{self, ProxyBody};
use crate::error::{ProxyError, error_response};
use crate::forward::{Hop, forward};
use crate::headers;
use crate::state::Shared;

/// The inbound listener's service (one clone per connection).
#[derive(Debug, Clone)]
pub struct Inbound {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
}

impl Inbound {
    pub fn new(shared: Arc<Shared>, client_addr: SocketAddr) -> Self {
        Self {
            shared,
            client_addr,
        }
    }

    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        match self.proxy(req).await {
            Ok(rsp) => rsp,
            Err(error) => {
                tracing::info!(client.addr = %self.client_addr, reason = error.reason(), error = %error, "inbound request refused");
                error_response(&error)
            }
        }
    }

    async fn proxy(&self, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let directory = self.shared.directory();
        let local = directory.local.as_ref().ok_or(ProxyError::NoLocalService)?;
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        headers::add_forwarded(req.headers_mut(), self.client_addr, host.as_deref());
        let hop = Hop {
            client: &local.client,
            endpoint: local.addr,
            protocol: Protocol::Auto,
            tasks: &self.shared.tasks,
        };
        let rsp = forward(hop, req).await?;
        Ok(rsp.map(body::boxed))
    }
}

impl tower::Service<Request<Incoming>> for Inbound {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}
