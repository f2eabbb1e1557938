//! The cluster metadata: topics and where their partitions live, the producer registry
//! (idempotent producer ids, names and epochs), and where the consumer group coordinators live. Replicated by the metadata Raft group; every
//! node applies the same commands in the same order, so `apply` must be deterministic (no
//! clocks, no randomness, no I/O: a command carries the proposer's time and limits).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::NodeId;

/// Bits of a group id that hold the partition; the topic id is above them.
const PARTITION_BITS: u32 = 20;

/// A topic and its replica assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Unique for the life of the cluster; a re-created topic gets a new id (and new groups).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// For each partition, its replicas; the first is the preferred leader.
    pub partitions: Vec<Vec<NodeId>>,
    /// Free-form config.
    pub config: BTreeMap<String, String>,
}

/// Topic config key: whose clock record timestamps are (`create`: the producer's, or the
/// receiving node's when a record has none; `append`: the receiving node's, always).
pub const TIMESTAMP_TYPE: &str = "timestamp.type";

impl Topic {
    /// The Raft group of a partition.
    pub fn group(&self, partition: u32) -> u64 {
        group_of(self.id, partition)
    }

    /// Whether records get the receiving node's clock as their timestamp, always.
    pub fn append_time(&self) -> bool {
        self.config.get(TIMESTAMP_TYPE).map(String::as_str) == Some("append")
    }

    /// Whether the topic is compacted by key (its records need keys).
    pub fn compacted(&self) -> bool {
        self.config
            .get(crate::retention::CLEANUP_POLICY)
            .map(String::as_str)
            == Some("compact")
    }
}

/// The group id of `(topic id, partition)`. Group 0 is the metadata group; topic ids start at 1.
pub fn group_of(topic_id: u64, partition: u32) -> u64 {
    (topic_id << PARTITION_BITS) | u64::from(partition)
}

/// The whole metadata state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
    /// The next topic id to hand out.
    pub next_topic_id: u64,
    /// Index of the last applied command.
    pub applied_index: u64,
    /// Idempotent producers.
    pub producers: ProducerRegistry,
    /// The consumer group coordinator shards, once created: an internal "topic" whose
    /// partitions are state groups (`coordinator`), never a log; not among `topics`.
    pub coordinators: Option<Topic>,
    /// Queues by name.
    pub queues: BTreeMap<String, Queue>,
    /// Every node of the cluster (`nodes`).
    pub nodes: BTreeMap<NodeId, crate::nodes::NodeInfo>,
    /// Nodes that left the cluster: never placed on, even when named by a static config.
    pub removed_nodes: std::collections::BTreeSet<NodeId>,
    /// Replica moves in progress: a group's replicas it moves to (`nodes`).
    pub moves: BTreeMap<u64, Vec<NodeId>>,
}

/// A queue over a topic: per partition, a state group beside the topic's partition, on the same
/// replicas (`queue_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// Unique for the life of the cluster (from the topic ids): its groups are
    /// `group_of(id, partition)`.
    pub id: u64,
    /// Name.
    pub name: String,
    /// The topic it reads.
    pub topic: String,
    /// The topic's id when the queue was created (a re-created topic does not inherit it).
    pub topic_id: u64,
    /// Per partition, its replicas: the topic's.
    pub partitions: Vec<Vec<NodeId>>,
    /// Settings.
    pub config: QueueConfig,
}

/// A queue's settings (validated by the proposer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Lease length of a receive that asks for none.
    pub visibility_timeout_ms: u64,
    /// Deliveries before a message goes to the dead-letter topic.
    pub max_deliveries: u32,
    /// One message per key at a time, in offset order.
    pub key_ordered: bool,
    /// Each record is delivered no earlier than its timestamp plus this.
    pub delay_ms: u64,
    /// Most messages leased at once per partition.
    pub in_flight_max: u32,
    /// Where messages go after `max_deliveries` or a reject.
    pub dead_letter_topic: String,
}

impl Queue {
    /// The state group of a partition.
    pub fn group(&self, partition: u32) -> u64 {
        group_of(self.id, partition)
    }

    /// The group of the topic's partition the queue reads.
    pub fn log_group(&self, partition: u32) -> u64 {
        group_of(self.topic_id, partition)
    }
}

