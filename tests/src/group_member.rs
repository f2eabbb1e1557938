//! A consumer group member as a process of its own (`ordo-group-member`), and the checks of what
//! members did, read from their logs.
//!
//! The member joins a group through `ordo-client`'s [`GroupConsumer`], consumes, commits every
//! `commit_every` records (after "processing" them: a pause per batch), and writes every event as
//! a JSON line on stdout, stamped with the wall clock in microseconds, so the logs of several
//! processes on one machine can be merged in time. SIGTERM closes it cleanly (commit, leave);
//! SIGKILL is a crash.
//!
//! The checks ([`check_members`]): at every moment each partition is owned by at most one member
//! (ownership runs from `assigned` to `revoked`/`lost`, or to the member's death), and every
//! record below the end of each partition was delivered to some member.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use std::time::SystemTime;

use anyhow::{Context, Result, bail, ensure};
use ordo_client::{Client, ClientOptions, GroupConsumerOptions, GroupEvent};
use serde::Deserialize;
use serde::Serialize;

/// How a member runs.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// Cluster endpoints.
    pub endpoints: Vec<String>,
    /// The group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The member id (also its name in the logs).
    pub member_id: String,
    /// Session timeout asked for.
    pub session_timeout: Duration,
    /// Commit after this many records delivered since the last commit.
    pub commit_every: u64,
    /// Pause after each batch ("processing").
    pub pause_per_batch: Duration,
    /// Most bytes per fetch (at least one stored batch comes back).
    pub fetch_max_bytes: u32,
}

/// One line of a member's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MemberLine {
    /// Joined the group.
    Joined {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// Member id.
        member: String,
    },
    /// Partitions now owned.
    Assigned {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// `(topic, partition)`.
        partitions: Vec<(String, u32)>,
    },
    /// Partitions released.
    Revoked {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// `(topic, partition)`.
        partitions: Vec<(String, u32)>,
    },
    /// Partitions lost (fenced or expired).
    Lost {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// `(topic, partition)`.
        partitions: Vec<(String, u32)>,
    },
    /// Records delivered: offsets `first..=last` of one partition.
    Records {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// First offset.
        first: u64,
        /// Last offset.
        last: u64,
    },
    /// Offsets committed (durable when logged): `(topic, partition, next offset)`.
    Committed {
        /// Microseconds since the Unix epoch.
        t_us: u64,
        /// The positions committed.
        offsets: Vec<(String, u32, u64)>,
    },
    /// Left the group after SIGTERM.
    Left {
        /// Microseconds since the Unix epoch.
        t_us: u64,
    },
}

impl MemberLine {
    /// When it happened.
    pub fn t_us(&self) -> u64 {
        match self {
            MemberLine::Joined { t_us, .. }
            | MemberLine::Assigned { t_us, .. }
            | MemberLine::Revoked { t_us, .. }
            | MemberLine::Lost { t_us, .. }
            | MemberLine::Records { t_us, .. }
            | MemberLine::Committed { t_us, .. }
            | MemberLine::Left { t_us } => *t_us,
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

fn emit(line: &MemberLine) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, line)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// Runs a member until SIGTERM (then commits and leaves) or a failure.
pub async fn run_member(config: MemberConfig) -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let client = Client::connect_with_options(
        config.endpoints.clone(),
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        },
    )
    .await?;
    let mut options = GroupConsumerOptions::new(config.group.clone(), [config.topic.clone()]);
    options.member_id = Some(config.member_id.clone());
    options.session_timeout = config.session_timeout;
    options.fetch_max_bytes = config.fetch_max_bytes;
    let mut consumer = client.group_consumer(options).await.context("join")?;
    emit(&MemberLine::Joined {
        t_us: now_us(),
        member: consumer.member_id(),
    })?;
    let mut since_commit = 0u64;
    loop {
        let event = tokio::select! {
            event = consumer.next() => event.context("next event")?,
            _ = terminate.recv() => break,
        };
        let line = match event {
            GroupEvent::Assigned(partitions) => MemberLine::Assigned {
                t_us: now_us(),
                partitions,
            },
            GroupEvent::Revoked(partitions) => MemberLine::Revoked {
                t_us: now_us(),
                partitions,
            },
            GroupEvent::Lost(partitions) => MemberLine::Lost {
                t_us: now_us(),
                partitions,
            },
            GroupEvent::Records {
                topic,
                partition,
                records,
            } => {
                since_commit += records.len() as u64;
                MemberLine::Records {
                    t_us: now_us(),
                    topic,
                    partition,
                    first: records.first().map_or(0, |record| record.offset),
                    last: records.last().map_or(0, |record| record.offset),
                }
            }
        };
        let delivered = matches!(line, MemberLine::Records { .. });
        emit(&line)?;
        if delivered {
            tokio::time::sleep(config.pause_per_batch).await;
            if since_commit >= config.commit_every {
                commit(&mut consumer).await?;
                since_commit = 0;
            }
        }
    }
    commit(&mut consumer).await?;
    consumer.close().await.context("leave")?;
    emit(&MemberLine::Left { t_us: now_us() })
}

