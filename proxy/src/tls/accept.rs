//! The inbound listener's side of mTLS: one connection's handshake.
//!
//! [`InboundTls::accept`] reads the connection's first byte: 0x16 (a TLS
//! handshake record) goes through the TLS 1.3 handshake, which requires a
//! client certificate from the mesh CA ([`super::verify::CallerVerifier`]);
//! anything else is plaintext, served only while the local service's policy
//! says `inbound.allow_plaintext = true` and otherwise closed. The byte read
//! is handed back to whichever protocol continues ([`Rewind`]). The whole
//! handshake is bounded by [`HANDSHAKE_TIMEOUT`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use super::identity::{CallerIdentity, IdentityError, service_identity};
use super::{MeshTls, verify};
use crate::telemetry::{Direction, Metrics};

/// The longest a client may take from connecting to a finished handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection after [`InboundTls::accept`]: plaintext or TLS.
pub type InboundIo<IO> = Either<Rewind<IO>, TlsStream<Rewind<IO>>>;

/// Why an inbound connection was closed before any request.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error(
        "plaintext connection refused: this listener requires mTLS (inbound.allow_plaintext is false)"
    )]
    Plaintext,
    #[error("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("the client closed the connection before a handshake")]
    Closed,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("TLS handshake failed: {0}")]
    Certificate(String),
}

impl HandshakeFailure {
    /// The `reason` label of `weft_tls_handshake_failures_total`; `None`
    /// for a connection closed before its first byte (a TCP probe).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Plaintext => Some("plaintext"),
            Self::Timeout => Some("timeout"),
            Self::Closed => None,
            Self::Tls(_) => Some("error"),
            Self::Certificate(_) => Some("certificate"),
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
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for InboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundTls").finish_non_exhaustive()
    }
}

impl InboundTls {
    /// An acceptor over `mesh`'s server configuration; `allow_plaintext`
    /// says whether the local policy allows plaintext now; failures are
    /// counted into `metrics`.
    pub fn new(
        mesh: Arc<MeshTls>,
        allow_plaintext: Box<dyn Fn() -> bool + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            acceptor: TlsAcceptor::from(mesh.server_config()),
            mesh,
            allow_plaintext,
            metrics,
        }
    }

    /// Handshakes on `io`; the caller's identity comes with a TLS connection.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(InboundIo<IO>, Option<CallerIdentity>), HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(io))
            .await
            .unwrap_or(Err(HandshakeFailure::Timeout));
        if let Err(failure) = &result
            && let Some(reason) = failure.reason()
        {
            self.metrics
                .tls_handshake_failure(Direction::Inbound, reason);
        }
        result
    }

    async fn handshake<IO>(
        &self,
        mut io: IO,
    ) -> Result<(InboundIo<IO>, Option<CallerIdentity>), HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut first = [0u8; 1];
        match io.read(&mut first).await {
            Ok(1) => {}
            Ok(_) | Err(_) => return Err(HandshakeFailure::Closed),
        }
        let io = Rewind::new(io, first[0]);
        if first[0] != TLS_HANDSHAKE {
            return if (self.allow_plaintext)() {
                Ok((Either::Left(io), None))
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
            .ok_or_else(|| HandshakeFailure::Certificate(IdentityError::NoSpiffeId.to_string()))?;
        let caller = service_identity(leaf, self.mesh.store.trust_domain())
            .map_err(|e| HandshakeFailure::Certificate(e.to_string()))?;
        Ok((Either::Right(stream), Some(caller)))
    }
}

pin_project! {
    /// A connection whose first byte was read to choose the protocol, and is
    /// read again first.
    #[derive(Debug)]
    pub struct Rewind<T> {
        first: Option<u8>,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    pub fn new(inner: T, first: u8) -> Self {
        Self {
            first: Some(first),
            inner,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if buf.remaining() > 0
            && let Some(byte) = this.first.take()
        {
            buf.put_slice(&[byte]);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[tokio::test]
    async fn rewind_reads_the_first_byte_again_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"ELLO").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b, b'H');
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "HELLO");
    }
}
