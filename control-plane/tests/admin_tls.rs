//! Black-box tests of the admin API over TLS: `weft-control-plane
//! --admin-tls-cert/--admin-tls-key` serves HTTPS only, and `weftctl
//! --control-plane https://... --ca-file CA` talks to it (get, apply, stat;
//! stat still scrapes the sidecars' plain-HTTP admin endpoints). Without
//! `--ca-file`, with another CA or a name the certificate lacks, weftctl
//! fails saying why; a plain-HTTP client is answered 400 "use https://"; a
//! request without a token is still 401; the certificate is reloaded when
//! its files change; a bad file stops the start, naming the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use weft_certs::Ca;

use support::start;
use support::weftctl::{Run, run};
use weft_tests::control_plane::{ControlPlane, TOKEN};
use weft_tests::metrics::Scrape;
use weft_tests::process::TempDir;

const DAY: Duration = Duration::from_secs(24 * 3600);
const RR: &str = "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n";

/// A CA (in `dir/<name>/ca.pem`) and a control-plane certificate it issued
/// for `sans` (plus 127.0.0.1), written as `dir/control-plane.pem` and
/// `dir/control-plane-key.pem`.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
        }
    }

    /// A new CA; its `ca.pem` path.
    fn ca(&self, name: &str) -> (Ca, String) {
        let ca = Ca::generate(&Default::default()).unwrap();
        let path = self
            .dir
            .write(&format!("{name}-ca.pem"), ca.cert_pem())
            .unwrap();
        (ca, path.display().to_string())
    }

    /// Issues the admin certificate from `ca` over the current files.
    fn issue(&self, ca: &Ca, sans: &[&str]) -> weft_certs::Issued {
        let issued = ca.issue_control_plane(sans, DAY).unwrap();
        issued.write(self.dir.path()).unwrap();
        issued
    }

    fn cert(&self) -> String {
        self.path("control-plane.pem")
    }

    fn key(&self) -> String {
        self.path("control-plane-key.pem")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// A dev control plane serving its admin API with `files`' certificate.
fn control_plane(files: &Files) -> ControlPlane {
    start(
        ControlPlane::dev()
            .arg("--admin-tls-cert")
            .arg(&files.cert())
            .arg("--admin-tls-key")
            .arg(&files.key())
            .arg("--tls-watch-interval")
            .arg("100ms"),
    )
}

fn https(cp: &ControlPlane) -> String {
    format!("https://{}", cp.admin())
}

/// `weftctl --control-plane URL --token-file T [--ca-file CA] ARGS`, with
/// nothing taken from the environment.
fn weftctl(url: &str, cp: &ControlPlane, ca: Option<&str>, args: &[&str]) -> Run {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ca) = ca {
        all.extend(["--ca-file", ca]);
    }
    all.extend(args);
    run(url, Some(cp.token_file()), &all)
}

/// Retries `weftctl` until it exits 0 and its stdout satisfies `ok` (the view
/// follows the store asynchronously; a reload takes a watch interval).
fn eventually(what: &str, mut attempt: impl FnMut() -> Run, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = attempt();
        if r.code == 0 && ok(&r.stdout) {
            return r.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never; last (exit {}): {}",
            r.code,
            r.all()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails unless `r` exited 1 with one `error:` line containing every needle.
fn expect_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.starts_with("error: "), "{}", r.all());
    for needle in needles {
        assert!(r.stderr.contains(needle), "{needle:?} not in: {}", r.stderr);
    }
}

/// `GET path` over TLS (HTTP/1.1) trusting `ca_pem`, with the test token if
/// `token`; the status and body.
async fn get_tls(addr: SocketAddr, ca_pem: &str, path: &str, token: bool) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, "cp");
    if token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    let rsp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A stand-in for a sidecar's plain-HTTP admin listener: `GET /metrics`
