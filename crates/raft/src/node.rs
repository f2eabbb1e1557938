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
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use openraft::Config;
use openraft::Raft;
use openraft::SnapshotPolicy;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::RaftError;
use openraft::impls::BasicNode;
use ordo_proto::internal::RaftKind;
use ordo_storage::GroupStore;
use ordo_storage::Store;
use ordo_storage::Table;
use tokio::sync::watch;

use crate::GroupError;
use crate::GroupId;
use crate::InvalidOptions;
use crate::META_GROUP;
use crate::NodeId;
use crate::RaftOptions;
use crate::ReadError;
use crate::WriteError;
use crate::coalesce::CoalesceLimits;
use crate::coalesce::Coalescer;
use crate::codec::encode;
use crate::group::GroupStatus;
use crate::group::InboundError;
use crate::group::PartitionRaft;
use crate::group::ReadBatch;
use crate::group::dispatch;
use crate::group::open_machine;
use crate::group::propose;
use crate::group::read_committed;
use crate::group::status_of;
use crate::group::stopped;
use crate::log_store::LogStore;
use crate::machine::GroupLogic;
use crate::machine::Machine;
use crate::machine::MetadataLogic;
use crate::machine::PartitionLogic;
use crate::machine::StateLogic;
use crate::meta::MetaApply;
use crate::meta::StateApply;
use crate::network::NetworkFactory;
use crate::network::Peers;
use crate::network::RaftAnswer;
use crate::producers::ProducerLimits;
use crate::types::Appended;
use crate::types::C;
use crate::types::Command;
use crate::types::Response;
use crate::types::StampedBatch;

type MetaRaft = Raft<C, Machine<MetadataLogic>>;

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

/// Confirms with a quorum that this node still leads the group (Raft read index, after one
/// heartbeat round: quiescent groups send none) and waits until it applied everything committed
/// up to then. `None` when it cannot.
async fn confirm_and_apply(raft: &PartitionRaft, timeout: Duration) -> Option<()> {
    raft.trigger().heartbeat().await.ok()?;
    let (read_log_id, _) = raft
        .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
        .await
        .ok()?;
    raft.wait(Some(timeout))
        .applied_index_at_least(Some(read_log_id.index()), "read index")
        .await
        .ok()?;
    Some(())
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
        let (high_watermark_tx, high_watermark) = watch::channel(0);
        let logic = GroupLogic::Log(PartitionLogic::new(high_watermark_tx));
        self.start_group(group, replicas, initialize, logic, high_watermark)
            .await
    }

    /// Starts a state group this node replicates (a consumer group coordinator), if not
    /// running; `apply` makes its logic. Like a partition's group otherwise: quiescent, failed
    /// over by the watchdog, removed with [`RaftNode::remove_partition`].
    pub async fn ensure_state_group(
        &self,
        group: GroupId,
        replicas: &BTreeMap<NodeId, String>,
        initialize: bool,
        apply: impl FnOnce() -> Box<dyn StateApply>,
    ) -> Result<(), GroupError> {
        if self.partition(group).is_some() {
            return Ok(());
        }
        let (_, high_watermark) = watch::channel(0);
        let logic = GroupLogic::State(StateLogic::new(apply()));
        self.start_group(group, replicas, initialize, logic, high_watermark)
            .await
    }

    async fn start_group(
        &self,
        group: GroupId,
        replicas: &BTreeMap<NodeId, String>,
        initialize: bool,
        logic: GroupLogic,
        high_watermark: watch::Receiver<u64>,
    ) -> Result<(), GroupError> {
        let store = self.host.store.group(group);
        let machine = open_machine(store.clone(), logic).await?;
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
                producers: ProducerLimits {
                    producers_max: self.host.options.producers_per_partition_max.max(1),
                    idle_ms: u64::try_from(self.host.options.producer_idle_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                },
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

    /// Appends a batch to a partition this node leads and waits until it is committed and
    /// applied: where it is (or was, for a producer's retry), or why its producer state refused
    /// it. A follower answers `NotLeader` at once, so the caller can forward cleanly.
    pub async fn append(
        &self,
        group: GroupId,
        batch: StampedBatch,
        timeout: Duration,
    ) -> Result<Appended, WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        let leader = partition.raft.metrics().borrow_watched().current_leader;
        if leader != Some(self.host.id) {
            return Err(WriteError::NotLeader { group, leader });
        }
        partition.coalescer.append(batch, timeout).await
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

    /// Proposes a command to a state group this node leads; returns its logic's encoded answer.
    /// A follower answers `NotLeader` (with the leader it knows) at once.
    pub async fn write_state(
        &self,
        group: GroupId,
        command: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        match propose(&partition.raft, group, Command::Meta(command), timeout).await? {
            Response::Meta(answer) => Ok(answer),
            other => Err(WriteError::Stopped {
                group,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// On a group's leader: confirms with a quorum that it still leads (Raft read index) and
    /// waits until it applied everything committed up to then, so what its state machine holds
    /// now is at least as new as anything any node acknowledged. `NotLeader` on a follower;
    /// `OutcomeUnknown` when it cannot confirm within `timeout`.
    pub async fn read_barrier(&self, group: GroupId, timeout: Duration) -> Result<(), WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        let leader = partition.raft.metrics().borrow_watched().current_leader;
        if leader != Some(self.host.id) {
            return Err(WriteError::NotLeader { group, leader });
        }
        match tokio::time::timeout(timeout, confirm_and_apply(&partition.raft, timeout)).await {
            Ok(Some(())) => Ok(()),
            _ => Err(WriteError::NotLeader {
                group,
                leader: partition
                    .raft
                    .metrics()
                    .borrow_watched()
                    .current_leader
                    .filter(|leader| *leader != self.host.id),
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
            confirm_and_apply(&partition.raft, timeout).await?;
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
        .map_err(|error| ReadError::Task {
            group,
            reason: error.to_string(),
        })?
    }

    /// The time index of a partition: the base offset of the first batch at which the largest
    /// record timestamp so far reached `timestamp_ms` (every record before it is older), if any
    /// committed batch did.
    pub async fn time_index_lookup(
        &self,
        group: GroupId,
        timestamp_ms: i64,
    ) -> Result<Option<u64>, ReadError> {
        let partition = self
            .partition(group)
            .ok_or(ReadError::GroupNotFound(group))?;
        let high_watermark = *partition.high_watermark.borrow();
        let store = partition.store.clone();
        let key = crate::machine::time_key(timestamp_ms);
        let row = tokio::task::spawn_blocking(move || store.row_at_or_after(Table::TimeIndex, key))
            .await
            .map_err(|error| ReadError::Task {
                group,
                reason: error.to_string(),
            })?
            .map_err(ReadError::Storage)?;
        Ok(row.and_then(|(_, value)| {
            let base = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
            // Written with its entry, possibly just before the high watermark moved past it.
            (base < high_watermark).then_some(base)
        }))
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
