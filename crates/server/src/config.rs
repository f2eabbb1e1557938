//! Node configuration: defaults, then a TOML file (`--config`), then `ORDO_*` environment
//! variables (nested keys with `__`, e.g. `ORDO_LIMITS__RECORD_BYTES_MAX`), then flags.
//! Every limit and timing lives here with its default and unit; `validate()` runs at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::Env;
use figment::providers::Format;
use figment::providers::Serialized;
use figment::providers::Toml;
use ordo_broker::GroupsConfig;
use ordo_broker::Limits;
use ordo_broker::QueuesConfig;
use serde::Deserialize;
use serde::Serialize;

use crate::ServerError;

/// Flags of `ordo serve`. Each overrides the config file and the environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "ORDO_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// Directory of this node's data (created if missing).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address the gRPC server listens on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Address other nodes and clients use to reach this node (default: --listen).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Every node of the cluster: `1=host:port,2=host:port,3=host:port`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_cluster: Option<String>,
    /// Addresses of nodes of an existing cluster to join through: `host:port,host:port`. A node
    /// not named in `initial_cluster` joins through those nodes (and these).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint (off when absent).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Take the node id from the host name's trailing ordinal plus one (`ordo-0` is node 1):
    /// a Kubernetes StatefulSet's pod names. Ignored when a node id is given (flag,
    /// `ORDO_NODE_ID` or the file).
    #[arg(long)]
    #[serde(skip)]
    pub node_id_from_hostname: bool,
    /// Async worker threads (default: one per CPU). Nodes sharing a machine run faster with
    /// their share of the CPUs: every cross-thread wake-up costs (`ordo dev` sets it).
    #[arg(long, env = "ORDO_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    #[serde(skip)]
    pub worker_threads: Option<u16>,
}

/// Raft timing and batching. The defaults are `ordo_raft::RaftOptions::default()`'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat period, milliseconds. Default 200.
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound, milliseconds. Default 1000.
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound, milliseconds. Default 2000.
    pub election_timeout_max_ms: u64,
    /// Most entries per append RPC. Default 256.
    pub append_entries_max: u64,
    /// Timeout of one connection attempt to a peer, milliseconds. Default 2000.
    pub connect_timeout_ms: u64,
    /// How often leaders hand partitions back to their preferred leader, milliseconds. Default 10000.
    pub leader_balance_interval_ms: u64,
    /// Bytes of recent log entries each Raft group keeps in memory, so replication and apply
    /// do not read them back from disk. Memory bound: this x groups on the node. Default 1 MiB.
    pub entry_cache_bytes: u64,
    /// Concurrent appends to one partition are proposed together as one Raft entry of at most
    /// this many batch bytes (a larger single batch is proposed alone). Default 1 MiB.
    pub coalesce_bytes_max: u64,
    /// Proposals of one partition in flight at once; appends arriving meanwhile wait and are
    /// coalesced into the next entry. Default 2.
    pub proposals_in_flight_max: u64,
    /// Idempotent producers one partition remembers (about 200 bytes each). A new producer past
    /// it makes the partition forget those idle for producer_idle_timeout_ms, else the one idle
    /// longest if it has not written for a minute; else it is refused (RESOURCE_EXHAUSTED,
    /// TOO_MANY_PRODUCERS). Default 1000.
    pub producers_per_partition_max: u32,
    /// A producer that has not written to a partition for this long may be forgotten there;
    /// its next batch (unless at sequence 0) is then refused as UNKNOWN_PRODUCER. Milliseconds.
    /// Default 604800000 (7 days).
    pub producer_idle_timeout_ms: u64,
    /// The metadata group and state groups (consumer groups, queues) snapshot their state after
    /// this many log entries and purge their log but the last snapshot_entries_kept. Default
    /// 20000. (Partitions purge what retention drops.)
    pub snapshot_entries: u64,
    /// Log entries kept behind such a snapshot, so a follower a little behind catches up from
    /// the log. Default 2000.
    pub snapshot_entries_kept: u64,
    /// How often each node deletes what retention dropped (log entries, journal files),
    /// milliseconds. Default 1000.
    pub compact_interval_ms: u64,
    /// The metadata and state groups also snapshot and purge their whole log this long after
    /// the last time, however few entries they have, so their oldest entry does not keep old
    /// journal files. Milliseconds. Default 60000.
    pub state_purge_interval_ms: u64,
    /// Bytes per second a node sends, over all replica moves, to the new replicas catching up;
    /// 0: unlimited. Default 67108864 (64 MiB/s).
    pub move_bytes_per_sec: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let options = ordo_raft::RaftOptions::default();
        let millis = |duration: Duration| {
            u64::try_from(duration.as_millis()).expect("default durations are below u64 ms")
        };
        Self {
            heartbeat_interval_ms: millis(options.heartbeat_interval),
            election_timeout_min_ms: millis(options.election_timeout_min),
            election_timeout_max_ms: millis(options.election_timeout_max),
            append_entries_max: options.append_entries_max,
            connect_timeout_ms: millis(options.connect_timeout),
            leader_balance_interval_ms: 10_000,
            entry_cache_bytes: options.entry_cache_bytes as u64,
            coalesce_bytes_max: options.coalesce_bytes_max as u64,
            proposals_in_flight_max: options.proposals_in_flight_max as u64,
            producers_per_partition_max: options.producers_per_partition_max,
            producer_idle_timeout_ms: millis(options.producer_idle_timeout),
            snapshot_entries: options.snapshot_entries,
            snapshot_entries_kept: options.snapshot_entries_kept,
            compact_interval_ms: 1_000,
            state_purge_interval_ms: millis(options.state_purge_interval),
            move_bytes_per_sec: options.move_bytes_per_sec,
        }
    }
}

