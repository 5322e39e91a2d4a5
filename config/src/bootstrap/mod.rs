//! The sidecar bootstrap file, owned by ops: which service this sidecar
//! fronts, where it listens, how it resolves names, and (in standalone mode)
//! the static directory of services it may call.
//!
//! Field names are the TOML keys. Every table but `[service]` may be left out;
//! each key's default is set in exactly one place, the type's `Default` impl
//! (or a `DEFAULT_*` constant for a key of a table with required keys), and is
//! documented on the field. Single values are checked as they deserialize;
//! rules across keys (listeners on distinct addresses, unique service names,
//! non-empty endpoint lists, ...) live in the private `validate` module and run
//! in [`crate::parse_bootstrap`] before a `Bootstrap` is handed out.

mod validate;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::duration::{self, Duration};
use crate::identity::TrustDomain;
use crate::name::ServiceName;
use crate::number::{self, Ratio, Weight};
use crate::size::{self, ByteSize};
use crate::text::{socket_addr, socket_addrs};

/// A whole bootstrap file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a bootstrap document")]
pub struct Bootstrap {
    /// The instance this sidecar fronts; `None` for a caller-only sidecar.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub service: Option<LocalService>,
    /// Listener addresses.
    #[serde(default)]
    pub listen: Listen,
    /// The control plane; `None` for standalone mode.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub control_plane: Option<ControlPlane>,
    /// Name resolution for destinations not in the directory.
    #[serde(default)]
    pub dns: Dns,
    /// Shutdown behaviour.
    #[serde(default)]
    pub drain: Drain,
    /// The connection pool to endpoints.
    #[serde(default)]
    pub pool: Pool,
    /// Static service entries, for standalone mode.
    #[serde(default)]
    pub directory: Directory,
    /// Traces and the access log.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// What every listener accepts from clients (hardening against hostile
    /// input).
    #[serde(default)]
    pub limits: Limits,
    /// This sidecar's mesh identity; `None`: no mTLS (plaintext between sidecars).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls: Option<Tls>,
}

/// `[tls]`: the sidecar's identity certificate and the mesh CA, for mTLS
/// between sidecars. The files are PEM, relative to the bootstrap file's
/// directory (see [`crate::Loaded::resolve`]); the sidecar re-reads them when
/// they change. Only the paths appear here (and in `/config`), never the
/// content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct Tls {
    /// The mesh CA certificate(s): peers' certificates must chain to one.
    pub ca: PathBuf,
    /// This sidecar's certificate (then any intermediates).
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The SPIFFE trust domain of the mesh. Default `weft.local`.
    #[serde(default)]
    pub trust_domain: TrustDomain,
    /// How often the files' modification times are checked; longer than 0.
    /// Default `5s`.
    #[serde(
        default = "Tls::default_watch_interval",
        deserialize_with = "duration::positive"
    )]
    pub watch_interval: Duration,
    /// Who may call this sidecar's service when its policy (and the matched
    /// route) has no `allow` list. Default `allow-meshed`.
    #[serde(default, skip_serializing_if = "DefaultInbound::is_default")]
    pub default_inbound: DefaultInbound,
}

/// `[tls] default_inbound`: the mesh-wide authorization rule for services
/// whose policy says nothing (no `inbound.allow`, no route `allow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultInbound {
    /// Any caller with a certificate of the mesh (and, with
    /// `inbound.allow_plaintext`, plaintext callers).
    #[default]
    AllowMeshed,
    /// No caller: a service is called only by those its policy lists.
    Deny,
}

impl DefaultInbound {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Tls {
    /// `watch_interval` when the key is absent.
    pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);

    fn default_watch_interval() -> Duration {
        Self::DEFAULT_WATCH_INTERVAL
    }
}

