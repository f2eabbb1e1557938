//! Consumer groups against a 3-node cluster of real `ordo serve` processes, with members as real
//! processes (`ordo-group-member`) whose logs say what each owned when:
//! - three members over six partitions: at every moment each partition has at most one owner,
//!   every record is delivered, and clean handoffs deliver nothing twice;
//! - a member killed with SIGKILL: its partitions move after its session timeout, and its
//!   successor starts at its last commit (what it processed after the commit is delivered again,
//!   nothing before it);
//! - a member joining and leaving: partitions move incrementally (the times to a balanced
//!   assignment are printed);
//! - a SIGKILL of the coordinator's node: the group carries on, no committed offset is lost or
//!   goes backward;
//! - zombies and bad inputs get their codes and reasons.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use ordo_client::{Client, ClientOptions, GroupConsumerOptions, GroupEvent};
use ordo_proto::errors::reason;
use ordo_proto::v1::consumer_group_client::ConsumerGroupClient;
use ordo_proto::v1::{
    CommitOffsetsRequest, DeleteGroupRequest, DescribeGroupRequest, FetchOffsetsRequest,
    HeartbeatRequest, LeaveGroupRequest, OffsetCommit, ResetOffsetsRequest, ResetTo,
    TopicPartitions,
};
use ordo_tests::group_member::{MemberLine, MemberLog, check_members, now_us, read_member_log};
use ordo_tests::{NodeId, TestCluster, expect_reason, with_timeout};
use tokio::time::{Instant, sleep};
use tonic::Code;
use tonic::transport::Channel;

const NODES: usize = 3;
/// How long a group may take to reach a state a test waits for.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A member process and its log file. Killed when dropped.
struct Member {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    killed_at_us: Option<u64>,
}

impl Member {
    /// Starts `ordo-group-member` with `extra` flags, its stdout to `dir/<name>.jsonl`.
    fn start(
        cluster: &TestCluster,
        dir: &Path,
        group: &str,
        topic: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<Member> {
        let log = dir.join(format!("{name}.jsonl"));
        let endpoints: Vec<String> = cluster
            .node_ids()
            .into_iter()
            .map(|node| cluster.endpoint(node))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_ordo-group-member"))
            .args(["--endpoints", &endpoints.join(",")])
            .args(["--group", group, "--topic", topic, "--member", name])
            .args(extra)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
            .stdin(Stdio::null())
            .spawn()
            .context("start ordo-group-member")?;
        Ok(Member {
            name: name.to_owned(),
            child: Some(child),
            log,
            killed_at_us: None,
        })
    }

    fn lines(&self) -> Result<Vec<MemberLine>> {
        read_member_log(&self.log)
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("member not running")?;
        child.kill()?;
        child.wait()?;
        self.killed_at_us = Some(now_us());
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit (commit, leave).
    async fn stop(&mut self) -> Result<()> {
        let mut child = self.child.take().context("member not running")?;
        // SAFETY: kill(2) with a pid this process started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "member {} exited with {status}",
                    self.name
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("member {} did not stop within 20 s", self.name);
            }
            sleep(POLL).await;
        }
    }

