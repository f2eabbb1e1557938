//! OffsetsForTime: the first offset of a partition whose record timestamp is at or after a time.
//!
//! Each replica keeps a time index (`ordo_raft::RaftNode::time_index_lookup`): the largest
//! record timestamp so far, each time it grows, to the batch that made it grow, written as
//! entries are applied. A lookup seeks the first index row at or after the time (every record
//! before its batch is older), then decodes that batch for the first record at or after the time:
//! O(log n) in the partition's size, plus one batch.
//!
//! A replica that finds an answer gives it: the committed prefix of the log is the same on every
//! replica, so the first match in a prefix is the first match. One that finds none asks the
//! leader (the match may be in records it does not have yet); the leader answers "none" only with
//! an end it confirmed with a quorum.

use std::time::Duration;
use std::time::Instant;

use ordo_raft::GroupId;

use crate::Broker;
use crate::BrokerError;
use crate::NodeId;
use crate::records::decode_batch;

/// How long a leader may take to confirm its end before answering "none".
const CONFIRM_END_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest time a lookup waits to catch up with the metadata before saying a topic is unknown.
const TOPIC_LOOKUP_MIN: Duration = Duration::from_secs(1);
/// Log bytes read to find the record in the batch the index points at.
const BATCH_READ_BYTES: usize = 1 << 20;

/// The answer to an offset-for-time lookup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeOffset {
    /// The first offset whose record's timestamp is at or after the time, and that timestamp;
    /// `None` when no committed record is that recent.
    pub found: Option<(u64, i64)>,
    /// The partition's end as the answering replica knows it.
    pub high_watermark: u64,
}

impl Broker {
    /// The first offset of `partition` of `topic` whose record timestamp is `>= timestamp_ms`.
    pub async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
        forwarded: bool,
    ) -> Result<TimeOffset, BrokerError> {
        let (topic, group) = self
            .partition_fresh(topic, partition, Instant::now() + TOPIC_LOOKUP_MIN)
            .await?;
        let me = self.node_id();
        let leader = self
            .local_view_of_leader(group)
            .or_else(|| self.leader_hint(group));
        if self.state.node.high_watermark(group).is_some() {
            let local = self.lookup_local(group, timestamp_ms).await?;
            if local.found.is_some() || forwarded {
                return Ok(local);
            }
            if leader == Some(me) {
                return match self
                    .state
                    .node
                    .confirmed_high_watermark(group, CONFIRM_END_TIMEOUT)
                    .await
                {
                    Some(_) => self.lookup_local(group, timestamp_ms).await,
                    None => Err(BrokerError::unavailable(
                        format!(
                            "node {me} could not confirm it still leads partition {partition} of {:?}; retry",
                            topic.name
                        ),
                        None,
                    )),
                };
            }
        } else if forwarded {
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
            if node != me && !candidates.contains(&node) {
                candidates.push(node);
            }
        }
        let mut last_error = String::from("no other replica");
        for candidate in candidates {
            match self
                .peer(candidate)
                .offset_for_time(&topic.name, partition, timestamp_ms)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(error) => last_error = error,
            }
        }
        Err(BrokerError::unavailable(
            format!(
                "no replica of partition {partition} of {:?} answered: {last_error}",
                topic.name
            ),
            leader.filter(|leader| *leader != me),
        ))
    }

    /// The lookup on this node's replica.
    async fn lookup_local(
        &self,
        group: GroupId,
        timestamp_ms: i64,
    ) -> Result<TimeOffset, BrokerError> {
        let internal = |error: ordo_raft::ReadError| BrokerError::Internal(error.to_string());
        let base = self
            .state
            .node
            .time_index_lookup(group, timestamp_ms)
            .await
            .map_err(internal)?;
        let Some(base) = base else {
            let high_watermark = self
                .state
                .node
                .high_watermark(group)
                .map(|watch| *watch.borrow())
                .unwrap_or(0);
            return Ok(TimeOffset {
                found: None,
                high_watermark,
            });
        };
        let read = self
            .state
            .node
            .read(group, base, BATCH_READ_BYTES)
            .await
            .map_err(internal)?;
        for (base_offset, count, batch) in &read.batches {
            for record in decode_batch(batch, *base_offset, *count, base, read.high_watermark)? {
                if record.timestamp_ms >= timestamp_ms {
                    return Ok(TimeOffset {
                        found: Some((record.offset, record.timestamp_ms)),
                        high_watermark: read.high_watermark,
                    });
                }
            }
        }
        Ok(TimeOffset {
            found: None,
            high_watermark: read.high_watermark,
        })
    }
}