/// The metadata state as written before the node table existed; still read.
#[derive(Deserialize)]
struct MetaStateBeforeNodes {
    topics: BTreeMap<String, Topic>,
    next_topic_id: u64,
    applied_index: u64,
    producers: ProducerRegistry,
    coordinators: Option<Topic>,
    queues: BTreeMap<String, Queue>,
}

/// The metadata state as written before queues existed; still read.
#[derive(Deserialize)]
struct MetaStateBeforeQueues {
    topics: BTreeMap<String, Topic>,
    next_topic_id: u64,
    applied_index: u64,
    producers: ProducerRegistry,
    coordinators: Option<Topic>,
}

/// The metadata state as written before the producer registry existed; still read.
#[derive(Deserialize)]
struct MetaStateBeforeProducers {
    topics: BTreeMap<String, Topic>,
    next_topic_id: u64,
    applied_index: u64,
}

/// The metadata state as written before the coordinators existed; still read.
#[derive(Deserialize)]
struct MetaStateBeforeCoordinators {
    topics: BTreeMap<String, Topic>,
    next_topic_id: u64,
    applied_index: u64,
    producers: ProducerRegistry,
}

/// The name of the coordinators' internal topic (never in `MetaState::topics`).
pub const COORDINATORS_NAME: &str = "__groups";

impl MetaState {
    /// Decodes a persisted state, of this layout or an older one.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        let error = match postcard::from_bytes::<MetaState>(bytes) {
            Ok(state) => return Ok(state),
            Err(error) => error,
        };
        if let Ok(old) = postcard::from_bytes::<MetaStateBeforeNodes>(bytes) {
            return Ok(MetaState {
                topics: old.topics,
                next_topic_id: old.next_topic_id,
                applied_index: old.applied_index,
                producers: old.producers,
                coordinators: old.coordinators,
                queues: old.queues,
                ..MetaState::default()
            });
        }
        if let Ok(old) = postcard::from_bytes::<MetaStateBeforeQueues>(bytes) {
            return Ok(MetaState {
                topics: old.topics,
                next_topic_id: old.next_topic_id,
                applied_index: old.applied_index,
                producers: old.producers,
                coordinators: old.coordinators,
                ..MetaState::default()
            });
        }
        if let Ok(old) = postcard::from_bytes::<MetaStateBeforeCoordinators>(bytes) {
            return Ok(MetaState {
                topics: old.topics,
                next_topic_id: old.next_topic_id,
                applied_index: old.applied_index,
                producers: old.producers,
                ..MetaState::default()
            });
        }
        match postcard::from_bytes::<MetaStateBeforeProducers>(bytes) {
            Ok(old) => Ok(MetaState {
                topics: old.topics,
                next_topic_id: old.next_topic_id,
                applied_index: old.applied_index,
                ..MetaState::default()
            }),
            Err(_) => Err(error),
        }
    }
}

/// Every producer id handed out, and the named producers' epochs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerRegistry {
    /// The next producer id to hand out; ids below it were allocated (ids start at 1).
    pub next_id: u64,
    /// Named producers by name.
    pub named: BTreeMap<String, NamedProducer>,
    /// Named producers' ids to their current epoch.
    pub epochs: BTreeMap<u64, u32>,
}

/// A producer that keeps its id across restarts through its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedProducer {
    /// Its id.
    pub id: u64,
    /// Its current epoch.
    pub epoch: u32,
    /// When it was last initialized (the proposer's clock, ms since the Unix epoch).
    pub initialized_ms: u64,
    /// The request tokens of its last InitProducer commands with the epoch each got, newest
    /// last (at most [`INIT_TOKENS_KEPT`]): a command seen again is answered, not applied.
    pub tokens: Vec<(u64, u32)>,
}

/// InitProducer request tokens remembered per name.
pub const INIT_TOKENS_KEPT: usize = 4;

/// What the registry says of a producer id and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerCheck {
    /// Allocated, and the epoch is current.
    Current,
    /// A newer epoch of the id exists.
    Fenced {
        /// The current epoch.
        current_epoch: u32,
    },
    /// The id, or the epoch, was never allocated (as far as this state knows).
    Unknown,
}

impl ProducerRegistry {
    /// Judges a producer's id and epoch.
    pub fn check(&self, id: u64, epoch: u32) -> ProducerCheck {
        if id == 0 || id >= self.next_id {
            return ProducerCheck::Unknown;
        }
        let current = self.epochs.get(&id).copied().unwrap_or(0);
        if epoch < current {
            ProducerCheck::Fenced {
                current_epoch: current,
            }
        } else if epoch > current {
            ProducerCheck::Unknown
        } else {
            ProducerCheck::Current
        }
    }
}

