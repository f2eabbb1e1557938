//! Idempotent produce: the client's producer session and its per-partition sequences.
//!
//! With [`crate::ClientOptions::idempotence`] on (the default), the client gets a producer id
//! and epoch from the cluster (`Log/InitProducer`) on its first produce, and stamps every
//! produce request with `(id, epoch, sequence)`, where the sequence counts the records this
//! client sent to the partition before. The partition writes a stamped batch once: a retry of
//! the same request, after any failure, is answered with the first write's offsets. So the
//! client retries a produce whatever happened to the last attempt, within the call's deadline.
//!
//! Sequences are never reused for other records: a request whose outcome stayed unknown at its
//! deadline keeps its sequence, and is sent again (same records, same sequence) before the next
//! request to its partition, which therefore learns where the partition stands. Requests of
//! one partition leave one at a time (the batcher's single slot per partition), so sequences
//! reach the partition in order.
//!
//! This module only keeps the state; `produce.rs` sends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::PoisonError;

use ordo_proto::v1 as proto;

use crate::ClientError;
use crate::types::RecordAck;

/// Most partitions whose sequences are kept; a client producing to more is refused a new one
/// (a bound on memory, far above any real producer's fan-out).
const PARTITIONS_MAX: usize = 100_000;

/// A producer id and epoch from `InitProducer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) epoch: u32,
}

impl Session {
    /// The stamp of a request at `sequence`.
    pub(crate) fn stamp(self, sequence: u64) -> proto::ProducerSequence {
        proto::ProducerSequence {
            producer_id: self.id,
            producer_epoch: self.epoch,
            sequence,
        }
    }
}

/// A request whose outcome is unknown: it must be resolved (sent again as it was) before the
/// partition's next request.
#[derive(Debug, Clone)]
pub(crate) struct InDoubt {
    pub(crate) session: Session,
    pub(crate) sequence: u64,
    pub(crate) records: Vec<proto::Record>,
}

#[derive(Debug)]
struct PartitionSequence {
    session: Session,
    next: u64,
    in_doubt: Option<InDoubt>,
}

/// The session and the sequences of every partition produced to.
#[derive(Debug)]
pub(crate) struct Idempotence {
    /// The producer name given to `InitProducer`, if any.
    pub(crate) name: Option<String>,
    session: tokio::sync::Mutex<Option<Session>>,
    partitions: Mutex<HashMap<(Arc<str>, u32), PartitionSequence>>,
}

/// What an answer to an idempotent request says of its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// In the log: acked, or refused as written before (`DUPLICATE_SEQUENCE`).
    Written,
    /// Certainly not written: nothing was sent, or the cluster refused it before writing
    /// (a node answers a refusal after an attempt that may have written as OUTCOME_UNKNOWN).
    NotWritten,
    /// Maybe written.
    Unknown,
}

/// What `answer` says of the records of the request it answers.
pub(crate) fn verdict(answer: &Result<Vec<RecordAck>, ClientError>) -> Verdict {
    match answer {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => Verdict::Written,
        Err(
            ClientError::Unavailable { .. }
            | ClientError::Transport { .. }
            | ClientError::InvalidArgument { .. }
            | ClientError::NotFound { .. }
            | ClientError::FailedPrecondition { .. }
            | ClientError::ResourceExhausted { .. }
            | ClientError::InvalidEndpoint { .. },
        ) => Verdict::NotWritten,
        Err(_) => Verdict::Unknown,
    }
}

/// What a partition's next request must do first.
pub(crate) enum Next {
    /// Send the records at this sequence.
    Send(u64),
    /// Resolve this request first.
    Resolve(InDoubt),
}

