//! [`Store`]: the node's RocksDB instance; [`GroupStore`]: one group's view of it.
//!
//! On disk: `rocksdb/` (RocksDB, run without its WAL) and `journal/` (see `journal`).
//!
//! Column families:
//! - `log`: `group ++ index` -> framed journal location of the group's log entry at `index` (the
//!   entry's bytes live once, in the journal). A log is an ordered per-group sequence of opaque
//!   entries: appended at the end, cut at the tail (`delete_log_from`) or at the head
//!   (`delete_log_upto`), read in index order.
//! - `meta`: `group ++ tag` -> framed small values under the well-known [`MetaKey`]s, and the
//!   journal position applied to RocksDB.
//! - `index`: `group ++ base offset` -> framed (log index, record count): where each offset lives.
//!
//! Writes go through the writer thread (see `writer`); reads go straight to RocksDB and are
//! blocking calls: async callers run them in `spawn_blocking`.
//!
//! Never: write to RocksDB or the journal other than through the writer thread; return a value
//! whose frame was not verified.

use std::path::Path;
use std::sync::Arc;

use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::ReadOptions;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::error::StorageError;
use crate::journal::Journal;
use crate::journal::JournalRemoval;
use crate::journal::JournalWriter;
use crate::journal::Location;
use crate::keys::GroupId;
use crate::keys::frame;
use crate::keys::key;
use crate::keys::split_key;
use crate::keys::unframe;
use crate::ops::Cf;
use crate::ops::CfHandles;
use crate::ops::Op;
use crate::writer::DurableCallback;
use crate::writer::FlushPolicy;
use crate::writer::StoreStats;
use crate::writer::WriteRequest;
use crate::writer::WriterParts;

/// Tunables of the store. Defaults suit a node with a few GiB of memory.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Capacity of the write queue (requests). Writers wait when it is full.
    pub write_queue_max: usize,
    /// RocksDB memtable size per column family, bytes. The writer thread flushes the memtables
    /// once they hold a quarter of this.
    pub write_buffer_bytes: usize,
    /// Shared block cache, bytes.
    pub block_cache_bytes: usize,
    /// Size at which the journal starts a new file, bytes.
    pub journal_file_bytes: u64,
    /// Journal bytes after which the memtables are flushed, bounding the replay at start-up.
    pub journal_replay_bytes_max: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            write_queue_max: 4096,
            write_buffer_bytes: 64 << 20,
            block_cache_bytes: 128 << 20,
            journal_file_bytes: 256 << 20,
            journal_replay_bytes_max: 256 << 20,
        }
    }
}

impl StoreOptions {
    /// Checks the bounds the store relies on (the writer thread flushes memtables at a quarter
    /// of `write_buffer_bytes`, well before RocksDB would on its own).
    pub fn validate(&self) -> Result<(), StorageError> {
        let fail = |message: &str| Err(StorageError::InvalidOptions(message.to_owned()));
        if self.write_queue_max == 0 {
            return fail("write_queue_max must be > 0");
        }
        if self.write_buffer_bytes < 4 << 20 {
            return fail("write_buffer_bytes must be at least 4 MiB");
        }
        if self.journal_file_bytes < 1 << 20 || self.journal_replay_bytes_max < 1 << 20 {
            return fail("journal_file_bytes and journal_replay_bytes_max must be at least 1 MiB");
        }
        Ok(())
    }
}

/// What every handle of one store shares: RocksDB, the journal, the writer threads and their
/// queue. Dropped with the last handle.
struct StoreShared {
    db: Arc<DB>,
    journal: Arc<Journal>,
    writer: mpsc::Sender<WriteRequest>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Arc<StoreStats>,
    fault: Arc<tokio::sync::watch::Sender<Option<StorageError>>>,
}

impl Drop for StoreShared {
    /// Closes the write queue and waits for the writer threads to finish what was queued, so the
    /// DB is closed (and its lock released) when the last handle is dropped.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, closed));
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("storage writer thread panicked");
            }
        }
    }
}

