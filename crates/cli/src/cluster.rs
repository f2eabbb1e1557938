//! `ordo cluster ...`: the cluster as one node sees it.

use anyhow::Context;
use clap::Subcommand;

use crate::GlobalArgs;
use crate::output::{self, OutputFormat, or_dash};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, their reachability, state and partition counts, the metadata leader, and the
    /// replica moves in progress.
    Status,
    /// Move replicas so every node holds about as many, and make every node the preferred
    /// leader of about as many partitions.
    Rebalance {
        #[command(flatten)]
        wait: crate::moves::WaitArgs,
    },
}

/// Runs a cluster command.
pub async fn run(command: ClusterCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status => status(global).await,
        ClusterCommand::Rebalance { wait } => crate::moves::rebalance(global, &wait).await,
    }
}

pub(crate) async fn status(global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    let status = client
        .cluster_status()
        .await
        .context("cannot get cluster status")?;
    if global.output == OutputFormat::Json {
        return output::print_json(&status);
    }
    let mut table = output::table([
        "node",
        "address",
        "reachable",
        "leaders",
        "replicas",
        "state",
        "metadata",
        "role",
    ]);
    for node in &status.nodes {
        let role = if status.metadata_leader == Some(node.node_id) {
            "metadata leader"
        } else {
            ""
        };
        table.add_row(vec![
            node.node_id.to_string(),
            node.address.clone(),
            if node.reachable { "yes" } else { "NO" }.to_owned(),
            node.leader_count.to_string(),
            node.replica_count.to_string(),
            node.state.to_lowercase(),
            node.metadata_role.to_lowercase(),
            role.to_owned(),
        ]);
    }
    output::print_line(&table.to_string())?;
    if !status.moves.is_empty() {
        let moves = crate::moves::moves_table("moving", &status.moves);
        output::print_line(&moves.to_string())?;
    }
    output::print_line(&format!(
        "metadata leader: {} (term {}); {} topics, {} partitions; answered by node {}",
        or_dash(status.metadata_leader.map(|id| format!("node {id}"))),
        status.metadata_term,
        status.topics,
        status.partitions,
        status.answered_by
    ))
}
