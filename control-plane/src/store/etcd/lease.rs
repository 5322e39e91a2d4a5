//! Lease refreshes over one long-lived etcd `LeaseKeepAlive` stream.
//!
//! A control plane holds one lease per registered sidecar and refreshes each
//! a few times per TTL. Opening a gRPC stream per refresh would cost etcd
//! thousands of stream set-ups per second at 10,000 registrations; etcd's
//! `LeaseKeepAlive` is a bidirectional stream that takes refreshes for any
//! lease, so every refresh of a store goes over one stream, owned by one task
//! ([`KeepAlives`]) and opened when first needed.
//!
//! - A refresh is sent on the stream and answered by the response carrying
//!   its lease id (refreshes of one lease are answered in the order sent); a
//!   TTL of 0 means the lease is gone: [`StoreError::LeaseNotFound`].
//! - The stream is opened through [`EtcdStore::call_on`], so it goes to the
//!   current member and moves on to the next one like any request. etcd-client
//!   opens it with a first refresh and checks that answer; a first lease that
//!   is gone fails only its own refresh, and the next waiting one opens it.
//! - The stream is dropped when etcd ends or breaks it, or leaves a refresh
//!   unanswered for the request timeout (a member that stopped answering):
//!   the refreshes in flight fail as unavailable, the member is left as a
//!   failed request leaves it, and the next refresh opens a new stream. While
//!   opening fails, refreshes fail at once as unavailable, and the next
//!   attempt waits a backoff (100 ms, doubling to 1 s).
//!
//! So a refresh fails where it failed when each had its own stream: lease
//! gone, or etcd unreachable (retried by [`keep_lease_alive`]'s next round).
//!
//! etcd-client binds a [`LeaseKeeper`] to the lease it was opened with; its
//! `pub-response-field` feature makes the keeper's lease id writable, which
//! is how other leases' refreshes are sent on the same stream.
//!
//! [`keep_lease_alive`]: crate::store::keep_lease_alive

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::convert::{Op, map_error};
use super::{Clients, EtcdStore, Inner, timed_out};
use crate::store::{ErrorChain, LeaseId, StoreError};

/// Refreshes waiting for the task (beyond them, callers wait to hand theirs
/// over, within their request timeout).
const QUEUE: usize = 1024;
/// The first pause after a stream failed to open.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest pause between attempts to open a stream: well under the
/// shortest refresh interval worth having, so refreshes resume within a
/// second of etcd coming back.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// One refresh handed to the task.
struct Refresh {
    lease: LeaseId,
    reply: Reply,
}

/// The store's handle on its keep-alive task. Dropping it (with the store)
/// ends the task and the stream.
pub(super) struct KeepAlives {
    refreshes: mpsc::Sender<Refresh>,
}

impl KeepAlives {
    /// Spawns the task; it reaches the store through `store` only while it
    /// opens a stream, so the store can be dropped.
    pub(super) fn start(store: Weak<Inner>, request_timeout: Duration) -> Self {
        let (refreshes, requests) = mpsc::channel(QUEUE);
        let task = Task {
            store,
            requests,
            timeout: request_timeout,
            stream: None,
            opening: None,
            queued: VecDeque::new(),
            down: None,
            backoff: BACKOFF_MIN,
        };
        // Bound to the store's lifetime: ends when the store is dropped.
        tokio::spawn(task.run());
        Self { refreshes }
    }

