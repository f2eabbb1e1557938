//! The checker: reads a chaos history (`history.rs`) and reports every violation of what Ordo
//! promises, plus the run's statistics. It trusts nothing but the history.
//!
//! What it checks:
//! - **No acked record is lost**: every acked record is, after healing, at the offset it was
//!   acked at, on every replica of its partition.
//! - **One record per offset**: no (partition, offset) holds two different records across all
//!   reads (consumers, every replica after healing), and no position is acked for two records.
//! - **Dense, committed reads**: every Fetch answer is dense from the offset asked and below the
//!   high watermark it returned; every record a consumer read is still there after healing (a
//!   consumer never saw an uncommitted record that was later truncated).
//! - **Nothing foreign**: every record read was produced, with the key it was produced with, in
//!   the partition it was acked in; a record whose every attempt was refused with UNAVAILABLE
//!   ("nothing written") never appears.
//! - **Order**: a consumer reads a partition in offset order with no gap; if a record was acked
//!   before another record of the same partition was first sent (so in particular a later
//!   record of the same key), the later one lies at a higher offset, in every copy.
//! - **Convergence**: after healing, every replica of a partition holds the identical log.
//!
//! - **Consumer groups**: the group's committed offsets never go backward (a commit acked, or a
//!   FetchOffsets answered, after another commit was acked or another read answered holds an
//!   offset at least as high), and every record below the group's final committed offset was
//!   delivered to some member; records members got are the partition's records.
//!
//! - **No duplicate** when the run's producers were idempotent (`idempotent` in the history's
//!   start line): a record found at two offsets is a violation.
//!
//! Without idempotent producers, a record found at two offsets is a duplicate, not a
//! violation, when some attempt of its call had an unknown outcome (the client retried it) or
//! when it was acked (a node retried it inside the call after a leader change, documented in
//! docs/errors.md); both kinds are counted apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use super::history::{Event, Line, Phase, Read, Sent, Written};

/// Most examples of one kind of violation spelled out in a report.
const EXAMPLES_MAX: usize = 10;

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    /// Broken promises, each a readable sentence. Any makes the run fail.
    pub violations: Vec<String>,
    /// Things worth a look that the contract allows (unexpected error codes, node exits).
    pub warnings: Vec<String>,
    pub stats: Stats,
}

/// Numbers of a run.
#[derive(Debug, Default)]
pub struct Stats {
    pub seed: Option<u64>,
    pub nodes: usize,
    pub partitions: u32,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Produce calls (a call may make several attempts, all with the same records).
    pub calls: usize,
    pub attempts: usize,
    pub records_sent: usize,
    pub records_acked: usize,
    /// Records whose call ended without an ack and with some attempt of unknown outcome.
    pub records_unknown: usize,
    /// Records whose every attempt was refused with "nothing written".
    pub records_refused: usize,
    /// Acked records missing from their acked offset on some replica after healing.
    pub records_lost: usize,
    /// Extra copies of records whose call had an attempt of unknown outcome (client retries).
    pub duplicates_retried: usize,
    /// Extra copies of records whose calls had no unknown attempt (a node's retry in a call).
    pub duplicates_in_call: usize,
    /// The producers were idempotent: duplicates are violations.
    pub idempotent: bool,
    /// Records consumers read while the faults ran.
    pub consumer_records: usize,
    /// Replica copies read after healing, and the records in them.
    pub replicas_read: usize,
    pub final_records: u64,
    /// Failed produce attempts by status code.
    pub produce_errors: BTreeMap<String, usize>,
    /// Failed consumer fetches worth logging, by code.
    pub fetch_errors: BTreeMap<String, usize>,
    /// Longest time (µs) without any acked produce while the workload ran, and when it began.
    pub longest_unavailable_us: u64,
    pub longest_unavailable_at_us: u64,
    /// The same per partition: (partition, longest gap µs, start µs).
    pub longest_unavailable_partition: Option<(u32, u64, u64)>,
    /// OUT_OF_RANGE answers below served records from a node while its disk was full.
    pub wedged_answers: usize,
    /// Length of the workload (µs).
    pub workload_us: u64,
    /// Records consumer group members got (redeliveries included), commits acked, assignment
    /// changes (of which losses: a member fenced or expired).
    pub group_records: usize,
    pub group_commits: usize,
    pub group_changes: usize,
    pub group_losses: usize,
    /// Messages queue consumers got (redeliveries included), of which redeliveries; acks
    /// answered done; messages dead-lettered.
    pub queue_received: usize,
    pub queue_redeliveries: usize,
    pub queue_acked: usize,
    pub queue_dead_letters: usize,
    /// The side topics (`cleanup.rs`): records acked to the retained topic and to the compacted
    /// one; acked retained records below the final log start (retention deleted them); acked
    /// compacted records superseded by a later record of their key and gone; records the final
    /// copies hold; the retained topic's final log starts.
    pub retained_acked: usize,
    pub compacted_acked: usize,
    pub retained_away: usize,
    pub compacted_away: usize,
    pub cleanup_held: usize,
    pub retained_starts: Vec<u64>,
    /// Partition snapshots the nodes installed (their logs say).
    pub snapshots_installed: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The human-readable report: verdict, statistics, violations, warnings.
    pub fn render(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "chaos check: {verdict} (seed {}, {} nodes, {} partitions, workload {:.1} s)",
            s.seed
                .map_or_else(|| String::from("?"), |seed| seed.to_string()),
            s.nodes,
            s.partitions,
            s.workload_us as f64 / 1e6
        );
        let total: usize = s.faults.values().sum();
        let faults: Vec<String> = s.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "  faults injected: {total} ({})", faults.join(", "));
        let _ = writeln!(
            out,
            "  produce: {} calls, {} attempts, {} records sent: {} acked, {} unknown, {} refused",
            s.calls,
            s.attempts,
            s.records_sent,
            s.records_acked,
            s.records_unknown,
            s.records_refused
        );
        let _ = writeln!(out, "  records lost: {}", s.records_lost);
        let _ = writeln!(
            out,
            "  duplicates ({}): {} from client retries of unknown outcomes, {} from retries inside an acked or refused call",
            if s.idempotent {
                "idempotent producers: each is a violation"
            } else {
                "producers without idempotence: counted, allowed"
            },
            s.duplicates_retried,
            s.duplicates_in_call
        );
        let _ = writeln!(
            out,
            "  consumers read {} records; after healing {} replica copies read, {} records in all partitions",
            s.consumer_records, s.replicas_read, s.final_records
        );
        let _ = writeln!(
            out,
            "  consumer group: {} records delivered, {} commits acked, {} assignment changes ({} losses)",
            s.group_records, s.group_commits, s.group_changes, s.group_losses
        );
        let _ = writeln!(
            out,
            "  queue: {} messages delivered ({} redeliveries), {} acked, {} dead-lettered",
            s.queue_received, s.queue_redeliveries, s.queue_acked, s.queue_dead_letters
        );
        let _ = writeln!(
            out,
            "  retention: {} records acked, {} retained away (final log starts {:?}); compaction: {} acked, {} compacted away; {} records held after healing; {} partition snapshots installed",
            s.retained_acked,
            s.retained_away,
            s.retained_starts,
            s.compacted_acked,
            s.compacted_away,
            s.cleanup_held,
            s.snapshots_installed
        );
        let partition = s
            .longest_unavailable_partition
            .map_or_else(String::new, |(p, gap, at)| {
                format!(
                    "; one partition: {:.1} s (partition {p} from t={:.1} s)",
                    gap as f64 / 1e6,
                    at as f64 / 1e6
                )
            });
        let _ = writeln!(
            out,
            "  longest unavailability (no ack at all): {:.1} s from t={:.1} s{partition}",
            s.longest_unavailable_us as f64 / 1e6,
            s.longest_unavailable_at_us as f64 / 1e6
        );
        let errors: Vec<String> = s
            .produce_errors
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(out, "  failed produce attempts: {}", errors.join(", "));
        if s.wedged_answers > 0 {
            let _ = writeln!(
                out,
                "  stale OUT_OF_RANGE answers from a node whose disk was full: {}",
                s.wedged_answers
            );
        }
        if !s.fetch_errors.is_empty() {
            let errors: Vec<String> = s
                .fetch_errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(out, "  notable fetch errors: {}", errors.join(", "));
        }
        if !self.violations.is_empty() {
            let _ = writeln!(out, "VIOLATIONS ({}):", self.violations.len());
            for violation in &self.violations {
                let _ = writeln!(out, "  - {violation}");
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "warnings ({}):", self.warnings.len());
            for warning in &self.warnings {
                let _ = writeln!(out, "  - {warning}");
            }
        }
        out
    }
}