/// Commands of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create a topic, assigning replicas over `nodes`.
    CreateTopic {
        /// Name (validated by the proposer).
        name: String,
        /// Partition count (validated by the proposer).
        partitions: u32,
        /// Replicas per partition (validated by the proposer).
        replication_factor: u32,
        /// Config.
        config: BTreeMap<String, String>,
        /// The nodes to place replicas on.
        nodes: Vec<NodeId>,
    },
    /// Delete a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// Allocate a producer id, or (named, already known) the next epoch of its id.
    InitProducer {
        /// The producer's name, if it has one (validated by the proposer).
        name: Option<String>,
        /// The caller's token of this InitProducer (its retries repeat it; 0: none): a named
        /// producer's epoch is raised once per token.
        token: u64,
        /// The proposer's clock, milliseconds since the Unix epoch.
        at_ms: u64,
        /// Most names the registry keeps (the proposer's limit).
        names_max: u32,
    },
    /// Create the consumer group coordinator shards (once in the life of the cluster).
    CreateCoordinators {
        /// Shards (validated by the proposer).
        shards: u32,
        /// Replicas per shard.
        replication_factor: u32,
        /// The nodes to place replicas on.
        nodes: Vec<NodeId>,
    },
    /// Create a queue over a topic.
    CreateQueue {
        /// Name (validated by the proposer).
        name: String,
        /// The topic.
        topic: String,
        /// Settings (validated by the proposer).
        config: QueueConfig,
        /// Most queues (the proposer's limit).
        queues_max: u32,
    },
    /// Delete a queue.
    DeleteQueue {
        /// Name.
        name: String,
    },
    /// Change a topic's config (validated by the proposer).
    AlterTopicConfig {
        /// The topic.
        name: String,
        /// Keys to set.
        set: BTreeMap<String, String>,
        /// Keys to remove.
        remove: Vec<String>,
    },
    /// Raise a topic's partition count to `partitions`, placing the new partitions' replicas
    /// over `nodes` as at create (the topic's replication factor).
    AddPartitions {
        /// The topic.
        name: String,
        /// The new count (validated by the proposer; never below the current one).
        partitions: u32,
        /// The nodes to place replicas on.
        nodes: Vec<NodeId>,
    },
    /// Add a node to the node table, or change its address (`nodes`).
    RegisterNode {
        /// Its id.
        id: NodeId,
        /// Its advertised address.
        address: String,
        /// The caller is that node, already a member of the cluster (its address changed):
        /// a different address replaces the known one instead of being refused.
        member: bool,
    },
    /// Move a node's replicas elsewhere, then remove it (`nodes`).
    DrainNode {
        /// The node.
        id: NodeId,
    },
    /// Take a drained node that holds no replica out of the table (`nodes`).
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// Move groups' replicas (`nodes`): each group with its new replicas, the first the
    /// preferred leader.
    Reassign {
        /// Groups and their new replicas.
        moves: Vec<(u64, Vec<NodeId>)>,
    },
    /// A group's replicas are `replicas` now: its move is done (`nodes`).
    FinishMove {
        /// The group.
        group: u64,
        /// Its replicas: the move's target.
        replicas: Vec<NodeId>,
    },
    /// Spread replicas and preferred leaders evenly over the active nodes (`nodes`).
    Rebalance {},
}

/// Answers of metadata commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaAnswer {
    /// The topic was created.
    Created(Topic),
    /// The topic was deleted.
    Deleted,
    /// The topic already exists.
    AlreadyExists,
    /// No such topic.
    NotFound,
    /// The command cannot be applied.
    Rejected(String),
    /// A producer session.
    Producer {
        /// Its id.
        id: u64,
        /// Its epoch.
        epoch: u32,
        /// The metadata log index it was allocated at.
        index: u64,
    },
    /// The registry holds `names_max` names.
    TooManyProducerNames {
        /// The limit.
        max: u32,
    },
    /// The queue was created.
    QueueCreated(Queue),
    /// The topic's config was changed: the topic now.
    Altered(Topic),
    /// The cluster holds `max` queues.
    TooManyQueues {
        /// The limit.
        max: u32,
    },
    /// A node command was applied.
    Done,
    /// No such node.
    NodeNotFound(NodeId),
    /// Moves started: the groups moving and their targets.
    Moving(Vec<(u64, Vec<NodeId>)>),
}

