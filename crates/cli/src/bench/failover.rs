//! `ordo bench failover`: what a producer sees when a partition leader dies.
//!
//! Produces one record per call at a steady `--rate` (open loop, partitions in turn, each record
//! a unique sequence number) to a local cluster, SIGKILLs the leader of partition 0 after
//! `--kill-after` (then again every `--kill-every`, `--kills` times in all), restarts each killed
//! node `--restart-after` later, and at the end reads every partition back. Reports the longest
//! gap between two acks of the same partition, the failed calls by kind, and how many acked
//! records are missing at their acked offsets (must be 0).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ordo_client::{Client, Record};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};

use super::{LocalArgs, ensure_topic, new_histogram, progress_bar, record_latency, report};
use crate::GlobalArgs;
use crate::dev::{DevCluster, READY_TIMEOUT};

/// Most produce calls kept outstanding; at the bound a tick is skipped and counted.
const IN_FLIGHT_MAX: usize = 4096;
/// Bytes asked for per fetch when reading the partitions back.
const READ_BYTES: u32 = 4 * 1024 * 1024;
/// Longest reading everything back may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Arguments of `ordo bench failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverBenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Topic to produce to; created when missing.
    #[arg(long, default_value = "bench-failover")]
    pub topic: String,
    /// Partitions of the topic, when it is created.
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// Bytes of each record's value (at least 8: it carries a sequence number).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..=1024 * 1024))]
    pub record_size: u32,
    /// Produce calls (of one record) per second.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Length of the run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// When the first leader is killed, from the start of the run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub kill_after: Duration,
    /// Time between kills.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub kill_every: Duration,
    /// Leaders to kill in all.
    #[arg(long, default_value_t = 1)]
    pub kills: u32,
    /// How long a killed node stays down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub restart_after: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
}

/// The JSON line of `ordo bench failover`.
#[derive(Debug, Serialize)]
struct FailoverSummary {
    shape: String,
    kills: u32,
    acked: u64,
    failed_calls: u64,
    /// Failed calls whose records may or may not have been written.
    outcome_unknown: u64,
    lost: u64,
    /// Records (by sequence number) found at more than one offset.
    duplicates: u64,
    longest_gap_ms: u64,
    p99_us: u64,
    max_us: u64,
}

/// An acked record: where the cluster said it is.
struct Ack {
    partition: u32,
    offset: u64,
    sequence: u64,
}

