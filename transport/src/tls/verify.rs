//! rustls resolvers and verifiers that read the current [`Material`] on every
//! handshake, so a rotation needs no new `ServerConfig` or `ClientConfig`.
//!
//! - [`CurrentCert`] presents the current certificate, as a server
//!   (`ResolvesServerCert`) and as a client (`ResolvesClientCert`).
//! - [`CallerVerifier`] (inbound): the client certificate must chain to the
//!   current CA, be valid for client authentication, and carry a Weft service
//!   identity of the mesh's trust domain.
//! - [`PeerVerifier`] (outbound, one per service called): the server
//!   certificate must chain to the current CA, be valid for server
//!   authentication, and carry exactly the identity of the service the caller
//!   meant to reach. The IP address the connection went to is not checked
//!   against the certificate: the identity is.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{SignatureScheme, client::ResolvesClientCert};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use weft_config::{SpiffeId, TrustDomain};

use super::identity::{IdentityError, identity_of, service_identity};
use super::material::Material;

/// The current material, swapped whole on rotation.
#[derive(Debug)]
pub struct Store {
    current: RwLock<Arc<Material>>,
    trust_domain: TrustDomain,
}

impl Store {
    pub fn new(material: Material, trust_domain: TrustDomain) -> Self {
        Self {
            current: RwLock::new(Arc::new(material)),
            trust_domain,
        }
    }

    pub fn current(&self) -> Arc<Material> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub fn replace(&self, material: Material) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(material);
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

/// A certificate refusal with a readable reason (shown in logs as is).
fn refused(error: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// The current certificate and key, for both sides of a connection.
#[derive(Debug)]
pub struct CurrentCert(pub Arc<Store>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().certified))
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Inbound: who may connect.
#[derive(Debug)]
pub struct CallerVerifier {
    pub store: Arc<Store>,
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for CallerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the CA can change under a running config, and a sidecar has
    /// one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let material = self.store.current();
        material
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        service_identity(end_entity, self.store.trust_domain()).map_err(refused)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Outbound: is this the service we meant to reach?
#[derive(Debug)]
pub struct PeerVerifier {
    pub store: Arc<Store>,
    pub provider: Arc<CryptoProvider>,
    pub expected: SpiffeId,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let material = self.store.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &material.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = identity_of(end_entity).map_err(refused)?;
        if found != self.expected {
            return Err(refused(IdentityError::Mismatch {
                found,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS failure in words: rustls's message, with our own certificate
/// refusals (wrong identity, ...) shown as their reason.
pub fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            format!("peer certificate refused: {inner}")
        }
        other => other.to_string(),
    }
}
