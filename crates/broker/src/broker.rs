//! [`Broker`]: the node's broker, the state every service module shares, and its start.
//!
//! The broker's work is split by concern, each in its own module as `impl Broker` blocks:
//! `produce` (append through the partition's leader), `fetch` (read committed records),
//! `admin` (topics and metadata commands), `cluster` (status views), `background` (reconcile
//! and leader balance loops), `peer` (the only code that calls other nodes), with the decisions
//! of the retry loops as pure state machines in `route`. This module owns what they share: the
//! Raft node, the options, the applied metadata, and the leader hints.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use std::time::Instant;

use ordo_raft::GroupId;
use ordo_raft::RaftNode;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::BrokerError;
use crate::GroupsConfig;
use crate::Limits;
use crate::NodeId;
use crate::QueuesConfig;
use crate::coordinator::Coordinators;
use crate::metadata::MetaMachine;
use crate::metadata::MetaState;
use crate::metadata::Topic;

/// Longest a node waits to catch up with the metadata leader before it says a topic does not
/// exist.
const METADATA_CATCH_UP_MAX: Duration = Duration::from_secs(2);

/// How a broker is set up.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// This node.
    pub node_id: NodeId,
    /// The static cluster (`initial_cluster`): every node that forms the cluster at first
    /// start, with its advertised address. Later nodes join and are found in the node table.
    pub nodes: BTreeMap<NodeId, String>,
    /// This node's advertised address.
    pub advertise: String,
    /// Addresses of nodes of an existing cluster to join through (besides `nodes`).
    pub join: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// How often a leader checks whether to hand leadership back to a partition's preferred
    /// leader.
    pub leader_balance_interval: Duration,
    /// Consumer groups.
    pub groups: GroupsConfig,
    /// Queues.
    pub queues: QueuesConfig,
    /// Retention defaults and checks.
    pub retention: crate::RetentionConfig,
}

/// What every part of the broker shares.
pub(crate) struct BrokerState {
    pub(crate) node: RaftNode,
    pub(crate) options: BrokerOptions,
    /// The metadata state as applied on this node, republished after each command.
    pub(crate) meta: watch::Receiver<Arc<MetaState>>,
    /// The leader each partition group was last seen with, so calls go there first.
    leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    /// Picks the partition of keyless records, per call.
    pub(crate) round_robin: AtomicU32,
    /// Bounds produce calls in flight on this node (`limits.produce_in_flight_max`).
    pub(crate) produce_permits: Semaphore,
    /// The consumer group coordinator shards hosted here.
    pub(crate) coordinators: Coordinators,
    /// The queue partitions hosted here.
    pub(crate) queues: crate::queue::Queues,
}

