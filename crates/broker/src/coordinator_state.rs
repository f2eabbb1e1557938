//! A consumer group coordinator shard's state: the groups whose names hash to the shard, each a
//! [`GroupState`], applied through the shard's Raft group (`ordo_raft::StateApply`). Pure and
//! deterministic like `group_state`: the limits a command is checked against travel in it.
//!
//! Each group is one row of the shard's store, rewritten when a command changes it; a group with
//! no member and no committed offset is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use serde::Deserialize;
use serde::Serialize;

use crate::group_state::GroupAnswer;
use crate::group_state::GroupCommand;
use crate::group_state::GroupState;

/// The bounds a shard command is applied with (the proposer's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLimits {
    /// Most groups one shard holds.
    pub groups_max: u32,
    /// Most members one group has.
    pub members_max: u32,
}

/// A command of a coordinator shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// A command for one group (created by a join, a commit or a reset).
    Group {
        /// The group's name.
        group: String,
        /// The command.
        command: GroupCommand,
        /// The bounds.
        limits: ShardLimits,
    },
    /// Delete a group with no members.
    Delete {
        /// The group's name.
        group: String,
    },
}

/// What applying a shard command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardAnswer {
    /// The group's answer.
    Group(GroupAnswer),
    /// The group was deleted.
    Deleted,
    /// No such group.
    NotFound,
    /// The shard holds `max` groups: a new one cannot be created.
    TooManyGroups {
        /// The limit.
        max: u32,
    },
    /// The group has `max` members: a new one cannot join.
    TooManyMembers {
        /// The limit.
        max: u32,
    },
    /// The command did not decode (a bug, or a newer node's command).
    Undecodable(String),
}

/// One group and its row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    row: u64,
    state: GroupState,
}

/// A row: the group's name and state.
#[derive(Serialize, Deserialize)]
struct Row {
    name: String,
    state: GroupState,
}

/// The shard state outside the rows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Header {
    next_row: u64,
}

/// Every group of one coordinator shard.
#[derive(Debug, Default)]
pub struct ShardState {
    groups: BTreeMap<String, Entry>,
    next_row: u64,
    /// Rows changed since they were last taken: the group's name, or `None` once deleted.
    changed: BTreeMap<u64, Option<String>>,
}

impl ShardState {
    /// A group's state, if it exists.
    pub fn group(&self, name: &str) -> Option<&GroupState> {
        self.groups.get(name).map(|entry| &entry.state)
    }

    /// Every group, by name.
    pub fn groups(&self) -> impl Iterator<Item = (&String, &GroupState)> {
        self.groups.iter().map(|(name, entry)| (name, &entry.state))
    }

    /// What `command` would answer, and whether it would change the group (a heartbeat that
    /// changes nothing need not be replicated).
    pub fn dry_run(&self, group: &str, command: &GroupCommand) -> (GroupAnswer, bool) {
        let current = self.group(group).cloned().unwrap_or_default();
        let mut copy = current.clone();
        let answer = copy.apply(command.clone());
        let changed = copy != current;
        (answer, changed)
    }

