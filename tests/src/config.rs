//! Rendering the files the proxy reads: the bootstrap file and policy files.
//!
//! [`Bootstrap`] renders a standalone-mode bootstrap in which every listener
//! binds `127.0.0.1:0` (the proxy reports the real ports in its bound file),
//! with optional `[service]`, `[dns]`, `[drain]` and static
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
    endpoints: Vec<(SocketAddr, Vec<(String, String)>)>,
}

impl DirService {
    /// A directory service named `name` with no endpoints yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            policy: None,
            protocol: None,
            endpoints: Vec::new(),
        }
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

    /// Adds an endpoint with metadata `zone = "z1"`, `version = "v1"`.
    pub fn endpoint(self, addr: SocketAddr) -> Self {
        self.endpoint_with(addr, &[("zone", "z1"), ("version", "v1")])
    }

    /// Adds an endpoint with the given metadata.
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

/// A bootstrap file for a standalone sidecar on loopback.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    app: Option<(String, SocketAddr)>,
    dns: Option<SocketAddr>,
    grace: String,
    services: Vec<DirService>,
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
            services: Vec::new(),
        }
    }

    /// Adds `[service]` with this name and local app address.
    pub fn app(mut self, name: &str, addr: SocketAddr) -> Self {
        self.app = Some((name.to_owned(), addr));
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

    /// Adds a directory service.
    pub fn service(mut self, service: DirService) -> Self {
        self.services.push(service);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some((name, app)) = &self.app {
            writeln!(out, "[service]\nname = {name:?}\napp = \"{app}\"\n").unwrap();
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
        for service in &self.services {
            writeln!(out, "[[directory.services]]\nname = {:?}", service.name).unwrap();
            if let Some(policy) = &service.policy {
                writeln!(out, "policy = {policy:?}").unwrap();
            }
            if let Some(protocol) = &service.protocol {
                writeln!(out, "protocol = {protocol:?}").unwrap();
            }
            out.push_str("endpoints = [\n");
            for (addr, metadata) in &service.endpoints {
                let metadata = metadata
                    .iter()
                    .map(|(k, v)| format!("{k} = {v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
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
}
