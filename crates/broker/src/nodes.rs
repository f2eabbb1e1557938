//! The node table and replica moves of the metadata state: pure and deterministic, applied
//! through the metadata log like the rest of [`MetaState`].
//!
//! - A node is in the table once it registered (every node does at start; a new node through
//!   `Internal/Join`). A node id stays bound to its address: another address under a used id
//!   is refused, unless the caller is that member itself (it moved).
//! - A move changes one Raft group's replicas. It is recorded here first (`moves`), so the new
//!   replicas start the group and the old ones keep it; the group's leader then changes the
//!   group's membership (learner, caught up, joint consensus: `background`), and only when that
//!   committed does `FinishMove` make the target the group's replicas, after which the old
//!   replicas delete their copy.
//! - Draining a node moves each of its replicas to the active node holding fewest; once it
//!   holds none, it is removed from the table (and from the metadata group).
//! - A queue's partition lives beside its topic's partition: a move of the topic's partition
//!   moves the queue's state group over it too.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::Serialize;

use crate::NodeId;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaState;

/// Most voters of the metadata group; the other nodes follow it as learners.
pub const META_VOTERS_MAX: usize = 5;

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its advertised address.
    pub address: String,
    /// Its replicas are being moved away; it gets no new ones.
    pub draining: bool,
}

