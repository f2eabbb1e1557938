//! Queues against a 3-node cluster of real `ordo serve` processes, with consumers as real
//! processes (`ordo-queue-consumer`) whose logs say what each received and settled when:
//! - four consumers over a 2-partition queue, one killed with SIGKILL while it holds leases:
//!   every message acked exactly once, the killed consumer's messages delivered again to others
//!   only after their leases ended;
//! - poison messages (always nacked) reach the dead-letter topic after max_deliveries, with the
//!   headers, and are never delivered again; a reject goes there at once;
//! - delayed messages are not delivered early, and still are after a SIGKILL of the queue's
//!   leader and a restart of every node;
//! - key-ordered mode under eight consumers with random processing time: each key's messages
//!   handed out in offset order, one at a time;
//! - a SIGKILL of a queue partition's leader while consumers receive and ack: no acked message
//!   delivered again, none lost;
//! - bad inputs get their codes and reasons.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use ordo_client::{Client, ClientError, ClientOptions, QueueConsumerOptions, QueueSettings};
use ordo_tests::TestCluster;
use ordo_tests::group_member::now_us;
use ordo_tests::queue_consumer::{
    ConsumerLine, MessageHistory, check_acked_at_most_once, merge_logs, read_consumer_log,
};
use tokio::time::{Instant, sleep};

const NODES: usize = 3;
/// How long a queue may take to reach a state a test waits for.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(100);

