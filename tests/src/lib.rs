//! The multi-process test fixture: [`TestCluster`] starts real `ordo serve` processes on
//! 127.0.0.1 and drives them through the public gRPC API only, the way a user's client would.
//!
//! Layout:
//! - [`TestCluster`] owns the processes, their ports, data dirs and log files; it crashes
//!   (`kill`), stops (`stop`) and restarts nodes and answers "who leads this partition".
//! - [`Ledger`] is the checker: it remembers what every produce call sent and how it ended
//!   (acked at an offset, not written, or unknown) and checks what a node serves against that.
//! - [`read_partition`] and [`produce_acked`] are the two loops every test needs.
//!
//! This crate must never link the server crates: a test that reached into a node's memory would
//! prove nothing about the binary users run. Every wait is bounded and every RPC has a deadline,
//! so a broken node fails a test with its log tail instead of hanging it.

pub mod chaos;
pub mod group_member;
pub mod load;
pub mod queue_consumer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use ordo_proto::v1::admin_client::AdminClient;
use ordo_proto::v1::log_client::LogClient;
use ordo_proto::v1::{
    ClusterStatusRequest, CreateTopicRequest, DescribeTopicRequest, FetchRequest, ProduceRequest,
    ProduceResponse, Record, StoredRecord, TopicDescription,
};
use tokio::time::{Instant, sleep};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Node ids as the public API spells them (`uint64 node_id`); the fixture numbers nodes 1..=N.
pub type NodeId = u64;

/// How long a cluster may take to answer ClusterStatus on every node with a metadata leader.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a partition may go without a known leader before a test gives up.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to serve a partition up to an expected offset.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM before it is killed and the stop fails.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of any single RPC that does not set its own; a backstop against a hung node.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of each produce call made by the helpers here.
pub const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`produce_acked`] keeps retrying calls that failed without writing anything.
pub const PRODUCE_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polls of a condition; short enough not to slow tests, long enough not to spin.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Upper bound on record bytes one Fetch returns.
const FETCH_BYTES_MAX: u32 = 1024 * 1024;
/// How long one Fetch waits at the end of the log for more records (long poll).
const FETCH_WAIT_MS: u32 = 200;
/// Bytes of a node's log shown in an error or after a failed test.
const LOG_TAIL_BYTES: u64 = 6 * 1024;

/// One `ordo serve` process and everything needed to start it again.
struct Node {
    id: NodeId,
    address: SocketAddr,
    metrics_address: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// `None` while the node is down (killed or stopped).
    child: Mutex<Option<Child>>,
}

/// N real `ordo serve` processes on 127.0.0.1, each with its own data dir and log file under one
/// temp dir. Dropping it kills every process and removes the temp dir, also when a test panics;
/// a panicking test also prints the tail of every node's log.
pub struct TestCluster {
    binary: PathBuf,
    initial_cluster: String,
    nodes: Vec<Node>,
    /// A config file every node is started with (`--config`), if any.
    config: Option<PathBuf>,
    /// Declared last so it is removed after the processes are gone.
    root: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `size` nodes and waits until every one of them answers with a metadata leader.
    pub async fn start_ready(size: usize) -> Result<Self> {
        let cluster = Self::start(size)?;
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Starts `size` nodes (ids 1..=size) without waiting for them; see [`Self::wait_ready`].
    pub fn start(size: usize) -> Result<Self> {
        Self::start_with_config(size, None)
    }

    /// Like [`Self::start_ready`], every node started with the config file `toml` (TOML text,
    /// e.g. `"[retention]\ncheck_interval_ms = 200\n"`).
    pub async fn start_ready_with_config(size: usize, toml: &str) -> Result<Self> {
        let cluster = Self::start_with_config(size, Some(toml))?;
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Starts `size` nodes, with the config file `toml` when given.
    pub fn start_with_config(size: usize, toml: Option<&str>) -> Result<Self> {
        ensure!(size > 0, "a cluster needs at least one node");
        let binary = ordo_binary()?;
        let root = tempfile::Builder::new()
            .prefix("ordo-test-")
            .tempdir()
            .context("create the cluster's temp dir")?;
        let config = match toml {
            Some(toml) => {
                let path = root.path().join("ordo.toml");
                fs::write(&path, toml).context("write the nodes' config file")?;
                Some(path)
            }
            None => None,
        };
        let addresses = free_addresses(size * 2)?;

        let mut nodes = Vec::with_capacity(size);
        for index in 0..size {
            let id = index as NodeId + 1;
            let node_dir = root.path().join(format!("node-{id}"));
            let data_dir = node_dir.join("data");
            fs::create_dir_all(&data_dir)
                .with_context(|| format!("create {}", data_dir.display()))?;
            nodes.push(Node {
                id,
                address: addresses[index],
                metrics_address: addresses[size + index],
                data_dir,
                log_path: node_dir.join("node.log"),
                child: Mutex::new(None),
            });
        }
        let initial_cluster = nodes
            .iter()
            .map(|node| format!("{}={}", node.id, node.address))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = Self {
            binary,
            initial_cluster,
            nodes,
            config,
            root,
        };
        for node in &cluster.nodes {
            cluster.spawn(node)?;
        }
        Ok(cluster)
    }

    /// Starts one more node, not named in the initial cluster: it joins through the initial
    /// nodes. `id`: its node id (the next free one when `None`). Does not wait for it.
    pub fn add_node(&mut self, id: Option<NodeId>) -> Result<NodeId> {
        let addresses = free_addresses(2)?;
        let next = self.nodes.iter().map(|node| node.id).max().unwrap_or(0) + 1;
        let id = id.unwrap_or(next);
        // A second process under a used id gets its own directory (it is the caller's
        // conflict to make), named by its position.
        let node_dir = self
            .root
            .path()
            .join(format!("node-{id}-{}", self.nodes.len()));
        let data_dir = node_dir.join("data");
        fs::create_dir_all(&data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let node = Node {
            id,
            address: addresses[0],
            metrics_address: addresses[1],
            data_dir,
            log_path: node_dir.join("node.log"),
            child: Mutex::new(None),
        };
        self.spawn(&node)?;
        self.nodes.push(node);
        Ok(id)
    }

    /// The exit status of a node's process if it has exited on its own, without reaping
    /// others.
    pub fn exited(&self, node: NodeId) -> Result<Option<ExitStatus>> {
        let entry = self
            .nodes
            .iter()
            .rev()
            .find(|candidate| candidate.id == node)
            .ok_or_else(|| anyhow!("node {node} is not part of this cluster"))?;
        let mut child = lock(&entry.child);
        let Some(process) = child.as_mut() else {
            return Ok(None);
        };
        let status = process.try_wait().context("wait for a node")?;
        if status.is_some() {
            *child = None;
        }
        Ok(status)
    }

    /// The log of the last process started under `node`'s id.
    pub fn last_log_path(&self, node: NodeId) -> PathBuf {
        self.nodes
            .iter()
            .rev()
            .find(|candidate| candidate.id == node)
            .map(|candidate| candidate.log_path.clone())
            .unwrap_or_default()
    }

    /// Ends a test: panics with `result`'s error while the cluster is still alive, so the
    /// unwinding drop prints every node's log tail next to the error.
    pub fn finish(self, result: Result<()>) {
        if let Err(error) = result {
            panic!("{error:?}");
        }
    }

    /// Ids of every node, running or not.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    /// Ids of the nodes whose process the fixture believes is running.
    pub fn running_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|node| lock(&node.child).is_some())
            .map(|node| node.id)
            .collect()
    }

    /// Whether the fixture started this node and has not killed or stopped it since.
    pub fn is_running(&self, node: NodeId) -> bool {
        self.nodes
            .iter()
            .any(|candidate| candidate.id == node && lock(&candidate.child).is_some())
    }

    /// The gRPC address the node listens on.
    pub fn address(&self, node: NodeId) -> SocketAddr {
        self.node(node).address
    }

    /// The gRPC endpoint of a node, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self, node: NodeId) -> String {
        format!("http://{}", self.node(node).address)
    }

