//! `weftctl stat [SERVICE]`: request rate, success rate, latency and
//! refusals per service (or per route of one service), from the sidecars'
//! Prometheus metrics.
//!
//! The control plane lists the sidecars and their admin addresses; each is
//! scraped (`GET http://ADMIN/metrics`) twice, `--interval` apart, and the
//! increases are summed by `weft_control_plane::stat` (the fetching, 2 s
//! per sidecar, is `weft_control_plane::scrape`'s, which the web view uses
//! too). Sidecars without an admin address, or whose scrape fails, are named
//! in a footer line and left out; they never make the command fail.
//!
//! `weftctl edges` and `weftctl top` scrape the same way (their modules use
//! [`Scraper`], [`mesh`], [`repeat`] and the footer from here) and sum other
//! rows ([`View`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;
use weft_config::ServiceName;
use weft_control_plane::scrape::Fetcher;
use weft_control_plane::stat::{self, Direction, Row, Scrape, View};

use super::Api;
use crate::output::{self, Format};

/// The long help of `weftctl stat --help`.
pub const LONG_ABOUT: &str = "\
Request rate, success rate, p50/p99 latency and refusals by reason, per service (or, with \
SERVICE, per route of that service), from the Prometheus metrics of every sidecar the control \
plane knows.

Each sidecar's admin address (GET /metrics) is scraped twice, --interval apart; rates are the \
increases over that interval summed over the sidecars, and the latency quantiles come from the \
summed histogram buckets.

By default a service's numbers are its own sidecars' view: the requests they received \
(direction=\"inbound\"), which also counts callers that have no sidecar. --outbound shows the \
callers' view instead: what every sidecar's local app sent to the service, refusals by the \
callers' sidecars included.

Sidecars without an admin address, or that cannot be scraped, are named in a footer line and \
left out.";

#[derive(Debug, Args)]
pub struct StatArgs {
    /// Show this service's routes (`(none)`: requests no route matched).
    service: Option<ServiceName>,
    /// Time between the two scrapes the rates come from (e.g. 500ms, 2s, 1m);
    /// with --watch, between redraws.
    #[arg(long, default_value = "2s", value_parser = stat::parse_interval)]
    interval: Duration,
    /// Keep redrawing every interval until interrupted (Ctrl-C).
    #[arg(long)]
    watch: bool,
    /// The callers' view: what sidecars sent to each service, instead of
    /// what the service's own sidecars received.
    #[arg(long)]
    outbound: bool,
    /// Output format; `json` prints the same rows for scripts (one document
    /// per line with --watch), `yaml` as YAML (a `---` document each redraw
    /// with --watch).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// One sidecar the control plane knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    service: String,
    id: String,
    /// The admin address as registered.
    admin_address: Option<String>,
    /// Where to scrape it, or why it is not scraped.
    admin: Result<SocketAddr, String>,
}

impl Sidecar {
    fn name(&self) -> String {
        format!("{}/{}", self.service, self.id)
    }
}

/// What the control plane says there is to scrape.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    sidecars: Vec<Sidecar>,
    /// Services shown even without traffic (the per-service view).
    pub services: Vec<String>,
}

/// One scrape of every sidecar, by (service, id).
pub type Round = BTreeMap<(String, String), (Sidecar, Result<Scrape, String>)>;

/// Two rounds of scrapes and what they show: the frame a command prints.
pub struct Frame<'a> {
    pub mesh: &'a Mesh,
    pub before: &'a Round,
    pub after: &'a Round,
    /// The time between the two rounds.
    pub interval: Duration,
    /// A problem to mention under the numbers.
    pub note: Option<String>,
    /// Whether more frames follow (`--watch`, `top`).
    pub repeating: bool,
}

pub async fn run(api: &Api, args: StatArgs) -> anyhow::Result<()> {
    let only = if args.outbound {
        None
    } else {
        args.service.as_ref()
    };
    let repeat = Repeat {
        interval: args.interval,
        once: !args.watch,
        table: args.output == Format::Table,
    };
    repeat.run(api, only, |frame| render(&args, &frame)).await
}

