//! The decisions of the broker's retry loops, as pure state machines (in the style of raft-rs:
//! the caller does the I/O and reports what happened; the machine says what to do next).
//!
//! - [`AppendRoute`]: where a produce batch goes next, how long to pause first, and whether a
//!   call that runs out of time may say "nothing was written" or must say "outcome unknown".
//! - [`MetaRoute`]: the same verdict for a metadata command.
//!
//! Nothing here touches a clock, a socket or a task; the tests drive them with made-up events.

use std::time::Duration;

use crate::NodeId;

/// Longest pause between two attempts when no leader is known.
pub(crate) const RETRY_PAUSE_MAX: Duration = Duration::from_millis(250);
/// First pause when no leader is known; doubled per attempt up to [`RETRY_PAUSE_MAX`] (an
/// election takes about one election timeout).
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(10);
/// Pause between two attempts of a metadata command.
pub(crate) const META_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What one attempt to append a batch ended with, when it did not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendFailure {
    /// The target does not lead the group; nothing was proposed. The leader it named.
    NotLeader(Option<NodeId>),
    /// The batch was proposed, then a leader change dropped it: it may still commit. The new
    /// leader named.
    LeaderChanged(Option<NodeId>),
    /// The target could not be reached; nothing was sent.
    Unreachable,
    /// The call may have reached the target before it failed.
    MaybeDelivered,
    /// The target's group is missing or stopped; nothing was proposed.
    GroupDown,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    /// The node to try next.
    pub(crate) target: NodeId,
    /// How long to wait before trying.
    pub(crate) pause: Duration,
    /// The group's leader as now believed (`None`: forget the hint).
    pub(crate) leader_hint: Option<NodeId>,
}

/// How a call that ran out of time ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing was written: UNAVAILABLE, safe to retry.
    NothingWritten,
    /// Some attempt may have been written: OUTCOME_UNKNOWN.
    MaybeWritten,
}

/// The route of one batch to its partition's leader, across attempts.
#[derive(Debug, Clone)]
pub(crate) struct AppendRoute {
    replicas: Vec<NodeId>,
    target: NodeId,
    unreachable: Vec<NodeId>,
    maybe_written: bool,
    attempts: u32,
}

impl AppendRoute {
    /// A route over `replicas` (not empty) starting at `first` (the known leader, else the
    /// preferred replica).
    pub(crate) fn new(replicas: &[NodeId], first: NodeId) -> Self {
        assert!(!replicas.is_empty(), "a partition has at least one replica");
        AppendRoute {
            replicas: replicas.to_vec(),
            target: first,
            unreachable: Vec::new(),
            maybe_written: false,
            attempts: 0,
        }
    }

    /// The node the next attempt goes to.
    pub(crate) fn target(&self) -> NodeId {
        self.target
    }

    /// How the call ends if it runs out of time now.
    pub(crate) fn verdict(&self) -> Verdict {
        if self.maybe_written {
            Verdict::MaybeWritten
        } else {
            Verdict::NothingWritten
        }
    }

    /// Records a failed attempt at [`AppendRoute::target`] and decides the next one.
    pub(crate) fn failed(&mut self, failure: AppendFailure) -> Retry {
        let tried = self.target;
        let hint = match failure {
            AppendFailure::NotLeader(leader) => leader.filter(|leader| *leader != tried),
            AppendFailure::LeaderChanged(leader) => {
                self.maybe_written = true;
                leader
            }
            AppendFailure::Unreachable => {
                self.unreachable.push(tried);
                None
            }
            AppendFailure::MaybeDelivered => {
                self.maybe_written = true;
                self.unreachable.push(tried);
                None
            }
            AppendFailure::GroupDown => None,
        };
        self.attempts += 1;
        // A hint naming a node this call could not reach is stale: rotate instead, or two nodes
        // that both name a dead leader would send the call back and forth.
        if let Some(leader) = hint.filter(|leader| !self.unreachable.contains(leader)) {
            self.target = leader;
            return Retry {
                target: leader,
                pause: Duration::ZERO,
                leader_hint: Some(leader),
            };
        }
        // No usable hint: the next reachable replica after the one tried, after a short,
        // growing pause.
        if self
            .replicas
            .iter()
            .all(|node| self.unreachable.contains(node))
        {
            self.unreachable.clear();
        }
        let position = self
            .replicas
            .iter()
            .position(|node| *node == tried)
            .unwrap_or(0);
        let count = self.replicas.len();
        self.target = (1..=count)
            .map(|step| self.replicas[(position + step) % count])
            .find(|node| !self.unreachable.contains(node))
            .unwrap_or(self.replicas[0]);
        Retry {
            target: self.target,
            pause: (RETRY_PAUSE_MIN * (1 << self.attempts.min(5))).min(RETRY_PAUSE_MAX),
            leader_hint: None,
        }
    }
}

/// What one attempt of a metadata command ended with, when it was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaFailure {
    /// No leader known, or the one asked does not lead: nothing was proposed.
    NoLeader,
    /// Refused or unreachable before anything was proposed.
    NothingDone,
    /// The call may have reached the leader before it failed, or the leader proposed the
    /// command and a leader change dropped it there (it may still commit).
    MaybeDone,
}

