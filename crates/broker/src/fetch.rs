//! Fetch: served from the local replica when it already holds the offset (every replica only
//! exposes records below its high watermark, which only counts committed records); otherwise
//! forwarded once to the leader (`peer`), which long-polls on its high watermark. The leader's
//! verdict (records, or OUT_OF_RANGE / NOT_FOUND) reaches the caller as the leader gave it; only
//! when the leader cannot be reached does a follower answer from what it knows, and past its own
//! end that is UNAVAILABLE, never OUT_OF_RANGE (its end may be stale).

use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_raft::GroupId;
use tokio::sync::watch;

use crate::Broker;
use crate::BrokerError;
use crate::NodeId;
use crate::StoredRecord;
use crate::records::decode_batch;

/// How long a leader may take to confirm the end of a partition before answering OUT_OF_RANGE.
const CONFIRM_END_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a forwarded fetch may take beyond its long-poll wait.
pub(crate) const FORWARD_FETCH_GRACE: Duration = Duration::from_secs(5);
/// Shortest time a fetch waits to catch up with the metadata before saying a topic is unknown.
const TOPIC_LOOKUP_MIN: Duration = Duration::from_secs(1);

/// Committed records of one partition.
#[derive(Debug, Clone, Default)]
pub struct FetchOutcome {
    /// Records, in offset order.
    pub records: Vec<StoredRecord>,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// First offset in the log.
    pub log_start_offset: u64,
}

/// Why a fetch forwarded to another node has no records.
#[derive(Debug)]
pub(crate) enum ForwardFetchError {
    /// The node answered with its verdict on the request (OUT_OF_RANGE, NOT_FOUND, ...): the
    /// caller gets it as it is.
    Answered(BrokerError),
    /// The node could not be reached, or could not serve the read (no leader, shutting down):
    /// someone else may still answer.
    NotServed(String),
}

