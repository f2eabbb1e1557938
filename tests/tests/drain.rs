//! Stopping gracefully against a real cluster: on SIGTERM a node reports not ready, hands
//! every leadership it holds to a caught-up replica and exits within its grace period; a
//! rolling restart of every node under produce load loses nothing, writes nothing twice and
//! fails no produce call (the client retries inside its deadline); a restarted node reports
//! ready (`ordo.ready`) once it caught up.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::Result;
use anyhow::bail;
use anyhow::ensure;
use ordo_tests::NodeId;
use ordo_tests::TestCluster;
use ordo_tests::load::produce_until;
use ordo_tests::with_timeout;
use tokio::time::sleep;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A grace period well above what a hand-off takes here, below the test's stop timeout.
const CONFIG: &str = "shutdown_grace_ms = 10000\n";

const TOPIC: &str = "rolling";
const PARTITIONS: u32 = 6;

/// Waits until `node` reports `ordo.ready` SERVING.
async fn wait_ready_probe(cluster: &TestCluster, node: NodeId) -> Result<Duration> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let mut health = HealthClient::new(cluster.channel(node));
        let request = HealthCheckRequest {
            service: "ordo.ready".into(),
        };
        let status = health
            .check(with_timeout(request, Duration::from_secs(2)))
            .await
            .map(|response| response.into_inner().status);
        if matches!(status, Ok(serving) if serving == ServingStatus::Serving as i32) {
            return Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            bail!(
                "node {node} is not ready after 60 s: {status:?}\n{}",
                cluster.log_tail(node)
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every node in turn with SIGTERM (highest id first, as a StatefulSet's rolling update
/// does) under load, restarting each and waiting for it to be ready before the next.
#[tokio::test]
async fn a_rolling_restart_under_load_loses_nothing_and_fails_no_produce() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        cluster.create_topic(TOPIC, PARTITIONS, 3).await?;
        for node in cluster.node_ids() {
            wait_ready_probe(&cluster, node).await?;
        }
        let client = cluster
            .client(ordo_client::ClientOptions {
                request_timeout: Duration::from_secs(20),
                ..ordo_client::ClientOptions::default()
            })
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(produce_until(client, TOPIC, stop.clone()));
        sleep(Duration::from_secs(2)).await;
        let mut nodes = cluster.node_ids();
        nodes.reverse();
        for node in nodes {
            let leading = cluster
                .leaders(TOPIC)
                .await?
                .iter()
                .filter(|leader| **leader == node)
                .count();
            let started = Instant::now();
            let status = cluster.stop(node).await?;
            let stopped_in = started.elapsed();
            ensure!(status.success(), "node {node} exited with {status}");
            let log = std::fs::read_to_string(cluster.log_path(node))
                .with_context(|| format!("read node {node}'s log"))?;
            let handed = log
                .lines()
                .rev()
                .find(|line| line.contains("leaderships handed off"))
                .with_context(|| format!("node {node} logged no hand-off"))?;
            ensure!(
                handed.contains("still_leading=0"),
                "node {node} stopped while leading: {handed}"
            );
            let handed_off: usize = handed
                .split("handed_off=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|count| count.parse().ok())
                .with_context(|| format!("no handed_off count in {handed}"))?;
            ensure!(
                leading == 0 || handed_off >= 1,
                "node {node} led {leading} partitions and handed none off: {handed}"
            );
            cluster.restart(node)?;
            cluster.wait_node_ready(node).await?;
            let ready_in = wait_ready_probe(&cluster, node).await?;
            eprintln!(
                "node {node}: led {leading} of {PARTITIONS} partitions, stopped in {stopped_in:?}, \
                 ready {ready_in:?} after its restart"
            );
        }
        sleep(Duration::from_secs(2)).await;
        let load = ordo_tests::load::finish(&stop, load).await?;
        // Every acked record is where it was acked, and no record is stored twice.
        let reader = cluster.running_nodes()[0];
        load.check(&cluster, reader, TOPIC, PARTITIONS).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}
