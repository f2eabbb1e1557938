//! The error contract of every Ordo call, shared by the server that builds statuses, the nodes
//! that forward calls to each other, and the Rust client that reads them.
//!
//! Every status an Ordo node sends carries a `google.rpc.ErrorInfo` in domain [`DOMAIN`] with a
//! stable [`reason`]; callers branch on the code and the reason, never on the message text
//! (`docs/errors.md` is the table). A status *without* Ordo's `ErrorInfo` was made by a gRPC
//! layer, most often the caller's own transport: [`never_sent`] tells a connection that was never
//! made (nothing reached the server) from one that broke after sending (outcome unknown for a
//! write).

use std::error::Error as _;

use tonic::Status;
use tonic_types::StatusExt;

/// The `ErrorInfo` domain of every Ordo error.
pub const DOMAIN: &str = "ordo";

/// Response header of an OUT_OF_RANGE fetch answer: the partition's end offset (the same value as
/// the `end_offset` metadata of its `ErrorInfo`).
pub const END_OFFSET_HEADER: &str = "end-offset";

/// Stable `ErrorInfo` reasons.
pub mod reason {
    /// A request field that cannot be accepted, e.g. an empty produce.
    pub const EMPTY_BATCH: &str = "EMPTY_BATCH";
    /// A topic name outside the rules.
    pub const INVALID_TOPIC_NAME: &str = "INVALID_TOPIC_NAME";
    /// A partition count of 0.
    pub const INVALID_PARTITIONS: &str = "INVALID_PARTITIONS";
    /// A replication factor of 0.
    pub const INVALID_REPLICATION_FACTOR: &str = "INVALID_REPLICATION_FACTOR";
    /// A ProduceStream message without its request.
    pub const MISSING_REQUEST: &str = "MISSING_REQUEST";
    /// Bytes that do not decode as the protobuf message the method takes.
    pub const MALFORMED_MESSAGE: &str = "MALFORMED_MESSAGE";
    /// A forwarded batch that does not match its record count or the limits.
    pub const BAD_FORWARDED_BATCH: &str = "BAD_FORWARDED_BATCH";
    /// A Raft message of a kind this node does not know.
    pub const BAD_RAFT_KIND: &str = "BAD_RAFT_KIND";
    /// A value over a configured limit (metadata `limit`, `max`, `actual`).
    pub const LIMIT_EXCEEDED: &str = "LIMIT_EXCEEDED";
    /// No such topic, cluster-wide (metadata `topic`).
    pub const TOPIC_NOT_FOUND: &str = "TOPIC_NOT_FOUND";
    /// No such partition (metadata `partitions`).
    pub const PARTITION_NOT_FOUND: &str = "PARTITION_NOT_FOUND";
    /// CreateTopic of an existing name.
    pub const TOPIC_EXISTS: &str = "TOPIC_EXISTS";
    /// The cluster cannot do this in its present shape.
    pub const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
    /// An offset outside the log (metadata `start_offset`, `end_offset`).
    pub const OFFSET_OUT_OF_RANGE: &str = "OFFSET_OUT_OF_RANGE";
    /// Nothing written: this node is not the leader (metadata `leader_id`, `leader_address`).
    pub const NOT_LEADER: &str = "NOT_LEADER";
    /// Nothing written: no leader known.
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    /// Nothing written: the node is stopping.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    /// Proposed, not confirmed in time: the write may or may not be in the log.
    pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";
    /// Too much in flight.
    pub const RESOURCE_EXHAUSTED: &str = "RESOURCE_EXHAUSTED";
    /// A bug or a storage failure.
    pub const INTERNAL: &str = "INTERNAL";
    /// An idempotent produce without its partition (metadata none).
    pub const PARTITION_REQUIRED: &str = "PARTITION_REQUIRED";
    /// A producer name outside the rules.
    pub const INVALID_PRODUCER_NAME: &str = "INVALID_PRODUCER_NAME";
    /// A newer epoch of the producer took over (metadata `current_epoch`). Stop producing.
    pub const PRODUCER_FENCED: &str = "PRODUCER_FENCED";
    /// The sequence is not the one the partition expects (metadata `expected_sequence`).
    pub const OUT_OF_ORDER_SEQUENCE: &str = "OUT_OF_ORDER_SEQUENCE";
    /// The producer id (or epoch) is unknown: never allocated, or forgotten after idling.
    pub const UNKNOWN_PRODUCER: &str = "UNKNOWN_PRODUCER";
    /// The records were written before; their offsets are no longer remembered (metadata
    /// `expected_sequence`). Nothing written now.
    pub const DUPLICATE_SEQUENCE: &str = "DUPLICATE_SEQUENCE";
    /// The partition remembers as many producers as it may (metadata `max`).
    pub const TOO_MANY_PRODUCERS: &str = "TOO_MANY_PRODUCERS";
    /// The cluster remembers as many producer names as it may (metadata `max`).
    pub const TOO_MANY_PRODUCER_NAMES: &str = "TOO_MANY_PRODUCER_NAMES";
    /// A topic config value that is not one of the key's values (metadata `key`).
    pub const INVALID_TOPIC_CONFIG: &str = "INVALID_TOPIC_CONFIG";
    /// A record without a key sent to a compacted topic (`cleanup.policy=compact`).
    pub const KEY_REQUIRED: &str = "KEY_REQUIRED";
    /// A consumer group name outside the rules (1 to 255 bytes, no control characters).
    pub const INVALID_GROUP_NAME: &str = "INVALID_GROUP_NAME";
    /// A member id outside the rules (up to 255 bytes, no control characters).
    pub const INVALID_MEMBER_ID: &str = "INVALID_MEMBER_ID";
    /// A session timeout outside the server's bounds (metadata `min`, `max`).
    pub const INVALID_SESSION_TIMEOUT: &str = "INVALID_SESSION_TIMEOUT";
    /// A negative offset, or an offset commit without its partition.
    pub const INVALID_OFFSET: &str = "INVALID_OFFSET";
    /// A reset without a target.
    pub const INVALID_RESET: &str = "INVALID_RESET";
    /// The member's epoch is not its current one (metadata `current_epoch`): a newer instance
    /// of it joined, or a heartbeat raised it. Heartbeat (or join again) before committing.
    pub const FENCED_MEMBER: &str = "FENCED_MEMBER";
    /// The group does not know the member (expired, left, never joined): join again.
    pub const UNKNOWN_MEMBER: &str = "UNKNOWN_MEMBER";
    /// A member committed for partitions it was not given (metadata `topic`, `partition`).
    pub const PARTITION_NOT_ASSIGNED: &str = "PARTITION_NOT_ASSIGNED";
    /// A commit below the committed offset (metadata `topic`, `partition`, `committed`);
    /// nothing committed.
    pub const COMMIT_BACKWARD: &str = "COMMIT_BACKWARD";
    /// The group has members: reset and delete need an empty group.
    pub const GROUP_NOT_EMPTY: &str = "GROUP_NOT_EMPTY";
    /// No such consumer group (metadata `group`).
    pub const GROUP_NOT_FOUND: &str = "GROUP_NOT_FOUND";
    /// The group's coordinator shard holds as many groups as it may (metadata `max`).
    pub const TOO_MANY_GROUPS: &str = "TOO_MANY_GROUPS";
    /// The group has as many members as it may (metadata `max`).
    pub const TOO_MANY_MEMBERS: &str = "TOO_MANY_MEMBERS";
    /// A queue name that is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    pub const INVALID_QUEUE_NAME: &str = "INVALID_QUEUE_NAME";
    /// A queue setting outside its bounds (the message names it and the bounds).
    pub const INVALID_QUEUE_CONFIG: &str = "INVALID_QUEUE_CONFIG";
    /// A visibility timeout (lease length) outside the server's bounds (metadata `min`, `max`).
    pub const INVALID_VISIBILITY_TIMEOUT: &str = "INVALID_VISIBILITY_TIMEOUT";
    /// A receipt whose partition the queue does not have.
    pub const INVALID_RECEIPT: &str = "INVALID_RECEIPT";
    /// No such queue (metadata `queue`).
    pub const QUEUE_NOT_FOUND: &str = "QUEUE_NOT_FOUND";
    /// A queue of that name exists.
    pub const QUEUE_EXISTS: &str = "QUEUE_EXISTS";
    /// The cluster holds as many queues as it may (metadata `max`).
    pub const TOO_MANY_QUEUES: &str = "TOO_MANY_QUEUES";
    /// No such node in the cluster's node table (metadata `node`).
    pub const NODE_NOT_FOUND: &str = "NODE_NOT_FOUND";
    /// A record's `ordo-deliver-at` header is not a decimal number of milliseconds.
    pub const INVALID_DELIVER_AT: &str = "INVALID_DELIVER_AT";
}

