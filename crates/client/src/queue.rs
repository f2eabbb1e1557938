//! The queue calls of [`Client`] (`ordo.v1.Queue`) and [`QueueConsumer`], a receive stream with
//! batched acks.
//!
//! Settles (ack, nack, extend, reject) are retried within their deadline after any failure: a
//! settle applied twice answers [`SettleOutcome::Unknown`] the second time (the message is
//! finished), never a second effect.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ordo_proto::v1 as proto;
use ordo_proto::v1::queue_client::QueueClient;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tonic::Request;
use tonic::transport::Channel;

use crate::client::Client;
use crate::client::timed;
use crate::error::ClientError;
use crate::error::Effect;
use crate::types::StoredRecord;

/// The record header that delays a message until a time (decimal milliseconds since the Unix
/// epoch).
pub const DELIVER_AT_HEADER: &str = "ordo-deliver-at";

/// A queue's settings; zero (or empty) fields take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueSettings {
    /// Lease length of a receive that asks for none.
    pub visibility_timeout_ms: u64,
    /// Deliveries before a message goes to the dead-letter topic.
    pub max_deliveries: u32,
    /// One message per key at a time, each key's in offset order.
    pub key_ordered: bool,
    /// Each record is delivered no earlier than its timestamp plus this.
    pub delay_ms: u64,
    /// Most messages leased at once per partition.
    pub in_flight_max: u32,
    /// Where messages go after max_deliveries or a reject (empty: `<queue>-dlq`).
    pub dead_letter_topic: String,
}

/// A queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// The topic it reads.
    pub topic: String,
    /// The topic's partitions.
    pub partitions: u32,
    /// Its settings, defaults filled in.
    pub settings: QueueSettings,
}

/// One partition of a described queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueuePartitionInfo {
    /// The partition.
    pub partition: u32,
    /// Every offset below is acked or dead-lettered.
    pub floor: u64,
    /// The partition's end.
    pub log_end: u64,
    /// Deliverable now.
    pub available: u64,
    /// Leased.
    pub in_flight: u64,
    /// Waiting for a deliver-at time or a nack's delay.
    pub delayed: u64,
    /// Leaving for the dead-letter topic.
    pub dead_lettering: u64,
    /// Timestamp of the oldest unfinished message read from the log.
    pub oldest_timestamp_ms: Option<i64>,
    /// Messages acked.
    pub acked: u64,
    /// Deliveries after the first.
    pub redeliveries: u64,
    /// Leases that ended unsettled.
    pub lease_expiries: u64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: u64,
    /// The node leading its queue state.
    pub leader: u32,
}

/// A described queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueDescription {
    /// The queue.
    pub queue: QueueInfo,
    /// Per partition.
    pub partitions: Vec<QueuePartitionInfo>,
}

/// Names one delivery of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Receipt {
    /// The partition.
    pub partition: u32,
    /// The message's offset.
    pub offset: u64,
    /// The delivery count (1 the first time).
    pub delivery: u32,
}

/// A message received from a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueMessage {
    /// Settle it with this.
    pub receipt: Receipt,
    /// When the lease ends (the leader's clock, ms since the Unix epoch).
    pub lease_until_ms: i64,
    /// The record.
    pub record: StoredRecord,
}

/// What became of one receipt of a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SettleOutcome {
    /// Done as asked.
    Done,
    /// The lease had ended (the message may be with another consumer); nothing done.
    NotHeld,
    /// Already finished (acked or dead-lettered; also what a retry of a settle that was applied
    /// answers), or never delivered; nothing done.
    Unknown,
}

/// How a [`QueueConsumer`] receives.
#[derive(Debug, Clone, Default)]
pub struct QueueConsumerOptions {
    /// Who holds the leases (empty: the server makes one).
    pub consumer_id: String,
    /// Most messages held unsettled at once (0: the server's default, 100).
    pub max_in_flight: u32,
    /// Most bytes held unsettled at once (0: the server's default, 4 MiB).
    pub max_in_flight_bytes: u64,
    /// Lease length (zero: the queue's).
    pub visibility_timeout: Duration,
}

fn settings_from_wire(config: Option<proto::QueueConfig>) -> QueueSettings {
    let config = config.unwrap_or_default();
    QueueSettings {
        visibility_timeout_ms: config.visibility_timeout_ms,
        max_deliveries: config.max_deliveries,
        key_ordered: config.key_ordered,
        delay_ms: config.delay_ms,
        in_flight_max: config.in_flight_max,
        dead_letter_topic: config.dead_letter_topic,
    }
}

