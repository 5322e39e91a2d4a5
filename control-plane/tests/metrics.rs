//! Black-box test of the control plane's `GET /metrics`: a running
//! `weft-control-plane --dev` goes through a known sequence (two subscribers,
//! a rejected and an accepted registration, a policy applied through the admin
//! API, a deregistration, a registration whose lease expires, the subscribers
//! leaving) and the exposition must hold the exact counts after each step and
//! pass `promtool check metrics`. On a real etcd that goes away, store errors
//! are counted. Many sidecars coming and going leave no task behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_api::v1::{Deregister, RegisterRequest, register_request};

use support::grpc::{instance, instances_of, put_policy, subscribe};
use support::start;
use support::wait_for;
use weft_tests::control_plane::{ControlPlane, TOKEN};
use weft_tests::etcd::EtcdServer;
use weft_tests::grpc::{channel, register, try_register};

const P: &str = "weft_control_plane_";

/// One scrape: every sample by its series (`name{labels}`), and the text.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect();
        Scrape { samples, text }
    }

    /// A control-plane series (without the prefix); panics with the whole
    /// exposition if it is missing.
    fn get(&self, series: &str) -> f64 {
        let full = format!("{P}{series}");
        *self
            .samples
            .get(&full)
            .unwrap_or_else(|| panic!("no {full} in:\n{}", self.text))
    }

    /// `store_errors_total` summed over its series, and how many there are
    /// (exported at 0 from the start, for every operation and error).
    fn store_errors(&self) -> (f64, usize) {
        let prefix = format!("{P}store_errors_total{{");
        let series: Vec<f64> = self
            .samples
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, v)| *v)
            .collect();
        (series.iter().sum(), series.len())
    }
}

