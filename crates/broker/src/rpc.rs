//! The contract of each internal call between nodes, written once and used by both ends: the
//! calling side in `peer` and the serving side in `ordo-server`'s services.
//!
//! - Forwarded produce (`Internal/ForwardProduce`): the answer is a [`ForwardOutcome`]; a
//!   failure is a status classified by [`classify_failure`] from its `ErrorInfo` reason (never
//!   from the message text): `OUTCOME_UNKNOWN` means proposed and not confirmed, `INTERNAL`
//!   maybe written, any other Ordo reason is the remote's refusal before proposing (final when
//!   it judged the request itself: INVALID_ARGUMENT, RESOURCE_EXHAUSTED). A status this node's
//!   own gRPC stack made (it has a source) says nothing was sent only for a connect failure.
//! - Forwarded metadata command (`Internal/ForwardMeta`): [`MetaForward`].
//! - Metadata read index (`Internal/MetaReadIndex`): the index, or "not the leader".
//! - Group status (`Internal/GroupStatus`): [`GroupStatus`] both ways.
//! - Forwarded fetch: the public `Log/Fetch`, marked with [`FORWARDED_HEADER`] so the receiver
//!   never forwards again; its records travel as `ordo_proto::record` converts them, and an
//!   OUT_OF_RANGE answer carries the end in its `ErrorInfo` and in the
//!   `ordo_proto::errors::END_OFFSET_HEADER` header.

use bytes::Bytes;
use ordo_proto::errors;
use ordo_proto::errors::reason;
use ordo_proto::internal as wire;
use ordo_proto::v1;
use ordo_raft::GroupStatus;
use tonic::Code;
use tonic::Status;

use crate::NodeId;
use crate::ProducerRefusal;
use crate::fetch::FetchOutcome;

/// Header marking a request already forwarded once, so forwarding never loops.
pub use ordo_proto::FORWARDED_HEADER;

/// The answer to a forwarded append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOutcome {
    /// Committed at this base offset (`duplicate`: an idempotent retry found it written
    /// before, and nothing was written now).
    Appended {
        /// Offset of the batch's first record.
        base_offset: u64,
        /// Written before, by an earlier attempt.
        duplicate: bool,
    },
    /// Not proposed: the node does not lead the group; the leader it knows of.
    NotLeader(Option<NodeId>),
    /// Proposed, then dropped from the log by a leader change before it committed there; it
    /// may still commit under the new leader it knows of. Outcome unknown.
    LeaderChanged(Option<NodeId>),
}

impl ForwardOutcome {
    /// The wire answer.
    pub fn into_wire(self) -> wire::ForwardProduceResponse {
        match self {
            ForwardOutcome::Appended {
                base_offset,
                duplicate,
            } => wire::ForwardProduceResponse {
                base_offset: Some(base_offset),
                duplicate,
                ..Default::default()
            },
            ForwardOutcome::NotLeader(leader_hint) => wire::ForwardProduceResponse {
                leader_hint,
                not_leader: true,
                ..Default::default()
            },
            ForwardOutcome::LeaderChanged(leader_hint) => wire::ForwardProduceResponse {
                leader_hint,
                discarded: true,
                ..Default::default()
            },
        }
    }

    /// Reads the wire answer; `None` when it is not exactly one of the three.
    pub fn from_wire(response: &wire::ForwardProduceResponse) -> Option<Self> {
        match (
            response.base_offset,
            response.not_leader,
            response.discarded,
        ) {
            (Some(base_offset), false, false) => Some(ForwardOutcome::Appended {
                base_offset,
                duplicate: response.duplicate,
            }),
            (None, true, false) => Some(ForwardOutcome::NotLeader(response.leader_hint)),
            (None, false, true) => Some(ForwardOutcome::LeaderChanged(response.leader_hint)),
            _ => None,
        }
    }
}

/// A producer stamp on the wire of a forwarded produce.
pub fn stamp_into_wire(stamp: ordo_raft::ProducerStamp) -> wire::ProducerStamp {
    wire::ProducerStamp {
        id: stamp.id,
        epoch: stamp.epoch,
        sequence: stamp.sequence,
    }
}

