//! Every bound on client requests, in one place, with defaults. The server loads these from its
//! config file and environment and exports each as a metric.

use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

use crate::BrokerError;

/// Request limits. Units are in the names: bytes, counts, durations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest record (key + value + headers), bytes. Default 1 MiB.
    pub record_bytes_max: u64,
    /// Largest produce request (sum of its records), bytes. Default 8 MiB.
    pub batch_bytes_max: u64,
    /// Most records in one produce request. Default 10,000.
    pub batch_records_max: u64,
    /// Most partitions a topic may have. Default 1,024.
    pub partitions_per_topic_max: u32,
    /// Largest replication factor. Default 7.
    pub replication_factor_max: u32,
    /// Largest answer of one fetch, bytes. Default 8 MiB.
    pub fetch_bytes_max: u64,
    /// Longest a fetch may wait for records, milliseconds. Default 30 s.
    pub fetch_wait_ms_max: u64,
    /// Longest a produce waits for its quorum when the client sets no deadline, milliseconds.
    pub produce_timeout_ms: u64,
    /// Most produce requests in flight on one node before new ones get RESOURCE_EXHAUSTED.
    pub produce_in_flight_max: u64,
    /// Most producer names the cluster remembers (InitProducer with a producer_name). Past it,
    /// the name initialized longest ago (over a day ago) is forgotten; else RESOURCE_EXHAUSTED,
    /// TOO_MANY_PRODUCER_NAMES. Default 100,000.
    pub producer_names_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            record_bytes_max: 1 << 20,
            batch_bytes_max: 8 << 20,
            batch_records_max: 10_000,
            partitions_per_topic_max: 1024,
            replication_factor_max: 7,
            fetch_bytes_max: 8 << 20,
            fetch_wait_ms_max: 30_000,
            produce_timeout_ms: 10_000,
            produce_in_flight_max: 4096,
            producer_names_max: 100_000,
        }
    }
}

impl Limits {
    /// Rejects inconsistent limits at start-up.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        if self.record_bytes_max == 0 || self.batch_bytes_max < self.record_bytes_max {
            return Err(InvalidLimits(
                "need 0 < record_bytes_max <= batch_bytes_max",
            ));
        }
        if self.batch_records_max == 0
            || self.partitions_per_topic_max == 0
            || self.replication_factor_max == 0
        {
            return Err(InvalidLimits(
                "batch_records_max, partitions_per_topic_max and replication_factor_max must be > 0",
            ));
        }
        // Partition ids share a 20-bit field of the group id with nothing else.
        if self.partitions_per_topic_max > (1 << 20) {
            return Err(InvalidLimits("partitions_per_topic_max must be <= 1048576"));
        }
        if self.produce_timeout_ms == 0
            || self.produce_in_flight_max == 0
            || self.fetch_bytes_max == 0
            || self.producer_names_max == 0
        {
            return Err(InvalidLimits(
                "produce_timeout_ms, produce_in_flight_max, fetch_bytes_max and producer_names_max must be > 0",
            ));
        }
        Ok(())
    }

    /// The default produce deadline.
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }

    pub(crate) fn check(name: &'static str, actual: u64, max: u64) -> Result<(), BrokerError> {
        if actual > max {
            return Err(BrokerError::LimitExceeded { name, max, actual });
        }
        Ok(())
    }
}

/// Limits that contradict each other or cannot work; the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limits: {0}")]
pub struct InvalidLimits(pub &'static str);

/// Consumer groups: the coordinators and the bounds on groups, members and commits. Units are in
/// the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsConfig {
    /// Coordinator shards: Raft groups the group names hash to, created once with the cluster
    /// (changing it later has no effect). Default 8.
    pub coordinator_shards: u32,
    /// A member's session timeout when its heartbeat asks for none. Default 10 s.
    pub session_timeout_ms: u64,
    /// Shortest session timeout a member may ask for. Default 1 s.
    pub session_timeout_min_ms: u64,
    /// Longest session timeout a member may ask for. Default 5 min.
    pub session_timeout_max_ms: u64,
    /// The heartbeat interval members are told (at most a third of their session timeout).
    /// Default 1 s.
    pub heartbeat_interval_ms: u64,
    /// Most groups one coordinator shard holds (RESOURCE_EXHAUSTED, TOO_MANY_GROUPS). Default
    /// 10,000.
    pub groups_per_shard_max: u32,
    /// Most members of one group (RESOURCE_EXHAUSTED, TOO_MANY_MEMBERS). Default 1,000.
    pub members_per_group_max: u32,
    /// Most topics one member subscribes to (INVALID_ARGUMENT, LIMIT_EXCEEDED). Default 100.
    pub topics_per_member_max: u32,
    /// Most offsets in one CommitOffsets. Default 10,000.
    pub offsets_per_commit_max: u32,
    /// Largest metadata string of one committed offset, bytes. Default 4 KiB.
    pub commit_metadata_bytes_max: u32,
    /// Longest a group call waits for its coordinator when the client sets no deadline. Default
    /// 10 s.
    pub call_timeout_ms: u64,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        Self {
            coordinator_shards: 8,
            session_timeout_ms: 10_000,
            session_timeout_min_ms: 1_000,
            session_timeout_max_ms: 300_000,
            heartbeat_interval_ms: 1_000,
            groups_per_shard_max: 10_000,
            members_per_group_max: 1_000,
            topics_per_member_max: 100,
            offsets_per_commit_max: 10_000,
            commit_metadata_bytes_max: 4096,
            call_timeout_ms: 10_000,
        }
    }
}

