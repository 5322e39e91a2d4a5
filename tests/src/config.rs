//! Rendering the files the proxy reads: the bootstrap file and policy files.
//!
//! [`Bootstrap`] renders a standalone-mode bootstrap in which every listener
//! binds `127.0.0.1:0` (the proxy reports the real ports in its bound file),
//! with optional `[service]`, `[dns]`, `[drain]`, `[telemetry]`, `[limits]` and static
//! `[[directory.services]]` entries. Scenarios that test parsing itself write
//! their TOML by hand instead, so that line and column numbers are visible in
//! the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::net::SocketAddr;

/// One `[[directory.services]]` entry.
#[derive(Debug, Clone)]
pub struct DirService {
    name: String,
    policy: Option<String>,
    protocol: Option<String>,
    tls: Option<String>,
    endpoints: Vec<(SocketAddr, Vec<(String, String)>)>,
}

impl DirService {
    /// A directory service named `name` with no endpoints yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            policy: None,
            protocol: None,
            tls: None,
            endpoints: Vec::new(),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets `policy = FILE` (relative to the bootstrap file).
    pub fn policy(mut self, file: &str) -> Self {
        self.policy = Some(file.to_owned());
        self
    }

    /// Sets `protocol` (`auto`, `http1`, `http2`).
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.to_owned());
        self
    }

    /// Sets `tls` (`none`, `mesh`).
    pub fn tls(mut self, mode: &str) -> Self {
        self.tls = Some(mode.to_owned());
        self
    }

    /// Adds an endpoint with metadata `zone = "z1"`, `version = "v1"`.
    pub fn endpoint(self, addr: SocketAddr) -> Self {
        self.endpoint_with(addr, &[("zone", "z1"), ("version", "v1")])
    }

    /// Adds an endpoint with the given metadata (`weight` is written as a number).
    pub fn endpoint_with(mut self, addr: SocketAddr, metadata: &[(&str, &str)]) -> Self {
        let metadata = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.endpoints.push((addr, metadata));
        self
    }

    /// Adds one endpoint per address, with the default metadata.
    pub fn endpoints(self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        addrs.into_iter().fold(self, Self::endpoint)
    }
}

/// The `[service]` section: the instance the sidecar fronts.
#[derive(Debug, Clone)]
struct LocalApp {
    name: String,
    addr: SocketAddr,
    policy: Option<String>,
    instances: Option<u32>,
    metadata: Vec<(String, String)>,
    id: Option<String>,
    health: Option<String>,
}

/// A bootstrap file for a standalone sidecar on loopback.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    app: Option<LocalApp>,
    dns: Option<SocketAddr>,
    grace: String,
    telemetry: Option<String>,
    limits: Vec<String>,
    services: Vec<DirService>,
    tls: Option<(String, Option<String>)>,
    tls_keys: Vec<String>,
    control_plane: Vec<String>,
    control_plane_keys: Vec<String>,
    directory_keys: Vec<String>,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self::new()
    }
}

impl Bootstrap {
    /// No local app, no DNS section, a 5 s drain grace, an empty directory.
    pub fn new() -> Self {
        Self {
            app: None,
            dns: None,
            grace: "5s".to_owned(),
            telemetry: None,
            limits: Vec::new(),
            services: Vec::new(),
            tls: None,
            tls_keys: Vec::new(),
            control_plane: Vec::new(),
            control_plane_keys: Vec::new(),
            directory_keys: Vec::new(),
        }
    }

    /// Adds `[tls]` with `ca = "ca.pem"`, `cert = "<identity>.pem"`, `key =
    /// "<identity>-key.pem"` (the file names `weftctl certs` writes), and
    /// `watch_interval` if given.
    pub fn tls(mut self, identity: &str, watch_interval: Option<&str>) -> Self {
        self.tls = Some((identity.to_owned(), watch_interval.map(str::to_owned)));
        self
    }

    /// Adds `key = value` (TOML, written as given) to `[tls]` (see [`Self::tls`]).
    pub fn tls_key(mut self, key: &str, value: &str) -> Self {
        self.tls_keys.push(format!("{key} = {value}"));
        self
    }

    /// Adds `[telemetry]` with `body` as its keys (TOML written by the test,
    /// e.g. `otlp_endpoint = "http://127.0.0.1:4317"\naccess_log = true`).
    pub fn telemetry(mut self, body: &str) -> Self {
        self.telemetry = Some(body.to_owned());
        self
    }

