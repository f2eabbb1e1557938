//! The nemesis: injects one fault at a time, chosen and timed by a seeded random generator,
//! heals it, waits a little, and again, until its time is up. Every fault is logged to the
//! history when it starts and when it is healed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ordo_proto::v1::{ClusterStatusRequest, DescribeTopicRequest};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep, timeout};

use super::history::{Event, History, Phase};
use super::net::{Net, NodeRules};
use super::nodes::Nodes;
use crate::with_timeout;

/// Exit status of a node whose storage failed (`ordo_server::EXIT_STORAGE_FAILED`; the tests do
/// not link the server crate).
const STORAGE_FAILED_EXIT: i32 = 74;

/// The kinds of fault, with their weights in the random choice.
pub const FAULTS: &[(&str, u32)] = &[
    ("kill", 4),
    ("pause", 3),
    ("partition-halves", 2),
    ("isolate-leader", 2),
    ("partition-bridge", 1),
    ("one-way", 2),
    ("packet-loss", 1),
    ("restart-all", 1),
    ("disk-full", 1),
    ("restart-meta-leader", 2),
];

/// How long a DescribeTopic or ClusterStatus used to find a leader may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct Nemesis<'a> {
    pub nodes: Arc<Nodes>,
    pub net: &'a Net,
    pub history: Arc<History>,
    pub topic: String,
    pub partitions: u32,
    /// Index of the node with the small disk.
    pub small_disk: Option<usize>,
    rng: StdRng,
    /// Whether the small disk is full right now.
    disk_full: bool,
    /// Leave a node whose disk filled up running as it is (no operator restart).
    pub disk_strict: bool,
    /// The faults to choose from, with weights.
    pub faults: Vec<(&'static str, u32)>,
}

fn ms(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..to))
}

impl<'a> Nemesis<'a> {
    pub fn new(
        nodes: Arc<Nodes>,
        net: &'a Net,
        history: Arc<History>,
        topic: String,
        partitions: u32,
        small_disk: Option<usize>,
        seed: u64,
    ) -> Self {
        Self {
            nodes,
            net,
            history,
            topic,
            partitions,
            small_disk,
            rng: StdRng::seed_from_u64(seed),
            disk_full: false,
            disk_strict: false,
            faults: FAULTS.to_vec(),
        }
    }

    fn id(&self, index: usize) -> u64 {
        self.nodes.nodes[index].id
    }

    fn ids(&self, indexes: &[usize]) -> Vec<u64> {
        indexes.iter().map(|i| self.id(*i)).collect()
    }

    fn log(&self, kind: &str, phase: Phase, nodes: &[usize], detail: String) {
        self.history.log(Event::Nemesis {
            kind: kind.to_owned(),
            phase,
            nodes: self.ids(nodes),
            detail,
        });
    }

    /// Injects faults until `until`. Ends with everything healed.
    pub async fn run(&mut self, until: Instant) -> Result<()> {
        // Bounded: every iteration sleeps at least the gap; the deadline ends the loop.
        while Instant::now() < until {
            let gap = ms(&mut self.rng, 500, 3000);
            self.watch(gap).await?;
            if Instant::now() >= until {
                break;
            }
            let total: u32 = self.faults.iter().map(|(_, w)| w).sum();
            let mut pick = self.rng.random_range(0..total);
            let kind = self
                .faults
                .iter()
                .find(|(_, weight)| {
                    if pick < *weight {
                        true
                    } else {
                        pick -= weight;
                        false
                    }
                })
                .map(|(kind, _)| *kind)
                .expect("pick < total");
            self.fault(kind).await?;
        }
        Ok(())
    }

