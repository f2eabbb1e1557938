//! End-to-end properties of a 3-node cluster of real `ordo serve` processes: replication,
//! failover, catch-up, quorum loss, error codes and health.
//!
//! Each test starts its own cluster, so tests are independent and can run in any order. Every
//! loop and wait is bounded; no test asserts how long something took, only what happened.
//!
//! Every partition is read two ways from each node (see `ordo_tests::Source`): as a consumer
//! calling that node sees it, and from that node's own replica. Fetch serves from the node
//! called when it hosts a replica (every node does, with replication factor 3 on three nodes),
//! but at that replica's end it forwards to the leader; the replica read sends the node-to-node
//! "forwarded" header so the node answers from its own copy only. If Fetch stops serving from
//! the called replica, the replica checks here stop proving anything about followers and must
//! change with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use ordo_proto::v1::{
    ClusterStatusRequest, CreateTopicRequest, DeleteTopicRequest, DescribeTopicRequest,
    FetchRequest, ProduceRequest, ProduceStreamRequest, Record, StoredRecord,
    produce_stream_response,
};
use ordo_tests::{
    Ledger, NodeId, READ_TIMEOUT, TestCluster, client_records, effective_code, expect_code,
    expect_reason, produce_acked, produce_once, raw_unary, test_seed, unique_records, with_timeout,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep, timeout};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// Every test runs three nodes: the smallest cluster that survives the loss of one.
const NODES: usize = 3;
/// Partitions of the topics that test replication; more than one so that keys must spread.
const PARTITIONS: u32 = 3;

/// Concurrent producers of the crash tests' load.
const LOAD_PRODUCERS: usize = 3;
/// Produce calls each load producer makes at most.
const LOAD_CALLS: usize = 40;
/// Records per load produce call.
const LOAD_BATCH: usize = 25;
/// Deadline of each load produce call; short, so calls stuck on the crashed leader end soon.
const LOAD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the load may run in all.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Acked records after which the leader is crashed: early, so most of the load comes after.
const KILL_AFTER_ACKS: usize = 250;
/// The `grpc-timeout` a produce gets when no quorum is left.
const QUORUM_LOSS_DEADLINE: Duration = Duration::from_secs(5);

