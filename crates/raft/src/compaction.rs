//! Compaction by key: what a partition of a compacted topic keeps of its old records.
//!
//! A [`Command::Compact`](crate::Command::Compact) moves the partition's *clean point* forward,
//! to the base offset of a log entry. Applying it (on every replica, at the same log position,
//! so replicas agree) moves the records of the entries below it out of the log into one row per
//! record (`Table::Compacted`, by offset), keeping only the latest record of each key: a
//! record's arrival deletes the row of the key's previous record (`Table::KeyMap` says where it
//! is). A record with an empty value is a tombstone: it deletes its key's previous record, stays
//! itself for `delete.retention.ms` after it was cleaned (`Table::Tombstones`), so consumers see
//! the delete, and then goes too. Offsets never change: reads below the clean point return the
//! rows that are left, skipping the offsets compacted away; the log entries below it are purged
//! like those below a trim.
//!
//! Applying the same compaction twice changes nothing (a record is written only if it is its
//! key's latest), so a replica that installed a snapshot newer than some of the entries it then
//! re-applies ends with the same rows. The record format is the broker's: it splits batches
//! through a [`RecordCodec`].

use std::collections::HashMap;
use std::collections::HashSet;
use std::io;

use ordo_storage::GroupBatch;
use ordo_storage::GroupStore;
use ordo_storage::ROW_ID_MAX;
use ordo_storage::Table;
use serde::Deserialize;
use serde::Serialize;

use crate::codec::decode;
use crate::codec::encode;

/// Splits the record batches the broker encodes (opaque to this crate) for compaction.
pub trait RecordCodec: Send + Sync + 'static {
    /// The `count` records of `batch`, in order, each as a batch of its own.
    fn split(&self, batch: &[u8], count: u32) -> Result<Vec<SplitRecord>, String>;
}

/// One record of a batch, for compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRecord {
    /// Its key; records without one are kept (there is nothing to compact them by).
    pub key: Option<Vec<u8>>,
    /// Whether it deletes its key (an empty value).
    pub tombstone: bool,
    /// The record alone, encoded as a batch of one.
    pub batch: Vec<u8>,
}

/// Where compaction of a partition stands on one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStatus {
    /// Offsets below it are compacted.
    pub clean_offset: u64,
    /// Bytes of the compacted records kept.
    pub compacted_bytes: u64,
    /// Bytes of records in the log from the clean point (not compacted yet).
    pub dirty_bytes: u64,
    /// Tombstones among the compacted records.
    pub tombstones: u64,
}

/// How far compaction went, part of a partition's applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CompactionState {
    /// Offsets below it are in `Table::Compacted` (the base offset of a log entry, or 0).
    pub(crate) clean_offset: u64,
    /// The byte position of the entry at the clean point.
    pub(crate) clean_position: u64,
    /// The log index of the entry at the clean point (0: none compacted): the log below it may
    /// be purged.
    pub(crate) clean_index: u64,
    /// Rows in `Table::Compacted`.
    pub(crate) records: u64,
    /// Bytes of those rows.
    pub(crate) bytes: u64,
    /// Rows in `Table::Tombstones`.
    pub(crate) tombstones: u64,
    /// Compactions applied: a snapshot transfer that sees it change starts over.
    pub(crate) generation: u64,
}

/// A key's latest record below the clean point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyEntry {
    key: Vec<u8>,
    offset: u64,
    bytes: u64,
    tombstone: bool,
}

/// A tombstone's row: its key and when it was cleaned.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TombstoneRow {
    key: Vec<u8>,
    cleaned_at_ms: i64,
}

/// Tombstone rows looked at per compaction, at most.
const TOMBSTONES_PER_PASS: usize = 4096;

/// The key map buckets changed by compactions applied since the last persist (not readable
/// from the store yet), and the tombstones they removed.
#[derive(Default)]
pub(crate) struct Pending {
    buckets: HashMap<u64, Vec<KeyEntry>>,
    removed_tombstones: HashSet<u64>,
}

impl Pending {
    pub(crate) fn clear(&mut self) {
        self.buckets.clear();
        self.removed_tombstones.clear();
    }
}

fn bucket_of(key: &[u8]) -> u64 {
    ordo_proto::partition::fnv1a64(key) & ROW_ID_MAX
}

/// One compaction's writes to a partition's store.
pub(crate) struct Pass<'a> {
    pub(crate) store: &'a GroupStore,
    pub(crate) batch: &'a mut GroupBatch,
    pub(crate) pending: &'a mut Pending,
    pub(crate) state: &'a mut CompactionState,
    /// The log start: key map entries below it name rows retention deleted.
    pub(crate) start: u64,
    /// Whether the pass changed any row.
    pub(crate) changed: bool,
}

