//! `ordo dev`: a local cluster of real `ordo serve` child processes, for trying Ordo out and for
//! `ordo bench produce --local`.
//!
//! This module owns the children: it starts them (each in its own process group, with stdout
//! and stderr going to `DIR/node-<id>.log`), waits a bounded time for each to answer
//! ClusterStatus, reports a child that dies, and stops them all with SIGTERM, then SIGKILL
//! after [`STOP_TIMEOUT`]. It never leaves a child running: every path out of a command that
//! started a cluster goes through [`DevCluster::stop`], children are killed if a
//! [`DevCluster`] is dropped, and on Linux a child gets SIGTERM if this process dies.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::output;
use crate::signals::Signals;

/// How long start-up may take before `ordo dev` gives up, for all nodes together.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stopping nodes may take after SIGTERM before they are killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between readiness probes and between checks for dead children.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Most nodes a dev cluster may have.
const NODES_MAX: u16 = 15;
/// Lines of a dead node's log shown to the user.
const LOG_TAIL_LINES: usize = 20;
/// Bytes read from the end of a log to find its last lines.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// Arguments of `ordo dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory for the nodes' data (`node-<id>/`) and logs (`node-<id>.log`).
    #[arg(long, default_value = "/var/tmp/ordo-dev")]
    pub data_dir: PathBuf,
    /// gRPC port of node 1; node i listens on base-port + i - 1.
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Node i serves Prometheus metrics on metrics-base-port + i.
    #[arg(long, default_value_t = 9100)]
    pub metrics_base_port: u16,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=i64::from(NODES_MAX)))]
    pub nodes: u16,
    /// Delete the nodes' data and logs in --data-dir before starting.
    #[arg(long)]
    pub clean: bool,
}

/// Where a dev cluster's nodes keep data and which ports they use.
#[derive(Debug, Clone)]
pub struct Layout {
    data_dir: PathBuf,
    base_port: u16,
    metrics_base_port: u16,
    nodes: u16,
}

/// One node of a [`Layout`].
#[derive(Debug, Clone)]
struct NodeSpec {
    id: u16,
    /// Its share of this machine's CPUs: every node of a dev cluster runs here.
    worker_threads: usize,
    listen: String,
    metrics: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Layout {
    /// A layout of `nodes` nodes, checked to fit in the port range.
    pub fn new(
        data_dir: PathBuf,
        base_port: u16,
        metrics_base_port: u16,
        nodes: u16,
    ) -> anyhow::Result<Layout> {
        if nodes == 0 || nodes > NODES_MAX {
            bail!("a dev cluster has 1 to {NODES_MAX} nodes, not {nodes}");
        }
        if base_port.checked_add(nodes - 1).is_none() {
            bail!("--base-port {base_port} leaves no room for {nodes} ports");
        }
        if metrics_base_port.checked_add(nodes).is_none() {
            bail!("--metrics-base-port {metrics_base_port} leaves no room for {nodes} ports");
        }
        Ok(Layout {
            data_dir,
            base_port,
            metrics_base_port,
            nodes,
        })
    }

    fn specs(&self) -> Vec<NodeSpec> {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let worker_threads = (cpus / usize::from(self.nodes)).max(1);
        (1..=self.nodes)
            .map(|id| NodeSpec {
                id,
                worker_threads,
                // Both additions were checked in `new`.
                listen: format!("127.0.0.1:{}", self.base_port + (id - 1)),
                metrics: format!("127.0.0.1:{}", self.metrics_base_port + id),
                data_dir: self.data_dir.join(format!("node-{id}")),
                log: self.data_dir.join(format!("node-{id}.log")),
            })
            .collect()
    }

    /// The nodes' gRPC addresses, node 1 first.
    pub fn endpoints(&self) -> Vec<String> {
        self.specs().into_iter().map(|spec| spec.listen).collect()
    }

    /// `1=127.0.0.1:7001,2=...`, the `--initial-cluster` of every node.
    fn initial_cluster(&self) -> String {
        self.specs()
            .iter()
            .map(|spec| format!("{}={}", spec.id, spec.listen))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Deletes what earlier dev clusters left in the data directory: `node-<n>` directories and
    /// `node-<n>.log` files, and nothing else, so a mistyped `--data-dir` cannot wipe a
    /// directory that is not ours.
    pub fn clean(&self) -> anyhow::Result<()> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot read {}", self.data_dir.display()));
            }
        };
        for entry in entries {
            let entry =
                entry.with_context(|| format!("cannot read {}", self.data_dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if is_node_dir_name(name) && path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot delete {}", path.display()))?;
            } else if name.strip_suffix(".log").is_some_and(is_node_dir_name) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot delete {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Whether `name` is `node-<digits>`.
fn is_node_dir_name(name: &str) -> bool {
    name.strip_prefix("node-")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_digit()))
}

/// A running child node.
struct Node {
    spec: NodeSpec,
    child: Child,
    pid: libc::pid_t,
    /// Set once the child has been reaped; its pid must not be signalled after that.
    exited: Option<ExitStatus>,
}

impl Node {
    /// Checks, without blocking, whether the child has exited.
    fn poll_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("cannot check on node {}", self.spec.id))?;
        }
        Ok(self.exited)
    }

    /// Prints the end of the node's log to stderr and returns an error naming the node.
    fn died(&self, status: ExitStatus) -> anyhow::Error {
        eprintln!(
            "--- last lines of {} ---\n{}\n---",
            self.spec.log.display(),
            log_tail(&self.spec.log)
        );
        anyhow!(
            "node {} exited unexpectedly ({status}); its log is {}",
            self.spec.id,
            self.spec.log.display()
        )
    }
}

