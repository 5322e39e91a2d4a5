//! Registration: keeping this sidecar's instance listed while it runs, and
//! removing it at once when it shuts down gracefully.
//!
//! While connected, each session opens one `Register` stream ([`Registrar::open`])
//! whose first message is `register` with the [`Registration`]'s record; the
//! control plane answers with the lease TTL and keeps the lease alive while
//! the stream is open. A new session (after a reconnection, maybe to a
//! restarted control plane that lost everything) registers again.
//!
//! [`Registrar::deregister`] (called after draining) sends `deregister` on the
//! open stream and waits, bounded, for the control plane's answer or for the
//! stream to end; from then on no session registers again. The request stream
//! stays open after `deregister` so the control plane answers before it sees
//! the stream end; the session drops it once answered.
//!
//! The registrar publishes where the current stream is ([`Phase`]) in a
//! `watch` channel, which is how `deregister` knows whether there is anything
//! to remove and when it is done.
//!
//! With the local app's health ([`crate::health`]), a stream first waits for
//! the app to answer its check (the phase stays idle meanwhile: nothing is
//! registered), registers with the health at that time, then sends a
//! `health` message on every change between healthy and unhealthy, so the
//! control plane marks the instance in the directory.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use weft_api::v1::control_plane_client::ControlPlaneClient as Grpc;
use weft_api::v1::register_request::Msg;
use weft_api::{ConvertError, InstanceRecord, v1};
use weft_config::LocalService;

use super::stream::StreamError;
use crate::health::AppHealth;

/// What this sidecar registers (from `[service]` and the bound inbound and
/// admin addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub record: InstanceRecord,
}

impl Registration {
    /// The registration of the instance `service` describes. Its address is
    /// `service.advertise`, or else `inbound` (the bound inbound listener,
    /// which must then be a concrete IP, not `0.0.0.0`); its id is
    /// `service.id`, or else [`Registration::default_id`]; `admin` is the
    /// bound admin listener, if it is to be advertised.
    pub fn for_service(
        service: &LocalService,
        inbound: SocketAddr,
        admin: Option<SocketAddr>,
    ) -> Result<Self, ConvertError> {
        let address = service.advertise.unwrap_or(inbound);
        let record = InstanceRecord {
            service: service.name.clone(),
            id: service
                .id
                .clone()
                .unwrap_or_else(|| Self::default_id(address)),
            address,
            metadata: service.metadata.clone(),
            admin_address: admin,
            health: weft_api::Health::Healthy,
        };
        record.check()?;
        Ok(Self { record })
    }

    /// The default instance id: the host name and the process id
    /// (`web-7f9c-4242`), or the advertised address (`10.0.0.7:4143`) when
    /// the host name cannot be read. Characters an id cannot hold become `-`.
    pub fn default_id(address: SocketAddr) -> String {
        let suffix = format!("-{}", std::process::id());
        match host_name() {
            Some(host) => {
                let room = InstanceRecord::MAX_ID_LEN - suffix.len();
                let host: String = host
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(room)
                    .collect();
                format!("{host}{suffix}")
            }
            // `ip:port`, IPv6 without brackets: still unique, since the port
            // comes after the last ':'.
            None => format!("{}:{}", address.ip(), address.port()),
        }
    }
}

/// The host name, from the kernel (Linux) or `HOSTNAME`; `None` if neither
/// says.
fn host_name() -> Option<String> {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Where the registration stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No stream open: not connected, nothing to register, or the stream
    /// broke (the lease expires by itself unless a new session registers).
    Idle,
    /// A stream is open (or opening) and `register` was (or is being) sent.
    Open,
    /// Deregistered; no session registers again. `acknowledged` is true when
    /// the control plane answered the `deregister`.
    Done { acknowledged: bool },
}

/// How [`ControlPlaneClient::deregister`](super::ControlPlaneClient::deregister)
/// ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deregistered {
    /// The control plane removed the instance.
    Acknowledged,
    /// The stream ended (or the connection was lost) before an answer; if the
    /// `deregister` did not get through, the lease expires within its TTL.
    Unconfirmed,
    /// Nothing was registered at the time (no `[service]`, or not connected);
    /// any earlier registration's lease expires by itself.
    NotRegistered,
    /// No answer within the timeout; the lease expires within its TTL.
    TimedOut,
}

/// The registration and its state, shared by the client and the sessions.
#[derive(Debug)]
pub struct Registrar {
    registration: Option<Registration>,
    /// The local app's health; `None`: always healthy.
    health: Option<watch::Receiver<AppHealth>>,
    deregister: CancellationToken,
    phase: watch::Sender<Phase>,
}

