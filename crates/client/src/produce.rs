//! The produce path of [`Client`]: each call goes to its partition's leader when the client knows
//! it (`routing`), joins the partition's queue (`batch`), and travels pipelined on the node's
//! ProduceStream (`pipe`) or as a unary call, with bounded retries of what wrote nothing.

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
    /// Returns only once a quorum has the records durably committed. A call that fails with a
    /// retryable error (nothing was written) is retried on the next endpoint until the deadline;
    /// [`ClientError::OutcomeUnknown`] is returned as is and never retried, because the records
    /// may already be in the log.
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
                .send_produce(topic, partition, route, records, budget)
                .await;
        };
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
        if batch.len() == 1 {
            let waiter = batch.remove(0);
            let answer = self
                .send_produce(topic, Some(partition), route, waiter.records, budget)
                .await;
            let _ = waiter.reply.send(answer);
            return;
        }
        let records: Vec<proto::Record> = batch
            .iter()
            .flat_map(|waiter| waiter.records.iter().cloned())
            .collect();
        let answer = self
            .send_produce(topic, Some(partition), route.clone(), records, budget)
            .await;
        match answer {
            Ok(mut acks) => {
                for waiter in batch {
                    let rest = acks.split_off(waiter.records.len().min(acks.len()));
                    let _ = waiter.reply.send(Ok(std::mem::replace(&mut acks, rest)));
                }
            }
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
                            budget,
                        )
                        .await;
                    let _ = waiter.reply.send(answer);
                }
            }
            Err(error) => {
                for waiter in batch {
                    let _ = waiter.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// One produce request, with retries, within `budget`; sent to the partition's leader when
    /// the route knows it. A failure marks the route stale.
    async fn send_produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        route: Option<Arc<TopicRoute>>,
        records: Vec<proto::Record>,
        budget: Duration,
    ) -> batch::Answer {
        let sent = records.len();
        let leader = partition.and_then(|partition| route.as_ref()?.leader(partition));
        let request = proto::ProduceRequest {
            topic: topic.to_owned(),
            partition,
            records,
        };
        let result = self
            .call_indexed(leader, Effect::Write, budget, |index, timeout| {
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
