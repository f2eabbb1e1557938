//! Partition snapshots with their records, streamed in chunks.
//!
//! A partition's snapshot is its small state (`machine::PartitionSnapshot`) plus its records:
//! the log entries from the one holding the log start to the snapshot's index, their offset
//! index entries and the time index. openraft hands the leader's network a snapshot to send
//! ([`stream`]); the records then travel as `Internal/Raft` calls of kind `SnapshotChunk`:
//! 1. `Begin`: the follower answers where to start ([`Cursor`]). It stages what arrives in a
//!    sibling group (`machine::staging_group`) and keeps it across attempts, so a transfer cut
//!    off (a leader change, a restart, a timeout) resumes where the staging ends: committed
//!    entries are the same whoever sends them.
//! 2. `Records`: up to [`CHUNK_BYTES`] of log entries with their index entries and time index
//!    rows, and a CRC-32C over them; the follower verifies it and stages them.
//! 3. `Finish`: the follower checks the staging covers the snapshot and hands openraft the
//!    snapshot; installing it adopts the staged records (`machine::PartitionLogic::install`,
//!    `ordo_storage::GroupStore::adopt`: pointers move, bytes are not copied again).
//!
//! Never: install a partition snapshot whose records are not all staged; stage entries sent
//! under another vote than the transfer's `Begin`.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use ordo_storage::GroupStore;
use ordo_storage::IndexEntry;
use ordo_storage::Table;
use serde::Deserialize;
use serde::Serialize;

use crate::machine::SnapshotRecords;
use crate::types::SnapshotMeta;
use crate::types::Vote;

/// Most bytes of log entries in one `Records` chunk (at least one entry).
pub(crate) const CHUNK_BYTES: usize = 4 << 20;

/// Deadline of one call of a transfer (a chunk of records, or the install at `Finish`, which
/// moves every staged pointer in one write).
pub(crate) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Index entries or time index rows in one chunk, at most.
const ROWS_PER_CHUNK_MAX: usize = 16_384;

/// One `SnapshotChunk` call.
#[derive(Serialize, Deserialize)]
pub(crate) enum Message {
    /// A transfer starts: the snapshot at `last_index` needs the entries from `first_index`.
    /// Answered with a [`Cursor`].
    Begin {
        vote: Vote,
        first_index: u64,
        last_index: u64,
    },
    /// Records to stage. Answered with `()`.
    Records { vote: Vote, chunk: Chunk, crc: u32 },
    /// The snapshot itself: install it. Answered with openraft's `SnapshotResponse`.
    Finish {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
}

/// Where a transfer goes on: the next log index, the next offset of an index entry, and the next
/// time index key the follower has not staged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cursor {
    pub(crate) next_index: u64,
    pub(crate) next_offset: u64,
    pub(crate) next_time: u64,
    /// The next row of the compacted tables (`compaction::SNAPSHOT_TABLES`): table position,
    /// row id. Rows are never resumed: a `Begin` starts them over.
    pub(crate) next_table: u8,
    pub(crate) next_row: u64,
}

/// The records of one chunk.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Chunk {
    /// `(log index, entry bytes)`, consecutive.
    pub(crate) entries: Vec<(u64, Vec<u8>)>,
    /// `(base offset, log index, count, position, skipped batches)`.
    pub(crate) index: Vec<(u64, u64, u32, u64, Vec<u32>)>,
    /// `(time key, value)`.
    pub(crate) time: Vec<(u64, Vec<u8>)>,
    /// `(table position in compaction::SNAPSHOT_TABLES, row id, value)`: compacted records and
    /// their keys.
    pub(crate) rows: Vec<(u8, u64, Vec<u8>)>,
}

impl Chunk {
    fn crc(&self) -> io::Result<u32> {
        Ok(crc32c::crc32c(&crate::codec::encode(self)?))
    }
}

