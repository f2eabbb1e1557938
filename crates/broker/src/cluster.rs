//! Cluster status: what the cluster reports about its topics, partitions and nodes, merged from
//! every node's own report of the groups it hosts (`Internal/GroupStatus`, through `peer`).

use std::collections::BTreeMap;

use ordo_raft::GroupId;
use ordo_raft::GroupStatus;

use crate::Broker;
use crate::NodeId;
use crate::metadata::Topic;

/// A partition as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// Its leader, when known.
    pub leader: Option<NodeId>,
    /// Replicas; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// The first offset the partition holds.
    pub log_start_offset: u64,
    /// About the bytes of records the partition holds.
    pub bytes: u64,
    /// Raft term.
    pub term: u64,
    /// Entries each replica is behind the leader, when the leader reported.
    pub lag: BTreeMap<NodeId, Option<u64>>,
}

/// A topic as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct TopicView {
    /// Name.
    pub name: String,
    /// Replication factor.
    pub replication_factor: u32,
    /// Config.
    pub config: BTreeMap<String, String>,
    /// Partitions.
    pub partitions: Vec<PartitionView>,
}

/// A node as the cluster reports it.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Node id.
    pub node_id: NodeId,
    /// Advertised address.
    pub address: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Partitions it leads.
    pub leader_count: u32,
    /// Partitions it replicates.
    pub replica_count: u32,
    /// `ACTIVE`, `DRAINING`, or `UNREGISTERED` (static config only).
    pub state: &'static str,
    /// `VOTER` or `LEARNER` of the metadata group as the answering node sees it; `""` if
    /// neither.
    pub metadata_role: &'static str,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The node answering.
    pub answered_by: NodeId,
    /// The metadata group's leader.
    pub metadata_leader: Option<NodeId>,
    /// The metadata group's term.
    pub metadata_term: u64,
    /// Nodes.
    pub nodes: Vec<NodeView>,
    /// Topic count.
    pub topics: u32,
    /// Partition count.
    pub partitions: u32,
    /// Replica moves in progress.
    pub moves: Vec<crate::MoveView>,
}

impl Broker {
    pub(crate) async fn describe(&self, topic: &Topic) -> TopicView {
        let groups: Vec<u64> = (0..topic.partitions.len() as u32)
            .map(|p| topic.group(p))
            .collect();
        let statuses = self.collect_status(&groups).await;
        let partitions = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(partition, replicas)| {
                let group = topic.group(partition as u32);
                let reports: Vec<&GroupStatus> = statuses
                    .values()
                    .filter_map(|list| list.as_ref())
                    .flat_map(|list| list.iter())
                    .filter(|status| status.group == group)
                    .collect();
                merge_partition(partition as u32, replicas, &reports)
            })
            .collect();
        TopicView {
            name: topic.name.clone(),
            replication_factor: topic.replication_factor,
            config: topic.config.clone(),
            partitions,
        }
    }

    /// The cluster as seen from here.
    pub async fn cluster_status(&self) -> ClusterView {
        let state = self.metadata();
        let groups: Vec<u64> = state
            .topics
            .values()
            .flat_map(|topic| (0..topic.partitions.len() as u32).map(|p| topic.group(p)))
            .collect();
        let statuses = self.collect_status(&groups).await;
        let meta = self.state.node.status(ordo_raft::META_GROUP);
        let meta_members = self.state.node.members(ordo_raft::META_GROUP);
        let mut nodes = Vec::new();
        for (node, address) in &self.nodes() {
            let reports = statuses.get(node).and_then(|reports| reports.as_ref());
            let leader_count = reports
                .map(|reports| {
                    reports
                        .iter()
                        .filter(|status| status.leader == Some(*node))
                        .count() as u32
                })
                .unwrap_or(0);
            let replica_count = state
                .topics
                .values()
                .flat_map(|topic| topic.partitions.iter())
                .filter(|replicas| replicas.contains(node))
                .count() as u32;
            let node_state = match state.nodes.get(node) {
                Some(info) if info.draining => "DRAINING",
                Some(_) => "ACTIVE",
                None => "UNREGISTERED",
            };
            let metadata_role = match &meta_members {
                Some(members) if members.all_voters.contains(node) => "VOTER",
                Some(members) if members.learners.contains(node) => "LEARNER",
                _ => "",
            };
            nodes.push(NodeView {
                node_id: *node,
                address: address.clone(),
                reachable: reports.is_some(),
                leader_count,
                replica_count,
                state: node_state,
                metadata_role,
            });
        }
        ClusterView {
            answered_by: self.node_id(),
            metadata_leader: meta.as_ref().and_then(|meta| meta.leader),
            metadata_term: meta.map(|meta| meta.term).unwrap_or(0),
            nodes,
            topics: state.topics.len() as u32,
            partitions: groups.len() as u32,
            moves: state.move_views(),
        }
    }

    /// This node's status of the given groups (all hosted groups when empty).
    pub fn local_status(&self, groups: &[u64]) -> Vec<GroupStatus> {
        let groups: Vec<GroupId> = if groups.is_empty() {
            self.state.node.partition_groups()
        } else {
            groups.iter().map(|group| GroupId(*group)).collect()
        };
        groups
            .into_iter()
            .filter_map(|group| self.state.node.status(group))
            .collect()
    }

    /// Every node's status of `groups`; `None` for a node that did not answer.
    async fn collect_status(&self, groups: &[u64]) -> BTreeMap<NodeId, Option<Vec<GroupStatus>>> {
        let me = self.node_id();
        let calls = self.nodes().into_keys().map(|node| {
            let groups = groups.to_vec();
            async move {
                if node == me {
                    return (node, Some(self.local_status(&groups)));
                }
                (node, self.peer(node).group_status(groups).await)
            }
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }
}

/// Merges replicas' reports of one partition: the leader's own report wins.
fn merge_partition(partition: u32, replicas: &[NodeId], reports: &[&GroupStatus]) -> PartitionView {
    let best = reports.iter().max_by_key(|status| status.term).copied();
    let leader_report = best.and_then(|best| best.leader).and_then(|leader| {
        reports
            .iter()
            .find(|status| status.leader == Some(leader) && !status.matched.is_empty())
            .copied()
    });
    let high_watermark = leader_report
        .map(|report| report.high_watermark)
        .unwrap_or_else(|| {
            reports
                .iter()
                .map(|status| status.high_watermark)
                .max()
                .unwrap_or(0)
        });
    let (log_start_offset, bytes) = leader_report
        .map(|report| (report.log_start_offset, report.bytes))
        .unwrap_or_else(|| {
            (
                reports
                    .iter()
                    .map(|status| status.log_start_offset)
                    .max()
                    .unwrap_or(0),
                reports.iter().map(|status| status.bytes).min().unwrap_or(0),
            )
        });
    let lag = replicas
        .iter()
        .map(|replica| {
            let lag = leader_report.and_then(|report| {
                report
                    .matched
                    .get(replica)
                    .map(|matched| report.last_log_index.saturating_sub(*matched))
            });
            (*replica, lag)
        })
        .collect();
    PartitionView {
        partition,
        leader: best.and_then(|best| best.leader),
        replicas: replicas.to_vec(),
        high_watermark,
        log_start_offset,
        bytes,
        term: best.map(|best| best.term).unwrap_or(0),
        lag,
    }
}
