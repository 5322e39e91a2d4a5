//! Black-box tests of the `weftctl` binary: each runs the real binary, against
//! a `weft-control-plane --dev` process on loopback ports where it needs one,
//! and checks what it prints and its exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_api::v1::{Instance, Metadata};

use support::start;
use support::weftctl::{Run, run, run_offline, run_with_stdin};
use weft_tests::control_plane::{ControlPlane, TOKEN};
use weft_tests::etcd::EtcdServer;
use weft_tests::grpc::register;
use weft_tests::process::TempDir;

/// A dev control plane and its token file.
struct Cp {
    cp: ControlPlane,
    token: PathBuf,
}

impl Cp {
    fn start() -> Self {
        let cp = start(ControlPlane::dev());
        let token = cp.token_file().to_owned();
        Self { cp, token }
    }

    fn run(&self, args: &[&str]) -> Run {
        run(&self.cp.admin_url(), Some(&self.token), args)
    }

    /// Polls a read that goes through the control plane's view (which follows
    /// the store asynchronously) until its output satisfies `ok`.
    fn eventually(&self, args: &[&str], ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.run(args);
            if r.code == 0 && ok(&r.stdout) {
                return r.stdout;
            }
            assert!(
                Instant::now() < deadline,
                "weftctl {args:?} never gave the expected output; last (exit {}): {}",
                r.code,
                r.all()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.cp.dir().path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

/// The line of `text` whose columns are `cells` (separated by any spaces).
fn has_row(text: &str, cells: &[&str]) -> bool {
    text.lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == cells)
}

const RR: &str = "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n";
const LR: &str = "service = \"billing\"\n\n[outbound]\nload_balancer = \"least-request\"\n";
const BAD: &str = "service = \"billing\"\n\n[outbound]\nload_balancer = \"random\"\n";
/// Where the control plane records billing's last valid policy.
const RECORD: &str = "/weft/services/billing/last-valid-policy";

#[test]
fn check_validates_offline_with_located_messages() {
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&good, RR).unwrap();
    std::fs::write(&bad, BAD).unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());

    // No --control-plane (and none in the environment): nothing to ask.
    let r = run_offline(&["check", "-f", good]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.stdout,
        format!("{good}: ok (policy for service billing)\n")
    );

    let r = run_offline(&["check", "-f", good, "-f", bad]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains(&format!("{good}: ok")), "{}", r.all());
    // weft-config's message: file:line:col: key: what, then the line quoted,
    // after `error: ` as `weft-proxy check` prints it.
    assert!(
        r.stderr.starts_with(&format!(
            "error: {bad}:4:17: outbound.load_balancer: unknown value \"random\""
        )),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains("  4 | load_balancer = \"random\""),
        "{}",
        r.all()
    );

    let missing = dir.path().join("missing.toml");
    let r = run_offline(&["check", "-f", missing.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .starts_with(&format!("error: cannot read {}", missing.display())),
        "{}",
        r.all()
    );
}

#[test]
fn apply_reports_created_unchanged_and_updated_lines() {
    let cp = Cp::start();
    let file = cp.write("billing.toml", RR);

    let r = cp.run(&["apply", "--create", "-f", &file]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .starts_with(&format!("policy billing created from {file} (revision ")),
        "{}",
        r.all()
    );

    // The same file again: nothing is written.
    let r = cp.run(&["apply", "-f", &file]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.stdout, format!("policy billing unchanged ({file})\n"));

    // A change: the changed lines only.
    cp.write("billing.toml", LR);
    let r = cp.run(&["apply", "-f", &file]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].starts_with(&format!("policy billing updated from {file} (revision ")),
        "{}",
        r.all()
    );
    assert_eq!(
        lines[1..],
        [
            "  -load_balancer = \"round-robin\"",
            "  +load_balancer = \"least-request\""
        ],
        "{}",
        r.all()
    );
    let r = cp.run(&["get", "policy", "billing"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, LR), "{}", r.all());

    // One invalid file among valid ones: its message, and nothing written.
    let other = cp.write("billing-rr.toml", RR);
    let bad = cp.write("bad.toml", BAD);
    let r = cp.run(&["apply", "-f", &other, "-f", &bad]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains(&format!("{bad}:4:17: outbound.load_balancer:")),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("nothing applied"), "{}", r.all());
    let r = cp.run(&["get", "policy", "billing"]);
    assert_eq!(r.stdout, LR, "{}", r.all());
}

