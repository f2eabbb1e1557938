//! [`RaftOptions`]: Raft timing and batching, one set for every group on a node, with the
//! defaults every other layer takes its own from (`ordo-server`'s `RaftConfig` included).

use std::time::Duration;

/// Raft timing and batching, shared by every group on the node.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// Leader heartbeat period.
    pub heartbeat_interval: Duration,
    /// Election timeout, lower bound (randomized up to the upper bound).
    pub election_timeout_min: Duration,
    /// Election timeout, upper bound.
    pub election_timeout_max: Duration,
    /// Most entries in one append RPC.
    pub append_entries_max: u64,
    /// Timeout of one connection attempt to a peer: give it to [`Peers::new`](crate::Peers::new) (the pool is
    /// built before the node, and shared with request forwarding).
    pub connect_timeout: Duration,
    /// Bytes of the most recent log entries each group keeps in memory for replication and
    /// apply (see `entry_cache`); 0 disables the cache.
    pub entry_cache_bytes: usize,
    /// Most batch bytes in one entry made of concurrent appends to a partition (see `coalesce`).
    pub coalesce_bytes_max: usize,
    /// Most proposals of one partition in flight at once; appends arriving meanwhile are
    /// coalesced into the next entry.
    pub proposals_in_flight_max: usize,
    /// Most idempotent producers one partition remembers (see `producers`); a new producer past
    /// it is refused unless an idle one can be forgotten.
    pub producers_per_partition_max: u32,
    /// A producer without a write to a partition for this long may be forgotten there; its next
    /// batch other than at sequence 0 is then refused as from an unknown producer.
    pub producer_idle_timeout: Duration,
    /// The metadata and state groups snapshot their state after this many log entries, then
    /// purge their log but the last [`RaftOptions::snapshot_entries_kept`]. (Partitions purge
    /// what retention drops: see `machine`.)
    pub snapshot_entries: u64,
    /// Log entries kept behind a state snapshot, so a follower a little behind catches up from
    /// the log rather than by a snapshot.
    pub snapshot_entries_kept: u64,
    /// The metadata and state groups also snapshot and purge their whole log this long after
    /// their last purge, however few entries they have: the journal file holding their oldest
    /// entry can then be deleted (one group's old entry keeps every later file).
    pub state_purge_interval: Duration,
    /// Bytes per second a node sends, over all moves, to the new replicas a move adds while
    /// they catch up; 0: unlimited. Ordinary replication is never throttled.
    pub move_bytes_per_sec: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
            append_entries_max: 256,
            connect_timeout: Duration::from_secs(2),
            entry_cache_bytes: 1 << 20,
            coalesce_bytes_max: 1 << 20,
            proposals_in_flight_max: 2,
            producers_per_partition_max: 1_000,
            producer_idle_timeout: Duration::from_secs(7 * 24 * 3600),
            snapshot_entries: 20_000,
            snapshot_entries_kept: 2_000,
            state_purge_interval: Duration::from_secs(60),
            move_bytes_per_sec: 64 << 20,
        }
    }
}
