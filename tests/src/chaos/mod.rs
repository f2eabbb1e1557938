//! Fault injection against real processes, Jepsen style (issue 5).
//!
//! A run starts N `ordo serve` processes, each in its own network namespace wired to a bridge
//! in a namespace of the run's own (`net.rs`), with one node's data dir on a 192 MiB tmpfs
//! (`nodes.rs`). Producers and consumers (`workload.rs`) run against random nodes while the
//! nemesis (`nemesis.rs`) kills, pauses, partitions, drops packets, restarts everything, fills
//! the small disk and restarts the metadata leader, one fault at a time, chosen by the seed.
//! Then everything is healed, every replica of every partition is read, and the checker
//! (`checker.rs`) judges the history (`history.rs`, JSON lines) alone.
//!
//! Everything a run makes (namespaces `ordo-chaos-<pid>-*`, the veth `ochaos<pid>`, the tmpfs,
//! the processes, the temp dir) is removed when it ends, also on error or panic; the temp dir
//! with the history and node logs is kept when the run fails. A run also removes what killed
//! runs left behind.

pub mod checker;
mod cleanup;
pub mod history;
mod nemesis;
pub mod net;
mod nodes;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ordo_proto::v1::{ClusterStatusRequest, CreateTopicRequest, DescribeTopicRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tonic::Code;

use self::checker::Report;
use self::history::{Event, History, Phase, Read};
use self::nemesis::Nemesis;
use self::net::Net;
use self::nodes::Nodes;
use crate::{Source, read_partition, with_timeout};

/// The topic every run writes.
const TOPIC: &str = "chaos";
/// Replication factor of the topic.
const REPLICATION_FACTOR: u32 = 3;
/// How long a cluster may take to be ready (at start and after healing).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long producers may take to finish their last call after the faults end.
const PRODUCERS_STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// Consumers of the run's queue.
const QUEUE_CONSUMERS: usize = 2;
/// Members of the run's consumer group.
const GROUP_MEMBERS: usize = 3;
/// How long consumers may take to reach the end after healing.
const CONSUMERS_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one replica may take to serve its copy up to the partition's end after healing.
const REPLICA_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds of reading every replica until all have the same length.
const CONVERGE_ROUNDS: usize = 5;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub seed: u64,
    /// 3 or 5.
    pub nodes: usize,
    /// How long faults are injected.
    pub duration: Duration,
    pub producers: usize,
    /// Parent of the run's temp dir (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Keep the temp dir even when the run passes.
    pub keep: bool,
    /// The `ordo` binary.
    pub binary: PathBuf,
    /// Do not restart a node after its disk was full (see `nemesis.rs`): the run then shows
    /// whether the node recovers by itself.
    pub disk_strict: bool,
    /// The kinds of fault to inject (see [`fault_kinds`]); all by default.
    pub faults: Vec<&'static str>,
    /// Idempotent producers (default): the checker then fails the run on any duplicate.
    /// False runs the producers without producer sequences, duplicates counted and allowed.
    pub idempotent: bool,
}

impl ChaosConfig {
    pub fn new(seed: u64, nodes: usize, duration: Duration) -> Result<Self> {
        if nodes != 3 && nodes != 5 {
            bail!("a chaos run has 3 or 5 nodes, not {nodes}");
        }
        Ok(Self {
            seed,
            nodes,
            duration,
            producers: 4,
            work_dir: None,
            keep: false,
            binary: binary()?,
            disk_strict: false,
            faults: nemesis::FAULTS.iter().map(|(kind, _)| *kind).collect(),
            idempotent: true,
        })
    }

    fn partitions(&self) -> u32 {
        self.nodes as u32
    }
}

/// The `ordo` binary: `ORDO_BIN`, else next to this executable (`ordo-chaos` lives in
/// `target/debug/` beside `ordo`), else where [`crate::ordo_binary`] finds it for a test binary.
fn binary() -> Result<PathBuf> {
    if std::env::var_os("ORDO_BIN").is_none()
        && let Ok(exe) = std::env::current_exe()
        && let Some(beside) = exe.parent().map(|dir| dir.join("ordo"))
        && beside.is_file()
    {
        return Ok(beside);
    }
    crate::ordo_binary()
}