/// Producing 10,000 records (keys spread, 100 per call) through a node that follows at least
/// one partition lands each on every replica: every partition read back in order from every
/// node has offsets dense from 0, and every acked (partition, offset) holds exactly the value
/// acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_through_a_follower_reads_back_from_every_node() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "replicated";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        let leaders = cluster.leaders(topic).await?;
        // The leader of partition 0 is the one node that is not a follower of it.
        let via = cluster
            .node_ids()
            .into_iter()
            .find(|node| *node != leaders[0])
            .expect("three nodes have two that do not lead partition 0");
        println!("leaders {leaders:?}; producing through node {via}");

        const PRODUCERS: usize = 4;
        const RECORDS: usize = 10_000;
        let mut producers = Vec::new();
        for producer in 0..PRODUCERS {
            let mut client = cluster.log_client(via);
            producers.push(tokio::spawn(async move {
                let mut ledger = Ledger::default();
                let prefix = format!("p{producer}");
                let count = RECORDS / PRODUCERS;
                produce_acked(
                    &mut client,
                    &mut ledger,
                    topic,
                    None,
                    &prefix,
                    count,
                    100,
                    true,
                )
                .await?;
                anyhow::Ok(ledger)
            }));
        }
        let mut ledger = Ledger::default();
        for producer in producers {
            ledger.merge(producer.await.context("producer panicked")??)?;
        }
        ensure!(
            ledger.acked_count() == RECORDS,
            "acked {}",
            ledger.acked_count()
        );
        ledger.check_key_affinity()?;
        for partition in 0..PARTITIONS {
            ensure!(
                ledger.acked_in(partition) > 0,
                "64 distinct keys never reached partition {partition}"
            );
        }

        check_everywhere(
            &cluster,
            &mut ledger,
            topic,
            PARTITIONS,
            &cluster.node_ids(),
        )
        .await?;
        let mut total = 0;
        for partition in 0..PARTITIONS {
            let end = ledger.acked_end(partition);
            total += cluster
                .read_replica(via, topic, partition, end)
                .await?
                .len();
        }
        // Without unknown outcomes or duplicates the log holds exactly the acked records.
        if ledger.unknown_count() == 0 && ledger.duplicate_count() == 0 {
            ensure!(total == RECORDS, "the partitions hold {total} records");
        }
        println!(
            "acked {RECORDS}; unknown {}; refused {}; duplicated {}",
            ledger.unknown_count(),
            ledger.not_written_count(),
            ledger.duplicate_count()
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Many concurrent produce calls to one partition, which its leader coalesces into shared Raft
/// entries: each call gets its own consecutive run of offsets, the partition's offsets are dense
/// and hold exactly the acked records on every replica, and the log has fewer entries than calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_produces_to_one_partition_share_entries() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "coalesced";
        cluster.create_topic(topic, 1, 3).await?;
        let leader = cluster.leaders(topic).await?[0];
        const CALLS: usize = 300;
        // One connection, so the calls are multiplexed and reach the leader together.
        let client = cluster.log_client(leader);
        let mut calls = tokio::task::JoinSet::new();
        for call in 0..CALLS {
            let mut client = client.clone();
            calls.spawn(async move {
                let mut ledger = Ledger::default();
                let records = unique_records(&format!("call{call}"), 0, 1 + call % 3, false);
                let count = records.len();
                let outcome = produce_once(
                    &mut client,
                    &mut ledger,
                    topic,
                    Some(0),
                    records,
                    Duration::from_secs(30),
                )
                .await?;
                let response = outcome.map_err(|status| {
                    anyhow::anyhow!("call {call}: {:?}: {}", status.code(), status.message())
                })?;
                let offsets: Vec<u64> = response.acks.iter().map(|ack| ack.offset).collect();
                let first = offsets[0];
                ensure!(
                    offsets == (first..first + count as u64).collect::<Vec<_>>(),
                    "call {call} got offsets {offsets:?}, not one consecutive run"
                );
                anyhow::Ok(ledger)
            });
        }
        let mut ledger = Ledger::default();
        while let Some(call) = calls.join_next().await {
            ledger.merge(call.context("produce task panicked")??)?;
        }
        let records: usize = (0..CALLS).map(|call| 1 + call % 3).sum();
        ensure!(
            ledger.acked_count() == records,
            "acked {}",
            ledger.acked_count()
        );
        ensure!(
            ledger.acked_end(0) == records as u64,
            "offsets are not dense: end {} for {records} records",
            ledger.acked_end(0)
        );
        check_everywhere(&cluster, &mut ledger, topic, 1, &cluster.node_ids()).await?;

        let mut internal =
            ordo_proto::internal::internal_client::InternalClient::new(cluster.channel(leader));
        let status = internal
            .group_status(ordo_proto::internal::GroupStatusRequest { groups: Vec::new() })
            .await?
            .into_inner();
        let group = status
            .groups
            .iter()
            .find(|group| group.leader == Some(leader))
            .context("the leader reports its partition group")?;
        println!(
            "{CALLS} calls, {records} records, {} log entries (incl. the leader's blank entry)",
            group.last_log_index
        );
        ensure!(
            (group.last_log_index as usize) < CALLS,
            "{CALLS} concurrent calls made {} log entries: nothing was coalesced",
            group.last_log_index
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// One ProduceStream carrying 1,500 requests, some of them bad, sent through a node without
/// reading answers first: every request is answered exactly once under its own id; a bad one
/// gets the status a unary call would (code and ErrorInfo reason) without disturbing the
/// others; every acked record is on every replica at its offset; and once the client closes
/// its side, the server ends the stream after the last answer. 1,500 is above the server's
/// default read-ahead (grpc.produce_stream_in_flight_max = 1,024), so the bound is exercised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_answers_every_request_by_id() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "piped";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        const REQUESTS: u64 = 1_500;
        // What each bad request must get: code and ErrorInfo reason.
        let bad = |id: u64| match id % 100 {
            7 => Some((Code::NotFound, "TOPIC_NOT_FOUND")),
            13 => Some((Code::InvalidArgument, "EMPTY_BATCH")),
            29 => Some((Code::InvalidArgument, "MISSING_REQUEST")),
            _ => None,
        };
        let mut sent_records = std::collections::HashMap::new();
        let mut messages = Vec::new();
        for id in 0..REQUESTS {
            let records = unique_records(&format!("req{id}"), 0, 1 + (id % 3) as usize, true);
            let request = match id % 100 {
                7 => Some(ProduceRequest {
                    producer: None,
                    topic: "no-such-topic".to_owned(),
                    partition: None,
                    records,
                }),
                13 => Some(ProduceRequest {
                    producer: None,
                    topic: topic.to_owned(),
                    partition: None,
                    records: Vec::new(),
                }),
                29 => None,
                _ => {
                    sent_records.insert(id, records.clone());
                    Some(ProduceRequest {
                        producer: None,
                        topic: topic.to_owned(),
                        partition: None,
                        records,
                    })
                }
            };
            messages.push(ProduceStreamRequest {
                id,
                request,
                timeout_ms: 30_000,
            });
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let mut log = cluster.log_client(cluster.node_ids()[1]);
        let mut answers = log
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .context("open the produce stream")?
            .into_inner();
        // Sends everything, then closes the request side by dropping the sender.
        let sending = tokio::spawn(async move {
            for message in messages {
                sender.send(message).await.ok()?;
            }
            Some(())
        });

        let mut ledger = Ledger::default();
        let mut answered = std::collections::HashSet::new();
        let read_all = async {
            while let Some(answer) = answers.message().await? {
                let id = answer.id;
                ensure!(id < REQUESTS, "answer for id {id}, which was never sent");
                ensure!(answered.insert(id), "id {id} answered twice");
                let outcome = match answer.result {
                    Some(produce_stream_response::Result::Response(response)) => Ok(response),
                    Some(produce_stream_response::Result::Error(error)) => {
                        Err(Status::with_details(
                            Code::from_i32(error.code),
                            error.message,
                            error.details,
                        ))
                    }
                    None => bail!("id {id}: answer without a result"),
                };
                match (bad(id), outcome) {
                    (Some((code, reason)), Err(status)) => {
                        let info = status.get_details_error_info();
                        ensure!(
                            status.code() == code
                                && info.as_ref().map(|info| info.reason.as_str()) == Some(reason),
                            "id {id}: expected {code:?} {reason}, got {:?} {info:?}: {}",
                            status.code(),
                            status.message()
                        );
                    }
                    (Some(_), Ok(response)) => bail!("bad request {id} succeeded: {response:?}"),
                    (None, outcome) => {
                        if let Err(status) = &outcome {
                            bail!("id {id} failed: {:?}: {}", status.code(), status.message());
                        }
                        ledger.record(&sent_records[&id], None, &outcome)?;
                    }
                }
            }
            anyhow::Ok(())
        };
        timeout(Duration::from_secs(120), read_all)
            .await
            .context("the stream did not end within 120 s of the requests")??;
        ensure!(
            sending.await?.is_some(),
            "the server stopped accepting requests before all were sent"
        );
        ensure!(
            answered.len() as u64 == REQUESTS,
            "{} of {REQUESTS} requests answered before the stream ended",
            answered.len()
        );
        let good = sent_records.values().map(Vec::len).sum::<usize>();
        ensure!(
            ledger.acked_count() == good,
            "acked {} of {good}",
            ledger.acked_count()
        );
        check_everywhere(
            &cluster,
            &mut ledger,
            topic,
            PARTITIONS,
            &cluster.node_ids(),
        )
        .await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A message over the server's `grpc.message_bytes_max` (16 MiB) on a ProduceStream ends the
/// stream only after the requests read before it are answered, and with an error status, not a
/// silent end. Through `ordo-client`, a call that large goes unary and fails alone while small
/// calls sent at the same time succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_fails_alone() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "oversized";
        cluster.create_topic(topic, 1, 3).await?;
        cluster.leaders(topic).await?;
        const SMALL: u64 = 20;
        let huge = || Record {
            key: None,
            value: Bytes::from(vec![b'x'; 17 << 20]),
            headers: Vec::new(),
            timestamp_ms: None,
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let mut log = cluster.log_client(cluster.node_ids()[0]);
        let mut answers = log
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .context("open the produce stream")?
            .into_inner();
        let sending = tokio::spawn(async move {
            for id in 0..=SMALL {
                let records = if id == SMALL {
                    vec![huge()]
                } else {
                    unique_records(&format!("small{id}"), 0, 1, false)
                };
                let request = ProduceRequest {
                    producer: None,
                    topic: topic.to_owned(),
                    partition: Some(0),
                    records,
                };
                let message = ProduceStreamRequest {
                    id,
                    request: Some(request),
                    timeout_ms: 30_000,
                };
                // The last send may fail once the server has ended the stream.
                if sender.send(message).await.is_err() {
                    break;
                }
            }
        });
        let mut ok = 0;
        let ended_with = timeout(Duration::from_secs(60), async {
            loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        ensure!(
                            answer.id < SMALL,
                            "the oversized request {} was answered",
                            answer.id
                        );
                        ensure!(
                            matches!(
                                answer.result,
                                Some(produce_stream_response::Result::Response(_))
                            ),
                            "request {} failed: {:?}",
                            answer.id,
                            answer.result
                        );
                        ok += 1;
                    }
                    Ok(None) => bail!("the stream ended without an error after {ok} answers"),
                    Err(status) => return Ok(status),
                }
            }
        })
        .await
        .context("no end of the stream within 60 s")??;
        sending.abort();
        println!(
            "stream ended with {:?}: {}",
            ended_with.code(),
            ended_with.message()
        );
        ensure!(
            ok == SMALL,
            "{ok} of {SMALL} requests read before the oversized one answered"
        );

        let client = cluster.client(Default::default()).await?;
        let big = client.produce(topic, Some(0), vec![ordo_client::Record::new(huge().value)]);
        let small = futures::future::join_all((0..50).map(|index| {
            client.produce(
                topic,
                Some(0),
                vec![ordo_client::Record::new(format!("after-{index}"))],
            )
        }));
        let (big, small) = tokio::join!(big, small);
        match big {
            Ok(acks) => bail!("a 17 MiB call was acked: {acks:?}"),
            Err(error) => {
                println!("the 17 MiB call failed with {}: {error}", error.kind());
                ensure!(
                    matches!(error, ordo_client::ClientError::InvalidArgument { .. }),
                    "the 17 MiB call failed with {error:?}, not INVALID_ARGUMENT"
                );
            }
        }
        for outcome in small {
            outcome.context("a small call sent beside the oversized one")?;
        }
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// `ordo-client` merges concurrent calls to one partition into shared requests (one request in
/// flight per partition by default) and still acks each call with its own records: 400
/// concurrent calls, to a given partition or keyless (partition chosen by the client), each get
/// one ack per record; every acked offset holds that call's record on every replica. A call
/// whose record is over the server's limit, merged with others (the client's batch bound is
/// raised above the limit), fails alone with INVALID_ARGUMENT: the merged request is refused
/// and the client sends its calls one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_batches_concurrent_calls_and_acks_each_its_own() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "batched";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        let client = cluster
            .client(ordo_client::ClientOptions {
                request_timeout: Duration::from_secs(30),
                produce_batch_bytes_max: 4 << 20,
                ..ordo_client::ClientOptions::default()
            })
            .await?;
        const CALLS: usize = 400;
        // Over the server's default limits.record_bytes_max (1 MiB), under the client's bound.
        const OVERSIZED_CALL: usize = 200;
        let mut calls = tokio::task::JoinSet::new();
        for call in 0..CALLS {
            let client = client.clone();
            calls.spawn(async move {
                let records = if call == OVERSIZED_CALL {
                    vec![Record {
                        key: None,
                        value: Bytes::from(vec![b'x'; (1 << 20) + 100]),
                        headers: Vec::new(),
                        timestamp_ms: None,
                    }]
                } else {
                    unique_records(&format!("call{call}"), 0, 1 + call % 3, false)
                };
                let partition = (call % 2 == 0).then_some((call % 3) as u32);
                let outcome = client
                    .produce(topic, partition, client_records(&records))
                    .await;
                (call, partition, records, outcome)
            });
        }
        let mut ledger = Ledger::default();
        let mut merged_refusal_seen = false;
        while let Some(joined) = calls.join_next().await {
            let (call, partition, records, outcome) = joined.context("produce task panicked")?;
            match outcome {
                Ok(acks) => {
                    ensure!(
                        call != OVERSIZED_CALL,
                        "the oversized call was acked: {acks:?}"
                    );
                    ledger.record_acks(&records, partition, &acks)?;
                }
                Err(ordo_client::ClientError::InvalidArgument { reason, message })
                    if call == OVERSIZED_CALL =>
                {
                    ensure!(
                        reason.as_deref() == Some("LIMIT_EXCEEDED"),
                        "oversized call: reason {reason:?}: {message}"
                    );
                    merged_refusal_seen = true;
                }
                Err(error) => bail!("call {call} failed: {error}"),
            }
        }
        ensure!(merged_refusal_seen, "the oversized call did not fail");
        let records: usize = (0..CALLS)
            .filter(|call| *call != OVERSIZED_CALL)
            .map(|call| 1 + call % 3)
            .sum();
        ensure!(
            ledger.acked_count() == records,
            "acked {} of {records}",
            ledger.acked_count()
        );
        check_everywhere(
            &cluster,
            &mut ledger,
            topic,
            PARTITIONS,
            &cluster.node_ids(),
        )
        .await?;
        // Fewer requests than calls reached the servers: the calls were merged.
        let mut requests = 0_u64;
        for node in cluster.node_ids() {
            requests += cluster.metric(node, "ordo_produce_requests_total").await?;
        }
        println!("{CALLS} calls reached the servers as {requests} produce requests");
        ensure!(
            requests < CALLS as u64,
            "{CALLS} concurrent calls made {requests} requests: nothing was merged"
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A node stopped with SIGTERM while `ordo-client` sends produce calls to it on ProduceStreams
/// fails no call: the node answers what it has read, refuses what arrives while it drains
/// (UNAVAILABLE / SHUTTING_DOWN: nothing written), the client retries those elsewhere, and
/// every call is acked. Every ack is then on both remaining replicas. Client batching is off
/// so that many requests are on the wire when the node stops (with the old behaviour, stop
/// reading at shutdown, 15-20 of the 2,560 calls ended as unknown outcomes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_under_stream_load_fails_no_call() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "drained";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        let client = cluster
            .client(ordo_client::ClientOptions {
                request_timeout: Duration::from_secs(20),
                // Every call its own request, so many are on the wire when the node stops.
                produce_requests_per_partition_max: 0,
                ..ordo_client::ClientOptions::default()
            })
            .await?;
        const PRODUCERS: usize = 64;
        const CALLS_EACH: usize = 40;
        const STOP_AFTER_ACKS: usize = 600;
        let acked = Arc::new(AtomicUsize::new(0));
        let mut producers = tokio::task::JoinSet::new();
        for producer in 0..PRODUCERS {
            let (client, acked) = (client.clone(), Arc::clone(&acked));
            producers.spawn(async move {
                let mut outcomes = Vec::new();
                for call in 0..CALLS_EACH {
                    // Keyless: the client picks each call's partition and sends it straight
                    // to that partition's leader, so the stopping node gets its share.
                    let records =
                        unique_records(&format!("p{producer}-c{call}"), 0, 1 + call % 2, false);
                    let outcome = client.produce(topic, None, client_records(&records)).await;
                    if outcome.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes.push((records, outcome));
                }
                outcomes
            });
        }
        let victim = cluster.node_ids()[1];
        let waited = timeout(Duration::from_secs(60), async {
            while acked.load(Ordering::Relaxed) < STOP_AFTER_ACKS {
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        ensure!(
            waited.is_ok(),
            "{STOP_AFTER_ACKS} acks did not come within 60 s"
        );
        let status = cluster.stop(victim).await?;
        println!(
            "node {victim} stopped ({status}) after {} acked calls",
            acked.load(Ordering::Relaxed)
        );
        ensure!(
            status.success(),
            "node {victim} did not stop cleanly: {status}"
        );

        let mut ledger = Ledger::default();
        let mut failed = Vec::new();
        while let Some(joined) = producers.join_next().await {
            for (records, outcome) in joined.context("producer panicked")? {
                match outcome {
                    Ok(acks) => {
                        ledger.record_acks(&records, None, &acks)?;
                    }
                    Err(error) => failed.push(error.to_string()),
                }
            }
        }
        ensure!(
            failed.is_empty(),
            "{} of {} calls failed, e.g. {:?}",
            failed.len(),
            PRODUCERS * CALLS_EACH,
            &failed[..failed.len().min(3)]
        );
        let survivors: Vec<NodeId> = cluster
            .node_ids()
            .into_iter()
            .filter(|node| *node != victim)
            .collect();
        check_everywhere(&cluster, &mut ledger, topic, PARTITIONS, &survivors).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// SIGKILL of partition 0's leader under a produce load loses no acked record: once a new
/// leader is elected, every acked record is read back at its acked offset from both survivors,
/// offsets stay dense, and no offset holds two different records in any two reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_records_survive_a_leader_crash() {
    let seed = test_seed();
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "failover";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        let crash = crash_leader_under_load(&cluster, topic, seed).await?;
        let mut ledger = crash.ledger;
        // Each survivor is read as a consumer and from its replica: every read must agree with
        // the acks and with every other read.
        check_everywhere(&cluster, &mut ledger, topic, PARTITIONS, &crash.survivors).await?;
        println!("duplicated records: {}", ledger.duplicate_count());
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A node crashed under load and restarted on its data dir catches up, after which all three
/// replicas hold byte-identical records at identical offsets, each read from the replica itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_to_identical_replicas() {
    let seed = test_seed();
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "catchup";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        let crash = crash_leader_under_load(&cluster, topic, seed).await?;
        let mut ledger = crash.ledger;

        cluster.restart(crash.victim)?;
        cluster.wait_node_ready(crash.victim).await?;
        // Records produced after the restart, through the restarted node, must reach it too.
        let mut client = cluster.log_client(crash.victim);
        produce_acked(
            &mut client,
            &mut ledger,
            topic,
            None,
            "after-restart",
            300,
            50,
            true,
        )
        .await?;

        let description = cluster.describe_topic(topic).await?;
        for partition in &description.partitions {
            let mut replicas = partition.replicas.clone();
            replicas.sort_unstable();
            ensure!(
                replicas == cluster.node_ids(),
                "partition {} has replicas {:?}, expected every node",
                partition.partition,
                partition.replicas
            );
        }
        for partition in 0..PARTITIONS {
            let end = ledger.acked_end(partition);
            let replicas = read_identical_replicas(&cluster, topic, partition, end).await?;
            for (node, records) in &replicas {
                ledger.check_partition(*node, partition, records)?;
            }
            println!(
                "partition {partition}: {} records identical on nodes {:?}",
                replicas[0].1.len(),
                cluster.node_ids()
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// With one of three nodes down produce still acks; with two down it fails within its 5 s
/// deadline with UNAVAILABLE or DEADLINE_EXCEEDED and acks nothing; once both return, every
/// acked record is there and a record refused with UNAVAILABLE is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_needs_a_quorum() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "quorum";
        cluster.create_topic(topic, 1, 3).await?;
        let leader = cluster.leader_of(topic, 0).await?;
        let others: Vec<NodeId> = cluster
            .node_ids()
            .into_iter()
            .filter(|node| *node != leader)
            .collect();
        let (survivor, second) = (others[0], others[1]);
        let mut ledger = Ledger::default();
        let mut client = cluster.log_client(survivor);
        produce_acked(
            &mut client,
            &mut ledger,
            topic,
            None,
            "all-up",
            100,
            50,
            true,
        )
        .await?;

        // One node down: the leader, stopped cleanly with SIGTERM.
        let status = cluster.stop(leader).await?;
        ensure!(
            status.success(),
            "node {leader} exited with {status} on SIGTERM"
        );
        let before = ledger.acked_count();
        produce_acked(
            &mut client,
            &mut ledger,
            topic,
            None,
            "one-down",
            100,
            50,
            true,
        )
        .await?;
        ensure!(ledger.acked_count() == before + 100);

        // Two nodes down: the survivor alone is no quorum.
        cluster.kill(second)?;
        let records = unique_records("two-down", 0, 10, true);
        let produce = produce_once(
            &mut client,
            &mut ledger,
            topic,
            Some(0),
            records,
            QUORUM_LOSS_DEADLINE,
        );
        // The client enforces the deadline too; the outer bound only guards against a hang in
        // the client itself.
        let outcome = timeout(QUORUM_LOSS_DEADLINE + Duration::from_secs(10), produce)
            .await
            .context("produce without a quorum outlived its deadline")??;
        match outcome {
            Ok(response) => bail!("produce without a quorum was acked: {response:?}"),
            Err(status) => {
                let code = effective_code(&status);
                ensure!(
                    matches!(code, Code::Unavailable | Code::DeadlineExceeded),
                    "produce without a quorum failed with {code:?} ({}), expected UNAVAILABLE \
                     or DEADLINE_EXCEEDED",
                    status.message()
                );
                println!("without a quorum: {code:?}: {}", status.message());
            }
        }
        ensure!(
            ledger.acked_count() == before + 100,
            "something was acked without a quorum"
        );

        // Both nodes back: acked records are all there; refused ones must not be.
        cluster.restart(leader)?;
        cluster.restart(second)?;
        cluster.wait_ready().await?;
        cluster.leader_of(topic, 0).await?;
        check_everywhere(&cluster, &mut ledger, topic, 1, &cluster.node_ids()).await
    }
    .await;
    cluster.finish(result);
}

/// Each kind of bad input gets its documented status code, and none of them changes anything:
/// the rejected topics do not exist and the good topic holds exactly its acked records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_codes() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "orders";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        cluster.leaders(topic).await?;
        let node = cluster.node_ids()[0];
        let mut admin = cluster.admin_client(node);
        let mut log = cluster.log_client(node);
        let mut ledger = Ledger::default();
        produce_acked(&mut log, &mut ledger, topic, Some(0), "good", 10, 10, false).await?;

        let create = |name: &str, partitions: u32, replication_factor: u32| CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            config: None,
        };
        let produce = |topic: &str, partition: Option<u32>, value: Bytes| ProduceRequest {
            producer: None,
            topic: topic.to_owned(),
            partition,
            records: vec![Record {
                key: None,
                value,
                headers: Vec::new(),
                timestamp_ms: None,
            }],
        };
        let fetch = |topic: &str, partition: u32, offset: u64| FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes: 1024 * 1024,
            max_wait_ms: 0,
        };
        let describe = |name: &str| DescribeTopicRequest {
            name: name.to_owned(),
        };
        let small = Bytes::from_static(b"small");

        // Unknown topic.
        let missing = "no-such-topic";
        expect_code(
            admin.describe_topic(describe(missing)).await,
            &[Code::NotFound],
            "DescribeTopic of an unknown topic",
        )?;
        expect_code(
            admin
                .delete_topic(DeleteTopicRequest {
                    name: missing.to_owned(),
                })
                .await,
            &[Code::NotFound],
            "DeleteTopic of an unknown topic",
        )?;
        expect_code(
            log.produce(produce(missing, None, small.clone())).await,
            &[Code::NotFound],
            "Produce to an unknown topic",
        )?;
        expect_code(
            log.fetch(fetch(missing, 0, 0)).await,
            &[Code::NotFound],
            "Fetch from an unknown topic",
        )?;

        // Invalid topics.
        let long_name = "a".repeat(300);
        for name in ["bad name!", "", long_name.as_str()] {
            expect_code(
                admin.create_topic(create(name, 1, 1)).await,
                &[Code::InvalidArgument],
                &format!("CreateTopic named {name:?}"),
            )?;
        }
        expect_code(
            admin.create_topic(create("zero-partitions", 0, 1)).await,
            &[Code::InvalidArgument],
            "CreateTopic with 0 partitions",
        )?;
        expect_code(
            admin.create_topic(create("four-replicas", 1, 4)).await,
            &[Code::FailedPrecondition],
            "CreateTopic with replication factor 4 on 3 nodes",
        )?;
        expect_code(
            admin.create_topic(create(topic, PARTITIONS, 3)).await,
            &[Code::AlreadyExists],
            "CreateTopic of an existing topic",
        )?;
        for name in ["zero-partitions", "four-replicas"] {
            expect_code(
                admin.describe_topic(describe(name)).await,
                &[Code::NotFound],
                &format!("DescribeTopic of the rejected topic {name}"),
            )?;
        }

        // Invalid records and positions.
        let oversized = Bytes::from(vec![b'x'; 1024 * 1024 + 1]);
        expect_code(
            log.produce(produce(topic, Some(0), oversized)).await,
            &[Code::InvalidArgument],
            "Produce of a 1 MiB + 1 byte record",
        )?;
        expect_code(
            log.produce(produce(topic, Some(99), small.clone())).await,
            &[Code::NotFound, Code::InvalidArgument],
            "Produce to partition 99 of a 3-partition topic",
        )?;
        expect_code(
            log.fetch(fetch(topic, 0, 1_000_000)).await,
            &[Code::OutOfRange],
            "Fetch from offset 1,000,000 of a 10-record partition",
        )?;

        // Past the end through each follower, without waiting: the leader's verdict reaches
        // the caller (OUT_OF_RANGE with the end), not an UNAVAILABLE that a client following
        // the documented contract would retry forever.
        let leader = cluster.leader_of(topic, 0).await?;
        for follower in cluster
            .node_ids()
            .into_iter()
            .filter(|node| *node != leader)
        {
            let status = expect_reason(
                cluster
                    .log_client(follower)
                    .fetch(fetch(topic, 0, 11))
                    .await,
                Code::OutOfRange,
                ordo_proto::errors::reason::OFFSET_OUT_OF_RANGE,
                &format!("Fetch past the end through follower {follower}"),
            )?;
            let end = status
                .get_details_error_info()
                .and_then(|info| info.metadata.get("end_offset").cloned());
            ensure!(
                end.as_deref() == Some("10"),
                "follower {follower} answered OUT_OF_RANGE with end {end:?}, expected 10"
            );
        }

        // Bytes that do not decode as the method's message: INVALID_ARGUMENT with a reason,
        // as docs/errors.md promises for every failure.
        let garbage = Bytes::from_static(&[0xff, 0xff, 0xff]);
        for path in ["/ordo.v1.Log/Produce", "/ordo.v1.Admin/CreateTopic"] {
            expect_reason(
                raw_unary(cluster.channel(node), path, garbage.clone()).await,
                Code::InvalidArgument,
                ordo_proto::errors::reason::MALFORMED_MESSAGE,
                &format!("{path} of undecodable bytes"),
            )?;
        }

        // A forged node-to-node append: its batch claims more records than it holds (which
        // would shift every later offset), or does not decode at all. The partition's leader
        // refuses both before proposing.
        let mut internal =
            ordo_proto::internal::internal_client::InternalClient::new(cluster.channel(leader));
        // Topic ids start at 1 and this is the cluster's first topic; partition ids take the
        // low 20 bits of a group id.
        let group = 1u64 << 20;
        let one_record = {
            // postcard: a sequence of 1 record: no key, value "v", no headers, timestamp 0.
            Bytes::from_static(&[1, 0, 1, b'v', 0, 0])
        };
        for (count, batch, what) in [
            (5, one_record.clone(), "a batch of 1 record claiming 5"),
            (1, Bytes::from_static(&[9, 9, 9]), "an undecodable batch"),
            (0, Bytes::new(), "an empty batch"),
        ] {
            expect_code(
                internal
                    .forward_produce(ordo_proto::internal::ForwardProduceRequest {
                        producer: None,
                        group,
                        batch,
                        count,
                    })
                    .await,
                &[Code::InvalidArgument],
                &format!("ForwardProduce of {what}"),
            )?;
        }

        // The rejected produces wrote nothing: partition 0 holds the ten good records only.
        check_everywhere(
            &cluster,
            &mut ledger,
            topic,
            PARTITIONS,
            &cluster.node_ids(),
        )
        .await?;
        for node in cluster.node_ids() {
            let records = cluster.read_replica(node, topic, 0, 10).await?;
            ensure!(
                records.len() == 10,
                "node {node} holds {} records",
                records.len()
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Every node answers the standard grpc.health.v1 Check with SERVING, and its ClusterStatus
/// names itself and all three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reports_serving() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        for node in cluster.node_ids() {
            let mut health = HealthClient::new(cluster.channel(node));
            let request = HealthCheckRequest {
                service: String::new(),
            };
            let response = health
                .check(with_timeout(request, Duration::from_secs(5)))
                .await
                .with_context(|| format!("health check of node {node}"))?
                .into_inner();
            ensure!(
                response.status() == ServingStatus::Serving,
                "node {node} reports {:?}",
                response.status()
            );

            let status = cluster
                .admin_client(node)
                .cluster_status(ClusterStatusRequest {})
                .await
                .with_context(|| format!("cluster status of node {node}"))?
                .into_inner();
            ensure!(
                status.answered_by == node,
                "node {node} answered as {}",
                status.answered_by
            );
            let mut members: Vec<NodeId> = status.nodes.iter().map(|n| n.node_id).collect();
            members.sort_unstable();
            ensure!(
                members == cluster.node_ids(),
                "node {node} sees nodes {members:?}"
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Reads every partition of `topic` from each of `nodes`, as a consumer of that node and from
/// its own replica, and checks every read against the ledger (and so against every other read).
async fn check_everywhere(
    cluster: &TestCluster,
    ledger: &mut Ledger,
    topic: &str,
    partitions: u32,
    nodes: &[NodeId],
) -> Result<()> {
    for partition in 0..partitions {
        let end = ledger.acked_end(partition);
        for &node in nodes {
            let records = cluster.read_partition(node, topic, partition, end).await?;
            ledger.check_partition(node, partition, &records)?;
            let records = cluster.read_replica(node, topic, partition, end).await?;
            ledger.check_partition(node, partition, &records)?;
        }
    }
    Ok(())
}

/// What [`crash_leader_under_load`] did.
struct Crash {
    /// The node that led partition 0 and was killed.
    victim: NodeId,
    /// The other nodes, through which the load was sent.
    survivors: Vec<NodeId>,
    /// Every record the load sent and how each call ended.
    ledger: Ledger,
}

/// Runs [`LOAD_PRODUCERS`] concurrent producers through the nodes that do not lead partition 0
/// (half their calls to partition 0), SIGKILLs partition 0's leader once [`KILL_AFTER_ACKS`]
/// records are acked, lets the load finish, waits for a new leader and proves it takes writes.
async fn crash_leader_under_load(cluster: &TestCluster, topic: &str, seed: u64) -> Result<Crash> {
    let victim = cluster.leader_of(topic, 0).await?;
    let survivors: Vec<NodeId> = cluster
        .node_ids()
        .into_iter()
        .filter(|node| *node != victim)
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::with_capacity(LOAD_PRODUCERS);
    for producer in 0..LOAD_PRODUCERS {
        let mut client = cluster.log_client(survivors[producer % survivors.len()]);
        let acked = Arc::clone(&acked);
        let topic = topic.to_owned();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(producer as u64));
        producers.push(tokio::spawn(async move {
            let mut ledger = Ledger::default();
            let deadline = Instant::now() + LOAD_TIMEOUT;
            for call in 0..LOAD_CALLS {
                if Instant::now() >= deadline {
                    break;
                }
                let partition = if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random_range(1..PARTITIONS)
                };
                let prefix = format!("load-p{producer}-c{call}");
                let records = unique_records(&prefix, 0, LOAD_BATCH, true);
                let outcome = produce_once(
                    &mut client,
                    &mut ledger,
                    &topic,
                    Some(partition),
                    records,
                    LOAD_CALL_TIMEOUT,
                )
                .await?;
                match outcome {
                    Ok(_) => {
                        acked.fetch_add(LOAD_BATCH, Ordering::Relaxed);
                    }
                    // Expected while partition 0 has no leader; back off a little.
                    Err(_) => sleep(Duration::from_millis(100)).await,
                }
            }
            anyhow::Ok(ledger)
        }));
    }

    let deadline = Instant::now() + LOAD_TIMEOUT;
    while acked.load(Ordering::Relaxed) < KILL_AFTER_ACKS {
        ensure!(
            Instant::now() < deadline,
            "the load got only {} acks within {LOAD_TIMEOUT:?}",
            acked.load(Ordering::Relaxed)
        );
        sleep(Duration::from_millis(20)).await;
    }
    let running = producers.iter().filter(|p| !p.is_finished()).count();
    cluster.kill(victim)?;
    println!(
        "killed node {victim}, leader of {topic}/0, after {} acks with {running} producers \
         running",
        acked.load(Ordering::Relaxed)
    );
    ensure!(
        running > 0,
        "the load ended before the crash; raise LOAD_CALLS"
    );

    let mut ledger = Ledger::default();
    for producer in producers {
        let joined = timeout(LOAD_TIMEOUT + Duration::from_secs(30), producer)
            .await
            .context("a load producer outlived its deadline")?;
        ledger.merge(joined.context("a load producer panicked")??)?;
    }
    let new_leader = cluster.wait_for_leader_change(topic, 0, victim).await?;
    // Writes to partition 0 work again under its new leader.
    let mut client = cluster.log_client(survivors[0]);
    produce_acked(
        &mut client,
        &mut ledger,
        topic,
        Some(0),
        "after-crash",
        50,
        50,
        true,
    )
    .await?;
    println!(
        "new leader of {topic}/0: node {new_leader}; acked {}, unknown {}, refused {}",
        ledger.acked_count(),
        ledger.unknown_count(),
        ledger.not_written_count()
    );
    Ok(Crash {
        victim,
        survivors,
        ledger,
    })
}

/// Reads one partition from every node until all report the same length, at least `end_min`,
/// then fails unless every replica holds byte-identical records (offset, key, value, headers,
/// timestamp) at every offset. Returns each node's copy.
async fn read_identical_replicas(
    cluster: &TestCluster,
    topic: &str,
    partition: u32,
    end_min: u64,
) -> Result<Vec<(NodeId, Vec<StoredRecord>)>> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut end = end_min;
    loop {
        let mut replicas = Vec::new();
        for node in cluster.node_ids() {
            let records = cluster.read_replica(node, topic, partition, end).await?;
            replicas.push((node, records));
        }
        let longest = replicas.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
        if replicas.iter().all(|(_, records)| records.len() == longest) {
            let (first_node, first) = &replicas[0];
            for (node, records) in &replicas[1..] {
                if let Some(offset) = (0..longest).find(|&i| records[i] != first[i]) {
                    bail!(
                        "{topic}/{partition} offset {offset}: node {first_node} holds {:?} but \
                         node {node} holds {:?}",
                        first[offset],
                        records[offset]
                    );
                }
            }
            return Ok(replicas);
        }
        let lengths: Vec<(NodeId, usize)> = replicas
            .iter()
            .map(|(node, records)| (*node, records.len()))
            .collect();
        ensure!(
            Instant::now() < deadline,
            "{topic}/{partition}: replicas did not converge within {READ_TIMEOUT:?}: {lengths:?}"
        );
        end = longest as u64;
    }
}
