//! A queue consumer as a process of its own (`ordo-queue-consumer`), and the checks of what
//! consumers did, read from their logs.
//!
//! The consumer receives through `ordo-client`'s [`QueueConsumer`], "processes" each message
//! (a random pause within a range), then acks it, or nacks it when its value starts with
//! `poison`, or rejects it when its value starts with `reject`. Every event is a JSON line on
//! stdout stamped with the wall clock in microseconds, so the logs of several processes on one
//! machine merge in time. SIGKILL is a crash: the leases it held end by their timeout.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ordo_client::{Client, ClientOptions, QueueConsumerOptions, SettleOutcome};
use rand::Rng;
use serde::Deserialize;
use serde::Serialize;

use crate::group_member::now_us;

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Cluster endpoints.
    pub endpoints: Vec<String>,
    /// The queue.
    pub queue: String,
    /// The consumer id (also its name in the logs).
    pub consumer: String,
    /// Most messages held at once.
    pub max_in_flight: u32,
    /// Lease length asked for (zero: the queue's).
    pub visibility: Duration,
    /// Processing time of one message: uniform in `process_min..=process_max`.
    pub process_min: Duration,
    /// See `process_min`.
    pub process_max: Duration,
}

/// One line of a consumer's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ConsumerLine {
    /// A message received.
    Received {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// Consumer.
        consumer: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Delivery count.
        delivery: u32,
        /// The lease's end, ms since the Unix epoch.
        lease_until_ms: i64,
        /// The record's key.
        key: Option<String>,
        /// The record's value.
        value: String,
    },
    /// About to settle a message.
    Settling {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// `ack`, `nack` or `reject`.
        action: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Delivery count.
        delivery: u32,
    },
    /// A settle answered.
    Settled {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// `ack`, `nack` or `reject`.
        action: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Delivery count.
        delivery: u32,
        /// `done`, `not_held`, `unknown` or `error`.
        outcome: String,
    },
}

fn emit(line: &ConsumerLine) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, line)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// Runs a consumer until it is killed or fails.
pub async fn run_consumer(config: ConsumerConfig) -> Result<()> {
    let client = Client::connect_with_options(config.endpoints.clone(), ClientOptions::default())
        .await
        .context("connect")?;
    let mut consumer = client
        .queue_consumer(
            &config.queue,
            QueueConsumerOptions {
                consumer_id: config.consumer.clone(),
                max_in_flight: config.max_in_flight,
                visibility_timeout: config.visibility,
                ..QueueConsumerOptions::default()
            },
        )
        .await
        .context("open the queue consumer")?;
    // Each message is processed by a task of its own, so the consumer holds as many leases as
    // its stream lets it (max_in_flight), like a worker pool.
    loop {
        let message = consumer.next().await.context("receive")?;
        let receipt = message.receipt;
        let value = String::from_utf8_lossy(&message.record.value).into_owned();
        emit(&ConsumerLine::Received {
            t_us: now_us(),
            consumer: config.consumer.clone(),
            partition: receipt.partition,
            offset: receipt.offset,
            delivery: receipt.delivery,
            lease_until_ms: message.lease_until_ms,
            key: message
                .record
                .key
                .as_ref()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            value: value.clone(),
        })?;
        let pause = if config.process_max > config.process_min {
            rand::rng().random_range(config.process_min..=config.process_max)
        } else {
            config.process_min
        };
        let (client, queue, acker) = (client.clone(), config.queue.clone(), consumer.acker());
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let action = if value.starts_with("poison") {
                "nack"
            } else if value.starts_with("reject") {
                "reject"
            } else {
                "ack"
            };
            let _ = emit(&ConsumerLine::Settling {
                t_us: now_us(),
                action: action.to_owned(),
                partition: receipt.partition,
                offset: receipt.offset,
                delivery: receipt.delivery,
            });
            let (action, outcome) = if value.starts_with("poison") {
                let outcome = client.nack(&queue, &[receipt], Duration::ZERO).await;
                ("nack", outcome.map(|outcomes| outcomes[0]))
            } else if value.starts_with("reject") {
                let outcome = client
                    .reject(&queue, &[receipt], "rejected by the test")
                    .await;
                ("reject", outcome.map(|outcomes| outcomes[0]))
            } else {
                ("ack", acker.ack(receipt).await)
            };
            let outcome = match outcome {
                Ok(SettleOutcome::Done) => "done",
                Ok(SettleOutcome::NotHeld) => "not_held",
                Ok(SettleOutcome::Unknown) => "unknown",
                Err(error) => {
                    eprintln!("settle {receipt:?}: {error}");
                    "error"
                }
            };
            let _ = emit(&ConsumerLine::Settled {
                t_us: now_us(),
                action: action.to_owned(),
                partition: receipt.partition,
                offset: receipt.offset,
                delivery: receipt.delivery,
                outcome: outcome.to_owned(),
            });
        });
    }
}

