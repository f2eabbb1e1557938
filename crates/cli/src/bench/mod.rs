//! `ordo bench`: measurements of a running cluster, or of a local one it starts itself.
//!
//! - `produce`: throughput and call-to-ack latency of produce calls.
//! - `consume`: catch-up read throughput of one full partition, and produce-to-subscriber
//!   latency at a fixed rate.
//! - `group`: consumer group read throughput by group size, commit latency, and the time to a
//!   balanced assignment after a join and after a member's death.
//! - `queue`: queue throughput (receive + ack) by consumer count, unordered and key-ordered, ack
//!   latency, and how soon a message comes again after its lease ends.
//! - `failover`: SIGKILLs partition leaders of a local cluster under a steady load and reports
//!   the longest gap between acks, the failed calls, and whether every acked record is still
//!   readable.
//!
//! Every benchmark prints a table (unless `--output json`) and exactly one JSON line, also
//! appended to `--output-file` when given. With `--local` it starts the same cluster as
//! `ordo dev` in a temporary directory and stops and deletes it afterwards, whatever happens.
//! Every loop is bounded by the run's duration or a deadline.

mod consume;
mod failover;
mod group;
mod produce;
mod queue;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use ordo_client::{Client, ClientError};
use serde::Serialize;

use crate::GlobalArgs;
use crate::dev::{DevCluster, Layout, READY_TIMEOUT};
use crate::output::{self, OutputFormat};
use crate::signals::Signals;

/// Largest latency the histograms track, in microseconds; longer ones count as this.
const LATENCY_MAX_US: u64 = 60_000_000;
/// How often progress bars are redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce records as fast as the settings allow and report throughput and latency.
    Produce(produce::ProduceBenchArgs),
    /// Read a full partition from the start, or measure produce-to-subscriber latency.
    Consume(consume::ConsumeBenchArgs),
    /// Kill -9 partition leaders of a local cluster under load; report gaps and losses.
    Failover(failover::FailoverBenchArgs),
    /// Consumer groups: read throughput by group size, commit latency, rebalance times.
    Group(group::GroupBenchArgs),
    /// Queues: receive + ack throughput by consumer count, ack latency, redelivery accuracy.
    Queue(queue::QueueBenchArgs),
}

/// Where the benchmark runs: against `--endpoints`, or a cluster it starts (`--local`).
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Start a local cluster like `ordo dev` in a temporary directory (ignores --endpoints).
    #[arg(long)]
    pub local: bool,
    /// gRPC port of node 1 of the --local cluster.
    #[arg(long, default_value_t = 7001)]
    pub local_base_port: u16,
    /// Metrics port base of the --local cluster (node i uses base + i).
    #[arg(long, default_value_t = 9100)]
    pub local_metrics_base_port: u16,
    /// Nodes of the --local cluster.
    #[arg(long, default_value_t = 3)]
    pub local_nodes: u16,
}

/// Runs a benchmark command.
pub async fn run(command: BenchCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        BenchCommand::Produce(args) => {
            let local = args.local.clone();
            with_cluster(&local, global, async |endpoints, _| {
                produce::run(&args, endpoints, global).await
            })
            .await
        }
        BenchCommand::Consume(args) => {
            let local = args.local.clone();
            with_cluster(&local, global, async |endpoints, _| {
                consume::run(&args, endpoints, global).await
            })
            .await
        }
        BenchCommand::Group(args) => {
            let local = args.local.clone();
            with_cluster(&local, global, async |endpoints, _| {
                group::run(&args, endpoints, global).await
            })
            .await
        }
        BenchCommand::Queue(args) => {
            let local = args.local.clone();
            with_cluster(&local, global, async |endpoints, _| {
                queue::run(&args, endpoints, global).await
            })
            .await
        }
        BenchCommand::Failover(args) => {
            anyhow::ensure!(
                args.local.local,
                "`ordo bench failover` kills nodes, so it needs the cluster it starts itself: pass --local"
            );
            let local = args.local.clone();
            with_cluster(&local, global, async |endpoints, cluster| {
                let cluster = cluster.context("a local cluster")?;
                failover::run(&args, endpoints, cluster, global).await
            })
            .await
        }
    }
}

