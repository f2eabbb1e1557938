//! [`RaftNode`]: every Raft group hosted on this node, and the one door to them.
//!
//! Holds the metadata group and a map of partition groups. Writes go through [`RaftNode::write`]
//! (returns only after openraft committed and applied the entry, i.e. after a quorum fsynced
//! it), reads through [`RaftNode::read`] (committed records only: bounded by the high
//! watermark), inbound Raft RPCs through [`RaftNode::handle_raft`].
//!
//! The map's lock is a std `RwLock`, held only to clone a handle, never across `.await`.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use openraft::Config;
use openraft::EntryPayload;
use openraft::Raft;
use openraft::SnapshotPolicy;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use openraft::impls::BasicNode;
use openraft::storage::RaftStateMachine;
use ordo_proto::internal::RaftKind;
use ordo_storage::GroupStore;
use ordo_storage::Store;
use tokio::sync::watch;

use crate::GroupError;
use crate::GroupId;
use crate::InvalidOptions;
use crate::META_GROUP;
use crate::NodeId;
use crate::ReadError;
use crate::WriteError;
use crate::coalesce::CoalesceLimits;
use crate::coalesce::Coalescer;
use crate::coalesce::Propose;
use crate::codec::decode;
use crate::codec::encode;
use crate::log_store::LogStore;
use crate::machine::Logic;
use crate::machine::Machine;
use crate::machine::MetadataLogic;
use crate::machine::PartitionLogic;
use crate::meta::MetaApply;
use crate::network::NetworkFactory;
use crate::network::Peers;
use crate::network::RaftAnswer;
use crate::types::C;
use crate::types::Command;
use crate::types::Entry;
use crate::types::Response;
use crate::types::Snapshot;
use crate::types::SnapshotData;

type PartitionRaft = Raft<C, Machine<PartitionLogic>>;
type MetaRaft = Raft<C, Machine<MetadataLogic>>;

/// The first pause before a write refused by a leader whose lease lapsed is retried (see
/// `propose`); it doubles on each refusal.
const LEASE_RETRY_PAUSE_MIN: Duration = Duration::from_millis(1);
/// The longest pause between two such retries: a lease is regained in one heartbeat round
/// (milliseconds), so waiting longer would only add latency.
const LEASE_RETRY_PAUSE_MAX: Duration = Duration::from_millis(50);

/// Raft timing and batching, shared by every group on the node.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// Leader heartbeat period.
    pub heartbeat_interval: Duration,
    /// Election timeout, lower bound (randomized up to the upper bound).
    pub election_timeout_min: Duration,
    /// Election timeout, upper bound.
    pub election_timeout_max: Duration,
    /// Most entries in one append RPC.
    pub append_entries_max: u64,
    /// Timeout of one connection attempt to a peer: give it to [`Peers::new`] (the pool is
    /// built before the node, and shared with request forwarding).
    pub connect_timeout: Duration,
    /// Bytes of the most recent log entries each group keeps in memory for replication and
    /// apply (see `entry_cache`); 0 disables the cache.
    pub entry_cache_bytes: usize,
    /// Most batch bytes in one entry made of concurrent appends to a partition (see `coalesce`).
    pub coalesce_bytes_max: usize,
    /// Most proposals of one partition in flight at once; appends arriving meanwhile are
    /// coalesced into the next entry.
    pub proposals_in_flight_max: usize,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
            append_entries_max: 256,
            connect_timeout: Duration::from_secs(2),
            entry_cache_bytes: 1 << 20,
            coalesce_bytes_max: 1 << 20,
            proposals_in_flight_max: 2,
        }
    }
}

/// Committed record batches read from a partition.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    /// The offset after the last committed record.
    pub high_watermark: u64,
    /// `(base offset, record count, encoded batch)`, in offset order. The first batch may start
    /// before the requested offset.
    pub batches: Vec<(u64, u32, Bytes)>,
}

