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
    /// A bug or a storage failure on the server.
    #[error("{0}")]
    Internal(String),
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
