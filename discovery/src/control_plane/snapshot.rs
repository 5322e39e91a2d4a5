//! What this sidecar knows from the control plane, and the pure state machine
//! that applies pushed messages to it.
//!
//! A [`Tracker`] owns the current [`RemoteSnapshot`] and applies each
//! [`v1::SubscribeResponse`] of the current stream to it, following the
//! protocol in the `weft-api` crate docs:
//!
//! - **Versions** never go backwards on one stream: a message older than the
//!   last one accepted on it is ignored ([`StaleVersion`]). A new stream (a
//!   reconnection, maybe to a restarted control plane) starts over.
//! - **Full** messages replace the state of every service this sidecar knew:
//!   a known service (or one named in the stream's first request) that the
//!   message neither carries nor lists is gone, and so is one it lists in
//!   `removed`. **Deltas** replace the services they carry and drop the ones
//!   they list in `removed`; the rest is unchanged.
//! - **Validation**: each pushed service is checked on its own
//!   ([`validate`]): its name, every instance (through
//!   [`InstanceRecord`]'s conversion), and its policy (parsed by
//!   `weft-config`, for the same service). A service that fails keeps its
//!   previous state, whatever it was, and the failure is returned as a
//!   [`Rejection`] for the caller to count and log; the other services of
//!   the message still apply.
//! - Gone services are recorded in [`RemoteSnapshot::missing`], so a lookup
//!   can tell "does not exist" from "not known yet".
//! - **Warm-up**: while a stream's messages say `warming` (a control plane
//!   that started less than a lease TTL and a reconnect backoff ago, whose
//!   view may lack live instances that have not registered again yet), the
//!   instances known before the stream began that the stream has not
//!   mentioned are kept, beside what the control plane says. Once the stream
//!   has carried an instance, its word about it counts (a deregistration
//!   removes it at once); the first message without `warming` drops the rest.
//!
//! Nothing here does I/O or takes a lock; the session task owns the tracker
//! and publishes each new snapshot through a `watch` channel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use weft_api::{ConvertError, InstanceRecord, v1};
use weft_config::name::InvalidServiceName;
use weft_config::{ConfigError, Policy, ServiceName};

use weft_core::endpoint_spec::EndpointSpec;

/// One service as the control plane describes it, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteService {
    /// The service's name (a valid [`ServiceName`]).
    pub name: String,
    /// Every registered instance, as received (ids and admin addresses
    /// included, for the admin API).
    pub instances: Vec<InstanceRecord>,
    /// The instances as endpoints, in the same order: what an
    /// `EndpointsWriter` (discovery) takes.
    pub endpoints: Vec<EndpointSpec>,
    /// The service's policy, parsed and validated; `None` when it has none.
    pub policy: Option<Arc<Policy>>,
    /// The policy's TOML source as applied; `None` when it has none.
    pub policy_toml: Option<Arc<str>>,
    /// How many instances are live, for each instance's share of a
    /// service-wide limit.
    pub live_instances: u32,
}

impl RemoteService {
    /// True when `other` describes the same state (so the old `Arc` can be
    /// kept and readers can compare by pointer).
    fn same_state(&self, other: &Self) -> bool {
        self.instances == other.instances
            && self.policy_toml == other.policy_toml
            && self.live_instances == other.live_instances
    }
}

/// Everything received so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteSnapshot {
    /// The version (store revision) of the last message accepted; 0 before
    /// any. A reconnection to a control plane with a fresh store may lower it.
    pub version: i64,
    /// Every known service, by name.
    pub services: BTreeMap<String, Arc<RemoteService>>,
    /// Names the control plane said do not exist.
    pub missing: BTreeSet<String>,
}

/// What a snapshot says about one name.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The service exists, as described.
    Found(Arc<RemoteService>),
    /// The control plane said it does not exist.
    Missing,
    /// Nothing is known about it (yet).
    Unknown,
}

