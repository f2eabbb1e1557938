//! `ordo bench produce`: produce throughput and call-to-acknowledgement latency.
//!
//! `--clients` tasks, each with its own [`Client`] (its own connections), keep `--in-flight`
//! produce calls outstanding until the run ends. Calls started during `--warmup` are not
//! measured. Each task records latencies in its own HdrHistogram (microseconds); the histograms
//! are merged at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use ordo_client::{Client, Record};
use rand::{Rng, RngCore, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    LocalArgs, PROGRESS_INTERVAL, Percentiles, Summary, ensure_topic, millis, new_histogram,
    progress_bar, rate, record_latency, report, seed_or_clock,
};
use crate::GlobalArgs;

/// Pause after a failed call before its slot sends again, so a failing cluster is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Arguments of `ordo bench produce`.
#[derive(Debug, Clone, Args)]
pub struct ProduceBenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
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
    /// Send each produce call as a unary Produce instead of pipelining the calls on one
    /// ProduceStream per node (the client's default).
    #[arg(long)]
    pub unary: bool,
    /// Produce requests each client keeps in flight per partition before it merges further
    /// calls into one request (ClientOptions::produce_requests_per_partition_max); 0 sends
    /// every call as its own request.
    #[arg(long, default_value_t = 1)]
    pub requests_per_partition: usize,
    /// Send plain produce requests instead of idempotent ones (the client's default), to
    /// measure what idempotence costs.
    #[arg(long)]
    pub no_idempotence: bool,
}

impl ProduceBenchArgs {
    fn shape(&self) -> String {
        format!(
            "produce record_size={} batch={} in_flight={} clients={} partitions={} replication_factor={} keys={} requests_per_partition={}{}{}",
            self.record_size,
            self.batch,
            self.in_flight,
            self.clients,
            self.partitions,
            self.replication_factor,
            self.keys,
            // Idempotence sends one request per partition at a time.
            if self.no_idempotence {
                self.requests_per_partition
            } else {
                1
            },
            if self.unary { " unary" } else { "" },
            if self.no_idempotence {
                " no_idempotence"
            } else {
                ""
            }
        )
    }
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

/// Runs the benchmark against `endpoints`.
pub async fn run(
    args: &ProduceBenchArgs,
    endpoints: Vec<String>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let client = crate::client_for(endpoints.clone(), global.timeout).await?;
    ensure_topic(
        &client,
        &args.topic,
        args.partitions,
        args.replication_factor,
    )
    .await?;
    let seed = seed_or_clock(args.seed);
    let started = Instant::now();
    let warm_end = started + args.warmup;
    let end = warm_end + args.duration;
    let live = Arc::new(Live::default());
    let mut tasks = JoinSet::new();
    for index in 0..args.clients {
        let options = ordo_client::ClientOptions {
            request_timeout: global.timeout,
            produce_stream: !args.unary,
            produce_requests_per_partition_max: args.requests_per_partition,
            idempotence: !args.no_idempotence,
            ..ordo_client::ClientOptions::default()
        };
        let client = ordo_client::Client::connect_with_options(endpoints.clone(), options)
            .await
            .context("invalid --endpoints")?;
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
        latency: Percentiles::of(&latencies_us),
        errors: error_count,
        records,
    };
    let errors_by_kind = super::by_kind(&errors);
    let mut rows = summary.rows(elapsed);
    rows.push(("calls".into(), latencies_us.len().to_string()));
    rows.push(("errors".into(), errors_by_kind));
    rows.push(("seed".into(), seed.to_string()));
    report(&summary, rows, args.output_file.as_deref(), global)
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
                    record_latency(&mut report.latencies_us, acked - sent);
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
