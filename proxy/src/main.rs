//! `weft-proxy`: the Weft sidecar.
//!
//! `weft-proxy run --config FILE` runs the sidecar; `weft-proxy check --config FILE`
//! or `--policy FILE` validates a file (a bootstrap file's `[tls]` files too)
//! and exits non-zero with the error; a valid bootstrap file whose static
//! services carry service-side policy keys nothing may enforce gets a warning
//! line for each (exit 0: see `weft_proxy::enforcement`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about = "The Weft service-mesh sidecar")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The bootstrap file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Once listening, write the bound addresses (JSON) to this file.
        #[arg(long, value_name = "FILE")]
        bound_file: Option<PathBuf>,
        /// Where other sidecars reach this instance (IP:port); overrides
        /// `[service] advertise`, for addresses only known at start (a pod IP).
        #[arg(long, value_name = "IP:PORT", env = "WEFT_ADVERTISE")]
        advertise: Option<std::net::SocketAddr>,
        /// Threads serving traffic; default: the CPUs this process may use
        /// (affinity and cgroup quota). With 1, everything runs on one thread,
        /// which costs less per request than a one-worker thread pool.
        #[arg(long, value_name = "N", env = "WEFT_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Validate a bootstrap file (with the policy and TLS files it names) or a policy file.
    Check {
        /// A bootstrap file.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "policy",
            conflicts_with = "policy"
        )]
        config: Option<PathBuf>,
        /// A service policy file.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

fn init_logs(format: LogFormat) {
    weft_telemetry::init_logs(match format {
        LogFormat::Plain => weft_telemetry::LogFormat::Plain,
        LogFormat::Json => weft_telemetry::LogFormat::Json,
    });
}

fn check(config: Option<PathBuf>, policy: Option<PathBuf>) -> ExitCode {
    let (path, result) = match (config, policy) {
        (Some(path), _) => {
            let r = weft_config::load_bootstrap(&path).map_err(|e| e.to_string());
            let r = r.and_then(|loaded| {
                weft_transport::tls::MeshTls::load(&loaded, std::sync::Arc::new(()))
                    .map_err(|e| format!("{}: [tls]: {e}", path.display()))?;
                // Valid, but a policy may set keys that nothing enforces.
                for unenforced in weft_discovery::enforcement::unenforced(&loaded) {
                    eprintln!("warning: {}: {unenforced}", path.display());
                }
                Ok(())
            });
            (path, r)
        }
        (None, Some(path)) => {
            let r = weft_config::load_policy(&path)
                .map(drop)
                .map_err(|e| e.to_string());
            (path, r)
        }
        (None, None) => return ExitCode::from(2),
    };
    match result {
        Ok(()) => {
            println!("ok: {}", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The Tokio runtime: one thread when one worker is asked for or is all the
/// process may use (no work-stealing or cross-thread wake-ups to pay for),
/// else a pool of `workers` threads.
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider for every rustls user in the process (mTLS between
    // sidecars, and any library that asks for the default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Check { config, policy } => check(config, policy),
        Command::Run {
            config,
            bound_file,
            advertise,
            workers,
        } => {
            init_logs(cli.log_format);
            let runtime = match runtime(workers) {
                Ok(rt) => rt,
                Err(error) => {
                    eprintln!("error: starting the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = weft_proxy::startup::RunOptions {
                config,
                bound_file,
                advertise,
            };
            match runtime.block_on(weft_proxy::startup::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
