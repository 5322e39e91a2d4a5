//! The sidecar's check of its own app (`[service] health`).
//!
//! One task probes the app every `interval`: a TCP connect to `[service] app`
//! by default, or an HTTP/1.1 `GET path` that must answer 200-399 within
//! `timeout`. Each result goes through [`Checker`], a small state machine:
//!
//! ```text
//!            healthy_after passes            unhealthy_after failures
//! Starting ───────────────────────▶ Healthy ─────────────────────────▶ Unhealthy
//!                                      ▲                                   │
//!                                      └────── healthy_after passes ───────┘
//! ```
//!
//! `Starting` never becomes `Unhealthy`: an app that has not answered yet is
//! waited for (the sidecar is not ready and does not register), not reported.
//! With checking off (`enabled = false`) the state is [`AppHealth::Unchecked`],
//! which counts as healthy everywhere. The state is published in a `watch`
//! channel that `/ready`, the registration (which waits for the app, then
//! reports every change to the control plane) and the metrics read.
//!
//! The settings are read again before every probe, so a reload that changes
//! `[service] app` or `health` takes effect at the next check. They come from
//! whatever config snapshot the sidecar publishes ([`ServiceConfig`]); this
//! module knows nothing else of the sidecar.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_config::{HealthCheck, LocalService};

/// A configuration snapshot the check reads `[service]` from (the sidecar's
/// effective configuration implements it).
pub trait ServiceConfig: Send + Sync + 'static {
    /// `[service]`, when the sidecar fronts a local app.
    fn local_service(&self) -> Option<&LocalService>;
}

/// The local app's health, as this sidecar's check finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHealth {
    /// Not answered yet since start: not ready, not registered.
    Starting,
    /// Answers its check.
    Healthy,
    /// Answered once, then stopped: not ready, unhealthy in the directory.
    Unhealthy,
    /// Checking is off (`enabled = false`), or there is no `[service]`.
    Unchecked,
}

impl AppHealth {
    /// True when the app may take traffic: healthy or not checked.
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Healthy | Self::Unchecked)
    }

    /// True once the app has answered (or is not checked): the instance may
    /// register.
    pub fn has_started(self) -> bool {
        self != Self::Starting
    }

    /// What the directory says about the instance.
    pub fn directory_health(self) -> weft_api::Health {
        if self.is_serving() {
            weft_api::Health::Healthy
        } else {
            weft_api::Health::Unhealthy
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Unchecked => "unchecked",
        }
    }
}

/// The thresholds of [`Checker`]; both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

impl From<&HealthCheck> for Thresholds {
    fn from(h: &HealthCheck) -> Self {
        Self {
            unhealthy_after: h.unhealthy_after.max(1),
            healthy_after: h.healthy_after.max(1),
        }
    }
}

/// The state machine: consecutive passes and failures against the
/// thresholds. Pure; the task feeds it.
#[derive(Debug, Clone)]
pub struct Checker {
    state: AppHealth,
    passes: u32,
    failures: u32,
}

impl Default for Checker {
    fn default() -> Self {
        Self {
            state: AppHealth::Starting,
            passes: 0,
            failures: 0,
        }
    }
}

impl Checker {
    pub fn state(&self) -> AppHealth {
        self.state
    }

    /// Records one probe's result; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool, thresholds: Thresholds) -> Option<AppHealth> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
        }
        let next = match self.state {
            AppHealth::Starting | AppHealth::Unhealthy | AppHealth::Unchecked
                if self.passes >= thresholds.healthy_after =>
            {
                AppHealth::Healthy
            }
            AppHealth::Healthy if self.failures >= thresholds.unhealthy_after => {
                AppHealth::Unhealthy
            }
            // A checker turned back on after `Unchecked` starts over.
            AppHealth::Unchecked => AppHealth::Starting,
            state => state,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }

    /// Checking was turned off.
    pub fn uncheck(&mut self) -> Option<AppHealth> {
        self.passes = 0;
        self.failures = 0;
        (self.state != AppHealth::Unchecked).then(|| {
            self.state = AppHealth::Unchecked;
            AppHealth::Unchecked
        })
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("GET {path} answered {status}")]
    Status { path: String, status: u16 },
    #[error("GET {path}: {source}")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {path}: the app closed the connection before answering")]
    Closed { path: String },
    #[error("GET {path}: invalid request: {source}")]
    Request {
        path: String,
        #[source]
        source: http::Error,
    },
}

/// One probe of the app at `app`: a TCP connect, or `GET path` answered
/// 200-399; bounded by `timeout`.
pub async fn probe(
    app: SocketAddr,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout, probe_unbounded(app, path))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn probe_unbounded(app: SocketAddr, path: Option<&str>) -> Result<(), ProbeError> {
    let tcp = TcpStream::connect(app)
        .await
        .map_err(|source| ProbeError::Connect { addr: app, source })?;
    let Some(path) = path else {
        return Ok(());
    };
    let http = |source| ProbeError::Http {
        path: path.to_owned(),
        source,
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    let request = Request::get(path)
        .header(header::HOST, app.to_string())
        .header(header::USER_AGENT, "weft-health/1")
        .header(header::CONNECTION, "close")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|source| ProbeError::Request {
            path: path.to_owned(),
            source,
        })?;
    // The connection is driven beside the request; it ends with the
    // response (`Connection: close`), or when this future is dropped. A
    // connection that ended cleanly may have delivered the response already.
    let exchange = sender.send_request(request);
    tokio::pin!(exchange, connection);
    let response = tokio::select! {
        biased;
        response = &mut exchange => response.map_err(http)?,
        ended = &mut connection => {
            ended.map_err(http)?;
            exchange.await.map_err(|_| http_closed(path))?
        }
    };
    let status = response.status().as_u16();
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status {
            path: path.to_owned(),
            status,
        })
    }
}