#[test]
fn diff_exits_0_when_identical_and_1_with_the_changed_lines() {
    let cp = Cp::start();
    let file = cp.write("billing.toml", RR);

    // No stored policy: every line is new.
    let r = cp.run(&["diff", "-f", &file]);
    assert_eq!(r.code, 1, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "--- stored (service billing has no policy)",
            &format!("+++ {file}"),
            "@@ -0,0 +1,4 @@",
            "+service = \"billing\"",
            "+",
            "+[outbound]",
            "+load_balancer = \"round-robin\"",
        ]
    );

    assert_eq!(cp.run(&["apply", "--create", "-f", &file]).code, 0);
    let r = cp.run(&["diff", "-f", &file]);
    assert_eq!((r.code, r.all().as_str()), (0, ""));

    cp.write("billing.toml", LR);
    let r = cp.run(&["diff", "-f", &file]);
    assert_eq!(r.code, 1, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "--- stored",
            &format!("+++ {file}"),
            "@@ -1,4 +1,4 @@",
            " service = \"billing\"",
            " ",
            " [outbound]",
            "-load_balancer = \"round-robin\"",
            "+load_balancer = \"least-request\"",
        ]
    );

    // Errors are 2: an invalid file, an unreachable control plane.
    let bad = cp.write("bad.toml", BAD);
    let r = cp.run(&["diff", "-f", &bad]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains(&format!("{bad}:4:17:")), "{}", r.all());
    let r = run(&refused_url(), Some(&cp.token), &["diff", "-f", &file]);
    assert_eq!(r.code, 2, "{}", r.all());
}

fn instance(id: &str, port: u16) -> Instance {
    Instance {
        service: "billing".into(),
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        metadata: Some(Metadata {
            zone: "z1".into(),
            version: "v2".into(),
            weight: 50,
            weight_set: true,
            ..Default::default()
        }),
        admin_address: "127.0.0.1:9901".into(),
        health: 0,
    }
}

