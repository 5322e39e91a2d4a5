//! `weftctl inject`: adds the weft-proxy sidecar to the pods of Kubernetes
//! manifests, like `linkerd inject`.
//!
//! [`inject`] reads a YAML stream (several `---` documents, `kind: List`
//! included) and writes every document back in order. For each Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod it adds, to the
//! pod (template):
//!
//! - the `weft-proxy` container: bootstrap file from the ConfigMap
//!   `<service>-weft` at /etc/weft, mesh certificate from the Secret
//!   `<service>-weft-tls` at /etc/weft/tls (not with [`Options::tls`] off),
//!   snapshot cache in an emptyDir at /var/lib/weft-proxy, `--advertise
//!   $(POD_IP):4143`, probes on the admin port 4191, restricted-PSS security
//!   context, resource requests and limits. Pods that run to completion
//!   (`restartPolicy` Never or OnFailure: Jobs, CronJobs) get it as a native
//!   sidecar (an init container with `restartPolicy: Always`, Kubernetes
//!   1.29+), so that it stops when the app is done and the Job completes;
//! - `HTTP_PROXY=http://127.0.0.1:4140` and `NO_PROXY` for loopback on every
//!   app container that sets no HTTP_PROXY of its own;
//! - `terminationGracePeriodSeconds` raised to 30 if set lower (longer than
//!   the sidecar's drain grace plus deregistration);
//! - the annotations `weft.dev/injected: <version>` and `weft.dev/service`,
//!   and the label `weft.dev/meshed: "true"` (the example NetworkPolicy's).
//!
//! Invariants: documents of other kinds come out unchanged (apart from YAML
//! formatting: comments are lost, key order is kept); a pod annotated
//! `weft.dev/inject: disabled` (or whose workload is) is left alone; and
//! injecting is idempotent: an injected manifest injected again with the same
//! options comes out byte for byte the same (the sidecar, its volumes and the
//! annotations are replaced in place, the app's env is not added twice).
//!
//! Errors name the document (1-based, counting the `---` documents of the
//! input) and, for YAML syntax errors, the line.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_norway::{Mapping, Value};
use weft_config::ServiceName;
use weft_config::name::InvalidServiceName;

/// The sidecar container's name.
pub const CONTAINER: &str = "weft-proxy";
/// The image when none is given: this build's.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/weft-mesh/weft:", env!("CARGO_PKG_VERSION"));
/// `disabled` on a workload or pod template: leave it alone.
pub const ANNOTATION_INJECT: &str = "weft.dev/inject";
/// The weftctl version that injected the pod.
pub const ANNOTATION_INJECTED: &str = "weft.dev/injected";
/// The service the pod's sidecar registers as (also read, to name it).
pub const ANNOTATION_SERVICE: &str = "weft.dev/service";
/// The pod label `"true"` that marks a meshed pod: the NetworkPolicy of
/// examples/deploy/kubernetes lets such pods reach the control plane and
/// other sidecars' inbound ports.
pub const LABEL_MESHED: &str = "weft.dev/meshed";
/// What app containers get as HTTP_PROXY: the sidecar's outbound listener.
pub const OUTBOUND_PROXY: &str = "http://127.0.0.1:4140";
/// What app containers get as NO_PROXY with it: their own loopback.
pub const NO_PROXY: &str = "localhost,127.0.0.1,::1";
/// The shortest termination grace period: longer than the sidecar's
/// `[drain] grace` (15 s) plus deregistration, as in
/// examples/deploy/kubernetes.
pub const MIN_GRACE_SECONDS: u64 = 30;

const VOLUME_CONFIG: &str = "weft-config";
const VOLUME_TLS: &str = "weft-tls";
const VOLUME_CACHE: &str = "weft-cache";
/// Port names are prefixed: they must be unique within the pod.
const PORT_INBOUND: &str = "weft-inbound";
const PORT_ADMIN: &str = "weft-admin";

/// The kinds whose pod template is at `spec.template`.
const TEMPLATE_KINDS: [&str; 5] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
];

/// A Kubernetes resource quantity (`50m`, `1`, `64Mi`, `0.5`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity(String);

/// Why a string is not a [`Quantity`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid quantity {0:?}: expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)"
)]
pub struct InvalidQuantity(String);

impl FromStr for Quantity {
    type Err = InvalidQuantity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SUFFIXES: [&str; 14] = [
            "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ];
        let digits_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(digits_end);
        let valid_number = match number.split_once('.') {
            None => !number.is_empty(),
            Some((whole, fraction)) => {
                !(fraction.contains('.') || (whole.is_empty() && fraction.is_empty()))
            }
        };
        if valid_number && SUFFIXES.contains(&suffix) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidQuantity(s.to_owned()))
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sidecar's resource requests and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Quantity,
    pub cpu_limit: Quantity,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
}

