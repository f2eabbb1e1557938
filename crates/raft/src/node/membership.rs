//! Membership changes, on the group's leader: nodes joining and leaving the metadata group, a
//! partition's replicas moving (learner first, caught up, then a joint-consensus change of the
//! voters: openraft's `add_learner` and `change_membership`).
//!
//! Each call is one step that may be retried: the broker drives them from its loops, looking
//! at [`RaftNode::members`] each time, so a step cut off by a leader change is taken again by
//! the next leader.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::Raft;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use openraft::impls::BasicNode;
use openraft::storage::RaftStateMachine;

use super::RaftNode;
use super::members;
use crate::GroupError;
use crate::GroupId;
use crate::META_GROUP;
use crate::NodeId;
use crate::group::stopped;
use crate::types::C;

/// A group's members as this node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// The voters of the newest config; while a change is in flight (`joint`), of the config
    /// it goes to.
    pub voters: BTreeSet<NodeId>,
    /// Every voter of every config in force (the old and the new one while `joint`).
    pub all_voters: BTreeSet<NodeId>,
    /// Members that replicate but do not vote.
    pub learners: BTreeSet<NodeId>,
    /// A change of voters is in flight (joint consensus).
    pub joint: bool,
    /// The config described is committed (not only appended): a config that is the last one
    /// and committed cannot be rolled back by a leader change.
    pub committed: bool,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// On the leader: how many log entries the group has (last index + 1).
    pub last_log_index: u64,
    /// On the leader: each member's matched entries (last matched index + 1).
    pub matched: BTreeMap<NodeId, u64>,
}

impl Members {
    /// Whether `node` has every entry the leader had when it last reported, minus `slack`.
    pub fn caught_up(&self, node: NodeId, slack: u64) -> bool {
        self.matched
            .get(&node)
            .is_some_and(|matched| matched.saturating_add(slack) >= self.last_log_index)
    }
}

fn members_of<SM: RaftStateMachine<C>>(raft: &Raft<C, SM>) -> Members {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let membership = metrics.membership_config.membership();
    let configs = membership.get_joint_config();
    Members {
        voters: configs.last().cloned().unwrap_or_default(),
        all_voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        joint: configs.len() > 1,
        committed: metrics.committed_membership_config.log_id()
            == metrics.membership_config.log_id(),
        leader: metrics.current_leader,
        last_log_index: metrics.last_log_index.map_or(0, |index| index + 1),
        matched: crate::group::matched_of(&metrics),
    }
}

/// The error of a membership call that did not change anything.
fn refused(group: GroupId) -> impl Fn(RaftError<C, ClientWriteError<C>>) -> GroupError {
    move |error| match error {
        RaftError::Fatal(fatal) => GroupError::Stopped {
            group,
            reason: fatal.to_string(),
        },
        RaftError::APIError(error) => GroupError::Membership {
            group,
            reason: error.to_string(),
        },
    }
}

/// Runs one membership call on the group's leader, within `timeout`. A quiescent leader lets its
/// lease lapse (no heartbeats, see `watchdog`) and refuses membership changes as it refuses
/// writes: one heartbeat round wakes it, then the call is made again.
async fn on_leader<SM, F, Fut>(
    raft: &Raft<C, SM>,
    group: GroupId,
    timeout: Duration,
    call: F,
) -> Result<(), GroupError>
where
    SM: RaftStateMachine<C>,
    F: Fn() -> Fut,
    Fut: std::future::Future<
            Output = Result<
                openraft::raft::ClientWriteResponse<C>,
                RaftError<C, ClientWriteError<C>>,
            >,
        >,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = crate::group::LEASE_RETRY_PAUSE_MIN;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = match tokio::time::timeout(remaining, call()).await {
            Ok(result) => result,
            Err(_) => {
                return Err(GroupError::Membership {
                    group,
                    reason: format!("not committed within {timeout:?}"),
                });
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))
                if forward.leader_id.is_none()
                    && !remaining.is_zero()
                    && raft.metrics().borrow_watched().state == openraft::ServerState::Leader =>
            {
                raft.trigger().heartbeat().await.map_err(stopped(group))?;
                tokio::time::sleep(pause.min(remaining)).await;
                pause = (pause * 2).min(crate::group::LEASE_RETRY_PAUSE_MAX);
            }
            Err(error) => return Err(refused(group)(error)),
        }
    }
}