/// Runs `bench` against `--endpoints`, or against a local cluster started for it and stopped
/// and deleted afterwards. Ctrl-C or SIGTERM interrupts it.
async fn with_cluster(
    local: &LocalArgs,
    global: &GlobalArgs,
    bench: impl AsyncFnOnce(Vec<String>, Option<&mut DevCluster>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    if !local.local {
        return tokio::select! {
            result = bench(global.endpoints.clone(), None) => result,
            name = signals.recv() => anyhow::bail!("interrupted by {name}"),
        };
    }
    let data_dir = std::env::temp_dir().join(format!("ordo-bench-{}", std::process::id()));
    let layout = Layout::new(
        data_dir.clone(),
        local.local_base_port,
        local.local_metrics_base_port,
        local.local_nodes,
    )?;
    eprintln!("starting a local cluster in {}", data_dir.display());
    let mut cluster = DevCluster::spawn(&layout).await?;
    let outcome = tokio::select! {
        result = async {
            cluster.wait_ready(READY_TIMEOUT).await?;
            bench(layout.endpoints(), Some(&mut cluster)).await
        } => result,
        name = signals.recv() => Err(anyhow::anyhow!("interrupted by {name}")),
    };
    let stopped = cluster
        .stop()
        .await
        .context("cannot stop the local cluster");
    if let Err(error) = std::fs::remove_dir_all(&data_dir) {
        tracing::warn!(%error, dir = %data_dir.display(), "cannot delete the local cluster's data");
    }
    outcome?;
    stopped
}

/// Creates `topic` unless it exists; warns when an existing one has another shape.
async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
    replication_factor: u32,
) -> anyhow::Result<()> {
    match client.describe_topic(topic).await {
        Ok(existing) => {
            let actual = u32::try_from(existing.partitions.len()).unwrap_or(u32::MAX);
            if actual != partitions || existing.replication_factor != replication_factor {
                tracing::warn!(
                    topic,
                    partitions = actual,
                    replication_factor = existing.replication_factor,
                    "topic exists with another shape; using it as it is"
                );
            }
            Ok(())
        }
        Err(ClientError::NotFound { .. }) => {
            match client
                .create_topic(topic, partitions, replication_factor)
                .await
            {
                Ok(_) | Err(ClientError::AlreadyExists { .. }) => Ok(()),
                Err(error) => Err(error).with_context(|| format!("cannot create topic {topic}")),
            }
        }
        Err(error) => Err(error).with_context(|| format!("cannot describe topic {topic}")),
    }
}

/// Produce calls kept outstanding while filling a topic.
const FILL_IN_FLIGHT: usize = 8;
/// Records per produce call while filling.
const FILL_BATCH: u64 = 500;

/// Writes `records` records of `record_size` bytes to `topic`: spread over the partitions, or
/// keyed `key-<i mod keys>` (so by key) when `keys` is given.
async fn fill(
    client: &Client,
    topic: &str,
    records: u64,
    record_size: u32,
    keys: Option<u64>,
) -> anyhow::Result<()> {
    let value = bytes::Bytes::from(vec![b'b'; record_size as usize]);
    let mut written = 0u64;
    let mut calls = futures::stream::FuturesUnordered::new();
    while written < records || !calls.is_empty() {
        while written < records && calls.len() < FILL_IN_FLIGHT {
            let count = FILL_BATCH.min(records - written);
            let batch: Vec<ordo_client::Record> = (written..written + count)
                .map(|index| {
                    let record = ordo_client::Record::new(value.clone());
                    match keys {
                        Some(keys) => record.with_key(format!("key-{}", index % keys.max(1))),
                        None => record,
                    }
                })
                .collect();
            written += count;
            calls.push(client.produce(topic, None, batch));
        }
        if let Some(result) = futures::StreamExt::next(&mut calls).await {
            result.context("filling the topic failed")?;
        }
    }
    Ok(())
}