/// Reads the next chunk of a snapshot's records from the leader's store, from `cursor`.
/// `None` once every record is sent. Fails if an entry is gone (retention moved on: the
/// transfer is given up and openraft sends a newer snapshot).
pub(crate) fn read_chunk(
    store: &GroupStore,
    retention: &crate::machine::Retention,
    records: &SnapshotRecords,
    last_index: u64,
    cursor: &mut Cursor,
) -> io::Result<Option<Chunk>> {
    let mut chunk = Chunk::default();
    // Compacted rows change with every compaction: they are sent only while the leader's are
    // the snapshot's (checked before and after they are read).
    let same_rows = || {
        if retention.generation() == Some(records.generation) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the partition was compacted since the snapshot (a newer one follows)",
            ))
        }
    };
    same_rows()?;
    let tables = crate::compaction::SNAPSHOT_TABLES;
    let mut row_budget = CHUNK_BYTES;
    while let Some(table) = tables.get(usize::from(cursor.next_table)) {
        if row_budget == 0 {
            break;
        }
        let rows = store.rows_until(
            *table,
            cursor.next_row,
            ordo_storage::ROW_ID_MAX + 1,
            row_budget,
        )?;
        let position = cursor.next_table;
        match rows.last() {
            Some((id, _)) if *id < ordo_storage::ROW_ID_MAX => cursor.next_row = id + 1,
            _ => {
                cursor.next_table += 1;
                cursor.next_row = 0;
            }
        }
        for (id, value) in rows {
            row_budget = row_budget.saturating_sub(value.len() + 16);
            chunk.rows.push((position, id, value));
        }
    }
    same_rows()?;
    if !chunk.rows.is_empty() {
        return Ok(Some(chunk));
    }
    let next_index = cursor.next_index.max(records.first_index);
    if next_index <= last_index {
        chunk.entries = store.read_log(next_index, last_index + 1, CHUNK_BYTES)?;
        // Entries missing at the head are fine if they hold no records (a log that never lost an
        // entry to retention may start after index 0, e.g. on a replica that installed a
        // snapshot): the next index entry says which entry is needed first.
        let first_read = chunk.entries.first().map(|(index, _)| *index);
        let needed = store
            .index_range(cursor.next_offset, records.next_offset, 1)?
            .first()
            .map_or(last_index + 1, |entry| entry.log_index);
        if first_read != Some(next_index) && first_read.is_none_or(|first| first > needed) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("log entry {next_index} is no longer held (retention moved past it)"),
            ));
        }
    }
    let sent_to = chunk.entries.last().map_or(last_index, |(index, _)| *index);
    // The index entries of the entries sent (and before), below the snapshot's end. They go on
    // from where the last chunk's ended: a gap means retention moved on meanwhile.
    let mut end_offset = cursor.next_offset;
    let index = store.index_range(cursor.next_offset, records.next_offset, ROWS_PER_CHUNK_MAX)?;
    if cursor.next_offset > 0
        && let Some(first) = index.first()
        && first.base_offset != cursor.next_offset
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "offset {} is no longer indexed (retention moved past it)",
                cursor.next_offset
            ),
        ));
    }
    for entry in index {
        if entry.log_index > sent_to {
            break;
        }
        end_offset = entry.base_offset + u64::from(entry.count);
        chunk.index.push((
            entry.base_offset,
            entry.log_index,
            entry.count,
            entry.position,
            entry.skipped_batches,
        ));
    }
    // Time index rows of the offsets sent (none once the last possible key was sent).
    let time_rows = if cursor.next_time > ordo_storage::ROW_ID_MAX {
        Vec::new()
    } else {
        store.rows_from(Table::TimeIndex, cursor.next_time, ROWS_PER_CHUNK_MAX)?
    };
    for (key, value) in time_rows {
        let offset = crate::machine::time_row_offset(&value).unwrap_or(u64::MAX);
        if offset >= end_offset.min(records.next_offset) {
            break;
        }
        cursor.next_time = key + 1;
        chunk.time.push((key, value));
    }
    if chunk.entries.is_empty() && chunk.index.is_empty() && chunk.time.is_empty() {
        return Ok(None);
    }
    cursor.next_index = sent_to + 1;
    cursor.next_offset = end_offset;
    Ok(Some(chunk))
}

/// Builds the `Records` message of `chunk`.
pub(crate) fn records_message(vote: Vote, chunk: Chunk) -> io::Result<Message> {
    let crc = chunk.crc()?;
    Ok(Message::Records { vote, chunk, crc })
}

/// The follower's side: which transfer each group is in (the vote of its `Begin`).
#[derive(Default)]
pub(crate) struct Transfers {
    votes: Mutex<HashMap<u64, Transfer>>,
    /// One call of a group's transfers at a time (a `Begin` never empties a staging that a
    /// `Finish` is installing).
    locks: Mutex<HashMap<u64, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// A transfer in progress into a staging group.
struct Transfer {
    vote: Vote,
    /// Staged entries are all below this index: a chunk's entries start at or after it, so
    /// the staging's entries stay in journal order (the journal's file deletion relies on a
    /// group's entries lying between its first and last entries' files).
    next_index: u64,
}

impl Transfers {
    fn votes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Transfer>> {
        self.votes.lock().expect("transfers lock is never poisoned")
    }