    fn to_log(&self) -> Result<MemberLog> {
        Ok(MemberLog {
            name: self.name.clone(),
            lines: self.lines()?,
            killed_at_us: self.killed_at_us,
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn stderr_of(members: &[Member]) -> String {
    members
        .iter()
        .map(|member| {
            let err = member.log.with_extension("err");
            format!(
                "--- {} stderr:\n{}",
                member.name,
                std::fs::read_to_string(err).unwrap_or_default()
            )
        })
        .collect()
}

async fn client(cluster: &TestCluster) -> Result<Client> {
    cluster
        .client(ClientOptions {
            request_timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        })
        .await
}

/// Produces `count` keyed records in calls of `batch`; returns the end of each partition it
/// wrote to, from the acks (a describe's high watermark may come from a lagging replica).
async fn produce(
    client: &Client,
    topic: &str,
    prefix: &str,
    count: usize,
    batch: usize,
) -> Result<BTreeMap<(String, u32), u64>> {
    let mut ends = BTreeMap::new();
    for start in (0..count).step_by(batch) {
        let records = (start..(start + batch).min(count))
            .map(|index| {
                ordo_client::Record::new(Bytes::from(format!("{prefix}-{index}")))
                    .with_key(format!("key-{}", index % 97))
            })
            .collect();
        for ack in client.produce(topic, None, records).await? {
            let end = ends.entry((topic.to_owned(), ack.partition)).or_insert(0);
            *end = (*end).max(ack.offset + 1);
        }
    }
    Ok(ends)
}

/// `later`'s ends over `earlier`'s.
fn merge_ends(
    mut earlier: BTreeMap<(String, u32), u64>,
    later: BTreeMap<(String, u32), u64>,
) -> BTreeMap<(String, u32), u64> {
    for (partition, end) in later {
        let current = earlier.entry(partition).or_insert(0);
        *current = (*current).max(end);
    }
    earlier
}

/// Waits until the group's committed offsets reach `ends`.
async fn wait_committed(
    client: &Client,
    group: &str,
    ends: &BTreeMap<(String, u32), u64>,
) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let committed: BTreeMap<(String, u32), u64> = client
            .fetch_offsets(group, &BTreeSet::new())
            .await?
            .into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.offset))
            .collect();
        if ends
            .iter()
            .all(|(partition, end)| *end == 0 || committed.get(partition) == Some(end))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "group {group} committed {committed:?}, expected {ends:?}"
        );
        sleep(POLL).await;
    }
}

/// Waits until `members` members own everything, each its target share, and returns how long
/// that took.
async fn wait_balanced(client: &Client, group: &str, members: usize) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(description) = client.describe_group(group).await {
            let settled = description.members.len() == members
                && description
                    .members
                    .iter()
                    .all(|member| !member.target.is_empty() && member.owned == member.target);
            if settled {
                return Ok(started.elapsed());
            }
        }
        ensure!(
            started.elapsed() < SETTLE_TIMEOUT,
            "group {group} did not balance over {members} members"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Three members over six partitions: exclusive ownership at every moment, every record
/// delivered, nothing delivered twice (each member commits after every batch, before it can
/// release a partition, and a new owner starts at the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_six_partitions_exclusively() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut members = Vec::new();
    let result = async {
        let (topic, group) = ("share", "share-group");
        cluster.create_topic(topic, 6, 3).await?;
        let client = client(&cluster).await?;
        let first = produce(&client, topic, "first", 600, 20).await?;
        for name in ["a", "b", "c"] {
            members.push(Member::start(
                &cluster,
                dir.path(),
                group,
                topic,
                name,
                &["--pause-ms", "5", "--fetch-max-bytes", "512"],
            )?);
            sleep(Duration::from_millis(300)).await;
        }
        wait_balanced(&client, group, 3).await?;
        let ends = merge_ends(first, produce(&client, topic, "second", 600, 20).await?);
        wait_committed(&client, group, &ends).await?;
        for member in &mut members {
            member.stop().await?;
        }
        let logs: Vec<MemberLog> = members.iter().map(Member::to_log).collect::<Result<_>>()?;
        let summary = check_members(&logs, &ends)?;
        ensure!(
            summary.redelivered == 0,
            "{} records delivered twice in clean handoffs",
            summary.redelivered
        );
        let delivered: u64 = summary
            .delivered
            .values()
            .flatten()
            .map(|(first, last)| last - first + 1)
            .sum();
        ensure!(delivered == 1200, "delivered {delivered} of 1200 records");
        Ok(())
    }
    .await;
    let result = result.map_err(|error| error.context(stderr_of(&members)));
    cluster.finish(result);
}

