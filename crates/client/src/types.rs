//! Domain types of the public client API: what callers build and receive.
//!
//! These are plain data, independent of the wire structs in `ordo-proto` (the conversions live
//! in `convert.rs`, and nothing here may reference a proto type), except the record types, which
//! the client shares with the broker through `ordo_proto::record`. All of them serialize with
//! serde for machine-readable output; byte fields serialize as a JSON string when they are valid
//! UTF-8 and as `{"hex": "..."}` otherwise, so no byte is lost or silently replaced.

use std::collections::BTreeMap;

use serde::Serialize;

/// A record to produce, and a committed record read back: shared with the broker, defined (with
/// their serde form and their conversion to and from the wire) in `ordo_proto::record`.
pub use ordo_proto::record::Record;
pub use ordo_proto::record::StoredRecord;

/// Where one produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordAck {
    /// The partition the record was appended to.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
}

/// The answer to one fetch, or one message of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchResult {
    /// The partition read.
    pub partition: u32,
    /// Committed records in offset order; may be empty.
    pub records: Vec<StoredRecord>,
    /// The offset after the last committed record of the partition.
    pub high_watermark: u64,
    /// The first offset still in the log.
    pub log_start_offset: u64,
}

impl FetchResult {
    /// The offset to read next: after the last record returned, or `None` when none was.
    pub fn next_offset(&self) -> Option<u64> {
        self.records
            .last()
            .map(|record| record.offset.saturating_add(1))
    }
}

/// Where a subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// At the first offset still in the log.
    Beginning,
    /// At the high watermark when the subscription starts: only new records.
    End,
    /// At this offset.
    Offset(u64),
}

/// One line of a topic listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSummary {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: u32,
}

/// A topic and the state of each of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Topic configuration entries (`timestamp.type`, retention and compaction keys).
    pub config: BTreeMap<String, String>,
    /// Partitions, in partition order.
    pub partitions: Vec<PartitionDescription>,
}

/// The state of one partition as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// Node id of the current leader, when one is known.
    pub leader: Option<u64>,
    /// Node ids holding a replica.
    pub replicas: Vec<u64>,
    /// The offset after the last committed record.
    pub high_watermark: u64,
    /// The first offset still in the log (retention moves it forward).
    pub log_start_offset: u64,
    /// About the bytes of records the partition holds, as its leader reports them.
    pub bytes: u64,
    /// The partition's raft term.
    pub term: u64,
    /// Per-replica replication progress, when the leader reports it.
    pub replica_status: Vec<ReplicaStatus>,
}

/// How far one replica is behind its leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// The replica's node id.
    pub node_id: u64,
    /// Log entries behind the leader's log, when the leader knows it.
    pub lag: Option<u64>,
}

/// The cluster as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// Node id of the node that answered.
    pub answered_by: u64,
    /// Node id of the metadata leader, when one is known.
    pub metadata_leader: Option<u64>,
    /// Term of the metadata raft group.
    pub metadata_term: u64,
    /// Every node of the cluster.
    pub nodes: Vec<NodeStatus>,
    /// Number of topics.
    pub topics: u32,
    /// Number of partitions over all topics.
    pub partitions: u32,
    /// Replica moves in progress.
    pub moves: Vec<ReplicaMove>,
}

/// One group's replicas moving (a reassignment, a drain or a rebalance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaMove {
    /// The topic, `queue NAME`, or `__groups` for a consumer group coordinator shard.
    pub owner: String,
    /// The partition (or shard).
    pub partition: u32,
    /// Its replicas now.
    pub from: Vec<u64>,
    /// Its replicas once moved; the first is the preferred leader.
    pub to: Vec<u64>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: u64,
    /// The node's advertised gRPC address.
    pub address: String,
    /// Whether the answering node could reach it.
    pub reachable: bool,
    /// Partitions this node leads.
    pub leader_count: u32,
    /// Partitions this node holds a replica of.
    pub replica_count: u32,
    /// `ACTIVE`, `DRAINING` (its replicas are moving away), or `UNREGISTERED`.
    pub state: String,
    /// `VOTER` or `LEARNER` of the metadata group; empty when neither.
    pub metadata_role: String,
}
