//! `ordo group ...`: list, describe, reset the offsets of, and delete consumer groups.

use anyhow::Context;
use anyhow::bail;
use clap::Args;
use clap::Subcommand;
use ordo_client::ResetTo;

use crate::GlobalArgs;
use crate::output::{self, OutputFormat, or_dash};

/// Consumer group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List every consumer group.
    List,
    /// Show a group's members and, per partition, its owner, committed offset, log end and lag.
    Describe {
        /// Group name.
        group: String,
    },
    /// Set a group's committed offsets of a topic; refused while the group has members.
    ResetOffsets(ResetArgs),
    /// Delete a group and its committed offsets; refused while it has members.
    Delete {
        /// Group name.
        group: String,
    },
}

/// Arguments of `ordo group reset-offsets`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Group name.
    pub group: String,
    /// The topic whose offsets to set.
    #[arg(long)]
    pub topic: String,
    /// Only this partition (repeatable; default: every partition of the topic).
    #[arg(long)]
    pub partition: Vec<u32>,
    /// To the first offset of each partition.
    #[arg(long, group = "to", required = true)]
    pub to_earliest: bool,
    /// To the end of each partition now.
    #[arg(long, group = "to", required = true)]
    pub to_latest: bool,
    /// To this offset.
    #[arg(long, group = "to", required = true)]
    pub to_offset: Option<u64>,
    /// To the first record at or after this time: RFC 3339 (2026-12-07T08:00:00Z) or
    /// milliseconds since the Unix epoch (the end of a partition with none).
    #[arg(long, group = "to", required = true, value_parser = parse_time)]
    pub to_time: Option<i64>,
}

/// A time as RFC 3339 or milliseconds since the Unix epoch.
pub(crate) fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(millis) = text.parse::<i64>() {
        return Ok(millis);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|error| format!("{text:?} is neither RFC 3339 nor milliseconds: {error}"))?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    i64::try_from(since.as_millis()).map_err(|_| format!("{text:?} is too far ahead"))
}

impl ResetArgs {
    fn to(&self) -> anyhow::Result<ResetTo> {
        Ok(
            match (
                self.to_earliest,
                self.to_latest,
                self.to_offset,
                self.to_time,
            ) {
                (true, ..) => ResetTo::Earliest,
                (_, true, ..) => ResetTo::Latest,
                (_, _, Some(offset), _) => ResetTo::Offset(offset),
                (_, _, _, Some(time)) => ResetTo::Time(time),
                _ => {
                    bail!("say where to: --to-earliest, --to-latest, --to-offset N or --to-time T")
                }
            },
        )
    }
}

/// Runs a group command.
pub async fn run(command: GroupCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    match command {
        GroupCommand::List => {
            let groups = client.list_groups().await.context("cannot list groups")?;
            match global.output {
                OutputFormat::Json => output::print_json(&groups),
                OutputFormat::Table => {
                    let mut table = output::table(["group", "members", "committed partitions"]);
                    for group in &groups {
                        table.add_row(vec![
                            group.name.clone(),
                            group.members.to_string(),
                            group.committed_partitions.to_string(),
                        ]);
                    }
                    output::print_line(&table.to_string())
                }
            }
        }
        GroupCommand::Describe { group } => {
            let description = client
                .describe_group(&group)
                .await
                .with_context(|| format!("cannot describe group {group}"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&description),
                OutputFormat::Table => {
                    output::print_line(&format!(
                        "group {} (epoch {}, coordinator node {}, {} members)",
                        description.group,
                        description.group_epoch,
                        description.coordinator,
                        description.members.len()
                    ))?;
                    let mut members =
                        output::table(["member", "epoch", "topics", "owned", "target"]);
                    let list = |partitions: &std::collections::BTreeSet<(String, u32)>| {
                        partitions
                            .iter()
                            .map(|(topic, partition)| format!("{topic}/{partition}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    for member in &description.members {
                        members.add_row(vec![
                            member.member_id.clone(),
                            member.member_epoch.to_string(),
                            member.topics.join(","),
                            list(&member.owned),
                            list(&member.target),
                        ]);
                    }
                    output::print_line(&members.to_string())?;
                    let mut partitions = output::table([
                        "topic",
                        "partition",
                        "owner",
                        "committed",
                        "log end",
                        "lag",
                    ]);
                    for partition in &description.partitions {
                        partitions.add_row(vec![
                            partition.topic.clone(),
                            partition.partition.to_string(),
                            if partition.owner.is_empty() {
                                "-".to_owned()
                            } else {
                                partition.owner.clone()
                            },
                            or_dash(partition.committed),
                            or_dash(partition.log_end),
                            or_dash(partition.lag),
                        ]);
                    }
                    output::print_line(&partitions.to_string())
                }
            }
        }
        GroupCommand::ResetOffsets(args) => {
            let offsets = client
                .reset_offsets(&args.group, &args.topic, &args.partition, args.to()?)
                .await
                .with_context(|| format!("cannot reset the offsets of group {}", args.group))?;
            match global.output {
                OutputFormat::Json => output::print_json(&offsets),
                OutputFormat::Table => {
                    let mut table = output::table(["topic", "partition", "committed"]);
                    for offset in &offsets {
                        table.add_row(vec![
                            offset.topic.clone(),
                            offset.partition.to_string(),
                            offset.offset.to_string(),
                        ]);
                    }
                    output::print_line(&table.to_string())
                }
            }
        }
        GroupCommand::Delete { group } => {
            client
                .delete_group(&group)
                .await
                .with_context(|| format!("cannot delete group {group}"))?;
            output::print_line(&format!("deleted group {group}"))
        }
    }
}