/// A member killed with SIGKILL: the other member gets its partitions after the session timeout
/// and starts each at the dead member's last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_members_partitions_resume_from_its_last_commit() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut members = Vec::new();
    let result = async {
        let (topic, group) = ("handover", "handover-group");
        cluster.create_topic(topic, 4, 3).await?;
        let client = client(&cluster).await?;
        let produced = produce(&client, topic, "r", 800, 10).await?;
        let slow = [
            "--session-timeout-ms",
            "2000",
            "--commit-every",
            "30",
            "--pause-ms",
            "100",
            "--fetch-max-bytes",
            "64",
        ];
        members.push(Member::start(&cluster, dir.path(), group, topic, "doomed", &slow)?);
        wait_balanced(&client, group, 1).await?;
        members.push(Member::start(&cluster, dir.path(), group, topic, "survivor", &slow)?);
        wait_balanced(&client, group, 2).await?;
        // Kill the first member once it delivered records past a commit.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let lines = members[0].lines()?;
            let committed = lines
                .iter()
                .rposition(|line| matches!(line, MemberLine::Committed { .. }));
            let after = committed.is_some_and(|at| {
                lines[at..]
                    .iter()
                    .any(|line| matches!(line, MemberLine::Records { .. }))
            });
            if after {
                break;
            }
            ensure!(Instant::now() < deadline, "the member never committed");
            sleep(Duration::from_millis(20)).await;
        }
        members[0].kill()?;
        let killed_at = members[0].killed_at_us.unwrap_or_default();
        let doomed = members[0].lines()?;
        // Its last commit of each partition it owned.
        let mut last_commit: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let mut owned: BTreeSet<(String, u32)> = BTreeSet::new();
        for line in &doomed {
            match line {
                MemberLine::Assigned { partitions, .. } => owned.extend(partitions.iter().cloned()),
                MemberLine::Revoked { partitions, .. } | MemberLine::Lost { partitions, .. } => {
                    for partition in partitions {
                        owned.remove(partition);
                    }
                }
                MemberLine::Committed { offsets, .. } => {
                    for (topic, partition, offset) in offsets {
                        last_commit.insert((topic.clone(), *partition), *offset);
                    }
                }
                _ => {}
            }
        }
        ensure!(!owned.is_empty(), "the doomed member owned nothing when killed");
        let moved = wait_balanced(&client, group, 1).await?;
        println!("rebalance after a member's death (session 2 s): {moved:?} after the kill");
        let ends = produced;
        // It commits every 30 records: wait for it to deliver everything, then stop it (it
        // commits the rest as it leaves).
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let mut reached: BTreeMap<(String, u32), u64> = BTreeMap::new();
            for line in members[1].lines()? {
                if let MemberLine::Records {
                    topic,
                    partition,
                    last,
                    ..
                } = line
                {
                    let next = reached.entry((topic, partition)).or_default();
                    *next = (*next).max(last + 1);
                }
            }
            if ends
                .iter()
                .all(|(partition, end)| reached.get(partition).copied().unwrap_or(0) >= *end)
            {
                break;
            }
            ensure!(Instant::now() < deadline, "the survivor reached {reached:?} of {ends:?}");
            sleep(POLL).await;
        }
        members[1].stop().await?;
        wait_committed(&client, group, &ends).await?;
        let survivor = members[1].lines()?;
        for partition in &owned {
            let expected = last_commit.get(partition).copied().unwrap_or(0);
            let first = survivor.iter().find_map(|line| match line {
                MemberLine::Records {
                    topic,
                    partition: number,
                    first,
                    t_us,
                    ..
                } if (topic.clone(), *number) == *partition && *t_us > killed_at => Some(*first),
                _ => None,
            });
            ensure!(
                first == Some(expected),
                "{partition:?}: the survivor started at {first:?}, the dead member's last commit was {expected}"
            );
        }
        let logs: Vec<MemberLog> = members.iter().map(Member::to_log).collect::<Result<_>>()?;
        let summary = check_members(&logs, &ends)?;
        println!(
            "records delivered again after the kill: {} (processed after the last commit)",
            summary.redelivered
        );
        Ok(())
    }
    .await;
    let result = result.map_err(|error| error.context(stderr_of(&members)));
    cluster.finish(result);
}

