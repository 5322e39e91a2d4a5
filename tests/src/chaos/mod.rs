//! The chaos run: a whole mesh under steady traffic while a seeded fault
//! injector takes its processes away, then an overload; judged at the end
//! against invariants printed as a table.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | [`topology`] | the mesh (etcd x3, control plane x2, 3 services x 3 instances, each an app process behind its own sidecar, mTLS) and every operation on it |
//! | [`app`] | the app process (`weft-chaos app`, the harness's backend) and its guard |
//! | [`timeline`] | when each process went down and came back |
//! | [`traffic`] | fixed-rate `GET`s between services through the callers' sidecars, each recorded |
//! | [`faults`] | the seeded fault injector |
//! | [`policy`] | the valid and invalid policies it applies |
//! | [`observe`] | samplers: sidecar RSS, policies in force |
//! | [`invariants`] | the checks, from the records |
//! | [`report`] | the table |
//!
//! # Phases
//!
//! 1. Start the mesh; wait until every sidecar reaches every other service.
//! 2. Steady traffic for a warm-up, then faults for the chaos phase.
//! 3. Heal everything; apply a valid policy to every service (the last
//!    fault) and check every sidecar holds the control plane's revision
//!    within 2 s; check every live instance is registered.
//! 4. Overload: `GET /slow?ms=100` to one service at 3x its capacity
//!    (instances x the `slow` route's `max_concurrency` / 100 ms), then at a
//!    third of it; the steady traffic goes on throughout.
//!
//! `benches/chaos.sh` runs `weft-chaos` (src/bin/weft-chaos.rs) for minutes;
//! `tests/tests/chaos.rs` runs [`Options::short`] (about a minute).

pub mod app;
pub mod faults;
pub mod invariants;
pub mod observe;
pub mod policy;
pub mod report;
pub mod timeline;
pub mod topology;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::Instant;

use self::faults::FaultLog;
use self::invariants::{Evidence, Phases, RegistryCheck, SyncCheck};
use self::observe::Samples;
use self::report::Report;
use self::timeline::Timeline;
use self::topology::{CONTROL_PLANES, Mesh, SERVICES};
use self::traffic::{Kind, Load, Recorder};

/// The overload case's service.
const OVERLOAD_TARGET: &str = "billing";
/// How long each overload request holds its app (`/slow?ms=`).
const SLOW: Duration = Duration::from_millis(100);
/// How long the final heal keeps trying to bring processes back.
const HEAL_PATIENCE: Duration = Duration::from_secs(30);
/// How long the end checks keep looking before they report what they saw.
const CHECK_PATIENCE: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Steady traffic before the first fault.
    pub warm_up: Duration,
    /// How long faults are injected.
    pub chaos: Duration,
    /// Mean time between faults.
    pub fault_every: Duration,
    /// Steady requests per second over the whole mesh.
    pub rate: f64,
    /// How long the overload lasts, and the normal load after it.
    pub overload: Duration,
    pub recovery: Duration,
    /// Most a sidecar may hold resident, in KiB.
    pub rss_limit_kib: u64,
    /// The `weft-chaos` binary (it runs the apps: `weft-chaos app`).
    pub app_bin: PathBuf,
    /// Where to write the records, the event log and the report.
    pub out: Option<PathBuf>,
}

impl Options {
    /// About a minute of wall time: 25 s of faults, a 6 s overload.
    pub fn short(seed: u64, app_bin: PathBuf) -> Self {
        Self {
            seed,
            warm_up: Duration::from_secs(2),
            chaos: Duration::from_secs(25),
            fault_every: Duration::from_millis(2500),
            rate: 30.0,
            overload: Duration::from_secs(6),
            recovery: Duration::from_secs(7),
            rss_limit_kib: 128 * 1024,
            app_bin,
            out: None,
        }
    }

    /// `minutes` of faults, then a one-minute overload.
    pub fn minutes(minutes: f64, seed: u64, app_bin: PathBuf) -> Self {
        Self {
            warm_up: Duration::from_secs(5),
            chaos: Duration::from_secs_f64(minutes * 60.0),
            fault_every: Duration::from_secs(4),
            rate: 40.0,
            overload: Duration::from_secs(60),
            recovery: Duration::from_secs(15),
            ..Self::short(seed, app_bin)
        }
    }
}

/// `$CHAOS_SEED`, else a seed from the clock.
pub fn seed_from_env() -> anyhow::Result<u64> {
    match std::env::var("CHAOS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("CHAOS_SEED={text:?} is not a number")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1)),
    }
}

fn say(timeline: &Timeline, text: &str) {
    println!("chaos {:7.1}s: {text}", timeline.now().as_secs_f64());
}