impl Default for Resources {
    /// Requests 50m CPU and 32Mi of memory, limits 1 CPU and 64Mi.
    fn default() -> Self {
        let q = |s: &str| Quantity(s.to_owned());
        Self {
            cpu_request: q("50m"),
            cpu_limit: q("1"),
            memory_request: q("32Mi"),
            memory_limit: q("64Mi"),
        }
    }
}

/// What to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sidecar's image.
    pub image: String,
    /// The service every injected pod registers as; `None`: each pod's own
    /// (see [`inject`]).
    pub service: Option<ServiceName>,
    /// Mount the mesh certificate Secret (false: a plaintext mesh).
    pub tls: bool,
    pub resources: Resources,
    /// The value of the `weft.dev/injected` annotation.
    pub version: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            service: None,
            tls: true,
            resources: Resources::default(),
            version: crate::VERSION.to_owned(),
        }
    }
}

/// The manifests with the sidecar added, and what was done to each workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// Every document, in order, separated by `---` lines.
    pub yaml: String,
    pub workloads: Vec<Workload>,
}

/// One workload met in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its document (1-based).
    pub document: usize,
    pub kind: String,
    pub name: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added (or refreshed) for this service.
    Injected { service: ServiceName },
    /// Annotated `weft.dev/inject: disabled`: left alone.
    Disabled,
}

impl fmt::Display for Workload {
    /// `deployment/billing injected (service billing)`, as kubectl names
    /// objects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.to_ascii_lowercase();
        match &self.outcome {
            Outcome::Injected { service } => {
                write!(f, "{kind}/{} injected (service {service})", self.name)
            }
            Outcome::Disabled => write!(
                f,
                "{kind}/{} skipped ({ANNOTATION_INJECT}: disabled)",
                self.name
            ),
        }
    }
}

/// Why [`inject`] failed, and in which document.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", place(.document, .item, .workload))]
pub struct InjectError {
    /// The document (1-based).
    pub document: usize,
    /// The item of a `kind: List` document (0-based, as in `items[2]`).
    pub item: Option<usize>,
    /// `Deployment billing`, once known.
    pub workload: Option<String>,
    /// The line (1-based), when the YAML parser gives one.
    pub line: Option<usize>,
    pub problem: Box<Problem>,
}

fn place(document: &usize, item: &Option<usize>, workload: &Option<String>) -> String {
    let mut out = format!("document {document}");
    if let Some(item) = item {
        out.push_str(&format!(", items[{item}]"));
    }
    if let Some(workload) = workload {
        out.push_str(&format!(" ({workload})"));
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("not a Kubernetes object (a mapping with apiVersion and kind)")]
    NotAnObject,
    #[error("no `kind`")]
    NoKind,
    #[error("`{path}` is missing or not a {expected}")]
    Shape {
        path: String,
        expected: &'static str,
    },
    #[error(
        "{invalid} (from {origin}; give another with --service or the weft.dev/service annotation)"
    )]
    ServiceName {
        origin: String,
        invalid: InvalidServiceName,
    },
    #[error(
        "service name {name:?} (from {origin}) cannot name the Kubernetes objects {name}-weft and {name}-weft-tls: {reason}"
    )]
    KubernetesName {
        name: String,
        origin: String,
        reason: &'static str,
    },
    #[error(
        "no service name: no --service, no weft.dev/service annotation, no app.kubernetes.io/name or app label and no metadata.name"
    )]
    NoServiceName,
    #[error("writing YAML: {0}")]
    Write(String),
}

/// Adds the sidecar to every workload of the YAML stream `input` (see the
/// module docs); documents of other kinds and empty documents pass through
/// (empty ones are dropped).
///
/// The service name of a pod: [`Options::service`], else the pod template's
/// `weft.dev/service` annotation, else its `app.kubernetes.io/name` label,
/// else its `app` label, else the workload's `metadata.name`. It must be a
/// valid service name and fit Kubernetes object names (`<service>-weft-tls`).
pub fn inject(input: &str, options: &Options) -> Result<Injected, InjectError> {
    let mut yaml = String::new();
    let mut workloads = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(input).enumerate() {
        let at = At {
            document: index + 1,
            item: None,
        };
        let mut value = Value::deserialize(document).map_err(|e| InjectError {
            document: at.document,
            item: None,
            workload: None,
            line: e.location().map(|l| l.line()),
            problem: Box::new(Problem::Yaml(e.to_string())),
        })?;
        if value.is_null() {
            continue;
        }
        object(&mut value, at, options, &mut workloads)?;
        let text = to_yaml(&value).map_err(|e| at.error(None, Problem::Write(e.to_string())))?;
        if !yaml.is_empty() {
            yaml.push_str("---\n");
        }
        yaml.push_str(&text);
    }
    Ok(Injected { yaml, workloads })
}

