//! `ordo queue ...`: create, list, describe and delete queues.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use clap::Subcommand;
use ordo_client::QueueSettings;

use crate::GlobalArgs;
use crate::output::{self, OutputFormat};

/// Queue commands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a queue over a topic: each record goes to one consumer, acked one by one.
    Create(CreateArgs),
    /// List every queue.
    List,
    /// Show a queue's state per partition: floor, available, in flight, delayed, counters.
    Describe {
        /// Queue name.
        queue: String,
    },
    /// Delete a queue and its state (not its topic or dead-letter topic).
    Delete {
        /// Queue name.
        queue: String,
    },
}

/// Arguments of `ordo queue create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Queue name.
    pub queue: String,
    /// The topic it reads.
    #[arg(long)]
    pub topic: String,
    /// Lease length of a receive that asks for none (e.g. 30s; default: the server's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub visibility_timeout: Option<Duration>,
    /// Deliveries before a message goes to the dead-letter topic (default: the server's).
    #[arg(long)]
    pub max_deliveries: Option<u32>,
    /// One message per key at a time, each key's in offset order.
    #[arg(long)]
    pub key_ordered: bool,
    /// Deliver each record no earlier than its timestamp plus this (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Most messages leased at once per partition (default: the server's bound).
    #[arg(long)]
    pub in_flight_max: Option<u32>,
    /// The dead-letter topic (must exist; default: `<queue>-dlq`, created when missing).
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
}

fn millis(duration: Option<Duration>) -> u64 {
    duration.map_or(0, |duration| {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Runs a queue command.
pub async fn run(command: QueueCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    match command {
        QueueCommand::Create(args) => {
            let settings = QueueSettings {
                visibility_timeout_ms: millis(args.visibility_timeout),
                max_deliveries: args.max_deliveries.unwrap_or(0),
                key_ordered: args.key_ordered,
                delay_ms: millis(args.delay),
                in_flight_max: args.in_flight_max.unwrap_or(0),
                dead_letter_topic: args.dead_letter_topic.unwrap_or_default(),
            };
            let queue = client
                .create_queue(&args.queue, &args.topic, &settings)
                .await
                .with_context(|| format!("cannot create queue {}", args.queue))?;
            match global.output {
                OutputFormat::Json => output::print_json(&queue),
                OutputFormat::Table => output::print_line(&format!(
                    "created queue {} over {} ({} partitions); dead letters go to {}",
                    queue.name, queue.topic, queue.partitions, queue.settings.dead_letter_topic
                )),
            }
        }
        QueueCommand::List => {
            let queues = client.list_queues().await.context("cannot list queues")?;
            match global.output {
                OutputFormat::Json => output::print_json(&queues),
                OutputFormat::Table => {
                    let mut table = output::table([
                        "queue",
                        "topic",
                        "partitions",
                        "visibility",
                        "max deliveries",
                        "key ordered",
                        "dead letters to",
                    ]);
                    for queue in &queues {
                        table.add_row(vec![
                            queue.name.clone(),
                            queue.topic.clone(),
                            queue.partitions.to_string(),
                            format!("{} ms", queue.settings.visibility_timeout_ms),
                            queue.settings.max_deliveries.to_string(),
                            queue.settings.key_ordered.to_string(),
                            queue.settings.dead_letter_topic.clone(),
                        ]);
                    }
                    output::print_line(&table.to_string())
                }
            }
        }
        QueueCommand::Describe { queue } => {
            let description = client
                .describe_queue(&queue)
                .await
                .with_context(|| format!("cannot describe queue {queue}"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&description),
                OutputFormat::Table => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |elapsed| elapsed.as_millis() as i64);
                    let mut table = output::table([
                        "partition",
                        "leader",
                        "floor",
                        "log end",
                        "available",
                        "in flight",
                        "delayed",
                        "oldest age",
                        "acked",
                        "redeliveries",
                        "expired leases",
                        "dead letters",
                    ]);
                    for partition in &description.partitions {
                        table.add_row(vec![
                            partition.partition.to_string(),
                            partition.leader.to_string(),
                            partition.floor.to_string(),
                            partition.log_end.to_string(),
                            partition.available.to_string(),
                            partition.in_flight.to_string(),
                            partition.delayed.to_string(),
                            partition.oldest_timestamp_ms.map_or_else(
                                || "-".to_owned(),
                                |oldest| format!("{:.1}s", (now - oldest).max(0) as f64 / 1000.0),
                            ),
                            partition.acked.to_string(),
                            partition.redeliveries.to_string(),
                            partition.lease_expiries.to_string(),
                            partition.dead_lettered.to_string(),
                        ]);
                    }
                    output::print_line(&format!(
                        "queue {} over {}: visibility {} ms, max deliveries {}, key ordered {}, dead letters to {}",
                        description.queue.name,
                        description.queue.topic,
                        description.queue.settings.visibility_timeout_ms,
                        description.queue.settings.max_deliveries,
                        description.queue.settings.key_ordered,
                        description.queue.settings.dead_letter_topic
                    ))?;
                    output::print_line(&table.to_string())
                }
            }
        }
        QueueCommand::Delete { queue } => {
            client
                .delete_queue(&queue)
                .await
                .with_context(|| format!("cannot delete queue {queue}"))?;
            output::print_line(&format!("deleted queue {queue}"))
        }
    }
}
