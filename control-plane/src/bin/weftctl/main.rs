//! `weftctl`: check, apply, diff, get and delete service policies, list
//! services and instances, through the control plane's admin API; `stat`,
//! live traffic numbers from the sidecars' metrics; and `certs`, development
//! certificates for mTLS between sidecars (offline, with `weft-certs`).
//!
//! A policy file is validated locally first with `weft-config` (the same check
//! and message as the control plane and `weft-proxy check --policy`); the control
//! plane validates it again before writing it to the store. `check` needs no
//! control plane at all.
//!
//! Exit codes: 0 success; 1 failure (an invalid file, a refused or failed
//! request); `diff` exits 0 when the file matches the stored policy, 1 when it
//! differs and 2 when it cannot tell. Usage errors exit 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use similar::{ChangeTag, TextDiff};
use weft_config::{ConfigError, ServiceName};

mod certs;
mod stat;

/// How long connecting to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Manage Weft service policies through the control plane",
    after_help = "Exit codes: 0 success; 1 failure (invalid file, refused or failed request); \
                  diff: 0 identical, 1 different, 2 error; usage errors 2."
)]
struct Cli {
    /// The control plane's admin API.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE",
        default_value = "http://127.0.0.1:8444"
    )]
    control_plane: String,
    /// A file holding the bearer token (first non-comment line).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policy files, write them and print what changed (nothing is
    /// written if any file is invalid).
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate policy files offline; no control plane needed.
    Check {
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Show how a policy file differs from the policy stored for its service.
    Diff {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Show services, a service's instances or its policy.
    #[command(subcommand)]
    Get(Get),
    /// Delete a service's policy.
    #[command(subcommand)]
    Delete(Delete),
    /// Live request rate, success rate, p50/p99 latency and refusals per
    /// service (per route with SERVICE), from the sidecars' metrics.
    #[command(long_about = stat::LONG_ABOUT)]
    Stat(stat::StatArgs),
    /// Development certificates for mTLS between sidecars: a mesh CA and
    /// service certificates (offline; for development and tests).
    #[command(subcommand, long_about = certs::LONG_ABOUT)]
    Certs(certs::Certs),
}

#[derive(Debug, Subcommand)]
enum Get {
    /// Every known service: live instances, whether it has a policy.
    Services,
    /// A service's live instances.
    Instances { service: ServiceName },
    /// A service's policy, exactly as applied; if the control plane refused
    /// the stored one, the policy in force, flagged.
    Policy { service: ServiceName },
}

#[derive(Debug, Subcommand)]
enum Delete {
    /// Remove a service's policy (its instances stay registered).
    Policy { service: ServiceName },
}

/// A policy file, read and validated.
struct PolicyFile<'a> {
    path: &'a Path,
    text: String,
    service: String,
}

/// Read and validate a policy file; the error is `weft-config`'s own message
/// (file:line:col: key: what, and the line quoted).
fn load(path: &Path) -> Result<PolicyFile<'_>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: path.to_owned(),
        context: None,
        source,
    })?;
    let policy = weft_config::parse_policy(&text, path)?;
    Ok(PolicyFile {
        path,
        service: policy.service.as_str().to_owned(),
        text,
    })
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
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(base: &str, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .with_context(|| format!("--control-plane {base:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            bail!(
                "--control-plane {base:?}: expected http://HOST:PORT (the admin API is plain HTTP)"
            );
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Ok(Self {
            base: base.to_owned(),
            token: token(token_file)?,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// One request; any answer but 401 is returned with its JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&PolicyFile<'_>>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.value));
        }
        let content = match body {
            Some(file) => {
                req = req.header("weft-file-name", file.path.display().to_string());
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
        body: Option<&PolicyFile<'_>>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(self.refused(status, &value));
        }
        Ok(value)
    }

    /// The policy stored for `service`, if any.
    async fn stored_policy(&self, service: &str) -> anyhow::Result<Option<String>> {
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
            Some(text) => Ok(Some(text.to_owned())),
            None => bail!(
                "the control plane at {} answered without a policy: {value}",
                self.base
            ),
        }
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

/// Rows as columns separated by three spaces, one line each; the first row
/// is the header.
fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                out.push_str(cell);
            } else {
                let width = widths.get(c).copied().unwrap_or(0);
                out.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.push('\n');
    }
    out
}

/// Print rows as columns separated by three spaces; the first row is the header.
fn print_table(rows: &[Vec<String>]) {
    print!("{}", format_table(rows));
}

/// A JSON string field, or `-`.
fn field(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// The changed lines only, each `  -old` or `  +new`.
fn changed_lines(old: &str, new: &str) -> String {
    let diff = TextDiff::from_lines(old, new);
    let mut out = String::new();
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            ChangeTag::Equal => continue,
            ChangeTag::Delete => '-',
            ChangeTag::Insert => '+',
        };
        out.push_str(&format!(
            "  {sign}{}\n",
            change.value().trim_end_matches(['\n', '\r'])
        ));
    }
    out
}

/// Validate every file; print each problem. `None` if any is invalid.
fn load_all(files: &[PathBuf]) -> Option<Vec<PolicyFile<'_>>> {
    let mut loaded = Vec::with_capacity(files.len());
    let mut valid = true;
    for path in files {
        match load(path) {
            Ok(file) => loaded.push(file),
            Err(e) => {
                eprintln!("{e}");
                valid = false;
            }
        }
    }
    valid.then_some(loaded)
}

