//! A tiny authoritative DNS server the proxy resolves names against.
//!
//! [`DnsServer`] listens on UDP `127.0.0.1:0` and, on the same port, TCP (for
//! resolvers that retry truncated answers or prefer TCP). It answers from a
//! table `name -> (IPv4 addresses, TTL)` that a test changes at run time with
//! [`DnsServer::set`]:
//!
//! - `A` for a known name: one record per address, with the table's TTL;
//! - any other type (`AAAA`...) for a known name: NOERROR with no answers;
//! - any question for an unknown name: NXDOMAIN.
//!
//! Negative answers carry an SOA with a 1 s minimum so resolvers do not cache
//! them for long. Names are compared case-insensitively and as fully qualified
//! (`svc.test` and `svc.test.` are the same). Every question is counted per
//! name, so a test can prove the proxy asked this server. Dropping the server
//! stops it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How many times to look for a port free on both UDP and TCP.
const BIND_ATTEMPTS: usize = 20;

#[derive(Debug, Default)]
struct Zone {
    records: Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>,
    queries: Mutex<HashMap<String, usize>>,
}

/// Lower-cases `name` and makes it fully qualified.
fn normalize(name: &str) -> String {
    let mut name = name.to_ascii_lowercase();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

impl Zone {
    /// Builds the answer to one request, or `None` for what is not a query.
    fn answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(request).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        if request.edns.is_some() {
            response.set_edns(Edns::new());
        }
        response.add_queries(request.queries.iter().cloned());

        let records = self.records.lock().unwrap();
        for query in &request.queries {
            let name = normalize(&query.name().to_ascii());
            *self
                .queries
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_default() += 1;
            match records.get(&name) {
                None => {
                    response.metadata.response_code = ResponseCode::NXDomain;
                    response.add_authority(negative_soa());
                }
                Some((ips, ttl)) if query.query_type() == RecordType::A => {
                    for ip in ips {
                        response.add_answer(Record::from_rdata(
                            query.name().clone(),
                            *ttl,
                            RData::A(A(*ip)),
                        ));
                    }
                    if ips.is_empty() {
                        response.add_authority(negative_soa());
                    }
                }
                Some(_) => {
                    response.add_authority(negative_soa());
                }
            }
        }
        response.to_vec().ok()
    }
}

fn negative_soa() -> Record {
    let soa = SOA::new(
        Name::from_ascii("ns.test.").expect("valid name"),
        Name::from_ascii("hostmaster.test.").expect("valid name"),
        1,
        60,
        60,
        60,
        1,
    );
    Record::from_rdata(Name::root(), 1, RData::SOA(soa))
}