impl Pass<'_> {
    fn bucket(&mut self, id: u64) -> io::Result<Vec<KeyEntry>> {
        if let Some(bucket) = self.pending.buckets.get(&id) {
            return Ok(bucket.clone());
        }
        match self
            .store
            .get_row(Table::KeyMap, id)
            .map_err(io::Error::other)?
        {
            Some(row) => decode(&row),
            None => Ok(Vec::new()),
        }
    }

    fn set_bucket(&mut self, id: u64, bucket: Vec<KeyEntry>) -> io::Result<()> {
        self.changed = true;
        if bucket.is_empty() {
            self.store.delete_row(self.batch, Table::KeyMap, id);
        } else {
            self.store
                .put_row(self.batch, Table::KeyMap, id, &encode(&bucket)?);
        }
        self.pending.buckets.insert(id, bucket);
        Ok(())
    }

    fn drop_row(&mut self, offset: u64, bytes: u64, tombstone: bool) {
        self.changed = true;
        self.store.delete_row(self.batch, Table::Compacted, offset);
        self.state.records = self.state.records.saturating_sub(1);
        self.state.bytes = self.state.bytes.saturating_sub(bytes);
        if tombstone {
            self.store.delete_row(self.batch, Table::Tombstones, offset);
            self.pending.removed_tombstones.insert(offset);
            self.state.tombstones = self.state.tombstones.saturating_sub(1);
        }
    }

    fn put_row(&mut self, offset: u64, record: &SplitRecord) {
        self.changed = true;
        self.store
            .put_row(self.batch, Table::Compacted, offset, &record.batch);
        self.state.records += 1;
        self.state.bytes += record.batch.len() as u64;
    }

    /// Moves the record at `offset` below the clean point: it replaces its key's earlier
    /// record, unless a later one of that key is already there (compacted twice).
    pub(crate) fn add(
        &mut self,
        offset: u64,
        record: &SplitRecord,
        cleaned_at_ms: i64,
    ) -> io::Result<()> {
        let Some(key) = &record.key else {
            if self
                .store
                .get_row(Table::Compacted, offset)
                .map_err(io::Error::other)?
                .is_none()
            {
                self.put_row(offset, record);
            }
            return Ok(());
        };
        let id = bucket_of(key);
        let mut bucket = self.bucket(id)?;
        let entry = KeyEntry {
            key: key.clone(),
            offset,
            bytes: record.batch.len() as u64,
            tombstone: record.tombstone,
        };
        match bucket.iter_mut().find(|entry| &entry.key == key) {
            Some(latest) if latest.offset >= offset => return Ok(()),
            Some(latest) => {
                let (offset, bytes, tombstone) = (latest.offset, latest.bytes, latest.tombstone);
                *latest = entry;
                if offset >= self.start {
                    self.drop_row(offset, bytes, tombstone);
                }
            }
            None => bucket.push(entry),
        }
        self.put_row(offset, record);
        if record.tombstone {
            let row = TombstoneRow {
                key: key.clone(),
                cleaned_at_ms,
            };
            self.store
                .put_row(self.batch, Table::Tombstones, offset, &encode(&row)?);
            self.state.tombstones += 1;
        }
        self.set_bucket(id, bucket)
    }

    /// Deletes the tombstones cleaned at or before `horizon_ms`, with their keys.
    pub(crate) fn expire_tombstones(&mut self, horizon_ms: i64) -> io::Result<()> {
        if self.state.tombstones == 0 {
            return Ok(());
        }
        let rows = self
            .store
            .rows_from(Table::Tombstones, 0, TOMBSTONES_PER_PASS)
            .map_err(io::Error::other)?;
        for (offset, row) in rows {
            if self.pending.removed_tombstones.contains(&offset) {
                continue;
            }
            let row: TombstoneRow = decode(&row)?;
            // Rows are in offset order, which is cleaning order.
            if row.cleaned_at_ms > horizon_ms {
                break;
            }
            let id = bucket_of(&row.key);
            let mut bucket = self.bucket(id)?;
            let Some(at) = bucket
                .iter()
                .position(|entry| entry.key == row.key && entry.offset == offset)
            else {
                // Superseded since (its row goes with this batch).
                continue;
            };
            let entry = bucket.remove(at);
            self.drop_row(entry.offset, entry.bytes, true);
            self.set_bucket(id, bucket)?;
        }
        Ok(())
    }

    /// Deletes every compacted row below `start` (retention moved the log start past them);
    /// their keys stay in the key map until a later record of the key replaces them.
    pub(crate) fn trim(&mut self, start: u64) -> io::Result<()> {
        if self.state.records == 0 {
            return Ok(());
        }
        self.changed = true;
        if start >= self.state.clean_offset {
            for table in [Table::Compacted, Table::KeyMap, Table::Tombstones] {
                self.store.clear_table(self.batch, table);
            }
            self.pending.clear();
            self.state.records = 0;
            self.state.bytes = 0;
            self.state.tombstones = 0;
            return Ok(());
        }
        let dropped = self
            .store
            .rows_until(Table::Compacted, 0, start, usize::MAX)
            .map_err(io::Error::other)?;
        let tombstones = self
            .store
            .rows_until(Table::Tombstones, 0, start, usize::MAX)
            .map_err(io::Error::other)?;
        self.state.records = self.state.records.saturating_sub(dropped.len() as u64);
        self.state.bytes = self
            .state
            .bytes
            .saturating_sub(dropped.iter().map(|(_, row)| row.len() as u64).sum());
        self.state.tombstones = self
            .state
            .tombstones
            .saturating_sub(tombstones.len() as u64);
        self.store
            .delete_rows_below(self.batch, Table::Compacted, start);
        self.store
            .delete_rows_below(self.batch, Table::Tombstones, start);
        Ok(())
    }
}