/// The attempts of one metadata command.
#[derive(Debug, Clone, Default)]
pub(crate) struct MetaRoute {
    maybe_applied: bool,
}

impl MetaRoute {
    /// Records a failed attempt; answers the pause before the next.
    pub(crate) fn failed(&mut self, failure: MetaFailure) -> Duration {
        if failure == MetaFailure::MaybeDone {
            self.maybe_applied = true;
        }
        META_RETRY_PAUSE
    }

    /// How the command ends if it runs out of time now.
    pub(crate) fn verdict(&self) -> Verdict {
        if self.maybe_applied {
            Verdict::MaybeWritten
        } else {
            Verdict::NothingWritten
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A leader hint is followed at once; a hint naming the node just tried is not.
    #[test]
    fn hints_are_followed_without_pause() {
        let mut route = AppendRoute::new(&[1, 2, 3], 1);
        let retry = route.failed(AppendFailure::NotLeader(Some(3)));
        assert_eq!(
            retry,
            Retry {
                target: 3,
                pause: Duration::ZERO,
                leader_hint: Some(3)
            }
        );
        // Node 3 names itself: no usable hint, rotate to the replica after 3.
        let retry = route.failed(AppendFailure::NotLeader(Some(3)));
        assert_eq!(retry.target, 1);
        assert_eq!(retry.leader_hint, None);
        assert!(retry.pause > Duration::ZERO);
        assert_eq!(route.verdict(), Verdict::NothingWritten);
    }

    /// Two nodes naming an unreachable leader do not send the call back and forth to it.
    #[test]
    fn a_hint_to_an_unreachable_node_rotates() {
        let mut route = AppendRoute::new(&[1, 2, 3], 1);
        assert_eq!(route.failed(AppendFailure::Unreachable).target, 2);
        let retry = route.failed(AppendFailure::NotLeader(Some(1)));
        assert_eq!(retry.target, 3, "node 1 was unreachable: its hint is stale");
        // Node 3 unreachable too: the one left is 2. Then every replica is unreachable: start
        // over from the one after the last tried rather than give up.
        assert_eq!(route.failed(AppendFailure::Unreachable).target, 2);
        assert_eq!(route.failed(AppendFailure::Unreachable).target, 3);
    }

    /// A proposal dropped by a leader change, or a call that may have arrived, makes the call's
    /// end "outcome unknown", whatever follows.
    #[test]
    fn maybe_written_is_never_forgotten() {
        let mut route = AppendRoute::new(&[1, 2, 3], 2);
        route.failed(AppendFailure::LeaderChanged(Some(3)));
        route.failed(AppendFailure::NotLeader(None));
        route.failed(AppendFailure::Unreachable);
        assert_eq!(route.verdict(), Verdict::MaybeWritten);
        let mut route = AppendRoute::new(&[1], 1);
        route.failed(AppendFailure::MaybeDelivered);
        assert_eq!(route.verdict(), Verdict::MaybeWritten);
        let mut meta = MetaRoute::default();
        meta.failed(MetaFailure::NoLeader);
        assert_eq!(meta.verdict(), Verdict::NothingWritten);
        meta.failed(MetaFailure::MaybeDone);
        meta.failed(MetaFailure::NothingDone);
        assert_eq!(meta.verdict(), Verdict::MaybeWritten);
    }

    fn failure() -> impl Strategy<Value = AppendFailure> {
        let node = prop::option::of(1u64..6);
        prop_oneof![
            node.clone().prop_map(AppendFailure::NotLeader),
            node.prop_map(AppendFailure::LeaderChanged),
            Just(AppendFailure::Unreachable),
            Just(AppendFailure::MaybeDelivered),
            Just(AppendFailure::GroupDown),
        ]
    }

    proptest! {
        /// Whatever the failures: the target is a replica or a hint just received, the pause is
        /// bounded, a hinted retry has no pause, and the verdict is "nothing written" exactly
        /// when no failure could have written.
        #[test]
        fn any_failure_sequence_keeps_the_route_sound(
            replicas in prop::collection::btree_set(1u64..6, 1..5),
            failures in prop::collection::vec(failure(), 0..40),
        ) {
            let replicas: Vec<NodeId> = replicas.into_iter().collect();
            let mut route = AppendRoute::new(&replicas, replicas[0]);
            let mut maybe = false;
            for failure in failures {
                maybe |= matches!(
                    failure,
                    AppendFailure::LeaderChanged(_) | AppendFailure::MaybeDelivered
                );
                let retry = route.failed(failure);
                prop_assert!(retry.pause <= RETRY_PAUSE_MAX);
                prop_assert_eq!(retry.target, route.target());
                match retry.leader_hint {
                    Some(leader) => {
                        prop_assert_eq!(leader, retry.target);
                        prop_assert_eq!(retry.pause, Duration::ZERO);
                        let hinted = match failure {
                            AppendFailure::NotLeader(hint) | AppendFailure::LeaderChanged(hint) => hint,
                            _ => None,
                        };
                        prop_assert_eq!(hinted, Some(leader));
                    }
                    None => prop_assert!(replicas.contains(&retry.target)),
                }
                let expected = if maybe { Verdict::MaybeWritten } else { Verdict::NothingWritten };
                prop_assert_eq!(route.verdict(), expected);
            }
        }
    }
}
