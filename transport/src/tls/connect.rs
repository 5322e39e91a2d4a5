//! The outbound side of mTLS: TLS 1.3 over a TCP connection to an endpoint
//! (an IP literal), with this sidecar's certificate, verifying that the
//! server is the service this connector is for.
//!
//! One [`MeshConnector`] per service and ALPN: the connections it makes are
//! pooled per endpoint of that service, so a pooled connection is always to
//! that endpoint *and* that expected identity. A failed handshake is a connect error (the request
//! becomes `502 connect-failure`, retried like any connect failure), logged
//! with its reason and reported to the mesh's [`HandshakeObserver`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft_config::ServiceName;

use super::accept::{certificate_problem, describe_io};
use super::{HandshakeObserver, MeshTls, Side};

/// Why a mesh connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MeshConnectError {
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
    /// The `reason` label of `weft_tls_handshake_failures_total`.
    pub fn handshake_reason(&self) -> &'static str {
        match self {
            Self::Handshake {
                certificate: true, ..
            } => "certificate",
            Self::Handshake { .. } => "error",
            Self::Timeout { .. } => "timeout",
        }
    }
}

/// Opens mTLS connections to one service's endpoints.
/// The client side of mTLS towards one service's sidecars, for one ALPN.
#[derive(Clone)]
pub struct MeshConnector {
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
    /// Handshakes that expect `service`'s identity and offer `alpn`, each
    /// bounded by `timeout`.
    pub fn new(mesh: &MeshTls, service: &ServiceName, alpn: &[u8], timeout: Duration) -> Self {
        Self {
            tls: TlsConnector::from(mesh.client_config(service, alpn)),
            service: service.clone(),
            timeout,
            observer: Arc::clone(&mesh.observer),
        }
    }

    /// TLS 1.3 over `tcp` (connected to `endpoint`), with this sidecar's
    /// certificate; the server must prove the service's identity.
    pub async fn handshake(
        &self,
        endpoint: SocketAddr,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, MeshConnectError> {
        let name = ServerName::IpAddress(endpoint.ip().into());
        let result = match tokio::time::timeout(self.timeout, self.tls.connect(name, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(MeshConnectError::Handshake {
                endpoint: endpoint.to_string(),
                service: self.service.clone(),
                reason: describe_io(&error),
                certificate: certificate_problem(&error),
            }),
            Err(_) => Err(MeshConnectError::Timeout {
                endpoint: endpoint.to_string(),
                service: self.service.clone(),
                after: self.timeout,
            }),
        };
        if let Err(error) = &result {
            tracing::warn!(%error, "outbound mTLS handshake failed");
            self.observer
                .handshake_failed(Side::Outbound, error.handshake_reason());
        }
        result
    }
}