/// The node's store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<StoreShared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in directory `path`, replays the journal records RocksDB
    /// had not persisted, and starts the writer threads.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StorageError> {
        if path.join("CURRENT").exists() {
            return Err(StorageError::Io(format!(
                "{} holds a store of an older layout (RocksDB with its WAL, no journal); \
                 move it away and start this node with an empty data directory",
                path.display()
            )));
        }
        options.validate()?;
        // Closing does not flush: the next open replays the journal instead (bounded by
        // `journal_replay_bytes_max`), so every restart goes through the recovery path. No
        // automatic resume after a background error (a full disk): resuming flushes memtables
        // that may refer to journal bytes not yet synced; a restart replays instead.
        let mut db_options = Options::default().get_options_from_string(
            "avoid_flush_during_shutdown=true;max_bgerror_resume_count=0",
        )?;
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_bytes_per_sync(1 << 20);
        // Writes skip RocksDB's WAL (the journal is the WAL); every column family is flushed at
        // once so the persisted journal position matches every column family's content.
        db_options.set_atomic_flush(true);
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let descriptors = Cf::ALL.iter().map(|cf| {
            let mut cf_options = Options::default();
            cf_options.set_write_buffer_size(options.write_buffer_bytes);
            // Room for memtables still flushing when the writer thread switches the next one.
            cf_options.set_max_write_buffer_number(4);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            cf_options.set_block_based_table_factory(&table);
            if *cf == Cf::Log {
                cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_options)
        });
        let db = Arc::new(DB::open_cf_descriptors(
            &db_options,
            path.join("rocksdb"),
            descriptors,
        )?);
        let (journal, ids) = Journal::open(&path.join("journal"))?;
        let started = std::time::Instant::now();
        let (last, unflushed) = crate::writer::recover(&db, &journal, &ids)?;
        if unflushed.journal_bytes > 0 {
            tracing::info!(
                bytes = unflushed.journal_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the journal"
            );
        }
        let appender = JournalWriter::new(journal.clone(), last, options.journal_file_bytes)?;
        let stats = Arc::new(StoreStats::default());
        let fault = Arc::new(tokio::sync::watch::Sender::new(None));
        let parts = WriterParts {
            db: db.clone(),
            journal: journal.clone(),
            appender,
            stats: stats.clone(),
            policy: FlushPolicy {
                memtable_bytes: options.write_buffer_bytes as u64 / 4,
                journal_bytes: options.journal_replay_bytes_max,
            },
            unflushed,
            record: Vec::new(),
            fault: fault.clone(),
        };
        let (writer, threads) = crate::writer::start(parts, options.write_queue_max)
            .map_err(|error| StorageError::Io(format!("cannot start writer threads: {error}")))?;
        Ok(Store {
            shared: Arc::new(StoreShared {
                db,
                journal,
                writer,
                threads,
                stats,
                fault,
            }),
        })
    }

    /// The handle for one group's data.
    pub fn group(&self, group: GroupId) -> GroupStore {
        GroupStore {
            shared: self.shared.clone(),
            group,
        }
    }

    /// The first write or sync that failed, once one has. No write after a failed sync is
    /// reported durable, and a caller whose write failed cannot know what reached the disk, so
    /// the node should stop and restart from what is durable (the journal replay at open):
    /// watch this.
    pub fn fault(&self) -> tokio::sync::watch::Receiver<Option<StorageError>> {
        self.shared.fault.subscribe()
    }

    /// Write-path counters.
    pub fn stats(&self) -> &StoreStats {
        &self.shared.stats
    }

    /// Deletes the journal files nothing needs any more: every file before the one the next
    /// open would replay from (the journal position RocksDB has persisted) that no group's log
    /// entries can point into. A group's entries lie in the files from its first entry's to its
    /// last entry's (entries are appended in index order, each into the file being appended;
    /// [`GroupStore::adopt`] records a wider span when it leaves them out of that order), so a
    /// file in no group's span is free even while an older file is still needed: a partition
    /// that keeps its records for a week and is no longer written pins only the files its
    /// records are in (one written all along spans every file since its oldest record). Returns
    /// the files and bytes removed. Blocking: run it in `spawn_blocking` from async code.
    ///
    /// Safe against concurrent writes: the scan reads one RocksDB snapshot; a log entry written
    /// after it points into a file at or past the replay start, except the pointers
    /// [`GroupStore::adopt`] moves, which the snapshot holds in the group they move from.
    pub fn remove_unused_journal_files(&self) -> Result<JournalRemoval, StorageError> {
        let db = &self.shared.db;
        let journal = &self.shared.journal;
        let mut persisted = ReadOptions::default();
        persisted.set_read_tier(rocksdb::ReadTier::Persisted);
        let replay_from = match db.get_cf_opt(
            CfHandles.get(db, Cf::Meta),
            crate::journal::APPLIED_KEY,
            &persisted,
        )? {
            Some(value) => {
                crate::journal::Position::decode(&value)
                    .ok_or_else(|| StorageError::Malformed {
                        what: "journal applied position".to_owned(),
                        reason: "not 16 bytes",
                    })?
                    .file
            }
            // Nothing flushed yet: the next open replays everything.
            None => return Ok(JournalRemoval::default()),
        };
        // Read after the replay start: every entry pointing before it is in the snapshot.
        let candidates = journal.ids_below(replay_from);
        if candidates.is_empty() {
            return Ok(JournalRemoval::default());
        }
        let live = self.live_journal_spans()?;
        let doomed: Vec<u64> = candidates
            .into_iter()
            .filter(|id| !live.iter().any(|(first, last)| first <= id && id <= last))
            .collect();
        if doomed.is_empty() {
            return Ok(JournalRemoval::default());
        }
        // The scan saw deletions that may not be synced yet (written without a durability
        // wait): make them durable before the files they released are gone, or a power loss
        // would bring back rows pointing into deleted files.
        journal.sync()?;
        journal.remove_files(&doomed)
    }

    /// Every group's journal span (first file, last file), from one snapshot: a few seeks and
    /// a point read per group, whatever its log's length.
    fn live_journal_spans(&self) -> Result<Vec<(u64, u64)>, StorageError> {
        let db = &self.shared.db;
        let snapshot = db.snapshot();
        let mut options = ReadOptions::default();
        options.set_snapshot(&snapshot);
        let mut groups = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Log), options);
        let mut spans = Vec::new();
        groups.seek_to_first();
        while let Some((group, _)) = groups.key().and_then(split_key) {
            if let Some(span) = log_span(db, Some(&snapshot), group, 0, u64::MAX)? {
                let (mut first, mut last) = (span.first_file, span.last_file);
                let mut options = ReadOptions::default();
                options.set_snapshot(&snapshot);
                if let Some(adopted) = db.get_cf_opt(
                    CfHandles.get(db, Cf::Meta),
                    key(group, JOURNAL_SPAN_KEY),
                    &options,
                )? {
                    let adopted = JournalSpan::decode(group, &adopted)?;
                    if span.first_index <= adopted.adopted_last {
                        first = first.min(adopted.first_file);
                        last = last.max(adopted.last_file);
                    }
                }
                if first > last {
                    // Entries out of journal order that no span records: where they lie is
                    // unknown, so no file may go.
                    tracing::error!(%group, first, last, "log entries out of journal order; keeping every journal file");
                    return Ok(vec![(0, u64::MAX)]);
                }
                spans.push((first, last));
            }
            let Some(next) = group.0.checked_add(1) else {
                break;
            };
            groups.seek(key(GroupId(next), 0));
        }
        groups.status()?;
        Ok(spans)
    }

    /// RocksDB's estimate of live data bytes, for metrics.
    pub fn live_data_bytes(&self) -> u64 {
        Cf::ALL
            .iter()
            .filter_map(|cf| {
                self.shared
                    .db
                    .property_int_value_cf(
                        CfHandles.get(&self.shared.db, *cf),
                        "rocksdb.estimate-live-data-size",
                    )
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

/// Well-known per-group metadata keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum MetaKey {
    /// The group's election record: a small value, opaque here, that its caller writes durable
    /// ([`GroupStore::write_durable`]) before it acts on it, because other nodes rely on it
    /// surviving a crash.
    Election = 1,
    /// The caller's mark of how far the log is committed (final), opaque here.
    Committed = 2,
    /// The caller's mark of the last entry removed from the head of the log, opaque here. Put it
    /// in the batch that removes the entries ([`GroupStore::delete_log_upto`]): a reader that
    /// sees them gone then also sees the mark.
    LastPurged = 3,
    /// What the caller has applied from the log (how far, and what it needs to resume), opaque
    /// here.
    Applied = 4,
    /// A caller's whole serialized state, for groups that keep it in one value.
    State = 5,
}

/// The meta key under which a group's [`JournalSpan`] is kept: storage's own (callers never
/// write it). Top byte 0 like the [`MetaKey`]s, which stop well below it; row keys have a
/// table (at least 1) in their top byte.
const JOURNAL_SPAN_KEY: u64 = 0xff;
const _: () = assert!((MetaKey::State as u64) < JOURNAL_SPAN_KEY);
const _: () = assert!(JOURNAL_SPAN_KEY < 1 << ROW_ID_BITS);

/// The journal files a group's log entries may lie in while an entry adopted by
/// [`GroupStore::adopt`] is left (the group's first index is at or below `adopted_last`); see
/// `GroupStore::record_adopted_span`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JournalSpan {
    adopted_last: u64,
    first_file: u64,
    last_file: u64,
}

impl JournalSpan {
    fn encode(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.adopted_last.to_le_bytes());
        out[8..16].copy_from_slice(&self.first_file.to_le_bytes());
        out[16..].copy_from_slice(&self.last_file.to_le_bytes());
        out
    }

    fn decode(group: GroupId, framed: &[u8]) -> Result<JournalSpan, StorageError> {
        let what = || format!("journal span of group {group}");
        let payload = unframe(framed, what)?;
        let field = |n: usize| {
            payload
                .get(n * 8..n * 8 + 8)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_le_bytes)
        };
        match (payload.len(), field(0), field(1), field(2)) {
            (24, Some(adopted_last), Some(first_file), Some(last_file)) => Ok(JournalSpan {
                adopted_last,
                first_file,
                last_file,
            }),
            _ => Err(StorageError::Malformed {
                what: what(),
                reason: "not 24 bytes",
            }),
        }
    }
}

