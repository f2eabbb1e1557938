//! Retention: how long and how much of each partition a topic keeps.
//!
//! A topic's config (`retention.ms`, `retention.bytes`, `cleanup.policy`; defaults from
//! [`RetentionConfig`]) says what may go. Every `check_interval_ms`, each node looks at the
//! partitions it leads and, when records fall outside the limits, proposes a trim through the
//! partition's Raft log (`ordo_raft::RaftNode::trim`): every replica then moves its log start
//! to the same offset, and deletes what is below it (`ordo_raft` and `ordo_storage` do the
//! deleting: log entries, index rows, journal files).
//!
//! By time: the records before the first batch whose largest timestamp so far reaches
//! `now - retention.ms` (the time index), so a record goes only once it and every record
//! before it are older. By bytes: the log entries before the first one from which the
//! partition holds at most `retention.bytes`. Offsets are never renumbered.
//!
//! Compaction by key (`cleanup.policy=compact`): each node's `compaction_loop` looks at the
//! partitions of compacted topics it leads; once the log past the clean point (dirty) is at least
//! `compaction_dirty_bytes_min` and `min.cleanable.dirty.ratio` of what the partition holds, it
//! proposes compactions (`ordo_raft::RaftNode::compact`) of `compaction_chunk_bytes` each, paced
//! to `compaction_bytes_per_sec` per node, up to the partition's last entry. Each keeps the
//! latest record of every key (see `ordo_raft`'s `compaction`); tombstones go
//! `delete.retention.ms` after they were cleaned.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use ordo_proto::errors::reason;
use ordo_raft::GroupId;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::Broker;
use crate::BrokerError;
use crate::limits::InvalidLimits;

/// Topic config key: how long records are kept, milliseconds (-1: forever).
pub const RETENTION_MS: &str = "retention.ms";
/// Topic config key: how many bytes of records each partition keeps at most (-1: no limit).
pub const RETENTION_BYTES: &str = "retention.bytes";
/// Topic config key: what happens to old records (`delete`: retention; `compact`: the latest
/// record of each key is kept).
pub const CLEANUP_POLICY: &str = "cleanup.policy";
/// Topic config key: how long a compacted tombstone stays readable, milliseconds.
pub const DELETE_RETENTION_MS: &str = "delete.retention.ms";
/// Topic config key: the share of a compacted partition's bytes not compacted yet from which
/// it is compacted (0 to 1).
pub const MIN_CLEANABLE_DIRTY_RATIO: &str = "min.cleanable.dirty.ratio";

/// The cluster's retention defaults and how often they are applied. Units are in the names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// `retention.ms` of a topic created without one; -1 keeps records forever. Default
    /// 604,800,000 (7 days).
    pub retention_ms: i64,
    /// `retention.bytes` of a topic created without one, per partition; -1: no limit. Default -1.
    pub retention_bytes: i64,
    /// How often each node applies retention to the partitions it leads. Default 5,000 ms.
    pub check_interval_ms: u64,
    /// Longest a trim may take to commit before it is tried again at the next check. Default
    /// 5,000 ms.
    pub trim_timeout_ms: u64,
    /// `delete.retention.ms` of a compacted topic created without one. Default 86,400,000
    /// (1 day).
    pub delete_retention_ms: u64,
    /// `min.cleanable.dirty.ratio` of a compacted topic created without one. Default 0.5.
    pub min_cleanable_dirty_ratio: f64,
    /// A compacted partition is not compacted before this many bytes are dirty. Default
    /// 1,048,576.
    pub compaction_dirty_bytes_min: u64,
    /// Most bytes of log one compaction (one Raft entry, applied on every replica) moves.
    /// Default 1,048,576.
    pub compaction_chunk_bytes: u64,
    /// Compaction's I/O budget per node: log bytes compacted per second, at most. Default
    /// 33,554,432 (32 MiB/s).
    pub compaction_bytes_per_sec: u64,
}

