//! `nats-driver`: drives NATS JetStream with the shapes of `ordo bench` and prints the same one
//! JSON result line, so `bench/run` can put both systems side by side.
//!
//! - `setup`: deletes and creates a file stream with R replicas over subjects `<stream>.0..N-1`.
//! - `produce`: like `ordo bench produce`. Each client has its own connection; a "call"
//!   publishes `batch` messages to one subject (async publish, then awaits every ack), so its
//!   latency runs from the first publish to the last ack. Each client keeps `in_flight` calls
//!   outstanding; calls go round robin over the subjects. Calls started in the warm-up are not
//!   measured.
//! - `consume-catchup`: fills one subject with N records, then times an ordered pull consumer
//!   reading all of them from the start.
//! - `e2e-latency`: a publisher at a fixed rate (send time inside the payload) and an ordered
//!   consumer following the tail; latency is publish to delivery.
//! - `stream-info`: messages and bytes stored in the stream, as JSON.
//!
//! Every loop is bounded by a duration or a count and an overall timeout.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

/// Largest latency the histograms track, in microseconds (as `ordo bench`).
const LATENCY_MAX_US: u64 = 60_000_000;
/// Pause after a failed call before its slot sends again (as `ordo bench`).
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Deadline of JetStream API requests and of each publish ack.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Acks outstanding while filling a subject for the catch-up read.
const FILL_WINDOW: usize = 2_000;

#[derive(Debug, Parser)]
#[command(about = "NATS JetStream load generator with the shapes and JSON line of `ordo bench`")]
struct Cli {
    /// Server URLs, comma separated.
    #[arg(long, global = true, default_value = "nats://127.0.0.1:4222")]
    servers: String,
    /// Stream name; its subjects are `<stream>.0`, `<stream>.1`, ...
    #[arg(long, global = true, default_value = "bench")]
    stream: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Delete the stream if it exists and create it again, empty.
    Setup(SetupArgs),
    /// Publish as fast as the settings allow; report throughput and publish-to-ack latency.
    Produce(ProduceArgs),
    /// Fill one subject, then time an ordered consumer reading it all from the start.
    ConsumeCatchup(CatchupArgs),
    /// Publish at a fixed rate and measure publish-to-consumer latency on the tail.
    E2eLatency(LatencyArgs),
    /// Print the stream's stored messages and bytes as one JSON line.
    StreamInfo,
}

#[derive(Debug, Args)]
struct SetupArgs {
    /// Subjects of the stream (the counterpart of partitions).
    #[arg(long, default_value_t = 3)]
    subjects: u32,
    /// Replicas of the stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
}

#[derive(Debug, Clone, Args)]
struct ProduceArgs {
    /// Bytes of each message's payload.
    #[arg(long, default_value_t = 1024)]
    record_size: u32,
    /// Messages per call.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Calls each client keeps outstanding.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    in_flight: u32,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    clients: u32,
    /// Subjects to publish to, round robin (the counterpart of partitions).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    partitions: u32,
    /// Replicas of the stream; only reported in the shape.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Measured time, after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured time before the measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    output_file: Option<PathBuf>,
    /// Seed of the random payloads (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, Args)]
struct CatchupArgs {
    /// Records to write and then read.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Bytes of each record's payload.
    #[arg(long, default_value_t = 1024)]
    record_size: u32,
    /// Subject index to fill and read (`<stream>.<index>`).
    #[arg(long, default_value_t = 0)]
    subject: u32,
    /// Replicas of the stream; only reported in the shape.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Give up (and fail) when filling plus reading takes longer than this.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    timeout: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    output_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LatencyArgs {
    /// Messages per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Measured time, after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// Unmeasured time before the measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Bytes of each message's payload (at least 8: the send time).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..))]
    record_size: u32,
    /// Subject index to publish to and follow.
    #[arg(long, default_value_t = 0)]
    subject: u32,
    /// Replicas of the stream; only reported in the shape.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// How long to wait for the last messages after publishing stops.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    output_file: Option<PathBuf>,
}

/// The one JSON line, with exactly the keys of `ordo bench`.
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

impl Summary {
    fn new(shape: String, records: u64, elapsed: Duration, record_size: u32, errors: u64) -> Self {
        let records_per_sec = rate(records, elapsed);
        Summary {
            shape,
            records_per_sec,
            mb_per_sec: records_per_sec * f64::from(record_size) / 1e6,
            p50_us: 0,
            p90_us: 0,
            p99_us: 0,
            p999_us: 0,
            max_us: 0,
            errors,
            records,
        }
    }

    fn with_latencies(mut self, latencies: &Histogram<u64>) -> Self {
        if !latencies.is_empty() {
            self.p50_us = latencies.value_at_quantile(0.5);
            self.p90_us = latencies.value_at_quantile(0.9);
            self.p99_us = latencies.value_at_quantile(0.99);
            self.p999_us = latencies.value_at_quantile(0.999);
            self.max_us = latencies.max();
        }
        self
    }