/// Every kind of fault the nemesis knows.
pub fn fault_kinds() -> Vec<&'static str> {
    nemesis::FAULTS.iter().map(|(kind, _)| *kind).collect()
}

/// Parses a fault selection: a comma-separated list of kinds to inject (`kill,pause`), or of
/// kinds to leave out, each with a leading `-` (`-disk-full,-packet-loss`).
pub fn parse_faults(spec: &str) -> Result<Vec<&'static str>> {
    let all = fault_kinds();
    let items: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let find = |name: &str| {
        all.iter()
            .copied()
            .find(|kind| *kind == name)
            .ok_or_else(|| anyhow!("unknown fault {name:?}; the faults are {}", all.join(", ")))
    };
    let chosen = if items.iter().all(|item| item.starts_with('-')) {
        let excluded = items
            .iter()
            .map(|item| find(&item[1..]))
            .collect::<Result<Vec<_>>>()?;
        all.iter()
            .copied()
            .filter(|kind| !excluded.contains(kind))
            .collect()
    } else {
        items
            .iter()
            .map(|item| find(item))
            .collect::<Result<Vec<_>>>()?
    };
    if chosen.is_empty() {
        bail!("the fault selection {spec:?} leaves no fault");
    }
    Ok(chosen)
}

/// What a run produced.
pub struct Outcome {
    pub report: Report,
    pub history: PathBuf,
    /// The run's dir, if kept.
    pub kept: Option<PathBuf>,
}

impl Outcome {
    /// Prints the report, and where the history is when the run's dir was kept.
    pub fn print(&self) {
        println!("{}", self.report.render());
        if let Some(dir) = &self.kept {
            println!(
                "history: {} (run dir {} kept)",
                self.history.display(),
                dir.display()
            );
        }
    }
}

/// The run's temp dir: removed at the end unless the run failed (or a panic unwinds through it,
/// or `keep` was asked), in which case its path is printed.
struct RunDir {
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

impl RunDir {
    fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    fn keep(&mut self) -> PathBuf {
        self.keep = true;
        self.path().to_owned()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if self.keep || std::thread::panicking() || INTERRUPTED.load(Ordering::Relaxed) {
                let path = dir.keep();
                eprintln!(
                    "ordo-chaos: kept the run's dir (history, node logs): {}",
                    path.display()
                );
            }
        }
    }
}

