//! Golden tests of `weftctl inject`: each runs the real binary on a manifest
//! in `tests/inject/NAME.yaml` and compares its stdout, byte for byte, with
//! `tests/inject/NAME.golden.yaml`, then injects that output again and
//! expects it unchanged (idempotence).
//!
//! The golden files hold `{VERSION}` where weftctl's version appears (the
//! default image tag, the `weft.dev/injected` annotation), so a version bump
//! does not touch them. After an intended change of the output, regenerate
//! them with
//!
//!     WEFT_BLESS=1 cargo nextest run -p weft-control-plane --test inject
//!
//! and review the diff before committing it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use support::weftctl::{Run, run_offline, run_offline_with_stdin};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn input(name: &str) -> PathBuf {
    dir().join(format!("{name}.yaml"))
}

/// Injects `tests/inject/NAME.yaml` with `flags` (by `-f`), compares stdout
/// with the golden file (or rewrites it under WEFT_BLESS), checks that
/// standard input gives the same, and that injecting the output again
/// changes nothing. Returns the run.
fn golden(name: &str, flags: &[&str]) -> Run {
    let file = input(name);
    let mut args = vec!["inject", "-f", file.to_str().unwrap()];
    args.extend_from_slice(flags);
    let r = run_offline(&args);
    assert_eq!(r.code, 0, "weftctl {args:?}: {}", r.all());

    let golden = dir().join(format!("{name}.golden.yaml"));
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::write(&golden, r.stdout.replace(VERSION, "{VERSION}")).unwrap();
    } else {
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (WEFT_BLESS=1 writes it)", golden.display()))
            .replace("{VERSION}", VERSION);
        assert!(
            r.stdout == want,
            "weftctl {args:?} differs from {} (WEFT_BLESS=1 rewrites it):\n{}",
            golden.display(),
            similar::TextDiff::from_lines(&want, &r.stdout)
                .unified_diff()
                .header("golden", "weftctl")
        );
    }

    // The same from standard input, with the flags after it.
    let mut stdin_args = vec!["inject"];
    stdin_args.extend_from_slice(flags);
    let text = std::fs::read_to_string(&file).unwrap();
    let from_stdin = run_offline_with_stdin(&stdin_args, &text);
    assert_eq!(
        (from_stdin.code, &from_stdin.stdout, &from_stdin.stderr),
        (0, &r.stdout, &r.stderr),
        "standard input"
    );

    // Idempotence: the output injected again is the output.
    let mut again_args = vec!["inject", "-f", "-"];
    again_args.extend_from_slice(flags);
    let again = run_offline_with_stdin(&again_args, &r.stdout);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again.stdout == r.stdout,
        "injecting {name}'s output again changed it:\n{}",
        similar::TextDiff::from_lines(&r.stdout, &again.stdout)
            .unified_diff()
            .header("once", "twice")
    );
    r
}

#[test]
fn billing_example_stripped_of_its_sidecar_gets_it_back() {
    let r = golden("billing", &[]);
    assert_eq!(
        r.stderr,
        "deployment/billing injected (service billing)\n",
        "{}",
        r.all()
    );
    // What the hand-written sidecar in examples/deploy has, the injected
    // one has too (ports are prefixed: names are unique within a pod).
    for needle in [
        "image: ghcr.io/weft-mesh/weft:",
        "- $(POD_IP):4143",
        "fieldPath: status.podIP",
        "path: /ready",
        "path: /live",
        "name: billing-weft\n",
        "secretName: billing-weft-tls\n",
        "mountPath: /etc/weft/tls\n",
        "mountPath: /var/lib/weft-proxy\n",
        "value: http://127.0.0.1:4140\n",
        "terminationGracePeriodSeconds: 30\n",
        "weft.dev/service: billing\n",
    ] {
        assert!(r.stdout.contains(needle), "no {needle:?} in\n{}", r.stdout);
    }
}

