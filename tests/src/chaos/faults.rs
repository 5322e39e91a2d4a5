//! The fault injector: a seeded random choice of fault every few seconds.
//!
//! | fault | heals |
//! |---|---|
//! | SIGKILL or SIGTERM an app or a sidecar | restarted after 1-4 s (an app on its address; a sidecar on new ports, same instance id) |
//! | SIGSTOP an app or a sidecar | SIGCONT after 0.5-2.5 s, one pause in four after 11-14 s (beyond the 10 s lease TTL) |
//! | SIGKILL, SIGTERM or SIGSTOP a control-plane replica | restarted (same gRPC address) after 1-4 s, or continued as above |
//! | SIGKILL, SIGTERM or SIGSTOP an etcd member | restarted (same data) after 1-4 s, or continued as above |
//! | `weftctl apply` of a valid policy | - |
//! | `weftctl apply` of an invalid policy (must be refused), or an invalid policy written straight to etcd (must be ignored) | the next valid apply |
//!
//! Besides the fault drawn at each tick, every third tick changes a policy,
//! in turn: invalid into etcd, valid, invalid through weftctl, valid (so
//! even the short run tries each kind).
//! | add an instance (at most 4 a service) or remove one (SIGTERM; at least 2 stay) | - |
//!
//! At most one instance of a service, one control-plane replica and one etcd
//! member are disrupted at a time (so a quorum and a control plane always
//! remain). Every choice comes from one `StdRng` seeded with the run's seed,
//! so a seed replays the same sequence of choices (their timing, and so
//! what they hit in flight, still depends on the machine).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::policy;
use super::timeline::Down;
use super::topology::{CONTROL_PLANES, ETCD_MEMBERS, Mesh, Part, SERVICES};

/// Most instances a service grows to by "add an instance".
const MAX_INSTANCES: usize = 4;
/// Fewest instances "remove an instance" leaves.
const MIN_INSTANCES: usize = 2;

/// What the injector did, for the report.
#[derive(Debug, Default)]
pub struct FaultLog {
    /// Faults injected, by kind.
    pub counts: Mutex<BTreeMap<String, usize>>,
    /// Invalid policies offered to `weftctl apply`, and how many it accepted.
    pub invalid_via_weftctl: Mutex<(usize, usize)>,
    /// Invalid policies written straight to etcd.
    pub invalid_via_etcd: Mutex<usize>,
    /// Faults that could not be injected or healed, with the error.
    pub errors: Mutex<Vec<String>>,
}

impl FaultLog {
    fn count(&self, kind: impl Into<String>) {
        *self.counts.lock().unwrap().entry(kind.into()).or_default() += 1;
    }

    fn error(&self, mesh: &Mesh, what: String) {
        mesh.timeline.note(format!("error: {what}"));
        self.errors.lock().unwrap().push(what);
    }
}

