//! How to reach etcd: [`EtcdOptions`], and turning them into etcd-client's
//! `ConnectOptions`.
//!
//! Secrets stay out of logs: the password is a [`Password`], whose `Debug`
//! is redacted and which has no `Display`, so printing the options (or an
//! error) never shows it. TLS material is read from files when connecting;
//! a file that cannot be read is a [`ConnectError`] naming it.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::store::{BoxError, DEFAULT_KEY_PREFIX, StoreError};

/// Where etcd is and how to talk to it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs of the cluster's members (`http://host:2379`, or
    /// `https://..` with [`tls`](Self::tls)); requests are balanced over
    /// them.
    pub endpoints: Vec<String>,
    /// Prepended to every key; callers never see it. A missing trailing `/`
    /// is added. Default [`DEFAULT_KEY_PREFIX`].
    pub key_prefix: String,
    pub tls: Option<EtcdTls>,
    pub user: Option<EtcdUser>,
    /// Bound on establishing a connection to one endpoint. Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on each request, and on a watch being created. Default 5 s.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive pings, so a dead connection (and the watches on
    /// it) is noticed within interval + timeout. etcd refuses pings more
    /// often than every 5 s. Default 10 s.
    pub keep_alive_interval: Duration,
    /// Default 5 s.
    pub keep_alive_timeout: Duration,
    /// Keys fetched per request when listing a prefix; every page is read at
    /// the first page's revision, so a listing stays consistent. Default
    /// 1,000.
    pub list_page_size: NonZeroU32,
}

impl EtcdOptions {
    /// The defaults, with these endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            tls: None,
            user: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            list_page_size: NonZeroU32::new(1_000).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// The key prefix, ending with `/` unless empty.
    pub(super) fn normalized_prefix(&self) -> String {
        let mut prefix = self.key_prefix.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        prefix
    }

    /// etcd-client's options. Reads the TLS files.
    pub(super) fn connect_options(&self) -> Result<ConnectOptions, ConnectError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive_interval, self.keep_alive_timeout)
            // Fail requests and watches on a member cut off from the leader,
            // so they move to a healthy member instead of hanging.
            .with_require_leader(true);
        if let Some(user) = &self.user {
            options = options
                .with_user(user.name.clone(), user.password.expose().to_owned())
                // etcd's simple tokens expire (5 min idle by default).
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.load()?);
        }
        Ok(options)
    }
}

/// TLS to etcd: the CA that signed the members' certificates and, for
/// client-certificate authentication, our certificate and key (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub client_cert: Option<ClientCert>,
    /// The name to verify in the members' certificates, when it differs
    /// from the endpoint's host.
    pub domain: Option<String>,
}

/// A client certificate and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl EtcdTls {
    fn load(&self) -> Result<TlsOptions, ConnectError> {
        let ca = read("CA certificate", &self.ca_file)?;
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(client) = &self.client_cert {
            let cert = read("client certificate", &client.cert_file)?;
            let key = read("client key", &client.key_file)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(tls)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// etcd's user/password authentication.
#[derive(Clone, Debug)]
pub struct EtcdUser {
    pub name: String,
    pub password: Password,
}

/// A password: never printed (`Debug` is redacted, there is no `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why [`EtcdStore::connect`](super::EtcdStore::connect) failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no etcd endpoints configured")]
    NoEndpoints,
    #[error("cannot read the etcd {what} file {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An endpoint URL or TLS setting etcd-client refused.
    #[error("invalid etcd client settings")]
    Invalid {
        #[source]
        source: BoxError,
    },
    /// Could not reach or query etcd at the endpoints.
    #[error("cannot reach etcd at {endpoints}")]
    Store {
        endpoints: String,
        #[source]
        source: StoreError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let mut options = EtcdOptions::new(["http://127.0.0.1:2379"]);
        options.user = Some(EtcdUser {
            name: "weft".to_owned(),
            password: Password::new("hunter2-secret"),
        });
        let shown = format!("{options:?} {:#?}", options);
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(
            shown.contains("weft") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(options.connect_options().is_ok());
    }

    #[test]
    fn prefix_gets_a_trailing_slash() {
        let mut options = EtcdOptions::new(["http://127.0.0.1:2379"]);
        assert_eq!(options.normalized_prefix(), "/weft/");
        options.key_prefix = "/mesh".to_owned();
        assert_eq!(options.normalized_prefix(), "/mesh/");
        options.key_prefix = String::new();
        assert_eq!(options.normalized_prefix(), "");
    }

    #[test]
    fn unreadable_tls_files_are_named() {
        let mut options = EtcdOptions::new(["https://127.0.0.1:2379"]);
        options.tls = Some(EtcdTls {
            ca_file: PathBuf::from("/nonexistent/ca.pem"),
            client_cert: None,
            domain: None,
        });
        let error = options.connect_options().err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("cannot read the etcd CA certificate file /nonexistent/ca.pem")
        );
    }
}
