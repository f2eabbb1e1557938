//! Leaving and rejoining gracefully.
//!
//! - [`RaftNode::hand_off_leaderships`]: before a node stops (SIGTERM), it hands every
//!   leadership it holds to a caught-up voter and stops standing for election, so a rolling
//!   restart moves each leader once, at once, instead of leaving its groups leaderless for an
//!   election timeout.
//! - [`RaftNode::caught_up`]: whether this node has applied what it knows its groups
//!   committed, for the readiness probe. Partitions send no heartbeats: an idle partition's
//!   follower learns the commit point only with the next write, so right after a restart this
//!   mostly reflects the metadata group.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::Raft;
use openraft::RaftMetrics;
use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftStateMachine;
use tokio::time::Instant;

use super::RaftNode;
use crate::GroupId;
use crate::META_GROUP;
use crate::NodeId;
use crate::types::C;

/// What [`RaftNode::hand_off_leaderships`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandOff {
    /// Leaderships this node held when it started and no longer holds.
    pub handed_off: usize,
    /// Groups it still led at the deadline (no voter to hand them to, or none took them).
    pub still_leading: Vec<GroupId>,
}

/// How often the hand-off looks at who leads.
const POLL: Duration = Duration::from_millis(20);

/// The voter to hand a group's leadership to, among the `alive` ones: caught up ones first
/// (the transfer takes effect once the target has the leader's last entry), then the most
/// advanced; `attempt` rotates among them so a target that does not take it is not asked
/// forever. `None` when no other voter is alive: then no one can take it.
fn hand_off_target(
    metrics: &RaftMetrics<C>,
    me: NodeId,
    alive: &HashSet<NodeId>,
    attempt: usize,
) -> Option<NodeId> {
    let last = metrics.last_log_index.map_or(0, |index| index + 1);
    let matched = crate::group::matched_of(metrics);
    let mut voters: Vec<(bool, u64, NodeId)> = metrics
        .membership_config
        .voter_ids()
        .filter(|voter| *voter != me && alive.contains(voter))
        .map(|voter| {
            let matched = matched.get(&voter).copied().unwrap_or(0);
            (matched >= last, matched, voter)
        })
        .collect();
    voters.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let caught_up = voters.iter().filter(|voter| voter.0).count();
    // Rotate among the caught-up voters while there are any; the others only when none is.
    let pool = if caught_up > 0 {
        caught_up
    } else {
        voters.len()
    };
    (pool > 0).then(|| voters[attempt % pool].2)
}

/// Whether this node leads the group now.
fn leads<SM: RaftStateMachine<C>>(raft: &Raft<C, SM>, me: NodeId) -> bool {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    metrics.state == ServerState::Leader && metrics.current_leader == Some(me)
}

/// Whether a live voter could take `raft`'s leadership from this node.
fn can_hand_off<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    me: NodeId,
    alive: &HashSet<NodeId>,
) -> bool {
    hand_off_target(&raft.metrics().borrow_watched(), me, alive, 0).is_some()
}

/// Asks `raft`, which this node leads, to hand its leadership to a live voter.
async fn ask_hand_off<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    me: NodeId,
    alive: &HashSet<NodeId>,
    attempt: usize,
) {
    let target = hand_off_target(&raft.metrics().borrow_watched(), me, alive, attempt);
    let Some(target) = target else {
        return;
    };
    tracing::debug!(%group, to = target, attempt, "handing leadership off");
    if let Err(error) = raft.trigger().transfer_leader(target).await {
        tracing::warn!(%group, %error, "leader transfer trigger");
    }
}

/// Whether `raft` applied what the cluster had committed at the previous check (`seen`, its
/// cluster-committed index then, kept between checks); records the index now. A node under
/// load is never exactly at the cluster's commit point: what was committed one check ago is
/// the bar.
fn applied_what_was_committed<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    seen: &mut HashMap<GroupId, u64>,
) -> bool {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let applied = metrics.last_applied.as_ref().map_or(0, |id| id.index + 1);
    let committed = metrics
        .cluster_committed
        .as_ref()
        .map_or(0, |id| id.index + 1);
    let bar = seen.insert(group, committed).unwrap_or(committed);
    applied >= bar
}

impl RaftNode {
    /// Records the other nodes the watchdog heard from lately.
    pub(crate) fn set_alive_peers(&self, alive: HashSet<NodeId>) {
        *self
            .host
            .alive_peers
            .lock()
            .expect("alive peers lock is never poisoned") = alive;
    }

    fn alive_peers(&self) -> HashSet<NodeId> {
        self.host
            .alive_peers
            .lock()
            .expect("alive peers lock is never poisoned")
            .clone()
    }

    /// Marks this node as stopping: it stands for no election from now on (its watchdog
    /// starts none, the metadata group's own timers are off), and its pings say so, so that
    /// peers do not hand it a leadership. Idempotent.
    pub fn begin_draining(&self) {
        self.host.draining.store(true, Ordering::Release);
        if let Some(meta) = self.host.meta.get() {
            meta.runtime_config().elect(false);
        }
    }

    /// Whether this node is handing off its leaderships to stop.
    pub fn draining(&self) -> bool {
        self.host.draining.load(Ordering::Acquire)
    }

