//! `weft-chaos`: the chaos run of `benches/chaos.sh` (see the `chaos` module
//! of the weft-tests crate), and the app process each of its instances runs.
//!
//! ```text
//! weft-chaos [--minutes N] [--seed SEED] [--short] [--out DIR]
//! weft-chaos app --id ID --listen ADDR
//! ```
//!
//! The seed defaults to `$CHAOS_SEED`, else one from the clock; it is
//! printed first. The report goes to stdout; the processes' logs, printed
//! as their guards drop, to stderr. Exit status 1 when an invariant failed
//! (or the run could not be set up), 0 when every invariant held. SIGINT
//! and SIGTERM end the run early; every process it started is stopped on
//! every way out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};
use weft_tests::chaos::{self, Options};

const USAGE: &str = "usage: weft-chaos [--minutes N] [--seed SEED] [--short] [--out DIR]\n       weft-chaos app --id ID --listen ADDR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("weft-chaos: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some("app") {
        runtime.block_on(app(&args[1..])).map(|()| true)
    } else {
        runtime.block_on(run(&args))
    };
    // Dropping the runtime drops every task, and with them the guards of
    // every process the run started.
    drop(runtime);
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("weft-chaos: {error:#}");
            println!("weft-chaos: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `flag`.
fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> anyhow::Result<&'a str> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .with_context(|| format!("{flag} needs a value\n{USAGE}"))
}

async fn app(args: &[String]) -> anyhow::Result<()> {
    let (mut id, mut listen) = (None, None);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--id" => id = Some(value(args, &mut i, "--id")?.to_owned()),
            "--listen" => listen = Some(value(args, &mut i, "--listen")?.parse::<SocketAddr>()?),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
        i += 1;
    }
    match (id, listen) {
        (Some(id), Some(listen)) => chaos::app::serve(&id, listen).await,
        _ => bail!("app needs --id and --listen\n{USAGE}"),
    }
}

async fn run(args: &[String]) -> anyhow::Result<bool> {
    let (mut minutes, mut seed, mut short, mut out) = (None, None, false, None);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--minutes" => minutes = Some(value(args, &mut i, "--minutes")?.parse::<f64>()?),
            "--seed" => seed = Some(value(args, &mut i, "--seed")?.parse::<u64>()?),
            "--short" => short = true,
            "--out" => out = Some(PathBuf::from(value(args, &mut i, "--out")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
        i += 1;
    }
    let seed = match seed {
        Some(seed) => seed,
        None => chaos::seed_from_env()?,
    };
    let app_bin = std::env::current_exe().context("locating weft-chaos")?;
    let mut options = match (short, minutes) {
        (true, _) => Options::short(seed, app_bin),
        (false, minutes) => Options::minutes(minutes.unwrap_or(10.0), seed, app_bin),
    };
    options.out = out;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let report = tokio::select! {
        report = chaos::run(options) => report?,
        _ = interrupt.recv() => bail!("interrupted (SIGINT): stopping every process"),
        _ = terminate.recv() => bail!("terminated (SIGTERM): stopping every process"),
    };
    println!("\n{}", report.render());
    Ok(report.passed())
}