async fn add_learner_in<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    node: NodeId,
    address: &str,
    timeout: Duration,
) -> Result<(), GroupError> {
    let known = members_of(raft);
    if known.all_voters.contains(&node) || known.learners.contains(&node) {
        return Ok(());
    }
    let basic = BasicNode {
        addr: address.to_string(),
    };
    on_leader(raft, group, timeout, || {
        raft.add_learner(node, basic.clone(), false)
    })
    .await
}

async fn change_in<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    change: ChangeMembers<NodeId, BasicNode>,
    retain: bool,
    timeout: Duration,
) -> Result<(), GroupError> {
    on_leader(raft, group, timeout, || {
        raft.change_membership(change.clone(), retain)
    })
    .await
}

impl RaftNode {
    /// A group's members as this node sees them (the metadata group's for [`META_GROUP`]).
    pub fn members(&self, group: GroupId) -> Option<Members> {
        if group == META_GROUP {
            return self.host.meta.get().map(members_of);
        }
        self.partition(group)
            .map(|partition| members_of(&partition.raft))
    }

    /// Whether the metadata group was formed (this node holds a config with voters): by this
    /// node's own initialization, or by the log a leader sent it.
    pub fn meta_formed(&self) -> bool {
        self.members(META_GROUP)
            .is_some_and(|members| !members.all_voters.is_empty())
    }

    /// Forms the metadata group with `voters`, once in the life of a cluster: only a node that
    /// knows no cluster exists may call it (see the broker's bootstrap).
    pub async fn initialize_meta(
        &self,
        voters: &BTreeMap<NodeId, String>,
    ) -> Result<(), GroupError> {
        let raft = self
            .host
            .meta
            .get()
            .ok_or(GroupError::NotFound(META_GROUP))?;
        tracing::info!(voters = ?voters.keys().collect::<Vec<_>>(), "initializing metadata group");
        raft.initialize(members(voters))
            .await
            .map_err(|error| GroupError::Membership {
                group: META_GROUP,
                reason: error.to_string(),
            })
    }

    /// On a group's leader: makes `node` (at `address`) a learner, unless it is a member
    /// already. Replication to it starts at once.
    pub async fn add_learner(
        &self,
        group: GroupId,
        node: NodeId,
        address: &str,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        if group == META_GROUP {
            let raft = self.host.meta.get().ok_or(GroupError::NotFound(group))?;
            return add_learner_in(raft, group, node, address, timeout).await;
        }
        let partition = self.partition(group).ok_or(GroupError::NotFound(group))?;
        add_learner_in(&partition.raft, group, node, address, timeout).await
    }

    /// On a group's leader: makes `voters` (learners or voters already) the group's voters, by
    /// joint consensus; returns once the new config is committed, or fails after `timeout`.
    /// Voters left out stay learners when `retain`, else leave the group.
    pub async fn change_voters(
        &self,
        group: GroupId,
        voters: BTreeSet<NodeId>,
        retain: bool,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        let change = ChangeMembers::ReplaceAllVoters(voters);
        if group == META_GROUP {
            let raft = self.host.meta.get().ok_or(GroupError::NotFound(group))?;
            return change_in(raft, group, change, retain, timeout).await;
        }
        let partition = self.partition(group).ok_or(GroupError::NotFound(group))?;
        change_in(&partition.raft, group, change, retain, timeout).await
    }

    /// On a group's leader: removes learners (never voters) from the group.
    pub async fn remove_learners(
        &self,
        group: GroupId,
        nodes: BTreeSet<NodeId>,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        let change = ChangeMembers::RemoveNodes(nodes);
        if group == META_GROUP {
            let raft = self.host.meta.get().ok_or(GroupError::NotFound(group))?;
            return change_in(raft, group, change, false, timeout).await;
        }
        let partition = self.partition(group).ok_or(GroupError::NotFound(group))?;
        change_in(&partition.raft, group, change, false, timeout).await
    }
}