/// `[service]`: the service instance behind this sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct LocalService {
    /// The service's name, which is also the identity it calls others with.
    pub name: ServiceName,
    /// Where the local app listens; inbound traffic is forwarded here.
    #[serde(deserialize_with = "socket_addr")]
    pub app: SocketAddr,
    /// The service's policy file, relative to the bootstrap file's directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy: Option<PathBuf>,
    /// How many instances of the service run, in standalone mode; a
    /// service-wide rate limit gives each instance `1/instances` of it.
    #[serde(
        default = "LocalService::default_instances",
        deserialize_with = "number::nonzero"
    )]
    pub instances: NonZeroU32,
    /// This instance's metadata, as registered in the directory.
    #[serde(default)]
    pub metadata: Metadata,
    /// The address other sidecars reach this instance's inbound listener at, as
    /// registered with the control plane. Default: the inbound listener's
    /// address, which must then be a specific IP (not `0.0.0.0`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "opt_socket_addr"
    )]
    pub advertise: Option<SocketAddr>,
    /// This instance's id in the directory. Default: the host name and the
    /// process id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// How the sidecar checks that the app answers. Default: a TCP connect
    /// to `app` every second.
    #[serde(default)]
    pub health: HealthCheck,
}

/// `[service] health`: the sidecar's check of its own app. Without `path`,
/// a TCP connect to `app`; with it, an HTTP/1.1 `GET path` to `app` that must
/// answer 200-399. Until the app has passed `healthy_after` checks in a row
/// the sidecar is not ready and does not register; `unhealthy_after` failures
/// in a row mark the instance unhealthy in the directory (callers stop
/// picking it) and make `/ready` answer 503, until `healthy_after` passes in
/// a row again. `enabled = false` turns checking off: the app counts as
/// always healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table like { path = \"/healthz\", interval = \"1s\" }"
)]
pub struct HealthCheck {
    /// Whether the app is checked at all. Default true.
    pub enabled: bool,
    /// The HTTP path to `GET` (starting with `/`); none: a TCP connect.
    /// Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "health_path"
    )]
    pub path: Option<String>,
    /// Time between the starts of two checks; longer than 0. Default `1s`.
    #[serde(deserialize_with = "duration::positive")]
    pub interval: Duration,
    /// A check that has not passed within this fails; longer than 0 and at
    /// most `interval`. Default `500ms`.
    #[serde(deserialize_with = "duration::positive")]
    pub timeout: Duration,
    /// Failed checks in a row that make a healthy app unhealthy, 1 to 100.
    /// Default 2.
    #[serde(deserialize_with = "health_threshold")]
    pub unhealthy_after: u32,
    /// Passed checks in a row that make an app healthy (at start, and after
    /// it was unhealthy), 1 to 100. Default 1.
    #[serde(deserialize_with = "health_threshold")]
    pub healthy_after: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_after: 2,
            healthy_after: 1,
        }
    }
}

fn health_threshold<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, 100)
}

/// An HTTP path for a health check: starts with one `/`, visible ASCII
/// only, no fragment (a query is allowed).
fn health_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let path = String::deserialize(d)?;
    let valid = path.starts_with('/')
        && path.len() <= 1024
        && !path.starts_with("//")
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
    if !valid {
        return Err(de::Error::custom(format!(
            "invalid health check path {path:?}: expected an absolute path like \"/healthz\""
        )));
    }
    Ok(Some(path))
}

fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

impl LocalService {
    /// `instances` when the key is absent.
    pub const DEFAULT_INSTANCES: NonZeroU32 = NonZeroU32::MIN;

    fn default_instances() -> NonZeroU32 {
        Self::DEFAULT_INSTANCES
    }
}

/// `[listen]`: the three listeners. Port 0 asks the OS for a free port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Listen {
    /// The local app's outgoing traffic. Default `127.0.0.1:4140`.
    #[serde(deserialize_with = "socket_addr")]
    pub outbound: SocketAddr,
    /// Traffic from other sidecars to the local app. Default `0.0.0.0:4143`.
    #[serde(deserialize_with = "socket_addr")]
    pub inbound: SocketAddr,
    /// Metrics, health and config endpoints. Default `127.0.0.1:4191`.
    #[serde(deserialize_with = "socket_addr")]
    pub admin: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        let at = |ip: Ipv4Addr, port| SocketAddr::new(ip.into(), port);
        Self {
            outbound: at(Ipv4Addr::LOCALHOST, 4140),
            inbound: at(Ipv4Addr::UNSPECIFIED, 4143),
            admin: at(Ipv4Addr::LOCALHOST, 4191),
        }
    }
}

