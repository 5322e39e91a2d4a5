//! Traffic between the services, every request recorded.
//!
//! A [`Load`] sends `GET`s (idempotent, so any failure that reached no app
//! or was refused may be retried by the caller's sidecar) at a fixed rate,
//! open loop: one request per tick, each on its own task, so a slow answer
//! does not slow the load. Each request goes through the outbound listener
//! of a *caller* instance's sidecar to another service, picked round-robin
//! over every (running caller sidecar, other service) pair. Each is bounded
//! by [`REQUEST_TIMEOUT`] and recorded as a [`Record`]: when it was sent and
//! answered (on the [`Timeline`]'s clock), which caller, which service,
//! the status with `weft-reason`, `weft-limit` and `x-backend` (the app
//! instance that answered), or the error.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use super::timeline::Timeline;
use super::topology::{Mesh, SERVICES};

/// Upper bound of one request (the valid policies' own timeout is 4 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Which load a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The steady traffic between every pair of services.
    Steady,
    /// The overload case: far more than the target service can take.
    Overload,
    /// The same route as the overload, at a rate the service can take.
    Normal,
}

/// One request.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: usize,
    pub kind: Kind,
    /// Sent, since the start of the run.
    pub sent: Duration,
    pub took: Duration,
    /// The instance whose sidecar it went through.
    pub caller: String,
    /// The service it was for.
    pub callee: String,
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub limit: Option<String>,
    /// The app instance that answered (`x-backend`).
    pub backend: Option<String>,
    pub error: Option<String>,
}

impl Record {
    /// No response, or a 5xx.
    pub fn failed(&self) -> bool {
        self.status.is_none_or(|s| s >= 500)
    }

    /// Answered with a 2xx.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// When the answer (or the error) came.
    pub fn end(&self) -> Duration {
        self.sent + self.took
    }

    /// One line for the report and the log.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "#{} {:.3}s+{}ms {} -> {}: ",
            self.seq,
            self.sent.as_secs_f64(),
            self.took.as_millis(),
            self.caller,
            self.callee
        );
        match (self.status, &self.error) {
            (Some(status), _) => {
                let _ = write!(out, "{status} weft-reason={:?}", self.reason);
            }
            (None, Some(error)) => {
                let _ = write!(out, "error: {error}");
            }
            (None, None) => out.push_str("no answer"),
        }
        out
    }
}

/// Every request of the run.
#[derive(Debug)]
pub struct Recorder {
    timeline: Arc<Timeline>,
    records: Mutex<Vec<Record>>,
    seq: AtomicUsize,
}

impl Recorder {
    pub fn new(timeline: Arc<Timeline>) -> Self {
        Self {
            timeline,
            records: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
        }
    }

    /// Every request answered (or failed) so far, in sending order.
    pub fn records(&self) -> Vec<Record> {
        let mut records = self.records.lock().unwrap().clone();
        records.sort_by_key(|r| r.seq);
        records
    }

    /// The records as CSV (one line a request), for the run's output directory.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "seq,kind,sent_s,took_ms,caller,callee,status,weft_reason,weft_limit,backend,error\n",
        );
        for r in self.records() {
            let _ = writeln!(
                out,
                "{},{:?},{:.3},{},{},{},{},{},{},{},{:?}",
                r.seq,
                r.kind,
                r.sent.as_secs_f64(),
                r.took.as_millis(),
                r.caller,
                r.callee,
                r.status.map(|s| s.to_string()).unwrap_or_default(),
                r.reason.as_deref().unwrap_or(""),
                r.limit.as_deref().unwrap_or(""),
                r.backend.as_deref().unwrap_or(""),
                r.error.as_deref().unwrap_or(""),
            );
        }
        out
    }
}

/// A load to run.
#[derive(Debug, Clone)]
pub struct Load {
    pub kind: Kind,
    /// Only this service is called (by every other service's sidecars);
    /// `None`: every service calls every other.
    pub target: Option<String>,
    /// The request path (with query).
    pub path: String,
    /// Requests per second, over the whole mesh.
    pub rate: f64,
}

/// Runs `load` until `stop` says true, then waits for the requests still
/// in flight (each bounded by [`REQUEST_TIMEOUT`]).
pub fn spawn(
    mesh: Arc<Mesh>,
    recorder: Arc<Recorder>,
    load: Load,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / load.rate));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut in_flight = JoinSet::new();
        let mut n = 0_usize;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            while in_flight.try_join_next().is_some() {}
            let mut pairs = Vec::new();
            for caller in mesh.callers() {
                for service in SERVICES {
                    let wanted = match &load.target {
                        Some(target) => target == service,
                        None => true,
                    };
                    if wanted && service != caller.service {
                        pairs.push((caller.clone(), service));
                    }
                }
            }
            if pairs.is_empty() {
                continue;
            }
            let (caller, service) = pairs.swap_remove(n % pairs.len());
            n += 1;
            let recorder = Arc::clone(&recorder);
            let kind = load.kind;
            let uri = format!("http://{service}{}", load.path);
            in_flight.spawn(async move {
                let seq = recorder.seq.fetch_add(1, Ordering::Relaxed);
                let sent = recorder.timeline.now();
                let result = tokio::time::timeout(REQUEST_TIMEOUT, caller.client.get(&uri)).await;
                let took = recorder.timeline.now().saturating_sub(sent);
                let mut record = Record {
                    seq,
                    kind,
                    sent,
                    took,
                    caller: caller.id,
                    callee: service.to_owned(),
                    status: None,
                    reason: None,
                    limit: None,
                    backend: None,
                    error: None,
                };
                match result {
                    Ok(Ok(reply)) => {
                        let header = |name: &str| {
                            reply
                                .headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        record.status = Some(reply.status.as_u16());
                        record.reason = header("weft-reason");
                        record.limit = header("weft-limit");
                        record.backend = header("x-backend");
                    }
                    Ok(Err(error)) => record.error = Some(format!("{error:#}")),
                    Err(_) => record.error = Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
                }
                recorder.records.lock().unwrap().push(record);
            });
        }
        while in_flight.join_next().await.is_some() {}
    })
}
