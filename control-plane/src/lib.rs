//! Weft's control plane: it keeps the service directory and every service's
//! policy in a store and pushes them to sidecars.
//!
//! Replicas are stateless: every piece of state lives in the [`store`], which
//! is etcd in production or an embedded in-memory store for one machine
//! (`--dev`). Both implement one [`store::Store`] trait and pass one
//! conformance suite (`tests/store_conformance.rs`), so everything above the
//! store is written once.
//!
//! # Layout
//!
//! - [`store`]: the `Store` trait, its value types and errors, and the lease
//!   keep-alive helper.
//! - [`store::memory`]: the embedded store.
//! - [`store::etcd`]: the etcd store.
//! - [`keys`]: the key layout (`services/<name>/policy`, `services/<name>/instances/<id>`).
//! - [`view`]: one watch on the store, kept in memory as the directory every
//!   subscriber is served from.
//! - [`admin`]: the admin API `weftctl` uses; [`auth`]: its bearer tokens.
//! - [`push`]: the sidecar-facing gRPC API: registration with leases, and the
//!   push of the directory and policies (full snapshot, then coalesced deltas).
//! - [`serve`]: the HTTP server loops; [`tls`]: mTLS on the gRPC listener
//!   (the mesh CA, the client's service, reloading the files).
//! - [`tasks`]: the owner of every spawned task (one tracker, one
//!   cancellation token), which shutdown stops and awaits.
//! - [`metrics`]: the Prometheus metrics on the admin listener's `/metrics`,
//!   and the store wrapper that counts store errors.
//! - [`inject`]: what `weftctl inject` does to Kubernetes manifests: the
//!   weft-proxy sidecar, its volumes and the app containers' HTTP_PROXY.
//! - [`scrape`]: fetching a sidecar's admin endpoints (`/metrics`, ...),
//!   for `weftctl stat` and the web view.
//! - [`ui`]: the web view on the admin listener (`/ui`): its pages, and the
//!   sampler that fetches the sidecars' admin endpoints for it.
//! - [`stat`]: what `weftctl stat` computes from the sidecars' metrics: the
//!   exposition parser, counter increases, rates and latency quantiles.

pub mod admin;
pub mod auth;
pub mod inject;
pub mod keys;
pub mod metrics;
pub mod push;
pub mod scrape;
pub mod serve;
pub mod stat;
pub mod store;
pub mod tasks;
pub mod tls;
pub mod ui;
pub mod view;

/// This build's version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this build is from (`git rev-parse --short HEAD` at build
/// time, or the `WEFT_GIT_COMMIT` environment variable), "unknown" without
/// git.
pub const COMMIT: &str = env!("WEFT_GIT_COMMIT");
