//! Steady background traffic, counted.
//!
//! [`Traffic::start`] sends `GET uri` through a [`Client`] at a fixed pace
//! (one request every `interval`, each on its own task, so a slow answer does
//! not slow the load) until [`Traffic::stop`], and records every outcome:
//! when it was sent (relative to the start), how long it took, and the status
//! with the headers that tell who answered (`x-backend`) and why a request was
//! refused (`weft-reason`, `weft-limit`), or the error. Each request is
//! bounded by [`TRAFFIC_TIMEOUT`]; a request still unanswered then counts as an
//! error. [`Summary`] reads the records: counts by outcome, failures (errors
//! and 5xx), a time window, answers per backend.
//!
//! Scenarios keep traffic flowing through a caller's sidecar while they take
//! things away (a sidecar, the control plane, etcd) and then assert on what
//! the app saw: "no failed request" means [`Summary::failures`] is empty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::Client;

/// Upper bound for one request of the generator.
pub const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(5);

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response, with the headers scenarios look at.
    Status {
        status: u16,
        backend: Option<String>,
        reason: Option<String>,
        limit: Option<String>,
    },
    /// No response: a connection error, a reset, or the timeout.
    Error(String),
}

impl Outcome {
    /// The status, if there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Status { status, .. } => Some(*status),
            Outcome::Error(_) => None,
        }
    }

    /// True for an error or a 5xx.
    pub fn is_failure(&self) -> bool {
        self.status().is_none_or(|s| s >= 500)
    }

    /// `x-backend` of the answer.
    pub fn backend(&self) -> Option<&str> {
        match self {
            Outcome::Status { backend, .. } => backend.as_deref(),
            Outcome::Error(_) => None,
        }
    }

    /// `weft-limit` of the answer.
    pub fn limit(&self) -> Option<&str> {
        match self {
            Outcome::Status { limit, .. } => limit.as_deref(),
            Outcome::Error(_) => None,
        }
    }

    /// A short key for counting: the status code, or `error`.
    pub fn key(&self) -> String {
        match self {
            Outcome::Status { status, .. } => status.to_string(),
            Outcome::Error(_) => "error".to_owned(),
        }
    }
}

/// One request of the generator.
#[derive(Debug, Clone)]
pub struct Record {
    /// The request's sequence number.
    pub seq: usize,
    /// When it was sent, since the generator started.
    pub sent: Duration,
    /// How long the answer took.
    pub took: Duration,
    pub outcome: Outcome,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} at {:?} (took {:?}): ",
            self.seq, self.sent, self.took
        )?;
        match &self.outcome {
            Outcome::Status {
                status,
                backend,
                reason,
                limit,
            } => write!(
                f,
                "{status} backend={backend:?} weft-reason={reason:?} weft-limit={limit:?}"
            ),
            Outcome::Error(error) => write!(f, "error: {error}"),
        }
    }
}

/// A running traffic generator; [`Traffic::stop`] ends it and returns the
/// records. Dropping it without stopping aborts the sender.
#[derive(Debug)]
pub struct Traffic {
    records: Arc<Mutex<Vec<Record>>>,
    started: Instant,
    stop: watch::Sender<bool>,
    ticker: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Traffic {
    /// Starts sending `GET uri` through `client`, one request per `interval`.
    pub fn start(client: Client, uri: &str, interval: Duration) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let (stop, mut stopped) = watch::channel(false);
        let uri = uri.to_owned();
        let ticker = {
            let records = Arc::clone(&records);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
                let mut tasks = Vec::new();
                let mut seq = 0;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stopped.wait_for(|s| *s) => break,
                    }
                    let (client, uri, records) =
                        (client.clone(), uri.clone(), Arc::clone(&records));
                    let sent_at = Instant::now();
                    let this = seq;
                    seq += 1;
                    tasks.push(tokio::spawn(async move {
                        let result = tokio::time::timeout(TRAFFIC_TIMEOUT, client.get(&uri)).await;
                        let outcome = match result {
                            Ok(Ok(reply)) => Outcome::Status {
                                status: reply.status.as_u16(),
                                backend: reply.backend().map(str::to_owned),
                                reason: reply.reason().map(str::to_owned),
                                limit: reply.limit().map(str::to_owned),
                            },
                            Ok(Err(error)) => Outcome::Error(format!("{error:#}")),
                            Err(_) => {
                                Outcome::Error(format!("no answer within {TRAFFIC_TIMEOUT:?}"))
                            }
                        };
                        records.lock().unwrap().push(Record {
                            seq: this,
                            sent: sent_at - started,
                            took: sent_at.elapsed(),
                            outcome,
                        });
                    }));
                    // Forget finished tasks so a long run does not pile them up.
                    if tasks.len() > 1024 {
                        tasks.retain(|t| !t.is_finished());
                    }
                }
                tasks
            })
        };
        Self {
            records,
            started,
            stop,
            ticker: Some(ticker),
        }
    }

    /// Time since the generator started (to mark a moment in the records).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The requests answered so far.
    pub fn summary(&self) -> Summary {
        let mut records = self.records.lock().unwrap().clone();
        records.sort_by_key(|r| r.seq);
        Summary { records }
    }

    /// Waits until at least `count` more requests than now have been answered
    /// (bounded: `count` intervals would do at the configured pace; this
    /// allows `timeout`).
    pub async fn wait_for_more(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.records.lock().unwrap().len() + count;
        crate::eventually(timeout, || async {
            let have = self.records.lock().unwrap().len();
            if have < target {
                bail!("{have} of {target} requests answered");
            }
            Ok(())
        })
        .await
    }

    /// Stops sending, waits for every request in flight (each bounded by
    /// [`TRAFFIC_TIMEOUT`]) and returns every record.
    pub async fn stop(mut self) -> anyhow::Result<Summary> {
        let _ = self.stop.send(true);
        if let Some(ticker) = self.ticker.take() {
            let tasks =
                crate::within(Duration::from_secs(5), "the traffic ticker", ticker).await??;
            for task in tasks {
                crate::within(
                    TRAFFIC_TIMEOUT + Duration::from_secs(5),
                    "a traffic request",
                    task,
                )
                .await??;
            }
        }
        Ok(self.summary())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
    }
}