fn queue_from_wire(queue: Option<proto::QueueInfo>) -> QueueInfo {
    let queue = queue.unwrap_or_default();
    QueueInfo {
        name: queue.name,
        topic: queue.topic,
        partitions: queue.partitions,
        settings: settings_from_wire(queue.config),
    }
}

fn receipts_to_wire(receipts: &[Receipt]) -> Vec<proto::Receipt> {
    receipts
        .iter()
        .map(|receipt| proto::Receipt {
            partition: receipt.partition,
            offset: receipt.offset,
            delivery: receipt.delivery,
        })
        .collect()
}

fn outcomes_from_wire(response: proto::SettleResponse) -> Vec<SettleOutcome> {
    response
        .outcomes
        .into_iter()
        .map(|outcome| match proto::SettleOutcome::try_from(outcome) {
            Ok(proto::SettleOutcome::Done) => SettleOutcome::Done,
            Ok(proto::SettleOutcome::NotHeld) => SettleOutcome::NotHeld,
            _ => SettleOutcome::Unknown,
        })
        .collect()
}

fn message_from_wire(message: proto::QueueMessage) -> QueueMessage {
    let receipt = message.receipt.unwrap_or_default();
    QueueMessage {
        receipt: Receipt {
            partition: receipt.partition,
            offset: receipt.offset,
            delivery: receipt.delivery,
        },
        lease_until_ms: message.lease_until_ms,
        record: message.record.unwrap_or_default().into(),
    }
}

/// A settle call's request.
enum Settle {
    Ack,
    Nack(Duration),
    Extend(Duration),
    Reject(String),
}

impl Client {
    fn queues(&self, channel: Channel) -> QueueClient<Channel> {
        QueueClient::new(channel).max_decoding_message_size(self.options().response_bytes_max)
    }