#[test]
fn get_services_instances_policy_and_delete_policy() {
    let cp = Cp::start();
    let file = cp.write("billing.toml", RR);
    assert_eq!(cp.run(&["apply", "--create", "-f", &file]).code, 0);
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["SERVICE", "INSTANCES", "POLICY"]) && has_row(t, &["billing", "0", "yes"])
    });
    let r = cp.run(&["get", "policy", "billing"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, RR), "{}", r.all());

    // Two registered instances (the runtime keeps their streams open).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _a = rt.block_on(register(&cp.cp.grpc_url(), instance("a", 7001)));
    let mut plain = instance("b", 7002);
    plain.metadata = None;
    plain.admin_address = String::new();
    let _b = rt.block_on(register(&cp.cp.grpc_url(), plain));
    let t = cp.eventually(&["get", "instances", "billing"], |t| t.lines().count() == 3);
    assert!(
        has_row(
            &t,
            &[
                "ID", "ADDRESS", "HEALTH", "ZONE", "VERSION", "WEIGHT", "ADMIN"
            ]
        ),
        "{t}"
    );
    assert!(
        has_row(
            &t,
            &[
                "a",
                "127.0.0.1:7001",
                "healthy",
                "z1",
                "v2",
                "50",
                "127.0.0.1:9901"
            ]
        ),
        "{t}"
    );
    assert!(
        has_row(
            &t,
            &["b", "127.0.0.1:7002", "healthy", "-", "-", "100", "-"]
        ),
        "{t}"
    );
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["billing", "2", "yes"])
    });

    // Delete the policy: the instances stay.
    let r = cp.run(&["delete", "policy", "billing"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "policy billing deleted\n"),
        "{}",
        r.all()
    );
    let r = cp.run(&["get", "policy", "billing"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("service \"billing\" has no policy"),
        "{}",
        r.all()
    );
    let r = cp.run(&["delete", "policy", "billing"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("404"), "{}", r.all());
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["billing", "2", "no"])
    });

    // An unknown service, and a name that is not a service name.
    let r = cp.run(&["get", "instances", "nope"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("no service \"nope\""), "{}", r.all());
    let r = cp.run(&["get", "policy", "Not/A/Name"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("invalid service name"), "{}", r.all());
}

#[test]
fn a_missing_or_wrong_token_is_one_clear_line() {
    let cp = Cp::start();
    let file = cp.write("billing.toml", RR);
    let wrong = cp.cp.dir().path().join("wrong");
    std::fs::write(&wrong, "not-the-right-token-at-all\n").unwrap();
    let admin = &cp.cp.admin_url();
    for (args, code) in [
        (&["get", "services"][..], 1),
        (&["apply", "-f", &file][..], 1),
        (&["diff", "-f", &file][..], 2),
    ] {
        let r = run(admin, None, args);
        assert_eq!(r.code, code, "{args:?}: {}", r.all());
        assert!(
            r.stderr.ends_with(&format!(
                "the control plane at {admin} requires a token (401 Unauthorized): pass --token-file FILE or set WEFT_TOKEN_FILE\n"
            )),
            "{args:?}: {}",
            r.all()
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.all());
        let r = run(admin, Some(&wrong), args);
        assert_eq!(r.code, code, "{args:?}: {}", r.all());
        assert!(
            r.stderr.ends_with(&format!(
                "the control plane at {admin} refused the token in {} (401 Unauthorized)\n",
                wrong.display()
            )),
            "{args:?}: {}",
            r.all()
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.all());
        assert!(!r.all().contains(TOKEN));
    }
    // Nothing was written without a valid token.
    let r = cp.run(&["get", "policy", "billing"]);
    assert_eq!(r.code, 1, "{}", r.all());
}

/// A loopback URL nothing listens on.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[test]
fn connection_refused_names_the_address() {
    let url = refused_url();
    let r = run(&url, None, &["get", "services"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .starts_with(&format!("error: cannot reach the control plane at {url}: ")),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.to_lowercase().contains("connection refused"),
        "{}",
        r.all()
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.all());
}

#[test]
fn certs_makes_a_ca_and_service_certificates_offline() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let out = dir.display().to_string();
    let nowhere = refused_url();
    let r = run(
        &nowhere,
        None,
        &[
            "certs",
            "ca",
            "--out",
            &out,
            "--trust-domain",
            "example.org",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("for development and tests"),
        "{}",
        r.all()
    );
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();

    let r = run(&nowhere, None, &["certs", "ca", "--out", &out]);
    assert_eq!(r.code, 1, "an existing CA is kept: {}", r.all());
    assert!(r.stderr.contains("--force"), "{}", r.all());
    assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_pem);

    let svc = dir.join("billing");
    let r = run(
        &nowhere,
        None,
        &[
            "certs",
            "issue",
            "billing",
            "--ca",
            &out,
            "--out",
            &svc.display().to_string(),
            "--days",
            "7",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .contains("spiffe://example.org/service/billing valid for 7 days"),
        "{}",
        r.all()
    );
    assert!(svc.join("billing.pem").is_file() && svc.join("billing-key.pem").is_file());

    let r = run(
        &nowhere,
        None,
        &[
            "certs",
            "issue",
            "billing",
            "--ca",
            "/nonexistent",
            "--out",
            &out,
        ],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("loading the CA") && r.stderr.contains("/nonexistent/ca.pem"),
        "{}",
        r.all()
    );
}

/// A policy written straight to etcd that fails validation is ignored by the
/// control plane (sidecars keep the last valid one): `get policy` prints the
/// one in force, flagged, not the refused one; after a restart, with no valid
/// policy ever seen, it says there is none in force and exits 1.
#[test]
fn get_policy_shows_the_policy_in_force_when_the_stored_one_was_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdServer::start()).unwrap();
    let mut cp = start(ControlPlane::etcd(etcd.client_url()));
    let token = cp.token_file().to_owned();
    let ctl = |cp: &ControlPlane, args: &[&str]| run(&cp.admin_url(), Some(&token), args);
    let file = cp.dir().path().join("billing.toml");
    std::fs::write(&file, RR).unwrap();
    let r = ctl(&cp, &["apply", "--create", "-f", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());

    // An invalid policy, straight to etcd.
    rt.block_on(async {
        let mut client = etcd.connect().await?;
        client
            .put("/weft/services/billing/policy", BAD, None)
            .await?;
        anyhow::Ok(())
    })
    .unwrap();
    let r = ctl(&cp, &["get", "policy", "billing"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .starts_with("# REFUSED: the policy stored for billing (revision"),
        "{}",
        r.all()
    );
    assert!(r.stdout.contains("load_balancer"), "{}", r.all());
    assert!(r.stdout.ends_with(RR), "{}", r.all());
    assert!(
        r.stdout
            .lines()
            .all(|l| l.starts_with('#') || !l.contains("random")),
        "{}",
        r.all()
    );
    assert!(r.stderr.starts_with("warning: "), "{}", r.all());
    // Still a valid policy file: the one in force.
    let printed = weft_config::parse_policy(&r.stdout, Path::new("out.toml")).unwrap();
    assert_eq!(
        printed.outbound.load_balancer,
        weft_config::LoadBalancer::RoundRobin
    );

    // A restarted control plane has never seen the valid policy itself, but
    // it was recorded in etcd: it is still in force.
    rt.block_on(async {
        let client = etcd.connect().await?;
        support::wait_for("the record", Duration::from_secs(5), || {
            let mut client = client.clone();
            async move {
                let got = client.get(RECORD, None).await?;
                Ok((!got.kvs().is_empty()).then_some(()))
            }
        })
        .await?;
        anyhow::Ok(())
    })
    .unwrap();
    rt.block_on(cp.restart()).unwrap();
    let r = ctl(&cp, &["get", "policy", "billing"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .starts_with("# REFUSED: the policy stored for billing (revision"),
        "{}",
        r.all()
    );
    assert!(r.stdout.ends_with(RR), "{}", r.all());

    // Without the record, a restarted control plane knows no valid policy:
    // none in force.
    rt.block_on(async {
        let mut client = etcd.connect().await?;
        client.delete(RECORD, None).await?;
        anyhow::Ok(())
    })
    .unwrap();
    rt.block_on(cp.restart()).unwrap();
    let r = ctl(&cp, &["get", "policy", "billing"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains("service \"billing\" has no policy in force: the one stored (revision"),
        "{}",
        r.all()
    );
}

/// Registers `instance` with `cp`; the registration lasts as long as the
/// returned sender and runtime.
fn keep_registered(
    rt: &tokio::runtime::Runtime,
    cp: &Cp,
    instance: Instance,
) -> tokio::sync::mpsc::Sender<weft_api::v1::RegisterRequest> {
    rt.block_on(register(&cp.cp.grpc_url(), instance))
}

#[test]
fn get_and_diff_print_json_documents_for_scripts() {
    let cp = Cp::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _a = keep_registered(&rt, &cp, instance("a", 7001));
    let mut plain = instance("b", 7002);
    plain.metadata = None;
    plain.admin_address = String::new();
    let _b = keep_registered(&rt, &cp, plain);
    let file = cp.write("billing.toml", RR);
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["billing", "2", "no"])
    });
    assert_eq!(cp.run(&["apply", "-f", &file]).code, 0);

    let doc = |args: &[&str]| serde_json::from_str::<serde_json::Value>(&cp.run(args).stdout);
    cp.eventually(&["get", "services", "-o", "json"], |t| {
        serde_json::from_str::<serde_json::Value>(t).ok()
            == Some(serde_json::json!({
                "live": true,
                "services": [{ "name": "billing", "instances": 2, "policy": true }],
            }))
    });
    let r = cp.run(&["get", "instances", "billing", "--output", "json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.json(),
        serde_json::json!({
            "service": "billing",
            "instances": [
                {
                    "id": "a", "address": "127.0.0.1:7001", "health": "healthy",
                    "zone": "z1", "version": "v2", "weight": 50, "labels": {},
                    "admin_address": "127.0.0.1:9901",
                },
                {
                    "id": "b", "address": "127.0.0.1:7002", "health": "healthy",
                    "zone": null, "version": null, "weight": 100, "labels": {},
                    "admin_address": null,
                },
            ],
        }),
        "{}",
        r.all()
    );

    // The policy: stored text, revision, not refused, and (once the view
    // has it) in force.
    let got = cp.eventually(&["get", "policy", "billing", "-o", "json"], |t| {
        serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v["in_force"] == RR)
    });
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(
        (&v["service"], &v["policy"], &v["refused"]),
        (&"billing".into(), &RR.into(), &serde_json::Value::Null),
        "{v}"
    );
    let revision = v["revision"].as_i64().unwrap();
    assert!(revision > 0, "{v}");

    // diff: identical (exit 0), then different (exit 1), the same document.
    let r = cp.run(&["diff", "-f", &file, "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.json(),
        serde_json::json!({
            "service": "billing", "file": file, "stored": true, "revision": revision,
            "identical": true, "diff": "",
        })
    );
    cp.write("billing.toml", LR);
    let r = cp.run(&["diff", "-f", &file, "-o", "json"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let v = r.json();
    assert_eq!(
        (&v["identical"], &v["stored"]),
        (&false.into(), &true.into())
    );
    let diff = v["diff"].as_str().unwrap();
    assert!(
        diff.starts_with(&format!("--- stored\n+++ {file}\n@@ "))
            && diff.ends_with(
                "-load_balancer = \"round-robin\"\n+load_balancer = \"least-request\"\n"
            ),
        "{v}"
    );
    // A service without a policy, from standard input.
    let r = run_with_stdin(
        &cp.cp.admin_url(),
        Some(&cp.token),
        &["diff", "-f", "-", "-o", "json"],
        "service = \"web\"\n",
    );
    assert_eq!(r.code, 1, "{}", r.all());
    let v = r.json();
    assert_eq!(
        (&v["service"], &v["file"], &v["stored"], &v["revision"]),
        (
            &"web".into(),
            &"<stdin>".into(),
            &false.into(),
            &serde_json::Value::Null
        ),
        "{v}"
    );

    // Errors stay one `error:` line on stderr, nothing on stdout.
    let r = cp.run(&["get", "policy", "web", "-o", "json"]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    assert!(r.stderr.starts_with("error: "), "{}", r.all());
    assert!(doc(&["get", "instances", "nope", "-o", "json"]).is_err());
    let r = cp.run(&["get", "services", "-o", "xml"]);
    assert_eq!(r.code, 2, "{}", r.all());
}

/// stdout as YAML, converted to JSON for comparing with `-o json`'s.
fn yaml(r: &Run) -> serde_json::Value {
    assert_eq!(r.code, 0, "{}", r.all());
    serde_norway::from_str(&r.stdout).unwrap_or_else(|e| panic!("not YAML ({e}): {}", r.all()))
}

#[test]
fn read_commands_print_the_json_document_as_yaml() {
    let cp = Cp::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _a = keep_registered(&rt, &cp, instance("a", 7001));
    let file = cp.write("billing.toml", RR);
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["billing", "1", "no"])
    });
    assert_eq!(cp.run(&["apply", "-f", &file]).code, 0);
    cp.eventually(&["get", "policy", "billing", "-o", "json"], |t| {
        serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v["in_force"] == RR)
    });

    // get services / instances / policy, diff and version: the same document.
    let cases: [&[&str]; 5] = [
        &["get", "services"],
        &["get", "instances", "billing"],
        &["get", "policy", "billing"],
        &["diff", "-f", file.as_str()],
        &["version"],
    ];
    for args in cases {
        let json = cp.run(&[args, &["-o", "json"]].concat());
        let yaml_run = cp.run(&[args, &["--output", "yaml"]].concat());
        assert_eq!(yaml(&yaml_run), json.json(), "{args:?}: {}", yaml_run.all());
    }
    // Multi-line strings are literal blocks, readable as the policy file.
    let r = cp.run(&["get", "policy", "billing", "-o", "yaml"]);
    assert!(
        r.stdout
            .contains("policy: |\n  service = \"billing\"\n\n  [outbound]\n"),
        "{}",
        r.all()
    );
    let v = yaml(&r);
    assert_eq!(
        (&v["service"], &v["policy"]),
        (&"billing".into(), &RR.into())
    );
    // diff keeps its exit codes: 1 when the file differs.
    cp.write("billing.toml", LR);
    let r = cp.run(&["diff", "-f", &file, "-o", "yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let v: serde_json::Value = serde_norway::from_str(&r.stdout).unwrap();
    assert_eq!(v["identical"], false, "{}", r.all());
    // Errors stay one line on stderr, nothing on stdout.
    let r = cp.run(&["get", "policy", "web", "-o", "yaml"]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    let r = run_offline(&["version", "--client", "-o", "yaml"]);
    assert_eq!(
        yaml(&r),
        run_offline(&["version", "--client", "-o", "json"]).json()
    );
}

#[test]
fn version_names_the_client_and_the_control_plane_build() {
    let cp = Cp::start();
    let r = cp.run(&["version"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.all());
    let version = env!("CARGO_PKG_VERSION");
    let client = lines[0]
        .strip_prefix(&format!("weftctl {version} (commit "))
        .and_then(|l| l.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{}", r.all()));
    // A short git hash, or "unknown" when built without git.
    assert!(
        client == "unknown" || (client.len() >= 7 && client.chars().all(|c| c.is_ascii_hexdigit())),
        "{}",
        r.all()
    );
    // Both binaries come from this build.
    assert_eq!(
        lines[1],
        format!(
            "weft-control-plane {version} (commit {client}) at {}",
            cp.cp.admin_url()
        )
    );

    let r = cp.run(&["version", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.json(),
        serde_json::json!({
            "client": { "version": version, "commit": client },
            "control_plane": { "url": cp.cp.admin_url(), "version": version, "commit": client },
        })
    );

    // --client needs no control plane; without --client an unreachable or
    // refusing control plane is an error after the client's line.
    let nowhere = refused_url();
    let r = run(&nowhere, None, &["version", "--client"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.stdout,
        format!("weftctl {version} (commit {client})\n"),
        "{}",
        r.all()
    );
    let r = run(&nowhere, None, &["version"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.all());
    assert!(
        r.stderr.starts_with(&format!(
            "error: cannot reach the control plane at {nowhere}"
        )),
        "{}",
        r.all()
    );
    // GET /version needs the token, like every other read.
    let r = run(&cp.cp.admin_url(), None, &["version"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("requires a token"), "{}", r.all());
}

#[test]
fn completion_prints_a_script_naming_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let r = run_offline(&["completion", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.all());
        assert!(r.stdout.lines().count() > 10, "{shell}: {}", r.all());
        for word in [
            "weftctl",
            "apply",
            "check",
            "diff",
            "get",
            "delete",
            "stat",
            "edges",
            "top",
            "certs",
            "version",
            "completion",
            "create",
            "output",
        ] {
            assert!(
                r.stdout.contains(word),
                "{shell}: no {word:?} in\n{}",
                r.stdout
            );
        }
    }
    let r = run_offline(&["completion", "tcsh"]);
    assert_eq!(r.code, 2, "{}", r.all());
}

const WEB: &str = "service = \"web\"\n\n[outbound]\nload_balancer = \"round-robin\"\n";

#[test]
fn apply_takes_a_directory_or_standard_input_and_validates_every_file_first() {
    let cp = Cp::start();
    let root = cp.cp.dir().path();
    // A directory: its *.toml files in name order; other files, hidden files
    // and subdirectories are not read.
    let dir = root.join("policies");
    std::fs::create_dir_all(dir.join("old")).unwrap();
    std::fs::write(dir.join("web.toml"), WEB).unwrap();
    std::fs::write(dir.join("billing.toml"), RR).unwrap();
    std::fs::write(dir.join("README.txt"), "not a policy").unwrap();
    std::fs::write(dir.join(".billing.toml.swp.toml"), BAD).unwrap();
    std::fs::write(dir.join("old/billing.toml"), BAD).unwrap();
    let d = dir.to_str().unwrap();

    let r = run_offline(&["check", "-f", d]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.stdout,
        format!(
            "{d}/billing.toml: ok (policy for service billing)\n{d}/web.toml: ok (policy for service web)\n"
        )
    );
    let r = cp.run(&["apply", "--create", "-f", d]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.all());
    assert!(
        lines[0].starts_with(&format!(
            "policy billing created from {d}/billing.toml (revision"
        )) && lines[1].starts_with(&format!("policy web created from {d}/web.toml (revision")),
        "{}",
        r.all()
    );

    // One invalid file in the directory: its file, line and key; nothing
    // applied, not even the valid file before it.
    let mixed = root.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::write(mixed.join("a-billing.toml"), LR).unwrap();
    std::fs::write(
        mixed.join("b-web.toml"),
        WEB.replace("round-robin", "random"),
    )
    .unwrap();
    let m = mixed.to_str().unwrap();
    let r = cp.run(&["apply", "-f", m]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    assert!(
        r.stderr.starts_with(&format!(
            "error: {m}/b-web.toml:4:17: outbound.load_balancer: unknown value \"random\""
        )),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("nothing applied"), "{}", r.all());
    assert_eq!(cp.run(&["get", "policy", "billing"]).stdout, RR);

    // Two files for one service: nothing applied.
    std::fs::write(mixed.join("b-web.toml"), LR).unwrap();
    let r = cp.run(&["apply", "-f", m]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!(
            "nothing applied: {m}/a-billing.toml and {m}/b-web.toml are both policies for service billing"
        )),
        "{}",
        r.all()
    );
    assert_eq!(cp.run(&["get", "policy", "billing"]).stdout, RR);

    // Standard input, named <stdin>.
    let (url, token) = (cp.cp.admin_url(), Some(cp.token.as_path()));
    let r = run_with_stdin(&url, token, &["apply", "-f", "-"], LR);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .starts_with("policy billing updated from <stdin> (revision"),
        "{}",
        r.all()
    );
    assert_eq!(cp.run(&["get", "policy", "billing"]).stdout, LR);
    let r = run_with_stdin(&url, token, &["apply", "-f", "-"], BAD);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .starts_with("error: <stdin>:4:17: outbound.load_balancer:"),
        "{}",
        r.all()
    );
    assert_eq!(cp.run(&["get", "policy", "billing"]).stdout, LR);

    // A directory with no policy in it is an error, not a silent no-op.
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = cp.run(&["apply", "-f", empty.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("holds no *.toml file"), "{}", r.all());
}

#[test]
fn apply_refuses_a_service_that_never_registered_unless_create() {
    let cp = Cp::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _a = keep_registered(&rt, &cp, instance("a", 7001));
    cp.eventually(&["get", "services"], |t| {
        has_row(t, &["billing", "1", "no"])
    });

    // A typo: refused, nothing written, even for the good file beside it.
    let typo = cp.write("biling.toml", &RR.replace("billing", "biling"));
    let good = cp.write("billing.toml", RR);
    let r = cp.run(&["apply", "-f", &good, "-f", &typo]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    assert!(
        r.stderr.starts_with(&format!(
            "error: {typo}: service \"biling\" has never registered with the control plane (no instances, no policy)\n"
        )),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains("nothing applied") && r.stderr.contains("--create"),
        "{}",
        r.all()
    );
    for service in ["billing", "biling"] {
        let r = cp.run(&["get", "policy", service]);
        assert_eq!(r.code, 1, "{service}: {}", r.all());
    }

    // A registered service needs no --create; a policy applied with
    // --create makes its service known.
    let r = cp.run(&["apply", "-f", &good]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r = cp.run(&["apply", "--create", "-f", &typo]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.starts_with("policy biling created"), "{}", r.all());
    cp.write("biling.toml", &LR.replace("billing", "biling"));
    let r = cp.run(&["apply", "-f", &typo]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.starts_with("policy biling updated"), "{}", r.all());
}

#[test]
fn check_warns_about_names_the_control_plane_has_never_seen() {
    let cp = Cp::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _a = keep_registered(&rt, &cp, instance("a", 7001));
    let _w = keep_registered(&rt, &cp, support::grpc::instance("web", "w-1", 7101));
    cp.eventually(&["get", "services"], |t| has_row(t, &["web", "1", "no"]));
    let file = cp.write(
        "billing.toml",
        "service = \"billing\"\n\n[inbound]\nallow = [\"web\", \"ordrs\", \"spiffe://weft.local/service/ledgr\"]\n\n\
         [[routes]]\nname = \"charge\"\nmatch = { path_prefix = \"/charge\" }\nallow = [\"web\", \"chekout\"]\n",
    );
    let typo = cp.write("biling.toml", &RR.replace("billing", "biling"));
    let url = cp.cp.admin_url();

    // Offline (no --control-plane): it cannot know, says nothing.
    let r = run_offline(&["check", "-f", &file, "-f", &typo]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{}", r.all());

    let r = cp.run(&["check", "-f", &file, "-f", &typo]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.stdout,
        format!(
            "{file}: ok (policy for service billing)\n{typo}: ok (policy for service biling)\n"
        )
    );
    let never = |what: &str| {
        format!(
            "{what} has never registered with the control plane at {url} (no instances, no policy)"
        )
    };
    assert_eq!(
        r.stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "warning: {file}: inbound.allow: {}",
                never("service \"ordrs\"")
            ),
            format!(
                "warning: {file}: inbound.allow: {}",
                never("service \"ledgr\"")
            ),
            format!(
                "warning: {file}: routes[0].allow: {}",
                never("service \"chekout\"")
            ),
            format!("warning: {typo}: {}", never("service \"biling\"")),
        ],
        "{}",
        r.all()
    );

    // An unreachable control plane: one warning, the files still checked.
    let nowhere = refused_url();
    let r = run(&nowhere, None, &["check", "-f", &file]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.starts_with(&format!(
            "warning: the service names were not checked: cannot reach the control plane at {nowhere}"
        )),
        "{}",
        r.all()
    );
}
