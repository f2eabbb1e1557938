//! Ordo's broker: topics, partitions, the cluster metadata state, and the produce and fetch
//! logic on top of the Raft groups.
//!
//! # Layout
//! - `error`: [`BrokerError`], every failure a caller can act on.
//! - `limits`: [`Limits`], every bound on requests, with documented defaults.
//! - `names`: topic name rules.
//! - `records`: domain record types and the batch encoding stored in the log.
//! - `partitioner`: which partition a record goes to.
//! - `metadata`: the replicated metadata state (topics, replica assignment) and its commands.
//!   Pure and deterministic; unit-tested without a runtime.
//! - `broker`: [`Broker`], which routes produce and fetch to partition leaders, forwards across
//!   nodes, and keeps this node's Raft groups in line with the metadata (reconcile, leader
//!   balance).
//!
//! # What this crate must never do
//! It never names openraft or RocksDB types (it talks to `ordo-raft`), never serves a record
//! above the high watermark, and never reports a produce as acked unless the partition's Raft
//! group committed it.

mod broker;
mod error;
mod limits;
mod metadata;
mod names;
mod partitioner;
mod records;

pub use broker::Broker;
pub use broker::BrokerOptions;
pub use broker::ClusterView;
pub use broker::FORWARDED_HEADER;
pub use broker::FetchOutcome;
pub use broker::ForwardResult;
pub use broker::NodeView;
pub use broker::PartitionView;
pub use broker::TopicView;
pub use error::BrokerError;
pub use limits::Limits;
pub use metadata::MetaState;
pub use metadata::Topic;
pub use records::Record;
pub use records::StoredRecord;

/// A node's id.
pub type NodeId = u64;
