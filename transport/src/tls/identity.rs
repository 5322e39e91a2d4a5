//! Identities in certificates: the SPIFFE ID a certificate carries, and the
//! authenticated caller of an inbound request.
//!
//! An X.509 SVID carries exactly one URI subject alternative name, its SPIFFE
//! ID ([`identity_of`]). A peer sidecar's ID must also name a Weft service
//! (`spiffe://<trust-domain>/service/<name>`) of this mesh's trust domain
//! ([`service_identity`]); anything else is refused in the handshake.

use weft_config::{SpiffeId, TrustDomain};

/// Why a certificate's identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Certificate(#[from] weft_certs::CertIdentityError),
    #[error("{found} is not in trust domain {expected}")]
    ForeignTrustDomain {
        found: SpiffeId,
        expected: TrustDomain,
    },
    #[error("{0} names no service (expected spiffe://<trust-domain>/service/<name>)")]
    NotAService(SpiffeId),
    #[error("the peer is {found}, expected {expected}")]
    Mismatch { found: SpiffeId, expected: SpiffeId },
}

/// The SPIFFE ID in a DER certificate: its one URI SAN.
pub fn identity_of(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    Ok(weft_certs::spiffe_id_of(der)?)
}

/// The Weft service a peer's certificate authenticates, which must be in
/// `trust_domain`.
pub fn service_identity(
    der: &[u8],
    trust_domain: &TrustDomain,
) -> Result<CallerIdentity, IdentityError> {
    let id = identity_of(der)?;
    if id.trust_domain() != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            found: id,
            expected: trust_domain.clone(),
        });
    }
    match id.service() {
        Some(service) => Ok(CallerIdentity::new(id, service)),
        None => Err(IdentityError::NotAService(id)),
    }
}

pub use weft_core::identity::CallerIdentity;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_service_certificate_carries_its_identity() {
        let td: TrustDomain = "weft.local".parse().unwrap();
        let ca = weft_certs::Ca::generate(&td).unwrap();
        let issued = ca
            .issue(&"billing".parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
        let id = identity_of(issued.cert_der()).unwrap();
        assert_eq!(id.to_string(), "spiffe://weft.local/service/billing");
        let caller = service_identity(issued.cert_der(), &td).unwrap();
        assert_eq!(caller.service().as_str(), "billing");
        assert_eq!(caller.to_string(), "spiffe://weft.local/service/billing");

        let other: TrustDomain = "example.org".parse().unwrap();
        assert_eq!(
            service_identity(issued.cert_der(), &other)
                .unwrap_err()
                .to_string(),
            "spiffe://weft.local/service/billing is not in trust domain example.org"
        );
        assert_eq!(
            identity_of(b"junk"),
            Err(IdentityError::Certificate(
                weft_certs::CertIdentityError::Unparsable
            ))
        );
    }

    #[test]
    fn certificates_without_exactly_one_spiffe_uri_are_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let make = |sans: Vec<rcgen::SanType>| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let dns = rcgen::SanType::DnsName("billing".try_into().unwrap());
        assert_eq!(
            identity_of(&make(vec![dns])),
            Err(IdentityError::Certificate(
                weft_certs::CertIdentityError::NoSpiffeId
            ))
        );
        assert_eq!(
            identity_of(&make(vec![
                uri("spiffe://weft.local/service/a"),
                uri("spiffe://weft.local/service/b")
            ])),
            Err(IdentityError::Certificate(
                weft_certs::CertIdentityError::SeveralUris(2)
            ))
        );
        assert!(matches!(
            identity_of(&make(vec![uri("https://billing.example/")])),
            Err(IdentityError::Certificate(
                weft_certs::CertIdentityError::Invalid(_)
            ))
        ));
        let td: TrustDomain = "weft.local".parse().unwrap();
        assert!(matches!(
            service_identity(&make(vec![uri("spiffe://weft.local/ns/x")]), &td),
            Err(IdentityError::NotAService(_))
        ));
    }
}
