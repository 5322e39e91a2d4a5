//! Samplers that watch the sidecars during the whole run.
//!
//! Once a second, for every sidecar that runs and is not paused:
//!
//! - its resident memory (`VmRSS` of `/proc/<pid>/status`);
//! - the policy it has in force for each service the control plane pushed
//!   to it, as `/endpoints` shows it (`load_balancer`): a service shown with
//!   [`policy::INVALID_MARKER`] means an invalid policy was in force.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::policy;
use super::timeline::Timeline;
use super::topology::Mesh;

/// How often the samplers look.
const PERIOD: Duration = Duration::from_secs(1);
/// Upper bound of one `/endpoints` read.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One memory sample.
#[derive(Debug, Clone)]
pub struct Rss {
    pub at: Duration,
    pub sidecar: String,
    pub kib: u64,
}

/// A sidecar seen with an invalid policy in force.
#[derive(Debug, Clone)]
pub struct Violation {
    pub at: Duration,
    pub sidecar: String,
    pub service: String,
    pub load_balancer: String,
}

/// What the samplers saw.
#[derive(Debug, Default)]
pub struct Samples {
    pub rss: Mutex<Vec<Rss>>,
    /// (sidecar, service) policies read from `/endpoints`.
    pub policy_reads: Mutex<usize>,
    /// Load balancers seen in force, and how often.
    pub balancers: Mutex<BTreeMap<String, usize>>,
    pub violations: Mutex<Vec<Violation>>,
}

impl Samples {
    /// The memory samples taken within `[from, to]`.
    pub fn rss_within(&self, from: Duration, to: Duration) -> Vec<Rss> {
        self.rss
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .cloned()
            .collect()
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Samples until `stop` says true.
pub fn spawn(
    mesh: Arc<Mesh>,
    timeline: Arc<Timeline>,
    samples: Arc<Samples>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PERIOD);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            for sidecar in mesh.observed() {
                if let Some(kib) = rss_kib(sidecar.pid) {
                    samples.rss.lock().unwrap().push(Rss {
                        at: timeline.now(),
                        sidecar: sidecar.id.clone(),
                        kib,
                    });
                }
                let Ok(Ok(endpoints)) =
                    tokio::time::timeout(ADMIN_TIMEOUT, sidecar.admin.endpoints()).await
                else {
                    continue;
                };
                let at = timeline.now();
                for service in endpoints.services().into_iter().flatten() {
                    if service["source"] != "control-plane" {
                        continue;
                    }
                    let balancer = service["load_balancer"].as_str().unwrap_or("?").to_owned();
                    *samples.policy_reads.lock().unwrap() += 1;
                    *samples
                        .balancers
                        .lock()
                        .unwrap()
                        .entry(balancer.clone())
                        .or_default() += 1;
                    if balancer == policy::INVALID_MARKER {
                        samples.violations.lock().unwrap().push(Violation {
                            at,
                            sidecar: sidecar.id.clone(),
                            service: service["name"].as_str().unwrap_or("?").to_owned(),
                            load_balancer: balancer,
                        });
                    }
                }
            }
        }
    })
}
