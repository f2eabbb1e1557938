//! `ordo produce`: appends records given as arguments, or one record per stdin line.
//!
//! Stdin is read a batch at a time: at most `--batch` lines and [`BATCH_BYTES_MAX`] bytes are
//! held before they are sent, and a line over [`LINE_BYTES_MAX`] is an error, never a bigger
//! buffer.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use ordo_client::{Client, Record, RecordAck};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::GlobalArgs;
use crate::output::{self, OutputFormat};

/// Longest stdin line accepted as one record, in bytes.
const LINE_BYTES_MAX: usize = 1024 * 1024;
/// A batch read from stdin is sent once it holds this many value bytes, even if short of
/// `--batch` lines, so one request stays well under the server's message size limit.
const BATCH_BYTES_MAX: usize = 1024 * 1024;

/// Arguments of `ordo produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to append to.
    pub topic: String,
    /// Record values. When none are given, each line of stdin is one record.
    pub values: Vec<String>,
    /// Key of every record (records with one key go to one partition).
    #[arg(long)]
    pub key: Option<String>,
    /// Partition for every record (default: by key, or spread when there is no key).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Records per produce request.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Send plain produce requests: a request retried after an unknown outcome may then be
    /// written twice. By default every request carries its producer sequence (idempotent).
    #[arg(long)]
    pub no_idempotence: bool,
    /// Producer name for InitProducer: a later `ordo produce` with the same name fences this
    /// one (its requests then fail with PRODUCER_FENCED).
    #[arg(long)]
    pub producer_name: Option<String>,
    /// Queues deliver the records no earlier than this time: RFC 3339
    /// (2026-12-07T08:00:00Z) or milliseconds since the Unix epoch (header ordo-deliver-at).
    #[arg(long, value_parser = crate::group::parse_time, conflicts_with = "delay")]
    pub deliver_at: Option<i64>,
    /// Queues deliver the records no earlier than this long from now (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<std::time::Duration>,
}

impl ProduceArgs {
    /// The deliver-at time the records carry, if any.
    fn deliver_at(&self) -> Option<i64> {
        self.deliver_at.or_else(|| {
            let delay = self.delay?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            i64::try_from((now + delay).as_millis()).ok()
        })
    }
}

/// Runs `ordo produce`.
pub async fn run(args: ProduceArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let options = ordo_client::ClientOptions {
        request_timeout: global.timeout,
        idempotence: !args.no_idempotence,
        producer_name: args.producer_name.clone(),
        ..ordo_client::ClientOptions::default()
    };
    let client = crate::client_with(global.endpoints.clone(), options).await?;
    let batch = usize::try_from(args.batch).context("--batch does not fit in memory")?;
    let key = args.key.clone().map(Bytes::from);
    if args.values.is_empty() {
        return produce_stdin(&client, &args, key, batch, global.output).await;
    }
    let mut acks = Vec::with_capacity(args.values.len());
    for chunk in args.values.chunks(batch) {
        let records = chunk
            .iter()
            .map(|value| record(Bytes::from(value.clone()), key.as_ref(), args.deliver_at()))
            .collect();
        acks.extend(send(&client, &args, records).await?);
    }
    match global.output {
        OutputFormat::Json => {
            for ack in &acks {
                output::print_line(&output::json_line(ack)?)?;
            }
            Ok(())
        }
        OutputFormat::Table => {
            let mut table = output::table(["partition", "offset"]);
            for ack in &acks {
                table.add_row(vec![ack.partition.to_string(), ack.offset.to_string()]);
            }
            output::print_line(&table.to_string())
        }
    }
}

async fn produce_stdin(
    client: &Client,
    args: &ProduceArgs,
    key: Option<Bytes>,
    batch: usize,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let stdin = tokio::io::stdin();
    if std::io::stdin().is_terminal() {
        eprintln!("reading records from stdin, one per line; end with Ctrl-D");
    }
    let mut reader = BufReader::new(stdin);
    let mut line = Vec::new();
    let mut line_number: u64 = 0;
    let mut header_printed = false;
    let mut at_end = false;
    while !at_end {
        let mut records = Vec::with_capacity(batch);
        let mut bytes = 0_usize;
        while records.len() < batch && bytes < BATCH_BYTES_MAX {
            line_number += 1;
            if !read_line(&mut reader, &mut line, LINE_BYTES_MAX)
                .await
                .with_context(|| format!("cannot read line {line_number} of stdin"))?
            {
                at_end = true;
                break;
            }
            bytes += line.len();
            records.push(record(
                Bytes::copy_from_slice(&line),
                key.as_ref(),
                args.deliver_at(),
            ));
        }
        if records.is_empty() {
            break;
        }
        let acks = send(client, args, records).await?;
        let mut text = String::new();
        for ack in &acks {
            match format {
                OutputFormat::Json => text.push_str(&output::json_line(ack)?),
                OutputFormat::Table => {
                    if !header_printed {
                        text.push_str(&format!("{:>9}  {:>12}\n", "partition", "offset"));
                        header_printed = true;
                    }
                    text.push_str(&format!("{:>9}  {:>12}", ack.partition, ack.offset));
                }
            }
            text.push('\n');
        }
        output::print_line(text.trim_end_matches('\n'))?;
    }
    Ok(())
}

fn record(value: Bytes, key: Option<&Bytes>, deliver_at: Option<i64>) -> Record {
    let mut record = Record::new(value);
    if let Some(key) = key {
        record = record.with_key(key.clone());
    }
    if let Some(at) = deliver_at {
        record = record.with_header(ordo_client::DELIVER_AT_HEADER, at.to_string());
    }
    record
}

async fn send(
    client: &Client,
    args: &ProduceArgs,
    records: Vec<Record>,
) -> anyhow::Result<Vec<RecordAck>> {
    let count = records.len();
    client
        .produce(&args.topic, args.partition, records)
        .await
        .with_context(|| format!("cannot produce {count} records to topic {}", args.topic))
}

/// Reads one line into `line` without its `\n` (or `\r\n`). Returns false at the end of input
/// with nothing read. Fails instead of growing `line` past `max` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> anyhow::Result<bool> {
    line.clear();
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        read_any = true;
        let newline = available.iter().position(|&byte| byte == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if line.len() + chunk.len() > max {
            bail!("line is longer than {max} bytes");
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(read_any)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines are split on newlines, CRLF is trimmed, a last line without newline counts, and
    /// the end of input is reported once.
    #[tokio::test]
    async fn reads_lines() {
        let mut reader = BufReader::new(&b"a\r\n\nlast"[..]);
        let mut line = Vec::new();
        let mut lines = Vec::new();
        while read_line(&mut reader, &mut line, 16)
            .await
            .expect("in memory")
        {
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        assert_eq!(lines, vec!["a", "", "last"]);
    }

    /// A line over the limit is an error, not a larger buffer.
    #[tokio::test]
    async fn rejects_long_line() {
        let mut reader = BufReader::with_capacity(2, &b"abcdef\n"[..]);
        let mut line = Vec::new();
        assert!(read_line(&mut reader, &mut line, 4).await.is_err());
        assert!(line.len() <= 4);
    }
}
