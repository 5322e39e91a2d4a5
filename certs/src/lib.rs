//! Development certificates for Weft's mTLS: a mesh CA, and service
//! certificates that carry a SPIFFE identity.
//!
//! **For development and tests.** A production mesh gets its certificates from
//! its own PKI (an internal CA, cert-manager, SPIRE, ...): all the sidecar
//! needs is a CA file and, per sidecar, a certificate with the URI SAN
//! `spiffe://<trust-domain>/service/<name>` and its key. `weftctl certs`, the
//! demo and the black-box tests use this crate.
//!
//! - [`Ca::generate`] makes a self-signed CA (ECDSA P-256) whose URI SAN is
//!   the trust domain's SPIFFE ID, `spiffe://<trust-domain>`;
//!   [`Ca::write`] stores it as `ca.pem` and `ca-key.pem`, [`Ca::load`] reads
//!   it back (the trust domain comes from that URI SAN).
//! - [`Ca::issue`] makes a service certificate (ECDSA P-256, a fresh key each
//!   time, so a fresh serial) with the URI SAN
//!   `spiffe://<trust-domain>/service/<name>`, plus the DNS SAN `<name>` and
//!   the IP SAN 127.0.0.1 (harmless: Weft checks only the SPIFFE ID), usable
//!   for both server and client authentication; [`Issued::write`] stores it
//!   as `<name>.pem` and `<name>-key.pem`.
//!
//! Private keys are written with mode 0600 and never appear in errors.
//!
//! [`spiffe_id_of`] reads the SPIFFE ID a certificate carries (sidecars and
//! the control plane check their peers with it), [`not_after_of`] when it
//! expires (the control plane's expiry gauge). Issuing (everything above)
//! is the `issue` feature, on by default; the sidecar leaves it off.

mod identity;
pub use identity::{CertIdentityError, not_after_of, spiffe_id_of};

#[cfg(feature = "issue")]
mod issue;
#[cfg(feature = "issue")]
pub use issue::*;
