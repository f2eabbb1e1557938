//! Produce: records are validated against [`Limits`], split by partition, encoded into one batch
//! per partition and proposed to that partition's leader, on this node or forwarded to the
//! leader's node (`peer`). The call returns only when every partition's Raft group committed its
//! batch (quorum fsynced). A leader change inside the deadline is retried on the new leader;
//! for a plain produce this may duplicate a batch whose first attempt committed unanswered,
//! while an idempotent one (a `ProducerStamp`, checked first against the producer registry,
//! `producer`) carries its stamp on every attempt, so the partition writes it once. Where the
//! next attempt goes, and what a call that runs out of time says, is decided by
//! `route::AppendRoute`: "outcome unknown" once any attempt may have been written, else
//! "unavailable, nothing written" with the leader hint.
//!
//! Also the serving side of a forwarded append (`handle_forward_produce`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_proto::errors::reason;
use ordo_proto::partition::partition_for_key;
use ordo_raft::Appended;
use ordo_raft::GroupId;
use ordo_raft::ProducerStamp;
use ordo_raft::StampedBatch;
use ordo_raft::WriteError;

use crate::Broker;
use crate::BrokerError;
use crate::Limits;
use crate::Record;
use crate::broker::now_ms;
use crate::metadata::Topic;
use crate::peer::CallError;
use crate::records::encode_batch;
use crate::records::validate_batch;
use crate::route::AppendFailure;
use crate::route::AppendRoute;
use crate::route::Verdict;
use crate::rpc::CallFailure;
use crate::rpc::ForwardOutcome;
use crate::rpc::Refusal;

/// What a committed partition batch answers: the partition, the positions of its records in the
/// request, and where the batch is.
type PartitionAck = (u32, Vec<usize>, Appended);

/// The answer to a produce: `(partition, offset)` per record in request order, and whether it
/// was an idempotent retry of a request written before (nothing written now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    /// Where each record is, in request order.
    pub acks: Vec<(u32, u64)>,
    /// Written before, by an earlier attempt with the same producer sequence.
    pub duplicate: bool,
}