impl RemoteSnapshot {
    /// What this snapshot says about `name`.
    pub fn lookup(&self, name: &str) -> Lookup {
        match self.services.get(name) {
            Some(service) => Lookup::Found(Arc::clone(service)),
            None if self.missing.contains(name) => Lookup::Missing,
            None => Lookup::Unknown,
        }
    }
}

/// Why one pushed service was refused (its previous state is kept).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The service's name is not a valid service name.
    #[error("{source}")]
    Name {
        name: String,
        #[source]
        source: InvalidServiceName,
    },
    /// An instance does not convert (bad id, address or metadata).
    #[error("service {service}: instance #{index}: {source}")]
    Instance {
        service: String,
        /// Its position in the pushed list.
        index: usize,
        #[source]
        source: ConvertError,
    },
    /// An instance belongs to another service.
    #[error("service {service}: instance {id:?} is registered for service {other:?}")]
    ForeignInstance {
        service: String,
        id: String,
        other: String,
    },
    /// The policy does not parse or validate.
    #[error("service {service}: invalid policy: {source}")]
    Policy {
        service: String,
        #[source]
        source: Box<ConfigError>,
    },
    /// The policy is for another service.
    #[error("service {service}: the pushed policy is for service {other:?}")]
    PolicyService { service: String, other: String },
}

impl Rejection {
    /// The pushed service name the rejection is about.
    pub fn service(&self) -> &str {
        match self {
            Self::Name { name: service, .. }
            | Self::Instance { service, .. }
            | Self::ForeignInstance { service, .. }
            | Self::Policy { service, .. }
            | Self::PolicyService { service, .. } => service,
        }
    }
}

/// A message older than the last one accepted on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("version {version} is older than {last}, the last accepted on this stream; ignored")]
pub struct StaleVersion {
    pub version: i64,
    pub last: i64,
}

/// Checks one pushed service and builds its typed form.
pub fn validate(state: &v1::ServiceState) -> Result<RemoteService, Rejection> {
    let name: ServiceName = state.name.parse().map_err(|source| Rejection::Name {
        name: state.name.clone(),
        source,
    })?;
    let service = || name.to_string();
    let mut instances = Vec::with_capacity(state.instances.len());
    for (index, wire) in state.instances.iter().enumerate() {
        let record = InstanceRecord::try_from(wire).map_err(|source| Rejection::Instance {
            service: service(),
            index,
            source,
        })?;
        if record.service != name {
            return Err(Rejection::ForeignInstance {
                service: service(),
                id: record.id,
                other: record.service.to_string(),
            });
        }
        instances.push(record);
    }
    let (policy, policy_toml) = if state.policy_toml.is_empty() {
        (None, None)
    } else {
        let file = format!("<control-plane:{name}>");
        let policy =
            weft_config::parse_policy(&state.policy_toml, Path::new(&file)).map_err(|source| {
                Rejection::Policy {
                    service: service(),
                    source: Box::new(source),
                }
            })?;
        if policy.service != name {
            return Err(Rejection::PolicyService {
                service: service(),
                other: policy.service.to_string(),
            });
        }
        (
            Some(Arc::new(policy)),
            Some(Arc::<str>::from(state.policy_toml.as_str())),
        )
    };
    let endpoints = instances
        .iter()
        .map(|r| EndpointSpec {
            addr: r.address,
            metadata: r.metadata.clone(),
            health: r.health,
        })
        .collect();
    Ok(RemoteService {
        name: service(),
        instances,
        endpoints,
        policy,
        policy_toml,
        live_instances: state.live_instances,
    })
}

/// The result of applying one accepted message.
#[derive(Debug, Default)]
pub struct Applied {
    /// The new snapshot, when anything (the version included) changed.
    pub snapshot: Option<Arc<RemoteSnapshot>>,
    /// Services refused by validation, each keeping its previous state.
    pub rejected: Vec<Rejection>,
}

