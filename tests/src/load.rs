//! A produce load for tests that change the cluster under it (rolling restarts, joins, moves,
//! drains): one-record calls, a few in flight, until told to stop (bounded), then a check that
//! every acked record is stored where it was acked and none twice; and the wait for the
//! cluster's status to reach a state.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use anyhow::Result;
use anyhow::ensure;
use tokio::time::Instant;

use crate::NodeId;
use crate::TestCluster;

/// Most produce calls one load sends (a bound; tests stop it sooner).
pub const CALLS_MAX: usize = 200_000;
/// Calls in flight.
pub const IN_FLIGHT: usize = 8;

/// What the load saw.
#[derive(Debug, Default)]
pub struct Load {
    /// Acked records: (partition, offset) -> value.
    pub acked: BTreeMap<(u32, u64), String>,
    /// Calls that failed, with why.
    pub failed: Vec<String>,
    /// The longest time without an ack.
    pub longest_gap: Duration,
}

/// Produces one-record calls to `topic`, [`IN_FLIGHT`] at a time, until `stop` (or
/// [`CALLS_MAX`]).
pub async fn produce_until(
    client: ordo_client::Client,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<Load> {
    let mut load = Load::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_ack = Instant::now();
    let mut call = 0usize;
    loop {
        while tasks.len() < IN_FLIGHT && call < CALLS_MAX && !stop.load(Ordering::Relaxed) {
            let client = client.clone();
            let value = format!("r-{call}");
            call += 1;
            tasks.spawn(async move {
                let outcome = client
                    .produce(topic, None, vec![ordo_client::Record::new(value.clone())])
                    .await;
                (value, outcome)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            return Ok(load);
        };
        let (value, outcome) = joined.context("a produce task")?;
        match outcome {
            Ok(acks) => {
                let now = Instant::now();
                load.longest_gap = load.longest_gap.max(now - last_ack);
                last_ack = now;
                for ack in acks {
                    ensure!(
                        load.acked
                            .insert((ack.partition, ack.offset), value.clone())
                            .is_none(),
                        "partition {} offset {} acked twice",
                        ack.partition,
                        ack.offset
                    );
                }
            }
            Err(error) => load.failed.push(format!("{value}: {error}")),
        }
    }
}

/// Stops the load, waits for it, prints what it saw, and requires that it ran and that no
/// produce call failed.
pub async fn finish(
    stop: &AtomicBool,
    task: tokio::task::JoinHandle<Result<Load>>,
) -> Result<Load> {
    stop.store(true, Ordering::Relaxed);
    let load = task.await.context("the load task")??;
    eprintln!(
        "acked {} calls, failed {}, longest time without an ack {:?}",
        load.acked.len(),
        load.failed.len(),
        load.longest_gap
    );
    ensure!(
        load.failed.is_empty(),
        "{} produce calls failed, first: {}",
        load.failed.len(),
        load.failed[0]
    );
    ensure!(
        load.acked.len() > 100,
        "the load ran: {} acked",
        load.acked.len()
    );
    Ok(load)
}

/// Polls ClusterStatus through `client` until `done` holds for it, at most `within`; `what` names
/// the wait in the error, with the last status.
pub async fn wait_status(
    client: &ordo_client::Client,
    what: &str,
    within: Duration,
    done: impl Fn(&ordo_client::ClusterStatus) -> bool,
) -> Result<ordo_client::ClusterStatus> {
    let deadline = Instant::now() + within;
    loop {
        let last = client.cluster_status().await;
        if let Ok(status) = &last {
            if done(status) {
                return Ok(status.clone());
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {within:?}; last status {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Load {
    /// Checks through `reader` that every acked record of `topic`'s `partitions` is stored
    /// where it was acked, and that no record is stored twice.
    pub async fn check(
        &self,
        cluster: &TestCluster,
        reader: NodeId,
        topic: &str,
        partitions: u32,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        for partition in 0..partitions {
            let end = self
                .acked
                .range((partition, 0)..(partition + 1, 0))
                .next_back()
                .map_or(0, |((_, offset), _)| offset + 1);
            let stored = cluster
                .read_partition(reader, topic, partition, end)
                .await?;
            for record in &stored {
                let value = String::from_utf8_lossy(&record.value).into_owned();
                ensure!(seen.insert(value.clone()), "{value} is stored twice");
                if let Some(acked) = self.acked.get(&(partition, record.offset)) {
                    ensure!(
                        *acked == value,
                        "partition {partition} offset {}: {value}, acked {acked}",
                        record.offset
                    );
                }
            }
            let held: HashSet<u64> = stored.iter().map(|record| record.offset).collect();
            for ((_, offset), value) in self.acked.range((partition, 0)..(partition + 1, 0)) {
                ensure!(
                    held.contains(offset),
                    "acked {value} at partition {partition} offset {offset} is lost"
                );
            }
        }
        Ok(())
    }
}