/// Injects faults into `mesh` from `seed`, about one every `every`, until
/// `until`; then waits until every fault has healed.
pub async fn run(mesh: Arc<Mesh>, log: Arc<FaultLog>, seed: u64, every: Duration, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut busy: BTreeSet<String> = BTreeSet::new();
    let mut tasks: JoinSet<Vec<String>> = JoinSet::new();
    let mut policy_n = 0_usize;
    loop {
        let pause = every.mul_f64(rng.random_range(0.5..1.5));
        if Instant::now() + pause >= until {
            break;
        }
        tokio::time::sleep(pause).await;
        while let Some(done) = tasks.try_join_next() {
            for key in done.unwrap_or_default() {
                busy.remove(&key);
            }
        }
        policy_n += 1;
        // Every third tick, a policy change besides the process fault, in
        // turn: invalid into etcd, valid, invalid through weftctl, valid.
        if policy_n.is_multiple_of(3) {
            let service = SERVICES[rng.random_range(0..SERVICES.len())];
            let change = match (policy_n / 3) % 4 {
                0 => PolicyChange::InvalidEtcd,
                2 => PolicyChange::InvalidWeftctl,
                _ => PolicyChange::Valid,
            };
            tasks.spawn(change_policy(
                Arc::clone(&mesh),
                Arc::clone(&log),
                service,
                policy_n,
                change,
            ));
        }
        for _ in 0..10 {
            if let Some((keys, task)) = choose(&mesh, &log, &mut rng, &busy, policy_n) {
                busy.extend(keys.iter().cloned());
                tasks.spawn(async move {
                    task.await;
                    keys
                });
                break;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Draws one fault; `None` if what was drawn cannot be done now (the caller
/// draws again).
fn choose(
    mesh: &Arc<Mesh>,
    log: &Arc<FaultLog>,
    rng: &mut StdRng,
    busy: &BTreeSet<String>,
    policy_n: usize,
) -> Option<(Vec<String>, Task)> {
    let mesh = Arc::clone(mesh);
    let log = Arc::clone(log);
    let service = SERVICES[rng.random_range(0..SERVICES.len())];
    let svc_key = format!("service:{service}");
    let heal = Duration::from_millis(rng.random_range(1000..4000));
    // One pause in four outlasts the control plane's lease TTL (10 s).
    let pause = if rng.random_bool(0.25) {
        Duration::from_millis(rng.random_range(11_000..14_000))
    } else {
        Duration::from_millis(rng.random_range(500..2500))
    };
    let roll = rng.random_range(0..100);
    match roll {
        // An app or a sidecar: killed, terminated or paused.
        0..45 => {
            if busy.contains(&svc_key) {
                return None;
            }
            let instances = mesh.instances_of(service);
            let instance = instances
                .get(rng.random_range(0..instances.len().max(1)))?
                .clone();
            let part = if rng.random_bool(0.5) {
                Part::App
            } else {
                Part::Sidecar
            };
            let why = [Down::Kill, Down::Term, Down::Stop][rng.random_range(0..3)];
            let wait = if why == Down::Stop { pause } else { heal };
            let what = format!("{why} {} {}", part_name(part), instance.id);
            log.count(format!("{why} {}", part_name(part)));
            mesh.timeline
                .note(format!("fault: {what}, back after {wait:?}"));
            Some((
                vec![svc_key],
                Box::pin(async move {
                    if let Err(error) = mesh.down(&instance, part, why).await {
                        return log.error(&mesh, format!("{what}: {error:#}"));
                    }
                    tokio::time::sleep(wait).await;
                    heal_until_up(&mesh, &log, &what, || mesh.up(&instance, part)).await;
                }),
            ))
        }
        // A control-plane replica.
        45..55 => {
            if busy.contains("control-plane") {
                return None;
            }
            let i = rng.random_range(0..CONTROL_PLANES);
            let why = [Down::Kill, Down::Term, Down::Stop][rng.random_range(0..3)];
            let wait = if why == Down::Stop { pause } else { heal };
            let what = format!("{why} control-plane {i}");
            log.count(format!("{why} control plane"));
            mesh.timeline
                .note(format!("fault: {what}, back after {wait:?}"));
            Some((
                vec!["control-plane".to_owned()],
                Box::pin(async move {
                    if let Err(error) = mesh.cp_down(i, why).await {
                        return log.error(&mesh, format!("{what}: {error:#}"));
                    }
                    tokio::time::sleep(wait).await;
                    heal_until_up(&mesh, &log, &what, || mesh.cp_up(i)).await;
                }),
            ))
        }
        // An etcd member.
        55..65 => {
            if busy.contains("etcd") {
                return None;
            }
            let i = rng.random_range(0..ETCD_MEMBERS);
            let why = [Down::Kill, Down::Term, Down::Stop][rng.random_range(0..3)];
            let wait = if why == Down::Stop { pause } else { heal };
            let what = format!("{why} etcd e{i}");
            log.count(format!("{why} etcd member"));
            mesh.timeline
                .note(format!("fault: {what}, back after {wait:?}"));
            Some((
                vec!["etcd".to_owned()],
                Box::pin(async move {
                    if let Err(error) = mesh.etcd_down(i, why).await {
                        return log.error(&mesh, format!("{what}: {error:#}"));
                    }
                    tokio::time::sleep(wait).await;
                    heal_until_up(&mesh, &log, &what, || mesh.etcd_up(i)).await;
                }),
            ))
        }
        // A policy change (besides the regular ones every third tick).
        65..80 => {
            let change = [
                PolicyChange::Valid,
                PolicyChange::InvalidWeftctl,
                PolicyChange::InvalidEtcd,
            ][rng.random_range(0..3)];
            Some((
                Vec::new(),
                Box::pin(async move {
                    change_policy(mesh, log, service, policy_n, change).await;
                }),
            ))
        }
        // Add an instance.
        80..90 => {
            if busy.contains(&svc_key) || mesh.instances_of(service).len() >= MAX_INSTANCES {
                return None;
            }
            log.count("instance added");
            mesh.timeline
                .note(format!("fault: add an instance of {service}"));
            Some((
                vec![svc_key],
                Box::pin(async move {
                    if let Err(error) = mesh.add_instance(service).await {
                        log.error(&mesh, format!("adding an instance of {service}: {error:#}"));
                    }
                }),
            ))
        }
        // Remove an instance.
        _ => {
            let instances = mesh.instances_of(service);
            if busy.contains(&svc_key) || instances.len() <= MIN_INSTANCES {
                return None;
            }
            let instance = instances[rng.random_range(0..instances.len())].clone();
            log.count("instance removed");
            mesh.timeline.note(format!("fault: remove {}", instance.id));
            Some((
                vec![svc_key],
                Box::pin(async move {
                    if let Err(error) = mesh.remove_instance(&instance).await {
                        log.error(&mesh, format!("removing {}: {error:#}", instance.id));
                    }
                }),
            ))
        }
    }
}

/// A policy change the injector makes.
#[derive(Debug, Clone, Copy)]
enum PolicyChange {
    /// `weftctl apply` of a valid policy.
    Valid,
    /// `weftctl apply` of an invalid one: must be refused.
    InvalidWeftctl,
    /// An invalid one written straight to etcd: must be ignored.
    InvalidEtcd,
}

/// Makes `change` to `service`'s policy (number `n`); nothing to heal.
async fn change_policy(
    mesh: Arc<Mesh>,
    log: Arc<FaultLog>,
    service: &'static str,
    n: usize,
    change: PolicyChange,
) -> Vec<String> {
    let what = match change {
        PolicyChange::Valid => "valid policy applied",
        PolicyChange::InvalidWeftctl => "invalid policy (weftctl apply)",
        PolicyChange::InvalidEtcd => "invalid policy (etcd put)",
    };
    log.count(what);
    mesh.timeline
        .note(format!("fault: {what}: #{n} of {service}"));
    match change {
        PolicyChange::Valid => match mesh.apply_policy(service, &policy::valid(service, n)).await {
            Ok(out) if out.status.success() => {}
            Ok(out) => log.error(&mesh, format!("valid policy refused: {}", out.all())),
            Err(error) => log.error(&mesh, format!("valid policy: {error:#}")),
        },
        PolicyChange::InvalidEtcd => {
            let text = policy::invalid(service, n);
            match mesh.etcd_put(&policy::etcd_key(service), &text).await {
                Ok(()) => *log.invalid_via_etcd.lock().unwrap() += 1,
                Err(error) => log.error(&mesh, format!("etcd put: {error:#}")),
            }
        }
        PolicyChange::InvalidWeftctl => {
            let text = policy::invalid(service, n);
            match mesh.apply_policy(service, &text).await {
                Ok(out) => {
                    let mut counts = log.invalid_via_weftctl.lock().unwrap();
                    counts.0 += 1;
                    if out.status.success() {
                        counts.1 += 1;
                    }
                }
                Err(error) => log.error(&mesh, format!("invalid policy: {error:#}")),
            }
        }
    }
    Vec::new()
}

fn part_name(part: Part) -> &'static str {
    match part {
        Part::App => "app",
        Part::Sidecar => "sidecar",
    }
}

/// Heals with `up`, retrying every second for up to 30 s (a control plane
/// may refuse to start while an etcd member is down); a failure is logged
/// and left to the final heal.
async fn heal_until_up<F, Fut>(mesh: &Mesh, log: &FaultLog, what: &str, mut up: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    loop {
        match up().await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    log.error(mesh, format!("bringing back after {what}: {error:#}"));
                }
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