    /// An `ordo-client` for every node of the cluster, with `options`.
    pub async fn client(&self, options: ordo_client::ClientOptions) -> Result<ordo_client::Client> {
        let endpoints: Vec<String> = self
            .node_ids()
            .into_iter()
            .map(|node| self.endpoint(node))
            .collect();
        Ok(ordo_client::Client::connect_with_options(endpoints, options).await?)
    }

    /// The sum of every series of metric `name` (e.g. `ordo_produce_requests_total`, all
    /// labels) on node `node`'s `/metrics`, read with a plain HTTP/1.0 GET.
    pub async fn metric(&self, node: NodeId, name: &str) -> Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.node(node).metrics_address;
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(address).await?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: ordo\r\n\r\n")
                .await?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await?;
            anyhow::Ok(body)
        };
        let body = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .with_context(|| format!("metrics of node {node} at {address}: no answer"))??;
        let mut sum = 0_u64;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let value = rest.rsplit(' ').next().unwrap_or_default();
            sum += value
                .parse::<f64>()
                .with_context(|| format!("metric line {line:?}"))? as u64;
        }
        Ok(sum)
    }

    /// A node's data directory.
    pub fn data_dir(&self, node: NodeId) -> PathBuf {
        self.node(node).data_dir.clone()
    }

    /// The file a node's stdout and stderr go to.
    pub fn log_path(&self, node: NodeId) -> PathBuf {
        self.node(node).log_path.clone()
    }

    /// A channel to a node. It connects lazily, so it can be made while the node is down; calls
    /// then fail with UNAVAILABLE. Every call has the [`RPC_TIMEOUT`] deadline unless it sets a
    /// shorter one.
    pub fn channel(&self, node: NodeId) -> Channel {
        Endpoint::from_shared(self.endpoint(node))
            .expect("an http://127.0.0.1:port endpoint is a valid uri")
            .connect_timeout(Duration::from_secs(2))
            .timeout(RPC_TIMEOUT)
            .connect_lazy()
    }

    /// A raw `ordo.v1.Log` client for one node.
    pub fn log_client(&self, node: NodeId) -> LogClient<Channel> {
        // A Fetch answer may pass its max_bytes by one record; tonic's default 4 MiB decoding
        // limit would turn a legal answer into a client-side error that looks like the node's.
        LogClient::new(self.channel(node)).max_decoding_message_size(16 * 1024 * 1024)
    }

    /// A raw `ordo.v1.Admin` client for one node.
    pub fn admin_client(&self, node: NodeId) -> AdminClient<Channel> {
        AdminClient::new(self.channel(node))
    }

    /// Crashes a node with SIGKILL (`Child::kill`): no shutdown path runs, unsynced writes are
    /// lost, exactly like a power cut of that process.
    pub fn kill(&self, node: NodeId) -> Result<()> {
        let mut child = lock(&self.node(node).child)
            .take()
            .ok_or_else(|| anyhow!("node {node} is not running"))?;
        child
            .kill()
            .with_context(|| format!("send SIGKILL to node {node}"))?;
        child
            .wait()
            .with_context(|| format!("reap node {node} after SIGKILL"))?;
        Ok(())
    }

    /// Stops a node with SIGTERM and waits for it to exit, at most [`STOP_TIMEOUT`]; after that
    /// it is killed and the stop fails. Returns the exit status so a test can require a clean one.
    pub async fn stop(&self, node: NodeId) -> Result<ExitStatus> {
        let mut child = lock(&self.node(node).child)
            .take()
            .ok_or_else(|| anyhow!("node {node} is not running"))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid does not fit pid_t")?;
        // SAFETY: kill(2) has no memory effects; the pid is our own unreaped child, so it cannot
        // have been recycled for another process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        if sent != 0 {
            let error = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            bail!("send SIGTERM to node {node}: {error}");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("wait for node to exit")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "node {node} did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail(node)
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a node that was killed or stopped again, with the same arguments, port and data
    /// dir. Does not wait for it; see [`Self::wait_node_ready`].
    pub fn restart(&self, node: NodeId) -> Result<()> {
        let entry = self.node(node);
        ensure!(lock(&entry.child).is_none(), "node {node} is still running");
        self.spawn(entry)
    }

    /// Polls ClusterStatus on every running node until each answers and names a metadata leader,
    /// at most [`READY_TIMEOUT`]. Fails at once if a node exits. Errors carry each node's log tail.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in self.running_nodes() {
            self.wait_node_ready_until(node, deadline).await?;
        }
        Ok(())
    }

    /// Polls ClusterStatus on one node until it answers and names a metadata leader.
    pub async fn wait_node_ready(&self, node: NodeId) -> Result<()> {
        self.wait_node_ready_until(node, Instant::now() + READY_TIMEOUT)
            .await
    }

    async fn wait_node_ready_until(&self, node: NodeId, deadline: Instant) -> Result<()> {
        let mut admin = self.admin_client(node);
        loop {
            self.ensure_alive(node)?;
            let last = match admin
                .cluster_status(with_timeout(
                    ClusterStatusRequest {},
                    Duration::from_secs(2),
                ))
                .await
            {
                Ok(response) => match response.into_inner().metadata_leader {
                    Some(_) => return Ok(()),
                    None => String::from("answered without a metadata leader"),
                },
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            };
            if Instant::now() >= deadline {
                bail!(
                    "node {node} not ready within {READY_TIMEOUT:?} (last: {last})\n{}",
                    self.all_log_tails()
                );
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Creates a topic through the first running node, retrying while no node can take it
    /// (UNAVAILABLE means nothing was written, so a retry is safe). After an unknown outcome
    /// (DEADLINE_EXCEEDED) it retries too, and then takes ALREADY_EXISTS as its own creation.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
    ) -> Result<TopicDescription> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let mut maybe_created = false;
        loop {
            let node = self.any_running_node()?;
            let request = CreateTopicRequest {
                name: name.to_owned(),
                partitions,
                replication_factor,
                config: None,
            };
            match self.admin_client(node).create_topic(request).await {
                Ok(response) => {
                    return response
                        .into_inner()
                        .topic
                        .ok_or_else(|| anyhow!("CreateTopic({name}) answered without a topic"));
                }
                Err(status) if status.code() == Code::AlreadyExists && maybe_created => {
                    return self.describe_topic(name).await;
                }
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                        && Instant::now() < deadline =>
                {
                    maybe_created |= status.code() == Code::DeadlineExceeded;
                    sleep(POLL_INTERVAL).await;
                }
                Err(status) => bail!("CreateTopic({name}) through node {node}: {status}"),
            }
        }
    }

    /// DescribeTopic through the first running node that answers.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let mut last = None;
        for node in self.running_nodes() {
            let request = DescribeTopicRequest {
                name: name.to_owned(),
            };
            match self.admin_client(node).describe_topic(request).await {
                Ok(response) => {
                    return response
                        .into_inner()
                        .topic
                        .ok_or_else(|| anyhow!("DescribeTopic({name}) answered without a topic"));
                }
                Err(status) => last = Some(format!("node {node}: {status}")),
            }
        }
        bail!(
            "no running node described {name}: {}",
            last.unwrap_or_else(|| String::from("no node is running"))
        )
    }

    /// The leader of a partition as DescribeTopic reports it, retried until a running node is
    /// named leader, at most [`LEADER_TIMEOUT`].
    pub async fn leader_of(&self, topic: &str, partition: u32) -> Result<NodeId> {
        self.wait_for_leader(topic, partition, |_| true).await
    }

    /// Waits until a running node other than `old` leads the partition and returns it.
    pub async fn wait_for_leader_change(
        &self,
        topic: &str,
        partition: u32,
        old: NodeId,
    ) -> Result<NodeId> {
        self.wait_for_leader(topic, partition, |leader| leader != old)
            .await
    }

    /// The leader of every partition of a topic, once each has one.
    pub async fn leaders(&self, topic: &str) -> Result<Vec<NodeId>> {
        let partitions = self.describe_topic(topic).await?.partitions.len();
        let mut leaders = Vec::with_capacity(partitions);
        for partition in 0..partitions as u32 {
            leaders.push(self.leader_of(topic, partition).await?);
        }
        Ok(leaders)
    }

    async fn wait_for_leader(
        &self,
        topic: &str,
        partition: u32,
        accept: impl Fn(NodeId) -> bool,
    ) -> Result<NodeId> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let mut last = String::from("no answer yet");
        loop {
            for node in self.running_nodes() {
                let request = DescribeTopicRequest {
                    name: topic.to_owned(),
                };
                let described = self.admin_client(node).describe_topic(request).await;
                let leader = match described {
                    Ok(response) => response
                        .into_inner()
                        .topic
                        .and_then(|topic| {
                            topic
                                .partitions
                                .into_iter()
                                .find(|description| description.partition == partition)
                        })
                        .and_then(|description| description.leader),
                    Err(status) => {
                        last = format!("node {node}: {status}");
                        continue;
                    }
                };
                match leader {
                    Some(leader) if self.is_running(leader) && accept(leader) => {
                        return Ok(leader);
                    }
                    other => last = format!("node {node} reports leader {other:?}"),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "no acceptable leader for {topic}/{partition} within {LEADER_TIMEOUT:?} \
                     (last: {last})\n{}",
                    self.all_log_tails()
                );
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Reads a whole partition through one node, as a consumer calling that node sees it; see
    /// [`read_partition`].
    pub async fn read_partition(
        &self,
        node: NodeId,
        topic: &str,
        partition: u32,
        end_min: u64,
    ) -> Result<Vec<StoredRecord>> {
        let mut client = self.log_client(node);
        read_partition(&mut client, topic, partition, end_min, Source::AnyReplica)
            .await
            .with_context(|| format!("read {topic}/{partition} through node {node}"))
            .map_err(|error| anyhow!("{error:#}\n{}", self.log_tail(node)))
    }

    /// Reads a whole partition from one node's own replica; see [`Source::ThisReplica`].
    pub async fn read_replica(
        &self,
        node: NodeId,
        topic: &str,
        partition: u32,
        end_min: u64,
    ) -> Result<Vec<StoredRecord>> {
        let mut client = self.log_client(node);
        read_partition(&mut client, topic, partition, end_min, Source::ThisReplica)
            .await
            .with_context(|| format!("read node {node}'s replica of {topic}/{partition}"))
            .map_err(|error| anyhow!("{error:#}\n{}", self.log_tail(node)))
    }

    /// The last few KiB of a node's log, headed by its id, for error messages.
    pub fn log_tail(&self, node: NodeId) -> String {
        let path = &self.node(node).log_path;
        let tail = read_tail(path).unwrap_or_else(|error| format!("<cannot read log: {error}>"));
        format!(
            "----- node {node} log tail ({}) -----\n{tail}",
            path.display()
        )
    }

    /// [`Self::log_tail`] of every node.
    pub fn all_log_tails(&self) -> String {
        self.node_ids()
            .into_iter()
            .map(|node| self.log_tail(node))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn any_running_node(&self) -> Result<NodeId> {
        self.running_nodes()
            .first()
            .copied()
            .ok_or_else(|| anyhow!("no node is running"))
    }

    fn node(&self, node: NodeId) -> &Node {
        self.nodes
            .iter()
            .find(|candidate| candidate.id == node)
            .unwrap_or_else(|| panic!("node {node} is not part of this cluster"))
    }

    /// Fails with the log tail if the node's process has exited on its own.
    fn ensure_alive(&self, node: NodeId) -> Result<()> {
        let mut guard = lock(&self.node(node).child);
        let child = guard
            .as_mut()
            .ok_or_else(|| anyhow!("node {node} is not running"))?;
        if let Some(status) = child.try_wait().context("poll node process")? {
            *guard = None;
            drop(guard);
            bail!("node {node} exited with {status}\n{}", self.log_tail(node));
        }
        Ok(())
    }

    fn spawn(&self, node: &Node) -> Result<()> {
        let mut command = serve_command(
            Command::new(&self.binary),
            &ServeSpec {
                id: node.id,
                data_dir: &node.data_dir,
                address: node.address,
                initial_cluster: &self.initial_cluster,
                metrics: node.metrics_address,
                log_path: &node.log_path,
                starter: "ordo-tests",
            },
        )?;
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {} for node {}", self.binary.display(), node.id))?;
        *lock(&node.child) = Some(child);
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "ordo-tests: test failed; cluster dir {}\n{}",
                self.root.path().display(),
                self.all_log_tails()
            );
        }
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.child).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `count` distinct free addresses on 127.0.0.1: every listener stays bound until all ports are
/// picked, so no two coincide.
fn free_addresses(count: usize) -> Result<Vec<SocketAddr>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("pick free ports on 127.0.0.1")?;
    Ok(listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// Locks a node's child slot. A poisoned lock only means another thread panicked while holding
/// it; the `Option<Child>` inside is still meaningful, so it is used anyway.
fn lock(slot: &Mutex<Option<Child>>) -> std::sync::MutexGuard<'_, Option<Child>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The flags and log of one test-started `ordo serve`.
pub struct ServeSpec<'a> {
    pub id: NodeId,
    pub data_dir: &'a Path,
    /// Listen and advertised address.
    pub address: SocketAddr,
    pub initial_cluster: &'a str,
    pub metrics: SocketAddr,
    /// The node's log: stdout and stderr are appended to it after a start marker.
    pub log_path: &'a Path,
    /// Who starts the node, for the marker (`ordo-tests`, `ordo-chaos`).
    pub starter: &'a str,
}

/// `command` (the `ordo` binary, or a wrapper such as `ip netns exec NS` followed by it) with
/// `serve` and the node's flags, its output appended to the node's log, and
/// [`node_process_settings`].
pub fn serve_command(mut command: Command, spec: &ServeSpec) -> Result<Command> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log_path)
        .with_context(|| format!("open {}", spec.log_path.display()))?;
    writeln!(
        log,
        "===== {}: starting node {} =====",
        spec.starter, spec.id
    )?;
    command
        .arg("serve")
        .arg("--node-id")
        .arg(spec.id.to_string())
        .arg("--data-dir")
        .arg(spec.data_dir)
        .arg("--listen")
        .arg(spec.address.to_string())
        .arg("--advertise")
        .arg(spec.address.to_string())
        .arg("--initial-cluster")
        .arg(spec.initial_cluster)
        .arg("--metrics-listen")
        .arg(spec.metrics.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    node_process_settings(&mut command);
    Ok(command)
}

