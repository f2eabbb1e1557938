//! Retention and compaction under faults: two side topics beside the main one, written by one
//! producer of their own through random nodes while the nemesis works.
//!
//! - `chaos-retained` keeps at most [`RETAINED_BYTES`] per partition (`retention.bytes`): its
//!   log start moves all run long, so trims, log purges, journal file deletions and snapshot
//!   transfers to replicas that were down or cut off happen under faults.
//! - `chaos-compacted` (`cleanup.policy=compact`, tombstones kept 5 s) gets many versions of a
//!   few keys, and now and then a tombstone: compactions and tombstone expiry run under faults.
//!
//! After healing every replica's own copy is read from its log start, following the offsets
//! compaction skipped, and logged; the checker (`checker.rs`, `check_cleanup`) holds them to:
//! replicas identical; every acked record at or past the retained topic's start present at its
//! offset; for every key of the compacted topic, a record at or past its latest acked offset
//! (or nothing, when that was a tombstone); every acked record still held is what was acked.
//! Calls are made once (no retries): a failed call's records may or may not be there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use ordo_proto::v1::{DescribeTopicRequest, FetchRequest, ProduceRequest, Record, TopicConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep, timeout};
use tonic::Code;
use tonic_types::StatusExt;

use super::history::{Event, History, Read, Sent};
use super::nodes::Nodes;
use super::workload::Shared;
use crate::with_timeout;

/// The topic with a short retention.
pub const RETAINED_TOPIC: &str = "chaos-retained";
/// The topic compacted by key.
pub const COMPACTED_TOPIC: &str = "chaos-compacted";
/// `retention.bytes` of the retained topic, per partition.
const RETAINED_BYTES: u64 = 262_144;
/// Bytes of a retained record's value.
const RETAINED_VALUE_BYTES: usize = 1024;
/// Distinct keys of the compacted topic (per partition: the partition is chosen, not hashed).
const COMPACTED_KEYS: u32 = 24;
/// Bytes of a compacted record's value.
const COMPACTED_VALUE_BYTES: usize = 256;
/// Node settings the side topics need to see cleanup within a short run (`ORDO_*` variables).
pub const NODE_ENV: [(&str, &str); 4] = [
    ("ORDO_RETENTION__CHECK_INTERVAL_MS", "1000"),
    ("ORDO_RETENTION__COMPACTION_DIRTY_BYTES_MIN", "65536"),
    ("ORDO_RETENTION__COMPACTION_CHUNK_BYTES", "262144"),
    ("ORDO_RAFT__COMPACT_INTERVAL_MS", "1000"),
];
/// `grpc-timeout` of each call.
const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// How long reading one replica after healing may take.
const REPLICA_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds of reading every replica until all hold the same.
const CONVERGE_ROUNDS: usize = 8;

/// Creates both side topics with `partitions` partitions each.
pub async fn create_topics(nodes: &Nodes, partitions: u32) -> Result<()> {
    let configs = [
        (
            RETAINED_TOPIC,
            vec![("retention.bytes", RETAINED_BYTES.to_string())],
        ),
        (
            COMPACTED_TOPIC,
            vec![
                ("cleanup.policy", "compact".to_owned()),
                ("min.cleanable.dirty.ratio", "0.3".to_owned()),
                ("delete.retention.ms", "5000".to_owned()),
            ],
        ),
    ];
    for (topic, config) in configs {
        let config = TopicConfig {
            entries: config
                .iter()
                .map(|(key, value)| ((*key).to_owned(), value.clone()))
                .collect(),
        };
        super::create_named_topic(nodes, topic, partitions, Some(config)).await?;
    }
    Ok(())
}

fn padded(text: String, bytes: usize) -> String {
    let mut text = text;
    while text.len() < bytes {
        text.push('.');
    }
    text
}

/// Writes both side topics through random nodes until `stop_producing`; returns the calls made.
pub async fn producer(shared: Arc<Shared>, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut calls = 0u64;
    while !shared.stop_producing.load(Ordering::Relaxed) {
        calls += 1;
        let retained = rng.random_bool(0.5);
        let topic = if retained {
            RETAINED_TOPIC
        } else {
            COMPACTED_TOPIC
        };
        let partition = rng.random_range(0..shared.partitions);
        let count = rng.random_range(1..=4);
        let sent: Vec<Sent> = (0..count)
            .map(|i| {
                if retained {
                    Sent {
                        key: None,
                        value: padded(format!("r-{calls}-{i}-"), RETAINED_VALUE_BYTES),
                    }
                } else {
                    let key = Some(format!("c{}", rng.random_range(0..COMPACTED_KEYS)));
                    if rng.random_bool(0.05) {
                        // A tombstone: deletes the key.
                        Sent {
                            key,
                            value: String::new(),
                        }
                    } else {
                        Sent {
                            key,
                            value: padded(format!("c-{calls}-{i}-"), COMPACTED_VALUE_BYTES),
                        }
                    }
                }
            })
            .collect();
        shared.history.log(Event::CleanupSent {
            topic: topic.to_owned(),
            partition,
            records: sent.clone(),
        });
        let request = ProduceRequest {
            topic: topic.to_owned(),
            partition: Some(partition),
            records: sent
                .iter()
                .map(|sent| Record {
                    key: sent.key.clone().map(Bytes::from),
                    value: Bytes::from(sent.value.clone()),
                    headers: Vec::new(),
                    timestamp_ms: None,
                })
                .collect(),
            producer: None,
        };
        let index = rng.random_range(0..shared.nodes.len());
        let mut client = shared.nodes.log_client(index);
        let answer = timeout(
            CALL_DEADLINE + Duration::from_secs(1),
            client.produce(with_timeout(request, CALL_DEADLINE)),
        )
        .await;
        match answer {
            Ok(Ok(response)) => {
                let acks = response.into_inner().acks;
                shared.history.log(Event::CleanupAcked {
                    topic: topic.to_owned(),
                    partition,
                    records: acks
                        .iter()
                        .zip(sent)
                        .map(|(ack, sent)| Read {
                            offset: ack.offset,
                            key: sent.key,
                            value: sent.value,
                        })
                        .collect(),
                });
            }
            _ => sleep(Duration::from_millis(rng.random_range(50..200))).await,
        }
        sleep(Duration::from_millis(rng.random_range(5..25))).await;
    }
    calls
}

