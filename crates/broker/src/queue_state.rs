//! Queues on the log (issue 14, first step: the pure state, not wired to Raft or gRPC yet): the
//! state of one queue over one partition. Applied through Raft, so `apply` is deterministic: no
//! clock (commands carry the proposer's time), no randomness, no I/O, ordered maps only.
//!
//! A queue hands each message (a record of the partition, by offset) to one consumer at a time
//! under a lease, until the message is acked, or dead-lettered after `max_deliveries`:
//! - **Scanning**: the proposer reads committed records past `scanned` and passes their metadata
//!   (key hash, deliver-at time) with a receive; a message enters the state once, in offset order.
//! - **Receive** leases up to `max` available messages, in offset order: not before their
//!   deliver-at time (delayed delivery, a redelivery delay), within the in-flight bounds, and in
//!   key-ordered mode only the first unfinished message of each key (so a key's messages are
//!   handed out in offset order, one at a time).
//! - **Ack** (by the lease holder) finishes a message for good; **Nack** makes it available again
//!   (after a delay); **Extend** renews a lease; **Reject** dead-letters at once; **Expire** ends
//!   leases past their time (available again, or dead-lettered after `max_deliveries`).
//! - **Dead-lettering** is two steps so nothing vanishes and nothing is both dead-lettered and
//!   redelivered: a message is first marked (never handed out again), the broker writes it to the
//!   dead-letter topic, then `DeadLettered` finishes it.
//! - The **floor** (every offset below it is acked or dead-lettered) only moves up; finished
//!   messages above it are forgotten as the floor passes them.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::Serialize;

/// A queue's settings, as the proposer's configuration has them (validated there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettings {
    /// Deliveries after which a message is dead-lettered instead of made available again.
    pub max_deliveries: u32,
    /// One message per key at a time, in offset order.
    pub key_ordered: bool,
    /// Most messages leased at once on this partition.
    pub in_flight_max: u32,
    /// Most messages one consumer holds at once on this partition.
    pub consumer_in_flight_max: u32,
}

/// What the proposer read of a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Its offset.
    pub offset: u64,
    /// Its key's hash, if it has a key.
    pub key: Option<u64>,
    /// Not handed out before this time (milliseconds since the Unix epoch; 0: at once).
    pub deliver_at_ms: u64,
}

/// Where a message stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// Waiting for a consumer, not before `not_before_ms`.
    Available {
        /// Earliest hand-out time.
        not_before_ms: u64,
    },
    /// Leased to `consumer` until `until_ms`.
    Leased {
        /// The lease holder.
        consumer: String,
        /// When the lease ends.
        until_ms: u64,
    },
    /// To be written to the dead-letter topic; never handed out again.
    DeadLettering {
        /// Why.
        reason: String,
    },
}

/// One unfinished message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its key's hash.
    pub key: Option<u64>,
    /// Times it was handed out.
    pub deliveries: u32,
    /// Where it stands.
    pub standing: Standing,
}

/// A message handed out by a receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Its offset.
    pub offset: u64,
    /// Its delivery count (1 the first time).
    pub deliveries: u32,
    /// When its lease ends.
    pub lease_until_ms: u64,
}

/// Commands of a queue partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// Take in `new` messages (from `scanned` on, in order), then lease up to `max` to
    /// `consumer` for `visibility_ms`.
    Receive {
        /// The consumer.
        consumer: String,
        /// Most messages to lease.
        max: u32,
        /// Messages read since the last scan.
        new: Vec<MessageMeta>,
        /// The proposer's clock.
        now_ms: u64,
        /// Lease length.
        visibility_ms: u64,
        /// The queue's settings.
        settings: QueueSettings,
    },
    /// Finish messages the consumer holds.
    Ack {
        /// The consumer.
        consumer: String,
        /// Offsets.
        offsets: Vec<u64>,
    },
    /// Make held messages available again after `delay_ms`.
    Nack {
        /// The consumer.
        consumer: String,
        /// Offsets.
        offsets: Vec<u64>,
        /// Redelivery delay.
        delay_ms: u64,
        /// The proposer's clock.
        now_ms: u64,
        /// The queue's settings.
        settings: QueueSettings,
    },
    /// Renew held leases.
    Extend {
        /// The consumer.
        consumer: String,
        /// Offsets.
        offsets: Vec<u64>,
        /// The proposer's clock.
        now_ms: u64,
        /// New lease length from now.
        visibility_ms: u64,
    },
    /// Dead-letter held messages at once.
    Reject {
        /// The consumer.
        consumer: String,
        /// Offsets.
        offsets: Vec<u64>,
        /// Why.
        reason: String,
    },
    /// End leases past their time.
    Expire {
        /// The proposer's clock.
        now_ms: u64,
        /// The queue's settings.
        settings: QueueSettings,
    },
    /// These messages are in the dead-letter topic: finish them.
    DeadLettered {
        /// Offsets.
        offsets: Vec<u64>,
    },
}