/// A third member joins two ten times (and leaves again): each time the partitions move
/// incrementally to a balanced assignment; the times are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_rebalance_incrementally() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut members = Vec::new();
    let result = async {
        let (topic, group) = ("joins", "joins-group");
        cluster.create_topic(topic, 6, 3).await?;
        let client = client(&cluster).await?;
        let produced = produce(&client, topic, "r", 120, 10).await?;
        for name in ["first", "second"] {
            members.push(Member::start(&cluster, dir.path(), group, topic, name, &[])?);
        }
        wait_balanced(&client, group, 2).await?;
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for round in 0..10 {
            let mut joiner =
                Member::start(&cluster, dir.path(), group, topic, &format!("joiner-{round}"), &[])?;
            joins.push(wait_balanced(&client, group, 3).await?);
            joiner.stop().await?;
            leaves.push(wait_balanced(&client, group, 2).await?);
            // Only the joiner's share moved: the two others kept theirs.
            let lines = joiner.lines()?;
            let assigned: usize = lines
                .iter()
                .map(|line| match line {
                    MemberLine::Assigned { partitions, .. } => partitions.len(),
                    _ => 0,
                })
                .sum();
            ensure!(assigned == 2, "the joiner was assigned {assigned} partitions, not its share of 2");
            members.push(joiner);
        }
        joins.sort();
        leaves.sort();
        println!(
            "time to a balanced assignment after a join: p50 {:?} max {:?}; after a leave: p50 {:?} max {:?}",
            joins[joins.len() / 2],
            joins[joins.len() - 1],
            leaves[leaves.len() / 2],
            leaves[leaves.len() - 1]
        );
        for member in members.iter_mut().filter(|member| member.child.is_some()) {
            member.stop().await?;
        }
        let logs: Vec<MemberLog> = members.iter().map(Member::to_log).collect::<Result<_>>()?;
        check_members(&logs, &produced)?;
        Ok(())
    }
    .await;
    let result = result.map_err(|error| error.context(stderr_of(&members)));
    cluster.finish(result);
}

/// SIGKILL of the node leading the group's coordinator: a member keeps consuming and committing
/// through the others, and no committed offset is lost or goes backward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_a_kill_of_its_coordinator() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let (topic, group) = ("coordinated", "coordinated-group");
        cluster.create_topic(topic, 3, 3).await?;
        let client = client(&cluster).await?;
        produce(&client, topic, "r", 300, 10).await?;
        let mut options = GroupConsumerOptions::new(group, [topic]);
        options.session_timeout = Duration::from_secs(10);
        let mut consumer = client.group_consumer(options).await?;
        let mut delivered = 0usize;
        consume(&mut consumer, &mut delivered, 300).await?;
        let before: BTreeMap<(String, u32), u64> = client
            .fetch_offsets(group, &BTreeSet::new())
            .await?
            .into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.offset))
            .collect();
        let coordinator: NodeId = client.describe_group(group).await?.coordinator;
        ensure!(coordinator != 0, "no coordinator reported");
        // Only the coordinator reports the group: summed over the nodes, each series once.
        let mut committed_metric = 0;
        let mut lag_metric = 0;
        let mut members_metric = 0;
        for node in cluster.node_ids() {
            committed_metric += cluster.metric(node, "ordo_group_committed_offset").await?;
            lag_metric += cluster.metric(node, "ordo_group_lag_records").await?;
            members_metric += cluster.metric(node, "ordo_group_members").await?;
        }
        ensure!(
            (committed_metric, lag_metric, members_metric) == (300, 0, 1),
            "metrics: committed {committed_metric}, lag {lag_metric}, members {members_metric}"
        );
        cluster.kill(coordinator)?;
        produce(&client, topic, "after", 300, 10).await?;
        consume(&mut consumer, &mut delivered, 600).await?;
        let after: BTreeMap<(String, u32), u64> = client
            .fetch_offsets(group, &BTreeSet::new())
            .await?
            .into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.offset))
            .collect();
        for (partition, offset) in &before {
            ensure!(
                after.get(partition).is_some_and(|now| now >= offset),
                "{partition:?} was committed at {offset} before the kill, {:?} after",
                after.get(partition)
            );
        }
        ensure!(after.values().sum::<u64>() == 600, "committed {after:?}");
        let description = client.describe_group(group).await?;
        ensure!(
            description.coordinator != coordinator,
            "the coordinator is still node {coordinator}"
        );
        consumer.close().await?;
        cluster.restart(coordinator)?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Consumes (committing after each batch) until `delivered` reaches `target`.