    /// Refreshes `lease` once, within `timeout`.
    pub(super) async fn refresh(
        &self,
        lease: LeaseId,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let refresh = async {
            self.refreshes
                .send(Refresh { lease, reply })
                .await
                .map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        tokio::time::timeout(timeout, refresh)
            .await
            .unwrap_or_else(|_| Err(timed_out(timeout)))
    }
}

fn stopped() -> StoreError {
    StoreError::unavailable("the lease keep-alive task stopped")
}

/// The same error again, for each of the refreshes one failure fails
/// (`StoreError` is not `Clone`: the source becomes its text).
fn again(error: &StoreError) -> StoreError {
    match error {
        StoreError::LeaseNotFound(lease) => StoreError::LeaseNotFound(*lease),
        StoreError::Rejected { .. } => StoreError::rejected(ErrorChain(error).to_string()),
        _ => StoreError::unavailable(ErrorChain(error).to_string()),
    }
}

/// An open stream and the refreshes sent on it, not answered yet.
struct Stream {
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    /// The member it goes to and its clients, to fail over from.
    member: usize,
    clients: Arc<Clients>,
    /// By lease id, oldest first.
    sent: HashMap<i64, VecDeque<Reply>>,
    unanswered: usize,
    /// Since the last sign of life while refreshes were unanswered.
    waiting_since: Option<Instant>,
}

type Opening = Pin<Box<dyn Future<Output = Result<Stream, StoreError>> + Send>>;

/// After a failed open: refreshes fail at once until `until`.
struct Down {
    until: Instant,
    error: StoreError,
}

struct Task {
    store: Weak<Inner>,
    requests: mpsc::Receiver<Refresh>,
    timeout: Duration,
    stream: Option<Stream>,
    /// A stream being opened, with the first of `queued`'s refreshes.
    opening: Option<Opening>,
    /// Refreshes waiting for the stream being opened.
    queued: VecDeque<Refresh>,
    down: Option<Down>,
    backoff: Duration,
}

enum Event {
    Refresh(Option<Refresh>),
    Response(Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>),
    Opened(Box<Result<Stream, StoreError>>),
    Stuck,
}

impl Task {
    async fn run(mut self) {
        loop {
            let stuck_at = self
                .stream
                .as_ref()
                .and_then(|s| s.waiting_since)
                .map(|since| since + self.timeout);
            // Answers first, so a burst of refreshes never starves them.
            let event = tokio::select! {
                biased;
                response = next_response(self.stream.as_mut()) => Event::Response(response),
                opened = opened(self.opening.as_mut()) => Event::Opened(Box::new(opened)),
                () = sleep_until(stuck_at) => Event::Stuck,
                refresh = self.requests.recv() => Event::Refresh(refresh),
            };
            match event {
                Event::Refresh(None) => return,
                Event::Refresh(Some(refresh)) => self.refresh(refresh).await,
                Event::Response(Ok(Some(response))) => self.answered(&response),
                Event::Response(Ok(None)) => {
                    self.failed(StoreError::unavailable(
                        "etcd ended the lease keep-alive stream",
                    ));
                }
                Event::Response(Err(e)) => self.failed(map_error(e, Op::Other)),
                Event::Stuck => self.failed(timed_out(self.timeout)),
                Event::Opened(result) => {
                    self.opening = None;
                    self.opened(*result).await;
                }
            }
        }
    }

    async fn refresh(&mut self, refresh: Refresh) {
        if self.stream.is_some() {
            return self.send(refresh).await;
        }
        if self.opening.is_some() {
            return self.queued.push_back(refresh);
        }
        if let Some(down) = &self.down
            && Instant::now() < down.until
        {
            let _ = refresh.reply.send(Err(again(&down.error)));
            return;
        }
        self.open(refresh);
    }

    /// Starts opening a stream with `first`'s refresh.
    fn open(&mut self, first: Refresh) {
        let store = self.store.clone();
        let lease = first.lease;
        self.queued.push_front(first);
        self.opening = Some(Box::pin(async move {
            let store = EtcdStore {
                inner: store.upgrade().ok_or_else(stopped)?,
            };
            let ((keeper, responses), member, clients) = store
                .call_on(Op::Lease(lease), |c| {
                    let mut client = c.lease.clone();
                    async move { client.keep_alive(lease.0).await }
                })
                .await?;
            tracing::debug!(etcd.endpoint = %store.inner.members[member].url, "lease keep-alive stream open");
            Ok(Stream {
                keeper,
                responses,
                member,
                clients,
                sent: HashMap::new(),
                unanswered: 0,
                waiting_since: None,
            })
        }));
    }

