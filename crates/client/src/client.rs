//! The [`Client`]: one lazily connected gRPC channel per endpoint, a deadline on every call, and
//! bounded retries of calls that wrote nothing.
//!
//! This module owns endpoints, deadlines and retries. It never interprets a `Status` itself
//! (`error.rs` does) and never touches a wire struct field by field (`convert.rs` does).
//!
//! Endpoint choice is sticky: calls go to the current endpoint until a retryable error
//! ([`ClientError::is_retryable`]) moves the client to the leader the error hints at, when that
//! is one of its endpoints, or else to the next endpoint in turn. Any node accepts any call and
//! forwards it, so stickiness only saves connections; it is never needed for correctness.
//! Produce calls are the exception: they go first to their partition's leader when the client
//! knows it (`routing`), which saves the forwarding hop; that path is in `produce.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ordo_proto::v1 as proto;
use ordo_proto::v1::admin_client::AdminClient;
use ordo_proto::v1::log_client::LogClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::batch::Batcher;
use crate::convert;
use crate::error::{ClientError, Effect};
use crate::idempotence::Idempotence;
use crate::pipe::Pipe;
use crate::routing::Routes;
use crate::subscribe::Subscription;
use crate::types::{
    ClusterStatus, FetchResult, ReplicaMove, StartAt, TopicDescription, TopicSummary,
};

/// Tunables of a [`Client`]. Every field has a documented default; build with
/// `ClientOptions { request_timeout: .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of each call, retries included; sent to the server as the gRPC timeout.
    /// A fetch's deadline is this plus its `max_wait`. Default 10 s.
    pub request_timeout: Duration,
    /// How long the client waits past a deadline for the server's own answer before giving up
    /// locally, so that a server-decided outcome wins over a local guess. Default 500 ms.
    pub deadline_grace: Duration,
    /// Bound on establishing a TCP connection to one endpoint. Default 2 s.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings, which detect a dead peer on an idle or streaming
    /// connection. Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed. Default 5 s.
    pub keepalive_timeout: Duration,
    /// First pause before retrying a call on another endpoint; doubles per retry. Default 50 ms.
    pub retry_backoff_initial: Duration,
    /// Largest pause between retries. Default 250 ms: a leader election takes 1-2 s, and a
    /// longer pause would add up to itself to every failover.
    pub retry_backoff_max: Duration,
    /// Most retries of one call (the deadline usually ends them first). Default 64.
    pub retries_max: u32,
    /// Most consecutive failed attempts to (re)open a subscription before its stream ends with
    /// the last error. Reset by every message received. Default 10.
    pub subscribe_retries_max: u32,
    /// Largest response message the client decodes, in bytes. Default 64 MiB.
    pub response_bytes_max: usize,
    /// Send produce calls pipelined on one `ProduceStream` per endpoint (default, true) rather
    /// than as one unary `Produce` call each. Same semantics either way; the stream saves the
    /// per-call HTTP/2 stream. A server without ProduceStream is detected and gets unary calls;
    /// so do requests over 4 MiB, whose own failure must not break the shared stream.
    pub produce_stream: bool,
    /// Produce requests in flight per partition before further calls to it queue in the client
    /// and leave together, as one request, when one completes (Kafka's record accumulator with
    /// `linger.ms = 0`: a call never waits for company). Applies to calls whose partition is
    /// known here (given, or chosen for keyless records); each call still gets its own acks.
    /// 0 turns batching off: every call is its own request. Default 1, which measured best
    /// (`docs/benchmarks.md`); it also means a request and its retries end before the next
    /// request to its partition leaves.
    pub produce_requests_per_partition_max: usize,
    /// Largest merged produce request, in bytes of records. A call larger than this is still
    /// sent, alone. Default 1 MiB.
    pub produce_batch_bytes_max: usize,
    /// Idempotent produce (default true): the client gets a producer session from the cluster
    /// (`InitProducer`) and stamps every request with its per-partition sequence, so a retry,
    /// the client's or after an unknown outcome, is never written twice. Requests of one
    /// partition then leave one at a time (`produce_requests_per_partition_max` is taken as 1).
    /// False sends plain produce requests, as clients did before idempotence.
    pub idempotence: bool,
    /// The producer name given to `InitProducer` (default none: a new producer id per client).
    /// A client restarted with the same name keeps the producer id with a new epoch, and the
    /// cluster refuses the older instance's produce requests (PRODUCER_FENCED).
    pub producer_name: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(10),
            deadline_grace: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            retry_backoff_initial: Duration::from_millis(50),
            retry_backoff_max: Duration::from_millis(250),
            retries_max: 64,
            subscribe_retries_max: 10,
            response_bytes_max: 64 * 1024 * 1024,
            produce_stream: true,
            produce_requests_per_partition_max: 1,
            produce_batch_bytes_max: 1 << 20,
            idempotence: true,
            producer_name: None,
        }
    }
}

