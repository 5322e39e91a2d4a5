//! The invariants, judged from what the run recorded.
//!
//! **No failed request that a retry could have saved.** Every request of the
//! steady traffic is a `GET` (idempotent). One that did not get a 2xx is
//! *excused* when
//!
//! 1. its caller's sidecar was not up for the whole request (the app's own
//!    sidecar died under it: nothing in the mesh could answer it), or
//! 2. it was in flight (sent at or before, answered at or after) when a
//!    process on its possible path was signalled down: its caller's
//!    sidecar, or the app or sidecar of any instance of the service it
//!    called (SIGKILL, SIGTERM, SIGSTOP, removal), or
//! 3. no instance of the service it called was *healthy* over the whole
//!    request: app and sidecar both up, not paused, since at least
//!    [`SETTLE`] before it was sent, until it was answered.
//!
//! Any other failure is *unsaved*: a healthy instance lived throughout and
//! nothing on its path failed under it, so the caller's sidecar should have
//! retried it there. Requests to the overload case's service during the
//! overload and the recovery after it are judged by the overload rows
//! instead.
//!
//! The other rows are described where they are computed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::faults::FaultLog;
use super::observe::Samples;
use super::report::Row;
use super::timeline::{Down, Event, Lifelines, Proc};
use super::traffic::{Kind, Record};

/// How long an instance must have served before it counts as healthy
/// (time for its registration to reach the callers).
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long after the overload ends success must be back to 100%.
pub const RECOVERY: Duration = Duration::from_secs(5);
/// How long after the last fault every sidecar must hold the control
/// plane's revision.
pub const SYNC: Duration = Duration::from_secs(2);
/// How much more a sidecar may hold at its peak in the overload than the
/// most any sidecar held before it.
pub const OVERLOAD_RSS_GROWTH_KIB: u64 = 32 * 1024;

/// When each phase began and ended (offsets from the start of the run).
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub traffic_start: Duration,
    pub chaos_start: Duration,
    pub chaos_end: Duration,
    pub healed: Duration,
    pub overload_start: Duration,
    pub overload_end: Duration,
    pub end: Duration,
}

/// The end-of-chaos revision check.
#[derive(Debug, Clone, Default)]
pub struct SyncCheck {
    /// The revision the control planes hold after the last write.
    pub revision: Option<u64>,
    /// Every control plane's revision then.
    pub cp_revisions: Vec<Option<u64>>,
    /// How long after the last write every sidecar held it (`None`: not
    /// within the check's patience).
    pub reached_after: Option<Duration>,
    pub sidecars: usize,
    /// Sidecars still behind at the end of the check, with their version.
    pub lagging: Vec<String>,
}

/// The end-of-chaos registration check.
#[derive(Debug, Clone, Default)]
pub struct RegistryCheck {
    /// Live instances (sidecar running) expected in the directory.
    pub live: usize,
    /// Control-plane replicas asked.
    pub replicas: usize,
    /// Live instances some replica does not list (`replica: id address`).
    pub missing: Vec<String>,
    /// Listed instances that are not live (`replica: id address`).
    pub stale: Vec<String>,
    /// How long until every live instance was listed.
    pub took: Option<Duration>,
}

/// Everything the rows are computed from.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub records: &'a [Record],
    pub events: &'a [Event],
    /// Every instance ever started, with its service.
    pub instances: &'a BTreeMap<String, String>,
    pub phases: Phases,
    pub samples: &'a Samples,
    pub faults: &'a FaultLog,
    pub sync: &'a SyncCheck,
    pub registry: &'a RegistryCheck,
    /// Processes the final heal could not bring back.
    pub unhealed: &'a [String],
    pub overload_target: &'a str,
    pub rss_limit_kib: u64,
}

/// How a request that did not succeed is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    CallerDown,
    InFlight(Down),
    NoHealthyInstance,
    Unsaved,
}

