//! mTLS between sidecars: this sidecar's identity, its rotation, and the TLS
//! configurations of both listeners' peers.
//!
//! Where TLS sits:
//! - inbound ([`accept`]): with `[tls]`, every connection to the inbound
//!   listener must be TLS 1.3 with a client certificate from the mesh CA whose
//!   SPIFFE ID names a service of the trust domain; the caller's
//!   [`CallerIdentity`] goes into every request's extensions. A plaintext
//!   connection (first byte not 0x16, a TLS handshake record) is refused
//!   unless the local service's policy says `inbound.allow_plaintext = true`.
//! - outbound ([`connect`]): connections to meshed endpoints (services pushed
//!   by the control plane, and static services with `tls = "mesh"`) are TLS
//!   1.3 with this sidecar's certificate, and the server must present exactly
//!   `spiffe://<td>/service/<the service called>`; anything else is a connect
//!   failure. ALPN offers `h2` (and `http/1.1` only for HTTP/1.1 upgrades), so
//!   sidecars multiplex every app's requests over HTTP/2.
//! - The outbound and admin listeners, and plaintext targets, are untouched.
//!
//! Identity rules: the certificate of a sidecar with `[service]` must carry
//! `spiffe://<trust_domain>/service/<[service] name>`; a caller-only sidecar's
//! any `spiffe://<trust_domain>/service/<name>`, which is then its identity
//! (its callees see it as that service). Rotations must keep the identity.
//!
//! Rotation ([`MeshTls::refresh`]): the three files are checked every
//! `[tls] watch_interval` (and on SIGHUP or `POST /reload`, which also report
//! files still refused); when any changed
//! they are loaded together ([`Material::load`]) and, if consistent, swapped
//! into the [`Store`] that the resolvers and verifiers read on every handshake.
//! New handshakes use the new material; established connections are not
//! touched. Inconsistent files are logged and ignored (once per change), and
//! the current material stays. Session resumption is off on both sides, so
//! every connection is verified against the CA in force when it is made.
//!
//! Failed handshakes, on both sides, are reported to the
//! [`HandshakeObserver`] given to [`MeshTls::load`] (the sidecar counts them);
//! this module knows nothing of metrics.

pub mod accept;
pub mod connect;
pub mod identity;
pub mod material;
pub mod verify;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::{Resumption, WantsClientCert};
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ConfigBuilder, ServerConfig, WantsVerifier};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_config::{Loaded, ServiceName, SpiffeId};

pub use self::identity::CallerIdentity;
use self::material::{Expected, Paths, Stamps};
pub use self::material::{Material, MaterialError};
use self::verify::{CallerVerifier, CurrentCert, PeerVerifier, Store};

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Which side of a mesh connection a handshake was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The inbound listener accepted the connection ([`accept`]).
    Inbound,
    /// This sidecar connected to an endpoint ([`connect`]).
    Outbound,
}

