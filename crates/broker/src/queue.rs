//! Queues, the service: each message to one consumer, acked one by one. A queue over a topic has,
//! per partition, a state group beside the topic's partition on the same replicas
//! (`queue_state`); every call arrives at any node and runs on that group's leader, here or
//! forwarded (through `Internal/ForwardCoordinator`, like a consumer group call).
//!
//! On the leader of a queue partition:
//! - A receive reads the records past the state's scan point from the local replica of the
//!   topic's partition (the same nodes replicate both), proposes `Receive` with their metadata,
//!   and answers the leased messages with their records. Leases are decided by the applied
//!   command, so a deposed leader never hands out a message twice.
//! - Settles (ack, nack, extend, reject) are proposed: acked = on a quorum's disk.
//! - A wait (a receive stream with nothing to take, or no room) parks on the state's change
//!   watch, the partition's high watermark and the next delayed message's time.
//! - The queue loop ends leases past their time (`Expire`) and moves messages marked for the
//!   dead-letter topic there (a produce), then finishes them (`DeadLettered`).
//!
//! The node that took a `Receive` stream runs one task per partition and keeps the stream's
//! flow control: what the consumer holds per partition comes back with each answer, and a
//! partition task asks for messages only while the stream holds less than its bounds.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ordo_proto::errors::reason;
use ordo_raft::GroupId;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::Broker;
use crate::BrokerError;
use crate::Limits;
use crate::Record;
use crate::StoredRecord;
use crate::broker::now_ms;
use crate::coordinator::CoordinatorOutcome;
use crate::coordinator::CoordinatorRequest;
use crate::coordinator::unexpected;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::Queue;
use crate::metadata::QueueConfig;
use crate::names::validate_consumer_id;
use crate::names::validate_queue_name;
use crate::queue_state::Held;
use crate::queue_state::MessageMeta;
use crate::queue_state::QueueAnswer;
use crate::queue_state::QueueCommand;
use crate::queue_state::QueueCounters;
use crate::queue_state::QueueSettings;
use crate::queue_state::Receipt;
use crate::queue_state::Settled;
use crate::queue_state::SharedQueue;
use crate::records::decode_batch;

/// The record header that delays a message: decimal milliseconds since the Unix epoch.
pub const DELIVER_AT_HEADER: &str = "ordo-deliver-at";
/// Headers a dead-letter record carries (besides the original ones).
pub const DLQ_TOPIC_HEADER: &str = "ordo-dlq-topic";
/// The source partition.
pub const DLQ_PARTITION_HEADER: &str = "ordo-dlq-partition";
/// The source offset.
pub const DLQ_OFFSET_HEADER: &str = "ordo-dlq-offset";
/// Deliveries before it was dead-lettered.
pub const DLQ_DELIVERIES_HEADER: &str = "ordo-dlq-deliveries";
/// Why.
pub const DLQ_REASON_HEADER: &str = "ordo-dlq-reason";
/// The queue.
pub const DLQ_QUEUE_HEADER: &str = "ordo-dlq-queue";

/// How often the queue loop looks for ended leases and dead letters.
const QUEUE_LOOP_INTERVAL: Duration = Duration::from_millis(25);
/// Longest a partition task's wait stays parked on the leader.
const WAIT_MAX: Duration = Duration::from_secs(5);
/// Most records one receive reads from the log into the state.
const SCAN_MAX: u32 = 1_000;
/// Bytes of log one scan reads at most.
const SCAN_BYTES_MAX: usize = 1 << 20;
/// Messages moved to the dead-letter topic per round.
const DEAD_LETTERS_PER_ROUND: usize = 100;
/// Most bytes of messages one lease call asks for (past by one message at most), so an answer
/// stays well inside the gRPC message bounds whatever a stream's own bound.
const LEASE_BYTES_MAX: u64 = 4 << 20;
/// Longest reject reason (bytes): it is stored with each message until the dead-letter write.
pub const REJECT_REASON_BYTES_MAX: usize = 1024;
/// Messages a stream holds when it asks for no bound.
const STREAM_IN_FLIGHT_DEFAULT: u32 = 100;
/// Bytes a stream holds when it asks for no bound.
const STREAM_BYTES_DEFAULT: u64 = 4 << 20;
/// Pause after a failed call of a partition task, doubled up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause of a partition task between failed calls.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// The queue partitions hosted on this node, by group, and the queue loop's chores running.
#[derive(Default)]
pub(crate) struct Queues {
    parts: Mutex<HashMap<GroupId, SharedQueue>>,
    busy: Mutex<std::collections::HashSet<(Chore, GroupId)>>,
}

/// Marks a partition as being scanned while alive.
struct Scanning<'a>(&'a Queues, GroupId);

impl Drop for Scanning<'_> {
    fn drop(&mut self) {
        self.0.end(Chore::Scan, self.1);
    }
}

/// A background chore of the queue loop on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Chore {
    Expire,
    DeadLetter,
    /// A receive reading the log past the scan point: one at a time, so concurrent receives
    /// do not all read (and propose) the same records.
    Scan,
}

impl Queues {
    /// A new state for a queue partition's group about to start.
    pub(crate) fn open(&self, group: GroupId) -> SharedQueue {
        let shared = SharedQueue::default();
        self.lock().insert(group, shared.clone());
        shared
    }

    fn get(&self, group: GroupId) -> Option<SharedQueue> {
        self.lock().get(&group).cloned()
    }

    fn all(&self) -> Vec<(GroupId, SharedQueue)> {
        self.lock()
            .iter()
            .map(|(group, shared)| (*group, shared.clone()))
            .collect()
    }

    /// Forgets the state of a group no longer hosted.
    pub(crate) fn forget(&self, group: GroupId) {
        self.lock().remove(&group);
    }

    /// Marks a chore as running on a group; false when it already is.
    fn begin(&self, chore: Chore, group: GroupId) -> bool {
        self.busy
            .lock()
            .expect("queue chores lock is never poisoned")
            .insert((chore, group))
    }

    fn running(&self, chore: Chore, group: GroupId) -> bool {
        self.busy
            .lock()
            .expect("queue chores lock is never poisoned")
            .contains(&(chore, group))
    }

    fn end(&self, chore: Chore, group: GroupId) {
        self.busy
            .lock()
            .expect("queue chores lock is never poisoned")
            .remove(&(chore, group));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, SharedQueue>> {
        self.parts.lock().expect("queue map lock is never poisoned")
    }
}

/// What to do with delivered messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleAction {
    /// Done for good.
    Ack,
    /// Deliver again, not before `delay_ms` from now.
    Nack {
        /// The delay.
        delay_ms: u64,
    },
    /// Keep the lease `visibility_ms` from now (0: the queue's visibility timeout).
    Extend {
        /// The new lease length.
        visibility_ms: u64,
    },
    /// To the dead-letter topic now.
    Reject {
        /// Why.
        reason: String,
    },
}