/// Judges one failed request (see the module docs).
pub fn judge(record: &Record, lines: &Lifelines, instances: &BTreeMap<String, String>) -> Verdict {
    let (from, to) = (record.sent, record.end());
    let caller = Proc::Sidecar(record.caller.clone());
    if !lines.steadily_up(&caller, from, to, Duration::ZERO) {
        return Verdict::CallerDown;
    }
    if let Some(why) = lines.downs_within(&caller, from, to).into_iter().next() {
        return Verdict::InFlight(why);
    }
    let of_callee: Vec<&String> = instances
        .iter()
        .filter(|(_, service)| **service == record.callee)
        .map(|(id, _)| id)
        .collect();
    let mut downs: Vec<Down> = of_callee
        .iter()
        .flat_map(|id| {
            let mut d = lines.downs_within(&Proc::App((*id).clone()), from, to);
            d.extend(lines.downs_within(&Proc::Sidecar((*id).clone()), from, to));
            d
        })
        .collect();
    downs.sort();
    if let Some(why) = downs.first() {
        return Verdict::InFlight(*why);
    }
    let healthy = of_callee.iter().any(|id| {
        lines.steadily_up(&Proc::App((*id).clone()), from, to, SETTLE)
            && lines.steadily_up(&Proc::Sidecar((*id).clone()), from, to, SETTLE)
    });
    if healthy {
        Verdict::Unsaved
    } else {
        Verdict::NoHealthyInstance
    }
}

/// Every row of the table, and the details worth printing.
pub fn rows(ev: &Evidence<'_>) -> (Vec<Row>, Vec<String>) {
    let mut details = Vec::new();
    let rows = vec![
        no_failure_a_retry_could_save(ev, &mut details),
        no_live_registration_lost(ev, &mut details),
        sidecars_in_sync(ev, &mut details),
        no_invalid_policy_in_force(ev, &mut details),
        sidecar_memory_bounded(ev),
        every_process_came_back(ev, &mut details),
        overload_refusals_named(ev, &mut details),
        overload_memory_bounded(ev),
        overload_recovery(ev, &mut details),
    ];
    (rows, details)
}

/// True for a steady request the overload case judges instead.
fn in_overload_case(ev: &Evidence<'_>, r: &Record) -> bool {
    r.callee == ev.overload_target && r.sent >= ev.phases.overload_start
}

fn no_failure_a_retry_could_save(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let lines = Lifelines::new(ev.events);
    let steady: Vec<&Record> = ev
        .records
        .iter()
        .filter(|r| r.kind == Kind::Steady && !in_overload_case(ev, r))
        .collect();
    let failed: Vec<&Record> = steady.iter().copied().filter(|r| !r.succeeded()).collect();
    let mut verdicts: BTreeMap<Verdict, Vec<&Record>> = BTreeMap::new();
    for record in &failed {
        verdicts
            .entry(judge(record, &lines, ev.instances))
            .or_default()
            .push(record);
    }
    let count = |v: Verdict| verdicts.get(&v).map_or(0, Vec::len);
    let in_flight: Vec<String> = [Down::Kill, Down::Term, Down::Stop, Down::Remove]
        .into_iter()
        .filter(|d| count(Verdict::InFlight(*d)) > 0)
        .map(|d| format!("{d} {}", count(Verdict::InFlight(d))))
        .collect();
    let unsaved = verdicts.get(&Verdict::Unsaved).cloned().unwrap_or_default();
    if !unsaved.is_empty() {
        details.push(format!(
            "unsaved failures ({}; the first 20, with the faults of the second before):",
            unsaved.len()
        ));
        for r in unsaved.iter().take(20) {
            let near: Vec<String> = ev
                .events
                .iter()
                .filter(|e| e.at + Duration::from_secs(1) >= r.sent && e.at <= r.end())
                .map(|e| e.to_string().trim().to_owned())
                .collect();
            details.push(format!("  {}  [{}]", r.describe(), near.join("; ")));
        }
    }
    Row::new(
        "no failed request a retry could have saved",
        unsaved.is_empty(),
        format!(
            "{} GETs, {} not 2xx: {} in flight at a fault ({}), {} caller's sidecar down, \
             {} with no healthy instance, {} unsaved",
            steady.len(),
            failed.len(),
            in_flight_total(&verdicts),
            if in_flight.is_empty() {
                "-".to_owned()
            } else {
                in_flight.join(", ")
            },
            count(Verdict::CallerDown),
            count(Verdict::NoHealthyInstance),
            unsaved.len()
        ),
    )
}