/// How a command shows its frames: once, or redrawn every `interval` until
/// interrupted (Ctrl-C).
#[derive(Debug, Clone, Copy)]
pub struct Repeat {
    pub interval: Duration,
    pub once: bool,
    /// Frames are tables: cleared between frames on a terminal (ANSI), else
    /// separated by a blank line.
    pub table: bool,
}

impl Repeat {
    /// Scrape the sidecars `mesh(api, only)` lists and print what `render`
    /// makes of every two consecutive rounds.
    pub async fn run(
        self,
        api: &Api,
        only: Option<&ServiceName>,
        render: impl Fn(Frame<'_>) -> anyhow::Result<String>,
    ) -> anyhow::Result<()> {
        if self.once {
            let scraper = Scraper::new();
            let mesh = mesh(api, only).await?;
            let start = Instant::now();
            let first = scraper.round(&mesh).await;
            let end = tick(start, self.interval).await;
            let second = scraper.round(&mesh).await;
            let frame = render(Frame {
                mesh: &mesh,
                before: &first,
                after: &second,
                interval: end - start,
                note: None,
                repeating: false,
            })?;
            print!("{frame}");
            return Ok(());
        }
        tokio::select! {
            result = self.watch(api, only, render) => result,
            signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C"),
        }
    }

    async fn watch(
        self,
        api: &Api,
        only: Option<&ServiceName>,
        render: impl Fn(Frame<'_>) -> anyhow::Result<String>,
    ) -> anyhow::Result<()> {
        let scraper = Scraper::new();
        let clear = self.table && std::io::stdout().is_terminal();
        let mut mesh = mesh(api, only).await?;
        let mut at = Instant::now();
        let mut previous = scraper.round(&mesh).await;
        let mut note = None;
        let mut first = true;
        loop {
            let now = tick(at, self.interval).await;
            let current = scraper.round(&mesh).await;
            let frame = render(Frame {
                mesh: &mesh,
                before: &previous,
                after: &current,
                interval: now - at,
                note: note.take(),
                repeating: true,
            })?;
            let mut out = std::io::stdout().lock();
            if clear {
                write!(out, "\x1b[H\x1b[2J")?;
            } else if !first && self.table {
                writeln!(out)?;
            }
            write!(out, "{frame}")?;
            out.flush()?;
            drop(out);
            // The directory changes as sidecars come and go (it is read after the
            // round, so scrapes stay an interval apart); a control plane that
            // stops answering leaves the last list in use.
            match self::mesh(api, only).await {
                Ok(m) => mesh = m,
                Err(e) => note = Some(format!("{e:#}; showing the sidecars it listed last")),
            }
            (previous, at, first) = (current, now, false);
        }
    }
}

/// Wait until `interval` after `start` and return that instant (now, if it
/// has passed: a slow round stretches the interval rather than skewing rates).
async fn tick(start: Instant, interval: Duration) -> Instant {
    let target = start + interval;
    if Instant::now() < target {
        tokio::time::sleep_until(target).await;
        target
    } else {
        Instant::now()
    }
}

/// The sidecars to scrape: every instance of every service, or only
/// `only`'s own (a service's inbound view; it must exist).
pub async fn mesh(api: &Api, only: Option<&ServiceName>) -> anyhow::Result<Mesh> {
    let names: Vec<String> = match only {
        Some(service) => vec![service.as_str().to_owned()],
        None => {
            let value = api.ok(Method::GET, "/v1/services", None).await?;
            value["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["instances"].as_u64().unwrap_or(0) > 0)
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        }
    };
    let mut sidecars = Vec::new();
    for name in &names {
        let path = format!("/v1/services/{name}");
        let value = if only.is_some() {
            // The one service asked for: it must exist.
            api.ok(Method::GET, &path, None).await?
        } else {
            match api.call(Method::GET, &path, None).await? {
                // Gone since it was listed.
                (StatusCode::NOT_FOUND, _) => continue,
                (status, value) if !status.is_success() => {
                    return Err(api.refused(status, &value));
                }
                (_, value) => value,
            }
        };
        for instance in value["instances"].as_array().into_iter().flatten() {
            sidecars.push(sidecar(name, instance));
        }
    }
    // Two instances with one admin address (the default `127.0.0.1:4191` of
    // sidecars on one host, say) are one sidecar's metrics: scrape it once.
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for s in &mut sidecars {
        if let Ok(admin) = s.admin {
            if let Some(first) = seen.get(&admin) {
                s.admin = Err(format!("admin address {admin} is also {first}'s"));
            } else {
                seen.insert(admin, s.name());
            }
        }
    }
    Ok(Mesh {
        sidecars,
        services: names,
    })
}

fn sidecar(service: &str, instance: &Value) -> Sidecar {
    let admin_address = instance["admin_address"].as_str().map(str::to_owned);
    let address: Option<SocketAddr> = instance["address"].as_str().and_then(|a| a.parse().ok());
    let admin = match admin_address.as_deref().map(str::parse::<SocketAddr>) {
        None => Err("no admin address".to_owned()),
        Some(Err(_)) => Err(format!(
            "admin address {:?} is not IP:PORT",
            admin_address.as_deref().unwrap_or_default()
        )),
        // A loopback admin address of a sidecar elsewhere names a port on
        // this host, not that sidecar.
        Some(Ok(admin))
            if admin.ip().is_loopback() && address.is_some_and(|a| !a.ip().is_loopback()) =>
        {
            Err(format!(
                "admin address {admin} is loopback, the sidecar is at {}",
                address.map(|a| a.ip().to_string()).unwrap_or_default()
            ))
        }
        Some(Ok(admin)) => Ok(admin),
    };
    Sidecar {
        service: service.to_owned(),
        id: instance["id"].as_str().unwrap_or("?").to_owned(),
        admin_address,
        admin,
    }
}

pub struct Scraper {
    fetcher: Fetcher,
}

impl Scraper {
    fn new() -> Self {
        Self {
            fetcher: Fetcher::new(),
        }
    }

    /// Scrape every sidecar at once.
    async fn round(&self, mesh: &Mesh) -> Round {
        let scrapes = mesh.sidecars.iter().map(|s| async move {
            let result = match &s.admin {
                Ok(admin) => self.fetcher.metrics(*admin).await,
                Err(reason) => Err(reason.clone()),
            };
            ((s.service.clone(), s.id.clone()), (s.clone(), result))
        });
        futures_util::future::join_all(scrapes)
            .await
            .into_iter()
            .collect()
    }
}

/// What every sidecar's series grew by from `before` to `after`, and the
/// sidecars left out with why.
pub fn increases(before: &Round, after: &Round) -> (Vec<Scrape>, Vec<(Sidecar, String)>) {
    let mut increases = Vec::new();
    let mut left_out: Vec<(Sidecar, String)> = Vec::new();
    for (key, (sidecar, result)) in after {
        match (result, before.get(key)) {
            (Err(e), _) => left_out.push((sidecar.clone(), e.clone())),
            (Ok(_), Some((_, Err(e)))) => left_out.push((sidecar.clone(), e.clone())),
            (Ok(now), Some((earlier, Ok(then)))) if earlier.admin == sidecar.admin => {
                increases.push(now.increase_since(then));
            }
            // New since the last round (or moved): counted from the next.
            (Ok(_), _) => {}
        }
    }
    (increases, left_out)
}

/// The lines under a table: no sidecars, the sidecars left out, the note.
pub fn footer(sidecars: usize, left_out: &[(Sidecar, String)], note: Option<&str>) -> String {
    let mut out = String::new();
    if sidecars == 0 {
        out.push_str("no sidecars registered\n");
    } else if !left_out.is_empty() {
        let names: Vec<String> = left_out
            .iter()
            .map(|(s, e)| format!("{} ({e})", s.name()))
            .collect();
        out.push_str(&format!(
            "{} of {} sidecars unreachable: {}\n",
            left_out.len(),
            sidecars,
            names.join(", ")
        ));
    }
    if let Some(note) = note {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

/// The sidecars left out, for `-o json`.
pub fn unreachable(left_out: &[(Sidecar, String)]) -> Vec<Value> {
    left_out
        .iter()
        .map(|(s, e)| {
            json!({
                "service": s.service,
                "id": s.id,
                "admin_address": s.admin_address,
                "error": e,
            })
        })
        .collect()
}

/// What `edges` and `top` print for one frame: `fields` (an object) with the
/// sidecar counts and the note, as a document; or the rows of `table` and
/// the footer naming the sidecars left out.
pub fn view_output(
    format: Format,
    frame: Frame<'_>,
    left_out: &[(Sidecar, String)],
    mut fields: Value,
    table: impl FnOnce() -> Vec<Vec<String>>,
) -> anyhow::Result<String> {
    let sidecars = frame.after.len();
    match format {
        Format::Json | Format::Yaml => {
            fields["sidecars"] = json!(sidecars);
            fields["unreachable"] = Value::Array(unreachable(left_out));
            if let Some(note) = frame.note {
                fields["note"] = Value::String(note);
            }
            document(format, &fields, frame.repeating)
        }
        Format::Table => {
            let mut out = output::table(&table());
            out.push_str(&footer(sidecars, left_out, frame.note.as_deref()));
            Ok(out)
        }
    }
}

/// One document for scripts: JSON indented, or on one line when more follow;
/// YAML, opening with `---` when more follow.
pub fn document(format: Format, value: &Value, repeating: bool) -> anyhow::Result<String> {
    Ok(match (format, repeating) {
        (Format::Yaml, false) => output::yaml(value),
        // A YAML stream: each document opens with `---`.
        (Format::Yaml, true) => format!("---\n{}", output::yaml(value)),
        // One JSON document per line.
        (Format::Json | Format::Table, true) => format!("{}\n", serde_json::to_string(value)?),
        (Format::Json | Format::Table, false) => {
            format!("{}\n", serde_json::to_string_pretty(value)?)
        }
    })
}

/// The table (or JSON) for the increases from `before` to `after`, and the
/// footer naming the sidecars left out.
fn render(args: &StatArgs, frame: &Frame<'_>) -> anyhow::Result<String> {
    let (increases, left_out) = increases(frame.before, frame.after);
    let (mesh, after, interval) = (frame.mesh, frame.after, frame.interval);
    let note = frame.note.clone();
    let direction = if args.outbound {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    let (view, known) = match &args.service {
        Some(service) => (
            View::Routes {
                service: service.as_str(),
            },
            &[][..],
        ),
        None => (View::Services, &mesh.services[..]),
    };
    let rows = stat::aggregate(&increases, direction, view, known, interval);
    match args.output {
        Format::Json | Format::Yaml => {
            let value = json(
                args,
                direction,
                interval,
                &rows,
                after.len(),
                &left_out,
                note,
            );
            document(args.output, &value, frame.repeating)
        }
        Format::Table => {
            let mut out = output::table(&stat::table(&rows));
            out.push_str(&footer(after.len(), &left_out, note.as_deref()));
            Ok(out)
        }
    }
}

fn json(
    args: &StatArgs,
    direction: Direction,
    interval: Duration,
    rows: &[Row],
    sidecars: usize,
    left_out: &[(Sidecar, String)],
    note: Option<String>,
) -> Value {
    let unreachable = unreachable(left_out);
    let mut value = json!({
        "direction": direction,
        "interval_seconds": interval.as_secs_f64(),
        "service": args.service.as_ref().map(ServiceName::as_str),
        "rows": rows,
        "sidecars": sidecars,
        "unreachable": unreachable,
    });
    if let Some(note) = note {
        value["note"] = Value::String(note);
    }
    value
}
