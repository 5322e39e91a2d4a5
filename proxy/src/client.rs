//! Connections to endpoints: pooled, kept alive, HTTP/1.1 or HTTP/2.
//!
//! One [`UpstreamClient`] per service (so a service's connect timeout and pool
//! settings apply to it alone) holds two hyper-util pooled clients: HTTP/1.1 with a
//! pool of keep-alive connections per endpoint, and HTTP/2 prior knowledge (h2c)
//! multiplexing requests over one connection per endpoint. Pools are keyed by the
//! endpoint address, which is always an IP literal here: names were resolved by
//! discovery before a request reaches this stage, so the connector never calls the
//! system resolver.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;

/// Settings of one upstream client; equal settings let a reload keep the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
}

/// Pooled HTTP/1.1 and HTTP/2 clients for one service.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    settings: ClientSettings,
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
}

impl UpstreamClient {
    pub fn new(settings: ClientSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);

        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_endpoint)
            // The Host header is the app's (the logical name); never rewrite it to
            // the endpoint address.
            .set_host(false);
        let http1 = builder.build(connector.clone());
        builder
            .http2_only(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10));
        let http2 = builder.build(connector);
        Self {
            settings,
            http1,
            http2,
        }
    }

    pub fn settings(&self) -> ClientSettings {
        self.settings
    }

    /// Send `req` (its URI already names the endpoint) over HTTP/2 or HTTP/1.1.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if http2 {
            self.http2.request(req).await
        } else {
            self.http1.request(req).await
        }
    }
}