impl Eq for RetentionConfig {}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            check_interval_ms: 5_000,
            trim_timeout_ms: 5_000,
            delete_retention_ms: 24 * 3600 * 1000,
            min_cleanable_dirty_ratio: 0.5,
            compaction_dirty_bytes_min: 1 << 20,
            compaction_chunk_bytes: 1 << 20,
            compaction_bytes_per_sec: 32 << 20,
        }
    }
}

impl RetentionConfig {
    /// Rejects inconsistent settings at start-up.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        if self.retention_ms < -1
            || self.retention_ms == 0
            || self.retention_bytes < -1
            || self.retention_bytes == 0
        {
            return Err(InvalidLimits(
                "retention: retention_ms and retention_bytes must be -1 (no limit) or > 0",
            ));
        }
        if self.check_interval_ms == 0 || self.trim_timeout_ms == 0 {
            return Err(InvalidLimits(
                "retention: check_interval_ms and trim_timeout_ms must be > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_cleanable_dirty_ratio)
            || self.compaction_chunk_bytes == 0
            || self.compaction_bytes_per_sec == 0
        {
            return Err(InvalidLimits(
                "retention: min_cleanable_dirty_ratio must be in 0..=1, compaction_chunk_bytes and compaction_bytes_per_sec > 0",
            ));
        }
        Ok(())
    }
}

/// What one topic keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopicRetention {
    /// Records older than this go; `None`: forever.
    pub retention_ms: Option<u64>,
    /// Each partition keeps at most this many bytes; `None`: no limit.
    pub retention_bytes: Option<u64>,
    /// Compacted by key (`cleanup.policy=compact`) instead of trimmed.
    pub compact: bool,
    /// How long a compacted tombstone stays.
    pub delete_retention_ms: u64,
    /// The dirty share from which a compacted partition is compacted.
    pub min_cleanable_dirty_ratio: f64,
}

fn limit(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

impl TopicRetention {
    /// A topic's retention: its config, else the cluster defaults.
    pub fn of(config: &BTreeMap<String, String>, defaults: &RetentionConfig) -> TopicRetention {
        let read = |key: &str, default: i64| {
            config
                .get(key)
                .and_then(|value| value.parse::<i64>().ok())
                .unwrap_or(default)
        };
        TopicRetention {
            retention_ms: limit(read(RETENTION_MS, defaults.retention_ms)),
            retention_bytes: limit(read(RETENTION_BYTES, defaults.retention_bytes)),
            compact: config
                .get(CLEANUP_POLICY)
                .is_some_and(|policy| policy == "compact"),
            delete_retention_ms: config
                .get(DELETE_RETENTION_MS)
                .and_then(|value| value.parse().ok())
                .unwrap_or(defaults.delete_retention_ms),
            min_cleanable_dirty_ratio: config
                .get(MIN_CLEANABLE_DIRTY_RATIO)
                .and_then(|value| value.parse().ok())
                .unwrap_or(defaults.min_cleanable_dirty_ratio),
        }
    }
}

/// Checks a topic's config: the keys Ordo knows and their values. Bad input is
/// INVALID_ARGUMENT (INVALID_TOPIC_CONFIG) naming the key and what it takes.
pub fn validate_topic_config(config: &BTreeMap<String, String>) -> Result<(), BrokerError> {
    let invalid = |message: String| BrokerError::invalid(reason::INVALID_TOPIC_CONFIG, message);
    for (key, value) in config {
        match key.as_str() {
            crate::metadata::TIMESTAMP_TYPE => {
                if !matches!(value.as_str(), "create" | "append") {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use \"create\" (the producer's timestamps) or \"append\" (the receiving node's clock)"
                    )));
                }
            }
            RETENTION_MS | RETENTION_BYTES => match value.parse::<i64>() {
                Ok(n) if n == -1 || n > 0 => {}
                _ => {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use a whole number > 0, or -1 for no limit"
                    )));
                }
            },
            CLEANUP_POLICY => {
                if !matches!(value.as_str(), "delete" | "compact") {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use \"delete\" (retention.ms and retention.bytes trim the log) or \"compact\" (the latest record of each key is kept)"
                    )));
                }
            }
            DELETE_RETENTION_MS => {
                if value.parse::<u64>().is_err() {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use a whole number of milliseconds >= 0"
                    )));
                }
            }
            MIN_CLEANABLE_DIRTY_RATIO => {
                if !value
                    .parse::<f64>()
                    .is_ok_and(|ratio| (0.0..=1.0).contains(&ratio))
                {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use a number from 0 to 1"
                    )));
                }
            }
            other => {
                return Err(invalid(format!(
                    "unknown topic config key {other:?}; known keys: {}, {RETENTION_MS}, {RETENTION_BYTES}, {CLEANUP_POLICY}, {DELETE_RETENTION_MS}, {MIN_CLEANABLE_DIRTY_RATIO}",
                    crate::metadata::TIMESTAMP_TYPE
                )));
            }
        }
    }
    Ok(())
}