/// `METHOD path` on the admin API with the test token: (status, headers, body).
async fn http(admin: &str, method: &str, path: &str) -> (u16, String, String) {
    let addr = admin.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: cp\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

async fn scrape(admin: &str) -> Scrape {
    let (status, head, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    Scrape::parse(body)
}

/// Scrapes until `ok` holds (the counters follow the streams asynchronously).
async fn scrape_until(admin: &str, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(admin).await;
        if ok(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `promtool check metrics` must accept the exposition.
fn promtool_accepts(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run scripts/setup, which installs Debian's prometheus package (it ships promtool)"
        ),
        Err(e) => panic!("starting promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics rejected the exposition ({}):\n{}{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_known_sequence() {
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev().lease_ttl("1s")))
        .await
        .unwrap();
    wait_for("/ready", Duration::from_secs(10), || async {
        Ok((http(&cp.admin_url(), "GET", "/ready").await.0 == 200).then_some(()))
    })
    .await
    .unwrap();

    // At start: everything at zero, the store followed, process metrics present.
    let m = scrape(&cp.admin_url()).await;
    for series in [
        "connected_sidecars",
        "register_streams",
        "pushes_total{kind=\"full\"}",
        "pushes_total{kind=\"delta\"}",
        "push_latency_seconds_count",
        "watch_lag_seconds_count",
        "registrations_total",
        "registrations_rejected_total{reason=\"invalid-instance\"}",
        "deregistrations_total",
        "lease_expiries_total",
        "directory_services",
        "directory_instances",
    ] {
        assert_eq!(m.get(series), 0.0, "{series}");
    }
    assert_eq!(m.get("store_ready"), 1.0);
    for process in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(m.samples[process] > 0.0, "{process}");
    }
    promtool_accepts(&m.text);

    // Two subscribers: one full snapshot each.
    let mut subs = [
        subscribe(&cp.grpc_url(), &["billing"]).await,
        subscribe(&cp.grpc_url(), &["billing"]).await,
    ];
    for sub in &mut subs {
        assert!(sub.next().await.full);
    }
    scrape_until(&cp.admin_url(), "2 subscribers", |m| {
        m.get("connected_sidecars") == 2.0 && m.get("pushes_total{kind=\"full\"}") == 2.0
    })
    .await;

    // A registration with a bad address is rejected.
    let mut bad = instance("billing", "bad", 7000);
    bad.address = "not-an-address".into();
    let err = try_register(channel(&cp.grpc_url()).await, bad)
        .await
        .expect_err("a registration with a bad address was accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // One registration, one policy, one deregistration: one delta each per
    // subscriber.
    let reg_a = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    for sub in &mut subs {
        sub.until(|m| instances_of(m, "billing").is_some_and(|i| i == ["a"]))
            .await;
    }
    let policy = "service = \"billing\"\n[outbound]\nload_balancer = \"round-robin\"\n";
    assert_eq!(put_policy(&cp.admin_url(), "billing", policy).await, 200);
    for sub in &mut subs {
        sub.until(|m| m.services.iter().any(|s| s.policy_toml == policy))
            .await;
    }
    reg_a
        .send(RegisterRequest {
            msg: Some(register_request::Msg::Deregister(Deregister {})),
        })
        .await
        .unwrap();
    for sub in &mut subs {
        sub.until(|m| instances_of(m, "billing").is_some_and(|i| i.is_empty()))
            .await;
    }
    let m = scrape_until(&cp.admin_url(), "the register stream to close", |m| {
        m.get("register_streams") == 0.0
    })
    .await;
    assert_eq!(m.get("connected_sidecars"), 2.0);
    assert_eq!(m.get("registrations_total"), 1.0);
    assert_eq!(
        m.get("registrations_rejected_total{reason=\"invalid-instance\"}"),
        1.0
    );
    assert_eq!(
        m.get("registrations_rejected_total{reason=\"no-registration\"}"),
        0.0
    );
    assert_eq!(
        m.get("registrations_rejected_total{reason=\"store-error\"}"),
        0.0
    );
    assert_eq!(m.get("deregistrations_total"), 1.0);
    assert_eq!(m.get("lease_expiries_total"), 0.0);
    assert_eq!(m.get("pushes_total{kind=\"full\"}"), 2.0);
    assert_eq!(m.get("pushes_total{kind=\"delta\"}"), 6.0);
    assert_eq!(m.get("push_latency_seconds_count"), 6.0);
    assert_eq!(m.get("push_latency_seconds_bucket{le=\"+Inf\"}"), 6.0);
    // Three puts by this replica: the registration, the policy, and the
    // record of the policy as the last valid one (which pushes nothing).
    assert_eq!(m.get("watch_lag_seconds_count"), 3.0);
    assert_eq!(m.get("directory_services"), 1.0, "billing keeps its policy");
    assert_eq!(m.get("directory_instances"), 0.0);
    let (_, _, list) = http(&cp.admin_url(), "GET", "/v1/services").await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        m.get("directory_revision"),
        list["revision"].as_f64().unwrap()
    );
    assert_eq!(
        m.get("admin_requests_total{method=\"PUT\",route=\"/v1/services/{name}/policy\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        m.get("admin_requests_total{method=\"GET\",route=\"/ready\",status=\"200\"}"),
        1.0
    );
    let (errors, series) = m.store_errors();
    assert!(series > 0, "store errors are exported at 0:\n{}", m.text);
    assert_eq!(
        errors, 0.0,
        "the embedded store never fails here:\n{}",
        m.text
    );
    promtool_accepts(&m.text);

    // A sidecar that vanishes: its lease expires, which is counted once the
    // TTL has passed (1 s, plus 1 s).
    let reg_c = register(&cp.grpc_url(), instance("billing", "c", 7003)).await;
    for sub in &mut subs {
        sub.until(|m| instances_of(m, "billing").is_some_and(|i| i == ["c"]))
            .await;
    }
    drop(reg_c);
    for sub in &mut subs {
        sub.until(|m| instances_of(m, "billing").is_some_and(|i| i.is_empty()))
            .await;
    }
    let m = scrape_until(&cp.admin_url(), "the lease expiry", |m| {
        m.get("lease_expiries_total") == 1.0
    })
    .await;
    assert_eq!(m.get("registrations_total"), 2.0);
    assert_eq!(m.get("deregistrations_total"), 1.0);
    assert_eq!(m.get("register_streams"), 0.0);
    assert_eq!(m.get("pushes_total{kind=\"delta\"}"), 10.0);
    assert_eq!(m.get("push_latency_seconds_count"), 10.0);
    assert_eq!(m.get("watch_lag_seconds_count"), 4.0);

    // The subscribers leave.
    drop(subs);
    let m = scrape_until(&cp.admin_url(), "the subscribers to leave", |m| {
        m.get("connected_sidecars") == 0.0
    })
    .await;
    assert_eq!(m.get("pushes_total{kind=\"delta\"}"), 10.0);
    promtool_accepts(&m.text);
}

/// Sidecars that connect (register and subscribe) and then go, half of
/// them deregistering and half just vanishing, leave no task behind: once
/// the vanished ones' leases have expired, `tasks` is back at its idle value.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_return_to_idle_after_many_sidecars_come_and_go() {
    const SIDECARS: u16 = 40;
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev().lease_ttl("1s")))
        .await
        .unwrap();
    wait_for("/ready", Duration::from_secs(10), || async {
        Ok((http(&cp.admin_url(), "GET", "/ready").await.0 == 200).then_some(()))
    })
    .await
    .unwrap();
    // The listeners, the view, and this scrape's own connection.
    let idle = scrape(&cp.admin_url()).await.get("tasks");
    assert!(idle >= 3.0, "{idle}");

    for round in 0..2u16 {
        let mut sidecars = Vec::new();
        for i in 0..SIDECARS {
            let id = format!("s{round}-{i}");
            let reg = register(&cp.grpc_url(), instance("billing", &id, 7000 + i)).await;
            let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
            assert!(sub.next().await.full);
            sidecars.push((reg, sub));
        }
        // Each sidecar holds a Register and a Subscribe stream, each on its
        // own connection: at least four tasks.
        scrape_until(&cp.admin_url(), "every sidecar's tasks", |m| {
            m.get("tasks") >= idle + 4.0 * f64::from(SIDECARS)
        })
        .await;
        for (i, (reg, sub)) in sidecars.into_iter().enumerate() {
            if i % 2 == 0 {
                reg.send(RegisterRequest {
                    msg: Some(register_request::Msg::Deregister(Deregister {})),
                })
                .await
                .unwrap();
            }
            drop((reg, sub));
        }
    }
    // The vanished sidecars' expiry checks end one TTL (+1 s) after their
    // streams did.
    let m = scrape_until(&cp.admin_url(), "the tasks to return to idle", |m| {
        m.get("tasks") == idle
    })
    .await;
    assert_eq!(m.get("connected_sidecars"), 0.0);
    assert_eq!(m.get("register_streams"), 0.0);
}

