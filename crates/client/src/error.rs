//! The client's error type and the one function that builds it from a `tonic::Status`.
//!
//! This module owns the mapping from gRPC status codes and `google.rpc.ErrorInfo` details (see
//! the error model at the top of `proto/ordo/v1/ordo.proto`) to [`ClientError`]. No other module
//! inspects a `Status`; everything else matches on [`ClientError`] variants.
//!
//! The mapping depends on whether the call could have changed the log ([`Effect`]): a connection
//! that breaks after a produce was sent leaves its outcome unknown, while the same break on a
//! fetch is a plain, retryable transport failure.

use std::error::Error as _;

use ordo_proto::errors::never_sent;
use ordo_proto::errors::source_chain_has;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// `ErrorInfo` metadata key: offset after the last committed record.
pub use ordo_proto::errors::metadata::END_OFFSET as METADATA_END_OFFSET;
/// `ErrorInfo` metadata key: gRPC address of the node believed to lead.
pub use ordo_proto::errors::metadata::LEADER_ADDRESS as METADATA_LEADER_ADDRESS;
/// `ErrorInfo` metadata key: id of the node believed to lead.
pub use ordo_proto::errors::metadata::LEADER_ID as METADATA_LEADER_ID;
/// `ErrorInfo` metadata key: first offset still in the log.
pub use ordo_proto::errors::metadata::START_OFFSET as METADATA_START_OFFSET;
/// `ErrorInfo` reason sent by a node that is not the leader it was asked to be.
pub use ordo_proto::errors::reason::NOT_LEADER as REASON_NOT_LEADER;
/// `ErrorInfo` reason for a write whose outcome is unknown (proposed, not confirmed in time).
pub use ordo_proto::errors::reason::OUTCOME_UNKNOWN as REASON_OUTCOME_UNKNOWN;
/// `ErrorInfo` reason of a request a node refused because it is shutting down (nothing written).
pub use ordo_proto::errors::reason::SHUTTING_DOWN as REASON_SHUTTING_DOWN;

/// Whether a call can change server state, which decides how an interrupted call is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The call only reads (fetch, subscribe, list, describe, status): retrying is always safe.
    Read,
    /// The call writes (produce, create or delete a topic): once sent, an interrupted call has an
    /// unknown outcome and must not be retried blindly.
    Write,
    /// An idempotent produce (it carries a producer sequence): an interrupted call's outcome is
    /// unknown, but retrying the same request is safe, since the partition writes it once.
    IdempotentWrite,
}

/// An error returned by [`crate::Client`]. Each variant names something a caller can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The topic or partition does not exist.
    #[error("not found: {message}")]
    NotFound {
        /// Machine-readable `ErrorInfo` reason, such as `TOPIC_NOT_FOUND`, when the server sent one.
        reason: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The request was malformed or over a limit (the reason names which, e.g. `LIMIT_EXCEEDED`).
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// Machine-readable `ErrorInfo` reason, when the server sent one.
        reason: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The topic already exists.
    #[error("already exists: {message}")]
    AlreadyExists {
        /// The server's message.
        message: String,
    },
    /// The cluster cannot serve the request in its present shape (e.g. replication factor above
    /// the node count).
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// Machine-readable `ErrorInfo` reason, when the server sent one.
        reason: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The offset is outside the log; `start..end` is the range that can be read, when known.
    #[error("offset out of range{}: {message}", range_suffix(*.start, *.end))]
    OutOfRange {
        /// First offset still in the log.
        start: Option<u64>,
        /// Offset after the last committed record.
        end: Option<u64>,
        /// The server's message.
        message: String,
    },
    /// No leader was reachable and nothing was written; safe to retry, ideally at the hinted
    /// leader.
    #[error("unavailable{}: {message}", leader_suffix(*.leader_hint, .leader_address.as_deref()))]
    Unavailable {
        /// Id of the node the server believes leads, when it knows.
        leader_hint: Option<u64>,
        /// Address of that node, when the server knows it.
        leader_address: Option<String>,
        /// The server's message.
        message: String,
    },
    /// A write may or may not have been applied: it was sent, but no answer confirmed it before
    /// the deadline or the connection broke. Retrying may duplicate records.
    #[error("outcome unknown (the write may or may not have been applied): {message}")]
    OutcomeUnknown {
        /// What happened.
        message: String,
    },
    /// A read's deadline passed before an answer came. Nothing was changed.
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded {
        /// What happened.
        message: String,
    },
    /// The server is overloaded (too many requests in flight). Nothing was written; safe to
    /// retry after backing off, but the client does not do so by itself.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// Machine-readable `ErrorInfo` reason, when the server sent one.
        reason: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The endpoint could not be reached, or a read's connection broke. Nothing was changed.
    #[error("transport error at {endpoint}: {message}")]
    Transport {
        /// The endpoint the call went to.
        endpoint: String,
        /// The transport error and its causes.
        message: String,
    },
    /// An endpoint given to [`crate::Client::connect`] is not a valid address.
    #[error("invalid endpoint {endpoint:?}: {message}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it was rejected.
        message: String,
    },
    /// The server answered with something this client cannot interpret (a missing field, a
    /// wrong count of acknowledgements): a version mismatch or a server bug.
    #[error("protocol error: {message}")]
    Protocol {
        /// What was wrong with the answer.
        message: String,
    },
    /// Any other status.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
}

