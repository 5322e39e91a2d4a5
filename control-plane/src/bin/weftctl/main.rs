//! `weftctl`: check, apply, diff, get and delete service policies, list
//! services and instances, through the control plane's admin API; `stat`,
//! `edges` and `top`, live traffic numbers from the sidecars' metrics; `certs`, development
//! certificates for mTLS between sidecars (offline, with `weft-certs`);
//! `inject`, the weft-proxy sidecar added to Kubernetes manifests (offline,
//! with [`weft_control_plane::inject`]); `version`; and `completion`, shell
//! completion scripts.
//!
//! A policy file is validated locally first with `weft-config` (the same check
//! and message as the control plane and `weft-proxy check --policy`); the control
//! plane validates it again before writing it to the store. `check` needs no
//! control plane; given `--control-plane` on the command line, it also warns
//! about service names the control plane has never seen.
//!
//! Read commands (`get`, `stat`, `edges`, `top`, `diff`, `version`) take `-o json` for scripts
//! (see [`output`]).
//!
//! Exit codes: 0 success; 1 failure (an invalid file, a refused or failed
//! request); `diff` exits 0 when the file matches the stored policy, 1 when it
//! differs and 2 when it cannot tell. Usage errors exit 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use weft_config::ServiceName;

mod certs;
mod connect;
mod edges;
mod files;
mod get;
mod inject;
mod output;
mod policies;
mod stat;
mod top;

use files::PolicyFile;
use output::Output;