/// Strings that YAML 1.1 reads as booleans. serde_norway writes YAML 1.2,
/// where they are plain strings, unquoted; but kubectl's parser (go-yaml v2)
/// is YAML 1.1 and would turn `enabled: "on"` into `enabled: true`.
const YAML_1_1_BOOLEANS: [&str; 22] = [
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF", "true", "True", "TRUE", "false", "False", "FALSE",
];

/// `value` as YAML that YAML 1.1 parsers read back the same: the strings of
/// [`YAML_1_1_BOOLEANS`] quoted. serde_norway has no option for that, so they
/// are written as placeholders (plain words) that are then replaced.
pub fn to_yaml(value: &Value) -> Result<String, serde_norway::Error> {
    const MARK: &str = "weftyaml11quote";
    fn placeholders(value: &mut Value, found: &mut bool) {
        match value {
            Value::String(s) => {
                if let Some(n) = YAML_1_1_BOOLEANS.iter().position(|b| b == s) {
                    *s = format!("{MARK}{n}x");
                    *found = true;
                }
            }
            Value::Sequence(items) => items.iter_mut().for_each(|v| placeholders(v, found)),
            Value::Mapping(map) => {
                let entries = std::mem::take(map);
                for (mut k, mut v) in entries {
                    placeholders(&mut k, found);
                    placeholders(&mut v, found);
                    map.insert(k, v);
                }
            }
            Value::Tagged(tagged) => placeholders(&mut tagged.value, found),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let plain = serde_norway::to_string(value)?;
    let mut marked = value.clone();
    let mut found = false;
    placeholders(&mut marked, &mut found);
    if !found || plain.contains(MARK) {
        return Ok(plain);
    }
    let mut text = serde_norway::to_string(&marked)?;
    for (n, word) in YAML_1_1_BOOLEANS.iter().enumerate() {
        text = text.replace(&format!("{MARK}{n}x"), &format!("'{word}'"));
    }
    Ok(text)
}

/// Where in the input an object is.
#[derive(Debug, Clone, Copy)]
struct At {
    document: usize,
    item: Option<usize>,
}

impl At {
    fn error(self, workload: Option<&str>, problem: Problem) -> InjectError {
        InjectError {
            document: self.document,
            item: self.item,
            workload: workload.map(str::to_owned),
            line: None,
            problem: Box::new(problem),
        }
    }
}

/// One Kubernetes object: a workload gets the sidecar, a List each of its
/// items, anything else nothing.
fn object(
    value: &mut Value,
    at: At,
    options: &Options,
    workloads: &mut Vec<Workload>,
) -> Result<(), InjectError> {
    let Value::Mapping(map) = value else {
        return Err(at.error(None, Problem::NotAnObject));
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| at.error(None, Problem::NoKind))?
        .to_owned();
    if kind == "List" {
        let Some(Value::Sequence(items)) = map.get_mut("items") else {
            return Err(at.error(
                None,
                Problem::Shape {
                    path: "items".to_owned(),
                    expected: "list",
                },
            ));
        };
        for (n, item) in items.iter_mut().enumerate() {
            let at = At {
                item: Some(n),
                ..at
            };
            object(item, at, options, workloads)?;
        }
        return Ok(());
    }
    let template_path: &[&str] = if kind == "Pod" {
        &[]
    } else if kind == "CronJob" {
        &["spec", "jobTemplate", "spec", "template"]
    } else if TEMPLATE_KINDS.contains(&kind.as_str()) {
        &["spec", "template"]
    } else {
        return Ok(());
    };
    let metadata = map.get("metadata");
    let name = metadata
        .and_then(|m| text(m, &["name"]).or_else(|| text(m, &["generateName"])))
        .unwrap_or("(unnamed)")
        .to_owned();
    let workload = format!("{kind} {name}");
    let fail = |problem: Problem| at.error(Some(&workload), problem);
    let workload_disabled = metadata.is_some_and(disabled);
    let metadata_name = metadata.and_then(|m| text(m, &["name"])).map(str::to_owned);
    let template = mapping_at(map, template_path).ok_or_else(|| {
        fail(Problem::Shape {
            path: template_path.join("."),
            expected: "mapping",
        })
    })?;
    let outcome = if workload_disabled || template.get("metadata").is_some_and(disabled) {
        Outcome::Disabled
    } else {
        let service = service_name(template, metadata_name.as_deref(), options).map_err(&fail)?;
        let prefix = if template_path.is_empty() {
            String::new()
        } else {
            format!("{}.", template_path.join("."))
        };
        pod(template, &service, options).map_err(|path| {
            fail(Problem::Shape {
                path: format!("{prefix}{}", path.0),
                expected: path.1,
            })
        })?;
        Outcome::Injected { service }
    };
    workloads.push(Workload {
        document: at.document,
        kind,
        name,
        outcome,
    });
    Ok(())
}

/// `metadata.annotations["weft.dev/inject"] == "disabled"`.
fn disabled(metadata: &Value) -> bool {
    text(metadata, &["annotations", ANNOTATION_INJECT]) == Some("disabled")
}

/// The string at `path` under `value`.
fn text<'v>(value: &'v Value, path: &[&str]) -> Option<&'v str> {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

/// The mapping at `path` under `map` (`map` itself for an empty path).
fn mapping_at<'m>(map: &'m mut Mapping, path: &[&str]) -> Option<&'m mut Mapping> {
    path.iter().try_fold(map, |m, key| match m.get_mut(*key) {
        Some(Value::Mapping(next)) => Some(next),
        _ => None,
    })
}

