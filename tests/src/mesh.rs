//! The two sidecars a service policy is enforced by, each started in one call;
//! and, for meshes run by a control plane, an instance's sidecar that
//! registers ([`registered`]), a caller that names no address at all
//! ([`mesh_caller`]), either of them with mTLS ([`mesh_sidecar`]), what
//! their `/endpoints` says ([`endpoint_addrs`], [`until_endpoints`],
//! [`control_plane_state`]), and a whole such mesh started in one call
//! ([`Mesh::builder`], in `mesh/builder.rs`).
//!
//! A policy file has two audiences: the sidecar of each *caller* enforces the
//! `[outbound]` keys, routes' timeouts and retries and `[[splits]]` when it
//! calls the service (the file is named by the caller's `[[directory.services]]
//! policy`), and the service's *own* sidecar enforces `[inbound]` and routes'
//! rate limits and concurrency caps (named by its `[service] policy`). Scenarios
//! write only the policy body (`[inbound]`, `[outbound]`, `[[routes]]`, ...);
//! these helpers add the `service` key and the bootstrap around it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::ensure;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::config::{Bootstrap, DirService, policy_file};
use crate::eventually;
use crate::process::{Proxy, ProxyBuilder};
use crate::tls::Pki;

mod builder;

pub use builder::{Instance, Mesh, MeshBuilder};

/// A caller-only sidecar (no `[service]`) whose directory has `service`, with
/// `policy_body` as that service's policy file.
pub async fn caller(service: DirService, policy_body: &str) -> anyhow::Result<Proxy> {
    caller_with(Bootstrap::new(), service, policy_body).await
}

/// Like [`caller`], on top of `bootstrap` (e.g. one with its own `[service]`,
/// to give the caller an identity or a zone).
pub async fn caller_with(
    bootstrap: Bootstrap,
    service: DirService,
    policy_body: &str,
) -> anyhow::Result<Proxy> {
    let name = service.name().to_owned();
    let file = format!("{name}.toml");
    Proxy::builder(bootstrap.service(service.policy(&file)).render())
        .file(&file, policy_file(&name, policy_body))
        .start()
        .await
}

/// The own sidecar of service `name` in front of `app`, one of `instances`
/// instances, with `policy_body` as its `[service] policy`.
pub async fn callee(
    name: &str,
    app: SocketAddr,
    instances: u32,
    policy_body: &str,
) -> anyhow::Result<Proxy> {
    callee_with(Bootstrap::new(), name, app, instances, policy_body).await
}

/// Like [`callee`], on top of `bootstrap` (e.g. one with `[telemetry]`).
pub async fn callee_with(
    bootstrap: Bootstrap,
    name: &str,
    app: SocketAddr,
    instances: u32,
    policy_body: &str,
) -> anyhow::Result<Proxy> {
    let file = format!("{name}.toml");
    let bootstrap = bootstrap
        .app(name, app)
        .app_policy(&file)
        .instances(instances);
    Proxy::builder(bootstrap.render())
        .file(&file, policy_file(name, policy_body))
        .start()
        .await
}

/// The sidecar of instance `id` of service `name` in front of `app`,
/// registering with the control plane at `addresses` (no static directory).
pub async fn registered(
    name: &str,
    id: &str,
    app: SocketAddr,
    addresses: &[String],
) -> anyhow::Result<Proxy> {
    mesh_sidecar(Bootstrap::new().app(name, app).app_id(id), addresses, None)
        .start()
        .await
}

/// A caller-only sidecar whose bootstrap names no service at all: it learns
/// every destination from the control plane at `addresses`.
pub async fn mesh_caller(addresses: &[String]) -> anyhow::Result<Proxy> {
    mesh_sidecar(Bootstrap::new(), addresses, None)
        .start()
        .await
}

/// A sidecar of a mesh run by the control planes at `addresses`: `bootstrap`
/// (with `[service]` for an instance, without for a caller-only sidecar)
/// and `[control_plane]`; with `tls`, also `[tls]` and a new certificate
/// from that CA for that identity. Not started yet, so the caller can add
/// files, arguments or a log filter.
pub fn mesh_sidecar(
    bootstrap: Bootstrap,
    addresses: &[String],
    tls: Option<(&Pki, &str)>,
) -> ProxyBuilder {
    let bootstrap = bootstrap.control_plane(addresses.iter().cloned());
    match tls {
        None => Proxy::builder(bootstrap.render()),
        Some((pki, identity)) => pki.files(
            Proxy::builder(bootstrap.tls(identity, None).render()),
            identity,
            &pki.issue(identity),
        ),
    }
}

/// Every endpoint address (whatever its state) the sidecar behind `admin`
/// lists for `service` in `/endpoints`; empty when it lists no such service.
pub async fn endpoint_addrs(admin: &Admin, service: &str) -> anyhow::Result<BTreeSet<SocketAddr>> {
    let endpoints = admin.endpoints().await?;
    let Ok(entry) = endpoints.service(service) else {
        return Ok(Default::default());
    };
    let mut out = BTreeSet::new();
    for endpoint in entry["endpoints"].as_array().into_iter().flatten() {
        if let Some(addr) = endpoint["address"].as_str() {
            out.insert(addr.parse()?);
        }
    }
    Ok(out)
}

/// Waits (at most `timeout`) until `caller` lists exactly `want` as
/// `service`'s endpoints; returns how long that took.
pub async fn until_endpoints(
    caller: &Proxy,
    service: &str,
    want: &[SocketAddr],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let admin = caller.admin_client();
    let want: BTreeSet<_> = want.iter().copied().collect();
    let started = Instant::now();
    eventually(timeout, || async {
        let have = endpoint_addrs(&admin, service).await?;
        ensure!(have == want, "{service}: {have:?}, want {want:?}");
        Ok(())
    })
    .await?;
    Ok(started.elapsed())
}

/// The sidecar's control-plane connection as `/endpoints` shows it:
/// `("connected", Some(address))`, `("disconnected", None)`, ...
pub async fn control_plane_state(admin: &Admin) -> anyhow::Result<(String, Option<String>)> {
    let endpoints = admin.endpoints().await?;
    let connection = &endpoints.0["control_plane"]["connection"];
    let state = connection["state"]
        .as_str()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "/endpoints has no control_plane connection: {}",
                endpoints.0
            )
        })?
        .to_owned();
    Ok((state, connection["address"].as_str().map(str::to_owned)))
}
