//! Coalescing: concurrent appends to one partition become one Raft entry.
//!
//! Each append joins its partition's queue. At most `proposals_max` proposer tasks per partition
//! run at once; each takes everything queued (up to `bytes_max` of batches, at least one) and
//! proposes it as one entry ([`Command::Appends`] when there are several), then answers each
//! append with its own base offset: the entry's base plus the records of the batches before it.
//! Under load a partition commits many calls per Raft round (one log write, one replication
//! message, one apply and one index entry for all of them); a lone call is proposed at once.
//!
//! The proposers are spawned tasks, so a caller that goes away (its client disconnected) never
//! cancels a proposal that carries other callers' batches. An append still queued when its
//! deadline passes is taken out of the queue and reported not written; one already proposed is
//! reported outcome unknown, exactly as a proposal of its own would be.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::GroupId;
use crate::WriteError;
use crate::node::PartitionRaft;
use crate::node::propose;
use crate::types::AppendBatch;
use crate::types::Command;
use crate::types::Response;

/// How much one partition coalesces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoalesceLimits {
    /// Most batch bytes in one coalesced entry (a single larger batch is proposed alone).
    pub(crate) bytes_max: usize,
    /// Most proposals of one partition in flight at once.
    pub(crate) proposals_max: usize,
}

struct Pending {
    id: u64,
    count: u32,
    batch: Bytes,
    deadline: Instant,
    reply: oneshot::Sender<Result<u64, WriteError>>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    proposers: usize,
    next_id: u64,
}

/// One partition's queue of appends waiting to be proposed.
pub(crate) struct Coalescer {
    raft: PartitionRaft,
    group: GroupId,
    limits: CoalesceLimits,
    queue: Mutex<Queue>,
}

impl Coalescer {
    pub(crate) fn new(raft: PartitionRaft, group: GroupId, limits: CoalesceLimits) -> Self {
        Self {
            raft,
            group,
            limits,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one batch; returns its base offset once committed.
    pub(crate) async fn append(
        self: &Arc<Self>,
        count: u32,
        batch: Bytes,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        let id = {
            let mut queue = self.lock();
            let id = queue.next_id;
            queue.next_id += 1;
            queue.pending.push_back(Pending {
                id,
                count,
                batch,
                deadline,
                reply,
            });
            if queue.proposers < self.limits.proposals_max {
                queue.proposers += 1;
                let this = self.clone();
                // The proposer works for every queued caller; it keeps the first one's span
                // (node, topic, partition).
                tokio::spawn(
                    async move { this.propose_queued().await }.instrument(tracing::Span::current()),
                );
            }
            id
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(WriteError::OutcomeUnknown {
                group: self.group,
                reason: "the proposer stopped before answering".into(),
            }),
            Err(_) => {
                let mut queue = self.lock();
                match queue.pending.iter().position(|pending| pending.id == id) {
                    Some(position) => {
                        queue.pending.remove(position);
                        Err(WriteError::Stopped {
                            group: self.group,
                            reason: format!(
                                "not proposed within {timeout:?}: the partition has more \
                                 appends queued than it commits in that time"
                            ),
                        })
                    }
                    None => Err(WriteError::OutcomeUnknown {
                        group: self.group,
                        reason: format!("not committed within {timeout:?}"),
                    }),
                }
            }
        }
    }

    /// Takes the next entry's worth of queued appends: the first, then more while they fit.
    /// Appends whose caller is gone are dropped unproposed.
    fn take(&self) -> Option<Vec<Pending>> {
        let mut queue = self.lock();
        let mut taken: Vec<Pending> = Vec::new();
        let mut bytes = 0usize;
        let mut records = 0u64;
        while let Some(next) = queue.pending.front() {
            if next.reply.is_closed() {
                queue.pending.pop_front();
                continue;
            }
            let fits = taken.is_empty()
                || (bytes + next.batch.len() <= self.limits.bytes_max
                    && records + u64::from(next.count) <= u64::from(u32::MAX));
            if !fits {
                break;
            }
            let next = queue.pending.pop_front().expect("front exists");
            bytes += next.batch.len();
            records += u64::from(next.count);
            taken.push(next);
        }
        if taken.is_empty() {
            queue.proposers -= 1;
            return None;
        }
        Some(taken)
    }

    /// A proposer: proposes what is queued until the queue is empty.
    async fn propose_queued(self: Arc<Self>) {
        while let Some(taken) = self.take() {
            let deadline = taken
                .iter()
                .map(|pending| pending.deadline)
                .max()
                .expect("take returns at least one");
            let command = if taken.len() == 1 {
                Command::Append {
                    count: taken[0].count,
                    batch: taken[0].batch.clone(),
                }
            } else {
                Command::Appends(
                    taken
                        .iter()
                        .map(|pending| AppendBatch {
                            count: pending.count,
                            batch: pending.batch.clone(),
                        })
                        .collect(),
                )
            };
            let timeout = deadline.saturating_duration_since(Instant::now());
            let result = propose(&self.raft, self.group, command, timeout).await;
            let mut base = match result {
                Ok(Response::Appended { base_offset }) => Ok(base_offset),
                Ok(other) => Err(WriteError::Stopped {
                    group: self.group,
                    reason: format!("unexpected answer to an append: {other:?}"),
                }),
                Err(error) => Err(error),
            };
            for pending in taken {
                // The caller may have given up; the entry is committed either way.
                let _ = pending.reply.send(base.clone());
                if let Ok(offset) = &mut base {
                    *offset += u64::from(pending.count);
                }
            }
        }
    }
}