fn in_flight_total(verdicts: &BTreeMap<Verdict, Vec<&Record>>) -> usize {
    verdicts
        .iter()
        .filter(|(v, _)| matches!(v, Verdict::InFlight(_)))
        .map(|(_, r)| r.len())
        .sum()
}

/// Every instance whose sidecar runs at the end is listed (id and the
/// sidecar's inbound address) by `weftctl get instances` on every replica.
fn no_live_registration_lost(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let r = ev.registry;
    for line in r.missing.iter().take(20) {
        details.push(format!("missing from the directory: {line}"));
    }
    for line in r.stale.iter().take(20) {
        details.push(format!("listed but not live (not a failure): {line}"));
    }
    Row::new(
        "no registration of a live instance lost",
        r.missing.is_empty() && r.live > 0 && r.replicas > 0,
        format!(
            "{} live instances x {} replicas: {} missing, {} stale listed{}",
            r.live,
            r.replicas,
            r.missing.len(),
            r.stale.len(),
            r.took
                .map(|t| format!(", all listed after {:.1}s", t.as_secs_f64()))
                .unwrap_or_default()
        ),
    )
}

/// After the last fault (every process back, then a valid policy applied
/// to every service), every sidecar reports (`/endpoints`
/// `control_plane.version`) the revision both replicas hold, within [`SYNC`].
fn sidecars_in_sync(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let s = ev.sync;
    for line in s.lagging.iter().take(20) {
        details.push(format!("behind the control plane: {line}"));
    }
    let pass = s.revision.is_some() && s.reached_after.is_some_and(|t| t <= SYNC);
    Row::new(
        "every sidecar at the control plane's revision within 2 s of the last fault",
        pass,
        format!(
            "revision {} (replicas at {}), {} sidecars, {}",
            s.revision.map_or("?".to_owned(), |r| r.to_string()),
            s.cp_revisions
                .iter()
                .map(|r| r.map_or("?".to_owned(), |r| r.to_string()))
                .collect::<Vec<_>>()
                .join(" / "),
            s.sidecars,
            match s.reached_after {
                Some(t) => format!("all there after {:.2}s", t.as_secs_f64()),
                None => format!("{} still behind", s.lagging.len()),
            }
        ),
    )
}

/// No sidecar ever showed an invalid policy's marker in force, and
/// `weftctl apply` refused every invalid policy.
fn no_invalid_policy_in_force(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let violations = ev.samples.violations.lock().unwrap().clone();
    for v in violations.iter().take(10) {
        details.push(format!(
            "invalid policy in force at {:.1}s: sidecar {} service {} load_balancer {}",
            v.at.as_secs_f64(),
            v.sidecar,
            v.service,
            v.load_balancer
        ));
    }
    let (offered, accepted) = *ev.faults.invalid_via_weftctl.lock().unwrap();
    let via_etcd = *ev.faults.invalid_via_etcd.lock().unwrap();
    let reads = *ev.samples.policy_reads.lock().unwrap();
    Row::new(
        "no invalid policy ever in force",
        violations.is_empty() && accepted == 0 && reads > 0,
        format!(
            "{reads} policies sampled in force, {} with the invalid marker; invalid policies: \
             {offered} via weftctl ({accepted} accepted), {via_etcd} written to etcd",
            violations.len()
        ),
    )
}

fn max_rss(samples: &[super::observe::Rss]) -> Option<&super::observe::Rss> {
    samples.iter().max_by_key(|s| s.kib)
}