/// The child processes of a dev cluster.
pub struct DevCluster {
    nodes: Vec<Node>,
    exe: PathBuf,
    initial_cluster: String,
}

impl DevCluster {
    /// Starts one `ordo serve` child per node of `layout`. If one cannot be started, those
    /// already started are stopped before the error is returned.
    pub async fn spawn(layout: &Layout) -> anyhow::Result<DevCluster> {
        std::fs::create_dir_all(&layout.data_dir)
            .with_context(|| format!("cannot create {}", layout.data_dir.display()))?;
        let exe = std::env::current_exe().context("cannot find the ordo binary")?;
        let initial_cluster = layout.initial_cluster();
        let mut cluster = DevCluster {
            nodes: Vec::new(),
            exe,
            initial_cluster,
        };
        for spec in layout.specs() {
            match spawn_node(&cluster.exe, spec, &cluster.initial_cluster, false) {
                Ok(node) => cluster.nodes.push(node),
                Err(error) => {
                    if let Err(stop_error) = cluster.stop().await {
                        tracing::warn!(error = %format!("{stop_error:#}"), "cannot stop the nodes already started");
                    }
                    return Err(error);
                }
            }
        }
        Ok(cluster)
    }

    /// Waits until every node answers ClusterStatus, for at most `timeout` in all; then, within
    /// the same time, for a metadata leader (only a warning if there is none yet).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for node in &mut self.nodes {
            let client = crate::client_for(vec![node.spec.listen.clone()], PROBE_TIMEOUT).await?;
            loop {
                if let Some(status) = node.poll_exit()? {
                    return Err(node.died(status));
                }
                let error = match client.cluster_status().await {
                    Ok(_) => break,
                    Err(error) => error,
                };
                if Instant::now() >= deadline {
                    eprintln!(
                        "--- last lines of {} ---\n{}\n---",
                        node.spec.log.display(),
                        log_tail(&node.spec.log)
                    );
                    bail!(
                        "node {} did not answer at {} within {timeout:?} (last error: {error}); see its log {}",
                        node.spec.id,
                        node.spec.listen,
                        node.spec.log.display()
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        let endpoints = self
            .nodes
            .iter()
            .map(|node| node.spec.listen.clone())
            .collect();
        let client = crate::client_for(endpoints, PROBE_TIMEOUT).await?;
        loop {
            if let Ok(status) = client.cluster_status().await
                && status.metadata_leader.is_some()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!("no metadata leader elected yet; commands may fail until one is");
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn node_index(&self, id: u64) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| u64::from(node.spec.id) == id)
    }

    /// Kills node `id` with SIGKILL (no shutdown, no flush) and reaps it.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let index = self
            .node_index(id)
            .with_context(|| format!("no node {id} in this cluster"))?;
        let node = &mut self.nodes[index];
        if node.poll_exit()?.is_some() {
            bail!("node {id} is not running");
        }
        node.child
            .kill()
            .await
            .with_context(|| format!("cannot kill node {id}"))?;
        node.exited = Some(
            node.child
                .wait()
                .await
                .with_context(|| format!("cannot wait for node {id}"))?,
        );
        Ok(())
    }

    /// Starts node `id` again, on its data, appending to its log.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let index = self
            .node_index(id)
            .with_context(|| format!("no node {id} in this cluster"))?;
        if self.nodes[index].poll_exit()?.is_none() {
            bail!("node {id} is still running");
        }
        let spec = self.nodes[index].spec.clone();
        self.nodes[index] = spawn_node(&self.exe, spec, &self.initial_cluster, true)?;
        Ok(())
    }