/// answers billing's inbound requests, 10 more per scrape.
fn sidecar_metrics(rt: &Runtime) -> SocketAddr {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let n = served.fetch_add(1, Ordering::SeqCst) * 10;
                let text = format!(
                    "# TYPE weft_requests counter\n\
                     weft_requests_total{{direction=\"inbound\",service=\"billing\",route=\"\",status_code=\"200\",classification=\"success\"}} {n}\n\
                     # EOF\n"
                );
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
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

#[test]
fn weftctl_over_https_with_the_right_ca_applies_gets_and_stats() {
    let files = Files::new();
    let (ca, ca_file) = files.ca("mesh");
    files.issue(&ca, &["localhost"]);
    let cp = control_plane(&files);
    let rt = Runtime::new().unwrap();

    // A sidecar whose (plain-HTTP) admin endpoint stat scrapes.
    let admin = sidecar_metrics(&rt);
    let mut instance = support::grpc::instance("billing", "b-1", 7001);
    instance.admin_address = admin.to_string();
    let _registration = rt.block_on(weft_tests::grpc::register(&cp.grpc_url(), instance));

    let policy = files.dir.write("billing.toml", RR).unwrap();
    let policy = policy.to_str().unwrap();
    // By address (the IP SAN 127.0.0.1) and by name (the DNS SAN).
    let by_name = format!("https://localhost:{}", cp.admin().port());
    for url in [https(&cp), by_name] {
        let r = weftctl(&url, &cp, Some(&ca_file), &["apply", "-f", policy]);
        assert_eq!(r.code, 0, "{}", r.all());
        let got = eventually(
            "get policy billing",
            || weftctl(&url, &cp, Some(&ca_file), &["get", "policy", "billing"]),
            |out| out.contains("round-robin"),
        );
        assert!(got.contains("service = \"billing\""), "{got}");
        eventually(
            "get services",
            || weftctl(&url, &cp, Some(&ca_file), &["get", "services"]),
            |out| {
                out.lines()
                    .any(|l| l.split_whitespace().eq(["billing", "1", "yes"]))
            },
        );
    }
    // WEFT_CA_FILE does as well as --ca-file.
    let r: Run = support::weftctl::weftctl(Some(&https(&cp)), Some(cp.token_file()))
        .env("WEFT_CA_FILE", &ca_file)
        .args(["get", "services"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{}", r.all());

    // stat: the service list over https, the sidecar's metrics over http.
    let r = weftctl(
        &https(&cp),
        &cp,
        Some(&ca_file),
        &["stat", "--interval", "300ms"],
    );
    assert_eq!(r.code, 0, "{}", r.all());
    let billing = r
        .stdout
        .lines()
        .find(|l| l.starts_with("billing"))
        .unwrap_or_else(|| panic!("no billing row: {}", r.all()));
    assert!(billing.contains("100.00%"), "{}", r.all());
}

#[test]
fn weftctl_says_why_it_cannot_talk_to_the_tls_admin_api() {
    let files = Files::new();
    let (ca, ca_file) = files.ca("mesh");
    // No DNS SAN: only the IP SAN 127.0.0.1.
    files.issue(&ca, &[]);
    let cp = control_plane(&files);
    let url = https(&cp);

    // https:// without a CA.
    let r = weftctl(&url, &cp, None, &["get", "services"]);
    expect_error(&r, &[url.as_str(), "--ca-file", "WEFT_CA_FILE"]);

    // Another CA.
    let (_, other_ca) = files.ca("other");
    let r = weftctl(&url, &cp, Some(&other_ca), &["get", "services"]);
    expect_error(&r, &[url.as_str(), "unknown CA", other_ca.as_str()]);

    // A name the certificate does not carry.
    let by_name = format!("https://localhost:{}", cp.admin().port());
    let r = weftctl(&by_name, &cp, Some(&ca_file), &["get", "services"]);
    expect_error(&r, &[by_name.as_str(), "name mismatch", "--san localhost"]);

    // A CA file that is not one.
    let r = weftctl(&url, &cp, Some(&files.key()), &["get", "services"]);
    expect_error(&r, &[files.key().as_str()]);

    // http:// to the TLS port: the server's 400 says to use https://.
    let plain = format!("http://{}", cp.admin());
    let r = weftctl(&plain, &cp, None, &["get", "services"]);
    expect_error(&r, &[plain.as_str(), "use https://", "400"]);

    // https:// to a plain-HTTP admin API.
    let plain_cp = start(ControlPlane::dev());
    let url = format!("https://{}", plain_cp.admin());
    let r = weftctl(&url, &plain_cp, Some(&ca_file), &["get", "services"]);
    expect_error(&r, &[url.as_str(), "TLS handshake failed", "use http://"]);
    // ... and with http://, weftctl still works there (the CA file is ignored).
    let r = weftctl(
        &plain_cp.admin_url(),
        &plain_cp,
        Some(&ca_file),
        &["get", "services"],
    );
    assert_eq!(r.code, 0, "{}", r.all());
}

#[test]
fn the_tls_admin_port_refuses_plain_http_keeps_tokens_and_counts_failures() {
    let files = Files::new();
    let (ca, _) = files.ca("mesh");
    let issued = files.issue(&ca, &[]);
    let cp = control_plane(&files);
    let rt = Runtime::new().unwrap();
    let addr = cp.admin();

    let scrape = |rt: &Runtime| {
        let (status, text) = rt.block_on(get_tls(addr, ca.cert_pem(), "/metrics", false));
        assert_eq!(status, 200, "{text}");
        Scrape::parse(&text).unwrap()
    };
    let name = "weft_control_plane_admin_tls_handshake_failures_total";
    let at_start = scrape(&rt);
    for reason in ["handshake", "plaintext", "timeout"] {
        assert_eq!(
            at_start.value(name, &[("reason", reason)]).unwrap(),
            0.0,
            "{reason}"
        );
    }
    let not_after = weft_certs::not_after_of(issued.cert_der()).unwrap() as f64;
    assert_eq!(
        at_start
            .value(
                "weft_control_plane_admin_tls_certificate_expiry_timestamp_seconds",
                &[]
            )
            .unwrap(),
        not_after
    );
    // No mTLS on the gRPC listener: no gRPC TLS series.
    assert!(
        !at_start
            .text
            .contains("weft_control_plane_tls_handshake_failures_total{"),
        "{}",
        at_start.text
    );

    // A plain-HTTP request: a readable 400, no admin answer.
    let raw = rt.block_on(async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /live HTTP/1.1\r\nhost: cp\r\n\r\n")
            .await
            .unwrap();
        let mut rsp = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rsp))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&rsp).into_owned()
    });
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
    assert!(raw.contains("use https://"), "{raw}");

    // Over TLS: probes need no token, the API still does.
    let (status, _) = rt.block_on(get_tls(addr, ca.cert_pem(), "/live", false));
    assert_eq!(status, 200);
    let (status, body) = rt.block_on(get_tls(addr, ca.cert_pem(), "/v1/services", false));
    assert_eq!(status, 401, "{body}");
    let (status, body) = rt.block_on(get_tls(addr, ca.cert_pem(), "/v1/services", true));
    assert_eq!(status, 200, "{body}");

    // A client that does not trust the certificate aborts the handshake.
    let (_, other_ca) = files.ca("other");
    let r = weftctl(&https(&cp), &cp, Some(&other_ca), &["get", "services"]);
    assert_eq!(r.code, 1, "{}", r.all());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&rt);
        let count = |reason| now.value(name, &[("reason", reason)]).unwrap();
        if count("plaintext") == 1.0 && count("handshake") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", now.text);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_admin_certificate_is_reloaded_when_its_files_change() {
    let files = Files::new();
    let (first, first_file) = files.ca("first");
    files.issue(&first, &[]);
    let cp = control_plane(&files);
    let url = https(&cp);
    let r = weftctl(&url, &cp, Some(&first_file), &["get", "services"]);
    assert_eq!(r.code, 0, "{}", r.all());

    // A certificate from another CA written over the files: new connections
    // get it within a watch interval.
    let (second, second_file) = files.ca("second");
    let issued = files.issue(&second, &[]);
    eventually(
        "the new certificate",
        || weftctl(&url, &cp, Some(&second_file), &["get", "services"]),
        |_| true,
    );
    let r = weftctl(&url, &cp, Some(&first_file), &["get", "services"]);
    expect_error(&r, &["unknown CA"]);
    let rt = Runtime::new().unwrap();
    let (_, text) = rt.block_on(get_tls(cp.admin(), second.cert_pem(), "/metrics", false));
    let expiry = Scrape::parse(&text)
        .unwrap()
        .value(
            "weft_control_plane_admin_tls_certificate_expiry_timestamp_seconds",
            &[],
        )
        .unwrap();
    assert_eq!(
        expiry,
        weft_certs::not_after_of(issued.cert_der()).unwrap() as f64
    );

    // A key that does not match is refused; the current certificate stays.
    let stray = second.issue_control_plane(&[], DAY).unwrap();
    std::fs::write(files.key(), stray.key_pem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cp.logs().contains("new TLS files refused") {
        assert!(Instant::now() < deadline, "{}", cp.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = weftctl(&url, &cp, Some(&second_file), &["get", "services"]);
    assert_eq!(r.code, 0, "{}", r.all());
}

/// Spawns a dev control plane with `args` and waits for it to exit; its
/// exit code and log.
fn fails_to_start(args: &[&str]) -> (i32, String) {
    let mut builder = ControlPlane::dev();
    for arg in args {
        builder = builder.arg(arg);
    }
    let cp = builder.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = cp.try_status().unwrap() {
            return (status.code().unwrap_or(-1), cp.logs());
        }
        assert!(Instant::now() < deadline, "still running: {}", cp.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_control_plane_does_not_start_with_a_bad_admin_certificate_or_key() {
    let files = Files::new();
    let (ca, _) = files.ca("mesh");
    files.issue(&ca, &[]);
    let missing = files.path("missing-key.pem");
    let (code, log) = fails_to_start(&[
        "--admin-tls-cert",
        &files.cert(),
        "--admin-tls-key",
        &missing,
    ]);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("setting up TLS on the admin listener"),
        "{log}"
    );
    assert!(log.contains(&missing), "{log}");
    // The cause once, not repeated by the error chain.
    assert_eq!(log.matches("No such file").count(), 1, "{log}");

    let garbage = files.dir.write("garbage.pem", "not a key\n").unwrap();
    let garbage = garbage.display().to_string();
    let (code, log) = fails_to_start(&[
        "--admin-tls-cert",
        &files.cert(),
        "--admin-tls-key",
        &garbage,
    ]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains(&garbage), "{log}");

    // A key that is not the certificate's: both files named.
    let other = ca.issue_control_plane(&[], DAY).unwrap();
    let other_key = files.dir.write("other-key.pem", other.key_pem()).unwrap();
    let other_key = other_key.display().to_string();
    let (code, log) = fails_to_start(&[
        "--admin-tls-cert",
        &files.cert(),
        "--admin-tls-key",
        &other_key,
    ]);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&other_key) && log.contains(&files.cert()),
        "{log}"
    );

    // The key file as the certificate.
    let (code, log) = fails_to_start(&[
        "--admin-tls-cert",
        &files.key(),
        "--admin-tls-key",
        &files.key(),
    ]);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&format!("{} holds no certificate", files.key())),
        "{log}"
    );

    // One without the other is a usage error.
    let (code, log) = fails_to_start(&["--admin-tls-cert", &files.cert()]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("--admin-tls-key"), "{log}");
}