impl MetaState {
    /// Applies one command. Deterministic.
    pub fn apply(&mut self, index: u64, command: MetaCommand) -> MetaAnswer {
        self.applied_index = index;
        match command {
            MetaCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                config,
                nodes,
            } => {
                if self.topics.contains_key(&name) {
                    return MetaAnswer::AlreadyExists;
                }
                // Re-checked here: a command may come from any node (or a forged internal call),
                // and a bad one would be replayed by every replica forever.
                if partitions == 0 || partitions > (1 << PARTITION_BITS) {
                    return MetaAnswer::Rejected(format!(
                        "{partitions} partitions is outside 1..=1048576"
                    ));
                }
                let Some(assignment) = self.assign(partitions, replication_factor, &nodes) else {
                    return MetaAnswer::Rejected(format!(
                        "replication factor {replication_factor} needs that many nodes; {} known",
                        nodes.len()
                    ));
                };
                self.next_topic_id = self.next_topic_id.max(1);
                let topic = Topic {
                    id: self.next_topic_id,
                    name: name.clone(),
                    replication_factor,
                    partitions: assignment,
                    config,
                };
                self.next_topic_id += 1;
                self.topics.insert(name, topic.clone());
                MetaAnswer::Created(topic)
            }
            MetaCommand::DeleteTopic { name } => {
                if let Some(queue) = self
                    .queues
                    .values()
                    .find(|queue| queue.config.dead_letter_topic == name && queue.topic != name)
                {
                    return MetaAnswer::Rejected(format!(
                        "topic {name:?} is the dead-letter topic of queue {:?}; delete the queue first",
                        queue.name
                    ));
                }
                self.delete_topic(&name)
            }
            MetaCommand::CreateQueue {
                name,
                topic,
                config,
                queues_max,
            } => {
                if self.queues.contains_key(&name) {
                    return MetaAnswer::AlreadyExists;
                }
                let Some(topic) = self.topics.get(&topic) else {
                    return MetaAnswer::NotFound;
                };
                if !self.topics.contains_key(&config.dead_letter_topic) {
                    return MetaAnswer::Rejected(format!(
                        "dead-letter topic {:?} does not exist",
                        config.dead_letter_topic
                    ));
                }
                if self.queues.len() >= queues_max as usize {
                    return MetaAnswer::TooManyQueues { max: queues_max };
                }
                self.next_topic_id = self.next_topic_id.max(1);
                let queue = Queue {
                    id: self.next_topic_id,
                    name: name.clone(),
                    topic: topic.name.clone(),
                    topic_id: topic.id,
                    partitions: topic.partitions.clone(),
                    config,
                };
                self.next_topic_id += 1;
                self.queues.insert(name, queue.clone());
                MetaAnswer::QueueCreated(queue)
            }
            MetaCommand::DeleteQueue { name } => match self.queues.remove(&name) {
                Some(_) => {
                    self.forget_moves_of_deleted_groups();
                    MetaAnswer::Deleted
                }
                None => MetaAnswer::NotFound,
            },
            MetaCommand::AddPartitions {
                name,
                partitions,
                nodes,
            } => {
                let Some(topic) = self.topics.get(&name) else {
                    return MetaAnswer::NotFound;
                };
                let current = topic.partitions.len() as u32;
                if partitions < current {
                    return MetaAnswer::Rejected(format!(
                        "topic {name} has {current} partitions; a partition count never goes down"
                    ));
                }
                if let Some(queue) = self.queues.values().find(|queue| queue.topic == name) {
                    return MetaAnswer::Rejected(format!(
                        "queue {} reads topic {name} partition by partition; delete the queue \
                         before adding partitions",
                        queue.name
                    ));
                }
                let replication_factor = topic.partitions.first().map_or(1, Vec::len) as u32;
                let Some(added) = self.assign(partitions - current, replication_factor, &nodes)
                else {
                    return MetaAnswer::Rejected(format!(
                        "replication factor {replication_factor} is above the {} nodes to place \
                         replicas on",
                        nodes.len()
                    ));
                };
                let topic = self.topics.get_mut(&name).expect("looked up above");
                topic.partitions.extend(added);
                MetaAnswer::Altered(topic.clone())
            }
            MetaCommand::RegisterNode {
                id,
                address,
                member,
            } => self.register_node(id, address, member),
            MetaCommand::DrainNode { id } => self.drain_node(id),
            MetaCommand::RemoveNode { id } => self.remove_node(id),
            MetaCommand::Reassign { moves } => self.reassign(moves),
            MetaCommand::FinishMove { group, replicas } => self.finish_move(group, replicas),
            MetaCommand::Rebalance {} => self.rebalance(),
            MetaCommand::AlterTopicConfig { name, set, remove } => {
                let Some(topic) = self.topics.get_mut(&name) else {
                    return MetaAnswer::NotFound;
                };
                for key in remove {
                    topic.config.remove(&key);
                }
                topic.config.extend(set);
                MetaAnswer::Altered(topic.clone())
            }
            MetaCommand::InitProducer {
                name,
                token,
                at_ms,
                names_max,
            } => self.producers.init(index, name, token, at_ms, names_max),
            MetaCommand::CreateCoordinators {
                shards,
                replication_factor,
                nodes,
            } => {
                if self.coordinators.is_some() {
                    return MetaAnswer::AlreadyExists;
                }
                if shards == 0 || shards > (1 << PARTITION_BITS) {
                    return MetaAnswer::Rejected(format!("{shards} shards is outside 1..=1048576"));
                }
                let Some(assignment) = self.assign(shards, replication_factor, &nodes) else {
                    return MetaAnswer::Rejected(format!(
                        "replication factor {replication_factor} needs that many nodes; {} known",
                        nodes.len()
                    ));
                };
                self.next_topic_id = self.next_topic_id.max(1);
                let coordinators = Topic {
                    id: self.next_topic_id,
                    name: COORDINATORS_NAME.to_owned(),
                    replication_factor,
                    partitions: assignment,
                    config: BTreeMap::new(),
                };
                self.next_topic_id += 1;
                self.coordinators = Some(coordinators.clone());
                MetaAnswer::Created(coordinators)
            }
        }
    }

    /// Deletes a topic and the queues over it.
    fn delete_topic(&mut self, name: &str) -> MetaAnswer {
        match self.topics.remove(name) {
            Some(topic) => {
                // A queue cannot outlive its log.
                self.queues.retain(|_, queue| queue.topic_id != topic.id);
                self.forget_moves_of_deleted_groups();
                MetaAnswer::Deleted
            }
            None => MetaAnswer::NotFound,
        }
    }

    /// Replica assignment: for each partition, `replication_factor` distinct nodes, choosing the
    /// preferred leader (first replica) as the node that currently prefers the fewest
    /// partitions, then followers by fewest replicas, ties by node id. Spreads leaders and data
    /// evenly across the cluster, including over many topics.
    fn assign(
        &self,
        partitions: u32,
        replication_factor: u32,
        nodes: &[NodeId],
    ) -> Option<Vec<Vec<NodeId>>> {
        let mut nodes: Vec<NodeId> = nodes.to_vec();
        nodes.retain(|node| self.placeable(*node));
        nodes.sort_unstable();
        nodes.dedup();
        if replication_factor == 0 || replication_factor as usize > nodes.len() {
            return None;
        }
        let mut leaders: BTreeMap<NodeId, u64> = nodes.iter().map(|node| (*node, 0)).collect();
        let mut replicas: BTreeMap<NodeId, u64> = leaders.clone();
        for topic in self.topics.values() {
            for partition in &topic.partitions {
                for (position, node) in partition.iter().enumerate() {
                    if position == 0 {
                        if let Some(count) = leaders.get_mut(node) {
                            *count += 1;
                        }
                    }
                    if let Some(count) = replicas.get_mut(node) {
                        *count += 1;
                    }
                }
            }
        }
        let mut assignment = Vec::with_capacity(partitions as usize);
        for _ in 0..partitions {
            let leader = *nodes
                .iter()
                .min_by_key(|node| (leaders[*node], replicas[*node], **node))
                .expect("nodes is not empty");
            let mut chosen = vec![leader];
            let mut followers: Vec<NodeId> = nodes
                .iter()
                .copied()
                .filter(|node| *node != leader)
                .collect();
            followers.sort_by_key(|node| (replicas[node], *node));
            chosen.extend(followers.into_iter().take(replication_factor as usize - 1));
            *leaders.get_mut(&leader).expect("leader is a node") += 1;
            for node in &chosen {
                *replicas.get_mut(node).expect("replica is a node") += 1;
            }
            assignment.push(chosen);
        }
        Some(assignment)
    }
}

