//! Log set-up shared by Weft's binaries: `tracing` to stderr, filtered by
//! `WEFT_LOG` (env-filter syntax, default `info`), as plain text or one JSON
//! object per line. Colours only when stderr is a terminal, so log files and
//! collectors get clean text.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, event fields flattened.
    Json,
}

/// Installs the global subscriber (once per process; later calls do nothing).
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