/// Settings every test-started `ordo serve` gets: configured by its flags alone (ORDO_*
/// variables of the test environment, ORDO_BIN or a developer's own settings, must not leak
/// into its configuration), logs at `info` unless RUST_LOG says otherwise, backtraces on, and
/// SIGKILLed by the kernel if the thread that started it dies (a test binary killed by a
/// timeout), so no server outlives its test.
pub fn node_process_settings(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ORDO_") {
            command.env_remove(name);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    command.env("RUST_BACKTRACE", "1");
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. `ip netns exec`
    // execs the server, which keeps this setting.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Finds the `ordo` binary: `$ORDO_BIN`, else `ordo` next to the test binary's `deps/` dir
/// (`target/debug/deps/cluster-xxxx` -> `target/debug/ordo`).
pub fn ordo_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORDO_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "ORDO_BIN={} does not exist; run `cargo build -p ordo-cli` first",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locate the test binary")?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ordo"))
        .ok_or_else(|| anyhow!("test binary {} has no parent dir", exe.display()))?;
    ensure!(
        path.is_file(),
        "the ordo binary is missing at {}; run `cargo build -p ordo-cli` first \
         (or set ORDO_BIN to its path)",
        path.display()
    );
    Ok(path)
}

/// Reads the last [`LOG_TAIL_BYTES`] of a file.
fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let length = file.metadata()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Wraps a message in a request whose deadline travels to the server as `grpc-timeout`.
pub fn with_timeout<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The status code as gRPC defines it. tonic reports a deadline that expired in the client as
/// CANCELLED ("Timeout expired"); gRPC calls that DEADLINE_EXCEEDED, and for a produce it means
/// the same thing: the outcome is unknown.
pub fn effective_code(status: &Status) -> Code {
    let client_deadline = tonic::TimeoutExpired(()).to_string();
    if status.code() == Code::Cancelled && status.message() == client_deadline {
        Code::DeadlineExceeded
    } else {
        status.code()
    }
}

