//! The SPIFFE ID in a certificate: an X.509 SVID carries exactly one URI
//! subject alternative name, its SPIFFE ID. Sidecars and the control plane
//! read their peers' identities with [`spiffe_id_of`].

use weft_config::SpiffeId;
use x509_parser::extensions::GeneralName;

/// Why a certificate carries no usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate has no URI SAN (a SPIFFE ID like spiffe://weft.local/service/NAME)")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; an X.509 SVID has exactly one")]
    SeveralUris(usize),
    #[error("{0}")]
    Invalid(#[from] weft_config::InvalidIdentity),
}

/// The SPIFFE ID in a DER certificate: its one URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertIdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| CertIdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertIdentityError::Unparsable)?
        .ok_or(CertIdentityError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(CertIdentityError::NoSpiffeId),
        [uri] => Ok(SpiffeId::parse(uri)?),
        _ => Err(CertIdentityError::SeveralUris(uris.len())),
    }
}

/// When a DER certificate expires (its notAfter), in seconds since the Unix
/// epoch; `None` if it cannot be parsed.
pub fn not_after_of(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(all(test, feature = "issue"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::Ca;

    #[test]
    fn reads_the_identity_of_issued_certificates() {
        let ca = Ca::generate(&"weft.test".parse().unwrap()).unwrap();
        let billing = ca
            .issue(&"billing".parse().unwrap(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            spiffe_id_of(billing.cert_der()).unwrap().to_string(),
            "spiffe://weft.test/service/billing"
        );
        let cp = ca
            .issue_control_plane(&["weft-cp.internal"], Duration::from_secs(60))
            .unwrap();
        let id = spiffe_id_of(cp.cert_der()).unwrap();
        assert_eq!(id.to_string(), "spiffe://weft.test/control-plane");
        assert_eq!(id.service(), None);
        assert_eq!(
            spiffe_id_of(b"not a certificate"),
            Err(CertIdentityError::Unparsable)
        );
    }

    #[test]
    fn reads_when_a_certificate_expires() {
        let ca = Ca::generate(&"weft.test".parse().unwrap()).unwrap();
        let day = ca
            .issue(&"billing".parse().unwrap(), Duration::from_secs(86_400))
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let not_after = not_after_of(day.cert_der()).unwrap();
        assert!(
            (now + 86_400 - 600..=now + 86_400 + 600).contains(&not_after),
            "{not_after} is not a day after {now}"
        );
        assert_eq!(not_after_of(b"not a certificate"), None);
    }
}
