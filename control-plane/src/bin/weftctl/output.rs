//! How read commands print: `-o table` (the default: tables, a policy file,
//! a unified diff, for people), `-o json` (one JSON document, for scripts;
//! the shapes are documented in the README's weftctl section and kept
//! stable: fields may be added, never renamed or removed) or `-o yaml` (the
//! same document as YAML).

use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: a table, the policy file, a unified diff.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
    /// The JSON document as YAML.
    Yaml,
}

/// `-o, --output FORMAT`, flattened into every read command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Output format: `table` for people, `json` or `yaml` for scripts (see
    /// the README for the documents' shapes).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl Output {
    /// Whether the output is a document (JSON or YAML) rather than a table.
    pub fn structured(self) -> bool {
        self.format != Format::Table
    }

    /// `value` as the document `-o` asks for (indented JSON by default).
    pub fn document(self, value: &Value) -> String {
        self.format.document(value)
    }
}

impl Format {
    /// `value` as YAML with `-o yaml`, else as indented JSON, and a newline.
    pub fn document(self, value: &Value) -> String {
        match self {
            Self::Yaml => yaml(value),
            Self::Json | Self::Table => json(value),
        }
    }
}

/// `value` as indented JSON and a newline.
pub fn json(value: &Value) -> String {
    let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned());
    out.push('\n');
    out
}

/// `value` as YAML (its keys in the JSON document's order; multi-line
/// strings as literal blocks), ending with a newline.
pub fn yaml(value: &Value) -> String {
    serde_norway::to_string(value).unwrap_or_else(|_| "null\n".to_owned())
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
