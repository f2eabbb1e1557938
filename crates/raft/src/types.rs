//! The openraft type configuration and the payload of an Ordo log entry.

use std::io::Cursor;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

/// What a log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A batch of `count` records, encoded by the broker. The partition state machine assigns it
    /// offsets `next .. next + count`; the bytes are stored once, in the Raft log entry itself.
    Append {
        /// Records in the batch.
        count: u32,
        /// The encoded batch, opaque to this crate.
        batch: Bytes,
    },
    /// A metadata command, encoded by the broker and applied through [`crate::MetaApply`].
    Meta(Bytes),
    /// Several batches proposed together (concurrent appends to one partition coalesced into one
    /// entry, see `coalesce`): they get consecutive offsets, in order.
    Appends(Vec<AppendBatch>),
}

/// One batch of an [`Command::Appends`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    /// Records in the batch.
    pub count: u32,
    /// The encoded batch, opaque to this crate.
    pub batch: Bytes,
}

impl Command {
    /// The record batches this entry carries, in offset order, as `(count, batch)`.
    pub fn batches(&self) -> Vec<(u32, &Bytes)> {
        match self {
            Command::Append { count, batch } => vec![(*count, batch)],
            Command::Appends(batches) => batches
                .iter()
                .map(|part| (part.count, &part.batch))
                .collect(),
            Command::Meta(_) => Vec::new(),
        }
    }

    /// Records in the entry (0 for metadata).
    pub fn record_count(&self) -> u64 {
        self.batches()
            .iter()
            .map(|(count, _)| u64::from(*count))
            .sum()
    }

    /// Bytes of payload the entry carries.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::Meta(command) => command.len(),
            _ => self.batches().iter().map(|(_, batch)| batch.len()).sum(),
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
            Command::Appends(batches) => write!(
                f,
                "appends({} batches, {} records, {} bytes)",
                batches.len(),
                self.record_count(),
                self.payload_bytes()
            ),
        }
    }
}

/// What applying an entry returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The batch's first offset.
    Appended {
        /// Offset of the first record of the batch.
        base_offset: u64,
    },
    /// The metadata state machine's answer, encoded by the broker.
    Meta(Bytes),
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
