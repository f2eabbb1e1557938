//! [`StorageError`], the one error type of the crate.
//!
//! A leaf: every other module returns it, and it imports none of them.
//!
//! Never: carry a type of RocksDB or of the journal's files in a variant (the message only), so
//! callers can clone it and match on it without knowing either.

/// Errors of the storage layer. Cloneable so one failed group commit can be reported to every
/// writer that shared it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error (I/O, no space, corruption it detected itself).
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A journal file could not be created, written, synced or read, or the data directory
    /// cannot be used (a layout from before the journal, journal files missing or shorter than
    /// RocksDB refers to, writer threads that cannot start).
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
    /// A multi-step read met rows deleted meanwhile (retention or compaction moved on): read
    /// again.
    #[error("{0} changed while it was read; read again")]
    Moved(String),
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
            StorageError::Moved(_) => std::io::ErrorKind::Interrupted,
            StorageError::Rocks(_) | StorageError::Io(_) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, error)
    }
}
