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
