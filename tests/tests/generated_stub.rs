//! Ordo's public API is usable from any language with gRPC stubs generated from `proto/` alone:
//! a Python program (`tests/stub/python/idempotent_retry.py`, stubs made by grpcio-tools at run
//! time, no Ordo library) follows the idempotent producer contract of `ordo.proto` by hand
//! against a 3-node cluster of real `ordo serve` processes, and its retries write nothing twice.
//!
//! The Python interpreter is `$ORDO_PYTHON`, else the venv `scripts/setup` makes
//! (`/var/tmp/ordo-venv`, with grpcio-tools and grpcio-status). The program's run is bounded
//! ([`SCRIPT_TIMEOUT`]), and it is killed when the test ends first.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use ordo_tests::TestCluster;
use tokio::process::Command;
use tokio::time::timeout;

/// Three nodes, so a retry can go through another node than the first send.
const NODES: usize = 3;
/// The Python program, relative to the repository root.
const SCRIPT: &str = "tests/stub/python/idempotent_retry.py";
/// The interpreter of the venv that `scripts/setup` makes.
const VENV_PYTHON: &str = "/var/tmp/ordo-venv/bin/python3";
/// Names another interpreter (one that has grpcio-tools and grpcio-status).
const PYTHON_VARIABLE: &str = "ORDO_PYTHON";
/// The topic the program creates (2 partitions, replication factor 3) and writes to.
const TOPIC: &str = "py-idempotent";
/// How long the program may run: stub generation, then a few dozen calls, each retried for at
/// most 45 s while no leader answers. Below the 240 s after which nextest kills a cluster test.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

/// A Python client built only from stubs generated from `proto/` retries idempotent produce
/// requests by hand (same request, same sequence, through another node) and gets the first
/// write's offsets with `duplicate` set; gaps, a stale epoch, an unknown producer and a missing
/// partition are refused with the documented code and `ErrorInfo` reason; and each partition
/// holds every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_stub_retries_idempotent_produce_without_duplicates() {
    // Before the cluster starts: a missing interpreter is a setup problem, not a cluster one.
    let python = python_interpreter().unwrap_or_else(|error| panic!("{error:#}"));
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        let endpoints = cluster
            .node_ids()
            .into_iter()
            .map(|node| cluster.address(node).to_string())
            .collect::<Vec<_>>()
            .join(",");
        run_script(&python, &["--endpoints", &endpoints, "--topic", TOPIC]).await
    }
    .await;
    cluster.finish(result);
}

/// The repository root: the parent of this crate's directory (`<root>/tests`). Read at run
/// time (cargo and nextest set `CARGO_MANIFEST_DIR` for the test), like `ordo-proto`'s build
/// script does: the compile-time value names the checkout that built the binary, and with a
/// shared target dir that may be another clone, since deleted.
fn repository_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("{} has no parent directory", manifest_dir.display()))
}

/// `$ORDO_PYTHON`, else the venv's interpreter; fails saying how to get one.
fn python_interpreter() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(PYTHON_VARIABLE) {
        return Ok(PathBuf::from(path));
    }
    let venv = PathBuf::from(VENV_PYTHON);
    ensure!(
        venv.is_file(),
        "{VENV_PYTHON} does not exist: run scripts/setup, which makes that venv with \
         grpcio-tools and grpcio-status (or set {PYTHON_VARIABLE} to a python3 that has them)"
    );
    Ok(venv)
}

/// Runs the program with `args`, its output in files (so what it printed before a hang is still
/// shown); prints that output and fails unless it exits 0 within [`SCRIPT_TIMEOUT`].
async fn run_script(python: &Path, args: &[&str]) -> Result<()> {
    let root = repository_root()?;
    let script = root.join(SCRIPT);
    ensure!(script.is_file(), "{} is missing", script.display());
    let output_dir = tempfile::Builder::new()
        .prefix("ordo-python-")
        .tempdir()
        .context("create a temp dir for the program's output")?;
    let stdout_path = output_dir.path().join("stdout");
    let stderr_path = output_dir.path().join("stderr");
    let mut child = Command::new(python)
        .arg(&script)
        .args(args)
        .current_dir(&root)
        // No __pycache__ left in the tree; output written as it happens.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).context("create the stdout file")?)
        .stderr(File::create(&stderr_path).context("create the stderr file")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} {}", python.display(), script.display()))?;
    let finished = timeout(SCRIPT_TIMEOUT, child.wait()).await;
    if finished.is_err() {
        // Killed and reaped before its output is read, so the files are complete.
        child
            .kill()
            .await
            .context("kill the program after its timeout")?;
    }
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let shown = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    println!("{} {SCRIPT} {}\n{shown}", python.display(), args.join(" "));
    match finished {
        Err(_) => bail!("{SCRIPT} did not finish within {SCRIPT_TIMEOUT:?}\n{shown}"),
        Ok(status) => {
            let status = status.context("wait for the program")?;
            if !status.success() {
                bail!("{SCRIPT} failed ({status})\n{shown}");
            }
            Ok(())
        }
    }
}
