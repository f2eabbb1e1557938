//! What the node does to one openraft group: propose an entry and wait for its answer, hand it
//! an inbound Raft RPC, read its status, open its state machine, read committed batches. Free
//! functions over `Raft<C, SM>`, so the metadata group and the partition groups share them;
//! [`RaftNode`](crate::RaftNode) holds the groups and calls these.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use openraft::EntryPayload;
use openraft::Raft;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use openraft::storage::RaftStateMachine;
use ordo_proto::internal::RaftKind;
use ordo_storage::GroupStore;
use ordo_storage::IndexEntry;

use crate::GroupError;
use crate::GroupId;
use crate::NodeId;
use crate::ReadError;
use crate::WriteError;
use crate::coalesce::Propose;
use crate::codec::decode;
use crate::codec::encode;
use crate::machine::GroupLogic;
use crate::machine::Logic;
use crate::machine::Machine;
use crate::network::RaftAnswer;
use crate::types::C;
use crate::types::Command;
use crate::types::Entry;
use crate::types::Response;
use crate::types::Snapshot;
use crate::types::SnapshotData;

/// The Raft group of a partition or a state group.
pub(crate) type PartitionRaft = Raft<C, Machine<GroupLogic>>;

/// The first pause before a write refused by a leader whose lease lapsed is retried (see
/// `propose`); it doubles on each refusal.
pub(crate) const LEASE_RETRY_PAUSE_MIN: Duration = Duration::from_millis(1);
/// The longest pause between two such retries: a lease is regained in one heartbeat round
/// (milliseconds), so waiting longer would only add latency.
pub(crate) const LEASE_RETRY_PAUSE_MAX: Duration = Duration::from_millis(50);

/// Committed record batches read from a partition.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    /// The offset after the last committed record.
    pub high_watermark: u64,
    /// `(base offset, record count, encoded batch)`, in offset order. The first batch may start
    /// before the requested offset.
    pub batches: Vec<(u64, u32, Bytes)>,
}

/// One group as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    /// The group.
    pub group: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// The high watermark (partitions only).
    pub high_watermark: u64,
    /// The first offset this replica holds (partitions only).
    pub log_start_offset: u64,
    /// About the bytes of records this replica holds (partitions only): from the log entry
    /// holding the start to the end.
    pub bytes: u64,
    /// This replica's last log index.
    pub last_log_index: u64,
    /// On the leader: each replica's matched log index.
    pub matched: BTreeMap<NodeId, u64>,
    /// Members of the group.
    pub voters: Vec<NodeId>,
}

impl Propose for PartitionRaft {
    async fn propose(
        &self,
        group: GroupId,
        command: Command,
        timeout: Duration,
    ) -> Result<Response, WriteError> {
        propose(self, group, command, timeout).await
    }
}

/// Proposes one entry and waits until it is committed and applied, or the timeout passes.
pub(crate) async fn propose<SM>(
    raft: &Raft<C, SM>,
    group: GroupId,
    command: Command,
    timeout: Duration,
) -> Result<Response, WriteError>
where
    SM: RaftStateMachine<C>,
{
    // A follower answers at once, without proposing, so the caller can forward cleanly.
    let leader = raft.metrics().borrow_watched().current_leader;
    if leader != Some(*raft.node_id()) {
        return Err(WriteError::NotLeader { group, leader });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = LEASE_RETRY_PAUSE_MIN;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = match tokio::time::timeout(remaining, raft.client_write(command.clone())).await
        {
            Err(_) => {
                return Err(WriteError::OutcomeUnknown {
                    group,
                    reason: format!("not committed within {timeout:?}"),
                });
            }
            Ok(result) => result,
        };
        return match result {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                // A quiescent leader (no heartbeats, see `watchdog`) lets its lease lapse and
                // refuses writes, without appending, until a quorum acks it again: wake the
                // group with one heartbeat round and retry until the deadline.
                let leading =
                    raft.metrics().borrow_watched().state == openraft::ServerState::Leader;
                if leading && forward.leader_id.is_none() && !remaining.is_zero() {
                    if let Err(fatal) = raft.trigger().heartbeat().await {
                        return Err(WriteError::Stopped {
                            group,
                            reason: fatal.to_string(),
                        });
                    }
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(LEASE_RETRY_PAUSE_MAX);
                    continue;
                }
                Err(WriteError::NotLeader {
                    group,
                    leader: forward.leader_id,
                })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward))) => {
                Err(WriteError::Discarded {
                    group,
                    leader: forward.leader_id,
                })
            }
            Err(RaftError::APIError(other)) => Err(WriteError::Stopped {
                group,
                reason: other.to_string(),
            }),
            // The group stopped after the entry was handed to it: it may have been appended
            // and replicated, and may commit under the next leader.
            Err(RaftError::Fatal(fatal)) => Err(WriteError::OutcomeUnknown {
                group,
                reason: format!("the group stopped after the proposal: {fatal}"),
            }),
        };
    }
}