/// One group as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    /// The group.
    pub group: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// The high watermark (partitions only).
    pub high_watermark: u64,
    /// This replica's last log index.
    pub last_log_index: u64,
    /// On the leader: each replica's matched log index.
    pub matched: BTreeMap<NodeId, u64>,
    /// Members of the group.
    pub voters: Vec<NodeId>,
}

#[derive(Clone)]
struct Partition {
    raft: PartitionRaft,
    store: GroupStore,
    high_watermark: watch::Receiver<u64>,
    coalescer: Arc<Coalescer<PartitionRaft>>,
}

/// What every clone of a [`RaftNode`] shares: the groups this node hosts, and what it needs to
/// start more (its id, store, peer pool, options and openraft configs).
struct GroupHost {
    id: NodeId,
    store: Store,
    peers: Peers,
    options: RaftOptions,
    /// The metadata group's config: ordinary heartbeats and elections.
    meta_config: Arc<Config>,
    /// Partition groups' config: quiescent, no heartbeats, elections driven by the watchdog.
    partition_config: Arc<Config>,
    meta: OnceLock<MetaRaft>,
    partitions: RwLock<HashMap<GroupId, Partition>>,
}

/// Every Raft group on this node. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    host: Arc<GroupHost>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.host.id)
            .finish_non_exhaustive()
    }
}

fn members(replicas: &BTreeMap<NodeId, String>) -> BTreeMap<NodeId, BasicNode> {
    replicas
        .iter()
        .map(|(id, address)| {
            (
                *id,
                BasicNode {
                    addr: address.clone(),
                },
            )
        })
        .collect()
}

