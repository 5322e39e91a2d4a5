//! Who called: the identity an mTLS connection's client certificate proves.

use std::fmt;
use std::sync::Arc;

use weft_config::{ServiceName, SpiffeId};

/// The authenticated identity of the sidecar that sent an inbound request,
/// from its client certificate. The inbound listener puts it in the request's
/// extensions for every request of an mTLS connection; a plaintext request
/// (allowed by `inbound.allow_plaintext`) has none. Cheap to clone (one
/// per request).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerIdentity(Arc<(SpiffeId, ServiceName)>);

impl CallerIdentity {
    /// The identity of a certificate naming `spiffe_id`, the SPIFFE ID of
    /// `service` (the TLS layer checks that before it makes one).
    pub fn new(spiffe_id: SpiffeId, service: ServiceName) -> Self {
        Self(Arc::new((spiffe_id, service)))
    }

    /// `spiffe://<trust-domain>/service/<name>`.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.0.0
    }

    /// The calling service's name.
    pub fn service(&self) -> &ServiceName {
        &self.0.1
    }
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spiffe_id().fmt(f)
    }
}
