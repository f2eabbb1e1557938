//! `ordo consume`: reads records of one or every partition of a topic.
//!
//! With `--group G` it is a member of consumer group G instead: it reads the partitions the
//! group gives it, from the group's committed offsets (or, without one, from the beginning, or
//! the end with `--from-end`), commits after printing each batch, follows until Ctrl-C or
//! `--max-records`, and leaves the group when it stops.
//!
//! Each partition is read by its own task; tasks hand batches to this command's one printer
//! over a bounded channel, so output lines are never interleaved and a slow stdout slows the
//! readers instead of filling memory. Without `--follow` each partition is read up to the high
//! watermark it had at start; with `--follow` the command subscribes and runs until Ctrl-C or
//! `--max-records`.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use futures::StreamExt;
use ordo_client::{
    Client, ClientError, GroupConsumerOptions, GroupEvent, OffsetReset, PartitionDescription,
    QueueConsumerOptions, SettleOutcome, StartAt, StoredRecord,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::GlobalArgs;
use crate::output::{self, OutputFormat};
use crate::signals::Signals;

/// Batches waiting for the printer, over all partitions.
const PRINT_QUEUE_CAPACITY: usize = 64;

/// Arguments of `ordo consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read (not with --queue: a queue knows its topic).
    #[arg(
        required_unless_present = "queue",
        conflicts_with = "queue",
        default_value = ""
    )]
    pub topic: String,
    /// Partition to read (default: every partition, concurrently).
    #[arg(long, conflicts_with_all = ["group", "queue"])]
    pub partition: Option<u32>,
    /// Receive from this queue: each message leased to this consumer alone (follows until
    /// Ctrl-C or --max-records). Without --ack, leases end unsettled and the messages go out
    /// again after the visibility timeout.
    #[arg(long, conflicts_with_all = ["group", "offset", "from_end", "from_beginning"])]
    pub queue: Option<String>,
    /// With --queue: ack each message once printed.
    #[arg(long, requires = "queue")]
    pub ack: bool,
    /// With --queue: the lease length asked for (e.g. 30s; default: the queue's).
    #[arg(long, requires = "queue", value_parser = humantime::parse_duration)]
    pub visibility_timeout: Option<Duration>,
    /// With --queue: most messages held unsettled at once.
    #[arg(long, requires = "queue", default_value_t = 100)]
    pub max_in_flight: u32,
    /// Read as a member of this consumer group (commits after printing; follows).
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: the session timeout asked for (e.g. 10s; default: the server's).
    #[arg(long, requires = "group", value_parser = humantime::parse_duration)]
    pub session_timeout: Option<Duration>,
    /// Start at the first record still in the log (the default).
    #[arg(long, group = "start")]
    pub from_beginning: bool,
    /// Start at this offset (in each partition read).
    #[arg(long, group = "start", conflicts_with = "group")]
    pub offset: Option<u64>,
    /// Start at the end: only records appended from now on.
    #[arg(long, group = "start")]
    pub from_end: bool,
    /// Keep reading new records until Ctrl-C (or --max-records).
    #[arg(long)]
    pub follow: bool,
    /// Stop after printing this many records in total.
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Upper bound on record bytes per fetch or stream message.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_bytes: u32,
}

impl ConsumeArgs {
    fn start(&self) -> StartAt {
        match (self.offset, self.from_end) {
            (Some(offset), _) => StartAt::Offset(offset),
            (None, true) => StartAt::End,
            (None, false) => StartAt::Beginning,
        }
    }
}

/// What a partition task hands to the printer.
enum Message {
    Records {
        partition: u32,
        records: Vec<StoredRecord>,
    },
    Failed(anyhow::Error),
}

/// One record as a JSON line.
#[derive(Serialize)]
struct RecordLine<'a> {
    partition: u32,
    #[serde(flatten)]
    record: &'a StoredRecord,
}

