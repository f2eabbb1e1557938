//! The workload: producers sending keyed records with unique values through random nodes, with
//! retries, and one consumer per partition reading it from offset 0 and following its tail,
//! switching nodes now and then. Every call and its result goes to the history.
//!
//! Even-numbered producers send unary `Produce` calls and classify the raw statuses; odd ones
//! send through `ordo_client::Client`, which pipelines its calls on a `ProduceStream`, and
//! record the client's own verdict. So the checker also holds the client to its word: a call it
//! calls "not written" must not appear in the log.
//!
//! Idempotent runs (the default): unary producers get a producer session (`InitProducer`), send
//! each call to one partition (keys chosen among those of the partition) stamped with the
//! partition's next sequence, and retry the same request, same sequence, through random nodes
//! until it is answered (as a stub user following the contract would); client producers use
//! one idempotent client over every node and never resend a call the client reported as of
//! unknown outcome (the client itself resolves it before the partition's next request).
//! Without idempotence: unary producers send keyed calls without a partition, client
//! producers use one client per node with no retries of its own, and both retry a failed call
//! with new attempts, duplicates allowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::{FetchRequest, InitProducerRequest, ProduceRequest, ProducerSequence, Record};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep, timeout};
use tonic::Code;
use tonic_types::StatusExt;

use ordo_client::ClientError;

use super::history::{Event, History, Read, Sent, Written};
use super::nodes::Nodes;
use crate::{client_records, effective_code, with_timeout};

/// Distinct keys (shared by all producers).
const KEYS: u32 = 16;
/// Records per produce call, at most.
const BATCH_MAX: usize = 4;
/// Attempts of one call (the first and its retries, each through a random node).
const ATTEMPTS_MAX: u32 = 5;
/// Attempts of one idempotent call once producing has stopped (before, it is retried until
/// answered).
const ATTEMPTS_AFTER_STOP: u32 = 5;
/// `grpc-timeout` of each produce attempt.
const PRODUCE_DEADLINE: Duration = Duration::from_secs(3);
/// `grpc-timeout` of each fetch.
const FETCH_DEADLINE: Duration = Duration::from_secs(3);
/// Extra time the client allows past a deadline before it gives up on the call itself.
const CLIENT_GRACE: Duration = Duration::from_secs(2);
/// Long poll of a consumer's fetch at the end of the log.
const FETCH_WAIT_MS: u32 = 500;
const FETCH_BYTES_MAX: u32 = 256 * 1024;

/// What the workload tasks share.
pub struct Shared {
    pub nodes: Arc<Nodes>,
    /// One client per node (by index) for the producers that use ProduceStream; in an
    /// idempotent run one client (index 0) per client producer, over every node.
    pub stream_clients: Vec<ordo_client::Client>,
    /// The producers stamp their requests (idempotent producers).
    pub idempotent: bool,
    /// Partitions of the topic.
    pub partitions: u32,
    pub history: Arc<History>,
    pub topic: String,
    /// Producers stop starting calls when set.
    pub stop_producing: AtomicBool,
    /// Consumers stop once they reached their partition's target (set after healing), or
    /// when `stop_consuming` is set.
    pub targets: Vec<AtomicU64>,
    pub targets_set: AtomicBool,
    pub stop_consuming: AtomicBool,
}

