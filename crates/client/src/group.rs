//! The consumer group calls of [`Client`] (`ordo.v1.ConsumerGroup`), one method per call, and
//! the types they take and return. The member built on them is [`crate::GroupConsumer`].
//!
//! Every group call may be applied twice without harm (a heartbeat, a commit of the same
//! offsets, a leave), so each is retried after any failure within its deadline, like an
//! idempotent produce.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use ordo_proto::v1 as proto;
use ordo_proto::v1::consumer_group_client::ConsumerGroupClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::Client;
use crate::client::timed;
use crate::error::ClientError;
use crate::error::Effect;

/// One partition of one topic.
pub type TopicPartition = (String, u32);

/// A heartbeat, as a member sends it.
#[derive(Debug, Clone, Default)]
pub struct GroupHeartbeat {
    /// The group.
    pub group: String,
    /// The member's id (empty on a join to be given one).
    pub member_id: String,
    /// Its epoch (0 to join).
    pub member_epoch: u32,
    /// The topics it subscribes to.
    pub topics: Vec<String>,
    /// The partitions it owns now.
    pub owned: BTreeSet<TopicPartition>,
    /// The session timeout it asks for (zero: the server's default).
    pub session_timeout: Duration,
}

/// A heartbeat's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The member's id.
    pub member_id: String,
    /// Its epoch, for the next heartbeat and for commits.
    pub member_epoch: u32,
    /// What it may own now.
    pub assigned: BTreeSet<TopicPartition>,
    /// When to heartbeat next.
    pub heartbeat_interval: Duration,
    /// Its session timeout.
    pub session_timeout: Duration,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommittedOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset to read.
    pub offset: u64,
    /// The committer's metadata.
    pub metadata: String,
}

/// A group, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    /// Its name.
    pub name: String,
    /// Members now.
    pub members: u32,
    /// Partitions with a committed offset.
    pub committed_partitions: u32,
}

/// A member of a described group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Its id.
    pub member_id: String,
    /// Its epoch.
    pub member_epoch: u32,
    /// The topics it subscribes to.
    pub topics: Vec<String>,
    /// What it said it owns.
    pub owned: BTreeSet<TopicPartition>,
    /// What it may own now.
    pub assigned: BTreeSet<TopicPartition>,
    /// Its share once every handoff is done.
    pub target: BTreeSet<TopicPartition>,
    /// Its session timeout.
    pub session_timeout: Duration,
}

/// One partition of a described group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// Its committed offset.
    pub committed: Option<u64>,
    /// The committed offset's metadata.
    pub metadata: String,
    /// Its high watermark, when known.
    pub log_end: Option<u64>,
    /// Records past the committed offset, when the end is known.
    pub lag: Option<u64>,
    /// The member owning it (empty: none).
    pub owner: String,
}

/// A described group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupDescription {
    /// Its name.
    pub group: String,
    /// Raised whenever the members or their subscriptions change.
    pub group_epoch: u32,
    /// Members.
    pub members: Vec<GroupMember>,
    /// Partitions.
    pub partitions: Vec<GroupPartition>,
    /// The node leading its coordinator (0: unknown).
    pub coordinator: u64,
}

/// Where [`Client::reset_offsets`] moves a group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first offset of each partition.
    Earliest,
    /// The end of each partition now.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first offset whose record timestamp is at or after this time, in milliseconds since
    /// the Unix epoch (the end when none is).
    Time(i64),
}

/// The answer of [`Client::offset_for_time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TimeOffset {
    /// The first offset whose record timestamp is at or after the time, and that timestamp;
    /// `None` when no committed record is that recent.
    pub found: Option<(u64, i64)>,
    /// The partition's end as the answering replica knows it.
    pub high_watermark: u64,
}

fn partitions_to_wire<'a>(
    partitions: impl IntoIterator<Item = &'a TopicPartition>,
) -> Vec<proto::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, partition) in partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, partitions)| proto::TopicPartitions {
            topic: topic.to_owned(),
            partitions,
        })
        .collect()
}

