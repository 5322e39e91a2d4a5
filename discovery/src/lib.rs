//! Weft's discovery: the services a sidecar can call and their endpoints.
//!
//! # Layout
//!
//! | module | responsibility |
//! |---|---|
//! | [`directory`] | the services this sidecar can call (static, DNS, pushed), with their compiled policies and clients, rebuilt on reload |
//! | [`remote`] | services pushed by the control plane, shaped like directory services |
//! | [`endpoints`] | endpoint sets fed by updates, read on the request path without a lock |
//! | [`dns`] | DNS discovery: a name's addresses as endpoint updates |
//! | [`balance`] | endpoints, their load and outlier state, and the pick strategies |
//! | [`control_plane`] | the control-plane client: subscriptions, registration, the pushed snapshot and its cache |
//! | [`health`] | the sidecar's check of its own app (the health it registers): the state machine, TCP and HTTP probes |
//! | [`slot`] | a value the crates above build for a service on first use (its layer stack), dropped with it |
//! | [`enforcement`] | service-side policy keys that nothing may enforce (a caller's plaintext static services) |
//!
//! Among Weft's crates this one depends on `weft-core` (policies, endpoint
//! descriptions) and `weft-transport` (each service's client, each
//! endpoint's pools, mesh TLS). It imports no metrics: what the sidecar
//! exports about discovery it reads from the state this crate publishes.

pub mod balance;
pub mod control_plane;
pub mod directory;
pub mod dns;
pub mod endpoints;
pub mod enforcement;
pub mod health;
pub mod remote;
pub mod slot;