/// Runs `ordo consume`.
pub async fn run(args: ConsumeArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    // Installed before any task starts, so Ctrl-C always ends the command cleanly.
    let mut signals = Signals::new()?;
    let client = global.client().await?;
    if let Some(queue) = &args.queue {
        return consume_queue(&client, queue, &args, global.output, &mut signals).await;
    }
    if let Some(group) = &args.group {
        return consume_group(&client, group, &args, global.output, &mut signals).await;
    }
    let topic = client
        .describe_topic(&args.topic)
        .await
        .with_context(|| format!("cannot describe topic {}", args.topic))?;
    let partitions: Vec<PartitionDescription> = match args.partition {
        None => topic.partitions.clone(),
        Some(number) => {
            let Some(partition) = topic.partitions.iter().find(|p| p.partition == number) else {
                bail!(
                    "topic {} has no partition {number} (it has {})",
                    args.topic,
                    topic.partitions.len()
                );
            };
            vec![partition.clone()]
        }
    };
    if args.max_records == Some(0) {
        return Ok(());
    }

    let (sender, mut receiver) = mpsc::channel(PRINT_QUEUE_CAPACITY);
    let mut tasks = JoinSet::new();
    let start = args.start();
    for partition in partitions {
        let client = client.clone();
        let topic = args.topic.clone();
        let sender = sender.clone();
        let max_bytes = args.max_bytes;
        let follow = args.follow;
        tasks.spawn(async move {
            let number = partition.partition;
            let result = if follow {
                follow_partition(&client, &topic, number, start, max_bytes, &sender).await
            } else {
                read_partition(&client, &topic, &partition, start, max_bytes, &sender).await
            };
            if let Err(error) = result {
                let error = error.context(format!("cannot read partition {number} of {topic}"));
                // The printer may already be gone (Ctrl-C, --max-records): nothing to report to.
                let _ = sender.send(Message::Failed(error)).await;
            }
        });
    }
    drop(sender);

    let mut printed: u64 = 0;
    let outcome = loop {
        let message = tokio::select! {
            message = receiver.recv() => message,
            _ = signals.recv() => break Ok(()),
        };
        match message {
            None => break Ok(()),
            Some(Message::Failed(error)) => break Err(error),
            Some(Message::Records { partition, records }) => {
                let left = args.max_records.map_or(u64::MAX, |max| max - printed);
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(records.len());
                print_records(partition, &records[..take], global.output)?;
                printed += u64::try_from(take).unwrap_or(u64::MAX);
                if args.max_records.is_some_and(|max| printed >= max) {
                    break Ok(());
                }
            }
        }
    };
    // Dropping the receiver and aborting stops every reader; their streams close with them.
    drop(receiver);
    tasks.shutdown().await;
    outcome
}

/// Consumes as a member of `group` until Ctrl-C or `--max-records`, committing after each
/// printed batch; leaves the group at the end.
async fn consume_group(
    client: &Client,
    group: &str,
    args: &ConsumeArgs,
    format: OutputFormat,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let mut options = GroupConsumerOptions::new(group, [args.topic.clone()]);
    options.fetch_max_bytes = args.max_bytes;
    options.session_timeout = args.session_timeout.unwrap_or_default();
    if args.from_end {
        options.reset = OffsetReset::Latest;
    }
    let mut consumer = client
        .group_consumer(options)
        .await
        .with_context(|| format!("cannot join group {group}"))?;
    tracing::info!(group, member = %consumer.member_id(), "joined");
    let mut printed: u64 = 0;
    let outcome = loop {
        if args.max_records.is_some_and(|max| printed >= max) {
            break Ok(());
        }
        let event = tokio::select! {
            event = consumer.next() => event,
            _ = signals.recv() => break Ok(()),
        };
        match event {
            Err(error) => break Err(anyhow::Error::new(error).context("group consumer failed")),
            Ok(GroupEvent::Assigned(partitions)) => {
                tracing::info!(?partitions, "assigned");
            }
            Ok(GroupEvent::Revoked(partitions)) => tracing::info!(?partitions, "revoked"),
            Ok(GroupEvent::Lost(partitions)) => tracing::warn!(?partitions, "lost"),
            Ok(GroupEvent::Records {
                topic,
                partition,
                records,
            }) => {
                let left = args.max_records.map_or(u64::MAX, |max| max - printed);
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(records.len());
                print_records(partition, &records[..take], format)?;
                printed += u64::try_from(take).unwrap_or(u64::MAX);
                if take < records.len() {
                    // Only what was printed counts as processed: commit up to it.
                    break consumer
                        .commit_at(&topic, partition, records[take - 1].offset + 1)
                        .await
                        .context("cannot commit");
                }
                match consumer.commit().await {
                    Ok(()) => {}
                    // Expired or replaced: the member joins again by itself, and what was not
                    // committed goes to the partitions' next owners.
                    Err(ClientError::FailedPrecondition { message, .. }) => {
                        tracing::warn!(%message, "commit refused; carrying on");
                    }
                    Err(error) => break Err(anyhow::Error::new(error).context("cannot commit")),
                }
            }
        }
    };
    let closed = consumer.close().await.context("cannot leave the group");
    outcome.and(closed)
}

/// One received message as a JSON line.
#[derive(Serialize)]
struct QueueLine<'a> {
    partition: u32,
    delivery: u32,
    #[serde(flatten)]
    record: &'a StoredRecord,
}

