//! Properties an operator relies on, checked against a 3-node cluster of real `ordo serve`
//! processes: generic gRPC tools can discover the API through server reflection, and partition
//! leaders move back to their preferred replicas after a failure.
//!
//! Each test starts its own cluster. Every loop and wait is bounded; no test asserts how long
//! something took, only what happened within a bound.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ordo_tests::{Ledger, NodeId, RPC_TIMEOUT, TestCluster, produce_acked, with_timeout};
use prost::Message;
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::Channel;

/// Every test runs three nodes: the smallest cluster that survives the loss of one.
const NODES: usize = 3;
/// Partitions of the balance test's topic: one per node, so each node prefers one partition.
const PARTITIONS: u32 = 3;
/// How long the leaders may take to return to their preferred replicas: several rounds of the
/// server's leader-balance loop (every 10 s by default).
const BALANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between DescribeTopic polls while waiting for the leaders to return.
const BALANCE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The symbol whose file the reflection test asks for.
const LOG_SERVICE: &str = "ordo.v1.Log";
/// Services every reflection version must list. `grpc.health.v1.Health` is served (see
/// `every_node_reports_serving` in cluster.rs) but is not listed: the server registers only
/// `ordo_proto::FILE_DESCRIPTOR_SET` with reflection, not the health service's descriptors.
const LISTED_SERVICES: [&str; 3] = ["ordo.v1.Log", "ordo.v1.Admin", "grpc.health.v1.Health"];

/// A generic client using either reflection version (grpcurl, Postman, grpcui) can list a
/// node's public services and fetch the file that declares `ordo.v1.Log`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_services_and_serves_descriptors() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let node = cluster.node_ids()[0];
        let answers = [
            (
                "grpc.reflection.v1.ServerReflection",
                reflect_v1(cluster.channel(node), LOG_SERVICE).await?,
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                reflect_v1alpha(cluster.channel(node), LOG_SERVICE).await?,
            ),
        ];
        for (reflection_service, reflected) in answers {
            println!("{reflection_service} lists {:?}", reflected.services);
            ensure!(
                !reflected
                    .services
                    .iter()
                    .any(|listed| listed.starts_with("ordo.internal")),
                "{reflection_service} advertises the internal service: {:?}",
                reflected.services
            );
            for service in LISTED_SERVICES.into_iter().chain([reflection_service]) {
                ensure!(
                    reflected.services.iter().any(|listed| listed == service),
                    "{reflection_service} does not list {service}: {:?}",
                    reflected.services
                );
            }
            ensure!(
                !reflected.files.is_empty(),
                "{reflection_service} returned no file for {LOG_SERVICE}"
            );
            let mut declared = false;
            for bytes in &reflected.files {
                ensure!(
                    !bytes.is_empty(),
                    "{reflection_service} returned an empty FileDescriptorProto"
                );
                let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())
                    .with_context(|| format!("decode a file from {reflection_service}"))?;
                declared |= file.package() == "ordo.v1"
                    && file.service.iter().any(|service| service.name() == "Log");
            }
            ensure!(
                declared,
                "{reflection_service}: no file returned for {LOG_SERVICE} declares it"
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// After the leader of partition 0 is killed and restarted, every partition's leader returns
/// to its preferred replica (its first replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_return_to_preferred_replicas() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let topic = "preferred";
        cluster.create_topic(topic, PARTITIONS, 3).await?;
        let leaders = cluster.leaders(topic).await?;
        let description = cluster.describe_topic(topic).await?;
        let mut preferred: Vec<NodeId> = description
            .partitions
            .iter()
            .filter_map(|partition| partition.replicas.first().copied())
            .collect();
        preferred.sort_unstable();
        // Without one preferred partition per node, the crash below might not move a preferred
        // leadership at all and the test would prove nothing.
        ensure!(
            preferred == cluster.node_ids(),
            "expected each node to be the first replica of one partition: {:?}",
            description.partitions
        );

        let victim = leaders[0];
        cluster.kill(victim)?;
        let interim = cluster.wait_for_leader_change(topic, 0, victim).await?;
        println!("killed node {victim}, leader of {topic}/0; node {interim} took over");
        cluster.restart(victim)?;
        cluster.wait_node_ready(victim).await?;

        // Partition groups are quiescent: a leader learns that a returned replica has caught up
        // only from the replication a write triggers, so every partition gets a few records.
        let survivor = cluster
            .node_ids()
            .into_iter()
            .find(|node| *node != victim)
            .expect("three nodes have two survivors");
        let mut client = cluster.log_client(survivor);
        let mut ledger = Ledger::default();
        for partition in 0..PARTITIONS {
            let prefix = format!("after-restart-p{partition}");
            produce_acked(
                &mut client,
                &mut ledger,
                topic,
                Some(partition),
                &prefix,
                10,
                10,
                false,
            )
            .await?;
        }
        wait_for_preferred_leaders(&cluster, topic).await
    }
    .await;
    cluster.finish(result);
}

