//! Retention against a real cluster: trims by bytes and by time on every replica, OUT_OF_RANGE
//! below the start, disk space returned, a config changed online, and replicas that catch up
//! by snapshot transfer (behind the trim, and wiped).
//!
//! The nodes run with short retention checks and 1 MiB journal files, so what retention drops
//! is deleted within a second or two.

use std::collections::BTreeMap;
use std::path::Path;
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
use ordo_proto::v1::StoredRecord;
use ordo_proto::v1::log_client::LogClient;
use ordo_tests::NodeId;
use ordo_tests::Source;
use ordo_tests::TestCluster;
use ordo_tests::read_partition_from;
use ordo_tests::with_timeout;
use tokio::time::sleep;
use tonic::Code;
use tonic::transport::Channel;

/// Short checks and small journal files, so retention acts within a second or two.
const CONFIG: &str = "\
[retention]
check_interval_ms = 200

[raft]
compact_interval_ms = 200
state_purge_interval_ms = 1000

[storage]
journal_file_bytes = 1048576
journal_replay_bytes_max = 1048576
";

/// How long retention may take to reach every replica.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes of each test record's value.
const VALUE_BYTES: usize = 1000;

/// Produces `count` records of [`VALUE_BYTES`] to partition 0 of `topic`, `batch` per call,
/// each value unique (`{prefix}-{n}` padded); returns what was acked, by offset. A call that
/// fails as UNAVAILABLE or DEADLINE_EXCEEDED is retried with fresh values.
async fn produce(
    client: &mut LogClient<Channel>,
    topic: &str,
    prefix: &str,
    count: usize,
    batch: usize,
) -> Result<BTreeMap<u64, Bytes>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut acked = BTreeMap::new();
    let mut sent = 0usize;
    while acked.len() < count {
        let records: Vec<Record> = (0..batch.min(count - acked.len()))
            .map(|_| {
                sent += 1;
                let mut value = format!("{prefix}-{sent:08}-").into_bytes();
                value.resize(VALUE_BYTES, b'.');
                Record {
                    key: None,
                    value: Bytes::from(value),
                    headers: Vec::new(),
                    timestamp_ms: None,
                }
            })
            .collect();
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
                for (ack, record) in response.into_inner().acks.iter().zip(records) {
                    ensure!(
                        acked.insert(ack.offset, record.value).is_none(),
                        "offset {} acked twice",
                        ack.offset
                    );
                }
            }
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                    && Instant::now() < deadline =>
            {
                sleep(Duration::from_millis(100)).await;
            }
            Err(status) => bail!("produce to {topic}: {status}"),
        }
    }
    Ok(acked)
}

/// Each node's own replica of partition 0: its log start, as a fetch of offset 0 from that
/// replica answers it (`None` while it cannot answer).
async fn replica_start(cluster: &TestCluster, node: NodeId, topic: &str) -> Option<u64> {
    let request = FetchRequest {
        topic: topic.to_owned(),
        partition: 0,
        offset: 0,
        max_bytes: 1,
        max_wait_ms: 0,
    };
    let mut request = with_timeout(request, Duration::from_secs(5));
    ordo_tests::this_replica(&mut request);
    match cluster.log_client(node).fetch(request).await {
        Ok(response) => Some(response.into_inner().log_start_offset),
        Err(status) if status.code() == Code::OutOfRange => {
            let info = tonic_types::StatusExt::get_error_details(&status)
                .error_info()
                .cloned()?;
            info.metadata.get("start_offset")?.parse().ok()
        }
        Err(_) => None,
    }
}

/// Waits until every node's replica of `topic` starts at the same offset, at least `min`;
/// returns it.
async fn settled_start(cluster: &TestCluster, topic: &str, min: u64) -> Result<u64> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut starts = Vec::new();
        for node in cluster.running_nodes() {
            starts.push(replica_start(cluster, node, topic).await);
        }
        if let Some(Some(first)) = starts.first()
            && *first >= min
            && starts.iter().all(|start| *start == Some(*first))
        {
            return Ok(*first);
        }
        if Instant::now() >= deadline {
            bail!(
                "replica starts {starts:?} did not settle at >= {min} within {SETTLE_TIMEOUT:?}\n{}",
                cluster.all_log_tails()
            );
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Bytes of a node's journal files.
fn journal_bytes(data_dir: &Path) -> Result<u64> {
    let dir = data_dir.join("db").join("journal");
    let mut bytes = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        bytes += entry?.metadata()?.len();
    }
    Ok(bytes)
}

