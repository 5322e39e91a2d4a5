//! Rules across keys of a bootstrap file, checked after it deserializes.
//!
//! Each rule returns the first [`Problem`] it finds, addressed by key path so
//! the error quotes the offending line. Where two keys clash the problem
//! points at the later one (the duplicate, not the original), or at the one
//! actually written when the other is a default.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::{Bootstrap, StaticService, TlsMode};
use crate::diag::{KeyPath, Problem};

impl Bootstrap {
    /// Checks every cross-key rule of the bootstrap file.
    pub(crate) fn validate(&self) -> Result<(), Problem> {
        self.check_listeners()?;
        self.check_dns()?;
        self.check_limits()?;
        self.check_telemetry()?;
        self.check_directory()?;
        self.check_policies()?;
        self.check_health()?;
        self.check_tls()
    }

    /// A health check must end before the next one starts.
    fn check_health(&self) -> Result<(), Problem> {
        let Some(service) = &self.service else {
            return Ok(());
        };
        let health = &service.health;
        let at = |key: &str| KeyPath::new(["service", "health", key]);
        if health.timeout > health.interval {
            return Err(Problem::new(
                at("timeout"),
                format!(
                    "service.health.timeout ({}) is longer than service.health.interval ({}); \
                     a check must end before the next one starts",
                    health.timeout, health.interval
                ),
            )
            .or_at(at("interval")));
        }
        Ok(())
    }

    /// A static service reached with mTLS, and an `https` control plane, need
    /// this sidecar's own identity.
    fn check_tls(&self) -> Result<(), Problem> {
        if self.tls.is_some() {
            return Ok(());
        }
        if let Some(cp) = &self.control_plane
            && let Some((i, address)) = cp
                .addresses
                .iter()
                .enumerate()
                .find(|(_, a)| a.starts_with("https://"))
        {
            return Err(Problem::new(
                KeyPath::new(["control_plane", "addresses"]).index(i),
                format!(
                    "control plane {address:?} is reached over mTLS, but this sidecar has no \
                     certificate: add a [tls] section (ca, cert, key) or use http://"
                ),
            ));
        }
        let mut services = self.directory.services.iter().enumerate();
        if let Some((i, service)) = services.find(|(_, s)| s.tls == TlsMode::Mesh) {
            return Err(Problem::new(
                KeyPath::new(["directory", "services"]).index(i).key("tls"),
                format!(
                    "service {:?} is reached with mTLS, but this sidecar has no certificate: \
                     add a [tls] section (ca, cert, key) or remove tls = \"mesh\"",
                    service.name.as_str()
                ),
            ));
        }
        Ok(())
    }

    fn check_listeners(&self) -> Result<(), Problem> {
        let listeners = [
            ("outbound", self.listen.outbound),
            ("inbound", self.listen.inbound),
            ("admin", self.listen.admin),
        ];
        let at = |name: &str| KeyPath::new(["listen", name]);
        for (i, &(name, addr)) in listeners.iter().enumerate() {
            for &(earlier, other) in &listeners[..i] {
                if overlap(addr, other) {
                    let message = if addr == other {
                        format!("listen.{earlier} and listen.{name} are both {addr}")
                    } else {
                        format!("listen.{earlier} ({other}) and listen.{name} ({addr}) overlap")
                    };
                    return Err(Problem::new(
                        at(name),
                        format!("{message}; give each listener its own address"),
                    )
                    .or_at(at(earlier)));
                }
            }
        }
        let Some(service) = &self.service else {
            return Ok(());
        };
        let app = KeyPath::new(["service", "app"]);
        if service.app.port() == 0 {
            return Err(Problem::new(
                app,
                "port 0 cannot be connected to; give the app's port",
            ));
        }
        if let Some((name, _)) = listeners.iter().find(|(_, l)| overlap(service.app, *l)) {
            return Err(Problem::new(
                app,
                format!(
                    "{} is also listen.{name}: the sidecar would forward the app's traffic to itself",
                    service.app
                ),
            ));
        }
        Ok(())
    }