/// Runs one producer until `stop_producing`. Returns the number of calls made.
pub async fn producer(shared: Arc<Shared>, process: usize, seed: u64) -> u64 {
    if shared.idempotent && process.is_multiple_of(2) {
        return idempotent_unary_producer(shared, process, seed).await;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = shared.nodes.len();
    let mut seq = 0u64;
    let mut call = 0u64;
    while !shared.stop_producing.load(Ordering::Relaxed) {
        call += 1;
        let count = rng.random_range(1..=BATCH_MAX);
        let sent: Vec<Sent> = (0..count)
            .map(|_| {
                seq += 1;
                Sent {
                    key: Some(format!("k{}", rng.random_range(0..KEYS))),
                    value: format!("p{process}-{seq:07}"),
                }
            })
            .collect();
        let records = wire_records(&sent);
        for attempt in 0..ATTEMPTS_MAX {
            let index = rng.random_range(0..nodes);
            invoke(&shared, process, call, attempt, index, &sent);
            let attempted = if process.is_multiple_of(2) {
                unary_attempt(&shared, index, None, &records, None).await
            } else if shared.idempotent {
                // One idempotent client over every node: it retries by itself.
                stream_attempt(&shared, process, 0, &records).await
            } else {
                stream_attempt(&shared, process, index, &records).await
            };
            if !log_attempt(&shared, process, call, attempt, attempted) {
                break;
            }
            sleep(Duration::from_millis(rng.random_range(50..250))).await;
        }
        sleep(Duration::from_millis(rng.random_range(0..15))).await;
    }
    call
}

/// Logs an attempt of a call, through node `index`.
fn invoke(shared: &Shared, process: usize, call: u64, attempt: u32, index: usize, sent: &[Sent]) {
    shared.history.log(Event::Invoke {
        process,
        call,
        attempt,
        node: shared.nodes.nodes[index].id,
        records: sent.to_vec(),
    });
}

/// Logs what an attempt came to; whether the call should be attempted again.
fn log_attempt(
    shared: &Shared,
    process: usize,
    call: u64,
    attempt: u32,
    attempted: Attempted,
) -> bool {
    match attempted {
        Attempted::Acked(acks) => {
            shared.history.log(Event::Ok {
                process,
                call,
                attempt,
                acks,
            });
            false
        }
        Attempted::Failed {
            code,
            written,
            message,
            retry,
        } => {
            shared.history.log(Event::Fail {
                process,
                call,
                attempt,
                code,
                written,
                message: message.chars().take(300).collect(),
            });
            retry
        }
    }
}

fn wire_records(sent: &[Sent]) -> Vec<Record> {
    sent.iter()
        .map(|record| Record {
            key: record.key.clone().map(Bytes::from),
            value: Bytes::from(record.value.clone()),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect()
}

/// A unary producer following the idempotent contract by hand, as a stub in any language
/// would: one session, a sequence per partition, and every call retried with the same request
/// until it is answered. A call still unanswered when producing stops (after
/// [`ATTEMPTS_AFTER_STOP`] more attempts) leaves its partition's sequence in doubt; the producer
/// sends nothing more to that partition.
async fn idempotent_unary_producer(shared: Arc<Shared>, process: usize, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = shared.nodes.len();
    let Some((id, epoch)) = init_producer(&shared, &mut rng).await else {
        return 0;
    };
    // The keys of each partition, so that a call's records share one partition.
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); shared.partitions as usize];
    for key in 0..KEYS {
        let key = format!("k{key}");
        let partition = ordo_proto::partition::partition_for_key(key.as_bytes(), shared.partitions);
        keys[partition as usize].push(key);
    }
    let mut sequences: Vec<Option<u64>> = keys
        .iter()
        .map(|keys| (!keys.is_empty()).then_some(0))
        .collect();
    let mut seq = 0u64;
    let mut call = 0u64;
    while !shared.stop_producing.load(Ordering::Relaxed) {
        let open: Vec<usize> = (0..sequences.len())
            .filter(|partition| sequences[*partition].is_some())
            .collect();
        if open.is_empty() {
            break;
        }
        let partition = open[rng.random_range(0..open.len())];
        let sequence = sequences[partition].expect("open partition");
        call += 1;
        let count = rng.random_range(1..=BATCH_MAX);
        let sent: Vec<Sent> = (0..count)
            .map(|_| {
                seq += 1;
                let key = &keys[partition][rng.random_range(0..keys[partition].len())];
                Sent {
                    key: Some(key.clone()),
                    value: format!("p{process}-{seq:07}"),
                }
            })
            .collect();
        let records = wire_records(&sent);
        let stamp = ProducerSequence {
            producer_id: id,
            producer_epoch: epoch,
            sequence,
        };
        let mut attempts_after_stop = 0;
        let mut answered = false;
        for attempt in 0.. {
            if shared.stop_producing.load(Ordering::Relaxed) {
                attempts_after_stop += 1;
                if attempts_after_stop > ATTEMPTS_AFTER_STOP {
                    break;
                }
            }
            let index = rng.random_range(0..nodes);
            invoke(&shared, process, call, attempt, index, &sent);
            let attempted = unary_attempt(
                &shared,
                index,
                Some(partition as u32),
                &records,
                Some(stamp.clone()),
            )
            .await;
            let acked = matches!(attempted, Attempted::Acked(_));
            let refused = matches!(
                &attempted,
                Attempted::Failed {
                    written: Written::No,
                    retry: false,
                    ..
                }
            );
            if !log_attempt(&shared, process, call, attempt, attempted) {
                // Acked, or refused for good (never expected: the checker warns of the code,
                // and holds the node to "nothing written"); either way the sequence is known.
                answered = acked || refused;
                if acked {
                    sequences[partition] = Some(sequence + count as u64);
                }
                break;
            }
            sleep(Duration::from_millis(rng.random_range(50..250))).await;
        }
        if !answered {
            sequences[partition] = None;
        }
        sleep(Duration::from_millis(rng.random_range(0..15))).await;
    }
    call
}

/// A producer session through random nodes, retried until producing stops.
async fn init_producer(shared: &Shared, rng: &mut StdRng) -> Option<(u64, u32)> {
    while !shared.stop_producing.load(Ordering::Relaxed) {
        let index = rng.random_range(0..shared.nodes.len());
        let mut client = shared.nodes.log_client(index);
        let request = with_timeout(InitProducerRequest::default(), PRODUCE_DEADLINE);
        if let Ok(Ok(response)) = timeout(
            PRODUCE_DEADLINE + CLIENT_GRACE,
            client.init_producer(request),
        )
        .await
        {
            let response = response.into_inner();
            return Some((response.producer_id, response.producer_epoch));
        }
        sleep(Duration::from_millis(rng.random_range(50..250))).await;
    }
    None
}

/// Without idempotence: one client per node, each with that node as its only endpoint and no
/// retries of its own, so that each attempt is one call whose outcome the client itself
/// classifies. Idempotent: one client per client producer (odd processes), over every node,
/// retrying by itself within its deadline.
pub async fn stream_clients(
    nodes: &Nodes,
    idempotent: bool,
    producers: usize,
) -> anyhow::Result<Vec<ordo_client::Client>> {
    let endpoints: Vec<String> = nodes
        .nodes
        .iter()
        .map(|node| format!("http://{}", node.address))
        .collect();
    if idempotent {
        let options = ordo_client::ClientOptions {
            request_timeout: PRODUCE_DEADLINE * 3,
            deadline_grace: CLIENT_GRACE,
            connect_timeout: Duration::from_secs(1),
            produce_stream: true,
            idempotence: true,
            ..ordo_client::ClientOptions::default()
        };
        let mut clients = Vec::new();
        for _ in 0..producers {
            clients.push(
                ordo_client::Client::connect_with_options(endpoints.clone(), options.clone())
                    .await?,
            );
        }
        return Ok(clients);
    }
    let options = ordo_client::ClientOptions {
        request_timeout: PRODUCE_DEADLINE,
        deadline_grace: CLIENT_GRACE,
        connect_timeout: Duration::from_secs(1),
        retries_max: 0,
        produce_stream: true,
        idempotence: false,
        ..ordo_client::ClientOptions::default()
    };
    let mut clients = Vec::new();
    for node in &nodes.nodes {
        let endpoint = format!("http://{}", node.address);
        clients.push(ordo_client::Client::connect_with_options([endpoint], options.clone()).await?);
    }
    Ok(clients)
}

/// What one produce attempt came to.
enum Attempted {
    Acked(Vec<(u32, u64)>),
    Failed {
        code: String,
        written: Written,
        message: String,
        retry: bool,
    },
}

/// One unary Produce through node `index`, to `partition` and stamped with `producer` when
/// given.
async fn unary_attempt(
    shared: &Shared,
    index: usize,
    partition: Option<u32>,
    records: &[Record],
    producer: Option<ProducerSequence>,
) -> Attempted {
    let request = ProduceRequest {
        topic: shared.topic.clone(),
        partition,
        records: records.to_vec(),
        producer,
    };
    let mut client = shared.nodes.log_client(index);
    let outcome = timeout(
        PRODUCE_DEADLINE + CLIENT_GRACE,
        client.produce(with_timeout(request, PRODUCE_DEADLINE)),
    )
    .await;
    match outcome {
        Ok(Ok(response)) => Attempted::Acked(
            response
                .into_inner()
                .acks
                .iter()
                .map(|ack| (ack.partition, ack.offset))
                .collect(),
        ),
        Ok(Err(status)) => {
            let code = effective_code(&status);
            // Only UNAVAILABLE and FAILED_PRECONDITION from the node itself (with its error
            // details: a producer refusal is decided before writing, and a refusal after an
            // attempt that may have written is OUTCOME_UNKNOWN) promise that nothing was
            // written; the transport's UNAVAILABLE promises nothing.
            let from_node = ordo_proto::errors::reason_of(&status).is_some();
            let written =
                if matches!(code, Code::Unavailable | Code::FailedPrecondition) && from_node {
                    Written::No
                } else {
                    Written::Unknown
                };
            Attempted::Failed {
                code: format!("{code:?}"),
                written,
                message: status.message().to_owned(),
                retry: !matches!(
                    code,
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::FailedPrecondition
                        | Code::OutOfRange
                ),
            }
        }
        Err(_) => Attempted::Failed {
            code: String::from("ClientTimeout"),
            written: Written::Unknown,
            message: format!("no answer within {:?}", PRODUCE_DEADLINE + CLIENT_GRACE),
            retry: true,
        },
    }
}

/// One produce call through `ordo_client`: client `index` of the shared ones (a node's own
/// client), or in an idempotent run the producer's own client. The client's error decides what
/// was written: only the errors it calls retryable promise nothing was. An idempotent call of
/// unknown outcome is never sent again as a new call: that would give its records a second
/// sequence.
async fn stream_attempt(
    shared: &Shared,
    process: usize,
    index: usize,
    records: &[Record],
) -> Attempted {
    let client = if shared.idempotent {
        &shared.stream_clients[process / 2]
    } else {
        &shared.stream_clients[index]
    };
    let records = client_records(records);
    // The client bounds the call itself (deadline plus grace); this outer bound only guards
    // against a client bug hanging the workload.
    let limit = client.options().request_timeout + CLIENT_GRACE * 2;
    let outcome = timeout(limit, client.produce(&shared.topic, None, records)).await;
    match outcome {
        Ok(Ok(acks)) => {
            Attempted::Acked(acks.iter().map(|ack| (ack.partition, ack.offset)).collect())
        }
        Ok(Err(error)) => Attempted::Failed {
            code: format!("client:{}", error.kind()),
            written: if error.is_retryable() {
                Written::No
            } else {
                Written::Unknown
            },
            message: error.to_string(),
            retry: if shared.idempotent {
                error.is_retryable()
            } else {
                !matches!(
                    error,
                    ClientError::InvalidArgument { .. }
                        | ClientError::NotFound { .. }
                        | ClientError::AlreadyExists { .. }
                        | ClientError::FailedPrecondition { .. }
                        | ClientError::OutOfRange { .. }
                        | ClientError::InvalidEndpoint { .. }
                        | ClientError::Protocol { .. }
                )
            },
        },
        Err(_) => Attempted::Failed {
            code: String::from("ClientHung"),
            written: Written::Unknown,
            message: format!("ordo_client gave no answer within {limit:?}"),
            retry: !shared.idempotent,
        },
    }
}

/// Follows one partition from offset 0. Returns the next offset it would read.
pub async fn consumer(shared: Arc<Shared>, process: usize, partition: u32, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = shared.nodes.len();
    let mut index = rng.random_range(0..nodes);
    let mut next = 0u64;
    loop {
        if shared.stop_consuming.load(Ordering::Relaxed) {
            return next;
        }
        if shared.targets_set.load(Ordering::Relaxed)
            && next >= shared.targets[partition as usize].load(Ordering::Relaxed)
        {
            return next;
        }
        let request = FetchRequest {
            topic: shared.topic.clone(),
            partition,
            offset: next,
            max_bytes: FETCH_BYTES_MAX,
            max_wait_ms: FETCH_WAIT_MS,
        };
        let mut client = shared.nodes.log_client(index);
        let started = Instant::now();
        let outcome = timeout(
            FETCH_DEADLINE + CLIENT_GRACE,
            client.fetch(with_timeout(request, FETCH_DEADLINE)),
        )
        .await;
        match outcome {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                if let Some(last) = response.records.last() {
                    let last = last.offset;
                    let records = response
                        .records
                        .into_iter()
                        .map(|record| Read {
                            offset: record.offset,
                            key: record
                                .key
                                .map(|key| String::from_utf8_lossy(&key).into_owned()),
                            value: String::from_utf8_lossy(&record.value).into_owned(),
                        })
                        .collect();
                    shared.history.log(Event::Fetch {
                        process,
                        node: shared.nodes.nodes[index].id,
                        partition,
                        offset: next,
                        high_watermark: response.high_watermark,
                        records,
                    });
                    next = last + 1;
                }
                // Read from another replica now and then: followers serve their own copies.
                if rng.random_bool(0.05) {
                    index = rng.random_range(0..nodes);
                }
            }
            Ok(Err(status)) => {
                let code = effective_code(&status);
                if !matches!(
                    code,
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) {
                    shared.history.log(Event::FetchFail {
                        process,
                        node: shared.nodes.nodes[index].id,
                        partition,
                        offset: next,
                        code: format!("{code:?}"),
                        end_offset: status
                            .get_details_error_info()
                            .and_then(|info| info.metadata.get("end_offset")?.parse().ok()),
                        message: status.message().chars().take(300).collect(),
                    });
                }
                index = rng.random_range(0..nodes);
                sleep(Duration::from_millis(rng.random_range(50..200))).await;
            }
            Err(_) => {
                index = rng.random_range(0..nodes);
            }
        }
        // A node that answers at once with nothing must not be asked in a tight loop.
        if started.elapsed() < Duration::from_millis(20) {
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The consumer group every group member of a run joins.
pub const GROUP: &str = "chaos-group";
/// Session timeout of the group members: long enough to ride out a short pause, short enough
/// that a member cut off for good is replaced within the run.
const GROUP_SESSION: Duration = Duration::from_secs(6);

/// A client for the group workload: every node, retrying by itself within its deadline.
pub async fn group_client(nodes: &Nodes) -> anyhow::Result<ordo_client::Client> {
    let endpoints: Vec<String> = nodes
        .nodes
        .iter()
        .map(|node| format!("http://{}", node.address))
        .collect();
    let options = ordo_client::ClientOptions {
        request_timeout: Duration::from_secs(5),
        deadline_grace: CLIENT_GRACE,
        connect_timeout: Duration::from_secs(1),
        ..ordo_client::ClientOptions::default()
    };
    Ok(ordo_client::Client::connect_with_options(endpoints, options).await?)
}

/// One consumer group member until `stop_consuming`: consumes the topic as member `member` of
/// [`GROUP`], logs what it gets, commits after every batch and logs each acked commit. A member
/// whose consumer fails joins again.
pub async fn group_member(shared: Arc<Shared>, member: usize, client: ordo_client::Client) -> u64 {
    let stopped = || shared.stop_consuming.load(Ordering::Relaxed);
    while !stopped() {
        let mut options = ordo_client::GroupConsumerOptions::new(GROUP, [shared.topic.clone()]);
        options.member_id = Some(format!("member-{member}"));
        options.session_timeout = GROUP_SESSION;
        options.fetch_max_bytes = FETCH_BYTES_MAX;
        // Positions last logged as committed, so a commit logs only what it moved.
        let mut logged: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        let mut consumer = match client.group_consumer(options).await {
            Ok(consumer) => consumer,
            Err(_) => {
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while !stopped() {
            // next() is cancel-safe: the timeout only lets the loop look at the stop flag.
            let event = match timeout(Duration::from_millis(500), consumer.next()).await {
                Err(_) => continue,
                Ok(Err(_)) => {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            let change = |change: &str, partitions: Vec<(String, u32)>| Event::GroupAssignment {
                member,
                change: change.to_owned(),
                partitions: partitions
                    .into_iter()
                    .map(|(_, partition)| partition)
                    .collect(),
            };
            match event {
                ordo_client::GroupEvent::Assigned(partitions) => {
                    shared.history.log(change("assigned", partitions));
                }
                ordo_client::GroupEvent::Revoked(partitions) => {
                    shared.history.log(change("revoked", partitions));
                }
                ordo_client::GroupEvent::Lost(partitions) => {
                    shared.history.log(change("lost", partitions));
                }
                ordo_client::GroupEvent::Records {
                    partition, records, ..
                } => {
                    shared.history.log(Event::GroupRecords {
                        member,
                        partition,
                        records: records
                            .iter()
                            .map(|record| Read {
                                offset: record.offset,
                                key: record
                                    .key
                                    .as_ref()
                                    .map(|key| String::from_utf8_lossy(key).into_owned()),
                                value: String::from_utf8_lossy(&record.value).into_owned(),
                            })
                            .collect(),
                    });
                    let t_invoke = shared.history.now();
                    let offsets: Vec<(u32, u64)> = consumer
                        .assignment()
                        .into_iter()
                        .filter_map(|(topic, partition)| {
                            Some((partition, consumer.position(&topic, partition)?))
                        })
                        .filter(|(partition, offset)| logged.get(partition) != Some(offset))
                        .collect();
                    if consumer.commit().await.is_ok() {
                        logged.extend(offsets.iter().copied());
                        shared.history.log(Event::GroupCommit {
                            member,
                            t_invoke,
                            offsets,
                        });
                    }
                }
            }
        }
        let _ = timeout(Duration::from_secs(5), consumer.close()).await;
    }
    0
}

/// The group's committed offsets as FetchOffsets returns them now, logged; `None` when the call
/// failed.
pub async fn group_offsets(
    shared: &Shared,
    client: &ordo_client::Client,
    last: bool,
) -> Option<Vec<(u32, u64)>> {
    let t_invoke = shared.history.now();
    let offsets: Vec<(u32, u64)> = client
        .fetch_offsets(GROUP, &std::collections::BTreeSet::new())
        .await
        .ok()?
        .into_iter()
        .map(|offset| (offset.partition, offset.offset))
        .collect();
    shared.history.log(Event::GroupOffsets {
        t_invoke,
        offsets: offsets.clone(),
        last,
    });
    Some(offsets)
}

/// Reads the group's committed offsets twice a second until `stop_consuming`.
pub async fn group_observer(shared: Arc<Shared>, client: ordo_client::Client) -> u64 {
    while !shared.stop_consuming.load(Ordering::Relaxed) {
        let _ = group_offsets(&shared, &client, false).await;
        sleep(Duration::from_millis(500)).await;
    }
    0
}

/// The queue every queue consumer of a run receives from (over the run's topic).
pub const QUEUE: &str = "chaos-queue";
/// Lease length of the chaos queue: long enough to ride out a short pause, short enough that a
/// message held by a consumer cut off for good is delivered again within the run.
const QUEUE_VISIBILITY: Duration = Duration::from_secs(4);

/// Creates the run's queue (deliveries before dead-lettering: many, so a message dead-letters
/// only when a fault keeps its acks from landing again and again).
pub async fn create_queue(
    client: &ordo_client::Client,
    topic: &str,
    deadline: Duration,
) -> anyhow::Result<()> {
    let settings = ordo_client::QueueSettings {
        visibility_timeout_ms: QUEUE_VISIBILITY.as_millis() as u64,
        max_deliveries: 20,
        ..ordo_client::QueueSettings::default()
    };
    let started = std::time::Instant::now();
    loop {
        match client.create_queue(QUEUE, topic, &settings).await {
            Ok(_) | Err(ordo_client::ClientError::AlreadyExists { .. }) => return Ok(()),
            Err(error) if started.elapsed() > deadline => {
                return Err(anyhow::Error::new(error).context("creating the chaos queue"));
            }
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One queue consumer until `stop_consuming`: receives from [`QUEUE`], logs each message, and
/// acks it from a task of its own after a short pause ("processing"), logging the answer. A
/// consumer whose stream fails opens a new one with the same consumer id.
pub async fn queue_consumer(
    shared: Arc<Shared>,
    consumer: usize,
    client: ordo_client::Client,
) -> u64 {
    let stopped = || shared.stop_consuming.load(Ordering::Relaxed);
    let mut received = 0u64;
    while !stopped() {
        let options = ordo_client::QueueConsumerOptions {
            consumer_id: format!("queue-consumer-{consumer}"),
            max_in_flight: 50,
            visibility_timeout: QUEUE_VISIBILITY,
            ..ordo_client::QueueConsumerOptions::default()
        };
        let mut receiver = match client.queue_consumer(QUEUE, options).await {
            Ok(receiver) => receiver,
            Err(_) => {
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while !stopped() {
            let message = match timeout(Duration::from_millis(500), receiver.next()).await {
                Err(_) => continue,
                Ok(Err(_)) => {
                    sleep(Duration::from_millis(200)).await;
                    break;
                }
                Ok(Ok(message)) => message,
            };
            received += 1;
            let receipt = message.receipt;
            shared.history.log(Event::QueueReceived {
                consumer,
                partition: receipt.partition,
                delivery: receipt.delivery,
                record: Read {
                    offset: message.record.offset,
                    key: message
                        .record
                        .key
                        .as_ref()
                        .map(|key| String::from_utf8_lossy(key).into_owned()),
                    value: String::from_utf8_lossy(&message.record.value).into_owned(),
                },
            });
            let (acker, shared) = (receiver.acker(), Arc::clone(&shared));
            tokio::spawn(async move {
                sleep(Duration::from_millis(2)).await;
                let t_invoke = shared.history.now();
                let outcome = match acker.ack(receipt).await {
                    Ok(ordo_client::SettleOutcome::Done) => "done",
                    Ok(ordo_client::SettleOutcome::NotHeld) => "not_held",
                    Ok(ordo_client::SettleOutcome::Unknown) => "unknown",
                    Err(_) => "error",
                };
                shared.history.log(Event::QueueAck {
                    consumer,
                    t_invoke,
                    partition: receipt.partition,
                    offset: receipt.offset,
                    delivery: receipt.delivery,
                    outcome: outcome.to_owned(),
                });
            });
        }
    }
    received
}

/// The queue's floors now, if DescribeQueue answered.
pub async fn queue_floors(client: &ordo_client::Client) -> Option<Vec<(u32, u64)>> {
    let description = client.describe_queue(QUEUE).await.ok()?;
    Some(
        description
            .partitions
            .iter()
            .map(|partition| (partition.partition, partition.floor))
            .collect(),
    )
}

/// Every message of the queue's dead-letter topic, as `(source partition, source offset)`.
pub async fn dead_letters(client: &ordo_client::Client) -> anyhow::Result<Vec<(u32, u64)>> {
    let topic = format!("{QUEUE}-dlq");
    let mut sources = Vec::new();
    let mut offset = 0;
    loop {
        let fetched = client
            .fetch(&topic, 0, offset, FETCH_BYTES_MAX, Duration::ZERO)
            .await?;
        for record in &fetched.records {
            let header = |name: &str| {
                record
                    .headers
                    .iter()
                    .find(|(key, _)| key == name)
                    .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
            };
            if let (Some(partition), Some(source)) =
                (header("ordo-dlq-partition"), header("ordo-dlq-offset"))
            {
                sources.push((partition as u32, source));
            }
            offset = record.offset + 1;
        }
        if fetched.records.is_empty() || offset >= fetched.high_watermark {
            return Ok(sources);
        }
    }
}