/// A call for a queue partition's leader (forwarded encoded with postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum QueueRequest {
    /// Lease up to `max` messages and about `max_bytes` to `consumer` now (no wait).
    Receive {
        target: Target,
        consumer: String,
        max: u32,
        max_bytes: u64,
        visibility_ms: u64,
    },
    /// Answer when a receive would get something (`ready`), or the consumer holds fewer than
    /// `known_held` messages, or `wait_ms` passed.
    Wait {
        target: Target,
        consumer: String,
        ready: bool,
        known_held: u32,
        wait_ms: u64,
    },
    /// Settle deliveries.
    Settle {
        target: Target,
        action: SettleAction,
        receipts: Vec<Receipt>,
    },
    /// The partition's state.
    Describe { target: Target },
}

/// Which queue partition a request is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    queue: String,
    queue_id: u64,
    partition: u32,
}

impl QueueRequest {
    fn target(&self) -> &Target {
        match self {
            QueueRequest::Receive { target, .. }
            | QueueRequest::Wait { target, .. }
            | QueueRequest::Settle { target, .. }
            | QueueRequest::Describe { target } => target,
        }
    }
}

/// A queue partition leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum QueueOutcome {
    /// Messages leased, and what the consumer holds on the partition now.
    Received {
        messages: Vec<QueueDelivery>,
        held: Held,
    },
    /// A wait ended: whether a receive would get something now.
    Waited { ready: bool, held: Held },
    /// Per receipt.
    Settled(Vec<Settled>),
    /// The partition's state.
    Described(QueuePartitionStatus),
    /// The leader does not know the queue (deleted, or re-created with another id).
    NotFound,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDelivery {
    /// The partition.
    pub partition: u32,
    /// The delivery count (1 the first time).
    pub delivery: u32,
    /// When the lease ends (the leader's clock, ms since the Unix epoch).
    pub lease_until_ms: u64,
    /// The record's offset.
    pub offset: u64,
    /// Its key.
    pub key: Option<Bytes>,
    /// Its value.
    pub value: Bytes,
    /// Its headers.
    pub headers: Vec<(String, Bytes)>,
    /// Its timestamp.
    pub timestamp_ms: i64,
}

/// One queue partition as its leader sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePartitionStatus {
    /// The partition.
    pub partition: u32,
    /// Every offset below is acked or dead-lettered.
    pub floor: u64,
    /// The log's end on the leader's replica.
    pub log_end: u64,
    /// Deliverable now, including records not yet read from the log.
    pub available: u64,
    /// Leased.
    pub in_flight: u64,
    /// Waiting for a deliver-at time or a nack's delay.
    pub delayed: u64,
    /// Leaving for the dead-letter topic.
    pub dead_lettering: u64,
    /// Timestamp of the oldest unfinished message read from the log.
    pub oldest_timestamp_ms: Option<u64>,
    /// Counters.
    pub acked: u64,
    /// Deliveries after the first.
    pub redeliveries: u64,
    /// Leases that ended unsettled.
    pub lease_expiries: u64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: u64,
    /// The node that answered (the leader).
    pub leader: u64,
}

/// What a receive stream asks for.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// The queue.
    pub queue: String,
    /// Who holds the leases (empty: one is made).
    pub consumer_id: String,
    /// Most messages held unsettled (0: 100).
    pub max_in_flight: u32,
    /// Most bytes held unsettled (0: 4 MiB).
    pub max_in_flight_bytes: u64,
    /// Lease length (0: the queue's).
    pub visibility_timeout_ms: u64,
}

/// A receive stream's batches of messages (an error ends it).
pub type ReceiveStream = mpsc::Receiver<Result<Vec<QueueDelivery>, BrokerError>>;

/// A stream's flow control: what it holds per partition (from the leaders' answers) and what a
/// partition task is asking for now.
struct Credit {
    max_messages: u32,
    max_bytes: u64,
    held: Vec<Held>,
    reserved: Vec<(u32, u64)>,
    /// Bumped when the stream's holding drops, to wake tasks waiting for room.
    room: watch::Sender<u64>,
}

impl Credit {
    /// Reserves the room left for partition `partition`'s next receive: `(messages, bytes)`,
    /// `(0, 0)` when the stream is full.
    fn reserve(&mut self, partition: usize) -> (u32, u64) {
        let room = self.room();
        if room.0 == 0 || room.1 == 0 {
            return (0, 0);
        }
        // A fair share, so one partition's call never holds all the room while others have
        // messages; a partition with more comes back for another share at once.
        let share = (self.max_messages / self.held.len().max(1) as u32).max(1);
        let reserved = (room.0.min(share), room.1.min(LEASE_BYTES_MAX));
        self.reserved[partition] = reserved;
        reserved
    }

    /// What the stream may still take: `(messages, bytes)`.
    fn room(&self) -> (u32, u64) {
        let messages: u32 = self.held.iter().map(|held| held.messages).sum::<u32>()
            + self
                .reserved
                .iter()
                .map(|(messages, _)| messages)
                .sum::<u32>();
        let bytes: u64 = self.held.iter().map(|held| held.bytes).sum::<u64>()
            + self.reserved.iter().map(|(_, bytes)| bytes).sum::<u64>();
        (
            self.max_messages.saturating_sub(messages),
            self.max_bytes.saturating_sub(bytes),
        )
    }

    /// A partition's answer: what the consumer holds there now.
    fn update(&mut self, partition: usize, held: Option<Held>) {
        let before = self.room();
        self.reserved[partition] = (0, 0);
        if let Some(held) = held {
            self.held[partition] = held;
        }
        // Partitions that found no room wait for this: wake them when room appears.
        let after = self.room();
        if (before.0 == 0 || before.1 == 0) && after.0 > 0 && after.1 > 0 {
            self.room.send_modify(|version| *version += 1);
        }
    }
}

impl Broker {
    /// The queue's settings for its state commands.
    fn settings(&self, queue: &Queue) -> QueueSettings {
        QueueSettings {
            max_deliveries: queue.config.max_deliveries,
            key_ordered: queue.config.key_ordered,
            in_flight_max: queue
                .config
                .in_flight_max
                .min(self.state.options.queues.in_flight_per_partition_max),
        }
    }

    /// The queue as this node applied it.
    fn queue(&self, name: &str) -> Option<Queue> {
        self.state.meta.borrow().queues.get(name).cloned()
    }