/// Receives from `queue` until Ctrl-C or `--max-records`, acking each printed message with
/// `--ack`.
async fn consume_queue(
    client: &Client,
    queue: &str,
    args: &ConsumeArgs,
    format: OutputFormat,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let options = QueueConsumerOptions {
        max_in_flight: args.max_in_flight,
        visibility_timeout: args.visibility_timeout.unwrap_or_default(),
        ..QueueConsumerOptions::default()
    };
    let mut consumer = client
        .queue_consumer(queue, options)
        .await
        .with_context(|| format!("cannot receive from queue {queue}"))?;
    let mut printed: u64 = 0;
    loop {
        if args.max_records.is_some_and(|max| printed >= max) {
            return Ok(());
        }
        let message = tokio::select! {
            message = consumer.next() => message.context("receive failed")?,
            _ = signals.recv() => return Ok(()),
        };
        let line = match format {
            OutputFormat::Json => output::json_line(&QueueLine {
                partition: message.receipt.partition,
                delivery: message.receipt.delivery,
                record: &message.record,
            })?,
            OutputFormat::Table => format!(
                "{} {} #{} {} {}",
                message.receipt.partition,
                message.record.offset,
                message.receipt.delivery,
                message
                    .record
                    .key
                    .as_ref()
                    .map_or_else(|| "-".into(), |key| String::from_utf8_lossy(key)),
                String::from_utf8_lossy(&message.record.value)
            ),
        };
        output::print_line(&line)?;
        printed += 1;
        if args.ack {
            match consumer.ack(message.receipt).await.context("cannot ack")? {
                SettleOutcome::Done => {}
                outcome => tracing::warn!(
                    ?outcome,
                    offset = message.record.offset,
                    "ack did nothing: the lease had ended"
                ),
            }
        }
    }
}

/// Reads `partition` from `start` up to the high watermark it had when described.
async fn read_partition(
    client: &Client,
    topic: &str,
    partition: &PartitionDescription,
    start: StartAt,
    max_bytes: u32,
    sender: &mpsc::Sender<Message>,
) -> anyhow::Result<()> {
    let number = partition.partition;
    let stop = partition.high_watermark;
    let mut offset = match start {
        StartAt::Beginning => partition.log_start_offset,
        StartAt::End => stop,
        StartAt::Offset(offset) => offset,
    };
    while offset < stop {
        let result = match client
            .fetch(topic, number, offset, max_bytes, Duration::ZERO)
            .await
        {
            Ok(result) => result,
            // The log was truncated below `offset` since it was described: skip to its start.
            Err(ClientError::OutOfRange {
                start: Some(log_start),
                ..
            }) if log_start > offset => {
                tracing::warn!(
                    partition = number,
                    offset,
                    log_start,
                    "offset no longer in the log, skipping ahead"
                );
                offset = log_start;
                continue;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("fetch at offset {offset} failed"));
            }
        };
        let Some(next) = result.next_offset() else {
            // No record below the high watermark we were told about: nothing more to read.
            break;
        };
        if next <= offset {
            return Err(anyhow!(
                "server returned records before the requested offset {offset}"
            ));
        }
        offset = next;
        let records: Vec<StoredRecord> = result
            .records
            .into_iter()
            .filter(|record| record.offset < stop)
            .collect();
        if !records.is_empty()
            && sender
                .send(Message::Records {
                    partition: number,
                    records,
                })
                .await
                .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Subscribes to `partition` from `start` and forwards batches until the printer goes away.
async fn follow_partition(
    client: &Client,
    topic: &str,
    partition: u32,
    start: StartAt,
    max_bytes: u32,
    sender: &mpsc::Sender<Message>,
) -> anyhow::Result<()> {
    let mut subscription = client
        .subscribe(topic, partition, start, max_bytes)
        .await
        .context("cannot subscribe")?;
    while let Some(result) = subscription.next().await {
        let result = result.context("subscription failed")?;
        if !result.records.is_empty()
            && sender
                .send(Message::Records {
                    partition,
                    records: result.records,
                })
                .await
                .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Prints `records` as `partition offset key value` lines or JSON lines.
fn print_records(
    partition: u32,
    records: &[StoredRecord],
    format: OutputFormat,
) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for record in records {
        match format {
            OutputFormat::Json => {
                text.push_str(&output::json_line(&RecordLine { partition, record })?)
            }
            OutputFormat::Table => {
                let key = record
                    .key
                    .as_ref()
                    .map_or_else(|| "-".into(), |key| String::from_utf8_lossy(key));
                text.push_str(&format!(
                    "{partition} {} {key} {}",
                    record.offset,
                    String::from_utf8_lossy(&record.value)
                ));
            }
        }
        text.push('\n');
    }
    output::print_line(text.trim_end_matches('\n'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ConsumeArgs,
    }

    fn parse(line: &[&str]) -> Result<ConsumeArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("consume").chain(line.iter().copied()))
            .map(|wrapper| wrapper.args)
    }

    /// The start flags exclude each other and default to the beginning.
    #[test]
    fn start_flags() {
        assert_eq!(parse(&["t"]).expect("valid").start(), StartAt::Beginning);
        assert_eq!(
            parse(&["t", "--from-end"]).expect("valid").start(),
            StartAt::End
        );
        assert_eq!(
            parse(&["t", "--offset", "4"]).expect("valid").start(),
            StartAt::Offset(4)
        );
        assert!(parse(&["t", "--from-end", "--offset", "4"]).is_err());
        assert!(parse(&["t", "--from-beginning", "--from-end"]).is_err());
    }
}