fn range_suffix(start: Option<u64>, end: Option<u64>) -> String {
    match (start, end) {
        (None, None) => String::new(),
        (start, end) => format!(
            " (log holds {}..{})",
            start.map_or_else(|| "?".to_owned(), |s| s.to_string()),
            end.map_or_else(|| "?".to_owned(), |e| e.to_string()),
        ),
    }
}

fn leader_suffix(leader: Option<u64>, address: Option<&str>) -> String {
    match (leader, address) {
        (None, None) => String::new(),
        (Some(id), None) => format!(" (leader hint: node {id})"),
        (None, Some(address)) => format!(" (leader hint: {address})"),
        (Some(id), Some(address)) => format!(" (leader hint: node {id} at {address})"),
    }
}

impl ClientError {
    /// Builds the error for a `status` returned by a call with the given `effect` to `endpoint`.
    ///
    /// This is the only place a `Status` is interpreted. A status that carries a `source` was
    /// produced by the client's own transport, not by a server: a connect error means the request
    /// never left and is a [`ClientError::Transport`]; the channel's own deadline timer is a
    /// deadline; any other local failure (a connection reset, an HTTP/2 keepalive timeout)
    /// happened after sending, so for a write it is [`ClientError::OutcomeUnknown`].
    pub fn from_status(status: Status, effect: Effect, endpoint: &str) -> ClientError {
        if status.source().is_some() {
            return Self::from_local_status(&status, effect, endpoint);
        }
        let message = status.message().to_owned();
        let info = status.get_details_error_info();
        let reason = info
            .as_ref()
            .map(|info| info.reason.clone())
            .filter(|reason| !reason.is_empty());
        let metadata = |key: &str| {
            info.as_ref()
                .and_then(|info| info.metadata.get(key).cloned())
        };
        let metadata_u64 = |key: &str| metadata(key).and_then(|value| value.parse::<u64>().ok());

        // A node that is not the leader wrote nothing, whatever code it chose to send.
        if reason.as_deref() == Some(REASON_NOT_LEADER) {
            return ClientError::Unavailable {
                leader_hint: metadata_u64(METADATA_LEADER_ID),
                leader_address: metadata(METADATA_LEADER_ADDRESS),
                message,
            };
        }
        match status.code() {
            Code::NotFound => ClientError::NotFound { reason, message },
            Code::InvalidArgument => ClientError::InvalidArgument { reason, message },
            Code::AlreadyExists => ClientError::AlreadyExists { message },
            Code::FailedPrecondition => ClientError::FailedPrecondition { reason, message },
            // Without Ordo's ErrorInfo an OUT_OF_RANGE comes from the gRPC layer itself: a
            // message over the server's size limit, i.e. a request too large.
            Code::OutOfRange if reason.is_none() => {
                ClientError::InvalidArgument { reason, message }
            }
            Code::OutOfRange => ClientError::OutOfRange {
                start: metadata_u64(METADATA_START_OFFSET),
                end: metadata_u64(METADATA_END_OFFSET),
                message,
            },
            Code::Unavailable => ClientError::Unavailable {
                leader_hint: metadata_u64(METADATA_LEADER_ID),
                leader_address: metadata(METADATA_LEADER_ADDRESS),
                message,
            },
            Code::ResourceExhausted => ClientError::ResourceExhausted { reason, message },
            Code::DeadlineExceeded => {
                // Without the OUTCOME_UNKNOWN reason a server-side deadline on a write is still
                // ambiguous: the server may have proposed before the deadline fired.
                if reason.as_deref() == Some(REASON_OUTCOME_UNKNOWN) || effect != Effect::Read {
                    ClientError::OutcomeUnknown { message }
                } else {
                    ClientError::DeadlineExceeded { message }
                }
            }
            code => {
                if reason.as_deref() == Some(REASON_OUTCOME_UNKNOWN) {
                    ClientError::OutcomeUnknown { message }
                } else {
                    ClientError::Other { code, message }
                }
            }
        }
    }