    /// Applies one command. Deterministic.
    pub fn apply(&mut self, command: ShardCommand) -> ShardAnswer {
        match command {
            ShardCommand::Delete { group } => match self.groups.get(&group) {
                None => ShardAnswer::NotFound,
                Some(entry) if !entry.state.members.is_empty() => {
                    ShardAnswer::Group(GroupAnswer::NotEmpty)
                }
                Some(entry) => {
                    self.changed.insert(entry.row, None);
                    self.groups.remove(&group);
                    ShardAnswer::Deleted
                }
            },
            ShardCommand::Group {
                group,
                command,
                limits,
            } => {
                let exists = self.groups.contains_key(&group);
                if !exists && self.groups.len() >= limits.groups_max as usize {
                    // A command on a missing group that would not create it answers as on an
                    // empty group.
                    let (answer, creates) = self.dry_run(&group, &command);
                    if creates {
                        return ShardAnswer::TooManyGroups {
                            max: limits.groups_max,
                        };
                    }
                    return ShardAnswer::Group(answer);
                }
                let entry = self.groups.entry(group.clone()).or_insert_with(|| {
                    let row = self.next_row;
                    self.next_row += 1;
                    Entry {
                        row,
                        state: GroupState::default(),
                    }
                });
                if let GroupCommand::Heartbeat {
                    member_id, epoch, ..
                } = &command
                {
                    let joins = *epoch == 0 && !entry.state.members.contains_key(member_id);
                    if joins && entry.state.members.len() >= limits.members_max as usize {
                        return ShardAnswer::TooManyMembers {
                            max: limits.members_max,
                        };
                    }
                }
                let before = entry.state.clone();
                let answer = entry.state.apply(command);
                let row = entry.row;
                if entry.state.is_empty() {
                    self.groups.remove(&group);
                    if exists {
                        self.changed.insert(row, None);
                    }
                } else if entry.state != before || !exists {
                    self.changed.insert(row, Some(group));
                }
                ShardAnswer::Group(answer)
            }
        }
    }

    fn encode_row(name: &str, state: &GroupState) -> Vec<u8> {
        postcard::to_stdvec(&Row {
            name: name.to_owned(),
            state: state.clone(),
        })
        .expect("a group state always encodes")
    }
}

/// A shard's state shared between its Raft group (which applies commands) and the coordinator
/// service (which reads it on the leader). The lock is held only for an apply or a read.
#[derive(Debug, Clone, Default)]
pub struct SharedShard(pub Arc<Mutex<ShardState>>);

impl SharedShard {
    /// Runs `read` on the state.
    pub fn read<T>(&self, read: impl FnOnce(&ShardState) -> T) -> T {
        read(&self.0.lock().expect("shard lock is never poisoned"))
    }

    fn write<T>(&self, write: impl FnOnce(&mut ShardState) -> T) -> T {
        write(&mut self.0.lock().expect("shard lock is never poisoned"))
    }
}

