//! The admin listener: health, readiness, the effective configuration, the
//! directory as this sidecar sees it, and reload.
//!
//! | path | meaning |
//! |---|---|
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 when listeners are bound, the directory is loaded, the local app answers its health check (`[service] health`) and, with a control plane, its first snapshot arrived (or `[control_plane] ready_timeout` passed, or it was found unreachable with a cached snapshot); 503 otherwise (and while draining), the body saying why |
//! | `GET /config` | the effective configuration and its version, JSON |
//! | `GET /endpoints` | every service's endpoints and their state, and its policy's service-side keys (whether anything may enforce them), JSON |
//! | `GET /metrics` | Prometheus text (`docs/telemetry.md`) |
//! | `POST /reload` | re-read the bootstrap file: 200 `{"version": N}`, or 400 with the error (the old config stays) |

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};
use weft_config::Policy;

use crate::state::{LiveState, Readiness};
use weft_core::body::{self, ProxyBody};
use weft_core::limits::EndpointCap;
use weft_discovery::balance::Endpoint;
use weft_discovery::control_plane::{ConnectionState, ControlPlaneClient};
use weft_discovery::directory::{Directory, LocalApp, MeshService};
use weft_discovery::dns::{DnsTarget, Status};
use weft_discovery::enforcement::{self, Unenforced};

#[derive(Debug, Clone)]
pub struct Admin {
    shared: Arc<LiveState>,
}

impl Admin {
    pub fn new(shared: Arc<LiveState>) -> Self {
        Self { shared }
    }

    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET | &Method::HEAD, "/ready") => {
                let readiness = self.shared.readiness();
                let status = if readiness == Readiness::Ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, &format!("{}\n", readiness.as_str()))
            }
            (&Method::GET, "/config") => self.config(),
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/endpoints") => self.endpoints(),
            (&Method::POST, "/reload") => match self.shared.reload().await {
                Ok(version) => {
                    tracing::info!(
                        config.version = version,
                        "configuration reloaded (admin API)"
                    );
                    json_response(StatusCode::OK, &json!({ "version": version }))
                }
                Err(error) => {
                    tracing::error!(error = %error, "reload rejected (admin API); keeping the current configuration");
                    text(StatusCode::BAD_REQUEST, &format!("{error}\n"))
                }
            },
            (_, "/live" | "/ready" | "/config" | "/endpoints" | "/metrics" | "/reload") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live, /ready, /config, /endpoints, /metrics or POST /reload\n",
            ),
        }
    }

    fn metrics(&self) -> Response<ProxyBody> {
        match self.shared.metrics.render(self.shared.as_ref()) {
            Ok(text) => {
                let mut rsp = Response::new(body::full(text));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(weft_telemetry::CONTENT_TYPE),
                );
                rsp
            }
            Err(error) => {
                tracing::error!(%error, "/metrics");
                text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n"))
            }
        }
    }

    fn config(&self) -> Response<ProxyBody> {
        let snapshot = self.shared.config();
        let value = json!({
            "version": snapshot.version,
            "loaded_at": snapshot.loaded_at,
            "path": snapshot.loaded.path,
            "bound": self.shared.bound(),
            "config": snapshot.loaded.bootstrap,
            "policies": snapshot.loaded.policies,
        });
        json_response(StatusCode::OK, &value)
    }

    fn endpoints(&self) -> Response<ProxyBody> {
        let config = self.shared.config();
        let directory = self.shared.directory();
        let now = Instant::now();
        let unenforced = enforcement::unenforced(&config.loaded);
        let mut services: Vec<Value> = directory
            .services()
            .into_iter()
            .map(|svc| {
                let policy = policy_json(
                    config.loaded.policies.get(&svc.name),
                    unenforced.iter().find(|u| u.service == svc.name),
                );
                service_json(svc, "static", policy, now)
            })
            .collect();
        if let Some(remote) = self.shared.remote() {
            let pushed = Arc::clone(&remote.client().snapshot().borrow());
            for svc in remote.services() {
                // Pushed instances are sidecars' registrations: their own
                // sidecars enforce the service-side keys.
                let policy = policy_json(
                    pushed
                        .services
                        .get(svc.name.as_str())
                        .and_then(|s| s.policy.as_deref()),
                    None,
                );
                services.push(service_json(&svc, "control-plane", policy, now));
            }
        }
        for target in directory.dns().targets() {
            services.push(dns_json(&target, &directory, now));
        }
        let local = directory
            .local
            .as_ref()
            .map(|l| local_json(l, self.shared.app_health().as_str()));
        // The certificate in force (never the key).
        let default_inbound = config
            .loaded
            .bootstrap
            .tls
            .as_ref()
            .map(|t| t.default_inbound);
        let tls = self.shared.tls.as_ref().map(|tls| {
            let m = tls.current();
            json!({
                "identity": m.identity,
                "serial": m.serial,
                "not_after": m.not_after,
                "default_inbound": default_inbound,
            })
        });
        json_response(
            StatusCode::OK,
            &json!({
                "version": config.version,
                "tls": tls,
                "local": local,
                "services": services,
                "dns_counters": directory.default_policy.stats.to_json(),
                "control_plane": self.shared.remote().map(|r| control_plane_json(r.client())),
            }),
        )
    }
}