/// Reads a consumer's log (a torn last line, from a kill, is skipped).
pub fn read_consumer_log(path: &Path) -> Result<Vec<ConsumerLine>> {
    crate::group_member::read_json_lines(path)
}

/// What happened to one message, merged from every consumer's log.
#[derive(Debug, Clone, Default)]
pub struct MessageHistory {
    /// Deliveries: `(received at µs, consumer, delivery count, lease end ms)`.
    pub received: Vec<(u64, String, u32, i64)>,
    /// Settle attempts: `(sent at µs, answered at µs, action, delivery, outcome)`; one sent and
    /// never answered (its consumer was killed) has outcome `in_doubt` and answer time
    /// `u64::MAX`.
    pub settled: Vec<(u64, u64, String, u32, String)>,
    /// The record's key.
    pub key: Option<String>,
    /// The record's value.
    pub value: String,
}

/// Merges consumer logs by message `(partition, offset)`.
pub fn merge_logs(logs: &[Vec<ConsumerLine>]) -> BTreeMap<(u32, u64), MessageHistory> {
    let mut messages: BTreeMap<(u32, u64), MessageHistory> = BTreeMap::new();
    for log in logs {
        let mut sent: BTreeMap<(u32, u64, u32), (u64, String)> = BTreeMap::new();
        for line in log {
            match line {
                ConsumerLine::Received {
                    t_us,
                    consumer,
                    partition,
                    offset,
                    delivery,
                    lease_until_ms,
                    key,
                    value,
                } => {
                    let history = messages.entry((*partition, *offset)).or_default();
                    history
                        .received
                        .push((*t_us, consumer.clone(), *delivery, *lease_until_ms));
                    history.key.clone_from(key);
                    history.value.clone_from(value);
                }
                ConsumerLine::Settling {
                    t_us,
                    action,
                    partition,
                    offset,
                    delivery,
                } => {
                    sent.insert((*partition, *offset, *delivery), (*t_us, action.clone()));
                }
                ConsumerLine::Settled {
                    t_us,
                    action,
                    partition,
                    offset,
                    delivery,
                    outcome,
                } => {
                    let at = sent
                        .remove(&(*partition, *offset, *delivery))
                        .map_or(*t_us, |(at, _)| at);
                    messages
                        .entry((*partition, *offset))
                        .or_default()
                        .settled
                        .push((at, *t_us, action.clone(), *delivery, outcome.clone()));
                }
            }
        }
        for ((partition, offset, delivery), (at, action)) in sent {
            messages
                .entry((partition, offset))
                .or_default()
                .settled
                .push((at, u64::MAX, action, delivery, "in_doubt".to_owned()));
        }
    }
    for history in messages.values_mut() {
        history.received.sort();
        history.settled.sort();
    }
    messages
}

/// The common queue checks over merged histories: no message acked (done) twice; no delivery
/// after an ack was answered done (an acked message is never delivered again); delivery counts
/// rise by one per delivery.
pub fn check_acked_at_most_once(messages: &BTreeMap<(u32, u64), MessageHistory>) -> Result<()> {
    for (id, history) in messages {
        let done: Vec<&(u64, u64, String, u32, String)> = history
            .settled
            .iter()
            .filter(|(_, _, action, _, outcome)| action == "ack" && outcome == "done")
            .collect();
        ensure!(done.len() <= 1, "message {id:?} acked twice: {history:?}");
        if let Some((_, answered, ..)) = done.first() {
            ensure!(
                history.received.iter().all(|(at, ..)| at < answered),
                "message {id:?} was delivered again after its ack was answered: {history:?}"
            );
        }
        for (index, (_, _, delivery, _)) in history.received.iter().enumerate() {
            ensure!(
                *delivery as usize > index,
                "message {id:?}: delivery counts do not rise: {history:?}"
            );
        }
    }
    Ok(())
}
