//! Records as both ends of the API see them, and their one conversion to and from the wire.
//!
//! The broker and the Rust client share these types: [`Record`] (to produce) and
//! [`StoredRecord`] (read back with its offset). This module is the only place that builds or
//! reads `v1::Record`, `v1::StoredRecord` and `v1::Header` field by field. Both types serialize
//! with serde for machine-readable output: byte fields as a JSON string when they are valid UTF-8
//! and as `{"hex": "..."}` otherwise, so no byte is lost or silently replaced.

// The conversions run per record on the produce and fetch paths, from the broker's and the
// client's crates: `#[inline]` lets those crates inline them as when each had its own copy.

use bytes::Bytes;
use serde::Serialize;

use crate::v1;

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

    /// Bytes this record counts against the size limits: key, value and headers.
    #[inline]
    pub fn size_bytes(&self) -> u64 {
        payload_size(self.key.as_ref(), &self.value, &self.headers)
    }
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

/// Bytes of a record's key, value and headers.
fn payload_size(key: Option<&Bytes>, value: &Bytes, headers: &[(String, Bytes)]) -> u64 {
    let headers: usize = headers
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    (key.map_or(0, Bytes::len) + value.len() + headers) as u64
}

impl StoredRecord {
    /// Bytes of key, value and headers: what the record limits count.
    pub fn size_bytes(&self) -> u64 {
        payload_size(self.key.as_ref(), &self.value, &self.headers)
    }
}

#[inline]
fn headers_from_wire(headers: Vec<v1::Header>) -> Vec<(String, Bytes)> {
    headers
        .into_iter()
        .map(|header| (header.key, header.value))
        .collect()
}

#[inline]
fn headers_to_wire(headers: Vec<(String, Bytes)>) -> Vec<v1::Header> {
    headers
        .into_iter()
        .map(|(key, value)| v1::Header { key, value })
        .collect()
}

impl From<Record> for v1::Record {
    #[inline]
    fn from(record: Record) -> Self {
        v1::Record {
            key: record.key,
            value: record.value,
            headers: headers_to_wire(record.headers),
            timestamp_ms: record.timestamp_ms,
        }
    }
}

impl From<v1::Record> for Record {
    #[inline]
    fn from(record: v1::Record) -> Self {
        Record {
            key: record.key,
            value: record.value,
            headers: headers_from_wire(record.headers),
            timestamp_ms: record.timestamp_ms,
        }
    }
}

impl From<StoredRecord> for v1::StoredRecord {
    #[inline]
    fn from(record: StoredRecord) -> Self {
        v1::StoredRecord {
            offset: record.offset,
            key: record.key,
            value: record.value,
            headers: headers_to_wire(record.headers),
            timestamp_ms: record.timestamp_ms,
        }
    }
}

impl From<v1::StoredRecord> for StoredRecord {
    #[inline]
    fn from(record: v1::StoredRecord) -> Self {
        StoredRecord {
            offset: record.offset,
            key: record.key,
            value: record.value,
            headers: headers_from_wire(record.headers),
            timestamp_ms: record.timestamp_ms,
        }
    }
}

/// Serializes bytes as a string when they are UTF-8, else as `{"hex": "..."}`.
pub fn serialize_bytes<S: serde::Serializer>(
    bytes: &[u8],
    serializer: S,
) -> Result<S::Ok, S::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record survives the trip to the wire and back, headers in order and repeated.
    #[test]
    fn records_round_trip_through_the_wire() {
        let record = Record::new("v")
            .with_key("k")
            .with_header("a", "1")
            .with_header("a", "2")
            .with_timestamp_ms(7);
        assert_eq!(Record::from(v1::Record::from(record.clone())), record);
        let stored = StoredRecord {
            offset: 3,
            key: None,
            value: Bytes::from_static(b"\xff"),
            headers: vec![("h".into(), Bytes::from_static(b"x"))],
            timestamp_ms: 9,
        };
        assert_eq!(
            StoredRecord::from(v1::StoredRecord::from(stored.clone())),
            stored
        );
        assert_eq!(record.size_bytes(), 1 + 1 + 2 + 2);
    }

    /// A record keeps key, value, headers (in order) and timestamp on its way to the wire.
    #[test]
    fn record_to_wire_keeps_every_field() {
        let record = Record::new("value")
            .with_key("key")
            .with_header("a", "1")
            .with_header("a", "2")
            .with_timestamp_ms(42);
        let wire = v1::Record::from(record);
        assert_eq!(wire.key, Some(Bytes::from_static(b"key")));
        assert_eq!(wire.value, Bytes::from_static(b"value"));
        assert_eq!(wire.timestamp_ms, Some(42));
        let headers: Vec<(&str, &[u8])> = wire
            .headers
            .iter()
            .map(|header| (header.key.as_str(), header.value.as_ref()))
            .collect();
        assert_eq!(headers, vec![("a", &b"1"[..]), ("a", &b"2"[..])]);
    }

    /// A record without key or timestamp leaves them absent, so the server picks them.
    #[test]
    fn record_without_key_stays_without_key() {
        let wire = v1::Record::from(Record::new(Bytes::from_static(b"v")));
        assert_eq!(wire.key, None);
        assert_eq!(wire.timestamp_ms, None);
        assert!(wire.headers.is_empty());
    }
}
