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

use super::session::StreamError;

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
    deregister: CancellationToken,
    phase: watch::Sender<Phase>,
}

impl Registrar {
    pub fn new(registration: Option<Registration>) -> Self {
        Self {
            registration,
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
    /// register (no registration, or deregistered).
    pub fn open(&self, mut client: Grpc<Channel>) -> Option<RegisterStream<'_>> {
        let registration = self.registration.as_ref()?;
        if self.deregister.is_cancelled() {
            return None;
        }
        self.phase.send_replace(Phase::Open);
        // `deregister` may have looked at the phase just before it became
        // `Open`, and returned: check again now that it is published.
        if self.deregister.is_cancelled() {
            self.phase.send_replace(Phase::Idle);
            return None;
        }
        let requests = requests(
            v1::Instance::from(&registration.record),
            self.deregister.clone(),
        );
        let open: OpenFuture =
            Box::pin(async move { client.register(requests).await.map(|r| r.into_inner()) });
        Some(RegisterStream {
            registrar: self,
            state: StreamState::Opening(open),
            acks: 0,
        })
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

/// The requests of one register stream: `register`, then `deregister` once
/// asked for, then nothing (the stream stays open until dropped).
fn requests(
    instance: v1::Instance,
    deregister: CancellationToken,
) -> impl Stream<Item = v1::RegisterRequest> + Send + 'static {
    enum Step {
        Register(v1::Instance),
        AwaitDeregister,
        Sent,
    }
    futures_util::stream::unfold(Step::Register(instance), move |step| {
        let deregister = deregister.clone();
        async move {
            let msg = match step {
                Step::Register(instance) => Msg::Register(instance),
                Step::AwaitDeregister => {
                    deregister.cancelled().await;
                    Msg::Deregister(v1::Deregister {})
                }
                Step::Sent => std::future::pending().await,
            };
            let next = match msg {
                Msg::Register(_) => Step::AwaitDeregister,
                Msg::Deregister(_) => Step::Sent,
            };
            Some((v1::RegisterRequest { msg: Some(msg) }, next))
        }
    })
}

type OpenFuture =
    Pin<Box<dyn Future<Output = Result<Streaming<v1::RegisterResponse>, tonic::Status>> + Send>>;

enum StreamState {
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
        let mut stream = Box::pin(requests(v1::Instance::from(&record), token.clone()));
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
    async fn deregister_without_a_stream_returns_at_once() {
        let none = Registrar::new(None);
        assert_eq!(
            none.deregister(Duration::from_secs(5)).await,
            Deregistered::NotRegistered
        );
        let reg =
            Registration::for_service(&local(), "10.0.0.7:4143".parse().unwrap(), None).unwrap();
        let idle = Registrar::new(Some(reg));
        assert_eq!(
            idle.deregister(Duration::from_secs(5)).await,
            Deregistered::NotRegistered
        );
        // Once deregistered, no session registers again.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        assert!(idle.open(Grpc::new(channel)).is_none());
    }
}