/// The mapping under `key`, created (at the end) if absent; `None` if
/// `key` holds something else.
fn entry_mapping<'m>(map: &'m mut Mapping, key: &str) -> Option<&'m mut Mapping> {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.into(), Value::Mapping(Mapping::new()));
    }
    match map.get_mut(key) {
        Some(Value::Mapping(m)) => Some(m),
        _ => None,
    }
}

/// The sequence under `key`, created (at the end) if absent.
fn entry_sequence<'m>(map: &'m mut Mapping, key: &str) -> Option<&'m mut Vec<Value>> {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.into(), Value::Sequence(Vec::new()));
    }
    match map.get_mut(key) {
        Some(Value::Sequence(s)) => Some(s),
        _ => None,
    }
}

fn service_name(
    template: &Mapping,
    workload_name: Option<&str>,
    options: &Options,
) -> Result<ServiceName, Problem> {
    let (name, origin) = if let Some(service) = &options.service {
        (service.as_str().to_owned(), "--service".to_owned())
    } else {
        let metadata = template.get("metadata");
        let from = |path: &[&str]| metadata.and_then(|m| text(m, path));
        let candidates = [
            (
                from(&["annotations", ANNOTATION_SERVICE]),
                format!("the {ANNOTATION_SERVICE} annotation"),
            ),
            (
                from(&["labels", "app.kubernetes.io/name"]),
                "the app.kubernetes.io/name label".to_owned(),
            ),
            (from(&["labels", "app"]), "the app label".to_owned()),
            (workload_name, "metadata.name".to_owned()),
        ];
        candidates
            .into_iter()
            .find_map(|(name, origin)| name.map(|n| (n.to_owned(), origin)))
            .ok_or(Problem::NoServiceName)?
    };
    let service = ServiceName::try_from(name.clone()).map_err(|invalid| Problem::ServiceName {
        origin: origin.clone(),
        invalid,
    })?;
    kubernetes_name(service.as_str()).map_err(|reason| Problem::KubernetesName {
        name,
        origin,
        reason,
    })?;
    Ok(service)
}

/// Whether `<service>-weft-tls` is a Kubernetes object name (an RFC 1123
/// subdomain): a service name (already checked) without `_`, without a `-`
/// or `.` next to a `.`, and short enough.
fn kubernetes_name(service: &str) -> Result<(), &'static str> {
    if service.contains('_') {
        return Err("'_' is not allowed in Kubernetes names");
    }
    if service.contains(".-") || service.contains("-.") || service.contains("..") {
        return Err("each '.'-separated part must start and end with a letter or digit");
    }
    if service.len() + "-weft-tls".len() > 253 {
        return Err("longer than 253 characters");
    }
    Ok(())
}

