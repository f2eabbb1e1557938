//! Compaction by key against a real cluster: after N versions of K keys and tombstones, every
//! replica holds exactly the latest record of each live key at its original offset; tombstones
//! go after delete.retention.ms; records without a key are refused; a compaction survives
//! kill -9 of its follower and of its leader; and a wiped replica catches up with the compacted
//! records by snapshot.

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::Result;
use anyhow::bail;
use anyhow::ensure;
use bytes::Bytes;
use ordo_proto::v1::FetchRequest;
use ordo_proto::v1::ProduceRequest;
use ordo_proto::v1::Record;
use ordo_proto::v1::log_client::LogClient;
use ordo_tests::NodeId;
use ordo_tests::TestCluster;
use ordo_tests::with_timeout;
use tokio::time::sleep;
use tonic::Code;
use tonic::transport::Channel;

/// Short checks, compaction from the first dirty byte in 64 KiB chunks at `bytes_per_sec`,
/// small journal files.
fn config(bytes_per_sec: u64) -> String {
    format!(
        "\
[retention]
check_interval_ms = 200
compaction_dirty_bytes_min = 1
compaction_chunk_bytes = 65536
compaction_bytes_per_sec = {bytes_per_sec}

[raft]
compact_interval_ms = 200
state_purge_interval_ms = 1000

[storage]
journal_file_bytes = 1048576
journal_replay_bytes_max = 1048576
"
    )
}

/// How long compaction may take to reach every replica.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Bytes of each test record's value.
const VALUE_BYTES: usize = 500;

/// What a replica holds: offset to (key, value).
type Held = BTreeMap<u64, (Option<Bytes>, Bytes)>;

fn value(key: usize, version: usize) -> Bytes {
    let mut value = format!("key{key}-v{version}-").into_bytes();
    value.resize(VALUE_BYTES, b'.');
    Bytes::from(value)
}

fn keyed(key: &str, value: Bytes) -> Record {
    Record {
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        value,
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

/// Produces `records` to partition 0 of `topic` in one call, retried while the cluster is
/// unavailable (a node was just killed); returns the offset of each, in order.
async fn produce(
    client: &mut LogClient<Channel>,
    topic: &str,
    records: Vec<Record>,
) -> Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = ProduceRequest {
            topic: topic.to_owned(),
            partition: Some(0),
            records: records.clone(),
            producer: None,
        };
        match client
            .produce(with_timeout(request, Duration::from_secs(10)))
            .await
        {
            Ok(response) => {
                return Ok(response
                    .into_inner()
                    .acks
                    .iter()
                    .map(|ack| ack.offset)
                    .collect());
            }
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                    && Instant::now() < deadline =>
            {
                sleep(Duration::from_millis(200)).await;
            }
            Err(status) => bail!("produce to {topic}: {status}"),
        }
    }
}

/// Writes `versions` versions of keys `0..keys` (one call per version), then a tombstone for
/// each key in `tombstoned`, then one record of key `end-{round}` (the last entry, which
/// compaction leaves to grow: its key is new, so it supersedes nothing). Returns what every replica must end with: the latest record of each key,
/// tombstones included (`expire_tombstones` drops them), at their offsets.
async fn write_versions(
    log: &mut LogClient<Channel>,
    topic: &str,
    keys: usize,
    versions: usize,
    tombstoned: std::ops::Range<usize>,
    round: &str,
) -> Result<(Held, Vec<u64>)> {
    let mut latest: BTreeMap<String, (u64, Bytes)> = BTreeMap::new();
    for version in 0..versions {
        let records: Vec<Record> = (0..keys)
            .map(|key| keyed(&format!("key{key}"), value(key, version)))
            .collect();
        let offsets = produce(log, topic, records.clone()).await?;
        ensure!(offsets.len() == keys, "one ack per record");
        for (record, offset) in records.into_iter().zip(offsets) {
            let key = String::from_utf8(record.key.unwrap_or_default().to_vec())?;
            latest.insert(key, (offset, record.value));
        }
    }
    let tombstones: Vec<Record> = tombstoned
        .clone()
        .map(|key| keyed(&format!("key{key}"), Bytes::new()))
        .collect();
    let mut tombstone_offsets = Vec::new();
    if !tombstones.is_empty() {
        let offsets = produce(log, topic, tombstones.clone()).await?;
        for (record, offset) in tombstones.into_iter().zip(offsets) {
            let key = String::from_utf8(record.key.unwrap_or_default().to_vec())?;
            latest.insert(key, (offset, Bytes::new()));
            tombstone_offsets.push(offset);
        }
    }
    let end = format!("end-{round}");
    let tail = produce(log, topic, vec![keyed(&end, Bytes::from_static(b"end"))]).await?;
    latest.insert(end, (tail[0], Bytes::from_static(b"end")));
    let held = latest
        .into_iter()
        .map(|(key, (offset, value))| (offset, (Some(Bytes::from(key)), value)))
        .collect();
    Ok((held, tombstone_offsets))
}