    fn emit(&self, output_file: Option<&PathBuf>) -> anyhow::Result<()> {
        let line = serde_json::to_string(self)?;
        println!("{line}");
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Setup(args) => setup(&cli, args).await,
        Command::Produce(args) => produce(&cli, args).await,
        Command::ConsumeCatchup(args) => catchup(&cli, args).await,
        Command::E2eLatency(args) => latency(&cli, args).await,
        Command::StreamInfo => stream_info(&cli).await,
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let servers: Vec<async_nats::ServerAddr> = cli
        .servers
        .split(',')
        .map(|server| server.trim().parse())
        .collect::<Result<_, _>>()
        .context("bad --servers")?;
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(Some(10))
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to {}", cli.servers))?;
    let context = jetstream::context::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    Ok((client, context))
}

fn subject(cli: &Cli, index: u32) -> String {
    format!("{}.{index}", cli.stream)
}

async fn setup(cli: &Cli, args: &SetupArgs) -> anyhow::Result<()> {
    let (_client, js) = connect(cli).await?;
    match js.delete_stream(&cli.stream).await {
        Ok(_) => eprintln!("deleted stream {}", cli.stream),
        Err(error) => eprintln!("stream {} not deleted ({error}); creating it", cli.stream),
    }
    let created = js
        .create_stream(stream::Config {
            name: cli.stream.clone(),
            subjects: (0..args.subjects)
                .map(|index| subject(cli, index))
                .collect(),
            storage: stream::StorageType::File,
            num_replicas: args.replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create stream {}", cli.stream))?;
    let info = created.cached_info();
    eprintln!(
        "created stream {} (replicas {}, storage {:?}, leader {:?})",
        info.config.name,
        info.config.num_replicas,
        info.config.storage,
        info.cluster
            .as_ref()
            .and_then(|cluster| cluster.leader.clone())
    );
    Ok(())
}

async fn stream_info(cli: &Cli) -> anyhow::Result<()> {
    let (_client, js) = connect(cli).await?;
    let mut stream = js
        .get_stream(&cli.stream)
        .await
        .with_context(|| format!("no stream {}", cli.stream))?;
    let info = stream.info().await.context("cannot read stream info")?;
    println!(
        "{}",
        serde_json::json!({
            "stream": cli.stream,
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "replicas": info.config.num_replicas,
        })
    );
    Ok(())
}

/// What one client task measured.
struct TaskReport {
    latencies_us: Histogram<u64>,
    records: u64,
    errors: BTreeMap<String, u64>,
    last_ack: Option<Instant>,
}

async fn produce(cli: &Cli, args: &ProduceArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    });
    let subjects: Vec<String> = (0..args.partitions)
        .map(|index| subject(cli, index))
        .collect();
    // Connect every client before the clock starts.
    let mut contexts = Vec::new();
    for _ in 0..args.clients {
        contexts.push(connect(cli).await?);
    }
    let started = Instant::now();
    let warm_end = started + args.warmup;
    let end = warm_end + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (client, js)) in contexts.into_iter().enumerate() {
        let args = args.clone();
        let subjects = subjects.clone();
        let index = u32::try_from(index).unwrap_or(0);
        tasks.spawn(async move {
            let report = run_client(js, args, subjects, index, seed, warm_end, end).await;
            drop(client);
            report
        });
    }
    let mut latencies_us = new_histogram();
    let mut records = 0;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_ack = None;
    while let Some(joined) = tasks.join_next().await {
        let report = joined.context("a benchmark task failed")?;
        latencies_us
            .add(&report.latencies_us)
            .context("cannot merge histograms")?;
        records += report.records;
        for (kind, count) in report.errors {
            *errors.entry(kind).or_default() += count;
        }
        last_ack = last_ack.max(report.last_ack);
    }
    if !errors.is_empty() {
        eprintln!("errors: {errors:?}");
    }
    let elapsed = last_ack
        .map_or(args.duration, |last| {
            last.saturating_duration_since(warm_end)
        })
        .max(args.duration);
    let shape = format!(
        "produce record_size={} batch={} in_flight={} clients={} partitions={} replication_factor={} keys=0",
        args.record_size,
        args.batch,
        args.in_flight,
        args.clients,
        args.partitions,
        args.replication_factor
    );
    Summary::new(
        shape,
        records,
        elapsed,
        args.record_size,
        errors.values().sum(),
    )
    .with_latencies(&latencies_us)
    .emit(args.output_file.as_ref())
}

/// Publishes one call's messages and waits for every ack; returns the first error.
async fn publish_call(
    js: &jetstream::Context,
    subject: &str,
    payload: &Bytes,
    batch: u32,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(usize::try_from(batch).unwrap_or(1));
    for _ in 0..batch {
        match js.publish(subject.to_owned(), payload.clone()).await {
            Ok(ack) => acks.push(ack),
            Err(error) => return Err(format!("publish: {}", error.kind())),
        }
    }
    let mut first_error = None;
    for ack in futures::future::join_all(acks.into_iter().map(IntoFuture::into_future)).await {
        if let Err(error) = ack
            && first_error.is_none()
        {
            first_error = Some(format!("ack: {}", error.kind()));
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn run_client(
    js: jetstream::Context,
    args: ProduceArgs,
    subjects: Vec<String>,
    index: u32,
    seed: u64,
    warm_end: Instant,
    end: Instant,
) -> TaskReport {
    let mut random = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(u64::from(index)));
    let mut value = vec![0_u8; usize::try_from(args.record_size).unwrap_or(0)];
    random.fill_bytes(&mut value);
    let payload = Bytes::from(value);
    let in_flight_max = usize::try_from(args.in_flight).unwrap_or(1);
    let mut next_subject = usize::try_from(index).unwrap_or(0) % subjects.len();
    let mut report = TaskReport {
        latencies_us: new_histogram(),
        records: 0,
        errors: BTreeMap::new(),
        last_ack: None,
    };
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < in_flight_max && Instant::now() < end {
            let subject = subjects[next_subject].clone();
            next_subject = (next_subject + 1) % subjects.len();
            let js = js.clone();
            let payload = payload.clone();
            let batch = args.batch;
            in_flight.push(async move {
                let sent = Instant::now();
                let result = publish_call(&js, &subject, &payload, batch).await;
                let acked = Instant::now();
                if result.is_err() {
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                (sent, acked, result)
            });
        }
        let Some((sent, acked, result)) = in_flight.next().await else {
            break;
        };
        if sent < warm_end {
            continue;
        }
        match result {
            Ok(()) => {
                let micros = u64::try_from((acked - sent).as_micros()).unwrap_or(u64::MAX);
                report
                    .latencies_us
                    .saturating_record(micros.clamp(1, LATENCY_MAX_US));
                report.records += u64::from(args.batch);
                report.last_ack = report.last_ack.max(Some(acked));
            }
            Err(kind) => *report.errors.entry(kind).or_default() += 1,
        }
    }
    report
}

/// An awaited publish ack.
type AckFuture = <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture;

/// Publishes `records` messages to `subject`, `FILL_WINDOW` acks outstanding.
async fn fill(
    js: &jetstream::Context,
    subject: &str,
    records: u64,
    payload: Bytes,
) -> anyhow::Result<()> {
    let mut pending: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    for _ in 0..records {
        if pending.len() >= FILL_WINDOW
            && let Some(ack) = pending.next().await
        {
            ack.context("a fill publish failed")?;
        }
        let ack = js
            .publish(subject.to_owned(), payload.clone())
            .await
            .context("cannot publish")?;
        pending.push(ack.into_future());
    }
    while let Some(ack) = pending.next().await {
        ack.context("a fill publish failed")?;
    }
    Ok(())
}

async fn catchup(cli: &Cli, args: &CatchupArgs) -> anyhow::Result<()> {
    tokio::time::timeout(args.timeout, catchup_inner(cli, args))
        .await
        .with_context(|| format!("catch-up did not finish within {:?}", args.timeout))?
}

async fn catchup_inner(cli: &Cli, args: &CatchupArgs) -> anyhow::Result<()> {
    let (_client, js) = connect(cli).await?;
    let subject = subject(cli, args.subject);
    let mut value = vec![0_u8; usize::try_from(args.record_size).unwrap_or(0)];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut value);
    let fill_started = Instant::now();
    fill(&js, &subject, args.records, Bytes::from(value)).await?;
    eprintln!(
        "filled {subject} with {} records in {:.1} s",
        args.records,
        fill_started.elapsed().as_secs_f64()
    );

    let stream = js.get_stream(&cli.stream).await.context("no stream")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("cannot create an ordered consumer")?;
    let started = Instant::now();
    let mut messages = consumer.messages().await.context("cannot start reading")?;
    let mut read = 0_u64;
    let mut errors = 0_u64;
    let mut bytes = 0_u64;
    while read < args.records {
        match messages.next().await {
            Some(Ok(message)) => {
                read += 1;
                bytes += u64::try_from(message.payload.len()).unwrap_or(0);
            }
            Some(Err(error)) => {
                errors += 1;
                eprintln!("consumer error: {error}");
                if errors > 100 {
                    bail!("too many consumer errors");
                }
            }
            None => bail!("the consumer ended after {read} records"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "read {read} records ({bytes} bytes) in {:.2} s",
        elapsed.as_secs_f64()
    );
    let shape = format!(
        "consume-catch-up record_size={} records={} replication_factor={}",
        args.record_size, args.records, args.replication_factor
    );
    Summary::new(shape, read, elapsed, args.record_size, errors).emit(args.output_file.as_ref())
}

/// Microseconds since the UNIX epoch (publisher and consumer share this process and clock).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

async fn latency(cli: &Cli, args: &LatencyArgs) -> anyhow::Result<()> {
    let (_client, js) = connect(cli).await?;
    let (_consumer_client, consumer_js) = connect(cli).await?;
    let subject = subject(cli, args.subject);
    let stream = consumer_js
        .get_stream(&cli.stream)
        .await
        .context("no stream")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("cannot create an ordered consumer")?;
    let mut messages = consumer.messages().await.context("cannot start reading")?;

    let started = Instant::now();
    let warm_end = started + args.warmup;
    let end = warm_end + args.duration;
    let warm_end_us = now_us() + u64::try_from(args.warmup.as_micros()).unwrap_or(0);
    let rate_per_sec = u64::from(args.rate);
    let record_size = usize::try_from(args.record_size).unwrap_or(8);

    // The publisher: message i is due at started + i / rate; sends are not held back by acks.
    let sent_total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let js = js.clone();
        let subject = subject.clone();
        let sent_total = std::sync::Arc::clone(&sent_total);
        tokio::spawn(async move {
            let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
            let mut sent_measured = 0_u64;
            let mut errors = 0_u64;
            let mut index = 0_u64;
            loop {
                let due = started + Duration::from_micros(index * 1_000_000 / rate_per_sec);
                if due >= end {
                    break;
                }
                // Reap acks while waiting for the next send.
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => break,
                        Some(ack) = acks.next(), if !acks.is_empty() => {
                            let ack: Result<_, _> = ack;
                            if ack.is_err() { errors += 1; }
                        }
                    }
                }
                let sent_us = now_us();
                let mut payload = vec![0_u8; record_size];
                payload[..8].copy_from_slice(&sent_us.to_le_bytes());
                match js.publish(subject.clone(), Bytes::from(payload)).await {
                    Ok(ack) => {
                        acks.push(ack.into_future());
                        sent_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if sent_us >= warm_end_us {
                            sent_measured += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
                index += 1;
            }
            while let Some(ack) = acks.next().await {
                if ack.is_err() {
                    errors += 1;
                }
            }
            (sent_measured, errors)
        })
    };

    let mut latencies_us = new_histogram();
    let mut received_measured = 0_u64;
    let mut consumer_errors = 0_u64;
    let deadline = end + args.drain;
    let mut received_total = 0_u64;
    loop {
        // Stop once the publisher is done and everything it sent has arrived.
        if publisher.is_finished()
            && received_total >= sent_total.load(std::sync::atomic::Ordering::Relaxed)
        {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        let wake = deadline.min(Instant::now() + Duration::from_millis(100));
        let next = tokio::time::timeout_at(wake, messages.next()).await;
        let message = match next {
            Err(_elapsed) => continue,
            Ok(None) => bail!("the consumer ended"),
            Ok(Some(Err(error))) => {
                consumer_errors += 1;
                eprintln!("consumer error: {error}");
                if consumer_errors > 100 {
                    bail!("too many consumer errors");
                }
                continue;
            }
            Ok(Some(Ok(message))) => message,
        };
        let received_us = now_us();
        received_total += 1;
        let Some(stamp) = message.payload.get(..8) else {
            continue;
        };
        let sent_us = u64::from_le_bytes(stamp.try_into().unwrap_or([0; 8]));
        if sent_us >= warm_end_us {
            received_measured += 1;
            latencies_us
                .saturating_record(received_us.saturating_sub(sent_us).clamp(1, LATENCY_MAX_US));
        }
    }
    let (sent_measured, publish_errors) = publisher.await.context("the publisher failed")?;
    let missing = sent_measured.saturating_sub(received_measured);
    if missing > 0 || publish_errors > 0 {
        eprintln!(
            "sent {sent_measured}, received {received_measured}, publish errors {publish_errors}"
        );
    }
    let shape = format!(
        "consume-latency record_size={} rate={} replication_factor={}",
        args.record_size, args.rate, args.replication_factor
    );
    Summary::new(
        shape,
        received_measured,
        args.duration,
        args.record_size,
        missing + publish_errors + consumer_errors,
    )
    .with_latencies(&latencies_us)
    .emit(args.output_file.as_ref())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .expect("constant bounds: low >= 1, high >= 2 * low, 3 significant digits")
}

/// `count` per second over `elapsed`; zero for an empty interval.
fn rate(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        #[allow(clippy::cast_precision_loss)]
        let count = count as f64;
        count / seconds
    } else {
        0.0
    }
}
