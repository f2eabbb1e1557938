//! The public `ordo.v1.ConsumerGroup` service: wire structs to the broker's group calls and back.

use std::collections::BTreeSet;

use ordo_broker::Committed;
use ordo_broker::ResetTarget;
use ordo_broker::TopicPartition;
use ordo_proto::errors::reason;
use ordo_proto::v1 as pb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::deadline::request_timeout;
use crate::services::Services;
use crate::status::invalid;
use crate::status::to_status;

/// Flattens `TopicPartitions` into a set.
fn partitions_from_wire(partitions: Vec<pb::TopicPartitions>) -> BTreeSet<TopicPartition> {
    partitions
        .into_iter()
        .flat_map(|topic| {
            let name = topic.topic;
            topic
                .partitions
                .into_iter()
                .map(move |partition| TopicPartition {
                    topic: name.clone(),
                    partition,
                })
        })
        .collect()
}

/// Groups a set of partitions by topic, in order.
fn partitions_into_wire<'a>(
    partitions: impl IntoIterator<Item = &'a TopicPartition>,
) -> Vec<pb::TopicPartitions> {
    let mut wire: Vec<pb::TopicPartitions> = Vec::new();
    for tp in partitions {
        match wire.last_mut() {
            Some(last) if last.topic == tp.topic => last.partitions.push(tp.partition),
            _ => wire.push(pb::TopicPartitions {
                topic: tp.topic.clone(),
                partitions: vec![tp.partition],
            }),
        }
    }
    wire
}

fn committed_into_wire(partition: TopicPartition, committed: Committed) -> pb::CommittedOffset {
    pb::CommittedOffset {
        topic: partition.topic,
        partition: partition.partition,
        offset: committed.offset,
        metadata: committed.metadata,
    }
}

impl Services {
    fn group_timeout<T>(&self, request: &Request<T>) -> Option<std::time::Duration> {
        Some(request_timeout(
            request.metadata(),
            self.broker.groups_config().call_timeout(),
        ))
    }
}

#[tonic::async_trait]
impl pb::consumer_group_server::ConsumerGroup for Services {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let request = request.into_inner();
        let heartbeat = ordo_broker::Heartbeat {
            group: request.group,
            member_id: request.member_id,
            epoch: request.member_epoch,
            subscriptions: request.topics.into_iter().collect(),
            owned: partitions_from_wire(request.owned),
            session_timeout_ms: u64::from(request.session_timeout_ms),
        };
        let assignment = self
            .broker
            .group_heartbeat(heartbeat, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            member_id: assignment.member_id,
            member_epoch: assignment.epoch,
            assigned: partitions_into_wire(&assignment.assigned),
            heartbeat_interval_ms: assignment.heartbeat_interval_ms.min(u64::from(u32::MAX)) as u32,
            session_timeout_ms: assignment.session_timeout_ms.min(u64::from(u32::MAX)) as u32,
        }))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let request = request.into_inner();
        self.broker
            .leave_group(
                &request.group,
                &request.member_id,
                request.member_epoch,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let request = request.into_inner();
        let offsets = request
            .offsets
            .into_iter()
            .map(|commit| {
                (
                    commit.topic,
                    commit.partition,
                    commit.offset,
                    commit.metadata,
                )
            })
            .collect();
        self.broker
            .commit_offsets(
                &request.group,
                &request.member_id,
                request.member_epoch,
                offsets,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let request = request.into_inner();
        let partitions = partitions_from_wire(request.partitions);
        let offsets = self
            .broker
            .fetch_offsets(&request.group, &partitions, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::FetchOffsetsResponse {
            offsets: offsets
                .into_iter()
                .map(|(partition, committed)| committed_into_wire(partition, committed))
                .collect(),
        }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let groups = self.broker.list_groups(timeout).await.map_err(to_status)?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|group| pb::GroupSummary {
                    name: group.name,
                    members: group.members,
                    committed_partitions: group.committed_partitions,
                })
                .collect(),
        }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let group = request.into_inner().group;
        let description = self
            .broker
            .describe_group(&group, timeout)
            .await
            .map_err(to_status)?;
        let state = &description.state;
        let members = state
            .members
            .iter()
            .map(|(id, member)| pb::GroupMemberDescription {
                member_id: id.clone(),
                member_epoch: member.epoch,
                topics: member.subscriptions.iter().cloned().collect(),
                owned: partitions_into_wire(&member.owned),
                assigned: partitions_into_wire(&member.assigned),
                target: partitions_into_wire(state.target.get(id).into_iter().flatten()),
                session_timeout_ms: member.session_timeout_ms.min(u64::from(u32::MAX)) as u32,
            })
            .collect();
        let partitions = description
            .partitions
            .into_iter()
            .map(|partition| {
                let committed = partition.committed.as_ref().map(|c| c.offset);
                pb::GroupPartitionDescription {
                    topic: partition.partition.topic,
                    partition: partition.partition.partition,
                    committed,
                    metadata: partition.committed.map(|c| c.metadata).unwrap_or_default(),
                    log_end: partition.log_end,
                    lag: partition
                        .log_end
                        .map(|end| end.saturating_sub(committed.unwrap_or(0))),
                    owner: partition.owner,
                }
            })
            .collect();
        Ok(Response::new(pb::DescribeGroupResponse {
            group,
            group_epoch: state.group_epoch,
            members,
            partitions,
            coordinator: description.coordinator.unwrap_or(0),
        }))
    }

    async fn reset_offsets(
        &self,
        request: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        let timeout = self.group_timeout(&request);
        let request = request.into_inner();
        let to = match pb::ResetTo::try_from(request.to) {
            Ok(pb::ResetTo::Earliest) => ResetTarget::Earliest,
            Ok(pb::ResetTo::Latest) => ResetTarget::Latest,
            Ok(pb::ResetTo::Offset) => {
                let offset = u64::try_from(request.offset).map_err(|_| {
                    invalid(
                        reason::INVALID_OFFSET,
                        format!("offset {} is negative", request.offset),
                    )
                })?;
                ResetTarget::Offset(offset)
            }
            Ok(pb::ResetTo::Time) => ResetTarget::Time(request.timestamp_ms),
            _ => {
                return Err(invalid(
                    reason::INVALID_RESET,
                    "say where to reset: RESET_TO_EARLIEST, RESET_TO_LATEST, RESET_TO_OFFSET or RESET_TO_TIME",
                ));
            }
        };
        let offsets = self
            .broker
            .reset_offsets(
                &request.group,
                &request.topic,
                &request.partitions,
                to,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ResetOffsetsResponse {
            offsets: offsets
                .into_iter()
                .map(|(partition, offset)| {
                    committed_into_wire(
                        partition,
                        Committed {
                            offset,
                            metadata: String::new(),
                        },
                    )
                })
                .collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let timeout = self.group_timeout(&request);
        self.broker
            .delete_group(&request.into_inner().group, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}