/// What a group is, to find and change its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner<'a> {
    Topic(&'a str),
    Coordinators,
    Queue(&'a str),
}

/// The metadata voters for a metadata group whose voters are `current`, among the `eligible`
/// nodes (active, and caught up when not a voter yet): an odd count, at most
/// [`META_VOTERS_MAX`] (two when only two are eligible), keeping current voters first, then the
/// lowest ids. `current` when no node is eligible.
pub fn meta_voters(current: &BTreeSet<NodeId>, eligible: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    // Odd, except two: two copies of the metadata are better than one.
    let count = eligible.len().min(META_VOTERS_MAX);
    let count = if count % 2 == 0 && count > 2 {
        count - 1
    } else {
        count
    };
    if count == 0 {
        return current.clone();
    }
    let mut voters: BTreeSet<NodeId> = current
        .intersection(eligible)
        .copied()
        .take(count)
        .collect();
    for node in eligible {
        if voters.len() >= count {
            break;
        }
        voters.insert(*node);
    }
    voters
}

impl MetaState {
    /// Nodes that can take replicas: registered, not draining.
    pub fn active_nodes(&self) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, info)| !info.draining)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether a node may get replicas at create: not draining or removed (a node of the static
    /// config may not have registered yet).
    pub(crate) fn placeable(&self, node: NodeId) -> bool {
        !self.removed_nodes.contains(&node)
            && !self.nodes.get(&node).is_some_and(|info| info.draining)
    }

    /// Every Raft group the metadata names but the metadata group: `(group, replicas, owner,
    /// partition)`.
    fn groups(&self) -> impl Iterator<Item = (u64, &Vec<NodeId>, Owner<'_>, u32)> {
        let topics = self
            .topics
            .values()
            .flat_map(|topic| numbered(topic.id, &topic.partitions, Owner::Topic(&topic.name)));
        let coordinators = self
            .coordinators
            .iter()
            .flat_map(|topic| numbered(topic.id, &topic.partitions, Owner::Coordinators));
        let queues = self
            .queues
            .values()
            .flat_map(|queue| numbered(queue.id, &queue.partitions, Owner::Queue(&queue.name)));
        topics.chain(coordinators).chain(queues)
    }

    /// Drops the moves of groups that no longer exist (their topic or queue was deleted).
    pub(crate) fn forget_moves_of_deleted_groups(&mut self) {
        let existing: BTreeSet<u64> = self.groups().map(|(group, ..)| group).collect();
        self.moves.retain(|group, _| existing.contains(group));
    }

    /// A group's replicas, when the metadata names the group.
    pub fn replicas_of(&self, group: u64) -> Option<&Vec<NodeId>> {
        self.groups()
            .find(|(known, ..)| *known == group)
            .map(|(_, replicas, ..)| replicas)
    }

    fn replicas_mut(&mut self, group: u64) -> Option<&mut Vec<NodeId>> {
        let (owner, partition) = self
            .groups()
            .find(|(known, ..)| *known == group)
            .map(|(_, _, owner, partition)| (owner_key(owner), partition))?;
        let partitions = match owner {
            OwnerKey::Topic(name) => &mut self.topics.get_mut(&name)?.partitions,
            OwnerKey::Coordinators => &mut self.coordinators.as_mut()?.partitions,
            OwnerKey::Queue(name) => &mut self.queues.get_mut(&name)?.partitions,
        };
        partitions.get_mut(partition as usize)
    }

    /// The queue groups over a topic's partition group, with their replicas.
    fn queue_groups_over(&self, log_group: u64) -> Vec<(u64, Vec<NodeId>)> {
        self.queues
            .values()
            .flat_map(|queue| {
                queue
                    .partitions
                    .iter()
                    .enumerate()
                    .filter(move |(p, _)| queue.log_group(*p as u32) == log_group)
                    .map(move |(p, replicas)| (queue.group(p as u32), replicas.clone()))
            })
            .collect()
    }

    /// How many replicas each active node holds, counting move targets (what it will hold).
    fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> =
            self.active_nodes().into_iter().map(|id| (id, 0)).collect();
        for (group, replicas, owner, _) in self.groups() {
            if matches!(owner, Owner::Queue(_)) {
                continue;
            }
            let held = self.moves.get(&group).unwrap_or(replicas);
            for node in held {
                if let Some(count) = counts.get_mut(node) {
                    *count += 1;
                }
            }
        }
        counts
    }

    pub(crate) fn register_node(
        &mut self,
        id: NodeId,
        address: String,
        member: bool,
    ) -> MetaAnswer {
        if id == 0 || address.is_empty() {
            return MetaAnswer::Rejected("a node needs an id above 0 and an address".into());
        }
        if let Some((other, _)) = self
            .nodes
            .iter()
            .find(|(other, info)| **other != id && info.address == address)
        {
            return MetaAnswer::Rejected(format!(
                "address {address} is node {other}'s; give each node its own address"
            ));
        }
        match self.nodes.get_mut(&id) {
            Some(info) if info.address == address => MetaAnswer::Done,
            Some(info) if member => {
                info.address = address;
                MetaAnswer::Done
            }
            Some(info) => MetaAnswer::Rejected(format!(
                "node id {id} is already used by the node at {}; give this node another id, or \
                 drain node {id} first",
                info.address
            )),
            None => {
                self.removed_nodes.remove(&id);
                self.nodes.insert(
                    id,
                    NodeInfo {
                        address,
                        draining: false,
                    },
                );
                MetaAnswer::Done
            }
        }
    }

    pub(crate) fn drain_node(&mut self, id: NodeId) -> MetaAnswer {
        if !self.nodes.contains_key(&id) {
            return MetaAnswer::NodeNotFound(id);
        }
        let mut counts = self.replica_counts();
        counts.remove(&id);
        if counts.is_empty() {
            return MetaAnswer::Rejected(format!(
                "node {id} is the last active node of the cluster; nothing could take its place"
            ));
        }
        if let Some((group, _)) = self.moves.iter().find(|(_, target)| target.contains(&id)) {
            return MetaAnswer::Rejected(format!(
                "group {group} is moving onto node {id}; wait until that move finished"
            ));
        }
        let mut moves = Vec::new();
        let mut covered = BTreeSet::new();
        let on_node: Vec<(u64, Vec<NodeId>, bool)> = self
            .groups()
            .filter(|(group, replicas, ..)| {
                replicas.contains(&id) && !self.moves.contains_key(group)
            })
            .map(|(group, replicas, owner, _)| {
                (group, replicas.clone(), matches!(owner, Owner::Topic(_)))
            })
            .collect();
        for (group, replicas, is_log) in on_node {
            if covered.contains(&group) {
                continue;
            }
            let Some(replacement) = counts
                .iter()
                .filter(|(node, _)| !replicas.contains(node))
                .min_by_key(|(node, count)| (**count, **node))
                .map(|(node, _)| *node)
            else {
                return MetaAnswer::Rejected(format!(
                    "group {group} has {} replicas; without node {id} only {} active nodes \
                     remain, so its replication factor cannot be kept; add a node first",
                    replicas.len(),
                    counts.len()
                ));
            };
            *counts.get_mut(&replacement).expect("a counted node") += 1;
            let target: Vec<NodeId> = replicas
                .iter()
                .map(|node| if *node == id { replacement } else { *node })
                .collect();
            covered.insert(group);
            moves.push((group, target.clone()));
            if is_log {
                // The queues over this partition go with it.
                for (queue_group, queue_replicas) in self.queue_groups_over(group) {
                    if queue_replicas == replicas && !self.moves.contains_key(&queue_group) {
                        covered.insert(queue_group);
                        moves.push((queue_group, target.clone()));
                    }
                }
            }
        }
        self.nodes.get_mut(&id).expect("checked above").draining = true;
        for (group, target) in &moves {
            self.moves.insert(*group, target.clone());
        }
        MetaAnswer::Moving(moves)
    }

    pub(crate) fn remove_node(&mut self, id: NodeId) -> MetaAnswer {
        let Some(info) = self.nodes.get(&id) else {
            return MetaAnswer::NodeNotFound(id);
        };
        if !info.draining {
            return MetaAnswer::Rejected(format!("node {id} is not drained; drain it first"));
        }
        let held = self
            .groups()
            .filter(|(_, replicas, ..)| replicas.contains(&id))
            .count()
            + self
                .moves
                .values()
                .filter(|target| target.contains(&id))
                .count();
        if held > 0 {
            return MetaAnswer::Rejected(format!(
                "node {id} still holds {held} replicas; wait until its moves finished"
            ));
        }
        self.nodes.remove(&id);
        self.removed_nodes.insert(id);
        MetaAnswer::Done
    }

    /// Checks one planned move: the group exists and is not moving, the target is as many
    /// distinct active nodes as the group has replicas.
    fn check_move(&self, group: u64, target: &[NodeId]) -> Result<&Vec<NodeId>, MetaAnswer> {
        let Some(replicas) = self.replicas_of(group) else {
            return Err(MetaAnswer::Rejected(format!(
                "group {group} does not exist"
            )));
        };
        if self.moves.contains_key(&group) {
            return Err(MetaAnswer::Rejected(format!(
                "group {group} is moving already; wait until that move finished"
            )));
        }
        let distinct: BTreeSet<&NodeId> = target.iter().collect();
        if distinct.len() != target.len() || target.len() != replicas.len() {
            return Err(MetaAnswer::Rejected(format!(
                "group {group} has {} replicas; a plan must name as many distinct nodes, not {:?}",
                replicas.len(),
                target
            )));
        }
        if let Some(node) = target.iter().find(|node| !self.nodes.contains_key(node)) {
            return Err(MetaAnswer::NodeNotFound(*node));
        }
        if let Some(node) = target
            .iter()
            .find(|node| !replicas.contains(node) && self.nodes[node].draining)
        {
            return Err(MetaAnswer::Rejected(format!(
                "node {node} is draining and takes no new replicas"
            )));
        }
        Ok(replicas)
    }

    pub(crate) fn reassign(&mut self, planned: Vec<(u64, Vec<NodeId>)>) -> MetaAnswer {
        let mut moves = Vec::new();
        let mut reorders = Vec::new();
        for (group, target) in &planned {
            if planned.iter().filter(|(other, _)| other == group).count() > 1 {
                return MetaAnswer::Rejected(format!("group {group} is named twice in the plan"));
            }
            let replicas = match self.check_move(*group, target) {
                Ok(replicas) => replicas,
                Err(refused) => return refused,
            };
            let same_set = replicas.iter().all(|node| target.contains(node));
            if same_set {
                // Only the preferred leader changes: no data moves.
                if replicas != target {
                    reorders.push((*group, target.clone()));
                }
                continue;
            }
            moves.push((*group, target.clone()));
            for (queue_group, queue_replicas) in self.queue_groups_over(*group) {
                if queue_replicas == *replicas
                    && !self.moves.contains_key(&queue_group)
                    && !planned.iter().any(|(other, _)| *other == queue_group)
                {
                    moves.push((queue_group, target.clone()));
                }
            }
        }
        for (group, order) in reorders {
            for (queue_group, queue_replicas) in self.queue_groups_over(group) {
                if Some(&queue_replicas) == self.replicas_of(group) {
                    if let Some(replicas) = self.replicas_mut(queue_group) {
                        *replicas = order.clone();
                    }
                }
            }
            if let Some(replicas) = self.replicas_mut(group) {
                *replicas = order;
            }
        }
        for (group, target) in &moves {
            self.moves.insert(*group, target.clone());
        }
        MetaAnswer::Moving(moves)
    }

    pub(crate) fn finish_move(&mut self, group: u64, replicas: Vec<NodeId>) -> MetaAnswer {
        if self.moves.get(&group) != Some(&replicas) {
            return MetaAnswer::Rejected(format!(
                "group {group} has no move to {replicas:?} in progress"
            ));
        }
        self.moves.remove(&group);
        match self.replicas_mut(group) {
            Some(current) => {
                *current = replicas;
                MetaAnswer::Done
            }
            // Deleted meanwhile: nothing to change.
            None => MetaAnswer::Done,
        }
    }

    /// Plans moves so every active node holds about as many replicas (at most one apart), then
    /// orders each partition's replicas so every node is the preferred leader of about as many
    /// (a reorder moves no data). Deterministic, as every apply.
    pub(crate) fn rebalance(&mut self) -> MetaAnswer {
        let active = self.active_nodes();
        if active.is_empty() {
            return MetaAnswer::Moving(Vec::new());
        }
        let mut counts = self.replica_counts();
        // Every log and coordinator group not moving, with its replicas as planned so far.
        let mut planned: BTreeMap<u64, Vec<NodeId>> = self
            .groups()
            .filter(|(group, _, owner, _)| {
                !matches!(owner, Owner::Queue(_)) && !self.moves.contains_key(group)
            })
            .map(|(group, replicas, ..)| (group, replicas.clone()))
            .collect();
        let original = planned.clone();
        for _ in 0..planned.len().saturating_mul(4).max(1) {
            let Some((most, least)) = uneven(&counts) else {
                break;
            };
            let Some(replicas) = planned
                .values_mut()
                .find(|replicas| replicas.contains(&most) && !replicas.contains(&least))
            else {
                break;
            };
            for node in replicas.iter_mut() {
                if *node == most {
                    *node = least;
                }
            }
            *counts.get_mut(&most).expect("counted") -= 1;
            *counts.get_mut(&least).expect("counted") += 1;
        }
        // Preferred leaders (each group's first replica): while one node prefers two more
        // groups than another, one group it prefers that the other replicates changes hands.
        let mut leading: BTreeMap<NodeId, usize> = active.iter().map(|id| (*id, 0)).collect();
        for replicas in planned.values() {
            if let Some(count) = replicas.first().and_then(|first| leading.get_mut(first)) {
                *count += 1;
            }
        }
        for _ in 0..planned.len().max(1) {
            let Some((most, least)) = uneven(&leading) else {
                break;
            };
            let Some(replicas) = planned
                .values_mut()
                .find(|replicas| replicas.first() == Some(&most) && replicas.contains(&least))
            else {
                break;
            };
            let position = replicas
                .iter()
                .position(|node| *node == least)
                .expect("contains it");
            replicas.swap(0, position);
            *leading.get_mut(&most).expect("counted") -= 1;
            *leading.get_mut(&least).expect("counted") += 1;
        }
        let changed: Vec<(u64, Vec<NodeId>)> = planned
            .into_iter()
            .filter(|(group, replicas)| original.get(group) != Some(replicas))
            .collect();
        self.reassign(changed)
    }
}

