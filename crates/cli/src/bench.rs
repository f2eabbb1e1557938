//! `ordo bench produce`: measures produce throughput and call-to-acknowledgement latency.
//!
//! `--clients` tasks, each with its own [`Client`] (its own connections), keep `--in-flight`
//! produce calls outstanding until the run ends. Calls started during `--warmup` are not
//! measured. Each task records latencies in its own HdrHistogram (microseconds); the histograms
//! are merged at the end. The result is a table (unless `--output json`) and exactly one JSON
//! line, also appended to `--output-file` when given.
//!
//! With `--local` the benchmark starts the same cluster as `ordo dev` in a temporary directory
//! and stops and deletes it afterwards, whatever happens.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use ordo_client::{Client, ClientError, Record};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::GlobalArgs;
use crate::dev::{DevCluster, Layout, READY_TIMEOUT};
use crate::output::{self, OutputFormat};
use crate::signals::Signals;

/// Largest latency the histograms track, in microseconds; longer calls count as this.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Pause after a failed call before its slot sends again, so a failing cluster is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce records as fast as the settings allow and report throughput and latency.
    Produce(ProduceBenchArgs),
}

/// Arguments of `ordo bench produce`.
#[derive(Debug, Clone, Args)]
pub struct ProduceBenchArgs {
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
    /// Topic to produce to; created when missing.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=16 * 1024 * 1024))]
    pub record_size: u32,
    /// Records per produce call.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
    /// Produce calls each client keeps outstanding.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub in_flight: u32,
    /// Concurrent clients, each with its own connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// Partitions of the topic, when it is created.
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// Replication factor of the topic, when it is created.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// Distinct keys to spread records over at random; 0 sends records without keys.
    #[arg(long, default_value_t = 0)]
    pub keys: u64,
    /// Measured time, after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured time before the measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// Seed of the random keys and values (default: from the clock); printed with the result.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ProduceBenchArgs {
    fn shape(&self) -> String {
        format!(
            "produce record_size={} batch={} in_flight={} clients={} partitions={} replication_factor={} keys={}",
            self.record_size,
            self.batch,
            self.in_flight,
            self.clients,
            self.partitions,
            self.replication_factor,
            self.keys
        )
    }
}

/// The one JSON line a benchmark prints.
#[derive(Debug, Serialize)]
struct Summary {
    shape: String,
    records_per_sec: f64,
    mb_per_sec: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    errors: u64,
    records: u64,
}

/// What one client task measured.
struct TaskReport {
    latencies_us: Histogram<u64>,
    /// Records acknowledged by measured calls.
    records: u64,
    /// Failed measured calls, by [`ClientError::kind`].
    errors: BTreeMap<&'static str, u64>,
    /// When the last measured call completed.
    last_ack: Option<Instant>,
}

/// Counters shown by the progress bar while the run goes on.
#[derive(Default)]
struct Live {
    records: AtomicU64,
    errors: AtomicU64,
}

/// Runs a benchmark command.
pub async fn run(command: BenchCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        BenchCommand::Produce(args) => produce(args, global).await,
    }
}

