//! The gRPC services: public `ordo.v1.Log` and `ordo.v1.Admin` (`ordo.v1.ConsumerGroup` is in
//! `groups`), and the node-to-node `ordo.internal.v1.Internal`. Each handler converts wire structs to domain types at the edge,
//! calls the broker, and maps errors through `status::to_status`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ordo_broker::Broker;
use ordo_broker::BrokerError;
use ordo_broker::PartitionView;
use ordo_broker::ProducerStamp;
use ordo_broker::TopicView;
use ordo_broker::rpc;
use ordo_broker::rpc::MetaForward;
use ordo_proto::errors::reason;
use ordo_proto::internal as internal_pb;
use ordo_proto::v1 as pb;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;
use tracing::Instrument;

use crate::deadline;
use crate::deadline::request_timeout;
use crate::metrics::Metrics;
use crate::status;
use crate::status::invalid;
use crate::status::to_status;

/// Longest a Subscribe stream waits on one long poll before polling again.
const SUBSCRIBE_POLL: Duration = Duration::from_secs(5);
/// Answers buffered per Subscribe stream.
const SUBSCRIBE_BUFFER: usize = 4;

/// How long a ProduceStream keeps reading (and refusing) requests after shutdown begins.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);
/// Answers buffered per ProduceStream.
const PRODUCE_STREAM_BUFFER: usize = 64;
/// Deadline of an admin call (create or delete a topic, a forwarded metadata command) whose
/// caller set none.
const ADMIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Pause of a Subscribe stream after a read found no leader, before it polls again.
const SUBSCRIBE_LEADER_WAIT: Duration = Duration::from_millis(100);

/// Shared state of the services. Cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub(crate) broker: Broker,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) subscriptions: Arc<Semaphore>,
    /// Requests of one ProduceStream read ahead of their answers (grpc config).
    pub(crate) produce_stream_in_flight_max: usize,
    /// Turns true at shutdown; ProduceStreams stop reading then.
    pub(crate) shutdown: watch::Receiver<bool>,
}

fn partition_to_wire(partition: PartitionView) -> pb::PartitionDescription {
    pb::PartitionDescription {
        partition: partition.partition,
        leader: partition.leader,
        replicas: partition.replicas,
        high_watermark: partition.high_watermark,
        log_start_offset: partition.log_start_offset,
        bytes: partition.bytes,
        term: partition.term,
        replica_status: partition
            .lag
            .into_iter()
            .map(|(node_id, lag)| pb::ReplicaStatus { node_id, lag })
            .collect(),
    }
}

fn topic_to_wire(topic: TopicView) -> pb::TopicDescription {
    pb::TopicDescription {
        name: topic.name,
        replication_factor: topic.replication_factor,
        config: Some(pb::TopicConfig {
            entries: topic.config.into_iter().collect(),
        }),
        partitions: topic
            .partitions
            .into_iter()
            .map(partition_to_wire)
            .collect(),
    }
}

impl Services {
    /// One produce request, unary or from a stream: the broker call, its metrics, the answer.
    async fn produce_one(
        &self,
        request: pb::ProduceRequest,
        timeout: Duration,
    ) -> Result<pb::ProduceResponse, Status> {
        let started = Instant::now();
        let span =
            tracing::debug_span!("produce", node = self.broker.node_id(), topic = %request.topic);
        let count = request.records.len() as u64;
        let records = request.records.into_iter().map(Into::into).collect();
        let producer = request.producer.map(|producer| ProducerStamp {
            id: producer.producer_id,
            epoch: producer.producer_epoch,
            sequence: producer.sequence,
        });
        let result = self
            .broker
            .produce(
                &request.topic,
                request.partition,
                records,
                producer,
                timeout,
            )
            .instrument(span)
            .await;
        let result = result.map_err(to_status);
        Metrics::count(
            &self.metrics.produce_requests,
            result.as_ref().map(|_| ()).map_err(Status::code),
        );
        let produced = result?;
        if produced.duplicate {
            self.metrics.produce_duplicates.inc();
        } else {
            self.metrics.produce_records.inc_by(count);
        }
        self.metrics
            .produce_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(pb::ProduceResponse {
            acks: produced
                .acks
                .into_iter()
                .map(|(partition, offset)| pb::RecordAck { partition, offset })
                .collect(),
            duplicate: produced.duplicate,
        })
    }