fn partitions_from_wire(partitions: Vec<proto::TopicPartitions>) -> BTreeSet<TopicPartition> {
    partitions
        .into_iter()
        .flat_map(|topic| {
            let name = topic.topic;
            topic
                .partitions
                .into_iter()
                .map(move |partition| (name.clone(), partition))
        })
        .collect()
}

fn committed_from_wire(offset: proto::CommittedOffset) -> CommittedOffset {
    CommittedOffset {
        topic: offset.topic,
        partition: offset.partition,
        offset: offset.offset,
        metadata: offset.metadata,
    }
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl Client {
    fn groups(&self, channel: Channel) -> ConsumerGroupClient<Channel> {
        ConsumerGroupClient::new(channel)
            .max_decoding_message_size(self.options().response_bytes_max)
    }

    /// Joins (epoch 0) or stays in a group (`ConsumerGroup/Heartbeat`).
    pub async fn group_heartbeat(
        &self,
        heartbeat: &GroupHeartbeat,
    ) -> Result<GroupAssignment, ClientError> {
        self.group_heartbeat_within(heartbeat, self.options().request_timeout)
            .await
    }

    /// [`Client::group_heartbeat`], retries included, within `budget` (a member caps it at what
    /// is left of its session).
    pub(crate) async fn group_heartbeat_within(
        &self,
        heartbeat: &GroupHeartbeat,
        budget: Duration,
    ) -> Result<GroupAssignment, ClientError> {
        let request = proto::HeartbeatRequest {
            group: heartbeat.group.clone(),
            member_id: heartbeat.member_id.clone(),
            member_epoch: heartbeat.member_epoch,
            topics: heartbeat.topics.clone(),
            owned: partitions_to_wire(&heartbeat.owned),
            session_timeout_ms: millis(heartbeat.session_timeout),
        };
        let (response, _) = self
            .call_indexed(None, Effect::IdempotentWrite, budget, |index, timeout| {
                let request = timed(request.clone(), timeout);
                let channel = self.channel(index);
                async move { self.groups(channel).heartbeat(request).await }
            })
            .await?;
        let response = response.into_inner();
        Ok(GroupAssignment {
            member_id: response.member_id,
            member_epoch: response.member_epoch,
            assigned: partitions_from_wire(response.assigned),
            heartbeat_interval: Duration::from_millis(u64::from(response.heartbeat_interval_ms)),
            session_timeout: Duration::from_millis(u64::from(response.session_timeout_ms)),
        })
    }

    /// Leaves a group: the member's partitions move at once.
    pub async fn leave_group(
        &self,
        group: &str,
        member_id: &str,
        member_epoch: u32,
    ) -> Result<(), ClientError> {
        let request = proto::LeaveGroupRequest {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            member_epoch,
        };
        self.call(
            Effect::IdempotentWrite,
            Duration::ZERO,
            |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.groups(channel).leave_group(request).await }
            },
        )
        .await?;
        Ok(())
    }

    /// Commits `(topic, partition) -> next offset` for a group; durable on a quorum when it
    /// returns. `member_id` empty to commit without membership.
    pub async fn commit_offsets(
        &self,
        group: &str,
        member_id: &str,
        member_epoch: u32,
        offsets: &BTreeMap<TopicPartition, u64>,
    ) -> Result<(), ClientError> {
        let request = proto::CommitOffsetsRequest {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            member_epoch,
            offsets: offsets
                .iter()
                .map(|((topic, partition), offset)| proto::OffsetCommit {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: i64::try_from(*offset).unwrap_or(i64::MAX),
                    metadata: String::new(),
                })
                .collect(),
        };
        self.call(
            Effect::IdempotentWrite,
            Duration::ZERO,
            |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.groups(channel).commit_offsets(request).await }
            },
        )
        .await?;
        Ok(())
    }

    /// The committed offsets of a group: of `partitions`, or all when empty.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<Vec<CommittedOffset>, ClientError> {
        let request = proto::FetchOffsetsRequest {
            group: group.to_owned(),
            partitions: partitions_to_wire(partitions),
        };
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.groups(channel).fetch_offsets(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .offsets
            .into_iter()
            .map(committed_from_wire)
            .collect())
    }

    /// Every group of the cluster, by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(proto::ListGroupsRequest {}, timeout);
                async move { self.groups(channel).list_groups(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .groups
            .into_iter()
            .map(|group| GroupSummary {
                name: group.name,
                members: group.members,
                committed_partitions: group.committed_partitions,
            })
            .collect())
    }

    /// A group's members, assignments, and per partition its committed offset and lag.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        let request = proto::DescribeGroupRequest {
            group: group.to_owned(),
        };
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.groups(channel).describe_group(request).await }
            })
            .await?;
        let response = response.into_inner();
        Ok(GroupDescription {
            group: response.group,
            group_epoch: response.group_epoch,
            members: response
                .members
                .into_iter()
                .map(|member| GroupMember {
                    member_id: member.member_id,
                    member_epoch: member.member_epoch,
                    topics: member.topics,
                    owned: partitions_from_wire(member.owned),
                    assigned: partitions_from_wire(member.assigned),
                    target: partitions_from_wire(member.target),
                    session_timeout: Duration::from_millis(u64::from(member.session_timeout_ms)),
                })
                .collect(),
            partitions: response
                .partitions
                .into_iter()
                .map(|partition| GroupPartition {
                    topic: partition.topic,
                    partition: partition.partition,
                    committed: partition.committed,
                    metadata: partition.metadata,
                    log_end: partition.log_end,
                    lag: partition.lag,
                    owner: partition.owner,
                })
                .collect(),
            coordinator: response.coordinator,
        })
    }

    /// Sets a group's offsets of `topic` (its `partitions`, or all when empty) while the group
    /// has no members; returns the offsets now committed.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: ResetTo,
    ) -> Result<Vec<CommittedOffset>, ClientError> {
        let (to, offset, timestamp_ms) = match to {
            ResetTo::Earliest => (proto::ResetTo::Earliest, 0, 0),
            ResetTo::Latest => (proto::ResetTo::Latest, 0, 0),
            ResetTo::Offset(offset) => (
                proto::ResetTo::Offset,
                i64::try_from(offset).unwrap_or(i64::MAX),
                0,
            ),
            ResetTo::Time(timestamp_ms) => (proto::ResetTo::Time, 0, timestamp_ms),
        };
        let request = proto::ResetOffsetsRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: partitions.to_vec(),
            to: to.into(),
            offset,
            timestamp_ms,
        };
        let (response, _) = self
            .call(
                Effect::IdempotentWrite,
                Duration::ZERO,
                |channel, timeout| {
                    let request = timed(request.clone(), timeout);
                    async move { self.groups(channel).reset_offsets(request).await }
                },
            )
            .await?;
        Ok(response
            .into_inner()
            .offsets
            .into_iter()
            .map(committed_from_wire)
            .collect())
    }

    /// The first offset of `partition` of `topic` whose record timestamp is at or after
    /// `timestamp_ms` (`Log/OffsetsForTime`).
    pub async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<TimeOffset, ClientError> {
        let request = proto::OffsetsForTimeRequest {
            topic: topic.to_owned(),
            partition,
            timestamp_ms,
        };
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.log(channel).offsets_for_time(request).await }
            })
            .await?;
        let response = response.into_inner();
        Ok(TimeOffset {
            found: response.offset.zip(response.timestamp_ms),
            high_watermark: response.high_watermark,
        })
    }

    /// Deletes a group with no members, and its offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let request = proto::DeleteGroupRequest {
            group: group.to_owned(),
        };
        self.call(
            Effect::IdempotentWrite,
            Duration::ZERO,
            |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.groups(channel).delete_group(request).await }
            },
        )
        .await?;
        Ok(())
    }
}