/// Every sample of every sidecar's RSS, the whole run, under the limit.
fn sidecar_memory_bounded(ev: &Evidence<'_>) -> Row {
    let all = ev.samples.rss.lock().unwrap().clone();
    let mut sorted: Vec<u64> = all.iter().map(|s| s.kib).collect();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = max_rss(&all);
    Row::new(
        "RSS of every sidecar bounded",
        !all.is_empty() && max.is_some_and(|m| m.kib <= ev.rss_limit_kib),
        format!(
            "{} samples, median {:.1} MiB, max {} (limit {:.0} MiB)",
            all.len(),
            median as f64 / 1024.0,
            max.map_or("-".to_owned(), |m| format!(
                "{:.1} MiB ({} at {:.0}s)",
                m.kib as f64 / 1024.0,
                m.sidecar,
                m.at.as_secs_f64()
            )),
            ev.rss_limit_kib as f64 / 1024.0
        ),
    )
}

/// Every process taken down came back (the final heal retries for 30 s).
fn every_process_came_back(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let errors = ev.faults.errors.lock().unwrap().clone();
    for line in errors.iter().take(20) {
        details.push(format!("fault injector: {line}"));
    }
    for line in ev.unhealed {
        details.push(format!("not brought back: {line}"));
    }
    let counts = ev.faults.counts.lock().unwrap().clone();
    let total: usize = counts.values().sum();
    details.push(format!(
        "faults injected ({total}): {}",
        counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Row::new(
        "every process taken down came back",
        ev.unhealed.is_empty() && total > 0,
        format!(
            "{total} faults, {} errors injecting or healing (retried), {} not back",
            errors.len(),
            ev.unhealed.len()
        ),
    )
}

/// Every overload request that did not succeed was answered by the mesh
/// with a status and a `weft-reason` (no reset, no timeout of the client).
fn overload_refusals_named(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let overload: Vec<&Record> = ev
        .records
        .iter()
        .filter(|r| r.kind == Kind::Overload)
        .collect();
    let ok = overload.iter().filter(|r| r.succeeded()).count();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut unnamed = Vec::new();
    for r in overload.iter().filter(|r| !r.succeeded()) {
        match (&r.reason, r.status) {
            (Some(reason), Some(status)) => {
                *reasons.entry(format!("{status} {reason}")).or_default() += 1;
            }
            _ => unnamed.push(*r),
        }
    }
    for r in unnamed.iter().take(10) {
        details.push(format!("unnamed refusal in the overload: {}", r.describe()));
    }
    let mut named = String::new();
    for (reason, n) in &reasons {
        let _ = write!(named, "{reason} {n}, ");
    }
    Row::new(
        "overload: every refusal named (weft-reason)",
        unnamed.is_empty() && !overload.is_empty(),
        format!(
            "{} sent at 3x capacity, {ok} 2xx, refused: {}{} unnamed",
            overload.len(),
            named,
            unnamed.len()
        ),
    )
}

/// No sidecar's RSS in the overload exceeded the limit, nor the most any
/// sidecar held before it by more than [`OVERLOAD_RSS_GROWTH_KIB`].
fn overload_memory_bounded(ev: &Evidence<'_>) -> Row {
    let p = ev.phases;
    let before = ev.samples.rss_within(p.traffic_start, p.overload_start);
    let during = ev.samples.rss_within(p.overload_start, p.end);
    let before_max = max_rss(&before).map_or(0, |s| s.kib);
    let during_max = max_rss(&during).map_or(0, |s| s.kib);
    let bound = (before_max + OVERLOAD_RSS_GROWTH_KIB).min(ev.rss_limit_kib);
    Row::new(
        "overload: sidecar memory bounded",
        !during.is_empty() && during_max <= bound,
        format!(
            "max {:.1} MiB in the overload, {:.1} MiB before (bound {:.1} MiB)",
            during_max as f64 / 1024.0,
            before_max as f64 / 1024.0,
            bound as f64 / 1024.0
        ),
    )
}

/// Every request to the overloaded service sent from [`RECOVERY`] after the
/// overload ended succeeded (steady and normal-rate ones alike); and the
/// time from the end to the last failure is shown.
fn overload_recovery(ev: &Evidence<'_>, details: &mut Vec<String>) -> Row {
    let end = ev.phases.overload_end;
    let after: Vec<&Record> = ev
        .records
        .iter()
        .filter(|r| r.callee == ev.overload_target && r.kind != Kind::Overload && r.sent >= end)
        .collect();
    let last_failure = after
        .iter()
        .filter(|r| !r.succeeded())
        .map(|r| r.sent)
        .max();
    let recovered_after = last_failure.map_or(Duration::ZERO, |t| t - end);
    let late: Vec<&&Record> = after
        .iter()
        .filter(|r| !r.succeeded() && r.sent >= end + RECOVERY)
        .collect();
    for r in late.iter().take(10) {
        details.push(format!("failed after the recovery time: {}", r.describe()));
    }
    let checked = after.iter().filter(|r| r.sent >= end + RECOVERY).count();
    Row::new(
        "overload: success back to 100% within 5 s of its end",
        late.is_empty() && checked > 0,
        format!(
            "{} requests after the end, last failure {:.2}s after it, {} of {checked} \
             sent after 5 s failed",
            after.len(),
            recovered_after.as_secs_f64(),
            late.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::timeline::Change;

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn event(at: u64, proc: Proc, change: Change) -> Event {
        Event {
            at: s(at),
            proc,
            change,
        }
    }

    fn failed(sent: u64, took: u64) -> Record {
        Record {
            seq: 0,
            kind: Kind::Steady,
            sent: s(sent),
            took: s(took),
            caller: "orders-1".into(),
            callee: "billing".into(),
            status: Some(502),
            reason: None,
            limit: None,
            backend: None,
            error: None,
        }
    }

    #[test]
    fn failures_are_excused_only_by_a_fault_in_flight_or_no_healthy_instance() {
        let app = |id: &str| Proc::App(id.into());
        let sidecar = |id: &str| Proc::Sidecar(id.into());
        let events = vec![
            event(0, sidecar("orders-1"), Change::Up),
            event(0, app("billing-1"), Change::Up),
            event(0, sidecar("billing-1"), Change::Up),
            event(0, app("billing-2"), Change::Up),
            event(0, sidecar("billing-2"), Change::Up),
            // billing-1's app is killed at 5 s and back at 8 s.
            event(5000, app("billing-1"), Change::Down(Down::Kill)),
            event(8000, app("billing-1"), Change::Up),
            // billing-2's sidecar is paused from 6 s to 7 s.
            event(6000, sidecar("billing-2"), Change::Down(Down::Stop)),
            event(7000, sidecar("billing-2"), Change::Up),
        ];
        let lines = Lifelines::new(&events);
        let instances: BTreeMap<String, String> = [
            ("orders-1", "orders"),
            ("billing-1", "billing"),
            ("billing-2", "billing"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        // In flight at the kill.
        assert_eq!(
            judge(&failed(4900, 200), &lines, &instances),
            Verdict::InFlight(Down::Kill)
        );
        // After the kill, billing-2 healthy: a retry could have saved it.
        assert_eq!(
            judge(&failed(5500, 100), &lines, &instances),
            Verdict::Unsaved
        );
        // During the pause nobody is healthy.
        assert_eq!(
            judge(&failed(6500, 100), &lines, &instances),
            Verdict::NoHealthyInstance
        );
        // Just after the pause, billing-2 has not settled yet.
        assert_eq!(
            judge(&failed(7500, 100), &lines, &instances),
            Verdict::NoHealthyInstance
        );
        assert_eq!(
            judge(&failed(8100, 100), &lines, &instances),
            Verdict::Unsaved
        );
        // A caller sidecar that was never up.
        let mut other = failed(3000, 10);
        other.caller = "search-9".into();
        assert_eq!(judge(&other, &lines, &instances), Verdict::CallerDown);
    }
}