    /// Serves one ProduceStream: reads requests while fewer than
    /// `produce_stream_in_flight_max` are unanswered, runs them concurrently, and sends each
    /// answer as it completes. Ends when the client closes its side and every answer is sent,
    /// or when the client goes away (unanswered requests are dropped; the broker finishes or
    /// abandons their appends on its own).
    ///
    /// At shutdown it drains: requests read from then on are answered at once with UNAVAILABLE,
    /// reason `SHUTTING_DOWN` (nothing written; the client retries elsewhere and stops using the
    /// stream), so that requests already on the wire do not end as unknown outcomes. After
    /// [`SHUTDOWN_DRAIN`] it stops reading and ends once the requests it took are answered.
    async fn run_produce_stream(
        self,
        mut inbound: Streaming<pb::ProduceStreamRequest>,
        sender: mpsc::Sender<Result<pb::ProduceStreamResponse, Status>>,
    ) {
        let mut shutdown = self.shutdown.clone();
        let mut pending = FuturesUnordered::new();
        // Answers ready while the client is not reading; counted with `pending` against the
        // read-ahead bound, so that requests keep completing (and releasing their permits).
        let mut unsent: VecDeque<pb::ProduceStreamResponse> = VecDeque::new();
        // The error that broke the client's side, sent after the answers to what was read.
        let mut broken: Option<Status> = None;
        let mut reading = true;
        let mut draining = false;
        let drain_end = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drain_end);
        self.metrics.produce_streams.inc();
        loop {
            if !reading && pending.is_empty() && unsent.is_empty() {
                if let Some(status) = broken.take() {
                    let _ = sender.send(Err(status)).await;
                }
                break;
            }
            let room = pending.len() + unsent.len() < self.produce_stream_in_flight_max;
            tokio::select! {
                message = inbound.message(), if reading && room => match message {
                    Ok(Some(message)) => pending.push(self.produce_streamed(message, draining)),
                    Ok(None) => reading = false,
                    Err(status) => {
                        // E.g. a message over grpc.message_bytes_max: the requests already read
                        // are still answered, then the stream ends with this status.
                        tracing::debug!(%status, "produce stream broke");
                        reading = false;
                        broken = Some(status);
                    }
                },
                Some(answer) = pending.next() => match sender.try_send(Ok(answer)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Ok(answer))) => unsent.push_back(answer),
                    Err(_closed) => break,
                },
                permit = sender.reserve(), if !unsent.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(answer) = unsent.pop_front() {
                            permit.send(Ok(answer));
                        }
                    }
                    Err(_closed) => break,
                },
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if !draining => {
                    draining = true;
                    drain_end.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_DRAIN);
                }
                () = &mut drain_end, if reading => reading = false,
                _ = sender.closed() => break,
                else => break,
            }
        }
        self.metrics.produce_streams.dec();
    }

    /// One request of a ProduceStream, answered with its id.
    /// When `draining`, it is refused as UNAVAILABLE / `SHUTTING_DOWN` without being run.
    async fn produce_streamed(
        &self,
        message: pb::ProduceStreamRequest,
        draining: bool,
    ) -> pb::ProduceStreamResponse {
        if draining {
            return stream_answer(
                message.id,
                Err(status::shutting_down(self.broker.node_id())),
            );
        }
        let default = self.broker.limits().produce_timeout();
        let timeout = match message.timeout_ms {
            0 => default,
            millis => deadline::answer_within(Duration::from_millis(u64::from(millis)), default),
        };
        let result = match message.request {
            Some(request) => self.produce_one(request, timeout).await,
            None => Err(invalid(
                reason::MISSING_REQUEST,
                "a ProduceStreamRequest needs its request field",
            )),
        };
        stream_answer(message.id, result)
    }
}

