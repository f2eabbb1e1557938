//! `ordo bench group`: consumer groups.
//!
//! - Throughput: fills a topic of `--partitions` partitions with `--records` records, then for
//!   each count in `--members` a fresh group of that many members (each a `GroupConsumer` in
//!   this process, committing after every batch) reads them all. Records/s and MB/s once the
//!   group is balanced (every member owns its share) to the last record, and over the whole
//!   run from the first join.
//! - Commit latency: `--commits` sequential commits of one offset (without membership), each
//!   acked once durable on a quorum; percentiles.
//! - Rebalances, `--rebalances` times: with two members consuming, a third joins (time until
//!   every member owns its target share), then stops without leaving, as a crashed process
//!   does (time until the two others own everything again: its session timeout plus the
//!   handoff).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Args;
use ordo_client::{Client, GroupConsumerOptions, GroupEvent};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    LocalArgs, Percentiles, ensure_topic, new_histogram, progress_bar, rate, record_latency, report,
};
use crate::GlobalArgs;

/// Longest one phase (a read by a group, a rebalance) may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Arguments of `ordo bench group`.
#[derive(Debug, Clone, Args)]
pub struct GroupBenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Topic to use; created when missing. A fresh topic per run is best.
    #[arg(long, default_value = "bench-group")]
    pub topic: String,
    /// Partitions of the topic, when it is created.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
    /// Records written before the groups read them.
    #[arg(long, default_value_t = 60_000)]
    pub records: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=1024 * 1024))]
    pub record_size: u32,
    /// Group sizes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3,6")]
    pub members: Vec<u32>,
    /// Sequential commits for the commit latency.
    #[arg(long, default_value_t = 1000)]
    pub commits: u32,
    /// Joins and deaths to time.
    #[arg(long, default_value_t = 10)]
    pub rebalances: u32,
    /// Session timeout of the members of the rebalance phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub session_timeout: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
}

/// One group size's throughput.
#[derive(Debug, Serialize)]
struct Throughput {
    members: u32,
    /// From the moment the group was balanced.
    records_per_sec: f64,
    mb_per_sec: f64,
    /// From the first join, rebalancing included.
    records_per_sec_whole: f64,
    /// Records read before the group was balanced.
    read_before_balanced: u64,
}

/// The JSON line.
#[derive(Debug, Serialize)]
struct GroupSummary {
    shape: String,
    throughput: Vec<Throughput>,
    commit_latency: Percentiles,
    join_rebalance_ms: Vec<u64>,
    death_rebalance_ms: Vec<u64>,
}

/// Runs the benchmark against `endpoints`.
pub async fn run(
    args: &GroupBenchArgs,
    endpoints: Vec<String>,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    ensure!(args.records > 0, "--records must be at least 1");
    let client = crate::client_for(endpoints, global.timeout).await?;
    ensure_topic(&client, &args.topic, args.partitions, 3).await?;
    let run_id = super::seed_or_clock(None);
    let progress = progress_bar(Duration::from_secs(1));
    progress.set_message(format!("filling {} records", args.records));
    super::fill(&client, &args.topic, args.records, args.record_size, None).await?;
    let total = end_sum(&client, &args.topic).await?;

    let mut throughput = Vec::new();
    for &members in &args.members {
        ensure!(members > 0, "--members: a group needs at least 1 member");
        progress.set_message(format!("{members} members reading {total} records"));
        let group = format!("bench-{run_id}-{members}");
        let began = Instant::now();
        let (balanced, read_before) =
            read_all(&client, &args.topic, &group, members, total).await?;
        let elapsed = began.elapsed();
        let window = elapsed.saturating_sub(balanced);
        let after = total - read_before;
        throughput.push(Throughput {
            members,
            records_per_sec: rate(after, window),
            mb_per_sec: rate(after * u64::from(args.record_size), window) / 1e6,
            records_per_sec_whole: rate(total, elapsed),
            read_before_balanced: read_before,
        });
    }

    progress.set_message(format!("{} commits", args.commits));
    let mut commits = new_histogram();
    let group = format!("bench-{run_id}-commits");
    for offset in 1..=u64::from(args.commits) {
        let offsets = [((args.topic.clone(), 0), offset)].into_iter().collect();
        let began = Instant::now();
        client
            .commit_offsets(&group, "", 0, &offsets)
            .await
            .context("commit")?;
        record_latency(&mut commits, began.elapsed());
    }

    progress.set_message(format!("{} joins and deaths", args.rebalances));
    let (joins, deaths) = rebalances(&client, args, &format!("bench-{run_id}-rebalance")).await?;
    progress.finish_and_clear();

    let summary = GroupSummary {
        shape: format!(
            "{} partitions, {} B records, session {:?} for rebalances",
            args.partitions, args.record_size, args.session_timeout
        ),
        throughput,
        commit_latency: Percentiles::of(&commits),
        join_rebalance_ms: joins,
        death_rebalance_ms: deaths,
    };
    let mut rows: Vec<(String, String)> = summary
        .throughput
        .iter()
        .map(|row| {
            (
                format!("{} member(s)", row.members),
                format!(
                    "{:.0} records/s, {:.1} MB/s once balanced ({} read before); {:.0} records/s over the whole run",
                    row.records_per_sec,
                    row.mb_per_sec,
                    row.read_before_balanced,
                    row.records_per_sec_whole
                ),
            )
        })
        .collect();
    rows.extend(
        summary
            .commit_latency
            .rows()
            .into_iter()
            .map(|(name, value)| (format!("commit {name}"), value)),
    );
    let spread = |times: &[u64]| {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        match (sorted.get(sorted.len() / 2), sorted.last()) {
            (Some(p50), Some(max)) => format!("p50 {p50} ms, max {max} ms"),
            _ => "-".to_owned(),
        }
    };
    rows.push((
        "rebalance after a join".to_owned(),
        spread(&summary.join_rebalance_ms),
    ));
    rows.push((
        "rebalance after a death".to_owned(),
        spread(&summary.death_rebalance_ms),
    ));
    report(&summary, rows, args.output_file.as_deref(), global)
}