/// HTTP/2 and gRPC limits of the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Concurrent streams per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). Default 1024.
    pub max_concurrent_streams: u32,
    /// Largest gRPC message accepted or sent, bytes. Default 16 MiB (above batch_bytes_max).
    pub message_bytes_max: u64,
    /// HTTP/2 keepalive ping period, milliseconds. Default 10000.
    pub keepalive_interval_ms: u64,
    /// HTTP/2 keepalive ping timeout, milliseconds. Default 5000.
    pub keepalive_timeout_ms: u64,
    /// Subscribe streams open at once on this node. Default 4096.
    pub subscriptions_max: u64,
    /// Requests of one ProduceStream read ahead of their answers; past it the server stops
    /// reading that stream until answers go out. Default 1024.
    pub produce_stream_in_flight_max: u64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            message_bytes_max: 16 << 20,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 5_000,
            subscriptions_max: 4096,
            produce_stream_in_flight_max: 1024,
        }
    }
}

/// RocksDB sizing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Write requests queued for the writer thread. Default 4096.
    pub write_queue_max: u64,
    /// Memtable size per column family, bytes. Default 64 MiB.
    pub write_buffer_bytes: u64,
    /// Block cache, bytes. Default 128 MiB.
    pub block_cache_bytes: u64,
    /// Size at which the journal starts a new file, bytes. Default 256 MiB.
    pub journal_file_bytes: u64,
    /// Journal bytes written between memtable flushes: the most a restart replays. Default
    /// 256 MiB.
    pub journal_replay_bytes_max: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let defaults = ordo_storage::StoreOptions::default();
        Self {
            write_queue_max: defaults.write_queue_max as u64,
            write_buffer_bytes: defaults.write_buffer_bytes as u64,
            block_cache_bytes: defaults.block_cache_bytes as u64,
            journal_file_bytes: defaults.journal_file_bytes,
            journal_replay_bytes_max: defaults.journal_replay_bytes_max,
        }
    }
}

/// Everything a node is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id; must be set and > 0.
    pub node_id: u64,
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Advertised address (default: listen).
    pub advertise: Option<String>,
    /// `id=host:port,...`: the nodes that form the cluster at first start (the lowest id forms
    /// it); empty means a single-node cluster of this node. A node not named here joins.
    pub initial_cluster: String,
    /// `host:port,...`: nodes of an existing cluster to join through.
    pub join: String,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM: the time the node takes at most to hand its leaderships off, finish the
    /// calls in flight and stop, milliseconds (below Kubernetes' default 30 s grace period).
    pub shutdown_grace_ms: u64,
    /// Request limits.
    pub limits: Limits,
    /// Raft timing.
    pub raft: RaftConfig,
    /// gRPC limits.
    pub grpc: GrpcConfig,
    /// Storage sizing.
    pub storage: StorageConfig,
    /// Consumer groups.
    pub groups: GroupsConfig,
    /// Queues.
    pub queues: QueuesConfig,
    /// Retention defaults.
    pub retention: ordo_broker::RetentionConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            data_dir: PathBuf::from("ordo-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            advertise: None,
            initial_cluster: String::new(),
            join: String::new(),
            metrics_listen: None,
            shutdown_grace_ms: 20_000,
            limits: Limits::default(),
            raft: RaftConfig::default(),
            grpc: GrpcConfig::default(),
            storage: StorageConfig::default(),
            groups: GroupsConfig::default(),
            queues: QueuesConfig::default(),
            retention: ordo_broker::RetentionConfig::default(),
        }
    }
}

