//! The connection to the control plane: connect, keep the streams, reconnect.
//!
//! `run` is the client's one long-lived task. It tries the configured
//! addresses in turn, from a random first one, waiting a jittered exponential
//! backoff ([`Backoff`]) between attempts; an address with a host name is
//! resolved on every attempt and its addresses are tried in random order
//! (a name resolving to every replica spreads sidecars over them and fails
//! over from a dead one). On each connection it runs one session:
//!
//! 1. a `Subscribe` stream whose first request carries the whole
//!    subscription set (so the control plane answers with a full snapshot),
//!    then one request per batch of new names;
//! 2. if there is a registration, a `Register` stream on the same HTTP/2
//!    connection (see [`super::register`]).
//!
//! Every pushed message goes through the [`Tracker`] and each new snapshot is
//! published. The session ends when the subscribe stream fails or ends; the
//! task then records the connection as lost and tries the next address. A
//! failed register stream does not end the session: it is opened again on the
//! same connection after its own backoff (the control plane may refuse a
//! registration while its store is down and still serve its cached view). Nothing known is cleared
//! when a connection drops: the last accepted snapshot stays published until a
//! new full snapshot replaces it (static stability).
//!
//! The backoff starts over after a session that stayed up for
//! [`HEALTHY_SESSION`], so a control plane restart is followed by a quick
//! reconnection, while a control plane that accepts and then drops streams
//! at once is retried at the capped pace.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use rand::Rng;
use rand::seq::SliceRandom;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use weft_api::v1::control_plane_client::ControlPlaneClient as Grpc;

use super::ClientState;
use super::snapshot::Tracker;
use super::stream::StreamError;
use weft_transport::tls::MeshTls;

/// The first backoff ceiling; it doubles per failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The largest backoff ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(5);
/// Time to establish a TCP + HTTP/2 connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for the control plane to accept the `Subscribe` stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings find a dead connection the kernel has not noticed (a
/// partition, a silent peer).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One configured control-plane address.
#[derive(Clone)]
pub struct Address {
    pub address: String,
    endpoint: Endpoint,
    /// For an `https` address: mTLS with this sidecar's certificate, the
    /// server being the control plane of the mesh's trust domain.
    tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Address")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why an address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("control-plane address {address:?}: {reason}")]
    Invalid { address: String, reason: String },
    /// An `https` address needs this sidecar's certificate (`[tls]`).
    #[error(
        "control-plane address {address:?}: https needs this sidecar's certificate; add a [tls] section or use http://"
    )]
    HttpsWithoutTls { address: String },
}

impl Address {
    /// `http://host:port`, or `https://host:port` (mTLS, with `tls`).
    pub fn parse(address: &str, tls: Option<&MeshTls>) -> Result<Self, AddressError> {
        let (plain, tls) = match address.strip_prefix("https://") {
            Some(rest) => {
                let tls = tls.ok_or_else(|| AddressError::HttpsWithoutTls {
                    address: address.to_owned(),
                })?;
                // tonic speaks TLS only with its own TLS stack; the connector
                // does it instead, so the endpoint itself is plain.
                (
                    format!("http://{rest}"),
                    Some(tls.control_plane_client_config()),
                )
            }
            None => (address.to_owned(), None),
        };
        let endpoint = Endpoint::from_shared(plain).map_err(|e| AddressError::Invalid {
            address: address.to_owned(),
            reason: chain(&e),
        })?;
        if endpoint.uri().host().is_none() {
            return Err(AddressError::Invalid {
                address: address.to_owned(),
                reason: "no host".to_owned(),
            });
        }
        Ok(Self {
            address: address.to_owned(),
            endpoint: configure(endpoint),
            tls,
        })
    }

    /// The host when it is a name (not an IP literal), with the port.
    fn name(&self) -> Option<(&str, u16)> {
        let uri = self.endpoint.uri();
        let host = uri.host()?;
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if literal.parse::<IpAddr>().is_ok() {
            return None;
        }
        Some((host, uri.port_u16().unwrap_or(80)))
    }