/// Records in the topic now (the sum of its partitions' ends).
async fn end_sum(client: &Client, topic: &str) -> anyhow::Result<u64> {
    let description = client.describe_topic(topic).await?;
    Ok(description
        .partitions
        .iter()
        .map(|partition| partition.high_watermark)
        .sum())
}

/// Members of `group` read until `total` records were delivered among them. Returns when the
/// group was balanced (since the start) and how many records were read by then.
async fn read_all(
    client: &Client,
    topic: &str,
    group: &str,
    members: u32,
    total: u64,
) -> anyhow::Result<(Duration, u64)> {
    let began = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..members {
        let (client, delivered) = (client.clone(), Arc::clone(&delivered));
        let options = GroupConsumerOptions::new(group, [topic]);
        tasks.spawn(async move {
            let mut consumer = client.group_consumer(options).await?;
            while delivered.load(Ordering::Relaxed) < total {
                let event = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
                if let Ok(Ok(GroupEvent::Records { records, .. })) = event {
                    delivered.fetch_add(records.len() as u64, Ordering::Relaxed);
                    consumer.commit().await?;
                } else if let Ok(Err(error)) = event {
                    return Err(anyhow::Error::new(error));
                }
            }
            consumer.close().await?;
            Ok::<_, anyhow::Error>(())
        });
    }
    wait_balanced(client, group, members as usize).await?;
    let balanced = (began.elapsed(), delivered.load(Ordering::Relaxed));
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .context("a group did not read everything in time")?
    {
        joined.context("a member panicked")??;
    }
    Ok(balanced)
}

/// Times joins and deaths of a third member next to two.
async fn rebalances(
    client: &Client,
    args: &GroupBenchArgs,
    group: &str,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut steady = JoinSet::new();
    let member = |stop: Arc<AtomicBool>| {
        let client = client.clone();
        let mut options = GroupConsumerOptions::new(group, [args.topic.clone()]);
        options.session_timeout = args.session_timeout;
        async move {
            let mut consumer = client.group_consumer(options).await?;
            while !stop.load(Ordering::Relaxed) {
                let event = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
                if let Ok(Ok(GroupEvent::Records { .. })) = event {
                    consumer.commit().await?;
                }
            }
            Ok::<_, anyhow::Error>(consumer)
        }
    };
    for _ in 0..2 {
        steady.spawn(member(Arc::clone(&stop)));
    }
    wait_balanced(client, group, 2).await?;
    let (mut joins, mut deaths) = (Vec::new(), Vec::new());
    for _ in 0..args.rebalances {
        let stop_third = Arc::new(AtomicBool::new(false));
        let began = Instant::now();
        let third = tokio::spawn(member(Arc::clone(&stop_third)));
        wait_balanced(client, group, 3).await?;
        joins.push(millis(began.elapsed()));
        stop_third.store(true, Ordering::Relaxed);
        let consumer = third.await.context("the third member panicked")??;
        let began = Instant::now();
        consumer.forget();
        wait_balanced(client, group, 2).await?;
        deaths.push(millis(began.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = steady.join_next().await {
        joined.context("a member panicked")??.close().await?;
    }
    Ok((joins, deaths))
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// Waits until the group has `members` members, each owning its whole target share.
async fn wait_balanced(client: &Client, group: &str, members: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        if let Ok(description) = client.describe_group(group).await
            && description.members.len() == members
            && description
                .members
                .iter()
                .all(|member| !member.target.is_empty() && member.owned == member.target)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "group {group} did not balance over {members} members within {PHASE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
