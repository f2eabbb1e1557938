//! Idempotent producers: one partition's producer states and the check that makes a retried
//! batch land once. Pure code (no I/O, no clock): the partition state machine runs it on every
//! replica for every committed batch that carries a [`ProducerStamp`], with the time and the
//! limits the leader put in the entry, so every replica decides the same.
//!
//! Per producer id the partition keeps the epoch, the next expected sequence (sequences count
//! records, from 0 per partition) and the last [`WINDOW_BATCHES`] batches written, with their
//! offsets. For a stamped batch of `count` records at sequence `s`:
//! - `s` is the next expected sequence: written, and remembered;
//! - `s .. s + count` lies inside a remembered batch: a retry; nothing is written and the
//!   answer is the offsets it got the first time;
//! - `s .. s + count` lies below the next sequence but not inside a remembered batch: a retry of
//!   a batch older than the window, or one regrouped: nothing is written, [`Refusal::SequenceTooOld`];
//! - otherwise (a gap, or a batch straddling the next sequence): [`Refusal::OutOfOrder`];
//! - an older epoch than the partition has seen: [`Refusal::Fenced`]; a newer one starts over
//!   and must start at sequence 0;
//! - a producer the partition does not know (never seen, or forgotten after
//!   `idle_ms` without a write) must start at sequence 0, else [`Refusal::UnknownProducer`].
//!
//! A partition remembers at most `producers_max` producers; a new one past that forgets the
//! producers idle longer than `idle_ms`, else the one idle longest if it has been idle at least
//! [`EVICTABLE_IDLE_MS`] (short-lived producers, each client run a new id, must not lock a
//! partition for `idle_ms`), and is refused ([`Refusal::TooManyProducers`]) when every producer
//! wrote within that minute. A producer id above [`PRODUCER_ID_MAX`] is unknown.
//!
//! Never: read a clock or a config here. Both come from the entry.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;

use serde::Deserialize;
use serde::Serialize;

/// Batches per producer whose offsets a partition remembers, to answer their retries (Kafka
/// keeps 5, its bound on a producer's requests in flight per partition).
pub const WINDOW_BATCHES: usize = 5;

/// A partition full of producers forgets the one idle longest only once it has been idle this
/// long (milliseconds): a producer writing now keeps its state.
pub const EVICTABLE_IDLE_MS: u64 = 60_000;

/// Largest producer id a partition keeps a state for (its store keys rows by 56-bit ids).
pub const PRODUCER_ID_MAX: u64 = (1 << 56) - 1;

/// The producer of a batch and the batch's place in its sequence, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerStamp {
    /// The producer id, allocated by the cluster (`InitProducer`).
    pub id: u64,
    /// The producer's epoch; a higher one fences the lower.
    pub epoch: u32,
    /// The sequence of the batch's first record in this partition.
    pub sequence: u64,
}

/// The bounds on a partition's producer states, carried in each entry (the leader's config), so
/// every replica applies the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerLimits {
    /// Most producers a partition remembers.
    pub producers_max: u32,
    /// A producer without a write for this long may be forgotten (milliseconds).
    pub idle_ms: u64,
}

/// Why a stamped batch was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A newer epoch of this producer id has written to the partition.
    Fenced {
        /// The partition's epoch of the producer.
        current_epoch: u32,
    },
    /// The sequence is not the next one (a gap, or a batch straddling the next sequence).
    OutOfOrder {
        /// The sequence the partition expects next.
        expected: u64,
    },
    /// The partition does not know the producer (never written, or forgotten when idle), and
    /// the batch does not start at sequence 0.
    UnknownProducer,
    /// The records were written before, but in a batch the partition no longer remembers (or
    /// grouped differently), so their offsets cannot be answered. Nothing was written now.
    SequenceTooOld {
        /// The sequence the partition expects next.
        expected: u64,
    },
    /// The partition remembers `max` producers, none idle long enough to be forgotten.
    TooManyProducers {
        /// The limit.
        max: u32,
    },
}

/// What to do with one stamped batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Write it at the partition's next offset (already remembered as written there).
    Write,
    /// Already written: nothing to write; its first record is at this offset.
    Duplicate {
        /// Offset of the batch's first record.
        base_offset: u64,
    },
    /// Refused; nothing to write.
    Refuse(Refusal),
}

/// One batch written, remembered to answer retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Written {
    sequence: u64,
    count: u32,
    base_offset: u64,
}