/// Each partition of `owner` (whose groups are `group_of(id, partition)`) with its group and
/// replicas.
fn numbered<'a>(
    id: u64,
    partitions: &'a [Vec<NodeId>],
    owner: Owner<'a>,
) -> impl Iterator<Item = (u64, &'a Vec<NodeId>, Owner<'a>, u32)> + 'a {
    partitions
        .iter()
        .enumerate()
        .map(move |(partition, replicas)| {
            let partition = partition as u32;
            (
                crate::metadata::group_of(id, partition),
                replicas,
                owner,
                partition,
            )
        })
}

/// The node counting most and the one counting least (highest and lowest id on ties), when
/// they are more than one apart.
fn uneven(counts: &BTreeMap<NodeId, usize>) -> Option<(NodeId, NodeId)> {
    let (most, high) = counts
        .iter()
        .max_by_key(|(node, count)| (**count, **node))?;
    let (least, low) = counts
        .iter()
        .min_by_key(|(node, count)| (**count, **node))?;
    (*high > low + 1).then_some((*most, *least))
}

/// An owned [`Owner`], to look a group up again mutably.
enum OwnerKey {
    Topic(String),
    Coordinators,
    Queue(String),
}

fn owner_key(owner: Owner<'_>) -> OwnerKey {
    match owner {
        Owner::Topic(name) => OwnerKey::Topic(name.to_owned()),
        Owner::Coordinators => OwnerKey::Coordinators,
        Owner::Queue(name) => OwnerKey::Queue(name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MetaCommand;

    fn cluster(nodes: &[NodeId]) -> MetaState {
        let mut state = MetaState::default();
        for (index, id) in nodes.iter().enumerate() {
            let answer = state.apply(
                index as u64 + 1,
                MetaCommand::RegisterNode {
                    id: *id,
                    address: format!("n{id}:7000"),
                    member: true,
                },
            );
            assert_eq!(answer, MetaAnswer::Done);
        }
        state
    }

    fn create(state: &mut MetaState, name: &str, partitions: u32, replication_factor: u32) {
        let nodes = state.active_nodes().into_iter().collect();
        let answer = state.apply(
            100,
            MetaCommand::CreateTopic {
                name: name.into(),
                partitions,
                replication_factor,
                config: BTreeMap::new(),
                nodes,
            },
        );
        assert!(matches!(answer, MetaAnswer::Created(_)), "{answer:?}");
    }

    /// Finishes every move, as the groups' leaders would once the changes committed.
    fn finish_all(state: &mut MetaState) {
        let moves: Vec<(u64, Vec<NodeId>)> = state
            .moves
            .iter()
            .map(|(group, target)| (*group, target.clone()))
            .collect();
        for (group, replicas) in moves {
            assert_eq!(
                state.apply(200, MetaCommand::FinishMove { group, replicas }),
                MetaAnswer::Done
            );
        }
    }

    fn held(state: &MetaState) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for topic in state.topics.values() {
            for replicas in &topic.partitions {
                for node in replicas {
                    *counts.entry(*node).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    /// Odd voter counts, at most five, current voters kept.
    #[test]
    fn metadata_voters_stay_odd_and_bounded() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(
            meta_voters(&set(&[1, 2, 3]), &set(&[1, 2, 3, 4])),
            set(&[1, 2, 3])
        );
        assert_eq!(
            meta_voters(&set(&[1, 2, 3]), &set(&[1, 2, 3, 4, 5])),
            set(&[1, 2, 3, 4, 5])
        );
        assert_eq!(
            meta_voters(&set(&[2, 4, 6]), &set(&(1..=9).collect::<Vec<_>>())),
            set(&[1, 2, 3, 4, 6])
        );
        // A draining voter (not eligible) is replaced.
        assert_eq!(
            meta_voters(&set(&[1, 2, 3]), &set(&[1, 2, 4])),
            set(&[1, 2, 4])
        );
        // Never down to one copy while two nodes are eligible.
        assert_eq!(meta_voters(&set(&[1, 2, 3]), &set(&[1, 2])), set(&[1, 2]));
        assert_eq!(meta_voters(&set(&[1]), &set(&[])), set(&[1]));
    }

    /// An id is bound to its address: another node under a used id or address is refused; the
    /// member itself may move; a removed id may join again.
    #[test]
    fn node_ids_are_unique() {
        let mut state = cluster(&[1, 2, 3]);
        let register = |id, address: &str, member| MetaCommand::RegisterNode {
            id,
            address: address.into(),
            member,
        };
        assert_eq!(
            state.apply(5, register(2, "n2:7000", false)),
            MetaAnswer::Done
        );
        assert!(matches!(
            state.apply(6, register(2, "elsewhere:7000", false)),
            MetaAnswer::Rejected(reason) if reason.contains("already used")
        ));
        assert!(matches!(
            state.apply(7, register(4, "n2:7000", false)),
            MetaAnswer::Rejected(reason) if reason.contains("node 2's")
        ));
        assert_eq!(
            state.apply(8, register(2, "moved:7000", true)),
            MetaAnswer::Done
        );
        assert_eq!(state.nodes[&2].address, "moved:7000");
        assert_eq!(
            state.apply(9, register(4, "n4:7000", false)),
            MetaAnswer::Done
        );
        assert_eq!(
            state.apply(10, MetaCommand::DrainNode { id: 4 }),
            MetaAnswer::Moving(vec![])
        );
        assert_eq!(
            state.apply(11, MetaCommand::RemoveNode { id: 4 }),
            MetaAnswer::Done
        );
        assert!(state.removed_nodes.contains(&4));
        assert!(!state.placeable(4));
        assert_eq!(
            state.apply(12, register(4, "n4b:7000", false)),
            MetaAnswer::Done
        );
        assert!(state.placeable(4));
    }

    /// Draining moves every replica of the node to the active nodes holding fewest, the
    /// queue's groups with their partitions, and refuses what would break a replication factor.
    #[test]
    fn draining_moves_every_replica_away() {
        let mut state = cluster(&[1, 2, 3, 4]);
        create(&mut state, "a", 8, 3);
        create(&mut state, "dead", 1, 1);
        let queue = MetaCommand::CreateQueue {
            name: "q".into(),
            topic: "a".into(),
            config: crate::metadata::QueueConfig {
                visibility_timeout_ms: 1000,
                max_deliveries: 3,
                key_ordered: false,
                delay_ms: 0,
                in_flight_max: 10,
                dead_letter_topic: "dead".into(),
            },
            queues_max: 10,
        };
        assert!(matches!(
            state.apply(101, queue),
            MetaAnswer::QueueCreated(_)
        ));
        let on_one = held(&state)[&1];
        let MetaAnswer::Moving(moves) = state.apply(102, MetaCommand::DrainNode { id: 1 }) else {
            panic!("drain refused");
        };
        let queue_moves = moves
            .iter()
            .filter(|(group, _)| {
                state.queues["q"].partitions.len() > 0 && *group >> 20 == state.queues["q"].id
            })
            .count();
        assert!(queue_moves > 0, "the queue's groups move with the topic's");
        assert!(moves.iter().all(|(_, target)| !target.contains(&1)));
        assert!(!state.active_nodes().contains(&1));
        // Not removable while it holds replicas; no new topic lands on it.
        assert!(matches!(
            state.apply(103, MetaCommand::RemoveNode { id: 1 }),
            MetaAnswer::Rejected(_)
        ));
        finish_all(&mut state);
        let after = held(&state);
        assert!(!after.contains_key(&1));
        assert_eq!(after.values().sum::<usize>(), 8 * 3 + 1);
        assert!(on_one > 0);
        for queue in state.queues.values() {
            for (p, replicas) in queue.partitions.iter().enumerate() {
                assert_eq!(replicas, &state.topics["a"].partitions[p]);
            }
        }
        assert_eq!(
            state.apply(104, MetaCommand::RemoveNode { id: 1 }),
            MetaAnswer::Done
        );
        // Three nodes left, replication factor three: none can go.
        assert!(matches!(
            state.apply(105, MetaCommand::DrainNode { id: 2 }),
            MetaAnswer::Rejected(reason) if reason.contains("replication factor")
        ));
        assert!(!state.nodes[&2].draining);
        assert!(matches!(
            state.apply(106, MetaCommand::DrainNode { id: 9 }),
            MetaAnswer::NodeNotFound(9)
        ));
    }

    /// A plan naming unknown nodes, too few or repeated nodes, or a moving group changes
    /// nothing; a plan that only reorders moves no data.
    #[test]
    fn bad_plans_change_nothing() {
        let mut state = cluster(&[1, 2, 3, 4]);
        create(&mut state, "a", 2, 3);
        let group = state.topics["a"].group(0);
        let before = state.clone();
        let reassign = |target: Vec<NodeId>| MetaCommand::Reassign {
            moves: vec![(group, target)],
        };
        assert!(matches!(
            state.apply(1, reassign(vec![1, 2, 9])),
            MetaAnswer::NodeNotFound(9)
        ));
        assert!(matches!(
            state.apply(2, reassign(vec![1, 2])),
            MetaAnswer::Rejected(_)
        ));
        assert!(matches!(
            state.apply(3, reassign(vec![1, 1, 2])),
            MetaAnswer::Rejected(_)
        ));
        assert!(matches!(
            state.apply(
                4,
                MetaCommand::Reassign {
                    moves: vec![(12345, vec![1, 2, 3])]
                }
            ),
            MetaAnswer::Rejected(_)
        ));
        assert_eq!(state.topics, before.topics);
        assert!(state.moves.is_empty());
        let mut reversed = state.topics["a"].partitions[0].clone();
        reversed.reverse();
        assert_eq!(
            state.apply(5, reassign(reversed.clone())),
            MetaAnswer::Moving(vec![])
        );
        assert_eq!(state.topics["a"].partitions[0], reversed);
        let missing = [1, 2, 3, 4]
            .into_iter()
            .find(|node| !reversed.contains(node))
            .expect("a node without a replica");
        let target = vec![missing, reversed[1], reversed[2]];
        assert_eq!(
            state.apply(6, reassign(target.clone())),
            MetaAnswer::Moving(vec![(group, target.clone())])
        );
        assert!(matches!(
            state.apply(7, reassign(target.clone())),
            MetaAnswer::Rejected(_)
        ));
        assert!(
            matches!(
                state.apply(
                    8,
                    MetaCommand::FinishMove {
                        group,
                        replicas: vec![1, 2, 3]
                    }
                ),
                MetaAnswer::Rejected(_)
            ) || target == vec![1, 2, 3]
        );
        finish_all(&mut state);
        assert_eq!(state.topics["a"].partitions[0], target);
    }

    /// Rebalance after a node joined: replicas spread at most one apart, preferred leaders too.
    #[test]
    fn rebalance_spreads_replicas_and_leaders() {
        let mut state = cluster(&[1, 2, 3]);
        create(&mut state, "a", 12, 3);
        assert_eq!(
            state.apply(
                50,
                MetaCommand::RegisterNode {
                    id: 4,
                    address: "n4:7000".into(),
                    member: false
                }
            ),
            MetaAnswer::Done
        );
        let MetaAnswer::Moving(moves) = state.apply(51, MetaCommand::Rebalance {}) else {
            panic!("rebalance refused");
        };
        assert!(!moves.is_empty());
        finish_all(&mut state);
        let counts = held(&state);
        assert_eq!(counts.values().sum::<usize>(), 36);
        assert!(counts.values().all(|count| *count == 9), "{counts:?}");
        let mut leaders = BTreeMap::new();
        for replicas in &state.topics["a"].partitions {
            *leaders.entry(replicas[0]).or_insert(0) += 1;
        }
        assert!(leaders.values().all(|count| *count == 3), "{leaders:?}");
        // Balanced already: nothing moves.
        assert_eq!(
            state.apply(52, MetaCommand::Rebalance {}),
            MetaAnswer::Moving(vec![])
        );

        // Two nodes join a three-node cluster of 6 partitions: 18 replicas over 5 nodes.
        let mut state = cluster(&[1, 2, 3]);
        create(&mut state, "b", 6, 3);
        for id in [4, 5] {
            let register = MetaCommand::RegisterNode {
                id,
                address: format!("n{id}:7000"),
                member: false,
            };
            assert_eq!(state.apply(60, register), MetaAnswer::Done);
        }
        assert!(matches!(
            state.apply(61, MetaCommand::Rebalance {}),
            MetaAnswer::Moving(_)
        ));
        finish_all(&mut state);
        let counts = held(&state);
        let (low, high) = (counts.values().min(), counts.values().max());
        assert!(
            counts.len() == 5 && high.zip(low).is_some_and(|(h, l)| h - l <= 1),
            "{counts:?}"
        );
        let mut leaders: BTreeMap<NodeId, usize> = (1..=5).map(|id| (id, 0)).collect();
        for replicas in &state.topics["b"].partitions {
            *leaders.entry(replicas[0]).or_insert(0) += 1;
        }
        let (low, high) = (leaders.values().min(), leaders.values().max());
        assert!(
            high.zip(low).is_some_and(|(h, l)| h - l <= 1),
            "{leaders:?}"
        );
    }
}
