//! The outbound path: the local app calls a service by its logical name.
//!
//! Stages, in order:
//! 1. destination: the request's authority ([`Destination`]);
//! 2. discovery: a directory service, an IP literal, or a name resolved through DNS
//!    (waiting, bounded, for the first answer);
//! 3. balancing: one endpoint picked by the service's balancer;
//! 4. forwarding: the request goes to that endpoint over a pooled connection; the
//!    endpoint's in-flight count lasts until the response body ends.
//!
//! Failures at any stage become responses in one place ([`error_response`]); this
//! service itself never fails, so hyper always has something to send.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use weft_config::Protocol;

use crate::balance::{Balancer, Endpoint};
use crate::body::{self, ProxyBody, Tracked};
use crate::client::UpstreamClient;
use crate::discovery::EndpointSet;
use crate::error::{ProxyError, error_response};
use crate::forward::{Hop, forward};
use crate::state::Shared;
use crate::target::Destination;

/// Port assumed for an IP literal without one.
const DEFAULT_PORT: u16 = 80;

/// The outbound listener's service (one clone per connection).
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>, client_addr: SocketAddr) -> Self {
        Self {
            shared,
            client_addr,
        }
    }

    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        match self.proxy(req).await {
            Ok(rsp) => rsp,
            Err(error) => {
                tracing::info!(
                    client.addr = %self.client_addr,
                    http.method = %method,
                    http.path = %path,
                    reason = error.reason(),
                    error = %error,
                    "outbound request refused"
                );
                error_response(&error)
            }
        }
    }

    async fn proxy(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let dest = Destination::from_request(&req)?;
        let directory = self.shared.directory();

        // Discovery: which endpoints, which balancer, which connection pool.
        let (set, balancer, client, protocol, service): (
            Arc<EndpointSet>,
            &Balancer,
            &UpstreamClient,
            Protocol,
            String,
        );
        let dns_target;
        if let Some(svc) = directory.service(&dest.host) {
            set = Arc::clone(&svc.endpoints().borrow());
            balancer = &svc.balancer;
            client = &svc.client;
            protocol = svc.protocol;
            service = svc.name.to_string();
        } else if let Some(ip) = dest.ip() {
            let addr = SocketAddr::new(ip, dest.port.unwrap_or(DEFAULT_PORT));
            self.refuse_loop(addr)?;
            return self
                .send(
                    &directory.default_client,
                    Protocol::Auto,
                    Arc::new(Endpoint::new(addr, Default::default())),
                    req,
                )
                .await;
        } else {
            dns_target = directory.dns().resolve(&dest.host, dest.port).await?;
            set = Arc::clone(&dns_target.endpoints().borrow());
            balancer = &directory.dns_balancer;
            client = &directory.default_client;
            protocol = Protocol::Auto;
            service = dest.host.clone();
        }

        let endpoint = balancer
            .pick(set.endpoints(), |_| true)
            .ok_or(ProxyError::NoEndpoints { service })?;
        self.refuse_loop(endpoint.addr())?;
        self.send(client, protocol, endpoint, req).await
    }

    /// Send to one endpoint, counting it in flight until the response body ends.
    async fn send(
        &self,
        client: &UpstreamClient,
        protocol: Protocol,
        endpoint: Arc<Endpoint>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let in_flight = endpoint.start();
        let hop = Hop {
            client,
            endpoint: endpoint.addr(),
            protocol,
            tasks: &self.shared.tasks,
        };
        let rsp = forward(hop, req).await?;
        in_flight.observe_response();
        Ok(rsp.map(|b| body::boxed(Tracked::new(b, in_flight))))
    }

    /// A request addressed to this proxy's own outbound listener would loop forever.
    fn refuse_loop(&self, addr: SocketAddr) -> Result<(), ProxyError> {
        match self.shared.bound() {
            Some(b)
                if b.outbound == addr
                    || (b.outbound.ip().is_unspecified()
                        && b.outbound.port() == addr.port()
                        && addr.ip().is_loopback()) =>
            {
                Err(ProxyError::Loop {
                    listener: b.outbound,
                })
            }
            _ => Ok(()),
        }
    }
}

impl tower::Service<Request<Incoming>> for Outbound {
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
