//! The control plane's gRPC API driven by hand, as a sidecar would: a
//! channel and client for a plaintext control plane ([`channel`],
//! [`client`]) and a registration
//! stream kept open for the test ([`register`], [`try_register`]).
//!
//! Used by the control plane's own black-box tests (`control-plane/tests`)
//! and by the scenarios that talk to it without a sidecar (mTLS identity
//! checks). A registration counts as accepted once its first response
//! arrived; after that a background task keeps reading the responses so
//! the stream stays healthy, and dropping the returned sender ends it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::sync::mpsc;
use tonic::transport::Channel;
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{Instance, RegisterRequest, RegisterResponse, register_request};

/// A channel to the plaintext control plane at `url` (`http://host:port`).
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap_or_else(|e| panic!("{url} is not a gRPC address: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to the control plane at {url}: {e}"))
}

/// A client of the plaintext control plane at `url`.
pub async fn client(url: &str) -> ControlPlaneClient<Channel> {
    ControlPlaneClient::new(channel(url).await)
}

/// Registers `inst` over `channel`: the sender that keeps the
/// registration open (and sends health reports or a deregistration) and
/// the first response; or the refusal, whether it came as the call's
/// status or in place of the first response.
pub async fn try_register(
    channel: Channel,
    inst: Instance,
) -> Result<(mpsc::Sender<RegisterRequest>, RegisterResponse), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(RegisterRequest {
        msg: Some(register_request::Msg::Register(inst)),
    })
    .await
    .expect("the receiver is alive");
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut responses = ControlPlaneClient::new(channel)
        .register(stream)
        .await?
        .into_inner();
    let first = responses.message().await?.ok_or_else(|| {
        tonic::Status::unavailable("the register stream ended before its first response")
    })?;
    tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
    Ok((tx, first))
}

/// Registers `inst` with the plaintext control plane at `url` and checks
/// the first response (a lease TTL of at least a second, a store
/// revision); panics if it is refused. The sender keeps it open.
pub async fn register(url: &str, inst: Instance) -> mpsc::Sender<RegisterRequest> {
    let (tx, first) = try_register(channel(url).await, inst)
        .await
        .unwrap_or_else(|status| panic!("the registration was refused: {status:?}"));
    assert!(first.lease_ttl_ms >= 1000, "{first:?}");
    assert!(first.revision > 0, "{first:?}");
    tx
}
