//! How weftctl reaches the control plane's admin API: `http://`, or
//! `https://` verified against the CA in `--ca-file` (`WEFT_CA_FILE`).
//!
//! weftctl carries no system roots: the admin API's certificate comes from
//! the operator's own CA (often the mesh CA, `weftctl certs control-plane
//! --san NAME_OR_IP`), so `https://` needs `--ca-file`. The certificate must
//! name the host of `--control-plane` (a DNS SAN, or an IP SAN for an
//! address). A handshake that fails says why in words (unknown CA, name
//! mismatch, expired), as the innermost error, which is what weftctl prints.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The CA that signs the admin API's certificate, and the file it came from.
#[derive(Clone)]
pub struct Trust {
    config: Arc<ClientConfig>,
    file: PathBuf,
}

impl Trust {
    /// Reads the CA certificates (PEM) in `file`.
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading the CA file {}", file.display()))?;
        if certs.is_empty() {
            bail!("the CA file {} holds no certificate", file.display());
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("the CA file {}", file.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // weftctl's client speaks HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            file: file.to_owned(),
        })
    }
}

/// Connects over TCP, then TLS for `https://` (when it has a [`Trust`]).
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    trust: Option<Trust>,
}

impl Connector {
    pub fn new(tcp: HttpConnector, trust: Option<Trust>) -> Self {
        let mut tcp = tcp;
        // The scheme is checked here, not by the TCP connector.
        tcp.enforce_http(false);
        Self { tcp, trust }
    }
}

/// Why a connection could not be made, in words; it has no source, so it is
/// the innermost cause weftctl prints.
#[derive(Debug)]
pub struct ConnectError(String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let trust = self.trust.clone();
        let connecting = self.tcp.call(uri.clone());
        Box::pin(async move {
            let tcp = connecting.await?;
            if !https {
                return Ok(Stream::Plain(tcp));
            }
            let Some(trust) = trust else {
                return Err(ConnectError("https:// needs --ca-file".to_owned()).into());
            };
            // `[::1]` in a URI, `::1` in a certificate.
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(host.clone())
                .map_err(|_| ConnectError(format!("{host:?} is not a valid TLS server name")))?;
            let tls = TlsConnector::from(Arc::clone(&trust.config))
                .connect(name, tcp.into_inner())
                .await
                .map_err(|e| ConnectError(handshake_error(&e, &host, &trust.file)))?;
            Ok(Stream::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}

/// A failed handshake, in words.
fn handshake_error(e: &std::io::Error, host: &str, ca_file: &Path) -> String {
    let ca = ca_file.display();
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake failed: {e}");
    };
    match tls {
        // BadSignature: an issuer of the same name, another key (e.g. a
        // regenerated development CA).
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "TLS handshake failed: unknown CA: the admin API's certificate is not signed by the CA in {ca}"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "TLS handshake failed: name mismatch: the admin API's certificate is not valid for {host} \
             (issue it with `weftctl certs control-plane --san {host}`, or use a name it has)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "TLS handshake failed: the admin API's certificate has expired".to_owned(),
        rustls::Error::InvalidMessage(_) => {
            format!("TLS handshake failed: {tls} (does it serve plain HTTP? then use http://)")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// A connection to the admin API, plain or TLS.
pub enum Stream {
    Plain(TokioIo<TcpStream>),
    // Boxed: a TLS connection's state is a kilobyte.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(tcp) => tcp.connected(),
            Stream::Tls(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => hyper::rt::Read::poll_read(Pin::new(s), cx, buf),
            Stream::Tls(s) => hyper::rt::Read::poll_read(Pin::new(&mut **s), cx, buf),
        }
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => hyper::rt::Write::poll_write(Pin::new(s), cx, buf),
            Stream::Tls(s) => hyper::rt::Write::poll_write(Pin::new(&mut **s), cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => hyper::rt::Write::poll_flush(Pin::new(s), cx),
            Stream::Tls(s) => hyper::rt::Write::poll_flush(Pin::new(&mut **s), cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => hyper::rt::Write::poll_shutdown(Pin::new(s), cx),
            Stream::Tls(s) => hyper::rt::Write::poll_shutdown(Pin::new(&mut **s), cx),
        }
    }
}