/// Where a group's log entries in `lower..upper` start and end in the journal.
struct LogSpan {
    first_index: u64,
    first_file: u64,
    last_file: u64,
}

/// The journal location in log entry `index`'s framed value.
fn decode_pointer(group: GroupId, index: u64, value: &[u8]) -> Result<Location, StorageError> {
    let what = || format!("log group={group} index={index}");
    Location::decode(unframe(value, what)?).ok_or_else(|| StorageError::Malformed {
        what: what(),
        reason: "journal location is not 20 bytes",
    })
}

/// The [`LogSpan`] of `group`'s entries in `lower..upper`, read from `snapshot` if given;
/// `None` if there are none.
fn log_span(
    db: &DB,
    snapshot: Option<&rocksdb::Snapshot<'_>>,
    group: GroupId,
    lower: u64,
    upper: u64,
) -> Result<Option<LogSpan>, StorageError> {
    let mut options = ReadOptions::default();
    options.set_iterate_lower_bound(key(group, lower).to_vec());
    options.set_iterate_upper_bound(key(group, upper).to_vec());
    if let Some(snapshot) = snapshot {
        options.set_snapshot(snapshot);
    }
    let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Log), options);
    let mut entry = |last: bool| -> Result<Option<(u64, u64)>, StorageError> {
        if last {
            iterator.seek_to_last();
        } else {
            iterator.seek_to_first();
        }
        iterator.status()?;
        let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value()) else {
            return Ok(None);
        };
        let index = split_key(raw_key).map_or(0, |(_, index)| index);
        Ok(Some((index, decode_pointer(group, index, value)?.file)))
    };
    let Some((first_index, first_file)) = entry(false)? else {
        return Ok(None);
    };
    let last_file = entry(true)?.map_or(first_file, |(_, file)| file);
    Ok(Some(LogSpan {
        first_index,
        first_file,
        last_file,
    }))
}

/// Where a run of offsets lives: log entry `log_index` holds offsets
/// `base_offset .. base_offset + count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// First offset in the entry.
    pub base_offset: u64,
    /// Index of the log entry holding the run.
    pub log_index: u64,
    /// Records in the entry.
    pub count: u32,
    /// Bytes of the group's records before `base_offset` (a running total the caller keeps:
    /// positions only grow with offsets), so the bytes between two offsets are a subtraction.
    pub position: u64,
    /// Positions (ascending) of the entry's batches that hold no offsets: the caller decided
    /// when applying the entry not to write them (e.g. a producer's retry of a batch already
    /// written). Empty for almost every entry; stored after the 12 fixed bytes.
    pub skipped_batches: Vec<u32>,
}

/// The top bit of an index value's count: a position follows the count.
const INDEX_HAS_POSITION: u32 = 1 << 31;

/// A table of small keyed rows of one group, written in the group's batches (so atomically with
/// its applied state) and read back whole at start. The caller gives rows their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// A partition's producer states, by producer id.
    Producers = 1,
    /// A state group's rows (e.g. a consumer group coordinator's groups), ids chosen by its
    /// state machine.
    States = 2,
    /// A partition's time index: the largest record timestamp so far (id) to the base offset of
    /// the batch that first reached it.
    TimeIndex = 3,
    /// A compacted partition's records below its clean point, one record each, by offset
    /// (compaction by key: superseded records are deleted, offsets never change).
    Compacted = 4,
    /// A compacted partition's keys: a key's hash (id) to the keys with that hash and the
    /// offsets of their latest records.
    KeyMap = 5,
    /// A compacted partition's tombstones (records deleting their key), by offset, with when
    /// they were cleaned: they go once `delete.retention.ms` passed since.
    Tombstones = 6,
}

/// Row keys live in the meta column family: `group ++ (table << 56 | id)`. Meta keys are small
/// numbers (top byte 0), so the two never meet.
const ROW_ID_BITS: u32 = 56;

/// Largest row id a table can hold.
pub const ROW_ID_MAX: u64 = (1 << ROW_ID_BITS) - 1;

fn row_key(table: Table, id: u64) -> u64 {
    assert!(id <= ROW_ID_MAX, "row id {id} over {ROW_ID_MAX}");
    (u64::from(table as u8) << ROW_ID_BITS) | id
}

/// A set of writes to one group, applied atomically.
#[derive(Default)]
pub struct GroupBatch {
    ops: Vec<Op>,
}

impl std::fmt::Debug for GroupBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupBatch")
            .field("ops", &self.ops.len())
            .finish()
    }
}

/// One group's view of the store. Cheap to clone.
#[derive(Clone)]
pub struct GroupStore {
    shared: Arc<StoreShared>,
    group: GroupId,
}

impl std::fmt::Debug for GroupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStore")
            .field("group", &self.group)
            .finish()
    }
}

impl GroupStore {
    /// The group this handle reads and writes.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The handle of another group of the same store.
    pub fn sibling(&self, group: GroupId) -> GroupStore {
        GroupStore {
            shared: self.shared.clone(),
            group,
        }
    }

    /// A new empty batch for this group.
    pub fn batch(&self) -> GroupBatch {
        GroupBatch::default()
    }

    /// Adds a log entry to `batch`.
    pub fn put_log(&self, batch: &mut GroupBatch, index: u64, payload: &[u8]) {
        batch.ops.push(Op::Put {
            cf: Cf::Log,
            key: key(self.group, index).to_vec(),
            value: frame(payload),
        });
    }

    /// Adds a metadata value to `batch`.
    pub fn put_meta(&self, batch: &mut GroupBatch, meta: MetaKey, payload: &[u8]) {
        batch.ops.push(Op::Put {
            cf: Cf::Meta,
            key: key(self.group, meta as u64).to_vec(),
            value: frame(payload),
        });
    }

    /// Adds an offset index entry to `batch`.
    pub fn put_index(&self, batch: &mut GroupBatch, entry: &IndexEntry) {
        assert!(
            entry.count < INDEX_HAS_POSITION,
            "an entry holds < 2^31 records"
        );
        let mut payload = Vec::with_capacity(20 + 4 * entry.skipped_batches.len());
        payload.extend_from_slice(&entry.log_index.to_be_bytes());
        payload.extend_from_slice(&(entry.count | INDEX_HAS_POSITION).to_be_bytes());
        payload.extend_from_slice(&entry.position.to_be_bytes());
        for position in &entry.skipped_batches {
            payload.extend_from_slice(&position.to_be_bytes());
        }
        batch.ops.push(Op::Put {
            cf: Cf::Index,
            key: key(self.group, entry.base_offset).to_vec(),
            value: frame(&payload),
        });
    }

    /// Adds (or replaces) row `id` of `table` to `batch`.
    pub fn put_row(&self, batch: &mut GroupBatch, table: Table, id: u64, payload: &[u8]) {
        batch.ops.push(Op::Put {
            cf: Cf::Meta,
            key: key(self.group, row_key(table, id)).to_vec(),
            value: frame(payload),
        });
    }

