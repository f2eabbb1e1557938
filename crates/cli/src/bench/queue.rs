//! `ordo bench queue`: queues.
//!
//! - Throughput: fills a topic of `--partitions` partitions with `--records` keyed records,
//!   then for each count in `--consumers` a fresh queue over the topic is drained by that many
//!   consumers (each a `QueueConsumer` in this process acking every message as it arrives,
//!   through its ack batcher). Messages/s (receive + ack) from the first receive to the last ack,
//!   and each ack's latency (call to durable answer). The largest count runs again on a
//!   key-ordered queue, for the cost of key order.
//! - Redelivery accuracy: one consumer takes `--redeliveries` messages and never settles them,
//!   with a `--visibility` lease; a second receives them again. How long after each lease's end
//!   (the leader's clock, on this machine) the message came again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use ordo_client::{Client, QueueConsumerOptions, QueueSettings};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    LocalArgs, Percentiles, ensure_topic, new_histogram, progress_bar, rate, record_latency, report,
};
use crate::GlobalArgs;

/// Longest one phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

/// Arguments of `ordo bench queue`.
#[derive(Debug, Clone, Args)]
pub struct QueueBenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Topic to use; created when missing. A fresh topic per run is best.
    #[arg(long, default_value = "bench-queue")]
    pub topic: String,
    /// Partitions of the topic, when it is created.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
    /// Records written before the queues are drained.
    #[arg(long, default_value_t = 50_000)]
    pub records: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=1024 * 1024))]
    pub record_size: u32,
    /// Distinct keys of the records (for the key-ordered run).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Consumer counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub consumers: Vec<u32>,
    /// Messages each consumer holds unacked at most.
    #[arg(long, default_value_t = 100)]
    pub max_in_flight: u32,
    /// Messages left unsettled to time their redelivery.
    #[arg(long, default_value_t = 50)]
    pub redeliveries: u32,
    /// Lease length of the redelivery phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub visibility: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
}

/// One queue drain.
#[derive(Debug, Serialize)]
struct Drain {
    consumers: u32,
    key_ordered: bool,
    messages_per_sec: f64,
    mb_per_sec: f64,
    ack_latency: Percentiles,
    redelivered: u64,
}

/// The JSON line.
#[derive(Debug, Serialize)]
struct QueueSummary {
    shape: String,
    drains: Vec<Drain>,
    /// From a lease's end to the message's next delivery (ms precision).
    redelivery_after_lease: Percentiles,
}

/// Runs the benchmark against `endpoints`.
pub async fn run(
    args: &QueueBenchArgs,
    endpoints: Vec<String>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    ensure!(args.records > 0, "--records must be at least 1");
    ensure!(args.keys > 0, "--keys must be at least 1");
    let client = crate::client_for(endpoints, global.timeout).await?;
    ensure_topic(&client, &args.topic, args.partitions, 3).await?;
    let run_id = super::seed_or_clock(None);
    let progress = progress_bar(Duration::from_secs(1));
    progress.set_message(format!("filling {} records", args.records));
    super::fill(
        &client,
        &args.topic,
        args.records,
        args.record_size,
        Some(args.keys),
    )
    .await?;
    let total: u64 = client
        .describe_topic(&args.topic)
        .await?
        .partitions
        .iter()
        .map(|partition| partition.high_watermark)
        .sum();

    let mut runs: Vec<(u32, bool)> = args.consumers.iter().map(|count| (*count, false)).collect();
    if let Some(largest) = args.consumers.iter().max() {
        runs.push((*largest, true));
    }
    let mut drains = Vec::new();
    for (consumers, key_ordered) in runs {
        ensure!(consumers > 0, "--consumers: at least 1");
        let order = if key_ordered {
            "key-ordered"
        } else {
            "unordered"
        };
        progress.set_message(format!(
            "{consumers} consumers draining {total} messages ({order})"
        ));
        let queue = format!("bench-{run_id}-{consumers}-{order}");
        let settings = QueueSettings {
            key_ordered,
            ..QueueSettings::default()
        };
        client
            .create_queue(&queue, &args.topic, &settings)
            .await
            .with_context(|| format!("cannot create queue {queue}"))?;
        let (elapsed, acks, redelivered) = drain(&client, &queue, consumers, args, total).await?;
        drains.push(Drain {
            consumers,
            key_ordered,
            messages_per_sec: rate(total, elapsed),
            mb_per_sec: rate(total * u64::from(args.record_size), elapsed) / 1e6,
            ack_latency: Percentiles::of(&acks),
            redelivered,
        });
        client.delete_queue(&queue).await.ok();
    }

    progress.set_message(format!("{} redeliveries", args.redeliveries));
    let redelivery =
        redelivery_delays(&client, args, &format!("bench-{run_id}-redelivery")).await?;
    progress.finish_and_clear();

    let summary = QueueSummary {
        shape: format!(
            "{} partitions, {} B records, {} keys, {} in flight per consumer, redelivery lease {:?}",
            args.partitions, args.record_size, args.keys, args.max_in_flight, args.visibility
        ),
        drains,
        redelivery_after_lease: Percentiles::of(&redelivery),
    };
    let mut rows: Vec<(String, String)> = summary
        .drains
        .iter()
        .map(|drain| {
            (
                format!(
                    "{} consumer(s), {}",
                    drain.consumers,
                    if drain.key_ordered { "key-ordered" } else { "unordered" }
                ),
                format!(
                    "{:.0} messages/s, {:.1} MB/s (receive + ack); ack p50 {} us, p99 {} us; {} redelivered",
                    drain.messages_per_sec,
                    drain.mb_per_sec,
                    drain.ack_latency.p50_us,
                    drain.ack_latency.p99_us,
                    drain.redelivered
                ),
            )
        })
        .collect();
    rows.extend(
        summary
            .redelivery_after_lease
            .rows()
            .into_iter()
            .map(|(name, value)| (format!("redelivery after lease end, {name}"), value)),
    );
    report(&summary, rows, args.output_file.as_deref(), global)
}

