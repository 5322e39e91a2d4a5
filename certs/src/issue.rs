//! Making a development CA and issuing certificates (the `issue` feature).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use weft_config::{ServiceName, SpiffeId, TrustDomain};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates are valid from this long before they are made (clock skew).
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The file stem of the control plane's certificate files.
pub const CONTROL_PLANE_FILE_STEM: &str = "control-plane";

/// What went wrong making, reading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("the validity period is out of range")]
    Validity,
}

/// A mesh CA that can issue service certificates.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn validity(from: OffsetDateTime, length: Duration) -> Result<OffsetDateTime, CertError> {
    let length = time::Duration::try_from(length).map_err(|_| CertError::Validity)?;
    from.checked_add(length).ok_or(CertError::Validity)
}

impl Ca {
    /// A new self-signed CA for `trust_domain`.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Weft development CA ({trust_domain})"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Weft");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            SpiffeId::for_trust_domain(trust_domain)
                .to_string()
                .try_into()?,
        )];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = validity(now, CA_VALIDITY)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM); the trust domain is the
    /// certificate's `spiffe://<trust-domain>` URI SAN.
    pub fn from_pem(cert_pem: &str, key_pem: &str, path: &Path) -> Result<Self, CertError> {
        let invalid = |problem: String| CertError::Invalid {
            path: path.to_owned(),
            problem,
        };
        let trust_domain = trust_domain_of(cert_pem).map_err(invalid)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| invalid(format!("{CA_KEY_FILE} holds no usable private key")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| {
            invalid(format!(
                "{CA_CERT_FILE} is not a usable CA certificate: {e}"
            ))
        })?;
        Ok(Self {
            trust_domain,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA in `dir` (`ca.pem`, `ca-key.pem`).
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert = read(&dir.join(CA_CERT_FILE))?;
        let key = read(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(&cert, &key, dir)
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        write(&cert, &self.cert_pem, false)?;
        write(&key, &self.issuer.key().serialize_pem(), true)?;
        Ok(vec![cert, key])
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, PEM: the `[tls] ca` file.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `service`, valid for `valid_for` from now.
    pub fn issue(&self, service: &ServiceName, valid_for: Duration) -> Result<Issued, CertError> {
        self.issue_for(
            SpiffeId::for_service(&self.trust_domain, service),
            service.as_str(),
            &[service.as_str()],
            valid_for,
        )
    }

    /// A certificate for the control plane
    /// (`spiffe://<trust-domain>/control-plane`), valid for `valid_for` from
    /// now; `sans` (DNS names or IP addresses) are added as subject
    /// alternative names for clients that check them: sidecars check the
    /// SPIFFE ID, `weftctl` over `https://` the name or address it dialled.
    pub fn issue_control_plane(
        &self,
        sans: &[&str],
        valid_for: Duration,
    ) -> Result<Issued, CertError> {
        self.issue_for(
            SpiffeId::for_control_plane(&self.trust_domain),
            CONTROL_PLANE_FILE_STEM,
            sans,
            valid_for,
        )
    }

    /// `hosts`: DNS names or IP addresses, as subject alternative names
    /// beside the SPIFFE ID (and 127.0.0.1, always).
    fn issue_for(
        &self,
        identity: SpiffeId,
        name: &str,
        hosts: &[&str],
        valid_for: Duration,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Weft");
        let mut sans = vec![SanType::URI(identity.to_string().try_into()?)];
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for host in hosts {
            // An IP address is an IP SAN (a DNS SAN never matches one).
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*host).try_into()?),
            };
            if !sans.contains(&san) && san != SanType::IpAddress(localhost) {
                sans.push(san);
            }
        }
        sans.push(SanType::IpAddress(localhost));
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = validity(now, valid_for)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            file_stem: name.to_owned(),
            identity,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A service certificate and its key.
pub struct Issued {
    /// `<name>` of the file names.
    file_stem: String,
    identity: SpiffeId,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issued")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// `spiffe://<trust-domain>/service/<name>`.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The certificate, PEM: the `[tls] cert` file.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate, DER (what a TLS peer sees).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The private key, PEM (PKCS#8): the `[tls] key` file.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The file names [`Issued::write`] uses for a service: `<name>.pem`,
    /// `<name>-key.pem` (the control plane's: `control-plane.pem`,
    /// `control-plane-key.pem`).
    pub fn file_names(service: &ServiceName) -> (String, String) {
        file_names(service.as_str())
    }

    /// Writes `<name>.pem` and `<name>-key.pem` (mode 0600) into `dir`,
    /// creating it. Each file is replaced atomically (written beside it, then
    /// renamed), so a sidecar watching them never reads half a file.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
        let (cert_name, key_name) = file_names(&self.file_stem);
        let (cert, key) = (dir.join(cert_name), dir.join(key_name));
        write(&key, &self.key_pem, true)?;
        write(&cert, &self.cert_pem, false)?;
        Ok(vec![cert, key])
    }
}

fn file_names(stem: &str) -> (String, String) {
    (format!("{stem}.pem"), format!("{stem}-key.pem"))
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `text` to `path` through a temporary file and a rename; `secret`
/// files are created with mode 0600.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    let failed = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let mut staging = path.as_os_str().to_owned();
    staging.push(".tmp");
    let staging = PathBuf::from(staging);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&staging).map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    std::fs::rename(&staging, path).map_err(failed)
}

