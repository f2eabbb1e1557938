//! Idempotent producers against a 3-node cluster of real `ordo serve` processes: a request
//! stamped with a producer sequence is written once, however often and wherever it is retried
//! (after a SIGKILL of the leader that committed it, after every node restarted), an older
//! epoch is fenced, a sequence gap is refused with the expected sequence, and the Rust client's
//! own retries never duplicate.
//!
//! The requests are made with the raw generated client, as a stub in any language would.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use ordo_proto::errors::{metadata, reason};
use ordo_proto::v1::{
    InitProducerRequest, ProduceRequest, ProduceResponse, ProducerSequence, Record,
};
use ordo_tests::{NodeId, TestCluster, expect_reason, with_timeout};
use tokio::time::{Instant, sleep};
use tonic::{Code, Status};
use tonic_types::StatusExt;

const NODES: usize = 3;
/// Deadline of one produce attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request is retried while the cluster elects a leader.
const RETRY_FOR: Duration = Duration::from_secs(60);

fn records(prefix: &str, count: usize) -> Vec<Record> {
    (0..count)
        .map(|index| Record {
            key: None,
            value: Bytes::from(format!("{prefix}-{index}")),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect()
}

fn request(
    topic: &str,
    records: Vec<Record>,
    (id, epoch): (u64, u32),
    sequence: u64,
) -> ProduceRequest {
    ProduceRequest {
        topic: topic.to_owned(),
        partition: Some(0),
        records,
        producer: Some(ProducerSequence {
            producer_id: id,
            producer_epoch: epoch,
            sequence,
        }),
    }
}

/// InitProducer through `node`.
async fn init_producer(cluster: &TestCluster, node: NodeId, name: &str) -> Result<(u64, u32)> {
    let request = InitProducerRequest {
        producer_name: name.to_owned(),
        request_token: 0,
    };
    let response = cluster
        .log_client(node)
        .init_producer(with_timeout(request, ATTEMPT_TIMEOUT))
        .await
        .with_context(|| format!("InitProducer({name:?}) through node {node}"))?
        .into_inner();
    Ok((response.producer_id, response.producer_epoch))
}

/// Sends `request` through the running nodes in turn until one answers with acks, as the
/// contract allows: the same request, same sequence, after any error that may not have written
/// it. Refusals of the request itself end the loop with that status.
async fn produce_retrying(
    cluster: &TestCluster,
    request: &ProduceRequest,
) -> Result<std::result::Result<ProduceResponse, Status>> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut attempt = 0usize;
    loop {
        let nodes = cluster.running_nodes();
        let node = nodes[attempt % nodes.len()];
        attempt += 1;
        let outcome = cluster
            .log_client(node)
            .produce(with_timeout(request.clone(), ATTEMPT_TIMEOUT))
            .await
            .map(tonic::Response::into_inner);
        match outcome {
            Ok(response) => return Ok(Ok(response)),
            Err(status)
                if matches!(
                    ordo_tests::effective_code(&status),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) && Instant::now() < deadline =>
            {
                println!("attempt {attempt} through node {node}: {status}; retrying");
                sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Ok(Err(status)),
        }
    }
}

fn offsets(response: &ProduceResponse) -> Vec<(u32, u64)> {
    response
        .acks
        .iter()
        .map(|ack| (ack.partition, ack.offset))
        .collect()
}

/// Reads partition 0 and fails unless it holds exactly `values`, in order.
async fn expect_log(cluster: &TestCluster, topic: &str, values: &[String]) -> Result<()> {
    let node = cluster.running_nodes()[0];
    let stored = cluster
        .read_partition(node, topic, 0, values.len() as u64)
        .await?;
    let read: Vec<String> = stored
        .iter()
        .map(|record| String::from_utf8_lossy(&record.value).into_owned())
        .collect();
    ensure!(
        read == values,
        "partition 0 holds {read:?}, expected exactly {values:?}"
    );
    Ok(())
}

fn values(prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("{prefix}-{index}"))
        .collect()
}

/// A batch committed by a leader that is then killed with SIGKILL, retried through the
/// survivors with the same sequence, is answered with the offsets of its first write (marked a
/// duplicate) and is in the log once; the producer's next batch follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_leader_is_killed_gets_the_original_offsets() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "idempotent-kill";
        cluster.create_topic(topic, 1, 3).await?;
        let leader = cluster.leader_of(topic, 0).await?;
        let producer = init_producer(&cluster, leader, "").await?;
        let first = request(topic, records("a", 5), producer, 0);
        let acked = produce_retrying(&cluster, &first)
            .await?
            .context("first write")?;
        ensure!(!acked.duplicate, "a first write is no duplicate");
        cluster.kill(leader)?;
        println!("killed leader {leader}; retrying the committed batch through the survivors");
        let retried = produce_retrying(&cluster, &first)
            .await?
            .context("retry after the kill")?;
        ensure!(
            offsets(&retried) == offsets(&acked),
            "the retry got {:?}, the first write {:?}",
            offsets(&retried),
            offsets(&acked)
        );
        ensure!(retried.duplicate, "the retry is answered as a duplicate");
        let next = request(topic, records("b", 2), producer, 5);
        let next = produce_retrying(&cluster, &next).await?.context("next")?;
        ensure!(
            offsets(&next) == vec![(0, 5), (0, 6)],
            "the next batch follows at 5: {:?}",
            offsets(&next)
        );
        let mut expected = values("a", 5);
        expected.extend(values("b", 2));
        expect_log(&cluster, topic, &expected).await
    }
    .await;
    cluster.finish(result);
}