/// The state machine: the current snapshot and the current stream's position.
#[derive(Debug, Default)]
pub struct Tracker {
    /// What this sidecar uses: `truth`, plus what `held` keeps while warming.
    current: Arc<RemoteSnapshot>,
    /// What the control plane said, messages applied in turn.
    truth: Arc<RemoteSnapshot>,
    /// While the current stream's control plane is warming up: what was known
    /// when the stream began, less the instances the stream has carried.
    held: Option<Held>,
    /// Whether the current stream's last message said `warming`.
    stream_warming: bool,
    /// The last version accepted on the current stream; `None` before its
    /// first message.
    stream_version: Option<i64>,
    /// The names the current stream's first request subscribed to: a full
    /// message that does not carry one of them says it does not exist.
    stream_initial: BTreeSet<String>,
}

impl Tracker {
    /// The current snapshot.
    pub fn snapshot(&self) -> &Arc<RemoteSnapshot> {
        &self.current
    }

    /// A new stream has opened, its first request subscribing to `initial`.
    pub fn begin_stream(&mut self, initial: BTreeSet<String>) {
        self.stream_version = None;
        self.stream_initial = initial;
        // What is in use now is what a warming control plane's view may lack.
        self.held = Some(Held::new(&self.current));
        self.stream_warming = false;
    }

    /// How many instances are kept only because the control plane is warming
    /// up (0 when it is not).
    pub fn held_instances(&self) -> usize {
        match &self.held {
            Some(held) if self.stream_warming => held.len(),
            _ => 0,
        }
    }

    /// Starts from a saved snapshot (the cache), validated like a full
    /// message. Not tied to any stream.
    pub fn restore(&mut self, version: i64, services: &[v1::ServiceState]) -> Applied {
        let message = v1::SubscribeResponse {
            version,
            full: true,
            services: services.to_vec(),
            removed: Vec::new(),
            warming: false,
        };
        self.held = None;
        let applied = self.apply_unchecked(&message);
        // Whatever the cache said, the first stream starts its versions afresh.
        self.stream_version = None;
        applied
    }

    /// Applies one message of the current stream.
    pub fn apply(&mut self, message: &v1::SubscribeResponse) -> Result<Applied, StaleVersion> {
        if let Some(last) = self.stream_version
            && message.version < last
        {
            return Err(StaleVersion {
                version: message.version,
                last,
            });
        }
        Ok(self.apply_unchecked(message))
    }

    fn apply_unchecked(&mut self, message: &v1::SubscribeResponse) -> Applied {
        self.stream_version = Some(message.version);
        self.stream_warming = message.warming;
        let (truth, rejected) = self.next_truth(message);
        self.truth = Arc::new(truth);
        if message.warming {
            if let Some(held) = &mut self.held {
                held.forget_carried(message);
            }
        } else {
            self.held = None;
        }
        let mut next = match &self.held {
            Some(held) if !held.is_empty() => held.merge(&self.truth),
            _ => (*self.truth).clone(),
        };
        // Keep the `Arc`s of services whose state did not change, so readers
        // can compare by pointer.
        for (name, service) in &mut next.services {
            if let Some(previous) = self.current.services.get(name)
                && previous.same_state(service)
            {
                *service = Arc::clone(previous);
            }
        }
        let old = &self.current;
        let same_services = next.services.len() == old.services.len()
            && next
                .services
                .iter()
                .zip(&old.services)
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        let snapshot =
            if same_services && next.missing == old.missing && next.version == old.version {
                None
            } else {
                let next = Arc::new(next);
                self.current = Arc::clone(&next);
                Some(next)
            };
        Applied { snapshot, rejected }
    }

