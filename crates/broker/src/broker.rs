//! [`Broker`]: produce, fetch and admin on top of this node's Raft groups.
//!
//! Produce: records are validated against [`Limits`], split by partition, encoded into one batch
//! per partition and proposed to that partition's leader, on this node or forwarded to the
//! leader's node over the internal service. The call returns only when every partition's Raft
//! group committed its batch (quorum fsynced). A leader change inside the deadline is retried on
//! the new leader (this may duplicate a batch whose first attempt committed unanswered, until
//! idempotent producers exist); a deadline that passes after a proposal is `OutcomeUnknown`; a
//! deadline that passes with no leader reached is `Unavailable` with the leader hint.
//!
//! Fetch: served from the local replica when it already holds the offset (every replica only
//! exposes records below its high watermark, which only counts committed records); otherwise
//! forwarded once to the leader, which long-polls on its high watermark.
//!
//! Background tasks (owned by the caller's `JoinSet`, stopped by the shutdown watch): reconcile
//! this node's groups with the metadata, and hand leadership back to preferred leaders.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_proto::internal::ForwardMetaRequest;
use ordo_proto::internal::ForwardProduceRequest;
use ordo_proto::internal::GroupStatusRequest;
use ordo_proto::internal::MetaReadIndexRequest;
use ordo_raft::Command;
use ordo_raft::GroupId;
use ordo_raft::GroupStatus;
use ordo_raft::RaftNode;
use ordo_raft::Response;
use ordo_raft::WriteError;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::BrokerError;
use crate::Limits;
use crate::NodeId;
use crate::Record;
use crate::StoredRecord;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::MetaMachine;
use crate::metadata::MetaState;
use crate::metadata::Topic;
use crate::names::validate_topic_name;
use crate::partitioner::partition_for_key;
use crate::records::decode_batch;
use crate::records::encode_batch;
use crate::records::validate_batch;

/// Header marking a request already forwarded once, so forwarding never loops.
pub const FORWARDED_HEADER: &str = "x-ordo-forwarded";
/// How long a leader may take to confirm the end of a partition before answering OUT_OF_RANGE.
const CONFIRM_END_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a forwarded fetch may take beyond its long-poll wait.
const FORWARD_FETCH_GRACE: Duration = Duration::from_secs(5);

/// How a broker is set up.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// This node.
    pub node_id: NodeId,
    /// Every node of the cluster (voters of the metadata group) and its advertised address.
    pub nodes: BTreeMap<NodeId, String>,
    /// Request limits.
    pub limits: Limits,
    /// How often a leader checks whether to hand leadership back to a partition's preferred
    /// leader.
    pub leader_balance_interval: Duration,
}

/// A partition as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// Its leader, when known.
    pub leader: Option<NodeId>,
    /// Replicas; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// Raft term.
    pub term: u64,
    /// Entries each replica is behind the leader, when the leader reported.
    pub lag: BTreeMap<NodeId, Option<u64>>,
}

/// A topic as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct TopicView {
    /// Name.
    pub name: String,
    /// Replication factor.
    pub replication_factor: u32,
    /// Config.
    pub config: BTreeMap<String, String>,
    /// Partitions.
    pub partitions: Vec<PartitionView>,
}

/// A node as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Node id.
    pub node_id: NodeId,
    /// Advertised address.
    pub address: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Partitions it leads.
    pub leader_count: u32,
    /// Partitions it replicates.
    pub replica_count: u32,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The node answering.
    pub answered_by: NodeId,
    /// The metadata group's leader.
    pub metadata_leader: Option<NodeId>,
    /// The metadata group's term.
    pub metadata_term: u64,
    /// Nodes.
    pub nodes: Vec<NodeView>,
    /// Topic count.
    pub topics: u32,
    /// Partition count.
    pub partitions: u32,
}

/// Committed records of one partition.
#[derive(Debug, Clone, Default)]
pub struct FetchOutcome {
    /// Records, in offset order.
    pub records: Vec<StoredRecord>,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// First offset in the log.
    pub log_start_offset: u64,
}

struct Inner {
    node: RaftNode,
    options: BrokerOptions,
    meta: watch::Receiver<Arc<MetaState>>,
    leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    round_robin: AtomicU32,
    produce_permits: Semaphore,
}

/// The broker of one node. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("node", &self.inner.options.node_id)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