/// What a partition remembers of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    epoch: u32,
    next_sequence: u64,
    last_write_ms: u64,
    /// The last batches written, oldest first, at most [`WINDOW_BATCHES`].
    window: VecDeque<Written>,
}

impl ProducerState {
    fn new(epoch: u32) -> Self {
        Self {
            epoch,
            next_sequence: 0,
            last_write_ms: 0,
            window: VecDeque::with_capacity(WINDOW_BATCHES),
        }
    }

    /// Where `sequence .. sequence + count` was written, when one remembered batch holds it.
    fn find(&self, sequence: u64, count: u32) -> Option<u64> {
        let end = sequence.checked_add(u64::from(count))?;
        self.window
            .iter()
            .find(|written| {
                written.sequence <= sequence && end <= written.sequence + u64::from(written.count)
            })
            .map(|written| written.base_offset + (sequence - written.sequence))
    }
}

/// One partition's producer states, with the ids changed since [`Producers::take_changes`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Producers {
    states: BTreeMap<u64, ProducerState>,
    changed: BTreeSet<u64>,
}

impl Producers {
    /// Producers remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    /// Decides about a batch of `count` records stamped `stamp`, applied at `now_ms`, which the
    /// partition would write at `next_offset`; on [`Decision::Write`] the batch is remembered as
    /// written there.
    pub(crate) fn check(
        &mut self,
        stamp: ProducerStamp,
        count: u32,
        next_offset: u64,
        now_ms: u64,
        limits: ProducerLimits,
    ) -> Decision {
        let expired =
            |state: &ProducerState| state.last_write_ms.saturating_add(limits.idle_ms) < now_ms;
        if self.states.get(&stamp.id).is_some_and(expired) {
            self.states.remove(&stamp.id);
            self.changed.insert(stamp.id);
        }
        let state = match self.states.get_mut(&stamp.id) {
            Some(state) => state,
            None => {
                if stamp.sequence != 0 || stamp.id > PRODUCER_ID_MAX {
                    return Decision::Refuse(Refusal::UnknownProducer);
                }
                if self.states.len() >= limits.producers_max as usize {
                    let idle: Vec<u64> = self
                        .states
                        .iter()
                        .filter(|(_, state)| expired(state))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in idle {
                        self.states.remove(&id);
                        self.changed.insert(id);
                    }
                }
                if self.states.len() >= limits.producers_max as usize {
                    // Ties go to the lower id, so every replica forgets the same one.
                    let oldest = self
                        .states
                        .iter()
                        .min_by_key(|(id, state)| (state.last_write_ms, **id))
                        .map(|(id, state)| (*id, state.last_write_ms));
                    match oldest {
                        Some((id, last_write_ms))
                            if last_write_ms.saturating_add(EVICTABLE_IDLE_MS) <= now_ms =>
                        {
                            self.states.remove(&id);
                            self.changed.insert(id);
                        }
                        _ => {
                            return Decision::Refuse(Refusal::TooManyProducers {
                                max: limits.producers_max,
                            });
                        }
                    }
                }
                self.states
                    .entry(stamp.id)
                    .or_insert(ProducerState::new(stamp.epoch))
            }
        };
        if stamp.epoch < state.epoch {
            return Decision::Refuse(Refusal::Fenced {
                current_epoch: state.epoch,
            });
        }
        if stamp.epoch > state.epoch {
            if stamp.sequence != 0 {
                return Decision::Refuse(Refusal::OutOfOrder { expected: 0 });
            }
            *state = ProducerState::new(stamp.epoch);
        }
        let end = stamp.sequence.saturating_add(u64::from(count));
        if stamp.sequence == state.next_sequence {
            state.next_sequence = end;
            state.last_write_ms = state.last_write_ms.max(now_ms);
            if state.window.len() == WINDOW_BATCHES {
                state.window.pop_front();
            }
            state.window.push_back(Written {
                sequence: stamp.sequence,
                count,
                base_offset: next_offset,
            });
            self.changed.insert(stamp.id);
            return Decision::Write;
        }
        if end <= state.next_sequence {
            return match state.find(stamp.sequence, count) {
                Some(base_offset) => Decision::Duplicate { base_offset },
                None => Decision::Refuse(Refusal::SequenceTooOld {
                    expected: state.next_sequence,
                }),
            };
        }
        Decision::Refuse(Refusal::OutOfOrder {
            expected: state.next_sequence,
        })
    }

