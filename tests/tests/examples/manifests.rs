//! The Kubernetes manifests, rendered the way `kubectl kustomize` would (no
//! kubectl needed) and checked for what `kubectl apply` would not catch until
//! a pod fails to start or to be admitted: see the checks in [`problems`].
//! [`MADE_BY_HAND`] lists the Secrets the manifests use that no kustomization
//! makes, with the README section that creates them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use serde_norway::Value;

use super::{deploy_dir, files_under, is_bootstrap, tls_files};

// ---------------------------------------------------------------------------
// Kubernetes: rendering a kustomization
// ---------------------------------------------------------------------------

/// A ConfigMap or a Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ConfigMap,
    Secret,
}

/// ConfigMaps and Secrets the manifests use that no kustomization generates:
/// each is made by hand (kind, name, the README section of the kustomization's
/// directory that creates it, its keys). The test checks that the section
/// has the `kubectl create secret generic NAME` command.
const MADE_BY_HAND: &[(Kind, &str, &str, &[&str])] = &[
    (
        Kind::Secret,
        "weft-admin-tokens",
        "Install",
        &["admin-tokens"],
    ),
    (
        Kind::Secret,
        "weft-control-plane-tls",
        "Certificates",
        &["ca.crt", "tls.crt", "tls.key"],
    ),
    (
        Kind::Secret,
        "billing-weft-tls",
        "Certificates",
        &["ca.crt", "tls.crt", "tls.key"],
    ),
];

/// One YAML document of a manifest file.
#[derive(Debug)]
struct Object {
    /// The file it came from, for messages.
    file: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        str_at(&self.value, &["kind"]).unwrap_or("?")
    }

    fn name(&self) -> &str {
        str_at(&self.value, &["metadata", "name"]).unwrap_or("?")
    }

    fn what(&self) -> String {
        format!("{}: {}/{}", self.file, self.kind(), self.name())
    }
}

/// What a kustomization renders to: its objects and the ConfigMaps and Secrets
/// its generators make ((kind, name) -> keys).
#[derive(Debug, Default)]
struct Rendered {
    objects: Vec<Object>,
    generated: BTreeMap<(Kind, String), BTreeSet<String>>,
    /// The bootstrap files (`weft*.toml`) in generated ConfigMaps: (name, key) -> file.
    generated_files: BTreeMap<(String, String), PathBuf>,
}

fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(value, path).and_then(Value::as_str)
}

fn seq_at<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    get(value, path)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn bool_at(value: &Value, path: &[&str]) -> Option<bool> {
    get(value, path).and_then(Value::as_bool)
}