    /// Connects to the control plane at this address. A name is resolved on
    /// every attempt and its addresses are tried in random order: the
    /// sidecars behind one name spread over the replicas it resolves to, and
    /// an attempt fails over from a dead replica to the next.
    async fn connect(&self) -> Result<Channel, SessionError> {
        let Some((host, port)) = self.name() else {
            return connect_to(&self.endpoint, self.tls.as_ref(), &self.address).await;
        };
        let resolved = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| SessionError::ConnectTimeout {
                address: self.address.clone(),
                timeout: CONNECT_TIMEOUT,
            })?
            .map_err(|e| SessionError::Connect {
                address: self.address.clone(),
                reason: format!("resolving {host}: {e}"),
            })?;
        let mut addrs: Vec<SocketAddr> = resolved.collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs.shuffle(&mut rand::rng());
        let mut last = SessionError::Connect {
            address: self.address.clone(),
            reason: format!("{host} resolved to no address"),
        };
        for addr in addrs {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map(|e| configure(e).origin(self.endpoint.uri().clone()))
                .map_err(|e| SessionError::Connect {
                    address: self.address.clone(),
                    reason: chain(&e),
                })?;
            let address = format!("{} ({addr})", self.address);
            match connect_to(&endpoint, self.tls.as_ref(), &address).await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    tracing::debug!(control_plane.address = %self.address, %addr, error = %e, "control-plane replica unreachable");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// The connection settings of every control-plane endpoint.
fn configure(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

async fn connect_to(
    endpoint: &Endpoint,
    tls: Option<&Arc<ClientConfig>>,
    address: &str,
) -> Result<Channel, SessionError> {
    let connecting = async {
        match tls {
            None => endpoint.connect().await,
            Some(config) => {
                endpoint
                    .connect_with_connector(TlsConnector(Arc::clone(config)))
                    .await
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(SessionError::Connect {
            address: address.to_owned(),
            reason: chain(&e),
        }),
        Err(_) => Err(SessionError::ConnectTimeout {
            address: address.to_owned(),
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Connects over TCP to the endpoint's address, then TLS with `.0`.
#[derive(Clone)]
struct TlsConnector(Arc<ClientConfig>);

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = Arc::clone(&self.0);
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            // The verifier checks the SPIFFE ID, not this name (SNI is off).
            let name =
                ServerName::try_from("weft-control-plane").map_err(|_| invalid("server name"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connecting to {address}: no connection within {timeout:?}")]
    ConnectTimeout { address: String, timeout: Duration },
    #[error("{address}: the subscribe stream was not accepted within {timeout:?}")]
    OpenTimeout { address: String, timeout: Duration },
    #[error("{address}: {source}")]
    Stream {
        address: String,
        #[source]
        source: StreamError,
    },
}

/// An error and its sources on one line (tonic's transport errors say little
/// at the top).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Jittered exponential backoff with full jitter: attempt `n` (from 0) waits a
/// random duration in `[0, min(BACKOFF_MAX, BACKOFF_MIN * 2^n)]`.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The ceiling of the next wait.
    pub fn ceiling(&self) -> Duration {
        BACKOFF_MIN
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16)))
            .min(BACKOFF_MAX)
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The client's task: connect, run sessions, reconnect, until `stop`.
pub(super) async fn run(
    shared: &ClientState,
    targets: Vec<Address>,
    mut tracker: Tracker,
    stop: CancellationToken,
) {
    if targets.is_empty() {
        shared.disconnected("no usable control-plane address".to_owned());
        return;
    }
    let mut backoff = Backoff::default();
    // Start at a random address, so sidecars spread over the listed replicas.
    let first = rand::rng().random_range(0..targets.len());
    for target in targets.iter().cycle().skip(first) {
        let started = Instant::now();
        let ended = tokio::select! {
            () = stop.cancelled() => return,
            ended = session(shared, target, &mut tracker) => {
                let Err(e) = ended;
                e
            }
        };
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::debug!(control_plane.address = %target.address, retry.in_ms = delay.as_millis(), error = %ended, "control-plane session ended");
        shared.disconnected(ended.to_string());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: returns only when it fails.
async fn session(
    shared: &ClientState,
    target: &Address,
    tracker: &mut Tracker,
) -> Result<Infallible, SessionError> {
    let address = || target.address.clone();
    let channel = target.connect().await?;
    let stream_error = |source| SessionError::Stream {
        address: address(),
        source,
    };
    let mut client = Grpc::new(channel);

    let (initial, requests) = shared.subscriptions.requests();
    let subscribed = initial.len();
    let mut updates = match tokio::time::timeout(OPEN_TIMEOUT, client.subscribe(requests)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(stream_error(StreamError::status("subscribe", status))),
        Err(_) => {
            return Err(SessionError::OpenTimeout {
                address: address(),
                timeout: OPEN_TIMEOUT,
            });
        }
    };
    tracker.begin_stream(initial);
    shared.connected(&target.address, subscribed);

    // A failed register stream is opened again on this connection, with its
    // own backoff, without tearing down the subscription: the control plane
    // may fail a registration (its store unreachable) while it still serves
    // its cached view. A lost connection ends the subscription too, and with
    // it the session.
    let mut register = shared.registrar.open(client.clone());
    let mut register_opened = Instant::now();
    let mut register_backoff = Backoff::default();
    let mut register_retry: Option<Pin<Box<Sleep>>> = None;
    loop {
        tokio::select! {
            message = updates.message() => match message {
                Ok(Some(message)) => shared.accept(tracker, &message),
                Ok(None) => return Err(stream_error(StreamError::Ended { stream: "subscribe" })),
                Err(status) => return Err(stream_error(StreamError::status("subscribe", status))),
            },
            done = drive(&mut register) => {
                // Dropping the stream ends it: after a deregistration, or to
                // open it again.
                register = None;
                if let Err(error) = done {
                    if register_opened.elapsed() >= HEALTHY_SESSION {
                        register_backoff.reset();
                    }
                    let delay = register_backoff.next_delay();
                    tracing::warn!(
                        control_plane.address = %target.address,
                        %error,
                        retry.in_ms = delay.as_millis(),
                        "registration failed; registering again"
                    );
                    register_retry = Some(Box::pin(tokio::time::sleep(delay)));
                }
            },
            () = wait(&mut register_retry) => {
                register_retry = None;
                register = shared.registrar.open(client.clone());
                register_opened = Instant::now();
            },
        }
    }
}

/// Waits for the timer, if any; never returns without one.
async fn wait(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

/// Drives the register stream, if any; never returns without one.
async fn drive(
    register: &mut Option<super::register::RegisterStream<'_>>,
) -> Result<(), StreamError> {
    match register {
        Some(stream) => stream.drive().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(*ceilings.last().unwrap() as u64));
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_MIN);
    }

    #[test]
    fn addresses_are_checked() {
        assert!(Address::parse("http://127.0.0.1:8443", None).is_ok());
        assert!(Address::parse("http://weft-cp.internal:8443", None).is_ok());
        let e = Address::parse("https://weft-cp.internal:8443", None).unwrap_err();
        assert!(
            e.to_string()
                .contains("https needs this sidecar's certificate"),
            "{e}"
        );
        assert!(matches!(
            Address::parse("http://bad host", None),
            Err(AddressError::Invalid { .. })
        ));
        assert!(
            Address::parse("http://[::1]:8443", None)
                .unwrap()
                .name()
                .is_none()
        );
        assert!(
            Address::parse("http://10.0.0.1:8443", None)
                .unwrap()
                .name()
                .is_none()
        );
        assert_eq!(
            Address::parse("http://weft-cp.internal:8443", None)
                .unwrap()
                .name(),
            Some(("weft-cp.internal", 8443))
        );
    }
}