/// Hears of every failed mesh handshake, on both sides. Called on the
/// connection's task: it must not block (counting is what it is for).
pub trait HandshakeObserver: Send + Sync {
    /// A handshake on `side` failed; `reason` is one of a fixed set
    /// (`plaintext`, `timeout`, `error`, `certificate`).
    fn handshake_failed(&self, side: Side, reason: &'static str);
}

/// Failed handshakes go unheard (`weft-proxy check`, tests).
impl HandshakeObserver for () {
    fn handshake_failed(&self, _: Side, _: &'static str) {}
}

/// What the watcher saw last.
#[derive(Debug)]
struct Watched {
    /// The files as they were when the current material was loaded.
    applied: Stamps,
    /// Files already refused (so a bad file is reported once, not every tick).
    rejected: Option<Stamps>,
}

/// This sidecar's mesh identity and the TLS configurations built over it.
pub struct MeshTls {
    paths: Paths,
    expected: Expected,
    provider: Arc<CryptoProvider>,
    store: Arc<Store>,
    server: Arc<ServerConfig>,
    client: ConfigBuilder<ClientConfig, WantsVerifier>,
    watch_interval: Duration,
    watched: Mutex<Watched>,
    /// Hears of every failed handshake, inbound and outbound.
    observer: Arc<dyn HandshakeObserver>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("paths", &self.paths)
            .field("expected", &self.expected)
            .field("identity", &self.store.current().identity)
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Loads `[tls]` of `loaded`, if present, and checks the identity;
    /// `observer` hears of every failed handshake, inbound and outbound.
    pub fn load(
        loaded: &Loaded,
        observer: Arc<dyn HandshakeObserver>,
    ) -> Result<Option<Arc<Self>>, MaterialError> {
        let Some(tls) = &loaded.bootstrap.tls else {
            return Ok(None);
        };
        let paths = Paths {
            ca: loaded.resolve(&tls.ca),
            cert: loaded.resolve(&tls.cert),
            key: loaded.resolve(&tls.key),
        };
        let expected = match &loaded.bootstrap.service {
            Some(s) => Expected::Service(SpiffeId::for_service(&tls.trust_domain, &s.name)),
            None => Expected::AnyService(tls.trust_domain.clone()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = Stamps::read(&paths);
        let material = Material::load(&paths, &expected, &provider)?;
        // A caller-only sidecar's identity is whatever its first certificate
        // says; rotations keep it.
        let expected = Expected::Service(material.identity.clone());
        tracing::info!(
            identity = %material.identity,
            serial = %material.serial,
            not_after = %material.not_after,
            "mTLS identity loaded"
        );
        let store = Arc::new(Store::new(material, tls.trust_domain.clone()));

        let setup = |e: rustls::Error| MaterialError::Setup(e.to_string());
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_client_cert_verifier(Arc::new(CallerVerifier {
                store: Arc::clone(&store),
                provider: Arc::clone(&provider),
            }))
            .with_cert_resolver(Arc::new(CurrentCert(Arc::clone(&store))));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?;

        Ok(Some(Arc::new(Self {
            paths,
            expected,
            provider,
            store,
            server: Arc::new(server),
            client,
            watch_interval: tls.watch_interval.get(),
            watched: Mutex::new(Watched {
                applied: stamps,
                rejected: None,
            }),
            observer,
        })))
    }

    /// This sidecar's identity.
    pub fn identity(&self) -> SpiffeId {
        self.store.current().identity.clone()
    }

    /// The material in force now.
    pub fn current(&self) -> Arc<Material> {
        self.store.current()
    }

    /// The inbound listener's TLS configuration.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// A client configuration for connections to `service`'s endpoints,
    /// offering `alpn`: the server must be `spiffe://<td>/service/<service>`.
    pub fn client_config(&self, service: &ServiceName, alpn: &[u8]) -> Arc<ClientConfig> {
        let expected = SpiffeId::for_service(self.store.trust_domain(), service);
        self.client_config_for(expected, alpn)
    }

    /// A client configuration for the control plane (`https://` addresses):
    /// HTTP/2, and the server must be `spiffe://<td>/control-plane`.
    pub fn control_plane_client_config(&self) -> Arc<ClientConfig> {
        let expected = SpiffeId::for_control_plane(self.store.trust_domain());
        self.client_config_for(expected, ALPN_H2)
    }

    fn client_config_for(&self, expected: SpiffeId, alpn: &[u8]) -> Arc<ClientConfig> {
        let builder: ConfigBuilder<ClientConfig, WantsClientCert> = self
            .client
            .clone()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier {
                store: Arc::clone(&self.store),
                provider: Arc::clone(&self.provider),
                expected,
            }));
        let mut config =
            builder.with_client_cert_resolver(Arc::new(CurrentCert(Arc::clone(&self.store))));
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Arc::new(config)
    }

    /// Re-reads the files if they changed since they were applied, swapping
    /// the new material in if it is consistent. Files already refused are
    /// not read again (so the watcher reports a bad file once) unless
    /// `recheck_refused` (a reload asked for: it fails again, loudly).
    /// `Ok(true)`: new material is in force; `Ok(false)`: nothing to do;
    /// `Err`: refused, the current material stays. Blocking file I/O: call it
    /// off the runtime's workers.
    pub fn refresh(&self, recheck_refused: bool) -> Result<bool, MaterialError> {
        let mut watched = self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamps = Stamps::read(&self.paths);
        if stamps == watched.applied
            || (!recheck_refused && watched.rejected.as_ref() == Some(&stamps))
        {
            return Ok(false);
        }
        match Material::load(&self.paths, &self.expected, &self.provider) {
            Ok(material) => {
                tracing::info!(
                    identity = %material.identity,
                    serial = %material.serial,
                    not_after = %material.not_after,
                    "TLS certificate reloaded; new connections use it"
                );
                self.store.replace(material);
                watched.applied = stamps;
                watched.rejected = None;
                Ok(true)
            }
            Err(error) => {
                let current = self.store.current();
                tracing::error!(
                    %error,
                    identity = %current.identity,
                    serial = %current.serial,
                    "new TLS files refused; keeping the current certificate"
                );
                watched.rejected = Some(stamps);
                Err(error)
            }
        }
    }