    /// Returns, as an error, when a node exits; runs until then.
    pub async fn watch(&mut self) -> anyhow::Error {
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        loop {
            interval.tick().await;
            for node in &mut self.nodes {
                match node.poll_exit() {
                    Ok(None) => {}
                    Ok(Some(status)) => return node.died(status),
                    Err(error) => return error,
                }
            }
        }
    }

    /// Sends SIGTERM to every running node, waits up to [`STOP_TIMEOUT`] for all of them, and
    /// kills those still running.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if node.poll_exit()?.is_some() {
                continue;
            }
            // SAFETY: kill(2) has no memory-safety preconditions. The pid is our unreaped child
            // (`exited` is None), so it cannot have been reused by another process.
            let sent = unsafe { libc::kill(node.pid, libc::SIGTERM) };
            if sent != 0 {
                let error = std::io::Error::last_os_error();
                tracing::warn!(node = node.spec.id, %error, "cannot send SIGTERM");
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut unclean = Vec::new();
        for node in &mut self.nodes {
            if node.exited.is_some() {
                continue;
            }
            let status = match tokio::time::timeout_at(deadline, node.child.wait()).await {
                Ok(status) => {
                    status.with_context(|| format!("cannot wait for node {}", node.spec.id))?
                }
                Err(_elapsed) => {
                    tracing::warn!(
                        node = node.spec.id,
                        "node did not stop within {STOP_TIMEOUT:?}; killing it"
                    );
                    node.child
                        .kill()
                        .await
                        .with_context(|| format!("cannot kill node {}", node.spec.id))?;
                    node.child
                        .wait()
                        .await
                        .with_context(|| format!("cannot wait for node {}", node.spec.id))?
                }
            };
            node.exited = Some(status);
            if !status.success() {
                unclean.push(format!("node {} ({status})", node.spec.id));
            }
        }
        if !unclean.is_empty() {
            tracing::warn!(nodes = %unclean.join(", "), "nodes did not stop cleanly; see their logs");
        }
        Ok(())
    }
}

/// Starts one node. Its environment has no `ORDO_*` variable: a dev node is configured by its
/// flags alone, and a variable meant for the CLI (ORDO_ENDPOINTS) or another node must not leak
/// into its configuration.
fn spawn_node(
    exe: &Path,
    spec: NodeSpec,
    initial_cluster: &str,
    append_log: bool,
) -> anyhow::Result<Node> {
    std::fs::create_dir_all(&spec.data_dir)
        .with_context(|| format!("cannot create {}", spec.data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append_log)
        .truncate(!append_log)
        .open(&spec.log)
        .with_context(|| format!("cannot create {}", spec.log.display()))?;
    let log_for_stderr = log
        .try_clone()
        .with_context(|| format!("cannot open {} twice", spec.log.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .arg("--node-id")
        .arg(spec.id.to_string())
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--listen")
        .arg(&spec.listen)
        .arg("--metrics-listen")
        .arg(&spec.metrics)
        .arg("--initial-cluster")
        .arg(initial_cluster)
        .arg("--worker-threads")
        .arg(spec.worker_threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .kill_on_drop(true)
        // Its own process group: Ctrl-C in the terminal reaches only us, and we stop the nodes
        // in order instead of all of them racing to exit.
        .process_group(0);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ORDO_") {
            command.env_remove(name);
        }
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            // If this process dies without stopping the node (SIGKILL), the node gets SIGTERM
            // instead of running on as an orphan holding its ports.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start node {} ({})", spec.id, exe.display()))?;
    let pid = child
        .id()
        .and_then(|pid| libc::pid_t::try_from(pid).ok())
        .with_context(|| format!("node {} has no pid", spec.id))?;
    tracing::debug!(node = spec.id, pid, listen = %spec.listen, "node started");
    Ok(Node {
        spec,
        child,
        pid,
        exited: None,
    })
}

/// The last [`LOG_TAIL_LINES`] lines of the log at `path`, read from at most its last
/// [`LOG_TAIL_BYTES`] bytes.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(cannot read the log: {error})"),
    }
}

/// Runs `ordo dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let layout = Layout::new(
        args.data_dir,
        args.base_port,
        args.metrics_base_port,
        args.nodes,
    )?;
    if args.clean {
        layout.clean()?;
    }
    // Installed before any child starts, so Ctrl-C during start-up still stops the children.
    let mut signals = Signals::new()?;
    let mut cluster = DevCluster::spawn(&layout).await?;
    let outcome = tokio::select! {
        result = async {
            cluster.wait_ready(READY_TIMEOUT).await?;
            print_banner(&layout)?;
            Err::<(), _>(cluster.watch().await)
        } => result,
        name = signals.recv() => {
            eprintln!("{name}: stopping the cluster");
            Ok(())
        }
    };
    let stopped = cluster.stop().await.context("cannot stop the cluster");
    outcome?;
    stopped?;
    eprintln!(
        "cluster stopped; data kept in {}",
        layout.data_dir.display()
    );
    Ok(())
}