impl Broker {
    /// Starts the metadata group and the background tasks (spawned on `tasks`, stopped when
    /// `shutdown` turns true).
    pub async fn start(
        node: RaftNode,
        options: BrokerOptions,
        tasks: &mut JoinSet<()>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Broker, BrokerError> {
        options.limits.validate().map_err(BrokerError::Internal)?;
        let (published, meta) = watch::channel(Arc::new(MetaState::default()));
        node.start_meta(&options.nodes, Box::new(MetaMachine::new(published)))
            .await
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let produce_permits = Semaphore::new(options.limits.produce_in_flight_max as usize);
        let broker = Broker {
            inner: Arc::new(Inner {
                node,
                options,
                meta,
                leader_hints: Mutex::new(HashMap::new()),
                round_robin: AtomicU32::new(0),
                produce_permits,
            }),
        };
        tasks.spawn(broker.clone().reconcile_loop(shutdown.clone()));
        tasks.spawn(
            broker
                .inner
                .node
                .clone()
                .run_watchdog(broker.inner.options.nodes.clone(), shutdown.clone()),
        );
        tasks.spawn(broker.clone().leader_balance_loop(shutdown));
        Ok(broker)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.options.node_id
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.options.limits
    }

    /// The metadata state as applied on this node.
    pub fn metadata(&self) -> Arc<MetaState> {
        self.inner.meta.borrow().clone()
    }

    /// The Raft layer, for the internal service.
    pub fn raft(&self) -> &RaftNode {
        &self.inner.node
    }

    /// Produce requests in flight on this node, and the maximum.
    pub fn produce_in_flight(&self) -> (u64, u64) {
        let max = self.inner.options.limits.produce_in_flight_max;
        (
            max - self.inner.produce_permits.available_permits() as u64,
            max,
        )
    }

    fn topic(&self, name: &str) -> Result<Topic, BrokerError> {
        self.inner
            .meta
            .borrow()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))
    }

    /// The topic, making sure a "not found" is true cluster-wide: when this node does not know
    /// the topic, it first applies every metadata command committed so far (read index from the
    /// metadata leader), so a topic just created through another node is found.
    async fn topic_fresh(&self, name: &str, deadline: Instant) -> Result<Topic, BrokerError> {
        if let Ok(topic) = self.topic(name) {
            return Ok(topic);
        }
        const CATCH_UP_MAX: Duration = Duration::from_secs(2);
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(CATCH_UP_MAX);
        if let Some(index) = self.meta_read_index(remaining).await {
            self.inner.node.wait_meta_applied(index, remaining).await;
        }
        self.topic(name)
    }

    /// The metadata read index from the leader, local or remote; `None` if none answered.
    async fn meta_read_index(&self, timeout: Duration) -> Option<u64> {
        let leader = self.inner.node.meta_leader()?;
        if leader == self.node_id() {
            return self.inner.node.meta_read_index().await.ok();
        }
        let mut client = self.inner.node.peers().known_client(leader)?;
        let mut request = tonic::Request::new(MetaReadIndexRequest {});
        request.set_timeout(timeout);
        let response = client.meta_read_index(request).await.ok()?.into_inner();
        (!response.not_leader).then_some(response.index)
    }

    /// Serves a read-index request: `None` when this node is not the metadata leader.
    pub async fn handle_meta_read_index(&self) -> Option<u64> {
        self.inner.node.meta_read_index().await.ok()
    }

    fn address(&self, node: NodeId) -> Option<String> {
        self.inner.options.nodes.get(&node).cloned()
    }

    // ------------------------------------------------------------------ produce

    /// Appends records; answers `(partition, offset)` per record in request order.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
        timeout: Duration,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        let deadline = Instant::now() + timeout;
        let limits = &self.inner.options.limits;
        if records.is_empty() {
            return Err(BrokerError::invalid(
                "EMPTY_BATCH",
                "a produce request needs at least one record",
            ));
        }
        Limits::check(
            "batch_records_max",
            records.len() as u64,
            limits.batch_records_max,
        )?;
        let mut total = 0u64;
        for record in &records {
            let size = record.size_bytes();
            Limits::check("record_bytes_max", size, limits.record_bytes_max)?;
            total += size;
        }
        Limits::check("batch_bytes_max", total, limits.batch_bytes_max)?;
        let topic = self.topic_fresh(topic, deadline).await?;
        let partitions = topic.partitions.len() as u32;
        if let Some(partition) = partition {
            if partition >= partitions {
                return Err(BrokerError::PartitionNotFound {
                    topic: topic.name.clone(),
                    partition,
                    partitions,
                });
            }
        }
        let _permit = self.inner.produce_permits.try_acquire().map_err(|_| {
            BrokerError::ResourceExhausted(format!(
                "{} produce requests in flight on this node (produce_in_flight_max); retry with backoff",
                limits.produce_in_flight_max
            ))
        })?;

        // Split by partition, remembering each record's position in the request.
        let total_records = records.len();
        let sticky = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % partitions;
        let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<Record>)> = BTreeMap::new();
        for (position, record) in records.into_iter().enumerate() {
            let target = match (partition, &record.key) {
                (Some(partition), _) => partition,
                (None, Some(key)) => partition_for_key(key, partitions),
                (None, None) => sticky,
            };
            let entry = by_partition.entry(target).or_default();
            entry.0.push(position);
            entry.1.push(record);
        }
        let now = now_ms();
        let mut appends = Vec::with_capacity(by_partition.len());
        for (partition, (positions, records)) in by_partition {
            let command = Command::Append {
                count: records.len() as u32,
                batch: encode_batch(&records, now)?,
            };
            let broker = self.clone();
            let topic = topic.clone();
            appends.push(async move {
                let base = broker.append(&topic, partition, command, deadline).await?;
                Ok::<_, BrokerError>((partition, positions, base))
            });
        }
        let results = futures::future::join_all(appends).await;
        combine_acks(results, total_records)
    }

    fn leader_hint(&self, group: GroupId) -> Option<NodeId> {
        let hints = self
            .inner
            .leader_hints
            .lock()
            .expect("hint lock is never poisoned");
        hints.get(&group).copied()
    }

    fn set_leader_hint(&self, group: GroupId, leader: Option<NodeId>) {
        let mut hints = self
            .inner
            .leader_hints
            .lock()
            .expect("hint lock is never poisoned");
        match leader {
            Some(leader) => hints.insert(group, leader),
            None => hints.remove(&group),
        };
    }

    /// Proposes one batch to a partition's leader, wherever it is, until the deadline.
    async fn append(
        &self,
        topic: &Topic,
        partition: u32,
        command: Command,
        deadline: Instant,
    ) -> Result<u64, BrokerError> {
        let group = GroupId(topic.group(partition));
        let replicas = &topic.partitions[partition as usize];
        let me = self.node_id();
        let local_leader = self
            .inner
            .node
            .status(group)
            .and_then(|status| status.leader);
        let mut target = self
            .leader_hint(group)
            .or(local_leader)
            .unwrap_or(replicas[0]);
        let mut maybe_written = false;
        let mut unreachable: Vec<NodeId> = Vec::new();
        let mut last_error = String::from("no attempt made");
        let mut attempt: u32 = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let mut next: Option<NodeId> = None;
            if target == me {
                match self
                    .inner
                    .node
                    .write(group, command.clone(), remaining)
                    .await
                {
                    Ok(Response::Appended { base_offset }) => {
                        self.set_leader_hint(group, Some(me));
                        return Ok(base_offset);
                    }
                    Ok(other) => {
                        return Err(BrokerError::Internal(format!(
                            "unexpected answer to an append: {other:?}"
                        )));
                    }
                    Err(WriteError::NotLeader { leader, .. }) => {
                        last_error =
                            format!("node {me} is not the leader of partition {partition}");
                        next = leader.filter(|leader| *leader != me);
                    }
                    Err(WriteError::Discarded { leader, .. }) => {
                        maybe_written = true;
                        last_error = format!(
                            "leadership of partition {partition} moved while the batch was in flight"
                        );
                        next = leader;
                    }
                    Err(WriteError::OutcomeUnknown { reason, .. }) => {
                        return Err(BrokerError::OutcomeUnknown { message: reason });
                    }
                    Err(error @ (WriteError::GroupNotFound(_) | WriteError::Stopped { .. })) => {
                        last_error = error.to_string();
                    }
                }
            } else {
                match self
                    .forward_append(target, group, &command, remaining)
                    .await
                {
                    Ok(ForwardResult::Appended(base_offset)) => {
                        self.set_leader_hint(group, Some(target));
                        return Ok(base_offset);
                    }
                    Ok(ForwardResult::NotLeader(leader)) => {
                        last_error =
                            format!("node {target} is not the leader of partition {partition}");
                        next = leader.filter(|leader| *leader != target);
                    }
                    Ok(ForwardResult::Discarded(leader)) => {
                        maybe_written = true;
                        last_error = format!(
                            "leadership of partition {partition} moved while the batch was in flight"
                        );
                        next = leader;
                    }
                    Err(ForwardError::OutcomeUnknown(message)) => {
                        return Err(BrokerError::OutcomeUnknown { message });
                    }
                    Err(ForwardError::Ambiguous(message)) => {
                        maybe_written = true;
                        unreachable.push(target);
                        last_error = message;
                    }
                    Err(ForwardError::Unreachable(message)) => {
                        unreachable.push(target);
                        last_error = message;
                    }
                }
            }
            attempt += 1;
            // A hint naming a node this call could not reach is stale: rotate instead, or two
            // nodes that both name a dead leader would send the call back and forth.
            match next.filter(|leader| !unreachable.contains(leader)) {
                Some(leader) => {
                    self.set_leader_hint(group, Some(leader));
                    target = leader;
                }
                None => {
                    // No usable hint: try the next reachable replica after a short, growing
                    // pause (an election takes about one election timeout).
                    self.set_leader_hint(group, None);
                    if replicas.iter().all(|node| unreachable.contains(node)) {
                        unreachable.clear();
                    }
                    let position = replicas
                        .iter()
                        .position(|node| *node == target)
                        .unwrap_or(0);
                    target = (1..=replicas.len())
                        .map(|step| replicas[(position + step) % replicas.len()])
                        .find(|node| !unreachable.contains(node))
                        .unwrap_or(replicas[0]);
                    let pause = Duration::from_millis((10u64 << attempt.min(5)).min(250));
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
            }
        }
        let leader = self.leader_hint(group);
        if maybe_written {
            return Err(BrokerError::OutcomeUnknown {
                message: format!(
                    "partition {partition} of {:?}: deadline passed after a leader change; last error: {last_error}",
                    topic.name
                ),
            });
        }
        Err(BrokerError::Unavailable {
            message: format!(
                "no leader of partition {partition} of {:?} accepted the batch before the deadline; nothing was written; last error: {last_error}",
                topic.name
            ),
            leader,
            leader_address: leader.and_then(|leader| self.address(leader)),
        })
    }

    async fn forward_append(
        &self,
        target: NodeId,
        group: GroupId,
        command: &Command,
        timeout: Duration,
    ) -> Result<ForwardResult, ForwardError> {
        let Command::Append { count, batch } = command else {
            return Err(ForwardError::Unreachable(
                "only appends are forwarded".into(),
            ));
        };
        let Some(mut client) = self.inner.node.peers().known_client(target) else {
            return Err(ForwardError::Unreachable(format!(
                "node {target} has no known address"
            )));
        };
        let mut request = tonic::Request::new(ForwardProduceRequest {
            group: group.0,
            batch: batch.clone(),
            count: *count,
        });
        request.set_timeout(timeout);
        match client.forward_produce(request).await {
            Ok(response) => {
                let response = response.into_inner();
                match (
                    response.base_offset,
                    response.not_leader,
                    response.discarded,
                ) {
                    (Some(base_offset), false, false) => Ok(ForwardResult::Appended(base_offset)),
                    (None, true, false) => Ok(ForwardResult::NotLeader(response.leader_hint)),
                    (None, false, true) => Ok(ForwardResult::Discarded(response.leader_hint)),
                    _ => Err(ForwardError::Ambiguous(format!(
                        "node {target} sent a malformed forward answer"
                    ))),
                }
            }
            Err(status) => match status.code() {
                tonic::Code::Aborted | tonic::Code::DeadlineExceeded => Err(
                    ForwardError::OutcomeUnknown(format!("node {target}: {}", status.message())),
                ),
                // Refused before anything was sent, or a clean refusal by the remote.
                tonic::Code::Unavailable
                | tonic::Code::NotFound
                | tonic::Code::FailedPrecondition
                    if !status.message().contains("reset")
                        && !status.message().contains("closed") =>
                {
                    Err(ForwardError::Unreachable(format!(
                        "node {target}: {}",
                        status.message()
                    )))
                }
                _ => Err(ForwardError::Ambiguous(format!(
                    "node {target}: {}",
                    status.message()
                ))),
            },
        }
    }

    /// Serves a forwarded append: proposes it here if this node leads the group.
    pub async fn handle_forward_produce(
        &self,
        group: u64,
        count: u32,
        batch: Bytes,
        timeout: Duration,
    ) -> Result<ForwardResult, BrokerError> {
        let group = GroupId(group);
        validate_batch(&batch, count, &self.inner.options.limits)?;
        let command = Command::Append { count, batch };
        match self.inner.node.write(group, command, timeout).await {
            Ok(Response::Appended { base_offset }) => Ok(ForwardResult::Appended(base_offset)),
            Ok(other) => Err(BrokerError::Internal(format!(
                "unexpected answer to an append: {other:?}"
            ))),
            Err(WriteError::NotLeader { leader, .. }) => Ok(ForwardResult::NotLeader(leader)),
            Err(WriteError::Discarded { leader, .. }) => Ok(ForwardResult::Discarded(leader)),
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                Err(BrokerError::OutcomeUnknown { message: reason })
            }
            Err(WriteError::GroupNotFound(group)) => Ok(ForwardResult::NotLeader(
                self.leader_hint(group)
                    .filter(|leader| *leader != self.node_id()),
            )),
            Err(WriteError::Stopped { reason, .. }) => Err(BrokerError::unavailable(reason, None)),
        }
    }

    // ------------------------------------------------------------------ fetch

    /// Reads committed records of a partition from `offset`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u64,
        max_wait: Duration,
        forwarded: bool,
    ) -> Result<FetchOutcome, BrokerError> {
        let limits = &self.inner.options.limits;
        let max_bytes = if max_bytes == 0 {
            limits.fetch_bytes_max
        } else {
            max_bytes.min(limits.fetch_bytes_max)
        };
        let max_wait = max_wait.min(Duration::from_millis(limits.fetch_wait_ms_max));
        let topic = self
            .topic_fresh(topic, Instant::now() + max_wait.max(Duration::from_secs(1)))
            .await?;
        let partitions = topic.partitions.len() as u32;
        if partition >= partitions {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.name.clone(),
                partition,
                partitions,
            });
        }
        let group = GroupId(topic.group(partition));
        let me = self.node_id();
        let local = self.inner.node.high_watermark(group);
        let leader = self
            .inner
            .node
            .status(group)
            .and_then(|status| status.leader)
            .or_else(|| self.leader_hint(group));
        match local {
            Some(mut high_watermark) => {
                let current = *high_watermark.borrow_and_update();
                if offset < current {
                    return self.read_local(group, offset, max_bytes).await;
                }
                // At or past this replica's end: the leader decides, and waits for new records.
                if let Some(leader) = leader.filter(|leader| *leader != me && !forwarded) {
                    if let Ok(outcome) = self
                        .forward_fetch(leader, &topic.name, partition, offset, max_bytes, max_wait)
                        .await
                    {
                        return Ok(outcome);
                    }
                }
                if offset > current {
                    // Only the leader knows the end of the partition; a follower's end may be
                    // stale, so past it a follower that could not ask the leader says so.
                    if leader != Some(me) {
                        return Err(BrokerError::unavailable(
                            format!(
                                "node {me} replicates partition {partition} of {:?} up to offset {current} and could not reach its leader to read past it; retry",
                                topic.name
                            ),
                            leader.filter(|leader| *leader != me),
                        ));
                    }
                    // A node that believes it leads may be deposed (paused, cut off) or just
                    // elected and not yet applied: it says OUT_OF_RANGE only with an end it has
                    // confirmed with a quorum.
                    match self
                        .inner
                        .node
                        .confirmed_high_watermark(group, CONFIRM_END_TIMEOUT)
                        .await
                    {
                        Some(end) if offset > end => {
                            return Err(BrokerError::OffsetOutOfRange {
                                offset,
                                start: 0,
                                end,
                            });
                        }
                        Some(_) => return self.read_local(group, offset, max_bytes).await,
                        None => {
                            return Err(BrokerError::unavailable(
                                format!(
                                    "node {me} could not confirm it still leads partition {partition} of {:?}; retry",
                                    topic.name
                                ),
                                None,
                            ));
                        }
                    }
                }
                if !max_wait.is_zero() {
                    let _ = tokio::time::timeout(max_wait, high_watermark.changed()).await;
                }
                self.read_local(group, offset, max_bytes).await
            }
            None => {
                if forwarded {
                    return Err(BrokerError::unavailable(
                        format!(
                            "node {me} does not replicate partition {partition} of {:?}",
                            topic.name
                        ),
                        leader,
                    ));
                }
                let mut candidates: Vec<NodeId> = Vec::new();
                for node in leader
                    .into_iter()
                    .chain(topic.partitions[partition as usize].iter().copied())
                {
                    if !candidates.contains(&node) {
                        candidates.push(node);
                    }
                }
                // One deadline for all candidates, not one per candidate.
                let deadline = Instant::now() + max_wait + FORWARD_FETCH_GRACE;
                let mut last_error = String::from("no replica was tried before the deadline");
                for candidate in candidates {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        break;
                    }
                    let attempt = self.forward_fetch(
                        candidate,
                        &topic.name,
                        partition,
                        offset,
                        max_bytes,
                        max_wait,
                    );
                    match tokio::time::timeout(remaining, attempt).await {
                        Ok(Ok(outcome)) => return Ok(outcome),
                        Ok(Err(error @ BrokerError::OffsetOutOfRange { .. })) => return Err(error),
                        Ok(Err(error)) => last_error = error.to_string(),
                        Err(_) => last_error = format!("node {candidate} did not answer in time"),
                    }
                }
                Err(BrokerError::unavailable(
                    format!(
                        "no replica of partition {partition} of {:?} answered: {last_error}",
                        topic.name
                    ),
                    leader,
                ))
            }
        }
    }

    async fn read_local(
        &self,
        group: GroupId,
        offset: u64,
        max_bytes: u64,
    ) -> Result<FetchOutcome, BrokerError> {
        let read = self
            .inner
            .node
            .read(group, offset, max_bytes as usize)
            .await
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let mut records = Vec::new();
        let mut bytes = 0u64;
        for (base_offset, count, batch) in &read.batches {
            for record in decode_batch(batch, *base_offset, *count, offset, read.high_watermark)? {
                let size = (record.value.len() + record.key.as_ref().map_or(0, Bytes::len)) as u64;
                if !records.is_empty() && bytes + size > max_bytes {
                    return Ok(FetchOutcome {
                        records,
                        high_watermark: read.high_watermark,
                        log_start_offset: 0,
                    });
                }
                bytes += size;
                records.push(record);
            }
        }
        Ok(FetchOutcome {
            records,
            high_watermark: read.high_watermark,
            log_start_offset: 0,
        })
    }

    async fn forward_fetch(
        &self,
        target: NodeId,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u64,
        max_wait: Duration,
    ) -> Result<FetchOutcome, BrokerError> {
        let channel = self.inner.node.peers().channel(target).ok_or_else(|| {
            BrokerError::unavailable(format!("node {target} has no known address"), None)
        })?;
        let mut client = ordo_proto::v1::log_client::LogClient::new(channel)
            .max_decoding_message_size(usize::MAX);
        let mut request = tonic::Request::new(ordo_proto::v1::FetchRequest {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes: max_bytes.min(u64::from(u32::MAX)) as u32,
            max_wait_ms: max_wait.as_millis().min(u128::from(u32::MAX)) as u32,
        });
        request.metadata_mut().insert(
            FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request.set_timeout(max_wait + FORWARD_FETCH_GRACE);
        match client.fetch(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(FetchOutcome {
                    records: response
                        .records
                        .into_iter()
                        .map(|record| StoredRecord {
                            offset: record.offset,
                            key: record.key,
                            value: record.value,
                            headers: record
                                .headers
                                .into_iter()
                                .map(|header| (header.key, header.value))
                                .collect(),
                            timestamp_ms: record.timestamp_ms,
                        })
                        .collect(),
                    high_watermark: response.high_watermark,
                    log_start_offset: response.log_start_offset,
                })
            }
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                let end = status
                    .metadata()
                    .get("end-offset")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(0);
                Err(BrokerError::OffsetOutOfRange {
                    offset,
                    start: 0,
                    end,
                })
            }
            Err(status) => Err(BrokerError::unavailable(
                format!("node {target}: {}", status.message()),
                None,
            )),
        }
    }

    /// The high watermark watch of a local replica, for followers of the tail.
    pub fn local_high_watermark(
        &self,
        topic: &str,
        partition: u32,
    ) -> Option<watch::Receiver<u64>> {
        let topic = self.topic(topic).ok()?;
        self.inner
            .node
            .high_watermark(GroupId(topic.group(partition)))
    }

    // ------------------------------------------------------------------ admin

    /// Creates a topic and waits (until the deadline) for every partition to have a leader.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<TopicView, BrokerError> {
        let deadline = Instant::now() + timeout;
        validate_topic_name(name)?;
        let limits = &self.inner.options.limits;
        if partitions == 0 {
            return Err(BrokerError::invalid(
                "INVALID_PARTITIONS",
                "a topic needs at least 1 partition",
            ));
        }
        Limits::check(
            "partitions_per_topic_max",
            u64::from(partitions),
            u64::from(limits.partitions_per_topic_max),
        )?;
        if replication_factor == 0 {
            return Err(BrokerError::invalid(
                "INVALID_REPLICATION_FACTOR",
                "replication factor must be at least 1",
            ));
        }
        Limits::check(
            "replication_factor_max",
            u64::from(replication_factor),
            u64::from(limits.replication_factor_max),
        )?;
        let nodes: Vec<NodeId> = self.inner.options.nodes.keys().copied().collect();
        if replication_factor as usize > nodes.len() {
            return Err(BrokerError::FailedPrecondition(format!(
                "replication factor {replication_factor} is above the {} nodes of the cluster; use at most {}",
                nodes.len(),
                nodes.len()
            )));
        }
        let command = MetaCommand::CreateTopic {
            name: name.to_string(),
            partitions,
            replication_factor,
            config,
            nodes,
        };
        let topic = match self.meta_command(command, deadline).await? {
            MetaAnswer::Created(topic) => topic,
            MetaAnswer::AlreadyExists => return Err(BrokerError::TopicExists(name.to_string())),
            MetaAnswer::Rejected(reason) => return Err(BrokerError::FailedPrecondition(reason)),
            other => {
                return Err(BrokerError::Internal(format!(
                    "unexpected answer {other:?}"
                )));
            }
        };
        // Wait for the local state to include the topic and for leaders, so an immediate
        // produce finds them. Best effort within the deadline.
        let mut view = self.describe(&topic).await;
        while Instant::now() < deadline
            && view
                .partitions
                .iter()
                .any(|partition| partition.leader.is_none())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            view = self.describe(&topic).await;
        }
        Ok(view)
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str, timeout: Duration) -> Result<(), BrokerError> {
        validate_topic_name(name)?;
        match self
            .meta_command(
                MetaCommand::DeleteTopic {
                    name: name.to_string(),
                },
                Instant::now() + timeout,
            )
            .await?
        {
            MetaAnswer::Deleted => Ok(()),
            MetaAnswer::NotFound => Err(BrokerError::TopicNotFound(name.to_string())),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Every topic.
    pub fn list_topics(&self) -> Vec<Topic> {
        self.metadata().topics.values().cloned().collect()
    }

    /// A topic with live partition state.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicView, BrokerError> {
        validate_topic_name(name)?;
        let topic = self
            .topic_fresh(name, Instant::now() + Duration::from_secs(2))
            .await?;
        Ok(self.describe(&topic).await)
    }

    async fn describe(&self, topic: &Topic) -> TopicView {
        let groups: Vec<u64> = (0..topic.partitions.len() as u32)
            .map(|p| topic.group(p))
            .collect();
        let statuses = self.collect_status(&groups).await;
        let partitions = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(partition, replicas)| {
                let group = topic.group(partition as u32);
                let reports: Vec<&GroupStatus> = statuses
                    .values()
                    .filter_map(|list| list.as_ref())
                    .flat_map(|list| list.iter())
                    .filter(|status| status.group == group)
                    .collect();
                merge_partition(partition as u32, replicas, &reports)
            })
            .collect();
        TopicView {
            name: topic.name.clone(),
            replication_factor: topic.replication_factor,
            config: topic.config.clone(),
            partitions,
        }
    }

    /// The cluster as seen from here.
    pub async fn cluster_status(&self) -> ClusterView {
        let state = self.metadata();
        let groups: Vec<u64> = state
            .topics
            .values()
            .flat_map(|topic| (0..topic.partitions.len() as u32).map(|p| topic.group(p)))
            .collect();
        let statuses = self.collect_status(&groups).await;
        let meta = self.inner.node.status(ordo_raft::META_GROUP);
        let mut nodes = Vec::new();
        for (node, address) in &self.inner.options.nodes {
            let reports = statuses.get(node).and_then(|reports| reports.as_ref());
            let leader_count = reports
                .map(|reports| {
                    reports
                        .iter()
                        .filter(|status| status.leader == Some(*node))
                        .count() as u32
                })
                .unwrap_or(0);
            let replica_count = state
                .topics
                .values()
                .flat_map(|topic| topic.partitions.iter())
                .filter(|replicas| replicas.contains(node))
                .count() as u32;
            nodes.push(NodeView {
                node_id: *node,
                address: address.clone(),
                reachable: reports.is_some(),
                leader_count,
                replica_count,
            });
        }
        ClusterView {
            answered_by: self.node_id(),
            metadata_leader: meta.as_ref().and_then(|meta| meta.leader),
            metadata_term: meta.map(|meta| meta.term).unwrap_or(0),
            nodes,
            topics: state.topics.len() as u32,
            partitions: groups.len() as u32,
        }
    }

    /// This node's status of the given groups (all hosted groups when empty).
    pub fn local_status(&self, groups: &[u64]) -> Vec<GroupStatus> {
        let groups: Vec<GroupId> = if groups.is_empty() {
            self.inner.node.partition_groups()
        } else {
            groups.iter().map(|group| GroupId(*group)).collect()
        };
        groups
            .into_iter()
            .filter_map(|group| self.inner.node.status(group))
            .collect()
    }

    /// Every node's status of `groups`; `None` for a node that did not answer.
    async fn collect_status(&self, groups: &[u64]) -> BTreeMap<NodeId, Option<Vec<GroupStatus>>> {
        let me = self.node_id();
        let calls = self.inner.options.nodes.keys().copied().map(|node| {
            let groups = groups.to_vec();
            let broker = self.clone();
            async move {
                if node == me {
                    return (node, Some(broker.local_status(&groups)));
                }
                let Some(mut client) = broker.inner.node.peers().known_client(node) else {
                    return (node, None);
                };
                let mut request = tonic::Request::new(GroupStatusRequest { groups });
                request.set_timeout(Duration::from_secs(1));
                match client.group_status(request).await {
                    Ok(response) => (
                        node,
                        Some(
                            response
                                .into_inner()
                                .groups
                                .into_iter()
                                .map(|state| GroupStatus {
                                    group: state.group,
                                    leader: state.leader,
                                    term: state.term,
                                    high_watermark: state.high_watermark,
                                    last_log_index: state.last_log_index,
                                    matched: state.matched.into_iter().collect(),
                                    voters: Vec::new(),
                                })
                                .collect(),
                        ),
                    ),
                    Err(_) => (node, None),
                }
            }
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }

    /// Runs a metadata command on the metadata leader, forwarding if needed.
    async fn meta_command(
        &self,
        command: MetaCommand,
        deadline: Instant,
    ) -> Result<MetaAnswer, BrokerError> {
        let encoded = Bytes::from(postcard::to_stdvec(&command).map_err(|error| {
            BrokerError::Internal(format!("encoding a metadata command: {error}"))
        })?);
        let me = self.node_id();
        let mut last_error = String::from("no metadata leader known");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let leader = self.inner.node.meta_leader();
                return Err(BrokerError::Unavailable {
                    message: format!(
                        "the metadata group did not accept the command in time: {last_error}"
                    ),
                    leader,
                    leader_address: leader.and_then(|leader| self.address(leader)),
                });
            }
            let answer = match self.inner.node.meta_leader() {
                Some(leader) if leader == me => {
                    match self.inner.node.write_meta(encoded.clone(), remaining).await {
                        Ok(answer) => Some(answer),
                        Err(WriteError::OutcomeUnknown { reason, .. }) => {
                            return Err(BrokerError::OutcomeUnknown { message: reason });
                        }
                        Err(error) => {
                            last_error = error.to_string();
                            None
                        }
                    }
                }
                Some(leader) => match self.inner.node.peers().known_client(leader) {
                    Some(mut client) => {
                        let mut request = tonic::Request::new(ForwardMetaRequest {
                            command: encoded.clone(),
                        });
                        request.set_timeout(remaining);
                        match client.forward_meta(request).await {
                            Ok(response) if !response.get_ref().not_leader => {
                                Some(response.into_inner().response)
                            }
                            Ok(_) => {
                                last_error =
                                    format!("node {leader} is no longer the metadata leader");
                                None
                            }
                            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                                return Err(BrokerError::OutcomeUnknown {
                                    message: status.message().to_string(),
                                });
                            }
                            Err(status) => {
                                last_error = format!("node {leader}: {}", status.message());
                                None
                            }
                        }
                    }
                    None => None,
                },
                None => None,
            };
            if let Some(answer) = answer {
                let answer: MetaAnswer = postcard::from_bytes(&answer).map_err(|error| {
                    BrokerError::Internal(format!("undecodable metadata answer: {error}"))
                })?;
                // Wait until this node applied the command too, so reads that follow see it.
                let mut meta = self.inner.meta.clone();
                let _ = tokio::time::timeout(remaining, async {
                    while meta.borrow_and_update().applied_index == 0
                        && matches!(answer, MetaAnswer::Created(_))
                    {
                        if meta.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .await;
                if let MetaAnswer::Created(topic) = &answer {
                    let _ = tokio::time::timeout(remaining, async {
                        while !meta
                            .borrow_and_update()
                            .topics
                            .values()
                            .any(|known| known.id == topic.id)
                        {
                            if meta.changed().await.is_err() {
                                break;
                            }
                        }
                    })
                    .await;
                }
                return Ok(answer);
            }
            tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
        }
    }

    /// Serves a forwarded metadata command: `Ok(None)` when this node is not the leader.
    pub async fn handle_forward_meta(
        &self,
        command: Bytes,
        timeout: Duration,
    ) -> Result<Option<Bytes>, BrokerError> {
        match self.inner.node.write_meta(command, timeout).await {
            Ok(answer) => Ok(Some(answer)),
            Err(WriteError::NotLeader { .. } | WriteError::GroupNotFound(_)) => Ok(None),
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                Err(BrokerError::OutcomeUnknown { message: reason })
            }
            Err(error) => Err(BrokerError::unavailable(error.to_string(), None)),
        }
    }

    // ------------------------------------------------------------------ background

    /// Keeps this node's partition groups in line with the metadata: starts the groups of
    /// partitions it replicates, removes those of deleted topics.
    async fn reconcile_loop(self, mut shutdown: watch::Receiver<bool>) {
        let mut meta = self.inner.meta.clone();
        let me = self.node_id();
        for (node, address) in &self.inner.options.nodes {
            self.inner.node.peers().set_address(*node, address);
        }
        loop {
            let state = meta.borrow_and_update().clone();
            let mut wanted = std::collections::HashSet::new();
            for topic in state.topics.values() {
                for (partition, replicas) in topic.partitions.iter().enumerate() {
                    if !replicas.contains(&me) {
                        continue;
                    }
                    let group = GroupId(topic.group(partition as u32));
                    wanted.insert(group);
                    let members: BTreeMap<NodeId, String> = replicas
                        .iter()
                        .filter_map(|node| self.address(*node).map(|address| (*node, address)))
                        .collect();
                    let span =
                        tracing::info_span!("partition", node = me, topic = %topic.name, partition);
                    let started = self
                        .inner
                        .node
                        .ensure_partition(group, &members, replicas[0] == me)
                        .instrument(span)
                        .await;
                    if let Err(error) = started {
                        tracing::error!(%group, %error, "cannot start partition group");
                    }
                }
            }
            // Leader hints of deleted topics would otherwise stay forever.
            let existing: std::collections::HashSet<u64> = state
                .topics
                .values()
                .flat_map(|topic| (0..topic.partitions.len() as u32).map(|p| topic.group(p)))
                .collect();
            self.inner
                .leader_hints
                .lock()
                .expect("hint lock is never poisoned")
                .retain(|group, _| existing.contains(&group.0));
            for group in self.inner.node.partition_groups() {
                if !wanted.contains(&group) {
                    tracing::info!(%group, "removing partition group of a deleted topic");
                    if let Err(error) = self.inner.node.remove_partition(group).await {
                        tracing::error!(%group, %error, "cannot remove partition group");
                    }
                }
            }
            tokio::select! {
                changed = meta.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Hands leadership of each partition back to its preferred leader (its first replica) once
    /// that replica is caught up, so leaders stay spread evenly after failures (Kafka's
    /// preferred leader election).
    async fn leader_balance_loop(self, mut shutdown: watch::Receiver<bool>) {
        const TRANSFERS_PER_ROUND_MAX: usize = 32;
        let me = self.node_id();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.inner.options.leader_balance_interval) => {}
            }
            let state = self.metadata();
            let mut transfers = 0;
            for topic in state.topics.values() {
                for (partition, replicas) in topic.partitions.iter().enumerate() {
                    let preferred = replicas[0];
                    if preferred == me || transfers >= TRANSFERS_PER_ROUND_MAX {
                        continue;
                    }
                    let group = GroupId(topic.group(partition as u32));
                    let Some(status) = self.inner.node.status(group) else {
                        continue;
                    };
                    if status.leader != Some(me)
                        || status.matched.get(&preferred) != Some(&status.last_log_index)
                    {
                        continue;
                    }
                    tracing::info!(topic = %topic.name, partition, to = preferred, "handing leadership to the preferred leader");
                    if let Err(error) = self.inner.node.transfer_leader(group, preferred).await {
                        tracing::warn!(%group, %error, "leader transfer failed");
                    }
                    transfers += 1;
                }
            }
        }
    }
}