/// Runs the benchmark against the local cluster.
pub async fn run(
    args: &FailoverBenchArgs,
    endpoints: Vec<String>,
    cluster: &mut DevCluster,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let client = crate::client_for(endpoints, global.timeout).await?;
    ensure_topic(&client, &args.topic, args.partitions, 3).await?;
    wait_for_leaders(&client, &args.topic).await?;

    let origin = Instant::now();
    let end = origin + args.duration;
    let padding = args.record_size as usize - 8;
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rate);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut calls = FuturesUnordered::new();
    let mut sequence = 0u64;
    let mut acks: Vec<Ack> = Vec::new();
    let mut last_ack: HashMap<u32, Instant> = HashMap::new();
    let mut longest_gap = Duration::ZERO;
    let mut latencies = new_histogram();
    let mut failures: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut outcome_unknown = 0u64;
    // Kill schedule: (when, node to restart or None to kill a leader).
    let mut kills_done = 0u32;
    let mut next_kill = origin + args.kill_after;
    let mut down: Vec<(Instant, u64)> = Vec::new();
    let progress = progress_bar(args.duration);

    while Instant::now() < end || !calls.is_empty() {
        let now = Instant::now();
        if kills_done < args.kills && now >= next_kill {
            let leader = client
                .describe_topic(&args.topic)
                .await
                .ok()
                .and_then(|topic| topic.partitions.first().and_then(|p| p.leader));
            match leader {
                Some(leader) => {
                    cluster.kill(leader).await?;
                    eprintln!(
                        "{:>6.1} s: killed node {leader} (leader of partition 0)",
                        origin.elapsed().as_secs_f64()
                    );
                    down.push((now + args.restart_after, leader));
                    kills_done += 1;
                    next_kill = now + args.kill_every;
                }
                None => next_kill = now + Duration::from_millis(100),
            }
        }
        if let Some(position) = down.iter().position(|(when, _)| now >= *when) {
            let (_, node) = down.remove(position);
            cluster.restart(node)?;
            eprintln!(
                "{:>6.1} s: restarted node {node}",
                origin.elapsed().as_secs_f64()
            );
        }
        tokio::select! {
            _ = ticker.tick(), if now < end => {
                if calls.len() >= IN_FLIGHT_MAX {
                    *failures.entry("not_sent_in_flight_bound").or_default() += 1;
                    continue;
                }
                let this = sequence;
                sequence += 1;
                let partition = u32::try_from(this % u64::from(args.partitions)).unwrap_or(0);
                let client = client.clone();
                let topic = Arc::clone(&topic);
                let value = stamp(this, padding);
                calls.push(async move {
                    let sent = Instant::now();
                    let result = client
                        .produce(&topic, Some(partition), vec![Record::new(value)])
                        .await;
                    (this, partition, sent, Instant::now(), result)
                });
            }
            Some((this, partition, sent, acked, result)) = calls.next(), if !calls.is_empty() => {
                match result {
                    Ok(record_acks) => {
                        record_latency(&mut latencies, acked - sent);
                        let previous = last_ack.insert(partition, acked).unwrap_or(origin);
                        longest_gap = longest_gap.max(acked.saturating_duration_since(previous));
                        for ack in record_acks {
                            acks.push(Ack { partition: ack.partition, offset: ack.offset, sequence: this });
                        }
                    }
                    Err(error) => {
                        if matches!(error, ordo_client::ClientError::OutcomeUnknown { .. }) {
                            outcome_unknown += 1;
                        }
                        *failures.entry(error.kind()).or_default() += 1;
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        progress.set_position(super::millis(origin.elapsed()));
    }
    progress.finish_and_clear();
    for (_, node) in down.drain(..) {
        cluster.restart(node)?;
    }
    cluster.wait_ready(READY_TIMEOUT).await?;

    let (lost, duplicates) = verify(&client, &args.topic, args.partitions, &acks).await?;
    let failed_calls: u64 = failures.values().sum();
    let summary = FailoverSummary {
        shape: format!(
            "failover record_size={} rate={} partitions={} kills={} restart_after={:?}",
            args.record_size, args.rate, args.partitions, args.kills, args.restart_after
        ),
        kills: kills_done,
        acked: acks.len() as u64,
        failed_calls,
        outcome_unknown,
        lost,
        duplicates,
        longest_gap_ms: super::millis(longest_gap),
        p99_us: latencies.value_at_quantile(0.99),
        max_us: latencies.max(),
    };
    let failures_by_kind = super::by_kind(&failures);
    let rows = vec![
        ("shape".to_owned(), summary.shape.clone()),
        ("leaders killed".to_owned(), kills_done.to_string()),
        ("records acked".to_owned(), summary.acked.to_string()),
        ("failed calls".to_owned(), failures_by_kind),
        (
            "longest gap between acks of a partition".to_owned(),
            format!("{} ms", summary.longest_gap_ms),
        ),
        (
            "call latency p99".to_owned(),
            format!("{} µs", summary.p99_us),
        ),
        (
            "call latency max".to_owned(),
            format!("{} µs", summary.max_us),
        ),
        ("acked records lost".to_owned(), lost.to_string()),
        ("records at two offsets".to_owned(), duplicates.to_string()),
    ];
    report(&summary, rows, args.output_file.as_deref(), global)?;
    ensure!(
        lost == 0,
        "{lost} acked records are not at their acked offsets"
    );
    Ok(())
}

/// Waits until every partition of `topic` has a leader.
async fn wait_for_leaders(client: &Client, topic: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(description) = client.describe_topic(topic).await
            && description.partitions.iter().all(|p| p.leader.is_some())
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "partitions of {topic} have no leader after {READY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every partition from offset 0 to its end; returns (acked records not found at their
/// offset, sequence numbers found at more than one offset).
async fn verify(
    client: &Client,
    topic: &str,
    partitions: u32,
    acks: &[Ack],
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    let mut logs: HashMap<u32, Vec<Option<u64>>> = HashMap::new();
    let mut copies: HashMap<u64, u32> = HashMap::new();
    for partition in 0..partitions {
        let mut log = Vec::new();
        let mut offset = 0u64;
        loop {
            ensure!(
                Instant::now() < deadline,
                "reading the partitions back took longer than {VERIFY_TIMEOUT:?}"
            );
            let result = client
                .fetch(topic, partition, offset, READ_BYTES, Duration::ZERO)
                .await
                .with_context(|| format!("reading partition {partition} at {offset}"))?;
            for record in &result.records {
                let sequence = record
                    .value
                    .get(..8)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u64::from_be_bytes);
                if let Some(sequence) = sequence {
                    *copies.entry(sequence).or_default() += 1;
                }
                log.push(sequence);
            }
            offset = result.next_offset().unwrap_or(offset);
            if offset >= result.high_watermark {
                break;
            }
        }
        logs.insert(partition, log);
    }
    let lost = acks
        .iter()
        .filter(|ack| {
            let stored = logs
                .get(&ack.partition)
                .and_then(|log| log.get(usize::try_from(ack.offset).ok()?).copied())
                .flatten();
            stored != Some(ack.sequence)
        })
        .count() as u64;
    let duplicates = copies.values().filter(|count| **count > 1).count() as u64;
    Ok((lost, duplicates))
}

/// A value: the sequence number, then `padding` bytes.
fn stamp(sequence: u64, padding: usize) -> Bytes {
    let mut value = BytesMut::with_capacity(8 + padding);
    value.put_u64(sequence);
    value.put_bytes(b'f', padding);
    value.freeze()
}
