//! `ordo topic ...`: create, list, describe and delete topics.

use anyhow::Context;
use clap::Subcommand;
use ordo_client::TopicDescription;

use crate::GlobalArgs;
use crate::output::{self, OutputFormat, or_dash};

/// Topic commands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 3)]
        partitions: u32,
        /// Replicas per partition (at most the number of nodes).
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
        /// A config entry KEY=VALUE (repeatable): retention.ms, retention.bytes,
        /// cleanup.policy, timestamp.type.
        #[arg(long = "config", value_parser = parse_entry)]
        config: Vec<(String, String)>,
    },
    /// Change a topic's config, e.g. `ordo topic alter orders --config retention.ms=3600000`,
    /// or raise its partition count (`--partitions 12`; keys move to other partitions).
    Alter {
        /// Topic name.
        name: String,
        /// The new partition count: at least the current one (a count never goes down). A
        /// key's partition is its hash modulo the count, so records of one key written before
        /// and after may be in different partitions.
        #[arg(long)]
        partitions: Option<u32>,
        /// A config entry to set, KEY=VALUE (repeatable).
        #[arg(long = "config", value_parser = parse_entry)]
        config: Vec<(String, String)>,
        /// A config key to remove, back to the cluster default (repeatable).
        #[arg(long = "delete-config")]
        delete_config: Vec<String>,
    },
    /// List topics.
    List,
    /// Show each partition of a topic: leader, replicas, high watermark, term, replica lag.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Runs a topic command.
pub async fn run(command: TopicCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            config,
        } => {
            let topic = client
                .create_topic_with_config(&name, partitions, replication_factor, &config)
                .await
                .with_context(|| format!("cannot create topic {name}"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&topic),
                OutputFormat::Table => {
                    output::print_line(&format!(
                        "created topic {} ({} partitions, replication factor {})",
                        topic.name,
                        topic.partitions.len(),
                        topic.replication_factor
                    ))?;
                    print_partitions(&topic)
                }
            }
        }
        TopicCommand::List => {
            let topics = client.list_topics().await.context("cannot list topics")?;
            match global.output {
                OutputFormat::Json => output::print_json(&topics),
                OutputFormat::Table => {
                    let mut table = output::table(["topic", "partitions", "replication factor"]);
                    for topic in &topics {
                        table.add_row(vec![
                            topic.name.clone(),
                            topic.partitions.to_string(),
                            topic.replication_factor.to_string(),
                        ]);
                    }
                    output::print_line(&table.to_string())
                }
            }
        }
        TopicCommand::Alter {
            name,
            partitions,
            config,
            delete_config,
        } => {
            if config.is_empty() && delete_config.is_empty() && partitions.is_none() {
                anyhow::bail!(
                    "nothing to change: give --partitions N, --config KEY=VALUE or --delete-config KEY"
                );
            }
            let mut topic = None;
            if let Some(partitions) = partitions {
                topic = Some(
                    client
                        .add_partitions(&name, partitions)
                        .await
                        .with_context(|| format!("cannot add partitions to topic {name}"))?,
                );
            }
            if !config.is_empty() || !delete_config.is_empty() {
                topic = Some(
                    client
                        .alter_topic_config(&name, &config, &delete_config)
                        .await
                        .with_context(|| format!("cannot alter topic {name}"))?,
                );
            }
            let topic = topic.expect("one change was asked for");
            match global.output {
                OutputFormat::Json => output::print_json(&topic),
                OutputFormat::Table => {
                    output::print_line(&format!(
                        "altered topic {} ({} partitions)",
                        topic.name,
                        topic.partitions.len()
                    ))?;
                    print_config(&topic)
                }
            }
        }
        TopicCommand::Describe { name } => {
            let topic = client
                .describe_topic(&name)
                .await
                .with_context(|| format!("cannot describe topic {name}"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&topic),
                OutputFormat::Table => {
                    output::print_line(&format!(
                        "topic {} (replication factor {})",
                        topic.name, topic.replication_factor
                    ))?;
                    print_config(&topic)?;
                    print_partitions(&topic)
                }
            }
        }
        TopicCommand::Delete { name } => {
            client
                .delete_topic(&name)
                .await
                .with_context(|| format!("cannot delete topic {name}"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&serde_json::json!({ "deleted": name })),
                OutputFormat::Table => output::print_line(&format!("deleted topic {name}")),
            }
        }
    }
}

/// Parses a `KEY=VALUE` config entry.
fn parse_entry(entry: &str) -> Result<(String, String), String> {
    match entry.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{entry:?} is not KEY=VALUE")),
    }
}

/// The topic's config entries, one line each (nothing when it has none).
fn print_config(topic: &TopicDescription) -> anyhow::Result<()> {
    for (key, value) in &topic.config {
        output::print_line(&format!("  {key}={value}"))?;
    }
    Ok(())
}

/// One table row per partition.
fn print_partitions(topic: &TopicDescription) -> anyhow::Result<()> {
    let mut table = output::table([
        "partition",
        "leader",
        "replicas",
        "high watermark",
        "log start",
        "bytes",
        "term",
        "lag (node:entries)",
    ]);
    for partition in &topic.partitions {
        let replicas = partition
            .replicas
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let lag = partition
            .replica_status
            .iter()
            .map(|replica| format!("{}:{}", replica.node_id, or_dash(replica.lag)))
            .collect::<Vec<_>>()
            .join(" ");
        table.add_row(vec![
            partition.partition.to_string(),
            or_dash(partition.leader),
            replicas,
            partition.high_watermark.to_string(),
            partition.log_start_offset.to_string(),
            partition.bytes.to_string(),
            partition.term.to_string(),
            lag,
        ]);
    }
    output::print_line(&table.to_string())
}