/// The rows a partition snapshot carries beside its log entries, in the order they are sent.
pub(crate) const SNAPSHOT_TABLES: [Table; 3] = [Table::Compacted, Table::KeyMap, Table::Tombstones];

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &str) -> SplitRecord {
        SplitRecord {
            key: Some(key.as_bytes().to_vec()),
            tombstone: value.is_empty(),
            batch: format!("{key}={value}").into_bytes(),
        }
    }

    async fn run(
        store: &GroupStore,
        state: &mut CompactionState,
        work: impl FnOnce(&mut Pass<'_>) -> io::Result<()>,
    ) {
        let mut batch = store.batch();
        let mut pending = Pending::default();
        work(&mut Pass {
            store,
            batch: &mut batch,
            pending: &mut pending,
            state,
            start: 0,
            changed: false,
        })
        .unwrap();
        store.write(batch, None).await.unwrap();
    }

    fn rows(store: &GroupStore) -> Vec<(u64, String)> {
        store
            .rows(Table::Compacted)
            .unwrap()
            .into_iter()
            .map(|(offset, row)| (offset, String::from_utf8(row).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn latest_record_per_key_survives_and_tombstones_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = ordo_storage::Store::open(dir.path(), &Default::default()).unwrap();
        let group = store.group(ordo_storage::GroupId(7));
        let mut state = CompactionState::default();
        // Offsets 0..6: a, b, a, c, b (tombstone), a; all in one pass.
        let records = [
            record("a", "1"),
            record("b", "1"),
            record("a", "2"),
            record("c", "1"),
            record("b", ""),
            record("a", "3"),
        ];
        run(&group, &mut state, |pass| {
            for (offset, record) in records.iter().enumerate() {
                pass.add(offset as u64, record, 100)?;
            }
            Ok(())
        })
        .await;
        assert_eq!(
            rows(&group),
            vec![(3, "c=1".into()), (4, "b=".into()), (5, "a=3".into())]
        );
        assert_eq!((state.records, state.tombstones), (3, 1));
        // Compacting the same records again (a replica re-applying) changes nothing.
        run(&group, &mut state, |pass| {
            for (offset, record) in records.iter().enumerate() {
                pass.add(offset as u64, record, 100)?;
            }
            Ok(())
        })
        .await;
        assert_eq!(rows(&group).len(), 3);
        assert_eq!(state.records, 3);
        // Not yet expired, then expired: the tombstone and its key go.
        run(&group, &mut state, |pass| pass.expire_tombstones(99)).await;
        assert_eq!(rows(&group).len(), 3);
        run(&group, &mut state, |pass| pass.expire_tombstones(100)).await;
        assert_eq!(rows(&group), vec![(3, "c=1".into()), (5, "a=3".into())]);
        assert_eq!((state.records, state.tombstones), (2, 0));
        assert!(group.rows(Table::Tombstones).unwrap().is_empty());
        // A later b is new again; a later c replaces c=1.
        run(&group, &mut state, |pass| {
            pass.add(6, &record("b", "2"), 200)?;
            pass.add(7, &record("c", "2"), 200)
        })
        .await;
        assert_eq!(
            rows(&group),
            vec![(5, "a=3".into()), (6, "b=2".into()), (7, "c=2".into())]
        );
        assert_eq!(
            state.bytes,
            rows(&group).iter().map(|(_, row)| row.len() as u64).sum()
        );
    }
}
