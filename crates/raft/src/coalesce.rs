//! Coalescing: concurrent appends to one partition become one Raft entry.
//!
//! Each append joins its partition's queue. At most `proposals_max` proposer tasks per partition
//! run at once; each takes everything queued (up to `bytes_max` of batches and `u32::MAX`
//! records, at least one batch; batches whose caller is gone are dropped) and proposes it as
//! one [`Command::Produce`] entry, then answers each append with what became of its own batch
//! (its base offset, or its producer state's refusal). Under load a
//! partition commits many calls per Raft round (one log write, one replication message, one
//! apply and one index entry for all of them); a lone call is proposed at once.
//!
//! The proposers are spawned tasks, so a caller that goes away (its client disconnected) never
//! cancels a proposal that carries other callers' batches. An append still queued when its
//! deadline passes is taken out of the queue and reported not written; one already proposed is
//! reported outcome unknown, exactly as a proposal of its own would be.
//!
//! The coalescer sees Raft only through [`Propose`] (implemented for the partition's Raft in
//! `group`), so it is unit-tested with a fake proposer.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::GroupId;
use crate::WriteError;
use crate::producers::ProducerLimits;
use crate::types::Appended;
use crate::types::BatchOutcome;
use crate::types::Command;
use crate::types::ProduceEntry;
use crate::types::Response;
use crate::types::StampedBatch;

/// Proposes one entry to a partition's Raft group and waits until it is committed and applied.
pub(crate) trait Propose: Send + Sync + 'static {
    /// Proposes `command` to `group`, giving up after `timeout`. Errors mean what they mean for
    /// [`crate::RaftNode::write`]: a proposal that may still commit is `OutcomeUnknown` or
    /// `Discarded`, never `NotLeader` or `Stopped`.
    fn propose(
        &self,
        group: GroupId,
        command: Command,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, WriteError>> + Send;
}

/// How much one partition coalesces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoalesceLimits {
    /// Most batch bytes in one coalesced entry (a single larger batch is proposed alone).
    pub(crate) bytes_max: usize,
    /// Most proposals of one partition in flight at once.
    pub(crate) proposals_max: usize,
    /// The bounds on producer states put in each entry.
    pub(crate) producers: ProducerLimits,
}

struct Pending {
    id: u64,
    batch: StampedBatch,
    deadline: Instant,
    reply: oneshot::Sender<Result<Appended, WriteError>>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    proposers: usize,
    next_id: u64,
}

/// One partition's queue of appends waiting to be proposed.
pub(crate) struct Coalescer<P> {
    raft: P,
    group: GroupId,
    limits: CoalesceLimits,
    queue: Mutex<Queue>,
}

