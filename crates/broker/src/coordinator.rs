//! Consumer group coordinators, the service: every group call arrives at any node, which finds
//! the group's coordinator shard (the group name's FNV-1a hash modulo the shards) and runs the
//! call on that shard's leader, here or forwarded (`Internal/ForwardCoordinator`).
//!
//! On the leader:
//! - Changes go through the shard's Raft group (`coordinator_state`, applied on every replica),
//!   so a commit is acked only once a quorum has it on disk. A heartbeat that changes nothing (the
//!   common case) is answered from the leader's applied state without a write, after a read
//!   barrier (a quorum confirms the leadership and the state holds everything committed): a
//!   deposed leader never answers from stale state.
//! - Liveness is the leader's alone: each heartbeat restarts its member's session timer when it
//!   arrives, and the expiry loop proposes [`GroupCommand::Expire`] for members silent past their
//!   session timeout. The decision and a heartbeat's arrival exclude each other: once a member is
//!   being expired, its heartbeats wait for the outcome (then `UNKNOWN_MEMBER`), so no member is
//!   told it owns partitions that an expiry is about to give away. A new leader starts every
//!   member's timer afresh (like Kafka's coordinator failover). The member itself gives its
//!   partitions up a session after it sent its last answered heartbeat, which is no later than
//!   the coordinator's timer ends.
//! - Reads (offsets, describe, list) pass a read barrier first: linearizable.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_raft::GroupId;
use ordo_raft::WriteError;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::Broker;
use crate::BrokerError;
use crate::NodeId;
use crate::coordinator_state::ShardAnswer;
use crate::coordinator_state::ShardCommand;
use crate::coordinator_state::ShardLimits;
use crate::coordinator_state::SharedShard;
use crate::error::GroupRefusal;
use crate::group_state::Committed;
use crate::group_state::GroupAnswer;
use crate::group_state::GroupCommand;
use crate::group_state::GroupState;
use crate::group_state::TopicPartition;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::Topic;
use crate::names::validate_group_name;
use crate::names::validate_member_id;
use crate::peer::CallError;
use crate::rpc::CallFailure;

/// How often the leader of a shard looks for members whose session timed out.
const EXPIRY_INTERVAL: Duration = Duration::from_millis(200);
/// Pause before the next attempt after a coordinator was not the leader.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between attempts.
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(200);
/// Replicas per coordinator shard (fewer when the cluster has fewer nodes).
const COORDINATOR_REPLICAS: u32 = 3;

/// A group call as the coordinator's leader runs it (forwarded encoded with postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum CoordinatorRequest {
    /// A heartbeat (validated by the node that took the call).
    Heartbeat {
        group: String,
        member_id: String,
        epoch: u32,
        subscriptions: BTreeSet<String>,
        owned: BTreeSet<TopicPartition>,
        session_timeout_ms: u64,
    },
    /// A member leaves.
    Leave {
        group: String,
        member_id: String,
        epoch: u32,
    },
    /// Commit offsets: `(partition, next offset, metadata)`.
    Commit {
        group: String,
        member_id: String,
        epoch: u32,
        offsets: Vec<(TopicPartition, u64, String)>,
    },
    /// Set offsets while the group is empty.
    Reset {
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// Delete an empty group.
    Delete { group: String },
    /// A group's state.
    Read { group: String },
    /// Every group of the shard: `(name, members, committed partitions)`.
    List,
    /// A call for a queue partition's leader (the "shard" is the queue partition's group).
    Queue(crate::queue::QueueRequest),
}

/// What the coordinator's leader answers (forwarded encoded with postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum CoordinatorOutcome {
    /// The shard's answer to a command.
    Answer(ShardAnswer),
    /// A group's state (`None`: no such group).
    Group(Option<GroupState>),
    /// The shard's groups.
    List(Vec<GroupSummary>),
    /// Nothing done: this node does not lead the shard; the leader it knows of.
    NotLeader(Option<NodeId>),
    /// Proposed, then not confirmed (timeout, leader change): it may or may not be applied.
    Unknown(String),
    /// A queue partition's answer.
    Queue(crate::queue::QueueOutcome),
}

/// One group, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// Members now.
    pub members: u32,
    /// Partitions with a committed offset.
    pub committed_partitions: u32,
}

/// A heartbeat as the public call carries it.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// The group.
    pub group: String,
    /// The member's id (empty on a join to be given one).
    pub member_id: String,
    /// Its epoch (0 to join).
    pub epoch: u32,
    /// The topics it subscribes to.
    pub subscriptions: BTreeSet<String>,
    /// What it owns now.
    pub owned: BTreeSet<TopicPartition>,
    /// The session timeout it asks for (0: the default).
    pub session_timeout_ms: u64,
}

/// A heartbeat's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The member's id.
    pub member_id: String,
    /// Its epoch.
    pub epoch: u32,
    /// What it may own now.
    pub assigned: BTreeSet<TopicPartition>,
    /// When to heartbeat next.
    pub heartbeat_interval_ms: u64,
    /// Its session timeout.
    pub session_timeout_ms: u64,
}