/// The producer states survive a crash of every node (SIGKILL of all three, then a restart): a
/// batch acked before is answered with its original offsets and not written again, and a gap
/// is still refused with the expected sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_every_node_restarts_gets_the_original_offsets() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "idempotent-restart";
        cluster.create_topic(topic, 1, 3).await?;
        let leader = cluster.leader_of(topic, 0).await?;
        let producer = init_producer(&cluster, leader, "").await?;
        let first = request(topic, records("a", 3), producer, 0);
        let second = request(topic, records("b", 4), producer, 3);
        let first_acked = produce_retrying(&cluster, &first).await?.context("first")?;
        let second_acked = produce_retrying(&cluster, &second)
            .await?
            .context("second")?;
        for node in cluster.node_ids() {
            cluster.kill(node)?;
        }
        for node in cluster.node_ids() {
            cluster.restart(node)?;
        }
        cluster.wait_ready().await?;
        for (batch, acked) in [(&first, &first_acked), (&second, &second_acked)] {
            let retried = produce_retrying(&cluster, batch)
                .await?
                .context("retry after the restart")?;
            ensure!(
                offsets(&retried) == offsets(acked) && retried.duplicate,
                "the retry got {:?} (duplicate {}), the first write {:?}",
                offsets(&retried),
                retried.duplicate,
                offsets(acked)
            );
        }
        let gap = request(topic, records("c", 1), producer, 9);
        let status = expect_reason(
            produce_retrying(&cluster, &gap).await?,
            Code::FailedPrecondition,
            reason::OUT_OF_ORDER_SEQUENCE,
            "a gap after the restart",
        )?;
        ensure!(expected_sequence(&status)? == 7);
        let mut expected = values("a", 3);
        expected.extend(values("b", 4));
        expect_log(&cluster, topic, &expected).await
    }
    .await;
    cluster.finish(result);
}

fn expected_sequence(status: &Status) -> Result<u64> {
    let info = status
        .get_details_error_info()
        .context("the status carries its ErrorInfo")?;
    let Some(value) = info.metadata.get(metadata::EXPECTED_SEQUENCE) else {
        bail!("no {} in {:?}", metadata::EXPECTED_SEQUENCE, info.metadata);
    };
    Ok(value.parse()?)
}

/// A sequence gap is refused with FAILED_PRECONDITION / OUT_OF_ORDER_SEQUENCE naming the
/// expected sequence, and writes nothing; an unknown producer id is UNKNOWN_PRODUCER; an
/// idempotent request without a partition is INVALID_ARGUMENT / PARTITION_REQUIRED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sequences_and_producers_are_refused() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "idempotent-refusals";
        cluster.create_topic(topic, 1, 3).await?;
        let via = cluster.node_ids()[0];
        let producer = init_producer(&cluster, via, "").await?;
        produce_retrying(&cluster, &request(topic, records("a", 3), producer, 0))
            .await?
            .context("first")?;
        let status = expect_reason(
            produce_retrying(&cluster, &request(topic, records("x", 2), producer, 10)).await?,
            Code::FailedPrecondition,
            reason::OUT_OF_ORDER_SEQUENCE,
            "a gap",
        )?;
        ensure!(
            expected_sequence(&status)? == 3,
            "expected sequence {}",
            expected_sequence(&status)?
        );
        expect_reason(
            produce_retrying(&cluster, &request(topic, records("x", 1), (999_999, 0), 0)).await?,
            Code::FailedPrecondition,
            reason::UNKNOWN_PRODUCER,
            "an unknown producer id",
        )?;
        let mut no_partition = request(topic, records("x", 1), producer, 3);
        no_partition.partition = None;
        expect_reason(
            produce_retrying(&cluster, &no_partition).await?,
            Code::InvalidArgument,
            reason::PARTITION_REQUIRED,
            "an idempotent request without a partition",
        )?;
        produce_retrying(&cluster, &request(topic, records("b", 1), producer, 3))
            .await?
            .context("the expected sequence is still accepted")?;
        let mut expected = values("a", 3);
        expected.extend(values("b", 1));
        expect_log(&cluster, topic, &expected).await
    }
    .await;
    cluster.finish(result);
}

