//! `ordo node ...`, `ordo partition reassign` and `ordo cluster rebalance`: commands that move
//! replicas, and the progress bar that follows the moves until they finish.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ordo_client::{Client, ReplicaMove};

use crate::GlobalArgs;
use crate::output::{self, OutputFormat};

/// How often the progress of moves is looked at.
const POLL: Duration = Duration::from_millis(500);

/// Node commands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node: address, state (active, draining), metadata role, partition counts.
    List,
    /// Move every replica of a node to the other nodes; once it holds none it leaves the
    /// cluster and its process can be stopped. Refused when the other nodes cannot keep every
    /// replication factor.
    Drain {
        /// The node's id.
        node_id: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// Partition commands.
#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move partitions of a topic to new replicas: new replicas catch up as learners (throttled
    /// by raft.move_bytes_per_sec), then the partition's voters change by joint consensus, then
    /// the old replicas delete their copies.
    Reassign {
        /// The topic.
        topic: String,
        /// `PARTITION=NODE,NODE,...` (the first node the preferred leader); repeatable.
        #[arg(long = "assign", value_name = "PARTITION=NODES", required = true)]
        assignments: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// Whether to follow the moves.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Return once the moves are started instead of waiting for them to finish.
    #[arg(long)]
    no_wait: bool,
    /// Longest wait for the moves to finish, seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

/// Runs a node command.
pub async fn run_node(command: NodeCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        NodeCommand::List => crate::cluster::status(global).await,
        NodeCommand::Drain { node_id, wait } => {
            let client = global.client().await?;
            let moves = client
                .drain_node(node_id)
                .await
                .with_context(|| format!("cannot drain node {node_id}"))?;
            follow(&client, global, &moves, &wait).await?;
            if !wait.no_wait {
                wait_until_gone(&client, node_id, &wait).await?;
                output::print_line(&format!(
                    "node {node_id} holds no replica and left the cluster; stop its process"
                ))?;
            }
            Ok(())
        }
    }
}

/// Runs a partition command.
pub async fn run_partition(command: PartitionCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        PartitionCommand::Reassign {
            topic,
            assignments,
            wait,
        } => {
            let plan = assignments
                .iter()
                .map(|assignment| parse_assignment(assignment))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = global.client().await?;
            let moves = client
                .reassign_partitions(&topic, &plan)
                .await
                .with_context(|| format!("cannot reassign partitions of {topic}"))?;
            follow(&client, global, &moves, &wait).await
        }
    }
}

/// Starts a rebalance and follows it.
pub async fn rebalance(global: &GlobalArgs, wait: &WaitArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    let moves = client.rebalance().await.context("cannot rebalance")?;
    follow(&client, global, &moves, wait).await
}

/// `3=1,2,4` as `(3, [1, 2, 4])`.
fn parse_assignment(text: &str) -> anyhow::Result<(u32, Vec<u64>)> {
    let (partition, nodes) = text
        .split_once('=')
        .with_context(|| format!("--assign {text:?} is not PARTITION=NODE,NODE,..."))?;
    let partition = partition
        .trim()
        .parse()
        .with_context(|| format!("--assign {text:?}: {partition:?} is not a partition number"))?;
    let nodes = nodes
        .split(',')
        .map(|node| {
            node.trim()
                .parse()
                .with_context(|| format!("--assign {text:?}: {node:?} is not a node id"))
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    Ok((partition, nodes))
}

/// A table of moves: what moves (`first` names the column), its partition, from and to.
pub(crate) fn moves_table(first: &str, moves: &[ReplicaMove]) -> comfy_table::Table {
    let list = |nodes: &[u64]| {
        nodes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut table = output::table([first, "partition", "from", "to"]);
    for view in moves {
        table.add_row(vec![
            view.owner.clone(),
            view.partition.to_string(),
            list(&view.from),
            list(&view.to),
        ]);
    }
    table
}

fn key(view: &ReplicaMove) -> (String, u32) {
    (view.owner.clone(), view.partition)
}

/// Prints the moves started and, unless told not to, waits with a progress bar until none of
/// them is in progress.
async fn follow(
    client: &Client,
    global: &GlobalArgs,
    moves: &[ReplicaMove],
    wait: &WaitArgs,
) -> anyhow::Result<()> {
    if global.output == OutputFormat::Json {
        output::print_json(&moves)?;
    } else if moves.is_empty() {
        output::print_line("no replica needs to move")?;
    } else {
        let table = moves_table("owner", moves);
        output::print_line(&table.to_string())?;
    }
    if wait.no_wait || moves.is_empty() {
        return Ok(());
    }
    let started: BTreeSet<(String, u32)> = moves.iter().map(key).collect();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(started.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} moved",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout_secs);
    loop {
        if let Ok(status) = client.cluster_status().await {
            let pending = status
                .moves
                .iter()
                .filter(|view| started.contains(&key(view)))
                .count();
            bar.set_position((started.len() - pending) as u64);
            if pending == 0 {
                bar.finish_and_clear();
                return output::print_line(&format!("{} moves finished", started.len()));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bar.abandon();
            anyhow::bail!(
                "moves still in progress after {} s; they go on (see ordo cluster status)",
                wait.timeout_secs
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until a drained node left the node table.
async fn wait_until_gone(client: &Client, node_id: u64, wait: &WaitArgs) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout_secs);
    loop {
        if let Ok(status) = client.cluster_status().await
            && !status
                .nodes
                .iter()
                .any(|node| node.node_id == node_id && node.state == "DRAINING")
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "node {node_id} still in the cluster after {} s",
                wait.timeout_secs
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_parse() {
        assert_eq!(parse_assignment("3=1,2,4").unwrap(), (3, vec![1, 2, 4]));
        assert_eq!(parse_assignment(" 0 = 5 ").unwrap(), (0, vec![5]));
        assert!(parse_assignment("3").is_err());
        assert!(parse_assignment("x=1").is_err());
        assert!(parse_assignment("1=a").is_err());
    }
}
