//! The inbound listener's side of mTLS: one connection's handshake.
//!
//! The listener's protocol detection (the `server` module) peeks at the
//! connection's first byte, within `[limits] header_read_timeout`, and hands
//! it to [`InboundTls::accept`]: 0x16 (a TLS handshake record) goes through
//! the TLS 1.3 handshake, which requires a client certificate from the mesh
//! CA ([`super::verify::CallerVerifier`]); anything else is plaintext, served
//! only while the local service's policy says `inbound.allow_plaintext = true`
//! and otherwise closed. The handshake is bounded by [`HANDSHAKE_TIMEOUT`].
//! Every failure is reported to the mesh's [`HandshakeObserver`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::identity::{CallerIdentity, IdentityError, service_identity};
use super::{HandshakeObserver, MeshTls, Side, verify};

/// The longest a client may take from its first byte to a finished handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection after [`InboundTls::accept`].
#[derive(Debug)]
pub enum Accepted<IO> {
    /// Not TLS, and the local policy allows plaintext: no caller identity.
    Plaintext(IO),
    /// An mTLS connection and the caller its certificate names.
    Tls(Box<TlsStream<IO>>, CallerIdentity),
}

/// Why an inbound connection was closed before any request.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error(
        "plaintext connection refused: this listener requires mTLS (inbound.allow_plaintext is false)"
    )]
    Plaintext,
    #[error("no finished TLS handshake within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("TLS handshake failed: {0}")]
    Certificate(String),
}

impl HandshakeFailure {
    /// The `reason` label of `weft_tls_handshake_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Timeout => "timeout",
            Self::Tls(_) => "error",
            Self::Certificate(_) => "certificate",
        }
    }
}

/// Whether a failed handshake was about a certificate (ours or the peer's).
pub(super) fn certificate_problem(error: &io::Error) -> bool {
    use rustls::AlertDescription as Alert;
    matches!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(
                    Alert::BadCertificate
                        | Alert::UnknownCA
                        | Alert::CertificateRequired
                        | Alert::AccessDenied
                        | Alert::CertificateExpired
                        | Alert::CertificateUnknown
                )
        )
    )
}

/// An I/O error from a handshake, in words.
pub(super) fn describe_io(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => verify::describe(tls),
        None => error.to_string(),
    }
}

/// The inbound listener's TLS acceptor.
pub struct InboundTls {
    mesh: Arc<MeshTls>,
    acceptor: TlsAcceptor,
    /// Whether plaintext is allowed now (the local policy can change).
    allow_plaintext: Box<dyn Fn() -> bool + Send + Sync>,
    /// The mesh's, cloned once here: reporting a failure allocates nothing.
    observer: Arc<dyn HandshakeObserver>,
}

impl std::fmt::Debug for InboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundTls").finish_non_exhaustive()
    }
}

impl InboundTls {
    /// An acceptor over `mesh`'s server configuration; `allow_plaintext`
    /// says whether the local policy allows plaintext now; failures are
    /// reported to `mesh`'s [`HandshakeObserver`].
    pub fn new(mesh: Arc<MeshTls>, allow_plaintext: Box<dyn Fn() -> bool + Send + Sync>) -> Self {
        Self {
            acceptor: TlsAcceptor::from(mesh.server_config()),
            observer: Arc::clone(&mesh.observer),
            mesh,
            allow_plaintext,
        }
    }

    /// Handshakes on `io`, whose first byte (peeked, still unread) is
    /// `first`; a failure is reported.
    pub async fn accept<IO>(&self, io: IO, first: u8) -> Result<Accepted<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(io, first))
            .await
            .unwrap_or(Err(HandshakeFailure::Timeout));
        if let Err(failure) = &result {
            self.observer
                .handshake_failed(Side::Inbound, failure.reason());
        }
        result
    }

    /// A connection that sent nothing within `[limits] header_read_timeout`:
    /// no handshake either, reported as a `timeout`.
    pub fn silent(&self) {
        self.observer
            .handshake_failed(Side::Inbound, HandshakeFailure::Timeout.reason());
    }

    async fn handshake<IO>(&self, io: IO, first: u8) -> Result<Accepted<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        if first != TLS_HANDSHAKE {
            return if (self.allow_plaintext)() {
                Ok(Accepted::Plaintext(io))
            } else {
                Err(HandshakeFailure::Plaintext)
            };
        }
        let stream = self.acceptor.accept(io).await.map_err(|e| {
            if certificate_problem(&e) {
                HandshakeFailure::Certificate(describe_io(&e))
            } else {
                HandshakeFailure::Tls(describe_io(&e))
            }
        })?;
        let (_, conn) = stream.get_ref();
        // The verifier accepted this certificate; read the identity from it.
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| {
                HandshakeFailure::Certificate(
                    IdentityError::from(weft_certs::CertIdentityError::NoSpiffeId).to_string(),
                )
            })?;
        let caller = service_identity(leaf, self.mesh.store.trust_domain())
            .map_err(|e| HandshakeFailure::Certificate(e.to_string()))?;
        Ok(Accepted::Tls(Box::new(stream), caller))
    }
}
