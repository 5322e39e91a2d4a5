//! mTLS on the sidecar-facing gRPC listener.
//!
//! With `--tls-ca`, `--tls-cert` and `--tls-key`, every connection to the gRPC
//! listener must be TLS 1.3 with a client certificate signed by the mesh CA
//! whose SPIFFE ID names a service of the trust domain
//! (`spiffe://<td>/service/<name>`); anything else is closed in the handshake
//! and counted. The authenticated service goes into every request's
//! extensions as a [`PeerService`]: a registration must be for that service.
//! The control plane's own certificate must carry
//! `spiffe://<td>/control-plane`, which is what sidecars check.
//!
//! The three files are checked every [`ServerTls::watch`] interval; when they
//! change and are consistent, new connections use them (established ones are
//! not touched); otherwise the current ones stay and the refusal is logged
//! once per change. The certificate in force's expiry goes into a gauge
//! (`weft_control_plane_tls_certificate_expiry_timestamp_seconds`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_config::{ServiceName, SpiffeId, TrustDomain};

use crate::tasks::Tasks;

/// The files behind the listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the CA certificate is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        #[source]
        source: weft_certs::CertIdentityError,
    },
    #[error("{path} is for {found}; the control plane's certificate must be {expected}")]
    WrongIdentity {
        path: PathBuf,
        found: SpiffeId,
        expected: SpiffeId,
    },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Setup(String),
}

/// The authenticated service of the sidecar that sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerService(pub ServiceName);

/// Size and modification time of each file, to notice changes.
type Stamps = [Option<(u64, SystemTime)>; 3];

fn stamps(paths: &TlsPaths) -> Stamps {
    [&paths.ca, &paths.cert, &paths.key].map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
}

/// The gRPC listener's TLS configuration, reloaded when its files change.
pub struct ServerTls {
    paths: TlsPaths,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
    config: Mutex<Arc<ServerConfig>>,
    /// Set to the certificate's notAfter (Unix seconds) whenever one loads.
    expiry: Gauge,
    /// The files as loaded, and the last refused ones (reported once).
    seen: Mutex<(Stamps, Option<Stamps>)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("paths", &self.paths)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files; the certificate must be the control plane's.
    /// `expiry` is set to its notAfter, and to each new one's.
    pub fn load(
        paths: TlsPaths,
        trust_domain: TrustDomain,
        expiry: Gauge,
    ) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = stamps(&paths);
        let Built {
            config,
            identity,
            not_after,
        } = build(&paths, &trust_domain, &provider)?;
        expiry.set(not_after);
        tracing::info!(%identity, "mTLS on the gRPC listener: sidecars must present a mesh certificate");
        Ok(Arc::new(Self {
            paths,
            trust_domain,
            provider,
            config: Mutex::new(config),
            expiry,
            seen: Mutex::new((seen, None)),
        }))
    }

    /// The trust domain client certificates must be in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The configuration new connections use.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads the files if they changed: `Ok(true)` when new ones are in
    /// force, `Err` (logged by the caller) when they were refused.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.paths);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if now == seen.0 || seen.1.as_ref() == Some(&now) {
            return Ok(false);
        }
        match build(&self.paths, &self.trust_domain, &self.provider) {
            Ok(Built {
                config, not_after, ..
            }) => {
                *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config;
                self.expiry.set(not_after);
                *seen = (now, None);
                Ok(true)
            }
            Err(error) => {
                seen.1 = Some(now);
                Err(error)
            }
        }
    }

    /// Checks the files every `interval` (a task owned by `tasks`) until
    /// they stop.
    pub fn watch(self: &Arc<Self>, interval: Duration, tasks: &Tasks) {
        let this = Arc::clone(self);
        let stop = tasks.stop().clone();
        tasks.spawn("tls-reload", async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let tls = Arc::clone(&this);
                match tokio::task::spawn_blocking(move || tls.refresh()).await {
                    Ok(Ok(true)) => {
                        tracing::info!("TLS certificate reloaded; new connections use it");
                    }
                    Ok(Err(error)) => tracing::error!(
                        %error,
                        "new TLS files refused; keeping the current certificate"
                    ),
                    Ok(Ok(false)) => {}
                    Err(error) => tracing::error!(%error, "checking the TLS files failed"),
                }
            }
        });
    }

    /// The service a client certificate (DER, the chain's first) names.
    pub fn peer_service(&self, cert: &[u8]) -> Result<PeerService, String> {
        let id = weft_certs::spiffe_id_of(cert).map_err(|e| e.to_string())?;
        if id.trust_domain() != &self.trust_domain {
            return Err(format!("{id} is not in trust domain {}", self.trust_domain));
        }
        id.service()
            .map(PeerService)
            .ok_or_else(|| format!("{id} names no service"))
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A usable set of files.
struct Built {
    config: Arc<ServerConfig>,
    identity: SpiffeId,
    /// The certificate's notAfter, in Unix seconds.
    not_after: i64,
}

fn build(
    paths: &TlsPaths,
    trust_domain: &TrustDomain,
    provider: &Arc<CryptoProvider>,
) -> Result<Built, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(&paths.ca)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: paths.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let chain = certificates(&paths.cert)?;
    let expected = SpiffeId::for_control_plane(trust_domain);
    let identity = chain
        .first()
        .map(|c| weft_certs::spiffe_id_of(c))
        .transpose()
        .map_err(|source| TlsError::Identity {
            path: paths.cert.clone(),
            source,
        })?
        .ok_or_else(|| TlsError::NoCertificate {
            path: paths.cert.clone(),
        })?;
    if identity != expected {
        return Err(TlsError::WrongIdentity {
            path: paths.cert.clone(),
            found: identity,
            expected,
        });
    }
    // The leaf parsed above, so it parses again.
    let not_after = chain
        .first()
        .and_then(|c| weft_certs::not_after_of(c))
        .ok_or_else(|| TlsError::NoCertificate {
            path: paths.cert.clone(),
        })?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|source| TlsError::Read {
        path: paths.key.clone(),
        source,
    })?;
    let setup = |e: rustls::Error| TlsError::Setup(e.to_string());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map_err(|e| TlsError::BadCa {
                path: paths.ca.clone(),
                reason: e.to_string(),
            })?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(setup)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Built {
        config: Arc::new(config),
        identity,
        not_after,
    })
}
