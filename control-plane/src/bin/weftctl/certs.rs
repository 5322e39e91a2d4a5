//! `weftctl certs`: development certificates for mTLS between sidecars.
//!
//! `certs ca` makes a mesh CA (`ca.pem`, `ca-key.pem`), `certs issue` a
//! service certificate signed by it (`SERVICE.pem`, `SERVICE-key.pem`) with the
//! identity `spiffe://<trust-domain>/service/SERVICE`, and `certs
//! control-plane` the control plane's (`control-plane.pem`,
//! `control-plane-key.pem`, `spiffe://<trust-domain>/control-plane`). All work
//! offline with
//! `weft-certs`; neither needs a control plane or a token.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use weft_certs::{CA_CERT_FILE, Ca};
use weft_config::{ServiceName, TrustDomain};

pub const LONG_ABOUT: &str = "\
Development certificates for mTLS between sidecars (offline).

These are for development and tests: a production mesh gets its certificates
from its own PKI. A sidecar needs the CA file and a certificate whose URI SAN is
spiffe://<trust-domain>/service/<name>, with its key ([tls] ca, cert, key).

  weftctl certs ca --out certs/                  # certs/ca.pem, certs/ca-key.pem
  weftctl certs issue billing --ca certs/ --out certs/billing/
                                                 # billing.pem, billing-key.pem
  weftctl certs control-plane --ca certs/ --out certs/cp/ --san weft-cp.internal
                                                 # control-plane.pem, control-plane-key.pem

Issuing again makes a new key and certificate: write them over the sidecar's
files and it picks them up within [tls] watch_interval, no restart.";

#[derive(Debug, Subcommand)]
pub enum Certs {
    /// Create a development CA: DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    Ca {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The mesh's SPIFFE trust domain ([tls] trust_domain).
        #[arg(long, value_name = "TD", default_value = TrustDomain::DEFAULT)]
        trust_domain: TrustDomain,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for SERVICE: DIR/SERVICE.pem and DIR/SERVICE-key.pem (0600).
    Issue {
        /// The service name; the identity is spiffe://<trust-domain>/service/SERVICE.
        service: ServiceName,
        /// The CA directory (ca.pem, ca-key.pem from `weftctl certs ca`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// Issue the control plane's certificate (identity
    /// spiffe://<trust-domain>/control-plane): DIR/control-plane.pem and
    /// DIR/control-plane-key.pem (0600).
    ControlPlane {
        /// The CA directory (ca.pem, ca-key.pem from `weftctl certs ca`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A DNS name or IP address the control plane is reached at
        /// (repeatable), added as a SAN: sidecars check the SPIFFE ID, weftctl
        /// over https:// checks the name or address of --control-plane.
        /// 127.0.0.1 is always included.
        #[arg(long = "san", alias = "host", value_name = "NAME_OR_IP",
              value_parser = parse_san)]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

/// A `--san`: a DNS name or an IP address (as a TLS client would dial it).
fn parse_san(s: &str) -> Result<String, String> {
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(bare)
        .map(|_| bare.to_owned())
        .map_err(|_| format!("{s:?} is neither a DNS name nor an IP address"))
}

pub fn run(what: Certs) -> anyhow::Result<()> {
    match what {
        Certs::Ca {
            out,
            trust_domain,
            force,
        } => {
            let existing = out.join(CA_CERT_FILE);
            if existing.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace the CA (certificates it issued stop being trusted)",
                    existing.display()
                );
            }
            let ca = Ca::generate(&trust_domain)?;
            for file in ca.write(&out)? {
                println!("wrote {}", file.display());
            }
            println!("development CA for trust domain {trust_domain} (for development and tests)");
        }
        Certs::Issue {
            service,
            ca,
            out,
            days,
        } => {
            let ca = Ca::load(&ca).context("loading the CA")?;
            let issued = ca.issue(&service, Duration::from_secs(u64::from(days) * 24 * 3600))?;
            for file in issued.write(&out)? {
                println!("wrote {}", file.display());
            }
            println!("{} valid for {days} days", issued.identity());
        }
        Certs::ControlPlane {
            ca,
            out,
            sans,
            days,
        } => {
            let ca = Ca::load(&ca).context("loading the CA")?;
            let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
            let issued =
                ca.issue_control_plane(&sans, Duration::from_secs(u64::from(days) * 24 * 3600))?;
            for file in issued.write(&out)? {
                println!("wrote {}", file.display());
            }
            println!("{} valid for {days} days", issued.identity());
        }
    }
    Ok(())
}