    /// The lock a call of `staging`'s transfers holds while it runs.
    pub(crate) fn lock(&self, staging: &GroupStore) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("transfers lock is never poisoned")
            .entry(staging.group().0)
            .or_default()
            .clone()
    }

    /// Starts (or resumes) a transfer into `staging` under `vote`, whose entries are staged
    /// below `next_index` (the cursor's).
    pub(crate) fn begin(&self, staging: &GroupStore, vote: Vote, next_index: u64) {
        self.votes()
            .insert(staging.group().0, Transfer { vote, next_index });
    }

    /// Where a transfer of the entries `first_index..=last_index` into `staging` goes on, and
    /// whether the staging must be emptied first (what an earlier attempt staged is kept when
    /// the new snapshot goes on from it). Blocking.
    pub(crate) fn cursor(
        staging: &GroupStore,
        first_index: u64,
        last_index: u64,
    ) -> io::Result<(Cursor, bool)> {
        let usable = match staging.log_bounds()? {
            Some((low, high)) => {
                low <= first_index && first_index <= high + 1 && high <= last_index
            }
            None => false,
        };
        if !usable {
            let fresh = Cursor {
                next_index: first_index,
                ..Cursor::default()
            };
            return Ok((fresh, true));
        }
        let high = staging
            .log_bounds()?
            .map_or(first_index, |(_, high)| high + 1);
        let next_offset = staging
            .index_floor(u64::MAX)?
            .map_or(0, |entry| entry.base_offset + u64::from(entry.count));
        let next_time = staging
            .rows(Table::TimeIndex)?
            .last()
            .map_or(0, |(key, _)| key + 1);
        let cursor = Cursor {
            next_index: high,
            next_offset,
            next_time,
            ..Cursor::default()
        };
        Ok((cursor, false))
    }

    /// Stages one chunk, if it belongs to the transfer in progress and its checksum holds.
    pub(crate) async fn stage(
        &self,
        staging: &GroupStore,
        vote: &Vote,
        chunk: Chunk,
        crc: u32,
    ) -> io::Result<()> {
        let next_index = match self.votes().get(&staging.group().0) {
            Some(transfer) if transfer.vote == *vote => transfer.next_index,
            _ => {
                return Err(io::Error::other(
                    "snapshot records from a transfer that is not in progress here (begin again)",
                ));
            }
        };
        let mut expected = next_index;
        for (index, _) in &chunk.entries {
            if *index < expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "snapshot entry {index} out of order: the staging is at {expected} (begin again)"
                    ),
                ));
            }
            expected = index + 1;
        }
        if chunk.crc()? != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot chunk checksum mismatch",
            ));
        }
        let mut batch = staging.batch();
        for (index, bytes) in &chunk.entries {
            staging.put_log(&mut batch, *index, bytes);
        }
        for (base_offset, log_index, count, position, skipped_batches) in chunk.index {
            staging.put_index(
                &mut batch,
                &IndexEntry {
                    base_offset,
                    log_index,
                    count,
                    position,
                    skipped_batches,
                },
            );
        }
        for (key, value) in &chunk.time {
            staging.put_row(&mut batch, Table::TimeIndex, *key, value);
        }
        for (position, id, value) in &chunk.rows {
            let Some(table) = crate::compaction::SNAPSHOT_TABLES.get(usize::from(*position)) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("snapshot row of unknown table {position}"),
                ));
            };
            staging.put_row(&mut batch, *table, *id, value);
        }
        staging.write(batch, None).await?;
        if let Some(transfer) = self.votes().get_mut(&staging.group().0)
            && transfer.vote == *vote
        {
            transfer.next_index = transfer.next_index.max(expected);
        }
        Ok(())
    }

    /// Ends the transfer of `staging`'s group under `vote` (installed, or given up); a transfer
    /// begun since under another vote goes on.
    pub(crate) fn end(&self, staging: &GroupStore, vote: &Vote) {
        let mut votes = self.votes();
        if votes
            .get(&staging.group().0)
            .is_some_and(|transfer| transfer.vote == *vote)
        {
            votes.remove(&staging.group().0);
        }
    }

    /// Whether a transfer with `vote` is in progress for `staging`.
    pub(crate) fn in_progress(&self, staging: &GroupStore, vote: &Vote) -> bool {
        self.votes()
            .get(&staging.group().0)
            .is_some_and(|transfer| transfer.vote == *vote)
    }
}
