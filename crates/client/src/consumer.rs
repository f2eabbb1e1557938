//! [`GroupConsumer`]: a consumer group member. It joins, heartbeats in a task of its own, follows
//! the assignment (starting each new partition at the group's committed offset, or where the
//! reset policy says), fetches its partitions, commits, and leaves when closed or dropped.
//!
//! Ownership follows the protocol (see the proto's "Consumer groups"): a partition the
//! coordinator takes away is released (after an automatic commit, when auto-commit is on) before
//! the next heartbeat says so; a member fenced or expired drops every partition at once
//! ([`GroupEvent::Lost`]) and joins again with its id. A member that cannot heartbeat for its
//! session timeout considers itself expired, since the group has given its partitions away.
//!
//! Delivery is at-least-once: [`GroupConsumer::commit`] commits the position after every record
//! [`GroupConsumer::next`] returned, so commit after processing them.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use ordo_proto::errors::reason;
use tokio::sync::Notify;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::ClientError;
use crate::group::GroupHeartbeat;
use crate::group::TopicPartition;
use crate::types::FetchResult;
use crate::types::StoredRecord;

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// At its first record.
    #[default]
    Earliest,
    /// At its end: only records produced from now on.
    Latest,
    /// Nowhere: [`GroupConsumer::next`] fails with [`ClientError::OutOfRange`].
    Error,
}

/// How a [`GroupConsumer`] behaves. Build with `GroupConsumerOptions::new(group, topics)`.
#[derive(Debug, Clone)]
pub struct GroupConsumerOptions {
    /// The group.
    pub group: String,
    /// The topics to consume.
    pub topics: Vec<String>,
    /// The member id; default: a random one (a member that joins again keeps it).
    pub member_id: Option<String>,
    /// How long the group waits for a heartbeat before giving this member's partitions away.
    /// Zero: the server's default (10 s unless configured). Default zero.
    pub session_timeout: Duration,
    /// Commit the position of every partition this often (and before a partition is released).
    /// Default `None`: commit explicitly with [`GroupConsumer::commit`].
    pub auto_commit_interval: Option<Duration>,
    /// Where a partition without a committed offset starts. Default earliest.
    pub reset: OffsetReset,
    /// Most bytes of one fetch. Default 1 MiB.
    pub fetch_max_bytes: u32,
    /// Longest a fetch waits at the end of a partition. Default 500 ms.
    pub fetch_max_wait: Duration,
}

impl GroupConsumerOptions {
    /// Options for consuming `topics` in `group`, every other setting at its default.
    pub fn new(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            member_id: None,
            session_timeout: Duration::ZERO,
            auto_commit_interval: None,
            reset: OffsetReset::Earliest,
            fetch_max_bytes: 1 << 20,
            fetch_max_wait: Duration::from_millis(500),
        }
    }
}

/// What [`GroupConsumer::next`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupEvent {
    /// These partitions are now this member's; records of them follow.
    Assigned(Vec<TopicPartition>),
    /// These partitions were released (committed first with auto-commit); no more records of
    /// them come.
    Revoked(Vec<TopicPartition>),
    /// This member was fenced or expired: these partitions were already given to others. Work on
    /// them since the last commit will be done again by their new owners.
    Lost(Vec<TopicPartition>),
    /// Records of a partition this member owns, in offset order.
    Records {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The records.
        records: Vec<StoredRecord>,
    },
}

/// What the heartbeat task and the consumer share.
#[derive(Debug, Default)]
struct Membership {
    member_id: String,
    epoch: u32,
    /// What the consumer owns now.
    owned: BTreeSet<TopicPartition>,
    /// The latest answer's assignment, until the consumer applied it. A heartbeat reports
    /// `owned` and this: a partition given counts as owned from the answer on (the consumer may
    /// be starting on it), and one taken away until the consumer released it.
    unapplied: Option<BTreeSet<TopicPartition>>,
    /// Losses the consumer applied (dropped everything): the member joins again only after.
    losses_applied: u64,
}

/// What the heartbeat task tells the consumer: the latest assignment, how many times the member
/// lost everything (fenced, expired, or silent past its session), and an error it cannot get
/// past by retrying (the consumer's `next()` returns it once).
#[derive(Debug, Clone, Default)]
struct Assignment {
    losses: u64,
    assigned: Option<BTreeSet<TopicPartition>>,
    error: Option<ClientError>,
}