fn http_closed(path: &str) -> ProbeError {
    ProbeError::Closed {
        path: path.to_owned(),
    }
}

/// The initial state for a configuration: `Starting` when `[service]` has
/// checking on, else `Unchecked`.
pub fn initial(config: &impl ServiceConfig) -> AppHealth {
    match config.local_service() {
        Some(s) if s.health.enabled => AppHealth::Starting,
        _ => AppHealth::Unchecked,
    }
}

/// Probes the app until `stop`, publishing each change in `health`. Reads
/// `[service] app` and `health` from `config` before every probe.
pub async fn run<C: ServiceConfig>(
    config: watch::Receiver<Arc<C>>,
    health: watch::Sender<AppHealth>,
    stop: CancellationToken,
) {
    let mut checker = Checker::default();
    if *health.borrow() == AppHealth::Unchecked {
        checker.uncheck();
    }
    let mut waiting_logged = false;
    loop {
        let snapshot = Arc::clone(&config.borrow());
        let Some(service) = snapshot.local_service() else {
            return;
        };
        let settings = &service.health;
        let interval = settings.interval.get();
        if settings.enabled {
            let path = settings.path.as_deref();
            let result = tokio::select! {
                () = stop.cancelled() => return,
                result = probe(service.app, path, settings.timeout.get()) => result,
            };
            let check = if path.is_some() { "http" } else { "tcp" };
            let changed = checker.observe(result.is_ok(), Thresholds::from(settings));
            match (changed, &result) {
                (Some(AppHealth::Healthy), _) => {
                    tracing::info!(app.addr = %service.app, health.check = check, "the app answers its health check: healthy");
                }
                (Some(AppHealth::Unhealthy), Err(error)) => {
                    tracing::warn!(app.addr = %service.app, health.check = check, %error, "the app stopped answering its health check: unhealthy (not ready, callers stop picking this instance)");
                }
                (None | Some(AppHealth::Starting), Err(error))
                    if checker.state() == AppHealth::Starting && !waiting_logged =>
                {
                    waiting_logged = true;
                    tracing::info!(app.addr = %service.app, health.check = check, %error, "waiting for the app to answer its health check before getting ready and registering");
                }
                _ => {}
            }
            if let Some(state) = changed {
                health.send_replace(state);
            }
        } else if checker.uncheck().is_some() {
            tracing::info!(app.addr = %service.app, "app health checking is off");
            health.send_replace(AppHealth::Unchecked);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T: Thresholds = Thresholds {
        unhealthy_after: 2,
        healthy_after: 1,
    };

    #[test]
    fn starting_waits_for_the_first_pass_and_never_turns_unhealthy() {
        let mut c = Checker::default();
        for _ in 0..10 {
            assert_eq!(c.observe(false, T), None);
        }
        assert_eq!(c.state(), AppHealth::Starting);
        assert_eq!(c.observe(true, T), Some(AppHealth::Healthy));
        assert_eq!(c.observe(true, T), None);
    }

    #[test]
    fn unhealthy_after_consecutive_failures_only() {
        let mut c = Checker::default();
        c.observe(true, T);
        assert_eq!(c.observe(false, T), None);
        // A pass in between starts the count over.
        assert_eq!(c.observe(true, T), None);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), Some(AppHealth::Unhealthy));
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(true, T), Some(AppHealth::Healthy));
    }

    #[test]
    fn healthy_after_consecutive_passes() {
        let t = Thresholds {
            unhealthy_after: 1,
            healthy_after: 3,
        };
        let mut c = Checker::default();
        assert_eq!(c.observe(true, t), None);
        assert_eq!(c.observe(true, t), None);
        assert_eq!(c.observe(true, t), Some(AppHealth::Healthy));
        assert_eq!(c.observe(false, t), Some(AppHealth::Unhealthy));
        assert_eq!(c.observe(true, t), None);
        assert_eq!(c.observe(false, t), None);
        assert_eq!(c.observe(true, t), None);
        assert_eq!(c.observe(true, t), None);
        assert_eq!(c.observe(true, t), Some(AppHealth::Healthy));
    }

    #[test]
    fn turning_checks_off_and_on_again() {
        let mut c = Checker::default();
        assert_eq!(c.uncheck(), Some(AppHealth::Unchecked));
        assert_eq!(c.uncheck(), None);
        assert!(c.state().is_serving() && c.state().has_started());
        // Back on: a failure starts over (waiting), a pass is healthy.
        assert_eq!(c.observe(false, T), Some(AppHealth::Starting));
        assert_eq!(c.observe(true, T), Some(AppHealth::Healthy));
    }

    #[test]
    fn only_serving_states_are_healthy_in_the_directory() {
        use weft_api::Health;
        assert_eq!(AppHealth::Healthy.directory_health(), Health::Healthy);
        assert_eq!(AppHealth::Unchecked.directory_health(), Health::Healthy);
        assert_eq!(AppHealth::Unhealthy.directory_health(), Health::Unhealthy);
        assert!(!AppHealth::Starting.has_started());
    }

    #[tokio::test]
    async fn probes_tcp_and_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["204 No Content", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
                let rsp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                s.write_all(rsp.as_bytes()).await.unwrap();
            }
        });
        let t = Duration::from_secs(5);
        probe(addr, Some("/healthz"), t).await.unwrap();
        let e = probe(addr, Some("/healthz"), t).await.unwrap_err();
        assert!(e.to_string().contains("answered 503"), "{e}");
        server.await.unwrap();
        // Nothing listens any more.
        let e = probe(addr, None, t).await.unwrap_err();
        assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
    }
}
