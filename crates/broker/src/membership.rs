//! Cluster membership as a service (the pure part is `nodes`): forming the cluster once,
//! joining it, the metadata group's voters, and replica moves.
//!
//! - **Bootstrap** ([`Broker::bootstrap`]): a node whose metadata group holds no config asks
//!   its seeds (the static `initial_cluster` and `join` addresses) whether a cluster exists. If
//!   one does, it joins through it (`Internal/Join`: a `RegisterNode` command); the metadata
//!   leader then makes it a learner. If none does, only the lowest id of the static cluster
//!   forms it, and only once a majority of that cluster answered "no cluster": a wiped node,
//!   or a node restarting while the others are up, never forms a second one. A formed node
//!   makes sure the table has its current address.
//! - **Metadata voters** (`meta_membership_loop`, on the metadata leader): every registered
//!   node is a member of the metadata group, up to five of them voters (an odd count, see
//!   `nodes::meta_voters`); a draining node is demoted, a removed one leaves.
//! - **Moves** (`move_loop`, on each group's leader): a group with a move in the metadata is
//!   brought to its target one step per round: new replicas added as learners (catch-up
//!   traffic throttled), then once they caught up, the voters replaced by joint consensus (a
//!   leader that is not in the target first adds itself, hands its leadership to a target
//!   replica, and the new leader finishes), then `FinishMove` in the metadata, after which the
//!   old replicas delete their copies (reconcile). Each step is idempotent; a new leader picks
//!   up where the old one stopped.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use ordo_raft::GroupId;
use ordo_raft::META_GROUP;
use tokio::sync::watch;

use crate::Broker;
use crate::BrokerError;
use crate::NodeId;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::MetaState;
use crate::nodes::meta_voters;
use crate::peer::JoinFailure;
use crate::peer::Seed;

/// Pause between two bootstrap attempts, and between two rounds of the membership loops.
const ROUND: Duration = Duration::from_millis(500);
/// How long one seed may take to answer.
const SEED_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one membership change may take to commit.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries a new replica may still lack and count as caught up (writes keep flowing).
const CATCH_UP_SLACK: u64 = 64;
/// Moves one node drives at once.
const MOVES_PER_ROUND_MAX: usize = 16;
/// How long a metadata command of these loops may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One group's move, as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveView {
    /// The topic, queue, or the coordinators' internal topic.
    pub owner: String,
    /// The partition (or shard).
    pub partition: u32,
    /// Its replicas now.
    pub from: Vec<NodeId>,
    /// Its replicas once moved.
    pub to: Vec<NodeId>,
}

impl MetaState {
    /// The owner name and partition of a group, for reports.
    pub(crate) fn describe_group(&self, group: u64) -> (String, u32) {
        let partition = (group & ((1 << 20) - 1)) as u32;
        let id = group >> 20;
        let owner = self
            .topics
            .values()
            .find(|topic| topic.id == id)
            .map(|topic| topic.name.clone())
            .or_else(|| {
                self.queues
                    .values()
                    .find(|queue| queue.id == id)
                    .map(|queue| format!("queue {}", queue.name))
            })
            .or_else(|| {
                self.coordinators
                    .as_ref()
                    .filter(|topic| topic.id == id)
                    .map(|topic| topic.name.clone())
            })
            .unwrap_or_else(|| format!("group {group}"));
        (owner, partition)
    }

    /// The moves in progress, as reported.
    pub fn move_views(&self) -> Vec<MoveView> {
        self.moves
            .iter()
            .map(|(group, target)| self.move_view(*group, target))
            .collect()
    }

    pub(crate) fn move_view(&self, group: u64, target: &[NodeId]) -> MoveView {
        let (owner, partition) = self.describe_group(group);
        MoveView {
            owner,
            partition,
            from: self.replicas_of(group).cloned().unwrap_or_default(),
            to: target.to_vec(),
        }
    }
}