impl GroupsConfig {
    /// Rejects inconsistent settings at start-up.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        if self.coordinator_shards == 0 || self.coordinator_shards > (1 << 20) {
            return Err(InvalidLimits(
                "groups.coordinator_shards must be in 1..=1048576",
            ));
        }
        if self.session_timeout_min_ms == 0
            || self.session_timeout_min_ms > self.session_timeout_ms
            || self.session_timeout_ms > self.session_timeout_max_ms
            || self.session_timeout_max_ms > u64::from(u32::MAX)
        {
            return Err(InvalidLimits(
                "need 0 < groups.session_timeout_min_ms <= session_timeout_ms <= session_timeout_max_ms < 2^32",
            ));
        }
        if self.heartbeat_interval_ms == 0
            || self.groups_per_shard_max == 0
            || self.members_per_group_max == 0
            || self.topics_per_member_max == 0
            || self.offsets_per_commit_max == 0
            || self.call_timeout_ms == 0
        {
            return Err(InvalidLimits(
                "groups: heartbeat_interval_ms, groups_per_shard_max, members_per_group_max, offsets_per_commit_max and call_timeout_ms must be > 0",
            ));
        }
        Ok(())
    }

    /// The heartbeat interval a member with this session timeout is told.
    pub fn heartbeat_interval_for(&self, session_timeout_ms: u64) -> u64 {
        self.heartbeat_interval_ms
            .min(session_timeout_ms / 3)
            .max(1)
    }

    /// The default deadline of a group call.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

/// Queues: the defaults a queue is created with and the bounds on queues, leases, delays and
/// consumers. Units are in the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// Most queues in the cluster (RESOURCE_EXHAUSTED, LIMIT_EXCEEDED). Default 1,000.
    pub queues_max: u32,
    /// A queue's lease length when it is created without one. Default 30 s.
    pub visibility_timeout_ms: u64,
    /// Shortest lease a queue or a receive may ask for. Default 100 ms.
    pub visibility_timeout_min_ms: u64,
    /// Longest lease a queue, a receive or an extension may ask for. Default 12 h.
    pub visibility_timeout_max_ms: u64,
    /// Deliveries before a message is dead-lettered, when a queue is created without a number.
    /// Default 5.
    pub max_deliveries: u32,
    /// Largest `max_deliveries` a queue may ask for. Default 1,000.
    pub max_deliveries_max: u32,
    /// Longest delay: a queue's delay, a nack's delay, and how far ahead of its timestamp a
    /// record's `ordo-deliver-at` may be (further is delivered at the horizon). Default 7 days.
    pub delay_max_ms: u64,
    /// Most messages leased at once per queue partition, and the default of a queue's own
    /// bound. Default 10,000.
    pub in_flight_per_partition_max: u32,
    /// Most messages one receive stream holds at once (its `max_in_flight`). Default 10,000;
    /// a stream that asks for none gets 100.
    pub consumer_in_flight_max: u32,
    /// Most bytes one receive stream holds at once (its `max_in_flight_bytes`). Default 64 MiB;
    /// a stream that asks for none gets 4 MiB.
    pub consumer_in_flight_bytes_max: u64,
    /// Most unfinished messages a queue partition keeps in its state (in flight, delayed,
    /// waiting behind a key); past it, newer records wait in the log. Default 100,000.
    pub messages_per_partition_max: u32,
    /// Most receipts in one Ack, Nack, ExtendLease or Reject. Default 1,000.
    pub receipts_per_call_max: u32,
    /// Longest a queue call waits for a partition's leader when the client sets no deadline.
    /// Default 10 s.
    pub call_timeout_ms: u64,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        Self {
            queues_max: 1_000,
            visibility_timeout_ms: 30_000,
            visibility_timeout_min_ms: 100,
            visibility_timeout_max_ms: 12 * 3600 * 1000,
            max_deliveries: 5,
            max_deliveries_max: 1_000,
            delay_max_ms: 7 * 24 * 3600 * 1000,
            in_flight_per_partition_max: 10_000,
            consumer_in_flight_max: 10_000,
            consumer_in_flight_bytes_max: 64 << 20,
            messages_per_partition_max: 100_000,
            receipts_per_call_max: 1_000,
            call_timeout_ms: 10_000,
        }
    }
}

impl QueuesConfig {
    /// Rejects inconsistent settings at start-up.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        if self.visibility_timeout_min_ms == 0
            || self.visibility_timeout_min_ms > self.visibility_timeout_ms
            || self.visibility_timeout_ms > self.visibility_timeout_max_ms
        {
            return Err(InvalidLimits(
                "need 0 < queues.visibility_timeout_min_ms <= visibility_timeout_ms <= visibility_timeout_max_ms",
            ));
        }
        if self.max_deliveries == 0 || self.max_deliveries > self.max_deliveries_max {
            return Err(InvalidLimits(
                "need 0 < queues.max_deliveries <= max_deliveries_max",
            ));
        }
        if self.queues_max == 0
            || self.in_flight_per_partition_max == 0
            || self.consumer_in_flight_max == 0
            || self.consumer_in_flight_bytes_max == 0
            || self.messages_per_partition_max < self.in_flight_per_partition_max
            || self.receipts_per_call_max == 0
            || self.call_timeout_ms == 0
        {
            return Err(InvalidLimits(
                "queues: queues_max, in_flight_per_partition_max, consumer_in_flight_max, consumer_in_flight_bytes_max, receipts_per_call_max and call_timeout_ms must be > 0, and messages_per_partition_max >= in_flight_per_partition_max",
            ));
        }
        Ok(())
    }

    /// The default deadline of a queue call.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}