/// On a real etcd that goes away: the view stops following it
/// (`store_ready` 0) and the failed store calls are counted by operation.
#[tokio::test(flavor = "multi_thread")]
async fn store_errors_are_counted_when_etcd_goes_away() {
    let etcd = EtcdServer::start().await.expect("etcd (run scripts/setup)");
    let url = etcd.client_url().to_owned();
    let cp = tokio::task::spawn_blocking(move || start(ControlPlane::etcd(url)))
        .await
        .unwrap();
    let m = scrape_until(&cp.admin_url(), "the view to follow etcd", |m| {
        m.get("store_ready") == 1.0
    })
    .await;
    let (errors, series) = m.store_errors();
    assert!(series > 0 && errors == 0.0, "{}", m.text);

    drop(etcd);
    let m = scrape_until(&cp.admin_url(), "the view to lose etcd", |m| {
        m.get("store_ready") == 0.0
    })
    .await;
    let watch_or_list: f64 = m
        .samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with(&format!("{P}store_errors_total{{operation=\"watch\""))
                || series.starts_with(&format!("{P}store_errors_total{{operation=\"list\""))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(watch_or_list >= 1.0, "{}", m.text);

    let policy = "service = \"billing\"\n[outbound]\nload_balancer = \"round-robin\"\n";
    assert_eq!(put_policy(&cp.admin_url(), "billing", policy).await, 503);
    let m = scrape(&cp.admin_url()).await;
    assert_eq!(
        m.get("store_errors_total{operation=\"put\",error=\"unavailable\"}"),
        1.0
    );
    assert_eq!(
        m.get("admin_requests_total{method=\"PUT\",route=\"/v1/services/{name}/policy\",status=\"503\"}"),
        1.0
    );
    promtool_accepts(&m.text);
}