/// `[control_plane]`: where the directory and policies come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct ControlPlane {
    /// Control-plane URLs (`https://host:port`), at least one; one DNS name
    /// resolving to several replicas is enough.
    #[serde(deserialize_with = "urls")]
    pub addresses: Vec<String>,
    /// Where the last accepted snapshot is kept, for a cold start while the
    /// control plane is unreachable; relative to the bootstrap file's
    /// directory (see [`crate::Loaded::resolve`]). Default none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cache: Option<PathBuf>,
    /// How long, at start, `/ready` waits for the first snapshot from the
    /// control plane; after it the sidecar is ready on the cached snapshot
    /// (if one was loaded) or the static directory, and logs a warning.
    /// Longer than 0. Default `10s`.
    #[serde(
        default = "ControlPlane::default_ready_timeout",
        deserialize_with = "duration::positive"
    )]
    pub ready_timeout: Duration,
}

impl ControlPlane {
    /// `ready_timeout` when the key is absent.
    pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

    fn default_ready_timeout() -> Duration {
        Self::DEFAULT_READY_TIMEOUT
    }
}

fn urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let urls = Vec::<String>::deserialize(d)?;
    let valid = |url: &str| {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        rest.is_some_and(|r| {
            !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace)
        })
    };
    if urls.is_empty() {
        return Err(de::Error::custom(
            "list at least one address, e.g. [\"https://weft-cp.internal:8443\"]",
        ));
    }
    match urls.iter().find(|u| !valid(u)) {
        Some(bad) => Err(de::Error::custom(format!(
            "invalid control plane address {bad:?}: expected a URL like \"https://weft-cp.internal:8443\""
        ))),
        None => Ok(urls),
    }
}

/// `[dns]`: resolving destinations that are not in the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Dns {
    /// Name servers; empty means the system's `resolv.conf`. Default empty.
    #[serde(deserialize_with = "socket_addrs")]
    pub servers: Vec<SocketAddr>,
    /// Per-query timeout, longer than 0. Default `1s`.
    #[serde(deserialize_with = "duration::positive")]
    pub timeout: Duration,
    /// Tries per lookup, 1 to 10. Default 2.
    #[serde(deserialize_with = "dns_attempts")]
    pub attempts: u8,
    /// Shortest time between re-resolutions, whatever the record's TTL.
    /// Default `1s`; at most `max_ttl`.
    pub min_ttl: Duration,
    /// Longest time an answer is used, whatever its TTL. Default `5m`.
    pub max_ttl: Duration,
    /// Stop re-resolving a name nobody asked for in this long; longer than 0.
    /// Default `10m`.
    #[serde(deserialize_with = "duration::positive")]
    pub idle: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(1),
            attempts: 2,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(5 * 60),
            idle: Duration::from_secs(10 * 60),
        }
    }
}

fn dns_attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    number::int(d, 1, 10)
}

/// `[drain]`: shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Drain {
    /// How long in-flight requests may finish after SIGTERM. Default `20s`.
    pub grace: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(20),
        }
    }
}

/// `[pool]`: idle connections kept to endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Pool {
    /// Close a pooled connection idle this long; longer than 0. Default `90s`.
    #[serde(deserialize_with = "duration::positive")]
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint; 0 disables pooling. Default 256:
    /// with more requests in flight to one endpoint than this, the extra
    /// connections close after each response and the next request connects
    /// anew (the benches at 256 client connections over 3 endpoints lost a
    /// third of their throughput to that churn at the former default, 32).
    /// Idle connections close after `idle_timeout` anyway.
    #[serde(deserialize_with = "number::uint32")]
    pub max_idle_per_endpoint: u32,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_endpoint: 256,
        }
    }
}