#[test]
fn deployment_with_two_app_containers() {
    let r = golden("deployment", &[]);
    assert_eq!(r.stderr, "deployment/shop injected (service shop)\n");
}

#[test]
fn statefulset() {
    golden("statefulset", &[]);
}

#[test]
fn pod_with_flags() {
    let r = golden(
        "pod",
        &[
            "--no-tls",
            "--image",
            "registry.example/weft:dev",
            "--memory-limit",
            "128Mi",
            "--cpu-limit",
            "500m",
        ],
    );
    assert!(!r.stdout.contains("weft-tls"), "{}", r.stdout);
    assert_eq!(r.stderr, "pod/debug-shell injected (service toolbox)\n");
}

#[test]
fn cronjob_gets_a_native_sidecar() {
    golden("cronjob", &[]);
}

#[test]
fn multi_document_file_with_a_service_and_a_config_map() {
    let r = golden("multi", &[]);
    assert_eq!(r.stdout.matches("\n---\n").count(), 2, "{}", r.stdout);
}

#[test]
fn list_items_are_injected() {
    let r = golden("list", &[]);
    assert_eq!(
        r.stderr,
        "daemonset/node-agent injected (service node-agent)\n"
    );
}

#[test]
fn an_injected_manifest_is_refreshed_in_place() {
    // An older injection (another image, version and memory limit, and the
    // app's HTTP_PROXY already there): the sidecar is replaced where it is,
    // nothing is added twice.
    let r = golden("already-injected", &[]);
    assert_eq!(r.stdout.matches("name: HTTP_PROXY").count(), 1);
    assert_eq!(r.stdout.matches("name: weft-proxy").count(), 1);
    assert_eq!(r.stdout.matches("name: weft-config").count(), 2);
    assert!(!r.stdout.contains("0.0.9"), "{}", r.stdout);
}

#[test]
fn disabled_workloads_are_left_alone() {
    let r = golden("disabled", &[]);
    assert!(!r.stdout.contains("weft-proxy"), "{}", r.stdout);
    assert_eq!(
        r.stderr,
        "deployment/legacy skipped (weft.dev/inject: disabled)\n"
    );
}

#[test]
fn a_bad_service_name_fails_naming_the_file_and_document() {
    let file = input("bad-service");
    let r = run_offline(&["inject", "-f", file.to_str().unwrap()]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    assert_eq!(
        r.stderr,
        format!(
            "error: {}: document 2 (Deployment billing-api): invalid service name \
             \"Billing_API\": character 'B' is not allowed; use lowercase letters, digits, \
             '-', '.' and '_' (from the app.kubernetes.io/name label; give another with \
             --service or the weft.dev/service annotation)\n",
            file.display()
        )
    );
    // --service names every pod, so the same file then injects.
    let r = run_offline(&[
        "inject",
        "-f",
        file.to_str().unwrap(),
        "--service",
        "billing-api",
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
}

#[test]
fn yaml_errors_name_the_document_and_the_line() {
    let r = run_offline_with_stdin(
        &["inject"],
        "kind: ConfigMap\n---\nkind: Pod\nmetadata:\n  name: [x\n",
    );
    assert_eq!((r.code, r.stdout.as_str()), (1, ""), "{}", r.all());
    assert!(
        r.stderr
            .starts_with("error: <stdin>: document 2: invalid YAML: ")
            && r.stderr.contains(" at line "),
        "{}",
        r.all()
    );
    let r = run_offline_with_stdin(&["inject"], "apiVersion: v1\nmetadata: {}\n");
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.stderr, "error: <stdin>: document 1: no `kind`\n");
    // A missing file, an invalid flag value.
    let r = run_offline(&["inject", "-f", "/nonexistent/app.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .starts_with("error: reading /nonexistent/app.yaml: "),
        "{}",
        r.all()
    );
    let r = run_offline(&["inject", "--memory-limit", "64MB"]);
    assert_eq!(r.code, 2, "{}", r.all());
}