/// A consumer process and its log file. Killed when dropped.
struct Consumer {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Consumer {
    fn start(
        cluster: &TestCluster,
        dir: &Path,
        queue: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<Consumer> {
        let log = dir.join(format!("{name}.jsonl"));
        let endpoints: Vec<String> = cluster
            .node_ids()
            .into_iter()
            .map(|node| cluster.endpoint(node))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_ordo-queue-consumer"))
            .args(["--endpoints", &endpoints.join(",")])
            .args(["--queue", queue, "--consumer", name])
            .args(extra)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
            .stdin(Stdio::null())
            .spawn()
            .context("start ordo-queue-consumer")?;
        Ok(Consumer {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    fn lines(&self) -> Result<Vec<ConsumerLine>> {
        read_consumer_log(&self.log)
    }

    /// SIGKILL: a crash. Returns when it happened (µs).
    fn kill(&mut self) -> Result<u64> {
        let mut child = self.child.take().context("consumer not running")?;
        child.kill()?;
        child.wait()?;
        Ok(now_us())
    }

    fn stderr(&self) -> String {
        format!(
            "--- {} stderr:\n{}",
            self.name,
            std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
        )
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Ends a test: its error with every consumer's stderr, the consumers killed, the cluster's
/// verdict.
fn finish(cluster: TestCluster, consumers: Vec<Consumer>, result: Result<()>) {
    let result = result.map_err(|error| {
        let stderr: String = consumers.iter().map(Consumer::stderr).collect();
        error.context(stderr)
    });
    drop(consumers);
    cluster.finish(result);
}

async fn client(cluster: &TestCluster) -> Result<Client> {
    cluster
        .client(ClientOptions {
            request_timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        })
        .await
}

/// Produces `values` (keyed by `key(index)` when given) in calls of 50; returns `(partition,
/// offset) -> value`.
async fn produce(
    client: &Client,
    topic: &str,
    values: &[String],
    key: Option<&dyn Fn(usize) -> String>,
    header: Option<(&str, String)>,
) -> Result<BTreeMap<(u32, u64), String>> {
    let mut produced = BTreeMap::new();
    for start in (0..values.len()).step_by(50) {
        let end = (start + 50).min(values.len());
        let records = (start..end)
            .map(|index| {
                let mut record = ordo_client::Record::new(Bytes::from(values[index].clone()));
                if let Some(key) = key {
                    record = record.with_key(key(index));
                }
                if let Some((name, value)) = &header {
                    record = record.with_header(*name, value.clone());
                }
                record
            })
            .collect();
        for (index, ack) in (start..end).zip(client.produce(topic, None, records).await?) {
            produced.insert((ack.partition, ack.offset), values[index].clone());
        }
    }
    Ok(produced)
}

/// Waits until every partition's floor reached its end as `produced` has it (all acked or
/// dead-lettered).
async fn wait_drained(
    client: &Client,
    queue: &str,
    produced: &BTreeMap<(u32, u64), String>,
) -> Result<()> {
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for (partition, offset) in produced.keys() {
        let end = ends.entry(*partition).or_default();
        *end = (*end).max(offset + 1);
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if let Ok(description) = client.describe_queue(queue).await {
            let floors: BTreeMap<u32, u64> = description
                .partitions
                .iter()
                .map(|partition| (partition.partition, partition.floor))
                .collect();
            if ends
                .iter()
                .all(|(partition, end)| floors.get(partition).copied().unwrap_or(0) >= *end)
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "queue {queue} floors {floors:?} did not reach {ends:?}: {description:?}"
            );
        }
        ensure!(Instant::now() < deadline, "queue {queue} not drained");
        sleep(POLL).await;
    }
}

fn logs(consumers: &[Consumer]) -> Result<Vec<Vec<ConsumerLine>>> {
    consumers.iter().map(Consumer::lines).collect()
}

fn acked_done(history: &MessageHistory) -> usize {
    history
        .settled
        .iter()
        .filter(|(_, _, action, _, outcome)| action == "ack" && outcome == "done")
        .count()
}

/// Every produced message acked exactly once by someone.
fn check_all_acked_once(
    produced: &BTreeMap<(u32, u64), String>,
    messages: &BTreeMap<(u32, u64), MessageHistory>,
) -> Result<()> {
    check_acked_at_most_once(messages)?;
    for (id, value) in produced {
        let history = messages
            .get(id)
            .with_context(|| format!("message {id:?} ({value}) was never delivered"))?;
        // An ack sent by a consumer killed before the answer may have been applied.
        let in_doubt = history
            .settled
            .iter()
            .any(|(_, _, action, _, outcome)| action == "ack" && outcome == "in_doubt");
        ensure!(
            acked_done(history) == 1 || (acked_done(history) == 0 && in_doubt),
            "message {id:?} ({value}) acked {} times: {history:?}",
            acked_done(history)
        );
    }
    Ok(())
}

/// Four consumers on a 2-partition queue; one is killed while it holds leases. Every message is
/// acked exactly once; the killed consumer's unsettled messages go to others with a higher
/// delivery count, and not before their lease ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_messages_are_redelivered_after_their_lease() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut consumers = Vec::new();
    let result = async {
        cluster.create_topic("jobs", 2, 3).await?;
        let client = client(&cluster).await?;
        let settings = QueueSettings {
            visibility_timeout_ms: 2_000,
            ..QueueSettings::default()
        };
        client.create_queue("work", "jobs", &settings).await?;
        let values: Vec<String> = (0..1_200).map(|index| format!("job-{index}")).collect();
        let produced = produce(&client, "jobs", &values, None, None).await?;
        for name in ["a", "b", "c", "d"] {
            let extra = ["--max-in-flight", "20", "--process-min-ms", "20", "--process-max-ms", "50"];
            consumers.push(Consumer::start(&cluster, dir.path(), "work", name, &extra)?);
        }
        // Kill "a" once it has settled some and holds more.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let lines = consumers[0].lines()?;
            let settled = lines
                .iter()
                .filter(|line| matches!(line, ConsumerLine::Settled { .. }))
                .count();
            if settled >= 100 {
                break;
            }
            ensure!(Instant::now() < deadline, "consumer a settled only {settled}");
            sleep(Duration::from_millis(20)).await;
        }
        let killed_at = consumers[0].kill()?;
        wait_drained(&client, "work", &produced).await?;
        let logs = logs(&consumers)?;
        let messages = merge_logs(&logs);
        check_all_acked_once(&produced, &messages)?;
        // What "a" received and did not see acked: delivered again to someone else, after its
        // lease ended.
        let mut held = 0;
        for line in &logs[0] {
            let ConsumerLine::Received {
                partition,
                offset,
                delivery,
                lease_until_ms,
                ..
            } = line
            else {
                continue;
            };
            let history = &messages[&(*partition, *offset)];
            let acked_by_a = history.settled.iter().any(|(_, _, action, d, outcome)| {
                action == "ack" && d == delivery && outcome == "done"
            });
            if acked_by_a {
                continue;
            }
            let again = history
                .received
                .iter()
                .find(|(_, consumer, d, _)| consumer != "a" && d > delivery);
            let in_doubt = history.settled.iter().any(|(_, _, _, d, outcome)| {
                d == delivery && outcome == "in_doubt"
            });
            let again = match again {
                Some(again) => again,
                // Its ack was sent before the kill and applied: nothing to deliver again.
                None if in_doubt => continue,
                None => anyhow::bail!(
                    "{partition}/{offset}, held by a, never delivered again: {history:?}"
                ),
            };
            held += 1;
            ensure!(
                again.0 + 1_000 >= (*lease_until_ms as u64) * 1_000,
                "{partition}/{offset} delivered again at {} us, before a's lease ended at {lease_until_ms} ms",
                again.0
            );
            ensure!(again.0 > killed_at, "{partition}/{offset} delivered again before the kill");
        }
        ensure!(held > 0, "consumer a held nothing when killed: the test proved nothing");
        println!("consumer a held {held} messages when killed; all delivered again after their leases");
        let description = client.describe_queue("work").await?;
        let acked: u64 = description.partitions.iter().map(|p| p.acked).sum();
        ensure!(acked == produced.len() as u64, "describe counts {acked} acks: {description:?}");
        Ok(())
    }
    .await;
    finish(cluster, consumers, result);
}

/// Poison messages, always nacked, reach the dead-letter topic after max_deliveries with the
/// headers naming where they came from, and are never delivered again; a rejected one goes there
/// at once. Everything else is acked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_after_max_deliveries() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut consumers = Vec::new();
    let result = async {
        cluster.create_topic("mail", 2, 3).await?;
        let client = client(&cluster).await?;
        let settings = QueueSettings {
            visibility_timeout_ms: 5_000,
            max_deliveries: 3,
            ..QueueSettings::default()
        };
        let queue = client.create_queue("outbox", "mail", &settings).await?;
        ensure!(
            queue.settings.dead_letter_topic == "outbox-dlq",
            "{queue:?}"
        );
        let mut values: Vec<String> = (0..200).map(|index| format!("mail-{index}")).collect();
        values.extend((0..10).map(|index| format!("poison-{index}")));
        values.push("reject-me".to_owned());
        let produced = produce(&client, "mail", &values, None, None).await?;
        for name in ["a", "b"] {
            let extra = ["--max-in-flight", "10"];
            consumers.push(Consumer::start(
                &cluster,
                dir.path(),
                "outbox",
                name,
                &extra,
            )?);
        }
        wait_drained(&client, "outbox", &produced).await?;
        // Nothing more is delivered once drained.
        sleep(Duration::from_secs(1)).await;
        let logs = logs(&consumers)?;
        let messages = merge_logs(&logs);
        check_acked_at_most_once(&messages)?;
        for (id, value) in &produced {
            let history = messages
                .get(id)
                .with_context(|| format!("{value} never delivered"))?;
            if value.starts_with("poison") {
                let deliveries: Vec<u32> = history.received.iter().map(|r| r.2).collect();
                ensure!(deliveries == [1, 2, 3], "{value} delivered {deliveries:?}");
            } else if value == "reject-me" {
                ensure!(history.received.len() == 1, "{value}: {history:?}");
            } else {
                ensure!(acked_done(history) == 1, "{value}: {history:?}");
            }
        }
        let dead = cluster.read_partition(1, "outbox-dlq", 0, 11).await?;
        ensure!(
            dead.len() == 11,
            "dead-letter topic holds {} records",
            dead.len()
        );
        for record in &dead {
            let header = |name: &str| {
                record
                    .headers
                    .iter()
                    .find(|header| header.key == name)
                    .map(|header| String::from_utf8_lossy(&header.value).into_owned())
            };
            let value = String::from_utf8_lossy(&record.value).into_owned();
            let partition: u32 = header("ordo-dlq-partition")
                .context("partition header")?
                .parse()?;
            let offset: u64 = header("ordo-dlq-offset")
                .context("offset header")?
                .parse()?;
            ensure!(
                produced.get(&(partition, offset)) == Some(&value),
                "{value} says it came from {partition}/{offset}"
            );
            ensure!(header("ordo-dlq-topic").as_deref() == Some("mail"));
            ensure!(header("ordo-dlq-queue").as_deref() == Some("outbox"));
            if value == "reject-me" {
                ensure!(header("ordo-dlq-reason").as_deref() == Some("rejected by the test"));
                ensure!(header("ordo-dlq-deliveries").as_deref() == Some("1"));
            } else {
                ensure!(value.starts_with("poison"), "{value} dead-lettered");
                ensure!(
                    header("ordo-dlq-deliveries").as_deref() == Some("3"),
                    "{value}: deliveries"
                );
                ensure!(header("ordo-dlq-reason").as_deref() == Some("delivered 3 times"));
            }
        }
        let description = client.describe_queue("outbox").await?;
        let dead_lettered: u64 = description.partitions.iter().map(|p| p.dead_lettered).sum();
        ensure!(dead_lettered == 11, "{description:?}");
        Ok(())
    }
    .await;
    finish(cluster, consumers, result);
}

/// Delayed messages are not delivered before their time (the consumer's receive time against
/// the deliver-at time, both from this machine's clock: no tolerance needed, the lease is
/// decided after the time passed), and survive a SIGKILL of the queue's leader and a restart of
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time_across_failover_and_restart() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        cluster.create_topic("later", 1, 3).await?;
        let client = client(&cluster).await?;
        let settings = QueueSettings {
            visibility_timeout_ms: 10_000,
            ..QueueSettings::default()
        };
        client.create_queue("timers", "later", &settings).await?;
        let now_ms = now_us() / 1_000;
        let soon = now_ms + 3_000;
        let late = now_ms + 15_000;
        let values: Vec<String> = (0..20).map(|index| format!("soon-{index}")).collect();
        let mut produced =
            produce(&client, "later", &values, None, Some(("ordo-deliver-at", soon.to_string()))).await?;
        let values: Vec<String> = (0..20).map(|index| format!("late-{index}")).collect();
        produced.extend(
            produce(&client, "later", &values, None, Some(("ordo-deliver-at", late.to_string()))).await?,
        );
        let options = QueueConsumerOptions {
            max_in_flight: 100,
            ..QueueConsumerOptions::default()
        };
        let mut received: BTreeMap<String, u64> = BTreeMap::new();
        {
            let mut consumer = client.queue_consumer("timers", options.clone()).await?;
            while received.len() < 20 {
                let message = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                    .await
                    .context("the soon messages did not come")??;
                let at = now_us() / 1_000;
                let value = String::from_utf8_lossy(&message.record.value).into_owned();
                ensure!(value.starts_with("soon"), "{value} delivered at {at}, before {late}");
                received.insert(value, at);
                consumer.ack(message.receipt).await?;
            }
        }
        ensure!(received.values().all(|at| *at >= soon), "delivered early: {received:?} before {soon}");
        // Kill the queue partition's leader, then restart every node before the late ones are due.
        let leader = client.describe_queue("timers").await?.partitions[0].leader;
        cluster.kill(u64::from(leader))?;
        sleep(Duration::from_secs(2)).await;
        cluster.restart(u64::from(leader))?;
        cluster.wait_node_ready(u64::from(leader)).await?;
        for node in cluster.node_ids() {
            cluster.stop(node).await?;
        }
        for node in cluster.node_ids() {
            cluster.restart(node)?;
        }
        cluster.wait_ready().await?;
        ensure!(now_us() / 1_000 < late, "the restarts took past the late messages' time: make the delay longer");
        let client = self::client(&cluster).await?;
        let mut consumer = client.queue_consumer("timers", options).await?;
        let mut late_received = BTreeMap::new();
        while late_received.len() < 20 {
            let message = tokio::time::timeout(Duration::from_secs(40), consumer.next())
                .await
                .context("the late messages did not come after the restart")??;
            let at = now_us() / 1_000;
            let value = String::from_utf8_lossy(&message.record.value).into_owned();
            ensure!(value.starts_with("late"), "{value} delivered again after its ack");
            late_received.insert(value, at);
            consumer.ack(message.receipt).await?;
        }
        ensure!(late_received.values().all(|at| *at >= late), "delivered early: {late_received:?} before {late}");
        let last = late_received.values().max().copied().unwrap_or(late);
        println!(
            "soon: first {} ms after its time; late: last {} ms after its time (after a leader kill and a full restart)",
            received.values().min().copied().unwrap_or(soon) - soon,
            last - late
        );
        wait_drained(&client, "timers", &produced).await?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}

/// Key-ordered mode with eight consumers processing for random times: per key, messages are
/// handed out in offset order, and the next one only after the one before was settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordered_queue_hands_out_each_key_in_order_one_at_a_time() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut consumers = Vec::new();
    let result = async {
        cluster.create_topic("orders", 2, 3).await?;
        let client = client(&cluster).await?;
        let settings = QueueSettings {
            visibility_timeout_ms: 10_000,
            key_ordered: true,
            ..QueueSettings::default()
        };
        client.create_queue("by-key", "orders", &settings).await?;
        let values: Vec<String> = (0..600).map(|index| format!("order-{index}")).collect();
        let key = |index: usize| format!("customer-{}", index % 24);
        let produced = produce(&client, "orders", &values, Some(&key), None).await?;
        for index in 0..8 {
            let extra = ["--max-in-flight", "8", "--process-min-ms", "0", "--process-max-ms", "15"];
            consumers.push(Consumer::start(&cluster, dir.path(), "by-key", &format!("k{index}"), &extra)?);
        }
        wait_drained(&client, "by-key", &produced).await?;
        let messages = merge_logs(&logs(&consumers)?);
        check_all_acked_once(&produced, &messages)?;
        // Per key: deliveries in time order; each after the previous message's settle was sent.
        let mut by_key: BTreeMap<String, Vec<(u64, u64, u64)>> = BTreeMap::new();
        for ((_, offset), history) in &messages {
            let key = history.key.clone().context("a keyed message without key")?;
            for (received, ..) in &history.received {
                let settle_sent = history.settled.first().map_or(u64::MAX, |s| s.0);
                by_key.entry(key.clone()).or_default().push((*received, *offset, settle_sent));
            }
        }
        let mut concurrent_keys = 0;
        for (key, mut deliveries) in by_key {
            deliveries.sort();
            for pair in deliveries.windows(2) {
                let ((_, offset, settle_sent), (next_received, next_offset, _)) = (pair[0], pair[1]);
                ensure!(next_offset > offset, "key {key}: offset {next_offset} handed out after {offset}");
                ensure!(
                    next_received > settle_sent,
                    "key {key}: {next_offset} received at {next_received} us, before {offset}'s settle was sent at {settle_sent} us"
                );
            }
            concurrent_keys += 1;
        }
        ensure!(concurrent_keys == 24, "{concurrent_keys} keys seen");
        // Keys in parallel: more than one consumer did work.
        let busy = logs(&consumers)?.iter().filter(|log| !log.is_empty()).count();
        ensure!(busy > 1, "only {busy} consumer received anything");
        Ok(())
    }
    .await;
    finish(cluster, consumers, result);
}

/// SIGKILL of a queue partition's leader while four consumers receive and ack: no message acked
/// twice or delivered after its ack was answered, and every message acked in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_leader_kill_loses_no_ack_and_no_message() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut consumers = Vec::new();
    let result = async {
        cluster.create_topic("tasks", 2, 3).await?;
        let client = client(&cluster).await?;
        let settings = QueueSettings {
            visibility_timeout_ms: 3_000,
            max_deliveries: 100,
            ..QueueSettings::default()
        };
        client.create_queue("crunch", "tasks", &settings).await?;
        let values: Vec<String> = (0..8_000).map(|index| format!("task-{index}")).collect();
        let produced = produce(&client, "tasks", &values, None, None).await?;
        for name in ["a", "b", "c", "d"] {
            let extra = [
                "--max-in-flight",
                "20",
                "--process-min-ms",
                "2",
                "--process-max-ms",
                "6",
            ];
            consumers.push(Consumer::start(
                &cluster,
                dir.path(),
                "crunch",
                name,
                &extra,
            )?);
        }
        // Kill while they work: once some are acked, long before all.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let (description, acked) = loop {
            let description = client.describe_queue("crunch").await?;
            let acked: u64 = description.partitions.iter().map(|p| p.acked).sum();
            if acked >= 300 {
                break (description, acked);
            }
            ensure!(Instant::now() < deadline, "only {acked} acked");
            sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            acked < produced.len() as u64 / 2,
            "{acked} of {} acked before the kill: make the load bigger",
            produced.len()
        );
        let leader = u64::from(description.partitions[0].leader);
        cluster.kill(leader)?;
        println!("killed node {leader}, leader of partition 0's queue state, after {acked} acks");
        sleep(Duration::from_secs(3)).await;
        cluster.restart(leader)?;
        wait_drained(&client, "crunch", &produced).await?;
        let messages = merge_logs(&logs(&consumers)?);
        check_acked_at_most_once(&messages)?;
        for (id, value) in &produced {
            let history = messages
                .get(id)
                .with_context(|| format!("{value} never delivered"))?;
            // An ack retried after an unknown outcome may answer "unknown" for its own success.
            let acked = history.settled.iter().any(|(_, _, action, _, outcome)| {
                action == "ack" && (outcome == "done" || outcome == "unknown")
            });
            ensure!(acked, "{value} ({id:?}) never acked: {history:?}");
        }
        Ok(())
    }
    .await;
    finish(cluster, consumers, result);
}

