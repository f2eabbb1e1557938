//! The state machines: one driver ([`Machine`]) shared by partitions and the metadata group, and
//! the [`Logic`] each plugs in.
//!
//! Partitions ([`PartitionLogic`]): the batches of each committed entry get offsets
//! `next .. next + count`, in commit order, so offsets are dense, start at 0 and are never
//! reused; an entry's batches get one run, consecutive in order. A batch stamped by an
//! idempotent producer first goes through the partition's producer states (`producers`): a
//! retry or a refused batch gets no offsets. Applying writes one index entry per log entry
//! that got offsets (`base offset -> log index, count, the positions of batches skipped`); the
//! records stay in the Raft log entry, written once. Producer states are rows of the group's
//! store, each written in the apply batch that changed it, so they are exactly as durable as
//! the applied state, and restored with it.
//!
//! Metadata ([`MetadataLogic`]): commands are opaque bytes applied by the broker's [`MetaApply`].
//!
//! The applied state is written without fsync: after a crash the machine restarts from the last
//! applied state that reached disk and openraft re-applies the committed entries after it
//! (rewriting identical index entries). The journal is ordered, so a durable applied state implies
//! the log entries before it are durable too.
//!
//! Retention: a [`Command::Trim`] moves a partition's log start forward at the same log
//! position on every replica. Applying it deletes the offset index and time index rows below the
//! entry holding the new start and publishes that entry's log index ([`Retention`]); the log
//! entries below it are deleted by the log store once openraft purged them (see `log_store` and
//! `RaftNode::compact_logs`). A partition's snapshot is its state plus its records: the log
//! entries from the one holding the start, which the leader streams to a follower that needs
//! them (see `network` and `snapshot`), staged in a sibling group and adopted at install.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::storage::ApplyResponder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use ordo_storage::GroupBatch;
use ordo_storage::GroupStore;
use ordo_storage::IndexEntry;
use ordo_storage::MetaKey;
use ordo_storage::Table;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::codec::decode;
use crate::codec::encode;
use crate::compaction::CompactionState;
use crate::compaction::RecordCodec;
use crate::meta::MetaApply;
use crate::meta::StateApply;
use crate::producers::Decision;
use crate::producers::ProducerState;
use crate::producers::Producers;
use crate::types::BatchOutcome;
use crate::types::C;
use crate::types::Command;
use crate::types::LogId;
use crate::types::Response;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;

/// What a state machine does with a normal entry, beyond the bookkeeping [`Machine`] does.
pub(crate) trait Logic: Send + Sync + 'static {
    /// Applies one command at `index`, adding any writes to `batch`. An error (the store
    /// failed a read) stops the group: replicas must not apply an entry differently.
    fn apply(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> io::Result<Response>;
    /// Adds to `batch` whatever the entries applied since the last call changed outside the
    /// state [`Logic::encode_state`] gives (rows of the group's store).
    fn persist(&mut self, _store: &GroupStore, _batch: &mut GroupBatch) -> io::Result<()> {
        Ok(())
    }
    /// The logic's state persisted with the applied log id, written after every apply: small.
    fn encode_state(&self) -> io::Result<Vec<u8>>;
    /// Replaces the state with the persisted one (`state` from [`Logic::encode_state`], plus
    /// whatever [`Logic::persist`] wrote to `store`).
    fn restore(&mut self, store: &GroupStore, state: &[u8]) -> io::Result<()>;
    /// The whole state, for a snapshot.
    fn encode_snapshot(&self) -> io::Result<Vec<u8>> {
        self.encode_state()
    }
    /// Replaces the state with a snapshot's (taken at log index `last_index`), adding the writes
    /// that persist it to `batch`.
    fn install(
        &mut self,
        store: &GroupStore,
        _batch: &mut GroupBatch,
        snapshot: &[u8],
        _last_index: u64,
    ) -> io::Result<()> {
        self.restore(store, snapshot)
    }
    /// Called once the applied batch is readable.
    fn publish(&self);
    /// Whether applying `command` reads the group's store: then every entry before it is
    /// written first, so that what it reads is the same on every replica.
    fn reads_store(&self, _command: &Command) -> bool {
        false
    }
    /// Whether proposers may be answered before the applied batch is written and published.
    /// True when an answer means only "committed at this position" (offsets); false when the
    /// proposer expects to read the effect on this node once answered (metadata, states).
    fn answers_before_publish(&self) -> bool;
}

/// The persisted applied state of a machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    logic: Vec<u8>,
}

/// A state machine over one group's store.
pub(crate) struct Machine<L> {
    store: GroupStore,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    logic: L,
}

impl<L: Logic> Machine<L> {
    /// Loads the applied state from the store.
    pub(crate) fn open(store: GroupStore, mut logic: L) -> io::Result<Self> {
        let state: AppliedState = match store.get_meta(MetaKey::Applied)? {
            Some(bytes) => decode(&bytes)?,
            None => AppliedState::default(),
        };
        if state.last_applied.is_some() {
            logic.restore(&store, &state.logic)?;
        }
        logic.publish();
        Ok(Self {
            store,
            last_applied: state.last_applied,
            membership: state.membership,
            logic,
        })
    }

    /// Writes the entries applied into `batch` with the applied state, answers their proposers
    /// and publishes them.
    async fn commit(
        &mut self,
        mut batch: GroupBatch,
        responders: Vec<(ApplyResponder<C>, Response)>,
    ) -> io::Result<()> {
        self.logic.persist(&self.store, &mut batch)?;
        self.store
            .put_meta(&mut batch, MetaKey::Applied, &self.encode_applied()?);
        // The entries are committed (durable on a quorum) and their answers are computed. When
        // the logic allows it the proposers are answered now, before the write, which only
        // serves readers; if this node dies first, re-applying the log gives the same answers.
        let mut responders = Some(responders);
        if self.logic.answers_before_publish() {
            answer(responders.take());
        }
        self.store.write(batch, None).await?;
        // Readers hear of the applied entries only once they are readable.
        self.logic.publish();
        answer(responders);
        Ok(())
    }

    fn encode_applied(&self) -> io::Result<Vec<u8>> {
        encode(&AppliedState {
            last_applied: self.last_applied.clone(),
            membership: self.membership.clone(),
            logic: self.logic.encode_state()?,
        })
    }

    fn snapshot(&mut self) -> io::Result<Snapshot> {
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.last_applied.clone(),
                last_membership: self.membership.clone(),
            },
            snapshot: SnapshotData::new(self.logic.encode_snapshot()?),
        })
    }
}