/// Fails unless `result` is an error with one of `expected` codes; `what` names the call.
pub fn expect_code<T: std::fmt::Debug>(
    result: std::result::Result<T, Status>,
    expected: &[Code],
    what: &str,
) -> Result<()> {
    match result {
        Ok(value) => bail!("{what}: expected {expected:?}, got success: {value:?}"),
        Err(status) if expected.contains(&effective_code(&status)) => Ok(()),
        Err(status) => bail!(
            "{what}: expected {expected:?}, got {:?}: {}",
            effective_code(&status),
            status.message()
        ),
    }
}

/// Fails unless `result` is an error with `code` and the Ordo `ErrorInfo` `reason`; `what` names
/// the call.
pub fn expect_reason<T: std::fmt::Debug>(
    result: std::result::Result<T, Status>,
    code: Code,
    reason: &str,
    what: &str,
) -> Result<Status> {
    let status = match result {
        Ok(value) => bail!("{what}: expected {code:?} / {reason}, got success: {value:?}"),
        Err(status) => status,
    };
    let found = ordo_proto::errors::reason_of(&status);
    ensure!(
        status.code() == code && found.as_deref() == Some(reason),
        "{what}: expected {code:?} / {reason}, got {:?} / {found:?}: {}",
        status.code(),
        status.message()
    );
    Ok(status)
}

