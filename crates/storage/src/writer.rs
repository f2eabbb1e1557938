//! The write path: one writer thread and one fsync thread per node, and [`StoreStats`], their
//! counters.
//!
//! Every write of every group is a [`WriteRequest`] sent over a bounded channel to the writer
//! thread, which drains whatever is queued, appends it to the journal as ONE record (see
//! `journal`) and applies it to RocksDB as one `WriteBatch` without RocksDB's WAL (so the data
//! is readable at once), then answers `written`. Requests that need durability hand their
//! callback to the fsync thread, which drains every pending callback, syncs the journal once and
//! then runs them all: N concurrent appends cost one fsync (group commit), and a write queued
//! while an fsync runs is covered by the next one.
//! When the fsync thread is idle and nothing else is queued, the writer thread fsyncs itself
//! and runs the callbacks: at low load that saves a thread wake-up (tens of microseconds on a
//! virtual machine) on every durable write.
//!
//! Ordering: writes are applied in channel order, and the journal is ordered, so a sync that
//! covers a write also covers every write applied before it (a truncation before the appends
//! that replace it, a metadata value before the entries written after it).
//!
//! Memtables: the writer thread flushes RocksDB itself, after syncing the journal, once the
//! memtables hold a quarter of `StoreOptions::write_buffer_bytes` or the journal grew by
//! `StoreOptions::journal_replay_bytes_max` since the last flush (which bounds the replay at
//! start-up); see `FlushPolicy`. RocksDB's own flush trigger (a full memtable, at
//! `write_buffer_bytes`) is well above the first bound, so RocksDB never persists a memtable
//! that refers to journal bytes not yet synced.
//!
//! Never: call a durability callback before the journal sync that covers it returned Ok; block an
//! async task (async callers only `send().await` on the bounded channel and await a oneshot).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use rocksdb::DB;
use rocksdb::FlushOptions;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::error::StorageError;
use crate::journal;
use crate::journal::BodyOp;
use crate::journal::Journal;
use crate::journal::JournalWriter;
use crate::journal::Location;
use crate::journal::Position;
use crate::ops::Cf;
use crate::ops::CfHandles;
use crate::ops::Op;

/// The callback of a durable write: called once, with `Ok` after the journal sync that covers
/// the write returned, or with the error that failed the write or the sync.
pub type DurableCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send + 'static>;

/// Counters of the write path, read by the server's metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Write batches applied by the writer thread (one per journal record).
    pub write_batches: AtomicU64,
    /// Journal bytes of those batches (their records, headers included).
    pub write_bytes: AtomicU64,
    /// Journal fsyncs that completed durability callbacks.
    pub fsyncs: AtomicU64,
    /// Total time spent in those fsyncs, microseconds.
    pub fsync_micros: AtomicU64,
    /// Durability callbacks completed by those fsyncs (callbacks / fsyncs = group commit size).
    pub fsync_callbacks: AtomicU64,
}

/// A batch of mutations that must be applied atomically and in order with the others.
pub(crate) struct WriteRequest {
    pub(crate) ops: Vec<Op>,
    /// Answered once the ops are applied (readable), before they are durable.
    pub(crate) written: Option<oneshot::Sender<Result<(), StorageError>>>,
    /// Run once the ops are durable.
    pub(crate) durable: Option<DurableCallback>,
}

/// Most requests merged into one `WriteBatch`, so one huge backlog cannot delay the first
/// `written` answers without bound.
const REQUESTS_PER_BATCH_MAX: usize = 1024;
/// No more requests are merged into a journal record once it holds this many bytes (one
/// request alone may be larger: an append of many log entries).
const RECORD_BYTES_TARGET: usize = 16 << 20;

impl WriteRequest {
    /// Bytes of keys and values in the request.
    fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } | Op::PutRaw { key, value, .. } => {
                    key.len() + value.len()
                }
                Op::DeleteRange { from, to, .. } => from.len() + to.len(),
                Op::Delete { key, .. } => key.len(),
            })
            .sum()
    }
}

/// When the writer thread flushes RocksDB's memtables (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlushPolicy {
    pub(crate) memtable_bytes: u64,
    pub(crate) journal_bytes: u64,
}

/// What was written to RocksDB's memtables since the last flush.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Unflushed {
    pub(crate) memtable_bytes: u64,
    pub(crate) journal_bytes: u64,
}