/// The ids of a node's journal files, in order.
fn journal_ids(data_dir: &Path) -> Result<Vec<u64>> {
    let dir = data_dir.join("db").join("journal");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|name| name.strip_suffix(".log")) {
            ids.push(
                id.parse::<u64>()
                    .with_context(|| format!("journal file {id}"))?,
            );
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Each node's journal bytes.
fn journal_sizes(cluster: &TestCluster) -> Result<Vec<u64>> {
    cluster
        .node_ids()
        .iter()
        .map(|node| journal_bytes(&cluster.data_dir(*node)))
        .collect()
}

/// Waits until every node's journal holds at most `max` bytes; returns the sizes then.
async fn journals_shrink_to(cluster: &TestCluster, max: u64) -> Result<Vec<u64>> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let now = journal_sizes(cluster)?;
        if now.iter().all(|now| *now <= max) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            bail!("journal bytes {now:?} did not drop to {max}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every node's replica from their common start (at least `start`) and checks each holds
/// exactly `acked` from there: the same records at the same offsets. Retention may move the
/// start while the replicas are read: then the check starts again from the new one.
async fn check_replicas(
    cluster: &TestCluster,
    topic: &str,
    start: u64,
    acked: &BTreeMap<u64, Bytes>,
) -> Result<()> {
    let mut start = start;
    for attempt in 0.. {
        start = settled_start(cluster, topic, start).await?;
        match check_replicas_from(cluster, topic, start, acked).await {
            Err(error) if attempt < 5 && format!("{error:#}").contains("OutOfRange") => {
                sleep(Duration::from_millis(500)).await;
            }
            result => return result,
        }
    }
    unreachable!("the loop returns")
}

async fn check_replicas_from(
    cluster: &TestCluster,
    topic: &str,
    start: u64,
    acked: &BTreeMap<u64, Bytes>,
) -> Result<()> {
    let end = acked.keys().next_back().map_or(0, |last| last + 1);
    for node in cluster.running_nodes() {
        let mut client = cluster.log_client(node);
        let records: Vec<StoredRecord> =
            read_partition_from(&mut client, topic, 0, start, end, Source::ThisReplica)
                .await
                .with_context(|| format!("read node {node}'s replica of {topic}"))?;
        ensure!(
            records.len() as u64 == end - start,
            "node {node} holds {} records from {start}, expected {}",
            records.len(),
            end - start
        );
        for record in &records {
            ensure!(
                acked.get(&record.offset) == Some(&record.value),
                "node {node} offset {}: not the acked record",
                record.offset
            );
        }
    }
    Ok(())
}

/// Retention by bytes trims every replica to the same start, a consumer below it gets
/// OUT_OF_RANGE naming the start, what is kept reads back whole, and the journal shrinks.
#[tokio::test]
async fn retention_by_bytes_trims_every_replica_and_frees_disk() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client
            .create_topic_with_config(
                "sized",
                1,
                3,
                &[("retention.bytes".into(), "1000000".into())],
            )
            .await?;
        let mut log = cluster.log_client(cluster.leader_of("sized", 0).await?);
        let acked = produce(&mut log, "sized", "a", 8_000, 50).await?;
        let peak = journal_sizes(&cluster)?;
        // 8 MB written, 1 MB kept: the leader trims until the partition holds at most that.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let description = loop {
            let description = client.describe_topic("sized").await?;
            if description.partitions[0].bytes <= 1_000_000 {
                break description;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the partition still holds {} bytes",
                    description.partitions[0].bytes
                );
            }
            sleep(Duration::from_millis(200)).await;
        };
        let partition = &description.partitions[0];
        let start = settled_start(&cluster, "sized", partition.log_start_offset).await?;
        eprintln!(
            "start {start}, end {}, bytes {}, journal bytes at the peak {peak:?}",
            partition.high_watermark, partition.bytes
        );
        ensure!(start >= 6_000, "8 MB written, 1 MB kept: start {start}");
        ensure!(
            partition.bytes >= 900_000,
            "the partition holds {} bytes, retention.bytes is 1,000,000: whole entries go, no more",
            partition.bytes
        );
        check_replicas(&cluster, "sized", start, &acked).await?;
        // Below the start: OUT_OF_RANGE with the range.
        let status = log
            .fetch(with_timeout(
                FetchRequest {
                    topic: "sized".into(),
                    partition: 0,
                    offset: start - 1,
                    max_bytes: 0,
                    max_wait_ms: 0,
                },
                Duration::from_secs(5),
            ))
            .await
            .expect_err("a fetch below the start fails");
        ensure!(status.code() == Code::OutOfRange, "{status:?}");
        let info = tonic_types::StatusExt::get_error_details(&status)
            .error_info()
            .cloned()
            .context("OUT_OF_RANGE carries ErrorInfo")?;
        ensure!(info.metadata.get("start_offset") == Some(&start.to_string()));
        // The journal gives the space back: 8 MB were written, and every node keeps at most the
        // files holding the retained 1 MB and the one being appended (1 MiB files).
        let now = journals_shrink_to(&cluster, 5 << 20).await?;
        eprintln!("journal bytes after retention {now:?} (peak {peak:?})");
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A topic that keeps its records (the default seven days), written once beside a topic
/// trimmed all along, pins only the journal files its own records are in: the files between go
/// (deleting only a prefix of the journal kept all 8 MB here), and a node killed and restarted
/// afterwards still holds both topics whole.
#[tokio::test]
async fn a_long_retention_topic_pins_only_its_own_journal_files() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client.create_topic("kept", 1, 3).await?;
        client
            .create_topic_with_config(
                "sized",
                1,
                3,
                &[("retention.bytes".into(), "1000000".into())],
            )
            .await?;
        let mut kept_log = cluster.log_client(cluster.leader_of("kept", 0).await?);
        let kept = produce(&mut kept_log, "kept", "k", 300, 50).await?;
        let mut sized_log = cluster.log_client(cluster.leader_of("sized", 0).await?);
        let sized = produce(&mut sized_log, "sized", "s", 8_000, 50).await?;
        let peak = journal_sizes(&cluster)?;
        // 0.3 MB kept and 1 MB retained of 8.3 MB: the kept topic's file (or two), the retained
        // megabyte's files and the file being appended stay.
        let now = journals_shrink_to(&cluster, 6 << 20).await?;
        eprintln!("journal bytes: peak {peak:?}, after retention {now:?}");
        // Files between the kept topic's and the retained megabyte's went: the ids have a gap.
        for node in cluster.node_ids() {
            let ids = journal_ids(&cluster.data_dir(node))?;
            let (first, last) = (ids.first().copied(), ids.last().copied());
            ensure!(
                first
                    .zip(last)
                    .is_some_and(|(first, last)| last - first + 1 > ids.len() as u64),
                "node {node}'s journal files {ids:?} have no gap"
            );
        }
        let start = settled_start(&cluster, "sized", 6_000).await?;
        check_replicas(&cluster, "kept", 0, &kept).await?;
        check_replicas(&cluster, "sized", start, &sized).await?;
        // The journal has holes now: a restart replays past them and reads everything.
        let node = cluster.node_ids()[0];
        cluster.kill(node)?;
        cluster.restart(node)?;
        cluster.wait_node_ready(node).await?;
        check_replicas(&cluster, "kept", 0, &kept).await?;
        check_replicas(&cluster, "sized", start, &sized).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Retention by time, set online with AlterTopicConfig: records older than retention.ms go