/// A handle to an Ordo cluster. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientState>,
}

/// What the clones of one client share.
#[derive(Debug)]
pub(crate) struct ClientState {
    pub(crate) nodes: Vec<Node>,
    /// Index into `nodes` of the endpoint calls go to, modulo `nodes.len()`.
    current: AtomicUsize,
    pub(crate) options: ClientOptions,
    /// Partition leaders of topics produced to (see `routing`).
    pub(crate) routes: Routes,
    /// Node id -> index into `nodes`, from ClusterStatus; `None` for nodes not among ours.
    pub(crate) node_indexes: Mutex<HashMap<u64, Option<usize>>>,
    /// Queues of produce calls per partition (see `batch`); `None` when batching is off.
    pub(crate) batcher: Option<Arc<Batcher>>,
    /// The producer session and sequences (see `idempotence`); `None` when idempotence is off.
    pub(crate) idempotence: Option<Idempotence>,
}

/// One endpoint and its channel.
#[derive(Debug)]
pub(crate) struct Node {
    /// The endpoint URI, e.g. `http://127.0.0.1:7001`, as reported in errors.
    pub(crate) address: Arc<str>,
    /// `host:port`, to match a leader address hinted by the server.
    pub(crate) authority: String,
    pub(crate) channel: Channel,
    /// The open ProduceStream to this endpoint, if any (see `pipe`).
    pub(crate) pipe: tokio::sync::Mutex<Option<Arc<Pipe>>>,
    /// Set when this endpoint answered UNIMPLEMENTED to ProduceStream (an older server).
    pub(crate) unary_only: AtomicBool,
}

/// A random non-zero u64 (std's per-process random hash keys, with the clock).
fn random_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.finish().max(1)
}

/// The endpoint a call went to, for mapping errors that arrive later (on a stream).
pub(crate) type EndpointName = Arc<str>;

impl Client {
    /// Creates a client for `endpoints` (`127.0.0.1:7001` or `http://127.0.0.1:7001`) with
    /// default [`ClientOptions`].
    ///
    /// Connections are made lazily, on first use, so this fails only on an empty list or an
    /// invalid address. It must run inside a tokio runtime: each channel spawns its worker task.
    pub async fn connect(
        endpoints: impl IntoIterator<Item = String>,
    ) -> Result<Client, ClientError> {
        Self::connect_with_options(endpoints, ClientOptions::default()).await
    }

    /// Creates a client for `endpoints` with `options`. See [`Client::connect`].
    pub async fn connect_with_options(
        endpoints: impl IntoIterator<Item = String>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let mut nodes = Vec::new();
        for endpoint in endpoints {
            let endpoint = endpoint.trim();
            if endpoint.is_empty() {
                continue;
            }
            nodes.push(Node::new(endpoint, &options)?);
        }
        if nodes.is_empty() {
            return Err(ClientError::InvalidEndpoint {
                endpoint: String::new(),
                message: "no endpoint given".to_owned(),
            });
        }
        // Sequences must reach a partition in order: with idempotence, one request of a
        // partition at a time.
        let requests_per_partition = if options.idempotence {
            1
        } else {
            options.produce_requests_per_partition_max
        };
        let batcher = (requests_per_partition > 0).then(|| {
            Arc::new(Batcher::new(
                requests_per_partition,
                options.produce_batch_bytes_max,
            ))
        });
        let idempotence = options
            .idempotence
            .then(|| Idempotence::new(options.producer_name.clone()));
        Ok(Client {
            inner: Arc::new(ClientState {
                batcher,
                idempotence,
                nodes,
                current: AtomicUsize::new(0),
                options,
                routes: Routes::default(),
                node_indexes: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The endpoint URIs this client uses, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .nodes
            .iter()
            .map(|node| node.address.to_string())
            .collect()
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Reads committed records of `partition` of `topic` from `offset`, up to about `max_bytes`
    /// (at least one record when any is available). When `offset` is at the end of the log the
    /// server waits up to `max_wait` for records; the call's deadline is extended by `max_wait`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<FetchResult, ClientError> {
        let request = proto::FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes,
            max_wait_ms: u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX),
        };
        let (response, _) = self
            .call(Effect::Read, max_wait, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.log(channel).fetch(request).await }
            })
            .await?;
        Ok(FetchResult::from(response.into_inner()))
    }