impl ordo_raft::StateApply for SharedShard {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        let answer = match postcard::from_bytes::<ShardCommand>(command) {
            Ok(command) => self.write(|state| state.apply(command)),
            Err(error) => ShardAnswer::Undecodable(error.to_string()),
        };
        postcard::to_stdvec(&answer).expect("an answer always encodes")
    }

    fn take_changes(&mut self) -> Vec<(u64, Option<Vec<u8>>)> {
        self.write(|state| {
            let changed = std::mem::take(&mut state.changed);
            changed
                .into_iter()
                .map(|(row, name)| {
                    let bytes = name.and_then(|name| {
                        let entry = state.groups.get(&name)?;
                        Some(ShardState::encode_row(&name, &entry.state))
                    });
                    (row, bytes)
                })
                .collect()
        })
    }

    fn encode_state(&self) -> Vec<u8> {
        self.read(|state| {
            postcard::to_stdvec(&Header {
                next_row: state.next_row,
            })
            .expect("a header always encodes")
        })
    }

    fn rows(&self) -> Vec<(u64, Vec<u8>)> {
        self.read(|state| {
            state
                .groups
                .iter()
                .map(|(name, entry)| (entry.row, ShardState::encode_row(name, &entry.state)))
                .collect()
        })
    }

    fn restore(
        &mut self,
        header: &[u8],
        rows: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), ordo_raft::MetaRestoreError> {
        let undecodable =
            |error: postcard::Error| ordo_raft::MetaRestoreError::Undecodable(error.into());
        let header: Header = postcard::from_bytes(header).map_err(undecodable)?;
        let mut groups = BTreeMap::new();
        for (row, bytes) in rows {
            let Row { name, state } = postcard::from_bytes(&bytes).map_err(undecodable)?;
            groups.insert(name, Entry { row, state });
        }
        self.write(|state| {
            state.groups = groups;
            state.next_row = header.next_row;
            state.changed.clear();
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ordo_raft::StateApply;

    use super::*;
    use crate::group_state::TopicPartition;

    const LIMITS: ShardLimits = ShardLimits {
        groups_max: 2,
        members_max: 2,
    };

    fn command(group: &str, command: GroupCommand) -> Vec<u8> {
        postcard::to_stdvec(&ShardCommand::Group {
            group: group.to_owned(),
            command,
            limits: LIMITS,
        })
        .unwrap()
    }

    fn join(member: &str) -> GroupCommand {
        GroupCommand::Heartbeat {
            member_id: member.to_owned(),
            epoch: 0,
            subscriptions: BTreeSet::from(["t".to_owned()]),
            owned: BTreeSet::new(),
            topics: BTreeMap::from([("t".to_owned(), 2)]),
            session_timeout_ms: 1_000,
        }
    }

    fn commit(offset: u64) -> GroupCommand {
        GroupCommand::Commit {
            member_id: String::new(),
            epoch: 0,
            offsets: vec![(
                TopicPartition {
                    topic: "t".into(),
                    partition: 0,
                },
                offset,
                String::new(),
            )],
        }
    }

    fn answer(shard: &mut SharedShard, bytes: Vec<u8>) -> ShardAnswer {
        postcard::from_bytes(&shard.apply(1, &bytes)).unwrap()
    }

    /// Groups are created by their first command, bounded per shard and in members, written as
    /// rows when they change and deleted when empty; a shard restored from its header and rows
    /// holds the same groups.
    #[test]
    fn groups_are_rows_and_survive_a_restore() {
        let mut shard = SharedShard::default();
        assert!(matches!(
            answer(&mut shard, command("a", join("x"))),
            ShardAnswer::Group(GroupAnswer::Assignment { .. })
        ));
        assert!(matches!(
            answer(&mut shard, command("a", join("y"))),
            ShardAnswer::Group(GroupAnswer::Assignment { .. })
        ));
        assert_eq!(
            answer(&mut shard, command("a", join("z"))),
            ShardAnswer::TooManyMembers { max: 2 }
        );
        assert_eq!(
            answer(&mut shard, command("b", commit(3))),
            ShardAnswer::Group(GroupAnswer::Ok)
        );
        assert_eq!(
            answer(&mut shard, command("c", commit(3))),
            ShardAnswer::TooManyGroups { max: 2 }
        );
        let changes = shard.take_changes();
        assert_eq!(changes.len(), 2, "one row per group changed");
        assert!(changes.iter().all(|(_, row)| row.is_some()));
        // A restored copy from the header and rows.
        let mut restored = SharedShard::default();
        restored
            .restore(&shard.encode_state(), shard.rows())
            .unwrap();
        assert_eq!(
            restored.read(|state| state.group("b").unwrap().offsets.len()),
            1
        );
        assert_eq!(
            restored.read(|state| state.group("a").unwrap().members.len()),
            2
        );
        // Delete refuses a group with members; deletes one without, as a row deletion.
        let delete = |group: &str| {
            postcard::to_stdvec(&ShardCommand::Delete {
                group: group.to_owned(),
            })
            .unwrap()
        };
        assert_eq!(
            answer(&mut restored, delete("a")),
            ShardAnswer::Group(GroupAnswer::NotEmpty)
        );
        assert_eq!(answer(&mut restored, delete("b")), ShardAnswer::Deleted);
        assert_eq!(answer(&mut restored, delete("b")), ShardAnswer::NotFound);
        let changes = restored.take_changes();
        assert_eq!(changes.len(), 1);
        assert!(changes[0].1.is_none());
        // Now there is room for a new group; the next row id is fresh.
        assert_eq!(
            answer(&mut restored, command("c", commit(1))),
            ShardAnswer::Group(GroupAnswer::Ok)
        );
        let changes = restored.take_changes();
        assert_eq!(changes[0].0, 2);
    }
}