/// Sends `body` as the raw bytes of a unary call to gRPC method `path` (e.g.
/// `/ordo.v1.Log/Produce`), as a client generated from another proto, or a broken one, would.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    body: Bytes,
) -> std::result::Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let response = grpc
        .unary(
            Request::new(body),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?;
    Ok(response.into_inner())
}

/// A codec that sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(
        &mut self,
        item: Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> std::result::Result<(), Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> std::result::Result<Option<Bytes>, Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Records with values unique to `prefix` (`{prefix}-{index}`) and, when `keyed`, keys spread
/// over 64 distinct values so that key hashing touches every partition.
pub fn unique_records(prefix: &str, first: usize, count: usize, keyed: bool) -> Vec<Record> {
    (first..first + count)
        .map(|index| Record {
            key: keyed.then(|| Bytes::from(format!("key-{}", index % 64))),
            value: Bytes::from(format!("{prefix}-{index:08}")),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect()
}

/// `records` as `ordo-client` records (key and value; these tests send no headers).
pub fn client_records(records: &[Record]) -> Vec<ordo_client::Record> {
    records
        .iter()
        .map(|record| {
            let out = ordo_client::Record::new(record.value.clone());
            match &record.key {
                Some(key) => out.with_key(key.clone()),
                None => out,
            }
        })
        .collect()
}

/// One Produce call with a `grpc-timeout` deadline. The records are also given to `ledger`
/// together with the outcome, before the outcome is returned.
pub async fn produce_once(
    client: &mut LogClient<Channel>,
    ledger: &mut Ledger,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
    deadline: Duration,
) -> Result<std::result::Result<ProduceResponse, Status>> {
    let request = ProduceRequest {
        topic: topic.to_owned(),
        partition,
        records: records.clone(),
        producer: None,
    };
    let outcome = client
        .produce(with_timeout(request, deadline))
        .await
        .map(tonic::Response::into_inner);
    ledger.record(&records, partition, &outcome)?;
    Ok(outcome)
}

/// Produces `count` records with unique values (`{prefix}-{index}`, keys spread when `keyed`) in
/// calls of `batch` records and records every ack in `ledger`. A call that fails without an ack
/// is retried with fresh values (so no value is ever sent twice), for at most
/// [`PRODUCE_RETRY_TIMEOUT`]; UNAVAILABLE and DEADLINE_EXCEEDED are expected around leader
/// changes, anything else fails at once.
#[allow(clippy::too_many_arguments)]
pub async fn produce_acked(
    client: &mut LogClient<Channel>,
    ledger: &mut Ledger,
    topic: &str,
    partition: Option<u32>,
    prefix: &str,
    count: usize,
    batch: usize,
    keyed: bool,
) -> Result<()> {
    ensure!(batch > 0, "batch must hold at least one record");
    let deadline = Instant::now() + PRODUCE_RETRY_TIMEOUT;
    let mut acked = 0;
    let mut attempt = 0;
    while acked < count {
        let size = batch.min(count - acked);
        let records = unique_records(&format!("{prefix}-a{attempt}"), acked, size, keyed);
        attempt += 1;
        let outcome =
            produce_once(client, ledger, topic, partition, records, PRODUCE_TIMEOUT).await?;
        match outcome {
            Ok(_) => acked += size,
            Err(status) => {
                let code = effective_code(&status);
                let retryable = matches!(code, Code::Unavailable | Code::DeadlineExceeded);
                if !retryable || Instant::now() >= deadline {
                    bail!(
                        "produce to {topic} failed after {acked}/{count} acked records: \
                         {code:?}: {}",
                        status.message()
                    );
                }
                sleep(POLL_INTERVAL).await;
            }
        }
    }
    Ok(())
}

/// Whose copy of a partition a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Whatever the node called answers, as for any consumer: below its own high watermark a
    /// replica serves its own copy; at or past it, it forwards the Fetch to the leader.
    AnyReplica,
    /// Only the called node's own replica. The Fetch carries the node-to-node "forwarded" header
    /// (`x-ordo-forwarded`, see ARCHITECTURE.md, "The life of a fetch"), so a replica never
    /// forwards it: at its own end it waits for its own high watermark. This is how a test
    /// reads "this replica's copy"; it leans on that internal header, and must change with it.
    ThisReplica,
}

/// Reads one partition from the node behind `client`, from offset 0 up to the high watermark,
/// waiting (at most [`READ_TIMEOUT`]) until it reaches `end_min`: a follower serves committed
/// records a little after the leader acked them.
///
/// Fails unless offsets are dense from 0 and every record served lies below the high watermark
/// returned with it (Fetch serves committed records only).
pub async fn read_partition(
    client: &mut LogClient<Channel>,
    topic: &str,
    partition: u32,
    end_min: u64,
    source: Source,
) -> Result<Vec<StoredRecord>> {
    read_partition_from(client, topic, partition, 0, end_min, source).await
}

/// Marks a fetch as forwarded, so the node that gets it answers from its own replica.
pub fn this_replica<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        ordo_proto::FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
}