/// Top-level keys read from `ORDO_*`; other `ORDO_*` variables (the CLI's) are ignored.
const ENV_KEYS: [&str; 15] = [
    "node_id",
    "data_dir",
    "listen",
    "advertise",
    "initial_cluster",
    "join",
    "metrics_listen",
    "shutdown_grace_ms",
    "limits",
    "raft",
    "grpc",
    "storage",
    "groups",
    "queues",
    "retention",
];

/// Whether the `ORDO_*` variable named `key` (prefix stripped, `__` made `.`) is node config.
/// figment hands the filter the name as it is in the environment (upper case): the top-level
/// key is compared without case.
fn env_key_read(key: &str) -> bool {
    let top = key.split('.').next().unwrap_or_default();
    ENV_KEYS.iter().any(|known| known.eq_ignore_ascii_case(top))
}

/// The node id of a StatefulSet pod: its host name's trailing ordinal plus one.
fn node_id_from_hostname() -> Result<u64, ServerError> {
    let hostname = match std::env::var("HOSTNAME") {
        Ok(name) if !name.trim().is_empty() => name,
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|error| {
            ServerError::Config(format!(
                "--node-id-from-hostname: cannot read the host name: {error}"
            ))
        })?,
    };
    node_id_of_hostname(hostname.trim())
}

/// `name-N` -> N + 1.
fn node_id_of_hostname(hostname: &str) -> Result<u64, ServerError> {
    hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .and_then(|ordinal| ordinal.checked_add(1))
        .ok_or_else(|| {
            ServerError::Config(format!(
                "--node-id-from-hostname: host name {hostname:?} does not end in -<ordinal> \
                 (a StatefulSet pod's name, e.g. ordo-0); give --node-id instead"
            ))
        })
}