/// Reads a producer stamp from the wire.
pub fn stamp_from_wire(stamp: &wire::ProducerStamp) -> ordo_raft::ProducerStamp {
    ordo_raft::ProducerStamp {
        id: stamp.id,
        epoch: stamp.epoch,
        sequence: stamp.sequence,
    }
}

/// What a failed call to another node may have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    /// The remote proposed the write and could not confirm it: it may commit.
    OutcomeUnknown,
    /// Certainly nothing was proposed: the remote refused for a reason another node or a later
    /// attempt may not have (not the leader, shutting down), or the call never left this node.
    NothingDone,
    /// The remote judged the request itself and refused it (INVALID_ARGUMENT,
    /// RESOURCE_EXHAUSTED): nothing was proposed, and retrying the same request elsewhere will
    /// not help. The caller gets the verdict.
    Refused(Refusal),
    /// The call may have reached the remote (e.g. the connection broke after sending).
    MaybeDone,
}

/// Why a remote refused a request on its merits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is malformed or over a limit.
    InvalidArgument,
    /// The remote has too much in flight.
    ResourceExhausted,
    /// The partition's producer state refused an idempotent batch: final for the request.
    Producer(ProducerRefusal),
}

/// Classifies a failed internal write call.
///
/// A status with a source was made by this node's own gRPC stack (transport, deadline timer,
/// decoder), not received: only a connect failure proves nothing was sent. A received status is
/// classified by its `ErrorInfo` reason, never by its message.
pub fn classify_failure(status: &Status) -> CallFailure {
    if std::error::Error::source(status).is_some() {
        return if errors::never_sent(status) {
            CallFailure::NothingDone
        } else if status.code() == Code::DeadlineExceeded {
            CallFailure::OutcomeUnknown
        } else {
            CallFailure::MaybeDone
        };
    }
    if let Some(refusal) = producer_refusal_of(status) {
        return CallFailure::Refused(Refusal::Producer(refusal));
    }
    match errors::reason_of(status).as_deref() {
        Some(reason::OUTCOME_UNKNOWN) => CallFailure::OutcomeUnknown,
        // An Ordo server's INTERNAL may come after proposing (e.g. an unexpected answer).
        Some(reason::INTERNAL) => CallFailure::MaybeDone,
        Some(_) if status.code() == Code::InvalidArgument => {
            CallFailure::Refused(Refusal::InvalidArgument)
        }
        Some(_) if status.code() == Code::ResourceExhausted => {
            CallFailure::Refused(Refusal::ResourceExhausted)
        }
        Some(_) => CallFailure::NothingDone,
        // A gRPC layer made the status, not an Ordo handler.
        None if status.code() == Code::DeadlineExceeded => CallFailure::OutcomeUnknown,
        None => CallFailure::MaybeDone,
    }
}

/// The producer refusal a status carries (its `ErrorInfo` reason and metadata), as the serving
/// node's `ordo-server` status module wrote it.
pub fn producer_refusal_of(status: &Status) -> Option<ProducerRefusal> {
    use tonic_types::StatusExt;
    let info = status
        .get_details_error_info()
        .filter(|info| info.domain == errors::DOMAIN)?;
    let number = |key: &str| info.metadata.get(key)?.parse::<u64>().ok();
    Some(match info.reason.as_str() {
        reason::PRODUCER_FENCED => ProducerRefusal::Fenced {
            current_epoch: u32::try_from(number(errors::metadata::CURRENT_EPOCH)?).ok()?,
        },
        reason::OUT_OF_ORDER_SEQUENCE => ProducerRefusal::OutOfOrder {
            expected: number(errors::metadata::EXPECTED_SEQUENCE)?,
        },
        reason::UNKNOWN_PRODUCER => ProducerRefusal::UnknownProducer,
        reason::DUPLICATE_SEQUENCE => ProducerRefusal::SequenceTooOld {
            expected: number(errors::metadata::EXPECTED_SEQUENCE)?,
        },
        reason::TOO_MANY_PRODUCERS => ProducerRefusal::TooManyProducers {
            max: u32::try_from(number(errors::metadata::MAX)?).ok()?,
        },
        _ => return None,
    })
}

