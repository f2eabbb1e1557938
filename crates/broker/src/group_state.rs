//! Consumer groups, the pure state of one group. The coordinator (`coordinator.rs`) applies these
//! commands through its shard's Raft group, so `apply` is deterministic: no clock, no
//! randomness, no I/O, and ordered maps only. Liveness is not replicated: the coordinator's
//! leader times sessions out itself and proposes [`GroupCommand::Expire`] naming the members.
//!
//! The protocol is KIP-848's, broker-side:
//! - A member joins with a heartbeat at epoch 0 (with the id it picked, or none to be given one)
//!   and gets its member id and epoch; every later heartbeat carries both, its subscribed topics
//!   and the partitions it owns now. A heartbeat from an older epoch than the member's current or
//!   previous one (the answer to its last heartbeat may have been lost) is fenced
//!   (`FENCED_MEMBER`); one from a member the group does not know (expired, left, never joined)
//!   is `UNKNOWN_MEMBER`: the member must join again. A member that joins again with its id at
//!   epoch 0 has released everything it owned.
//! - The coordinator keeps a **target assignment**, balanced and sticky: recomputed when the
//!   members or their subscriptions change, it moves as few partitions as it can (each member
//!   keeps what it has up to its share; only the excess and the unowned partitions move).
//! - Handoff is **incremental**: a member is given a partition of its target only once no other
//!   member still owns it (the old owner released it in a heartbeat, or its session expired).
//!   A member is asked to release what left its target. No stop-the-world rebalance.
//! - Committed offsets never go backward (unless reset explicitly), and only a current member
//!   (its current epoch, for partitions it was given) or a caller without membership (static
//!   use, member id empty) may commit.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::Serialize;

/// One partition of one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

/// One member as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its epoch: raised each time the member is given a new assignment.
    pub epoch: u32,
    /// Its epoch before the last raise (a heartbeat whose answer was lost carries it).
    pub previous_epoch: u32,
    /// The topics it subscribes to.
    pub subscriptions: BTreeSet<String>,
    /// What it holds, as its last heartbeat said (only partitions it had been given count).
    pub owned: BTreeSet<TopicPartition>,
    /// What the last answer allowed it to own: it may hold these by now without having said so.
    pub assigned: BTreeSet<TopicPartition>,
    /// A member silent for this long is expired (milliseconds; it asked for it, within the
    /// coordinator's bounds).
    pub session_timeout_ms: u64,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next offset to read.
    pub offset: u64,
    /// The committer's free-form metadata.
    pub metadata: String,
}

/// The whole state of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Raised whenever the members or their subscriptions change.
    pub group_epoch: u32,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// The target assignment, by member id.
    pub target: BTreeMap<String, BTreeSet<TopicPartition>>,
    /// Committed offsets.
    pub offsets: BTreeMap<TopicPartition, Committed>,
    /// Partitions per subscribed topic when the target was last computed: a change (a topic
    /// created, deleted or grown) recomputes it.
    pub partitions: BTreeMap<String, u32>,
    /// The next given member id's number (given ids are `m-<n>`, unique in the group).
    next_member: u64,
    /// The last member epoch handed out: epochs come from this one counter, so no epoch is ever
    /// handed out twice in a group (a removed member that joins again cannot meet an epoch its
    /// old instance holds).
    last_epoch: u32,
}