/// What became of one offset of an ack, nack, extend or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settled {
    /// Done as asked.
    Done,
    /// The consumer does not hold it (its lease ended, or another consumer holds it now).
    NotHeld,
    /// Finished already, or never handed out.
    Unknown,
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueAnswer {
    /// The messages leased.
    Received(Vec<Delivery>),
    /// Per offset, in the command's order.
    Settled(Vec<Settled>),
    /// Leases ended: made available again, and dead-lettered.
    Expired {
        /// Available again.
        redelivered: u32,
        /// Marked for the dead-letter topic.
        dead_lettered: u32,
    },
}

/// The state of one queue over one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Every offset below is acked or dead-lettered.
    pub floor: u64,
    /// Offsets below were taken into the state.
    pub scanned: u64,
    /// Unfinished messages at `floor..scanned`.
    pub messages: BTreeMap<u64, Message>,
}

impl QueueState {
    /// Applies one command. Deterministic.
    pub fn apply(&mut self, command: QueueCommand) -> QueueAnswer {
        match command {
            QueueCommand::Receive {
                consumer,
                max,
                new,
                now_ms,
                visibility_ms,
                settings,
            } => {
                self.scan(new);
                QueueAnswer::Received(self.lease(&consumer, max, now_ms, visibility_ms, settings))
            }
            QueueCommand::Ack { consumer, offsets } => {
                let settled = self.settle(&consumer, &offsets, |_, _| None);
                self.advance_floor();
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Nack {
                consumer,
                offsets,
                delay_ms,
                now_ms,
                settings,
            } => {
                let settled = self.settle(&consumer, &offsets, |message, _| {
                    Some(Self::after_delivery(
                        message,
                        now_ms.saturating_add(delay_ms),
                        settings,
                    ))
                });
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Extend {
                consumer,
                offsets,
                now_ms,
                visibility_ms,
            } => {
                let settled = self.settle(&consumer, &offsets, |message, consumer| {
                    Some(Message {
                        standing: Standing::Leased {
                            consumer: consumer.to_owned(),
                            until_ms: now_ms.saturating_add(visibility_ms),
                        },
                        ..message.clone()
                    })
                });
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Reject {
                consumer,
                offsets,
                reason,
            } => {
                let settled = self.settle(&consumer, &offsets, |message, _| {
                    Some(Message {
                        standing: Standing::DeadLettering {
                            reason: reason.clone(),
                        },
                        ..message.clone()
                    })
                });
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Expire { now_ms, settings } => {
                let (mut redelivered, mut dead_lettered) = (0, 0);
                for message in self.messages.values_mut() {
                    let Standing::Leased { until_ms, .. } = &message.standing else {
                        continue;
                    };
                    if *until_ms > now_ms {
                        continue;
                    }
                    *message = Self::after_delivery(message, now_ms, settings);
                    match message.standing {
                        Standing::DeadLettering { .. } => dead_lettered += 1,
                        _ => redelivered += 1,
                    }
                }
                QueueAnswer::Expired {
                    redelivered,
                    dead_lettered,
                }
            }
            QueueCommand::DeadLettered { offsets } => {
                let settled = offsets
                    .iter()
                    .map(|offset| match self.messages.get(offset) {
                        Some(Message {
                            standing: Standing::DeadLettering { .. },
                            ..
                        }) => {
                            self.messages.remove(offset);
                            Settled::Done
                        }
                        Some(_) => Settled::NotHeld,
                        None => Settled::Unknown,
                    })
                    .collect();
                self.advance_floor();
                QueueAnswer::Settled(settled)
            }
        }
    }

    /// A message whose delivery ended without an ack: available again (not before
    /// `not_before_ms`), or marked for the dead-letter topic once it was delivered
    /// `max_deliveries` times.
    fn after_delivery(message: &Message, not_before_ms: u64, settings: QueueSettings) -> Message {
        let standing = if message.deliveries >= settings.max_deliveries {
            Standing::DeadLettering {
                reason: format!("delivered {} times", message.deliveries),
            }
        } else {
            Standing::Available { not_before_ms }
        };
        Message {
            standing,
            ..message.clone()
        }
    }

    /// Takes in new messages, in offset order from `scanned`; anything else (a stale or
    /// repeated scan) is ignored.
    fn scan(&mut self, new: Vec<MessageMeta>) {
        for meta in new {
            if meta.offset != self.scanned {
                continue;
            }
            self.messages.insert(
                meta.offset,
                Message {
                    key: meta.key,
                    deliveries: 0,
                    standing: Standing::Available {
                        not_before_ms: meta.deliver_at_ms,
                    },
                },
            );
            self.scanned += 1;
        }
    }

    /// Leases up to `max` available messages to `consumer`, in offset order, within the bounds
    /// and, in key-ordered mode, only the first unfinished message of each key.
    fn lease(
        &mut self,
        consumer: &str,
        max: u32,
        now_ms: u64,
        visibility_ms: u64,
        settings: QueueSettings,
    ) -> Vec<Delivery> {
        let leased = |messages: &BTreeMap<u64, Message>, holder: Option<&str>| {
            messages
                .values()
                .filter(|message| match &message.standing {
                    Standing::Leased { consumer, .. } => holder.is_none_or(|h| h == consumer),
                    _ => false,
                })
                .count() as u32
        };
        let room = settings
            .in_flight_max
            .saturating_sub(leased(&self.messages, None))
            .min(
                settings
                    .consumer_in_flight_max
                    .saturating_sub(leased(&self.messages, Some(consumer))),
            )
            .min(max);
        let mut chosen = Vec::new();
        let mut keys_seen = BTreeSet::new();
        for (offset, message) in &self.messages {
            if chosen.len() as u32 >= room {
                break;
            }
            let first_of_key = match message.key {
                Some(key) if settings.key_ordered => keys_seen.insert(key),
                _ => true,
            };
            if let Standing::Available { not_before_ms } = message.standing
                && not_before_ms <= now_ms
                && first_of_key
            {
                chosen.push(*offset);
            }
        }
        let until_ms = now_ms.saturating_add(visibility_ms);
        chosen
            .into_iter()
            .map(|offset| {
                let message = self.messages.get_mut(&offset).expect("chosen from the map");
                message.deliveries += 1;
                message.standing = Standing::Leased {
                    consumer: consumer.to_owned(),
                    until_ms,
                };
                Delivery {
                    offset,
                    deliveries: message.deliveries,
                    lease_until_ms: until_ms,
                }
            })
            .collect()
    }

    /// Applies `change` to each offset `consumer` holds (`None`: finish it), answering per
    /// offset.
    fn settle(
        &mut self,
        consumer: &str,
        offsets: &[u64],
        change: impl Fn(&Message, &str) -> Option<Message>,
    ) -> Vec<Settled> {
        offsets
            .iter()
            .map(|offset| {
                let Some(message) = self.messages.get(offset) else {
                    return Settled::Unknown;
                };
                match &message.standing {
                    Standing::Leased {
                        consumer: holder, ..
                    } if holder == consumer => {
                        match change(message, consumer) {
                            Some(changed) => {
                                self.messages.insert(*offset, changed);
                            }
                            None => {
                                self.messages.remove(offset);
                            }
                        }
                        Settled::Done
                    }
                    _ => Settled::NotHeld,
                }
            })
            .collect()
    }

    /// Moves the floor up to the lowest unfinished message (or `scanned`).
    fn advance_floor(&mut self) {
        let lowest = self.messages.keys().next().copied().unwrap_or(self.scanned);
        self.floor = self.floor.max(lowest);
    }

    /// Messages waiting for the dead-letter topic, with why.
    pub fn dead_lettering(&self) -> Vec<(u64, String)> {
        self.messages
            .iter()
            .filter_map(|(offset, message)| match &message.standing {
                Standing::DeadLettering { reason } => Some((*offset, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// `(available now, leased, delayed)` at `now_ms`.
    pub fn depth(&self, now_ms: u64) -> (u64, u64, u64) {
        let mut depth = (0, 0, 0);
        for message in self.messages.values() {
            match message.standing {
                Standing::Available { not_before_ms } if not_before_ms <= now_ms => depth.0 += 1,
                Standing::Available { .. } => depth.2 += 1,
                Standing::Leased { .. } => depth.1 += 1,
                Standing::DeadLettering { .. } => {}
            }
        }
        depth
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SETTINGS: QueueSettings = QueueSettings {
        max_deliveries: 3,
        key_ordered: false,
        in_flight_max: 100,
        consumer_in_flight_max: 10,
    };

    fn metas(from: u64, count: u64, keys: u64) -> Vec<MessageMeta> {
        (from..from + count)
            .map(|offset| MessageMeta {
                offset,
                key: (keys > 0).then_some(offset % keys.max(1)),
                deliver_at_ms: 0,
            })
            .collect()
    }

    fn receive(
        state: &mut QueueState,
        consumer: &str,
        max: u32,
        new: Vec<MessageMeta>,
        now_ms: u64,
        settings: QueueSettings,
    ) -> Vec<Delivery> {
        match state.apply(QueueCommand::Receive {
            consumer: consumer.to_owned(),
            max,
            new,
            now_ms,
            visibility_ms: 1_000,
            settings,
        }) {
            QueueAnswer::Received(deliveries) => deliveries,
            other => panic!("a receive answers deliveries, not {other:?}"),
        }
    }

    fn offsets(deliveries: &[Delivery]) -> Vec<u64> {
        deliveries.iter().map(|delivery| delivery.offset).collect()
    }

    /// Each message goes to one consumer; an ack finishes it and moves the floor; a lease that
    /// expires makes it available again with its count raised; after max_deliveries it is marked
    /// for the dead-letter topic, never handed out again, and finished once written there.
    #[test]
    fn leases_acks_redeliveries_and_dead_letters() {
        let mut state = QueueState::default();
        let a = receive(&mut state, "a", 3, metas(0, 5, 0), 0, SETTINGS);
        assert_eq!(offsets(&a), [0, 1, 2]);
        let b = receive(&mut state, "b", 5, Vec::new(), 0, SETTINGS);
        assert_eq!(offsets(&b), [3, 4], "each message to one consumer");
        // b cannot ack a's messages.
        assert_eq!(
            state.apply(QueueCommand::Ack {
                consumer: "b".into(),
                offsets: vec![0, 3],
            }),
            QueueAnswer::Settled(vec![Settled::NotHeld, Settled::Done])
        );
        assert_eq!(state.floor, 0);
        state.apply(QueueCommand::Ack {
            consumer: "a".into(),
            offsets: vec![0, 1],
        });
        assert_eq!(state.floor, 2, "the floor is the lowest unfinished message");
        // a's lease on 2 and b's on 4 expire: both available again, counted.
        assert_eq!(
            state.apply(QueueCommand::Expire {
                now_ms: 1_000,
                settings: SETTINGS
            }),
            QueueAnswer::Expired {
                redelivered: 2,
                dead_lettered: 0
            }
        );
        let again = receive(&mut state, "c", 10, Vec::new(), 1_000, SETTINGS);
        assert_eq!(offsets(&again), [2, 4]);
        assert!(again.iter().all(|delivery| delivery.deliveries == 2));
        // A poison message nacked until max_deliveries goes to the dead-letter topic.
        let nack = |state: &mut QueueState| {
            state.apply(QueueCommand::Nack {
                consumer: "c".into(),
                offsets: vec![2],
                delay_ms: 0,
                now_ms: 1_000,
                settings: SETTINGS,
            })
        };
        nack(&mut state);
        assert_eq!(
            offsets(&receive(&mut state, "c", 1, Vec::new(), 1_000, SETTINGS)),
            [2]
        );
        nack(&mut state);
        assert_eq!(
            state.dead_lettering(),
            vec![(2, "delivered 3 times".to_owned())]
        );
        assert!(
            receive(&mut state, "c", 10, Vec::new(), 9_999, SETTINGS).is_empty(),
            "a message being dead-lettered is never handed out"
        );
        state.apply(QueueCommand::Ack {
            consumer: "c".into(),
            offsets: vec![4],
        });
        assert_eq!(state.floor, 2, "the floor waits for the dead-letter write");
        state.apply(QueueCommand::DeadLettered { offsets: vec![2] });
        assert_eq!(state.floor, 5);
        assert!(state.messages.is_empty());
    }

    /// Delayed messages wait for their time; a nack with a delay too; an extended lease does
    /// not expire at its old time.
    #[test]
    fn delays_and_extensions() {
        let mut state = QueueState::default();
        let mut new = metas(0, 2, 0);
        new[0].deliver_at_ms = 500;
        assert_eq!(
            offsets(&receive(&mut state, "a", 10, new, 0, SETTINGS)),
            [1]
        );
        assert_eq!(
            offsets(&receive(&mut state, "a", 10, Vec::new(), 500, SETTINGS)),
            [0]
        );
        state.apply(QueueCommand::Extend {
            consumer: "a".into(),
            offsets: vec![0],
            now_ms: 1_400,
            visibility_ms: 1_000,
        });
        state.apply(QueueCommand::Expire {
            now_ms: 1_600,
            settings: SETTINGS,
        });
        assert_eq!(state.depth(1_600), (1, 1, 0), "1 expired, 0 still leased");
        state.apply(QueueCommand::Nack {
            consumer: "a".into(),
            offsets: vec![0],
            delay_ms: 300,
            now_ms: 1_600,
            settings: SETTINGS,
        });
        assert_eq!(state.depth(1_600), (1, 0, 1));
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 1_600, SETTINGS)),
            [1]
        );
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 1_900, SETTINGS)),
            [0]
        );
    }

    /// In key-ordered mode a key's next message waits until the one before it is finished.
    #[test]
    fn key_order_holds_one_message_per_key() {
        let settings = QueueSettings {
            key_ordered: true,
            ..SETTINGS
        };
        let mut state = QueueState::default();
        // Keys 0, 1, 0, 1, 0, 1.
        let first = receive(&mut state, "a", 10, metas(0, 6, 2), 0, settings);
        assert_eq!(offsets(&first), [0, 1]);
        assert!(receive(&mut state, "b", 10, Vec::new(), 0, settings).is_empty());
        state.apply(QueueCommand::Ack {
            consumer: "a".into(),
            offsets: vec![1],
        });
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 0, settings)),
            [3]
        );
    }

    proptest! {
        /// Under any commands: a message acked (or dead-lettered) is never handed out again; the
        /// floor never moves back and everything below it is finished; a message is never
        /// delivered more than max_deliveries times; in key-ordered mode no two messages of one
        /// key are leased at once and a key's messages are first handed out in offset order.
        #[test]
        fn queue_invariants(
            key_ordered in any::<bool>(),
            steps in prop::collection::vec((0u8..6, 0usize..4, 0u64..40, 1u32..5), 1..120),
        ) {
            let settings = QueueSettings { key_ordered, max_deliveries: 3, in_flight_max: 6, consumer_in_flight_max: 3 };
            let consumers = ["a", "b", "c", "d"];
            let mut state = QueueState::default();
            let mut finished: BTreeSet<u64> = BTreeSet::new();
            let mut first_delivered: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut now = 0u64;
            let mut produced = 0u64;
            for (action, who, pick, count) in steps {
                now += 100;
                let consumer = consumers[who];
                let floor = state.floor;
                match action {
                    0 | 1 => {
                        let new = metas(produced, u64::from(count), 3);
                        produced += u64::from(count);
                        let deliveries = receive(&mut state, consumer, count, new, now, settings);
                        for delivery in deliveries {
                            prop_assert!(!finished.contains(&delivery.offset), "finished {} handed out", delivery.offset);
                            prop_assert!(delivery.deliveries <= settings.max_deliveries);
                            if delivery.deliveries == 1 {
                                first_delivered.entry(delivery.offset % 3).or_default().push(delivery.offset);
                            }
                        }
                    }
                    2 => {
                        let offsets: Vec<u64> = state.messages.keys().copied().filter(|o| o % 5 == pick % 5).collect();
                        if let QueueAnswer::Settled(settled) = state.apply(QueueCommand::Ack { consumer: consumer.into(), offsets: offsets.clone() }) {
                            for (offset, outcome) in offsets.iter().zip(settled) {
                                if outcome == Settled::Done { finished.insert(*offset); }
                            }
                        }
                    }
                    3 => {
                        let offsets: Vec<u64> = state.messages.keys().copied().filter(|o| o % 3 == pick % 3).collect();
                        state.apply(QueueCommand::Nack { consumer: consumer.into(), offsets, delay_ms: pick * 10, now_ms: now, settings });
                    }
                    4 => {
                        state.apply(QueueCommand::Expire { now_ms: now + pick * 100, settings });
                    }
                    _ => {
                        let offsets: Vec<u64> = state.dead_lettering().into_iter().map(|(offset, _)| offset).collect();
                        finished.extend(offsets.iter().copied());
                        state.apply(QueueCommand::DeadLettered { offsets });
                    }
                }
                prop_assert!(state.floor >= floor, "the floor moved back");
                for offset in 0..state.floor {
                    prop_assert!(!state.messages.contains_key(&offset));
                }
                if key_ordered {
                    let mut leased_keys = BTreeSet::new();
                    for message in state.messages.values() {
                        if matches!(message.standing, Standing::Leased { .. }) {
                            prop_assert!(leased_keys.insert(message.key), "two messages of one key leased");
                        }
                    }
                    for offsets in first_delivered.values() {
                        prop_assert!(offsets.windows(2).all(|pair| pair[0] < pair[1]), "key order broken: {:?}", offsets);
                    }
                }
            }
        }
    }
}
