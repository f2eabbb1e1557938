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

use std::collections::BTreeMap;
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
/// Topic config key: what happens to old records (`delete`).
pub const CLEANUP_POLICY: &str = "cleanup.policy";

/// The cluster's retention defaults and how often they are applied. Units are in the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            check_interval_ms: 5_000,
            trim_timeout_ms: 5_000,
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
        Ok(())
    }
}

/// What one topic keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicRetention {
    /// Records older than this go; `None`: forever.
    pub retention_ms: Option<u64>,
    /// Each partition keeps at most this many bytes; `None`: no limit.
    pub retention_bytes: Option<u64>,
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
                if value != "delete" {
                    return Err(invalid(format!(
                        "{key} is {value:?}; use \"delete\" (compaction by key is not available yet)"
                    )));
                }
            }
            other => {
                return Err(invalid(format!(
                    "unknown topic config key {other:?}; known keys: {}, {RETENTION_MS}, {RETENTION_BYTES}, {CLEANUP_POLICY}",
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
            if retention.retention_ms.is_none() && retention.retention_bytes.is_none() {
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
