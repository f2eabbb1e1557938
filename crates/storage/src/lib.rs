//! Ordo's node-local storage: one RocksDB instance per node, shared by every Raft group on it.
//!
//! # Layout
//! - `keys`: the byte layout of every key (group prefix, big-endian indices) and the checksummed
//!   value frame.
//! - `journal`: the node's own write-ahead log and the only copy of log entry bytes; RocksDB
//!   runs without its WAL and maps log keys to journal locations.
//! - `writer`: the single writer thread and the fsync thread. Every write of every group goes
//!   through them in FIFO order; concurrent appends share one journal fsync (group commit).
//! - `store`: [`Store`] (open, stats) and [`GroupStore`], the handle one group uses to read and
//!   write its log, its metadata and its offset index.
//!
//! # What this crate must never do
//! It knows nothing of Raft, topics or gRPC: it stores opaque bytes under (group, index) and
//! (group, offset) keys. It never reports a write durable before the journal fsync that covers it returned.
//! It never returns a value whose checksum does not match: that is [`StorageError::Corruption`].

mod journal;
mod keys;
mod store;
mod writer;

pub use keys::GroupId;
pub use store::GroupBatch;
pub use store::GroupStore;
pub use store::IndexEntry;
pub use store::MetaKey;
pub use store::Store;
pub use store::StoreOptions;
pub use store::StoreStats;
pub use writer::Durable;

/// Errors of the storage layer. Cloneable so one failed group commit can be reported to every
/// writer that shared it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error (I/O, no space, corruption it detected itself).
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A journal file could not be created, written, synced or read.
    #[error("journal: {0}")]
    Io(String),
    /// A stored value failed its checksum: the bytes on disk are not what was written.
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x}")]
    Corruption {
        /// Which value, e.g. `log group=5 index=10`.
        what: String,
        /// Checksum stored beside the value.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A stored value is shorter than its frame or has an impossible layout.
    #[error("malformed value in {what}: {reason}")]
    Malformed {
        /// Which value.
        what: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The store's options are out of their bounds.
    #[error("invalid storage options: {0}")]
    InvalidOptions(String),
    /// The store is shutting down; the write was not done.
    #[error("storage is closed")]
    Closed,
}

impl From<rocksdb::Error> for StorageError {
    fn from(error: rocksdb::Error) -> Self {
        StorageError::Rocks(error.into_string())
    }
}

impl From<StorageError> for std::io::Error {
    fn from(error: StorageError) -> Self {
        let kind = match error {
            StorageError::Corruption { .. } | StorageError::Malformed { .. } => {
                std::io::ErrorKind::InvalidData
            }
            StorageError::Closed => std::io::ErrorKind::BrokenPipe,
            StorageError::InvalidOptions(_) => std::io::ErrorKind::InvalidInput,
            StorageError::Rocks(_) | StorageError::Io(_) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, error)
    }
}