/// The answer to a forwarded metadata command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaForward {
    /// Committed and applied on the metadata leader: its encoded answer.
    Applied(Bytes),
    /// The receiver is not the metadata leader; the leader it knows of. Nothing was proposed.
    NotLeader(Option<NodeId>),
    /// The receiver proposed the command, then a leader change dropped it there: it may still
    /// commit under the new leader it knows of. Outcome unknown.
    LeaderChanged(Option<NodeId>),
}

impl MetaForward {
    /// The wire answer.
    pub fn into_wire(self) -> wire::ForwardMetaResponse {
        match self {
            MetaForward::Applied(response) => wire::ForwardMetaResponse {
                response,
                ..Default::default()
            },
            MetaForward::NotLeader(leader_hint) => wire::ForwardMetaResponse {
                not_leader: true,
                leader_hint,
                ..Default::default()
            },
            MetaForward::LeaderChanged(leader_hint) => wire::ForwardMetaResponse {
                discarded: true,
                leader_hint,
                ..Default::default()
            },
        }
    }

    /// Reads the wire answer.
    pub fn from_wire(response: wire::ForwardMetaResponse) -> Self {
        if response.discarded {
            MetaForward::LeaderChanged(response.leader_hint)
        } else if response.not_leader {
            MetaForward::NotLeader(response.leader_hint)
        } else {
            MetaForward::Applied(response.response)
        }
    }
}

/// The wire answer to a read-index request: `None` when the receiver is not the leader.
pub fn read_index_into_wire(index: Option<u64>) -> wire::MetaReadIndexResponse {
    wire::MetaReadIndexResponse {
        index: index.unwrap_or(0),
        not_leader: index.is_none(),
    }
}

/// Reads the wire answer to a read-index request.
pub fn read_index_from_wire(response: &wire::MetaReadIndexResponse) -> Option<u64> {
    (!response.not_leader).then_some(response.index)
}

/// One group's status on the wire.
pub fn group_status_into_wire(status: GroupStatus) -> wire::GroupState {
    wire::GroupState {
        group: status.group,
        leader: status.leader,
        term: status.term,
        high_watermark: status.high_watermark,
        log_start_offset: status.log_start_offset,
        matched: status.matched.into_iter().collect(),
        last_log_index: status.last_log_index,
        bytes: status.bytes,
    }
}

/// Reads one group's status from the wire (the voters are not sent).
pub fn group_status_from_wire(state: wire::GroupState) -> GroupStatus {
    GroupStatus {
        group: state.group,
        leader: state.leader,
        term: state.term,
        high_watermark: state.high_watermark,
        log_start_offset: state.log_start_offset,
        bytes: state.bytes,
        last_log_index: state.last_log_index,
        matched: state.matched.into_iter().collect(),
        voters: Vec::new(),
    }
}

/// A fetch answer on the wire (public `Log/Fetch`, also the forwarded fetch).
pub fn fetch_into_wire(partition: u32, outcome: FetchOutcome) -> v1::FetchResponse {
    v1::FetchResponse {
        partition,
        records: outcome.records.into_iter().map(Into::into).collect(),
        high_watermark: outcome.high_watermark,
        log_start_offset: outcome.log_start_offset,
    }
}

