//! The activator of `outbound.cold_start.activate`: tells a platform that a
//! service scaled to zero needs an instance.
//!
//! The cold-start layer (`weft_stack::cold_start`) decides when (the first
//! held call of a cold start, at most once per `hold` window per service);
//! this module makes the call, in a task of the sidecar's tracker so that
//! it never delays or fails the held calls: `POST` to the URL with the
//! service's name in a `weft-service` header and a JSON body
//! (`{"service":"lazy"}`), through a plaintext client of `weft-transport`
//! (HTTP/1.1), the host resolved by the sidecar's DNS discovery (`[dns]`)
//! unless it is an IP literal, all within [`ACTIVATOR_TIMEOUT`]. Every call
//! is counted in `weft_activator_calls_total{service,outcome}`; a failure is
//! logged as a warning.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::Full;
use tokio_util::task::TaskTracker;

use crate::telemetry::Metrics;
use crate::telemetry::metrics::ActivatorOutcome;
use weft_config::ActivatorUrl;
use weft_core::body;
use weft_discovery::dns::DnsDiscovery;
use weft_stack::cold_start::Activator;
use weft_transport::client::{ClientSettings, UpstreamClient};

/// The longest an activator call may take, lookup and connect included.
pub const ACTIVATOR_TIMEOUT: Duration = Duration::from_secs(2);

/// The header naming the service that needs an instance.
pub const WEFT_SERVICE: &str = "weft-service";

/// The client activator calls share (one per sidecar).
#[derive(Debug)]
pub struct ActivatorClient {
    client: UpstreamClient,
}

impl Default for ActivatorClient {
    fn default() -> Self {
        Self {
            client: UpstreamClient::new(
                ClientSettings {
                    connect_timeout: ACTIVATOR_TIMEOUT,
                    idle_timeout: Duration::from_secs(30),
                    max_idle_per_endpoint: 1,
                    mesh: false,
                },
                None,
            ),
        }
    }
}

/// The sidecar's [`Activator`]: calls over `client`, names resolved by `dns`.
#[derive(Debug, Clone)]
pub struct HttpActivator {
    pub client: Arc<ActivatorClient>,
    pub dns: Arc<DnsDiscovery>,
    pub metrics: Arc<Metrics>,
    pub tasks: TaskTracker,
}

impl Activator for HttpActivator {
    fn activate(&self, service: &Arc<str>, url: &ActivatorUrl) {
        let this = self.clone();
        let service = Arc::clone(service);
        let url = url.clone();
        self.tasks.spawn(async move {
            let outcome = match tokio::time::timeout(ACTIVATOR_TIMEOUT, this.call(&service, &url))
                .await
            {
                Ok(Ok(())) => ActivatorOutcome::Success,
                Ok(Err(problem)) => {
                    tracing::warn!(service.name = %service, activator.url = url.as_str(), %problem, "activator call failed");
                    ActivatorOutcome::Failure
                }
                Err(_) => {
                    tracing::warn!(service.name = %service, activator.url = url.as_str(), timeout_ms = ACTIVATOR_TIMEOUT.as_millis(), "activator call timed out");
                    ActivatorOutcome::Timeout
                }
            };
            this.metrics.activator_call(&service, outcome);
        });
    }
}

impl HttpActivator {
    async fn call(&self, service: &str, url: &ActivatorUrl) -> Result<(), String> {
        let uri: Uri = url.as_str().parse().map_err(|e| format!("{e}"))?;
        let host = uri.host().ok_or("the URL has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let ip = host.trim_start_matches('[').trim_end_matches(']');
        let endpoint = match ip.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => {
                let target = self
                    .dns
                    .resolve(host, Some(port))
                    .await
                    .map_err(|e| e.to_string())?;
                let set = Arc::clone(&target.endpoints().borrow());
                set.endpoints()
                    .first()
                    .map(|e| e.addr())
                    .ok_or_else(|| format!("{host} has no address"))?
            }
        };
        let json = format!(
            "{{\"service\":{}}}",
            serde_json::Value::String(service.to_owned())
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body::boxed(Full::new(Bytes::from(json))))
            .map_err(|e| e.to_string())?;
        let headers = req.headers_mut();
        if let Some(authority) = uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, value);
        }
        if let Ok(value) = HeaderValue::from_str(service) {
            headers.insert(WEFT_SERVICE, value);
        }
        let rsp = self
            .client
            .client
            .request(req, false, endpoint, None)
            .await
            .map_err(|e| weft_core::error::chain(&e))?;
        let status = rsp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the activator answered {status}"))
        }
    }
}
