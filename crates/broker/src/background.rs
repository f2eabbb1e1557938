//! Background loops of a node's broker, owned by the caller's `JoinSet` and stopped by the
//! shutdown watch: reconcile this node's Raft groups with the metadata (partitions and consumer
//! group coordinator shards, created by the first group call), hand leadership back to
//! preferred leaders, expire silent group members (`coordinator`), and the Raft layer's
//! watchdog (node-level failure detection).

use std::collections::BTreeMap;
use std::time::Duration;

use ordo_raft::GroupId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::Broker;
use crate::NodeId;

/// How often reconcile runs when the metadata does not change (a failed group start is retried
/// then).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
/// Leadership transfers one balance round may start, so a round never floods the cluster.
const TRANSFERS_PER_ROUND_MAX: usize = 32;

/// What a Raft group of the metadata holds.
#[derive(Clone, Copy)]
enum Kind {
    /// A topic's partition: a log.
    Log,
    /// A consumer group coordinator shard.
    Coordinator,
    /// A queue partition's state.
    Queue,
}

impl Broker {
    /// Spawns the background loops on `tasks`.
    pub(crate) fn spawn_background(
        &self,
        tasks: &mut JoinSet<()>,
        shutdown: watch::Receiver<bool>,
    ) {
        tasks.spawn(self.clone().reconcile_loop(shutdown.clone()));
        let broker = self.clone();
        tasks.spawn(
            self.state
                .node
                .clone()
                .run_watchdog(move || broker.nodes(), shutdown.clone()),
        );
        tasks.spawn(self.clone().meta_membership_loop(shutdown.clone()));
        tasks.spawn(self.clone().move_loop(shutdown.clone()));
        tasks.spawn(self.clone().expiry_loop(shutdown.clone()));
        tasks.spawn(self.clone().queue_loop(shutdown.clone()));
        tasks.spawn(self.clone().retention_loop(shutdown.clone()));
        tasks.spawn(self.clone().compaction_loop(shutdown.clone()));
        tasks.spawn(self.clone().leader_balance_loop(shutdown));
    }

    /// Keeps this node's partition groups in line with the metadata: starts the groups of
    /// partitions it replicates, removes those of deleted topics.
    async fn reconcile_loop(self, mut shutdown: watch::Receiver<bool>) {
        let mut meta = self.state.meta.clone();
        let me = self.node_id();
        loop {
            let state = meta.borrow_and_update().clone();
            for (node, address) in self.nodes() {
                if self.state.node.peers().address(node).as_deref() != Some(address.as_str()) {
                    self.state.node.peers().set_address(node, &address);
                }
            }
            let mut wanted = std::collections::HashSet::new();
            // Every group this node may host: (name, id, replicas per partition, kind).
            let coordinators = state
                .coordinators
                .iter()
                .map(|topic| (&topic.name, topic.id, &topic.partitions, Kind::Coordinator));
            let queues = state
                .queues
                .values()
                .map(|queue| (&queue.name, queue.id, &queue.partitions, Kind::Queue));
            for (name, id, partitions, kind) in state
                .topics
                .values()
                .map(|topic| (&topic.name, topic.id, &topic.partitions, Kind::Log))
                .chain(coordinators)
                .chain(queues)
            {
                for (partition, replicas) in partitions.iter().enumerate() {
                    let group = GroupId(crate::metadata::group_of(id, partition as u32));
                    // A move's new replicas host the group from the move's start, the old
                    // ones until it finished.
                    let target = state.moves.get(&group.0);
                    if !replicas.contains(&me) && !target.is_some_and(|target| target.contains(&me))
                    {
                        continue;
                    }
                    wanted.insert(group);
                    let members: BTreeMap<NodeId, String> = replicas
                        .iter()
                        .filter_map(|node| self.address(*node).map(|address| (*node, address)))
                        .collect();
                    let span =
                        tracing::info_span!("partition", node = me, topic = %name, partition);
                    let initialize = replicas[0] == me;
                    let node = &self.state.node;
                    let started = match kind {
                        Kind::Coordinator => {
                            let coordinators = &self.state.coordinators;
                            node.ensure_state_group(group, &members, initialize, || {
                                Box::new(coordinators.open(group))
                            })
                            .instrument(span)
                            .await
                        }
                        Kind::Queue => {
                            let queues = &self.state.queues;
                            node.ensure_state_group(group, &members, initialize, || {
                                Box::new(queues.open(group))
                            })
                            .instrument(span)
                            .await
                        }
                        Kind::Log => {
                            node.ensure_partition(group, &members, initialize)
                                .instrument(span)
                                .await
                        }
                    };
                    if let Err(error) = started {
                        tracing::error!(%group, %error, "cannot start partition group");
                    }
                }
            }
            // Leader hints of deleted topics would otherwise stay forever.
            let existing: std::collections::HashSet<u64> =
                state
                    .topics
                    .values()
                    .chain(state.coordinators.iter())
                    .flat_map(|topic| (0..topic.partitions.len() as u32).map(|p| topic.group(p)))
                    .chain(state.queues.values().flat_map(|queue| {
                        (0..queue.partitions.len() as u32).map(|p| queue.group(p))
                    }))
                    .collect();
            self.retain_leader_hints(|group| existing.contains(&group.0));
            for group in self.state.node.partition_groups() {
                if !wanted.contains(&group) {
                    tracing::info!(%group, "removing a partition group this node no longer replicates");
                    if let Err(error) = self.state.node.remove_partition(group).await {
                        tracing::error!(%group, %error, "cannot remove partition group");
                    }
                    self.state.queues.forget(group);
                }
            }
            tokio::select! {
                changed = meta.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            }
        }
    }

    /// Hands leadership of each partition back to its preferred leader (its first replica) once
    /// that replica is caught up, so leaders stay spread evenly after failures (Kafka's
    /// preferred leader election).
    async fn leader_balance_loop(self, mut shutdown: watch::Receiver<bool>) {
        let me = self.node_id();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.state.options.leader_balance_interval) => {}
            }
            let state = self.metadata();
            let mut transfers = 0;
            let queues = state
                .queues
                .values()
                .map(|queue| (&queue.name, queue.id, &queue.partitions));
            for (name, id, partitions) in state
                .topics
                .values()
                .chain(state.coordinators.iter())
                .map(|topic| (&topic.name, topic.id, &topic.partitions))
                .chain(queues)
            {
                for (partition, replicas) in partitions.iter().enumerate() {
                    let preferred = replicas[0];
                    if preferred == me || transfers >= TRANSFERS_PER_ROUND_MAX {
                        continue;
                    }
                    let group = GroupId(crate::metadata::group_of(id, partition as u32));
                    // A moving group's leadership is the move's to decide.
                    if state.moves.contains_key(&group.0) {
                        continue;
                    }
                    let Some(status) = self.state.node.status(group) else {
                        continue;
                    };
                    if status.leader != Some(me)
                        || status.matched.get(&preferred) != Some(&status.last_log_index)
                    {
                        continue;
                    }
                    tracing::info!(topic = %name, partition, to = preferred, "handing leadership to the preferred leader");
                    if let Err(error) = self.state.node.transfer_leader(group, preferred).await {
                        tracing::warn!(%group, %error, "leader transfer failed");
                    }
                    transfers += 1;
                }
            }
        }
    }
}
