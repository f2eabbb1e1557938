//! `ordo bench consume`: how fast a consumer reads.
//!
//! - `--mode catch-up`: fills one partition with `--records` records (batched produce calls),
//!   then subscribes from offset 0 and reads until it has them all. Reports records/s and MB/s
//!   of the read; the latency fields are those of the messages of the stream (time between two
//!   consecutive messages), which shows stalls.
//! - `--mode latency`: a subscriber follows the tail of partition 0 while a producer sends one
//!   record per call at `--rate` records/s (open loop: a slow call does not delay the next). Each
//!   record carries its send time; the latency is from the start of its produce call to its
//!   arrival at the subscriber.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ordo_client::{Client, Record, StartAt};
use tokio::time::{Instant, MissedTickBehavior};

use super::{
    LocalArgs, Percentiles, Summary, ensure_topic, new_histogram, progress_bar, rate,
    record_latency, report,
};
use crate::GlobalArgs;

/// Longest the catch-up read or the latency run's drain may take beyond the expected end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Most produce calls the latency run keeps outstanding; at the bound a tick is skipped and
/// counted as an error rather than queued without limit.
const LATENCY_IN_FLIGHT_MAX: usize = 4096;
/// Produce calls kept outstanding while filling the partition.
const FILL_IN_FLIGHT: usize = 8;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Read a full partition from offset 0.
    CatchUp,
    /// Produce-to-subscriber latency at a fixed rate.
    Latency,
}

/// Arguments of `ordo bench consume`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeBenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::CatchUp)]
    pub mode: Mode,
    /// Topic to use; created with one partition when missing. A fresh topic per run is best.
    #[arg(long, default_value = "bench-consume")]
    pub topic: String,
    /// Replication factor of the topic, when it is created.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// Bytes of each record's value (at least 16 in latency mode: it carries the send time).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=1024 * 1024))]
    pub record_size: u32,
    /// Catch-up: records written before reading.
    #[arg(long, default_value_t = 200_000)]
    pub records: u64,
    /// Catch-up: records per produce call while filling.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub fill_batch: u32,
    /// Bytes the consumer asks for per message of the stream.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_bytes: u32,
    /// Latency: records per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Latency: measured time, after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Latency: unmeasured time before the measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
}

/// Runs the benchmark against `endpoints`.
pub async fn run(
    args: &ConsumeBenchArgs,
    endpoints: Vec<String>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let client = crate::client_for(endpoints, global.timeout).await?;
    ensure_topic(&client, &args.topic, 1, args.replication_factor).await?;
    match args.mode {
        Mode::CatchUp => catch_up(args, &client, global).await,
        Mode::Latency => latency(args, &client, global).await,
    }
}

async fn catch_up(
    args: &ConsumeBenchArgs,
    client: &Client,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    ensure!(args.records > 0, "--records must be at least 1");
    let start = client
        .fetch(&args.topic, 0, 0, 1, Duration::ZERO)
        .await
        .context("cannot read the partition's end")?
        .high_watermark;
    let value = Bytes::from(vec![b'c'; args.record_size as usize]);
    let progress = progress_bar(Duration::from_secs(1));
    progress.set_message(format!("filling {} records", args.records));
    let mut written = 0u64;
    let mut calls = FuturesUnordered::new();
    while written < args.records || !calls.is_empty() {
        while written < args.records && calls.len() < FILL_IN_FLIGHT {
            let count = u64::from(args.fill_batch).min(args.records - written);
            written += count;
            let records: Vec<Record> = (0..count).map(|_| Record::new(value.clone())).collect();
            calls.push(client.produce(&args.topic, Some(0), records));
        }
        if let Some(result) = calls.next().await {
            result.context("filling the partition failed")?;
        }
    }
    let end = start + args.records;
    progress.set_message(format!("reading {} records", args.records));

    let began = Instant::now();
    let deadline = began + DRAIN_TIMEOUT.max(Duration::from_secs(args.records / 10_000));
    let mut subscription = client
        .subscribe(&args.topic, 0, StartAt::Offset(start), args.max_bytes)
        .await
        .context("cannot subscribe")?;
    let mut gaps = new_histogram();
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut previous = began;
    let mut next = start;
    while next < end {
        let message = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .with_context(|| format!("the read did not reach offset {end} in time (at {next})"))?
            .context("the subscription ended")?
            .context("the subscription failed")?;
        for record in &message.records {
            ensure!(
                record.offset == next,
                "expected offset {next}, read {}",
                record.offset
            );
            next += 1;
            if record.offset < end {
                records += 1;
                bytes += record.value.len() as u64;
            }
        }
        let now = Instant::now();
        record_latency(&mut gaps, now - previous);
        previous = now;
    }
    let elapsed = previous - began;
    progress.finish_and_clear();
    let records_per_sec = rate(records, elapsed);
    let summary = Summary {
        shape: format!(
            "consume-catch-up record_size={} records={} replication_factor={} max_bytes={}",
            args.record_size, args.records, args.replication_factor, args.max_bytes
        ),
        records_per_sec,
        mb_per_sec: rate(bytes, elapsed) / 1e6,
        latency: Percentiles::of(&gaps),
        errors: 0,
        records,
    };
    let mut rows = summary.rows(elapsed);
    rows.push(("stream messages".into(), gaps.len().to_string()));
    report(&summary, rows, args.output_file.as_deref(), global)
}

