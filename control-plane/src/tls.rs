//! TLS on the control plane's listeners.
//!
//! The sidecar-facing gRPC listener ([`ServerTls::load`], `--tls-ca`,
//! `--tls-cert`, `--tls-key`) is mTLS: every connection must be TLS 1.3 with a
//! client certificate signed by the mesh CA whose SPIFFE ID names a service of
//! the trust domain (`spiffe://<td>/service/<name>`); anything else is closed
//! in the handshake and counted. The authenticated service goes into every
//! request's extensions as a [`PeerService`]: a registration must be for that
//! service. The control plane's own certificate must carry
//! `spiffe://<td>/control-plane`, which is what sidecars check.
//!
//! The admin listener ([`ServerTls::load_admin`], `--admin-tls-cert`,
//! `--admin-tls-key`) is plain server TLS (1.2 or 1.3, HTTP/1.1 or HTTP/2):
//! its certificate may be any, `weftctl` checks the DNS name or IP address
//! it dialled against its `--ca-file`. Clients present no certificate; the
//! bearer token still authenticates them.
//!
//! Either listener's files are checked every [`ServerTls::watch`] interval;
//! when they change and are consistent, new connections use them
//! (established ones are not touched); otherwise the current ones stay and
//! the refusal is logged once per change. The certificate in force's expiry
//! goes into a gauge (`weft_control_plane_tls_certificate_expiry_timestamp_seconds`,
//! `weft_control_plane_admin_tls_certificate_expiry_timestamp_seconds`).

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

/// The files behind the gRPC listener's mTLS.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which listener a [`ServerTls`] serves, and so what it checks.
#[derive(Debug, Clone)]
enum Role {
    /// The gRPC listener: mTLS with the mesh CA in `ca`; the certificate
    /// must be the control plane's SPIFFE ID in `trust_domain`.
    Mesh {
        ca: PathBuf,
        trust_domain: TrustDomain,
    },
    /// The admin listener: server TLS only, any certificate.
    Admin,
}