impl Broker {
    /// Applies retention to the partitions this node leads, every `check_interval_ms`, until
    /// shutdown.
    pub(crate) async fn retention_loop(self, mut shutdown: watch::Receiver<bool>) {
        let config = self.state.options.retention.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(config.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.apply_retention(&config).await;
        }
    }

    /// One pass of retention over the partitions this node leads.
    pub(crate) async fn apply_retention(&self, config: &RetentionConfig) {
        let me = self.node_id();
        let now_ms = crate::broker::now_ms();
        let timeout = Duration::from_millis(config.trim_timeout_ms);
        for topic in self.metadata().topics.values() {
            let retention = TopicRetention::of(&topic.config, config);
            if retention.compact
                || (retention.retention_ms.is_none() && retention.retention_bytes.is_none())
            {
                continue;
            }
            for partition in 0..topic.partitions.len() as u32 {
                let group = GroupId(topic.group(partition));
                if self.local_view_of_leader(group) != Some(me) {
                    continue;
                }
                let start = match self.retained_start(group, &retention, now_ms).await {
                    Ok(Some(start)) => start,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(topic = %topic.name, partition, %error, "retention");
                        continue;
                    }
                };
                match self.state.node.trim(group, start, timeout).await {
                    Ok(start) => {
                        tracing::debug!(topic = %topic.name, partition, start, "log start moved");
                    }
                    Err(error) => {
                        tracing::info!(topic = %topic.name, partition, %error, "retention trim not committed; next check retries");
                    }
                }
            }
        }
    }

    /// Compacts the partitions of compacted topics this node leads, every `check_interval_ms`,
    /// until shutdown.
    pub(crate) async fn compaction_loop(self, mut shutdown: watch::Receiver<bool>) {
        let config = self.state.options.retention.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(config.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tombstone_passes = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            tokio::select! {
                () = self.apply_compaction(&config, &mut tombstone_passes) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One pass of compaction over the partitions of compacted topics this node leads.
    async fn apply_compaction(
        &self,
        config: &RetentionConfig,
        tombstone_passes: &mut HashMap<GroupId, i64>,
    ) {
        let me = self.node_id();
        for topic in self.metadata().topics.values() {
            let retention = TopicRetention::of(&topic.config, config);
            if !retention.compact {
                continue;
            }
            for partition in 0..topic.partitions.len() as u32 {
                let group = GroupId(topic.group(partition));
                if self.local_view_of_leader(group) != Some(me) {
                    continue;
                }
                if let Err(error) = self
                    .compact_partition(&topic.name, group, config, &retention, tombstone_passes)
                    .await
                {
                    tracing::info!(topic = %topic.name, partition, %error, "compaction not done; the next check retries");
                }
            }
        }
    }

    /// Compacts one partition this node leads, if it is due: to its last entry when enough of
    /// it is dirty, in chunks paced to the I/O budget; or in place, to expire tombstones.
    async fn compact_partition(
        &self,
        topic: &str,
        group: GroupId,
        config: &RetentionConfig,
        retention: &TopicRetention,
        tombstone_passes: &mut HashMap<GroupId, i64>,
    ) -> Result<(), BrokerError> {
        let node = &self.state.node;
        let timeout = Duration::from_millis(config.trim_timeout_ms);
        let Some(status) = node.compaction_status(group) else {
            return Ok(());
        };
        let held = status.dirty_bytes + status.compacted_bytes;
        let dirty = status.dirty_bytes >= config.compaction_dirty_bytes_min
            && status.dirty_bytes as f64 >= retention.min_cleanable_dirty_ratio * held as f64;
        let now_ms = crate::broker::now_ms();
        // Tombstones expire by the clock: with nothing dirty, a compaction that moves nothing
        // still removes them, a few times per delete.retention.ms.
        let every = (retention.delete_retention_ms / 4).max(config.check_interval_ms);
        let tombstones_due = status.tombstones > 0
            && tombstone_passes
                .get(&group)
                .is_none_or(|last| now_ms.saturating_sub(*last) >= every as i64);
        if !dirty && !tombstones_due {
            return Ok(());
        }
        let internal = |error: &dyn std::fmt::Display| BrokerError::Internal(error.to_string());
        let mut clean = status.clean_offset;
        let mut tombstones_due = tombstones_due;
        loop {
            let target = if dirty {
                node.compaction_target(group, clean, config.compaction_chunk_bytes)
                    .await
                    .map_err(|error| internal(&error))?
            } else {
                None
            };
            // Nothing to move (the tail entry alone is dirty) and no tombstone to expire: a
            // compaction would change nothing.
            if target.is_none() && !tombstones_due {
                return Ok(());
            }
            if tombstones_due {
                tombstone_passes.insert(group, now_ms);
                tombstones_due = false;
            }
            let started = std::time::Instant::now();
            let moved_to = node
                .compact(
                    group,
                    target.unwrap_or(clean),
                    crate::broker::now_ms(),
                    retention.delete_retention_ms,
                    timeout,
                )
                .await
                .map_err(|error| internal(&error))?;
            tracing::debug!(%group, clean = moved_to, "compacted");
            if target.is_none() || moved_to <= clean {
                return Ok(());
            }
            // The I/O budget: this chunk's share of a second.
            let share = Duration::from_secs_f64(
                config.compaction_chunk_bytes as f64 / config.compaction_bytes_per_sec as f64,
            );
            tokio::time::sleep(share.saturating_sub(started.elapsed())).await;
            clean = moved_to;
            // Still the leader, and the topic still compacted (its policy may change online).
            let compacted = self
                .metadata()
                .topics
                .get(topic)
                .is_some_and(|topic| topic.compacted());
            if !compacted || self.local_view_of_leader(group) != Some(self.node_id()) {
                return Ok(());
            }
        }
    }

    /// The log start retention wants for a partition, if past its current one.
    async fn retained_start(
        &self,
        group: GroupId,
        retention: &TopicRetention,
        now_ms: i64,
    ) -> Result<Option<u64>, ordo_raft::ReadError> {
        let node = &self.state.node;
        let Some((current, end)) = node.log_range(group) else {
            return Ok(None);
        };
        let mut start = current;
        // Records before the first time index row have no known time (written before the time
        // index existed): time retention leaves them to retention.bytes.
        let timed_from = node.time_index_first(group).await?;
        if let Some(retention_ms) = retention.retention_ms
            && timed_from.is_some_and(|first| first <= current)
        {
            let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
            // The first batch whose largest timestamp so far reaches the cutoff; none: every
            // record is older.
            let kept_from = node.time_index_lookup(group, cutoff).await?.unwrap_or(end);
            start = start.max(kept_from);
        }
        if let Some(retention_bytes) = retention.retention_bytes
            && let Some((start_position, end_position)) = node.log_positions(group)
            && end_position - start_position > retention_bytes
        {
            let kept_from = node
                .offset_at_position(group, end_position - retention_bytes)
                .await?
                .unwrap_or(end);
            start = start.max(kept_from);
        }
        Ok((start > current).then_some(start.min(end)))
    }
}