    /// Deletes row `id` of `table` in `batch` (a point delete: RocksDB reads pay for every
    /// range tombstone in the memtable, so rows deleted one by one must not leave ranges).
    pub fn delete_row(&self, batch: &mut GroupBatch, table: Table, id: u64) {
        batch.ops.push(Op::Delete {
            cf: Cf::Meta,
            key: key(self.group, row_key(table, id)).to_vec(),
        });
    }

    /// Deletes every row of `table` in `batch`.
    pub fn clear_table(&self, batch: &mut GroupBatch, table: Table) {
        self.delete_range(
            batch,
            Cf::Meta,
            row_key(table, 0),
            row_key(table, ROW_ID_MAX) + 1,
        );
    }

    /// Deletes log entries `from..` (to the end of the log).
    pub fn delete_log_from(&self, batch: &mut GroupBatch, from: u64) {
        self.delete_range(batch, Cf::Log, from, u64::MAX);
    }

    /// Deletes log entries `..=upto`.
    pub fn delete_log_upto(&self, batch: &mut GroupBatch, upto: u64) {
        self.delete_range(batch, Cf::Log, 0, upto.saturating_add(1));
    }

    /// Deletes index entries at offsets `from..`.
    pub fn delete_index_from(&self, batch: &mut GroupBatch, from: u64) {
        self.delete_range(batch, Cf::Index, from, u64::MAX);
    }

    /// Deletes index entries at offsets `..below`.
    pub fn delete_index_below(&self, batch: &mut GroupBatch, below: u64) {
        self.delete_range(batch, Cf::Index, 0, below);
    }

    /// Deletes rows of `table` with ids `..below`.
    pub fn delete_rows_below(&self, batch: &mut GroupBatch, table: Table, below: u64) {
        self.delete_range(batch, Cf::Meta, row_key(table, 0), row_key(table, below));
    }

    /// Deletes log entries `..below`: the head of the log, for a caller that keeps its own mark of
    /// where the log starts (see [`MetaKey::LastPurged`] for the usual one).
    pub fn delete_log_below(&self, batch: &mut GroupBatch, below: u64) {
        self.delete_range(batch, Cf::Log, 0, below);
    }