impl Broker {
    /// Appends records; answers `(partition, offset)` per record in request order. With a
    /// producer stamp the request is idempotent: it must name its partition, and a retry with
    /// the same stamp is written at most once.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
        producer: Option<ProducerStamp>,
        timeout: Duration,
    ) -> Result<Produced, BrokerError> {
        let deadline = Instant::now() + timeout;
        let limits = &self.state.options.limits;
        if records.is_empty() {
            return Err(BrokerError::invalid(
                reason::EMPTY_BATCH,
                "a produce request needs at least one record",
            ));
        }
        Limits::check(
            "batch_records_max",
            records.len() as u64,
            limits.batch_records_max,
        )?;
        let mut total = 0u64;
        let horizon =
            (now_ms().max(0) as u64).saturating_add(self.state.options.queues.delay_max_ms);
        for record in &records {
            let size = record.size_bytes();
            Limits::check("record_bytes_max", size, limits.record_bytes_max)?;
            total += size;
            check_deliver_at(record, horizon)?;
        }
        Limits::check("batch_bytes_max", total, limits.batch_bytes_max)?;
        if producer.is_some() && partition.is_none() {
            return Err(BrokerError::invalid(
                reason::PARTITION_REQUIRED,
                "an idempotent produce (one with a producer sequence) must name its partition: sequences count records per partition",
            ));
        }
        let topic = self.topic_fresh(topic, deadline).await?;
        let partitions = topic.partitions.len() as u32;
        if let Some(partition) = partition {
            if partition >= partitions {
                return Err(BrokerError::PartitionNotFound {
                    topic: topic.name.clone(),
                    partition,
                    partitions,
                });
            }
        }
        let _permit = self.state.produce_permits.try_acquire().map_err(|_| {
            BrokerError::ResourceExhausted(format!(
                "{} produce requests in flight on this node (produce_in_flight_max); retry with backoff",
                limits.produce_in_flight_max
            ))
        })?;
        // Under the permit: a producer this node does not know costs a read index at the
        // metadata leader, so requests checking one count toward produce_in_flight_max.
        if let Some(stamp) = producer {
            self.check_producer(stamp, deadline).await?;
        }

        if topic.compacted()
            && let Some(position) = records.iter().position(|record| record.key.is_none())
        {
            return Err(BrokerError::invalid(
                reason::KEY_REQUIRED,
                format!(
                    "record {position} has no key, and topic {:?} is compacted by key (cleanup.policy=compact): give every record a key",
                    topic.name
                ),
            ));
        }
        // Split by partition, remembering each record's position in the request.
        let total_records = records.len();
        let sticky = self.state.round_robin.fetch_add(1, Ordering::Relaxed) % partitions;
        let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<Record>)> = BTreeMap::new();
        for (position, record) in records.into_iter().enumerate() {
            let target = match (partition, &record.key) {
                (Some(partition), _) => partition,
                (None, Some(key)) => partition_for_key(key, partitions),
                (None, None) => sticky,
            };
            let entry = by_partition.entry(target).or_default();
            entry.0.push(position);
            entry.1.push(record);
        }
        let now = now_ms();
        let append_time = topic.append_time();
        let mut appends = Vec::with_capacity(by_partition.len());
        for (partition, (positions, records)) in by_partition {
            let (encoded, max_timestamp_ms) = encode_batch(&records, now, append_time)?;
            let batch = StampedBatch {
                count: records.len() as u32,
                batch: encoded,
                producer,
                max_timestamp_ms,
            };
            let broker = self.clone();
            let topic = topic.clone();
            appends.push(async move {
                let appended = broker.append(&topic, partition, batch, deadline).await?;
                Ok::<_, BrokerError>((partition, positions, appended))
            });
        }
        let results = futures::future::join_all(appends).await;
        combine_acks(results, total_records)
    }

    /// Proposes one batch to a partition's leader, wherever it is, until the deadline.
    async fn append(
        &self,
        topic: &Topic,
        partition: u32,
        batch: StampedBatch,
        deadline: Instant,
    ) -> Result<Appended, BrokerError> {
        let group = GroupId(topic.group(partition));
        let me = self.node_id();
        let replicas = &topic.partitions[partition as usize];
        let first = self
            .leader_hint(group)
            .or_else(|| self.local_view_of_leader(group))
            .unwrap_or(replicas[0]);
        let mut route = AppendRoute::new(replicas, first);
        let mut last_error = String::from("no attempt made");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let target = route.target();
            let failure = if target == me {
                match self
                    .state
                    .node
                    .append(group, batch.clone(), remaining)
                    .await
                {
                    Ok(appended) => {
                        self.set_leader_hint(group, Some(me));
                        return Ok(appended);
                    }
                    Err(WriteError::OutcomeUnknown { reason, .. }) => {
                        return Err(BrokerError::OutcomeUnknown { message: reason });
                    }
                    Err(WriteError::Refused { refusal, .. }) => {
                        return Err(refusal_after(&route, BrokerError::ProducerRefused(refusal)));
                    }
                    Err(error) => {
                        last_error = error.to_string();
                        match error {
                            WriteError::NotLeader { leader, .. } => {
                                AppendFailure::NotLeader(leader)
                            }
                            WriteError::Discarded { leader, .. } => {
                                AppendFailure::LeaderChanged(leader)
                            }
                            _ => AppendFailure::GroupDown,
                        }
                    }
                }
            } else {
                let peer = self.peer(target);
                match peer.forward_produce(group, &batch, remaining).await {
                    Ok(ForwardOutcome::Appended {
                        base_offset,
                        duplicate,
                    }) => {
                        self.set_leader_hint(group, Some(target));
                        return Ok(Appended {
                            base_offset,
                            duplicate,
                        });
                    }
                    Ok(ForwardOutcome::NotLeader(leader)) => {
                        last_error = format!("node {target} does not lead partition {partition}");
                        AppendFailure::NotLeader(leader)
                    }
                    Ok(ForwardOutcome::LeaderChanged(leader)) => {
                        last_error = format!(
                            "leadership of partition {partition} moved while the batch was in flight"
                        );
                        AppendFailure::LeaderChanged(leader)
                    }
                    Err(CallError { failure, message }) => {
                        last_error = message.clone();
                        match failure {
                            CallFailure::OutcomeUnknown => {
                                return Err(BrokerError::OutcomeUnknown { message });
                            }
                            CallFailure::Refused(refusal) => {
                                return Err(refusal_after(&route, refused(refusal, message)));
                            }
                            CallFailure::NothingDone => AppendFailure::Unreachable,
                            CallFailure::MaybeDone => AppendFailure::MaybeDelivered,
                        }
                    }
                }
            };
            let retry = route.failed(failure);
            self.set_leader_hint(group, retry.leader_hint);
            if !retry.pause.is_zero() {
                tokio::time::sleep(
                    retry
                        .pause
                        .min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
            }
        }
        let leader = self.leader_hint(group);
        match route.verdict() {
            Verdict::MaybeWritten => Err(BrokerError::OutcomeUnknown {
                message: format!(
                    "partition {partition} of {:?}: deadline passed after a leader change; last error: {last_error}",
                    topic.name
                ),
            }),
            Verdict::NothingWritten => Err(BrokerError::Unavailable {
                message: format!(
                    "no leader of partition {partition} of {:?} accepted the batch before the deadline; nothing was written; last error: {last_error}",
                    topic.name
                ),
                leader,
                leader_address: leader.and_then(|leader| self.address(leader)),
            }),
        }
    }

    /// Serves a forwarded append: proposes it here if this node leads the group.
    pub async fn handle_forward_produce(
        &self,
        group: u64,
        count: u32,
        batch: Bytes,
        producer: Option<ProducerStamp>,
        timeout: Duration,
    ) -> Result<ForwardOutcome, BrokerError> {
        let group = GroupId(group);
        let max_timestamp_ms = validate_batch(&batch, count, &self.state.options.limits)?;
        let batch = StampedBatch {
            count,
            batch,
            producer,
            max_timestamp_ms,
        };
        match self.state.node.append(group, batch, timeout).await {
            Ok(Appended {
                base_offset,
                duplicate,
            }) => Ok(ForwardOutcome::Appended {
                base_offset,
                duplicate,
            }),
            Err(WriteError::Refused { refusal, .. }) => Err(BrokerError::ProducerRefused(refusal)),
            Err(WriteError::NotLeader { leader, .. }) => Ok(ForwardOutcome::NotLeader(leader)),
            Err(WriteError::Discarded { leader, .. }) => Ok(ForwardOutcome::LeaderChanged(leader)),
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                Err(BrokerError::OutcomeUnknown { message: reason })
            }
            Err(WriteError::GroupNotFound(group)) => Ok(ForwardOutcome::NotLeader(
                self.leader_hint(group)
                    .filter(|leader| *leader != self.node_id()),
            )),
            Err(WriteError::Stopped { reason, .. }) => Err(BrokerError::unavailable(reason, None)),
        }
    }
}