    /// The control plane's state after `message`, and what validation refused.
    fn next_truth(&self, message: &v1::SubscribeResponse) -> (RemoteSnapshot, Vec<Rejection>) {
        let old = &self.truth;
        let (mut services, mut missing) = if message.full {
            (BTreeMap::new(), BTreeSet::new())
        } else {
            (old.services.clone(), old.missing.clone())
        };
        let mut rejected = Vec::new();
        let mut mentioned = BTreeSet::new();
        for state in &message.services {
            mentioned.insert(state.name.as_str());
            match validate(state) {
                Ok(mut service) => {
                    if state.policy_refused
                        && let Some(previous) = old
                            .services
                            .get(&service.name)
                            .or_else(|| self.current.services.get(&service.name))
                    {
                        // The control plane refused the stored policy and
                        // knows no valid one: keep the policy in force here.
                        service.policy = previous.policy.clone();
                        service.policy_toml = previous.policy_toml.clone();
                    }
                    let service = match old.services.get(&service.name) {
                        Some(previous) if previous.same_state(&service) => Arc::clone(previous),
                        _ => Arc::new(service),
                    };
                    missing.remove(&service.name);
                    services.insert(service.name.clone(), service);
                }
                Err(rejection) => {
                    // Keep the previous state, whatever it was. A delta
                    // started from it already; a full message starts empty.
                    if message.full {
                        if let Some(previous) = old.services.get(&state.name) {
                            services.insert(state.name.clone(), Arc::clone(previous));
                        } else if old.missing.contains(&state.name) {
                            missing.insert(state.name.clone());
                        }
                    }
                    rejected.push(rejection);
                }
            }
        }
        for name in &message.removed {
            services.remove(name);
            missing.insert(name.clone());
        }
        if message.full {
            // A full message is the whole truth about the names it covers:
            // everything known before and everything the stream's first
            // request asked for. Those it does not carry do not exist.
            let covered = old
                .services
                .keys()
                .chain(self.current.services.keys())
                .chain(&old.missing)
                .chain(&self.stream_initial);
            for name in covered {
                if !mentioned.contains(name.as_str()) {
                    missing.insert(name.clone());
                }
            }
        }
        let truth = RemoteSnapshot {
            version: message.version,
            services,
            missing,
        };
        (truth, rejected)
    }
}

/// What a warming control plane may not know yet: the instances of each
/// service known when the stream began, less those the stream has carried.
#[derive(Debug, Default)]
struct Held {
    services: BTreeMap<String, Arc<RemoteService>>,
}

impl Held {
    fn new(known: &RemoteSnapshot) -> Self {
        Self {
            services: known.services.clone(),
        }
    }