    /// Moves everything `from` holds into this group, in `batch`, without copying a log entry's
    /// bytes (the journal holds them once; the pointers move): log entries `first..=last` replace
    /// every entry `..=last` of this group, `from`'s index entries and rows of `tables` replace
    /// this group's, and `from` is emptied. For a caller that staged a whole state in another
    /// group (a snapshot received in chunks) and installs it at once. Reads `from` now: nothing
    /// may write to `from` until `batch` is written.
    pub fn adopt(
        &self,
        batch: &mut GroupBatch,
        from: &GroupStore,
        last: u64,
        tables: &[Table],
    ) -> Result<(), StorageError> {
        let db = &self.shared.db;
        self.delete_range(batch, Cf::Log, 0, last.saturating_add(1));
        self.delete_range(batch, Cf::Index, 0, u64::MAX);
        for table in tables {
            self.clear_table(batch, *table);
        }
        // The files the adopted entries lie in, from every pointer moved.
        let mut adopted: Option<(u64, u64)> = None;
        let mut copy = |cf: Cf, lower: u64, upper: u64| -> Result<(), StorageError> {
            let mut options = ReadOptions::default();
            options.set_iterate_upper_bound(key(from.group, upper).to_vec());
            let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, cf), options);
            iterator.seek(key(from.group, lower));
            while let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value()) {
                let Some((_, n)) = split_key(raw_key) else {
                    break;
                };
                if cf == Cf::Log {
                    let file = decode_pointer(from.group, n, value)?.file;
                    adopted = Some(adopted.map_or((file, file), |(first, last)| {
                        (first.min(file), last.max(file))
                    }));
                }
                batch.ops.push(Op::PutRaw {
                    cf,
                    key: key(self.group, n).to_vec(),
                    value: value.to_vec(),
                });
                iterator.next();
            }
            Ok(iterator.status()?)
        };
        copy(Cf::Log, 0, last.saturating_add(1))?;
        copy(Cf::Index, 0, u64::MAX)?;
        for table in tables {
            copy(
                Cf::Meta,
                row_key(*table, 0),
                row_key(*table, ROW_ID_MAX) + 1,
            )?;
        }
        for cf in Cf::ALL {
            from.delete_range(batch, cf, 0, u64::MAX);
        }
        self.record_adopted_span(batch, adopted, last)
    }

    /// Records, in `batch`, the files this group's log entries may lie in once an
    /// [`GroupStore::adopt`] moved in entries `..=last` lying in files `adopted` (first, last).
    /// The entries the group keeps after `last` may lie in older files than the adopted ones (a
    /// replica whose log went on past a snapshot's end), so its first and last entries no
    /// longer bound its files: the span of both runs is recorded, and holds while an adopted
    /// entry is left (the first index is at or below `last`). Without a kept tail the log is in
    /// order again and the record goes.
    fn record_adopted_span(
        &self,
        batch: &mut GroupBatch,
        adopted: Option<(u64, u64)>,
        last: u64,
    ) -> Result<(), StorageError> {
        let db = &self.shared.db;
        let record = key(self.group, JOURNAL_SPAN_KEY).to_vec();
        let Some(tail) = log_span(db, None, self.group, last.saturating_add(1), u64::MAX)? else {
            batch.ops.push(Op::Delete {
                cf: Cf::Meta,
                key: record,
            });
            return Ok(());
        };
        let mut span = JournalSpan {
            adopted_last: last,
            first_file: tail.first_file,
            last_file: tail.last_file,
        };
        if let Some((first, last)) = adopted {
            span.first_file = span.first_file.min(first);
            span.last_file = span.last_file.max(last);
        }
        // The tail is in journal order unless it starts with entries an earlier adoption moved
        // in: then that adoption's span is kept with it.
        if let Some(earlier) = db.get_pinned_cf(CfHandles.get(db, Cf::Meta), &record)? {
            let earlier = JournalSpan::decode(self.group, &earlier)?;
            if tail.first_index <= earlier.adopted_last {
                span.adopted_last = earlier.adopted_last;
                span.first_file = span.first_file.min(earlier.first_file);
                span.last_file = span.last_file.max(earlier.last_file);
            }
        }
        batch.ops.push(Op::PutRaw {
            cf: Cf::Meta,
            key: record,
            value: frame(&span.encode()),
        });
        Ok(())
    }

    fn delete_range(&self, batch: &mut GroupBatch, cf: Cf, from: u64, to: u64) {
        batch.ops.push(Op::DeleteRange {
            cf,
            from: key(self.group, from).to_vec(),
            to: key(self.group, to).to_vec(),
        });
    }

    /// Applies `batch`; returns once it is readable. When `durable` is given it is called after
    /// the journal fsync that covers the batch (or with the error that failed the write).
    pub async fn write(
        &self,
        batch: GroupBatch,
        durable: Option<DurableCallback>,
    ) -> Result<(), StorageError> {
        let (written, written_rx) = oneshot::channel();
        let request = WriteRequest {
            ops: batch.ops,
            written: Some(written),
            durable,
        };
        if let Err(unsent) = self.shared.writer.send(request).await {
            if let Some(durable) = unsent.0.durable {
                durable(Err(StorageError::Closed));
            }
            return Err(StorageError::Closed);
        }
        written_rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Applies `batch` and returns only once it is durable (fsynced).
    pub async fn write_durable(&self, batch: GroupBatch) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        let durable: DurableCallback = Box::new(move |result| {
            let _ = tx.send(result);
        });
        self.write(batch, Some(durable)).await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Deletes every value of this group in every column family.
    pub async fn destroy(&self) -> Result<(), StorageError> {
        let mut batch = self.batch();
        for cf in Cf::ALL {
            self.delete_range(&mut batch, cf, 0, u64::MAX);
        }
        self.write_durable(batch).await
    }

    // ----- reads: blocking, run them in spawn_blocking from async code -----

    /// Log entries with index in `start..end`, at most `max_bytes` of payload (but at least one
    /// entry when any exists), from the first present entry; stops at the first gap after it.
    pub fn read_log(
        &self,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let db = &self.shared.db;
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(key(self.group, end).to_vec());
        let from = key(self.group, start);
        let iterator = db.iterator_cf_opt(
            CfHandles.get(db, Cf::Log),
            options,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut expected = None;
        for item in iterator {
            let (raw_key, value) = item?;
            let Some((_, index)) = split_key(&raw_key) else {
                break;
            };
            if expected.is_some_and(|expected| expected != index) {
                break;
            }
            let payload = self.log_value(index, &value)?;
            bytes += payload.len();
            entries.push((index, payload));
            expected = Some(index + 1);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(entries)
    }

    /// The first and last log entries' indexes, if the log holds any.
    pub fn log_bounds(&self) -> Result<Option<(u64, u64)>, StorageError> {
        let db = &self.shared.db;
        let cf = CfHandles.get(db, Cf::Log);
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(key(self.group, 0).to_vec());
        options.set_iterate_upper_bound(key(self.group, u64::MAX).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(cf, options);
        iterator.seek_to_first();
        iterator.status()?;
        let Some(first) = iterator.key().and_then(split_key) else {
            return Ok(None);
        };
        iterator.seek_to_last();
        iterator.status()?;
        let last = iterator
            .key()
            .and_then(split_key)
            .map(|(_, index)| index)
            .unwrap_or(first.1);
        Ok(Some((first.1, last)))
    }

    /// One log entry.
    pub fn get_log(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let db = &self.shared.db;
        let value = db.get_pinned_cf(CfHandles.get(db, Cf::Log), key(self.group, index))?;
        value.map(|value| self.log_value(index, &value)).transpose()
    }

    /// Follows a log entry's journal location to its verified payload.
    fn log_value(&self, index: u64, pointer: &[u8]) -> Result<Vec<u8>, StorageError> {
        let location = decode_pointer(self.group, index, pointer)?;
        self.shared.journal.read(location, || {
            format!("log group={} index={index}", self.group)
        })
    }

    /// A metadata value.
    pub fn get_meta(&self, meta: MetaKey) -> Result<Option<Vec<u8>>, StorageError> {
        let db = &self.shared.db;
        let value = db.get_pinned_cf(CfHandles.get(db, Cf::Meta), key(self.group, meta as u64))?;
        value
            .map(|value| {
                unframe(&value, || format!("meta group={} key={meta:?}", self.group))
                    .map(<[u8]>::to_vec)
            })
            .transpose()
    }

    /// Every row of `table`, by id.
    pub fn rows(&self, table: Table) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.rows_from(table, 0, usize::MAX)
    }

    /// How many rows `table` holds (reads keys only).
    pub fn count_rows(&self, table: Table) -> Result<u64, StorageError> {
        let db = &self.shared.db;
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(key(self.group, row_key(table, ROW_ID_MAX) + 1).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Meta), options);
        iterator.seek(key(self.group, row_key(table, 0)));
        let mut count = 0;
        while iterator.valid() {
            count += 1;
            iterator.next();
        }
        iterator.status()?;
        Ok(count)
    }

    /// Row `id` of `table`, if present.
    pub fn get_row(&self, table: Table, id: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let db = &self.shared.db;
        let value = db.get_pinned_cf(
            CfHandles.get(db, Cf::Meta),
            key(self.group, row_key(table, id)),
        )?;
        value
            .map(|value| {
                unframe(&value, || {
                    format!("row group={} table={table:?} id={id}", self.group)
                })
                .map(<[u8]>::to_vec)
            })
            .transpose()
    }

    /// Rows of `table` with ids in `from..upper`, by id, up to `max_bytes` of values (at least
    /// one row when any is there).
    pub fn rows_until(
        &self,
        table: Table,
        from: u64,
        upper: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let db = &self.shared.db;
        let upper = upper.min(ROW_ID_MAX + 1);
        let mut rows = Vec::new();
        if from >= upper {
            return Ok(rows);
        }
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(key(self.group, row_key(table, 0) + upper).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Meta), options);
        iterator.seek(key(self.group, row_key(table, from)));
        let mut bytes = 0usize;
        while let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value()) {
            let Some((_, n)) = split_key(raw_key) else {
                break;
            };
            let id = n & ROW_ID_MAX;
            let payload = unframe(value, || {
                format!("row group={} table={table:?} id={id}", self.group)
            })?;
            if !rows.is_empty() && bytes + payload.len() > max_bytes {
                break;
            }
            bytes += payload.len();
            rows.push((id, payload.to_vec()));
            iterator.next();
        }
        iterator.status()?;
        Ok(rows)
    }

    /// The row of `table` with the smallest id `>= id`, if any.
    pub fn row_at_or_after(
        &self,
        table: Table,
        id: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        Ok(self.rows_from(table, id, 1)?.into_iter().next())
    }

    /// At most `max` rows of `table` from id `from` on, by id.
    pub fn rows_from(
        &self,
        table: Table,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let db = &self.shared.db;
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(key(self.group, row_key(table, ROW_ID_MAX) + 1).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Meta), options);
        iterator.seek(key(self.group, row_key(table, from.min(ROW_ID_MAX))));
        let mut rows = Vec::new();
        while rows.len() < max
            && let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value())
        {
            let Some((_, n)) = split_key(raw_key) else {
                break;
            };
            let id = n & ROW_ID_MAX;
            let payload = unframe(value, || {
                format!("row group={} table={table:?} id={id}", self.group)
            })?;
            rows.push((id, payload.to_vec()));
            iterator.next();
        }
        iterator.status()?;
        Ok(rows)
    }

    /// The index entry holding `offset`: the entry with the greatest base offset `<= offset`.
    pub fn index_floor(&self, offset: u64) -> Result<Option<IndexEntry>, StorageError> {
        let db = &self.shared.db;
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(key(self.group, 0).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Index), options);
        iterator.seek_for_prev(key(self.group, offset));
        iterator.status()?;
        let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value()) else {
            return Ok(None);
        };
        self.index_entry(raw_key, value)
    }

    /// The first index entry whose position is `>= position`, if any: positions grow with
    /// offsets, so it is found by bisection over offsets (tens of seeks).
    pub fn index_at_position(&self, position: u64) -> Result<Option<IndexEntry>, StorageError> {
        let Some(last) = self.index_floor(u64::MAX)? else {
            return Ok(None);
        };
        if last.position < position {
            return Ok(None);
        }
        let Some(first) = self.index_range(0, u64::MAX, 1)?.pop() else {
            return Ok(None);
        };
        if first.position >= position {
            return Ok(Some(first));
        }
        // Invariant: the entry at or before `low` is below `position`; `found` is at or above.
        let (mut low, mut found) = (first.base_offset, last);
        while low + 1 < found.base_offset {
            let middle = low + (found.base_offset - low) / 2;
            // Retention or compaction may delete the head of the index meanwhile.
            let Some(entry) = self.index_floor(middle)? else {
                return Err(StorageError::Moved(format!(
                    "the offset index of group {}",
                    self.group
                )));
            };
            if entry.position >= position {
                found = entry;
            } else {
                low = middle;
            }
        }
        Ok(Some(found))
    }

    /// Up to `max` index entries with base offsets in `from..to`, in offset order.
    pub fn index_range(
        &self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<IndexEntry>, StorageError> {
        let db = &self.shared.db;
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(key(self.group, to).to_vec());
        let mut iterator = db.raw_iterator_cf_opt(CfHandles.get(db, Cf::Index), options);
        iterator.seek(key(self.group, from));
        let mut entries = Vec::new();
        while entries.len() < max {
            let (Some(raw_key), Some(value)) = (iterator.key(), iterator.value()) else {
                break;
            };
            match self.index_entry(raw_key, value)? {
                Some(entry) => entries.push(entry),
                None => break,
            }
            iterator.next();
        }
        iterator.status()?;
        Ok(entries)
    }

    /// Decodes one index key and value; `None` for a key of another group or shape.
    fn index_entry(
        &self,
        raw_key: &[u8],
        value: &[u8],
    ) -> Result<Option<IndexEntry>, StorageError> {
        let Some((group, base_offset)) = split_key(raw_key) else {
            return Ok(None);
        };
        if group != self.group {
            return Ok(None);
        }
        let what = || format!("index group={} offset={base_offset}", self.group);
        let payload = unframe(value, what)?;
        let malformed = || StorageError::Malformed {
            what: what(),
            reason: "index value is not 12 (or 20, with a position) bytes plus 4 per skipped batch",
        };
        if payload.len() < 12 {
            return Err(malformed());
        }
        let count = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
        // Entries written before positions were kept have none: they count as position 0.
        let (position, rest) = if count & INDEX_HAS_POSITION != 0 {
            let position = payload.get(12..20).ok_or_else(malformed)?;
            (
                u64::from_be_bytes(position.try_into().expect("8 bytes")),
                &payload[20..],
            )
        } else {
            (0, &payload[12..])
        };
        if rest.len() % 4 != 0 {
            return Err(malformed());
        }
        Ok(Some(IndexEntry {
            base_offset,
            log_index: u64::from_be_bytes(payload[..8].try_into().expect("8 bytes")),
            count: count & !INDEX_HAS_POSITION,
            position,
            skipped_batches: rest
                .chunks_exact(4)
                .map(|chunk| u32::from_be_bytes(chunk.try_into().expect("4 bytes")))
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(dir, &StoreOptions::default()).expect("open store")
    }

    async fn append(group: &GroupStore, range: std::ops::Range<u64>) {
        let mut batch = group.batch();
        for index in range {
            group.put_log(&mut batch, index, format!("entry-{index}").as_bytes());
        }
        group.write_durable(batch).await.expect("append");
    }

    /// Appended entries read back in order, bounded by range and bytes, and groups are isolated.
    #[tokio::test]
    async fn append_and_range_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = store.group(GroupId(1));
        let b = store.group(GroupId(2));
        append(&a, 0..10).await;
        append(&b, 5..7).await;
        let entries = a.read_log(2, 5, usize::MAX).unwrap();
        let indexes: Vec<u64> = entries.iter().map(|(index, _)| *index).collect();
        assert_eq!(indexes, vec![2, 3, 4]);
        assert_eq!(entries[0].1, b"entry-2");
        assert_eq!(
            a.read_log(0, 10, 1).unwrap().len(),
            1,
            "max_bytes still returns one entry"
        );
        assert_eq!(a.log_bounds().unwrap(), Some((0, 9)));
        assert_eq!(b.log_bounds().unwrap(), Some((5, 6)));
        assert_eq!(store.group(GroupId(3)).log_bounds().unwrap(), None);
    }

    /// Truncation removes the tail after a conflict and new entries take the same indexes.
    #[tokio::test]
    async fn conflict_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let group = store.group(GroupId(7));
        append(&group, 0..10).await;
        let mut batch = group.batch();
        group.delete_log_from(&mut batch, 6);
        group.put_log(&mut batch, 6, b"new-6");
        group.write_durable(batch).await.unwrap();
        assert_eq!(group.log_bounds().unwrap(), Some((0, 6)));
        assert_eq!(group.get_log(6).unwrap().unwrap(), b"new-6");
        assert_eq!(group.get_log(7).unwrap(), None);
    }

    /// Purge removes the head; reads start at the first remaining entry.
    #[tokio::test]
    async fn purge_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let group = store.group(GroupId(7));
        append(&group, 0..10).await;
        let mut batch = group.batch();
        group.delete_log_upto(&mut batch, 3);
        group.write_durable(batch).await.unwrap();
        assert_eq!(group.log_bounds().unwrap(), Some((4, 9)));
        let entries = group.read_log(0, 10, usize::MAX).unwrap();
        let first = entries.first().map(|(index, _)| *index);
        assert_eq!(first, Some(4), "a read starts at the first entry");
        assert_eq!(entries.len(), 6);
    }

    /// Everything written durable is there after the store is closed and reopened: log, meta,
    /// index entries (with their skipped batches) and table rows.
    #[tokio::test]
    async fn restart_recovery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let group = store.group(GroupId(1));
            append(&group, 0..100).await;
            let mut batch = group.batch();
            group.put_meta(&mut batch, MetaKey::Election, b"election-3");
            group.put_index(&mut batch, &index_entry(40, 12, 5, vec![]));
            group.put_index(&mut batch, &index_entry(45, 14, 3, vec![0, 2]));
            group.put_row(&mut batch, Table::Producers, 7, b"seven");
            group.put_row(&mut batch, Table::Producers, ROW_ID_MAX, b"last");
            group.put_row(&mut batch, Table::Producers, 9, b"gone");
            group.delete_row(&mut batch, Table::Producers, 9);
            group.write_durable(batch).await.unwrap();
        }
        let store = open(dir.path());
        let group = store.group(GroupId(1));
        assert_eq!(group.log_bounds().unwrap(), Some((0, 99)));
        assert_eq!(
            group.get_meta(MetaKey::Election).unwrap().unwrap(),
            b"election-3"
        );
        assert_eq!(
            group.index_floor(43).unwrap().unwrap(),
            index_entry(40, 12, 5, vec![])
        );
        assert_eq!(group.index_floor(39).unwrap(), None);
        assert_eq!(
            group.index_range(41, 100, 10).unwrap(),
            vec![index_entry(45, 14, 3, vec![0, 2])],
            "skipped batches read back"
        );
        assert_eq!(group.index_range(0, 100, 1).unwrap().len(), 1, "max bounds");
        assert_eq!(
            group.rows(Table::Producers).unwrap(),
            vec![(7, b"seven".to_vec()), (ROW_ID_MAX, b"last".to_vec())],
            "rows survive, deleted rows do not, and meta keys are not rows"
        );
        assert!(
            store
                .group(GroupId(2))
                .rows(Table::Producers)
                .unwrap()
                .is_empty()
        );
        let mut batch = group.batch();
        group.clear_table(&mut batch, Table::Producers);
        group.write_durable(batch).await.unwrap();
        assert!(group.rows(Table::Producers).unwrap().is_empty());
        assert!(group.get_meta(MetaKey::Election).unwrap().is_some());
    }

    fn index_entry(base_offset: u64, log_index: u64, count: u32, skipped: Vec<u32>) -> IndexEntry {
        IndexEntry {
            base_offset,
            log_index,
            count,
            position: base_offset * 100,
            skipped_batches: skipped,
        }
    }

    fn small(journal_file_bytes: u64) -> StoreOptions {
        StoreOptions {
            write_buffer_bytes: 4 << 20,
            journal_file_bytes,
            journal_replay_bytes_max: 1 << 20,
            ..StoreOptions::default()
        }
    }

    fn journal_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        files
    }

    async fn append_sized(group: &GroupStore, range: std::ops::Range<u64>, bytes: usize) {
        for index in range {
            let mut batch = group.batch();
            let mut payload = vec![(index % 251) as u8; bytes];
            payload[..8].copy_from_slice(&index.to_be_bytes());
            group.put_log(&mut batch, index, &payload);
            group.write_durable(batch).await.expect("append");
        }
    }

    fn check_sized(group: &GroupStore, range: std::ops::Range<u64>, bytes: usize) {
        let entries = group.read_log(range.start, range.end, usize::MAX).unwrap();
        assert_eq!(entries.len() as u64, range.end - range.start);
        for (index, payload) in entries {
            assert_eq!(payload.len(), bytes);
            assert_eq!(payload[..8], index.to_be_bytes());
            assert!(payload[8..].iter().all(|b| *b == (index % 251) as u8));
        }
    }

    /// Across many journal files, flushes and restarts, every entry reads back; the journal
    /// position RocksDB persisted moves on, so a restart replays only the recent records.
    #[tokio::test]
    async fn journal_rotates_flushes_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
            let group = store.group(GroupId(3));
            append_sized(&group, 0..3000, 2000).await;
            check_sized(&group, 0..3000, 2000);
        }
        assert!(journal_files(dir.path()).len() > 4, "1 MiB files rotate");
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let group = store.group(GroupId(3));
        check_sized(&group, 0..3000, 2000);
        let applied = store
            .shared
            .db
            .get_cf(
                CfHandles.get(&store.shared.db, Cf::Meta),
                crate::journal::APPLIED_KEY,
            )
            .unwrap()
            .and_then(|value| crate::journal::Position::decode(&value))
            .expect("a flush persisted the journal position");
        assert!(applied.file > 1, "flushes happened: {applied:?}");
        append_sized(&group, 3000..3100, 2000).await;
        drop((group, store));
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        check_sized(&store.group(GroupId(3)), 0..3100, 2000);
    }

    fn journal_ids(dir: &Path) -> Vec<u64> {
        journal_files(dir)
            .iter()
            .filter_map(|path| path.file_stem()?.to_str()?.parse().ok())
            .collect()
    }

    /// The id of the journal file being appended.
    fn current_file(store: &Store) -> u64 {
        store.shared.journal.current_file()
    }

    /// Writes `count` entries of filler to `group` from index `from` and deletes them again, so
    /// the journal moves on by `count` * 2000 bytes and RocksDB persists its position past what
    /// came before.
    async fn filler(group: &GroupStore, from: u64, count: u64) {
        append_sized(group, from..from + count, 2000).await;
        let mut batch = group.batch();
        group.delete_log_upto(&mut batch, from + count - 1);
        group.write_durable(batch).await.unwrap();
    }

    /// A file no group's entries lie in is removed even while an older file is still needed: a
    /// log written once, beside one written and trimmed all along, pins only its own file; a
    /// file between a log's first and last entries stays even when every entry in it is gone.
    #[tokio::test]
    async fn journal_files_between_live_logs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let once = store.group(GroupId(1));
        let trimmed = store.group(GroupId(2));
        let ends = store.group(GroupId(4));
        append_sized(&once, 0..10, 2000).await;
        append_sized(&trimmed, 0..1500, 2000).await;
        let ends_first = current_file(&store);
        append_sized(&ends, 0..10, 2000).await;
        append_sized(&trimmed, 1500..3000, 2000).await;
        append_sized(&ends, 10..20, 2000).await;
        let ends_last = current_file(&store);
        append_sized(&trimmed, 3000..4500, 2000).await;
        let mut batch = trimmed.batch();
        trimmed.delete_log_upto(&mut batch, 4399);
        trimmed.write_durable(batch).await.unwrap();
        // Move the replay start past the trim.
        filler(&store.group(GroupId(3)), 0, 1200).await;
        let before = journal_ids(dir.path());
        let removed = store.remove_unused_journal_files().unwrap();
        let after = journal_ids(dir.path());
        eprintln!("{before:?} -> {after:?}; `ends` spans {ends_first}..={ends_last}");
        assert!(
            ends_last >= ends_first + 2,
            "a file lies between `ends`' entries"
        );
        assert_eq!(
            after.first(),
            Some(&1),
            "the log written once keeps its file"
        );
        assert!(!after.contains(&2), "a file before `ends` goes");
        for file in ends_first..=ends_last {
            assert!(after.contains(&file), "file {file} is in `ends`' span");
        }
        assert!(
            !after.contains(&(ends_last + 1)),
            "a file after `ends` and before the trimmed log's entries goes"
        );
        assert!(removed.files >= 3, "{removed:?}");
        check_sized(&once, 0..10, 2000);
        check_sized(&ends, 0..20, 2000);
        check_sized(&trimmed, 4400..4500, 2000);
        drop((once, trimmed, ends, store));
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        check_sized(&store.group(GroupId(1)), 0..10, 2000);
        check_sized(&store.group(GroupId(4)), 0..20, 2000);
        check_sized(&store.group(GroupId(2)), 4400..4500, 2000);
    }

    /// After an adoption the entries a group keeps past the adopted ones may lie in older files
    /// than those: its first and last entries no longer bound its files, and none of them may
    /// go while the adopted entries are there. Once they are gone the span is the log's ends
    /// again and the adopted entries' files go.
    #[tokio::test]
    async fn journal_files_of_a_log_kept_past_an_adoption_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let group = store.group(GroupId(1));
        let staging = store.group(GroupId(2));
        // Entries 0..600 span the first two files; 301.. are kept past the adoption.
        append_sized(&group, 0..600, 2000).await;
        assert_eq!(current_file(&store), 2);
        filler(&store.group(GroupId(3)), 0, 1500).await;
        let staged_first = current_file(&store);
        append_sized(&staging, 0..301, 8000).await;
        let staged_last = current_file(&store);
        assert!(
            staged_last >= staged_first + 2,
            "the adopted entries span 3 files"
        );
        let mut batch = group.batch();
        group.adopt(&mut batch, &staging, 300, &[]).unwrap();
        group.write_durable(batch).await.unwrap();
        filler(&store.group(GroupId(3)), 1500, 1200).await;
        let removed = store.remove_unused_journal_files().unwrap();
        let after = journal_ids(dir.path());
        assert!(removed.files > 0, "the filler's files go: {removed:?}");
        for file in (1..=2).chain(staged_first..=staged_last) {
            assert!(
                after.contains(&file),
                "file {file} holds entries: {after:?}"
            );
        }
        check_sized(&group, 0..301, 8000);
        check_sized(&group, 301..600, 2000);
        drop((group, staging, store));
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let group = store.group(GroupId(1));
        check_sized(&group, 0..301, 8000);
        check_sized(&group, 301..600, 2000);
        let mut batch = group.batch();
        group.delete_log_upto(&mut batch, 450);
        group.write_durable(batch).await.unwrap();
        filler(&store.group(GroupId(3)), 2700, 1200).await;
        store.remove_unused_journal_files().unwrap();
        let after = journal_ids(dir.path());
        assert!(after.contains(&2), "entries 451.. are in file 2: {after:?}");
        for file in staged_first + 1..=staged_last {
            assert!(
                !after.contains(&file),
                "file {file} held only adopted entries: {after:?}"
            );
        }
        check_sized(&group, 451..600, 2000);
    }

    /// A second adoption below the first keeps the first one's span with the entries it left:
    /// the group then holds three runs out of journal order, and every file of each stays.
    #[tokio::test]
    async fn journal_spans_of_two_adoptions_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let group = store.group(GroupId(1));
        let staging = store.group(GroupId(2));
        let filler_group = store.group(GroupId(3));
        append_sized(&group, 0..600, 2000).await;
        filler(&filler_group, 0, 1500).await;
        let first_run = current_file(&store);
        append_sized(&staging, 0..301, 8000).await;
        let mut batch = group.batch();
        group.adopt(&mut batch, &staging, 300, &[]).unwrap();
        group.write_durable(batch).await.unwrap();
        filler(&filler_group, 1500, 1500).await;
        let second_run = current_file(&store);
        append_sized(&staging, 0..101, 8000).await;
        let mut batch = group.batch();
        group.adopt(&mut batch, &staging, 100, &[]).unwrap();
        group.write_durable(batch).await.unwrap();
        filler(&filler_group, 3000, 1200).await;
        store.remove_unused_journal_files().unwrap();
        let after = journal_ids(dir.path());
        for file in (1..=2).chain(first_run..=first_run + 1).chain([second_run]) {
            assert!(
                after.contains(&file),
                "file {file} holds entries: {after:?}"
            );
        }
        check_sized(&group, 0..301, 8000);
        check_sized(&group, 301..600, 2000);
        drop((group, staging, filler_group, store));
        let store = Store::open(dir.path(), &small(1 << 20)).unwrap();
        let group = store.group(GroupId(1));
        check_sized(&group, 0..301, 8000);
        check_sized(&group, 301..600, 2000);
    }

    /// A torn record at the end of the journal (a crash mid-write) is cut off at open; every
    /// whole record before it is kept and new writes continue after it.
    #[tokio::test]
    async fn torn_journal_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            append_sized(&store.group(GroupId(1)), 0..50, 300).await;
        }
        let last = journal_files(dir.path()).pop().unwrap();
        let whole = std::fs::metadata(&last).unwrap().len();
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&last)
                .unwrap();
            // A header that promises more body than follows, then a few bytes of it.
            let mut torn = Vec::new();
            torn.extend_from_slice(&0x4a44_524fu32.to_le_bytes());
            torn.extend_from_slice(&1000u32.to_le_bytes());
            torn.extend_from_slice(&[7u8; 40]);
            file.write_all(&torn).unwrap();
        }
        let store = open(dir.path());
        assert_eq!(
            std::fs::metadata(&last).unwrap().len(),
            whole,
            "torn tail cut"
        );
        let group = store.group(GroupId(1));
        check_sized(&group, 0..50, 300);
        append_sized(&group, 50..60, 300).await;
        drop((group, store));
        let store = open(dir.path());
        check_sized(&store.group(GroupId(1)), 0..60, 300);
    }

    /// If the journal lost bytes RocksDB already refers to, opening fails with a clear error
    /// rather than serving entries whose bytes are gone.
    #[tokio::test]
    async fn journal_shorter_than_rocksdb_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &small(1 << 30)).unwrap();
            append_sized(&store.group(GroupId(1)), 0..1000, 2000).await;
        }
        let last = journal_files(dir.path()).pop().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(1000)
            .unwrap();
        let error = Store::open(dir.path(), &small(1 << 30)).unwrap_err();
        assert!(
            error.to_string().contains("synced journal bytes were lost"),
            "{error}"
        );
    }

    /// A data directory of the layout before the journal is refused with what to do.
    #[test]
    fn old_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("CURRENT"), b"MANIFEST-000001\n").unwrap();
        let error = Store::open(dir.path(), &StoreOptions::default()).unwrap_err();
        assert!(
            error.to_string().contains("empty data directory"),
            "{error}"
        );
    }

    /// Concurrent durable writes complete, and share fsyncs (group commit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..64u64 {
            let group = store.group(GroupId(writer));
            tasks.spawn(async move { append(&group, 0..20).await });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        let stats = store.stats();
        let fsyncs = stats.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
        let callbacks = stats
            .fsync_callbacks
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(callbacks, 64, "one durability callback per durable write");
        assert!(fsyncs <= callbacks);
        for writer in 0..64u64 {
            assert_eq!(
                store.group(GroupId(writer)).log_bounds().unwrap(),
                Some((0, 19))
            );
        }
    }

    /// A value whose bytes changed on disk is reported as corruption, never returned.
    #[tokio::test]
    async fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let group = store.group(GroupId(1));
        // Write a raw value with a wrong checksum, as a flipped bit on disk would leave it.
        let mut value = frame(b"payload");
        value[5] ^= 0x01;
        let request = WriteRequest {
            ops: vec![Op::Put {
                cf: Cf::Log,
                key: key(GroupId(1), 0).to_vec(),
                value,
            }],
            written: None,
            durable: None,
        };
        store.shared.writer.send(request).await.unwrap();
        group.write_durable(group.batch()).await.unwrap();
        assert!(matches!(
            group.get_log(0),
            Err(StorageError::Corruption { .. })
        ));
        assert!(matches!(
            group.read_log(0, 1, usize::MAX),
            Err(StorageError::Corruption { .. })
        ));
    }
}