async fn commit(consumer: &mut ordo_client::GroupConsumer) -> Result<()> {
    let offsets: Vec<(String, u32, u64)> = consumer
        .assignment()
        .into_iter()
        .filter_map(|(topic, partition)| {
            let position = consumer.position(&topic, partition)?;
            Some((topic, partition, position))
        })
        .collect();
    consumer.commit().await.context("commit")?;
    emit(&MemberLine::Committed {
        t_us: now_us(),
        offsets,
    })
}

/// Reads a member's log; a torn last line (the member was killed mid-write) is ignored.
pub fn read_member_log(path: &Path) -> Result<Vec<MemberLine>> {
    read_json_lines(path)
}

/// Reads a process's JSON-lines log; a torn last line (the process was killed mid-write) is
/// skipped, any other bad line is an error.
pub fn read_json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut parsed = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(line) => parsed.push(line),
            Err(_) if index + 1 == lines.len() => {}
            Err(error) => bail!("{}: line {}: {error}", path.display(), index + 1),
        }
    }
    Ok(parsed)
}

/// One member's log and, if it was killed, when.
#[derive(Debug, Clone)]
pub struct MemberLog {
    /// Its name.
    pub name: String,
    /// Its lines.
    pub lines: Vec<MemberLine>,
    /// When it was SIGKILLed (microseconds), if it was.
    pub killed_at_us: Option<u64>,
}

/// What the members did, summed up.
#[derive(Debug, Default)]
pub struct MembersSummary {
    /// Deliveries per partition: `(first, last)` runs.
    pub delivered: BTreeMap<(String, u32), Vec<(u64, u64)>>,
    /// Records delivered more than once.
    pub redelivered: u64,
}

/// Checks that each partition had at most one owner at any moment, and that every offset below
/// `ends[partition]` was delivered to some member.
pub fn check_members(
    logs: &[MemberLog],
    ends: &BTreeMap<(String, u32), u64>,
) -> Result<MembersSummary> {
    // Ownership intervals per partition: (from, to, member).
    let mut owned: BTreeMap<(String, u32), Vec<(u64, u64, String)>> = BTreeMap::new();
    let mut summary = MembersSummary::default();
    for log in logs {
        let end_of_life = log
            .killed_at_us
            .or_else(|| log.lines.last().map(MemberLine::t_us))
            .unwrap_or(u64::MAX);
        let mut open: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for line in &log.lines {
            match line {
                MemberLine::Assigned { t_us, partitions } => {
                    for partition in partitions {
                        ensure!(
                            open.insert(partition.clone(), *t_us).is_none(),
                            "{}: assigned {partition:?} twice",
                            log.name
                        );
                    }
                }
                MemberLine::Revoked { t_us, partitions }
                | MemberLine::Lost { t_us, partitions } => {
                    for partition in partitions {
                        let from = open.remove(partition).with_context(|| {
                            format!("{}: released {partition:?} it did not own", log.name)
                        })?;
                        owned.entry(partition.clone()).or_default().push((
                            from,
                            *t_us,
                            log.name.clone(),
                        ));
                    }
                }
                MemberLine::Records {
                    topic,
                    partition,
                    first,
                    last,
                    ..
                } => {
                    let key = (topic.clone(), *partition);
                    ensure!(
                        open.contains_key(&key),
                        "{}: records of {key:?} it did not own",
                        log.name
                    );
                    summary
                        .delivered
                        .entry(key)
                        .or_default()
                        .push((*first, *last));
                }
                _ => {}
            }
        }
        for (partition, from) in open {
            owned
                .entry(partition)
                .or_default()
                .push((from, end_of_life, log.name.clone()));
        }
    }
    for (partition, intervals) in &mut owned {
        intervals.sort();
        for pair in intervals.windows(2) {
            let ((_, to, a), (from, _, b)) = (&pair[0], &pair[1]);
            ensure!(
                to <= from,
                "{partition:?} owned by {a} until {to} and by {b} from {from}: two owners at once"
            );
        }
    }
    for (partition, end) in ends {
        let runs = summary
            .delivered
            .get(partition)
            .cloned()
            .unwrap_or_default();
        let mut seen = vec![0u32; *end as usize];
        for (first, last) in runs {
            for offset in first..=last.min(end.saturating_sub(1)) {
                seen[offset as usize] += 1;
            }
        }
        if let Some(missing) = seen.iter().position(|count| *count == 0) {
            bail!("{partition:?}: offset {missing} was never delivered (end {end})");
        }
        summary.redelivered += seen
            .iter()
            .map(|count| u64::from(count.saturating_sub(1)))
            .sum::<u64>();
    }
    Ok(summary)
}
