//! Idempotent producers, the service side: `InitProducer` allocates a producer id (or a named
//! producer's next epoch) through the metadata group (`metadata::ProducerRegistry`, pure), and
//! every idempotent produce is checked against the registry before it is proposed. The
//! partition's own producer states (`ordo_raft`'s `producers`, applied through the partition's
//! Raft group) decide what is written; this check refuses early what the cluster knows to be
//! fenced or never allocated, and catches what the partition cannot know (an epoch fenced by an
//! InitProducer before the new instance wrote to this partition).

use std::time::Duration;
use std::time::Instant;

use ordo_raft::ProducerStamp;

use crate::Broker;
use crate::BrokerError;
use crate::ProducerRefusal;
use crate::broker::now_ms;
use crate::metadata::MetaAnswer;
use crate::metadata::MetaCommand;
use crate::metadata::ProducerCheck;
use crate::names::validate_producer_name;

/// The longest a produce waits for this node's metadata to catch up with the metadata leader
/// before judging a producer id it does not know.
const PRODUCER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest InitProducer waits for the other nodes to learn of a bumped epoch.
const FENCE_SPREAD_TIMEOUT: Duration = Duration::from_secs(2);

/// A random non-zero u64 (std's per-process random hash keys, with the clock).
fn random_token() -> u64 {
    use std::hash::BuildHasher;
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_i64(now_ms());
    hasher.finish().max(1)
}

impl Broker {
    /// Allocates a producer session: `(producer id, epoch)`. A name keeps its id across calls
    /// and gets the next epoch, fencing the older ones.
    pub async fn init_producer(
        &self,
        name: Option<String>,
        token: u64,
        timeout: Duration,
    ) -> Result<(u64, u32), BrokerError> {
        if let Some(name) = &name {
            validate_producer_name(name)?;
        }
        let name = name.filter(|name| !name.is_empty());
        // Without a caller's token, one of this node's own: its retries of the command (after a
        // metadata leader change) then raise a named producer's epoch once.
        let token = if token != 0 { token } else { random_token() };
        let command = MetaCommand::InitProducer {
            name,
            token,
            at_ms: u64::try_from(now_ms()).unwrap_or(0),
            names_max: self.state.options.limits.producer_names_max,
        };
        let deadline = Instant::now() + timeout;
        match self.meta_command(command, deadline).await? {
            MetaAnswer::Producer { id, epoch, index } => {
                if epoch > 0 {
                    self.spread_fence(index, deadline).await;
                }
                Ok((id, epoch))
            }
            MetaAnswer::TooManyProducerNames { max } => {
                Err(BrokerError::TooManyProducerNames { max })
            }
            MetaAnswer::Rejected(reason) => Err(BrokerError::FailedPrecondition(reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// After a producer's epoch was bumped at metadata `index`: waits (bounded) until this node
    /// and every other node it can reach applied it, so that from the answer on, every node
    /// that can be reached refuses the older epoch. A node that cannot be reached now learns of
    /// it with its next metadata heartbeat.
    async fn spread_fence(&self, index: u64, deadline: Instant) {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(FENCE_SPREAD_TIMEOUT);
        let me = self.node_id();
        let peers = self
            .nodes()
            .into_keys()
            .filter(|node| *node != me)
            .map(|node| async move {
                let applied = self.peer(node).meta_applied(index, wait).await;
                if !applied {
                    tracing::info!(node, index, "node did not confirm a producer fence in time");
                }
            });
        let local = self.state.node.wait_meta_applied(index, wait);
        futures::future::join(local, futures::future::join_all(peers)).await;
    }

    /// Serves `Internal/MetaApplied`: whether this node applied the metadata log up to `index`
    /// within `timeout`.
    pub async fn handle_meta_applied(&self, index: u64, timeout: Duration) -> bool {
        self.state.node.wait_meta_applied(index, timeout).await
    }

    /// Refuses a stamp the producer registry knows to be fenced or never allocated. When this
    /// node's metadata does not know the id or epoch, it first catches up with the metadata
    /// leader (the id may have been allocated through another node a moment ago).
    pub(crate) async fn check_producer(
        &self,
        stamp: ProducerStamp,
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        let judge = |check| match check {
            ProducerCheck::Current => Ok(()),
            ProducerCheck::Fenced { current_epoch } => {
                Err(BrokerError::ProducerRefused(ProducerRefusal::Fenced {
                    current_epoch,
                }))
            }
            ProducerCheck::Unknown => Err(BrokerError::ProducerRefused(
                ProducerRefusal::UnknownProducer,
            )),
        };
        let check = self.metadata().producers.check(stamp.id, stamp.epoch);
        if check != ProducerCheck::Unknown {
            return judge(check);
        }
        // Unknown here may only mean this node is behind: it says UNKNOWN_PRODUCER (final for
        // the caller) only once it has caught up with the metadata leader, and otherwise that
        // it cannot tell yet (UNAVAILABLE: nothing written, retry).
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(PRODUCER_LOOKUP_TIMEOUT);
        let caught_up = match self.meta_read_index(remaining).await {
            Some(index) => self.state.node.wait_meta_applied(index, remaining).await,
            None => false,
        };
        let check = self.metadata().producers.check(stamp.id, stamp.epoch);
        if check == ProducerCheck::Unknown && !caught_up {
            return Err(BrokerError::unavailable(
                format!(
                    "producer {} epoch {} is not known to node {}, which could not catch up with the metadata leader to check it; nothing was written; retry",
                    stamp.id,
                    stamp.epoch,
                    self.node_id()
                ),
                None,
            ));
        }
        judge(check)
    }
}