impl<L: Logic> RaftStateMachine<C> for Machine<L> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = TakenSnapshot;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.last_applied.clone(), self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<C>>> + Unpin + OptionalSend,
    {
        let mut batch = self.store.batch();
        let mut responders = Vec::new();
        let mut applied_any = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            // A command that reads the store must see every entry before it: the run so far
            // is written first (how many entries a run holds differs between replicas).
            if applied_any
                && let EntryPayload::Normal(command) = &entry.payload
                && self.logic.reads_store(command)
            {
                let written = std::mem::replace(&mut batch, self.store.batch());
                self.commit(written, std::mem::take(&mut responders))
                    .await?;
            }
            applied_any = true;
            let response = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(command) => {
                    self.logic.apply(&self.store, &mut batch, index, command)?
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id.clone()), membership);
                    Response::None
                }
            };
            // The applied log id only moves forward.
            assert!(self.last_applied.as_ref() < Some(&entry.log_id));
            self.last_applied = Some(entry.log_id);
            if let Some(responder) = responder {
                responders.push((responder, response));
            }
        }
        self.commit(batch, responders).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        TakenSnapshot(self.snapshot())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let mut batch = self.store.batch();
        let last_index = meta.last_log_id.as_ref().map_or(0, |log_id| log_id.index);
        self.logic
            .install(&self.store, &mut batch, snapshot.get_ref(), last_index)?;
        self.last_applied = meta.last_log_id.clone();
        self.membership = meta.last_membership.clone();
        self.store
            .put_meta(&mut batch, MetaKey::Applied, &self.encode_applied()?);
        self.store.write_durable(batch).await?;
        self.logic.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        if self.last_applied.is_none() {
            return Ok(None);
        }
        self.snapshot().map(Some)
    }
}

fn answer(responders: Option<Vec<(ApplyResponder<C>, Response)>>) {
    for (responder, response) in responders.into_iter().flatten() {
        responder.send(response);
    }
}

/// A snapshot taken when openraft asked for a builder: the states are small, so it is taken at
/// once and handed over when built.
pub(crate) struct TakenSnapshot(io::Result<Snapshot>);

impl RaftSnapshotBuilder<C> for TakenSnapshot {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        match &self.0 {
            Ok(snapshot) => Ok(Snapshot {
                meta: snapshot.meta.clone(),
                snapshot: SnapshotData::new(snapshot.snapshot.get_ref().clone()),
            }),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        }
    }
}

// Producer states are rows keyed by producer id: every id a partition keeps must fit a row key.
const _: () = assert!(crate::producers::PRODUCER_ID_MAX == ordo_storage::ROW_ID_MAX);

/// A partition's logic: assigns offsets to committed batches, keeps its producers' states and
/// writes the offset index.
pub(crate) struct PartitionLogic {
    next_offset: u64,
    /// The largest record timestamp written so far (the time index's last key).
    max_timestamp: Option<i64>,
    producers: Producers,
    /// The high watermark (next offset), published after each applied batch is readable.
    high_watermark: watch::Sender<u64>,
    /// Bytes of the record batches written since offset 0 (the next index entry's position).
    next_position: u64,
    /// The log start and the first log entry kept, shared with readers and the log store.
    retention: Arc<Retention>,
    /// Index entries added by the entries applied since the last `persist`, not yet readable from
    /// the store (a trim applied in the same run looks here first).
    pending_index: Vec<IndexEntry>,
    /// Splits batches for compaction by key; `None` in tests that never compact.
    codec: Option<Arc<dyn RecordCodec>>,
    /// How far compaction went (published to readers once written, see `publish`).
    compaction: CompactionState,
    /// The key map changes of compactions applied since the last `persist`.
    compaction_pending: crate::compaction::Pending,
}

/// What retention has kept of a partition, published by its state machine once applied.
#[derive(Debug, Default)]
pub(crate) struct Retention {
    /// The first offset a read may return.
    pub(crate) start_offset: AtomicU64,
    /// The log index of the entry holding `start_offset` (0 before any trim): the log below it
    /// may be deleted.
    pub(crate) first_index: AtomicU64,
    /// The position (bytes of records since offset 0) of the end.
    pub(crate) end_position: AtomicU64,
    /// The position of the entry holding the start: `end_position - start_position` is about
    /// the bytes the partition holds.
    pub(crate) start_position: AtomicU64,
    /// The end (next offset), published with the high watermark.
    pub(crate) end_offset: AtomicU64,
    /// Compaction's clean point: offsets below it are read from the compacted rows. Published
    /// once the compaction's rows are readable.
    pub(crate) clean_offset: AtomicU64,
    /// The log index of the entry at the clean point (0: nothing compacted).
    pub(crate) clean_index: AtomicU64,
    /// Compactions applied (see `compaction::CompactionState::generation`).
    pub(crate) generation: AtomicU64,
    /// Bytes of the compacted rows.
    pub(crate) compacted_bytes: AtomicU64,
    /// The byte position of the entry at the clean point.
    pub(crate) clean_position: AtomicU64,
    /// Tombstones among the compacted rows.
    pub(crate) tombstones: AtomicU64,
    /// Set from the apply of a change to the compacted rows until it is written and published
    /// (with a new `generation`): a snapshot transfer must not read rows meanwhile.
    pub(crate) rows_changing: std::sync::atomic::AtomicBool,
}

impl Retention {
    pub(crate) fn start_offset(&self) -> u64 {
        self.start_offset.load(Ordering::Acquire)
    }

    /// The first log index a replica needs: the entry holding the start, or the entry at the
    /// clean point when compaction moved past it.
    pub(crate) fn first_index(&self) -> u64 {
        self.first_index
            .load(Ordering::Acquire)
            .max(self.clean_index.load(Ordering::Acquire))
    }

    /// About the bytes of records held: the compacted rows, and the log from the entry holding
    /// the start or the clean point, whichever is later.
    pub(crate) fn held_bytes(&self) -> u64 {
        let (_, clean_position, compacted_bytes) = self.compaction();
        compacted_bytes
            + self
                .end_position()
                .saturating_sub(self.start_position().max(clean_position))
    }

    pub(crate) fn clean_offset(&self) -> u64 {
        self.clean_offset.load(Ordering::Acquire)
    }

    /// The compaction generation of the rows in the store, `None` while a change is being
    /// written.
    pub(crate) fn generation(&self) -> Option<u64> {
        let generation = self.generation.load(Ordering::Acquire);
        (!self.rows_changing.load(Ordering::Acquire)).then_some(generation)
    }

    /// Where compaction stands: `(clean offset, position of the entry there, bytes of the
    /// compacted rows)`.
    pub(crate) fn compaction(&self) -> (u64, u64, u64) {
        (
            self.clean_offset(),
            self.clean_position.load(Ordering::Acquire),
            self.compacted_bytes.load(Ordering::Acquire),
        )
    }

    pub(crate) fn end_position(&self) -> u64 {
        self.end_position.load(Ordering::Acquire)
    }

    pub(crate) fn start_position(&self) -> u64 {
        self.start_position.load(Ordering::Acquire)
    }

