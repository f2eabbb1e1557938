//! `ordo`: the one binary of Ordo. It runs a node (`serve`), a local cluster (`dev`), and talks
//! to a cluster through `ordo-client` (topics, produce, consume, cluster status, benchmarks).
//!
//! # Layout
//! - `main.rs`: command line, tracing set-up, and the one place errors become an exit code.
//! - `serve`: hands `ordo serve` to the server crate; the only module that knows it.
//! - `dev`: starts and supervises a cluster of child `ordo serve` processes.
//! - `topic`, `produce`, `consume`, `group`, `cluster`, `bench`: one module per command group;
//!   `moves` holds `node`, `partition` and `cluster rebalance` (commands that move replicas).
//! - `output`: table and JSON printing shared by the commands.
//! - `signals`: Ctrl-C and SIGTERM as one awaitable.
//!
//! Commands never build wire structs: they use only `ordo-client`'s domain types.

mod bench;
mod cluster;
mod consume;
mod dev;
mod group;
mod moves;
mod output;
mod produce;
mod queue;
mod serve;
mod signals;
mod topic;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ordo_client::{Client, ClientError, ClientOptions};
use tracing_subscriber::EnvFilter;

use crate::output::OutputFormat;

/// mimalloc instead of glibc's malloc: allocation was a tenth of all CPU time of a 3-node
/// produce benchmark (many small, short-lived buffers across threads), see docs/benchmarks.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Endpoints of the cluster `ordo dev` starts with its default flags.
const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// Ordo: a replicated, partitioned log.
#[derive(Debug, Parser)]
#[command(name = "ordo", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every client command accepts.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// gRPC endpoints of cluster nodes, comma separated; tried in turn when one is unreachable.
    #[arg(
        long,
        global = true,
        env = "ORDO_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINTS
    )]
    pub endpoints: Vec<String>,
    /// Output format: human-readable tables or JSON.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Deadline of each request, retries included (e.g. 500ms, 10s, 1m).
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: Duration,
}

impl GlobalArgs {
    /// A client for `--endpoints` with `--timeout` as its request deadline.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_for(self.endpoints.clone(), self.timeout).await
    }
}

/// A client for `endpoints` with `timeout` as its request deadline.
pub async fn client_for(endpoints: Vec<String>, timeout: Duration) -> anyhow::Result<Client> {
    let options = ClientOptions {
        request_timeout: timeout,
        ..ClientOptions::default()
    };
    client_with(endpoints, options).await
}

/// A client for `endpoints` with `options`.
pub async fn client_with(endpoints: Vec<String>, options: ClientOptions) -> anyhow::Result<Client> {
    Client::connect_with_options(endpoints, options)
        .await
        .context("invalid --endpoints")
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node of a cluster.
    Serve(ordo_server::ServeArgs),
    /// Run a local cluster of child `ordo serve` processes until Ctrl-C.
    Dev(dev::DevArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Append records to a topic, from arguments or from stdin lines.
    Produce(produce::ProduceArgs),
    /// Read records from a topic (by offset, or as a member of a consumer group).
    Consume(consume::ConsumeArgs),
    /// List, describe, reset and delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Create, list, describe and delete queues.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Inspect the cluster, rebalance it.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// List nodes, drain one (move its replicas away, then it leaves the cluster).
    #[command(subcommand)]
    Node(moves::NodeCommand),
    /// Move partitions' replicas.
    #[command(subcommand)]
    Partition(moves::PartitionCommand),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// mimalloc asks for transparent huge pages: every Raft group's few small allocations (openraft
/// preallocates about 2 MiB of queues per group, mostly never touched) then fault in whole
/// 2 MiB pages. With 1,000 idle partitions that was 2.1 GiB resident per node instead of
/// about 0.4 GiB. Inherited by child processes (`ordo dev` starts its nodes this way).
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result != 0 {
        eprintln!(
            "ordo: cannot disable transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Threads of tokio's blocking pool (`spawn_blocking`).
const BLOCKING_THREADS_MAX: usize = 32;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    init_tracing();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // Blocking work is RocksDB and journal reads and opening groups: a few threads keep up with
    // a disk, and each costs a stack and allocator pages.
    runtime.max_blocking_threads(BLOCKING_THREADS_MAX);
    if let Command::Serve(args) = &cli.command
        && let Some(threads) = args.worker_threads
    {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => return report(&anyhow::Error::new(error).context("cannot start tokio")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Topic(command) => topic::run(command, &global).await,
        Command::Produce(args) => produce::run(args, &global).await,
        Command::Consume(args) => consume::run(args, &global).await,
        Command::Group(command) => group::run(command, &global).await,
        Command::Queue(command) => queue::run(command, &global).await,
        Command::Cluster(command) => cluster::run(command, &global).await,
        Command::Node(command) => moves::run_node(command, &global).await,
        Command::Partition(command) => moves::run_partition(command, &global).await,
        Command::Bench(command) => bench::run(command, &global).await,
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`), so stdout carries only output.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Prints `error: ...` with the whole context chain on one line and returns exit code 1.
///
/// A closed stdout (`ordo consume ... | head`) is the reader's choice, not an error.
fn report(error: &anyhow::Error) -> ExitCode {
    let broken_pipe = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let mut line = format!("error: {error:#}").replace('\n', " ");
    // The leader hint is part of the Unavailable message; say so when there is none either.
    let unavailable_without_hint = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ClientError>(),
            Some(ClientError::Unavailable {
                leader_hint: None,
                leader_address: None,
                ..
            })
        )
    });
    if unavailable_without_hint {
        line.push_str(" (no leader known)");
    }
    eprintln!("{line}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default endpoints are split on commas like a given list.
    #[test]
    fn default_endpoints_are_split() {
        let cli = Cli::try_parse_from(["ordo", "topic", "list"]).expect("valid command line");
        assert_eq!(cli.global.endpoints.len(), 3);
        assert_eq!(cli.global.timeout, Duration::from_secs(10));
        let cli = Cli::try_parse_from([
            "ordo",
            "topic",
            "list",
            "--endpoints",
            "a:1,b:2",
            "--timeout",
            "500ms",
            "--output",
            "json",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(cli.global.timeout, Duration::from_millis(500));
        assert_eq!(cli.global.output, OutputFormat::Json);
    }

    /// The command line definition is consistent (clap's own checks).
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