async fn consume(
    consumer: &mut ordo_client::GroupConsumer,
    delivered: &mut usize,
    target: usize,
) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while *delivered < target {
        ensure!(
            Instant::now() < deadline,
            "consumed {delivered} of {target}"
        );
        let event = tokio::time::timeout(SETTLE_TIMEOUT, consumer.next()).await??;
        if let GroupEvent::Records { records, .. } = event {
            *delivered += records.len();
            consumer.commit().await?;
        }
    }
    Ok(())
}

fn groups_client(cluster: &TestCluster) -> ConsumerGroupClient<Channel> {
    ConsumerGroupClient::new(cluster.channel(cluster.node_ids()[0]))
}

fn heartbeat(group: &str, member: &str, epoch: u32, topic: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        group: group.to_owned(),
        member_id: member.to_owned(),
        member_epoch: epoch,
        topics: vec![topic.to_owned()],
        owned: Vec::new(),
        session_timeout_ms: 0,
    }
}

fn commit(
    group: &str,
    member: &str,
    epoch: u32,
    offsets: &[(&str, u32, i64)],
) -> CommitOffsetsRequest {
    CommitOffsetsRequest {
        group: group.to_owned(),
        member_id: member.to_owned(),
        member_epoch: epoch,
        offsets: offsets
            .iter()
            .map(|(topic, partition, offset)| OffsetCommit {
                topic: (*topic).to_owned(),
                partition: *partition,
                offset: *offset,
                metadata: String::new(),
            })
            .collect(),
    }
}

const T: Duration = Duration::from_secs(10);

