//! Records as the broker sees them, and the batch encoding stored in a Raft log entry.
//!
//! A batch is the postcard encoding of `Vec<StoredForm>`; its offsets are not stored, they come
//! from the entry's position (the partition state machine's index). Integrity is covered by the
//! checksum the storage layer keeps on every log entry.

use bytes::Bytes;
use ordo_proto::errors::reason;
use serde::Deserialize;
use serde::Serialize;

use crate::BrokerError;
use crate::Limits;

/// A record to append, and a committed record read back: shared with the Rust client, with their
/// one conversion to and from the wire, in `ordo_proto::record`.
pub use ordo_proto::record::Record;
pub use ordo_proto::record::StoredRecord;

#[derive(Serialize, Deserialize)]
struct StoredForm {
    key: Option<Bytes>,
    value: Bytes,
    headers: Vec<(String, Bytes)>,
    timestamp_ms: i64,
}

/// Encodes records for one log entry, stamping `now_ms` on those without a timestamp (and on
/// every record when `append_time`: the topic's `timestamp.type` is `append`). Returns the batch
/// and its records' largest timestamp.
pub(crate) fn encode_batch(
    records: &[Record],
    now_ms: i64,
    append_time: bool,
) -> Result<(Bytes, i64), BrokerError> {
    let forms: Vec<StoredForm> = records
        .iter()
        .map(|record| StoredForm {
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
            timestamp_ms: match record.timestamp_ms {
                Some(timestamp) if !append_time => timestamp,
                _ => now_ms,
            },
        })
        .collect();
    let max_timestamp = forms
        .iter()
        .map(|form| form.timestamp_ms)
        .max()
        .unwrap_or(now_ms);
    let batch = postcard::to_stdvec(&forms)
        .map(Bytes::from)
        .map_err(|error| BrokerError::Internal(format!("encoding a record batch: {error}")))?;
    Ok((batch, max_timestamp))
}

/// A stored record borrowed from its batch: decoding it copies nothing.
#[derive(Deserialize)]
struct BorrowedForm<'a> {
    #[serde(borrow)]
    key: Option<&'a [u8]>,
    value: &'a [u8],
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    timestamp_ms: i64,
}

/// Checks a batch that another node forwarded before it is proposed: it must decode, hold
/// exactly `count` records (the partition state machine numbers offsets by `count`), and stay
/// within the same limits a produce request is held to. Returns its records' largest timestamp.
pub(crate) fn validate_batch(
    batch: &[u8],
    count: u32,
    limits: &Limits,
) -> Result<i64, BrokerError> {
    Limits::check(
        "batch_bytes_max",
        batch.len() as u64,
        limits.batch_bytes_max.saturating_mul(2),
    )?;
    let forms: Vec<BorrowedForm<'_>> = postcard::from_bytes(batch).map_err(|error| {
        BrokerError::invalid(
            reason::BAD_FORWARDED_BATCH,
            format!("forwarded batch is undecodable: {error}"),
        )
    })?;
    if forms.is_empty() || forms.len() != count as usize {
        return Err(BrokerError::invalid(
            reason::BAD_FORWARDED_BATCH,
            format!(
                "forwarded batch holds {} records but claims {count}",
                forms.len()
            ),
        ));
    }
    Limits::check(
        "batch_records_max",
        u64::from(count),
        limits.batch_records_max,
    )?;
    let mut total = 0u64;
    for form in &forms {
        let headers: usize = form
            .headers
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum();
        let size = (form.key.map_or(0, <[u8]>::len) + form.value.len() + headers) as u64;
        Limits::check("record_bytes_max", size, limits.record_bytes_max)?;
        total += size;
    }
    Limits::check("batch_bytes_max", total, limits.batch_bytes_max)?;
    Ok(forms
        .iter()
        .map(|form| form.timestamp_ms)
        .max()
        .unwrap_or(i64::MIN))
}