    /// Adds `[service]` with this name and local app address.
    pub fn app(mut self, name: &str, addr: SocketAddr) -> Self {
        self.app = Some(LocalApp {
            name: name.to_owned(),
            addr,
            policy: None,
            instances: None,
            metadata: Vec::new(),
            id: None,
            health: None,
        });
        self
    }

    fn local_app(&mut self) -> &mut LocalApp {
        self.app
            .as_mut()
            .expect("call Bootstrap::app before setting [service] keys")
    }

    /// Sets `[service] policy = FILE` (relative to the bootstrap file).
    pub fn app_policy(mut self, file: &str) -> Self {
        self.local_app().policy = Some(file.to_owned());
        self
    }

    /// Sets `[service] instances` (the share of service-wide limits).
    pub fn instances(mut self, instances: u32) -> Self {
        self.local_app().instances = Some(instances);
        self
    }

    /// Sets `[service] id` (the instance id it registers with a control plane).
    pub fn app_id(mut self, id: &str) -> Self {
        self.local_app().id = Some(id.to_owned());
        self
    }

    /// Sets `[service] health = { BODY }` (the app's health check), e.g.
    /// `interval = "200ms", timeout = "100ms"` or `enabled = false`.
    pub fn app_health(mut self, body: &str) -> Self {
        self.local_app().health = Some(body.to_owned());
        self
    }

    /// Adds `key = value` (TOML, written as given) to `[control_plane]`.
    pub fn control_plane_key(mut self, key: &str, value: &str) -> Self {
        self.control_plane_keys.push(format!("{key} = {value}"));
        self
    }