    /// Hands every leadership this node holds to a caught-up voter, until it leads nothing or
    /// `deadline` passes. From the start, this node no longer stands for election (see
    /// [`Self::begin_draining`]); a leadership handed to it meanwhile (a peer's preferred-leader
    /// balance) is handed on in the next round.
    /// Asks again (another voter in turn) when a group keeps its leader for an election
    /// timeout. Gives up at once on the groups with no other voter alive (the watchdog's
    /// pings): the last node of a cluster to stop does not wait out the deadline.
    pub async fn hand_off_leaderships(&self, deadline: Instant) -> HandOff {
        self.begin_draining();
        let me = self.id();
        let retry = self.options().election_timeout_max;
        let mut asked: HashMap<GroupId, (usize, Instant)> = HashMap::new();
        let mut led_at_start = None;
        loop {
            let meta = self.host.meta.get().filter(|meta| leads(meta, me));
            let partitions: Vec<_> = self
                .partitions()
                .into_iter()
                .filter(|(_, partition)| leads(&partition.raft, me))
                .collect();
            let leading = partitions.len() + usize::from(meta.is_some());
            let led_at_start = *led_at_start.get_or_insert(leading);
            let alive = self.alive_peers();
            let now = Instant::now();
            let mut due = |group: GroupId| -> Option<usize> {
                let entry = asked.entry(group).or_insert((0, now - retry));
                (now.duration_since(entry.1) >= retry).then(|| {
                    let attempt = entry.0;
                    *entry = (attempt + 1, now);
                    attempt
                })
            };
            // Partitions first: the metadata leader goes last, so topic changes made meanwhile
            // still reach a leader that knows every partition's. A group no live voter can take
            // is left as it is.
            let mut orphaned = 0;
            if now < deadline {
                for (group, partition) in &partitions {
                    if !can_hand_off(&partition.raft, me, &alive) {
                        orphaned += 1;
                    } else if let Some(attempt) = due(*group) {
                        ask_hand_off(&partition.raft, *group, me, &alive, attempt).await;
                    }
                }
                if let Some(meta) = meta {
                    if !can_hand_off(meta, me, &alive) {
                        orphaned += 1;
                    } else if orphaned == partitions.len()
                        && let Some(attempt) = due(META_GROUP)
                    {
                        ask_hand_off(meta, META_GROUP, me, &alive, attempt).await;
                    }
                }
            }
            if leading == 0 || now >= deadline || orphaned == leading {
                let mut still_leading: Vec<GroupId> =
                    partitions.iter().map(|(group, _)| *group).collect();
                if meta.is_some() {
                    still_leading.push(META_GROUP);
                }
                return HandOff {
                    handed_off: led_at_start.saturating_sub(leading),
                    still_leading,
                };
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(now))).await;
        }
    }

    /// Whether this node is caught up: the metadata group has a leader, and the metadata group
    /// and every group hosted here applied what the cluster had committed when the caller last
    /// asked (`seen` carries those indexes between calls; the first call sets the bar at what
    /// this node knows). Never while draining.
    pub fn caught_up(&self, seen: &mut HashMap<GroupId, u64>) -> bool {
        if self.draining() {
            return false;
        }
        let Some(meta) = self.host.meta.get() else {
            return false;
        };
        let mut caught_up = meta.metrics().borrow_watched().current_leader.is_some();
        caught_up &= applied_what_was_committed(meta, META_GROUP, seen);
        let partitions = self.partitions();
        seen.retain(|group, _| *group == META_GROUP || partitions.iter().any(|(g, _)| g == group));
        for (group, partition) in &partitions {
            caught_up &= applied_what_was_committed(&partition.raft, *group, seen);
        }
        caught_up
    }
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderId;

    use super::*;

    fn metrics(last: u64, matched: &[(NodeId, u64)], voters: &[NodeId]) -> RaftMetrics<C> {
        let mut metrics = RaftMetrics::new_initial(1);
        metrics.last_log_index = Some(last - 1);
        let membership =
            openraft::Membership::<NodeId, openraft::impls::BasicNode>::new_with_defaults(
                vec![voters.iter().copied().collect()],
                [],
            );
        metrics.membership_config =
            std::sync::Arc::new(crate::types::StoredMembership::new(None, membership));
        let leader = openraft::impls::leader_id_adv::LeaderId::new(1, 1);
        metrics.replication = Some(
            matched
                .iter()
                .map(|(node, matched)| {
                    (
                        *node,
                        Some(openraft::LogId::new(leader.clone(), matched - 1)),
                    )
                })
                .collect(),
        );
        metrics
    }

    /// The caught-up voter is chosen, and attempts rotate among caught-up voters only.
    #[test]
    fn hand_off_prefers_caught_up_voters() {
        let alive: HashSet<NodeId> = [2, 3].into();
        let metrics = metrics(10, &[(2, 10), (3, 7)], &[1, 2, 3]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 0), Some(2));
        assert_eq!(hand_off_target(&metrics, 1, &alive, 1), Some(2));
        let metrics = super::tests::metrics(10, &[(2, 10), (3, 10)], &[1, 2, 3]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 0), Some(2));
        assert_eq!(hand_off_target(&metrics, 1, &alive, 1), Some(3));
        // None caught up: the most advanced first, then the next.
        let metrics = super::tests::metrics(10, &[(2, 4), (3, 7)], &[1, 2, 3]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 0), Some(3));
        assert_eq!(hand_off_target(&metrics, 1, &alive, 1), Some(2));
        // A single voter has no one to hand off to, nor has a leader whose voters are down.
        let metrics = super::tests::metrics(10, &[], &[1]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 0), None);
        let metrics = super::tests::metrics(10, &[(4, 10), (5, 10)], &[1, 4, 5]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 0), None);
        let metrics = super::tests::metrics(10, &[(3, 10), (4, 10)], &[1, 3, 4]);
        assert_eq!(hand_off_target(&metrics, 1, &alive, 1), Some(3));
    }
}