/// A running test DNS server; stops on drop.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Zone>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server with an empty table on UDP and TCP `127.0.0.1:<port>`.
    pub async fn start() -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..BIND_ATTEMPTS {
            let udp = UdpSocket::bind("127.0.0.1:0")
                .await
                .context("binding UDP")?;
            let addr = udp.local_addr()?;
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let zone = Arc::new(Zone::default());
                    let tasks = vec![
                        tokio::spawn(serve_udp(udp, zone.clone())),
                        tokio::spawn(serve_tcp(tcp, zone.clone())),
                    ];
                    return Ok(Self { addr, zone, tasks });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(anyhow::anyhow!(
            "no port free on both UDP and TCP: {last_error:?}"
        ))
    }

    /// The address to put in the proxy's `[dns] servers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets `name`'s A records (an empty list answers NOERROR with no records).
    pub fn set(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.zone
            .records
            .lock()
            .unwrap()
            .insert(normalize(name), (ips.to_vec(), ttl));
    }

    /// Removes `name`, so it answers NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.zone.records.lock().unwrap().remove(&normalize(name));
    }

    /// How many questions about `name` (any type) were asked.
    pub fn queries(&self, name: &str) -> usize {
        self.zone
            .queries
            .lock()
            .unwrap()
            .get(&normalize(name))
            .copied()
            .unwrap_or(0)
    }

    /// How many questions were asked in all.
    pub fn total_queries(&self) -> usize {
        self.zone.queries.lock().unwrap().values().sum()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>) {
    let mut buf = vec![0_u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(answer) = zone.answer(&buf[..len]) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_tcp_connection(stream, zone.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// DNS over TCP: each message is prefixed with its length as a big-endian u16.
async fn serve_tcp_connection(mut stream: TcpStream, zone: Arc<Zone>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut request = vec![0_u8; usize::from(len)];
        if stream.read_exact(&mut request).await.is_err() {
            return;
        }
        let Some(answer) = zone.answer(&request) else {
            return;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use std::time::Duration;

    async fn ask_udp(server: SocketAddr, name: &str, kind: RecordType) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        socket
            .send_to(&query.to_vec().unwrap(), server)
            .await
            .unwrap();
        let mut buf = vec![0_u8; 4096];
        let (len, _) = crate::within(
            Duration::from_secs(5),
            "DNS answer",
            socket.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        answer
    }

    fn a_records(message: &Message) -> Vec<(Ipv4Addr, u32)> {
        message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((a.0, r.ttl)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_a_queries_from_a_mutable_table() {
        let server = DnsServer::start().await.unwrap();
        server.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 1)], 1);

        let answer = ask_udp(server.addr(), "SVC.test.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&answer), vec![(Ipv4Addr::new(127, 0, 0, 1), 1)]);

        server.set(
            "svc.test.",
            &[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)],
            30,
        );
        let answer = ask_udp(server.addr(), "svc.test", RecordType::A).await;
        assert_eq!(
            a_records(&answer),
            vec![
                (Ipv4Addr::new(127, 0, 0, 2), 30),
                (Ipv4Addr::new(127, 0, 0, 3), 30)
            ]
        );

        let answer = ask_udp(server.addr(), "svc.test", RecordType::AAAA).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());

        let answer = ask_udp(server.addr(), "nope.test", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

        server.remove("svc.test");
        let answer = ask_udp(server.addr(), "svc.test", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

        assert_eq!(server.queries("svc.test"), 4);
        assert_eq!(server.queries("nope.test."), 1);
        assert_eq!(server.total_queries(), 5);
    }

    #[tokio::test]
    async fn answers_over_tcp_on_the_same_port() {
        let server = DnsServer::start().await.unwrap();
        server.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 9)], 5);
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("svc.test.").unwrap(),
            RecordType::A,
        ));
        let bytes = query.to_vec().unwrap();
        stream.write_u16(bytes.len() as u16).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0_u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let answer = Message::from_vec(&buf).unwrap();
        assert_eq!(a_records(&answer), vec![(Ipv4Addr::new(127, 0, 0, 9), 5)]);
    }

    /// The proxy resolves with hickory-resolver; make sure it accepts our answers
    /// over UDP and TCP, and re-asks once a 1 s TTL has run out.
    #[tokio::test]
    async fn hickory_resolver_accepts_the_answers() {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;

        let server = DnsServer::start().await.unwrap();
        server.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 1)], 1);
        let mut name_server = NameServerConfig::udp_and_tcp(server.addr().ip());
        for connection in &mut name_server.connections {
            connection.port = server.addr().port();
        }
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_millis(500);
        options.attempts = 1;
        let resolver = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![name_server]),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .unwrap();

        let ips: Vec<_> = resolver
            .lookup_ip("svc.test.")
            .await
            .unwrap()
            .iter()
            .collect();
        assert_eq!(ips, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
        assert!(resolver.lookup_ip("nope.test.").await.is_err());
        assert!(server.queries("nope.test") >= 1);

        server.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 2)], 1);
        crate::eventually(Duration::from_secs(5), || async {
            let ips: Vec<_> = resolver.lookup_ip("svc.test.").await?.iter().collect();
            anyhow::ensure!(
                ips == vec![std::net::IpAddr::from([127, 0, 0, 2])],
                "{ips:?}"
            );
            Ok(())
        })
        .await
        .unwrap();
    }
}