    /// Whether `status` is a node's refusal because it is shutting down: the connection's
    /// streams should not be used for new calls.
    pub(crate) fn is_shutting_down(status: &Status) -> bool {
        status.code() == Code::Unavailable
            && status
                .get_details_error_info()
                .is_some_and(|info| info.reason == REASON_SHUTTING_DOWN)
    }

    /// Maps a status made by the client's own transport (it carries the transport error as its
    /// source).
    fn from_local_status(status: &Status, effect: Effect, endpoint: &str) -> ClientError {
        let message = error_chain(status);
        // The channel enforces the gRPC timeout locally too; when its timer fires first the
        // call's deadline passed, which for a write that was sent means an unknown outcome.
        if source_chain_has::<tonic::TimeoutExpired>(status) {
            return match effect {
                Effect::Write | Effect::IdempotentWrite => ClientError::OutcomeUnknown {
                    message: format!("no answer from {endpoint} before the deadline: {message}"),
                },
                Effect::Read => ClientError::DeadlineExceeded {
                    message: format!("no answer from {endpoint} before the deadline: {message}"),
                },
            };
        }
        if never_sent(status) || effect == Effect::Read {
            ClientError::Transport {
                endpoint: endpoint.to_owned(),
                message,
            }
        } else {
            ClientError::OutcomeUnknown {
                message: format!(
                    "connection to {endpoint} failed after the request was sent: {message}"
                ),
            }
        }
    }

    /// The error for a call with `effect` whose local timer of `waited` expired at `endpoint`.
    pub(crate) fn local_timeout(
        effect: Effect,
        endpoint: &str,
        waited: std::time::Duration,
    ) -> Self {
        let message = format!("no answer from {endpoint} within {waited:?}");
        match effect {
            Effect::Write | Effect::IdempotentWrite => ClientError::OutcomeUnknown { message },
            Effect::Read => ClientError::DeadlineExceeded { message },
        }
    }

    /// Whether the client (or a caller) may retry the call as it is: true only when nothing was
    /// written, i.e. [`ClientError::Unavailable`] and [`ClientError::Transport`].
    ///
    /// [`ClientError::OutcomeUnknown`] is not retryable: a retry may duplicate records. A caller
    /// that accepts duplicates (at-least-once) may retry it anyway.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable { .. } | ClientError::Transport { .. }
        )
    }

    /// A short, stable, snake_case name of the variant, for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::NotFound { .. } => "not_found",
            ClientError::InvalidArgument { .. } => "invalid_argument",
            ClientError::AlreadyExists { .. } => "already_exists",
            ClientError::FailedPrecondition { .. } => "failed_precondition",
            ClientError::OutOfRange { .. } => "out_of_range",
            ClientError::Unavailable { .. } => "unavailable",
            ClientError::OutcomeUnknown { .. } => "outcome_unknown",
            ClientError::DeadlineExceeded { .. } => "deadline_exceeded",
            ClientError::ResourceExhausted { .. } => "resource_exhausted",
            ClientError::Transport { .. } => "transport",
            ClientError::InvalidEndpoint { .. } => "invalid_endpoint",
            ClientError::Protocol { .. } => "protocol",
            ClientError::Other { .. } => "other",
        }
    }
}

