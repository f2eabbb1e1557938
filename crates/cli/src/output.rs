//! Printing shared by the commands: the output format flag, tables, JSON, and writes to stdout
//! that report a closed pipe as an error instead of panicking like `println!`.

use std::io::Write;

use anyhow::Context;
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables and lines.
    Table,
    /// JSON: one document for a result, one line per item for a stream.
    Json,
}

/// A table with `header`, in the style every command uses.
pub fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    table
}

/// Writes `text` and a newline to stdout.
pub fn print_line(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// Writes `value` as pretty JSON to stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    print_line(&text)
}

/// `value` as one line of JSON.
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    serde_json::to_string(value).context("cannot encode JSON")
}

/// An optional number for a table cell: the number, or `-`.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}
