//! The outbound side of mTLS: a hyper-util connector that opens TCP to an
//! endpoint (an IP literal), then TLS 1.3 with this sidecar's certificate,
//! verifying that the server is the service this connector is for.
//!
//! One [`MeshConnector`] per service and ALPN: the pools it feeds are keyed by
//! endpoint address, so a pooled connection is always to that endpoint *and*
//! that expected identity. A failed handshake is a connect error (the request
//! becomes `502 connect-failure`, retried like any connect failure), logged
//! with its reason and reported to the mesh's [`HandshakeObserver`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower::Service;
use weft_config::ServiceName;

use super::accept::{certificate_problem, describe_io};
use super::{ALPN_H2, HandshakeObserver, MeshTls, Side};

/// Why a mesh connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MeshConnectError {
    #[error(transparent)]
    Tcp(Box<dyn std::error::Error + Send + Sync>),
    #[error("mTLS handshake with {endpoint} (service {service}) failed: {reason}")]
    Handshake {
        endpoint: String,
        service: ServiceName,
        reason: String,
        /// The peer's (or our) certificate was the problem.
        certificate: bool,
    },
    #[error("mTLS handshake with {endpoint} (service {service}) took longer than {after:?}")]
    Timeout {
        endpoint: String,
        service: ServiceName,
        after: Duration,
    },
}

impl MeshConnectError {
    /// The `reason` label of `weft_tls_handshake_failures_total`; `None` when
    /// no handshake was attempted (TCP failed).
    pub fn handshake_reason(&self) -> Option<&'static str> {
        match self {
            Self::Tcp(_) => None,
            Self::Handshake {
                certificate: true, ..
            } => Some("certificate"),
            Self::Handshake { .. } => Some("error"),
            Self::Timeout { .. } => Some("timeout"),
        }
    }
}

/// Opens mTLS connections to one service's endpoints.
#[derive(Clone)]
pub struct MeshConnector {
    http: HttpConnector,
    tls: TlsConnector,
    service: ServiceName,
    timeout: Duration,
    observer: Arc<dyn HandshakeObserver>,
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("service", &self.service)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl MeshConnector {
    /// A connector to `service`'s endpoints over `http` (TCP settings),
    /// offering `alpn`; the handshake is bounded by `timeout`.
    pub fn new(
        http: HttpConnector,
        mesh: &MeshTls,
        service: &ServiceName,
        alpn: &[u8],
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            tls: TlsConnector::from(mesh.client_config(service, alpn)),
            service: service.clone(),
            timeout,
            observer: Arc::clone(&mesh.observer),
        }
    }
}

impl Service<Uri> for MeshConnector {
    type Response = MeshStream;
    type Error = MeshConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshStream, MeshConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http
            .poll_ready(cx)
            .map_err(|e| MeshConnectError::Tcp(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let endpoint = uri.authority().map_or_else(String::new, |a| a.to_string());
        let connecting = self.http.call(uri);
        let (tls, service, timeout) = (self.tls.clone(), self.service.clone(), self.timeout);
        let observer = Arc::clone(&self.observer);
        Box::pin(async move {
            let tcp = connecting
                .await
                .map_err(|e| MeshConnectError::Tcp(Box::new(e)))?
                .into_inner();
            let ip = tcp
                .peer_addr()
                .map_err(|e| MeshConnectError::Tcp(Box::new(e)))?
                .ip();
            // Identity, not the address, is verified; the name only has to
            // be well-formed (an IP sends no SNI).
            let name = ServerName::IpAddress(ip.into());
            let result = match tokio::time::timeout(timeout, tls.connect(name, tcp)).await {
                Ok(Ok(stream)) => Ok(MeshStream(TokioIo::new(stream))),
                Ok(Err(error)) => Err(MeshConnectError::Handshake {
                    endpoint,
                    service,
                    reason: describe_io(&error),
                    certificate: certificate_problem(&error),
                }),
                Err(_) => Err(MeshConnectError::Timeout {
                    endpoint,
                    service,
                    after: timeout,
                }),
            };
            if let Err(error) = &result {
                tracing::warn!(%error, "outbound mTLS handshake failed");
                if let Some(reason) = error.handshake_reason() {
                    observer.handshake_failed(Side::Outbound, reason);
                }
            }
            result
        })
    }
}

/// An mTLS connection to a peer sidecar.
#[derive(Debug)]
pub struct MeshStream(TokioIo<TlsStream<TcpStream>>);

impl MeshStream {
    fn tls(&self) -> &TlsStream<TcpStream> {
        self.0.inner()
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let (tcp, conn) = self.tls().get_ref();
        let connected = tcp.connected();
        if conn.alpn_protocol() == Some(ALPN_H2) {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
