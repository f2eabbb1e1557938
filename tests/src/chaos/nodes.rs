//! The `ordo serve` processes of a chaos run, each inside its node's network namespace
//! (`ip netns exec`, which execs, so the child's pid is the server's), and the small tmpfs that
//! holds one node's data dir for the disk-full fault.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use ordo_proto::v1::admin_client::AdminClient;
use ordo_proto::v1::log_client::LogClient;
use tonic::transport::{Channel, Endpoint};

use super::net::{Net, run};

/// gRPC port of every node (each node has its own address).
const PORT: u16 = 7000;
/// Metrics port of every node.
const METRICS_PORT: u16 = 9100;
/// Size of the disk-full node's filesystem. 192 MiB: a 10-minute run's own data (about 120,000
/// records, each also leased and acked through a queue partition, none ever deleted until
/// retention and log compaction exist) outgrew 64 MiB and left the node unable to start; the
/// disk-full fault fills whatever is free, so the size does not change the fault.
pub const SMALL_DISK: &str = "size=192m";

/// A node's process state as the harness sees it.
struct Process {
    child: Option<Child>,
    /// SIGSTOPped and not yet continued.
    paused: bool,
}

/// One node.
pub struct Node {
    pub id: u64,
    pub address: SocketAddr,
    pub namespace: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// The tmpfs mount point holding `data_dir`, when this node has the small disk.
    pub small_disk: Option<PathBuf>,
    process: Mutex<Process>,
    channel: Channel,
}

/// The nodes of a run. Dropping it kills every process and unmounts the small disk (the
/// namespaces belong to the [`Net`], dropped after).
pub struct Nodes {
    binary: PathBuf,
    initial_cluster: String,
    pub nodes: Vec<Node>,
}

impl Nodes {
    /// Prepares `count` nodes under `root` (node `small_disk` gets a tmpfs) and starts them.
    pub fn start(
        binary: &Path,
        net: &Net,
        root: &Path,
        count: usize,
        small_disk: Option<usize>,
    ) -> Result<Self> {
        let mut nodes = Vec::with_capacity(count);
        for index in 0..count {
            let id = index as u64 + 1;
            let node_dir = root.join(format!("node-{id}"));
            let mut data_dir = node_dir.join("data");
            let mut disk = None;
            if small_disk == Some(index) {
                let mount = node_dir.join("disk");
                fs::create_dir_all(&mount)?;
                let mount_text = mount.to_string_lossy().into_owned();
                let source = format!("{}{}", super::net::NS_PREFIX, std::process::id());
                run(
                    "mount",
                    &["-t", "tmpfs", "-o", SMALL_DISK, &source, &mount_text],
                )?;
                data_dir = mount.join("data");
                disk = Some(mount);
            }
            fs::create_dir_all(&data_dir)?;
            let address = SocketAddr::new(net.node_ip(index).into(), PORT);
            let channel = Endpoint::from_shared(format!("http://{address}"))
                .expect("a valid uri")
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(10))
                .connect_lazy();
            nodes.push(Node {
                id,
                address,
                namespace: net.namespace(index).to_owned(),
                data_dir,
                log_path: node_dir.join("node.log"),
                small_disk: disk,
                process: Mutex::new(Process {
                    child: None,
                    paused: false,
                }),
                channel,
            });
        }
        let initial_cluster = nodes
            .iter()
            .map(|node| format!("{}={}", node.id, node.address))
            .collect::<Vec<_>>()
            .join(",");
        let this = Self {
            binary: binary.to_owned(),
            initial_cluster,
            nodes,
        };
        for index in 0..count {
            this.spawn(index)?;
        }
        Ok(this)
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn log_client(&self, index: usize) -> LogClient<Channel> {
        LogClient::new(self.nodes[index].channel.clone()).max_decoding_message_size(16 << 20)
    }

    pub fn admin_client(&self, index: usize) -> AdminClient<Channel> {
        AdminClient::new(self.nodes[index].channel.clone())
    }

