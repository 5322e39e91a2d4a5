//! Weft's in-process client: a Rust service calls other services through
//! the sidecar's own outbound stack, as a library, with no sidecar hop.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mesh = weft_client::Client::from_bootstrap("weft.toml").await?;
//! let req = http::Request::get("http://billing/pay")
//!     .body(http_body_util::Empty::<bytes::Bytes>::new())?;
//! let rsp = mesh.request(req).await?;
//! # let _ = rsp;
//! mesh.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! | item | what it is |
//! |---|---|
//! | [`Client::from_bootstrap`], [`Builder`] | reads the bootstrap file a sidecar reads and builds the same state ([`weft_proxy::startup::embedded`]): the static directory, DNS, telemetry, and with `[control_plane]` the session that follows pushed services and policies. It binds no listener and registers nothing unless [`Builder::register`] asks |
//! | [`Client::request`], `impl Service` | one request down the sidecar's outbound stack, `Observe -> Respond -> Screen -> Discover -> per service` ([`weft_proxy::outbound`]): the same limits, retries, timeouts, balancing and ejection, and a refusal is a response with its status and `weft-reason`, exactly as behind a sidecar |
//! | [`Client::metrics_text`] | the client's own Prometheus text, the same families as a sidecar's `/metrics` (outbound side) |
//! | [`Client::shutdown`] | stops what the client started (the control-plane session, its tasks); dropping the last clone cancels them too |
//!
//! A [`Client`] is cheap to clone (every clone shares one state) and is a
//! [`tower::Service`], so it composes with tower middleware.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt};
use weft_core::body::{self, BoxError, ProxyBody};
use weft_discovery::control_plane::ControlPlaneClient;
use weft_proxy::outbound::{self, Discover};
use weft_proxy::state::LiveState;
use weft_proxy::telemetry::{Direction, RequestObserver};
use weft_stack::observe::{Observe, ObserveLayer};
use weft_stack::respond::{Respond, RespondLayer, Side};
use weft_stack::screen::{Screen, ScreenLayer};

/// The response body: streamed from the service (or a refusal's text).
pub type Body = ProxyBody;

/// Longest wait, in [`Client::shutdown`], for the control plane to
/// acknowledge a deregistration.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait, in [`Client::shutdown`], for the client's tasks to end.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait, in [`Client::shutdown`], for queued spans to be exported.
const SPAN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// What refusal log lines name as the client (there is no connection).
const IN_PROCESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Why the client could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bootstrap file was refused, or the state could not be built.
    #[error("{0}")]
    Start(String),
    /// The client was shut down.
    #[error("the weft client was shut down")]
    ShutDown,
    /// The metrics could not be encoded.
    #[error("encoding the metrics: {0}")]
    Metrics(String),
}

/// The outbound stack above the per-service stacks.
type Stack = Observe<RequestObserver, Respond<Screen<Discover>>>;

/// Calls services through the mesh, in process. Clones share one state.
#[derive(Debug, Clone)]
pub struct Client {
    stack: Stack,
    inner: Arc<Inner>,
}

/// What every clone shares; dropping the last clone stops the tasks.
#[derive(Debug)]
struct Inner {
    shared: Arc<LiveState>,
    control_plane: Option<ControlPlaneClient>,
    /// Whether the app was registered ([`Builder::register`]).
    registered: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let stop = {
            let shared = Arc::clone(&self.shared);
            move || {
                shared.tasks.close();
                shared.shutdown.cancel();
            }
        };
        // A registered app deregisters first, while the session still runs
        // (its register stream would otherwise outlive the session, and the
        // instance stay listed), in the background when a runtime is there.
        if let (Some(cp), true) = (self.control_plane.take(), self.registered)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                cp.deregister(DEREGISTER_TIMEOUT).await;
                stop();
            });
            return;
        }
        stop();
    }
}

/// Starts a [`Client`] with options ([`Client::builder`]).
#[derive(Debug, Clone)]
pub struct Builder {
    path: PathBuf,
    register: bool,
}

impl Builder {
    /// Also register the app with the control plane, so that other
    /// services find it: `[service]` at its `advertise` address, else at
    /// its `app` address (the app answers calls itself, with no sidecar in
    /// front), with the app's health checked as a sidecar checks it
    /// (`[service] health`). Needs `[service]` and `[control_plane]`.
    /// [`Client::shutdown`] deregisters it. Default: nothing is registered.
    pub fn register(mut self, register: bool) -> Self {
        self.register = register;
        self
    }

    /// Starts the client (inside a Tokio runtime).
    pub async fn start(self) -> Result<Client, Error> {
        let (shared, control_plane) =
            weft_proxy::startup::embedded(self.path.clone(), self.register)
                .await
                .map_err(|e| Error::Start(format!("{e:#}")))?;
        let stack = ServiceBuilder::new()
            // As in the sidecar's outbound listener (`outbound::Outbound`).
            .layer(ObserveLayer::new(RequestObserver::new(
                Arc::clone(&shared.reporters),
                Direction::Outbound,
            )))
            .layer(RespondLayer::new(Side::Outbound, IN_PROCESS))
            .layer(ScreenLayer::new(outbound::max_uri_length(&shared)))
            .service(Discover::new(Arc::clone(&shared)));
        Ok(Client {
            stack,
            inner: Arc::new(Inner {
                shared,
                control_plane,
                registered: self.register,
            }),
        })
    }
}