/// `[limits]`: what the listeners accept from clients. Read at start (a
/// reload that changes them is refused); every key has a default a careful
/// operator would choose, so the table is usually left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Limits {
    /// Client connections open at once on each of the outbound and inbound
    /// listeners; past it a new connection is accepted and closed at once.
    /// 1 to 1 000 000. Default 10 000.
    #[serde(deserialize_with = "max_connections")]
    pub max_connections: u32,
    /// The same for the admin listener. 1 to 1 000 000. Default 64.
    #[serde(deserialize_with = "max_connections")]
    pub admin_max_connections: u32,
    /// Largest HTTP/1 request head (request line and headers) and HTTP/2
    /// header list; larger is refused with 431. 8KiB to 1MiB. Default 64KiB.
    #[serde(deserialize_with = "header_size")]
    pub max_header_size: ByteSize,
    /// Most header fields in an HTTP/1 request; more is refused with 431.
    /// 1 to 1000. Default 100.
    #[serde(deserialize_with = "max_headers")]
    pub max_headers: u32,
    /// Longest request target (the URI); longer is refused with 414. At
    /// least 256B, at most `max_header_size`. Default 8KiB.
    #[serde(deserialize_with = "uri_length")]
    pub max_uri_length: ByteSize,
    /// An HTTP/1 request head must arrive whole within this of its first
    /// byte, and a new connection must show its protocol within this; else
    /// the connection is closed (slowloris). Longer than 0. Default 10s.
    #[serde(deserialize_with = "duration::positive")]
    pub header_read_timeout: Duration,
    /// A client connection on which no request has started for this long is
    /// closed (HTTP/1: after a response in flight; HTTP/2: GOAWAY, open streams
    /// complete). At least `header_read_timeout`. Default 2m (longer than a
    /// calling sidecar's `[pool] idle_timeout`, so callers close first).
    #[serde(deserialize_with = "duration::positive")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams a client may have open at once per connection. 1 to
    /// 10 000. Default 256.
    #[serde(deserialize_with = "http2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Largest HTTP/2 frame payload a client may send. 16KiB to 16MiB - 1.
    /// Default 16KiB.
    #[serde(deserialize_with = "http2_frame_size")]
    pub http2_max_frame_size: ByteSize,
    /// HTTP/2 flow-control window of each stream a client opens. 64KiB - 1
    /// to 2GiB - 1. Default 1MiB.
    #[serde(deserialize_with = "http2_window")]
    pub http2_initial_stream_window: ByteSize,
    /// HTTP/2 flow-control window of a whole client connection. 64KiB - 1 to
    /// 2GiB - 1. Default 2MiB.
    #[serde(deserialize_with = "http2_window")]
    pub http2_initial_connection_window: ByteSize,
    /// Streams a client may reset before the proxy accepted them; more and
    /// the connection gets GOAWAY (HTTP/2 rapid reset). 1 to 10 000. Default 20.
    #[serde(deserialize_with = "http2_resets")]
    pub http2_max_pending_accept_reset_streams: u32,
    /// Streams the proxy may reset because the client broke the protocol;
    /// more and the connection gets GOAWAY. 1 to 10 000. Default 256.
    #[serde(deserialize_with = "http2_resets")]
    pub http2_max_local_error_reset_streams: u32,
    /// Ping an HTTP/2 client after this long without a frame from it; one that
    /// does not answer within 20s is disconnected. Longer than 0. Default 1m.
    #[serde(deserialize_with = "duration::positive")]
    pub http2_keep_alive_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            admin_max_connections: 64,
            max_header_size: ByteSize::kib(64),
            max_headers: 100,
            max_uri_length: ByteSize::kib(8),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            http2_max_concurrent_streams: 256,
            http2_max_frame_size: ByteSize::kib(16),
            http2_initial_stream_window: ByteSize::mib(1),
            http2_initial_connection_window: ByteSize::mib(2),
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 256,
            http2_keep_alive_interval: Duration::from_secs(60),
        }
    }
}

fn max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, 1_000_000)
}

fn max_headers<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, 1000)
}

fn http2_streams<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, 10_000)
}

fn http2_resets<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, 10_000)
}

fn header_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    size::within(d, ByteSize::kib(8), ByteSize::mib(1))
}

fn uri_length<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    size::within(d, ByteSize::b(256), ByteSize::mib(1))
}

fn http2_frame_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    size::within(d, ByteSize::kib(16), ByteSize::b((1 << 24) - 1))
}

fn http2_window<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    size::within(d, ByteSize::b(65_535), ByteSize::b((1 << 31) - 1))
}

/// `[directory]`: static service entries for standalone mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Directory {
    /// `[[directory.services]]`, unique by name. Default empty.
    pub services: Vec<StaticService>,
    /// Whether the `fault` keys of the policy files this bootstrap names
    /// (`[service] policy`, `[[directory.services]] policy`) take effect:
    /// fault injection from local files, for staging. Policies from the
    /// control plane are permitted by `weftctl apply --allow-faults` instead.
    /// Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_faults: bool,
}

