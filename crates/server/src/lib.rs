//! The Ordo server process: configuration, the gRPC server, metrics, lifecycle.
//!
//! # Layout
//! - `config`: [`ServeArgs`] and [`NodeConfig`] (defaults < file < `ORDO_*` env < flags).
//! - `services`: the gRPC services (public `ordo.v1`, internal `ordo.internal.v1`).
//! - `status`: the ONLY place errors become `tonic::Status`.
//! - `deadline`: the caller's `grpc-timeout`, so answers beat the deadline.
//! - `metrics`: Prometheus metrics and the `/metrics` endpoint.
//!
//! # What this crate must never do
//! It owns ports, tonic servers and the process lifecycle, and nothing else: no produce, fetch
//! or replication logic lives here.

pub mod config;
mod deadline;
mod gate;
mod groups;
mod metrics;
mod queues;
mod services;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

pub use config::NodeConfig;
pub use config::ServeArgs;
use ordo_broker::Broker;
use ordo_broker::BrokerOptions;
use ordo_proto::internal::internal_server::InternalServer;
use ordo_proto::v1::admin_server::AdminServer;
use ordo_proto::v1::consumer_group_server::ConsumerGroupServer;
use ordo_proto::v1::log_server::LogServer;
use ordo_proto::v1::queue_server::QueueServer;
use ordo_raft::Peers;
use ordo_raft::RaftNode;
use ordo_storage::Store;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::services::Services;

/// Why the server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] ordo_storage::StorageError),
    /// A start-up step failed.
    #[error("{0}")]
    Startup(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// An I/O error (binding a port, creating the data directory).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> Result<(), ServerError> {
    let config = NodeConfig::load(&args)?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = shutdown_tx.send(true);
    });
    serve(config, shutdown).await
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Exit status of a node that stopped because its storage failed (EX_IOERR).
pub const EXIT_STORAGE_FAILED: i32 = 74;

/// Crash-only storage failure: the first failed write or sync ends the process. Openraft stops
/// every group whose write failed, and a node that kept answering pings with stopped groups
/// would keep its followers from electing a new leader; a restart replays the journal and
/// serves again from what is durable (a full disk keeps failing until space returns).
fn exit_on_storage_fault(store: &Store) {
    let mut fault = store.fault();
    tokio::spawn(async move {
        let Ok(failed) = fault.wait_for(Option::is_some).await else {
            return;
        };
        let error = failed.as_ref().map(ToString::to_string).unwrap_or_default();
        tracing::error!(
            %error,
            exit_code = EXIT_STORAGE_FAILED,
            "storage failed; exiting so the node restarts from its durable state"
        );
        eprintln!("ordo: storage failed: {error}; exiting with status {EXIT_STORAGE_FAILED}");
        std::process::exit(EXIT_STORAGE_FAILED);
    });
}

/// Deletes what retention dropped, every `interval` until shutdown: the partitions' purged log
/// entries (`RaftNode::compact_logs`), then the journal files nothing points into any more.
async fn compact(
    raft: RaftNode,
    store: Store,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        raft.compact_logs().await;
        let journal = store.clone();
        match tokio::task::spawn_blocking(move || journal.remove_unused_journal_files()).await {
            Ok(Ok(removed)) if removed.files > 0 => {
                tracing::info!(
                    files = removed.files,
                    bytes = removed.bytes,
                    "journal files removed"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "removing journal files"),
            Err(error) => tracing::warn!(%error, "journal removal task"),
        }
    }
}

/// The gRPC health service name that is SERVING while the node is caught up (see
/// `RaftNode::caught_up`) and not stopping: Kubernetes' readiness probe. The empty name (every
/// service) is SERVING while the process runs: the liveness probe.
pub const READY_SERVICE: &str = "ordo.ready";

/// How often readiness is looked at.
const READINESS_INTERVAL: Duration = Duration::from_millis(500);

/// Checks in a row that a ready node must fail to be reported not ready (a follower briefly
/// behind under load does not leave the Service).
const READINESS_FAILURES: u32 = 3;