async fn latency(
    args: &ConsumeBenchArgs,
    client: &Client,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    ensure!(
        args.record_size >= 16,
        "--record-size must be at least 16 in latency mode: each value carries a sequence number and its send time"
    );
    let origin = Instant::now();
    let mut subscription = client
        .subscribe(&args.topic, 0, StartAt::End, args.max_bytes)
        .await
        .context("cannot subscribe")?;
    let warm_end = origin + args.warmup;
    let end = warm_end + args.duration;

    // Consumer: notes when each record arrived, relative to its send time. The map holds one
    // entry per record of the run (rate x duration), which bounds it.
    let arrivals: Arc<std::sync::Mutex<HashMap<u64, Duration>>> = Arc::default();
    let consumer = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Some(Ok(message)) = subscription.next().await {
                let now = origin.elapsed();
                let mut arrivals = arrivals.lock().expect("arrival map lock is never poisoned");
                for record in message.records {
                    if let Some((sequence, sent)) = decode_stamp(&record.value) {
                        arrivals.insert(sequence, now.saturating_sub(sent));
                    }
                }
            }
        })
    };

    // Producer: one call per tick, open loop, bounded in flight.
    let padding = args.record_size as usize - 16;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rate);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let mut calls = FuturesUnordered::new();
    let mut sequence = 0u64;
    let mut measured: Vec<u64> = Vec::new();
    let mut errors = 0u64;
    let progress = progress_bar(args.warmup + args.duration);
    while Instant::now() < end {
        tokio::select! {
            _ = ticker.tick() => {
                if calls.len() >= LATENCY_IN_FLIGHT_MAX {
                    errors += 1;
                    continue;
                }
                let sent = origin.elapsed();
                let value = encode_stamp(sequence, sent, padding);
                let client = client.clone();
                let topic = Arc::clone(&topic);
                let this = sequence;
                sequence += 1;
                calls.push(async move {
                    (this, sent, client.produce(&topic, Some(0), vec![Record::new(value)]).await)
                });
            }
            Some((this, sent, result)) = calls.next(), if !calls.is_empty() => {
                match result {
                    Ok(_) if origin + sent >= warm_end => measured.push(this),
                    Ok(_) => {}
                    Err(_) => errors += 1,
                }
            }
        }
        progress.set_position(super::millis(origin.elapsed()));
    }
    while let Some((this, sent, result)) = calls.next().await {
        match result {
            Ok(_) if origin + sent >= warm_end => measured.push(this),
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    progress.finish_and_clear();

    // Wait (bounded) until the subscriber has every acked record, then stop it.
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    let missing = loop {
        let missing = {
            let arrivals = arrivals.lock().expect("arrival map lock is never poisoned");
            measured
                .iter()
                .filter(|sequence| !arrivals.contains_key(sequence))
                .count() as u64
        };
        if missing == 0 || Instant::now() >= drain_deadline || consumer.is_finished() {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    consumer.abort();
    let mut latencies = new_histogram();
    {
        let arrivals = arrivals.lock().expect("arrival map lock is never poisoned");
        for sequence in &measured {
            if let Some(latency) = arrivals.get(sequence) {
                record_latency(&mut latencies, *latency);
            }
        }
    }
    let delivered = latencies.len();
    let records_per_sec = rate(delivered, args.duration);
    let summary = Summary {
        shape: format!(
            "consume-latency record_size={} rate={} replication_factor={}",
            args.record_size, args.rate, args.replication_factor
        ),
        records_per_sec,
        mb_per_sec: records_per_sec * f64::from(args.record_size) / 1e6,
        latency: Percentiles::of(&latencies),
        errors: errors + missing,
        records: delivered,
    };
    let mut rows = summary.rows(args.duration);
    rows.push(("failed produce calls".into(), errors.to_string()));
    rows.push(("acked but not delivered".into(), missing.to_string()));
    report(&summary, rows, args.output_file.as_deref(), global)?;
    ensure!(
        missing == 0,
        "{missing} acked records did not reach the subscriber within {DRAIN_TIMEOUT:?}"
    );
    Ok(())
}

/// The first 16 bytes of a latency record: its sequence number and its send time in
/// nanoseconds since the run's origin, then `padding` bytes.
fn encode_stamp(sequence: u64, sent: Duration, padding: usize) -> Bytes {
    let mut value = BytesMut::with_capacity(16 + padding);
    value.put_u64(sequence);
    value.put_u64(u64::try_from(sent.as_nanos()).unwrap_or(u64::MAX));
    value.put_bytes(b'l', padding);
    value.freeze()
}

fn decode_stamp(value: &[u8]) -> Option<(u64, Duration)> {
    let sequence = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let sent = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((sequence, Duration::from_nanos(sent)))
}