    /// Creates a queue over `topic` (`Queue/CreateQueue`).
    pub async fn create_queue(
        &self,
        name: &str,
        topic: &str,
        settings: &QueueSettings,
    ) -> Result<QueueInfo, ClientError> {
        let request = proto::CreateQueueRequest {
            name: name.to_owned(),
            topic: topic.to_owned(),
            config: Some(proto::QueueConfig {
                visibility_timeout_ms: settings.visibility_timeout_ms,
                max_deliveries: settings.max_deliveries,
                key_ordered: settings.key_ordered,
                delay_ms: settings.delay_ms,
                in_flight_max: settings.in_flight_max,
                dead_letter_topic: settings.dead_letter_topic.clone(),
            }),
        };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.queues(channel).create_queue(request).await }
            })
            .await?;
        Ok(queue_from_wire(response.into_inner().queue))
    }

    /// Deletes a queue (`Queue/DeleteQueue`).
    pub async fn delete_queue(&self, name: &str) -> Result<(), ClientError> {
        let request = proto::DeleteQueueRequest {
            name: name.to_owned(),
        };
        self.call(Effect::Write, Duration::ZERO, |channel, timeout| {
            let request = timed(request.clone(), timeout);
            async move { self.queues(channel).delete_queue(request).await }
        })
        .await?;
        Ok(())
    }

    /// Every queue (`Queue/ListQueues`).
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, ClientError> {
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(proto::ListQueuesRequest {}, timeout);
                async move { self.queues(channel).list_queues(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .queues
            .into_iter()
            .map(|queue| queue_from_wire(Some(queue)))
            .collect())
    }

    /// A queue's state per partition (`Queue/DescribeQueue`).
    pub async fn describe_queue(&self, name: &str) -> Result<QueueDescription, ClientError> {
        let request = proto::DescribeQueueRequest {
            name: name.to_owned(),
        };
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.queues(channel).describe_queue(request).await }
            })
            .await?;
        let response = response.into_inner();
        Ok(QueueDescription {
            queue: queue_from_wire(response.queue),
            partitions: response
                .partitions
                .into_iter()
                .map(|status| QueuePartitionInfo {
                    partition: status.partition,
                    floor: status.floor,
                    log_end: status.log_end,
                    available: status.available,
                    in_flight: status.in_flight,
                    delayed: status.delayed,
                    dead_lettering: status.dead_lettering,
                    oldest_timestamp_ms: status.oldest_timestamp_ms,
                    acked: status.acked,
                    redeliveries: status.redeliveries,
                    lease_expiries: status.lease_expiries,
                    dead_lettered: status.dead_lettered,
                    leader: status.leader,
                })
                .collect(),
        })
    }

    /// Acks deliveries: done for good (`Queue/Ack`). Per receipt, in order.
    pub async fn ack(
        &self,
        queue: &str,
        receipts: &[Receipt],
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.settle(queue, receipts, Settle::Ack).await
    }

    /// Releases deliveries for redelivery, not before `delay` (`Queue/Nack`).
    pub async fn nack(
        &self,
        queue: &str,
        receipts: &[Receipt],
        delay: Duration,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.settle(queue, receipts, Settle::Nack(delay)).await
    }

    /// Renews leases for `visibility` from now (zero: the queue's) (`Queue/ExtendLease`).
    pub async fn extend_lease(
        &self,
        queue: &str,
        receipts: &[Receipt],
        visibility: Duration,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.settle(queue, receipts, Settle::Extend(visibility))
            .await
    }

    /// Sends deliveries to the dead-letter topic now (`Queue/Reject`).
    pub async fn reject(
        &self,
        queue: &str,
        receipts: &[Receipt],
        reason: &str,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.settle(queue, receipts, Settle::Reject(reason.to_owned()))
            .await
    }

    async fn settle(
        &self,
        queue: &str,
        receipts: &[Receipt],
        settle: Settle,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        let queue = queue.to_owned();
        let receipts = receipts_to_wire(receipts);
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let (response, _) = self
            .call(
                Effect::IdempotentWrite,
                Duration::ZERO,
                |channel, timeout| {
                    let mut client = self.queues(channel);
                    let (queue, receipts) = (queue.clone(), receipts.clone());
                    let settle = &settle;
                    async move {
                        match settle {
                            Settle::Ack => {
                                let request = proto::AckRequest { queue, receipts };
                                client.ack(timed(request, timeout)).await
                            }
                            Settle::Nack(delay) => {
                                let request = proto::NackRequest {
                                    queue,
                                    receipts,
                                    delay_ms: millis(*delay),
                                };
                                client.nack(timed(request, timeout)).await
                            }
                            Settle::Extend(visibility) => {
                                let request = proto::ExtendLeaseRequest {
                                    queue,
                                    receipts,
                                    visibility_timeout_ms: millis(*visibility),
                                };
                                client.extend_lease(timed(request, timeout)).await
                            }
                            Settle::Reject(reason) => {
                                let request = proto::RejectRequest {
                                    queue,
                                    receipts,
                                    reason: reason.clone(),
                                };
                                client.reject(timed(request, timeout)).await
                            }
                        }
                    }
                },
            )
            .await?;
        Ok(outcomes_from_wire(response.into_inner()))
    }

    /// Opens a queue consumer: a receive stream, reopened after retryable failures with the same
    /// consumer id, and batched acks.
    pub async fn queue_consumer(
        &self,
        queue: &str,
        options: QueueConsumerOptions,
    ) -> Result<QueueConsumer, ClientError> {
        let mut consumer = QueueConsumer {
            client: self.clone(),
            queue: queue.to_owned(),
            options,
            stream: None,
            buffered: VecDeque::new(),
            acker: Acker::start(self.clone(), queue.to_owned()),
        };
        consumer.open().await?;
        Ok(consumer)
    }
}

/// Receives a queue's messages and settles them. Messages held count against the stream's
/// bounds until settled or their lease ends.
pub struct QueueConsumer {
    client: Client,
    queue: String,
    options: QueueConsumerOptions,
    stream: Option<tonic::Streaming<proto::ReceiveResponse>>,
    buffered: VecDeque<QueueMessage>,
    acker: Acker,
}

impl std::fmt::Debug for QueueConsumer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QueueConsumer")
            .field("queue", &self.queue)
            .field("consumer_id", &self.options.consumer_id)
            .finish_non_exhaustive()
    }
}

