//! `weftctl edges [SERVICE]`: who calls whom. Per caller -> service edge, its
//! request rate, success rate and p99 latency, from the `caller` label of
//! the called services' inbound request metrics (scraped as `weftctl stat`
//! does: [`super::stat`]).

use std::time::Duration;

use clap::Args;
use serde_json::json;
use weft_config::ServiceName;
use weft_control_plane::stat::{self, Direction, View};

use super::Api;
use super::stat::{Frame, Repeat, increases, view_output};
use crate::output::Format;

/// The long help of `weftctl edges --help`.
pub const LONG_ABOUT: &str = "\
Who calls whom: one row per caller -> service edge, with its request rate, success rate and \
p99 latency, from the Prometheus metrics of every sidecar the control plane knows (or, with \
SERVICE, of that service's own sidecars: the edges into it).

The numbers are the called service's view (its sidecars' inbound requests, by their `caller` \
label): over mTLS the service the caller's certificate names, over plaintext the caller's \
unverified `weft-caller` header, `anonymous` without either; `other` stands for the callers \
past a sidecar's `[telemetry] max_callers`. Each sidecar is scraped twice, --interval apart, as \
for `weftctl stat`.";

#[derive(Debug, Args)]
pub struct EdgesArgs {
    /// Only the edges into this service.
    service: Option<ServiceName>,
    /// Time between the two scrapes the rates come from (e.g. 500ms, 2s, 1m);
    /// with --watch, between redraws.
    #[arg(long, default_value = "2s", value_parser = stat::parse_interval)]
    interval: Duration,
    /// Keep redrawing every interval until interrupted (Ctrl-C).
    #[arg(long)]
    watch: bool,
    /// Output format; `json` prints the same rows for scripts (one document
    /// per line with --watch).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub async fn run(api: &Api, args: EdgesArgs) -> anyhow::Result<()> {
    let repeat = Repeat {
        interval: args.interval,
        once: !args.watch,
        table: args.output == Format::Table,
    };
    repeat
        .run(api, args.service.as_ref(), |frame| render(&args, frame))
        .await
}

fn render(args: &EdgesArgs, frame: Frame<'_>) -> anyhow::Result<String> {
    let (increases, left_out) = increases(frame.before, frame.after);
    let view = View::Edges {
        service: args.service.as_ref().map(ServiceName::as_str),
    };
    let rows = stat::aggregate(&increases, Direction::Inbound, view, &[], frame.interval);
    let fields = json!({
        "interval_seconds": frame.interval.as_secs_f64(),
        "service": args.service.as_ref().map(ServiceName::as_str),
        "edges": rows,
    });
    view_output(args.output, frame, &left_out, fields, || {
        stat::edges_table(&rows)
    })
}
