//! The network of a chaos run: one network namespace per node and one for a bridge, all named
//! `ordo-chaos-<pid>-*` after the test process, plus one veth from the root namespace into the
//! bridge so the test's clients reach every node. Faults are nftables rules inside the nodes'
//! namespaces (table `inet chaos`). Nothing here routes anywhere but the run's own /24 in
//! 10.77.0.0/16. Dropping a [`Net`] removes everything it made; [`cleanup_stale`] removes what a
//! killed run left behind.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace a run creates; the test process's pid follows.
pub const NS_PREFIX: &str = "ordo-chaos-";
/// Prefix of the root namespace's end of the host veth (interface names have 15 bytes at most).
const HOST_IF_PREFIX: &str = "ochaos";

/// Runs a command and fails with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program} {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `nft -f -` inside a namespace with `script` on stdin.
fn nft(namespace: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (install the nftables package; scripts/setup does)")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context("write the nft script")?;
    let output = child.wait_with_output().context("wait for nft")?;
    if !output.status.success() {
        bail!(
            "nft in {namespace} failed ({}): {}\nscript:\n{script}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Fails unless the tools and privileges a chaos run needs are here.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the chaos suite creates network namespaces and mounts: it must run as root");
    }
    run("ip", &["-V"]).context("`ip` (iproute2) is missing; run scripts/setup")?;
    run("nft", &["--version"]).context("`nft` (nftables) is missing; run scripts/setup")?;
    Ok(())
}

/// Whether a process with this pid exists.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and host veths left by chaos runs whose process is gone (killed before
/// its drop guards ran), and kills whatever still runs inside those namespaces.
pub fn cleanup_stale() {
    let own = std::process::id();
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == own || alive(pid) {
                continue;
            }
            eprintln!("ordo-chaos: removing stale namespace {name} (run {pid} is gone)");
            kill_inside(name);
            let _ = run("ip", &["netns", "delete", name]);
        }
    }
    // The small disks: tmpfs mounts whose source names the run.
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(pid) = source
                .strip_prefix(NS_PREFIX)
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != own && !alive(pid) {
                eprintln!("ordo-chaos: unmounting stale {target}");
                let _ = run("umount", &["-l", target]);
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        for line in links.lines() {
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            let Some(pid) = name
                .strip_prefix(HOST_IF_PREFIX)
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != own && !alive(pid) {
                eprintln!("ordo-chaos: removing stale interface {name}");
                let _ = run("ip", &["link", "delete", name]);
            }
        }
    }
}

/// SIGKILLs every process inside a namespace.
fn kill_inside(namespace: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", namespace]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) has no memory effects; the pids are the namespace's processes.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// What the network does to one node: drop traffic from and to some peers, and a random loss.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRules {
    /// Drop packets arriving from these nodes (by index).
    pub drop_from: BTreeSet<usize>,
    /// Drop packets sent to these nodes (by index).
    pub drop_to: BTreeSet<usize>,
    /// Drop this percentage of all packets in and out (0 = none).
    pub loss_percent: u32,
}

/// The namespaces, bridge and veths of one run.
pub struct Net {
    bridge_ns: String,
    node_ns: Vec<String>,
    host_if: String,
    subnet: u8,
}

