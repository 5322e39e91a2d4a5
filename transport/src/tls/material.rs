//! One consistent set of TLS material: the mesh CA, this sidecar's
//! certificate chain and key, and the identity the certificate carries.
//!
//! [`Material::load`] reads the three PEM files and accepts them only together
//! and only if they are consistent: the key matches the certificate, the
//! certificate chains to the CA and is valid now for both server and client
//! authentication, and it carries the identity this sidecar must have. Any
//! failure is a [`MaterialError`] naming the file and the problem (never key
//! material). [`Stamps`] tell whether the files changed since they were read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use weft_config::{ServiceName, SpiffeId, TrustDomain};

use super::identity::{IdentityError, identity_of};

/// The three files, resolved against the bootstrap file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The identity this sidecar's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// `spiffe://<td>/service/<name>` of the `[service]` it fronts.
    Service(SpiffeId),
    /// A caller-only sidecar: any `spiffe://<td>/service/<name>`.
    AnyService(TrustDomain),
}

/// Why a set of TLS files was refused.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Pem { path: PathBuf, problem: String },
    #[error("{key} does not hold the private key of the certificate in {cert} ({reason})")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: rustls::Error,
    },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("{path}: the certificate is {found}, but this sidecar must be {expected}")]
    WrongIdentity {
        path: PathBuf,
        found: SpiffeId,
        expected: String,
    },
    #[error("{cert}: the certificate is not valid with the CA in {ca}: {reason}")]
    NotTrusted {
        cert: PathBuf,
        ca: PathBuf,
        reason: rustls::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Setup(String),
}

/// The loaded material; swapped as a whole on rotation.
pub struct Material {
    /// This sidecar's identity, from its certificate.
    pub identity: SpiffeId,
    /// The certificate's serial number (hex), for logs.
    pub serial: String,
    /// When the certificate expires, for logs.
    pub not_after: String,
    pub(super) certified: Arc<CertifiedKey>,
    pub(super) roots: Arc<RootCertStore>,
    pub(super) client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|source| MaterialError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, problem: impl Into<String>) -> MaterialError {
    MaterialError::Pem {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Every certificate of a PEM file, at least one.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            format!("no CERTIFICATE block: expected {what}"),
        ));
    }
    Ok(certs)
}

impl Material {
    /// Reads and checks the files; `provider` gives the key loader and the
    /// signature algorithms.
    pub fn load(
        paths: &Paths,
        expected: &Expected,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, MaterialError> {
        let ca = certificates(&paths.ca, "the mesh CA certificate")?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| pem_error(&paths.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&paths.cert, "this sidecar's certificate")?;
        let key_text = read(&paths.key)?;
        // The parse error never quotes the file: it may be a key.
        let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|_| {
            pem_error(
                &paths.key,
                "no private key (PKCS#8, PKCS#1 or SEC1 PEM block) found",
            )
        })?;
        let certified = CertifiedKey::from_der(chain.clone(), key, provider).map_err(|reason| {
            MaterialError::KeyMismatch {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
                reason,
            }
        })?;

        let leaf = &chain[0];
        let identity = identity_of(leaf).map_err(|source| MaterialError::Identity {
            path: paths.cert.clone(),
            source,
        })?;
        let wrong = |expected: String| MaterialError::WrongIdentity {
            path: paths.cert.clone(),
            found: identity.clone(),
            expected,
        };
        match expected {
            Expected::Service(id) if *id != identity => return Err(wrong(id.to_string())),
            Expected::AnyService(td)
                if identity.trust_domain() != td || identity.service().is_none() =>
            {
                return Err(wrong(format!("spiffe://{td}/service/<name>")));
            }
            _ => {}
        }

        // The certificate must be valid now, with this CA, for both sides of
        // a connection: this sidecar serves with it and calls with it.
        let not_trusted = |reason| MaterialError::NotTrusted {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            reason,
        };
        let now = UnixTime::now();
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(not_trusted)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(not_trusted)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|e| MaterialError::Setup(e.to_string()))?;
        client_verifier
            .verify_client_cert(leaf, &chain[1..], now)
            .map_err(not_trusted)?;

        let (serial, not_after) = summary(leaf);
        Ok(Self {
            identity,
            serial,
            not_after,
            certified: Arc::new(certified),
            roots,
            client_verifier,
        })
    }

    /// The service this sidecar's certificate names.
    pub fn service(&self) -> Option<ServiceName> {
        self.identity.service()
    }

    /// The certificate chain presented to peers (DER), leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// When the certificate expires (its notAfter), in seconds since the
    /// Unix epoch, for the expiry gauge; `None` if it cannot be parsed
    /// (loaded material always can).
    pub fn not_after_unix(&self) -> Option<i64> {
        let (_, cert) = x509_parser::parse_x509_certificate(self.chain().first()?).ok()?;
        Some(cert.validity().not_after.timestamp())
    }
}

/// A certificate's serial number (hex) and expiry, for logs.
fn summary(der: &[u8]) -> (String, String) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => (
            cert.raw_serial_as_string(),
            cert.validity().not_after.to_string(),
        ),
        Err(_) => (String::new(), String::new()),
    }
}

/// What the files looked like when they were read: size, modification time
/// and inode of each (a file replaced by a rename gets a new inode even
/// within one mtime tick). A missing file has no stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamps([Option<(u64, SystemTime, u64)>; 3]);

impl Stamps {
    pub fn read(paths: &Paths) -> Self {
        let stamp = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Some((meta.len(), meta.modified().ok()?, inode))
        };
        Self([stamp(&paths.ca), stamp(&paths.cert), stamp(&paths.key)])
    }
}