/// Puts per-partition results back in request order. When some partitions committed and others
/// failed, the call cannot honestly say "nothing was written" (UNAVAILABLE): it reports
/// OUTCOME_UNKNOWN, naming what did commit.
fn combine_acks(
    results: Vec<Result<(u32, Vec<usize>, u64), BrokerError>>,
    total: usize,
) -> Result<Vec<(u32, u64)>, BrokerError> {
    let committed: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().ok())
        .map(|(partition, positions, base)| {
            format!(
                "partition {partition} at offsets {base}..{}",
                base + positions.len() as u64
            )
        })
        .collect();
    let mut acks = vec![(0u32, 0u64); total];
    let mut first_error = None;
    for result in results {
        match result {
            Ok((partition, positions, base)) => {
                for (i, position) in positions.into_iter().enumerate() {
                    acks[position] = (partition, base + i as u64);
                }
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        None => Ok(acks),
        Some(error) if committed.is_empty() => Err(error),
        Some(error) => Err(BrokerError::OutcomeUnknown {
            message: format!(
                "part of the request was committed ({}) and part failed: {error}",
                committed.join(", ")
            ),
        }),
    }
}

/// The answer to a forwarded append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardResult {
    /// Committed at this base offset.
    Appended(u64),
    /// Not proposed: the node does not lead the group; the leader it knows of.
    NotLeader(Option<NodeId>),
    /// Proposed, then discarded by a leader change; the new leader it knows of.
    Discarded(Option<NodeId>),
}