/// A zombie's commit (an epoch its member left behind by joining again), an unknown member's,
/// a commit for another member's partition, a backward commit, and bad inputs are refused with
/// their codes and reasons; reset and delete wait for an empty group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombies_and_bad_inputs_are_refused() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let (topic, group) = ("refusals", "refusals-group");
        cluster.create_topic(topic, 2, 3).await?;
        let mut groups = groups_client(&cluster);
        let joined = groups
            .heartbeat(with_timeout(heartbeat(group, "m1", 0, topic), T))
            .await?
            .into_inner();
        ensure!(
            joined.member_id == "m1" && joined.member_epoch > 0,
            "{joined:?}"
        );
        let zombie_epoch = joined.member_epoch;
        let rejoined = groups
            .heartbeat(with_timeout(heartbeat(group, "m1", 0, topic), T))
            .await?
            .into_inner();
        ensure!(rejoined.member_epoch > zombie_epoch, "{rejoined:?}");
        let status = expect_reason(
            groups
                .commit_offsets(with_timeout(
                    commit(group, "m1", zombie_epoch, &[(topic, 0, 1)]),
                    T,
                ))
                .await,
            Code::FailedPrecondition,
            reason::FENCED_MEMBER,
            "a zombie's commit",
        )?;
        ensure!(status.message().contains("epoch"), "{}", status.message());
        expect_reason(
            groups
                .commit_offsets(with_timeout(
                    commit(group, "nobody", 1, &[(topic, 0, 1)]),
                    T,
                ))
                .await,
            Code::FailedPrecondition,
            reason::UNKNOWN_MEMBER,
            "an unknown member's commit",
        )?;
        expect_reason(
            groups
                .heartbeat(with_timeout(heartbeat(group, "nobody", 3, topic), T))
                .await,
            Code::FailedPrecondition,
            reason::UNKNOWN_MEMBER,
            "an unknown member's heartbeat",
        )?;
        // A second member: each gets one partition once m1 releases one.
        let mut m1 = rejoined;
        let m2 = groups
            .heartbeat(with_timeout(heartbeat(group, "m2", 0, topic), T))
            .await?
            .into_inner();
        let owned = |response: &ordo_proto::v1::HeartbeatResponse| response.assigned.clone();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut m2 = m2;
        while !(m1
            .assigned
            .iter()
            .map(|t| t.partitions.len())
            .sum::<usize>()
            == 1
            && m2
                .assigned
                .iter()
                .map(|t| t.partitions.len())
                .sum::<usize>()
                == 1)
        {
            ensure!(Instant::now() < deadline, "m1 {m1:?} m2 {m2:?}");
            let mut request = heartbeat(group, "m1", m1.member_epoch, topic);
            request.owned = owned(&m1);
            m1 = groups
                .heartbeat(with_timeout(request, T))
                .await?
                .into_inner();
            let mut request = heartbeat(group, "m2", m2.member_epoch, topic);
            request.owned = owned(&m2);
            m2 = groups
                .heartbeat(with_timeout(request, T))
                .await?
                .into_inner();
        }
        let theirs = m2.assigned[0].partitions[0];
        expect_reason(
            groups
                .commit_offsets(with_timeout(
                    commit(group, "m1", m1.member_epoch, &[(topic, theirs, 1)]),
                    T,
                ))
                .await,
            Code::FailedPrecondition,
            reason::PARTITION_NOT_ASSIGNED,
            "a commit of another member's partition",
        )?;
        expect_reason(
            groups
                .reset_offsets(with_timeout(
                    ResetOffsetsRequest {
                        group: group.to_owned(),
                        topic: topic.to_owned(),
                        partitions: Vec::new(),
                        to: ResetTo::Earliest.into(),
                        offset: 0,
                        timestamp_ms: 0,
                    },
                    T,
                ))
                .await,
            Code::FailedPrecondition,
            reason::GROUP_NOT_EMPTY,
            "a reset with members",
        )?;
        expect_reason(
            groups
                .delete_group(with_timeout(
                    DeleteGroupRequest {
                        group: group.to_owned(),
                    },
                    T,
                ))
                .await,
            Code::FailedPrecondition,
            reason::GROUP_NOT_EMPTY,
            "a delete with members",
        )?;
        for (member, epoch) in [("m1", m1.member_epoch), ("m2", m2.member_epoch)] {
            groups
                .leave_group(with_timeout(
                    LeaveGroupRequest {
                        group: group.to_owned(),
                        member_id: member.to_owned(),
                        member_epoch: epoch,
                    },
                    T,
                ))
                .await?;
        }
        // Without membership: commits move forward only.
        let statics = "static-group";
        groups
            .commit_offsets(with_timeout(commit(statics, "", 0, &[(topic, 0, 10)]), T))
            .await?;
        let status = expect_reason(
            groups
                .commit_offsets(with_timeout(commit(statics, "", 0, &[(topic, 0, 9)]), T))
                .await,
            Code::FailedPrecondition,
            reason::COMMIT_BACKWARD,
            "a backward commit",
        )?;
        ensure!(status.message().contains("10"), "{}", status.message());
        // Bad inputs.
        expect_reason(
            groups
                .commit_offsets(with_timeout(commit(statics, "", 0, &[(topic, 0, -1)]), T))
                .await,
            Code::InvalidArgument,
            reason::INVALID_OFFSET,
            "a negative offset",
        )?;
        expect_reason(
            groups
                .commit_offsets(with_timeout(commit(statics, "", 0, &[(topic, 9, 1)]), T))
                .await,
            Code::NotFound,
            reason::PARTITION_NOT_FOUND,
            "a partition that does not exist",
        )?;
        expect_reason(
            groups
                .commit_offsets(with_timeout(
                    commit(statics, "", 0, &[("no-such-topic", 0, 1)]),
                    T,
                ))
                .await,
            Code::NotFound,
            reason::TOPIC_NOT_FOUND,
            "a topic that does not exist",
        )?;
        expect_reason(
            groups
                .heartbeat(with_timeout(heartbeat(&"g".repeat(300), "", 0, topic), T))
                .await,
            Code::InvalidArgument,
            reason::INVALID_GROUP_NAME,
            "a group name over its limit",
        )?;
        let mut short = heartbeat(group, "", 0, topic);
        short.session_timeout_ms = 10;
        expect_reason(
            groups.heartbeat(with_timeout(short, T)).await,
            Code::InvalidArgument,
            reason::INVALID_SESSION_TIMEOUT,
            "a session timeout below the minimum",
        )?;
        expect_reason(
            groups
                .describe_group(with_timeout(
                    DescribeGroupRequest {
                        group: "never-was".to_owned(),
                    },
                    T,
                ))
                .await,
            Code::NotFound,
            reason::GROUP_NOT_FOUND,
            "describe of an unknown group",
        )?;
        // Empty now: reset and delete work.
        let reset = groups
            .reset_offsets(with_timeout(
                ResetOffsetsRequest {
                    group: statics.to_owned(),
                    topic: topic.to_owned(),
                    partitions: vec![0],
                    to: ResetTo::Offset.into(),
                    offset: 3,
                    timestamp_ms: 0,
                },
                T,
            ))
            .await?
            .into_inner();
        ensure!(
            reset.offsets.len() == 1 && reset.offsets[0].offset == 3,
            "{reset:?}"
        );
        let fetched = groups
            .fetch_offsets(with_timeout(
                FetchOffsetsRequest {
                    group: statics.to_owned(),
                    partitions: vec![TopicPartitions {
                        topic: topic.to_owned(),
                        partitions: vec![0],
                    }],
                },
                T,
            ))
            .await?
            .into_inner();
        ensure!(
            fetched.offsets.len() == 1 && fetched.offsets[0].offset == 3,
            "{fetched:?}"
        );
        groups
            .delete_group(with_timeout(
                DeleteGroupRequest {
                    group: statics.to_owned(),
                },
                T,
            ))
            .await?;
        expect_reason(
            groups
                .describe_group(with_timeout(
                    DescribeGroupRequest {
                        group: statics.to_owned(),
                    },
                    T,
                ))
                .await,
            Code::NotFound,
            reason::GROUP_NOT_FOUND,
            "describe of a deleted group",
        )?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// OffsetsForTime finds the first record at or after a time through any node (leader, follower,