impl Net {
    /// Creates the bridge namespace, one namespace per node wired to the bridge, and the host
    /// veth. On error everything made so far is removed (by the drop of the partial `Net`).
    pub fn create(nodes: usize) -> Result<Self> {
        let pid = std::process::id();
        let subnet = free_subnet()?;
        let mut net = Self {
            bridge_ns: format!("{NS_PREFIX}{pid}-br"),
            node_ns: Vec::new(),
            host_if: format!("{HOST_IF_PREFIX}{pid}"),
            subnet,
        };
        let br = net.bridge_ns.clone();
        run("ip", &["netns", "add", &br])?;
        run("ip", &["-n", &br, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        // The host's end in the root namespace, the other end on the bridge.
        run(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "host",
                "netns",
                &br,
            ],
        )?;
        let host_cidr = format!("{}/24", net.host_ip());
        run("ip", &["addr", "add", &host_cidr, "dev", &net.host_if])?;
        run("ip", &["link", "set", &net.host_if, "up"])?;
        run("ip", &["-n", &br, "link", "set", "host", "master", "br0"])?;
        run("ip", &["-n", &br, "link", "set", "host", "up"])?;
        for index in 0..nodes {
            let ns = format!("{NS_PREFIX}{pid}-n{}", index + 1);
            run("ip", &["netns", "add", &ns])?;
            net.node_ns.push(ns.clone());
            let port = format!("n{}", index + 1);
            run(
                "ip",
                &[
                    "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run("ip", &["-n", &br, "link", "set", &port, "master", "br0"])?;
            run("ip", &["-n", &br, "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", net.node_ip(index));
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            nft(
                &ns,
                "table inet chaos {\n\
                 chain input { type filter hook input priority 0; policy accept; }\n\
                 chain output { type filter hook output priority 0; policy accept; }\n\
                 }\n",
            )?;
        }
        Ok(net)
    }

    /// The namespace node `index` (0-based) runs in.
    pub fn namespace(&self, index: usize) -> &str {
        &self.node_ns[index]
    }

    /// Node `index`'s address: 10.77.<subnet>.<11 + index>.
    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 11 + index as u8)
    }

    /// The test process's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    /// Replaces every node's rules. `rules[i]` is node i's.
    pub fn apply(&self, rules: &[NodeRules]) -> Result<()> {
        for (index, rule) in rules.iter().enumerate() {
            let mut script =
                String::from("flush chain inet chaos input\nflush chain inet chaos output\n");
            let set = |nodes: &BTreeSet<usize>| {
                nodes
                    .iter()
                    .map(|n| self.node_ip(*n).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !rule.drop_from.is_empty() {
                script += &format!(
                    "add rule inet chaos input ip saddr {{ {} }} drop\n",
                    set(&rule.drop_from)
                );
            }
            if !rule.drop_to.is_empty() {
                script += &format!(
                    "add rule inet chaos output ip daddr {{ {} }} drop\n",
                    set(&rule.drop_to)
                );
            }
            if rule.loss_percent > 0 {
                for (chain, dir) in [("input", "iifname"), ("output", "oifname")] {
                    script += &format!(
                        "add rule inet chaos {chain} {dir} \"eth0\" numgen random mod 100 < {} drop\n",
                        rule.loss_percent
                    );
                }
            }
            nft(&self.node_ns[index], &script)?;
        }
        Ok(())
    }

    /// Removes every rule: the network is whole again.
    pub fn heal(&self) -> Result<()> {
        self.apply(&vec![NodeRules::default(); self.node_ns.len()])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.node_ns.iter().chain(std::iter::once(&self.bridge_ns)) {
            kill_inside(ns);
            if let Err(error) = run("ip", &["netns", "delete", ns]) {
                eprintln!("ordo-chaos: {error:#}");
            }
        }
        // Deleting the bridge namespace destroys the host veth's peer, and so the veth; this is
        // for the case where the namespace was never made.
        let _ = run("ip", &["link", "delete", &self.host_if]);
    }
}

/// A /24 of 10.77.0.0/16 that no interface of the root namespace uses.
fn free_subnet() -> Result<u8> {
    let addresses = run("ip", &["-4", "-o", "addr", "show"])?;
    let routes = run("ip", &["-4", "route", "show"])?;
    for subnet in 0..=255u8 {
        let prefix = format!("10.77.{subnet}.");
        if !addresses.contains(&prefix) && !routes.contains(&prefix) {
            return Ok(subnet);
        }
    }
    bail!("every /24 of 10.77.0.0/16 is in use")
}
