//! The one place that turns errors into gRPC statuses.
//!
//! Every status carries a `google.rpc.ErrorInfo` (domain `ordo`) whose `reason` is stable:
//!
//! | error | code | reason | metadata |
//! |---|---|---|---|
//! | bad request | INVALID_ARGUMENT | e.g. `INVALID_TOPIC_NAME`, `EMPTY_BATCH` | |
//! | undecodable message | INVALID_ARGUMENT | `MALFORMED_MESSAGE` (made by `ordo_proto::codec`) | |
//! | over a limit | INVALID_ARGUMENT | `LIMIT_EXCEEDED` | `limit`, `max`, `actual` |
//! | unknown topic | NOT_FOUND | `TOPIC_NOT_FOUND` | `topic` |
//! | unknown partition | NOT_FOUND | `PARTITION_NOT_FOUND` | `partitions` |
//! | topic exists | ALREADY_EXISTS | `TOPIC_EXISTS` | |
//! | cluster too small | FAILED_PRECONDITION | `FAILED_PRECONDITION` | |
//! | offset outside the log | OUT_OF_RANGE | `OFFSET_OUT_OF_RANGE` | `start_offset`, `end_offset` |
//! | nothing written, no leader | UNAVAILABLE | `NOT_LEADER` / `UNAVAILABLE` | `leader_id`, `leader_address` |
//! | nothing written, node stopping | UNAVAILABLE | `SHUTTING_DOWN` | |
//! | proposed, not confirmed | DEADLINE_EXCEEDED | `OUTCOME_UNKNOWN` | |
//! | too much in flight | RESOURCE_EXHAUSTED | `RESOURCE_EXHAUSTED` | |
//! | newer producer epoch | FAILED_PRECONDITION | `PRODUCER_FENCED` | `current_epoch` |
//! | sequence gap | FAILED_PRECONDITION | `OUT_OF_ORDER_SEQUENCE` | `expected_sequence` |
//! | producer unknown | FAILED_PRECONDITION | `UNKNOWN_PRODUCER` | |
//! | retry past the window | ALREADY_EXISTS | `DUPLICATE_SEQUENCE` | `expected_sequence` |
//! | producers per partition | RESOURCE_EXHAUSTED | `TOO_MANY_PRODUCERS` | `max` |
//! | producer names | RESOURCE_EXHAUSTED | `TOO_MANY_PRODUCER_NAMES` | `max` |
//! | stale member epoch | FAILED_PRECONDITION | `FENCED_MEMBER` | `current_epoch` |
//! | member unknown to its group | FAILED_PRECONDITION | `UNKNOWN_MEMBER` | |
//! | commit of a partition not given | FAILED_PRECONDITION | `PARTITION_NOT_ASSIGNED` | `topic`, `partition` |
//! | commit below the committed offset | FAILED_PRECONDITION | `COMMIT_BACKWARD` | `topic`, `partition`, `committed` |
//! | reset or delete of a group with members | FAILED_PRECONDITION | `GROUP_NOT_EMPTY` | |
//! | unknown group | NOT_FOUND | `GROUP_NOT_FOUND` | `group` |
//! | session timeout out of bounds | INVALID_ARGUMENT | `INVALID_SESSION_TIMEOUT` | `min`, `max`, `actual` |
//! | groups per shard, members per group | RESOURCE_EXHAUSTED | `TOO_MANY_GROUPS`, `TOO_MANY_MEMBERS` | `max` |
//! | bug or storage failure | INTERNAL | `INTERNAL` | |
//!
//! OUT_OF_RANGE also sets the `end-offset` response header. The reasons and metadata keys are
//! the constants of `ordo_proto::errors`, which the client and forwarding nodes read back.
//!
//! Two statuses are made elsewhere, because no domain error exists yet when they happen: bytes
//! that do not decode as the method's message (`ordo_proto::codec`: INVALID_ARGUMENT,
//! `MALFORMED_MESSAGE`), and the transport's own failures.