async fn apply(api: &Api, files: &[PathBuf]) -> anyhow::Result<()> {
    let Some(loaded) = load_all(files) else {
        bail!("nothing applied: fix the invalid file(s) above");
    };
    for file in &loaded {
        let service = &file.service;
        let path = file.path.display();
        let stored = api
            .stored_policy(service)
            .await
            .with_context(|| format!("applying {path}"))?;
        if stored.as_deref() == Some(file.text.as_str()) {
            println!("policy {service} unchanged ({path})");
            continue;
        }
        let value = api
            .ok(
                Method::PUT,
                &format!("/v1/services/{service}/policy"),
                Some(file),
            )
            .await
            .with_context(|| format!("applying {path}"))?;
        let revision = &value["revision"];
        match stored {
            None => println!("policy {service} created from {path} (revision {revision})"),
            Some(old) => {
                println!("policy {service} updated from {path} (revision {revision})");
                print!("{}", changed_lines(&old, &file.text));
            }
        }
    }
    Ok(())
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for path in files {
        match load(path) {
            Ok(file) => println!(
                "{}: ok (policy for service {})",
                path.display(),
                file.service
            ),
            Err(e) => {
                eprintln!("{e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

async fn diff(api: &Api, path: &Path) -> anyhow::Result<ExitCode> {
    let file = load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = api
        .stored_policy(&file.service)
        .await
        .with_context(|| format!("comparing {}", path.display()))?;
    if stored.as_deref() == Some(file.text.as_str()) {
        return Ok(ExitCode::SUCCESS);
    }
    let old = stored.as_deref().unwrap_or("");
    let label = if stored.is_some() {
        "stored".to_owned()
    } else {
        format!("stored (service {} has no policy)", file.service)
    };
    let diff = TextDiff::from_lines(old, file.text.as_str());
    print!(
        "{}",
        diff.unified_diff()
            .header(&label, &path.display().to_string())
    );
    Ok(ExitCode::FAILURE)
}

async fn get(api: &Api, what: Get) -> anyhow::Result<()> {
    match what {
        Get::Services => {
            let value = api.ok(Method::GET, "/v1/services", None).await?;
            let mut rows = vec![vec![
                "SERVICE".to_owned(),
                "INSTANCES".to_owned(),
                "POLICY".to_owned(),
            ]];
            for s in value["services"].as_array().into_iter().flatten() {
                rows.push(vec![
                    field(&s["name"]),
                    field(&s["instances"]),
                    if s["policy"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_owned(),
                ]);
            }
            print_table(&rows);
            if value["live"].as_bool() == Some(false) {
                bail!(
                    "the control plane at {} is not following its store: this is its last known view",
                    api.base
                );
            }
        }
        Get::Instances { service } => {
            let value = api
                .ok(Method::GET, &format!("/v1/services/{service}"), None)
                .await?;
            let mut rows = vec![
                [
                    "ID", "ADDRESS", "HEALTH", "ZONE", "VERSION", "WEIGHT", "ADMIN",
                ]
                .map(str::to_owned)
                .to_vec(),
            ];
            for i in value["instances"].as_array().into_iter().flatten() {
                let m = &i["metadata"];
                rows.push(vec![
                    field(&i["id"]),
                    field(&i["address"]),
                    // Records stored before health existed are healthy.
                    i["health"].as_str().unwrap_or("healthy").to_owned(),
                    field(&m["zone"]),
                    field(&m["version"]),
                    field(&m["weight"]),
                    field(&i["admin_address"]),
                ]);
            }
            print_table(&rows);
        }
        Get::Policy { service } => get_policy(api, service.as_str()).await?,
    }
    Ok(())
}

/// `get policy`: the stored policy; if the control plane refused it (it was
/// written to the store by other means and fails validation), the policy in
/// force instead, under comment lines that flag the stored one and say why (so
/// the output is still a valid policy file), and a warning on stderr.
async fn get_policy(api: &Api, service: &str) -> anyhow::Result<()> {
    let (status, value) = api
        .call(Method::GET, &format!("/v1/services/{service}/policy"), None)
        .await?;
    if status == StatusCode::NOT_FOUND && value["policy"].is_null() {
        bail!(
            "service {service:?} has no policy (control plane at {})",
            api.base
        );
    }
    if !status.is_success() {
        return Err(api.refused(status, &value));
    }
    let Some(stored) = value["policy"].as_str() else {
        bail!(
            "the control plane at {} answered without a policy: {value}",
            api.base
        );
    };
    let Some(reason) = value["refused"].as_str() else {
        print!("{stored}");
        return Ok(());
    };
    let revision = value["revision"].as_i64().unwrap_or_default();
    let Some(in_force) = value["in_force"].as_str() else {
        bail!(
            "service {service:?} has no policy in force: the one stored (revision {revision}) \
             was refused by the control plane at {}: {reason}",
            api.base
        );
    };
    eprintln!(
        "warning: the policy stored for {service} (revision {revision}) was refused by the \
         control plane ({}); printing the policy in force",
        reason.lines().next().unwrap_or_default()
    );
    println!(
        "# REFUSED: the policy stored for {service} (revision {revision}) fails validation; \
         the control plane ignores it and serves this one:"
    );
    for line in reason.lines() {
        println!("#   {line}");
    }
    print!("{in_force}");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `check` works offline: no control plane, no token.
    let api = || Api::new(&cli.control_plane, cli.token_file.as_deref());
    match cli.command {
        Command::Check { files } => return Ok(check(&files)),
        Command::Certs(what) => certs::run(what)?,
        Command::Apply { files } => apply(&api()?, &files).await?,
        Command::Diff { file } => return diff(&api()?, &file).await,
        Command::Get(what) => get(&api()?, what).await?,
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
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            error
        }
    }
}