impl Idempotence {
    pub(crate) fn new(name: Option<String>) -> Self {
        Self {
            name,
            session: tokio::sync::Mutex::new(None),
            partitions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, u32), PartitionSequence>> {
        // Every critical section leaves the map consistent.
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current session, made by `init` when there is none. Concurrent callers wait for the
    /// same `init`.
    pub(crate) async fn session<F, Fut, E>(&self, init: F) -> Result<Session, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Session, E>>,
    {
        let mut current = self.session.lock().await;
        if let Some(session) = *current {
            return Ok(session);
        }
        let session = init().await?;
        *current = Some(session);
        Ok(session)
    }

    /// The current session, if there is one.
    pub(crate) async fn current(&self) -> Option<Session> {
        *self.session.lock().await
    }

    /// Drops `session` (the cluster forgot it): the next request makes a new one.
    pub(crate) async fn forget(&self, session: Session) {
        let mut current = self.session.lock().await;
        if *current == Some(session) {
            *current = None;
        }
    }

    /// What the next request of `key` under `session` must do. A partition last used by
    /// another session starts over at 0 (its request in doubt, if any, is still resolved under
    /// its own session). `None` when the client already keeps [`PARTITIONS_MAX`] partitions.
    pub(crate) fn next(&self, key: &(Arc<str>, u32), session: Session) -> Option<Next> {
        let mut partitions = self.lock();
        if !partitions.contains_key(key) && partitions.len() >= PARTITIONS_MAX {
            return None;
        }
        let state = partitions.entry(key.clone()).or_insert(PartitionSequence {
            session,
            next: 0,
            in_doubt: None,
        });
        if let Some(in_doubt) = &state.in_doubt {
            return Some(Next::Resolve(in_doubt.clone()));
        }
        if state.session != session {
            state.session = session;
            state.next = 0;
        }
        Some(Next::Send(state.next))
    }

    /// The request at `sequence` of `count` records was written (or refused as written before).
    pub(crate) fn written(
        &self,
        key: &(Arc<str>, u32),
        session: Session,
        sequence: u64,
        count: u64,
    ) {
        if let Some(state) = self.lock().get_mut(key) {
            if state.session == session && state.next == sequence {
                state.next = sequence + count;
            }
        }
    }

    /// The request at `sequence` may or may not have been written: it keeps its sequence and is
    /// resolved before the partition's next request.
    pub(crate) fn in_doubt(&self, key: &(Arc<str>, u32), in_doubt: InDoubt) {
        if let Some(state) = self.lock().get_mut(key) {
            if state.session == in_doubt.session && state.next == in_doubt.sequence {
                state.next = in_doubt.sequence + in_doubt.records.len() as u64;
                state.in_doubt = Some(in_doubt);
            }
        }
    }

    /// The request in doubt of `key` is settled (written, or never to be).
    pub(crate) fn resolved(&self, key: &(Arc<str>, u32)) {
        if let Some(state) = self.lock().get_mut(key) {
            state.in_doubt = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (Arc<str>, u32) {
        (Arc::from("t"), 0)
    }

    const A: Session = Session { id: 1, epoch: 0 };
    const B: Session = Session { id: 2, epoch: 0 };

    fn records(count: usize) -> Vec<proto::Record> {
        vec![proto::Record::default(); count]
    }

    /// Only acks and DUPLICATE_SEQUENCE say "written"; only what was not sent or refused before
    /// writing says "not written"; everything else (a deadline, a broken connection, an answer
    /// that does not add up) is "maybe".
    #[test]
    fn answers_are_judged_conservatively() {
        let message = String::new;
        let refused = Err(ClientError::FailedPrecondition {
            reason: Some("OUT_OF_ORDER_SEQUENCE".to_owned()),
            message: message(),
        });
        assert_eq!(verdict(&Ok(Vec::new())), Verdict::Written);
        assert_eq!(
            verdict(&Err(ClientError::AlreadyExists { message: message() })),
            Verdict::Written
        );
        assert_eq!(verdict(&refused), Verdict::NotWritten);
        for unknown in [
            ClientError::OutcomeUnknown { message: message() },
            ClientError::Protocol { message: message() },
            ClientError::DeadlineExceeded { message: message() },
            ClientError::Other {
                code: tonic::Code::Internal,
                message: message(),
            },
        ] {
            assert_eq!(verdict(&Err(unknown)), Verdict::Unknown);
        }
    }

    /// Sequences count records per partition; a request in doubt keeps its sequence and must be
    /// resolved before the next; a new session starts the partition over at 0.
    #[test]
    fn sequences_advance_and_in_doubt_requests_come_first() {
        let state = Idempotence::new(None);
        let key = key();
        assert!(matches!(state.next(&key, A), Some(Next::Send(0))));
        state.written(&key, A, 0, 3);
        assert!(matches!(state.next(&key, A), Some(Next::Send(3))));
        state.in_doubt(
            &key,
            InDoubt {
                session: A,
                sequence: 3,
                records: records(2),
            },
        );
        match state.next(&key, B) {
            Some(Next::Resolve(in_doubt)) => {
                assert_eq!((in_doubt.session, in_doubt.sequence), (A, 3));
            }
            _ => panic!("the request in doubt comes first, under its own session"),
        }
        state.resolved(&key);
        assert!(matches!(state.next(&key, A), Some(Next::Send(5))));
        assert!(matches!(state.next(&key, B), Some(Next::Send(0))));
        // A stale answer (another sequence) does not move the partition.
        state.written(&key, B, 7, 1);
        assert!(matches!(state.next(&key, B), Some(Next::Send(0))));
    }
}