/// Everything the writer thread owns.
pub(crate) struct WriterParts {
    pub(crate) db: Arc<DB>,
    pub(crate) journal: Arc<Journal>,
    pub(crate) appender: JournalWriter,
    pub(crate) stats: Arc<StoreStats>,
    pub(crate) policy: FlushPolicy,
    pub(crate) unflushed: Unflushed,
    /// The record being built, reused from batch to batch.
    pub(crate) record: Vec<u8>,
    /// Set to the first write or sync error (see [`crate::Store::fault`]).
    pub(crate) fault: Arc<tokio::sync::watch::Sender<Option<StorageError>>>,
}

/// Records the first storage failure for whoever watches [`crate::Store::fault`].
fn report_fault(fault: &tokio::sync::watch::Sender<Option<StorageError>>, error: &StorageError) {
    fault.send_if_modified(|first| {
        if first.is_some() {
            return false;
        }
        *first = Some(error.clone());
        true
    });
}

/// Starts the writer and fsync threads. They stop when every sender is dropped.
pub(crate) fn start(
    parts: WriterParts,
    queue_max: usize,
) -> std::io::Result<(mpsc::Sender<WriteRequest>, Vec<std::thread::JoinHandle<()>>)> {
    let (tx, rx) = mpsc::channel::<WriteRequest>(queue_max);
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Vec<DurableCallback>>(queue_max);
    // Jobs handed to the fsync thread whose callbacks have not all run yet.
    let fsync_pending = Arc::new(AtomicUsize::new(0));
    let fsync = {
        let journal = parts.journal.clone();
        let stats = parts.stats.clone();
        let fault = parts.fault.clone();
        let pending = fsync_pending.clone();
        std::thread::Builder::new()
            .name("ordo-fsync".into())
            .spawn(move || fsync_loop(&journal, sync_rx, &stats, &fault, &pending))?
    };
    let writer = std::thread::Builder::new()
        .name("ordo-writer".into())
        .spawn(move || {
            let fsync = FsyncHandle {
                jobs: sync_tx,
                pending: fsync_pending,
            };
            writer_loop(parts, rx, &fsync)
        })?;
    Ok((tx, vec![writer, fsync]))
}

/// The writer's side of the fsync thread.
struct FsyncHandle {
    jobs: std::sync::mpsc::SyncSender<Vec<DurableCallback>>,
    pending: Arc<AtomicUsize>,
}

fn no_wal() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(false);
    options.disable_wal(true);
    options
}

/// The RocksDB batch for one journal record whose body starts at `at`; `end` is the position
/// just past the record, stored with the batch (see `journal`'s recovery).
pub(crate) fn batch_for_record(
    db: &DB,
    at: Position,
    body: &[u8],
    end: Position,
) -> Result<WriteBatch, StorageError> {
    let mut batch = WriteBatch::default();
    for op in journal::decode_body(at, body)? {
        match op {
            BodyOp::Put {
                cf: Cf::Log,
                key,
                value,
                value_at,
            } => {
                let location = Location {
                    file: at.file,
                    offset: value_at,
                    len: value.len() as u32,
                };
                batch.put_cf(
                    CfHandles.get(db, Cf::Log),
                    key,
                    journal::log_pointer(location),
                );
            }
            BodyOp::Put { cf, key, value, .. } | BodyOp::PutRaw { cf, key, value } => {
                batch.put_cf(CfHandles.get(db, cf), key, value)
            }
            BodyOp::DeleteRange { cf, from, to } => {
                batch.delete_range_cf(CfHandles.get(db, cf), from, to)
            }
            BodyOp::Delete { cf, key } => batch.delete_cf(CfHandles.get(db, cf), key),
        }
    }
    batch.put_cf(
        CfHandles.get(db, Cf::Meta),
        journal::APPLIED_KEY,
        end.encode(),
    );
    Ok(batch)
}

/// Appends the requests' ops to the journal and applies them to RocksDB. A record that reached
/// the journal but not RocksDB is cut off the journal again: the write failed, and the replay at
/// the next open must not bring it back.
fn write_requests(parts: &mut WriterParts, requests: &[WriteRequest]) -> Result<(), StorageError> {
    let mut record = std::mem::take(&mut parts.record);
    journal::start_record(&mut record);
    for request in requests {
        for op in &request.ops {
            journal::encode_op(&mut record, op);
        }
    }
    let result = write_record(parts, &mut record);
    if record.capacity() <= RECORD_KEEP_BYTES_MAX {
        parts.record = record;
    }
    result
}

