//! Client-side batching of concurrent produce calls to one partition, like Kafka's record
//! accumulator with `linger.ms = 0`: nothing ever waits for company, but calls made while a
//! partition already has `produce_requests_per_partition_max` requests in flight queue here, and
//! when one of those requests completes, everything queued (up to `produce_batch_bytes_max`)
//! leaves as one request. Each call still gets its own acknowledgements, in its own order.
//!
//! This module only keeps the queues; `Client` sends. Entering always gives the call a receiver
//! for its answer, and, when the partition has a free slot, the slot ([`InFlight`]) with the
//! call as its first batch: the caller then spawns the task that sends it and every batch that
//! queues behind it, so a caller that goes away never strands the calls queued behind its own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ordo_proto::v1 as proto;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::ClientError;
use crate::types::RecordAck;

/// Most records in one merged request (the server's default `limits.batch_records_max` is
/// 10,000; a server with a lower limit answers INVALID_ARGUMENT, and the calls are then sent
/// one by one).
pub(crate) const BATCH_RECORDS_MAX: usize = 1_000;

pub(crate) type Answer = Result<Vec<RecordAck>, ClientError>;

/// A call waiting for a merged request.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) records: Vec<proto::Record>,
    bytes: usize,
    /// When the call was queued; the merged request's deadline counts from the oldest.
    pub(crate) queued: Instant,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// The queues of every partition produced to.
#[derive(Debug)]
pub(crate) struct Batcher {
    queues: Mutex<HashMap<(Arc<str>, u32), Queue>>,
    requests_max: usize,
    bytes_max: usize,
}

#[derive(Debug, Default)]
struct Queue {
    in_flight: usize,
    waiting: VecDeque<Waiter>,
}

/// One in-flight request of a partition. Dropping it frees the slot and returns whatever
/// queued meanwhile, already holding a new slot, for the caller to send.
#[derive(Debug)]
pub(crate) struct InFlight {
    batcher: Arc<Batcher>,
    key: (Arc<str>, u32),
    /// Set once the slot was freed by `finish`.
    released: bool,
}

impl Batcher {
    pub(crate) fn new(requests_max: usize, bytes_max: usize) -> Batcher {
        Batcher {
            queues: Mutex::new(HashMap::new()),
            requests_max: requests_max.max(1),
            bytes_max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(Arc<str>, u32), Queue>> {
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a call of `records` to `topic`/`partition`. Returns the receiver of its answer
    /// and, when a slot was free, the slot with this call as its batch, to be sent at once.
    #[allow(clippy::type_complexity)]
    pub(crate) fn enter(
        self: &Arc<Self>,
        topic: &str,
        partition: u32,
        records: Vec<proto::Record>,
    ) -> (oneshot::Receiver<Answer>, Option<(Vec<Waiter>, InFlight)>) {
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            bytes: records.iter().map(record_bytes).sum(),
            records,
            queued: Instant::now(),
            reply,
        };
        let key = (Arc::<str>::from(topic), partition);
        let mut queues = self.lock();
        let queue = queues.entry(key.clone()).or_default();
        if queue.in_flight < self.requests_max {
            queue.in_flight += 1;
            let slot = InFlight {
                batcher: Arc::clone(self),
                key,
                released: false,
            };
            return (answer, Some((vec![waiter], slot)));
        }
        queue.waiting.push_back(waiter);
        (answer, None)
    }

    /// Frees one slot of `key`. When calls are queued, takes the oldest ones that fit one
    /// request (at least one) and keeps the slot for them.
    fn leave(&self, key: &(Arc<str>, u32)) -> Vec<Waiter> {
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(key) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let (mut bytes, mut records) = (0_usize, 0_usize);
        // A call whose caller went away (its future dropped) is not sent: nothing was written
        // for it, and sending it later would write what the caller gave up on.
        queue.waiting.retain(|waiter| !waiter.reply.is_closed());
        while let Some(next) = queue.waiting.front() {
            let fits = bytes + next.bytes <= self.bytes_max
                && records + next.records.len() <= BATCH_RECORDS_MAX;
            if !taken.is_empty() && !fits {
                break;
            }
            let Some(next) = queue.waiting.pop_front() else {
                break;
            };
            bytes += next.bytes;
            records += next.records.len();
            taken.push(next);
        }
        if taken.is_empty() {
            queue.in_flight -= 1;
            if queue.in_flight == 0 {
                queues.remove(key);
            }
        }
        taken
    }
}

impl InFlight {
    /// Frees the slot now; returns the queued calls to send next, holding a slot again.
    pub(crate) fn finish(mut self) -> Option<(Vec<Waiter>, InFlight)> {
        let taken = self.batcher.leave(&self.key);
        if taken.is_empty() {
            // The slot is free: this handle must not free it again when dropped.
            self.released = true;
            return None;
        }
        // The slot is kept for `taken`: this handle goes on holding it.
        Some((taken, self))
    }

    pub(crate) fn topic(&self) -> &str {
        &self.key.0
    }

    pub(crate) fn partition(&self) -> u32 {
        self.key.1
    }
}

impl Drop for InFlight {
    /// A slot dropped without `finish` (its sending task panicked or its runtime shut down)
    /// must not strand the queue: the calls queued behind it are answered as never sent, so
    /// their callers can retry, and the slot is freed.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        loop {
            let taken = self.batcher.leave(&self.key);
            if taken.is_empty() {
                break;
            }
            for waiter in taken {
                let _ = waiter.reply.send(Err(ClientError::Unavailable {
                    leader_hint: None,
                    leader_address: None,
                    message: "the produce request this call was queued behind was abandoned; nothing was written".to_owned(),
                }));
            }
        }
    }
}