async fn produce(args: ProduceBenchArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    if !args.local {
        return tokio::select! {
            result = bench_produce(&args, global.endpoints.clone(), global) => result,
            name = signals.recv() => bail!("interrupted by {name}"),
        };
    }
    let data_dir = std::env::temp_dir().join(format!("ordo-bench-{}", std::process::id()));
    let layout = Layout::new(
        data_dir.clone(),
        args.local_base_port,
        args.local_metrics_base_port,
        args.local_nodes,
    )?;
    eprintln!("starting a local cluster in {}", data_dir.display());
    let mut cluster = DevCluster::spawn(&layout).await?;
    let outcome = tokio::select! {
        result = async {
            cluster.wait_ready(READY_TIMEOUT).await?;
            bench_produce(&args, layout.endpoints(), global).await
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

async fn bench_produce(
    args: &ProduceBenchArgs,
    endpoints: Vec<String>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let client = crate::client_for(endpoints.clone(), global.timeout).await?;
    ensure_topic(&client, args).await?;

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    });
    let started = Instant::now();
    let warm_end = started + args.warmup;
    let end = warm_end + args.duration;
    let live = Arc::new(Live::default());
    let mut tasks = JoinSet::new();
    for index in 0..args.clients {
        let client = crate::client_for(endpoints.clone(), global.timeout).await?;
        let args = args.clone();
        let live = Arc::clone(&live);
        let seed = seed.wrapping_add(u64::from(index));
        tasks.spawn(async move { run_client(client, args, seed, warm_end, end, live).await });
    }

    let progress = progress_bar(args.warmup + args.duration);
    let mut reports = Vec::new();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut previous = (Instant::now(), 0_u64);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(joined) => reports.push(joined.context("a benchmark task failed")?),
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                let records = live.records.load(Ordering::Relaxed);
                let rate = rate(records - previous.1, now - previous.0);
                previous = (now, records);
                let phase = if now < warm_end { "warm-up" } else { "measuring" };
                progress.set_position(millis(now.saturating_duration_since(started)));
                progress.set_message(format!(
                    "{phase}: {rate:.0} records/s, {} errors",
                    live.errors.load(Ordering::Relaxed)
                ));
            }
        }
    }
    progress.finish_and_clear();

    let mut latencies_us = new_histogram();
    let mut records = 0_u64;
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut last_ack = None;
    for report in reports {
        latencies_us
            .add(&report.latencies_us)
            .context("cannot merge latency histograms")?;
        records += report.records;
        for (kind, count) in report.errors {
            *errors.entry(kind).or_default() += count;
        }
        last_ack = last_ack.max(report.last_ack);
    }
    // Calls still in flight at the end finish after it; the measured time stretches to the last
    // of them so their records are not counted against a shorter time.
    let elapsed = last_ack
        .map_or(args.duration, |last| {
            last.saturating_duration_since(warm_end)
        })
        .max(args.duration);
    let error_count: u64 = errors.values().sum();
    let records_per_sec = rate(records, elapsed);
    let summary = Summary {
        shape: args.shape(),
        records_per_sec,
        mb_per_sec: records_per_sec * f64::from(args.record_size) / 1e6,
        p50_us: latencies_us.value_at_quantile(0.5),
        p90_us: latencies_us.value_at_quantile(0.9),
        p99_us: latencies_us.value_at_quantile(0.99),
        p999_us: latencies_us.value_at_quantile(0.999),
        max_us: latencies_us.max(),
        errors: error_count,
        records,
    };
    if global.output == OutputFormat::Table {
        print_table(&summary, &errors, latencies_us.len(), elapsed, seed)?;
    }
    let line = output::json_line(&summary)?;
    output::print_line(&line)?;
    if let Some(path) = &args.output_file {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Creates the topic unless it exists; warns when an existing one has another shape.
async fn ensure_topic(client: &Client, args: &ProduceBenchArgs) -> anyhow::Result<()> {
    match client.describe_topic(&args.topic).await {
        Ok(topic) => {
            let partitions = u32::try_from(topic.partitions.len()).unwrap_or(u32::MAX);
            if partitions != args.partitions || topic.replication_factor != args.replication_factor
            {
                tracing::warn!(
                    topic = %args.topic,
                    partitions,
                    replication_factor = topic.replication_factor,
                    "topic exists with another shape; using it as it is"
                );
            }
            Ok(())
        }
        Err(ClientError::NotFound { .. }) => {
            match client
                .create_topic(&args.topic, args.partitions, args.replication_factor)
                .await
            {
                Ok(_) | Err(ClientError::AlreadyExists { .. }) => Ok(()),
                Err(error) => {
                    Err(error).with_context(|| format!("cannot create topic {}", args.topic))
                }
            }
        }
        Err(error) => Err(error).with_context(|| format!("cannot describe topic {}", args.topic)),
    }
}

/// One client: keeps `in_flight` calls outstanding until `end`, measuring those sent after
/// `warm_end`.
async fn run_client(
    client: Client,
    args: ProduceBenchArgs,
    seed: u64,
    warm_end: Instant,
    end: Instant,
    live: Arc<Live>,
) -> TaskReport {
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    let mut value = vec![0_u8; usize::try_from(args.record_size).unwrap_or(0)];
    random.fill_bytes(&mut value);
    let value = Bytes::from(value);
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let in_flight_max = usize::try_from(args.in_flight).unwrap_or(1);

    let mut report = TaskReport {
        latencies_us: new_histogram(),
        records: 0,
        errors: BTreeMap::new(),
        last_ack: None,
    };
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < in_flight_max && Instant::now() < end {
            let records: Vec<Record> = (0..args.batch)
                .map(|_| {
                    let record = Record::new(value.clone());
                    if args.keys == 0 {
                        record
                    } else {
                        record.with_key(format!("key-{}", random.random_range(0..args.keys)))
                    }
                })
                .collect();
            let client = client.clone();
            let topic = Arc::clone(&topic);
            in_flight.push(async move {
                let sent = Instant::now();
                let count = records.len();
                let result = client.produce(&topic, None, records).await;
                let acked = Instant::now();
                if result.is_err() {
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                (sent, acked, count, result)
            });
        }
        let Some((sent, acked, count, result)) = in_flight.next().await else {
            break;
        };
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        let measured = sent >= warm_end;
        match result {
            Ok(_) => {
                live.records.fetch_add(count, Ordering::Relaxed);
                if measured {
                    let micros = u64::try_from((acked - sent).as_micros()).unwrap_or(u64::MAX);
                    report
                        .latencies_us
                        .saturating_record(micros.min(LATENCY_MAX_US));
                    report.records += count;
                    report.last_ack = report.last_ack.max(Some(acked));
                }
            }
            Err(error) => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "produce failed");
                if measured {
                    *report.errors.entry(error.kind()).or_default() += 1;
                }
            }
        }
    }
    report
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .expect("constant bounds: low >= 1, high >= 2 * low, 3 significant digits")
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

fn print_table(
    summary: &Summary,
    errors: &BTreeMap<&'static str, u64>,
    calls: u64,
    elapsed: Duration,
    seed: u64,
) -> anyhow::Result<()> {
    let mut table = output::table(["metric", "value"]);
    let errors_by_kind = if errors.is_empty() {
        "0".to_owned()
    } else {
        errors
            .iter()
            .map(|(kind, count)| format!("{kind}: {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = [
        ("shape", summary.shape.clone()),
        ("measured", format!("{:.1} s", elapsed.as_secs_f64())),
        ("records", summary.records.to_string()),
        ("calls", calls.to_string()),
        ("records/s", format!("{:.0}", summary.records_per_sec)),
        (
            "MB/s (10^6 bytes of values)",
            format!("{:.2}", summary.mb_per_sec),
        ),
        ("latency p50", format!("{} µs", summary.p50_us)),
        ("latency p90", format!("{} µs", summary.p90_us)),
        ("latency p99", format!("{} µs", summary.p99_us)),
        ("latency p99.9", format!("{} µs", summary.p999_us)),
        ("latency max", format!("{} µs", summary.max_us)),
        ("errors", errors_by_kind),
        ("seed", seed.to_string()),
    ];
    for (name, value) in rows {
        table.add_row(vec![name.to_owned(), value]);
    }
    output::print_line(&table.to_string())
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
            p50_us: 1,
            p90_us: 2,
            p99_us: 3,
            p999_us: 4,
            max_us: 5,
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
}