/// `consumers` consumers drain `queue` of `total` messages, acking each as it comes. Returns
/// the time from the start to the last ack, the ack latencies, and the redeliveries seen.
async fn drain(
    client: &Client,
    queue: &str,
    consumers: u32,
    args: &QueueBenchArgs,
    total: u64,
) -> anyhow::Result<(Duration, Histogram<u64>, u64)> {
    let began = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(new_histogram()));
    let failures: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for _ in 0..consumers {
        let (client, queue) = (client.clone(), queue.to_owned());
        let (acked, redelivered, latencies, failures) = (
            Arc::clone(&acked),
            Arc::clone(&redelivered),
            Arc::clone(&latencies),
            Arc::clone(&failures),
        );
        let options = QueueConsumerOptions {
            max_in_flight: args.max_in_flight,
            ..QueueConsumerOptions::default()
        };
        tasks.spawn(async move {
            let mut consumer = client.queue_consumer(&queue, options).await?;
            let mut acks = JoinSet::new();
            while acked.load(Ordering::Relaxed) < total {
                let Ok(message) =
                    tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
                else {
                    continue;
                };
                let message = message?;
                if message.receipt.delivery > 1 {
                    redelivered.fetch_add(1, Ordering::Relaxed);
                }
                let (acker, acked, latencies) =
                    (consumer.acker(), Arc::clone(&acked), Arc::clone(&latencies));
                let failures = Arc::clone(&failures);
                acks.spawn(async move {
                    let sent = Instant::now();
                    match acker.ack(message.receipt).await {
                        Ok(ordo_client::SettleOutcome::Done) => {
                            record_latency(
                                &mut latencies.lock().expect("latency lock"),
                                sent.elapsed(),
                            );
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        // A retried ack whose first attempt was applied.
                        Ok(ordo_client::SettleOutcome::Unknown) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(ordo_client::SettleOutcome::NotHeld) => {
                            *failures
                                .lock()
                                .expect("failures lock")
                                .entry("not_held".to_owned())
                                .or_insert(0) += 1;
                        }
                        Err(error) => {
                            *failures
                                .lock()
                                .expect("failures lock")
                                .entry(error.kind().to_owned())
                                .or_insert(0) += 1;
                        }
                    }
                });
                while acks.try_join_next().is_some() {}
            }
            while acks.join_next().await.is_some() {}
            Ok::<_, anyhow::Error>(())
        });
    }
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .with_context(|| {
            format!(
                "the queue was not drained in time: {} of {total} acked; failed acks {:?}",
                acked.load(Ordering::Relaxed),
                failures.lock().expect("failures lock")
            )
        })?
    {
        joined.context("a consumer panicked")??;
    }
    let elapsed = began.elapsed();
    let latencies = latencies.lock().expect("latency lock").clone();
    let failures = failures.lock().expect("failures lock").clone();
    if !failures.is_empty() {
        tracing::warn!(
            ?failures,
            "acks that did not settle (their messages came again)"
        );
    }
    Ok((elapsed, latencies, redelivered.load(Ordering::Relaxed)))
}

/// Leaves `--redeliveries` messages unsettled and times how long after each lease's end it is
/// delivered again (milliseconds: lease ends are in ms).
async fn redelivery_delays(
    client: &Client,
    args: &QueueBenchArgs,
    queue: &str,
) -> anyhow::Result<Histogram<u64>> {
    let settings = QueueSettings {
        visibility_timeout_ms: u64::try_from(args.visibility.as_millis()).unwrap_or(u64::MAX),
        ..QueueSettings::default()
    };
    // A topic of its own holding only the messages to leave unsettled, so their second
    // delivery waits for nothing but the lease's end.
    let topic = format!("{queue}-topic");
    ensure_topic(client, &topic, args.partitions, 3).await?;
    super::fill(
        client,
        &topic,
        u64::from(args.redeliveries),
        args.record_size,
        None,
    )
    .await?;
    client.create_queue(queue, &topic, &settings).await?;
    let options = QueueConsumerOptions {
        max_in_flight: args.redeliveries,
        ..QueueConsumerOptions::default()
    };
    let mut first = client.queue_consumer(queue, options.clone()).await?;
    let mut leases = std::collections::HashMap::new();
    while leases.len() < args.redeliveries as usize {
        let message = tokio::time::timeout(PHASE_TIMEOUT, first.next())
            .await
            .context("no message to hold")??;
        leases.insert(
            (message.receipt.partition, message.receipt.offset),
            message.lease_until_ms,
        );
    }
    // The first consumer goes away holding its leases (a crash): its stream would otherwise
    // take the messages again itself once their leases end.
    drop(first);
    let mut second = client.queue_consumer(queue, options).await?;
    let mut delays = new_histogram();
    let mut seen = 0;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while seen < leases.len() {
        let message = tokio::time::timeout_at(deadline, second.next())
            .await
            .context("the held messages did not come again")??;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        if let Some(until) = leases.get(&(message.receipt.partition, message.receipt.offset))
            && message.receipt.delivery == 2
        {
            let late_ms = u64::try_from(now_ms - until).unwrap_or(0);
            record_latency(&mut delays, Duration::from_millis(late_ms));
            seen += 1;
        }
        // Acked in the background: the next message's time must not wait for this ack.
        let acker = second.acker();
        tokio::spawn(async move { acker.ack(message.receipt).await });
    }
    client.delete_queue(queue).await.ok();
    client.delete_topic(&topic).await.ok();
    Ok(delays)
}
