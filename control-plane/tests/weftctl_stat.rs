//! Black-box tests of `weftctl stat`: a `weft-control-plane --dev` process,
//! instances registered over gRPC whose admin addresses are tiny HTTP servers
//! serving canned metrics (counters that grow by a known amount per scrape),
//! and the real `weftctl` binary, whose output is checked exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use weft_api::v1::RegisterRequest;

use support::grpc;
use support::start;
use support::weftctl::{Run, run, weftctl};
use weft_tests::control_plane::ControlPlane;

/// The duration histogram's bucket bounds in these expositions.
const LES: [&str; 6] = ["0.005", "0.01", "0.025", "0.05", "0.1", "+Inf"];

/// One series: its name and labels as exposed, and how much it grows per
/// scrape.
type Series = (String, f64);

fn labels(direction: &str, service: &str, route: &str) -> String {
    format!(r#"direction="{direction}",service="{service}",route="{route}""#)
}

fn requests(where_: &str, code: u16, class: &str, per_scrape: f64) -> Series {
    (
        format!(r#"weft_requests_total{{{where_},status_code="{code}",classification="{class}"}}"#),
        per_scrape,
    )
}

/// The bucket series of one label set; `cumulative` per bound of [`LES`].
fn buckets(where_: &str, code: u16, class: &str, cumulative: [f64; 6]) -> Vec<Series> {
    LES.iter()
        .zip(cumulative)
        .map(|(le, n)| {
            (
                format!(
                    r#"weft_request_duration_seconds_bucket{{{where_},status_code="{code}",classification="{class}",le="{le}"}}"#
                ),
                n,
            )
        })
        .collect()
}

fn refusals(where_: &str, reason: &str, limit: &str, per_scrape: f64) -> Series {
    (
        format!(r#"weft_refusals_total{{{where_},reason="{reason}",limit="{limit}"}}"#),
        per_scrape,
    )
}

/// An OpenMetrics exposition of `series`, each at `value(per_scrape)`, with
/// the comments, exemplars, other metrics and escapes a real one has.
fn exposition(series: &[Series], value: impl Fn(f64) -> f64) -> String {
    let mut text = String::from(
        "# HELP weft_requests Requests completed.\n\
         # TYPE weft_requests counter\n\
         # HELP weft_request_duration_seconds Time to the end of the response body.\n\
         # TYPE weft_request_duration_seconds histogram\n\
         # UNIT weft_request_duration_seconds seconds\n\
         # TYPE weft_refusals counter\n",
    );
    for (i, (name, per_scrape)) in series.iter().enumerate() {
        text.push_str(&format!("{name} {}", value(*per_scrape)));
        if i % 3 == 0 && name.contains("_bucket") {
            text.push_str(" # {trace_id=\"4bf92f3577b34da6\"} 0.0042 1700000000.123");
        }
        text.push('\n');
    }
    text.push_str(
        "# TYPE weft_retries counter\n\
         weft_retries_total{service=\"billing\",route=\"charge\"} 12\n\
         # TYPE weft_test_info info\n\
         weft_test_info{note=\"say \\\"hi\\\"\\n}\\\\\"} 1\n\
         # TYPE process_start_time_seconds gauge\n\
         process_start_time_seconds 1.7e9\n\
         # EOF\n",
    );
    text
}

/// A stand-in for a sidecar's admin listener: `GET /metrics` answers
/// `body(n)` for its n-th request (from 0).
fn metrics_server(
    rt: &Runtime,
    body: impl Fn(u64) -> String + Send + Sync + 'static,
) -> SocketAddr {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(body);
    let served = Arc::new(AtomicU64::new(0));
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (body, served) = (Arc::clone(&body), Arc::clone(&served));
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, text) = if head.starts_with(b"GET /metrics ") {
                    ("200 OK", body(served.fetch_add(1, Ordering::SeqCst)))
                } else {
                    ("404 Not Found", String::new())
                };
                let rsp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = conn.write_all(rsp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

/// Counters at `per_scrape * n` on the n-th scrape.
fn growing(series: Vec<Series>) -> impl Fn(u64) -> String + Send + Sync + 'static {
    move |n| exposition(&series, |per_scrape| per_scrape * n as f64)
}

/// A sidecar that restarts between every two scrapes: counters high on
/// even scrapes, then back to one scrape's worth (a reset: the new value is
/// the increase).
fn restarting(series: Vec<Series>) -> impl Fn(u64) -> String + Send + Sync + 'static {
    move |n| {
        exposition(&series, |per_scrape| {
            if n % 2 == 0 {
                1000.0 + per_scrape
            } else {
                per_scrape
            }
        })
    }
}

/// A loopback address nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The lines of `text`, each as its whitespace-separated cells.
fn cells(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// A dev control plane, the runtime serving the fake sidecars and keeping
/// their registrations open.
struct Mesh {
    cp: ControlPlane,
    token: PathBuf,
    rt: Runtime,
    registrations: Vec<mpsc::Sender<RegisterRequest>>,
}

impl Mesh {
    fn start() -> Self {
        let cp = start(ControlPlane::dev());
        let token = cp.token_file().to_owned();
        Self {
            cp,
            token,
            rt: Runtime::new().unwrap(),
            registrations: Vec::new(),
        }
    }

    fn register(&mut self, service: &str, id: &str, admin: Option<SocketAddr>) {
        let port = 7000 + u16::try_from(self.registrations.len()).unwrap();
        self.register_at(service, id, &format!("127.0.0.1:{port}"), admin);
    }

    fn register_at(&mut self, service: &str, id: &str, address: &str, admin: Option<SocketAddr>) {
        let mut instance = grpc::instance(service, id, 0);
        instance.address = address.to_owned();
        instance.admin_address = admin.map(|a| a.to_string()).unwrap_or_default();
        let tx = self
            .rt
            .block_on(weft_tests::grpc::register(&self.cp.grpc_url(), instance));
        self.registrations.push(tx);
    }

    fn run(&self, args: &[&str]) -> Run {
        run(&self.cp.admin_url(), Some(&self.token), args)
    }

    /// Wait until `get services` lists `rows` (SERVICE INSTANCES POLICY).
    fn wait_for_services(&self, rows: &[&[&str]]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.run(&["get", "services"]);
            let got = cells(&r.stdout);
            if r.code == 0 && rows.iter().all(|row| got.iter().any(|g| g == row)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never listed {rows:?}: {}",
                r.all()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

#[test]
fn stat_reports_rates_success_latency_and_refusals_from_every_sidecar() {
    let mut mesh = Mesh::start();
    let charge = labels("inbound", "billing", "charge");
    let no_route = labels("inbound", "billing", "");
    let home = labels("inbound", "web", "home");
    let to_billing = labels("outbound", "billing", "charge");
    let to_ledger = labels("outbound", "ledger", "");

    // billing/b-1: route charge, 8 successes and 2 failures per scrape, and
    // calls to ledger (a service outside the mesh).
    let mut b1 = vec![
        requests(&charge, 200, "success", 8.0),
        requests(&charge, 503, "failure", 2.0),
        refusals(&charge, "rate-limit", "routes.charge.rate_limit", 2.0),
        requests(&to_ledger, 200, "success", 5.0),
    ];
    b1.extend(buckets(
        &charge,
        200,
        "success",
        [2.0, 6.0, 8.0, 8.0, 8.0, 8.0],
    ));
    b1.extend(buckets(
        &charge,
        503,
        "failure",
        [0.0, 0.0, 0.0, 1.0, 2.0, 2.0],
    ));
    // billing/b-2: no route matched, 10 successes per scrape; it restarts
    // between every two scrapes.
    let mut b2 = vec![
        requests(&no_route, 200, "success", 10.0),
        refusals(&no_route, "rate-limit", "inbound.rate_limit", 1.0),
        refusals(&no_route, "timeout", "", 1.0),
    ];
    b2.extend(buckets(
        &no_route,
        200,
        "success",
        [4.0, 8.0, 8.0, 8.0, 10.0, 10.0],
    ));
    // web/w-1: route home, 4 per scrape; it calls billing 100 times per
    // scrape (the callers' view of billing, left out of the inbound one).
    let mut w1 = vec![
        requests(&home, 200, "success", 4.0),
        requests(&to_billing, 200, "success", 100.0),
        refusals(&to_billing, "no-healthy-endpoints", "", 1.0),
    ];
    w1.extend(buckets(
        &home,
        200,
        "success",
        [0.0, 0.0, 0.0, 0.0, 4.0, 4.0],
    ));
    w1.extend(buckets(
        &to_billing,
        200,
        "success",
        [0.0, 100.0, 100.0, 100.0, 100.0, 100.0],
    ));

    let b1 = metrics_server(&mesh.rt, growing(b1));
    let b2 = metrics_server(&mesh.rt, restarting(b2));
    let w1 = metrics_server(&mesh.rt, growing(w1));
    mesh.register("billing", "b-1", Some(b1));
    mesh.register("billing", "b-2", Some(b2));
    let b3 = closed_port();
    mesh.register("billing", "b-3", Some(b3));
    mesh.register("web", "w-1", Some(w1));
    mesh.register("web", "w-2", None);
    // Left out too: an admin address another instance registered (one
    // sidecar's metrics, not to be counted twice), and a loopback admin
    // address of a sidecar on another host.
    mesh.register("billing", "b-4", Some(b1));
    mesh.register_at(
        "web",
        "w-3",
        "10.0.0.9:7000",
        Some("127.0.0.1:4191".parse().unwrap()),
    );
    mesh.wait_for_services(&[&["billing", "4", "no"], &["web", "3", "no"]]);
    let left_out = format!(
        "billing/b-3 (connection refused), billing/b-4 (admin address {b1} is also billing/b-1's)"
    );

    // Every service, as its own sidecars see it; each scrape is 0.5 s of
    // traffic. billing: 20 requests, 18 successes; buckets summed over b-1
    // and b-2 are 6, 14, 16, 17, 20, 20: p50 (rank 10) = 5 + 5 * 4/8 ms,
    // p99 (rank 19.8) = 50 + 50 * 2.8/3 ms.
    let r = mesh.run(&["stat", "--interval", "500ms"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        cells(&r.stdout),
        [
            vec!["SERVICE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"],
            vec![
                "billing",
                "40.0",
                "90.00%",
                "7.50ms",
                "96.7ms",
                "rate-limit=6.0/s",
                "timeout=2.0/s"
            ],
            vec!["web", "8.0", "100.00%", "75.0ms", "99.5ms", "-"],
            format!(
                "4 of 7 sidecars unreachable: {left_out}, web/w-2 (no admin address), \
                 web/w-3 (admin address 127.0.0.1:4191 is loopback, the sidecar is at 10.0.0.9)"
            )
            .split_whitespace()
            .collect(),
        ],
        "{}",
        r.all()
    );
    assert_eq!(r.stderr, "");

    // The same as JSON.
    let r = mesh.run(&["stat", "--interval", "500ms", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["interval_seconds"], 0.5);
    assert_eq!(v["service"], serde_json::Value::Null);
    assert_eq!(v["sidecars"], 7);
    let billing = &v["rows"][0];
    assert_eq!(billing["service"], "billing");
    assert!(billing.get("route").is_none(), "{billing}");
    assert_eq!(billing["rps"], 40.0);
    assert_eq!(billing["success_rate"], 0.9);
    let close = |got: &serde_json::Value, want: f64| {
        assert!(
            (got.as_f64().unwrap() - want).abs() < 1e-9,
            "{got} != {want}"
        )
    };
    close(&billing["p50_seconds"], 0.0075);
    close(&billing["p99_seconds"], 0.05 + 0.05 * 2.8 / 3.0);
    assert_eq!(
        billing["refusals_per_second"],
        serde_json::json!({ "rate-limit": 6.0, "timeout": 2.0 })
    );
    assert_eq!(v["rows"][1]["service"], "web");
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    let unreachable = v["unreachable"].as_array().unwrap();
    assert_eq!(unreachable.len(), 4, "{v}");
    assert_eq!(
        (&unreachable[0]["service"], &unreachable[0]["id"]),
        (&"billing".into(), &"b-3".into())
    );
    assert_eq!(unreachable[0]["error"], "connection refused");
    assert_eq!(unreachable[0]["admin_address"], b3.to_string());
    assert_eq!(unreachable[1]["id"], "b-4");
    assert_eq!(unreachable[1]["admin_address"], b1.to_string());
    assert_eq!(unreachable[2]["id"], "w-2");
    assert_eq!(unreachable[2]["admin_address"], serde_json::Value::Null);
    assert_eq!(unreachable[2]["error"], "no admin address");
    assert_eq!(unreachable[3]["admin_address"], "127.0.0.1:4191");

    // The same document as YAML.
    let r = mesh.run(&["stat", "--interval", "500ms", "-o", "yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let y: serde_json::Value =
        serde_norway::from_str(&r.stdout).unwrap_or_else(|e| panic!("not YAML ({e}): {}", r.all()));
    for key in [
        "direction",
        "interval_seconds",
        "service",
        "rows",
        "sidecars",
    ] {
        assert_eq!(y[key], v[key], "{key}: {}", r.all());
    }
    assert_eq!(y["unreachable"].as_array().map(Vec::len), Some(4), "{y}");

    // One service's routes: only its own sidecars are scraped.
    // (none): b-2's buckets 4, 8, 8, 8, 10, 10: p50 = 5 + 5 * 1/4 ms,
    // p99 = 50 + 50 * 1.9/2 ms. charge: b-1's 2, 6, 8, 9, 10, 10: p50 = 5 +
    // 5 * 3/4 ms, p99 = 50 + 50 * 0.9/1 ms.
    let r = mesh.run(&["stat", "billing", "--interval", "500ms"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        cells(&r.stdout),
        [
            vec!["ROUTE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"],
            vec![
                "(none)",
                "20.0",
                "100.00%",
                "6.25ms",
                "97.5ms",
                "rate-limit=2.0/s",
                "timeout=2.0/s"
            ],
            vec![
                "charge",
                "20.0",
                "80.00%",
                "8.75ms",
                "95.0ms",
                "rate-limit=4.0/s"
            ],
            format!("2 of 4 sidecars unreachable: {left_out}")
                .split_whitespace()
                .collect(),
        ],
        "{}",
        r.all()
    );

    // The callers' view: what w-1 sent to billing and b-1 to ledger; nobody
    // calls web.
    let r = mesh.run(&["stat", "--interval", "500ms", "--outbound"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let got = cells(&r.stdout);
    assert_eq!(
        got[..4],
        [
            vec!["SERVICE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"],
            vec![
                "billing",
                "200.0",
                "100.00%",
                "7.50ms",
                "9.95ms",
                "no-healthy-endpoints=2.0/s"
            ],
            vec!["ledger", "10.0", "100.00%", "-", "-", "-"],
            vec!["web", "0.0", "-", "-", "-", "-"],
        ],
        "{}",
        r.all()
    );

    // An unknown service is an error; so is a bad interval.
    let r = mesh.run(&["stat", "nope", "--interval", "100ms"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("no service \"nope\""), "{}", r.all());
    let r = mesh.run(&["stat", "--interval", "soon"]);
    assert_eq!(r.code, 2, "{}", r.all());
}

#[test]
fn stat_errors_are_one_line() {
    let url = format!("http://{}", closed_port());
    let r = run(&url, None, &["stat"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .starts_with(&format!("error: cannot reach the control plane at {url}: ")),
        "{}",
        r.all()
    );
    assert_eq!((r.stderr.lines().count(), r.stdout.as_str()), (1, ""));

    let mesh = Mesh::start();
    let admin = &mesh.cp.admin_url();
    let r = run(admin, None, &["stat", "--interval", "100ms"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(
        r.stderr,
        format!(
            "error: the control plane at {admin} requires a token (401 Unauthorized): pass --token-file FILE or set WEFT_TOKEN_FILE\n"
        )
    );
    // An empty mesh is not an error.
    let r = mesh.run(&["stat", "--interval", "100ms"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        cells(&r.stdout),
        [
            vec!["SERVICE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"],
            vec!["no", "sidecars", "registered"],
        ]
    );
}

#[test]
fn watch_redraws_every_interval_until_interrupted() {
    let mut mesh = Mesh::start();
    let charge = labels("inbound", "billing", "charge");
    let server = metrics_server(
        &mesh.rt,
        growing(vec![requests(&charge, 200, "success", 4.0)]),
    );
    mesh.register("billing", "b-1", Some(server));
    mesh.wait_for_services(&[&["billing", "1", "no"]]);

    let child = weftctl(Some(&mesh.cp.admin_url()), Some(&mesh.token))
        .args(["stat", "--watch", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    // Not a terminal: frames one after the other, a blank line between.
    let frames: Vec<&str> = stdout.split("\n\n").collect();
    assert!(frames.len() >= 3, "{stdout}");
    for frame in frames {
        let rows = cells(frame);
        assert_eq!(
            rows[0],
            ["SERVICE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"],
            "{stdout}"
        );
        assert_eq!(rows[1][0], "billing", "{stdout}");
        assert_eq!(rows[1][2], "100.00%", "{stdout}");
        assert_eq!(rows.len(), 2, "{stdout}");
    }

    // -o yaml: a YAML stream, a `---` document per redraw.
    let child = weftctl(Some(&mesh.cp.admin_url()), Some(&mesh.token))
        .args(["stat", "--watch", "--interval", "200ms", "-o", "yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("---\n"), "{stdout}");
    let documents: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert!(documents.len() >= 3, "{stdout}");
    for d in documents {
        assert_eq!(d["rows"][0]["service"], "billing", "{stdout}");
        assert_eq!(d["rows"][0]["success_rate"], 1.0, "{stdout}");
    }
}