/// Decodes a batch of `count` records whose first record has `base_offset`, keeping records at
/// `from..` and below `high_watermark`.
pub(crate) fn decode_batch(
    batch: &[u8],
    base_offset: u64,
    count: u32,
    from: u64,
    high_watermark: u64,
) -> Result<Vec<StoredRecord>, BrokerError> {
    let forms: Vec<StoredForm> = postcard::from_bytes(batch).map_err(|error| {
        BrokerError::Internal(format!(
            "stored batch at offset {base_offset} is undecodable: {error}"
        ))
    })?;
    if forms.len() != count as usize {
        return Err(BrokerError::Internal(format!(
            "stored batch at offset {base_offset} holds {} records but its entry says {count}",
            forms.len()
        )));
    }
    Ok(forms
        .into_iter()
        .enumerate()
        .map(|(position, form)| (base_offset + position as u64, form))
        .filter(|(offset, _)| *offset >= from && *offset < high_watermark)
        .map(|(offset, form)| StoredRecord {
            offset,
            key: form.key,
            value: form.value,
            headers: form.headers,
            timestamp_ms: form.timestamp_ms,
        })
        .collect())
}

/// The batch encoding, as compaction by key sees it (see `ordo_raft::RecordCodec`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordCodec;

impl ordo_raft::RecordCodec for RecordCodec {
    fn split(&self, batch: &[u8], count: u32) -> Result<Vec<ordo_raft::SplitRecord>, String> {
        let forms: Vec<BorrowedForm<'_>> =
            postcard::from_bytes(batch).map_err(|error| error.to_string())?;
        if forms.len() != count as usize {
            return Err(format!(
                "batch holds {} records but its entry says {count}",
                forms.len()
            ));
        }
        forms
            .into_iter()
            .map(|form| {
                let single = [StoredForm {
                    key: form.key.map(Bytes::copy_from_slice),
                    value: Bytes::copy_from_slice(form.value),
                    headers: form
                        .headers
                        .iter()
                        .map(|(name, value)| ((*name).to_owned(), Bytes::copy_from_slice(value)))
                        .collect(),
                    timestamp_ms: form.timestamp_ms,
                }];
                Ok(ordo_raft::SplitRecord {
                    key: form.key.map(<[u8]>::to_vec),
                    tombstone: form.value.is_empty(),
                    batch: postcard::to_stdvec(&single[..]).map_err(|error| error.to_string())?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any batch decodes to the records encoded, at consecutive offsets from the base.
        #[test]
        fn batch_round_trip(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20), base in 0u64..1_000_000) {
            let records: Vec<Record> = values.iter().enumerate().map(|(i, value)| Record {
                key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
                value: Bytes::from(value.clone()),
                headers: vec![("h".into(), Bytes::from_static(b"v"))],
                timestamp_ms: (i % 3 == 0).then_some(5),
            }).collect();
            let (encoded, max_timestamp) = encode_batch(&records, 77, false).unwrap();
            prop_assert_eq!(max_timestamp, records.iter().map(|record| record.timestamp_ms.unwrap_or(77)).max().unwrap());
            let count = records.len() as u32;
            let decoded = decode_batch(&encoded, base, count, base, u64::MAX).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (stored, record)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(stored.offset, base + i as u64);
                prop_assert_eq!(&stored.value, &record.value);
                prop_assert_eq!(&stored.key, &record.key);
                prop_assert_eq!(stored.timestamp_ms, record.timestamp_ms.unwrap_or(77));
            }
            // Slicing keeps only [from, high_watermark).
            let sliced = decode_batch(&encoded, base, count, base + 1, base + 2).unwrap();
            prop_assert!(validate_batch(&encoded, count, &Limits::default()).is_ok());
            prop_assert!(validate_batch(&encoded, count + 1, &Limits::default()).is_err());
            prop_assert!(validate_batch(&encoded[..encoded.len() - 1], count, &Limits::default()).is_err());
            prop_assert!(sliced.len() <= 1);
            // Compaction splits it into batches of one that decode to the same records.
            let split = ordo_raft::RecordCodec::split(&RecordCodec, &encoded, count).unwrap();
            prop_assert_eq!(split.len(), records.len());
            for (i, (one, record)) in split.iter().zip(&records).enumerate() {
                let alone = decode_batch(&one.batch, base + i as u64, 1, 0, u64::MAX).unwrap();
                prop_assert_eq!(&alone[0], &decoded[i]);
                prop_assert_eq!(one.key.as_deref(), record.key.as_deref());
                prop_assert_eq!(one.tombstone, record.value.is_empty());
            }
        }
    }
}
