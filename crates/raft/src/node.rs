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
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
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
use crate::machine::Retention;
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

mod drain;
mod membership;
pub use drain::HandOff;
pub use membership::Members;

type MetaRaft = Raft<C, Machine<MetadataLogic>>;

#[derive(Clone)]
struct Partition {
    raft: PartitionRaft,
    store: GroupStore,
    high_watermark: watch::Receiver<u64>,
    coalescer: Arc<Coalescer<PartitionRaft>>,
    /// A partition's retention; `None` for a state group.
    retention: Option<Arc<Retention>>,
    /// The log entries below this index are deleted (see [`RaftNode::compact_logs`]).
    deleted_below: Arc<AtomicU64>,
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
    /// Partition groups' config: quiescent, no heartbeats, elections driven by the watchdog;
    /// snapshots and purges only as retention asks (see [`RaftNode::compact_logs`]).
    partition_config: Arc<Config>,
    /// State groups' config: as partitions', with snapshots and purges every
    /// [`RaftOptions::snapshot_entries`].
    state_config: Arc<Config>,
    meta: OnceLock<MetaRaft>,
    partitions: RwLock<HashMap<GroupId, Partition>>,
    /// The broker's record format, for compaction by key.
    codec: Option<Arc<dyn crate::RecordCodec>>,
    /// Partition snapshots being received (see `snapshot`).
    transfers: crate::snapshot::Transfers,
    /// When each metadata or state group last had its whole log purged (see `compact_logs`).
    state_purges: std::sync::Mutex<HashMap<GroupId, std::time::Instant>>,
    /// Set once the node hands its leaderships off to stop (see `drain`).
    draining: AtomicBool,
    /// The other nodes the watchdog heard from within the minimum election timeout.
    alive_peers: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// Bounds what moves send to their new replicas (see `throttle`).
    throttle: Arc<crate::throttle::Throttle>,
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
        codec: Option<Arc<dyn crate::RecordCodec>>,
    ) -> Result<Self, InvalidOptions> {
        let meta_config = Config {
            cluster_name: "ordo".to_string(),
            heartbeat_interval: options.heartbeat_interval.as_millis() as u64,
            election_timeout_min: options.election_timeout_min.as_millis() as u64,
            election_timeout_max: options.election_timeout_max.as_millis() as u64,
            max_payload_entries: options.append_entries_max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_entries.max(1)),
            max_in_snapshot_log_to_keep: options.snapshot_entries_kept,
            // A purge is one range delete: no need to batch them.
            purge_batch_size: 1,
            enable_pre_vote: Some(true),
            // A replica whose data directory was wiped comes back with an empty log: its
            // leader resets its progress and sends it everything again (a snapshot where the
            // log was purged), instead of stopping replication to it. The wipe itself loses
            // that copy; acked records live on the other replicas of the quorum.
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        let state_config = Config {
            // No timers at all: heartbeats and elections are driven by the watchdog.
            enable_tick: false,
            enable_heartbeat: false,
            enable_elect: false,
            ..meta_config.clone()
        };
        let partition_config = Config {
            // A partition's log is its records: it is purged only below what retention keeps
            // (see `compact_logs`), never by a snapshot policy.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            ..state_config.clone()
        };
        let invalid = |error: openraft::ConfigError| InvalidOptions {
            reason: error.to_string(),
        };
        let meta_config = Arc::new(meta_config.validate().map_err(invalid)?);
        let partition_config = Arc::new(partition_config.validate().map_err(invalid)?);
        let state_config = Arc::new(state_config.validate().map_err(invalid)?);
        Ok(Self {
            host: Arc::new(GroupHost {
                id,
                store,
                peers,
                options: options.clone(),
                meta_config,
                partition_config,
                state_config,
                meta: OnceLock::new(),
                partitions: RwLock::new(HashMap::new()),
                codec,
                transfers: crate::snapshot::Transfers::default(),
                state_purges: std::sync::Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                alive_peers: std::sync::Mutex::new(std::collections::HashSet::new()),
                throttle: Arc::new(crate::throttle::Throttle::new(options.move_bytes_per_sec)),
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
                    voter: metrics
                        .membership_config
                        .voter_ids()
                        .any(|voter| voter == self.host.id),
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

    /// Starts the metadata group, as it is on disk: a new node's holds no config until it is
    /// initialized ([`RaftNode::initialize_meta`]) or a leader sends it the log.
    pub async fn start_meta(&self, apply: Box<dyn MetaApply>) -> Result<(), GroupError> {
        let store = self.host.store.group(META_GROUP);
        let machine = open_machine(store.clone(), MetadataLogic::new(apply)).await?;
        let log_store = self.open_log_store(store, None).await?;
        let network = NetworkFactory {
            peers: self.host.peers.clone(),
            group: META_GROUP,
            records: None,
            throttle: self.host.throttle.clone(),
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
        self.host
            .meta
            .set(raft)
            .map_err(|_| GroupError::MetaStartedTwice)
    }

    /// Opens a group's log store and gives up any leadership restored from it (see
    /// `LogStore::give_up_restored_leadership`), before the group starts.
    async fn open_log_store(
        &self,
        store: GroupStore,
        retention: Option<Arc<Retention>>,
    ) -> Result<LogStore, GroupError> {
        let group = store.group();
        let mut log_store = LogStore::new(store, self.host.options.entry_cache_bytes, retention);
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

    /// Every group hosted here but the metadata group.
    fn partitions(&self) -> Vec<(GroupId, Partition)> {
        let partitions = self
            .host
            .partitions
            .read()
            .expect("partition map lock is never poisoned");
        partitions
            .iter()
            .map(|(group, partition)| (*group, partition.clone()))
            .collect()
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
        let logic = GroupLogic::Log(
            PartitionLogic::new(high_watermark_tx).with_codec(self.host.codec.clone()),
        );
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
        let retention = match &logic {
            GroupLogic::Log(logic) => Some(logic.retention()),
            GroupLogic::State(_) => None,
        };
        let config = match &logic {
            GroupLogic::Log(_) => self.host.partition_config.clone(),
            GroupLogic::State(_) => self.host.state_config.clone(),
        };
        let machine = open_machine(store.clone(), logic).await?;
        let log_store = self
            .open_log_store(store.clone(), retention.clone())
            .await?;
        let network = NetworkFactory {
            peers: self.host.peers.clone(),
            group,
            records: retention
                .clone()
                .map(|retention| (store.clone(), retention)),
            throttle: self.host.throttle.clone(),
        };
        let fatal = stopped(group);
        let raft = Raft::new(self.host.id, config, network, log_store, machine)
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
            retention,
            deleted_below: Arc::new(AtomicU64::new(0)),
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
            // And any snapshot staged for it.
            partition
                .store
                .sibling(crate::machine::staging_group(group))
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

    /// On a partition's leader: moves its log start to `start_offset` (through the log, so every
    /// replica trims at the same offset; never back, never past the end). Returns the start.
    pub async fn trim(
        &self,
        group: GroupId,
        start_offset: u64,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        match propose(
            &partition.raft,
            group,
            Command::Trim { start_offset },
            timeout,
        )
        .await?
        {
            Response::Trimmed(start) => Ok(start),
            other => Err(WriteError::Stopped {
                group,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Proposes a compaction by key of a partition up to `clean_to` (see `compaction`), with
    /// the leader's clock `at_ms`; returns the clean point once applied here.
    pub async fn compact(
        &self,
        group: GroupId,
        clean_to: u64,
        at_ms: i64,
        delete_retention_ms: u64,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        let partition = self
            .partition(group)
            .ok_or(WriteError::GroupNotFound(group))?;
        let command = Command::Compact {
            clean_to,
            at_ms,
            delete_retention_ms,
        };
        match propose(&partition.raft, group, command, timeout).await? {
            Response::Compacted(clean) => Ok(clean),
            other => Err(WriteError::Stopped {
                group,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Where compaction stands on this replica of a partition.
    pub fn compaction_status(&self, group: GroupId) -> Option<crate::CompactionStatus> {
        let partition = self.partition(group)?;
        let retention = partition.retention.as_ref()?;
        let (clean_offset, clean_position, compacted_bytes) = retention.compaction();
        let end_position = retention.end_position();
        Some(crate::CompactionStatus {
            clean_offset,
            compacted_bytes,
            dirty_bytes: end_position
                .saturating_sub(clean_position.max(retention.start_position())),
            tombstones: retention.tombstones.load(Ordering::Acquire),
        })
    }

    /// The clean point a compaction of about `max_bytes` of a partition's log should go to:
    /// the base offset of the first entry from `max_bytes` past the clean point on (at least one
    /// entry further), never past the last entry (the tail is left to grow). `None` when no
    /// whole entry lies between. `after`: a clean point the caller knows of (a compaction just
    /// answered, perhaps not yet published).
    pub async fn compaction_target(
        &self,
        group: GroupId,
        after: u64,
        max_bytes: u64,
    ) -> Result<Option<u64>, ReadError> {
        let partition = self
            .partition(group)
            .ok_or(ReadError::GroupNotFound(group))?;
        let (clean, clean_position) = partition.retention.as_ref().map_or((0, 0), |retention| {
            let (clean, clean_position, _) = retention.compaction();
            (
                clean.max(retention.start_offset()),
                clean_position.max(retention.start_position()),
            )
        });
        self.read_store(group, move |store| {
            let Some(last) = store.index_floor(u64::MAX)? else {
                return Ok(None);
            };
            let (clean, clean_position) = match store.index_floor(after)? {
                Some(entry) if after > clean && entry.base_offset == after => {
                    (after, entry.position)
                }
                _ => (clean, clean_position),
            };
            let target = store
                .index_at_position(clean_position.saturating_add(max_bytes))?
                .map_or(last.base_offset, |entry| entry.base_offset)
                .min(last.base_offset);
            Ok((target > clean).then_some(target))
        })
        .await
    }

    /// A partition's log as this replica holds it: its first offset and the end (high
    /// watermark).
    pub fn log_range(&self, group: GroupId) -> Option<(u64, u64)> {
        let partition = self.partition(group)?;
        let start = partition.retention.as_ref()?.start_offset();
        Some((start, *partition.high_watermark.borrow()))
    }

    /// Where a partition's records stand in bytes on this replica: `(position of the log entry
    /// holding the start, position of the end)`; their difference is about the bytes the
    /// partition holds. Positions count the bytes of every record batch written since offset 0.
    pub fn log_positions(&self, group: GroupId) -> Option<(u64, u64)> {
        let partition = self.partition(group)?;
        let retention = partition.retention.as_ref()?;
        let end = retention.end_position();
        Some((retention.start_position().min(end), end))
    }

    /// The first offset of the first log entry whose records start at or past byte `position`
    /// (see [`RaftNode::log_positions`]), if one does.
    pub async fn offset_at_position(
        &self,
        group: GroupId,
        position: u64,
    ) -> Result<Option<u64>, ReadError> {
        self.read_store(group, move |store| {
            Ok(store
                .index_at_position(position)?
                .map(|entry| entry.base_offset))
        })
        .await
    }

    /// Runs `read` on a partition's store on the blocking pool (RocksDB reads block).
    async fn read_store<T: Send + 'static>(
        &self,
        group: GroupId,
        read: impl FnOnce(&GroupStore) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, ReadError> {
        let partition = self
            .partition(group)
            .ok_or(ReadError::GroupNotFound(group))?;
        let store = partition.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|error| ReadError::Task {
                group,
                reason: error.to_string(),
            })?
    }

    /// Deletes what retention dropped: for each partition whose log start moved past log
    /// entries, has openraft snapshot (cheap: a partition's state is small) and purge its log up
    /// to the entry holding the start, and deletes the entries it purged (a follower that
    /// installed a snapshot has its purge mark past what retention dropped: those entries go as
    /// retention moves). State groups and the metadata group snapshot and purge on their own
    /// (openraft's policy, [`RaftOptions::snapshot_entries`]). Call it periodically.
    pub async fn compact_logs(&self) {
        let partitions = self.partitions();
        if let Some(meta) = self.host.meta.get() {
            self.purge_state_log(META_GROUP, meta).await;
        }
        for (group, partition) in partitions {
            let Some(retention) = &partition.retention else {
                self.purge_state_log(group, &partition.raft).await;
                continue;
            };
            let (applied, purged, snapshot) = {
                let metrics = partition.raft.metrics();
                let metrics = metrics.borrow_watched();
                (
                    metrics.last_applied.as_ref().map(|log_id| log_id.index),
                    metrics.purged.as_ref().map(|log_id| log_id.index),
                    metrics.snapshot.as_ref().map(|log_id| log_id.index),
                )
            };
            // Everything before the entry holding the start goes; a partition that holds no
            // record (never written, or all trimmed) needs none of its applied log, so an idle
            // one does not keep old journal files.
            let first = match retention.keep_from() {
                u64::MAX => applied.map_or(0, |applied| applied + 1),
                first => first,
            };
            if first == 0 {
                continue;
            }
            let upto = first - 1;
            if purged.is_none_or(|purged| purged < upto) {
                let trigger = partition.raft.trigger();
                let result = if snapshot.is_none_or(|snapshot| snapshot < upto) {
                    trigger.snapshot().await
                } else {
                    trigger.purge_log(upto).await
                };
                if let Err(error) = result {
                    tracing::warn!(%group, %error, "log compaction");
                }
            }
            let below = purged.map_or(0, |purged| purged + 1).min(first);
            if below > partition.deleted_below.load(Ordering::Acquire) {
                let mut batch = partition.store.batch();
                partition.store.delete_log_below(&mut batch, below);
                match partition.store.write(batch, None).await {
                    Ok(()) => partition.deleted_below.store(below, Ordering::Release),
                    Err(error) => tracing::warn!(%group, %error, "deleting purged log entries"),
                }
            }
        }
    }

    /// Every [`RaftOptions::state_purge_interval`], snapshots a metadata or state group and purges
    /// its whole log (its state is in its rows; a follower behind gets the snapshot).
    async fn purge_state_log<SM>(&self, group: GroupId, raft: &openraft::Raft<C, SM>)
    where
        SM: openraft::storage::RaftStateMachine<C>,
    {
        let now = std::time::Instant::now();
        let due = {
            let mut purges = self
                .host
                .state_purges
                .lock()
                .expect("state purge lock is never poisoned");
            let last = *purges.entry(group).or_insert(now);
            now.duration_since(last) >= self.host.options.state_purge_interval
        };
        if !due {
            return;
        }
        let (applied, purged, snapshot) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow_watched();
            let index =
                |log_id: &Option<crate::types::LogId>| log_id.as_ref().map(|log_id| log_id.index);
            (
                index(&metrics.last_applied),
                index(&metrics.purged),
                index(&metrics.snapshot),
            )
        };
        let Some(applied) = applied else {
            return;
        };
        if purged.is_some_and(|purged| purged >= applied) {
            return;
        }
        let trigger = raft.trigger();
        let result = match snapshot {
            // A snapshot well past the purge mark: purge up to it, and start the clock again.
            Some(snapshot) if purged.is_none_or(|purged| purged < snapshot) => {
                self.host
                    .state_purges
                    .lock()
                    .expect("state purge lock is never poisoned")
                    .insert(group, now);
                trigger.purge_log(snapshot).await
            }
            _ => trigger.snapshot().await,
        };
        if let Err(error) = result {
            tracing::warn!(%group, %error, "state log purge");
        }
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
        let retention = partition.retention.clone();
        let below_start = |retention: &Option<Arc<Retention>>| {
            let start = retention
                .as_ref()
                .map_or(0, |retention| retention.start_offset());
            (offset < start).then_some(ReadError::BelowStart {
                group,
                offset,
                start,
            })
        };
        if let Some(error) = below_start(&retention) {
            return Err(error);
        }
        if offset >= high_watermark {
            return Ok(ReadBatch {
                high_watermark,
                batches: Vec::new(),
            });
        }
        // Below the clean point, records are compacted rows; from it on, log entries. A
        // compaction or a trim applied meanwhile may delete what a read looks for: it is read
        // again from where they left things.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let clean = retention
                .as_ref()
                .map_or(0, |retention| retention.clean_offset());
            let store = partition.store.clone();
            let read = tokio::task::spawn_blocking(move || {
                if offset < clean {
                    let rows = store.rows_until(Table::Compacted, offset, clean, max_bytes)?;
                    if !rows.is_empty() {
                        return Ok(ReadBatch {
                            high_watermark,
                            batches: rows
                                .into_iter()
                                .map(|(offset, row)| (offset, 1, bytes::Bytes::from(row)))
                                .collect(),
                        });
                    }
                }
                read_committed(&store, offset.max(clean), high_watermark, max_bytes)
            })
            .await
            .map_err(|error| ReadError::Task {
                group,
                reason: error.to_string(),
            })?;
            match read {
                Err(error) => {
                    if let Some(error) = below_start(&retention) {
                        return Err(error);
                    }
                    let moved = retention
                        .as_ref()
                        .is_some_and(|retention| retention.clean_offset() != clean);
                    if attempts >= 50 {
                        return Err(error);
                    }
                    if !moved {
                        // A compaction written but not yet published (or a retention trim).
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                ok => return ok,
            }
        }
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
        let start = partition
            .retention
            .as_ref()
            .map_or(0, |retention| retention.start_offset());
        let key = crate::machine::time_key(timestamp_ms);
        let row = self
            .read_store(group, move |store| {
                Ok(store.row_at_or_after(Table::TimeIndex, key)?)
            })
            .await?;
        Ok(row.and_then(|(_, value)| {
            let base = crate::machine::time_row_offset(&value)?;
            // Written with its entry, possibly just before the high watermark moved past it;
            // the row kept at or below the log start stands for the start.
            let base = base.max(start);
            (base < high_watermark).then_some(base)
        }))
    }

    /// The offset of a partition's first time index row, if it has one: the records before it
    /// carry no timestamp the index knows (written before the time index existed).
    pub async fn time_index_first(&self, group: GroupId) -> Result<Option<u64>, ReadError> {
        let row = self
            .read_store(group, |store| {
                Ok(store.row_at_or_after(Table::TimeIndex, 0)?)
            })
            .await?;
        Ok(row.and_then(|(_, value)| crate::machine::time_row_offset(&value)))
    }

    /// This node's view of a group.
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        if group == META_GROUP {
            let raft = self.host.meta.get()?;
            return Some(status_of(raft, group, 0, 0, 0));
        }
        let partition = self.partition(group)?;
        let high_watermark = *partition.high_watermark.borrow();
        let (start, bytes) = partition.retention.as_ref().map_or((0, 0), |retention| {
            (retention.start_offset(), retention.held_bytes())
        });
        Some(status_of(
            &partition.raft,
            group,
            high_watermark,
            start,
            bytes,
        ))
    }

    /// Throttles what this node sends to `node` in `group` while it catches up (a move).
    pub fn throttle(&self, group: GroupId, node: NodeId) {
        self.host.throttle.add(group, node);
    }

    /// Keeps throttling only the `(group, node)` links `keep` says are still catching up.
    pub fn retain_throttled(&self, keep: impl Fn(GroupId, NodeId) -> bool) {
        self.host.throttle.retain(keep);
    }

    /// Asks this node, if it leads the metadata group, to hand leadership to `to`.
    pub async fn transfer_meta_leader(&self, to: NodeId) -> Result<(), GroupError> {
        let raft = self
            .host
            .meta
            .get()
            .ok_or(GroupError::NotFound(META_GROUP))?;
        raft.trigger()
            .transfer_leader(to)
            .await
            .map_err(stopped(META_GROUP))
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
                Some(partition) if kind == RaftKind::SnapshotChunk => {
                    self.snapshot_chunk(&partition, payload).await
                }
                Some(partition) => {
                    // A member asking for votes in a group this node leads does not hear from
                    // it: quiescent groups send no heartbeats (say it restarted with an empty
                    // log). One heartbeat round tells it the leader, and its answer shows the
                    // leader what it lacks, so replication (or a snapshot) starts at once.
                    if matches!(kind, RaftKind::Vote | RaftKind::PreVote)
                        && partition.raft.metrics().borrow_watched().current_leader == Some(node)
                    {
                        let raft = partition.raft.clone();
                        tokio::spawn(async move {
                            let _ = raft.trigger().heartbeat().await;
                        });
                    }
                    dispatch(&partition.raft, kind, payload).await
                }
                None => Err(InboundError::GroupNotFound { group, node }),
            }
        };
        match result {
            Ok(encoded) => encoded,
            Err(error) => encode(&RaftAnswer::<()>::Err(error.to_string())).unwrap_or_default(),
        }
    }

    /// Handles one call of a partition snapshot transfer (see `snapshot`).
    async fn snapshot_chunk(
        &self,
        partition: &Partition,
        payload: &[u8],
    ) -> Result<Vec<u8>, InboundError> {
        use crate::snapshot::Message;
        let kind = RaftKind::SnapshotChunk;
        let answer = |result: Result<Vec<u8>, String>| match result {
            Ok(encoded) => Ok(encoded),
            Err(message) => encode(&RaftAnswer::<()>::Err(message))
                .map_err(|source| InboundError::Encode { kind, source }),
        };
        let message: Message = crate::codec::decode(payload)
            .map_err(|source| InboundError::Undecodable { kind, source })?;
        let group = partition.store.group();
        let staging = partition
            .store
            .sibling(crate::machine::staging_group(group));
        let transfers = &self.host.transfers;
        let lock = transfers.lock(&staging);
        let _one_call_at_a_time = lock.lock().await;
        match message {
            Message::Begin {
                vote,
                first_index,
                last_index,
            } => {
                // Writes of an earlier call cut off mid-way are applied before the staging is
                // read (the write queue is ordered): none lands after the cursor.
                if let Err(error) = staging.write(staging.batch(), None).await {
                    return answer(Err(error.to_string()));
                }
                let cursor = {
                    let staging = staging.clone();
                    tokio::task::spawn_blocking(move || {
                        // A staging that cannot go on is emptied first.
                        let cursor =
                            crate::snapshot::Transfers::cursor(&staging, first_index, last_index)?;
                        Ok::<_, std::io::Error>(cursor)
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|cursor| cursor)
                };
                let result = match cursor {
                    Ok((cursor, fresh)) => {
                        let emptied = if fresh {
                            staging.destroy().await
                        } else {
                            // Compacted rows are never resumed (they change with compactions).
                            let mut batch = staging.batch();
                            for table in crate::compaction::SNAPSHOT_TABLES {
                                staging.clear_table(&mut batch, table);
                            }
                            staging.write(batch, None).await
                        };
                        if let Err(error) = emptied {
                            return answer(Err(error.to_string()));
                        }
                        transfers.begin(&staging, vote, cursor.next_index);
                        tracing::info!(%group, first_index, last_index, ?cursor, "receiving a partition snapshot");
                        encode(&RaftAnswer::<crate::snapshot::Cursor>::Ok(cursor))
                            .map_err(|error| error.to_string())
                    }
                    Err(error) => Err(error.to_string()),
                };
                answer(result)
            }
            Message::Records { vote, chunk, crc } => {
                let result = transfers
                    .stage(&staging, &vote, chunk, crc)
                    .await
                    .map_err(|error| error.to_string())
                    .and_then(|()| {
                        encode(&RaftAnswer::<()>::Ok(())).map_err(|error| error.to_string())
                    });
                answer(result)
            }
            Message::Finish { vote, meta, data } => {
                if !transfers.in_progress(&staging, &vote) {
                    return answer(Err(
                        "no snapshot transfer in progress here (begin again)".into()
                    ));
                }
                let last_index = meta.last_log_id.as_ref().map_or(0, |log_id| log_id.index);
                let check = {
                    let staging = staging.clone();
                    let data = data.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::machine::check_snapshot(&staging, &data, last_index)
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|checked| checked)
                };
                if let Err(error) = check {
                    tracing::warn!(%group, %error, "partition snapshot incomplete; staging emptied");
                    transfers.end(&staging, &vote);
                    let _ = staging.destroy().await;
                    return answer(Err(error.to_string()));
                }
                let snapshot = crate::types::Snapshot {
                    meta,
                    snapshot: std::io::Cursor::new(data),
                };
                let result = partition
                    .raft
                    .install_full_snapshot(vote.clone(), snapshot)
                    .await;
                transfers.end(&staging, &vote);
                // Installed: the staging was adopted (emptied). Not installed (the follower had
                // caught up meanwhile): it is not needed.
                if matches!(staging.log_bounds(), Ok(Some(_))) {
                    let _ = staging.destroy().await;
                }
                tracing::info!(%group, last_index, ok = result.is_ok(), "partition snapshot installed");
                let answer_value: RaftAnswer<_> = result.map_err(|error| error.to_string());
                encode(&answer_value).map_err(|source| InboundError::Encode { kind, source })
            }
        }
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        for (_, partition) in self.partitions() {
            let _ = partition.raft.shutdown().await;
        }
        if let Some(meta) = self.host.meta.get() {
            let _ = meta.shutdown().await;
        }
    }
}