    fn len(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Drops the instances `message` carries: the control plane knows them,
    /// and its word about them counts from now on.
    fn forget_carried(&mut self, message: &v1::SubscribeResponse) {
        for state in &message.services {
            let Some(held) = self.services.get_mut(&state.name) else {
                continue;
            };
            let carried: BTreeSet<&str> = state.instances.iter().map(|i| i.id.as_str()).collect();
            if held
                .instances
                .iter()
                .any(|r| carried.contains(r.id.as_str()))
            {
                let mut kept = (**held).clone();
                let (instances, endpoints) = kept
                    .instances
                    .into_iter()
                    .zip(kept.endpoints)
                    .filter(|(r, _)| !carried.contains(r.id.as_str()))
                    .unzip();
                kept.instances = instances;
                kept.endpoints = endpoints;
                *held = Arc::new(kept);
            }
        }
        self.services.retain(|_, s| !s.instances.is_empty());
    }

    /// `truth` with the held instances added: to a service the control plane
    /// describes (its policy and count stand, the count at least the instances
    /// in use), or as the service was known, for one it says nothing or
    /// "missing" about.
    fn merge(&self, truth: &RemoteSnapshot) -> RemoteSnapshot {
        let mut next = truth.clone();
        for (name, held) in &self.services {
            let service = match truth.services.get(name) {
                Some(told) => {
                    let mut merged = (**told).clone();
                    for (record, endpoint) in held.instances.iter().zip(&held.endpoints) {
                        if !merged.instances.iter().any(|r| r.id == record.id) {
                            merged.instances.push(record.clone());
                            merged.endpoints.push(endpoint.clone());
                        }
                    }
                    let count = u32::try_from(merged.instances.len()).unwrap_or(u32::MAX);
                    merged.live_instances = merged.live_instances.max(count);
                    Arc::new(merged)
                }
                None => Arc::clone(held),
            };
            next.missing.remove(name);
            next.services.insert(name.clone(), service);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn instance(service: &str, id: &str, port: u16) -> v1::Instance {
        v1::Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            address: format!("10.0.0.1:{port}"),
            metadata: None,
            admin_address: String::new(),
            health: 0,
        }
    }

    fn state(name: &str, ports: &[u16]) -> v1::ServiceState {
        v1::ServiceState {
            name: name.to_owned(),
            instances: ports
                .iter()
                .map(|p| instance(name, &format!("{name}-{p}"), *p))
                .collect(),
            policy_toml: String::new(),
            live_instances: u32::try_from(ports.len()).unwrap(),
            policy_refused: false,
        }
    }

    fn with_policy(mut s: v1::ServiceState, toml: &str) -> v1::ServiceState {
        s.policy_toml = toml.to_owned();
        s
    }

    fn msg(
        version: i64,
        full: bool,
        services: Vec<v1::ServiceState>,
        removed: &[&str],
    ) -> v1::SubscribeResponse {
        v1::SubscribeResponse {
            version,
            full,
            services,
            removed: removed.iter().map(|s| (*s).to_owned()).collect(),
            warming: false,
        }
    }

    fn ports(t: &Tracker, name: &str) -> Vec<u16> {
        t.snapshot().services[name]
            .endpoints
            .iter()
            .map(|e| e.addr.port())
            .collect()
    }

    fn names<'a>(set: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
        set.into_iter().map(String::as_str).collect()
    }

    #[test]
    fn full_then_deltas() {
        let mut t = Tracker::default();
        t.begin_stream(["a", "b"].map(String::from).into());
        let applied = t
            .apply(&msg(
                5,
                true,
                vec![state("a", &[1, 2]), state("b", &[3])],
                &[],
            ))
            .unwrap();
        let snap = applied.snapshot.unwrap();
        assert_eq!(snap.version, 5);
        assert_eq!(names(snap.services.keys()), ["a", "b"]);
        assert_eq!(ports(&t, "a"), [1, 2]);
        assert_eq!(snap.services["a"].live_instances, 2);
        assert_eq!(snap.services["a"].instances[0].id, "a-1");

        // A delta replaces what it carries, keeps the rest (same Arc).
        let b_before = Arc::clone(&t.snapshot().services["b"]);
        t.apply(&msg(6, false, vec![state("a", &[2, 4])], &[]))
            .unwrap();
        assert_eq!(ports(&t, "a"), [2, 4]);
        assert!(Arc::ptr_eq(&t.snapshot().services["b"], &b_before));
        assert_eq!(t.snapshot().version, 6);

        // `removed` drops a service and records it as missing.
        t.apply(&msg(7, false, vec![], &["b"])).unwrap();
        assert_eq!(names(t.snapshot().services.keys()), ["a"]);
        assert_eq!(t.snapshot().lookup("b"), Lookup::Missing);
        assert_eq!(t.snapshot().lookup("zzz"), Lookup::Unknown);

        // It comes back with a later delta.
        t.apply(&msg(8, false, vec![state("b", &[9])], &[]))
            .unwrap();
        assert!(matches!(t.snapshot().lookup("b"), Lookup::Found(_)));
        assert!(t.snapshot().missing.is_empty());
    }

    #[test]
    fn unchanged_service_keeps_its_arc_and_no_change_publishes_nothing() {
        let mut t = Tracker::default();
        t.begin_stream(BTreeSet::new());
        t.apply(&msg(1, true, vec![state("a", &[1])], &[])).unwrap();
        let before = Arc::clone(&t.snapshot().services["a"]);
        let applied = t
            .apply(&msg(2, false, vec![state("a", &[1])], &[]))
            .unwrap();
        // The version moved: a new snapshot, but the same service.
        assert!(applied.snapshot.is_some());
        assert!(Arc::ptr_eq(&t.snapshot().services["a"], &before));
        // Same version, same content: nothing to publish.
        let applied = t
            .apply(&msg(2, false, vec![state("a", &[1])], &[]))
            .unwrap();
        assert!(applied.snapshot.is_none());
    }

    #[test]
    fn full_message_replaces_everything_known() {
        let mut t = Tracker::default();
        t.begin_stream(["a", "b", "c"].map(String::from).into());
        t.apply(&msg(
            3,
            true,
            vec![state("a", &[1]), state("b", &[2])],
            &["c"],
        ))
        .unwrap();
        assert_eq!(names(&t.snapshot().missing), ["c"]);

        // A reconnect: the full snapshot no longer carries `b`, and `c` exists.
        t.begin_stream(["a", "b", "c"].map(String::from).into());
        t.apply(&msg(2, true, vec![state("a", &[1]), state("c", &[3])], &[]))
            .unwrap();
        let snap = t.snapshot();
        assert_eq!(names(snap.services.keys()), ["a", "c"]);
        assert_eq!(names(&snap.missing), ["b"]);
        // A new stream may start lower (a restarted control plane).
        assert_eq!(snap.version, 2);
    }

    #[test]
    fn first_request_names_absent_from_the_full_message_are_missing() {
        let mut t = Tracker::default();
        t.begin_stream(["ghost"].map(String::from).into());
        t.apply(&msg(1, true, vec![], &[])).unwrap();
        assert_eq!(t.snapshot().lookup("ghost"), Lookup::Missing);
        // A name subscribed later (by a delta request) and not answered yet
        // stays unknown.
        assert_eq!(t.snapshot().lookup("later"), Lookup::Unknown);
    }

    #[test]
    fn stale_versions_are_ignored_on_one_stream() {
        let mut t = Tracker::default();
        t.begin_stream(BTreeSet::new());
        t.apply(&msg(10, true, vec![state("a", &[1])], &[]))
            .unwrap();
        let err = t
            .apply(&msg(9, false, vec![state("a", &[7])], &[]))
            .unwrap_err();
        assert_eq!(
            err,
            StaleVersion {
                version: 9,
                last: 10
            }
        );
        assert_eq!(ports(&t, "a"), [1]);
        // Equal versions are fine (e.g. a newly subscribed service).
        t.apply(&msg(10, false, vec![state("b", &[2])], &[]))
            .unwrap();
        assert_eq!(ports(&t, "b"), [2]);
    }

    #[test]
    fn a_bad_instance_rejects_that_service_only() {
        let mut t = Tracker::default();
        t.begin_stream(BTreeSet::new());
        t.apply(&msg(1, true, vec![state("a", &[1]), state("b", &[2])], &[]))
            .unwrap();

        let mut bad = state("a", &[5]);
        bad.instances[0].address = "0.0.0.0:5".to_owned();
        let applied = t
            .apply(&msg(2, false, vec![bad, state("b", &[3])], &[]))
            .unwrap();
        assert_eq!(applied.rejected.len(), 1);
        let e = &applied.rejected[0];
        assert_eq!(e.service(), "a");
        assert!(matches!(e, Rejection::Instance { index: 0, .. }), "{e:?}");
        assert!(e.to_string().contains("instance.address"), "{e}");
        assert_eq!(ports(&t, "a"), [1], "a keeps its previous state");
        assert_eq!(ports(&t, "b"), [3], "b still applies");
        assert_eq!(t.snapshot().version, 2);
    }

    #[test]
    fn rejections_in_a_full_message_keep_the_previous_state() {
        let mut t = Tracker::default();
        t.begin_stream(["a", "gone"].map(String::from).into());
        t.apply(&msg(1, true, vec![state("a", &[1])], &["gone"]))
            .unwrap();

        let mut bad_a = state("a", &[5]);
        bad_a.instances[0].id = "no spaces".to_owned();
        let mut bad_gone = state("gone", &[6]);
        bad_gone.instances[0].service = "other".to_owned();
        let mut bad_new = state("new", &[7]);
        bad_new.name = "Not-A-Name".to_owned();
        t.begin_stream(["a", "gone"].map(String::from).into());
        let applied = t
            .apply(&msg(2, true, vec![bad_a, bad_gone, bad_new], &[]))
            .unwrap();
        assert_eq!(applied.rejected.len(), 3);
        assert!(matches!(
            applied.rejected[1],
            Rejection::ForeignInstance { .. }
        ));
        assert!(
            matches!(&applied.rejected[2], Rejection::Name { name, .. } if name == "Not-A-Name")
        );
        assert_eq!(ports(&t, "a"), [1]);
        assert_eq!(t.snapshot().lookup("gone"), Lookup::Missing);
        assert_eq!(t.snapshot().lookup("Not-A-Name"), Lookup::Unknown);
    }

    #[test]
    fn a_refused_policy_keeps_the_one_in_force_and_no_policy_removes_it() {
        let mut t = Tracker::default();
        t.begin_stream(BTreeSet::new());
        let good = "service = \"a\"\n[outbound]\ntimeout = \"4s\"\n";
        t.apply(&msg(
            1,
            true,
            vec![with_policy(state("a", &[1]), good)],
            &[],
        ))
        .unwrap();
        // A control plane that started after an invalid policy was written
        // knows no valid one: it says so, and this sidecar keeps its own, for
        // a delta as for a full message (a new stream to that replica).
        let mut refused = state("a", &[1, 2]);
        refused.policy_refused = true;
        t.apply(&msg(2, false, vec![refused.clone()], &[])).unwrap();
        assert_eq!(
            t.snapshot().services["a"].policy_toml.as_deref(),
            Some(good)
        );
        assert_eq!(ports(&t, "a"), [1, 2]);
        t.begin_stream(BTreeSet::new());
        t.apply(&msg(3, true, vec![refused], &[])).unwrap();
        assert_eq!(
            t.snapshot().services["a"].policy_toml.as_deref(),
            Some(good)
        );
        assert!(t.snapshot().services["a"].policy.is_some());
        // An empty policy that is not refused: the policy was deleted.
        t.apply(&msg(4, false, vec![state("a", &[1])], &[]))
            .unwrap();
        assert!(t.snapshot().services["a"].policy.is_none());
    }

    #[test]
    fn policies_are_parsed_and_checked() {
        let mut t = Tracker::default();
        t.begin_stream(BTreeSet::new());
        let good = "service = \"a\"\n[inbound]\nmax_concurrency = 10\n";
        t.apply(&msg(
            1,
            true,
            vec![with_policy(state("a", &[1]), good)],
            &[],
        ))
        .unwrap();
        let a = Arc::clone(&t.snapshot().services["a"]);
        assert_eq!(a.policy_toml.as_deref(), Some(good));
        let policy = a.policy.as_ref().unwrap();
        assert_eq!(policy.service.as_str(), "a");
        assert_eq!(policy.inbound.max_concurrency.map(|n| n.get()), Some(10));

        // Invalid TOML: rejected with the file/line message, previous kept.
        let bad = "service = \"a\"\n[inbound]\nmax_concurrency = 0\n";
        let applied = t
            .apply(&msg(
                2,
                false,
                vec![with_policy(state("a", &[2]), bad)],
                &[],
            ))
            .unwrap();
        let e = applied.rejected[0].to_string();
        assert!(e.contains("<control-plane:a>:3:"), "{e}");
        assert!(Arc::ptr_eq(&t.snapshot().services["a"], &a));

        // A valid policy for another service: rejected.
        let other = "service = \"b\"\n";
        let applied = t
            .apply(&msg(
                3,
                false,
                vec![with_policy(state("a", &[2]), other)],
                &[],
            ))
            .unwrap();
        assert!(
            matches!(&applied.rejected[0], Rejection::PolicyService { other, .. } if other == "b")
        );
        assert!(Arc::ptr_eq(&t.snapshot().services["a"], &a));

        // Dropping the policy is a valid update.
        t.apply(&msg(4, false, vec![state("a", &[1])], &[]))
            .unwrap();
        assert!(t.snapshot().services["a"].policy.is_none());
    }

    #[test]
    fn restore_validates_and_does_not_pin_the_stream_version() {
        let mut t = Tracker::default();
        let mut bad = state("b", &[2]);
        bad.instances[0].address = "nope".to_owned();
        let applied = t.restore(100, &[state("a", &[1]), bad]);
        assert_eq!(applied.rejected.len(), 1);
        assert_eq!(names(t.snapshot().services.keys()), ["a"]);
        assert_eq!(t.snapshot().version, 100);
        // The first stream may start at any version.
        t.begin_stream(["a"].map(String::from).into());
        t.apply(&msg(3, true, vec![state("a", &[4])], &[])).unwrap();
        assert_eq!(ports(&t, "a"), [4]);
    }

    fn warming(mut m: v1::SubscribeResponse) -> v1::SubscribeResponse {
        m.warming = true;
        m
    }

    /// A tracker that knows billing on ports 1 and 2 and orders on 3, then
    /// reconnects.
    fn reconnected() -> Tracker {
        let mut t = Tracker::default();
        t.begin_stream(["billing", "orders"].map(String::from).into());
        t.apply(&msg(
            10,
            true,
            vec![state("billing", &[1, 2]), state("orders", &[3])],
            &[],
        ))
        .unwrap();
        t.begin_stream(["billing", "orders"].map(String::from).into());
        t
    }

    #[test]
    fn a_warming_control_plane_does_not_take_away_instances_it_has_not_heard_from() {
        let mut t = reconnected();
        // Restarted with an empty view but for billing on port 2 (its sidecar
        // already registered again); orders has not registered again at all.
        let applied = t
            .apply(&warming(msg(2, true, vec![state("billing", &[2])], &[])))
            .unwrap();
        assert!(applied.rejected.is_empty());
        assert_eq!(ports(&t, "billing"), [2, 1]);
        assert_eq!(ports(&t, "orders"), [3]);
        assert!(t.snapshot().missing.is_empty());
        assert_eq!(t.snapshot().services["billing"].live_instances, 2);
        assert_eq!(t.held_instances(), 2, "billing on 1 and orders on 3");

        // billing on 1 registers again: now the control plane's word counts,
        // and when it deregisters it goes at once, warm-up or not.
        t.apply(&warming(msg(
            3,
            false,
            vec![state("billing", &[1, 2])],
            &[],
        )))
        .unwrap();
        assert_eq!(ports(&t, "billing"), [1, 2]);
        assert_eq!(t.held_instances(), 1);
        t.apply(&warming(msg(4, false, vec![state("billing", &[2])], &[])))
            .unwrap();
        assert_eq!(ports(&t, "billing"), [2]);

        // The warm-up ends: orders was not heard from again, and goes.
        let applied = t
            .apply(&msg(5, true, vec![state("billing", &[2])], &[]))
            .unwrap();
        assert!(applied.snapshot.is_some());
        assert_eq!(ports(&t, "billing"), [2]);
        assert_eq!(names(&t.snapshot().missing), ["orders"]);
        assert_eq!(t.held_instances(), 0);
    }

    #[test]
    fn a_control_plane_that_is_not_warming_up_is_believed_at_once() {
        let mut t = reconnected();
        t.apply(&msg(2, true, vec![state("billing", &[2])], &[]))
            .unwrap();
        assert_eq!(ports(&t, "billing"), [2]);
        assert_eq!(names(&t.snapshot().missing), ["orders"]);
        assert_eq!(t.held_instances(), 0);
    }

    #[test]
    fn held_services_keep_their_arcs_while_nothing_changes() {
        let mut t = reconnected();
        let orders = Arc::clone(&t.snapshot().services["orders"]);
        t.apply(&warming(msg(2, true, vec![state("billing", &[1, 2])], &[])))
            .unwrap();
        assert!(Arc::ptr_eq(&t.snapshot().services["orders"], &orders));
        let applied = t
            .apply(&warming(msg(
                3,
                false,
                vec![state("billing", &[1, 2])],
                &[],
            )))
            .unwrap();
        assert!(
            applied.snapshot.is_none() || Arc::ptr_eq(&t.snapshot().services["orders"], &orders)
        );
    }
}
