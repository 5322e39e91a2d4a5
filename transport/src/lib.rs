//! Weft's transport: how bytes reach an endpoint and how connections reach
//! the sidecar.
//!
//! # Layout
//!
//! | module | responsibility |
//! |---|---|
//! | [`client`] | pooled HTTP/1.1 and HTTP/2 connections to endpoints, plaintext or mTLS |
//! | [`pool`] | one endpoint's connections: HTTP/1.1 idle lists over `hyper::client::conn`, multiplexed HTTP/2 over `h2` (up to the peer's stream limit), idle timeouts |
//! | [`forward`] | the mechanics of the last hop: cleaning a request once, classifying send failures, joining upgrades |
//! | [`server`] | the listeners' accept loop, connection caps and hyper's limits, HTTP/1.1 + HTTP/2 serving (plaintext or mTLS, detected per connection) with graceful shutdown |
//! | [`tls`] | mTLS between sidecars: identity, rotation, handshakes on both sides, the caller's identity |
//! | [`io`] | byte and connection counting on the listeners' client connections |
//!
//! This crate depends on `weft-core` only among Weft's crates: it knows
//! nothing of services, policies or metrics registries. What it counts it
//! counts into handles the sidecar registers ([`io::ConnectionMetrics`]), and
//! what it observes of handshakes it reports through a trait the sidecar
//! implements ([`tls::HandshakeObserver`]).

pub mod client;
pub mod forward;
pub mod io;
pub mod pool;
pub mod server;
pub mod tls;