/// Keeps [`READY_SERVICE`]'s status current until `shutdown` turns true; once the node drains
/// it stays NOT_SERVING.
async fn report_readiness(
    broker: Broker,
    raft: RaftNode,
    health: tonic_health::server::HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = std::collections::HashMap::new();
    let mut ready = false;
    let mut failures = 0;
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if raft.draining() {
            // `drain` reported it.
            return;
        }
        // A removed node serves no client (see `gate`).
        let caught_up = raft.caught_up(&mut seen) && !broker.removed();
        failures = if caught_up { 0 } else { failures + 1 };
        let now = caught_up || (ready && failures < READINESS_FAILURES);
        if now == ready {
            continue;
        }
        tracing::info!(ready = now, "readiness changed");
        ready = now;
        let status = if now {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        // Draining may have begun since the check: it wins.
        if !raft.draining() {
            health.set_service_status(READY_SERVICE, status).await;
        }
    }
}

/// Once a stop is `requested` (SIGTERM): reports not ready, hands every leadership to a
/// caught-up replica (half the grace period at most), then tells everything to `stop` (the gRPC
/// server finishes the calls in flight), and `abort`s the wait for calls still running when
/// the grace period is nearly over.
async fn drain(
    raft: RaftNode,
    health: tonic_health::server::HealthReporter,
    mut requested: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    abort: tokio::sync::oneshot::Sender<()>,
    grace: Duration,
) {
    // A dropped sender stops the node as a request does.
    let _ = requested.wait_for(|stop| *stop).await;
    let started = tokio::time::Instant::now();
    raft.begin_draining();
    health
        .set_service_status(READY_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let deadline = started + grace / 2;
    match tokio::time::timeout_at(
        deadline + READINESS_INTERVAL,
        raft.hand_off_leaderships(deadline),
    )
    .await
    {
        Ok(handed) => tracing::info!(
            handed_off = handed.handed_off,
            still_leading = handed.still_leading.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "leaderships handed off; stopping"
        ),
        Err(_) => tracing::warn!("the leadership hand-off did not end in time; stopping"),
    }
    let _ = stop.send(true);
    tokio::time::sleep_until(started + grace * 9 / 10).await;
    let _ = abort.send(());
}

/// Runs a node with `config` until `shutdown` turns true: then it drains (hands its
/// leaderships off) and stops within `shutdown_grace_ms`.
pub async fn serve(config: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
    use tracing::Instrument;
    let span = tracing::info_span!("node", node = config.node_id);
    serve_node(config, shutdown).instrument(span).await
}

async fn serve_node(
    config: NodeConfig,
    requested: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let node_id = config.node_id;
    // A stop is requested, then the node drains (see `drain`), then everything stops.
    let (stop, shutdown) = watch::channel(false);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Io {
        context: format!("creating data dir {}", config.data_dir.display()),
        source,
    })?;
    let store = Store::open(&config.data_dir.join("db"), &config.store_options())?;
    exit_on_storage_fault(&store);
    let raft_options = config.raft_options();
    let peers = Peers::new(raft_options.connect_timeout);
    let codec: std::sync::Arc<dyn ordo_raft::RecordCodec> =
        std::sync::Arc::new(ordo_broker::RecordCodec);
    let raft = RaftNode::new(node_id, store.clone(), peers, &raft_options, Some(codec))
        .map_err(|error| ServerError::Startup(error.to_string()))?;
    let mut tasks = JoinSet::new();
    let cluster = config.cluster()?;
    let broker = Broker::start(
        raft.clone(),
        BrokerOptions {
            node_id,
            nodes: cluster.clone(),
            advertise: config.advertise(),
            join: config.join_addresses(),
            limits: config.limits.clone(),
            leader_balance_interval: Duration::from_millis(config.raft.leader_balance_interval_ms),
            groups: config.groups.clone(),
            queues: config.queues.clone(),
            retention: config.retention.clone(),
        },
        &mut tasks,
        shutdown.clone(),
    )
    .await
    .map_err(|error| ServerError::Startup(error.to_string()))?;

    tasks.spawn(compact(
        raft.clone(),
        store.clone(),
        Duration::from_millis(config.raft.compact_interval_ms),
        shutdown.clone(),
    ));

    let metrics = Metrics::new(config.grpc.subscriptions_max);
    let services = Services {
        broker: broker.clone(),
        metrics: metrics.clone(),
        subscriptions: Arc::new(tokio::sync::Semaphore::new(
            config.grpc.subscriptions_max as usize,
        )),
        produce_stream_in_flight_max: usize::try_from(config.grpc.produce_stream_in_flight_max)
            .unwrap_or(usize::MAX),
        shutdown: shutdown.clone(),
    };

    if let Some(address) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ServerError::Io {
                context: format!("binding metrics address {address}"),
                source,
            })?;
        let (store, broker, metrics) = (store.clone(), broker.clone(), metrics.clone());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (store, broker, metrics) = (store.clone(), broker.clone(), metrics.clone());
                async move {
                    let groups = broker.group_metrics().await;
                    let text = metrics.render(&store, &broker, &groups);
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        );
        let mut metrics_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = metrics_shutdown.wait_for(|stop| *stop).await;
            });
            if let Err(error) = serve.await {
                tracing::error!(%error, "metrics server failed");
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LogServer<Services>>().await;
    health.set_serving::<AdminServer<Services>>().await;
    health.set_serving::<ConsumerGroupServer<Services>>().await;
    health.set_serving::<QueueServer<Services>>().await;
    health
        .set_service_status(READY_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    tasks.spawn(report_readiness(
        broker.clone(),
        raft.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    // Forms or joins the cluster; a node the cluster refuses (its id or address is another
    // node's) stops with the reason.
    let (refused_tx, refused) = tokio::sync::oneshot::channel::<String>();
    {
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = broker.bootstrap(shutdown).await {
                tracing::error!(%error, "the cluster refused this node");
                let _ = refused_tx.send(error.to_string());
            }
        });
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let (abort, aborted) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(drain(
        raft.clone(),
        health.clone(),
        requested,
        stop,
        abort,
        grace,
    ));
    // Reflection advertises the public services and health; the internal service is left out.
    let reflection = |own_name: &str| {
        tonic_reflection::server::Builder::configure()
            .with_service_name(own_name)
            .register_encoded_file_descriptor_set(ordo_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("ordo.v1.Log")
            .with_service_name("ordo.v1.Admin")
            .with_service_name("ordo.v1.ConsumerGroup")
            .with_service_name("ordo.v1.Queue")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|error| ServerError::Startup(error.to_string()))?;
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|error| ServerError::Startup(error.to_string()))?;

    let message_max = config.grpc.message_bytes_max as usize;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Io {
            context: format!("binding {}", config.listen),
            source,
        })?;
    // The server builder's tcp_nodelay only applies to listeners it binds itself: set it on the
    // incoming stream, or small answers wait for the peer's delayed ACK (40 ms stalls).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(listen = %config.listen, advertise = %config.advertise(), nodes = cluster.len(), "ordo node serving");
    let mut grpc_shutdown = shutdown.clone();
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(config.grpc.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_millis(
            config.grpc.keepalive_interval_ms,
        )))
        .http2_keepalive_timeout(Some(Duration::from_millis(
            config.grpc.keepalive_timeout_ms,
        )))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .layer(gate::RemovedGateLayer {
            broker: broker.clone(),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            LogServer::new(services.clone())
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(
            AdminServer::new(services.clone())
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(
            ConsumerGroupServer::new(services.clone())
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(
            QueueServer::new(services.clone())
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(
            InternalServer::new(services)
                .max_decoding_message_size(ordo_raft::INTERNAL_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(ordo_raft::INTERNAL_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_shutdown.wait_for(|stop| *stop).await;
        });
    // Calls still running near the end of the grace period (a Subscribe that does not end)
    // are not waited for: the node stops, and they end with the process.
    let result = tokio::select! {
        result = result => result.map_err(ServerError::from),
        Ok(()) = aborted => {
            tracing::warn!("calls still running at the end of the shutdown grace period; stopping anyway");
            Ok(())
        }
        Ok(reason) = refused => {
            tasks.abort_all();
            Err(ServerError::Startup(format!("cannot join the cluster: {reason}")))
        }
    };
    tracing::info!("grpc server stopped; stopping raft groups");
    raft.shutdown().await;
    while tasks.join_next().await.is_some() {}
    drop(broker);
    drop(raft);
    drop(store);
    tracing::info!("ordo node stopped");
    result
}