/// [`read_partition`] from offset `from` (a log start retention moved), dense from there.
pub async fn read_partition_from(
    client: &mut LogClient<Channel>,
    topic: &str,
    partition: u32,
    from: u64,
    end_min: u64,
    source: Source,
) -> Result<Vec<StoredRecord>> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut records: Vec<StoredRecord> = Vec::new();
    let mut last_error = None;
    let mut high_watermark = None;
    loop {
        let next = from + records.len() as u64;
        let mut progressed = false;
        let request = FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset: next,
            max_bytes: FETCH_BYTES_MAX,
            // Past `end_min` the read only needs the current high watermark, not new records.
            max_wait_ms: if next < end_min { FETCH_WAIT_MS } else { 0 },
        };
        let mut request = with_timeout(request, RPC_TIMEOUT);
        if source == Source::ThisReplica {
            this_replica(&mut request);
        }
        match client.fetch(request).await {
            Ok(response) => {
                let response = response.into_inner();
                ensure!(
                    response.partition == partition,
                    "asked for partition {partition}, got {}",
                    response.partition
                );
                for record in response.records {
                    let expected = from + records.len() as u64;
                    // The first batch may start before the offset asked for.
                    if record.offset < expected && records.is_empty() {
                        continue;
                    }
                    ensure!(
                        record.offset == expected,
                        "offsets not dense: expected offset {expected}, got {}",
                        record.offset
                    );
                    ensure!(
                        record.offset < response.high_watermark,
                        "served offset {} at or above the high watermark {}",
                        record.offset,
                        response.high_watermark
                    );
                    records.push(record);
                    progressed = true;
                }
                high_watermark = Some(response.high_watermark);
                let end = from + records.len() as u64;
                if end >= response.high_watermark && end >= end_min {
                    return Ok(records);
                }
            }
            // The node may be starting, catching up or between leaders; all of these pass.
            Err(status) => last_error = Some(status),
        }
        if Instant::now() >= deadline {
            bail!(
                "read {} records, wanted at least {end_min} within {READ_TIMEOUT:?} \
                 (last high watermark: {high_watermark:?}, last error: {last_error:?})",
                records.len()
            );
        }
        // A node that does not long-poll (or keeps failing) must not be asked in a tight loop.
        if !progressed {
            sleep(POLL_INTERVAL).await;
        }
    }
}