/// Prints the table (unless JSON output was asked for) and the one JSON line, and appends the
/// line to `output_file`.
fn report<T: Serialize>(
    summary: &T,
    rows: Vec<(String, String)>,
    output_file: Option<&Path>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    if global.output == OutputFormat::Table {
        let mut table = output::table(["metric", "value"]);
        for (name, value) in rows {
            table.add_row(vec![name, value]);
        }
        output::print_line(&table.to_string())?;
    }
    let line = output::json_line(summary)?;
    output::print_line(&line)?;
    if let Some(path) = output_file {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The JSON line of the throughput benchmarks.
#[derive(Debug, Serialize)]
struct Summary {
    shape: String,
    records_per_sec: f64,
    mb_per_sec: f64,
    #[serde(flatten)]
    latency: Percentiles,
    errors: u64,
    records: u64,
}

impl Summary {
    /// Table rows of the summary, measured over `elapsed`.
    fn rows(&self, elapsed: Duration) -> Vec<(String, String)> {
        let mut rows = vec![
            ("shape".to_owned(), self.shape.clone()),
            (
                "measured".to_owned(),
                format!("{:.1} s", elapsed.as_secs_f64()),
            ),
            ("records".to_owned(), self.records.to_string()),
            (
                "records/s".to_owned(),
                format!("{:.0}", self.records_per_sec),
            ),
            (
                "MB/s (10^6 bytes of values)".to_owned(),
                format!("{:.2}", self.mb_per_sec),
            ),
        ];
        rows.extend(self.latency.rows());
        rows
    }
}

/// `kind: count, ...` of failures by kind, or `0`.
fn by_kind(counts: &std::collections::BTreeMap<&'static str, u64>) -> String {
    if counts.is_empty() {
        return "0".to_owned();
    }
    counts
        .iter()
        .map(|(kind, count)| format!("{kind}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Latency percentiles of a histogram in microseconds, as the JSON lines carry them.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Percentiles {
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50_us: histogram.value_at_quantile(0.5),
            p90_us: histogram.value_at_quantile(0.9),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }

    fn rows(&self) -> Vec<(String, String)> {
        [
            ("latency p50", self.p50_us),
            ("latency p90", self.p90_us),
            ("latency p99", self.p99_us),
            ("latency p99.9", self.p999_us),
            ("latency max", self.max_us),
        ]
        .into_iter()
        .map(|(name, micros)| (name.to_owned(), format!("{micros} µs")))
        .collect()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .expect("constant bounds: low >= 1, high >= 2 * low, 3 significant digits")
}

/// Records `elapsed` in microseconds, clamped to the histogram's range.
fn record_latency(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.clamp(1, LATENCY_MAX_US));
}

fn progress_bar(total: Duration) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(millis(total));
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `count` per second over `elapsed`; zero for an empty interval.
fn rate(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        // Counts stay far below 2^52, where the conversion would round.
        #[allow(clippy::cast_precision_loss)]
        let count = count as f64;
        count / seconds
    } else {
        0.0
    }
}

/// A seed from the clock, when the user gave none.
fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON line has exactly the documented fields.
    #[test]
    fn summary_fields() {
        let summary = Summary {
            shape: "s".into(),
            records_per_sec: 1.5,
            mb_per_sec: 0.5,
            latency: Percentiles::default(),
            errors: 0,
            records: 9,
        };
        let value: serde_json::Value =
            serde_json::from_str(&output::json_line(&summary).expect("encodes")).expect("parses");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "errors",
                "max_us",
                "mb_per_sec",
                "p50_us",
                "p90_us",
                "p999_us",
                "p99_us",
                "records",
                "records_per_sec",
                "shape"
            ]
        );
    }

    /// Rates divide by seconds and survive an empty interval.
    #[test]
    fn rates() {
        assert!((rate(500, Duration::from_millis(500)) - 1000.0).abs() < 1e-9);
        assert!(rate(5, Duration::ZERO).abs() < f64::EPSILON);
    }

    /// Percentiles come from the histogram; latencies outside its range are clamped.
    #[test]
    fn percentiles() {
        let mut histogram = new_histogram();
        for micros in 1..=1000 {
            record_latency(&mut histogram, Duration::from_micros(micros));
        }
        record_latency(&mut histogram, Duration::from_secs(3600));
        let percentiles = Percentiles::of(&histogram);
        assert!((495..=505).contains(&percentiles.p50_us));
        assert!(percentiles.max_us >= LATENCY_MAX_US);
        assert_eq!(percentiles.rows().len(), 5);
    }
}
