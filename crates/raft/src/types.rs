//! The openraft type configuration and the payload of an Ordo log entry.

use std::io::Cursor;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

use crate::producers::ProducerLimits;
use crate::producers::ProducerStamp;
use crate::producers::Refusal;

/// What a log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A batch of `count` records, encoded by the broker. The partition state machine assigns it
    /// offsets `next .. next + count`; the bytes are stored once, in the Raft log entry itself.
    /// Written before producer stamps existed (now every append is a [`Command::Produce`]);
    /// still applied and read.
    Append {
        /// Records in the batch.
        count: u32,
        /// The encoded batch, opaque to this crate.
        batch: Bytes,
    },
    /// An opaque command, encoded by the broker: in the metadata group applied through
    /// [`crate::MetaApply`], in a state group through [`crate::StateApply`].
    Meta(Bytes),
    /// Several batches proposed together (concurrent appends to one partition coalesced into one
    /// entry, see `coalesce`): they get consecutive offsets, in order. Written before producer
    /// stamps existed; still applied and read.
    Appends(Vec<AppendBatch>),
    /// Batches stamped by their producers, written before batches carried their timestamps
    /// (now every append is a [`Command::ProduceTimed`]); still applied and read.
    Produce(LegacyProduceEntry),
    /// One or more batches proposed together (see `coalesce`), each maybe stamped by its
    /// producer and with its records' largest timestamp (for the time index). The batches the
    /// partition's producer states let through (`producers`) get consecutive offsets, in order;
    /// the others get none.
    ProduceTimed(ProduceEntry),
    /// Moves a partition's log start forward to `start_offset` (never back, never past the end):
    /// records below it are no longer read, and each replica deletes them once it applied this
    /// (retention, see `machine`). Through the log, so every replica trims at the same offset.
    Trim {
        /// The new first offset.
        start_offset: u64,
    },
    /// Compacts a partition by key up to `clean_to` (see `compaction`): the records of the log
    /// entries below it move out of the log, the latest of each key kept. Every replica applies
    /// it at the same log position, with the same clock, so all keep the same records.
    Compact {
        /// The new clean point: compaction stops at the last entry that ends at or below it.
        clean_to: u64,
        /// The proposing leader's clock: when the tombstones cleaned now were cleaned.
        at_ms: i64,
        /// Tombstones cleaned this long before `at_ms` go, with their keys.
        delete_retention_ms: u64,
    },
}

/// The payload of a [`Command::Produce`] entry (the layout before timestamps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyProduceEntry {
    /// The proposing leader's clock.
    pub at_ms: u64,
    /// The proposing leader's bounds on producer states.
    pub limits: ProducerLimits,
    /// The batches, in order.
    pub batches: Vec<LegacyStampedBatch>,
}

/// One batch of a [`LegacyProduceEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyStampedBatch {
    /// Records in the batch.
    pub count: u32,
    /// The encoded batch.
    pub batch: Bytes,
    /// The producer and sequence, for an idempotent produce.
    pub producer: Option<ProducerStamp>,
}

/// One batch of an [`Command::Appends`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    /// Records in the batch.
    pub count: u32,
    /// The encoded batch, opaque to this crate.
    pub batch: Bytes,
}

/// The payload of a [`Command::ProduceTimed`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceEntry {
    /// The proposing leader's clock (milliseconds since the Unix epoch): the time every replica
    /// uses for this entry's producer states.
    pub at_ms: u64,
    /// The proposing leader's bounds on producer states, used by every replica.
    pub limits: ProducerLimits,
    /// The batches, in order.
    pub batches: Vec<StampedBatch>,
}

/// One batch to append, as the broker hands it to [`crate::RaftNode::append`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampedBatch {
    /// Records in the batch.
    pub count: u32,
    /// The encoded batch, opaque to this crate.
    pub batch: Bytes,
    /// The producer and sequence, for an idempotent produce.
    pub producer: Option<ProducerStamp>,
    /// The largest timestamp of its records (milliseconds since the Unix epoch).
    pub max_timestamp_ms: i64,
}