/// The status message followed by each cause, joined with ": ".
fn error_chain(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = status.source();
    while let Some(error) = source {
        let cause = error.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    const ENDPOINT: &str = "http://127.0.0.1:7001";

    fn status(code: Code, reason: &str, metadata: &[(&str, &str)]) -> Status {
        let metadata: HashMap<String, String> = metadata
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        Status::with_error_details(
            code,
            "server message",
            ErrorDetails::with_error_info(reason, "ordo", metadata),
        )
    }

    /// An unavailable status carries the leader hint from ErrorInfo metadata and is retryable.
    #[test]
    fn unavailable_carries_leader_hint() {
        let error = ClientError::from_status(
            status(
                Code::Unavailable,
                "NO_LEADER",
                &[("leader_id", "2"), ("leader_address", "127.0.0.1:7002")],
            ),
            Effect::Write,
            ENDPOINT,
        );
        match &error {
            ClientError::Unavailable {
                leader_hint,
                leader_address,
                message,
            } => {
                assert_eq!(*leader_hint, Some(2));
                assert_eq!(leader_address.as_deref(), Some("127.0.0.1:7002"));
                assert_eq!(message, "server message");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(error.is_retryable());
        assert!(error.to_string().contains("node 2 at 127.0.0.1:7002"));
    }

    /// NOT_LEADER means nothing was written, so it maps to Unavailable whatever the code.
    #[test]
    fn not_leader_reason_is_unavailable_for_any_code() {
        let error = ClientError::from_status(
            status(
                Code::FailedPrecondition,
                "NOT_LEADER",
                &[("leader_id", "3")],
            ),
            Effect::Write,
            ENDPOINT,
        );
        assert!(matches!(
            error,
            ClientError::Unavailable {
                leader_hint: Some(3),
                ..
            }
        ));
    }

    /// DEADLINE_EXCEEDED with OUTCOME_UNKNOWN is OutcomeUnknown and is not retryable.
    #[test]
    fn outcome_unknown_is_not_retryable() {
        let error = ClientError::from_status(
            status(Code::DeadlineExceeded, "OUTCOME_UNKNOWN", &[]),
            Effect::Write,
            ENDPOINT,
        );
        assert!(matches!(error, ClientError::OutcomeUnknown { .. }));
        assert!(!error.is_retryable());
    }

    /// A bare DEADLINE_EXCEEDED is ambiguous for a write but a plain timeout for a read.
    #[test]
    fn bare_deadline_depends_on_effect() {
        let write =
            ClientError::from_status(Status::deadline_exceeded("late"), Effect::Write, ENDPOINT);
        assert!(matches!(write, ClientError::OutcomeUnknown { .. }));
        let read =
            ClientError::from_status(Status::deadline_exceeded("late"), Effect::Read, ENDPOINT);
        assert!(matches!(read, ClientError::DeadlineExceeded { .. }));
        assert!(!read.is_retryable());
    }

    /// OUT_OF_RANGE exposes the readable range from metadata; unparsable values become None.
    #[test]
    fn out_of_range_carries_range() {
        let error = ClientError::from_status(
            status(
                Code::OutOfRange,
                "OFFSET_OUT_OF_RANGE",
                &[("start_offset", "10"), ("end_offset", "not a number")],
            ),
            Effect::Read,
            ENDPOINT,
        );
        match error {
            ClientError::OutOfRange { start, end, .. } => {
                assert_eq!(start, Some(10));
                assert_eq!(end, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Each remaining code maps to its variant, keeping the ErrorInfo reason.
    #[test]
    fn codes_map_to_variants() {
        let cases: [(Code, &str); 6] = [
            (Code::NotFound, "not_found"),
            (Code::InvalidArgument, "invalid_argument"),
            (Code::AlreadyExists, "already_exists"),
            (Code::FailedPrecondition, "failed_precondition"),
            (Code::ResourceExhausted, "resource_exhausted"),
            (Code::Internal, "other"),
        ];
        for (code, kind) in cases {
            let error =
                ClientError::from_status(status(code, "SOME_REASON", &[]), Effect::Read, ENDPOINT);
            assert_eq!(error.kind(), kind, "{code:?}");
            assert!(!error.is_retryable(), "{code:?}");
        }
        let error = ClientError::from_status(
            status(Code::InvalidArgument, "LIMIT_EXCEEDED", &[]),
            Effect::Write,
            ENDPOINT,
        );
        assert!(matches!(
            error,
            ClientError::InvalidArgument { reason: Some(ref reason), .. } if reason == "LIMIT_EXCEEDED"
        ));
    }

    /// A status without ErrorInfo details still maps by code.
    #[test]
    fn status_without_details_maps_by_code() {
        let error = ClientError::from_status(Status::not_found("no topic"), Effect::Read, ENDPOINT);
        assert!(matches!(error, ClientError::NotFound { reason: None, .. }));
    }

    /// A local connect failure never sent the request, so it is a retryable transport error even
    /// for a write.
    #[test]
    fn connect_error_is_retryable_transport() {
        let connect = tonic::ConnectError(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        let status = Status::from_error(Box::new(connect));
        assert_eq!(status.code(), Code::Unavailable);
        let error = ClientError::from_status(status, Effect::Write, ENDPOINT);
        assert!(matches!(error, ClientError::Transport { .. }), "{error:?}");
        assert!(error.is_retryable());
        assert!(error.to_string().contains("connection refused"));
    }

    /// A local failure other than connecting may have happened after a write was sent.
    #[test]
    fn local_failure_after_send_is_outcome_unknown_for_writes() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let make = || {
            let mut status = Status::unavailable("connection closed");
            status.set_source(std::sync::Arc::new(std::io::Error::new(
                reset.kind(),
                reset.to_string(),
            )));
            status
        };
        let write = ClientError::from_status(make(), Effect::Write, ENDPOINT);
        assert!(
            matches!(write, ClientError::OutcomeUnknown { .. }),
            "{write:?}"
        );
        let read = ClientError::from_status(make(), Effect::Read, ENDPOINT);
        assert!(matches!(read, ClientError::Transport { .. }), "{read:?}");
    }

    /// The channel's own enforcement of the gRPC timeout is a deadline, not a transport error:
    /// an unknown outcome for a write, a non-retryable deadline for a read.
    #[test]
    fn channel_timeout_is_a_deadline() {
        let make = || Status::from_error(Box::new(tonic::TimeoutExpired(())));
        let write = ClientError::from_status(make(), Effect::Write, ENDPOINT);
        assert!(
            matches!(write, ClientError::OutcomeUnknown { .. }),
            "{write:?}"
        );
        let read = ClientError::from_status(make(), Effect::Read, ENDPOINT);
        assert!(
            matches!(read, ClientError::DeadlineExceeded { .. }),
            "{read:?}"
        );
        assert!(!read.is_retryable());
    }

    /// A local timer expiring is OutcomeUnknown for writes and DeadlineExceeded for reads.
    #[test]
    fn local_timeout_depends_on_effect() {
        let waited = std::time::Duration::from_secs(1);
        assert!(matches!(
            ClientError::local_timeout(Effect::Write, ENDPOINT, waited),
            ClientError::OutcomeUnknown { .. }
        ));
        assert!(matches!(
            ClientError::local_timeout(Effect::Read, ENDPOINT, waited),
            ClientError::DeadlineExceeded { .. }
        ));
    }
}
