//! Admin: topics (create, delete, list, describe) and the metadata commands behind them, run on
//! the metadata group's leader, here or forwarded (`peer`). Whether a command that ran out of
//! time may say "nothing done" is decided by `route::MetaRoute`.
//!
//! Also the serving side of a forwarded metadata command and of a metadata read index.

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_proto::errors::reason;
use ordo_raft::WriteError;

use crate::Broker;
use crate::BrokerError;
use crate::Limits;
use crate::NodeId;
use crate::TopicView;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::Topic;
use crate::names::validate_topic_name;
use crate::peer::CallError;
use crate::route::MetaFailure;
use crate::route::MetaRoute;
use crate::route::Verdict;
use crate::rpc::CallFailure;
use crate::rpc::MetaForward;

/// Pause between two looks at a new topic's partitions while waiting for their leaders.
const LEADER_WAIT_POLL: Duration = Duration::from_millis(50);
/// How long describe waits to catch up with the metadata before saying a topic is unknown.
const DESCRIBE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

impl Broker {
    /// Creates a topic and waits (until the deadline) for every partition to have a leader.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<TopicView, BrokerError> {
        let deadline = Instant::now() + timeout;
        validate_topic_name(name)?;
        let limits = &self.state.options.limits;
        if partitions == 0 {
            return Err(BrokerError::invalid(
                reason::INVALID_PARTITIONS,
                "a topic needs at least 1 partition",
            ));
        }
        Limits::check(
            "partitions_per_topic_max",
            u64::from(partitions),
            u64::from(limits.partitions_per_topic_max),
        )?;
        if replication_factor == 0 {
            return Err(BrokerError::invalid(
                reason::INVALID_REPLICATION_FACTOR,
                "replication factor must be at least 1",
            ));
        }
        Limits::check(
            "replication_factor_max",
            u64::from(replication_factor),
            u64::from(limits.replication_factor_max),
        )?;
        crate::retention::validate_topic_config(&config)?;
        let nodes: Vec<NodeId> = self.placement_nodes();
        if replication_factor as usize > nodes.len() {
            return Err(BrokerError::FailedPrecondition(format!(
                "replication factor {replication_factor} is above the {} nodes of the cluster; use at most {}",
                nodes.len(),
                nodes.len()
            )));
        }
        let command = MetaCommand::CreateTopic {
            name: name.to_string(),
            partitions,
            replication_factor,
            config,
            nodes,
        };
        match self.meta_command(command, deadline).await? {
            MetaAnswer::Created(topic) => Ok(self.describe_once_led(&topic, deadline).await),
            MetaAnswer::AlreadyExists => Err(BrokerError::TopicExists(name.to_string())),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// The topic once every partition has a leader (the local state includes the topic and
    /// its leaders, so an immediate produce finds them), or as it is at the deadline: best
    /// effort.
    async fn describe_once_led(&self, topic: &Topic, deadline: Instant) -> TopicView {
        let mut view = self.describe(topic).await;
        while Instant::now() < deadline
            && view
                .partitions
                .iter()
                .any(|partition| partition.leader.is_none())
        {
            tokio::time::sleep(LEADER_WAIT_POLL).await;
            view = self.describe(topic).await;
        }
        view
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str, timeout: Duration) -> Result<(), BrokerError> {
        validate_topic_name(name)?;
        match self
            .meta_command(
                MetaCommand::DeleteTopic {
                    name: name.to_string(),
                },
                Instant::now() + timeout,
            )
            .await?
        {
            MetaAnswer::Deleted => Ok(()),
            MetaAnswer::NotFound => Err(BrokerError::TopicNotFound(name.to_string())),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Changes a topic's config: sets the keys of `set`, removes those of `remove` (back to the
    /// cluster defaults). Returns the topic as it is then.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        timeout: Duration,
    ) -> Result<TopicView, BrokerError> {
        validate_topic_name(name)?;
        crate::retention::validate_topic_config(&set)?;
        if let Some(both) = remove.iter().find(|key| set.contains_key(*key)) {
            return Err(BrokerError::invalid(
                reason::INVALID_TOPIC_CONFIG,
                format!("{both:?} is both set and removed; do one"),
            ));
        }
        let command = MetaCommand::AlterTopicConfig {
            name: name.to_string(),
            set,
            remove,
        };
        match self.meta_command(command, Instant::now() + timeout).await? {
            MetaAnswer::Altered(topic) => Ok(self.describe(&topic).await),
            MetaAnswer::NotFound => Err(BrokerError::TopicNotFound(name.to_string())),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Raises a topic's partition count to `partitions` (the same count changes nothing) and
    /// waits (until the deadline) for the new partitions to have a leader. Returns the topic.
    pub async fn add_partitions(
        &self,
        name: &str,
        partitions: u32,
        timeout: Duration,
    ) -> Result<TopicView, BrokerError> {
        let deadline = Instant::now() + timeout;
        validate_topic_name(name)?;
        Limits::check(
            "partitions_per_topic_max",
            u64::from(partitions),
            u64::from(self.state.options.limits.partitions_per_topic_max),
        )?;
        let current = self.topic_fresh(name, deadline).await?;
        if (partitions as usize) < current.partitions.len() {
            return Err(BrokerError::invalid(
                reason::INVALID_PARTITIONS,
                format!(
                    "topic {name} has {} partitions and a partition count never goes down; \
                     create a new topic to have fewer",
                    current.partitions.len()
                ),
            ));
        }
        let command = MetaCommand::AddPartitions {
            name: name.to_string(),
            partitions,
            nodes: self.placement_nodes(),
        };
        match self.meta_command(command, deadline).await? {
            MetaAnswer::Altered(topic) => Ok(self.describe_once_led(&topic, deadline).await),
            MetaAnswer::NotFound => Err(BrokerError::TopicNotFound(name.to_string())),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Every topic.
    pub fn list_topics(&self) -> Vec<Topic> {
        self.metadata().topics.values().cloned().collect()
    }

    /// A topic with live partition state.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicView, BrokerError> {
        validate_topic_name(name)?;
        let topic = self
            .topic_fresh(name, Instant::now() + DESCRIBE_LOOKUP_TIMEOUT)
            .await?;
        Ok(self.describe(&topic).await)
    }

    /// Runs a metadata command on the metadata leader, forwarding if needed, until the deadline;
    /// then waits (within it) until this node applied it too, so reads that follow see it.
    pub(crate) async fn meta_command(
        &self,
        command: MetaCommand,
        deadline: Instant,
    ) -> Result<MetaAnswer, BrokerError> {
        let encoded = Bytes::from(postcard::to_stdvec(&command).map_err(|error| {
            BrokerError::Internal(format!("encoding a metadata command: {error}"))
        })?);
        let me = self.node_id();
        let mut route = MetaRoute::default();
        let mut last_error = String::from("no metadata leader known");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let message =
                    format!("the metadata group did not accept the command in time: {last_error}");
                return Err(match route.verdict() {
                    Verdict::MaybeWritten => BrokerError::OutcomeUnknown { message },
                    Verdict::NothingWritten => {
                        let leader = self.state.node.meta_leader();
                        BrokerError::Unavailable {
                            message,
                            leader,
                            leader_address: leader.and_then(|leader| self.address(leader)),
                        }
                    }
                });
            }
            let failure = match self.state.node.meta_leader() {
                None => MetaFailure::NoLeader,
                Some(leader) if leader == me => {
                    match self.state.node.write_meta(encoded.clone(), remaining).await {
                        Ok(answer) => return self.applied_answer(&answer, remaining).await,
                        Err(WriteError::OutcomeUnknown { reason, .. }) => {
                            return Err(BrokerError::OutcomeUnknown { message: reason });
                        }
                        // Proposed, then dropped here by a leader change: it may still commit
                        // under the new leader.
                        Err(error @ WriteError::Discarded { .. }) => {
                            last_error = error.to_string();
                            MetaFailure::MaybeDone
                        }
                        Err(error) => {
                            last_error = error.to_string();
                            MetaFailure::NoLeader
                        }
                    }
                }
                Some(leader) => match self
                    .peer(leader)
                    .forward_meta(encoded.clone(), remaining)
                    .await
                {
                    Ok(MetaForward::Applied(answer)) => {
                        return self.applied_answer(&answer, remaining).await;
                    }
                    Ok(MetaForward::NotLeader(_)) => {
                        last_error = format!("node {leader} is no longer the metadata leader");
                        MetaFailure::NoLeader
                    }
                    Ok(MetaForward::LeaderChanged(_)) => {
                        last_error = format!(
                            "node {leader} proposed the command, then lost the metadata leadership"
                        );
                        MetaFailure::MaybeDone
                    }
                    Err(CallError {
                        failure: CallFailure::OutcomeUnknown,
                        message,
                    }) => {
                        return Err(BrokerError::OutcomeUnknown { message });
                    }
                    Err(CallError {
                        failure: CallFailure::NothingDone | CallFailure::Refused(_),
                        message,
                    }) => {
                        last_error = message;
                        MetaFailure::NothingDone
                    }
                    Err(CallError {
                        failure: CallFailure::MaybeDone,
                        message,
                    }) => {
                        last_error = message;
                        MetaFailure::MaybeDone
                    }
                },
            };
            let pause = route.failed(failure);
            tokio::time::sleep(pause.min(remaining)).await;
        }
    }

    /// Decodes the leader's answer to a metadata command and waits, at most `timeout`, until this
    /// node applied the command too.
    async fn applied_answer(
        &self,
        answer: &[u8],
        timeout: Duration,
    ) -> Result<MetaAnswer, BrokerError> {
        let answer: MetaAnswer = postcard::from_bytes(answer).map_err(|error| {
            BrokerError::Internal(format!("undecodable metadata answer: {error}"))
        })?;
        if let MetaAnswer::Created(topic) = &answer {
            let mut meta = self.state.meta.clone();
            let _ = tokio::time::timeout(
                timeout,
                meta.wait_for(|state| {
                    state.topics.values().any(|known| known.id == topic.id)
                        || state
                            .coordinators
                            .as_ref()
                            .is_some_and(|known| known.id == topic.id)
                }),
            )
            .await;
        }
        Ok(answer)
    }

    /// Serves a forwarded metadata command.
    pub async fn handle_forward_meta(
        &self,
        command: Bytes,
        timeout: Duration,
    ) -> Result<MetaForward, BrokerError> {
        match self.state.node.write_meta(command, timeout).await {
            Ok(answer) => Ok(MetaForward::Applied(answer)),
            Err(WriteError::NotLeader { .. } | WriteError::GroupNotFound(_)) => {
                Ok(MetaForward::NotLeader(self.state.node.meta_leader()))
            }
            Err(WriteError::Discarded { leader, .. }) => Ok(MetaForward::LeaderChanged(leader)),
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                Err(BrokerError::OutcomeUnknown { message: reason })
            }
            Err(error) => Err(BrokerError::unavailable(error.to_string(), None)),
        }
    }

    /// Serves a read-index request: `None` when this node is not the metadata leader.
    pub async fn handle_meta_read_index(&self) -> Option<u64> {
        self.state.node.meta_read_index().await.ok()
    }

    /// The metadata read index from the leader, local or remote; `None` if none answered.
    pub(crate) async fn meta_read_index(&self, timeout: Duration) -> Option<u64> {
        let leader = self.state.node.meta_leader()?;
        if leader == self.node_id() {
            return self.state.node.meta_read_index().await.ok();
        }
        self.peer(leader).meta_read_index(timeout).await
    }
}