/// Commands of a group, as proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupCommand {
    /// A member's heartbeat; `epoch` 0 to join (with `member_id` empty to be given an id).
    Heartbeat {
        /// The member's id (empty to be given one).
        member_id: String,
        /// The member's epoch (0 to join).
        epoch: u32,
        /// The topics it subscribes to.
        subscriptions: BTreeSet<String>,
        /// The partitions it owns now.
        owned: BTreeSet<TopicPartition>,
        /// Partitions per topic, as the proposer's metadata has them.
        topics: BTreeMap<String, u32>,
        /// The session timeout the member asks for (validated by the proposer).
        session_timeout_ms: u64,
    },
    /// A member leaves.
    Leave {
        /// The member's id.
        member_id: String,
        /// The member's epoch.
        epoch: u32,
        /// Partitions per topic.
        topics: BTreeMap<String, u32>,
    },
    /// Members the coordinator's leader found silent past their session timeout are removed
    /// (those still at the epoch it saw).
    Expire {
        /// `(member id, epoch)`.
        members: Vec<(String, u32)>,
        /// Partitions per topic.
        topics: BTreeMap<String, u32>,
    },
    /// Commit offsets; `member_id` empty for a caller without membership.
    Commit {
        /// The member's id, or empty.
        member_id: String,
        /// The member's epoch (ignored without a member id).
        epoch: u32,
        /// `(partition, next offset, metadata)`.
        offsets: Vec<(TopicPartition, u64, String)>,
    },
    /// Set offsets explicitly (any direction); refused while the group has members.
    Reset {
        /// `(partition, next offset)`.
        offsets: Vec<(TopicPartition, u64)>,
    },
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupAnswer {
    /// A heartbeat's answer: the member's id and epoch, and the partitions it may own now.
    Assignment {
        /// The member's id.
        member_id: String,
        /// The member's epoch.
        epoch: u32,
        /// What it may own now (its target, less what others still own).
        assigned: BTreeSet<TopicPartition>,
    },
    /// Done.
    Ok,
    /// The member's epoch is older than the group's record of it: it must join again.
    FencedMember {
        /// The member's current epoch.
        current_epoch: u32,
    },
    /// The group does not know the member (expired, left or never joined).
    UnknownMember,
    /// A commit would move these offsets backward; nothing was committed.
    Backward(Vec<(TopicPartition, u64)>),
    /// A reset while the group has members.
    NotEmpty,
    /// A member's commit names partitions it was not given.
    NotAssigned(Vec<TopicPartition>),
}

impl GroupState {
    /// Applies one command. Deterministic.
    pub fn apply(&mut self, command: GroupCommand) -> GroupAnswer {
        match command {
            GroupCommand::Heartbeat {
                member_id,
                epoch,
                subscriptions,
                owned,
                topics,
                session_timeout_ms,
            } => self.heartbeat(
                member_id,
                epoch,
                subscriptions,
                owned,
                &topics,
                session_timeout_ms,
            ),
            GroupCommand::Leave {
                member_id,
                epoch,
                topics,
            } => match self.check_member(&member_id, epoch) {
                Err(answer) => answer,
                Ok(()) => {
                    self.members.remove(&member_id);
                    self.rebalance(&topics);
                    GroupAnswer::Ok
                }
            },
            GroupCommand::Expire { members, topics } => {
                let mut expired = false;
                for (id, epoch) in members {
                    // A member that heartbeated into a new epoch since the leader looked is
                    // alive.
                    if self
                        .members
                        .get(&id)
                        .is_some_and(|member| member.epoch == epoch)
                    {
                        self.members.remove(&id);
                        expired = true;
                    }
                }
                if expired {
                    self.rebalance(&topics);
                }
                GroupAnswer::Ok
            }
            GroupCommand::Commit {
                member_id,
                epoch,
                offsets,
            } => {
                if !member_id.is_empty() {
                    let Some(member) = self.members.get(&member_id) else {
                        return GroupAnswer::UnknownMember;
                    };
                    if epoch != member.epoch {
                        return GroupAnswer::FencedMember {
                            current_epoch: member.epoch,
                        };
                    }
                    let foreign: Vec<TopicPartition> = offsets
                        .iter()
                        .map(|(partition, _, _)| partition)
                        .filter(|partition| {
                            !member.owned.contains(*partition)
                                && !member.assigned.contains(*partition)
                        })
                        .cloned()
                        .collect();
                    if !foreign.is_empty() {
                        return GroupAnswer::NotAssigned(foreign);
                    }
                }
                let backward: Vec<(TopicPartition, u64)> = offsets
                    .iter()
                    .filter_map(|(partition, offset, _)| {
                        let committed = self.offsets.get(partition)?;
                        (*offset < committed.offset).then(|| (partition.clone(), committed.offset))
                    })
                    .collect();
                if !backward.is_empty() {
                    return GroupAnswer::Backward(backward);
                }
                for (partition, offset, metadata) in offsets {
                    self.offsets
                        .insert(partition, Committed { offset, metadata });
                }
                GroupAnswer::Ok
            }
            GroupCommand::Reset { offsets } => {
                if !self.members.is_empty() {
                    return GroupAnswer::NotEmpty;
                }
                for (partition, offset) in offsets {
                    self.offsets.insert(
                        partition,
                        Committed {
                            offset,
                            metadata: String::new(),
                        },
                    );
                }
                GroupAnswer::Ok
            }
        }
    }