/// Polls DescribeTopic until every partition of `topic` is led by its first replica, at most
/// [`BALANCE_TIMEOUT`]; fails with the leaders last observed.
async fn wait_for_preferred_leaders(cluster: &TestCluster, topic: &str) -> Result<()> {
    let deadline = Instant::now() + BALANCE_TIMEOUT;
    loop {
        let last = match cluster.describe_topic(topic).await {
            Ok(description) => {
                let observed: Vec<(u32, Option<NodeId>, Option<NodeId>)> = description
                    .partitions
                    .iter()
                    .map(|partition| {
                        (
                            partition.partition,
                            partition.leader,
                            partition.replicas.first().copied(),
                        )
                    })
                    .collect();
                let balanced = observed.len() == PARTITIONS as usize
                    && observed
                        .iter()
                        .all(|(_, leader, first)| first.is_some() && leader == first);
                if balanced {
                    println!("every partition is led by its first replica: {observed:?}");
                    return Ok(());
                }
                observed
                    .iter()
                    .map(|(partition, leader, first)| {
                        format!("partition {partition}: leader {leader:?}, first replica {first:?}")
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "leaders of {topic} did not return to their first replicas within \
                 {BALANCE_TIMEOUT:?}; last observed: {last}"
            );
        }
        sleep(BALANCE_POLL_INTERVAL).await;
    }
}

/// What one server reflection stream answered.
#[derive(Debug, Default)]
struct Reflected {
    /// Full names of the services listed.
    services: Vec<String>,
    /// Encoded `FileDescriptorProto`s returned for the symbol asked about.
    files: Vec<Vec<u8>>,
}

/// Defines `$function(channel, symbol)`, which opens one `ServerReflectionInfo` stream of the
/// reflection protocol version `$version` (`v1` or `v1alpha`: identical messages, but distinct
/// generated types), asks it to list services and for the file declaring `symbol`, and returns
/// both answers. The whole exchange is bounded by [`RPC_TIMEOUT`].
macro_rules! reflect_with {
    ($function:ident, $version:ident) => {
        async fn $function(channel: Channel, symbol: &str) -> Result<Reflected> {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            let version = stringify!($version);
            let requests = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol(symbol.to_owned()),
            ]
            .map(|message| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message),
            });
            let expected = requests.len();
            let exchange = async move {
                let mut client = ServerReflectionClient::new(channel);
                let stream = futures::stream::iter(requests);
                let mut answers = client
                    .server_reflection_info(with_timeout(stream, RPC_TIMEOUT))
                    .await
                    .with_context(|| format!("open a {version} ServerReflectionInfo stream"))?
                    .into_inner();
                let mut reflected = Reflected::default();
                // The server answers each request in order and ends its stream after ours.
                for _ in 0..expected {
                    let answer = answers
                        .message()
                        .await
                        .with_context(|| format!("read a {version} reflection answer"))?
                        .with_context(|| format!("{version} reflection stream ended early"))?;
                    match answer.message_response {
                        Some(MessageResponse::ListServicesResponse(list)) => {
                            reflected.services = list
                                .service
                                .into_iter()
                                .map(|service| service.name)
                                .collect();
                        }
                        Some(MessageResponse::FileDescriptorResponse(files)) => {
                            reflected.files = files.file_descriptor_proto;
                        }
                        Some(MessageResponse::ErrorResponse(error)) => bail!(
                            "{version} reflection answered error {}: {}",
                            error.error_code,
                            error.error_message
                        ),
                        other => bail!("{version} reflection answered {other:?}"),
                    }
                }
                anyhow::Ok(reflected)
            };
            timeout(RPC_TIMEOUT, exchange).await.with_context(|| {
                format!("{version} reflection did not answer within {RPC_TIMEOUT:?}")
            })?
        }
    };
}

reflect_with!(reflect_v1, v1);
reflect_with!(reflect_v1alpha, v1alpha);

/// A base port `p` such that `p..p+3` (gRPC) and `p+100..p+104` (metrics) are free now.
fn free_port_block() -> Result<u16> {
    let start = 20_000 + (std::process::id() % 500) as u16 * 40;
    for base in (start..60_000).step_by(7) {
        let ports = (base..base + 3).chain(base + 100..base + 104);
        let bound: Vec<_> = ports
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
            .collect();
        if bound.iter().all(std::result::Result::is_ok) {
            return Ok(base);
        }
    }
    bail!("no free block of ports on 127.0.0.1")
}

/// Runs `ordo bench ...` with a local cluster of its own and returns its JSON result line.
fn run_bench(args: &[&str]) -> Result<serde_json::Value> {
    let base = free_port_block()?;
    let output = std::process::Command::new(ordo_tests::ordo_binary()?)
        .args(["bench"])
        .args(args)
        .args([
            "--local",
            "--local-base-port",
            &base.to_string(),
            "--local-metrics-base-port",
            &(base + 100).to_string(),
            "--output",
            "json",
        ])
        .output()
        .context("run ordo bench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!(
        "ordo bench {args:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "ordo bench {args:?} failed: {}",
        output.status
    );
    let line = stdout.lines().last().context("no output")?;
    serde_json::from_str(line).context("the last line is not JSON")
}

/// `ordo bench consume` reads back exactly what it wrote, and `ordo bench failover` kills a
/// leader, keeps acking, and finds every acked record at its offset afterwards. (Figures are
/// not checked: they depend on the machine.)
#[test]
fn bench_consume_and_failover_run_end_to_end() {
    let consume = run_bench(&["consume", "--records", "3000", "--record-size", "100"])
        .expect("bench consume");
    assert_eq!(consume["records"], 3000, "{consume}");
    assert_eq!(consume["errors"], 0, "{consume}");

    let failover = run_bench(&[
        "failover",
        "--rate",
        "200",
        "--duration",
        "8s",
        "--kill-after",
        "3s",
        "--restart-after",
        "2s",
    ])
    .expect("bench failover");
    assert_eq!(failover["kills"], 1, "{failover}");
    assert_eq!(failover["lost"], 0, "{failover}");
    assert!(
        failover["acked"].as_u64().is_some_and(|acked| acked > 0),
        "{failover}"
    );
}
