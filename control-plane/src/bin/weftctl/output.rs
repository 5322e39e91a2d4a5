//! How read commands print: `-o table` (the default: tables, a policy file,
//! a unified diff, for people) or `-o json` (one JSON document, for scripts;
//! the shapes are documented in the README's weftctl section and kept
//! stable: fields may be added, never renamed or removed).

use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: a table, the policy file, a unified diff.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// `-o, --output FORMAT`, flattened into every read command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Output format: `table` for people, `json` for scripts (see the README
    /// for the documents' shapes).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl Output {
    pub fn json(self) -> bool {
        self.format == Format::Json
    }
}

/// `value` as indented JSON and a newline.
pub fn json(value: &Value) -> String {
    let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned());
    out.push('\n');
    out
}

/// Rows as columns separated by three spaces, one line each; the first row
/// is the header.
pub fn table(rows: &[Vec<String>]) -> String {
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