/// The documents of a YAML file (separated by `---` lines).
fn documents(text: &str, file: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let value: Value = serde_norway::from_str(&current)
                .with_context(|| format!("parsing a document of {file}"))?;
            if !value.is_null() {
                objects.push(Object {
                    file: file.to_owned(),
                    value,
                });
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(objects)
}

/// Renders the kustomization in `dir`: its resources (files, or directories
/// with their own kustomization) and generators. Every file it lists must exist.
fn render(dir: &Path) -> anyhow::Result<Rendered> {
    let path = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let kustomization: Value =
        serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut rendered = Rendered::default();
    for resource in seq_at(&kustomization, &["resources"]) {
        let resource = resource.as_str().context("a resource is a path")?;
        let file = dir.join(resource);
        if file.is_dir() {
            let inner = render(&file)?;
            rendered.objects.extend(inner.objects);
            rendered.generated.extend(inner.generated);
            rendered.generated_files.extend(inner.generated_files);
            continue;
        }
        let text = fs::read_to_string(&file)
            .with_context(|| format!("{} lists {resource}", path.display()))?;
        rendered.objects.extend(documents(&text, resource)?);
    }
    for (generator, kind) in [
        ("configMapGenerator", Kind::ConfigMap),
        ("secretGenerator", Kind::Secret),
    ] {
        for entry in seq_at(&kustomization, &[generator]) {
            let name = str_at(entry, &["name"]).context("a generator has a name")?;
            let mut keys = BTreeSet::new();
            for item in seq_at(entry, &["files"]) {
                let item = item.as_str().context("a generator file is a string")?;
                let (key, source) = match item.split_once('=') {
                    Some((key, source)) => (key.to_owned(), source),
                    None => (
                        Path::new(item)
                            .file_name()
                            .and_then(|n| n.to_str())
                            .context("a file name")?
                            .to_owned(),
                        item,
                    ),
                };
                let source = dir.join(source);
                ensure!(
                    source.is_file(),
                    "{}: {generator} {name} lists {item}, which does not exist",
                    path.display()
                );
                if kind == Kind::ConfigMap && is_bootstrap(&key) {
                    rendered
                        .generated_files
                        .insert((name.to_owned(), key.clone()), source);
                }
                keys.insert(key);
            }
            for literal in seq_at(entry, &["literals"]) {
                let literal = literal.as_str().context("a literal is a string")?;
                keys.insert(literal.split('=').next().unwrap_or(literal).to_owned());
            }
            rendered.generated.insert((kind, name.to_owned()), keys);
        }
    }
    Ok(rendered)
}

// ---------------------------------------------------------------------------
// Kubernetes: the checks
// ---------------------------------------------------------------------------

/// The pod spec of a workload, and its labels.
fn pod_spec(object: &Object) -> Option<(&Value, &Value)> {
    let v = &object.value;
    let template = match object.kind() {
        "Pod" => return Some((get(v, &["spec"])?, get(v, &["metadata", "labels"])?)),
        "CronJob" => get(v, &["spec", "jobTemplate", "spec", "template"])?,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            get(v, &["spec", "template"])?
        }
        _ => return None,
    };
    Some((
        get(template, &["spec"])?,
        get(template, &["metadata", "labels"]).unwrap_or(&Value::Null),
    ))
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    seq_at(pod, &["initContainers"])
        .iter()
        .chain(seq_at(pod, &["containers"]))
}

/// `labels` has every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|selector| {
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    })
}

/// A container's ports: names and numbers.
fn ports_of(container: &Value) -> (BTreeSet<String>, BTreeSet<u64>) {
    let ports = seq_at(container, &["ports"]);
    (
        ports
            .iter()
            .filter_map(|p| str_at(p, &["name"]).map(str::to_owned))
            .collect(),
        ports
            .iter()
            .filter_map(|p| get(p, &["containerPort"]).and_then(Value::as_u64))
            .collect(),
    )
}

/// Checks a port reference (a name or a number) against a container's ports.
fn port_exists(port: &Value, names: &BTreeSet<String>, numbers: &BTreeSet<u64>) -> bool {
    match (port.as_str(), port.as_u64()) {
        (Some(name), _) => names.contains(name),
        (_, Some(number)) => numbers.contains(&number),
        _ => false,
    }
}

