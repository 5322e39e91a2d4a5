//! Fetching a sidecar's admin endpoints (`GET http://ADMIN/metrics`,
//! `/endpoints`, `/ready`): what `weftctl stat`, `edges` and `top` and the
//! web view's sampler ([`crate::ui`]) share. Each fetch is bounded in time
//! ([`TIMEOUT`], connection included) and in size; a failure is a few words
//! ("connection refused", "no answer within 2s") for a footer or a page.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::stat::Scrape;

/// How long one fetch may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest body read from a sidecar.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// What `/metrics` is asked for.
const ACCEPT_METRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

/// An HTTP/1 client for sidecars' admin listeners.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Fetcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Fetcher {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// `GET http://ADMIN/metrics`, parsed.
    pub async fn metrics(&self, admin: SocketAddr) -> Result<Scrape, String> {
        let body = self
            .get(admin, "/metrics", Some(ACCEPT_METRICS), false)
            .await?;
        let text =
            std::str::from_utf8(&body).map_err(|_| "/metrics is not UTF-8 text".to_owned())?;
        Scrape::from_text(text).map_err(|e| format!("/metrics {e}"))
    }

    /// `GET http://ADMIN/PATH`'s body; a status other than 200 is an error
    /// unless `any_status` (`/ready` says why it is not ready in a 503).
    pub async fn get(
        &self,
        admin: SocketAddr,
        path: &str,
        accept: Option<&str>,
        any_status: bool,
    ) -> Result<Bytes, String> {
        let mut req = Request::builder().uri(format!("http://{admin}{path}"));
        if let Some(accept) = accept {
            req = req.header(header::ACCEPT, accept);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let rsp = self.client.request(req).await.map_err(|e| reason(&e))?;
            let status = rsp.status();
            if status != StatusCode::OK && !any_status {
                return Err(format!("GET {path}: {status}"));
            }
            Limited::new(rsp.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("reading {path}: {e}"))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", TIMEOUT.as_secs_f64())))
    }
}

/// "connection refused", "connect timed out", ...: the innermost cause,
/// short.
pub fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    loop {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => return "connect timed out".to_owned(),
                _ => {}
            }
        }
        match cause.source() {
            Some(next) => cause = next,
            None => return cause.to_string(),
        }
    }
}