/// A missing or mistyped field: its path under the pod (template) and what
/// it should be.
struct BadPath(String, &'static str);

/// Adds the sidecar, the app containers' env, the volumes, the annotations
/// and the meshed label to one pod (template): a mapping with `metadata` and `spec`.
fn pod(template: &mut Mapping, service: &ServiceName, options: &Options) -> Result<(), BadPath> {
    let metadata = entry_mapping(template, "metadata")
        .ok_or_else(|| BadPath("metadata".to_owned(), "mapping"))?;
    let annotations = entry_mapping(metadata, "annotations")
        .ok_or_else(|| BadPath("metadata.annotations".to_owned(), "mapping"))?;
    annotations.insert(
        ANNOTATION_INJECTED.into(),
        Value::String(options.version.clone()),
    );
    annotations.insert(
        ANNOTATION_SERVICE.into(),
        Value::String(service.as_str().to_owned()),
    );
    let labels = entry_mapping(metadata, "labels")
        .ok_or_else(|| BadPath("metadata.labels".to_owned(), "mapping"))?;
    labels.insert(LABEL_MESHED.into(), Value::String("true".to_owned()));

    let Some(Value::Mapping(spec)) = template.get_mut("spec") else {
        return Err(BadPath("spec".to_owned(), "mapping"));
    };
    // Pods that run to completion need the sidecar to stop when the app
    // does: a native sidecar (Kubernetes 1.29+) is stopped after the app
    // containers exit. Long-running pods keep an ordinary container, which
    // is stopped with the app (so inbound requests in flight can drain).
    let native = matches!(
        spec.get("restartPolicy").and_then(Value::as_str),
        Some("Never" | "OnFailure")
    );
    let sidecar = container(options, native);
    let mut in_init = remove_sidecar(spec, "initContainers")?;
    let in_containers = remove_sidecar(spec, "containers")?;
    if native {
        let init = entry_sequence(spec, "initContainers")
            .ok_or_else(|| BadPath("spec.initContainers".to_owned(), "list"))?;
        let at = in_init.take().unwrap_or(0).min(init.len());
        init.insert(at, sidecar);
    } else {
        let containers = match spec.get_mut("containers") {
            Some(Value::Sequence(c)) => c,
            _ => return Err(BadPath("spec.containers".to_owned(), "list")),
        };
        let at = in_containers
            .unwrap_or(containers.len())
            .min(containers.len());
        containers.insert(at, sidecar);
    }
    // An initContainers list that held only the sidecar goes with it.
    if in_init.is_some()
        && matches!(spec.get("initContainers"), Some(Value::Sequence(s)) if s.is_empty())
    {
        spec.remove("initContainers");
    }

    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return Err(BadPath("spec.containers".to_owned(), "list"));
    };
    for (n, app) in containers.iter_mut().enumerate() {
        let Value::Mapping(app) = app else {
            return Err(BadPath(format!("spec.containers[{n}]"), "mapping"));
        };
        if app.get("name").and_then(Value::as_str) == Some(CONTAINER) {
            continue;
        }
        proxy_env(app).ok_or_else(|| BadPath(format!("spec.containers[{n}].env"), "list"))?;
    }

    let volumes = entry_sequence(spec, "volumes")
        .ok_or_else(|| BadPath("spec.volumes".to_owned(), "list"))?;
    let config = map([(
        "configMap",
        map([("name", string(format!("{service}-weft")))]),
    )]);
    let tls = options.tls.then(|| {
        map([(
            "secret",
            map([("secretName", string(format!("{service}-weft-tls")))]),
        )])
    });
    let cache = map([("emptyDir", Value::Mapping(Mapping::new()))]);
    let mut last = None;
    for (name, source) in [
        (VOLUME_CONFIG, Some(config)),
        (VOLUME_TLS, tls),
        (VOLUME_CACHE, Some(cache)),
    ] {
        last = upsert_volume(volumes, name, source, last).or(last);
    }

    if let Some(grace) = spec.get_mut("terminationGracePeriodSeconds")
        && grace.as_u64().is_some_and(|g| g < MIN_GRACE_SECONDS)
    {
        *grace = Value::from(MIN_GRACE_SECONDS);
    }
    Ok(())
}

/// Removes the `weft-proxy` container from the list `key` of `spec`, if
/// there; where it was.
fn remove_sidecar(spec: &mut Mapping, key: &str) -> Result<Option<usize>, BadPath> {
    let list = match spec.get_mut(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Sequence(list)) => list,
        Some(_) => return Err(BadPath(format!("spec.{key}"), "list")),
    };
    let at = list
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER));
    if let Some(at) = at {
        list.remove(at);
    }
    Ok(at)
}

