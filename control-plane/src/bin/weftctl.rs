//! `weftctl`: apply, get, delete and list service policies and instances through
//! the control plane's admin API.
//!
//! A policy file is validated locally first (the same check and message as
//! `weft-proxy check --policy`), then sent; the control plane validates it again
//! before writing it to the store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Manage Weft service policies through the control plane"
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
    /// Validate and apply policy files.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Show a service: its policy and instances.
    Get { service: String },
    /// Delete a service's policy.
    Delete { service: String },
    /// List services.
    List,
}

fn token(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("the token file {} holds no token", path.display()))?;
    Ok(Some(token.to_owned()))
}

struct Api {
    base: String,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        file: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base.trim_end_matches('/')));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(f) = file {
            req = req.header("weft-file-name", f);
        }
        let rsp = self
            .client
            .request(req.body(Full::new(body))?)
            .await
            .with_context(|| format!("calling the control plane at {}", self.base))?;
        let status = rsp.status();
        let bytes = rsp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

fn fail(status: StatusCode, value: &Value) -> anyhow::Error {
    let message = value["error"]
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned);
    anyhow::anyhow!("{message} ({status})")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let api = Api {
        base: cli.control_plane.clone(),
        token: token(cli.token_file.as_deref())?,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    match cli.command {
        Command::Apply { files } => {
            for file in &files {
                let policy = weft_config::load_policy(file).map_err(|e| anyhow::anyhow!("{e}"))?;
                let text =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                let name = policy.service.as_str().to_owned();
                let (status, value) = api
                    .call(
                        Method::PUT,
                        &format!("/v1/services/{name}/policy"),
                        Bytes::from(text),
                        Some(&file.display().to_string()),
                    )
                    .await?;
                if !status.is_success() {
                    return Err(fail(status, &value));
                }
                println!(
                    "applied {} to service {name} (revision {})",
                    file.display(),
                    value["revision"]
                );
            }
        }
        Command::Get { service } => {
            let (status, value) = api
                .call(
                    Method::GET,
                    &format!("/v1/services/{service}"),
                    Bytes::new(),
                    None,
                )
                .await?;
            if !status.is_success() {
                return Err(fail(status, &value));
            }
            println!("service {service} (revision {})", value["revision"]);
            let instances = value["instances"].as_array().cloned().unwrap_or_default();
            println!("instances: {}", instances.len());
            for i in &instances {
                println!(
                    "  {:<24} {:<22} {}",
                    i["id"].as_str().unwrap_or("?"),
                    i["address"].as_str().unwrap_or("?"),
                    i["metadata"]
                );
            }
            match value["policy"].as_str() {
                Some(p) => println!("policy:\n{p}"),
                None => println!("policy: none"),
            }
        }
        Command::Delete { service } => {
            let (status, value) = api
                .call(
                    Method::DELETE,
                    &format!("/v1/services/{service}/policy"),
                    Bytes::new(),
                    None,
                )
                .await?;
            if !status.is_success() {
                return Err(fail(status, &value));
            }
            println!("deleted the policy of {service}");
        }
        Command::List => {
            let (status, value) = api
                .call(Method::GET, "/v1/services", Bytes::new(), None)
                .await?;
            if !status.is_success() {
                return Err(fail(status, &value));
            }
            println!("{:<32} {:>9} {:>6}", "SERVICE", "INSTANCES", "POLICY");
            for s in value["services"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>9} {:>6}",
                    s["name"].as_str().unwrap_or("?"),
                    s["instances"],
                    if s["policy"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
            if value["live"].as_bool() == Some(false) {
                bail!("the control plane is not following its store: this is its last known view");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
