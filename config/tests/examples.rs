//! The example files parse, keep their values, and survive a JSON round trip.
//!
//! `tests/golden/ok/bootstrap.toml` and `billing.toml` are the examples of
//! DESIGN.md, copied verbatim: if the design's examples stop parsing, the
//! contract and the code disagree. `full-bootstrap.toml` and `checkout.toml`
//! set every key the schemas have.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;

use weft_config::{
    Bootstrap, CallerId, DefaultInbound, LoadBalancer, Loaded, Policy, Protocol, RetryOn,
    ServiceName, SpiffeId, TlsMode, load_bootstrap, load_policy,
};

fn load(name: &str) -> Loaded {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/ok")
        .join(name);
    load_bootstrap(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn design_bootstrap_example_loads_with_its_policy() {
    let loaded = load("bootstrap.toml");
    let b = &loaded.bootstrap;
    let service = b.service.as_ref().unwrap();
    assert_eq!(service.name.as_str(), "checkout");
    assert_eq!(service.app, addr("127.0.0.1:8080"));
    assert_eq!(service.instances.get(), 1);
    assert_eq!(service.metadata.get("zone"), Some("eu-1"));
    assert_eq!(service.metadata.weight.get(), 100);
    assert_eq!(b.listen.inbound, addr("0.0.0.0:4143"));
    let cp = b.control_plane.as_ref().unwrap();
    assert_eq!(cp.addresses, ["https://weft-cp.internal:8443"]);
    assert_eq!(b.drain.grace.get(), std::time::Duration::from_secs(20));
    assert_eq!(b.dns.attempts, 2, "defaults fill the tables left out");
    assert_eq!(b.pool.max_idle_per_endpoint, 256);
    assert_eq!(b.telemetry, weft_config::Telemetry::default());
    assert_eq!(b.telemetry.sampling_ratio.get(), 1.0);
    assert!(!b.telemetry.otlp_metrics);
    assert_eq!(b.telemetry.otlp_metrics_interval.to_string(), "15s");
    assert_eq!(b.telemetry_service_name(), "checkout", "[service] name");
    assert_eq!(b.limits, weft_config::Limits::default());

    let billing = &b.directory.services[0];
    assert_eq!(billing.protocol, Protocol::Auto);
    assert_eq!(billing.endpoints.len(), 2);
    assert_eq!(billing.endpoints[1].metadata.get("version"), Some("v2"));
    assert_eq!(
        loaded.policies.keys().collect::<Vec<_>>(),
        [&name("billing")]
    );
    assert_eq!(
        loaded.resolve(Path::new("x.json")),
        loaded.path.with_file_name("x.json")
    );
}

#[test]
fn design_policy_example_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ok/billing.toml");
    let policy = load_policy(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policy.service.as_str(), "billing");
    assert_eq!(policy.inbound.max_concurrency.unwrap().get(), 100);
    let rate = policy.inbound.rate_limit.unwrap();
    assert_eq!((rate.per_second, rate.burst.get()), (500.0, 50));
    assert_eq!(
        policy.inbound.allow.as_ref().unwrap(),
        &[
            CallerId::Service(name("checkout")),
            CallerId::Service(name("orders"))
        ]
    );
    assert_eq!(
        policy.outbound.outlier.max_ejection.to_string(),
        "5m",
        "default kept"
    );

    let [charge, default] = &policy.routes[..] else {
        panic!("two routes")
    };
    assert_eq!(charge.r#match.method[0].as_str(), "POST");
    assert_eq!(charge.r#match.path_prefix.as_deref(), Some("/charge"));
    assert_eq!(charge.retry.as_ref().unwrap().attempts, 0);
    let retry = default.retry.as_ref().unwrap();
    assert_eq!(
        retry.on,
        [
            RetryOn::ConnectFailure,
            RetryOn::Status(503),
            RetryOn::Reset
        ]
    );
    assert_eq!(retry.backoff.to_string(), "25ms..250ms");
    assert_eq!(retry.budget.unwrap().get(), 0.2);
    assert_eq!(retry.max_replay_body.get(), 64 * 1024, "default kept");
    assert_eq!(policy.splits[0].subset["version"], "v2");
    assert_eq!(policy.splits[0].weight.get(), 10);
}

#[test]
fn every_key_example_loads() {
    let loaded = load("full-bootstrap.toml");
    let b = &loaded.bootstrap;
    assert_eq!(b.service.as_ref().unwrap().instances.get(), 3);
    assert_eq!(
        b.service.as_ref().unwrap().metadata.get("team"),
        Some("pay")
    );
    assert_eq!(b.dns.servers[1], addr("[::1]:53"));
    assert_eq!(b.dns.timeout.to_string(), "500ms");
    assert_eq!(b.directory.services[0].protocol, Protocol::Http2);
    assert_eq!(b.directory.services[0].tls, TlsMode::Mesh);
    assert_eq!(b.directory.services[1].tls, TlsMode::None, "default");
    let tls = b.tls.as_ref().unwrap();
    assert_eq!(tls.trust_domain.as_str(), "example.org");
    assert_eq!(tls.watch_interval.to_string(), "2s");
    assert_eq!(tls.default_inbound, DefaultInbound::Deny);
    assert_eq!(
        loaded.resolve(&tls.key),
        loaded.path.with_file_name("tls/checkout-key.pem")
    );
    assert!(b.control_plane.is_none());
    assert_eq!(
        b.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(b.telemetry.sampling_ratio.get(), 0.25);
    assert_eq!(b.telemetry_service_name(), "checkout-eu");
    assert!(b.telemetry.access_log);
    assert_eq!(b.limits.max_connections, 5000);
    assert_eq!(b.limits.max_uri_length.get(), 4096);
    assert_eq!(b.limits.http2_keep_alive_interval.to_string(), "30s");
    assert!(b.telemetry.otlp_metrics);
    assert_eq!(b.telemetry.otlp_metrics_interval.to_string(), "30s");
    assert_eq!(b.telemetry.max_callers, 50);

    let checkout = &loaded.policies[&name("checkout")];
    assert_eq!(checkout.outbound.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(
        checkout.outbound.rate_limit.unwrap().burst.get(),
        1001,
        "burst = ceil(per_second)"
    );
    assert!(checkout.inbound.allow_plaintext);
    let allow = checkout.inbound.allow.as_ref().unwrap();
    assert_eq!(allow[1], CallerId::Service(name("orders")));
    assert_eq!(
        allow[2],
        CallerId::Spiffe(SpiffeId::parse("spiffe://example.org/service/batch").unwrap())
    );
    let callers = checkout.inbound.caller_rate_limit.as_ref().unwrap();
    assert_eq!(callers.limit_for("orders").per_second, 200.0);
    assert_eq!(callers.limit_for("web").burst.get(), 10);
    let retry = checkout.outbound.retry.as_ref().unwrap();
    assert_eq!(retry.on[4], RetryOn::Grpc(2));
    assert_eq!(retry.max_replay_body.get(), 1 << 20);
    let pay = &checkout.routes[0];
    assert_eq!(pay.r#match.headers[0].name.as_str(), "x-canary");
    assert_eq!(pay.r#match.headers[1].value, None);
    assert_eq!(
        pay.allow.as_deref(),
        Some(&[CallerId::Service(name("web"))][..])
    );
    assert_eq!(checkout.routes[1].allow, None);
    let settings = checkout.outbound.settings_for(Some(&checkout.routes[1]));
    assert_eq!(
        settings.timeout.map(|t| t.to_string()).as_deref(),
        Some("5s")
    );
    assert_eq!(
        settings.retry.attempts, 3,
        "outbound.retry is the routes' default"
    );
    assert_eq!(loaded.policies.len(), 2);
}

#[test]
fn everything_round_trips_through_json() {
    for file in ["bootstrap.toml", "full-bootstrap.toml"] {
        let loaded = load(file);
        let json = serde_json::to_value(&loaded).unwrap();
        assert_eq!(
            json["bootstrap"]["drain"]["grace"],
            loaded.bootstrap.drain.grace.to_string()
        );
        let bootstrap: Bootstrap = serde_json::from_value(json["bootstrap"].clone()).unwrap();
        assert_eq!(bootstrap, loaded.bootstrap);
        for (service, policy) in &loaded.policies {
            let value = &json["policies"][service.as_str()];
            let back: Policy = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(&back, policy);
        }
    }
    let json = serde_json::to_value(&load("full-bootstrap.toml").policies).unwrap();
    let retry = &json["checkout"]["outbound"]["retry"];
    assert_eq!(retry["backoff"], "10ms..1s");
    assert_eq!(retry["max_replay_body"], 1 << 20);
    assert_eq!(retry["on"][3], "grpc-unavailable");
    assert_eq!(
        json["checkout"]["inbound"]["allow"][2],
        "spiffe://example.org/service/batch"
    );
}