impl Registrar {
    pub fn new(
        registration: Option<Registration>,
        health: Option<watch::Receiver<AppHealth>>,
    ) -> Self {
        Self {
            registration,
            health,
            deregister: CancellationToken::new(),
            phase: watch::channel(Phase::Idle).0,
        }
    }

    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Opens one session's register stream, unless there is nothing to
    /// register (no registration, or deregistered). While the local app has
    /// not answered its health check yet, the stream first waits for it.
    pub fn open(&self, client: Grpc<Channel>) -> Option<RegisterStream<'_>> {
        self.registration.as_ref()?;
        if self.deregister.is_cancelled() {
            return None;
        }
        let state = match &self.health {
            Some(health) if !health.borrow().has_started() => {
                tracing::info!("registration waits for the app to answer its health check");
                StreamState::Waiting(health.clone(), client)
            }
            _ => self.start(client)?,
        };
        Some(RegisterStream {
            registrar: self,
            state,
            acks: 0,
        })
    }

    /// Publishes the `Open` phase and starts the stream, unless deregistered.
    fn start(&self, mut client: Grpc<Channel>) -> Option<StreamState> {
        let registration = self.registration.as_ref()?;
        self.phase.send_replace(Phase::Open);
        // `deregister` may have looked at the phase just before it became
        // `Open`, and returned: check again now that it is published.
        if self.deregister.is_cancelled() {
            self.phase.send_replace(Phase::Idle);
            return None;
        }
        let mut instance = v1::Instance::from(&registration.record);
        let health = self.health.clone().map(|mut h| {
            let now = h.borrow_and_update().directory_health();
            instance.health = v1::Health::from(now).into();
            (h, now)
        });
        let requests = requests(instance, health, self.deregister.clone());
        let open: OpenFuture =
            Box::pin(async move { client.register(requests).await.map(|r| r.into_inner()) });
        Some(StreamState::Opening(open))
    }

    /// Sends `deregister` on the open stream and waits, at most `timeout`, for
    /// the answer or the stream's end. No session registers afterwards.
    pub async fn deregister(&self, timeout: Duration) -> Deregistered {
        if self.registration.is_none() {
            return Deregistered::NotRegistered;
        }
        self.deregister.cancel();
        let mut phase = self.phase.subscribe();
        let current = *phase.borrow_and_update();
        match current {
            Phase::Idle => return Deregistered::NotRegistered,
            Phase::Done { acknowledged } => return done(acknowledged),
            Phase::Open => {}
        }
        let ended = tokio::time::timeout(timeout, phase.wait_for(|p| *p != Phase::Open)).await;
        match ended {
            Err(_) => Deregistered::TimedOut,
            Ok(Ok(p)) => match *p {
                Phase::Done { acknowledged } => done(acknowledged),
                Phase::Idle | Phase::Open => Deregistered::Unconfirmed,
            },
            Ok(Err(_)) => Deregistered::Unconfirmed,
        }
    }
}

fn done(acknowledged: bool) -> Deregistered {
    if acknowledged {
        Deregistered::Acknowledged
    } else {
        Deregistered::Unconfirmed
    }
}

/// The app's health as last sent on a stream, and its changes.
type HealthFeed = (watch::Receiver<AppHealth>, weft_api::Health);

/// The requests of one register stream: `register`, then a `health` message
/// on each change of the app's health (healthy / unhealthy), until
/// `deregister` is asked for, then nothing (the stream stays open until
/// dropped).
fn requests(
    instance: v1::Instance,
    health: Option<HealthFeed>,
    deregister: CancellationToken,
) -> impl Stream<Item = v1::RegisterRequest> + Send + 'static {
    enum Step {
        Register(v1::Instance, Option<HealthFeed>),
        Registered(Option<HealthFeed>),
        Sent,
    }
    futures_util::stream::unfold(Step::Register(instance, health), move |step| {
        let deregister = deregister.clone();
        async move {
            let (msg, next) = match step {
                Step::Register(instance, health) => {
                    (Msg::Register(instance), Step::Registered(health))
                }
                Step::Registered(mut health) => {
                    let changed = async {
                        let Some((rx, sent)) = health.as_mut() else {
                            return std::future::pending().await;
                        };
                        loop {
                            if rx.changed().await.is_err() {
                                // The checker stopped (shutdown): nothing more to say.
                                return std::future::pending().await;
                            }
                            let now = rx.borrow_and_update().directory_health();
                            if now != *sent {
                                *sent = now;
                                return now;
                            }
                        }
                    };
                    tokio::select! {
                        biased;
                        () = deregister.cancelled() => (Msg::Deregister(v1::Deregister {}), Step::Sent),
                        now = changed => (
                            Msg::Health(v1::HealthReport { health: v1::Health::from(now).into() }),
                            Step::Registered(health),
                        ),
                    }
                }
                Step::Sent => std::future::pending().await,
            };
            Some((v1::RegisterRequest { msg: Some(msg) }, next))
        }
    })
}