    /// Index of node `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|node| node.id == id)
    }

    fn lock(&self, index: usize) -> std::sync::MutexGuard<'_, Process> {
        self.nodes[index]
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the node runs and is not paused.
    pub fn is_up(&self, index: usize) -> bool {
        let process = self.lock(index);
        process.child.is_some() && !process.paused
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.lock(index).child.is_some()
    }

    /// Starts node `index`'s process in its namespace.
    pub fn spawn(&self, index: usize) -> Result<()> {
        let node = &self.nodes[index];
        let mut process = self.lock(index);
        ensure!(
            process.child.is_none(),
            "node {} is already running",
            node.id
        );
        let mut wrapper = Command::new("ip");
        wrapper
            .args(["netns", "exec", &node.namespace])
            .arg(&self.binary);
        let mut command = crate::serve_command(
            wrapper,
            &crate::ServeSpec {
                id: node.id,
                data_dir: &node.data_dir,
                address: node.address,
                initial_cluster: &self.initial_cluster,
                metrics: SocketAddr::new(node.address.ip(), METRICS_PORT),
                log_path: &node.log_path,
                starter: "ordo-chaos",
            },
        )?;
        command.envs(super::cleanup::NODE_ENV);
        let child = command
            .spawn()
            .with_context(|| format!("start node {} in {}", node.id, node.namespace))?;
        process.child = Some(child);
        process.paused = false;
        Ok(())
    }

    fn signal(&self, index: usize, signal: libc::c_int) -> Result<()> {
        let process = self.lock(index);
        let child = process
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("node {} is not running", self.nodes[index].id))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!(
                "signal {signal} to node {}: {}",
                self.nodes[index].id,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&self, index: usize) -> Result<()> {
        let mut process = self.lock(index);
        let mut child = process
            .child
            .take()
            .ok_or_else(|| anyhow!("node {} is not running", self.nodes[index].id))?;
        process.paused = false;
        let _ = child.kill();
        child.wait().context("reap a killed node")?;
        Ok(())
    }

    /// SIGTERM, then wait (at most 20 s, then SIGKILL). Returns whether it exited cleanly.
    pub async fn terminate(&self, index: usize) -> Result<bool> {
        self.signal(index, libc::SIGCONT)?;
        self.signal(index, libc::SIGTERM)?;
        for _ in 0..200 {
            {
                let mut process = self.lock(index);
                let child = process.child.as_mut().expect("checked by signal");
                if let Some(status) = child.try_wait()? {
                    process.child = None;
                    process.paused = false;
                    return Ok(status.success());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kill(index)?;
        Ok(false)
    }

    pub fn pause(&self, index: usize) -> Result<()> {
        self.signal(index, libc::SIGSTOP)?;
        self.lock(index).paused = true;
        Ok(())
    }

    pub fn resume(&self, index: usize) -> Result<()> {
        self.signal(index, libc::SIGCONT)?;
        self.lock(index).paused = false;
        Ok(())
    }

    /// Nodes whose process exited without the harness killing it: (index, exit status).
    pub fn reap_exited(&self) -> Vec<(usize, std::process::ExitStatus)> {
        let mut exited = Vec::new();
        for index in 0..self.nodes.len() {
            let mut process = self.lock(index);
            if let Some(child) = process.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                process.child = None;
                process.paused = false;
                exited.push((index, status));
            }
        }
        exited
    }

    /// The pid of a running node, to check it is the server and not `ip`.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.lock(index).child.as_ref().map(Child::id)
    }

    /// Fills the small disk until the filesystem says ENOSPC. Returns the bytes written.
    pub fn fill_disk(&self, index: usize) -> Result<u64> {
        let mount = self.nodes[index]
            .small_disk
            .as_ref()
            .ok_or_else(|| anyhow!("node {} has no small disk", self.nodes[index].id))?;
        let mut file = File::create(mount.join("fill")).context("create the filler")?;
        let chunk = vec![0x55u8; 256 * 1024];
        let mut written = 0u64;
        // 192 MiB / 256 KiB = 768 chunks; the bound leaves room for a bigger disk.
        for _ in 0..4096 {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(error) if error.kind() == ErrorKind::StorageFull => break,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(error) => return Err(error).context("fill the small disk"),
            }
        }
        // Whatever the last partial chunk left: fill byte by byte in bigger steps is not needed,
        // tmpfs allocates pages, so a failed 256 KiB write left < 256 KiB free; close it.
        let small = [0x55u8; 4096];
        for _ in 0..64 {
            match file.write(&small) {
                Ok(n) if n > 0 => written += n as u64,
                _ => break,
            }
        }
        let _ = file.flush();
        Ok(written)
    }

    /// Gives the small disk's space back.
    pub fn free_disk(&self, index: usize) -> Result<()> {
        if let Some(mount) = &self.nodes[index].small_disk {
            match fs::remove_file(mount.join("fill")) {
                Ok(()) => {}
                Err(error) if error.kind() == ErrorKind::NotFound => {}
                Err(error) => return Err(error).context("remove the filler"),
            }
        }
        Ok(())
    }

    /// Free bytes on the small disk.
    pub fn disk_free(&self, index: usize) -> Option<u64> {
        let mount = self.nodes[index].small_disk.as_ref()?;
        let text = run("df", &["--output=avail", "-B1", &mount.to_string_lossy()]).ok()?;
        text.lines().nth(1)?.trim().parse().ok()
    }

    /// How many lines of a node's log after byte `from` contain `needle`.
    pub fn log_count_since(&self, index: usize, from: u64, needle: &str) -> usize {
        use std::io::{BufRead, BufReader, Seek, SeekFrom};
        let Ok(mut file) = File::open(&self.nodes[index].log_path) else {
            return 0;
        };
        if file.seek(SeekFrom::Start(from)).is_err() {
            return 0;
        }
        BufReader::new(file)
            .split(b'\n')
            .map_while(std::result::Result::ok)
            .filter(|line| String::from_utf8_lossy(line).contains(needle))
            .count()
    }

    /// The first line of a node's log containing `needle`, and the line after it.
    pub fn log_first_match(&self, index: usize, needle: &str) -> Option<String> {
        let text = fs::read(&self.nodes[index].log_path).ok()?;
        let text = String::from_utf8_lossy(&text);
        let mut lines = text.lines();
        let first = lines.find(|line| line.contains(needle))?;
        Some(format!("{first} {}", lines.next().unwrap_or_default()))
    }

    /// The last `bytes` of a node's log.
    pub fn log_tail(&self, index: usize, bytes: u64) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let path = &self.nodes[index].log_path;
        let read = || -> std::io::Result<String> {
            let mut file = File::open(path)?;
            let length = file.metadata()?.len();
            file.seek(SeekFrom::Start(length.saturating_sub(bytes)))?;
            let mut out = Vec::new();
            file.read_to_end(&mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        };
        format!(
            "----- node {} log tail ({}) -----\n{}",
            self.nodes[index].id,
            path.display(),
            read().unwrap_or_else(|e| format!("<{e}>"))
        )
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            let mut process = self.lock(index);
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            if let Some(mount) = &node.small_disk {
                let text = mount.to_string_lossy().into_owned();
                // A lazy unmount cannot fail on a busy mount; the processes are gone anyway.
                if let Err(error) = run("umount", &["-l", &text]) {
                    eprintln!("ordo-chaos: {error:#}");
                }
            }
        }
    }
}
