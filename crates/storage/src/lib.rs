//! Ordo's node-local storage: one RocksDB instance per node, shared by every group on it. A
//! group is one log (an ordered sequence of opaque entries by index), a few small metadata
//! values, and an offset index.
//!
//! # Layout
//! - `error`: [`StorageError`].
//! - `keys`: the byte layout of every key (group prefix, big-endian indices) and the checksummed
//!   value frame.
//! - `ops`: the column families and the mutations on them (`Cf`, `Op`), shared by the modules
//!   below.
//! - `journal`: the node's own write-ahead log and the only copy of log entry bytes; RocksDB
//!   runs without its WAL and maps log keys to journal locations.
//! - `writer`: the single writer thread and the fsync thread, and their counters
//!   ([`StoreStats`]). Every write of every group goes through them in FIFO order; concurrent
//!   appends share one journal fsync (group commit).
//! - `store`: [`Store`] (open, stats) and [`GroupStore`], the handle one group uses to read and
//!   write its log, its metadata and its offset index.
//!
//! Imports between them (each module uses only those on rows below its own, so the graph has
//! no cycle; `lib.rs` only declares and re-exports):
//!
//! ```text
//! store   ──> writer, journal, keys, ops, error
//! writer  ──> journal, ops, error
//! journal ──> keys, ops, error
//! keys    ──> error
//! ops     (leaf)
//! error   (leaf)
//! ```
//!
//! # What this crate must never do
//! It knows nothing of Raft, topics or gRPC: it stores opaque bytes under (group, index) and
//! (group, offset) keys, and small values under a few well-known per-group keys ([`MetaKey`]).
//! It never reports a write durable before the journal fsync that covers it returned.
//! It never returns a value whose checksum does not match: that is [`StorageError::Corruption`].

mod error;
mod journal;
mod keys;
mod ops;
mod store;
mod writer;

pub use error::StorageError;
pub use journal::JournalRemoval;
pub use keys::GroupId;
pub use store::GroupBatch;
pub use store::GroupStore;
pub use store::IndexEntry;
pub use store::MetaKey;
pub use store::ROW_ID_MAX;
pub use store::Store;
pub use store::StoreOptions;
pub use store::Table;
pub use writer::DurableCallback;
pub use writer::StoreStats;