    /// Whether the partition holds any record (its start is below its end). One that holds
    /// none needs none of its log: all of it may be purged.
    pub(crate) fn holds_records(&self) -> bool {
        self.start_offset() < self.end_offset.load(Ordering::Acquire)
    }

    /// The first log index the log store must keep (`u64::MAX`: none, no record is held).
    pub(crate) fn keep_from(&self) -> u64 {
        if self.holds_records() {
            self.first_index()
        } else {
            u64::MAX
        }
    }
}

/// A partition's applied state beside its rows (producers, time index), written after every
/// apply.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct PartitionState {
    next_offset: u64,
    max_timestamp: Option<i64>,
    start_offset: u64,
    next_position: u64,
    first_index: u64,
    start_position: u64,
    compaction: CompactionState,
}

/// The layout of [`PartitionState`] before compaction.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct PartitionStateBeforeCompaction {
    next_offset: u64,
    max_timestamp: Option<i64>,
    start_offset: u64,
    next_position: u64,
    first_index: u64,
    start_position: u64,
}

/// A partition's snapshot: everything its state machine holds. Its records (the log entries
/// `state.first_index..=` the snapshot's last index) travel beside it (see `snapshot`).
#[derive(Serialize, Deserialize)]
struct PartitionSnapshot {
    state: PartitionState,
    producers: Vec<(u64, ProducerState)>,
}

/// The records a partition snapshot needs: the log entries from `first_index` (and the index
/// and time index rows of the offsets from `start_offset`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotRecords {
    pub(crate) first_index: u64,
    pub(crate) next_offset: u64,
    /// The compaction generation of the snapshot's rows.
    pub(crate) generation: u64,
}

/// The records a snapshot's bytes say it needs; `None` for a snapshot of anything but a
/// partition.
pub(crate) fn snapshot_records(snapshot: &[u8]) -> Option<SnapshotRecords> {
    let snapshot: PartitionSnapshot = decode(snapshot).ok()?;
    let state = snapshot.state;
    Some(SnapshotRecords {
        first_index: state.first_index.max(state.compaction.clean_index),
        next_offset: state.next_offset,
        generation: state.compaction.generation,
    })
}

/// The group a partition stages a snapshot's records in while they arrive (see `snapshot`).
pub(crate) fn staging_group(group: ordo_storage::GroupId) -> ordo_storage::GroupId {
    ordo_storage::GroupId(group.0 | STAGING_BIT)
}

/// The bit that makes a staging group's id; no group the broker creates has it.
pub(crate) const STAGING_BIT: u64 = 1 << 63;

