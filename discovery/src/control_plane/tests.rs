//! The client against a scripted control plane ([`super::mock`]): what the
//! real server cannot easily be made to do (fail registrations, push invalid
//! or out-of-order messages) and what the client must send (the whole
//! subscription set on every stream, register/deregister in order).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_api::v1::register_request::Msg;
use weft_api::{InstanceRecord, v1};

use super::mock::{Mock, MockServer};
use super::*;

const SOON: Duration = Duration::from_secs(5);

/// Polls `f` until it holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start(
    addresses: Vec<String>,
    registration: Option<Registration>,
) -> (ControlPlaneClient, CancellationToken) {
    let stop = CancellationToken::new();
    let client = ControlPlaneClient::start(
        addresses,
        registration,
        None,
        None,
        None,
        &TaskTracker::new(),
        stop.clone(),
    );
    (client, stop)
}

fn registration() -> Registration {
    Registration {
        record: InstanceRecord {
            service: "billing".parse().unwrap(),
            id: "billing-1".to_owned(),
            address: "127.0.0.1:5001".parse().unwrap(),
            metadata: weft_config::Metadata::default(),
            admin_address: None,
            health: weft_api::Health::Healthy,
        },
    }
}

fn service(name: &str, port: u16) -> v1::ServiceState {
    v1::ServiceState {
        name: name.to_owned(),
        instances: vec![v1::Instance {
            service: name.to_owned(),
            id: format!("{name}-{port}"),
            address: format!("127.0.0.1:{port}"),
            metadata: None,
            admin_address: String::new(),
            health: 0,
        }],
        policy_toml: String::new(),
        live_instances: 1,
        policy_refused: false,
    }
}

fn connected(client: &ControlPlaneClient) -> bool {
    matches!(client.state(), ConnectionState::Connected { .. })
}