/// Everything wrong with a rendered kustomization, one line each. `readme` is
/// the README of its directory (where hand-made objects are created).
fn problems(rendered: &Rendered, readme: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let known = |kind: Kind, name: &str| -> Option<BTreeSet<String>> {
        if let Some(keys) = rendered.generated.get(&(kind, name.to_owned())) {
            return Some(keys.clone());
        }
        MADE_BY_HAND
            .iter()
            .find(|(k, n, _, _)| *k == kind && *n == name)
            .map(|(_, _, _, keys)| keys.iter().map(|k| (*k).to_owned()).collect())
    };

    // Hand-made objects: created in the README section named for them.
    for (kind, name, section, _) in MADE_BY_HAND {
        let body = format!("\n{readme}");
        let body = body
            .split("\n## ")
            .find(|s| s.starts_with(section))
            .unwrap_or("");
        if !body.contains(&format!("create secret generic {name} ")) {
            problems.push(format!(
                "README.md: section \"{section}\" has no `create secret generic {name}` for the {kind:?}"
            ));
        }
    }

    // Every workload's pods.
    let mut pods = Vec::new();
    for object in &rendered.objects {
        let Some((pod, labels)) = pod_spec(object) else {
            continue;
        };
        pods.push((object, pod, labels));
        let what = object.what();
        problems.extend(pod_problems(&what, object, pod, &known));
    }

    for object in &rendered.objects {
        let what = object.what();
        match object.kind() {
            "Namespace"
                if str_at(
                    &object.value,
                    &["metadata", "labels", "pod-security.kubernetes.io/enforce"],
                ) != Some("restricted") =>
            {
                problems.push(format!(
                    "{what}: no label pod-security.kubernetes.io/enforce: restricted"
                ));
            }
            "Service" => {
                let selector = get(&object.value, &["spec", "selector"]).unwrap_or(&Value::Null);
                let selected: Vec<_> = pods
                    .iter()
                    .filter(|(_, _, labels)| selects(selector, labels))
                    .collect();
                if selected.is_empty() {
                    problems.push(format!("{what}: its selector matches no pod"));
                    continue;
                }
                for port in seq_at(&object.value, &["spec", "ports"]) {
                    let target = get(port, &["targetPort"])
                        .or_else(|| get(port, &["port"]))
                        .unwrap_or(&Value::Null);
                    let found = selected.iter().any(|(_, pod, _)| {
                        containers(pod).any(|c| {
                            let (names, numbers) = ports_of(c);
                            port_exists(target, &names, &numbers)
                        })
                    });
                    if !found {
                        problems.push(format!(
                            "{what}: targetPort {target:?} is no container port of the pods it selects"
                        ));
                    }
                }
            }
            "NetworkPolicy" => {
                let selector = get(&object.value, &["spec", "podSelector", "matchLabels"])
                    .unwrap_or(&Value::Null);
                let selected: Vec<_> = pods
                    .iter()
                    .filter(|(_, _, labels)| selects(selector, labels))
                    .collect();
                if selected.is_empty() {
                    problems.push(format!("{what}: its podSelector matches no pod"));
                    continue;
                }
                for rule in seq_at(&object.value, &["spec", "ingress"]) {
                    for port in seq_at(rule, &["ports"]) {
                        let port = get(port, &["port"]).unwrap_or(&Value::Null);
                        let found = selected.iter().any(|(_, pod, _)| {
                            containers(pod).any(|c| {
                                let (names, numbers) = ports_of(c);
                                port_exists(port, &names, &numbers)
                            })
                        });
                        if !found {
                            problems.push(format!(
                                "{what}: port {port:?} is no container port of the pods it selects"
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    // Every bootstrap file in a ConfigMap: the container that runs it finds
    // its [tls] files in a mounted Secret.
    for ((config_map, key), source) in &rendered.generated_files {
        let text = fs::read_to_string(source).unwrap_or_default();
        let mut used = false;
        for (object, pod, _) in &pods {
            for container in containers(pod) {
                let mounts = mounts(pod, container);
                let Some(mount) = mounts
                    .iter()
                    .find(|m| m.source == Some((Kind::ConfigMap, config_map.clone())))
                else {
                    continue;
                };
                let config = format!("{}/{key}", mount.path);
                if !command_line(container).iter().any(|a| a.contains(&config)) {
                    continue;
                }
                used = true;
                let tls = tls_files(&text);
                if tls.is_empty() {
                    problems.push(format!("{}: no [tls] section", source.display()));
                }
                for (tls_key, path) in tls {
                    let path = if path.starts_with('/') {
                        path
                    } else {
                        format!("{}/{path}", mount.path)
                    };
                    match resolve(&mounts, &path, &known) {
                        Ok(Some((Kind::Secret, _))) => {}
                        Ok(_) => problems.push(format!(
                            "{}: [tls] {tls_key} = {path:?} is not in a Secret mounted in {} container {}",
                            source.display(),
                            object.what(),
                            str_at(container, &["name"]).unwrap_or("?")
                        )),
                        Err(e) => problems.push(format!(
                            "{}: [tls] {tls_key}: {e} (in {})",
                            source.display(),
                            object.what()
                        )),
                    }
                }
            }
        }
        if !used {
            problems.push(format!(
                "{}: no container runs with it (--config {key} under the ConfigMap {config_map}'s mount)",
                source.display()
            ));
        }
    }
    problems
}

/// A volume mounted in a container: where, and what it shows.
#[derive(Debug)]
struct Mount {
    path: String,
    /// The ConfigMap or Secret it shows (None: an emptyDir, a claim, ...).
    source: Option<(Kind, String)>,
    /// `items` of the volume: file path -> key.
    items: BTreeMap<String, String>,
}

fn mounts(pod: &Value, container: &Value) -> Vec<Mount> {
    seq_at(container, &["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let name = str_at(m, &["name"])?;
            let volume = seq_at(pod, &["volumes"])
                .iter()
                .find(|v| str_at(v, &["name"]) == Some(name));
            let source = volume.and_then(|v| {
                str_at(v, &["configMap", "name"])
                    .map(|n| (Kind::ConfigMap, n.to_owned()))
                    .or_else(|| {
                        str_at(v, &["secret", "secretName"]).map(|n| (Kind::Secret, n.to_owned()))
                    })
            });
            let items = volume
                .map(|v| {
                    seq_at(v, &["configMap", "items"])
                        .iter()
                        .chain(seq_at(v, &["secret", "items"]))
                        .filter_map(|i| {
                            Some((
                                str_at(i, &["path"])?.to_owned(),
                                str_at(i, &["key"])?.to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Mount {
                path: str_at(m, &["mountPath"])?.trim_end_matches('/').to_owned(),
                source,
                items,
            })
        })
        .collect()
}

/// The ConfigMap or Secret (and key) a file path of a container lands in,
/// through its deepest mount; `None` if no ConfigMap or Secret is mounted there.
fn resolve(
    mounts: &[Mount],
    path: &str,
    known: &dyn Fn(Kind, &str) -> Option<BTreeSet<String>>,
) -> Result<Option<(Kind, String)>, String> {
    let Some(mount) = mounts
        .iter()
        .filter(|m| path.starts_with(&format!("{}/", m.path)))
        .max_by_key(|m| m.path.len())
    else {
        return Ok(None);
    };
    let Some((kind, name)) = &mount.source else {
        return Ok(None);
    };
    let rest = &path[mount.path.len() + 1..];
    let key = if mount.items.is_empty() {
        rest
    } else {
        mount
            .items
            .get(rest)
            .map(String::as_str)
            .ok_or_else(|| format!("{path}: no item of the {kind:?} {name} is {rest}"))?
    };
    let keys = known(*kind, name).ok_or_else(|| format!("{path}: unknown {kind:?} {name}"))?;
    if !keys.contains(key) {
        return Err(format!(
            "{path}: the {kind:?} {name} has no key {key:?} (keys: {keys:?})"
        ));
    }
    Ok(Some((*kind, name.clone())))
}

fn command_line(container: &Value) -> Vec<String> {
    seq_at(container, &["command"])
        .iter()
        .chain(seq_at(container, &["args"]))
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

/// The volume types Pod Security "restricted" allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn pod_problems(
    what: &str,
    object: &Object,
    pod: &Value,
    known: &dyn Fn(Kind, &str) -> Option<BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let pod_security = get(pod, &["securityContext"]).unwrap_or(&Value::Null);
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if bool_at(pod, &[host]) == Some(true) {
            problems.push(format!("{what}: {host} is not allowed by \"restricted\""));
        }
    }

    // Volumes: their types, and the ConfigMaps and Secrets they show.
    let mut volumes: BTreeSet<String> = seq_at(&object.value, &["spec", "volumeClaimTemplates"])
        .iter()
        .filter_map(|t| str_at(t, &["metadata", "name"]).map(str::to_owned))
        .collect();
    for volume in seq_at(pod, &["volumes"]) {
        let name = str_at(volume, &["name"]).unwrap_or("?");
        volumes.insert(name.to_owned());
        let types: Vec<&str> = volume
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(Value::as_str)
                    .filter(|k| *k != "name")
                    .collect()
            })
            .unwrap_or_default();
        if let Some(bad) = types.iter().find(|t| !RESTRICTED_VOLUMES.contains(t)) {
            problems.push(format!(
                "{what}: volume {name} is a {bad} volume, not allowed by \"restricted\""
            ));
        }
        let mut used = Vec::new();
        if let Some(n) = str_at(volume, &["configMap", "name"]) {
            used.push((Kind::ConfigMap, n));
        }
        if let Some(n) = str_at(volume, &["secret", "secretName"]) {
            used.push((Kind::Secret, n));
        }
        for source in seq_at(volume, &["projected", "sources"]) {
            if let Some(n) = str_at(source, &["configMap", "name"]) {
                used.push((Kind::ConfigMap, n));
            }
            if let Some(n) = str_at(source, &["secret", "name"]) {
                used.push((Kind::Secret, n));
            }
        }
        for (kind, used) in used {
            if known(kind, used).is_none() {
                problems.push(format!(
                    "{what}: volume {name} shows the {kind:?} {used}, which no generator makes and MADE_BY_HAND does not list"
                ));
            }
        }
    }

    for container in containers(pod) {
        let name = str_at(container, &["name"]).unwrap_or("?");
        let what = format!("{what} container {name}");
        let (port_names, port_numbers) = ports_of(container);

        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                if let Some(port) = get(container, &[probe, handler, "port"])
                    && !port_exists(port, &port_names, &port_numbers)
                {
                    problems.push(format!(
                        "{what}: {probe} port {port:?} is not among its ports"
                    ));
                }
            }
        }

        for mount in seq_at(container, &["volumeMounts"]) {
            let volume = str_at(mount, &["name"]).unwrap_or("?");
            if !volumes.contains(volume) {
                problems.push(format!("{what}: mounts {volume}, which is not declared"));
            }
        }

        for env in seq_at(container, &["env"]) {
            for (reference, kind) in [
                ("configMapKeyRef", Kind::ConfigMap),
                ("secretKeyRef", Kind::Secret),
            ] {
                let Some(used) = str_at(env, &["valueFrom", reference, "name"]) else {
                    continue;
                };
                let key = str_at(env, &["valueFrom", reference, "key"]).unwrap_or("?");
                match known(kind, used) {
                    None => problems.push(format!(
                        "{what}: env uses the {kind:?} {used}, which no generator makes and MADE_BY_HAND does not list"
                    )),
                    Some(keys) if !keys.contains(key) => problems.push(format!(
                        "{what}: env uses key {key} of the {kind:?} {used}, which has none"
                    )),
                    Some(_) => {}
                }
            }
        }
        for env in seq_at(container, &["envFrom"]) {
            for (reference, kind) in [
                ("configMapRef", Kind::ConfigMap),
                ("secretRef", Kind::Secret),
            ] {
                if let Some(used) = str_at(env, &[reference, "name"])
                    && known(kind, used).is_none()
                {
                    problems.push(format!(
                        "{what}: envFrom uses the {kind:?} {used}, which no generator makes and MADE_BY_HAND does not list"
                    ));
                }
            }
        }

        // Files named on the command line under a mounted ConfigMap or Secret.
        let mounted = mounts(pod, container);
        for arg in command_line(container) {
            let path = arg.split_once('=').map_or(arg.as_str(), |(_, v)| v);
            if path.starts_with('/')
                && let Err(e) = resolve(&mounted, path, known)
            {
                problems.push(format!("{what}: argument {arg}: {e}"));
            }
        }

        // Pod Security "restricted", plus a read-only root filesystem.
        let security = get(container, &["securityContext"]).unwrap_or(&Value::Null);
        let either = |path: &[&str]| get(security, path).or_else(|| get(pod_security, path));
        if either(&["runAsNonRoot"]).and_then(Value::as_bool) != Some(true) {
            problems.push(format!("{what}: runAsNonRoot is not true"));
        }
        if either(&["runAsUser"]).and_then(Value::as_u64) == Some(0) {
            problems.push(format!("{what}: runAsUser is 0"));
        }
        if !matches!(
            either(&["seccompProfile", "type"]).and_then(Value::as_str),
            Some("RuntimeDefault" | "Localhost")
        ) {
            problems.push(format!("{what}: seccompProfile is not RuntimeDefault"));
        }
        if bool_at(security, &["allowPrivilegeEscalation"]) != Some(false) {
            problems.push(format!("{what}: allowPrivilegeEscalation is not false"));
        }
        if bool_at(security, &["privileged"]) == Some(true) {
            problems.push(format!("{what}: privileged"));
        }
        if !seq_at(security, &["capabilities", "drop"])
            .iter()
            .any(|c| c.as_str() == Some("ALL"))
        {
            problems.push(format!("{what}: capabilities do not drop ALL"));
        }
        if seq_at(security, &["capabilities", "add"])
            .iter()
            .any(|c| c.as_str() != Some("NET_BIND_SERVICE"))
        {
            problems.push(format!(
                "{what}: adds a capability other than NET_BIND_SERVICE"
            ));
        }
        if bool_at(security, &["readOnlyRootFilesystem"]) != Some(true) {
            problems.push(format!("{what}: readOnlyRootFilesystem is not true"));
        }

        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                if get(container, &["resources", bound, resource]).is_none() {
                    problems.push(format!("{what}: no resources.{bound}.{resource}"));
                }
            }
        }
    }
    problems
}

/// The cert-manager Certificates (an optional directory beside a
/// kustomization, not part of it) make exactly the hand-made TLS Secrets, with
/// the identities the sidecars and the control plane must have.
fn cert_manager_problems(dir: &Path, rendered: &Rendered) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let files = files_under(&dir.join("cert-manager"), &|n| n.ends_with(".yaml"))?;
    ensure!(
        !files.is_empty(),
        "no cert-manager Certificates in {}",
        dir.display()
    );
    let mut made = BTreeSet::new();
    for file in files {
        let shown = file.display().to_string();
        for object in documents(&fs::read_to_string(&file)?, &shown)? {
            if rendered
                .objects
                .iter()
                .any(|o| o.kind() == object.kind() && o.name() == object.name())
            {
                problems.push(format!(
                    "{}: also in the kustomization, which it must not be",
                    object.what()
                ));
            }
            if object.kind() != "Certificate"
                || bool_at(&object.value, &["spec", "isCA"]) == Some(true)
            {
                continue;
            }
            let secret = str_at(&object.value, &["spec", "secretName"]).unwrap_or("?");
            made.insert(secret.to_owned());
            let uris: Vec<&str> = seq_at(&object.value, &["spec", "uris"])
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let wanted = match secret.strip_suffix("-weft-tls") {
                Some(service) => format!("spiffe://weft.local/service/{service}"),
                None if secret == "weft-control-plane-tls" => {
                    "spiffe://weft.local/control-plane".to_owned()
                }
                None => {
                    problems.push(format!(
                        "{}: makes {secret}, which no manifest uses",
                        object.what()
                    ));
                    continue;
                }
            };
            if uris != [wanted.as_str()] {
                problems.push(format!(
                    "{}: uris {uris:?}, wanted [{wanted:?}]",
                    object.what()
                ));
            }
            let usages: BTreeSet<&str> = seq_at(&object.value, &["spec", "usages"])
                .iter()
                .filter_map(Value::as_str)
                .collect();
            if !usages.contains("server auth") || !usages.contains("client auth") {
                problems.push(format!(
                    "{}: usages {usages:?} lack server auth or client auth",
                    object.what()
                ));
            }
        }
    }
    for (kind, name, _, keys) in MADE_BY_HAND {
        if *kind == Kind::Secret && keys.contains(&"tls.key") && !made.contains(*name) {
            problems.push(format!(
                "cert-manager/: no Certificate makes the Secret {name}"
            ));
        }
    }
    Ok(problems)
}

#[test]
fn kubernetes_manifests_render_and_hang_together() -> anyhow::Result<()> {
    let kustomizations = files_under(&deploy_dir(), &|name| name == "kustomization.yaml")?;
    ensure!(!kustomizations.is_empty(), "no kustomization.yaml found");
    for kustomization in kustomizations {
        let dir = kustomization.parent().context("a file has a directory")?;
        let rendered = render(dir)?;
        // The walk found something to check: workloads, a TOML ConfigMap.
        ensure!(
            rendered.objects.iter().any(|o| pod_spec(o).is_some()),
            "{}: no workload rendered",
            kustomization.display()
        );
        ensure!(
            !rendered.generated_files.is_empty(),
            "{} generates no ConfigMap with a bootstrap file",
            kustomization.display()
        );
        let readme = fs::read_to_string(dir.join("README.md")).unwrap_or_default();
        let mut found = problems(&rendered, &readme);
        if dir.join("cert-manager").is_dir() {
            found.extend(cert_manager_problems(dir, &rendered)?);
        }
        if !found.is_empty() {
            bail!(
                "{}: {} problem(s):\n{}",
                kustomization.display(),
                found.len(),
                found.join("\n")
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The checks fail on broken manifests
// ---------------------------------------------------------------------------

/// A small manifest that passes, to break one thing at a time.
const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
spec:
  template:
    metadata:
      labels:
        app: demo
    spec:
      securityContext:
        runAsNonRoot: true
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: weft-proxy
          command: ["weft-proxy", "run", "--config", "/etc/weft/weft.toml"]
          args: ["--token=/etc/secret/admin-tokens"]
          ports:
            - name: admin
              containerPort: 4191
          readinessProbe:
            httpGet:
              path: /ready
              port: admin
          resources:
            requests: {cpu: 10m, memory: 16Mi}
            limits: {cpu: 100m, memory: 32Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: config
              mountPath: /etc/weft
            - name: secret
              mountPath: /etc/secret
      volumes:
        - name: config
          configMap:
            name: demo-weft
        - name: secret
          secret:
            secretName: weft-admin-tokens
---
apiVersion: v1
kind: Service
metadata:
  name: demo
spec:
  selector:
    app: demo
  ports:
    - port: 4191
      targetPort: admin
"#;

/// The problems of `GOOD` with `from` replaced by `to`.
fn problems_of(from: &str, to: &str) -> Vec<String> {
    assert!(GOOD.contains(from), "{from:?} is not in the manifest");
    let text = GOOD.replacen(from, to, 1);
    let mut rendered = Rendered {
        objects: documents(&text, "demo.yaml").unwrap(),
        ..Rendered::default()
    };
    rendered.generated.insert(
        (Kind::ConfigMap, "demo-weft".to_owned()),
        ["weft.toml".to_owned()].into(),
    );
    let readme = "## Install\n\
                  kubectl create secret generic weft-admin-tokens --from-file=admin-tokens\n\
                  ## Certificates\n\
                  kubectl create secret generic weft-control-plane-tls --from-file=...\n\
                  kubectl create secret generic billing-weft-tls --from-file=...\n";
    problems(&rendered, readme)
}

#[test]
fn the_manifest_checks_find_each_kind_of_mistake() {
    assert_eq!(problems_of("", ""), Vec::<String>::new());
    let cases = [
        // A probe on a port the container does not declare.
        (
            "              port: admin",
            "              port: metrics",
            "readinessProbe port",
        ),
        // A Service's targetPort that no container has.
        (
            "      targetPort: admin",
            "      targetPort: web",
            "targetPort",
        ),
        // A mount of an undeclared volume.
        (
            "            - name: secret\n              mountPath",
            "            - name: secrets\n              mountPath",
            "not declared",
        ),
        // A ConfigMap nobody makes.
        (
            "            name: demo-weft",
            "            name: demo-weft-2",
            "no generator makes",
        ),
        // A file that is not a key of the mounted Secret.
        (
            "/etc/secret/admin-tokens",
            "/etc/secret/tokens",
            "has no key",
        ),
        // Pod Security "restricted".
        (
            "            allowPrivilegeEscalation: false\n",
            "",
            "allowPrivilegeEscalation",
        ),
        (
            "              drop: [\"ALL\"]",
            "              drop: [\"NET_RAW\"]",
            "drop ALL",
        ),
        (
            "          type: RuntimeDefault",
            "          type: Unconfined",
            "seccompProfile",
        ),
        ("        runAsNonRoot: true\n", "", "runAsNonRoot"),
        (
            "            readOnlyRootFilesystem: true\n",
            "",
            "readOnlyRootFilesystem",
        ),
        (
            "          configMap:\n            name: demo-weft",
            "          hostPath:\n            path: /etc",
            "hostPath",
        ),
        (
            "    pod-security.kubernetes.io/enforce: restricted",
            "    pod-security.kubernetes.io/enforce: baseline",
            "enforce",
        ),
        // Requests and limits.
        (
            "            limits: {cpu: 100m, memory: 32Mi}\n",
            "",
            "resources.limits.cpu",
        ),
        (
            "            requests: {cpu: 10m, memory: 16Mi}",
            "            requests: {cpu: 10m}",
            "resources.requests.memory",
        ),
    ];
    for (from, to, wanted) in cases {
        let found = problems_of(from, to);
        assert!(
            found.iter().any(|p| p.contains(wanted)),
            "replacing {from:?} with {to:?}: wanted a problem with {wanted:?}, got {found:?}"
        );
    }
}
