//! Weft's sidecar proxy.
//!
//! # Layout
//!
//! The sidecar is wired from Weft's crates, each depending only on those
//! below it (ARCHITECTURE.md has the map):
//!
//! | crate | holds |
//! |---|---|
//! | `weft-core` | the data-plane vocabulary: errors and reasons, bodies, headers, framing and screening, destinations, routes, compiled policies, limits, retries, authorization, stats |
//! | `weft-transport` | endpoint connections, listeners and protocol detection, mesh TLS, I/O counting |
//! | `weft-discovery` | the directory, endpoint sets and balancer state, DNS, the control-plane client, the app's health |
//! | `weft-stack` | the data plane as tower layers, one stage per file |
//! | `weft-proxy` (this one) | start-up, state, both stacks, telemetry, the admin API |
//!
//! This crate's modules:
//!
//! | module | responsibility |
//! |---|---|
//! | [`startup`] | `weft-proxy run`: start-up, signals, reload, drain and exit; the listener-less start of `weft-client` |
//! | [`state`] | the effective config and directory snapshots, readiness, reload, the state `/metrics` copies into gauges |
//! | [`outbound`] | the outbound stack (the app's calls to other services), built top to bottom; discovery of a request's destination |
//! | [`inbound`] | the inbound stack (other sidecars' calls to the local app), built top to bottom |
//! | [`activator`] | the call that tells a platform a service scaled to zero needs an instance (`outbound.cold_start.activate`) |
//! | [`admin`] | `/live`, `/ready`, `/config`, `/endpoints`, `POST /reload` |
//! | [`telemetry`] | `/metrics`, request spans (OTLP), the access log, and the observation every finished request is reported through (the stack's `Observer`) |
//! | `fuzzing` (hidden) | what the fuzz targets in `fuzz/` run on each input |
//!
//! Requests flow `server -> outbound|inbound`, whose stacks of `weft-stack`
//! layers are built here. Live state reaches the request path as `Arc`
//! snapshots read from `watch` channels; nothing on the request path holds a
//! lock across an await.

pub mod activator;
pub mod admin;
#[doc(hidden)]
pub mod fuzzing;
pub mod inbound;
pub mod outbound;
pub mod startup;
pub mod state;
pub mod telemetry;
