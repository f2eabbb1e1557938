//! Queues on the log: the state of one queue over one partition, applied through the queue
//! partition's Raft group (a state group beside the topic's partition, on the same replicas).
//! Deterministic: no clock (commands carry the proposer's time), no randomness, no I/O, ordered
//! maps only.
//!
//! A queue hands each message (a record of the partition, by offset) to one consumer at a time
//! under a lease, until the message is acked, or dead-lettered after `max_deliveries`:
//! - **Scanning**: the proposer reads committed records past `scanned` and passes their metadata
//!   (key hash, deliver-at time, size) with a receive; a message enters the state once, in offset
//!   order, and only as far as receives need (so the state holds what is in flight, waiting, or
//!   blocked, not the whole backlog).
//! - **Receive** leases up to `max` available messages (and about `max_bytes`), in offset order:
//!   not before their deliver-at time (delayed delivery, a redelivery delay), within the
//!   partition's in-flight bound, and in key-ordered mode only the first unfinished message of
//!   each key (so a key's messages are handed out in offset order, one at a time).
//! - A delivery's **receipt** is `(offset, delivery count)`: only the holder of the current
//!   delivery can settle it, so an ack after the lease ended (and the message went to someone
//!   else) is refused, never applied to the newer delivery.
//! - **Ack** finishes a message for good; **Nack** makes it available again (after a delay);
//!   **Extend** renews a lease; **Reject** dead-letters at once; **Expire** ends leases past their
//!   time (available again, or dead-lettered after `max_deliveries`).
//! - **Dead-lettering** is two steps so nothing vanishes and nothing is both dead-lettered and
//!   redelivered: a message is first marked (never handed out again), the broker writes it to the
//!   dead-letter topic, then `DeadLettered` finishes it.
//! - The **floor** (every offset below it is acked or dead-lettered) only moves up.
//!
//! Each message is one row of the group's store (row id = offset), written when it changes; the
//! floor, scan point and counters are the group's small state.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;

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
    /// Its size (key, value and headers), for the consumers' byte bounds.
    pub bytes: u32,
    /// Its timestamp (milliseconds since the Unix epoch), for the queue's oldest age.
    pub timestamp_ms: u64,
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
    /// Its size.
    pub bytes: u32,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Where it stands.
    pub standing: Standing,
}

/// Proof of one delivery: only the current delivery of a message settles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Receipt {
    /// The message's offset.
    pub offset: u64,
    /// Its delivery count when handed out.
    pub delivery: u32,
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

/// What one consumer holds on the partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Messages leased to it.
    pub messages: u32,
    /// Their bytes.
    pub bytes: u64,
}