type CallId = (usize, u64);

/// One produce call: its records and what each attempt came to.
#[derive(Debug)]
struct Call {
    records: Vec<Sent>,
    first_invoke: u64,
    attempts: BTreeSet<u32>,
    /// Attempts that ended (ok or fail).
    resolved: BTreeSet<u32>,
    /// Some attempt failed with an unknown outcome.
    unknown: bool,
    /// The ack: when, and (partition, offset) per record.
    acked: Option<(u64, Vec<(u32, u64)>)>,
}

impl Call {
    /// Whether a copy of this call's records may be in the log without (or besides) the ack:
    /// an attempt failed with an unknown outcome or never ended.
    fn maybe_written_unacked(&self) -> bool {
        self.unknown || self.attempts.len() > self.resolved.len()
    }
}

/// Where a record was seen: for reports.
#[derive(Debug, Clone)]
struct Seen {
    value: String,
    key: Option<String>,
    source: String,
    /// Read by a consumer while faults ran (not a final replica read).
    by_consumer: bool,
}

#[derive(Default)]
struct Checker {
    report: Report,
    calls: HashMap<CallId, Call>,
    /// value -> (call, index in the call's records).
    values: HashMap<String, (CallId, usize)>,
    /// Acked positions.
    acked: BTreeMap<(u32, u64), String>,
    /// Every position any read served.
    observed: BTreeMap<(u32, u64), Seen>,
    /// Positions each value was seen at.
    positions: HashMap<String, BTreeSet<(u32, u64)>>,
    /// Next offset each consumer must read, per (process, partition).
    consumers: HashMap<(usize, u32), u64>,
    /// Replica copies after healing, per partition.
    replicas: BTreeMap<u32, Vec<(u64, Vec<Read>)>>,
    /// Ack times per partition: (t, offset, value).
    ack_times: BTreeMap<u32, Vec<(u64, u64, String)>>,
    /// Violations by kind, each with a count and a few examples.
    kinds: BTreeMap<&'static str, (usize, Vec<String>)>,
    workload: (Option<u64>, Option<u64>),
    /// Nodes inside a disk-full fault (their answers are counted, not judged).
    wedged: BTreeSet<u64>,
    last_t: u64,
    /// Offsets group members got, per partition.
    group_delivered: BTreeMap<u32, BTreeSet<u64>>,
    /// The group's committed offsets as seen, per partition: (invoked, done, offset, what).
    group_marks: BTreeMap<u32, Vec<(u64, u64, u64, String)>>,
    /// The group's committed offsets read after healing.
    group_last: Option<Vec<(u32, u64)>>,
    /// Per queue message: deliveries `(t, delivery)`.
    queue_received: BTreeMap<(u32, u64), Vec<(u64, u32)>>,
    /// Per queue message: acks `(t_invoke, t_done, delivery, outcome)`.
    queue_acks: BTreeMap<(u32, u64), Vec<(u64, u64, u32, String)>>,
    /// The queue's state after healing.
    queue_final: Option<QueueFinal>,
    /// The side topics, per (topic, partition).
    cleanup: BTreeMap<(String, u32), CleanupPartition>,
}

/// What the history says of one partition of a side topic (`cleanup.rs`).
#[derive(Default)]
struct CleanupPartition {
    /// Values sent, with their keys (tombstones, empty values, in `tombstones`).
    sent: HashMap<String, Option<String>>,
    /// Tombstones sent, per key.
    tombstones: BTreeMap<String, usize>,
    /// Acked records.
    acked: Vec<Read>,
    /// Replica copies after healing: (node, start, records).
    replicas: Vec<(u64, u64, Vec<Read>)>,
}

/// The queue's floors and ends after healing, and the dead-letter topic's sources.
struct QueueFinal {
    floors: Vec<(u32, u64)>,
    ends: Vec<(u32, u64)>,
    dead_letters: BTreeSet<(u32, u64)>,
}

/// Checks a history and returns the report.
pub fn check(lines: &[Line]) -> Report {
    let mut checker = Checker::default();
    for line in lines {
        checker.last_t = checker.last_t.max(line.t);
        checker.event(line.t, &line.event);
    }
    checker.finish()
}

impl Checker {
    fn violation(&mut self, kind: &'static str, text: String) {
        let entry = self.kinds.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < EXAMPLES_MAX {
            entry.1.push(text);
        }
    }

