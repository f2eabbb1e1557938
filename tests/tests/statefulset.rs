//! The StatefulSet of `deploy/`, simulated with real processes: each pod runs in its own network
//! namespace (the fault suite's `Net`), its name `ordo-N.ordo-headless` resolving to the pod's
//! address through the namespace's own hosts file, and is started exactly as the StatefulSet
//! starts it: `ordo serve --config ordo.toml --node-id-from-hostname --advertise
//! $(POD_NAME).ordo-headless:7000` with `deploy/kustomize/base/ordo.toml` (its data dir given
//! by flag). Under a produce load: three pods start at once and form one cluster; it scales to
//! five (the new pods join, a rebalance gives them replicas) and back to three (highest
//! ordinals drained first); a rolling restart in reverse ordinal order; a pod comes back with
//! an empty volume. Every acked record is read back, none twice; no produce call fails.
//!
//! Needs root (namespaces); skipped with a message otherwise.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::Result;
use anyhow::bail;
use anyhow::ensure;
use ordo_client::ClusterStatus;
use ordo_tests::chaos::net::Net;
use ordo_tests::load::produce_until;
use ordo_tests::load::wait_status;
use tokio::time::sleep;

const TOPIC: &str = "sts";
const PARTITIONS: u32 = 6;
/// Pods the namespaces are made for (the scale-up's five).
const PODS: usize = 5;
const GRPC_PORT: u16 = 7000;

/// The pods: processes in their namespaces, with their volumes and logs.
struct StatefulSet {
    binary: PathBuf,
    config: PathBuf,
    net: Net,
    root: tempfile::TempDir,
    children: Vec<Mutex<Option<Child>>>,
    /// `/etc/netns/<ns>` directories made for the hosts files.
    etc: Vec<PathBuf>,
}

