//! The history of a chaos run: every call the workload made and how it ended, every record a
//! consumer or the final check read, and every fault, one JSON object per line. The checker
//! (`checker.rs`) reads nothing else, so a history file can be checked again by hand:
//! `ordo-chaos check FILE`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A record as a producer sent it. Values are unique in a run (`p{producer}-{seq}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(rename = "v")]
    pub value: String,
}

/// A record as a node served it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    #[serde(rename = "o")]
    pub offset: u64,
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(rename = "v")]
    pub value: String,
}

/// What a failed produce attempt promises about its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Written {
    /// UNAVAILABLE from the node (with its error details): nothing was written.
    No,
    /// Anything else (a deadline, a broken connection, an unexpected code): maybe written.
    Unknown,
}

/// Phase of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The fault was injected.
    Start,
    /// The fault was healed.
    End,
    /// Something the harness observed (a node that exited on its own, a restart).
    Note,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First line: what was run.
    Start {
        seed: u64,
        nodes: usize,
        topic: String,
        partitions: u32,
        replication_factor: u32,
        /// The producers stamped their requests (idempotent producers): any duplicate is then a
        /// violation. Absent in histories from before idempotence.
        #[serde(default)]
        idempotent: bool,
    },
    /// A produce attempt was sent. Every attempt of one call sends the same records.
    Invoke {
        process: usize,
        call: u64,
        attempt: u32,
        node: u64,
        records: Vec<Sent>,
    },
    /// A produce attempt was acked: `acks[i]` is `(partition, offset)` of `records[i]`.
    Ok {
        process: usize,
        call: u64,
        attempt: u32,
        acks: Vec<(u32, u64)>,
    },
    /// A produce attempt failed.
    Fail {
        process: usize,
        call: u64,
        attempt: u32,
        code: String,
        written: Written,
        message: String,
    },
    /// A consumer's successful Fetch (only those that returned records are logged).
    Fetch {
        process: usize,
        node: u64,
        partition: u32,
        offset: u64,
        high_watermark: u64,
        records: Vec<Read>,
    },
    /// A consumer's Fetch failed with a code worth keeping (OUT_OF_RANGE, INTERNAL, ...).
    FetchFail {
        process: usize,
        node: u64,
        partition: u32,
        offset: u64,
        code: String,
        /// For OUT_OF_RANGE: the end the node claimed (its `end_offset` error detail).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end_offset: Option<u64>,
        message: String,
    },
    /// Records a consumer group member got (through `ordo-client`'s `GroupConsumer`).
    GroupRecords {
        member: usize,
        partition: u32,
        records: Vec<Read>,
    },
    /// A group member's commit was acked: `(partition, next offset)`, invoked at `t_invoke`.
    GroupCommit {
        member: usize,
        t_invoke: u64,
        offsets: Vec<(u32, u64)>,
    },
    /// The group's committed offsets as FetchOffsets returned them (invoked at `t_invoke`);
    /// `last` for the read after healing, once the members caught up.
    GroupOffsets {
        t_invoke: u64,
        offsets: Vec<(u32, u64)>,
        #[serde(default)]
        last: bool,
    },
    /// A member's assignment changed: `change` is assigned, revoked or lost.
    GroupAssignment {
        member: usize,
        change: String,
        partitions: Vec<u32>,
    },
    /// A queue consumer got a message (delivery 1 the first time).
    QueueReceived {
        consumer: usize,
        partition: u32,
        delivery: u32,
        record: Read,
    },
    /// A queue consumer's ack answered (invoked at `t_invoke`): `done`, `not_held`, `unknown`
    /// or `error` (the call failed; it may have been applied).
    QueueAck {
        consumer: usize,
        t_invoke: u64,
        partition: u32,
        offset: u64,
        delivery: u32,
        outcome: String,
    },
    /// After healing, once the queue drained: each partition's floor and end, and every message
    /// of the dead-letter topic as `(source partition, source offset)`.
    QueueFinal {
        floors: Vec<(u32, u64)>,
        ends: Vec<(u32, u64)>,
        dead_letters: Vec<(u32, u64)>,
    },
    /// A fault, its healing, or something the harness observed.
    Nemesis {
        kind: String,
        phase: Phase,
        #[serde(default)]
        nodes: Vec<u64>,
        #[serde(default)]
        detail: String,
    },
    /// The workload started (`phase` start) or stopped producing (`phase` end).
    Workload { phase: Phase },
    /// After healing: one replica's whole copy of a partition.
    Replica {
        node: u64,
        partition: u32,
        records: Vec<Read>,
    },
    /// After healing, a replica that could not be read in full (it did not converge).
    ReplicaFail {
        node: u64,
        partition: u32,
        error: String,
    },
    /// A call to a side topic (`cleanup.rs`: retention, compaction) is sent, once.
    CleanupSent {
        topic: String,
        partition: u32,
        records: Vec<Sent>,
    },
    /// Such a call was acked: each record with its offset.
    CleanupAcked {
        topic: String,
        partition: u32,
        records: Vec<Read>,
    },
    /// A replica's own copy of a side topic's partition after healing: its log start and every
    /// record it holds from there.
    CleanupReplica {
        topic: String,
        partition: u32,
        node: u64,
        start: u64,
        records: Vec<Read>,
    },
    CleanupReplicaFail {
        topic: String,
        partition: u32,
        node: u64,
        error: String,
    },
}

/// A line: the event and when it happened, in microseconds since the run started (one clock,
/// the test process's monotonic clock, for every client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub t: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// Appends lines to a history file; shared by every task of a run.
pub struct History {
    path: PathBuf,
    start: Instant,
    out: Mutex<BufWriter<File>>,
}

impl History {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            start: Instant::now(),
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Appends one event stamped with the current time. A history that cannot be written makes
    /// the run meaningless, so a write error panics.
    pub fn log(&self, event: Event) {
        let line = Line {
            t: self.now(),
            event,
        };
        let mut text = serde_json::to_string(&line).expect("a history line serializes");
        text.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(text.as_bytes())
            .expect("write the history file");
    }

    pub fn flush(&self) -> Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().context("flush the history file")
    }
}

/// Reads a history file written by [`History`].
pub fn read_history(path: &Path) -> Result<Vec<Line>> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut lines = Vec::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        lines.push(
            serde_json::from_str(&line).with_context(|| {
                format!("{}:{}: not a history line", path.display(), number + 1)
            })?,
        );
    }
    Ok(lines)
}