/// Runs the whole chaos run and judges it. Every process it started is
/// stopped when this returns (or its future is dropped, or it panics) and
/// the runtime's tasks are gone.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let timeline = Arc::new(Timeline::new());
    say(
        &timeline,
        &format!(
            "seed {} (replay: CHAOS_SEED={} or --seed {})",
            options.seed, options.seed, options.seed
        ),
    );
    let mesh = Mesh::start(options.app_bin.clone(), Arc::clone(&timeline)).await?;
    say(
        &timeline,
        "mesh up: 3 etcd members, 2 control planes, 9 instances",
    );
    wait_until_connected(&mesh).await?;
    say(&timeline, "every sidecar reaches every other service");

    let recorder = Arc::new(Recorder::new(Arc::clone(&timeline)));
    let samples = Arc::new(Samples::default());
    let faults = Arc::new(FaultLog::default());
    let (stop_tx, stop) = watch::channel(false);
    let sampler = observe::spawn(
        Arc::clone(&mesh),
        Arc::clone(&timeline),
        Arc::clone(&samples),
        stop.clone(),
    );
    let mut phases = Phases {
        traffic_start: timeline.now(),
        ..Phases::default()
    };
    let steady = traffic::spawn(
        Arc::clone(&mesh),
        Arc::clone(&recorder),
        Load {
            kind: Kind::Steady,
            target: None,
            path: "/chaos".to_owned(),
            rate: options.rate,
        },
        stop.clone(),
    );
    tokio::time::sleep(options.warm_up).await;

    phases.chaos_start = timeline.now();
    say(
        &timeline,
        &format!(
            "faults for {:?}, one every {:?} on average; traffic {} req/s",
            options.chaos, options.fault_every, options.rate
        ),
    );
    faults::run(
        Arc::clone(&mesh),
        Arc::clone(&faults),
        options.seed,
        options.fault_every,
        Instant::now() + options.chaos,
    )
    .await;
    phases.chaos_end = timeline.now();
    let unhealed = mesh.heal_all(Instant::now() + HEAL_PATIENCE).await;
    phases.healed = timeline.now();
    say(&timeline, "faults over, every process back (or reported)");
    // Time for restarted sidecars to carry traffic to (and so follow) every service.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sync = check_sync(&mesh).await;
    let registry = check_registry(&mesh).await;
    say(&timeline, "revision and registration checks done");

    phases.overload_start = timeline.now();
    let instances = mesh.instances_of(OVERLOAD_TARGET).len();
    let capacity = instances as f64 * f64::from(policy::SLOW_MAX_CONCURRENCY) / SLOW.as_secs_f64();
    say(
        &timeline,
        &format!(
            "overload: {OVERLOAD_TARGET} ({instances} instances, capacity {capacity:.0} req/s) at {:.0} req/s for {:?}",
            3.0 * capacity,
            options.overload
        ),
    );
    let slow = format!("/slow?ms={}", SLOW.as_millis());
    let (overload_stop, overload_rx) = watch::channel(false);
    let overload = traffic::spawn(
        Arc::clone(&mesh),
        Arc::clone(&recorder),
        Load {
            kind: Kind::Overload,
            target: Some(OVERLOAD_TARGET.to_owned()),
            path: slow.clone(),
            rate: 3.0 * capacity,
        },
        overload_rx,
    );
    tokio::time::sleep(options.overload).await;
    let normal = traffic::spawn(
        Arc::clone(&mesh),
        Arc::clone(&recorder),
        Load {
            kind: Kind::Normal,
            target: Some(OVERLOAD_TARGET.to_owned()),
            path: slow,
            rate: capacity / 3.0,
        },
        stop.clone(),
    );
    let _ = overload_stop.send(true);
    phases.overload_end = timeline.now();
    say(&timeline, "overload over, normal load");
    tokio::time::sleep(options.recovery).await;
    let _ = stop_tx.send(true);
    for task in [overload, normal, steady, sampler] {
        let _ = tokio::time::timeout(traffic::REQUEST_TIMEOUT * 2, task).await;
    }
    phases.end = timeline.now();
    say(&timeline, "traffic stopped; judging");

    let records = recorder.records();
    let events = timeline.events();
    let instances: BTreeMap<String, String> = mesh
        .instances()
        .iter()
        .map(|i| (i.id.clone(), i.service.clone()))
        .collect();
    let evidence = Evidence {
        records: &records,
        events: &events,
        instances: &instances,
        phases,
        samples: &samples,
        faults: &faults,
        sync: &sync,
        registry: &registry,
        unhealed: &unhealed,
        overload_target: OVERLOAD_TARGET,
        rss_limit_kib: options.rss_limit_kib,
    };
    let (rows, details) = invariants::rows(&evidence);
    let report = Report {
        seed: options.seed,
        rows,
        details,
    };
    if let Some(dir) = &options.out {
        write_outputs(dir, &recorder, &timeline, &report)?;
    }
    Ok(report)
}

