//! Changing a cluster's membership under load, against real processes: a node started with
//! only the address of the others joins (a metadata learner, not a fourth voter), takes a
//! partition by reassignment (learner, catch-up, joint consensus), a drained node hands every
//! replica over and leaves the cluster; no produce call fails, every acked record is read back
//! once. Then the refusals: draining below the replication factor, unknown nodes, plans of the
//! wrong size, and a second process under a used node id.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use std::time::Instant;

use anyhow::ensure;
use ordo_client::ClientError;
use ordo_client::ClusterStatus;
use ordo_tests::TestCluster;
use ordo_tests::load::produce_until;
use ordo_tests::load::wait_status;
use tokio::time::sleep;

const TOPIC: &str = "moving";
const PARTITIONS: u32 = 4;

fn role(status: &ClusterStatus, node: u64) -> Option<(String, String)> {
    status
        .nodes
        .iter()
        .find(|candidate| candidate.node_id == node)
        .map(|found| (found.state.clone(), found.metadata_role.clone()))
}

#[tokio::test]
async fn nodes_join_take_replicas_and_leave_under_load() {
    let mut cluster = TestCluster::start_ready(3).await.expect("cluster");
    let result = async {
        cluster.create_topic(TOPIC, PARTITIONS, 3).await?;
        let client = cluster
            .client(ordo_client::ClientOptions {
                request_timeout: Duration::from_secs(20),
                ..ordo_client::ClientOptions::default()
            })
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(produce_until(client.clone(), TOPIC, stop.clone()));
        sleep(Duration::from_secs(1)).await;

        // A fourth node joins: registered, a metadata learner (voters stay three).
        let joined_at = Instant::now();
        let four = cluster.add_node(None)?;
        let status = wait_status(&client, "node 4 joins", Duration::from_secs(60), |status| {
            role(status, four) == Some(("ACTIVE".into(), "LEARNER".into()))
        })
        .await?;
        eprintln!("node {four} joined in {:?}", joined_at.elapsed());
        let voters = status
            .nodes
            .iter()
            .filter(|node| node.metadata_role == "VOTER")
            .count();
        ensure!(voters == 3, "3 metadata voters with 4 nodes: {status:#?}");

        // Partition 0 moves onto it, as preferred leader.
        let before = cluster.describe_topic(TOPIC).await?.partitions[0]
            .replicas
            .clone();
        let target = vec![four, before[0], before[1]];
        let moved_at = Instant::now();
        let moves = client
            .reassign_partitions(TOPIC, &[(0, target.clone())])
            .await?;
        ensure!(
            moves.len() == 1 && moves[0].to == target,
            "one move started: {moves:?}"
        );
        wait_status(&client, "partition 0 moves", Duration::from_secs(60), |status| {
            status.moves.is_empty()
        })
        .await?;
        eprintln!("partition 0 moved to {target:?} in {:?}", moved_at.elapsed());
        let after = cluster.describe_topic(TOPIC).await?.partitions[0]
            .replicas
            .clone();
        ensure!(after == target, "partition 0's replicas: {after:?}");

        // Node 1 is drained: every replica moves off it, then it leaves the cluster.
        let drained_at = Instant::now();
        let moves = client.drain_node(1).await?;
        ensure!(!moves.is_empty(), "node 1 held replicas");
        ensure!(
            moves.iter().all(|view| !view.to.contains(&1)),
            "no move goes to node 1: {moves:?}"
        );
        let status = wait_status(&client, "node 1 leaves", Duration::from_secs(120), |status| {
            status.moves.is_empty() && role(status, 1).is_none()
        })
        .await?;
        eprintln!(
            "node 1 drained ({} moves) and removed in {:?}",
            moves.len(),
            drained_at.elapsed()
        );
        let voters: BTreeSet<u64> = status
            .nodes
            .iter()
            .filter(|node| node.metadata_role == "VOTER")
            .map(|node| node.node_id)
            .collect();
        ensure!(
            voters == BTreeSet::from([2, 3, 4]),
            "the metadata voters are the three remaining nodes: {status:#?}"
        );
        for partition in cluster.describe_topic(TOPIC).await?.partitions {
            ensure!(
                !partition.replicas.contains(&1) && partition.replicas.len() == 3,
                "partition {} replicas {:?}",
                partition.partition,
                partition.replicas
            );
        }

        // The removed node's metadata is no longer kept up to date: it serves no client.
        let answer = cluster
            .admin_client(1)
            .cluster_status(ordo_tests::with_timeout(
                ordo_proto::v1::ClusterStatusRequest {},
                Duration::from_secs(5),
            ))
            .await;
        ensure!(
            matches!(&answer, Err(status) if status.code() == tonic::Code::Unavailable && status.message().contains("removed")),
            "a removed node refuses public calls: {answer:?}"
        );

        // Refusals change nothing.
        let refused = client.drain_node(2).await;
        ensure!(
            matches!(refused, Err(ClientError::FailedPrecondition { ref message, .. }) if message.contains("replication factor")),
            "draining below the replication factor: {refused:?}"
        );
        let refused = client.drain_node(9).await;
        ensure!(
            matches!(refused, Err(ClientError::NotFound { ref reason, .. }) if reason.as_deref() == Some("NODE_NOT_FOUND")),
            "draining an unknown node: {refused:?}"
        );
        let refused = client.reassign_partitions(TOPIC, &[(1, vec![2, 3, 9])]).await;
        ensure!(
            matches!(refused, Err(ClientError::NotFound { ref reason, .. }) if reason.as_deref() == Some("NODE_NOT_FOUND")),
            "a plan naming an unknown node: {refused:?}"
        );
        let refused = client.reassign_partitions(TOPIC, &[(1, vec![2, 3])]).await;
        ensure!(
            matches!(refused, Err(ClientError::InvalidArgument { .. })),
            "a plan below the replication factor: {refused:?}"
        );
        let refused = client.reassign_partitions(TOPIC, &[(9, vec![2, 3, 4])]).await;
        ensure!(
            matches!(refused, Err(ClientError::NotFound { .. })),
            "a partition out of range: {refused:?}"
        );
        let status = client.cluster_status().await?;
        ensure!(
            status.moves.is_empty() && role(&status, 2) == Some(("ACTIVE".into(), "VOTER".into())),
            "refusals changed nothing: {status:#?}"
        );

        // A second process under a used id is refused and exits.
        cluster.add_node(Some(2))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(exit) = cluster.exited(2)? {
                break exit;
            }
            ensure!(Instant::now() < deadline, "a duplicate node 2 still runs");
            sleep(Duration::from_millis(200)).await;
        };
        let log = std::fs::read_to_string(cluster.last_log_path(2))?;
        ensure!(
            !exit.success() && log.contains("already used"),
            "the duplicate exits with the reason ({exit}):\n{log}"
        );

        sleep(Duration::from_secs(1)).await;
        let load = ordo_tests::load::finish(&stop, load).await?;
        load.check(&cluster, 2, TOPIC, PARTITIONS).await?;
        // The new replica holds every acked record of the partition it took.
        let end = load
            .acked
            .range((0, 0)..(1, 0))
            .next_back()
            .map_or(0, |((_, offset), _)| offset + 1);
        let held = cluster.read_replica(four, TOPIC, 0, end).await?;
        let offsets: BTreeSet<u64> = held.iter().map(|record| record.offset).collect();
        for (partition, offset) in load.acked.keys().filter(|(partition, _)| *partition == 0) {
            ensure!(
                offsets.contains(offset),
                "node {four}'s replica lacks {partition}/{offset}"
            );
        }
        let status = cluster.stop(1).await?;
        ensure!(status.success(), "the removed node stops cleanly: {status}");
        Ok(())
    }
    .await;
    cluster.finish(result);
}