/// One `[[directory.services]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct StaticService {
    /// The logical name callers use.
    pub name: ServiceName,
    /// The owner's policy file, relative to the bootstrap file's directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy: Option<PathBuf>,
    /// The HTTP version used towards the endpoints. Default `auto`. With
    /// `tls = "mesh"`, the version the peer sidecar uses towards its app
    /// (sidecars speak HTTP/2 to each other).
    #[serde(default)]
    pub protocol: Protocol,
    /// Whether the endpoints are sidecars reached with mTLS. Default `none`.
    #[serde(default)]
    pub tls: TlsMode,
    /// The instances, at least one, with distinct addresses.
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
}

/// The HTTP version a sidecar speaks to a service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The same version the local app used.
    #[default]
    Auto,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// How a sidecar connects to a static service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plaintext: the endpoints may be plain apps.
    #[default]
    None,
    /// The endpoints are sidecars' inbound listeners: mTLS with this sidecar's
    /// `[tls]` certificate, and the peer must present the service's identity.
    Mesh,
}

/// One endpoint of a static service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { address = \"10.0.0.5:4143\" }"
)]
pub struct StaticEndpoint {
    /// The peer sidecar's inbound listener.
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    /// The instance's metadata, for splits and locality.
    #[serde(default)]
    pub metadata: Metadata,
}

/// What is known about one instance: where it runs, which version it is,
/// its balancing weight, and free-form labels. Splits select instances by
/// these values through [`Metadata::get`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Metadata {
    /// The zone, for zone-local balancing. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The deployed version, for splits. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Relative weight, 0 to 10 000. Default 100.
    pub weight: Weight,
    /// Any other key/value pairs; `zone`, `version` and `weight` are reserved.
    /// Default empty.
    #[serde(deserialize_with = "labels")]
    pub labels: BTreeMap<String, String>,
}

impl Metadata {
    /// The value for `key`: `zone` and `version` from their fields, anything
    /// else from `labels`.
    pub fn get(&self, key: &str) -> Option<&str> {
        match key {
            "zone" => self.zone.as_deref(),
            "version" => self.version.as_deref(),
            _ => self.labels.get(key).map(String::as_str),
        }
    }
}

/// Labels, refusing the names [`Metadata::get`] answers from fields, which
/// would otherwise be silently shadowed.
fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(d)?;
    match ["zone", "version", "weight"]
        .into_iter()
        .find(|k| labels.contains_key(*k))
    {
        Some(key) => Err(de::Error::custom(format!(
            "label {key:?} is reserved; set metadata.{key} instead"
        ))),
        None => Ok(labels),
    }
}

/// `[telemetry]`: request traces and metrics over OTLP/gRPC, and the access
/// log. Restart-only: a reload that changes it is rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Telemetry {
    /// The OTLP/gRPC collector, `http://host:port`; no spans without it.
    /// `https` is refused until the sidecar has TLS. Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "otlp_endpoint"
    )]
    pub otlp_endpoint: Option<String>,
    /// The fraction of new traces (requests arriving without a
    /// `traceparent`) that are sampled, 0.0 to 1.0; a request with a parent
    /// follows its parent's decision. Default 1.0.
    pub sampling_ratio: Ratio,
    /// The `service.name` of exported spans. Default: `[service] name`, else
    /// `weft-proxy`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "telemetry_name"
    )]
    pub service_name: Option<String>,
    /// One log line (target `weft_access`, level info) per finished request.
    /// Default false.
    pub access_log: bool,
    /// Export the metrics of `/metrics` over OTLP too, to `otlp_endpoint`
    /// (which it needs). Default false.
    pub otlp_metrics: bool,
    /// How often the metrics are exported with `otlp_metrics`, 1s to 10m.
    /// Default `15s`.
    #[serde(deserialize_with = "otlp_metrics_interval")]
    pub otlp_metrics_interval: Duration,
    /// The distinct callers the request metrics' `caller` label shows, 1 to
    /// [`Telemetry::MAX_CALLERS`]; callers past it are counted as `other`.
    /// Default 100.
    #[serde(deserialize_with = "max_callers")]
    pub max_callers: usize,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: Ratio::clamped(1.0),
            service_name: None,
            access_log: false,
            otlp_metrics: false,
            otlp_metrics_interval: Duration::from_secs(15),
            max_callers: Self::DEFAULT_MAX_CALLERS,
        }
    }
}

