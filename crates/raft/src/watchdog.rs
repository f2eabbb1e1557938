//! Node-level failure detection in place of per-group heartbeats (quiescent partitions).
//!
//! With per-group heartbeats, 1,000 idle partitions on 3 nodes cost 10,000 RPCs a second and
//! saturate two cores. Like TiKV's hibernate regions and CockroachDB's quiescence, partition
//! groups here send no heartbeats and never start elections on their own
//! (`enable_heartbeat = false`, `enable_elect = false`). Instead each node pings each peer every
//! heartbeat interval (one RPC per peer, whatever the number of groups), and for every partition
//! group where this node is a follower:
//! - while the group's leader is a node that answered a ping within the election timeout, the
//!   group is healthy;
//! - otherwise (no leader known, or its node silent for the minimum election timeout), after a
//!   random part of the spread between minimum and maximum election timeout the group starts a
//!   pre-vote election (`trigger().elect(true)`), repeated every full randomized timeout until a
//!   leader is known. Pre-vote keeps a wrongly suspected leader's term intact. A peer whose
//!   port refuses connections is gone (crashed or restarting), not paused or cut off, so it
//!   counts as silent at once. A leader's crash is thus replaced within about 1 s with the
//!   default timeouts, a leader cut off or paused within 1-2 s after its last answer.
//!
//! Writes still replicate at once (appends are not heartbeats), and a new leader announces
//! itself with its first (blank) entry. The metadata group keeps ordinary heartbeats: it is one
//! group, and its read index needs them.
//!
//! The decision is a pure function ([`decide`]) so it is unit-tested without a runtime.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::time::Duration;

use ordo_proto::internal::PingRequest;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::GroupId;
use crate::NodeId;
use crate::RaftNode;

/// How many heartbeat intervals a ping may take before its peer counts as silent this round.
/// More than one, so a busy peer's slow answer still counts; a round waits for all its pings,
/// so this also bounds how late the next round starts.
const PING_TIMEOUT_INTERVALS: u32 = 2;

/// What the watchdog sees of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupView {
    /// This node leads the group.
    pub(crate) leading: bool,
    /// The leader this node knows of.
    pub(crate) leader: Option<NodeId>,
    /// This node votes in the group (a learner, e.g. a replica a move is adding, never
    /// stands for election).
    pub(crate) voter: bool,
}

/// What to do about one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The group has a live leader (or is led here): forget any suspicion.
    Healthy,
    /// Suspect the leader; keep waiting until the deadline.
    Wait,
    /// The deadline passed: start a pre-vote election.
    Elect,
}

/// Decides for one group. `leader_alive` says whether a node answered a ping recently;
/// `deadline` is when the current suspicion turns into an election.
pub(crate) fn decide(
    view: GroupView,
    me: NodeId,
    leader_alive: impl Fn(NodeId) -> bool,
    deadline: Option<Instant>,
    now: Instant,
) -> Decision {
    if view.leading || !view.voter {
        return Decision::Healthy;
    }
    match view.leader {
        Some(leader) if leader != me && leader_alive(leader) => Decision::Healthy,
        _ => match deadline {
            Some(deadline) if now >= deadline => Decision::Elect,
            _ => Decision::Wait,
        },
    }
}