/// Larger record buffers are freed after use rather than kept for the next batch.
const RECORD_KEEP_BYTES_MAX: usize = 8 << 20;

fn write_record(parts: &mut WriterParts, record: &mut [u8]) -> Result<(), StorageError> {
    let at = parts.appender.append(record)?;
    let body = &record[journal::HEADER_LEN as usize..];
    let end = parts.appender.end();
    let applied = batch_for_record(&parts.db, at, body, end).and_then(|batch| {
        let bytes = batch.size_in_bytes() as u64;
        parts.db.write_opt(batch, &no_wal())?;
        Ok(bytes)
    });
    let memtable_bytes = match applied {
        Ok(bytes) => bytes,
        Err(error) => {
            parts.appender.cut_back(at)?;
            return Err(error);
        }
    };
    parts.stats.write_batches.fetch_add(1, Ordering::Relaxed);
    parts
        .stats
        .write_bytes
        .fetch_add(record.len() as u64, Ordering::Relaxed);
    parts.unflushed.memtable_bytes += memtable_bytes;
    parts.unflushed.journal_bytes += record.len() as u64;
    if parts.unflushed.memtable_bytes >= parts.policy.memtable_bytes
        || parts.unflushed.journal_bytes >= parts.policy.journal_bytes
    {
        flush_memtables(parts)?;
    }
    Ok(())
}

/// Syncs the journal, then has RocksDB flush every memtable (without waiting for it): whatever
/// the flush persists refers only to synced journal bytes. A flush RocksDB refuses to schedule
/// (writes stopped, a background error) is logged and tried again after the next write; the
/// write itself is applied and is not failed for it.
fn flush_memtables(parts: &mut WriterParts) -> Result<(), StorageError> {
    parts.journal.sync()?;
    let db = &parts.db;
    let cfs: Vec<&rocksdb::ColumnFamily> =
        Cf::ALL.iter().map(|cf| CfHandles.get(db, *cf)).collect();
    let mut options = FlushOptions::default();
    options.set_wait(false);
    match db.flush_cfs_opt(&cfs, &options) {
        Ok(()) => parts.unflushed = Unflushed::default(),
        Err(error) => tracing::warn!(%error, "memtable flush not scheduled; retrying later"),
    }
    Ok(())
}

fn writer_loop(mut parts: WriterParts, mut rx: mpsc::Receiver<WriteRequest>, fsync: &FsyncHandle) {
    let mut requests = Vec::with_capacity(REQUESTS_PER_BATCH_MAX);
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.bytes();
        requests.push(first);
        while requests.len() < REQUESTS_PER_BATCH_MAX && bytes < RECORD_BYTES_TARGET {
            match rx.try_recv() {
                Ok(request) => {
                    bytes += request.bytes();
                    requests.push(request);
                }
                Err(_) => break,
            }
        }
        let result = write_requests(&mut parts, &requests);
        if let Err(error) = &result {
            tracing::error!(%error, "storage write failed");
            report_fault(&parts.fault, error);
        }
        let mut durables = Vec::new();
        for request in requests.drain(..) {
            if let Some(written) = request.written {
                // The caller may have given up waiting; the write is done either way.
                let _ = written.send(result.clone());
            }
            if let Some(durable) = request.durable {
                match &result {
                    Ok(()) => durables.push(durable),
                    Err(error) => durable(Err(error.clone())),
                }
            }
        }
        if durables.is_empty() {
            continue;
        }
        // Callbacks run in write order: inline only when every job handed over earlier has
        // completed (only this thread adds jobs, so none can appear meanwhile).
        if fsync.pending.load(Ordering::Acquire) == 0 && rx.is_empty() {
            sync_and_complete(&parts.journal, durables, &parts.stats, &parts.fault);
        } else {
            fsync.pending.fetch_add(1, Ordering::AcqRel);
            if let Err(unsent) = fsync.jobs.send(durables) {
                fsync.pending.fetch_sub(1, Ordering::AcqRel);
                for durable in unsent.0 {
                    durable(Err(StorageError::Closed));
                }
            }
        }
    }
    // RocksDB flushes its memtables when it closes: sync what they refer to first.
    if let Err(error) = parts.journal.sync() {
        tracing::error!(%error, "journal sync at shutdown failed");
    }
}