type OpenFuture =
    Pin<Box<dyn Future<Output = Result<Streaming<v1::RegisterResponse>, tonic::Status>> + Send>>;

enum StreamState {
    /// Waiting for the local app to answer its health check before
    /// registering (the phase stays idle).
    Waiting(watch::Receiver<AppHealth>, Grpc<Channel>),
    /// Waiting for the control plane to accept the stream.
    Opening(OpenFuture),
    Open(Box<Streaming<v1::RegisterResponse>>),
    /// Deregistered; nothing more to read.
    Finished,
}

/// One session's register stream. Dropping it (the session ended) sets the
/// phase back to idle, unless it finished.
pub struct RegisterStream<'a> {
    registrar: &'a Registrar,
    state: StreamState,
    /// Answers received: the first is the `register`'s, the next the
    /// `deregister`'s.
    acks: u32,
}

impl std::fmt::Debug for RegisterStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterStream")
            .field("acks", &self.acks)
            .finish_non_exhaustive()
    }
}

impl RegisterStream<'_> {
    /// Reads the stream until it is done with (`Ok`, after deregistering) or
    /// fails. Cancel-safe: every await is on state kept in `self`.
    pub async fn drive(&mut self) -> Result<(), StreamError> {
        loop {
            let deregistering = self.registrar.deregister.is_cancelled();
            match &mut self.state {
                StreamState::Waiting(health, client) => {
                    let started = tokio::select! {
                        () = self.registrar.deregister.cancelled() => None,
                        started = health.wait_for(|h| h.has_started()) => Some(started.is_ok()),
                    };
                    match started {
                        // Deregistered before registering: nothing to remove.
                        None => {
                            self.state = StreamState::Finished;
                            return Ok(());
                        }
                        // The checker stopped: the sidecar is shutting down.
                        Some(false) => return std::future::pending().await,
                        Some(true) => {
                            tracing::info!("the app answers its health check; registering");
                            let client = client.clone();
                            match self.registrar.start(client) {
                                Some(state) => self.state = state,
                                None => {
                                    self.state = StreamState::Finished;
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
                StreamState::Opening(open) => match open.await {
                    Ok(responses) => self.state = StreamState::Open(Box::new(responses)),
                    Err(_) if deregistering => {
                        self.finish(false);
                        return Ok(());
                    }
                    Err(status) => return Err(StreamError::status("register", status)),
                },
                StreamState::Open(responses) => match responses.message().await {
                    Ok(Some(response)) => {
                        self.acks += 1;
                        if self.acks == 1 {
                            self.registered(&response);
                        }
                        if self.registrar.deregister.is_cancelled() && self.acks >= 2 {
                            self.finish(true);
                            return Ok(());
                        }
                    }
                    Ok(None) | Err(_) if self.registrar.deregister.is_cancelled() => {
                        self.finish(false);
                        return Ok(());
                    }
                    Ok(None) => return Err(StreamError::Ended { stream: "register" }),
                    Err(status) => return Err(StreamError::status("register", status)),
                },
                StreamState::Finished => return Ok(()),
            }
        }
    }

    fn registered(&self, response: &v1::RegisterResponse) {
        if let Some(r) = &self.registrar.registration {
            tracing::info!(
                service.name = %r.record.service,
                instance.id = %r.record.id,
                instance.address = %r.record.address,
                lease.ttl_ms = response.lease_ttl_ms,
                store.revision = response.revision,
                "registered with the control plane"
            );
        }
    }

    fn finish(&mut self, acknowledged: bool) {
        self.state = StreamState::Finished;
        self.registrar
            .phase
            .send_replace(Phase::Done { acknowledged });
        tracing::info!(acknowledged, "deregistered from the control plane");
    }
}

impl Drop for RegisterStream<'_> {
    fn drop(&mut self) {
        // A stream that ends after `deregister` was asked for ends the
        // registration for good (unconfirmed); otherwise the next session
        // registers again.
        let deregistering = self.registrar.deregister.is_cancelled();
        self.registrar.phase.send_if_modified(|p| match p {
            Phase::Open if deregistering => {
                *p = Phase::Done {
                    acknowledged: false,
                };
                true
            }
            Phase::Open => {
                *p = Phase::Idle;
                true
            }
            _ => false,
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::StreamExt;

    fn local() -> LocalService {
        LocalService {
            name: "orders".parse().unwrap(),
            app: "127.0.0.1:8080".parse().unwrap(),
            policy: None,
            instances: LocalService::DEFAULT_INSTANCES,
            advertise: None,
            id: None,
            health: weft_config::HealthCheck::default(),
            metadata: weft_config::Metadata {
                zone: Some("eu-1".to_owned()),
                ..weft_config::Metadata::default()
            },
        }
    }

    #[test]
    fn registration_from_the_local_service() {
        let r = Registration::for_service(
            &local(),
            "10.0.0.7:4143".parse().unwrap(),
            Some("127.0.0.1:4191".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(r.record.address, "10.0.0.7:4143".parse().unwrap());
        assert!(
            r.record.id.ends_with(&format!("-{}", std::process::id())),
            "{}",
            r.record.id
        );
        assert!(InstanceRecord::check_id(&r.record.id).is_ok());
        assert_eq!(r.record.service.as_str(), "orders");
        assert_eq!(r.record.metadata.zone.as_deref(), Some("eu-1"));

        // `advertise` and `id` win over the listener and the default.
        let mut service = local();
        service.advertise = Some("10.0.0.9:4143".parse().unwrap());
        service.id = Some("orders-a".to_owned());
        let r = Registration::for_service(&service, "0.0.0.0:4143".parse().unwrap(), None).unwrap();
        assert_eq!(r.record.address, "10.0.0.9:4143".parse().unwrap());
        assert_eq!(r.record.id, "orders-a");

        // An invalid configured id is refused.
        service.id = Some("bad id".to_owned());
        assert!(
            Registration::for_service(&service, "10.0.0.7:4143".parse().unwrap(), None).is_err()
        );

        // A listen address is not an advertised address.
        let e =
            Registration::for_service(&local(), "0.0.0.0:4143".parse().unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("unspecified"), "{e}");
    }

    #[tokio::test]
    async fn requests_register_then_deregister_then_stay_open() {
        let token = CancellationToken::new();
        let record = Registration::for_service(&local(), "10.0.0.7:4143".parse().unwrap(), None)
            .unwrap()
            .record;
        let mut stream = Box::pin(requests(v1::Instance::from(&record), None, token.clone()));
        let first = stream.next().await.unwrap();
        assert!(matches!(first.msg, Some(Msg::Register(i)) if i.address == "10.0.0.7:4143"));
        let waiting = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(waiting.is_err(), "deregister only when asked");
        token.cancel();
        let second = stream.next().await.unwrap();
        assert!(matches!(second.msg, Some(Msg::Deregister(_))));
        let after = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(after.is_err(), "the stream stays open");
    }

    #[tokio::test]
    async fn requests_report_health_changes_until_deregistered() {
        let token = CancellationToken::new();
        let record = Registration::for_service(&local(), "10.0.0.7:4143".parse().unwrap(), None)
            .unwrap()
            .record;
        let (tx, mut rx) = watch::channel(AppHealth::Healthy);
        rx.borrow_and_update();
        let feed = Some((rx, weft_api::Health::Healthy));
        let mut stream = Box::pin(requests(v1::Instance::from(&record), feed, token.clone()));
        assert!(matches!(
            stream.next().await.unwrap().msg,
            Some(Msg::Register(_))
        ));
        let report = |r: v1::RegisterRequest| match r.msg {
            Some(Msg::Health(h)) => h.health(),
            other => panic!("not a health report: {other:?}"),
        };
        tx.send_replace(AppHealth::Unhealthy);
        assert_eq!(report(stream.next().await.unwrap()), v1::Health::Unhealthy);
        // Unchecked is as healthy as Healthy: one report for both.
        tx.send_replace(AppHealth::Unchecked);
        assert_eq!(report(stream.next().await.unwrap()), v1::Health::Healthy);
        tx.send_replace(AppHealth::Healthy);
        let quiet = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(quiet.is_err(), "no report without a change");
        token.cancel();
        assert!(matches!(
            stream.next().await.unwrap().msg,
            Some(Msg::Deregister(_))
        ));
    }

    #[tokio::test]
    async fn deregister_without_a_stream_returns_at_once() {
        let none = Registrar::new(None, None);
        assert_eq!(
            none.deregister(Duration::from_secs(5)).await,
            Deregistered::NotRegistered
        );
        let reg =
            Registration::for_service(&local(), "10.0.0.7:4143".parse().unwrap(), None).unwrap();
        let idle = Registrar::new(Some(reg), None);
        assert_eq!(
            idle.deregister(Duration::from_secs(5)).await,
            Deregistered::NotRegistered
        );
        // Once deregistered, no session registers again.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        assert!(idle.open(Grpc::new(channel)).is_none());
    }
}
