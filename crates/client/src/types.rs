//! Domain types of the public client API: what callers build and receive.
//!
//! These are plain data, independent of the wire structs in `ordo-proto` (the conversions live
//! in `convert.rs`, and nothing here may reference a proto type). All of them serialize with
//! serde for machine-readable output; byte fields serialize as a JSON string when they are valid
//! UTF-8 and as `{"hex": "..."}` otherwise, so no byte is lost or silently replaced.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Records with the same key go to the same partition, unless the produce names one.
    #[serde(serialize_with = "serialize_optional_bytes")]
    pub key: Option<Bytes>,
    /// The payload.
    #[serde(serialize_with = "serialize_bytes")]
    pub value: Bytes,
    /// Application headers, in order; names may repeat.
    #[serde(serialize_with = "serialize_headers")]
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch; when `None` the leader stamps its own clock.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// A record with `value` and no key, headers or timestamp.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// Sets the key, which decides the partition when the produce names none.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp in milliseconds since the Unix epoch.
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

/// Where one produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordAck {
    /// The partition the record was appended to.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
}

/// A committed record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRecord {
    /// The record's offset in its partition.
    pub offset: u64,
    /// The key it was produced with.
    #[serde(serialize_with = "serialize_optional_bytes")]
    pub key: Option<Bytes>,
    /// The payload.
    #[serde(serialize_with = "serialize_bytes")]
    pub value: Bytes,
    /// Application headers, in order.
    #[serde(serialize_with = "serialize_headers")]
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch, as produced or as stamped by the leader.
    pub timestamp_ms: i64,
}

/// The answer to one fetch, or one message of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchResult {
    /// The partition read.
    pub partition: u32,
    /// Committed records in offset order; may be empty.
    pub records: Vec<StoredRecord>,
    /// The offset after the last committed record of the partition.
    pub high_watermark: u64,
    /// The first offset still in the log.
    pub log_start_offset: u64,
}

impl FetchResult {
    /// The offset to read next: after the last record returned, or `None` when none was.
    pub fn next_offset(&self) -> Option<u64> {
        self.records
            .last()
            .map(|record| record.offset.saturating_add(1))
    }
}

/// Where a subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// At the first offset still in the log.
    Beginning,
    /// At the high watermark when the subscription starts: only new records.
    End,
    /// At this offset.
    Offset(u64),
}

/// One line of a topic listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSummary {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: u32,
}

/// A topic and the state of each of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Topic configuration entries (empty today).
    pub config: BTreeMap<String, String>,
    /// Partitions, in partition order.
    pub partitions: Vec<PartitionDescription>,
}

/// The state of one partition as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// Node id of the current leader, when one is known.
    pub leader: Option<u64>,
    /// Node ids holding a replica.
    pub replicas: Vec<u64>,
    /// The offset after the last committed record.
    pub high_watermark: u64,
    /// The first offset still in the log.
    pub log_start_offset: u64,
    /// The partition's raft term.
    pub term: u64,
    /// Per-replica replication progress, when the leader reports it.
    pub replica_status: Vec<ReplicaStatus>,
}

/// How far one replica is behind its leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// The replica's node id.
    pub node_id: u64,
    /// Log entries behind the leader's log, when the leader knows it.
    pub lag: Option<u64>,
}

/// The cluster as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// Node id of the node that answered.
    pub answered_by: u64,
    /// Node id of the metadata leader, when one is known.
    pub metadata_leader: Option<u64>,
    /// Term of the metadata raft group.
    pub metadata_term: u64,
    /// Every node of the cluster.
    pub nodes: Vec<NodeStatus>,
    /// Number of topics.
    pub topics: u32,
    /// Number of partitions over all topics.
    pub partitions: u32,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: u64,
    /// The node's advertised gRPC address.
    pub address: String,
    /// Whether the answering node could reach it.
    pub reachable: bool,
    /// Partitions this node leads.
    pub leader_count: u32,
    /// Partitions this node holds a replica of.
    pub replica_count: u32,
}

/// Serializes bytes as a string when they are UTF-8, else as `{"hex": "..."}`.
fn serialize_bytes<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serializer.serialize_str(text),
        Err(_) => {
            use serde::ser::SerializeMap;
            let mut map = serializer.serialize_map(Some(1))?;
            map.serialize_entry("hex", &hex(bytes))?;
            map.end()
        }
    }
}

// serde's `serialize_with` passes `&Option<Bytes>`; the reference is not ours to change.
#[allow(clippy::ref_option)]
fn serialize_optional_bytes<S: serde::Serializer>(
    bytes: &Option<Bytes>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => serialize_bytes(bytes, serializer),
        None => serializer.serialize_none(),
    }
}

fn serialize_headers<S: serde::Serializer>(
    headers: &[(String, Bytes)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;

    /// One header as a `{"key": .., "value": ..}` object.
    #[derive(Serialize)]
    struct Header<'a> {
        key: &'a str,
        #[serde(serialize_with = "serialize_bytes")]
        value: &'a [u8],
    }

    let mut seq = serializer.serialize_seq(Some(headers.len()))?;
    for (key, value) in headers {
        seq.serialize_element(&Header { key, value })?;
    }
    seq.end()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}
