//! gRPC and admin-API clients for black-box tests of a running
//! `weft-control-plane`: instances to register, subscriptions and policy
//! writes. Registrations themselves are weft-tests' (`weft_tests::grpc`),
//! shared with the mesh scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::sync::mpsc;
use weft_api::v1::{Instance, Metadata, SubscribeRequest, SubscribeResponse};

use weft_tests::control_plane::TOKEN;
use weft_tests::grpc::client;

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
