//! Weft's sidecar proxy.
//!
//! # Layout
//!
//! The data-plane vocabulary (errors, bodies, headers, framing and
//! screening, destinations, routes, compiled policies, limits, retries,
//! authorization, stats) is `weft-core`'s, re-exported here under the same
//! module paths. This crate's own modules:
//!
//! | module | responsibility |
//! |---|---|
//! | [`startup`] | `weft-proxy run`: start-up, signals, reload, drain and exit; the listener-less start of `weft-client` |
//! | [`state`] | the effective config and directory snapshots, readiness, reload, the state `/metrics` copies into gauges |
//! | [`server`] | accept loop, connection caps and hyper's limits, HTTP/1.1 + HTTP/2 serving with graceful shutdown |
//! | [`stack`] | the data plane as tower layers, one stage per file: observe, respond, screen, route, authorize, rate limit, concurrency, forwarded headers, timeout, retry, balance, endpoint client |
//! | [`outbound`] | the outbound stack (the app's calls to other services), built top to bottom; discovery of a request's destination |
//! | [`inbound`] | the inbound stack (other sidecars' calls to the local app), built top to bottom |
//! | [`health`] | the sidecar's check of its own app: the state machine, TCP and HTTP probes |
//! | [`admin`] | `/live`, `/ready`, `/config`, `/endpoints`, `POST /reload` |
//! | [`directory`] | the services this sidecar can call, rebuilt on reload |
//! | [`remote`] | services pushed by the control plane, shaped like directory services |
//! | [`discovery`] | endpoint sets fed by updates; DNS discovery |
//! | [`control_plane`] | the control-plane client: subscriptions, registration, the pushed snapshot and its cache |
//! | [`balance`] | endpoints, their load, and the pick strategies |
//! | [`forward`] | the mechanics of the last hop: cleaning a request once, classifying send failures, joining upgrades |
//! | [`client`] | pooled HTTP/1.1 and HTTP/2 connections to endpoints, plaintext or mTLS |
//! | [`tls`] | mTLS between sidecars: identity, rotation, handshakes on both sides, [`tls::CallerIdentity`] |
//! | [`enforcement`] | service-side policy keys that nothing may enforce (a caller's plaintext static services) |
//! | `fuzzing` (hidden) | what the fuzz targets in `fuzz/` run on each input |
//! | [`telemetry`] | `/metrics`, request spans (OTLP), the access log, and the observation every finished request is reported through |
//!
//! Requests flow `server -> outbound|inbound`, whose stacks of [`stack`] layers
//! use `screen`, `route`, `limits`, `retry`, `directory`, `discovery`, `balance`,
//! `forward` and `client` (ARCHITECTURE.md draws both stacks). Live state reaches
//! the request path as `Arc` snapshots read from `watch` channels; nothing on the
//! request path holds a lock across an await.

// The data-plane vocabulary lives in `weft-core`; its modules keep their
// paths here.
pub use weft_core::{
    authz, body, endpoint_spec, error, framing, headers, limits, policy, retry, route, screen,
    stats, target,
};

pub mod admin;
pub mod balance;
pub mod client;
pub mod control_plane;
pub mod directory;
pub mod discovery;
pub mod enforcement;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod inbound;
pub mod outbound;
pub mod remote;
pub mod server;
pub mod stack;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod tls;