    async fn opened(&mut self, result: Result<Stream, StoreError>) {
        // The refresh the stream was opened with.
        let Some(first) = self.queued.pop_front() else {
            return;
        };
        match result {
            Ok(stream) => {
                // etcd-client checked its answer: the lease lives.
                let _ = first.reply.send(Ok(()));
                self.stream = Some(stream);
                self.down = None;
                self.backoff = BACKOFF_MIN;
                while let Some(refresh) = self.queued.pop_front() {
                    self.send(refresh).await;
                }
            }
            Err(e @ StoreError::LeaseNotFound(_)) => {
                // Only that lease is gone: open with the next one.
                let _ = first.reply.send(Err(e));
                if let Some(next) = self.queued.pop_front() {
                    self.open(next);
                }
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), retry_in = ?self.backoff, "could not open the lease keep-alive stream");
                for refresh in self.queued.drain(..) {
                    let _ = refresh.reply.send(Err(again(&e)));
                }
                let _ = first.reply.send(Err(again(&e)));
                self.down = Some(Down {
                    until: Instant::now() + self.backoff,
                    error: e,
                });
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Sends `refresh` on the open stream; fails it if the stream just
    /// failed (while the refreshes queued for it were being sent).
    async fn send(&mut self, refresh: Refresh) {
        let Some(stream) = self.stream.as_mut() else {
            let failed = StoreError::unavailable("the lease keep-alive stream failed");
            let _ = refresh.reply.send(Err(failed));
            return;
        };
        stream.keeper.id = refresh.lease.0;
        // The request channel only fills when etcd stops reading: then the
        // stream is as good as stuck.
        let sent = match tokio::time::timeout(self.timeout, stream.keeper.keep_alive()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(map_error(e, Op::Other)),
            Err(_) => Err(timed_out(self.timeout)),
        };
        match sent {
            Ok(()) => {
                stream
                    .sent
                    .entry(refresh.lease.0)
                    .or_default()
                    .push_back(refresh.reply);
                stream.unanswered += 1;
                stream.waiting_since.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                let _ = refresh.reply.send(Err(again(&e)));
                self.failed(e);
            }
        }
    }

    fn answered(&mut self, response: &LeaseKeepAliveResponse) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let id = response.id();
        let Some(waiting) = stream.sent.get_mut(&id) else {
            tracing::debug!(lease.id = id, "lease keep-alive answer nobody waits for");
            return;
        };
        let reply = waiting.pop_front();
        if waiting.is_empty() {
            stream.sent.remove(&id);
        }
        stream.unanswered = stream.unanswered.saturating_sub(1);
        stream.waiting_since = (stream.unanswered > 0).then(Instant::now);
        if let Some(reply) = reply {
            let answer = if response.ttl() > 0 {
                Ok(())
            } else {
                Err(StoreError::LeaseNotFound(LeaseId(id)))
            };
            let _ = reply.send(answer);
        }
    }

    /// The stream broke: fails what was sent on it and drops it; the next
    /// refresh opens another.
    fn failed(&mut self, error: StoreError) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        tracing::warn!(error = %ErrorChain(&error), refreshes.unanswered = stream.unanswered, "lease keep-alive stream failed");
        for reply in stream.sent.into_values().flatten() {
            let _ = reply.send(Err(again(&error)));
        }
        if let Some(inner) = self.store.upgrade() {
            EtcdStore { inner }.member_failed(stream.member, Some(&stream.clients), &error);
        }
    }
}

async fn next_response(
    stream: Option<&mut Stream>,
) -> Result<Option<LeaseKeepAliveResponse>, etcd_client::Error> {
    match stream {
        Some(stream) => stream.responses.message().await,
        None => std::future::pending().await,
    }
}

async fn opened(opening: Option<&mut Opening>) -> Result<Stream, StoreError> {
    match opening {
        Some(opening) => opening.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
