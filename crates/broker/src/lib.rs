//! Ordo's broker: topics, partitions, the cluster metadata state, and the produce and fetch
//! logic on top of the Raft groups.
//!
//! # Layout
//! Each capability has a room of its own: pure state and decisions (no I/O, unit-tested without
//! a runtime) beside a thin async service that does the I/O.
//!
//! Pure:
//! - `error`: [`BrokerError`], every failure a caller can act on.
//! - `limits`: [`Limits`], every bound on requests, with documented defaults.
//! - `names`: topic name rules.
//! - `records`: the batch encoding stored in the log (record types from `ordo_proto::record`).
//! - `group_state`: consumer groups, the pure state of one group (membership, sticky balanced
//!   target assignment, incremental handoff, fencing, committed offsets).
//! - `queue_state`: queues on the log, one queue over one partition (leases, receipts, acks,
//!   redelivery, delays, key order, dead-lettering in two steps), applied through the queue
//!   partition's own state group, one row per unfinished message.
//! - `coordinator_state`: a coordinator shard's groups, applied through the shard's Raft group
//!   (`ordo_raft::StateApply`), one row per group.
//! - `producer`: idempotent producers: InitProducer and the registry check of every stamped produce.
//! - `metadata`: the replicated metadata state (topics, replica assignment) and its commands,
//!   applied through the metadata Raft group.
//! - `nodes`: the node table and replica moves of the metadata state (join, drain, reassign,
//!   rebalance plans).
//! - `route`: the decisions of the retry loops (where a batch goes next; whether a call that ran
//!   out of time may say "nothing written").
//! - `rpc`: the contract of each internal call between nodes, used by both ends (this crate's
//!   `peer` and `ordo-server`'s services): answers, failure classification by reason, headers.
//!
//! Services (`impl Broker` blocks):
//! - `broker`: [`Broker`] itself, its start and the state every service shares.
//! - `produce`: append through the partition's leader, here or forwarded.
//! - `fetch`: read committed records, locally or from the leader.
//! - `time`: OffsetsForTime through each replica's time index.
//! - `admin`: topics, and metadata commands run on the metadata leader.
//! - `cluster`: status views merged from every node's report.
//! - `coordinator`: consumer group calls, run on the leader of the group's coordinator shard
//!   (here or forwarded); session expiry on the leader.
//! - `queue`: queue calls, run on the leader of each queue partition's state group (beside the
//!   topic's partition, on its replicas): receive streams with flow control, settles, the lease
//!   expiry and dead-letter loop.
//! - `background`: reconcile this node's groups with the metadata; leader balance.
//! - `membership`: forming or joining the cluster, the metadata group's voters, and driving
//!   replica moves on each group's leader.
//! - `peer`: [`Peer`](peer::Peer), the only code that calls other nodes over gRPC.
//!
//! The modules the next capabilities add (producer state, groups, queues, retention) follow the
//! same pattern: a pure state module applied through Raft, plus a thin async service module.
//!
//! # What this crate must never do
//! It never names openraft or RocksDB types (it talks to `ordo-raft`), never serves a record
//! above the high watermark, and never reports a produce as acked unless the partition's Raft
//! group committed it.

mod admin;
mod background;
mod broker;
mod cluster;
mod coordinator;
pub mod coordinator_state;
mod error;
mod fetch;
pub mod group_state;
mod limits;
mod membership;
mod metadata;
mod names;
pub mod nodes;
mod peer;
mod produce;
mod producer;
mod queue;
pub mod queue_state;
mod records;
mod retention;
mod route;
pub mod rpc;
mod time;

pub use broker::Broker;
pub use broker::BrokerOptions;
pub use cluster::ClusterView;
pub use cluster::NodeView;
pub use cluster::PartitionView;
pub use cluster::TopicView;
pub use coordinator::Assignment;
pub use coordinator::GroupDescription;
pub use coordinator::GroupMetrics;
pub use coordinator::GroupPartition;
pub use coordinator::GroupSummary;
pub use coordinator::Heartbeat;
pub use coordinator::ResetTarget;
pub use error::BrokerError;
pub use error::GroupRefusal;
pub use error::ProducerRefusal;
pub use fetch::FetchOutcome;
pub use group_state::Committed;
pub use group_state::TopicPartition;
pub use limits::GroupsConfig;
pub use limits::InvalidLimits;
pub use limits::Limits;
pub use limits::QueuesConfig;
pub use membership::MoveView;
pub use metadata::MetaState;
pub use metadata::Queue;
pub use metadata::QueueConfig;
pub use metadata::Topic;
/// An idempotent produce's producer id, epoch and sequence.
pub use ordo_raft::ProducerStamp;
pub use produce::Produced;
pub use queue::DELIVER_AT_HEADER;
pub use queue::QueueDelivery;
pub use queue::QueuePartitionStatus;
pub use queue::ReceiveOptions;
pub use queue::ReceiveStream;
pub use queue::SettleAction;
pub use queue_state::Receipt;
pub use queue_state::Settled;
pub use records::Record;
pub use records::RecordCodec;
pub use records::StoredRecord;
pub use retention::RetentionConfig;
pub use retention::TopicRetention;
pub use time::TimeOffset;

/// A node's id.
pub type NodeId = u64;