enum ForwardError {
    /// The remote reported the outcome unknown.
    OutcomeUnknown(String),
    /// The call failed in a way that may or may not have reached the leader.
    Ambiguous(String),
    /// The call certainly did not propose anything.
    Unreachable(String),
}

/// Merges replicas' reports of one partition: the leader's own report wins.
fn merge_partition(partition: u32, replicas: &[NodeId], reports: &[&GroupStatus]) -> PartitionView {
    let best = reports.iter().max_by_key(|status| status.term).copied();
    let leader_report = best.and_then(|best| best.leader).and_then(|leader| {
        reports
            .iter()
            .find(|status| status.leader == Some(leader) && !status.matched.is_empty())
            .copied()
    });
    let high_watermark = leader_report
        .map(|report| report.high_watermark)
        .unwrap_or_else(|| {
            reports
                .iter()
                .map(|status| status.high_watermark)
                .max()
                .unwrap_or(0)
        });
    let lag = replicas
        .iter()
        .map(|replica| {
            let lag = leader_report.and_then(|report| {
                report
                    .matched
                    .get(replica)
                    .map(|matched| report.last_log_index.saturating_sub(*matched))
            });
            (*replica, lag)
        })
        .collect();
    PartitionView {
        partition,
        leader: best.and_then(|best| best.leader),
        replicas: replicas.to_vec(),
        high_watermark,
        term: best.map(|best| best.term).unwrap_or(0),
        lag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> BrokerError {
        BrokerError::unavailable("no leader", None)
    }

    /// Acks come back in request order; a failure with nothing committed keeps its own error
    /// (UNAVAILABLE stays "nothing written"); a partial commit is never reported as UNAVAILABLE.
    #[test]
    fn partial_failures_are_outcome_unknown() {
        let acks = combine_acks(vec![Ok((1, vec![0, 2], 10)), Ok((0, vec![1], 5))], 3).unwrap();
        assert_eq!(acks, vec![(1, 10), (0, 5), (1, 11)]);
        let all_failed = combine_acks(vec![Err(unavailable()), Err(unavailable())], 2);
        assert!(matches!(all_failed, Err(BrokerError::Unavailable { .. })));
        // The committed part holds the request's later records: their positions are beyond
        // the count of committed records (this panicked once).
        let partial = combine_acks(vec![Err(unavailable()), Ok((1, vec![2, 3], 10))], 4);
        match partial {
            Err(BrokerError::OutcomeUnknown { message }) => {
                assert!(message.contains("partition 1 at offsets 10..12"))
            }
            other => panic!("expected OutcomeUnknown, got {other:?}"),
        }
    }
}