    /// The queue, catching up with the metadata leader first when this node does not know it
    /// (like [`Broker::topic_fresh`]).
    async fn queue_fresh(&self, name: &str, deadline: Instant) -> Result<Queue, BrokerError> {
        if let Some(queue) = self.queue(name) {
            return Ok(queue);
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(2));
        let caught_up = match self.meta_read_index(remaining).await {
            Some(index) => self.state.node.wait_meta_applied(index, remaining).await,
            None => false,
        };
        match self.queue(name) {
            Some(queue) => Ok(queue),
            None if caught_up => Err(BrokerError::QueueNotFound(name.to_owned())),
            None => {
                let leader = self.state.node.meta_leader();
                Err(BrokerError::Unavailable {
                    message: format!(
                        "node {} does not know queue {name:?} and could not reach the metadata leader to learn whether it exists; retry",
                        self.node_id()
                    ),
                    leader,
                    leader_address: leader.and_then(|leader| self.address(leader)),
                })
            }
        }
    }

    /// Creates a queue over `topic`; zero settings take the server's defaults. Without a
    /// dead-letter topic, `<name>-dlq` is created (1 partition) when missing.
    pub async fn create_queue(
        &self,
        name: &str,
        topic: &str,
        mut config: QueueConfig,
        timeout: Duration,
    ) -> Result<Queue, BrokerError> {
        let deadline = Instant::now() + timeout;
        validate_queue_name(name)?;
        crate::names::validate_topic_name(topic)?;
        let defaults = &self.state.options.queues;
        let bad = |message: String| BrokerError::invalid(reason::INVALID_QUEUE_CONFIG, message);
        if config.visibility_timeout_ms == 0 {
            config.visibility_timeout_ms = defaults.visibility_timeout_ms;
        }
        self.check_visibility(config.visibility_timeout_ms)?;
        if config.max_deliveries == 0 {
            config.max_deliveries = defaults.max_deliveries;
        }
        if config.max_deliveries > defaults.max_deliveries_max {
            return Err(bad(format!(
                "max_deliveries {} is above {} (queues.max_deliveries_max)",
                config.max_deliveries, defaults.max_deliveries_max
            )));
        }
        if config.delay_ms > defaults.delay_max_ms {
            return Err(bad(format!(
                "delay_ms {} is above {} (queues.delay_max_ms)",
                config.delay_ms, defaults.delay_max_ms
            )));
        }
        if config.in_flight_max == 0 {
            config.in_flight_max = defaults.in_flight_per_partition_max;
        }
        if config.in_flight_max > defaults.in_flight_per_partition_max {
            return Err(bad(format!(
                "in_flight_max {} is above {} (queues.in_flight_per_partition_max)",
                config.in_flight_max, defaults.in_flight_per_partition_max
            )));
        }
        let source = self.topic_fresh(topic, deadline).await?;
        if config.dead_letter_topic.is_empty() {
            config.dead_letter_topic = format!("{name}-dlq");
            if self
                .topic_fresh(&config.dead_letter_topic, deadline)
                .await
                .is_err()
            {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match self
                    .create_topic(
                        &config.dead_letter_topic,
                        1,
                        source.replication_factor,
                        BTreeMap::new(),
                        remaining,
                    )
                    .await
                {
                    Ok(_) | Err(BrokerError::TopicExists(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        } else {
            crate::names::validate_topic_name(&config.dead_letter_topic)?;
            if config.dead_letter_topic == topic {
                return Err(bad(format!(
                    "the dead-letter topic cannot be the queue's own topic {topic:?}: dead letters would come back to the queue"
                )));
            }
            self.topic_fresh(&config.dead_letter_topic, deadline)
                .await
                .map_err(|error| match error {
                    BrokerError::TopicNotFound(dlq) => bad(format!(
                        "dead-letter topic {dlq:?} does not exist; create it first, or leave dead_letter_topic empty for {name}-dlq"
                    )),
                    other => other,
                })?;
        }
        let command = MetaCommand::CreateQueue {
            name: name.to_owned(),
            topic: topic.to_owned(),
            config,
            queues_max: defaults.queues_max,
        };
        match self.meta_command(command, deadline).await? {
            MetaAnswer::QueueCreated(queue) => {
                self.wait_for_leaders(&queue, deadline).await;
                Ok(queue)
            }
            MetaAnswer::AlreadyExists => Err(BrokerError::QueueExists(name.to_owned())),
            MetaAnswer::NotFound => Err(BrokerError::TopicNotFound(topic.to_owned())),
            MetaAnswer::TooManyQueues { max } => Err(BrokerError::TooManyQueues { max }),
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Waits (best effort, until the deadline) until this node knows the queue and each of its
    /// partitions has a leader, so a receive right after finds them.
    async fn wait_for_leaders(&self, queue: &Queue, deadline: Instant) {
        let mut meta = self.state.meta.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(
            remaining,
            meta.wait_for(|state| state.queues.values().any(|known| known.id == queue.id)),
        )
        .await;
        while Instant::now() < deadline {
            let groups: Vec<u64> = (0..queue.partitions.len() as u32)
                .map(|partition| queue.group(partition))
                .collect();
            let mut led = 0;
            for (partition, group) in groups.iter().enumerate() {
                let replicas = &queue.partitions[partition];
                let local = self.local_view_of_leader(GroupId(*group));
                let remote = match local {
                    Some(leader) => Some(leader),
                    None => {
                        let statuses = self.peer(replicas[0]).group_status(vec![*group]).await;
                        statuses
                            .and_then(|statuses| statuses.first().and_then(|status| status.leader))
                    }
                };
                if remote.is_some() {
                    led += 1;
                }
            }
            if led == groups.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes a queue and its state.
    pub async fn delete_queue(&self, name: &str, timeout: Duration) -> Result<(), BrokerError> {
        validate_queue_name(name)?;
        let command = MetaCommand::DeleteQueue {
            name: name.to_owned(),
        };
        match self.meta_command(command, Instant::now() + timeout).await? {
            MetaAnswer::Deleted => Ok(()),
            MetaAnswer::NotFound => Err(BrokerError::QueueNotFound(name.to_owned())),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Every queue.
    pub fn list_queues(&self) -> Vec<Queue> {
        self.metadata().queues.values().cloned().collect()
    }

    /// A queue and each partition's state, from its leader (after a read barrier).
    pub async fn describe_queue(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(Queue, Vec<QueuePartitionStatus>), BrokerError> {
        validate_queue_name(name)?;
        let deadline = Instant::now() + timeout;
        let queue = self.queue_fresh(name, deadline).await?;
        let calls = (0..queue.partitions.len() as u32).map(|partition| {
            let request = QueueRequest::Describe {
                target: Self::target(&queue, partition),
            };
            self.queue_call(&queue, partition, request, deadline)
        });
        let mut partitions = Vec::new();
        for outcome in futures::future::join_all(calls).await {
            match outcome? {
                QueueOutcome::Described(status) => partitions.push(status),
                other => return Err(unexpected(&CoordinatorOutcome::Queue(other))),
            }
        }
        Ok((queue, partitions))
    }

    /// Settles deliveries: `(partition, receipt)` each; answers per receipt in order.
    pub async fn settle(
        &self,
        name: &str,
        action: SettleAction,
        receipts: Vec<(u32, Receipt)>,
        timeout: Duration,
    ) -> Result<Vec<Settled>, BrokerError> {
        validate_queue_name(name)?;
        let config = &self.state.options.queues;
        Limits::check(
            "queues.receipts_per_call_max",
            receipts.len() as u64,
            u64::from(config.receipts_per_call_max),
        )?;
        match &action {
            SettleAction::Nack { delay_ms } => {
                Limits::check("queues.delay_max_ms", *delay_ms, config.delay_max_ms)?;
            }
            SettleAction::Reject { reason } => {
                Limits::check(
                    "reject reason bytes",
                    reason.len() as u64,
                    REJECT_REASON_BYTES_MAX as u64,
                )?;
            }
            SettleAction::Extend { visibility_ms } if *visibility_ms != 0 => {
                self.check_visibility(*visibility_ms)?;
            }
            _ => {}
        }
        let deadline = Instant::now() + timeout;
        let queue = self.queue_fresh(name, deadline).await?;
        let action = match action {
            SettleAction::Extend { visibility_ms: 0 } => SettleAction::Extend {
                visibility_ms: queue.config.visibility_timeout_ms,
            },
            action => action,
        };
        let mut by_partition: BTreeMap<u32, Vec<(usize, Receipt)>> = BTreeMap::new();
        for (position, (partition, receipt)) in receipts.iter().enumerate() {
            if *partition as usize >= queue.partitions.len() {
                return Err(BrokerError::invalid(
                    reason::INVALID_RECEIPT,
                    format!(
                        "receipt names partition {partition}; queue {name:?} has partitions 0..{}",
                        queue.partitions.len()
                    ),
                ));
            }
            by_partition
                .entry(*partition)
                .or_default()
                .push((position, *receipt));
        }
        let calls = by_partition.into_iter().map(|(partition, receipts)| {
            let request = QueueRequest::Settle {
                target: Self::target(&queue, partition),
                action: action.clone(),
                receipts: receipts.iter().map(|(_, receipt)| *receipt).collect(),
            };
            let queue = &queue;
            async move {
                let outcome = self.queue_call(queue, partition, request, deadline).await;
                (receipts, outcome)
            }
        });
        let mut settled = vec![Settled::Unknown; receipts.len()];
        for (receipts, outcome) in futures::future::join_all(calls).await {
            match outcome? {
                QueueOutcome::Settled(outcomes) => {
                    for ((position, _), outcome) in receipts.iter().zip(outcomes) {
                        settled[*position] = outcome;
                    }
                }
                other => return Err(unexpected(&CoordinatorOutcome::Queue(other))),
            }
        }
        Ok(settled)
    }

    fn check_visibility(&self, visibility_ms: u64) -> Result<(), BrokerError> {
        let config = &self.state.options.queues;
        if !(config.visibility_timeout_min_ms..=config.visibility_timeout_max_ms)
            .contains(&visibility_ms)
        {
            return Err(BrokerError::invalid(
                reason::INVALID_VISIBILITY_TIMEOUT,
                format!(
                    "visibility timeout {visibility_ms} ms is outside {}..={} ms (queues.visibility_timeout_min_ms / max_ms); ask for one inside, or 0 for the queue's",
                    config.visibility_timeout_min_ms, config.visibility_timeout_max_ms
                ),
            ));
        }
        Ok(())
    }

    /// Starts a receive stream: messages leased to one consumer while it holds less than its
    /// bounds. Returns the consumer id and the stream (ends when dropped, or with an error).
    pub async fn receive(
        &self,
        options: ReceiveOptions,
    ) -> Result<(String, ReceiveStream), BrokerError> {
        validate_queue_name(&options.queue)?;
        validate_consumer_id(&options.consumer_id)?;
        let config = &self.state.options.queues;
        let max_in_flight = match options.max_in_flight {
            0 => STREAM_IN_FLIGHT_DEFAULT.min(config.consumer_in_flight_max),
            asked => asked,
        };
        Limits::check(
            "queues.consumer_in_flight_max",
            u64::from(max_in_flight),
            u64::from(config.consumer_in_flight_max),
        )?;
        let max_bytes = match options.max_in_flight_bytes {
            0 => STREAM_BYTES_DEFAULT.min(config.consumer_in_flight_bytes_max),
            asked => asked,
        };
        Limits::check(
            "queues.consumer_in_flight_bytes_max",
            max_bytes,
            config.consumer_in_flight_bytes_max,
        )?;
        if options.visibility_timeout_ms != 0 {
            self.check_visibility(options.visibility_timeout_ms)?;
        }
        let queue = self
            .queue_fresh(&options.queue, Instant::now() + config.call_timeout())
            .await?;
        let visibility_ms = match options.visibility_timeout_ms {
            0 => queue.config.visibility_timeout_ms,
            asked => asked,
        };
        let consumer = if options.consumer_id.is_empty() {
            use std::hash::BuildHasher;
            let seed =
                std::collections::hash_map::RandomState::new().hash_one((now_ms(), self.node_id()));
            format!("c-{seed:016x}")
        } else {
            options.consumer_id
        };
        let partitions = queue.partitions.len();
        let credit = Arc::new(Mutex::new(Credit {
            max_messages: max_in_flight,
            max_bytes,
            held: vec![Held::default(); partitions],
            reserved: vec![(0, 0); partitions],
            room: watch::channel(0).0,
        }));
        let (tx, rx) = mpsc::channel(partitions.max(1));
        for partition in 0..partitions as u32 {
            let task = PartitionTask {
                broker: self.clone(),
                queue: queue.clone(),
                partition,
                consumer: consumer.clone(),
                visibility_ms,
                credit: credit.clone(),
                tx: tx.clone(),
            };
            tokio::spawn(task.run());
        }
        Ok((consumer, rx))
    }

    fn target(queue: &Queue, partition: u32) -> Target {
        Target {
            queue: queue.name.clone(),
            queue_id: queue.id,
            partition,
        }
    }

    /// Runs a request on the leader of a queue partition's group until it answers or the
    /// deadline passes.
    async fn queue_call(
        &self,
        queue: &Queue,
        partition: u32,
        request: QueueRequest,
        deadline: Instant,
    ) -> Result<QueueOutcome, BrokerError> {
        let group = GroupId(queue.group(partition));
        let replicas = &queue.partitions[partition as usize];
        match self
            .on_coordinator(
                group,
                replicas,
                &CoordinatorRequest::Queue(request),
                deadline,
            )
            .await?
        {
            CoordinatorOutcome::Queue(QueueOutcome::NotFound) => {
                Err(BrokerError::QueueNotFound(queue.name.clone()))
            }
            CoordinatorOutcome::Queue(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    /// Serves a queue request on this node, which must lead the queue partition's group.
    pub(crate) async fn serve_queue(
        &self,
        group: GroupId,
        request: QueueRequest,
        timeout: Duration,
    ) -> CoordinatorOutcome {
        let deadline = Instant::now() + timeout;
        let Some(shared) = self.state.queues.get(group) else {
            return CoordinatorOutcome::NotLeader(None);
        };
        if self.leading_term(group).is_none() {
            return CoordinatorOutcome::NotLeader(self.local_view_of_leader(group));
        }
        let target = request.target().clone();
        let queue = match self.queue_fresh(&target.queue, deadline).await {
            Ok(queue)
                if queue.id == target.queue_id && queue.group(target.partition) == group.0 =>
            {
                queue
            }
            Ok(_) | Err(BrokerError::QueueNotFound(_)) => {
                return CoordinatorOutcome::Queue(QueueOutcome::NotFound);
            }
            Err(error) => return CoordinatorOutcome::Unknown(error.to_string()),
        };
        let part = Part {
            group,
            log: GroupId(queue.log_group(target.partition)),
            partition: target.partition,
            settings: self.settings(&queue),
            delay_ms: queue.config.delay_ms,
            shared,
        };
        match request {
            QueueRequest::Receive {
                consumer,
                max,
                max_bytes,
                visibility_ms,
                ..
            } => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                self.lease(&part, &consumer, max, max_bytes, visibility_ms, remaining)
                    .await
            }
            QueueRequest::Wait {
                consumer,
                ready,
                known_held,
                wait_ms,
                ..
            } => {
                let until = deadline.min(Instant::now() + Duration::from_millis(wait_ms));
                self.wait_ready(&part, &consumer, ready, known_held, until)
                    .await
            }
            QueueRequest::Settle {
                action, receipts, ..
            } => {
                let now_ms = now_ms() as u64;
                let command = match action {
                    SettleAction::Ack => QueueCommand::Ack { receipts },
                    SettleAction::Nack { delay_ms } => QueueCommand::Nack {
                        receipts,
                        delay_ms,
                        now_ms,
                        settings: part.settings,
                    },
                    SettleAction::Extend { visibility_ms } => QueueCommand::Extend {
                        receipts,
                        now_ms,
                        visibility_ms,
                    },
                    SettleAction::Reject { reason } => QueueCommand::Reject { receipts, reason },
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                match self.propose_state(group, &command, remaining).await {
                    Ok(QueueAnswer::Settled(settled)) => {
                        CoordinatorOutcome::Queue(QueueOutcome::Settled(settled))
                    }
                    Ok(other) => {
                        CoordinatorOutcome::Unknown(format!("unexpected answer {other:?}"))
                    }
                    Err(outcome) => outcome,
                }
            }
            QueueRequest::Describe { .. } => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if let Err(outcome) = self.barrier(group, remaining).await {
                    return outcome;
                }
                let status = self.partition_status(part.partition, part.log, &part.shared);
                CoordinatorOutcome::Queue(QueueOutcome::Described(status))
            }
        }
    }

    /// A queue partition's figures from this node's applied state.
    fn partition_status(
        &self,
        partition: u32,
        log: GroupId,
        shared: &SharedQueue,
    ) -> QueuePartitionStatus {
        let log_end = self.local_log_end(log);
        let now = now_ms() as u64;
        shared.read(|state| {
            let depth = state.depth(now);
            let unread = log_end.saturating_sub(state.scanned);
            let QueueCounters {
                acked,
                redeliveries,
                lease_expiries,
                dead_lettered,
            } = state.counters;
            QueuePartitionStatus {
                partition,
                floor: state.floor,
                log_end,
                available: depth.available + unread,
                in_flight: depth.in_flight,
                delayed: depth.delayed,
                dead_lettering: depth.dead_lettering,
                oldest_timestamp_ms: depth.oldest_timestamp_ms,
                acked,
                redeliveries,
                lease_expiries,
                dead_lettered,
                leader: self.node_id(),
            }
        })
    }

    /// The figures of every queue partition this node leads (state as applied here, without a
    /// read barrier): `(queue, status)`.
    pub fn queue_metrics(&self) -> Vec<(String, QueuePartitionStatus)> {
        let meta = self.metadata();
        let mut figures = Vec::new();
        for queue in meta.queues.values() {
            for partition in 0..queue.partitions.len() as u32 {
                let group = GroupId(queue.group(partition));
                let Some(shared) = self.state.queues.get(group) else {
                    continue;
                };
                if self.leading_term(group).is_none() {
                    continue;
                }
                let log = GroupId(queue.log_group(partition));
                figures.push((
                    queue.name.clone(),
                    self.partition_status(partition, log, &shared),
                ));
            }
        }
        figures
    }

    fn local_log_end(&self, log: GroupId) -> u64 {
        self.state
            .node
            .high_watermark(log)
            .map_or(0, |watermark| *watermark.borrow())
    }

    /// On the leader: reads what the state needs from the log, proposes a receive, answers the
    /// leased messages with their records.
    async fn lease(
        &self,
        part: &Part,
        consumer: &str,
        max: u32,
        max_bytes: u64,
        visibility_ms: u64,
        timeout: Duration,
    ) -> CoordinatorOutcome {
        let messages_max = self.state.options.queues.messages_per_partition_max as usize;
        let now = now_ms() as u64;
        // Lease only what this replica holds, so every lease is answered with its record.
        let readable_below = self.local_log_end(part.log);
        let (scanned, len, available, held) = part.shared.read(|state| {
            (
                state.scanned,
                state.messages.len(),
                state
                    .choose(consumer, max, max_bytes, readable_below, now, part.settings)
                    .len() as u32,
                state.held(consumer),
            )
        });
        let mut new = Vec::new();
        let scanning = (available < max
            && len < messages_max
            && self.state.queues.begin(Chore::Scan, part.group))
        .then(|| Scanning(&self.state.queues, part.group));
        if scanning.is_some() {
            let count = (max - available)
                .clamp(64, SCAN_MAX)
                .min((messages_max - len) as u32);
            match self.scan(part.log, scanned, count, part.delay_ms).await {
                Ok(metas) => new = metas,
                // The caller backs off and asks again.
                Err(error) if available == 0 => {
                    return CoordinatorOutcome::Unknown(format!(
                        "reading the log for queue partition {}: {error}",
                        part.group
                    ));
                }
                Err(error) => {
                    tracing::warn!(group = %part.group, %error, "reading the log for a queue");
                }
            }
        }
        if available == 0 && new.is_empty() {
            return CoordinatorOutcome::Queue(QueueOutcome::Received {
                messages: Vec::new(),
                held,
            });
        }
        let command = QueueCommand::Receive {
            consumer: consumer.to_owned(),
            max,
            max_bytes,
            new,
            readable_below,
            now_ms: now,
            visibility_ms,
            settings: part.settings,
        };
        let proposed = self.propose_state(part.group, &command, timeout).await;
        // The scan point moved (or not): waits that held back for it look again.
        if scanning.is_some() {
            drop(scanning);
            part.shared.touch();
        }
        let (deliveries, held) = match proposed {
            Ok(QueueAnswer::Received { deliveries, held }) => (deliveries, held),
            Ok(other) => {
                return CoordinatorOutcome::Unknown(format!("unexpected answer {other:?}"));
            }
            Err(outcome) => return outcome,
        };
        let offsets: Vec<u64> = deliveries.iter().map(|delivery| delivery.offset).collect();
        let mut records = self.records_at(part.log, &offsets).await;
        let messages = deliveries
            .into_iter()
            .filter_map(|delivery| {
                let Some(record) = records.remove(&delivery.offset) else {
                    // Not on this replica yet: the lease ends unsettled and it goes out again.
                    tracing::warn!(group = %part.group, offset = delivery.offset, "leased record not readable here");
                    return None;
                };
                Some(QueueDelivery {
                    partition: part.partition,
                    delivery: delivery.deliveries,
                    lease_until_ms: delivery.lease_until_ms,
                    offset: delivery.offset,
                    key: record.key,
                    value: record.value,
                    headers: record.headers,
                    timestamp_ms: record.timestamp_ms,
                })
            })
            .collect();
        CoordinatorOutcome::Queue(QueueOutcome::Received { messages, held })
    }

    /// On the leader: waits until a receive would get something (`ready`), or the consumer
    /// holds fewer than `known_held` messages, or `until`.
    async fn wait_ready(
        &self,
        part: &Part,
        consumer: &str,
        ready: bool,
        known_held: u32,
        until: Instant,
    ) -> CoordinatorOutcome {
        let messages_max = self.state.options.queues.messages_per_partition_max as usize;
        let mut changed = part.shared.subscribe();
        let mut log_end = self.state.node.high_watermark(part.log);
        loop {
            if self.leading_term(part.group).is_none() {
                return CoordinatorOutcome::NotLeader(self.local_view_of_leader(part.group));
            }
            changed.borrow_and_update();
            let end = log_end
                .as_mut()
                .map_or(0, |watermark| *watermark.borrow_and_update());
            let now = now_ms() as u64;
            let (available, more, held, next_due) = part.shared.read(|state| {
                (
                    !state
                        .choose(consumer, 1, u64::MAX, end, now, part.settings)
                        .is_empty(),
                    state.scanned < end && state.messages.len() < messages_max,
                    state.held(consumer),
                    state.next_due_after(now),
                )
            });
            // Records past the scan point are ready unless a receive is reading them now: its
            // apply wakes this wait.
            let more = more && !self.state.queues.running(Chore::Scan, part.group);
            let is_ready = available || more;
            if (ready && is_ready) || held.messages < known_held || Instant::now() >= until {
                return CoordinatorOutcome::Queue(QueueOutcome::Waited {
                    ready: is_ready,
                    held,
                });
            }
            let wake = next_due.map_or(until, |due| {
                let wait = Duration::from_millis(due.saturating_sub(now));
                until.min(Instant::now() + wait)
            });
            let log_changed = async {
                match log_end.as_mut() {
                    Some(watermark) => {
                        let _ = watermark.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.changed() => {}
                () = log_changed => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Reads up to `count` records from `from` on this node's replica of a partition, as the
    /// metadata a queue state takes in.
    async fn scan(
        &self,
        log: GroupId,
        from: u64,
        count: u32,
        delay_ms: u64,
    ) -> Result<Vec<MessageMeta>, BrokerError> {
        let delay_max_ms = self.state.options.queues.delay_max_ms;
        let records = self
            .read_records(log, from, count as usize, SCAN_BYTES_MAX as u64)
            .await?;
        Ok(records
            .into_iter()
            .map(|record| {
                let timestamp_ms = record.timestamp_ms.max(0) as u64;
                let asked = record
                    .headers
                    .iter()
                    .rev()
                    .find(|(name, _)| name == DELIVER_AT_HEADER)
                    .and_then(|(_, value)| {
                        std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok()
                    })
                    .unwrap_or(0)
                    .max(match delay_ms {
                        0 => 0,
                        delay => timestamp_ms.saturating_add(delay),
                    });
                MessageMeta {
                    offset: record.offset,
                    key: record
                        .key
                        .as_ref()
                        .map(|key| ordo_proto::partition::fnv1a64(key)),
                    deliver_at_ms: asked.min(timestamp_ms.saturating_add(delay_max_ms)),
                    bytes: u32::try_from(record.size_bytes()).unwrap_or(u32::MAX),
                    timestamp_ms,
                }
            })
            .collect())
    }

    /// Up to `count` committed records from `from`, read from this node's replica, stopping
    /// once they hold `bytes_max` (one record at least).
    async fn read_records(
        &self,
        log: GroupId,
        from: u64,
        count: usize,
        bytes_max: u64,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let mut records = Vec::new();
        let mut next = from;
        let mut bytes = 0u64;
        while records.len() < count && (records.is_empty() || bytes < bytes_max) {
            let read = match self.state.node.read(log, next, SCAN_BYTES_MAX).await {
                Ok(read) => read,
                // Retention deleted the records from `next` on to the start: go on from there
                // (a scan skips the offsets it finds no record at).
                Err(ordo_raft::ReadError::BelowStart { start, .. }) if start > next => {
                    next = start;
                    continue;
                }
                Err(error) => return Err(BrokerError::Internal(error.to_string())),
            };
            if read.batches.is_empty() {
                break;
            }
            for (base_offset, batch_count, batch) in &read.batches {
                for record in
                    decode_batch(batch, *base_offset, *batch_count, next, read.high_watermark)?
                {
                    if records.len() < count && (records.is_empty() || bytes < bytes_max) {
                        bytes += record.size_bytes();
                        records.push(record);
                    }
                }
            }
            match records.last() {
                Some(last) if last.offset >= next => next = last.offset + 1,
                _ => break,
            }
        }
        Ok(records)
    }

    /// The records at `offsets` (ascending), from this node's replica (leases are only made
    /// below its end). Missing ones are left out.
    async fn records_at(&self, log: GroupId, offsets: &[u64]) -> HashMap<u64, StoredRecord> {
        let mut found: HashMap<u64, StoredRecord> = HashMap::new();
        let Some(last) = offsets.iter().max().copied() else {
            return found;
        };
        for offset in offsets {
            if found.contains_key(offset) {
                continue;
            }
            let span = (last - offset + 1).min(u64::from(SCAN_MAX)) as usize;
            match self
                .read_records(log, *offset, span, LEASE_BYTES_MAX * 2)
                .await
            {
                Ok(records) => {
                    for record in records {
                        if offsets.binary_search(&record.offset).is_ok() {
                            found.insert(record.offset, record);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%log, offset, %error, "reading a leased record");
                }
            }
        }
        found
    }

    /// On each queue partition this node leads: ends leases past their time, and moves dead
    /// letters to the dead-letter topic. Each partition's expiry and its dead-letter move run in
    /// tasks of their own, one of each at a time, so a slow move (a dead-letter topic without
    /// a leader) holds up neither its own expiries nor other partitions.
    pub(crate) async fn queue_loop(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(QUEUE_LOOP_INTERVAL) => {}
            }
            let meta = self.metadata();
            let parts: HashMap<u64, (&Queue, u32)> = meta
                .queues
                .values()
                .flat_map(|queue| {
                    (0..queue.partitions.len() as u32)
                        .map(move |partition| (queue.group(partition), (queue, partition)))
                })
                .collect();
            let now = now_ms() as u64;
            for (group, shared) in self.state.queues.all() {
                let Some((queue, partition)) = parts.get(&group.0).copied() else {
                    continue;
                };
                if self.leading_term(group).is_none() {
                    continue;
                }
                let (lease_ended, dead_letters) = shared.read(|state| {
                    (
                        state.next_lease_end().is_some_and(|end| end <= now),
                        state.has_dead_letters(),
                    )
                });
                if lease_ended && self.state.queues.begin(Chore::Expire, group) {
                    let (broker, queue) = (self.clone(), queue.clone());
                    tokio::spawn(async move {
                        broker.expire(&queue, partition, group, now).await;
                        broker.state.queues.end(Chore::Expire, group);
                    });
                }
                if dead_letters && self.state.queues.begin(Chore::DeadLetter, group) {
                    let (broker, queue, shared) = (self.clone(), queue.clone(), shared.clone());
                    tokio::spawn(async move {
                        let batch: Vec<(u64, u32, String)> = shared.read(|state| {
                            state
                                .dead_lettering()
                                .into_iter()
                                .take(DEAD_LETTERS_PER_ROUND)
                                .collect()
                        });
                        if let Err(error) =
                            broker.dead_letter(&queue, partition, group, &batch).await
                        {
                            tracing::warn!(queue = %queue.name, partition, %error, "moving messages to the dead-letter topic");
                        }
                        broker.state.queues.end(Chore::DeadLetter, group);
                    });
                }
            }
        }
    }

    /// Ends the leases of one partition past `now_ms`.
    async fn expire(&self, queue: &Queue, partition: u32, group: GroupId, now_ms: u64) {
        let command = QueueCommand::Expire {
            now_ms,
            settings: self.settings(queue),
        };
        let timeout = self.state.options.queues.call_timeout();
        match self
            .propose_state::<_, QueueAnswer>(group, &command, timeout)
            .await
        {
            Ok(QueueAnswer::Expired {
                redelivered,
                dead_lettered,
            }) => {
                tracing::debug!(queue = %queue.name, partition, redelivered, dead_lettered, "leases ended");
            }
            Ok(_) => {}
            Err(outcome) => {
                tracing::warn!(queue = %queue.name, partition, ?outcome, "ending leases");
            }
        }
    }

    /// Writes messages marked for the dead-letter topic there, then finishes them. Batches are
    /// bounded in bytes; a batch the topic refuses is written one record at a time, and a record
    /// too large to go with the dead-letter headers goes without its value (header
    /// `ordo-dlq-value-dropped` says its size), so no message can block the queue's floor.
    async fn dead_letter(
        &self,
        queue: &Queue,
        partition: u32,
        group: GroupId,
        batch: &[(u64, u32, String)],
    ) -> Result<(), BrokerError> {
        let timeout = self.state.options.queues.call_timeout();
        let offsets: Vec<u64> = batch.iter().map(|(offset, _, _)| *offset).collect();
        let mut records = self
            .records_at(GroupId(queue.log_group(partition)), &offsets)
            .await;
        let mut letters: Vec<(u64, Record)> = Vec::new();
        for (offset, deliveries, why) in batch {
            let Some(record) = records.remove(offset) else {
                continue;
            };
            let mut headers = record.headers;
            headers.extend([
                (
                    DLQ_TOPIC_HEADER.to_owned(),
                    Bytes::from(queue.topic.clone()),
                ),
                (
                    DLQ_PARTITION_HEADER.to_owned(),
                    Bytes::from(partition.to_string()),
                ),
                (
                    DLQ_OFFSET_HEADER.to_owned(),
                    Bytes::from(offset.to_string()),
                ),
                (
                    DLQ_DELIVERIES_HEADER.to_owned(),
                    Bytes::from(deliveries.to_string()),
                ),
                (DLQ_REASON_HEADER.to_owned(), Bytes::from(why.clone())),
                (DLQ_QUEUE_HEADER.to_owned(), Bytes::from(queue.name.clone())),
            ]);
            let letter = Record {
                key: record.key,
                value: record.value,
                headers,
                timestamp_ms: Some(record.timestamp_ms),
            };
            letters.push((*offset, letter));
        }
        let limits = &self.state.options.limits;
        let bytes_max = limits.batch_bytes_max / 2;
        let topic = &queue.config.dead_letter_topic;
        let mut written = Vec::new();
        let mut start = 0;
        while start < letters.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < letters.len()
                && (end == start || bytes + letters[end].1.size_bytes() <= bytes_max)
            {
                bytes += letters[end].1.size_bytes();
                end += 1;
            }
            let chunk = &letters[start..end];
            let records: Vec<Record> = chunk.iter().map(|(_, record)| record.clone()).collect();
            match self.produce(topic, None, records, None, timeout).await {
                Ok(_) => written.extend(chunk.iter().map(|(offset, _)| *offset)),
                Err(BrokerError::InvalidArgument { .. } | BrokerError::LimitExceeded { .. }) => {
                    for (offset, record) in chunk {
                        let one = self
                            .produce(topic, None, vec![record.clone()], None, timeout)
                            .await;
                        match one {
                            Ok(_) => written.push(*offset),
                            Err(
                                BrokerError::InvalidArgument { .. }
                                | BrokerError::LimitExceeded { .. },
                            ) => {
                                let mut stripped = record.clone();
                                stripped.headers.push((
                                    "ordo-dlq-value-dropped".to_owned(),
                                    Bytes::from(record.value.len().to_string()),
                                ));
                                stripped.value = Bytes::new();
                                // What was written before must still be finished.
                                if let Err(error) = self
                                    .produce(topic, None, vec![stripped], None, timeout)
                                    .await
                                {
                                    return self
                                        .finish_dead_letters(group, written, Err(error))
                                        .await;
                                }
                                written.push(*offset);
                            }
                            Err(error) => {
                                return self.finish_dead_letters(group, written, Err(error)).await;
                            }
                        }
                    }
                }
                Err(error) => return self.finish_dead_letters(group, written, Err(error)).await,
            }
            start = end;
        }
        self.finish_dead_letters(group, written, Ok(())).await
    }

    /// Proposes `DeadLettered` for what was written, then returns `outcome`.
    async fn finish_dead_letters(
        &self,
        group: GroupId,
        written: Vec<u64>,
        outcome: Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        if !written.is_empty() {
            let command = QueueCommand::DeadLettered { offsets: written };
            let timeout = self.state.options.queues.call_timeout();
            self.propose_state::<_, QueueAnswer>(group, &command, timeout)
                .await
                .map_err(|outcome| {
                    BrokerError::Internal(format!("finishing dead letters: {outcome:?}"))
                })?;
        }
        outcome
    }
}

/// A queue partition as its leader serves it.
struct Part {
    group: GroupId,
    log: GroupId,
    partition: u32,
    settings: QueueSettings,
    delay_ms: u64,
    shared: SharedQueue,
}

/// The task of one partition of a receive stream.
struct PartitionTask {
    broker: Broker,
    queue: Queue,
    partition: u32,
    consumer: String,
    visibility_ms: u64,
    credit: Arc<Mutex<Credit>>,
    tx: mpsc::Sender<Result<Vec<QueueDelivery>, BrokerError>>,
}

impl PartitionTask {
    fn credit(&self) -> std::sync::MutexGuard<'_, Credit> {
        self.credit.lock().expect("credit lock is never poisoned")
    }

    async fn run(self) {
        let index = self.partition as usize;
        let mut room = self.credit().room.subscribe();
        let mut pause = RETRY_PAUSE;
        let call_timeout = self.broker.state.options.queues.call_timeout();
        // A leader wait still running, and whether it waits for readiness.
        type Waiting = (
            bool,
            tokio::task::JoinHandle<Result<QueueOutcome, BrokerError>>,
        );
        let mut waiting: Option<Waiting> = None;
        loop {
            if self.tx.is_closed() {
                return;
            }
            let (max, max_bytes) = self.credit().reserve(index);
            if max > 0 {
                let request = QueueRequest::Receive {
                    target: Broker::target(&self.queue, self.partition),
                    consumer: self.consumer.clone(),
                    max,
                    max_bytes,
                    visibility_ms: self.visibility_ms,
                };
                let deadline = Instant::now() + call_timeout;
                let outcome = tokio::select! {
                    outcome = self.broker.queue_call(&self.queue, self.partition, request, deadline) => outcome,
                    () = self.tx.closed() => return,
                };
                match outcome {
                    Ok(QueueOutcome::Received { messages, held }) => {
                        self.credit().update(index, Some(held));
                        pause = RETRY_PAUSE;
                        if !messages.is_empty() {
                            if self.tx.send(Ok(messages)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    Ok(other) => {
                        self.credit().update(index, None);
                        tracing::warn!(?other, "unexpected receive answer");
                    }
                    Err(error) => {
                        self.credit().update(index, None);
                        if !self.retry(error, &mut pause).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            // Nothing to take now, or no room: park on the leader until something is ready or
            // this consumer's holding there drops, or here until the stream has room again. The
            // leader's wait runs in a task of its own and is never cancelled: a burst of
            // cancelled calls resets HTTP/2 streams between nodes, and past h2's limit the whole
            // connection goes, answers of leases in flight with it. A wait left running when
            // room came is picked up next time round (or, if it waits for the other thing, left
            // to end by itself within WAIT_MAX).
            let ready = max > 0;
            room.borrow_and_update();
            let mut handle = match waiting.take() {
                Some((was_ready, handle)) if was_ready == ready => handle,
                _ => {
                    let request = QueueRequest::Wait {
                        target: Broker::target(&self.queue, self.partition),
                        consumer: self.consumer.clone(),
                        ready,
                        known_held: self.credit().held[index].messages,
                        wait_ms: WAIT_MAX.as_millis() as u64,
                    };
                    let deadline = Instant::now() + WAIT_MAX + call_timeout;
                    let (broker, queue, partition) =
                        (self.broker.clone(), self.queue.clone(), self.partition);
                    tokio::spawn(async move {
                        broker
                            .queue_call(&queue, partition, request, deadline)
                            .await
                    })
                }
            };
            tokio::select! {
                outcome = &mut handle => {
                    match outcome {
                        Ok(Ok(QueueOutcome::Waited { held, .. })) => {
                            self.credit().update(index, Some(held));
                            pause = RETRY_PAUSE;
                        }
                        Ok(Ok(other)) => tracing::warn!(?other, "unexpected wait answer"),
                        Ok(Err(error)) => {
                            if !self.retry(error, &mut pause).await {
                                return;
                            }
                        }
                        Err(_) => tokio::time::sleep(pause).await,
                    }
                }
                _ = room.changed(), if !ready => waiting = Some((ready, handle)),
                () = self.tx.closed() => return,
            }
        }
    }

    /// After a failed call: false (and the error sent) when the stream must end, else true
    /// after a pause.
    async fn retry(&self, error: BrokerError, pause: &mut Duration) -> bool {
        // A queue deleted (or re-created) answers "not leader" everywhere once its groups are
        // gone: this node's metadata tells.
        let gone = self
            .broker
            .queue(&self.queue.name)
            .is_none_or(|queue| queue.id != self.queue.id);
        let error = if gone {
            BrokerError::QueueNotFound(self.queue.name.clone())
        } else {
            error
        };
        if matches!(
            error,
            BrokerError::QueueNotFound(_) | BrokerError::InvalidArgument { .. }
        ) {
            let _ = self.tx.send(Err(error)).await;
            return false;
        }
        tracing::debug!(queue = %self.queue.name, partition = self.partition, %error, "queue call failed; retrying");
        tokio::time::sleep(*pause).await;
        *pause = (*pause * 2).min(RETRY_PAUSE_MAX);
        true
    }
}