/// The error of a `Fatal` openraft answer: the group stopped.
pub(crate) fn stopped<E: std::fmt::Display>(group: GroupId) -> impl Fn(E) -> GroupError + Copy {
    move |fatal| GroupError::Stopped {
        group,
        reason: fatal.to_string(),
    }
}

/// Opens a state machine on a blocking thread: it reads RocksDB.
pub(crate) async fn open_machine<L: Logic + Send + 'static>(
    store: GroupStore,
    logic: L,
) -> Result<Machine<L>, GroupError> {
    let group = store.group();
    tokio::task::spawn_blocking(move || Machine::open(store, logic))
        .await
        // The blocking task panicked or the runtime is shutting down.
        .map_err(std::io::Error::other)
        .and_then(|opened| opened)
        .map_err(|source| GroupError::Open { group, source })
}

/// Why this node could not hand an inbound Raft RPC to its group. Sent back to the caller as a
/// message (see [`RaftAnswer`]), where it makes the target unreachable for that RPC.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboundError {
    #[error("metadata group not started on node {node}")]
    MetaNotStarted { node: NodeId },
    #[error("group {group} not hosted on node {node}")]
    GroupNotFound { group: GroupId, node: NodeId },
    #[error("undecodable {kind:?} request: {source}")]
    Undecodable {
        kind: RaftKind,
        source: std::io::Error,
    },
    #[error("raft request without a kind")]
    NoKind,
    #[error("snapshot chunks are for partition groups only")]
    NotAPartition,
    #[error("encoding the answer to a {kind:?} request: {source}")]
    Encode {
        kind: RaftKind,
        source: std::io::Error,
    },
}

/// Hands one inbound Raft RPC to `raft`; returns its encoded [`RaftAnswer`] (openraft's own
/// errors are answers too, as messages).
pub(crate) async fn dispatch<SM>(
    raft: &Raft<C, SM>,
    kind: RaftKind,
    payload: &[u8],
) -> Result<Vec<u8>, InboundError>
where
    SM: RaftStateMachine<C, SnapshotData = SnapshotData>,
{
    fn answer<T: serde::Serialize, E: std::fmt::Display>(
        kind: RaftKind,
        result: Result<T, E>,
    ) -> Result<Vec<u8>, InboundError> {
        let answer: RaftAnswer<T> = result.map_err(|error| error.to_string());
        encode(&answer).map_err(|source| InboundError::Encode { kind, source })
    }
    let bad = |source: std::io::Error| InboundError::Undecodable { kind, source };
    match kind {
        RaftKind::Append => answer(
            kind,
            raft.append_entries(decode(payload).map_err(bad)?).await,
        ),
        RaftKind::Vote => answer(kind, raft.vote(decode(payload).map_err(bad)?).await),
        RaftKind::PreVote => answer(kind, raft.pre_vote(decode(payload).map_err(bad)?).await),
        RaftKind::Snapshot => {
            let (vote, meta, data): (crate::types::Vote, crate::types::SnapshotMeta, Vec<u8>) =
                decode(payload).map_err(bad)?;
            let snapshot = Snapshot {
                meta,
                snapshot: Cursor::new(data),
            };
            answer(kind, raft.install_full_snapshot(vote, snapshot).await)
        }
        RaftKind::TransferLeader => answer(
            kind,
            raft.handle_transfer_leader(decode(payload).map_err(bad)?)
                .await,
        ),
        RaftKind::Unspecified => Err(InboundError::NoKind),
        // Handled by the node, for partitions only (see `snapshot`).
        RaftKind::SnapshotChunk => Err(InboundError::NotAPartition),
    }
}