/// from every replica, newer ones stay; bad values are refused.
#[tokio::test]
async fn retention_by_time_set_online() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client.create_topic("timed", 1, 3).await?;
        let mut log = cluster.log_client(cluster.leader_of("timed", 0).await?);
        let old = produce(&mut log, "timed", "old", 300, 30).await?;
        sleep(Duration::from_millis(1_500)).await;
        let error = client
            .alter_topic_config("timed", &[("retention.ms".into(), "0".into())], &[])
            .await
            .expect_err("retention.ms 0 is refused");
        ensure!(
            error.to_string().contains("retention.ms"),
            "the refusal names the key: {error}"
        );
        let altered = client
            .alter_topic_config("timed", &[("retention.ms".into(), "1000".into())], &[])
            .await?;
        ensure!(altered.config.get("retention.ms") == Some(&"1000".to_string()));
        let new = produce(&mut log, "timed", "new", 50, 50).await?;
        // The old records are all older than a second; the new batch is not (for a while).
        let start = settled_start(&cluster, "timed", 300).await?;
        ensure!(start == 300, "start {start}: only the old records go");
        let mut all = old;
        all.extend(new);
        check_replicas(&cluster, "timed", start, &all).await?;
        // Back to the default (7 days): nothing more goes.
        client
            .alter_topic_config("timed", &[], &["retention.ms".into()])
            .await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A node stopped while the others trim past its log end catches up by a snapshot transfer