/// The broker of one node. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    pub(crate) state: Arc<BrokerState>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("node", &self.state.options.node_id)
            .finish_non_exhaustive()
    }
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
        options
            .limits
            .validate()
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        options
            .groups
            .validate()
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        options
            .queues
            .validate()
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let (published, meta) = watch::channel(Arc::new(MetaState::default()));
        for (id, address) in &options.nodes {
            node.peers().set_address(*id, address);
        }
        node.start_meta(Box::new(MetaMachine::new(published)))
            .await
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let produce_permits = Semaphore::new(options.limits.produce_in_flight_max as usize);
        let broker = Broker {
            state: Arc::new(BrokerState {
                node,
                options,
                meta,
                leader_hints: Mutex::new(HashMap::new()),
                round_robin: AtomicU32::new(0),
                produce_permits,
                coordinators: Coordinators::default(),
                queues: crate::queue::Queues::default(),
            }),
        };
        broker.spawn_background(tasks, shutdown);
        Ok(broker)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.state.options.node_id
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.state.options.limits
    }

    /// The consumer group settings in force.
    pub fn groups_config(&self) -> &GroupsConfig {
        &self.state.options.groups
    }

    /// The queue settings in force.
    pub fn queues_config(&self) -> &QueuesConfig {
        &self.state.options.queues
    }

    /// The metadata state as applied on this node.
    pub fn metadata(&self) -> Arc<MetaState> {
        self.state.meta.borrow().clone()
    }

    /// The Raft layer, for the internal service.
    pub fn raft(&self) -> &RaftNode {
        &self.state.node
    }

    /// Produce requests in flight on this node, and the maximum.
    pub fn produce_in_flight(&self) -> (u64, u64) {
        let max = self.state.options.limits.produce_in_flight_max;
        (
            max - self.state.produce_permits.available_permits() as u64,
            max,
        )
    }

    /// The topic as this node applied it.
    pub(crate) fn topic(&self, name: &str) -> Result<Topic, BrokerError> {
        self.state
            .meta
            .borrow()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))
    }

    /// The topic, making sure a "not found" is true cluster-wide: when this node does not know
    /// the topic, it first applies every metadata command committed so far (read index from the
    /// metadata leader), so a topic just created through another node is found. When it cannot
    /// (no metadata leader reachable), it answers UNAVAILABLE, never a guessed NOT_FOUND.
    pub(crate) async fn topic_fresh(
        &self,
        name: &str,
        deadline: Instant,
    ) -> Result<Topic, BrokerError> {
        if let Ok(topic) = self.topic(name) {
            return Ok(topic);
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(METADATA_CATCH_UP_MAX);
        let caught_up = match self.meta_read_index(remaining).await {
            Some(index) => self.state.node.wait_meta_applied(index, remaining).await,
            None => false,
        };
        match self.topic(name) {
            // Not known here, and this node could not catch up with the metadata leader (an
            // election, a partition): the topic may exist, so "not found" would be a guess.
            Err(BrokerError::TopicNotFound(_)) if !caught_up => {
                let leader = self.state.node.meta_leader();
                Err(BrokerError::Unavailable {
                    message: format!(
                        "node {} does not know topic {name:?} and could not reach the metadata leader to learn whether it exists; retry",
                        self.node_id()
                    ),
                    leader,
                    leader_address: leader.and_then(|leader| self.address(leader)),
                })
            }
            found => found,
        }
    }

    /// The topic (as [`Broker::topic_fresh`] finds it) and the Raft group of its `partition`,
    /// or PARTITION_NOT_FOUND.
    pub(crate) async fn partition_fresh(
        &self,
        name: &str,
        partition: u32,
        deadline: Instant,
    ) -> Result<(Topic, GroupId), BrokerError> {
        let topic = self.topic_fresh(name, deadline).await?;
        let partitions = topic.partitions.len() as u32;
        if partition >= partitions {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.name.clone(),
                partition,
                partitions,
            });
        }
        let group = GroupId(topic.group(partition));
        Ok((topic, group))
    }

    /// A node's advertised address.
    pub(crate) fn address(&self, node: NodeId) -> Option<String> {
        if let Some(info) = self.state.meta.borrow().nodes.get(&node) {
            return Some(info.address.clone());
        }
        self.state.options.nodes.get(&node).cloned()
    }

    /// The leader of a group this node replicates, as its own replica sees it.
    pub(crate) fn local_view_of_leader(&self, group: GroupId) -> Option<NodeId> {
        self.state
            .node
            .status(group)
            .and_then(|status| status.leader)
    }

    /// The leader a group was last seen with.
    pub(crate) fn leader_hint(&self, group: GroupId) -> Option<NodeId> {
        self.hints().get(&group).copied()
    }

    /// Remembers (or forgets) a group's leader.
    pub(crate) fn set_leader_hint(&self, group: GroupId, leader: Option<NodeId>) {
        let mut hints = self.hints();
        match leader {
            Some(leader) => hints.insert(group, leader),
            None => hints.remove(&group),
        };
    }

    /// Forgets the hints of groups that no longer exist.
    pub(crate) fn retain_leader_hints(&self, exists: impl Fn(GroupId) -> bool) {
        self.hints().retain(|group, _| exists(*group));
    }

    fn hints(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, NodeId>> {
        self.state
            .leader_hints
            .lock()
            .expect("hint lock is never poisoned: no code panics while holding it")
    }
}

/// Milliseconds since the Unix epoch by this node's clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}