    /// Checks the files every `watch_interval` until `stop`.
    pub fn watch(self: &Arc<Self>, tasks: &TaskTracker, stop: CancellationToken) {
        let this = Arc::clone(self);
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(this.watch_interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let tls = Arc::clone(&this);
                // Refusals are logged by refresh itself.
                let _ = tokio::task::spawn_blocking(move || tls.refresh(false)).await;
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use weft_certs::{Ca, Issued};
    use weft_config::TrustDomain;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    /// Writes `issued` as the sidecar's cert.pem / key.pem (atomically).
    fn install(dir: &Path, issued: &Issued) {
        write(dir, "cert.pem", issued.cert_pem());
        write(dir, "key.pem", issued.key_pem());
    }

    fn write(dir: &Path, file: &str, text: &str) {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }

    /// A sidecar bootstrap (`service`: its `[service]` name, if any) with
    /// `[tls]` over ca.pem / cert.pem / key.pem in `dir`.
    fn load(dir: &Path, service: Option<&str>) -> Result<Arc<MeshTls>, MaterialError> {
        let mut text = String::new();
        if let Some(service) = service {
            text.push_str(&format!(
                "[service]\nname = \"{service}\"\napp = \"127.0.0.1:9\"\n"
            ));
        }
        text.push_str("[tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
        std::fs::write(dir.join("weft.toml"), text).unwrap();
        let loaded = weft_config::load_bootstrap(&dir.join("weft.toml")).unwrap();
        MeshTls::load(&loaded, Arc::new(())).map(|t| t.unwrap())
    }

    fn leaf(tls: &MeshTls) -> Vec<u8> {
        tls.current().chain()[0].to_vec()
    }

    #[test]
    fn the_certificate_must_carry_the_service_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(&td()).unwrap();
        write(dir.path(), "ca.pem", ca.cert_pem());
        install(dir.path(), &ca.issue(&name("orders"), DAY).unwrap());
        let err = load(dir.path(), Some("billing")).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "the certificate is spiffe://weft.local/service/orders, but this sidecar \
                 must be spiffe://weft.local/service/billing"
            ),
            "{err}"
        );
        let tls = load(dir.path(), None).unwrap();
        assert_eq!(
            tls.identity().to_string(),
            "spiffe://weft.local/service/orders",
            "a caller-only sidecar takes its certificate's identity"
        );
        assert!(!format!("{tls:?}{:?}", tls.current()).contains("PRIVATE"));
    }

    #[test]
    fn rotation_swaps_in_good_files_and_keeps_the_old_material_on_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::generate(&td()).unwrap();
        write(d, "ca.pem", ca.cert_pem());
        let first = ca.issue(&name("billing"), DAY).unwrap();
        install(d, &first);
        let tls = load(d, Some("billing")).unwrap();
        assert_eq!(leaf(&tls), first.cert_der());
        assert!(!tls.refresh(false).unwrap(), "nothing changed");

        // A new certificate and key: swapped in.
        let second = ca.issue(&name("billing"), DAY).unwrap();
        install(d, &second);
        assert!(tls.refresh(false).unwrap());
        assert_eq!(leaf(&tls), second.cert_der());

        // Each bad change is refused and the current material stays.
        let third = ca.issue(&name("billing"), DAY).unwrap();
        let other_ca = Ca::generate(&td()).unwrap();
        let orders = ca.issue(&name("orders"), DAY).unwrap();
        let foreign = other_ca.issue(&name("billing"), DAY).unwrap();
        let cases: [(&str, &dyn Fn()); 5] = [
            ("not a certificate", &|| write(d, "cert.pem", "garbage\n")),
            ("key mismatch", &|| write(d, "cert.pem", third.cert_pem())),
            ("wrong identity", &|| install(d, &orders)),
            ("another CA", &|| install(d, &foreign)),
            ("missing key", &|| {
                std::fs::remove_file(d.join("key.pem")).unwrap();
            }),
        ];
        for (what, change) in cases {
            install(d, &second);
            tls.refresh(false).expect("the good files again");
            change();
            let err = tls.refresh(false).expect_err(what);
            assert_eq!(leaf(&tls), second.cert_der(), "{what}: old material kept");
            assert!(
                !tls.refresh(false).unwrap(),
                "{what}: refused once, not every tick"
            );
            assert!(!err.to_string().contains("PRIVATE"), "{what}: {err}");
            match (what, &err) {
                ("not a certificate", MaterialError::Pem { .. })
                | ("key mismatch", MaterialError::KeyMismatch { .. })
                | ("wrong identity", MaterialError::WrongIdentity { .. })
                | ("another CA", MaterialError::NotTrusted { .. })
                | ("missing key", MaterialError::Read { .. }) => {}
                _ => panic!("{what}: unexpected {err:?}"),
            }
        }

        // A reload re-checks refused files and fails again.
        assert!(tls.refresh(true).is_err());
        // Fixed files are picked up; applied files are not read again.
        install(d, &third);
        assert!(tls.refresh(false).unwrap());
        assert_eq!(leaf(&tls), third.cert_der());
        assert!(!tls.refresh(true).unwrap());
    }

    #[test]
    fn a_new_ca_is_accepted_with_certificates_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = Ca::generate(&td()).unwrap();
        write(d, "ca.pem", old.cert_pem());
        install(d, &old.issue(&name("billing"), DAY).unwrap());
        let tls = load(d, Some("billing")).unwrap();

        // The new CA alone does not vouch for the current certificate.
        let new = Ca::generate(&td()).unwrap();
        write(d, "ca.pem", new.cert_pem());
        assert!(matches!(
            tls.refresh(false),
            Err(MaterialError::NotTrusted { .. })
        ));
        // Both CAs in the bundle, and a certificate from the new one: fine.
        write(
            d,
            "ca.pem",
            &format!("{}{}", old.cert_pem(), new.cert_pem()),
        );
        let renewed = new.issue(&name("billing"), DAY).unwrap();
        install(d, &renewed);
        assert!(tls.refresh(false).unwrap());
        assert_eq!(leaf(&tls), renewed.cert_der());
        assert_eq!(tls.current().roots.len(), 2);
    }
}
