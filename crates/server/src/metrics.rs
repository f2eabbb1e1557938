//! Prometheus metrics (`ordo_<area>_<what>_<unit>`), served on `/metrics` when
//! `metrics_listen` is set. Counters of the storage write path are read from the store at
//! scrape time; every limit is exported with its current value and its maximum.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use ordo_broker::Broker;
use ordo_broker::GroupMetrics;
use ordo_storage::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// Labels of request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or the gRPC code name.
    pub result: String,
}

/// Labels of a group's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The consumer group.
    pub group: String,
}

/// Labels of a group's per-partition series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupPartitionLabels {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

/// Labels of a queue partition's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
    /// `available`, `in_flight`, `delayed`, `dead_lettering` (messages); `acked`,
    /// `redelivered`, `lease_expired`, `dead_lettered` (events).
    pub state: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Produce calls by result.
    pub produce_requests: Family<ResultLabels, Counter>,
    /// Records acked (written now; idempotent retries of written requests are not counted).
    pub produce_records: Counter,
    /// Idempotent produce requests answered as retries of requests written before.
    pub produce_duplicates: Counter,
    /// Produce latency, call to ack.
    pub produce_latency: Histogram,
    /// Fetch calls by result.
    pub fetch_requests: Family<ResultLabels, Counter>,
    /// Open subscriptions.
    pub subscriptions: Gauge,
    subscriptions_max: Gauge,
    /// Open ProduceStreams.
    pub produce_streams: Gauge,
    store_fsyncs: Counter<u64, AtomicU64>,
    store_fsync_callbacks: Counter<u64, AtomicU64>,
    store_fsync_seconds: Counter<f64, AtomicU64>,
    store_write_bytes: Counter<u64, AtomicU64>,
    raft_groups: Gauge,
    raft_leaders: Gauge,
    produce_in_flight: Gauge,
    produce_in_flight_max: Gauge,
    group_members: Family<GroupLabels, Gauge>,
    group_rebalances: Family<GroupLabels, Gauge>,
    group_committed: Family<GroupPartitionLabels, Gauge>,
    group_lag: Family<GroupPartitionLabels, Gauge>,
    queue_messages: Family<QueueLabels, Gauge>,
    queue_events: Family<QueueLabels, Gauge>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new(subscriptions_max: u64) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("ordo");
        let produce_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "produce_requests",
            "Produce calls by result",
            produce_requests.clone(),
        );
        let produce_records = Counter::default();
        registry.register("produce_records", "Records acked", produce_records.clone());
        let produce_duplicates = Counter::default();
        registry.register(
            "produce_duplicates",
            "Idempotent produce requests found written before (nothing written again)",
            produce_duplicates.clone(),
        );
        let produce_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "produce_latency_seconds",
            "Produce latency from call to quorum ack",
            produce_latency.clone(),
        );
        let fetch_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fetch_requests",
            "Fetch calls by result",
            fetch_requests.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions",
            "Open Subscribe streams",
            subscriptions.clone(),
        );
        let subscriptions_max_gauge = Gauge::default();
        subscriptions_max_gauge.set(subscriptions_max as i64);
        registry.register(
            "subscriptions_max",
            "Limit on open Subscribe streams",
            subscriptions_max_gauge.clone(),
        );
        let produce_streams = Gauge::default();
        registry.register(
            "produce_streams",
            "Open ProduceStream streams",
            produce_streams.clone(),
        );
        let store_fsyncs = Counter::default();
        registry.register("storage_fsyncs", "Journal fsyncs", store_fsyncs.clone());
        let store_fsync_callbacks = Counter::default();
        registry.register(
            "storage_fsync_writes",
            "Durable writes completed by journal fsyncs (writes / fsyncs = group commit size)",
            store_fsync_callbacks.clone(),
        );
        let store_fsync_seconds = Counter::default();
        registry.register(
            "storage_fsync_seconds",
            "Time spent in journal fsync",
            store_fsync_seconds.clone(),
        );
        let store_write_bytes = Counter::default();
        registry.register(
            "storage_write_bytes",
            "Journal bytes the storage writer appended (records and their headers)",
            store_write_bytes.clone(),
        );
        let raft_groups = Gauge::default();
        registry.register(
            "raft_groups",
            "Partition Raft groups hosted",
            raft_groups.clone(),
        );
        let raft_leaders = Gauge::default();
        registry.register(
            "raft_leaders",
            "Partition Raft groups led",
            raft_leaders.clone(),
        );
        let produce_in_flight = Gauge::default();
        registry.register(
            "produce_in_flight",
            "Produce calls in flight",
            produce_in_flight.clone(),
        );
        let produce_in_flight_max = Gauge::default();
        registry.register(
            "produce_in_flight_max",
            "Limit on produce calls in flight",
            produce_in_flight_max.clone(),
        );
        let group_members = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_members",
            "Members of each consumer group whose coordinator this node leads",
            group_members.clone(),
        );
        let group_rebalances = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_rebalances",
            "Times each group's members or subscriptions changed (its group epoch)",
            group_rebalances.clone(),
        );
        let group_committed = Family::<GroupPartitionLabels, Gauge>::default();
        registry.register(
            "group_committed_offset",
            "Each group's committed offset per partition",
            group_committed.clone(),
        );
        let group_lag = Family::<GroupPartitionLabels, Gauge>::default();
        registry.register(
            "group_lag_records",
            "Records between each group's committed offset and the partition's end",
            group_lag.clone(),
        );
        let queue_messages = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages of each queue partition this node leads, by state (available includes records not yet read from the log)",
            queue_messages.clone(),
        );
        let queue_events = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_events",
            "Events since each queue was created, per partition this node leads: acked, redelivered, lease_expired, dead_lettered",
            queue_events.clone(),
        );
        Arc::new(Metrics {
            registry,
            queue_messages,
            queue_events,
            group_members,
            group_rebalances,
            group_committed,
            group_lag,
            produce_requests,
            produce_records,
            produce_duplicates,
            produce_latency,
            fetch_requests,
            subscriptions,
            subscriptions_max: subscriptions_max_gauge,
            produce_streams,
            store_fsyncs,
            store_fsync_callbacks,
            store_fsync_seconds,
            store_write_bytes,
            raft_groups,
            raft_leaders,
            produce_in_flight,
            produce_in_flight_max,
        })
    }

    /// Counts one call's result.
    pub fn count(family: &Family<ResultLabels, Counter>, result: Result<(), tonic::Code>) {
        let result = match result {
            Ok(()) => "ok".to_string(),
            Err(code) => format!("{code:?}"),
        };
        family.get_or_create(&ResultLabels { result }).inc();
    }

    /// Refreshes scrape-time values and encodes the text format. `groups` are the figures of
    /// the groups this node coordinates (`Broker::group_metrics`).
    pub fn render(&self, store: &Store, broker: &Broker, groups: &[GroupMetrics]) -> String {
        self.queue_messages.clear();
        self.queue_events.clear();
        for (queue, status) in broker.queue_metrics() {
            let labels = |state: &str| QueueLabels {
                queue: queue.clone(),
                partition: status.partition,
                state: state.to_owned(),
            };
            let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
            for (state, value) in [
                ("available", status.available),
                ("in_flight", status.in_flight),
                ("delayed", status.delayed),
                ("dead_lettering", status.dead_lettering),
            ] {
                self.queue_messages
                    .get_or_create(&labels(state))
                    .set(gauge(value));
            }
            for (event, value) in [
                ("acked", status.acked),
                ("redelivered", status.redeliveries),
                ("lease_expired", status.lease_expiries),
                ("dead_lettered", status.dead_lettered),
            ] {
                self.queue_events
                    .get_or_create(&labels(event))
                    .set(gauge(value));
            }
        }
        self.group_members.clear();
        self.group_rebalances.clear();
        self.group_committed.clear();
        self.group_lag.clear();
        for group in groups {
            let labels = GroupLabels {
                group: group.group.clone(),
            };
            self.group_members
                .get_or_create(&labels)
                .set(i64::from(group.members));
            self.group_rebalances
                .get_or_create(&labels)
                .set(i64::from(group.rebalances));
            for (topic, partition, committed, lag) in &group.partitions {
                let labels = GroupPartitionLabels {
                    group: group.group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                };
                self.group_committed
                    .get_or_create(&labels)
                    .set(i64::try_from(*committed).unwrap_or(i64::MAX));
                if let Some(lag) = lag {
                    self.group_lag
                        .get_or_create(&labels)
                        .set(i64::try_from(*lag).unwrap_or(i64::MAX));
                }
            }
        }
        let stats = store.stats();
        let set = |counter: &Counter<u64, AtomicU64>, value: u64| {
            let current = counter.get();
            if value > current {
                counter.inc_by(value - current);
            }
        };
        set(&self.store_fsyncs, stats.fsyncs.load(Ordering::Relaxed));
        set(
            &self.store_fsync_callbacks,
            stats.fsync_callbacks.load(Ordering::Relaxed),
        );
        set(
            &self.store_write_bytes,
            stats.write_bytes.load(Ordering::Relaxed),
        );
        let fsync_seconds = stats.fsync_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let current = self.store_fsync_seconds.get();
        if fsync_seconds > current {
            self.store_fsync_seconds.inc_by(fsync_seconds - current);
        }
        let statuses = broker.local_status(&[]);
        self.raft_groups.set(statuses.len() as i64);
        self.raft_leaders.set(
            statuses
                .iter()
                .filter(|status| status.leader == Some(broker.node_id()))
                .count() as i64,
        );
        let (in_flight, in_flight_max) = broker.produce_in_flight();
        self.produce_in_flight.set(in_flight as i64);
        self.produce_in_flight_max.set(in_flight_max as i64);
        let _ = &self.subscriptions_max;
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics");
        }
        text
    }
}