/// InitProducer with a name returns the same id with the next epoch; every node then refuses
/// the older epoch (FAILED_PRECONDITION / PRODUCER_FENCED), before the new epoch wrote anything
/// to the partition and after; the new epoch starts at sequence 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_epoch_is_fenced() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "idempotent-fence";
        cluster.create_topic(topic, 1, 3).await?;
        let nodes = cluster.node_ids();
        let old = init_producer(&cluster, nodes[0], "billing-7").await?;
        produce_retrying(&cluster, &request(topic, records("a", 2), old, 0))
            .await?
            .context("old epoch's first write")?;
        let new = init_producer(&cluster, nodes[1], "billing-7").await?;
        ensure!(
            new.0 == old.0 && new.1 == old.1 + 1,
            "same id, next epoch: {old:?} then {new:?}"
        );
        // Through every node, so each one's view of the producer registry is tested.
        for node in &nodes {
            let outcome = cluster
                .log_client(*node)
                .produce(with_timeout(
                    request(topic, records("zombie", 1), old, 2),
                    ATTEMPT_TIMEOUT,
                ))
                .await
                .map(tonic::Response::into_inner);
            expect_reason(
                outcome,
                Code::FailedPrecondition,
                reason::PRODUCER_FENCED,
                &format!("the old epoch through node {node}"),
            )?;
        }
        produce_retrying(&cluster, &request(topic, records("b", 1), new, 0))
            .await?
            .context("the new epoch starts at 0")?;
        expect_reason(
            produce_retrying(&cluster, &request(topic, records("zombie", 1), old, 2)).await?,
            Code::FailedPrecondition,
            reason::PRODUCER_FENCED,
            "the old epoch after the new one wrote",
        )?;
        let mut expected = values("a", 2);
        expected.extend(values("b", 1));
        expect_log(&cluster, topic, &expected).await
    }
    .await;
    cluster.finish(result);
}

/// The Rust client is idempotent by default: its calls, merged and pipelined, retried by the
/// client across a SIGKILL of the partition's leader, leave every acked record in the log
/// exactly once, and no record twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_never_writes_a_record_twice_across_a_leader_kill() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "idempotent-client";
        cluster.create_topic(topic, 1, 3).await?;
        let leader = cluster.leader_of(topic, 0).await?;
        let client = cluster
            .client(ordo_client::ClientOptions {
                request_timeout: Duration::from_secs(20),
                ..ordo_client::ClientOptions::default()
            })
            .await?;
        const CALLS: usize = 400;
        const IN_FLIGHT: usize = 16;
        let mut tasks: tokio::task::JoinSet<
            Result<Vec<ordo_client::RecordAck>, ordo_client::ClientError>,
        > = tokio::task::JoinSet::new();
        let mut acked = 0usize;
        let mut end = 0u64;
        let mut failed = Vec::new();
        for call in 0..CALLS {
            if call == CALLS / 4 {
                cluster.kill(leader)?;
                println!("killed leader {leader} after {call} calls started");
            }
            if tasks.len() >= IN_FLIGHT {
                match tasks.join_next().await.context("a call")?? {
                    Ok(acks) => {
                        acked += 1;
                        end = end.max(acks.iter().map(|ack| ack.offset + 1).max().unwrap_or(0));
                    }
                    Err(error) => failed.push(error),
                }
            }
            let client = client.clone();
            let record = ordo_client::Record::new(format!("v-{call}"));
            tasks.spawn(async move { client.produce(topic, Some(0), vec![record]).await });
        }
        while let Some(outcome) = tasks.join_next().await {
            match outcome? {
                Ok(acks) => {
                    acked += 1;
                    end = end.max(acks.iter().map(|ack| ack.offset + 1).max().unwrap_or(0));
                }
                Err(error) => failed.push(error),
            }
        }
        println!(
            "acked {acked}, failed {}: {:?}",
            failed.len(),
            failed.first()
        );
        ensure!(
            acked > CALLS / 2,
            "most calls are acked across one failover"
        );
        // A follower serves committed records a little after the leader acked them: read up to
        // the last acked offset.
        let node = cluster.running_nodes()[0];
        let stored = cluster.read_partition(node, topic, 0, end).await?;
        let mut seen = std::collections::BTreeSet::new();
        for record in &stored {
            let value = String::from_utf8_lossy(&record.value).into_owned();
            ensure!(seen.insert(value.clone()), "{value} is in the log twice");
        }
        ensure!(
            seen.len() >= acked,
            "{} records in the log, {acked} acked",
            seen.len()
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}