/// What a produce call made of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acked at this partition and offset.
    Acked { partition: u32, offset: u64 },
    /// The node answered UNAVAILABLE: the contract says nothing was written.
    NotWritten,
    /// A deadline passed or the connection broke: the record may or may not be in the log.
    Unknown,
}

/// One record a test sent.
#[derive(Debug, Clone)]
struct Sent {
    key: Option<Bytes>,
    /// The partition the produce call named, if it named one.
    named_partition: Option<u32>,
    fate: Fate,
}

/// The checker: what every produce call sent and how it ended, and what nodes served.
///
/// A record's value identifies it; the helpers never send a value twice, so a value found at two
/// offsets was duplicated by the cluster, never by a client retry. Such duplicates are allowed
/// within one partition and counted: a node retries a forwarded append after a leader change
/// and may append it twice (ARCHITECTURE.md, "Outcome unknown"), but the acked copy must still
/// be at its acked offset. A timed-out write is "unknown", never "absent".
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every value sent, with its key and what became of it.
    sent: HashMap<Bytes, Sent>,
    /// Acked positions, to catch two acks for one position.
    acked: BTreeMap<(u32, u64), Bytes>,
    /// Every (partition, offset) any read served, with the first node that served it.
    observed: BTreeMap<(u32, u64), (NodeId, Bytes)>,
    /// Positions holding a second copy of a record, as seen by any read.
    duplicates: BTreeSet<(u32, u64)>,
}

impl Ledger {
    /// Records the acknowledgements `ordo-client` returned for `records` (see [`Self::record`]).
    pub fn record_acks(
        &mut self,
        records: &[Record],
        partition: Option<u32>,
        acks: &[ordo_client::RecordAck],
    ) -> Result<()> {
        let response = ProduceResponse {
            duplicate: false,
            acks: acks
                .iter()
                .map(|ack| ordo_proto::v1::RecordAck {
                    partition: ack.partition,
                    offset: ack.offset,
                })
                .collect(),
        };
        self.record(records, partition, &Ok(response))
    }

    /// Records the outcome of one produce call of `records` (with `partition` if it named one).
    /// Fails if the acks themselves break the contract: one ack per record, in the named
    /// partition, no position acked twice.
    pub fn record(
        &mut self,
        records: &[Record],
        partition: Option<u32>,
        outcome: &std::result::Result<ProduceResponse, Status>,
    ) -> Result<()> {
        let fates: Vec<Fate> = match outcome {
            Ok(response) => {
                ensure!(
                    response.acks.len() == records.len(),
                    "produce of {} records returned {} acks",
                    records.len(),
                    response.acks.len()
                );
                response
                    .acks
                    .iter()
                    .map(|ack| Fate::Acked {
                        partition: ack.partition,
                        offset: ack.offset,
                    })
                    .collect()
            }
            Err(status) => {
                let fate = if status_says_not_written(status) {
                    Fate::NotWritten
                } else {
                    Fate::Unknown
                };
                vec![fate; records.len()]
            }
        };
        for (record, fate) in records.iter().zip(fates) {
            if let Fate::Acked {
                partition: acked_partition,
                offset,
            } = fate
            {
                if let Some(requested) = partition {
                    ensure!(
                        acked_partition == requested,
                        "record {:?} sent to partition {requested} was acked in \
                         partition {acked_partition}",
                        record.value
                    );
                }
                if let Some(previous) = self
                    .acked
                    .insert((acked_partition, offset), record.value.clone())
                {
                    bail!(
                        "position {acked_partition}/{offset} acked twice: for {previous:?} and \
                         for {:?}",
                        record.value
                    );
                }
            }
            let sent = Sent {
                key: record.key.clone(),
                named_partition: partition,
                fate,
            };
            let previous = self.sent.insert(record.value.clone(), sent);
            ensure!(
                previous.is_none(),
                "value {:?} sent twice; test values must be unique",
                record.value
            );
        }
        Ok(())
    }

    /// Merges another ledger (from a concurrent producer) into this one.
    pub fn merge(&mut self, other: Ledger) -> Result<()> {
        for (value, entry) in other.sent {
            ensure!(
                self.sent.insert(value.clone(), entry).is_none(),
                "value {value:?} sent by two producers"
            );
        }
        for (position, value) in other.acked {
            if let Some(previous) = self.acked.insert(position, value.clone()) {
                bail!(
                    "position {}/{} acked twice: for {previous:?} and for {value:?}",
                    position.0,
                    position.1
                );
            }
        }
        Ok(())
    }