fn print_banner(layout: &Layout) -> anyhow::Result<()> {
    let mut text = format!("Ordo dev cluster is up: {} nodes\n", layout.nodes);
    let mut table = output::table(["node", "grpc", "metrics", "log"]);
    for spec in layout.specs() {
        table.add_row(vec![
            spec.id.to_string(),
            spec.listen.clone(),
            format!("http://{}/metrics", spec.metrics),
            spec.log.display().to_string(),
        ]);
    }
    text.push_str(&table.to_string());
    let endpoints = layout.endpoints().join(",");
    let replication_factor = layout.nodes.min(3);
    text.push_str(&format!(
        "\ndata dir: {}\nendpoints: {endpoints}\n",
        layout.data_dir.display()
    ));
    if endpoints != crate::DEFAULT_ENDPOINTS {
        text.push_str(&format!(
            "(not the CLI's default: export ORDO_ENDPOINTS={endpoints})\n"
        ));
    }
    text.push_str(&format!(
        "\nTry, in another terminal:\n  \
         ordo topic create demo --partitions 3 --replication-factor {replication_factor}\n  \
         ordo produce demo hello world\n  \
         seq 1 1000 | ordo produce demo\n  \
         ordo consume demo --from-beginning\n  \
         ordo consume demo --from-end --follow\n  \
         ordo cluster status\n\
         Press Ctrl-C to stop the cluster."
    ));
    output::print_line(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node i listens on base + i - 1 and serves metrics on metrics base + i.
    #[test]
    fn layout_ports_and_paths() {
        let layout = Layout::new(PathBuf::from("/d"), 7001, 9100, 3).expect("valid layout");
        assert_eq!(
            layout.endpoints(),
            vec!["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );
        assert_eq!(
            layout.initial_cluster(),
            "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
        );
        let specs = layout.specs();
        assert_eq!(specs[2].metrics, "127.0.0.1:9103");
        assert_eq!(specs[0].data_dir, PathBuf::from("/d/node-1"));
        assert_eq!(specs[0].log, PathBuf::from("/d/node-1.log"));
    }

    /// Layouts that overflow the port range or have no node are rejected.
    #[test]
    fn layout_limits() {
        assert!(Layout::new(PathBuf::from("/d"), 65535, 9100, 2).is_err());
        assert!(Layout::new(PathBuf::from("/d"), 7001, 65535, 1).is_err());
        assert!(Layout::new(PathBuf::from("/d"), 7001, 9100, 0).is_err());
        assert!(Layout::new(PathBuf::from("/d"), 65535, 9100, 1).is_ok());
    }

    /// Only `node-<digits>` names are ours to delete.
    #[test]
    fn node_dir_names() {
        assert!(is_node_dir_name("node-1"));
        assert!(is_node_dir_name("node-12"));
        assert!(!is_node_dir_name("node-"));
        assert!(!is_node_dir_name("node-1a"));
        assert!(!is_node_dir_name("notes"));
    }
}
