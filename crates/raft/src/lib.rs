//! Ordo's replication layer: many openraft groups per node over one RocksDB and one connection
//! per peer.
//!
//! # Layout
//! - `error`: the public errors ([`WriteError`], [`ReadError`], [`GroupError`],
//!   [`InvalidOptions`], [`MetaRestoreError`]).
//! - `types`: the openraft type configuration and what a log entry carries ([`Command`]).
//! - `codec`: postcard encoding of openraft messages and entries.
//! - `log_store`: openraft's `RaftLogStorage` over [`ordo_storage::GroupStore`]; the partition's
//!   Raft log is its data log.
//! - `entry_cache`: the recent tail of each group's log in memory, so replication and apply do
//!   not read it back from RocksDB.
//! - `machine`: the state machines: one driver (`Machine`) and its logics,
//!   `PartitionLogic` (assigns dense offsets in commit order and keeps the offset index),
//!   `MetadataLogic` (applies the broker's opaque commands through [`MetaApply`]) and
//!   `StateLogic` (a state group: opaque commands through [`StateApply`], state in rows);
//!   partitions and state groups share one Raft type through `GroupLogic`.
//! - `meta`: [`MetaApply`] and [`StateApply`], the interfaces the broker implements to be
//!   replicated (the metadata, and state groups such as consumer group coordinators).
//! - `producers`: idempotent producers' states per partition and the pure check that writes a
//!   retried batch once ([`ProducerStamp`], [`Refusal`]), run by `PartitionLogic`.
//! - `snapshot`: partition snapshots with their records, streamed in resumable, checksummed
//!   chunks and staged beside the group until installed.
//! - `coalesce`: per-partition coalescing of concurrent appends into one entry, with at most
//!   [`RaftOptions::proposals_in_flight_max`] proposals in flight.
//! - `network`: the peer connection pool ([`Peers`]) and the client side of the internal Raft
//!   RPC.
//! - `watchdog`: node-level failure detection that lets idle partition groups stay silent
//!   (no per-group heartbeats) and starts elections when a leader's node stops answering.
//! - `options`: [`RaftOptions`], timing and batching with their defaults.
//! - `group`: what the node does to one openraft group (propose and wait, dispatch an inbound
//!   RPC, status, reads of committed batches), shared by the metadata and partition groups.
//! - `node`: [`RaftNode`], the registry of every group on this node and the entry point for
//!   writes, reads, inbound RPCs and status.
//! - `conformance` (tests only): openraft's storage test suite run on `LogStore` and `Machine`.
//!
//! # What this crate must never do
//! It is the only crate that names openraft types; nothing openraft leaks through its public API.
//! It never acknowledges a write before openraft reports it committed, which requires a quorum of
//! replicas to have fsynced it (the log store calls openraft's flush callback only after fsync).

mod coalesce;
mod codec;
mod compaction;
mod entry_cache;
mod error;
mod group;
mod log_store;
mod machine;
mod meta;
mod network;
mod node;
mod options;
mod producers;
mod snapshot;
mod throttle;
mod types;
mod watchdog;

pub use compaction::CompactionStatus;
pub use compaction::RecordCodec;
pub use compaction::SplitRecord;
pub use error::GroupError;
pub use error::InvalidOptions;
pub use error::MetaRestoreError;
pub use error::ReadError;
pub use error::WriteError;
pub use group::GroupStatus;
pub use group::ReadBatch;
pub use meta::MetaApply;
pub use meta::StateApply;
pub use network::INTERNAL_MESSAGE_BYTES_MAX;
pub use network::Peers;
pub use node::HandOff;
pub use node::Members;
pub use node::RaftNode;
pub use options::RaftOptions;
pub use producers::ProducerLimits;
pub use producers::ProducerStamp;
pub use producers::Refusal;
pub use producers::WINDOW_BATCHES;
pub use types::AppendBatch;
pub use types::Appended;
pub use types::BatchOutcome;
pub use types::Command;
pub use types::LegacyProduceEntry;
pub use types::LegacyStampedBatch;
pub use types::ProduceEntry;
pub use types::Response;
pub use types::StampedBatch;

/// Identifies one Raft group on a node. Group 0 is the metadata group.
pub use ordo_storage::GroupId;

/// The metadata group's id.
pub const META_GROUP: GroupId = GroupId(0);

/// A node's id in the cluster.
pub type NodeId = u64;

#[cfg(test)]
mod conformance;