impl RaftNode {
    /// A node with no groups yet.
    pub fn new(
        id: NodeId,
        store: Store,
        peers: Peers,
        options: &RaftOptions,
    ) -> Result<Self, InvalidOptions> {
        let meta_config = Config {
            cluster_name: "ordo".to_string(),
            heartbeat_interval: options.heartbeat_interval.as_millis() as u64,
            election_timeout_min: options.election_timeout_min.as_millis() as u64,
            election_timeout_max: options.election_timeout_max.as_millis() as u64,
            max_payload_entries: options.append_entries_max,
            // Partitions never purge: their Raft log is their data (see `machine`).
            snapshot_policy: SnapshotPolicy::Never,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        let partition_config = Config {
            // No timers at all: heartbeats and elections are driven by the watchdog.
            enable_tick: false,
            enable_heartbeat: false,
            enable_elect: false,
            ..meta_config.clone()
        };
        let invalid = |error: openraft::ConfigError| InvalidOptions {
            reason: error.to_string(),
        };
        let meta_config = Arc::new(meta_config.validate().map_err(invalid)?);
        let partition_config = Arc::new(partition_config.validate().map_err(invalid)?);
        Ok(Self {
            host: Arc::new(GroupHost {
                id,
                store,
                peers,
                options: options.clone(),
                meta_config,
                partition_config,
                meta: OnceLock::new(),
                partitions: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.host.id
    }

    /// The Raft options of this node.
    pub fn options(&self) -> &RaftOptions {
        &self.host.options
    }

    /// Each partition group's leadership as this node sees it, for the watchdog.
    pub(crate) fn partition_views(&self) -> Vec<(GroupId, crate::watchdog::GroupView)> {
        let partitions = self
            .host
            .partitions
            .read()
            .expect("partition map lock is never poisoned");
        partitions
            .iter()
            .map(|(group, partition)| {
                let metrics = partition.raft.metrics();
                let metrics = metrics.borrow_watched();
                let view = crate::watchdog::GroupView {
                    leading: metrics.state == openraft::ServerState::Leader,
                    leader: metrics.current_leader,
                };
                (*group, view)
            })
            .collect()
    }

    /// Starts a pre-vote election in a partition group.
    pub(crate) async fn elect(&self, group: GroupId) {
        if let Some(partition) = self.partition(group) {
            if let Err(error) = partition.raft.trigger().elect(true).await {
                tracing::warn!(%group, %error, "election trigger");
            }
        }
    }

    /// The peer pool, shared with request forwarding.
    pub fn peers(&self) -> &Peers {
        &self.host.peers
    }

    /// Starts the metadata group. The lowest-id voter initializes it on first start.
    pub async fn start_meta(
        &self,
        voters: &BTreeMap<NodeId, String>,
        apply: Box<dyn MetaApply>,
    ) -> Result<(), GroupError> {
        for (id, address) in voters {
            self.host.peers.set_address(*id, address);
        }
        let store = self.host.store.group(META_GROUP);
        let machine = open_machine(store.clone(), MetadataLogic::new(apply)).await?;
        let log_store = self.open_log_store(store).await?;
        let network = NetworkFactory {
            peers: self.host.peers.clone(),
            group: META_GROUP,
        };
        let fatal = stopped(META_GROUP);
        let raft = Raft::new(
            self.host.id,
            self.host.meta_config.clone(),
            network,
            log_store,
            machine,
        )
        .await
        .map_err(fatal)?;
        let lowest = voters.keys().next().copied();
        if lowest == Some(self.host.id) && !raft.is_initialized().await.map_err(fatal)? {
            tracing::info!(voters = ?voters.keys().collect::<Vec<_>>(), "initializing metadata group");
            if let Err(error) = raft.initialize(members(voters)).await {
                tracing::warn!(%error, "metadata group initialize");
            }
        }
        self.host
            .meta
            .set(raft)
            .map_err(|_| GroupError::MetaStartedTwice)
    }

    /// Opens a group's log store and gives up any leadership restored from it (see
    /// `LogStore::give_up_restored_leadership`), before the group starts.
    async fn open_log_store(&self, store: GroupStore) -> Result<LogStore, GroupError> {
        let group = store.group();
        let mut log_store = LogStore::new(store, self.host.options.entry_cache_bytes);
        log_store
            .give_up_restored_leadership(self.host.id)
            .await
            .map_err(|source| GroupError::Open { group, source })?;
        Ok(log_store)
    }

    fn meta(&self) -> Result<&MetaRaft, WriteError> {
        self.host
            .meta
            .get()
            .ok_or(WriteError::GroupNotFound(META_GROUP))
    }

    fn partition(&self, group: GroupId) -> Option<Partition> {
        let partitions = self
            .host
            .partitions
            .read()
            .expect("partition map lock is never poisoned");
        partitions.get(&group).cloned()
    }

    /// Groups of partitions hosted here.
    pub fn partition_groups(&self) -> Vec<GroupId> {
        let partitions = self
            .host
            .partitions
            .read()
            .expect("partition map lock is never poisoned");
        partitions.keys().copied().collect()
    }

    /// Starts the group of a partition this node replicates, if not running. `initialize` is set
    /// on exactly one replica (the preferred leader), which forms the group on first start.
    pub async fn ensure_partition(
        &self,
        group: GroupId,
        replicas: &BTreeMap<NodeId, String>,
        initialize: bool,
    ) -> Result<(), GroupError> {
        if self.partition(group).is_some() {
            return Ok(());
        }
        let store = self.host.store.group(group);
        let (high_watermark_tx, high_watermark) = watch::channel(0);
        let machine = open_machine(store.clone(), PartitionLogic::new(high_watermark_tx)).await?;
        let log_store = self.open_log_store(store.clone()).await?;
        let network = NetworkFactory {
            peers: self.host.peers.clone(),
            group,
        };
        let fatal = stopped(group);
        let raft = Raft::new(
            self.host.id,
            self.host.partition_config.clone(),
            network,
            log_store,
            machine,
        )
        .await
        .map_err(fatal)?;
        if initialize && !raft.is_initialized().await.map_err(fatal)? {
            match raft.initialize(members(replicas)).await {
                // Partition groups do not elect on their own (see `watchdog`): the initializer,
                // the preferred leader, stands at once.
                Ok(()) => {
                    if let Err(error) = raft.trigger().elect(false).await {
                        tracing::warn!(%group, %error, "first election");
                    }
                }
                Err(error) => tracing::warn!(%group, %error, "partition group initialize"),
            }
        }
        let coalescer = Arc::new(Coalescer::new(
            raft.clone(),
            group,
            CoalesceLimits {
                bytes_max: self.host.options.coalesce_bytes_max,
                proposals_max: self.host.options.proposals_in_flight_max.max(1),
            },
        ));
        let partition = Partition {
            raft,
            store,
            high_watermark,
            coalescer,
        };
        let mut partitions = self
            .host
            .partitions
            .write()
            .expect("partition map lock is never poisoned");
        partitions.entry(group).or_insert(partition);
        Ok(())
    }

    /// Stops a partition's group and deletes its data from this node.
    pub async fn remove_partition(&self, group: GroupId) -> Result<(), GroupError> {
        let removed = {
            let mut partitions = self
                .host
                .partitions
                .write()
                .expect("partition map lock is never poisoned");
            partitions.remove(&group)
        };
        if let Some(partition) = removed {
            if let Err(error) = partition.raft.shutdown().await {
                tracing::warn!(%group, %error, "partition shutdown");
            }
            partition
                .store
                .destroy()
                .await
                .map_err(|source| GroupError::Storage { group, source })?;
        }
        Ok(())
    }

    /// Proposes `command` to a partition and waits until it is committed and applied.
    pub async fn write(
        &self,
        group: GroupId,
        command: Command,
        timeout: Duration,
    ) -> Result<Response, WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        match command {
            Command::Append { count, batch } => {
                // A follower answers at once, so the caller can forward cleanly.
                let leader = partition.raft.metrics().borrow_watched().current_leader;
                if leader != Some(self.host.id) {
                    return Err(WriteError::NotLeader { group, leader });
                }
                let base_offset = partition.coalescer.append(count, batch, timeout).await?;
                Ok(Response::Appended { base_offset })
            }
            command => propose(&partition.raft, group, command, timeout).await,
        }
    }

    /// Proposes a metadata command; returns the state machine's encoded answer.
    pub async fn write_meta(&self, command: Bytes, timeout: Duration) -> Result<Bytes, WriteError> {
        match propose(self.meta()?, META_GROUP, Command::Meta(command), timeout).await? {
            Response::Meta(answer) => Ok(answer),
            other => Err(WriteError::Stopped {
                group: META_GROUP,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// On the metadata leader: the index every committed metadata command is at or below,
    /// confirmed with a quorum (Raft read index).
    pub async fn meta_read_index(&self) -> Result<u64, WriteError> {
        let raft = self.meta()?;
        match raft
            .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
            .await
        {
            Ok((read_log_id, _)) => Ok(read_log_id.index()),
            Err(RaftError::APIError(_)) => Err(WriteError::NotLeader {
                group: META_GROUP,
                leader: self.meta_leader(),
            }),
            Err(RaftError::Fatal(fatal)) => Err(WriteError::Stopped {
                group: META_GROUP,
                reason: fatal.to_string(),
            }),
        }
    }

    /// Waits until this node applied the metadata log up to `index`; false on timeout.
    pub async fn wait_meta_applied(&self, index: u64, timeout: Duration) -> bool {
        let Ok(raft) = self.meta() else {
            return false;
        };
        raft.wait(Some(timeout))
            .applied_index_at_least(Some(index), "metadata read index")
            .await
            .is_ok()
    }

    /// The leader of the metadata group as this node knows it.
    pub fn meta_leader(&self) -> Option<NodeId> {
        self.host
            .meta
            .get()
            .and_then(|raft| raft.metrics().borrow_watched().current_leader)
    }

    /// The high watermark of a partition, to wait on for new records.
    pub fn high_watermark(&self, group: GroupId) -> Option<watch::Receiver<u64>> {
        self.partition(group)
            .map(|partition| partition.high_watermark)
    }

    /// On a partition's leader: its high watermark once it has confirmed with a quorum that it
    /// still leads (Raft read index) and applied everything committed up to then. The end of
    /// the partition as no other node can contradict; `None` when leadership cannot be
    /// confirmed within `timeout` (deposed, paused, cut off, or just elected and behind).
    pub async fn confirmed_high_watermark(&self, group: GroupId, timeout: Duration) -> Option<u64> {
        let partition = self.partition(group)?;
        let confirm = async {
            // Quiescent groups send no heartbeats; the read index needs one round.
            partition.raft.trigger().heartbeat().await.ok()?;
            let (read_log_id, _) = partition
                .raft
                .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
                .await
                .ok()?;
            let index = Some(read_log_id.index());
            partition
                .raft
                .wait(Some(timeout))
                .applied_index_at_least(index, "confirmed end")
                .await
                .ok()?;
            Some(*partition.high_watermark.borrow())
        };
        tokio::time::timeout(timeout, confirm).await.ok().flatten()
    }

    /// Reads committed batches from `offset`, about `max_bytes` of log at most (at least one batch
    /// when any is committed at or after `offset`).
    pub async fn read(
        &self,
        group: GroupId,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadBatch, ReadError> {
        let partition = self
            .partition(group)
            .ok_or(ReadError::GroupNotFound(group))?;
        let high_watermark = *partition.high_watermark.borrow();
        if offset >= high_watermark {
            return Ok(ReadBatch {
                high_watermark,
                batches: Vec::new(),
            });
        }
        let store = partition.store.clone();
        tokio::task::spawn_blocking(move || {
            read_committed(&store, offset, high_watermark, max_bytes)
        })
        .await
        .map_err(|error| ReadError::Decode {
            group,
            reason: error.to_string(),
        })?
    }

    /// This node's view of a group.
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        if group == META_GROUP {
            let raft = self.host.meta.get()?;
            return Some(status_of(raft, group, 0));
        }
        let partition = self.partition(group)?;
        let high_watermark = *partition.high_watermark.borrow();
        Some(status_of(&partition.raft, group, high_watermark))
    }

    /// Asks this node, if it leads `group`, to hand leadership to `to`.
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) -> Result<(), GroupError> {
        let partition = self.partition(group).ok_or(GroupError::NotFound(group))?;
        partition
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(stopped(group))
    }

    /// Handles one inbound Raft RPC; the answer is a [`RaftAnswer`], encoded.
    pub async fn handle_raft(&self, group: GroupId, kind: RaftKind, payload: &[u8]) -> Vec<u8> {
        let node = self.host.id;
        let result = if group == META_GROUP {
            match self.host.meta.get() {
                Some(raft) => dispatch(raft, kind, payload).await,
                None => Err(InboundError::MetaNotStarted { node }),
            }
        } else {
            match self.partition(group) {
                Some(partition) => dispatch(&partition.raft, kind, payload).await,
                None => Err(InboundError::GroupNotFound { group, node }),
            }
        };
        match result {
            Ok(encoded) => encoded,
            Err(error) => encode(&RaftAnswer::<()>::Err(error.to_string())).unwrap_or_default(),
        }
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        let partitions: Vec<Partition> = {
            let partitions = self
                .host
                .partitions
                .read()
                .expect("partition map lock is never poisoned");
            partitions.values().cloned().collect()
        };
        for partition in partitions {
            let _ = partition.raft.shutdown().await;
        }
        if let Some(meta) = self.host.meta.get() {
            let _ = meta.shutdown().await;
        }
    }
}

impl Propose for PartitionRaft {
    async fn propose(
        &self,
        group: GroupId,
        command: Command,
        timeout: Duration,
    ) -> Result<Response, WriteError> {
        propose(self, group, command, timeout).await
    }
}

/// Proposes one entry and waits until it is committed and applied, or the timeout passes.
async fn propose<SM>(
    raft: &Raft<C, SM>,
    group: GroupId,
    command: Command,
    timeout: Duration,
) -> Result<Response, WriteError>
where
    SM: RaftStateMachine<C>,
{
    // A follower answers at once, without proposing, so the caller can forward cleanly.
    let leader = raft.metrics().borrow_watched().current_leader;
    if leader != Some(*raft.node_id()) {
        return Err(WriteError::NotLeader { group, leader });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = LEASE_RETRY_PAUSE_MIN;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = match tokio::time::timeout(remaining, raft.client_write(command.clone())).await
        {
            Err(_) => {
                return Err(WriteError::OutcomeUnknown {
                    group,
                    reason: format!("not committed within {timeout:?}"),
                });
            }
            Ok(result) => result,
        };
        return match result {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                // A quiescent leader (no heartbeats, see `watchdog`) lets its lease lapse and
                // refuses writes, without appending, until a quorum acks it again: wake the
                // group with one heartbeat round and retry until the deadline.
                let leading =
                    raft.metrics().borrow_watched().state == openraft::ServerState::Leader;
                if leading && forward.leader_id.is_none() && !remaining.is_zero() {
                    if let Err(fatal) = raft.trigger().heartbeat().await {
                        return Err(WriteError::Stopped {
                            group,
                            reason: fatal.to_string(),
                        });
                    }
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(LEASE_RETRY_PAUSE_MAX);
                    continue;
                }
                Err(WriteError::NotLeader {
                    group,
                    leader: forward.leader_id,
                })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward))) => {
                Err(WriteError::Discarded {
                    group,
                    leader: forward.leader_id,
                })
            }
            Err(RaftError::APIError(other)) => Err(WriteError::Stopped {
                group,
                reason: other.to_string(),
            }),
            // The group stopped after the entry was handed to it: it may have been appended
            // and replicated, and may commit under the next leader.
            Err(RaftError::Fatal(fatal)) => Err(WriteError::OutcomeUnknown {
                group,
                reason: format!("the group stopped after the proposal: {fatal}"),
            }),
        };
    }
}

/// The error of a `Fatal` openraft answer: the group stopped.
fn stopped<E: std::fmt::Display>(group: GroupId) -> impl Fn(E) -> GroupError + Copy {
    move |fatal| GroupError::Stopped {
        group,
        reason: fatal.to_string(),
    }
}

/// Opens a state machine on a blocking thread: it reads RocksDB.
async fn open_machine<L: Logic + Send + 'static>(
    store: GroupStore,
    logic: L,
) -> Result<Machine<L>, GroupError> {
    let group = store.group();
    tokio::task::spawn_blocking(move || Machine::open(store, logic))
        .await
        // The blocking task panicked or the runtime is shutting down.
        .map_err(std::io::Error::other)
        .and_then(|opened| opened)
        .map_err(|source| GroupError::Open { group, source })
}

/// Why this node could not hand an inbound Raft RPC to its group. Sent back to the caller as a
/// message (see [`RaftAnswer`]), where it makes the target unreachable for that RPC.
#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("metadata group not started on node {node}")]
    MetaNotStarted { node: NodeId },
    #[error("group {group} not hosted on node {node}")]
    GroupNotFound { group: GroupId, node: NodeId },
    #[error("undecodable {kind:?} request: {source}")]
    Undecodable {
        kind: RaftKind,
        source: std::io::Error,
    },
    #[error("raft request without a kind")]
    NoKind,
    #[error("encoding the answer to a {kind:?} request: {source}")]
    Encode {
        kind: RaftKind,
        source: std::io::Error,
    },
}

/// Hands one inbound Raft RPC to `raft`; returns its encoded [`RaftAnswer`] (openraft's own
/// errors are answers too, as messages).
async fn dispatch<SM>(
    raft: &Raft<C, SM>,
    kind: RaftKind,
    payload: &[u8],
) -> Result<Vec<u8>, InboundError>
where
    SM: RaftStateMachine<C, SnapshotData = SnapshotData>,
{
    fn answer<T: serde::Serialize, E: std::fmt::Display>(
        kind: RaftKind,
        result: Result<T, E>,
    ) -> Result<Vec<u8>, InboundError> {
        let answer: RaftAnswer<T> = result.map_err(|error| error.to_string());
        encode(&answer).map_err(|source| InboundError::Encode { kind, source })
    }
    let bad = |source: std::io::Error| InboundError::Undecodable { kind, source };
    match kind {
        RaftKind::Append => answer(
            kind,
            raft.append_entries(decode(payload).map_err(bad)?).await,
        ),
        RaftKind::Vote => answer(kind, raft.vote(decode(payload).map_err(bad)?).await),
        RaftKind::PreVote => answer(kind, raft.pre_vote(decode(payload).map_err(bad)?).await),
        RaftKind::Snapshot => {
            let (vote, meta, data): (crate::types::Vote, crate::types::SnapshotMeta, Vec<u8>) =
                decode(payload).map_err(bad)?;
            let snapshot = Snapshot {
                meta,
                snapshot: Cursor::new(data),
            };
            answer(kind, raft.install_full_snapshot(vote, snapshot).await)
        }
        RaftKind::TransferLeader => answer(
            kind,
            raft.handle_transfer_leader(decode(payload).map_err(bad)?)
                .await,
        ),
        RaftKind::Unspecified => Err(InboundError::NoKind),
    }
}

fn status_of<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    high_watermark: u64,
) -> GroupStatus {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let matched = metrics
        .replication
        .as_ref()
        .map(|replication| {
            replication
                .iter()
                .map(|(node, log_id)| (*node, log_id.as_ref().map(|id| id.index + 1).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    GroupStatus {
        group: group.0,
        leader: metrics.current_leader,
        term: metrics.current_term,
        high_watermark,
        last_log_index: metrics.last_log_index.map(|index| index + 1).unwrap_or(0),
        matched,
        voters: metrics.membership_config.voter_ids().collect(),
    }
}

/// Reads committed batches of one partition, stopping at the high watermark.
fn read_committed(
    store: &GroupStore,
    offset: u64,
    high_watermark: u64,
    max_bytes: usize,
) -> Result<ReadBatch, ReadError> {
    let group = store.group();
    let Some(first) = store.index_floor(offset)? else {
        return Err(ReadError::Decode {
            group,
            reason: format!(
                "no index entry at or before offset {offset} below high watermark {high_watermark}"
            ),
        });
    };
    let mut base_offset = first.base_offset;
    let mut batches = Vec::new();
    let entries = store.read_log(first.log_index, u64::MAX, max_bytes)?;
    // Offsets are counted from the indexed entry, so the read must start exactly there.
    if entries.first().map(|(index, _)| *index) != Some(first.log_index) {
        return Err(ReadError::Decode {
            group,
            reason: format!(
                "log entry {} of offset {} is missing",
                first.log_index, first.base_offset
            ),
        });
    }
    for (index, bytes) in entries {
        if base_offset >= high_watermark {
            break;
        }
        let entry: Entry = decode(&bytes).map_err(|error| ReadError::Decode {
            group,
            reason: format!("index {index}: {error}"),
        })?;
        if let EntryPayload::Normal(command) = &entry.payload {
            for (count, batch) in command.batches() {
                batches.push((base_offset, count, batch.clone()));
                base_offset += u64::from(count);
            }
        }
    }
    Ok(ReadBatch {
        high_watermark,
        batches,
    })
}