    /// Adds `[control_plane] addresses` (each `http://HOST:PORT`).
    pub fn control_plane<S: Into<String>>(
        mut self,
        addresses: impl IntoIterator<Item = S>,
    ) -> Self {
        self.control_plane = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `[service] metadata` (e.g. the caller's own `zone`).
    pub fn app_metadata(mut self, metadata: &[(&str, &str)]) -> Self {
        self.local_app().metadata = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// Adds `[dns]` pointing at `server` (500 ms timeout, one attempt, TTLs 1 s..5 m).
    pub fn dns(mut self, server: SocketAddr) -> Self {
        self.dns = Some(server);
        self
    }

    /// Sets `[drain] grace`.
    pub fn grace(mut self, grace: &str) -> Self {
        self.grace = grace.to_owned();
        self
    }

    /// Adds `key = value` (TOML, written as given) to `[limits]`.
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        self.limits.push(format!("{key} = {value}"));
        self
    }

    /// Adds `key = value` to `[directory]` (`value` is TOML).
    pub fn directory_key(mut self, key: &str, value: &str) -> Self {
        self.directory_keys.push(format!("{key} = {value}"));
        self
    }

    /// Adds a directory service.
    pub fn service(mut self, service: DirService) -> Self {
        self.services.push(service);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(app) = &self.app {
            writeln!(
                out,
                "[service]\nname = {:?}\napp = \"{}\"",
                app.name, app.addr
            )
            .unwrap();
            if let Some(policy) = &app.policy {
                writeln!(out, "policy = {policy:?}").unwrap();
            }
            if let Some(id) = &app.id {
                writeln!(out, "id = {id:?}").unwrap();
            }
            if let Some(instances) = app.instances {
                writeln!(out, "instances = {instances}").unwrap();
            }
            if !app.metadata.is_empty() {
                writeln!(out, "metadata = {{ {} }}", inline_table(&app.metadata)).unwrap();
            }
            if let Some(health) = &app.health {
                writeln!(out, "health = {{ {health} }}").unwrap();
            }
            out.push('\n');
        }
        out.push_str(
            "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n",
        );
        if let Some(server) = self.dns {
            writeln!(
                out,
                "[dns]\nservers = [\"{server}\"]\ntimeout = \"500ms\"\nattempts = 1\n\
                 min_ttl = \"1s\"\nmax_ttl = \"5m\"\n"
            )
            .unwrap();
        }
        writeln!(out, "[drain]\ngrace = {:?}\n", self.grace).unwrap();
        if let Some((identity, watch)) = &self.tls {
            writeln!(
                out,
                "[tls]\nca = \"ca.pem\"\ncert = \"{identity}.pem\"\nkey = \"{identity}-key.pem\""
            )
            .unwrap();
            if let Some(watch) = watch {
                writeln!(out, "watch_interval = {watch:?}").unwrap();
            }
            for line in &self.tls_keys {
                writeln!(out, "{line}").unwrap();
            }
            out.push('\n');
        }
        if let Some(body) = &self.telemetry {
            writeln!(out, "[telemetry]\n{body}\n").unwrap();
        }
        if !self.limits.is_empty() {
            writeln!(out, "[limits]\n{}\n", self.limits.join("\n")).unwrap();
        }
        if !self.control_plane.is_empty() {
            let addresses = self
                .control_plane
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(out, "[control_plane]\naddresses = [{addresses}]").unwrap();
            for line in &self.control_plane_keys {
                writeln!(out, "{line}").unwrap();
            }
            out.push('\n');
        }
        if !self.directory_keys.is_empty() {
            writeln!(out, "[directory]\n{}\n", self.directory_keys.join("\n")).unwrap();
        }
        for service in &self.services {
            writeln!(out, "[[directory.services]]\nname = {:?}", service.name).unwrap();
            if let Some(policy) = &service.policy {
                writeln!(out, "policy = {policy:?}").unwrap();
            }
            if let Some(protocol) = &service.protocol {
                writeln!(out, "protocol = {protocol:?}").unwrap();
            }
            if let Some(tls) = &service.tls {
                writeln!(out, "tls = {tls:?}").unwrap();
            }
            out.push_str("endpoints = [\n");
            for (addr, metadata) in &service.endpoints {
                let metadata = inline_table(metadata);
                writeln!(
                    out,
                    "  {{ address = \"{addr}\", metadata = {{ {metadata} }} }},"
                )
                .unwrap();
            }
            out.push_str("]\n\n");
        }
        out
    }
}

/// `k1 = "v1", k2 = "v2"`: the inside of a TOML inline table of strings,
/// except `weight`, which the schema wants as a number.
fn inline_table(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| match k.as_str() {
            "weight" => format!("{k} = {v}"),
            _ => format!("{k} = {v:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy file for `service`: the `service` key, then `body` (TOML tables
/// written by the test, so the policy under test reads as the user writes it).
pub fn policy_file(service: &str, body: &str) -> String {
    format!("service = {service:?}\n\n{body}\n")
}

/// A policy file for `service` that only picks the outbound load balancer.
pub fn policy(service: &str, load_balancer: &str) -> String {
    format!("service = {service:?}\n\n[outbound]\nload_balancer = {load_balancer:?}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_full_bootstrap() {
        let text = Bootstrap::new()
            .app("checkout", "127.0.0.1:8080".parse().unwrap())
            .dns("127.0.0.1:5353".parse().unwrap())
            .grace("2s")
            .service(
                DirService::new("billing")
                    .policy("billing.toml")
                    .protocol("http2")
                    .endpoint("127.0.0.1:1".parse().unwrap()),
            )
            .render();
        let expected = r#"[service]
name = "checkout"
app = "127.0.0.1:8080"

[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"

[dns]
servers = ["127.0.0.1:5353"]
timeout = "500ms"
attempts = 1
min_ttl = "1s"
max_ttl = "5m"

[drain]
grace = "2s"

[[directory.services]]
name = "billing"
policy = "billing.toml"
protocol = "http2"
endpoints = [
  { address = "127.0.0.1:1", metadata = { zone = "z1", version = "v1" } },
]

"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn renders_service_policy_instances_and_metadata() {
        let text = Bootstrap::new()
            .app("billing", "127.0.0.1:8080".parse().unwrap())
            .app_policy("billing.toml")
            .instances(2)
            .app_metadata(&[("zone", "z1")])
            .service(DirService::new("b").endpoint_with(
                "127.0.0.1:1".parse().unwrap(),
                &[("version", "v2"), ("weight", "50")],
            ))
            .render();
        assert!(
            text.starts_with(
                "[service]\nname = \"billing\"\napp = \"127.0.0.1:8080\"\npolicy = \"billing.toml\"\n\
                 instances = 2\nmetadata = { zone = \"z1\" }\n\n[listen]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  { address = \"127.0.0.1:1\", metadata = { version = \"v2\", weight = 50 } },\n"
            ),
            "{text}"
        );
        assert_eq!(
            policy_file("billing", "[inbound]\nmax_concurrency = 2"),
            "service = \"billing\"\n\n[inbound]\nmax_concurrency = 2\n"
        );
    }
}