impl<P: Propose> Coalescer<P> {
    /// An empty queue proposing through `raft`.
    pub(crate) fn new(raft: P, group: GroupId, limits: CoalesceLimits) -> Self {
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

    /// Appends one batch; returns where it is once committed.
    pub(crate) async fn append(
        self: &Arc<Self>,
        batch: StampedBatch,
        timeout: Duration,
    ) -> Result<Appended, WriteError> {
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        let id = {
            let mut queue = self.lock();
            let id = queue.next_id;
            queue.next_id += 1;
            queue.pending.push_back(Pending {
                id,
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
                || (bytes + next.batch.batch.len() <= self.limits.bytes_max
                    && records + u64::from(next.batch.count) <= u64::from(u32::MAX));
            if !fits {
                break;
            }
            let next = queue.pending.pop_front().expect("front exists");
            bytes += next.batch.batch.len();
            records += u64::from(next.batch.count);
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
        // `take` gives the proposer slot back when it finds the queue empty (under the queue's
        // lock, so no append is left without a proposer). A proposer that dies first (a panic,
        // the runtime shutting down) gives it back here, or the partition would run out of
        // proposers for good.
        let mut slot = ProposerSlot {
            coalescer: &*self,
            held: true,
        };
        loop {
            let Some(taken) = self.take() else {
                slot.held = false;
                return;
            };
            let deadline = taken
                .iter()
                .map(|pending| pending.deadline)
                .max()
                .expect("take returns at least one");
            let command = Command::ProduceTimed(ProduceEntry {
                at_ms: now_ms(),
                limits: self.limits.producers,
                batches: taken.iter().map(|pending| pending.batch.clone()).collect(),
            });
            let timeout = deadline.saturating_duration_since(Instant::now());
            let result = self.raft.propose(self.group, command, timeout).await;
            let outcomes = match result {
                Ok(Response::Appended(outcomes)) if outcomes.len() == taken.len() => Ok(outcomes),
                // Committed, but not answered batch by batch: the callers cannot be told where
                // their records are, and must not be told they are not there.
                Ok(other) => Err(WriteError::OutcomeUnknown {
                    group: self.group,
                    reason: format!("unexpected answer to an append: {other:?}"),
                }),
                Err(error) => Err(error),
            };
            for (position, pending) in taken.into_iter().enumerate() {
                let answer = match &outcomes {
                    Ok(outcomes) => match outcomes[position] {
                        BatchOutcome::Written(base_offset) => Ok(Appended {
                            base_offset,
                            duplicate: false,
                        }),
                        BatchOutcome::Duplicate(base_offset) => Ok(Appended {
                            base_offset,
                            duplicate: true,
                        }),
                        BatchOutcome::Refused(refusal) => Err(WriteError::Refused {
                            group: self.group,
                            refusal,
                        }),
                    },
                    Err(error) => Err(error.clone()),
                };
                // The caller may have given up; the entry is committed either way.
                let _ = pending.reply.send(answer);
            }
        }
    }
}

/// Milliseconds since the Unix epoch: the time an entry's producer states are applied at.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A proposer's claim on one of the partition's `proposals_max` slots; gives it back when
/// dropped while still held (the proposer died before `take` released it).
struct ProposerSlot<'a, P: Propose> {
    coalescer: &'a Coalescer<P>,
    held: bool,
}

impl<P: Propose> Drop for ProposerSlot<'_, P> {
    fn drop(&mut self) {
        if self.held {
            self.coalescer.lock().proposers -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;

    use bytes::Bytes;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::*;

    const GROUP: GroupId = GroupId(7);
    /// A caller's timeout that no test reaches unless it means to.
    const PATIENT: Duration = Duration::from_secs(600);

    /// One proposal the fake Raft received, waiting for the test to answer it.
    struct Proposal {
        command: Command,
        timeout: Duration,
        answer: oneshot::Sender<Result<Response, WriteError>>,
    }

    impl Proposal {
        /// `(tag, count)` of each batch of the entry, in order (a batch's bytes are its tag).
        fn batches(&self) -> Vec<(u8, u32)> {
            self.command
                .batches()
                .into_iter()
                .map(|part| (part.batch[0], part.count))
                .collect()
        }

        /// Commits the entry at `base_offset`, every batch written.
        fn commit(self, base_offset: u64) {
            let mut next = base_offset;
            let outcomes = self
                .command
                .batches()
                .iter()
                .map(|part| {
                    let outcome = BatchOutcome::Written(next);
                    next += u64::from(part.count);
                    outcome
                })
                .collect();
            self.answer(Ok(Response::Appended(outcomes)));
        }

        fn answer(self, result: Result<Response, WriteError>) {
            self.answer.send(result).expect("the proposer waits");
        }
    }

    /// A partition's Raft that hands every proposal to the test and counts those in flight.
    struct FakeRaft {
        proposals: mpsc::Sender<Proposal>,
        in_flight: AtomicUsize,
        in_flight_max: Arc<AtomicUsize>,
    }

    impl Propose for FakeRaft {
        async fn propose(
            &self,
            group: GroupId,
            command: Command,
            timeout: Duration,
        ) -> Result<Response, WriteError> {
            assert_eq!(group, GROUP);
            let in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.in_flight_max.fetch_max(in_flight, Ordering::SeqCst);
            let (answer, answered) = oneshot::channel();
            self.proposals
                .send(Proposal {
                    command,
                    timeout,
                    answer,
                })
                .await
                .expect("the test holds the receiver");
            let result = answered.await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            match result {
                Ok(result) => result,
                // The test dropped the proposal: the proposer task dies without answering, as
                // at runtime shutdown. Unlike `panic!`, `resume_unwind` prints nothing.
                Err(_) => std::panic::resume_unwind(Box::new("proposer stopped")),
            }
        }
    }

    struct Fixture {
        coalescer: Arc<Coalescer<FakeRaft>>,
        proposals: mpsc::Receiver<Proposal>,
        in_flight_max: Arc<AtomicUsize>,
    }

    fn fixture(proposals_max: usize, bytes_max: usize) -> Fixture {
        let (sender, proposals) = mpsc::channel(64);
        let in_flight_max = Arc::new(AtomicUsize::new(0));
        let raft = FakeRaft {
            proposals: sender,
            in_flight: AtomicUsize::new(0),
            in_flight_max: in_flight_max.clone(),
        };
        let limits = CoalesceLimits {
            bytes_max,
            proposals_max,
            producers: ProducerLimits {
                producers_max: 10,
                idle_ms: 1_000,
            },
        };
        Fixture {
            coalescer: Arc::new(Coalescer::new(raft, GROUP, limits)),
            proposals,
            in_flight_max,
        }
    }

    impl Fixture {
        /// Starts a caller appending `count` records in `bytes` bytes of `tag`, in its own task
        /// (as a request is), and lets it queue.
        async fn append(
            &self,
            tag: u8,
            count: u32,
            bytes: usize,
            timeout: Duration,
        ) -> JoinHandle<Result<u64, WriteError>> {
            let coalescer = self.coalescer.clone();
            let batch = StampedBatch {
                count,
                batch: Bytes::from(vec![tag; bytes]),
                producer: None,
                max_timestamp_ms: 0,
            };
            let caller = tokio::spawn(async move {
                let appended = coalescer.append(batch, timeout).await?;
                assert!(!appended.duplicate);
                Ok(appended.base_offset)
            });
            settle().await;
            caller
        }

        /// The proposal the fake received next; fails if there is none.
        fn next(&mut self) -> Proposal {
            self.proposals.try_recv().expect("a proposal is in flight")
        }

        fn assert_no_proposal(&mut self) {
            assert!(self.proposals.try_recv().is_err(), "no further proposal");
        }
    }

    /// Runs every task until all wait. Time is paused, so this moves the clock by 1 ms only.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    async fn answer(caller: JoinHandle<Result<u64, WriteError>>) -> Result<u64, WriteError> {
        caller.await.expect("the caller does not panic")
    }

    /// A lone append is proposed at once, as an entry of its own with the caller's timeout,
    /// and answered with the entry's base offset.
    #[tokio::test(start_paused = true)]
    async fn a_lone_append_is_proposed_at_once() {
        let mut fixture = fixture(2, 1 << 20);
        let caller = fixture.append(1, 3, 10, PATIENT).await;
        let proposal = fixture.next();
        let Command::ProduceTimed(entry) = &proposal.command else {
            panic!("an append is proposed as Command::ProduceTimed");
        };
        assert_eq!(
            entry.batches,
            [StampedBatch {
                count: 3,
                batch: Bytes::from(vec![1; 10]),
                producer: None,
                max_timestamp_ms: 0,
            }]
        );
        assert_eq!(proposal.timeout, PATIENT);
        proposal.commit(40);
        assert_eq!(answer(caller).await.expect("committed"), 40);
        fixture.assert_no_proposal();
    }

    /// At most `proposals_max` proposals are in flight, however many callers queue (here each
    /// batch fills an entry, so none coalesce); every caller is answered, in queue order.
    #[tokio::test(start_paused = true)]
    async fn proposals_in_flight_are_bounded() {
        let mut fixture = fixture(3, 1);
        let mut callers = Vec::new();
        for tag in 0..10 {
            callers.push(fixture.append(tag, 1, 1, PATIENT).await);
        }
        let mut proposed = Vec::new();
        while let Ok(proposal) = fixture.proposals.try_recv() {
            proposed.extend(proposal.batches());
            proposal.commit(proposed.len() as u64 - 1);
            settle().await;
        }
        let expected: Vec<(u8, u32)> = (0..10).map(|tag| (tag, 1)).collect();
        assert_eq!(proposed, expected);
        assert_eq!(fixture.in_flight_max.load(Ordering::SeqCst), 3);
        for (offset, caller) in callers.into_iter().enumerate() {
            assert_eq!(answer(caller).await.expect("committed"), offset as u64);
        }
    }

    /// Appends queued while the proposals are in flight are proposed together as one entry, in
    /// queue order, and each caller gets its own consecutive base offset.
    #[tokio::test(start_paused = true)]
    async fn queued_appends_coalesce_into_one_entry_with_consecutive_offsets() {
        let mut fixture = fixture(2, 1 << 20);
        let a = fixture.append(1, 1, 10, PATIENT).await;
        let b = fixture.append(2, 2, 10, PATIENT).await;
        let first = fixture.next();
        let second = fixture.next();
        let c = fixture.append(3, 3, 10, PATIENT).await;
        let d = fixture.append(4, 4, 10, PATIENT).await;
        let e = fixture.append(5, 5, 10, PATIENT).await;
        fixture.assert_no_proposal();
        assert_eq!(first.batches(), [(1, 1)]);
        assert_eq!(second.batches(), [(2, 2)]);

        first.commit(10);
        settle().await;
        let coalesced = fixture.next();
        assert_eq!(coalesced.batches(), [(3, 3), (4, 4), (5, 5)]);
        second.commit(11);
        coalesced.commit(100);
        assert_eq!(answer(a).await.expect("committed"), 10);
        assert_eq!(answer(b).await.expect("committed"), 11);
        assert_eq!(answer(c).await.expect("committed"), 100);
        assert_eq!(answer(d).await.expect("committed"), 103);
        assert_eq!(answer(e).await.expect("committed"), 107);
        settle().await;
        fixture.assert_no_proposal();
    }

    /// A coalesced entry takes queued batches while they fit in `bytes_max` (and a u32 of
    /// records); the rest wait for the next entry, and a batch larger than `bytes_max` is
    /// proposed alone.
    #[tokio::test(start_paused = true)]
    async fn a_coalesced_entry_stops_at_bytes_max() {
        let mut fixture = fixture(1, 10);
        let _a = fixture.append(1, 1, 4, PATIENT).await;
        let _b = fixture.append(2, 1, 4, PATIENT).await;
        let _c = fixture.append(3, 1, 4, PATIENT).await;
        let _d = fixture.append(4, 1, 4, PATIENT).await;
        let _e = fixture.append(5, 1, 20, PATIENT).await;
        let _f = fixture.append(6, u32::MAX - 1, 1, PATIENT).await;
        let _g = fixture.append(7, 2, 1, PATIENT).await;
        let expected: [&[(u8, u32)]; 6] = [
            &[(1, 1)],
            &[(2, 1), (3, 1)],
            &[(4, 1)],
            &[(5, 1)],
            &[(6, u32::MAX - 1)],
            &[(7, 2)],
        ];
        for batches in expected {
            let proposal = fixture.next();
            assert_eq!(proposal.batches(), batches);
            proposal.commit(0);
            settle().await;
        }
        fixture.assert_no_proposal();
    }

    /// A proposal's error reaches every caller of its entry: `Discarded` and `OutcomeUnknown`
    /// stay what they are (the entry may commit), and an answer that is not an offset is
    /// `OutcomeUnknown` (the entry committed; never "not written").
    #[tokio::test(start_paused = true)]
    async fn a_failed_proposal_fails_every_caller_of_its_entry() {
        let mut fixture = fixture(1, 1 << 20);
        let a = fixture.append(1, 1, 1, PATIENT).await;
        let b = fixture.append(2, 1, 1, PATIENT).await;
        let c = fixture.append(3, 1, 1, PATIENT).await;
        fixture.next().answer(Err(WriteError::Discarded {
            group: GROUP,
            leader: Some(2),
        }));
        assert!(matches!(
            answer(a).await,
            Err(WriteError::Discarded {
                leader: Some(2),
                ..
            })
        ));
        settle().await;
        let d = fixture.append(4, 1, 1, PATIENT).await;
        let e = fixture.append(5, 1, 1, PATIENT).await;
        let proposal = fixture.next();
        assert_eq!(proposal.batches(), [(2, 1), (3, 1)]);
        proposal.answer(Err(WriteError::OutcomeUnknown {
            group: GROUP,
            reason: "the group stopped".into(),
        }));
        for caller in [b, c] {
            match answer(caller).await {
                Err(WriteError::OutcomeUnknown { reason, .. }) => {
                    assert_eq!(reason, "the group stopped")
                }
                other => panic!("expected outcome unknown, got {other:?}"),
            }
        }
        settle().await;
        let proposal = fixture.next();
        assert_eq!(proposal.batches(), [(4, 1), (5, 1)]);
        proposal.answer(Ok(Response::None));
        for caller in [d, e] {
            assert!(matches!(
                answer(caller).await,
                Err(WriteError::OutcomeUnknown { .. })
            ));
        }
    }

    /// An append still queued when its deadline passes is taken out of the queue and reported
    /// not written (`Stopped`); the next entry goes without it.
    #[tokio::test(start_paused = true)]
    async fn an_append_queued_past_its_deadline_is_not_written() {
        let mut fixture = fixture(1, 1 << 20);
        let a = fixture.append(1, 1, 1, PATIENT).await;
        let b = fixture.append(2, 1, 1, Duration::from_secs(5)).await;
        let c = fixture.append(3, 1, 1, PATIENT).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        match answer(b).await {
            Err(WriteError::Stopped { reason, .. }) => {
                assert!(reason.starts_with("not proposed within"), "{reason}")
            }
            other => panic!("expected not written, got {other:?}"),
        }
        fixture.next().commit(0);
        settle().await;
        let proposal = fixture.next();
        assert_eq!(proposal.batches(), [(3, 1)]);
        proposal.commit(1);
        assert_eq!(answer(a).await.expect("committed"), 0);
        assert_eq!(answer(c).await.expect("committed"), 1);
    }

    /// Each caller keeps its own deadline: an entry is proposed with the latest of its callers'
    /// deadlines, and a caller whose deadline passes while its entry is in flight is told the
    /// outcome is unknown, while the others of the entry still get their offsets.
    #[tokio::test(start_paused = true)]
    async fn an_append_in_flight_past_its_deadline_is_outcome_unknown() {
        let mut fixture = fixture(1, 1 << 20);
        let _a = fixture.append(1, 1, 1, PATIENT).await;
        let b = fixture.append(2, 2, 1, Duration::from_secs(10)).await;
        let c = fixture.append(3, 1, 1, Duration::from_secs(30)).await;
        fixture.next().commit(0);
        settle().await;
        let proposal = fixture.next();
        assert_eq!(proposal.batches(), [(2, 2), (3, 1)]);
        assert!(
            proposal.timeout > Duration::from_secs(29),
            "{:?}",
            proposal.timeout
        );
        assert!(
            proposal.timeout <= Duration::from_secs(30),
            "{:?}",
            proposal.timeout
        );
        tokio::time::sleep(Duration::from_secs(11)).await;
        match answer(b).await {
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                assert!(reason.starts_with("not committed within"), "{reason}")
            }
            other => panic!("expected outcome unknown, got {other:?}"),
        }
        proposal.commit(50);
        assert_eq!(answer(c).await.expect("committed"), 52);
    }

    /// A caller that goes away cancels nothing else: a queued batch whose caller left is
    /// dropped unproposed, and an entry whose caller left while in flight still commits and
    /// answers the others (their offsets count the departed caller's records).
    #[tokio::test(start_paused = true)]
    async fn a_caller_that_goes_away_does_not_cancel_others() {
        let mut fixture = fixture(1, 1 << 20);
        let a = fixture.append(1, 1, 1, PATIENT).await;
        let b = fixture.append(2, 1, 1, PATIENT).await;
        let c = fixture.append(3, 2, 1, PATIENT).await;
        let d = fixture.append(4, 1, 1, PATIENT).await;
        a.abort();
        b.abort();
        settle().await;
        fixture.next().commit(0);
        settle().await;
        let proposal = fixture.next();
        assert_eq!(proposal.batches(), [(3, 2), (4, 1)]);
        c.abort();
        settle().await;
        proposal.commit(1);
        assert_eq!(answer(d).await.expect("committed"), 3);
        settle().await;
        fixture.assert_no_proposal();
    }

    /// Each caller of a coalesced entry gets what became of its own batch: written, a
    /// duplicate (its first offsets, marked), or its producer state's refusal.
    #[tokio::test(start_paused = true)]
    async fn each_caller_gets_its_own_batch_outcome() {
        let mut fixture = fixture(1, 1 << 20);
        let coalescer = fixture.coalescer.clone();
        let _first = fixture.append(1, 1, 1, PATIENT).await;
        let callers: Vec<_> = (2..5u8)
            .map(|tag| {
                let coalescer = coalescer.clone();
                let batch = StampedBatch {
                    count: 1,
                    batch: Bytes::from(vec![tag]),
                    producer: Some(crate::ProducerStamp {
                        id: 1,
                        epoch: 0,
                        sequence: u64::from(tag),
                    }),
                    max_timestamp_ms: 0,
                };
                tokio::spawn(async move { coalescer.append(batch, PATIENT).await })
            })
            .collect();
        settle().await;
        fixture.next().commit(0);
        settle().await;
        let proposal = fixture.next();
        let Command::ProduceTimed(entry) = &proposal.command else {
            panic!("an append is proposed as Command::ProduceTimed");
        };
        assert_eq!(entry.batches.len(), 3);
        assert_eq!(
            entry.limits.producers_max, 10,
            "the limits travel in the entry"
        );
        let refusal = crate::Refusal::OutOfOrder { expected: 3 };
        proposal.answer(Ok(Response::Appended(vec![
            BatchOutcome::Written(7),
            BatchOutcome::Duplicate(3),
            BatchOutcome::Refused(refusal),
        ])));
        let mut answers = Vec::new();
        for caller in callers {
            answers.push(caller.await.expect("no panic"));
        }
        assert_eq!(
            answers[0].as_ref().expect("written"),
            &Appended {
                base_offset: 7,
                duplicate: false
            }
        );
        assert_eq!(
            answers[1].as_ref().expect("duplicate"),
            &Appended {
                base_offset: 3,
                duplicate: true
            }
        );
        assert!(matches!(
            answers[2],
            Err(WriteError::Refused { refusal: r, .. }) if r == refusal
        ));
    }

    /// A proposer that dies gives its slot back: with one proposer allowed, the next append is
    /// still proposed (before, the slot leaked and the partition never proposed again).
    #[tokio::test(start_paused = true)]
    async fn a_dead_proposer_gives_its_slot_back() {
        let mut fixture = fixture(1, 1 << 20);
        let a = fixture.append(1, 1, 1, PATIENT).await;
        drop(fixture.next());
        assert!(answer(a).await.is_err());
        settle().await;
        let b = fixture.append(2, 1, 1, PATIENT).await;
        fixture.next().commit(5);
        assert_eq!(answer(b).await.expect("b commits"), 5);
    }

    /// A proposer that dies before answering (runtime shutdown) leaves its callers "outcome
    /// unknown", never "not written": the entry may have been appended.
    #[tokio::test(start_paused = true)]
    async fn a_proposer_that_dies_leaves_its_callers_outcome_unknown() {
        let mut fixture = fixture(2, 1 << 20);
        let a = fixture.append(1, 1, 1, PATIENT).await;
        drop(fixture.next());
        match answer(a).await {
            Err(WriteError::OutcomeUnknown { reason, .. }) => {
                assert_eq!(reason, "the proposer stopped before answering")
            }
            other => panic!("expected outcome unknown, got {other:?}"),
        }
    }
}