    /// Number of records acked, in all partitions.
    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }

    /// Number of records whose outcome is unknown.
    pub fn unknown_count(&self) -> usize {
        self.sent
            .values()
            .filter(|sent| sent.fate == Fate::Unknown)
            .count()
    }

    /// Number of records a node refused with UNAVAILABLE (so never written).
    pub fn not_written_count(&self) -> usize {
        self.sent
            .values()
            .filter(|sent| sent.fate == Fate::NotWritten)
            .count()
    }

    /// Number of positions found holding a second copy of a record, over all reads so far.
    pub fn duplicate_count(&self) -> usize {
        self.duplicates.len()
    }

    /// Number of records acked in one partition.
    pub fn acked_in(&self, partition: u32) -> usize {
        self.acked
            .range((partition, 0)..=(partition, u64::MAX))
            .count()
    }

    /// Fails unless every key sent without a named partition was acked in one partition only:
    /// records with the same key go to the same partition.
    pub fn check_key_affinity(&self) -> Result<()> {
        let mut partitions: HashMap<&Bytes, u32> = HashMap::new();
        for (value, sent) in &self.sent {
            let (Some(key), None, Fate::Acked { partition, .. }) =
                (&sent.key, sent.named_partition, sent.fate)
            else {
                continue;
            };
            if let Some(other) = partitions.insert(key, partition) {
                ensure!(
                    other == partition,
                    "key {key:?} went to partitions {other} and {partition} (value {value:?})"
                );
            }
        }
        Ok(())
    }

    /// One past the highest acked offset of a partition: every read must reach it.
    pub fn acked_end(&self, partition: u32) -> u64 {
        self.acked
            .range((partition, 0)..=(partition, u64::MAX))
            .next_back()
            .map_or(0, |((_, offset), _)| offset + 1)
    }

    /// Checks a whole partition as one node served it (from [`read_partition`]):
    /// - offsets are dense from 0 and the read reaches every acked offset;
    /// - every acked position holds exactly the acked value (and key);
    /// - every record served was sent by a test, to this partition, and not refused with
    ///   UNAVAILABLE; a second copy of a record in the same partition is counted, not failed
    ///   (see [`Ledger::duplicate_count`]);
    /// - no position holds different records in two reads, from this node or another.
    pub fn check_partition(
        &mut self,
        node: NodeId,
        partition: u32,
        records: &[StoredRecord],
    ) -> Result<()> {
        let end = self.acked_end(partition);
        ensure!(
            records.len() as u64 >= end,
            "node {node} partition {partition}: served {} records but offset {} was acked",
            records.len(),
            end - 1
        );
        let mut seen: HashMap<&Bytes, u64> = HashMap::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            let at = format!("node {node} partition {partition} offset {}", record.offset);
            ensure!(
                record.offset == index as u64,
                "{at}: offsets not dense (expected {index})"
            );
            let position = (partition, record.offset);
            if seen.insert(&record.value, record.offset).is_some() {
                self.duplicates.insert(position);
            }
            match self.observed.get(&position) {
                Some((other, value)) if value != &record.value => bail!(
                    "{at}: holds {:?} but node {other} served {value:?} at the same position",
                    record.value
                ),
                Some(_) => {}
                None => {
                    self.observed.insert(position, (node, record.value.clone()));
                }
            }
            if let Some(acked) = self.acked.get(&position) {
                ensure!(
                    acked == &record.value,
                    "{at}: holds {:?} but {acked:?} was acked there",
                    record.value
                );
            }
            let Some(sent) = self.sent.get(&record.value) else {
                bail!("{at}: holds {:?}, which no test sent", record.value);
            };
            ensure!(
                sent.key == record.key,
                "{at}: key {:?} but {:?} was sent",
                record.key,
                sent.key
            );
            match sent.fate {
                Fate::Acked {
                    partition: acked_partition,
                    offset,
                } => {
                    ensure!(
                        acked_partition == partition,
                        "{at}: holds {:?}, which was acked in partition {acked_partition}",
                        record.value
                    );
                    // The acked copy itself is checked at its own position.
                    if offset != record.offset {
                        self.duplicates.insert(position);
                    }
                }
                Fate::NotWritten => bail!(
                    "{at}: holds {:?}, which was refused with UNAVAILABLE (\"nothing written\")",
                    record.value
                ),
                Fate::Unknown => {}
            }
        }
        Ok(())
    }
}

/// Whether a failed produce promises that nothing was written: UNAVAILABLE *from the node*. An
/// UNAVAILABLE made by the client's transport (a broken connection) promises nothing, so only a
/// status carrying the node's error details counts; without details the outcome is unknown.
fn status_says_not_written(status: &Status) -> bool {
    status.code() == Code::Unavailable && !status.details().is_empty()
}

/// A seed for a test's randomness: `ORDO_TEST_SEED` if set, else a fresh one. It is printed, so
/// a failed run shows the seed that reproduces its choices.
pub fn test_seed() -> u64 {
    let seed = std::env::var("ORDO_TEST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(rand::random);
    println!("ordo-tests: seed {seed} (rerun with ORDO_TEST_SEED={seed})");
    seed
}
