//! gRPC and admin-API clients for black-box tests of a running
//! `weft-control-plane`: registrations, subscriptions and policy writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::sync::mpsc;
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{
    Instance, Metadata, RegisterRequest, SubscribeRequest, SubscribeResponse, register_request,
};

use weft_tests::control_plane::TOKEN;

pub fn instance(service: &str, id: &str, port: u16) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        metadata: Some(Metadata {
            zone: "z1".into(),
            weight: 100,
            weight_set: true,
            ..Default::default()
        }),
        admin_address: String::new(),
        health: 0,
    }
}

pub async fn client(grpc: &str) -> ControlPlaneClient<tonic::transport::Channel> {
    ControlPlaneClient::connect(grpc.to_owned()).await.unwrap()
}

/// Open a registration; returns the sender that keeps it open.
pub async fn register(grpc: &str, inst: Instance) -> mpsc::Sender<RegisterRequest> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(RegisterRequest {
        msg: Some(register_request::Msg::Register(inst)),
    })
    .await
    .unwrap();
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut responses = client(grpc)
        .await
        .register(stream)
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert!(first.lease_ttl_ms >= 1000, "{first:?}");
    assert!(first.revision > 0);
    // Keep reading responses in the background so the stream stays healthy.
    tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
    tx
}

pub struct Subscription {
    pub _tx: mpsc::Sender<SubscribeRequest>,
    pub rx: tonic::Streaming<SubscribeResponse>,
}

pub async fn subscribe(grpc: &str, services: &[&str]) -> Subscription {
    let (tx, rx) = mpsc::channel(4);
    tx.send(SubscribeRequest {
        add: services.iter().map(|s| (*s).to_owned()).collect(),
        remove: vec![],
    })
    .await
    .unwrap();
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let rx = client(grpc)
        .await
        .subscribe(stream)
        .await
        .unwrap()
        .into_inner();
    Subscription { _tx: tx, rx }
}

impl Subscription {
    pub async fn next(&mut self) -> SubscribeResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("no push within 5 s")
            .unwrap()
            .expect("the stream ended")
    }

    /// Read pushes until `ok` holds for one; returns it.
    pub async fn until(&mut self, ok: impl Fn(&SubscribeResponse) -> bool) -> SubscribeResponse {
        loop {
            let msg = self.next().await;
            if ok(&msg) {
                return msg;
            }
        }
    }
}

pub fn instances_of(msg: &SubscribeResponse, service: &str) -> Option<Vec<String>> {
    msg.services
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.instances.iter().map(|i| i.id.clone()).collect())
}

/// `PUT /v1/services/<service>/policy` with the test token; the status code.
pub async fn put_policy(admin: &str, service: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = admin.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "PUT /v1/services/{service}/policy HTTP/1.1\r\nhost: cp\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}