impl RaftNode {
    /// Runs the failure detector until `shutdown` turns true. `nodes` tells, each round, every
    /// node of the cluster with its address.
    pub async fn run_watchdog(
        self,
        nodes: impl Fn() -> BTreeMap<NodeId, String> + Send + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let me = self.id();
        let options = self.options().clone();
        let interval = options.heartbeat_interval;
        let alive_within = options.election_timeout_min;
        let mut last_alive: HashMap<NodeId, Instant> = HashMap::new();
        let mut deadlines: HashMap<GroupId, Instant> = HashMap::new();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let nodes = nodes();
            let pings = nodes
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, address)| {
                    let client = self.peers().client(*id, address);
                    async move {
                        let Ok(mut client) = client else {
                            return (*id, Ping::Silent);
                        };
                        let mut request = tonic::Request::new(PingRequest { from: me });
                        request.set_timeout(interval * PING_TIMEOUT_INTERVALS);
                        match client.ping(request).await {
                            Ok(response) if response.get_ref().draining => (*id, Ping::Draining),
                            Ok(_) => (*id, Ping::Alive),
                            // Nothing listens on its port: the process is gone (crashed or
                            // restarting), not paused or cut off. No need to wait out the
                            // election timeout to be sure.
                            Err(status) if is_refused(&status) => (*id, Ping::Refused),
                            Err(_) => (*id, Ping::Silent),
                        }
                    }
                });
            let now = Instant::now();
            let mut draining = HashSet::new();
            for (id, ping) in futures::future::join_all(pings).await {
                match ping {
                    Ping::Alive => {
                        last_alive.insert(id, now);
                    }
                    Ping::Draining => {
                        last_alive.insert(id, now);
                        draining.insert(id);
                    }
                    Ping::Refused => {
                        last_alive.remove(&id);
                    }
                    Ping::Silent => {}
                }
            }
            // Peers that can take a leadership: alive and not stopping themselves.
            self.set_alive_peers(
                last_alive
                    .iter()
                    .filter(|(id, at)| {
                        now.duration_since(**at) < alive_within && !draining.contains(*id)
                    })
                    .map(|(id, _)| *id)
                    .collect(),
            );
            let now = Instant::now();
            let alive = |node: NodeId| {
                last_alive
                    .get(&node)
                    .is_some_and(|at| now.duration_since(*at) < alive_within)
            };
            let groups = self.partition_views();
            deadlines.retain(|group, _| groups.iter().any(|(known, _)| known == group));
            for (group, view) in groups {
                let deadline = deadlines.get(&group).copied();
                match decide(view, me, alive, deadline, now) {
                    Decision::Healthy => {
                        deadlines.remove(&group);
                    }
                    Decision::Wait => {
                        // The leader's node has already been silent for the minimum election
                        // timeout: only the random spread remains, so that the followers do
                        // not all stand at once.
                        deadlines
                            .entry(group)
                            .or_insert_with(|| now + election_jitter(&options));
                    }
                    // A node handing its leaderships off to stop stands for none.
                    Decision::Elect if self.draining() => {}
                    Decision::Elect => {
                        tracing::info!(%group, leader = ?view.leader, "leader unreachable; starting a pre-vote election");
                        self.elect(group).await;
                        deadlines.insert(group, now + election_timeout(&options));
                    }
                }
            }
        }
    }
}

/// What one ping found.
enum Ping {
    Alive,
    /// Alive, but stopping: it takes no leadership.
    Draining,
    /// The connection was refused: nothing listens on the peer's port.
    Refused,
    /// No answer (timeout, reset, unreachable): maybe paused or cut off.
    Silent,
}

/// Whether a failed RPC failed because the peer refused the connection.
fn is_refused(status: &tonic::Status) -> bool {
    use std::error::Error;
    let mut source: Option<&(dyn Error + 'static)> = status.source();
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = error.source();
    }
    status.message().contains("Connection refused")
}

/// Between the minimum and the maximum election timeout: the pause between two elections of a
/// group that has not found a leader yet.
fn election_timeout(options: &crate::RaftOptions) -> Duration {
    options.election_timeout_min + election_jitter(options)
}

/// A random part of the spread between the minimum and maximum election timeout.
fn election_jitter(options: &crate::RaftOptions) -> Duration {
    let spread = options
        .election_timeout_max
        .saturating_sub(options.election_timeout_min);
    spread.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leading: bool, leader: Option<NodeId>) -> GroupView {
        GroupView {
            leading,
            leader,
            voter: true,
        }
    }

    /// A group led here, or by a live node, is healthy; a leaderless group or one led by a
    /// silent node waits for its deadline, then elects.
    #[test]
    fn decisions() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let alive = |node: NodeId| node == 2;
        assert_eq!(
            decide(view(true, Some(1)), 1, alive, None, now),
            Decision::Healthy
        );
        assert_eq!(
            decide(view(false, Some(2)), 1, alive, None, now),
            Decision::Healthy
        );
        assert_eq!(
            decide(view(false, Some(2)), 1, alive, Some(now), later),
            Decision::Healthy
        );
        assert_eq!(
            decide(view(false, Some(3)), 1, alive, None, now),
            Decision::Wait
        );
        assert_eq!(
            decide(view(false, Some(3)), 1, alive, Some(later), now),
            Decision::Wait
        );
        assert_eq!(
            decide(view(false, Some(3)), 1, alive, Some(now), later),
            Decision::Elect
        );
        assert_eq!(
            decide(view(false, None), 1, alive, Some(now), later),
            Decision::Elect
        );
        // A learner never stands.
        let learner = GroupView {
            voter: false,
            ..view(false, None)
        };
        assert_eq!(
            decide(learner, 1, alive, Some(now), later),
            Decision::Healthy
        );
        // A follower that still names itself leader (stale metrics) is not healthy.
        assert_eq!(
            decide(view(false, Some(1)), 1, |_| true, Some(now), later),
            Decision::Elect
        );
    }
}