/// The answer to request `id` of a ProduceStream: the response, or the status a unary call
/// would have ended with.
fn stream_answer(
    id: u64,
    result: Result<pb::ProduceResponse, Status>,
) -> pb::ProduceStreamResponse {
    pb::ProduceStreamResponse {
        id,
        result: Some(match result {
            Ok(response) => pb::produce_stream_response::Result::Response(response),
            Err(status) => pb::produce_stream_response::Result::Error(pb::StreamStatus {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: status.details().to_vec().into(),
            }),
        }),
    }
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(rpc::FORWARDED_HEADER)
}

#[tonic::async_trait]
impl pb::log_server::Log for Services {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let timeout = request_timeout(request.metadata(), self.broker.limits().produce_timeout());
        self.produce_one(request.into_inner(), timeout)
            .await
            .map(Response::new)
    }

    type ProduceStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::ProduceStreamResponse, Status>> + Send + 'static>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(PRODUCE_STREAM_BUFFER);
        let services = self.clone();
        let span = tracing::debug_span!("produce_stream", node = self.broker.node_id());
        tokio::spawn(
            services
                .run_produce_stream(inbound, sender)
                .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let result = self
            .broker
            .fetch(
                &request.topic,
                request.partition,
                request.offset,
                u64::from(request.max_bytes),
                Duration::from_millis(u64::from(request.max_wait_ms)),
                forwarded,
            )
            .await
            .map_err(to_status);
        Metrics::count(
            &self.metrics.fetch_requests,
            result.as_ref().map(|_| ()).map_err(Status::code),
        );
        let outcome = result?;
        Ok(Response::new(rpc::fetch_into_wire(
            request.partition,
            outcome,
        )))
    }

    async fn init_producer(
        &self,
        request: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let timeout = request_timeout(request.metadata(), self.broker.limits().produce_timeout());
        let request = request.into_inner();
        let (producer_id, producer_epoch) = self
            .broker
            .init_producer(Some(request.producer_name), request.request_token, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::InitProducerResponse {
            producer_id,
            producer_epoch,
        }))
    }

    async fn offsets_for_time(
        &self,
        request: Request<pb::OffsetsForTimeRequest>,
    ) -> Result<Response<pb::OffsetsForTimeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let answer = self
            .broker
            .offset_for_time(
                &request.topic,
                request.partition,
                request.timestamp_ms,
                forwarded,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::OffsetsForTimeResponse {
            offset: answer.found.map(|(offset, _)| offset),
            timestamp_ms: answer.found.map(|(_, timestamp)| timestamp),
            high_watermark: answer.high_watermark,
        }))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::FetchResponse, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let permit = self.subscriptions.clone().try_acquire_owned().map_err(|_| {
            to_status(BrokerError::ResourceExhausted(
                "too many Subscribe streams open on this node (grpc.subscriptions_max); close some or use Fetch".into(),
            ))
        })?;
        let broker = self.broker.clone();
        let topic = request.topic.clone();
        let partition = request.partition;
        let max_bytes = u64::from(request.max_bytes);
        // Resolve the start offset now, so a bad topic or offset fails the call itself.
        let (start, end) = match broker
            .fetch(&topic, partition, 0, 1, Duration::ZERO, false)
            .await
        {
            Ok(probe) => (probe.log_start_offset, probe.high_watermark),
            // Retention moved the start past 0: the answer names the range.
            Err(BrokerError::OffsetOutOfRange { start, end, .. }) => (start, end),
            Err(error) => return Err(to_status(error)),
        };
        let mut offset = match request.start {
            Some(pb::subscribe_request::Start::Offset(offset)) => {
                if offset > end || offset < start {
                    return Err(to_status(BrokerError::OffsetOutOfRange {
                        offset,
                        start,
                        end,
                    }));
                }
                offset
            }
            Some(pb::subscribe_request::Start::FromEnd(true)) => end,
            _ => start,
        };
        let (sender, receiver) = mpsc::channel(SUBSCRIBE_BUFFER);
        let metrics = self.metrics.clone();
        metrics.subscriptions.inc();
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let fetched = tokio::select! {
                    fetched = broker.fetch(&topic, partition, offset, max_bytes, SUBSCRIBE_POLL, false) => fetched,
                    _ = sender.closed() => break,
                };
                match fetched {
                    Ok(outcome) => {
                        let Some(last) = outcome.records.last().map(|record| record.offset) else {
                            continue;
                        };
                        offset = last + 1;
                        let answer = rpc::fetch_into_wire(partition, outcome);
                        if sender.send(Ok(answer)).await.is_err() {
                            break;
                        }
                    }
                    Err(BrokerError::Unavailable { .. }) => {
                        // A leader change: keep following once a replica answers again.
                        tokio::time::sleep(SUBSCRIBE_LEADER_WAIT).await;
                    }
                    Err(error) => {
                        let _ = sender.send(Err(to_status(error))).await;
                        break;
                    }
                }
            }
            metrics.subscriptions.dec();
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Services {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let request = request.into_inner();
        let config = request
            .config
            .map(|config| config.entries.into_iter().collect())
            .unwrap_or_default();
        let topic = self
            .broker
            .create_topic(
                &request.name,
                request.partitions,
                request.replication_factor,
                config,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(topic_to_wire(topic)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        self.broker
            .delete_topic(&request.into_inner().name, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .broker
            .list_topics()
            .into_iter()
            .map(|topic| pb::TopicSummary {
                name: topic.name,
                partitions: topic.partitions.len() as u32,
                replication_factor: topic.replication_factor,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let topic = self
            .broker
            .describe_topic(&request.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(topic_to_wire(topic)),
        }))
    }

    async fn alter_topic_config(
        &self,
        request: Request<pb::AlterTopicConfigRequest>,
    ) -> Result<Response<pb::AlterTopicConfigResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let request = request.into_inner();
        let topic = self
            .broker
            .alter_topic_config(
                &request.name,
                request.set.into_iter().collect(),
                request.remove,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AlterTopicConfigResponse {
            topic: Some(topic_to_wire(topic)),
        }))
    }

    async fn add_partitions(
        &self,
        request: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::AddPartitionsResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let request = request.into_inner();
        let topic = self
            .broker
            .add_partitions(&request.name, request.partitions, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AddPartitionsResponse {
            topic: Some(topic_to_wire(topic)),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let view = self.broker.cluster_status().await;
        Ok(Response::new(pb::ClusterStatusResponse {
            answered_by: view.answered_by,
            metadata_leader: view.metadata_leader,
            metadata_term: view.metadata_term,
            nodes: view
                .nodes
                .into_iter()
                .map(|node| pb::NodeStatus {
                    node_id: node.node_id,
                    address: node.address,
                    reachable: node.reachable,
                    leader_count: node.leader_count,
                    replica_count: node.replica_count,
                    state: node.state.to_string(),
                    metadata_role: node.metadata_role.to_string(),
                })
                .collect(),
            topics: view.topics,
            partitions: view.partitions,
            moves: moves_to_wire(view.moves),
        }))
    }

    async fn reassign_partitions(
        &self,
        request: Request<pb::ReassignPartitionsRequest>,
    ) -> Result<Response<pb::ReassignPartitionsResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let request = request.into_inner();
        if request.assignments.is_empty() {
            return Err(invalid(
                reason::MISSING_REQUEST,
                "a reassignment names at least one partition and its new replicas",
            ));
        }
        let plan = request
            .assignments
            .into_iter()
            .map(|assignment| (assignment.partition, assignment.replicas))
            .collect();
        let moves = self
            .broker
            .reassign_partitions(&request.topic, plan, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReassignPartitionsResponse {
            moves: moves_to_wire(moves),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let moves = self
            .broker
            .drain_node(request.into_inner().node_id, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DrainNodeResponse {
            moves: moves_to_wire(moves),
        }))
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let moves = self.broker.rebalance(timeout).await.map_err(to_status)?;
        Ok(Response::new(pb::RebalanceResponse {
            moves: moves_to_wire(moves),
        }))
    }
}

fn moves_to_wire(moves: Vec<ordo_broker::MoveView>) -> Vec<pb::ReplicaMove> {
    moves
        .into_iter()
        .map(|view| pb::ReplicaMove {
            owner: view.owner,
            partition: view.partition,
            from: view.from,
            to: view.to,
        })
        .collect()
}

#[tonic::async_trait]
impl internal_pb::internal_server::Internal for Services {
    async fn raft(
        &self,
        request: Request<internal_pb::RaftRequest>,
    ) -> Result<Response<internal_pb::RaftResponse>, Status> {
        let request = request.into_inner();
        let kind = internal_pb::RaftKind::try_from(request.kind).map_err(|_| {
            invalid(
                reason::BAD_RAFT_KIND,
                format!("unknown raft message kind {}", request.kind),
            )
        })?;
        let payload = self
            .broker
            .raft()
            .handle_raft(ordo_raft::GroupId(request.group), kind, &request.payload)
            .await;
        Ok(Response::new(internal_pb::RaftResponse {
            payload: payload.into(),
        }))
    }

    async fn forward_produce(
        &self,
        request: Request<internal_pb::ForwardProduceRequest>,
    ) -> Result<Response<internal_pb::ForwardProduceResponse>, Status> {
        let timeout = request_timeout(request.metadata(), self.broker.limits().produce_timeout());
        let request = request.into_inner();
        let producer = request
            .producer
            .as_ref()
            .map(ordo_broker::rpc::stamp_from_wire);
        let outcome = self
            .broker
            .handle_forward_produce(
                request.group,
                request.count,
                request.batch,
                producer,
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(outcome.into_wire()))
    }

    async fn forward_meta(
        &self,
        request: Request<internal_pb::ForwardMetaRequest>,
    ) -> Result<Response<internal_pb::ForwardMetaResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let answer: MetaForward = self
            .broker
            .handle_forward_meta(request.into_inner().command, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(answer.into_wire()))
    }

    async fn meta_read_index(
        &self,
        _request: Request<internal_pb::MetaReadIndexRequest>,
    ) -> Result<Response<internal_pb::MetaReadIndexResponse>, Status> {
        let index = self.broker.handle_meta_read_index().await;
        Ok(Response::new(rpc::read_index_into_wire(index)))
    }

    async fn meta_applied(
        &self,
        request: Request<internal_pb::MetaAppliedRequest>,
    ) -> Result<Response<internal_pb::MetaAppliedResponse>, Status> {
        let timeout = request_timeout(request.metadata(), Duration::from_secs(2));
        let applied = self
            .broker
            .handle_meta_applied(request.get_ref().index, timeout)
            .await;
        Ok(Response::new(internal_pb::MetaAppliedResponse { applied }))
    }

    async fn ping(
        &self,
        _request: Request<internal_pb::PingRequest>,
    ) -> Result<Response<internal_pb::PingResponse>, Status> {
        Ok(Response::new(internal_pb::PingResponse {
            node_id: self.broker.node_id(),
            draining: self.broker.raft().draining(),
            formed: self.broker.raft().meta_formed(),
        }))
    }

    async fn join(
        &self,
        request: Request<internal_pb::JoinRequest>,
    ) -> Result<Response<internal_pb::JoinResponse>, Status> {
        let timeout = request_timeout(request.metadata(), ADMIN_TIMEOUT_DEFAULT);
        let request = request.into_inner();
        self.broker
            .join(request.node_id, &request.address, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(internal_pb::JoinResponse {}))
    }

    async fn forward_coordinator(
        &self,
        request: Request<internal_pb::ForwardCoordinatorRequest>,
    ) -> Result<Response<internal_pb::ForwardCoordinatorResponse>, Status> {
        let timeout = request_timeout(
            request.metadata(),
            self.broker.groups_config().call_timeout(),
        );
        let request = request.into_inner();
        let outcome = self
            .broker
            .handle_forward_coordinator(request.group, &request.request, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(internal_pb::ForwardCoordinatorResponse {
            outcome,
        }))
    }

    async fn group_status(
        &self,
        request: Request<internal_pb::GroupStatusRequest>,
    ) -> Result<Response<internal_pb::GroupStatusResponse>, Status> {
        let groups = self.broker.local_status(&request.into_inner().groups);
        Ok(Response::new(internal_pb::GroupStatusResponse {
            node_id: self.broker.node_id(),
            groups: groups
                .into_iter()
                .map(rpc::group_status_into_wire)
                .collect(),
        }))
    }
}