impl Client {
    /// Starts a client from the bootstrap file at `path` (the format a
    /// sidecar reads; `[listen]` is not used, and nothing is registered;
    /// `[service] name`, if set, names the caller in `weft-caller`). Needs a
    /// Tokio runtime.
    pub async fn from_bootstrap(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::builder(path).start().await
    }

    /// A client from the bootstrap file at `path`, with options.
    pub fn builder(path: impl AsRef<Path>) -> Builder {
        Builder {
            path: path.as_ref().to_path_buf(),
            register: false,
        }
    }

    /// Sends `req` to the service its authority names (`http://billing/...`
    /// or a `Host` header), and returns the response as a sidecar would:
    /// a refusal (rate limit, timeout, no endpoint, ...) is a response with
    /// its status, `weft-reason` and `weft-limit`, not an error. The only
    /// error is [`Error::ShutDown`].
    pub async fn request<B>(&self, req: Request<B>) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.clone().oneshot(req).await
    }

    /// Waits, at most `timeout`, for the control plane's first snapshot;
    /// true once it arrived (also true without `[control_plane]`). Requests
    /// need not wait for it: a service not yet known waits up to a second
    /// for the control plane on its own.
    pub async fn wait_for_control_plane(&self, timeout: Duration) -> bool {
        match &self.inner.control_plane {
            Some(cp) => tokio::time::timeout(timeout, cp.first_snapshot())
                .await
                .is_ok(),
            None => true,
        }
    }

    /// The client's metrics in the Prometheus text format (the families of
    /// a sidecar's `/metrics`; only the outbound side counts).
    pub fn metrics_text(&self) -> Result<String, Error> {
        let shared = &self.inner.shared;
        shared
            .metrics
            .render(shared.as_ref())
            .map_err(|e| Error::Metrics(e.to_string()))
    }

    /// Stops what the client started: deregisters the app if it was
    /// registered, stops the control-plane session and every task (waiting
    /// for them up to 2 s), and flushes queued spans. Requests
    /// after this answer [`Error::ShutDown`], on every clone.
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        shared.start_draining();
        if let (Some(cp), true) = (&self.inner.control_plane, self.inner.registered) {
            cp.deregister(DEREGISTER_TIMEOUT).await;
        }
        shared.tasks.close();
        shared.shutdown.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, shared.tasks.wait()).await;
        if let Some(traces) = &shared.reporters.traces {
            traces.shutdown(SPAN_FLUSH_TIMEOUT).await;
        }
    }
}

/// The response future of [`Client`] as a [`Service`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

impl<B> Service<Request<B>> for Client
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Ok(()) = std::task::ready!(Service::<Request<ProxyBody>>::poll_ready(
            &mut self.stack,
            cx
        ));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        if self.inner.shared.shutdown.is_cancelled() {
            return Box::pin(std::future::ready(Err(Error::ShutDown)));
        }
        // One body type down the stack (boxed, as the retry layer replays it).
        let sent = self.stack.call(req.map(body::boxed));
        Box::pin(async move {
            let rsp: Result<_, Infallible> = sent.await;
            let Ok(rsp) = rsp;
            Ok(rsp.map(body::boxed))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use http_body_util::{BodyExt as _, Empty};

    use super::*;

    /// A bootstrap file whose directory has `billing` at a closed port.
    fn billing_at_a_closed_port(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let path = dir.path().join("weft.toml");
        std::fs::write(
            &path,
            format!(
                "[[directory.services]]\nname = \"billing\"\nendpoints = [{{ address = \"{closed}\" }}]\n"
            ),
        )
        .unwrap();
        path
    }

    fn get(uri: &str) -> Request<Empty<bytes::Bytes>> {
        Request::get(uri).body(Empty::new()).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_is_a_response_with_its_reason_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::from_bootstrap(billing_at_a_closed_port(&dir))
            .await
            .unwrap();
        // As a tower service, through a clone.
        let rsp = client
            .clone()
            .oneshot(get("http://billing/pay"))
            .await
            .unwrap();
        assert_eq!(rsp.status(), http::StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()["weft-reason"], "connect-failure");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty(), "a refusal names its cause");
        let metrics = client.metrics_text().unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("weft_refusals_total{")
                    && l.contains("service=\"billing\"")
                    && l.contains("reason=\"connect-failure\"")),
            "{metrics}"
        );
        client.shutdown().await;
        assert!(matches!(
            client.request(get("http://billing/pay")).await,
            Err(Error::ShutDown)
        ));
    }

    #[tokio::test]
    async fn registering_needs_a_service_and_a_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let error = Client::builder(billing_at_a_closed_port(&dir))
            .register(true)
            .start()
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("[service] and [control_plane]"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_bad_bootstrap_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.toml");
        std::fs::write(&path, "[listen]\nnonsense = 1\n").unwrap();
        let error = Client::from_bootstrap(&path).await.unwrap_err();
        assert!(matches!(error, Error::Start(_)), "{error:?}");
        assert!(error.to_string().contains("weft.toml"), "{error}");
    }
}