    /// The ids changed since the last call, each with its state (`None`: forgotten).
    pub(crate) fn take_changes(&mut self) -> Vec<(u64, Option<&ProducerState>)> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .map(|id| (id, self.states.get(&id)))
            .collect()
    }

    /// Every state, by id (for snapshots).
    pub(crate) fn states(&self) -> &BTreeMap<u64, ProducerState> {
        &self.states
    }

    /// Replaces every state (restore at start, or an installed snapshot).
    pub(crate) fn replace(&mut self, states: BTreeMap<u64, ProducerState>) {
        self.states = states;
        self.changed.clear();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: ProducerLimits = ProducerLimits {
        producers_max: 3,
        idle_ms: 1_000,
    };

    fn stamp(id: u64, epoch: u32, sequence: u64) -> ProducerStamp {
        ProducerStamp {
            id,
            epoch,
            sequence,
        }
    }

    /// A partition's producer states with its next offset, as the state machine drives them.
    #[derive(Default)]
    struct Partition {
        producers: Producers,
        next_offset: u64,
    }

    impl Partition {
        fn apply(&mut self, stamp: ProducerStamp, count: u32, now_ms: u64) -> Decision {
            let decision = self
                .producers
                .check(stamp, count, self.next_offset, now_ms, LIMITS);
            if decision == Decision::Write {
                self.next_offset += u64::from(count);
            }
            decision
        }
    }

    /// The next sequence is written; a retry of a remembered batch gets its offsets; a gap is
    /// refused with the expected sequence; a straddling batch is out of order.
    #[test]
    fn sequences_are_checked() {
        let mut partition = Partition::default();
        assert_eq!(partition.apply(stamp(1, 0, 0), 3, 0), Decision::Write);
        assert_eq!(partition.apply(stamp(2, 0, 0), 2, 0), Decision::Write);
        assert_eq!(partition.apply(stamp(1, 0, 3), 1, 0), Decision::Write);
        assert_eq!(
            partition.apply(stamp(1, 0, 0), 3, 0),
            Decision::Duplicate { base_offset: 0 }
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 1), 2, 0),
            Decision::Duplicate { base_offset: 1 },
            "a part of a written batch answers its own offsets"
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 3), 1, 0),
            Decision::Duplicate { base_offset: 5 }
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 9), 1, 0),
            Decision::Refuse(Refusal::OutOfOrder { expected: 4 })
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 3), 2, 0),
            Decision::Refuse(Refusal::OutOfOrder { expected: 4 }),
            "a batch straddling the next sequence"
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 2), 2, 0),
            Decision::Refuse(Refusal::SequenceTooOld { expected: 4 }),
            "a batch spanning two written ones"
        );
        assert_eq!(partition.next_offset, 6);
    }

    /// An older epoch is fenced; a newer one starts over at sequence 0 and nowhere else.
    #[test]
    fn epochs_fence() {
        let mut partition = Partition::default();
        assert_eq!(partition.apply(stamp(1, 0, 0), 1, 0), Decision::Write);
        assert_eq!(
            partition.apply(stamp(1, 1, 1), 1, 0),
            Decision::Refuse(Refusal::OutOfOrder { expected: 0 })
        );
        assert_eq!(partition.apply(stamp(1, 1, 0), 1, 0), Decision::Write);
        assert_eq!(
            partition.apply(stamp(1, 0, 1), 1, 0),
            Decision::Refuse(Refusal::Fenced { current_epoch: 1 })
        );
        assert_eq!(
            partition.apply(stamp(1, 0, 0), 1, 0),
            Decision::Refuse(Refusal::Fenced { current_epoch: 1 }),
            "even a retry of the old epoch's batch"
        );
    }

    /// An unknown producer must start at 0; past the limit idle producers are forgotten and,
    /// when none is idle, a new producer is refused; a forgotten producer is unknown.
    #[test]
    fn producers_are_bounded_and_expire() {
        let mut partition = Partition::default();
        assert_eq!(
            partition.apply(stamp(1, 0, 5), 1, 0),
            Decision::Refuse(Refusal::UnknownProducer)
        );
        assert_eq!(
            partition.apply(stamp(PRODUCER_ID_MAX + 1, 0, 0), 1, 0),
            Decision::Refuse(Refusal::UnknownProducer),
            "an id the store cannot key"
        );
        for id in 1..=3 {
            assert_eq!(
                partition.apply(stamp(id, 0, 0), 1, 100 * id),
                Decision::Write
            );
        }
        assert_eq!(
            partition.apply(stamp(4, 0, 0), 1, 1_000),
            Decision::Refuse(Refusal::TooManyProducers { max: 3 })
        );
        // At 1,150 producer 1 (last write at 100) has been idle for more than 1,000 ms.
        assert_eq!(partition.apply(stamp(4, 0, 0), 1, 1_150), Decision::Write);
        assert_eq!(partition.producers.len(), 3);
        assert_eq!(
            partition.apply(stamp(1, 0, 1), 1, 1_150),
            Decision::Refuse(Refusal::UnknownProducer)
        );
        // Producer 2 wrote at 200; at 5,000 it is forgotten when next seen.
        assert_eq!(
            partition.apply(stamp(2, 0, 1), 1, 5_000),
            Decision::Refuse(Refusal::UnknownProducer)
        );
        let changes = partition.producers.take_changes();
        assert!(changes.contains(&(1, None)) && changes.contains(&(2, None)));
        assert!(partition.producers.take_changes().is_empty());
    }

    /// A full partition whose producers are all within the idle timeout forgets the one idle
    /// longest once it has been idle a minute, and refuses a newcomer before that.
    #[test]
    fn a_full_partition_forgets_the_producer_idle_longest() {
        let limits = ProducerLimits {
            producers_max: 2,
            idle_ms: 7 * 24 * 3600 * 1000,
        };
        let mut producers = Producers::default();
        let mut check =
            |id, sequence, now_ms| producers.check(stamp(id, 0, sequence), 1, 0, now_ms, limits);
        assert_eq!(check(1, 0, 1_000), Decision::Write);
        assert_eq!(check(2, 0, 2_000), Decision::Write);
        assert_eq!(
            check(3, 0, 30_000),
            Decision::Refuse(Refusal::TooManyProducers { max: 2 }),
            "both wrote within the minute"
        );
        assert_eq!(
            check(3, 0, 61_000),
            Decision::Write,
            "producer 1 is forgotten"
        );
        assert_eq!(
            check(1, 1, 61_000),
            Decision::Refuse(Refusal::UnknownProducer)
        );
        assert_eq!(check(2, 1, 61_000), Decision::Write, "producer 2 is kept");
    }

    proptest! {
        /// Any interleaving of first sends, retries of earlier batches and batches sent ahead of
        /// their turn writes each record exactly once, in sequence order: every answer is a
        /// write, the first write's offsets, a refusal naming the expected sequence, or (before
        /// the first write) an unknown producer.
        #[test]
        fn every_sequence_is_written_once(
            counts in prop::collection::vec(1u32..5, 1..12),
            deliveries in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let mut partition = Partition::default();
            let starts: Vec<u64> = counts
                .iter()
                .scan(0u64, |next, count| {
                    let start = *next;
                    *next += u64::from(*count);
                    Some(start)
                })
                .collect();
            // Offsets of each record (by sequence), once written.
            let mut written: BTreeMap<u64, u64> = BTreeMap::new();
            let mut first_offsets: BTreeMap<usize, u64> = BTreeMap::new();
            // Arbitrary deliveries, then the producer's in-order retries of everything.
            let order = deliveries
                .iter()
                .map(|index| index.index(counts.len()))
                .chain(0..counts.len());
            for batch in order {
                let (start, count) = (starts[batch], counts[batch]);
                let before = partition.next_offset;
                match partition.apply(stamp(9, 0, start), count, 0) {
                    Decision::Write => {
                        prop_assert!(first_offsets.insert(batch, before).is_none());
                        for record in 0..u64::from(count) {
                            prop_assert!(written.insert(start + record, before + record).is_none());
                        }
                    }
                    Decision::Duplicate { base_offset } => {
                        prop_assert_eq!(Some(&base_offset), first_offsets.get(&batch));
                    }
                    Decision::Refuse(Refusal::OutOfOrder { expected })
                    | Decision::Refuse(Refusal::SequenceTooOld { expected }) => {
                        prop_assert_eq!(expected, written.len() as u64);
                    }
                    // Before its first write the partition does not know the producer.
                    Decision::Refuse(Refusal::UnknownProducer) => {
                        prop_assert!(written.is_empty());
                    }
                    Decision::Refuse(other) => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            let total: u64 = counts.iter().map(|count| u64::from(*count)).sum();
            prop_assert_eq!(written.len() as u64, total);
            prop_assert_eq!(partition.next_offset, total);
            // Sequence order is offset order.
            prop_assert!(written.iter().all(|(sequence, offset)| sequence == offset));
        }
    }
}
