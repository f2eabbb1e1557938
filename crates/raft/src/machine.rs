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
//! Partition snapshots carry only the applied state: partitions never purge their log
//! (retention is a later feature), so a leader never sends a follower a snapshot of records.

use std::io;

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
    /// Applies one command at `index`, adding any writes to `batch`.
    fn apply(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> Response;
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
    /// Replaces the state with a snapshot's, adding the writes that persist it to `batch`.
    fn install(
        &mut self,
        store: &GroupStore,
        _batch: &mut GroupBatch,
        snapshot: &[u8],
    ) -> io::Result<()> {
        self.restore(store, snapshot)
    }
    /// Called once the applied batch is readable.
    fn publish(&self);
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
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(command) => {
                    self.logic.apply(&self.store, &mut batch, index, command)
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

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        TakenSnapshot(self.snapshot())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let mut batch = self.store.batch();
        self.logic
            .install(&self.store, &mut batch, snapshot.get_ref())?;
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
}

/// A partition's snapshot: everything its state machine holds.
#[derive(Serialize, Deserialize)]
struct PartitionSnapshot {
    next_offset: u64,
    producers: Vec<(u64, ProducerState)>,
    max_timestamp: Option<i64>,
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
        }
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
            store.put_index(
                batch,
                &IndexEntry {
                    base_offset,
                    log_index: index,
                    count: u32::try_from(count).expect("coalescing keeps an entry's count in u32"),
                    skipped_batches,
                },
            );
        }
        outcomes
    }
}

impl Logic for PartitionLogic {
    fn answers_before_publish(&self) -> bool {
        true
    }

    fn apply(
        &mut self,
        store: &GroupStore,
        batch: &mut GroupBatch,
        index: u64,
        command: Command,
    ) -> Response {
        match command {
            Command::Meta(_) => {
                tracing::warn!(index, "metadata command in a partition log ignored");
                Response::None
            }
            command => Response::Appended(self.append(store, batch, index, &command)),
        }
    }

    fn persist(&mut self, store: &GroupStore, batch: &mut GroupBatch) -> io::Result<()> {
        for (id, state) in self.producers.take_changes() {
            match state {
                Some(state) => store.put_row(batch, Table::Producers, id, &encode(state)?),
                None => store.delete_row(batch, Table::Producers, id),
            }
        }
        Ok(())
    }

    fn encode_state(&self) -> io::Result<Vec<u8>> {
        encode(&(self.next_offset, self.max_timestamp))
    }

    fn restore(&mut self, store: &GroupStore, state: &[u8]) -> io::Result<()> {
        // Written before the time index: the next offset alone.
        let (next_offset, max_timestamp): (u64, Option<i64>) = match decode(state) {
            Ok(state) => state,
            Err(_) => (decode(state)?, None),
        };
        self.max_timestamp = max_timestamp;
        let mut producers = std::collections::BTreeMap::new();
        for (id, row) in store.rows(Table::Producers)? {
            producers.insert(id, decode(&row)?);
        }
        self.next_offset = next_offset;
        self.producers.replace(producers);
        Ok(())
    }

    fn encode_snapshot(&self) -> io::Result<Vec<u8>> {
        encode(&PartitionSnapshot {
            next_offset: self.next_offset,
            max_timestamp: self.max_timestamp,
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
    ) -> io::Result<()> {
        let snapshot: PartitionSnapshot = decode(snapshot)?;
        // The high watermark never moves back, except when a fresh snapshot resets an empty
        // machine.
        self.next_offset = snapshot.next_offset;
        // The time index covers the entries applied from now on (partitions never install a
        // snapshot of records yet: see the module documentation).
        self.max_timestamp = snapshot.max_timestamp;
        store.clear_table(batch, Table::TimeIndex);
        store.clear_table(batch, Table::Producers);
        for (id, state) in &snapshot.producers {
            store.put_row(batch, Table::Producers, *id, &encode(state)?);
        }
        self.producers
            .replace(snapshot.producers.into_iter().collect());
        Ok(())
    }

    fn publish(&self) {
        let previous = self.high_watermark.send_replace(self.next_offset);
        assert!(previous <= self.next_offset, "high watermark moved back");
    }
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
    ) -> Response {
        match command {
            Command::Meta(command) => Response::Meta(self.apply.apply(index, &command).into()),
            Command::Append { .. }
            | Command::Appends(_)
            | Command::Produce(_)
            | Command::ProduceTimed(_) => {
                tracing::warn!(index, "record batch in the metadata log ignored");
                Response::None
            }
        }
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
    ) -> Response {
        match command {
            Command::Meta(command) => Response::Meta(self.apply.apply(index, &command).into()),
            Command::Append { .. }
            | Command::Appends(_)
            | Command::Produce(_)
            | Command::ProduceTimed(_) => {
                tracing::warn!(index, "record batch in a state group's log ignored");
                Response::None
            }
        }
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
    ) -> Response {
        match self {
            GroupLogic::Log(logic) => logic.apply(store, batch, index, command),
            GroupLogic::State(logic) => logic.apply(store, batch, index, command),
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
    ) -> io::Result<()> {
        match self {
            GroupLogic::Log(logic) => logic.install(store, batch, snapshot),
            GroupLogic::State(logic) => logic.install(store, batch, snapshot),
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
        let Response::Appended(outcomes) = logic.apply(store, &mut write, index, command) else {
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
        let (high_watermark, _) = watch::channel(0);
        let mut installed = PartitionLogic::new(high_watermark);
        let mut write = group.batch();
        installed.install(&group, &mut write, &snapshot).unwrap();
        group.write_durable(write).await.unwrap();
        assert_eq!(
            apply(&group, &mut installed, 5, vec![batch("d", 1, Some((7, 3)))]).await,
            [BatchOutcome::Duplicate(4)],
            "a snapshot carries the producer states"
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