/// Waits until every sidecar gets a 2xx from every other service.
async fn wait_until_connected(mesh: &Mesh) -> anyhow::Result<()> {
    for caller in mesh.callers() {
        for service in SERVICES.iter().filter(|s| **s != caller.service) {
            let uri = format!("http://{service}/warm-up");
            crate::eventually(Duration::from_secs(30), || async {
                let reply = caller.client.get(&uri).await?;
                anyhow::ensure!(
                    reply.status.is_success(),
                    "{} via {}",
                    reply.status,
                    caller.id
                );
                Ok(())
            })
            .await
            .with_context(|| format!("{} reaching {service}", caller.id))?;
        }
    }
    Ok(())
}

/// Applies a valid policy to every service (the last fault), then polls
/// until both replicas hold one revision and every sidecar reports it.
async fn check_sync(mesh: &Mesh) -> SyncCheck {
    let mut check = SyncCheck::default();
    for (k, service) in SERVICES.iter().enumerate() {
        let applied = mesh
            .apply_policy(service, &policy::valid(service, 1_000_000 + k))
            .await
            .and_then(|out| out.ok().map(|_| ()));
        if let Err(error) = applied {
            check.lagging.push(format!(
                "the last policy of {service} was not applied: {error:#}"
            ));
            return check;
        }
    }
    let applied = Instant::now();
    loop {
        let revisions = mesh.cp_revisions().await;
        let target = revisions.iter().flatten().max().copied();
        check.cp_revisions = revisions.clone();
        check.revision = target;
        if let Some(target) = target
            && revisions.iter().all(|r| *r == Some(target))
        {
            let observed = mesh.observed();
            check.sidecars = observed.len();
            check.lagging.clear();
            for sidecar in &observed {
                let version =
                    match tokio::time::timeout(Duration::from_secs(1), sidecar.admin.endpoints())
                        .await
                    {
                        Ok(Ok(endpoints)) => endpoints.0["control_plane"]["version"].as_u64(),
                        _ => None,
                    };
                if version.is_none_or(|v| v < target) {
                    check
                        .lagging
                        .push(format!("sidecar {} at version {version:?}", sidecar.id));
                }
            }
            if check.lagging.is_empty() {
                check.reached_after = Some(applied.elapsed());
                return check;
            }
        }
        if applied.elapsed() >= CHECK_PATIENCE {
            return check;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until every replica lists every live instance (id and inbound
/// address), for at most [`CHECK_PATIENCE`].
async fn check_registry(mesh: &Mesh) -> RegistryCheck {
    let started = Instant::now();
    loop {
        let live: BTreeSet<(String, String)> = mesh
            .observed()
            .into_iter()
            .map(|o| (o.id, o.inbound.to_string()))
            .collect();
        let mut check = RegistryCheck {
            live: live.len(),
            replicas: CONTROL_PLANES,
            ..RegistryCheck::default()
        };
        for service in SERVICES {
            let lists = mesh.directory(service).await;
            for (replica, listed) in lists.into_iter().enumerate() {
                let listed: BTreeSet<(String, String)> = match listed {
                    Ok(listed) => listed.into_iter().collect(),
                    Err(error) => {
                        check.missing.push(format!("replica {replica}: {error:#}"));
                        continue;
                    }
                };
                let prefix = format!("{service}-");
                for (id, addr) in live.iter().filter(|(id, _)| id.starts_with(&prefix)) {
                    if !listed.contains(&(id.clone(), addr.clone())) {
                        check
                            .missing
                            .push(format!("replica {replica}: {id} {addr}"));
                    }
                }
                for (id, addr) in listed.difference(&live) {
                    check.stale.push(format!("replica {replica}: {id} {addr}"));
                }
            }
        }
        if check.missing.is_empty() {
            check.took = Some(started.elapsed());
            return check;
        }
        if started.elapsed() >= CHECK_PATIENCE {
            return check;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn write_outputs(
    dir: &std::path::Path,
    recorder: &Recorder,
    timeline: &Timeline,
    report: &Report,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("requests.csv"), recorder.csv())?;
    let mut lines: Vec<(Duration, String)> = timeline
        .events()
        .into_iter()
        .map(|e| (e.at, e.to_string()))
        .collect();
    lines.extend(
        timeline
            .notes()
            .into_iter()
            .map(|(at, note)| (at, format!("{:8.3}s  {note}", at.as_secs_f64()))),
    );
    lines.sort_by_key(|(at, _)| *at);
    let mut log = String::new();
    for (_, line) in lines {
        let _ = writeln!(log, "{line}");
    }
    std::fs::write(dir.join("events.log"), log)?;
    std::fs::write(dir.join("report.md"), report.render())?;
    Ok(())
}