    /// Streams committed records of `partition` of `topic` from `start`, then follows the tail.
    ///
    /// The first connection is made before this returns, so an unknown topic fails here. Later,
    /// when the stream breaks with a retryable error, the subscription reopens on the next
    /// endpoint after the last offset it delivered (up to
    /// [`ClientOptions::subscribe_retries_max`] consecutive failures); any other error is yielded
    /// once and ends the stream.
    pub async fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
        max_bytes: u32,
    ) -> Result<Subscription, ClientError> {
        let (stream, endpoint) = self
            .open_subscription(topic, partition, start, max_bytes)
            .await?;
        Ok(Subscription::new(
            self.clone(),
            topic.to_owned(),
            partition,
            start,
            max_bytes,
            stream,
            endpoint,
        ))
    }

    /// Opens one Subscribe stream, retrying retryable errors like any call. The deadline covers
    /// only opening: the stream itself has none, or it would end after the deadline.
    pub(crate) async fn open_subscription(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
        max_bytes: u32,
    ) -> Result<(tonic::Streaming<proto::FetchResponse>, EndpointName), ClientError> {
        let request = proto::SubscribeRequest {
            topic: topic.to_owned(),
            partition,
            max_bytes,
            start: Some(start.into()),
        };
        let (response, endpoint) = self
            .call(Effect::Read, Duration::ZERO, |channel, _timeout| {
                let request = Request::new(request.clone());
                async move { self.log(channel).subscribe(request).await }
            })
            .await?;
        Ok((response.into_inner(), endpoint))
    }

    /// Creates `name` with `partitions` partitions of `replication_factor` replicas each.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
    ) -> Result<TopicDescription, ClientError> {
        self.create_topic_with_config(name, partitions, replication_factor, &[])
            .await
    }

    /// Creates a topic with config entries (`retention.ms`, `retention.bytes`, ... see the
    /// proto's `TopicConfig`).
    pub async fn create_topic_with_config(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: &[(String, String)],
    ) -> Result<TopicDescription, ClientError> {
        let request = proto::CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            config: (!config.is_empty()).then(|| proto::TopicConfig {
                entries: config.iter().cloned().collect(),
            }),
        };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.admin(channel).create_topic(request).await }
            })
            .await?;
        convert::required_topic(response.into_inner().topic, "create topic")
    }

    /// Allocates a producer session (`Log/InitProducer`): a producer id and epoch, for callers
    /// that stamp produce requests themselves. With `name`, a later call with the same name
    /// returns the same id with a higher epoch, fencing the older one. The client's own
    /// idempotent produce calls do this by themselves.
    pub async fn init_producer(&self, name: Option<&str>) -> Result<(u64, u32), ClientError> {
        self.init_producer_within(name, self.inner.options.request_timeout)
            .await
    }

    /// [`Client::init_producer`] within `budget`. A retry after an unknown outcome only costs a
    /// producer id (or an epoch), so every failure is retried.
    pub(crate) async fn init_producer_within(
        &self,
        name: Option<&str>,
        budget: Duration,
    ) -> Result<(u64, u32), ClientError> {
        // One token for every attempt: the cluster raises a named producer's epoch once for
        // them all, so a retry cannot fence this client with its own earlier attempt.
        let request = proto::InitProducerRequest {
            producer_name: name.unwrap_or_default().to_owned(),
            request_token: random_token(),
        };
        let (response, _) = self
            .call_indexed(None, Effect::IdempotentWrite, budget, |index, timeout| {
                let request = timed(request.clone(), timeout);
                let channel = self.inner.nodes[index].channel.clone();
                async move { self.log(channel).init_producer(request).await }
            })
            .await?;
        let response = response.into_inner();
        Ok((response.producer_id, response.producer_epoch))
    }

    /// Deletes topic `name` and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = proto::DeleteTopicRequest {
            name: name.to_owned(),
        };
        self.call(Effect::Write, Duration::ZERO, |channel, timeout| {
            let request = timed(request.clone(), timeout);
            async move { self.admin(channel).delete_topic(request).await }
        })
        .await?;
        Ok(())
    }

    /// Changes a topic's config: sets the keys of `set`, removes those of `remove` (back to
    /// the cluster default). Returns the topic as it is then.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: &[(String, String)],
        remove: &[String],
    ) -> Result<TopicDescription, ClientError> {
        let request = proto::AlterTopicConfigRequest {
            name: name.to_owned(),
            set: set.iter().cloned().collect(),
            remove: remove.to_vec(),
        };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.admin(channel).alter_topic_config(request).await }
            })
            .await?;
        convert::required_topic(response.into_inner().topic, "alter topic config")
    }

    /// Raises a topic's partition count to `partitions` (never lowers it; the same count
    /// changes nothing). Keys move: a key's partition is its hash modulo the count. Returns the
    /// topic as it is then.
    pub async fn add_partitions(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<TopicDescription, ClientError> {
        let request = proto::AddPartitionsRequest {
            name: name.to_owned(),
            partitions,
        };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.admin(channel).add_partitions(request).await }
            })
            .await?;
        let topic = convert::required_topic(response.into_inner().topic, "add partitions")?;
        // Routes cached for the old count would never pick the new partitions.
        self.inner.routes.remove(name);
        Ok(topic)
    }

    /// Starts moving partitions of `topic` to new replicas: `(partition, replicas)`, the first
    /// replica the preferred leader. Returns the moves started; [`Client::cluster_status`]
    /// shows them until they finish.
    pub async fn reassign_partitions(
        &self,
        topic: &str,
        plan: &[(u32, Vec<u64>)],
    ) -> Result<Vec<ReplicaMove>, ClientError> {
        let request = proto::ReassignPartitionsRequest {
            topic: topic.to_owned(),
            assignments: plan
                .iter()
                .map(|(partition, replicas)| proto::PartitionAssignment {
                    partition: *partition,
                    replicas: replicas.clone(),
                })
                .collect(),
        };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.admin(channel).reassign_partitions(request).await }
            })
            .await?;
        self.inner.routes.remove(topic);
        Ok(moves(response.into_inner().moves))
    }

    /// Starts moving every replica off node `node_id`; it leaves the cluster once it holds
    /// none.
    pub async fn drain_node(&self, node_id: u64) -> Result<Vec<ReplicaMove>, ClientError> {
        let request = proto::DrainNodeRequest { node_id };
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(request, timeout);
                async move { self.admin(channel).drain_node(request).await }
            })
            .await?;
        Ok(moves(response.into_inner().moves))
    }

    /// Starts the moves that spread replicas and preferred leaders evenly over the nodes.
    pub async fn rebalance(&self) -> Result<Vec<ReplicaMove>, ClientError> {
        let (response, _) = self
            .call(Effect::Write, Duration::ZERO, |channel, timeout| {
                let request = timed(proto::RebalanceRequest {}, timeout);
                async move { self.admin(channel).rebalance(request).await }
            })
            .await?;
        Ok(moves(response.into_inner().moves))
    }

    /// Lists every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>, ClientError> {
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(proto::ListTopicsRequest {}, timeout);
                async move { self.admin(channel).list_topics(request).await }
            })
            .await?;
        let mut topics: Vec<TopicSummary> = response
            .into_inner()
            .topics
            .into_iter()
            .map(TopicSummary::from)
            .collect();
        topics.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(topics)
    }

    /// Describes topic `name` and each of its partitions.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        let request = proto::DescribeTopicRequest {
            name: name.to_owned(),
        };
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(request.clone(), timeout);
                async move { self.admin(channel).describe_topic(request).await }
            })
            .await?;
        convert::required_topic(response.into_inner().topic, "describe topic")
    }

    /// The cluster's nodes and metadata leader, as seen by the node that answers.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let (response, _) = self
            .call(Effect::Read, Duration::ZERO, |channel, timeout| {
                let request = timed(proto::ClusterStatusRequest {}, timeout);
                async move { self.admin(channel).cluster_status(request).await }
            })
            .await?;
        Ok(ClusterStatus::from(response.into_inner()))
    }

    /// The channel of endpoint `index`.
    pub(crate) fn channel(&self, index: usize) -> Channel {
        self.inner.nodes[index].channel.clone()
    }

    pub(crate) fn log(&self, channel: Channel) -> LogClient<Channel> {
        LogClient::new(channel).max_decoding_message_size(self.inner.options.response_bytes_max)
    }

    fn admin(&self, channel: Channel) -> AdminClient<Channel> {
        AdminClient::new(channel).max_decoding_message_size(self.inner.options.response_bytes_max)
    }

    /// Runs `attempt` against the current endpoint, retrying retryable errors on other endpoints
    /// with exponential backoff, all within `request_timeout + extra`.
    ///
    /// `attempt` receives the channel and the time left, to send as the gRPC timeout. Each
    /// attempt is also bounded locally by the time left plus `deadline_grace`, so a server that
    /// never answers cannot hold the caller past its deadline.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        effect: Effect,
        extra: Duration,
        attempt: F,
    ) -> Result<(T, EndpointName), ClientError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_on(None, effect, extra, attempt).await
    }

    /// Like [`Client::call`], with the first attempt sent to endpoint `first` when given.
    pub(crate) async fn call_on<T, F, Fut>(
        &self,
        first: Option<usize>,
        effect: Effect,
        extra: Duration,
        mut attempt: F,
    ) -> Result<(T, EndpointName), ClientError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let budget = self.inner.options.request_timeout.saturating_add(extra);
        self.call_indexed(first, effect, budget, |index, remaining| {
            attempt(self.inner.nodes[index].channel.clone(), remaining)
        })
        .await
    }

    /// Like [`Client::call_on`], with `attempt` given the index of the endpoint instead of its
    /// channel, and a time `budget` for the call and its retries.
    pub(crate) async fn call_indexed<T, F, Fut>(
        &self,
        first: Option<usize>,
        effect: Effect,
        budget: Duration,
        mut attempt: F,
    ) -> Result<(T, EndpointName), ClientError>
    where
        F: FnMut(usize, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let options = &self.inner.options;
        let started = Instant::now();
        let mut backoff = options.retry_backoff_initial;
        let mut retries = 0_u32;
        let mut maybe_written = false;
        let mut first = first.filter(|index| *index < self.inner.nodes.len());
        loop {
            let index = first.take().unwrap_or_else(|| {
                self.inner.current.load(Ordering::Relaxed) % self.inner.nodes.len()
            });
            let node = &self.inner.nodes[index];
            let remaining = budget.saturating_sub(started.elapsed());
            let local_limit = remaining.saturating_add(options.deadline_grace);
            let outcome = tokio::time::timeout(local_limit, attempt(index, remaining)).await;
            let error = match outcome {
                Ok(Ok(value)) => return Ok((value, Arc::clone(&node.address))),
                Ok(Err(status)) => ClientError::from_status(status, effect, &node.address),
                Err(_elapsed) => {
                    return Err(ClientError::local_timeout(
                        effect,
                        &node.address,
                        local_limit,
                    ));
                }
            };
            let unknown = matches!(error, ClientError::OutcomeUnknown { .. });
            maybe_written |= unknown;
            // An idempotent produce is retried whatever the last attempt may have done; but once
            // an attempt may have written, a final failure cannot say "nothing written".
            let give_up = |error: ClientError| match error {
                error @ ClientError::OutcomeUnknown { .. } => error,
                error if maybe_written => ClientError::OutcomeUnknown {
                    message: format!(
                        "an earlier attempt may have been written; the last one failed: {error}"
                    ),
                },
                error => error,
            };
            if !(error.is_retryable() || (unknown && effect == Effect::IdempotentWrite)) {
                return Err(give_up(error));
            }
            self.move_after_failure(index, &error);
            let remaining = budget.saturating_sub(started.elapsed());
            if retries >= options.retries_max || remaining <= backoff {
                return Err(give_up(error));
            }
            retries += 1;
            tracing::debug!(
                endpoint = %node.address,
                %error,
                retry = retries,
                backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "retrying call on another endpoint"
            );
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(options.retry_backoff_max);
        }
    }

    /// Moves the current endpoint away from `failed`: to the hinted leader when it is one of
    /// ours, else to the next endpoint. Only the first of several concurrent failures of the
    /// same endpoint moves it, so they do not skip endpoints.
    pub(crate) fn move_after_failure(&self, failed: usize, error: &ClientError) {
        let count = self.inner.nodes.len();
        let hinted = match error {
            ClientError::Unavailable {
                leader_address: Some(address),
                ..
            } => {
                let wanted = authority_of(address);
                self.inner
                    .nodes
                    .iter()
                    .position(|node| node.authority == wanted)
            }
            _ => None,
        };
        let next = match hinted {
            Some(index) if index != failed => index,
            _ => (failed + 1) % count,
        };
        let current = self.inner.current.load(Ordering::Relaxed);
        if current % count == failed {
            // A lost race means another failure already moved the client; that choice stands.
            let _ = self.inner.current.compare_exchange(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Index of the endpoint named `endpoint`, for moving away from it after a stream broke.
    pub(crate) fn index_of(&self, endpoint: &str) -> Option<usize> {
        self.inner
            .nodes
            .iter()
            .position(|node| &*node.address == endpoint)
    }
}

impl Node {
    fn new(endpoint: &str, options: &ClientOptions) -> Result<Node, ClientError> {
        let address = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let invalid = |message: String| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            message,
        };
        let builder = Endpoint::from_shared(address.clone())
            .map_err(|error| invalid(error.to_string()))?
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let authority = builder
            .uri()
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .ok_or_else(|| invalid("no host:port".to_owned()))?;
        Ok(Node {
            address: Arc::from(address),
            authority,
            channel: builder.connect_lazy(),
            pipe: tokio::sync::Mutex::new(None),
            unary_only: AtomicBool::new(false),
        })
    }
}

/// The `host:port` part of an address given with or without a scheme.
pub(crate) fn authority_of(address: &str) -> &str {
    let without_scheme = address.split_once("://").map_or(address, |(_, rest)| rest);
    without_scheme.trim_end_matches('/')
}

/// A request with its gRPC timeout set.
pub(crate) fn timed<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader address matches an endpoint whether or not either carries a scheme.
    #[test]
    fn authority_ignores_scheme() {
        assert_eq!(authority_of("http://127.0.0.1:7001"), "127.0.0.1:7001");
        assert_eq!(authority_of("127.0.0.1:7002"), "127.0.0.1:7002");
        assert_eq!(authority_of("http://host:1/"), "host:1");
    }

    /// The defaults are the documented ones.
    #[test]
    fn default_options() {
        let options = ClientOptions::default();
        assert_eq!(options.request_timeout, Duration::from_secs(10));
        assert_eq!(options.connect_timeout, Duration::from_secs(2));
    }

    /// An empty endpoint list is rejected before any connection is attempted.
    #[tokio::test]
    async fn empty_endpoints_rejected() {
        let error = Client::connect(Vec::<String>::new())
            .await
            .expect_err("no endpoint");
        assert!(matches!(error, ClientError::InvalidEndpoint { .. }));
    }

    /// A retryable failure moves the client to the hinted leader, else to the next endpoint.
    /// Channels connect lazily, so no socket is opened.
    #[tokio::test]
    async fn failure_moves_to_hinted_leader_or_next() {
        let client = Client::connect(
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"].map(String::from),
        )
        .await
        .expect("valid endpoints");
        assert_eq!(client.endpoints()[0], "http://127.0.0.1:7001");
        let transport = ClientError::Transport {
            endpoint: "http://127.0.0.1:7001".into(),
            message: "refused".into(),
        };
        client.move_after_failure(0, &transport);
        assert_eq!(client.inner.current.load(Ordering::Relaxed), 1);
        // A stale failure of endpoint 0 does not move the client again.
        client.move_after_failure(0, &transport);
        assert_eq!(client.inner.current.load(Ordering::Relaxed), 1);
        let hint = ClientError::Unavailable {
            leader_hint: Some(3),
            leader_address: Some("127.0.0.1:7003".into()),
            message: "not leader".into(),
        };
        client.move_after_failure(1, &hint);
        assert_eq!(client.inner.current.load(Ordering::Relaxed), 2);
        client.move_after_failure(2, &transport);
        assert_eq!(client.inner.current.load(Ordering::Relaxed), 0);
        assert_eq!(client.index_of("http://127.0.0.1:7002"), Some(1));
    }

    fn three_endpoints() -> [String; 3] {
        ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"].map(String::from)
    }

    fn connect_refused() -> Status {
        Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"),
        ))))
    }

    /// Unreachable endpoints are tried in turn with backoff, and the call gives up by its
    /// deadline with the transport error. Time is paused, so the sleeps cost nothing.
    #[tokio::test(start_paused = true)]
    async fn unreachable_endpoints_are_tried_in_turn_until_deadline() {
        let options = ClientOptions {
            request_timeout: Duration::from_secs(1),
            ..ClientOptions::default()
        };
        let client = Client::connect_with_options(three_endpoints(), options)
            .await
            .expect("valid endpoints");
        let started = Instant::now();
        let mut attempts = 0_u32;
        let mut timeouts = Vec::new();
        let result: Result<((), EndpointName), ClientError> = client
            .call(Effect::Write, Duration::ZERO, |_channel, timeout| {
                attempts += 1;
                timeouts.push(timeout);
                async { Err(connect_refused()) }
            })
            .await;
        let error = result.expect_err("every endpoint refuses");
        assert!(matches!(error, ClientError::Transport { .. }), "{error:?}");
        assert!(attempts > 3, "only {attempts} attempts");
        assert!(started.elapsed() <= Duration::from_secs(1));
        // Each attempt is sent with the time left, never more than the deadline.
        assert_eq!(timeouts[0], Duration::from_secs(1));
        assert!(timeouts.windows(2).all(|pair| pair[1] < pair[0]));
    }

    /// A write whose outcome is unknown is returned after one attempt, never retried.
    #[tokio::test(start_paused = true)]
    async fn outcome_unknown_is_not_retried() {
        let client = Client::connect(three_endpoints())
            .await
            .expect("valid endpoints");
        let mut attempts = 0_u32;
        let result: Result<((), EndpointName), ClientError> = client
            .call(Effect::Write, Duration::ZERO, |_channel, _timeout| {
                attempts += 1;
                async { Err(Status::deadline_exceeded("proposed, not committed")) }
            })
            .await;
        assert!(matches!(result, Err(ClientError::OutcomeUnknown { .. })));
        assert_eq!(attempts, 1);
    }

    /// After an unavailable answer the call succeeds on the next endpoint, which stays current.
    #[tokio::test(start_paused = true)]
    async fn unavailable_then_success_on_next_endpoint() {
        let client = Client::connect(three_endpoints())
            .await
            .expect("valid endpoints");
        let mut attempts = 0_u32;
        let (value, endpoint) = client
            .call(Effect::Write, Duration::ZERO, |_channel, _timeout| {
                attempts += 1;
                let first = attempts == 1;
                async move {
                    if first {
                        Err(Status::unavailable("no leader yet"))
                    } else {
                        Ok(7_u32)
                    }
                }
            })
            .await
            .expect("second attempt succeeds");
        assert_eq!(value, 7);
        assert_eq!(&*endpoint, "http://127.0.0.1:7002");
        assert_eq!(client.inner.current.load(Ordering::Relaxed), 1);
    }

    /// A server that never answers cannot hold a write past its deadline plus the grace; the
    /// write is then reported as outcome unknown, a read as deadline exceeded.
    #[tokio::test(start_paused = true)]
    async fn silent_server_times_out_locally() {
        let client = Client::connect(three_endpoints())
            .await
            .expect("valid endpoints");
        let started = Instant::now();
        let write: Result<((), EndpointName), ClientError> = client
            .call(Effect::Write, Duration::ZERO, |_channel, _timeout| {
                futures::future::pending()
            })
            .await;
        assert!(matches!(write, Err(ClientError::OutcomeUnknown { .. })));
        assert_eq!(started.elapsed(), Duration::from_millis(10_500));
        let read: Result<((), EndpointName), ClientError> = client
            .call(
                Effect::Read,
                Duration::from_secs(5),
                |_channel, _timeout| futures::future::pending(),
            )
            .await;
        assert!(matches!(read, Err(ClientError::DeadlineExceeded { .. })));
    }
}

fn moves(moves: Vec<proto::ReplicaMove>) -> Vec<ReplicaMove> {
    moves.into_iter().map(ReplicaMove::from).collect()
}