    /// Whether `epoch` is the member's current or previous one (the answer that raised it may
    /// have been lost).
    fn check_member(&self, member_id: &str, epoch: u32) -> Result<(), GroupAnswer> {
        match self.members.get(member_id) {
            None => Err(GroupAnswer::UnknownMember),
            Some(member) if epoch == member.epoch || epoch == member.previous_epoch => Ok(()),
            // A newer epoch than the group gave is not the member's to pick; an older one is a
            // zombie's.
            Some(member) => Err(GroupAnswer::FencedMember {
                current_epoch: member.epoch,
            }),
        }
    }

    fn heartbeat(
        &mut self,
        member_id: String,
        epoch: u32,
        subscriptions: BTreeSet<String>,
        owned: BTreeSet<TopicPartition>,
        topics: &BTreeMap<String, u32>,
        session_timeout_ms: u64,
    ) -> GroupAnswer {
        let mut joined = false;
        let member_id = if epoch == 0 {
            // A join, or a member joining again with its id: it owns nothing now.
            let id = if member_id.is_empty() {
                loop {
                    let id = format!("m-{}", self.next_member);
                    self.next_member += 1;
                    if !self.members.contains_key(&id) {
                        break id;
                    }
                }
            } else {
                member_id
            };
            self.members.insert(
                id.clone(),
                Member {
                    epoch: 0,
                    previous_epoch: 0,
                    subscriptions: BTreeSet::new(),
                    owned: BTreeSet::new(),
                    assigned: BTreeSet::new(),
                    session_timeout_ms,
                },
            );
            joined = true;
            id
        } else {
            match self.members.get(&member_id) {
                None => return GroupAnswer::UnknownMember,
                Some(member) if epoch == member.epoch || epoch == member.previous_epoch => {}
                Some(member) => {
                    return GroupAnswer::FencedMember {
                        current_epoch: member.epoch,
                    };
                }
            }
            member_id
        };
        let member = self
            .members
            .get_mut(&member_id)
            .expect("joined or checked above");
        member.session_timeout_ms = session_timeout_ms;
        // A member holds only what it was given: anything else it claims is ignored. What it
        // no longer claims it has released; what it still claims after it was taken from its
        // assignment it still holds (the answer that took it may have been lost).
        let given: BTreeSet<TopicPartition> =
            member.owned.union(&member.assigned).cloned().collect();
        member.owned = owned.intersection(&given).cloned().collect();
        let changed = joined || member.subscriptions != subscriptions;
        member.subscriptions = subscriptions;
        let partitions = self.subscribed_partitions(topics);
        if changed || partitions != self.partitions {
            self.rebalance(topics);
        }
        let assigned = self.assignable(&member_id);
        let member = self.members.get_mut(&member_id).expect("still a member");
        if assigned != member.assigned || joined {
            self.last_epoch += 1;
            // After a join no earlier epoch is the member's: an old instance's is fenced.
            member.previous_epoch = if joined {
                self.last_epoch
            } else {
                member.epoch
            };
            member.epoch = self.last_epoch;
        }
        member.assigned = assigned.clone();
        GroupAnswer::Assignment {
            member_id,
            epoch: member.epoch,
            assigned,
        }
    }

