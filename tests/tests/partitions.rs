//! Adding partitions to a topic online, against a real cluster: the old partitions keep their
//! records, the new ones get leaders and take records at once, keyless produce spreads over
//! them; fewer partitions, an unknown topic and a topic a queue reads are refused and change
//! nothing; `ordo topic alter --partitions` does the same from a terminal.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use ordo_client::QueueSettings;
use ordo_proto::v1::AddPartitionsRequest;
use ordo_tests::TestCluster;
use ordo_tests::expect_code;
use ordo_tests::expect_reason;
use ordo_tests::with_timeout;
use tonic::Code;

const TOPIC: &str = "grow";

#[tokio::test]
async fn partitions_are_added_online_and_never_removed() {
    let cluster = TestCluster::start_ready(3).await.expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client.create_topic(TOPIC, 2, 3).await?;
        let mut before = Vec::new();
        for index in 0..40 {
            let record = ordo_client::Record::new(format!("before-{index}"));
            before.extend(client.produce(TOPIC, None, vec![record]).await?);
        }
        let grown = client.add_partitions(TOPIC, 5).await?;
        ensure!(grown.partitions.len() == 5, "{grown:?}");
        ensure!(
            grown
                .partitions
                .iter()
                .all(|partition| partition.leader.is_some()),
            "every partition has a leader once the call returns: {grown:?}"
        );
        // The same count again changes nothing.
        ensure!(client.add_partitions(TOPIC, 5).await?.partitions.len() == 5);
        // A new partition takes records at once, and keyless records spread over all five.
        let acks = client
            .produce(TOPIC, Some(4), vec![ordo_client::Record::new("to-4")])
            .await?;
        ensure!(acks[0].partition == 4, "{acks:?}");
        let mut used = BTreeSet::new();
        for index in 0..50 {
            let record = ordo_client::Record::new(format!("after-{index}"));
            for ack in client.produce(TOPIC, None, vec![record]).await? {
                used.insert(ack.partition);
            }
        }
        ensure!(
            used.len() == 5,
            "keyless records went to partitions {used:?} only"
        );
        // What the old partitions held is still there.
        let node = cluster.running_nodes()[0];
        for partition in 0..2 {
            let end = before
                .iter()
                .filter(|ack| ack.partition == partition)
                .map(|ack| ack.offset + 1)
                .max()
                .unwrap_or(0);
            let records = cluster.read_partition(node, TOPIC, partition, end).await?;
            for ack in before.iter().filter(|ack| ack.partition == partition) {
                ensure!(
                    records.iter().any(|record| record.offset == ack.offset),
                    "partition {partition} lost offset {}",
                    ack.offset
                );
            }
            let old: Vec<String> = records
                .iter()
                .filter(|record| record.offset < end)
                .map(|record| String::from_utf8_lossy(&record.value).into_owned())
                .collect();
            ensure!(
                old.iter().all(|value| value.starts_with("before-")),
                "partition {partition} holds other records below {end}: {old:?}"
            );
        }
        let new = cluster.read_partition(node, TOPIC, 4, 1).await?;
        ensure!(
            new.first()
                .is_some_and(|record| record.value.as_ref() == b"to-4")
        );

        // Refusals change nothing.
        let mut admin = cluster.admin_client(node);
        let request = |name: &str, partitions| {
            with_timeout(
                AddPartitionsRequest {
                    name: name.into(),
                    partitions,
                },
                Duration::from_secs(10),
            )
        };
        expect_reason(
            admin.add_partitions(request(TOPIC, 3)).await,
            Code::InvalidArgument,
            "INVALID_PARTITIONS",
            "fewer partitions",
        )?;
        expect_code(
            admin.add_partitions(request("no-such-topic", 3)).await,
            &[Code::NotFound],
            "an unknown topic",
        )?;
        client
            .create_queue("grow-queue", TOPIC, &QueueSettings::default())
            .await?;
        expect_code(
            admin.add_partitions(request(TOPIC, 8)).await,
            &[Code::FailedPrecondition],
            "a topic a queue reads",
        )?;
        ensure!(client.describe_topic(TOPIC).await?.partitions.len() == 5);
        client.delete_queue("grow-queue").await?;

        // From a terminal.
        let output = std::process::Command::new(ordo_tests::ordo_binary()?)
            .args(["topic", "alter", TOPIC, "--partitions", "6", "--endpoints"])
            .arg(cluster.address(node).to_string())
            .output()
            .context("run ordo topic alter")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success() && stdout.contains("6 partitions"),
            "ordo topic alter: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        ensure!(client.describe_topic(TOPIC).await?.partitions.len() == 6);
        Ok(())
    }
    .await;
    cluster.finish(result);
}