/// Commands of a queue partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// Take in `new` messages (from `scanned` on, in order), then lease up to `max` messages and
    /// about `max_bytes` (at least one message when any is available) to `consumer` for
    /// `visibility_ms`.
    Receive {
        /// The consumer.
        consumer: String,
        /// Most messages to lease.
        max: u32,
        /// Most bytes to lease (past by one message at most).
        max_bytes: u64,
        /// Messages read since the last scan.
        new: Vec<MessageMeta>,
        /// Only offsets below this are leased: what the proposer can read and hand over now
        /// (its replica's end), so nothing is leased that its consumer never gets.
        readable_below: u64,
        /// The proposer's clock.
        now_ms: u64,
        /// Lease length.
        visibility_ms: u64,
        /// The queue's settings.
        settings: QueueSettings,
    },
    /// Finish delivered messages.
    Ack {
        /// Their receipts.
        receipts: Vec<Receipt>,
    },
    /// Make delivered messages available again after `delay_ms`.
    Nack {
        /// Their receipts.
        receipts: Vec<Receipt>,
        /// Redelivery delay.
        delay_ms: u64,
        /// The proposer's clock.
        now_ms: u64,
        /// The queue's settings.
        settings: QueueSettings,
    },
    /// Renew leases.
    Extend {
        /// Their receipts.
        receipts: Vec<Receipt>,
        /// The proposer's clock.
        now_ms: u64,
        /// New lease length from now.
        visibility_ms: u64,
    },
    /// Dead-letter delivered messages at once.
    Reject {
        /// Their receipts.
        receipts: Vec<Receipt>,
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

/// What became of one receipt of an ack, nack, extend or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settled {
    /// Done as asked.
    Done,
    /// Not the current delivery: its lease ended (the message may be with another consumer now,
    /// or waiting for one).
    NotHeld,
    /// Finished already (acked, dead-lettered), or never handed out.
    Unknown,
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueAnswer {
    /// The messages leased, and what the consumer holds now.
    Received {
        /// The new leases.
        deliveries: Vec<Delivery>,
        /// Everything the consumer holds on the partition now.
        held: Held,
    },
    /// Per receipt, in the command's order.
    Settled(Vec<Settled>),
    /// Leases ended: made available again, and dead-lettered.
    Expired {
        /// Available again.
        redelivered: u32,
        /// Marked for the dead-letter topic.
        dead_lettered: u32,
    },
    /// The command could not be decoded (a node of another version proposed it).
    Undecodable(String),
}

/// Counters since the queue was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// Messages acked.
    pub acked: u64,
    /// Deliveries after the first (a lease expired or a nack before).
    pub redeliveries: u64,
    /// Leases that expired.
    pub lease_expiries: u64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: u64,
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
    /// Counters.
    pub counters: QueueCounters,
    /// Messages changed since the last `take_changes` (rows to rewrite or delete).
    #[serde(skip)]
    changed: BTreeSet<u64>,
    /// Indexes over `messages`, kept in step by [`QueueState::put`] and
    /// [`QueueState::take`] (rebuilt on restore), so a lease, a wait and the queue loop cost
    /// what they touch, not the whole state.
    #[serde(skip)]
    index: Index,
}

/// What `QueueState` derives from its messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Index {
    /// Offsets of available messages (delayed ones included).
    available: BTreeSet<u64>,
    /// `(not before, offset)` of available messages.
    available_times: BTreeSet<(u64, u64)>,
    /// `(lease end, offset)` of leased messages.
    leases: BTreeSet<(u64, u64)>,
    /// What each consumer holds.
    holders: BTreeMap<String, Held>,
    /// Unfinished offsets per key.
    keys: BTreeMap<u64, BTreeSet<u64>>,
    /// Offsets waiting for the dead-letter topic.
    dead_lettering: BTreeSet<u64>,
}

/// Depth of a queue partition at some time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Available now (scanned).
    pub available: u64,
    /// Leased.
    pub in_flight: u64,
    /// Waiting for their deliver-at time or redelivery delay.
    pub delayed: u64,
    /// Waiting for the dead-letter topic write.
    pub dead_lettering: u64,
    /// Timestamp of the oldest unfinished message in the state, if any.
    pub oldest_timestamp_ms: Option<u64>,
}