pub(crate) fn status_of<SM: RaftStateMachine<C>>(
    raft: &Raft<C, SM>,
    group: GroupId,
    high_watermark: u64,
    log_start_offset: u64,
    bytes: u64,
) -> GroupStatus {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let matched = matched_of(&metrics);
    GroupStatus {
        group: group.0,
        leader: metrics.current_leader,
        term: metrics.current_term,
        high_watermark,
        log_start_offset,
        bytes,
        last_log_index: metrics.last_log_index.map(|index| index + 1).unwrap_or(0),
        matched,
        voters: metrics.membership_config.voter_ids().collect(),
    }
}

/// On a leader: each member's matched entries (last matched index + 1); empty elsewhere.
pub(crate) fn matched_of(metrics: &openraft::RaftMetrics<C>) -> BTreeMap<NodeId, u64> {
    metrics
        .replication
        .as_ref()
        .map(|replication| {
            replication
                .iter()
                .map(|(node, log_id)| (*node, log_id.as_ref().map_or(0, |id| id.index + 1)))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads committed batches of one partition, stopping at the high watermark.
pub(crate) fn read_committed(
    store: &GroupStore,
    offset: u64,
    high_watermark: u64,
    max_bytes: usize,
) -> Result<ReadBatch, ReadError> {
    let group = store.group();
    let Some(first) = store.index_floor(offset)? else {
        return Err(ReadError::Decode {
            group,
            reason: format!(
                "no index entry at or before offset {offset} below high watermark {high_watermark}"
            ),
        });
    };
    let mut batches = Vec::new();
    let entries = store.read_log(first.log_index, u64::MAX, max_bytes)?;
    // Offsets are counted from the indexed entry, so the read must start exactly there.
    if entries.first().map(|(index, _)| *index) != Some(first.log_index) {
        return Err(ReadError::Decode {
            group,
            reason: format!(
                "log entry {} of offset {} is missing",
                first.log_index, first.base_offset
            ),
        });
    }
    // Which entries hold offsets, and which of their batches do not: entries the index does not
    // name (blank, membership, every batch a producer's retry) hold none.
    let indexed = store.index_range(first.base_offset, high_watermark, entries.len())?;
    // A compaction or trim written meanwhile deleted the index rows read from: the caller
    // reads again (skipping ahead would lose the records it kept).
    if indexed.first().map(|entry| entry.base_offset) != Some(first.base_offset) {
        return Err(ReadError::Decode {
            group,
            reason: format!(
                "the index entry of offset {} went while it was read",
                first.base_offset
            ),
        });
    }
    let mut indexed = indexed.into_iter().peekable();
    for (index, bytes) in entries {
        let Some(next) = indexed.peek() else {
            break;
        };
        if next.log_index != index {
            continue;
        }
        let IndexEntry {
            base_offset,
            count,
            skipped_batches,
            ..
        } = indexed.next().expect("peeked");
        let entry: Entry = decode(&bytes).map_err(|error| ReadError::Decode {
            group,
            reason: format!("index {index}: {error}"),
        })?;
        let EntryPayload::Normal(command) = &entry.payload else {
            return Err(ReadError::Decode {
                group,
                reason: format!(
                    "index {index}: offset {base_offset} points at an entry without records"
                ),
            });
        };
        let mut offset = base_offset;
        for (position, part) in command.batches().into_iter().enumerate() {
            if skipped_batches.contains(&(position as u32)) {
                continue;
            }
            batches.push((offset, part.count, part.batch.clone()));
            offset += u64::from(part.count);
        }
        if offset - base_offset != u64::from(count) {
            return Err(ReadError::Decode {
                group,
                reason: format!(
                    "index {index}: the index holds {count} records at offset {base_offset}, the entry {}",
                    offset - base_offset
                ),
            });
        }
    }
    Ok(ReadBatch {
        high_watermark,
        batches,
    })
}