impl ProducerRegistry {
    /// Applies `InitProducer`. A known name keeps its id and gets the next epoch; a new name past
    /// `names_max` evicts the name initialized longest ago, and is refused when every name was
    /// initialized in the last day (a name evicted and initialized again gets a new id, so its
    /// old instances are no longer fenced: the limit should be far above the live names).
    fn init(
        &mut self,
        index: u64,
        name: Option<String>,
        token: u64,
        at_ms: u64,
        names_max: u32,
    ) -> MetaAnswer {
        const EVICTABLE_AFTER_MS: u64 = 24 * 3600 * 1000;
        self.next_id = self.next_id.max(1);
        let Some(name) = name else {
            let id = self.next_id;
            self.next_id += 1;
            return MetaAnswer::Producer {
                id,
                epoch: 0,
                index,
            };
        };
        if let Some(named) = self.named.get_mut(&name) {
            if let Some((_, epoch)) = named
                .tokens
                .iter()
                .find(|(seen, _)| token != 0 && *seen == token)
            {
                return MetaAnswer::Producer {
                    id: named.id,
                    epoch: *epoch,
                    index,
                };
            }
            let Some(epoch) = named.epoch.checked_add(1) else {
                return MetaAnswer::Rejected(format!(
                    "producer {name:?} used every epoch; use another name"
                ));
            };
            named.epoch = epoch;
            named.initialized_ms = named.initialized_ms.max(at_ms);
            if token != 0 {
                if named.tokens.len() == INIT_TOKENS_KEPT {
                    named.tokens.remove(0);
                }
                named.tokens.push((token, epoch));
            }
            self.epochs.insert(named.id, epoch);
            return MetaAnswer::Producer {
                id: named.id,
                epoch,
                index,
            };
        }
        if self.named.len() >= names_max as usize {
            let oldest = self
                .named
                .iter()
                .min_by_key(|(name, named)| (named.initialized_ms, (*name).clone()))
                .map(|(name, named)| (name.clone(), named.id, named.initialized_ms));
            match oldest {
                Some((old, id, initialized_ms))
                    if initialized_ms.saturating_add(EVICTABLE_AFTER_MS) < at_ms =>
                {
                    self.named.remove(&old);
                    self.epochs.remove(&id);
                }
                _ => return MetaAnswer::TooManyProducerNames { max: names_max },
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.named.insert(
            name,
            NamedProducer {
                id,
                epoch: 0,
                initialized_ms: at_ms,
                tokens: if token == 0 {
                    Vec::new()
                } else {
                    vec![(token, 0)]
                },
            },
        );
        MetaAnswer::Producer {
            id,
            epoch: 0,
            index,
        }
    }
}

/// The metadata state machine the Raft layer drives; publishes each new state on a watch.
pub(crate) struct MetaMachine {
    state: MetaState,
    published: watch::Sender<Arc<MetaState>>,
}

impl MetaMachine {
    pub(crate) fn new(published: watch::Sender<Arc<MetaState>>) -> Self {
        Self {
            state: MetaState::default(),
            published,
        }
    }
}

impl ordo_raft::MetaApply for MetaMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let answer = match postcard::from_bytes::<MetaCommand>(command) {
            Ok(command) => self.state.apply(index, command),
            Err(error) => MetaAnswer::Rejected(format!("undecodable metadata command: {error}")),
        };
        postcard::to_stdvec(&answer).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.state).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ordo_raft::MetaRestoreError> {
        self.state = MetaState::decode(snapshot)
            .map_err(|error| ordo_raft::MetaRestoreError::Undecodable(error.into()))?;
        Ok(())
    }