impl QueueState {
    /// Applies one command. Deterministic.
    pub fn apply(&mut self, command: QueueCommand) -> QueueAnswer {
        match command {
            QueueCommand::Receive {
                consumer,
                max,
                max_bytes,
                new,
                readable_below,
                now_ms,
                visibility_ms,
                settings,
            } => {
                self.scan(new);
                let chosen =
                    self.choose(&consumer, max, max_bytes, readable_below, now_ms, settings);
                let until_ms = now_ms.saturating_add(visibility_ms);
                let deliveries = chosen
                    .into_iter()
                    .map(|offset| {
                        let mut message = self.take(offset).expect("chosen from the map");
                        message.deliveries += 1;
                        if message.deliveries > 1 {
                            self.counters.redeliveries += 1;
                        }
                        message.standing = Standing::Leased {
                            consumer: consumer.clone(),
                            until_ms,
                        };
                        let deliveries = message.deliveries;
                        self.put(offset, message);
                        Delivery {
                            offset,
                            deliveries,
                            lease_until_ms: until_ms,
                        }
                    })
                    .collect();
                QueueAnswer::Received {
                    deliveries,
                    held: self.held(&consumer),
                }
            }
            QueueCommand::Ack { receipts } => {
                let settled = self.settle(&receipts, |_| None);
                let acked = settled.iter().filter(|s| **s == Settled::Done).count() as u64;
                self.counters.acked += acked;
                self.advance_floor();
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Nack {
                receipts,
                delay_ms,
                now_ms,
                settings,
            } => {
                let settled = self.settle(&receipts, |message| {
                    Some(Self::after_delivery(
                        message,
                        now_ms.saturating_add(delay_ms),
                        settings,
                    ))
                });
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Extend {
                receipts,
                now_ms,
                visibility_ms,
            } => {
                let settled = self.settle(&receipts, |message| {
                    let Standing::Leased { consumer, .. } = &message.standing else {
                        return Some(message.clone());
                    };
                    Some(Message {
                        standing: Standing::Leased {
                            consumer: consumer.clone(),
                            until_ms: now_ms.saturating_add(visibility_ms),
                        },
                        ..message.clone()
                    })
                });
                QueueAnswer::Settled(settled)
            }
            QueueCommand::Reject { receipts, reason } => {
                let settled = self.settle(&receipts, |message| {
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
                let ended: Vec<u64> = self
                    .index
                    .leases
                    .iter()
                    .take_while(|(until_ms, _)| *until_ms <= now_ms)
                    .map(|(_, offset)| *offset)
                    .collect();
                for offset in ended {
                    let message = self.take(offset).expect("indexed leases are messages");
                    let message = Self::after_delivery(&message, now_ms, settings);
                    match message.standing {
                        Standing::DeadLettering { .. } => dead_lettered += 1,
                        _ => redelivered += 1,
                    }
                    self.put(offset, message);
                }
                self.counters.lease_expiries += u64::from(redelivered + dead_lettered);
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
                            self.take(*offset);
                            self.counters.dead_lettered += 1;
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

    /// Takes in new messages, in offset order from `scanned`; offsets below it (a stale or
    /// repeated scan) are ignored. A scan that starts past `scanned` skips the offsets between:
    /// the proposer found no records there (retention deleted them; offsets are otherwise
    /// dense), and a proposal never starts past what it read as `scanned` otherwise.
    fn scan(&mut self, new: Vec<MessageMeta>) {
        for meta in new {
            if meta.offset < self.scanned {
                continue;
            }
            self.scanned = meta.offset;
            self.put(
                meta.offset,
                Message {
                    key: meta.key,
                    deliveries: 0,
                    bytes: meta.bytes,
                    timestamp_ms: meta.timestamp_ms,
                    standing: Standing::Available {
                        not_before_ms: meta.deliver_at_ms,
                    },
                },
            );
            self.scanned += 1;
        }
    }

    /// The offsets a receive would lease now (read-only): up to `max` available messages below
    /// `below` in offset order and about `max_bytes`, within the partition's in-flight bound
    /// and, in key-ordered mode, only the first unfinished message of each key.
    pub fn choose(
        &self,
        _consumer: &str,
        max: u32,
        max_bytes: u64,
        below: u64,
        now_ms: u64,
        settings: QueueSettings,
    ) -> Vec<u64> {
        let leased = self.index.leases.len() as u32;
        let room = settings.in_flight_max.saturating_sub(leased).min(max);
        let mut chosen = Vec::new();
        let mut bytes = 0u64;
        for offset in self.index.available.range(..below) {
            if chosen.len() as u32 >= room {
                break;
            }
            let message = &self.messages[offset];
            let Standing::Available { not_before_ms } = message.standing else {
                continue;
            };
            if not_before_ms > now_ms {
                continue;
            }
            if settings.key_ordered
                && let Some(key) = message.key
                && self.index.keys[&key].first() != Some(offset)
            {
                continue;
            }
            let size = u64::from(message.bytes);
            if !chosen.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            chosen.push(*offset);
        }
        chosen
    }

    /// What `consumer` holds.
    pub fn held(&self, consumer: &str) -> Held {
        self.index
            .holders
            .get(consumer)
            .copied()
            .unwrap_or_default()
    }

    /// Sets a message (new, or taken out with [`QueueState::take`]) and indexes it.
    fn put(&mut self, offset: u64, message: Message) {
        let index = &mut self.index;
        match &message.standing {
            Standing::Available { not_before_ms } => {
                index.available.insert(offset);
                index.available_times.insert((*not_before_ms, offset));
            }
            Standing::Leased { consumer, until_ms } => {
                index.leases.insert((*until_ms, offset));
                let held = index.holders.entry(consumer.clone()).or_default();
                held.messages += 1;
                held.bytes += u64::from(message.bytes);
            }
            Standing::DeadLettering { .. } => {
                index.dead_lettering.insert(offset);
            }
        }
        if let Some(key) = message.key {
            index.keys.entry(key).or_default().insert(offset);
        }
        self.changed.insert(offset);
        self.messages.insert(offset, message);
    }

    /// Removes a message and its index entries.
    fn take(&mut self, offset: u64) -> Option<Message> {
        let message = self.messages.remove(&offset)?;
        let index = &mut self.index;
        match &message.standing {
            Standing::Available { not_before_ms } => {
                index.available.remove(&offset);
                index.available_times.remove(&(*not_before_ms, offset));
            }
            Standing::Leased { consumer, until_ms } => {
                index.leases.remove(&(*until_ms, offset));
                if let Some(held) = index.holders.get_mut(consumer) {
                    held.messages -= 1;
                    held.bytes -= u64::from(message.bytes);
                    if held.messages == 0 {
                        index.holders.remove(consumer);
                    }
                }
            }
            Standing::DeadLettering { .. } => {
                index.dead_lettering.remove(&offset);
            }
        }
        if let Some(key) = message.key
            && let Some(offsets) = index.keys.get_mut(&key)
        {
            offsets.remove(&offset);
            if offsets.is_empty() {
                index.keys.remove(&key);
            }
        }
        self.changed.insert(offset);
        Some(message)
    }

    /// Rebuilds the indexes from the messages (after a restore).
    fn reindex(&mut self) {
        let messages = std::mem::take(&mut self.messages);
        self.index = Index::default();
        for (offset, message) in messages {
            self.put(offset, message);
        }
        self.changed.clear();
    }

    /// Applies `change` to each message whose current delivery the receipt names (`None`:
    /// finish it), answering per receipt.
    fn settle(
        &mut self,
        receipts: &[Receipt],
        change: impl Fn(&Message) -> Option<Message>,
    ) -> Vec<Settled> {
        receipts
            .iter()
            .map(|receipt| {
                let Some(message) = self.messages.get(&receipt.offset) else {
                    return Settled::Unknown;
                };
                if !matches!(message.standing, Standing::Leased { .. })
                    || message.deliveries != receipt.delivery
                {
                    return Settled::NotHeld;
                }
                let changed = change(message);
                self.take(receipt.offset);
                if let Some(changed) = changed {
                    self.put(receipt.offset, changed);
                }
                Settled::Done
            })
            .collect()
    }

    /// Moves the floor up to the lowest unfinished message (or `scanned`).
    fn advance_floor(&mut self) {
        let lowest = self.messages.keys().next().copied().unwrap_or(self.scanned);
        self.floor = self.floor.max(lowest);
    }

    /// Messages waiting for the dead-letter topic: `(offset, deliveries, why)`.
    pub fn dead_lettering(&self) -> Vec<(u64, u32, String)> {
        self.index
            .dead_lettering
            .iter()
            .filter_map(|offset| match &self.messages[offset] {
                Message {
                    standing: Standing::DeadLettering { reason },
                    deliveries,
                    ..
                } => Some((*offset, *deliveries, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// Whether any message waits for the dead-letter topic.
    pub fn has_dead_letters(&self) -> bool {
        !self.index.dead_lettering.is_empty()
    }

    /// The earliest time after `now_ms` a delayed message becomes available (`None`: none
    /// waits).
    pub fn next_due_after(&self, now_ms: u64) -> Option<u64> {
        let after = now_ms.checked_add(1)?;
        self.index
            .available_times
            .range((after, 0)..)
            .next()
            .map(|(not_before_ms, _)| *not_before_ms)
    }

    /// The earliest lease end, if any message is leased.
    pub fn next_lease_end(&self) -> Option<u64> {
        self.index.leases.first().map(|(until_ms, _)| *until_ms)
    }

    /// Whether the indexes agree with the messages (for tests).
    #[cfg(test)]
    fn index_is_consistent(&self) -> bool {
        let mut rebuilt = self.clone();
        rebuilt.reindex();
        rebuilt.index == self.index
    }

    /// Where the messages stand at `now_ms`.
    pub fn depth(&self, now_ms: u64) -> Depth {
        let mut depth = Depth::default();
        for message in self.messages.values() {
            match message.standing {
                Standing::Available { not_before_ms } if not_before_ms <= now_ms => {
                    depth.available += 1;
                }
                Standing::Available { .. } => depth.delayed += 1,
                Standing::Leased { .. } => depth.in_flight += 1,
                Standing::DeadLettering { .. } => depth.dead_lettering += 1,
            }
            depth.oldest_timestamp_ms = Some(
                depth
                    .oldest_timestamp_ms
                    .map_or(message.timestamp_ms, |oldest| {
                        oldest.min(message.timestamp_ms)
                    }),
            );
        }
        depth
    }
}

/// The persisted state outside the message rows.
#[derive(Serialize, Deserialize)]
struct Header {
    floor: u64,
    scanned: u64,
    counters: QueueCounters,
}

/// A queue partition's state shared between its Raft group (which applies commands) and the
/// queue service (which reads it on the leader, and waits on `changed` for new state). The lock
/// is held only for an apply or a read.
#[derive(Debug, Clone)]
pub struct SharedQueue {
    state: Arc<Mutex<QueueState>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for SharedQueue {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            changed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl SharedQueue {
    /// Runs `read` on the state.
    pub fn read<T>(&self, read: impl FnOnce(&QueueState) -> T) -> T {
        read(&self.state.lock().expect("queue lock is never poisoned"))
    }

    fn write<T>(&self, write: impl FnOnce(&mut QueueState) -> T) -> T {
        write(&mut self.state.lock().expect("queue lock is never poisoned"))
    }

    /// Changes each time a command is applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes whoever waits on [`SharedQueue::subscribe`] without a change of state.
    pub fn touch(&self) {
        self.changed.send_modify(|version| *version += 1);
    }
}

impl ordo_raft::StateApply for SharedQueue {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let answer = match postcard::from_bytes::<QueueCommand>(command) {
            Ok(command) => self.write(|state| state.apply(command)),
            Err(error) => QueueAnswer::Undecodable(error.to_string()),
        };
        self.changed.send_replace(index);
        postcard::to_stdvec(&answer).expect("an answer always encodes")
    }

    fn take_changes(&mut self) -> Vec<(u64, Option<Vec<u8>>)> {
        self.write(|state| {
            let changed = std::mem::take(&mut state.changed);
            changed
                .into_iter()
                .map(|offset| {
                    let bytes = state.messages.get(&offset).map(|message| {
                        postcard::to_stdvec(message).expect("a message always encodes")
                    });
                    (offset, bytes)
                })
                .collect()
        })
    }

    fn encode_state(&self) -> Vec<u8> {
        self.read(|state| {
            postcard::to_stdvec(&Header {
                floor: state.floor,
                scanned: state.scanned,
                counters: state.counters,
            })
            .expect("a header always encodes")
        })
    }

    fn rows(&self) -> Vec<(u64, Vec<u8>)> {
        self.read(|state| {
            state
                .messages
                .iter()
                .map(|(offset, message)| {
                    (
                        *offset,
                        postcard::to_stdvec(message).expect("a message always encodes"),
                    )
                })
                .collect()
        })
    }

    fn restore(
        &mut self,
        header: &[u8],
        rows: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), ordo_raft::MetaRestoreError> {
        let undecodable =
            |error: postcard::Error| ordo_raft::MetaRestoreError::Undecodable(error.into());
        // A group that never applied a command has no header yet.
        let header: Header = if header.is_empty() {
            Header {
                floor: 0,
                scanned: 0,
                counters: QueueCounters::default(),
            }
        } else {
            postcard::from_bytes(header).map_err(undecodable)?
        };
        let mut messages = BTreeMap::new();
        for (offset, bytes) in rows {
            messages.insert(offset, postcard::from_bytes(&bytes).map_err(undecodable)?);
        }
        self.write(|state| {
            *state = QueueState {
                floor: header.floor,
                scanned: header.scanned,
                messages,
                counters: header.counters,
                changed: BTreeSet::new(),
                index: Index::default(),
            };
            state.reindex();
        });
        self.changed.send_modify(|version| *version += 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ordo_raft::StateApply;
    use proptest::prelude::*;

    use super::*;

    const SETTINGS: QueueSettings = QueueSettings {
        max_deliveries: 3,
        key_ordered: false,
        in_flight_max: 100,
    };

    fn metas(from: u64, count: u64, keys: u64) -> Vec<MessageMeta> {
        (from..from + count)
            .map(|offset| MessageMeta {
                offset,
                key: (keys > 0).then_some(offset % keys.max(1)),
                deliver_at_ms: 0,
                bytes: 10,
                timestamp_ms: offset,
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
            max_bytes: u64::MAX,
            new,
            readable_below: u64::MAX,
            now_ms,
            visibility_ms: 1_000,
            settings,
        }) {
            QueueAnswer::Received { deliveries, held } => {
                assert_eq!(held, state.held(consumer));
                deliveries
            }
            other => panic!("a receive answers deliveries, not {other:?}"),
        }
    }

    fn offsets(deliveries: &[Delivery]) -> Vec<u64> {
        deliveries.iter().map(|delivery| delivery.offset).collect()
    }

    fn receipts(deliveries: &[Delivery]) -> Vec<Receipt> {
        deliveries
            .iter()
            .map(|delivery| Receipt {
                offset: delivery.offset,
                delivery: delivery.deliveries,
            })
            .collect()
    }

    fn ack(state: &mut QueueState, receipts: Vec<Receipt>) -> QueueAnswer {
        state.apply(QueueCommand::Ack { receipts })
    }

    /// A scan that starts past `scanned` (retention deleted the records between) skips those
    /// offsets; a stale or repeated scan is still ignored.
    #[test]
    fn scans_skip_offsets_retention_deleted() {
        let mut state = QueueState::default();
        let first = receive(&mut state, "a", 10, metas(0, 3, 0), 0, SETTINGS);
        assert_eq!(offsets(&first), [0, 1, 2]);
        let after_gap = receive(&mut state, "a", 10, metas(100, 2, 0), 0, SETTINGS);
        assert_eq!(
            offsets(&after_gap),
            [100, 101],
            "offsets 3..100 are skipped"
        );
        assert_eq!(state.scanned, 102);
        let stale = receive(&mut state, "a", 10, metas(50, 10, 0), 0, SETTINGS);
        assert!(
            stale.is_empty(),
            "a stale scan below scanned takes nothing in"
        );
        assert_eq!(state.scanned, 102);
    }

    /// Each message goes to one consumer; an ack finishes it and moves the floor; a lease that
    /// expires makes it available again with its count raised, and the old receipt no longer
    /// settles it; after max_deliveries it is marked for the dead-letter topic, never handed
    /// out again, and finished once written there.
    #[test]
    fn leases_acks_redeliveries_and_dead_letters() {
        let mut state = QueueState::default();
        let a = receive(&mut state, "a", 3, metas(0, 5, 0), 0, SETTINGS);
        assert_eq!(offsets(&a), [0, 1, 2]);
        let b = receive(&mut state, "b", 5, Vec::new(), 0, SETTINGS);
        assert_eq!(offsets(&b), [3, 4], "each message to one consumer");
        assert_eq!(state.held("a").messages, 3);
        // A receipt with the wrong delivery count settles nothing.
        assert_eq!(
            ack(
                &mut state,
                vec![Receipt {
                    offset: 0,
                    delivery: 2
                }]
            ),
            QueueAnswer::Settled(vec![Settled::NotHeld])
        );
        assert_eq!(
            ack(&mut state, receipts(&a[..2])),
            QueueAnswer::Settled(vec![Settled::Done, Settled::Done])
        );
        assert_eq!(state.floor, 2, "the floor is the lowest unfinished message");
        assert_eq!(state.counters.acked, 2);
        // a's lease on 2 and b's on 3, 4 expire: available again, counted.
        assert_eq!(
            state.apply(QueueCommand::Expire {
                now_ms: 1_000,
                settings: SETTINGS
            }),
            QueueAnswer::Expired {
                redelivered: 3,
                dead_lettered: 0
            }
        );
        assert_eq!(
            ack(&mut state, receipts(&a[2..])),
            QueueAnswer::Settled(vec![Settled::NotHeld]),
            "an ack after the lease ended is refused"
        );
        let again = receive(&mut state, "c", 10, Vec::new(), 1_000, SETTINGS);
        assert_eq!(offsets(&again), [2, 3, 4]);
        assert!(again.iter().all(|delivery| delivery.deliveries == 2));
        assert_eq!(state.counters.redeliveries, 3);
        // A poison message nacked until max_deliveries goes to the dead-letter topic.
        let nack = |state: &mut QueueState, delivery: u32| {
            state.apply(QueueCommand::Nack {
                receipts: vec![Receipt {
                    offset: 2,
                    delivery,
                }],
                delay_ms: 0,
                now_ms: 1_000,
                settings: SETTINGS,
            })
        };
        nack(&mut state, 2);
        assert_eq!(
            offsets(&receive(&mut state, "c", 1, Vec::new(), 1_000, SETTINGS)),
            [2]
        );
        nack(&mut state, 3);
        assert_eq!(
            state.dead_lettering(),
            vec![(2, 3, "delivered 3 times".to_owned())]
        );
        assert!(
            receive(&mut state, "c", 10, Vec::new(), 9_999, SETTINGS).is_empty(),
            "a message being dead-lettered is never handed out"
        );
        ack(&mut state, receipts(&again[1..]));
        assert_eq!(state.floor, 2, "the floor waits for the dead-letter write");
        state.apply(QueueCommand::DeadLettered { offsets: vec![2] });
        assert_eq!(state.floor, 5);
        assert!(state.messages.is_empty());
        assert_eq!(state.counters.dead_lettered, 1);
    }

    /// Delayed messages wait for their time; a nack with a delay too; an extended lease does
    /// not expire at its old time; a receive stops at its byte bound (one message at least).
    #[test]
    fn delays_extensions_and_bytes() {
        let mut state = QueueState::default();
        let mut new = metas(0, 2, 0);
        new[0].deliver_at_ms = 500;
        assert_eq!(
            offsets(&receive(&mut state, "a", 10, new, 0, SETTINGS)),
            [1]
        );
        assert_eq!(state.next_due_after(0), Some(500));
        assert_eq!(state.next_due_after(500), None);
        let late = receive(&mut state, "a", 10, Vec::new(), 500, SETTINGS);
        assert_eq!(offsets(&late), [0]);
        state.apply(QueueCommand::Extend {
            receipts: receipts(&late),
            now_ms: 1_400,
            visibility_ms: 1_000,
        });
        state.apply(QueueCommand::Expire {
            now_ms: 1_600,
            settings: SETTINGS,
        });
        let depth = state.depth(1_600);
        assert_eq!(
            (depth.available, depth.in_flight),
            (1, 1),
            "1 expired, 0 still leased"
        );
        state.apply(QueueCommand::Nack {
            receipts: receipts(&late),
            delay_ms: 300,
            now_ms: 1_600,
            settings: SETTINGS,
        });
        assert_eq!(state.depth(1_600).delayed, 1);
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 1_600, SETTINGS)),
            [1]
        );
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 1_900, SETTINGS)),
            [0]
        );
        let mut bounded = QueueState::default();
        let chosen = bounded.choose("a", 10, 25, u64::MAX, 0, SETTINGS);
        assert!(chosen.is_empty());
        bounded.scan(metas(0, 5, 0));
        assert_eq!(bounded.choose("a", 10, 25, u64::MAX, 0, SETTINGS), [0, 1]);
        assert_eq!(
            bounded.choose("a", 10, 1, u64::MAX, 0, SETTINGS),
            [0],
            "one message at least"
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
        ack(&mut state, receipts(&first[1..]));
        assert_eq!(
            offsets(&receive(&mut state, "b", 10, Vec::new(), 0, settings)),
            [3]
        );
    }

    /// The rows and header written through `StateApply` restore the same state.
    #[test]
    fn rows_restore_the_state() {
        let mut shared = SharedQueue::default();
        let command = |command: QueueCommand| postcard::to_stdvec(&command).unwrap();
        shared.apply(
            1,
            &command(QueueCommand::Receive {
                consumer: "a".into(),
                max: 2,
                max_bytes: u64::MAX,
                new: metas(0, 4, 0),
                readable_below: u64::MAX,
                now_ms: 0,
                visibility_ms: 100,
                settings: SETTINGS,
            }),
        );
        shared.apply(
            2,
            &command(QueueCommand::Ack {
                receipts: vec![Receipt {
                    offset: 0,
                    delivery: 1,
                }],
            }),
        );
        let changes = shared.take_changes();
        assert_eq!(
            changes.len(),
            4,
            "every scanned message is a row: {changes:?}"
        );
        assert!(
            changes.contains(&(0, None)),
            "the acked message's row is deleted"
        );
        let mut restored = SharedQueue::default();
        restored
            .restore(&shared.encode_state(), shared.rows())
            .unwrap();
        assert_eq!(restored.read(Clone::clone), shared.read(Clone::clone));
        assert!(shared.take_changes().is_empty());
    }

    proptest! {
        /// Under any commands: a message acked (or dead-lettered) is never handed out again; the
        /// floor never moves back and everything below it is finished; a message is never
        /// delivered more than max_deliveries times; at most in_flight_max are leased; in
        /// key-ordered mode no two messages of one key are leased at once and a key's messages
        /// are first handed out in offset order.
        #[test]
        fn queue_invariants(
            key_ordered in any::<bool>(),
            steps in prop::collection::vec((0u8..6, 0usize..4, 0u64..40, 1u32..5), 1..120),
        ) {
            let settings = QueueSettings { key_ordered, max_deliveries: 3, in_flight_max: 6 };
            let consumers = ["a", "b", "c", "d"];
            let mut state = QueueState::default();
            let mut finished: BTreeSet<u64> = BTreeSet::new();
            let mut first_delivered: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut outstanding: Vec<Receipt> = Vec::new();
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
                        for delivery in &deliveries {
                            prop_assert!(!finished.contains(&delivery.offset), "finished {} handed out", delivery.offset);
                            prop_assert!(delivery.deliveries <= settings.max_deliveries);
                            if delivery.deliveries == 1 {
                                first_delivered.entry(delivery.offset % 3).or_default().push(delivery.offset);
                            }
                        }
                        outstanding.extend(receipts(&deliveries));
                    }
                    2 => {
                        let chosen: Vec<Receipt> = outstanding.iter().copied().filter(|r| r.offset % 5 == pick % 5).collect();
                        if let QueueAnswer::Settled(settled) = ack(&mut state, chosen.clone()) {
                            for (receipt, outcome) in chosen.iter().zip(settled) {
                                if outcome == Settled::Done {
                                    prop_assert!(finished.insert(receipt.offset), "acked twice");
                                }
                            }
                        }
                    }
                    3 => {
                        let chosen: Vec<Receipt> = outstanding.iter().copied().filter(|r| r.offset % 3 == pick % 3).collect();
                        state.apply(QueueCommand::Nack { receipts: chosen, delay_ms: pick * 10, now_ms: now, settings });
                    }
                    4 => {
                        state.apply(QueueCommand::Expire { now_ms: now + pick * 100, settings });
                    }
                    _ => {
                        let offsets: Vec<u64> = state.dead_lettering().into_iter().map(|(offset, _, _)| offset).collect();
                        for offset in &offsets {
                            prop_assert!(finished.insert(*offset), "dead-lettered after finishing");
                        }
                        state.apply(QueueCommand::DeadLettered { offsets });
                    }
                }
                prop_assert!(state.floor >= floor, "the floor moved back");
                prop_assert!(state.index_is_consistent(), "indexes out of step");
                for offset in 0..state.floor {
                    prop_assert!(!state.messages.contains_key(&offset));
                }
                let leased = state.messages.values().filter(|m| matches!(m.standing, Standing::Leased { .. })).count();
                prop_assert!(leased <= settings.in_flight_max as usize);
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