/// The offset a time index row's value holds; `None` for a value that is not one.
pub(crate) fn time_row_offset(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// A time index key: a timestamp, clamped to what a row id holds (negative ones are 0).
pub(crate) fn time_key(timestamp_ms: i64) -> u64 {
    u64::try_from(timestamp_ms)
        .unwrap_or(0)
        .min(ordo_storage::ROW_ID_MAX)
}

impl PartitionLogic {
    pub(crate) fn new(high_watermark: watch::Sender<u64>) -> Self {
        Self {
            next_offset: 0,
            max_timestamp: None,
            producers: Producers::default(),
            high_watermark,
            next_position: 0,
            retention: Arc::new(Retention::default()),
            pending_index: Vec::new(),
            codec: None,
            compaction: CompactionState::default(),
            compaction_pending: crate::compaction::Pending::default(),
        }
    }

    /// Compacts with `codec` (the broker's record format).
    pub(crate) fn with_codec(mut self, codec: Option<Arc<dyn RecordCodec>>) -> Self {
        self.codec = codec;
        self
    }

    /// The retention state readers and the log store share.
    pub(crate) fn retention(&self) -> Arc<Retention> {
        self.retention.clone()
    }

    fn state(&self) -> PartitionState {
        PartitionState {
            next_offset: self.next_offset,
            max_timestamp: self.max_timestamp,
            start_offset: self.retention.start_offset(),
            next_position: self.next_position,
            first_index: self.retention.first_index.load(Ordering::Acquire),
            start_position: self.retention.start_position(),
            compaction: self.compaction,
        }
    }

    fn set_state(&mut self, state: PartitionState) {
        self.next_offset = state.next_offset;
        self.max_timestamp = state.max_timestamp;
        self.next_position = state.next_position;
        self.retention
            .end_position
            .store(state.next_position, Ordering::Release);
        self.retention
            .start_offset
            .store(state.start_offset, Ordering::Release);
        self.retention
            .first_index
            .store(state.first_index, Ordering::Release);
        self.retention
            .start_position
            .store(state.start_position, Ordering::Release);
        self.compaction = state.compaction;
        self.publish_compaction();
    }

    /// Tells readers and the log store where compaction stands.
    fn publish_compaction(&self) {
        let state = &self.compaction;
        let retention = &self.retention;
        retention
            .clean_position
            .store(state.clean_position, Ordering::Release);
        retention
            .compacted_bytes
            .store(state.bytes, Ordering::Release);
        retention
            .clean_index
            .store(state.clean_index, Ordering::Release);
        retention
            .generation
            .store(state.generation, Ordering::Release);
        retention
            .tombstones
            .store(state.tombstones, Ordering::Release);
        retention
            .clean_offset
            .store(state.clean_offset, Ordering::Release);
        retention.rows_changing.store(false, Ordering::Release);
    }

    /// Moves the log start to `requested` (at most the end; never back) and deletes the index
    /// rows below the entry holding it. Returns the start.
    fn trim(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        requested: u64,
    ) -> io::Result<u64> {
        let current = self.retention.start_offset();
        let start = requested.min(self.next_offset);
        if start <= current {
            return Ok(current);
        }
        let pending = self
            .pending_index
            .iter()
            .rev()
            .find(|entry| entry.base_offset <= start)
            .cloned();
        let holding = match pending {
            Some(entry) => Some(entry),
            None => store.index_floor(start).unwrap_or_else(|error| {
                // The logical start moves all the same; the rows stay until the next trim.
                tracing::warn!(%error, start, "reading the index to trim");
                None
            }),
        };
        if let Some(entry) = &holding {
            store.delete_index_below(batch, entry.base_offset);
            self.retention
                .first_index
                .store(entry.log_index, Ordering::Release);
            self.retention
                .start_position
                .store(entry.position, Ordering::Release);
        }
        if self.compaction.records > 0 || start > self.compaction.clean_offset {
            let start_position = self.retention.start_position();
            let mut compaction = self.compaction;
            let mut pass = crate::compaction::Pass {
                store,
                batch,
                pending: &mut self.compaction_pending,
                state: &mut compaction,
                start,
                changed: false,
            };
            pass.trim(start)?;
            if pass.changed {
                compaction.generation += 1;
                self.retention.rows_changing.store(true, Ordering::Release);
            }
            if holding.is_some() && start > compaction.clean_offset {
                // Nothing compacted is left: the clean point follows the entry holding the start.
                compaction.clean_offset = holding.as_ref().map_or(0, |entry| entry.base_offset);
                compaction.clean_position = start_position;
                compaction.clean_index = 0;
            }
            self.compaction = compaction;
        }
        // The time index keeps its last row at or below the start: a lookup of an older time
        // answers the start.
        match time_rows_to_drop(store, start) {
            Ok(Some(below)) => store.delete_rows_below(batch, Table::TimeIndex, below),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, start, "reading the time index to trim"),
        }
        self.retention.start_offset.store(start, Ordering::Release);
        Ok(start)
    }

    /// Compacts the entries from the clean point up to `clean_to` (see `compaction`). Returns
    /// the clean point.
    fn compact(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        clean_to: u64,
        at_ms: i64,
        delete_retention_ms: u64,
    ) -> io::Result<u64> {
        let Some(codec) = self.codec.clone() else {
            return Err(io::Error::other(
                "a compaction reached a partition without a record codec",
            ));
        };
        let start = self.retention.start_offset();
        let mut state = self.compaction;
        // The clean point is an entry's base offset (a trim past it moves it to the entry holding
        // the start); records of that entry below the start are not kept.
        let from = if state.clean_offset < start {
            // A clean point below the start (kept by an older version): compaction goes on
            // from the entry holding the start.
            store
                .index_floor(start)
                .map_err(io::Error::other)?
                .map_or(start, |entry| entry.base_offset)
        } else {
            state.clean_offset
        };
        let target = clean_to.min(self.next_offset);
        // The entries from the clean point: written ones from the store, then the ones applied
        // in this run.
        let mut entries = if from < target {
            store
                .index_range(from, target, usize::MAX)
                .map_err(io::Error::other)?
        } else {
            Vec::new()
        };
        let last_stored = entries.last().map(|entry| entry.base_offset);
        entries.extend(
            self.pending_index
                .iter()
                .filter(|entry| {
                    entry.base_offset >= from
                        && entry.base_offset < target
                        && last_stored.is_none_or(|last| entry.base_offset > last)
                })
                .cloned(),
        );
        let mut pass = crate::compaction::Pass {
            store,
            batch,
            pending: &mut self.compaction_pending,
            state: &mut state,
            start,
            changed: false,
        };
        // The log entries, in one read.
        let mut logged = match (entries.first(), entries.last()) {
            (Some(first), Some(last)) => store
                .read_log(first.log_index, last.log_index + 1, usize::MAX)
                .map_err(io::Error::other)?,
            _ => Vec::new(),
        }
        .into_iter()
        .peekable();
        let mut clean = None;
        for entry in &entries {
            let end = entry.base_offset + u64::from(entry.count);
            if end > target {
                break;
            }
            while logged
                .peek()
                .is_some_and(|(index, _)| *index < entry.log_index)
            {
                logged.next();
            }
            let Some(bytes) = logged
                .next_if(|(index, _)| *index == entry.log_index)
                .map(|(_, bytes)| bytes)
            else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "log entry {} of offset {} is missing",
                        entry.log_index, entry.base_offset
                    ),
                ));
            };
            let log_entry: crate::types::Entry = decode(&bytes)?;
            let EntryPayload::Normal(command) = &log_entry.payload else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "offset {} points at an entry without records",
                        entry.base_offset
                    ),
                ));
            };
            // Split first: an entry moves whole or not at all.
            let mut records = Vec::new();
            for (position, part) in command.batches().into_iter().enumerate() {
                if entry.skipped_batches.contains(&(position as u32)) {
                    continue;
                }
                match codec.split(part.batch, part.count) {
                    Ok(split) if split.len() == part.count as usize => records.extend(split),
                    Ok(split) => {
                        tracing::error!(
                            offset = entry.base_offset,
                            records = split.len(),
                            count = part.count,
                            "compaction stopped at a batch that does not hold its count"
                        );
                        records.clear();
                        break;
                    }
                    Err(error) => {
                        tracing::error!(offset = entry.base_offset, %error, "compaction stopped at an undecodable batch");
                        records.clear();
                        break;
                    }
                }
            }
            if records.len() as u64 != u64::from(entry.count) {
                break;
            }
            for (offset, record) in (entry.base_offset..).zip(&records) {
                if offset >= start {
                    pass.add(offset, record, at_ms)?;
                }
            }
            clean = Some(end);
        }
        let horizon = at_ms.saturating_sub(i64::try_from(delete_retention_ms).unwrap_or(i64::MAX));
        pass.expire_tombstones(horizon)?;
        let changed = pass.changed || clean.is_some();
        if let Some(clean) = clean {
            // The entry at the new clean point: its log index and position.
            let next = entries
                .iter()
                .find(|entry| entry.base_offset >= clean)
                .cloned()
                .map_or_else(
                    || store.index_floor(clean).map_err(io::Error::other),
                    |entry| Ok(Some(entry)),
                )?
                .filter(|entry| entry.base_offset == clean);
            state.clean_offset = clean;
            match next {
                Some(entry) => {
                    state.clean_position = entry.position;
                    state.clean_index = entry.log_index;
                }
                None => {
                    // Compacted to the end (the leader never asks for it; a replica may meet it
                    // re-applying): the next entry holds the next offset.
                    state.clean_position = self.next_position;
                }
            }
            store.delete_index_below(batch, clean);
        }
        if changed {
            state.generation += 1;
            self.retention.rows_changing.store(true, Ordering::Release);
        }
        self.compaction = state;
        Ok(self.compaction.clean_offset)
    }

    /// Assigns offsets to the batches of one entry at log `index`: each batch is written, or
    /// (a stamped batch its producer's state turns away) skipped.
    fn append(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: &Command,
    ) -> Vec<BatchOutcome> {
        let (at_ms, limits) = match command {
            Command::Produce(entry) => (entry.at_ms, Some(entry.limits)),
            Command::ProduceTimed(entry) => (entry.at_ms, Some(entry.limits)),
            _ => (0, None),
        };
        let base_offset = self.next_offset;
        let mut written_bytes = 0u64;
        let mut outcomes = Vec::new();
        let mut skipped_batches = Vec::new();
        for (position, part) in command.batches().into_iter().enumerate() {
            let decision = match (part.producer, limits) {
                (Some(stamp), Some(limits)) => {
                    self.producers
                        .check(stamp, part.count, self.next_offset, at_ms, limits)
                }
                _ => Decision::Write,
            };
            let outcome = match decision {
                Decision::Write => {
                    let offset = self.next_offset;
                    self.next_offset = offset
                        .checked_add(u64::from(part.count))
                        .expect("offsets cannot overflow u64");
                    // The time index: a row each time the largest timestamp so far grows (by a
                    // row key), to the batch that made it grow.
                    if let Some(timestamp) = part.max_timestamp_ms
                        && self
                            .max_timestamp
                            .is_none_or(|max| time_key(timestamp) > time_key(max))
                    {
                        self.max_timestamp = Some(timestamp);
                        store.put_row(
                            batch,
                            Table::TimeIndex,
                            time_key(timestamp),
                            &offset.to_be_bytes(),
                        );
                    }
                    written_bytes += part.batch.len() as u64;
                    BatchOutcome::Written(offset)
                }
                Decision::Duplicate { base_offset } => BatchOutcome::Duplicate(base_offset),
                Decision::Refuse(refusal) => BatchOutcome::Refused(refusal),
            };
            if !matches!(outcome, BatchOutcome::Written(_)) {
                skipped_batches.push(u32::try_from(position).expect("an entry has < 2^32 batches"));
            }
            outcomes.push(outcome);
        }
        let count = self.next_offset - base_offset;
        if count > 0 {
            let entry = IndexEntry {
                base_offset,
                log_index: index,
                count: u32::try_from(count).expect("coalescing keeps an entry's count in u32"),
                position: self.next_position,
                skipped_batches,
            };
            self.next_position += written_bytes;
            self.retention
                .end_position
                .store(self.next_position, Ordering::Release);
            store.put_index(batch, &entry);
            self.pending_index.push(entry);
        }
        outcomes
    }
}

