//! Certificates for sidecars with `[tls]`, and a TLS client to look at them.
//!
//! [`Pki`] is a mesh CA (trust domain `weft.local`) made with `weft-certs`, the
//! library behind `weftctl certs`; [`Pki::files`] adds `ca.pem`,
//! `<name>.pem` and `<name>-key.pem` to a proxy run, matching
//! [`crate::config::Bootstrap::tls`]. [`connect`] opens a TLS connection the
//! way a peer sidecar would (optionally with a client certificate, offering
//! ALPN `h2` and `http/1.1`, verifying the server against a CA) and reports
//! what was negotiated; [`Connected::get`] then sends one request over it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft_certs::{Ca, Issued};

use crate::process::{ProxyBuilder, TempDir};

/// Certificates in tests live a day.
const VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A mesh CA for one test.
#[derive(Debug)]
pub struct Pki {
    ca: Ca,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh CA for trust domain `weft.local`.
    pub fn new() -> Self {
        Self {
            ca: Ca::generate(&Default::default()).unwrap(),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A new certificate (and key) for `service`.
    pub fn issue(&self, service: &str) -> Issued {
        self.ca.issue(&service.parse().unwrap(), VALIDITY).unwrap()
    }

    /// A new certificate (and key) for the control plane
    /// (`spiffe://weft.local/control-plane`), with the DNS SAN `localhost`
    /// and the IP SANs 127.0.0.1 and ::1 beside it, as one made with
    /// `weftctl certs control-plane --san` for the admin API too: sidecars
    /// must still accept it (they check the SPIFFE ID only).
    pub fn issue_control_plane(&self) -> Issued {
        self.ca
            .issue_control_plane(&["localhost", "::1"], VALIDITY)
            .unwrap()
    }

    /// `ca.pem`, `control-plane.pem` and `control-plane-key.pem` (a new
    /// control-plane certificate) in `dir`, and the `weft-control-plane`
    /// arguments that turn mTLS on with them.
    pub fn control_plane_args(&self, dir: &TempDir) -> anyhow::Result<Vec<String>> {
        let issued = self.issue_control_plane();
        let path = |p: std::path::PathBuf| p.display().to_string();
        Ok(vec![
            "--tls-ca".to_owned(),
            path(dir.write("ca.pem", self.ca_pem())?),
            "--tls-cert".to_owned(),
            path(dir.write("control-plane.pem", issued.cert_pem())?),
            "--tls-key".to_owned(),
            path(dir.write("control-plane-key.pem", issued.key_pem())?),
        ])
    }

    /// `builder` with `ca.pem` and `issued`'s `<name>.pem`, `<name>-key.pem`.
    pub fn files(&self, builder: ProxyBuilder, name: &str, issued: &Issued) -> ProxyBuilder {
        builder
            .file("ca.pem", self.ca_pem())
            .file(&format!("{name}.pem"), issued.cert_pem())
            .file(&format!("{name}-key.pem"), issued.key_pem())
    }
}

/// What a TLS connection negotiated.
#[derive(Debug)]
pub struct Connected {
    pub stream: TlsStream<TcpStream>,
    pub version: Option<ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
    /// The server's certificate (DER).
    pub server_cert: Vec<u8>,
}

/// A TLS client configuration trusting `ca_pem`, presenting `client` (if
/// any), offering `alpn`.
fn client_config(
    ca_pem: &str,
    client: Option<&Issued>,
    alpn: &[&[u8]],
) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(issued) => {
            let chain = vec![CertificateDer::from_pem_slice(
                issued.cert_pem().as_bytes(),
            )?];
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem().as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Connects to `addr` with TLS, trusting `ca_pem`, presenting `client` (if
/// any), offering ALPN `h2` and `http/1.1`. With TLS 1.3 a server that
/// refuses the client certificate says so after this returns: send a request
/// ([`Connected::get`]) to see it.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Issued>,
) -> anyhow::Result<Connected> {
    let config = client_config(ca_pem, client, &[b"h2", b"http/1.1"])?;
    let tcp = TcpStream::connect(addr).await?;
    // The test certificates carry the IP SAN 127.0.0.1.
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = crate::within(
        Duration::from_secs(10),
        "TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await??;
    let (_, conn) = stream.get_ref();
    let server_cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| anyhow!("the server sent no certificate"))?;
    Ok(Connected {
        version: conn.protocol_version(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        server_cert,
        stream,
    })
}

/// A gRPC channel to `addr` over TLS 1.3 (ALPN `h2`), trusting `ca_pem` and
/// presenting `client` (if any), the way a sidecar reaches an `https`
/// control plane (the server's name is not checked).
pub async fn grpc_channel(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Issued>,
) -> anyhow::Result<tonic::transport::Channel> {
    let config = Arc::new(client_config(ca_pem, client, &[b"h2"])?);
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = Arc::clone(&config);
        async move {
            let tcp = TcpStream::connect(addr).await?;
            // The test certificates carry the IP SAN 127.0.0.1.
            let name = ServerName::IpAddress(addr.ip().into());
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            std::io::Result::Ok(TokioIo::new(tls))
        }
    });
    let channel = crate::within(
        Duration::from_secs(10),
        "a gRPC connection over TLS",
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_with_connector(connector),
    )
    .await??;
    Ok(channel)
}

impl Connected {
    /// `GET path` with `Host: host` over this connection (HTTP/2 if ALPN
    /// chose `h2`); the status, or the error that ended the connection.
    pub async fn get(self, host: &str, path: &str) -> anyhow::Result<u16> {
        let h2 = self.alpn.as_deref() == Some(b"h2");
        let io = TokioIo::new(self.stream);
        let request = Request::get(format!("https://{host}{path}"))
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let send = async move {
            let response = if h2 {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                sender.send_request(request).await?
            } else {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                sender.send_request(request).await?
            };
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            anyhow::Ok(status)
        };
        crate::within(Duration::from_secs(10), "a request over TLS", send)
            .await?
            .context("request over TLS")
    }
}