/// One partition of a described group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPartition {
    /// The partition.
    pub partition: TopicPartition,
    /// Its committed offset.
    pub committed: Option<Committed>,
    /// Its high watermark, when known.
    pub log_end: Option<u64>,
    /// The member owning it (empty: none).
    pub owner: String,
}

/// A described group.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    /// The group's state.
    pub state: GroupState,
    /// Every partition of the subscribed topics and every partition with a committed offset.
    pub partitions: Vec<GroupPartition>,
    /// The node leading its coordinator shard.
    pub coordinator: Option<NodeId>,
}

/// One group's figures, for metrics: reported by the leader of its coordinator shard only, so
/// each group appears once in the cluster.
#[derive(Debug, Clone, Default)]
pub struct GroupMetrics {
    /// The group.
    pub group: String,
    /// Members now.
    pub members: u32,
    /// Times the members or their subscriptions changed (the group epoch).
    pub rebalances: u32,
    /// Per partition with a committed offset: `(topic, partition, committed, lag)`; the lag when
    /// the partition's leader reported its end.
    pub partitions: Vec<(String, u32, u64, Option<u64>)>,
}

/// Where an explicit reset moves offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    /// The first offset of each partition.
    Earliest,
    /// The end of each partition now.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first offset whose record timestamp is at or after this time (the end when none is).
    Time(i64),
}

/// The coordinator shards this node hosts, and their leaders' session timers.
#[derive(Default)]
pub(crate) struct Coordinators {
    /// Each hosted shard's state, shared with its Raft group.
    shards: Mutex<HashMap<GroupId, SharedShard>>,
    /// Per shard led here: the term of the timers, each `(group, member)`'s session end, and
    /// the members being expired.
    sessions: Mutex<HashMap<GroupId, ShardSessions>>,
}

#[derive(Default)]
struct ShardSessions {
    term: u64,
    deadlines: HashMap<(String, String), Instant>,
    expiring: std::collections::HashSet<(String, String)>,
}

impl ShardSessions {
    /// The sessions of `term`: a new term starts afresh.
    fn of_term(&mut self, term: u64) -> &mut Self {
        if self.term != term {
            *self = ShardSessions {
                term,
                ..ShardSessions::default()
            };
        }
        self
    }
}

impl Coordinators {
    fn shard(&self, group: GroupId) -> Option<SharedShard> {
        self.shards
            .lock()
            .expect("coordinator lock is never poisoned")
            .get(&group)
            .cloned()
    }

    /// Every hosted shard.
    fn all(&self) -> Vec<(GroupId, SharedShard)> {
        self.shards
            .lock()
            .expect("coordinator lock is never poisoned")
            .iter()
            .map(|(group, shard)| (*group, shard.clone()))
            .collect()
    }

    /// A new shard state for a group about to start.
    pub(crate) fn open(&self, group: GroupId) -> SharedShard {
        let shard = SharedShard::default();
        self.shards
            .lock()
            .expect("coordinator lock is never poisoned")
            .insert(group, shard.clone());
        shard
    }

    /// A member's heartbeat arrived: restarts its session timer, unless the member is being
    /// expired (then false: the heartbeat must wait for the expiry's outcome).
    fn arrive(
        &self,
        shard: GroupId,
        term: u64,
        group: &str,
        member: &str,
        timeout_ms: u64,
    ) -> bool {
        let mut sessions = self
            .sessions
            .lock()
            .expect("session lock is never poisoned");
        let sessions = sessions.entry(shard).or_default().of_term(term);
        let key = (group.to_owned(), member.to_owned());
        if sessions.expiring.contains(&key) {
            return false;
        }
        sessions
            .deadlines
            .insert(key, Instant::now() + Duration::from_millis(timeout_ms));
        true
    }

    /// The expiry of `members` of `group` was decided: they are no longer being expired.
    fn expired(&self, shard: GroupId, group: &str, members: &[(String, u32)]) {
        let mut sessions = self
            .sessions
            .lock()
            .expect("session lock is never poisoned");
        if let Some(sessions) = sessions.get_mut(&shard) {
            for (member, _) in members {
                sessions
                    .expiring
                    .remove(&(group.to_owned(), member.clone()));
            }
        }
    }
}