/// Bytes of a record as the server counts them toward its limits.
fn record_bytes(record: &proto::Record) -> usize {
    record.key.as_ref().map_or(0, |key| key.len())
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|header| header.key.len() + header.value.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn records(count: usize, size: usize) -> Vec<proto::Record> {
        (0..count)
            .map(|_| proto::Record {
                key: None,
                value: Bytes::from(vec![0_u8; size]),
                headers: Vec::new(),
                timestamp_ms: None,
            })
            .collect()
    }

    fn send_now(entered: (oneshot::Receiver<Answer>, Option<(Vec<Waiter>, InFlight)>)) -> InFlight {
        let (_, slot) = entered;
        let (batch, slot) = slot.expect("a call with a free slot sends at once");
        assert_eq!(batch.len(), 1);
        slot
    }

    fn waits(
        entered: (oneshot::Receiver<Answer>, Option<(Vec<Waiter>, InFlight)>),
    ) -> oneshot::Receiver<Answer> {
        let (answer, slot) = entered;
        assert!(slot.is_none(), "a call past the bound must wait");
        answer
    }

    /// Calls beyond the in-flight bound queue; a finished request hands over what fits in one
    /// request, oldest first, and keeps the slot for it; the last finish empties the queue.
    #[test]
    fn queued_calls_leave_together_within_the_bounds() {
        let batcher = Arc::new(Batcher::new(1, 250));
        let first = send_now(batcher.enter("t", 0, records(1, 10)));
        let _answers: Vec<_> = [100, 100, 100]
            .into_iter()
            .map(|size| waits(batcher.enter("t", 0, records(1, size))))
            .collect();
        // Another partition has its own bound.
        let _other = send_now(batcher.enter("t", 1, records(1, 10)));
        let (taken, second) = first.finish().expect("queued calls are handed over");
        assert_eq!(
            taken.len(),
            2,
            "two 100-byte calls fit 250 bytes, three do not"
        );
        let (taken, third) = second.finish().expect("the third call is handed over");
        assert_eq!(taken.len(), 1);
        assert!(third.finish().is_none());
        assert!(!batcher.lock().contains_key(&(Arc::from("t"), 0)));
    }

    /// A slot freed by `finish` is freed once: with two slots, after one hands its queue on and
    /// the other finishes empty, exactly one slot is busy.
    #[test]
    fn a_finished_slot_is_freed_once() {
        let batcher = Arc::new(Batcher::new(2, 1 << 20));
        let first = send_now(batcher.enter("t", 0, records(1, 10)));
        let second = send_now(batcher.enter("t", 0, records(1, 10)));
        let _third = waits(batcher.enter("t", 0, records(1, 10)));
        let (_, _still_busy) = first.finish().expect("the third call is handed over");
        assert!(second.finish().is_none());
        let _fourth = send_now(batcher.enter("t", 0, records(1, 10)));
        let _fifth = waits(batcher.enter("t", 0, records(1, 10)));
    }

    /// A queued call whose caller went away is dropped, not sent.
    #[test]
    fn abandoned_calls_are_not_sent() {
        let batcher = Arc::new(Batcher::new(1, 1 << 20));
        let first = send_now(batcher.enter("t", 0, records(1, 10)));
        let gone = waits(batcher.enter("t", 0, records(1, 11)));
        let _kept = waits(batcher.enter("t", 0, records(1, 12)));
        drop(gone);
        let (taken, _) = first.finish().expect("the live call is handed over");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].records[0].value.len(), 12);
    }

    /// A call larger than the byte bound still leaves, alone.
    #[test]
    fn an_oversized_call_leaves_alone() {
        let batcher = Arc::new(Batcher::new(1, 50));
        let first = send_now(batcher.enter("t", 0, records(1, 10)));
        let _waiting = [
            waits(batcher.enter("t", 0, records(1, 80))),
            waits(batcher.enter("t", 0, records(1, 10))),
        ];
        let (taken, next) = first.finish().expect("handed over");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].records[0].value.len(), 80);
        let (taken, last) = next.finish().expect("handed over");
        assert_eq!(taken.len(), 1);
        assert!(last.finish().is_none());
    }

    /// Dropping a slot without finishing answers the queued calls as never sent and frees it.
    #[tokio::test]
    async fn an_abandoned_slot_releases_its_queue() {
        let batcher = Arc::new(Batcher::new(1, 1 << 20));
        let first = send_now(batcher.enter("t", 0, records(1, 10)));
        let answer = waits(batcher.enter("t", 0, records(1, 10)));
        drop(first);
        let error = answer.await.expect("answered").expect_err("never sent");
        assert!(error.is_retryable(), "{error:?}");
        assert!(batcher.lock().is_empty());
    }
}