/// Reads a fetch answer from the wire.
pub fn fetch_from_wire(response: v1::FetchResponse) -> FetchOutcome {
    FetchOutcome {
        records: response.records.into_iter().map(Into::into).collect(),
        high_watermark: response.high_watermark,
        log_start_offset: response.log_start_offset,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;
    use tonic_types::StatusExt;

    use super::*;

    fn ordo_status(code: Code, reason: &str) -> Status {
        Status::with_error_details(
            code,
            "x",
            ErrorDetails::with_error_info(reason, errors::DOMAIN, HashMap::new()),
        )
    }

    /// Each forward answer survives the wire, and a malformed one is refused.
    #[test]
    fn forward_outcomes_round_trip() {
        for outcome in [
            ForwardOutcome::Appended {
                base_offset: 7,
                duplicate: false,
            },
            ForwardOutcome::Appended {
                base_offset: 7,
                duplicate: true,
            },
            ForwardOutcome::NotLeader(Some(2)),
            ForwardOutcome::NotLeader(None),
            ForwardOutcome::LeaderChanged(Some(3)),
        ] {
            let wire = outcome.clone().into_wire();
            assert_eq!(ForwardOutcome::from_wire(&wire), Some(outcome));
        }
        let malformed = wire::ForwardProduceResponse {
            base_offset: Some(1),
            not_leader: true,
            ..Default::default()
        };
        assert_eq!(ForwardOutcome::from_wire(&malformed), None);
        for answer in [
            MetaForward::Applied(Bytes::from_static(b"a")),
            MetaForward::NotLeader(Some(1)),
            MetaForward::LeaderChanged(Some(2)),
            MetaForward::LeaderChanged(None),
        ] {
            assert_eq!(MetaForward::from_wire(answer.clone().into_wire()), answer);
        }
        assert_eq!(
            read_index_from_wire(&read_index_into_wire(Some(5))),
            Some(5)
        );
        assert_eq!(read_index_from_wire(&read_index_into_wire(None)), None);
    }

    /// Failures are classified by reason, whatever the code and message say: a message naming
    /// "reset" or "closed" changes nothing, and a server refusal is never "maybe done".
    #[test]
    fn failures_are_classified_by_reason() {
        let cases = [
            (
                ordo_status(Code::DeadlineExceeded, reason::OUTCOME_UNKNOWN),
                CallFailure::OutcomeUnknown,
            ),
            (
                ordo_status(Code::Aborted, reason::OUTCOME_UNKNOWN),
                CallFailure::OutcomeUnknown,
            ),
            (
                ordo_status(Code::Unavailable, reason::NOT_LEADER),
                CallFailure::NothingDone,
            ),
            (
                ordo_status(Code::Unavailable, reason::SHUTTING_DOWN),
                CallFailure::NothingDone,
            ),
            (
                ordo_status(Code::InvalidArgument, reason::LIMIT_EXCEEDED),
                CallFailure::Refused(Refusal::InvalidArgument),
            ),
            (
                ordo_status(Code::ResourceExhausted, reason::RESOURCE_EXHAUSTED),
                CallFailure::Refused(Refusal::ResourceExhausted),
            ),
            (
                ordo_status(Code::Internal, reason::INTERNAL),
                CallFailure::MaybeDone,
            ),
            (
                Status::deadline_exceeded("timeout"),
                CallFailure::OutcomeUnknown,
            ),
            (
                Status::unavailable("connection reset"),
                CallFailure::MaybeDone,
            ),
            (Status::unavailable("refused"), CallFailure::MaybeDone),
            (
                Status::internal("h2 protocol error"),
                CallFailure::MaybeDone,
            ),
        ];
        for (status, expected) in cases {
            assert_eq!(classify_failure(&status), expected, "{status:?}");
        }
        // A status whose reason is in another domain is not Ordo's.
        let foreign = Status::with_error_details(
            Code::Unavailable,
            "x",
            ErrorDetails::with_error_info(reason::NOT_LEADER, "other", HashMap::new()),
        );
        assert_eq!(classify_failure(&foreign), CallFailure::MaybeDone);
        assert!(foreign.get_details_error_info().is_some());
        // An Ordo reason on a status this node made itself (here: a decode failure of the
        // answer, which carries the decode error as its source) is not the remote's verdict.
        let mut local = ordo_status(Code::InvalidArgument, reason::MALFORMED_MESSAGE);
        local.set_source(std::sync::Arc::new(std::io::Error::other(
            "bad answer bytes",
        )));
        assert_eq!(classify_failure(&local), CallFailure::MaybeDone);
    }

    /// A connect failure made by tonic's own transport means the call never left.
    #[tokio::test]
    async fn a_connect_failure_is_nothing_done() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let mut client = ordo_proto::internal::internal_client::InternalClient::new(channel);
        let status = client
            .ping(wire::PingRequest { from: 0 })
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(
            classify_failure(&status),
            CallFailure::NothingDone,
            "{status:?}"
        );
    }
}