/// of the retained records; a node whose data directory was deleted catches up from scratch.
/// Both then hold the leader's records at the same offsets.
#[tokio::test]
async fn replicas_behind_the_trim_catch_up_by_snapshot() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client
            .create_topic_with_config(
                "behind",
                1,
                3,
                &[("retention.bytes".into(), "2000000".into())],
            )
            .await?;
        let leader = cluster.leader_of("behind", 0).await?;
        let lagging = cluster
            .node_ids()
            .into_iter()
            .find(|node| *node != leader)
            .context("a follower")?;
        let mut log = cluster.log_client(leader);
        let mut acked = produce(&mut log, "behind", "before", 500, 50).await?;
        cluster.stop(lagging).await?;
        acked.extend(produce(&mut log, "behind", "while-down", 5_000, 50).await?);
        let start = settled_start(&cluster, "behind", 2_000).await?;
        ensure!(start > 500, "the trim passed the stopped node's end");
        // The leader deletes the trimmed entries once its replication to the stopped node is
        // not reading them (openraft retries it every second or so).
        sleep(Duration::from_secs(3)).await;
        cluster.restart(lagging)?;
        cluster.wait_node_ready(lagging).await?;
        let start = settled_start(&cluster, "behind", start).await?;
        check_replicas(&cluster, "behind", start, &acked).await?;
        ensure!(
            cluster
                .log_tail(lagging)
                .contains("partition snapshot installed")
                || std::fs::read_to_string(cluster.log_path(lagging))?
                    .contains("partition snapshot installed"),
            "node {lagging} caught up by a snapshot"
        );
        // Wiped: the data directory is gone.
        let wiped = lagging;
        cluster.stop(wiped).await?;
        let data_dir = cluster.data_dir(wiped);
        std::fs::remove_dir_all(&data_dir)?;
        std::fs::create_dir_all(&data_dir)?;
        acked.extend(produce(&mut log, "behind", "while-wiped", 500, 50).await?);
        cluster.restart(wiped)?;
        cluster.wait_node_ready(wiped).await?;
        let start = settled_start(&cluster, "behind", start).await?;
        check_replicas(&cluster, "behind", start, &acked).await?;
        // And it takes new records like the others.
        acked.extend(produce(&mut log, "behind", "after", 200, 50).await?);
        check_replicas(&cluster, "behind", start, &acked).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// A replica killed (SIGKILL) while it receives a snapshot transfer restarts, resumes the
/// transfer from what it staged, and ends with exactly the records the others hold: nothing
/// acked and retained is lost, every chunk's checksum held.
#[tokio::test]
async fn a_replica_killed_during_a_snapshot_transfer_resumes_it() {
    let cluster = TestCluster::start_ready_with_config(3, CONFIG)
        .await
        .expect("cluster");
    let result = async {
        let client = cluster.client(Default::default()).await?;
        client
            .create_topic_with_config(
                "transfer",
                1,
                3,
                &[("retention.bytes".into(), "40000000".into())],
            )
            .await?;
        let leader = cluster.leader_of("transfer", 0).await?;
        let receiver = cluster
            .node_ids()
            .into_iter()
            .find(|node| *node != leader)
            .context("a follower")?;
        let mut log = cluster.log_client(leader);
        let mut acked = produce(&mut log, "transfer", "before", 200, 50).await?;
        cluster.stop(receiver).await?;
        // 50 MB while it is down, 40 MB kept: a snapshot of about ten 4 MiB chunks.
        acked.extend(produce(&mut log, "transfer", "while-down", 50_000, 100).await?);
        let start = settled_start(&cluster, "transfer", 5_000).await?;
        sleep(Duration::from_secs(3)).await;
        let log_path = cluster.log_path(receiver);
        let before = std::fs::read_to_string(&log_path).unwrap_or_default();
        let begun = before.matches("receiving a partition snapshot").count();
        cluster.restart(receiver)?;
        // Kill it as soon as the transfer began.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.matches("receiving a partition snapshot").count() > begun {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "node {receiver} never began receiving a snapshot\n{}",
                cluster.log_tail(receiver)
            );
            sleep(Duration::from_millis(10)).await;
        }
        sleep(Duration::from_millis(300)).await;
        cluster.kill(receiver)?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let installed_before_kill = text.matches("partition snapshot installed").count()
            > before.matches("partition snapshot installed").count();
        cluster.restart(receiver)?;
        cluster.wait_node_ready(receiver).await?;
        let start = settled_start(&cluster, "transfer", start).await?;
        check_replicas(&cluster, "transfer", start, &acked).await?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let resumed = text
            .lines()
            .filter(|line| line.contains("receiving a partition snapshot"))
            .last()
            .unwrap_or_default()
            .to_owned();
        eprintln!(
            "killed {} the install; the transfer after the restart: {resumed}",
            if installed_before_kill {
                "after"
            } else {
                "before"
            }
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}