impl StatefulSet {
    fn new() -> Result<Self> {
        let net = Net::create(PODS)?;
        let root = tempfile::Builder::new().prefix("ordo-sts-").tempdir()?;
        let hosts: String = (0..PODS)
            .map(|ordinal| format!("{} ordo-{ordinal}.ordo-headless\n", net.node_ip(ordinal)))
            .collect();
        let mut etc = Vec::new();
        for ordinal in 0..PODS {
            let dir = Path::new("/etc/netns").join(net.namespace(ordinal));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}"))?;
            etc.push(dir);
        }
        // The StatefulSet's config file, as the ConfigMap mounts it.
        let config =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/ordo.toml");
        Ok(Self {
            binary: ordo_tests::ordo_binary()?,
            config,
            net,
            root,
            children: (0..PODS).map(|_| Mutex::new(None)).collect(),
            etc,
        })
    }

    fn pod(ordinal: usize) -> String {
        format!("ordo-{ordinal}")
    }

    fn volume(&self, ordinal: usize) -> PathBuf {
        self.root.path().join(format!("data-ordo-{ordinal}"))
    }

    fn log_path(&self, ordinal: usize) -> PathBuf {
        self.root.path().join(format!("ordo-{ordinal}.log"))
    }

    fn endpoint(&self, ordinal: usize) -> String {
        format!("{}:{GRPC_PORT}", self.net.node_ip(ordinal))
    }

    /// Starts a pod as the StatefulSet does.
    fn start(&self, ordinal: usize) -> Result<()> {
        let pod = Self::pod(ordinal);
        fs::create_dir_all(self.volume(ordinal))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(ordinal))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.net.namespace(ordinal)])
            .arg(&self.binary)
            .args(["serve", "--config"])
            .arg(&self.config)
            .arg("--node-id-from-hostname")
            .arg("--advertise")
            .arg(format!("{pod}.ordo-headless:{GRPC_PORT}"))
            // The pod's volume, mounted at the config's data_dir in a real pod.
            .arg("--data-dir")
            .arg(self.volume(ordinal))
            .env("HOSTNAME", &pod)
            .env("POD_NAME", &pod)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        ordo_tests::node_process_settings(&mut command);
        let child = command.spawn().with_context(|| format!("start {pod}"))?;
        *self.children[ordinal].lock().expect("pod lock") = Some(child);
        Ok(())
    }

    /// SIGTERM, as a pod deletion, and waits for the exit.
    async fn stop(&self, ordinal: usize) -> Result<()> {
        let child = self.children[ordinal].lock().expect("pod lock").take();
        let Some(mut child) = child else {
            bail!("ordo-{ordinal} is not running");
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "ordo-{ordinal} exited with {status}");
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ordo-{ordinal} did not stop within 30 s of SIGTERM");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, ordinal: usize) -> String {
        fs::read_to_string(self.log_path(ordinal)).unwrap_or_default()
    }

    fn tails(&self) -> String {
        (0..PODS)
            .map(|ordinal| {
                let log = self.log(ordinal);
                let tail = &log[log.len().saturating_sub(3000)..];
                format!("----- ordo-{ordinal} -----\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the pod's `ordo.ready` health is SERVING (its readiness probe).
    async fn wait_ready(&self, ordinal: usize) -> Result<Duration> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let started = Instant::now();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.endpoint(ordinal)))?
                .connect_lazy();
        loop {
            let request = ordo_tests::with_timeout(
                HealthCheckRequest {
                    service: "ordo.ready".into(),
                },
                Duration::from_secs(2),
            );
            let status = HealthClient::new(channel.clone()).check(request).await;
            if matches!(&status, Ok(response) if response.get_ref().status == ServingStatus::Serving as i32)
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!(
                    "ordo-{ordinal} not ready after 90 s: {status:?}\n{}",
                    self.tails()
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for StatefulSet {
    fn drop(&mut self) {
        for child in &self.children {
            if let Some(mut child) = child.lock().ok().and_then(|mut slot| slot.take()) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for dir in &self.etc {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// How long a membership change of the scenario may take.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

fn voters(status: &ClusterStatus) -> BTreeSet<u64> {
    status
        .nodes
        .iter()
        .filter(|node| node.metadata_role == "VOTER")
        .map(|node| node.node_id)
        .collect()
}

fn active(status: &ClusterStatus) -> BTreeSet<u64> {
    status
        .nodes
        .iter()
        .filter(|node| node.state == "ACTIVE")
        .map(|node| node.node_id)
        .collect()
}

#[tokio::test]
async fn a_statefulset_forms_scales_restarts_and_replaces_a_volume_under_load() {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the StatefulSet simulation makes network namespaces (run as root)");
        return;
    }
    let sts = StatefulSet::new().expect("the simulated StatefulSet");
    let result = run(&sts).await;
    if let Err(error) = result {
        panic!("{error:?}\n{}", sts.tails());
    }
}

async fn run(sts: &StatefulSet) -> Result<()> {
    // Parallel start (podManagementPolicy: Parallel); ordo-0 forms the cluster, once.
    for ordinal in 0..3 {
        sts.start(ordinal)?;
    }
    for ordinal in 0..3 {
        let ready = sts.wait_ready(ordinal).await?;
        eprintln!("ordo-{ordinal} ready after {ready:?}");
    }
    let formed: usize = (0..3)
        .map(|ordinal| {
            sts.log(ordinal)
                .matches("initializing metadata group")
                .count()
        })
        .sum();
    ensure!(
        formed == 1 && sts.log(0).contains("initializing metadata group"),
        "ordo-0 alone formed the cluster, once ({formed} initializations)"
    );
    let endpoints: Vec<String> = (0..3).map(|ordinal| sts.endpoint(ordinal)).collect();
    let client = ordo_client::Client::connect_with_options(
        endpoints,
        ordo_client::ClientOptions {
            request_timeout: Duration::from_secs(20),
            ..ordo_client::ClientOptions::default()
        },
    )
    .await?;
    client
        .create_topic(TOPIC, PARTITIONS, 3)
        .await
        .context("create the topic")?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(produce_until(client.clone(), TOPIC, stop.clone()));
    sleep(Duration::from_secs(1)).await;

    // Scale 3 -> 5: the new pods join; a rebalance gives them replicas.
    for ordinal in 3..5 {
        sts.start(ordinal)?;
    }
    let status = wait_status(
        &client,
        "ordo-3 and ordo-4 join",
        CHANGE_TIMEOUT,
        |status| active(status) == BTreeSet::from([1, 2, 3, 4, 5]) && voters(status).len() == 5,
    )
    .await?;
    eprintln!("scaled to 5: voters {:?}", voters(&status));
    for ordinal in 3..5 {
        sts.wait_ready(ordinal).await?;
    }
    let moves = client.rebalance().await?;
    ensure!(!moves.is_empty(), "the new nodes get replicas");
    let status = wait_status(&client, "the rebalance", CHANGE_TIMEOUT, |status| {
        status.moves.is_empty()
    })
    .await?;
    for node in [4, 5] {
        let held = status
            .nodes
            .iter()
            .find(|view| view.node_id == node)
            .map_or(0, |view| view.replica_count);
        ensure!(
            held > 0,
            "node {node} holds replicas after the rebalance: {status:#?}"
        );
    }
    eprintln!("rebalanced: {} moves", moves.len());

    // Scale 5 -> 3: drain the highest ordinals first, then delete their pods.
    for ordinal in [4, 3] {
        let node = ordinal as u64 + 1;
        client.drain_node(node).await?;
        wait_status(&client, "a drain", CHANGE_TIMEOUT, |status| {
            status.moves.is_empty() && !status.nodes.iter().any(|view| view.node_id == node)
        })
        .await?;
        sts.stop(ordinal).await?;
        eprintln!("ordo-{ordinal} drained and stopped");
    }
    let status = wait_status(&client, "three voters again", CHANGE_TIMEOUT, |status| {
        voters(status) == BTreeSet::from([1, 2, 3])
    })
    .await?;
    ensure!(
        active(&status) == BTreeSet::from([1, 2, 3]),
        "three nodes left: {status:#?}"
    );

    // A rolling restart, highest ordinal first, each pod ready before the next.
    for ordinal in [2, 1, 0] {
        sts.stop(ordinal).await?;
        sts.start(ordinal)?;
        let ready = sts.wait_ready(ordinal).await?;
        eprintln!("ordo-{ordinal} restarted, ready after {ready:?}");
    }

    // A pod comes back with an empty volume: it finds the cluster and takes its place.
    sts.stop(1).await?;
    fs::remove_dir_all(sts.volume(1))?;
    sts.start(1)?;
    let ready = sts.wait_ready(1).await?;
    let formed: usize = (0..PODS)
        .map(|ordinal| {
            sts.log(ordinal)
                .matches("initializing metadata group")
                .count()
        })
        .sum();
    ensure!(
        formed == 1,
        "the emptied pod joined the cluster, it did not form another ({formed} initializations)"
    );
    eprintln!("ordo-1 with an empty volume ready after {ready:?}");

    sleep(Duration::from_secs(1)).await;
    let load = ordo_tests::load::finish(&stop, load).await?;
    check(&client, &load).await?;
    Ok(())
}

/// Every acked record is stored where it was acked, none twice: read through the client.
async fn check(client: &ordo_client::Client, load: &ordo_tests::load::Load) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for partition in 0..PARTITIONS {
        let end = load
            .acked
            .range((partition, 0)..(partition + 1, 0))
            .next_back()
            .map_or(0, |((_, offset), _)| offset + 1);
        let mut offset = 0;
        let mut held = std::collections::HashMap::new();
        while offset < end {
            let fetched = client
                .fetch(TOPIC, partition, offset, 1 << 20, Duration::ZERO)
                .await
                .with_context(|| format!("fetch {TOPIC}/{partition} at {offset}"))?;
            ensure!(
                !fetched.records.is_empty(),
                "{TOPIC}/{partition} ends at {offset} < {end}"
            );
            for record in fetched.records {
                let value = String::from_utf8_lossy(&record.value).into_owned();
                ensure!(seen.insert(value.clone()), "{value} is stored twice");
                offset = record.offset + 1;
                held.insert(record.offset, value);
            }
        }
        for ((_, at), value) in load.acked.range((partition, 0)..(partition + 1, 0)) {
            ensure!(
                held.get(at) == Some(value),
                "acked {value} at {partition}/{at} is not there ({:?})",
                held.get(at)
            );
        }
    }
    Ok(())
}
