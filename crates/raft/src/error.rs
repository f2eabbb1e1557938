//! The errors of this crate's public API, each a `thiserror` enum whose variants a caller can act
//! on. A leaf module: it depends on nothing else in the crate, so every module can name them.
//!
//! Nothing of openraft appears here: its errors become a `reason` string at the edge.

use std::io;

use crate::GroupId;
use crate::NodeId;
use crate::producers::Refusal;

/// Why a write did not return an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// This node does not lead the group; nothing was proposed. Safe to retry elsewhere.
    #[error("not the leader of group {group}; leader is {leader:?}")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The leader changed while the entry was in flight; the entry may still commit through the
    /// new leader. A retry may duplicate it.
    #[error("leader of group {group} changed to {leader:?} while the entry was in flight")]
    Discarded {
        /// The group.
        group: GroupId,
        /// The new leader, if known.
        leader: Option<NodeId>,
    },
    /// The entry was proposed but not committed before the deadline: it may still commit.
    /// Retrying may duplicate it.
    #[error("outcome unknown for group {group}: {reason}")]
    OutcomeUnknown {
        /// The group.
        group: GroupId,
        /// What happened.
        reason: String,
    },
    /// This node hosts no such group.
    #[error("group {0} is not hosted on this node")]
    GroupNotFound(GroupId),
    /// The group stopped (shutdown or storage failure); nothing more is accepted.
    #[error("group {group} stopped: {reason}")]
    Stopped {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// The entry committed, and the partition's producer state refused the batch: nothing of it
    /// was written. Final for this stamp.
    #[error("group {group} refused the producer's batch: {refusal:?}")]
    Refused {
        /// The group.
        group: GroupId,
        /// Why.
        refusal: Refusal,
    },
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// This node hosts no such group.
    #[error("group {0} is not hosted on this node")]
    GroupNotFound(GroupId),
    /// The storage failed or returned a value that failed its checksum.
    #[error("storage: {0}")]
    Storage(#[from] ordo_storage::StorageError),
    /// A stored entry could not be decoded.
    #[error("undecodable entry in group {group}: {reason}")]
    Decode {
        /// The group.
        group: GroupId,
        /// The decoder's message.
        reason: String,
    },
    /// The offset is below the partition's log start: retention deleted it.
    #[error("offset {offset} of group {group} is below the log start {start}")]
    BelowStart {
        /// The group.
        group: GroupId,
        /// The offset asked for.
        offset: u64,
        /// The first offset the partition holds.
        start: u64,
    },
    /// The blocking task that reads the store ended without an answer (it panicked, or the
    /// runtime is shutting down).
    #[error("read of group {group} did not finish: {reason}")]
    Task {
        /// The group.
        group: GroupId,
        /// What the runtime said.
        reason: String,
    },
}

/// Why a group could not be started, removed or made to hand over its leadership.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// This node hosts no such group.
    #[error("group {0} is not hosted on this node")]
    NotFound(GroupId),
    /// The metadata group is already running on this node.
    #[error("metadata group started twice")]
    MetaStartedTwice,
    /// The group's stored state (its vote, its state machine's applied state) could not be read
    /// or rewritten at start: the group is not running. A storage failure, or bytes on disk
    /// that do not decode.
    #[error("opening group {group}: {source}")]
    Open {
        /// The group.
        group: GroupId,
        /// What failed.
        source: io::Error,
    },
    /// Deleting the group's data failed; the group is stopped but some of its data remains.
    #[error("deleting group {group}: {source}")]
    Storage {
        /// The group.
        group: GroupId,
        /// What failed.
        source: ordo_storage::StorageError,
    },
    /// The group stopped (shutdown or a fatal storage failure); nothing more is accepted.
    #[error("group {group} stopped: {reason}")]
    Stopped {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// A membership change was not made: this node does not lead the group, another change is
    /// in progress, or a new voter is not a learner yet. Nothing changed; it may be retried.
    #[error("membership of group {group} not changed: {reason}")]
    Membership {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

/// Raft options that cannot work together (e.g. an election timeout not above the heartbeat
/// interval); nothing was started.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid raft options: {reason}")]
pub struct InvalidOptions {
    /// What is inconsistent.
    pub reason: String,
}

/// Why [`crate::MetaApply::restore`] could not take a persisted or received state. The metadata
/// group then does not start (restore at open) or stops (a snapshot from the leader).
#[derive(Debug, thiserror::Error)]
pub enum MetaRestoreError {
    /// The snapshot bytes do not decode as the broker's metadata state.
    #[error("undecodable metadata snapshot: {0}")]
    Undecodable(#[source] Box<dyn std::error::Error + Send + Sync>),
}