impl Role {
    fn listener(&self) -> &'static str {
        match self {
            Role::Mesh { .. } => "gRPC",
            Role::Admin => "admin",
        }
    }
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is in the message, not a `source`: callers print the whole
    // chain (`{:#}`) or only this (the reload log), and either way it shows once.
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the CA certificate is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{path}: {error}")]
    Identity {
        path: PathBuf,
        error: weft_certs::CertIdentityError,
    },
    #[error("{path} is for {found}; the control plane's certificate must be {expected}")]
    WrongIdentity {
        path: PathBuf,
        found: SpiffeId,
        expected: SpiffeId,
    },
    #[error("{cert} and {key} do not make a TLS configuration: {reason}")]
    Setup {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The authenticated service of the sidecar that sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerService(pub ServiceName);

/// Size and modification time of each file, to notice changes.
type Stamps = [Option<(u64, SystemTime)>; 3];

fn stamps(role: &Role, cert: &Path, key: &Path) -> Stamps {
    let ca = match role {
        Role::Mesh { ca, .. } => Some(ca.as_path()),
        Role::Admin => None,
    };
    [ca, Some(cert), Some(key)].map(|p| {
        std::fs::metadata(p?)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
}

/// A listener's TLS configuration, reloaded when its files change.
pub struct ServerTls {
    role: Role,
    cert: PathBuf,
    key: PathBuf,
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
            .field("role", &self.role)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The gRPC listener's mTLS: loads the files; the certificate must be
    /// the control plane's. `expiry` is set to its notAfter, and to each new
    /// one's.
    pub fn load(
        paths: TlsPaths,
        trust_domain: TrustDomain,
        expiry: Gauge,
    ) -> Result<Arc<Self>, TlsError> {
        let role = Role::Mesh {
            ca: paths.ca,
            trust_domain,
        };
        let this = Self::load_role(role, paths.cert, paths.key, expiry)?;
        tracing::info!(identity = %this.identity, "mTLS on the gRPC listener: sidecars must present a mesh certificate");
        Ok(this.tls)
    }

    /// The admin listener's TLS: loads the certificate (any; the chain
    /// first, leaf first) and its key. `expiry` is set to its notAfter, and
    /// to each new one's.
    pub fn load_admin(cert: PathBuf, key: PathBuf, expiry: Gauge) -> Result<Arc<Self>, TlsError> {
        let this = Self::load_role(Role::Admin, cert, key, expiry)?;
        tracing::info!(cert = %this.tls.cert.display(), "TLS on the admin listener: the admin API is HTTPS only");
        Ok(this.tls)
    }

    fn load_role(
        role: Role,
        cert: PathBuf,
        key: PathBuf,
        expiry: Gauge,
    ) -> Result<Loaded, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = stamps(&role, &cert, &key);
        let Built {
            config,
            identity,
            not_after,
        } = build(&role, &cert, &key, &provider)?;
        expiry.set(not_after);
        Ok(Loaded {
            tls: Arc::new(Self {
                role,
                cert,
                key,
                provider,
                config: Mutex::new(config),
                expiry,
                seen: Mutex::new((seen, None)),
            }),
            identity: identity.map_or_else(String::new, |id| id.to_string()),
        })
    }

    /// True for the gRPC listener's mTLS, whose clients must name a service
    /// ([`ServerTls::peer_service`]).
    pub fn is_mesh(&self) -> bool {
        matches!(self.role, Role::Mesh { .. })
    }

    /// The configuration new connections use.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads the files if they changed: `Ok(true)` when new ones are in
    /// force, `Err` (logged by the caller) when they were refused.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.role, &self.cert, &self.key);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if now == seen.0 || seen.1.as_ref() == Some(&now) {
            return Ok(false);
        }
        match build(&self.role, &self.cert, &self.key, &self.provider) {
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
        let listener = self.role.listener();
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
                        tracing::info!(
                            listener,
                            "TLS certificate reloaded; new connections use it"
                        );
                    }
                    Ok(Err(error)) => tracing::error!(
                        listener,
                        %error,
                        "new TLS files refused; keeping the current certificate"
                    ),
                    Ok(Ok(false)) => {}
                    Err(error) => {
                        tracing::error!(listener, %error, "checking the TLS files failed")
                    }
                }
            }
        });
    }

    /// The service a client certificate (DER, the chain's first) names.
    pub fn peer_service(&self, cert: &[u8]) -> Result<PeerService, String> {
        let Role::Mesh { trust_domain, .. } = &self.role else {
            return Err("the admin listener takes no client certificates".to_owned());
        };
        let id = weft_certs::spiffe_id_of(cert).map_err(|e| e.to_string())?;
        if id.trust_domain() != trust_domain {
            return Err(format!("{id} is not in trust domain {trust_domain}"));
        }
        id.service()
            .map(PeerService)
            .ok_or_else(|| format!("{id} names no service"))
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |error| TlsError::Read {
        path: path.to_owned(),
        error,
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

/// A freshly loaded [`ServerTls`] and the identity to log.
struct Loaded {
    tls: Arc<ServerTls>,
    identity: String,
}

/// A usable set of files.
struct Built {
    config: Arc<ServerConfig>,
    /// The control plane's SPIFFE ID (gRPC listener only).
    identity: Option<SpiffeId>,
    /// The certificate's notAfter, in Unix seconds.
    not_after: i64,
}

fn build(
    role: &Role,
    cert: &Path,
    key: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Built, TlsError> {
    let chain = certificates(cert)?;
    let identity = match role {
        Role::Mesh { trust_domain, .. } => {
            Some(control_plane_identity(&chain, cert, trust_domain)?)
        }
        Role::Admin => None,
    };
    // An unparsable leaf has no notAfter.
    let not_after = chain
        .first()
        .and_then(|c| weft_certs::not_after_of(c))
        .ok_or_else(|| TlsError::Identity {
            path: cert.to_owned(),
            error: weft_certs::CertIdentityError::Unparsable,
        })?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Read {
        path: key.to_owned(),
        error,
    })?;
    let setup = |e: rustls::Error| TlsError::Setup {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let mut config = match role {
        Role::Mesh { ca, .. } => {
            let mut roots = RootCertStore::empty();
            for ca_cert in certificates(ca)? {
                roots.add(ca_cert).map_err(|e| TlsError::BadCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                    .build()
                    .map_err(|e| TlsError::BadCa {
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
            let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(setup)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, private_key)
                .map_err(setup)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            config
        }
        Role::Admin => {
            let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
                .with_safe_default_protocol_versions()
                .map_err(setup)?
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
                .map_err(setup)?;
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            config
        }
    };
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Built {
        config: Arc::new(config),
        identity,
        not_after,
    })
}

/// The SPIFFE ID of `chain`'s leaf, which must be the control plane's.
fn control_plane_identity(
    chain: &[CertificateDer<'static>],
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, TlsError> {
    let expected = SpiffeId::for_control_plane(trust_domain);
    let identity = chain
        .first()
        .map(|c| weft_certs::spiffe_id_of(c))
        .transpose()
        .map_err(|error| TlsError::Identity {
            path: path.to_owned(),
            error,
        })?
        .ok_or_else(|| TlsError::NoCertificate {
            path: path.to_owned(),
        })?;
    if identity != expected {
        return Err(TlsError::WrongIdentity {
            path: path.to_owned(),
            found: identity,
            expected,
        });
    }
    Ok(identity)
}