/// A final refusal of a retry says nothing of an earlier attempt that may have been written (e.g.
/// committed on the old leader, then a newer producer epoch fenced the retry): the caller must
/// not hear "nothing written", or it would give the batch's sequence to other records.
fn refusal_after(route: &AppendRoute, error: BrokerError) -> BrokerError {
    match route.verdict() {
        Verdict::NothingWritten => error,
        Verdict::MaybeWritten => BrokerError::OutcomeUnknown {
            message: format!(
                "an earlier attempt may have been written, and the retry was refused: {error}"
            ),
        },
    }
}

/// The leader's refusal of a forwarded batch, for the caller: retrying it elsewhere would be
/// refused the same way (the leader's limits may be stricter than this node's).
fn refused(refusal: Refusal, message: String) -> BrokerError {
    match refusal {
        Refusal::InvalidArgument => BrokerError::invalid(reason::BAD_FORWARDED_BATCH, message),
        Refusal::ResourceExhausted => BrokerError::ResourceExhausted(message),
        Refusal::Producer(refusal) => BrokerError::ProducerRefused(refusal),
    }
}

/// Puts per-partition results back in request order. When some partitions committed and others
/// failed, the call cannot honestly say "nothing was written" (UNAVAILABLE): it reports
/// OUTCOME_UNKNOWN, naming what did commit.
fn combine_acks(
    results: Vec<Result<PartitionAck, BrokerError>>,
    total: usize,
) -> Result<Produced, BrokerError> {
    let committed: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().ok())
        .map(|(partition, positions, appended)| {
            format!(
                "partition {partition} at offsets {}..{}",
                appended.base_offset,
                appended.base_offset + positions.len() as u64
            )
        })
        .collect();
    let mut acks = vec![(0u32, 0u64); total];
    let mut first_error = None;
    let mut maybe_written = None;
    // A request is a duplicate when every batch of it was (an idempotent request has one).
    let mut duplicate = true;
    for result in results {
        match result {
            Ok((partition, positions, appended)) => {
                duplicate &= appended.duplicate;
                for (i, position) in positions.into_iter().enumerate() {
                    acks[position] = (partition, appended.base_offset + i as u64);
                }
            }
            Err(error) => {
                if matches!(
                    error,
                    BrokerError::OutcomeUnknown { .. } | BrokerError::Internal(_)
                ) && maybe_written.is_none()
                {
                    maybe_written = Some(error.clone());
                }
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        None => Ok(Produced { acks, duplicate }),
        // "Nothing written" only when no partition may have been written.
        Some(error) if committed.is_empty() => Err(maybe_written.unwrap_or(error)),
        Some(error) => Err(BrokerError::OutcomeUnknown {
            message: format!(
                "part of the request was committed ({}) and part failed: {error}",
                committed.join(", ")
            ),
        }),
    }
}

/// A record's `ordo-deliver-at` header, when it has one, must be decimal milliseconds since the
/// Unix epoch, no further ahead than `queues.delay_max_ms` (`horizon`).
fn check_deliver_at(record: &Record, horizon: u64) -> Result<(), BrokerError> {
    for (name, value) in &record.headers {
        if name != crate::queue::DELIVER_AT_HEADER {
            continue;
        }
        let at = std::str::from_utf8(value)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                BrokerError::invalid(
                    reason::INVALID_DELIVER_AT,
                    format!(
                        "header {} must be decimal milliseconds since the Unix epoch, not {:?}",
                        crate::queue::DELIVER_AT_HEADER,
                        String::from_utf8_lossy(value)
                    ),
                )
            })?;
        if at > horizon {
            return Err(BrokerError::invalid(
                reason::INVALID_DELIVER_AT,
                format!(
                    "header {} is {at}, past the delay horizon {horizon} (now + queues.delay_max_ms)",
                    crate::queue::DELIVER_AT_HEADER
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> BrokerError {
        BrokerError::unavailable("no leader", None)
    }

    fn at(base_offset: u64) -> Appended {
        Appended {
            base_offset,
            duplicate: false,
        }
    }

    /// Acks come back in request order; a failure with nothing committed keeps its own error
    /// (UNAVAILABLE stays "nothing written"); a partial commit is never reported as UNAVAILABLE.
    #[test]
    fn partial_failures_are_outcome_unknown() {
        let produced = combine_acks(
            vec![Ok((1, vec![0, 2], at(10))), Ok((0, vec![1], at(5)))],
            3,
        )
        .unwrap();
        assert_eq!(produced.acks, vec![(1, 10), (0, 5), (1, 11)]);
        assert!(!produced.duplicate);
        let all_failed = combine_acks(vec![Err(unavailable()), Err(unavailable())], 2);
        assert!(matches!(all_failed, Err(BrokerError::Unavailable { .. })));
        // One partition refused, another of unknown outcome: the call is of unknown outcome,
        // whichever comes first.
        let unknown = || BrokerError::OutcomeUnknown {
            message: "x".into(),
        };
        let mixed = combine_acks(vec![Err(unavailable()), Err(unknown())], 2);
        assert!(matches!(mixed, Err(BrokerError::OutcomeUnknown { .. })));
        // The committed part holds the request's later records: their positions are beyond
        // the count of committed records (this panicked once).
        let partial = combine_acks(vec![Err(unavailable()), Ok((1, vec![2, 3], at(10)))], 4);
        match partial {
            Err(BrokerError::OutcomeUnknown { message }) => {
                assert!(message.contains("partition 1 at offsets 10..12"))
            }
            other => panic!("expected OutcomeUnknown, got {other:?}"),
        }
    }
}