#[tokio::test]
async fn a_failed_registration_is_retried_without_dropping_the_subscription() {
    let mock = Mock::default();
    mock.state.fail_registers.store(2, Ordering::SeqCst);
    let server = MockServer::start(mock.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (client, stop) = start(vec![server.url()], Some(registration()));

    eventually("registered on the third try", || {
        mock.state.registers.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(
        mock.state.subscribes.load(Ordering::SeqCst),
        1,
        "one subscription throughout"
    );
    assert!(connected(&client));
    // The own service is subscribed from the start.
    assert_eq!(mock.subscribe_requests()[0].add, ["billing"]);
    stop.cancel();
}

#[tokio::test]
async fn addresses_are_tried_in_turn() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = MockServer::start(Mock::default(), "127.0.0.1:0".parse().unwrap()).await;
    let (client, stop) = start(vec![format!("http://{dead}"), server.url()], None);
    eventually("connected to the second address", || {
        client.state()
            == ConnectionState::Connected {
                address: server.url(),
            }
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn no_usable_address_serves_nothing_and_says_why() {
    let (client, stop) = start(vec!["https://weft-cp.internal:8443".to_owned()], None);
    eventually("disconnected", || {
        matches!(client.state(), ConnectionState::Disconnected { ref error, .. }
            if error.contains("no usable control-plane address"))
    })
    .await;
    assert!(
        client
            .service("billing", Duration::from_millis(10))
            .await
            .is_none()
    );
    stop.cancel();
}

#[tokio::test]
async fn invalid_and_stale_pushes_are_refused_and_counted() {
    let mock = Mock::default();
    let script = mock.script();
    let server = MockServer::start(mock.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (client, stop) = start(vec![server.url()], None);
    client.subscribe("billing").unwrap();
    eventually("connected", || connected(&client)).await;

    let push = |version, full, services| v1::SubscribeResponse {
        version,
        full,
        services,
        removed: Vec::new(),
        warming: false,
    };
    script
        .send(push(5, true, vec![service("billing", 7001)]))
        .await
        .unwrap();
    let billing = client.service("billing", SOON).await.unwrap();
    assert_eq!(billing.endpoints[0].addr.port(), 7001);

    let mut bad = service("billing", 7002);
    bad.policy_toml = "service = \"orders\"\n".to_owned();
    script.send(push(6, false, vec![bad])).await.unwrap();
    eventually("the refusal is counted", || client.rejected().0 == 1).await;
    let (_, last) = client.rejected();
    assert!(
        last.unwrap()
            .contains("the pushed policy is for service \"orders\"")
    );
    assert_eq!(client.snapshot().borrow().version, 6);

    // Older than the last accepted: ignored, not counted.
    script
        .send(push(4, false, vec![service("billing", 7003)]))
        .await
        .unwrap();
    // A later valid one still applies.
    script
        .send(push(7, false, vec![service("billing", 7004)]))
        .await
        .unwrap();
    eventually("the later push", || client.snapshot().borrow().version == 7).await;
    let billing = client.service("billing", SOON).await.unwrap();
    assert_eq!(billing.endpoints[0].addr.port(), 7004);
    assert_eq!(client.rejected().0, 1);
    stop.cancel();
}

#[tokio::test]
async fn a_reconnection_resends_the_whole_subscription_set_and_registers_again() {
    let mock = Mock::default();
    let server = MockServer::start(mock.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr: SocketAddr = server.addr;
    let (client, stop) = start(vec![server.url()], Some(registration()));
    assert!(client.service("orders", SOON).await.is_none(), "missing");
    client.subscribe("payments").unwrap();
    eventually("both subscribed", || {
        let names: Vec<String> = mock
            .subscribe_requests()
            .into_iter()
            .flat_map(|r| r.add)
            .collect();
        names.len() == 3
    })
    .await;
    eventually("registered", || {
        mock.state.registers.load(Ordering::SeqCst) == 1
    })
    .await;
    let before = client.snapshot().borrow().clone();

    server.kill().await;
    eventually("disconnected", || {
        matches!(client.state(), ConnectionState::Disconnected { .. })
    })
    .await;
    assert!(
        Arc::ptr_eq(&client.snapshot().borrow(), &before),
        "nothing cleared"
    );

    let again = Mock::default();
    let _server = MockServer::start(again.clone(), addr).await;
    eventually("resubscribed", || !again.subscribe_requests().is_empty()).await;
    assert_eq!(
        again.subscribe_requests()[0].add,
        ["billing", "orders", "payments"]
    );
    eventually("registered again", || {
        again.state.registers.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(connected(&client));
    stop.cancel();
}

#[tokio::test]
async fn deregistering_sends_deregister_and_never_registers_again() {
    let mock = Mock::default();
    let server = MockServer::start(mock.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let (client, stop) = start(vec![server.url()], Some(registration()));
    eventually("registered", || {
        mock.state.registers.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("open", || {
        client.shared.registrar.phase() == register::Phase::Open
    })
    .await;

    assert_eq!(client.deregister(SOON).await, Deregistered::Acknowledged);
    let messages = mock.register_requests();
    assert!(matches!(messages[0].msg, Some(Msg::Register(_))));
    assert!(matches!(messages[1].msg, Some(Msg::Deregister(_))));
    assert!(connected(&client), "the subscription goes on");

    // After a reconnection: subscribed again, not registered again.
    server.kill().await;
    let again = Mock::default();
    let _server = MockServer::start(again.clone(), addr).await;
    eventually("resubscribed", || !again.subscribe_requests().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(again.state.registers.load(Ordering::SeqCst), 0);
    stop.cancel();
}

#[tokio::test]
async fn deregister_is_bounded_by_its_timeout() {
    let mock = Mock::default();
    mock.state.ignore_deregister.store(true, Ordering::SeqCst);
    let server = MockServer::start(mock.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (client, stop) = start(vec![server.url()], Some(registration()));
    eventually("open", || {
        client.shared.registrar.phase() == register::Phase::Open
    })
    .await;

    let started = Instant::now();
    let outcome = client.deregister(Duration::from_millis(200)).await;
    assert_eq!(outcome, Deregistered::TimedOut);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    eventually("the deregister was sent", || {
        mock.register_requests().len() == 2
    })
    .await;

    // Once the stream is gone there is nothing to wait for: the deregister that
    // was sent stays unconfirmed, and asking again answers at once.
    server.kill().await;
    eventually("disconnected", || {
        matches!(client.state(), ConnectionState::Disconnected { .. })
    })
    .await;
    let started = Instant::now();
    assert_eq!(
        client.deregister(Duration::from_secs(5)).await,
        Deregistered::Unconfirmed
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    stop.cancel();
}