/// A partition this member owns.
#[derive(Debug)]
struct Owned {
    /// The next offset to deliver.
    position: u64,
    /// The last offset committed, or where the partition started: only progress past it is
    /// committed.
    committed: u64,
    /// Bumped when the partition is (re)taken, so a fetch of an older ownership is ignored.
    generation: u64,
    /// A fetch is in flight.
    fetching: bool,
}

/// What a fetch task returns: the partition, its ownership generation, the answer.
type Fetched = (TopicPartition, u64, Result<FetchResult, ClientError>);

/// A consumer group member. See the module documentation.
pub struct GroupConsumer {
    client: Client,
    options: GroupConsumerOptions,
    membership: Arc<Mutex<Membership>>,
    assignment: watch::Receiver<Assignment>,
    /// An assignment taken from the watch and not yet fully applied (a failed or cancelled
    /// `next()`): applied again first. Applying is idempotent.
    unapplied: Option<Assignment>,
    seen_losses: u64,
    wake_heartbeat: Arc<Notify>,
    heartbeat: JoinHandle<()>,
    owned: BTreeMap<TopicPartition, Owned>,
    generation: u64,
    /// One task per partition with a fetch in flight; aborted when the consumer is dropped.
    fetches: JoinSet<Fetched>,
    pending: VecDeque<GroupEvent>,
    next_auto_commit: Option<Instant>,
    closed: bool,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group", &self.options.group)
            .field("owned", &self.owned.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn random_member_id() -> String {
    use std::hash::BuildHasher;
    let seed = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    format!("{seed:016x}")
}

fn lost_membership(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::FailedPrecondition { reason: Some(reason), .. }
            if reason == reason::FENCED_MEMBER || reason == reason::UNKNOWN_MEMBER
    )
}

impl Client {
    /// Joins `options.group` as a member consuming `options.topics`. Returns once the first
    /// heartbeat is answered; partitions come as [`GroupEvent::Assigned`] from
    /// [`GroupConsumer::next`].
    pub async fn group_consumer(
        &self,
        options: GroupConsumerOptions,
    ) -> Result<GroupConsumer, ClientError> {
        let member_id = options.member_id.clone().unwrap_or_else(random_member_id);
        let mut join = GroupHeartbeat {
            group: options.group.clone(),
            member_id,
            member_epoch: 0,
            topics: options.topics.clone(),
            owned: BTreeSet::new(),
            session_timeout: options.session_timeout,
        };
        let sent = Instant::now();
        let first = self.group_heartbeat(&join).await?;
        join.member_id = first.member_id.clone();
        let membership = Arc::new(Mutex::new(Membership {
            member_id: first.member_id.clone(),
            epoch: first.member_epoch,
            owned: BTreeSet::new(),
            unapplied: Some(first.assigned.clone()),
            losses_applied: 0,
        }));
        let (sender, mut assignment) = watch::channel(Assignment {
            losses: 0,
            assigned: Some(first.assigned.clone()),
            error: None,
        });
        // The first assignment is news to the consumer.
        assignment.mark_changed();
        let wake_heartbeat = Arc::new(Notify::new());
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.clone(),
            join,
            Arc::clone(&membership),
            sender,
            Arc::clone(&wake_heartbeat),
            Session {
                last_sent: sent,
                interval: first.heartbeat_interval,
                timeout: first.session_timeout,
            },
        ));
        let next_auto_commit = options
            .auto_commit_interval
            .map(|interval| Instant::now() + interval);
        Ok(GroupConsumer {
            client: self.clone(),
            options,
            membership,
            assignment,
            unapplied: None,
            seen_losses: 0,
            wake_heartbeat,
            heartbeat,
            owned: BTreeMap::new(),
            generation: 0,
            fetches: JoinSet::new(),
            pending: VecDeque::new(),
            next_auto_commit,
            closed: false,
        })
    }
}

/// The timing of a member's session, as the heartbeat task keeps it.
#[derive(Debug, Clone, Copy)]
struct Session {
    /// When the last heartbeat that was answered was sent.
    last_sent: Instant,
    /// When to heartbeat next.
    interval: Duration,
    /// The session timeout.
    timeout: Duration,
}