    fn event(&mut self, t: u64, event: &Event) {
        match event {
            Event::Start {
                seed,
                nodes,
                partitions,
                idempotent,
                ..
            } => {
                self.report.stats.seed = Some(*seed);
                self.report.stats.nodes = *nodes;
                self.report.stats.partitions = *partitions;
                self.report.stats.idempotent = *idempotent;
            }
            Event::Invoke {
                process,
                call,
                attempt,
                records,
                ..
            } => self.invoke(t, (*process, *call), *attempt, records),
            Event::Ok {
                process,
                call,
                attempt,
                acks,
            } => self.ok(t, (*process, *call), *attempt, acks),
            Event::Fail {
                process,
                call,
                attempt,
                code,
                written,
                message,
            } => {
                *self
                    .report
                    .stats
                    .produce_errors
                    .entry(code.clone())
                    .or_default() += 1;
                let id = (*process, *call);
                let Some(entry) = self.calls.get_mut(&id) else {
                    self.violation(
                        "history",
                        format!("fail of call {id:?} attempt {attempt} that was never invoked"),
                    );
                    return;
                };
                entry.resolved.insert(*attempt);
                if *written == Written::Unknown {
                    entry.unknown = true;
                }
                if !matches!(
                    code.as_str(),
                    "Unavailable" | "DeadlineExceeded" | "Cancelled" | "Unknown" | "ResourceExhausted"
                ) {
                    let text = format!("produce call {id:?} attempt {attempt}: {code}: {message}");
                    if self.report.warnings.len() < 4 * EXAMPLES_MAX {
                        self.report.warnings.push(text);
                    }
                }
            }
            Event::Fetch {
                process,
                node,
                partition,
                offset,
                high_watermark,
                records,
            } => self.fetch(*process, *node, *partition, *offset, *high_watermark, records),
            Event::GroupRecords {
                member,
                partition,
                records,
            } => {
                let source = format!("group member {member}");
                for read in records {
                    self.observe(*partition, read, &source, true);
                    self.group_delivered
                        .entry(*partition)
                        .or_default()
                        .insert(read.offset);
                }
                self.report.stats.group_records += records.len();
            }
            Event::GroupCommit {
                member,
                t_invoke,
                offsets,
            } => {
                self.report.stats.group_commits += 1;
                for (partition, offset) in offsets {
                    self.group_marks.entry(*partition).or_default().push((
                        *t_invoke,
                        t,
                        *offset,
                        format!("member {member}'s commit"),
                    ));
                }
            }
            Event::GroupOffsets {
                t_invoke,
                offsets,
                last,
            } => {
                // A partition absent from the answer has no committed offset: 0.
                for partition in 0..self.report.stats.partitions {
                    let offset = offsets
                        .iter()
                        .find(|(number, _)| *number == partition)
                        .map_or(0, |(_, offset)| *offset);
                    self.group_marks.entry(partition).or_default().push((
                        *t_invoke,
                        t,
                        offset,
                        String::from("a FetchOffsets"),
                    ));
                }
                if *last {
                    self.group_last = Some(offsets.clone());
                }
            }
            Event::QueueReceived {
                consumer,
                partition,
                delivery,
                record,
            } => {
                self.observe(*partition, record, &format!("queue consumer {consumer}"), true);
                self.report.stats.queue_received += 1;
                if *delivery > 1 {
                    self.report.stats.queue_redeliveries += 1;
                }
                self.queue_received
                    .entry((*partition, record.offset))
                    .or_default()
                    .push((t, *delivery));
            }
            Event::QueueAck {
                t_invoke,
                partition,
                offset,
                delivery,
                outcome,
                ..
            } => {
                if outcome == "done" {
                    self.report.stats.queue_acked += 1;
                }
                self.queue_acks
                    .entry((*partition, *offset))
                    .or_default()
                    .push((*t_invoke, t, *delivery, outcome.clone()));
            }
            Event::QueueFinal {
                floors,
                ends,
                dead_letters,
            } => {
                self.report.stats.queue_dead_letters = dead_letters.len();
                self.queue_final = Some(QueueFinal {
                    floors: floors.clone(),
                    ends: ends.clone(),
                    dead_letters: dead_letters.iter().copied().collect(),
                });
            }
            Event::GroupAssignment { change, .. } => {
                self.report.stats.group_changes += 1;
                if change == "lost" {
                    self.report.stats.group_losses += 1;
                }
            }
            Event::FetchFail {
                node,
                partition,
                offset,
                code,
                end_offset,
                message,
                ..
            } => {
                // The consumer asks for the offset after the last one it read, so an end below
                // it denies records that were served as committed. ARCHITECTURE.md: only the
                // leader answers OUT_OF_RANGE past the end (a follower answers UNAVAILABLE).
                if let Some(end) = end_offset
                    && end < offset
                {
                    let text = format!(
                        "t={:.1}s node {node} answered OUT_OF_RANGE for {partition}@{offset}: claims the log ends at {end}, but offsets up to {} were served as committed",
                        t as f64 / 1e6,
                        offset - 1
                    );
                    if self.wedged.contains(node) {
                        self.report.stats.wedged_answers += 1;
                    } else {
                        self.violation("stale-end", text);
                    }
                }
                *self
                    .report
                    .stats
                    .fetch_errors
                    .entry(code.clone())
                    .or_default() += 1;
                if self.report.stats.fetch_errors.values().sum::<usize>() <= 3 {
                    self.report.warnings.push(format!(
                        "t={:.1}s fetch {partition}@{offset} from node {node}: {code}: {message}",
                        t as f64 / 1e6
                    ));
                }
            }
            Event::Nemesis {
                kind,
                phase,
                nodes,
                detail,
            } => match phase {
                Phase::Start => {
                    *self.report.stats.faults.entry(kind.clone()).or_default() += 1;
                    if kind == "disk-full" {
                        self.wedged.extend(nodes);
                    }
                }
                Phase::End => {
                    if kind == "disk-full" {
                        for node in nodes {
                            self.wedged.remove(node);
                        }
                        if detail.contains("restarted") || detail.contains("storage errors") {
                            self.report.warnings.push(format!(
                                "t={:.1}s disk-full on nodes {nodes:?}: {detail}",
                                t as f64 / 1e6
                            ));
                        }
                    }
                }
                Phase::Note => {
                    let text = format!(
                        "t={:.1}s {kind} nodes {nodes:?}: {detail}",
                        t as f64 / 1e6
                    );
                    if let Some(kind) = ["crash", "stuck", "panic"].into_iter().find(|k| k == kind) {
                        self.violation(kind, text);
                    } else if kind == "snapshots" {
                        self.report.stats.snapshots_installed += detail.parse().unwrap_or(0);
                    } else if kind != "heal" {
                        self.report.warnings.push(text);
                    }
                }
            },
            Event::Workload { phase } => match phase {
                Phase::Start => self.workload.0 = Some(t),
                Phase::End => self.workload.1 = Some(t),
                Phase::Note => {}
            },
            Event::Replica {
                node,
                partition,
                records,
            } => {
                let source = format!("node {node}'s replica after healing");
                for (index, read) in records.iter().enumerate() {
                    if read.offset != index as u64 {
                        self.violation(
                            "dense",
                            format!(
                                "{source} of partition {partition}: offset {} at index {index} (offsets not dense from 0)",
                                read.offset
                            ),
                        );
                        break;
                    }
                    self.observe(*partition, read, &source, false);
                }
                self.report.stats.replicas_read += 1;
                self.replicas
                    .entry(*partition)
                    .or_default()
                    .push((*node, records.clone()));
            }
            Event::ReplicaFail {
                node,
                partition,
                error,
            } => self.violation(
                "converge",
                format!("node {node}'s replica of partition {partition} could not be read in full after healing: {error}"),
            ),
            Event::CleanupSent {
                topic,
                partition,
                records,
            } => {
                let entry = self.cleanup.entry((topic.clone(), *partition)).or_default();
                for record in records {
                    if record.value.is_empty() {
                        *entry
                            .tombstones
                            .entry(record.key.clone().unwrap_or_default())
                            .or_default() += 1;
                    } else {
                        entry.sent.insert(record.value.clone(), record.key.clone());
                    }
                }
            }
            Event::CleanupAcked {
                topic,
                partition,
                records,
            } => self
                .cleanup
                .entry((topic.clone(), *partition))
                .or_default()
                .acked
                .extend(records.iter().cloned()),
            Event::CleanupReplica {
                topic,
                partition,
                node,
                start,
                records,
            } => self
                .cleanup
                .entry((topic.clone(), *partition))
                .or_default()
                .replicas
                .push((*node, *start, records.clone())),
            Event::CleanupReplicaFail {
                topic,
                partition,
                node,
                error,
            } => self.violation(
                "converge",
                format!("node {node}'s replica of {topic} partition {partition} could not be read after healing: {error}"),
            ),
        }
    }