impl Telemetry {
    /// `service_name` when there is no `service_name` nor `[service]`.
    pub const DEFAULT_SERVICE_NAME: &'static str = "weft-proxy";
    /// The shortest `otlp_metrics_interval`.
    pub const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);
    /// The longest `otlp_metrics_interval`.
    pub const MAX_METRICS_INTERVAL: Duration = Duration::from_secs(10 * 60);
    /// `max_callers` when not set.
    pub const DEFAULT_MAX_CALLERS: usize = 100;
    /// The largest `max_callers`.
    pub const MAX_CALLERS: usize = 10_000;
}

impl Bootstrap {
    /// The `service.name` spans are exported under: `[telemetry]
    /// service_name`, else `[service] name`, else `weft-proxy`.
    pub fn telemetry_service_name(&self) -> &str {
        match (&self.telemetry.service_name, &self.service) {
            (Some(name), _) => name,
            (None, Some(service)) => service.name.as_str(),
            (None, None) => Telemetry::DEFAULT_SERVICE_NAME,
        }
    }
}

/// An OTLP/gRPC endpoint: `http://host:port` (a trailing `/` is allowed).
fn otlp_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let url = String::deserialize(d)?;
    check_otlp_endpoint(&url).map_err(de::Error::custom)?;
    Ok(Some(url))
}

fn check_otlp_endpoint(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err(format!(
            "OTLP endpoint {url:?}: https is not supported yet (the sidecar has no TLS client \
             until mTLS lands); use http:// to a collector on a trusted network, \
             e.g. a node-local agent"
        ));
    }
    let invalid = || {
        format!(
            "invalid OTLP endpoint {url:?}: expected an OTLP/gRPC URL like \"http://otel-collector:4317\""
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(invalid)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(invalid)?;
    let host_ok = !host.is_empty()
        && !host.contains(['/', '?', '#', '@'])
        && !host.contains(char::is_whitespace);
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// `otlp_metrics_interval`: from [`Telemetry::MIN_METRICS_INTERVAL`] to
/// [`Telemetry::MAX_METRICS_INTERVAL`].
fn otlp_metrics_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let interval = Duration::deserialize(d)?;
    let (min, max) = (
        Telemetry::MIN_METRICS_INTERVAL,
        Telemetry::MAX_METRICS_INTERVAL,
    );
    if interval < min || interval > max {
        return Err(de::Error::custom(format!(
            "must be from {min} to {max}, found {interval}"
        )));
    }
    Ok(interval)
}

/// `max_callers`: from 1 to [`Telemetry::MAX_CALLERS`].
fn max_callers<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = u64::deserialize(d)?;
    match usize::try_from(n) {
        Ok(n) if (1..=Telemetry::MAX_CALLERS).contains(&n) => Ok(n),
        _ => Err(de::Error::custom(format!(
            "must be from 1 to {}, found {n}",
            Telemetry::MAX_CALLERS
        ))),
    }
}

/// A `service.name`: not empty, at most 255 characters, no control characters.
fn telemetry_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    if name.trim().is_empty() || name.chars().count() > 255 || name.contains(char::is_control) {
        return Err(de::Error::custom(format!(
            "invalid service name {name:?}: expected 1 to 255 printable characters, e.g. \"checkout\""
        )));
    }
    Ok(Some(name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::check_otlp_endpoint;

    #[test]
    fn otlp_endpoints() {
        for ok in [
            "http://127.0.0.1:4317",
            "http://otel-collector:4317",
            "http://[::1]:4317/",
        ] {
            assert_eq!(check_otlp_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1:4317",
            "http://collector",
            "http://:4317",
            "http://collector:0",
            "http://collector:4317/v1/traces",
            "grpc://collector:4317",
        ] {
            assert!(
                check_otlp_endpoint(bad)
                    .unwrap_err()
                    .starts_with("invalid OTLP endpoint"),
                "{bad}"
            );
        }
        assert!(
            check_otlp_endpoint("https://collector:4317")
                .unwrap_err()
                .contains("https is not supported yet")
        );
    }
}