impl Broker {
    /// Every node of the cluster and its address: the node table over the static config,
    /// removed nodes left out.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        let state = self.metadata();
        let mut nodes: BTreeMap<NodeId, String> = self
            .state
            .options
            .nodes
            .iter()
            .filter(|(id, _)| !state.removed_nodes.contains(id))
            .map(|(id, address)| (*id, address.clone()))
            .collect();
        for (id, info) in &state.nodes {
            nodes.insert(*id, info.address.clone());
        }
        nodes
    }

    /// Whether this node was drained and removed from the cluster: it serves no client (its
    /// metadata is no longer kept up to date).
    pub fn removed(&self) -> bool {
        self.state
            .meta
            .borrow()
            .removed_nodes
            .contains(&self.node_id())
    }

    /// The nodes new replicas may go to.
    pub(crate) fn placement_nodes(&self) -> Vec<NodeId> {
        let state = self.metadata();
        self.nodes()
            .into_keys()
            .filter(|node| state.placeable(*node))
            .collect()
    }

    /// Forms the cluster or joins it, then registers this node's address; returns once this
    /// node is a registered member, or when `shutdown` turns true. An error when the cluster
    /// refused this node (its id or address is another node's): it cannot serve.
    pub async fn bootstrap(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let me = self.node_id();
        let advertise = self.state.options.advertise.clone();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if self.state.node.meta_formed() {
                let state = self.metadata();
                if state.removed_nodes.contains(&me) {
                    tracing::warn!(
                        node = me,
                        "this node was drained and removed from the cluster: it serves no \
                         client; stop it, or empty its data directory to join again"
                    );
                    return Ok(());
                }
                if state
                    .nodes
                    .get(&me)
                    .is_some_and(|info| info.address == advertise)
                {
                    tracing::info!(node = me, "registered in the cluster");
                    return Ok(());
                }
                let command = MetaCommand::RegisterNode {
                    id: me,
                    address: advertise.clone(),
                    member: true,
                };
                match self
                    .meta_command(command, Instant::now() + COMMAND_TIMEOUT)
                    .await
                {
                    Ok(MetaAnswer::Rejected(reason)) => {
                        return Err(BrokerError::FailedPrecondition(reason));
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "registering this node"),
                }
            } else if let Err(reason) = self.form_or_join().await {
                return Err(BrokerError::FailedPrecondition(reason));
            }
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One attempt to form the cluster or join it (see the module doc). An error when the
    /// cluster refused this node.
    async fn form_or_join(&self) -> Result<(), String> {
        let me = self.node_id();
        let options = &self.state.options;
        let connect = self.state.node.options().connect_timeout;
        let mut addresses: Vec<&String> = options.join.iter().collect();
        addresses.extend(
            options
                .nodes
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(_, address)| address),
        );
        addresses.dedup();
        let seeds: Vec<Seed> = addresses
            .into_iter()
            .filter_map(|address| Seed::new(address, connect))
            .collect();
        let answers =
            futures::future::join_all(seeds.iter().map(|seed| seed.formed(SEED_TIMEOUT))).await;
        let mut formed = false;
        for (seed, answer) in seeds.iter().zip(&answers) {
            if *answer != Some(true) {
                continue;
            }
            formed = true;
            match seed.join(me, &options.advertise, SEED_TIMEOUT * 2).await {
                Ok(()) => {
                    tracing::info!(node = me, "joined the cluster; waiting for the metadata");
                    return Ok(());
                }
                Err(JoinFailure::Refused(reason)) => return Err(reason),
                Err(JoinFailure::Unavailable(reason)) => {
                    tracing::info!(%reason, "join not answered; trying another seed");
                }
            }
        }
        if formed {
            return Ok(());
        }
        let lowest = options.nodes.keys().next() == Some(&me);
        let unformed = 1 + answers
            .iter()
            .filter(|answer| **answer == Some(false))
            .count();
        if options.join.is_empty() && lowest && unformed * 2 > options.nodes.len() {
            if let Err(error) = self.state.node.initialize_meta(&options.nodes).await {
                tracing::warn!(%error, "metadata group initialize");
            }
        }
        Ok(())
    }

    /// Serves a join: registers the node (through the metadata leader).
    pub async fn join(
        &self,
        id: NodeId,
        address: &str,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        if id == 0 || address.is_empty() {
            return Err(BrokerError::invalid(
                ordo_proto::errors::reason::MALFORMED_MESSAGE,
                "a joining node needs an id above 0 and an address",
            ));
        }
        let command = MetaCommand::RegisterNode {
            id,
            address: address.to_string(),
            member: false,
        };
        match self.meta_command(command, Instant::now() + timeout).await? {
            MetaAnswer::Done => {
                tracing::info!(node = id, address, "node registered");
                Ok(())
            }
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// On the metadata leader: keeps every registered node a member of the metadata group and
    /// its voters an odd count of at most five; removes drained nodes.
    pub(crate) async fn meta_membership_loop(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(ROUND) => {}
            }
            if self.state.node.meta_leader() != Some(self.node_id()) {
                continue;
            }
            if let Err(error) = self.meta_membership_round().await {
                tracing::info!(%error, "metadata membership round");
            }
        }
    }

    async fn meta_membership_round(&self) -> Result<(), BrokerError> {
        let me = self.node_id();
        let node = &self.state.node;
        let state = self.metadata();
        let Some(members) = node.members(META_GROUP) else {
            return Ok(());
        };
        let internal = |error: ordo_raft::GroupError| BrokerError::Internal(error.to_string());
        // Members not registered (nodes of an older cluster, or one down since its upgrade):
        // the leader registers them with the address it knows, so they can be drained.
        for id in members.all_voters.iter().chain(&members.learners) {
            if state.nodes.contains_key(id) || state.removed_nodes.contains(id) {
                continue;
            }
            if let Some(address) = self.address(*id) {
                tracing::info!(node = id, %address, "registering a member of the metadata group");
                let command = MetaCommand::RegisterNode {
                    id: *id,
                    address,
                    member: true,
                };
                self.meta_command(command, Instant::now() + COMMAND_TIMEOUT)
                    .await?;
                return Ok(());
            }
        }
        // Registered nodes not yet members: learners first.
        for (id, info) in &state.nodes {
            if !members.all_voters.contains(id) && !members.learners.contains(id) {
                tracing::info!(node = id, address = %info.address, "adding a metadata learner");
                node.add_learner(META_GROUP, *id, &info.address, CHANGE_TIMEOUT)
                    .await
                    .map_err(internal)?;
                return Ok(());
            }
        }
        // Removed nodes leave once they are learners and have the whole log, so they applied
        // their own removal (and refuse clients from then on): one that is down stays a
        // learner until it comes back.
        let leaving: BTreeSet<NodeId> = members
            .learners
            .iter()
            .filter(|id| state.removed_nodes.contains(id) && members.caught_up(**id, 0))
            .copied()
            .collect();
        if !leaving.is_empty() {
            tracing::info!(nodes = ?leaving, "removing nodes from the metadata group");
            return node
                .remove_learners(META_GROUP, leaving, CHANGE_TIMEOUT)
                .await
                .map_err(internal);
        }
        // Voters change only once every member is registered (an older cluster registers its
        // nodes as they start) and no change is in flight.
        let registered = members
            .all_voters
            .iter()
            .chain(&members.learners)
            .all(|id| state.nodes.contains_key(id) || state.removed_nodes.contains(id));
        if members.joint {
            // A change cut off by a leader change: finish it.
            tracing::info!(to = ?members.voters, "finishing a metadata voter change");
            return node
                .change_voters(META_GROUP, members.voters.clone(), true, CHANGE_TIMEOUT)
                .await
                .map_err(internal);
        }
        if !registered {
            return Ok(());
        }
        let eligible: BTreeSet<NodeId> = state
            .active_nodes()
            .into_iter()
            .filter(|id| {
                members.voters.contains(id)
                    || (members.learners.contains(id) && members.caught_up(*id, CATCH_UP_SLACK))
            })
            .collect();
        let voters = meta_voters(&members.voters, &eligible);
        if voters != members.voters {
            if !voters.contains(&me) {
                // The leader leaves the voters: another one finishes the change.
                if let Some(to) = voters
                    .iter()
                    .find(|id| members.voters.contains(id) && members.caught_up(**id, 0))
                {
                    tracing::info!(
                        to,
                        "handing the metadata leadership over before leaving the voters"
                    );
                    node.transfer_meta_leader(*to).await.map_err(internal)?;
                }
                return Ok(());
            }
            tracing::info!(from = ?members.voters, to = ?voters, "changing the metadata voters");
            return node
                .change_voters(META_GROUP, voters, true, CHANGE_TIMEOUT)
                .await
                .map_err(internal);
        }
        // Drained nodes holding nothing leave the table (then the metadata group, above).
        for (id, info) in &state.nodes {
            let holds = state
                .moves
                .values()
                .chain(
                    state
                        .topics
                        .values()
                        .chain(state.coordinators.iter())
                        .flat_map(|topic| topic.partitions.iter()),
                )
                .chain(
                    state
                        .queues
                        .values()
                        .flat_map(|queue| queue.partitions.iter()),
                )
                .any(|replicas| replicas.contains(id));
            if info.draining && !holds && !members.voters.contains(id) {
                tracing::info!(node = id, "node drained; removing it");
                self.meta_command(
                    MetaCommand::RemoveNode { id: *id },
                    Instant::now() + COMMAND_TIMEOUT,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// On each group's leader: takes every move of a group it leads one step further.
    pub(crate) async fn move_loop(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(ROUND) => {}
            }
            let state = self.metadata();
            let me = self.node_id();
            let led: Vec<(u64, Vec<NodeId>)> = state
                .moves
                .iter()
                .filter(|(group, _)| {
                    self.state
                        .node
                        .members(GroupId(**group))
                        .is_some_and(|members| members.leader == Some(me))
                })
                .map(|(group, target)| (*group, target.clone()))
                .collect();
            // Every move this node leads takes a step, a bounded number at once: one that
            // waits (a slow change) does not hold back the others.
            use futures::StreamExt;
            futures::stream::iter(led.into_iter().map(|(group, target)| {
                let broker = self.clone();
                async move { broker.move_step(GroupId(group), &target).await }
            }))
            .buffer_unordered(MOVES_PER_ROUND_MAX)
            .collect::<Vec<()>>()
            .await;
            self.state.node.retain_throttled(|group, node| {
                state
                    .moves
                    .get(&group.0)
                    .is_some_and(|target| target.contains(&node))
            });
        }
    }

    /// One step of a group's move (see the module doc).
    async fn move_step(&self, group: GroupId, target: &[NodeId]) {
        let me = self.node_id();
        let node = &self.state.node;
        let Some(members) = node.members(group) else {
            return;
        };
        if members.leader != Some(me) {
            return;
        }
        let wanted: BTreeSet<NodeId> = target.iter().copied().collect();
        let (owner, partition) = self.metadata().describe_group(group.0);
        let span = tracing::info_span!("move", %owner, partition, to = ?target);
        let _entered = span.enter();
        let result = async {
            for new in wanted
                .iter()
                .filter(|id| !members.all_voters.contains(id) && !members.learners.contains(id))
            {
                let Some(address) = self.address(*new) else {
                    return Err(format!("node {new} has no known address"));
                };
                tracing::info!(node = new, "adding a replica as a learner");
                node.throttle(group, *new);
                node.add_learner(group, *new, &address, CHANGE_TIMEOUT)
                    .await
                    .map_err(|error| error.to_string())?;
            }
            // The new replicas must have caught up; a voter staying on may be down (the joint
            // config then needs a majority of each config, as any commit does).
            if let Some(behind) = wanted.iter().find(|id| {
                !members.all_voters.contains(id) && !members.caught_up(**id, CATCH_UP_SLACK)
            }) {
                tracing::debug!(node = behind, "new replica catching up");
                return Ok(());
            }
            // Caught up: from here on they are replicas like the others, never throttled.
            node.retain_throttled(|throttled, id| throttled != group || !wanted.contains(&id));
            if members.joint || members.voters != wanted {
                let voters = if wanted.contains(&me) {
                    wanted.clone()
                } else {
                    let mut with_me = wanted.clone();
                    with_me.insert(me);
                    if members.voters == with_me && !members.joint {
                        // Hand over to a caught-up target replica, which finishes. A leader
                        // transferring refuses writes until the target stands: never to one
                        // that is behind.
                        let Some(to) = target
                            .iter()
                            .filter(|id| members.caught_up(**id, CATCH_UP_SLACK))
                            .max_by_key(|id| members.matched.get(*id))
                            .copied()
                        else {
                            return Ok(());
                        };
                        tracing::info!(to, "handing leadership to a new replica");
                        node.transfer_leader(group, to)
                            .await
                            .map_err(|error| error.to_string())?;
                        return Ok(());
                    }
                    with_me
                };
                tracing::info!(from = ?members.voters, to = ?voters, "changing voters");
                return node
                    .change_voters(group, voters, false, CHANGE_TIMEOUT)
                    .await
                    .map_err(|error| error.to_string());
            }
            let strays: BTreeSet<NodeId> = members.learners.difference(&wanted).copied().collect();
            if !strays.is_empty() {
                return node
                    .remove_learners(group, strays, CHANGE_TIMEOUT)
                    .await
                    .map_err(|error| error.to_string());
            }
            if !members.committed {
                // The target config is appended, not yet committed: a new leader could still
                // fall back to the old one. The old replicas keep their copies until it is.
                return Ok(());
            }
            tracing::info!("replicas moved");
            let command = MetaCommand::FinishMove {
                group: group.0,
                replicas: target.to_vec(),
            };
            self.meta_command(command, Instant::now() + COMMAND_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        }
        .await;
        if let Err(reason) = result {
            tracing::info!(%reason, "move step not taken; retrying");
        }
    }

    /// Starts moving a topic's partitions to the replicas `plan` names (partition → replicas).
    pub async fn reassign_partitions(
        &self,
        topic: &str,
        plan: Vec<(u32, Vec<NodeId>)>,
        timeout: Duration,
    ) -> Result<Vec<MoveView>, BrokerError> {
        let deadline = Instant::now() + timeout;
        crate::names::validate_topic_name(topic)?;
        let current = self.topic_fresh(topic, deadline).await?;
        let nodes = self.nodes();
        let mut moves = Vec::with_capacity(plan.len());
        for (partition, replicas) in plan {
            if partition as usize >= current.partitions.len() {
                return Err(BrokerError::PartitionNotFound {
                    topic: topic.to_string(),
                    partition,
                    partitions: current.partitions.len() as u32,
                });
            }
            if moves
                .iter()
                .any(|(group, _)| *group == current.group(partition))
            {
                return Err(BrokerError::invalid(
                    ordo_proto::errors::reason::INVALID_PARTITIONS,
                    format!("partition {partition} is named twice in the plan"),
                ));
            }
            let distinct: BTreeSet<&NodeId> = replicas.iter().collect();
            if distinct.len() != replicas.len()
                || replicas.len() as u32 != current.replication_factor
            {
                return Err(BrokerError::invalid(
                    ordo_proto::errors::reason::INVALID_REPLICATION_FACTOR,
                    format!(
                        "topic {topic} has replication factor {}; partition {partition}'s plan \
                         must name that many distinct nodes, not {replicas:?}",
                        current.replication_factor
                    ),
                ));
            }
            if let Some(unknown) = replicas.iter().find(|node| !nodes.contains_key(node)) {
                return Err(BrokerError::NodeNotFound(*unknown));
            }
            moves.push((current.group(partition), replicas));
        }
        self.start_moves(MetaCommand::Reassign { moves }, deadline)
            .await
    }

    /// Starts moving every replica off a node; it leaves the cluster once it holds none.
    pub async fn drain_node(
        &self,
        id: NodeId,
        timeout: Duration,
    ) -> Result<Vec<MoveView>, BrokerError> {
        self.start_moves(MetaCommand::DrainNode { id }, Instant::now() + timeout)
            .await
    }

    /// Starts the moves that spread replicas and preferred leaders evenly.
    pub async fn rebalance(&self, timeout: Duration) -> Result<Vec<MoveView>, BrokerError> {
        self.start_moves(MetaCommand::Rebalance {}, Instant::now() + timeout)
            .await
    }

    async fn start_moves(
        &self,
        command: MetaCommand,
        deadline: Instant,
    ) -> Result<Vec<MoveView>, BrokerError> {
        let before = self.metadata();
        match self.meta_command(command, deadline).await? {
            MetaAnswer::Moving(moves) => Ok(moves
                .iter()
                .map(|(group, target)| before.move_view(*group, target))
                .collect()),
            MetaAnswer::NodeNotFound(node) => Err(BrokerError::NodeNotFound(node)),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }
}