    /// The side topics: replicas identical; every acked record of the retained topic at or past
    /// the log start where it was acked; for every key of the compacted topic, a record at or
    /// past its latest acked one (that one itself, if it is still there); nothing read that was
    /// not sent.
    fn check_cleanup(&mut self) {
        for ((topic, partition), side) in std::mem::take(&mut self.cleanup) {
            let compacted = topic == super::cleanup::COMPACTED_TOPIC;
            if compacted {
                self.report.stats.compacted_acked += side.acked.len();
            } else {
                self.report.stats.retained_acked += side.acked.len();
            }
            let Some((first_node, start, held)) = side.replicas.first() else {
                if !side.acked.is_empty() {
                    self.violation(
                        "converge",
                        format!(
                            "no replica of {topic} partition {partition} was read after healing"
                        ),
                    );
                }
                continue;
            };
            for (node, other_start, records) in &side.replicas[1..] {
                if (other_start, records) != (start, held) {
                    self.violation(
                        "converge",
                        format!(
                            "{topic} partition {partition}: node {node} holds {} records from {other_start}, node {first_node} {} from {start}",
                            records.len(),
                            held.len()
                        ),
                    );
                }
            }
            self.report.stats.cleanup_held += held.len();
            if !compacted {
                self.report.stats.retained_starts.push(*start);
            }
            let by_offset: BTreeMap<u64, &Read> =
                held.iter().map(|record| (record.offset, record)).collect();
            for record in held {
                if record.value.is_empty()
                    && side
                        .tombstones
                        .contains_key(record.key.as_deref().unwrap_or_default())
                {
                    continue;
                }
                match side.sent.get(&record.value) {
                    Some(key) if *key == record.key => {}
                    _ => self.violation(
                        "foreign",
                        format!(
                            "{topic} partition {partition} offset {} holds {:?} / {:.40}, never sent",
                            record.offset, record.key, record.value
                        ),
                    ),
                }
            }
            if compacted {
                // Every acked record still held is what was acked.
                for record in &side.acked {
                    if let Some(there) = by_offset.get(&record.offset)
                        && (there.value != record.value || there.key != record.key)
                    {
                        self.violation(
                            "lost",
                            format!(
                                "{topic} partition {partition} offset {}: acked {:?} {:.40}, holds {:?} {:.40}",
                                record.offset, record.key, record.value, there.key, there.value
                            ),
                        );
                    }
                }
                // Per key, the latest acked record.
                let mut latest: BTreeMap<&str, &Read> = BTreeMap::new();
                for record in &side.acked {
                    let key = record.key.as_deref().unwrap_or_default();
                    if latest
                        .get(key)
                        .is_none_or(|held| held.offset < record.offset)
                    {
                        latest.insert(key, record);
                    }
                }
                let superseded = side.acked.len() - latest.len();
                let mut kept_superseded = 0;
                for record in &side.acked {
                    let key = record.key.as_deref().unwrap_or_default();
                    if latest
                        .get(key)
                        .is_some_and(|latest| latest.offset != record.offset)
                        && by_offset.contains_key(&record.offset)
                    {
                        kept_superseded += 1;
                    }
                }
                self.report.stats.compacted_away += superseded - kept_superseded;
                for (key, record) in latest {
                    let there = by_offset.get(&record.offset);
                    let later = held.iter().any(|other| {
                        other.offset > record.offset && other.key.as_deref() == Some(key)
                    });
                    match there {
                        Some(there) if there.value != record.value => self.violation(
                            "lost",
                            format!(
                                "{topic} partition {partition} offset {}: acked {:.40}, holds {:.40}",
                                record.offset, record.value, there.value
                            ),
                        ),
                        Some(_) => {}
                        None if later => {}
                        // A tombstone goes delete.retention.ms after compaction reached it; so
                        // does a key deleted by a tombstone that may have been written after
                        // (sent, never acked).
                        None if record.value.is_empty() => {}
                        None if side.tombstones.get(key).copied().unwrap_or(0)
                            > side
                                .acked
                                .iter()
                                .filter(|acked| {
                                    acked.value.is_empty() && acked.key.as_deref() == Some(key)
                                })
                                .count() => {}
                        None => {
                            self.report.stats.records_lost += 1;
                            self.violation(
                            "lost",
                            format!(
                                "{topic} partition {partition}: key {key}'s latest acked record (offset {}) is gone and no later one is there",
                                record.offset
                            ),
                        );
                        }
                    }
                }
            } else {
                for record in &side.acked {
                    if record.offset < *start {
                        self.report.stats.retained_away += 1;
                        continue;
                    }
                    match by_offset.get(&record.offset) {
                        Some(there) if there.value == record.value => {}
                        there => {
                            self.report.stats.records_lost += 1;
                            self.violation(
                                "lost",
                                format!(
                                    "{topic} partition {partition} offset {} (at or past the log start {start}): acked {:.40}, holds {:?}",
                                    record.offset,
                                    record.value,
                                    there.map(|there| there.value.chars().take(40).collect::<String>())
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    fn invoke(&mut self, t: u64, id: CallId, attempt: u32, records: &[Sent]) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.attempts.insert(attempt);
            if call.records != records {
                self.violation(
                    "history",
                    format!(
                        "call {id:?} attempt {attempt} sent other records than its first attempt"
                    ),
                );
            }
            return;
        }
        for (index, record) in records.iter().enumerate() {
            if let Some((other, _)) = self.values.insert(record.value.clone(), (id, index)) {
                self.violation(
                    "history",
                    format!(
                        "value {} sent by calls {other:?} and {id:?}; values must be unique",
                        record.value
                    ),
                );
            }
        }
        self.calls.insert(
            id,
            Call {
                records: records.to_vec(),
                first_invoke: t,
                attempts: BTreeSet::from([attempt]),
                resolved: BTreeSet::new(),
                unknown: false,
                acked: None,
            },
        );
    }

    fn ok(&mut self, t: u64, id: CallId, attempt: u32, acks: &[(u32, u64)]) {
        let Some(call) = self.calls.get_mut(&id) else {
            self.violation(
                "history",
                format!("ack of call {id:?} that was never invoked"),
            );
            return;
        };
        call.resolved.insert(attempt);
        if call.acked.is_some() {
            self.violation("history", format!("call {id:?} acked twice"));
            return;
        }
        if acks.len() != call.records.len() {
            let text = format!(
                "call {id:?} sent {} records but got {} acks",
                call.records.len(),
                acks.len()
            );
            self.violation("ack", text);
            return;
        }
        call.acked = Some((t, acks.to_vec()));
        let values: Vec<String> = call.records.iter().map(|r| r.value.clone()).collect();
        for (value, &(partition, offset)) in values.into_iter().zip(acks) {
            if let Some(previous) = self.acked.insert((partition, offset), value.clone())
                && previous != value
            {
                self.violation(
                    "two-records",
                    format!("offset {partition}/{offset} acked for {previous} and for {value}"),
                );
            }
            self.ack_times
                .entry(partition)
                .or_default()
                .push((t, offset, value));
        }
    }

    fn fetch(
        &mut self,
        process: usize,
        node: u64,
        partition: u32,
        offset: u64,
        high_watermark: u64,
        records: &[Read],
    ) {
        let source = format!("consumer {process} reading node {node}");
        for (index, read) in records.iter().enumerate() {
            if read.offset != offset + index as u64 {
                self.violation(
                    "dense",
                    format!(
                        "{source}: Fetch of {partition}@{offset} returned offset {} at position {index}",
                        read.offset
                    ),
                );
                return;
            }
            if read.offset >= high_watermark {
                self.violation(
                    "uncommitted",
                    format!(
                        "{source}: Fetch of partition {partition} returned offset {} at or above its high watermark {high_watermark}",
                        read.offset
                    ),
                );
            }
        }
        let Some(first) = records.first() else {
            return;
        };
        let expected = self
            .consumers
            .get(&(process, partition))
            .copied()
            .unwrap_or(0);
        if first.offset != expected {
            self.violation(
                "consumer-order",
                format!(
                    "{source}: partition {partition} read offset {} next, expected {expected}",
                    first.offset
                ),
            );
        }
        let last = records.last().map_or(expected, |read| read.offset + 1);
        self.consumers.insert((process, partition), last);
        self.report.stats.consumer_records += records.len();
        for read in records {
            self.observe(partition, read, &source, true);
        }
    }

    /// Checks one record a node served against everything else seen at its position and
    /// against what was sent.
    fn observe(&mut self, partition: u32, read: &Read, source: &str, by_consumer: bool) {
        let position = (partition, read.offset);
        let at = format!("{partition}/{}", read.offset);
        match self.observed.get(&position) {
            Some(seen) if seen.value != read.value || seen.key != read.key => {
                let text = format!(
                    "offset {at} holds {} (key {:?}) per {source} but {} (key {:?}) per {}",
                    read.value, read.key, seen.value, seen.key, seen.source
                );
                self.violation("two-records", text);
            }
            Some(_) => {}
            None => {
                self.observed.insert(
                    position,
                    Seen {
                        value: read.value.clone(),
                        key: read.key.clone(),
                        source: source.to_owned(),
                        by_consumer,
                    },
                );
            }
        }
        self.positions
            .entry(read.value.clone())
            .or_default()
            .insert(position);
        let Some(&(id, index)) = self.values.get(&read.value) else {
            self.violation(
                "foreign",
                format!(
                    "{source}: offset {at} holds {:?}, which was never produced",
                    read.value
                ),
            );
            return;
        };
        let call = &self.calls[&id];
        let sent = &call.records[index];
        let mut found = Vec::new();
        if sent.key != read.key {
            found.push((
                "foreign",
                format!(
                    "{source}: offset {at} holds {} with key {:?}, but it was sent with key {:?}",
                    read.value, read.key, sent.key
                ),
            ));
        }
        if let Some((_, acks)) = &call.acked {
            let (acked_partition, _) = acks[index];
            if acked_partition != partition {
                found.push((
                    "foreign",
                    format!(
                        "{source}: offset {at} holds {}, which was acked in partition {acked_partition}",
                        read.value
                    ),
                ));
            }
        } else if !call.maybe_written_unacked() && call.attempts.len() == call.resolved.len() {
            found.push((
                "refused-written",
                format!(
                    "{source}: offset {at} holds {}, but every attempt to produce it was refused with UNAVAILABLE (\"nothing written\")",
                    read.value
                ),
            ));
        }
        for (kind, text) in found {
            self.violation(kind, text);
        }
    }

    fn finish(mut self) -> Report {
        self.count_calls();
        self.check_replicas();
        self.check_order();
        self.check_group();
        self.check_queue();
        self.check_cleanup();
        self.count_availability();
        let mut report = std::mem::take(&mut self.report);
        for (kind, (count, examples)) in std::mem::take(&mut self.kinds) {
            let title = match kind {
                "lost" => "acked record lost",
                "two-records" => "one offset, two records",
                "dense" => "offsets not dense",
                "uncommitted" => "uncommitted record read",
                "foreign" => "record read that was not produced as read",
                "refused-written" => "record refused with UNAVAILABLE was written",
                "consumer-order" => "consumer read out of offset order",
                "order" => "records out of produce order",
                "converge" => "replicas did not converge",
                "ack" => "malformed ack",
                "crash" => "node exited on its own",
                "stuck" => "no progress after healing",
                "panic" => "a node panicked (see its log)",
                "stale-end" => "OUT_OF_RANGE below records already served",
                "group-backward" => "consumer group offset went backward",
                "group-undelivered" => "record below the group's commit never delivered",
                "queue-acked-twice" => "queue message acked twice",
                "queue-after-ack" => "queue message delivered again after its ack was answered",
                "queue-undrained" => "queue floor did not reach the partition's end after healing",
                "queue-vanished" => "queue message finished without an ack or a dead letter",
                "history" => "malformed history",
                _ => kind,
            };
            report.violations.push(format!("{title}: {count} case(s)"));
            for example in examples {
                report.violations.push(format!("    {example}"));
            }
            if count > EXAMPLES_MAX {
                report
                    .violations
                    .push(format!("    ... and {} more", count - EXAMPLES_MAX));
            }
        }
        report
    }

    /// The group's committed offsets never go backward; everything below the final commit was
    /// delivered to some member.
    fn check_group(&mut self) {
        for (partition, marks) in std::mem::take(&mut self.group_marks) {
            let mut by_done = marks.clone();
            by_done.sort_by_key(|(_, done, ..)| *done);
            let mut by_invoke = marks;
            by_invoke.sort_by_key(|(invoked, ..)| *invoked);
            let mut highest: Option<&(u64, u64, u64, String)> = None;
            let mut next = 0;
            for mark in &by_invoke {
                while next < by_done.len() && by_done[next].1 < mark.0 {
                    if highest.is_none_or(|high| by_done[next].2 > high.2) {
                        highest = Some(&by_done[next]);
                    }
                    next += 1;
                }
                if let Some(high) = highest
                    && mark.2 < high.2
                {
                    let text = format!(
                        "partition {partition}: {} at t={:.1}s holds {}, but {} done at t={:.1}s held {}",
                        mark.3,
                        mark.0 as f64 / 1e6,
                        mark.2,
                        high.3,
                        high.1 as f64 / 1e6,
                        high.2
                    );
                    self.violation("group-backward", text);
                }
            }
        }
        let Some(last) = self.group_last.take() else {
            return;
        };
        for (partition, committed) in last {
            let delivered = self.group_delivered.remove(&partition).unwrap_or_default();
            if let Some(missing) = (0..committed).find(|offset| !delivered.contains(offset)) {
                self.violation(
                    "group-undelivered",
                    format!(
                        "partition {partition}: the group committed {committed}, but no member got offset {missing}"
                    ),
                );
            }
        }
    }

    /// Each queue message acked at most once, never delivered again after an ack answered
    /// done; after healing every partition drained, and every message below the floor was
    /// acked (or may have been: an ack whose answer was lost) or dead-lettered.
    fn check_queue(&mut self) {
        let acks = std::mem::take(&mut self.queue_acks);
        let received = std::mem::take(&mut self.queue_received);
        for (id, acks) in &acks {
            let done: Vec<&(u64, u64, u32, String)> =
                acks.iter().filter(|ack| ack.3 == "done").collect();
            if done.len() > 1 {
                self.violation(
                    "queue-acked-twice",
                    format!(
                        "message {}/{} acked (done) {} times: {done:?}",
                        id.0,
                        id.1,
                        done.len()
                    ),
                );
            }
            let Some((_, done_at, delivery, _)) = done.first() else {
                continue;
            };
            if let Some((t, again)) = received
                .get(id)
                .and_then(|deliveries| deliveries.iter().find(|(t, d)| t > done_at && d > delivery))
            {
                self.violation(
                    "queue-after-ack",
                    format!(
                        "message {}/{} acked (delivery {delivery}) at t={done_at}, delivered again (delivery {again}) at t={t}",
                        id.0, id.1
                    ),
                );
            }
        }
        let Some(last) = self.queue_final.take() else {
            return;
        };
        for (partition, end) in &last.ends {
            let floor = last
                .floors
                .iter()
                .find(|(number, _)| number == partition)
                .map_or(0, |(_, floor)| *floor);
            if floor < *end {
                self.violation(
                    "queue-undrained",
                    format!("partition {partition}: floor {floor} < end {end}"),
                );
            }
            for offset in 0..floor.min(*end) {
                let acked = acks.get(&(*partition, offset)).is_some_and(|acks| {
                    acks.iter()
                        .any(|ack| matches!(ack.3.as_str(), "done" | "unknown" | "error"))
                });
                if !acked && !last.dead_letters.contains(&(*partition, offset)) {
                    self.violation(
                        "queue-vanished",
                        format!(
                            "message {partition}/{offset} is below the floor {floor}, but no consumer acked it and it is not in the dead-letter topic"
                        ),
                    );
                }
            }
        }
    }

    fn count_calls(&mut self) {
        let stats = &mut self.report.stats;
        stats.calls = self.calls.len();
        for call in self.calls.values() {
            stats.attempts += call.attempts.len();
            stats.records_sent += call.records.len();
            if call.acked.is_some() {
                stats.records_acked += call.records.len();
            } else if call.maybe_written_unacked() {
                stats.records_unknown += call.records.len();
            } else {
                stats.records_refused += call.records.len();
            }
        }
    }

    /// Replicas identical; every acked record at its offset on every replica; every record a
    /// consumer read still there; duplicates counted.
    fn check_replicas(&mut self) {
        let partitions = self.report.stats.partitions;
        let replicas = std::mem::take(&mut self.replicas);
        let mut lengths: BTreeMap<u32, usize> = BTreeMap::new();
        for partition in 0..partitions {
            let Some(copies) = replicas.get(&partition) else {
                self.violation(
                    "converge",
                    format!("no replica of partition {partition} was read after healing"),
                );
                continue;
            };
            let (first_node, first) = &copies[0];
            lengths.insert(
                partition,
                copies.iter().map(|(_, r)| r.len()).min().unwrap_or(0),
            );
            self.report.stats.final_records += first.len() as u64;
            for (node, records) in &copies[1..] {
                if records.len() != first.len() {
                    self.violation(
                        "converge",
                        format!(
                            "partition {partition}: node {first_node} holds {} records, node {node} holds {}",
                            first.len(),
                            records.len()
                        ),
                    );
                }
                if let Some(index) =
                    (0..first.len().min(records.len())).find(|&i| first[i] != records[i])
                {
                    self.violation(
                        "converge",
                        format!(
                            "partition {partition} offset {index}: node {first_node} holds {:?} but node {node} holds {:?}",
                            first[index], records[index]
                        ),
                    );
                }
            }
        }
        // Lost acks: the acked value must be at its offset on every replica read.
        let mut lost: BTreeSet<String> = BTreeSet::new();
        let acked = std::mem::take(&mut self.acked);
        for ((partition, offset), value) in &acked {
            let Some(copies) = replicas.get(partition) else {
                continue;
            };
            for (node, records) in copies {
                let held = records.get(*offset as usize);
                if held.map(|read| &read.value) != Some(value) {
                    lost.insert(value.clone());
                    let (id, _) = self.values[value];
                    let acked_at = self.calls[&id].acked.as_ref().map_or(0, |(t, _)| *t);
                    let text = format!(
                        "{value} acked at {partition}/{offset} (t={:.3}s, call {id:?}) but node {node} holds {} there",
                        acked_at as f64 / 1e6,
                        held.map_or_else(
                            || String::from("nothing (log too short)"),
                            |read| read.value.clone()
                        )
                    );
                    self.violation("lost", text);
                }
            }
        }
        self.acked = acked;
        self.report.stats.records_lost = lost.len();
        // Consumer reads beyond the healed log: they saw something that was never committed.
        let beyond: Vec<String> = self
            .observed
            .iter()
            .filter(|((partition, offset), seen)| {
                seen.by_consumer
                    && lengths
                        .get(partition)
                        .is_some_and(|length| *offset >= *length as u64)
            })
            .map(|((partition, offset), seen)| {
                format!(
                    "{} read {} at {partition}/{offset}, past the end of the healed log ({} records)",
                    seen.source, seen.value, lengths[partition]
                )
            })
            .collect();
        for text in beyond {
            self.violation("uncommitted", text);
        }
        // Duplicates: a record in several partitions is foreign to all but one; copies within
        // one partition are counted in the healed log (the first replica read; the replicas
        // were compared above).
        let positions = std::mem::take(&mut self.positions);
        for (value, at) in &positions {
            let partitions: BTreeSet<u32> = at.iter().map(|(p, _)| *p).collect();
            if partitions.len() > 1 {
                self.violation(
                    "foreign",
                    format!("{value} found in several partitions: {at:?}"),
                );
            }
        }
        let mut copies: HashMap<&str, usize> = HashMap::new();
        for records in replicas
            .values()
            .filter_map(|copies| copies.first())
            .map(|(_, r)| r)
        {
            for read in records {
                *copies.entry(read.value.as_str()).or_default() += 1;
            }
        }
        for (value, count) in copies {
            let Some(&(id, _)) = self.values.get(value) else {
                continue;
            };
            if count < 2 {
                continue;
            }
            if self.report.stats.idempotent {
                self.violation(
                    "duplicate",
                    format!("{value} is {count} times in the log of idempotent producers"),
                );
            }
            if self.calls[&id].maybe_written_unacked() {
                self.report.stats.duplicates_retried += count - 1;
            } else {
                self.report.stats.duplicates_in_call += count - 1;
            }
        }
        self.positions = positions;
    }

    /// Real-time order: once a record is acked at offset o, no record of the same partition
    /// first sent afterwards may be at an offset <= o.
    fn check_order(&mut self) {
        let mut ack_times = std::mem::take(&mut self.ack_times);
        let mut prefix: BTreeMap<u32, Vec<(u64, u64, String)>> = BTreeMap::new();
        for (partition, acks) in &mut ack_times {
            acks.sort();
            let mut best: Option<(u64, String)> = None;
            let mut out = Vec::with_capacity(acks.len());
            for (t, offset, value) in acks.iter() {
                if best.as_ref().is_none_or(|(o, _)| offset > o) {
                    best = Some((*offset, value.clone()));
                }
                let (o, v) = best.clone().expect("set above");
                out.push((*t, o, v));
            }
            prefix.insert(*partition, out);
        }
        let mut found = Vec::new();
        for ((partition, offset), seen) in &self.observed {
            let Some(&(id, index)) = self.values.get(&seen.value) else {
                continue;
            };
            let invoked = self.calls[&id].first_invoke;
            let Some(acks) = prefix.get(partition) else {
                continue;
            };
            // Acks strictly before the first send.
            let before = acks.partition_point(|(t, _, _)| *t < invoked);
            if before == 0 {
                continue;
            }
            let (acked_t, acked_offset, acked_value) = &acks[before - 1];
            if acked_offset >= offset && acked_value != &seen.value {
                let key = &self.calls[&id].records[index].key;
                let acked_key = self
                    .values
                    .get(acked_value)
                    .map(|(other, i)| self.calls[other].records[*i].key.clone());
                found.push(format!(
                    "{} (key {key:?}) first sent at t={:.3}s is at {partition}/{offset}, but {acked_value} (key {:?}) was acked at {partition}/{acked_offset} earlier, at t={:.3}s",
                    seen.value,
                    invoked as f64 / 1e6,
                    acked_key.flatten(),
                    *acked_t as f64 / 1e6
                ));
            }
        }
        for text in found {
            self.violation("order", text);
        }
        self.ack_times = ack_times;
    }

    fn count_availability(&mut self) {
        let start = self.workload.0.unwrap_or(0);
        let end = self.workload.1.unwrap_or(self.last_t).max(start);
        self.report.stats.workload_us = end - start;
        let longest = |times: &mut Vec<u64>| -> (u64, u64) {
            times.sort_unstable();
            let mut previous = start;
            let mut best = (0, start);
            for &t in times.iter().chain(std::iter::once(&end)) {
                let t = t.clamp(start, end);
                if t - previous > best.0 {
                    best = (t - previous, previous);
                }
                previous = previous.max(t);
            }
            best
        };
        let mut all: Vec<u64> = self
            .calls
            .values()
            .filter_map(|call| call.acked.as_ref().map(|(t, _)| *t))
            .collect();
        let (gap, at) = longest(&mut all);
        self.report.stats.longest_unavailable_us = gap;
        self.report.stats.longest_unavailable_at_us = at;
        for (partition, acks) in &self.ack_times {
            let mut times: Vec<u64> = acks.iter().map(|(t, _, _)| *t).collect();
            let (gap, at) = longest(&mut times);
            if self
                .report
                .stats
                .longest_unavailable_partition
                .is_none_or(|(_, best, _)| gap > best)
            {
                self.report.stats.longest_unavailable_partition = Some((*partition, gap, at));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Bad histories the checker must catch, and a good one it must pass.

    use super::*;

    /// Builds histories: one topic, `partitions` partitions, replicas on nodes 1..=3.
    struct Builder {
        lines: Vec<Line>,
        t: u64,
        call: u64,
    }

    impl Builder {
        fn new(partitions: u32) -> Self {
            let mut builder = Self {
                lines: Vec::new(),
                t: 0,
                call: 0,
            };
            builder.push(Event::Start {
                seed: 7,
                nodes: 3,
                topic: String::from("chaos"),
                partitions,
                replication_factor: 3,
                idempotent: false,
            });
            builder.push(Event::Workload {
                phase: Phase::Start,
            });
            builder
        }

        fn push(&mut self, event: Event) {
            self.t += 1000;
            self.lines.push(Line { t: self.t, event });
        }

        fn records(values: &[(&str, &str)]) -> Vec<Sent> {
            values
                .iter()
                .map(|(key, value)| Sent {
                    key: Some((*key).to_owned()),
                    value: (*value).to_owned(),
                })
                .collect()
        }

        /// One call, acked at `acks`.
        fn acked(&mut self, values: &[(&str, &str)], acks: &[(u32, u64)]) {
            self.call += 1;
            let call = self.call;
            self.push(Event::Invoke {
                process: 0,
                call,
                attempt: 0,
                node: 1,
                records: Self::records(values),
            });
            self.push(Event::Ok {
                process: 0,
                call,
                attempt: 0,
                acks: acks.to_vec(),
            });
        }

        /// One call that failed with `written`.
        fn failed(&mut self, values: &[(&str, &str)], written: Written) {
            self.call += 1;
            let call = self.call;
            self.push(Event::Invoke {
                process: 0,
                call,
                attempt: 0,
                node: 1,
                records: Self::records(values),
            });
            self.push(Event::Fail {
                process: 0,
                call,
                attempt: 0,
                code: String::from(if written == Written::No {
                    "Unavailable"
                } else {
                    "DeadlineExceeded"
                }),
                written,
                message: String::new(),
            });
        }

        fn consumed(&mut self, partition: u32, offset: u64, records: &[(&str, &str)]) {
            self.push(Event::Fetch {
                process: 1,
                node: 2,
                partition,
                offset,
                high_watermark: offset + records.len() as u64,
                records: reads(offset, records),
            });
        }

        /// Every replica of `partition` holds `records`.
        fn replicas(&mut self, partition: u32, records: &[(&str, &str)]) {
            for node in 1..=3 {
                self.replica(node, partition, records);
            }
        }

        fn replica(&mut self, node: u64, partition: u32, records: &[(&str, &str)]) {
            self.push(Event::Replica {
                node,
                partition,
                records: reads(0, records),
            });
        }

        fn check(mut self) -> Report {
            self.push(Event::Workload { phase: Phase::End });
            let report = check(&self.lines);
            println!("{}", report.render());
            report
        }
    }

    fn reads(first: u64, records: &[(&str, &str)]) -> Vec<Read> {
        records
            .iter()
            .enumerate()
            .map(|(index, (key, value))| Read {
                offset: first + index as u64,
                key: Some((*key).to_owned()),
                value: (*value).to_owned(),
            })
            .collect()
    }

    fn assert_violation(report: &Report, needle: &str) {
        assert!(
            report.violations.iter().any(|v| v.contains(needle)),
            "expected a violation containing {needle:?}, got:\n{}",
            report.render()
        );
    }

    #[test]
    fn a_good_history_passes() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1"), ("b", "v2")], &[(0, 0), (0, 1)]);
        h.consumed(0, 0, &[("a", "v1")]);
        h.failed(&[("a", "v3")], Written::Unknown);
        h.acked(&[("a", "v4")], &[(0, 3)]);
        h.consumed(0, 1, &[("b", "v2"), ("a", "v3"), ("a", "v4")]);
        h.replicas(0, &[("a", "v1"), ("b", "v2"), ("a", "v3"), ("a", "v4")]);
        let report = h.check();
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.stats.records_acked, 3);
        assert_eq!(report.stats.records_unknown, 1);
        assert_eq!(report.stats.records_lost, 0);
    }

    /// Group records, commits and reads that move forward pass; a read below an acked commit,
    /// and a final commit above what members got, are caught.
    #[test]
    fn group_offsets_backward_and_undelivered_records_are_caught() {
        let good = |backward: bool, undelivered: bool| {
            let mut h = Builder::new(1);
            h.acked(
                &[("a", "v1"), ("b", "v2"), ("c", "v3")],
                &[(0, 0), (0, 1), (0, 2)],
            );
            h.push(Event::GroupRecords {
                member: 0,
                partition: 0,
                records: reads(0, &[("a", "v1"), ("b", "v2")]),
            });
            let t_invoke = h.t;
            h.push(Event::GroupCommit {
                member: 0,
                t_invoke,
                offsets: vec![(0, 2)],
            });
            if !undelivered {
                h.push(Event::GroupRecords {
                    member: 1,
                    partition: 0,
                    records: reads(2, &[("c", "v3")]),
                });
            }
            let t_invoke = h.t + 1;
            h.push(Event::GroupOffsets {
                t_invoke,
                offsets: vec![(0, if backward { 1 } else { 2 })],
                last: false,
            });
            let t_invoke = h.t + 1;
            h.push(Event::GroupOffsets {
                t_invoke,
                offsets: vec![(0, 3)],
                last: true,
            });
            h.replicas(0, &[("a", "v1"), ("b", "v2"), ("c", "v3")]);
            h.check()
        };
        let report = good(false, false);
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.stats.group_records, 3);
        assert_violation(&good(true, false), "consumer group offset went backward");
        assert_violation(
            &good(false, true),
            "record below the group's commit never delivered",
        );
    }

    /// Queue deliveries and acks that keep the contract pass; a second ack answered done, a
    /// delivery after an ack answered done, and a message below the floor with neither an ack
    /// nor a dead letter are caught.
    #[test]
    fn queue_double_acks_redeliveries_after_ack_and_vanished_messages_are_caught() {
        let run = |twice: bool, after_ack: bool, vanished: bool| {
            let mut h = Builder::new(1);
            h.acked(&[("a", "v1"), ("b", "v2")], &[(0, 0), (0, 1)]);
            let receive = |h: &mut Builder, consumer: usize, offset: u64, delivery: u32| {
                let value = if offset == 0 { "v1" } else { "v2" };
                let key = if offset == 0 { "a" } else { "b" };
                h.push(Event::QueueReceived {
                    consumer,
                    partition: 0,
                    delivery,
                    record: reads(offset, &[(key, value)]).remove(0),
                });
            };
            let ack = |h: &mut Builder, consumer: usize, offset: u64, delivery: u32| {
                let t_invoke = h.t;
                h.push(Event::QueueAck {
                    consumer,
                    t_invoke,
                    partition: 0,
                    offset,
                    delivery,
                    outcome: String::from("done"),
                });
            };
            receive(&mut h, 0, 0, 1);
            ack(&mut h, 0, 0, 1);
            if twice {
                ack(&mut h, 1, 0, 2);
            }
            if after_ack {
                receive(&mut h, 1, 0, 2);
            }
            receive(&mut h, 1, 1, 1);
            let dead_letters = if vanished { Vec::new() } else { vec![(0, 1)] };
            h.push(Event::QueueFinal {
                floors: vec![(0, 2)],
                ends: vec![(0, 2)],
                dead_letters,
            });
            h.replicas(0, &[("a", "v1"), ("b", "v2")]);
            h.check()
        };
        let report = run(false, false, false);
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.stats.queue_acked, 1);
        assert_eq!(report.stats.queue_dead_letters, 1);
        assert_violation(&run(true, false, false), "queue message acked twice");
        assert_violation(
            &run(false, true, false),
            "queue message delivered again after its ack was answered",
        );
        assert_violation(
            &run(false, false, true),
            "queue message finished without an ack or a dead letter",
        );
    }

    #[test]
    fn a_lost_ack_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.acked(&[("a", "v2")], &[(0, 1)]);
        h.replicas(0, &[("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "acked record lost");
        assert_eq!(report.stats.records_lost, 1);
    }

    #[test]
    fn an_ack_missing_on_one_replica_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.replica(1, 0, &[("a", "v1")]);
        h.replica(2, 0, &[("a", "v1")]);
        h.replica(3, 0, &[]);
        let report = h.check();
        assert_violation(&report, "acked record lost");
        assert_violation(&report, "replicas did not converge");
    }

    #[test]
    fn an_offset_with_two_values_is_caught() {
        let mut h = Builder::new(1);
        h.failed(&[("a", "v1")], Written::Unknown);
        h.failed(&[("a", "v2")], Written::Unknown);
        h.consumed(0, 0, &[("a", "v1")]);
        h.replicas(0, &[("a", "v2")]);
        let report = h.check();
        assert_violation(&report, "one offset, two records");
    }

    fn read(offset: u64, key: Option<&str>, value: &str) -> Read {
        Read {
            offset,
            key: key.map(str::to_owned),
            value: value.to_owned(),
        }
    }

    /// Side topics: an acked record at or past the retained topic's final start must be held
    /// (below it, it was retained away); a compacted key's latest acked record, or a later one,
    /// must be held; replicas must agree.
    #[test]
    fn side_topics_lost_records_and_differing_replicas_are_caught() {
        use crate::chaos::cleanup::{COMPACTED_TOPIC, RETAINED_TOPIC};
        let side = |h: &mut Builder, topic: &str, sent: &[Read], acked: &[Read]| {
            h.push(Event::CleanupSent {
                topic: topic.into(),
                partition: 0,
                records: sent
                    .iter()
                    .map(|read| Sent {
                        key: read.key.clone(),
                        value: read.value.clone(),
                    })
                    .collect(),
            });
            h.push(Event::CleanupAcked {
                topic: topic.into(),
                partition: 0,
                records: acked.to_vec(),
            });
        };
        let copy = |h: &mut Builder, topic: &str, node: u64, start: u64, records: &[Read]| {
            h.push(Event::CleanupReplica {
                topic: topic.into(),
                partition: 0,
                node,
                start,
                records: records.to_vec(),
            });
        };
        let retained = [
            read(0, None, "r0"),
            read(1, None, "r1"),
            read(2, None, "r2"),
        ];
        let compacted = [
            read(0, Some("a"), "a0"),
            read(1, Some("b"), "b0"),
            read(2, Some("a"), "a1"),
        ];
        // Good: r0 retained away, a0 compacted away.
        let mut h = Builder::new(0);
        side(&mut h, RETAINED_TOPIC, &retained, &retained);
        side(&mut h, COMPACTED_TOPIC, &compacted, &compacted);
        for node in [1, 2] {
            copy(&mut h, RETAINED_TOPIC, node, 1, &retained[1..]);
            copy(&mut h, COMPACTED_TOPIC, node, 0, &compacted[1..]);
        }
        let report = h.check();
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.stats.retained_away, 1);
        assert_eq!(report.stats.compacted_away, 1);
        // A retained record past the start missing, a compacted key's latest gone, replicas
        // that differ.
        let mut h = Builder::new(0);
        side(&mut h, RETAINED_TOPIC, &retained, &retained);
        side(&mut h, COMPACTED_TOPIC, &compacted, &compacted);
        copy(&mut h, RETAINED_TOPIC, 1, 1, &retained[2..]);
        copy(&mut h, COMPACTED_TOPIC, 1, 0, &compacted[..2]);
        copy(&mut h, COMPACTED_TOPIC, 2, 0, &compacted[1..]);
        let report = h.check();
        assert_violation(&report, "offset 1 (at or past the log start 1): acked r1");
        assert_violation(&report, "key a's latest acked record (offset 2) is gone");
        assert_violation(&report, "replicas did not converge");
    }

    #[test]
    fn replicas_that_differ_are_caught() {
        let mut h = Builder::new(1);
        h.failed(&[("a", "v1")], Written::Unknown);
        h.failed(&[("a", "v2")], Written::Unknown);
        h.replica(1, 0, &[("a", "v1")]);
        h.replica(2, 0, &[("a", "v2")]);
        let report = h.check();
        assert_violation(&report, "one offset, two records");
        assert_violation(&report, "replicas did not converge");
    }

    #[test]
    fn an_out_of_order_key_is_caught() {
        let mut h = Builder::new(1);
        // v1 acked at offset 1; v2 (same key) sent afterwards, yet found at offset 0.
        h.acked(&[("a", "v1")], &[(0, 1)]);
        h.failed(&[("a", "v2")], Written::Unknown);
        h.replicas(0, &[("a", "v2"), ("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "records out of produce order");
    }

    #[test]
    fn an_unproduced_record_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.consumed(0, 0, &[("a", "v1"), ("a", "ghost")]);
        h.replicas(0, &[("a", "v1"), ("a", "ghost")]);
        let report = h.check();
        assert_violation(&report, "was never produced");
    }

    #[test]
    fn a_record_under_another_key_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.replicas(0, &[("b", "v1")]);
        let report = h.check();
        assert_violation(&report, "it was sent with key");
    }

    #[test]
    fn a_refused_record_that_appears_is_caught() {
        let mut h = Builder::new(1);
        h.failed(&[("a", "v1")], Written::No);
        h.replicas(0, &[("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "record refused with UNAVAILABLE was written");
    }

    #[test]
    fn an_uncommitted_read_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.failed(&[("a", "v2")], Written::Unknown);
        // A consumer saw v2 at offset 1, but after healing the log ends at 1.
        h.consumed(0, 0, &[("a", "v1"), ("a", "v2")]);
        h.replicas(0, &[("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "past the end of the healed log");
    }

    #[test]
    fn a_consumer_gap_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1"), ("a", "v2")], &[(0, 0), (0, 1)]);
        h.consumed(0, 1, &[("a", "v2")]);
        h.replicas(0, &[("a", "v1"), ("a", "v2")]);
        let report = h.check();
        assert_violation(&report, "consumer read out of offset order");
    }

    #[test]
    fn an_out_of_range_below_served_records_is_caught() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1"), ("a", "v2")], &[(0, 0), (0, 1)]);
        h.consumed(0, 0, &[("a", "v1"), ("a", "v2")]);
        h.push(Event::FetchFail {
            process: 1,
            node: 3,
            partition: 0,
            offset: 2,
            code: String::from("OutOfRange"),
            end_offset: Some(1),
            message: String::new(),
        });
        h.replicas(0, &[("a", "v1"), ("a", "v2")]);
        let report = h.check();
        assert_violation(&report, "OUT_OF_RANGE below records already served");
    }

    #[test]
    fn duplicates_are_counted_not_failed() {
        let mut h = Builder::new(1);
        h.failed(&[("a", "v1")], Written::Unknown);
        h.acked(&[("a", "v2")], &[(0, 1)]);
        h.replicas(0, &[("a", "v1"), ("a", "v2"), ("a", "v1")]);
        let report = h.check();
        // v1 at offsets 0 and 2: a retry of an unknown outcome.
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.stats.duplicates_retried, 1);
    }

    /// With idempotent producers the same duplicate fails the run.
    #[test]
    fn duplicates_of_idempotent_producers_fail() {
        let mut h = Builder::new(1);
        if let Some(Line {
            event: Event::Start { idempotent, .. },
            ..
        }) = h.lines.first_mut()
        {
            *idempotent = true;
        }
        h.failed(&[("a", "v1")], Written::Unknown);
        h.acked(&[("a", "v2")], &[(0, 1)]);
        h.replicas(0, &[("a", "v1"), ("a", "v2"), ("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "v1 is 2 times in the log");
    }

    #[test]
    fn a_missing_partition_is_caught() {
        let mut h = Builder::new(2);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.replicas(0, &[("a", "v1")]);
        let report = h.check();
        assert_violation(&report, "no replica of partition 1");
    }

    #[test]
    fn a_history_survives_json() {
        let mut h = Builder::new(1);
        h.acked(&[("a", "v1")], &[(0, 0)]);
        h.replicas(0, &[("a", "v1")]);
        for line in &h.lines {
            let text = serde_json::to_string(line).unwrap();
            let back: Line = serde_json::from_str(&text).unwrap();
            assert_eq!(&back, line, "{text}");
        }
    }
}