    /// Sleeps `duration` in steps, restarting (and logging) any node that exited on its own.
    async fn watch(&mut self, duration: Duration) -> Result<()> {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            sleep(Duration::from_millis(200).min(end - Instant::now())).await;
            self.restart_crashed()?;
        }
        Ok(())
    }

    /// Logs and restarts every node whose process exited without the nemesis killing it.
    pub fn restart_crashed(&mut self) -> Result<()> {
        for (index, status) in self.nodes.reap_exited() {
            // A node exits when its storage fails (crash-only, see `STORAGE_FAILED_EXIT`)
            // and cannot start while its disk is full: expected on the small disk. It stays down
            // until space returns (the disk-full fault then starts it).
            if self.small_disk == Some(index)
                && (self.disk_full || status.code() == Some(STORAGE_FAILED_EXIT))
            {
                self.log(
                    "storage-exit",
                    Phase::Note,
                    &[index],
                    format!(
                        "exited with {status} on its storage failure (small disk {}); {}",
                        if self.disk_full { "full" } else { "not full" },
                        if self.disk_full {
                            "left down until space returns"
                        } else {
                            "restarted"
                        }
                    ),
                );
                if !self.disk_full {
                    self.nodes.spawn(index)?;
                }
                continue;
            }
            let disk = if self.small_disk == Some(index) {
                format!(
                    " (small disk {}, {} bytes free)",
                    if self.disk_full { "full" } else { "not full" },
                    self.nodes.disk_free(index).unwrap_or(0)
                )
            } else {
                String::new()
            };
            let tail = self.nodes.log_tail(index, 1500);
            self.log(
                "crash",
                Phase::Note,
                &[index],
                format!("exited on its own with {status}{disk}; restarted. {tail}"),
            );
            eprintln!(
                "ordo-chaos: node {} exited on its own with {status}{disk}",
                self.id(index)
            );
            self.nodes.spawn(index)?;
        }
        Ok(())
    }

    /// The node leading a random partition, as a running node reports it.
    async fn partition_leader(&mut self) -> Option<usize> {
        let partition = self.rng.random_range(0..self.partitions);
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.shuffle(&mut self.rng);
        for index in order {
            if !self.nodes.is_up(index) {
                continue;
            }
            let request = DescribeTopicRequest {
                name: self.topic.clone(),
            };
            let mut admin = self.nodes.admin_client(index);
            let answer = timeout(
                LOOKUP_TIMEOUT,
                admin.describe_topic(with_timeout(request, LOOKUP_TIMEOUT)),
            )
            .await;
            if let Ok(Ok(response)) = answer {
                let leader = response
                    .into_inner()
                    .topic
                    .and_then(|t| t.partitions.into_iter().find(|p| p.partition == partition))
                    .and_then(|p| p.leader);
                if let Some(index) = leader.and_then(|id| self.nodes.index_of(id)) {
                    return Some(index);
                }
            }
        }
        None
    }

    /// The metadata group's leader, as a running node reports it.
    async fn meta_leader(&mut self) -> Option<usize> {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.shuffle(&mut self.rng);
        for index in order {
            if !self.nodes.is_up(index) {
                continue;
            }
            let mut admin = self.nodes.admin_client(index);
            let answer = timeout(
                LOOKUP_TIMEOUT,
                admin.cluster_status(with_timeout(ClusterStatusRequest {}, LOOKUP_TIMEOUT)),
            )
            .await;
            if let Ok(Ok(response)) = answer
                && let Some(index) = response
                    .into_inner()
                    .metadata_leader
                    .and_then(|id| self.nodes.index_of(id))
            {
                return Some(index);
            }
        }
        None
    }

    /// A victim: the leader of a random partition most of the time, else any node.
    async fn victim(&mut self) -> usize {
        if self.rng.random_bool(0.7)
            && let Some(leader) = self.partition_leader().await
        {
            return leader;
        }
        self.rng.random_range(0..self.nodes.len())
    }

    async fn fault(&mut self, kind: &str) -> Result<()> {
        let n = self.nodes.len();
        match kind {
            "kill" => {
                let victim = self.victim().await;
                if !self.nodes.is_running(victim) {
                    return Ok(());
                }
                let down = ms(&mut self.rng, 300, 5000);
                self.log(
                    kind,
                    Phase::Start,
                    &[victim],
                    format!("SIGKILL, down {down:?}"),
                );
                self.nodes.kill(victim)?;
                self.watch(down).await?;
                self.nodes.spawn(victim)?;
                self.log(kind, Phase::End, &[victim], String::from("restarted"));
            }
            "pause" => {
                let victim = self.victim().await;
                if !self.nodes.is_running(victim) {
                    return Ok(());
                }
                let hold = ms(&mut self.rng, 1500, 10000);
                self.log(
                    kind,
                    Phase::Start,
                    &[victim],
                    format!("SIGSTOP for {hold:?}"),
                );
                self.nodes.pause(victim)?;
                self.watch(hold).await?;
                // The process may have been reaped meanwhile (it cannot exit while stopped).
                if self.nodes.is_running(victim) {
                    self.nodes.resume(victim)?;
                }
                self.log(kind, Phase::End, &[victim], String::from("SIGCONT"));
            }
            "partition-halves" | "isolate-leader" => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut self.rng);
                let minority: Vec<usize> = if kind == "isolate-leader" {
                    match self.partition_leader().await {
                        Some(leader) => vec![leader],
                        None => vec![order[0]],
                    }
                } else {
                    let size = self.rng.random_range(1..=(n - 1) / 2);
                    order[..size].to_vec()
                };
                let majority: Vec<usize> = (0..n).filter(|i| !minority.contains(i)).collect();
                let mut rules = vec![NodeRules::default(); n];
                cut(&mut rules, &minority, &majority);
                self.partitioned(
                    kind,
                    &minority,
                    rules,
                    format!("{:?} | {:?}", self.ids(&minority), self.ids(&majority)),
                )
                .await?;
            }
            "partition-bridge" => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut self.rng);
                let half = (n - 1) / 2;
                let (left, rest) = order.split_at(half);
                let (bridge, right) = rest.split_at(1);
                let mut rules = vec![NodeRules::default(); n];
                cut(&mut rules, left, right);
                let detail = format!(
                    "{:?} | bridge {:?} | {:?}",
                    self.ids(left),
                    self.ids(bridge),
                    self.ids(right)
                );
                self.partitioned(kind, bridge, rules, detail).await?;
            }
            "one-way" => {
                // `deaf` hears nothing from `senders`, who still hear it.
                let deaf = self.victim().await;
                let mut others: Vec<usize> = (0..n).filter(|i| *i != deaf).collect();
                others.shuffle(&mut self.rng);
                let count = self.rng.random_range(1..=others.len());
                let senders: Vec<usize> = others[..count].to_vec();
                let mut rules = vec![NodeRules::default(); n];
                rules[deaf].drop_from = senders.iter().copied().collect();
                let detail = format!(
                    "node {} drops everything from {:?}",
                    self.id(deaf),
                    self.ids(&senders)
                );
                self.partitioned(kind, &[deaf], rules, detail).await?;
            }
            "packet-loss" => {
                let percent = self.rng.random_range(5..=30);
                let rules = vec![
                    NodeRules {
                        loss_percent: percent,
                        ..NodeRules::default()
                    };
                    n
                ];
                let all: Vec<usize> = (0..n).collect();
                self.partitioned(kind, &all, rules, format!("{percent}% loss on every link"))
                    .await?;
            }
            "restart-all" => {
                let all: Vec<usize> = (0..n).collect();
                let down = ms(&mut self.rng, 0, 2000);
                self.log(
                    kind,
                    Phase::Start,
                    &all,
                    format!("SIGKILL all, down {down:?}"),
                );
                for index in 0..n {
                    if self.nodes.is_running(index) {
                        self.nodes.kill(index)?;
                    }
                }
                self.watch(down).await?;
                for index in 0..n {
                    if !self.nodes.is_running(index) {
                        self.nodes.spawn(index)?;
                    }
                }
                self.log(kind, Phase::End, &all, String::from("restarted"));
            }
            "disk-full" => {
                let Some(index) = self.small_disk else {
                    return Ok(());
                };
                if !self.nodes.is_running(index) {
                    return Ok(());
                }
                let hold = ms(&mut self.rng, 3000, 12000);
                let log_start =
                    std::fs::metadata(&self.nodes.nodes[index].log_path).map_or(0, |m| m.len());
                let written = self.nodes.fill_disk(index)?;
                self.disk_full = true;
                self.log(
                    kind,
                    Phase::Start,
                    &[index],
                    format!(
                        "filled with {written} bytes ({} left) for {hold:?}",
                        self.nodes.disk_free(index).unwrap_or(0)
                    ),
                );
                self.watch(hold).await?;
                self.nodes.free_disk(index)?;
                self.disk_full = false;
                let alive = self.nodes.is_running(index);
                let errors =
                    self.nodes
                        .log_count_since(index, log_start, "No space left on device");
                let mut detail = format!(
                    "space returned; node process {}; {errors} storage errors (ENOSPC) in its log",
                    if alive { "alive" } else { "had exited" }
                );
                // A node whose storage failed exits (and is started again here once space is
                // back). One that failed and kept running would be wedged: restart it, unless
                // the strict mode wants the run to show the wedge.
                if !alive {
                    self.nodes.spawn(index)?;
                    detail += "; started again";
                } else if errors > 0 && !self.disk_strict {
                    self.nodes.kill(index)?;
                    self.nodes.spawn(index)?;
                    detail += "; restarted (it had storage errors but had not exited)";
                }
                self.log(kind, Phase::End, &[index], detail);
            }
            "restart-meta-leader" => {
                let Some(leader) = self.meta_leader().await else {
                    return Ok(());
                };
                if !self.nodes.is_running(leader) {
                    return Ok(());
                }
                let graceful = self.rng.random_bool(0.5);
                let down = ms(&mut self.rng, 200, 3000);
                self.log(
                    kind,
                    Phase::Start,
                    &[leader],
                    format!(
                        "{}, down {down:?}",
                        if graceful { "SIGTERM" } else { "SIGKILL" }
                    ),
                );
                let detail = if graceful {
                    let clean = self.nodes.terminate(leader).await?;
                    format!("stopped {}", if clean { "cleanly" } else { "NOT cleanly" })
                } else {
                    self.nodes.kill(leader)?;
                    String::from("killed")
                };
                self.watch(down).await?;
                self.nodes.spawn(leader)?;
                self.log(kind, Phase::End, &[leader], format!("{detail}; restarted"));
            }
            other => unreachable!("unknown fault {other}"),
        }
        Ok(())
    }

    /// Applies network rules for a while, then heals.
    async fn partitioned(
        &mut self,
        kind: &str,
        nodes: &[usize],
        rules: Vec<NodeRules>,
        detail: String,
    ) -> Result<()> {
        let hold = ms(&mut self.rng, 2000, 10000);
        self.log(kind, Phase::Start, nodes, format!("{detail} for {hold:?}"));
        self.net.apply(&rules)?;
        self.watch(hold).await?;
        self.net.heal()?;
        self.log(kind, Phase::End, nodes, String::from("healed"));
        Ok(())
    }

    /// Heals everything: network, paused nodes, the small disk, stopped nodes.
    pub async fn heal_all(&mut self) -> Result<()> {
        self.net.heal()?;
        for index in 0..self.nodes.len() {
            if self.nodes.is_running(index) && !self.nodes.is_up(index) {
                self.nodes.resume(index)?;
            }
        }
        if let Some(index) = self.small_disk {
            self.nodes.free_disk(index)?;
            self.disk_full = false;
        }
        self.restart_crashed()?;
        for index in 0..self.nodes.len() {
            if !self.nodes.is_running(index) {
                self.nodes.spawn(index)?;
            }
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.log(
            "heal",
            Phase::Note,
            &all,
            String::from("network whole, every node running"),
        );
        Ok(())
    }
}

/// Drops all traffic between the two sides, both ways.
fn cut(rules: &mut [NodeRules], left: &[usize], right: &[usize]) {
    let left_set: BTreeSet<usize> = left.iter().copied().collect();
    let right_set: BTreeSet<usize> = right.iter().copied().collect();
    for &node in left {
        rules[node].drop_from.extend(&right_set);
        rules[node].drop_to.extend(&right_set);
    }
    for &node in right {
        rules[node].drop_from.extend(&left_set);
        rules[node].drop_to.extend(&left_set);
    }
}