/// or one that forwards), before all records (the first offset) and after all (none, with the
/// end); ResetOffsets to a time commits what it finds; a topic with `timestamp.type = append`
/// stamps records with the receiving node's clock, whatever the producer set; a bad value of it
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_for_time_and_resets_to_a_time() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "timed";
        cluster.create_topic(topic, 1, 3).await?;
        let client = client(&cluster).await?;
        // Ten batches of ten records with timestamps 1000, 1010, ..., 1990 (create time), then a
        // record with an older timestamp (not monotonic, as producers' clocks are).
        for batch in 0..10i64 {
            let records = (0..10i64)
                .map(|index| {
                    ordo_client::Record::new(Bytes::from(format!("r{}", batch * 10 + index)))
                        .with_timestamp_ms(1000 + (batch * 10 + index) * 10)
                })
                .collect();
            client.produce(topic, Some(0), records).await?;
        }
        client
            .produce(
                topic,
                Some(0),
                vec![ordo_client::Record::new("late").with_timestamp_ms(1500)],
            )
            .await?;
        for node in cluster.node_ids() {
            let via = Client::connect([cluster.endpoint(node)]).await?;
            for (time, expected) in [
                (0, Some((0, 1000))),
                (1000, Some((0, 1000))),
                (1001, Some((1, 1010))),
                (1555, Some((56, 1560))),
                (1990, Some((99, 1990))),
                (1991, None),
            ] {
                let answer = via.offset_for_time(topic, 0, time).await?;
                ensure!(
                    answer.found == expected,
                    "via node {node}: time {time}: {answer:?}, expected {expected:?}"
                );
                if expected.is_none() {
                    ensure!(answer.high_watermark == 101, "{answer:?}");
                }
            }
        }
        let reset = client
            .reset_offsets("timed-group", topic, &[], ordo_client::ResetTo::Time(1555))
            .await?;
        ensure!(
            reset.len() == 1 && reset[0].offset == 56,
            "reset to 1555: {reset:?}"
        );
        let reset = client
            .reset_offsets("timed-group", topic, &[], ordo_client::ResetTo::Time(5000))
            .await?;
        ensure!(
            reset.len() == 1 && reset[0].offset == 101,
            "reset past every record: {reset:?}"
        );
        // Append time: the node's clock, not the producer's.
        let mut admin = cluster.admin_client(cluster.node_ids()[0]);
        let create = |value: &str| ordo_proto::v1::CreateTopicRequest {
            name: format!("appended-{value}"),
            partitions: 1,
            replication_factor: 3,
            config: Some(ordo_proto::v1::TopicConfig {
                entries: [("timestamp.type".to_owned(), value.to_owned())].into(),
            }),
        };
        expect_reason(
            admin
                .create_topic(with_timeout(create("sometimes"), T))
                .await,
            Code::InvalidArgument,
            reason::INVALID_TOPIC_CONFIG,
            "timestamp.type = sometimes",
        )?;
        admin
            .create_topic(with_timeout(create("append"), T))
            .await?;
        let before = now_us() / 1000;
        client
            .produce(
                "appended-append",
                Some(0),
                vec![ordo_client::Record::new("x").with_timestamp_ms(5)],
            )
            .await?;
        let read = client
            .fetch("appended-append", 0, 0, 1 << 20, Duration::ZERO)
            .await?;
        let stamped = read.records.first().context("the record")?.timestamp_ms;
        ensure!(
            stamped >= i64::try_from(before)? - 1000,
            "append time: the record kept the producer's timestamp {stamped}"
        );
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// With auto-commit, a member commits on its interval while it reads and before it leaves: a
/// second member that takes over after it closed starts where it stopped and gets nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_commits_on_its_interval_and_before_leaving() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let (topic, group) = ("auto", "auto-group");
        cluster.create_topic(topic, 2, 3).await?;
        let client = client(&cluster).await?;
        produce(&client, topic, "r", 200, 10).await?;
        let mut options = GroupConsumerOptions::new(group, [topic]);
        options.auto_commit_interval = Some(Duration::from_millis(100));
        let mut first = client.group_consumer(options.clone()).await?;
        let mut delivered = 0usize;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while delivered < 100 {
            ensure!(Instant::now() < deadline, "read {delivered} of 100");
            if let GroupEvent::Records { records, .. } =
                tokio::time::timeout(SETTLE_TIMEOUT, first.next()).await??
            {
                delivered += records.len();
            }
        }
        // The interval passes while it keeps reading: a commit lands without any call.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(200), first.next()).await;
            let committed: u64 = client
                .fetch_offsets(group, &BTreeSet::new())
                .await?
                .iter()
                .map(|offset| offset.offset)
                .sum();
            if committed > 0 {
                break;
            }
            ensure!(Instant::now() < deadline, "no automatic commit");
        }
        let positions: BTreeMap<(String, u32), u64> = first
            .assignment()
            .into_iter()
            .filter_map(|(topic, partition)| {
                let position = first.position(&topic, partition)?;
                Some(((topic, partition), position))
            })
            .collect();
        first.close().await?;
        let committed: BTreeMap<(String, u32), u64> = client
            .fetch_offsets(group, &BTreeSet::new())
            .await?
            .into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.offset))
            .collect();
        for (partition, position) in &positions {
            ensure!(
                committed.get(partition) == Some(position),
                "{partition:?}: closed at {position}, committed {:?}",
                committed.get(partition)
            );
        }
        // More records, so the second member has something to read in every partition.
        produce(&client, topic, "s", 100, 10).await?;
        let mut second = client.group_consumer(options).await?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut starts: BTreeMap<(String, u32), u64> = BTreeMap::new();
        while starts.len() < positions.len() {
            ensure!(Instant::now() < deadline, "the second member read {starts:?}");
            if let GroupEvent::Records {
                topic,
                partition,
                records,
            } = tokio::time::timeout(SETTLE_TIMEOUT, second.next()).await??
            {
                starts
                    .entry((topic, partition))
                    .or_insert(records[0].offset);
            }
        }
        for (partition, start) in &starts {
            let expected = positions.get(partition).copied().unwrap_or(0);
            ensure!(
                *start == expected,
                "{partition:?}: the second member started at {start}, the first closed at {expected}"
            );
        }
        second.close().await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}