/// The trust domain a CA certificate names in its `spiffe://<td>` URI SAN.
fn trust_domain_of(cert_pem: &str) -> Result<TrustDomain, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|_| format!("{CA_CERT_FILE} is not a PEM certificate"))?;
    let cert = pem
        .parse_x509()
        .map_err(|_| format!("{CA_CERT_FILE} is not a valid X.509 certificate"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| format!("{CA_CERT_FILE} has an invalid subject alternative name"))?;
    let uris = san.iter().flat_map(|ext| &ext.value.general_names);
    for name in uris {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Ok(id) = SpiffeId::parse(uri)
            && id.path().is_empty()
        {
            return Ok(id.trust_domain().clone());
        }
    }
    Err(format!(
        "{CA_CERT_FILE} names no trust domain (a URI SAN like spiffe://weft.local); \
         was it made by `weftctl certs ca`?"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_spiffe_certificates_and_survives_a_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::generate(&td).unwrap();
        let written = ca.write(dir.path()).unwrap();
        assert_eq!(written.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), &td);
        let billing: ServiceName = "billing".parse().unwrap();
        let a = loaded.issue(&billing, DEFAULT_VALIDITY).unwrap();
        let b = loaded.issue(&billing, DEFAULT_VALIDITY).unwrap();
        assert_eq!(
            a.identity().to_string(),
            "spiffe://example.org/service/billing"
        );
        assert_ne!(
            a.cert_der(),
            b.cert_der(),
            "a fresh key and serial each time"
        );
        a.write(dir.path()).unwrap();
        assert!(dir.path().join("billing.pem").is_file());
        assert!(dir.path().join("billing-key.pem").is_file());

        let (_, pem) = x509_parser::pem::parse_x509_pem(a.cert_pem().as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject(), "issued by the loaded CA");
        let names = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap());
        assert!(
            names.contains("spiffe://example.org/service/billing"),
            "{names}"
        );
        assert!(!format!("{a:?}{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_foreign_ca_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = Ca::from_pem(&cert.pem(), &key.serialize_pem(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("names no trust domain"), "{err}");
        let err = Ca::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
    }

    #[test]
    fn the_control_plane_certificate_carries_dns_and_ip_sans_beside_its_spiffe_id() {
        use x509_parser::extensions::GeneralName;
        let ca = Ca::generate(&TrustDomain::default()).unwrap();
        let issued = ca
            .issue_control_plane(
                &["weft-cp.internal", "10.0.0.5", "::1", "127.0.0.1"],
                DEFAULT_VALIDITY,
            )
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(issued.cert_der()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let mut names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{}", ip.len()),
                other => format!("{other:?}"),
            })
            .collect();
        names.sort();
        // 127.0.0.1 once (it is always there), ::1 as a 16-byte IP SAN.
        assert_eq!(
            names,
            [
                "dns:weft-cp.internal",
                "ip:16",
                "ip:4",
                "ip:4",
                "uri:spiffe://weft.local/control-plane"
            ]
        );
        // Still exactly one URI SAN: the identity sidecars check.
        assert_eq!(
            crate::spiffe_id_of(issued.cert_der()).unwrap().to_string(),
            "spiffe://weft.local/control-plane"
        );
    }
}