impl Logic for PartitionLogic {
    fn answers_before_publish(&self) -> bool {
        true
    }

    fn reads_store(&self, command: &Command) -> bool {
        matches!(command, Command::Trim { .. } | Command::Compact { .. })
    }

    fn apply(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> io::Result<Response> {
        Ok(match command {
            Command::Meta(_) => {
                tracing::warn!(index, "metadata command in a partition log ignored");
                Response::None
            }
            Command::Trim { start_offset } => {
                Response::Trimmed(self.trim(store, batch, start_offset)?)
            }
            Command::Compact {
                clean_to,
                at_ms,
                delete_retention_ms,
            } => Response::Compacted(self.compact(
                store,
                batch,
                clean_to,
                at_ms,
                delete_retention_ms,
            )?),
            command => Response::Appended(self.append(store, batch, index, &command)),
        })
    }

    fn persist(&mut self, store: &GroupStore, batch: &mut GroupBatch) -> io::Result<()> {
        self.pending_index.clear();
        self.compaction_pending.clear();
        for (id, state) in self.producers.take_changes() {
            match state {
                Some(state) => store.put_row(batch, Table::Producers, id, &encode(state)?),
                None => store.delete_row(batch, Table::Producers, id),
            }
        }
        Ok(())
    }

    fn encode_state(&self) -> io::Result<Vec<u8>> {
        encode(&self.state())
    }

    fn restore(&mut self, store: &GroupStore, state: &[u8]) -> io::Result<()> {
        // Older layouts: before retention (next offset and largest timestamp), and before the
        // time index (the next offset alone).
        let state: PartitionState = match decode(state) {
            Ok(state) => state,
            Err(_) if let Ok(old) = decode::<PartitionStateBeforeCompaction>(state) => {
                PartitionState {
                    next_offset: old.next_offset,
                    max_timestamp: old.max_timestamp,
                    start_offset: old.start_offset,
                    next_position: old.next_position,
                    first_index: old.first_index,
                    start_position: old.start_position,
                    compaction: CompactionState::default(),
                }
            }
            Err(_) => {
                let (next_offset, max_timestamp): (u64, Option<i64>) = match decode(state) {
                    Ok(state) => state,
                    Err(_) => (decode(state)?, None),
                };
                PartitionState {
                    next_offset,
                    max_timestamp,
                    ..PartitionState::default()
                }
            }
        };
        self.set_state(state);
        let mut producers = std::collections::BTreeMap::new();
        for (id, row) in store.rows(Table::Producers)? {
            producers.insert(id, decode(&row)?);
        }
        self.producers.replace(producers);
        Ok(())
    }

    fn encode_snapshot(&self) -> io::Result<Vec<u8>> {
        encode(&PartitionSnapshot {
            state: self.state(),
            producers: self
                .producers
                .states()
                .iter()
                .map(|(id, state)| (*id, state.clone()))
                .collect(),
        })
    }

    fn install(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        snapshot: &[u8],
        last_index: u64,
    ) -> io::Result<()> {
        let snapshot: PartitionSnapshot = decode(snapshot)?;
        let staging = store.sibling(staging_group(store.group()));
        check_staged(&staging, &snapshot.state, last_index)?;
        // The records arrived in the staging group: they replace everything this replica held
        // up to the snapshot (its log entries, offset index and time index).
        let mut tables = vec![Table::TimeIndex];
        tables.extend(crate::compaction::SNAPSHOT_TABLES);
        store.adopt(batch, &staging, last_index, &tables)?;
        self.compaction_pending.clear();
        // The high watermark never moves back, except when a fresh snapshot resets an empty
        // machine.
        self.set_state(snapshot.state);
        self.pending_index.clear();
        store.clear_table(batch, Table::Producers);
        for (id, state) in &snapshot.producers {
            store.put_row(batch, Table::Producers, *id, &encode(state)?);
        }
        self.producers
            .replace(snapshot.producers.into_iter().collect());
        Ok(())
    }

    fn publish(&self) {
        self.retention
            .end_offset
            .store(self.next_offset, Ordering::Release);
        let previous = self.high_watermark.send_replace(self.next_offset);
        assert!(previous <= self.next_offset, "high watermark moved back");
        // After the high watermark: a reader never sees a clean point past it.
        self.publish_compaction();
    }
}

/// The time index rows a trim to `start` may delete: every row before the last one whose offset
/// is at or below `start` (its id, the first row kept); `None` when there is none to delete.
fn time_rows_to_drop(
    store: &GroupStore,
    start: u64,
) -> Result<Option<u64>, ordo_storage::StorageError> {
    const CHUNK: usize = 1024;
    let mut keep = None;
    let mut from = 0;
    loop {
        let rows = store.rows_from(Table::TimeIndex, from, CHUNK)?;
        let full = rows.len() == CHUNK;
        for (id, value) in &rows {
            let offset = time_row_offset(value).unwrap_or(u64::MAX);
            if offset > start {
                return Ok(keep.filter(|keep| *keep > 0));
            }
            keep = Some(*id);
        }
        match rows.last() {
            Some((id, _)) if full && *id < ordo_storage::ROW_ID_MAX => from = id + 1,
            _ => return Ok(keep.filter(|keep| *keep > 0)),
        }
    }
}

/// Checks that `staging` holds every record a partition snapshot with `state` at log index
/// `last_index` needs: the entry holding the start, and the index entries to the end.
pub(crate) fn check_staged(
    staging: &GroupStore,
    state: &PartitionState,
    last_index: u64,
) -> io::Result<()> {
    let missing = |what: String| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot at index {last_index} of group {}: {what}",
                staging.group().0 & !STAGING_BIT
            ),
        ))
    };
    let compacted = &state.compaction;
    let staged = (
        staging.count_rows(Table::Compacted)?,
        staging.count_rows(Table::Tombstones)?,
    );
    if staged != (compacted.records, compacted.tombstones) {
        return missing(format!(
            "staged {} compacted records and {} tombstones, the snapshot has {} and {}",
            staged.0, staged.1, compacted.records, compacted.tombstones
        ));
    }
    // The log holds the records from the start, or from the clean point when compaction
    // moved past it.
    let from = state.start_offset.max(compacted.clean_offset);
    if state.next_offset <= from {
        return Ok(());
    }
    let Some(first) = staging.index_floor(from)? else {
        return missing(format!("no index entry holds offset {from}"));
    };
    let Some(last) = staging.index_floor(state.next_offset - 1)? else {
        return missing(format!(
            "no index entry holds offset {}",
            state.next_offset - 1
        ));
    };
    match staging.log_bounds()? {
        Some((low, high)) if low <= first.log_index && last.log_index <= high.min(last_index) => {
            Ok(())
        }
        bounds => missing(format!(
            "staged log entries {bounds:?} do not cover {}..={}",
            first.log_index, last.log_index
        )),
    }
}