/// One journal sync covering every write applied so far, then the callbacks.
fn sync_and_complete(
    journal: &Journal,
    callbacks: Vec<DurableCallback>,
    stats: &StoreStats,
    fault: &tokio::sync::watch::Sender<Option<StorageError>>,
) {
    let started = std::time::Instant::now();
    let result = journal.sync();
    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
    stats
        .fsync_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats
        .fsync_callbacks
        .fetch_add(callbacks.len() as u64, Ordering::Relaxed);
    if let Err(error) = &result {
        tracing::error!(%error, "journal sync failed");
        report_fault(fault, error);
    }
    for callback in callbacks {
        callback(result.clone());
    }
}

/// Applies the journal records RocksDB has not persisted (see `journal`'s recovery). Returns
/// where the journal ends (last file, length) and what the replay put in the memtables.
pub(crate) fn recover(
    db: &DB,
    journal: &Journal,
    ids: &[u64],
) -> Result<(Option<(u64, u64)>, Unflushed), StorageError> {
    let applied = db
        .get_pinned_cf(CfHandles.get(db, Cf::Meta), journal::APPLIED_KEY)?
        .map(|value| {
            Position::decode(&value).ok_or_else(|| StorageError::Malformed {
                what: "journal position in rocksdb".into(),
                reason: "not 16 bytes",
            })
        })
        .transpose()?;
    if let Some(applied) = applied
        && !ids.contains(&applied.file)
    {
        return Err(StorageError::Io(format!(
            "rocksdb refers to journal file {} which is missing: the journal directory was \
             changed or lost; restore it or start this node with an empty data directory",
            applied.file
        )));
    }
    let start = applied.unwrap_or(Position { file: 0, offset: 0 });
    // After a kill the last file's unsynced tail is still in the page cache: make it durable
    // before RocksDB can persist anything that refers to it (only the last file can be
    // unsynced; rotation syncs the one before).
    if let Some(&last) = ids.last() {
        journal.sync_file(last)?;
    }
    let mut unflushed = Unflushed::default();
    let mut last = None;
    let replay: Vec<u64> = ids.iter().copied().filter(|id| *id >= start.file).collect();
    for (n, &id) in replay.iter().enumerate() {
        let from = if id == start.file { start.offset } else { 0 };
        let len = journal.len(id)?;
        if from > len {
            return Err(StorageError::Io(format!(
                "journal file {id} has {len} bytes but rocksdb has applied it up to {from}: \
                 synced journal bytes were lost"
            )));
        }
        let end = journal.scan(id, from, |at, body| {
            let end = Position {
                file: id,
                offset: at.offset + body.len() as u64,
            };
            let batch = batch_for_record(db, at, body, end)?;
            unflushed.memtable_bytes += batch.size_in_bytes() as u64;
            unflushed.journal_bytes += journal::HEADER_LEN + body.len() as u64;
            db.write_opt(batch, &no_wal())?;
            Ok(())
        })?;
        if end < len {
            if n + 1 < replay.len() {
                return Err(StorageError::Malformed {
                    what: format!("journal file {id} at byte {end}"),
                    reason: "a damaged record is followed by later journal files",
                });
            }
            tracing::warn!(
                file = id,
                at = end,
                dropped = len - end,
                "journal ends in a torn record; cutting it"
            );
            journal.truncate(id, end)?;
        }
        last = Some((id, end));
    }
    if last.is_none()
        && let Some(&id) = ids.last()
    {
        last = Some((id, journal.len(id)?));
    }
    Ok((last, unflushed))
}

fn fsync_loop(
    journal: &Journal,
    rx: std::sync::mpsc::Receiver<Vec<DurableCallback>>,
    stats: &StoreStats,
    fault: &tokio::sync::watch::Sender<Option<StorageError>>,
    pending: &AtomicUsize,
) {
    let mut callbacks: Vec<DurableCallback> = Vec::new();
    while let Ok(first) = rx.recv() {
        callbacks.extend(first);
        let mut jobs = 1;
        while let Ok(next) = rx.try_recv() {
            callbacks.extend(next);
            jobs += 1;
        }
        sync_and_complete(journal, std::mem::take(&mut callbacks), stats, fault);
        pending.fetch_sub(jobs, Ordering::AcqRel);
    }
}
