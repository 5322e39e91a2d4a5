//! The invariants table and the run's summary, as printed at the end.

use std::fmt::Write as _;

/// One invariant: its name, whether it held, and the counts behind it.
#[derive(Debug, Clone)]
pub struct Row {
    pub invariant: String,
    pub pass: bool,
    pub counts: String,
}

impl Row {
    pub fn new(invariant: &str, pass: bool, counts: String) -> Self {
        Self {
            invariant: invariant.to_owned(),
            pass,
            counts,
        }
    }
}

/// Everything the run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub rows: Vec<Row>,
    /// Further lines: faults injected, failures that were not excused, ...
    pub details: Vec<String>,
}

impl Report {
    /// True when every invariant held.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    /// The invariants as a markdown table.
    pub fn table(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| r.invariant.len())
            .max()
            .unwrap_or(0)
            .max("invariant".len());
        let mut out = String::new();
        let _ = writeln!(out, "| {:width$} | result | counts |", "invariant");
        let _ = writeln!(out, "|{}|--------|--------|", "-".repeat(width + 2));
        for row in &self.rows {
            let result = if row.pass { "PASS" } else { "FAIL" };
            let _ = writeln!(
                out,
                "| {:width$} | {result:6} | {} |",
                row.invariant, row.counts
            );
        }
        out
    }

    /// The whole report: seed, table, details, verdict.
    pub fn render(&self) -> String {
        let mut out = format!("chaos run, seed {}\n\n{}", self.seed, self.table());
        if !self.details.is_empty() {
            out.push('\n');
            for line in &self.details {
                let _ = writeln!(out, "{line}");
            }
        }
        let failed = self.rows.iter().filter(|r| !r.pass).count();
        let _ = writeln!(
            out,
            "\n{}: {} of {} invariants held (seed {}; replay with CHAOS_SEED={})",
            if failed == 0 { "PASS" } else { "FAIL" },
            self.rows.len() - failed,
            self.rows.len(),
            self.seed,
            self.seed
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_when_every_row_does() {
        let mut report = Report {
            seed: 7,
            rows: vec![Row::new("a", true, "1".into())],
            details: Vec::new(),
        };
        assert!(report.passed());
        report
            .rows
            .push(Row::new("longer name", false, "0 of 2".into()));
        assert!(!report.passed());
        let text = report.render();
        assert!(text.contains("| longer name | FAIL   | 0 of 2 |"), "{text}");
        assert!(text.contains("FAIL: 1 of 2 invariants held"), "{text}");
        assert!(!Report::default().passed());
    }
}