/// `ErrorInfo` metadata keys.
pub mod metadata {
    /// Id of the node believed to lead.
    pub const LEADER_ID: &str = "leader_id";
    /// gRPC address of the node believed to lead.
    pub const LEADER_ADDRESS: &str = "leader_address";
    /// First offset still in the log.
    pub const START_OFFSET: &str = "start_offset";
    /// Offset after the last committed record.
    pub const END_OFFSET: &str = "end_offset";
    /// The topic named by the request.
    pub const TOPIC: &str = "topic";
    /// How many partitions the topic has.
    pub const PARTITIONS: &str = "partitions";
    /// The name of the limit exceeded.
    pub const LIMIT: &str = "limit";
    /// The limit's value.
    pub const MAX: &str = "max";
    /// The value seen.
    pub const ACTUAL: &str = "actual";
    /// The sequence a partition expects next from the producer.
    pub const EXPECTED_SEQUENCE: &str = "expected_sequence";
    /// The partition's (or cluster's) current epoch of the producer; a group member's current
    /// epoch.
    pub const CURRENT_EPOCH: &str = "current_epoch";
    /// A partition number.
    pub const PARTITION: &str = "partition";
    /// A committed offset.
    pub const COMMITTED: &str = "committed";
    /// A consumer group's name.
    pub const GROUP: &str = "group";
    /// The smallest value allowed.
    pub const MIN: &str = "min";
    /// The queue a failure is about.
    pub const QUEUE: &str = "queue";
}

/// The `ErrorInfo` reason of an Ordo status, `None` when it carries none (a gRPC layer made it).
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == DOMAIN && !info.reason.is_empty())
        .map(|info| info.reason)
}

/// Whether an error of type `E` is among the causes of `status` (set only on statuses made by
/// the local transport, never on one received from a server).
pub fn source_chain_has<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<E>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Whether the call certainly never reached the server: the local transport could not connect.
/// Any other local failure (a reset, a keepalive timeout) may have happened after sending.
pub fn never_sent(status: &Status) -> bool {
    source_chain_has::<tonic::ConnectError>(status)
}
