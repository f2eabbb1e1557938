//! openraft's `RaftLogStorage` over one group's slice of the node's RocksDB.
//!
//! Contract (openraft `storage/v2/raft_log_storage.rs`), and how it is kept:
//! - No holes: entries are written at their own index; truncation deletes `index..` and purge
//!   deletes `..=index`, both ends, never the middle.
//! - Writes serialized: every write goes through the storage writer thread in FIFO order.
//! - Vote durable before return: `save_vote` waits for the journal fsync.
//! - Flush callback only when durable: `append` hands openraft's callback to the fsync thread,
//!   which calls it after the journal fsync returned. `append` itself returns once the entries
//!   are readable (written to the memtable), so the leader replicates while its fsync runs.
//! - Reads of the recent tail (replication, apply) come from the entry cache. Appended entries
//!   enter it only once RocksDB holds them (never replicate what this log does not hold);
//!   truncations and purges cut it before they are written.
//! - Restart reads the last entry and the purge marker only: no scan of the log.
//! - A partition's log is its records: a purge deletes only the entries below the one holding
//!   the log start (`machine::Retention`), so the rows between that and the purge marker stay
//!   (openraft never reads them; fetches do).

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use ordo_storage::GroupStore;
use ordo_storage::MetaKey;

use crate::codec::decode;
use crate::codec::encode;
use crate::entry_cache::EntryCache;
use crate::machine::Retention;
use crate::types::C;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::Vote;

/// One group's Raft log.
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    store: GroupStore,
    /// The tail of the log in memory, shared with the log readers (clones of this store).
    cache: Arc<Mutex<EntryCache>>,
    /// A partition's retention (its log is its records): purges keep every entry from the one
    /// holding the log start. `None` for other groups, whose purges delete what openraft says.
    retention: Option<Arc<Retention>>,
}

impl LogStore {
    /// A log store over `store`, keeping up to `cache_bytes` of its tail in memory; a
    /// partition's purges keep what `retention` keeps.
    pub(crate) fn new(
        store: GroupStore,
        cache_bytes: usize,
        retention: Option<Arc<Retention>>,
    ) -> Self {
        Self {
            store,
            cache: Arc::new(Mutex::new(EntryCache::new(cache_bytes))),
            retention,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache
            .lock()
            .expect("entry cache lock is never poisoned")
    }

    async fn blocking<T, F>(&self, read: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&GroupStore) -> io::Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(io::Error::other)?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        store: &GroupStore,
        key: MetaKey,
    ) -> io::Result<Option<T>> {
        store.get_meta(key)?.map(|bytes| decode(&bytes)).transpose()
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(end) => end.saturating_add(1),
            Bound::Excluded(end) => *end,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        if let Some(entries) = self.cache().range(start, end) {
            return Ok(entries);
        }
        self.blocking(move |store| {
            // openraft's contract: return the whole range, and a hole is an error, never a
            // short read (the apply path trusts the range it asked for).
            let raw = store.read_log(start, end, usize::MAX)?;
            let next = raw.last().map(|(index, _)| index + 1);
            if let (Some(next), Some((_, last_in_log))) = (next, store.log_bounds()?) {
                if next < end && next <= last_in_log {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("hole in the log at index {next} (reading {start}..{end})"),
                    ));
                }
            }
            raw.iter()
                .map(|(index, bytes)| {
                    let entry: Entry = decode(bytes)?;
                    if entry.log_id.index != *index {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "entry stored at index {index} says index {}",
                                entry.log_id.index
                            ),
                        ));
                    }
                    Ok(entry)
                })
                .collect()
        })
        .await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.blocking(|store| Self::get_meta(store, MetaKey::Election))
            .await
    }
}

impl LogStore {
    /// Before the group starts: turns this node's own committed vote (it led that term) into
    /// an uncommitted one, durably, so that it cannot resume leading the old term.
    ///
    /// openraft restores a node whose saved vote is committed to itself as leader of that term
    /// at once. Entries the old leader had appended but not fsynced (it replicates while its
    /// fsync runs) may be on followers yet missing from its log after power loss; leading the
    /// same term again, it would write other entries under the same log ids, and the followers,
    /// matching by log id, would keep their different copies. With an uncommitted vote the node
    /// starts as a follower and a new term is elected.
    pub(crate) async fn give_up_restored_leadership(&mut self, me: u64) -> io::Result<()> {
        let Some(vote) = self.read_vote().await? else {
            return Ok(());
        };
        if vote.is_committed() && vote.leader_id().node_id == me {
            let demoted = Vote::new(vote.leader_id().term, me);
            tracing::info!(%vote, %demoted, "not resuming leadership of a term led before restart");
            self.save_vote(&demoted).await?;
        }
        Ok(())
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<C>> {
        self.blocking(|store| {
            let last_purged_log_id: Option<LogId> = Self::get_meta(store, MetaKey::LastPurged)?;
            let last_log_id = match store.log_bounds()? {
                Some((_, last)) => {
                    let bytes = store.get_log(last)?.ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "last log entry vanished while reading it",
                        )
                    })?;
                    let entry: Entry = decode(&bytes)?;
                    Some(entry.log_id)
                }
                None => last_purged_log_id.clone(),
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mut batch = self.store.batch();
        self.store
            .put_meta(&mut batch, MetaKey::Election, &encode(vote)?);
        Ok(self.store.write_durable(batch).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let mut batch = self.store.batch();
        self.store
            .put_meta(&mut batch, MetaKey::Committed, &encode(&committed)?);
        Ok(self.store.write(batch, None).await?)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let committed: Option<Option<LogId>> = self
            .blocking(|store| Self::get_meta(store, MetaKey::Committed))
            .await?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.store.batch();
        let mut appended = Vec::new();
        for entry in entries {
            self.store
                .put_log(&mut batch, entry.log_id.index, &encode(&entry)?);
            appended.push(entry);
        }
        let durable: ordo_storage::DurableCallback =
            Box::new(move |result| callback.io_completed(result.map_err(io::Error::from)));
        // Awaited until written, and cached only then: an entry must never be readable (and so
        // replicated) before this node's own log holds it. A leader that sent entries it then
        // lost (a failed write, or a crash before the writer thread got to them) could be
        // restored as leader of the same term and reuse their log ids for other entries, which
        // followers would take for the ones they have. The fault suite found exactly that.
        self.store.write(batch, Some(durable)).await?;
        let mut cache = self.cache();
        for entry in &appended {
            cache.append(entry);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|log_id| log_id.index + 1).unwrap_or(0);
        self.cache().truncate_from(from);
        let mut batch = self.store.batch();
        self.store.delete_log_from(&mut batch, from);
        Ok(self.store.write(batch, None).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.cache().purge_upto(log_id.index);
        // The marker goes first in the same batch: a reader that sees the gap also sees the marker.
        let mut batch = self.store.batch();
        self.store
            .put_meta(&mut batch, MetaKey::LastPurged, &encode(&log_id)?);
        match &self.retention {
            None => self.store.delete_log_upto(&mut batch, log_id.index),
            // A partition's entries are its records: only those retention dropped go (openraft
            // purges up to a snapshot's index when it installs one; the records below it stay).
            Some(retention) => {
                let below = log_id.index.saturating_add(1).min(retention.keep_from());
                if below > 0 {
                    self.store.delete_log_below(&mut batch, below);
                }
            }
        }
        Ok(self.store.write(batch, None).await?)
    }
}