fn expect_client_reason<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    reason: &str,
) -> Result<()> {
    match result {
        Err(error) => {
            let text = format!("{error:?}");
            ensure!(text.contains(reason), "expected {reason}, got {text}");
            Ok(())
        }
        Ok(value) => anyhow::bail!("expected {reason}, got {value:?}"),
    }
}

/// Bad names, unknown queues and topics, leases outside their bounds, receipts of partitions
/// the queue does not have, and a malformed deliver-at header each get their reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queue_calls_get_clear_errors() {
    let cluster = TestCluster::start_ready(NODES)
        .await
        .expect("cluster ready");
    let result = async {
        cluster.create_topic("input", 1, 3).await?;
        let client = client(&cluster).await?;
        let defaults = QueueSettings::default();
        expect_client_reason(
            client.create_queue("bad name!", "input", &defaults).await,
            "INVALID_QUEUE_NAME",
        )?;
        expect_client_reason(
            client.create_queue("q", "missing", &defaults).await,
            "TOPIC_NOT_FOUND",
        )?;
        let short = QueueSettings {
            visibility_timeout_ms: 1,
            ..QueueSettings::default()
        };
        expect_client_reason(
            client.create_queue("q", "input", &short).await,
            "INVALID_VISIBILITY_TIMEOUT",
        )?;
        let no_dlq = QueueSettings {
            dead_letter_topic: "nowhere".into(),
            ..QueueSettings::default()
        };
        expect_client_reason(
            client.create_queue("q", "input", &no_dlq).await,
            "INVALID_QUEUE_CONFIG",
        )?;
        client.create_queue("q", "input", &defaults).await?;
        expect_client_reason(
            client.create_queue("q", "input", &defaults).await,
            "AlreadyExists",
        )?;
        expect_client_reason(client.describe_queue("nope").await, "QUEUE_NOT_FOUND")?;
        let receipt = ordo_client::Receipt {
            partition: 7,
            offset: 0,
            delivery: 1,
        };
        expect_client_reason(client.ack("q", &[receipt]).await, "INVALID_RECEIPT")?;
        let never = ordo_client::Receipt {
            partition: 0,
            offset: 5,
            delivery: 1,
        };
        let outcomes = client.ack("q", &[never]).await?;
        ensure!(
            outcomes == [ordo_client::SettleOutcome::Unknown],
            "{outcomes:?}"
        );
        let record = ordo_client::Record::new("x").with_header("ordo-deliver-at", "tomorrow");
        expect_client_reason(
            client.produce("input", None, vec![record]).await,
            "INVALID_DELIVER_AT",
        )?;
        let far = (now_us() / 1_000 + 365 * 24 * 3600 * 1000).to_string();
        let record = ordo_client::Record::new("x").with_header("ordo-deliver-at", far);
        expect_client_reason(
            client.produce("input", None, vec![record]).await,
            "INVALID_DELIVER_AT",
        )?;
        let options = QueueConsumerOptions {
            max_in_flight: 1_000_000,
            ..QueueConsumerOptions::default()
        };
        expect_client_reason(client.queue_consumer("q", options).await, "LIMIT_EXCEEDED")?;
        expect_client_reason(
            client
                .queue_consumer("nope", QueueConsumerOptions::default())
                .await,
            "QUEUE_NOT_FOUND",
        )?;
        client.delete_queue("q").await?;
        expect_client_reason(client.delete_queue("q").await, "QUEUE_NOT_FOUND")?;
        Ok(())
    }
    .await;
    cluster.finish(result);
}
