//! The two sidecars a service policy is enforced by, each started in one call.
//!
//! A policy file has two audiences: the sidecar of each *caller* enforces the
//! `[outbound]` keys, routes' timeouts and retries and `[[splits]]` when it
//! calls the service (the file is named by the caller's `[[directory.services]]
//! policy`), and the service's *own* sidecar enforces `[inbound]` and routes'
//! rate limits and concurrency caps (named by its `[service] policy`). Scenarios
//! write only the policy body (`[inbound]`, `[outbound]`, `[[routes]]`, ...);
//! these helpers add the `service` key and the bootstrap around it.

use std::net::SocketAddr;

use crate::config::{Bootstrap, DirService, policy_file};
use crate::process::Proxy;

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