/// A static or pushed service's `/endpoints` entry.
fn service_json(svc: &MeshService, source: &str, policy: Value, now: Instant) -> Value {
    let set = Arc::clone(&svc.endpoints().borrow());
    let cap = svc.policy.endpoint_cap();
    json!({
        "name": svc.name,
        "source": source,
        "load_balancer": svc.balancer.strategy(),
        "protocol": svc.protocol,
        "tls": if svc.client.is_mesh() { "mesh" } else { "none" },
        "endpoints": set.endpoints().iter().map(|e| endpoint_json(e, cap, now)).collect::<Vec<_>>(),
        "counters": svc.policy.stats.to_json(),
        "policy": policy,
        // Calls held now for a cold start (null without `outbound.cold_start`).
        "cold_start_held": svc.policy.cold_start.as_ref().map(|gate| gate.held()),
    })
}

/// A DNS name's `/endpoints` entry.
fn dns_json(target: &DnsTarget, directory: &Directory, now: Instant) -> Value {
    let set = Arc::clone(&target.endpoints().borrow());
    let status = match target.status() {
        Status::Pending => json!("pending"),
        Status::Resolved => json!("resolved"),
        Status::NotFound => json!("not-found"),
        Status::Failed(message) => json!({ "failed": message }),
    };
    json!({
        "name": format!("{}:{}", target.host(), target.port()),
        "source": "dns",
        "dns_status": status,
        "load_balancer": directory.dns_balancer.strategy(),
        "protocol": "auto",
        "endpoints": set.endpoints().iter().map(|e| endpoint_json(e, EndpointCap::None, now)).collect::<Vec<_>>(),
    })
}

/// The local service's `/endpoints` entry: its app and inbound limits.
fn local_json(l: &LocalApp, app_health: &str) -> Value {
    let p = &l.policy;
    json!({
        "name": l.name,
        "app": l.addr,
        "app_health": app_health,
        "policy_source": l.policy_source,
        "share": l.share.get(),
        "in_flight": p
            .concurrency
            .as_ref()
            .map(|c| c.in_flight())
            .or_else(|| p.adaptive.as_ref().map(|a| a.in_flight())),
        "queued": p.concurrency.as_ref().map(|c| c.waiting()),
        "max_concurrency": p.concurrency.as_ref().map(|c| c.max()),
        "adaptive_limit": p.adaptive.as_ref().map(|a| a.limit()),
        "rate_limit": p.rate_limit.as_ref().map(|r| {
            let (per_second, burst) = r.effective();
            json!({ "per_second": per_second, "burst": burst })
        }),
        "allow": p.allow.as_ref().map(|a| a.callers().iter().map(ToString::to_string).collect::<Vec<_>>()),
        "allow_plaintext": p.allow_plaintext,
        "counters": p.stats.to_json(),
    })
}

/// The control-plane session's `/endpoints` entry.
fn control_plane_json(client: &ControlPlaneClient) -> Value {
    let (rejected, last_rejection) = client.rejected();
    let state = match client.state() {
        ConnectionState::Connecting => json!({ "state": "connecting" }),
        ConnectionState::Connected { address } => {
            json!({ "state": "connected", "address": address })
        }
        ConnectionState::Disconnected { since, error } => json!({
            "state": "disconnected",
            "for_ms": since.elapsed().as_millis() as u64,
            "error": error,
        }),
    };
    json!({
        "connection": state,
        "version": client.snapshot().borrow().version,
        "rejected": rejected,
        "last_rejection": last_rejection,
    })
}

/// The policy part of a service's `/endpoints` entry: each service-side key
/// of the caller's copy of its policy, and whether anything may enforce it
/// ([`enforcement`]); `warning` is the line `weft-proxy check` prints, or null.
fn policy_json(policy: Option<&Policy>, unenforced: Option<&Unenforced>) -> Value {
    let state = match unenforced {
        Some(_) => enforcement::NOT_ENFORCED_HERE,
        None => enforcement::BY_OWN_SIDECARS,
    };
    let keys: serde_json::Map<String, Value> = policy
        .map(Policy::service_side_keys)
        .unwrap_or_default()
        .into_iter()
        .map(|key| (key, json!(state)))
        .collect();
    json!({
        "service_side_keys": keys,
        "warning": unenforced.map(ToString::to_string),
    })
}

fn endpoint_json(e: &Endpoint, cap: EndpointCap<'_>, now: Instant) -> Value {
    let ejected_for = e.outlier().ejected_for(now);
    let state = if !e.health().is_healthy() {
        "unhealthy"
    } else if ejected_for.is_some() {
        "ejected"
    } else if e.cap(cap).is_some_and(|c| e.in_flight() >= c) {
        "saturated"
    } else {
        "active"
    };
    let adaptive_limit = match cap {
        EndpointCap::Adaptive(settings) => Some(e.adaptive(settings).limit(settings)),
        _ => None,
    };
    json!({
        "address": e.addr(),
        "state": state,
        "health": e.health(),
        "ejected_for_ms": ejected_for.map(|d| d.as_millis() as u64),
        "ejections": e.outlier().ejections(),
        "in_flight": e.in_flight(),
        "requests": e.requests(),
        "latency_ewma_ms": e.latency_estimate(now).as_secs_f64() * 1000.0,
        "metadata": e.metadata(),
        "adaptive_limit": adaptive_limit,
    })
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut rsp = Response::new(body::full(body.to_owned()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let mut rsp = Response::new(body::full(bytes));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

impl tower::Service<Request<Incoming>> for Admin {
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
