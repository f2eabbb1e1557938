//! [`BrokerError`]: what went wrong, in terms a caller can act on. The server maps each variant
//! to exactly one gRPC status (see `ordo-server`'s `status` module).

use crate::NodeId;

/// Why an idempotent produce was refused (the partition's producer state decided, or the
/// cluster's producer registry did).
pub use ordo_raft::Refusal as ProducerRefusal;

/// What the caller of a refused idempotent produce should do.
fn producer_refusal_message(refusal: &ProducerRefusal) -> String {
    match refusal {
        ProducerRefusal::Fenced { current_epoch } => format!(
            "producer fenced: epoch {current_epoch} of this producer id has taken over; this instance must stop producing"
        ),
        ProducerRefusal::OutOfOrder { expected } => format!(
            "out of order sequence: the partition expects sequence {expected} next from this producer; nothing of this request was written: records before it are missing (resend from sequence {expected}), or it overlaps records written before"
        ),
        ProducerRefusal::UnknownProducer => "unknown producer: the producer id or epoch was never allocated, or the partition forgot the producer after it idled; call InitProducer again and restart sequences at 0".to_owned(),
        ProducerRefusal::SequenceTooOld { expected } => format!(
            "duplicate sequence: these records were written before, in a batch the partition no longer remembers (it expects sequence {expected} next); nothing was written now"
        ),
        ProducerRefusal::TooManyProducers { max } => format!(
            "the partition remembers {max} producers (raft.producers_per_partition_max), none idle long enough to be forgotten; reuse producer sessions or raise the limit"
        ),
    }
}

/// Every failure of a broker operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed.
    #[error("{message}")]
    InvalidArgument {
        /// Stable machine-readable reason, e.g. `INVALID_TOPIC_NAME`.
        reason: &'static str,
        /// What to fix.
        message: String,
    },
    /// A value is over a configured limit.
    #[error("{name} is {actual}, above the limit of {max}; split the request or raise the limit")]
    LimitExceeded {
        /// The limit's name, as in the config.
        name: &'static str,
        /// The limit.
        max: u64,
        /// The value seen.
        actual: u64,
    },
    /// No such topic.
    #[error("topic {0:?} does not exist; create it with CreateTopic (ordo topic create)")]
    TopicNotFound(String),
    /// No such partition in the topic.
    #[error("topic {topic:?} has partitions 0..{partitions}; partition {partition} does not exist")]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the topic has.
        partitions: u32,
    },
    /// The topic already exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// The cluster cannot do this in its present shape.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The offset is outside the partition's log.
    #[error(
        "offset {offset} is outside the log; valid offsets are {start}..={end} (end = next offset to be written)"
    )]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// First offset in the log.
        start: u64,
        /// The high watermark.
        end: u64,
    },
    /// No leader could be reached; nothing was written. Safe to retry.
    #[error("{message}")]
    Unavailable {
        /// What was tried.
        message: String,
        /// The leader last heard of.
        leader: Option<NodeId>,
        /// Its address.
        leader_address: Option<String>,
    },
    /// The records were proposed but not confirmed in time: they may or may not be in the log.
    #[error(
        "{message}; the records may or may not have been written, and a retry may duplicate them"
    )]
    OutcomeUnknown {
        /// What happened.
        message: String,
    },
    /// Too much in flight.
    #[error("{0}")]
    ResourceExhausted(String),
    /// An idempotent produce refused by a producer state (the partition's or the registry's):
    /// nothing was written.
    #[error("{}", producer_refusal_message(.0))]
    ProducerRefused(ProducerRefusal),
    /// InitProducer of a new name while the registry holds `max` names, none old enough to
    /// forget.
    #[error(
        "the cluster remembers {max} producer names (limits.producer_names_max), all initialized within the last day; reuse names or raise the limit"
    )]
    TooManyProducerNames {
        /// The limit.
        max: u32,
    },
    /// A consumer group's coordinator refused the call: nothing changed.
    #[error("{}", group_refusal_message(.0))]
    GroupRefused(GroupRefusal),
    /// No such consumer group.
    #[error("consumer group {0:?} does not exist (it has no members and no committed offsets)")]
    GroupNotFound(String),
    /// A session timeout outside the server's bounds.
    #[error(
        "session timeout {actual} ms is outside {min}..={max} ms (groups.session_timeout_min_ms / max_ms); ask for one inside, or 0 for the default"
    )]
    InvalidSessionTimeout {
        /// Asked for.
        actual: u64,
        /// Shortest allowed.
        min: u64,
        /// Longest allowed.
        max: u64,
    },
    /// No such queue.
    #[error("queue {0:?} does not exist; create it with CreateQueue (ordo queue create)")]
    QueueNotFound(String),
    /// The queue already exists.
    #[error("queue {0:?} already exists")]
    QueueExists(String),
    /// The cluster holds as many queues as it may.
    #[error("the cluster holds {max} queues (queues.queues_max); delete one or raise the limit")]
    TooManyQueues {
        /// The limit.
        max: u32,
    },
    /// No such node in the node table.
    #[error("node {0} is not a node of the cluster (see ordo cluster status)")]
    NodeNotFound(NodeId),
    /// A bug or a storage failure on the server.
    #[error("{0}")]
    Internal(String),
}

/// Why a consumer group's coordinator refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRefusal {
    /// The member's epoch is not its current one.
    FencedMember {
        /// Its current epoch.
        current_epoch: u32,
    },
    /// The group does not know the member.
    UnknownMember,
    /// A member's commit names partitions it was not given: `(topic, partition)`.
    NotAssigned(Vec<(String, u32)>),
    /// A commit would move offsets backward: `(topic, partition, committed offset)`.
    CommitBackward(Vec<(String, u32, u64)>),
    /// The group has members.
    NotEmpty,
    /// The shard holds `max` groups.
    TooManyGroups {
        /// The limit.
        max: u32,
    },
    /// The group has `max` members.
    TooManyMembers {
        /// The limit.
        max: u32,
    },
}

fn group_refusal_message(refusal: &GroupRefusal) -> String {
    match refusal {
        GroupRefusal::FencedMember { current_epoch } => format!(
            "fenced member: the member's current epoch is {current_epoch}; heartbeat with it (or join again with epoch 0 if you were replaced) before committing"
        ),
        GroupRefusal::UnknownMember => "unknown member: the group expired this member, it left, or it never joined; stop processing its partitions and join again (epoch 0)".to_owned(),
        GroupRefusal::NotAssigned(partitions) => format!(
            "partitions not assigned to this member: {}; commit only partitions the last heartbeat gave you",
            partitions
                .iter()
                .map(|(topic, partition)| format!("{topic}/{partition}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        GroupRefusal::CommitBackward(partitions) => format!(
            "commit below the committed offset, nothing committed: {}; commits never go backward (reset the group's offsets while it has no members to move them back)",
            partitions
                .iter()
                .map(|(topic, partition, committed)| format!("{topic}/{partition} is at {committed}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        GroupRefusal::NotEmpty => "the group has members; stop them (or wait for their sessions to time out) and try again".to_owned(),
        GroupRefusal::TooManyGroups { max } => format!(
            "the group's coordinator shard holds {max} groups (groups.groups_per_shard_max); delete unused groups or raise the limit"
        ),
        GroupRefusal::TooManyMembers { max } => format!(
            "the group has {max} members (groups.members_per_group_max)"
        ),
    }
}

impl BrokerError {
    pub(crate) fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        BrokerError::InvalidArgument {
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>, leader: Option<NodeId>) -> Self {
        BrokerError::Unavailable {
            message: message.into(),
            leader,
            leader_address: None,
        }
    }
}