/// The replicas and the high watermark of a side topic's partition, as any node describes it.
async fn describe(nodes: &Nodes, topic: &str, partition: u32) -> Result<(Vec<u64>, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        for index in 0..nodes.len() {
            let request = DescribeTopicRequest {
                name: topic.to_owned(),
            };
            match nodes
                .admin_client(index)
                .describe_topic(with_timeout(request, Duration::from_secs(3)))
                .await
            {
                Ok(response) => {
                    if let Some(description) = response
                        .into_inner()
                        .topic
                        .unwrap_or_default()
                        .partitions
                        .into_iter()
                        .find(|description| description.partition == partition)
                        && description.leader.is_some()
                    {
                        return Ok((description.replicas, description.high_watermark));
                    }
                }
                Err(status) => last = status.to_string(),
            }
        }
        sleep(Duration::from_millis(300)).await;
    }
    Err(anyhow!(
        "no node described {topic} partition {partition} with a leader: {last}"
    ))
}

/// One replica's own copy of a partition: its log start and every record from there to `end`
/// (at least), following the offsets compaction skipped.
async fn read_replica(
    nodes: &Nodes,
    index: usize,
    topic: &str,
    partition: u32,
    end: u64,
) -> Result<(u64, Vec<Read>)> {
    let mut client = nodes.log_client(index);
    let mut start = 0u64;
    let mut next = 0u64;
    let mut records = Vec::new();
    loop {
        let request = FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset: next,
            max_bytes: 256 * 1024,
            max_wait_ms: 200,
        };
        let mut request = with_timeout(request, Duration::from_secs(3));
        crate::this_replica(&mut request);
        match client.fetch(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if records.is_empty() {
                    start = start.max(response.log_start_offset);
                }
                for record in response.records {
                    if record.offset < next {
                        continue;
                    }
                    next = record.offset + 1;
                    records.push(Read {
                        offset: record.offset,
                        key: record
                            .key
                            .map(|key| String::from_utf8_lossy(&key).into_owned()),
                        value: String::from_utf8_lossy(&record.value).into_owned(),
                    });
                }
                if next >= end && response.high_watermark >= end {
                    return Ok((start, records));
                }
            }
            Err(status) if status.code() == Code::OutOfRange => {
                // The start moved (retention): read again from it.
                let moved = status
                    .get_details_error_info()
                    .and_then(|info| info.metadata.get("start_offset")?.parse().ok())
                    .ok_or_else(|| anyhow!("OUT_OF_RANGE without start_offset: {status}"))?;
                start = moved;
                next = moved;
                records.clear();
            }
            Err(status) => {
                if status.code() != Code::Unavailable {
                    bail!("fetch {next}: {status}");
                }
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads every replica of every partition of both side topics until they agree (or the rounds
/// run out), and logs the copies.
pub async fn read_final(nodes: &Nodes, history: &History, partitions: u32) {
    for topic in [RETAINED_TOPIC, COMPACTED_TOPIC] {
        for partition in 0..partitions {
            let mut copies: Vec<(u64, std::result::Result<(u64, Vec<Read>), String>)> = Vec::new();
            for _round in 0..CONVERGE_ROUNDS {
                copies.clear();
                let (replicas, end) = match describe(nodes, topic, partition).await {
                    Ok(described) => described,
                    Err(error) => {
                        copies.push((0, Err(format!("{error:#}"))));
                        break;
                    }
                };
                for node in replicas {
                    let Some(index) = nodes.index_of(node) else {
                        copies.push((node, Err(format!("node {node} is not in the cluster"))));
                        continue;
                    };
                    let read = timeout(
                        REPLICA_READ_TIMEOUT,
                        read_replica(nodes, index, topic, partition, end),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow!(
                            "its replica did not reach offset {end} within {REPLICA_READ_TIMEOUT:?}"
                        ))
                    })
                    .map_err(|error| format!("{error:#}"));
                    copies.push((node, read));
                }
                let first = copies.first().and_then(|(_, copy)| copy.as_ref().ok());
                if first.is_some() && copies.iter().all(|(_, copy)| copy.as_ref().ok() == first) {
                    break;
                }
                // Retention or compaction still moving on some replica.
                sleep(Duration::from_secs(1)).await;
            }
            for (node, copy) in copies {
                match copy {
                    Ok((start, records)) => history.log(Event::CleanupReplica {
                        topic: topic.to_owned(),
                        partition,
                        node,
                        start,
                        records,
                    }),
                    Err(error) => history.log(Event::CleanupReplicaFail {
                        topic: topic.to_owned(),
                        partition,
                        node,
                        error,
                    }),
                }
            }
        }
    }
}