impl Session {
    /// When the member must consider itself expired: a session after it sent its last answered
    /// heartbeat (the coordinator's timer started later, when that heartbeat arrived), less a
    /// tenth for safety.
    fn end(&self) -> Instant {
        self.last_sent + self.timeout - self.timeout / 10
    }
}

/// Errors a heartbeat cannot get past by being retried: the consumer hears of them.
fn is_terminal(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::InvalidArgument { .. }
            | ClientError::NotFound { .. }
            | ClientError::ResourceExhausted { .. }
            | ClientError::FailedPrecondition { .. }
    )
}

/// Heartbeats until the consumer is dropped: reports what it owns, publishes each assignment,
/// and joins again (same id) after a loss, once the consumer dropped everything.
async fn heartbeat_loop(
    client: Client,
    mut heartbeat: GroupHeartbeat,
    membership: Arc<Mutex<Membership>>,
    assignment: watch::Sender<Assignment>,
    wake: Arc<Notify>,
    mut session: Session,
) {
    let mut losses = 0;
    let mut failures = 0u32;
    let mut interval = session.interval;
    loop {
        let member = membership
            .lock()
            .expect("membership lock is never poisoned")
            .epoch
            != 0;
        let session_end = member.then(|| session.end());
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(interval) => {}
            () = sleep_until(session_end) => {}
            () = assignment.closed() => return,
        }
        let lose = |losses: &mut u64| {
            *losses += 1;
            let mut membership = membership
                .lock()
                .expect("membership lock is never poisoned");
            membership.epoch = 0;
            membership.unapplied = None;
            drop(membership);
            assignment.send_modify(|current| {
                current.losses = *losses;
                current.assigned = None;
            });
        };
        let (epoch, owned, applied) = {
            let membership = membership
                .lock()
                .expect("membership lock is never poisoned");
            let mut owned = membership.owned.clone();
            owned.extend(membership.unapplied.iter().flatten().cloned());
            (membership.epoch, owned, membership.losses_applied)
        };
        if applied < losses {
            // The consumer has not dropped its partitions yet: joining again now would let the
            // group give them away while they are still being read.
            interval = Duration::from_millis(20);
            continue;
        }
        let budget = if epoch == 0 {
            client.options().request_timeout
        } else {
            match session.end().checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    tracing::warn!(group = %heartbeat.group, "no heartbeat answered for a session timeout; dropping every partition");
                    lose(&mut losses);
                    interval = Duration::ZERO;
                    continue;
                }
            }
        };
        heartbeat.member_epoch = epoch;
        heartbeat.owned = owned;
        let sent = Instant::now();
        match client.group_heartbeat_within(&heartbeat, budget).await {
            Ok(answer) => {
                failures = 0;
                session = Session {
                    last_sent: sent,
                    interval: answer.heartbeat_interval,
                    timeout: answer.session_timeout,
                };
                interval = answer.heartbeat_interval;
                {
                    let mut membership = membership
                        .lock()
                        .expect("membership lock is never poisoned");
                    membership.member_id = answer.member_id.clone();
                    membership.epoch = answer.member_epoch;
                    membership.unapplied = Some(answer.assigned.clone());
                }
                heartbeat.member_id = answer.member_id;
                assignment.send_if_modified(|current| {
                    let assigned = Some(answer.assigned);
                    let changed = current.assigned != assigned;
                    current.assigned = assigned;
                    current.error = None;
                    changed
                });
            }
            Err(error) if lost_membership(&error) => {
                tracing::warn!(group = %heartbeat.group, %error, "member fenced or expired; joining again once its partitions are dropped");
                lose(&mut losses);
                interval = Duration::ZERO;
            }
            Err(error) => {
                failures += 1;
                // Back off: 50 ms doubling, at most the heartbeat interval (terminal errors: 5 s).
                interval = Duration::from_millis(50)
                    .saturating_mul(1 << failures.min(10))
                    .min(session.interval.max(Duration::from_millis(50)));
                if is_terminal(&error) {
                    tracing::warn!(group = %heartbeat.group, %error, "heartbeat refused");
                    interval = Duration::from_secs(5);
                    assignment.send_modify(|current| current.error = Some(error));
                } else {
                    tracing::warn!(group = %heartbeat.group, %error, "heartbeat failed");
                }
            }
        }
    }
}

