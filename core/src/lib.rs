//! Weft's data-plane vocabulary, shared by the sidecar's layers, its
//! transport and the in-process client: what a request is checked against
//! and what a refusal is. It knows no listener, socket, TLS or telemetry.
//!
//! # Layout
//!
//! | module | responsibility |
//! |---|---|
//! | [`error`] | proxy failures, their `weft-reason`, HTTP status and gRPC status |
//! | [`body`] | streaming body types and body-lifetime guards |
//! | [`headers`] | Weft's header names, hop-by-hop removal, forwarding headers |
//! | [`framing`] | HTTP/1 request framing followed on the raw bytes |
//! | [`screen`] | checks every request passes first: URI length, HTTP/1 framing, inbound authority |
//! | [`target`] | a request's logical destination |
//! | [`route`] | route matching |
//! | [`policy`] | service policies compiled for the request path (which side enforces what) |
//! | [`limits`] | rate limits (governor) and concurrency caps |
//! | [`fault`] | a route's fault injection (delays, aborts), compiled where permitted |
//! | [`hedge`] | a route's hedging settings and the latency estimate of `after = "p95"` |
//! | [`retry`] | retry classification, budgets, backoff, replayable bodies |
//! | [`authz`] | who may call the local service: `allow` lists and `[tls] default_inbound` |
//! | [`identity`] | the caller identity an mTLS client certificate proves |
//! | [`context`] | what one request's layers tell each other and its observation (labels, tries, retries) |
//! | [`stats`] | counters of requests, retries, ejections and refusals (for `/endpoints`) |
//! | [`endpoint_spec`] | an endpoint as discovery describes it |

pub mod authz;
pub mod body;
pub mod context;
pub mod endpoint_spec;
pub mod error;
pub mod fault;
pub mod framing;
pub mod headers;
pub mod hedge;
pub mod identity;
pub mod limits;
pub mod policy;
pub mod retry;
pub mod route;
pub mod screen;
pub mod stats;
pub mod target;