/// HTTP_PROXY (and NO_PROXY) for an app container that sets no HTTP_PROXY
/// (in either case) of its own; `None` if its env is not a list.
fn proxy_env(app: &mut Mapping) -> Option<()> {
    let env = entry_sequence(app, "env")?;
    let has = |env: &[Value], name: &str| {
        env.iter().any(|v| {
            v.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    };
    if has(env, "HTTP_PROXY") {
        return Some(());
    }
    env.push(map([
        ("name", string("HTTP_PROXY")),
        ("value", string(OUTBOUND_PROXY)),
    ]));
    if !has(env, "NO_PROXY") {
        env.push(map([
            ("name", string("NO_PROXY")),
            ("value", string(NO_PROXY)),
        ]));
    }
    Some(())
}

/// Sets the volume `name` to `source` in place (if absent, right after the
/// volume at `after`, else at the end), or removes it if `source` is `None`;
/// where it now is.
fn upsert_volume(
    volumes: &mut Vec<Value>,
    name: &str,
    source: Option<Value>,
    after: Option<usize>,
) -> Option<usize> {
    let at = volumes
        .iter()
        .position(|v| v.get("name").and_then(Value::as_str) == Some(name));
    let Some(Value::Mapping(source)) = source else {
        if let Some(at) = at {
            volumes.remove(at);
        }
        return None;
    };
    let mut volume = Mapping::new();
    volume.insert("name".into(), string(name));
    volume.extend(source);
    let volume = Value::Mapping(volume);
    match at {
        Some(at) => {
            if let Some(slot) = volumes.get_mut(at) {
                *slot = volume;
            }
            Some(at)
        }
        None => {
            let at = after.map_or(volumes.len(), |a| (a + 1).min(volumes.len()));
            volumes.insert(at, volume);
            Some(at)
        }
    }
}

/// The `weft-proxy` container; `native`: as an init container that keeps
/// running (`restartPolicy: Always`).
fn container(options: &Options, native: bool) -> Value {
    let r = &options.resources;
    let quantity = |q: &Quantity| string(q.to_string());
    let mut c = Mapping::new();
    c.insert("name".into(), string(CONTAINER));
    c.insert("image".into(), string(&options.image));
    c.insert(
        "command".into(),
        Value::Sequence(
            [
                "weft-proxy",
                "run",
                "--config",
                "/etc/weft/weft.toml",
                "--log-format",
                "json",
                // Where other sidecars reach this pod (an IPv4 pod IP).
                "--advertise",
                "$(POD_IP):4143",
            ]
            .map(string)
            .to_vec(),
        ),
    );
    if native {
        c.insert("restartPolicy".into(), string("Always"));
    }
    c.insert(
        "env".into(),
        Value::Sequence(vec![
            map([
                ("name", string("POD_IP")),
                (
                    "valueFrom",
                    map([("fieldRef", map([("fieldPath", string("status.podIP"))]))]),
                ),
            ]),
            map([("name", string("WEFT_LOG")), ("value", string("info"))]),
        ]),
    );
    c.insert(
        "ports".into(),
        Value::Sequence(vec![
            map([
                ("name", string(PORT_INBOUND)),
                ("containerPort", Value::from(4143)),
            ]),
            map([
                ("name", string(PORT_ADMIN)),
                ("containerPort", Value::from(4191)),
            ]),
        ]),
    );
    let probe = |path: &str, period: u64| {
        map([
            (
                "httpGet",
                map([("path", string(path)), ("port", string(PORT_ADMIN))]),
            ),
            ("periodSeconds", Value::from(period)),
        ])
    };
    // /ready: listeners bound and directory loaded; 503 while draining.
    c.insert("readinessProbe".into(), probe("/ready", 2));
    c.insert("livenessProbe".into(), probe("/live", 10));
    c.insert(
        "resources".into(),
        map([
            (
                "requests",
                map([
                    ("cpu", quantity(&r.cpu_request)),
                    ("memory", quantity(&r.memory_request)),
                ]),
            ),
            (
                "limits",
                map([
                    ("cpu", quantity(&r.cpu_limit)),
                    ("memory", quantity(&r.memory_limit)),
                ]),
            ),
        ]),
    );
    // Pod Security "restricted".
    c.insert(
        "securityContext".into(),
        map([
            ("runAsNonRoot", Value::Bool(true)),
            ("allowPrivilegeEscalation", Value::Bool(false)),
            ("readOnlyRootFilesystem", Value::Bool(true)),
            (
                "capabilities",
                map([("drop", Value::Sequence(vec![string("ALL")]))]),
            ),
            ("seccompProfile", map([("type", string("RuntimeDefault"))])),
        ]),
    );
    let mount = |name: &str, path: &str, read_only: bool| {
        let mut m = Mapping::new();
        m.insert("name".into(), string(name));
        m.insert("mountPath".into(), string(path));
        if read_only {
            m.insert("readOnly".into(), Value::Bool(true));
        }
        Value::Mapping(m)
    };
    let mut mounts = vec![mount(VOLUME_CONFIG, "/etc/weft", true)];
    if options.tls {
        mounts.push(mount(VOLUME_TLS, "/etc/weft/tls", true));
    }
    mounts.push(mount(VOLUME_CACHE, "/var/lib/weft-proxy", false));
    c.insert("volumeMounts".into(), Value::Sequence(mounts));
    Value::Mapping(c)
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Mapping(
        entries
            .into_iter()
            .map(|(k, v)| (Value::String(k.to_owned()), v))
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-deploy
spec:
  template:
    metadata:
      labels:
        app: web
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: app
        image: web:1
";

    fn options() -> Options {
        Options {
            version: "9.9.9".to_owned(),
            image: "weft:test".to_owned(),
            ..Options::default()
        }
    }

    fn run(input: &str) -> Injected {
        inject(input, &options()).unwrap()
    }

    fn value(yaml: &str) -> Value {
        serde_norway::from_str(yaml).unwrap()
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_deployment_gets_the_sidecar_its_volumes_env_and_annotations() {
        let out = run(DEPLOYMENT);
        let v = value(&out.yaml);
        let t = &v["spec"]["template"];
        assert_eq!(names(&t["spec"]["containers"]), ["app", "weft-proxy"]);
        assert_eq!(
            names(&t["spec"]["volumes"]),
            ["weft-config", "weft-tls", "weft-cache"]
        );
        assert_eq!(t["spec"]["volumes"][0]["configMap"]["name"], "web-weft");
        assert_eq!(
            t["spec"]["volumes"][1]["secret"]["secretName"],
            "web-weft-tls"
        );
        assert_eq!(t["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(t["metadata"]["annotations"]["weft.dev/injected"], "9.9.9");
        assert_eq!(t["metadata"]["annotations"]["weft.dev/service"], "web");
        let app = &t["spec"]["containers"][0];
        assert_eq!(names(&app["env"]), ["HTTP_PROXY", "NO_PROXY"]);
        assert_eq!(app["env"][0]["value"], OUTBOUND_PROXY);
        let sidecar = &t["spec"]["containers"][1];
        assert_eq!(sidecar["image"], "weft:test");
        assert_eq!(sidecar["resources"]["limits"]["memory"], "64Mi");
        assert_eq!(
            sidecar["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(
            out.workloads,
            [Workload {
                document: 1,
                kind: "Deployment".to_owned(),
                name: "web-deploy".to_owned(),
                outcome: Outcome::Injected {
                    service: "web".parse().unwrap()
                },
            }]
        );
        assert_eq!(
            out.workloads[0].to_string(),
            "deployment/web-deploy injected (service web)"
        );
    }

    #[test]
    fn injecting_twice_changes_nothing_more() {
        let once = run(DEPLOYMENT).yaml;
        assert_eq!(run(&once).yaml, once);
        // Without TLS, the Secret volume and mount go away in place.
        let plain = Options {
            tls: false,
            ..options()
        };
        let no_tls = inject(&once, &plain).unwrap().yaml;
        assert!(!no_tls.contains("weft-tls"), "{no_tls}");
        assert_eq!(inject(&no_tls, &plain).unwrap().yaml, no_tls);
        assert_eq!(run(&no_tls).yaml, once);
    }

    #[test]
    fn the_service_name_comes_from_the_flag_annotation_labels_or_name() {
        let service = |input: &str, options: &Options| {
            let out = inject(input, options).unwrap();
            match &out.workloads[0].outcome {
                Outcome::Injected { service } => service.to_string(),
                Outcome::Disabled => panic!("disabled"),
            }
        };
        let flag = Options {
            service: Some("billing".parse().unwrap()),
            ..options()
        };
        assert_eq!(service(DEPLOYMENT, &flag), "billing");
        assert_eq!(service(DEPLOYMENT, &options()), "web");
        let k8s = DEPLOYMENT.replace("app: web", "app.kubernetes.io/name: shop");
        assert_eq!(service(&k8s, &options()), "shop");
        let annotated = DEPLOYMENT.replace(
            "      labels:\n",
            "      annotations:\n        weft.dev/service: orders\n      labels:\n",
        );
        assert_eq!(service(&annotated, &options()), "orders");
        let unlabelled = DEPLOYMENT.replace("      labels:\n        app: web\n", "");
        assert_eq!(service(&unlabelled, &options()), "web-deploy");
    }

    #[test]
    fn a_bad_service_name_is_an_error_naming_the_document() {
        let input = format!(
            "kind: ConfigMap\n---\n{}",
            DEPLOYMENT.replace("app: web", "app: Web")
        );
        let e = inject(&input, &options()).unwrap_err();
        assert_eq!(e.document, 2);
        assert!(
            e.to_string().starts_with(
                "document 2 (Deployment web-deploy): invalid service name \"Web\": character 'W' \
                 is not allowed"
            ),
            "{e}"
        );
        assert!(e.to_string().contains("(from the app label;"), "{e}");
        let underscore = DEPLOYMENT.replace("app: web", "app: web_1");
        let e = inject(&underscore, &options()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Deployment web-deploy): service name \"web_1\" (from the app label) \
             cannot name the Kubernetes objects web_1-weft and web_1-weft-tls: '_' is not \
             allowed in Kubernetes names"
        );
    }

    #[test]
    fn jobs_get_a_native_sidecar_so_they_complete() {
        let job = "\
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: app, image: once:1}]
";
        let out = run(job).yaml;
        let spec = &value(&out)["spec"]["template"]["spec"];
        assert_eq!(names(&spec["containers"]), ["app"]);
        assert_eq!(names(&spec["initContainers"]), ["weft-proxy"]);
        assert_eq!(spec["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(run(&out).yaml, out);
    }

    #[test]
    fn disabled_workloads_and_other_kinds_pass_unchanged() {
        let disabled = DEPLOYMENT.replace(
            "metadata:\n  name: web-deploy\n",
            "metadata:\n  name: web-deploy\n  annotations:\n    weft.dev/inject: disabled\n",
        );
        let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n";
        let input = format!("{disabled}---\n{service}");
        let out = run(&input);
        assert_eq!(out.yaml, input);
        assert_eq!(out.workloads[0].outcome, Outcome::Disabled);
        assert_eq!(
            out.workloads[0].to_string(),
            "deployment/web-deploy skipped (weft.dev/inject: disabled)"
        );
    }

    #[test]
    fn list_items_and_cron_jobs_are_injected() {
        let input = "\
kind: List
items:
- kind: ConfigMap
- kind: CronJob
  metadata: {name: nightly}
  spec:
    jobTemplate:
      spec:
        template:
          spec:
            restartPolicy: OnFailure
            containers: [{name: app}]
";
        let v = value(&run(input).yaml);
        let spec = &v["items"][1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(names(&spec["initContainers"]), ["weft-proxy"]);
        let e = inject(&input.replace("- kind: ConfigMap", "- {}"), &options()).unwrap_err();
        assert_eq!(e.to_string(), "document 1, items[0]: no `kind`");
    }

    #[test]
    fn errors_name_the_document_and_the_yaml_line() {
        let e = inject(
            "kind: Service\n---\nkind: Pod\nmetadata: {name: x\n",
            &options(),
        )
        .unwrap_err();
        assert_eq!((e.document, e.line.is_some()), (2, true), "{e}");
        assert!(
            e.to_string().starts_with("document 2: invalid YAML: "),
            "{e}"
        );
        let e = inject("kind: Service\n---\nmetadata: {}\n", &options()).unwrap_err();
        assert_eq!(e.to_string(), "document 2: no `kind`");
        let e = inject(
            "kind: Deployment\nmetadata: {name: x}\nspec: {}\n",
            &options(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Deployment x): `spec.template` is missing or not a mapping"
        );
        let e = inject(
            "kind: Pod\nmetadata: {name: x}\nspec: {containers: 3}\n",
            &options(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Pod x): `spec.containers` is missing or not a list"
        );
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings_for_kubectl() {
        let input =
            "kind: ConfigMap\ndata:\n  a: \"on\"\n  b: \"NO\"\n  'y': \"true\"\n  c: yes please\n";
        let out = run(input).yaml;
        assert_eq!(
            out,
            "kind: ConfigMap\ndata:\n  a: 'on'\n  b: 'NO'\n  'y': 'true'\n  c: yes please\n"
        );
        assert_eq!(run(&out).yaml, out);
        assert_eq!(value(&out)["data"]["a"], "on");
    }

    #[test]
    fn quantities_are_numbers_with_a_kubernetes_suffix() {
        for good in ["1", "50m", "0.5", ".5", "64Mi", "2G", "1Ki"] {
            assert!(good.parse::<Quantity>().is_ok(), "{good}");
        }
        for bad in ["", "m", "1.2.3", "64MB", "-1", "1 Gi", "."] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad}");
        }
    }
}