/// One batch of an entry, whatever the entry's variant.
#[derive(Debug, Clone, Copy)]
pub struct BatchRef<'a> {
    /// Records in the batch.
    pub count: u32,
    /// The encoded batch.
    pub batch: &'a Bytes,
    /// Its producer stamp, if any.
    pub producer: Option<ProducerStamp>,
    /// Its records' largest timestamp, when the entry carries it.
    pub max_timestamp_ms: Option<i64>,
}

impl Command {
    /// The record batches this entry carries, in order.
    pub fn batches(&self) -> Vec<BatchRef<'_>> {
        let plain = |count: u32, batch| BatchRef {
            count,
            batch,
            producer: None,
            max_timestamp_ms: None,
        };
        match self {
            Command::Append { count, batch } => vec![plain(*count, batch)],
            Command::Appends(batches) => batches
                .iter()
                .map(|part| plain(part.count, &part.batch))
                .collect(),
            Command::Produce(entry) => entry
                .batches
                .iter()
                .map(|part| BatchRef {
                    count: part.count,
                    batch: &part.batch,
                    producer: part.producer,
                    max_timestamp_ms: None,
                })
                .collect(),
            Command::ProduceTimed(entry) => entry
                .batches
                .iter()
                .map(|part| BatchRef {
                    count: part.count,
                    batch: &part.batch,
                    producer: part.producer,
                    max_timestamp_ms: Some(part.max_timestamp_ms),
                })
                .collect(),
            Command::Meta(_) | Command::Trim { .. } | Command::Compact { .. } => Vec::new(),
        }
    }

    /// Records in the entry (0 for metadata).
    pub fn record_count(&self) -> u64 {
        self.batches()
            .iter()
            .map(|part| u64::from(part.count))
            .sum()
    }

    /// Bytes of payload the entry carries.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::Meta(command) => command.len(),
            _ => self.batches().iter().map(|part| part.batch.len()).sum(),
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append { count, batch } => {
                write!(f, "append({count} records, {} bytes)", batch.len())
            }
            Command::Meta(command) => write!(f, "meta({} bytes)", command.len()),
            Command::Trim { start_offset } => write!(f, "trim(start {start_offset})"),
            Command::Compact { clean_to, .. } => write!(f, "compact(to {clean_to})"),
            Command::Appends(batches) => write!(
                f,
                "appends({} batches, {} records, {} bytes)",
                batches.len(),
                self.record_count(),
                self.payload_bytes()
            ),
            Command::Produce(_) | Command::ProduceTimed(_) => write!(
                f,
                "produce({} batches, {} records, {} bytes)",
                self.batches().len(),
                self.record_count(),
                self.payload_bytes()
            ),
        }
    }
}

/// Where an appended batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// The batch was a producer's retry of one written before: nothing was written now, and
    /// `base_offset` is where the first one is.
    pub duplicate: bool,
}

/// What became of one batch of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// Written now; its first record's offset.
    Written(u64),
    /// Written before (a producer's retry); nothing written now; its first record's offset.
    Duplicate(u64),
    /// Not written: its producer's state refused it.
    Refused(Refusal),
}

/// What applying an entry returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// What became of each batch of the entry, in order.
    Appended(Vec<BatchOutcome>),
    /// The answer to a [`Command::Meta`], encoded by the broker.
    Meta(Bytes),
    /// The log start after a [`Command::Trim`].
    Trimmed(u64),
    /// The clean point after a [`Command::Compact`].
    Compacted(u64),
    /// Entries without an answer (blank, membership).
    None,
}

/// Snapshot bytes, for both state machines.
pub(crate) type SnapshotData = Cursor<Vec<u8>>;

openraft::declare_raft_types!(
    /// Ordo's openraft configuration: u64 node ids, nodes carry their address.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
);

pub(crate) type C = TypeConfig;
pub(crate) type Entry = openraft::alias::EntryOf<C>;
pub(crate) type LogId = openraft::alias::LogIdOf<C>;
pub(crate) type Vote = openraft::alias::VoteOf<C>;
pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<C>;
pub(crate) type SnapshotMeta = openraft::alias::SnapshotMetaOf<C>;
pub(crate) type Snapshot = openraft::alias::SnapshotOf<C, SnapshotData>;