    /// The partitions `member` may own now: its target, less those another member may still
    /// hold (it holds them, or was allowed to take them and has not said it let them go).
    fn assignable(&self, member: &str) -> BTreeSet<TopicPartition> {
        let target = self.target.get(member).cloned().unwrap_or_default();
        target
            .into_iter()
            .filter(|partition| {
                !self.members.iter().any(|(id, other)| {
                    id != member
                        && (other.owned.contains(partition) || other.assigned.contains(partition))
                })
            })
            .collect()
    }

    /// Recomputes the target assignment: balanced (per topic, member shares differ by at most
    /// one among the members subscribed to it) and sticky (a member keeps its targets up to its
    /// share; only the excess and unowned partitions move).
    /// Partitions per topic some member subscribes to.
    fn subscribed_partitions(&self, topics: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
        self.members
            .values()
            .flat_map(|member| member.subscriptions.iter())
            .filter_map(|topic| Some((topic.clone(), *topics.get(topic)?)))
            .collect()
    }

    /// Whether the group holds nothing: no member, no committed offset.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.offsets.is_empty()
    }

    fn rebalance(&mut self, topics: &BTreeMap<String, u32>) {
        self.group_epoch += 1;
        self.partitions = self.subscribed_partitions(topics);
        let mut target: BTreeMap<String, BTreeSet<TopicPartition>> = self
            .members
            .keys()
            .map(|id| (id.clone(), BTreeSet::new()))
            .collect();
        let subscribed: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|member| member.subscriptions.iter())
            .collect();
        for topic in subscribed {
            let Some(&partitions) = topics.get(topic) else {
                continue;
            };
            let members: Vec<&String> = self
                .members
                .iter()
                .filter(|(_, member)| member.subscriptions.contains(topic))
                .map(|(id, _)| id)
                .collect();
            let count = members.len() as u32;
            let (base, extra) = (partitions / count, partitions % count);
            // Shares: the first `extra` members (those keeping the most) get one more.
            let mut kept: BTreeMap<&String, Vec<u32>> = BTreeMap::new();
            for member in &members {
                let previous = self.target.get(*member);
                let mut mine: Vec<u32> = (0..partitions)
                    .filter(|partition| {
                        previous.is_some_and(|set| {
                            set.contains(&TopicPartition {
                                topic: topic.clone(),
                                partition: *partition,
                            })
                        })
                    })
                    .collect();
                mine.sort_unstable();
                kept.insert(member, mine);
            }
            let mut order: Vec<&String> = members.clone();
            order.sort_by_key(|member| (std::cmp::Reverse(kept[member].len()), (*member).clone()));
            let mut share: BTreeMap<&String, u32> = BTreeMap::new();
            for (rank, member) in order.iter().enumerate() {
                share.insert(member, base + u32::from((rank as u32) < extra));
            }
            let mut taken = BTreeSet::new();
            for member in &members {
                let quota = share[member] as usize;
                for partition in kept[member].iter().take(quota) {
                    taken.insert(*partition);
                    target
                        .get_mut(*member)
                        .expect("every member has a target")
                        .insert(TopicPartition {
                            topic: topic.clone(),
                            partition: *partition,
                        });
                }
            }
            let mut free = (0..partitions).filter(|partition| !taken.contains(partition));
            for member in &order {
                let have = target[*member]
                    .iter()
                    .filter(|tp| tp.topic == *topic)
                    .count();
                for _ in have..share[member] as usize {
                    if let Some(partition) = free.next() {
                        target
                            .get_mut(*member)
                            .expect("every member has a target")
                            .insert(TopicPartition {
                                topic: topic.clone(),
                                partition,
                            });
                    }
                }
            }
        }
        self.target = target;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SESSION_MS: u64 = 10_000;

    fn topics(partitions: u32) -> BTreeMap<String, u32> {
        BTreeMap::from([("t".to_owned(), partitions)])
    }

    fn heartbeat(
        member_id: &str,
        epoch: u32,
        owned: &BTreeSet<TopicPartition>,
        partitions: u32,
    ) -> GroupCommand {
        GroupCommand::Heartbeat {
            member_id: member_id.to_owned(),
            epoch,
            subscriptions: BTreeSet::from(["t".to_owned()]),
            owned: owned.clone(),
            topics: topics(partitions),
            session_timeout_ms: SESSION_MS,
        }
    }

    /// A simulated member: what it owns, acting on each answer at once.
    #[derive(Debug, Clone, Default)]
    struct Client {
        id: String,
        epoch: u32,
        owned: BTreeSet<TopicPartition>,
    }

    impl Client {
        /// One heartbeat (`_now_ms` only orders the test's steps: liveness is the leader's).
        fn beat(&mut self, state: &mut GroupState, partitions: u32, _now_ms: u64) -> GroupAnswer {
            let answer = state.apply(heartbeat(&self.id, self.epoch, &self.owned, partitions));
            if let GroupAnswer::Assignment {
                member_id,
                epoch,
                assigned,
            } = &answer
            {
                self.id = member_id.clone();
                self.epoch = *epoch;
                self.owned = assigned.clone();
            }
            answer
        }
    }

    fn owners(clients: &[Client]) -> BTreeMap<TopicPartition, usize> {
        let mut owners = BTreeMap::new();
        for client in clients {
            for partition in &client.owned {
                *owners.entry(partition.clone()).or_insert(0) += 1;
            }
        }
        owners
    }

    /// Three members over six partitions converge to two each, with no partition owned by two
    /// members at any moment; a fourth member gets a partition only once its owner released
    /// it, and no other partition moves.
    #[test]
    fn members_converge_to_a_balanced_assignment_without_double_ownership() {
        let mut state = GroupState::default();
        let mut clients = vec![Client::default(), Client::default(), Client::default()];
        for round in 0..6u64 {
            for index in 0..clients.len() {
                clients[index].beat(&mut state, 6, round * 100);
                assert!(owners(&clients).values().all(|count| *count == 1));
            }
        }
        let counts: Vec<usize> = clients.iter().map(|client| client.owned.len()).collect();
        assert_eq!(counts, vec![2, 2, 2]);
        let before: Vec<BTreeSet<TopicPartition>> =
            clients.iter().map(|client| client.owned.clone()).collect();
        clients.push(Client::default());
        for round in 6..12u64 {
            for index in 0..clients.len() {
                clients[index].beat(&mut state, 6, round * 100);
                assert!(owners(&clients).values().all(|count| *count == 1));
            }
        }
        let counts: Vec<usize> = clients.iter().map(|client| client.owned.len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 6);
        assert!(
            counts.iter().all(|count| (1..=2).contains(count)),
            "{counts:?}"
        );
        // Sticky: shares become 2, 2, 1 and 1, so exactly one partition moves, to the new member.
        let moved: usize = before
            .iter()
            .zip(&clients)
            .map(|(old, client)| old.difference(&client.owned).count())
            .sum();
        assert_eq!(moved, 1, "only the new member's share moves");
        assert_eq!(clients[3].owned.len(), 1);
    }

    /// A member silent past its session timeout is expired, and its partitions go to the others;
    /// its late heartbeat and commit are refused as unknown; an old epoch is fenced.
    #[test]
    fn expired_and_stale_members_are_refused() {
        let mut state = GroupState::default();
        let mut a = Client::default();
        let mut b = Client::default();
        for now in [0, 100, 200] {
            a.beat(&mut state, 4, now);
            b.beat(&mut state, 4, now);
        }
        assert_eq!(a.owned.len() + b.owned.len(), 4);
        // An epoch the group never gave is fenced.
        assert_eq!(
            state.apply(heartbeat(&a.id, a.epoch + 7, &a.owned, 4)),
            GroupAnswer::FencedMember {
                current_epoch: a.epoch
            }
        );
        // b goes silent; a keeps beating. An expiry naming an epoch b has left behind does
        // nothing.
        for now in [5_000, 11_000] {
            a.beat(&mut state, 4, now);
        }
        state.apply(GroupCommand::Expire {
            members: vec![(b.id.clone(), b.epoch + 1)],
            topics: topics(4),
        });
        assert!(state.members.contains_key(&b.id));
        state.apply(GroupCommand::Expire {
            members: vec![(b.id.clone(), b.epoch)],
            topics: topics(4),
        });
        a.beat(&mut state, 4, 11_100);
        assert_eq!(a.owned.len(), 4, "the expired member's partitions move");
        assert_eq!(b.beat(&mut state, 4, 11_200), GroupAnswer::UnknownMember);
        let commit = GroupCommand::Commit {
            member_id: b.id.clone(),
            epoch: b.epoch,
            offsets: vec![(
                TopicPartition {
                    topic: "t".into(),
                    partition: 0,
                },
                5,
                String::new(),
            )],
        };
        assert_eq!(state.apply(commit), GroupAnswer::UnknownMember);
    }

    /// A heartbeat whose answer was lost is retried with the previous epoch and answered; a
    /// member that joins again with its id owns nothing and gets a newer epoch, so its old epoch
    /// is fenced; a member's commit must carry its current epoch and name partitions it was
    /// given.
    #[test]
    fn lost_answers_rejoins_and_member_commits() {
        let mut state = GroupState::default();
        let mut a = Client::default();
        a.beat(&mut state, 2, 0);
        let mut b = Client::default();
        b.beat(&mut state, 2, 0);
        // a's share shrinks to one partition: its answer is "lost", it retries with its old
        // epoch and still claims both; the coordinator keeps them a's until released.
        let old_epoch = a.epoch;
        let lost = state.apply(heartbeat(&a.id, a.epoch, &a.owned, 2));
        let GroupAnswer::Assignment {
            epoch, assigned, ..
        } = lost
        else {
            panic!("answered");
        };
        assert_eq!(assigned.len(), 1);
        assert!(epoch > old_epoch);
        let retried = state.apply(heartbeat(&a.id, old_epoch, &a.owned, 2));
        assert!(
            matches!(retried, GroupAnswer::Assignment { .. }),
            "{retried:?}"
        );
        b.beat(&mut state, 2, 0);
        assert!(b.owned.is_empty(), "a still holds what b is to get");
        // a acts on the answer (keeps one), then says so; only then does b get the other.
        a.beat(&mut state, 2, 0);
        b.beat(&mut state, 2, 0);
        assert!(b.owned.is_empty(), "a has not said it released it");
        a.beat(&mut state, 2, 0);
        b.beat(&mut state, 2, 0);
        assert_eq!((a.owned.len(), b.owned.len()), (1, 1));
        let mine = a.owned.iter().next().unwrap().clone();
        let theirs = b.owned.iter().next().unwrap().clone();
        let commit = |epoch, partition: &TopicPartition| GroupCommand::Commit {
            member_id: a.id.clone(),
            epoch,
            offsets: vec![(partition.clone(), 1, String::new())],
        };
        assert_eq!(state.apply(commit(a.epoch, &mine)), GroupAnswer::Ok);
        assert_eq!(
            state.apply(commit(a.epoch, &theirs)),
            GroupAnswer::NotAssigned(vec![theirs.clone()])
        );
        assert_eq!(
            state.apply(commit(a.epoch - 1, &mine)),
            GroupAnswer::FencedMember {
                current_epoch: a.epoch
            }
        );
        // a joins again with its id: it released everything, its old epoch is fenced.
        let stale = a.epoch;
        let rejoined = state.apply(heartbeat(&a.id, 0, &BTreeSet::new(), 2));
        let GroupAnswer::Assignment {
            member_id, epoch, ..
        } = rejoined
        else {
            panic!("rejoined");
        };
        assert_eq!(member_id, a.id);
        assert!(epoch > stale);
        assert!(matches!(
            state.apply(commit(stale, &mine)),
            GroupAnswer::FencedMember { .. }
        ));
        // The old instance's heartbeat and leave are fenced too: no earlier epoch is accepted.
        assert!(matches!(
            state.apply(heartbeat(&a.id, stale, &a.owned, 2)),
            GroupAnswer::FencedMember { .. }
        ));
        let leave = GroupCommand::Leave {
            member_id: a.id.clone(),
            epoch: stale,
            topics: topics(2),
        };
        assert!(matches!(
            state.apply(leave),
            GroupAnswer::FencedMember { .. }
        ));
    }

    /// Commits never go backward; a reset may, but only while the group is empty.
    #[test]
    fn commits_move_forward_and_resets_need_an_empty_group() {
        let mut state = GroupState::default();
        let p0 = TopicPartition {
            topic: "t".into(),
            partition: 0,
        };
        let commit = |offset| GroupCommand::Commit {
            member_id: String::new(),
            epoch: 0,
            offsets: vec![(p0.clone(), offset, String::new())],
        };
        assert_eq!(state.apply(commit(10)), GroupAnswer::Ok);
        assert_eq!(
            state.apply(commit(9)),
            GroupAnswer::Backward(vec![(p0.clone(), 10)])
        );
        assert_eq!(state.offsets[&p0].offset, 10);
        let mut member = Client::default();
        member.beat(&mut state, 1, 0);
        let reset = GroupCommand::Reset {
            offsets: vec![(p0.clone(), 0)],
        };
        assert_eq!(state.apply(reset.clone()), GroupAnswer::NotEmpty);
        state.apply(GroupCommand::Leave {
            member_id: member.id.clone(),
            epoch: member.epoch,
            topics: topics(1),
        });
        assert_eq!(state.apply(reset), GroupAnswer::Ok);
        assert_eq!(state.offsets[&p0].offset, 0);
    }

    proptest! {
        /// Any sequence of joins, heartbeats, silences and leaves keeps every partition owned
        /// by at most one member at every step; once the members beat in turn, every partition
        /// is owned and shares differ by at most one.
        #[test]
        fn ownership_is_exclusive_and_converges(
            partitions in 1u32..12,
            steps in prop::collection::vec((0usize..6, 0u8..10), 1..80),
        ) {
            let mut state = GroupState::default();
            let mut clients: Vec<Option<Client>> = vec![None; 6];
            let mut now = 0u64;
            for (slot, action) in steps {
                now += 100;
                match (action, &mut clients[slot]) {
                    // Join.
                    (0..=1, client @ None) => {
                        let mut joined = Client::default();
                        joined.beat(&mut state, partitions, now);
                        *client = Some(joined);
                    }
                    // Leave.
                    (2, Some(client)) => {
                        let leave = GroupCommand::Leave {
                            member_id: client.id.clone(),
                            epoch: client.epoch,
                            topics: topics(partitions),
                        };
                        state.apply(leave);
                        clients[slot] = None;
                    }
                    // Heartbeat.
                    (_, Some(client)) => {
                        client.beat(&mut state, partitions, now);
                    }
                    _ => {}
                }
                let live: Vec<Client> = clients.iter().flatten().cloned().collect();
                prop_assert!(owners(&live).values().all(|count| *count == 1));
            }
            // Every live member beats a few rounds: the assignment converges.
            for _ in 0..4 {
                now += 100;
                for client in clients.iter_mut().flatten() {
                    client.beat(&mut state, partitions, now);
                }
            }
            let live: Vec<Client> = clients.iter().flatten().cloned().collect();
            prop_assert!(owners(&live).values().all(|count| *count == 1));
            if !live.is_empty() {
                prop_assert_eq!(owners(&live).len() as u32, partitions);
                let counts: Vec<usize> = live.iter().map(|client| client.owned.len()).collect();
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                prop_assert!(max - min <= 1, "{:?}", counts);
            }
        }
    }
}