impl Broker {
    /// Reads committed records of a partition from `offset`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u64,
        max_wait: Duration,
        forwarded: bool,
    ) -> Result<FetchOutcome, BrokerError> {
        let limits = &self.state.options.limits;
        let max_bytes = if max_bytes == 0 {
            limits.fetch_bytes_max
        } else {
            max_bytes.min(limits.fetch_bytes_max)
        };
        let max_wait = max_wait.min(Duration::from_millis(limits.fetch_wait_ms_max));
        let (topic, group) = self
            .partition_fresh(
                topic,
                partition,
                Instant::now() + max_wait.max(TOPIC_LOOKUP_MIN),
            )
            .await?;
        let me = self.node_id();
        let leader = self
            .local_view_of_leader(group)
            .or_else(|| self.leader_hint(group));
        let request = FetchRequest {
            topic: &topic.name,
            partition,
            offset,
            max_bytes,
            max_wait,
        };
        let Some(mut high_watermark) = self.state.node.high_watermark(group) else {
            if forwarded {
                return Err(BrokerError::unavailable(
                    format!(
                        "node {me} does not replicate partition {partition} of {:?}",
                        topic.name
                    ),
                    leader,
                ));
            }
            let mut candidates: Vec<NodeId> = Vec::new();
            for node in leader
                .into_iter()
                .chain(topic.partitions[partition as usize].iter().copied())
            {
                if !candidates.contains(&node) {
                    candidates.push(node);
                }
            }
            return self.fetch_from_any(&request, &candidates, leader).await;
        };
        let current = *high_watermark.borrow_and_update();
        if offset < current {
            return self.read_local(group, offset, max_bytes).await;
        }
        // At or past this replica's end: the leader decides, and waits for new records.
        let mut leader_error = String::from("no leader known");
        if let Some(leader) = leader.filter(|leader| *leader != me && !forwarded) {
            match self.peer(leader).fetch(&request).await {
                Ok(outcome) => return Ok(outcome),
                Err(ForwardFetchError::Answered(error)) => return Err(error),
                Err(ForwardFetchError::NotServed(error)) => leader_error = error,
            }
        }
        if offset > current {
            // Only the leader knows the end of the partition; a follower's end may be stale, so
            // past it a follower that could not ask the leader says so.
            if leader != Some(me) {
                return Err(BrokerError::unavailable(
                    format!(
                        "node {me} replicates partition {partition} of {:?} up to offset {current} and could not reach its leader to read past it ({leader_error}); retry",
                        topic.name
                    ),
                    leader.filter(|leader| *leader != me),
                ));
            }
            // A node that believes it leads may be deposed (paused, cut off) or just elected and
            // not yet applied: it says OUT_OF_RANGE only with an end it has confirmed with a
            // quorum.
            return match self
                .state
                .node
                .confirmed_high_watermark(group, CONFIRM_END_TIMEOUT)
                .await
            {
                Some(end) if offset > end => Err(BrokerError::OffsetOutOfRange {
                    offset,
                    start: 0,
                    end,
                }),
                Some(_) => self.read_local(group, offset, max_bytes).await,
                None => Err(BrokerError::unavailable(
                    format!(
                        "node {me} could not confirm it still leads partition {partition} of {:?}; retry",
                        topic.name
                    ),
                    None,
                )),
            };
        }
        if !max_wait.is_zero() {
            let _ = tokio::time::timeout(max_wait, high_watermark.changed()).await;
        }
        self.read_local(group, offset, max_bytes).await
    }

    /// Asks each candidate replica in turn (this node replicates none), within one deadline for
    /// all of them.
    async fn fetch_from_any(
        &self,
        request: &FetchRequest<'_>,
        candidates: &[NodeId],
        leader: Option<NodeId>,
    ) -> Result<FetchOutcome, BrokerError> {
        let deadline = Instant::now() + request.max_wait + FORWARD_FETCH_GRACE;
        let mut last_error = String::from("no replica was tried before the deadline");
        for candidate in candidates {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match tokio::time::timeout(remaining, self.peer(*candidate).fetch(request)).await {
                Ok(Ok(outcome)) => return Ok(outcome),
                // Only the end of the log is final here: a replica whose metadata lags may say
                // NOT_FOUND of a topic another knows.
                Ok(Err(ForwardFetchError::Answered(
                    error @ BrokerError::OffsetOutOfRange { .. },
                ))) => {
                    return Err(error);
                }
                Ok(Err(ForwardFetchError::Answered(error))) => last_error = error.to_string(),
                Ok(Err(ForwardFetchError::NotServed(error))) => last_error = error,
                Err(_) => last_error = format!("node {candidate} did not answer in time"),
            }
        }
        Err(BrokerError::unavailable(
            format!(
                "no replica of partition {} of {:?} answered: {last_error}",
                request.partition, request.topic
            ),
            leader,
        ))
    }

    async fn read_local(
        &self,
        group: GroupId,
        offset: u64,
        max_bytes: u64,
    ) -> Result<FetchOutcome, BrokerError> {
        let read = self
            .state
            .node
            .read(group, offset, max_bytes as usize)
            .await
            .map_err(|error| match error {
                ordo_raft::ReadError::BelowStart { start, .. } => BrokerError::OffsetOutOfRange {
                    offset,
                    start,
                    end: self
                        .state
                        .node
                        .log_range(group)
                        .map_or(start, |(_, end)| end),
                },
                error => BrokerError::Internal(error.to_string()),
            })?;
        let log_start_offset = self
            .state
            .node
            .log_range(group)
            .map_or(0, |(start, _)| start);
        let mut records = Vec::new();
        let mut bytes = 0u64;
        'batches: for (base_offset, count, batch) in &read.batches {
            for record in decode_batch(batch, *base_offset, *count, offset, read.high_watermark)? {
                let size = (record.value.len() + record.key.as_ref().map_or(0, Bytes::len)) as u64;
                if !records.is_empty() && bytes + size > max_bytes {
                    break 'batches;
                }
                bytes += size;
                records.push(record);
            }
        }
        Ok(FetchOutcome {
            records,
            high_watermark: read.high_watermark,
            log_start_offset,
        })
    }

    /// The high watermark watch of a local replica, for followers of the tail.
    pub fn local_high_watermark(
        &self,
        topic: &str,
        partition: u32,
    ) -> Option<watch::Receiver<u64>> {
        let topic = self.topic(topic).ok()?;
        self.state
            .node
            .high_watermark(GroupId(topic.group(partition)))
    }
}

/// A fetch as forwarded to another node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchRequest<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) max_bytes: u64,
    pub(crate) max_wait: Duration,
}
