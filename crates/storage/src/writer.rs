//! The write path: one writer thread and one fsync thread per node.
//!
//! Every write of every group is a [`WriteRequest`] sent over a bounded channel to the writer
//! thread, which drains whatever is queued, applies it as ONE RocksDB `WriteBatch` without sync
//! (so the data is readable at once) and answers `written`. Requests that need durability hand
//! their callback to the fsync thread, which drains every pending callback, calls
//! `flush_wal(sync = true)` once and then runs them all: N concurrent appends cost one fsync
//! (group commit), and a write queued while an fsync runs is covered by the next one.
//! When the fsync thread is idle and nothing else is queued, the writer thread fsyncs itself
//! and runs the callbacks: at low load that saves a thread wake-up (tens of microseconds on a
//! virtual machine) on every durable write.
//!
//! Ordering: writes are applied in channel order, and RocksDB's WAL is ordered, so an fsync that
//! covers a write also covers every write applied before it (a truncation before an append, a
//! vote before the entries of its term).
//!
//! Never: call a durability callback before `flush_wal(true)` returned Ok; block an async task
//! (async callers only `send().await` on the bounded channel and await a oneshot).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use rocksdb::DB;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::StorageError;
use crate::store::Cf;
use crate::store::StoreStats;

/// Called once the write it belongs to is on disk (or failed).
pub type Durable = Box<dyn FnOnce(Result<(), StorageError>) + Send + 'static>;

/// One mutation inside a write request.
pub(crate) enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// A batch of mutations that must be applied atomically and in order with the others.
pub(crate) struct WriteRequest {
    pub(crate) ops: Vec<Op>,
    /// Answered once the ops are applied (readable), before they are durable.
    pub(crate) written: Option<oneshot::Sender<Result<(), StorageError>>>,
    /// Run once the ops are durable.
    pub(crate) durable: Option<Durable>,
}

/// Most requests merged into one `WriteBatch`, so one huge backlog cannot delay the first
/// `written` answers without bound.
const REQUESTS_PER_BATCH_MAX: usize = 1024;

/// Starts the writer and fsync threads. They stop when every sender is dropped.
pub(crate) fn start(
    db: Arc<DB>,
    cfs: crate::store::CfHandles,
    stats: Arc<StoreStats>,
    queue_max: usize,
) -> std::io::Result<(mpsc::Sender<WriteRequest>, Vec<std::thread::JoinHandle<()>>)> {
    let (tx, rx) = mpsc::channel::<WriteRequest>(queue_max);
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Vec<Durable>>(queue_max);
    // Jobs handed to the fsync thread whose callbacks have not all run yet.
    let fsync_pending = Arc::new(AtomicUsize::new(0));
    let fsync = {
        let db = db.clone();
        let stats = stats.clone();
        let pending = fsync_pending.clone();
        std::thread::Builder::new()
            .name("ordo-fsync".into())
            .spawn(move || fsync_loop(&db, sync_rx, &stats, &pending))?
    };
    let writer = std::thread::Builder::new()
        .name("ordo-writer".into())
        .spawn(move || {
            let fsync = FsyncHandle {
                jobs: sync_tx,
                pending: fsync_pending,
            };
            writer_loop(&db, &cfs, rx, &fsync, &stats)
        })?;
    Ok((tx, vec![writer, fsync]))
}

/// The writer's side of the fsync thread.
struct FsyncHandle {
    jobs: std::sync::mpsc::SyncSender<Vec<Durable>>,
    pending: Arc<AtomicUsize>,
}

fn writer_loop(
    db: &DB,
    cfs: &crate::store::CfHandles,
    mut rx: mpsc::Receiver<WriteRequest>,
    fsync: &FsyncHandle,
    stats: &StoreStats,
) {
    let mut options = WriteOptions::default();
    options.set_sync(false);
    let mut requests = Vec::with_capacity(REQUESTS_PER_BATCH_MAX);
    while let Some(first) = rx.blocking_recv() {
        requests.push(first);
        while requests.len() < REQUESTS_PER_BATCH_MAX {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        for request in &requests {
            for op in &request.ops {
                match op {
                    Op::Put { cf, key, value } => batch.put_cf(cfs.get(db, *cf), key, value),
                    Op::DeleteRange { cf, from, to } => {
                        batch.delete_range_cf(cfs.get(db, *cf), from, to)
                    }
                }
            }
        }
        let bytes = batch.size_in_bytes() as u64;
        let result = db.write_opt(batch, &options).map_err(StorageError::from);
        stats.write_batches.fetch_add(1, Ordering::Relaxed);
        stats.write_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(error) = &result {
            tracing::error!(%error, "storage write failed");
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
            sync_and_complete(db, durables, stats);
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
}

/// One `flush_wal(true)` covering every write applied so far, then the callbacks.
fn sync_and_complete(db: &DB, callbacks: Vec<Durable>, stats: &StoreStats) {
    let started = std::time::Instant::now();
    let result = db.flush_wal(true).map_err(StorageError::from);
    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
    stats
        .fsync_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats
        .fsync_callbacks
        .fetch_add(callbacks.len() as u64, Ordering::Relaxed);
    if let Err(error) = &result {
        tracing::error!(%error, "wal fsync failed");
    }
    for callback in callbacks {
        callback(result.clone());
    }
}

fn fsync_loop(
    db: &DB,
    rx: std::sync::mpsc::Receiver<Vec<Durable>>,
    stats: &StoreStats,
    pending: &AtomicUsize,
) {
    let mut callbacks: Vec<Durable> = Vec::new();
    while let Ok(first) = rx.recv() {
        callbacks.extend(first);
        let mut jobs = 1;
        while let Ok(next) = rx.try_recv() {
            callbacks.extend(next);
            jobs += 1;
        }
        sync_and_complete(db, std::mem::take(&mut callbacks), stats);
        pending.fetch_sub(jobs, Ordering::AcqRel);
    }
}