impl QueueConsumer {
    /// The consumer id holding the leases.
    pub fn consumer_id(&self) -> &str {
        &self.options.consumer_id
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        let request = proto::ReceiveRequest {
            queue: self.queue.clone(),
            consumer_id: self.options.consumer_id.clone(),
            max_in_flight: self.options.max_in_flight,
            max_in_flight_bytes: self.options.max_in_flight_bytes,
            visibility_timeout_ms: u64::try_from(self.options.visibility_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        let client = &self.client;
        let (response, _) = client
            .call(Effect::Read, Duration::ZERO, |channel, _timeout| {
                let request = Request::new(request.clone());
                async move { client.queues(channel).receive(request).await }
            })
            .await?;
        self.stream = Some(response.into_inner());
        Ok(())
    }

    /// The next message; reopens the stream after a retryable failure (the leases stay with
    /// this consumer id). An error it cannot recover from is returned (and the next call tries
    /// to reopen).
    pub async fn next(&mut self) -> Result<QueueMessage, ClientError> {
        let mut failures = 0u32;
        loop {
            if let Some(message) = self.buffered.pop_front() {
                return Ok(message);
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Err(error) = self.open().await {
                    failures += 1;
                    if !error.is_retryable()
                        || failures > self.client.options().subscribe_retries_max
                    {
                        return Err(error);
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    self.options.consumer_id = response.consumer_id;
                    self.buffered
                        .extend(response.messages.into_iter().map(message_from_wire));
                    failures = 0;
                }
                Ok(None) => {
                    self.stream = None;
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20))))
                        .await;
                }
                Err(status) => {
                    self.stream = None;
                    let error = ClientError::from_status(status, Effect::Read, "receive stream");
                    failures += 1;
                    if !error.is_retryable()
                        || failures > self.client.options().subscribe_retries_max
                    {
                        return Err(error);
                    }
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20))))
                        .await;
                }
            }
        }
    }

    /// Acks one delivery through the consumer's ack batcher (acks within a couple of
    /// milliseconds go in one call); resolves once the ack is durable.
    pub async fn ack(&self, receipt: Receipt) -> Result<SettleOutcome, ClientError> {
        self.acker.ack(receipt).await
    }

    /// A handle on this consumer's ack batcher, for tasks that process messages side by side.
    pub fn acker(&self) -> QueueAcker {
        self.acker.clone()
    }

    /// Acks deliveries in one call.
    pub async fn ack_all(&self, receipts: &[Receipt]) -> Result<Vec<SettleOutcome>, ClientError> {
        self.client.ack(&self.queue, receipts).await
    }

    /// Releases deliveries for redelivery after `delay`.
    pub async fn nack(
        &self,
        receipts: &[Receipt],
        delay: Duration,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.client.nack(&self.queue, receipts, delay).await
    }

    /// Renews leases.
    pub async fn extend_lease(
        &self,
        receipts: &[Receipt],
        visibility: Duration,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.client
            .extend_lease(&self.queue, receipts, visibility)
            .await
    }

    /// Sends deliveries to the dead-letter topic.
    pub async fn reject(
        &self,
        receipts: &[Receipt],
        reason: &str,
    ) -> Result<Vec<SettleOutcome>, ClientError> {
        self.client.reject(&self.queue, receipts, reason).await
    }
}

/// Acks waiting to be sent together.
type AckSlot = (Receipt, oneshot::Sender<Result<SettleOutcome, ClientError>>);

/// Most acks in one call of the batcher.
const ACK_BATCH_MAX: usize = 500;
/// Ack calls of one batcher in flight at once.
const ACK_CALLS_MAX: usize = 4;
/// How long the batcher waits for more acks after the first.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// Batches acks: a task sends what arrived together in one call. Cheap to clone (hand one to
/// each task processing messages); the task ends when the consumer and every clone are gone.
#[derive(Debug, Clone)]
pub struct QueueAcker {
    tx: mpsc::Sender<AckSlot>,
}

type Acker = QueueAcker;

impl Acker {
    fn start(client: Client, queue: String) -> Acker {
        let (tx, mut rx) = mpsc::channel::<AckSlot>(ACK_BATCH_MAX * 4);
        let calls = Arc::new(tokio::sync::Semaphore::new(ACK_CALLS_MAX));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let linger = tokio::time::sleep(ACK_LINGER);
                tokio::pin!(linger);
                while batch.len() < ACK_BATCH_MAX {
                    tokio::select! {
                        slot = rx.recv() => match slot {
                            Some(slot) => batch.push(slot),
                            None => break,
                        },
                        () = &mut linger => break,
                    }
                }
                // Up to ACK_CALLS_MAX calls in flight: a batch does not wait for the one before.
                let Ok(permit) = Arc::clone(&calls).acquire_owned().await else {
                    break;
                };
                let (client, queue) = (client.clone(), queue.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let receipts: Vec<Receipt> =
                        batch.iter().map(|(receipt, _)| *receipt).collect();
                    match client.ack(&queue, &receipts).await {
                        Ok(outcomes) => {
                            for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                                let _ = reply.send(Ok(outcome));
                            }
                        }
                        Err(error) => {
                            for (_, reply) in batch {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                });
            }
        });
        Acker { tx }
    }

    /// Acks one delivery together with the others sent within a couple of milliseconds;
    /// resolves once the ack is durable.
    pub async fn ack(&self, receipt: Receipt) -> Result<SettleOutcome, ClientError> {
        let (reply, answer) = oneshot::channel();
        let closed = || ClientError::Transport {
            endpoint: String::new(),
            message: "the ack batcher stopped".into(),
        };
        self.tx.send((receipt, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}