    fn publish(&self) {
        if **self.published.borrow() != self.state {
            self.published.send_replace(Arc::new(self.state.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, partitions: u32, replication_factor: u32) -> MetaCommand {
        MetaCommand::CreateTopic {
            name: name.into(),
            partitions,
            replication_factor,
            config: BTreeMap::new(),
            nodes: vec![1, 2, 3],
        }
    }

    /// Partitions are added, never removed: the old ones keep their replicas, the new ones are
    /// placed evenly with the topic's replication factor; fewer partitions, a missing topic or
    /// a queue reading the topic are refused and change nothing.
    #[test]
    fn partitions_are_added_never_removed() {
        let mut state = MetaState::default();
        let MetaAnswer::Created(before) = state.apply(1, create("a", 3, 3)) else {
            panic!("created");
        };
        let add = |name: &str, partitions| MetaCommand::AddPartitions {
            name: name.into(),
            partitions,
            nodes: vec![1, 2, 3],
        };
        let MetaAnswer::Altered(after) = state.apply(2, add("a", 6)) else {
            panic!("added");
        };
        assert_eq!(after.partitions.len(), 6);
        assert_eq!(after.partitions[..3], before.partitions[..]);
        let mut leaders = BTreeMap::new();
        for replicas in &after.partitions {
            let mut distinct = replicas.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3);
            *leaders.entry(replicas[0]).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().collect::<Vec<_>>(), vec![&2, &2, &2]);
        assert!(
            matches!(state.apply(3, add("a", 6)), MetaAnswer::Altered(ref same) if *same == after)
        );
        assert!(matches!(
            state.apply(4, add("a", 2)),
            MetaAnswer::Rejected(_)
        ));
        assert!(matches!(
            state.apply(5, add("missing", 9)),
            MetaAnswer::NotFound
        ));
        let queue = MetaCommand::CreateQueue {
            name: "q".into(),
            topic: "a".into(),
            config: QueueConfig {
                visibility_timeout_ms: 1000,
                max_deliveries: 3,
                key_ordered: false,
                delay_ms: 0,
                in_flight_max: 10,
                dead_letter_topic: "dead".into(),
            },
            queues_max: 10,
        };
        assert!(matches!(
            state.apply(6, create("dead", 1, 3)),
            MetaAnswer::Created(_)
        ));
        assert!(matches!(state.apply(7, queue), MetaAnswer::QueueCreated(_)));
        assert!(
            matches!(state.apply(8, add("a", 8)), MetaAnswer::Rejected(reason) if reason.contains("queue q"))
        );
        assert_eq!(state.topics["a"].partitions.len(), 6);
    }

    /// Leaders and replicas spread evenly; replicas of a partition are distinct.
    #[test]
    fn assignment_is_balanced() {
        let mut state = MetaState::default();
        let MetaAnswer::Created(topic) = state.apply(1, create("a", 6, 3)) else {
            panic!("created");
        };
        let mut leaders = BTreeMap::new();
        for replicas in &topic.partitions {
            let mut distinct = replicas.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3);
            *leaders.entry(replicas[0]).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        // A second topic keeps the balance across topics.
        let MetaAnswer::Created(second) = state.apply(2, create("b", 1, 1)) else {
            panic!("created");
        };
        assert_eq!(second.partitions.len(), 1);
        assert_eq!(second.id, topic.id + 1);
    }

    /// Duplicate names, deleting unknown topics and impossible replication factors are refused;
    /// a re-created topic gets a new id.
    #[test]
    fn commands_are_checked() {
        let mut state = MetaState::default();
        assert!(matches!(
            state.apply(1, create("a", 1, 3)),
            MetaAnswer::Created(_)
        ));
        assert_eq!(state.apply(2, create("a", 1, 3)), MetaAnswer::AlreadyExists);
        assert!(matches!(
            state.apply(3, create("b", 1, 4)),
            MetaAnswer::Rejected(_)
        ));
        for partitions in [0, u32::MAX] {
            let answer = state.apply(3, create("z", partitions, 1));
            assert!(matches!(answer, MetaAnswer::Rejected(_)), "{partitions}");
        }
        assert_eq!(
            state.apply(4, MetaCommand::DeleteTopic { name: "x".into() }),
            MetaAnswer::NotFound
        );
        let first_id = state.topics["a"].id;
        assert_eq!(
            state.apply(5, MetaCommand::DeleteTopic { name: "a".into() }),
            MetaAnswer::Deleted
        );
        let MetaAnswer::Created(again) = state.apply(6, create("a", 1, 3)) else {
            panic!("created");
        };
        assert_ne!(again.id, first_id);
        assert_ne!(again.group(0), group_of(first_id, 0));
    }

    fn init(name: Option<&str>, at_ms: u64) -> MetaCommand {
        MetaCommand::InitProducer {
            name: name.map(str::to_owned),
            token: 0,
            at_ms,
            names_max: 2,
        }
    }

    /// A named InitProducer applied again with the same token (a retry, or a late copy of the
    /// first attempt) gets the epoch it got the first time and raises nothing; another token
    /// raises the epoch.
    #[test]
    fn a_repeated_init_token_raises_the_epoch_once() {
        let mut state = MetaState::default();
        let with = |token| MetaCommand::InitProducer {
            name: Some("svc".into()),
            token,
            at_ms: 0,
            names_max: 10,
        };
        let epoch = |answer| match answer {
            MetaAnswer::Producer { epoch, .. } => epoch,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(epoch(state.apply(1, with(11))), 0);
        assert_eq!(epoch(state.apply(2, with(22))), 1);
        assert_eq!(epoch(state.apply(3, with(22))), 1, "a retry of token 22");
        assert_eq!(epoch(state.apply(4, with(33))), 2);
        assert_eq!(
            epoch(state.apply(5, with(22))),
            1,
            "a late copy of token 22"
        );
        assert_eq!(state.producers.named["svc"].epoch, 2);
        assert_eq!(epoch(state.apply(6, with(0))), 3, "no token: always raised");
    }

    /// Unnamed producers get new ids, never reused; a name keeps its id and bumps its epoch,
    /// which fences the older epochs; ids and epochs never allocated are unknown; past the
    /// names limit the oldest name is evicted only when it is more than a day old, and its epoch
    /// is then unknown.
    #[test]
    fn producer_ids_and_epochs() {
        let mut state = MetaState::default();
        let producer = |id, epoch, index| MetaAnswer::Producer { id, epoch, index };
        assert_eq!(state.apply(1, init(None, 0)), producer(1, 0, 1));
        assert_eq!(state.apply(2, init(Some("a"), 0)), producer(2, 0, 2));
        assert_eq!(state.apply(3, init(Some("a"), 5)), producer(2, 1, 3));
        let registry = &state.producers;
        assert_eq!(registry.check(1, 0), ProducerCheck::Current);
        assert_eq!(registry.check(2, 1), ProducerCheck::Current);
        assert_eq!(
            registry.check(2, 0),
            ProducerCheck::Fenced { current_epoch: 1 }
        );
        assert_eq!(registry.check(2, 2), ProducerCheck::Unknown);
        assert_eq!(registry.check(3, 0), ProducerCheck::Unknown);
        assert_eq!(registry.check(0, 0), ProducerCheck::Unknown);
        assert_eq!(state.apply(4, init(Some("b"), 10)), producer(3, 0, 4));
        assert_eq!(
            state.apply(5, init(Some("c"), 20)),
            MetaAnswer::TooManyProducerNames { max: 2 }
        );
        let day = 24 * 3600 * 1000;
        assert_eq!(
            state.apply(6, init(Some("c"), day + 6)),
            producer(4, 0, 6),
            "\"a\" (initialized at 5) is evicted"
        );
        assert!(!state.producers.named.contains_key("a"));
        // The evicted name's epoch is forgotten: its instance is refused as unknown and must
        // initialize again (under a new id).
        assert_eq!(state.producers.check(2, 1), ProducerCheck::Unknown);
    }

    /// A state persisted before the producer registry existed still restores.
    #[test]
    fn a_state_from_before_producers_restores() {
        #[derive(Serialize)]
        struct Old {
            topics: BTreeMap<String, Topic>,
            next_topic_id: u64,
            applied_index: u64,
        }
        let mut state = MetaState::default();
        state.apply(1, create("a", 2, 1));
        let old = postcard::to_stdvec(&Old {
            topics: state.topics.clone(),
            next_topic_id: state.next_topic_id,
            applied_index: state.applied_index,
        })
        .unwrap();
        assert_eq!(MetaState::decode(&old).unwrap(), state);
        let new = postcard::to_stdvec(&state).unwrap();
        assert_eq!(MetaState::decode(&new).unwrap(), state);
    }

    /// Applying the same commands gives the same state (determinism).
    #[test]
    fn apply_is_deterministic() {
        let commands = vec![
            create("a", 3, 3),
            create("b", 5, 2),
            MetaCommand::DeleteTopic { name: "a".into() },
            create("c", 2, 1),
        ];
        let run = || {
            let mut state = MetaState::default();
            for (index, command) in commands.iter().enumerate() {
                state.apply(index as u64 + 1, command.clone());
            }
            state
        };
        assert_eq!(run(), run());
    }
}
