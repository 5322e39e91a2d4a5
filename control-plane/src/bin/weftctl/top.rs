//! `weftctl top`: the busiest routes of the mesh (service, route, request
//! rate, success rate, p50/p99), redrawn every `--interval`, from the
//! services' own sidecars' inbound request metrics (scraped as `weftctl
//! stat` does: [`super::stat`]).

use std::time::Duration;

use clap::Args;
use serde_json::json;
use weft_control_plane::stat::{self, Direction, View};

use super::Api;
use super::stat::{Frame, Repeat, increases, view_output};
use crate::output::Format;

/// The long help of `weftctl top --help`.
pub const LONG_ABOUT: &str = "\
The busiest routes of the mesh, busiest first: service, route (`(none)`: requests no route \
matched), request rate, success rate, p50 and p99 latency, from the inbound request metrics \
of every sidecar the control plane knows, redrawn every --interval until interrupted (Ctrl-C). \
The screen is cleared between frames only when standard output is a terminal.

--once prints one frame (two scrapes, --interval apart) and exits, for scripts.";

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between scrapes, and between redraws (e.g. 500ms, 2s, 1m).
    #[arg(long, default_value = "2s", value_parser = stat::parse_interval)]
    interval: Duration,
    /// Print one frame and exit.
    #[arg(long)]
    once: bool,
    /// How many routes to show.
    #[arg(short = 'n', long = "rows", default_value_t = 20)]
    rows: usize,
    /// Output format; `json` prints the same rows for scripts (one document
    /// per line without --once).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub async fn run(api: &Api, args: TopArgs) -> anyhow::Result<()> {
    let repeat = Repeat {
        interval: args.interval,
        once: args.once,
        table: args.output == Format::Table,
    };
    repeat.run(api, None, |frame| render(&args, frame)).await
}

fn render(args: &TopArgs, frame: Frame<'_>) -> anyhow::Result<String> {
    let (increases, left_out) = increases(frame.before, frame.after);
    let rows = stat::aggregate(
        &increases,
        Direction::Inbound,
        View::AllRoutes,
        &[],
        frame.interval,
    );
    let rows = stat::busiest(rows, args.rows);
    let fields = json!({
        "interval_seconds": frame.interval.as_secs_f64(),
        "routes": rows,
    });
    view_output(args.output, frame, &left_out, fields, || {
        stat::top_table(&rows)
    })
}