/// Every record one node's own replica of partition 0 holds, from offset 0 to its high
/// watermark, following the offsets compaction skips.
async fn read_replica(cluster: &TestCluster, node: NodeId, topic: &str) -> Result<Held> {
    let mut log = cluster.log_client(node);
    let mut held = Held::new();
    let mut next = 0u64;
    let mut empty_reads = 0;
    loop {
        let request = FetchRequest {
            topic: topic.to_owned(),
            partition: 0,
            offset: next,
            max_bytes: 256 * 1024,
            max_wait_ms: 0,
        };
        let mut request = with_timeout(request, Duration::from_secs(10));
        ordo_tests::this_replica(&mut request);
        let response = log
            .fetch(request)
            .await
            .with_context(|| format!("fetch {next} from node {node}"))?
            .into_inner();
        if next >= response.high_watermark {
            return Ok(held);
        }
        let mut progressed = false;
        for record in response.records {
            if record.offset < next {
                continue;
            }
            ensure!(
                record.offset < response.high_watermark,
                "record {} at or past the high watermark {}",
                record.offset,
                response.high_watermark
            );
            next = record.offset + 1;
            progressed = true;
            held.insert(record.offset, (record.key, record.value));
        }
        if !progressed {
            // Below the high watermark a read returns records: compacted-away offsets are
            // skipped, never answered empty (a consumer would spin).
            empty_reads += 1;
            ensure!(
                empty_reads < 20,
                "node {node} answers no record at {next} below its high watermark {}",
                response.high_watermark
            );
            sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until every running node's replica holds exactly `expected`.
async fn settled(cluster: &TestCluster, topic: &str, expected: &Held) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut last = String::new();
        let mut all = true;
        for node in cluster.running_nodes() {
            match read_replica(cluster, node, topic).await {
                Ok(held) if &held == expected => {}
                Ok(held) => {
                    all = false;
                    let extra: Vec<u64> = held
                        .keys()
                        .filter(|offset| !expected.contains_key(offset))
                        .take(5)
                        .copied()
                        .collect();
                    let missing: Vec<u64> = expected
                        .keys()
                        .filter(|offset| !held.contains_key(offset))
                        .take(5)
                        .copied()
                        .collect();
                    last = format!(
                        "node {node} holds {} records (expected {}), extra {extra:?}, missing {missing:?}",
                        held.len(),
                        expected.len()
                    );
                }
                Err(error) => {
                    all = false;
                    last = format!("node {node}: {error:#}");
                }
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "replicas did not settle within {SETTLE_TIMEOUT:?}: {last}\n{}",
                cluster.all_log_tails()
            );
        }
        sleep(Duration::from_millis(300)).await;
    }
}

fn without_tombstones(held: &Held) -> Held {
    held.iter()
        .filter(|(_, (_, value))| !value.is_empty())
        .map(|(offset, record)| (*offset, record.clone()))
        .collect()
}

/// N versions of K keys and tombstones: every replica ends with exactly the latest value of
/// each live key at its original offset; the tombstones are read until delete.retention.ms
/// passed, then go; the partition shrinks; a record without a key is refused.
#[tokio::test]
async fn compaction_keeps_the_latest_record_of_each_key_on_every_replica() {
    let cluster = TestCluster::start_ready_with_config(3, &config(4 << 20))
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        // Bad values are refused, naming the key.
        let refused = client
            .create_topic_with_config(
                "bad",
                1,
                3,
                &[("min.cleanable.dirty.ratio".into(), "2".into())],
            )
            .await
            .expect_err("a ratio over 1 is refused");
        ensure!(
            refused.to_string().contains("min.cleanable.dirty.ratio"),
            "{refused}"
        );
        client
            .create_topic_with_config(
                "table",
                1,
                3,
                &[
                    ("cleanup.policy".into(), "compact".into()),
                    ("delete.retention.ms".into(), "4000".into()),
                    ("min.cleanable.dirty.ratio".into(), "0".into()),
                ],
            )
            .await?;
        let mut log = cluster.log_client(cluster.leader_of("table", 0).await?);
        // A record without a key has nothing to be compacted by.
        let status = log
            .produce(with_timeout(
                ProduceRequest {
                    topic: "table".into(),
                    partition: Some(0),
                    records: vec![Record {
                        key: None,
                        value: Bytes::from_static(b"keyless"),
                        headers: Vec::new(),
                        timestamp_ms: None,
                    }],
                    producer: None,
                },
                Duration::from_secs(5),
            ))
            .await
            .expect_err("a keyless record is refused");
        ensure!(status.code() == Code::InvalidArgument, "{status:?}");
        let info = tonic_types::StatusExt::get_error_details(&status)
            .error_info()
            .cloned()
            .context("INVALID_ARGUMENT carries ErrorInfo")?;
        ensure!(info.reason == "KEY_REQUIRED", "{info:?}");
        // 40 keys, 25 versions each (500 KB), then tombstones for 10 of them.
        let (expected, tombstones) = write_versions(&mut log, "table", 40, 25, 0..10, "a").await?;
        ensure!(tombstones.len() == 10);
        // 1,000 records of about VALUE_BYTES were written.
        let written = (40 * 25 * VALUE_BYTES) as u64;
        // Whether the tombstones are still read depends on the clock; once they went, every
        // replica holds the 30 live keys and the end.
        let live = without_tombstones(&expected);
        ensure!(live.len() == 31, "30 live keys and the end");
        settled(&cluster, "table", &live).await?;
        let kept = client.describe_topic("table").await?.partitions[0].bytes;
        eprintln!("partition bytes: about {written} written, {kept} after compaction");
        ensure!(
            kept < written / 10,
            "compaction keeps about 1/25 of the bytes: {kept} of {written}"
        );
        // New versions compact over the old ones; a key written after its tombstone is back.
        let mut log = cluster.log_client(cluster.leader_of("table", 0).await?);
        let (newer, _) = write_versions(&mut log, "table", 12, 3, 0..0, "b").await?;
        let mut expected = live;
        for (offset, (key, value)) in newer {
            expected.retain(|_, (held_key, _)| held_key != &key);
            expected.insert(offset, (key, value));
        }
        settled(&cluster, "table", &expected).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// kill -9 of a follower and then of the leader while a compaction runs, and a replica whose
/// data directory was deleted: every replica ends with the same compacted records, and nothing
/// acked that compaction keeps is lost.
#[tokio::test]
async fn compaction_survives_kill_and_a_wiped_replica_catches_up() {
    // Slowed to 128 KiB/s so that compaction is running when nodes are killed.
    let cluster = TestCluster::start_ready_with_config(3, &config(128 << 10))
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client
            .create_topic_with_config(
                "killed",
                1,
                3,
                &[
                    ("cleanup.policy".into(), "compact".into()),
                    ("min.cleanable.dirty.ratio".into(), "0".into()),
                ],
            )
            .await?;
        let leader = cluster.leader_of("killed", 0).await?;
        let mut log = cluster.log_client(leader);
        // 2 MB: at 128 KiB/s compaction runs for about 15 s. Tombstones stay a day.
        let (expected, _) = write_versions(&mut log, "killed", 100, 40, 90..100, "a").await?;
        sleep(Duration::from_secs(2)).await;
        let before_kills = client.describe_topic("killed").await?.partitions[0].bytes;
        let follower = cluster
            .node_ids()
            .into_iter()
            .find(|node| *node != leader)
            .context("a follower")?;
        cluster.kill(follower)?;
        sleep(Duration::from_secs(1)).await;
        cluster.restart(follower)?;
        cluster.wait_node_ready(follower).await?;
        sleep(Duration::from_secs(1)).await;
        cluster.kill(leader)?;
        sleep(Duration::from_secs(2)).await;
        cluster.restart(leader)?;
        cluster.wait_node_ready(leader).await?;
        settled(&cluster, "killed", &expected).await?;
        let compacted = client.describe_topic("killed").await?.partitions[0].bytes;
        eprintln!("partition bytes: {before_kills} when the kills began, {compacted} compacted");
        ensure!(
            before_kills > 2 * compacted,
            "the kills hit a compaction in progress ({before_kills} bytes then, {compacted} after)"
        );
        // Wiped: the data directory is gone; the compacted log was purged, so it needs a
        // snapshot with the compacted records.
        let wiped = follower;
        eprintln!("wiping node {wiped}");
        cluster.stop(wiped).await?;
        let data_dir = cluster.data_dir(wiped);
        std::fs::remove_dir_all(&data_dir)?;
        std::fs::create_dir_all(&data_dir)?;
        let mut log = cluster.log_client(cluster.leader_of("killed", 0).await?);
        let (newer, _) = write_versions(&mut log, "killed", 5, 1, 0..0, "b").await?;
        let mut expected = expected;
        for (offset, (key, value)) in newer {
            expected.retain(|_, (held_key, _)| held_key != &key);
            expected.insert(offset, (key, value));
        }
        cluster.restart(wiped)?;
        cluster.wait_node_ready(wiped).await?;
        settled(&cluster, "killed", &expected).await?;
        ensure!(
            std::fs::read_to_string(cluster.log_path(wiped))?
                .contains("partition snapshot installed"),
            "node {wiped} caught up by a snapshot"
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}