/// Checks that `staging` holds every record the partition snapshot `snapshot` (bytes) at log
/// index `last_index` needs. Blocking.
pub(crate) fn check_snapshot(
    staging: &GroupStore,
    snapshot: &[u8],
    last_index: u64,
) -> io::Result<()> {
    let snapshot: PartitionSnapshot = decode(snapshot)?;
    check_staged(staging, &snapshot.state, last_index)
}

/// The metadata group's logic: the broker's commands, applied through [`MetaApply`].
pub(crate) struct MetadataLogic {
    apply: Box<dyn MetaApply>,
}

impl MetadataLogic {
    pub(crate) fn new(apply: Box<dyn MetaApply>) -> Self {
        Self { apply }
    }
}

impl Logic for MetadataLogic {
    fn answers_before_publish(&self) -> bool {
        false
    }

    fn apply(
        &mut self,
        _store: &GroupStore,
        _batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> io::Result<Response> {
        Ok(match command {
            Command::Meta(command) => Response::Meta(self.apply.apply(index, &command).into()),
            Command::Append { .. }
            | Command::Appends(_)
            | Command::Produce(_)
            | Command::ProduceTimed(_)
            | Command::Trim { .. }
            | Command::Compact { .. } => {
                tracing::warn!(index, "record batch in the metadata log ignored");
                Response::None
            }
        })
    }

    fn encode_state(&self) -> io::Result<Vec<u8>> {
        Ok(self.apply.snapshot())
    }

    fn restore(&mut self, _store: &GroupStore, state: &[u8]) -> io::Result<()> {
        self.apply
            .restore(state)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
    }

    fn publish(&self) {
        self.apply.publish();
    }
}

/// A state group's logic: the broker's commands, applied through [`StateApply`], its rows kept
/// in the group's [`Table::States`].
pub(crate) struct StateLogic {
    apply: Box<dyn StateApply>,
}

/// A state group's snapshot: the state outside the rows, and every row.
#[derive(Serialize, Deserialize)]
struct StateSnapshot {
    state: Vec<u8>,
    rows: Vec<(u64, Vec<u8>)>,
}

fn invalid_data(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl StateLogic {
    pub(crate) fn new(apply: Box<dyn StateApply>) -> Self {
        Self { apply }
    }
}

impl Logic for StateLogic {
    fn answers_before_publish(&self) -> bool {
        false
    }

    fn apply(
        &mut self,
        _store: &GroupStore,
        _batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> io::Result<Response> {
        Ok(match command {
            Command::Meta(command) => Response::Meta(self.apply.apply(index, &command).into()),
            Command::Append { .. }
            | Command::Appends(_)
            | Command::Produce(_)
            | Command::ProduceTimed(_)
            | Command::Trim { .. }
            | Command::Compact { .. } => {
                tracing::warn!(index, "record batch in a state group's log ignored");
                Response::None
            }
        })
    }

    fn persist(&mut self, store: &GroupStore, batch: &mut GroupBatch) -> io::Result<()> {
        for (id, row) in self.apply.take_changes() {
            match row {
                Some(row) => store.put_row(batch, Table::States, id, &row),
                None => store.delete_row(batch, Table::States, id),
            }
        }
        Ok(())
    }

    fn encode_state(&self) -> io::Result<Vec<u8>> {
        Ok(self.apply.encode_state())
    }

    fn restore(&mut self, store: &GroupStore, state: &[u8]) -> io::Result<()> {
        let rows = store.rows(Table::States)?;
        self.apply.restore(state, rows).map_err(invalid_data)
    }

    fn encode_snapshot(&self) -> io::Result<Vec<u8>> {
        encode(&StateSnapshot {
            state: self.apply.encode_state(),
            rows: self.apply.rows(),
        })
    }

    fn install(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        snapshot: &[u8],
        _last_index: u64,
    ) -> io::Result<()> {
        let snapshot: StateSnapshot = decode(snapshot)?;
        store.clear_table(batch, Table::States);
        for (id, row) in &snapshot.rows {
            store.put_row(batch, Table::States, *id, row);
        }
        self.apply
            .restore(&snapshot.state, snapshot.rows)
            .map_err(invalid_data)?;
        // What the restore set is in `batch` already.
        self.apply.take_changes();
        Ok(())
    }

    fn publish(&self) {}
}

/// The logic of a group the node hosts beside the metadata group: a partition's log or a state
/// group. One type, so both kinds share one map, one watchdog and one Raft type.
pub(crate) enum GroupLogic {
    /// A topic partition.
    Log(PartitionLogic),
    /// A state group.
    State(StateLogic),
}

impl Logic for GroupLogic {
    fn answers_before_publish(&self) -> bool {
        match self {
            GroupLogic::Log(logic) => logic.answers_before_publish(),
            GroupLogic::State(logic) => logic.answers_before_publish(),
        }
    }

    fn apply(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> io::Result<Response> {
        match self {
            GroupLogic::Log(logic) => logic.apply(store, batch, index, command),
            GroupLogic::State(logic) => logic.apply(store, batch, index, command),
        }
    }

    fn reads_store(&self, command: &Command) -> bool {
        match self {
            GroupLogic::Log(logic) => logic.reads_store(command),
            GroupLogic::State(logic) => logic.reads_store(command),
        }
    }

    fn persist(&mut self, store: &GroupStore, batch: &mut GroupBatch) -> io::Result<()> {
        match self {
            GroupLogic::Log(logic) => logic.persist(store, batch),
            GroupLogic::State(logic) => logic.persist(store, batch),
        }
    }

    fn encode_state(&self) -> io::Result<Vec<u8>> {
        match self {
            GroupLogic::Log(logic) => logic.encode_state(),
            GroupLogic::State(logic) => logic.encode_state(),
        }
    }

    fn restore(&mut self, store: &GroupStore, state: &[u8]) -> io::Result<()> {
        match self {
            GroupLogic::Log(logic) => logic.restore(store, state),
            GroupLogic::State(logic) => logic.restore(store, state),
        }
    }

    fn encode_snapshot(&self) -> io::Result<Vec<u8>> {
        match self {
            GroupLogic::Log(logic) => logic.encode_snapshot(),
            GroupLogic::State(logic) => logic.encode_snapshot(),
        }
    }

    fn install(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        snapshot: &[u8],
        last_index: u64,
    ) -> io::Result<()> {
        match self {
            GroupLogic::Log(logic) => logic.install(store, batch, snapshot, last_index),
            GroupLogic::State(logic) => logic.install(store, batch, snapshot, last_index),
        }
    }

    fn publish(&self) {
        match self {
            GroupLogic::Log(logic) => logic.publish(),
            GroupLogic::State(logic) => logic.publish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::entry::RaftEntry;
    use openraft::vote::RaftLeaderId;
    use ordo_storage::Store;
    use ordo_storage::StoreOptions;

    use super::*;
    use crate::GroupId;
    use crate::ProducerLimits;
    use crate::ProducerStamp;
    use crate::Refusal;
    use crate::group::read_committed;
    use crate::types::Entry;
    use crate::types::ProduceEntry;
    use crate::types::StampedBatch;

    const LIMITS: ProducerLimits = ProducerLimits {
        producers_max: 10,
        idle_ms: 1_000_000,
    };

    fn batch(tag: &str, count: u32, stamp: Option<(u64, u64)>) -> StampedBatch {
        StampedBatch {
            count,
            batch: Bytes::from(tag.to_owned()),
            producer: stamp.map(|(id, sequence)| ProducerStamp {
                id,
                epoch: 0,
                sequence,
            }),
            max_timestamp_ms: i64::from(count),
        }
    }

    /// Applies one entry at `index` as the machine does (log entry, apply, persist, one write)
    /// and publishes it.
    async fn apply(
        store: &GroupStore,
        logic: &mut PartitionLogic,
        index: u64,
        batches: Vec<StampedBatch>,
    ) -> Vec<BatchOutcome> {
        let command = Command::ProduceTimed(ProduceEntry {
            at_ms: index,
            limits: LIMITS,
            batches,
        });
        let log_id =
            openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId::new(1, 1), index);
        let mut write = store.batch();
        let entry = Entry::new_normal(log_id, command.clone());
        store.put_log(&mut write, index, &encode(&entry).unwrap());
        let Response::Appended(outcomes) = logic.apply(store, &mut write, index, command).unwrap()
        else {
            panic!("an append answers per batch");
        };
        logic.persist(store, &mut write).unwrap();
        store.write_durable(write).await.unwrap();
        logic.publish();
        outcomes
    }

    /// Batches the producer states turn away get no offsets, and reads skip them, in the middle
    /// of an entry and as whole entries; after a restart from the store, the restored states
    /// decide as the live ones did.
    #[tokio::test]
    async fn skipped_batches_hold_no_offsets_and_states_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let group = store.group(GroupId(9));
        let (high_watermark, watermark) = watch::channel(0);
        let mut logic = PartitionLogic::new(high_watermark);
        assert_eq!(
            apply(
                &group,
                &mut logic,
                1,
                vec![batch("a", 2, Some((7, 0))), batch("b", 1, None)]
            )
            .await,
            [BatchOutcome::Written(0), BatchOutcome::Written(2)]
        );
        // A whole entry of retries: no offsets, no index entry.
        assert_eq!(
            apply(&group, &mut logic, 2, vec![batch("a", 2, Some((7, 0)))]).await,
            [BatchOutcome::Duplicate(0)]
        );
        // A retry, a gap and a new batch in one entry.
        assert_eq!(
            apply(
                &group,
                &mut logic,
                3,
                vec![
                    batch("a", 2, Some((7, 0))),
                    batch("x", 1, Some((7, 9))),
                    batch("c", 1, Some((7, 2))),
                ]
            )
            .await,
            [
                BatchOutcome::Duplicate(0),
                BatchOutcome::Refused(Refusal::OutOfOrder { expected: 2 }),
                BatchOutcome::Written(3),
            ]
        );
        assert_eq!(*watermark.borrow(), 4);
        for from in 0..4 {
            let read = read_committed(&group, from, 4, usize::MAX).unwrap();
            let batches: Vec<(u64, u32, Bytes)> = read.batches;
            let expected = [
                (0, 2, Bytes::from("a")),
                (2, 1, Bytes::from("b")),
                (3, 1, Bytes::from("c")),
            ];
            let first = expected
                .iter()
                .position(|(base, count, _)| from < base + u64::from(*count))
                .unwrap();
            // A read starts at the entry holding `from`: entry 1 holds offsets 0..3.
            let first = if first <= 1 { 0 } else { first };
            assert_eq!(batches, expected[first..], "read from {from}");
        }
        // A restart: the machine's persisted state plus the rows.
        let state = logic.encode_state().unwrap();
        let (high_watermark, _) = watch::channel(0);
        let mut restored = PartitionLogic::new(high_watermark);
        restored.restore(&group, &state).unwrap();
        assert_eq!(
            apply(
                &group,
                &mut restored,
                4,
                vec![batch("c", 1, Some((7, 2))), batch("d", 1, Some((7, 3)))]
            )
            .await,
            [BatchOutcome::Duplicate(3), BatchOutcome::Written(4)]
        );
        let snapshot = restored.encode_snapshot().unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        let follower = Store::open(follower_dir.path(), &StoreOptions::default()).unwrap();
        let follower = follower.group(GroupId(9));
        let mut installed = transfer(&group, &logic.retention, &follower, &snapshot, 4).await;
        assert_eq!(
            apply(
                &follower,
                &mut installed,
                5,
                vec![batch("d", 1, Some((7, 3)))]
            )
            .await,
            [BatchOutcome::Duplicate(4)],
            "a snapshot carries the producer states"
        );
    }

    /// Sends a partition snapshot taken at `last_index` from `from` to `to` as the network does
    /// (chunks read from the leader's store, staged, installed), in chunks of one entry or so.
    async fn transfer(
        from: &GroupStore,
        from_retention: &Retention,
        to: &GroupStore,
        snapshot: &[u8],
        last_index: u64,
    ) -> PartitionLogic {
        let records = snapshot_records(snapshot).expect("a partition snapshot");
        let staging = to.sibling(staging_group(to.group()));
        let (mut cursor, fresh) =
            crate::snapshot::Transfers::cursor(&staging, records.first_index, last_index).unwrap();
        assert!(fresh);
        let transfers = crate::snapshot::Transfers::default();
        let vote = crate::types::Vote::new(1, 1);
        transfers.begin(&staging, vote.clone(), cursor.next_index);
        while let Some(chunk) =
            crate::snapshot::read_chunk(from, from_retention, &records, last_index, &mut cursor)
                .unwrap()
        {
            let crate::snapshot::Message::Records { vote, chunk, crc } =
                crate::snapshot::records_message(vote.clone(), chunk).unwrap()
            else {
                unreachable!()
            };
            transfers.stage(&staging, &vote, chunk, crc).await.unwrap();
        }
        check_snapshot(&staging, snapshot, last_index).unwrap();
        let (high_watermark, _) = watch::channel(0);
        let mut installed = PartitionLogic::new(high_watermark);
        let mut write = to.batch();
        installed
            .install(to, &mut write, snapshot, last_index)
            .unwrap();
        to.write_durable(write).await.unwrap();
        installed.publish();
        assert_eq!(
            staging.log_bounds().unwrap(),
            None,
            "the staging was adopted"
        );
        installed
    }

    /// A trim moves the start on, deletes the index and time index rows below the entry holding
    /// it, and a snapshot sent to another store holds the same records from the start, with the
    /// same offsets, positions and time index.
    #[tokio::test]
    async fn trims_and_snapshots_carry_the_retained_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let group = store.group(GroupId(3));
        let (high_watermark, watermark) = watch::channel(0);
        let mut logic = PartitionLogic::new(high_watermark);
        for index in 1..=40u64 {
            let count = 1 + (index % 3) as u32;
            apply(
                &group,
                &mut logic,
                index,
                vec![batch(&format!("b{index}"), count, None)],
            )
            .await;
        }
        let end = *watermark.borrow();
        let total = logic.retention.end_position();
        assert_eq!(
            total,
            (1..=40u64)
                .map(|index| format!("b{index}").len() as u64)
                .sum::<u64>()
        );
        // Trim into the middle of an entry.
        let target = group.index_floor(30).unwrap().unwrap();
        let start = 30
            .max(target.base_offset + 1)
            .min(target.base_offset + u64::from(target.count) - 1);
        let mut write = group.batch();
        for index in 41..=43 {
            group.put_log(&mut write, index, b"a trim entry (never read as records)");
        }
        let Response::Trimmed(trimmed) = logic
            .apply(
                &group,
                &mut write,
                41,
                Command::Trim {
                    start_offset: start,
                },
            )
            .unwrap()
        else {
            panic!("a trim answers its start");
        };
        logic.persist(&group, &mut write).unwrap();
        group.write_durable(write).await.unwrap();
        assert_eq!(trimmed, start);
        assert_eq!(logic.retention.first_index(), target.log_index);
        assert_eq!(
            group.index_floor(start - 1).unwrap().unwrap().base_offset,
            target.base_offset,
            "the entry holding the start stays"
        );
        assert_eq!(
            group.index_range(0, u64::MAX, usize::MAX).unwrap()[0].base_offset,
            target.base_offset,
            "entries below it are gone"
        );
        let time_rows = group.rows(Table::TimeIndex).unwrap();
        assert!(time_rows.len() >= 1);
        let first_time_offset = u64::from_be_bytes(time_rows[0].1[..8].try_into().unwrap());
        assert!(
            first_time_offset <= start,
            "one time row at or below the start stays"
        );
        // A trim never moves back, nor past the end.
        let mut write = group.batch();
        assert_eq!(
            logic
                .apply(&group, &mut write, 42, Command::Trim { start_offset: 3 })
                .unwrap(),
            Response::Trimmed(start)
        );
        logic.persist(&group, &mut write).unwrap();
        group.write_durable(write).await.unwrap();
        // A snapshot at 41.
        let state = PartitionState {
            start_offset: start,
            first_index: target.log_index,
            ..logic.state()
        };
        let snapshot = encode(&PartitionSnapshot {
            state,
            producers: Vec::new(),
        })
        .unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        let follower_store = Store::open(follower_dir.path(), &StoreOptions::default()).unwrap();
        let follower = follower_store.group(GroupId(3));
        // The follower held an old, longer log of its own: the snapshot replaces it.
        let mut write = follower.batch();
        for index in 1..=50u64 {
            follower.put_log(&mut write, index, b"stale");
        }
        follower.write_durable(write).await.unwrap();
        let installed = transfer(&group, &logic.retention, &follower, &snapshot, 41).await;
        assert_eq!(installed.retention.start_offset(), start);
        assert_eq!(installed.retention.end_position(), total);
        let leader_read = read_committed(&group, start, end, usize::MAX)
            .unwrap()
            .batches;
        let follower_read = read_committed(&follower, start, end, usize::MAX)
            .unwrap()
            .batches;
        assert_eq!(leader_read, follower_read);
        assert_eq!(
            follower.rows(Table::TimeIndex).unwrap(),
            group.rows(Table::TimeIndex).unwrap()
        );
        assert_eq!(
            follower.log_bounds().unwrap(),
            Some((target.log_index, 50)),
            "entries above the snapshot stay for openraft to judge"
        );
        assert_eq!(follower.get_log(42).unwrap().unwrap(), b"stale".to_vec());
        // Positions: the bytes the partition holds.
        let held = total - follower.index_floor(start).unwrap().unwrap().position;
        assert!(held > 0 && held < total);
        // Never past the end.
        let mut write = group.batch();
        assert_eq!(
            logic
                .apply(
                    &group,
                    &mut write,
                    43,
                    Command::Trim {
                        start_offset: end + 100
                    }
                )
                .unwrap(),
            Response::Trimmed(end)
        );
    }

    /// The time index gets a row each time the largest timestamp grows, to the batch's base
    /// offset; a state persisted before the time index (the next offset alone) still restores.
    #[tokio::test]
    async fn the_time_index_follows_the_largest_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let group = store.group(GroupId(9));
        let (high_watermark, _) = watch::channel(0);
        let mut logic = PartitionLogic::new(high_watermark);
        // Batches of 2, 3 and 1 records: the test batches' largest timestamp is their count.
        apply(
            &group,
            &mut logic,
            1,
            vec![
                batch("a", 2, None),
                batch("b", 3, None),
                batch("c", 1, None),
            ],
        )
        .await;
        assert_eq!(
            group.rows(Table::TimeIndex).unwrap(),
            vec![
                (2, 0u64.to_be_bytes().to_vec()),
                (3, 2u64.to_be_bytes().to_vec())
            ],
            "a row per growth of the largest timestamp, none for the older batch at offset 5"
        );
        let (high_watermark, _) = watch::channel(0);
        let mut old = PartitionLogic::new(high_watermark);
        old.restore(&group, &encode(&6u64).unwrap()).unwrap();
        assert_eq!((old.next_offset, old.max_timestamp), (6, None));
    }
}