    fn check_dns(&self) -> Result<(), Problem> {
        let dns = &self.dns;
        if dns.min_ttl > dns.max_ttl {
            return Err(Problem::new(
                KeyPath::new(["dns", "max_ttl"]),
                format!(
                    "dns.max_ttl ({}) is shorter than dns.min_ttl ({})",
                    dns.max_ttl, dns.min_ttl
                ),
            )
            .or_at(KeyPath::new(["dns", "min_ttl"])));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), Problem> {
        let limits = &self.limits;
        let at = |key: &str| KeyPath::new(["limits", key]);
        if limits.max_uri_length > limits.max_header_size {
            return Err(Problem::new(
                at("max_uri_length"),
                format!(
                    "limits.max_uri_length ({}) is longer than limits.max_header_size ({}), \
                     which already bounds the request line",
                    limits.max_uri_length, limits.max_header_size
                ),
            )
            .or_at(at("max_header_size")));
        }
        if limits.idle_timeout < limits.header_read_timeout {
            return Err(Problem::new(
                at("idle_timeout"),
                format!(
                    "limits.idle_timeout ({}) is shorter than limits.header_read_timeout ({})",
                    limits.idle_timeout, limits.header_read_timeout
                ),
            )
            .or_at(at("header_read_timeout")));
        }
        Ok(())
    }

    fn check_telemetry(&self) -> Result<(), Problem> {
        let telemetry = &self.telemetry;
        if telemetry.otlp_metrics && telemetry.otlp_endpoint.is_none() {
            return Err(Problem::new(
                KeyPath::new(["telemetry", "otlp_metrics"]),
                "telemetry.otlp_metrics needs telemetry.otlp_endpoint, the OTLP/gRPC collector \
                 the metrics are sent to, e.g. otlp_endpoint = \"http://otel-collector:4317\"",
            ));
        }
        Ok(())
    }

    fn check_directory(&self) -> Result<(), Problem> {
        let mut seen = HashMap::new();
        for (i, service) in self.directory.services.iter().enumerate() {
            let at = KeyPath::new(["directory", "services"]).index(i);
            if let Some(first) = seen.insert(&service.name, i) {
                return Err(Problem::new(
                    at.key("name"),
                    format!(
                        "service {:?} is already listed at directory.services[{first}]",
                        service.name.as_str()
                    ),
                ));
            }
            check_endpoints(service, &at)?;
        }
        Ok(())
    }

    /// One service, one policy: the local service may also be listed in the
    /// directory, but both entries must then name the same policy file.
    fn check_policies(&self) -> Result<(), Problem> {
        let Some(local) = &self.service else {
            return Ok(());
        };
        let Some(local_policy) = &local.policy else {
            return Ok(());
        };
        let entries = self.directory.services.iter().enumerate();
        for (i, service) in entries.filter(|(_, s)| s.name == local.name) {
            match &service.policy {
                Some(policy) if policy != local_policy => {
                    return Err(Problem::new(
                        KeyPath::new(["directory", "services"])
                            .index(i)
                            .key("policy"),
                        format!(
                            "service {:?} already gets its policy from service.policy ({:?}); \
                             name the same file or leave this one out",
                            local.name.as_str(),
                            local_policy.display().to_string()
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn check_endpoints(service: &StaticService, at: &KeyPath) -> Result<(), Problem> {
    if service.endpoints.is_empty() {
        return Err(Problem::new(
            at.key("endpoints"),
            format!(
                "service {:?} has no endpoints; list at least one, \
                 e.g. endpoints = [{{ address = \"10.0.0.5:4143\" }}]",
                service.name.as_str()
            ),
        ));
    }
    let mut seen = HashMap::new();
    for (j, endpoint) in service.endpoints.iter().enumerate() {
        let address = at.key("endpoints").index(j).key("address");
        if endpoint.address.port() == 0 {
            return Err(Problem::new(
                address,
                "port 0 cannot be connected to; give the endpoint's port",
            ));
        }
        if let Some(first) = seen.insert(endpoint.address, j) {
            return Err(Problem::new(
                address,
                format!(
                    "endpoint {} is already listed at {}",
                    endpoint.address,
                    at.key("endpoints").index(first)
                ),
            ));
        }
    }
    Ok(())
}

/// Whether two listeners would fight over one port. Port 0 never clashes
/// (the OS picks a free port); an unspecified IP covers every address of its
/// family, and `[::]` usually covers IPv4 too.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |x: SocketAddr, y: SocketAddr| {
        x.ip().is_unspecified() && (x.is_ipv6() || x.is_ipv4() == y.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn error(src: &str) -> String {
        let err = crate::parse_bootstrap(src, Path::new("b.toml"))
            .unwrap_err()
            .to_string();
        err.lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn listeners_must_not_overlap() {
        assert!(overlap(
            "0.0.0.0:1".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap()
        ));
        assert!(overlap(
            "[::]:1".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap()
        ));
        assert!(!overlap(
            "0.0.0.0:1".parse().unwrap(),
            "[::1]:1".parse().unwrap()
        ));
        assert!(!overlap(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap()
        ));
        assert!(!overlap(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.2:1".parse().unwrap()
        ));

        let ok = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"";
        assert!(crate::parse_bootstrap(ok, Path::new("b.toml")).is_ok());
        assert_eq!(
            error("[listen]\nadmin = \"127.0.0.1:4143\""),
            "b.toml:2:9: listen.admin: listen.inbound (0.0.0.0:4143) and listen.admin \
             (127.0.0.1:4143) overlap; give each listener its own address"
        );
        assert_eq!(
            error("[listen]\noutbound = \"127.0.0.1:4191\""),
            "b.toml:2:12: listen.outbound: listen.outbound and listen.admin are both \
             127.0.0.1:4191; give each listener its own address"
        );
        assert!(error("[service]\nname = \"a\"\napp = \"127.0.0.1:4140\"")
            .ends_with("127.0.0.1:4140 is also listen.outbound: the sidecar would forward the app's traffic to itself"));
    }

    #[test]
    fn dns_ttls_must_be_ordered() {
        assert_eq!(
            error("[dns]\nmin_ttl = \"10m\""),
            "b.toml:2:11: dns.min_ttl: dns.max_ttl (5m) is shorter than dns.min_ttl (10m)"
        );
    }

    #[test]
    fn limits_must_be_consistent() {
        assert_eq!(
            error("[limits]\nmax_uri_length = \"128KiB\""),
            "b.toml:2:18: limits.max_uri_length: limits.max_uri_length (128KiB) is longer than \
             limits.max_header_size (64KiB), which already bounds the request line"
        );
        assert_eq!(
            error("[limits]\nheader_read_timeout = \"5m\""),
            "b.toml:2:23: limits.header_read_timeout: limits.idle_timeout (2m) is shorter than \
             limits.header_read_timeout (5m)"
        );
        assert_eq!(
            error("[limits]\nmax_header_size = \"4KiB\""),
            "b.toml:2:19: limits.max_header_size: must be from 8KiB to 1MiB, found 4KiB"
        );
        let ok = "[limits]\nmax_header_size = \"16KiB\"\nmax_uri_length = \"16KiB\"\nidle_timeout = \"10s\"";
        assert!(crate::parse_bootstrap(ok, Path::new("b.toml")).is_ok());
    }

    #[test]
    fn otlp_metrics_need_an_endpoint() {
        assert!(
            error("[telemetry]\notlp_metrics = true").starts_with(
                "b.toml:2:16: telemetry.otlp_metrics: telemetry.otlp_metrics needs telemetry.otlp_endpoint"
            )
        );
        let ok = "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\notlp_metrics = true";
        let b = crate::parse_bootstrap(ok, Path::new("b.toml")).unwrap();
        assert!(b.telemetry.otlp_metrics);
        // Without otlp_metrics, the interval is allowed (and unused).
        assert!(
            crate::parse_bootstrap(
                "[telemetry]\notlp_metrics_interval = \"1m\"",
                Path::new("b.toml")
            )
            .is_ok()
        );
    }

    #[test]
    fn endpoints_must_be_distinct_and_connectable() {
        let src = "[[directory.services]]\nname = \"a\"\nendpoints = [\n  { address = \"10.0.0.1:1\" },\n  { address = \"10.0.0.1:1\" },\n]";
        assert_eq!(
            error(src),
            "b.toml:5:15: directory.services[0].endpoints[1].address: endpoint 10.0.0.1:1 \
             is already listed at directory.services[0].endpoints[0]"
        );
        let src =
            "[[directory.services]]\nname = \"a\"\nendpoints = [{ address = \"10.0.0.1:0\" }]";
        assert!(error(src).ends_with("port 0 cannot be connected to; give the endpoint's port"));
    }

    #[test]
    fn health_checks() {
        let base = "[service]\nname = \"a\"\napp = \"127.0.0.1:8080\"\n";
        let b = crate::parse_bootstrap(base, Path::new("b.toml")).unwrap();
        let h = b.service.unwrap().health;
        assert!(h.enabled && h.path.is_none());
        assert_eq!(h.interval.to_string(), "1s");
        assert_eq!(h.timeout.to_string(), "500ms");
        assert_eq!((h.unhealthy_after, h.healthy_after), (2, 1));
        let ok = format!(
            "{base}health = {{ path = \"/healthz?full=1\", interval = \"2s\", timeout = \"2s\", unhealthy_after = 3, healthy_after = 2 }}"
        );
        let h = crate::parse_bootstrap(&ok, Path::new("b.toml"))
            .unwrap()
            .service
            .unwrap()
            .health;
        assert_eq!(h.path.as_deref(), Some("/healthz?full=1"));
        assert_eq!((h.unhealthy_after, h.healthy_after), (3, 2));
        let off = format!("{base}health = {{ enabled = false }}");
        assert!(
            !crate::parse_bootstrap(&off, Path::new("b.toml"))
                .unwrap()
                .service
                .unwrap()
                .health
                .enabled
        );
        assert_eq!(
            error(&format!("{base}health = {{ timeout = \"2s\" }}")),
            "b.toml:4:22: service.health.timeout: service.health.timeout (2s) is longer than \
             service.health.interval (1s); a check must end before the next one starts"
        );
        assert_eq!(
            error(&format!("{base}health = {{ path = \"healthz\" }}")),
            "b.toml:4:19: service.health.path: invalid health check path \"healthz\": expected \
             an absolute path like \"/healthz\""
        );
        assert!(
            error(&format!("{base}health = {{ unhealthy_after = 0 }}"))
                .starts_with("b.toml:4:30: service.health.unhealthy_after: must be from 1 to 100")
        );
        assert!(
            error(&format!("{base}health = {{ interval = \"0s\" }}"))
                .ends_with("service.health.interval: must be longer than 0s")
        );
        assert!(
            error(&format!("{base}health = {{ port = 1 }}"))
                .starts_with("b.toml:4:12: service.health.port: ")
        );
    }

    #[test]
    fn control_plane_ready_timeout() {
        let base = "[control_plane]\naddresses = [\"http://127.0.0.1:1\"]\n";
        let b = crate::parse_bootstrap(base, Path::new("b.toml")).unwrap();
        assert_eq!(b.control_plane.unwrap().ready_timeout.to_string(), "10s");
        assert!(
            error(&format!("{base}ready_timeout = \"0s\""))
                .ends_with("control_plane.ready_timeout: must be longer than 0s")
        );
    }

    #[test]
    fn mesh_tls_needs_a_tls_section() {
        let src = "[[directory.services]]\nname = \"a\"\ntls = \"mesh\"\nendpoints = [{ address = \"10.0.0.1:1\" }]";
        assert_eq!(
            error(src),
            "b.toml:3:7: directory.services[0].tls: service \"a\" is reached with mTLS, but this \
             sidecar has no certificate: add a [tls] section (ca, cert, key) or remove tls = \"mesh\""
        );
        let with_tls =
            format!("[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n{src}");
        let b = crate::parse_bootstrap(&with_tls, Path::new("b.toml")).unwrap();
        let tls = b.tls.unwrap();
        assert_eq!(tls.trust_domain.as_str(), "weft.local");
        assert_eq!(tls.watch_interval.to_string(), "5s");
    }

    #[test]
    fn local_and_directory_policies_must_agree() {
        let base = "[service]\nname = \"a\"\napp = \"127.0.0.1:8080\"\npolicy = \"a.toml\"\n\
                    [[directory.services]]\nname = \"a\"\nendpoints = [{ address = \"10.0.0.1:1\" }]\n";
        assert!(crate::parse_bootstrap(base, Path::new("b.toml")).is_ok());
        assert!(
            crate::parse_bootstrap(&format!("{base}policy = \"a.toml\""), Path::new("b.toml"))
                .is_ok()
        );
        assert!(
            error(&format!("{base}policy = \"other.toml\"")).starts_with(
                "b.toml:8:10: directory.services[0].policy: service \"a\" already gets its policy"
            )
        );
    }
}