impl NodeConfig {
    /// Loads defaults < file < environment < flags, then validates.
    pub fn load(args: &ServeArgs) -> Result<NodeConfig, ServerError> {
        let mut figment = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(path) = &args.config {
            if !path.exists() {
                return Err(ServerError::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(
                Env::prefixed("ORDO_")
                    .split("__")
                    .filter(|key| env_key_read(key.as_str())),
            )
            .merge(Serialized::defaults(args));
        // Only when neither a flag, the environment nor the file gave a node id.
        if args.node_id_from_hostname && figment.extract_inner::<u64>("node_id").unwrap_or(0) == 0 {
            figment = figment.merge(Serialized::default("node_id", node_id_from_hostname()?));
        }
        let config: NodeConfig = figment
            .extract()
            .map_err(|error| ServerError::Config(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The advertised address.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The addresses to join through.
    pub fn join_addresses(&self) -> Vec<String> {
        self.join
            .split(',')
            .map(str::trim)
            .filter(|address| !address.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The initial cluster's nodes and addresses.
    pub fn cluster(&self) -> Result<BTreeMap<u64, String>, ServerError> {
        if self.initial_cluster.trim().is_empty() && self.join.trim().is_empty() {
            return Ok(BTreeMap::from([(self.node_id, self.advertise())]));
        }
        let mut nodes = BTreeMap::new();
        for part in self
            .initial_cluster
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
        {
            let (id, address) = part.split_once('=').ok_or_else(|| {
                ServerError::Config(format!(
                    "initial_cluster entry {part:?} is not id=host:port"
                ))
            })?;
            let id: u64 = id.trim().parse().map_err(|_| {
                ServerError::Config(format!(
                    "initial_cluster entry {part:?}: {id:?} is not a node id"
                ))
            })?;
            if id == 0 {
                return Err(ServerError::Config(
                    "initial_cluster: node ids start at 1".into(),
                ));
            }
            if nodes.insert(id, address.trim().to_string()).is_some() {
                return Err(ServerError::Config(format!(
                    "initial_cluster names node {id} twice"
                )));
            }
        }
        Ok(nodes)
    }

    /// Rejects inconsistent settings.
    pub fn validate(&self) -> Result<(), ServerError> {
        let fail = |message: String| Err(ServerError::Config(message));
        if self.node_id == 0 {
            return fail("node_id must be set (--node-id, ORDO_NODE_ID or node_id in the config file) and > 0".into());
        }
        if self.shutdown_grace_ms < 1000 {
            return fail("shutdown_grace_ms must be at least 1000".into());
        }
        // A node the initial cluster does not name joins (through those nodes, or `join`).
        self.cluster()?;

        self.limits
            .validate()
            .map_err(|error| ServerError::Config(error.to_string()))?;
        self.groups
            .validate()
            .map_err(|error| ServerError::Config(error.to_string()))?;
        self.queues
            .validate()
            .map_err(|error| ServerError::Config(error.to_string()))?;
        self.retention
            .validate()
            .map_err(|error| ServerError::Config(error.to_string()))?;
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0
            || raft.election_timeout_min_ms <= raft.heartbeat_interval_ms * 2
        {
            return fail(
                "raft: need 0 < heartbeat_interval_ms and election_timeout_min_ms > 2 x heartbeat"
                    .into(),
            );
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return fail(
                "raft: election_timeout_max_ms must be above election_timeout_min_ms".into(),
            );
        }
        if raft.proposals_in_flight_max == 0 {
            return fail("raft.proposals_in_flight_max must be > 0".into());
        }
        if raft.producers_per_partition_max == 0 || raft.producer_idle_timeout_ms == 0 {
            return fail(
                "raft: producers_per_partition_max and producer_idle_timeout_ms must be > 0".into(),
            );
        }
        if raft.append_entries_max == 0 || raft.leader_balance_interval_ms == 0 {
            return fail(
                "raft: append_entries_max and leader_balance_interval_ms must be > 0".into(),
            );
        }
        if raft.connect_timeout_ms == 0 {
            return fail("raft.connect_timeout_ms must be > 0".into());
        }
        if raft.snapshot_entries == 0 || raft.compact_interval_ms == 0 {
            return fail("raft: snapshot_entries and compact_interval_ms must be > 0".into());
        }
        if self.grpc.message_bytes_max < self.limits.batch_bytes_max + (1 << 20) {
            return fail("grpc.message_bytes_max must exceed limits.batch_bytes_max by at least 1 MiB of framing".into());
        }
        if self.grpc.max_concurrent_streams == 0
            || self.grpc.subscriptions_max == 0
            || self.grpc.produce_stream_in_flight_max == 0
        {
            return fail("grpc: max_concurrent_streams, subscriptions_max and produce_stream_in_flight_max must be > 0".into());
        }
        if let Err(error) = self.store_options().validate() {
            return fail(format!("storage: {error}"));
        }
        Ok(())
    }

    /// Raft options for the Raft layer.
    pub fn raft_options(&self) -> ordo_raft::RaftOptions {
        ordo_raft::RaftOptions {
            heartbeat_interval: Duration::from_millis(self.raft.heartbeat_interval_ms),
            election_timeout_min: Duration::from_millis(self.raft.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(self.raft.election_timeout_max_ms),
            append_entries_max: self.raft.append_entries_max,
            connect_timeout: Duration::from_millis(self.raft.connect_timeout_ms),
            entry_cache_bytes: usize::try_from(self.raft.entry_cache_bytes).unwrap_or(usize::MAX),
            coalesce_bytes_max: usize::try_from(self.raft.coalesce_bytes_max).unwrap_or(usize::MAX),
            proposals_in_flight_max: usize::try_from(self.raft.proposals_in_flight_max)
                .unwrap_or(usize::MAX),
            producers_per_partition_max: self.raft.producers_per_partition_max,
            producer_idle_timeout: Duration::from_millis(self.raft.producer_idle_timeout_ms),
            snapshot_entries: self.raft.snapshot_entries,
            snapshot_entries_kept: self.raft.snapshot_entries_kept,
            state_purge_interval: Duration::from_millis(self.raft.state_purge_interval_ms),
            move_bytes_per_sec: self.raft.move_bytes_per_sec,
        }
    }

    /// Storage options for the storage layer.
    pub fn store_options(&self) -> ordo_storage::StoreOptions {
        ordo_storage::StoreOptions {
            write_queue_max: self.storage.write_queue_max as usize,
            write_buffer_bytes: self.storage.write_buffer_bytes as usize,
            block_cache_bytes: self.storage.block_cache_bytes as usize,
            journal_file_bytes: self.storage.journal_file_bytes,
            journal_replay_bytes_max: self.storage.journal_replay_bytes_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(node_id: u64, cluster: &str) -> ServeArgs {
        ServeArgs {
            node_id: Some(node_id),
            initial_cluster: Some(cluster.into()),
            ..ServeArgs::default()
        }
    }

    /// The config files of deploy/ load (every key known), with the node id from the pod name.
    #[test]
    fn deploy_config_files_load() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kustomize");
        for file in ["base/ordo.toml", "overlays/5/ordo.toml"] {
            let args = ServeArgs {
                config: Some(root.join(file)),
                node_id: Some(2),
                ..ServeArgs::default()
            };
            let config = NodeConfig::load(&args).unwrap_or_else(|error| panic!("{file}: {error}"));
            assert_eq!(config.node_id, 2);
            assert!(config.cluster().unwrap().len() >= 3, "{file}");
        }
    }

    /// A StatefulSet pod's name gives its node id; other names are refused with what to do.
    #[test]
    fn node_id_comes_from_the_pod_ordinal() {
        assert_eq!(node_id_of_hostname("ordo-0").unwrap(), 1);
        assert_eq!(node_id_of_hostname("my-ordo-cluster-4").unwrap(), 5);
        for bad in ["ordo", "ordo-", "ordo-x", ""] {
            let error = node_id_of_hostname(bad).unwrap_err().to_string();
            assert!(error.contains("--node-id"), "{bad:?}: {error}");
        }
    }

    /// `ORDO_RAFT__COMPACT_INTERVAL_MS` reaches figment's filter as `RAFT.COMPACT_INTERVAL_MS`:
    /// node config sections are read whatever their case; the CLI's own variables are not.
    #[test]
    fn environment_keys_are_matched_without_case() {
        assert!(env_key_read("RAFT.COMPACT_INTERVAL_MS"));
        assert!(env_key_read("retention.check_interval_ms"));
        assert!(env_key_read("NODE_ID"));
        assert!(!env_key_read("ENDPOINTS"));
        assert!(!env_key_read("WORKER_THREADS"));
    }

    /// Flags fill the config; the cluster string parses.
    #[test]
    fn flags_and_cluster() {
        let config = NodeConfig::load(&args(2, "1=a:1, 2=b:2,3=c:3")).unwrap();
        assert_eq!(config.node_id, 2);
        assert_eq!(config.cluster().unwrap().len(), 3);
        assert_eq!(config.cluster().unwrap()[&2], "b:2");
    }

    /// Each inconsistent setting is refused with a message naming it.
    #[test]
    fn bad_configs_are_refused() {
        for (node_id, cluster) in [(0, ""), (1, "1=a:1,1=b:2"), (1, "x=a:1"), (1, "1a:1")] {
            assert!(
                NodeConfig::load(&args(node_id, cluster)).is_err(),
                "{node_id} {cluster}"
            );
        }
        let mut config = NodeConfig {
            node_id: 1,
            ..NodeConfig::default()
        };
        config.raft.election_timeout_min_ms = 100;
        assert!(config.validate().is_err());
        // A node the initial cluster does not name joins through it.
        let joining = NodeConfig::load(&args(4, "1=a:1,2=b:2")).unwrap();
        assert!(!joining.cluster().unwrap().contains_key(&4));
    }

    /// The raft defaults are the raft crate's: converted back to options, they are
    /// `RaftOptions::default()` field for field.
    #[test]
    fn raft_defaults_come_from_the_raft_crate() {
        let options = NodeConfig::default().raft_options();
        assert_eq!(
            format!("{options:?}"),
            format!("{:?}", ordo_raft::RaftOptions::default())
        );
    }

    /// A TOML file is read, and unknown keys are refused.
    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ordo.toml");
        std::fs::write(&path, "node_id = 1\n[limits]\nrecord_bytes_max = 1000\n").unwrap();
        let loaded = NodeConfig::load(&ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(loaded.limits.record_bytes_max, 1000);
        std::fs::write(&path, "node_id = 1\nbogus = 2\n").unwrap();
        assert!(
            NodeConfig::load(&ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            })
            .is_err()
        );
    }
}