/// Applies a committed reset or commit's answer: `Ok` or the refusal.
fn refusal_of(answer: ShardAnswer, group: &str) -> Result<ShardAnswer, BrokerError> {
    let refused = |refusal| Err(BrokerError::GroupRefused(refusal));
    match answer {
        ShardAnswer::Group(GroupAnswer::FencedMember { current_epoch }) => {
            refused(GroupRefusal::FencedMember { current_epoch })
        }
        ShardAnswer::Group(GroupAnswer::UnknownMember) => refused(GroupRefusal::UnknownMember),
        ShardAnswer::Group(GroupAnswer::NotAssigned(partitions)) => {
            refused(GroupRefusal::NotAssigned(
                partitions
                    .into_iter()
                    .map(|tp| (tp.topic, tp.partition))
                    .collect(),
            ))
        }
        ShardAnswer::Group(GroupAnswer::Backward(partitions)) => {
            refused(GroupRefusal::CommitBackward(
                partitions
                    .into_iter()
                    .map(|(tp, committed)| (tp.topic, tp.partition, committed))
                    .collect(),
            ))
        }
        ShardAnswer::Group(GroupAnswer::NotEmpty) => refused(GroupRefusal::NotEmpty),
        ShardAnswer::TooManyGroups { max } => refused(GroupRefusal::TooManyGroups { max }),
        ShardAnswer::TooManyMembers { max } => refused(GroupRefusal::TooManyMembers { max }),
        ShardAnswer::NotFound => Err(BrokerError::GroupNotFound(group.to_owned())),
        ShardAnswer::Undecodable(reason) => Err(BrokerError::Internal(format!(
            "the coordinator could not decode the command: {reason}"
        ))),
        answer => Ok(answer),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, BrokerError> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|error| BrokerError::Internal(format!("encoding a coordinator message: {error}")))
}

impl Broker {
    /// The coordinator shards, creating them (once in the cluster's life) if they do not exist.
    async fn coordinator_topic(&self, deadline: Instant) -> Result<Topic, BrokerError> {
        if let Some(topic) = self.metadata().coordinators.clone() {
            return Ok(topic);
        }
        match self
            .meta_command(self.create_coordinators_command(), deadline)
            .await?
        {
            MetaAnswer::Created(topic) => Ok(topic),
            MetaAnswer::AlreadyExists => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if let Some(index) = self.meta_read_index(remaining).await {
                    self.state.node.wait_meta_applied(index, remaining).await;
                }
                self.metadata().coordinators.clone().ok_or_else(|| {
                    BrokerError::unavailable("the group coordinators are being created", None)
                })
            }
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    pub(crate) fn create_coordinators_command(&self) -> MetaCommand {
        let nodes: Vec<NodeId> = self.placement_nodes();
        MetaCommand::CreateCoordinators {
            shards: self.state.options.groups.coordinator_shards,
            replication_factor: COORDINATOR_REPLICAS.min(nodes.len() as u32).max(1),
            nodes,
        }
    }

    /// The Raft group of a group name's coordinator shard, and the shard's replicas.
    fn shard_of(topic: &Topic, group: &str) -> (GroupId, Vec<NodeId>) {
        let shards = topic.partitions.len() as u64;
        let shard = (ordo_proto::partition::fnv1a64(group.as_bytes()) % shards) as u32;
        (
            GroupId(topic.group(shard)),
            topic.partitions[shard as usize].clone(),
        )
    }

    /// Runs a request on its shard's leader until it answers or the deadline passes.
    pub(crate) async fn on_coordinator(
        &self,
        shard: GroupId,
        replicas: &[NodeId],
        request: &CoordinatorRequest,
        deadline: Instant,
    ) -> Result<CoordinatorOutcome, BrokerError> {
        let encoded = encode(request)?;
        let me = self.node_id();
        let mut attempt = 0usize;
        let mut maybe_done = false;
        let mut pause = RETRY_PAUSE;
        let mut last_error = String::from("no coordinator leader known");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let message = format!("the group coordinator did not answer in time: {last_error}");
                if maybe_done {
                    return Err(BrokerError::OutcomeUnknown { message });
                }
                let leader = self.leader_hint(shard);
                return Err(BrokerError::Unavailable {
                    message,
                    leader,
                    leader_address: leader.and_then(|leader| self.address(leader)),
                });
            }
            let target = self
                .leader_hint(shard)
                .or_else(|| self.local_view_of_leader(shard))
                .unwrap_or_else(|| replicas[attempt % replicas.len()]);
            attempt += 1;
            let outcome = if target == me {
                Ok(self.coordinate(shard, request.clone(), remaining).await)
            } else {
                self.peer(target)
                    .forward_coordinator(shard, encoded.clone(), remaining)
                    .await
            };
            match outcome {
                Ok(CoordinatorOutcome::NotLeader(hint)) => {
                    let hint = hint.filter(|hint| *hint != target);
                    self.set_leader_hint(shard, hint);
                    last_error = format!("node {target} does not lead the group's coordinator");
                    // Follow a redirect at once, a few times.
                    if hint.is_some() && attempt <= replicas.len() {
                        continue;
                    }
                }
                Ok(CoordinatorOutcome::Unknown(reason)) => {
                    // Every group command may be applied twice: retry within the deadline.
                    self.set_leader_hint(shard, None);
                    maybe_done = true;
                    last_error = reason;
                }
                Ok(outcome) => {
                    self.set_leader_hint(shard, Some(target));
                    return Ok(outcome);
                }
                Err(CallError { failure, message }) => {
                    self.set_leader_hint(shard, None);
                    if matches!(
                        failure,
                        CallFailure::MaybeDone | CallFailure::OutcomeUnknown
                    ) {
                        maybe_done = true;
                    }
                    last_error = message;
                }
            }
            tokio::time::sleep(pause.min(remaining)).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }

    /// Runs a request on the group's coordinator: the shard's answer, or its refusal as an
    /// error.
    async fn group_call(
        &self,
        group: &str,
        request: CoordinatorRequest,
        timeout: Option<Duration>,
    ) -> Result<CoordinatorOutcome, BrokerError> {
        let deadline =
            Instant::now() + timeout.unwrap_or_else(|| self.state.options.groups.call_timeout());
        let topic = self.coordinator_topic(deadline).await?;
        let (shard, replicas) = Self::shard_of(&topic, group);
        match self
            .on_coordinator(shard, &replicas, &request, deadline)
            .await?
        {
            CoordinatorOutcome::Answer(answer) => {
                refusal_of(answer, group).map(CoordinatorOutcome::Answer)
            }
            outcome => Ok(outcome),
        }
    }

    /// Serves a forwarded coordinator request: this node must lead the shard.
    pub async fn handle_forward_coordinator(
        &self,
        shard: u64,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, BrokerError> {
        let request: CoordinatorRequest = postcard::from_bytes(request).map_err(|error| {
            BrokerError::invalid(
                ordo_proto::errors::reason::MALFORMED_MESSAGE,
                format!("undecodable coordinator request: {error}"),
            )
        })?;
        encode(&self.coordinate(GroupId(shard), request, timeout).await)
    }

    /// Runs a request on this node, which must lead the shard.
    async fn coordinate(
        &self,
        shard: GroupId,
        request: CoordinatorRequest,
        timeout: Duration,
    ) -> CoordinatorOutcome {
        if let CoordinatorRequest::Queue(request) = request {
            return self.serve_queue(shard, request, timeout).await;
        }
        let Some(state) = self.state.coordinators.shard(shard) else {
            return CoordinatorOutcome::NotLeader(None);
        };
        let Some(term) = self.leading_term(shard) else {
            return CoordinatorOutcome::NotLeader(self.local_view_of_leader(shard));
        };
        let limits = ShardLimits {
            groups_max: self.state.options.groups.groups_per_shard_max,
            members_max: self.state.options.groups.members_per_group_max,
        };
        let command = |group: String, command: GroupCommand| ShardCommand::Group {
            group,
            command,
            limits,
        };
        match request {
            CoordinatorRequest::Heartbeat {
                group,
                member_id,
                epoch,
                subscriptions,
                owned,
                session_timeout_ms,
            } => {
                // The session restarts when the heartbeat arrives; a member being expired waits
                // for the expiry's outcome.
                let arrived = Instant::now();
                while !self.state.coordinators.arrive(
                    shard,
                    term,
                    &group,
                    &member_id,
                    session_timeout_ms,
                ) {
                    if arrived.elapsed() >= timeout {
                        return CoordinatorOutcome::NotLeader(None);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let topics = self.partition_counts(&state, &group, &subscriptions);
                let heartbeat = GroupCommand::Heartbeat {
                    member_id,
                    epoch,
                    subscriptions,
                    owned,
                    topics,
                    session_timeout_ms,
                };
                // Answered without a write when it changes nothing, from a state a quorum
                // confirmed current.
                if let Err(outcome) = self.barrier(shard, timeout).await {
                    return outcome;
                }
                let (answer, changed) = state.read(|state| state.dry_run(&group, &heartbeat));
                if !changed {
                    return CoordinatorOutcome::Answer(ShardAnswer::Group(answer));
                }
                self.propose_shard(shard, &command(group, heartbeat), timeout)
                    .await
            }
            CoordinatorRequest::Leave {
                group,
                member_id,
                epoch,
            } => {
                let topics = self.partition_counts(&state, &group, &BTreeSet::new());
                let leave = GroupCommand::Leave {
                    member_id,
                    epoch,
                    topics,
                };
                self.propose_shard(shard, &command(group, leave), timeout)
                    .await
            }
            CoordinatorRequest::Commit {
                group,
                member_id,
                epoch,
                offsets,
            } => {
                let commit = GroupCommand::Commit {
                    member_id,
                    epoch,
                    offsets,
                };
                self.propose_shard(shard, &command(group, commit), timeout)
                    .await
            }
            CoordinatorRequest::Reset { group, offsets } => {
                self.propose_shard(
                    shard,
                    &command(group, GroupCommand::Reset { offsets }),
                    timeout,
                )
                .await
            }
            CoordinatorRequest::Delete { group } => {
                self.propose_shard(shard, &ShardCommand::Delete { group }, timeout)
                    .await
            }
            CoordinatorRequest::Read { group } => {
                if let Err(outcome) = self.barrier(shard, timeout).await {
                    return outcome;
                }
                CoordinatorOutcome::Group(state.read(|state| state.group(&group).cloned()))
            }
            CoordinatorRequest::List => {
                if let Err(outcome) = self.barrier(shard, timeout).await {
                    return outcome;
                }
                CoordinatorOutcome::List(state.read(|state| {
                    state
                        .groups()
                        .map(|(name, group)| GroupSummary {
                            name: name.clone(),
                            members: group.members.len() as u32,
                            committed_partitions: group.offsets.len() as u32,
                        })
                        .collect()
                }))
            }
            // Served above.
            CoordinatorRequest::Queue(_) => CoordinatorOutcome::NotLeader(None),
        }
    }

    /// The term this node leads `shard` in, if it does.
    pub(crate) fn leading_term(&self, shard: GroupId) -> Option<u64> {
        let status = self.state.node.status(shard)?;
        (status.leader == Some(self.node_id())).then_some(status.term)
    }

    pub(crate) async fn barrier(
        &self,
        shard: GroupId,
        timeout: Duration,
    ) -> Result<(), CoordinatorOutcome> {
        match self.state.node.read_barrier(shard, timeout).await {
            Ok(()) => Ok(()),
            Err(WriteError::NotLeader { leader, .. }) => Err(CoordinatorOutcome::NotLeader(leader)),
            Err(_) => Err(CoordinatorOutcome::NotLeader(None)),
        }
    }

    /// Partitions per topic that the group's members (and `extra`) subscribe to, as this node's
    /// metadata has them.
    fn partition_counts(
        &self,
        state: &SharedShard,
        group: &str,
        extra: &BTreeSet<String>,
    ) -> BTreeMap<String, u32> {
        let mut topics: BTreeSet<String> = extra.clone();
        state.read(|state| {
            if let Some(group) = state.group(group) {
                for member in group.members.values() {
                    topics.extend(member.subscriptions.iter().cloned());
                }
            }
        });
        let meta = self.metadata();
        topics
            .into_iter()
            .filter_map(|topic| {
                let partitions = meta.topics.get(&topic)?.partitions.len() as u32;
                Some((topic, partitions))
            })
            .collect()
    }

    /// Proposes a shard command on this node, which leads the shard.
    async fn propose_shard(
        &self,
        shard: GroupId,
        command: &ShardCommand,
        timeout: Duration,
    ) -> CoordinatorOutcome {
        match self.propose_state(shard, command, timeout).await {
            Ok(answer) => CoordinatorOutcome::Answer(answer),
            Err(outcome) => outcome,
        }
    }

    /// Proposes a command to a state group this node leads, and decodes its answer; a failure
    /// as the outcome to return (not the leader, or not confirmed).
    pub(crate) async fn propose_state<C: Serialize, A: serde::de::DeserializeOwned>(
        &self,
        group: GroupId,
        command: &C,
        timeout: Duration,
    ) -> Result<A, CoordinatorOutcome> {
        let encoded =
            encode(command).map_err(|error| CoordinatorOutcome::Unknown(error.to_string()))?;
        match self.state.node.write_state(group, encoded, timeout).await {
            Ok(answer) => postcard::from_bytes::<A>(&answer).map_err(|error| {
                CoordinatorOutcome::Unknown(format!("undecodable state group answer: {error}"))
            }),
            Err(WriteError::NotLeader { leader, .. }) => Err(CoordinatorOutcome::NotLeader(leader)),
            Err(WriteError::GroupNotFound(_)) => Err(CoordinatorOutcome::NotLeader(None)),
            Err(error) => Err(CoordinatorOutcome::Unknown(error.to_string())),
        }
    }

    /// On each shard this node leads: expires members silent past their session timeout. Shards
    /// are handled side by side, so one without a quorum does not hold up the others.
    pub(crate) async fn expiry_loop(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(EXPIRY_INTERVAL) => {}
            }
            let rounds = self
                .state
                .coordinators
                .all()
                .into_iter()
                .map(|(shard, state)| self.expire_in(shard, state));
            futures::future::join_all(rounds).await;
        }
    }

    /// Expires the silent members of one shard, if this node leads it.
    async fn expire_in(&self, shard: GroupId, state: SharedShard) {
        let Some(term) = self.leading_term(shard) else {
            self.state
                .coordinators
                .sessions
                .lock()
                .expect("session lock is never poisoned")
                .remove(&shard);
            return;
        };
        for (group, members) in self.expired_members(shard, term, &state) {
            let topics = self.partition_counts(&state, &group, &BTreeSet::new());
            tracing::info!(%group, ?members, "session timed out: expiring members");
            let command = ShardCommand::Group {
                group: group.clone(),
                command: GroupCommand::Expire {
                    members: members.clone(),
                    topics,
                },
                limits: ShardLimits {
                    groups_max: self.state.options.groups.groups_per_shard_max,
                    members_max: self.state.options.groups.members_per_group_max,
                },
            };
            let outcome = self
                .propose_shard(shard, &command, self.state.options.groups.call_timeout())
                .await;
            if !matches!(outcome, CoordinatorOutcome::Answer(_)) {
                tracing::warn!(%group, ?outcome, "expiring members");
            }
            // Applied or not, the waiting heartbeats go on and find the outcome in the state
            // after their read barrier (which also settles a leadership an unknown outcome put
            // in doubt).
            self.state.coordinators.expired(shard, &group, &members);
        }
    }

    /// The members of `shard`'s groups whose session ended, by group: `(member, epoch)`. Starts
    /// the timers of members not timed yet (new in this term) and forgets those gone.
    fn expired_members(
        &self,
        shard: GroupId,
        term: u64,
        state: &SharedShard,
    ) -> BTreeMap<String, Vec<(String, u32)>> {
        let members: Vec<(String, String, u32, u64)> = state.read(|state| {
            state
                .groups()
                .flat_map(|(name, group)| {
                    group.members.iter().map(|(id, member)| {
                        (
                            name.clone(),
                            id.clone(),
                            member.epoch,
                            member.session_timeout_ms,
                        )
                    })
                })
                .collect()
        });
        let now = Instant::now();
        let mut sessions = self
            .state
            .coordinators
            .sessions
            .lock()
            .expect("session lock is never poisoned");
        let sessions = sessions.entry(shard).or_default().of_term(term);
        let mut live = std::collections::HashSet::new();
        let mut expired: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for (group, member, epoch, timeout_ms) in members {
            let key = (group.clone(), member.clone());
            let deadline = *sessions
                .deadlines
                .entry(key.clone())
                .or_insert_with(|| now + Duration::from_millis(timeout_ms));
            if deadline <= now && !sessions.expiring.contains(&key) {
                sessions.expiring.insert(key.clone());
                expired.entry(group).or_default().push((member, epoch));
            }
            live.insert(key);
        }
        sessions.deadlines.retain(|key, _| live.contains(key));
        expired
    }

    /// The figures of every group whose coordinator shard this node leads (state as applied
    /// here, without a read barrier), with each partition's lag from its leader's end.
    pub async fn group_metrics(&self) -> Vec<GroupMetrics> {
        let shards = self.state.coordinators.all();
        let mut groups = Vec::new();
        for (shard, state) in shards {
            if self.leading_term(shard).is_none() {
                continue;
            }
            state.read(|state| {
                for (name, group) in state.groups() {
                    groups.push(GroupMetrics {
                        group: name.clone(),
                        members: group.members.len() as u32,
                        rebalances: group.group_epoch,
                        partitions: group
                            .offsets
                            .iter()
                            .map(|(tp, committed)| {
                                (tp.topic.clone(), tp.partition, committed.offset, None)
                            })
                            .collect(),
                    });
                }
            });
        }
        let topics: BTreeSet<String> = groups
            .iter()
            .flat_map(|group| group.partitions.iter().map(|(topic, ..)| topic.clone()))
            .collect();
        let meta = self.metadata();
        let mut ends: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for name in topics {
            let Some(topic) = meta.topics.get(&name) else {
                continue;
            };
            for partition in self.describe(topic).await.partitions {
                if partition.leader.is_some() {
                    ends.insert(
                        (name.clone(), partition.partition),
                        partition.high_watermark,
                    );
                }
            }
        }
        for group in &mut groups {
            for (topic, partition, committed, lag) in &mut group.partitions {
                *lag = ends
                    .get(&(topic.clone(), *partition))
                    .map(|end| end.saturating_sub(*committed));
            }
        }
        groups
    }

    /// Joins or stays in a group.
    pub async fn group_heartbeat(
        &self,
        heartbeat: Heartbeat,
        timeout: Option<Duration>,
    ) -> Result<Assignment, BrokerError> {
        validate_group_name(&heartbeat.group)?;
        validate_member_id(&heartbeat.member_id)?;
        let config = &self.state.options.groups;
        let session_timeout_ms = match heartbeat.session_timeout_ms {
            0 => config.session_timeout_ms,
            asked => asked,
        };
        if !(config.session_timeout_min_ms..=config.session_timeout_max_ms)
            .contains(&session_timeout_ms)
        {
            return Err(BrokerError::InvalidSessionTimeout {
                actual: session_timeout_ms,
                min: config.session_timeout_min_ms,
                max: config.session_timeout_max_ms,
            });
        }
        for topic in &heartbeat.subscriptions {
            crate::names::validate_topic_name(topic)?;
        }
        crate::Limits::check(
            "groups.topics_per_member_max",
            heartbeat.subscriptions.len() as u64,
            u64::from(config.topics_per_member_max),
        )?;
        // A join without an id gets one here, so the coordinator sees the same id on every
        // retry of the call (one member, not one per attempt).
        let member_id = if heartbeat.member_id.is_empty() && heartbeat.epoch == 0 {
            use std::hash::BuildHasher;
            let seed = std::collections::hash_map::RandomState::new()
                .hash_one((crate::broker::now_ms(), self.node_id()));
            format!("m-{seed:016x}")
        } else {
            heartbeat.member_id
        };
        let request = CoordinatorRequest::Heartbeat {
            group: heartbeat.group.clone(),
            member_id,
            epoch: heartbeat.epoch,
            subscriptions: heartbeat.subscriptions,
            owned: heartbeat.owned,
            session_timeout_ms,
        };
        match self.group_call(&heartbeat.group, request, timeout).await? {
            CoordinatorOutcome::Answer(ShardAnswer::Group(GroupAnswer::Assignment {
                member_id,
                epoch,
                assigned,
            })) => Ok(Assignment {
                member_id,
                epoch,
                assigned,
                heartbeat_interval_ms: config.heartbeat_interval_for(session_timeout_ms),
                session_timeout_ms,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Leaves a group.
    pub async fn leave_group(
        &self,
        group: &str,
        member_id: &str,
        epoch: u32,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        validate_group_name(group)?;
        validate_member_id(member_id)?;
        let request = CoordinatorRequest::Leave {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            epoch,
        };
        self.group_call(group, request, timeout).await.map(drop)
    }

    /// Commits offsets: `(topic, partition, next offset, metadata)`. Acked once durable on a
    /// quorum of the coordinator's replicas.
    pub async fn commit_offsets(
        &self,
        group: &str,
        member_id: &str,
        epoch: u32,
        offsets: Vec<(String, u32, i64, String)>,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        validate_group_name(group)?;
        validate_member_id(member_id)?;
        let config = &self.state.options.groups;
        if offsets.is_empty() {
            return Err(BrokerError::invalid(
                ordo_proto::errors::reason::INVALID_OFFSET,
                "a commit names no offsets",
            ));
        }
        crate::Limits::check(
            "groups.offsets_per_commit_max",
            offsets.len() as u64,
            u64::from(config.offsets_per_commit_max),
        )?;
        let deadline =
            Instant::now() + timeout.unwrap_or_else(|| self.state.options.groups.call_timeout());
        let mut checked = Vec::with_capacity(offsets.len());
        let mut seen = BTreeSet::new();
        for (topic, partition, offset, metadata) in offsets {
            let offset = u64::try_from(offset).map_err(|_| {
                BrokerError::invalid(
                    ordo_proto::errors::reason::INVALID_OFFSET,
                    format!("offset {offset} of {topic}/{partition} is negative"),
                )
            })?;
            crate::Limits::check(
                "groups.commit_metadata_bytes_max",
                metadata.len() as u64,
                u64::from(config.commit_metadata_bytes_max),
            )?;
            let known = self.topic_fresh(&topic, deadline).await?;
            let partitions = known.partitions.len() as u32;
            if partition >= partitions {
                return Err(BrokerError::PartitionNotFound {
                    topic,
                    partition,
                    partitions,
                });
            }
            let tp = TopicPartition { topic, partition };
            if !seen.insert(tp.clone()) {
                return Err(BrokerError::invalid(
                    ordo_proto::errors::reason::INVALID_OFFSET,
                    format!("{}/{} appears twice in one commit", tp.topic, tp.partition),
                ));
            }
            checked.push((tp, offset, metadata));
        }
        let request = CoordinatorRequest::Commit {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            epoch,
            offsets: checked,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.group_call(group, request, Some(remaining))
            .await
            .map(drop)
    }

    /// A group's state, read on its coordinator; `None` when the group does not exist.
    async fn read_group(
        &self,
        group: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<GroupState>, BrokerError> {
        validate_group_name(group)?;
        let request = CoordinatorRequest::Read {
            group: group.to_owned(),
        };
        match self.group_call(group, request, timeout).await? {
            CoordinatorOutcome::Group(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }

    /// The committed offsets of a group (of `partitions`, or all when empty).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: &BTreeSet<TopicPartition>,
        timeout: Option<Duration>,
    ) -> Result<Vec<(TopicPartition, Committed)>, BrokerError> {
        let state = self.read_group(group, timeout).await?.unwrap_or_default();
        Ok(state
            .offsets
            .into_iter()
            .filter(|(partition, _)| partitions.is_empty() || partitions.contains(partition))
            .collect())
    }

    /// Every group of the cluster, by name.
    pub async fn list_groups(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Vec<GroupSummary>, BrokerError> {
        let deadline =
            Instant::now() + timeout.unwrap_or_else(|| self.state.options.groups.call_timeout());
        let topic = self.coordinator_topic(deadline).await?;
        let calls = (0..topic.partitions.len() as u32).map(|shard| {
            let group = GroupId(topic.group(shard));
            let replicas = topic.partitions[shard as usize].clone();
            async move {
                self.on_coordinator(group, &replicas, &CoordinatorRequest::List, deadline)
                    .await
            }
        });
        let mut groups = Vec::new();
        for outcome in futures::future::join_all(calls).await {
            match outcome? {
                CoordinatorOutcome::List(list) => groups.extend(list),
                other => return Err(unexpected(&other)),
            }
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }

    /// A group's members, assignment and per-partition offsets and lag.
    pub async fn describe_group(
        &self,
        group: &str,
        timeout: Option<Duration>,
    ) -> Result<GroupDescription, BrokerError> {
        let state = self
            .read_group(group, timeout)
            .await?
            .ok_or_else(|| BrokerError::GroupNotFound(group.to_owned()))?;
        let meta = self.metadata();
        let (shard, _) = meta
            .coordinators
            .as_ref()
            .map(|topic| Self::shard_of(topic, group))
            .unwrap_or((GroupId(0), Vec::new()));
        let mut topics: BTreeSet<String> = state
            .members
            .values()
            .flat_map(|member| member.subscriptions.iter().cloned())
            .collect();
        topics.extend(state.offsets.keys().map(|tp| tp.topic.clone()));
        let mut partitions: BTreeMap<TopicPartition, GroupPartition> = BTreeMap::new();
        for name in topics {
            let Some(topic) = meta.topics.get(&name) else {
                continue;
            };
            let view = self.describe(topic).await;
            for partition in view.partitions {
                let tp = TopicPartition {
                    topic: name.clone(),
                    partition: partition.partition,
                };
                partitions.insert(
                    tp.clone(),
                    GroupPartition {
                        partition: tp,
                        committed: None,
                        log_end: partition.leader.map(|_| partition.high_watermark),
                        owner: String::new(),
                    },
                );
            }
        }
        for (tp, committed) in &state.offsets {
            partitions
                .entry(tp.clone())
                .or_insert_with(|| GroupPartition {
                    partition: tp.clone(),
                    ..GroupPartition::default()
                })
                .committed = Some(committed.clone());
        }
        // The owner: the member that holds it, or was given it and has not said so yet.
        for (id, member) in &state.members {
            for tp in member.assigned.iter().chain(&member.owned) {
                if let Some(partition) = partitions.get_mut(tp) {
                    partition.owner = id.clone();
                }
            }
        }
        Ok(GroupDescription {
            coordinator: self.leader_hint(shard),
            partitions: partitions.into_values().collect(),
            state,
        })
    }

    /// Sets a group's offsets of `topic` (its `partitions`, or all when empty); refused while the
    /// group has members. Returns the offsets set.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: ResetTarget,
        timeout: Option<Duration>,
    ) -> Result<Vec<(TopicPartition, u64)>, BrokerError> {
        validate_group_name(group)?;
        let deadline =
            Instant::now() + timeout.unwrap_or_else(|| self.state.options.groups.call_timeout());
        let known = self.topic_fresh(topic, deadline).await?;
        let count = known.partitions.len() as u32;
        let chosen: Vec<u32> = if partitions.is_empty() {
            (0..count).collect()
        } else {
            let mut chosen = partitions.to_vec();
            chosen.sort_unstable();
            chosen.dedup();
            chosen
        };
        if let Some(&partition) = chosen.iter().find(|partition| **partition >= count) {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.to_owned(),
                partition,
                partitions: count,
            });
        }
        let ends = match to {
            ResetTarget::Time(timestamp_ms) => {
                let mut offsets = BTreeMap::new();
                for partition in &chosen {
                    let answer = self
                        .offset_for_time(topic, *partition, timestamp_ms, false)
                        .await?;
                    let offset = answer
                        .found
                        .map_or(answer.high_watermark, |(offset, _)| offset);
                    offsets.insert(*partition, offset);
                }
                offsets
            }
            ResetTarget::Latest => {
                let view = self.describe(&known).await;
                let mut ends = BTreeMap::new();
                for partition in view.partitions {
                    if chosen.contains(&partition.partition) && partition.leader.is_none() {
                        return Err(BrokerError::unavailable(
                            format!(
                                "partition {topic}/{} has no leader to tell its end; retry",
                                partition.partition
                            ),
                            None,
                        ));
                    }
                    ends.insert(partition.partition, partition.high_watermark);
                }
                ends
            }
            _ => BTreeMap::new(),
        };
        let offsets: Vec<(TopicPartition, u64)> = chosen
            .iter()
            .map(|partition| {
                let offset = match to {
                    // Nothing is deleted yet: every log starts at 0.
                    ResetTarget::Earliest => 0,
                    ResetTarget::Latest | ResetTarget::Time(_) => {
                        ends.get(partition).copied().unwrap_or(0)
                    }
                    ResetTarget::Offset(offset) => offset,
                };
                (
                    TopicPartition {
                        topic: topic.to_owned(),
                        partition: *partition,
                    },
                    offset,
                )
            })
            .collect();
        let request = CoordinatorRequest::Reset {
            group: group.to_owned(),
            offsets: offsets.clone(),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.group_call(group, request, Some(remaining)).await?;
        Ok(offsets)
    }

    /// Deletes a group with no members, and its offsets.
    pub async fn delete_group(
        &self,
        group: &str,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        validate_group_name(group)?;
        let request = CoordinatorRequest::Delete {
            group: group.to_owned(),
        };
        self.group_call(group, request, timeout).await.map(drop)
    }
}

pub(crate) fn unexpected(outcome: &CoordinatorOutcome) -> BrokerError {
    BrokerError::Internal(format!("unexpected coordinator answer {outcome:?}"))
}