impl GroupConsumer {
    /// The member's id.
    pub fn member_id(&self) -> String {
        self.lock().member_id.clone()
    }

    /// The member's epoch now.
    pub fn member_epoch(&self) -> u32 {
        self.lock().epoch
    }

    /// The partitions this member owns now.
    pub fn assignment(&self) -> BTreeSet<TopicPartition> {
        self.owned.keys().cloned().collect()
    }

    /// The next offset this member delivers from a partition it owns.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.owned
            .get(&(topic.to_owned(), partition))
            .map(|owned| owned.position)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership
            .lock()
            .expect("membership lock is never poisoned")
    }

    /// The next event: an assignment change or records. Waits for one. Cancel-safe: an
    /// assignment change interrupted (or failed, e.g. its committed offsets could not be read)
    /// is applied again by the next call.
    pub async fn next(&mut self) -> Result<GroupEvent, ClientError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if let Some(assignment) = self.unapplied.clone() {
                self.apply(assignment).await?;
                self.unapplied = None;
                continue;
            }
            if self
                .next_auto_commit
                .is_some_and(|due| Instant::now() >= due)
            {
                if let Err(error) = self.commit().await {
                    tracing::warn!(group = %self.options.group, %error, "auto-commit failed");
                }
                self.next_auto_commit = self
                    .options
                    .auto_commit_interval
                    .map(|interval| Instant::now() + interval);
            }
            if self.assignment.has_changed().unwrap_or(false) {
                self.take_assignment()?;
                continue;
            }
            self.start_fetches();
            let auto_commit = self.next_auto_commit;
            // `changed` marks the assignment seen, so it is applied here, not by the check above.
            let fetched = tokio::select! {
                changed = self.assignment.changed() => {
                    if changed.is_err() {
                        return Err(ClientError::Protocol {
                            message: "the group heartbeat task stopped".to_owned(),
                        });
                    }
                    None
                }
                Some(joined) = self.fetches.join_next(), if !self.fetches.is_empty() => match joined {
                    Ok(fetched) => Some(fetched),
                    // A fetch task that panicked or was aborted: its partition fetches again.
                    Err(_) => {
                        for owned in self.owned.values_mut() {
                            owned.fetching = false;
                        }
                        self.fetches.abort_all();
                        continue;
                    }
                },
                () = sleep_until(auto_commit), if auto_commit.is_some() => continue,
            };
            match fetched {
                Some((partition, generation, result)) => {
                    self.fetched(partition, generation, result)?;
                }
                None => self.take_assignment()?,
            }
        }
    }

    /// Takes the latest assignment from the heartbeat task, to apply; its error, if any, is
    /// returned (once).
    fn take_assignment(&mut self) -> Result<(), ClientError> {
        let mut assignment = self.assignment.borrow_and_update().clone();
        let error = assignment.error.take();
        self.unapplied = Some(assignment);
        match error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Applies an assignment change: losses first, then releases, then new partitions.
    async fn apply(&mut self, assignment: Assignment) -> Result<(), ClientError> {
        if assignment.losses != self.seen_losses {
            self.seen_losses = assignment.losses;
            let lost: Vec<TopicPartition> = self.owned.keys().cloned().collect();
            self.owned.clear();
            self.fetches.abort_all();
            {
                let mut membership = self.lock();
                membership.owned.clear();
                membership.losses_applied = assignment.losses;
            }
            self.wake_heartbeat.notify_one();
            if !lost.is_empty() {
                self.pending.push_back(GroupEvent::Lost(lost));
            }
        }
        let Some(assigned) = assignment.assigned else {
            return Ok(());
        };
        let revoked: Vec<TopicPartition> = self
            .owned
            .keys()
            .filter(|partition| !assigned.contains(*partition))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            if self.options.auto_commit_interval.is_some() {
                let offsets = self.uncommitted(Some(&revoked));
                if let Err(error) = self.commit_offsets(offsets).await {
                    tracing::warn!(group = %self.options.group, %error, "commit before release failed");
                }
            }
            for partition in &revoked {
                self.owned.remove(partition);
            }
            self.lock().owned = self.owned.keys().cloned().collect();
            self.wake_heartbeat.notify_one();
            self.pending.push_back(GroupEvent::Revoked(revoked));
        }
        let added: BTreeSet<TopicPartition> = assigned
            .iter()
            .filter(|partition| !self.owned.contains_key(*partition))
            .cloned()
            .collect();
        if !added.is_empty() {
            let starts = self.starting_offsets(&added).await?;
            for (partition, position) in starts {
                self.generation += 1;
                self.owned.insert(
                    partition,
                    Owned {
                        position,
                        committed: position,
                        generation: self.generation,
                        fetching: false,
                    },
                );
            }
            self.pending
                .push_back(GroupEvent::Assigned(added.into_iter().collect()));
        }
        // Applied: what the consumer owns is what the heartbeats report from now on.
        let owned: BTreeSet<TopicPartition> = self.owned.keys().cloned().collect();
        let mut membership = self.lock();
        membership.owned = owned;
        if membership.unapplied.as_ref() == Some(&assigned) {
            membership.unapplied = None;
        }
        drop(membership);
        self.wake_heartbeat.notify_one();
        Ok(())
    }

    /// Where each new partition starts: its committed offset, else where the reset policy says.
    async fn starting_offsets(
        &self,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<BTreeMap<TopicPartition, u64>, ClientError> {
        let committed: BTreeMap<TopicPartition, u64> = self
            .client
            .fetch_offsets(&self.options.group, partitions)
            .await?
            .into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.offset))
            .collect();
        let mut starts = BTreeMap::new();
        let mut ends: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for partition in partitions {
            let start = match (committed.get(partition), self.options.reset) {
                (Some(offset), _) => *offset,
                (None, OffsetReset::Earliest) => 0,
                (None, OffsetReset::Latest) => {
                    if !ends.contains_key(&partition.0) {
                        let topic = self.client.describe_topic(&partition.0).await?;
                        let marks = topic
                            .partitions
                            .iter()
                            .map(|description| description.high_watermark)
                            .collect();
                        ends.insert(partition.0.clone(), marks);
                    }
                    ends[&partition.0]
                        .get(partition.1 as usize)
                        .copied()
                        .unwrap_or(0)
                }
                (None, OffsetReset::Error) => {
                    return Err(ClientError::OutOfRange {
                        start: Some(0),
                        end: None,
                        message: format!(
                            "group {} has no committed offset for {}/{} and the reset policy is error",
                            self.options.group, partition.0, partition.1
                        ),
                    });
                }
            };
            starts.insert(partition.clone(), start);
        }
        Ok(starts)
    }

    /// Starts a fetch for every owned partition without one.
    fn start_fetches(&mut self) {
        for (partition, owned) in &mut self.owned {
            if owned.fetching {
                continue;
            }
            owned.fetching = true;
            let client = self.client.clone();
            let partition = partition.clone();
            let (offset, generation) = (owned.position, owned.generation);
            let (max_bytes, max_wait) = (self.options.fetch_max_bytes, self.options.fetch_max_wait);
            self.fetches.spawn(async move {
                let result = client
                    .fetch(&partition.0, partition.1, offset, max_bytes, max_wait)
                    .await;
                if result.is_err() {
                    // Do not spin on a failing partition.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (partition, generation, result)
            });
        }
    }

    /// Takes a fetch's answer: records of a partition still owned (same ownership) are
    /// delivered from its position on.
    fn fetched(
        &mut self,
        partition: TopicPartition,
        generation: u64,
        result: Result<FetchResult, ClientError>,
    ) -> Result<(), ClientError> {
        let Some(owned) = self.owned.get_mut(&partition) else {
            return Ok(());
        };
        if owned.generation != generation {
            return Ok(());
        }
        owned.fetching = false;
        let fetched = match result {
            Ok(fetched) => fetched,
            // The position is outside the log (a reset past the end, records deleted): the reset
            // policy decides, as for a partition without a committed offset.
            Err(ClientError::OutOfRange { start, end, .. })
                if self.options.reset != OffsetReset::Error =>
            {
                let (start, end) = (start.unwrap_or(0), end.unwrap_or(0));
                let position = owned.position;
                owned.position = match self.options.reset {
                    OffsetReset::Latest => end,
                    _ => start,
                };
                tracing::warn!(
                    topic = %partition.0,
                    partition = partition.1,
                    position,
                    start,
                    end,
                    "position outside the log; moved by the reset policy"
                );
                return Ok(());
            }
            Err(error)
                if error.is_retryable()
                    || matches!(error, ClientError::DeadlineExceeded { .. }) =>
            {
                tracing::debug!(%error, "group fetch failed; retrying");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let position = owned.position;
        let records: Vec<StoredRecord> = fetched
            .records
            .into_iter()
            .filter(|record| record.offset >= position)
            .collect();
        if let Some(last) = records.last() {
            owned.position = last.offset + 1;
            self.pending.push_back(GroupEvent::Records {
                topic: partition.0,
                partition: partition.1,
                records,
            });
        }
        Ok(())
    }

    /// Positions of owned partitions (of `only`, when given) past their committed offsets.
    fn uncommitted(&self, only: Option<&[TopicPartition]>) -> BTreeMap<TopicPartition, u64> {
        self.owned
            .iter()
            .filter(|(partition, _)| only.is_none_or(|only| only.contains(partition)))
            .filter(|(_, owned)| owned.committed != owned.position)
            .map(|(partition, owned)| (partition.clone(), owned.position))
            .collect()
    }

    /// Commits the position of every owned partition: every record [`GroupConsumer::next`]
    /// returned counts as processed. Durable on a quorum when it returns.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let offsets = self.uncommitted(None);
        self.commit_offsets(offsets).await
    }

    /// Commits `offset` (the next record to process) for one owned partition, e.g. when only
    /// part of the records returned were processed.
    pub async fn commit_at(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), ClientError> {
        self.commit_offsets(BTreeMap::from([((topic.to_owned(), partition), offset)]))
            .await
    }

    async fn commit_offsets(
        &mut self,
        offsets: BTreeMap<TopicPartition, u64>,
    ) -> Result<(), ClientError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut epoch = self.member_epoch();
        for attempt in 0..2 {
            let member_id = self.member_id();
            match self
                .client
                .commit_offsets(&self.options.group, &member_id, epoch, &offsets)
                .await
            {
                Ok(()) => {
                    for (partition, offset) in &offsets {
                        if let Some(owned) = self.owned.get_mut(partition) {
                            owned.committed = *offset;
                        }
                    }
                    return Ok(());
                }
                // A heartbeat raised the epoch since: commit again with the new one.
                Err(ClientError::FailedPrecondition {
                    reason: Some(reason),
                    ..
                }) if attempt == 0 && reason == reason::FENCED_MEMBER => {
                    self.wake_heartbeat.notify_one();
                    let waited = Instant::now();
                    while self.member_epoch() == epoch && waited.elapsed() < Duration::from_secs(2)
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    epoch = self.member_epoch();
                }
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::FailedPrecondition {
            reason: Some(reason::FENCED_MEMBER.to_owned()),
            message: "the member's epoch moved on twice during one commit".to_owned(),
        })
    }

    /// Stops without leaving the group, as a crashed process would: its partitions move only
    /// once its session times out. Nothing is committed.
    pub fn forget(mut self) {
        self.closed = true;
        self.heartbeat.abort();
        self.fetches.abort_all();
    }

    /// Commits (with auto-commit on) and leaves the group: its partitions move at once.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if self.options.auto_commit_interval.is_some() {
            self.commit().await?;
        }
        self.closed = true;
        self.heartbeat.abort();
        let (member_id, epoch) = {
            let membership = self.lock();
            (membership.member_id.clone(), membership.epoch)
        };
        match self
            .client
            .leave_group(&self.options.group, &member_id, epoch)
            .await
        {
            Err(error) if lost_membership(&error) => Ok(()),
            other => other,
        }
    }
}

impl Drop for GroupConsumer {
    /// Leaves the group in the background (best effort) unless closed.
    fn drop(&mut self) {
        self.heartbeat.abort();
        if self.closed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let group = self.options.group.clone();
        let (member_id, epoch) = {
            let membership = self.lock();
            (membership.member_id.clone(), membership.epoch)
        };
        runtime.spawn(async move {
            let _ = client.leave_group(&group, &member_id, epoch).await;
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