/// How long connecting to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("WEFT_GIT_COMMIT"), ")"),
    about = "Manage Weft service policies through the control plane",
    after_help = "Exit codes: 0 success; 1 failure (invalid file, refused or failed request); \
                  diff: 0 identical, 1 different, 2 error; usage errors 2."
)]
struct Cli {
    /// The control plane's admin API: http://HOST:PORT, or https://HOST:PORT
    /// (with --ca-file) when it runs with --admin-tls-cert.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE",
        default_value = "http://127.0.0.1:8444"
    )]
    control_plane: String,
    /// The CA certificate (PEM) that signed the admin API's certificate, for
    /// an https:// --control-plane (weftctl uses no system roots).
    #[arg(long, env = "WEFT_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A file holding the bearer token (first non-comment line).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policy files, write them and print what changed (nothing is
    /// written if any file is invalid, or names a service the control plane
    /// has never seen, without --create).
    Apply {
        /// A policy file, a directory (its *.toml files, in name order) or
        /// `-` (standard input); repeatable.
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Apply a policy even for a service that has never registered (no
        /// instances and no policy yet).
        #[arg(long)]
        create: bool,
        /// Permit the files' `routes[].fault` keys (fault injection, for
        /// staging): the control plane refuses them without this flag, and
        /// stores the policy with `allow_faults = true`, which sidecars
        /// require to inject faults.
        #[arg(long)]
        allow_faults: bool,
    },
    /// Validate policy files offline; with --control-plane on the command
    /// line, also warn about services the control plane has never seen.
    Check {
        /// A policy file, a directory (its *.toml files, in name order) or
        /// `-` (standard input); repeatable.
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Show how a policy file differs from the policy stored for its service.
    Diff {
        /// The policy file, or `-` (standard input).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        output: Output,
    },
    /// Show services, a service's instances or its policy.
    #[command(subcommand)]
    Get(get::Get),
    /// Delete a service's policy.
    #[command(subcommand)]
    Delete(Delete),
    /// Live request rate, success rate, p50/p99 latency and refusals per
    /// service (per route with SERVICE), from the sidecars' metrics.
    #[command(long_about = stat::LONG_ABOUT)]
    Stat(stat::StatArgs),
    /// Who calls whom: request rate, success rate and p99 per caller ->
    /// service edge, from the sidecars' metrics.
    #[command(long_about = edges::LONG_ABOUT)]
    Edges(edges::EdgesArgs),
    /// The busiest routes (rate, success, p50/p99), redrawn every interval.
    #[command(long_about = top::LONG_ABOUT)]
    Top(top::TopArgs),
    /// Development certificates for mTLS between sidecars: a mesh CA and
    /// service certificates (offline; for development and tests).
    #[command(subcommand, long_about = certs::LONG_ABOUT)]
    Certs(certs::Certs),
    /// Add the weft-proxy sidecar to Kubernetes manifests (offline): reads
    /// YAML, writes YAML (comments are lost).
    #[command(long_about = inject::LONG_ABOUT)]
    Inject(inject::InjectArgs),
    /// The version and commit of weftctl and of the control plane.
    Version {
        /// weftctl's own only (offline).
        #[arg(long)]
        client: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Print a shell completion script, e.g. `weftctl completion bash >
    /// /etc/bash_completion.d/weftctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum Delete {
    /// Remove a service's policy (its instances stay registered).
    Policy { service: ServiceName },
}

/// A policy as stored, and its store revision.
#[derive(Debug, Clone)]
struct Stored {
    text: String,
    revision: i64,
}

/// The token and the file it came from.
struct Token {
    value: String,
    file: PathBuf,
}

fn token(path: Option<&Path>) -> anyhow::Result<Option<Token>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let value = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("the token file {} holds no token", path.display()))?;
    Ok(Some(Token {
        value: value.to_owned(),
        file: path.to_owned(),
    }))
}

struct Api {
    /// The admin API's base URL, without a trailing `/`.
    base: String,
    token: Option<Token>,
    client: Client<connect::Connector, Full<Bytes>>,
}

impl Api {
    fn new(base: &str, token_file: Option<&Path>, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .with_context(|| format!("--control-plane {base:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--control-plane {base:?}: expected http://HOST:PORT or https://HOST:PORT"),
        };
        if uri.authority().is_none() {
            bail!("--control-plane {base:?}: expected http://HOST:PORT or https://HOST:PORT");
        }
        // The CA is only read for https:// (WEFT_CA_FILE may be exported
        // for another control plane).
        let trust = match (https, ca_file) {
            (false, _) => None,
            (true, Some(file)) => Some(connect::Trust::load(file)?),
            (true, None) => bail!(
                "--control-plane {base}: https:// needs the CA that signed the admin API's \
                 certificate: pass --ca-file FILE or set WEFT_CA_FILE (weftctl uses no system roots)"
            ),
        };
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_nodelay(true);
        Ok(Self {
            base: base.to_owned(),
            token: token(token_file)?,
            client: Client::builder(TokioExecutor::new())
                .build(connect::Connector::new(tcp, trust)),
        })
    }

    /// One request; any answer but 401 is returned with its JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&PolicyFile>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.value));
        }
        let content = match body {
            Some(file) => {
                req = req.header("weft-file-name", file.name().to_string());
                Bytes::from(file.text.clone())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(content))
            .with_context(|| format!("building a request to {}{path}", self.base))?;
        let exchange = async {
            let rsp = self.client.request(req).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the control plane at {}: {}",
                    self.base,
                    root_cause(&e)
                )
            })?;
            let status = rsp.status();
            let bytes = rsp
                .into_body()
                .collect()
                .await
                .with_context(|| {
                    format!("reading the answer of the control plane at {}", self.base)
                })?
                .to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the control plane at {} did not answer within {}s",
                    self.base,
                    REQUEST_TIMEOUT.as_secs()
                )
            })??;
        if status == StatusCode::UNAUTHORIZED {
            match &self.token {
                Some(t) => bail!(
                    "the control plane at {} refused the token in {} ({status})",
                    self.base,
                    t.file.display()
                ),
                None => bail!(
                    "the control plane at {} requires a token ({status}): pass --token-file FILE or set WEFT_TOKEN_FILE",
                    self.base
                ),
            }
        }
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }

    /// A request that must succeed.
    async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<&PolicyFile>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(self.refused(status, &value));
        }
        Ok(value)
    }

    /// The policy stored for `service`, if any.
    async fn stored_policy(&self, service: &str) -> anyhow::Result<Option<Stored>> {
        let (status, value) = self
            .call(Method::GET, &format!("/v1/services/{service}/policy"), None)
            .await?;
        if status == StatusCode::NOT_FOUND && value["policy"].is_null() {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.refused(status, &value));
        }
        match value["policy"].as_str() {
            Some(text) => Ok(Some(Stored {
                text: text.to_owned(),
                revision: value["revision"].as_i64().unwrap_or_default(),
            })),
            None => bail!(
                "the control plane at {} answered without a policy: {value}",
                self.base
            ),
        }
    }

    /// Every service the control plane knows (live instances or a policy).
    async fn service_names(&self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let value = self.ok(Method::GET, "/v1/services", None).await?;
        Ok(value["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect())
    }

    fn refused(&self, status: StatusCode, value: &Value) -> anyhow::Error {
        let message = value["error"]
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        anyhow::anyhow!(
            "{message} ({status} from the control plane at {})",
            self.base
        )
    }
}

/// The innermost cause (e.g. "Connection refused (os error 111)"), without
/// the layers above it that repeat "client error (Connect)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// `version`: weftctl's version and commit, then the control plane's (from
/// its `GET /version`) unless `--client`. JSON: `{"client": {"version",
/// "commit"}, "control_plane": {"url", "version", "commit"}}` (no
/// `control_plane` with `--client`; null when it cannot be asked, and exit 1).
async fn version(
    api: impl FnOnce() -> anyhow::Result<Api>,
    client_only: bool,
    output: Output,
) -> anyhow::Result<()> {
    let client = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("WEFT_GIT_COMMIT"),
    });
    let server =
        if client_only {
            None
        } else {
            let api = api()?;
            Some(api.ok(Method::GET, "/version", None).await.map(
                |v| json!({ "url": api.base, "version": v["version"], "commit": v["commit"] }),
            ))
        };
    if output.structured() {
        let mut doc = json!({ "client": client });
        if let Some(server) = &server {
            doc["control_plane"] = server.as_ref().map_or(Value::Null, Clone::clone);
        }
        print!("{}", output.document(&doc));
    } else {
        println!(
            "weftctl {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            env!("WEFT_GIT_COMMIT")
        );
        if let Some(Ok(v)) = &server {
            println!(
                "weft-control-plane {} (commit {}) at {}",
                text(&v["version"]),
                text(&v["commit"]),
                text(&v["url"])
            );
        }
    }
    match server {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// A JSON string as is; anything else as JSON.
fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

async fn run(cli: Cli, control_plane_given: bool) -> anyhow::Result<ExitCode> {
    let api = || {
        Api::new(
            &cli.control_plane,
            cli.token_file.as_deref(),
            cli.ca_file.as_deref(),
        )
    };
    match cli.command {
        // `check` works offline, unless asked to look names up.
        Command::Check { files } => {
            let api = if control_plane_given {
                match api() {
                    Ok(api) => Some(api),
                    Err(e) => {
                        eprintln!("warning: the service names were not checked: {e:#}");
                        None
                    }
                }
            } else {
                None
            };
            return Ok(policies::check(&files, api.as_ref()).await);
        }
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "weftctl", &mut std::io::stdout());
        }
        Command::Version { client, output } => version(api, client, output).await?,
        Command::Certs(what) => certs::run(what)?,
        Command::Inject(args) => inject::run(args)?,
        Command::Apply {
            files,
            create,
            allow_faults,
        } => policies::apply(&api()?, &files, create, allow_faults).await?,
        Command::Diff { file, output } => return policies::diff(&api()?, &file, output).await,
        Command::Get(what) => get::run(&api()?, what).await?,
        Command::Delete(Delete::Policy { service }) => {
            api()?
                .ok(
                    Method::DELETE,
                    &format!("/v1/services/{service}/policy"),
                    None,
                )
                .await?;
            println!("policy {service} deleted");
        }
        Command::Stat(args) => stat::run(&api()?, args).await?,
        Command::Edges(args) => edges::run(&api()?, args).await?,
        Command::Top(args) => top::run(&api()?, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Only an address given on the command line makes `check` go online
    // (WEFT_CONTROL_PLANE, often exported, does not).
    let control_plane_given =
        matches.value_source("control_plane") == Some(ValueSource::CommandLine);
    // `diff` uses 1 for "different", so its errors are 2, as diff(1)'s are.
    let error = if matches!(cli.command, Command::Diff { .. }) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return error;
        }
    };
    match runtime.block_on(run(cli, control_plane_given)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            error
        }
    }
}
