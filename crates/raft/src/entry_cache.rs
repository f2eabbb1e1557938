//! The tail of a group's Raft log, kept in memory.
//!
//! Every entry is read back right after it is appended: by the replication of the leader to
//! each follower and by the state machine's apply, on every replica. Served from RocksDB, each
//! of those reads is a blocking-pool hop, an iterator seek and a decode. The cache holds the
//! most recent entries of the group (contiguous indexes, at most `max_bytes` of payload), so
//! those reads are a clone of `Bytes` handles. It mirrors the log: appends extend it,
//! truncation and purge cut it, and a range it does not fully hold is read from RocksDB.
//!
//! Like etcd's `unstable` log and TiKV's entry cache, but it also keeps entries after they are
//! durable: the apply and a slow follower read them later.

use std::collections::VecDeque;

use openraft::EntryPayload;

use crate::types::Entry;

/// Bytes an entry counts against the cache bound besides its record batch.
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// A contiguous run of the most recent entries of one group.
#[derive(Debug)]
pub(crate) struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_bytes: usize,
}

impl EntryCache {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|entry| entry.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|entry| entry.log_id.index)
    }

    /// Adds appended entries. An entry that does not follow the cached tail replaces it (the
    /// log store is told of truncations, so that only happens after the cache was emptied).
    pub(crate) fn append(&mut self, entry: &Entry) {
        if self.max_bytes == 0 {
            return;
        }
        let index = entry.log_id.index;
        match self.last_index() {
            Some(last) if index <= last => self.truncate_from(index),
            Some(last) if index != last + 1 => self.clear(),
            _ => {}
        }
        self.bytes += size_of_entry(entry);
        self.entries.push_back(entry.clone());
        // Keep at least the newest entry, whatever its size.
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Forgets entries at `from` and after.
    pub(crate) fn truncate_from(&mut self, from: u64) {
        while self.last_index().is_some_and(|last| last >= from) {
            if let Some(entry) = self.entries.pop_back() {
                self.bytes -= size_of_entry(&entry);
            }
        }
    }

    /// Forgets entries up to and including `upto`.
    pub(crate) fn purge_upto(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= size_of_entry(&entry);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `start..end` when the cache holds all of them.
    pub(crate) fn range(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start < first || end == 0 || end - 1 > last || start >= end {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(self.entries.range(from..to).cloned().collect())
    }
}

fn size_of_entry(entry: &Entry) -> usize {
    ENTRY_OVERHEAD_BYTES
        + match &entry.payload {
            EntryPayload::Normal(command) => command.payload_bytes(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::vote::RaftLeaderId;
    use proptest::prelude::*;

    use super::*;

    fn entry(index: u64, size: usize) -> Entry {
        Entry {
            log_id: openraft::LogId::new(
                openraft::impls::leader_id_adv::LeaderId::new(1, 1),
                index,
            ),
            payload: EntryPayload::Normal(crate::types::Command::Append {
                count: 1,
                batch: Bytes::from(vec![0u8; size]),
            }),
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|entry| entry.log_id.index).collect()
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let mut cache = EntryCache::new(1 << 20);
        for index in 5..10 {
            cache.append(&entry(index, 10));
        }
        assert_eq!(indexes(&cache.range(5, 10).unwrap()), vec![5, 6, 7, 8, 9]);
        assert_eq!(indexes(&cache.range(7, 8).unwrap()), vec![7]);
        assert!(cache.range(4, 6).is_none());
        assert!(cache.range(8, 11).is_none());
        assert!(cache.range(6, 6).is_none());
    }

    #[test]
    fn truncation_purge_and_overwrite_follow_the_log() {
        let mut cache = EntryCache::new(1 << 20);
        for index in 1..=6 {
            cache.append(&entry(index, 10));
        }
        cache.truncate_from(5);
        assert!(cache.range(5, 6).is_none());
        cache.purge_upto(2);
        assert_eq!(indexes(&cache.range(3, 5).unwrap()), vec![3, 4]);
        // Overwriting index 4 (a new leader's entry) drops 4.. first.
        cache.append(&entry(4, 20));
        assert_eq!(indexes(&cache.range(3, 5).unwrap()), vec![3, 4]);
        // A gap empties the cache: it only ever holds a contiguous run.
        cache.append(&entry(9, 10));
        assert!(cache.range(3, 5).is_none());
        assert_eq!(indexes(&cache.range(9, 10).unwrap()), vec![9]);
    }

    proptest! {
        /// Whatever the entry sizes, the cache stays within its bound (or holds one entry) and
        /// holds a contiguous suffix of what was appended.
        #[test]
        fn stays_bounded_and_contiguous(sizes in proptest::collection::vec(0usize..5000, 1..200)) {
            let max = 16 * 1024;
            let mut cache = EntryCache::new(max);
            for (index, size) in sizes.iter().enumerate() {
                cache.append(&entry(index as u64 + 1, *size));
                prop_assert!(cache.bytes <= max || cache.entries.len() == 1);
                let last = index as u64 + 1;
                let first = cache.first_index().unwrap();
                prop_assert_eq!(cache.last_index(), Some(last));
                prop_assert_eq!(cache.entries.len() as u64, last - first + 1);
            }
        }
    }
}