/// Aborts the workload's tasks if the run ends early, so they release the nodes.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<u64>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs a whole chaos run and checks its history. An `Err` means the harness could not run
/// (no root, cluster never ready); broken promises are in the report.
pub async fn run(config: ChaosConfig) -> Result<Outcome> {
    net::preflight()?;
    net::cleanup_stale();
    println!(
        "ordo-chaos: seed {} ({} nodes, faults for {:?}); replay with --seed {} / ORDO_TEST_SEED={}",
        config.seed, config.nodes, config.duration, config.seed, config.seed
    );
    let mut builder = tempfile::Builder::new();
    builder.prefix("ordo-chaos-");
    let dir = match &config.work_dir {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .context("create the run's temp dir")?;
    let mut run_dir = RunDir {
        dir: Some(dir),
        keep: config.keep,
    };
    let history_path = run_dir.path().join("history.jsonl");
    let history = Arc::new(History::create(&history_path)?);
    println!("ordo-chaos: history {}", history_path.display());

    let result = {
        let net = Net::create(config.nodes).context("create the network namespaces")?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let small_disk = rng.random_range(0..config.nodes);
        // A private copy of the binary: a build during the run must not give restarted nodes
        // another version than the rest.
        let binary = run_dir.path().join("ordo");
        std::fs::copy(&config.binary, &binary)
            .with_context(|| format!("copy {}", config.binary.display()))?;
        let nodes = Arc::new(Nodes::start(
            &binary,
            &net,
            run_dir.path(),
            config.nodes,
            Some(small_disk),
        )?);
        let mut tasks = Tasks::default();
        let result = drive(&config, &net, &nodes, &history, small_disk, &mut tasks).await;
        for task in &tasks.0 {
            task.abort();
        }
        for task in std::mem::take(&mut tasks.0) {
            // A handle already awaited to completion must not be polled again.
            if !task.is_finished() {
                let _ = task.await;
            }
        }
        if let Err(error) = &result {
            eprintln!("ordo-chaos: the run failed: {error:#}");
            for index in 0..nodes.len() {
                eprintln!("{}", nodes.log_tail(index, 3000));
            }
        }
        // Processes and mounts go first, then the namespaces.
        drop(nodes);
        drop(net);
        let _ = std::fs::remove_file(&binary);
        result
    };
    history.flush()?;
    if let Err(error) = result {
        run_dir.keep();
        return Err(error);
    }
    let lines = history::read_history(&history_path)?;
    let report = checker::check(&lines);
    let kept = if report.passed() && !config.keep {
        None
    } else {
        Some(run_dir.keep())
    };
    Ok(Outcome {
        report,
        history: history_path,
        kept,
    })
}

async fn drive(
    config: &ChaosConfig,
    net: &Net,
    nodes: &Arc<Nodes>,
    history: &Arc<History>,
    small_disk: usize,
    tasks: &mut Tasks,
) -> Result<()> {
    let partitions = config.partitions();
    history.log(Event::Start {
        seed: config.seed,
        nodes: config.nodes,
        topic: TOPIC.to_owned(),
        partitions,
        replication_factor: REPLICATION_FACTOR,
        idempotent: config.idempotent,
    });
    // `ip netns exec` must exec the server, so that signals reach the pid the harness holds.
    for index in 0..nodes.len() {
        let pid = nodes
            .pid(index)
            .ok_or_else(|| anyhow!("node not started"))?;
        let mut exe = PathBuf::new();
        for _ in 0..50 {
            exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if exe.ends_with("ordo") {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        if !exe.ends_with("ordo") {
            bail!("node pid {pid} runs {}, not the ordo binary", exe.display());
        }
    }
    wait_ready(nodes)
        .await
        .context("cluster not ready at start")?;
    create_topic(nodes, partitions).await?;
    cleanup::create_topics(nodes, partitions).await?;
    println!(
        "ordo-chaos: cluster ready, topic {TOPIC} ({partitions} partitions, rf {REPLICATION_FACTOR}); node {} has the 192 MiB disk",
        small_disk + 1
    );

    let stream_clients =
        workload::stream_clients(nodes, config.idempotent, config.producers).await?;
    let shared = Arc::new(workload::Shared {
        stream_clients,
        idempotent: config.idempotent,
        partitions,
        nodes: Arc::clone(nodes),
        history: Arc::clone(history),
        topic: TOPIC.to_owned(),
        stop_producing: AtomicBool::new(false),
        targets: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
        targets_set: AtomicBool::new(false),
        stop_consuming: AtomicBool::new(false),
    });
    history.log(Event::Workload {
        phase: Phase::Start,
    });
    let mut producers = Vec::new();
    for process in 0..config.producers {
        let seed = config.seed.wrapping_add(1 + process as u64);
        producers.push(tasks.0.len());
        tasks.0.push(tokio::spawn(workload::producer(
            Arc::clone(&shared),
            process,
            seed,
        )));
    }
    // The side topics' producer (retention and compaction under faults).
    producers.push(tasks.0.len());
    tasks.0.push(tokio::spawn(cleanup::producer(
        Arc::clone(&shared),
        config.seed.wrapping_add(5000),
    )));
    let mut consumers = Vec::new();
    for partition in 0..partitions {
        let process = 1000 + partition as usize;
        let seed = config.seed.wrapping_add(1000 + partition as u64);
        consumers.push(tasks.0.len());
        tasks.0.push(tokio::spawn(workload::consumer(
            Arc::clone(&shared),
            process,
            partition,
            seed,
        )));
    }

    // A consumer group of three members over the topic, and an observer of its commits.
    let group_client = workload::group_client(nodes).await?;
    let mut group_tasks = Vec::new();
    for member in 0..GROUP_MEMBERS {
        group_tasks.push(tasks.0.len());
        tasks.0.push(tokio::spawn(workload::group_member(
            Arc::clone(&shared),
            member,
            group_client.clone(),
        )));
    }
    group_tasks.push(tasks.0.len());
    tasks.0.push(tokio::spawn(workload::group_observer(
        Arc::clone(&shared),
        group_client.clone(),
    )));
    // A queue over the topic and its consumers, each message acked one by one.
    workload::create_queue(&group_client, TOPIC, Duration::from_secs(60)).await?;
    for consumer in 0..QUEUE_CONSUMERS {
        group_tasks.push(tasks.0.len());
        tasks.0.push(tokio::spawn(workload::queue_consumer(
            Arc::clone(&shared),
            consumer,
            group_client.clone(),
        )));
    }

    let mut nemesis = Nemesis::new(
        Arc::clone(nodes),
        net,
        Arc::clone(history),
        TOPIC.to_owned(),
        partitions,
        Some(small_disk),
        config.seed.wrapping_add(7),
    );
    nemesis.disk_strict = config.disk_strict;
    nemesis.faults = nemesis::FAULTS
        .iter()
        .filter(|(kind, _)| config.faults.contains(kind))
        .copied()
        .collect();
    let started = Instant::now();
    let faults = nemesis.run(started + config.duration).await;
    let healed = nemesis.heal_all().await;
    faults.context("nemesis")?;
    healed.context("heal")?;
    println!(
        "ordo-chaos: faults over after {:.0?}; healing",
        started.elapsed()
    );

    shared.stop_producing.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + PRODUCERS_STOP_TIMEOUT;
    for &task in &producers {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match timeout(remaining, &mut tasks.0[task]).await {
            Ok(joined) => {
                joined.context("a producer panicked")?;
            }
            Err(_) => history.log(Event::Nemesis {
                kind: String::from("stuck"),
                phase: Phase::Note,
                nodes: Vec::new(),
                detail: format!(
                    "a producer did not finish within {PRODUCERS_STOP_TIMEOUT:?} of the end"
                ),
            }),
        }
    }
    history.log(Event::Workload { phase: Phase::End });
    nemesis.restart_crashed()?;
    if let Err(error) = wait_ready(nodes).await {
        stuck(
            history,
            format!("cluster not ready after healing: {error:#}"),
        );
    }

    // Final reads: each partition's end as its leader serves it, then every replica.
    for partition in 0..partitions {
        let replicas = replicas_of(nodes, partition).await?;
        let end = final_end(nodes, partition).await;
        shared.targets[partition as usize].store(end, Ordering::Relaxed);
        read_replicas(nodes, history, partition, &replicas, end).await;
    }
    cleanup::read_final(nodes, history, partitions).await;
    shared.targets_set.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + CONSUMERS_TIMEOUT;
    for (partition, &task) in consumers.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let target = shared.targets[partition].load(Ordering::Relaxed);
        match timeout(remaining, &mut tasks.0[task]).await {
            Ok(joined) => {
                let next = joined.context("a consumer panicked")?;
                if next < target {
                    stuck(
                        history,
                        format!("consumer of partition {partition} stopped at {next} < {target}"),
                    );
                }
            }
            Err(_) => {
                shared.stop_consuming.store(true, Ordering::Relaxed);
                stuck(
                    history,
                    format!(
                        "consumer of partition {partition} did not reach offset {target} within {CONSUMERS_TIMEOUT:?} after healing"
                    ),
                );
            }
        }
    }
    // The group catches up too: its committed offsets reach every partition's end.
    let deadline = Instant::now() + CONSUMERS_TIMEOUT;
    loop {
        let committed = workload::group_offsets(&shared, &group_client, false).await;
        let caught_up = committed.is_some_and(|offsets| {
            (0..partitions).all(|partition| {
                let target = shared.targets[partition as usize].load(Ordering::Relaxed);
                target == 0 || offsets.contains(&(partition, target))
            })
        });
        if caught_up {
            workload::group_offsets(&shared, &group_client, true).await;
            break;
        }
        if Instant::now() > deadline {
            stuck(
                history,
                format!(
                    "the consumer group did not commit every partition's end within {CONSUMERS_TIMEOUT:?} after healing"
                ),
            );
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    // The queue drains too: every partition's floor reaches its end; then what was
    // dead-lettered.
    let deadline = Instant::now() + CONSUMERS_TIMEOUT;
    let ends: Vec<(u32, u64)> = (0..partitions)
        .map(|partition| {
            (
                partition,
                shared.targets[partition as usize].load(Ordering::Relaxed),
            )
        })
        .collect();
    loop {
        let floors = workload::queue_floors(&group_client).await;
        let drained = floors.as_ref().is_some_and(|floors| {
            ends.iter().all(|(partition, end)| {
                floors
                    .iter()
                    .any(|(number, floor)| number == partition && floor >= end)
            })
        });
        if drained || Instant::now() > deadline {
            let dead_letters = match workload::dead_letters(&group_client).await {
                Ok(dead_letters) => dead_letters,
                Err(error) => {
                    stuck(
                        history,
                        format!("cannot read the dead-letter topic: {error:#}"),
                    );
                    Vec::new()
                }
            };
            history.log(Event::QueueFinal {
                floors: floors.unwrap_or_default(),
                ends: ends.clone(),
                dead_letters,
            });
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    shared.stop_consuming.store(true, Ordering::Relaxed);
    for &task in &group_tasks {
        let _ = timeout(Duration::from_secs(10), &mut tasks.0[task]).await;
    }
    nemesis.restart_crashed()?;
    let snapshots: usize = (0..nodes.len())
        .map(|index| nodes.log_count_since(index, 0, "partition snapshot installed"))
        .sum();
    history.log(Event::Nemesis {
        kind: String::from("snapshots"),
        phase: Phase::Note,
        nodes: Vec::new(),
        detail: snapshots.to_string(),
    });
    for index in 0..nodes.len() {
        let panics = nodes.log_count_since(index, 0, "panicked at");
        if panics > 0 {
            let first = nodes
                .log_first_match(index, "panicked at")
                .unwrap_or_default();
            history.log(Event::Nemesis {
                kind: String::from("panic"),
                phase: Phase::Note,
                nodes: vec![index as u64 + 1],
                detail: format!("{panics} panics in the node's log; the first: {first}"),
            });
        }
    }
    Ok(())
}

/// [`run`], ended early (and everything it made removed) on SIGINT or SIGTERM, e.g. a test
/// runner's timeout.
pub async fn run_until_signal(config: ChaosConfig) -> Result<Outcome> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let running = run(config);
    tokio::pin!(running);
    let signal = tokio::select! {
        outcome = &mut running => return outcome,
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    // Dropping the run removes everything it made; its dir (history, logs) is kept.
    INTERRUPTED.store(true, Ordering::Relaxed);
    drop(running);
    bail!("interrupted by {signal}; cleaned up")
}

/// Set when a run was interrupted by a signal: its dir is kept for a look at the history.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Logs a liveness failure (the checker reports it as a violation).
fn stuck(history: &History, detail: String) {
    eprintln!("ordo-chaos: STUCK: {detail}");
    history.log(Event::Nemesis {
        kind: String::from("stuck"),
        phase: Phase::Note,
        nodes: Vec::new(),
        detail,
    });
}

/// Waits until every node answers ClusterStatus with a metadata leader.
async fn wait_ready(nodes: &Nodes) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for index in 0..nodes.len() {
        let mut admin = nodes.admin_client(index);
        loop {
            let answer = timeout(
                Duration::from_secs(3),
                admin.cluster_status(with_timeout(
                    ClusterStatusRequest {},
                    Duration::from_secs(2),
                )),
            )
            .await;
            let last = match answer {
                Ok(Ok(response)) if response.get_ref().metadata_leader.is_some() => break,
                Ok(Ok(_)) => String::from("no metadata leader"),
                Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                Err(_) => String::from("no answer"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "node {} not ready within {READY_TIMEOUT:?}: {last}\n{}",
                    index + 1,
                    nodes.log_tail(index, 3000)
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Creates topic `name` (replication factor [`REPLICATION_FACTOR`]) through node 1, retrying
/// while the cluster settles.
async fn create_named_topic(
    nodes: &Nodes,
    name: &str,
    partitions: u32,
    config: Option<ordo_proto::v1::TopicConfig>,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor: REPLICATION_FACTOR,
            config: config.clone(),
        };
        let answer = nodes
            .admin_client(0)
            .create_topic(with_timeout(request, Duration::from_secs(10)))
            .await;
        match answer {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(()),
            Err(status) if Instant::now() < deadline => {
                eprintln!("ordo-chaos: create topic {name}: {status}; retrying");
                sleep(Duration::from_millis(500)).await;
            }
            Err(status) => bail!("create topic {name}: {status}"),
        }
    }
}

async fn create_topic(nodes: &Nodes, partitions: u32) -> Result<()> {
    create_named_topic(nodes, TOPIC, partitions, None).await?;
    // Every partition has a leader before the workload starts.
    for partition in 0..partitions {
        leader_of(nodes, partition).await?;
    }
    Ok(())
}

/// DescribeTopic through any node until it names a leader for the partition.
async fn describe_partition(
    nodes: &Nodes,
    partition: u32,
) -> Result<ordo_proto::v1::PartitionDescription> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    loop {
        for index in 0..nodes.len() {
            let request = DescribeTopicRequest {
                name: TOPIC.to_owned(),
            };
            let answer = nodes
                .admin_client(index)
                .describe_topic(with_timeout(request, Duration::from_secs(3)))
                .await;
            match answer {
                Ok(response) => {
                    let found = response
                        .into_inner()
                        .topic
                        .and_then(|t| t.partitions.into_iter().find(|p| p.partition == partition));
                    match found {
                        Some(description) if description.leader.is_some() => {
                            return Ok(description);
                        }
                        other => last = format!("node {} describes {other:?}", index + 1),
                    }
                }
                Err(status) => last = format!("node {}: {status}", index + 1),
            }
        }
        if Instant::now() >= deadline {
            bail!("partition {partition} has no leader within {READY_TIMEOUT:?}: {last}");
        }
        sleep(Duration::from_millis(300)).await;
    }
}

async fn leader_of(nodes: &Nodes, partition: u32) -> Result<u64> {
    Ok(describe_partition(nodes, partition)
        .await?
        .leader
        .expect("describe_partition waits for a leader"))
}

async fn replicas_of(nodes: &Nodes, partition: u32) -> Result<Vec<u64>> {
    Ok(describe_partition(nodes, partition).await?.replicas)
}

/// The partition's end as its leader serves it to a consumer (0 if it cannot be read).
async fn final_end(nodes: &Nodes, partition: u32) -> u64 {
    for _ in 0..3 {
        let Ok(leader) = leader_of(nodes, partition).await else {
            continue;
        };
        let Some(index) = nodes.index_of(leader) else {
            continue;
        };
        let mut client = nodes.log_client(index);
        if let Ok(records) =
            read_partition(&mut client, TOPIC, partition, 0, Source::AnyReplica).await
        {
            return records.len() as u64;
        }
    }
    0
}

/// Reads every replica's own copy until all have the same length (at least `end`), and logs the
/// copies (or the failure) to the history.
async fn read_replicas(
    nodes: &Nodes,
    history: &History,
    partition: u32,
    replicas: &[u64],
    end: u64,
) {
    let mut end = end;
    let mut copies: Vec<(u64, std::result::Result<Vec<Read>, String>)> = Vec::new();
    for _round in 0..CONVERGE_ROUNDS {
        copies.clear();
        for &node in replicas {
            let Some(index) = nodes.index_of(node) else {
                copies.push((node, Err(format!("node {node} is not in the cluster"))));
                continue;
            };
            let mut client = nodes.log_client(index);
            let read = timeout(
                REPLICA_READ_TIMEOUT,
                read_partition(&mut client, TOPIC, partition, end, Source::ThisReplica),
            )
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "its replica did not reach offset {end} within {REPLICA_READ_TIMEOUT:?}"
                ))
            })
            .map(|records| {
                records
                    .into_iter()
                    .map(|record| Read {
                        offset: record.offset,
                        key: record.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                        value: String::from_utf8_lossy(&record.value).into_owned(),
                    })
                    .collect::<Vec<_>>()
            })
            .map_err(|error| format!("{error:#}"));
            copies.push((node, read));
        }
        let lengths: Vec<usize> = copies
            .iter()
            .filter_map(|(_, read)| read.as_ref().ok().map(Vec::len))
            .collect();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        // A replica that cannot be read in full is reported as it is; one shorter than the
        // others gets another round.
        if lengths.len() < copies.len() || lengths.iter().all(|l| *l == longest) {
            break;
        }
        end = end.max(longest as u64);
    }
    for (node, read) in copies {
        match read {
            Ok(records) => history.log(Event::Replica {
                node,
                partition,
                records,
            }),
            Err(error) => history.log(Event::ReplicaFail {
                node,
                partition,
                error,
            }),
        }
    }
}