use std::collections::HashMap;

use ordo_broker::BrokerError;
use ordo_broker::GroupRefusal;
use ordo_broker::ProducerRefusal;
use ordo_proto::errors::END_OFFSET_HEADER;
use ordo_proto::errors::metadata as key;
use ordo_proto::errors::reason;
use tonic::Code;
use tonic::Status;
use tonic_types::ErrorDetails;
use tonic_types::StatusExt;

pub use ordo_proto::errors::DOMAIN;

fn status(code: Code, message: String, reason: &str, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// UNAVAILABLE for a request refused because node `node` is shutting down: nothing was written.
pub fn shutting_down(node: u64) -> Status {
    status(
        Code::Unavailable,
        format!("node {node} is shutting down; nothing was written; retry on another node"),
        reason::SHUTTING_DOWN,
        HashMap::new(),
    )
}

/// UNAVAILABLE for a call to a node drained and removed from the cluster: nothing was done.
pub fn removed(node: u64) -> Status {
    status(
        Code::Unavailable,
        format!(
            "node {node} was removed from the cluster (drained); nothing was done; call another node"
        ),
        reason::UNAVAILABLE,
        HashMap::new(),
    )
}

/// Maps a broker error to its status.
pub fn to_status(error: BrokerError) -> Status {
    let message = error.to_string();
    let none = HashMap::new;
    match error {
        BrokerError::InvalidArgument { reason, .. } => {
            status(Code::InvalidArgument, message, reason, none())
        }
        BrokerError::LimitExceeded { name, max, actual } => status(
            Code::InvalidArgument,
            message,
            reason::LIMIT_EXCEEDED,
            HashMap::from([
                (key::LIMIT.into(), name.to_string()),
                (key::MAX.into(), max.to_string()),
                (key::ACTUAL.into(), actual.to_string()),
            ]),
        ),
        BrokerError::TopicNotFound(topic) => status(
            Code::NotFound,
            message,
            reason::TOPIC_NOT_FOUND,
            HashMap::from([(key::TOPIC.into(), topic)]),
        ),
        BrokerError::PartitionNotFound { partitions, .. } => status(
            Code::NotFound,
            message,
            reason::PARTITION_NOT_FOUND,
            HashMap::from([(key::PARTITIONS.into(), partitions.to_string())]),
        ),
        BrokerError::NodeNotFound(node) => status(
            Code::NotFound,
            message,
            reason::NODE_NOT_FOUND,
            HashMap::from([("node".into(), node.to_string())]),
        ),
        BrokerError::TopicExists(_) => {
            status(Code::AlreadyExists, message, reason::TOPIC_EXISTS, none())
        }
        BrokerError::FailedPrecondition(_) => status(
            Code::FailedPrecondition,
            message,
            reason::FAILED_PRECONDITION,
            none(),
        ),
        BrokerError::OffsetOutOfRange { start, end, .. } => {
            let mut status = status(
                Code::OutOfRange,
                message,
                reason::OFFSET_OUT_OF_RANGE,
                HashMap::from([
                    (key::START_OFFSET.into(), start.to_string()),
                    (key::END_OFFSET.into(), end.to_string()),
                ]),
            );
            if let Ok(value) = end.to_string().parse() {
                status.metadata_mut().insert(END_OFFSET_HEADER, value);
            }
            status
        }
        BrokerError::Unavailable {
            leader,
            leader_address,
            ..
        } => {
            let mut metadata = HashMap::new();
            if let Some(leader) = leader {
                metadata.insert(key::LEADER_ID.into(), leader.to_string());
            }
            if let Some(address) = leader_address {
                metadata.insert(key::LEADER_ADDRESS.into(), address);
            }
            let reason = if leader.is_some() {
                reason::NOT_LEADER
            } else {
                reason::UNAVAILABLE
            };
            status(Code::Unavailable, message, reason, metadata)
        }
        BrokerError::OutcomeUnknown { .. } => status(
            Code::DeadlineExceeded,
            message,
            reason::OUTCOME_UNKNOWN,
            none(),
        ),
        BrokerError::ResourceExhausted(_) => status(
            Code::ResourceExhausted,
            message,
            reason::RESOURCE_EXHAUSTED,
            none(),
        ),
        BrokerError::ProducerRefused(refusal) => {
            let (code, reason, metadata) = match refusal {
                ProducerRefusal::Fenced { current_epoch } => (
                    Code::FailedPrecondition,
                    reason::PRODUCER_FENCED,
                    HashMap::from([(key::CURRENT_EPOCH.into(), current_epoch.to_string())]),
                ),
                ProducerRefusal::OutOfOrder { expected } => (
                    Code::FailedPrecondition,
                    reason::OUT_OF_ORDER_SEQUENCE,
                    HashMap::from([(key::EXPECTED_SEQUENCE.into(), expected.to_string())]),
                ),
                ProducerRefusal::UnknownProducer => {
                    (Code::FailedPrecondition, reason::UNKNOWN_PRODUCER, none())
                }
                ProducerRefusal::SequenceTooOld { expected } => (
                    Code::AlreadyExists,
                    reason::DUPLICATE_SEQUENCE,
                    HashMap::from([(key::EXPECTED_SEQUENCE.into(), expected.to_string())]),
                ),
                ProducerRefusal::TooManyProducers { max } => (
                    Code::ResourceExhausted,
                    reason::TOO_MANY_PRODUCERS,
                    HashMap::from([(key::MAX.into(), max.to_string())]),
                ),
            };
            status(code, message, reason, metadata)
        }
        BrokerError::TooManyProducerNames { max } => status(
            Code::ResourceExhausted,
            message,
            reason::TOO_MANY_PRODUCER_NAMES,
            HashMap::from([(key::MAX.into(), max.to_string())]),
        ),
        BrokerError::GroupRefused(refusal) => {
            let partition = |topic: &str, partition: u32| {
                HashMap::from([
                    (key::TOPIC.into(), topic.to_owned()),
                    (key::PARTITION.into(), partition.to_string()),
                ])
            };
            let (code, reason, metadata) = match &refusal {
                GroupRefusal::FencedMember { current_epoch } => (
                    Code::FailedPrecondition,
                    reason::FENCED_MEMBER,
                    HashMap::from([(key::CURRENT_EPOCH.into(), current_epoch.to_string())]),
                ),
                GroupRefusal::UnknownMember => {
                    (Code::FailedPrecondition, reason::UNKNOWN_MEMBER, none())
                }
                GroupRefusal::NotAssigned(partitions) => (
                    Code::FailedPrecondition,
                    reason::PARTITION_NOT_ASSIGNED,
                    partitions
                        .first()
                        .map(|(topic, p)| partition(topic, *p))
                        .unwrap_or_default(),
                ),
                GroupRefusal::CommitBackward(partitions) => (
                    Code::FailedPrecondition,
                    reason::COMMIT_BACKWARD,
                    partitions
                        .first()
                        .map(|(topic, p, committed)| {
                            let mut metadata = partition(topic, *p);
                            metadata.insert(key::COMMITTED.into(), committed.to_string());
                            metadata
                        })
                        .unwrap_or_default(),
                ),
                GroupRefusal::NotEmpty => {
                    (Code::FailedPrecondition, reason::GROUP_NOT_EMPTY, none())
                }
                GroupRefusal::TooManyGroups { max } => (
                    Code::ResourceExhausted,
                    reason::TOO_MANY_GROUPS,
                    HashMap::from([(key::MAX.into(), max.to_string())]),
                ),
                GroupRefusal::TooManyMembers { max } => (
                    Code::ResourceExhausted,
                    reason::TOO_MANY_MEMBERS,
                    HashMap::from([(key::MAX.into(), max.to_string())]),
                ),
            };
            status(code, message, reason, metadata)
        }
        BrokerError::GroupNotFound(group) => status(
            Code::NotFound,
            message,
            reason::GROUP_NOT_FOUND,
            HashMap::from([(key::GROUP.into(), group)]),
        ),
        BrokerError::InvalidSessionTimeout { actual, min, max } => status(
            Code::InvalidArgument,
            message,
            reason::INVALID_SESSION_TIMEOUT,
            HashMap::from([
                (key::MIN.into(), min.to_string()),
                (key::MAX.into(), max.to_string()),
                (key::ACTUAL.into(), actual.to_string()),
            ]),
        ),
        BrokerError::QueueNotFound(queue) => status(
            Code::NotFound,
            message,
            reason::QUEUE_NOT_FOUND,
            HashMap::from([(key::QUEUE.into(), queue)]),
        ),
        BrokerError::QueueExists(queue) => status(
            Code::AlreadyExists,
            message,
            reason::QUEUE_EXISTS,
            HashMap::from([(key::QUEUE.into(), queue)]),
        ),
        BrokerError::TooManyQueues { max } => status(
            Code::ResourceExhausted,
            message,
            reason::TOO_MANY_QUEUES,
            HashMap::from([(key::MAX.into(), max.to_string())]),
        ),
        BrokerError::Internal(_) => status(Code::Internal, message, reason::INTERNAL, none()),
    }
}

/// A request field that cannot be accepted.
pub fn invalid(reason: &str, message: impl Into<String>) -> Status {
    status(
        Code::InvalidArgument,
        message.into(),
        reason,
        HashMap::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error gets its code and a reason a client can read back.
    #[test]
    fn codes_and_reasons() {
        let cases = [
            (
                BrokerError::TopicNotFound("t".into()),
                Code::NotFound,
                reason::TOPIC_NOT_FOUND,
            ),
            (
                BrokerError::OutcomeUnknown {
                    message: "x".into(),
                },
                Code::DeadlineExceeded,
                "OUTCOME_UNKNOWN",
            ),
            (
                BrokerError::Unavailable {
                    message: "x".into(),
                    leader: Some(2),
                    leader_address: Some("h:1".into()),
                },
                Code::Unavailable,
                "NOT_LEADER",
            ),
            (
                BrokerError::OffsetOutOfRange {
                    offset: 9,
                    start: 0,
                    end: 5,
                },
                Code::OutOfRange,
                reason::OFFSET_OUT_OF_RANGE,
            ),
            (
                BrokerError::LimitExceeded {
                    name: "record_bytes_max",
                    max: 1,
                    actual: 2,
                },
                Code::InvalidArgument,
                reason::LIMIT_EXCEEDED,
            ),
        ];
        for (error, code, reason) in cases {
            let status = to_status(error);
            assert_eq!(status.code(), code);
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, DOMAIN);
        }
        let status = to_status(BrokerError::Unavailable {
            message: "x".into(),
            leader: Some(2),
            leader_address: Some("h:1".into()),
        });
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata["leader_id"], "2");
        assert_eq!(info.metadata["leader_address"], "h:1");
    }

    /// Every producer refusal survives the trip through a status to a forwarding node: the one
    /// that built it and `ordo_broker::rpc` that reads it agree.
    #[test]
    fn producer_refusals_round_trip() {
        for refusal in [
            ProducerRefusal::Fenced { current_epoch: 3 },
            ProducerRefusal::OutOfOrder { expected: 17 },
            ProducerRefusal::UnknownProducer,
            ProducerRefusal::SequenceTooOld { expected: 9 },
            ProducerRefusal::TooManyProducers { max: 1000 },
        ] {
            let status = to_status(BrokerError::ProducerRefused(refusal));
            assert_eq!(
                ordo_broker::rpc::producer_refusal_of(&status),
                Some(refusal),
                "{status:?}"
            );
            assert_eq!(
                ordo_broker::rpc::classify_failure(&status),
                ordo_broker::rpc::CallFailure::Refused(ordo_broker::rpc::Refusal::Producer(
                    refusal
                ))
            );
        }
    }
}