/// Records of a [`Traffic`] run (or a window of it), in sending order.
#[derive(Debug, Clone)]
pub struct Summary {
    pub records: Vec<Record>,
}

impl Summary {
    /// How many requests.
    pub fn total(&self) -> usize {
        self.records.len()
    }

    /// Requests sent in `[from, to)` (times since the generator started).
    pub fn window(&self, from: Duration, to: Duration) -> Summary {
        Summary {
            records: self
                .records
                .iter()
                .filter(|r| r.sent >= from && r.sent < to)
                .cloned()
                .collect(),
        }
    }

    /// Requests sent at or after `from`.
    pub fn since(&self, from: Duration) -> Summary {
        self.window(from, Duration::MAX)
    }

    /// Counts by [`Outcome::key`] (`"200"`, `"429"`, `"error"`, ...).
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for record in &self.records {
            *counts.entry(record.outcome.key()).or_default() += 1;
        }
        counts
    }

    /// How many answered `status`.
    pub fn count_status(&self, status: u16) -> usize {
        self.records
            .iter()
            .filter(|r| r.outcome.status() == Some(status))
            .count()
    }

    /// Answers per backend (`x-backend`), for responses that carried one.
    pub fn by_backend(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for record in &self.records {
            if let Some(backend) = record.outcome.backend() {
                *counts.entry(backend.to_owned()).or_default() += 1;
            }
        }
        counts
    }

    /// The first request answered by `backend`.
    pub fn first_from(&self, backend: &str) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.outcome.backend() == Some(backend))
    }

    /// The last request answered by `backend`.
    pub fn last_from(&self, backend: &str) -> Option<&Record> {
        self.records
            .iter()
            .rev()
            .find(|r| r.outcome.backend() == Some(backend))
    }

    /// Errors and 5xx.
    pub fn failures(&self) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| r.outcome.is_failure())
            .collect()
    }

    /// Fails, listing the first few, unless there was no error and no 5xx.
    pub fn expect_no_failures(&self, what: &str) -> anyhow::Result<()> {
        let failures = self.failures();
        if !failures.is_empty() {
            bail!(
                "{what}: {} of {} requests failed ({:?}); first ones:\n{}",
                failures.len(),
                self.total(),
                self.counts(),
                failures
                    .iter()
                    .take(10)
                    .map(|r| format!("  {r}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(())
    }

    /// Fails, listing the first few others, unless every request answered
    /// `status` (and at least `min` requests were made).
    pub fn expect_all(&self, status: u16, min: usize, what: &str) -> anyhow::Result<()> {
        let others: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.outcome.status() != Some(status))
            .collect();
        if !others.is_empty() {
            bail!(
                "{what}: {} of {} requests did not answer {status} ({:?}); first ones:\n{}",
                others.len(),
                self.total(),
                self.counts(),
                others
                    .iter()
                    .take(10)
                    .map(|r| format!("  {r}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        if self.total() < min {
            bail!(
                "{what}: only {} requests, want at least {min}",
                self.total()
            );
        }
        Ok(())
    }
}
