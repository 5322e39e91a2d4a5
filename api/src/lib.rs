//! Weft's wire protocol between sidecars (`weft-proxy`) and the control plane
//! (`weft-control-plane`): the gRPC service `weft.v1.ControlPlane`, its
//! messages, a generated client and server (tonic), and conversions between
//! the wire types and the typed values the rest of Weft uses.
//!
//! Sidecars talk only to the control plane, never to etcd; the control plane
//! holds one watch per etcd prefix and fans changes out from memory.
//!
//! # Registration (`Register`)
//!
//! A sidecar with a `[service]` section opens one bidirectional `Register`
//! stream and keeps it open for as long as its instance should be listed.
//!
//! - The first message must be `register`, carrying the [`v1::Instance`]. The
//!   control plane writes it under a lease and answers with a
//!   [`v1::RegisterResponse`]: the lease TTL and the store revision of the
//!   write.
//! - While the stream is open the control plane keeps the lease alive.
//! - After draining, a sidecar that shuts down gracefully sends `deregister`;
//!   the instance is removed at once.
//! - `health` reports that the instance's app changed health (its sidecar
//!   checks it): the control plane rewrites the registration with it, and
//!   subscribers see the instance's [`v1::Instance`] `health`. The
//!   `register` message carries the health at the time; an older sidecar
//!   that never reports leaves it unspecified, which means healthy, and an
//!   older control plane ignores the message.
//! - A stream that just breaks (the sidecar died, or the network failed)
//!   removes nothing at once: the lease expires within its TTL and the
//!   instance disappears then. A sidecar that reconnects registers again.
//!
//! # Subscription (`Subscribe`)
//!
//! A sidecar subscribes lazily, with [`v1::SubscribeRequest`] `add`/`remove`
//! lists, to the services it calls and to its own. The control plane answers
//! with a stream of [`v1::SubscribeResponse`]s:
//!
//! - **Versions.** Each message carries `version`, the store (etcd) revision
//!   it reflects. On one stream versions never go backwards.
//! - **Full, then deltas.** The first message on a stream has `full = true`:
//!   a snapshot of every subscribed service that replaces everything the
//!   sidecar knew from earlier streams. Later messages are deltas: each
//!   [`v1::ServiceState`] in `services` is complete (the full instance set,
//!   the policy as applied, the live-instance count) and replaces that
//!   service's previous state; `removed` names subscribed services that no
//!   longer exist (no instances and no policy). Services not mentioned are
//!   unchanged. A (re)connecting sidecar therefore always starts from a full
//!   snapshot, and no delta depends on one it may have missed.
//! - **Coalescing.** Bursts of changes are coalesced: a sidecar may never see
//!   intermediate states, only a later complete one, so churn cannot storm
//!   sidecars.
//! - **Shares.** `live_instances` lets each instance take its share of a
//!   service-wide limit.
//! - **Warm-up.** A control plane that started less than its warm-up ago (a
//!   lease TTL plus the sidecars' longest reconnect backoff) may lack live
//!   instances whose registrations expired while no control plane was up, and
//!   whose sidecars have not reconnected yet. Its messages say `warming`; a
//!   sidecar then keeps the instances it knew before the stream that the
//!   stream has not mentioned, and drops them only when a message without
//!   `warming` arrives (the control plane sends a full one when its warm-up
//!   ends).
//!
//! A sidecar validates what it receives (instances through [`InstanceRecord`]'s
//! conversion, policies through `weft-config`) and keeps its previous state
//! when a push fails validation.
//!
//! # Layout
//!
//! - `proto/weft/v1/control_plane.proto`: the protocol, the source of truth.
//!   `build.rs` compiles it with `protox` (pure Rust, no system `protoc`) and
//!   `tonic-prost-build` into [`v1`].
//! - [`convert`]: [`v1::Metadata`] to and from [`weft_config::Metadata`];
//!   [`v1::Instance`] to and from [`InstanceRecord`], with a typed
//!   [`ConvertError`].

pub mod convert;

pub use convert::{ConvertError, Health, InstanceRecord};

/// The generated `weft.v1` messages, `control_plane_client` and
/// `control_plane_server`.
///
/// Generated code is clippy-clean with the workspace lints today; the allow
/// keeps a new clippy lint on code we do not write from failing the build.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}
