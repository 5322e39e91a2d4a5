//! The owner of every task the control plane spawns.
//!
//! One [`Tasks`] is made at start and cloned into whatever spawns: the HTTP
//! and gRPC listeners and their connections, the directory view, the TLS file
//! watcher, and each Register and Subscribe stream. It pairs one
//! `CancellationToken` (the process is stopping) with one `TaskTracker`, so
//! shutdown cancels everything and then waits for it ([`Tasks::shutdown`]),
//! bounded by a grace period. A task that panics is logged with its name
//! instead of vanishing with its `JoinHandle`; the others report their own
//! failures where they happen.
//!
//! Every task ends on its own when what it serves ends (a stream, a
//! connection, a lease it watches), so the number running
//! (`weft_control_plane_tasks`, [`Tasks::len`]) returns to its idle value
//! once sidecars disconnect: anything else is a leak.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::GaugeGuard;

/// Spawns tracked tasks and stops them all at shutdown.
#[derive(Debug, Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    running: Gauge,
}

impl Tasks {
    /// Tasks stopped by `stop`, counted in `running`.
    pub fn new(stop: CancellationToken, running: Gauge) -> Self {
        Self {
            tracker: TaskTracker::new(),
            stop,
            running,
        }
    }

    /// The token every task watches: cancelled when the process stops.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Spawns `task` (named `name` in logs); a panic is logged, not lost.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Dropped on every exit, the panic included.
        let running = GaugeGuard::inc(&self.running);
        self.tracker.spawn(async move {
            let _running = running;
            if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(not a string)");
                tracing::error!(
                    task = name,
                    panic = message,
                    "a control-plane task panicked"
                );
            }
        });
    }

    /// How many tasks are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels every task and waits for them for at most `grace`; returns
    /// whether all ended (the ones still running are logged).
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            tasks = self.tracker.len(),
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "tasks still running after the shutdown grace period; exiting anyway"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn tasks_are_counted_stopped_and_awaited_and_a_panic_is_survived() {
        let running = Gauge::default();
        let tasks = Tasks::new(CancellationToken::new(), running.clone());
        let stop = tasks.stop().clone();
        tasks.spawn("waits", async move { stop.cancelled().await });
        tasks.spawn("panics", async { panic!("on purpose") });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("ends with its stream", async move {
            let _ = rx.await;
        });
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.len() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(running.get(), 1);
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
        assert!(tasks.is_empty());
        assert_eq!(running.get(), 0);
    }
}
