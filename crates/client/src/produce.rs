//! The produce path of [`Client`]: each call goes to its partition's leader when the client knows
//! it (`routing`), joins the partition's queue (`batch`), and travels pipelined on the node's
//! ProduceStream (`pipe`) or as a unary call, with bounded retries of what wrote nothing. With
//! idempotence on (the default), each request carries its producer sequence (`idempotence`)
//! and is retried whatever the last attempt did, since the partition writes it once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ordo_proto::v1 as proto;
use tokio::time::Instant;
use tonic::Status;

use crate::batch::{self, Waiter};
use crate::client::{Client, Node, authority_of, timed};
use crate::convert;
use crate::error::{ClientError, Effect};
use crate::idempotence::{Idempotence, InDoubt, Next, Session, Verdict, verdict};
use crate::pipe::Pipe;
use crate::routing::TopicRoute;
use crate::types::{Record, RecordAck};

/// Largest produce request sent on a ProduceStream; larger ones go as unary calls.
const STREAM_REQUEST_BYTES_MAX: usize = 4 << 20;

/// Bound on looking up a topic's partition leaders before a produce goes without them.
const ROUTE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

impl Client {
    /// Appends `records` to `topic`, all to `partition` when given, and returns where each landed,
    /// in request order. Without a partition, records with keys go to the partition of their
    /// key, and a call of records without keys goes to one partition, the next in turn.
    ///
    /// Returns only once a quorum has the records durably committed. With
    /// [`ClientOptions::idempotence`] (the default) every request carries its producer sequence
    /// and is retried after any failure until the deadline, without ever being written twice;
    /// [`ClientError::OutcomeUnknown`] then means the last attempts could not tell, and the
    /// client sends the request again (same sequence) before the partition's next one. Without
    /// idempotence a call that fails with a retryable error (nothing was written) is retried on
    /// the next endpoint until the deadline, and [`ClientError::OutcomeUnknown`] is returned as
    /// is and never retried, because the records may already be in the log.
    ///
    /// Calls travel pipelined on one ProduceStream per node, and concurrent calls to one
    /// partition may share a request ([`ClientOptions::produce_requests_per_partition_max`]);
    /// each call still gets its own acknowledgements, and its own error when its request fails.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<RecordAck>, ClientError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let route = self.route(topic).await;
        if self.inner.idempotence.is_some() {
            return self
                .produce_idempotent(topic, partition, route, records)
                .await;
        }
        let keyless = records.iter().all(|record| record.key.is_none());
        let partition = match (&route, partition) {
            (_, Some(partition)) => Some(partition),
            (Some(route), None) if keyless && route.partitions() > 0 => {
                Some(route.next_partition())
            }
            _ => None,
        };
        let records: Vec<proto::Record> = records.into_iter().map(proto::Record::from).collect();
        let (Some(partition), Some(batcher)) = (partition, &self.inner.batcher) else {
            let budget = self.inner.options.request_timeout;
            return self
                .send_produce(topic, partition, route, records, None, budget)
                .await;
        };
        self.enter_batch(batcher, topic, partition, records).await
    }

    /// Queues a call's records for `partition` and waits for their answer.
    async fn enter_batch(
        &self,
        batcher: &Arc<batch::Batcher>,
        topic: &str,
        partition: u32,
        records: Vec<proto::Record>,
    ) -> batch::Answer {
        let (answer, slot) = batcher.enter(topic, partition, records);
        if let Some((batch, slot)) = slot {
            // Spawned, so that a caller that goes away never strands the calls queued behind.
            tokio::spawn(self.clone().drive_partition(batch, slot));
        }
        answer.await.unwrap_or_else(|_| {
            Err(ClientError::OutcomeUnknown {
                message: "the task sending this produce call ended without an answer".to_owned(),
            })
        })
    }

    /// An idempotent produce call: sequences count records per partition, so the client picks
    /// each record's partition itself (as the server would: the given one, the key's, or the
    /// next in turn for records without a key), and each partition's share goes through its
    /// queue. Acks come back in call order.
    async fn produce_idempotent(
        &self,
        topic: &str,
        partition: Option<u32>,
        route: Option<Arc<TopicRoute>>,
        records: Vec<Record>,
    ) -> Result<Vec<RecordAck>, ClientError> {
        let batcher = self
            .inner
            .batcher
            .as_ref()
            .expect("a client with idempotence always batches");
        let records: Vec<proto::Record> = records.into_iter().map(proto::Record::from).collect();
        let total = records.len();
        let mut shares: std::collections::BTreeMap<u32, (Vec<usize>, Vec<proto::Record>)> =
            std::collections::BTreeMap::new();
        match partition {
            Some(partition) => {
                shares.insert(partition, ((0..total).collect(), records));
            }
            None => {
                let known = route.as_ref().map_or(0, |route| route.partitions());
                let partitions = if known > 0 {
                    known
                } else {
                    let description = self.describe_topic(topic).await?;
                    u32::try_from(description.partitions.len()).unwrap_or(u32::MAX)
                };
                if partitions == 0 {
                    return Err(ClientError::Unavailable {
                        leader_hint: None,
                        leader_address: None,
                        message: format!(
                            "topic {topic:?} shows no partitions yet; nothing was written"
                        ),
                    });
                }
                let keyless = route
                    .as_ref()
                    .filter(|route| route.partitions() > 0)
                    .map_or(0, |route| route.next_partition());
                for (position, record) in records.into_iter().enumerate() {
                    let target = match &record.key {
                        Some(key) => ordo_proto::partition::partition_for_key(key, partitions),
                        None => keyless,
                    };
                    let share = shares.entry(target).or_default();
                    share.0.push(position);
                    share.1.push(record);
                }
            }
        }
        if shares.len() == 1 {
            let (partition, (_, records)) = shares.pop_first().expect("one share");
            return self.enter_batch(batcher, topic, partition, records).await;
        }
        let calls = shares
            .into_iter()
            .map(|(partition, (positions, records))| async move {
                let answer = self.enter_batch(batcher, topic, partition, records).await;
                (positions, answer)
            });
        let answers = futures::future::join_all(calls).await;
        let mut acks = vec![None; total];
        let mut first_error = None;
        let mut unknown = None;
        let mut written = 0_usize;
        for (positions, answer) in answers {
            match answer {
                Ok(partition_acks) => {
                    written += partition_acks.len();
                    for (position, ack) in positions.into_iter().zip(partition_acks) {
                        acks[position] = Some(ack);
                    }
                }
                Err(error) => {
                    if unknown.is_none() && verdict(&Err(error.clone())) != Verdict::NotWritten {
                        unknown = Some(ClientError::OutcomeUnknown {
                            message: format!(
                                "part of the call's records may have been written: {error}"
                            ),
                        });
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            None => Ok(acks
                .into_iter()
                .map(|ack| ack.expect("every record answered"))
                .collect()),
            // "Nothing written" only when no share may have been written.
            Some(error) if written == 0 => Err(unknown.unwrap_or(error)),
            Some(error) => Err(ClientError::OutcomeUnknown {
                message: format!(
                    "{written} of the call's {total} records were written (in other partitions), the rest failed: {error}"
                ),
            }),
        }
    }

    /// Sends the batches of one partition's slot: `batch`, then whatever queued meanwhile,
    /// until nothing is queued when a request completes.
    async fn drive_partition(self, mut batch: Vec<Waiter>, mut slot: batch::InFlight) {
        loop {
            self.send_batch(slot.topic(), slot.partition(), batch).await;
            match slot.finish() {
                Some((next, next_slot)) => (batch, slot) = (next, next_slot),
                None => return,
            }
        }
    }

    /// Sends the calls of `batch` as one request and answers each with its own acks. If a
    /// merged request is refused as invalid (one call over a server limit, or the merged
    /// request over one), nothing was written, and each call is sent on its own instead.
    async fn send_batch(&self, topic: &str, partition: u32, mut batch: Vec<Waiter>) {
        let waited = batch
            .iter()
            .map(|waiter| waiter.queued.elapsed())
            .max()
            .unwrap_or_default();
        let deadline = Instant::now() + self.inner.options.request_timeout.saturating_sub(waited);
        let route = self.route(topic).await;
        let unsent = |waiter: Waiter| {
            let _ = waiter.reply.send(Err(ClientError::Unavailable {
                leader_hint: None,
                leader_address: None,
                message: format!(
                    "the call waited in the client's queue for partition {partition} until its deadline; nothing was written"
                ),
            }));
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            batch.into_iter().for_each(unsent);
            return;
        }
        if self.inner.idempotence.is_some() {
            self.send_batch_idempotent(topic, partition, route, batch, deadline)
                .await;
            return;
        }
        if batch.len() == 1 {
            let waiter = batch.remove(0);
            let answer = self
                .send_produce(topic, Some(partition), route, waiter.records, None, budget)
                .await;
            let _ = waiter.reply.send(answer);
            return;
        }
        let records: Vec<proto::Record> = batch
            .iter()
            .flat_map(|waiter| waiter.records.iter().cloned())
            .collect();
        let answer = self
            .send_produce(topic, Some(partition), route.clone(), records, None, budget)
            .await;
        match answer {
            Ok(acks) => reply_each(batch, acks),
            Err(ClientError::InvalidArgument { .. }) => {
                // The broker validates a whole request before writing any of it, so nothing
                // was written: send each call on its own, in order, within what is left.
                for waiter in batch {
                    let budget = deadline.saturating_duration_since(Instant::now());
                    if budget.is_zero() {
                        unsent(waiter);
                        continue;
                    }
                    let answer = self
                        .send_produce(
                            topic,
                            Some(partition),
                            route.clone(),
                            waiter.records,
                            None,
                            budget,
                        )
                        .await;
                    let _ = waiter.reply.send(answer);
                }
            }
            Err(error) => fail_each(batch, &error),
        }
    }

    /// One produce request, with retries, within `budget`; sent to the partition's leader when
    /// the route knows it. A failure marks the route stale. A request with a producer sequence
    /// is retried after any failure, an unknown outcome included.
    async fn send_produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        route: Option<Arc<TopicRoute>>,
        records: Vec<proto::Record>,
        producer: Option<proto::ProducerSequence>,
        budget: Duration,
    ) -> batch::Answer {
        let sent = records.len();
        let leader = partition.and_then(|partition| route.as_ref()?.leader(partition));
        let effect = if producer.is_some() {
            Effect::IdempotentWrite
        } else {
            Effect::Write
        };
        let request = proto::ProduceRequest {
            topic: topic.to_owned(),
            partition,
            records,
            producer,
        };
        let result = self
            .call_indexed(leader, effect, budget, |index, timeout| {
                self.produce_attempt(index, request.clone(), timeout)
            })
            .await;
        match result {
            Ok((response, _)) => convert::produce_acks(response, sent),
            Err(error) => {
                if let Some(route) = route {
                    route.mark_stale();
                }
                Err(error)
            }
        }
    }

    /// Sends the calls of `batch` as one idempotent request and answers each with its own acks;
    /// a merged request refused as invalid (nothing written, no sequence used) is sent again
    /// call by call.
    async fn send_batch_idempotent(
        &self,
        topic: &str,
        partition: u32,
        route: Option<Arc<TopicRoute>>,
        batch: Vec<Waiter>,
        deadline: Instant,
    ) {
        let records: Vec<proto::Record> = batch
            .iter()
            .flat_map(|waiter| waiter.records.iter().cloned())
            .collect();
        let answer = self
            .send_idempotent(topic, partition, route.clone(), records, deadline)
            .await;
        match answer {
            Ok(acks) => reply_each(batch, acks),
            Err(ClientError::InvalidArgument { .. }) if batch.len() > 1 => {
                for waiter in batch {
                    let answer = self
                        .send_idempotent(topic, partition, route.clone(), waiter.records, deadline)
                        .await;
                    let _ = waiter.reply.send(answer);
                }
            }
            Err(error) => fail_each(batch, &error),
        }
    }

    /// One idempotent request of `records` to `partition`, before `deadline`: first the
    /// partition's request in doubt, if any (sent again as it was), then these records at the
    /// partition's next sequence. A producer the cluster forgot (UNKNOWN_PRODUCER) gets a new
    /// session, once.
    async fn send_idempotent(
        &self,
        topic: &str,
        partition: u32,
        route: Option<Arc<TopicRoute>>,
        records: Vec<proto::Record>,
        deadline: Instant,
    ) -> batch::Answer {
        let idempotence = self
            .inner
            .idempotence
            .as_ref()
            .expect("called with idempotence on");
        let key: (Arc<str>, u32) = (Arc::from(topic), partition);
        let not_sent = |why: &str| ClientError::Unavailable {
            leader_hint: None,
            leader_address: None,
            message: format!("{why}; this call was not sent and nothing of it was written"),
        };
        let mut new_sessions = 0;
        loop {
            let budget = deadline.saturating_duration_since(Instant::now());
            if budget.is_zero() {
                return Err(not_sent("the call's deadline passed"));
            }
            let session = idempotence
                .session(|| self.new_session(budget))
                .await
                .map_err(|error| not_sent(&format!("no producer session: {error}")))?;
            let next = idempotence.next(&key, session).ok_or_else(|| ClientError::ResourceExhausted {
                reason: None,
                message: "this client keeps producer sequences of 100,000 partitions; use another client".to_owned(),
            })?;
            let sequence = match next {
                Next::Send(sequence) => sequence,
                Next::Resolve(in_doubt) => {
                    let answer = self
                        .send_produce(
                            topic,
                            Some(partition),
                            route.clone(),
                            in_doubt.records,
                            Some(in_doubt.session.stamp(in_doubt.sequence)),
                            budget,
                        )
                        .await;
                    match (verdict(&answer), answer) {
                        (Verdict::Written, _) => idempotence.resolved(&key),
                        (Verdict::Unknown, _) => {
                            return Err(not_sent(
                                "the partition's previous request is still unresolved (its outcome is unknown)",
                            ));
                        }
                        (Verdict::NotWritten, Err(error)) if settles_nothing(&error) => {
                            return Err(not_sent(&format!(
                                "the partition's previous request, of unknown outcome, could not be sent again ({error})"
                            )));
                        }
                        // A newer instance of this producer took over: stop, as it says.
                        (Verdict::NotWritten, Err(error))
                            if fenced(&error)
                                && idempotence.current().await == Some(in_doubt.session) =>
                        {
                            return Err(error);
                        }
                        // Refused for good under its stamp: whether it was written stays
                        // unknown, so the sequences after it cannot be trusted. A new session
                        // starts the partitions over; no sequence is given to other records.
                        (Verdict::NotWritten, _) => {
                            idempotence.resolved(&key);
                            idempotence.forget(in_doubt.session).await;
                        }
                    }
                    continue;
                }
            };
            let count = records.len() as u64;
            let answer = self
                .send_produce(
                    topic,
                    Some(partition),
                    route.clone(),
                    records.clone(),
                    Some(session.stamp(sequence)),
                    budget,
                )
                .await;
            match verdict(&answer) {
                Verdict::Written => idempotence.written(&key, session, sequence, count),
                Verdict::Unknown => {
                    idempotence.in_doubt(
                        &key,
                        InDoubt {
                            session,
                            sequence,
                            records,
                        },
                    );
                    return answer.map_err(|error| match error {
                        error @ ClientError::OutcomeUnknown { .. } => error,
                        error => ClientError::OutcomeUnknown {
                            message: error.to_string(),
                        },
                    });
                }
                // The partition and this client disagree on the producer's state (it forgot
                // the producer, expects another sequence, or fenced this client's own older
                // epoch): nothing was written; a new session starts every partition over, once.
                Verdict::NotWritten
                    if new_sessions == 0 && out_of_step(&answer, session, idempotence).await =>
                {
                    new_sessions += 1;
                    idempotence.forget(session).await;
                    continue;
                }
                Verdict::NotWritten => {}
            }
            return answer;
        }
    }

    /// A new producer session from the cluster.
    async fn new_session(&self, budget: Duration) -> Result<Session, ClientError> {
        let name = self
            .inner
            .idempotence
            .as_ref()
            .and_then(|idempotence| idempotence.name.clone());
        let (id, epoch) = self.init_producer_within(name.as_deref(), budget).await?;
        Ok(Session { id, epoch })
    }

    /// One attempt of a produce call at endpoint `index`: on its ProduceStream when enabled
    /// and supported, else as a unary call.
    async fn produce_attempt(
        &self,
        index: usize,
        request: proto::ProduceRequest,
        timeout: Duration,
    ) -> Result<proto::ProduceResponse, Status> {
        let deadline = Instant::now() + timeout;
        let node = &self.inner.nodes[index];
        // A request too large for one stream message goes unary, so that its own failure
        // (e.g. over the server's message size) cannot break the stream other calls share.
        let small = prost::Message::encoded_len(&request) <= STREAM_REQUEST_BYTES_MAX;
        if small && self.inner.options.produce_stream && !node.unary_only.load(Ordering::Relaxed) {
            match self.pipe(node, deadline).await {
                Ok(pipe) => return pipe.produce(request, deadline).await,
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(endpoint = %node.address, "server has no ProduceStream; sending unary produce calls");
                    node.unary_only.store(true, Ordering::Relaxed);
                }
                Err(status) => return Err(status),
            }
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.log(node.channel.clone())
            .produce(timed(request, timeout))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The open ProduceStream to `node`, opened now when there is none or the last one broke.
    /// Calls that arrive while it opens wait for the same one. Nothing is sent before a stream
    /// is open, so every failure here, including `deadline` passing, wrote nothing.
    async fn pipe(&self, node: &Node, deadline: Instant) -> Result<Arc<Pipe>, Status> {
        let too_late = || {
            Status::unavailable(format!(
                "no produce stream to {} could be opened before the call's deadline; nothing was written",
                node.address
            ))
        };
        let mut slot = tokio::time::timeout_at(deadline, node.pipe.lock())
            .await
            .map_err(|_| too_late())?;
        if let Some(pipe) = slot.as_ref().filter(|pipe| pipe.is_open()) {
            return Ok(Arc::clone(pipe));
        }
        *slot = None;
        let open = Pipe::open(self.log(node.channel.clone()), Arc::clone(&node.address));
        let pipe = tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| too_late())?
            .map_err(|status| {
                if status.code() == tonic::Code::Unimplemented {
                    return status;
                }
                // Whatever the transport says (e.g. a stream refused after the node's GOAWAY).
                Status::unavailable(format!(
                    "could not open a produce stream to {}: {status}; nothing was written",
                    node.address
                ))
            })?;
        let pipe = Arc::new(pipe);
        *slot = Some(Arc::clone(&pipe));
        Ok(pipe)
    }

    /// The partition leaders of `topic`, looked up on first use and refreshed in the
    /// background when old or after a failure. `None` when unknown (the call then goes to the
    /// current endpoint, which forwards it).
    async fn route(&self, topic: &str) -> Option<Arc<TopicRoute>> {
        let (route, refresh) = self.inner.routes.get(topic);
        if !refresh || !self.inner.routes.start_refresh(topic) {
            return route;
        }
        let client = self.clone();
        let name = topic.to_owned();
        // A lookup must not eat a short request deadline.
        let limit = ROUTE_LOOKUP_TIMEOUT.min(self.inner.options.request_timeout / 4);
        let lookup = async move {
            match tokio::time::timeout(limit, client.lookup_route(&name)).await {
                Ok(Ok(found)) => client.inner.routes.set(&name, found),
                Ok(Err(ClientError::NotFound { .. })) => client.inner.routes.remove(&name),
                failed => {
                    // Remember that nothing is known, so that calls do not wait for a lookup
                    // again until the route is due for a refresh (in the background).
                    tracing::debug!(topic = %name, ?failed, "partition leader lookup failed");
                    client.inner.routes.set(&name, TopicRoute::new(Vec::new()));
                }
            }
            client.inner.routes.end_refresh(&name);
        };
        if route.is_some() {
            tokio::spawn(lookup);
            return route;
        }
        lookup.await;
        self.inner.routes.get(topic).0
    }

    async fn lookup_route(&self, topic: &str) -> Result<TopicRoute, ClientError> {
        let description = self.describe_topic(topic).await?;
        let known = {
            let indexes = self
                .inner
                .node_indexes
                .lock()
                .expect("lock is never poisoned");
            description
                .partitions
                .iter()
                .filter_map(|partition| partition.leader)
                .all(|leader| indexes.contains_key(&leader))
        };
        if !known {
            let status = self.cluster_status().await?;
            let mut indexes = self
                .inner
                .node_indexes
                .lock()
                .expect("lock is never poisoned");
            indexes.clear();
            for node in status.nodes {
                let wanted = authority_of(&node.address);
                let index = self
                    .inner
                    .nodes
                    .iter()
                    .position(|ours| ours.authority == wanted);
                indexes.insert(node.node_id, index);
            }
        }
        let indexes = self
            .inner
            .node_indexes
            .lock()
            .expect("lock is never poisoned");
        Ok(TopicRoute::new(
            description
                .partitions
                .iter()
                .map(|partition| {
                    partition
                        .leader
                        .and_then(|leader| indexes.get(&leader).copied().flatten())
                })
                .collect(),
        ))
    }
}

/// Answers each call of a merged request with its own share of the acks, in order.
fn reply_each(batch: Vec<Waiter>, mut acks: Vec<RecordAck>) {
    for waiter in batch {
        let rest = acks.split_off(waiter.records.len().min(acks.len()));
        let _ = waiter.reply.send(Ok(std::mem::replace(&mut acks, rest)));
    }
}

/// Answers every call of a merged request with the request's error.
fn fail_each(batch: Vec<Waiter>, error: &ClientError) {
    for waiter in batch {
        let _ = waiter.reply.send(Err(error.clone()));
    }
}

/// Whether a "nothing written" answer leaves a request's outcome as it was (a node could not
/// take it now), rather than refusing it for good.
fn settles_nothing(error: &ClientError) -> bool {
    error.is_retryable() || matches!(error, ClientError::ResourceExhausted { .. })
}

/// Whether a refusal says the partition's producer state and this client's disagree: it does
/// not know the producer, expects another sequence, or fenced a stamp of this client's own
/// older session.
async fn out_of_step(answer: &batch::Answer, session: Session, idempotence: &Idempotence) -> bool {
    use ordo_proto::errors::reason;
    let Err(ClientError::FailedPrecondition { reason, .. }) = answer else {
        return false;
    };
    match reason.as_deref() {
        Some(reason::UNKNOWN_PRODUCER | reason::OUT_OF_ORDER_SEQUENCE) => true,
        Some(reason::PRODUCER_FENCED) => idempotence
            .current()
            .await
            .is_some_and(|current| current != session),
        _ => false,
    }
}

/// Whether `error` is PRODUCER_FENCED.
fn fenced(error: &ClientError) -> bool {
    matches!(error, ClientError::FailedPrecondition { reason, .. }
        if reason.as_deref() == Some(ordo_proto::errors::reason::PRODUCER_FENCED))
}
